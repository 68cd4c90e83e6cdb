//! `hierarchy`: the aggregation service hierarchy (the seed's mechanism).
//!
//! Every registered host is a **leaf**; some hosts also take a **branch**
//! role (a branch aggregates up to `fanout` leaves of one site); one host
//! takes the **root** role. Heartbeats flow up the tree: a leaf reports to
//! its branch, a branch reports one summary to the root, so failure
//! detection costs one message per host per period. The [`Manager`] (on the
//! management node, the shared log's leader) places hosts in the tree and
//! mutates it when hosts join, fail or come back; each host runs an
//! [`Agent`] that heartbeats, watches its children with suspicion (silence,
//! then probes, then failure) and forwards failures up.
//!
//! Both are sans-IO state machines: events and the time in, actions out. The
//! node does the I/O (catalog writes, wire messages); the `sim` crate drives
//! thousands of them under seeded loss and stalls.
//!
//! **Invariant** (checked by [`Tree::check`]): exactly one root; every host in
//! the tree but the root has exactly one parent; a branch's children share
//! its site; no host appears twice.
//!
//! **Boundary:** no I/O, no clock of its own, no dependency on other crates of
//! Tessera.

mod agent;
mod manager;
mod tree;

pub use agent::{Agent, AgentConfig, Input, Message, Output};
pub use manager::{HostInfo, Manager, ManagerConfig};
pub use tree::{Role, Tree};

/// A host's id, as in the catalog.
pub type HostId = u64;

/// Milliseconds on whatever clock the caller uses (monotonic).
pub type Millis = u64;
