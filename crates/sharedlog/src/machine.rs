//! The replicated state machine: applies committed commands to the entry
//! store, runs append deduplication and in-place garbage collection, and
//! takes checkpoints (openraft "snapshots").
//!
//! Everything here is deterministic: every replica applies the same commands
//! in the same order and ends with the same entries, the same trimmed
//! positions and the same snapshot mark.

use std::collections::{BTreeMap, BTreeSet, HashMap};
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
/// Obsolete entries waiting for every reader to pass their obsoleter.
pub const GC_PENDING_MAX: usize = 1_000_000;
/// Pending entries examined per GC report, to bound one apply's work.
const GC_SCAN_MAX: usize = 200_000;

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

/// Garbage-collection state, replicated.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcState {
    pub clients: BTreeMap<ClientId, GcClient>,
    pending: BTreeMap<Position, Pending>,
    by_obsoleter: BTreeSet<(Position, Position)>,
    /// Snapshots (prefix reads) at versions below this are refused: some
    /// entry they would need has been deleted.
    pub snapshot_mark: Position,
    pub locators_dropped: u64,
    pub deleted_entries: u64,
}

impl GcState {
    pub fn pending_entries(&self) -> usize {
        self.pending.len()
    }
}

/// What a checkpoint records besides the entries themselves.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MachineHeader {
    pub next_position: Position,
    pub gc: GcState,
    pub sessions: Sessions,
}

/// The durable checkpoint file.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct CheckpointFile {
    version: u32,
    meta: SnapshotMeta<NodeId, Node>,
    store: StoreCheckpoint,
    header: MachineHeader,
}

const CHECKPOINT_VERSION: u32 = 1;

/// Everything the RPC handlers read.
pub struct Inner {
    pub store: EntryStore,
    pub gc: GcState,
    sessions: Sessions,
    last_applied: Option<LogId>,
    membership: StoredMembership<NodeId, Node>,
    checkpoint: Option<(SnapshotMeta<NodeId, Node>, MachineHeader)>,
}

/// State shared between the state machine (writer) and readers.
pub struct Shared {
    pub inner: RwLock<Inner>,
    /// The tail (next position), published after every applied batch.
    pub tail: watch::Sender<Position>,
    fs: Arc<dyn Fs>,
    dir: PathBuf,
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
    /// Opens the state machine stored in `dir` (entry store in `dir/entries`).
    pub fn open(fs: Arc<dyn Fs>, dir: &Path) -> Result<StateMachine, StoreError> {
        fs.create_dir_all(dir)?;
        let checkpoint_path = dir.join("checkpoint");
        let checkpoint: Option<CheckpointFile> = if fs.exists(&checkpoint_path) {
            let bytes = fs.read_file(&checkpoint_path)?;
            Some(decode_checked(&bytes).map_err(|error| StoreError::Invalid(format!("checkpoint: {error}")))?)
        } else {
            None
        };
        let store = store::open(fs.clone(), &dir.join("entries"), checkpoint.as_ref().map(|file| &file.store))?;
        let inner = match checkpoint {
            Some(file) => Inner {
                store,
                gc: file.header.gc.clone(),
                sessions: file.header.sessions.clone(),
                last_applied: file.meta.last_log_id,
                membership: file.meta.last_membership.clone(),
                checkpoint: Some((file.meta, file.header)),
            },
            None => Inner {
                store,
                gc: GcState::default(),
                sessions: Sessions::default(),
                last_applied: None,
                membership: StoredMembership::default(),
                checkpoint: None,
            },
        };
        let (tail, _) = watch::channel(inner.store.next_position());
        Ok(StateMachine { shared: Arc::new(Shared { inner: RwLock::new(inner), tail, fs, dir: dir.to_path_buf() }) })
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
        for locator in report.locators {
            if locator.obsoleted_by <= locator.position || locator.obsoleted_by >= tail {
                continue;
            }
            if let Some(pending) = self.gc.pending.get_mut(&locator.position) {
                pending.unreported.retain(|stream| !locator.streams.contains(stream));
                continue;
            }
            if self.gc.pending.len() >= GC_PENDING_MAX {
                self.gc.locators_dropped += 1;
                continue;
            }
            let entry = match self.store.read(locator.position)? {
                crate::types::ReadOutcome::Entry(entry) => entry,
                _ => continue,
            };
            let unreported: Vec<StreamId> =
                entry.streams.iter().copied().filter(|stream| !locator.streams.contains(stream)).collect();
            self.gc.by_obsoleter.insert((locator.obsoleted_by, locator.position));
            self.gc.pending.insert(
                locator.position,
                Pending { streams: entry.streams, unreported, obsoleted_by: locator.obsoleted_by },
            );
        }
        let deleted = self.collect()?;
        Ok(CommandResult::Collected { deleted, snapshot_mark: self.gc.snapshot_mark })
    }

