//! The entry store: the shared log proper, on one replica's disk.
//!
//! Entries live in segment files named by the position of their first entry
//! (`<first position>.seg`, 20 decimal digits). Positions inside a segment are
//! contiguous, so the in-memory index is one `u32` offset per position.
//! Garbage collection deletes an entry *in place*: the entry's byte range is
//! hole-punched (its blocks go back to the file system) and its index slot is
//! marked deleted, so every other position keeps its meaning; a segment whose
//! entries are all deleted is removed. Record format: `docs/format/sharedlog.md`.
//!
//! Durability: writes here are not synced one by one. The Raft log below is
//! the durable copy of every applied command; [`EntryStore::sync`] makes the
//! store durable up to a point (a checkpoint), after which the Raft log may be
//! purged. On open, everything past the checkpoint is cut off and replayed
//! from the Raft log.
//!
//! **Invariant:** a position below `next_position` is either readable with a
//! valid checksum or reads as trimmed; it never reads as another entry.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use fsio::{File, Fs};
use serde::{Deserialize, Serialize};

use crate::types::{Entry, EntryKind, Position, Record, StreamId};

pub const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"TSEN");
pub const RECORD_HEADER_SIZE: usize = 32;
/// Segments roll over at this size. Why 64 MiB: small enough that a fully
/// obsolete segment is freed soon, large enough to keep file counts low.
pub const SEGMENT_SIZE_MAX: u64 = 64 * 1024 * 1024;
/// The largest payload one entry may carry.
pub const PAYLOAD_SIZE_MAX: usize = 8 * 1024 * 1024;
/// The most streams one entry may belong to.
pub const STREAMS_PER_ENTRY_MAX: usize = 16;
const DELETED: u32 = 1 << 31;
/// The file system block size hole punching works in.
const HOLE_BLOCK: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("entry store I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("entry store failed earlier and refuses further work: {0}")]
    Failed(String),
    #[error("checksum mismatch for the entry at position {position} in {segment}")]
    Corrupt { position: Position, segment: String },
    #[error("invalid record: {0}")]
    Invalid(String),
}

/// Where the store stood when it was last made durable.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreCheckpoint {
    pub next_position: Position,
    /// (first position, end offset) of every segment that existed.
    pub segments: Vec<(Position, u64)>,
}

struct Segment {
    first_position: Position,
    file: Arc<dyn File>,
    /// Offset of each position's record; `DELETED` bit set once collected.
    offsets: Vec<u32>,
    end: u64,
    live_entries: u64,
}

impl Segment {
    fn path(dir: &Path, first_position: Position) -> PathBuf {
        dir.join(format!("{first_position:020}.seg"))
    }

    fn name(&self) -> String {
        format!("{:020}.seg", self.first_position)
    }

    fn slot(&self, position: Position) -> Option<u32> {
        let index = position.checked_sub(self.first_position)? as usize;
        self.offsets.get(index).copied()
    }

    /// Reads the header of the record at `index`: its streams, kind and
    /// length on disk (cheaper than the whole record when deleting).
    fn read_header(&self, index: usize) -> Result<(Vec<StreamId>, EntryKind, u64), StoreError> {
        let start = (self.offsets[index] & !DELETED) as u64;
        let position = self.first_position + index as u64;
        let corrupt = || StoreError::Corrupt { position, segment: self.name() };
        let mut header = [0u8; RECORD_HEADER_SIZE];
        self.file.read_exact_at(&mut header, start)?;
        let u32_at = |offset: usize| u32::from_le_bytes(header[offset..offset + 4].try_into().expect("4 bytes"));
        let stored_position = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
        let stream_count = u16::from_le_bytes(header[24..26].try_into().expect("2 bytes")) as usize;
        let kind = EntryKind::from_u8(header[26]).ok_or_else(corrupt)?;
        if u32_at(0) != RECORD_MAGIC || stored_position != position || stream_count > STREAMS_PER_ENTRY_MAX {
            return Err(corrupt());
        }
        let mut streams = vec![0u8; stream_count * 8];
        self.file.read_exact_at(&mut streams, start + RECORD_HEADER_SIZE as u64)?;
        let streams = streams
            .chunks_exact(8)
            .map(|bytes| StreamId(u64::from_le_bytes(bytes.try_into().expect("8 bytes"))))
            .collect();
        Ok((streams, kind, u32_at(20) as u64))
    }

    /// Widens the byte range of newly deleted slots `first_slot..end_slot`
    /// over neighbouring dead bytes, up to the enclosing block boundaries,
    /// so that a block shared with records deleted earlier is freed too
    /// (punching only frees whole blocks). Never widens over a live record.
    fn widen_dead_range(&self, start: u64, end: u64, first_slot: usize, end_slot: usize) -> (u64, u64) {
        let floor = start & !(HOLE_BLOCK - 1);
        let ceiling = (end + HOLE_BLOCK - 1) & !(HOLE_BLOCK - 1);
        let mut low = start;
        let mut slot = first_slot;
        while slot > 0 && low > floor {
            let previous = self.offsets[slot - 1];
            if previous & DELETED == 0 {
                break;
            }
            low = (previous & !DELETED) as u64;
            slot -= 1;
        }
        if slot == 0 && self.offsets.first().is_none_or(|offset| offset & DELETED != 0) {
            low = 0;
        }
        let mut high = end;
        let mut slot = end_slot;
        loop {
            if high >= ceiling {
                break;
            }
            match self.offsets.get(slot) {
                // Past the last record nothing is written (yet): the
                // whole block is ours to free.
                None => {
                    high = ceiling;
                    break;
                }
                Some(next) if next & DELETED == 0 => {
                    high = high.max((next & !DELETED) as u64);
                    break;
                }
                Some(_) => {
                    slot += 1;
                    high =
                        self.offsets.get(slot).map(|offset| (offset & !DELETED) as u64).unwrap_or(self.end).max(high);
                }
            }
        }
        (low.max(floor), high.min(ceiling).max(end))
    }

