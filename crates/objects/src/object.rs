//! An object's owner at run time: drives [`crate::owner::Owner`] over the
//! component clients, and offers the block client API (`write_at`,
//! `read_at`, `unmap`, `flush`).
//!
//! Every message to a component goes out in its owner session's sequence
//! (see [`crate::component`]), numbered under the owner's lock, so each
//! component applies them in the order the owner decided them. Resync jobs
//! run as tasks: begin, wait for the source to be ready, copy the blocks the
//! source's tracking bitmap marks (or every block), end.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blockstore::{ComponentId, ComponentInfo, Lsn, BLOCK_SIZE};
use bytes::Bytes;
use futures::StreamExt;
use roaring::RoaringBitmap;
use tokio::sync::{oneshot, Notify};
use wire::Transport;

use crate::block_cache::{BlockCache, ObjectCache, WriteMark, LEASE};
use crate::component::{Client, ClientError, ComponentError, Reply, Request};
use crate::crypt::{DataKey, Xts};
use crate::ec::{self, Layout};
use crate::lease::{self, ServingLease};
use crate::owner::{Action, Index, Input, Op, Owner, Source, Status};

mod erasure;

/// Blocks per message to a component.
const MESSAGE_BLOCKS_MAX: u64 = 256;
/// Blocks copied per resync step, at most.
const RESYNC_BLOCKS: u64 = 64;
/// Resync steps in flight per resync, and blocks in flight (2 MiB): an
/// outage's scattered writes make steps of a block or two, and only many at
/// once keep both copies busy (bench/RESULTS.md: 16,384 single blocks
/// copied at 52 MiB/s with 8 in flight, 108 MiB/s with 64), while 8 steps
/// of 64 blocks already fill the bandwidth (270-300 MiB/s with 8 or 64).
const RESYNC_IN_FLIGHT: usize = 64;
const RESYNC_BLOCKS_IN_FLIGHT: u32 = 512;
const _: () = assert!(RESYNC_BLOCKS <= RESYNC_BLOCKS_IN_FLIGHT as u64, "a step must fit the blocks in flight");
/// Operations in flight per object. A new owner relies on it: a component
/// that was active has every LSN up to `c - INFLIGHT_MAX`, where `c` is
/// any other component's committed LSN.
pub const INFLIGHT_MAX: usize = 256;
/// How long a resync waits for its source to hold what was sent to it.
const SOURCE_WAIT_MAX: Duration = Duration::from_secs(30);
/// How often a resync waiting for its turn checks its plan still stands.
const ADMISSION_CHECK: Duration = Duration::from_millis(500);
/// How long a new owner waits for each component's first answer.
const RECOVER_ASK_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a read waits for its owner to be able to vouch for what it
/// serves (`Object::vouch`): a failed copy's absence recorded, say.
const VOUCH_WAIT: Duration = Duration::from_secs(3);
/// How often a read waiting for that looks again, besides when a renewal
/// ends or states are recorded.
const VOUCH_LOOK: Duration = Duration::from_millis(50);
/// How long a lease renewal waits for a copy's answer before failing it.
const RENEW_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    #[error("offset {offset} and length {length} are not whole {BLOCK_SIZE}-byte blocks")]
    Unaligned { offset: u64, length: u64 },
    #[error("bytes {offset}..{end} are past the end of the object ({size} bytes)")]
    OutOfRange { offset: u64, end: u64, size: u64 },
    #[error("no copy of the object is available")]
    Unavailable,
    #[error("every copy failed to read: {0}")]
    Read(String),
    #[error("this host no longer owns the object (a newer owner took it over)")]
    Deposed,
    #[error("cannot open the object: {0}")]
    Recover(String),
    /// A compare and write whose write was under way when a newer owner
    /// took the object: it may or may not have been stored, so it must
    /// not be tried again as if it had not (the compare would then fail on
    /// its own data).
    #[error("the object's owner changed during a compare and write: whether it wrote is unknown")]
    Indeterminate,
    /// No copy taking writes had room for the blocks; nothing was written.
    #[error("no room for the write on the object's disks")]
    NoSpace,
    /// [`Object::erase_key`] of an object not encrypted at rest.
    #[error("the object is not encrypted at rest: it has no key to erase")]
    NotEncrypted,
}

/// The component reads of one I/O that failed: why, and how many went
/// unanswered (`wire::CallError::is_unanswered`: the host could not be
/// reached, went away or was too slow).
#[derive(Default)]
struct Misses {
    messages: Vec<String>,
    unanswered: usize,
}

impl Misses {
    fn push(&mut self, message: String, error: &ClientError) {
        self.unanswered += usize::from(matches!(error, ClientError::Call(call) if call.is_unanswered()));
        self.messages.push(message);
    }

    /// Whether no component answered at all (or none was asked).
    fn all_unanswered(&self) -> bool {
        self.unanswered == self.messages.len()
    }

    /// The I/O's error once no component served it. None answered: their
    /// hosts are gone and the owner has not marked them away yet, so the
    /// object is unavailable for now, as once it has (the target holds
    /// such an I/O until the object is back). Otherwise a read error.
    fn into_error(self) -> ObjectError {
        if self.all_unanswered() {
            ObjectError::Unavailable
        } else {
            ObjectError::Read(self.messages.join("; "))
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// The catalog names a newer owner: this one must stop.
    #[error("a newer owner holds the object")]
    Deposed,
    #[error("{0}")]
    Failed(String),
}

/// Records component states where a new owner will find them (the
/// catalog). Writes acknowledged only by the remaining copies after a copy
/// went away are answered once its absence is recorded, so a new owner
/// never takes a copy that missed them for a current one.
pub type Persister =
    Arc<dyn Fn(Vec<Status>) -> Pin<Box<dyn Future<Output = Result<(), PersistError>> + Send>> + Send + Sync>;

/// A resync waiting to copy: the owner's epoch, the copy it brings back
/// and its plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResyncJob {
    pub epoch: u64,
    pub component: Index,
    pub plan: u64,
}

/// Lets a resync copy when its turn comes (the node orders resyncs through
/// the cluster's persistent task queue and bounds how many run at once).
/// What the future yields is held while the resync copies; dropping it, or
/// the future before it is ready, gives the turn up.
pub type Admission = Arc<dyn Fn(ResyncJob) -> Pin<Box<dyn Future<Output = Box<dyn Send>> + Send>> + Send + Sync>;

/// What an owner calls out to: where it records component states, who
/// lets its resyncs run, and the host's block cache. Without them (tests,
/// the simulator) nothing is recorded, resyncs run at once and every read
/// goes to a component.
#[derive(Clone, Default)]
pub struct Hooks {
    pub persister: Option<Persister>,
    pub admission: Option<Admission>,
    pub cache: Option<Arc<BlockCache>>,
    /// The host's rate for resync copying (none: unpaced).
    pub resync_pace: Option<Arc<crate::pace::Pace>>,
    /// No owner held the object before this one (the node knows from the
    /// catalog's epoch): `recover` need not wait out an older owner's cache
    /// lease before the first write.
    pub first_owner: bool,
    /// The owner before this one handed the object over, its cache closed
    /// before it consented (the node's `OBJECT_HAND_OVER`), and had waited
    /// out any older owner's lease itself (`close_when_idle`): nor need
    /// `recover`.
    pub handed_over: bool,
    /// The object is erasure-coded with this layout (none: copies).
    pub erasure: Option<Layout>,
    /// The object is encrypted at rest with this key (see [`crate::crypt`]).
    pub key: Option<DataKey>,
    /// Makes and records a new key for [`Object::erase_key`].
    pub rekeyer: Option<Rekeyer>,
}

/// Makes a new key for the object and records it where the object's next
/// owner will find it (the catalog), answering it once recorded.
pub type Rekeyer = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<DataKey, PersistError>> + Send>> + Send + Sync>;

/// What a submitted operation's `Send`s carry: the same bytes to every
/// component (copies), or each component its own (erasure coding).
#[derive(Clone)]
enum Payload {
    Same(Bytes),
    /// A piece per component: erasure-coded chunks, each followed by its
    /// before-image, or alone where `local` (each component reads its
    /// own).
    Each {
        pieces: Arc<Vec<Bytes>>,
        local: bool,
    },
}

impl Payload {
    fn none() -> Payload {
        Payload::Same(Bytes::new())
    }

    fn to(&self, component: Index) -> Bytes {
        match self {
            Payload::Same(data) => data.clone(),
            Payload::Each { pieces, .. } => pieces[component].clone(),
        }
    }

