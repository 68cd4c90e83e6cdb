//! State machine replication over the shared log.
//!
//! A replicated object's state is the fold of its stream. Each object has a
//! follower task that reads the stream (from the local replica when there is
//! one) and applies entries in position order. A write appends an update and
//! waits until the object has applied it, then returns the update's outcome
//! (so a compare-and-set learns whether it won). A linearizable read first
//! syncs to the log's tail.
//!
//! Garbage collection (the in-place GC seed): while applying, an object says
//! which earlier entries an update made obsolete (an overwritten map value, a
//! removed queue item). The runtime reports them, with its progress, to the
//! log servers every `gc_interval`, independently of the object's updates.
//! Entries that only matter until their victims are gone (a delete, a queue
//! removal) are kept until the object's next checkpoint, which makes every
//! entry it covers obsolete at once, so a deletion can never be collected
//! before what it deleted. Likewise the version a successful compare-and-set
//! expected: a replay re-evaluates the condition and must find it. (An entry
//! that had no effect at all, such as a compare-and-set that lost, goes at
//! once.)
//!
//! **Invariant:** an object's state after applying through position `p` is
//! the same on every host, whatever entries GC has removed, because only
//! entries whose effect is superseded by a later entry are ever reported.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use wire::Transport;

use crate::client::{ClientError, LogClient};
use crate::raft::GcReport;
use crate::store::record_size;
use crate::types::{ClientId, Entry, EntryKind, Locator, Position, Record, StreamId};

/// Dead entries (obsolete but waiting for a checkpoint) that trigger one.
pub const CHECKPOINT_DEAD_ENTRIES_MIN: usize = 1000;
/// The largest serialized state an object checkpoints; larger objects rely
/// on their live entries alone.
pub const CHECKPOINT_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Obsolete locators a runtime buffers while the log is unreachable.
pub const UNREPORTED_LOCATORS_MAX: usize = 1_000_000;
/// Outcomes kept for this runtime's own writes that nobody collected.
const OUTCOMES_MAX: usize = 65_536;
/// Locators per GC report (keeps a report far below the 16 MiB frame limit).
pub const LOCATORS_PER_REPORT_MAX: usize = 50_000;

/// A replicated object: state plus the rule that folds updates into it.
pub trait Object: Default + Send + 'static {
    type Op: Serialize + DeserializeOwned + Send + Sync + Debug + 'static;
    type Outcome: Clone + Send + Sync + 'static;
    type State: Serialize + DeserializeOwned + Send + 'static;

    /// Applies `op`, written at `position`. Earlier entries this makes
    /// obsolete go to `obsoleted`.
    fn apply(&mut self, position: Position, op: Self::Op, obsoleted: &mut Obsoleted) -> Self::Outcome;
    fn to_state(&self) -> Self::State;
    fn from_state(state: Self::State) -> Self;
}

/// What an update made obsolete.
#[derive(Default)]
pub struct Obsoleted {
    /// Entries whose effect is gone now (e.g. the previous value of a key).
    pub superseded: Vec<Position>,
    /// The applied entry had no effect at all (e.g. a lost compare-and-set).
    pub without_effect: bool,
    /// The applied entry is needed only until the next checkpoint (e.g. a
    /// delete: it must outlive the entry it deleted).
    pub until_checkpoint: bool,
    /// Entries whose effect is gone but that a replay still needs until the
    /// next checkpoint: the version a successful compare-and-set expected
    /// (a replay re-evaluates the condition, and must find that version).
    pub needed_until_checkpoint: Vec<Position>,
}

#[derive(Serialize, Deserialize)]
struct Envelope<Op> {
    writer: ClientId,
    nonce: u64,
    op: Op,
}

#[derive(Serialize, Deserialize)]
struct CheckpointPayload<S> {
    /// The state covers every entry of the stream below this position.
    version: Position,
    state: S,
}

#[derive(Debug, thiserror::Error)]
pub enum SmrError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("timed out waiting for the object to apply position {0}")]
    ApplyTimeout(Position),
    #[error("the object's follower stopped")]
    Stopped,
}

