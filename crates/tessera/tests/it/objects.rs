//! Distributed objects with real node processes: a raid1(3) object under
//! continuous self-verifying writes while a host goes away (killed, or
//! cut off by the network) and comes back, or while its owner dies. Each
//! scenario checks: I/O goes on, the object heals, every replica is
//! byte-identical, no acknowledged write is lost, and resync copies little
//! more than the outage wrote (printed; at most 1.1x).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use node::status::ObjectStatus;
use node::storage::ObjectClient;
use objects::component::{Client, ComponentError, Request};
use wire::tcp::TcpTransport;

use crate::harness::{exclusive, last_lines, Cut, TestCluster};

pub(crate) const BLOCK: usize = 4096;
/// 64 MiB: random blocks rarely repeat, so bytes written ≈ distinct blocks.
pub(crate) const BLOCKS: u64 = 16384;
const WRITERS: u64 = 4;
pub(crate) const NAME: &str = "vol";

/// A block that names itself: its index, the write's sequence number, a
/// filler derived from both, and a checksum over all of it.
pub(crate) fn pattern(block: u64, seq: u64) -> Vec<u8> {
    let mut data = vec![0u8; BLOCK];
    data[0..8].copy_from_slice(&block.to_le_bytes());
    data[8..16].copy_from_slice(&seq.to_le_bytes());
    let mut state = block.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seq;
    for chunk in data[16..BLOCK - 8].chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
    let sum = checksum(&data[..BLOCK - 8]);
    data[BLOCK - 8..].copy_from_slice(&sum.to_le_bytes());
    data
}

fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| (hash ^ *byte as u64).wrapping_mul(0x100_0000_01b3))
}

/// What a block holds: zeros, or a valid pattern's (block, seq).
pub(crate) fn decode(data: &[u8]) -> Result<Option<(u64, u64)>, String> {
    if data.iter().all(|byte| *byte == 0) {
        return Ok(None);
    }
    let block = u64::from_le_bytes(data[0..8].try_into().unwrap());
    let seq = u64::from_le_bytes(data[8..16].try_into().unwrap());
    let sum = u64::from_le_bytes(data[BLOCK - 8..].try_into().unwrap());
    if sum != checksum(&data[..BLOCK - 8]) || data != pattern(block, seq).as_slice() {
        return Err(format!("block claiming ({block}, {seq}) does not verify"));
    }
    Ok(Some((block, seq)))
}

/// Per block: the newest acknowledged sequence number, and the newest one
/// attempted (an unacknowledged write may or may not have landed).
#[derive(Default)]
pub(crate) struct Ledger {
    pub(crate) acked: BTreeMap<u64, u64>,
    pub(crate) attempted: BTreeMap<u64, u64>,
    /// Every write attempted: (seq, block).
    pub(crate) log: Vec<(u64, u64)>,
}