    fn before_images_local(&self) -> bool {
        matches!(self, Payload::Each { local: true, .. })
    }
}

/// Stripe locks of an erasure-coded object (stripe `s` takes lock
/// `s % STRIPE_LOCKS`).
const STRIPE_LOCKS: usize = 64;

/// A client waiting for its write or unmap: the answer goes to `done` once
/// `mark` (if the object caches) has dropped the blocks from the cache.
struct Waiter {
    done: oneshot::Sender<Result<Lsn, ObjectError>>,
    mark: Option<WriteMark>,
}

impl Waiter {
    fn answer(self, result: Result<Lsn, ObjectError>) {
        drop(self.mark);
        let _ = self.done.send(result);
    }
}

/// Resync figures, for status and tests.
#[derive(Debug, Default)]
pub struct ResyncStats {
    pub blocks_copied: AtomicU64,
    pub full_copies: AtomicU64,
    pub resyncs_done: AtomicU64,
    /// Blocks the resyncs under way still have to copy.
    pub blocks_to_go: AtomicU64,
    /// Blocks found corrupt on read and rewritten from another copy.
    pub blocks_repaired: AtomicU64,
    /// Blocks copied since the resyncs under way began, and when (ms).
    pub blocks_copied_current: AtomicU64,
    pub current_started_ms: AtomicU64,
    /// Erasure-coded: readmissions after more than m components were away
    /// at once (see [`Action::Readmit`]).
    pub readmissions: AtomicU64,
}

struct State {
    owner: Owner,
    /// Per component: its session and the next sequence number.
    sessions: Vec<(u64, u64)>,
    waiters: BTreeMap<u64, Waiter>,
    next_request: u64,
    /// Answers held until a new absence is recorded: writes done, and
    /// erasure-coded writes refused for want of space, whose promise that
    /// they change nothing holds once the record shows the components
    /// that declined them away (a new owner then rolls them back).
    held: Vec<(u64, Result<Lsn, ObjectError>)>,
    barrier: bool,
    /// The statuses last recorded, and whether newer ones wait.
    persisted: Vec<Status>,
    /// The components a newer owner could take as current opening from
    /// any statuses sent to be recorded since the last record (one that
    /// failed may still have landed: `lease::from_record`), and the
    /// statuses recorded when this owner opened, until it records its own.
    recording: u64,
    opened_from: Vec<Status>,
    persisting: bool,
    dirty: bool,
    /// Persists asked for so far, and how many of them the last record
    /// covers (it was taken after the `recorded_asks`-th).
    persist_asks: u64,
    recorded_asks: u64,
    /// Deposed or closed: no more I/O.
    closed: bool,
}

pub struct Object<T: Transport> {
    epoch: u64,
    blocks: u64,
    ids: Vec<ComponentId>,
    clients: Vec<std::sync::RwLock<Client<T>>>,
    state: Mutex<State>,
    next_session: AtomicU64,
    inflight: tokio::sync::Semaphore,
    /// Writes hold it shared until answered; a compare-and-write holds it
    /// alone, so its read, compare and write are one step no other write
    /// to the object overlaps, wherever the writes come from.
    atomic: tokio::sync::RwLock<()>,
    persister: Option<Persister>,
    admission: Option<Admission>,
    resync_pace: Option<Arc<crate::pace::Pace>>,
    /// Blocks a component's next resync copies besides its source's
    /// tracking bitmap: what an interrupted resync under the previous
    /// owner had marked (a write that owner had in flight may have reached
    /// only that component), and what this owner's resyncs sent it.
    extra: Mutex<HashMap<Index, RoaringBitmap>>,
    /// The newest LSN a returning copy said it holds: above its stale LSN,
    /// its resync also copies the blocks it wrote itself.
    reported_newest: Mutex<HashMap<Index, Lsn>>,
    /// Erasure-coded: components whose disks may hold rows a resync
    /// rebuilt that has not ended (sent under this owner, under any plan,
    /// or found mid-resync by it): never readmitted as they stand.
    rows_rebuilt: Mutex<HashSet<Index>>,
    /// Erasure-coded: components whose disks said, when last probed, that
    /// nothing landed under the resync they are in (nor one before it). A
    /// readmission checks that still holds once it has rolled them back.
    untouched_when_probed: Mutex<HashSet<Index>>,
    /// Chunk unmaps rollbacks reported, to be completed on every component
    /// once a readmission takes k back (a rollback reports them once).
    unmaps_to_complete: Mutex<Vec<(u64, u64)>>,
    /// Signalled when states are recorded, and when the object closes.
    recorded: Notify,
    pub resync_stats: ResyncStats,
    /// Erasure-coded: stripes written whole, with no read and no
    /// before-image sent.
    pub full_stripe_writes: AtomicU64,
    /// Blocks read recently (see [`crate::block_cache`]).
    cache: Option<Arc<ObjectCache>>,
    /// A new owner takes no write before this: an older owner may serve
    /// blocks from its cache until its lease runs out.
    writes_after: Option<tokio::time::Instant>,
    /// Data is served only while this holds (see [`crate::lease`]).
    lease: ServingLease,
    /// Signalled when a lease renewal ends and when statuses are recorded.
    lease_changed: Notify,
    /// Erasure-coded: the layout, and the stripe locks. A write reads the
    /// data chunks of its rows before it writes them, so writes (and reads
    /// that rebuild a chunk from the others) to one stripe take turns; each
    /// holds its stripe until every active component has it.
    erasure: Option<Layout>,
    stripes: Vec<tokio::sync::Mutex<()>>,
    /// Encrypted at rest: the cipher of the object's key, replaced only
    /// while no write is under way (`erase_key` holds `atomic` alone).
    /// Whether there is one is fixed at open, so an object without a key
    /// takes no lock on its reads and writes.
    cipher: Option<std::sync::RwLock<Arc<Xts>>>,
    rekeyer: Option<Rekeyer>,
}

impl<T: Transport> Object<T> {
    /// Opens an object whose components all hold the same data up to
    /// `committed` (a new object: 0).
    pub fn open(epoch: u64, blocks: u64, components: Vec<(ComponentId, Client<T>)>, committed: Lsn) -> Arc<Self> {
        Self::open_with(epoch, blocks, components, committed, Hooks::default())
    }

    /// As [`Object::open`], with hooks.
    pub fn open_with(
        epoch: u64,
        blocks: u64,
        components: Vec<(ComponentId, Client<T>)>,
        committed: Lsn,
        hooks: Hooks,
    ) -> Arc<Self> {
        let count = components.len();
        let owner = Owner::new(vec![Status::Active; count], committed);
        Self::with_owner(epoch, blocks, components, owner, hooks, None, tokio::time::Instant::now())
    }

    /// Which components the serving lease needs, from what this owner
    /// counts active (`statuses`) and what a newer owner could open from.
    /// Without a persister (tests, benchmarks) there is no catalog record
    /// for a newer owner to open from: only what this owner counts active.
    fn note_needed(&self, state: &State, statuses: &[Status]) {
        let needed = match self.persister {
            Some(_) => {
                let records = [&state.persisted[..], &state.opened_from[..]];
                lease::needed(statuses, records, self.holders()) | state.recording
            }
            None => lease::needed(statuses, [], self.holders()),
        };
        self.lease.set_needed(needed);
    }

    /// Components that must hold a write for it to be done (copies: 1;
    /// erasure coding: k).
    fn holders(&self) -> usize {
        self.erasure.map_or(1, |layout| layout.data)
    }

    fn with_owner(
        epoch: u64,
        blocks: u64,
        components: Vec<(ComponentId, Client<T>)>,
        owner: Owner,
        hooks: Hooks,
        writes_after: Option<tokio::time::Instant>,
        lease_origin: tokio::time::Instant,
    ) -> Arc<Self> {
        let count = components.len();
        // Plans unique to this owner (see `Owner::planning_above`).
        let owner = owner.planning_above(epoch << 32).needing_holders(hooks.erasure.map_or(1, |layout| layout.data));
        let persisted = owner.statuses();
        let (ids, clients) = components.into_iter().map(|(id, client)| (id, std::sync::RwLock::new(client))).unzip();
        let object = Arc::new(Object {
            epoch,
            blocks,
            ids,
            clients,
            state: Mutex::new(State {
                owner,
                sessions: (0..count).map(|index| (index as u64 + 1, 1)).collect(),
                waiters: BTreeMap::new(),
                next_request: 0,
                held: Vec::new(),
                barrier: false,
                persisted,
                recording: 0,
                opened_from: Vec::new(),
                persisting: false,
                dirty: false,
                persist_asks: 0,
                recorded_asks: 0,
                closed: false,
            }),
            next_session: AtomicU64::new(count as u64 + 1),
            inflight: tokio::sync::Semaphore::new(INFLIGHT_MAX),
            atomic: tokio::sync::RwLock::new(()),
            persister: hooks.persister,
            admission: hooks.admission,
            resync_pace: hooks.resync_pace,
            extra: Mutex::new(HashMap::new()),
            reported_newest: Mutex::new(HashMap::new()),
            rows_rebuilt: Mutex::new(HashSet::new()),
            untouched_when_probed: Mutex::new(HashSet::new()),
            unmaps_to_complete: Mutex::new(Vec::new()),
            recorded: Notify::new(),
            resync_stats: ResyncStats::default(),
            full_stripe_writes: AtomicU64::new(0),
            // One clock for both leases: a request's send time stamps each.
            cache: hooks.cache.map(|shared| ObjectCache::new(shared, lease_origin)),
            writes_after,
            lease: ServingLease::new(count, lease_origin),
            lease_changed: Notify::new(),
            erasure: hooks.erasure,
            stripes: match hooks.erasure {
                Some(_) => (0..STRIPE_LOCKS).map(|_| tokio::sync::Mutex::new(())).collect(),
                None => Vec::new(),
            },
            cipher: hooks.key.as_ref().map(|key| std::sync::RwLock::new(Arc::new(Xts::new(key)))),
            rekeyer: hooks.rekeyer,
        });
        {
            let state = object.state.lock().expect("object lock");
            object.note_needed(&state, &state.owner.statuses());
        }
        object
    }

