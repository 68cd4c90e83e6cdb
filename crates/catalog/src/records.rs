//! Catalog record types.

use serde::{Deserialize, Serialize};

pub type HostId = u64;

/// What a host does in the cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Roles {
    /// Holds a replica of the shared log.
    pub log: bool,
    /// Has disks for object components.
    pub storage: bool,
    /// Lends memory to the cluster memory pool.
    pub memory: bool,
    /// Serves iSCSI targets.
    pub target: bool,
}

impl Roles {
    pub fn names(&self) -> Vec<&'static str> {
        let mut names = Vec::new();
        if self.log {
            names.push("log");
        }
        if self.storage {
            names.push("storage");
        }
        if self.memory {
            names.push("memory");
        }
        if self.target {
            names.push("target");
        }
        names
    }

    pub fn parse(names: &[String]) -> Result<Roles, String> {
        let mut roles = Roles::default();
        for name in names {
            match name.as_str() {
                "log" => roles.log = true,
                "storage" => roles.storage = true,
                "memory" => roles.memory = true,
                "target" => roles.target = true,
                other => return Err(format!("unknown role {other:?} (known: log, storage, memory, target)")),
            }
        }
        Ok(roles)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostState {
    Up,
    Down,
    /// Removed from service by an operator.
    Decommissioned,
}

impl HostState {
    pub fn as_str(&self) -> &'static str {
        match self {
            HostState::Up => "up",
            HostState::Down => "down",
            HostState::Decommissioned => "decommissioned",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    pub id: HostId,
    pub name: String,
    /// Node-to-node (wire) address.
    pub address: String,
    /// Admin HTTP address.
    pub admin_address: String,
    pub roles: Roles,
    pub site: Option<String>,
    pub fault_domain: Option<String>,
    pub state: HostState,
    /// Bumped on every change; decisions about the host carry it (fencing).
    pub epoch: u64,
    /// When the host's current process started (microseconds since the
    /// epoch): tells a restart from a long-running process.
    pub incarnation: u64,
    /// Where this host's component threads listen (one address each); an
    /// owner thread `i` talks to thread `i mod len` (empty: no storage).
    #[serde(default)]
    pub component_addresses: Vec<String>,
    /// Where this host's iSCSI target service listens (its portal).
    #[serde(default)]
    pub iscsi_address: Option<String>,
}

impl HostRecord {
    /// Whether `other` registers the same process with the same settings.
    pub fn same_registration(&self, other: &HostRecord) -> bool {
        self.name == other.name
            && self.address == other.address
            && self.admin_address == other.admin_address
            && self.roles == other.roles
            && self.site == other.site
            && self.fault_domain == other.fault_domain
            && self.state == other.state
            && self.incarnation == other.incarnation
            && self.component_addresses == other.component_addresses
            && self.iscsi_address == other.iscsi_address
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRecord {
    /// `<host id>/<disk name>`.
    pub id: String,
    pub host: HostId,
    pub path: String,
    pub capacity_bytes: u64,
    pub failed: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteRecord {
    pub name: String,
    pub description: String,
}

/// An object's id; its components are `id << 8 | index`.
pub type ObjectId = u64;

/// How an object keeps its data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Policy {
    /// One copy.
    None,
    /// `copies` (2 or 3) identical copies on distinct hosts.
    Raid1 { copies: u8 },
    /// Erasure-coded: stripes of `data` (2, 3 or 4) data chunks and one
    /// parity chunk, one chunk per component, on distinct hosts.
    Raid5 { data: u8 },
    /// Erasure-coded: stripes of `data` (4) data chunks and two parity
    /// chunks.
    Raid6 { data: u8 },
}

impl Policy {
    /// Components per object (copies, or data and parity chunks).
    pub fn copies(&self) -> usize {
        match self {
            Policy::None => 1,
            Policy::Raid1 { copies } => *copies as usize,
            Policy::Raid5 { data } => *data as usize + 1,
            Policy::Raid6 { data } => *data as usize + 2,
        }
    }

    /// Erasure-coded: data and parity chunks per stripe.
    pub fn erasure(&self) -> Option<(usize, usize)> {
        match self {
            Policy::None | Policy::Raid1 { .. } => None,
            Policy::Raid5 { data } => Some((*data as usize, 1)),
            Policy::Raid6 { data } => Some((*data as usize, 2)),
        }
    }

    /// `none`, `raid1` (2 copies), `raid1:2`, `raid1:3`, `raid5` (3+1),
    /// `raid5:2+1`, `raid5:3+1`, `raid5:4+1`, `raid6` (4+2), `raid6:4+2`.
    pub fn parse(text: &str) -> Result<Policy, String> {
        match text {
            "none" => Ok(Policy::None),
            "raid1" | "raid1:2" => Ok(Policy::Raid1 { copies: 2 }),
            "raid1:3" => Ok(Policy::Raid1 { copies: 3 }),
            "raid5:2+1" => Ok(Policy::Raid5 { data: 2 }),
            "raid5" | "raid5:3+1" => Ok(Policy::Raid5 { data: 3 }),
            "raid5:4+1" => Ok(Policy::Raid5 { data: 4 }),
            "raid6" | "raid6:4+2" => Ok(Policy::Raid6 { data: 4 }),
            other => Err(format!(
                "unknown policy {other:?} (known: none, raid1:2, raid1:3, raid5:2+1, raid5:3+1, raid5:4+1, raid6:4+2)"
            )),
        }
    }
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Policy::None => write!(f, "none"),
            Policy::Raid1 { copies } => write!(f, "raid1:{copies}"),
            Policy::Raid5 { data } => write!(f, "raid5:{data}+1"),
            Policy::Raid6 { data } => write!(f, "raid6:{data}+2"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentRecord {
    pub id: u64,
    pub host: HostId,
    /// The disk's index on its host.
    pub disk: u32,
}

/// A component's state as its owner last recorded it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ComponentState {
    Active,
    /// Unavailable since `since_ms`; holds every write up to `stale`.
    Absent {
        stale: u64,
        since_ms: u64,
    },
    /// Being brought from `stale` to `target`.
    Resyncing {
        stale: u64,
        target: u64,
    },
}

impl ComponentState {
    pub fn name(&self) -> &'static str {
        match self {
            ComponentState::Active => "active",
            ComponentState::Absent { .. } => "absent",
            ComponentState::Resyncing { .. } => "resyncing",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectRecord {
    pub id: ObjectId,
    pub name: String,
    pub policy: Policy,
    pub size_bytes: u64,
    pub components: Vec<ComponentRecord>,
    /// The host all I/O goes through.
    pub owner: HostId,
    /// Bumped by every owner that opens the object; components refuse an
    /// owner with an older one (fencing).
    pub owner_epoch: u64,
    /// One per component, as the owner last recorded them.
    pub states: Vec<ComponentState>,
    pub created_ms: u64,
    /// Encrypted at rest with this key (the owner seals every block
    /// before it reaches a component); none: stored as written.
    #[serde(default)]
    pub key: Option<ObjectKey>,
}

/// An object's key for encryption at rest: XTS-AES-256's two AES-256 keys
/// (see the objects crate's `crypt`). Its `Debug` shows nothing of it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectKey(pub [[u8; 32]; 2]);

impl ObjectKey {
    /// A new key from the operating system's random source, its two
    /// halves distinct.
    pub fn random() -> ObjectKey {
        use rand::RngCore;
        loop {
            let mut key = ObjectKey([[0; 32]; 2]);
            rand::rngs::OsRng.fill_bytes(&mut key.0[0]);
            rand::rngs::OsRng.fill_bytes(&mut key.0[1]);
            if key.0[0] != key.0[1] {
                return key;
            }
        }
    }

    /// The 64 bytes: the data key, then the tweak key.
    pub fn bytes(&self) -> [u8; 64] {
        let mut bytes = [0u8; 64];
        bytes[..32].copy_from_slice(&self.0[0]);
        bytes[32..].copy_from_slice(&self.0[1]);
        bytes
    }
}

impl std::fmt::Debug for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ObjectKey(..)")
    }
}

impl ObjectRecord {
    /// `unavailable` (fewer components active than I/O needs: one copy,
    /// or an erasure-coded object's data chunks), `degraded` (some
    /// absent), `resyncing` or `healthy`.
    pub fn health(&self) -> &'static str {
        let needed = self.policy.erasure().map_or(1, |(data, _)| data);
        let active = self.states.iter().filter(|state| **state == ComponentState::Active).count();
        if active < needed {
            "unavailable"
        } else if self.states.iter().any(|state| matches!(state, ComponentState::Absent { .. })) {
            "degraded"
        } else if self.states.iter().any(|state| matches!(state, ComponentState::Resyncing { .. })) {
            "resyncing"
        } else {
            "healthy"
        }
    }
}

/// A volume (a LUN's storage): `size_bytes` over objects of `object_size`
/// bytes each, object `i` holding bytes `[i * object_size, (i + 1) *
/// object_size)`. Growing appends objects.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub id: u64,
    pub name: String,
    pub size_bytes: u64,
    pub object_size: u64,
    pub policy: Policy,
    /// Object names, in LBA order.
    pub objects: Vec<String>,
    pub created_ms: u64,
    /// Its objects are encrypted at rest, each with its own key: a
    /// SANITIZE CRYPTO ERASE replaces the keys.
    #[serde(default)]
    pub encrypted: bool,
}

/// CHAP secrets of a target (see the iSCSI crate).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChapRecord {
    pub user: String,
    pub secret: String,
    #[serde(default)]
    pub mutual_user: Option<String>,
    #[serde(default)]
    pub mutual_secret: Option<String>,
}

/// An iSCSI target: its name (IQN), its LUNs (number, volume name), who may
/// log in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetRecord {
    pub name: String,
    pub luns: Vec<(u64, String)>,
    #[serde(default)]
    pub chap: Option<ChapRecord>,
    /// Initiator names allowed; empty allows all.
    #[serde(default)]
    pub initiators: Vec<String>,
    pub created_ms: u64,
    /// The host logins through the discovery VIP are sent to (balanced
    /// by the target hosts; every target host serves I/O for it).
    #[serde(default)]
    pub owner: Option<HostId>,
    /// Bumped on every change of owner.
    #[serde(default)]
    pub owner_epoch: u64,
    /// The site the target is affine to: owned only by that site's hosts
    /// while one of them is up.
    #[serde(default)]
    pub site: Option<String>,
}

/// The cluster's discovery VIP (one per cluster). The host that owns it
/// binds `address` and answers discovery there; every change of owner
/// bumps `epoch` and is made by compare-and-set, so two hosts never both
/// believe the catalog gave them the VIP.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipRecord {
    /// `ip:port` initiators discover targets at.
    pub address: String,
    pub owner: Option<HostId>,
    pub epoch: u64,
    /// When the current owner took it (milliseconds since the epoch).
    pub since_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(policy: Policy, states: Vec<ComponentState>) -> ObjectRecord {
        ObjectRecord {
            id: 1,
            name: "object".into(),
            policy,
            size_bytes: 1 << 20,
            components: Vec::new(),
            owner: 1,
            owner_epoch: 1,
            states,
            created_ms: 0,
            key: None,
        }
    }

    #[test]
    fn an_object_with_fewer_components_active_than_io_needs_is_unavailable() {
        let absent = ComponentState::Absent { stale: 5, since_ms: 0 };
        let resyncing = ComponentState::Resyncing { stale: 5, target: 9 };
        let active = ComponentState::Active;
        let raid5 = Policy::Raid5 { data: 2 };
        let raid1 = Policy::Raid1 { copies: 2 };
        let cases = [
            (raid5, vec![active.clone(), active.clone(), active.clone()], "healthy"),
            (raid5, vec![active.clone(), active.clone(), resyncing.clone()], "resyncing"),
            (raid5, vec![active.clone(), active.clone(), absent.clone()], "degraded"),
            // Two data chunks are needed to read a row.
            (raid5, vec![active.clone(), absent.clone(), absent.clone()], "unavailable"),
            (raid5, vec![active.clone(), resyncing.clone(), absent.clone()], "unavailable"),
            (raid1, vec![active.clone(), absent.clone()], "degraded"),
            (raid1, vec![absent.clone(), resyncing.clone()], "unavailable"),
        ];
        for (policy, states, health) in cases {
            assert_eq!(object(policy, states.clone()).health(), health, "{policy:?} {states:?}");
        }
    }
}
