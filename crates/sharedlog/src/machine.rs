//! The replicated state machine: applies committed commands to the entry
//! store, runs append deduplication and in-place garbage collection, and
//! takes checkpoints (openraft "snapshots").
//!
//! Everything here is deterministic: every replica applies the same commands
//! in the same order and ends with the same entries, the same trimmed
//! positions and the same snapshot mark.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use fsio::Fs;
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{EntryPayload, RaftSnapshotBuilder, SnapshotMeta, StorageIOError, StoredMembership};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::raft::{
    AppendBatch, AppendRejected, Command, CommandResult, GcReport, LogId, Node, NodeId, RaftEntry, StorageError,
    TypeConfig,
};
use crate::store::{self, EntryStore, StoreCheckpoint, StoreError};
use crate::types::{ClientId, Entry, Position, StreamId};

/// Batch results remembered per client. A client's batch stays remembered
/// until the client says it has its answer (`first_unanswered`), so a batch
/// retried through a failover while the client's other batches move on is
/// still recognised; this bounds a client that never says so.
pub const SESSION_RESULTS_MAX: usize = 16_384;
/// Clients remembered for deduplication; the least recently active is
/// forgotten first.
pub const SESSIONS_MAX: usize = 4096;
/// Obsolete entries waiting for every reader to pass their obsoleter. A
/// report that finds this full is accepted only in part; the client keeps
/// the rest and sends it again.
pub const GC_PENDING_MAX: usize = 1_000_000;
/// Entries one GC command deletes at most, to bound one apply's work; the
/// rest go with the next report.
const GC_DELETIONS_PER_APPLY_MAX: usize = 200_000;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Session {
    /// Sequence → first position of the batch.
    recent: BTreeMap<u64, Position>,
    /// Every sequence below this has been answered to the client.
    answered_below: u64,
    last_active: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sessions {
    clients: BTreeMap<ClientId, Session>,
}

/// A registered GC client, as every replica sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcClient {
    pub name: String,
    /// Streams the client reads; empty means all.
    pub streams: Vec<StreamId>,
    /// Every entry of its streams below this has been processed.
    pub progress: Position,
    pub reports: u64,
}

impl GcClient {
    fn reads(&self, stream: StreamId) -> bool {
        self.streams.is_empty() || self.streams.contains(&stream)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Pending {
    /// All streams of the entry.
    streams: Vec<StreamId>,
    /// Streams that have not reported the entry obsolete yet.
    unreported: Vec<StreamId>,
    obsoleted_by: Position,
}

/// Garbage-collection state, replicated. It is a function of the applied
/// commands only (never of what a replica's disk holds), so every replica
/// deletes the same entries and reports the same snapshot mark.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GcState {
    pub clients: BTreeMap<ClientId, GcClient>,
    pending: BTreeMap<Position, Pending>,
    /// Per stream, its pending entries by (obsoleter, position): a stream's
    /// scan stops at its readers' horizon, so a stalled reader holds back
    /// only its own streams.
    by_stream: BTreeMap<StreamId, BTreeSet<(Position, Position)>>,
    /// Positions collected so far.
    deleted: roaring::RoaringTreemap,
    /// Snapshots (prefix reads) at versions below this are refused: some
    /// entry they would need has been deleted.
    pub snapshot_mark: Position,
    pub deleted_entries: u64,
}

impl GcState {
    pub fn pending_entries(&self) -> usize {
        self.pending.len()
    }

    fn forget_pending(&mut self, position: Position) -> Option<Pending> {
        let pending = self.pending.remove(&position)?;
        for stream in &pending.streams {
            if let Some(set) = self.by_stream.get_mut(stream) {
                set.remove(&(pending.obsoleted_by, position));
                if set.is_empty() {
                    self.by_stream.remove(stream);
                }
            }
        }
        Some(pending)
    }
}

/// What a checkpoint records besides the entries themselves.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MachineHeader {
    pub next_position: Position,
    pub gc: GcState,
    pub sessions: Sessions,
}

/// The durable checkpoint file. It names the entry-store directory it
/// belongs to: a snapshot is installed into a fresh directory and becomes
/// current only when this file is atomically replaced, so a crash at any
/// point leaves one complete, consistent state.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct CheckpointFile {
    version: u32,
    meta: SnapshotMeta<NodeId, Node>,
    entries_dir: String,
    store: StoreCheckpoint,
    header: MachineHeader,
}

const CHECKPOINT_VERSION: u32 = 2;
const ENTRIES_DIR_PREFIX: &str = "entries-";
const SPOOL_PREFIX: &str = "incoming-";

/// Everything the RPC handlers read.
pub struct Inner {
    pub store: EntryStore,
    pub gc: GcState,
    sessions: Sessions,
    last_applied: Option<LogId>,
    membership: StoredMembership<NodeId, Node>,
    checkpoint: Option<(SnapshotMeta<NodeId, Node>, MachineHeader)>,
    /// Generation of the entry-store directory (`entries-<generation>`).
    generation: u64,
}

