//! `sharedlog`: Tessera's replicated shared log.
pub mod client;
pub mod machine;
pub mod network;
pub mod protocol;
pub mod raft;
pub mod raftlog;
pub mod server;
pub mod store;
pub mod types;
