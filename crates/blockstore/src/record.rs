//! Journal records: what a disk's journal holds, byte for byte.
//!
//! A record on disk is `[body length: u32 LE][CRC32C of body: u32 LE][body]`;
//! the body is a tag byte and little-endian fields (see
//! `docs/format/blockstore.md`). Block data is stored raw, so a 4 KiB write
//! costs 4 KiB plus a few dozen bytes of journal.

use bytes::Bytes;

use crate::{ComponentId, Lsn, BLOCK_SIZE};

/// Bodies larger than this are refused on decode (a torn or corrupt
/// length); writes are split well below it.
pub const RECORD_BODY_MAX: usize = 16 << 20;
pub const RECORD_HEADER: usize = 8;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    Create {
        component: ComponentId,
        blocks: u64,
    },
    Delete {
        component: ComponentId,
    },
    Resize {
        component: ComponentId,
        blocks: u64,
    },
    /// A foreground write under `lsn`: `data` holds whole blocks from `first`.
    Write {
        component: ComponentId,
        lsn: Lsn,
        first: u64,
        data: Bytes,
    },
    /// Deallocates `count` blocks from `first` under `lsn` (they read as zeros).
    Unmap {
        component: ComponentId,
        lsn: Lsn,
        first: u64,
        count: u64,
    },
    /// Starts a tracking bitmap for a component that went stale at `stale`,
    /// marking `seed` (block ranges written above `stale` before now, as the
    /// owner knows them), or, without a seed, the recent-write windows above
    /// `stale` (a superset).
    Track {
        component: ComponentId,
        stale: Lsn,
        seed: Option<Vec<(u64, u64)>>,
    },
    Untrack {
        component: ComponentId,
        stale: Lsn,
    },
    /// This component is being resynchronized from `stale` up to `target`
    /// by resync `plan` (a new plan starts a fresh synchronization bitmap;
    /// the same plan again keeps it).
    BeginSync {
        component: ComponentId,
        stale: Lsn,
        target: Lsn,
        plan: u64,
    },
    /// Resync data: written only to blocks no newer write has touched, and
    /// only while resync `plan` is the one under way (plan 0: journaled
    /// before resync writes named their plan; lands in any).
    SyncWrite {
        component: ComponentId,
        plan: u64,
        first: u64,
        data: Bytes,
    },
    /// Resync `plan` finished: the component is current up to its target
    /// (an end for another plan changes nothing). Plan 0 ends whatever resync
    /// is under way: the component is current as it stands.
    EndSync {
        component: ComponentId,
        plan: u64,
    },
    /// A block rewritten from another replica after a checksum mismatch
    /// (no LSN: the data is what the LSN already covers).
    Repair {
        component: ComponentId,
        first: u64,
        data: Bytes,
    },
    /// From now on the component refuses its object's owners of epochs
    /// below `epoch` (contract 2: fencing by epoch).
    Fence {
        component: ComponentId,
        epoch: u64,
    },
    /// An erasure-coded chunk write under `lsn`: `data` as a `Write`'s, and
    /// `undo`, what the blocks held before (as long as `data`), kept until
    /// the owner says every active component has the write (a later
    /// record's `stable` at or above `lsn`), so a new owner can roll a
    /// write that reached only some chunks of a stripe back.
    ChunkWrite {
        component: ComponentId,
        lsn: Lsn,
        first: u64,
        stable: Lsn,
        data: Bytes,
        undo: Bytes,
    },
    /// An erasure-coded unmap of whole stripes' rows under `lsn`; a new
    /// owner that finds it above where it rolls back completes it instead.
    ChunkUnmap {
        component: ComponentId,
        lsn: Lsn,
        first: u64,
        count: u64,
        stable: Lsn,
    },
    /// Restores the blocks of every chunk write above `to`, newest first,
    /// from their before-images; the component then holds every write up
    /// to `to` and none above.
    RollBack {
        component: ComponentId,
        to: Lsn,
    },
    /// A before-image kept across a checkpoint (the checkpoint writes one
    /// per chunk write not yet stable at the head of the next journal).
    Undo {
        component: ComponentId,
        lsn: Lsn,
        first: u64,
        data: Bytes,
    },
    /// As `Undo`, for a chunk unmap.
    UndoUnmap {
        component: ComponentId,
        lsn: Lsn,
        first: u64,
        count: u64,
    },
}

