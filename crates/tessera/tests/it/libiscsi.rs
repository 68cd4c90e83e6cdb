//! A few calls of libiscsi (the shared library libiscsi-bin installs),
//! loaded with dlopen: what the scenarios need that libiscsi's tools do
//! not offer, such as PERSISTENT RESERVE OUT from a chosen initiator
//! through a chosen portal. Each call is synchronous; a session is one
//! initiator's login to one portal.

use std::ffi::{c_char, c_int, c_void, CStr, CString};

type Context = *mut c_void;
type Task = *mut c_void;

const SESSION_NORMAL: c_int = 2;
const HEADER_DIGEST_NONE: c_int = 0;
pub const STATUS_GOOD: c_int = 0;
pub const STATUS_CHECK_CONDITION: c_int = 2;
pub const STATUS_RESERVATION_CONFLICT: c_int = 0x18;
/// The sense key of a COMPARE AND WRITE whose compare failed.
pub const SENSE_MISCOMPARE: u8 = 0x0e;

/// The first fields of libiscsi's `struct scsi_task` (scsi-lowlevel.h,
/// the same from 1.19 on), as far as the additional sense code and
/// qualifier (`asc << 8 | ascq`).
#[repr(C)]
struct TaskHead {
    status: c_int,
    cdb_size: c_int,
    xfer_dir: c_int,
    expxferlen: c_int,
    cdb: [u8; 16],
    residual_status: c_int,
    residual: usize,
    sense_error_type: u8,
    sense_key: c_int,
    sense_ascq: c_int,
}

/// PERSISTENT RESERVE OUT's parameters (libiscsi's
/// `struct scsi_persistent_reserve_out_basic`).
#[repr(C)]
struct ProutBasic {
    reservation_key: u64,
    service_action_reservation_key: u64,
    spec_i_pt: u8,
    all_tg_pt: u8,
    aptpl: u8,
}

/// libiscsi's `struct scsi_iovec`.
#[repr(C)]
struct IoVec {
    base: *mut c_void,
    length: usize,
}

/// libiscsi's `struct unmap_list`: one UNMAP block descriptor.
#[repr(C)]
struct UnmapList {
    lba: u64,
    num: u32,
}

struct Api {
    create_context: unsafe extern "C" fn(*const c_char) -> Context,
    set_targetname: unsafe extern "C" fn(Context, *const c_char) -> c_int,
    set_session_type: unsafe extern "C" fn(Context, c_int) -> c_int,
    set_header_digest: unsafe extern "C" fn(Context, c_int) -> c_int,
    full_connect_sync: unsafe extern "C" fn(Context, *const c_char, c_int) -> c_int,
    get_error: unsafe extern "C" fn(Context) -> *const c_char,
    logout_sync: unsafe extern "C" fn(Context) -> c_int,
    destroy_context: unsafe extern "C" fn(Context) -> c_int,
    #[allow(clippy::type_complexity)]
    write10_sync:
        unsafe extern "C" fn(Context, c_int, u32, *mut u8, u32, c_int, c_int, c_int, c_int, c_int, c_int) -> Task,
    persistent_reserve_out_sync: unsafe extern "C" fn(Context, c_int, c_int, c_int, c_int, *mut c_void) -> Task,
    #[allow(clippy::type_complexity)]
    read10_iov_sync: unsafe extern "C" fn(
        Context,
        c_int,
        u32,
        u32,
        c_int,
        c_int,
        c_int,
        c_int,
        c_int,
        c_int,
        *mut IoVec,
        c_int,
    ) -> Task,
    #[allow(clippy::type_complexity)]
    compareandwrite_sync:
        unsafe extern "C" fn(Context, c_int, u64, *mut u8, u32, c_int, c_int, c_int, c_int, c_int, c_int) -> Task,
    persistent_reserve_in_sync: unsafe extern "C" fn(Context, c_int, c_int, u16) -> Task,
    unmap_sync: unsafe extern "C" fn(Context, c_int, c_int, c_int, *mut UnmapList, c_int) -> Task,
    sanitize_sync: unsafe extern "C" fn(Context, c_int, c_int, c_int, c_int, c_int, *mut c_void) -> Task,
    datain_unmarshall: unsafe extern "C" fn(Task) -> *mut c_void,
    free_task: unsafe extern "C" fn(Task),
}