pub(crate) struct Writers {
    stop: Arc<AtomicBool>,
    pub(crate) seq: Arc<AtomicU64>,
    /// Writes acknowledged, and writes that failed.
    pub(crate) acked: Arc<AtomicU64>,
    pub(crate) failed: Arc<AtomicU64>,
    pub(crate) ledger: Arc<Mutex<Ledger>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Writers {
    /// `WRITERS` tasks; task `t` writes blocks `b` with `b % WRITERS == t`,
    /// one write at a time, so each block's writes are ordered.
    pub(crate) fn start(runtime: &tokio::runtime::Runtime, client: ObjectClient<TcpTransport>) -> Writers {
        Writers::start_within(runtime, client, BLOCKS)
    }

    /// As [`Writers::start`], writing only blocks below `span`.
    pub(crate) fn start_within(
        runtime: &tokio::runtime::Runtime,
        client: ObjectClient<TcpTransport>,
        span: u64,
    ) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let seq = Arc::new(AtomicU64::new(1));
        let tasks = (0..WRITERS)
            .map(|writer| {
                let (stop, acked, failed, ledger, seq, client) =
                    (stop.clone(), acked.clone(), failed.clone(), ledger.clone(), seq.clone(), client.clone());
                runtime.spawn(async move {
                    let mut random = writer.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1;
                    while !stop.load(Ordering::Relaxed) {
                        random ^= random << 13;
                        random ^= random >> 7;
                        random ^= random << 17;
                        let block = (random % (span / WRITERS)) * WRITERS + writer;
                        let seq = seq.fetch_add(1, Ordering::Relaxed);
                        {
                            let mut ledger = ledger.lock().unwrap();
                            ledger.attempted.insert(block, seq);
                            ledger.log.push((seq, block));
                        }
                        match client.write_at(block * BLOCK as u64, &pattern(block, seq)).await {
                            Ok(()) => {
                                ledger.lock().unwrap().acked.insert(block, seq);
                                acked.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(_) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        }
                    }
                })
            })
            .collect();
        Writers { stop, seq, acked, failed, ledger, tasks }
    }

    pub(crate) fn finish(self, runtime: &tokio::runtime::Runtime) -> Ledger {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            runtime.block_on(task).unwrap();
        }
        Arc::try_unwrap(self.ledger).ok().unwrap().into_inner().unwrap()
    }
}

/// Hosts cut off the network: status is asked elsewhere (their admin API
/// does not answer either).
static CUT_HOSTS: Mutex<Vec<u64>> = Mutex::new(Vec::new());

pub(crate) fn object(cluster: &TestCluster) -> Option<ObjectStatus> {
    let cut = CUT_HOSTS.lock().unwrap().clone();
    cluster.running().into_iter().filter(|id| !cut.contains(id)).find_map(|id| {
        cluster.get(id, &format!("/api/v1/objects/{NAME}")).ok().and_then(|value| serde_json::from_value(value).ok())
    })
}

