//! SCSI status codes and sense data (SPC-4 §4.5).

/// SCSI status bytes (SAM-5).
pub mod status {
    pub const GOOD: u8 = 0x00;
    pub const CHECK_CONDITION: u8 = 0x02;
    pub const CONDITION_MET: u8 = 0x04;
    pub const BUSY: u8 = 0x08;
    pub const RESERVATION_CONFLICT: u8 = 0x18;
    pub const TASK_SET_FULL: u8 = 0x28;
}

/// Sense keys.
pub mod key {
    pub const NO_SENSE: u8 = 0x0;
    pub const NOT_READY: u8 = 0x2;
    pub const MEDIUM_ERROR: u8 = 0x3;
    pub const HARDWARE_ERROR: u8 = 0x4;
    pub const ILLEGAL_REQUEST: u8 = 0x5;
    pub const UNIT_ATTENTION: u8 = 0x6;
    pub const DATA_PROTECT: u8 = 0x7;
    pub const COPY_ABORTED: u8 = 0xa;
    pub const ABORTED_COMMAND: u8 = 0xb;
    pub const MISCOMPARE: u8 = 0xe;
}

/// One error a command ends with: key, additional sense code and qualifier,
/// and where in the CDB or parameter list the fault is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
    /// The INFORMATION field (e.g. the offset of the first miscompared byte).
    pub information: Option<u64>,
    /// Sense-key specific field pointer: (in the CDB?, byte, bit).
    pub field: Option<(bool, u16, Option<u8>)>,
    /// Sense-key specific progress indication: done, in 65536ths.
    pub progress: Option<u16>,
    /// The storage may serve the same command in a moment
    /// ([`crate::scsi::IoError::Later`]): a unit made with a hold tries it
    /// again (see `LogicalUnit::with_io_hold`). Not part of the sense data.
    pub later: bool,
}

impl Sense {
    pub const fn new(key: u8, asc: u8, ascq: u8) -> Sense {
        Sense { key, asc, ascq, information: None, field: None, progress: None, later: false }
    }

    pub fn invalid_opcode() -> Sense {
        Sense::new(key::ILLEGAL_REQUEST, 0x20, 0x00).at_cdb(0, Some(7))
    }

    /// INVALID FIELD IN CDB, pointing at `byte` (and `bit`).
    pub fn invalid_cdb(byte: u16, bit: Option<u8>) -> Sense {
        Sense::new(key::ILLEGAL_REQUEST, 0x24, 0x00).at_cdb(byte, bit)
    }

    /// INVALID FIELD IN PARAMETER LIST, pointing at `byte`.
    pub fn invalid_parameter(byte: u16) -> Sense {
        let mut sense = Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x00);
        sense.field = Some((false, byte, None));
        sense
    }

    pub fn parameter_list_length() -> Sense {
        Sense::new(key::ILLEGAL_REQUEST, 0x1a, 0x00)
    }

    pub fn lba_out_of_range() -> Sense {
        Sense::new(key::ILLEGAL_REQUEST, 0x21, 0x00)
    }

    pub fn lun_not_supported() -> Sense {
        Sense::new(key::ILLEGAL_REQUEST, 0x25, 0x00)
    }

    pub fn saving_not_supported() -> Sense {
        Sense::new(key::ILLEGAL_REQUEST, 0x39, 0x00)
    }

    pub fn miscompare(offset: u64) -> Sense {
        Sense { information: Some(offset), ..Sense::new(key::MISCOMPARE, 0x1d, 0x00) }
    }

    pub fn read_error() -> Sense {
        Sense::new(key::MEDIUM_ERROR, 0x11, 0x00)
    }

    pub fn write_error() -> Sense {
        Sense::new(key::MEDIUM_ERROR, 0x0c, 0x00)
    }

    /// SPACE ALLOCATION FAILED WRITE PROTECT (SBC-3, thin provisioning:
    /// the storage behind a thinly provisioned unit ran out of room).
    pub fn space_allocation_failed() -> Sense {
        Sense::new(key::DATA_PROTECT, 0x27, 0x07)
    }

    /// LOGICAL UNIT NOT ACCESSIBLE, ASYMMETRIC ACCESS STATE TRANSITION: the
    /// initiator retries (the storage behind the unit is moving or healing).
    pub fn in_transition() -> Sense {
        Sense::new(key::NOT_READY, 0x04, 0x0a)
    }

    /// LOGICAL UNIT NOT READY, SANITIZE IN PROGRESS, with how far it is.
    pub fn sanitizing(progress: u16) -> Sense {
        Sense { progress: Some(progress), ..Sense::new(key::NOT_READY, 0x04, 0x1b) }
    }

    /// SANITIZE COMMAND FAILED: the unit stays in the sanitize failure
    /// mode until a sanitize succeeds or EXIT FAILURE MODE.
    pub fn sanitize_failed() -> Sense {
        Sense::new(key::MEDIUM_ERROR, 0x31, 0x03)
    }

    fn at_cdb(mut self, byte: u16, bit: Option<u8>) -> Sense {
        self.field = Some((true, byte, bit));
        self
    }

    /// Fixed-format sense data (response code 70h), 18 bytes.
    pub fn fixed(&self) -> Vec<u8> {
        let mut out = vec![0u8; 18];
        out[0] = 0x70;
        out[2] = self.key;
        if let Some(information) = self.information {
            out[0] |= 0x80;
            out[3..7].copy_from_slice(&(information as u32).to_be_bytes());
        }
        out[7] = 10;
        out[12] = self.asc;
        out[13] = self.ascq;
        if let Some((cdb, byte, bit)) = self.field {
            out[15] = 0x80 | if cdb { 0x40 } else { 0 } | bit.map(|bit| 0x08 | (bit & 7)).unwrap_or(0);
            out[16..18].copy_from_slice(&byte.to_be_bytes());
        } else if let Some(progress) = self.progress {
            out[15] = 0x80;
            out[16..18].copy_from_slice(&progress.to_be_bytes());
        }
        out
    }

    /// Descriptor-format sense data (response code 72h).
    pub fn descriptor(&self) -> Vec<u8> {
        let mut out = vec![0x72, self.key, self.asc, self.ascq, 0, 0, 0, 0];
        if let Some(information) = self.information {
            out.extend_from_slice(&[0x00, 0x0a, 0x80, 0]);
            out.extend_from_slice(&information.to_be_bytes());
        }
        if let Some((cdb, byte, bit)) = self.field {
            out.extend_from_slice(&[0x02, 0x06, 0, 0]);
            out.push(0x80 | if cdb { 0x40 } else { 0 } | bit.map(|bit| 0x08 | (bit & 7)).unwrap_or(0));
            out.extend_from_slice(&byte.to_be_bytes());
            out.push(0);
        } else if let Some(progress) = self.progress {
            out.extend_from_slice(&[0x02, 0x06, 0, 0, 0x80]);
            out.extend_from_slice(&progress.to_be_bytes());
            out.push(0);
        }
        out[7] = (out.len() - 8) as u8;
        out
    }
}
