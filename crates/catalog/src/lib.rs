//! `catalog`: the cluster's metadata.
//!
//! - [`bootstrap`]: the config that exists before the log does (cluster id,
//!   seed hosts, log replicas), kept in a directory of numbered versions that
//!   hosts update by atomic directory rename.
//! - [`Catalog`]: hosts, disks and sites as replicated maps on the shared log,
//!   and the aggregation tree as a replicated register, with compare-and-set
//!   on versions and change notification; objects, volumes, targets and
//!   the discovery VIP likewise. Later issues add reservations and the
//!   memory pool.
//!
//! **Boundary:** knows the shared log and its SMR objects; knows nothing of
//! storage, iSCSI or the node daemon.

pub mod bootstrap;
pub mod records;

use sharedlog::objects::{Conflict, Map, Register};
use sharedlog::smr::{Replicated, Runtime, SmrError};
use sharedlog::types::{Position, StreamId};
use tokio::sync::watch;
use wire::Transport;

pub use records::*;

pub const HOSTS_STREAM: StreamId = StreamId::from_name("catalog/hosts");
pub const DISKS_STREAM: StreamId = StreamId::from_name("catalog/disks");
pub const SITES_STREAM: StreamId = StreamId::from_name("catalog/sites");
pub const TREE_STREAM: StreamId = StreamId::from_name("catalog/tree");
pub const OBJECTS_STREAM: StreamId = StreamId::from_name("catalog/objects");
pub const VOLUMES_STREAM: StreamId = StreamId::from_name("catalog/volumes");
pub const TARGETS_STREAM: StreamId = StreamId::from_name("catalog/targets");
pub const VIP_STREAM: StreamId = StreamId::from_name("catalog/vip");
pub const RESERVATIONS_STREAM: StreamId = StreamId::from_name("catalog/reservations");

/// Compare-and-set retries before an update gives up (contention is between
/// a handful of hosts; this bounds a pathological loop).
pub const UPDATE_RETRIES_MAX: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error(transparent)]
    Log(#[from] SmrError),
    #[error("gave up after {UPDATE_RETRIES_MAX} conflicting updates of {0}")]
    Contended(String),
    #[error("{0} not found")]
    NotFound(String),
}

/// The cluster catalog as one host sees it.
pub struct Catalog<T: Transport> {
    pub hosts: Replicated<Map<HostId, HostRecord>, T>,
    pub disks: Replicated<Map<String, DiskRecord>, T>,
    pub sites: Replicated<Map<String, SiteRecord>, T>,
    /// The aggregation hierarchy: roles and parents, with its epoch.
    pub tree: Replicated<Register<hierarchy::Tree>, T>,
    /// Objects by name.
    pub objects: Replicated<Map<String, ObjectRecord>, T>,
    /// Volumes by name.
    pub volumes: Replicated<Map<String, VolumeRecord>, T>,
    /// iSCSI targets by IQN.
    pub targets: Replicated<Map<String, TargetRecord>, T>,
    /// The discovery VIP: its address, owner host and epoch.
    pub vip: Replicated<Register<VipRecord>, T>,
    /// SCSI persistent reservations by volume, opaque to the catalog (the
    /// target service's encoding), shared by every host serving the volume.
    pub reservations: Replicated<Map<String, Vec<u8>>, T>,
}

impl<T: Transport> Catalog<T> {
    /// Opens every catalog object (each catches up with the log first).
    pub async fn open(runtime: &Runtime<T>) -> Result<Catalog<T>, CatalogError> {
        Ok(Catalog {
            hosts: runtime.open(HOSTS_STREAM).await?,
            disks: runtime.open(DISKS_STREAM).await?,
            sites: runtime.open(SITES_STREAM).await?,
            tree: runtime.open(TREE_STREAM).await?,
            objects: runtime.open(OBJECTS_STREAM).await?,
            volumes: runtime.open(VOLUMES_STREAM).await?,
            targets: runtime.open(TARGETS_STREAM).await?,
            vip: runtime.open(VIP_STREAM).await?,
            reservations: runtime.open(RESERVATIONS_STREAM).await?,
        })
    }

    /// Changes whenever the host table changes.
    pub fn watch_hosts(&self) -> watch::Receiver<u64> {
        self.hosts.changes()
    }

    /// All hosts, linearizably.
    pub async fn hosts(&self) -> Result<Vec<(HostRecord, Position)>, CatalogError> {
        Ok(self.hosts.entries().await?.into_iter().map(|(_, record, version)| (record, version)).collect())
    }

    /// Reads, modifies and writes a host record with compare-and-set,
    /// retrying on conflict. `modify` returns `None` to leave it as it is.
    /// Every change bumps the record's epoch.
    pub async fn update_host(
        &self,
        id: HostId,
        mut modify: impl FnMut(Option<&HostRecord>) -> Option<HostRecord>,
    ) -> Result<Option<(HostRecord, Position)>, CatalogError> {
        for _ in 0..UPDATE_RETRIES_MAX {
            let current = self.hosts.get(&id).await?;
            let Some(mut updated) = modify(current.as_ref().map(|(record, _)| record)) else {
                return Ok(current);
            };
            updated.epoch = current.as_ref().map(|(record, _)| record.epoch + 1).unwrap_or(1);
            let expected = current.as_ref().map(|(_, version)| *version);
            match self.hosts.compare_and_set(id, expected, Some(updated.clone())).await? {
                Ok(version) => return Ok(Some((updated, version))),
                Err(Conflict { .. }) => continue,
            }
        }
        Err(CatalogError::Contended(format!("host {id}")))
    }

