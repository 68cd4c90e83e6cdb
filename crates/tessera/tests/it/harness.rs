//! Starts and stops node processes for the scenarios.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use catalog::bootstrap::{BootstrapConfig, ConfigDir, SeedHost};
use node::status::ClusterStatus;
use sharedlog::client::{ClientConfig, LogClient};
use wire::tcp::TcpTransport;

static ONE_CLUSTER_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Serializes scenarios; a panicking scenario does not poison the others.
pub fn exclusive() -> MutexGuard<'static, ()> {
    ONE_CLUSTER_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tessera"))
}

/// A port free on every given loopback address, below the kernel's
/// ephemeral range and never handed out before in this process.
///
/// A port in the ephemeral range that is free now can be taken a moment
/// later by any socket bound to port 0 (a node's own component threads,
/// its outgoing calls) before the node binds it; CI lost a run to that
/// (the admin port taken by a component thread's listener).
pub fn free_port(addresses: &[&str]) -> u16 {
    free_ports_at(addresses, &[0])
}

/// A port `p` such that `p + offset` is free in the same way as
/// [`free_port`]'s for each offset (`tessera up` listens on its base port
/// and on the base port + 80).
pub fn free_ports_at(addresses: &[&str], offsets: &[u16]) -> u16 {
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let (low, high) = ephemeral_ports();
    let highest = offsets.iter().copied().max().unwrap_or(0);
    // Below the range, or above it if there is more room there; the whole
    // span if the range leaves too little on either side (then a node's
    // own sockets may take a port first, as the kernel's range allows).
    let below = (10_000u32, u32::from(low).saturating_sub(u32::from(highest)));
    let above = (u32::from(high) + 1, 65_536u32.saturating_sub(u32::from(highest)));
    let width = |(from, to): (u32, u32)| to.saturating_sub(from);
    let (from, to) = match [below, above].into_iter().max_by_key(|span| width(*span)) {
        Some(span) if width(span) >= 1_000 => span,
        _ => {
            eprintln!("the ephemeral port range {low}-{high} leaves no room for fixed ports; picking within it");
            (10_000, 60_000)
        }
    };
    let mut given = GIVEN.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    for _ in 0..200 {
        let port = (from + rand::random::<u32>() % (to - from)) as u16;
        let ports: Vec<u16> = offsets.iter().map(|offset| port + offset).collect();
        let free = |port: &u16| {
            !given.contains(port)
                && addresses.iter().all(|address| std::net::TcpListener::bind((*address, *port)).is_ok())
        };
        if ports.iter().all(free) {
            given.extend(ports);
            return port;
        }
    }
    panic!("no free port found in {from}-{to} (the ephemeral range is {low}-{high})");
}

/// The kernel's ephemeral port range, or Linux's default when it cannot
/// be read.
pub fn ephemeral_ports() -> (u16, u16) {
    node::ephemeral_ports().map_or((32_768, 60_999), |range| (*range.start(), *range.end()))
}

pub struct TestHost {
    pub seed: SeedHost,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    pub child: Option<Child>,
}

pub struct TestCluster {
    /// The cluster's files; kept after the test when
    /// TESSERA_KEEP_TEST_DATA is set, for post-mortems.
    dir: Option<tempfile::TempDir>,
    pub config: BootstrapConfig,
    pub hosts: BTreeMap<u64, TestHost>,
}

impl TestCluster {
    /// The directory holding every host's files.
    pub fn root(&self) -> &Path {
        self.dir.as_ref().expect("the cluster's directory").path()
    }

    /// Writes a cluster of `count` hosts (each on its own 127.0.0.x) and
    /// starts every node.
    pub fn start(count: u64) -> TestCluster {
        TestCluster::start_with(count, &[])
    }

    /// As [`TestCluster::start`], with bootstrap settings (e.g. the
    /// hierarchy's fan-out).
    pub fn start_with(count: u64, settings: &[(&str, &str)]) -> TestCluster {
        TestCluster::start_configured(count, settings, |_| {})
    }

    /// As [`TestCluster::start_with`], with each node's config edited
    /// before it starts.
    pub fn start_configured(
        count: u64,
        settings: &[(&str, &str)],
        edit: impl Fn(&mut node::NodeConfig),
    ) -> TestCluster {
        TestCluster::start_in_sites(count, settings, &[], edit)
    }

