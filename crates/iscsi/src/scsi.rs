//! The SCSI command set of a direct-access block device (SPC-4, SBC-3)
//! over a [`BlockDevice`].
//!
//! [`LogicalUnit::execute`] takes one command descriptor block with its
//! data-out buffer and the I_T nexus it came from, and returns the status,
//! the data-in buffer and the sense data. It knows nothing of iSCSI: the
//! connection layer moves the buffers.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;

use crate::copy;
use crate::pr::{self, Access, LegacyReservation, Nexus, PrError, Recipient, Reservations};
use crate::sanitize;
use crate::sense::{self, status, Sense};

/// Most blocks one READ or WRITE may move (block limits VPD).
pub const TRANSFER_BLOCKS_MAX: u32 = 65_536;
/// Most blocks one WRITE SAME may cover (written in pieces).
pub const WRITE_SAME_BLOCKS_MAX: u64 = 1 << 20;
/// Most blocks one COMPARE AND WRITE may cover.
pub const COMPARE_AND_WRITE_BLOCKS_MAX: u8 = 32;
pub const UNMAP_BLOCKS_MAX: u32 = 1 << 20;
pub const UNMAP_DESCRIPTORS_MAX: u32 = 256;
/// Blocks one WRITE ATOMIC may write (128 KiB of 512-byte blocks).
pub const ATOMIC_BLOCKS_MAX: u32 = 256;
/// The optimal transfer length the Block Limits page offers (rounded
/// down to whole stripes).
const OPTIMAL_TRANSFER_BLOCKS: u32 = 2048;
/// Provisioning queries one GET LBA STATUS makes at most.
const LBA_STATUS_QUERIES_MAX: usize = 4096;
/// Blocks an EXTENDED COPY reads and writes at a time.
const COPY_PIECE_BLOCKS: u32 = 2048;
const VENDOR: &[u8; 8] = b"TESSERA ";
const PRODUCT: &[u8; 16] = b"VOLUME          ";
const REVISION: &[u8; 4] = b"0001";

#[derive(Clone, Debug, thiserror::Error)]
pub enum IoError {
    /// The storage failed this request for good.
    #[error("medium error: {0}")]
    Medium(String),
    /// The storage cannot serve the request now (healing, moving); the
    /// initiator should retry.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The storage had no room for the blocks a write needed; nothing was
    /// written.
    #[error("out of space: {0}")]
    NoSpace(String),
    /// The storage cannot serve the request now, and may in a moment (no
    /// host serves its data yet); nothing was carried out that the same
    /// request again could not repeat. A unit made with a hold
    /// ([`LogicalUnit::with_io_hold`]) tries the command again; otherwise,
    /// or once the hold is over, as [`IoError::Unavailable`].
    #[error("unavailable for now: {0}")]
    Later(String),
}

pub type IoResult<T> = Result<T, IoError>;

/// The storage under a logical unit, in logical blocks.
pub trait BlockDevice: Send + Sync + 'static {
    fn block_size(&self) -> u32;
    /// The capacity now (a volume may grow).
    fn blocks(&self) -> u64;
    fn read(&self, lba: u64, count: u32) -> BoxFuture<'_, IoResult<Bytes>>;
    /// `data` is a whole number of blocks.
    fn write(&self, lba: u64, data: Bytes) -> BoxFuture<'_, IoResult<()>>;
    /// Deallocates; the blocks then read as zeros.
    fn unmap(&self, lba: u64, count: u64) -> BoxFuture<'_, IoResult<()>>;
    fn flush(&self) -> BoxFuture<'_, IoResult<()>>;
    /// The device's own block, in logical blocks: a write or unmap that
    /// covers part of one is read-modify-write inside the device, and the
    /// logical unit runs such requests alone.
    fn granularity(&self) -> u32 {
        1
    }
    /// The unit a write should cover whole to cost the device no more
    /// than itself (an erasure-coded volume's stripe), in logical blocks:
    /// the optimal transfer and unmap granularities of the Block Limits
    /// page. At least [`BlockDevice::granularity`].
    fn stripe(&self) -> u32 {
        self.granularity()
    }
    /// Logical blocks per physical block, a power of two: READ
    /// CAPACITY (16)'s LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT.
    fn physical_block(&self) -> u32 {
        1
    }
    /// The most logical blocks one write stores all-or-nothing when it
    /// starts at a multiple of it (a power of two; WRITE ATOMIC offers up
    /// to [`ATOMIC_BLOCKS_MAX`] of it).
    fn atomic_blocks(&self) -> u32 {
        ATOMIC_BLOCKS_MAX
    }
    /// COMPARE AND WRITE's step: writes `new` at `lba` if the blocks there
    /// hold `expected`. The unit holds its own lock alone around the call,
    /// which makes this default atomic for a device only this unit writes;
    /// a device other hosts write too must take the step where all their
    /// writes meet. `Ok(Some(at))`: byte `at` differs, nothing written.
    fn compare_and_write(&self, lba: u64, expected: Bytes, new: Bytes) -> BoxFuture<'_, IoResult<Option<u64>>> {
        Box::pin(async move {
            let count = (expected.len() / self.block_size() as usize) as u32;
            let medium = self.read(lba, count).await?;
            if let Some(at) = first_difference(&medium, &expected) {
                return Ok(Some(at));
            }
            self.write(lba, new).await?;
            Ok(None)
        })
    }
    /// Whether the device encrypts what it stores under keys it can
    /// replace: SANITIZE CRYPTO ERASE is then offered.
    fn encrypted(&self) -> bool {
        false
    }
    /// Replaces every key the device's blocks are encrypted with: each
    /// block written before then reads as noise, others as zeros.
    fn crypto_erase(&self) -> BoxFuture<'_, IoResult<()>> {
        Box::pin(async { Err(IoError::Medium("the device holds no key to erase".into())) })
    }
    /// Whether `lba` is mapped, and how many blocks from it share that state.
    fn provisioning(&self, lba: u64) -> BoxFuture<'_, IoResult<(bool, u64)>> {
        let left = self.blocks().saturating_sub(lba);
        Box::pin(async move { Ok((true, left)) })
    }
}

/// The target port a command came through.
#[derive(Clone, Debug)]
pub struct Port {
    pub target: String,
    pub relative_port: u16,
    pub group: u16,
}

/// One command as the transport delivers it.
pub struct Command<'a> {
    pub cdb: &'a [u8],
    pub data: Bytes,
    /// The I_T nexus: the initiator port and `port`'s relative port.
    pub nexus: &'a Nexus,
    pub port: &'a Port,
    /// The logical unit numbers of the target (REPORT LUNS).
    pub luns: &'a [u64],
    /// The transport's expected data transfer length.
    pub expected_length: u32,
}

#[derive(Debug)]
pub struct Reply {
    pub status: u8,
    pub data: Bytes,
    /// Sense data, already formatted.
    pub sense: Option<Bytes>,
}

impl Reply {
    pub fn good(data: impl Into<Bytes>) -> Reply {
        Reply { status: status::GOOD, data: data.into(), sense: None }
    }

    pub fn status(status: u8) -> Reply {
        Reply { status, data: Bytes::new(), sense: None }
    }

    pub fn check(sense: Sense, descriptor: bool) -> Reply {
        let bytes = if descriptor { sense.descriptor() } else { sense.fixed() };
        Reply { status: status::CHECK_CONDITION, data: Bytes::new(), sense: Some(bytes.into()) }
    }
}

/// Mode parameters a MODE SELECT may change.
#[derive(Clone, Copy, Debug, Default)]
struct Modes {
    descriptor_sense: bool,
    software_write_protect: bool,
}

#[derive(Default)]
struct UnitState {
    /// Persistent reservations, when the unit keeps its own.
    reservations: Reservations,
    legacy: LegacyReservation,
    attentions: HashMap<Nexus, VecDeque<(u8, u8)>>,
    nexuses: HashSet<Nexus>,
    /// The shared reservations last checked against, and the number of
    /// the last notice taken from them.
    shared_seen: Option<(Arc<Reservations>, u64)>,
    /// Commands that reservations govern, under way, by the round they
    /// were admitted in: a reservation change waits for the rounds before
    /// it ([`LogicalUnit::settle_admitted`]).
    round: u64,
    under_way: BTreeMap<u64, usize>,
    modes: Modes,
    blocks_seen: u64,
    /// Results of EXTENDED COPY lists that asked them held, per I_T nexus
    /// and list identifier: (segments, bytes copied).
    copies: HashMap<(Nexus, u8), (u16, u64)>,
}

/// A command admitted past the reservation checks, under way until dropped.
struct Admitted<'a> {
    unit: &'a LogicalUnit,
    round: u64,
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        let mut state = self.unit.state.lock().expect("unit state");
        let Some(count) = state.under_way.get_mut(&self.round) else { return };
        *count -= 1;
        if *count == 0 {
            state.under_way.remove(&self.round);
            drop(state);
            self.unit.settled.notify_waiters();
        }
    }
}

/// The unit attention a logical unit reset leaves (BUS DEVICE RESET
/// FUNCTION OCCURRED).
const RESET: (u8, u8) = (0x29, 0x03);
/// How long a reservation change waits for the commands admitted before it.
pub const SETTLE_LIMIT: std::time::Duration = std::time::Duration::from_millis(1500);
/// How long a logical unit reset waits for the other hosts serving the
/// unit to take its unit attention.
const RESET_NOTICE_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

impl UnitState {
    /// Queues a unit attention for each nexus of this unit `to` includes.
    fn tell(&mut self, to: &Recipient, asc: u8, ascq: u8) {
        for nexus in &self.nexuses {
            if to.includes(nexus) {
                self.attentions.entry(nexus.clone()).or_default().push_back((asc, ascq));
            }
        }
    }

    fn tell_all(&mut self, asc: u8, ascq: u8) {
        for nexus in &self.nexuses {
            self.attentions.entry(nexus.clone()).or_default().push_back((asc, ascq));
        }
    }

    /// A logical unit reset: RESERVE(6) ends and every nexus is told.
    fn reset(&mut self) {
        self.legacy.reset(None);
        self.tell_all(RESET.0, RESET.1);
    }

