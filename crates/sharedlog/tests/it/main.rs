//! Integration tests for `sharedlog`: in-process replicas over real TCP.

mod cluster;
mod gc;
mod replication;
mod smr;
