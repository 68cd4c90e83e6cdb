//! iSCSI PDUs (RFC 7143 §11): a 48-byte basic header segment (BHS), then
//! additional header segments (AHS, `TotalAHSLength` 4-byte words), an
//! optional CRC32C header digest, the data segment padded to a multiple of
//! 4 bytes, and an optional CRC32C data digest over data and padding.
//!
//! A digest is the CRC32C of the bytes it covers, sent least significant
//! byte first (RFC 7143 §13.1's example: 32 zero bytes digest to
//! `aa 36 91 8a`).

use bytes::{BufMut, Bytes, BytesMut};

pub const BHS_LEN: usize = 48;
const DIGEST_LEN: usize = 4;

/// What a PDU is, from byte 0 of its header (without the immediate bit).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Opcode {
    NopOut,
    ScsiCommand,
    TaskManagementRequest,
    LoginRequest,
    TextRequest,
    DataOut,
    LogoutRequest,
    Snack,
    NopIn,
    ScsiResponse,
    TaskManagementResponse,
    LoginResponse,
    TextResponse,
    DataIn,
    LogoutResponse,
    ReadyToTransfer,
    AsyncMessage,
    Reject,
}

impl Opcode {
    pub fn from_byte(byte: u8) -> Option<Opcode> {
        Some(match byte & 0x3f {
            0x00 => Opcode::NopOut,
            0x01 => Opcode::ScsiCommand,
            0x02 => Opcode::TaskManagementRequest,
            0x03 => Opcode::LoginRequest,
            0x04 => Opcode::TextRequest,
            0x05 => Opcode::DataOut,
            0x06 => Opcode::LogoutRequest,
            0x10 => Opcode::Snack,
            0x20 => Opcode::NopIn,
            0x21 => Opcode::ScsiResponse,
            0x22 => Opcode::TaskManagementResponse,
            0x23 => Opcode::LoginResponse,
            0x24 => Opcode::TextResponse,
            0x25 => Opcode::DataIn,
            0x26 => Opcode::LogoutResponse,
            0x31 => Opcode::ReadyToTransfer,
            0x32 => Opcode::AsyncMessage,
            0x3f => Opcode::Reject,
            _ => return None,
        })
    }

    pub fn byte(self) -> u8 {
        match self {
            Opcode::NopOut => 0x00,
            Opcode::ScsiCommand => 0x01,
            Opcode::TaskManagementRequest => 0x02,
            Opcode::LoginRequest => 0x03,
            Opcode::TextRequest => 0x04,
            Opcode::DataOut => 0x05,
            Opcode::LogoutRequest => 0x06,
            Opcode::Snack => 0x10,
            Opcode::NopIn => 0x20,
            Opcode::ScsiResponse => 0x21,
            Opcode::TaskManagementResponse => 0x22,
            Opcode::LoginResponse => 0x23,
            Opcode::TextResponse => 0x24,
            Opcode::DataIn => 0x25,
            Opcode::LogoutResponse => 0x26,
            Opcode::ReadyToTransfer => 0x31,
            Opcode::AsyncMessage => 0x32,
            Opcode::Reject => 0x3f,
        }
    }

    /// Whether an initiator sends it (a target receives only these).
    pub fn from_initiator(self) -> bool {
        self.byte() < 0x20
    }
}

/// The digests a connection negotiated (HeaderDigest, DataDigest).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Digests {
    pub header: bool,
    pub data: bool,
}

/// Why bytes are not a PDU. The connection answers each as RFC 7143 says:
/// see [`PduError::reject_reason`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PduError {
    #[error("header digest mismatch: computed {computed:#010x}, received {received:#010x}")]
    HeaderDigest { computed: u32, received: u32 },
    /// `used`: the bytes the PDU took (the stream goes on after them).
    #[error("data digest mismatch: computed {computed:#010x}, received {received:#010x}")]
    DataDigest { computed: u32, received: u32, used: usize },
    #[error("data segment of {length} bytes exceeds the {limit} this side accepts")]
    DataTooLong { length: usize, limit: usize },
}