/// The function `name` of `library`.
///
/// # Safety
/// `F` must be the C function pointer type the symbol has.
unsafe fn symbol<F>(library: *mut c_void, name: &CStr) -> F {
    assert_eq!(std::mem::size_of::<F>(), std::mem::size_of::<*mut c_void>());
    // SAFETY: dlsym on a handle dlopen returned; the caller vouches for F.
    unsafe {
        let found = libc::dlsym(library, name.as_ptr());
        assert!(!found.is_null(), "libiscsi has no {name:?}");
        std::mem::transmute_copy::<*mut c_void, F>(&found)
    }
}

fn api() -> &'static Api {
    static API: std::sync::OnceLock<Api> = std::sync::OnceLock::new();
    API.get_or_init(|| {
        // SAFETY: dlopen/dlsym of a library by name; each symbol is cast
        // to the signature libiscsi's iscsi.h declares for it.
        unsafe {
            let library = libc::dlopen(c"libiscsi.so.7".as_ptr(), libc::RTLD_NOW);
            assert!(
                !library.is_null(),
                "this test needs libiscsi.so.7 (Debian package libiscsi7, with libiscsi-bin; scripts/test installs it)"
            );
            Api {
                create_context: symbol(library, c"iscsi_create_context"),
                set_targetname: symbol(library, c"iscsi_set_targetname"),
                set_session_type: symbol(library, c"iscsi_set_session_type"),
                set_header_digest: symbol(library, c"iscsi_set_header_digest"),
                full_connect_sync: symbol(library, c"iscsi_full_connect_sync"),
                get_error: symbol(library, c"iscsi_get_error"),
                logout_sync: symbol(library, c"iscsi_logout_sync"),
                destroy_context: symbol(library, c"iscsi_destroy_context"),
                write10_sync: symbol(library, c"iscsi_write10_sync"),
                persistent_reserve_out_sync: symbol(library, c"iscsi_persistent_reserve_out_sync"),
                persistent_reserve_in_sync: symbol(library, c"iscsi_persistent_reserve_in_sync"),
                read10_iov_sync: symbol(library, c"iscsi_read10_iov_sync"),
                compareandwrite_sync: symbol(library, c"iscsi_compareandwrite_sync"),
                unmap_sync: symbol(library, c"iscsi_unmap_sync"),
                sanitize_sync: symbol(library, c"iscsi_sanitize_sync"),
                datain_unmarshall: symbol(library, c"scsi_datain_unmarshall"),
                free_task: symbol(library, c"scsi_free_scsi_task"),
            }
        }
    })
}

/// One initiator logged in to one portal.
pub struct Session {
    context: Context,
    lun: c_int,
}

// SAFETY: a libiscsi context keeps no thread-local state and is used
// through `&self` by one synchronous call at a time on whichever thread
// holds the session; moving it to another thread is sound.
unsafe impl Send for Session {}

impl Session {
    pub fn login(initiator: &str, portal: &str, target: &str, lun: i32) -> Result<Session, String> {
        let api = api();
        let initiator = CString::new(initiator).unwrap();
        let portal = CString::new(portal).unwrap();
        let target = CString::new(target).unwrap();
        // SAFETY: calls on a context this session owns, with NUL-terminated
        // strings that outlive each call.
        unsafe {
            let context = (api.create_context)(initiator.as_ptr());
            assert!(!context.is_null(), "iscsi_create_context failed");
            let session = Session { context, lun };
            (api.set_targetname)(context, target.as_ptr());
            (api.set_session_type)(context, SESSION_NORMAL);
            (api.set_header_digest)(context, HEADER_DIGEST_NONE);
            if (api.full_connect_sync)(context, portal.as_ptr(), lun) != 0 {
                return Err(session.error());
            }
            Ok(session)
        }
    }