/// State shared between the state machine (writer) and readers.
pub struct Shared {
    pub inner: RwLock<Inner>,
    /// The tail (next position), published after every applied batch.
    pub tail: watch::Sender<Position>,
    fs: Arc<dyn Fs>,
    dir: PathBuf,
    /// Serializes checkpoints and snapshot installs (each writes the
    /// checkpoint file; they must not interleave).
    checkpointing: std::sync::Mutex<()>,
    spool_counter: std::sync::atomic::AtomicU64,
    /// Snapshots installed from a leader since start.
    pub snapshots_installed: std::sync::atomic::AtomicU64,
}

impl Shared {
    pub fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().expect("state machine lock poisoned")
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().expect("state machine lock poisoned")
    }
}

/// Snapshot data as openraft carries it.
#[derive(Clone)]
pub enum SnapshotData {
    /// This replica's checkpoint; its entries are streamed from the entry
    /// store when it is sent.
    Local { shared: Arc<Shared>, header: MachineHeader },
    /// A snapshot received from the leader, spooled to a file.
    Received { path: PathBuf },
}

impl std::fmt::Debug for SnapshotData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SnapshotData::Local { header, .. } => {
                write!(f, "Local(next_position {})", header.next_position)
            }
            SnapshotData::Received { path } => write!(f, "Received({})", path.display()),
        }
    }
}

fn sm_error(error: impl std::fmt::Display) -> StorageError {
    StorageIOError::write_state_machine(openraft::AnyError::error(error.to_string())).into()
}

/// The state machine openraft drives.
pub struct StateMachine {
    shared: Arc<Shared>,
}

impl StateMachine {
    /// Opens the state machine stored in `dir`: its checkpoint file and the
    /// entry-store directory that file names. A complete snapshot spool
    /// newer than the checkpoint is an install a crash interrupted (openraft
    /// may already have purged its log up to it): it is installed now.
    /// Directories of other generations and other spools are removed.
    pub fn open(fs: Arc<dyn Fs>, dir: &Path) -> Result<StateMachine, StoreError> {
        fs.create_dir_all(dir)?;
        let mut checkpoint = read_checkpoint(&*fs, dir)?;
        let mut spools: Vec<String> = fs.list(dir)?.into_iter().filter(|name| name.starts_with(SPOOL_PREFIX)).collect();
        spools.sort();
        for name in spools {
            let path = dir.join(&name);
            let applied = checkpoint.as_ref().and_then(|file| file.meta.last_log_id).map(|log_id| log_id.index);
            let generation = checkpoint.as_ref().map(|file| generation_of(&file.entries_dir)).transpose()?.unwrap_or(0);
            match spooled_meta(&*fs, &path) {
                Ok(meta) if meta.last_log_id.map(|log_id| log_id.index) > applied => {
                    tracing::info!(snapshot = %meta.snapshot_id, "finishing a snapshot install a crash interrupted");
                    match install_from_spool(&fs, dir, generation, &meta, &path) {
                        Ok(_) => checkpoint = read_checkpoint(&*fs, dir)?,
                        // Incomplete: the crash came while it was still
                        // arriving, before openraft heard of it (it is handed
                        // over only once whole and synced), so nothing was
                        // purged on its account.
                        Err(StoreError::Invalid(reason)) => {
                            tracing::warn!(%reason, "discarding a partly received snapshot");
                            fs.remove_file(&path)?;
                        }
                        Err(error) => return Err(error),
                    }
                }
                _ => fs.remove_file(&path)?,
            }
        }
        let entries_dir = checkpoint
            .as_ref()
            .map(|file| file.entries_dir.clone())
            .unwrap_or_else(|| format!("{ENTRIES_DIR_PREFIX}0"));
        let generation = generation_of(&entries_dir)?;
        for name in fs.list(dir)? {
            if name.starts_with(ENTRIES_DIR_PREFIX) && name != entries_dir {
                tracing::info!(directory = %name, "removing an entry-store directory of another generation");
                fs.remove_dir_all(&dir.join(&name))?;
            }
        }
        let store = store::open(fs.clone(), &dir.join(&entries_dir), checkpoint.as_ref().map(|file| &file.store))?;
        let inner = match checkpoint {
            Some(file) => Inner {
                store,
                gc: file.header.gc.clone(),
                sessions: file.header.sessions.clone(),
                last_applied: file.meta.last_log_id,
                membership: file.meta.last_membership.clone(),
                checkpoint: Some((file.meta, file.header)),
                generation,
            },
            None => Inner {
                store,
                gc: GcState::default(),
                sessions: Sessions::default(),
                last_applied: None,
                membership: StoredMembership::default(),
                checkpoint: None,
                generation,
            },
        };
        let (tail, _) = watch::channel(inner.store.next_position());
        Ok(StateMachine {
            shared: Arc::new(Shared {
                inner: RwLock::new(inner),
                tail,
                fs,
                dir: dir.to_path_buf(),
                checkpointing: std::sync::Mutex::new(()),
                spool_counter: std::sync::atomic::AtomicU64::new(0),
                snapshots_installed: std::sync::atomic::AtomicU64::new(0),
            }),
        })
    }

    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }
}

fn encode_checked<T: Serialize>(value: &T) -> Vec<u8> {
    let mut bytes = postcard::to_stdvec(value).expect("postcard encoding to a Vec cannot fail");
    let checksum = crc32c::crc32c(&bytes);
    bytes.extend_from_slice(&checksum.to_le_bytes());
    bytes
}