/// Reject reasons (RFC 7143 §11.17.1).
pub mod reject {
    pub const DATA_DIGEST_ERROR: u8 = 0x02;
    pub const PROTOCOL_ERROR: u8 = 0x04;
    pub const COMMAND_NOT_SUPPORTED: u8 = 0x05;
    pub const INVALID_PDU_FIELD: u8 = 0x09;
}

impl PduError {
    /// The Reject reason to answer with, or `None` when the connection
    /// must be dropped instead: after a header digest error or an
    /// oversized data segment the stream cannot be trusted to find the next
    /// PDU boundary (error recovery level 0).
    pub fn reject_reason(&self) -> Option<u8> {
        match self {
            PduError::DataDigest { .. } => Some(reject::DATA_DIGEST_ERROR),
            PduError::HeaderDigest { .. } | PduError::DataTooLong { .. } => None,
        }
    }
}

/// One PDU: its header, additional header segments and data segment
/// (without padding or digests).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pdu {
    pub bhs: [u8; BHS_LEN],
    pub ahs: Bytes,
    pub data: Bytes,
}

fn padded(length: usize) -> usize {
    length.div_ceil(4) * 4
}

/// CRC32C as an iSCSI digest field holds it.
pub fn digest(parts: &[&[u8]]) -> u32 {
    parts.iter().fold(0, |crc, part| crc32c::crc32c_append(crc, part))
}

impl Pdu {
    /// A PDU of `opcode` with every other header field zero.
    pub fn new(opcode: Opcode) -> Pdu {
        let mut bhs = [0u8; BHS_LEN];
        bhs[0] = opcode.byte();
        Pdu { bhs, ahs: Bytes::new(), data: Bytes::new() }
    }

    /// The opcode byte's opcode, if it is one RFC 7143 defines.
    pub fn opcode(&self) -> Option<Opcode> {
        Opcode::from_byte(self.bhs[0])
    }

    pub fn opcode_byte(&self) -> u8 {
        self.bhs[0] & 0x3f
    }

    /// The I bit: an immediate command (not subject to CmdSN ordering).
    pub fn immediate(&self) -> bool {
        self.bhs[0] & 0x40 != 0
    }

    pub fn set_immediate(&mut self, immediate: bool) {
        self.bhs[0] = (self.bhs[0] & !0x40) | if immediate { 0x40 } else { 0 };
    }

    /// The F bit: the final PDU of a sequence.
    pub fn final_bit(&self) -> bool {
        self.bhs[1] & 0x80 != 0
    }

    /// Byte 1's opcode-specific flags (the F bit included).
    pub fn flags(&self) -> u8 {
        self.bhs[1]
    }

    pub fn set_flags(&mut self, flags: u8) {
        self.bhs[1] = flags;
    }

    pub fn u32_at(&self, offset: usize) -> u32 {
        u32::from_be_bytes(self.bhs[offset..offset + 4].try_into().expect("4 bytes"))
    }

    pub fn set_u32_at(&mut self, offset: usize, value: u32) {
        self.bhs[offset..offset + 4].copy_from_slice(&value.to_be_bytes());
    }

    pub fn u64_at(&self, offset: usize) -> u64 {
        u64::from_be_bytes(self.bhs[offset..offset + 8].try_into().expect("8 bytes"))
    }

    pub fn set_u64_at(&mut self, offset: usize, value: u64) {
        self.bhs[offset..offset + 8].copy_from_slice(&value.to_be_bytes());
    }

    /// Bytes 8-15: the LUN, or opcode-specific.
    pub fn lun(&self) -> u64 {
        self.u64_at(8)
    }

    pub fn initiator_task_tag(&self) -> u32 {
        self.u32_at(16)
    }

    pub fn set_initiator_task_tag(&mut self, tag: u32) {
        self.set_u32_at(16, tag);
    }

    /// Requests: CmdSN (bytes 24-27). Responses: StatSN.
    pub fn cmd_sn(&self) -> u32 {
        self.u32_at(24)
    }

    /// Requests: ExpStatSN (bytes 28-31). Responses: ExpCmdSN.
    pub fn exp_stat_sn(&self) -> u32 {
        self.u32_at(28)
    }

