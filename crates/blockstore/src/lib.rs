//! `blockstore`: the per-disk component store.
//!
//! A [`Disk`] is a directory on one physical disk. It holds the components
//! (replicas or chunks of distributed objects) placed on that disk: each
//! component's blocks (4 KiB) with a CRC32C per block, its last committed
//! LSN, its tracking bitmaps (blocks written above a stale LSN of an absent
//! peer) and, while it is being resynchronized, its synchronization bitmap.
//!
//! **Durability.** Every change is a [`record::Record`] appended to the
//! disk's journal by one writer thread that drains everything queued, writes
//! it in one go and calls `fdatasync` once (group commit). Only then is the
//! change applied to the component files (page cache, no sync) and its
//! caller answered. A checkpoint (when the journal passes a size, and on
//! close) syncs the component files, writes the metadata file atomically
//! with the next journal generation, and drops the old journal. On open,
//! the journal of the checkpoint's generation is replayed over it; replay is
//! idempotent and stops at the first torn or corrupt record.
//!
//! **Failure latch.** If a write or sync of the journal or a checkpoint
//! fails, the disk latches failed: every waiting and later operation gets
//! [`Error::DiskFailed`]. A failed `fdatasync` may have dropped dirty pages,
//! so nothing written since the last good sync can be trusted again.
//!
//! **Space.** A write that may need new blocks is admitted before it is
//! journaled: while the file system has more than
//! [`DiskConfig::reserve_bytes`] free beyond what the batch could take,
//! nothing is checked; closer to full, the blocks a write would fill are
//! allocated ahead (`fallocate`), and a write that finds no room, or would
//! eat into the reserve, is refused with [`Error::NoSpace`], having changed
//! nothing. Overwrites of allocated blocks, unmaps and metadata go on; the
//! reserve keeps room for the journal and checkpoints. A journal that cannot
//! grow is checkpointed early (a fresh journal frees the old one); a batch
//! that still finds no room is refused, not latched failed. A component that
//! refused a write refuses every later write and unmap until its owner says
//! the refused ones are settled ([`Disk::resume`]), a resync begins, or an
//! erasure-coded rollback gives them up, so its committed LSN never passes a
//! write it lacks.
//!
//! **Invariant:** after a crash, every change that was acknowledged is
//! there: its data (and checksum), the LSN it carried, and its marks in
//! the tracking and synchronization bitmaps.
//!
//! **Boundary:** no networking, no knowledge of objects or policies; the
//! `objects` crate decides what to write where.

pub mod record;

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, RwLock};

use bytes::Bytes;
use fsio::{File, Fs};
use roaring::RoaringBitmap;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

pub use record::Record;

pub const BLOCK_SIZE: usize = 4096;
const CRC_SIZE: u64 = 4;
/// Blocks per write record (4 MiB): larger writes are split.
pub const WRITE_BLOCKS_MAX: u64 = 1024;
/// Block numbers are kept in 32-bit bitmaps: 16 TiB per component.
pub const COMPONENT_BLOCKS_MAX: u64 = u32::MAX as u64;

pub type ComponentId = u64;
pub type Lsn = u64;

/// LSNs per window of recent writes.
pub const WINDOW_LSNS: Lsn = 64;
/// Windows of recent writes kept per component: a tracking bitmap started
/// for a stale LSN within them is seeded with every block written above it
/// (so writes that reached this component before the tracking began are not
/// missed, and a new owner can start tracking after the fact).
pub const RECENT_WINDOWS: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("disk {disk} failed: {reason}")]
    DiskFailed { disk: String, reason: String },
    #[error("component {0} does not exist on this disk")]
    NoSuchComponent(ComponentId),
    #[error("component {0} already exists on this disk")]
    Exists(ComponentId),
    #[error("blocks {first}..{end} are outside component {component} ({blocks} blocks)")]
    OutOfRange { component: ComponentId, first: u64, end: u64, blocks: u64 },
    #[error("{0}")]
    Invalid(String),
    #[error("component {component}: checksum mismatch in blocks {blocks:?}")]
    Corrupt { component: ComponentId, blocks: Vec<u64> },
    #[error("i/o error: {0}")]
    Io(String),
    #[error("owner epoch {epoch} is stale: the component accepts {current} and above")]
    StaleEpoch { epoch: u64, current: u64 },
    /// Refused before it was journaled: nothing changed.
    #[error("disk {disk} is full: {reason}")]
    NoSpace { disk: String, reason: String },
}

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Clone, Debug)]
pub struct DiskConfig {
    /// A checkpoint runs when the journal grows past this.
    pub journal_max_bytes: u64,
    /// Bytes of records one group commit takes at most.
    pub batch_max_bytes: usize,
    /// Records queued for the writer at most; submitters wait beyond it.
    pub queue_max: usize,
    /// Commits on the submitting task instead of a writer thread, so that
    /// a simulation on one thread replays exactly (for `fsio::SimFs`; with
    /// a real disk it would block the caller on every `fdatasync`).
    pub inline_writer: bool,
    /// Free bytes kept for the journal and checkpoints: a write that needs
    /// new blocks is refused rather than take the file system below it.
    pub reserve_bytes: u64,
}

impl Default for DiskConfig {
    fn default() -> Self {
        DiskConfig {
            journal_max_bytes: 256 << 20,
            batch_max_bytes: 8 << 20,
            queue_max: 4096,
            inline_writer: false,
            reserve_bytes: 64 << 20,
        }
    }
}

/// What a component looks like from outside.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentInfo {
    pub id: ComponentId,
    pub blocks: u64,
    pub committed_lsn: Lsn,
    /// The highest LSN written here (above `committed_lsn` while a resync
    /// is under way): a new owner numbers its writes above it.
    pub newest_lsn: Lsn,
    /// The lowest owner epoch the component accepts.
    pub epoch: u64,
    /// Stale LSNs this component keeps tracking bitmaps for, with the
    /// number of blocks marked in each and whether the bitmap is complete
    /// (it is not when it was started for a stale LSN older than the
    /// recent-write windows reach: a resync from it would miss blocks).
    pub tracking: Vec<(Lsn, u64, bool)>,
    /// While resynchronizing: (stale LSN, target LSN, blocks done).
    pub sync: Option<(Lsn, Lsn, u64)>,
    /// Bytes the component's data file holds on disk.
    pub allocated_bytes: u64,
    /// The LSN of the write it refused for want of room, while it takes no
    /// later one (see [`Disk::resume`]).
    pub halted: Option<Lsn>,
    /// While resynchronizing: nothing has landed here, under this resync
    /// or an earlier one since the component was last complete (no resync
    /// data, no write): it holds just what it held when the first began.
    /// (Last: a build from before it decodes the rest and ignores it.)
    pub untouched_by_resync: bool,
}

#[derive(Clone, Debug, Default)]
struct Sync {
    plan: u64,
    stale: Lsn,
    target: Lsn,
    done: RoaringBitmap,
    /// The newest LSN written here during the resync: the committed LSN
    /// once it ends (until then the component is only current to `stale`).
    newest: Lsn,
    /// Something landed under an earlier resync since the component was
    /// last complete (a new plan begins an empty `done`, not the blocks).
    landed_before: bool,
}

impl Sync {
    /// Nothing landed under this resync or one before it.
    fn untouched(&self) -> bool {
        !self.landed_before && self.done.is_empty()
    }
}

struct Component {
    data: Arc<dyn File>,
    crc: Arc<dyn File>,
    /// Guards the metadata and orders reads against applies (a read never
    /// sees a block's new data with its old checksum).
    state: RwLock<ComponentState>,
}

impl ComponentState {
    fn remember(&mut self, lsn: Lsn, first: u64, count: u64) {
        mark(self.recent.entry(lsn / WINDOW_LSNS).or_default(), first, count);
        while self.recent.len() > RECENT_WINDOWS {
            self.recent.pop_first();
        }
    }

    /// Starts tracking for `stale`, seeded with `seed`, or else with the
    /// recent writes above it.
    fn track(&mut self, stale: Lsn, seed: Option<&[(u64, u64)]>) {
        if self.tracking.contains_key(&stale) {
            return;
        }
        if let Some(seed) = seed {
            let mut bitmap = RoaringBitmap::new();
            for (first, count) in seed {
                let end = (first.saturating_add(*count)).min(self.blocks);
                if *first < end {
                    mark(&mut bitmap, *first, end - first);
                }
            }
            self.tracking.insert(stale, bitmap);
            return;
        }
        let (bitmap, complete) = self.written_since(stale);
        if !complete {
            self.incomplete.insert(stale);
        }
        self.tracking.insert(stale, bitmap);
    }

    /// The blocks the recent-write windows saw written above `stale` (a
    /// superset: whole windows), and whether the windows reach back that
    /// far.
    fn written_since(&self, stale: Lsn) -> (RoaringBitmap, bool) {
        let from = (stale + 1) / WINDOW_LSNS;
        let mut bitmap = RoaringBitmap::new();
        for window in self.recent.range(from..).map(|(_, window)| window) {
            bitmap |= window;
        }
        // Windows are only ever dropped once there are RECENT_WINDOWS of
        // them, oldest first: with fewer, none was; with that many, writes
        // above `stale` may have been in a dropped one unless the oldest kept
        // window reaches back to `stale`.
        let oldest = self.recent.keys().next().copied();
        let reaches = self.recent.len() < RECENT_WINDOWS || oldest.is_some_and(|oldest| oldest <= from);
        (bitmap, reaches || self.newest_lsn() <= stale)
    }

