//! The node's own config file (`node.toml`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This host's id; must appear in the bootstrap config's hosts.
    pub node_id: u64,
    /// Where the node keeps its data.
    pub data_dir: PathBuf,
    /// The bootstrap config directory (`v<N>/cluster.toml` versions).
    pub cluster_config_dir: PathBuf,
    /// Roles this host takes: log, storage, memory, target. Whether it holds
    /// a log replica is decided by the bootstrap config's `log_replicas`.
    #[serde(default = "default_roles")]
    pub roles: Vec<String>,
    /// Milliseconds between GC reports of this node's SMR runtime.
    #[serde(default = "default_gc_interval_ms")]
    pub gc_interval_ms: u64,
    /// The failure domain within the site (a rack, a power feed): objects
    /// keep their copies in distinct ones.
    #[serde(default)]
    pub fault_domain: Option<String>,
    /// Disks for object components (hosts with the storage role): each a
    /// directory. None given: one under `data_dir/disks/0`.
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    /// Owner threads (default: the number of cores).
    #[serde(default)]
    pub owner_threads: Option<usize>,
    /// Component threads (default: the number of cores).
    #[serde(default)]
    pub component_threads: Option<usize>,
    /// Threads serving iSCSI connections (target role; default: the number
    /// of cores). Each connection stays on one of them.
    #[serde(default)]
    pub iscsi_threads: Option<usize>,
    /// Seconds a component may stay absent before it is rebuilt on
    /// another host (default: one hour).
    #[serde(default = "default_repair_delay_secs")]
    pub repair_delay_secs: u64,
    /// Seconds a component no object names stays on this host's disks
    /// before it is deleted (default: five minutes).
    #[serde(default = "default_orphan_grace_secs")]
    pub orphan_grace_secs: u64,
    /// Resyncs of the objects this host owns that copy at once; the rest
    /// wait their turn in the cluster's task queue (default: 2).
    #[serde(default = "default_resync_concurrency")]
    pub resync_concurrency: usize,
    /// The port the iSCSI target service listens on, at this host's address
    /// (hosts with the target role).
    #[serde(default = "default_iscsi_port")]
    pub iscsi_port: u16,
    /// How fast a SANITIZE OVERWRITE of a volume this host serves may
    /// write, in MiB a second, so that it leaves room on shared disks and
    /// links for other volumes' I/O; 0: unpaced (default: 256).
    #[serde(default = "default_sanitize_mib_per_second")]
    pub sanitize_mib_per_second: u64,
    /// MiB of memory for blocks read recently from the objects this host
    /// owns, served again without asking a component; 0: no cache
    /// (default: 256).
    #[serde(default = "default_block_cache_mib")]
    pub block_cache_mib: u64,
    /// MiB each component disk keeps free for its journal and checkpoints:
    /// a write that needs new blocks beyond it is refused (SCSI: SPACE
    /// ALLOCATION FAILED WRITE PROTECT) rather than fail the disk
    /// (default: 64).
    #[serde(default = "default_disk_reserve_mib")]
    pub disk_reserve_mib: u64,
    /// The network interface the cluster's discovery VIP (the bootstrap
    /// setting `vip`) is added to while this host owns it, with `ip addr`
    /// (needs CAP_NET_ADMIN). Unset: the address is bound only, which
    /// suffices for a loopback address or one the host always has.
    #[serde(default)]
    pub vip_interface: Option<String>,
    /// How fast resyncs of the objects this host owns may copy, in MiB a
    /// second across all of them, so that a returning host's catch-up
    /// leaves room for foreground I/O; 0: unpaced (default).
    #[serde(default)]
    pub resync_mib_per_second: u64,
    /// Seconds a SCSI command this host serves is tried again when no host
    /// answers as its object's owner (the owner's host died, and another
    /// takes the object over once the death is detected, in about 4-5 s) or
    /// the owner has no copy available (every copy's host is away), before
    /// it ends with NOT READY; 0: at once. A try can itself take up to the
    /// block client's I/O timeout. Keep it under the initiators' command
    /// timeout (Linux: 30 s) (default: 20).
    #[serde(default = "default_io_hold_secs")]
    pub io_hold_secs: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    pub path: PathBuf,
}

fn default_roles() -> Vec<String> {
    vec!["storage".into(), "target".into()]
}

fn default_gc_interval_ms() -> u64 {
    1000
}

fn default_repair_delay_secs() -> u64 {
    3600
}