fn decode_checked<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    if bytes.len() < 4 {
        return Err("truncated".into());
    }
    let (body, checksum) = bytes.split_at(bytes.len() - 4);
    if crc32c::crc32c(body).to_le_bytes() != checksum {
        return Err("checksum mismatch".into());
    }
    postcard::from_bytes(body).map_err(|error| error.to_string())
}

impl Inner {
    fn apply_append(&mut self, batches: Vec<AppendBatch>, log_index: u64) -> Result<CommandResult, StoreError> {
        let mut results = Vec::with_capacity(batches.len());
        for batch in batches {
            let session = self.sessions.clients.entry(batch.client).or_default();
            session.last_active = log_index;
            if batch.first_unanswered > session.answered_below {
                session.answered_below = batch.first_unanswered.min(batch.sequence);
                session.recent = session.recent.split_off(&session.answered_below);
            }
            if let Some(first) = session.recent.get(&batch.sequence) {
                metrics::counter!("sharedlog_append_duplicates_total").increment(1);
                results.push(Ok(*first));
                continue;
            }
            if batch.sequence < session.answered_below {
                tracing::debug!(
                    client = batch.client,
                    sequence = batch.sequence,
                    "late duplicate of an answered batch"
                );
                results.push(Err(AppendRejected::SequenceTooOld));
                continue;
            }
            if let Some(invalid) = batch.records.iter().find_map(|record| store::validate(record).err()) {
                results.push(Err(AppendRejected::Invalid(invalid.to_string())));
                continue;
            }
            let first = self.store.append(&batch.records)?;
            let session = self.sessions.clients.get_mut(&batch.client).expect("inserted above");
            session.recent.insert(batch.sequence, first);
            while session.recent.len() > SESSION_RESULTS_MAX {
                if let Some((oldest, _)) = session.recent.pop_first() {
                    session.answered_below = oldest + 1;
                }
            }
            results.push(Ok(first));
        }
        if self.sessions.clients.len() > SESSIONS_MAX {
            // Forget the least recently active client (deterministic: ties
            // broken by client id).
            let oldest = self
                .sessions
                .clients
                .iter()
                .min_by_key(|(client, session)| (session.last_active, **client))
                .map(|(client, _)| *client)
                .expect("more than SESSIONS_MAX clients");
            self.sessions.clients.remove(&oldest);
        }
        Ok(CommandResult::Appended(results))
    }

    fn apply_gc(&mut self, report: GcReport) -> Result<CommandResult, StoreError> {
        let tail = self.store.next_position();
        let client = self.gc.clients.entry(report.client).or_insert_with(|| GcClient {
            name: format!("client-{:016x}", report.client),
            streams: Vec::new(),
            progress: 0,
            reports: 0,
        });
        client.progress = client.progress.max(report.progress.min(tail));
        client.reports += 1;
        let mut accepted = 0;
        for locator in &report.locators {
            let valid = locator.obsoleted_by >= locator.position
                && locator.obsoleted_by < tail
                && !locator.streams.is_empty()
                && locator.streams.len() <= crate::store::STREAMS_PER_ENTRY_MAX;
            if !valid || self.gc.deleted.contains(locator.position) {
                accepted += 1;
                continue;
            }
            if let Some(pending) = self.gc.pending.get_mut(&locator.position) {
                pending.unreported.retain(|stream| !locator.obsolete_in.contains(stream));
                accepted += 1;
                continue;
            }
            if self.gc.pending.len() >= GC_PENDING_MAX {
                break; // the client sends the rest again
            }
            let mut streams = locator.streams.clone();
            streams.sort_unstable();
            streams.dedup();
            let unreported = streams.iter().copied().filter(|stream| !locator.obsolete_in.contains(stream)).collect();
            for stream in &streams {
                self.gc.by_stream.entry(*stream).or_default().insert((locator.obsoleted_by, locator.position));
            }
            self.gc
                .pending
                .insert(locator.position, Pending { streams, unreported, obsoleted_by: locator.obsoleted_by });
            accepted += 1;
        }
        let deleted = self.collect()?;
        Ok(CommandResult::Collected { deleted, snapshot_mark: self.gc.snapshot_mark, accepted: accepted as u64 })
    }