    /// Reads and verifies the record of the live position at `index`.
    fn read_record(&self, index: usize) -> Result<Entry, StoreError> {
        let start = (self.offsets[index] & !DELETED) as u64;
        let position = self.first_position + index as u64;
        let corrupt = || StoreError::Corrupt { position, segment: self.name() };
        let mut header = [0u8; RECORD_HEADER_SIZE];
        self.file.read_exact_at(&mut header, start)?;
        let record_len = u32::from_le_bytes(header[20..24].try_into().expect("4 bytes")) as u64;
        if record_len < RECORD_HEADER_SIZE as u64 || start + record_len > self.end {
            return Err(corrupt());
        }
        let mut bytes = vec![0u8; record_len as usize];
        bytes[..RECORD_HEADER_SIZE].copy_from_slice(&header);
        self.file.read_exact_at(&mut bytes[RECORD_HEADER_SIZE..], start + RECORD_HEADER_SIZE as u64)?;
        match decode_record(&bytes) {
            Some((entry, _)) if entry.position == position => Ok(entry),
            _ => {
                metrics::counter!("sharedlog_entry_checksum_errors_total").increment(1);
                Err(corrupt())
            }
        }
    }
}

#[derive(Default)]
struct StreamIndex {
    positions: Vec<Position>,
    live: usize,
    checkpoints: Vec<Position>,
}

/// Counters describing the store, for metrics and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreStats {
    pub next_position: Position,
    pub live_entries: u64,
    pub live_bytes: u64,
    pub deleted_entries: u64,
    pub segments: u64,
    pub disk_bytes: u64,
}

/// A sync prepared under the store's lock, run without it.
pub struct PendingSync {
    files: Vec<Arc<dyn File>>,
    fs: Arc<dyn Fs>,
    dir: PathBuf,
    checkpoint: StoreCheckpoint,
}

impl PendingSync {
    /// fdatasyncs every file written since the last sync, then the
    /// directory (creations and removals of segments).
    pub fn run(self) -> io::Result<StoreCheckpoint> {
        for file in &self.files {
            file.sync_data()?;
        }
        self.fs.sync_dir(&self.dir)?;
        Ok(self.checkpoint)
    }
}

pub struct EntryStore {
    fs: Arc<dyn Fs>,
    dir: PathBuf,
    /// Keyed by first position.
    segments: BTreeMap<Position, Segment>,
    next_position: Position,
    streams: HashMap<StreamId, StreamIndex>,
    live_entries: u64,
    live_bytes: u64,
    deleted_entries: u64,
    /// Segments written or punched since the last sync.
    dirty: BTreeSet<Position>,
    failed: Option<String>,
    segment_size_max: u64,
}

fn align8(value: usize) -> usize {
    (value + 7) & !7
}

/// Encodes one record; `out` grows by a multiple of 8 bytes.
pub fn encode_record(out: &mut BytesMut, position: Position, record: &Record) {
    let body_len = record.streams.len() * 8 + record.payload.len();
    let unpadded = RECORD_HEADER_SIZE + body_len;
    let record_len = align8(unpadded);
    let start = out.len();
    out.put_u32_le(RECORD_MAGIC);
    out.put_u32_le(0); // checksum, filled below
    out.put_u64_le(position);
    out.put_u32_le(record.payload.len() as u32);
    out.put_u32_le(record_len as u32);
    out.put_u16_le(record.streams.len() as u16);
    out.put_u8(record.kind as u8);
    out.put_u8(0);
    out.put_u32_le(0);
    for stream in &record.streams {
        out.put_u64_le(stream.0);
    }
    out.put_slice(&record.payload);
    out.put_bytes(0, record_len - unpadded);
    let checksum = crc32c::crc32c(&out[start + 8..start + unpadded]);
    out[start + 4..start + 8].copy_from_slice(&checksum.to_le_bytes());
}

/// Decodes the record at the start of `bytes`. `Ok(None)` if the bytes are
/// not a whole valid record (torn or zeroed).
pub fn decode_record(bytes: &[u8]) -> Option<(Entry, usize)> {
    if bytes.len() < RECORD_HEADER_SIZE {
        return None;
    }
    let u32_at = |offset: usize| u32::from_le_bytes(bytes[offset..offset + 4].try_into().expect("4 bytes"));
    if u32_at(0) != RECORD_MAGIC {
        return None;
    }
    let stored_checksum = u32_at(4);
    let position = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    let payload_len = u32_at(16) as usize;
    let record_len = u32_at(20) as usize;
    let stream_count = u16::from_le_bytes(bytes[24..26].try_into().expect("2 bytes")) as usize;
    let kind = EntryKind::from_u8(bytes[26])?;
    if !(1..=STREAMS_PER_ENTRY_MAX).contains(&stream_count) || payload_len > PAYLOAD_SIZE_MAX {
        return None;
    }
    let unpadded = RECORD_HEADER_SIZE + stream_count * 8 + payload_len;
    if record_len != align8(unpadded) || bytes.len() < record_len {
        return None;
    }
    // Only canonical records: reserved bytes and padding are zero, so a
    // record decodes to exactly one byte string.
    if bytes[27..32].iter().chain(&bytes[unpadded..record_len]).any(|byte| *byte != 0) {
        return None;
    }
    if crc32c::crc32c(&bytes[8..unpadded]) != stored_checksum {
        return None;
    }
    let streams = (0..stream_count)
        .map(|index| {
            let offset = RECORD_HEADER_SIZE + index * 8;
            StreamId(u64::from_le_bytes(bytes[offset..offset + 8].try_into().expect("8 bytes")))
        })
        .collect();
    let payload_start = RECORD_HEADER_SIZE + stream_count * 8;
    let payload = Bytes::copy_from_slice(&bytes[payload_start..payload_start + payload_len]);
    Some((Entry { position, streams, kind, payload }, record_len))
}

