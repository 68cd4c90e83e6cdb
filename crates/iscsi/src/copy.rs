//! EXTENDED COPY (LID1) parameter lists (SPC-4 §6.4): what a copy asks
//! for, checked before anything is copied.
//!
//! The copy manager is the logical unit itself: it copies between logical
//! units it can name by their NAA designator, block device to block device
//! (segment descriptor 02h), synchronously inside the command. Results a
//! list asks to be held are kept per I_T nexus for RECEIVE COPY RESULTS.

use crate::scsi::{be16, be32, be64};
use crate::sense::{key, Sense};

/// Target descriptors one list may carry.
pub const TARGET_DESCRIPTORS_MAX: u16 = 2;
/// Segment descriptors one list may carry.
pub const SEGMENT_DESCRIPTORS_MAX: u16 = 1;
/// Bytes of target and segment descriptors one list may carry.
pub const DESCRIPTOR_LIST_MAX: u32 = 1024;
/// Bytes one segment may copy (65535 blocks of 512 bytes fit).
pub const SEGMENT_BYTES_MAX: u32 = 32 << 20;

const IDENTIFICATION_DESCRIPTOR: u8 = 0xe4;
const BLOCK_TO_BLOCK: u8 = 0x02;
const TARGET_DESCRIPTOR_LENGTH: usize = 32;
const HEADER_LENGTH: usize = 16;

/// A logical unit named by a target descriptor: its designator (type and
/// value) and the block length the list expects of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Named {
    pub designator_type: u8,
    pub designator: Vec<u8>,
    pub block_length: u32,
}

/// One block-to-block segment: `blocks` from (source, lba) to
/// (destination, lba); indices into the target descriptors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub source: usize,
    pub destination: usize,
    pub blocks: u64,
    pub source_lba: u64,
    pub destination_lba: u64,
}

/// A parsed list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyList {
    pub list_id: u8,
    /// LIST ID USAGE 00b: results are held for RECEIVE COPY RESULTS.
    pub hold: bool,
    pub targets: Vec<Named>,
    pub segments: Vec<Segment>,
}

/// COPY ABORTED: a copy target the copy manager cannot reach (a bad index,
/// a designator it does not serve, a range outside the unit).
pub fn unreachable() -> Sense {
    Sense::new(key::COPY_ABORTED, 0x0d, 0x02)
}

/// Parses a LID1 parameter list of `length` bytes (the CDB's PARAMETER
/// LIST LENGTH; `data` may carry padding beyond it). `None`: an empty list,
/// which copies nothing.
pub fn parse(data: &[u8], length: usize) -> Result<Option<CopyList>, Sense> {
    if length == 0 {
        return Ok(None);
    }
    if length < HEADER_LENGTH || data.len() < length {
        return Err(Sense::parameter_list_length());
    }
    let data = &data[..length];
    let list_id = data[0];
    let usage = (data[1] >> 3) & 0x03;
    if data[1] & 0x20 != 0 {
        // STR (sequential striped) has no meaning for block devices here.
        return Err(Sense::invalid_parameter(1));
    }
    let targets_length = usize::from(be16(&data[2..]));
    let segments_length = be32(&data[8..]) as usize;
    let inline = be32(&data[12..]) as usize;
    if inline != 0 {
        return Err(Sense::invalid_parameter(12));
    }
    // Too long a list is refused before any descriptor is counted.
    if targets_length + segments_length > DESCRIPTOR_LIST_MAX as usize {
        return Err(Sense::parameter_list_length());
    }
    if length < HEADER_LENGTH + targets_length + segments_length {
        return Err(Sense::parameter_list_length());
    }
    if !targets_length.is_multiple_of(TARGET_DESCRIPTOR_LENGTH) {
        return Err(Sense::parameter_list_length());
    }
    if targets_length / TARGET_DESCRIPTOR_LENGTH > usize::from(TARGET_DESCRIPTORS_MAX) {
        return Err(Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x06));
    }
    let mut targets = Vec::new();
    for (index, descriptor) in
        data[HEADER_LENGTH..HEADER_LENGTH + targets_length].chunks(TARGET_DESCRIPTOR_LENGTH).enumerate()
    {
        let at = (HEADER_LENGTH + index * TARGET_DESCRIPTOR_LENGTH) as u16;
        if descriptor[0] != IDENTIFICATION_DESCRIPTOR {
            let mut sense = Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x07);
            sense.field = Some((false, at, None));
            return Err(sense);
        }
        // LU ID TYPE (byte 1 bits 7-6) is ignored (SPC-4); NUL (bit 5)
        // asks for a null device, which this copy manager has not.
        if descriptor[1] & 0x20 != 0 {
            return Err(Sense::invalid_parameter(at + 1));
        }
        let designator_length = usize::from(descriptor[7]);
        if designator_length > 20 {
            return Err(Sense::invalid_parameter(at + 7));
        }
        targets.push(Named {
            designator_type: descriptor[5] & 0x0f,
            designator: descriptor[8..8 + designator_length].to_vec(),
            block_length: u32::from_be_bytes([0, descriptor[29], descriptor[30], descriptor[31]]),
        });
    }
    let mut segments = Vec::new();
    let mut at = HEADER_LENGTH + targets_length;
    let end = at + segments_length;
    while at < end {
        if end - at < 4 {
            return Err(Sense::parameter_list_length());
        }
        let descriptor_length = usize::from(be16(&data[at + 2..])) + 4;
        if at + descriptor_length > end {
            return Err(Sense::parameter_list_length());
        }
        if segments.len() == usize::from(SEGMENT_DESCRIPTORS_MAX) {
            return Err(Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x08));
        }
        let descriptor = &data[at..at + descriptor_length];
        if descriptor[0] != BLOCK_TO_BLOCK {
            let mut sense = Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x09);
            sense.field = Some((false, at as u16, None));
            return Err(sense);
        }
        if descriptor_length != 28 {
            return Err(Sense::invalid_parameter(at as u16 + 2));
        }
        segments.push(Segment {
            source: usize::from(be16(&descriptor[4..])),
            destination: usize::from(be16(&descriptor[6..])),
            blocks: u64::from(be16(&descriptor[10..])),
            source_lba: be64(&descriptor[12..]),
            destination_lba: be64(&descriptor[20..]),
        });
        at += descriptor_length;
    }
    Ok(Some(CopyList { list_id, hold: usage == 0, targets, segments }))
}

