//! SANITIZE through a logical unit over an in-memory device: what each
//! operation leaves on the medium, what other commands see while one runs,
//! and what ends a failure (a good sanitize, or EXIT FAILURE MODE when the
//! failed one allowed it).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use iscsi::memory::MemoryDevice;
use iscsi::scsi::{BlockDevice, IoError, IoResult, LogicalUnit, Reply};
use iscsi::sense::status;

const BLOCKS: u64 = 4096;
const NEXUS: &str = "iqn.2026-11.test:initiator,i,0x1";

/// A memory device whose writes wait while `held`, and fail while `broken`;
/// one that says it `encrypted` counts the crypto erases asked of it.
pub(crate) struct Gated {
    inner: MemoryDevice,
    pub(crate) held: tokio::sync::watch::Sender<bool>,
    broken: AtomicBool,
    encrypted: bool,
    erased: std::sync::atomic::AtomicU32,
}

impl Gated {
    pub(crate) fn new() -> Arc<Gated> {
        Gated::encrypting(false)
    }

    fn encrypting(encrypted: bool) -> Arc<Gated> {
        Arc::new(Gated {
            inner: MemoryDevice::new(512, BLOCKS),
            held: tokio::sync::watch::channel(false).0,
            broken: AtomicBool::new(false),
            encrypted,
            erased: Default::default(),
        })
    }
}

impl BlockDevice for Gated {
    fn block_size(&self) -> u32 {
        512
    }
    fn blocks(&self) -> u64 {
        BLOCKS
    }
    fn read(&self, lba: u64, count: u32) -> BoxFuture<'_, IoResult<Bytes>> {
        self.inner.read(lba, count)
    }
    fn write(&self, lba: u64, data: Bytes) -> BoxFuture<'_, IoResult<()>> {
        let mut held = self.held.subscribe();
        Box::pin(async move {
            let _ = held.wait_for(|held| !*held).await;
            if self.broken.load(Ordering::Relaxed) {
                return Err(IoError::Medium("broken on purpose".into()));
            }
            self.inner.write(lba, data).await
        })
    }
    fn unmap(&self, lba: u64, count: u64) -> BoxFuture<'_, IoResult<()>> {
        self.inner.unmap(lba, count)
    }
    fn flush(&self) -> BoxFuture<'_, IoResult<()>> {
        self.inner.flush()
    }
    fn encrypted(&self) -> bool {
        self.encrypted
    }
    fn crypto_erase(&self) -> BoxFuture<'_, IoResult<()>> {
        self.erased.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Ok(()) })
    }
    /// Runs of at most 100 blocks, as a volume answers per object: GET LBA
    /// STATUS must join them.
    fn provisioning(&self, lba: u64) -> BoxFuture<'_, IoResult<(bool, u64)>> {
        let answer = self.inner.provisioning(lba);
        Box::pin(async move { answer.await.map(|(mapped, run)| (mapped, run.min(100))) })
    }
}

async fn run(unit: &LogicalUnit, cdb: &[u8], data: &[u8]) -> Reply {
    run_as(unit, NEXUS, cdb, data).await
}

async fn run_as(unit: &LogicalUnit, nexus: &str, cdb: &[u8], data: &[u8]) -> Reply {
    crate::execute(unit, nexus, 1, cdb, data).await
}

/// (sense key, ASC, ASCQ) of a CHECK CONDITION with fixed-format sense.
fn sense_of(reply: &Reply) -> (u8, u8, u8) {
    assert_eq!(reply.status, status::CHECK_CONDITION, "{reply:?}");
    let sense = reply.sense.as_ref().expect("sense data");
    (sense[2] & 0x0f, sense[12], sense[13])
}

fn good(reply: Reply) -> Bytes {
    assert_eq!(reply.status, status::GOOD, "{reply:?}");
    reply.data
}

fn sanitize_cdb(byte1: u8, length: u16) -> [u8; 10] {
    let mut cdb = [0u8; 10];
    cdb[0] = 0x48;
    cdb[1] = byte1;
    cdb[7..9].copy_from_slice(&length.to_be_bytes());
    cdb
}

fn write16(lba: u64, blocks: u32) -> [u8; 16] {
    let mut cdb = [0u8; 16];
    cdb[0] = 0x8a;
    cdb[2..10].copy_from_slice(&lba.to_be_bytes());
    cdb[10..14].copy_from_slice(&blocks.to_be_bytes());
    cdb
}