/// What the runtime remembers of an entry the state depends on: enough to
/// report it obsolete later.
#[derive(Clone, Debug)]
struct LiveEntry {
    size: u32,
    /// The entry's streams when it is in others besides the object's own.
    other_streams: Option<Box<[StreamId]>>,
}

impl LiveEntry {
    fn new(entry: &Entry, own: StreamId, size: u32) -> LiveEntry {
        let other_streams = (entry.streams != [own]).then(|| entry.streams.clone().into_boxed_slice());
        LiveEntry { size, other_streams }
    }

    fn locator(&self, own: StreamId, position: Position, obsoleted_by: Position) -> Locator {
        Locator {
            position,
            streams: self.other_streams.as_deref().map(<[StreamId]>::to_vec).unwrap_or_else(|| vec![own]),
            obsolete_in: vec![own],
            size_bytes: self.size,
            obsoleted_by,
        }
    }
}

struct Core<O: Object> {
    object: O,
    /// Every entry of the stream below this has been applied.
    applied: Position,
    /// Entries the state depends on.
    live: BTreeMap<Position, LiveEntry>,
    /// Entries to drop at the next checkpoint.
    dead: usize,
    unreported: Vec<Locator>,
    outcomes: HashMap<u64, O::Outcome>,
    checkpoint_version: Position,
    checkpointing: bool,
}

/// What the runtime needs from every object, whatever its type.
trait Tracked: Send + Sync {
    fn applied(&self) -> Position;
    fn take_locators(&self) -> Vec<Locator>;
    fn return_locators(&self, locators: Vec<Locator>);
}

struct Shared<O: Object> {
    stream: StreamId,
    core: Mutex<Core<O>>,
    applied: watch::Sender<Position>,
    changes: watch::Sender<u64>,
}

impl<O: Object> Tracked for Shared<O> {
    fn applied(&self) -> Position {
        self.core.lock().expect("object lock").applied
    }

    fn take_locators(&self) -> Vec<Locator> {
        std::mem::take(&mut self.core.lock().expect("object lock").unreported)
    }

    fn return_locators(&self, mut locators: Vec<Locator>) {
        let mut core = self.core.lock().expect("object lock");
        locators.append(&mut core.unreported);
        if locators.len() > UNREPORTED_LOCATORS_MAX {
            let excess = locators.len() - UNREPORTED_LOCATORS_MAX;
            metrics::counter!("smr_locators_dropped_total").increment(excess as u64);
            locators.drain(..excess);
        }
        core.unreported = locators;
    }
}

impl<O: Object> Shared<O> {
    fn apply_entry(&self, entry: Entry, me: ClientId) {
        let size =
            record_size(&Record { streams: entry.streams.clone(), kind: entry.kind, payload: entry.payload.clone() })
                as u32;
        let mut core = self.core.lock().expect("object lock");
        if entry.position < core.applied {
            return;
        }
        match entry.kind {
            EntryKind::Checkpoint => {
                let version = match postcard::from_bytes::<CheckpointPayload<serde::de::IgnoredAny>>(&entry.payload) {
                    Ok(payload) => payload.version,
                    Err(error) => {
                        tracing::warn!(stream = %self.stream, position = entry.position, %error, "undecodable checkpoint ignored");
                        let this = LiveEntry::new(&entry, self.stream, size);
                        core.unreported.push(this.locator(self.stream, entry.position, entry.position));
                        core.applied = entry.position + 1;
                        return;
                    }
                };
                // Everything the checkpoint covers is obsolete, including
                // older checkpoints (a checkpoint written concurrently with
                // this one is covered by the next).
                let covered: Vec<(Position, LiveEntry)> =
                    core.live.range(..version).map(|(position, live)| (*position, live.clone())).collect();
                for (position, live) in covered {
                    core.live.remove(&position);
                    core.unreported.push(live.locator(self.stream, position, entry.position));
                }
                // Entries after `version` that wait for a checkpoint wait for
                // the next one; counting from zero again is close enough.
                core.dead = 0;
                core.checkpoint_version = core.checkpoint_version.max(version);
                core.live.insert(entry.position, LiveEntry::new(&entry, self.stream, size));
            }
            EntryKind::Data => {
                let this = LiveEntry::new(&entry, self.stream, size);
                let envelope: Envelope<O::Op> = match postcard::from_bytes(&entry.payload) {
                    Ok(envelope) => envelope,
                    Err(error) => {
                        tracing::warn!(stream = %self.stream, position = entry.position, %error, "undecodable update ignored");
                        core.unreported.push(this.locator(self.stream, entry.position, entry.position));
                        core.applied = entry.position + 1;
                        return;
                    }
                };
                let mut obsoleted = Obsoleted::default();
                let outcome = core.object.apply(entry.position, envelope.op, &mut obsoleted);
                for position in obsoleted.superseded {
                    if let Some(live) = core.live.remove(&position) {
                        core.unreported.push(live.locator(self.stream, position, entry.position));
                    }
                }
                // They stay live (a checkpoint covers them) but count as dead
                // weight towards the next checkpoint.
                core.dead += obsoleted.needed_until_checkpoint.len();
                if obsoleted.without_effect {
                    core.unreported.push(this.locator(self.stream, entry.position, entry.position));
                } else {
                    core.live.insert(entry.position, this);
                    if obsoleted.until_checkpoint {
                        core.dead += 1;
                    }
                }
                if envelope.writer == me {
                    if core.outcomes.len() >= OUTCOMES_MAX {
                        core.outcomes.clear();
                    }
                    core.outcomes.insert(envelope.nonce, outcome);
                }
            }
        }
        core.applied = entry.position + 1;
    }
}

