//! The iSCSI target service (issue 8).
//! - The discovery VIP: one target host binds it; discovery through it
//!   lists every target at the VIP; a login through it is redirected to the
//!   target's host; when its owner is killed, another host takes the VIP in
//!   the catalog, binds it, and discovery and logins work through it again.
//! - Target ownership balanced with site affinity, as hosts leave and join.
//! - An object's owner killed while another host serves its I/O, or both
//!   hosts of its copies away for a moment: that host holds the I/O until
//!   the object is taken over or a copy is back; no write fails.
//!
//! Needs libiscsi-bin (`scripts/test` installs it).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::harness::{exclusive, free_port, which, TestCluster};

const VIP_IP: &str = "127.0.0.200";
const TARGETS: [&str; 3] =
    ["iqn.2026-11.org.tessera.test:vip-a", "iqn.2026-11.org.tessera.test:vip-b", "iqn.2026-11.org.tessera.test:vip-c"];
/// Rounds of kill-and-take-over (`TESSERA_VIP_ROUNDS`, default 1;
/// `bench/vip.sh` runs more and reports the times).
fn rounds() -> usize {
    std::env::var("TESSERA_VIP_ROUNDS").ok().and_then(|rounds| rounds.parse().ok()).unwrap_or(1)
}

fn tool(name: &str) -> String {
    which(name)
        .unwrap_or_else(|| panic!("this test needs {name} (Debian package libiscsi-bin; scripts/test installs it)"))
}

fn run(cluster: &TestCluster, program: &str, args: &[&str]) -> std::process::Output {
    cluster.run_bounded(std::process::Command::new(tool(program)).args(args), Duration::from_secs(60))
}

