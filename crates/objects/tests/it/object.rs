//! An object with three copies on three component services (real TCP on
//! loopback): a copy goes away under writes, comes back, and is resynced
//! from a tracking bitmap; every copy ends identical, and the resync copies
//! only what changed while it was away.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockstore::{Disk, DiskConfig, BLOCK_SIZE};
use bytes::Bytes;
use objects::component::{Client, Request, Service};
use objects::object::{Admission, Hooks, Object, ResyncJob};
use objects::owner::Status;
use wire::tcp::TcpTransport;
use wire::{ErrorCode, RemoteError, Transport};

pub(crate) const BLOCKS: u64 = 256;

pub(crate) struct Host {
    /// The component it holds.
    pub(crate) id: u64,
    pub(crate) service: Arc<Service>,
    pub(crate) online: Arc<AtomicBool>,
    pub(crate) client: Client<TcpTransport>,
    handle: Option<wire::ServeHandle>,
}

impl Host {
    /// Stops serving and closes every connection, as a host that died
    /// does: calls to it go unanswered (refused connections), where an
    /// offline host (`online`) answers each with an error.
    pub(crate) fn die(&mut self) {
        self.handle.take().expect("serving").stop();
    }
}

/// A component service whose host can be taken off the network.
async fn host(dir: &std::path::Path, transport: &TcpTransport) -> Host {
    let disk = Disk::open(fsio::real(), dir, DiskConfig::default()).unwrap();
    let service = Service::new(vec![disk]);
    let online = Arc::new(AtomicBool::new(true));
    let (handler, up) = (service.clone(), online.clone());
    let handle = transport
        .serve(
            "127.0.0.1:0",
            Arc::new(move |request| {
                let (handler, up) = (handler.clone(), up.clone());
                async move {
                    if !up.load(Ordering::SeqCst) {
                        return Err(RemoteError::new(ErrorCode::Unavailable, "host is down"));
                    }
                    handler.handle(request).await
                }
            }),
        )
        .await
        .unwrap();
    let client = Client::new(transport.clone(), handle.local_address.clone());
    Host { id: 0, service, online, client, handle: Some(handle) }
}

/// `count` hosts, host `i` holding component `first + i` of `BLOCKS`
/// blocks.
pub(crate) async fn hosts(dir: &std::path::Path, transport: &TcpTransport, count: usize, first: u64) -> Vec<Host> {
    let mut hosts = Vec::new();
    for index in 0..count {
        let mut host = host(&dir.join(format!("host{index}")), transport).await;
        host.id = first + index as u64;
        host.client.call(1, Request::Create { component: host.id, disk: 0, blocks: BLOCKS }, &[]).await.unwrap();
        hosts.push(host);
    }
    hosts
}

pub(crate) fn components(hosts: &[Host]) -> Vec<(u64, Client<TcpTransport>)> {
    hosts.iter().map(|host| (host.id, host.client.clone())).collect()
}

/// A block that says which block it is and which pass wrote it.
fn pattern(block: u64, pass: u64) -> Vec<u8> {
    let mut data = vec![0u8; BLOCK_SIZE];
    for (index, word) in data.chunks_mut(8).enumerate() {
        word.copy_from_slice(&(block << 32 | pass << 16 | index as u64).to_le_bytes());
    }
    data
}

