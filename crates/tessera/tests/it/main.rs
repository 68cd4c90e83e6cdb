//! Multi-process scenarios: real `tessera` node processes on loopback,
//! killed with SIGKILL and restarted. Each scenario asserts that nothing
//! acknowledged is lost.
//!
//! Scenarios take a process-wide lock so that only one cluster runs at a
//! time: the machines these run on have two cores.

mod bad_input;
mod bootstrap;
mod erasure;
mod harness;
mod hierarchy;
mod iscsi;
mod leader_kill;
mod libiscsi;
mod objects;
mod queue;
mod target_service;
mod up;
