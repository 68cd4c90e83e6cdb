//! A command the storage cannot serve yet (`IoError::Later`: no host serves
//! its data right now) is held by a unit made with a hold and tried again,
//! whole; one that may not be done twice (COMPARE AND WRITE) is not; an
//! abort ends the hold; each try is admitted anew, so a PREEMPT answered
//! while a write waits keeps that write out.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use iscsi::memory::MemoryDevice;
use iscsi::scsi::{BlockDevice, IoError, IoResult, LogicalUnit, Reply};
use iscsi::sense::status;

use crate::shared_reservations::{prout, read10, Shared};

const A: &str = "iqn.2026-11.test:a,i,0x1";
const B: &str = "iqn.2026-11.test:b,i,0x1";
const BLOCKS: u64 = 64;
const HOLD: Duration = Duration::from_secs(30);

/// A memory device that answers `Later` to the next `later` reads and
/// writes (and counts every try).
struct Flaky {
    inner: MemoryDevice,
    later: AtomicU32,
    tries: AtomicU32,
}

impl Flaky {
    fn new(later: u32) -> Arc<Flaky> {
        Arc::new(Flaky {
            inner: MemoryDevice::new(512, BLOCKS),
            later: AtomicU32::new(later),
            tries: AtomicU32::new(0),
        })
    }

    /// Whether this try is answered `Later`.
    fn later(&self) -> bool {
        self.tries.fetch_add(1, Ordering::SeqCst);
        self.later.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| left.checked_sub(1)).is_ok()
    }
}

impl BlockDevice for Flaky {
    fn block_size(&self) -> u32 {
        512
    }
    fn blocks(&self) -> u64 {
        BLOCKS
    }
    fn read(&self, lba: u64, count: u32) -> BoxFuture<'_, IoResult<Bytes>> {
        if self.later() {
            return Box::pin(async { Err(IoError::Later("no owner yet".into())) });
        }
        self.inner.read(lba, count)
    }
    fn write(&self, lba: u64, data: Bytes) -> BoxFuture<'_, IoResult<()>> {
        if self.later() {
            return Box::pin(async { Err(IoError::Later("no owner yet".into())) });
        }
        self.inner.write(lba, data)
    }
    fn unmap(&self, lba: u64, count: u64) -> BoxFuture<'_, IoResult<()>> {
        self.inner.unmap(lba, count)
    }
    fn flush(&self) -> BoxFuture<'_, IoResult<()>> {
        self.inner.flush()
    }
}

fn write10(lba: u32, data: &[u8]) -> ([u8; 10], Vec<u8>) {
    let mut cdb = [0u8; 10];
    cdb[0] = 0x2a;
    cdb[2..6].copy_from_slice(&lba.to_be_bytes());
    cdb[8] = (data.len() / 512) as u8;
    (cdb, data.to_vec())
}

/// (sense key, ASC << 8 | ASCQ) of a CHECK CONDITION.
fn sense_of(reply: &Reply) -> Option<(u8, u16)> {
    let sense = reply.sense.as_ref()?;
    Some((sense[2] & 0x0f, u16::from_be_bytes([sense[12], sense[13]])))
}

#[tokio::test]
async fn a_held_write_is_tried_again_until_the_storage_serves_it() {
    let device = Flaky::new(3);
    let unit = LogicalUnit::new(device.clone(), 1, "held").with_io_hold(HOLD);
    let (cdb, data) = write10(5, &[0x5a; 512]);
    let reply = crate::execute(&unit, A, 1, &cdb, &data).await;
    assert_eq!(reply.status, status::GOOD, "{reply:?}");
    assert_eq!(device.tries.load(Ordering::SeqCst), 4, "three tries answered Later, the fourth served");
    let reply = crate::execute(&unit, A, 1, &read10(5), &[]).await;
    assert_eq!(&reply.data[..], &[0x5a; 512][..]);
}

