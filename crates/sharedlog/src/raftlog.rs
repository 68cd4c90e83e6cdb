//! The Raft log on disk: segment files of checksummed records, group commit.
//!
//! The Raft log is a transport for commands (the shared log proper is the
//! entry store). openraft requires that an appended entry be durable before
//! its callback fires; a dedicated writer thread does the writes and one
//! `fdatasync` for everything queued, then fires all the callbacks: group
//! commit. In the simulator the same work runs inline, so it is
//! deterministic. Record format: `docs/format/sharedlog.md`.
//!
//! **Invariant:** the log is contiguous from the last purged index to the
//! last index; a torn record can only be at the tail of the last segment
//! and is cut off on open.

// openraft's `StorageError` is large; these helpers return it because the
// storage traits they serve do.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io;
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};

use bytes::{BufMut, BytesMut};
use fsio::{File, Fs};
use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{LogState, RaftLogReader, StorageIOError};

use crate::raft::{LogId, RaftEntry, StorageError, TypeConfig, Vote};

const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"TSRL");
const RECORD_HEADER_SIZE: usize = 16;
/// Segments roll over at this size.
const SEGMENT_SIZE_MAX: u64 = 64 * 1024 * 1024;
/// Decoded entries kept in memory for replication; older ones are re-read.
const CACHE_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Operations the writer drains into one group commit.
const GROUP_COMMIT_OPS_MAX: usize = 4096;

/// Whether disk work runs on a writer thread or inline (simulation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoMode {
    Thread,
    Inline,
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    log_id: LogId,
    segment: u64,
    offset: u64,
    len: u32,
}

struct Segment {
    file: Arc<dyn File>,
    end: u64,
}

struct State {
    slots: BTreeMap<u64, Slot>,
    cache: BTreeMap<u64, RaftEntry>,
    cache_bytes: usize,
    segments: BTreeMap<u64, Segment>,
    purged: Option<LogId>,
    vote: Option<Vote>,
    committed: Option<LogId>,
    /// Highest index whose record is known to be written and synced.
    durable_index: Option<u64>,
    /// Bumped by every truncate, so a write queued before it cannot mark
    /// entries appended after it durable.
    generation: u64,
}

enum Op {
    Write {
        file: Arc<dyn File>,
        offset: u64,
        bytes: BytesMut,
        new_segment: bool,
        last_index: u64,
        generation: u64,
        callback: Option<LogFlushed<TypeConfig>>,
    },
    Run {
        work: Box<dyn FnOnce() -> io::Result<()> + Send>,
        reply: Option<tokio::sync::oneshot::Sender<io::Result<()>>>,
    },
    /// The committed-index hint: written after the batch's sync, in place.
    SaveCommitted { bytes: Vec<u8> },
}

/// The committed hint is a fixed-size record written in place: no rename
/// (on ext4 a rename over a file forces writeback), no sync (a torn hint is
/// detected by its checksum and ignored).
const COMMITTED_RECORD_SIZE: usize = 64;

struct Shared {
    fs: Arc<dyn Fs>,
    dir: PathBuf,
    segment_size_max: u64,
    state: Mutex<State>,
    /// Set once at open in thread mode; unset means inline I/O.
    writer: std::sync::OnceLock<Mutex<mpsc::Sender<Op>>>,
    failed: Mutex<Option<String>>,
}

/// The Raft log store. Clones share state; a clone is also the log reader.
#[derive(Clone)]
pub struct RaftLogStore {
    shared: Arc<Shared>,
}

fn io_error(error: impl std::fmt::Display) -> io::Error {
    io::Error::other(error.to_string())
}

fn read_error(error: impl std::fmt::Display) -> StorageError {
    StorageIOError::read_logs(openraft::AnyError::error(error.to_string())).into()
}

fn write_error(error: impl std::fmt::Display) -> StorageError {
    StorageIOError::write_logs(openraft::AnyError::error(error.to_string())).into()
}

fn segment_path(dir: &Path, first_index: u64) -> PathBuf {
    dir.join(format!("{first_index:020}.log"))
}

