//! The frame: a fixed 32-byte header followed by a payload.
//!
//! Byte layout (all integers little-endian), see `docs/format/wire.md`:
//!
//! | offset | size | field                                         |
//! |--------|------|-----------------------------------------------|
//! | 0      | 4    | magic `b"TSRW"`                               |
//! | 4      | 1    | version (currently 1)                         |
//! | 5      | 1    | kind: 1 request, 2 response, 3 error          |
//! | 6      | 2    | flags (must be zero in version 1)             |
//! | 8      | 4    | method                                        |
//! | 12     | 4    | payload length in bytes                       |
//! | 16     | 8    | correlation id                                |
//! | 24     | 4    | CRC32C of the payload                         |
//! | 28     | 4    | CRC32C of header bytes 0..28                  |
//!
//! The header checksum is checked before anything else in the header is
//! trusted, so a corrupted length can never make a reader wait for, or
//! allocate, a bogus payload.

use bytes::{Buf, BufMut, Bytes, BytesMut};

pub const MAGIC: [u8; 4] = *b"TSRW";
pub const VERSION: u8 = 1;
pub const HEADER_SIZE: usize = 32;
/// The largest payload any peer may send. Snapshots and large reads are
/// chunked below this. Why 16 MiB: it bounds per-connection memory while
/// leaving room for 4 MiB snapshot chunks and batched appends.
pub const PAYLOAD_SIZE_MAX: usize = 16 * 1024 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Request = 1,
    Response = 2,
    Error = 3,
}

impl Kind {
    fn from_u8(value: u8) -> Option<Kind> {
        match value {
            1 => Some(Kind::Request),
            2 => Some(Kind::Response),
            3 => Some(Kind::Error),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub method: u32,
    pub correlation: u64,
    pub payload: Bytes,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("bad magic {0:02x?}: not a Tessera wire peer")]
    BadMagic([u8; 4]),
    #[error("header checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    HeaderChecksum { stored: u32, computed: u32 },
    #[error("unsupported wire version {0} (this node speaks {VERSION})")]
    UnsupportedVersion(u8),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("reserved flags {0:#06x} set")]
    ReservedFlags(u16),
    #[error("payload of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("payload checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    PayloadChecksum { stored: u32, computed: u32 },
    #[error("connection closed in the middle of a frame ({buffered} bytes buffered)")]
    Truncated { buffered: usize },
}

impl Frame {
    pub fn encoded_len(&self) -> usize {
        HEADER_SIZE + self.payload.len()
    }

    /// Appends the encoded frame to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        assert!(self.payload.len() <= PAYLOAD_SIZE_MAX, "caller must chunk payloads above PAYLOAD_SIZE_MAX");
        out.reserve(self.encoded_len());
        let start = out.len();
        out.put_slice(&MAGIC);
        out.put_u8(VERSION);
        out.put_u8(self.kind as u8);
        out.put_u16_le(0);
        out.put_u32_le(self.method);
        out.put_u32_le(self.payload.len() as u32);
        out.put_u64_le(self.correlation);
        out.put_u32_le(crc32c::crc32c(&self.payload));
        let header_crc = crc32c::crc32c(&out[start..start + 28]);
        out.put_u32_le(header_crc);
        out.put_slice(&self.payload);
    }

    pub fn to_bytes(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.encoded_len());
        self.encode(&mut out);
        out.freeze()
    }
}

/// Incremental decoder. Feed it bytes as they arrive; it returns whole frames.
#[derive(Debug)]
pub struct Decoder {
    payload_size_max: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder { payload_size_max: PAYLOAD_SIZE_MAX }
    }
}

impl Decoder {
    pub fn with_limit(payload_size_max: usize) -> Decoder {
        Decoder { payload_size_max: payload_size_max.min(PAYLOAD_SIZE_MAX) }
    }