pub(crate) fn wait_object(
    cluster: &TestCluster,
    what: &str,
    timeout: Duration,
    ok: impl Fn(&ObjectStatus) -> bool,
) -> ObjectStatus {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    while Instant::now() < deadline {
        if let Some(status) = object(cluster) {
            if ok(&status) {
                return status;
            }
            last = Some(status);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let logs: Vec<String> =
        cluster.hosts_ids().iter().map(|id| format!("--- host {id}\n{}", cluster.log_tail(*id))).collect();
    panic!("object not {what} within {timeout:?}; last {last:#?}\n{}", logs.join("\n"));
}

fn create(cluster: &TestCluster) -> ObjectStatus {
    create_with(cluster, "raid1:3")
}

pub(crate) fn create_with(cluster: &TestCluster, policy: &str) -> ObjectStatus {
    let host = cluster.running()[0];
    let url = format!("http://{}/api/v1/objects", cluster.admin(host));
    let body = serde_json::json!({ "name": NAME, "policy": policy, "size_bytes": BLOCKS * BLOCK as u64 });
    ureq::post(&url).timeout(Duration::from_secs(20)).send_json(body).expect("creating the object");
    wait_object(cluster, "open", Duration::from_secs(20), |status| status.resync.is_some())
}

pub(crate) fn node_addresses(cluster: &TestCluster) -> Vec<String> {
    cluster.hosts_ids().iter().map(|id| cluster.address(*id)).collect()
}

/// Each host's first component thread address, from the catalog.
pub(crate) fn component_addresses(cluster: &TestCluster) -> BTreeMap<u64, String> {
    component_address_lists(cluster).into_iter().map(|(host, mut addresses)| (host, addresses.swap_remove(0))).collect()
}

/// Each host's component service addresses, one per component thread.
pub(crate) fn component_address_lists(cluster: &TestCluster) -> BTreeMap<u64, Vec<String>> {
    let hosts = cluster.get(cluster.running()[0], "/api/v1/hosts").unwrap();
    hosts
        .as_array()
        .unwrap()
        .iter()
        .map(|host| {
            let addresses = host["component_addresses"].as_array().unwrap();
            (
                host["id"].as_u64().unwrap(),
                addresses.iter().map(|address| address.as_str().unwrap().to_string()).collect(),
            )
        })
        .collect()
}

/// Each component's whole content, read directly from its host.
fn replicas(runtime: &tokio::runtime::Runtime, cluster: &TestCluster, status: &ObjectStatus) -> Vec<Vec<u8>> {
    let addresses = component_addresses(cluster);
    let transport = TcpTransport::new();
    status
        .components
        .iter()
        .map(|component| {
            let client = Client::new(transport.clone(), addresses[&component.host].clone());
            let mut content = Vec::with_capacity(BLOCKS as usize * BLOCK);
            for first in (0..BLOCKS).step_by(256) {
                let data = runtime.block_on(client.read(status.owner_epoch, component.id, first, 256)).unwrap();
                content.extend_from_slice(&data);
            }
            content
        })
        .collect()
}

/// Every replica identical; every block holds its newest acknowledged
/// write or a newer attempted one; reading through the owner agrees.
fn verify(
    runtime: &tokio::runtime::Runtime,
    cluster: &TestCluster,
    ledger: &Ledger,
    client: &ObjectClient<TcpTransport>,
) {
    let status = object(cluster).unwrap();
    let copies = replicas(runtime, cluster, &status);
    for (index, copy) in copies.iter().enumerate().skip(1) {
        if copy != &copies[0] {
            let differing: Vec<usize> = (0..BLOCKS as usize)
                .filter(|block| {
                    copy[block * BLOCK..(block + 1) * BLOCK] != copies[0][block * BLOCK..(block + 1) * BLOCK]
                })
                .take(10)
                .collect();
            panic!("replica {index} differs from replica 0 in blocks {differing:?} (first 10)");
        }
    }
    let mut through_owner = Vec::new();
    for first in (0..BLOCKS).step_by(256) {
        through_owner
            .extend_from_slice(&runtime.block_on(client.read_at(first * BLOCK as u64, 256 * BLOCK as u64)).unwrap());
    }
    assert!(through_owner == copies[0], "reading through the owner differs from the replicas");
    let mut lost = Vec::new();
    for block in 0..BLOCKS {
        let data = &copies[0][block as usize * BLOCK..(block as usize + 1) * BLOCK];
        let found = decode(data).unwrap_or_else(|error| panic!("block {block}: {error}"));
        let acked = ledger.acked.get(&block).copied();
        let attempted = ledger.attempted.get(&block).copied();
        match (found, acked) {
            (Some((named, _)), _) if named != block => panic!("block {block} holds block {named}'s data"),
            (None, Some(acked)) => lost.push(format!("block {block}: acknowledged seq {acked}, reads zeros")),
            (Some((_, seq)), Some(acked)) if seq < acked => {
                lost.push(format!("block {block}: acknowledged seq {acked}, holds older {seq}"))
            }
            (Some((_, seq)), _) if Some(seq) > attempted => panic!("block {block} holds seq {seq}, never written"),
            _ => {}
        }
    }
    assert!(lost.is_empty(), "acknowledged writes lost: {} blocks, e.g. {:?}", lost.len(), &lost[..lost.len().min(10)]);
}

#[derive(PartialEq)]
enum Outage {
    /// SIGKILL a component host that is not the owner, restart it later.
    KillComponentHost,
    /// SIGKILL the owner's host: another host takes the object over.
    KillOwner,
    /// Cut a component host (not the owner) off the network, then heal.
    Partition,
    /// As `KillComponentHost`, and once the host is back and resyncing,
    /// SIGKILL the owner and restart it at once.
    OwnerRestartMidResync,
}

pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// The resync rate when the owner is killed mid-resync: the copy of up to
/// the whole 64 MiB object then takes seconds, so the test sees it under
/// way (unpaced, it can end between two looks).
const PACED_RESYNC_MIB_PER_SECOND: u64 = 16;

fn scenario(outage: Outage) {
    let _guard = exclusive();
    let mut cluster = TestCluster::start_configured(3, &[], |config| {
        if outage == Outage::OwnerRestartMidResync {
            config.resync_mib_per_second = PACED_RESYNC_MIB_PER_SECOND;
        }
    });
    cluster.wait_healthy(Duration::from_secs(60));
    let created = create(&cluster);
    let runtime = runtime();
    let client = ObjectClient::new(TcpTransport::new(), node_addresses(&cluster), NAME);
    let writers = Writers::start(&runtime, client.clone());
    std::thread::sleep(Duration::from_secs(2));
    let victim = match outage {
        Outage::KillOwner => created.owner,
        Outage::KillComponentHost | Outage::Partition | Outage::OwnerRestartMidResync => {
            // Not the log leader (a status read may not name one yet).
            let leader = Some(cluster.leader());
            let others: Vec<u64> =
                created.components.iter().map(|c| c.host).filter(|host| *host != created.owner).collect();
            others.iter().copied().find(|host| Some(*host) != leader).unwrap_or(others[0])
        }
    };
    let before = writers.acked.load(Ordering::Relaxed);
    let written_at_kill = writers.acked.load(Ordering::Relaxed) + writers.failed.load(Ordering::Relaxed);
    let seq_at_kill = writers.seq.load(Ordering::Relaxed);
    let killed_at = Instant::now();
    let mut cut = None;
    if outage == Outage::Partition {
        let ip = cluster.address(victim).rsplit_once(':').unwrap().0.to_string();
        cut = Some(Cut::off(&ip));
        CUT_HOSTS.lock().unwrap().push(victim);
        println!("cut host {victim} ({ip}) off the network after {before} acknowledged writes");
    } else {
        cluster.kill(victim);
        println!("killed host {victim} after {before} acknowledged writes");
    }
    if let Outage::KillOwner = outage {
        let moved = wait_object(&cluster, "taken over", Duration::from_secs(30), |status| {
            status.owner != victim && status.owner_epoch > created.owner_epoch && status.resync.is_some()
        });
        println!(
            "ownership moved to host {} at epoch {} after {:?}",
            moved.owner,
            moved.owner_epoch,
            killed_at.elapsed()
        );
    }
    let degraded = wait_object(&cluster, "degraded", Duration::from_secs(30), |status| status.health == "degraded");
    let degraded_after = killed_at.elapsed();
    let at_degraded = writers.acked.load(Ordering::Relaxed) - before;
    std::thread::sleep(Duration::from_secs(4));
    let during = writers.acked.load(Ordering::Relaxed) - before;
    if during <= 50 {
        // What the owner and the others said meanwhile, for the diagnosis.
        let said: Vec<String> = cluster
            .running()
            .iter()
            .map(|id| {
                let text = cluster.log_text(*id);
                let lines: Vec<&str> =
                    text.lines().filter(|line| line.contains("WARN") || line.contains("ERROR")).collect();
                format!("--- host {id} warnings and errors (last 25)\n{}", last_lines(&lines.join("\n"), 25))
            })
            .collect();
        panic!(
            "I/O did not go on while host {victim} was away: {during} writes acknowledged ({at_degraded} by the time \
             the object was degraded, {degraded_after:?} after the outage began; {} writes failed); object {degraded:#?}\n{}",
            writers.failed.load(Ordering::Relaxed),
            said.join("\n")
        );
    }
    println!("{during} writes acknowledged while host {victim} was away ({:?} since the kill)", killed_at.elapsed());
    match cut.take() {
        Some(cut) => {
            drop(cut);
            CUT_HOSTS.lock().unwrap().clear();
        }
        None => cluster.start_host(victim),
    }
    let back_at = Instant::now();
    // Bytes copied by an owner process that is killed before it finishes.
    let mut copied_by_killed_owner = 0;
    if outage == Outage::OwnerRestartMidResync {
        let resyncing = wait_object(&cluster, "resyncing", Duration::from_secs(60), |status| {
            status.resync.as_ref().is_some_and(|resync| resync.bytes_to_go > 0)
        });
        let resync = resyncing.resync.as_ref().unwrap();
        println!(
            "resyncing: {} bytes copied, {} to go; killing the owner (host {}) and restarting it",
            resync.bytes_copied, resync.bytes_to_go, resyncing.owner
        );
        // Read just before the kill (a few ms of copying may be missed).
        copied_by_killed_owner = object(&cluster)
            .and_then(|status| status.resync)
            .map_or(resync.bytes_copied_total, |resync| resync.bytes_copied_total);
        cluster.kill(resyncing.owner);
        cluster.start_host(resyncing.owner);
    }
    let _back =
        wait_object(&cluster, "resyncing or healthy", Duration::from_secs(60), |status| status.health != "degraded");
    let outage_writes =
        writers.acked.load(Ordering::Relaxed) + writers.failed.load(Ordering::Relaxed) - written_at_kill;
    let seq_at_back = writers.seq.load(Ordering::Relaxed);
    let healed = wait_object(&cluster, "healthy", Duration::from_secs(120), |status| {
        status.health == "healthy"
            && status.resync.as_ref().is_some_and(|resync| resync.resyncs_done >= 1 && resync.bytes_to_go == 0)
    });
    println!("healed {:?} after the host was back", back_at.elapsed());
    let ledger = writers.finish(&runtime);
    let distinct: std::collections::BTreeSet<u64> = ledger
        .log
        .iter()
        .filter(|(seq, _)| (seq_at_kill..seq_at_back).contains(seq))
        .map(|(_, block)| *block)
        .collect();
    let mut resync = healed.resync.clone().unwrap();
    resync.bytes_copied_total += copied_by_killed_owner;
    let outage_bytes = outage_writes * BLOCK as u64;
    let ratio = resync.bytes_copied_total as f64 / outage_bytes.max(1) as f64;
    println!(
        "outage: {outage_writes} writes ({outage_bytes} bytes) from the kill until the host was back; resync copied {} bytes: {ratio:.3}x; full copies {}; owner epoch {} -> {}",
        resync.bytes_copied_total, resync.full_copies, degraded.owner_epoch, healed.owner_epoch
    );
    println!(
        "distinct blocks written in that time: {} ({} bytes): copied / distinct = {:.3}",
        distinct.len(),
        distinct.len() * BLOCK,
        resync.bytes_copied_total as f64 / (distinct.len() * BLOCK).max(1) as f64
    );
    assert_eq!(resync.full_copies, 0, "a resync fell back to a full copy");
    assert!(ratio <= 1.1, "resync copied {ratio:.3}x the bytes written during the outage");
    verify(&runtime, &cluster, &ledger, &client);
    resyncs_went_through_the_queue(&cluster);
    if let Outage::KillOwner = outage {
        // The old owner's epoch is refused by every component.
        let status = object(&cluster).unwrap();
        let component = &status.components[0];
        let stale = Client::new(TcpTransport::new(), component_addresses(&cluster)[&component.host].clone());
        let write = Request::Write { component: component.id, lsn: u64::MAX, first: 0, settled: 0 };
        let refused = runtime.block_on(stale.call_in(created.owner_epoch, 1, 1, write, &pattern(0, u64::MAX)));
        match refused {
            Err(objects::component::ClientError::Component(ComponentError::StaleEpoch { epoch, current })) => {
                println!("the old owner's epoch {epoch} is refused (components accept {current} and above)")
            }
            other => panic!("a write at the old owner's epoch was not refused: {other:?}"),
        }
    }
}

/// Every resync queued a task in the cluster's task queue (counted by the
/// hosts that ran them), and none is left there once the object is healthy.
pub(crate) fn resyncs_went_through_the_queue(cluster: &TestCluster) {
    let queued: f64 =
        cluster.running().into_iter().filter_map(|id| cluster.metric(id, "objects_resync_tasks_total")).sum();
    assert!(queued >= 1.0, "no resync went through the task queue");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let tasks = cluster.get(cluster.running()[0], "/api/v1/tasks").unwrap();
        let left = tasks.as_array().unwrap().iter().filter(|task| task["kind"] == "resync").count();
        if left == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "resync tasks left in the queue after healing: {tasks:#}");
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("{queued} resync task(s) went through the cluster's task queue; none left");
}

#[test]
fn a_killed_component_host_resyncs_only_what_it_missed() {
    scenario(Outage::KillComponentHost);
}

#[test]
fn a_killed_owner_is_replaced_and_its_epoch_refused() {
    scenario(Outage::KillOwner);
}

#[test]
fn a_partitioned_component_host_resyncs_only_what_it_missed() {
    scenario(Outage::Partition);
}

#[test]
fn an_owner_restarted_mid_resync_still_copies_no_more() {
    scenario(Outage::OwnerRestartMidResync);
}

/// The whole cluster stops and starts again with one host late (as when
/// the machines of a rack boot at different speeds). The object's owner
/// waits for that host rather than record its copy absent: nothing is
/// resynced, and what was written before the stop reads back.
#[test]
fn a_cluster_restarted_with_one_host_late_opens_its_objects_with_every_copy() {
    let _guard = exclusive();
    let mut cluster = TestCluster::start(3);
    cluster.wait_healthy(Duration::from_secs(60));
    let created = create(&cluster);
    let runtime = runtime();
    let written = 256;
    let client = ObjectClient::new(TcpTransport::new(), node_addresses(&cluster), NAME);
    for block in 0..written {
        runtime.block_on(client.write_at(block * BLOCK as u64, &pattern(block, 1))).unwrap();
    }
    // Not the log leader either: a new hierarchy manager fails the old
    // root (the leader's host) within about a second of silence, and a
    // host recorded down is not waited for.
    let leader = cluster.leader();
    let others: Vec<u64> =
        created.components.iter().map(|component| component.host).filter(|host| *host != created.owner).collect();
    let late = others.iter().copied().find(|host| *host != leader).unwrap_or(others[0]);
    let waited = |cluster: &TestCluster| {
        cluster.log_text(created.owner).matches("waiting for component hosts that are starting").count()
    };
    let waited_before = waited(&cluster);
    cluster.stop_all();
    for id in cluster.hosts_ids().into_iter().filter(|id| *id != late) {
        cluster.start_host(id);
    }
    // Host `late` starts once the owner holds the object at a new epoch and
    // waits for it, as a host a little slower to boot than the others.
    let deadline = Instant::now() + Duration::from_secs(60);
    while waited(&cluster) == waited_before {
        assert!(
            Instant::now() < deadline,
            "host {} did not wait for host {late} when it took its object again:\n{}",
            created.owner,
            cluster.report()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("host {} took the object again and waits for host {late}, which starts now", created.owner);
    cluster.start_host(late);
    cluster.wait_healthy(Duration::from_secs(60));
    let reopened = wait_object(&cluster, "open again", Duration::from_secs(30), |status| {
        status.owner_epoch > created.owner_epoch && status.resync.is_some()
    });
    assert_eq!(reopened.owner, created.owner);
    // The counter exists once a resync was queued on the owner.
    let resyncs = cluster.metric(created.owner, "objects_resync_tasks_total").unwrap_or(0.0);
    let done = reopened.resync.as_ref().map(|resync| (resync.resyncs_done, resync.bytes_copied_total));
    assert!(
        resyncs == 0.0 && done == Some((0, 0)),
        "the late host's copy was recorded absent and resynced ({resyncs} resyncs queued, (done, bytes) {done:?}): \
         {reopened:#?}\n{}",
        cluster.log_tail(created.owner)
    );
    assert!(reopened.components.iter().all(|component| component.state == "active"), "{reopened:#?}");
    for block in 0..written {
        let data = runtime.block_on(client.read_at(block * BLOCK as u64, BLOCK as u64)).unwrap();
        assert!(data[..] == pattern(block, 1)[..], "block {block} did not read back after the restart");
    }
}

/// A copy away past the repair delay is rebuilt on the host the object did
/// not use, through a task in the cluster's queue, while writes go on; when
/// the old host returns, its copy (named by no object now) is deleted.
#[test]
fn a_copy_away_past_the_repair_delay_is_rebuilt_elsewhere_and_its_orphan_removed() {
    let _guard = exclusive();
    let mut cluster = TestCluster::start_configured(3, &[], |config| {
        config.repair_delay_secs = 3;
        config.orphan_grace_secs = 4;
    });
    cluster.wait_healthy(Duration::from_secs(60));
    let created = create_with(&cluster, "raid1:2");
    let leader = cluster.status().and_then(|status| status.log.leader);
    let victim = created.components.iter().map(|c| c.host).find(|host| *host != created.owner).unwrap();
    let spare =
        cluster.hosts_ids().into_iter().find(|host| created.components.iter().all(|c| c.host != *host)).unwrap();
    let old = created.components.iter().find(|c| c.host == victim).unwrap().id;
    let runtime = runtime();
    let client = ObjectClient::new(TcpTransport::new(), node_addresses(&cluster), NAME);
    let writers = Writers::start(&runtime, client.clone());
    std::thread::sleep(Duration::from_secs(2));
    println!("killing host {victim} (log leader: {leader:?}); host {spare} is spare");
    let killed_at = Instant::now();
    cluster.kill(victim);
    let rebuilt = wait_object(&cluster, "rebuilt on the spare host and healthy", Duration::from_secs(120), |status| {
        status.health == "healthy" && status.components.iter().any(|c| c.host == spare)
    });
    println!(
        "rebuilt on host {spare} and healthy {:.1} s after the kill (epoch {} -> {}); {} writes acknowledged, {} failed",
        killed_at.elapsed().as_secs_f64(),
        created.owner_epoch,
        rebuilt.owner_epoch,
        writers.acked.load(Ordering::Relaxed),
        writers.failed.load(Ordering::Relaxed)
    );
    assert!(rebuilt.components.iter().all(|c| c.host != victim), "{rebuilt:#?}");
    std::thread::sleep(Duration::from_secs(1));
    let ledger = writers.finish(&runtime);
    verify(&runtime, &cluster, &ledger, &client);
    let tasks = cluster.get(cluster.running()[0], "/api/v1/tasks").unwrap();
    let rebuilds = tasks.as_array().unwrap().iter().filter(|task| task["kind"] == "rebuild").count();
    assert_eq!(rebuilds, 0, "the rebuild task must leave the queue once done: {tasks:#}");

    // The old host returns: its copy of the object is deleted.
    cluster.start_host(victim);
    let transport = TcpTransport::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // Its component threads listen on new ports once it has registered.
        let hosts = cluster.get(created.owner, "/api/v1/hosts").unwrap();
        let host = hosts.as_array().unwrap().iter().find(|host| host["id"].as_u64() == Some(victim)).unwrap();
        let address = host["component_addresses"][0].as_str().unwrap_or_default().to_string();
        let old_copy = Client::new(transport.clone(), address);
        match runtime.block_on(old_copy.info(0, old)) {
            Err(objects::component::ClientError::Component(ComponentError::Store(reason)))
                if reason.contains("does not exist") =>
            {
                break;
            }
            other => {
                assert!(Instant::now() < deadline, "the orphaned copy was not deleted: {other:?}");
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
    println!("the orphaned copy {old:#x} on host {victim} was deleted");
}

/// A write whose attempt timed out at an owner cut off from the client
/// (from it alone: the owner still serves, at the same epoch) must not be
/// carried out there when the cut heals: the caller has been told it
/// failed, and may have written the block again since, through another
/// host. Its connection is aborted when it times out, so TCP does not
/// deliver it late; the owner's end of it, whose reset was lost in the
/// cut, ends too. A stand-in owner counts the writes it is sent. Needs
/// nftables (`nft`) and root, as the partition scenarios do.
#[test]
fn a_write_timed_out_at_an_owner_cut_off_from_the_client_does_not_land_when_the_cut_heals() {
    use bytes::Bytes;
    use node::storage::{IoHeader, IoReply, IoRequest, Ownership};
    let _guard = exclusive();
    let runtime = runtime();
    let (owner_ip, client_ip) = ("127.0.0.61", "127.0.0.62");
    let address = format!("{owner_ip}:{}", crate::harness::free_port(&[owner_ip]));
    const OWNED: Ownership = Ownership { object: 7, epoch: 1 };
    let writes = Arc::new(AtomicU64::new(0));
    let handler = {
        let (writes, address) = (writes.clone(), address.clone());
        move |request: wire::Request| {
            let (writes, address) = (writes.clone(), address.clone());
            async move {
                let (header, _): (IoHeader, Bytes) =
                    objects::component::unframe(&request.payload).expect("an object request");
                let reply = match (header.ownership, header.io) {
                    (Some(OWNED), IoRequest::Write { .. }) => {
                        writes.fetch_add(1, Ordering::SeqCst);
                        IoReply::Done
                    }
                    _ => IoReply::NotOwner { owner: Some(1), address: Some(address), ownership: Some(OWNED) },
                };
                Ok(objects::component::frame(&reply, &[]))
            }
        }
    };
    let served = runtime.block_on(wire::Transport::serve(&TcpTransport::new(), &address, Arc::new(handler))).unwrap();
    let transport = TcpTransport::new().bound_to(Some(client_ip.parse().unwrap()));
    // Two clients on the same connections: one whose attempts wait 1 s for
    // the write at the cut, one that waits longer for the others.
    let patient = ObjectClient::new(transport.clone(), vec![address.clone()], "cut");
    let client = ObjectClient::new(transport, vec![address.clone()], "cut").with_io_timeout(Duration::from_secs(1));
    runtime.block_on(client.write_at(0, &[1; 4096])).expect("a write before the cut");
    assert_eq!(writes.load(Ordering::SeqCst), 1);
    // Everything the owner sent acknowledged before the cut: its own
    // retransmission after the heal would otherwise find the client's end
    // gone, and end its end too, keepalive or not.
    std::thread::sleep(Duration::from_millis(500));
    let cut = Cut::ports(client_ip, std::slice::from_ref(&address));
    let failed = runtime.block_on(client.write_at(0, &[2; 4096]));
    assert!(failed.is_err(), "a write to an owner cut off from the client succeeded: {failed:?}");
    assert_eq!(writes.load(Ordering::SeqCst), 1, "the write reached the owner through the cut");
    drop(cut);
    // TCP would retransmit a request still queued within seconds (its
    // backoff after a cut of about 2 s is 1.6-3.2 s).
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(
        writes.load(Ordering::SeqCst),
        1,
        "the write that timed out reached the owner after the cut healed ({failed:?})"
    );
    // The client reaches the owner again, on a new connection.
    runtime.block_on(patient.write_at(0, &[3; 4096])).expect("a write after the cut healed");
    assert_eq!(writes.load(Ordering::SeqCst), 2);
    // The reset that ended the aborted connection was lost in the cut: the
    // owner's end learns the client is gone from its keepalive probes, and
    // only the new connection is left.
    let open = || served.stats.connections_open.load(Ordering::SeqCst);
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    while open() != 1 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(open(), 1, "the owner still holds the connection the client aborted during the cut");
}