fn tessera(cluster: &TestCluster, host: u64, args: &[&str]) -> String {
    let mut command = std::process::Command::new(crate::harness::binary());
    let output =
        cluster.run_bounded(command.args(args).args(["--admin", &cluster.admin(host)]), Duration::from_secs(60));
    assert!(output.status.success(), "tessera {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `hosts` hosts with the storage and target roles, host `n` in
/// `sites[n - 1]`, iSCSI on one port free on all their addresses; healthy.
fn target_hosts(hosts: u64, settings: &[(&str, &str)], sites: &[&str]) -> (TestCluster, u16) {
    target_hosts_with(hosts, settings, sites, |_| {})
}

/// As [`target_hosts`], with `edit` applied to each host's node.toml.
fn target_hosts_with(
    hosts: u64,
    settings: &[(&str, &str)],
    sites: &[&str],
    edit: impl Fn(&mut node::NodeConfig),
) -> (TestCluster, u16) {
    let ips: Vec<String> = (1..=hosts).map(|id| format!("127.0.0.{}", id + 10)).collect();
    let port = free_port(&ips.iter().map(String::as_str).collect::<Vec<_>>());
    let cluster = TestCluster::start_in_sites(hosts, settings, sites, |config| {
        config.roles = vec!["storage".into(), "target".into()];
        config.iscsi_port = port;
        edit(config);
    });
    cluster.wait_healthy(Duration::from_secs(60));
    (cluster, port)
}

/// A raid1(2) volume of `size` served as LUN 0 of `target`.
fn volume_and_target(cluster: &TestCluster, volume: &str, size: &str, target: &str) {
    volume_and_target_with(cluster, volume, size, "raid1:2", target)
}

fn volume_and_target_with(cluster: &TestCluster, volume: &str, size: &str, policy: &str, target: &str) {
    tessera(cluster, 1, &["volume", "create", volume, "--size", size, "--policy", policy]);
    tessera(cluster, 1, &["target", "create", target, "--lun", &format!("0={volume}")]);
}

/// `initiator`'s libiscsi session to LUN 0 of `target` through `portal`,
/// trying for 30 s (the target may still be coming up there).
fn login_through(initiator: &str, portal: &str, target: &str) -> crate::libiscsi::Session {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match crate::libiscsi::Session::login(initiator, portal, target, 0) {
            Ok(session) => return session,
            Err(error) => assert!(Instant::now() < deadline, "{initiator} cannot log in through {portal}: {error}"),
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The VIP's owner and epoch as the catalog records them.
fn vip_owner(cluster: &TestCluster) -> Option<(u64, u64)> {
    let vip = cluster.status()?.vip?;
    Some((vip.owner?, vip.epoch))
}

/// Discovery through the VIP: every target, each at the VIP's portal.
fn discovers_every_target(cluster: &TestCluster, vip: &str) -> Result<(), String> {
    let output = run(cluster, "iscsi-ls", &[&format!("iscsi://{vip}")]);
    let listed = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        return Err(format!("iscsi-ls failed: {listed}{}", String::from_utf8_lossy(&output.stderr)));
    }
    for target in TARGETS {
        if !listed.lines().any(|line| line.contains(&format!("Target:{target}")) && line.contains(vip)) {
            return Err(format!("{target} is not listed at {vip}: {listed}"));
        }
    }
    Ok(())
}

fn redirected(cluster: &TestCluster, hosts: &[u64]) -> f64 {
    hosts.iter().map(|host| cluster.metric(*host, "iscsi_vip_logins_redirected_total").unwrap_or(0.0)).sum()
}

#[test]
fn the_vip_moves_to_another_host_when_its_owner_is_killed_and_logins_through_it_are_redirected() {
    let _exclusive = exclusive();
    tool("iscsi-ls");
    let vip = format!("{VIP_IP}:{}", free_port(&[VIP_IP]));
    let (mut cluster, _) = target_hosts(3, &[("vip", &vip)], &[]);
    for (index, target) in TARGETS.iter().enumerate() {
        volume_and_target(&cluster, &format!("v{index}"), "16MiB", target);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut owner, mut epoch) = loop {
        if let (Some(owner), Ok(())) = (vip_owner(&cluster), discovers_every_target(&cluster, &vip)) {
            break owner;
        }
        assert!(Instant::now() < deadline, "no host bound the VIP {vip}\n{}", cluster.report());
        std::thread::sleep(Duration::from_millis(200));
    };
    let status = cluster.status().unwrap();
    assert!(status.vip.as_ref().is_some_and(|vip_status| vip_status.address == vip), "{:?}", status.vip);

    let mut takeovers = Vec::new();
    for round in 0..rounds() {
        // A login through the VIP lands on the target's owner: the VIP
        // answered with a redirection, and libiscsi followed it.
        let before = redirected(&cluster, &cluster.running());
        // Owners settle first (a host that just returned gets its share).
        let live: BTreeMap<u64, &str> = cluster.running().into_iter().map(|id| (id, "")).collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        let owned = loop {
            let owned = owners(&cluster, cluster.running()[0]);
            match balanced(&owned, &live) {
                Ok(()) => break owned,
                Err(problem) => assert!(Instant::now() < deadline, "target owners did not settle: {problem}"),
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        for target in TARGETS {
            let owner = owned[target].0.expect("every target has an owner");
            let logins = |cluster: &TestCluster| cluster.metric(owner, "iscsi_logins_total").unwrap_or(0.0);
            let logins_before = logins(&cluster);
            let url = format!("iscsi://{vip}/{target}/0");
            let output = run(&cluster, "iscsi-inq", &[&url]);
            let text = String::from_utf8_lossy(&output.stdout);
            assert!(output.status.success() && text.contains("Vendor:TESSERA"), "{url}: {text}");
            assert!(logins(&cluster) > logins_before, "the login to {target} did not reach its owner, host {owner}");
        }
        assert!(
            redirected(&cluster, &cluster.running()) >= before + TARGETS.len() as f64,
            "the logins through the VIP were not redirected"
        );

        cluster.kill(owner);
        let killed = Instant::now();
        let deadline = killed + Duration::from_secs(60);
        let (new_owner, new_epoch) = loop {
            if let Some((new_owner, new_epoch)) = vip_owner(&cluster).filter(|(new_owner, _)| *new_owner != owner) {
                if discovers_every_target(&cluster, &vip).is_ok() {
                    break (new_owner, new_epoch);
                }
            }
            assert!(Instant::now() < deadline, "the VIP did not move off killed host {owner}\n{}", cluster.report());
            std::thread::sleep(Duration::from_millis(100));
        };
        let took = killed.elapsed();
        assert!(new_epoch > epoch, "a new owner takes a new epoch ({epoch} → {new_epoch})");
        println!("round {round}: host {owner} killed; host {new_owner} bound the VIP and discovery works in {took:?}");
        takeovers.push(took);
        // The returning host does not take the VIP back from a live owner.
        cluster.start_host(owner);
        cluster.wait_healthy(Duration::from_secs(60));
        assert_eq!(vip_owner(&cluster).map(|(owner, _)| owner), Some(new_owner), "the VIP stays with its owner");
        (owner, epoch) = (new_owner, new_epoch);
    }
    takeovers.sort();
    println!(
        "VIP takeover (kill -9 to discovery through the VIP working) over {} rounds: p50 {:?}, worst {:?}",
        takeovers.len(),
        takeovers[takeovers.len() / 2],
        takeovers[takeovers.len() - 1]
    );
}

/// Target owners as `tessera target ls --json` reports them: name →
/// (owner, site affinity).
fn owners(cluster: &TestCluster, host: u64) -> BTreeMap<String, (Option<u64>, Option<String>)> {
    let listed: Vec<node::targets::TargetStatus> =
        serde_json::from_str(&tessera(cluster, host, &["target", "ls", "--json"])).unwrap();
    listed.into_iter().map(|target| (target.name, (target.owner, target.site))).collect()
}

/// Whether the owners are balanced over the `live` hosts (id → site):
/// affine targets owned in their site, counts within each objective
/// differing by at most one. Says what is wrong if not.
fn balanced(
    owners: &BTreeMap<String, (Option<u64>, Option<String>)>,
    live: &BTreeMap<u64, &str>,
) -> Result<(), String> {
    let mut objectives: BTreeMap<Option<String>, BTreeMap<u64, usize>> = BTreeMap::new();
    for (name, (owner, site)) in owners {
        let owner = owner.ok_or_else(|| format!("{name} has no owner"))?;
        let owner_site = live.get(&owner).ok_or_else(|| format!("{name} is owned by host {owner}, not a live one"))?;
        if let Some(site) = site {
            if *owner_site != site {
                return Err(format!("{name} is affine to {site} but owned by host {owner} of {owner_site}"));
            }
        }
        let load = objectives.entry(site.clone()).or_insert_with(|| {
            live.iter()
                .filter(|(_, host_site)| site.as_deref().is_none_or(|site| **host_site == site))
                .map(|(id, _)| (*id, 0))
                .collect()
        });
        *load.entry(owner).or_default() += 1;
    }
    for (site, load) in objectives {
        let (low, high) = (load.values().min().copied().unwrap_or(0), load.values().max().copied().unwrap_or(0));
        if high - low > 1 {
            return Err(format!("objective {site:?} is unbalanced: {load:?}"));
        }
    }
    Ok(())
}

#[test]
fn target_owners_stay_balanced_within_their_site_and_the_cluster_as_hosts_leave_and_join() {
    let _exclusive = exclusive();
    let sites = ["east", "east", "west", "west"];
    let (mut cluster, port) = target_hosts(4, &[], &sites);
    let all: BTreeMap<u64, &str> = (1..=4).map(|id| (id, sites[id as usize - 1])).collect();
    tessera(&cluster, 1, &["volume", "create", "shared", "--size", "16MiB", "--policy", "raid1:2"]);
    // 12 targets: 3 affine to east, 3 to west, 6 to neither.
    for index in 0..12 {
        let name = format!("iqn.2026-11.org.tessera.test:t{index:02}");
        let mut args = vec!["target", "create", &name, "--lun", "0=shared"];
        let site = match index % 4 {
            0 => Some("east"),
            1 => Some("west"),
            _ => None,
        };
        if let Some(site) = site {
            args.extend(["--site", site]);
        }
        tessera(&cluster, 1 + index % 4, &args);
    }
    let settled = |cluster: &TestCluster, live: &BTreeMap<u64, &str>, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let host = *live.keys().next().unwrap();
            let owners = owners(cluster, host);
            match balanced(&owners, live) {
                Ok(()) => return owners,
                Err(problem) if Instant::now() > deadline => panic!("{what}: {problem}\n{owners:#?}"),
                Err(_) => std::thread::sleep(Duration::from_millis(300)),
            }
        }
    };
    let created = settled(&cluster, &all, "after creating the targets");
    assert_eq!(created.len(), 12);
    println!("created: {created:?}");
    // A host of the west site leaves: its targets go to the other west host
    // (affine ones) or anywhere (the rest), balanced again.
    cluster.kill(4);
    let three: BTreeMap<u64, &str> = all.iter().filter(|(id, _)| **id != 4).map(|(id, site)| (*id, *site)).collect();
    let after_kill = settled(&cluster, &three, "after host 4 was killed");
    let kept = created.iter().filter(|(name, (owner, _))| *owner != Some(4) && after_kill[*name].0 == *owner).count();
    let survivors = created.values().filter(|(owner, _)| *owner != Some(4)).count();
    println!("after host 4 left: {after_kill:?}; {kept} of {survivors} targets of the live hosts kept their owner");
    assert_eq!(kept, survivors, "only host 4's targets move (no live host was over its share)");
    // It returns: the hosts hand it its share back on their own.
    cluster.start_host(4);
    cluster.wait_healthy(Duration::from_secs(60));
    let rejoined = settled(&cluster, &all, "after host 4 came back");
    assert!(rejoined.values().any(|(owner, _)| *owner == Some(4)), "the returning host owns its share: {rejoined:?}");
    // `tessera target balance` finds nothing to move in a balanced cluster.
    let output = tessera(&cluster, 2, &["target", "balance"]);
    assert!(output.contains("nothing moved"), "{output}");
    // Logins through any portal still work for every target (active-active).
    let url = format!("iscsi://127.0.0.14:{port}/iqn.2026-11.org.tessera.test:t01/0");
    let output = run(&cluster, "iscsi-inq", &[&url]);
    assert!(output.status.success(), "{url}: {}", String::from_utf8_lossy(&output.stderr));
}

/// One path to a LUN: a qemu-io process (libiscsi underneath) on one
/// portal, fed commands on stdin. Dropping it kills the process, so a write
/// left pending on a dead path can never land later.
struct IoPath {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    lines: std::sync::mpsc::Receiver<String>,
}

impl IoPath {
    fn open(url: &str) -> IoPath {
        use std::process::{Command, Stdio};
        let mut child = Command::new(tool("qemu-io"))
            .args(["-f", "raw", url])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting qemu-io");
        let (sender, lines) = std::sync::mpsc::channel();
        let streams: [Box<dyn std::io::Read + Send>; 2] =
            [Box::new(child.stdout.take().unwrap()), Box::new(child.stderr.take().unwrap())];
        for stream in streams {
            let sender = sender.clone();
            std::thread::spawn(move || {
                use std::io::BufRead;
                for line in std::io::BufReader::new(stream).lines().map_while(Result::ok) {
                    if sender.send(line).is_err() {
                        return;
                    }
                }
            });
        }
        let stdin = child.stdin.take().unwrap();
        IoPath { child, stdin, lines }
    }

    /// Writes one 4 KiB block of `pattern`; `Err` if qemu-io reports a
    /// failure, exits, or does not answer within `limit`.
    fn write(&mut self, block: u64, pattern: u8, limit: Duration) -> Result<(), String> {
        self.block_command("write", "wrote", block, pattern, limit)
    }

    /// Reads one 4 KiB block and checks it holds `pattern`, as `write`.
    fn read(&mut self, block: u64, pattern: u8, limit: Duration) -> Result<(), String> {
        self.block_command("read", "read", block, pattern, limit)
    }

    fn block_command(
        &mut self,
        verb: &str,
        done: &str,
        block: u64,
        pattern: u8,
        limit: Duration,
    ) -> Result<(), String> {
        use std::io::Write;
        let offset = block * 4096;
        writeln!(self.stdin, "{verb} -P {pattern} {offset} 4096")
            .map_err(|error| format!("qemu-io is gone: {error}"))?;
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(&format!("{done} 4096/4096 bytes at offset {offset}")) => return Ok(()),
                Ok(line) if line.contains("failed") || line.contains("error") => return Err(line),
                Ok(_) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => return Err(format!("no answer within {limit:?}")),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Err("qemu-io exited".into()),
            }
        }
    }
}

impl Drop for IoPath {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the writer learned: per block, the last acknowledged pattern and
/// the patterns of writes that failed after it (they may or may not have
/// landed); and the longest time without an acknowledgement.
#[derive(Default)]
struct WriteLedger {
    acked: BTreeMap<u64, u8>,
    uncertain: BTreeMap<u64, Vec<u8>>,
    writes: u64,
    /// The next write's sequence number (rounds go on where the last ended).
    seq: u64,
    after_failover: u64,
    stall: Option<Duration>,
}

const FAILOVER_BLOCKS: u64 = 1024;
/// How long a write may go unanswered before the path counts as failed.
const PATH_TIMEOUT: Duration = Duration::from_secs(3);

/// Writes a self-verifying pattern (block `seq % FAILOVER_BLOCKS`, pattern
/// `seq % 251 + 1`) through `paths[0]` until it fails, then through
/// `paths[1]`, retrying each failed write until it is acknowledged, as a
/// multipath initiator does; stops `after` the first failure.
fn write_with_failover(
    ledger: &mut WriteLedger,
    paths: [String; 2],
    stop: &std::sync::atomic::AtomicBool,
    after: Duration,
) {
    use std::sync::atomic::Ordering;
    (ledger.after_failover, ledger.stall) = (0, None);
    let mut path = IoPath::open(&paths[0]);
    let mut on_second = false;
    let mut failed_at: Option<Instant> = None;
    let mut last_ack = Instant::now();
    loop {
        if stop.load(Ordering::Relaxed) || failed_at.is_some_and(|at| at.elapsed() > after) {
            return;
        }
        let (block, pattern) = (ledger.seq % FAILOVER_BLOCKS, (ledger.seq % 251 + 1) as u8);
        loop {
            match path.write(block, pattern, PATH_TIMEOUT) {
                Ok(()) => {
                    let stalled = last_ack.elapsed();
                    if failed_at.is_some() && ledger.stall.is_none_or(|stall| stalled > stall) {
                        ledger.stall = Some(stalled);
                    }
                    last_ack = Instant::now();
                    ledger.acked.insert(block, pattern);
                    ledger.uncertain.remove(&block);
                    ledger.writes += 1;
                    if on_second {
                        ledger.after_failover += 1;
                    }
                    break;
                }
                Err(error) => {
                    ledger.uncertain.entry(block).or_default().push(pattern);
                    failed_at.get_or_insert_with(Instant::now);
                    assert!(
                        last_ack.elapsed() < Duration::from_secs(120),
                        "no write acknowledged for 2 minutes: {error}"
                    );
                    if !on_second {
                        println!(
                            "path 1 failed ({error}) after {} writes: failing over to {}",
                            ledger.writes, paths[1]
                        );
                        on_second = true;
                        path = IoPath::open(&paths[1]);
                    } else {
                        // The surviving host may still be taking the
                        // objects over; a path whose process gave up is
                        // opened again.
                        std::thread::sleep(Duration::from_millis(200));
                        if path.child.try_wait().ok().flatten().is_some() {
                            path = IoPath::open(&paths[1]);
                        }
                    }
                }
            }
        }
        ledger.seq += 1;
    }
}

/// Rounds of kill-and-fail-over (`TESSERA_FAILOVER_ROUNDS`, default 1;
/// `bench/failover.sh` runs 10 and reports the stalls).
fn failover_rounds() -> usize {
    std::env::var("TESSERA_FAILOVER_ROUNDS").ok().and_then(|rounds| rounds.parse().ok()).unwrap_or(1)
}

#[test]
fn killing_the_host_an_initiator_writes_through_fails_over_to_another_portal_with_no_acknowledged_write_lost() {
    let _exclusive = exclusive();
    tool("qemu-io");
    tool("qemu-img");
    let (mut cluster, port) = target_hosts(3, &[], &[]);
    const TARGET: &str = "iqn.2026-11.org.tessera.test:failover";
    volume_and_target(&cluster, "fo", "64MiB", TARGET);
    let url = |host: u64| format!("iscsi://127.0.0.{}:{port}/{TARGET}/0", host + 10);
    let mut ledger = WriteLedger::default();
    let mut stalls = Vec::new();
    for round in 0..failover_rounds() {
        // Host 1 holds the log leader's seat more often than not; the
        // initiator uses host 2 or 3 and fails over to the other.
        let (used, other) = if round % 2 == 0 { (2, 3) } else { (3, 2) };
        let stop = std::sync::atomic::AtomicBool::new(false);
        let killed_at = std::thread::scope(|scope| {
            let paths = [url(used), url(other)];
            let ledger = &mut ledger;
            let writer = scope.spawn(|| write_with_failover(ledger, paths, &stop, Duration::from_secs(15)));
            // The used host takes the object over (ownership follows
            // I/O), so the kill takes the owner too.
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let owners: Vec<u64> =
                    cluster.status().map(|status| status.objects.iter().map(|o| o.owner).collect()).unwrap_or_default();
                if !owners.is_empty() && owners.iter().all(|owner| *owner == used) {
                    break;
                }
                assert!(Instant::now() < deadline, "host {used} did not take the object over: owners {owners:?}");
                std::thread::sleep(Duration::from_millis(200));
            }
            std::thread::sleep(Duration::from_secs(1));
            println!("round {round}: host {used} owns the object; killing it");
            cluster.kill(used);
            let killed_at = Instant::now();
            // The writer stops 15 s after its path failed; if the path
            // never fails, it is stopped here and the test fails below.
            while !writer.is_finished() && killed_at.elapsed() < Duration::from_secs(90) {
                std::thread::sleep(Duration::from_millis(100));
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            writer.join().unwrap();
            killed_at
        });
        let stall = ledger.stall.expect("the writer saw its path fail");
        println!(
            "round {round}: host {used} killed {:?} ago; {} writes acknowledged in all, {} after failing over to host \
             {other}; longest time without an acknowledgement: {stall:?} (target < 10 s)",
            killed_at.elapsed(),
            ledger.writes,
            ledger.after_failover
        );
        assert!(ledger.after_failover >= 10, "I/O did not resume through host {other}");
        stalls.push(stall);
        // Every acknowledged write is there (or a later one that failed
        // but may have landed).
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("lun.raw");
        let output =
            run(&cluster, "qemu-img", &["convert", "-f", "raw", "-O", "raw", &url(other), image.to_str().unwrap()]);
        assert!(output.status.success(), "reading the LUN back: {}", String::from_utf8_lossy(&output.stderr));
        let data = std::fs::read(&image).unwrap();
        let mut lost = Vec::new();
        for block in 0..FAILOVER_BLOCKS {
            let bytes = &data[block as usize * 4096..(block as usize + 1) * 4096];
            let value = bytes[0];
            let uniform = bytes.iter().all(|byte| *byte == value);
            let mut allowed: Vec<u8> = ledger.uncertain.get(&block).cloned().unwrap_or_default();
            allowed.push(ledger.acked.get(&block).copied().unwrap_or(0));
            if !uniform || !allowed.contains(&value) {
                lost.push((block, value, uniform, allowed));
            }
        }
        assert!(
            lost.is_empty(),
            "{} blocks lost an acknowledged write (block, found, uniform, allowed): {:?}",
            lost.len(),
            &lost[..lost.len().min(10)]
        );
        println!(
            "round {round}: all {FAILOVER_BLOCKS} blocks hold their last acknowledged write (or a later one in flight)"
        );
        // What is on disk now is what was read: nothing is uncertain any more.
        for block in 0..FAILOVER_BLOCKS {
            let value = data[block as usize * 4096];
            ledger.uncertain.remove(&block);
            if value != 0 {
                ledger.acked.insert(block, value);
            }
        }
        cluster.start_host(used);
        cluster.wait_healthy(Duration::from_secs(120));
    }
    stalls.sort();
    println!(
        "I/O stall on failover (longest time without an acknowledged write, path timeout {PATH_TIMEOUT:?} included) \
         over {} rounds: p50 {:?}, worst {:?}",
        stalls.len(),
        stalls[stalls.len() / 2],
        stalls[stalls.len() - 1]
    );
}

/// Blocks the held-I/O scenarios write (one each, in turn).
const HELD_BLOCKS: u64 = 64;
// The raid5 scenario reads block `CHUNK_BLOCKS`, written before its kills.
const _: () = assert!(objects::ec::CHUNK_BLOCKS < HELD_BLOCKS / 2);
/// A held-I/O scenario's writes are paced (about 40 a second) so that
/// ownership does not follow them to the host serving them (it moves after
/// 256 forwarded I/Os within 2 s).
const HELD_PACE: Duration = Duration::from_millis(25);

fn held_pattern(seq: u64) -> u8 {
    (seq % 251 + 1) as u8
}

/// A 3-host cluster serving a 64 MiB volume of `policy` (one object) as
/// LUN 0 of `target`, holding I/O up to `hold_secs` (`io_hold_secs`); the
/// URL of each host's portal to it, and the object once it has an owner.
fn held_io_cluster(
    target: &str,
    policy: &str,
    hold_secs: u64,
) -> (TestCluster, impl Fn(u64) -> String, node::status::ObjectStatus) {
    let (cluster, port) = target_hosts_with(3, &[], &[], |config| config.io_hold_secs = hold_secs);
    volume_and_target_with(&cluster, "held", "64MiB", policy, target);
    let target = target.to_string();
    let url = move |host: u64| format!("iscsi://127.0.0.{}:{port}/{target}/0", host + 10);
    let deadline = Instant::now() + Duration::from_secs(30);
    let object = loop {
        if let Some(object) = the_object(&cluster).filter(|object| object.owner != 0) {
            break object;
        }
        assert!(Instant::now() < deadline, "the volume's object has no owner: {}", cluster.report());
        std::thread::sleep(Duration::from_millis(200));
    };
    (cluster, url, object)
}

/// Of a held-I/O cluster's raid1(2) object: the host that takes it over
/// if its owner goes (the lowest-numbered live one holding a copy, see
/// `should_own`), and the third host, through which an initiator's I/O is
/// forwarded to the owner before and after.
fn successor_and_serving(object: &node::status::ObjectStatus) -> (Option<u64>, u64) {
    let owner = object.owner;
    let successor = object.components.iter().map(|component| component.host).filter(|host| *host != owner).min();
    let serving = (1..=3).find(|host| *host != owner && Some(*host) != successor).unwrap();
    (successor, serving)
}

/// The one object of a held-I/O scenario's cluster.
fn the_object(cluster: &TestCluster) -> Option<node::status::ObjectStatus> {
    objects_of(cluster.status()?)
}

/// The one object of a held-I/O scenario's cluster once its owner has
/// opened it (the record's owner epoch is 0 until then).
fn the_opened_object(cluster: &TestCluster) -> node::status::ObjectStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(object) = the_object(cluster).filter(|object| object.owner_epoch >= 1) {
            return object;
        }
        assert!(Instant::now() < deadline, "the object was not opened: {}", cluster.report());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Block 0 of object `name` filled with `fill`, sent straight to the host at
/// `address` (`OBJECT_IO`) for `ownership`, as a forwarding host sends it:
/// the answer.
fn raw_write(
    runtime: &tokio::runtime::Runtime,
    transport: &wire::tcp::TcpTransport,
    address: &str,
    name: &str,
    ownership: Option<node::storage::Ownership>,
    fill: u8,
) -> node::storage::IoReply {
    use node::storage::{method, IoHeader, IoRequest};
    use wire::Transport;
    let header = IoHeader { ownership, io: IoRequest::Write { name: name.to_string(), offset: 0 } };
    let payload = objects::component::frame(&header, &[fill; 4096]);
    let reply = runtime.block_on(transport.call(address, method::OBJECT_IO, payload, Duration::from_secs(30)));
    let (reply, _): (node::storage::IoReply, bytes::Bytes) =
        objects::component::unframe(&reply.expect("an answer to the request")).expect("an object reply");
    reply
}

/// The one object as host `host` sees it (a host cut off from its peers
/// still answers the test, from a catalog that no longer changes).
fn the_object_seen_by(cluster: &TestCluster, host: u64) -> Option<node::status::ObjectStatus> {
    let status = cluster.get(host, "/api/v1/status").ok().and_then(|value| serde_json::from_value(value).ok())?;
    objects_of(status)
}

fn objects_of(status: node::status::ClusterStatus) -> Option<node::status::ObjectStatus> {
    let objects = status.objects;
    assert!(objects.len() <= 1, "a 64 MiB volume is one object: {objects:?}");
    objects.into_iter().next()
}

/// Writes blocks `seqs` through `path`, paced; each must be acknowledged
/// within `limit`. Returns the longest a write waited.
fn held_writes(path: &mut IoPath, seqs: std::ops::Range<u64>, limit: Duration, what: &str) -> Duration {
    let mut longest = Duration::ZERO;
    for seq in seqs {
        let started = Instant::now();
        path.write(seq, held_pattern(seq), limit).unwrap_or_else(|error| {
            panic!("write {seq} {what} failed: {error}; it should have waited until the object was served again")
        });
        longest = longest.max(started.elapsed());
        std::thread::sleep(HELD_PACE);
    }
    longest
}

/// Writes through `path`, to host `host`, not paced, until the object's
/// ownership has followed them there (256 forwarded I/Os within 2 s, at
/// most once per host in 5 minutes); block `n` of the first
/// `HELD_BLOCKS / 4` then holds `held_pattern(n)`.
fn follow_writes_to(cluster: &TestCluster, path: &mut IoPath, host: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seq = 0;
    while the_object(cluster).map(|object| object.owner) != Some(host) {
        assert!(Instant::now() < deadline, "ownership did not follow the writes to host {host}");
        for _ in 0..300 {
            let block = seq % (HELD_BLOCKS / 4);
            path.write(block, held_pattern(block), Duration::from_secs(30))
                .unwrap_or_else(|error| panic!("write {seq} through host {host}: {error}"));
            seq += 1;
        }
    }
}

/// Host `serving` held at least one command (`iscsi_io_held_total`).
fn assert_held_some(cluster: &TestCluster, serving: u64) {
    let held = cluster.metric(serving, "iscsi_io_held_total");
    assert!(held.is_some_and(|held| held >= 1.0), "host {serving} held no I/O: {held:?}");
}

/// Every block a held-I/O scenario wrote holds its write.
fn held_blocks_read_back(cluster: &TestCluster, url: &str) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("lun.raw");
    let output = run(cluster, "qemu-img", &["convert", "-f", "raw", "-O", "raw", url, image.to_str().unwrap()]);
    assert!(output.status.success(), "reading the LUN back: {}", String::from_utf8_lossy(&output.stderr));
    let data = std::fs::read(&image).unwrap();
    for seq in 0..HELD_BLOCKS {
        let block = &data[seq as usize * 4096..(seq as usize + 1) * 4096];
        assert!(
            block.iter().all(|byte| *byte == held_pattern(seq)),
            "block {seq} does not hold its acknowledged write"
        );
    }
}

#[test]
fn killing_an_objects_owner_holds_the_io_another_host_serves_until_the_object_is_taken_over() {
    owner_away_holds_the_io("iqn.2026-11.org.tessera.test:held", Outage::Kill);
}

/// The same with the owner cut off from its peers rather than killed: its
/// process runs on and the serving host's requests to it go unanswered.
/// The serving host gives up on a forwarded I/O once the catalog names a
/// new owner, rather than wait out the block client's I/O timeout (30 s),
/// and holds it until the new owner serves it. Needs nftables (`nft`) and
/// root, as the partition scenarios do.
#[test]
fn cutting_an_objects_owner_off_holds_the_io_another_host_serves_until_the_object_is_taken_over() {
    owner_away_holds_the_io("iqn.2026-11.org.tessera.test:cut", Outage::Cut);
}

/// The same, with no I/O from the cut until the serving host's catalog
/// names a new owner: the next I/O goes to that owner, not to the cut-off
/// one the serving host last sent to (which would answer nothing for the
/// block client's whole I/O timeout).
#[test]
fn an_io_after_an_idle_takeover_of_a_cut_off_owners_object_goes_to_the_new_owner() {
    owner_away_holds_the_io("iqn.2026-11.org.tessera.test:cut-idle", Outage::CutThenIdle);
}

/// How a held-I/O scenario takes an object's owner away.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Outage {
    /// kill -9, with the writes going on.
    Kill,
    /// Cut off from its peers (nftables), its process running on, with
    /// the writes going on.
    Cut,
    /// Cut off, and no writes until the serving host's catalog names a new
    /// owner.
    CutThenIdle,
}

