//! Erasure-coded objects with real node processes (issue 6):
//! - a raid5 LUN written full, then half of it unmapped in stripe-aligned
//!   ranges: the space its component files hold on disk across the hosts
//!   drops, the unmapped ranges read as zeros and the rest as written; and
//!   libiscsi's Unmap, WriteSame10/16 and GetLBAStatus suites on that LUN;
//! - raid5 with one host down and raid6 with two, under writes: reads are
//!   right, the returning hosts get back only what changed, and every
//!   stripe's parity matches its data;
//! - owners killed mid-write (the write hole);
//! - a raid5 column away past the repair delay, rebuilt on another host
//!   from the other columns, only where the object holds data.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use node::status::ComponentStatus;
use node::storage::ObjectClient;
use objects::component::Client;
use objects::ec::Layout;
use wire::tcp::TcpTransport;

use crate::harness::{exclusive, free_port, Cut, TestCluster};
use crate::iscsi::{outcomes, random_file};
use crate::libiscsi::{Session, STATUS_GOOD};
use crate::objects::{
    component_address_lists, component_addresses, create_with, decode, node_addresses, object,
    resyncs_went_through_the_queue, runtime, wait_object, Writers, BLOCK, BLOCKS, NAME,
};

const TARGET: &str = "iqn.2026-11.org.tessera:erasure";

fn tool(name: &str) -> String {
    crate::harness::which(name).unwrap_or_else(|| panic!("this test needs {name} (scripts/test installs it)"))
}