    /// Opens an object as its new owner at `epoch` (higher than any owner
    /// before): asks every component for its state (which fences the older
    /// owner), takes the components the catalog last recorded (`recorded`)
    /// as active as candidates, and goes on from the highest committed LSN
    /// among them. If every copy is recorded away, the one recorded with
    /// the highest stale LSN holds every acknowledged write (it was the
    /// last to go): it is the candidate once it answers. Components
    /// behind it are resynced from the recent-write windows of one at it;
    /// components that do not answer are absent, tracked from a lower
    /// bound of what they hold.
    pub async fn recover(
        epoch: u64,
        blocks: u64,
        components: Vec<(ComponentId, Client<T>)>,
        recorded: Vec<Status>,
        hooks: Hooks,
    ) -> Result<Arc<Self>, ObjectError> {
        // Before any ask is sent: an answer counts for the serving lease
        // as if sent now (`lease`).
        let asked = tokio::time::Instant::now();
        let asks = components.iter().map(|(id, client)| async move {
            match tokio::time::timeout(RECOVER_ASK_TIMEOUT, client.info(epoch, *id)).await {
                Ok(Ok(info)) => Ok(info),
                Ok(Err(ClientError::Component(ComponentError::StaleEpoch { .. }))) => Err(None),
                Ok(Err(error)) => Err(Some(error.to_string())),
                Err(_) => Err(Some("no answer".to_string())),
            }
        });
        let infos = futures::future::join_all(asks).await;
        // Every component that answered fences the older owner from now
        // on; a block it cached stays servable until its lease runs out
        // (unless it closed its cache and handed the object over).
        let lease_left = !hooks.first_owner && !hooks.handed_over;
        let writes_after = lease_left.then(|| tokio::time::Instant::now() + LEASE);
        if infos.iter().any(|info| matches!(info, Err(None))) {
            return Err(ObjectError::Deposed);
        }
        let infos: Vec<Result<ComponentInfo, String>> =
            infos.into_iter().map(|info| info.map_err(|reason| reason.unwrap_or_default())).collect();
        for (index, info) in infos.iter().enumerate() {
            if let Err(reason) = info {
                tracing::warn!(component = index, %reason, "component does not answer the new owner");
            }
        }
        // A copy recorded active has every acknowledged write, even one
        // still mid-resync on its disk (its resync had ended, or it became
        // the copy of record, before it was recorded active); such a copy
        // counts as current only up to its stale LSN.
        let recorded_stale = |status: &Status| match status {
            Status::Active => None,
            Status::Absent { stale, .. } | Status::Resyncing { stale, .. } => Some(*stale),
        };
        // Too few recorded active to take I/O (copies: none; erasure
        // coding: fewer than k). Every write answered done had k holders
        // (copies: one), each recorded active since or recorded away at a
        // stale LSN at or above it (completions wait for the record), so
        // the k-th highest of the recorded stale LSNs (active counting as
        // above all) is at or above the newest write answered done: a
        // component recorded away at or above it that holds that much holds
        // every such write (copies: the last copy to go). A component that
        // answers, not mid-resync, counts only up to what it holds: a stale
        // LSN may count as held LSNs that were refused everywhere (a
        // readmission rolled them back, or a copy of record was made above
        // them), and such a component, holding every write answered done
        // below them, holds every one (its committed LSN is at or above
        // each). Mid-resync, a disk reports the resync's stale LSN as
        // committed, which says nothing of what the record vouches for; a
        // component created again reports 0, having lost what it held: both
        // count as recorded, so neither lowers the bar.
        let needed = hooks.erasure.map_or(1, |layout| layout.data);
        let all_away = recorded.iter().filter(|status| **status == Status::Active).count() < needed;
        let level = |index: usize| match (recorded_stale(&recorded[index]), &infos[index]) {
            (None, _) => Lsn::MAX,
            (Some(stale), Ok(info)) if info.sync.is_none() && info.committed_lsn > 0 => stale.min(info.committed_lsn),
            (Some(stale), _) => stale,
        };
        let mut levels: Vec<Lsn> = (0..recorded.len()).map(level).collect();
        levels.sort_unstable_by(|a, b| b.cmp(a));
        let threshold = levels.get(needed - 1).copied().unwrap_or(0);
        let candidate = |index: usize| -> Option<Lsn> {
            let info = infos[index].as_ref().ok()?;
            match &recorded[index] {
                Status::Active => Some(info.committed_lsn),
                // A chunk mid-resync holds rebuilt rows no rollback undoes,
                // unless nothing landed under any resync since it was last
                // complete: it holds what it held when the first began (a
                // rollback then ends that resync, below).
                _ if hooks.erasure.is_some() && info.sync.is_some() && !info.untouched_by_resync => None,
                status if all_away && recorded_stale(status).is_some_and(|stale| stale >= threshold) => {
                    // Above its stale LSN it may hold a deposed owner's
                    // writes: it counts to there.
                    let held = info.committed_lsn.min(recorded_stale(status).unwrap_or(0));
                    (held >= threshold).then_some(held)
                }
                _ => None,
            }
        };
        let Some(committed) = (0..components.len()).filter_map(candidate).max() else {
            let reasons: Vec<String> = infos
                .iter()
                .enumerate()
                .map(|(index, info)| match (info, recorded_stale(&recorded[index])) {
                    (Ok(info), Some(stale)) => format!(
                        "component {index} holds LSN {} and is recorded away at {stale} (needed: {threshold}{})",
                        info.committed_lsn,
                        if info.sync.is_some() { ", mid-resync" } else { "" }
                    ),
                    (Ok(info), None) => format!("component {index} holds LSN {}", info.committed_lsn),
                    (Err(reason), _) => format!("component {index}: {reason}"),
                })
                .collect();
            return Err(ObjectError::Recover(format!("no current copy answers: {}", reasons.join("; "))));
        };
        // Copies: those at the highest LSN; the rest catch up by resync.
        // Erasure-coded: every candidate (a chunk behind cannot be copied
        // from one ahead, only rebuilt from k others), each rolled back to
        // the lowest LSN among them below.
        let current: Vec<Index> = match hooks.erasure {
            None => (0..components.len()).filter(|index| candidate(*index) == Some(committed)).collect(),
            Some(layout) => {
                let current: Vec<Index> = (0..components.len()).filter(|index| candidate(*index).is_some()).collect();
                if current.len() < layout.data {
                    return Err(ObjectError::Recover(format!(
                        "{} of the {} components that hold the object's chunks are current and answer; {} are needed",
                        current.len(),
                        layout.width(),
                        layout.data
                    )));
                }
                current
            }
        };
        let lowest = current.iter().filter_map(|index| candidate(*index)).min().unwrap_or(committed);
        // Every write above the lowest current LSN was never acknowledged
        // (a current component lacks it), and may have reached only some
        // chunks of its stripe: each current component above it rolls its
        // chunk writes back, so every stripe is one codeword again and a
        // chunk that is away decodes right. Its chunk unmaps above it are
        // completed below instead.
        let mut unmaps = Vec::new();
        let committed = match hooks.erasure {
            // Every current component holding more than the lowest,
            // whatever it counted as (one recorded away counts only up to
            // its stale LSN, and may hold writes above it on disk).
            Some(_) => {
                for &index in &current {
                    let Ok(info) = &infos[index] else { continue };
                    // And to one at `lowest` that declined the write above
                    // it for want of room: it takes no write until a
                    // rollback below that gives it up.
                    if info.committed_lsn <= lowest
                        && info.halted.is_none_or(|halted| halted <= lowest)
                        && !info.untouched_by_resync
                    {
                        continue;
                    }
                    let (id, client) = &components[index];
                    match client.call(epoch, Request::RollBack { component: *id, to: lowest }, &[]).await {
                        Ok((Reply::RolledBack(ranges), _)) => unmaps.extend(ranges),
                        Ok((reply, _)) => {
                            return Err(ObjectError::Recover(format!(
                                "component {index} answered {reply:?} to a rollback"
                            )))
                        }
                        Err(error) => {
                            return Err(ObjectError::Recover(format!("rolling component {index} back: {error}")))
                        }
                    }
                    if info.committed_lsn > lowest {
                        tracing::info!(component = index, from = info.committed_lsn, to = lowest, "rolled back");
                        metrics::counter!("objects_erasure_rollbacks_total").increment(1);
                    }
                }
                lowest
            }
            _ => committed,
        };
        unmaps.sort_unstable();
        unmaps.dedup();
        // New writes are numbered above every LSN any copy that answers
        // holds, so none is taken for one of the older owner's.
        let start =
            infos.iter().filter_map(|info| info.as_ref().ok()).map(|info| info.newest_lsn).fold(committed, Lsn::max);
        let now = now_ms();
        let lower_bound = committed.saturating_sub(INFLIGHT_MAX as Lsn);
        let mut statuses = Vec::new();
        let mut behind = Vec::new();
        // The stale LSNs of the copies that do not answer.
        let mut missing = Vec::new();
        let mut reported_newest = HashMap::new();
        for (index, info) in infos.iter().enumerate() {
            // A copy already recorded away has been away since then (the
            // repair delay counts from there, whoever owns the object).
            let since = match recorded[index] {
                Status::Absent { since, .. } => since.min(now),
                _ => now,
            };
            statuses.push(match info {
                _ if current.contains(&index) => Status::Active,
                Ok(info) => {
                    // Above the LSN taken for current it holds nothing that
                    // counts (a deposed owner's writes, or ones rolled back
                    // elsewhere), nor above the stale LSN it is recorded
                    // away at: a deposed owner cut off with it may have
                    // written it there under LSNs the owners since gave
                    // other writes. Its resync starts no higher.
                    let stale =
                        info.committed_lsn.min(committed).min(recorded_stale(&recorded[index]).unwrap_or(Lsn::MAX));
                    behind.push((index, stale));
                    reported_newest.insert(index, info.newest_lsn);
                    Status::Absent { stale, since }
                }
                Err(_) => {
                    // No higher than it is recorded away at, for the same
                    // reason.
                    let stale = lower_bound.min(recorded_stale(&recorded[index]).unwrap_or(Lsn::MAX));
                    missing.push(stale);
                    Status::Absent { stale, since }
                }
            });
        }
        // Stale LSNs the components behind or away need tracking bitmaps for.
        let mut wanted: Vec<Lsn> = behind.iter().map(|(_, lsn)| *lsn).chain(missing.iter().copied()).collect();
        wanted.sort_unstable();
        wanted.dedup();
        let mut extra = HashMap::new();
        for (index, info) in infos.iter().enumerate() {
            if current.contains(&index) || !info.as_ref().is_ok_and(|info| info.sync.is_some()) {
                continue;
            }
            let (id, client) = &components[index];
            if let Ok((Reply::Bitmap(Some(bytes)), _)) =
                client.call(epoch, Request::SyncBitmap { component: *id }, &[]).await
            {
                if let Ok(bitmap) = RoaringBitmap::deserialize_from(&bytes[..]) {
                    extra.insert(index, bitmap);
                }
            }
        }
        let recorded_active = (0..infos.len()).filter(|index| recorded[*index] == Status::Active);
        let mut owner = Owner::new(statuses, committed)
            .numbering_from(start)
            .holding_every_write_done_before(recorded_active.filter(|index| !current.contains(index)));
        for &index in &current {
            if let Ok(info) = &infos[index] {
                owner.set_tracking(index, complete_tracking(info));
            }
        }
        tracing::info!(epoch, committed, start, current = ?current, behind = ?behind, missing = ?missing, "opened as the new owner");
        let object = Self::with_owner(epoch, blocks, components, owner, hooks, writes_after, asked);
        for (index, info) in infos.iter().enumerate() {
            if info.is_ok() {
                // Sent at the lease clock's origin, `asked`.
                object.lease.answered(index, lease::AT_ORIGIN);
            }
        }
        *object.extra.lock().expect("extra lock") = extra;
        *object.reported_newest.lock().expect("reported lock") = reported_newest;
        // Mid-resync under an older owner, and something landed: rows may
        // have been rebuilt there, and that owner may have skipped a write
        // for it that a later one's before-image assumes.
        object.rows_rebuilt.lock().expect("rebuilt lock").extend(
            (0..infos.len()).filter(|index| {
                infos[*index].as_ref().is_ok_and(|info| info.sync.is_some() && !info.untouched_by_resync)
            }),
        );
        for stale in wanted {
            object.track_exactly(stale).await;
        }
        {
            let mut state = object.state.lock().expect("object lock");
            // Record the states found before taking I/O.
            state.persisted = Vec::new();
            state.opened_from = recorded.clone();
            object.note_needed(&state, &state.owner.statuses());
            let mut out = vec![Action::Persist];
            // A current copy still mid-resync on its disk ends it before
            // it takes writes.
            for &index in &current {
                if infos[index].as_ref().is_ok_and(|info| info.sync.is_some()) {
                    out.push(Action::Current { component: index });
                }
            }
            for (index, committed) in behind {
                state.sessions[index] = (object.next_session.fetch_add(1, Ordering::Relaxed), 1);
                let mid_resync = infos[index].as_ref().is_ok_and(rows_resynced);
                let newest = infos[index].as_ref().map_or(committed, |info| info.newest_lsn);
                let back = Input::Back { component: index, committed, newest, mid_resync };
                state.owner.handle(now, back, &mut out);
            }
            object.act(&mut state, out, &Payload::none());
        }
        if !unmaps.is_empty() {
            object.complete_unmaps(unmaps).await.map_err(|error| {
                object.close();
                ObjectError::Recover(format!("completing the unmaps the old owner left half done: {error}"))
            })?;
        }
        Ok(object)
    }

    fn client(&self, component: Index) -> Client<T> {
        self.clients[component].read().expect("client lock").clone()
    }

