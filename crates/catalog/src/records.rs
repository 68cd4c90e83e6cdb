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