const CREATE: u8 = 1;
const DELETE: u8 = 2;
const RESIZE: u8 = 3;
const WRITE: u8 = 4;
const UNMAP: u8 = 5;
const TRACK: u8 = 6;
const UNTRACK: u8 = 7;
const BEGIN_SYNC: u8 = 8;
/// A resync write without its plan (older journals; read, never written).
const SYNC_WRITE: u8 = 9;
const END_SYNC: u8 = 10;
const REPAIR: u8 = 11;
const FENCE: u8 = 12;
const CHUNK_WRITE: u8 = 13;
const CHUNK_UNMAP: u8 = 14;
const ROLL_BACK: u8 = 15;
const UNDO: u8 = 16;
const UNDO_UNMAP: u8 = 17;
const SYNC_WRITE_OF_PLAN: u8 = 18;

impl Record {
    pub fn component(&self) -> ComponentId {
        match self {
            Record::Create { component, .. }
            | Record::Delete { component }
            | Record::Resize { component, .. }
            | Record::Write { component, .. }
            | Record::Unmap { component, .. }
            | Record::Track { component, .. }
            | Record::Untrack { component, .. }
            | Record::BeginSync { component, .. }
            | Record::SyncWrite { component, .. }
            | Record::EndSync { component, .. }
            | Record::Repair { component, .. }
            | Record::Fence { component, .. }
            | Record::ChunkWrite { component, .. }
            | Record::ChunkUnmap { component, .. }
            | Record::RollBack { component, .. }
            | Record::Undo { component, .. }
            | Record::UndoUnmap { component, .. } => *component,
        }
    }