    /// Points a component's client at a new address (its host restarted).
    pub fn set_address(&self, component: Index, address: &str) {
        let mut client = self.clients[component].write().expect("client lock");
        if client.address() != address {
            *client = client.with_address(address);
        }
    }

    /// Stops taking I/O (the object was deposed, deleted, or moved):
    /// everything waiting fails.
    pub fn close(&self) {
        let mut state = self.state.lock().expect("object lock");
        state.closed = true;
        self.lease.closed.store(true, Ordering::Release);
        self.lease_changed.notify_waiters();
        self.recorded.notify_one();
        if let Some(cache) = &self.cache {
            cache.close();
        }
        state.held.clear();
        for (_, waiter) in std::mem::take(&mut state.waiters) {
            waiter.answer(Err(ObjectError::Deposed));
        }
    }

    /// Closes the object to hand it over to another owner: once every
    /// write, unmap and compare-and-write under way has been answered, new
    /// ones held back meanwhile. Those held back are then answered
    /// `Deposed` with nothing of them written, so their senders send them
    /// on to the new owner, and no compare-and-write ends of unknown
    /// outcome (as one under way when an owner is deposed does). False,
    /// and the object left as it is, if those under way are not all
    /// answered `within`, if it is closed already, or if an erasure-coded
    /// readmission is under way or left unmaps to complete (a rollback
    /// reports its unmaps once, to this owner alone).
    ///
    /// An owner that has not yet waited out its predecessor's cache lease
    /// (it has written nothing since it opened) waits it out first, within
    /// `within`: the next owner, taking the object by this handover, does
    /// not wait (`Hooks::handed_over`), and an owner deposed before this one
    /// may serve what it cached until that lease runs out.
    pub async fn close_when_idle(&self, within: Duration) -> bool {
        let idle = async {
            let alone = self.atomic.write().await;
            self.fenced().await;
            alone
        };
        let Ok(_alone) = tokio::time::timeout(within, idle).await else { return false };
        let unmaps_left = !self.unmaps_to_complete.lock().expect("unmaps lock").is_empty();
        {
            let state = self.state.lock().expect("object lock");
            if state.closed || state.owner.readmitting() || unmaps_left {
                return false;
            }
        }
        self.close();
        true
    }

    /// Whether `error` says a newer owner holds the object (only a newer
    /// owner's fence raises a component's epoch); if so this owner closes,
    /// and everything waiting is answered `Deposed`, which sends callers to
    /// the new owner.
    fn deposed_by(&self, error: &ClientError) -> bool {
        if !matches!(error, ClientError::Component(ComponentError::StaleEpoch { .. })) {
            return false;
        }
        tracing::info!("a newer owner holds the object: closing it here");
        self.close();
        true
    }

    pub fn is_closed(&self) -> bool {
        self.state.lock().expect("object lock").closed
    }

    /// The components on a host that went down (the catalog says so)
    /// fail now rather than when a call to them times out.
    pub fn fail_component(self: &Arc<Self>, component: Index) {
        self.input(Input::Failed { component });
    }

    pub fn statuses(&self) -> Vec<Status> {
        self.state.lock().expect("object lock").owner.statuses()
    }

    pub fn size(&self) -> u64 {
        self.blocks * BLOCK_SIZE as u64
    }

    /// Blocks each component holds: the object's, or for an erasure-coded
    /// object its rows.
    pub fn component_blocks(&self) -> u64 {
        match &self.erasure {
            Some(layout) => layout.rows(self.blocks),
            None => self.blocks,
        }
    }

    fn check(&self, offset: u64, length: u64) -> Result<(u64, u64), ObjectError> {
        let block = BLOCK_SIZE as u64;
        if !offset.is_multiple_of(block) || !length.is_multiple_of(block) || length == 0 {
            return Err(ObjectError::Unaligned { offset, length });
        }
        let end = offset.saturating_add(length);
        if end > self.size() {
            return Err(ObjectError::OutOfRange { offset, end, size: self.size() });
        }
        Ok((offset / BLOCK_SIZE as u64, length / BLOCK_SIZE as u64))
    }

    /// A new owner's first write waits until an older owner can no longer
    /// serve blocks from its cache.
    async fn fenced(&self) {
        if let Some(at) = self.writes_after {
            if tokio::time::Instant::now() < at {
                tokio::time::sleep_until(at).await;
            }
        }
    }

    /// Writes whole blocks; returns once every active copy has them durably.
    pub async fn write_at(self: &Arc<Self>, offset: u64, data: Bytes) -> Result<(), ObjectError> {
        let _shared = self.atomic.read().await;
        self.write_blocks(offset, data).await
    }

    /// Writes `new` at `offset` if the bytes there are `expected`, as one
    /// step: no other write to the object starts or is under way between
    /// the read and the write. `offset` and the lengths may be any bytes
    /// within the object (`expected` empty: a read-modify-write of part of
    /// a block that no other write can undo). `Ok(Some(at))`: the first
    /// byte that differs, nothing written.
    pub async fn compare_and_write(
        self: &Arc<Self>,
        offset: u64,
        expected: &[u8],
        new: Bytes,
    ) -> Result<Option<u64>, ObjectError> {
        let block = BLOCK_SIZE as u64;
        let length = expected.len().max(new.len()) as u64;
        let end = offset.checked_add(length).filter(|end| *end <= self.size()).ok_or(ObjectError::OutOfRange {
            offset,
            end: offset.saturating_add(length),
            size: self.size(),
        })?;
        if new.is_empty() {
            return Err(ObjectError::Unaligned { offset, length: 0 });
        }
        let (start, stop) = (offset / block * block, end.div_ceil(block) * block);
        let _alone = self.atomic.write().await;
        // Closed while it waited (handed over, `close_when_idle`): nothing
        // of it was written, so the sender may send it to the new owner.
        if self.is_closed() {
            return Err(ObjectError::Deposed);
        }
        let old = self.read_at(start, stop - start).await?;
        let from = (offset - start) as usize;
        if let Some(at) = old[from..from + expected.len()].iter().zip(expected).position(|(old, want)| old != want) {
            return Ok(Some(at as u64));
        }
        let mut blocks = bytes::BytesMut::from(&old[..]);
        blocks[from..from + new.len()].copy_from_slice(&new);
        match self.write_blocks(start, blocks.freeze()).await {
            // A read-modify-write of part of a block is the same done twice.
            Err(ObjectError::Deposed) if !expected.is_empty() => Err(ObjectError::Indeterminate),
            // An erasure-coded write refused with fewer than k chunks
            // holding it may still be read from those chunks.
            Err(ObjectError::Unavailable) if !expected.is_empty() && self.erasure.is_some() => {
                Err(ObjectError::Indeterminate)
            }
            other => other.map(|_| None),
        }
    }

    async fn write_blocks(self: &Arc<Self>, offset: u64, data: Bytes) -> Result<(), ObjectError> {
        let (first, count) = self.check(offset, data.len() as u64)?;
        let data = self.through_cipher(first, data, true);
        if let Some(layout) = self.erasure {
            return self.write_erasure(layout, first, data).await;
        }
        self.fenced().await;
        let mut waits = Vec::new();
        for start in (0..count).step_by(MESSAGE_BLOCKS_MAX as usize) {
            let blocks = MESSAGE_BLOCKS_MAX.min(count - start);
            let piece = data.slice((start as usize * BLOCK_SIZE)..((start + blocks) as usize * BLOCK_SIZE));
            let permit = self.inflight.acquire().await.map_err(|_| ObjectError::Unavailable)?;
            waits.push((permit, self.submit(Op::Write { first: first + start, count: blocks }, Payload::Same(piece))));
        }
        for (_permit, wait) in waits {
            wait.await.map_err(|_| ObjectError::Unavailable)??;
        }
        Ok(())
    }

    /// Deallocates whole blocks (they read as zeros).
    pub async fn unmap(self: &Arc<Self>, offset: u64, length: u64) -> Result<(), ObjectError> {
        let (first, count) = self.check(offset, length)?;
        let _shared = self.atomic.read().await;
        if let Some(layout) = self.erasure {
            return self.unmap_erasure(layout, first, count).await;
        }
        self.fenced().await;
        let _permit = self.inflight.acquire().await.map_err(|_| ObjectError::Unavailable)?;
        self.submit(Op::Unmap { first, count }, Payload::none()).await.map_err(|_| ObjectError::Unavailable)??;
        Ok(())
    }

    /// Every acknowledged write is already durable on every active copy.
    pub async fn flush(&self) -> Result<(), ObjectError> {
        Ok(())
    }

    /// Whether the object is encrypted at rest.
    pub fn is_encrypted(&self) -> bool {
        self.cipher.is_some()
    }

    /// Replaces the object's key with a new one, recorded first: every
    /// block written so far then reads as noise, and blocks never written
    /// as zeros (SANITIZE's CRYPTO ERASE), here and at any owner before
    /// (whose cache lease it waits out). No write is under way meanwhile,
    /// so each write is sealed under the old key or the new one, whole. If
    /// the new key may not have been recorded, the object closes: its next
    /// owner opens it with whichever key the record holds.
    pub async fn erase_key(self: &Arc<Self>) -> Result<(), ObjectError> {
        let (Some(rekeyer), Some(cipher)) = (&self.rekeyer, &self.cipher) else {
            return Err(ObjectError::NotEncrypted);
        };
        let _alone = self.atomic.write().await;
        if self.is_closed() {
            return Err(ObjectError::Deposed);
        }
        // As for a write: an owner before this one may still serve blocks
        // from its cache, opened with the old key, until its lease ends.
        self.fenced().await;
        match rekeyer().await {
            Ok(key) => {
                *cipher.write().expect("cipher lock") = Arc::new(Xts::new(&key));
                metrics::counter!("objects_keys_erased_total").increment(1);
                Ok(())
            }
            Err(error) => {
                tracing::warn!(%error, "new key not recorded for certain; closing the object");
                self.close();
                Err(match error {
                    PersistError::Deposed => ObjectError::Deposed,
                    PersistError::Failed(_) => ObjectError::Unavailable,
                })
            }
        }
    }

    /// `data` (whole blocks from `first`) sealed under the object's key
    /// (`seal`: as the components are to hold it), or opened (as read from
    /// them); as it is when the object has no key.
    fn through_cipher(&self, first: u64, data: Bytes, seal: bool) -> Bytes {
        let Some(cipher) = &self.cipher else { return data };
        let cipher = cipher.read().expect("cipher lock").clone();
        let mut out = bytes::BytesMut::from(&data[..]);
        match seal {
            true => cipher.encrypt(first, &mut out),
            false => cipher.decrypt(first, &mut out),
        }
        out.freeze()
    }

