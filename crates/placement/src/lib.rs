//! `placement`: the hierarchical scheduler (the seed's mechanism).
//!
//! A placement request (the components of an object, a target, a memory
//! allocation, a pod) enters at the root and travels down the aggregation
//! hierarchy of the `hierarchy` crate, to all children or to a random
//! subset at each level. Each host's leaf scheduler answers with the
//! buckets (its disks) that satisfy the request, scored by the free
//! resources they would have left; branch schedulers merge what they receive
//! and forward a shortlist; the root makes the final choice. A level that
//! does not answer in time is left out, so a slow subtree never blocks an
//! answer.
//!
//! Constraints: capacity, distinct hosts and distinct fault domains for the
//! buckets of one request, site affinity, excluded hosts. The root keeps a
//! ledger of what it granted; a leaf's answer says which of that root's
//! grants it had applied, and the root counts the others as used, so
//! concurrent requests do not overcommit a bucket even when an answer was
//! measured before a grant reached its leaf.
//!
//! **Invariant:** every placement returned satisfies every constraint of its
//! request ([`check`]); the property tests drive this under random host
//! arrivals, failures and returns.
//!
//! **Boundary:** sans-IO like `hierarchy`: messages and time in, messages
//! out; the node sends them over `wire`.

mod choose;
mod scheduler;

use std::collections::BTreeSet;

use hierarchy::HostId;
use serde::{Deserialize, Serialize};

pub use choose::{check, choose, shortlist};
pub use scheduler::{Output, Scheduler, SchedulerConfig, SchedulerMessage};

/// A resource bucket: one disk of one host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BucketId {
    pub host: HostId,
    pub disk: u32,
}

/// What a leaf knows of one of its buckets.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Bucket {
    pub id: BucketId,
    pub site: Option<String>,
    pub fault_domain: Option<String>,
    pub capacity_bytes: u64,
    pub free_bytes: u64,
}

/// What to place.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub id: u64,
    /// Buckets wanted (e.g. one per component of an object).
    pub count: usize,
    /// Bytes needed in each.
    pub bytes: u64,
    pub distinct_hosts: bool,
    pub distinct_fault_domains: bool,
    /// Every bucket in this site.
    pub site: Option<String>,
    pub excluded_hosts: BTreeSet<HostId>,
}

/// A bucket offered for a request, with what it would have left.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    pub bucket: BucketId,
    pub site: Option<String>,
    pub fault_domain: Option<String>,
    pub capacity_bytes: u64,
    pub free_bytes: u64,
    /// The asking root's commits the leaf had applied when it measured
    /// `free_bytes` (every sequence up to this one): the root counts its
    /// later grants on this bucket as used.
    #[serde(default)]
    pub applied: u64,
    /// The leaf's incarnation: a leaf that restarted measured its disks
    /// afresh, after every grant an earlier incarnation acknowledged.
    #[serde(default)]
    pub incarnation: u64,
}

impl Candidate {
    /// The fraction of the bucket free after placing `bytes`: higher is
    /// better (it spreads load across buckets of any size).
    pub fn score(&self, bytes: u64) -> f64 {
        if self.capacity_bytes == 0 {
            return f64::NEG_INFINITY;
        }
        (self.free_bytes.saturating_sub(bytes)) as f64 / self.capacity_bytes as f64
    }

    pub fn from_bucket(bucket: &Bucket) -> Candidate {
        Candidate {
            bucket: bucket.id,
            site: bucket.site.clone(),
            fault_domain: bucket.fault_domain.clone(),
            capacity_bytes: bucket.capacity_bytes,
            free_bytes: bucket.free_bytes,
            applied: 0,
            incarnation: 0,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PlacementError {
    /// Not enough buckets satisfy the request's constraints (among those
    /// that answered in time).
    NotEnough { wanted: usize, found: usize },
    /// This host is not the root: ask that host.
    NotRoot { root: Option<HostId> },
    /// Too many requests in flight at the root.
    Busy,
}

impl std::fmt::Display for PlacementError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PlacementError::NotEnough { wanted, found } => {
                write!(f, "only {found} of the {wanted} buckets asked for satisfy the request")
            }
            PlacementError::NotRoot { root } => write!(f, "not the root scheduler; the root is {root:?}"),
            PlacementError::Busy => write!(f, "the root scheduler has too many requests in flight"),
        }
    }
}