fn read16(lba: u64, blocks: u32) -> [u8; 16] {
    let mut cdb = write16(lba, blocks);
    cdb[0] = 0x88;
    cdb
}

fn lba_status(lba: u64) -> [u8; 16] {
    let mut cdb = [0u8; 16];
    cdb[0] = 0x9e;
    cdb[1] = 0x12;
    cdb[2..10].copy_from_slice(&lba.to_be_bytes());
    cdb[10..14].copy_from_slice(&256u32.to_be_bytes());
    cdb
}

/// An OVERWRITE parameter list: one pass of `pattern`.
fn overwrite(pattern: &[u8]) -> Vec<u8> {
    let mut list = vec![0x01, 0];
    list.extend_from_slice(&(pattern.len() as u16).to_be_bytes());
    list.extend_from_slice(pattern);
    list
}

/// Writes 'a' over the first and the last 256 blocks.
async fn fill_ends(unit: &LogicalUnit) {
    for lba in [0, BLOCKS - 256] {
        good(run(unit, &write16(lba, 256), &[b'a'; 256 * 512]).await);
    }
}

#[tokio::test]
async fn overwrite_writes_the_pattern_over_every_block() {
    let device = Gated::new();
    let unit = LogicalUnit::new(device.clone(), 1, "s1");
    fill_ends(&unit).await;
    let list = overwrite(&[0xaa, 0x55]);
    good(run(&unit, &sanitize_cdb(0x01, list.len() as u16), &list).await);
    let data = good(run(&unit, &read16(0, BLOCKS as u32), &[]).await);
    assert!(data.chunks(2).all(|pair| pair == [0xaa, 0x55]), "a block was not overwritten");
    assert_eq!(device.inner.mapped_blocks() as u64, BLOCKS, "every block is written, mapped or not before");
}

#[tokio::test]
async fn block_erase_deallocates_every_block_and_get_lba_status_says_so_in_one_descriptor() {
    let device = Gated::new();
    let unit = LogicalUnit::new(device.clone(), 1, "s1");
    fill_ends(&unit).await;
    // Several runs before: mapped, unmapped, mapped.
    let before = good(run(&unit, &lba_status(0), &[]).await);
    assert_eq!(before.len(), 8 + 3 * 16);
    good(run(&unit, &sanitize_cdb(0x02, 0), &[]).await);
    assert_eq!(device.inner.mapped_blocks(), 0);
    let data = good(run(&unit, &read16(0, 256), &[]).await);
    assert!(data.iter().all(|&byte| byte == 0));
    let after = good(run(&unit, &lba_status(0), &[]).await);
    assert_eq!(after.len(), 8 + 16, "one descriptor: {after:?}");
    assert_eq!(u64::from_be_bytes(after[8..16].try_into().unwrap()), 0);
    assert_eq!(u64::from(u32::from_be_bytes(after[16..20].try_into().unwrap())), BLOCKS);
    assert_eq!(after[20], 1, "deallocated");
}

