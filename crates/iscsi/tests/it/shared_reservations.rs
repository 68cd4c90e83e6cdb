//! Two logical units for one volume (two target hosts) sharing their
//! persistent reservations through a `ReservationStore`: what initiator A
//! reserves through one is enforced for initiator B through the other, and
//! stays when A's unit is gone. RESERVE(6) stays per unit.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use iscsi::memory::MemoryDevice;
use iscsi::pr::{Attentions, Change, PrError, ReservationStore, Reservations};
use iscsi::scsi::{LogicalUnit, Reply};
use iscsi::sense::status;

const A: &str = "iqn.2026-11.test:a,i,0x1";
const B: &str = "iqn.2026-11.test:b,i,0x1";

/// The shared copy (the node's store compares and sets on the catalog;
/// one lock does here).
#[derive(Default)]
pub(crate) struct Shared {
    state: Mutex<Arc<Reservations>>,
}

impl ReservationStore for Shared {
    fn load(&self) -> Arc<Reservations> {
        self.state.lock().unwrap().clone()
    }

    fn update<'a>(&'a self, change: &'a Change<'a>) -> BoxFuture<'a, Result<Result<Attentions, PrError>, String>> {
        Box::pin(async move {
            let mut state = self.state.lock().unwrap();
            let mut next = (**state).clone();
            let result = change(&mut next);
            if result.is_ok() {
                *state = Arc::new(next);
            }
            Ok(result)
        })
    }
}

pub(crate) fn prout(action: u8, kind: u8, key: u64, service_key: u64) -> ([u8; 10], [u8; 24]) {
    let mut cdb = [0u8; 10];
    cdb[0] = 0x5f;
    cdb[1] = action;
    cdb[2] = kind;
    cdb[8] = 24;
    let mut data = [0u8; 24];
    data[0..8].copy_from_slice(&key.to_be_bytes());
    data[8..16].copy_from_slice(&service_key.to_be_bytes());
    (cdb, data)
}

fn write10(lba: u32) -> [u8; 10] {
    let mut cdb = [0u8; 10];
    cdb[0] = 0x2a;
    cdb[2..6].copy_from_slice(&lba.to_be_bytes());
    cdb[8] = 1;
    cdb
}

pub(crate) fn read10(lba: u32) -> [u8; 10] {
    let mut cdb = [0u8; 10];
    cdb[0] = 0x28;
    cdb[2..6].copy_from_slice(&lba.to_be_bytes());
    cdb[8] = 1;
    cdb
}

/// Answers unit attentions (each unit tells its nexuses once) until `cdb` gets a real answer.
async fn settle(unit: &LogicalUnit, nexus: &str, port: u16, cdb: &[u8], data: &[u8]) -> Reply {
    for _ in 0..8 {
        let reply = crate::execute(unit, nexus, port, cdb, data).await;
        let attention = reply.status == status::CHECK_CONDITION
            && reply.sense.as_ref().is_some_and(|sense| sense[2] & 0x0f == 0x06);
        if !attention {
            return reply;
        }
    }
    panic!("unit attentions never ended");
}

