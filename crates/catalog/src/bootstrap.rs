//! The bootstrap config, updated through directory renames (the seed's
//! mechanism).
//!
//! Before the shared log exists, hosts agree on the cluster's config through
//! a directory (possibly on a shared file system) holding numbered versions:
//! `<dir>/v<N>/cluster.toml`. To update, a host reads the highest version N,
//! modifies it, writes the result into a private temporary directory, syncs
//! it, and renames the temporary directory to `v<N+1>`. A rename onto an
//! existing, non-empty directory fails atomically, so of two hosts that both
//! started from N exactly one wins; the other re-reads the new latest
//! version and tries again: no update is lost. Readers take the highest
//! version whose `cluster.toml` parses.
//!
//! Old versions are pruned by replacing their contents with a `pruned`
//! marker file rather than deleting them: an empty or missing `v<N>` would
//! let a slow writer's rename succeed below the latest version, silently
//! losing its update.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fsio::Fs;
use serde::{Deserialize, Serialize};

/// Versions kept in full; older ones are pruned.
pub const VERSIONS_KEPT: u64 = 32;
/// Attempts before an update gives up (each failure means another host
/// committed a version, so this bounds contention, not waiting).
pub const UPDATE_ATTEMPTS_MAX: usize = 10_000;
const CONFIG_FILE: &str = "cluster.toml";
const PRUNED_MARKER: &str = "pruned";

/// One host as the bootstrap config lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeedHost {
    pub id: u64,
    pub name: String,
    /// Node-to-node address.
    pub address: String,
    /// Admin HTTP address.
    pub admin_address: String,
    #[serde(default)]
    pub site: Option<String>,
}

/// The cluster's bootstrap config.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootstrapConfig {
    pub cluster_id: String,
    #[serde(default)]
    pub hosts: Vec<SeedHost>,
    /// Ids of the hosts holding the shared log's replicas (1, 3 or 5).
    #[serde(default)]
    pub log_replicas: Vec<u64>,
    /// Operator settings, free-form.
    #[serde(default)]
    pub settings: BTreeMap<String, String>,
}

impl BootstrapConfig {
    /// A cluster of `hosts` on one machine: host `n` is `host-n` on loopback
    /// address `127.0.0.<first_octet + n - 1>`, every host on the same two
    /// ports; the first 1, 3 or 5 hosts hold the log (see
    /// [`log_replica_count`]). `tessera up`, the scenarios and the benchmarks
    /// all lay clusters out this way.
    pub fn local(
        cluster_id: impl Into<String>,
        hosts: u64,
        first_octet: u8,
        wire_port: u16,
        admin_port: u16,
    ) -> BootstrapConfig {
        let address = |id: u64, port: u16| format!("127.0.0.{}:{port}", first_octet as u64 + id - 1);
        BootstrapConfig {
            cluster_id: cluster_id.into(),
            hosts: (1..=hosts)
                .map(|id| SeedHost {
                    id,
                    name: format!("host-{id}"),
                    address: address(id, wire_port),
                    admin_address: address(id, admin_port),
                    site: None,
                })
                .collect(),
            log_replicas: (1..=log_replica_count(hosts)).collect(),
            settings: BTreeMap::new(),
        }
    }

    pub fn host(&self, id: u64) -> Option<&SeedHost> {
        self.hosts.iter().find(|host| host.id == id)
    }

    /// Addresses of the log replicas, by host id.
    pub fn log_replica_addresses(&self) -> BTreeMap<u64, String> {
        self.log_replicas.iter().filter_map(|id| self.host(*id).map(|host| (*id, host.address.clone()))).collect()
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.cluster_id.is_empty() {
            return Err("cluster_id is empty".into());
        }
        if ![1, 3, 5].contains(&self.log_replicas.len()) {
            return Err(format!("the log needs 1, 3 or 5 replicas, not {}", self.log_replicas.len()));
        }
        for id in &self.log_replicas {
            if self.host(*id).is_none() {
                return Err(format!("log replica {id} is not among the hosts"));
            }
        }
        let mut ids: Vec<u64> = self.hosts.iter().map(|host| host.id).collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() != self.hosts.len() {
            return Err("host ids are not unique".into());
        }
        Ok(())
    }
}

