//! The iSCSI target (RFC 7143) and the SCSI command set it serves.
//!
//! - [`pdu`]: the wire unit: basic header segment, additional header
//!   segments, data segment, CRC32C digests; decoding never trusts a length
//!   it has not bounded.
//! - [`text`]: the `key=value` lists carried by Login and Text PDUs.
//! - [`login`]: security (None, CHAP) and operational negotiation.
//! - [`connection`]: the full feature phase: CmdSN window, Data-In,
//!   Data-Out and R2T, NOP, Text (SendTargets), task management, Logout,
//!   Reject.
//! - [`datamover`]: the layer between iSCSI and its transport; TCP here.
//! - [`scsi`], [`sense`], [`pr`], [`copy`], [`sanitize`]: the block device
//!   command set, sense data, reservations, EXTENDED COPY parameter lists,
//!   SANITIZE.
//! - [`target`]: targets, the registry a service serves from, the listener.
//! - [`memory`]: a block device in memory, for tests and references.
//!
//! **Boundary:** knows nothing of objects, volumes or the catalog: the node
//! gives it targets whose logical units sit on [`scsi::BlockDevice`]s.

pub mod connection;
pub mod copy;
pub mod datamover;
pub mod login;
pub mod memory;
pub mod pdu;
pub mod pr;
pub mod sanitize;
pub mod scsi;
pub mod sense;
pub mod target;
pub mod text;