    /// As [`TestCluster::start_configured`], host `n` in `sites[n - 1]`
    /// (hosts past the list's end in none).
    pub fn start_in_sites(
        count: u64,
        settings: &[(&str, &str)],
        sites: &[&str],
        edit: impl Fn(&mut node::NodeConfig),
    ) -> TestCluster {
        let dir = tempfile::tempdir().unwrap();
        let ips: Vec<String> = (1..=count).map(|id| format!("127.0.0.{}", id + 10)).collect();
        let ip_refs: Vec<&str> = ips.iter().map(String::as_str).collect();
        let wire_port = free_port(&ip_refs);
        let admin_port = free_port(&ip_refs);
        let mut local = BootstrapConfig::local("test", count, 11, wire_port, admin_port);
        for (key, value) in settings {
            local.settings.insert(key.to_string(), value.to_string());
        }
        for (host, site) in local.hosts.iter_mut().zip(sites) {
            host.site = Some(site.to_string());
        }
        let config_dir = ConfigDir::new(fsio::real(), dir.path().join("config"));
        let (_, config) = config_dir.update(|config| *config = local.clone()).unwrap();
        let mut hosts = BTreeMap::new();
        for seed in &config.hosts {
            let host_dir = dir.path().join(&seed.name);
            std::fs::create_dir_all(&host_dir).unwrap();
            let mut node_config = node::NodeConfig {
                roles: vec!["storage".into()],
                gc_interval_ms: 200,
                ..node::NodeConfig::new(seed.id, "data", "../config")
            };
            edit(&mut node_config);
            let config_path = host_dir.join("node.toml");
            std::fs::write(&config_path, node_config.to_toml()).unwrap();
            hosts.insert(
                seed.id,
                TestHost { seed: seed.clone(), config_path, log_path: host_dir.join("node.log"), child: None },
            );
        }
        let mut cluster = TestCluster { dir: Some(dir), config, hosts };
        let ids: Vec<u64> = cluster.hosts.keys().copied().collect();
        for id in ids {
            cluster.start_host(id);
        }
        cluster
    }

    pub fn start_host(&mut self, id: u64) {
        let host = self.hosts.get_mut(&id).unwrap();
        assert!(host.child.is_none(), "host {id} is already running");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&host.log_path).unwrap();
        let child = Command::new(binary())
            .args(["node", "--config"])
            .arg(&host.config_path)
            .env("RUST_LOG", "info,openraft=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        host.child = Some(child);
    }

    fn signal(&mut self, id: u64, signal: libc::c_int) -> Child {
        let host = self.hosts.get_mut(&id).unwrap();
        let child = host.child.take().unwrap_or_else(|| panic!("host {id} is not running"));
        // SAFETY: kill() on the pid of our own unreaped child.
        unsafe {
            libc::kill(child.id() as libc::pid_t, signal);
        }
        child
    }

    /// SIGKILL: the process gets no chance to flush or say goodbye.
    pub fn kill(&mut self, id: u64) {
        let mut child = self.signal(id, libc::SIGKILL);
        child.wait().unwrap();
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self, id: u64) {
        let child = self.signal(id, libc::SIGTERM);
        self.clean_exit(id, child, Instant::now() + Duration::from_secs(20));
    }

    /// SIGTERM to every running host at once (as `tessera up` stops a
    /// cluster), then a clean exit of each.
    pub fn stop_all(&mut self) {
        let children: Vec<(u64, Child)> =
            self.running().into_iter().map(|id| (id, self.signal(id, libc::SIGTERM))).collect();
        let deadline = Instant::now() + Duration::from_secs(20);
        for (id, child) in children {
            self.clean_exit(id, child, deadline);
        }
    }

    /// Waits for host `id`'s process, signalled to stop, to exit with
    /// success by `deadline`.
    fn clean_exit(&self, id: u64, mut child: Child, deadline: Instant) {
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(status.success(), "host {id} exited with {status} on SIGTERM; log:\n{}", self.log_tail(id));
                return;
            }
            assert!(Instant::now() < deadline, "host {id} did not stop within 20 s of SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_tail(&self, id: u64) -> String {
        last_lines(&self.log_text(id), 30)
    }

    pub fn log_text(&self, id: u64) -> String {
        std::fs::read_to_string(&self.hosts[&id].log_path).unwrap_or_default()
    }

    pub fn running(&self) -> Vec<u64> {
        self.hosts.iter().filter(|(_, host)| host.child.is_some()).map(|(id, _)| *id).collect()
    }

    pub fn hosts_ids(&self) -> Vec<u64> {
        self.hosts.keys().copied().collect()
    }

    /// A host's node-to-node (wire) address.
    pub fn address(&self, id: u64) -> String {
        self.hosts[&id].seed.address.clone()
    }

    pub fn admin(&self, id: u64) -> String {
        self.hosts[&id].seed.admin_address.clone()
    }

