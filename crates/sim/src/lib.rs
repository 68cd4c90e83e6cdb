//! `sim`: deterministic simulation of Tessera with seeded faults.
//!
//! A scenario runs real Tessera components (openraft, the Raft log, the entry
//! store, the log client) on `fsio::SimFs` disks and a `wire::sim::SimNetwork`,
//! all on one current-thread tokio runtime with paused time. Raft's election
//! randomness, the network's faults, the nemesis and the clients all draw
//! from the seed, so the same seed gives the same run: a failure replays with
//! `TESSERA_SIM_SEED=<seed> cargo test -p sim`.
//!
//! **Boundary:** drives the crates' public APIs; holds checkers, not mechanisms.

pub mod checker;
pub mod hierarchy;
pub mod log;
pub mod objects;
pub mod placement;
