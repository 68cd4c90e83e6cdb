//! The cluster status as the admin API returns it (`GET /api/v1/status`)
//! and `tessera status --json` prints it.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub cluster_id: String,
    /// True when every host is reachable and registered up, the log has a
    /// leader and every log replica is caught up.
    pub healthy: bool,
    /// Why the cluster is not healthy, in words.
    pub problems: Vec<String>,
    /// The host that answered.
    pub served_by: u64,
    pub hosts: Vec<HostStatus>,
    pub log: LogSummary,
    /// Epoch of the aggregation hierarchy (bumped by every change).
    pub tree_epoch: u64,
    #[serde(default)]
    pub objects: Vec<ObjectStatus>,
    #[serde(default)]
    pub volumes: Vec<crate::targets::VolumeStatus>,
    #[serde(default)]
    pub targets: Vec<crate::targets::TargetStatus>,
    /// The discovery VIP, when the cluster has one.
    #[serde(default)]
    pub vip: Option<VipStatus>,
}

/// The discovery VIP as the catalog records it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipStatus {
    pub address: String,
    pub owner: Option<u64>,
    pub owner_name: Option<String>,
    pub epoch: u64,
    /// When the owner took it (milliseconds since the epoch).
    pub since_ms: u64,
}

/// An object as `tessera status` and `tessera object show` see it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ObjectStatus {
    pub name: String,
    pub id: u64,
    pub policy: String,
    pub size_bytes: u64,
    pub owner: u64,
    pub owner_epoch: u64,
    /// "healthy", "resyncing", "degraded" or "unavailable" (as the catalog
    /// records it; see `catalog::ObjectRecord::health`).
    pub health: String,
    pub components: Vec<ComponentStatus>,
    /// Live figures from the owner, when it answered.
    pub resync: Option<ResyncProgress>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ComponentStatus {
    pub id: u64,
    pub host: u64,
    pub disk: u32,
    /// "active", "absent" or "resyncing".
    pub state: String,
    /// Absent or resyncing: the LSN it holds every write up to.
    pub stale_lsn: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ResyncProgress {
    /// Bytes the resyncs under way still have to copy.
    pub bytes_to_go: u64,
    /// Bytes they copied so far, and the rate since they began.
    pub bytes_copied: u64,
    pub bytes_per_second: f64,
    /// Seconds left at that rate (none before any progress).
    pub eta_seconds: Option<f64>,
    /// Bytes copied by every resync of this owner, and how many were full
    /// copies.
    pub bytes_copied_total: u64,
    pub full_copies: u64,
    pub resyncs_done: u64,
    /// Blocks found corrupt on read and repaired from another copy.
    #[serde(default)]
    pub blocks_repaired: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HostStatus {
    pub id: u64,
    pub name: String,
    pub address: String,
    pub admin_address: String,
    pub roles: Vec<String>,
    pub site: Option<String>,
    /// "up", "down", "unreachable" or "unregistered".
    pub state: String,
    /// The state the catalog records, if the host registered.
    pub catalog_state: Option<String>,
    pub reachable: bool,
    /// "leader", "follower", … for log replicas.
    pub log_role: Option<String>,
    pub epoch: Option<u64>,
    /// "root", "branch" or "leaf" in the aggregation hierarchy.
    pub tree_role: Option<String>,
    /// The host it reports to (none for the root).
    pub parent: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LogSummary {
    pub leader: Option<u64>,
    pub leader_name: Option<String>,
    pub term: u64,
    pub commit_index: Option<u64>,
    /// The shared log's next position.
    pub tail: u64,
    pub snapshot_mark: u64,
    pub live_entries: u64,
    pub live_bytes: u64,
    pub disk_bytes: u64,
    pub replicas: Vec<ReplicaStatus>,
    pub gc_clients: Vec<GcClientStatus>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    pub id: u64,
    pub address: String,
    pub reachable: bool,
    pub role: Option<String>,
    pub applied_index: Option<u64>,
    pub tail: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GcClientStatus {
    pub id: u64,
    pub name: String,
    pub progress: u64,
    /// Log entries between its progress and the tail.
    pub lag: u64,
}