    /// Tells this unit's nexuses the notices posted with the shared
    /// reservations since it last looked (a reset posted by another host
    /// also ends this host's RESERVE(6)). When older ones than it saw have
    /// been dropped meanwhile, every nexus hears that reservations changed.
    fn take_notices(&mut self, shared: &Arc<Reservations>) {
        let last = match &self.shared_seen {
            Some((seen, _)) if Arc::ptr_eq(seen, shared) => return,
            Some((_, last)) => *last,
            None => shared.notices_posted,
        };
        self.shared_seen = Some((shared.clone(), shared.notices_posted.max(last)));
        if shared.notices.first().is_some_and(|oldest| oldest.number > last + 1) {
            self.tell_all(0x2a, 0x03);
        }
        for notice in shared.notices.iter().filter(|notice| notice.number > last) {
            if (notice.asc, notice.ascq) == RESET {
                self.legacy.reset(None);
            }
            self.tell(&notice.to, notice.asc, notice.ascq);
        }
    }
}

/// A logical unit: a block device with its identity, reservations, unit
/// attentions and mode pages.
pub struct LogicalUnit {
    device: Arc<dyn BlockDevice>,
    serial: String,
    naa: [u8; 16],
    state: Mutex<UnitState>,
    /// Woken when the last command of an admission round finishes.
    settled: tokio::sync::Notify,
    /// COMPARE AND WRITE and SANITIZE hold it exclusively; writes share it.
    atomic: Arc<tokio::sync::RwLock<()>>,
    /// Shared with a sanitize running in the background.
    sanitize: Arc<Mutex<sanitize::State>>,
    /// How fast a sanitize may overwrite the unit; unpaced when `None`.
    sanitize_rate: Option<std::num::NonZeroU64>,
    /// Reservations shared with the other hosts serving the unit (the
    /// unit's own `state.reservations` are unused then).
    reservation_store: Option<Arc<dyn pr::ReservationStore>>,
    /// How long a command the storage cannot serve yet is tried again
    /// (`with_io_hold`); zero: not at all.
    hold: std::time::Duration,
}

type Outcome = Result<Reply, Sense>;

/// The first and the longest pause between tries of a held command.
const HOLD_PAUSE_FIRST: std::time::Duration = std::time::Duration::from_millis(50);
const HOLD_PAUSE_MAX: std::time::Duration = std::time::Duration::from_millis(500);

/// Whether the command's task was aborted (or its connection is gone).
fn stopped(aborted: &Option<tokio::sync::watch::Receiver<bool>>) -> bool {
    aborted.as_ref().is_some_and(|aborted| *aborted.borrow())
}

/// Commands that may be tried again whole when the storage could not serve
/// them yet: doing one twice is doing it once. Not COMPARE AND WRITE (a
/// first try may have written, and the second would compare against its
/// own data), EXTENDED COPY, SANITIZE or the reservation commands.
fn repeatable(opcode: u8) -> bool {
    matches!(
        opcode,
        0x08 | 0x28 | 0xa8 | 0x88 // READ
            | 0x0a | 0x2a | 0xaa | 0x8a // WRITE
            | 0x2e | 0x8e | 0xae | 0x2f | 0x8f | 0xaf // WRITE AND VERIFY, VERIFY
            | 0x41 | 0x93 // WRITE SAME
            | 0x42 // UNMAP
            | 0x35 | 0x91 // SYNCHRONIZE CACHE
            | 0x9e // GET LBA STATUS
    )
}

enum Guard<'a> {
    Shared(#[allow(dead_code)] tokio::sync::RwLockReadGuard<'a, ()>),
    Exclusive(#[allow(dead_code)] tokio::sync::RwLockWriteGuard<'a, ()>),
}

pub(crate) fn be16(bytes: &[u8]) -> u16 {
    u16::from_be_bytes([bytes[0], bytes[1]])
}

pub(crate) fn be32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes(bytes[..4].try_into().expect("4 bytes"))
}

pub(crate) fn be64(bytes: &[u8]) -> u64 {
    u64::from_be_bytes(bytes[..8].try_into().expect("8 bytes"))
}

/// Commands this unit runs: (opcode, service action, CDB length).
const COMMANDS: &[(u8, Option<u8>, usize)] = &[
    (0x00, None, 6),
    (0x03, None, 6),
    (0x08, None, 6),
    (0x0a, None, 6),
    (0x12, None, 6),
    (0x15, None, 6),
    (0x16, None, 6),
    (0x17, None, 6),
    (0x1a, None, 6),
    (0x25, None, 10),
    (0x28, None, 10),
    (0x2a, None, 10),
    (0x2e, None, 10),
    (0x2f, None, 10),
    (0x34, None, 10),
    (0x35, None, 10),
    (0x37, None, 10),
    (0x41, None, 10),
    (0x42, None, 10),
    (sanitize::OPCODE, Some(sanitize::OVERWRITE), 10),
    (sanitize::OPCODE, Some(sanitize::BLOCK_ERASE), 10),
    // Offered only by a device that encrypts (`commands`).
    (sanitize::OPCODE, Some(sanitize::CRYPTO_ERASE), 10),
    (sanitize::OPCODE, Some(sanitize::EXIT_FAILURE_MODE), 10),
    (0x55, None, 10),
    (0x5a, None, 10),
    (0x5e, Some(0), 10),
    (0x5e, Some(1), 10),
    (0x5e, Some(2), 10),
    (0x5e, Some(3), 10),
    (0x5f, Some(0), 10),
    (0x5f, Some(1), 10),
    (0x5f, Some(2), 10),
    (0x5f, Some(3), 10),
    (0x5f, Some(4), 10),
    (0x5f, Some(5), 10),
    (0x5f, Some(6), 10),
    (0x5f, Some(7), 10),
    (0x83, Some(0), 16),
    (0x84, Some(0), 16),
    (0x84, Some(3), 16),
    (0x88, None, 16),
    (0x89, None, 16),
    (0x8a, None, 16),
    (0x8b, None, 16),
    (0x8e, None, 16),
    (0x8f, None, 16),
    (0x90, None, 16),
    (0x91, None, 16),
    (0x93, None, 16),
    (0x9c, None, 16),
    (0x9e, Some(0x10), 16),
    (0x9e, Some(0x12), 16),
    (0xa0, None, 12),
    (0xa3, Some(0x0a), 12),
    (0xa3, Some(0x0c), 12),
    (0xa8, None, 12),
    (0xaa, None, 12),
    (0xae, None, 12),
    (0xaf, None, 12),
    (0xb7, None, 12),
];

/// The CDB length of a command by its group code.
pub fn cdb_length(opcode: u8) -> usize {
    match opcode >> 5 {
        0 => 6,
        1 | 2 => 10,
        4 => 16,
        5 => 12,
        _ => 16,
    }
}

/// The data-out bytes a command's CDB asks for, when it asks for any.
pub fn data_out_bytes(cdb: &[u8], block_size: u32) -> Option<usize> {
    let opcode = *cdb.first()?;
    if cdb.len() < cdb_length(opcode) {
        return None;
    }
    let block = block_size as usize;
    let blocks = |cdb: &[u8]| lba_and_length(cdb).1 as usize;
    Some(match opcode {
        0x0a | 0x2a | 0xaa | 0x8a | 0x2e | 0xae | 0x8e | 0x8b | 0x9c => blocks(cdb) * block,
        0x2f | 0xaf | 0x8f => match (cdb[1] >> 1) & 3 {
            0 => 0,
            1 => blocks(cdb) * block,
            _ => block,
        },
        0x41 => block,
        0x93 => {
            if cdb[1] & 0x01 != 0 {
                0
            } else {
                block
            }
        }
        0x89 => 2 * usize::from(cdb[13]) * block,
        0x42 | 0x55 | 0x48 => usize::from(be16(&cdb[7..])),
        0x15 => usize::from(cdb[4]),
        0x5f => be32(&cdb[5..]) as usize,
        0x83 => be32(&cdb[10..]) as usize,
        _ => return None,
    })
}

/// How a command reaches the medium, for reservation checks.
fn access(opcode: u8) -> Access {
    match opcode {
        // PR OUT checks keys itself; READ DEFECT DATA has no medium access.
        0x00 | 0x03 | 0x12 | 0x25 | 0x5e | 0x5f | 0xa0 | 0xa3 | 0x9e | 0x1a | 0x5a | 0x35 | 0x91 | 0x37 | 0xb7 => {
            Access::Always
        }
        0x08 | 0x28 | 0xa8 | 0x88 | 0x2f | 0xaf | 0x8f | 0x34 | 0x90 => Access::Read,
        0x84 => Access::Always,
        0x0a | 0x2a | 0xaa | 0x8a | 0x2e | 0xae | 0x8e | 0x41 | 0x93 | 0x42 | 0x89 | 0x8b | 0x9c | 0x83 | 0x48 => {
            Access::Write
        }
        _ => Access::Other,
    }
}

/// A read or write: (LBA, blocks, protection field) from its CDB.
fn lba_and_length(cdb: &[u8]) -> (u64, u32, u8) {
    match cdb[0] {
        0x08 | 0x0a => {
            let lba = (u32::from(cdb[1] & 0x1f) << 16 | u32::from(cdb[2]) << 8 | u32::from(cdb[3])) as u64;
            let count = if cdb[4] == 0 { 256 } else { u32::from(cdb[4]) };
            (lba, count, 0)
        }
        0x28 | 0x2a | 0x2e | 0x2f | 0x34 | 0x35 | 0x41 => {
            (u64::from(be32(&cdb[2..])), u32::from(be16(&cdb[7..])), cdb[1] >> 5)
        }
        0xa8 | 0xaa | 0xae | 0xaf => (u64::from(be32(&cdb[2..])), be32(&cdb[6..]), cdb[1] >> 5),
        // WRITE ATOMIC(16): a 16-bit transfer length after the boundary.
        0x9c => (be64(&cdb[2..]), u32::from(be16(&cdb[12..])), cdb[1] >> 5),
        _ => (be64(&cdb[2..]), be32(&cdb[10..]), cdb[1] >> 5),
    }
}