#[tokio::test]
async fn without_a_hold_the_storage_not_serving_yet_is_not_ready_at_once() {
    let device = Flaky::new(1);
    let unit = LogicalUnit::new(device.clone(), 1, "held");
    let (cdb, data) = write10(5, &[0x5a; 512]);
    let reply = crate::execute(&unit, A, 1, &cdb, &data).await;
    assert_eq!(sense_of(&reply), Some((0x02, 0x040a)), "NOT READY, ASYMMETRIC ACCESS STATE TRANSITION");
    assert_eq!(device.tries.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_hold_that_runs_out_ends_not_ready() {
    let device = Flaky::new(u32::MAX);
    let unit = LogicalUnit::new(device.clone(), 1, "held").with_io_hold(Duration::from_millis(300));
    let reply = tokio::time::timeout(Duration::from_secs(10), crate::execute(&unit, A, 1, &read10(0), &[]))
        .await
        .expect("the hold ran out");
    assert_eq!(sense_of(&reply), Some((0x02, 0x040a)));
    assert!(device.tries.load(Ordering::SeqCst) > 1, "it was tried again before the hold ran out");
}

#[tokio::test]
async fn compare_and_write_is_not_tried_again() {
    let device = Flaky::new(1);
    let unit = LogicalUnit::new(device.clone(), 1, "held").with_io_hold(HOLD);
    let mut cdb = [0u8; 16];
    cdb[0] = 0x89;
    cdb[13] = 4;
    let reply = crate::execute(&unit, A, 1, &cdb, &[0u8; 4096]).await;
    assert_eq!(sense_of(&reply), Some((0x02, 0x040a)), "{reply:?}");
    assert_eq!(device.tries.load(Ordering::SeqCst), 1, "a second try could compare against its own write");
}

#[tokio::test]
async fn an_abort_ends_the_hold() {
    let device = Flaky::new(u32::MAX);
    let unit = LogicalUnit::new(device.clone(), 1, "held").with_io_hold(HOLD);
    let (abort, aborted) = tokio::sync::watch::channel(false);
    let port = iscsi::scsi::Port { target: "iqn.2026-11.test:target".into(), relative_port: 1, group: 1 };
    let nexus = iscsi::pr::Nexus::new(A, 1);
    let cdb = read10(0);
    let command = iscsi::scsi::Command {
        cdb: &cdb,
        data: Bytes::new(),
        nexus: &nexus,
        port: &port,
        luns: &[0],
        expected_length: 512,
    };
    let held = unit.execute_unless_aborted(command, Some(aborted));
    // On this single-threaded runtime the abort lands while the command
    // waits between tries.
    let abort = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let tries = device.tries.load(Ordering::SeqCst);
        abort.send(true).unwrap();
        tries
    };
    // Bounded: the hold is 30 s.
    let (reply, tries) = tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(held, abort) })
        .await
        .expect("the aborted command stopped waiting");
    assert_eq!(sense_of(&reply), Some((0x02, 0x040a)));
    assert!(tries > 1, "it was held");
    assert_eq!(device.tries.load(Ordering::SeqCst), tries, "no try starts once it is aborted");
}

#[tokio::test]
async fn a_write_held_while_its_initiator_is_preempted_never_lands() {
    let device = Flaky::new(0);
    let shared = Arc::new(Shared::default());
    let unit = LogicalUnit::new(device.clone(), 1, "held").with_io_hold(HOLD).with_reservation_store(shared);
    // A and B register; A reserves Write Exclusive - Registrants Only.
    for (nexus, key) in [(A, 0xaaaa), (B, 0xbbbb)] {
        let (cdb, data) = prout(0, 0, 0, key);
        assert_eq!(crate::execute(&unit, nexus, 1, &cdb, &data).await.status, status::GOOD);
    }
    let (cdb, data) = prout(1, 5, 0xaaaa, 0);
    assert_eq!(crate::execute(&unit, A, 1, &cdb, &data).await.status, status::GOOD);
    // A's write finds the storage not serving and waits; B preempts A
    // meanwhile, then the storage serves again.
    device.later.store(u32::MAX, Ordering::SeqCst);
    let (write, block) = write10(9, &[0xa5; 512]);
    let held = crate::execute(&unit, A, 1, &write, &block);
    let preempt = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (cdb, data) = prout(4, 5, 0xbbbb, 0xaaaa);
        let reply = crate::execute(&unit, B, 1, &cdb, &data).await;
        device.later.store(0, Ordering::SeqCst);
        reply
    };
    let (held, preempt) = tokio::join!(held, preempt);
    assert_eq!(preempt.status, status::GOOD, "{preempt:?}");
    assert_ne!(held.status, status::GOOD, "A's write, held across the preempt, must not land: {held:?}");
    let reply = crate::execute(&unit, B, 1, &read10(9), &[]).await;
    assert_eq!(&reply.data[..], &[0u8; 512][..], "the block holds none of A's write");
}
