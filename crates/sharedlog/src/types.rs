//! Vocabulary shared by the log's server, client and SMR runtime.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// A global position in the log. Positions start at 0 and are dense: every
/// position below the tail was assigned to exactly one entry, which may since
/// have been collected (then it reads as [`ReadOutcome::Trimmed`]).
pub type Position = u64;

/// A stream is a named subsequence of the log; an entry may belong to several.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct StreamId(pub u64);

impl StreamId {
    /// A stable id for a stream name (FNV-1a 64). Names keep configs and
    /// logs readable; ids keep records small.
    pub const fn from_name(name: &str) -> StreamId {
        let bytes = name.as_bytes();
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        let mut index = 0;
        while index < bytes.len() {
            hash ^= bytes[index] as u64;
            hash = hash.wrapping_mul(0x0100_0000_01b3);
            index += 1;
        }
        StreamId(hash)
    }
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Identifies one log client (an SMR runtime or an application handle) for
/// append deduplication and GC reporting.
pub type ClientId = u64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[repr(u8)]
pub enum EntryKind {
    /// An ordinary update.
    Data = 0,
    /// A serialized object state (SMR checkpoint).
    Checkpoint = 1,
}

impl EntryKind {
    pub fn from_u8(value: u8) -> Option<EntryKind> {
        match value {
            0 => Some(EntryKind::Data),
            1 => Some(EntryKind::Checkpoint),
            _ => None,
        }
    }
}

/// What a client asks to append.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub streams: Vec<StreamId>,
    pub kind: EntryKind,
    pub payload: Bytes,
}

impl Record {
    pub fn data(stream: StreamId, payload: impl Into<Bytes>) -> Record {
        Record { streams: vec![stream], kind: EntryKind::Data, payload: payload.into() }
    }
}

/// An entry as stored and read back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub position: Position,
    pub streams: Vec<StreamId>,
    pub kind: EntryKind,
    pub payload: Bytes,
}

/// The outcome of reading one position.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReadOutcome {
    Entry(Entry),
    /// The entry at this position was collected by garbage collection.
    Trimmed,
    /// Nothing has been written at this position yet.
    NotWritten,
}

/// A client's report that an entry is obsolete: its state is superseded by
/// the entry at `obsoleted_by` (equal to `position` for an entry that had no
/// effect at all).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Locator {
    pub position: Position,
    /// Every stream the entry belongs to. It carries them so that the log
    /// decides on the report alone, never on what a replica's disk holds:
    /// that keeps GC deterministic on replicas that crashed or installed a
    /// snapshot.
    pub streams: Vec<StreamId>,
    /// The streams whose reader reports it obsolete; it is deleted once all
    /// of `streams` have.
    pub obsolete_in: Vec<StreamId>,
    /// The entry's size on disk, for accounting.
    pub size_bytes: u32,
    pub obsoleted_by: Position,
}
