//! `sharedlog`: Tessera's replicated shared log.
pub mod client;
pub mod machine;
pub mod network;
pub mod objects;
pub mod protocol;
pub mod queue;
pub mod raft;
pub mod raftlog;
pub mod server;
pub mod smr;
pub mod store;
pub mod types;