impl LogicalUnit {
    /// `id` seeds the unit's NAA identifier; `serial` is its unit serial.
    pub fn new(device: Arc<dyn BlockDevice>, id: u64, serial: impl Into<String>) -> LogicalUnit {
        // NAA 6 (IEEE registered extended) with a locally administered OUI.
        let mut naa = [0u8; 16];
        naa[0] = 0x60 | 0x0a;
        naa[1] = 0x50;
        naa[2] = 0x54;
        naa[3] = 0x50;
        naa[8..16].copy_from_slice(&id.to_be_bytes());
        let blocks = device.blocks();
        LogicalUnit {
            device,
            serial: serial.into(),
            naa,
            state: Mutex::new(UnitState { blocks_seen: blocks, ..UnitState::default() }),
            atomic: Arc::new(tokio::sync::RwLock::new(())),
            sanitize: Arc::default(),
            sanitize_rate: None,
            reservation_store: None,
            settled: tokio::sync::Notify::new(),
            hold: std::time::Duration::ZERO,
        }
    }

    /// Paces a SANITIZE OVERWRITE to at most `bytes_per_second` (`None`:
    /// as fast as the device takes it).
    pub fn with_sanitize_rate(mut self, bytes_per_second: Option<std::num::NonZeroU64>) -> LogicalUnit {
        self.sanitize_rate = bytes_per_second;
        self
    }