    /// Deletes every pending entry whose obsoleter every reader of its
    /// streams has processed.
    fn collect(&mut self) -> Result<u64, StoreError> {
        let mut horizons: HashMap<StreamId, Position> = HashMap::new();
        let clients = &self.gc.clients;
        let mut horizon = |stream: StreamId| -> Position {
            *horizons.entry(stream).or_insert_with(|| {
                clients
                    .values()
                    .filter(|client| client.reads(stream))
                    .map(|client| client.progress)
                    .min()
                    .unwrap_or(u64::MAX)
            })
        };
        let progress_max = clients.values().map(|client| client.progress).max().unwrap_or(u64::MAX);
        let mut doomed: Vec<(Position, Position)> = Vec::new();
        for (obsoleted_by, position) in self.gc.by_obsoleter.iter().take(GC_SCAN_MAX) {
            if *obsoleted_by >= progress_max {
                break;
            }
            let pending = &self.gc.pending[position];
            if pending.unreported.is_empty() && pending.streams.iter().all(|stream| *obsoleted_by < horizon(*stream)) {
                doomed.push((*obsoleted_by, *position));
            }
        }
        if doomed.is_empty() {
            return Ok(0);
        }
        let positions: Vec<Position> = doomed.iter().map(|(_, position)| *position).collect();
        self.store.delete(&positions)?;
        for (obsoleted_by, position) in &doomed {
            self.gc.by_obsoleter.remove(&(*obsoleted_by, *position));
            self.gc.pending.remove(position);
            self.gc.snapshot_mark = self.gc.snapshot_mark.max(obsoleted_by + 1);
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
                Ok(CommandResult::Collected { deleted, snapshot_mark: self.gc.snapshot_mark })
            }
        }
    }

    fn publish_metrics(&self) {
        let tail = self.store.next_position();
        metrics::gauge!("sharedlog_tail_position").set(tail as f64);
        metrics::gauge!("sharedlog_snapshot_mark").set(self.gc.snapshot_mark as f64);
        metrics::gauge!("sharedlog_snapshot_mark_lag_entries").set(tail.saturating_sub(self.gc.snapshot_mark) as f64);
        metrics::gauge!("sharedlog_gc_pending_entries").set(self.gc.pending.len() as f64);
        metrics::gauge!("sharedlog_gc_locators_dropped").set(self.gc.locators_dropped as f64);
        for client in self.gc.clients.values() {
            metrics::gauge!("sharedlog_gc_client_progress", "client" => client.name.clone())
                .set(client.progress as f64);
            metrics::gauge!("sharedlog_gc_client_lag_entries", "client" => client.name.clone())
                .set(tail.saturating_sub(client.progress) as f64);
        }
    }

    /// Syncs the store and writes the checkpoint file.
    fn checkpoint(
        &mut self,
        fs: &dyn Fs,
        dir: &Path,
    ) -> Result<(SnapshotMeta<NodeId, Node>, MachineHeader), StoreError> {
        let store_checkpoint = self.store.sync()?;
        let header = MachineHeader {
            next_position: store_checkpoint.next_position,
            gc: self.gc.clone(),
            sessions: self.sessions.clone(),
        };
        let snapshot_id = match &self.last_applied {
            Some(log_id) => format!("{}-{}-{}", log_id.leader_id.term, log_id.index, header.next_position),
            None => format!("empty-{}", header.next_position),
        };
        let meta =
            SnapshotMeta { last_log_id: self.last_applied, last_membership: self.membership.clone(), snapshot_id };
        let file = CheckpointFile {
            version: CHECKPOINT_VERSION,
            meta: meta.clone(),
            store: store_checkpoint,
            header: header.clone(),
        };
        fs.write_file_atomic(&dir.join("checkpoint"), &encode_checked(&file))?;
        self.checkpoint = Some((meta.clone(), header.clone()));
        Ok((meta, header))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for Arc<Shared> {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let (meta, header) = {
            let mut inner = self.write();
            inner.checkpoint(&*self.fs, &self.dir).map_err(sm_error)?
        };
        tracing::info!(snapshot = %meta.snapshot_id, "checkpointed the entry store");
        Ok(Snapshot { meta, snapshot: Box::new(SnapshotData::Local { shared: self.clone(), header }) })
    }
}