fn encode_entry(entry: &RaftEntry) -> BytesMut {
    let payload = postcard::to_stdvec(entry).expect("postcard encoding to a Vec cannot fail");
    let mut out = BytesMut::with_capacity(RECORD_HEADER_SIZE + payload.len());
    out.put_u32_le(RECORD_MAGIC);
    out.put_u32_le(payload.len() as u32);
    out.put_u32_le(crc32c::crc32c(&payload));
    out.put_u32_le(0);
    out.put_slice(&payload);
    out
}

/// Decodes the record at the start of `bytes`: the entry and the record length.
fn decode_entry(bytes: &[u8]) -> Option<(RaftEntry, usize)> {
    if bytes.len() < RECORD_HEADER_SIZE {
        return None;
    }
    let u32_at = |offset: usize| u32::from_le_bytes(bytes[offset..offset + 4].try_into().expect("4 bytes"));
    if u32_at(0) != RECORD_MAGIC {
        return None;
    }
    let len = u32_at(4) as usize;
    let end = RECORD_HEADER_SIZE.checked_add(len)?;
    if bytes.len() < end || crc32c::crc32c(&bytes[RECORD_HEADER_SIZE..end]) != u32_at(8) {
        return None;
    }
    let entry = postcard::from_bytes(&bytes[RECORD_HEADER_SIZE..end]).ok()?;
    Some((entry, end))
}

/// Runs a batch of writer operations: writes, one sync per touched file,
/// then the callbacks. `Run` operations are barriers: everything before them
/// is made durable first.
fn execute(fs: &dyn Fs, dir: &Path, ops: Vec<Op>, failed: &Mutex<Option<String>>, shared_state: &Mutex<State>) {
    let mut touched: Vec<Arc<dyn File>> = Vec::new();
    let mut callbacks: Vec<LogFlushed<TypeConfig>> = Vec::new();
    let mut new_segment = false;
    let mut durable_index = None;
    let mut error: Option<String> = failed.lock().expect("failed lock").clone();
    let mut committed: Option<Vec<u8>> = None;

    let flush = |touched: &mut Vec<Arc<dyn File>>,
                 callbacks: &mut Vec<LogFlushed<TypeConfig>>,
                 new_segment: &mut bool,
                 durable_index: &mut Option<(u64, u64)>,
                 error: &mut Option<String>| {
        if error.is_none() && !touched.is_empty() {
            let started = std::time::Instant::now();
            for file in touched.iter() {
                if let Err(sync_error) = file.sync_data() {
                    *error = Some(format!("fdatasync of the Raft log failed: {sync_error}"));
                    break;
                }
            }
            metrics::histogram!("sharedlog_raft_log_sync_seconds").record(started.elapsed().as_secs_f64());
            metrics::histogram!("sharedlog_raft_log_sync_appends").record(callbacks.len() as f64);
            if error.is_none() && *new_segment {
                if let Err(sync_error) = fs.sync_dir(dir) {
                    *error = Some(format!("syncing the Raft log directory failed: {sync_error}"));
                }
            }
        }
        touched.clear();
        *new_segment = false;
        if error.is_none() {
            if let Some((index, generation)) = durable_index.take() {
                let mut state = shared_state.lock().expect("state lock poisoned");
                if state.generation == generation {
                    state.durable_index = Some(state.durable_index.map_or(index, |old: u64| old.max(index)));
                }
            }
        }
        for callback in callbacks.drain(..) {
            match error {
                None => callback.log_io_completed(Ok(())),
                Some(reason) => callback.log_io_completed(Err(io_error(reason))),
            }
        }
    };

    for op in ops {
        match op {
            Op::Write { file, offset, bytes, new_segment: created, last_index, generation, callback } => {
                if error.is_none() {
                    if let Err(write_error) = file.write_at(&bytes, offset) {
                        error = Some(format!("writing the Raft log failed: {write_error}"));
                    }
                }
                if !touched.iter().any(|known| Arc::ptr_eq(known, &file)) {
                    touched.push(file);
                }
                new_segment |= created;
                durable_index = Some((last_index, generation));
                callbacks.extend(callback);
            }
            Op::SaveCommitted { bytes } => committed = Some(bytes),
            Op::Run { work, reply } => {
                flush(&mut touched, &mut callbacks, &mut new_segment, &mut durable_index, &mut error);
                let result = match &error {
                    Some(reason) => Err(io_error(reason)),
                    None => work(),
                };
                if let Err(run_error) = &result {
                    error.get_or_insert_with(|| run_error.to_string());
                }
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
            }
        }
    }
    flush(&mut touched, &mut callbacks, &mut new_segment, &mut durable_index, &mut error);
    if let (Some(bytes), None) = (committed, &error) {
        // After the flush: the hint never names an entry that is not durable.
        let path = dir.join("committed");
        if let Err(write_error) = fs.open(&path, true).and_then(|file| file.write_at(&bytes, 0)) {
            tracing::warn!(%write_error, "could not write the committed-index hint");
        }
    }
    if let Some(reason) = error {
        let mut latched = failed.lock().expect("failed lock");
        if latched.is_none() {
            tracing::error!(%reason, "Raft log failed; refusing further writes");
            *latched = Some(reason);
        }
    }
}