/// Size on disk of a record.
pub fn record_size(record: &Record) -> usize {
    align8(RECORD_HEADER_SIZE + record.streams.len() * 8 + record.payload.len())
}

/// Checks a record a client wants to append.
pub fn validate(record: &Record) -> Result<(), StoreError> {
    if record.streams.is_empty() || record.streams.len() > STREAMS_PER_ENTRY_MAX {
        return Err(StoreError::Invalid(format!(
            "an entry needs 1 to {STREAMS_PER_ENTRY_MAX} streams, not {}",
            record.streams.len()
        )));
    }
    if record.payload.len() > PAYLOAD_SIZE_MAX {
        return Err(StoreError::Invalid(format!(
            "payload of {} bytes exceeds {PAYLOAD_SIZE_MAX}",
            record.payload.len()
        )));
    }
    Ok(())
}

impl EntryStore {
    /// Opens the store in `dir`, cutting it back to `checkpoint` (or to
    /// empty when there is none): anything later is replayed by Raft.
    pub fn open(fs: Arc<dyn Fs>, dir: &Path, checkpoint: Option<&StoreCheckpoint>) -> Result<EntryStore, StoreError> {
        fs.create_dir_all(dir)?;
        let empty = StoreCheckpoint::default();
        let checkpoint = checkpoint.unwrap_or(&empty);
        let kept: BTreeMap<Position, u64> = checkpoint.segments.iter().copied().collect();
        let mut store = EntryStore {
            fs: fs.clone(),
            dir: dir.to_path_buf(),
            segments: BTreeMap::new(),
            next_position: checkpoint.next_position,
            streams: HashMap::new(),
            live_entries: 0,
            live_bytes: 0,
            deleted_entries: 0,
            dirty: BTreeSet::new(),
            failed: None,
            segment_size_max: SEGMENT_SIZE_MAX,
        };
        let mut removed_any = false;
        for name in fs.list(dir)? {
            let Some(first_position) = name.strip_suffix(".seg").and_then(|stem| stem.parse::<u64>().ok()) else {
                continue;
            };
            let path = dir.join(&name);
            match kept.get(&first_position) {
                Some(end) => store.load_segment(first_position, *end)?,
                None => {
                    // Created after the checkpoint (or emptied before it):
                    // its contents come back through Raft replay.
                    fs.remove_file(&path)?;
                    removed_any = true;
                }
            }
        }
        if removed_any {
            fs.sync_dir(dir)?;
        }
        // Segments the checkpoint lists but the disk no longer has were
        // emptied by GC after the checkpoint; their positions read as trimmed.
        store.deleted_entries = store.next_position - store.live_entries;
        Ok(store)
    }

    fn load_segment(&mut self, first_position: Position, end: u64) -> Result<(), StoreError> {
        let path = Segment::path(&self.dir, first_position);
        let file = self.fs.open(&path, false)?;
        if file.len()? > end {
            file.set_len(end)?;
            self.dirty.insert(first_position);
        }
        let length = file.len()?.min(end);
        let mut bytes = vec![0u8; length as usize];
        file.read_exact_at(&mut bytes, 0)?;
        let mut segment = Segment { first_position, file, offsets: Vec::new(), end: length, live_entries: 0 };
        let mut offset = 0usize;
        while offset + 8 <= bytes.len() {
            if bytes[offset..offset + 8].iter().all(|byte| *byte == 0) {
                // A punched (collected) range: skip to the next record.
                offset += 8;
                continue;
            }
            let Some((entry, record_len)) = decode_record(&bytes[offset..]) else {
                return Err(StoreError::Corrupt {
                    position: segment.first_position + segment.offsets.len() as u64,
                    segment: segment.name(),
                });
            };
            let index = entry.position.checked_sub(first_position).map(|index| index as usize);
            match index {
                Some(index) if index >= segment.offsets.len() => {
                    // Positions skipped since the previous live record were collected.
                    while segment.offsets.len() < index {
                        segment.offsets.push(offset as u32 | DELETED);
                    }
                }
                _ => {
                    return Err(StoreError::Invalid(format!(
                        "{}: position {} out of order at offset {offset}",
                        segment.name(),
                        entry.position
                    )))
                }
            }
            segment.offsets.push(offset as u32);
            segment.live_entries += 1;
            self.live_entries += 1;
            self.live_bytes += record_len as u64;
            self.index_streams(&entry);
            offset += record_len;
        }
        // Trailing positions whose records were all punched: the next
        // segment's first position (or the tail) says how many there were.
        self.segments.insert(first_position, segment);
        Ok(())
    }