fn ok(cluster: &TestCluster, program: &str, args: &[&str]) -> String {
    let output = run(cluster, program, args);
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn run(cluster: &TestCluster, program: &str, args: &[&str]) -> Output {
    cluster.run_bounded(Command::new(tool(program)).args(args), Duration::from_secs(600))
}

fn tessera(cluster: &TestCluster, args: &[&str]) -> String {
    let admin = cluster.admin(1);
    let output = cluster.run_bounded(
        Command::new(crate::harness::binary()).args(args).args(["--admin", &admin]),
        Duration::from_secs(120),
    );
    assert!(output.status.success(), "tessera {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Bytes the component data files (`c-*.data`) under `dir` hold on disk.
fn component_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
        if meta.is_dir() {
            total += component_bytes(&path);
        } else if path
            .file_name()
            .and_then(|name| name.to_str())
            .is_some_and(|name| name.starts_with("c-") && name.ends_with(".data"))
        {
            total += meta.blocks() * 512;
        }
    }
    total
}

#[test]
fn a_raid5_lun_half_unmapped_returns_the_space_reads_zeros_there_and_passes_libiscsis_unmap_suites() {
    let _exclusive = exclusive();
    let port = free_port(&["127.0.0.11", "127.0.0.12", "127.0.0.13"]);
    let cluster = TestCluster::start_configured(3, &[], |config| {
        config.roles = vec!["storage".into(), "target".into()];
        config.iscsi_port = port;
    });
    cluster.wait_healthy(Duration::from_secs(60));
    cluster.require_free_disk(1 << 30, "a 64 MiB raid5 LUN written whole, and its copies read back");
    // raid5 2+1: stripes of 128 KiB; 32 MiB objects hold 256 of them.
    let created = tessera(
        &cluster,
        &["volume", "create", "vol", "--size", "64MiB", "--policy", "raid5:2+1", "--object-size", "32MiB"],
    );
    assert!(created.contains("created volume vol"), "{created}");
    tessera(&cluster, &["target", "create", TARGET, "--lun", "0=vol"]);
    let portal = format!("127.0.0.11:{port}");
    let url = format!("iscsi://{portal}/{TARGET}/0");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !run(&cluster, "iscsi-inq", &[&url]).status.success() {
        assert!(Instant::now() < deadline, "host 1 does not serve {url}");
        std::thread::sleep(Duration::from_millis(300));
    }

    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("random.raw");
    let data = random_file(&source, 64 << 20);
    ok(&cluster, "qemu-img", &["convert", "-n", "-f", "raw", "-O", "raw", source.to_str().unwrap(), &url]);
    let full = component_bytes(cluster.root());
    // Two data chunks and one parity chunk per stripe: 1.5x the data.
    assert!(full >= 96 << 20, "the component files hold {full} bytes after writing 64 MiB");

    // Unmap every other MiB (8 stripes each), 16 descriptors per UNMAP.
    let session = Session::login("iqn.2026-11.org.tessera:unmapper", &portal, TARGET, 0).unwrap();
    let mib_blocks = (1u64 << 20) / 512;
    let ranges: Vec<(u64, u32)> = (0..32).map(|i| (2 * i * mib_blocks, mib_blocks as u32)).collect();
    for batch in ranges.chunks(16) {
        let status = session.settled(|session| session.unmap(batch)).unwrap();
        assert_eq!(status, STATUS_GOOD, "UNMAP answered status {status:#x}");
    }
    drop(session);
    let half = component_bytes(cluster.root());
    let dropped = 1.0 - half as f64 / full as f64;
    println!(
        "component files across 3 hosts: {:.1} MiB written full, {:.1} MiB after unmapping half ({:.1}% returned)",
        full as f64 / (1 << 20) as f64,
        half as f64 / (1 << 20) as f64,
        dropped * 100.0
    );
    assert!(dropped >= 0.45, "unmapping half returned only {:.1}% of the space", dropped * 100.0);

    // Read back through another host: unmapped MiBs are zeros.
    let back = dir.path().join("back.raw");
    let other = format!("iscsi://127.0.0.12:{port}/{TARGET}/0");
    ok(&cluster, "qemu-img", &["convert", "-f", "raw", "-O", "raw", &other, back.to_str().unwrap()]);
    let read = std::fs::read(&back).unwrap();
    assert_eq!(read.len(), data.len());
    for (index, (got, written)) in read.chunks(1 << 20).zip(data.chunks(1 << 20)).enumerate() {
        if index % 2 == 0 {
            assert!(got.iter().all(|&byte| byte == 0), "unmapped MiB {index} does not read as zeros");
        } else {
            assert!(got == written, "MiB {index} does not hold what was written");
        }
    }

    // libiscsi's suites for reclamation and provisioning status.
    let mut results = Vec::new();
    let mut logs = String::new();
    for suite in ["ALL.Unmap", "ALL.WriteSame10", "ALL.WriteSame16", "ALL.GetLBAStatus", "ALL.CompareAndWrite"] {
        let output = cluster
            .run_bounded(Command::new(tool("iscsi-test-cu")).args(["-d", "-t", suite, &url]), Duration::from_secs(600));
        let log = String::from_utf8_lossy(&output.stdout).into_owned();
        let found = outcomes(&log);
        assert!(!found.is_empty(), "{suite} did not run:\n{log}{}", String::from_utf8_lossy(&output.stderr));
        results.extend(found);
        logs.push_str(&log);
    }
    let failed: Vec<&String> = results.iter().filter(|r| r.1 == "failed").map(|r| &r.0).collect();
    let skipped: Vec<(&String, &String)> = results.iter().filter_map(|r| r.2.as_ref().map(|why| (&r.0, why))).collect();
    println!(
        "iscsi-test-cu Unmap, WriteSame10, WriteSame16, GetLBAStatus, CompareAndWrite on a raid5:2+1 LUN: \
         {} tests, {} passed, {} failed, {} skipped",
        results.len(),
        results.len() - failed.len() - skipped.len(),
        failed.len(),
        skipped.len()
    );
    for (test, why) in &skipped {
        println!("  skipped {test}: {why}");
    }
    assert!(failed.is_empty(), "failed: {failed:?}\n{logs}");
    // The LUN's physical block is its 128 KiB stripe, so the tests that
    // need more than one logical block per physical block run too: the
    // five a raid1 LUN (one logical block per physical block) skips in
    // `iscsi::iscsi_test_cu_passes_against_a_raid1_lun_with_only_expected_skips`,
    // GetLBAStatus.UnmapSingle passing beside them (see bench/RESULTS.md).
    assert!(skipped.is_empty(), "skipped: {skipped:?}");
    for test in [
        "WriteSame10.UnmapUnaligned",
        "WriteSame16.UnmapUnaligned",
        "WriteSame10.InvalidDataOutSize",
        "WriteSame16.InvalidDataOutSize",
        "CompareAndWrite.InvalidDataOutSize",
        "GetLBAStatus.UnmapSingle",
    ] {
        let passed = results.iter().any(|r| r.0 == test && r.1 == "passed" && r.2.is_none());
        assert!(passed, "{test} did not run and pass:\n{logs}");
    }
}

/// Reads every row of every component of the object straight from its
/// host, checks each stripe's parity against its data, and returns the
/// object's content as its data chunks hold it.
fn stripes_checked(runtime: &tokio::runtime::Runtime, cluster: &TestCluster, layout: Layout) -> Vec<u8> {
    let status = object(cluster).unwrap();
    let addresses = component_addresses(cluster);
    let transport = TcpTransport::new();
    let rows = layout.rows(BLOCKS);
    let columns: Vec<Vec<u8>> = status
        .components
        .iter()
        .map(|component| {
            let client = Client::new(transport.clone(), addresses[&component.host].clone());
            let mut content = Vec::with_capacity(rows as usize * BLOCK);
            for first in (0..rows).step_by(256) {
                let count = 256.min(rows - first);
                content.extend_from_slice(
                    &runtime.block_on(client.read(status.owner_epoch, component.id, first, count)).unwrap(),
                );
            }
            content
        })
        .collect();
    let chunk = layout.chunk_blocks as usize * BLOCK;
    let mut content = vec![0u8; BLOCKS as usize * BLOCK];
    for stripe in 0..layout.stripes(BLOCKS) {
        let at = stripe as usize * chunk;
        let piece = |position: usize| &columns[layout.component(stripe, position)][at..at + chunk];
        let data: Vec<&[u8]> = (0..layout.data).map(piece).collect();
        let parity = layout.encode(&data).unwrap();
        for (index, expected) in parity.iter().enumerate() {
            assert!(
                expected[..] == piece(layout.data + index)[..],
                "stripe {stripe}: parity {index} does not match its data"
            );
        }
        for (position, chunk_data) in data.iter().enumerate() {
            let block = layout.block_at(stripe * layout.chunk_blocks, position) as usize;
            content[block * BLOCK..block * BLOCK + chunk].copy_from_slice(chunk_data);
        }
    }
    content
}

/// The whole object, read through its owner.
fn read_through_owner(runtime: &tokio::runtime::Runtime, client: &ObjectClient<TcpTransport>) -> Vec<u8> {
    let mut content = Vec::with_capacity(BLOCKS as usize * BLOCK);
    for first in (0..BLOCKS).step_by(256) {
        content.extend_from_slice(&runtime.block_on(client.read_at(first * BLOCK as u64, 256 * BLOCK as u64)).unwrap());
    }
    content
}

/// Every block of `content` holds its newest write acknowledged before
/// (`floor`), or a newer attempted one, or zeros if none was.
fn check_blocks(content: &[u8], floor: &BTreeMap<u64, u64>, attempted: &BTreeMap<u64, u64>) -> Result<(), String> {
    for block in 0..BLOCKS {
        let data = &content[block as usize * BLOCK..(block as usize + 1) * BLOCK];
        let found = decode(data).map_err(|error| format!("block {block}: {error}"))?;
        match (found, floor.get(&block)) {
            (Some((named, _)), _) if named != block => return Err(format!("block {block} holds block {named}'s data")),
            (None, Some(acked)) => return Err(format!("block {block}: acknowledged seq {acked}, reads zeros")),
            (Some((_, seq)), Some(acked)) if seq < *acked => {
                return Err(format!("block {block}: acknowledged seq {acked}, holds older {seq}"))
            }
            (Some((_, seq)), _) if Some(&seq) > attempted.get(&block) => {
                return Err(format!("block {block} holds seq {seq}, never written"))
            }
            _ => {}
        }
    }
    Ok(())
}

/// A 64 MiB erasure-coded object just created, under the objects
/// scenarios' four self-verifying writers, on its first quarter only (a
/// resync or rebuild must copy that, not the rest), running for 2 s.
struct Written {
    created: node::status::ObjectStatus,
    layout: Layout,
    runtime: tokio::runtime::Runtime,
    client: ObjectClient<TcpTransport>,
    writers: Writers,
}

impl Written {
    fn start(cluster: &TestCluster, policy: &str) -> Written {
        let created = create_with(cluster, policy);
        let layout = node::storage::layout(catalog::Policy::parse(policy).unwrap()).expect("an erasure-coded policy");
        let runtime = runtime();
        let client = ObjectClient::new(TcpTransport::new(), node_addresses(cluster), NAME);
        let writers = Writers::start_within(&runtime, client.clone(), BLOCKS / 4);
        std::thread::sleep(Duration::from_secs(2));
        Written { created, layout, runtime, client, writers }
    }
}

/// The hosts of the object's components other than its owner's, the log
/// leader's last (where there is a choice, not it is killed).
fn victims(cluster: &TestCluster, created: &node::status::ObjectStatus) -> Vec<u64> {
    let leader = cluster.leader();
    let mut hosts: Vec<u64> =
        created.components.iter().map(|component| component.host).filter(|host| *host != created.owner).collect();
    hosts.sort_by_key(|host| *host == leader);
    hosts
}

/// A 64 MiB erasure-coded object under the objects scenarios' four
/// self-verifying writers (on its first quarter): `down` component hosts (not the owner) are
/// killed; writes go on; the whole object read through the owner is right
/// while they are down (their chunks rebuilt from the others); they come
/// back and get only the chunks written meanwhile; afterwards every
/// stripe's parity matches its data and no acknowledged write is lost.
fn hosts_down(policy: &str, hosts: u64, down: usize) {
    let _guard = exclusive();
    let mut cluster = TestCluster::start(hosts);
    cluster.wait_healthy(Duration::from_secs(90));
    let Written { created, layout, runtime, client, writers } = Written::start(&cluster, policy);
    let victims = victims(&cluster, &created)[..down].to_vec();
    let written_at_kill = writers.acked.load(Ordering::Relaxed) + writers.failed.load(Ordering::Relaxed);
    let seq_at_kill = writers.seq.load(Ordering::Relaxed);
    for victim in &victims {
        cluster.kill(*victim);
    }
    println!("{policy}: killed hosts {victims:?} (the owner is host {})", created.owner);
    wait_object(&cluster, "degraded", Duration::from_secs(30), |status| status.health == "degraded");
    std::thread::sleep(Duration::from_secs(3));

    // Reads while they are down, with the writers still writing.
    let floor = writers.ledger.lock().unwrap().acked.clone();
    let started = Instant::now();
    let content = read_through_owner(&runtime, &client);
    let attempted = writers.ledger.lock().unwrap().attempted.clone();
    check_blocks(&content, &floor, &attempted).unwrap_or_else(|error| panic!("degraded read: {error}"));
    let acked_down = writers.acked.load(Ordering::Relaxed);
    println!(
        "{policy}: 64 MiB read through the owner in {:?} with {down} host(s) down: every block right",
        started.elapsed()
    );

    for victim in &victims {
        cluster.start_host(*victim);
    }
    let back_at = Instant::now();
    wait_object(&cluster, "resyncing or healthy", Duration::from_secs(60), |status| status.health != "degraded");
    let outage_writes =
        writers.acked.load(Ordering::Relaxed) + writers.failed.load(Ordering::Relaxed) - written_at_kill;
    let seq_at_back = writers.seq.load(Ordering::Relaxed);
    let healed = wait_object(&cluster, "healthy", Duration::from_secs(120), |status| {
        status.health == "healthy"
            && status
                .resync
                .as_ref()
                .is_some_and(|resync| resync.resyncs_done >= down as u64 && resync.bytes_to_go == 0)
    });
    println!("{policy}: healed {:?} after the hosts were back", back_at.elapsed());
    let seq_at_healed = writers.seq.load(Ordering::Relaxed);
    let ledger = writers.finish(&runtime);
    let resync = healed.resync.unwrap();
    // A 4 KiB write changes one row of every component (its block's row);
    // a returning component misses the rows written while it is away, and
    // those written until its resync has planned (counted up to healing,
    // an upper bound).
    let rows_written = |seqs: std::ops::Range<u64>| -> u64 {
        let rows: std::collections::BTreeSet<u64> = ledger
            .log
            .iter()
            .filter(|(seq, _)| seqs.contains(seq))
            .map(|(_, block)| layout.pieces(*block, 1)[0].row)
            .collect();
        rows.len() as u64 * BLOCK as u64 * down as u64
    };
    let (while_away, until_healed) = (rows_written(seq_at_kill..seq_at_back), rows_written(seq_at_kill..seq_at_healed));
    let ratio = resync.bytes_copied_total as f64 / until_healed.max(1) as f64;
    println!(
        "{policy}: {outage_writes} writes while {down} host(s) were away ({acked_down} acknowledged by the degraded read) \
         changed {while_away} bytes of rows on them ({until_healed} until healed); resync rebuilt {} bytes: \
         {:.3}x the first, {ratio:.3}x the second; full copies {}",
        resync.bytes_copied_total,
        resync.bytes_copied_total as f64 / while_away.max(1) as f64,
        resync.full_copies
    );
    assert_eq!(resync.full_copies, 0, "a resync fell back to a full copy");
    assert!(ratio <= 1.1, "resync rebuilt {ratio:.3}x the bytes changed on the returning components");
    let content = stripes_checked(&runtime, &cluster, layout);
    check_blocks(&content, &ledger.acked, &ledger.attempted).unwrap_or_else(|error| panic!("after healing: {error}"));
    let through_owner = read_through_owner(&runtime, &client);
    assert!(through_owner == content, "reading through the owner differs from the data chunks");
    resyncs_went_through_the_queue(&cluster);
}

#[test]
fn raid5_with_a_host_down_reads_right_and_the_host_gets_back_only_what_changed() {
    hosts_down("raid5:2+1", 3, 1);
}

#[test]
fn raid6_with_two_hosts_down_reads_right_and_they_get_back_only_what_changed() {
    hosts_down("raid6:4+2", 6, 2);
}

/// kill -9 of the owner's host, round after round, under the four writers'
/// 4 KiB writes (each a partial-stripe write). To leave writes torn
/// across chunks, the owner's host is first cut off from another component
/// host, so the writes in flight reach the third component but not it;
/// once the test sees such a write on the third component, the owner is
/// killed (the cut stays until another host has taken over, so what the
/// dead owner's kernel still retransmits never lands). The host that
/// takes the object over finds the chunks at different LSNs, with the
/// killed host's chunk away, and must roll the torn writes back (checked
/// in every round that saw a tear, from the new owner's counter); the
/// killed host returns and is resynced. At the end every stripe's parity
/// matches its data and no acknowledged write is lost.
fn owners_killed(policy: &str, hosts: u64, rounds: usize) {
    let _guard = exclusive();
    let mut cluster = TestCluster::start(hosts);
    cluster.wait_healthy(Duration::from_secs(90));
    let Written { created, layout, runtime, client: _, writers } = Written::start(&cluster, policy);
    let mut epoch = created.owner_epoch;
    let mut rollbacks = 0.0;
    // A round whose cuts never showed a torn write tests no write hole:
    // up to twice the rounds asked for, until one did.
    let mut round = 0;
    while round < rounds || (rollbacks < 1.0 && round < 2 * rounds) {
        round += 1;
        let status = object(&cluster).unwrap();
        let owner = status.owner;
        let others: Vec<&ComponentStatus> =
            status.components.iter().filter(|component| component.host != owner).collect();
        let (lagging, ahead) = (others[0], others[1]);
        let before = writers.acked.load(Ordering::Relaxed);
        let ip = |host: u64| cluster.address(host).rsplit_once(':').unwrap().0.to_string();
        let addresses = component_address_lists(&cluster);
        let watch = Watch::new(&runtime, &addresses, status.owner_epoch, lagging, ahead);
        let lagging_ports = &addresses[&lagging.host];
        // Counted per process: what the survivors had rolled back so far
        // (either may recover the object; both are summed).
        let rolled_so_far = |cluster: &TestCluster| -> f64 {
            others
                .iter()
                .map(|other| cluster.metric(other.host, "objects_erasure_rollbacks_total").unwrap_or(0.0))
                .sum()
        };
        let rolled_before = rolled_so_far(&cluster);
        // The owner is killed once a write looks torn: on the third
        // component past every write the cut-off one holds. Watched from
        // the test, with the owner's epoch (which fences nobody), for 1 s
        // at a time; only the component connections are cut, so the
        // hosts' heartbeats and the shared log go on. Sometimes nothing
        // more reaches the third component either (the writes wait on
        // the cut-off host before they are sent on): then the cut is
        // lifted for a second and tried again.
        let mut looked_torn = None;
        let mut cut = None;
        let mut tries = 0;
        while looked_torn.is_none() && tries < 15 {
            tries += 1;
            cut = Some(Cut::ports(&ip(owner), lagging_ports));
            looked_torn = watch.torn_within(Duration::from_secs(1));
            if looked_torn.is_none() {
                cut = None;
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        cluster.kill(owner);
        // What the two hold once nothing more arrives: a write the owner
        // sent before the cut may still have been on its way through the
        // cut-off component's group commit.
        let torn = looked_torn.and_then(|_| watch.settled()).filter(|(behind, past)| behind < past);
        let moved = wait_object(&cluster, "taken over", Duration::from_secs(30), |status| {
            status.owner != owner && status.owner_epoch > epoch && status.resync.is_some()
        });
        drop(cut);
        epoch = moved.owner_epoch;
        std::thread::sleep(Duration::from_secs(2));
        cluster.start_host(owner);
        wait_object(&cluster, "healthy", Duration::from_secs(120), |status| {
            status.health == "healthy" && status.resync.as_ref().is_some_and(|resync| resync.bytes_to_go == 0)
        });
        let rolled = rolled_so_far(&cluster) - rolled_before;
        println!(
            "{policy} round {round}: cut host {} off from the owner, killed the owner (host {owner}) after {before} \
             acknowledged writes, {}; host {} took over at epoch {epoch}; {rolled} component(s) rolled back; healed \
             with {} acknowledged",
            lagging.host,
            match (torn, looked_torn) {
                (Some((behind, past)), _) => format!(
                    "with host {} at LSN {past} past host {}'s {behind} once settled (cut {tries} time(s))",
                    ahead.host, lagging.host
                ),
                (None, Some(_)) => "with a write that looked torn, but the cut-off host caught up".to_string(),
                (None, None) => format!("with no write seen torn in {tries} cuts"),
            },
            moved.owner,
            writers.acked.load(Ordering::Relaxed)
        );
        if torn.is_some() {
            assert!(rolled >= 1.0, "a write was torn when the owner died, and the new owner rolled nothing back");
        }
        rollbacks += rolled;
    }
    let ledger = writers.finish(&runtime);
    let content = stripes_checked(&runtime, &cluster, layout);
    check_blocks(&content, &ledger.acked, &ledger.attempted).unwrap_or_else(|error| panic!("after the kills: {error}"));
    println!(
        "{policy}: {} stripes' parity matches their data; {} blocks hold their newest acknowledged write or a newer \
         one",
        layout.stripes(BLOCKS),
        ledger.acked.len()
    );
    assert!(rollbacks >= 1.0, "no new owner found torn writes to roll back: the scenario did not test the write hole");
}

/// The two components other than the owner's, watched from the test with
/// the owner's epoch (which fences nobody): `lagging`, cut off from the
/// owner, and `ahead`, the third.
struct Watch<'a> {
    runtime: &'a tokio::runtime::Runtime,
    epoch: u64,
    lagging: (Client<TcpTransport>, u64),
    ahead: (Client<TcpTransport>, u64),
}

impl<'a> Watch<'a> {
    fn new(
        runtime: &'a tokio::runtime::Runtime,
        addresses: &BTreeMap<u64, Vec<String>>,
        epoch: u64,
        lagging: &ComponentStatus,
        ahead: &ComponentStatus,
    ) -> Watch<'a> {
        let transport = TcpTransport::new();
        let client = |component: &ComponentStatus| {
            (Client::new(transport.clone(), addresses[&component.host][0].clone()), component.id)
        };
        Watch { runtime, epoch, lagging: client(lagging), ahead: client(ahead) }
    }

    fn newest_behind(&self) -> Option<u64> {
        let (client, id) = &self.lagging;
        self.runtime.block_on(client.info(self.epoch, *id)).ok().map(|info| info.newest_lsn)
    }

    fn committed_ahead(&self) -> Option<u64> {
        let (client, id) = &self.ahead;
        self.runtime.block_on(client.info(self.epoch, *id)).ok().map(|info| info.committed_lsn)
    }

    /// Waits until `ahead` has committed a write past the newest `lagging`
    /// holds: that write is torn across their chunks. Returns (`lagging`'s
    /// newest, `ahead`'s committed), or None if no tear was seen within
    /// `limit`.
    fn torn_within(&self, limit: Duration) -> Option<(u64, u64)> {
        let started = Instant::now();
        while started.elapsed() < limit {
            // `ahead` first: `lagging` asked after it still lacks what it
            // had. Asked again a moment later, so that a write the owner
            // sent before the cut and `lagging` was still taking in is not
            // taken for torn.
            if let Some(past) = self.committed_ahead() {
                if self.newest_behind().is_some_and(|behind| behind < past) {
                    std::thread::sleep(Duration::from_millis(100));
                    if let Some(behind) = self.newest_behind().filter(|behind| *behind < past) {
                        return Some((behind, past));
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// `lagging`'s newest LSN and `ahead`'s committed one once neither has
    /// changed for half a second (the owner is dead: nothing more is
    /// sent), or as they last were if a new owner fences the old epoch
    /// first.
    fn settled(&self) -> Option<(u64, u64)> {
        let ask = || Some((self.newest_behind()?, self.committed_ahead()?));
        let mut last = ask()?;
        let mut since = Instant::now();
        let started = Instant::now();
        while since.elapsed() < Duration::from_millis(500) && started.elapsed() < Duration::from_secs(3) {
            std::thread::sleep(Duration::from_millis(50));
            let Some(now) = ask() else { break };
            if now != last {
                (last, since) = (now, Instant::now());
            }
        }
        Some(last)
    }
}

#[test]
fn raid5_owners_killed_mid_write_leave_every_stripe_consistent_and_lose_no_acknowledged_write() {
    owners_killed("raid5:2+1", 3, 3);
}

/// A raid5 chunk column away past the repair delay is rebuilt on the host
/// the object did not use, chunk by chunk from the other columns, while
/// the writers go on: afterwards every stripe's parity matches its data,
/// with the new column in it, and no acknowledged write is lost.
#[test]
fn raid5_a_column_away_past_the_repair_delay_is_rebuilt_elsewhere_from_the_others() {
    let _guard = exclusive();
    let mut cluster = TestCluster::start_configured(4, &[], |config| {
        config.repair_delay_secs = 3;
    });
    cluster.wait_healthy(Duration::from_secs(90));
    let policy = "raid5:2+1";
    let Written { created, layout, runtime, client: _, writers } = Written::start(&cluster, policy);
    let victim = victims(&cluster, &created)[0];
    let spare =
        cluster.hosts_ids().into_iter().find(|host| created.components.iter().all(|c| c.host != *host)).unwrap();
    let killed_at = Instant::now();
    cluster.kill(victim);
    println!("{policy}: killed host {victim} (owner host {}); host {spare} is spare", created.owner);
    let rebuilt = wait_object(&cluster, "rebuilt on the spare host and healthy", Duration::from_secs(180), |status| {
        status.health == "healthy"
            && status.components.iter().any(|c| c.host == spare)
            && status.resync.as_ref().is_some_and(|resync| resync.bytes_to_go == 0)
    });
    let resync = rebuilt.resync.clone().unwrap();
    println!(
        "{policy}: rebuilt on host {spare} and healthy {:.1} s after the kill (epoch {} -> {}); {} bytes rebuilt \
         ({} rows of {} KiB per column); {} writes acknowledged, {} failed",
        killed_at.elapsed().as_secs_f64(),
        created.owner_epoch,
        rebuilt.owner_epoch,
        resync.bytes_copied_total,
        layout.rows(BLOCKS),
        BLOCK / 1024,
        writers.acked.load(Ordering::Relaxed),
        writers.failed.load(Ordering::Relaxed)
    );
    assert!(rebuilt.components.iter().all(|c| c.host != victim), "{rebuilt:#?}");
    std::thread::sleep(Duration::from_secs(1));
    let ledger = writers.finish(&runtime);
    // The new column is rebuilt from nothing, but only where the object
    // holds something: the rows the writers touched (a quarter of them),
    // not the holes, which it keeps as holes.
    let touched: std::collections::BTreeSet<u64> =
        ledger.log.iter().map(|(_, block)| layout.pieces(*block, 1)[0].row).collect();
    let touched_bytes = touched.len() as u64 * BLOCK as u64;
    println!(
        "{policy}: the writers touched {} of {} rows; the rebuild copied {:.3}x that",
        touched.len(),
        layout.rows(BLOCKS),
        resync.bytes_copied_total as f64 / touched_bytes as f64
    );
    assert!(resync.bytes_copied_total > 0, "nothing was rebuilt: {resync:?}");
    assert!(
        resync.bytes_copied_total <= touched_bytes,
        "the rebuild copied {} bytes, more than the {touched_bytes} of rows ever written (holes copied?)",
        resync.bytes_copied_total
    );
    let content = stripes_checked(&runtime, &cluster, layout);
    check_blocks(&content, &ledger.acked, &ledger.attempted)
        .unwrap_or_else(|error| panic!("after the rebuild: {error}"));
    println!(
        "{policy}: {} stripes' parity matches their data with the rebuilt column; {} blocks hold their newest \
         acknowledged write or a newer one",
        layout.stripes(BLOCKS),
        ledger.acked.len()
    );
}

/// More than m components away at once: the hosts of both components of
/// a RAID-5 (2+1) object other than its owner's are killed together under
/// the self-verifying writers (5 hosts, so the log keeps its majority).
/// No chunk can be rebuilt: the object is unavailable, and says so, and
/// writes fail. The hosts restart: the owner takes back the two components
/// that hold every acknowledged write (rolled back to the newest one) and
/// resyncs the third; every stripe's parity matches its data and no
/// acknowledged write is lost.
#[test]
fn raid5_with_two_of_three_component_hosts_killed_at_once_is_unavailable_until_they_return_then_heals() {
    let _guard = exclusive();
    let mut cluster = TestCluster::start(5);
    cluster.wait_healthy(Duration::from_secs(90));
    let policy = "raid5:2+1";
    let Written { created, layout, runtime, client, writers } = Written::start(&cluster, policy);
    let victims = victims(&cluster, &created);
    assert_eq!(victims.len(), 2, "{created:?}");
    for victim in &victims {
        cluster.kill(*victim);
    }
    println!("{policy}: killed hosts {victims:?} together (the owner is host {})", created.owner);
    wait_object(&cluster, "unavailable", Duration::from_secs(30), |status| status.health == "unavailable");
    let (acked, failed) = (writers.acked.load(Ordering::Relaxed), writers.failed.load(Ordering::Relaxed));
    std::thread::sleep(Duration::from_secs(3));
    let failed_while_away = writers.failed.load(Ordering::Relaxed) - failed;
    assert_eq!(writers.acked.load(Ordering::Relaxed), acked, "a write acknowledged with one chunk of three");
    assert!(failed_while_away > 0, "the writers' writes must fail while the object is unavailable");
    assert!(runtime.block_on(client.read_at(0, BLOCK as u64)).is_err(), "a read with one chunk of a row");

    for victim in &victims {
        cluster.start_host(*victim);
    }
    let back_at = Instant::now();
    wait_object(&cluster, "healthy", Duration::from_secs(120), |status| {
        status.health == "healthy" && status.resync.as_ref().is_none_or(|resync| resync.bytes_to_go == 0)
    });
    println!(
        "{policy}: {failed_while_away} writes failed in 3 s while unavailable; healthy {:?} after the hosts were back",
        back_at.elapsed()
    );
    let owner = object(&cluster).unwrap().owner;
    assert!(
        cluster.log_text(owner).contains("readmitting components"),
        "the owner took components back by readmission, not otherwise"
    );
    std::thread::sleep(Duration::from_secs(2));
    let ledger = writers.finish(&runtime);
    let content = stripes_checked(&runtime, &cluster, layout);
    check_blocks(&content, &ledger.acked, &ledger.attempted).unwrap_or_else(|error| panic!("after healing: {error}"));
    let through_owner = read_through_owner(&runtime, &client);
    assert!(through_owner == content, "reading through the owner differs from the data chunks");
}
