//! Volumes served over iSCSI to real initiators: libiscsi's tools, qemu-img
//! and libiscsi's conformance suite, against a 3-host cluster with raid1
//! volumes. Needs libiscsi-bin and qemu-utils with qemu-block-extra
//! (`scripts/test` installs them); a missing tool fails the test.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::harness::{binary, exclusive, free_port, which, TestCluster};
use crate::libiscsi::{Session, STATUS_CHECK_CONDITION, STATUS_GOOD};

const TARGET: &str = "iqn.2026-11.org.tessera.test:vol";

fn tool(name: &str) -> String {
    which(name).unwrap_or_else(|| {
        panic!(
            "this test needs {name} (Debian packages libiscsi-bin, qemu-utils and qemu-block-extra; scripts/test installs them)"
        )
    })
}

/// No single tool run here takes more than a minute or two; a hung one
/// fails the test with what the nodes were doing.
const TOOL_LIMIT: Duration = Duration::from_secs(300);

fn run(cluster: &TestCluster, program: &str, args: &[&str]) -> Output {
    cluster.run_bounded(Command::new(tool(program)).args(args), TOOL_LIMIT)
}

fn ok(cluster: &TestCluster, program: &str, args: &[&str]) -> String {
    let output = run(cluster, program, args);
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn tessera(cluster: &TestCluster, args: &[&str]) -> String {
    let output =
        cluster.run_bounded(Command::new(binary()).args(args).args(["--admin", &cluster.admin(1)]), TOOL_LIMIT);
    assert!(
        output.status.success(),
        "tessera {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A SANITIZE OVERWRITE's pace in these scenarios: 8 s for a 64 MiB LUN.
/// Sanitize.Reset needs an overwrite still running some 5 s after it
/// started, and a small LUN keeps the suite's disk use small.
const SANITIZE_MIB_PER_SECOND: u64 = 8;

/// Three hosts with the storage and target roles, iSCSI on `port`.
fn cluster() -> (TestCluster, u16) {
    let port = free_port(&["127.0.0.11", "127.0.0.12", "127.0.0.13"]);
    let cluster = TestCluster::start_configured(3, &[], |config| {
        config.roles = vec!["storage".into(), "target".into()];
        config.iscsi_port = port;
        config.sanitize_mib_per_second = SANITIZE_MIB_PER_SECOND;
    });
    cluster.wait_healthy(Duration::from_secs(60));
    (cluster, port)
}

fn portal(host: u64, port: u16) -> String {
    format!("127.0.0.{}:{port}", host + 10)
}

/// Creates a raid1(2) volume of `size` over objects of `object_size` and a
/// target with it as LUN 0; waits until host 1 serves it.
fn volume_and_target(cluster: &TestCluster, port: u16, size: &str, object_size: &str) -> String {
    volume_and_target_with(cluster, port, "vol", size, "raid1:2", object_size)
}

/// Creates volume `name` of `size` and `policy` over objects of
/// `object_size` and a target with it as LUN 0; waits until host 1 serves
/// it.
fn volume_and_target_with(
    cluster: &TestCluster,
    port: u16,
    name: &str,
    size: &str,
    policy: &str,
    object_size: &str,
) -> String {
    volume_and_target_as(cluster, port, name, &["--size", size, "--policy", policy, "--object-size", object_size])
}

/// As [`volume_and_target_with`], the volume created with `options`.
fn volume_and_target_as(cluster: &TestCluster, port: u16, name: &str, options: &[&str]) -> String {
    let created = tessera(cluster, &[&["volume", "create", name][..], options].concat());
    assert!(created.contains(&format!("created volume {name}")), "{created}");
    let created = tessera(cluster, &["target", "create", TARGET, "--lun", &format!("0={name}")]);
    assert!(created.contains(&format!("iscsi://{}/{TARGET}/0", portal(1, port))), "{created}");
    let url = format!("iscsi://{}/{TARGET}/0", portal(1, port));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let inquiry = run(cluster, "iscsi-inq", &[&url]);
        if inquiry.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "host 1 does not serve {url}: iscsi-inq said {}{}\n{}",
            String::from_utf8_lossy(&inquiry.stdout),
            String::from_utf8_lossy(&inquiry.stderr),
            cluster.report()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    url
}

pub(crate) fn random_file(path: &Path, bytes: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let data: Vec<u8> = (0..bytes / 8)
        .flat_map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()
        })
        .collect();
    std::fs::write(path, &data).unwrap();
    data
}

#[test]
fn qemu_img_copies_64_mib_into_a_raid1_lun_and_back_and_the_tools_see_its_identity_and_size() {
    let _exclusive = exclusive();
    let (cluster, port) = cluster();
    // 256 MiB over four 64 MiB objects: the copy crosses object boundaries.
    let url = volume_and_target(&cluster, port, "256MiB", "64MiB");
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("random.raw");
    let data = random_file(&source, 64 << 20);

    let listed = ok(&cluster, "iscsi-ls", &["-s", &format!("iscsi://{}", portal(1, port))]);
    assert!(listed.contains(TARGET) && listed.contains("DIRECT_ACCESS"), "{listed}");
    for host in 1..=3 {
        assert!(listed.contains(&format!("Portal:{},{host}", portal(host, port))), "every host is a portal: {listed}");
    }
    let inquiry = ok(&cluster, "iscsi-inq", &[&url]);
    assert!(
        inquiry.contains("Vendor:TESSERA") && inquiry.contains("Peripheral Device Type:DIRECT_ACCESS"),
        "{inquiry}"
    );
    let capacity = ok(&cluster, "iscsi-readcapacity16", &[&url]);
    assert!(capacity.contains("LOGICAL BLOCK LENGTH IN BYTES:512"), "{capacity}");
    assert!(capacity.contains(&format!("Total size:{}", 256u64 << 20)), "{capacity}");
    let info = ok(&cluster, "qemu-img", &["info", &url]);
    assert!(info.contains("virtual size: 256 MiB"), "{info}");

    let started = Instant::now();
    ok(&cluster, "qemu-img", &["convert", "-n", "-f", "raw", "-O", "raw", source.to_str().unwrap(), &url]);
    let written = started.elapsed();
    // Read back through another host's portal: its I/O goes to the owners.
    let back = dir.path().join("back.raw");
    let other = format!("iscsi://{}/{TARGET}/0", portal(2, port));
    ok(&cluster, "qemu-img", &["convert", "-f", "raw", "-O", "raw", &other, back.to_str().unwrap()]);
    let read = std::fs::read(&back).unwrap();
    assert_eq!(read.len(), 256 << 20);
    assert!(read[..data.len()] == data[..], "the LUN does not hold what was written");
    assert!(read[data.len()..].iter().all(|&byte| byte == 0), "the unwritten rest reads as zeros");
    println!("64 MiB written through qemu-img in {written:?}, 256 MiB read back byte-identical through host 2");

    // Growing shows through READ CAPACITY.
    let grown = tessera(&cluster, &["volume", "grow", "vol", "--size", "320MiB"]);
    assert!(grown.contains("5 objects"), "{grown}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let capacity = ok(&cluster, "iscsi-readcapacity16", &[&url]);
        if capacity.contains(&format!("Total size:{}", 320u64 << 20)) {
            break;
        }
        assert!(Instant::now() < deadline, "the grown size did not show: {capacity}");
        std::thread::sleep(Duration::from_millis(300));
    }
    let status = cluster.status().unwrap();
    assert_eq!(status.volumes.len(), 1);
    assert_eq!(status.volumes[0].size_bytes, 320 << 20);
    assert_eq!(status.targets[0].urls.len(), 3, "{:?}", status.targets);

    // The owners' block caches: a block read again is served from the
    // cache, and a write through another portal is read back at once.
    let hits = |cluster: &TestCluster| -> f64 {
        (1..=3).map(|host| cluster.metric(host, "objects_block_cache_hits").unwrap_or(0.0)).sum()
    };
    let io = |portal_host: u64, commands: &[&str]| -> String {
        let url = format!("iscsi://{}/{TARGET}/0", portal(portal_host, port));
        let mut args = vec!["-f", "raw"];
        for command in commands {
            args.extend(["-c", command]);
        }
        args.push(&url);
        let output = ok(&cluster, "qemu-io", &args);
        assert!(!output.contains("verification failed"), "{output}");
        output
    };
    io(1, &["write -P 0x5a 1M 4k"]);
    let before = hits(&cluster);
    io(1, &["read -P 0x5a 1M 4k", "read -P 0x5a 1M 4k", "read -P 0x5a 1M 4k"]);
    let after = hits(&cluster);
    assert!(after > before, "reading a block three times hit no cache ({before} hits before, {after} after)");
    io(2, &["write -P 0xa5 1M 4k"]);
    io(1, &["read -P 0xa5 1M 4k", "read -P 0xa5 1M 4k"]);
    println!(
        "block cache: {} hits for three reads of one block; a write through host 2 read back through host 1",
        after - before
    );

    // A target with CHAP: libiscsi logs in with the right secret only.
    let chap_target = "iqn.2026-11.org.tessera:chap";
    let secret = "s3cret-for-chap-test";
    let created = tessera(
        &cluster,
        &["target", "create", chap_target, "--lun", "0=vol", "--chap-user", "alice", "--chap-secret", secret],
    );
    assert!(created.contains(chap_target), "{created}");
    let with = |credentials: &str| format!("iscsi://{credentials}{}/{chap_target}/0", portal(1, port));
    let deadline = Instant::now() + Duration::from_secs(30);
    let inquiry = loop {
        let output = run(&cluster, "iscsi-inq", &[&with(&format!("alice%{secret}@"))]);
        if output.status.success() {
            break String::from_utf8_lossy(&output.stdout).into_owned();
        }
        assert!(Instant::now() < deadline, "CHAP login with the right secret failed: {output:?}");
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(inquiry.contains("Vendor:TESSERA"), "{inquiry}");
    let capacity = ok(&cluster, "qemu-img", &["info", &with(&format!("alice%{secret}@"))]);
    assert!(capacity.contains("virtual size: 320 MiB"), "{capacity}");
    for wrong in ["alice%not-the-secret-at-all@", "mallory%s3cret-for-chap-test@", ""] {
        let output = run(&cluster, "iscsi-inq", &[&with(wrong)]);
        assert!(!output.status.success(), "logged in with credentials {wrong:?}: {output:?}");
    }
    println!("CHAP: the right secret logs in (iscsi-inq, qemu-img); a wrong secret, user, or none is refused");
}

/// A login request PDU going straight from the operational stage to full
/// feature phase (no security stage: the target has no CHAP).
fn login_pdu(initiator: &str, target: &str) -> Vec<u8> {
    let text = format!("InitiatorName={initiator}\0SessionType=Normal\0TargetName={target}\0AuthMethod=None\0");
    let mut pdu = vec![0u8; 48];
    pdu[0] = 0x43;
    pdu[1] = 0x87;
    pdu[5..8].copy_from_slice(&(text.len() as u32).to_be_bytes()[1..]);
    pdu[8..14].copy_from_slice(&[0x80, 0, 0, 0, 0, 7]);
    pdu.extend_from_slice(text.as_bytes());
    while !pdu.len().is_multiple_of(4) {
        pdu.push(0);
    }
    pdu
}

/// Sends `bytes` and reads whatever comes back until the target closes or
/// goes quiet; returns what was read.
fn poke(address: &str, bytes: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let _ = stream.write_all(bytes);
    let mut out = Vec::new();
    let mut buffer = [0u8; 4096];
    while let Ok(read) = stream.read(&mut buffer) {
        if read == 0 {
            break;
        }
        out.extend_from_slice(&buffer[..read]);
    }
    out
}

#[test]
fn garbage_on_one_connection_leaves_another_sessions_io_undisturbed() {
    let _exclusive = exclusive();
    let (cluster, port) = cluster();
    let url = volume_and_target(&cluster, port, "128MiB", "64MiB");
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("random.raw");
    let data = random_file(&source, 64 << 20);
    let address = portal(1, port);

    let (attempts, rejects) = std::thread::scope(|scope| {
        let writer = {
            let (source, url, cluster) = (source.clone(), url.clone(), &cluster);
            scope.spawn(move || {
                for _ in 0..3 {
                    ok(
                        cluster,
                        "qemu-img",
                        &["convert", "-n", "-f", "raw", "-O", "raw", source.to_str().unwrap(), &url],
                    );
                }
            })
        };
        let mut rejects = 0;
        let mut state = 7u64;
        let mut attempts = 0;
        while !writer.is_finished() || attempts < 20 {
            attempts += 1;
            // Random bytes before any login.
            let noise: Vec<u8> = (0..4096)
                .map(|_| {
                    state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    (state >> 33) as u8
                })
                .collect();
            poke(&address, &noise);
            // A SCSI command before login: refused with a login reject.
            let mut command = vec![0u8; 48];
            command[0] = 0x01;
            command[1] = 0x80;
            let reply = poke(&address, &command);
            assert!(reply.is_empty() || reply[0] & 0x3f == 0x23, "a command before login: {reply:?}");
            // Logged in, then an unknown opcode and a data segment length past
            // what was negotiated.
            let mut session = login_pdu("iqn.2026-11.org.tessera.test:fuzzer", TARGET);
            let mut unknown = vec![0u8; 48];
            unknown[0] = 0x1e;
            session.extend_from_slice(&unknown);
            let reply = poke(&address, &session);
            // The login response, then a Reject (opcode 0x3f) for the unknown
            // opcode.
            let mut at = 0;
            while at + 48 <= reply.len() {
                let length = u32::from_be_bytes([0, reply[at + 5], reply[at + 6], reply[at + 7]]) as usize;
                if reply[at] & 0x3f == 0x3f {
                    rejects += 1;
                }
                at += 48 + length.div_ceil(4) * 4;
            }
            let mut oversized = login_pdu("iqn.2026-11.org.tessera.test:fuzzer2", TARGET);
            let mut huge = vec![0u8; 48];
            huge[0] = 0x01;
            huge[5..8].copy_from_slice(&[0xff, 0xff, 0xff]);
            oversized.extend_from_slice(&huge);
            poke(&address, &oversized);
            if attempts > 200 {
                break;
            }
        }
        writer.join().expect("the writing session failed while another connection sent garbage");
        (attempts, rejects)
    });
    assert!(rejects > 0, "unknown opcodes were answered with a Reject");
    let back = dir.path().join("back.raw");
    ok(&cluster, "qemu-img", &["convert", "-f", "raw", "-O", "raw", &url, back.to_str().unwrap()]);
    let read = std::fs::read(&back).unwrap();
    assert!(read[..data.len()] == data[..], "the LUN does not hold what was written");
    assert!(cluster.running().contains(&1), "host 1 is still running");
    println!("{attempts} rounds of garbage sent; {rejects} Rejects; the other session's 3 x 64 MiB landed intact");
}

/// Tests `iscsi-test-cu` may skip: removable media, a
/// read-only unit, and the five tests that need LOGICAL BLOCKS PER PHYSICAL BLOCK > 1. The unit reports 1 on
/// purpose: GetLBAStatus.UnmapSingle expects the first LBA status
/// descriptor to start at the next physical block boundary rather than at
/// the requested LBA (SBC-4 and QEMU's driver want the requested LBA), so
/// reporting the true 8 would trade five skips for that failure. (With
/// more than 128 per physical block that test's second loop does not run:
/// an erasure-coded LUN, whose 128 KiB stripe is its physical block, runs
/// and passes all five and UnmapSingle, in
/// `erasure::a_raid5_lun_half_unmapped_returns_the_space_reads_zeros_there_and_passes_libiscsis_unmap_suites`.)
pub(crate) const SKIPS_ALLOWED: &[&str] = &[
    "PreventAllow.",
    "StartStopUnit.",
    "NoMedia.",
    "ReadOnly.",
    "CompareAndWrite.InvalidDataOutSize",
    "WriteSame10.UnmapUnaligned",
    "WriteSame10.InvalidDataOutSize",
    "WriteSame16.UnmapUnaligned",
    "WriteSame16.InvalidDataOutSize",
];

/// (test, outcome, skip reason) from iscsi-test-cu's output; a test that
/// printed [SKIPPED] counts as skipped even though CUnit passes it.
pub(crate) fn outcomes(log: &str) -> Vec<(String, String, Option<String>)> {
    let mut results: Vec<(String, String, Option<String>)> = Vec::new();
    let mut suite = String::new();
    for line in log.lines() {
        if let Some(name) = line.strip_prefix("Suite: ") {
            suite = name.trim().to_string();
            continue;
        }
        if let Some(rest) = line.trim_start().strip_prefix("Test: ") {
            let name = rest.split(" ...").next().unwrap_or(rest).trim();
            results.push((format!("{suite}.{name}"), "passed".into(), None));
        }
        let Some(last) = results.last_mut() else { continue };
        if let Some(at) = line.find("[SKIPPED]") {
            last.2.get_or_insert_with(|| line[at + 9..].trim().to_string());
        }
        if line.trim() == "FAILED" || line.trim_end().ends_with("...FAILED") {
            last.1 = "failed".into();
        }
    }
    results
}

#[test]
fn iscsi_test_cu_passes_against_a_raid1_lun_with_only_expected_skips() {
    let _exclusive = exclusive();
    let (cluster, port) = cluster();
    // Both copies of the LUN written whole, several times over, plus
    // journals and logs: well under this.
    cluster.require_free_disk(1 << 30, "a 64 MiB raid1(2) LUN overwritten whole by the SANITIZE tests");
    // Encrypted at rest, so that SANITIZE CRYPTO ERASE is offered (and
    // every other test runs through the encryption as well).
    let options = ["--size", "64MiB", "--policy", "raid1:2", "--object-size", "32MiB", "--encrypted"];
    let url = volume_and_target_as(&cluster, port, "vol", &options);
    tool("iscsi-test-cu");
    let started = Instant::now();
    // The second URL is a second session to the same host (the multipath
    // suite needs a unit attention from a reset to reach both paths).
    // About 2.5 minutes here; a hang fails with the nodes' stacks.
    let suite_limit = Duration::from_secs(1200);
    let all =
        cluster.run_bounded(Command::new(tool("iscsi-test-cu")).args(["-d", "-t", "ALL", &url, &url]), suite_limit);
    // The SANITIZE tests (-S) run on one path: with two, Sanitize.Reservations
    // leaves the second path's RESERVE(6) in place (the shared second
    // session is never logged out), so Sanitize.Reset's SANITIZE would
    // rightly meet a reservation conflict.
    let sanitize = cluster
        .run_bounded(Command::new(tool("iscsi-test-cu")).args(["-d", "-S", "-t", "ALL.Sanitize", &url]), suite_limit);
    let log = String::from_utf8_lossy(&all.stdout).into_owned();
    let sanitize_log = String::from_utf8_lossy(&sanitize.stdout).into_owned();
    let sanitize_results = outcomes(&sanitize_log);
    assert!(sanitize_results.len() >= 11, "the SANITIZE suite did not run:\n{sanitize_log}");
    let mut results: Vec<(String, String, Option<String>)> =
        outcomes(&log).into_iter().filter(|result| !result.0.starts_with("Sanitize.")).collect();
    results.extend(sanitize_results);
    let failed: Vec<&String> = results.iter().filter(|r| r.1 == "failed").map(|r| &r.0).collect();
    let skipped: Vec<(&String, &String)> = results.iter().filter_map(|r| r.2.as_ref().map(|why| (&r.0, why))).collect();
    let passed = results.len() - failed.len() - skipped.len();
    println!(
        "iscsi-test-cu -d -t ALL (two paths) and -d -S -t ALL.Sanitize (one path) on an encrypted raid1(2) LUN: \
         {} tests, {passed} passed, {} failed, {} skipped, in {:?}",
        results.len(),
        failed.len(),
        skipped.len(),
        started.elapsed()
    );
    for (test, why) in &skipped {
        println!("  skipped {test}: {why}");
    }
    assert!(results.len() >= 200, "the suite did not run:\n{log}\n{}", String::from_utf8_lossy(&all.stderr));
    assert!(failed.is_empty(), "failed: {failed:?}\n{log}\n{sanitize_log}");
    let allowed = |test: &str| SKIPS_ALLOWED.iter().any(|allowed| test.starts_with(allowed));
    let unexpected: Vec<&(&String, &String)> = skipped.iter().filter(|(test, _)| !allowed(test)).collect();
    assert!(unexpected.is_empty(), "skipped for a feature the target should have: {unexpected:?}");
}

/// Which host owns each of the volume's objects, by object name.
fn owners(cluster: &TestCluster) -> BTreeMap<String, u64> {
    let status = cluster.status().expect("the cluster answers status");
    status.objects.iter().filter(|object| object.name.starts_with("vol.")).map(|o| (o.name.clone(), o.owner)).collect()
}

#[test]
fn ownership_follows_the_io_to_the_serving_host_without_failing_or_losing_a_write() {
    let _exclusive = exclusive();
    let (cluster, port) = cluster();
    // 16 objects, each first owned by the host of its first copy: most are
    // owned by a host other than host 1, which serves the LUN.
    let url = volume_and_target(&cluster, port, "64MiB", "4MiB");
    let before = owners(&cluster);
    assert_eq!(before.len(), 16, "{before:?}");
    let elsewhere = before.values().filter(|owner| **owner != 1).count();
    assert!(elsewhere > 0, "every object is owned by host 1 already; nothing would move: {before:?}");
    // Every 4 KiB block written once, in a scattered order (7919 is prime),
    // 32 at a time, so every object takes writes while it moves.
    let blocks = (64 << 20) / 4096;
    let args = ["bench", "-f", "raw", "-t", "none", "-w", "--pattern=90", "-s", "4096", "-d", "32", "-S", "32436224"];
    let count = blocks.to_string();
    let written = ok(&cluster, "qemu-img", &[&args[..], &["-c", &count, &url]].concat());
    assert!(written.contains("Run completed"), "{written}");
    let during_writes = owners(&cluster).values().filter(|owner| **owner == 1).count() - (16 - elsewhere);
    // Reads keep coming from host 1 until every object has moved there.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut after = owners(&cluster);
    while after.values().any(|owner| *owner != 1) {
        assert!(
            Instant::now() < deadline,
            "objects still owned elsewhere after a minute of I/O from host 1: {after:?}"
        );
        let read = ["bench", "-f", "raw", "-t", "none", "-s", "4096", "-d", "32", "-S", "32436224", "-c", &count, &url];
        ok(&cluster, "qemu-img", &read);
        after = owners(&cluster);
    }
    // Nothing was lost or failed across the moves: the whole LUN holds the
    // pattern.
    let dir = tempfile::tempdir().unwrap();
    let expected = dir.path().join("pattern.raw");
    std::fs::write(&expected, vec![0x5a; 64 << 20]).unwrap();
    let compared = run(&cluster, "qemu-img", &["compare", "-f", "raw", "-F", "raw", expected.to_str().unwrap(), &url]);
    assert!(compared.status.success(), "the LUN differs: {}", String::from_utf8_lossy(&compared.stdout));
    let status = cluster.status().unwrap();
    let moved: Vec<String> = status
        .objects
        .iter()
        .filter(|object| before.get(&object.name).is_some_and(|owner| *owner != 1))
        .map(|object| format!("{} (host {} epoch {})", object.name, before[&object.name], object.owner_epoch))
        .collect();
    println!(
        "{} of 16 objects moved to host 1, the host serving the LUN, {during_writes} of them while the writes ran: {moved:?}",
        moved.len()
    );
}

/// A thinly provisioned LUN whose disks fill up (a `disk_mib` tmpfs per
/// host under a 64 MiB volume, with the journal and the disk's reserve): a
/// write that needs new blocks ends with DATA PROTECT, SPACE ALLOCATION
/// FAILED WRITE PROTECT; no disk is latched failed; what was written reads
/// back; overwrites go on; UNMAP makes room again. With one copy nothing
/// else may happen. With two, the disks fill a little apart: a copy that
/// had no room for a write the other took misses it and is resynced later,
/// and when a copy fails under a write in flight the object may be in
/// transition for a moment (NOT READY, ASYMMETRIC ACCESS STATE TRANSITION,
/// which initiators retry: this test retries too). Erasure-coded, every
/// component of a row takes a chunk of each write: a write too few of them
/// had room for is refused the same way, and every object keeps `active`
/// components (k) to read from. Needs root to mount the tmpfs.
fn fill_a_thin_lun(hosts: u64, policy: &str, disk_mib: u64, active: usize) {
    let strict = hosts == 1;
    let _exclusive = exclusive();
    let disks: Vec<fsio::tmpfs::Tmpfs> = (0..hosts).map(|_| fsio::tmpfs::Tmpfs::mount(disk_mib)).collect();
    let ips: Vec<String> = (1..=hosts).map(|host| format!("127.0.0.{}", host + 10)).collect();
    let port = free_port(&ips.iter().map(String::as_str).collect::<Vec<_>>());
    let paths: Vec<std::path::PathBuf> = disks.iter().map(|disk| disk.path().join("disk0")).collect();
    let cluster = TestCluster::start_configured(hosts, &[], |config| {
        config.roles = vec!["storage".into(), "target".into()];
        config.iscsi_port = port;
        config.disks = vec![node::config::DiskSpec { path: paths[config.node_id as usize - 1].clone() }];
        config.disk_reserve_mib = 8;
    });
    cluster.wait_healthy(Duration::from_secs(60));
    // Placement counts an object's whole size against a disk's free space
    // when it places it (four 16 MiB objects fit a 72 MiB disk, four of
    // 8 MiB chunks a 44 MiB one); the
    // journal and the disk's reserve then leave less than that for data.
    let url = volume_and_target_with(&cluster, port, "thin", "64MiB", policy, "16MiB");

    // 64 MiB into a LUN whose disks hold less: qemu-img stops with the
    // error the target reports.
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("random.raw");
    let data = random_file(&source, 64 << 20);
    let copy = run(&cluster, "qemu-img", &["convert", "-n", "-f", "raw", "-O", "raw", source.to_str().unwrap(), &url]);
    let said = String::from_utf8_lossy(&copy.stderr).into_owned();
    assert!(!copy.status.success(), "64 MiB of data, its journal and the reserve fit {disk_mib} MiB disks");
    println!("qemu-img convert: {}", said.trim());
    assert!(said.contains("No space left on device") || !strict, "{said}");

    // 4 KiB writes from the LUN's end backwards fill what room is left;
    // the first refused one ends with the exact sense.
    let session = Session::login("iqn.2026-11.org.tessera.test:full", &portal(1, port), TARGET, 0).unwrap();
    let mut block = vec![0x5au8; 4096];
    // As an initiator does: a write that meets a transition is tried again.
    let write = |lba: u32, block: &mut Vec<u8>| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (status, sense) = session.write10_sense(lba, block).unwrap();
            if strict || sense != Some((0x02, 0x040a)) || Instant::now() > deadline {
                break (status, sense);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let mut fresh = ((64u64 << 20) / 512) as u32;
    let (status, sense) = loop {
        fresh -= 8;
        assert!(fresh as u64 * 512 > 16 << 20, "4 KiB writes never ran out of room");
        let (status, sense) = write(fresh, &mut block);
        if status != STATUS_GOOD {
            break (status, sense);
        }
    };
    println!("4 KiB writes filled {} KiB more", ((64u64 << 20) / 512 - fresh as u64 - 8) / 2);
    assert_eq!(status, STATUS_CHECK_CONDITION, "a write needing new blocks on a full disk");
    assert_eq!(sense, Some((0x07, 0x2707)), "DATA PROTECT, SPACE ALLOCATION FAILED WRITE PROTECT");
    // An overwrite needs no new blocks.
    let (status, sense) = write(8, &mut block);
    assert_eq!((status, sense), (STATUS_GOOD, None), "an overwrite on a full disk");

    // Nothing failed: with one copy the object is healthy; otherwise every
    // object keeps enough components active to read. No disk latched failed.
    let status = cluster.status().unwrap();
    for object in &status.objects {
        match strict {
            true => assert_eq!(object.health, "healthy", "{object:?}"),
            false => assert!(
                object.components.iter().filter(|component| component.state == "active").count() >= active,
                "{object:?}"
            ),
        }
    }
    for host in 1..=hosts {
        assert!(!cluster.log_text(host).contains("disk failed"), "a disk of host {host} latched failed");
    }

    // What was acknowledged reads back (qemu-img writes in order).
    let back = dir.path().join("back.raw");
    ok(&cluster, "qemu-img", &["convert", "-f", "raw", "-O", "raw", &url, back.to_str().unwrap()]);
    let read = std::fs::read(&back).unwrap();
    assert_eq!(&read[4096..8192], &block[..], "the overwrite");
    let kept = 16 << 20;
    assert!(read[8192..kept] == data[8192..kept], "the first 16 MiB written before the disk filled");
    let tail = (fresh as usize + 8) * 512;
    assert!(read[tail..].chunks(4096).all(|piece| piece == &block[..]), "the 4 KiB writes acknowledged");

    // UNMAP frees room: the fresh block can be written now.
    assert_eq!(session.unmap(&[(0, ((32u64 << 20) / 512) as u32)]).unwrap(), STATUS_GOOD);
    let (status, sense) = write(fresh, &mut block);
    assert_eq!((status, sense), (STATUS_GOOD, None), "a write after UNMAP made room");
    drop(session);
    drop(cluster);
    drop(disks);
}

#[test]
fn a_lun_whose_disk_fills_refuses_new_blocks_with_space_allocation_failed_and_keeps_serving() {
    fill_a_thin_lun(1, "none", 72, 1);
}

#[test]
fn a_raid1_lun_whose_disks_fill_refuses_new_blocks_and_keeps_serving() {
    fill_a_thin_lun(2, "raid1:2", 72, 1);
}

/// RAID-5 (2+1) over three hosts: each holds half of the 64 MiB, which
/// 44 MiB disks (less the journal and the reserve) do not.
#[test]
fn an_erasure_coded_lun_whose_disks_fill_refuses_new_blocks_and_keeps_serving() {
    fill_a_thin_lun(3, "raid5:2+1", 44, 2);
}

/// Whether any file under `dir` but the nodes' logs holds `needle`.
fn any_file_holds(dir: &Path, needle: &[u8]) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_none_or(|extension| extension != "log") {
                let Ok(data) = std::fs::read(&path) else { continue };
                if data.windows(needle.len()).any(|window| window == needle) {
                    found.push(path);
                }
            }
        }
    }
    found
}