/// One item of a snapshot stream: first the header, then entry batches.
#[derive(Serialize, Deserialize)]
pub enum SnapshotItem {
    Header(MachineHeader),
    Entries(Vec<Entry>),
}

/// Reads a spooled snapshot file item by item (`[len u32][crc u32][postcard]`).
pub fn read_snapshot_items(fs: &dyn Fs, path: &Path) -> io::Result<Vec<SnapshotItem>> {
    let bytes = fs.read_file(path)?;
    let mut items = Vec::new();
    let mut offset = 0usize;
    while offset < bytes.len() {
        if offset + 8 > bytes.len() {
            return Err(io::Error::other("snapshot file truncated"));
        }
        let len = u32::from_le_bytes(bytes[offset..offset + 4].try_into().expect("4 bytes")) as usize;
        let checksum = u32::from_le_bytes(bytes[offset + 4..offset + 8].try_into().expect("4 bytes"));
        let body =
            bytes.get(offset + 8..offset + 8 + len).ok_or_else(|| io::Error::other("snapshot file truncated"))?;
        if crc32c::crc32c(body) != checksum {
            return Err(io::Error::other("snapshot item fails its checksum"));
        }
        items.push(postcard::from_bytes(body).map_err(io::Error::other)?);
        offset += 8 + len;
    }
    Ok(items)
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
        Ok(Box::new(SnapshotData::Received { path: self.shared.dir.join("incoming.snapshot") }))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Node>,
        snapshot: Box<SnapshotData>,
    ) -> Result<(), StorageError> {
        let SnapshotData::Received { path } = *snapshot else {
            return Err(sm_error("cannot install a local checkpoint as a received snapshot"));
        };
        let items = read_snapshot_items(&*self.shared.fs, &path).map_err(sm_error)?;
        let mut items = items.into_iter();
        let Some(SnapshotItem::Header(header)) = items.next() else {
            return Err(sm_error("snapshot does not start with its header"));
        };
        let tail = {
            let mut inner = self.shared.write();
            inner.store.clear(header.next_position).map_err(sm_error)?;
            for item in items {
                let SnapshotItem::Entries(entries) = item else {
                    return Err(sm_error("snapshot has a second header"));
                };
                for entry in &entries {
                    inner.store.install(entry).map_err(sm_error)?;
                }
            }
            inner.store.finish_install();
            inner.gc = header.gc;
            inner.sessions = header.sessions;
            inner.last_applied = meta.last_log_id;
            inner.membership = meta.last_membership.clone();
            inner.checkpoint(&*self.shared.fs, &self.shared.dir).map_err(sm_error)?;
            inner.publish_metrics();
            inner.store.next_position()
        };
        let _ = self.shared.fs.remove_file(&path);
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