    /// GETs `path` from a running host's admin API.
    pub fn get(&self, id: u64, path: &str) -> Result<serde_json::Value, String> {
        let url = format!("http://{}{path}", self.admin(id));
        ureq::get(&url)
            .timeout(Duration::from_secs(10))
            .call()
            .map_err(|error| error.to_string())?
            .into_json()
            .map_err(|error| error.to_string())
    }

    /// A counter or gauge from host `id`'s `/metrics` (unlabelled), if it
    /// reports it.
    pub fn metric(&self, id: u64, name: &str) -> Option<f64> {
        let metrics = ureq::get(&format!("http://{}/metrics", self.admin(id))).call().ok()?.into_string().ok()?;
        let line = metrics.lines().find(|line| line.split_whitespace().next() == Some(name))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    pub fn status(&self) -> Option<ClusterStatus> {
        self.running()
            .into_iter()
            .find_map(|id| self.get(id, "/api/v1/status").ok().and_then(|value| serde_json::from_value(value).ok()))
    }

    pub fn wait_healthy(&self, timeout: Duration) -> ClusterStatus {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        while Instant::now() < deadline {
            if let Some(status) = self.status() {
                if status.healthy {
                    return status;
                }
                last = Some(status);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        // What matters first (the output may be cut): the problems, whether
        // each process still runs, and the ends of their logs.
        let problems = last.as_ref().map(|status| status.problems.clone()).unwrap_or_default();
        panic!(
            "cluster not healthy within {timeout:?}; problems {problems:?}\n{}\nlast status {last:#?}",
            self.report()
        );
    }

    /// Per host: whether its process still runs, and the end of its log.
    pub fn report(&self) -> String {
        let hosts: Vec<String> = self
            .hosts
            .iter()
            .map(|(id, host)| {
                let process = match &host.child {
                    None => "not started".to_string(),
                    Some(child) => match std::fs::read_to_string(format!("/proc/{}/stat", child.id())) {
                        Ok(stat) if stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')) => {
                            format!("pid {} has EXITED", child.id())
                        }
                        Ok(_) => format!("pid {} running", child.id()),
                        Err(_) => format!("pid {} gone", child.id()),
                    },
                };
                format!("--- host {id} ({process})\n{}", self.log_tail(*id))
            })
            .collect();
        // A full disk fails every node's journal and log writes at once.
        let disk = match (&self.dir, self.dir.as_ref().and_then(|dir| free_bytes(dir.path()))) {
            (Some(dir), Some(free)) => format!("--- {} MiB free under {}", free >> 20, dir.path().display()),
            _ => "--- free space unknown".to_string(),
        };
        format!("{}\n{disk}", hosts.join("\n"))
    }

    /// Fails the test at once, saying what it needs, unless the disk the
    /// cluster's files are on has `bytes` free.
    pub fn require_free_disk(&self, bytes: u64, why: &str) {
        let dir = self.dir.as_ref().expect("the cluster's files").path();
        let free = free_bytes(dir).expect("statvfs of the cluster's directory");
        assert!(
            free >= bytes,
            "this scenario needs {} MiB free on the disk under {} ({why}); only {} MiB are",
            bytes >> 20,
            dir.display(),
            free >> 20
        );
    }

    /// Runs a tool to completion, but for no longer than `limit`. A tool
    /// that hangs (waiting for an answer a node never sends) fails the
    /// test with the tool's output, each host's log tail and what every
    /// node thread was doing, instead of stalling the whole suite.
    pub fn run_bounded(&self, command: &mut Command, limit: Duration) -> Output {
        run_bounded(command, limit, || {
            let pids: Vec<(String, u32)> = self
                .hosts
                .iter()
                .filter_map(|(id, host)| host.child.as_ref().map(|child| (format!("host {id}"), child.id())))
                .collect();
            format!("{}\n{}", self.report(), stacks(&pids))
        })
    }

    pub fn leader(&self) -> u64 {
        let status = self.wait_healthy(Duration::from_secs(60));
        status.log.leader.expect("a healthy cluster has a leader")
    }

    pub fn replica_addresses(&self) -> Vec<String> {
        self.config.log_replica_addresses().values().cloned().collect()
    }

    pub fn log_client(&self, client_id: u64) -> LogClient<TcpTransport> {
        LogClient::new(TcpTransport::new(), ClientConfig::new(self.replica_addresses(), client_id))
    }
}

/// Bytes an unprivileged process may still write to the filesystem
/// holding `path`.
pub fn free_bytes(path: &Path) -> Option<u64> {
    fsio::filesystem_space(path).ok().map(|(_, free)| free)
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if std::env::var_os("TESSERA_KEEP_TEST_DATA").is_some_and(|value| !value.is_empty()) {
            if let Some(dir) = self.dir.take() {
                eprintln!("keeping the cluster's files in {}", dir.keep().display());
            }
        }
        for host in self.hosts.values_mut() {
            if let Some(mut child) = host.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// The last `count` lines of `text`.
pub fn last_lines(text: &str, count: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(count)..].join("\n")
}

/// Where `tool` is on the PATH, if it is.
pub fn which(tool: &str) -> Option<String> {
    let found = Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().ok()?;
    found.status.success().then(|| String::from_utf8_lossy(&found.stdout).trim().to_string())
}

/// Runs `command` to completion, but for no longer than `limit`; past it,
/// the command is killed and the test fails with the ends of its output
/// and what `diagnose` reports (taken while the command still waits).
pub fn run_bounded(command: &mut Command, limit: Duration, diagnose: impl FnOnce() -> String) -> Output {
    let shown = format!("{command:?}");
    // Its own process group, so that what it started goes with it.
    let mut child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0).spawn().unwrap();
    let collect = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buffer = Vec::new();
            let _ = pipe.read_to_end(&mut buffer);
            buffer
        })
    };
    let out = collect(Box::new(child.stdout.take().unwrap()));
    let err = collect(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Output { status, stdout: out.join().unwrap(), stderr: err.join().unwrap() };
        }
        if Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let diagnosis = diagnose();
    // SAFETY: kill() on the process group of our own unreaped child.
    unsafe {
        libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL);
    }
    let _ = child.wait();
    let tail = |bytes: Vec<u8>| last_lines(&String::from_utf8_lossy(&bytes), 40);
    let (out, err) = (tail(out.join().unwrap()), tail(err.join().unwrap()));
    panic!("{shown} did not finish within {limit:?}\n--- its stdout (tail)\n{out}\n--- its stderr (tail)\n{err}\n{diagnosis}");
}