#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    /// A name for this runtime in GC metrics and `tessera status`.
    pub name: String,
    pub gc_interval: Duration,
    /// How long a write waits for its own update to be applied.
    pub apply_timeout: Duration,
    /// Long-poll duration of the follower tasks.
    pub poll_wait: Duration,
    /// Whether this runtime writes checkpoints (several may; duplicates are harmless).
    pub checkpoints: bool,
    /// The id this runtime reports GC progress under. Stable across restarts
    /// (so a returning host keeps its progress), unlike the log client's id,
    /// which must be new for every process (it keys append deduplication).
    pub gc_client_id: Option<ClientId>,
}

impl RuntimeConfig {
    pub fn new(name: impl Into<String>) -> RuntimeConfig {
        RuntimeConfig {
            name: name.into(),
            gc_interval: Duration::from_secs(1),
            apply_timeout: Duration::from_secs(30),
            poll_wait: Duration::from_secs(1),
            checkpoints: true,
            gc_client_id: None,
        }
    }
}

struct RuntimeInner<T: Transport> {
    client: LogClient<T>,
    config: RuntimeConfig,
    objects: Mutex<Vec<(StreamId, Weak<dyn Tracked>)>>,
    nonce: AtomicU64,
    /// Bumped when the set of streams changes, so the reporter re-registers.
    streams_version: AtomicU64,
    /// Progress limits of objects being opened (their checkpoint version,
    /// or 0 before one is chosen): the runtime must not report past an
    /// entry it has not read yet.
    floors: Mutex<BTreeMap<u64, Position>>,
    next_floor: AtomicU64,
}

impl<T: Transport> RuntimeInner<T> {
    fn gc_client_id(&self) -> ClientId {
        self.config.gc_client_id.unwrap_or(self.client.client_id())
    }

    /// Streams of every open object, plus `extra`.
    fn streams_with(&self, extra: Option<StreamId>) -> Vec<StreamId> {
        let objects = self.objects.lock().expect("objects lock");
        let mut streams: Vec<StreamId> = objects
            .iter()
            .filter(|(_, object)| object.strong_count() > 0)
            .map(|(stream, _)| *stream)
            .chain(extra)
            .collect();
        streams.sort();
        streams.dedup();
        streams
    }
}

/// Holds the runtime's reported progress at or below a floor while an
/// object opens; removed on drop.
struct Floor<'a> {
    floors: &'a Mutex<BTreeMap<u64, Position>>,
    id: u64,
}

impl Floor<'_> {
    fn set(&self, position: Position) {
        self.floors.lock().expect("floors lock").insert(self.id, position);
    }
}