    fn newest_lsn(&self) -> Lsn {
        self.sync.as_ref().map_or(self.committed_lsn, |sync| sync.newest.max(self.committed_lsn))
    }

    /// Bookkeeping for a write or unmap under `lsn`.
    fn written(&mut self, lsn: Lsn, first: u64, count: u64) {
        self.remember(lsn, first, count);
        match self.sync.as_mut() {
            Some(sync) => {
                sync.newest = sync.newest.max(lsn);
                mark(&mut sync.done, first, count);
            }
            None => self.committed_lsn = self.committed_lsn.max(lsn),
        }
        for (stale, bitmap) in self.tracking.iter_mut() {
            if lsn > *stale {
                mark(bitmap, first, count);
            }
        }
    }
}

#[derive(Clone, Debug, Default)]
struct ComponentState {
    blocks: u64,
    committed_lsn: Lsn,
    /// The lowest owner epoch accepted.
    epoch: u64,
    tracking: BTreeMap<Lsn, RoaringBitmap>,
    /// Tracking bitmaps that may miss blocks (started too late).
    incomplete: std::collections::BTreeSet<Lsn>,
    /// Blocks written per window of `WINDOW_LSNS` LSNs, the newest windows.
    recent: BTreeMap<u64, RoaringBitmap>,
    sync: Option<Sync>,
    /// Written since the last checkpoint (its files need a sync).
    dirty: bool,
    /// Erasure-coded chunks: what each chunk write or unmap not yet stable
    /// changed, by LSN (a write's before-image; an unmap's range). Kept in
    /// the journal: a checkpoint writes them again at the head of the
    /// next one.
    undo: BTreeMap<Lsn, Undo>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Undo {
    Blocks { first: u64, data: Bytes },
    Unmapped { first: u64, count: u64 },
}

/// The checkpoint: what the component files hold once synced, and which
/// journal follows.
#[derive(Serialize, Deserialize, Default)]
struct Meta {
    generation: u64,
    components: Vec<ComponentMeta>,
}

#[derive(Serialize, Deserialize)]
struct ComponentMeta {
    id: ComponentId,
    blocks: u64,
    committed_lsn: Lsn,
    epoch: u64,
    tracking: Vec<(Lsn, Vec<u8>)>,
    incomplete: Vec<Lsn>,
    recent: Vec<(u64, Vec<u8>)>,
    /// plan, stale, target, newest, done.
    sync: Option<(u64, Lsn, Lsn, Lsn, Vec<u8>)>,
}

struct Op {
    record: Record,
    done: oneshot::Sender<Result<()>>,
}

#[derive(Default)]
struct Queue {
    ops: VecDeque<Op>,
    closing: bool,
    /// The highest fence queued per component (applied or not): an owner
    /// epoch below it is refused at the door, so nothing of a deposed
    /// owner is queued behind the fence that deposed it.
    fenced: BTreeMap<ComponentId, u64>,
}

struct Inner {
    fs: Arc<dyn Fs>,
    dir: PathBuf,
    name: String,
    config: DiskConfig,
    components: RwLock<BTreeMap<ComponentId, Arc<Component>>>,
    failed: Mutex<Option<String>>,
    queue: Mutex<Queue>,
    /// Wakes the writer (work queued) and submitters (room in the queue).
    wake: Condvar,
    room: Condvar,
    /// The journal, when the writer runs inline.
    inline: Mutex<Option<Journal>>,
    /// Components that refused a write for want of space, with the LSN of
    /// the first: they refuse every later write and unmap (so their
    /// committed LSN never passes the write they lack) until the owner
    /// says it settled it ([`Disk::resume`]), a resync begins or ends, or
    /// a rollback (erasure coding) goes below it.
    halted: Mutex<BTreeMap<ComponentId, Lsn>>,
}

/// The open journal and where the next record goes.
/// How far ahead the journal is zeroed at a time.
const JOURNAL_ZERO_STEP: u64 = 8 << 20;

struct Journal {
    file: Arc<dyn File>,
    len: u64,
    /// The file is zeroed up to here: appends below it overwrite, so their
    /// `fdatasync` has no file size to commit.
    zeroed: u64,
    generation: u64,
    buffer: Vec<u8>,
    /// A checkpoint runs once the journal is this long (later than
    /// `journal_max_bytes` after one failed for want of space).
    checkpoint_at: u64,
    /// A nearly full disk checkpoints to give back the journal's room only
    /// once the journal is this long (after one found no room).
    early_after: u64,
}

/// One disk's component store. Cheap to clone; the writer thread stops,
/// with a final checkpoint, when [`Disk::close`] is called or the last
/// clone is dropped.
#[derive(Clone)]
pub struct Disk {
    inner: Arc<Inner>,
    writer: Arc<Writer>,
}

struct Writer {
    inner: Arc<Inner>,
    /// None when the writer runs inline.
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Writer {
    fn stop(&self, checkpoint: bool) {
        {
            let mut queue = self.inner.queue.lock().expect("queue lock");
            queue.closing = true;
            if !checkpoint {
                // Nothing more may reach the files.
                self.inner.failed.lock().expect("failed lock").get_or_insert_with(|| "abandoned".into());
            }
        }
        self.inner.wake.notify_all();
        self.inner.room.notify_all();
        if self.inner.config.inline_writer {
            self.inner.run_inline();
        }
        if let Some(thread) = self.thread.lock().expect("writer lock").take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop(true);
    }
}

fn io(error: std::io::Error) -> Error {
    Error::Io(error.to_string())
}

fn is_full(error: &std::io::Error) -> bool {
    error.kind() == std::io::ErrorKind::StorageFull
}

fn journal_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("journal-{generation}"))
}

fn data_path(dir: &Path, component: ComponentId) -> PathBuf {
    dir.join(format!("c-{component}.data"))
}

fn crc_path(dir: &Path, component: ComponentId) -> PathBuf {
    dir.join(format!("c-{component}.crc"))
}

fn bitmap_bytes(bitmap: &RoaringBitmap) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(bitmap.serialized_size());
    bitmap.serialize_into(&mut bytes).expect("writing to a Vec cannot fail");
    bytes
}

fn bitmap_from(bytes: &[u8]) -> Result<RoaringBitmap> {
    RoaringBitmap::deserialize_from(bytes).map_err(|error| Error::Io(format!("corrupt bitmap in metadata: {error}")))
}

/// Marks `count` blocks from `first`.
fn mark(bitmap: &mut RoaringBitmap, first: u64, count: u64) {
    bitmap.insert_range(first as u32..(first + count) as u32);
}

/// The CRC a block's checksum slot holds: 0 only for a block never written
/// (or deallocated), which then reads as zeros; a written block whose
/// CRC32C is 0 stores [`ZERO_CRC`] instead, so a 0 slot always means
/// unallocated (GET LBA STATUS and `qemu-img convert` rely on it).
fn block_crc(block: &[u8]) -> u32 {
    match crc32c::crc32c(block) {
        0 => ZERO_CRC,
        crc => crc,
    }
}

/// What a written block whose CRC32C is 0 stores in its slot.
const ZERO_CRC: u32 = u32::MAX;
/// Checksum slots one provisioning query reads at most (256 KiB).
const PROVISIONING_SCAN_BLOCKS: u64 = 65_536;

/// Whether a block's stored checksum `stored` matches the block.
fn crc_matches(block: &[u8], stored: u32) -> bool {
    match stored {
        // Never written; an older store also kept 0 for a CRC32C of 0.
        0 => block.iter().all(|byte| *byte == 0) || crc32c::crc32c(block) == 0,
        ZERO_CRC => matches!(crc32c::crc32c(block), 0 | ZERO_CRC),
        stored => crc32c::crc32c(block) == stored,
    }
}