/// What each given process's threads are doing, from gdb: per process, one
/// line per distinct stack (innermost frame, then the project's own
/// frames), with how many threads share it. The whole backtraces go to a
/// file in the temporary directory, named in the answer.
pub fn stacks(processes: &[(String, u32)]) -> String {
    if which("gdb").is_none() {
        return "(no stacks: gdb is not installed)".into();
    }
    let mut summary = String::new();
    let mut whole = String::new();
    for (label, pid) in processes {
        let gdb = Command::new("gdb")
            .args(["-p", &pid.to_string(), "-batch", "-ex", "set pagination off", "-ex", "thread apply all bt 40"])
            .stdin(Stdio::null())
            .output();
        let text = match gdb {
            Ok(output) => String::from_utf8_lossy(&output.stdout).into_owned(),
            Err(error) => format!("gdb failed: {error}"),
        };
        whole.push_str(&format!("=== {label} (pid {pid})\n{text}\n"));
        summary.push_str(&format!("--- {label} threads (count, name: innermost frame <- own frames)\n"));
        for (stack, count) in summarize_stacks(&text) {
            summary.push_str(&format!("{count:>3} {stack}\n"));
        }
    }
    let path = std::env::temp_dir().join(format!("tessera-stacks-{}.txt", std::process::id()));
    match std::fs::write(&path, whole) {
        Ok(()) => summary.push_str(&format!("(whole backtraces in {})\n", path.display())),
        Err(error) => summary.push_str(&format!("(whole backtraces not written: {error})\n")),
    }
    summary
}

/// Groups gdb's `thread apply all bt` output into distinct stacks, each
/// told as "thread name: innermost function <- project frames", with how
/// many threads share it.
fn summarize_stacks(gdb: &str) -> Vec<(String, usize)> {
    const OWN: [&str; 10] = [
        "iscsi::",
        "objects::",
        "node::",
        "volume::",
        "wire::",
        "blockstore::",
        "sharedlog::",
        "catalog::",
        "hierarchy::",
        "placement::",
    ];
    let mut threads: Vec<(String, Vec<String>)> = Vec::new();
    for line in gdb.lines() {
        if line.starts_with("Thread ") {
            let name = line.rsplit('"').nth(1).unwrap_or("?").to_string();
            threads.push((name, Vec::new()));
        } else if let (Some(frame), Some((_, thread))) = (line.strip_prefix('#'), threads.last_mut()) {
            // "#3  0x... in path::to::function<...> (args) at file:line"
            let function = match frame.split_once(" in ") {
                Some((_, function)) => function,
                None => frame.trim_start_matches(|c: char| c.is_ascii_digit() || c == ' '),
            };
            let function = function.split(" (").next().unwrap_or("").trim();
            let function = function.split('<').next().unwrap_or(function).to_string();
            if thread.is_empty() || OWN.iter().any(|own| function.starts_with(own)) {
                thread.push(function);
            }
        }
    }
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for (name, frames) in threads {
        let name: String = name.trim_end_matches(|c: char| c.is_ascii_digit()).to_string();
        let mut frames = frames.into_iter();
        let innermost = frames.next().unwrap_or_default();
        let own: Vec<String> = frames.take(8).collect();
        let stack = if own.is_empty() { innermost } else { format!("{innermost} <- {}", own.join(" <- ")) };
        *counts.entry(format!("{name}: {stack}")).or_default() += 1;
    }
    counts.into_iter().collect()
}