    /// Keeps the unit's persistent reservations in `store`, shared with
    /// every other host serving the unit. RESERVE(6) stays with this host's
    /// unit (it ends with its nexus, at once).
    pub fn with_reservation_store(mut self, store: Arc<dyn pr::ReservationStore>) -> LogicalUnit {
        // The notices posted before the unit was made are for sessions it
        // never had.
        let shared = store.load();
        let posted = shared.notices_posted;
        self.state.get_mut().expect("unit state").shared_seen = Some((shared, posted));
        self.reservation_store = Some(store);
        self
    }

    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.device
    }

    pub fn serial(&self) -> &str {
        &self.serial
    }

    fn block_size(&self) -> u32 {
        self.device.block_size()
    }

    fn descriptor_sense(&self) -> bool {
        self.state.lock().expect("unit state").modes.descriptor_sense
    }

    /// The reservations, for PR IN and for tests.
    pub fn reservations(&self) -> Reservations {
        match &self.reservation_store {
            Some(store) => (*store.load()).clone(),
            None => self.state.lock().expect("unit state").reservations.clone(),
        }
    }

    /// A logical unit reset through relative target port `port`:
    /// RESERVE(6) ends and every nexus gets a unit attention, on every host
    /// serving the unit when it shares its reservations (answered once
    /// they have it).
    pub async fn reset(&self, port: u16) {
        self.state.lock().expect("unit state").reset();
        if let Some(store) = &self.reservation_store {
            let post = |reservations: &mut Reservations| {
                reservations.post(vec![(Recipient::AllBut { port }, RESET.0, RESET.1)]);
                Ok(Vec::new())
            };
            // Bounded: a host that does not confirm is waited for no
            // longer than a reset may take (a unit attention it misses
            // matters less than a reset answered late).
            match tokio::time::timeout(RESET_NOTICE_WAIT, store.update(&post)).await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => tracing::warn!(%error, "a logical unit reset could not reach the other hosts"),
                Err(_) => tracing::warn!("a logical unit reset was not confirmed by every host in time"),
            }
        }
    }

    /// Waits until every command that reservations govern admitted before
    /// now has finished, at most `limit` (false if some had not): after a
    /// reservation change, so that no command it forbids, admitted before
    /// it, lands after it is answered (a write of a nexus PREEMPT removed,
    /// say).
    pub async fn settle_admitted(&self, limit: std::time::Duration) -> bool {
        let before = {
            let mut state = self.state.lock().expect("unit state");
            state.round += 1;
            state.round
        };
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let settled = self.settled.notified();
            tokio::pin!(settled);
            settled.as_mut().enable();
            if self.state.lock().expect("unit state").under_way.range(..before).next().is_none() {
                return true;
            }
            if tokio::time::timeout_at(deadline, settled).await.is_err() {
                return false;
            }
        }
    }

    /// The nexus is gone (its session ended): it no longer holds RESERVE(6),
    /// and its copy results and pending reset attentions go with it.
    pub fn nexus_lost(&self, nexus: &Nexus) {
        let mut state = self.state.lock().expect("unit state");
        state.legacy.reset(Some(nexus));
        state.copies.retain(|(holder, _), _| holder != nexus);
        // Resets the nexus saw before it went are news to no one now (a new
        // session starts afresh); reservation and capacity news stays.
        if let Some(queue) = state.attentions.get_mut(nexus) {
            queue.retain(|(asc, _)| *asc != 0x29);
        }
    }

    /// Holds a command the storage cannot serve yet ([`IoError::Later`]:
    /// no host serves its data right now, as while another host takes
    /// over from one that died) and tries it again, whole, for up to `hold`
    /// from its first try, instead of answering NOT READY at once (QEMU's
    /// initiator fails the guest's I/O on that). Each try is admitted anew
    /// (unit attentions, reservations) and holds no lock while it waits.
    /// Only commands done twice as once are held (see `repeatable`).
    pub fn with_io_hold(mut self, hold: std::time::Duration) -> LogicalUnit {
        self.hold = hold;
        self
    }

    pub async fn execute(&self, command: Command<'_>) -> Reply {
        self.execute_unless_aborted(command, None).await
    }

    /// As [`LogicalUnit::execute`]; a command held for the storage stops
    /// waiting once `aborted` is true (its task was aborted, or its
    /// connection is gone), so no try of it starts after that.
    pub async fn execute_unless_aborted(
        &self,
        command: Command<'_>,
        mut aborted: Option<tokio::sync::watch::Receiver<bool>>,
    ) -> Reply {
        let descriptor = self.descriptor_sense();
        let hold = if command.cdb.first().copied().is_some_and(repeatable) { self.hold } else { Default::default() };
        let started = tokio::time::Instant::now();
        let mut pause = HOLD_PAUSE_FIRST;
        let mut held = false;
        loop {
            let again = Command { data: command.data.clone(), ..command };
            let sense = match self.run(again).await {
                Ok(reply) => return reply,
                Err(sense) => sense,
            };
            if !sense.later || stopped(&aborted) {
                return Reply::check(sense, descriptor);
            }
            if started.elapsed() + pause > hold {
                if held {
                    metrics::counter!("iscsi_io_hold_expired_total").increment(1);
                    tracing::warn!(waited = ?started.elapsed(), "the storage could not serve a held command in time");
                }
                return Reply::check(sense, descriptor);
            }
            if !held {
                held = true;
                metrics::counter!("iscsi_io_held_total").increment(1);
                tracing::debug!(opcode = command.cdb[0], "the storage cannot serve the command yet: holding it");
            }
            match aborted.as_mut() {
                Some(aborted) => {
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = aborted.wait_for(|aborted| *aborted) => {}
                    }
                }
                None => tokio::time::sleep(pause).await,
            }
            // Aborted while it waited: no other try starts.
            if stopped(&aborted) {
                return Reply::check(sense, descriptor);
            }
            pause = (pause * 2).min(HOLD_PAUSE_MAX);
        }
    }

    async fn run(&self, command: Command<'_>) -> Outcome {
        let cdb = command.cdb;
        let Some(&opcode) = cdb.first() else { return Err(Sense::invalid_opcode()) };
        if cdb.len() < cdb_length(opcode) {
            return Err(Sense::invalid_opcode());
        }
        // Unit attentions and reservations.
        let mut admitted = None;
        {
            let mut state = self.state.lock().expect("unit state");
            let blocks = self.device.blocks();
            if blocks != state.blocks_seen {
                state.blocks_seen = blocks;
                state.tell_all(0x2a, 0x09);
            }
            if !state.nexuses.contains(command.nexus) {
                state.nexuses.insert(command.nexus.clone());
            }
            let shared = self.reservation_store.as_ref().map(|store| store.load());
            if let Some(shared) = &shared {
                state.take_notices(shared);
            }
            if !matches!(opcode, 0x12 | 0x03 | 0xa0) {
                if let Some((asc, ascq)) = state.attentions.get_mut(command.nexus).and_then(|queue| queue.pop_front()) {
                    return Err(Sense::new(sense::key::UNIT_ATTENTION, asc, ascq));
                }
                let sanitize = self.sanitize.lock().expect("sanitize state");
                if let Some(progress) = &sanitize.running {
                    return Err(Sense::sanitizing(progress.fraction()));
                }
                let medium = matches!(access(opcode), Access::Read | Access::Write);
                if sanitize.failed.is_some() && medium && opcode != sanitize::OPCODE {
                    return Err(Sense::sanitize_failed());
                }
            }
            // A host that cannot vouch for its copy of the shared
            // reservations serves nothing they govern (an initiator retries,
            // or goes another path).
            let governed = access(opcode) != Access::Always || opcode == 0x5e;
            let in_use = shared.as_ref().is_some_and(|shared| shared.in_use());
            if governed && in_use && self.reservation_store.as_ref().is_some_and(|store| !store.current()) {
                return Err(Sense::in_transition());
            }
            let reservations = shared.as_deref().unwrap_or(&state.reservations);
            let legacy_conflict = state.legacy.conflicts(command.nexus)
                && !matches!(opcode, 0x12 | 0xa0 | 0x03 | 0x16 | 0x17 | 0xa3 | 0x5e);
            let reserve_family = matches!(opcode, 0x16 | 0x17);
            if legacy_conflict || !reserve_family && !reservations.allows(command.nexus, access(opcode)) {
                return Ok(Reply::status(status::RESERVATION_CONFLICT));
            }
            if access(opcode) != Access::Always {
                let round = state.round;
                *state.under_way.entry(round).or_default() += 1;
                admitted = Some(Admitted { unit: self, round });
            }
        }
        let _admitted = admitted;
        match opcode {
            0x00 => Ok(Reply::good(Bytes::new())),
            0x03 => self.request_sense(&command),
            0x12 => self.inquiry(&command),
            0x25 => self.read_capacity10(cdb),
            0x9e => match cdb[1] & 0x1f {
                0x10 => self.read_capacity16(cdb),
                0x12 => self.lba_status(cdb).await,
                _ => Err(Sense::invalid_cdb(1, Some(4))),
            },
            0x08 | 0x28 | 0xa8 | 0x88 => self.read(cdb).await,
            0x0a | 0x2a | 0xaa | 0x8a | 0x2e | 0xae | 0x8e => self.write(cdb, command.data).await,
            0x2f | 0xaf | 0x8f => self.verify(cdb, command.data).await,
            0x34 | 0x90 => self.prefetch(cdb),
            0x35 | 0x91 => self.synchronize(cdb).await,
            0x41 | 0x93 => self.write_same(cdb, command.data, command.expected_length).await,
            0x8b => self.or_write(cdb, command.data).await,
            0x9c => self.write_atomic(cdb, command.data).await,
            0x83 => match cdb[1] & 0x1f {
                0x00 => self.extended_copy(cdb, command.data, command.nexus).await,
                _ => Err(Sense::invalid_cdb(1, Some(4))),
            },
            0x84 => self.receive_copy_results(cdb, command.nexus),
            0x42 => self.unmap(cdb, command.data).await,
            sanitize::OPCODE => self.sanitize(cdb, command.data).await,
            0x89 => self.compare_and_write(cdb, command.data, command.expected_length).await,
            0x1a | 0x5a => self.mode_sense(cdb),
            0x15 | 0x55 => self.mode_select(cdb, &command.data),
            0xa0 => report_luns(cdb, command.luns),
            0xa3 => match cdb[1] & 0x1f {
                0x0a => self.report_port_groups(cdb, command.port),
                0x0c => report_opcodes(cdb, self.device.encrypted()),
                _ => Err(Sense::invalid_cdb(1, Some(4))),
            },
            0x16 => self.legacy_reservation(command.nexus, true),
            0x17 => self.legacy_reservation(command.nexus, false),
            0x5e => self.persistent_reserve_in(cdb),
            0x5f => self.persistent_reserve_out(cdb, &command).await,
            0x37 | 0xb7 => read_defect_data(cdb),
            _ => Err(Sense::invalid_opcode()),
        }
    }

    fn request_sense(&self, command: &Command<'_>) -> Outcome {
        let descriptor = command.cdb[1] & 0x01 != 0;
        let allocation = usize::from(command.cdb[4]);
        let pending = {
            let mut state = self.state.lock().expect("unit state");
            state.attentions.get_mut(command.nexus).and_then(|queue| queue.pop_front())
        };
        let sanitizing =
            self.sanitize.lock().expect("sanitize state").running.as_ref().map(|progress| progress.fraction());
        let sense = match (pending, sanitizing) {
            (Some((asc, ascq)), _) => Sense::new(sense::key::UNIT_ATTENTION, asc, ascq),
            (None, Some(progress)) => Sense::sanitizing(progress),
            (None, None) => Sense::new(sense::key::NO_SENSE, 0, 0),
        };
        let mut data = if descriptor { sense.descriptor() } else { sense.fixed() };
        data.truncate(allocation);
        Ok(Reply::good(data))
    }

    fn check_range(&self, lba: u64, count: u64) -> Result<(), Sense> {
        let end = lba.checked_add(count).ok_or_else(Sense::lba_out_of_range)?;
        if end > self.device.blocks() || (count == 0 && lba > self.device.blocks()) {
            return Err(Sense::lba_out_of_range());
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<(), Sense> {
        if self.state.lock().expect("unit state").modes.software_write_protect {
            return Err(Sense::new(sense::key::DATA_PROTECT, 0x27, 0x02));
        }
        Ok(())
    }

    async fn read(&self, cdb: &[u8]) -> Outcome {
        let (lba, count, protect) = lba_and_length(cdb);
        if protect != 0 {
            return Err(Sense::invalid_cdb(1, Some(7)));
        }
        self.check_range(lba, u64::from(count))?;
        if count > TRANSFER_BLOCKS_MAX {
            return Err(Sense::invalid_cdb(if cdb[0] == 0x88 { 10 } else { 7 }, None));
        }
        if count == 0 {
            return Ok(Reply::good(Bytes::new()));
        }
        let data = self.device.read(lba, count).await.map_err(|error| io_sense(error, false))?;
        Ok(Reply::good(data))
    }

    /// The data-out buffer must carry exactly what the CDB asks for.
    fn take_data(data: Bytes, wanted: usize) -> Result<Bytes, Sense> {
        if data.len() < wanted {
            // The initiator sent less than the command needs.
            return Err(Sense::new(sense::key::ILLEGAL_REQUEST, 0x24, 0x00));
        }
        Ok(data.slice(..wanted))
    }

    /// A write's CDB checked in the order the initiators expect: no
    /// protection field, writable, in range, not too long.
    fn write_command(&self, cdb: &[u8]) -> Result<(u64, u32), Sense> {
        let (lba, count, protect) = lba_and_length(cdb);
        if protect != 0 {
            return Err(Sense::invalid_cdb(1, Some(7)));
        }
        self.check_writable()?;
        self.check_range(lba, u64::from(count))?;
        if count > TRANSFER_BLOCKS_MAX {
            let length_field = match cdb[0] {
                0x0a => 4,
                0xaa | 0xae => 6,
                0x2a | 0x2e => 7,
                _ => 10,
            };
            return Err(Sense::invalid_cdb(length_field, None));
        }
        Ok((lba, count))
    }

    async fn write(&self, cdb: &[u8], data: Bytes) -> Outcome {
        let (lba, count) = self.write_command(cdb)?;
        if count == 0 {
            return Ok(Reply::good(Bytes::new()));
        }
        // The transport moved min(expected length, what the CDB asks);
        // a shorter transfer writes only the whole blocks it carried.
        let block = self.block_size() as usize;
        let wanted = count as usize * block;
        let data = data.slice(..data.len().min(wanted));
        if !data.len().is_multiple_of(block) {
            return Err(Sense::new(sense::key::ILLEGAL_REQUEST, 0x0e, 0x03));
        }
        if data.is_empty() {
            return Ok(Reply::good(Bytes::new()));
        }
        let blocks = (data.len() / block) as u64;
        let _guard = self.lock_for(lba, blocks).await;
        self.device.write(lba, data).await.map_err(|error| io_sense(error, true))?;
        Ok(Reply::good(Bytes::new()))
    }

    /// Shared for requests that cover whole device blocks; exclusive for
    /// the read-modify-writes the others need.
    async fn lock_for(&self, lba: u64, blocks: u64) -> Guard<'_> {
        let granularity = u64::from(self.device.granularity().max(1));
        if lba.is_multiple_of(granularity) && blocks.is_multiple_of(granularity) {
            Guard::Shared(self.atomic.read().await)
        } else {
            Guard::Exclusive(self.atomic.write().await)
        }
    }

    async fn verify(&self, cdb: &[u8], data: Bytes) -> Outcome {
        let (lba, count, protect) = lba_and_length(cdb);
        if protect != 0 {
            return Err(Sense::invalid_cdb(1, Some(7)));
        }
        let byte_check = (cdb[1] >> 1) & 0x03;
        self.check_range(lba, u64::from(count))?;
        if count > TRANSFER_BLOCKS_MAX {
            return Err(Sense::invalid_cdb(7, None));
        }
        if count == 0 {
            return Ok(Reply::good(Bytes::new()));
        }
        let medium = self.device.read(lba, count).await.map_err(|error| io_sense(error, false))?;
        let block = self.block_size() as usize;
        match byte_check {
            0 => Ok(Reply::good(Bytes::new())),
            1 => {
                let expected = Self::take_data(data, count as usize * block)?;
                compare(&medium, &expected).map(|()| Reply::good(Bytes::new()))
            }
            3 => {
                let one = Self::take_data(data, block)?;
                for (index, chunk) in medium.chunks(block).enumerate() {
                    if let Some(at) = chunk.iter().zip(one.iter()).position(|(a, b)| a != b) {
                        return Err(Sense::miscompare((index * block + at) as u64));
                    }
                }
                Ok(Reply::good(Bytes::new()))
            }
            _ => Err(Sense::invalid_cdb(1, Some(1))),
        }
    }

    fn prefetch(&self, cdb: &[u8]) -> Outcome {
        let (lba, count) = if cdb[0] == 0x34 {
            (u64::from(be32(&cdb[2..])), u64::from(be16(&cdb[7..])))
        } else {
            (be64(&cdb[2..]), u64::from(be32(&cdb[10..])))
        };
        self.check_range(lba, count)?;
        Ok(Reply::good(Bytes::new()))
    }

    async fn synchronize(&self, cdb: &[u8]) -> Outcome {
        let (lba, count) = if cdb[0] == 0x35 {
            (u64::from(be32(&cdb[2..])), u64::from(be16(&cdb[7..])))
        } else {
            (be64(&cdb[2..]), u64::from(be32(&cdb[10..])))
        };
        self.check_range(lba, count)?;
        self.device.flush().await.map_err(|error| io_sense(error, true))?;
        Ok(Reply::good(Bytes::new()))
    }

    async fn write_same(&self, cdb: &[u8], data: Bytes, expected: u32) -> Outcome {
        let sixteen = cdb[0] == 0x93;
        let (lba, count) = if sixteen {
            (be64(&cdb[2..]), u64::from(be32(&cdb[10..])))
        } else {
            (u64::from(be32(&cdb[2..])), u64::from(be16(&cdb[7..])))
        };
        if cdb[1] >> 5 != 0 {
            return Err(Sense::invalid_cdb(1, Some(7)));
        }
        let unmap = cdb[1] & 0x08 != 0;
        let anchor = cdb[1] & 0x10 != 0;
        let no_data = sixteen && cdb[1] & 0x01 != 0;
        if anchor {
            return Err(Sense::invalid_cdb(1, Some(4)));
        }
        // One block of data-out, no more and no less (none with NDOB).
        if !no_data && expected != self.block_size() {
            return Err(Sense::invalid_cdb(if sixteen { 10 } else { 7 }, None));
        }
        let count = if count == 0 {
            // To the end of the medium (WSNZ is clear).
            let blocks = self.device.blocks();
            if lba > blocks {
                return Err(Sense::lba_out_of_range());
            }
            blocks - lba
        } else {
            count
        };
        if count > WRITE_SAME_BLOCKS_MAX {
            return Err(Sense::invalid_cdb(if sixteen { 10 } else { 7 }, None));
        }
        self.check_writable()?;
        self.check_range(lba, count)?;
        let block = self.block_size() as usize;
        let pattern = if no_data { Bytes::from(vec![0u8; block]) } else { Self::take_data(data, block)? };
        let _guard = self.lock_for(lba, count).await;
        // With UNMAP the range is deallocated whatever the block holds (it
        // then reads as zeros, LBPRZ), as other targets and initiators expect.
        if unmap {
            self.device.unmap(lba, count).await.map_err(|error| io_sense(error, true))?;
            return Ok(Reply::good(Bytes::new()));
        }
        let piece_blocks = u64::from(TRANSFER_BLOCKS_MAX).min(count);
        let mut piece = BytesMut::with_capacity(piece_blocks as usize * block);
        for _ in 0..piece_blocks {
            piece.extend_from_slice(&pattern);
        }
        let piece = piece.freeze();
        let mut done = 0;
        while done < count {
            let blocks = piece_blocks.min(count - done);
            let data = piece.slice(..blocks as usize * block);
            self.device.write(lba + done, data).await.map_err(|error| io_sense(error, true))?;
            done += blocks;
        }
        Ok(Reply::good(Bytes::new()))
    }

    /// SANITIZE: starts the operation in the background and, unless
    /// IMMED, waits for it. The unit refuses other commands meanwhile.
    async fn sanitize(&self, cdb: &[u8], data: Bytes) -> Outcome {
        let request = sanitize::Request::parse(cdb)?;
        if request.service_action == sanitize::CRYPTO_ERASE && !self.device.encrypted() {
            // Not offered: the SERVICE ACTION field, before anything else.
            return Err(Sense::invalid_cdb(1, Some(4)));
        }
        self.check_writable()?;
        let operation = request.operation(&data, self.block_size())?;
        {
            let mut state = self.sanitize.lock().expect("sanitize state");
            // A failed sanitize that did not allow an unrestricted exit ends
            // only with a sanitize that succeeds and does not allow one.
            if state.failed == Some(false)
                && (operation == sanitize::Operation::ExitFailureMode || request.unrestricted_exit)
            {
                return Err(Sense::invalid_cdb(1, Some(5)));
            }
            if operation == sanitize::Operation::ExitFailureMode {
                state.failed = None;
                return Ok(Reply::good(Bytes::new()));
            }
        }
        let blocks = self.device.blocks();
        let progress = Arc::new(sanitize::Progress::new(sanitize::total_blocks(&operation, blocks)));
        {
            let mut state = self.sanitize.lock().expect("sanitize state");
            if let Some(running) = &state.running {
                return Err(Sense::sanitizing(running.fraction()));
            }
            state.running = Some(progress.clone());
        }
        tracing::info!(serial = %self.serial, service_action = request.service_action, blocks, "sanitize started");
        let (device, shared, lock, serial, rate) =
            (self.device.clone(), self.sanitize.clone(), self.atomic.clone(), self.serial.clone(), self.sanitize_rate);
        let (finished, outcome) = tokio::sync::oneshot::channel();
        // Not tied to this command: an abort, a reset or a lost nexus leaves
        // the sanitize running.
        tokio::spawn(async move {
            let exclusive = lock.write_owned().await;
            // The unit may have grown while the writes before finished.
            let blocks = device.blocks();
            progress.set_total(sanitize::total_blocks(&operation, blocks));
            let result = sanitize::run(device, operation, blocks, rate, &progress).await;
            drop(exclusive);
            let mut state = shared.lock().expect("sanitize state");
            state.running = None;
            state.failed = result.is_err().then_some(request.unrestricted_exit);
            match &result {
                Ok(()) => tracing::info!(serial = %serial, "sanitize complete"),
                Err(error) => tracing::error!(serial = %serial, %error, "sanitize failed; the unit is in failure mode"),
            }
            drop(state);
            let _ = finished.send(result.is_ok());
        });
        if request.immediate {
            return Ok(Reply::good(Bytes::new()));
        }
        match outcome.await {
            Ok(true) => Ok(Reply::good(Bytes::new())),
            _ => Err(Sense::sanitize_failed()),
        }
    }

    async fn unmap(&self, cdb: &[u8], data: Bytes) -> Outcome {
        if cdb[1] & 0x01 != 0 {
            // ANCHOR
            return Err(Sense::invalid_cdb(1, Some(0)));
        }
        let length = usize::from(be16(&cdb[7..]));
        if length == 0 {
            return Ok(Reply::good(Bytes::new()));
        }
        if length < 8 || data.len() < 8 {
            return Err(Sense::parameter_list_length());
        }
        let data = data.slice(..length.min(data.len()));
        let descriptors_length = usize::from(be16(&data[2..]));
        if descriptors_length % 16 != 0 || data.len() < 8 + descriptors_length {
            return Err(Sense::parameter_list_length());
        }
        let count = descriptors_length / 16;
        if count as u32 > UNMAP_DESCRIPTORS_MAX {
            return Err(Sense::invalid_parameter(2));
        }
        let mut ranges = Vec::with_capacity(count);
        for index in 0..count {
            let descriptor = &data[8 + index * 16..8 + (index + 1) * 16];
            let (lba, blocks) = (be64(descriptor), u64::from(be32(&descriptor[8..])));
            if blocks > u64::from(UNMAP_BLOCKS_MAX) {
                return Err(Sense::invalid_parameter((8 + index * 16 + 8) as u16));
            }
            self.check_range(lba, blocks)?;
            ranges.push((lba, blocks));
        }
        self.check_writable()?;
        let _exclusive = self.atomic.write().await;
        for (lba, blocks) in ranges {
            if blocks > 0 {
                self.device.unmap(lba, blocks).await.map_err(|error| io_sense(error, true))?;
            }
        }
        Ok(Reply::good(Bytes::new()))
    }

    async fn compare_and_write(&self, cdb: &[u8], data: Bytes, expected: u32) -> Outcome {
        if cdb[1] >> 5 != 0 {
            return Err(Sense::invalid_cdb(1, Some(7)));
        }
        let lba = be64(&cdb[2..]);
        let count = cdb[13];
        if count > COMPARE_AND_WRITE_BLOCKS_MAX {
            return Err(Sense::invalid_cdb(13, None));
        }
        let length = usize::from(count) * self.block_size() as usize;
        if expected as usize != 2 * length {
            return Err(Sense::invalid_cdb(13, None));
        }
        self.check_writable()?;
        self.check_range(lba, u64::from(count))?;
        if count == 0 {
            return Ok(Reply::good(Bytes::new()));
        }
        let data = Self::take_data(data, 2 * length)?;
        let _exclusive = self.atomic.write().await;
        let step = self.device.compare_and_write(lba, data.slice(..length), data.slice(length..));
        match step.await.map_err(|error| io_sense(error, true))? {
            Some(at) => Err(Sense::miscompare(at)),
            None => Ok(Reply::good(Bytes::new())),
        }
    }

    /// ORWRITE(16): the medium becomes itself OR the data, as one
    /// read-modify-write no other write overlaps.
    async fn or_write(&self, cdb: &[u8], data: Bytes) -> Outcome {
        let (lba, count) = self.write_command(cdb)?;
        if count == 0 {
            return Ok(Reply::good(Bytes::new()));
        }
        let data = Self::take_data(data, count as usize * self.block_size() as usize)?;
        let _exclusive = self.atomic.write().await;
        let medium = self.device.read(lba, count).await.map_err(|error| io_sense(error, false))?;
        let merged: Vec<u8> = medium.iter().zip(data.iter()).map(|(old, new)| old | new).collect();
        self.device.write(lba, Bytes::from(merged)).await.map_err(|error| io_sense(error, true))?;
        Ok(Reply::good(Bytes::new()))
    }

    /// The most a WRITE ATOMIC may write, and the alignment it asks of its
    /// LBA: an aligned write of that many blocks is one all-or-nothing
    /// write of the device (it straddles none of its backing objects).
    fn atomic_alignment(&self) -> u32 {
        let blocks = self.device.atomic_blocks().clamp(1, ATOMIC_BLOCKS_MAX);
        1 << blocks.ilog2()
    }

    /// WRITE ATOMIC(16): all of it or none, with no overlapping command
    /// seeing a part (it runs exclusively).
    async fn write_atomic(&self, cdb: &[u8], data: Bytes) -> Outcome {
        let (lba, count, protect) = lba_and_length(cdb);
        if protect != 0 {
            return Err(Sense::invalid_cdb(1, Some(7)));
        }
        self.check_writable()?;
        self.check_range(lba, u64::from(count))?;
        if be16(&cdb[10..]) != 0 {
            // ATOMIC BOUNDARY: no boundary size is offered.
            return Err(Sense::invalid_cdb(10, None));
        }
        if count > self.atomic_alignment() {
            return Err(Sense::invalid_cdb(12, None));
        }
        if !lba.is_multiple_of(u64::from(self.atomic_alignment())) {
            return Err(Sense::invalid_cdb(2, None));
        }
        if count == 0 {
            return Ok(Reply::good(Bytes::new()));
        }
        let data = Self::take_data(data, count as usize * self.block_size() as usize)?;
        let _exclusive = self.atomic.write().await;
        self.device.write(lba, data).await.map_err(|error| io_sense(error, true))?;
        Ok(Reply::good(Bytes::new()))
    }

    /// EXTENDED COPY (LID1): every descriptor checked, then the segments
    /// copied in order, exclusively, within this unit (the only one it can
    /// name: a designator of another is unreachable).
    async fn extended_copy(&self, cdb: &[u8], data: Bytes, nexus: &Nexus) -> Outcome {
        let length = be32(&cdb[10..]) as usize;
        let Some(list) = copy::parse(&data, length)? else { return Ok(Reply::good(Bytes::new())) };
        let block_size = self.block_size();
        for target in &list.targets {
            if target.designator_type != 0x03 || target.designator != self.naa {
                return Err(copy::unreachable());
            }
            if target.block_length != block_size {
                return Err(copy::unreachable());
            }
        }
        let blocks = self.device.blocks();
        for segment in &list.segments {
            if segment.source >= list.targets.len() || segment.destination >= list.targets.len() {
                return Err(copy::unreachable());
            }
            let fits = |lba: u64| lba.checked_add(segment.blocks).is_some_and(|end| end <= blocks);
            if !fits(segment.source_lba) || !fits(segment.destination_lba) {
                return Err(Sense::new(sense::key::COPY_ABORTED, 0x00, 0x00));
            }
        }
        self.check_writable()?;
        let _exclusive = self.atomic.write().await;
        let mut bytes = 0u64;
        for segment in &list.segments {
            let mut done = 0;
            while done < segment.blocks {
                let piece = (segment.blocks - done).min(u64::from(COPY_PIECE_BLOCKS));
                let data = self
                    .device
                    .read(segment.source_lba + done, piece as u32)
                    .await
                    .map_err(|error| io_sense(error, false))?;
                self.device.write(segment.destination_lba + done, data).await.map_err(|error| io_sense(error, true))?;
                done += piece;
            }
            bytes += segment.blocks * u64::from(block_size);
        }
        if list.hold {
            let mut state = self.state.lock().expect("unit state");
            state.copies.insert((nexus.clone(), list.list_id), (list.segments.len() as u16, bytes));
        }
        Ok(Reply::good(Bytes::new()))
    }

    fn receive_copy_results(&self, cdb: &[u8], nexus: &Nexus) -> Outcome {
        let allocation = be32(&cdb[10..]) as usize;
        let mut out = match cdb[1] & 0x1f {
            0x00 => {
                let held = self.state.lock().expect("unit state").copies.get(&(nexus.clone(), cdb[2])).copied();
                let Some((segments, bytes)) = held else { return Err(Sense::invalid_cdb(2, None)) };
                copy::copy_status(segments, bytes)
            }
            0x03 => copy::operating_parameters(),
            _ => return Err(Sense::invalid_cdb(1, Some(4))),
        };
        out.truncate(allocation);
        Ok(Reply::good(out))
    }

    fn read_capacity10(&self, cdb: &[u8]) -> Outcome {
        if cdb[8] & 0x01 != 0 || be32(&cdb[2..]) != 0 {
            // PMI is obsolete; an LBA without it is invalid.
            return Err(Sense::invalid_cdb(8, Some(0)));
        }
        let last = self.device.blocks().saturating_sub(1);
        let mut out = Vec::with_capacity(8);
        out.extend_from_slice(&(last.min(0xffff_ffff) as u32).to_be_bytes());
        out.extend_from_slice(&self.block_size().to_be_bytes());
        Ok(Reply::good(out))
    }

    fn read_capacity16(&self, cdb: &[u8]) -> Outcome {
        let allocation = be32(&cdb[10..]) as usize;
        let mut out = vec![0u8; 32];
        out[0..8].copy_from_slice(&self.device.blocks().saturating_sub(1).to_be_bytes());
        out[8..12].copy_from_slice(&self.block_size().to_be_bytes());
        out[13] = self.device.physical_block().max(1).trailing_zeros().min(15) as u8;
        // LBPME and LBPRZ: thin provisioned, unmapped blocks read as zeros.
        out[14] = 0x80 | 0x40;
        out.truncate(allocation);
        Ok(Reply::good(out))
    }

    async fn lba_status(&self, cdb: &[u8]) -> Outcome {
        let lba = be64(&cdb[2..]);
        let allocation = be32(&cdb[10..]) as usize;
        let blocks = self.device.blocks();
        if lba >= blocks {
            return Err(Sense::lba_out_of_range());
        }
        // Runs in the same state are joined: (start, blocks, mapped).
        let room = (allocation.saturating_sub(8) / 16).clamp(1, 64);
        let mut runs: Vec<(u64, u64, bool)> = Vec::new();
        let mut at = lba;
        let mut asked = 0;
        while at < blocks && asked < LBA_STATUS_QUERIES_MAX {
            let (mapped, run) = self.device.provisioning(at).await.map_err(|error| io_sense(error, false))?;
            let run = run.clamp(1, blocks - at).min(u64::from(u32::MAX));
            asked += 1;
            let full = runs.len() == room;
            match runs.last_mut() {
                Some(last) if last.2 == mapped && last.1 + run <= u64::from(u32::MAX) => last.1 += run,
                _ if full => break,
                _ => runs.push((at, run, mapped)),
            }
            at += run;
        }
        let mut out = vec![0u8; 8];
        for (start, run, mapped) in runs {
            out.extend_from_slice(&start.to_be_bytes());
            out.extend_from_slice(&(run as u32).to_be_bytes());
            out.extend_from_slice(&[if mapped { 0 } else { 1 }, 0, 0, 0]);
        }
        let length = (out.len() - 4) as u32;
        out[0..4].copy_from_slice(&length.to_be_bytes());
        out.truncate(allocation);
        Ok(Reply::good(out))
    }

    fn inquiry(&self, command: &Command<'_>) -> Outcome {
        let cdb = command.cdb;
        let allocation = usize::from(be16(&cdb[3..]));
        if cdb[1] & 0x02 != 0 {
            // CMDDT (obsolete)
            return Err(Sense::invalid_cdb(1, Some(1)));
        }
        let mut data = if cdb[1] & 0x01 == 0 {
            if cdb[2] != 0 {
                return Err(Sense::invalid_cdb(2, None));
            }
            standard_inquiry()
        } else {
            self.vpd(cdb[2], command.port)?
        };
        data.truncate(allocation);
        Ok(Reply::good(data))
    }

    fn vpd(&self, page: u8, port: &Port) -> Result<Vec<u8>, Sense> {
        let body: Vec<u8> = match page {
            0x00 => vec![0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2],
            0x80 => self.serial.as_bytes().to_vec(),
            0x83 => self.identification(port),
            0xb0 => {
                let mut body = vec![0u8; 0x3c];
                body[1] = COMPARE_AND_WRITE_BLOCKS_MAX;
                // Optimal transfer length granularity: the device's stripe.
                let stripe = self.device.stripe().max(self.device.granularity()).max(1);
                body[2..4].copy_from_slice(&(stripe.min(u32::from(u16::MAX)) as u16).to_be_bytes());
                body[4..8].copy_from_slice(&TRANSFER_BLOCKS_MAX.to_be_bytes());
                // Optimal transfer length: about 1 MiB, whole stripes.
                let optimal = (OPTIMAL_TRANSFER_BLOCKS / stripe).max(1) * stripe;
                body[8..12].copy_from_slice(&optimal.to_be_bytes());
                body[16..20].copy_from_slice(&UNMAP_BLOCKS_MAX.to_be_bytes());
                body[20..24].copy_from_slice(&UNMAP_DESCRIPTORS_MAX.to_be_bytes());
                // Optimal unmap granularity: only whole stripes are returned
                // to the disks; a part of one is written with zeros.
                body[24..28].copy_from_slice(&stripe.to_be_bytes());
                body[28..32].copy_from_slice(&0x8000_0000u32.to_be_bytes());
                body[32..40].copy_from_slice(&WRITE_SAME_BLOCKS_MAX.to_be_bytes());
                // Maximum atomic transfer length and its alignment.
                body[40..44].copy_from_slice(&self.atomic_alignment().to_be_bytes());
                body[44..48].copy_from_slice(&self.atomic_alignment().to_be_bytes());
                body
            }
            0xb1 => {
                let mut body = vec![0u8; 0x3c];
                // Non-rotating.
                body[0..2].copy_from_slice(&1u16.to_be_bytes());
                // WABEREQ 01b: a read of a block-erased block succeeds
                // (zeros); WACEREQ 01b, with a device that encrypts: so does
                // one of a crypto-erased block (noise, or zeros if never
                // written).
                body[3] = 0x40 | if self.device.encrypted() { 0x10 } else { 0 };
                body
            }
            // LBPU, LBPWS, LBPWS10, LBPRZ; provisioning type: thin.
            0xb2 => vec![0x00, 0x80 | 0x40 | 0x20 | 0x04, 0x02, 0x00],
            _ => return Err(Sense::invalid_cdb(2, None)),
        };
        let mut out = vec![0x00, page];
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(&body);
        Ok(out)
    }

    fn identification(&self, port: &Port) -> Vec<u8> {
        fn designator(out: &mut Vec<u8>, code_set: u8, flags: u8, value: &[u8]) {
            out.extend_from_slice(&[code_set, flags, 0, value.len() as u8]);
            out.extend_from_slice(value);
        }
        fn padded_name(name: &str) -> Vec<u8> {
            let mut bytes = name.as_bytes().to_vec();
            bytes.push(0);
            while !bytes.len().is_multiple_of(4) {
                bytes.push(0);
            }
            bytes
        }
        let mut out = Vec::new();
        // NAA, logical unit.
        designator(&mut out, 0x01, 0x03, &self.naa);
        // T10 vendor identification, logical unit.
        let mut t10 = VENDOR.to_vec();
        t10.extend_from_slice(self.serial.as_bytes());
        designator(&mut out, 0x02, 0x01, &t10);
        // Relative target port and target port group (iSCSI, PIV).
        designator(&mut out, 0x51, 0x94, &[0, 0, (port.relative_port >> 8) as u8, port.relative_port as u8]);
        designator(&mut out, 0x51, 0x95, &[0, 0, (port.group >> 8) as u8, port.group as u8]);
        // SCSI name strings: the target port and the target device.
        let port_name = format!("{},t,0x{:04x}", port.target, port.group);
        designator(&mut out, 0x53, 0x98, &padded_name(&port_name));
        designator(&mut out, 0x53, 0xa8, &padded_name(&port.target));
        out
    }

    fn mode_sense(&self, cdb: &[u8]) -> Outcome {
        let ten = cdb[0] == 0x5a;
        let no_descriptors = cdb[1] & 0x08 != 0;
        let control = cdb[2] >> 6;
        let page = cdb[2] & 0x3f;
        let subpage = cdb[3];
        let allocation = if ten { usize::from(be16(&cdb[7..])) } else { usize::from(cdb[4]) };
        if control == 3 {
            return Err(Sense::saving_not_supported());
        }
        if subpage != 0 && subpage != 0xff {
            return Err(Sense::invalid_cdb(3, None));
        }
        let modes = self.state.lock().expect("unit state").modes;
        let mut pages = Vec::new();
        let wanted = |code: u8| page == 0x3f || page == code;
        let known = matches!(page, 0x3f | 0x08 | 0x0a | 0x1c);
        if !known {
            return Err(Sense::invalid_cdb(2, Some(5)));
        }
        if wanted(0x08) {
            let mut caching = vec![0u8; 20];
            caching[0] = 0x08;
            caching[1] = 0x12;
            if control == 1 {
                caching[2..].fill(0);
            }
            pages.extend_from_slice(&caching);
        }
        if wanted(0x0a) {
            let mut page = vec![0u8; 12];
            page[0] = 0x0a;
            page[1] = 0x0a;
            match control {
                1 => {
                    page[2] = 0x04; // D_SENSE
                    page[4] = 0x08; // SWP
                }
                2 => {
                    page[3] = 0x10;
                }
                _ => {
                    page[2] = if modes.descriptor_sense { 0x04 } else { 0 };
                    page[3] = 0x10; // unrestricted reordering
                    page[4] = if modes.software_write_protect { 0x08 } else { 0 };
                    page[8..10].copy_from_slice(&0xffffu16.to_be_bytes());
                }
            }
            pages.extend_from_slice(&page);
        }
        if wanted(0x1c) {
            let mut page = vec![0u8; 12];
            page[0] = 0x1c;
            page[1] = 0x0a;
            pages.extend_from_slice(&page);
        }
        let write_protected = if modes.software_write_protect { 0x80 } else { 0 };
        // DPOFUA: DPO and FUA are accepted.
        let device_specific = write_protected | 0x10;
        let mut block_descriptor = Vec::new();
        if !no_descriptors {
            let blocks = self.device.blocks().min(0xffff_ffff) as u32;
            block_descriptor.extend_from_slice(&blocks.to_be_bytes());
            block_descriptor.extend_from_slice(&(self.block_size() & 0x00ff_ffff).to_be_bytes());
        }
        let mut out = if ten {
            let mut header = vec![0u8; 8];
            header[3] = device_specific;
            header[6..8].copy_from_slice(&(block_descriptor.len() as u16).to_be_bytes());
            header
        } else {
            vec![0, 0, device_specific, block_descriptor.len() as u8]
        };
        out.extend_from_slice(&block_descriptor);
        out.extend_from_slice(&pages);
        if ten {
            let length = (out.len() - 2) as u16;
            out[0..2].copy_from_slice(&length.to_be_bytes());
        } else {
            out[0] = (out.len() - 1) as u8;
        }
        out.truncate(allocation);
        Ok(Reply::good(out))
    }

    fn mode_select(&self, cdb: &[u8], data: &[u8]) -> Outcome {
        let ten = cdb[0] == 0x55;
        let length = if ten { usize::from(be16(&cdb[7..])) } else { usize::from(cdb[4]) };
        if cdb[1] & 0x10 == 0 && length > 0 {
            // Only page-format parameter lists.
            return Err(Sense::invalid_cdb(1, Some(4)));
        }
        if cdb[1] & 0x01 != 0 {
            return Err(Sense::invalid_cdb(1, Some(0)));
        }
        if length == 0 {
            return Ok(Reply::good(Bytes::new()));
        }
        if data.len() < length {
            return Err(Sense::parameter_list_length());
        }
        let data = &data[..length];
        let header = if ten { 8 } else { 4 };
        if data.len() < header {
            return Err(Sense::parameter_list_length());
        }
        let descriptors = if ten { usize::from(be16(&data[6..])) } else { usize::from(data[3]) };
        let mut at = header + descriptors;
        if at > data.len() {
            return Err(Sense::parameter_list_length());
        }
        let mut modes = self.state.lock().expect("unit state").modes;
        while at < data.len() {
            if at + 2 > data.len() {
                return Err(Sense::parameter_list_length());
            }
            let code = data[at] & 0x3f;
            if data[at] & 0x40 != 0 {
                return Err(Sense::invalid_parameter(at as u16));
            }
            let page_length = usize::from(data[at + 1]);
            let page = data.get(at..at + 2 + page_length).ok_or_else(Sense::parameter_list_length)?;
            match code {
                0x0a if page_length == 0x0a => {
                    modes.descriptor_sense = page[2] & 0x04 != 0;
                    modes.software_write_protect = page[4] & 0x08 != 0;
                }
                0x08 if page_length == 0x12 => {
                    if page[2] & 0x04 != 0 {
                        // WCE cannot be set: every write is durable.
                        return Err(Sense::invalid_parameter((at + 2) as u16));
                    }
                }
                0x1c if page_length == 0x0a => {}
                _ => return Err(Sense::invalid_parameter(at as u16)),
            }
            at += 2 + page_length;
        }
        self.state.lock().expect("unit state").modes = modes;
        Ok(Reply::good(Bytes::new()))
    }

    fn report_port_groups(&self, cdb: &[u8], port: &Port) -> Outcome {
        let extended = (cdb[1] >> 5) == 1;
        let allocation = be32(&cdb[6..]) as usize;
        let mut out = if extended { vec![0, 0, 0, 0, 0x10, 0, 0, 0] } else { vec![0, 0, 0, 0] };
        // One group, active/optimized, preferred.
        out.extend_from_slice(&[0x80, 0x81]);
        out.extend_from_slice(&port.group.to_be_bytes());
        out.extend_from_slice(&[0, 0, 0, 1]);
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&port.relative_port.to_be_bytes());
        let length = (out.len() - 4) as u32;
        out[0..4].copy_from_slice(&length.to_be_bytes());
        out.truncate(allocation);
        Ok(Reply::good(out))
    }

    /// RESERVE(6) / RELEASE(6): this host's unit only (checked against
    /// the persistent reservations, shared or not, which it conflicts with).
    fn legacy_reservation(&self, nexus: &Nexus, reserve: bool) -> Outcome {
        let shared = self.reservation_store.as_ref().map(|store| store.load());
        let mut guard = self.state.lock().expect("unit state");
        let state = &mut *guard;
        let persistent = shared.as_deref().unwrap_or(&state.reservations);
        let result =
            if reserve { state.legacy.reserve(nexus, persistent) } else { state.legacy.release(nexus, persistent) };
        match result {
            Ok(()) => Ok(Reply::good(Bytes::new())),
            Err(PrError::Conflict) => Ok(Reply::status(status::RESERVATION_CONFLICT)),
            Err(PrError::Sense(sense)) => Err(sense),
        }
    }

    /// Applies a PERSISTENT RESERVE OUT change from `nexus` (to the shared
    /// store if there is one) and has its unit attentions told: here, or,
    /// when shared, posted with the change for every host to tell its own
    /// nexuses.
    async fn change_reservations(&self, nexus: &Nexus, change: &pr::Change<'_>) -> Outcome {
        // This host's RESERVE(6) conflicts with any change (SPC-3).
        if self.state.lock().expect("unit state").legacy.conflicts(nexus) {
            return Ok(Reply::status(status::RESERVATION_CONFLICT));
        }
        let result = match &self.reservation_store {
            Some(store) => {
                let change = move |reservations: &mut Reservations| {
                    let attentions = change(reservations)?;
                    reservations.post(attentions);
                    Ok(Vec::new())
                };
                match store.update(&change).await {
                    Ok(result) => result,
                    Err(error) => {
                        tracing::warn!(%error, "the shared reservations cannot be reached");
                        return Err(Sense::in_transition());
                    }
                }
            }
            None => change(&mut self.state.lock().expect("unit state").reservations),
        };
        match result {
            Ok(attentions) => {
                {
                    let mut state = self.state.lock().expect("unit state");
                    for (to, asc, ascq) in attentions {
                        state.tell(&to, asc, ascq);
                    }
                }
                // What the change forbids and this host admitted before it
                // finishes before it is answered (the other hosts do the
                // same before they confirm it).
                if !self.settle_admitted(SETTLE_LIMIT).await {
                    tracing::warn!("commands admitted before a reservation change are still under way");
                }
                Ok(Reply::good(Bytes::new()))
            }
            Err(PrError::Conflict) => Ok(Reply::status(status::RESERVATION_CONFLICT)),
            Err(PrError::Sense(sense)) => Err(sense),
        }
    }

    fn persistent_reserve_in(&self, cdb: &[u8]) -> Outcome {
        let allocation = usize::from(be16(&cdb[7..]));
        let state = self.reservations();
        let mut out = Vec::new();
        out.extend_from_slice(&state.generation.to_be_bytes());
        match cdb[1] & 0x1f {
            0 => {
                out.extend_from_slice(&((state.registrations.len() * 8) as u32).to_be_bytes());
                for registration in &state.registrations {
                    out.extend_from_slice(&registration.key.to_be_bytes());
                }
            }
            1 => match &state.reservation {
                None => out.extend_from_slice(&0u32.to_be_bytes()),
                Some(reservation) => {
                    out.extend_from_slice(&16u32.to_be_bytes());
                    let key = if pr::kind::all_registrants(reservation.kind) {
                        0
                    } else {
                        state.registration(&reservation.holder).map(|r| r.key).unwrap_or(0)
                    };
                    out.extend_from_slice(&key.to_be_bytes());
                    out.extend_from_slice(&[0, 0, 0, 0, 0, reservation.kind & 0x0f, 0, 0]);
                }
            },
            2 => {
                out.clear();
                // Length 8; CRH, ATP_C; TMV; the types this unit supports.
                out.extend_from_slice(&[0, 8, 0x10 | 0x04, 0x80, 0x80 | 0x40 | 0x20 | 0x08 | 0x02, 0x01, 0, 0]);
            }
            3 => {
                let mut descriptors = Vec::new();
                for registration in &state.registrations {
                    let holder = match &state.reservation {
                        Some(reservation) if pr::kind::all_registrants(reservation.kind) => true,
                        Some(reservation) => state.registration(&reservation.holder) == Some(registration),
                        None => false,
                    };
                    let transport_id = pr::transport_id(&registration.initiator);
                    descriptors.extend_from_slice(&registration.key.to_be_bytes());
                    descriptors.extend_from_slice(&[0, 0, 0, 0]);
                    descriptors.push(if registration.all_target_ports { 0x02 } else { 0 } | u8::from(holder));
                    descriptors.push(if holder { state.reservation.as_ref().map(|r| r.kind).unwrap_or(0) } else { 0 });
                    descriptors.extend_from_slice(&[0, 0, 0, 0]);
                    // Ignored with ALL_TG_PT.
                    descriptors.extend_from_slice(&registration.port.to_be_bytes());
                    descriptors.extend_from_slice(&(transport_id.len() as u32).to_be_bytes());
                    descriptors.extend_from_slice(&transport_id);
                }
                out.extend_from_slice(&(descriptors.len() as u32).to_be_bytes());
                out.extend_from_slice(&descriptors);
            }
            _ => return Err(Sense::invalid_cdb(1, Some(4))),
        }
        out.truncate(allocation);
        Ok(Reply::good(out))
    }

    async fn persistent_reserve_out(&self, cdb: &[u8], command: &Command<'_>) -> Outcome {
        let action = cdb[1] & 0x1f;
        let kind = cdb[2] & 0x0f;
        if cdb[2] >> 4 != 0 {
            // Only the logical-unit scope.
            return Err(Sense::invalid_cdb(2, Some(4)));
        }
        let length = be32(&cdb[5..]) as usize;
        let data = &command.data[..length.min(command.data.len())];
        if action == pr::action::REGISTER_AND_MOVE {
            if length < 24 || data.len() < length {
                return Err(Sense::parameter_list_length());
            }
        } else if length != 24 || data.len() < 24 {
            return Err(Sense::parameter_list_length());
        }
        let flags = data[20];
        let (specify_ports, all_target_ports, persist) = (flags & 0x08 != 0, flags & 0x04 != 0, flags & 0x01 != 0);
        let mut request = pr::Request {
            action,
            kind,
            key: be64(data),
            service_key: be64(&data[8..]),
            all_target_ports,
            move_to: None,
            unregister_on_move: false,
        };
        if persist {
            // Activate Persist Through Power Loss is not offered.
            return Err(Sense::invalid_parameter(20));
        }
        if specify_ports && action != pr::action::REGISTER_AND_MOVE {
            return Err(Sense::invalid_parameter(20));
        }
        if all_target_ports && !matches!(action, pr::action::REGISTER | pr::action::REGISTER_AND_IGNORE) {
            return Err(Sense::invalid_parameter(20));
        }
        if action == pr::action::REGISTER_AND_MOVE {
            request.unregister_on_move = data[17] & 0x02 != 0;
            let id_length = be32(&data[20..]) as usize;
            let id = data.get(24..24 + id_length).ok_or_else(Sense::parameter_list_length)?;
            let (name, _) = pr::parse_transport_id(id).ok_or_else(|| Sense::invalid_parameter(24))?;
            let port = be16(&data[18..]);
            if port == 0 {
                // Relative target port 0 is reserved.
                return Err(Sense::invalid_parameter(18));
            }
            request.move_to = Some(Nexus::new(name, port));
            request.all_target_ports = false;
        }
        let nexus = command.nexus;
        let change = move |reservations: &mut Reservations| reservations.apply(nexus, &request);
        self.change_reservations(nexus, &change).await
    }
}