    /// Appends the record, header included, to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; RECORD_HEADER]);
        let u64s = |out: &mut Vec<u8>, tag: u8, values: &[u64]| {
            out.push(tag);
            for value in values {
                out.extend_from_slice(&value.to_le_bytes());
            }
        };
        match self {
            Record::Create { component, blocks } => u64s(out, CREATE, &[*component, *blocks]),
            Record::Delete { component } => u64s(out, DELETE, &[*component]),
            Record::Resize { component, blocks } => u64s(out, RESIZE, &[*component, *blocks]),
            Record::Write { component, lsn, first, data } => {
                u64s(out, WRITE, &[*component, *lsn, *first]);
                out.extend_from_slice(data);
            }
            Record::Unmap { component, lsn, first, count } => u64s(out, UNMAP, &[*component, *lsn, *first, *count]),
            Record::Track { component, stale, seed } => {
                u64s(out, TRACK, &[*component, *stale, seed.is_some() as u64]);
                for (first, count) in seed.iter().flatten() {
                    out.extend_from_slice(&first.to_le_bytes());
                    out.extend_from_slice(&count.to_le_bytes());
                }
            }
            Record::Untrack { component, stale } => u64s(out, UNTRACK, &[*component, *stale]),
            Record::BeginSync { component, stale, target, plan } => {
                u64s(out, BEGIN_SYNC, &[*component, *stale, *target, *plan])
            }
            Record::SyncWrite { component, plan, first, data } => {
                u64s(out, SYNC_WRITE_OF_PLAN, &[*component, *plan, *first]);
                out.extend_from_slice(data);
            }
            Record::EndSync { component, plan } => u64s(out, END_SYNC, &[*component, *plan]),
            Record::Fence { component, epoch } => u64s(out, FENCE, &[*component, *epoch]),
            Record::Repair { component, first, data } => {
                u64s(out, REPAIR, &[*component, *first]);
                out.extend_from_slice(data);
            }
            Record::ChunkWrite { component, lsn, first, stable, data, undo } => {
                u64s(out, CHUNK_WRITE, &[*component, *lsn, *first, *stable]);
                out.extend_from_slice(data);
                out.extend_from_slice(undo);
            }
            Record::ChunkUnmap { component, lsn, first, count, stable } => {
                u64s(out, CHUNK_UNMAP, &[*component, *lsn, *first, *count, *stable])
            }
            Record::RollBack { component, to } => u64s(out, ROLL_BACK, &[*component, *to]),
            Record::Undo { component, lsn, first, data } => {
                u64s(out, UNDO, &[*component, *lsn, *first]);
                out.extend_from_slice(data);
            }
            Record::UndoUnmap { component, lsn, first, count } => {
                u64s(out, UNDO_UNMAP, &[*component, *lsn, *first, *count])
            }
        }
        let body = &out[start + RECORD_HEADER..];
        let length = body.len() as u32;
        let checksum = crc32c::crc32c(body);
        out[start..start + 4].copy_from_slice(&length.to_le_bytes());
        out[start + 4..start + 8].copy_from_slice(&checksum.to_le_bytes());
    }

    /// Decodes the record at the start of `bytes`: the record and the bytes
    /// it took, or `None` if what is there is incomplete or corrupt (a torn
    /// tail: replay stops there).
    pub fn decode(bytes: &[u8]) -> Option<(Record, usize)> {
        let header = bytes.get(..RECORD_HEADER)?;
        let length = u32::from_le_bytes(header[..4].try_into().ok()?) as usize;
        let checksum = u32::from_le_bytes(header[4..].try_into().ok()?);
        if length == 0 || length > RECORD_BODY_MAX {
            return None;
        }
        let body = bytes.get(RECORD_HEADER..RECORD_HEADER + length)?;
        if crc32c::crc32c(body) != checksum {
            return None;
        }
        let record = Self::decode_body(body)?;
        Some((record, RECORD_HEADER + length))
    }

    fn decode_body(body: &[u8]) -> Option<Record> {
        let (&tag, mut rest) = body.split_first()?;
        let mut next = || -> Option<u64> {
            let (value, tail) = rest.split_first_chunk::<8>()?;
            rest = tail;
            Some(u64::from_le_bytes(*value))
        };
        let record = match tag {
            CREATE => Record::Create { component: next()?, blocks: next()? },
            DELETE => Record::Delete { component: next()? },
            RESIZE => Record::Resize { component: next()?, blocks: next()? },
            WRITE => {
                let (component, lsn, first) = (next()?, next()?, next()?);
                Record::Write { component, lsn, first, data: blocks(rest)? }
            }
            UNMAP => Record::Unmap { component: next()?, lsn: next()?, first: next()?, count: next()? },
            TRACK => {
                let (component, stale, seeded) = (next()?, next()?, next()?);
                let seed = match seeded {
                    0 => None,
                    1 => {
                        let mut ranges = Vec::new();
                        while let Some(first) = next() {
                            ranges.push((first, next()?));
                        }
                        Some(ranges)
                    }
                    _ => return None,
                };
                Record::Track { component, stale, seed }
            }
            UNTRACK => Record::Untrack { component: next()?, stale: next()? },
            BEGIN_SYNC => Record::BeginSync { component: next()?, stale: next()?, target: next()?, plan: next()? },
            SYNC_WRITE => {
                let (component, first) = (next()?, next()?);
                Record::SyncWrite { component, plan: 0, first, data: blocks(rest)? }
            }
            SYNC_WRITE_OF_PLAN => {
                let (component, plan, first) = (next()?, next()?, next()?);
                Record::SyncWrite { component, plan, first, data: blocks(rest)? }
            }
            END_SYNC => Record::EndSync { component: next()?, plan: next()? },
            FENCE => Record::Fence { component: next()?, epoch: next()? },
            REPAIR => {
                let (component, first) = (next()?, next()?);
                Record::Repair { component, first, data: blocks(rest)? }
            }
            CHUNK_WRITE => {
                let (component, lsn, first, stable) = (next()?, next()?, next()?, next()?);
                let both = blocks(rest)?;
                if !(both.len() / BLOCK_SIZE).is_multiple_of(2) {
                    return None;
                }
                let half = both.len() / 2;
                Record::ChunkWrite { component, lsn, first, stable, data: both.slice(..half), undo: both.slice(half..) }
            }
            CHUNK_UNMAP => {
                Record::ChunkUnmap { component: next()?, lsn: next()?, first: next()?, count: next()?, stable: next()? }
            }
            ROLL_BACK => Record::RollBack { component: next()?, to: next()? },
            UNDO => {
                let (component, lsn, first) = (next()?, next()?, next()?);
                Record::Undo { component, lsn, first, data: blocks(rest)? }
            }
            UNDO_UNMAP => Record::UndoUnmap { component: next()?, lsn: next()?, first: next()?, count: next()? },
            _ => return None,
        };
        // Fixed-size records must have nothing left over.
        let fixed = !matches!(
            record,
            Record::Write { .. }
                | Record::SyncWrite { .. }
                | Record::Repair { .. }
                | Record::ChunkWrite { .. }
                | Record::Undo { .. }
        );
        if fixed && !rest.is_empty() {
            return None;
        }
        Some(record)
    }
}