fn default_orphan_grace_secs() -> u64 {
    300
}

fn default_resync_concurrency() -> usize {
    2
}

fn default_iscsi_port() -> u16 {
    3260
}

fn default_sanitize_mib_per_second() -> u64 {
    256
}

fn default_block_cache_mib() -> u64 {
    256
}

fn default_disk_reserve_mib() -> u64 {
    64
}

fn default_io_hold_secs() -> u64 {
    20
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
}

impl NodeConfig {
    /// A config for host `node_id` with every other setting at the default
    /// a `node.toml` that leaves it out gets.
    pub fn new(node_id: u64, data_dir: impl Into<PathBuf>, cluster_config_dir: impl Into<PathBuf>) -> NodeConfig {
        NodeConfig {
            node_id,
            data_dir: data_dir.into(),
            cluster_config_dir: cluster_config_dir.into(),
            roles: default_roles(),
            gc_interval_ms: default_gc_interval_ms(),
            fault_domain: None,
            disks: Vec::new(),
            owner_threads: None,
            component_threads: None,
            iscsi_threads: None,
            repair_delay_secs: default_repair_delay_secs(),
            orphan_grace_secs: default_orphan_grace_secs(),
            resync_concurrency: default_resync_concurrency(),
            iscsi_port: default_iscsi_port(),
            sanitize_mib_per_second: default_sanitize_mib_per_second(),
            block_cache_mib: default_block_cache_mib(),
            disk_reserve_mib: default_disk_reserve_mib(),
            vip_interface: None,
            resync_mib_per_second: 0,
            io_hold_secs: default_io_hold_secs(),
        }
    }

    pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        let mut config: NodeConfig = toml::from_str(&text)
            .map_err(|error| ConfigError::Invalid { path: path.display().to_string(), reason: error.to_string() })?;
        // Relative paths are relative to the config file, so a cluster
        // directory can be moved as a whole.
        let base = path.parent().unwrap_or(Path::new("."));
        if config.data_dir.is_relative() {
            config.data_dir = base.join(&config.data_dir);
        }
        if config.cluster_config_dir.is_relative() {
            config.cluster_config_dir = base.join(&config.cluster_config_dir);
        }
        for disk in &mut config.disks {
            if disk.path.is_relative() {
                disk.path = base.join(&disk.path);
            }
        }
        if config.owner_threads == Some(0) || config.component_threads == Some(0) || config.iscsi_threads == Some(0) {
            return Err(ConfigError::Invalid {
                path: path.display().to_string(),
                reason: "owner_threads, component_threads and iscsi_threads must be at least 1".into(),
            });
        }
        catalog::Roles::parse(&config.roles)
            .map_err(|reason| ConfigError::Invalid { path: path.display().to_string(), reason })?;
        if config.gc_interval_ms == 0 {
            return Err(ConfigError::Invalid {
                path: path.display().to_string(),
                reason: "gc_interval_ms must be positive".into(),
            });
        }
        Ok(config)
    }

    /// The component disks' directories.
    pub fn disk_paths(&self) -> Vec<PathBuf> {
        if self.disks.is_empty() {
            vec![self.data_dir.join("disks").join("0")]
        } else {
            self.disks.iter().map(|disk| disk.path.clone()).collect()
        }
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a NodeConfig always serializes to TOML")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_follow_the_file_and_bad_roles_are_named() {
        let dir = tempfile_dir();
        let path = dir.join("node.toml");
        std::fs::write(
            &path,
            "node_id = 1\ndata_dir = \"data\"\ncluster_config_dir = \"../config\"\nroles = [\"storage\"]\n",
        )
        .unwrap();
        let config = NodeConfig::load(&path).unwrap();
        assert_eq!(config.data_dir, dir.join("data"));
        std::fs::write(&path, "node_id = 1\ndata_dir = \"d\"\ncluster_config_dir = \"c\"\nroles = [\"chef\"]\n")
            .unwrap();
        let error = NodeConfig::load(&path).unwrap_err().to_string();
        assert!(error.contains("unknown role \"chef\""), "{error}");
        std::fs::write(&path, "node_id = 1\ndata_dir = \"d\"\ncluster_config_dir = \"c\"\ntypo = 3\n").unwrap();
        let error = NodeConfig::load(&path).unwrap_err().to_string();
        assert!(error.contains("typo"), "{error}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("tessera-config-test-{}-{}", std::process::id(), rand::random::<u32>()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