async fn write(object: &Arc<Object<TcpTransport>>, first: u64, count: u64, pass: u64) {
    let data: Vec<u8> = (first..first + count).flat_map(|block| pattern(block, pass)).collect();
    object.write_at(first * BLOCK_SIZE as u64, Bytes::from(data)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_that_was_away_is_resynced_from_its_tracking_bitmap() {
    let dir = tempfile::tempdir().unwrap();
    let transport = TcpTransport::new();
    let hosts = hosts(dir.path(), &transport, 3, 100).await;
    let components = components(&hosts);
    let object = Object::open(1, BLOCKS, components, 0);
    write(&object, 0, BLOCKS, 1).await;

    // Host 2 goes away; writes go on with two copies.
    hosts[2].online.store(false, Ordering::SeqCst);
    let mut written_while_away = 0;
    for pass in 2..6u64 {
        let first = pass * 20;
        write(&object, first, 8, pass).await;
        written_while_away += 8;
    }
    assert!(matches!(object.statuses()[2], Status::Absent { .. }), "{:?}", object.statuses());
    assert_eq!(object.statuses()[..2], [Status::Active, Status::Active]);

    // It comes back and is resynced while writes go on.
    hosts[2].online.store(true, Ordering::SeqCst);
    assert!(object.probe(2).await);
    // Written before the copy is current again: it counts as changed while
    // it was away (the resync may copy it rather than wait for it).
    write(&object, 200, 4, 9).await;
    written_while_away += 4;
    let deadline = Instant::now() + Duration::from_secs(20);
    while object.statuses() != vec![Status::Active; 3] {
        assert!(Instant::now() < deadline, "resync did not finish: {:?}", object.statuses());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let copied = object.resync_stats.blocks_copied.load(Ordering::Relaxed);
    println!("resync copied {copied} blocks for {written_while_away} written until the copy was current again");
    assert_eq!(object.resync_stats.full_copies.load(Ordering::Relaxed), 0);
    assert!(copied <= written_while_away * 11 / 10, "copied {copied} for {written_while_away} written");

    // Every copy holds the same, and what was written last.
    let mut expected: Vec<u8> = (0..BLOCKS).flat_map(|block| pattern(block, 1)).collect();
    for pass in 2..6u64 {
        for block in pass * 20..pass * 20 + 8 {
            let at = block as usize * BLOCK_SIZE;
            expected[at..at + BLOCK_SIZE].copy_from_slice(&pattern(block, pass));
        }
    }
    for block in 200..204 {
        let at = block as usize * BLOCK_SIZE;
        expected[at..at + BLOCK_SIZE].copy_from_slice(&pattern(block, 9));
    }
    for (index, host) in hosts.iter().enumerate() {
        let id = host.id;
        let mut held = Vec::new();
        for first in (0..BLOCKS).step_by(64) {
            held.extend_from_slice(&host.client.read(1, id, first, 64).await.unwrap());
        }
        assert!(held == expected, "copy {index} differs");
        let info = host.service.disks()[0].component(id).unwrap();
        assert!(info.sync.is_none(), "copy {index} still resyncing: {info:?}");
    }
    assert_eq!(
        &object.read_at(20 * BLOCK_SIZE as u64, 4096).await.unwrap()[..],
        &expected[20 * BLOCK_SIZE..21 * BLOCK_SIZE]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_corrupted_on_disk_is_detected_repaired_from_another_copy_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let transport = TcpTransport::new();
    let hosts = hosts(dir.path(), &transport, 2, 200).await;
    let components = components(&hosts);
    let object = Object::open(1, BLOCKS, components, 0);
    write(&object, 0, 16, 1).await;
    // Flip a bit of block 5 in copy 0's data file, under the store.
    let path = dir.path().join("host0").join("c-200.data");
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
    use std::os::unix::fs::FileExt;
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, 5 * BLOCK_SIZE as u64 + 100).unwrap();
    file.write_all_at(&[byte[0] ^ 0x10], 5 * BLOCK_SIZE as u64 + 100).unwrap();
    assert!(hosts[0].client.read(1, 200, 5, 1).await.is_err(), "the corruption is not seen by the store");

    // The read detects it, answers from the other copy, and repairs it.
    let data = object.read_at(0, 16 * BLOCK_SIZE as u64).await.unwrap();
    let expected: Vec<u8> = (0..16).flat_map(|block| pattern(block, 1)).collect();
    assert!(data[..] == expected[..], "the read returned wrong data");
    assert_eq!(object.resync_stats.blocks_repaired.load(Ordering::Relaxed), 1, "the repair was not reported");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match hosts[0].client.read(1, 200, 5, 1).await {
            Ok(block) if block[..] == pattern(5, 1)[..] => break,
            other => {
                assert!(Instant::now() < deadline, "copy 0 was not repaired: {other:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Held while a resync copies; says when it is let go.
struct Turn(Arc<AtomicBool>);

impl Drop for Turn {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_copies_only_once_admitted_and_gives_its_turn_back_when_done() {
    let dir = tempfile::tempdir().unwrap();
    let transport = TcpTransport::new();
    let hosts = hosts(dir.path(), &transport, 2, 100).await;
    // The gate opens when the test says so; it records what asked.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let released = Arc::new(AtomicBool::new(false));
    let admission: Admission = {
        let (gate, asked, released) = (gate.clone(), asked.clone(), released.clone());
        Arc::new(move |job: ResyncJob| {
            asked.lock().unwrap().push(job);
            let (gate, released) = (gate.clone(), released.clone());
            Box::pin(async move {
                gate.acquire_owned().await.unwrap().forget();
                Box::new(Turn(released)) as Box<dyn Send>
            })
        })
    };
    let components = components(&hosts);
    let hooks = Hooks { admission: Some(admission), ..Hooks::default() };
    let object = Object::recover(1, BLOCKS, components, vec![Status::Active; 2], hooks).await.unwrap();
    write(&object, 0, 16, 1).await;
    hosts[1].online.store(false, Ordering::SeqCst);
    write(&object, 0, 16, 2).await;
    assert!(matches!(object.statuses()[1], Status::Absent { .. }), "{:?}", object.statuses());
    hosts[1].online.store(true, Ordering::SeqCst);
    assert!(object.probe(1).await);

    // Not admitted: nothing is copied, however long it waits.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(matches!(object.statuses()[1], Status::Resyncing { .. }), "{:?}", object.statuses());
    assert_eq!(object.resync_stats.blocks_copied.load(Ordering::Relaxed), 0);
    assert_eq!(*asked.lock().unwrap(), vec![ResyncJob { epoch: 1, component: 1, plan: (1 << 32) + 1 }]);

    gate.add_permits(1);
    let deadline = Instant::now() + Duration::from_secs(20);
    while object.statuses() != vec![Status::Active; 2] {
        assert!(Instant::now() < deadline, "resync did not finish once admitted: {:?}", object.statuses());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(object.resync_stats.blocks_copied.load(Ordering::Relaxed), 16);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !released.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "the resync kept its turn after it ended");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let copy: Vec<u8> = hosts[1].client.read(1, 101, 0, 16).await.unwrap().to_vec();
    assert!(copy == (0..16).flat_map(|block| pattern(block, 2)).collect::<Vec<u8>>(), "the copy is not current");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_owner_keeps_when_a_copy_recorded_away_went_away() {
    // The repair delay counts from there: an ownership move must not
    // restart it.
    let dir = tempfile::tempdir().unwrap();
    let transport = TcpTransport::new();
    let hosts = hosts(dir.path(), &transport, 2, 100).await;
    hosts[1].online.store(false, Ordering::SeqCst);
    let components = components(&hosts);
    let recorded = vec![Status::Active, Status::Absent { stale: 0, since: 1234 }];
    let object = Object::recover(2, BLOCKS, components, recorded, Hooks::default()).await.unwrap();
    assert!(matches!(object.statuses()[1], Status::Absent { since: 1234, .. }), "{:?}", object.statuses());
}

/// Owner and component threads as a node runs them: a copy on the owner's
/// own host is served in place (no request reaches its component thread's
/// socket), reads prefer it over a remote copy listed first, and what was
/// written is on both copies.
#[test]
fn a_copy_on_the_owners_host_is_served_in_place_and_read_first() {
    use objects::threads::{ComponentThreads, OwnerThreads};
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let owner_threads = OwnerThreads::start(1, None).unwrap();
    // This host's disk, behind its component thread.
    let disk = Disk::open(fsio::real(), &dir.path().join("local"), DiskConfig::default()).unwrap();
    let local_service = Service::new(vec![disk]);
    let local_threads =
        ComponentThreads::start(local_service.clone(), "127.0.0.1", 1, owner_threads.local_handlers()).unwrap();
    let local_address = local_threads.addresses()[0].clone();
    runtime.block_on(async {
        // Another host's copy, counting the requests it gets.
        let remote = host(&dir.path().join("remote"), &TcpTransport::new()).await;
        let remote_requests = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = remote_requests.clone();
        let remote_service = remote.service.clone();
        let counting = TcpTransport::new()
            .serve(
                "127.0.0.1:0",
                Arc::new(move |request| {
                    counted.fetch_add(1, Ordering::SeqCst);
                    let service = remote_service.clone();
                    async move { service.handle(request).await }
                }),
            )
            .await
            .unwrap();
        let remote_address = counting.local_address.clone();
        let local_id = 7;
        let remote_id = 8;
        let (object, written) = owner_threads
            .run(0, move |transport| async move {
                assert!(transport.serves_in_place(&local_address));
                assert!(!transport.serves_in_place(&remote_address));
                let remote = Client::new(transport.clone(), remote_address);
                let local = Client::new(transport, local_address);
                remote.call(1, Request::Create { component: remote_id, disk: 0, blocks: BLOCKS }, &[]).await.unwrap();
                local.call(1, Request::Create { component: local_id, disk: 0, blocks: BLOCKS }, &[]).await.unwrap();
                // The remote copy is listed first.
                let object = Object::open(1, BLOCKS, vec![(remote_id, remote), (local_id, local)], 0);
                write(&object, 0, 16, 1).await;
                let written: Vec<u8> = (0..16).flat_map(|block| pattern(block, 1)).collect();
                (object, written)
            })
            .await
            .unwrap();
        let before = remote_requests.load(Ordering::SeqCst);
        assert!(before >= 2, "the remote copy got the create and the write: {before}");
        for _ in 0..10 {
            let object = object.clone();
            let read = owner_threads
                .run(0, move |_| async move { object.read_at(0, 16 * BLOCK_SIZE as u64).await.unwrap() })
                .await
                .unwrap();
            assert!(read[..] == written[..]);
        }
        assert_eq!(remote_requests.load(Ordering::SeqCst), before, "a read went to the remote copy");
        // The local copy holds the writes, though its thread never saw a request.
        assert_eq!(local_threads.stats()[0].total.load(Ordering::Relaxed), 0);
        assert!(local_service.disks()[0].read(local_id, 0, 16).unwrap()[..] == written[..]);
        assert!(remote.service.disks()[0].read(remote_id, 0, 16).unwrap()[..] == written[..]);
        counting.stop();
    });
    local_threads.stop();
}

/// A new owner never reuses an older owner's resync plan: a component told
/// to begin the plan it already has keeps that plan's progress, whose
/// synchronization bitmap marks the blocks it then skips. Before plans were
/// numbered per owner, a new owner's first plan was 1 again, the copy kept
/// the old bitmap, and a block an in-flight write of the dead owner had
/// reached on that copy alone was never copied over (the scenario
/// `an_owner_restarted_mid_resync_still_copies_no_more` saw replicas differ
/// in 1-4 blocks about one run in eight).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_owner_begins_a_fresh_resync_plan_on_a_copy_the_old_owner_was_resyncing() {
    let dir = tempfile::tempdir().unwrap();
    let transport = TcpTransport::new();
    let hosts = hosts(dir.path(), &transport, 3, 100).await;
    // Resyncs begin but never get their turn to copy.
    let never: Admission = Arc::new(|_| Box::pin(std::future::pending::<Box<dyn Send>>()));
    let hooks = Hooks { admission: Some(never.clone()), ..Hooks::default() };
    let old = Object::recover(1, BLOCKS, components(&hosts), vec![Status::Active; 3], hooks).await.unwrap();
    write(&old, 0, 16, 1).await;
    hosts[2].online.store(false, Ordering::SeqCst);
    write(&old, 0, 8, 2).await;
    hosts[2].online.store(true, Ordering::SeqCst);
    assert!(old.probe(2).await);
    // Written during the old owner's resync: the copy marks them done.
    write(&old, 100, 10, 3).await;
    let sync = |info: blockstore::ComponentInfo| info.sync;
    // A write is answered once the active copies have it; the resyncing
    // copy's BeginSync and writes may still be on their way.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let done = sync(hosts[2].client.info(1, 102).await.unwrap()).map(|sync| sync.2);
        if done == Some(10) {
            break;
        }
        assert!(Instant::now() < deadline, "the old owner's plan marks the 10 blocks written during it: {done:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let recorded = old.statuses();
    assert!(matches!(recorded[2], Status::Resyncing { .. }), "{recorded:?}");
    old.close();

    let hooks = Hooks { admission: Some(never), ..Hooks::default() };
    let new = Object::recover(2, BLOCKS, components(&hosts), recorded, hooks).await.unwrap();
    assert!(matches!(new.statuses()[2], Status::Resyncing { .. }), "{:?}", new.statuses());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let done = sync(hosts[2].client.info(2, 102).await.unwrap()).expect("resyncing").2;
        if done == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the new owner's resync kept the old plan's {done} blocks done");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Two hosts with one copy each, and the object's first owner (epoch 1).
async fn two_copies_and_a_first_owner(dir: &std::path::Path) -> (Vec<Host>, Arc<Object<TcpTransport>>) {
    let hosts = hosts(dir, &TcpTransport::new(), 2, 100).await;
    let first = Object::open(1, BLOCKS, components(&hosts), 0);
    (hosts, first)
}

/// An owner cut off with one copy (host 0) writes LSN 2 there after a new
/// owner, which could not reach that copy, wrote its own LSN 2 to the
/// other copy and answered it done. The next owner finds both copies
/// recorded away, host 0's at LSN 1: it takes host 1's for current, and
/// host 0's copy is resynced from LSN 1, not taken for holding LSN 2
/// already (the deposed owner's write would stay there for good, and
/// come back whenever that copy is read or copied from).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_recorded_away_is_resynced_from_its_stale_lsn_over_a_deposed_owners_write_under_a_later_lsn() {
    let dir = tempfile::tempdir().unwrap();
    let (hosts, first) = two_copies_and_a_first_owner(dir.path()).await;
    write(&first, 0, 1, 1).await;
    hosts[0].online.store(false, Ordering::SeqCst);
    let recorded = vec![Status::Active, Status::Active];
    let second = Object::recover(2, BLOCKS, components(&hosts), recorded, Hooks::default()).await.unwrap();
    write(&second, 0, 1, 2).await;
    drop(second);
    // The first owner, deposed but cut off with host 0, writes there.
    hosts[0].online.store(true, Ordering::SeqCst);
    let late = Request::Write { component: hosts[0].id, lsn: 2, first: 0, settled: 0 };
    hosts[0].client.call(1, late, &pattern(0, 9)).await.expect("the deposed owner's write on its cut-off copy");
    drop(first);
    let recorded = vec![Status::Absent { stale: 1, since: 0 }, Status::Absent { stale: 2, since: 0 }];
    let third = Object::recover(3, BLOCKS, components(&hosts), recorded, Hooks::default()).await.unwrap();
    assert!(
        matches!(third.statuses()[0], Status::Absent { stale: 1, .. } | Status::Resyncing { stale: 1, .. }),
        "{:?}",
        third.statuses()
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while third.statuses() != vec![Status::Active; 2] {
        assert!(Instant::now() < deadline, "resync did not finish: {:?}", third.statuses());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (index, host) in hosts.iter().enumerate() {
        let held = host.client.read(3, host.id, 0, 1).await.unwrap();
        assert!(held[..] == pattern(0, 2)[..], "copy {index} does not hold the write answered done");
    }
}

/// A copy that does not answer a new owner is recorded away no higher than
/// the stale LSN it was recorded at before: the lower bound of the writes
/// in flight (the committed LSN less `INFLIGHT_MAX`) can be above it, and
/// above the LSNs a deposed owner cut off with it may have written there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_that_does_not_answer_a_new_owner_stays_recorded_at_its_stale_lsn() {
    let dir = tempfile::tempdir().unwrap();
    let (hosts, first) = two_copies_and_a_first_owner(dir.path()).await;
    write(&first, 0, 1, 1).await;
    hosts[0].online.store(false, Ordering::SeqCst);
    for pass in 2..300 {
        write(&first, pass % BLOCKS, 1, pass).await;
    }
    drop(first);
    let recorded = vec![Status::Absent { stale: 1, since: 0 }, Status::Active];
    let second = Object::recover(2, BLOCKS, components(&hosts), recorded, Hooks::default()).await.unwrap();
    assert!(matches!(second.statuses()[0], Status::Absent { stale: 1, .. }), "{:?}", second.statuses());
}

/// A copy recorded active that does not answer a new owner holds every
/// write answered done before that owner opened (a write is answered only
/// once every copy recorded active holds it). If the other copy fails
/// before the new owner answers any write, and this one comes back, it is
/// the copy of record: the object takes I/O again with every write
/// answered done (it was counted only up to the writes that could have
/// been in flight, and waited for a copy that might never return). Once
/// the new owner has answered a write, which it lacks, or served a read,
/// whose data it may lack, it waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_recorded_active_that_missed_the_new_owners_open_is_its_copy_of_record_until_it_serves_anything() {
    for since_open in ["nothing", "a write", "a read"] {
        let dir = tempfile::tempdir().unwrap();
        let (hosts, first) = two_copies_and_a_first_owner(dir.path()).await;
        // Above `INFLIGHT_MAX` writes: a copy that does not answer counts
        // only up to the committed LSN less that.
        for pass in 1..300 {
            write(&first, pass % BLOCKS, 1, pass).await;
        }
        drop(first);
        hosts[0].online.store(false, Ordering::SeqCst);
        let recorded = vec![Status::Active, Status::Active];
        let second = Object::recover(2, BLOCKS, components(&hosts), recorded, Hooks::default()).await.unwrap();
        assert!(matches!(second.statuses()[0], Status::Absent { .. }), "{:?}", second.statuses());
        match since_open {
            "a write" => write(&second, 5, 1, 1000).await,
            "a read" => drop(second.read_at(0, BLOCK_SIZE as u64).await.unwrap()),
            _ => {}
        }
        hosts[1].online.store(false, Ordering::SeqCst);
        hosts[0].online.store(true, Ordering::SeqCst);
        let refused = second.write_at(0, Bytes::from(pattern(0, 2000))).await;
        assert!(refused.is_err(), "a write with no copy reachable: {refused:?}");
        // A read finding no copy to read serves nothing.
        assert!(second.read_at(0, BLOCK_SIZE as u64).await.is_err(), "a read with no copy reachable");
        assert!(matches!(second.statuses()[1], Status::Absent { .. }), "{:?}", second.statuses());
        let taken = second.probe(0).await;
        if since_open != "nothing" {
            assert!(!taken, "a copy that may lack data answered since the open became the copy of record");
            assert!(matches!(second.statuses()[0], Status::Absent { .. }), "{:?}", second.statuses());
            continue;
        }
        assert!(taken, "the copy holding every write answered done was not taken back");
        assert_eq!(second.statuses()[0], Status::Active);
        for pass in 280..300 {
            let block = pass % BLOCKS;
            let held = second.read_at(block * BLOCK_SIZE as u64, BLOCK_SIZE as u64).await.unwrap();
            assert!(held[..] == pattern(block, pass)[..], "block {block} lost the write answered done");
        }
        write(&second, 7, 1, 3000).await;
    }
}

/// An owner hands its object over (`close_when_idle`) while chains of
/// compare-and-writes run, one chain per block, each writing the next
/// number over the last. Every compare-and-write under way is answered
/// done before the object closes; every later one is answered `Deposed`
/// with nothing written: none ends of unknown outcome, as one under way
/// when an owner is deposed does. The next owner reads each block as its
/// chain's last answered write left it, and hands over in turn: three
/// owners (the writes take turns, so one is under way at a time: each
/// handover catches one under way most of the time, not always).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_handing_over_answers_the_compare_and_writes_under_way_and_writes_none_of_those_held_back() {
    use objects::object::ObjectError;
    const CHAINS: u64 = 16;
    let numbered = |number: u64| {
        let mut data = vec![0u8; 512];
        data[..8].copy_from_slice(&number.to_le_bytes());
        data
    };
    let dir = tempfile::tempdir().unwrap();
    let (hosts, mut owner) = two_copies_and_a_first_owner(dir.path()).await;
    // Blocks start as zeros: number 0.
    let mut numbers = vec![0u64; CHAINS as usize];
    for epoch in 2..=4 {
        let answered = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let chains: Vec<_> = (0..CHAINS)
            .map(|block| {
                let (object, answered) = (owner.clone(), answered.clone());
                let mut number = numbers[block as usize];
                tokio::spawn(async move {
                    loop {
                        let offset = block * BLOCK_SIZE as u64;
                        let next = Bytes::from(numbered(number + 1));
                        match object.compare_and_write(offset, &numbered(number), next).await {
                            Ok(None) => {
                                number += 1;
                                answered.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(Some(at)) => panic!("block {block}: miscompare at byte {at} at {number}"),
                            Err(ObjectError::Deposed) => return number,
                            Err(error) => panic!("block {block}, write of {}: {error}", number + 1),
                        }
                    }
                })
            })
            .collect();
        // Let every chain get going.
        let deadline = Instant::now() + Duration::from_secs(20);
        while answered.load(Ordering::Relaxed) < 4 * CHAINS {
            assert!(Instant::now() < deadline, "the chains wrote {answered:?} times in 20 s");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(owner.close_when_idle(Duration::from_secs(10)).await, "the writes under way were not all answered");
        assert!(owner.is_closed());
        for (block, chain) in chains.into_iter().enumerate() {
            numbers[block] = chain.await.expect("a chain ended with an answer of unknown outcome or a miscompare");
        }
        drop(owner);
        let recorded = vec![Status::Active, Status::Active];
        owner = Object::recover(epoch, BLOCKS, components(&hosts), recorded, Hooks::default()).await.unwrap();
        for (block, number) in numbers.iter().enumerate() {
            let held = owner.read_at(block as u64 * BLOCK_SIZE as u64, BLOCK_SIZE as u64).await.unwrap();
            assert_eq!(held[..512], numbered(*number)[..], "block {block}: the chain's last answered write");
        }
        println!("owner {}: {answered:?} compare-and-writes answered before it handed over", epoch - 1);
    }
}

/// An owner serves data only while every copy a newer owner could take for
/// current answered it within a lease (`objects::lease`). With only reads
/// coming, the lease is renewed by asking the copies the reads do not go
/// to; one that stops answering is failed by that renewal, as a write to it
/// would fail it, so reads go on from the others within a few seconds
/// rather than waiting for a write that never comes to find it out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_alone_fail_a_copy_that_stops_answering_and_go_on_from_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let transport = TcpTransport::new();
    let hosts = hosts(dir.path(), &transport, 3, 900).await;
    let object = Object::open(1, BLOCKS, components(&hosts), 0);
    write(&object, 0, 8, 1).await;
    hosts[2].online.store(false, Ordering::SeqCst);
    // Well past the lease: reads alone must renew it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let started = Instant::now();
    for round in 0..20u64 {
        let block = round % 8;
        let read = object.read_at(block * BLOCK_SIZE as u64, BLOCK_SIZE as u64).await;
        assert!(read.is_ok_and(|data| data[..] == pattern(block, 1)[..]), "read {round} after {:?}", started.elapsed());
    }
    assert!(matches!(object.statuses()[2], Status::Absent { .. }), "{:?}", object.statuses());
    assert_eq!(object.statuses()[..2], [Status::Active, Status::Active]);
}

/// A resync planned again when its source fails must not take data from
/// the job of the plan before it, which may still be copying from that
/// source: the source may hold a write no other copy has (here written to
/// it alone), and the new plan skips a block a write of any kind reached.
/// The old job's piece, paced to come after the new plan began, reads that
/// write from the failed source; it must not land, nor fail the copy being
/// resynced (without the owner's check the copy refuses it and is failed:
/// the test then times out; without either check the copies differ).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_planned_again_takes_nothing_from_the_job_it_superseded() {
    let dir = tempfile::tempdir().unwrap();
    let transport = TcpTransport::new();
    let hosts = hosts(dir.path(), &transport, 3, 100).await;
    // 2 KiB a second: each one-block piece waits its 2 s turn.
    let pace = Arc::new(objects::pace::Pace::new(2048).unwrap());
    let hooks = Hooks { resync_pace: Some(pace), ..Hooks::default() };
    let object = Object::recover(1, BLOCKS, components(&hosts), vec![Status::Active; 3], hooks).await.unwrap();
    write(&object, 0, BLOCKS, 1).await;
    hosts[2].online.store(false, Ordering::SeqCst);
    // Two blocks far apart: two pieces, the second paced 2 s after the first.
    write(&object, 0, 1, 2).await;
    write(&object, 100, 1, 2).await;
    assert!(matches!(object.statuses()[2], Status::Absent { .. }), "{:?}", object.statuses());
    hosts[2].online.store(true, Ordering::SeqCst);
    assert!(object.probe(2).await);
    assert!(matches!(object.statuses()[2], Status::Resyncing { .. }), "{:?}", object.statuses());

    // The first plan's job has copied its first piece (block 0) and waits
    // its turn for the second.
    let deadline = Instant::now() + Duration::from_secs(10);
    while object.resync_stats.blocks_copied.load(Ordering::Relaxed) < 1 {
        assert!(Instant::now() < deadline, "the first plan copied nothing: {:?}", object.statuses());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Copy 0, the first plan's source, takes a write no other copy has,
    // and fails; copy 2's resync is planned again from copy 1.
    let stray = Bytes::from(pattern(100, 99));
    hosts[0]
        .client
        .call(1, Request::Write { component: 100, lsn: 1 << 20, first: 100, settled: 0 }, &stray)
        .await
        .unwrap();
    object.fail_component(0);
    assert!(matches!(object.statuses()[0], Status::Absent { .. }), "{:?}", object.statuses());

    let deadline = Instant::now() + Duration::from_secs(30);
    while object.statuses()[1..] != [Status::Active, Status::Active] {
        assert!(Instant::now() < deadline, "copy 2's resync did not finish: {:?}", object.statuses());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let held = |index: usize| {
        let host = &hosts[index];
        async move {
            let mut held = Vec::new();
            for first in (0..BLOCKS).step_by(64) {
                held.extend_from_slice(&host.client.read(1, host.id, first, 64).await.unwrap());
            }
            held
        }
    };
    let (one, two) = (held(1).await, held(2).await);
    let at = 100 * BLOCK_SIZE;
    assert!(two[at..at + BLOCK_SIZE] == pattern(100, 2)[..], "copy 2 holds the stray write in block 100");
    assert!(one == two, "copies 1 and 2 differ");
    assert_eq!(object.resync_stats.full_copies.load(Ordering::Relaxed), 0);
}