#[test]
fn a_command_past_its_limit_is_killed_and_reported_with_what_the_processes_were_doing() {
    let mut sleeper = Command::new("sleep").arg("120").spawn().unwrap();
    let watched = vec![("the sleeper".to_string(), sleeper.id())];
    let started = Instant::now();
    let failed = std::panic::catch_unwind(|| {
        run_bounded(Command::new("sh").args(["-c", "echo started; sleep 120"]), Duration::from_secs(1), || {
            stacks(&watched)
        })
    });
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    let message = failed.expect_err("the command outlived its limit");
    let message = message.downcast_ref::<String>().expect("a formatted panic");
    assert!(started.elapsed() < Duration::from_secs(60), "the command was not killed at its limit");
    assert!(message.contains("did not finish within 1s") && message.contains("started"), "{message}");
    assert!(message.contains("--- the sleeper threads"), "{message}");
    assert!(message.contains("sleep"), "gdb named where the sleeper waits: {message}");
    let whole = message.split("(whole backtraces in ").nth(1).and_then(|rest| rest.split(')').next());
    let whole = whole.unwrap_or_else(|| panic!("the message names the file of whole backtraces: {message}"));
    assert!(std::fs::read_to_string(whole).unwrap().contains("=== the sleeper"), "{whole}");
    std::fs::remove_file(whole).unwrap();
}

/// Drops every packet from or to one loopback address while it lives: a
/// host cut off from all its peers (nftables, in a table of its own).
pub struct Cut {
    table: String,
}

impl Cut {
    pub fn off(ip: &str) -> Cut {
        Cut::install(ip, "")
    }

    /// As [`off`](Self::off), but the host still talks with 127.0.0.1,
    /// where the test's initiators connect from: cut off from its peers,
    /// it still serves iSCSI.
    pub fn off_from_peers(ip: &str) -> Cut {
        Cut::install(ip, "ip saddr 127.0.0.1 accept\n    ip daddr 127.0.0.1 accept\n    ")
    }

    /// Cuts the TCP connections between host address `a` and the ports
    /// of `b` (addresses `ip:port` on one host) only: everything else
    /// between the two hosts (heartbeats, the shared log) still flows.
    pub fn ports(a: &str, b: &[String]) -> Cut {
        let table = format!("tessera_test_{}", std::process::id());
        let b_ip = b[0].rsplit_once(':').expect("ip:port").0;
        let ports: Vec<&str> = b.iter().map(|address| address.rsplit_once(':').expect("ip:port").1).collect();
        let ports = ports.join(", ");
        let rules = format!(
            "table inet {table} {{\n  chain output {{\n    type filter hook output priority 0; policy accept;\n    ip saddr {a} ip daddr {b_ip} tcp dport {{ {ports} }} drop\n    ip saddr {b_ip} ip daddr {a} tcp sport {{ {ports} }} drop\n  }}\n}}\n"
        );
        Cut::apply(table, &rules)
    }

    fn install(ip: &str, except: &str) -> Cut {
        let table = format!("tessera_test_{}", std::process::id());
        let rules = format!(
            "table inet {table} {{\n  chain output {{\n    type filter hook output priority 0; policy accept;\n    {except}ip saddr {ip} drop\n    ip daddr {ip} drop\n  }}\n}}\n"
        );
        Cut::apply(table, &rules)
    }

    fn apply(table: String, rules: &str) -> Cut {
        let mut child = std::process::Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("this test needs nftables (`nft`; scripts/test installs it) and root");
        use std::io::Write;
        child.stdin.take().unwrap().write_all(rules.as_bytes()).unwrap();
        assert!(child.wait().unwrap().success(), "nft refused the partition rules");
        Cut { table }
    }
}

impl Drop for Cut {
    fn drop(&mut self) {
        let _ = std::process::Command::new("nft").args(["delete", "table", "inet", &self.table]).status();
    }
}