    fn submit(self: &Arc<Self>, op: Op, data: Payload) -> oneshot::Receiver<Result<Lsn, ObjectError>> {
        let (done, wait) = oneshot::channel();
        let mut state = self.state.lock().expect("object lock");
        if state.closed {
            let _ = done.send(Err(ObjectError::Deposed));
            return wait;
        }
        state.next_request += 1;
        let request = state.next_request;
        // Counted under way before it is sent anywhere (a read that fills
        // the cache checks nothing started since it began).
        let (first, count) = match op {
            Op::Write { first, count } | Op::Unmap { first, count } => (first, count),
        };
        let mark = self.cache.as_ref().map(|cache| {
            let (first, count) = match self.erasure {
                Some(layout) => layout.blocks_of_rows(first, count),
                None => (first, count),
            };
            cache.start_write(first, count)
        });
        state.waiters.insert(request, Waiter { done, mark });
        let mut out = Vec::new();
        state.owner.handle(0, Input::Submit { request, op }, &mut out);
        self.act(&mut state, out, &data);
        wait
    }

    /// Carries out the owner's actions (under the lock: sequence numbers
    /// are taken in the order the owner decided). `data`: the submitted
    /// operation's, which its `Send` actions carry (the owner sends only
    /// when an operation is submitted).
    fn act(self: &Arc<Self>, state: &mut State, actions: Vec<Action>, data: &Payload) {
        // What erasure-coded components may drop before-images up to.
        let stable = self.erasure.map(|_| stable(state)).unwrap_or(0);
        for action in actions {
            match action {
                Action::Send { component, lsn, .. } => {
                    let op = state.owner.op(lsn).cloned();
                    let id = self.ids[component];
                    let settled = state.owner.settled(component);
                    let request = match (op, self.erasure) {
                        (Some(Op::Write { first, .. }), None) => Request::Write { component: id, lsn, first, settled },
                        (Some(Op::Unmap { first, count }), None) => {
                            Request::Unmap { component: id, lsn, first, count, settled }
                        }
                        (Some(Op::Write { first, .. }), Some(_)) => {
                            let local = data.before_images_local();
                            if local && state.owner.status(component) != &Status::Active {
                                // Resyncing since the write was planned: its
                                // blocks may be older than the stripe's last
                                // write, so it cannot read its before-image.
                                // Taken for failed; resynced again. Missing
                                // a write a later one's before-image
                                // assumes, it is never readmitted as it
                                // stands.
                                self.rows_rebuilt.lock().expect("rebuilt lock").insert(component);
                                self.fail_soon(state, component);
                                continue;
                            }
                            Request::ChunkWrite { component: id, lsn, first, stable, local, settled }
                        }
                        (Some(Op::Unmap { first, count }), Some(_)) => {
                            Request::ChunkUnmap { component: id, lsn, first, count, stable, settled }
                        }
                        (None, _) => continue,
                    };
                    self.send(state, component, request, data.to(component), Some(lsn));
                }
                Action::Done { request, lsn } => self.answer_after_record(state, request, Ok(lsn)),
                Action::Refused { request } => {
                    if let Some(waiter) = state.waiters.remove(&request) {
                        waiter.answer(Err(ObjectError::Unavailable));
                    }
                }
                Action::NoSpace { request } => self.answer_after_record(state, request, Err(ObjectError::NoSpace)),
                Action::Track { component, stale, seed } => {
                    let request = Request::Track { component: self.ids[component], stale, seed: Some(seed) };
                    self.send(state, component, request, Bytes::new(), None);
                }
                Action::Untrack { component, stale } => {
                    let request = Request::Untrack { component: self.ids[component], stale };
                    self.send(state, component, request, Bytes::new(), None);
                }
                Action::Resync { component, stale, target, source, ready, plan } => {
                    let request = Request::BeginSync { component: self.ids[component], stale, target, plan };
                    let begun = self.send(state, component, request, Bytes::new(), None);
                    let object = self.clone();
                    tokio::spawn(async move {
                        object.clone().resync(component, stale, source, ready, plan, begun).await;
                        object.resync_ended(component, plan);
                    });
                }
                Action::Current { component } => {
                    // The copy of record as it stands: what was cached from
                    // the copies before is not served again.
                    if let Some(cache) = &self.cache {
                        cache.forget();
                    }
                    let request = Request::EndSync { component: self.ids[component], plan: 0 };
                    self.send(state, component, request, Bytes::new(), None);
                    self.rows_rebuilt.lock().expect("rebuilt lock").remove(&component);
                }
                Action::Readmit { components, to } => {
                    // What was cached may include rows the rollback undoes.
                    if let Some(cache) = &self.cache {
                        cache.forget();
                    }
                    // The states to record first were asked for just before
                    // (`Action::Persist`): the record to wait for is one
                    // taken since.
                    let asked = state.persist_asks;
                    let object = self.clone();
                    tokio::spawn(async move { object.readmit(components, to, asked).await });
                }
                Action::Persist => self.persist(state),
            }
        }
    }

    /// Carries out a readmission (see [`Action::Readmit`]): once every
    /// component ended any resync it was in and rolled back, the owner
    /// takes them for active. Completions wait until that is recorded (a
    /// new owner reading the older record could take a component still away
    /// for current, and roll the readmitted ones back below writes answered
    /// since). Chunk unmaps above `to` cannot be undone: they are completed
    /// on every component before any client write or unmap begins (those
    /// wait for `atomic`, held alone from before the owner takes the
    /// components back until the unmaps are done), and kept until then,
    /// whatever becomes of this readmission.
    async fn readmit(self: Arc<Self>, components: Vec<Index>, to: Lsn, asked: u64) {
        // The states counting no component above `to` are recorded first: a
        // record taken after they were lowered (one in flight from before
        // may still show a component higher).
        loop {
            {
                let state = self.state.lock().expect("object lock");
                if state.closed {
                    return;
                }
                if self.persister.is_none() || state.recorded_asks >= asked {
                    debug_assert!(self.persister.is_none() || recorded_no_higher_than(&state.persisted, to));
                    break;
                }
            }
            self.recorded.notified().await;
        }
        let answers: Vec<(Index, oneshot::Receiver<Result<Reply, ClientError>>)> = {
            let mut state = self.state.lock().expect("object lock");
            if state.closed {
                return;
            }
            let untouched = self.untouched_when_probed.lock().expect("untouched lock").clone();
            let mut answers = Vec::new();
            for &index in &components {
                let id = self.ids[index];
                let absent = matches!(state.owner.status(index), Status::Absent { .. });
                if absent && !untouched.contains(&index) {
                    // A resync it began had nothing to bring (see
                    // `rows_resynced`): it ends as it stands, and the
                    // rollback then sets its committed LSN.
                    let request = Request::EndSync { component: id, plan: 0 };
                    answers.push((index, self.send(&mut state, index, request, Bytes::new(), None)));
                }
                let request = Request::RollBack { component: id, to };
                answers.push((index, self.send(&mut state, index, request, Bytes::new(), None)));
                if absent && untouched.contains(&index) {
                    // Nothing had landed under its resync when probed, so
                    // the rollback ends that resync; unless a message of
                    // its old session landed since (an old owner's write,
                    // say, whose before-image assumes one it skipped):
                    // then the resync is still under way, and the
                    // component not rolled back.
                    let request = Request::Info { component: id };
                    answers.push((index, self.send(&mut state, index, request, Bytes::new(), None)));
                }
            }
            answers
        };
        let mut rolled_back = true;
        for (index, answer) in answers {
            match answer.await {
                Ok(Ok(Reply::RolledBack(ranges))) => {
                    self.unmaps_to_complete.lock().expect("unmaps lock").extend(ranges)
                }
                Ok(Ok(Reply::Ended(_))) => {}
                Ok(Ok(Reply::Info(info))) if info.sync.is_none() => {}
                other => {
                    tracing::warn!(component = index, to, answer = ?other, "no rollback for a readmission");
                    rolled_back = false;
                }
            }
        }
        // Client writes hold it shared until answered; they are refused
        // while the readmission is under way, so this comes soon.
        let _alone = self.atomic.write().await;
        let taken = {
            let mut state = self.state.lock().expect("object lock");
            if state.closed {
                return;
            }
            let mut out = Vec::new();
            let taken = state.owner.readmitted(now_ms(), rolled_back, &mut out);
            self.act(&mut state, out, &Payload::none());
            taken
        };
        if !taken {
            return;
        }
        self.resync_stats.readmissions.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("objects_erasure_readmissions_total").increment(1);
        let mut unmaps = std::mem::take(&mut *self.unmaps_to_complete.lock().expect("unmaps lock"));
        unmaps.sort_unstable();
        unmaps.dedup();
        if let Err(error) = self.complete_unmaps(unmaps.clone()).await {
            // Kept for the next readmission (unmapping twice is harmless).
            tracing::warn!(%error, "completing unmaps a readmission rolled back over; kept for the next");
            self.unmaps_to_complete.lock().expect("unmaps lock").extend(unmaps);
        }
    }

    /// Answers `request` now, or once the record shows every absence
    /// there is (see `held`).
    fn answer_after_record(&self, state: &mut State, request: u64, result: Result<Lsn, ObjectError>) {
        if state.barrier {
            state.held.push((request, result));
        } else if let Some(waiter) = state.waiters.remove(&request) {
            waiter.answer(result);
        }
    }

    /// Has the statuses recorded (coalesced: one write at a time, the
    /// newest statuses each time). A new absence holds completions until
    /// it is recorded.
    fn persist(self: &Arc<Self>, state: &mut State) {
        if self.persister.is_none() {
            return;
        }
        // A new absence, or a component now active that the record does
        // not show so (resynced, readmitted, or all of them before a new
        // owner's first record): completions wait for the record, which
        // is what a new owner would go by.
        let statuses = state.owner.statuses();
        if unrecorded(&statuses, &state.persisted) {
            state.barrier = true;
        }
        self.note_needed(state, &statuses);
        state.dirty = true;
        state.persist_asks += 1;
        if state.persisting {
            return;
        }
        state.persisting = true;
        let object = self.clone();
        tokio::spawn(async move { object.persist_loop().await });
    }