impl Disk {
    /// Opens (or creates) the store in `dir`: loads the checkpoint, replays
    /// the journal after it, checkpoints, and starts the writer thread.
    pub fn open(fs: Arc<dyn Fs>, dir: &Path, config: DiskConfig) -> Result<Disk> {
        fs.create_dir_all(dir).map_err(io)?;
        let name = dir.display().to_string();
        let unreadable = |error: postcard::Error| Error::Io(format!("{name}: unreadable metadata: {error}"));
        // `landed`: written after `Meta`. Metadata from before it ends at
        // `Meta` and cannot say: every resync under way counts as one under
        // which something landed (`None`).
        let (meta, landed): (Meta, Option<Vec<ComponentId>>) = match fs.read_file(&dir.join("meta")) {
            Ok(bytes) => {
                let (meta, rest) = postcard::take_from_bytes(&bytes).map_err(unreadable)?;
                let landed = if rest.is_empty() { None } else { Some(postcard::from_bytes(rest).map_err(unreadable)?) };
                (meta, landed)
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => (Meta::default(), Some(Vec::new())),
            Err(error) => return Err(io(error)),
        };
        let inner = Arc::new(Inner {
            fs: fs.clone(),
            dir: dir.to_path_buf(),
            name,
            config,
            components: RwLock::new(BTreeMap::new()),
            failed: Mutex::new(None),
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            room: Condvar::new(),
            inline: Mutex::new(None),
            halted: Mutex::new(BTreeMap::new()),
        });
        {
            let mut components = inner.components.write().expect("components lock");
            for component in &meta.components {
                let state = ComponentState {
                    blocks: component.blocks,
                    committed_lsn: component.committed_lsn,
                    epoch: component.epoch,
                    tracking: component
                        .tracking
                        .iter()
                        .map(|(lsn, bytes)| Ok((*lsn, bitmap_from(bytes)?)))
                        .collect::<Result<_>>()?,
                    incomplete: component.incomplete.iter().copied().collect(),
                    recent: component
                        .recent
                        .iter()
                        .map(|(window, bytes)| Ok((*window, bitmap_from(bytes)?)))
                        .collect::<Result<_>>()?,
                    sync: match &component.sync {
                        Some((plan, stale, target, newest, bytes)) => Some(Sync {
                            plan: *plan,
                            stale: *stale,
                            target: *target,
                            newest: *newest,
                            done: bitmap_from(bytes)?,
                            landed_before: landed.as_ref().is_none_or(|landed| landed.contains(&component.id)),
                        }),
                        None => None,
                    },
                    dirty: false,
                    // Restored by the journal's replay.
                    undo: BTreeMap::new(),
                };
                components.insert(component.id, inner.open_component(component.id, state)?);
            }
        }
        // Replay the journal that follows the checkpoint.
        let journal = journal_path(dir, meta.generation);
        let mut replayed = 0usize;
        let mut end = 0;
        if fs.exists(&journal) {
            let bytes = fs.read_file(&journal).map_err(io)?;
            let mut offset = 0;
            while let Some((record, used)) = Record::decode(&bytes[offset..]) {
                // A record that cannot apply now could not have applied
                // before either (it was answered with that error); an I/O
                // error is real.
                if let Err(Error::Io(reason)) = inner.apply(&record) {
                    return Err(Error::Io(format!("{}: replaying the journal: {reason}", inner.name)));
                }
                offset += used;
                replayed += 1;
            }
            if offset < bytes.len() {
                tracing::info!(disk = %inner.name, replayed, torn_bytes = bytes.len() - offset, "journal ends in a torn record");
            }
            end = offset as u64;
        }
        // A fresh journal after a checkpoint; on a file system too full for
        // one, the journal just replayed, cleared past its last record.
        let (generation, end) = match inner.checkpoint(meta.generation) {
            Ok(()) => (meta.generation + 1, None),
            Err(error @ Error::NoSpace { .. }) => {
                tracing::warn!(disk = %inner.name, %error, "no room to checkpoint: going on with the journal replayed");
                let file = fs.open(&journal, true).map_err(io)?;
                write_zeros(file.as_ref(), end, file.len().map_err(io)?).map_err(io)?;
                file.sync_data().map_err(io)?;
                (meta.generation, Some(end))
            }
            Err(error) => return Err(error),
        };
        // Anything else in the directory is left from an interrupted
        // checkpoint or a deleted component.
        inner.remove_strays(generation)?;
        tracing::info!(disk = %inner.name, components = meta.components.len(), replayed, "disk open");
        let thread = if inner.config.inline_writer {
            *inner.inline.lock().expect("inline writer lock") = inner.open_journal(generation, end);
            None
        } else {
            let writer_inner = inner.clone();
            let thread = std::thread::Builder::new()
                .name("blockstore-writer".into())
                .spawn(move || writer_inner.run_writer(generation, end))
                .map_err(io)?;
            Some(thread)
        };
        let writer = Arc::new(Writer { inner: inner.clone(), thread: Mutex::new(thread) });
        Ok(Disk { inner, writer })
    }

    /// Stops the writer after what is queued, with a final checkpoint.
    pub fn close(&self) {
        self.writer.stop(true);
    }

    /// Stops the writer without a checkpoint, as a crash would leave things
    /// (for tests: the files are not touched again by this instance).
    pub fn abandon(&self) {
        self.writer.stop(false);
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Why the disk latched failed, if it did.
    pub fn failure(&self) -> Option<String> {
        self.inner.failed.lock().expect("failed lock").clone()
    }

    pub fn components(&self) -> Vec<ComponentInfo> {
        let ids: Vec<ComponentId> = self.inner.components.read().expect("components lock").keys().copied().collect();
        ids.into_iter().filter_map(|id| self.component(id).ok()).collect()
    }

    pub fn component(&self, id: ComponentId) -> Result<ComponentInfo> {
        let component = self.inner.get(id)?;
        let halted = self.halted(id);
        let state = component.state.read().expect("component lock");
        Ok(ComponentInfo {
            id,
            blocks: state.blocks,
            committed_lsn: state.committed_lsn,
            newest_lsn: state.newest_lsn(),
            epoch: state.epoch,
            tracking: state
                .tracking
                .iter()
                .map(|(lsn, bitmap)| (*lsn, bitmap.len(), !state.incomplete.contains(lsn)))
                .collect(),
            sync: state.sync.as_ref().map(|sync| (sync.stale, sync.target, sync.done.len())),
            allocated_bytes: component.data.allocated_bytes().unwrap_or(0),
            halted,
            untouched_by_resync: state.sync.as_ref().is_some_and(Sync::untouched),
        })
    }

    /// The blocks written above `stale` since tracking began for it.
    pub fn tracking_bitmap(&self, id: ComponentId, stale: Lsn) -> Result<Option<RoaringBitmap>> {
        let component = self.inner.get(id)?;
        let state = component.state.read().expect("component lock");
        Ok(state.tracking.get(&stale).cloned())
    }

    /// The ranges the chunk unmaps above `to` deallocated (a rollback to
    /// `to` does not restore them: the owner completes them instead).
    pub fn unmapped_above(&self, id: ComponentId, to: Lsn) -> Result<Vec<(u64, u64)>> {
        let component = self.inner.get(id)?;
        let state = component.state.read().expect("component lock");
        Ok(state
            .undo
            .range(to + 1..)
            .filter_map(|(_, undo)| match undo {
                Undo::Unmapped { first, count } => Some((*first, *count)),
                Undo::Blocks { .. } => None,
            })
            .collect())
    }

    /// The blocks written here above `stale`, from the recent-write
    /// windows; None if the windows do not reach back that far.
    pub fn written_since(&self, id: ComponentId, stale: Lsn) -> Result<Option<RoaringBitmap>> {
        let component = self.inner.get(id)?;
        let state = component.state.read().expect("component lock");
        let (bitmap, complete) = state.written_since(stale);
        Ok(complete.then_some(bitmap))
    }

    /// The blocks a resync has brought up to date (or newer writes covered).
    pub fn sync_bitmap(&self, id: ComponentId) -> Result<Option<RoaringBitmap>> {
        let component = self.inner.get(id)?;
        let state = component.state.read().expect("component lock");
        Ok(state.sync.as_ref().map(|sync| sync.done.clone()))
    }

    /// Reads `count` blocks from `first`, checking every block's CRC32C.
    /// Deallocated and never-written blocks read as zeros.
    pub fn read(&self, id: ComponentId, first: u64, count: u64) -> Result<Bytes> {
        self.inner.check_failed()?;
        if count > WRITE_BLOCKS_MAX {
            return Err(Error::Invalid(format!("reads are of {WRITE_BLOCKS_MAX} blocks at most, not {count}")));
        }
        let component = self.inner.get(id)?;
        let state = component.state.read().expect("component lock");
        check_range(id, first, count, state.blocks)?;
        let mut data = vec![0u8; count as usize * BLOCK_SIZE];
        let mut crcs = vec![0u8; count as usize * CRC_SIZE as usize];
        read_fully(component.data.as_ref(), &mut data, first * BLOCK_SIZE as u64)?;
        read_fully(component.crc.as_ref(), &mut crcs, first * CRC_SIZE)?;
        drop(state);
        let mut bad = Vec::new();
        for (index, block) in data.chunks(BLOCK_SIZE).enumerate() {
            let stored = u32::from_le_bytes(crcs[index * 4..index * 4 + 4].try_into().expect("4 bytes"));
            if !crc_matches(block, stored) {
                bad.push(first + index as u64);
            }
        }
        if !bad.is_empty() {
            metrics::counter!("blockstore_checksum_errors_total").increment(bad.len() as u64);
            tracing::error!(disk = %self.inner.name, component = id, blocks = ?bad, "checksum mismatch");
            return Err(Error::Corrupt { component: id, blocks: bad });
        }
        Ok(Bytes::from(data))
    }

    /// Whether block `first` is allocated (written and not deallocated since),
    /// and how many blocks from it, up to `count`, share that state (a
    /// query looks at 65,536 blocks at most).
    pub fn provisioning(&self, id: ComponentId, first: u64, count: u64) -> Result<(bool, u64)> {
        self.inner.check_failed()?;
        let component = self.inner.get(id)?;
        let state = component.state.read().expect("component lock");
        let count = count.clamp(1, PROVISIONING_SCAN_BLOCKS).min(state.blocks.saturating_sub(first));
        check_range(id, first, count, state.blocks)?;
        let mut crcs = vec![0u8; count as usize * CRC_SIZE as usize];
        read_fully(component.crc.as_ref(), &mut crcs, first * CRC_SIZE)?;
        drop(state);
        let allocated = |index: usize| slot_allocated(&crcs[index * 4..index * 4 + 4]);
        let mapped = allocated(0);
        let run = (1..count as usize).find(|&index| allocated(index) != mapped).unwrap_or(count as usize);
        Ok((mapped, run as u64))
    }

    /// The blocks of `among` that are allocated here (written and not
    /// deallocated since): a resync need not copy a block that is a hole
    /// on both sides.
    pub fn allocated_among(&self, id: ComponentId, among: &RoaringBitmap) -> Result<RoaringBitmap> {
        self.inner.check_failed()?;
        let component = self.inner.get(id)?;
        let blocks = component.state.read().expect("component lock").blocks;
        let mut allocated = RoaringBitmap::new();
        let mut crcs = Vec::new();
        let mut candidates = among.iter().map(u64::from).filter(|block| *block < blocks).peekable();
        while let Some(first) = candidates.next() {
            // A run of consecutive candidates, read in one piece.
            let mut end = first + 1;
            while end - first < PROVISIONING_SCAN_BLOCKS && candidates.peek() == Some(&end) {
                candidates.next();
                end += 1;
            }
            crcs.resize(((end - first) * CRC_SIZE) as usize, 0);
            read_fully(component.crc.as_ref(), &mut crcs, first * CRC_SIZE)?;
            for (index, slot) in crcs.chunks(CRC_SIZE as usize).enumerate() {
                if slot_allocated(slot) {
                    allocated.insert((first + index as u64) as u32);
                }
            }
        }
        Ok(allocated)
    }

    pub async fn create(&self, id: ComponentId, blocks: u64) -> Result<()> {
        if blocks > COMPONENT_BLOCKS_MAX {
            return Err(Error::Invalid(format!("{blocks} blocks is more than a component holds")));
        }
        if self.inner.get(id).is_ok() {
            return Err(Error::Exists(id));
        }
        self.submit(Record::Create { component: id, blocks }).await
    }

    pub async fn delete(&self, id: ComponentId) -> Result<()> {
        self.inner.get(id)?;
        self.submit(Record::Delete { component: id }).await
    }

    pub async fn resize(&self, id: ComponentId, blocks: u64) -> Result<()> {
        if blocks > COMPONENT_BLOCKS_MAX {
            return Err(Error::Invalid(format!("{blocks} blocks is more than a component holds")));
        }
        self.inner.get(id)?;
        self.submit(Record::Resize { component: id, blocks }).await
    }

    /// Writes whole blocks from `first` under `lsn`; returns once durable.
    pub async fn write(&self, id: ComponentId, lsn: Lsn, first: u64, data: Bytes) -> Result<()> {
        self.write_records(id, first, data, |first, data| Record::Write { component: id, lsn, first, data }).await
    }

    /// Resync data from a source component for resync `plan`: lands only on
    /// blocks no newer write has reached, and only while that plan is the
    /// resync under way (a job of a plan since superseded may still be
    /// copying, from a source whose data the newer plan no longer trusts).
    pub async fn sync_write(&self, id: ComponentId, plan: u64, first: u64, data: Bytes) -> Result<()> {
        if plan == 0 {
            // Plan 0 stands for journal records from before plans were named.
            return Err(Error::Invalid("resync plan 0 is reserved".into()));
        }
        self.write_records(id, first, data, |first, data| Record::SyncWrite { component: id, plan, first, data }).await
    }

    /// Rewrites blocks found corrupt with good data from another replica.
    pub async fn repair(&self, id: ComponentId, first: u64, data: Bytes) -> Result<()> {
        self.write_records(id, first, data, |first, data| Record::Repair { component: id, first, data }).await
    }

    async fn write_records(
        &self,
        id: ComponentId,
        first: u64,
        data: Bytes,
        make: impl Fn(u64, Bytes) -> Record,
    ) -> Result<()> {
        if data.is_empty() || !data.len().is_multiple_of(BLOCK_SIZE) {
            return Err(Error::Invalid(format!("{} bytes is not a whole number of blocks", data.len())));
        }
        let count = (data.len() / BLOCK_SIZE) as u64;
        {
            let component = self.inner.get(id)?;
            let state = component.state.read().expect("component lock");
            check_range(id, first, count, state.blocks)?;
        }
        let mut waits = Vec::new();
        let step = WRITE_BLOCKS_MAX as usize * BLOCK_SIZE;
        for (index, start) in (0..data.len()).step_by(step).enumerate() {
            let piece = data.slice(start..(start + step).min(data.len()));
            waits.push(self.enqueue(make(first + index as u64 * WRITE_BLOCKS_MAX, piece)));
        }
        for wait in waits {
            wait.await?;
        }
        Ok(())
    }

    /// Deallocates blocks under `lsn`: their space goes back to the disk and
    /// they read as zeros.
    pub async fn unmap(&self, id: ComponentId, lsn: Lsn, first: u64, count: u64) -> Result<()> {
        {
            let component = self.inner.get(id)?;
            let state = component.state.read().expect("component lock");
            check_range(id, first, count, state.blocks)?;
        }
        self.submit(Record::Unmap { component: id, lsn, first, count }).await
    }

    /// Starts a tracking bitmap for a peer that went stale at `stale`.
    /// `seed`: the block ranges written above `stale` that reached this
    /// component before now, when the caller knows them exactly (the owner
    /// does: they are its writes in flight); `None` seeds it from the
    /// recent-write windows instead, a superset by at most a window's writes
    /// (see [`ComponentInfo::tracking`] for whether that reached back far
    /// enough).
    pub async fn track(&self, id: ComponentId, stale: Lsn, seed: Option<Vec<(u64, u64)>>) -> Result<()> {
        self.inner.get(id)?;
        self.submit(Record::Track { component: id, stale, seed }).await
    }

    pub async fn untrack(&self, id: ComponentId, stale: Lsn) -> Result<()> {
        self.inner.get(id)?;
        self.submit(Record::Untrack { component: id, stale }).await
    }

    /// This component missed the writes after `stale`, up to `target`: a
    /// synchronization bitmap records what resync `plan` (non-zero, unique
    /// per resync the owner plans) brings. Beginning the same plan again
    /// keeps what it brought so far; a different plan starts afresh (the
    /// component may have missed writes in between).
    pub async fn begin_sync(&self, id: ComponentId, stale: Lsn, target: Lsn, plan: u64) -> Result<()> {
        if target < stale {
            return Err(Error::Invalid(format!("resync target {target} is below the stale LSN {stale}")));
        }
        if plan == 0 {
            return Err(Error::Invalid("resync plan 0 is reserved".into()));
        }
        self.inner.get(id)?;
        self.submit(Record::BeginSync { component: id, stale, target, plan }).await
    }

    /// Resync `plan` is complete: the component is current up to its
    /// target. Plan 0 ends any resync as it stands (the component becomes
    /// the copy of record). Returns whether a resync ended.
    pub async fn end_sync(&self, id: ComponentId, plan: u64) -> Result<bool> {
        let component = self.inner.get(id)?;
        let matches = |state: &ComponentState| state.sync.as_ref().is_some_and(|sync| plan == 0 || sync.plan == plan);
        if !matches(&component.state.read().expect("component lock")) {
            return Ok(false);
        }
        self.submit(Record::EndSync { component: id, plan }).await?;
        Ok(true)
    }

    /// The resync under way, if any: (plan, stale, target).
    pub fn sync_plan(&self, id: ComponentId) -> Result<Option<(u64, Lsn, Lsn)>> {
        let component = self.inner.get(id)?;
        let state = component.state.read().expect("component lock");
        Ok(state.sync.as_ref().map(|sync| (sync.plan, sync.stale, sync.target)))
    }

    /// Raises the lowest owner epoch the component accepts (never lowers it).
    pub async fn fence(&self, id: ComponentId, epoch: u64) -> Result<()> {
        match self.submit_in_epoch(id, epoch, None) {
            Ok((Some(fence), _)) => fence.await,
            Ok((None, _)) | Err(Error::StaleEpoch { .. }) => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// The owner settled every write up to `through` this component
    /// refused for want of space (no copy took them): it takes writes
    /// again if it refused none above.
    pub fn resume(&self, id: ComponentId, through: Lsn) {
        let mut halted = self.inner.halted.lock().expect("halted lock");
        if halted.get(&id).is_some_and(|first| *first <= through) {
            halted.remove(&id);
        }
    }

    /// The LSN of the write that halted this component, if it is halted
    /// (see [`Disk::resume`]).
    pub fn halted(&self, id: ComponentId) -> Option<Lsn> {
        self.inner.halted.lock().expect("halted lock").get(&id).copied()
    }

    /// The lowest owner epoch component `id` accepts, counting fences
    /// queued but not yet applied.
    pub fn accepted_epoch(&self, id: ComponentId) -> Result<u64> {
        let applied = self.inner.get(id)?.state.read().expect("component lock").epoch;
        let queue = self.inner.queue.lock().expect("queue lock");
        Ok(queue.fenced.get(&id).copied().unwrap_or(0).max(applied))
    }

    /// Hands `record` (if any) to the journal on behalf of the owner at
    /// `epoch`, checked against the component's epoch under the queue's
    /// lock: an epoch below the highest fence applied or queued is refused
    /// ([`Error::StaleEpoch`]); a higher one queues its fence first. So once
    /// a newer owner's fence is queued, no record of an older owner can
    /// follow it into the journal. Returns the waits for the fence (when
    /// one was queued) and for the record.
    #[allow(clippy::type_complexity)]
    pub fn submit_in_epoch(
        &self,
        id: ComponentId,
        epoch: u64,
        mut record: Option<Record>,
    ) -> Result<(
        Option<impl std::future::Future<Output = Result<()>> + Send + 'static>,
        Option<impl std::future::Future<Output = Result<()>> + Send + 'static>,
    )> {
        if let Some(record) = &record {
            self.check_record(record)?;
        }
        let applied = self.inner.get(id)?.state.read().expect("component lock").epoch;
        let mut fenced = false;
        let mut records = Vec::with_capacity(2);
        let mut waits = self.enqueue_all(&mut |queue| {
            let current = queue.fenced.get(&id).copied().unwrap_or(0).max(applied);
            if epoch < current {
                return Err(Error::StaleEpoch { epoch, current });
            }
            if epoch > current {
                queue.fenced.insert(id, epoch);
                records.push(Record::Fence { component: id, epoch });
                fenced = true;
            }
            records.extend(record.take());
            Ok(std::mem::take(&mut records))
        })?;
        let record_wait = if waits.len() > usize::from(fenced) { waits.pop() } else { None };
        Ok((waits.pop(), record_wait))
    }

    async fn submit(&self, record: Record) -> Result<()> {
        self.enqueue(record).await
    }

    /// Checks `record` and hands it to the journal now, before returning:
    /// records submitted one after another are journaled (and applied) in
    /// that order. The future completes when the record is durable and
    /// applied. Writes are of [`WRITE_BLOCKS_MAX`] blocks at most.
    pub fn submit_now(&self, record: Record) -> Result<impl std::future::Future<Output = Result<()>> + Send + 'static> {
        self.check_record(&record)?;
        Ok(self.enqueue(record))
    }

    /// The checks [`Disk::submit_now`] makes before queueing.
    fn check_record(&self, record: &Record) -> Result<()> {
        let id = record.component();
        if !matches!(record, Record::Create { .. }) {
            let component = self.inner.get(id)?;
            let state = component.state.read().expect("component lock");
            let range = match &record {
                Record::Write { first, data, .. }
                | Record::SyncWrite { first, data, .. }
                | Record::Repair { first, data, .. } => {
                    if data.is_empty() || !data.len().is_multiple_of(BLOCK_SIZE) {
                        return Err(Error::Invalid(format!("{} bytes is not a whole number of blocks", data.len())));
                    }
                    let count = (data.len() / BLOCK_SIZE) as u64;
                    if count > WRITE_BLOCKS_MAX {
                        return Err(Error::Invalid(format!(
                            "{count} blocks in one record; at most {WRITE_BLOCKS_MAX}"
                        )));
                    }
                    Some((*first, count))
                }
                Record::ChunkWrite { first, data, undo, .. } => {
                    if data.is_empty() || !data.len().is_multiple_of(BLOCK_SIZE) || undo.len() != data.len() {
                        return Err(Error::Invalid(format!(
                            "a chunk write of {} bytes with a before-image of {}",
                            data.len(),
                            undo.len()
                        )));
                    }
                    let count = (data.len() / BLOCK_SIZE) as u64;
                    if count > WRITE_BLOCKS_MAX {
                        return Err(Error::Invalid(format!(
                            "{count} blocks in one record; at most {WRITE_BLOCKS_MAX}"
                        )));
                    }
                    Some((*first, count))
                }
                Record::Unmap { first, count, .. } | Record::ChunkUnmap { first, count, .. } => Some((*first, *count)),
                _ => None,
            };
            if let Some((first, count)) = range {
                check_range(id, first, count, state.blocks)?;
            }
        }
        self.inner.check_failed()
    }

    /// Queues a record for the writer; the future completes when it is
    /// durable and applied.
    fn enqueue(&self, record: Record) -> impl std::future::Future<Output = Result<()>> + Send + 'static {
        let mut record = Some(record);
        let queued = self
            .enqueue_all(&mut |_| Ok(record.take().into_iter().collect()))
            .map(|mut waits| waits.pop().expect("one record queued"));
        async move { queued?.await }
    }

    /// Queues the records `admit` returns, in order; `admit` runs under
    /// the queue's lock (once there is room) and may refuse instead.
    fn enqueue_all(
        &self,
        admit: &mut dyn FnMut(&mut Queue) -> Result<Vec<Record>>,
    ) -> Result<Vec<impl std::future::Future<Output = Result<()>> + Send + 'static + use<>>> {
        let mut receivers = Vec::new();
        {
            let mut queue = self.inner.queue.lock().expect("queue lock");
            while queue.ops.len() >= self.inner.config.queue_max && !queue.closing && !self.inner.config.inline_writer {
                queue = self.inner.room.wait(queue).expect("queue lock");
            }
            if queue.closing {
                return Err(self.inner.failed_error("closing"));
            }
            self.inner.check_failed()?;
            for record in admit(&mut queue)? {
                let (done, wait) = oneshot::channel();
                queue.ops.push_back(Op { record, done });
                receivers.push(wait);
            }
        }
        if self.inner.config.inline_writer {
            self.inner.run_inline();
        } else {
            self.inner.wake.notify_one();
        }
        let name = self.inner.name.clone();
        Ok(receivers
            .into_iter()
            .map(|wait| {
                let name = name.clone();
                async move {
                    wait.await
                        .unwrap_or_else(|_| Err(Error::DiskFailed { disk: name, reason: "writer stopped".into() }))
                }
            })
            .collect())
    }
}

fn check_range(component: ComponentId, first: u64, count: u64, blocks: u64) -> Result<()> {
    let end = first.saturating_add(count);
    if count == 0 || end > blocks {
        return Err(Error::OutOfRange { component, first, end, blocks });
    }
    Ok(())
}

/// Reads what the file holds; bytes past its end read as zeros.
fn read_fully(file: &dyn File, buffer: &mut [u8], offset: u64) -> Result<()> {
    let mut done = 0;
    while done < buffer.len() {
        let read = file.read_at(&mut buffer[done..], offset + done as u64).map_err(io)?;
        if read == 0 {
            break;
        }
        done += read;
    }
    Ok(())
}

impl Inner {
    fn get(&self, id: ComponentId) -> Result<Arc<Component>> {
        self.components.read().expect("components lock").get(&id).cloned().ok_or(Error::NoSuchComponent(id))
    }