fn compare(medium: &[u8], expected: &[u8]) -> Result<(), Sense> {
    match first_difference(medium, expected) {
        Some(offset) => Err(Sense::miscompare(offset)),
        None => Ok(()),
    }
}

/// The offset of the first byte where `medium` and `expected` differ.
fn first_difference(medium: &[u8], expected: &[u8]) -> Option<u64> {
    medium.iter().zip(expected).position(|(old, want)| old != want).map(|at| at as u64)
}

fn io_sense(error: IoError, write: bool) -> Sense {
    match error {
        IoError::Unavailable(_) => Sense::in_transition(),
        IoError::Later(_) => Sense { later: true, ..Sense::in_transition() },
        IoError::NoSpace(_) => Sense::space_allocation_failed(),
        IoError::Medium(_) if write => Sense::write_error(),
        IoError::Medium(_) => Sense::read_error(),
    }
}

fn standard_inquiry() -> Vec<u8> {
    let mut out = vec![0u8; 74];
    out[0] = 0x00; // connected, direct access
    out[2] = 0x06; // SPC-4
    out[3] = 0x12; // HISUP, response data format 2
    out[4] = (out.len() - 5) as u8;
    out[5] = 0x10 | 0x08; // TPGS: implicit ALUA; 3PC: EXTENDED COPY
    out[7] = 0x02; // CMDQUE
    out[8..16].copy_from_slice(VENDOR);
    out[16..32].copy_from_slice(PRODUCT);
    out[32..36].copy_from_slice(REVISION);
    // Version descriptors: SAM-5, iSCSI, SPC-4, SBC-3.
    for (index, version) in [0x00a0u16, 0x0960, 0x0460, 0x04c0].iter().enumerate() {
        out[58 + index * 2..60 + index * 2].copy_from_slice(&version.to_be_bytes());
    }
    out
}