/// Log replicas for a cluster of `hosts`: a majority must survive one
/// failure once there are three hosts, two once there are five.
pub fn log_replica_count(hosts: u64) -> u64 {
    match hosts {
        0..=2 => 1,
        3 | 4 => 3,
        _ => 5,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("config directory {dir}: {source}")]
    Io { dir: String, source: io::Error },
    #[error("{path} does not parse: {reason}")]
    Parse { path: String, reason: String },
    #[error("gave up after {UPDATE_ATTEMPTS_MAX} conflicting attempts")]
    Contended,
}

/// A bootstrap config directory.
pub struct ConfigDir {
    fs: Arc<dyn Fs>,
    root: PathBuf,
}

fn version_of(name: &str) -> Option<u64> {
    name.strip_prefix('v')?.parse().ok()
}

impl ConfigDir {
    pub fn new(fs: Arc<dyn Fs>, root: impl Into<PathBuf>) -> ConfigDir {
        ConfigDir { fs, root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn io_error(&self, source: io::Error) -> BootstrapError {
        BootstrapError::Io { dir: self.root.display().to_string(), source }
    }

    /// Version numbers present, highest first.
    fn versions(&self) -> Result<Vec<u64>, BootstrapError> {
        if !self.fs.exists(&self.root) {
            return Ok(Vec::new());
        }
        let mut versions: Vec<u64> = self
            .fs
            .list(&self.root)
            .map_err(|error| self.io_error(error))?
            .iter()
            .filter_map(|name| version_of(name))
            .collect();
        versions.sort_unstable_by(|a, b| b.cmp(a));
        Ok(versions)
    }

    /// The highest complete version and its config, if any.
    pub fn latest(&self) -> Result<Option<(u64, BootstrapConfig)>, BootstrapError> {
        for version in self.versions()? {
            let path = self.root.join(format!("v{version}")).join(CONFIG_FILE);
            if !self.fs.exists(&path) {
                continue; // pruned
            }
            let bytes = self.fs.read_file(&path).map_err(|error| self.io_error(error))?;
            let text = String::from_utf8_lossy(&bytes);
            let config = toml::from_str(&text).map_err(|error| BootstrapError::Parse {
                path: path.display().to_string(),
                reason: error.to_string(),
            })?;
            return Ok(Some((version, config)));
        }
        Ok(None)
    }

    /// Applies `modify` to the latest version (or to an empty config) and
    /// commits the result as the next version. `modify` may run several
    /// times, once per attempt. Returns the committed version.
    pub fn update(
        &self,
        mut modify: impl FnMut(&mut BootstrapConfig),
    ) -> Result<(u64, BootstrapConfig), BootstrapError> {
        self.fs.create_dir_all(&self.root).map_err(|error| self.io_error(error))?;
        for _ in 0..UPDATE_ATTEMPTS_MAX {
            let (version, mut config) = self.latest()?.unwrap_or_default();
            modify(&mut config);
            let text = toml::to_string_pretty(&config).expect("a BootstrapConfig always serializes to TOML");
            let temporary = self.root.join(format!(".tmp-{}-{:016x}", std::process::id(), rand::random::<u64>()));
            self.write_version_dir(&temporary, text.as_bytes()).map_err(|error| self.io_error(error))?;
            let target = self.root.join(format!("v{}", version + 1));
            match self.fs.rename(&temporary, &target) {
                Ok(()) => {
                    self.fs.sync_dir(&self.root).map_err(|error| self.io_error(error))?;
                    self.prune(version + 1);
                    return Ok((version + 1, config));
                }
                Err(_) if self.fs.exists(&target) => {
                    // Another host committed v<N+1> first: start again from it.
                    let _ = self.fs.remove_dir_all(&temporary);
                }
                Err(error) => {
                    let _ = self.fs.remove_dir_all(&temporary);
                    return Err(self.io_error(error));
                }
            }
        }
        Err(BootstrapError::Contended)
    }

    fn write_version_dir(&self, dir: &Path, contents: &[u8]) -> io::Result<()> {
        self.fs.create_dir_all(dir)?;
        let file = self.fs.open(&dir.join(CONFIG_FILE), true)?;
        file.set_len(0)?;
        file.write_at(contents, 0)?;
        file.sync_data()?;
        self.fs.sync_dir(dir)
    }

    /// Replaces versions older than `latest - VERSIONS_KEPT` with a marker.
    fn prune(&self, latest: u64) {
        let Ok(versions) = self.versions() else {
            return;
        };
        for version in versions.into_iter().filter(|version| version + VERSIONS_KEPT < latest) {
            let dir = self.root.join(format!("v{version}"));
            let config = dir.join(CONFIG_FILE);
            if !self.fs.exists(&config) {
                continue;
            }
            // Marker first, so the directory is never empty.
            if let Ok(marker) = self.fs.open(&dir.join(PRUNED_MARKER), true) {
                drop(marker);
                let _ = self.fs.remove_file(&config);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_dir() -> (tempfile::TempDir, ConfigDir) {
        let dir = tempfile::tempdir().unwrap();
        let config = ConfigDir::new(fsio::real(), dir.path().join("config"));
        (dir, config)
    }

    #[test]
    fn versions_increase_and_latest_wins() {
        let (_dir, config) = config_dir();
        assert!(config.latest().unwrap().is_none());
        let (first, _) = config.update(|c| c.cluster_id = "c1".into()).unwrap();
        let (second, _) = config
            .update(|c| {
                c.settings.insert("a".into(), "1".into());
            })
            .unwrap();
        assert_eq!((first, second), (1, 2));
        let (version, latest) = config.latest().unwrap().unwrap();
        assert_eq!(version, 2);
        assert_eq!(latest.cluster_id, "c1");
        assert_eq!(latest.settings["a"], "1");
    }

    #[test]
    fn concurrent_writers_lose_nothing() {
        let (_dir, config) = config_dir();
        let config = Arc::new(config);
        let threads: Vec<_> = (0..4)
            .map(|writer| {
                let config = config.clone();
                std::thread::spawn(move || {
                    for update in 0..25 {
                        config
                            .update(|c| {
                                c.settings.insert(format!("w{writer}-u{update}"), "x".into());
                            })
                            .unwrap();
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        let (version, latest) = config.latest().unwrap().unwrap();
        assert_eq!(version, 100);
        assert_eq!(latest.settings.len(), 100);
    }

    #[test]
    fn pruned_versions_still_block_a_stale_rename() {
        let (_dir, config) = config_dir();
        for index in 0..(VERSIONS_KEPT + 5) {
            config.update(|c| c.cluster_id = format!("c{index}")).unwrap();
        }
        let pruned = config.root().join("v1");
        assert!(config.fs.exists(&pruned.join(PRUNED_MARKER)));
        assert!(!config.fs.exists(&pruned.join(CONFIG_FILE)));
        // A writer that read v0 long ago tries to commit v1: refused.
        let stale = config.root().join(".tmp-stale");
        config.write_version_dir(&stale, b"cluster_id = \"stale\"").unwrap();
        assert!(config.fs.rename(&stale, &pruned).is_err());
        assert_eq!(config.latest().unwrap().unwrap().1.cluster_id, format!("c{}", VERSIONS_KEPT + 4));
    }

    #[test]
    fn validation_names_the_problem() {
        let mut config = BootstrapConfig { cluster_id: "c".into(), ..Default::default() };
        assert!(config.validate().unwrap_err().contains("1, 3 or 5"));
        config.hosts.push(SeedHost {
            id: 1,
            name: "h1".into(),
            address: "a".into(),
            admin_address: "b".into(),
            site: None,
        });
        config.log_replicas = vec![1];
        config.validate().unwrap();
    }
}