/// A 3-host cluster with a raid1(2) object; an initiator writes through a
/// host that is not the object's owner, which forwards each I/O to the
/// owner; the owner is taken away by `outage`, and not one later write
/// fails: each waits, on the serving host, until another host has taken
/// the object over. Every acknowledged write is read back.
fn owner_away_holds_the_io(target: &str, outage: Outage) {
    let _exclusive = exclusive();
    tool("qemu-io");
    tool("qemu-img");
    // The default hold: a takeover takes about 5-10 s.
    let (mut cluster, url, object) = held_io_cluster(target, "raid1:2", 20);
    let owner = object.owner;
    let (successor, serving) = successor_and_serving(&object);
    let mut path = IoPath::open(&url(serving));
    held_writes(&mut path, 0..HELD_BLOCKS / 4, Duration::from_secs(30), "before the outage");
    let owner_now = the_object(&cluster).map(|object| object.owner);
    assert_eq!(owner_now, Some(owner), "ownership moved before the outage; the test needs it not to");
    println!("host {owner} owns the object, host {serving} serves the initiator; {outage:?} host {owner}");
    // A host cut off from its peers still answers the test, from a catalog
    // that no longer changes: the serving host says who owns the object.
    let owner_seen = |cluster: &TestCluster| the_object_seen_by(cluster, serving).map(|object| object.owner);
    let cut = match outage {
        Outage::Kill => {
            cluster.kill(owner);
            None
        }
        Outage::Cut | Outage::CutThenIdle => {
            Some(crate::harness::Cut::off_from_peers(&format!("127.0.0.{}", owner + 10)))
        }
    };
    if outage == Outage::CutThenIdle {
        let deadline = Instant::now() + Duration::from_secs(30);
        while owner_seen(&cluster).is_none_or(|seen| seen == owner) {
            assert!(Instant::now() < deadline, "host {serving}'s catalog still names host {owner} the owner");
            std::thread::sleep(Duration::from_millis(200));
        }
        println!("host {serving}'s catalog names host {:?} the owner", owner_seen(&cluster));
    }
    // A cut-off owner answers nothing: each write must be answered well
    // within the 30 s a request to it would wait.
    let limit = Duration::from_secs(if outage == Outage::Kill { 30 } else { 20 });
    let what = format!("through host {serving} after its object's owner (host {owner}) was taken away ({outage:?})");
    let longest = held_writes(&mut path, HELD_BLOCKS / 4..HELD_BLOCKS, limit, &what);
    let new_owner = owner_seen(&cluster);
    println!(
        "all {} writes after the outage acknowledged; the longest waited {longest:?}; the object's owner is now \
         host {new_owner:?}",
        HELD_BLOCKS - HELD_BLOCKS / 4
    );
    assert!(new_owner.is_some_and(|new| new != owner), "the object was not taken over: owner {new_owner:?}");
    assert_eq!(new_owner, successor, "the object was taken over by another host than expected");
    if outage != Outage::CutThenIdle {
        assert_held_some(&cluster, serving);
    }
    drop(path);
    drop(cut);
    held_blocks_read_back(&cluster, &url(serving));
}