    /// Deletes every pending entry whose obsoleter every reader of its
    /// streams has processed (an entry without effect: itself).
    fn collect(&mut self) -> Result<u64, StoreError> {
        let clients = &self.gc.clients;
        let horizon = |stream: StreamId| -> Position {
            clients
                .values()
                .filter(|client| client.reads(stream))
                .map(|client| client.progress)
                .min()
                .unwrap_or(u64::MAX)
        };
        let horizons: BTreeMap<StreamId, Position> =
            self.gc.by_stream.keys().map(|stream| (*stream, horizon(*stream))).collect();
        let mut doomed: BTreeSet<Position> = BTreeSet::new();
        'streams: for (stream, pending) in &self.gc.by_stream {
            let stream_horizon = horizons[stream];
            for (obsoleted_by, position) in pending {
                if *obsoleted_by >= stream_horizon {
                    break;
                }
                let entry = &self.gc.pending[position];
                let everyone_passed =
                    entry.streams.iter().all(|other| *obsoleted_by < horizons.get(other).copied().unwrap_or(u64::MAX));
                if entry.unreported.is_empty() && everyone_passed {
                    doomed.insert(*position);
                    if doomed.len() >= GC_DELETIONS_PER_APPLY_MAX {
                        break 'streams;
                    }
                }
            }
        }
        if doomed.is_empty() {
            return Ok(0);
        }
        let positions: Vec<Position> = doomed.iter().copied().collect();
        // Entries this replica no longer holds (deleted physically after its
        // last checkpoint, or absent from an installed snapshot) are skipped
        // by the store; the GC state moves on the same on every replica.
        self.store.delete(&positions)?;
        for position in positions {
            let pending = self.gc.forget_pending(position).expect("doomed entries are pending");
            self.gc.deleted.insert(position);
            if pending.obsoleted_by > position {
                self.gc.snapshot_mark = self.gc.snapshot_mark.max(pending.obsoleted_by + 1);
            }
        }
        self.gc.deleted_entries += doomed.len() as u64;
        metrics::counter!("sharedlog_gc_deleted_entries_total").increment(doomed.len() as u64);
        Ok(doomed.len() as u64)
    }

    fn apply_command(&mut self, command: Command, log_index: u64) -> Result<CommandResult, StoreError> {
        match command {
            Command::Append(batches) => self.apply_append(batches, log_index),
            Command::Gc(report) => self.apply_gc(report),
            Command::RegisterClient { client, name, streams } => {
                let registered = self.gc.clients.entry(client).or_insert_with(|| GcClient {
                    name: name.clone(),
                    streams: streams.clone(),
                    progress: 0,
                    reports: 0,
                });
                // A client coming back keeps its progress: it replays from
                // the log, where everything it had passed is still correct.
                registered.name = name;
                registered.streams = streams;
                Ok(CommandResult::Done)
            }
            Command::UnregisterClient { client } => {
                self.gc.clients.remove(&client);
                let deleted = self.collect()?;
                Ok(CommandResult::Collected { deleted, snapshot_mark: self.gc.snapshot_mark, accepted: 0 })
            }
        }
    }

    fn publish_metrics(&self) {
        let tail = self.store.next_position();
        metrics::gauge!("sharedlog_tail_position").set(tail as f64);
        metrics::gauge!("sharedlog_snapshot_mark").set(self.gc.snapshot_mark as f64);
        metrics::gauge!("sharedlog_snapshot_mark_lag_entries").set(tail.saturating_sub(self.gc.snapshot_mark) as f64);
        metrics::gauge!("sharedlog_gc_pending_entries").set(self.gc.pending.len() as f64);
        for client in self.gc.clients.values() {
            metrics::gauge!("sharedlog_gc_client_progress", "client" => client.name.clone())
                .set(client.progress as f64);
            metrics::gauge!("sharedlog_gc_client_lag_entries", "client" => client.name.clone())
                .set(tail.saturating_sub(client.progress) as f64);
        }
    }
}

impl Shared {
    /// A new, unused snapshot spool path in the state directory.
    pub fn spool_path(&self) -> PathBuf {
        let counter = self.spool_counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.dir.join(format!("{SPOOL_PREFIX}{}-{counter}.snapshot", std::process::id()))
    }

    pub fn fs(&self) -> &Arc<dyn Fs> {
        &self.fs
    }

    fn write_checkpoint_file(
        &self,
        meta: &SnapshotMeta<NodeId, Node>,
        generation: u64,
        store: StoreCheckpoint,
        header: &MachineHeader,
    ) -> Result<(), StoreError> {
        let file = CheckpointFile {
            version: CHECKPOINT_VERSION,
            meta: meta.clone(),
            entries_dir: format!("{ENTRIES_DIR_PREFIX}{generation}"),
            store,
            header: header.clone(),
        };
        self.fs.write_file_atomic(&self.dir.join("checkpoint"), &encode_checked(&file))?;
        Ok(())
    }

    /// Makes the state machine durable as of now: notes the state under the
    /// lock, syncs the entry store without it (readers and appliers go on),
    /// then replaces the checkpoint file.
    fn checkpoint(&self) -> Result<(SnapshotMeta<NodeId, Node>, MachineHeader), StoreError> {
        let _serial = self.checkpointing.lock().expect("checkpoint lock poisoned");
        let (pending, meta, header, generation) = {
            let mut inner = self.write();
            let pending = inner.store.prepare_sync()?;
            let header = MachineHeader {
                next_position: inner.store.next_position(),
                gc: inner.gc.clone(),
                sessions: inner.sessions.clone(),
            };
            let snapshot_id = match &inner.last_applied {
                Some(log_id) => format!("{}-{}-{}", log_id.leader_id.term, log_id.index, header.next_position),
                None => format!("empty-{}", header.next_position),
            };
            let meta = SnapshotMeta {
                last_log_id: inner.last_applied,
                last_membership: inner.membership.clone(),
                snapshot_id,
            };
            (pending, meta, header, inner.generation)
        };
        let store_checkpoint = match pending.run() {
            Ok(checkpoint) => checkpoint,
            Err(error) => return Err(self.write().store.latch_failed(error)),
        };
        self.write_checkpoint_file(&meta, generation, store_checkpoint, &header)?;
        self.write().checkpoint = Some((meta.clone(), header.clone()));
        Ok((meta, header))
    }