impl RaftLogStore {
    /// Opens (or creates) the log in `dir`.
    pub fn open(fs: Arc<dyn Fs>, dir: &Path, io_mode: IoMode) -> io::Result<RaftLogStore> {
        Self::open_with_segment_size(fs, dir, io_mode, SEGMENT_SIZE_MAX)
    }

    /// As [`RaftLogStore::open`] with smaller segments (tests use it to
    /// exercise rollover).
    fn open_with_segment_size(
        fs: Arc<dyn Fs>,
        dir: &Path,
        io_mode: IoMode,
        segment_size_max: u64,
    ) -> io::Result<RaftLogStore> {
        fs.create_dir_all(dir)?;
        let purged: Option<LogId> = read_meta(&*fs, &dir.join("purged"))?;
        let vote: Option<Vote> = read_meta(&*fs, &dir.join("vote"))?;
        // `committed` is written without a sync (it is a hint that saves
        // re-applying after a restart), so a crash may leave it torn: then it
        // is ignored and the leader re-commits.
        let committed: Option<LogId> = match read_committed_record(&*fs, &dir.join("committed")) {
            Ok(committed) => committed,
            Err(error) => {
                tracing::warn!(%error, "ignoring a damaged committed-index hint");
                None
            }
        };
        let mut state = State {
            slots: BTreeMap::new(),
            cache: BTreeMap::new(),
            cache_bytes: 0,
            segments: BTreeMap::new(),
            purged,
            vote,
            committed,
            durable_index: None,
            generation: 0,
        };
        let names: Vec<String> = fs.list(dir)?.into_iter().filter(|name| name.ends_with(".log")).collect();
        let mut cut_after: Option<usize> = None;
        for (position, name) in names.iter().enumerate() {
            if cut_after.is_some() {
                // A group commit that spanned a rollover was torn in an
                // earlier segment: nothing here was acknowledged (callbacks
                // fire only after every touched file is synced).
                tracing::warn!(segment = %name, "removing a Raft log segment written after a torn record");
                fs.remove_file(&dir.join(name))?;
                continue;
            }
            let first_index: u64 = name
                .trim_end_matches(".log")
                .parse()
                .map_err(|_| io_error(format!("unexpected file {name} in the Raft log directory")))?;
            let file = fs.open(&dir.join(name), false)?;
            let mut bytes = vec![0u8; file.len()? as usize];
            file.read_exact_at(&mut bytes, 0)?;
            let mut offset = 0usize;
            while offset < bytes.len() {
                let Some((entry, len)) = decode_entry(&bytes[offset..]) else {
                    if (offset + 1..bytes.len()).any(|later| decode_entry(&bytes[later..]).is_some()) {
                        // A valid record after a bad one is not a torn write
                        // but damage to acknowledged data: refuse to guess.
                        return Err(io_error(format!("Raft log segment {name} is corrupt at offset {offset}")));
                    }
                    tracing::warn!(segment = %name, offset, dropped = bytes.len() - offset, "cutting a torn tail off the Raft log");
                    file.set_len(offset as u64)?;
                    file.sync_data()?;
                    cut_after = Some(position);
                    break;
                };
                let index = entry.log_id.index;
                if let Some((last, _)) = state.slots.last_key_value() {
                    if index != last + 1 {
                        return Err(io_error(format!("Raft log is not contiguous: {last} then {index} in {name}")));
                    }
                }
                if state.purged.is_none_or(|purged| index > purged.index) {
                    state.slots.insert(
                        index,
                        Slot { log_id: entry.log_id, segment: first_index, offset: offset as u64, len: len as u32 },
                    );
                }
                offset += len;
            }
            let end = offset.min(bytes.len()) as u64;
            state.segments.insert(first_index, Segment { file, end });
        }
        if cut_after.is_some() {
            fs.sync_dir(dir)?;
        }
        state.durable_index = state.slots.last_key_value().map(|(index, _)| *index);
        let shared = Arc::new(Shared {
            fs,
            dir: dir.to_path_buf(),
            segment_size_max,
            state: Mutex::new(state),
            writer: std::sync::OnceLock::new(),
            failed: Mutex::new(None),
        });
        if io_mode == IoMode::Thread {
            let sender = spawn_writer(Arc::downgrade(&shared))?;
            let _ = shared.writer.set(Mutex::new(sender));
        }
        Ok(RaftLogStore { shared })
    }

