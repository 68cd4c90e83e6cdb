//! Helpers shared by the benchmarks: a local cluster of real node
//! processes, and latency statistics.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use catalog::bootstrap::{BootstrapConfig, ConfigDir};

/// Node processes started for a benchmark; stopped (SIGTERM, then SIGKILL)
/// on drop.
pub struct LocalCluster {
    pub config: BootstrapConfig,
    children: Vec<Child>,
}

/// The `tessera` binary next to the running benchmark binary.
pub fn tessera_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.parent().context("benchmark binary has no directory")?.join("tessera");
    if !path.exists() {
        bail!("{} not found: build it first (cargo build --release -p tessera)", path.display());
    }
    Ok(path)
}

/// A port free on every given address, below the kernel's ephemeral range
/// (`node::ephemeral_ports`, from 32768 on Linux by default): a free port
/// inside it can be taken by a node's own port-0 sockets before the node
/// binds it.
fn free_port(ips: &[String]) -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let low = node::ephemeral_ports().map_or(32_768, |range| *range.start());
    let span = low.saturating_sub(10_000).max(1_000);
    let mut given = GIVEN.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    for _ in 0..200 {
        let port = 10_000 + rand::random::<u16>() % span;
        if !given.contains(&port) && ips.iter().all(|ip| std::net::TcpListener::bind((ip.as_str(), port)).is_ok()) {
            given.push(port);
            return port;
        }
    }
    panic!("no free port from 10000 to {}", 10_000 + span);
}

impl LocalCluster {
    /// Starts `hosts` node processes (log replicas on the first min(3, hosts))
    /// with their data under `dir`, and waits until the cluster is healthy.
    pub fn start(dir: &Path, hosts: u64) -> Result<LocalCluster> {
        if dir.exists() {
            std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
        }
        std::fs::create_dir_all(dir)?;
        let ips: Vec<String> = (1..=hosts).map(|id| format!("127.0.0.{}", 100 + id)).collect();
        let wire_port = free_port(&ips);
        let admin_port = free_port(&ips);
        let local = BootstrapConfig::local("bench", hosts, 101, wire_port, admin_port);
        let (_, config) = ConfigDir::new(fsio::real(), dir.join("config")).update(|config| *config = local.clone())?;
        let binary = tessera_binary()?;
        let mut children = Vec::new();
        for seed in &config.hosts {
            let host_dir = dir.join(&seed.name);
            std::fs::create_dir_all(&host_dir)?;
            let node_config = node::NodeConfig {
                roles: vec!["storage".into()],
                ..node::NodeConfig::new(seed.id, "data", "../config")
            };
            std::fs::write(host_dir.join("node.toml"), node_config.to_toml())?;
            let log = std::fs::File::create(host_dir.join("node.log"))?;
            children.push(
                Command::new(&binary)
                    .args(["node", "--config"])
                    .arg(host_dir.join("node.toml"))
                    .env("RUST_LOG", "warn")
                    .stdin(Stdio::null())
                    .stdout(log.try_clone()?)
                    .stderr(log)
                    .spawn()?,
            );
        }
        let cluster = LocalCluster { config, children };
        cluster.wait_healthy(Duration::from_secs(60))?;
        Ok(cluster)
    }

    pub fn wait_healthy(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let url = format!("http://{}/api/v1/status", self.config.hosts[0].admin_address);
        while Instant::now() < deadline {
            if let Ok(response) = ureq::get(&url).timeout(Duration::from_secs(5)).call() {
                let status: serde_json::Value = response.into_json()?;
                if status["healthy"] == true {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!("cluster not healthy within {timeout:?}")
    }

    pub fn replica_addresses(&self) -> Vec<String> {
        self.config.log_replica_addresses().values().cloned().collect()
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for child in &self.children {
            // SAFETY: kill() on the pid of our own unreaped child.
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for child in &mut self.children {
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Latency samples in microseconds.
#[derive(Default)]
pub struct Latencies(pub Vec<u32>);

impl Latencies {
    pub fn record(&mut self, elapsed: Duration) {
        self.0.push(elapsed.as_micros().min(u32::MAX as u128) as u32);
    }

    pub fn percentile(&mut self, fraction: f64) -> Duration {
        if self.0.is_empty() {
            return Duration::ZERO;
        }
        self.0.sort_unstable();
        let index = ((self.0.len() as f64 - 1.0) * fraction).round() as usize;
        Duration::from_micros(self.0[index] as u64)
    }
}
