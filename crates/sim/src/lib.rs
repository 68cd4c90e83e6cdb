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

/// The runtime a scenario runs on: one thread, paused time, and (with
/// `tokio_unstable`) the scheduler's randomness from the seed.
#[cfg_attr(not(tokio_unstable), allow(unused_variables))]
pub(crate) fn runtime(seed: u64) -> tokio::runtime::Runtime {
    let mut builder = tokio::runtime::Builder::new_current_thread();
    builder.enable_time().start_paused(true);
    #[cfg(tokio_unstable)]
    builder.rng_seed(tokio::runtime::RngSeed::from_bytes(&seed.to_le_bytes()));
    builder.build().expect("building the simulation runtime")
}