    fn failed_error(&self, reason: &str) -> Error {
        Error::DiskFailed { disk: self.name.clone(), reason: reason.to_string() }
    }

    fn check_failed(&self) -> Result<()> {
        match self.failed.lock().expect("failed lock").as_ref() {
            Some(reason) => Err(self.failed_error(reason)),
            None => Ok(()),
        }
    }

    fn latch(&self, reason: String) {
        tracing::error!(disk = %self.name, %reason, "disk failed; refusing all further I/O");
        metrics::counter!("blockstore_disk_failures_total").increment(1);
        self.failed.lock().expect("failed lock").get_or_insert(reason);
    }

    fn open_component(&self, id: ComponentId, state: ComponentState) -> Result<Arc<Component>> {
        let data = self.fs.open(&data_path(&self.dir, id), true).map_err(io)?;
        let crc = self.fs.open(&crc_path(&self.dir, id), true).map_err(io)?;
        Ok(Arc::new(Component { data, crc, state: RwLock::new(state) }))
    }

    /// Applies a durable record to the component files and metadata.
    /// Idempotent: replaying a record already applied changes nothing.
    fn apply(&self, record: &Record) -> Result<()> {
        let id = record.component();
        match record {
            Record::Create { blocks, .. } => {
                if self.get(id).is_ok() {
                    return Ok(());
                }
                let component =
                    self.open_component(id, ComponentState { blocks: *blocks, dirty: true, ..Default::default() })?;
                component.data.set_len(*blocks * BLOCK_SIZE as u64).map_err(io)?;
                component.crc.set_len(*blocks * CRC_SIZE).map_err(io)?;
                self.components.write().expect("components lock").insert(id, component);
                return Ok(());
            }
            Record::Delete { .. } => {
                self.components.write().expect("components lock").remove(&id);
                for path in [data_path(&self.dir, id), crc_path(&self.dir, id)] {
                    match self.fs.remove_file(&path) {
                        Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(io(error)),
                        _ => {}
                    }
                }
                return Ok(());
            }
            _ => {}
        }
        let component = self.get(id)?;
        let mut state = component.state.write().expect("component lock");
        state.dirty = true;
        match record {
            Record::Create { .. } | Record::Delete { .. } => unreachable!("handled above"),
            Record::Resize { blocks, .. } => {
                if *blocks < state.blocks {
                    // Shrinking deallocates the tail.
                    let keep = *blocks * BLOCK_SIZE as u64;
                    component.data.punch_hole(keep, (state.blocks - *blocks) * BLOCK_SIZE as u64).map_err(io)?;
                    for bitmap in state.tracking.values_mut() {
                        bitmap.remove_range(*blocks as u32..);
                    }
                }
                component.data.set_len(*blocks * BLOCK_SIZE as u64).map_err(io)?;
                component.crc.set_len(*blocks * CRC_SIZE).map_err(io)?;
                state.blocks = *blocks;
            }
            Record::Write { lsn, first, data, .. } => {
                let count = (data.len() / BLOCK_SIZE) as u64;
                check_range(id, *first, count, state.blocks)?;
                write_blocks(&component, *first, data)?;
                state.written(*lsn, *first, count);
            }
            Record::Unmap { lsn, first, count, .. } => {
                check_range(id, *first, *count, state.blocks)?;
                deallocate(&component, *first, *count)?;
                state.written(*lsn, *first, *count);
            }
            Record::Track { stale, seed, .. } => state.track(*stale, seed.as_deref()),
            Record::Untrack { stale, .. } => {
                state.tracking.remove(stale);
                state.incomplete.remove(stale);
            }
            Record::BeginSync { stale, target, plan, .. } => {
                self.halted.lock().expect("halted lock").remove(&id);
                if state.sync.as_ref().map(|sync| sync.plan) != Some(*plan) {
                    let newest = state.committed_lsn.max(*target);
                    let landed_before = state.sync.as_ref().is_some_and(|sync| !sync.untouched());
                    let done = RoaringBitmap::new();
                    state.sync =
                        Some(Sync { plan: *plan, stale: *stale, target: *target, done, newest, landed_before });
                    // Until the resync ends, this component is current only
                    // up to its stale LSN.
                    state.committed_lsn = *stale;
                }
            }
            Record::SyncWrite { plan, first, data, .. } => {
                let count = (data.len() / BLOCK_SIZE) as u64;
                check_range(id, *first, count, state.blocks)?;
                let Some(sync) = state.sync.as_mut() else {
                    return Err(Error::Invalid(format!("component {id} is not resynchronizing")));
                };
                // Checked as it applies, in journal order: the sync under
                // way then is the one a replay finds too.
                if *plan != 0 && *plan != sync.plan {
                    return Err(Error::Invalid(format!(
                        "component {id}: resync plan {plan} was superseded by plan {}",
                        sync.plan
                    )));
                }
                // Block by block: a block a newer write reached keeps it.
                for index in 0..count {
                    let block = *first + index;
                    if sync.done.insert(block as u32) {
                        let start = index as usize * BLOCK_SIZE;
                        write_blocks(&component, block, &data[start..start + BLOCK_SIZE])?;
                    }
                }
                let newest = sync.newest;
                state.remember(newest, *first, count);
                // Blocks resync writes also count for the trackers of other
                // absent peers: they changed here after those went stale.
                let marks: Vec<Lsn> = state.tracking.keys().copied().collect();
                for stale in marks {
                    if let Some(bitmap) = state.tracking.get_mut(&stale) {
                        mark(bitmap, *first, count);
                    }
                }
            }
            Record::EndSync { plan, .. } => {
                let ends = state.sync.as_ref().is_some_and(|sync| *plan == 0 || sync.plan == *plan);
                // Plan 0: the copy of record as it stands, halted or not.
                if ends || *plan == 0 {
                    self.halted.lock().expect("halted lock").remove(&id);
                }
                if ends {
                    let sync = state.sync.take().expect("checked");
                    state.committed_lsn = state.committed_lsn.max(sync.newest);
                }
            }
            Record::Fence { epoch, .. } => state.epoch = state.epoch.max(*epoch),
            Record::Repair { first, data, .. } => {
                let count = (data.len() / BLOCK_SIZE) as u64;
                check_range(id, *first, count, state.blocks)?;
                write_blocks(&component, *first, data)?;
            }
            Record::ChunkWrite { lsn, first, stable, data, undo, .. } => {
                let count = (data.len() / BLOCK_SIZE) as u64;
                check_range(id, *first, count, state.blocks)?;
                state.undo.retain(|kept, _| kept > stable);
                state.undo.insert(*lsn, Undo::Blocks { first: *first, data: undo.clone() });
                write_blocks(&component, *first, data)?;
                state.written(*lsn, *first, count);
            }
            Record::ChunkUnmap { lsn, first, count, stable, .. } => {
                check_range(id, *first, *count, state.blocks)?;
                state.undo.retain(|kept, _| kept > stable);
                state.undo.insert(*lsn, Undo::Unmapped { first: *first, count: *count });
                deallocate(&component, *first, *count)?;
                state.written(*lsn, *first, *count);
            }
            Record::Undo { lsn, first, data, .. } => {
                state.undo.insert(*lsn, Undo::Blocks { first: *first, data: data.clone() });
            }
            Record::UndoUnmap { lsn, first, count, .. } => {
                state.undo.insert(*lsn, Undo::Unmapped { first: *first, count: *count });
            }
            Record::RollBack { to, .. } => {
                // A write refused for want of room above `to` is given up
                // with every other write there: nothing waits on it.
                let mut halted = self.halted.lock().expect("halted lock");
                if halted.get(&id).is_some_and(|first| first > to) {
                    halted.remove(&id);
                }
                drop(halted);
                // Newest first: each before-image is what the blocks held
                // under the write before it.
                let above: Vec<Lsn> = state.undo.range(to + 1..).map(|(lsn, _)| *lsn).rev().collect();
                for lsn in above {
                    if let Some(Undo::Blocks { first, data }) = state.undo.remove(&lsn) {
                        write_blocks(&component, first, &data)?;
                    }
                }
                // A resync under which nothing landed ends: the component
                // holds what it held before it began, rolled back.
                if state.sync.as_ref().is_some_and(Sync::untouched) {
                    state.sync = None;
                }
                if state.sync.is_none() {
                    state.committed_lsn = state.committed_lsn.min(*to);
                }
            }
        }
        Ok(())
    }

