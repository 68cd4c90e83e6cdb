//! `sharedlog`: Tessera's replicated shared log.
pub mod store;
pub mod types;