/// The single-level LUN of `lun` (peripheral or flat addressing).
pub fn encode_lun(lun: u64) -> [u8; 8] {
    let mut out = [0u8; 8];
    if lun < 256 {
        out[1] = lun as u8;
    } else {
        out[0] = 0x40 | ((lun >> 8) as u8 & 0x3f);
        out[1] = lun as u8;
    }
    out
}

pub fn decode_lun(bytes: u64) -> u64 {
    let bytes = bytes.to_be_bytes();
    match bytes[0] >> 6 {
        0 => u64::from(bytes[1]),
        1 => (u64::from(bytes[0] & 0x3f) << 8) | u64::from(bytes[1]),
        _ => u64::MAX,
    }
}

/// REPORT LUNS, answered for any LUN (it is addressed to LUN 0 or a
/// well-known LUN).
pub fn report_luns(cdb: &[u8], luns: &[u64]) -> Result<Reply, Sense> {
    let allocation = be32(&cdb[6..]) as usize;
    if allocation < 16 {
        return Err(Sense::invalid_cdb(6, None));
    }
    if cdb[2] > 2 && !(0x10..=0x12).contains(&cdb[2]) {
        return Err(Sense::invalid_cdb(2, None));
    }
    let listed: Vec<u64> = if cdb[2] == 1 || cdb[2] == 0x11 { Vec::new() } else { luns.to_vec() };
    let mut out = Vec::with_capacity(8 + listed.len() * 8);
    out.extend_from_slice(&((listed.len() * 8) as u32).to_be_bytes());
    out.extend_from_slice(&[0; 4]);
    for lun in listed {
        out.extend_from_slice(&encode_lun(lun));
    }
    out.truncate(allocation);
    Ok(Reply::good(out))
}