    /// Runs until closed: drains the queue, writes the batch to the journal,
    /// syncs once, applies, answers.
    fn run_writer(self: Arc<Self>, generation: u64, end: Option<u64>) {
        let Some(mut journal) = self.open_journal(generation, end) else { return };
        loop {
            let (batch, closing) = {
                let mut queue = self.queue.lock().expect("queue lock");
                while queue.ops.is_empty() && !queue.closing {
                    queue = self.wake.wait(queue).expect("queue lock");
                }
                let batch = self.take_batch(&mut queue);
                (batch, queue.closing && queue.ops.is_empty())
            };
            self.room.notify_all();
            self.commit(&mut journal, batch, closing);
            if closing {
                self.fail_queued();
                return;
            }
        }
    }

    /// The inline writer's turn (see [`DiskConfig::inline_writer`]): commits
    /// everything queued, batch by batch, on the caller.
    fn run_inline(&self) {
        let mut slot = self.inline.lock().expect("inline writer lock");
        let Some(journal) = slot.as_mut() else {
            self.fail_queued();
            return;
        };
        loop {
            let (batch, closing) = {
                let mut queue = self.queue.lock().expect("queue lock");
                let batch = self.take_batch(&mut queue);
                (batch, queue.closing)
            };
            if batch.is_empty() && !closing {
                return;
            }
            self.commit(journal, batch, closing);
            if closing {
                self.fail_queued();
                *slot = None;
                return;
            }
        }
    }

