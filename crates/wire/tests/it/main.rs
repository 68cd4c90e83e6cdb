//! Integration tests for `wire`: real TCP servers on loopback and the
//! simulated network.

mod sim;
mod tcp;