    /// After all segments are loaded, pads each segment's offsets up to the
    /// next segment's first position, so trailing collected positions are
    /// accounted for.
    fn finish_loading(&mut self) {
        let firsts: Vec<Position> = self.segments.keys().copied().collect();
        for (index, first) in firsts.iter().enumerate() {
            let next_first = firsts.get(index + 1).copied().unwrap_or(self.next_position);
            let segment = self.segments.get_mut(first).expect("listed above");
            let end = segment.end as u32;
            while (segment.first_position + segment.offsets.len() as u64) < next_first {
                segment.offsets.push(end | DELETED);
            }
        }
    }

    fn index_streams(&mut self, entry: &Entry) {
        for stream in &entry.streams {
            let index = self.streams.entry(*stream).or_default();
            index.positions.push(entry.position);
            index.live += 1;
            if entry.kind == EntryKind::Checkpoint {
                index.checkpoints.push(entry.position);
            }
        }
    }

    fn check_failed(&self) -> Result<(), StoreError> {
        match &self.failed {
            Some(reason) => Err(StoreError::Failed(reason.clone())),
            None => Ok(()),
        }
    }

    /// Latches the store failed: after an I/O error nothing on disk can be
    /// trusted to match memory, and fsync must never be retried.
    fn fail<T>(&mut self, error: io::Error) -> Result<T, StoreError> {
        let reason = error.to_string();
        tracing::error!(dir = %self.dir.display(), %reason, "entry store failed; refusing further writes");
        self.failed = Some(reason);
        Err(StoreError::Io(error))
    }

    pub fn next_position(&self) -> Position {
        self.next_position
    }

    /// Appends `records` at consecutive positions from `next_position`.
    pub fn append(&mut self, records: &[Record]) -> Result<Position, StoreError> {
        self.check_failed()?;
        let first = self.next_position;
        let mut buffer = BytesMut::new();
        let mut pending: Vec<(Position, u32)> = Vec::new();
        for record in records {
            let size = record_size(record) as u64;
            let rollover = match self.segments.last_key_value() {
                None => true,
                Some((_, segment)) => segment.end + buffer.len() as u64 + size > self.segment_size_max,
            };
            if rollover {
                self.flush_buffer(&mut buffer, &mut pending)?;
                self.start_segment(self.next_position)?;
            }
            let position = self.next_position;
            let segment_end = self.segments.last_key_value().expect("segment exists").1.end;
            pending.push((position, (segment_end + buffer.len() as u64) as u32));
            encode_record(&mut buffer, position, record);
            self.next_position += 1;
            let entry = Entry { position, streams: record.streams.clone(), kind: record.kind, payload: Bytes::new() };
            self.index_streams(&entry);
            self.live_entries += 1;
            self.live_bytes += size;
        }
        self.flush_buffer(&mut buffer, &mut pending)?;
        Ok(first)
    }

    fn flush_buffer(&mut self, buffer: &mut BytesMut, pending: &mut Vec<(Position, u32)>) -> Result<(), StoreError> {
        if buffer.is_empty() {
            return Ok(());
        }
        let (first, segment) = self.segments.iter_mut().next_back().expect("segment exists");
        let first = *first;
        if let Err(error) = segment.file.write_at(buffer, segment.end) {
            return self.fail(error);
        }
        let segment = self.segments.get_mut(&first).expect("segment exists");
        segment.end += buffer.len() as u64;
        for (_, offset) in pending.drain(..) {
            segment.offsets.push(offset);
            segment.live_entries += 1;
        }
        self.dirty.insert(first);
        buffer.clear();
        Ok(())
    }

    fn start_segment(&mut self, first: Position) -> Result<(), StoreError> {
        let path = Segment::path(&self.dir, first);
        let file = match self.fs.open(&path, true) {
            Ok(file) => file,
            Err(error) => return self.fail(error),
        };
        self.segments
            .insert(first, Segment { first_position: first, file, offsets: Vec::new(), end: 0, live_entries: 0 });
        self.dirty.insert(first);
        Ok(())
    }

    fn segment_for(&self, position: Position) -> Option<&Segment> {
        self.segments.range(..=position).next_back().map(|(_, segment)| segment)
    }

    /// Reads one position.
    pub fn read(&self, position: Position) -> Result<crate::types::ReadOutcome, StoreError> {
        use crate::types::ReadOutcome;
        if position >= self.next_position {
            return Ok(ReadOutcome::NotWritten);
        }
        let Some(segment) = self.segment_for(position) else {
            return Ok(ReadOutcome::Trimmed);
        };
        match segment.slot(position) {
            None => Ok(ReadOutcome::Trimmed),
            Some(slot) if slot & DELETED != 0 => Ok(ReadOutcome::Trimmed),
            Some(_) => {
                let index = (position - segment.first_position) as usize;
                Ok(ReadOutcome::Entry(segment.read_record(index)?))
            }
        }
    }

    /// Positions of `stream`'s live entries in `[from, to)`, at most `limit`.
    pub fn stream_positions(&self, stream: StreamId, from: Position, to: Position, limit: usize) -> Vec<Position> {
        let Some(index) = self.streams.get(&stream) else {
            return Vec::new();
        };
        let start = index.positions.partition_point(|position| *position < from);
        index.positions[start..]
            .iter()
            .take_while(|position| **position < to)
            .filter(|position| self.is_live(**position))
            .take(limit)
            .copied()
            .collect()
    }

    /// Positions of `stream`'s live checkpoint entries.
    pub fn checkpoints(&self, stream: StreamId) -> Vec<Position> {
        let Some(index) = self.streams.get(&stream) else { return Vec::new() };
        index.checkpoints.iter().copied().filter(|position| self.is_live(*position)).collect()
    }