    /// Opens journal `generation` to append at `end` (zeros follow it to
    /// the file's end), or at its end.
    fn open_journal(&self, generation: u64, end: Option<u64>) -> Option<Journal> {
        match self.fs.open(&journal_path(&self.dir, generation), true) {
            Ok(file) => {
                let zeroed = file.len().unwrap_or(0);
                let len = end.unwrap_or(zeroed);
                let checkpoint_at = self.config.journal_max_bytes;
                Some(Journal { len, zeroed, file, generation, buffer: Vec::new(), checkpoint_at, early_after: 0 })
            }
            Err(error) => {
                self.latch(format!("cannot open the journal: {error}"));
                self.fail_queued();
                None
            }
        }
    }

    /// Up to `batch_max_bytes` of queued records.
    fn take_batch(&self, queue: &mut Queue) -> Vec<Op> {
        let mut batch = Vec::new();
        let mut bytes = 0;
        while let Some(op) = queue.ops.pop_front() {
            bytes += record_size(&op.record);
            batch.push(op);
            if bytes >= self.config.batch_max_bytes {
                break;
            }
        }
        batch
    }

    /// One group commit: writes the batch to the journal, syncs once,
    /// applies, answers; then checkpoints if the journal is long enough
    /// or the disk is closing.
    fn commit(&self, journal: &mut Journal, batch: Vec<Op>, closing: bool) {
        if !batch.is_empty() {
            if let Err(error) = self.check_failed() {
                for op in batch {
                    let _ = op.done.send(Err(error.clone()));
                }
            } else {
                let batch = self.admit(journal, batch);
                match self.check_failed() {
                    // Its checkpoint failed.
                    Err(error) => {
                        for op in batch {
                            let _ = op.done.send(Err(error.clone()));
                        }
                    }
                    Ok(()) if !batch.is_empty() => self.append(journal, batch),
                    Ok(()) => {}
                }
            }
        }
        let stopping_hard = closing && self.check_failed().is_err();
        if (journal.len >= journal.checkpoint_at || closing) && !stopping_hard {
            match self.rotate(journal) {
                Ok(()) => {}
                // The journal still holds everything: go on with it, and
                // try again once it has grown another step.
                Err(error @ Error::NoSpace { .. }) => {
                    tracing::warn!(disk = %self.name, %error, "checkpoint postponed");
                    journal.checkpoint_at = journal.len + JOURNAL_ZERO_STEP;
                }
                Err(error) => self.latch(format!("checkpoint failed: {error}")),
            }
        }
    }