    /// Registers (or re-registers after a restart) a host as up.
    pub async fn register_host(&self, record: HostRecord) -> Result<(HostRecord, Position), CatalogError> {
        let id = record.id;
        let registered = self
            .update_host(id, |current| {
                let mut updated = record.clone();
                updated.state = HostState::Up;
                match current {
                    Some(current) if current.same_registration(&updated) => None,
                    _ => Some(updated),
                }
            })
            .await?;
        registered.ok_or_else(|| CatalogError::NotFound(format!("host {id}")))
    }

    /// Sets a host's state if its epoch is still `expected_epoch` (fencing:
    /// a decision made on stale information does not apply).
    pub async fn set_host_state(
        &self,
        id: HostId,
        state: HostState,
        expected_epoch: u64,
    ) -> Result<Result<u64, Conflict>, CatalogError> {
        let Some((current, version)) = self.hosts.get(&id).await? else {
            return Err(CatalogError::NotFound(format!("host {id}")));
        };
        if current.epoch != expected_epoch {
            return Ok(Err(Conflict { current: Some(version) }));
        }
        let mut updated = current;
        updated.state = state;
        updated.epoch += 1;
        let epoch = updated.epoch;
        Ok(self.hosts.compare_and_set(id, Some(version), Some(updated)).await?.map(|_| epoch))
    }

    /// The tree as this host knows it (may be a moment stale) with the
    /// register's version.
    pub fn tree_local(&self) -> (hierarchy::Tree, Option<Position>) {
        match self.tree.get_local() {
            Some((tree, version)) => (tree, Some(version)),
            None => (hierarchy::Tree::default(), None),
        }
    }

    /// Changes whenever the tree changes.
    pub fn watch_tree(&self) -> watch::Receiver<u64> {
        self.tree.changes()
    }

    /// Adds a new object; `Ok(Err(_))` when the name is taken.
    pub async fn create_object(&self, record: ObjectRecord) -> Result<Result<Position, Conflict>, CatalogError> {
        Ok(self.objects.compare_and_set(record.name.clone(), None, Some(record)).await?)
    }

    /// Reads, modifies and writes an object record with compare-and-set,
    /// retrying on conflict. `modify` returns `None` to leave it as it is
    /// (or when it decides the change no longer applies).
    pub async fn update_object(
        &self,
        name: &str,
        mut modify: impl FnMut(&ObjectRecord) -> Option<ObjectRecord>,
    ) -> Result<Option<ObjectRecord>, CatalogError> {
        for _ in 0..UPDATE_RETRIES_MAX {
            let Some((current, version)) = self.objects.get(&name.to_string()).await? else {
                return Err(CatalogError::NotFound(format!("object {name:?}")));
            };
            let Some(updated) = modify(&current) else { return Ok(None) };
            match self.objects.compare_and_set(name.to_string(), Some(version), Some(updated.clone())).await? {
                Ok(_) => return Ok(Some(updated)),
                Err(Conflict { .. }) => continue,
            }
        }
        Err(CatalogError::Contended(format!("object {name:?}")))
    }

    /// Removes an object record.
    pub async fn remove_object(&self, name: &str) -> Result<Option<ObjectRecord>, CatalogError> {
        for _ in 0..UPDATE_RETRIES_MAX {
            let Some((current, version)) = self.objects.get(&name.to_string()).await? else { return Ok(None) };
            match self.objects.compare_and_set(name.to_string(), Some(version), None).await? {
                Ok(_) => return Ok(Some(current)),
                Err(Conflict { .. }) => continue,
            }
        }
        Err(CatalogError::Contended(format!("object {name:?}")))
    }

    /// Changes whenever an object record changes.
    pub fn watch_objects(&self) -> watch::Receiver<u64> {
        self.objects.changes()
    }

    /// Reads, modifies and writes a volume record with compare-and-set;
    /// `modify` gets `None` when there is no such volume and returns the
    /// new record (`Some(None)` removes it) or `None` to leave it.
    pub async fn update_volume(
        &self,
        name: &str,
        modify: impl FnMut(Option<&VolumeRecord>) -> Option<Option<VolumeRecord>>,
    ) -> Result<Option<VolumeRecord>, CatalogError> {
        update_named(&self.volumes, "volume", name, modify).await
    }

    /// The same for a target record.
    pub async fn update_target(
        &self,
        name: &str,
        modify: impl FnMut(Option<&TargetRecord>) -> Option<Option<TargetRecord>>,
    ) -> Result<Option<TargetRecord>, CatalogError> {
        update_named(&self.targets, "target", name, modify).await
    }

    pub async fn put_disk(&self, disk: DiskRecord) -> Result<Position, CatalogError> {
        Ok(self.disks.put(disk.id.clone(), disk).await?)
    }

    pub async fn put_site(&self, site: SiteRecord) -> Result<Position, CatalogError> {
        Ok(self.sites.put(site.name.clone(), site).await?)
    }
}

/// Compare-and-set of one record of a map keyed by name, retried on
/// conflict (see [`Catalog::update_volume`]).
async fn update_named<R, T>(
    map: &Replicated<Map<String, R>, T>,
    what: &str,
    name: &str,
    mut modify: impl FnMut(Option<&R>) -> Option<Option<R>>,
) -> Result<Option<R>, CatalogError>
where
    R: sharedlog::objects::Value,
    T: Transport,
{
    for _ in 0..UPDATE_RETRIES_MAX {
        let current = map.get(&name.to_string()).await?;
        let Some(updated) = modify(current.as_ref().map(|(record, _)| record)) else {
            return Ok(current.map(|(record, _)| record));
        };
        let expected = current.as_ref().map(|(_, version)| *version);
        match map.compare_and_set(name.to_string(), expected, updated.clone()).await? {
            Ok(_) => return Ok(updated),
            Err(Conflict { .. }) => continue,
        }
    }
    Err(CatalogError::Contended(format!("{what} {name:?}")))
}