impl Drop for Floor<'_> {
    fn drop(&mut self) {
        self.floors.lock().expect("floors lock").remove(&self.id);
    }
}

/// The SMR runtime of one process: owns the GC reporter for its objects.
#[derive(Clone)]
pub struct Runtime<T: Transport> {
    inner: Arc<RuntimeInner<T>>,
}

impl<T: Transport> Runtime<T> {
    /// Starts a runtime; its GC client id is the log client's id.
    pub fn new(client: LogClient<T>, config: RuntimeConfig) -> Runtime<T> {
        let inner = Arc::new(RuntimeInner {
            client,
            config,
            objects: Mutex::new(Vec::new()),
            nonce: AtomicU64::new(1),
            streams_version: AtomicU64::new(0),
            floors: Mutex::new(BTreeMap::new()),
            next_floor: AtomicU64::new(0),
        });
        tokio::spawn(report_gc(Arc::downgrade(&inner)));
        Runtime { inner }
    }

    pub fn client(&self) -> &LogClient<T> {
        &self.inner.client
    }

    /// Opens the object replicated on `stream`: loads its newest checkpoint,
    /// then follows the stream. Returns once it has caught up with the tail.
    pub async fn open<O: Object>(&self, stream: StreamId) -> Result<Replicated<O, T>, SmrError> {
        let inner = &self.inner;
        let floor = Floor { floors: &inner.floors, id: inner.next_floor.fetch_add(1, Ordering::Relaxed) };
        floor.set(0);
        // Register as a reader of the stream before choosing a checkpoint:
        // from then on the log keeps every entry this runtime has not
        // passed, so a delete newer than the checkpoint cannot be collected
        // before this object reads it (which would resurrect the key).
        inner.client.register(inner.gc_client_id(), &inner.config.name, inner.streams_with(Some(stream))).await?;
        let mut core = Core {
            object: O::default(),
            applied: 0,
            live: BTreeMap::new(),
            dead: 0,
            unreported: Vec::new(),
            outcomes: HashMap::new(),
            checkpoint_version: 0,
            checkpointing: false,
        };
        // Of the live checkpoints (read linearizably, from the leader), the
        // one covering the most: two runtimes may checkpoint at once, and the
        // later position need not be the later version.
        let mut chosen: Option<(Position, Entry)> = None;
        for entry in inner.client.checkpoints(stream).await? {
            match postcard::from_bytes::<CheckpointPayload<serde::de::IgnoredAny>>(&entry.payload) {
                Ok(payload) if chosen.as_ref().is_none_or(|(version, _)| payload.version > *version) => {
                    chosen = Some((payload.version, entry));
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(%stream, position = entry.position, %error, "skipping an undecodable checkpoint")
                }
            }
        }
        if let Some((_, entry)) = chosen {
            match postcard::from_bytes::<CheckpointPayload<O::State>>(&entry.payload) {
                Ok(payload) => {
                    floor.set(payload.version);
                    core.object = O::from_state(payload.state);
                    core.applied = payload.version;
                    core.checkpoint_version = payload.version;
                    let size = record_size(&Record {
                        streams: entry.streams.clone(),
                        kind: entry.kind,
                        payload: entry.payload.clone(),
                    });
                    core.live.insert(entry.position, LiveEntry::new(&entry, stream, size as u32));
                }
                Err(error) => {
                    tracing::warn!(%stream, %error, "the newest checkpoint does not decode; replaying the whole stream")
                }
            }
        }
        let start = core.applied;
        let (applied, _) = watch::channel(start);
        let (changes, _) = watch::channel(0);
        let shared = Arc::new(Shared { stream, core: Mutex::new(core), applied, changes });
        {
            let tracked: Weak<Shared<O>> = Arc::downgrade(&shared);
            let tracked: Weak<dyn Tracked> = tracked;
            let mut objects = self.inner.objects.lock().expect("objects lock");
            objects.retain(|(_, object)| object.strong_count() > 0);
            objects.push((stream, tracked));
        }
        // The object now holds the runtime's progress down itself.
        drop(floor);
        self.inner.streams_version.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(follow(Arc::downgrade(&shared), self.inner.client.clone(), self.inner.config.poll_wait));
        let object = Replicated { shared, runtime: self.clone() };
        object.sync().await?;
        Ok(object)
    }
}