    pub fn is_live(&self, position: Position) -> bool {
        self.segment_for(position).and_then(|segment| segment.slot(position)).is_some_and(|slot| slot & DELETED == 0)
    }

    /// Deletes entries in place. Returns the bytes freed. Positions already
    /// deleted or never written are ignored (replay makes this idempotent).
    pub fn delete(&mut self, positions: &[Position]) -> Result<u64, StoreError> {
        self.check_failed()?;
        let mut sorted: Vec<Position> = positions.iter().copied().filter(|p| *p < self.next_position).collect();
        sorted.sort_unstable();
        sorted.dedup();
        let mut freed = 0u64;
        let mut emptied = Vec::new();
        let mut touched_streams: Vec<(StreamId, bool)> = Vec::new();
        let mut index = 0;
        while index < sorted.len() {
            let Some(first) = self.segments.range(..=sorted[index]).next_back().map(|(first, _)| *first) else {
                index += 1;
                continue;
            };
            // All positions of this batch that fall in this segment.
            let segment_last = self.segments.range(first + 1..).next().map(|(next, _)| *next).unwrap_or(u64::MAX);
            // (start offset, end offset, first slot, slot after the last).
            let mut ranges: Vec<(u64, u64, usize, usize)> = Vec::new();
            while index < sorted.len() && sorted[index] < segment_last {
                let position = sorted[index];
                index += 1;
                let segment = self.segments.get(&first).expect("found above");
                let Some(slot) = segment.slot(position) else {
                    continue;
                };
                if slot & DELETED != 0 {
                    continue;
                }
                let slot_index = (position - first) as usize;
                let (streams, kind, record_len) = segment.read_header(slot_index)?;
                let start = (slot & !DELETED) as u64;
                let end = start + record_len;
                for stream in &streams {
                    touched_streams.push((*stream, kind == EntryKind::Checkpoint));
                }
                let segment = self.segments.get_mut(&first).expect("found above");
                segment.offsets[slot_index] |= DELETED;
                segment.live_entries -= 1;
                match ranges.last_mut() {
                    Some(last) if last.1 == start => {
                        last.1 = end;
                        last.3 = slot_index + 1;
                    }
                    _ => ranges.push((start, end, slot_index, slot_index + 1)),
                }
                freed += end - start;
                self.live_entries -= 1;
                self.deleted_entries += 1;
            }
            let segment = self.segments.get(&first).expect("found above");
            let is_active = self.segments.last_key_value().map(|(key, _)| *key) == Some(first);
            if segment.live_entries == 0 && !is_active {
                emptied.push(first);
                continue;
            }
            let file = segment.file.clone();
            for (start, end, first_slot, end_slot) in ranges {
                let (start, end) = segment.widen_dead_range(start, end, first_slot, end_slot);
                if let Err(error) = file.punch_hole(start, end - start) {
                    return self.fail(error);
                }
            }
            self.dirty.insert(first);
        }
        for (stream, _) in &touched_streams {
            if let Some(index) = self.streams.get_mut(stream) {
                index.live -= 1;
            }
        }
        self.live_bytes -= freed;
        for first in emptied {
            // Positions of a removed segment read as trimmed: the lookup
            // lands in the previous segment, past its slots.
            let path = Segment::path(&self.dir, first);
            if let Err(error) = self.fs.remove_file(&path) {
                return self.fail(error);
            }
            self.segments.remove(&first);
            self.dirty.remove(&first);
        }
        self.compact_stream_indexes(&touched_streams);
        Ok(freed)
    }

    fn compact_stream_indexes(&mut self, touched: &[(StreamId, bool)]) {
        let mut streams: Vec<StreamId> = touched.iter().map(|(stream, _)| *stream).collect();
        streams.sort_unstable();
        streams.dedup();
        for stream in streams {
            let Some(index) = self.streams.get(&stream) else {
                continue;
            };
            // Rebuild when most of the index is dead, so scans stay
            // proportional to live entries; amortised O(1) per deletion.
            if index.positions.len() >= 64 && index.live * 2 < index.positions.len() {
                let positions: Vec<Position> =
                    index.positions.iter().copied().filter(|position| self.is_live(*position)).collect();
                let checkpoints: Vec<Position> =
                    index.checkpoints.iter().copied().filter(|position| self.is_live(*position)).collect();
                let index = self.streams.get_mut(&stream).expect("looked up above");
                index.positions = positions;
                index.checkpoints = checkpoints;
                if index.positions.is_empty() {
                    self.streams.remove(&stream);
                }
            }
        }
    }

    /// Makes everything so far durable and says where that is.
    pub fn sync(&mut self) -> Result<StoreCheckpoint, StoreError> {
        let pending = self.prepare_sync()?;
        match pending.run() {
            Ok(checkpoint) => Ok(checkpoint),
            Err(error) => self.fail(error),
        }
    }

    /// Notes where the store stands and which files need syncing, so the
    /// slow part ([`PendingSync::run`]) can run without holding up readers.
    /// Writes after this call may or may not be covered by the sync; the
    /// checkpoint it returns says what is.
    pub fn prepare_sync(&mut self) -> Result<PendingSync, StoreError> {
        self.check_failed()?;
        let dirty: Vec<Position> = std::mem::take(&mut self.dirty).into_iter().collect();
        let files =
            dirty.iter().filter_map(|first| self.segments.get(first)).map(|segment| segment.file.clone()).collect();
        Ok(PendingSync {
            files,
            fs: self.fs.clone(),
            dir: self.dir.clone(),
            checkpoint: StoreCheckpoint {
                next_position: self.next_position,
                segments: self.segments.values().map(|segment| (segment.first_position, segment.end)).collect(),
            },
        })
    }