    /// Sets a response's StatSN, ExpCmdSN and MaxCmdSN (bytes 24-35).
    pub fn set_sequence(&mut self, stat_sn: u32, exp_cmd_sn: u32, max_cmd_sn: u32) {
        self.set_u32_at(24, stat_sn);
        self.set_u32_at(28, exp_cmd_sn);
        self.set_u32_at(32, max_cmd_sn);
    }

    /// Decodes the PDU at the start of `bytes`: `Ok(None)` while more bytes
    /// are needed, else the PDU and how many bytes it took. A data segment
    /// longer than `max_data` is refused before any of it is awaited.
    pub fn decode(bytes: &[u8], digests: Digests, max_data: usize) -> Result<Option<(Pdu, usize)>, PduError> {
        let Some(frame) = Frame::find(bytes, digests, max_data)? else { return Ok(None) };
        let pdu = Pdu {
            bhs: bytes[..BHS_LEN].try_into().expect("48 bytes"),
            ahs: Bytes::copy_from_slice(&bytes[BHS_LEN..frame.header_len]),
            data: Bytes::copy_from_slice(&bytes[frame.header_end..frame.header_end + frame.data_len]),
        };
        Ok(Some((pdu, frame.total)))
    }

    /// Like [`Pdu::decode`], taking the PDU's bytes off the front of `buffer`
    /// without copying its data segment. After a data digest error the PDU's
    /// bytes are taken off too, so the stream can go on.
    pub fn take(buffer: &mut BytesMut, digests: Digests, max_data: usize) -> Result<Option<Pdu>, PduError> {
        let frame = match Frame::find(buffer, digests, max_data) {
            Ok(Some(frame)) => frame,
            Ok(None) => return Ok(None),
            Err(error @ PduError::DataDigest { used, .. }) => {
                let _ = buffer.split_to(used);
                return Err(error);
            }
            Err(error) => return Err(error),
        };
        let bytes = buffer.split_to(frame.total).freeze();
        Ok(Some(Pdu {
            bhs: bytes[..BHS_LEN].try_into().expect("48 bytes"),
            ahs: bytes.slice(BHS_LEN..frame.header_len),
            data: bytes.slice(frame.header_end..frame.header_end + frame.data_len),
        }))
    }

    /// Appends the PDU's wire form: lengths set from `ahs` and `data`,
    /// padding and the digests `digests` asks for.
    pub fn encode(&self, digests: Digests, out: &mut BytesMut) {
        assert!(self.ahs.len().is_multiple_of(4) && self.ahs.len() <= 255 * 4, "AHS must be whole words, at most 255");
        assert!(self.data.len() < 1 << 24, "a data segment length has 24 bits");
        let mut bhs = self.bhs;
        bhs[4] = (self.ahs.len() / 4) as u8;
        bhs[5..8].copy_from_slice(&(self.data.len() as u32).to_be_bytes()[1..]);
        out.reserve(BHS_LEN + self.ahs.len() + padded(self.data.len()) + 2 * DIGEST_LEN);
        out.put_slice(&bhs);
        out.put_slice(&self.ahs);
        if digests.header {
            out.put_u32_le(digest(&[&bhs, &self.ahs]));
        }
        if !self.data.is_empty() {
            let padding = [0u8; 3];
            let padding = &padding[..padded(self.data.len()) - self.data.len()];
            out.put_slice(&self.data);
            out.put_slice(padding);
            if digests.data {
                out.put_u32_le(digest(&[&self.data, padding]));
            }
        }
    }
}

/// Where a PDU's parts lie in the bytes that carry it.
struct Frame {
    header_len: usize,
    header_end: usize,
    data_len: usize,
    total: usize,
}