/// Text that says what it is, `bytes` of it.
fn marker_text(marker: &str, bytes: usize) -> Vec<u8> {
    (0..).flat_map(|line: u64| format!("{marker} line {line:08}\n").into_bytes()).take(bytes).collect()
}

/// An encrypted raid1(2) LUN on 3 hosts: no disk holds anything written to
/// it (a plain LUN beside it shows that the search finds what is there);
/// what was written reads back through every portal; a SANITIZE CRYPTO
/// ERASE through host 1 leaves no sector written before readable through
/// host 2 (whose reads go to each object's owner, wherever it is), blocks
/// never written read as zeros, and what is written after it reads back.
#[test]
fn an_encrypted_lun_keeps_no_plaintext_on_disk_and_a_crypto_erase_leaves_nothing_written_readable() {
    let _exclusive = exclusive();
    let (cluster, port) = cluster();
    // Four objects, owned by different hosts.
    let options = ["--size", "16MiB", "--policy", "raid1:2", "--object-size", "4MiB", "--encrypted"];
    let url = volume_and_target_as(&cluster, port, "enc", &options);
    let listed = tessera(&cluster, &["volume", "ls"]);
    assert!(listed.lines().any(|line| line.starts_with("enc ") && line.ends_with("encrypted")), "{listed}");
    let plain_target = "iqn.2026-11.org.tessera.test:plain";
    tessera(&cluster, &["volume", "create", "plain", "--size", "4MiB", "--policy", "raid1:2", "--object-size", "4MiB"]);
    tessera(&cluster, &["target", "create", plain_target, "--lun", "0=plain"]);
    let plain_url = format!("iscsi://{}/{plain_target}/0", portal(1, port));

    let dir = tempfile::tempdir().unwrap();
    let (secret, open) = (dir.path().join("secret.txt"), dir.path().join("open.txt"));
    let written = marker_text("encrypted-lun-secret", 8 << 20);
    std::fs::write(&secret, &written).unwrap();
    std::fs::write(&open, marker_text("plain-lun-text", 1 << 20)).unwrap();
    ok(&cluster, "qemu-img", &["convert", "-n", "-f", "raw", "-O", "raw", secret.to_str().unwrap(), &url]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !run(&cluster, "qemu-img", &["convert", "-n", "-f", "raw", "-O", "raw", open.to_str().unwrap(), &plain_url])
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "the plain LUN is not served");
        std::thread::sleep(Duration::from_millis(300));
    }
    let on_plain = any_file_holds(cluster.root(), b"plain-lun-text line 00000042");
    assert!(!on_plain.is_empty(), "the plain LUN's text is on no disk: the search finds nothing");
    let on_encrypted = any_file_holds(cluster.root(), b"encrypted-lun-secret line");
    assert!(on_encrypted.is_empty(), "the encrypted LUN's text is on disk in {on_encrypted:?}");

    let through_host_2 = format!("iscsi://{}/{TARGET}/0", portal(2, port));
    let read_all = |name: &str| -> Vec<u8> {
        let back = dir.path().join(name);
        ok(&cluster, "qemu-img", &["convert", "-f", "raw", "-O", "raw", &through_host_2, back.to_str().unwrap()]);
        std::fs::read(&back).unwrap()
    };
    let before = read_all("before.raw");
    assert!(before[..written.len()] == written[..], "the encrypted LUN does not read back what was written");
    assert!(before[written.len()..].iter().all(|&byte| byte == 0), "its unwritten rest reads as zeros");

    let session = Session::login("iqn.2026-11.org.tessera:eraser", &portal(1, port), TARGET, 0)
        .expect("a session through host 1");
    let started = Instant::now();
    let (status, sense) = session.sanitize(3).expect("SANITIZE CRYPTO ERASE answered");
    assert_eq!((status, sense), (STATUS_GOOD, None), "SANITIZE CRYPTO ERASE");
    let erased_in = started.elapsed();
    drop(session);

    let after = read_all("after.raw");
    let survivors =
        after[..written.len()].chunks(512).zip(written.chunks(512)).filter(|(after, before)| after == before).count();
    assert_eq!(survivors, 0, "{survivors} sectors written before the crypto erase still read back");
    assert!(!after.windows(20).any(|window| window == b"encrypted-lun-secret"), "the text still reads back");
    assert!(after[written.len()..].iter().all(|&byte| byte == 0), "blocks never written still read as zeros");
    // Written after the erase, through host 2; read through host 1.
    fn qemu_io(cluster: &TestCluster, port: u16, host: u64, command: &str) {
        let url = format!("iscsi://{}/{TARGET}/0", portal(host, port));
        let output = ok(cluster, "qemu-io", &["-f", "raw", "-c", command, &url]);
        assert!(!output.contains("verification failed"), "{command} through host {host}: {output}");
    }
    qemu_io(&cluster, port, 2, "write -P 0x3c 0 4M");
    qemu_io(&cluster, port, 1, "read -P 0x3c 0 4M");
    // The first object's owner dies: the next owner opens it with the key
    // the catalog recorded at the erase, and reads what was written since.
    let status = cluster.status().expect("the cluster answers status");
    let owner = status.objects.iter().find(|object| object.name == "enc.0").expect("object enc.0").owner;
    let mut cluster = cluster;
    cluster.kill(owner);
    qemu_io(&cluster, port, if owner == 1 { 2 } else { 1 }, "read -P 0x3c 0 4M");
    println!(
        "no disk holds the encrypted LUN's 8 MiB of text (the plain LUN's text is in {} files); \
         SANITIZE CRYPTO ERASE of 4 objects took {erased_in:?}; none of the 16384 sectors written before reads back; \
         what was written after it read back after host {owner}, the first object's owner, was killed",
        on_plain.len()
    );
}
