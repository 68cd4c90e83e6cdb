//! Starts and stops node processes for the scenarios.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
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

/// A port free on every given loopback address.
pub fn free_port(addresses: &[&str]) -> u16 {
    for _ in 0..100 {
        let port = 20_000 + rand::random::<u16>() % 30_000;
        if addresses.iter().all(|address| std::net::TcpListener::bind((*address, port)).is_ok()) {
            return port;
        }
    }
    panic!("no free port found");
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
        let dir = tempfile::tempdir().unwrap();
        let ips: Vec<String> = (1..=count).map(|id| format!("127.0.0.{}", id + 10)).collect();
        let ip_refs: Vec<&str> = ips.iter().map(String::as_str).collect();
        let wire_port = free_port(&ip_refs);
        let admin_port = free_port(&ip_refs);
        let mut local = BootstrapConfig::local("test", count, 11, wire_port, admin_port);
        for (key, value) in settings {
            local.settings.insert(key.to_string(), value.to_string());
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
        let mut child = self.signal(id, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
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
        let text = std::fs::read_to_string(&self.hosts[&id].log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
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
        let logs: Vec<String> = self
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
        panic!(
            "cluster not healthy within {timeout:?}; problems {problems:?}\n{}\nlast status {last:#?}",
            logs.join("\n")
        );
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

impl Drop for TestCluster {
    fn drop(&mut self) {
        if std::env::var_os("TESSERA_KEEP_TEST_DATA").is_some() {
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