/// A handle to one replicated object. Dropping every handle stops its follower.
pub struct Replicated<O: Object, T: Transport> {
    shared: Arc<Shared<O>>,
    runtime: Runtime<T>,
}

impl<O: Object, T: Transport> Clone for Replicated<O, T> {
    fn clone(&self) -> Self {
        Replicated { shared: self.shared.clone(), runtime: self.runtime.clone() }
    }
}

impl<O: Object, T: Transport> Replicated<O, T> {
    pub fn stream(&self) -> StreamId {
        self.shared.stream
    }

    /// Appends `op` and returns its outcome once this object has applied it.
    pub async fn submit(&self, op: O::Op) -> Result<(Position, O::Outcome), SmrError> {
        let inner = &self.runtime.inner;
        let nonce = inner.nonce.fetch_add(1, Ordering::Relaxed);
        let envelope = Envelope { writer: inner.client.client_id(), nonce, op };
        let payload = postcard::to_stdvec(&envelope).expect("postcard encoding to a Vec cannot fail");
        let position = inner.client.append(&[self.shared.stream], payload).await?;
        self.wait_applied(position + 1).await?;
        let outcome = self.shared.core.lock().expect("object lock").outcomes.remove(&nonce);
        let outcome = outcome.ok_or(SmrError::Stopped)?;
        self.maybe_checkpoint();
        Ok((position, outcome))
    }

    /// Waits until every entry below `position` has been applied here.
    pub async fn wait_applied(&self, position: Position) -> Result<(), SmrError> {
        let mut applied = self.shared.applied.subscribe();
        let outcome = tokio::time::timeout(self.runtime.inner.config.apply_timeout, async {
            applied.wait_for(|applied| *applied >= position).await.map(|_| ())
        })
        .await;
        match outcome {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(SmrError::Stopped),
            Err(_) => Err(SmrError::ApplyTimeout(position)),
        }
    }

    /// Catches up with the log's tail: after this, reads reflect every write
    /// acknowledged before the call (linearizable).
    pub async fn sync(&self) -> Result<(), SmrError> {
        let tail = self.runtime.inner.client.tail().await?;
        self.wait_applied(tail).await
    }

    /// Reads the local state without syncing (may be stale).
    pub fn read_local<R>(&self, read: impl FnOnce(&O) -> R) -> R {
        read(&self.shared.core.lock().expect("object lock").object)
    }

    /// A linearizable read.
    pub async fn read<R>(&self, read: impl FnOnce(&O) -> R) -> Result<R, SmrError> {
        self.sync().await?;
        Ok(self.read_local(read))
    }

    /// Position below which everything has been applied here.
    pub fn applied(&self) -> Position {
        self.shared.core.lock().expect("object lock").applied
    }

    /// Changes whenever an update is applied: watch it to react to changes.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.shared.changes.subscribe()
    }

    /// Entries this object's state still depends on.
    pub fn live_entries(&self) -> usize {
        self.shared.core.lock().expect("object lock").live.len()
    }

    fn maybe_checkpoint(&self) {
        if !self.runtime.inner.config.checkpoints {
            return;
        }
        let due = {
            let mut core = self.shared.core.lock().expect("object lock");
            let due = core.dead >= CHECKPOINT_DEAD_ENTRIES_MIN && !core.checkpointing;
            if due {
                core.checkpointing = true;
            }
            due
        };
        if due {
            let object = self.clone();
            tokio::spawn(async move {
                if let Err(error) = object.checkpoint().await {
                    tracing::warn!(stream = %object.stream(), %error, "checkpoint failed");
                }
                object.shared.core.lock().expect("object lock").checkpointing = false;
            });
        }
    }

    /// Writes a checkpoint of the current state into the stream.
    pub async fn checkpoint(&self) -> Result<Option<Position>, SmrError> {
        let payload = {
            let core = self.shared.core.lock().expect("object lock");
            let payload = CheckpointPayload { version: core.applied, state: core.object.to_state() };
            postcard::to_stdvec(&payload).expect("postcard encoding to a Vec cannot fail")
        };
        if payload.len() > CHECKPOINT_BYTES_MAX {
            tracing::warn!(stream = %self.stream(), bytes = payload.len(), "state too large to checkpoint");
            return Ok(None);
        }
        let record = Record { streams: vec![self.shared.stream], kind: EntryKind::Checkpoint, payload: payload.into() };
        let position = self.runtime.inner.client.append_record(record).await?;
        self.wait_applied(position + 1).await?;
        metrics::counter!("smr_checkpoints_total").increment(1);
        Ok(Some(position))
    }
}