    /// Latches the store failed after an I/O error outside it (a sync run
    /// without the lock).
    pub fn latch_failed(&mut self, error: io::Error) -> StoreError {
        match self.fail::<()>(error) {
            Err(error) => error,
            Ok(()) => unreachable!("fail always returns an error"),
        }
    }

    /// Deletes every entry and file, for installing a snapshot.
    pub fn clear(&mut self, next_position: Position) -> Result<(), StoreError> {
        self.check_failed()?;
        for segment in self.segments.values() {
            self.fs.remove_file(&Segment::path(&self.dir, segment.first_position))?;
        }
        self.fs.sync_dir(&self.dir)?;
        self.segments.clear();
        self.streams.clear();
        self.dirty.clear();
        self.live_entries = 0;
        self.live_bytes = 0;
        self.deleted_entries = next_position;
        self.next_position = next_position;
        Ok(())
    }

    /// Installs one entry received in a snapshot, after [`EntryStore::clear`].
    /// Entries must come in increasing position order below the tail;
    /// positions skipped read as trimmed.
    pub fn install(&mut self, entry: &Entry) -> Result<(), StoreError> {
        self.check_failed()?;
        if entry.position >= self.next_position {
            return Err(StoreError::Invalid(format!(
                "snapshot entry {} is past the tail {}",
                entry.position, self.next_position
            )));
        }
        let record = Record { streams: entry.streams.clone(), kind: entry.kind, payload: entry.payload.clone() };
        let size = record_size(&record) as u64;
        let needs_segment = match self.segments.last_key_value() {
            None => true,
            Some((_, segment)) => {
                if segment.first_position + segment.offsets.len() as u64 > entry.position {
                    return Err(StoreError::Invalid(format!("snapshot entry {} out of order", entry.position)));
                }
                segment.end + size > self.segment_size_max
            }
        };
        if needs_segment {
            self.start_segment(entry.position)?;
        }
        let (first, segment) = self.segments.iter_mut().next_back().expect("segment exists");
        let first = *first;
        while segment.first_position + (segment.offsets.len() as u64) < entry.position {
            segment.offsets.push(segment.end as u32 | DELETED);
        }
        let mut buffer = BytesMut::new();
        encode_record(&mut buffer, entry.position, &record);
        let offset = segment.end;
        let file = segment.file.clone();
        if let Err(error) = file.write_at(&buffer, offset) {
            return self.fail(error);
        }
        let segment = self.segments.get_mut(&first).expect("segment exists");
        segment.offsets.push(offset as u32);
        segment.end += buffer.len() as u64;
        segment.live_entries += 1;
        self.dirty.insert(first);
        self.index_streams(entry);
        self.live_entries += 1;
        self.live_bytes += size;
        self.deleted_entries -= 1;
        Ok(())
    }

    /// Finishes installing a snapshot: positions after the last installed
    /// entry, up to the tail, read as trimmed.
    pub fn finish_install(&mut self) {
        self.finish_loading();
    }

    pub fn stats(&self) -> StoreStats {
        let disk_bytes = self.segments.values().map(|segment| segment.file.allocated_bytes().unwrap_or(0)).sum();
        StoreStats {
            next_position: self.next_position,
            live_entries: self.live_entries,
            live_bytes: self.live_bytes,
            deleted_entries: self.deleted_entries,
            segments: self.segments.len() as u64,
            disk_bytes,
        }
    }

    /// Live entries with positions below `upto`, in position order, starting
    /// at `from`; at most `limit_bytes` of records (at least one entry).
    pub fn live_entries_from(
        &self,
        from: Position,
        upto: Position,
        limit_bytes: usize,
    ) -> Result<(Vec<Entry>, Position), StoreError> {
        let mut entries = Vec::new();
        let mut bytes = 0usize;
        let mut position = from;
        while position < upto.min(self.next_position) {
            let Some(segment) = self.segment_for(position) else {
                // Before the first segment: jump to it.
                match self.segments.range(position..).next() {
                    Some((first, _)) => {
                        position = *first;
                        continue;
                    }
                    None => {
                        position = upto;
                        break;
                    }
                }
            };
            let Some(slot) = segment.slot(position) else {
                match self.segments.range(position + 1..).next() {
                    Some((first, _)) => position = *first,
                    None => position = upto,
                }
                continue;
            };
            if slot & DELETED == 0 {
                if let crate::types::ReadOutcome::Entry(entry) = self.read(position)? {
                    bytes += entry.payload.len() + RECORD_HEADER_SIZE;
                    entries.push(entry);
                }
            }
            position += 1;
            if bytes >= limit_bytes {
                break;
            }
        }
        Ok((entries, position.min(upto)))
    }
}

/// Opens a store and finishes loading (the public entry point).
pub fn open(fs: Arc<dyn Fs>, dir: &Path, checkpoint: Option<&StoreCheckpoint>) -> Result<EntryStore, StoreError> {
    open_with_segment_size(fs, dir, checkpoint, SEGMENT_SIZE_MAX)
}