#[tokio::test]
async fn a_reservation_taken_through_one_host_is_enforced_through_another_and_outlives_the_first() {
    let device = Arc::new(MemoryDevice::new(512, 1024));
    let shared = Arc::new(Shared::default());
    let host1 = LogicalUnit::new(device.clone(), 7, "vol").with_reservation_store(shared.clone());
    let host2 = LogicalUnit::new(device.clone(), 7, "vol").with_reservation_store(shared.clone());
    let block = vec![0x5a; 512];
    // A registers for every target port (ALL_TG_PT) and reserves Write
    // Exclusive - Registrants Only (type 5) through host 1.
    let (cdb, mut data) = prout(0, 0, 0, 0xaaaa);
    data[20] = 0x04;
    assert_eq!(settle(&host1, A, 1, &cdb, &data).await.status, status::GOOD);
    let (cdb, data) = prout(1, 5, 0xaaaa, 0);
    assert_eq!(settle(&host1, A, 1, &cdb, &data).await.status, status::GOOD);
    // B, not registered, writes through host 2: conflict; it may read.
    let reply = settle(&host2, B, 2, &write10(0), &block).await;
    assert_eq!(reply.status, status::RESERVATION_CONFLICT, "{reply:?}");
    assert_eq!(settle(&host2, B, 2, &read10(0), &[]).await.status, status::GOOD);
    // A writes through host 2 (another path, covered by its registration): allowed.
    assert_eq!(settle(&host2, A, 2, &write10(0), &block).await.status, status::GOOD);
    // Host 1 is gone; the reservation holds through host 2.
    drop(host1);
    let reply = settle(&host2, B, 2, &write10(1), &block).await;
    assert_eq!(reply.status, status::RESERVATION_CONFLICT, "{reply:?}");
    let holder = shared.load().reservation.clone().expect("still reserved");
    assert_eq!((holder.holder.initiator.as_str(), holder.holder.port, holder.kind), (A, 1, 5));
    // B registers through host 2 and may then write (registrants only).
    let (cdb, data) = prout(0, 0, 0, 0xbbbb);
    assert_eq!(settle(&host2, B, 2, &cdb, &data).await.status, status::GOOD);
    assert_eq!(settle(&host2, B, 2, &write10(1), &block).await.status, status::GOOD);
    // RESERVE(6) is per host (it ends with its nexus, at once): held by A
    // through host 2, B conflicts there but not through another host.
    let host3 = LogicalUnit::new(device, 7, "vol").with_reservation_store(shared.clone());
    let (cdb, data) = prout(2, 5, 0xaaaa, 0);
    assert_eq!(settle(&host2, A, 2, &cdb, &data).await.status, status::GOOD, "release");
    for (nexus, key) in [(A, 0xaaaa), (B, 0xbbbb)] {
        let (cdb, data) = prout(0, 0, key, 0);
        assert_eq!(settle(&host2, nexus, 2, &cdb, &data).await.status, status::GOOD, "unregister");
    }
    assert!(shared.load().registrations.is_empty());
    let reserve6 = [0x16, 0, 0, 0, 0, 0];
    assert_eq!(settle(&host2, A, 2, &reserve6, &[]).await.status, status::GOOD);
    let reply = settle(&host2, B, 2, &read10(0), &[]).await;
    assert_eq!(reply.status, status::RESERVATION_CONFLICT, "{reply:?}");
    assert_eq!(settle(&host3, B, 3, &read10(0), &[]).await.status, status::GOOD);
    // A persistent registration conflicts with RESERVE(6) on every host.
    let (cdb, data) = prout(0, 0, 0, 0xcccc);
    assert_eq!(settle(&host3, B, 3, &cdb, &data).await.status, status::GOOD, "B registers through host 3");
    assert_eq!(settle(&host3, B, 3, &reserve6, &[]).await.status, status::RESERVATION_CONFLICT);
}

/// The unit attention `reply` reports, if any: (asc, ascq).
fn attention(reply: &Reply) -> Option<(u8, u8)> {
    let sense = reply.sense.as_ref().filter(|_| reply.status == status::CHECK_CONDITION)?;
    (sense[2] & 0x0f == 0x06).then(|| (sense[12], sense[13]))
}

#[tokio::test]
async fn unit_attentions_reach_the_nexuses_of_other_hosts() {
    const TEST_UNIT_READY: [u8; 6] = [0; 6];
    let device = Arc::new(MemoryDevice::new(512, 1024));
    let shared = Arc::new(Shared::default());
    let host1 = LogicalUnit::new(device.clone(), 7, "vol").with_reservation_store(shared.clone());
    let host2 = LogicalUnit::new(device, 7, "vol").with_reservation_store(shared.clone());
    // A's sessions reach host 1, B's host 2.
    assert_eq!(settle(&host1, A, 1, &TEST_UNIT_READY, &[]).await.status, status::GOOD);
    assert_eq!(settle(&host2, B, 2, &TEST_UNIT_READY, &[]).await.status, status::GOOD);
    // A logical unit reset through host 1 is news on every nexus, on both hosts, once each.
    host1.reset(1).await;
    for (unit, nexus, port) in [(&host1, A, 1), (&host2, B, 2)] {
        let reply = crate::execute(unit, nexus, port, &TEST_UNIT_READY, &[]).await;
        assert_eq!(attention(&reply), Some((0x29, 0x03)), "{nexus} through host {port}: {reply:?}");
        let reply = crate::execute(unit, nexus, port, &TEST_UNIT_READY, &[]).await;
        assert_eq!(reply.status, status::GOOD, "told once: {reply:?}");
    }
    // A registers and reserves through host 1; B registers through host 2
    // and preempts A there: A, on host 1, learns its registration is gone.
    let (cdb, data) = prout(0, 0, 0, 0xaaaa);
    assert_eq!(settle(&host1, A, 1, &cdb, &data).await.status, status::GOOD);
    let (cdb, data) = prout(1, 1, 0xaaaa, 0);
    assert_eq!(settle(&host1, A, 1, &cdb, &data).await.status, status::GOOD);
    let (cdb, data) = prout(0, 0, 0, 0xbbbb);
    assert_eq!(settle(&host2, B, 2, &cdb, &data).await.status, status::GOOD);
    let (cdb, data) = prout(4, 3, 0xbbbb, 0xaaaa);
    assert_eq!(settle(&host2, B, 2, &cdb, &data).await.status, status::GOOD, "B preempts A");
    let reply = crate::execute(&host1, A, 1, &TEST_UNIT_READY, &[]).await;
    assert_eq!(attention(&reply), Some((0x2a, 0x05)), "REGISTRATIONS PREEMPTED for A: {reply:?}");
    // B holds Exclusive Access now: A, unregistered, conflicts.
    let reply = settle(&host1, A, 1, &read10(0), &[]).await;
    assert_eq!(reply.status, status::RESERVATION_CONFLICT, "{reply:?}");
    // B's own nexus was not told about its own change.
    assert_eq!(crate::execute(&host2, B, 2, &TEST_UNIT_READY, &[]).await.status, status::GOOD);
}