/// READ DEFECT DATA (10) and (12): a volume has no grown or primary
/// defects, so the list is empty in whatever format was asked for.
fn read_defect_data(cdb: &[u8]) -> Result<Reply, Sense> {
    let format = cdb[2] & 0x07;
    let lists = cdb[2] & 0x18;
    let out = if cdb[0] == 0x37 {
        let allocation = usize::from(be16(&cdb[7..]));
        let mut out = vec![0, lists | format, 0, 0];
        out.truncate(allocation);
        out
    } else {
        let allocation = be32(&cdb[6..]) as usize;
        let mut out = vec![0, lists | format, 0, 0, 0, 0, 0, 0];
        out.truncate(allocation);
        out
    };
    Ok(Reply::good(out))
}

/// The commands a unit runs: all of [`COMMANDS`] but CRYPTO ERASE, which
/// only a device that encrypts offers.
fn commands(encrypted: bool) -> impl Iterator<Item = &'static (u8, Option<u8>, usize)> {
    COMMANDS.iter().filter(move |&&(code, action, _)| {
        encrypted || (code, action) != (sanitize::OPCODE, Some(sanitize::CRYPTO_ERASE))
    })
}

/// REPORT SUPPORTED OPERATION CODES, of a unit whose device encrypts or
/// not.
pub fn report_opcodes(cdb: &[u8], encrypted: bool) -> Result<Reply, Sense> {
    let timeouts = cdb[2] & 0x80 != 0;
    let options = cdb[2] & 0x07;
    let opcode = cdb[3];
    let service_action = be16(&cdb[4..]);
    let allocation = be32(&cdb[6..]) as usize;
    let timeout_descriptor = |out: &mut Vec<u8>| {
        out.extend_from_slice(&[0, 0x0a, 0, 0]);
        out.extend_from_slice(&30u32.to_be_bytes());
        out.extend_from_slice(&60u32.to_be_bytes());
    };
    let mut out = Vec::new();
    match options {
        0 => {
            out.extend_from_slice(&[0; 4]);
            for &(code, action, length) in commands(encrypted) {
                out.push(code);
                out.push(0);
                out.extend_from_slice(&u16::from(action.unwrap_or(0)).to_be_bytes());
                out.push(0);
                out.push(if action.is_some() { 0x01 } else { 0 } | if timeouts { 0x02 } else { 0 });
                out.extend_from_slice(&(length as u16).to_be_bytes());
                if timeouts {
                    timeout_descriptor(&mut out);
                }
            }
            let length = (out.len() - 4) as u32;
            out[0..4].copy_from_slice(&length.to_be_bytes());
        }
        1..=3 => {
            let has_actions = commands(encrypted).any(|&(code, action, _)| code == opcode && action.is_some());
            let found = commands(encrypted).find(|&&(code, action, _)| {
                code == opcode
                    && match (options, action) {
                        (1, None) => true,
                        (1, Some(_)) => false,
                        (2, Some(action)) => u16::from(action) == service_action,
                        (3, Some(action)) => u16::from(action) == service_action,
                        (3, None) => service_action == 0,
                        _ => false,
                    }
            });
            if options == 1 && has_actions {
                return Err(Sense::invalid_cdb(2, None));
            }
            if options == 2 && !has_actions && commands(encrypted).any(|&(code, _, _)| code == opcode) {
                return Err(Sense::invalid_cdb(2, None));
            }
            match found {
                None => out.extend_from_slice(&[0, 0x01, 0, 0]),
                Some(&(code, action, length)) => {
                    out.extend_from_slice(&[0, 0x03 | if timeouts { 0x80 } else { 0 }]);
                    out.extend_from_slice(&(length as u16).to_be_bytes());
                    let mut usage = vec![0xffu8; length];
                    usage[0] = code;
                    if let Some(action) = action {
                        // SANITIZE's bit 6 is reserved.
                        usage[1] = if code == sanitize::OPCODE { 0xa0 } else { 0xe0 } | action;
                    }
                    usage[length - 1] = 0x07;
                    out.extend_from_slice(&usage);
                    if timeouts {
                        timeout_descriptor(&mut out);
                    }
                }
            }
        }
        _ => return Err(Sense::invalid_cdb(2, Some(2))),
    }
    out.truncate(allocation);
    Ok(Reply::good(out))
}