fn blocks(rest: &[u8]) -> Option<Bytes> {
    (!rest.is_empty() && rest.len().is_multiple_of(BLOCK_SIZE)).then(|| Bytes::copy_from_slice(rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Record> {
        let data = Bytes::from(vec![7u8; BLOCK_SIZE * 2]);
        vec![
            Record::Create { component: 1, blocks: 100 },
            Record::Delete { component: 2 },
            Record::Resize { component: 3, blocks: 5 },
            Record::Write { component: 4, lsn: 9, first: 3, data: data.clone() },
            Record::Unmap { component: 5, lsn: 10, first: 1, count: 7 },
            Record::ChunkWrite {
                component: 13,
                lsn: 12,
                first: 4,
                stable: 11,
                data: data.clone(),
                undo: Bytes::from(vec![3u8; BLOCK_SIZE * 2]),
            },
            Record::ChunkUnmap { component: 14, lsn: 13, first: 16, count: 32, stable: 12 },
            Record::RollBack { component: 15, to: 11 },
            Record::Undo { component: 16, lsn: 14, first: 2, data: data.clone() },
            Record::UndoUnmap { component: 17, lsn: 15, first: 0, count: 16 },
            Record::Track { component: 6, stale: 11, seed: None },
            Record::Track { component: 6, stale: 11, seed: Some(vec![(1, 2), (9, 1)]) },
            Record::Untrack { component: 7, stale: 12 },
            Record::BeginSync { component: 8, stale: 3, target: 40, plan: 2 },
            Record::SyncWrite { component: 9, plan: 3, first: 2, data: data.clone() },
            Record::EndSync { component: 10, plan: 2 },
            Record::Fence { component: 12, epoch: 4 },
            Record::Repair { component: 11, first: 0, data },
        ]
    }

    #[test]
    fn every_record_round_trips() {
        for record in samples() {
            let mut bytes = Vec::new();
            record.encode(&mut bytes);
            assert_eq!(Record::decode(&bytes), Some((record, bytes.len())));
        }
    }

    /// Journals from before resync writes named their plan still replay.
    #[test]
    fn a_resync_write_without_a_plan_reads_as_plan_0() {
        let mut body = vec![SYNC_WRITE];
        for value in [9u64, 2] {
            body.extend_from_slice(&value.to_le_bytes());
        }
        body.extend_from_slice(&[7u8; BLOCK_SIZE]);
        let data = Bytes::from(vec![7u8; BLOCK_SIZE]);
        assert_eq!(Record::decode_body(&body), Some(Record::SyncWrite { component: 9, plan: 0, first: 2, data }));
    }

    #[test]
    fn a_torn_or_flipped_record_is_refused() {
        for record in samples() {
            let mut bytes = Vec::new();
            record.encode(&mut bytes);
            for cut in 0..bytes.len() {
                assert_eq!(Record::decode(&bytes[..cut]), None, "{record:?} cut at {cut}");
            }
            for index in 0..bytes.len().min(64) {
                let mut flipped = bytes.clone();
                flipped[index] ^= 0x10;
                assert_eq!(Record::decode(&flipped), None, "{record:?} flipped at {index}");
            }
        }
    }
}