    /// Takes one frame off the front of `buf`, or returns `Ok(None)` if more
    /// bytes are needed. An error means the stream is unusable: the caller
    /// must close the connection (there is no way to resynchronise).
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if buf.len() < HEADER_SIZE {
            // Reject a wrong magic as soon as it is visible, so a peer that
            // speaks another protocol is dropped without waiting for 32 bytes.
            let visible = buf.len().min(4);
            if buf[..visible] != MAGIC[..visible] {
                let mut magic = [0u8; 4];
                magic[..visible].copy_from_slice(&buf[..visible]);
                return Err(FrameError::BadMagic(magic));
            }
            return Ok(None);
        }
        let header = &buf[..HEADER_SIZE];
        let magic: [u8; 4] = header[0..4].try_into().expect("slice of 4");
        if magic != MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        let stored_header_crc = u32::from_le_bytes(header[28..32].try_into().expect("slice of 4"));
        let computed_header_crc = crc32c::crc32c(&header[..28]);
        if stored_header_crc != computed_header_crc {
            return Err(FrameError::HeaderChecksum { stored: stored_header_crc, computed: computed_header_crc });
        }
        let version = header[4];
        if version != VERSION {
            return Err(FrameError::UnsupportedVersion(version));
        }
        let kind = Kind::from_u8(header[5]).ok_or(FrameError::UnknownKind(header[5]))?;
        let flags = u16::from_le_bytes(header[6..8].try_into().expect("slice of 2"));
        if flags != 0 {
            return Err(FrameError::ReservedFlags(flags));
        }
        let method = u32::from_le_bytes(header[8..12].try_into().expect("slice of 4"));
        let payload_len = u32::from_le_bytes(header[12..16].try_into().expect("slice of 4")) as usize;
        if payload_len > self.payload_size_max {
            return Err(FrameError::TooLarge { size: payload_len, limit: self.payload_size_max });
        }
        let correlation = u64::from_le_bytes(header[16..24].try_into().expect("slice of 8"));
        let stored_payload_crc = u32::from_le_bytes(header[24..28].try_into().expect("slice of 4"));
        if buf.len() < HEADER_SIZE + payload_len {
            buf.reserve(HEADER_SIZE + payload_len - buf.len());
            return Ok(None);
        }
        buf.advance(HEADER_SIZE);
        let payload = buf.split_to(payload_len).freeze();
        let computed_payload_crc = crc32c::crc32c(&payload);
        if computed_payload_crc != stored_payload_crc {
            return Err(FrameError::PayloadChecksum { stored: stored_payload_crc, computed: computed_payload_crc });
        }
        Ok(Some(Frame { kind, method, correlation, payload }))
    }

    /// Called at end of stream: leftover bytes mean the peer hung up mid-frame.
    pub fn finish(&self, buf: &BytesMut) -> Result<(), FrameError> {
        if buf.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Truncated { buffered: buf.len() })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(payload: &[u8]) -> Frame {
        Frame { kind: Kind::Request, method: 7, correlation: 42, payload: Bytes::copy_from_slice(payload) }
    }

    fn check_error(bytes: &[u8], expected: FrameError) {
        let mut buf = BytesMut::from(bytes);
        assert_eq!(Decoder::default().decode(&mut buf), Err(expected));
    }

    #[test]
    fn round_trip() {
        let original = frame(b"hello");
        let mut buf = BytesMut::new();
        original.encode(&mut buf);
        original.encode(&mut buf);
        let decoder = Decoder::default();
        assert_eq!(decoder.decode(&mut buf).unwrap(), Some(original.clone()));
        assert_eq!(decoder.decode(&mut buf).unwrap(), Some(original));
        assert_eq!(decoder.decode(&mut buf).unwrap(), None);
        decoder.finish(&buf).unwrap();
    }

    #[test]
    fn partial_frame_waits_then_truncation_is_reported() {
        let bytes = frame(b"0123456789").to_bytes();
        let decoder = Decoder::default();
        for cut in 0..bytes.len() {
            let mut buf = BytesMut::from(&bytes[..cut]);
            assert_eq!(decoder.decode(&mut buf).unwrap(), None, "cut at {cut}");
            if cut > 0 {
                assert_eq!(decoder.finish(&buf), Err(FrameError::Truncated { buffered: cut }));
            }
        }
    }

    #[test]
    fn garbage_is_rejected_by_magic() {
        check_error(b"GET / HTTP/1.1\r\n\r\n", FrameError::BadMagic(*b"GET "));
        check_error(b"X", FrameError::BadMagic([b'X', 0, 0, 0]));
    }

    #[test]
    fn wrong_version_is_rejected() {
        let mut bytes = BytesMut::from(&frame(b"x").to_bytes()[..]);
        bytes[4] = 9;
        let crc = crc32c::crc32c(&bytes[..28]);
        bytes[28..32].copy_from_slice(&crc.to_le_bytes());
        check_error(&bytes, FrameError::UnsupportedVersion(9));
    }

    #[test]
    fn oversize_is_rejected_before_the_payload_arrives() {
        let mut bytes = BytesMut::from(&frame(b"").to_bytes()[..]);
        let huge = (PAYLOAD_SIZE_MAX as u32) + 1;
        bytes[12..16].copy_from_slice(&huge.to_le_bytes());
        let crc = crc32c::crc32c(&bytes[..28]);
        bytes[28..32].copy_from_slice(&crc.to_le_bytes());
        check_error(&bytes, FrameError::TooLarge { size: huge as usize, limit: PAYLOAD_SIZE_MAX });
    }

    #[test]
    fn corrupted_header_and_payload_are_detected() {
        let good = frame(b"payload").to_bytes();
        let mut header_flip = BytesMut::from(&good[..]);
        header_flip[9] ^= 1;
        assert!(matches!(Decoder::default().decode(&mut header_flip), Err(FrameError::HeaderChecksum { .. })));
        let mut payload_flip = BytesMut::from(&good[..]);
        payload_flip[HEADER_SIZE + 2] ^= 0x40;
        assert!(matches!(Decoder::default().decode(&mut payload_flip), Err(FrameError::PayloadChecksum { .. })));
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut buf = BytesMut::from(&bytes[..]);
            let decoder = Decoder::with_limit(1024);
            while let Ok(Some(_)) = decoder.decode(&mut buf) {}
        }

        #[test]
        fn any_frame_round_trips(method in any::<u32>(), correlation in any::<u64>(),
                                 payload in proptest::collection::vec(any::<u8>(), 0..512)) {
            let original = Frame { kind: Kind::Response, method, correlation, payload: Bytes::from(payload) };
            let mut buf = BytesMut::new();
            original.encode(&mut buf);
            prop_assert_eq!(Decoder::default().decode(&mut buf).unwrap(), Some(original));
            prop_assert!(buf.is_empty());
        }
    }
}