/// A COMPARE AND WRITE forwarded to an owner cut off from its peers may
/// have written, so it is not held and tried again as other I/O is: it
/// ends with its outcome unknown (NOT READY) soon after another host takes
/// the object over, not after the block client's 30 s I/O timeout. The
/// block then holds the old or the new data, and the next COMPARE AND
/// WRITE, at the new owner, succeeds. Needs nftables (`nft`) and root.
#[test]
fn a_compare_and_write_forwarded_to_a_cut_off_owner_ends_soon_after_the_takeover() {
    use crate::libiscsi::{STATUS_CHECK_CONDITION, STATUS_GOOD};
    const SENSE_NOT_READY: u8 = 0x02;
    let _exclusive = exclusive();
    const TARGET: &str = "iqn.2026-11.org.tessera.test:cut-ats";
    let (cluster, url, object) = held_io_cluster(TARGET, "raid1:2", 20);
    let owner = object.owner;
    let (_, serving) = successor_and_serving(&object);
    let portal = url(serving).trim_start_matches("iscsi://").split('/').next().unwrap().to_string();
    let session = login_through("iqn.2026-11.org.tessera.test:cut-ats", &portal, TARGET);
    let block = |fill: u8| [fill; 512];
    let both = |old: [u8; 512], new: [u8; 512]| {
        let mut both = [0u8; 1024];
        both[..512].copy_from_slice(&old);
        both[512..].copy_from_slice(&new);
        both
    };
    let answer = session.compare_and_write(0, &mut both(block(0), block(1))).expect("COMPARE AND WRITE");
    assert_eq!(answer, (STATUS_GOOD, None), "the first COMPARE AND WRITE, through host {serving}");
    assert_eq!(the_object(&cluster).map(|object| object.owner), Some(owner), "ownership moved before the cut");
    println!("host {owner} owns the object, host {serving} serves the initiator; cutting host {owner} off");
    let cut = crate::harness::Cut::off_from_peers(&format!("127.0.0.{}", owner + 10));
    let (sender, answered) = std::sync::mpsc::channel();
    let started = Instant::now();
    std::thread::spawn(move || {
        let answer = session.compare_and_write(0, &mut both(block(1), block(2)));
        let _ = sender.send((answer, session));
    });
    let (answer, session) = answered
        .recv_timeout(Duration::from_secs(20))
        .expect("the COMPARE AND WRITE sent to the cut-off owner was not answered within 20 s");
    let waited = started.elapsed();
    let answer = answer.expect("COMPARE AND WRITE");
    println!("the COMPARE AND WRITE sent to the cut-off owner ended after {waited:?}: {answer:?}");
    // Sent after the cut, it could only have been answered by giving up.
    assert_eq!(
        answer,
        (STATUS_CHECK_CONDITION, Some(SENSE_NOT_READY)),
        "a COMPARE AND WRITE whose outcome is unknown ends NOT READY"
    );
    let mut read = [0u8; 512];
    assert_eq!(session.settled(|s| s.read10(0, &mut read)), Ok(STATUS_GOOD));
    assert!(read == block(1) || read == block(2), "block 0 holds neither the old nor the new data");
    // The next one goes to the new owner. One that fails may have written
    // all the same: read to learn which.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer = session.compare_and_write(0, &mut both(read, block(3))).expect("COMPARE AND WRITE");
        if answer.0 == STATUS_GOOD {
            break;
        }
        let mut now = [0u8; 512];
        assert_eq!(session.settled(|s| s.read10(0, &mut now)), Ok(STATUS_GOOD));
        if now == block(3) {
            break;
        }
        assert!(now == read, "block 0 changed under the initiator, with no COMPARE AND WRITE of its own answered");
        assert!(Instant::now() < deadline, "COMPARE AND WRITE after the takeover: {answer:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(session.settled(|s| s.read10(0, &mut read)), Ok(STATUS_GOOD));
    assert_eq!(read, block(3));
    let new_owner = the_object_seen_by(&cluster, serving).map(|object| object.owner);
    assert!(new_owner.is_some_and(|new| new != owner), "the object was not taken over: owner {new_owner:?}");
    // Whatever the cut-off owner did meanwhile does not come back with it.
    drop(cut);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(session.settled(|s| s.read10(0, &mut read)), Ok(STATUS_GOOD));
    assert_eq!(read, block(3), "block 0 changed when the cut-off owner came back");
}

/// A request a host forwarded to an object's owner, and gave up on, can
/// reach that owner long after it was sent (queued on the connection to
/// it while it was cut off, delivered when the cut heals). Should that host
/// own the object again by then, the request must not be carried out over
/// the writes acknowledged since. Ownership follows an initiator's writes
/// to another host and back, so the first owner owns the object again, at
/// a later epoch; a write sent for the first epoch then reaches it and is
/// refused, and block 0 keeps the write acknowledged last. The same write,
/// sent for the current epoch, is carried out.
#[test]
fn a_request_sent_for_an_earlier_owner_epoch_is_refused_by_its_host_owning_the_object_again() {
    use node::storage::{IoReply, Ownership};
    let _exclusive = exclusive();
    tool("qemu-io");
    let (cluster, url, _) = held_io_cluster("iqn.2026-11.org.tessera.test:epoch", "raid1:2", 20);
    let object = the_opened_object(&cluster);
    let first = object.owner;
    let other = (1..=3).find(|host| *host != first).unwrap();
    let mut path = IoPath::open(&url(other));
    follow_writes_to(&cluster, &mut path, other);
    drop(path);
    let mut path = IoPath::open(&url(first));
    follow_writes_to(&cluster, &mut path, first);
    let now = the_object(&cluster).unwrap();
    println!(
        "host {first} owned the object at epoch {}, host {other} took it over, host {first} took it back at epoch {}",
        object.owner_epoch, now.owner_epoch
    );
    assert!(now.owner_epoch >= object.owner_epoch + 2, "the owner epoch did not move twice: {now:?}");
    const LATEST: u8 = 0x11;
    const LATE: u8 = 0x5a;
    path.write(0, LATEST, Duration::from_secs(30)).expect("writing block 0 at the owner's current epoch");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let transport = wire::tcp::TcpTransport::new();
    let send = |ownership: Option<Ownership>| -> IoReply {
        raw_write(&runtime, &transport, &cluster.address(first), &object.name, ownership, LATE)
    };
    let current = Ownership { object: object.id, epoch: now.owner_epoch };
    let stale = Ownership { object: object.id, epoch: object.owner_epoch };
    let deleted = Ownership { object: object.id ^ 1, epoch: now.owner_epoch };
    let later = Ownership { object: object.id, epoch: now.owner_epoch + 1 };
    // Sent for the first epoch, or for an earlier object of the name, or
    // asking which host owns the object: the answer names this host at its
    // ownership. Sent for a later epoch than this host's catalog knows: no
    // owner to name. Nothing is written.
    for ownership in [Some(stale), Some(deleted), None, Some(later)] {
        match (send(ownership), ownership == Some(later)) {
            (IoReply::NotOwner { owner: Some(owner), ownership: Some(answered), .. }, false)
                if owner == first && answered == current => {}
            (IoReply::NotOwner { owner: None, address: None, ownership: None }, true) => {}
            (reply, _) => panic!("a write sent to host {first} for {ownership:?} was answered {reply:?}"),
        }
        path.read(0, LATEST, Duration::from_secs(30)).unwrap_or_else(|error| {
            panic!("block 0 no longer holds the write acknowledged last after a write sent for {ownership:?}: {error}")
        });
    }
    // Sent for the current epoch: carried out.
    let reply = send(Some(current));
    assert!(matches!(reply, IoReply::Done), "a write sent for the current ownership was answered {reply:?}");
    path.read(0, LATE, Duration::from_secs(30)).expect("block 0 holds the write sent for the current ownership");
}

/// Ownership follows an initiator's writes through another host while
/// the owner's host serves a chain of COMPARE AND WRITEs of its own (VMFS's
/// ATS heartbeat, say), each writing the next number over the last. The
/// owner hands the object over only once the one it is writing is
/// answered (`OBJECT_HAND_OVER`): every COMPARE AND WRITE of the chain is
/// answered GOOD, before, during and after the move (taken over without
/// the owner's consent, the one under way ends NOT READY, its outcome
/// unknown), and the block holds the chain's last number. Then it follows
/// writes through the third host, while the chain's COMPARE AND WRITEs
/// are forwarded to the owner they moved to: those are answered GOOD too.
/// (The chain has one under way most of the time, not always: a move
/// without the handover fails this test most of the time.)
#[test]
fn a_takeover_following_the_io_waits_for_the_compare_and_write_the_owner_is_writing() {
    use crate::libiscsi::STATUS_GOOD;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    const TARGET: &str = "iqn.2026-11.org.tessera.test:handover";
    // Block 100 (of 4 KiB): not one of those `follow_writes_to` writes.
    const LBA: u64 = 800;
    let _exclusive = exclusive();
    tool("qemu-io");
    let (cluster, url, object) = held_io_cluster(TARGET, "raid1:2", 20);
    let owner = object.owner;
    let other = (1..=3).find(|host| *host != owner).unwrap();
    let third = (1..=3).find(|host| *host != owner && *host != other).unwrap();
    let portal = url(owner).trim_start_matches("iscsi://").split('/').next().unwrap().to_string();
    let session = login_through("iqn.2026-11.org.tessera.test:handover-ats", &portal, TARGET);
    let numbered = |number: u64| {
        let mut block = [0u8; 512];
        block[..8].copy_from_slice(&number.to_le_bytes());
        block
    };
    let mut block = [0u8; 512];
    assert_eq!(session.settled(|s| s.read10(LBA as u32, &mut block)), Ok(STATUS_GOOD));
    assert_eq!(block, numbered(0), "a new volume reads as zeros");
    let stop = Arc::new(AtomicBool::new(false));
    let chain = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut number, mut failures, mut longest) = (0u64, Vec::new(), Duration::ZERO);
            while !stop.load(Ordering::SeqCst) {
                let mut both = [0u8; 1024];
                both[..512].copy_from_slice(&numbered(number));
                both[512..].copy_from_slice(&numbered(number + 1));
                let started = Instant::now();
                let answer = session.compare_and_write(LBA, &mut both);
                longest = longest.max(started.elapsed());
                match answer {
                    Ok((STATUS_GOOD, None)) => number += 1,
                    answer => {
                        // Go on from what the block holds.
                        failures.push(format!("COMPARE AND WRITE of {}: {answer:?}", number + 1));
                        let mut now = [0u8; 512];
                        assert_eq!(session.settled(|s| s.read10(LBA as u32, &mut now)), Ok(STATUS_GOOD));
                        number = u64::from_le_bytes(now[..8].try_into().unwrap());
                    }
                }
            }
            (number, failures, longest, session)
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    for (to, moves) in [(other, "first"), (third, "second")] {
        let mut path = IoPath::open(&url(to));
        follow_writes_to(&cluster, &mut path, to);
        println!("the {moves} move: host {to} took the object over");
        // On through the move: now forwarded from the first owner's host.
        std::thread::sleep(Duration::from_secs(1));
    }
    stop.store(true, Ordering::SeqCst);
    let (number, failures, longest, session) = chain.join().expect("the chain of COMPARE AND WRITEs");
    let now = the_object(&cluster).unwrap();
    println!(
        "{number} COMPARE AND WRITEs through host {owner} while host {other}, then host {third}, took the object \
         over (epoch {} to {}); the longest took {longest:?}",
        object.owner_epoch, now.owner_epoch
    );
    assert!(failures.is_empty(), "COMPARE AND WRITEs not answered GOOD across the moves: {failures:?}");
    assert_eq!(now.owner, third);
    assert_eq!(session.settled(|s| s.read10(LBA as u32, &mut block)), Ok(STATUS_GOOD));
    assert_eq!(block, numbered(number), "the block does not hold the chain's last COMPARE AND WRITE");
}