    /// Installs a snapshot spooled at `path` (see [`install_from_spool`]),
    /// then switches readers over to it. Returns the new tail.
    fn install(&self, meta: &SnapshotMeta<NodeId, Node>, path: &Path) -> Result<Position, StoreError> {
        let _serial = self.checkpointing.lock().expect("checkpoint lock poisoned");
        let old_generation = self.read().generation;
        let (store, header, generation) = install_from_spool(&self.fs, &self.dir, old_generation, meta, path)?;
        let mut inner = self.write();
        inner.store = store;
        inner.gc = header.gc.clone();
        inner.sessions = header.sessions.clone();
        inner.last_applied = meta.last_log_id;
        inner.membership = meta.last_membership.clone();
        inner.checkpoint = Some((meta.clone(), header));
        inner.generation = generation;
        inner.publish_metrics();
        Ok(inner.store.next_position())
    }
}

fn read_checkpoint(fs: &dyn Fs, dir: &Path) -> Result<Option<CheckpointFile>, StoreError> {
    let path = dir.join("checkpoint");
    if !fs.exists(&path) {
        return Ok(None);
    }
    let bytes = fs.read_file(&path)?;
    let file: CheckpointFile =
        decode_checked(&bytes).map_err(|error| StoreError::Invalid(format!("checkpoint: {error}")))?;
    if file.version != CHECKPOINT_VERSION {
        return Err(StoreError::Invalid(format!(
            "checkpoint format {} (this build reads {CHECKPOINT_VERSION})",
            file.version
        )));
    }
    Ok(Some(file))
}

fn generation_of(entries_dir: &str) -> Result<u64, StoreError> {
    entries_dir
        .strip_prefix(ENTRIES_DIR_PREFIX)
        .and_then(|generation| generation.parse().ok())
        .ok_or_else(|| StoreError::Invalid(format!("checkpoint names an odd directory {entries_dir:?}")))
}

/// The snapshot meta at the head of a spool file.
fn spooled_meta(fs: &dyn Fs, path: &Path) -> io::Result<SnapshotMeta<NodeId, Node>> {
    match SnapshotReader::open(fs, path)?.next_item()? {
        Some(SnapshotItem::Header { meta, .. }) => Ok(*meta),
        _ => Err(io::Error::other("spool does not start with a snapshot header")),
    }
}

/// Installs the snapshot spooled at `path` into a fresh entry-store
/// directory (`entries-<old generation + 1>`), makes it current by
/// atomically replacing the checkpoint file, then removes the old directory
/// and the spool. A crash before the checkpoint is replaced leaves the old
/// state whole (and the spool, to do it again); after, the new one.
fn install_from_spool(
    fs: &Arc<dyn Fs>,
    dir: &Path,
    old_generation: u64,
    meta: &SnapshotMeta<NodeId, Node>,
    path: &Path,
) -> Result<(EntryStore, MachineHeader, u64), StoreError> {
    let generation = old_generation + 1;
    let new_dir = dir.join(format!("{ENTRIES_DIR_PREFIX}{generation}"));
    if fs.exists(&new_dir) {
        fs.remove_dir_all(&new_dir)?;
    }
    let mut reader = SnapshotReader::open(&**fs, path)?;
    let Some(SnapshotItem::Header { machine: header, .. }) = reader.next_item()? else {
        return Err(StoreError::Invalid("snapshot does not start with its header".into()));
    };
    let header = *header;
    let mut store = store::open(fs.clone(), &new_dir, None)?;
    store.clear(header.next_position)?;
    let mut installed = 0u64;
    loop {
        match reader.next_item()? {
            Some(SnapshotItem::Entries(entries)) => {
                for entry in &entries {
                    store.install(entry)?;
                }
                installed += entries.len() as u64;
            }
            Some(SnapshotItem::End { entries }) if entries == installed => break,
            Some(SnapshotItem::End { entries }) => {
                return Err(StoreError::Invalid(format!("snapshot says {entries} entries, {installed} arrived")));
            }
            Some(SnapshotItem::Header { .. }) => {
                return Err(StoreError::Invalid("snapshot has a second header".into()))
            }
            None => return Err(StoreError::Invalid("snapshot ends without its trailer".into())),
        }
    }
    store.finish_install();
    let store_checkpoint = store.sync()?;
    let file = CheckpointFile {
        version: CHECKPOINT_VERSION,
        meta: meta.clone(),
        entries_dir: format!("{ENTRIES_DIR_PREFIX}{generation}"),
        store: store_checkpoint,
        header: header.clone(),
    };
    fs.write_file_atomic(&dir.join("checkpoint"), &encode_checked(&file))?;
    let old_dir = dir.join(format!("{ENTRIES_DIR_PREFIX}{old_generation}"));
    if fs.exists(&old_dir) {
        if let Err(error) = fs.remove_dir_all(&old_dir) {
            // Harmless: the next start removes it.
            tracing::warn!(%error, dir = %old_dir.display(), "could not remove the replaced entry store");
        }
    }
    let _ = fs.remove_file(path);
    let _ = fs.sync_dir(dir);
    Ok((store, header, generation))
}