    async fn persist_loop(self: Arc<Self>) {
        let persister = self.persister.clone().expect("a persister");
        loop {
            let (statuses, asks) = {
                let mut state = self.state.lock().expect("object lock");
                if !state.dirty || state.closed {
                    state.persisting = false;
                    return;
                }
                state.dirty = false;
                let statuses = state.owner.statuses();
                state.recording |= lease::from_record(&statuses, self.holders());
                self.note_needed(&state, &statuses);
                (statuses, state.persist_asks)
            };
            match persister(statuses.clone()).await {
                Ok(()) => {
                    let mut state = self.state.lock().expect("object lock");
                    state.persisted = statuses;
                    state.recording = 0;
                    state.opened_from.clear();
                    self.note_needed(&state, &state.owner.statuses());
                    self.lease_changed.notify_waiters();
                    state.recorded_asks = asks;
                    self.recorded.notify_one();
                    if state.barrier && !unrecorded(&state.owner.statuses(), &state.persisted) {
                        state.barrier = false;
                        for (request, result) in std::mem::take(&mut state.held) {
                            if let Some(waiter) = state.waiters.remove(&request) {
                                waiter.answer(result);
                            }
                        }
                    }
                }
                Err(PersistError::Deposed) => {
                    tracing::warn!("a newer owner holds the object: closing it here");
                    self.close();
                    self.state.lock().expect("object lock").persisting = false;
                    return;
                }
                Err(PersistError::Failed(reason)) => {
                    tracing::warn!(%reason, "could not record component states; retrying");
                    self.state.lock().expect("object lock").dirty = true;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// Sends the next message of `component`'s session; its answer comes
    /// back to the owner (a write's acknowledgement, or a failure).
    fn send(
        self: &Arc<Self>,
        state: &mut State,
        component: Index,
        request: Request,
        data: Bytes,
        lsn: Option<Lsn>,
    ) -> oneshot::Receiver<Result<Reply, ClientError>> {
        let (answered, answer) = oneshot::channel();
        if state.closed {
            // Deposed or stopped: nothing more goes out under this epoch.
            let _ = answered.send(Err(ClientError::Closed));
            return answer;
        }
        let (session, seq) = state.sessions[component];
        state.sessions[component].1 += 1;
        let object = self.clone();
        tokio::spawn(async move {
            let client = object.client(component);
            let sent = object.lease.now();
            let result = client.call_in(object.epoch, session, seq, request, &data).await.map(|(reply, _)| reply);
            if result.is_ok() {
                object.lease.answered(component, sent);
            }
            let input = match (&result, lsn) {
                (Ok(_), Some(lsn)) => Some(Input::Acked { component, lsn }),
                (Ok(_), None) => None,
                // Deposed: not a failure here, nor the copy marked away.
                (Err(error), _) if object.deposed_by(error) => None,
                // Refused whole for want of space: settled by the owner
                // once every component it was sent to has answered.
                (Err(ClientError::Component(ComponentError::NoSpace(reason))), Some(lsn)) => {
                    tracing::warn!(component, lsn, %reason, "no room for a write");
                    Some(Input::Declined { component, lsn })
                }
                (Err(error), _) => {
                    tracing::warn!(component, %error, "component failed");
                    Some(Input::Failed { component })
                }
            };
            if let Some(input) = input {
                object.input_from(component, session, input, result.is_ok().then_some(sent));
            }
            let _ = answered.send(result);
        });
        answer
    }

    /// Takes `component` for failed, as an error answer from it would
    /// (after the caller lets go of the state).
    fn fail_soon(self: &Arc<Self>, state: &State, component: Index) {
        let session = state.sessions[component].0;
        let object = self.clone();
        tokio::spawn(async move { object.input_from(component, session, Input::Failed { component }, None) });
    }

    /// An answer from `component` in `session`: one from a session that is
    /// over (the component went away and came back since) is void. `sent`:
    /// when the request it answers was sent, if it succeeded.
    fn input_from(self: &Arc<Self>, component: Index, session: u64, input: Input, sent: Option<u64>) {
        {
            let state = self.state.lock().expect("object lock");
            if state.sessions[component].0 != session {
                return;
            }
            // Only a copy this owner counts active renews the cache's
            // lease: another (one a newer owner could not reach, say) may
            // not have fenced this owner.
            if let (Some(cache), Some(sent)) = (&self.cache, sent) {
                if state.owner.status(component) == &Status::Active {
                    cache.answered(sent);
                }
            }
        }
        self.input(input);
    }

    fn input(self: &Arc<Self>, input: Input) {
        let mut state = self.state.lock().expect("object lock");
        if let (Input::Resynced { .. }, Some(cache)) = (&input, &self.cache) {
            // Insurance: a resync changes no block a read can see (the end
            // of an older plan forgets too: harmless).
            cache.forget();
        }
        if let Input::Failed { component } = input {
            if matches!(state.owner.status(component), Status::Absent { .. }) {
                return;
            }
        }
        let mut out = Vec::new();
        state.owner.handle(now_ms(), input, &mut out);
        self.act(&mut state, out, &Payload::none());
    }

    /// Asks an absent component whether it is back; if so, the owner plans
    /// its resync (or, for an erasure-coded object with fewer than k
    /// components active, counts it toward a readmission). Returns whether
    /// it was taken back or a readmission began.
    pub async fn probe(self: &Arc<Self>, component: Index) -> bool {
        if !matches!(self.statuses()[component], Status::Absent { .. }) {
            return false;
        }
        let (id, client) = (&self.ids[component], self.client(component));
        let Ok(info) = client.info(self.epoch, *id).await else { return false };
        let from = self.state.lock().expect("object lock").owner.resync_from(component, info.committed_lsn);
        let Some(from) = from else { return false };
        self.reported_newest.lock().expect("reported lock").insert(component, info.newest_lsn);
        self.track_exactly(from).await;
        let mut state = self.state.lock().expect("object lock");
        // A readmission's rollback may be on its way to it in its session.
        if !matches!(state.owner.status(component), Status::Absent { .. }) || state.owner.readmitting() {
            return false;
        }
        // A new session: the old one's messages are void.
        state.sessions[component] = (self.next_session.fetch_add(1, Ordering::Relaxed), 1);
        let mut out = Vec::new();
        // Nothing landed under any resync since it was last complete: it
        // holds what it held when the first began, whatever this owner sent
        // it or skipped (a rollback ends that resync).
        let mid_resync = !info.untouched_by_resync
            && (rows_resynced(&info) || self.rows_rebuilt.lock().expect("rebuilt lock").contains(&component));
        {
            let mut untouched = self.untouched_when_probed.lock().expect("untouched lock");
            match info.untouched_by_resync {
                true => untouched.insert(component),
                false => untouched.remove(&component),
            };
        }
        let back = Input::Back { component, committed: info.committed_lsn, newest: info.newest_lsn, mid_resync };
        state.owner.handle(now_ms(), back, &mut out);
        let taken = !matches!(state.owner.status(component), Status::Absent { .. }) || !out.is_empty();
        self.act(&mut state, out, &Payload::none());
        taken
    }

    /// Makes sure every active component holds a complete tracking bitmap
    /// for exactly `stale`: one that lacks it builds it from its
    /// recent-write windows, in order behind the writes already sent to it
    /// (a new owner knows no exact seed; a returning component may have
    /// made durable writes it never acknowledged). A bitmap for an older
    /// stale LSN would do, but would copy more.
    async fn track_exactly(self: &Arc<Self>, stale: Lsn) {
        let sent: Vec<(Index, oneshot::Receiver<Result<Reply, ClientError>>)> = {
            let mut state = self.state.lock().expect("object lock");
            if stale >= state.owner.last_lsn() {
                return;
            }
            let lacking: Vec<Index> = (0..self.ids.len())
                .filter(|index| state.owner.status(*index) == &Status::Active)
                .filter(|index| !state.owner.tracking(*index).contains(&stale))
                .collect();
            lacking
                .into_iter()
                .map(|index| {
                    let request = Request::Track { component: self.ids[index], stale, seed: None };
                    (index, self.send(&mut state, index, request, Bytes::new(), None))
                })
                .collect()
        };
        for (index, answer) in sent {
            if !matches!(answer.await, Ok(Ok(_))) {
                continue;
            }
            let Ok(info) = self.client(index).info(self.epoch, self.ids[index]).await else { continue };
            if complete_tracking(&info).contains(&stale) {
                let mut state = self.state.lock().expect("object lock");
                if state.owner.status(index) == &Status::Active {
                    state.owner.set_tracking(index, [stale]);
                }
            } else {
                tracing::info!(component = index, stale, "the recent-write windows do not reach back that far");
            }
        }
    }

    /// Blocks a resync sent `target`: until one of its resyncs ends, every
    /// later plan copies them too (they came from a source that plan may
    /// not trust, and may have landed before it began).
    fn sent_by_resync(&self, target: Index, first: u64, count: u64) {
        let mut extra = self.extra.lock().expect("extra lock");
        extra.entry(target).or_default().insert_range(first as u32..(first + count) as u32);
    }

    /// After resync `plan`'s task: one that stopped short while its plan
    /// still stands (a lost message, a step that failed) fails the target,
    /// which is then probed and resynced again, rather than resyncing
    /// forever.
    fn resync_ended(self: &Arc<Self>, target: Index, plan: u64) {
        if self.planned(target, plan) {
            tracing::warn!(component = target, plan, "resync stopped short: failing the copy to resync it again");
            self.input(Input::Failed { component: target });
        }
    }

    /// Whether `target` is still resyncing under `plan` here.
    fn planned(&self, target: Index, plan: u64) -> bool {
        let state = self.state.lock().expect("object lock");
        !state.closed && state.owner.resyncing_under(target, plan)
    }

    async fn resync(
        self: Arc<Self>,
        target: Index,
        stale: Lsn,
        source: Source,
        ready: Lsn,
        plan: u64,
        begun: oneshot::Receiver<Result<Reply, ClientError>>,
    ) {
        if !matches!(begun.await, Ok(Ok(_))) {
            return; // the target failed; the owner knows
        }
        // Wait for this resync's turn, as long as its plan stands.
        let _turn = match &self.admission {
            None => None,
            Some(admit) => {
                let mut turn = admit(ResyncJob { epoch: self.epoch, component: target, plan });
                loop {
                    tokio::select! {
                        turn = &mut turn => break Some(turn),
                        _ = tokio::time::sleep(ADMISSION_CHECK) => {
                            if !self.planned(target, plan) {
                                return;
                            }
                        }
                    }
                }
            }
        };
        let from = source.index();
        let tracking = match source {
            Source::Tracked { tracking, .. } => Some(tracking),
            Source::FullCopy { .. } => None,
        };
        let (source_id, source_client) = (&self.ids[from], self.client(from));
        // Wait until the source has everything sent to it so far (bounded:
        // a write lost on the way may never come). Erasure-coded: every
        // active component, as the target's chunks are rebuilt from them
        // (each active one was sent what the source was).
        let readers: Vec<Index> = match self.erasure {
            None => vec![from],
            Some(_) => self.active().into_iter().filter(|index| *index != target).collect(),
        };
        let deadline = tokio::time::Instant::now() + SOURCE_WAIT_MAX;
        for reader in readers.iter().copied() {
            let (id, client) = (self.ids[reader], self.client(reader));
            loop {
                // Replanned (its source failed), or the owner is gone.
                if !self.planned(target, plan) || tokio::time::Instant::now() > deadline {
                    return;
                }
                match client.info(self.epoch, id).await {
                    Ok(info)
                        if self.state.lock().expect("object lock").owner.holds(reader, info.committed_lsn, ready) =>
                    {
                        break
                    }
                    Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                    Err(_) => return, // the source failed; the owner re-plans
                }
            }
        }
        let blocks: RoaringBitmap = match tracking {
            Some(stale) => {
                let reply =
                    source_client.call(self.epoch, Request::TrackingBitmap { component: *source_id, stale }, &[]).await;
                match reply {
                    Ok((Reply::Bitmap(Some(bytes)), _)) => match RoaringBitmap::deserialize_from(&bytes[..]) {
                        Ok(bitmap) => bitmap,
                        Err(_) => return,
                    },
                    _ => return,
                }
            }
            None => {
                self.resync_stats.full_copies.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("objects_resync_full_copies_total").increment(1);
                tracing::warn!(component = target, "resync by full copy");
                (0..self.component_blocks() as u32).collect()
            }
        };
        let mut blocks = blocks;
        // Kept until a resync of the target ends: one that stops short
        // (its source failed, say) is planned again, and must copy these
        // too.
        if let Some(extra) = self.extra.lock().expect("extra lock").get(&target) {
            blocks |= extra;
        }
        let target_id = self.ids[target];
        let target_client = self.client(target);
        // What the target wrote above its stale LSN may be a deposed
        // owner's writes that no other copy has: those blocks are copied
        // too, so every copy ends the same.
        let newest = self.reported_newest.lock().expect("reported lock").get(&target).copied();
        if newest.is_some_and(|newest| newest > stale) {
            let request = Request::WrittenSince { component: target_id, stale };
            match target_client.call(self.epoch, request, &[]).await {
                Ok((Reply::Bitmap(Some(bytes)), _)) => match RoaringBitmap::deserialize_from(&bytes[..]) {
                    Ok(own) => blocks |= own,
                    Err(_) => return,
                },
                Ok((Reply::Bitmap(None), _)) if blocks.len() < self.component_blocks() => {
                    self.resync_stats.full_copies.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("objects_resync_full_copies_total").increment(1);
                    tracing::warn!(
                        component = target,
                        stale,
                        "its own writes above its stale LSN are not known: full copy"
                    );
                    blocks = (0..self.component_blocks() as u32).collect();
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
        // Blocks the target already has newer writes for need no copy.
        if let Ok((Reply::Bitmap(Some(bytes)), _)) =
            target_client.call(self.epoch, Request::SyncBitmap { component: target_id }, &[]).await
        {
            if let Ok(done) = RoaringBitmap::deserialize_from(&bytes[..]) {
                blocks -= done;
            }
        }
        // A hole on the target and on every component it is copied from
        // reads as zeros on both sides: nothing to copy, and a component
        // rebuilt from nothing stays as thin as the object.
        let mut among = readers;
        among.push(target);
        let blocks = self.allocated_on_any(&among, blocks).await;
        let list: Vec<u32> = blocks.iter().collect();
        let mut progress = Progress::start(&self.resync_stats, list.len() as u64);
        // Erasure-coded: runs within one stripe, each rebuilt from the others.
        let stripe_of = |row: u32| self.erasure.map(|layout| layout.stripe_of_row(row as u64));
        let pieces: Vec<(u64, u64)> = list
            .chunk_by(|a, b| b == &(a + 1) && stripe_of(*a) == stripe_of(*b))
            .flat_map(|run| run.chunks(RESYNC_BLOCKS as usize))
            .map(|piece| (piece[0] as u64, piece.len() as u64))
            .collect();
        // Several pieces in flight: reading one while another is written.
        let budget = Arc::new(tokio::sync::Semaphore::new(RESYNC_BLOCKS_IN_FLIGHT as usize));
        let copies = futures::stream::iter(pieces).map(|(first, count)| {
            let source_client = source_client.clone();
            let object = self.clone();
            let source_id = *source_id;
            let budget = budget.clone();
            async move {
                let _blocks = budget.acquire_many_owned(count as u32).await.map_err(|_| ())?;
                if let Some(pace) = &object.resync_pace {
                    pace.take(count * BLOCK_SIZE as u64).await;
                }
                if let Some(layout) = object.erasure {
                    return object.resync_rows(layout, target, plan, first, count).await;
                }
                let data = source_client.read(object.epoch, source_id, first, count).await.map_err(|_| ())?;
                let sent = {
                    let mut state = object.state.lock().expect("object lock");
                    // Planned again since this job read its source (that
                    // source failed, or every copy went away and another
                    // is the copy of record now): its data may be what the
                    // new plan undoes. The target refuses it too, in case
                    // the new plan reaches it first.
                    if !state.owner.resyncing_under(target, plan) {
                        return Err(());
                    }
                    object.sent_by_resync(target, first, count);
                    let request = Request::SyncWrite { component: target_id, plan, first };
                    object.send(&mut state, target, request, data, None)
                };
                match sent.await {
                    Ok(Ok(_)) => Ok(count),
                    _ => Err(()),
                }
            }
        });
        let mut copies = std::pin::pin!(copies.buffer_unordered(RESYNC_IN_FLIGHT));
        while let Some(copied) = copies.next().await {
            match copied {
                Ok(count) => progress.copied(count),
                Err(()) => return,
            }
        }
        let ended = {
            let mut state = self.state.lock().expect("object lock");
            if !state.owner.resyncing_under(target, plan) {
                return;
            }
            let request = Request::EndSync { component: target_id, plan };
            self.send(&mut state, target, request, Bytes::new(), None)
        };
        if let Ok(Ok(Reply::Ended(true))) = ended.await {
            self.extra.lock().expect("extra lock").remove(&target);
            self.reported_newest.lock().expect("reported lock").remove(&target);
            self.resync_stats.resyncs_done.fetch_add(1, Ordering::Relaxed);
            self.input(Input::Resynced { component: target, plan });
            // Taken for failed instead (a readmission under way), its disk
            // no longer says it is mid-resync, yet holds rows rebuilt above
            // where the others roll back to, which no rollback undoes.
            let active = self.state.lock().expect("object lock").owner.status(target) == &Status::Active;
            let mut rebuilt = self.rows_rebuilt.lock().expect("rebuilt lock");
            if active {
                rebuilt.remove(&target);
            } else {
                rebuilt.insert(target);
            }
        }
    }

    /// The blocks of `blocks` allocated on at least one of `components`;
    /// all of them if one cannot say.
    async fn allocated_on_any(&self, components: &[Index], blocks: RoaringBitmap) -> RoaringBitmap {
        let mut allocated = RoaringBitmap::new();
        for &index in components {
            match self.client(index).allocated(self.epoch, self.ids[index], &blocks).await {
                Ok(here) => allocated |= here,
                Err(error) => {
                    tracing::debug!(component = index, %error, "allocation unknown; copying every block");
                    return blocks;
                }
            }
        }
        let holes = blocks.len() - allocated.len();
        if holes > 0 {
            metrics::counter!("objects_resync_holes_skipped_blocks_total").increment(holes);
            tracing::info!(holes, copying = allocated.len(), "resync skips blocks that are holes on every side");
        }
        allocated
    }

    /// Components active now (no allocation: for every read).
    pub(crate) fn active_count(&self) -> usize {
        self.state.lock().expect("object lock").owner.active_count()
    }

    /// Returns once this owner can vouch that no newer owner has answered
    /// a write (its serving lease holds: see [`crate::lease`]), renewing
    /// the lease when it runs low; `Unavailable` if it cannot within
    /// `VOUCH_WAIT`, `Deposed` once closed. Before any data of copies is
    /// served. Not yet for erasure-coded objects (`crate::lease`).
    async fn vouch(self: &Arc<Self>) -> Result<(), ObjectError> {
        if self.lease.closed.load(Ordering::Acquire) {
            return Err(ObjectError::Deposed);
        }
        let left = self.lease.left(self.lease.now());
        if left > lease::RENEW_WHEN_LEFT_MS {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + VOUCH_WAIT;
        loop {
            let changed = self.lease_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let state = self.state.lock().expect("object lock");
                if state.closed {
                    return Err(ObjectError::Deposed);
                }
                let statuses = state.owner.statuses();
                // Nothing to read from: no use waiting for the lease.
                if !statuses.contains(&Status::Active) {
                    return Err(ObjectError::Unavailable);
                }
                self.note_needed(&state, &statuses);
            }
            let left = self.lease.left(self.lease.now());
            if left <= lease::RENEW_WHEN_LEFT_MS {
                self.renew_lease();
            }
            if left > 0 {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ObjectError::Unavailable);
            }
            // A renewal's end, or a record that needs fewer components;
            // looking again now and then for the rest (a renewal that
            // found nothing to ask, say).
            let _ = tokio::time::timeout(VOUCH_LOOK, changed).await;
        }
    }

    /// Asks each component the lease needs whose last answer is getting
    /// old for a provisioning state (a query a newer owner's fence makes
    /// it refuse), unless a renewal is asking it already. An answer renews
    /// the lease; a refusal of this epoch closes the object; no answer
    /// within `RENEW_TIMEOUT`, or an error, fails a component this owner
    /// counts active, as a write's would, so its absence is recorded and
    /// the lease stops needing it (reads do not wait on it for ever when
    /// no write comes to find it out).
    fn renew_lease(self: &Arc<Self>) {
        let components = self.lease.to_renew(self.lease.now());
        if components.is_empty() {
            return;
        }
        let object = self.clone();
        tokio::spawn(async move {
            let asks = components.into_iter().map(|index| {
                let object = &object;
                async move {
                    let session = object.state.lock().expect("object lock").sessions[index].0;
                    let sent = object.lease.now();
                    let client = object.client(index);
                    let query = client.provisioning(object.epoch, object.ids[index], 0, 1);
                    let failure = match tokio::time::timeout(RENEW_TIMEOUT, query).await {
                        Ok(Ok(_)) => {
                            object.lease.answered(index, sent);
                            None
                        }
                        Ok(Err(error)) if object.deposed_by(&error) => None,
                        Ok(Err(error)) => Some(error.to_string()),
                        Err(_) => Some(format!("no answer within {RENEW_TIMEOUT:?}")),
                    };
                    if let Some(error) = failure {
                        if object.statuses()[index] == Status::Active {
                            tracing::warn!(component = index, %error, "component failed a lease renewal");
                            object.input_from(index, session, Input::Failed { component: index }, None);
                        }
                    }
                    object.lease.asked(index);
                    object.lease_changed.notify_waiters();
                }
            });
            futures::future::join_all(asks).await;
        });
    }

    /// The copies that are up to date now, those on this host first (a read
    /// of a local copy skips the network).
    fn active(&self) -> Vec<Index> {
        let statuses = self.statuses();
        self.in_place_first(&statuses)
    }

    /// As [`Self::active`], for serving data from: choosing any counts as
    /// serving it (`Owner::served_data`), in the same hold of the lock, so
    /// a copy that comes back after cannot be taken for the copy of record
    /// for lacking what this read may show. (A cache hit was filled by an
    /// earlier read.) With the last LSN written when they were chosen.
    fn active_serving(&self) -> (Vec<Index>, Lsn) {
        let (statuses, written) = {
            let mut state = self.state.lock().expect("object lock");
            let statuses = state.owner.statuses();
            if statuses.contains(&Status::Active) {
                state.owner.served_data();
            }
            (statuses, state.owner.last_lsn())
        };
        (self.in_place_first(&statuses), written)
    }

    /// The active copies among `statuses`, those on this host first.
    fn in_place_first(&self, statuses: &[Status]) -> Vec<Index> {
        let mut active: Vec<Index> = (0..statuses.len()).filter(|&index| statuses[index] == Status::Active).collect();
        active.sort_by_key(|&index| !self.clients[index].read().expect("client lock").is_in_place());
        active
    }

    /// Reads whole blocks from an active copy; a checksum error is repaired
    /// from another copy and reported.
    pub async fn read_at(self: &Arc<Self>, offset: u64, length: u64) -> Result<Bytes, ObjectError> {
        self.read_at_via(offset, length, None).await
    }

    /// As [`Self::read_at`], reading copies through `via` (the calling
    /// thread's transport) rather than the owner thread's connections.
    /// Reads are unordered requests: any connection to the component
    /// serves them alike.
    pub async fn read_at_via(
        self: &Arc<Self>,
        offset: u64,
        length: u64,
        via: Option<&T>,
    ) -> Result<Bytes, ObjectError> {
        let (first, count) = self.check(offset, length)?;
        let sealed = self.read_sealed(first, count, via).await?;
        Ok(self.through_cipher(first, sealed, false))
    }

    /// Blocks `first..first + count` as the components hold them
    /// (encrypted, if the object is).
    async fn read_sealed(self: &Arc<Self>, first: u64, count: u64, via: Option<&T>) -> Result<Bytes, ObjectError> {
        if let Some(layout) = self.erasure {
            return self.read_erasure(layout, first, count, via).await;
        }
        self.vouch().await?;
        if let Some(cache) = &self.cache {
            if let Some(data) = cache.lookup(first, count) {
                return Ok(data);
            }
        }
        // Before the copies are chosen: a write answered before the ticket
        // was answered without any copy that failed before it.
        let ticket = self.cache.as_ref().and_then(|cache| cache.ticket(first, count));
        let (active, written_before) = self.active_serving();
        if active.is_empty() {
            return Err(ObjectError::Unavailable);
        }
        let mut errors = Misses::default();
        let mut corrupt: Vec<(Index, Vec<u64>)> = Vec::new();
        for index in active {
            let (id, mut client) = (&self.ids[index], self.client(index));
            if let Some(transport) = via {
                client = client.with_transport(transport.clone());
            }
            let sent = self.lease.now();
            match client.read(self.epoch, *id, first, count).await {
                Ok(data) => {
                    self.lease.answered(index, sent);
                    if let Some(cache) = &self.cache {
                        cache.answered(sent);
                        if let Some(ticket) = &ticket {
                            cache.fill(ticket, first, &data);
                        }
                    }
                    for (bad, blocks) in corrupt {
                        self.repair(bad, first, &blocks, &data, written_before);
                    }
                    return Ok(data);
                }
                Err(ClientError::Component(ComponentError::Corrupt { blocks })) => {
                    tracing::error!(component = index, ?blocks, "checksum mismatch; reading another copy");
                    corrupt.push((index, blocks));
                }
                Err(error) if self.deposed_by(&error) => return Err(ObjectError::Deposed),
                Err(error) => errors.push(error.to_string(), &error),
            }
        }
        if corrupt.is_empty() {
            return Err(errors.into_error());
        }
        Err(ObjectError::Read(errors.messages.join("; ")))
    }

    /// Whether the block at `offset` is allocated on a healthy copy, and
    /// how many bytes from it, up to `length`, share that state.
    pub async fn provisioning(self: &Arc<Self>, offset: u64, length: u64) -> Result<(bool, u64), ObjectError> {
        let (first, count) = self.check(offset, length)?;
        if let Some(layout) = self.erasure {
            return self.provisioning_erasure(layout, first, count).await;
        }
        self.vouch().await?;
        let (active, _) = self.active_serving();
        let mut errors = Misses::default();
        for index in active {
            let sent = self.lease.now();
            match self.client(index).provisioning(self.epoch, self.ids[index], first, count).await {
                Ok((mapped, blocks)) => {
                    self.lease.answered(index, sent);
                    return Ok((mapped, blocks * BLOCK_SIZE as u64));
                }
                Err(error) => errors.push(error.to_string(), &error),
            }
        }
        Err(errors.into_error())
    }

    /// Rewrites corrupt blocks of `component` with good data read while no
    /// write was made (a write since might be newer than the data read).
    fn repair(self: &Arc<Self>, component: Index, first: u64, blocks: &[u64], data: &Bytes, written_before: Lsn) {
        let mut state = self.state.lock().expect("object lock");
        if state.owner.last_lsn() != written_before || state.owner.status(component) != &Status::Active {
            tracing::info!(component, "not repairing now: the object was written meanwhile");
            return;
        }
        metrics::counter!("objects_blocks_repaired_total").increment(blocks.len() as u64);
        self.resync_stats.blocks_repaired.fetch_add(blocks.len() as u64, Ordering::Relaxed);
        tracing::warn!(component, ?blocks, "repairing corrupt blocks from another copy");
        for block in blocks {
            let at = ((block - first) as usize) * BLOCK_SIZE;
            let request = Request::Repair { component: self.ids[component], first: *block };
            drop(self.send(&mut state, component, request, data.slice(at..at + BLOCK_SIZE), None));
        }
    }
}

/// A resync job's share of [`ResyncStats`]: what it still has to copy is
/// taken off when it ends, however it ends.
struct Progress<'a> {
    stats: &'a ResyncStats,
    left: u64,
}

impl<'a> Progress<'a> {
    fn start(stats: &'a ResyncStats, blocks: u64) -> Progress<'a> {
        if stats.blocks_to_go.fetch_add(blocks, Ordering::Relaxed) == 0 {
            stats.blocks_copied_current.store(0, Ordering::Relaxed);
            stats.current_started_ms.store(now_ms(), Ordering::Relaxed);
        }
        Progress { stats, left: blocks }
    }

    fn copied(&mut self, blocks: u64) {
        let blocks = blocks.min(self.left);
        self.left -= blocks;
        self.stats.blocks_to_go.fetch_sub(blocks, Ordering::Relaxed);
        self.stats.blocks_copied.fetch_add(blocks, Ordering::Relaxed);
        self.stats.blocks_copied_current.fetch_add(blocks, Ordering::Relaxed);
        metrics::counter!("objects_resync_blocks_copied_total").increment(blocks);
    }
}

impl Drop for Progress<'_> {
    fn drop(&mut self) {
        self.stats.blocks_to_go.fetch_sub(self.left, Ordering::Relaxed);
    }
}

/// Whether a component is in the middle of a resync whose blocks written
/// no rollback can take back to what it held. One on which nothing landed
/// under this resync or one before it since it was last complete holds
/// what it held at its stale LSN (its disk says so: a new plan empties
/// the count of blocks done, not the account of what landed). One whose
/// resync had nothing to bring (its stale LSN is its target) holds that
/// too, plus the writes sent to it since, in order, each with the stripe's
/// before-image, which was then its own; the rows a resync rebuilt, or a
/// write it was not sent, the owner accounts for (`rows_rebuilt`).
fn rows_resynced(info: &ComponentInfo) -> bool {
    info.sync.is_some_and(|(stale, target, _)| stale != target) && !info.untouched_by_resync
}

/// The stale LSNs a component holds complete tracking bitmaps for.
fn complete_tracking(info: &ComponentInfo) -> Vec<Lsn> {
    info.tracking.iter().filter(|(_, _, complete)| *complete).map(|(lsn, _, _)| *lsn).collect()
}

/// Every LSN up to this one is on every component a new owner could take
/// for current: those not away, and those away whose absence is not yet
/// recorded. Their chunks' before-images up to it can go.
fn stable(state: &State) -> Lsn {
    let unrecorded = (0..state.persisted.len())
        .filter(|index| state.persisted[*index] == Status::Active)
        .map(|index| state.owner.acked_up_to(index))
        .min();
    let stable = unrecorded.map_or(state.owner.stable(), |acked| acked.min(state.owner.stable()));
    // A write not answered done may still be rolled back (a readmission
    // after more than m components were away at once).
    stable.min(state.owner.done_lsn())
}

/// Whether a component absent in `now` was not absent when last recorded.
fn newly_absent(now: &[Status], recorded: &[Status]) -> bool {
    now.iter().enumerate().any(|(index, status)| {
        matches!(status, Status::Absent { .. }) && !matches!(recorded.get(index), Some(Status::Absent { .. }))
    })
}

/// Whether the record counts no component recorded away above `to`.
fn recorded_no_higher_than(recorded: &[Status], to: Lsn) -> bool {
    recorded.iter().all(|status| match status {
        Status::Active => true,
        Status::Absent { stale, .. } | Status::Resyncing { stale, .. } => *stale <= to,
    })
}

/// Whether the record lags what counts for a new owner: nothing recorded
/// yet, a component absent in `now` not recorded absent, or one active in
/// `now` not recorded active. Completions wait for the record then.
fn unrecorded(now: &[Status], recorded: &[Status]) -> bool {
    now.len() != recorded.len()
        || newly_absent(now, recorded)
        || now.iter().zip(recorded).any(|(now, recorded)| *now == Status::Active && *recorded != Status::Active)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_wait_while_the_record_lags_what_a_new_owner_would_go_by() {
        let absent = Status::Absent { stale: 4, since: 0 };
        let resyncing = Status::Resyncing { stale: 4, target: 9 };
        let active = Status::Active;
        // A new owner's first record is not made yet.
        assert!(unrecorded(&[active.clone(), active.clone()], &[]));
        // A new absence.
        assert!(unrecorded(&[active.clone(), absent.clone()], &[active.clone(), active.clone()]));
        // A resync ended (its component may count among a write's holders).
        assert!(unrecorded(&[active.clone(), active.clone()], &[active.clone(), resyncing.clone()]));
        // Readmitted.
        assert!(unrecorded(&[active.clone(), active.clone()], &[active.clone(), absent.clone()]));
        // Only what does not count for a new owner differs.
        assert!(!unrecorded(&[active.clone(), resyncing.clone()], &[active.clone(), absent.clone()]));
        assert!(!unrecorded(&[active.clone(), Status::Absent { stale: 2, since: 5 }], &[active, absent]));
    }
}