    fn error(&self) -> String {
        // SAFETY: libiscsi returns a NUL-terminated string it owns.
        unsafe { CStr::from_ptr((api().get_error)(self.context)).to_string_lossy().into_owned() }
    }

    /// The SCSI status of a finished task (libiscsi's `struct scsi_task`
    /// begins with it), after which the task is freed.
    fn status(&self, task: Task) -> Result<c_int, String> {
        if task.is_null() {
            return Err(self.error());
        }
        // SAFETY: `status` is the first field, an int; the task is ours.
        unsafe {
            let status = *(task as *const c_int);
            (api().free_task)(task);
            Ok(status)
        }
    }

    /// WRITE(10) of one 512-byte block.
    pub fn write10(&self, lba: u32, block: &mut [u8; 512]) -> Result<c_int, String> {
        // SAFETY: the buffer outlives the synchronous call.
        let task =
            unsafe { (api().write10_sync)(self.context, self.lun, lba, block.as_mut_ptr(), 512, 512, 0, 0, 0, 0, 0) };
        self.status(task)
    }

    /// WRITE(10) of `data` (whole 512-byte blocks) at `lba`: the status,
    /// and with CHECK CONDITION the sense key and `asc << 8 | ascq`.
    pub fn write10_sense(&self, lba: u32, data: &mut [u8]) -> Result<(c_int, Option<(u8, u16)>), String> {
        assert!(data.len().is_multiple_of(512), "whole blocks");
        // SAFETY: the buffer outlives the synchronous call.
        let task = unsafe {
            (api().write10_sync)(self.context, self.lun, lba, data.as_mut_ptr(), data.len() as u32, 512, 0, 0, 0, 0, 0)
        };
        self.status_and_sense(task)
    }

    /// As [`Session::status`], with CHECK CONDITION's sense key and
    /// `asc << 8 | ascq`.
    fn status_and_sense(&self, task: Task) -> Result<(c_int, Option<(u8, u16)>), String> {
        if task.is_null() {
            return Err(self.error());
        }
        // SAFETY: the task is ours and begins as `TaskHead` does.
        let sense = unsafe {
            let head = &*(task as *const TaskHead);
            (head.status == STATUS_CHECK_CONDITION).then_some((head.sense_key as u8, head.sense_ascq as u16))
        };
        self.status(task).map(|status| (status, sense))
    }

    /// READ(10) of one 512-byte block into `block`.
    pub fn read10(&self, lba: u32, block: &mut [u8; 512]) -> Result<c_int, String> {
        let mut vector = IoVec { base: block.as_mut_ptr() as *mut c_void, length: block.len() };
        // SAFETY: the buffer and its vector outlive the synchronous call.
        let task =
            unsafe { (api().read10_iov_sync)(self.context, self.lun, lba, 512, 512, 0, 0, 0, 0, 0, &mut vector, 1) };
        self.status(task)
    }

    /// COMPARE AND WRITE of one 512-byte block: `both` holds the block to
    /// compare, then the block to write. The status, and with CHECK
    /// CONDITION the sense key.
    pub fn compare_and_write(&self, lba: u64, both: &mut [u8; 1024]) -> Result<(c_int, Option<u8>), String> {
        // SAFETY: the buffer outlives the synchronous call.
        let task = unsafe {
            (api().compareandwrite_sync)(self.context, self.lun, lba, both.as_mut_ptr(), 1024, 512, 0, 0, 0, 0, 0)
        };
        self.status_and_sense(task).map(|(status, sense)| (status, sense.map(|(key, _)| key)))
    }