impl RaftSnapshotBuilder<TypeConfig> for Arc<Shared> {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let (meta, header) = self.checkpoint().map_err(sm_error)?;
        tracing::info!(snapshot = %meta.snapshot_id, "checkpointed the entry store");
        Ok(Snapshot { meta, snapshot: Box::new(SnapshotData::Local { shared: self.clone(), header }) })
    }
}

/// One item of a snapshot stream: the header, entry batches, then a
/// trailer that says how many entries came (a truncated stream is refused).
#[derive(Serialize, Deserialize)]
pub enum SnapshotItem {
    Header { meta: Box<SnapshotMeta<NodeId, Node>>, machine: Box<MachineHeader> },
    Entries(Vec<Entry>),
    End { entries: u64 },
}

/// Reads a spooled snapshot item by item (`[len u32][crc u32][postcard]`),
/// without loading it whole.
pub struct SnapshotReader {
    file: Arc<dyn fsio::File>,
    offset: u64,
    len: u64,
}

/// The largest snapshot item accepted (an entry batch is at most a few MiB;
/// the header holds the GC state).
const SNAPSHOT_ITEM_BYTES_MAX: usize = 1 << 30;

impl SnapshotReader {
    pub fn open(fs: &dyn Fs, path: &Path) -> io::Result<SnapshotReader> {
        let file = fs.open(path, false)?;
        let len = file.len()?;
        Ok(SnapshotReader { file, offset: 0, len })
    }

    pub fn next_item(&mut self) -> io::Result<Option<SnapshotItem>> {
        if self.offset == self.len {
            return Ok(None);
        }
        let mut prefix = [0u8; 8];
        self.file.read_exact_at(&mut prefix, self.offset)?;
        let len = u32::from_le_bytes(prefix[..4].try_into().expect("4 bytes")) as usize;
        let checksum = u32::from_le_bytes(prefix[4..].try_into().expect("4 bytes"));
        if len > SNAPSHOT_ITEM_BYTES_MAX || self.offset + 8 + len as u64 > self.len {
            return Err(io::Error::other("snapshot item truncated or oversized"));
        }
        let mut body = vec![0u8; len];
        self.file.read_exact_at(&mut body, self.offset + 8)?;
        if crc32c::crc32c(&body) != checksum {
            return Err(io::Error::other("snapshot item fails its checksum"));
        }
        self.offset += 8 + len as u64;
        postcard::from_bytes(&body).map(Some).map_err(io::Error::other)
    }
}