/// The follower: applies the stream to the object, forever.
async fn follow<O: Object, T: Transport>(shared: Weak<Shared<O>>, client: LogClient<T>, poll_wait: Duration) {
    let me = client.client_id();
    let mut backoff = Duration::from_millis(50);
    loop {
        let Some(object) = shared.upgrade() else {
            return;
        };
        let from = object.core.lock().expect("object lock").applied;
        let stream = object.stream;
        drop(object);
        let chunk = match client.read_stream(stream, from, u64::MAX, None, poll_wait).await {
            Ok(chunk) => chunk,
            Err(error) => {
                tracing::debug!(%stream, %error, "stream read failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        let Some(object) = shared.upgrade() else {
            return;
        };
        let changed = !chunk.entries.is_empty();
        for entry in chunk.entries {
            object.apply_entry(entry, me);
        }
        let applied = {
            let mut core = object.core.lock().expect("object lock");
            core.applied = core.applied.max(chunk.next);
            core.applied
        };
        object.applied.send_replace(applied);
        if changed {
            object.changes.send_modify(|version| *version += 1);
        }
    }
}

/// The GC reporter: every interval, reports progress and obsolete entries.
async fn report_gc<T: Transport>(inner: Weak<RuntimeInner<T>>) {
    let mut registered_version = u64::MAX;
    loop {
        let Some(runtime) = inner.upgrade() else {
            return;
        };
        let interval = runtime.config.gc_interval;
        let objects: Vec<(StreamId, Arc<dyn Tracked>)> = runtime
            .objects
            .lock()
            .expect("objects lock")
            .iter()
            .filter_map(|(stream, object)| object.upgrade().map(|object| (*stream, object)))
            .collect();
        if !objects.is_empty() {
            let version = runtime.streams_version.load(Ordering::SeqCst);
            if version != registered_version {
                let mut streams: Vec<StreamId> = objects.iter().map(|(stream, _)| *stream).collect();
                streams.sort();
                streams.dedup();
                match runtime.client.register(runtime.gc_client_id(), &runtime.config.name, streams).await {
                    Ok(()) => registered_version = version,
                    Err(error) => {
                        tracing::debug!(%error, "GC client registration failed; will retry")
                    }
                }
            }
            let floor = runtime.floors.lock().expect("floors lock").values().min().copied();
            let progress = objects.iter().map(|(_, object)| object.applied()).chain(floor).min().unwrap_or(0);
            let mut locators: Vec<Locator> = objects.iter().flat_map(|(_, object)| object.take_locators()).collect();
            // Reports go out in bounded pieces; what the log does not take
            // (its pending set is full) or what fails waits for next time.
            loop {
                let rest = locators.split_off(locators.len().min(LOCATORS_PER_REPORT_MAX));
                let report = GcReport { client: runtime.gc_client_id(), progress, locators };
                let sent = report.locators.len();
                let unsent = match runtime.client.gc_report(&report).await {
                    Ok(outcome) if outcome.accepted as usize >= sent => None,
                    Ok(outcome) => Some(report.locators[outcome.accepted as usize..].to_vec()),
                    Err(error) => {
                        tracing::debug!(%error, "GC report failed; keeping its locators for the next one");
                        Some(report.locators)
                    }
                };
                if let Some(mut unsent) = unsent {
                    unsent.extend(rest);
                    // Locators name their streams, so any object may hold them.
                    objects[0].1.return_locators(unsent);
                    break;
                }
                if rest.is_empty() {
                    break;
                }
                locators = rest;
            }
        }
        drop(runtime);
        tokio::time::sleep(interval).await;
    }
}