    /// UNMAP of these (first LBA, blocks) ranges.
    pub fn unmap(&self, ranges: &[(u64, u32)]) -> Result<c_int, String> {
        let mut list: Vec<UnmapList> = ranges.iter().map(|&(lba, num)| UnmapList { lba, num }).collect();
        // SAFETY: the descriptors outlive the synchronous call.
        let task = unsafe { (api().unmap_sync)(self.context, self.lun, 0, 0, list.as_mut_ptr(), list.len() as c_int) };
        self.status(task)
    }

    /// SANITIZE with service action `action` (3: CRYPTO ERASE) and no
    /// parameter list, waiting for it to end (no IMMED): the status, and
    /// with CHECK CONDITION the sense key and `asc << 8 | ascq`.
    pub fn sanitize(&self, action: c_int) -> Result<(c_int, Option<(u8, u16)>), String> {
        // SAFETY: no parameter data; a synchronous call.
        let task = unsafe { (api().sanitize_sync)(self.context, self.lun, 0, 0, action, 0, std::ptr::null_mut()) };
        self.status_and_sense(task)
    }

    /// PERSISTENT RESERVE OUT (logical-unit scope): `action` 0 REGISTER,
    /// 1 RESERVE, 2 RELEASE, 3 CLEAR, 4 PREEMPT; `kind` the reservation
    /// type (5: Write Exclusive - Registrants Only).
    pub fn prout(&self, action: c_int, kind: c_int, key: u64, service_key: u64) -> Result<c_int, String> {
        let mut params = ProutBasic {
            reservation_key: key,
            service_action_reservation_key: service_key,
            spec_i_pt: 0,
            all_tg_pt: 0,
            aptpl: 0,
        };
        // SAFETY: the parameters outlive the synchronous call.
        let task = unsafe {
            (api().persistent_reserve_out_sync)(
                self.context,
                self.lun,
                action,
                0,
                kind,
                &mut params as *mut ProutBasic as *mut c_void,
            )
        };
        self.status(task)
    }

    /// PERSISTENT RESERVE IN, READ KEYS: `Ok(Ok(keys))` when GOOD,
    /// `Ok(Err(status))` otherwise.
    pub fn read_keys(&self) -> Result<Result<Vec<u64>, c_int>, String> {
        // SAFETY: a synchronous call on our context; the task is ours, and
        // libiscsi unmarshals READ KEYS into its
        // `struct scsi_persistent_reserve_in_read_keys` (u32 generation,
        // u32 length, int count, then the u64 keys at offset 16), which
        // lives as long as the task.
        unsafe {
            let task = (api().persistent_reserve_in_sync)(self.context, self.lun, 0, 4096);
            if task.is_null() {
                return Err(self.error());
            }
            let status = *(task as *const c_int);
            let keys = if status == STATUS_GOOD {
                let keys = (api().datain_unmarshall)(task) as *const u8;
                if keys.is_null() {
                    (api().free_task)(task);
                    return Err("READ KEYS answered data libiscsi could not parse".into());
                }
                let count = *(keys.add(8) as *const c_int);
                let first = keys.add(16) as *const u64;
                Ok((0..count as usize).map(|index| *first.add(index)).collect())
            } else {
                Err(status)
            };
            (api().free_task)(task);
            Ok(keys)
        }
    }

    /// Runs `command` again while it answers CHECK CONDITION (unit
    /// attentions after a login or a reservation change), a few times.
    pub fn settled(&self, mut command: impl FnMut(&Session) -> Result<c_int, String>) -> Result<c_int, String> {
        for _ in 0..8 {
            let status = command(self)?;
            if status != STATUS_CHECK_CONDITION {
                return Ok(status);
            }
        }
        Err("still CHECK CONDITION after 8 tries".into())
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // SAFETY: the context is ours and not used after this.
        unsafe {
            (api().logout_sync)(self.context);
            (api().destroy_context)(self.context);
        }
    }
}