/// A store whose host has lost touch with the shared state.
struct CutOff(Shared);

impl ReservationStore for CutOff {
    fn load(&self) -> Arc<Reservations> {
        self.0.load()
    }

    fn update<'a>(&'a self, change: &'a Change<'a>) -> BoxFuture<'a, Result<Result<Attentions, PrError>, String>> {
        self.0.update(change)
    }

    fn current(&self) -> bool {
        false
    }
}

#[tokio::test]
async fn a_host_that_cannot_vouch_for_the_shared_reservations_refuses_what_they_govern() {
    let unit = LogicalUnit::new(Arc::new(MemoryDevice::new(512, 1024)), 7, "vol")
        .with_reservation_store(Arc::new(CutOff(Shared::default())));
    let in_transition = |reply: &Reply| {
        let sense = reply.sense.as_ref().expect("sense");
        (reply.status, sense[2] & 0x0f, sense[12], sense[13])
    };
    // Unused reservations govern nothing: served while cut off.
    assert_eq!(settle(&unit, A, 1, &write10(0), &[0; 512]).await.status, status::GOOD);
    // B registers (PERSISTENT RESERVE OUT goes to the shared state itself).
    let (cdb, data) = prout(0, 0, 0, 0xbbbb);
    assert_eq!(settle(&unit, B, 1, &cdb, &data).await.status, status::GOOD);
    for cdb in [&write10(0)[..], &read10(0)[..], &[0x5e, 0, 0, 0, 0, 0, 0, 0, 64, 0][..]] {
        let reply = settle(&unit, A, 1, cdb, &[0; 512]).await;
        assert_eq!(in_transition(&reply), (status::CHECK_CONDITION, 0x02, 0x04, 0x0a), "{cdb:?}: {reply:?}");
    }
    // What reservations do not govern is answered: INQUIRY, TEST UNIT READY.
    assert_eq!(settle(&unit, A, 1, &[0x12, 0, 0, 0, 96, 0], &[]).await.status, status::GOOD);
    assert_eq!(settle(&unit, A, 1, &[0; 6], &[]).await.status, status::GOOD);
}

#[tokio::test]
async fn a_preempt_is_answered_only_after_the_preempted_writes_admitted_before_it() {
    let device = crate::sanitize::Gated::new();
    let unit = Arc::new(LogicalUnit::new(device.clone(), 7, "vol").with_reservation_store(Arc::new(Shared::default())));
    for (nexus, key) in [(A, 0xaaaa), (B, 0xbbbb)] {
        let (cdb, data) = prout(0, 0, 0, key);
        assert_eq!(settle(&unit, nexus, 1, &cdb, &data).await.status, status::GOOD, "{nexus} registers");
    }
    // A holds Write Exclusive - Registrants Only: B, registered, may write.
    let (cdb, data) = prout(1, 5, 0xaaaa, 0);
    assert_eq!(settle(&unit, A, 1, &cdb, &data).await.status, status::GOOD, "A reserves");
    // B's write is admitted and held in the device.
    device.held.send_replace(true);
    let writing = {
        let unit = unit.clone();
        tokio::spawn(async move { crate::execute(&unit, B, 1, &write10(0), &[0x5b; 512]).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    // A preempts B: B's registration goes, so it may write no more.
    let preempting = {
        let unit = unit.clone();
        tokio::spawn(async move {
            let (cdb, data) = prout(4, 5, 0xaaaa, 0xbbbb);
            crate::execute(&unit, A, 1, &cdb, &data).await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!preempting.is_finished(), "the PREEMPT was answered while B's write was still under way");
    device.held.send_replace(false);
    assert_eq!(writing.await.unwrap().status, status::GOOD, "B's write, admitted before, completes");
    assert_eq!(preempting.await.unwrap().status, status::GOOD);
    // After it, B's writes conflict.
    let reply = settle(&unit, B, 1, &write10(1), &[0x5b; 512]).await;
    assert_eq!(reply.status, status::RESERVATION_CONFLICT, "{reply:?}");
}