#[tokio::test]
async fn a_running_sanitize_refuses_other_commands_on_every_nexus_and_outlives_its_command() {
    let device = Gated::new();
    let unit = LogicalUnit::new(device.clone(), 1, "s1");
    let list = overwrite(&[0x11]);
    device.held.send_replace(true);
    // The command gives up waiting (as when its task is aborted or its
    // connection drops); the sanitize goes on.
    let waited =
        tokio::time::timeout(Duration::from_millis(100), run(&unit, &sanitize_cdb(0x01, list.len() as u16), &list))
            .await;
    assert!(waited.is_err(), "the sanitize finished while its writes were held");
    let other = "iqn.2026-11.test:other,i,0x2";
    for nexus in [NEXUS, other] {
        // TEST UNIT READY, READ, START STOP UNIT (not even a known command).
        for cdb in [&[0u8; 6][..], &read16(0, 1)[..], &[0x1b, 1, 0, 0, 0x12, 0][..]] {
            assert_eq!(sense_of(&run_as(&unit, nexus, cdb, &[]).await), (0x2, 0x04, 0x1b), "{cdb:?}");
        }
        assert_eq!(
            sense_of(&run_as(&unit, nexus, &sanitize_cdb(0x02, 0), &[]).await),
            (0x2, 0x04, 0x1b),
            "a second sanitize"
        );
        good(run_as(&unit, nexus, &[0x12, 0, 0, 0, 96, 0], &[]).await);
        good(run_as(&unit, nexus, &[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0], &[]).await);
        let sense = good(run_as(&unit, nexus, &[0x03, 0, 0, 0, 18, 0], &[]).await);
        assert_eq!((sense[2] & 0x0f, sense[12], sense[13]), (0x2, 0x04, 0x1b));
        assert_eq!(sense[15] & 0x80, 0x80, "the progress indication is valid");
    }
    device.held.send_replace(false);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let reply = run(&unit, &[0u8; 6], &[]).await;
        if reply.status == status::GOOD {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the sanitize never finished");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let data = good(run(&unit, &read16(BLOCKS - 8, 8), &[]).await);
    assert!(data.iter().all(|&byte| byte == 0x11), "the abandoned sanitize did not complete");
}

#[tokio::test]
async fn a_failed_sanitize_refuses_media_access_until_a_good_sanitize_or_an_allowed_exit() {
    let device = Gated::new();
    let unit = LogicalUnit::new(device.clone(), 1, "s1");
    let list = overwrite(&[0x22]);
    let overwrite_cdb = |byte1: u8| sanitize_cdb(byte1, list.len() as u16);
    // Failed without AUSE: only a sanitize that succeeds (without AUSE) ends it.
    device.broken.store(true, Ordering::Relaxed);
    assert_eq!(sense_of(&run(&unit, &overwrite_cdb(0x01), &list).await), (0x3, 0x31, 0x03));
    device.broken.store(false, Ordering::Relaxed);
    assert_eq!(sense_of(&run(&unit, &read16(0, 1), &[]).await), (0x3, 0x31, 0x03));
    assert_eq!(sense_of(&run(&unit, &write16(0, 1), &[0; 512]).await), (0x3, 0x31, 0x03));
    good(run(&unit, &[0u8; 6], &[]).await);
    // EXIT FAILURE MODE takes no parameter list, and is not allowed here;
    // nor is a new sanitize that would allow it.
    assert_eq!(sense_of(&run(&unit, &sanitize_cdb(0x1f, 8), &[0; 8]).await), (0x5, 0x24, 0x00));
    assert_eq!(sense_of(&run(&unit, &sanitize_cdb(0x1f, 0), &[]).await), (0x5, 0x24, 0x00));
    assert_eq!(sense_of(&run(&unit, &overwrite_cdb(0x20 | 0x01), &list).await), (0x5, 0x24, 0x00));
    assert_eq!(sense_of(&run(&unit, &read16(0, 1), &[]).await), (0x3, 0x31, 0x03), "still failed");
    good(run(&unit, &overwrite_cdb(0x01), &list).await);
    assert!(good(run(&unit, &read16(0, 1), &[]).await).iter().all(|&byte| byte == 0x22));
    // Failed with AUSE: EXIT FAILURE MODE ends it.
    device.broken.store(true, Ordering::Relaxed);
    assert_eq!(sense_of(&run(&unit, &overwrite_cdb(0x20 | 0x01), &list).await), (0x3, 0x31, 0x03));
    device.broken.store(false, Ordering::Relaxed);
    assert_eq!(sense_of(&run(&unit, &read16(0, 1), &[]).await), (0x3, 0x31, 0x03));
    good(run(&unit, &sanitize_cdb(0x1f, 0), &[]).await);
    good(run(&unit, &read16(0, 1), &[]).await);
}

#[tokio::test]
async fn sanitize_is_refused_under_software_write_protect_before_anything_is_touched() {
    let device = Gated::new();
    let unit = LogicalUnit::new(device.clone(), 1, "s1");
    fill_ends(&unit).await;
    // MODE SELECT(6) of the control page with SWP set.
    let page = [0u8, 0, 0, 0, 0x0a, 0x0a, 0, 0, 0x08, 0, 0, 0, 0, 0, 0, 0];
    good(run(&unit, &[0x15, 0x10, 0, 0, page.len() as u8, 0], &page).await);
    assert_eq!(sense_of(&run(&unit, &sanitize_cdb(0x02, 0), &[]).await), (0x7, 0x27, 0x02));
    assert_eq!(device.inner.mapped_blocks(), 512, "nothing was erased");
}

#[tokio::test]
async fn a_paced_overwrite_takes_its_time_and_shows_its_progress_meanwhile() {
    let device = Gated::new();
    // 2 MiB at 1 MiB/s, in pieces of 1 MiB: the second may not start before
    // one second has passed.
    let unit = LogicalUnit::new(device.clone(), 1, "s1").with_sanitize_rate(std::num::NonZeroU64::new(1 << 20));
    let list = overwrite(&[0x33]);
    let started = tokio::time::Instant::now();
    good(run(&unit, &sanitize_cdb(0x80 | 0x01, list.len() as u16), &list).await);
    let mut seen_in_progress = 0;
    loop {
        let sense = good(run(&unit, &[0x03, 0, 0, 0, 18, 0], &[]).await);
        let elapsed = started.elapsed();
        if sense[2] & 0x0f == 0 {
            break;
        }
        assert_eq!((sense[2] & 0x0f, sense[12], sense[13]), (0x2, 0x04, 0x1b));
        let progress = u16::from_be_bytes([sense[16], sense[17]]);
        if elapsed < Duration::from_millis(900) {
            assert!(progress <= 32_768, "more than the first piece done after {elapsed:?}: {progress}/65536");
        }
        seen_in_progress += 1;
        assert!(elapsed < Duration::from_secs(30), "the paced sanitize never finished");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(started.elapsed() >= Duration::from_secs(1), "finished in {:?}, faster than its pace", started.elapsed());
    assert!(seen_in_progress > 0);
    let data = good(run(&unit, &read16(0, BLOCKS as u32), &[]).await);
    assert!(data.iter().all(|&byte| byte == 0x33), "a block was not overwritten");
}

/// REPORT SUPPORTED OPERATION CODES for one service action (reporting
/// options 010b): the SUPPORT field.
async fn support_of(unit: &LogicalUnit, opcode: u8, action: u16) -> u8 {
    let mut cdb = [0u8; 12];
    cdb[0] = 0xa3;
    cdb[1] = 0x0c;
    cdb[2] = 0x02;
    cdb[3] = opcode;
    cdb[4..6].copy_from_slice(&action.to_be_bytes());
    cdb[6..10].copy_from_slice(&64u32.to_be_bytes());
    good(run(unit, &cdb, &[]).await)[1] & 0x07
}

/// The Block Device Characteristics page's WABEREQ and WACEREQ byte.
async fn erase_requirements(unit: &LogicalUnit) -> u8 {
    good(run(unit, &[0x12, 0x01, 0xb1, 0, 0x40, 0], &[]).await)[7] & 0xf0
}

#[tokio::test]
async fn crypto_erase_is_offered_and_carried_out_only_by_a_device_that_encrypts() {
    for encrypted in [false, true] {
        let device = Gated::encrypting(encrypted);
        let unit = LogicalUnit::new(device.clone(), 1, "s1");
        let (support, requirements) = (support_of(&unit, 0x48, 0x03).await, erase_requirements(&unit).await);
        let erase = run(&unit, &sanitize_cdb(0x03, 0), &[]).await;
        if encrypted {
            assert_eq!(support, 0x03, "CRYPTO ERASE listed as supported");
            // WABEREQ 01b and WACEREQ 01b: reads after either erase succeed.
            assert_eq!(requirements, 0x50);
            good(erase);
            assert_eq!(device.erased.load(Ordering::SeqCst), 1);
            // No parameter list, as BLOCK ERASE.
            let with_list = run(&unit, &sanitize_cdb(0x03, 8), &[0; 8]).await;
            assert_eq!(sense_of(&with_list), (0x5, 0x24, 0x00));
            assert_eq!(device.erased.load(Ordering::SeqCst), 1);
        } else {
            assert_eq!(support, 0x01, "CRYPTO ERASE not listed");
            assert_eq!(requirements, 0x40);
            assert_eq!(sense_of(&erase), (0x5, 0x24, 0x00));
            // The service action is what is refused, with or without a
            // parameter list.
            let with_list = run(&unit, &sanitize_cdb(0x03, 8), &[0; 8]).await;
            let sense = with_list.sense.as_ref().expect("sense data");
            assert_eq!((sense[15], u16::from_be_bytes([sense[16], sense[17]])), (0x80 | 0x40 | 0x08 | 4, 1));
            assert_eq!(device.erased.load(Ordering::SeqCst), 0);
        }
        // BLOCK ERASE stays offered either way.
        assert_eq!(support_of(&unit, 0x48, 0x02).await, 0x03);
    }
}