    /// Writes the batch to the journal, syncs once, applies, answers.
    fn append(&self, journal: &mut Journal, batch: Vec<Op>) {
        let answer = |batch: Vec<Op>, error: Error| {
            for op in batch {
                let _ = op.done.send(Err(error.clone()));
            }
        };
        journal.buffer.clear();
        for op in &batch {
            op.record.encode(&mut journal.buffer);
        }
        let mut zeroed = self.zero_ahead(journal, journal.len + journal.buffer.len() as u64);
        if zeroed.as_ref().is_err_and(is_full) && journal.len > 0 {
            // A checkpoint starts a fresh journal and frees this one.
            tracing::warn!(disk = %self.name, "no room to grow the journal: checkpointing early");
            match self.rotate(journal) {
                Ok(()) => zeroed = self.zero_ahead(journal, journal.len + journal.buffer.len() as u64),
                Err(error @ Error::NoSpace { .. }) => {
                    tracing::warn!(disk = %self.name, %error, "the early checkpoint found no room either")
                }
                Err(error) => {
                    self.latch(format!("checkpoint failed: {error}"));
                    return answer(batch, self.failed_error("checkpoint failed"));
                }
            }
        }
        if let Err(error) = &zeroed {
            // A fence must reach the journal before anything of its epoch:
            // one that cannot is a failure (the queue already counts it).
            let fences = batch.iter().any(|op| matches!(op.record, Record::Fence { .. }));
            if is_full(error) && !fences {
                // Nothing of the batch was written: refused, not failed.
                for op in &batch {
                    if let Some((component, lsn)) = lsn_of(&op.record) {
                        self.halted.lock().expect("halted lock").entry(component).or_insert(lsn);
                    }
                }
                return answer(batch, self.no_space(format!("no room to grow the journal: {error}")));
            }
        }
        let written = zeroed
            .and_then(|()| journal.file.write_at(&journal.buffer, journal.len))
            .and_then(|()| journal.file.sync_data());
        if let Err(error) = written {
            self.latch(format!("journal write or fdatasync failed: {error}"));
            return answer(batch, self.failed_error("journal write or fdatasync failed"));
        }
        journal.len += journal.buffer.len() as u64;
        metrics::counter!("blockstore_group_commits_total").increment(1);
        metrics::counter!("blockstore_records_total").increment(batch.len() as u64);
        for op in batch {
            let result = self.apply(&op.record);
            if let Err(Error::Io(reason)) = &result {
                self.latch(format!("applying a journaled change: {reason}"));
            }
            let _ = op.done.send(result);
        }
    }

    /// Checkpoints and moves on to the next journal. A checkpoint that
    /// fails for want of space changes nothing on disk that counts: the
    /// metadata still names this journal, which holds everything.
    fn rotate(&self, journal: &mut Journal) -> Result<()> {
        self.checkpoint(journal.generation)?;
        let _ = self.fs.remove_file(&journal_path(&self.dir, journal.generation));
        journal.generation += 1;
        match self.fs.open(&journal_path(&self.dir, journal.generation), true) {
            Ok(next) => {
                // It begins with the before-images the checkpoint carried over.
                let len = next.len().unwrap_or(0);
                journal.file = next;
                journal.len = len;
                journal.zeroed = len;
                // Before-images kept longer than a journal's worth (a
                // component slow to acknowledge holds the stable mark
                // back) would otherwise be copied into a new journal on
                // every group commit: the next checkpoint waits until as
                // much again is written, so each byte written copies at
                // most one kept byte.
                journal.checkpoint_at = self.config.journal_max_bytes.max(2 * len);
                journal.early_after = 0;
            }
            Err(error) => {
                self.latch(format!("cannot open the next journal: {error}"));
                return Err(self.failed_error("cannot open the next journal"));
            }
        }
        Ok(())
    }

    fn no_space(&self, reason: String) -> Error {
        metrics::counter!("blockstore_no_space_refusals_total").increment(1);
        Error::NoSpace { disk: self.name.clone(), reason }
    }

    /// Admits the batch's writes that may need new blocks (see "Space" in
    /// the crate's documentation), and refuses the writes and unmaps of
    /// halted components (see `Inner::halted`); each refused one is
    /// answered [`Error::NoSpace`] here and left out of the batch.
    fn admit(&self, journal: &mut Journal, batch: Vec<Op>) -> Vec<Op> {
        let wanted: u64 = batch.iter().filter_map(|op| filling(&op.record)).map(|(_, _, count)| count).sum();
        let mut available = self.room_left(journal, wanted * (BLOCK_SIZE as u64 + CRC_SIZE));
        let mut halted = self.halted.lock().expect("halted lock");
        if halted.is_empty() && available.is_none() {
            return batch;
        }
        let mut admitted = Vec::with_capacity(batch.len());
        for op in batch {
            let lsn = lsn_of(&op.record);
            let admission = match (lsn.and_then(|(id, _)| halted.get(&id).copied()), filling(&op.record)) {
                (Some(first), _) => Err(self.halted_error(first)),
                (None, Some((id, first, count))) => match available.as_mut() {
                    Some(available) => self.allocate(id, first, count, available),
                    None => Ok(()),
                },
                (None, None) => Ok(()),
            };
            match admission {
                Ok(()) => admitted.push(op),
                Err(error) => {
                    if let (Error::NoSpace { .. }, Some((id, lsn))) = (&error, lsn) {
                        halted.entry(id).or_insert(lsn);
                    }
                    let _ = op.done.send(Err(error));
                }
            }
        }
        admitted
    }

    /// The free bytes, when a batch wanting `wanted` of them may not fit
    /// beside the reserve (after a checkpoint gives back the journal's
    /// room, if it can); None when it fits, or the file system cannot say
    /// (it allocates on write, as it always did).
    fn room_left(&self, journal: &mut Journal, wanted: u64) -> Option<u64> {
        if wanted == 0 {
            return None;
        }
        let available = self.fs.available(&self.dir).ok()?;
        // Room for the batch twice over and a step of journal growth: no
        // write of it can find the file system full when it is applied.
        let reserve = self.config.reserve_bytes;
        let roomy = |available: u64| {
            available >= reserve.saturating_add(wanted.saturating_mul(2)).saturating_add(self.zero_step())
        };
        if roomy(available) {
            return None;
        }
        // The journal holds a copy of what was written since the last
        // checkpoint: a checkpoint gives that room back.
        if journal.zeroed < 2 * self.zero_step() || journal.len < journal.early_after {
            return Some(available);
        }
        tracing::info!(disk = %self.name, available, journal = journal.zeroed, "disk nearly full: checkpointing");
        match self.rotate(journal) {
            Ok(()) => {
                let available = self.fs.available(&self.dir).unwrap_or(available);
                (!roomy(available)).then_some(available)
            }
            Err(error @ Error::NoSpace { .. }) => {
                // Not again before the journal has grown a step.
                tracing::warn!(disk = %self.name, %error, "checkpoint postponed");
                journal.early_after = journal.len + self.zero_step();
                Some(available)
            }
            Err(error) => {
                self.latch(format!("checkpoint failed: {error}"));
                Some(available)
            }
        }
    }

    fn halted_error(&self, first: Lsn) -> Error {
        self.no_space(format!(
            "the write under LSN {first} found no room; nothing after it is taken until it is settled"
        ))
    }

    /// Allocates what blocks `first..first + count` of component `id`
    /// need, keeping the reserve.
    fn allocate(&self, id: ComponentId, first: u64, count: u64, available: &mut u64) -> Result<()> {
        // A component created in the same batch: its files do not exist yet.
        let Ok(component) = self.get(id) else { return Ok(()) };
        let mut crcs = vec![0u8; (count * CRC_SIZE) as usize];
        read_fully(component.crc.as_ref(), &mut crcs, first * CRC_SIZE)?;
        let holes = crcs.chunks(CRC_SIZE as usize).filter(|slot| !slot_allocated(slot)).count() as u64;
        if holes == 0 {
            return Ok(());
        }
        // The blocks, and a page of checksums each side at most.
        let needed = holes * BLOCK_SIZE as u64 + 2 * BLOCK_SIZE as u64;
        let reserve = self.config.reserve_bytes;
        if available.saturating_sub(needed) < reserve {
            return Err(self.no_space(format!(
                "{needed} bytes wanted, {available} free, {reserve} kept for the journal and checkpoints"
            )));
        }
        let allocated = component
            .data
            .allocate(first * BLOCK_SIZE as u64, count * BLOCK_SIZE as u64)
            .and_then(|()| component.crc.allocate(first * CRC_SIZE, count * CRC_SIZE));
        match allocated {
            Ok(()) => {
                *available -= needed;
                Ok(())
            }
            Err(error) if is_full(&error) => Err(self.no_space(format!("allocating {needed} bytes: {error}"))),
            Err(error) => Err(io(error)),
        }
    }

