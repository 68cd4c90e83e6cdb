//! The iSCSI target (RFC 7143) and the SCSI command set it serves.
//!
//! - [`pdu`]: the wire unit: basic header segment, additional header
//!   segments, data segment, CRC32C digests; decoding never trusts a length
//!   it has not bounded.
//! - [`text`]: the `key=value` lists carried by Login and Text PDUs.

pub mod pdu;
pub mod text;