/// Frames one snapshot item for a spool file.
pub fn frame_snapshot_item(item: &SnapshotItem) -> Vec<u8> {
    let body = postcard::to_stdvec(item).expect("postcard encoding to a Vec cannot fail");
    let mut framed = Vec::with_capacity(body.len() + 8);
    framed.extend_from_slice(&(body.len() as u32).to_le_bytes());
    framed.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    framed.extend_from_slice(&body);
    framed
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Arc<Shared>;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership<NodeId, Node>), StorageError> {
        let inner = self.shared.read();
        Ok((inner.last_applied, inner.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>, StorageError>
    where
        I: IntoIterator<Item = RaftEntry> + Send,
        I::IntoIter: Send,
    {
        let mut results = Vec::new();
        let tail = {
            let mut inner = self.shared.write();
            for entry in entries {
                inner.last_applied = Some(entry.log_id);
                let result = match entry.payload {
                    EntryPayload::Blank => CommandResult::Done,
                    EntryPayload::Normal(command) => {
                        inner.apply_command(command, entry.log_id.index).map_err(sm_error)?
                    }
                    EntryPayload::Membership(membership) => {
                        inner.membership = StoredMembership::new(Some(entry.log_id), membership);
                        CommandResult::Done
                    }
                };
                results.push(result);
            }
            inner.publish_metrics();
            inner.store.next_position()
        };
        self.shared.tail.send_replace(tail);
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.shared.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotData>, StorageError> {
        Ok(Box::new(SnapshotData::Received { path: self.shared.spool_path() }))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Node>,
        snapshot: Box<SnapshotData>,
    ) -> Result<(), StorageError> {
        let SnapshotData::Received { path } = *snapshot else {
            return Err(sm_error("cannot install a local checkpoint as a received snapshot"));
        };
        let tail = self.shared.install(meta, &path).map_err(sm_error)?;
        self.shared.snapshots_installed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        metrics::counter!("sharedlog_snapshots_installed_total").increment(1);
        self.shared.tail.send_replace(tail);
        tracing::info!(snapshot = %meta.snapshot_id, tail, "installed a snapshot from the leader");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let inner = self.shared.read();
        Ok(inner.checkpoint.clone().map(|(meta, header)| Snapshot {
            meta,
            snapshot: Box::new(SnapshotData::Local { shared: self.shared.clone(), header }),
        }))
    }
}

#[cfg(test)]
mod tests {
    use fsio::SimFs;
    use openraft::storage::RaftStateMachine;

    use super::*;
    use crate::types::Record;

    fn inner() -> Inner {
        let store = store::open(Arc::new(SimFs::new(1)), Path::new("/entries"), None).unwrap();
        Inner {
            store,
            gc: GcState::default(),
            sessions: Sessions::default(),
            last_applied: None,
            membership: StoredMembership::default(),
            checkpoint: None,
            generation: 0,
        }
    }

    fn batch(sequence: u64, first_unanswered: u64) -> AppendBatch {
        AppendBatch {
            client: 7,
            sequence,
            first_unanswered,
            records: vec![Record::data(StreamId(1), vec![sequence as u8])],
        }
    }

    fn append(inner: &mut Inner, batch: AppendBatch) -> Result<Position, AppendRejected> {
        match inner.apply_append(vec![batch], 1).unwrap() {
            CommandResult::Appended(mut results) => results.remove(0),
            other => panic!("{other:?}"),
        }
    }

    fn locator(position: Position, stream: StreamId, obsoleted_by: Position) -> crate::types::Locator {
        crate::types::Locator {
            position,
            streams: vec![stream],
            obsolete_in: vec![stream],
            size_bytes: 48,
            obsoleted_by,
        }
    }

    fn gc(inner: &mut Inner, client: u64, progress: Position, locators: Vec<crate::types::Locator>) -> u64 {
        match inner.apply_gc(GcReport { client, progress, locators }).unwrap() {
            CommandResult::Collected { deleted, .. } => deleted,
            other => panic!("{other:?}"),
        }
    }

    fn register(inner: &mut Inner, client: u64, streams: Vec<StreamId>) {
        inner.apply_command(Command::RegisterClient { client, name: format!("c{client}"), streams }, 1).unwrap();
    }

    #[test]
    fn gc_decisions_do_not_depend_on_what_the_disk_holds() {
        // Replica B lost entry 3 physically (deleted after its checkpoint,
        // or absent from the snapshot it installed); the same reports must
        // leave both replicas with the same GC state.
        let (mut a, mut b) = (inner(), inner());
        for replica in [&mut a, &mut b] {
            for sequence in 1..=10 {
                append(replica, batch(sequence, sequence)).unwrap();
            }
            register(replica, 9, vec![StreamId(1)]);
        }
        b.store.delete(&[3]).unwrap();
        for replica in [&mut a, &mut b] {
            gc(replica, 9, 2, vec![locator(3, StreamId(1), 5), locator(4, StreamId(1), 6)]);
            gc(replica, 9, 7, vec![]);
        }
        assert_eq!(a.gc, b.gc);
        assert_eq!(a.gc.snapshot_mark, 7);
        for position in [3, 4] {
            assert_eq!(a.store.read(position).unwrap(), crate::types::ReadOutcome::Trimmed);
            assert_eq!(b.store.read(position).unwrap(), crate::types::ReadOutcome::Trimmed);
        }
    }

    #[test]
    fn entries_without_effect_are_collected_without_moving_the_mark() {
        let mut inner = inner();
        for sequence in 1..=5 {
            append(&mut inner, batch(sequence, sequence)).unwrap();
        }
        register(&mut inner, 9, vec![StreamId(1)]);
        assert_eq!(gc(&mut inner, 9, 5, vec![locator(2, StreamId(1), 2)]), 1);
        assert_eq!(inner.store.read(2).unwrap(), crate::types::ReadOutcome::Trimmed);
        assert_eq!(inner.gc.snapshot_mark, 0, "deleting an entry that changed nothing breaks no snapshot");
    }

    #[test]
    fn a_silent_reader_holds_back_only_its_own_streams() {
        let mut inner = inner();
        let (x, y) = (StreamId(1), StreamId(2));
        for sequence in 1..=10 {
            let stream = if sequence % 2 == 0 { x } else { y };
            let mut batch = batch(sequence, sequence);
            batch.records[0].streams = vec![stream];
            append(&mut inner, batch).unwrap();
        }
        register(&mut inner, 7, vec![x]); // silent from here on
        register(&mut inner, 8, vec![y]);
        // Positions 0, 2, 4 are in y (odd sequences); 1, 3 in x.
        let deleted = gc(&mut inner, 8, 10, vec![locator(0, y, 2), locator(1, x, 3), locator(2, y, 4)]);
        assert_eq!(deleted, 2, "y's entries go although x's reader is silent");
        assert!(
            matches!(inner.store.read(1).unwrap(), crate::types::ReadOutcome::Entry(_)),
            "x's entry waits for its reader"
        );
        assert_eq!(gc(&mut inner, 7, 10, vec![]), 1, "and goes once the reader reports");
    }

    #[test]
    fn invalid_locators_are_skipped_and_counted_as_taken() {
        let mut inner = inner();
        append(&mut inner, batch(1, 1)).unwrap();
        register(&mut inner, 9, vec![StreamId(1)]);
        // Obsoleted before they were written, or by a position past the tail.
        let locators = vec![locator(1, StreamId(1), 0), locator(0, StreamId(1), 5)];
        match inner.apply_gc(GcReport { client: 9, progress: 0, locators }).unwrap() {
            CommandResult::Collected { accepted, deleted, .. } => assert_eq!((accepted, deleted), (2, 0)),
            other => panic!("{other:?}"),
        }
        assert_eq!(inner.gc.pending_entries(), 0);
    }

    fn raft_entry(index: u64, command: Command) -> RaftEntry {
        RaftEntry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(command),
        }
    }

    fn appended(index: u64, values: std::ops::Range<u64>) -> RaftEntry {
        let records =
            values.map(|value| crate::types::Record::data(StreamId(1), value.to_le_bytes().to_vec())).collect();
        raft_entry(
            index,
            Command::Append(vec![AppendBatch { client: 1, sequence: index, first_unanswered: index, records }]),
        )
    }

    /// What a leader sends: header (with meta), entries, trailer.
    fn spool(
        fs: &SimFs,
        path: &Path,
        meta: &SnapshotMeta<NodeId, Node>,
        source: &Arc<Shared>,
        header: MachineHeader,
        complete: bool,
    ) {
        let mut bytes = frame_snapshot_item(&SnapshotItem::Header {
            meta: Box::new(meta.clone()),
            machine: Box::new(header.clone()),
        });
        let (entries, _) = source.read().store.live_entries_from(0, header.next_position, usize::MAX).unwrap();
        let count = entries.len() as u64;
        bytes.extend(frame_snapshot_item(&SnapshotItem::Entries(entries)));
        if complete {
            bytes.extend(frame_snapshot_item(&SnapshotItem::End { entries: count }));
        }
        let file = Fs::open(fs, path, true).unwrap();
        file.write_at(&bytes, 0).unwrap();
        file.sync_data().unwrap();
        fs.sync_dir(path.parent().unwrap()).unwrap();
    }

    #[tokio::test]
    async fn an_install_interrupted_by_a_crash_is_finished_on_start() {
        // The leader's state: 30 entries, checkpointed.
        let leader_fs = SimFs::new(1);
        let mut leader = StateMachine::open(Arc::new(leader_fs.clone()), Path::new("/leader")).unwrap();
        leader.apply(vec![appended(1, 0..10), appended(2, 10..30)]).await.unwrap();
        let snapshot = leader.get_snapshot_builder().await.build_snapshot().await.unwrap();
        let SnapshotData::Local { shared: source, header } = *snapshot.snapshot else { panic!("local checkpoint") };

        // A follower with an older state receives the snapshot, openraft
        // purges its log, and the power fails before the install is done.
        let fs = SimFs::new(2);
        let dir = Path::new("/follower");
        let mut follower = StateMachine::open(Arc::new(fs.clone()), dir).unwrap();
        follower.apply(vec![appended(1, 0..10)]).await.unwrap();
        follower.get_snapshot_builder().await.build_snapshot().await.unwrap();
        let spool_path = follower.shared.spool_path();
        spool(&fs, &spool_path, &snapshot.meta, &source, header.clone(), true);
        drop(follower);
        fs.crash(true);

        let restarted = StateMachine::open(Arc::new(fs.clone()), dir).unwrap();
        {
            let inner = restarted.shared.read();
            assert_eq!(inner.last_applied, snapshot.meta.last_log_id, "the install was finished on start");
            assert_eq!(inner.store.next_position(), 30);
            assert!(matches!(inner.store.read(29).unwrap(), crate::types::ReadOutcome::Entry(_)));
        }
        assert!(!fs.exists(&spool_path), "the spool is gone once installed");
        assert_eq!(fs.list(dir).unwrap().iter().filter(|name| name.starts_with(ENTRIES_DIR_PREFIX)).count(), 1);

        // A torn spool (no trailer) is not installed: the old state stays.
        let fs = SimFs::new(3);
        let mut follower = StateMachine::open(Arc::new(fs.clone()), dir).unwrap();
        follower.apply(vec![appended(1, 0..10)]).await.unwrap();
        follower.get_snapshot_builder().await.build_snapshot().await.unwrap();
        let spool_path = follower.shared.spool_path();
        spool(&fs, &spool_path, &snapshot.meta, &source, header, false);
        drop(follower);
        fs.crash(true);
        let restarted = StateMachine::open(Arc::new(fs.clone()), dir).unwrap();
        assert_eq!(restarted.shared.read().store.next_position(), 10, "a partly received snapshot changes nothing");
        assert!(!fs.exists(&spool_path), "and is discarded");
    }

    #[test]
    fn a_retry_far_behind_the_clients_other_batches_is_still_deduplicated() {
        let mut inner = inner();
        // Sequence 5 is stuck (unanswered) while 1000 later batches go through.
        let first = append(&mut inner, batch(5, 1)).unwrap();
        for sequence in 6..1006 {
            append(&mut inner, batch(sequence, 5)).unwrap();
        }
        assert_eq!(append(&mut inner, batch(5, 5)), Ok(first), "the retry finds its first application");
        assert_eq!(inner.store.next_position(), 1001, "nothing was appended twice");
        // Once the client says 5 is answered, a late copy is refused, not applied.
        append(&mut inner, batch(1006, 1006)).unwrap();
        assert_eq!(append(&mut inner, batch(5, 1006)), Err(AppendRejected::SequenceTooOld));
        assert_eq!(inner.store.next_position(), 1002);
        assert!(inner.sessions.clients[&7].recent.len() <= 1, "answered results are forgotten");
    }
}