/// RECEIVE COPY RESULTS, OPERATING PARAMETERS (SPC-4 §6.18.4).
pub fn operating_parameters() -> Vec<u8> {
    let mut out = vec![0u8; 44];
    out[4] = 0x01; // SNLID: list identifiers may be reused once done
    out[8..10].copy_from_slice(&TARGET_DESCRIPTORS_MAX.to_be_bytes());
    out[10..12].copy_from_slice(&SEGMENT_DESCRIPTORS_MAX.to_be_bytes());
    out[12..16].copy_from_slice(&DESCRIPTOR_LIST_MAX.to_be_bytes());
    out[16..20].copy_from_slice(&SEGMENT_BYTES_MAX.to_be_bytes());
    out[34..36].copy_from_slice(&1u16.to_be_bytes()); // total concurrent copies
    out[36] = 1; // maximum concurrent copies
    out[37] = 9; // data segment granularity: 512 bytes
    let codes = [BLOCK_TO_BLOCK, IDENTIFICATION_DESCRIPTOR];
    out[43] = codes.len() as u8;
    out.extend_from_slice(&codes);
    let available = (out.len() - 4) as u32;
    out[0..4].copy_from_slice(&available.to_be_bytes());
    out
}

/// RECEIVE COPY RESULTS, COPY STATUS of a finished copy.
pub fn copy_status(segments: u16, bytes: u64) -> Vec<u8> {
    let mut out = vec![0u8; 12];
    out[0..4].copy_from_slice(&8u32.to_be_bytes());
    out[4] = 0x00; // completed without errors
    out[5..7].copy_from_slice(&segments.to_be_bytes());
    out[7] = 0xf1; // transfer count in KiB
    out[8..12].copy_from_slice(&(bytes.div_ceil(1024).min(u64::from(u32::MAX)) as u32).to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(targets: &[[u8; 32]], segments: &[Vec<u8>], hold: bool) -> Vec<u8> {
        let segments_length: usize = segments.iter().map(Vec::len).sum();
        let mut out = vec![0u8; 16];
        out[0] = 7;
        out[1] = if hold { 0 } else { 0x10 };
        out[2..4].copy_from_slice(&((targets.len() * 32) as u16).to_be_bytes());
        out[8..12].copy_from_slice(&(segments_length as u32).to_be_bytes());
        for target in targets {
            out.extend_from_slice(target);
        }
        for segment in segments {
            out.extend_from_slice(segment);
        }
        out
    }

    fn naa_target(value: [u8; 16]) -> [u8; 32] {
        let mut target = [0u8; 32];
        target[0] = 0xe4;
        target[4] = 0x01;
        target[5] = 0x03;
        target[7] = 16;
        target[8..24].copy_from_slice(&value);
        target[29..32].copy_from_slice(&[0, 2, 0]);
        target
    }

    fn segment(kind: u8, source: u16, destination: u16, blocks: u16, from: u64, to: u64) -> Vec<u8> {
        let mut out = vec![0u8; 28];
        out[0] = kind;
        out[2..4].copy_from_slice(&24u16.to_be_bytes());
        out[4..6].copy_from_slice(&source.to_be_bytes());
        out[6..8].copy_from_slice(&destination.to_be_bytes());
        out[10..12].copy_from_slice(&blocks.to_be_bytes());
        out[12..20].copy_from_slice(&from.to_be_bytes());
        out[20..28].copy_from_slice(&to.to_be_bytes());
        out
    }

    fn asc(result: Result<Option<CopyList>, Sense>) -> (u8, u8, u8) {
        let sense = result.expect_err("refused");
        (sense.key, sense.asc, sense.ascq)
    }

    #[test]
    fn a_block_to_block_list_parses() {
        let data = list(&[naa_target([9; 16])], &[segment(2, 0, 0, 2048, 0, 10_000)], true);
        let parsed = parse(&data, data.len()).unwrap().unwrap();
        assert_eq!(parsed.list_id, 7);
        assert!(parsed.hold);
        assert_eq!(parsed.targets, vec![Named { designator_type: 3, designator: vec![9; 16], block_length: 512 }]);
        assert_eq!(
            parsed.segments,
            vec![Segment { source: 0, destination: 0, blocks: 2048, source_lba: 0, destination_lba: 10_000 }]
        );
        assert_eq!(parse(&data, 0).unwrap(), None);
    }

    #[test]
    fn short_lists_and_limits_are_refused_with_the_right_sense() {
        let data = list(&[naa_target([9; 16])], &[segment(2, 0, 0, 8, 0, 8)], false);
        assert_eq!(asc(parse(&data, 47)), (key::ILLEGAL_REQUEST, 0x1a, 0));
        assert_eq!(asc(parse(&data, 75)), (key::ILLEGAL_REQUEST, 0x1a, 0));
        let three = list(&[naa_target([1; 16]); 3], &[segment(2, 0, 0, 8, 0, 8)], false);
        assert_eq!(asc(parse(&three, three.len())), (key::ILLEGAL_REQUEST, 0x26, 0x06));
        let two_segments = list(&[naa_target([1; 16])], &[segment(2, 0, 0, 8, 0, 8), segment(2, 0, 0, 8, 0, 8)], false);
        assert_eq!(asc(parse(&two_segments, two_segments.len())), (key::ILLEGAL_REQUEST, 0x26, 0x08));
        // Longer than the list maximum: refused before counting descriptors.
        let segments: Vec<Vec<u8>> = (0..37).map(|_| segment(2, 0, 0, 8, 0, 8)).collect();
        let long = list(&[naa_target([1; 16]); 3], &segments, false);
        assert_eq!(asc(parse(&long, long.len())), (key::ILLEGAL_REQUEST, 0x1a, 0));
        let mut other = naa_target([1; 16]);
        other[0] = 0xe0;
        let wrong_target = list(&[other], &[segment(2, 0, 0, 8, 0, 8)], false);
        assert_eq!(asc(parse(&wrong_target, wrong_target.len())), (key::ILLEGAL_REQUEST, 0x26, 0x07));
        let mut stream = segment(3, 0, 0, 0, 0, 0);
        stream.truncate(20);
        stream[2..4].copy_from_slice(&16u16.to_be_bytes());
        let wrong_segment = list(&[naa_target([1; 16])], &[stream], false);
        assert_eq!(asc(parse(&wrong_segment, wrong_segment.len())), (key::ILLEGAL_REQUEST, 0x26, 0x09));
    }

    #[test]
    fn operating_parameters_name_the_limits() {
        let out = operating_parameters();
        assert!(be32(&out) as usize + 4 == out.len() && out.len() >= 44);
        assert_eq!(be16(&out[8..]), TARGET_DESCRIPTORS_MAX);
        assert_eq!(be16(&out[10..]), SEGMENT_DESCRIPTORS_MAX);
        assert_eq!(be32(&out[12..]), DESCRIPTOR_LIST_MAX);
        assert_eq!(&out[44..], &[0x02, 0xe4]);
    }
}