/// As [`open`], with a smaller segment size (tests use it to exercise
/// rollover and segment removal).
pub fn open_with_segment_size(
    fs: Arc<dyn Fs>,
    dir: &Path,
    checkpoint: Option<&StoreCheckpoint>,
    segment_size_max: u64,
) -> Result<EntryStore, StoreError> {
    let mut store = EntryStore::open(fs, dir, checkpoint)?;
    store.segment_size_max = segment_size_max.clamp(4096, SEGMENT_SIZE_MAX);
    store.finish_loading();
    Ok(store)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use fsio::SimFs;
    use proptest::prelude::*;

    use super::*;
    use crate::types::ReadOutcome;

    const STREAM_A: StreamId = StreamId(1);
    const STREAM_B: StreamId = StreamId(2);

    fn dir() -> PathBuf {
        PathBuf::from("/log/entries")
    }

    fn record(stream: StreamId, value: u64, size: usize) -> Record {
        let mut payload = value.to_le_bytes().to_vec();
        payload.resize(size.max(8), (value % 251) as u8);
        Record::data(stream, payload)
    }

    #[test]
    fn positions_are_stable_across_deletion_and_reopen() {
        let fs = SimFs::new(1);
        let mut store = open(Arc::new(fs.clone()), &dir(), None).unwrap();
        let records: Vec<Record> = (0..100).map(|value| record(STREAM_A, value, 100)).collect();
        assert_eq!(store.append(&records).unwrap(), 0);
        store.delete(&[3, 4, 5, 50, 99]).unwrap();
        let checkpoint = store.sync().unwrap();
        drop(store);
        fs.crash(false);
        let store = open(Arc::new(fs), &dir(), Some(&checkpoint)).unwrap();
        for position in 0..100u64 {
            let outcome = store.read(position).unwrap();
            if [3, 4, 5, 50, 99].contains(&position) {
                assert_eq!(outcome, ReadOutcome::Trimmed, "position {position}");
            } else {
                let ReadOutcome::Entry(entry) = outcome else { panic!("position {position}: {outcome:?}") };
                assert_eq!(entry.payload[..8], position.to_le_bytes());
            }
        }
        assert_eq!(store.read(100).unwrap(), ReadOutcome::NotWritten);
        assert_eq!(store.stats().live_entries, 95);
        assert_eq!(store.stream_positions(STREAM_A, 0, 10, 100), vec![0, 1, 2, 6, 7, 8, 9]);
    }

    #[test]
    fn writes_after_the_checkpoint_are_cut_off_on_open() {
        let fs = SimFs::new(2);
        let mut store = open(Arc::new(fs.clone()), &dir(), None).unwrap();
        store.append(&[record(STREAM_A, 0, 10), record(STREAM_A, 1, 10)]).unwrap();
        let checkpoint = store.sync().unwrap();
        store.append(&[record(STREAM_A, 2, 10)]).unwrap();
        store.sync().unwrap();
        drop(store);
        let store = open(Arc::new(fs), &dir(), Some(&checkpoint)).unwrap();
        assert_eq!(store.next_position(), 2);
        assert_eq!(store.read(2).unwrap(), ReadOutcome::NotWritten);
    }

    #[test]
    fn emptied_segments_are_removed_and_space_returns() {
        let fs = SimFs::new(3);
        let mut store = open_with_segment_size(Arc::new(fs.clone()), &dir(), None, 64 * 1024).unwrap();
        let records: Vec<Record> = (0..2000).map(|value| record(STREAM_A, value, 200)).collect();
        store.append(&records).unwrap();
        let before = store.stats();
        assert!(before.segments > 4, "{before:?}");
        let doomed: Vec<Position> = (0..1990).collect();
        store.delete(&doomed).unwrap();
        let after = store.stats();
        assert_eq!(after.live_entries, 10);
        assert!(after.segments <= 2, "{after:?}");
        assert!(after.disk_bytes * 20 < before.disk_bytes, "before {before:?} after {after:?}");
        let checkpoint = store.sync().unwrap();
        drop(store);
        fs.crash(false);
        let mut store = open_with_segment_size(Arc::new(fs), &dir(), Some(&checkpoint), 64 * 1024).unwrap();
        assert_eq!(store.read(5).unwrap(), ReadOutcome::Trimmed);
        assert!(matches!(store.read(1995).unwrap(), ReadOutcome::Entry(_)));
        // Appending continues at the tail.
        assert_eq!(store.append(&[record(STREAM_B, 7, 10)]).unwrap(), 2000);
        assert_eq!(store.stream_positions(STREAM_B, 0, u64::MAX, 10), vec![2000]);
    }

    #[test]
    fn only_canonical_records_decode() {
        // Found by the log_record fuzz target: a valid checksum over a
        // non-zero reserved byte. It must not decode.
        let input: [u8; 32] =
            [84, 83, 69, 78, 50, 83, 51, 181, 0, 0, 0, 0, 0, 1, 7, 0, 0, 0, 0, 0, 32, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 84];
        assert!(decode_record(&input).is_none());
        let mut encoded = BytesMut::new();
        encode_record(&mut encoded, 3, &Record::data(STREAM_A, vec![1, 2, 3, 4, 5]));
        assert_eq!(encoded.len(), 48, "32 header + 8 stream + 5 payload, padded to 48");
        assert!(decode_record(&encoded).is_some());
        encoded[47] = 1; // a padding byte, outside the checksum
        assert!(decode_record(&encoded).is_none());
    }

    #[test]
    fn corruption_is_detected_on_read() {
        let fs = SimFs::new(4);
        let mut store = open(Arc::new(fs.clone()), &dir(), None).unwrap();
        store.append(&[record(STREAM_A, 0, 64)]).unwrap();
        let file = Fs::open(&fs, &dir().join(format!("{:020}.seg", 0)), false).unwrap();
        file.write_at(b"X", 40).unwrap();
        assert!(matches!(store.read(0), Err(StoreError::Corrupt { position: 0, .. })));
    }

    #[test]
    fn snapshot_install_keeps_positions() {
        let fs = SimFs::new(5);
        let mut source = open(Arc::new(fs.clone()), &dir(), None).unwrap();
        let records: Vec<Record> = (0..50).map(|value| record(STREAM_A, value, 30)).collect();
        source.append(&records).unwrap();
        source.delete(&(10..40).collect::<Vec<_>>()).unwrap();
        let (entries, next) = source.live_entries_from(0, 50, usize::MAX).unwrap();
        assert_eq!(next, 50);
        assert_eq!(entries.len(), 20);
        let other = SimFs::new(6);
        let mut target = open(Arc::new(other), &dir(), None).unwrap();
        target.clear(50).unwrap();
        for entry in &entries {
            target.install(entry).unwrap();
        }
        target.finish_install();
        for position in 0..50 {
            assert_eq!(target.read(position).unwrap(), source.read(position).unwrap());
        }
        assert_eq!(target.append(&[record(STREAM_A, 50, 30)]).unwrap(), 50);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Append(Vec<(bool, u16)>),
        Delete(Vec<u16>),
        Checkpoint,
        CrashAndReopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => proptest::collection::vec((any::<bool>(), 0u16..600), 1..20).prop_map(Op::Append),
            3 => proptest::collection::vec(any::<u16>(), 1..20).prop_map(Op::Delete),
            1 => Just(Op::Checkpoint),
            1 => Just(Op::CrashAndReopen),
        ]
    }

    /// Applies one mutating op to both the store and the model.
    fn apply(store: &mut EntryStore, model: &mut BTreeMap<Position, Record>, next: &mut Position, op: &Op) {
        match op {
            Op::Append(items) => {
                let records: Vec<Record> = items
                    .iter()
                    .map(|(in_b, size)| record(if *in_b { STREAM_B } else { STREAM_A }, *next, *size as usize))
                    .collect();
                assert_eq!(store.append(&records).unwrap(), *next);
                for record in records {
                    model.insert(*next, record);
                    *next += 1;
                }
            }
            Op::Delete(picks) => {
                if *next == 0 {
                    return;
                }
                let positions: Vec<Position> = picks.iter().map(|pick| *pick as u64 % *next).collect();
                store.delete(&positions).unwrap();
                for position in positions {
                    model.remove(&position);
                }
            }
            _ => unreachable!("only mutating ops are replayed"),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// The store behaves like a map from position to record, across
        /// crashes that lose everything after the last checkpoint followed by
        /// a replay of the operations since (what Raft does).
        #[test]
        fn matches_a_model_across_crashes(ops in proptest::collection::vec(op(), 1..60), seed in any::<u64>()) {
            let fs = SimFs::new(seed);
            let mut store = open_with_segment_size(Arc::new(fs.clone()), &dir(), None, 8192).unwrap();
            let mut model = BTreeMap::new();
            let mut next = 0u64;
            let mut checkpoint: Option<StoreCheckpoint> = None;
            let mut since_checkpoint: Vec<Op> = Vec::new();
            for op in &ops {
                match op {
                    Op::Checkpoint => {
                        checkpoint = Some(store.sync().unwrap());
                        since_checkpoint.clear();
                    }
                    Op::CrashAndReopen => {
                        drop(store);
                        fs.crash(true);
                        store = open_with_segment_size(Arc::new(fs.clone()), &dir(), checkpoint.as_ref(), 8192).unwrap();
                        // Replay onto a model rebuilt the same way.
                        let replay = std::mem::take(&mut since_checkpoint);
                        next = store.next_position();
                        let mut replay_model: BTreeMap<Position, Record> = BTreeMap::new();
                        for position in 0..next {
                            if let ReadOutcome::Entry(entry) = store.read(position).unwrap() {
                                replay_model.insert(position, Record { streams: entry.streams, kind: entry.kind, payload: entry.payload });
                            }
                        }
                        for op in &replay {
                            apply(&mut store, &mut replay_model, &mut next, op);
                        }
                        since_checkpoint = replay;
                        prop_assert_eq!(&replay_model, &model, "replay after crash diverged");
                    }
                    mutating => {
                        apply(&mut store, &mut model, &mut next, mutating);
                        since_checkpoint.push(mutating.clone());
                    }
                }
                for position in 0..next {
                    let expected = match model.get(&position) {
                        Some(record) => ReadOutcome::Entry(Entry { position, streams: record.streams.clone(), kind: record.kind, payload: record.payload.clone() }),
                        None => ReadOutcome::Trimmed,
                    };
                    prop_assert_eq!(store.read(position).unwrap(), expected);
                }
                let stats = store.stats();
                prop_assert_eq!(stats.live_entries, model.len() as u64);
                let live_bytes: u64 = model.values().map(|record| record_size(record) as u64).sum();
                prop_assert_eq!(stats.live_bytes, live_bytes);
                let in_a: Vec<Position> = model.iter().filter(|(_, r)| r.streams == vec![STREAM_A]).map(|(p, _)| *p).collect();
                prop_assert_eq!(store.stream_positions(STREAM_A, 0, u64::MAX, usize::MAX), in_a);
            }
        }
    }
}
