//! `objects`: distributed objects over the components in `blockstore`.
//!
//! Built so far: [`component`], a host's component service over its disks
//! (epoch-fenced requests over `wire`) and the client owners use; [`owner`],
//! the sans-IO owner of one object (LSNs, fan-out,
//! acknowledgement when every active component has a write, degraded mode,
//! tracking bitmaps for absent components seeded with the writes they may
//! have missed, the choice of resync source); [`ec`], the erasure-coded
//! layout (stripes, chunks, rotating parity) and its Reed-Solomon code;
//! [`object`], the owner at run time with the block client API; [`threads`],
//! the owner and component threads.
//! The plan: `docs/design/objects.md`.
//!
//! **Boundary:** the owner decides; it does no I/O (contract 6).

pub mod block_cache;
pub mod component;
pub mod crypt;
pub mod ec;
mod lease;
pub mod object;
pub mod owner;
pub mod pace;
pub mod threads;