/// An owner hands its object over to a host that then never takes it (the
/// test asks, in that host's name): asked the same again (its answer
/// lost), it answers the same; asked for another host, it refuses. While
/// it holds the object for that host it does not open it again, and sends
/// requests for it there. Once the hold ends it opens the object again
/// itself, at the next epoch, and the write its initiator sent meanwhile,
/// held, is carried out.
#[test]
fn an_object_handed_over_to_a_host_that_never_takes_it_is_opened_again_by_its_owner() {
    use node::storage::{method, HandOver, HandedOver, IoReply, Ownership};
    let _exclusive = exclusive();
    tool("qemu-io");
    let (cluster, url, _) = held_io_cluster("iqn.2026-11.org.tessera.test:hold", "raid1:2", 30);
    let object = the_opened_object(&cluster);
    let owner = object.owner;
    let to = (1..=3).find(|host| *host != owner).unwrap();
    let third = (1..=3).find(|host| *host != owner && *host != to).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let transport = wire::tcp::TcpTransport::new();
    let ownership = Ownership { object: object.id, epoch: object.owner_epoch };
    let ask = |asking: u64| -> HandedOver {
        let asked = HandOver { name: object.name.clone(), ownership, to: asking };
        let address = cluster.address(owner);
        let call = wire::call(&transport, &address, method::OBJECT_HAND_OVER, &asked, Duration::from_secs(10));
        runtime.block_on(call).expect("an answer to the handover")
    };
    assert_eq!(ask(to), HandedOver::Closed);
    assert_eq!(ask(to), HandedOver::Closed, "the same question asked again");
    assert_eq!(ask(third), HandedOver::NotOwner, "asked for another host than the one it was handed to");
    match raw_write(&runtime, &transport, &cluster.address(owner), &object.name, Some(ownership), 0x5a) {
        IoReply::NotOwner { owner: Some(named), address: Some(address), ownership: None }
            if named == to && address == cluster.address(to) => {}
        reply => panic!("a write for the object handed to host {to} was answered {reply:?}"),
    }
    // Held for host `to` (10 s): not opened again meanwhile.
    for _ in 0..30 {
        let now = the_object(&cluster).unwrap();
        assert_eq!((now.owner, now.owner_epoch), (owner, object.owner_epoch), "opened again while held for host {to}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut path = IoPath::open(&url(owner));
    path.write(0, 0x33, Duration::from_secs(40)).expect("a write held until the owner opened the object again");
    let now = the_object(&cluster).unwrap();
    assert_eq!((now.owner, now.owner_epoch), (owner, object.owner_epoch + 1), "not opened again by its owner");
    path.read(0, 0x33, Duration::from_secs(30)).expect("block 0 holds the write");
}

#[test]
fn every_copy_of_an_object_away_for_a_moment_holds_its_io_until_one_is_back() {
    components_away_for_a_moment_hold_the_io("iqn.2026-11.org.tessera.test:away", "raid1:2");
}

/// The same for an erasure-coded object: two of a raid5 (2+1) object's
/// three chunks away leave too few to read or write a stripe.
#[test]
fn two_of_a_raid5_objects_three_chunks_away_for_a_moment_hold_its_io_until_one_is_back() {
    components_away_for_a_moment_hold_the_io("iqn.2026-11.org.tessera.test:away-ec", "raid5:2+1");
}

/// Two hosts holding components of a `policy` object die (the shared
/// log's quorum with them), and one is back after 3 s: the I/O a third
/// host serves meanwhile waits, and none fails. For raid1(2) the host with
/// no copy serves, once the object's ownership has followed its I/O there;
/// for raid5 (2+1) over three hosts, the owner, which holds a chunk too.
fn components_away_for_a_moment_hold_the_io(target: &str, policy: &str) {
    let _exclusive = exclusive();
    tool("qemu-io");
    tool("qemu-img");
    // On this machine I/O went on 9-14 s after the kills. A longer hold
    // than the default keeps a slow run from failing.
    let (mut cluster, url, object) = held_io_cluster(target, policy, 60);
    let holders: Vec<u64> = object.components.iter().map(|component| component.host).collect();
    let serving = (1..=3).find(|host| !holders.contains(host)).unwrap_or(object.owner);
    let away: Vec<u64> = holders.iter().copied().filter(|host| *host != serving).collect();
    assert_eq!(away.len(), 2, "{object:?}");
    // The initiator logs in to the serving host, and its writes, not
    // paced, bring the object's ownership there: the owner stays up and
    // answers that too few components are available.
    let mut path = IoPath::open(&url(serving));
    follow_writes_to(&cluster, &mut path, serving);
    // The blocks read after the kills, and those read back at the end,
    // were written before them.
    for seq in 0..HELD_BLOCKS / 2 {
        path.write(seq, held_pattern(seq), Duration::from_secs(30))
            .unwrap_or_else(|error| panic!("write {seq} through host {serving}: {error}"));
    }
    println!("host {serving} owns the {policy} object and serves the initiator; killing hosts {away:?}");
    cluster.kill(away[0]);
    cluster.kill(away[1]);
    let killed_at = Instant::now();
    let what = format!("through host {serving} while hosts {away:?}, with the object's other components, were away");
    let longest = std::thread::scope(|scope| {
        let (cluster, first_back) = (&mut cluster, away[0]);
        scope.spawn(move || {
            std::thread::sleep(Duration::from_secs(3));
            cluster.start_host(first_back);
        });
        // Reads first, before the owner has noticed the components are
        // gone: of blocks in the first two chunks of a raid5 stripe, so at
        // least one is on a host that died.
        let mut reads = Vec::new();
        for seq in [0, objects::ec::CHUNK_BLOCKS] {
            let started = Instant::now();
            path.read(seq, held_pattern(seq), Duration::from_secs(70)).unwrap_or_else(|error| {
                panic!("reading block {seq} {what} failed: {error}; it should have waited until a component was back")
            });
            reads.push(started.elapsed());
        }
        println!("{policy}: reads after the kills waited {reads:?}");
        let read = reads.into_iter().max().unwrap_or_default();
        held_writes(&mut path, HELD_BLOCKS / 4..HELD_BLOCKS, Duration::from_secs(70), &what).max(read)
    });
    println!(
        "{policy}: the reads and all {} writes after the kills answered ({:?} after them); the longest waited {longest:?}",
        HELD_BLOCKS - HELD_BLOCKS / 4,
        killed_at.elapsed()
    );
    assert_held_some(&cluster, serving);
    drop(path);
    cluster.start_host(away[1]);
    cluster.wait_healthy(Duration::from_secs(120));
    held_blocks_read_back(&cluster, &url(serving));
}

#[test]
fn a_reservation_taken_through_one_host_is_enforced_through_another_and_survives_the_first() {
    use crate::libiscsi::{STATUS_GOOD, STATUS_RESERVATION_CONFLICT};
    let _exclusive = exclusive();
    let (mut cluster, port) = target_hosts(3, &[], &[]);
    const TARGET: &str = "iqn.2026-11.org.tessera.test:reserved";
    volume_and_target(&cluster, "pr", "16MiB", TARGET);
    let portal = |host: u64| format!("127.0.0.{}:{port}", host + 10);
    let (a_name, b_name) = ("iqn.2026-11.org.tessera.test:initiator-a", "iqn.2026-11.org.tessera.test:initiator-b");
    let login = |initiator: &str, host: u64| login_through(initiator, &portal(host), TARGET);
    let (key_a, key_b) = (0xa11ce, 0xb0b);
    let mut block = [0x42u8; 512];
    // A registers and reserves Write Exclusive - Registrants Only through host 1.
    let a = login(a_name, 1);
    assert_eq!(a.settled(|a| a.prout(0, 0, 0, key_a)), Ok(STATUS_GOOD), "A registers");
    assert_eq!(a.settled(|a| a.prout(1, 5, key_a, 0)), Ok(STATUS_GOOD), "A reserves");
    assert_eq!(a.settled(|a| a.write10(0, &mut block)), Ok(STATUS_GOOD), "the holder writes");
    // B, not registered, writes through host 2 at once: conflict.
    let b = login(b_name, 2);
    assert_eq!(b.settled(|b| b.write10(1, &mut block)), Ok(STATUS_RESERVATION_CONFLICT), "B's write through host 2");
    // A's path through host 2 (another I_T nexus) registers A's key: a
    // registrant may write under this type.
    let a2 = login(a_name, 2);
    assert_eq!(a2.settled(|a| a.prout(0, 0, 0, key_a)), Ok(STATUS_GOOD), "A registers its path through host 2");
    assert_eq!(a2.settled(|a| a.write10(2, &mut block)), Ok(STATUS_GOOD), "A's write through host 2");
    // Host 1, where the reservation was taken, dies.
    drop(a);
    cluster.kill(1);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // B is refused before any I/O is tried, failover or not.
        match b.settled(|b| b.write10(3, &mut block)) {
            Ok(STATUS_RESERVATION_CONFLICT) => break,
            Ok(STATUS_GOOD) => panic!("B wrote through host 2 after host 1 died: the reservation was lost"),
            other => assert!(Instant::now() < deadline, "B's write through host 2: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    // A registrant writes through host 2 once the objects have new owners.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match a2.settled(|a| a.write10(4, &mut block)) {
            Ok(STATUS_GOOD) => break,
            Ok(STATUS_RESERVATION_CONFLICT) => panic!("a registrant is refused after failover"),
            other => assert!(Instant::now() < deadline, "A's write through host 2: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    // B registers and may then write (registrants only).
    assert_eq!(b.settled(|b| b.prout(0, 0, 0, key_b)), Ok(STATUS_GOOD), "B registers");
    assert_eq!(b.settled(|b| b.write10(5, &mut block)), Ok(STATUS_GOOD), "registered B writes through host 2");
    println!("a reservation taken through host 1 was enforced through host 2, and after host 1 was killed");
}

/// The iscsi-test-cu suites that exercise more than one path to a unit.
const MULTIPATH_SUITES: &str = "ALL.MultipathIO,ALL.PrinReadKeys,ALL.PrinServiceactionRange,\
    ALL.PrinReportCapabilities,ALL.ProutRegister,ALL.ProutReserve,ALL.ProutClear,ALL.ProutPreempt";

#[test]
fn iscsi_test_cu_multipath_and_reservation_suites_pass_with_the_two_paths_on_different_hosts() {
    let _exclusive = exclusive();
    tool("iscsi-test-cu");
    let (cluster, port) = target_hosts(3, &[], &[]);
    let target = "iqn.2026-11.org.tessera.test:two-hosts";
    volume_and_target(&cluster, "paths", "64MiB", target);
    // Path 1 through host 1, path 2 through host 2: two target ports, and
    // each unit attention and reservation must cross between the hosts.
    let [first, second] = [1, 2].map(|host| format!("iscsi://127.0.0.{}:{port}/{target}/0", host + 10));
    let started = Instant::now();
    let output = cluster.run_bounded(
        std::process::Command::new(tool("iscsi-test-cu")).args(["-d", "-t", MULTIPATH_SUITES, &first, &second]),
        Duration::from_secs(600),
    );
    let log = String::from_utf8_lossy(&output.stdout).into_owned();
    let results = crate::iscsi::outcomes(&log);
    let failed: Vec<&String> = results.iter().filter(|result| result.1 == "failed").map(|result| &result.0).collect();
    let skipped: Vec<(&String, &String)> =
        results.iter().filter_map(|result| result.2.as_ref().map(|why| (&result.0, why))).collect();
    println!(
        "iscsi-test-cu -d -t {MULTIPATH_SUITES} with path 1 through host 1 and path 2 through host 2: \
         {} tests, {} passed, {} failed, {} skipped, in {:?}",
        results.len(),
        results.len() - failed.len() - skipped.len(),
        failed.len(),
        skipped.len(),
        started.elapsed()
    );
    let suites = ["MultipathIO.", "Prin", "ProutRegister.", "ProutReserve.", "ProutClear.", "ProutPreempt."];
    for suite in suites {
        assert!(results.iter().any(|result| result.0.starts_with(suite)), "no {suite} test ran:\n{log}");
    }
    assert!(results.len() >= 24, "the suites did not run:\n{log}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(failed.is_empty(), "failed: {failed:?}\n{log}");
    assert!(skipped.is_empty(), "skipped: {skipped:?}\n{log}");
}

/// Needs nftables (`nft`) and root, as the partition scenarios do.
#[test]
fn a_host_cut_off_from_its_peers_stops_answering_with_reservations_it_cannot_vouch_for() {
    use crate::libiscsi::{Session, STATUS_GOOD};
    let _exclusive = exclusive();
    let (cluster, port) = target_hosts(3, &[], &[]);
    const TARGET: &str = "iqn.2026-11.org.tessera.test:fenced";
    volume_and_target(&cluster, "fenced", "16MiB", TARGET);
    let portal = |host: u64| format!("127.0.0.{}:{port}", host + 10);
    let login = |initiator: &str, host: u64| login_through(initiator, &portal(host), TARGET);
    // Settled: unit attentions after the login answered.
    let keys = |session: &Session| {
        for _ in 0..8 {
            match session.read_keys().expect("READ KEYS") {
                Err(crate::libiscsi::STATUS_CHECK_CONDITION) => continue,
                other => return other,
            }
        }
        Err(crate::libiscsi::STATUS_CHECK_CONDITION)
    };
    let b = login("iqn.2026-11.org.tessera.test:initiator-b", 2);
    let a = login("iqn.2026-11.org.tessera.test:initiator-a", 1);
    // Reservations in use: B registers through host 2.
    let key_b = 0xb0b;
    assert_eq!(b.settled(|b| b.prout(0, 0, 0, key_b)), Ok(STATUS_GOOD), "B registers through host 2");
    assert_eq!(keys(&b), Ok(vec![key_b]), "B's key, seen through host 2");
    // Host 2 hears no peer, but still serves iSCSI to the initiators.
    let cut = crate::harness::Cut::off_from_peers("127.0.0.12");
    let key_a = 0xa11ce;
    let started = Instant::now();
    assert_eq!(a.settled(|a| a.prout(0, 0, 0, key_a)), Ok(STATUS_GOOD), "A registers through host 1");
    let register_took = started.elapsed();
    // From now on, host 2 answers READ KEYS with A's key or not at all:
    // it cannot have learned of the registration, so it must not vouch
    // for its old copy.
    let (mut refused, mut answered) = (0, 0);
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        match b.read_keys() {
            Ok(Ok(keys)) => {
                assert!(keys.contains(&key_a), "host 2, cut off, answered stale registrations {keys:?}");
                answered += 1;
            }
            Ok(Err(_)) => refused += 1,
            Err(error) => panic!("B's session through host 2 failed: {error}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(cut);
    // Healed: host 2 catches up and answers with A's key.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match b.read_keys() {
            Ok(Ok(keys)) if keys.contains(&key_a) => break,
            other => assert!(Instant::now() < deadline, "host 2 did not catch up after the cut healed: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!(
        "A's REGISTER through host 1 with host 2 cut off took {register_took:?}; host 2 then refused {refused} and \
         answered {answered} READ KEYS (each with A's key) in 5 s, and answered with A's key once healed"
    );
    assert!(refused > 0, "host 2 was never refused: was it cut off at all?");
}

/// A counter in one sector, incremented by COMPARE AND WRITE from two
/// initiators through two hosts (ESXi's ATS locking works so): every
/// increment that succeeded is counted once. Each write carries its
/// writer's tag, so after any failure the writer can tell whether its
/// write is the one there: a MISCOMPARE must mean it was not written;
/// another failure (the object's owner moved mid-write, say) may go
/// either way, and the writer reads to learn which, as ESXi does.
#[test]
fn compare_and_write_through_two_hosts_is_atomic() {
    use crate::libiscsi::{SENSE_MISCOMPARE, STATUS_CHECK_CONDITION, STATUS_GOOD};
    let _exclusive = exclusive();
    let (cluster, port) = target_hosts(3, &[], &[]);
    const TARGET: &str = "iqn.2026-11.org.tessera.test:ats";
    volume_and_target(&cluster, "ats", "16MiB", TARGET);
    const INCREMENTS: u64 = 150;
    let started = Instant::now();
    let workers: Vec<_> = [1u64, 2]
        .into_iter()
        .map(|host| {
            let portal = format!("127.0.0.{}:{port}", host + 10);
            std::thread::spawn(move || {
                let initiator = format!("iqn.2026-11.org.tessera.test:ats-{host}");
                let session = login_through(&initiator, &portal, TARGET);
                let (mut done, mut lost_races, mut unknown) = (0, 0, 0);
                let mut block = [0u8; 512];
                assert_eq!(session.settled(|s| s.read10(0, &mut block)), Ok(STATUS_GOOD));
                let deadline = Instant::now() + Duration::from_secs(240);
                for attempt in 0u64.. {
                    if done == INCREMENTS {
                        break;
                    }
                    assert!(Instant::now() < deadline, "host {host}: {done} increments in 240 s");
                    let value = u64::from_be_bytes(block[..8].try_into().unwrap());
                    let mut both = [0u8; 1024];
                    both[..512].copy_from_slice(&block);
                    let mut new = [0u8; 512];
                    new[..8].copy_from_slice(&(value + 1).to_be_bytes());
                    new[8..16].copy_from_slice(&(host << 32 | attempt).to_be_bytes());
                    both[512..].copy_from_slice(&new);
                    match session.compare_and_write(0, &mut both).expect("COMPARE AND WRITE") {
                        (STATUS_GOOD, _) => {
                            done += 1;
                            block = new;
                        }
                        (STATUS_CHECK_CONDITION, key) => {
                            assert_eq!(session.settled(|s| s.read10(0, &mut block)), Ok(STATUS_GOOD));
                            if key == Some(SENSE_MISCOMPARE) {
                                // The other initiator won.
                                assert!(block != new, "host {host}: MISCOMPARE, yet its write is there");
                                lost_races += 1;
                            } else if block == new {
                                // Failed, yet written.
                                unknown += 1;
                                done += 1;
                            } else {
                                unknown += 1;
                            }
                        }
                        (status, _) => panic!("host {host}: COMPARE AND WRITE answered status {status:#x}"),
                    }
                }
                (done, lost_races, unknown)
            })
        })
        .collect();
    let results: Vec<(u64, u64, u64)> =
        workers.into_iter().map(|worker| worker.join().expect("a worker failed")).collect();
    let reader = login_through("iqn.2026-11.org.tessera.test:ats-check", &format!("127.0.0.13:{port}"), TARGET);
    let mut block = [0u8; 512];
    assert_eq!(reader.settled(|s| s.read10(0, &mut block)), Ok(STATUS_GOOD));
    let counter = u64::from_be_bytes(block[..8].try_into().unwrap());
    let misses: u64 = results.iter().map(|(_, lost, _)| lost).sum();
    let unknown: u64 = results.iter().map(|(_, _, unknown)| unknown).sum();
    println!(
        "COMPARE AND WRITE through hosts 1 and 2: {} increments each, {misses} miscompares, {unknown} other failures (the writer read \
         back to learn), counter {counter}, in {:?}",
        INCREMENTS,
        started.elapsed()
    );
    assert!(misses > 0, "the two initiators never raced: the test shows nothing");
    assert_eq!(
        counter,
        2 * INCREMENTS,
        "an increment that succeeded was lost: the compare and write were not one step"
    );
}

/// The VIP on a real interface in a network namespace (not loopback).
const NAMESPACE_VIP: &str = "10.254.0.1";
const NAMESPACE_INTERFACE: &str = "tvip0";
const IN_NAMESPACE: &str =
    "target_service::inside_its_namespace_the_vip_lives_on_an_interface_and_moves_when_its_owner_dies";

/// Makes a network namespace with loopback and a veth pair, and runs
/// the scenario below inside it (this test binary again, under `ip netns
/// exec`): the VIP's owners put its address on that interface with
/// iproute2, as on real hosts. Needs iproute2 and root.
#[test]
fn the_vip_on_a_real_interface_in_a_network_namespace_moves_when_its_owner_dies() {
    let _exclusive = exclusive();
    tool("iscsi-ls");
    let ip = |args: &[&str]| {
        let status =
            std::process::Command::new("ip").args(args).status().expect("this test needs iproute2 (`ip`) and root");
        assert!(status.success(), "ip {args:?} failed");
    };
    struct Namespace(String);
    impl Drop for Namespace {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }
    let namespace = Namespace(format!("tessera-vip-{}", std::process::id()));
    let name = namespace.0.as_str();
    ip(&["netns", "add", name]);
    ip(&["-n", name, "link", "set", "lo", "up"]);
    // A veth pair (this kernel has no dummy interfaces): the VIP goes on
    // one end.
    ip(&["-n", name, "link", "add", NAMESPACE_INTERFACE, "type", "veth", "peer", "name", "tvip1"]);
    ip(&["-n", name, "link", "set", NAMESPACE_INTERFACE, "up"]);
    ip(&["-n", name, "link", "set", "tvip1", "up"]);
    let output = std::process::Command::new("timeout")
        .args(["600", "ip", "netns", "exec", name])
        .arg(std::env::current_exe().expect("this test binary"))
        .args(["--exact", IN_NAMESPACE, "--include-ignored", "--nocapture", "--test-threads=1"])
        .output()
        .expect("timeout and ip run");
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "the scenario failed inside namespace {name}:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
#[ignore = "run inside its own network namespace by the_vip_on_a_real_interface_in_a_network_namespace_moves_when_its_owner_dies"]
fn inside_its_namespace_the_vip_lives_on_an_interface_and_moves_when_its_owner_dies() {
    let _exclusive = exclusive();
    let addresses = || {
        let output = std::process::Command::new("ip").args(["-o", "addr", "show", "dev", NAMESPACE_INTERFACE]).output();
        let output = output.expect("this test needs iproute2 (`ip`)");
        assert!(
            output.status.success(),
            "no {NAMESPACE_INTERFACE} here: run this test through the one that makes its namespace"
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    assert!(!addresses().contains(NAMESPACE_VIP), "the VIP is on {NAMESPACE_INTERFACE} before any host took it");
    // A fresh namespace: the iSCSI port is free.
    let vip = format!("{NAMESPACE_VIP}:3260");
    let ips: Vec<String> = (11..=13).map(|last| format!("127.0.0.{last}")).collect();
    let port = free_port(&ips.iter().map(String::as_str).collect::<Vec<_>>());
    let mut cluster = TestCluster::start_in_sites(3, &[("vip", &vip)], &[], |config| {
        config.roles = vec!["storage".into(), "target".into()];
        config.iscsi_port = port;
        config.vip_interface = Some(NAMESPACE_INTERFACE.into());
    });
    cluster.wait_healthy(Duration::from_secs(60));
    for (index, target) in TARGETS.iter().enumerate() {
        volume_and_target(&cluster, &format!("v{index}"), "16MiB", target);
    }
    let settle = |cluster: &TestCluster, not: Option<u64>| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some((owner, _)) = vip_owner(cluster).filter(|(owner, _)| Some(*owner) != not) {
                if discovers_every_target(cluster, &vip).is_ok() {
                    return owner;
                }
            }
            assert!(Instant::now() < deadline, "no host serves the VIP {vip}\n{}", cluster.report());
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let owner = settle(&cluster, None);
    assert!(addresses().contains(NAMESPACE_VIP), "host {owner} serves the VIP, but it is not on {NAMESPACE_INTERFACE}");
    // Listens on the far end of the veth pair for the next owner's
    // gratuitous ARP for the VIP.
    let announced = std::thread::spawn(|| saw_gratuitous_arp("tvip1", NAMESPACE_VIP, Duration::from_secs(60)));
    cluster.kill(owner);
    let killed = Instant::now();
    // The dead host's address goes with it, as with a real machine (here
    // all hosts share the namespace): the next owner must put it back.
    let status = std::process::Command::new("ip")
        .args(["addr", "del", &format!("{NAMESPACE_VIP}/32"), "dev", NAMESPACE_INTERFACE])
        .status()
        .expect("ip runs");
    assert!(status.success(), "cannot remove the killed owner's VIP address");
    let new_owner = settle(&cluster, Some(owner));
    println!(
        "host {owner} killed; host {new_owner} put {NAMESPACE_VIP} on {NAMESPACE_INTERFACE} and discovery through \
         it works, in {:?}",
        killed.elapsed()
    );
    assert!(addresses().contains(NAMESPACE_VIP));
    assert!(announced.join().unwrap(), "no gratuitous ARP for {NAMESPACE_VIP} reached the other end of the link");
}

/// Whether a gratuitous ARP for `ip` (sender and target address both
/// `ip`) arrives on `interface` within `limit` (a packet socket).
fn saw_gratuitous_arp(interface: &str, ip: &str, limit: Duration) -> bool {
    let ip: std::net::Ipv4Addr = ip.parse().unwrap();
    let name = std::ffi::CString::new(interface).unwrap();
    // SAFETY: system calls on a socket this function owns and closes; the
    // buffers outlive each call.
    unsafe {
        let index = libc::if_nametoindex(name.as_ptr());
        assert!(index != 0, "no interface {interface}");
        let socket = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(0x0806u16.to_be()));
        assert!(socket >= 0, "cannot open a packet socket: {}", std::io::Error::last_os_error());
        let mut at: libc::sockaddr_ll = std::mem::zeroed();
        at.sll_family = libc::AF_PACKET as u16;
        at.sll_protocol = 0x0806u16.to_be();
        at.sll_ifindex = index as i32;
        let bound = libc::bind(
            socket,
            &at as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        );
        assert_eq!(bound, 0, "cannot bind the packet socket: {}", std::io::Error::last_os_error());
        let timeout = libc::timeval { tv_sec: 0, tv_usec: 200_000 };
        libc::setsockopt(
            socket,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &timeout as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
        let deadline = Instant::now() + limit;
        let mut frame = [0u8; 128];
        let mut seen = false;
        while !seen && Instant::now() < deadline {
            let length = libc::recv(socket, frame.as_mut_ptr() as *mut libc::c_void, frame.len(), 0);
            seen = length >= 42
                && frame[12..14] == [0x08, 0x06]
                && frame[28..32] == ip.octets()
                && frame[38..42] == ip.octets();
        }
        libc::close(socket);
        seen
    }
}