    fn submit(&self, ops: Vec<Op>) {
        match self.shared.writer.get() {
            Some(writer) => {
                let writer = writer.lock().expect("writer lock");
                for op in ops {
                    if writer.send(op).is_err() {
                        tracing::error!("Raft log writer thread is gone");
                    }
                }
            }
            None => execute(&*self.shared.fs, &self.shared.dir, ops, &self.shared.failed, &self.shared.state),
        }
    }

    /// Runs `work` after every write queued so far is durable.
    async fn barrier(&self, work: Box<dyn FnOnce() -> io::Result<()> + Send>) -> io::Result<()> {
        let (reply, done) = tokio::sync::oneshot::channel();
        self.submit(vec![Op::Run { work, reply: Some(reply) }]);
        done.await.map_err(|_| io_error("Raft log writer stopped"))?
    }

    fn check_failed(&self) -> Result<(), StorageError> {
        match &*self.shared.failed.lock().expect("failed lock") {
            Some(reason) => Err(write_error(reason)),
            None => Ok(()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().expect("state lock poisoned")
    }

    fn read_slot(&self, slot: &Slot, file: &Arc<dyn File>) -> Result<RaftEntry, StorageError> {
        let mut bytes = vec![0u8; slot.len as usize];
        file.read_exact_at(&mut bytes, slot.offset).map_err(read_error)?;
        match decode_entry(&bytes) {
            Some((entry, _)) if entry.log_id == slot.log_id => Ok(entry),
            _ => Err(read_error(format!("Raft log entry {} fails its checksum", slot.log_id.index))),
        }
    }

    fn evict_cache(state: &mut State) {
        while state.cache_bytes > CACHE_BYTES_MAX {
            let Some((&index, _)) = state.cache.first_key_value() else {
                break;
            };
            if state.durable_index.is_none_or(|durable| index > durable) {
                break;
            }
            let len = state.slots.get(&index).map(|slot| slot.len as usize).unwrap_or(0);
            state.cache.remove(&index);
            state.cache_bytes = state.cache_bytes.saturating_sub(len);
        }
    }
}

/// The writer thread: drains queued operations into one group commit. It
/// holds only a weak reference, so it exits once the store is dropped.
fn spawn_writer(shared: std::sync::Weak<Shared>) -> io::Result<mpsc::Sender<Op>> {
    let (sender, receiver) = mpsc::channel::<Op>();
    std::thread::Builder::new().name("raft-log-writer".into()).spawn(move || {
        while let Ok(first) = receiver.recv() {
            let mut ops = vec![first];
            while ops.len() < GROUP_COMMIT_OPS_MAX {
                match receiver.try_recv() {
                    Ok(op) => ops.push(op),
                    Err(_) => break,
                }
            }
            let Some(shared) = shared.upgrade() else {
                return;
            };
            execute(&*shared.fs, &shared.dir, ops, &shared.failed, &shared.state);
        }
    })?;
    Ok(sender)
}

fn read_meta<T: serde::de::DeserializeOwned>(fs: &dyn Fs, path: &Path) -> io::Result<Option<T>> {
    if !fs.exists(path) {
        return Ok(None);
    }
    let bytes = fs.read_file(path)?;
    if bytes.len() < 4 {
        return Err(io_error(format!("{} is truncated", path.display())));
    }
    let (body, checksum) = bytes.split_at(bytes.len() - 4);
    if crc32c::crc32c(body).to_le_bytes() != checksum {
        return Err(io_error(format!("{} fails its checksum", path.display())));
    }
    postcard::from_bytes::<T>(body).map(Some).map_err(|error| io_error(format!("{}: {error}", path.display())))
}

/// `[length u32][postcard][crc32c u32]`, zero-padded to a fixed size.
fn committed_record(committed: &Option<LogId>) -> Vec<u8> {
    let body = meta_bytes(committed);
    let mut record = Vec::with_capacity(COMMITTED_RECORD_SIZE);
    record.extend_from_slice(&(body.len() as u32).to_le_bytes());
    record.extend_from_slice(&body);
    assert!(record.len() <= COMMITTED_RECORD_SIZE, "a LogId always fits in the committed record");
    record.resize(COMMITTED_RECORD_SIZE, 0);
    record
}

fn read_committed_record(fs: &dyn Fs, path: &Path) -> io::Result<Option<LogId>> {
    if !fs.exists(path) {
        return Ok(None);
    }
    let bytes = fs.read_file(path)?;
    let length = bytes.get(..4).map(|raw| u32::from_le_bytes(raw.try_into().expect("4 bytes")) as usize).unwrap_or(0);
    let body = bytes.get(4..4 + length).ok_or_else(|| io_error("committed hint truncated"))?;
    let (payload, checksum) = body.split_at(body.len().saturating_sub(4));
    if body.len() < 4 || crc32c::crc32c(payload).to_le_bytes() != checksum {
        return Err(io_error("committed hint fails its checksum"));
    }
    let committed: Option<LogId> = postcard::from_bytes(payload).map_err(io_error)?;
    Ok(committed)
}

fn meta_bytes<T: serde::Serialize>(value: &T) -> Vec<u8> {
    let mut bytes = postcard::to_stdvec(value).expect("postcard encoding to a Vec cannot fail");
    let checksum = crc32c::crc32c(&bytes);
    bytes.extend_from_slice(&checksum.to_le_bytes());
    bytes
}

impl RaftLogReader<TypeConfig> for RaftLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<RaftEntry>, StorageError> {
        let mut entries = Vec::new();
        let state = self.lock();
        for (index, slot) in state.slots.range(range) {
            match state.cache.get(index) {
                Some(entry) => entries.push(entry.clone()),
                None => {
                    let segment = state.segments.get(&slot.segment).ok_or_else(|| read_error("segment missing"))?;
                    entries.push(self.read_slot(slot, &segment.file)?);
                }
            }
        }
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for RaftLogStore {
    type LogReader = RaftLogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let state = self.lock();
        let last = state.slots.last_key_value().map(|(_, slot)| slot.log_id).or(state.purged);
        Ok(LogState { last_purged_log_id: state.purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.check_failed()?;
        let bytes = meta_bytes(vote);
        let fs = self.shared.fs.clone();
        let path = self.shared.dir.join("vote");
        self.barrier(Box::new(move || fs.write_file_atomic(&path, &bytes))).await.map_err(|error| {
            StorageError::from(StorageIOError::write_vote(openraft::AnyError::error(error.to_string())))
        })?;
        self.lock().vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        Ok(self.lock().vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not synced: a lost `committed` only means re-applying from the
        // state machine's last checkpoint after the leader re-commits.
        self.lock().committed = committed;
        self.submit(vec![Op::SaveCommitted { bytes: committed_record(&committed) }]);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.lock().committed)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = RaftEntry> + Send,
        I::IntoIter: Send,
    {
        self.check_failed()?;
        let mut ops = Vec::new();
        {
            let mut state = self.lock();
            let mut pending: Option<(u64, BytesMut, u64, bool, u64)> = None; // segment, bytes, offset, new, last index
            for entry in entries {
                let record = encode_entry(&entry);
                let index = entry.log_id.index;
                let rollover = match state.segments.last_key_value() {
                    None => true,
                    Some((_, segment)) => {
                        segment.end + record.len() as u64 > self.shared.segment_size_max && segment.end > 0
                    }
                };
                if rollover {
                    if let Some((segment, bytes, offset, created, last_index)) = pending.take() {
                        let file = state.segments[&segment].file.clone();
                        ops.push(Op::Write {
                            file,
                            offset,
                            bytes,
                            new_segment: created,
                            last_index,
                            generation: state.generation,
                            callback: None,
                        });
                    }
                    let file =
                        self.shared.fs.open(&segment_path(&self.shared.dir, index), true).map_err(write_error)?;
                    state.segments.insert(index, Segment { file, end: 0 });
                }
                let (&segment_first, segment) = state.segments.iter_mut().next_back().expect("segment exists");
                let offset = segment.end;
                segment.end += record.len() as u64;
                match &mut pending {
                    Some((_, bytes, _, _, last_index)) => {
                        bytes.extend_from_slice(&record);
                        *last_index = index;
                    }
                    None => pending = Some((segment_first, record.clone(), offset, rollover, index)),
                }
                state.slots.insert(
                    index,
                    Slot { log_id: entry.log_id, segment: segment_first, offset, len: record.len() as u32 },
                );
                state.cache_bytes += record.len();
                state.cache.insert(index, entry);
            }
            match pending {
                Some((segment, bytes, offset, created, last_index)) => {
                    let file = state.segments[&segment].file.clone();
                    ops.push(Op::Write {
                        file,
                        offset,
                        bytes,
                        new_segment: created,
                        last_index,
                        generation: state.generation,
                        callback: Some(callback),
                    });
                }
                None => callback.log_io_completed(Ok(())),
            }
            Self::evict_cache(&mut state);
        }
        self.submit(ops);
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.check_failed()?;
        let mut work: Vec<Box<dyn FnOnce() -> io::Result<()> + Send>> = Vec::new();
        {
            let mut state = self.lock();
            let Some(first_removed) = state.slots.get(&log_id.index).copied() else {
                return Ok(());
            };
            let later: Vec<u64> = state.segments.range(first_removed.segment + 1..).map(|(first, _)| *first).collect();
            for first in later {
                let path = segment_path(&self.shared.dir, first);
                let fs = self.shared.fs.clone();
                work.push(Box::new(move || fs.remove_file(&path)));
                state.segments.remove(&first);
            }
            let segment = state.segments.get_mut(&first_removed.segment).expect("slot's segment exists");
            segment.end = first_removed.offset;
            let file = segment.file.clone();
            let len = first_removed.offset;
            work.push(Box::new(move || file.set_len(len).and_then(|_| file.sync_data())));
            let fs = self.shared.fs.clone();
            let dir = self.shared.dir.clone();
            work.push(Box::new(move || fs.sync_dir(&dir)));
            state.slots.split_off(&log_id.index);
            state.cache.split_off(&log_id.index);
            state.cache_bytes =
                state.cache.keys().filter_map(|index| state.slots.get(index)).map(|slot| slot.len as usize).sum();
            state.generation += 1;
            if state.durable_index.is_some_and(|durable| durable >= log_id.index) {
                state.durable_index = log_id.index.checked_sub(1);
            }
        }
        for step in work {
            self.barrier(step).await.map_err(write_error)?;
        }
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // openraft purges after a checkpoint is durable, or right after
        // handing over a received snapshot, which is then durable in its
        // spool file (the state machine redoes an unfinished install on
        // start), so the state machine is never behind a purged log.
        self.check_failed()?;
        let bytes = meta_bytes(&log_id);
        let fs = self.shared.fs.clone();
        let path = self.shared.dir.join("purged");
        // Record the purge point first, so a crash in between leaves files
        // whose entries are ignored, never a log that claims to have them.
        self.barrier(Box::new(move || fs.write_file_atomic(&path, &bytes))).await.map_err(write_error)?;
        let mut removals: Vec<PathBuf> = Vec::new();
        {
            let mut state = self.lock();
            state.purged = Some(log_id);
            let kept = state.slots.split_off(&(log_id.index + 1));
            state.slots = kept;
            let kept_cache = state.cache.split_off(&(log_id.index + 1));
            state.cache = kept_cache;
            state.cache_bytes =
                state.cache.keys().filter_map(|index| state.slots.get(index)).map(|slot| slot.len as usize).sum();
            // A segment is fully purged when the next one starts at or
            // below the first kept index. The last segment is kept for appends.
            let firsts: Vec<u64> = state.segments.keys().copied().collect();
            for pair in firsts.windows(2) {
                if pair[1] <= log_id.index + 1 {
                    state.segments.remove(&pair[0]);
                    removals.push(segment_path(&self.shared.dir, pair[0]));
                }
            }
        }
        if !removals.is_empty() {
            let fs = self.shared.fs.clone();
            let dir = self.shared.dir.clone();
            self.barrier(Box::new(move || {
                for path in removals {
                    fs.remove_file(&path)?;
                }
                fs.sync_dir(&dir)
            }))
            .await
            .map_err(write_error)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use fsio::SimFs;
    use openraft::storage::RaftLogStorageExt;
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;

    const DIR: &str = "/raft";

    fn entry(index: u64) -> RaftEntry {
        RaftEntry { log_id: LogId::new(CommittedLeaderId::new(1, 1), index), payload: EntryPayload::Blank }
    }

    fn open(fs: &SimFs) -> RaftLogStore {
        RaftLogStore::open_with_segment_size(Arc::new(fs.clone()), Path::new(DIR), IoMode::Inline, 256).unwrap()
    }

    async fn indexes(store: &mut RaftLogStore) -> Vec<u64> {
        store.try_get_log_entries(0..u64::MAX).await.unwrap().iter().map(|entry| entry.log_id.index).collect()
    }

    #[tokio::test]
    async fn survives_a_crash_with_rollover_truncate_and_purge() {
        let fs = SimFs::new(1);
        let mut store = open(&fs);
        store.blocking_append((1..=40).map(entry)).await.unwrap();
        assert!(
            fs.list(Path::new(DIR)).unwrap().iter().filter(|name| name.ends_with(".log")).count() > 3,
            "rolled over"
        );
        store.truncate(entry(31).log_id).await.unwrap();
        store.purge(entry(10).log_id).await.unwrap();
        store.save_vote(&Vote::new(3, 2)).await.unwrap();
        drop(store);
        fs.crash(true);
        let mut store = open(&fs);
        assert_eq!(indexes(&mut store).await, (11..=30).collect::<Vec<_>>());
        let state = store.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id.map(|log_id| log_id.index), Some(10));
        assert_eq!(state.last_log_id.map(|log_id| log_id.index), Some(30));
        assert_eq!(store.read_vote().await.unwrap(), Some(Vote::new(3, 2)));
        store.blocking_append((31..=35).map(entry)).await.unwrap();
        assert_eq!(indexes(&mut store).await, (11..=35).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_torn_record_ends_the_log_even_before_a_later_segment() {
        let fs = SimFs::new(2);
        let mut store = open(&fs);
        store.blocking_append((1..=20).map(entry)).await.unwrap();
        drop(store);
        // Tear the last record of the first segment, as a crash in a group
        // commit that spanned a rollover would; later segments then hold
        // nothing that was acknowledged.
        let names: Vec<String> =
            fs.list(Path::new(DIR)).unwrap().into_iter().filter(|name| name.ends_with(".log")).collect();
        let first = Fs::open(&fs, &Path::new(DIR).join(&names[0]), false).unwrap();
        let len = first.len().unwrap();
        first.set_len(len - 3).unwrap();
        first.sync_data().unwrap();
        let mut store = open(&fs);
        let kept = indexes(&mut store).await;
        assert!(!kept.is_empty() && kept.len() < 20, "{kept:?}");
        assert_eq!(kept, (1..=kept.len() as u64).collect::<Vec<_>>(), "contiguous from the start");
        let survivors = fs.list(Path::new(DIR)).unwrap().into_iter().filter(|name| name.ends_with(".log")).count();
        assert_eq!(survivors, 1, "segments after the tear are removed");
        // Damage that is followed by valid records is not a tear: refuse.
        let fs = SimFs::new(3);
        let mut store = open(&fs);
        store.blocking_append((1..=3).map(entry)).await.unwrap();
        drop(store);
        let names: Vec<String> =
            fs.list(Path::new(DIR)).unwrap().into_iter().filter(|name| name.ends_with(".log")).collect();
        let file = Fs::open(&fs, &Path::new(DIR).join(&names[0]), false).unwrap();
        file.write_at(&[0xff], 20).unwrap();
        file.sync_data().unwrap();
        let error = RaftLogStore::open_with_segment_size(Arc::new(fs.clone()), Path::new(DIR), IoMode::Inline, 256)
            .err()
            .unwrap();
        assert!(error.to_string().contains("corrupt"), "{error}");
    }
}