impl Frame {
    fn find(bytes: &[u8], digests: Digests, max_data: usize) -> Result<Option<Frame>, PduError> {
        let Some(bhs) = bytes.get(..BHS_LEN) else { return Ok(None) };
        let ahs_len = bhs[4] as usize * 4;
        let data_len = u32::from_be_bytes([0, bhs[5], bhs[6], bhs[7]]) as usize;
        if data_len > max_data {
            return Err(PduError::DataTooLong { length: data_len, limit: max_data });
        }
        let header_len = BHS_LEN + ahs_len;
        let header_end = header_len + if digests.header { DIGEST_LEN } else { 0 };
        let Some(header) = bytes.get(..header_end) else { return Ok(None) };
        if digests.header {
            let computed = digest(&[&header[..header_len]]);
            let received = u32::from_le_bytes(header[header_len..].try_into().expect("4 bytes"));
            if computed != received {
                return Err(PduError::HeaderDigest { computed, received });
            }
        }
        let data_end = header_end + padded(data_len);
        let total = data_end + if digests.data && data_len > 0 { DIGEST_LEN } else { 0 };
        let Some(all) = bytes.get(..total) else { return Ok(None) };
        if digests.data && data_len > 0 {
            let computed = digest(&[&all[header_end..data_end]]);
            let received = u32::from_le_bytes(all[data_end..].try_into().expect("4 bytes"));
            if computed != received {
                return Err(PduError::DataDigest { computed, received, used: total });
            }
        }
        Ok(Some(Frame { header_len, header_end, data_len, total }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_digest_is_rfc_7143s_crc32c_sent_least_significant_byte_first() {
        // RFC 7143 §13.1 (Appendix B.4 of RFC 3720): 32 bytes of zeros.
        assert_eq!(digest(&[&[0u8; 32]]).to_le_bytes(), [0xaa, 0x36, 0x91, 0x8a]);
        // 32 bytes of 0xff.
        assert_eq!(digest(&[&[0xffu8; 32]]).to_le_bytes(), [0x43, 0xab, 0xa8, 0x62]);
    }

    #[test]
    fn a_pdu_round_trips_with_padding_and_digests() {
        let mut pdu = Pdu::new(Opcode::TextRequest);
        pdu.set_flags(0x80);
        pdu.set_initiator_task_tag(0x1234_5678);
        pdu.set_u32_at(24, 7);
        pdu.data = Bytes::from_static(b"SendTargets=All\0x");
        for digests in [Digests::default(), Digests { header: true, data: true }] {
            let mut wire = BytesMut::new();
            pdu.encode(digests, &mut wire);
            let extra = if digests.header { 8 } else { 0 };
            assert_eq!(wire.len(), 48 + 20 + extra, "17 bytes of data pad to 20");
            assert_eq!(&wire[5..8], &[0, 0, 17]);
            for cut in 0..wire.len() {
                assert_eq!(Pdu::decode(&wire[..cut], digests, 8192), Ok(None), "{cut} bytes are not enough");
            }
            let mut decoded = pdu.clone();
            decoded.bhs[5..8].copy_from_slice(&[0, 0, 17]);
            assert_eq!(Pdu::decode(&wire, digests, 8192), Ok(Some((decoded, wire.len()))));
        }
    }

    #[test]
    fn a_flipped_bit_fails_its_digest_and_an_oversized_segment_is_refused_early() {
        let mut pdu = Pdu::new(Opcode::ScsiCommand);
        pdu.data = Bytes::from(vec![5u8; 512]);
        let digests = Digests { header: true, data: true };
        let mut wire = BytesMut::new();
        pdu.encode(digests, &mut wire);
        let mut header = wire.clone();
        header[20] ^= 1;
        assert!(matches!(Pdu::decode(&header, digests, 8192), Err(PduError::HeaderDigest { .. })));
        let mut data = wire.clone();
        data[48 + 4 + 100] ^= 0x10;
        let error = Pdu::decode(&data, digests, 8192).unwrap_err();
        assert_eq!(error.reject_reason(), Some(reject::DATA_DIGEST_ERROR));
        // Only the header has arrived: the length alone refuses it.
        assert_eq!(Pdu::decode(&wire[..48], digests, 256), Err(PduError::DataTooLong { length: 512, limit: 256 }));
    }

    #[test]
    fn every_opcode_maps_back_to_its_byte() {
        for byte in 0..=0x3f {
            if let Some(opcode) = Opcode::from_byte(byte) {
                assert_eq!(opcode.byte(), byte);
                assert_eq!(opcode.from_initiator(), byte < 0x20);
            }
        }
    }
}