    /// Zeroes the journal ahead of `end` in large steps, synced once per
    /// step, so that most group commits overwrite zeros within the file's
    /// size instead of growing it. Replay stops at the first zero length,
    /// so the zeros read as the journal's end.
    fn zero_ahead(&self, journal: &mut Journal, end: u64) -> std::io::Result<()> {
        if end <= journal.zeroed {
            return Ok(());
        }
        let step = self.zero_step();
        let target = end.div_ceil(step) * step;
        write_zeros(journal.file.as_ref(), journal.zeroed, target)?;
        journal.file.sync_data()?;
        metrics::counter!("blockstore_journal_zeroed_bytes_total").increment(target - journal.zeroed);
        journal.zeroed = target;
        Ok(())
    }

    /// How far ahead the journal is zeroed at a time.
    fn zero_step(&self) -> u64 {
        JOURNAL_ZERO_STEP.min(self.config.journal_max_bytes.max(1 << 20))
    }

    fn fail_queued(&self) {
        let mut queue = self.queue.lock().expect("queue lock");
        for op in queue.ops.drain(..) {
            let _ = op.done.send(Err(self.failed_error("closing")));
        }
    }

    /// Makes the component files durable and records the state as the
    /// checkpoint followed by journal `generation + 1` (created empty first).
    fn checkpoint(&self, generation: u64) -> Result<()> {
        let components: Vec<(ComponentId, Arc<Component>)> =
            self.components.read().expect("components lock").iter().map(|(id, c)| (*id, c.clone())).collect();
        let mut metas = Vec::with_capacity(components.len());
        let mut landed: Vec<ComponentId> = Vec::new();
        // Before-images not yet stable live on in the next journal.
        let mut kept = Vec::new();
        for (id, component) in components {
            let mut state = component.state.write().expect("component lock");
            for (lsn, undo) in &state.undo {
                let record = match undo {
                    Undo::Blocks { first, data } => {
                        Record::Undo { component: id, lsn: *lsn, first: *first, data: data.clone() }
                    }
                    Undo::Unmapped { first, count } => {
                        Record::UndoUnmap { component: id, lsn: *lsn, first: *first, count: *count }
                    }
                };
                record.encode(&mut kept);
            }
            if state.dirty {
                component.data.sync_data().map_err(io)?;
                component.crc.sync_data().map_err(io)?;
                state.dirty = false;
            }
            if state.sync.as_ref().is_some_and(|sync| sync.landed_before) {
                landed.push(id);
            }
            metas.push(ComponentMeta {
                id,
                blocks: state.blocks,
                committed_lsn: state.committed_lsn,
                epoch: state.epoch,
                tracking: state.tracking.iter().map(|(lsn, bitmap)| (*lsn, bitmap_bytes(bitmap))).collect(),
                incomplete: state.incomplete.iter().copied().collect(),
                recent: state.recent.iter().map(|(window, bitmap)| (*window, bitmap_bytes(bitmap))).collect(),
                sync: state
                    .sync
                    .as_ref()
                    .map(|sync| (sync.plan, sync.stale, sync.target, sync.newest, bitmap_bytes(&sync.done))),
            });
        }
        // Lacking room from here on changes nothing that counts: the old
        // metadata and journal stay in force until the rename.
        let full = |error: std::io::Error| match is_full(&error) {
            true => self.no_space(format!("checkpoint: {error}")),
            false => io(error),
        };
        let next = journal_path(&self.dir, generation + 1);
        let journal = self.fs.open(&next, true).map_err(full)?;
        journal.set_len(0).map_err(full)?;
        if !kept.is_empty() {
            journal.write_at(&kept, 0).map_err(full)?;
        }
        journal.sync_data().map_err(full)?;
        self.fs.sync_dir(&self.dir).map_err(io)?;
        let meta = Meta { generation: generation + 1, components: metas };
        let mut bytes = postcard::to_stdvec(&meta).map_err(|error| Error::Io(error.to_string()))?;
        // After `Meta`, where a build from before it stops reading.
        bytes.extend(postcard::to_stdvec(&landed).map_err(|error| Error::Io(error.to_string()))?);
        // Written and synced aside first (lacking room there changes
        // nothing); the rename and the directory sync are past that point.
        let meta = self.dir.join("meta");
        let temporary = self.fs.write_aside(&meta, &bytes).map_err(full)?;
        self.fs.put_in_place(&temporary, &meta).map_err(io)?;
        metrics::counter!("blockstore_checkpoints_total").increment(1);
        Ok(())
    }

    /// Removes journals of other generations and files of components the
    /// store does not hold.
    fn remove_strays(&self, generation: u64) -> Result<()> {
        let keep_journal = format!("journal-{generation}");
        let components = self.components.read().expect("components lock");
        for name in self.fs.list(&self.dir).map_err(io)? {
            let stray = if name.starts_with("journal-") {
                name != keep_journal
            } else if let Some(rest) = name.strip_prefix("c-") {
                let id = rest.split('.').next().and_then(|id| id.parse::<u64>().ok());
                id.is_some_and(|id| !components.contains_key(&id))
            } else {
                false
            };
            if stray {
                tracing::info!(disk = %self.name, file = %name, "removing a stray file");
                self.fs.remove_file(&self.dir.join(&name)).map_err(io)?;
            }
        }
        Ok(())
    }
}

/// Writes zeros over `[from, to)`, a MiB at a time.
fn write_zeros(file: &dyn File, from: u64, to: u64) -> std::io::Result<()> {
    let zeros = vec![0u8; to.saturating_sub(from).min(1 << 20) as usize];
    let mut at = from;
    while at < to {
        let length = (to - at).min(zeros.len() as u64) as usize;
        file.write_at(&zeros[..length], at)?;
        at += length as u64;
    }
    Ok(())
}

/// The component and LSN of an owner's write or unmap.
fn lsn_of(record: &Record) -> Option<(ComponentId, Lsn)> {
    match record {
        Record::Write { component, lsn, .. }
        | Record::Unmap { component, lsn, .. }
        | Record::ChunkWrite { component, lsn, .. }
        | Record::ChunkUnmap { component, lsn, .. } => Some((*component, *lsn)),
        _ => None,
    }
}

/// The blocks a record writes that may fill holes: (component, first, count).
fn filling(record: &Record) -> Option<(ComponentId, u64, u64)> {
    match record {
        Record::Write { component, first, data, .. }
        | Record::SyncWrite { component, first, data, .. }
        | Record::Repair { component, first, data }
        | Record::ChunkWrite { component, first, data, .. } => {
            Some((*component, *first, (data.len() / BLOCK_SIZE) as u64))
        }
        _ => None,
    }
}

fn record_size(record: &Record) -> usize {
    match record {
        Record::Write { data, .. }
        | Record::SyncWrite { data, .. }
        | Record::Repair { data, .. }
        | Record::Undo { data, .. } => data.len() + 64,
        Record::ChunkWrite { data, undo, .. } => data.len() + undo.len() + 64,
        _ => 64,
    }
}

/// Whether a block's checksum slot says it is allocated: 0 only for a
/// block never written or deallocated.
fn slot_allocated(slot: &[u8]) -> bool {
    slot != [0; 4]
}

/// Punches the blocks out (they read as zeros, with zero checksums).
fn deallocate(component: &Component, first: u64, count: u64) -> Result<()> {
    component.data.punch_hole(first * BLOCK_SIZE as u64, count * BLOCK_SIZE as u64).map_err(io)?;
    let zeros = vec![0u8; (WRITE_BLOCKS_MAX * CRC_SIZE) as usize];
    for start in (first..first + count).step_by(WRITE_BLOCKS_MAX as usize) {
        let blocks = WRITE_BLOCKS_MAX.min(first + count - start);
        component.crc.write_at(&zeros[..(blocks * CRC_SIZE) as usize], start * CRC_SIZE).map_err(io)?;
    }
    Ok(())
}

/// Writes whole blocks and their checksums.
fn write_blocks(component: &Component, first: u64, data: &[u8]) -> Result<()> {
    let mut crcs = Vec::with_capacity(data.len() / BLOCK_SIZE * CRC_SIZE as usize);
    for block in data.chunks(BLOCK_SIZE) {
        crcs.extend_from_slice(&block_crc(block).to_le_bytes());
    }
    component.data.write_at(data, first * BLOCK_SIZE as u64).map_err(io)?;
    component.crc.write_at(&crcs, first * CRC_SIZE).map_err(io)?;
    Ok(())
}
