//! Objects on a node: the component disks and threads, the owner threads,
//! and the objects this host owns.
//!
//! - Every host with the storage role opens its disks and serves them on
//!   its component threads; their addresses go into its host record.
//! - The host named owner in an object's record opens it: it bumps the
//!   owner epoch by compare-and-set and recovers the object's state from
//!   its components (`Object::recover`), on owner thread `id % T`.
//! - When the catalog marks an owner's host down, the lowest-numbered live
//!   host holding one of the object's components takes ownership the same
//!   way; the old owner, if it comes back, finds the record names another
//!   host (and its components refuse its epoch).
//! - The owner fails components whose host the catalog marks down, probes
//!   absent components whose host is up again (they then resync), and
//!   records component states in the catalog.
//! - The block client API reaches an object through any host (wire method
//!   [`method::OBJECT_IO`]); a host that does not own it names the owner.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blockstore::{Disk, DiskConfig, BLOCK_SIZE};
use bytes::Bytes;
use catalog::{ComponentRecord, ComponentState, HostRecord, HostState, ObjectKey, ObjectRecord, Policy};
use objects::block_cache::BlockCache;
use objects::component::{frame, unframe, Client, Request as ComponentRequest, Service};
use objects::crypt::DataKey;
use objects::object::{Hooks, Object, ObjectError, PersistError, Persister, Rekeyer};
use objects::owner::Status;
use objects::threads::{component_address, ComponentThreads, OwnerThreads};
use serde::{Deserialize, Serialize};
use wire::tcp::TcpTransport;
use wire::{CallError, ErrorCode, RemoteError, Transport};

use crate::daemon::Node;

/// Wire methods (the node owns 0x0200..0x0300).
pub mod method {
    /// The block client API.
    pub const OBJECT_IO: u32 = 0x0204;
    /// Live figures of the objects a host owns.
    pub const OBJECT_STATS: u32 = 0x0205;
    /// Asks an object's owner to hand it over to the caller ([`HandOver`]).
    pub const OBJECT_HAND_OVER: u32 = 0x0207;
}

const IO_TIMEOUT: Duration = Duration::from_secs(30);
const STATS_TIMEOUT: Duration = Duration::from_millis(800);
/// How often an owner looks for absent components that are back, and a
/// host for objects to open or take over.
const MANAGE_INTERVAL: Duration = Duration::from_millis(500);
/// Between two attempts to open an object that could not be opened.
const OPEN_RETRY: Duration = Duration::from_secs(1);
/// A host that forwarded at least `FOLLOW_IOS` I/Os of an object to its
/// owner on another host within `FOLLOW_WINDOW` takes the object over: the
/// I/O comes from here, so the owner should be here too (writes then
/// save a hop, reads of a copy on this host go to no other process). A
/// host takes over an object at most once per `FOLLOW_COOLDOWN`, so two
/// hosts serving the same object (multipath) do not hand it to and fro.
const FOLLOW_IOS: u64 = 256;
const FOLLOW_WINDOW: Duration = Duration::from_secs(2);
const FOLLOW_COOLDOWN: Duration = Duration::from_secs(300);
/// How long an owner asked to hand an object over waits for the writes
/// under way to be answered (new ones held back meanwhile) before it
/// refuses; and how long, once it has closed the object, it leaves the
/// object to the host it handed it to before opening it again itself (that
/// host takes it within moments, unless it failed, or lost the answer, or
/// could not record itself owner for half as long).
const HAND_OVER_DRAIN: Duration = Duration::from_secs(2);
const HAND_OVER_HOLD: Duration = Duration::from_secs(10);
/// How long a request waits for an object this host is opening: longer
/// than an open that waits out [`STARTING_HOST_GRACE`] and then asks the
/// components.
const OPEN_WAIT: Duration = Duration::from_secs(15);
/// How long a new owner waits for a component whose host the catalog
/// records up but which does not take connections yet. A host starting
/// with the rest of the cluster has not registered its new component
/// addresses yet: opening without it would record that copy absent and
/// resync it a second later.
const STARTING_HOST_GRACE: Duration = Duration::from_secs(10);
/// Object names: letters, digits, `-`, `_`, `.`; at most this long.
const NAME_MAX: usize = 64;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum IoRequest {
    Read {
        name: String,
        offset: u64,
        length: u64,
    },
    /// Data follows the header.
    Write {
        name: String,
        offset: u64,
    },
    Unmap {
        name: String,
        offset: u64,
        length: u64,
    },
    Flush {
        name: String,
    },
    /// Whether `offset` is allocated and for how many bytes (up to
    /// `length`); the answer is [`Provisioned`]'s encoding.
    Provisioning {
        name: String,
        offset: u64,
        length: u64,
    },
    /// The data: `expected` bytes to compare, then the bytes to write at
    /// `offset` if they match, as one step at the owner (any bytes within
    /// the object). The answer: empty when written, else the offset of the
    /// first differing byte (8 bytes, big-endian).
    CompareAndWrite {
        name: String,
        offset: u64,
        expected: u64,
    },
    /// Replaces the key of an object encrypted at rest, recorded in the
    /// catalog first: everything written to it reads as noise from then on
    /// (SANITIZE's CRYPTO ERASE). Refused for an object without a key.
    EraseKey {
        name: String,
    },
}

/// Which opening of which object a request is meant for: the object's id
/// and its owner's epoch, as the sender learned them (the catalog, or a
/// redirect). Sent with every request over the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ownership {
    pub object: u64,
    pub epoch: u64,
}

/// A request to hand object `name` over (`method::OBJECT_HAND_OVER`): its
/// owner at `ownership` closes it once every change under way is answered
/// (`Object::close_when_idle`), so the caller, taking it over, deposes no
/// owner mid-write. `to`: the asking host, to which the owner sends
/// requests for the object meanwhile. Answered with a [`HandedOver`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HandOver {
    pub name: String,
    pub ownership: Ownership,
    pub to: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HandedOver {
    /// Closed here: the caller may take the object over at that ownership.
    /// Answered again to the same question while the hold lasts.
    Closed,
    /// Not owned here at that ownership.
    NotOwner,
    /// Changes under way were not all answered within `HAND_OVER_DRAIN`:
    /// the object stays open here.
    Busy,
}

/// A request over the network (`method::OBJECT_IO`), data following.
///
/// A host carries it out only when it owns the object at exactly
/// `ownership`. A request can reach a host long after it was sent: one
/// queued on a connection to an owner cut off from the network arrives when
/// the cut heals, after its sender gave up on it and sent it (and later
/// writes) on to the new owner. Should that host own the object again by
/// then, at a later epoch, the request is refused, not carried out over
/// newer data. A request without an ownership is never carried out: it
/// asks which host owns the object, at what epoch (the answer is a
/// [`IoReply::NotOwner`], naming the host itself if it is the owner).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IoHeader {
    pub ownership: Option<Ownership>,
    pub io: IoRequest,
}

impl IoRequest {
    pub(crate) fn name(&self) -> &str {
        match self {
            IoRequest::Read { name, .. }
            | IoRequest::Write { name, .. }
            | IoRequest::Unmap { name, .. }
            | IoRequest::Flush { name }
            | IoRequest::Provisioning { name, .. }
            | IoRequest::CompareAndWrite { name, .. }
            | IoRequest::EraseKey { name } => name,
        }
    }

    /// Whether it changes the object's data.
    pub(crate) fn changes(&self) -> bool {
        matches!(
            self,
            IoRequest::Write { .. }
                | IoRequest::Unmap { .. }
                | IoRequest::CompareAndWrite { .. }
                | IoRequest::EraseKey { .. }
        )
    }

    /// A compare and write with something to compare: not the same if
    /// done twice.
    pub(crate) fn compares(&self) -> bool {
        matches!(self, IoRequest::CompareAndWrite { expected, .. } if *expected > 0)
    }
}

/// An answer to [`IoRequest::Provisioning`]: allocated or not, for how
/// many bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Provisioned {
    pub mapped: bool,
    pub bytes: u64,
}

impl Provisioned {
    pub fn encode(self) -> Bytes {
        let mut out = Vec::with_capacity(9);
        out.push(u8::from(self.mapped));
        out.extend_from_slice(&self.bytes.to_be_bytes());
        out.into()
    }

    pub fn decode(data: &[u8]) -> Option<Provisioned> {
        let (&mapped, bytes) = data.split_first()?;
        Some(Provisioned { mapped: mapped != 0, bytes: u64::from_be_bytes(bytes.try_into().ok()?) })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum IoReply {
    Done,
    /// Data follows the header.
    Data,
    /// Not carried out: this host does not own the object at the ownership
    /// asked for. This host's catalog names `owner`, at `address`, to be
    /// asked at `ownership`: this host itself when it owns the object at
    /// the catalog's ownership and was asked at none, an earlier epoch or
    /// another object's; none when the catalog names this host but it does
    /// not serve the object at that (yet), or the object's components
    /// refused it as deposed.
    NotOwner {
        owner: Option<u64>,
        address: Option<String>,
        ownership: Option<Ownership>,
    },
    Error(String),
    /// No room for the write on the object's disks; nothing was written.
    NoSpace(String),
    /// No copy of the object is available now (every one is away); one
    /// may come back.
    Unavailable(String),
    /// This host knows no object of that name (none exists, or its catalog
    /// is not open or not caught up yet, as after a restart).
    Unknown,
}

/// Live figures of an owned object.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ObjectStats {
    pub name: String,
    pub epoch: u64,
    pub owner_thread: usize,
    pub statuses: Vec<String>,
    pub resync_blocks_to_go: u64,
    pub resync_blocks_copied: u64,
    /// Blocks copied by the resyncs under way, and since when (ms).
    pub resync_blocks_copied_current: u64,
    pub resync_started_ms: u64,
    pub full_copies: u64,
    pub resyncs_done: u64,
    #[serde(default)]
    pub blocks_repaired: u64,
}

struct Owned {
    /// The object's id (the catalog's).
    id: u64,
    epoch: u64,
    thread: usize,
    /// The components' hosts, by index.
    hosts: Vec<u64>,
    object: Arc<Object<TcpTransport>>,
    /// When each absent component was last probed.
    probed: Vec<Option<Instant>>,
}

pub struct Storage {
    pub service: Option<Arc<Service>>,
    pub component_threads: Option<ComponentThreads>,
    pub owner_threads: OwnerThreads,
    /// Blocks read recently from the objects this host owns (none if
    /// `block_cache_mib` is 0).
    pub block_cache: Option<Arc<BlockCache>>,
    /// The rate resyncs of owned objects copy at (`resync_mib_per_second`).
    resync_pace: Option<Arc<objects::pace::Pace>>,
    owned: Mutex<HashMap<String, Owned>>,
    /// Objects being opened, and when an attempt last failed.
    opening: Mutex<HashSet<String>>,
    failed_opens: Mutex<HashMap<String, Instant>>,
    /// Woken when an object leaves `opening` (opened, or not): requests
    /// that wait for an open (`owned_or_opening`) wait on it.
    open_ended: tokio::sync::Notify,
    /// Per object this host does not own: I/Os forwarded to its owner in
    /// the current window.
    forwarded: Mutex<Forwarded>,
    /// When this host last took over each object from a live owner.
    followed: Mutex<HashMap<String, Instant>>,
    /// Objects this host handed over, by object id: not opened again here
    /// while the catalog still names this host at that epoch, for
    /// `HAND_OVER_HOLD`, and their requests sent to the host taking them.
    handed_over: Mutex<HashMap<u64, HandedTo>>,
}

pub(crate) fn cores() -> usize {
    std::thread::available_parallelism().map(|cores| cores.get()).unwrap_or(2)
}

impl Storage {
    /// Opens the disks (storage hosts) and starts the threads.
    pub fn start(config: &crate::NodeConfig, ip: &str, storage_role: bool) -> Result<Storage, String> {
        let owner_threads = OwnerThreads::start(config.owner_threads.unwrap_or_else(cores), ip.parse().ok())
            .map_err(|error| format!("starting owner threads: {error}"))?;
        let (service, component_threads) = if storage_role {
            let mut disks = Vec::new();
            for path in config.disk_paths() {
                std::fs::create_dir_all(&path).map_err(|error| format!("creating {}: {error}", path.display()))?;
                let disk_config = DiskConfig { reserve_bytes: config.disk_reserve_mib << 20, ..DiskConfig::default() };
                let disk = Disk::open(fsio::real(), &path, disk_config)
                    .map_err(|error| format!("opening disk {}: {error}", path.display()))?;
                tracing::info!(path = %path.display(), components = disk.components().len(), "disk open");
                disks.push(disk);
            }
            let service = Service::new(disks);
            let count = config.component_threads.unwrap_or_else(cores);
            let threads = ComponentThreads::start(service.clone(), ip, count, owner_threads.local_handlers())
                .map_err(|error| format!("starting component threads on {ip}: {error}"))?;
            tracing::info!(addresses = ?threads.addresses(), "component threads listening");
            (Some(service), Some(threads))
        } else {
            (None, None)
        };
        let block_cache = (config.block_cache_mib > 0).then(|| BlockCache::new(config.block_cache_mib << 20));
        Ok(Storage {
            service,
            component_threads,
            owner_threads,
            block_cache,
            resync_pace: objects::pace::Pace::new(config.resync_mib_per_second.saturating_mul(1 << 20)).map(Arc::new),
            owned: Mutex::new(HashMap::new()),
            opening: Mutex::new(HashSet::new()),
            open_ended: tokio::sync::Notify::new(),
            failed_opens: Mutex::new(HashMap::new()),
            forwarded: Mutex::new(Forwarded::default()),
            followed: Mutex::new(HashMap::new()),
            handed_over: Mutex::new(HashMap::new()),
        })
    }

    pub fn component_addresses(&self) -> Vec<String> {
        self.component_threads.as_ref().map(|threads| threads.addresses().to_vec()).unwrap_or_default()
    }

    fn owned(&self, name: &str) -> Option<Serving> {
        self.owned.lock().expect("owned lock").get(name).map(|owned| Serving {
            object: owned.object.clone(),
            thread: owned.thread,
            ownership: Ownership { object: owned.id, epoch: owned.epoch },
        })
    }

    /// Whether this host handed the object over at the epoch `record`
    /// names it owner at, lately: it leaves the object to the host it
    /// handed it to (`hand_over`).
    fn holds_back(&self, record: &ObjectRecord) -> bool {
        self.handed_over.lock().expect("handed-over lock").retain(|_, handed| handed.when.elapsed() < HAND_OVER_HOLD);
        self.handed_to(Ownership { object: record.id, epoch: record.owner_epoch }).is_some()
    }

    /// The host this host handed the object over to at `ownership`, if it
    /// did, less than `HAND_OVER_HOLD` ago.
    fn handed_to(&self, ownership: Ownership) -> Option<u64> {
        let handed_over = self.handed_over.lock().expect("handed-over lock");
        handed_over.get(&ownership.object).filter(|handed| handed.holds(ownership)).map(|handed| handed.to)
    }

    /// Counts one I/O of `name` that this host sent on to the object's
    /// owner elsewhere (`compares`: a COMPARE AND WRITE).
    pub(crate) fn note_forwarded(&self, name: &str, compares: bool) {
        self.forwarded.lock().expect("forwarded lock").note(name, compares, Instant::now());
    }

    /// Objects whose I/O this host forwarded often enough, lately, to take
    /// them over; their counts start again.
    fn to_follow(&self) -> Vec<String> {
        self.forwarded.lock().expect("forwarded lock").due(Instant::now())
    }

    /// Live figures of the objects this host owns.
    pub fn stats(&self) -> Vec<ObjectStats> {
        let owned = self.owned.lock().expect("owned lock");
        let mut stats: Vec<ObjectStats> = owned
            .iter()
            .map(|(name, owned)| {
                let resync = &owned.object.resync_stats;
                ObjectStats {
                    name: name.clone(),
                    epoch: owned.epoch,
                    owner_thread: owned.thread,
                    statuses: owned.object.statuses().iter().map(describe).collect(),
                    resync_blocks_to_go: resync.blocks_to_go.load(Ordering::Relaxed),
                    resync_blocks_copied: resync.blocks_copied.load(Ordering::Relaxed),
                    resync_blocks_copied_current: resync.blocks_copied_current.load(Ordering::Relaxed),
                    resync_started_ms: resync.current_started_ms.load(Ordering::Relaxed),
                    full_copies: resync.full_copies.load(Ordering::Relaxed),
                    resyncs_done: resync.resyncs_done.load(Ordering::Relaxed),
                    blocks_repaired: resync.blocks_repaired.load(Ordering::Relaxed),
                }
            })
            .collect();
        stats.sort_by(|a, b| a.name.cmp(&b.name));
        stats
    }

    /// Publishes per-thread and per-object gauges.
    pub fn record_metrics(&self) {
        for (index, stats) in self.owner_threads.stats().iter().enumerate() {
            let thread = index.to_string();
            metrics::gauge!("objects_owner_thread_depth", "thread" => thread.clone())
                .set(stats.depth.load(Ordering::Relaxed) as f64);
            metrics::gauge!("objects_owner_thread_jobs", "thread" => thread)
                .set(stats.total.load(Ordering::Relaxed) as f64);
        }
        if let Some(threads) = &self.component_threads {
            for (index, stats) in threads.stats().iter().enumerate() {
                let thread = index.to_string();
                metrics::gauge!("objects_component_thread_depth", "thread" => thread.clone())
                    .set(stats.depth.load(Ordering::Relaxed) as f64);
                metrics::gauge!("objects_component_thread_requests", "thread" => thread)
                    .set(stats.total.load(Ordering::Relaxed) as f64);
            }
        }
        if let Some(cache) = &self.block_cache {
            let stats = cache.stats();
            metrics::gauge!("objects_block_cache_hits").set(stats.hits as f64);
            metrics::gauge!("objects_block_cache_misses").set(stats.misses as f64);
            metrics::gauge!("objects_block_cache_fills").set(stats.fills as f64);
            metrics::gauge!("objects_block_cache_evictions").set(stats.evictions as f64);
            metrics::gauge!("objects_block_cache_bytes").set(stats.bytes as f64);
            metrics::gauge!("objects_block_cache_capacity_bytes").set(stats.capacity as f64);
        }
        for stats in self.stats() {
            let name = stats.name.clone();
            metrics::gauge!("objects_resync_blocks_to_go", "object" => name.clone())
                .set(stats.resync_blocks_to_go as f64);
            let absent = stats.statuses.iter().filter(|status| status.starts_with("absent")).count();
            metrics::gauge!("objects_absent_components", "object" => name).set(absent as f64);
        }
    }
}

fn describe(status: &Status) -> String {
    match status {
        Status::Active => "active".into(),
        Status::Absent { stale, .. } => format!("absent (stale at LSN {stale})"),
        Status::Resyncing { stale, target } => format!("resyncing ({stale} -> {target})"),
    }
}

fn to_state(status: &Status) -> ComponentState {
    match status {
        Status::Active => ComponentState::Active,
        Status::Absent { stale, since } => ComponentState::Absent { stale: *stale, since_ms: *since },
        Status::Resyncing { stale, target } => ComponentState::Resyncing { stale: *stale, target: *target },
    }
}

fn to_status(state: &ComponentState) -> Status {
    match state {
        ComponentState::Active => Status::Active,
        ComponentState::Absent { stale, since_ms } => Status::Absent { stale: *stale, since: *since_ms },
        ComponentState::Resyncing { stale, target } => Status::Resyncing { stale: *stale, target: *target },
    }
}

pub(crate) fn now_ms() -> u64 {
    crate::daemon::now_micros() / 1000
}

/// Checks an object name.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= NAME_MAX
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!("object name {name:?} must be 1-{NAME_MAX} letters, digits, '-', '_' or '.'"))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error("{0}")]
    Invalid(String),
    #[error("an object named {0:?} exists")]
    Exists(String),
    #[error("{0}")]
    Unavailable(String),
}

/// Where a host's first component thread listens, for requests outside any
/// owner thread (create, delete).
pub(crate) fn first_component_address(hosts: &BTreeMap<u64, HostRecord>, host: u64) -> Option<String> {
    hosts.get(&host).and_then(|record| component_address(&record.component_addresses, 0).map(String::from))
}

pub(crate) fn hosts_by_id(node: &Node) -> BTreeMap<u64, HostRecord> {
    node.services()
        .map(|services| {
            services.catalog.hosts.entries_local().into_iter().map(|(id, record, _)| (id, record)).collect()
        })
        .unwrap_or_default()
}

/// An erasure-coded policy's layout.
pub fn layout(policy: Policy) -> Option<objects::ec::Layout> {
    policy.erasure().map(|(data, parity)| objects::ec::Layout::new(data, parity))
}

/// Blocks each component of an object of `size_bytes` holds (a copy's,
/// or a chunk column's).
pub fn component_blocks(policy: Policy, size_bytes: u64) -> u64 {
    let blocks = size_bytes / BLOCK_SIZE as u64;
    layout(policy).map_or(blocks, |layout| layout.rows(blocks))
}

/// Creates an object: places its components on distinct hosts, creates
/// them, and records the object with the first component's host as owner.
/// `encrypted`: encrypted at rest, with a key of its own.
pub async fn create(
    node: &Arc<Node>,
    name: &str,
    policy: Policy,
    size_bytes: u64,
    encrypted: bool,
) -> Result<ObjectRecord, CreateError> {
    check_name(name).map_err(CreateError::Invalid)?;
    if size_bytes == 0 || !size_bytes.is_multiple_of(BLOCK_SIZE as u64) {
        return Err(CreateError::Invalid(format!(
            "size {size_bytes} is not a positive multiple of {BLOCK_SIZE} bytes"
        )));
    }
    match policy {
        Policy::Raid1 { copies } if !(2..=3).contains(&copies) => {
            return Err(CreateError::Invalid(format!("raid1 takes 2 or 3 copies, not {copies}")));
        }
        Policy::Raid5 { data } if !(2..=4).contains(&data) => {
            return Err(CreateError::Invalid(format!("raid5 takes 2, 3 or 4 data chunks, not {data}")));
        }
        Policy::Raid6 { data } if data != 4 => {
            return Err(CreateError::Invalid(format!("raid6 takes 4 data chunks, not {data}")));
        }
        _ => {}
    }
    let blocks = component_blocks(policy, size_bytes);
    let services = node.services().ok_or_else(|| CreateError::Unavailable("the catalog is not open yet".into()))?;
    if services.catalog.objects.get_local(&name.to_string()).is_some() {
        return Err(CreateError::Exists(name.into()));
    }
    let request = placement::Request {
        id: 0,
        count: policy.copies(),
        bytes: blocks * BLOCK_SIZE as u64,
        distinct_hosts: true,
        distinct_fault_domains: false,
        site: None,
        excluded_hosts: Default::default(),
    };
    let placed = crate::membership::place(node, request)
        .await
        .map_err(|reason| CreateError::Unavailable(format!("placing {} components: {reason}", policy.copies())))?;
    let id = loop {
        let id = rand::random::<u64>() >> 16;
        if id != 0 {
            break id;
        }
    };
    let hosts = hosts_by_id(node);
    let components: Vec<ComponentRecord> = placed
        .iter()
        .enumerate()
        .map(|(index, candidate)| ComponentRecord {
            id: id << 8 | index as u64,
            host: candidate.bucket.host,
            disk: candidate.bucket.disk,
        })
        .collect();
    for component in &components {
        let address = first_component_address(&hosts, component.host)
            .ok_or_else(|| CreateError::Unavailable(format!("host {} serves no components", component.host)))?;
        let client = Client::new(node.transport.clone(), address);
        let create = ComponentRequest::Create { component: component.id, disk: component.disk, blocks };
        client.call(0, create, &[]).await.map_err(|error| {
            CreateError::Unavailable(format!(
                "creating component {:#x} on host {}: {error}",
                component.id, component.host
            ))
        })?;
    }
    let record = ObjectRecord {
        id,
        name: name.into(),
        policy,
        size_bytes,
        owner: components[0].host,
        owner_epoch: 0,
        states: vec![ComponentState::Active; components.len()],
        components,
        created_ms: now_ms(),
        key: encrypted.then(ObjectKey::random),
    };
    match services.catalog.create_object(record.clone()).await {
        Ok(Ok(_)) => {
            tracing::info!(name, id, %policy, size_bytes, owner = record.owner, "object created");
            Ok(record)
        }
        Ok(Err(_)) => {
            delete_components(node, &record, 1).await;
            Err(CreateError::Exists(name.into()))
        }
        Err(error) => {
            delete_components(node, &record, 1).await;
            Err(CreateError::Unavailable(error.to_string()))
        }
    }
}

/// Deletes an object: its record, then its components (fenced past every
/// owner). Components on hosts that are away stay until deleted again.
pub async fn remove(node: &Arc<Node>, name: &str) -> Result<Option<(ObjectRecord, Vec<String>)>, String> {
    let services = node.services().ok_or("the catalog is not open yet")?;
    let Some(record) = services.catalog.remove_object(name).await.map_err(|error| error.to_string())? else {
        return Ok(None);
    };
    let leftovers = delete_components(node, &record, record.owner_epoch + 1).await;
    tracing::info!(name, id = record.id, "object deleted");
    Ok(Some((record, leftovers)))
}

async fn delete_components(node: &Arc<Node>, record: &ObjectRecord, epoch: u64) -> Vec<String> {
    let hosts = hosts_by_id(node);
    let mut leftovers = Vec::new();
    for component in &record.components {
        let address = first_component_address(&hosts, component.host);
        let result = match address {
            Some(address) => Client::new(node.transport.clone(), address)
                .call(epoch, ComponentRequest::Delete { component: component.id }, &[])
                .await
                .map(|_| ())
                .map_err(|error| error.to_string()),
            None => Err("host unknown".into()),
        };
        if let Err(reason) = result {
            leftovers.push(format!("component {:#x} on host {}: {reason}", component.id, component.host));
        }
    }
    leftovers
}

/// Serves the node's object wire methods.
pub async fn handle(node: Arc<Node>, request: &wire::Request) -> Result<Bytes, RemoteError> {
    match request.method {
        method::OBJECT_IO => {
            let (header, data): (IoHeader, Bytes) = unframe(&request.payload)
                .map_err(|reason| RemoteError::new(ErrorCode::BadRequest, format!("object request: {reason}")))?;
            let (reply, data) = serve_io(&node, header, data).await;
            Ok(frame(&reply, &data))
        }
        method::OBJECT_STATS => Ok(wire::encode(&node.storage.stats())),
        method::OBJECT_HAND_OVER => {
            let asked: HandOver = wire::decode_request(request)?;
            Ok(wire::encode(&hand_over(&node, asked).await))
        }
        other => Err(RemoteError::new(ErrorCode::UnknownMethod, format!("unknown method {other:#06x}"))),
    }
}

/// The owner this host's copy of the catalog names for object `name`, and
/// the ownership to ask it at (cheap: on the path of every forwarded I/O).
pub(crate) fn catalog_owner(node: &Node, name: &str) -> Option<(u64, Ownership)> {
    node.services()?.catalog.objects.read_local(|objects| {
        objects.get(name).map(|(record, _)| (record.owner, Ownership { object: record.id, epoch: record.owner_epoch }))
    })
}

/// As [`catalog_owner`], but once the catalog names another host if this
/// host handed the object over at the ownership it names: the catalog
/// names this host until the host it handed the object to takes it over,
/// within moments; should that host not (it failed), for at most
/// `HAND_OVER_HOLD`, after which this host opens the object again.
/// Meanwhile no host serves the object, and a request of this host's own
/// for it, not carried out here (this host answered it as one that no
/// longer owns the object, having written nothing of it), waits.
pub(crate) async fn catalog_owner_past_hand_over(node: &Node, name: &str) -> Option<(u64, Ownership)> {
    let mut changes = node.services()?.catalog.watch_objects();
    loop {
        // Seen before looking: a change in between still wakes this.
        changes.borrow_and_update();
        match catalog_owner(node, name) {
            Some((owner, ownership)) if owner == node.config.node_id && node.storage.handed_to(ownership).is_some() => {
                // Until the catalog names the host taking it, or the hold
                // ends (looked at again at least every `HOLD_LOOK`).
                match tokio::time::timeout(HOLD_LOOK, changes.changed()).await {
                    Ok(Ok(())) | Err(_) => {}
                    // No more changes will come (the catalog is closing).
                    Ok(Err(_)) => tokio::time::sleep(HOLD_LOOK).await,
                }
            }
            owner => return owner,
        }
    }
}

/// How often a request held back by a handover looks again for the end of
/// the hold, which is a matter of time, not of a catalog change.
const HOLD_LOOK: Duration = Duration::from_millis(50);

/// Host `host`'s node address, from this host's copy of the catalog.
pub(crate) fn host_address(node: &Node, host: u64) -> Option<String> {
    node.services()?.catalog.hosts.read_local(|hosts| hosts.get(&host).map(|(record, _)| record.address.clone()))
}

/// A request from the network: carried out if this host owns the object
/// at the ownership it names, else answered with where to send it.
pub(crate) async fn serve_io(node: &Arc<Node>, header: IoHeader, data: Bytes) -> (IoReply, Bytes) {
    let IoHeader { ownership, io } = header;
    let me = node.config.node_id;
    let serving = owned_or_opening(node, io.name()).await;
    let serving = match serving {
        Some(serving) if ownership == Some(serving.ownership) => return carry_out(node, serving, io, data).await,
        serving => serving.map(|serving| serving.ownership),
    };
    // Not carried out: the catalog's owner and ownership instead. A sender
    // still waiting sends the request there; one that gave up on it long
    // ago waits for no answer.
    match catalog_owner(node, io.name()) {
        None => (IoReply::Unknown, Bytes::new()),
        // Served here at the catalog's ownership, and asked which host owns
        // the object, or sent for an earlier epoch or an object of the same
        // name deleted since: this host, at its ownership. (Sent for a
        // later epoch, the sender knows more than this host's catalog: this
        // host was deposed, or the object reopened, and it does not know
        // yet.)
        Some((owner, current))
            if owner == me
                && serving == Some(current)
                && ownership.is_none_or(|asked| asked.object != current.object || asked.epoch < current.epoch) =>
        {
            let address = Some(node.me.address.clone());
            (IoReply::NotOwner { owner: Some(me), address, ownership: Some(current) }, Bytes::new())
        }
        // Named here, and not served here at that (yet, or any more): no
        // owner to send the request to, unless this host handed the object
        // over, to the host that takes it now.
        Some((owner, current)) if owner == me => handed_over_reply(node, current),
        Some((owner, current)) => {
            let address = host_address(node, owner);
            (IoReply::NotOwner { owner: Some(owner), address, ownership: Some(current) }, Bytes::new())
        }
    }
}

/// The answer to a request for an object this host owns at `ownership` in
/// the catalog and does not serve: the host it handed the object over to,
/// if it did (which answers which host owns it once it has taken it
/// over), else no owner.
fn handed_over_reply(node: &Node, ownership: Ownership) -> (IoReply, Bytes) {
    let reply = match node.storage.handed_to(ownership) {
        Some(to) => IoReply::NotOwner { owner: Some(to), address: host_address(node, to), ownership: None },
        None => IoReply::NotOwner { owner: None, address: None, ownership: None },
    };
    (reply, Bytes::new())
}

/// An object this host owns, ready to serve.
struct Serving {
    object: Arc<Object<TcpTransport>>,
    thread: usize,
    ownership: Ownership,
}

/// Object `name` if this host owns it, waiting for it if this host is
/// opening it.
async fn owned_or_opening(node: &Node, name: &str) -> Option<Serving> {
    let storage = &node.storage;
    let mut deadline = None;
    loop {
        // Listening before looking: an open that ends in between still
        // wakes this.
        let ended = storage.open_ended.notified();
        let mut ended = std::pin::pin!(ended);
        ended.as_mut().enable();
        let owned = storage.owned(name);
        if owned.is_some() || !storage.opening.lock().expect("opening lock").contains(name) {
            return owned;
        }
        // Being opened here (taken over, or after its owner failed): wait
        // for it rather than send the caller round the other hosts.
        let deadline = *deadline.get_or_insert_with(|| Instant::now() + OPEN_WAIT);
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || tokio::time::timeout(left, ended).await.is_err() {
            return storage.owned(name);
        }
    }
}

/// Serves `io`, from this host, if this host owns the object (at whatever
/// epoch: `io` was not sent over the network), waiting for it if this host
/// is opening it; hands the request back if the object is owned elsewhere
/// (or by nobody yet).
pub(crate) async fn serve_here(
    node: &Arc<Node>,
    io: IoRequest,
    data: Bytes,
) -> Result<(IoReply, Bytes), (IoRequest, Bytes)> {
    match owned_or_opening(node, io.name()).await {
        Some(serving) => Ok(carry_out(node, serving, io, data).await),
        None => Err((io, data)),
    }
}

async fn carry_out(node: &Node, serving: Serving, io: IoRequest, data: Bytes) -> (IoReply, Bytes) {
    let Serving { object, thread, ownership } = serving;
    // Reads change nothing in the owner: they run on the caller's thread,
    // and a read of a copy on this host (served in place) wakes no other
    // thread. Changes go to the object's owner thread.
    let result = match io {
        IoRequest::Read { offset, length, .. } => {
            let via = node.storage.owner_threads.this_thread_transport();
            Ok(object.read_at_via(offset, length, Some(&via)).await.map(Some))
        }
        IoRequest::Provisioning { .. } => Ok(perform(&object, io, data).await),
        io => node.storage.owner_threads.run(thread, move |_| async move { perform(&object, io, data).await }).await,
    };
    match result {
        Ok(Ok(Some(data))) => (IoReply::Data, data),
        Ok(Ok(None)) => (IoReply::Done, Bytes::new()),
        // Deposed, or handed over while it was held back.
        Ok(Err(ObjectError::Deposed)) => handed_over_reply(node, ownership),
        Ok(Err(error @ ObjectError::NoSpace)) => (IoReply::NoSpace(error.to_string()), Bytes::new()),
        Ok(Err(error @ ObjectError::Unavailable)) => (IoReply::Unavailable(error.to_string()), Bytes::new()),
        Ok(Err(error)) => (IoReply::Error(error.to_string()), Bytes::new()),
        Err(error) => (IoReply::Error(error.to_string()), Bytes::new()),
    }
}

async fn perform(object: &Arc<Object<TcpTransport>>, io: IoRequest, data: Bytes) -> Result<Option<Bytes>, ObjectError> {
    match io {
        IoRequest::Read { offset, length, .. } => object.read_at(offset, length).await.map(Some),
        IoRequest::Write { offset, .. } => object.write_at(offset, data).await.map(|_| None),
        IoRequest::Unmap { offset, length, .. } => object.unmap(offset, length).await.map(|_| None),
        IoRequest::Flush { .. } => object.flush().await.map(|_| None),
        IoRequest::Provisioning { offset, length, .. } => object
            .provisioning(offset, length)
            .await
            .map(|(mapped, bytes)| Some(Provisioned { mapped, bytes }.encode())),
        IoRequest::CompareAndWrite { offset, expected, .. } => {
            let split = (expected as usize).min(data.len());
            let differs = object.compare_and_write(offset, &data[..split], data.slice(split..)).await?;
            Ok(Some(differs.map(|at| Bytes::copy_from_slice(&at.to_be_bytes())).unwrap_or_default()))
        }
        IoRequest::EraseKey { .. } => object.erase_key().await.map(|_| None),
    }
}

/// Decodes [`IoRequest::CompareAndWrite`]'s answer: `None` when written,
/// else the offset of the first differing byte.
pub fn compared(answer: &[u8]) -> Result<Option<u64>, String> {
    match answer.len() {
        0 => Ok(None),
        8 => Ok(Some(u64::from_be_bytes(answer.try_into().expect("8 bytes")))),
        length => Err(format!("a compare-and-write answer of {length} bytes")),
    }
}

/// Starts the object tasks once the catalog is open.
pub fn start(node: Arc<Node>) {
    tokio::spawn(manage(node));
}

/// Opens, takes over, closes, fails and probes, whenever the catalog
/// changes and at a steady interval.
async fn manage(node: Arc<Node>) {
    let Some(services) = node.services() else { return };
    let mut objects = services.catalog.watch_objects();
    let mut hosts = services.catalog.watch_hosts();
    let mut shutdown = node.shutdown_signal();
    loop {
        manage_once(&node);
        tokio::select! {
            _ = objects.changed() => {}
            _ = hosts.changed() => {}
            _ = tokio::time::sleep(MANAGE_INTERVAL) => {}
            _ = shutdown.changed() => return,
        }
    }
}

fn manage_once(node: &Arc<Node>) {
    let Some(services) = node.services() else { return };
    let me = node.config.node_id;
    let hosts = hosts_by_id(node);
    let up = |host: u64| hosts.get(&host).is_some_and(|record| record.state == HostState::Up);
    let records: BTreeMap<String, ObjectRecord> =
        services.catalog.objects.entries_local().into_iter().map(|(name, record, _)| (name, record)).collect();
    let storage = &node.storage;
    // Close what this host no longer owns.
    {
        let mut owned = storage.owned.lock().expect("owned lock");
        owned.retain(|name, owned| {
            let keep = records.get(name).is_some_and(|record| record.owner == me && record.owner_epoch == owned.epoch)
                && !owned.object.is_closed();
            if !keep {
                tracing::info!(name, "closing the object here: deleted, or owned by another host now");
                owned.object.close();
            }
            keep
        });
    }
    for (name, record) in &records {
        let is_open = storage.owned.lock().expect("owned lock").contains_key(name);
        if is_open {
            tend(node, name, &hosts);
            continue;
        }
        if !should_own(record, me, &up) || storage.holds_back(record) {
            continue;
        }
        start_open(node, name, None);
    }
    for name in storage.to_follow() {
        let Some(record) = records.get(&name) else { continue };
        let healthy = record.states.iter().all(|state| *state == ComponentState::Active);
        let mut followed = storage.followed.lock().expect("followed lock");
        followed.retain(|_, when| when.elapsed() < FOLLOW_COOLDOWN);
        if record.owner == me || !up(record.owner) || !healthy || followed.contains_key(&name) {
            continue;
        }
        followed.insert(name.clone(), Instant::now());
        drop(followed);
        tracing::info!(name, from = record.owner, "taking the object over: its I/O comes from this host");
        let ownership = Ownership { object: record.id, epoch: record.owner_epoch };
        start_open(node, &name, Some((record.owner, ownership)));
    }
}

/// Opens `name` in the background unless it is being opened or failed to
/// open a moment ago. `follow`: take it over from that live owner at that
/// ownership, once the owner has handed it over (`ask_hand_over`), if it
/// still holds it.
fn start_open(node: &Arc<Node>, name: &str, follow: Option<(u64, Ownership)>) {
    let storage = &node.storage;
    let recently_failed =
        storage.failed_opens.lock().expect("failed lock").get(name).is_some_and(|when| when.elapsed() < OPEN_RETRY);
    if recently_failed || !storage.opening.lock().expect("opening lock").insert(name.to_string()) {
        return;
    }
    let node = node.clone();
    let name = name.to_string();
    tokio::spawn(async move {
        // Marked opening meanwhile: this host's own I/O of the object waits
        // for the open (`owned_or_opening`) rather than queue at the owner
        // handing it over.
        let opened = match follow {
            Some((owner, ownership)) => take_over(&node, &name, owner, ownership).await,
            None => open(&node, &name, None).await,
        };
        if let Err(reason) = opened {
            tracing::warn!(name, %reason, "could not open the object; retrying");
            node.storage.failed_opens.lock().expect("failed lock").insert(name.clone(), Instant::now());
        }
        node.storage.opening.lock().expect("opening lock").remove(&name);
        node.storage.open_ended.notify_waiters();
    });
}

/// Takes object `name` over from its live owner `owner` at `ownership`,
/// once that owner has handed it over (`ask_hand_over`); not at all if it
/// does not: taking it from a live owner without its consent would depose
/// it mid-write, and a compare-and-write it was writing would end of
/// unknown outcome. Once handed over, no host serves the object until this
/// one records itself owner: a compare-and-set that fails (the catalog
/// busy) is tried again, for half the owner's hold; conditioned on that
/// owner and epoch, it takes nothing another host took meanwhile.
async fn take_over(node: &Arc<Node>, name: &str, owner: u64, ownership: Ownership) -> Result<(), String> {
    if !ask_hand_over(node, name, owner, ownership).await {
        return Ok(());
    }
    let deadline = Instant::now() + HAND_OVER_HOLD / 2;
    loop {
        match open(node, name, Some((owner, ownership.epoch))).await {
            Err(reason) if Instant::now() < deadline => {
                tracing::warn!(name, %reason, "could not take the object over; trying again");
                tokio::time::sleep(OPEN_RETRY / 4).await;
            }
            opened => return opened,
        }
    }
}

/// Asks host `owner` to hand object `name` over at `ownership`; whether it
/// did. Asked twice should the first answer be lost: the owner answers the
/// same question the same while it holds the object for this host.
async fn ask_hand_over(node: &Node, name: &str, owner: u64, ownership: Ownership) -> bool {
    let Some(address) = host_address(node, owner) else { return false };
    let asked = HandOver { name: name.to_string(), ownership, to: node.config.node_id };
    let timeout = HAND_OVER_DRAIN + Duration::from_secs(3);
    let mut tries = 0;
    let answer = loop {
        tries += 1;
        match wire::call::<_, _, HandedOver>(&node.transport, &address, method::OBJECT_HAND_OVER, &asked, timeout).await
        {
            Err(error) if tries < 2 => tracing::warn!(name, owner, %error, "asking for the object; asking again"),
            answer => break answer,
        }
    };
    match answer {
        Ok(HandedOver::Closed) => {
            tracing::info!(name, owner, epoch = ownership.epoch, "the owner handed the object over");
            true
        }
        answer => {
            tracing::info!(name, owner, ?answer, "not taking the object over: its owner did not hand it over");
            false
        }
    }
}

/// Hands object `name` over to the host asking, if this host owns it at
/// the ownership asked: closes it once every change under way is answered,
/// new ones held back meanwhile (they are then answered as by a host that
/// no longer owns the object, naming the asking host, and their senders
/// send them there). The catalog still names this host until the asking
/// host takes the object over; this host does not open it again
/// meanwhile, for up to `HAND_OVER_HOLD` (should the asking host fail
/// first), and sends requests for it to that host.
async fn hand_over(node: &Node, HandOver { name, ownership, to }: HandOver) -> HandedOver {
    let storage = &node.storage;
    // Not open here at that ownership: handed over already (the same
    // question again, its answer lost: the same answer), or not owned.
    let closed = || match storage.handed_to(ownership) == Some(to) {
        true => HandedOver::Closed,
        false => HandedOver::NotOwner,
    };
    let serving = storage.owned(&name).filter(|serving| serving.ownership == ownership);
    let Some(serving) = serving.filter(|serving| !serving.object.is_closed()) else { return closed() };
    // Another handler of the same question (asked again) may replace the
    // entry meanwhile: each removes only what it put.
    let asked_at = Instant::now();
    {
        let mut handed_over = storage.handed_over.lock().expect("handed-over lock");
        if handed_over.get(&ownership.object).is_some_and(|handed| handed.holds(ownership) && handed.to != to) {
            // Being handed to another host (asked at once by two).
            return HandedOver::NotOwner;
        }
        handed_over.insert(ownership.object, HandedTo { epoch: ownership.epoch, to, when: asked_at });
    }
    if !serving.object.close_when_idle(HAND_OVER_DRAIN).await {
        if serving.object.is_closed() {
            // Closed meanwhile: by the same question asked again, or deposed.
            return closed();
        }
        let mut handed_over = storage.handed_over.lock().expect("handed-over lock");
        if handed_over.get(&ownership.object).is_some_and(|handed| handed.when == asked_at) {
            handed_over.remove(&ownership.object);
        }
        tracing::warn!(name, "not handing the object over: changes under way were not answered in time");
        return HandedOver::Busy;
    }
    // The hold counts from the close.
    storage
        .handed_over
        .lock()
        .expect("handed-over lock")
        .insert(ownership.object, HandedTo { epoch: ownership.epoch, to, when: Instant::now() });
    let mut owned = storage.owned.lock().expect("owned lock");
    if owned.get(&name).is_some_and(|owned| owned.id == ownership.object && owned.epoch == ownership.epoch) {
        owned.remove(&name);
    }
    tracing::info!(name, epoch = ownership.epoch, to, "handed the object over: every change under way answered");
    HandedOver::Closed
}

/// An object this host handed over (`Storage::handed_over`): at which
/// owner epoch, to which host, and when.
struct HandedTo {
    epoch: u64,
    to: u64,
    when: Instant,
}

impl HandedTo {
    /// Whether this host still holds the object at `ownership`'s epoch for
    /// the host it handed it to (`HAND_OVER_HOLD`).
    fn holds(&self, ownership: Ownership) -> bool {
        self.epoch == ownership.epoch && self.when.elapsed() < HAND_OVER_HOLD
    }
}

/// Whether host `me` should own the object: the record names it, or the
/// named owner's host is not up and `me` is the lowest-numbered live host
/// holding one of its components.
fn should_own(record: &ObjectRecord, me: u64, up: &impl Fn(u64) -> bool) -> bool {
    let successor = record.components.iter().map(|component| component.host).filter(|host| up(*host)).min();
    record.owner == me || (!up(record.owner) && successor == Some(me))
}

/// An owned object's components: fail those whose host went down, probe
/// absent ones whose host is up.
fn tend(node: &Arc<Node>, name: &str, hosts: &BTreeMap<u64, HostRecord>) {
    let storage = &node.storage;
    let mut owned = storage.owned.lock().expect("owned lock");
    let Some(entry) = owned.get_mut(name) else { return };
    let statuses = entry.object.statuses();
    for (index, status) in statuses.iter().enumerate() {
        let host = hosts.get(&entry.hosts[index]);
        let host_up = host.is_some_and(|host| host.state == HostState::Up);
        match status {
            Status::Active | Status::Resyncing { .. } if !host_up => {
                let object = entry.object.clone();
                let thread = entry.thread;
                tracing::warn!(name, component = index, host = entry.hosts[index], "component's host is down");
                let node = node.clone();
                tokio::spawn(async move {
                    let _ = node
                        .storage
                        .owner_threads
                        .run(thread, move |_| async move { object.fail_component(index) })
                        .await;
                });
            }
            Status::Absent { .. } if host_up => {
                if entry.probed[index].is_some_and(|when| when.elapsed() < Duration::from_secs(1)) {
                    continue;
                }
                entry.probed[index] = Some(Instant::now());
                let object = entry.object.clone();
                if let Some(address) = host.and_then(|host| component_address(&host.component_addresses, entry.thread))
                {
                    object.set_address(index, address);
                }
                let thread = entry.thread;
                let name = name.to_string();
                let node = node.clone();
                tokio::spawn(async move {
                    let run = node.storage.owner_threads.run(thread, move |_| async move { object.probe(index).await });
                    if let Ok(true) = run.await {
                        tracing::info!(name, component = index, "absent component is back; resyncing");
                    }
                });
            }
            _ => {}
        }
    }
}

/// Takes ownership (a new epoch, by compare-and-set) and recovers the
/// object on its owner thread. `follow`: only from that owner and epoch.
async fn open(node: &Arc<Node>, name: &str, follow: Option<(u64, u64)>) -> Result<(), String> {
    let services = node.services().ok_or("the catalog is not open")?;
    let me = node.config.node_id;
    let hosts = hosts_by_id(node);
    let up = |host: u64| hosts.get(&host).is_some_and(|record| record.state == HostState::Up);
    let claimed = services
        .catalog
        .update_object(name, |record| {
            let take = match follow {
                Some((owner, epoch)) => record.owner == owner && record.owner_epoch == epoch,
                None => should_own(record, me, &up),
            };
            if !take {
                return None;
            }
            let mut updated = record.clone();
            updated.owner = me;
            updated.owner_epoch += 1;
            Some(updated)
        })
        .await
        .map_err(|error| error.to_string())?;
    let Some(record) = claimed else { return Ok(()) };
    tracing::info!(name, epoch = record.owner_epoch, "taking ownership");
    let thread = node.storage.owner_threads.thread_of(record.id);
    let hosts = await_starting_hosts(node, name, &record, thread).await;
    let mut addresses = Vec::new();
    for component in &record.components {
        let host = hosts.get(&component.host).ok_or_else(|| format!("host {} is unknown", component.host))?;
        let address = component_address(&host.component_addresses, thread)
            .ok_or_else(|| format!("host {} serves no components", component.host))?;
        addresses.push((component.id, address.to_string()));
    }
    let recorded: Vec<Status> = record.states.iter().map(to_status).collect();
    let epoch = record.owner_epoch;
    let hooks = Hooks {
        persister: Some(persister(node, name, epoch)),
        admission: Some(crate::repair::admission(node, name, epoch)),
        cache: node.storage.block_cache.clone(),
        resync_pace: node.storage.resync_pace.clone(),
        first_owner: epoch == 1,
        // Taken from a live owner only once it handed the object over.
        handed_over: follow.is_some(),
        erasure: layout(record.policy),
        key: record.key.as_ref().map(|key| DataKey(key.bytes())),
        rekeyer: Some(rekeyer(node, name, epoch)),
    };
    let blocks = record.size_bytes / BLOCK_SIZE as u64;
    let opened = node
        .storage
        .owner_threads
        .run(thread, move |transport| async move {
            let components =
                addresses.into_iter().map(|(id, address)| (id, Client::new(transport.clone(), address))).collect();
            Object::recover(epoch, blocks, components, recorded, hooks).await
        })
        .await
        .map_err(|error| error.to_string())?
        .map_err(|error| error.to_string())?;
    let count = record.components.len();
    node.storage.owned.lock().expect("owned lock").insert(
        name.to_string(),
        Owned {
            id: record.id,
            epoch,
            thread,
            hosts: record.components.iter().map(|component| component.host).collect(),
            object: opened,
            probed: vec![None; count],
        },
    );
    node.storage.failed_opens.lock().expect("failed lock").remove(name);
    tracing::info!(name, epoch, thread, "object open");
    Ok(())
}

/// The host records to open `record` with, once every copy recorded
/// active whose host is recorded up stops refusing connections at its
/// recorded address; or once such a host is recorded down, or after
/// [`STARTING_HOST_GRACE`]. A copy that still does not answer is then
/// recorded absent, as for any host that is away. Only a refused
/// connection counts as starting: a host that does not answer at all
/// (cut off, or its machine down) is not waited for.
async fn await_starting_hosts(
    node: &Node,
    name: &str,
    record: &ObjectRecord,
    thread: usize,
) -> BTreeMap<u64, HostRecord> {
    let started = Instant::now();
    let source = node.storage.owner_threads.source();
    let mut told = false;
    loop {
        let hosts = hosts_by_id(node);
        let probes = record.components.iter().zip(&record.states).filter_map(|(component, state)| {
            let host = hosts.get(&component.host).filter(|host| host.state == HostState::Up)?;
            let address = component_address(&host.component_addresses, thread)?.to_string();
            (*state == ComponentState::Active)
                .then_some(async move { refuses_connections(&address, source).await.then_some(component.host) })
        });
        let starting: Vec<u64> = futures::future::join_all(probes).await.into_iter().flatten().collect();
        if starting.is_empty() {
            if told {
                tracing::info!(name, waited = ?started.elapsed(), "component hosts answer");
            }
            return hosts;
        }
        if started.elapsed() >= STARTING_HOST_GRACE {
            tracing::warn!(name, hosts = ?starting, "component hosts still refuse connections; opening without them");
            return hosts;
        }
        if !told {
            tracing::info!(name, hosts = ?starting, "waiting for component hosts that are starting");
            told = true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether `address` refuses a TCP connection from `source` (nothing
/// listens there). A connection that opens, times out or fails otherwise
/// is not a refusal.
async fn refuses_connections(address: &str, source: Option<std::net::IpAddr>) -> bool {
    let Ok(peer) = address.parse::<std::net::SocketAddr>() else { return false };
    let socket = match peer {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    };
    let Ok(socket) = socket else { return false };
    if let Some(source) = source.filter(|source| source.is_ipv4() == peer.is_ipv4() && !source.is_unspecified()) {
        if socket.bind(std::net::SocketAddr::new(source, 0)).is_err() {
            return false;
        }
    }
    matches!(
        tokio::time::timeout(Duration::from_millis(500), socket.connect(peer)).await,
        Ok(Err(error)) if error.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

/// Writes component states into the object's record, as long as it still
/// names this host and epoch as owner. Runs the catalog call on the node's
/// runtime (the catalog's connections live there).
fn persister(node: &Arc<Node>, name: &str, epoch: u64) -> Persister {
    let node = Arc::downgrade(node);
    let name = name.to_string();
    let runtime = tokio::runtime::Handle::current();
    Arc::new(move |statuses: Vec<Status>| {
        let states: Vec<ComponentState> = statuses.iter().map(to_state).collect();
        update_owned(&runtime, node.clone(), name.clone(), epoch, move |record| {
            Ok((record.states != states).then(|| ObjectRecord { states: states.clone(), ..record.clone() }))
        })
    })
}

/// Makes a new key for object `name`, owned here at `epoch`, and records
/// it in the catalog (never for an object recorded without a key, nor by
/// an owner the catalog no longer names).
fn rekeyer(node: &Arc<Node>, name: &str, epoch: u64) -> Rekeyer {
    let node = Arc::downgrade(node);
    let name = name.to_string();
    let runtime = tokio::runtime::Handle::current();
    Arc::new(move || {
        let key = ObjectKey::random();
        let recorded = key.clone();
        let update = update_owned(&runtime, node.clone(), name.clone(), epoch, move |record| match record.key {
            None => Err(PersistError::Failed("the object is recorded without a key".into())),
            Some(_) => Ok(Some(ObjectRecord { key: Some(recorded.clone()), ..record.clone() })),
        });
        let (name, epoch) = (name.clone(), epoch);
        Box::pin(async move {
            update.await?;
            tracing::info!(name, epoch, "object key replaced");
            Ok(DataKey(key.bytes()))
        })
    })
}

/// Changes object `name`'s record with `change` (`Ok(None)`: nothing to
/// change; `Err`: refused) if the catalog still names this host its owner
/// at `epoch`, else answers `Deposed`. Runs on `runtime`, the node's (the
/// catalog's connections live there), whichever thread awaits it.
fn update_owned(
    runtime: &tokio::runtime::Handle,
    node: std::sync::Weak<Node>,
    name: String,
    epoch: u64,
    mut change: impl FnMut(&ObjectRecord) -> Result<Option<ObjectRecord>, PersistError> + Send + 'static,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), PersistError>> + Send>> {
    let work = runtime.spawn(async move {
        let Some(node) = node.upgrade() else { return Err(PersistError::Failed("node stopped".into())) };
        let Some(services) = node.services() else { return Err(PersistError::Failed("no catalog".into())) };
        let me = node.config.node_id;
        let mut refused = None;
        let result = services
            .catalog
            .update_object(&name, |record| {
                let changed = match record.owner == me && record.owner_epoch == epoch {
                    true => change(record),
                    false => Err(PersistError::Deposed),
                };
                match changed {
                    Ok(updated) => {
                        refused = None;
                        updated
                    }
                    Err(error) => {
                        refused = Some(error);
                        None
                    }
                }
            })
            .await;
        match result {
            Ok(_) => refused.map_or(Ok(()), Err),
            Err(catalog::CatalogError::NotFound(_)) => Err(PersistError::Deposed),
            Err(error) => Err(PersistError::Failed(error.to_string())),
        }
    });
    Box::pin(async move { work.await.unwrap_or_else(|error| Err(PersistError::Failed(error.to_string()))) })
}

/// Figures gathered from the owners, for status.
pub async fn gather_stats(node: &Node, records: &[ObjectRecord]) -> HashMap<String, ObjectStats> {
    let hosts = hosts_by_id(node);
    let owners: HashSet<u64> = records.iter().map(|record| record.owner).collect();
    let asks = owners.into_iter().filter_map(|owner| hosts.get(&owner).map(|host| host.address.clone())).map(
        |address| async move {
            wire::call::<_, _, Vec<ObjectStats>>(&node.transport, &address, method::OBJECT_STATS, &(), STATS_TIMEOUT)
                .await
                .unwrap_or_default()
        },
    );
    futures::future::join_all(asks).await.into_iter().flatten().map(|stats| (stats.name.clone(), stats)).collect()
}

/// The block client API from anywhere: finds the owner through any host.
#[derive(Clone)]
pub struct ObjectClient<T: Transport> {
    transport: T,
    /// Node addresses to start from.
    hosts: Vec<String>,
    /// The owner's address and the ownership to ask it at, as last learned.
    owner: Arc<Mutex<Option<(String, Ownership)>>>,
    name: String,
    /// How long one attempt waits for its answer.
    io_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Failed(String),
    #[error("no host answered: {0}")]
    Unreachable(String),
    #[error("{0}")]
    NoSpace(String),
    /// The owner has no copy of the object available now.
    #[error("{0}")]
    Unavailable(String),
}

impl<T: Transport> ObjectClient<T> {
    pub fn new(transport: T, hosts: Vec<String>, name: impl Into<String>) -> ObjectClient<T> {
        ObjectClient { transport, hosts, owner: Arc::new(Mutex::new(None)), name: name.into(), io_timeout: IO_TIMEOUT }
    }

    /// Each attempt waits at most `timeout` for its answer (default 30 s).
    pub fn with_io_timeout(mut self, timeout: Duration) -> ObjectClient<T> {
        self.io_timeout = timeout;
        self
    }

    pub async fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), ClientError> {
        self.call(IoRequest::Write { name: self.name.clone(), offset }, data).await.map(|_| ())
    }

    pub async fn read_at(&self, offset: u64, length: u64) -> Result<Bytes, ClientError> {
        self.call(IoRequest::Read { name: self.name.clone(), offset, length }, &[]).await
    }

    pub async fn unmap(&self, offset: u64, length: u64) -> Result<(), ClientError> {
        self.call(IoRequest::Unmap { name: self.name.clone(), offset, length }, &[]).await.map(|_| ())
    }

    pub async fn flush(&self) -> Result<(), ClientError> {
        self.call(IoRequest::Flush { name: self.name.clone() }, &[]).await.map(|_| ())
    }

    /// Writes `new` at `offset` if the bytes there are `expected`, as one
    /// step at the owner: `None` when written, else the offset of the first
    /// differing byte.
    pub async fn compare_and_write(
        &self,
        offset: u64,
        expected: &[u8],
        new: &[u8],
    ) -> Result<Option<u64>, ClientError> {
        let data = [expected, new].concat();
        let request = IoRequest::CompareAndWrite { name: self.name.clone(), offset, expected: expected.len() as u64 };
        let answer = self.call(request, &data).await?;
        compared(&answer).map_err(ClientError::Failed)
    }

    pub async fn provisioning(&self, offset: u64, length: u64) -> Result<Provisioned, ClientError> {
        let data = self.call(IoRequest::Provisioning { name: self.name.clone(), offset, length }, &[]).await?;
        Provisioned::decode(&data).ok_or_else(|| ClientError::Failed("bad provisioning answer".into()))
    }

    /// Sends the next request to `address` at `ownership` first (the
    /// owner, as the caller learned it), or, with `None`, to each host in
    /// turn.
    /// Not back to an earlier epoch of the object than one it learned.
    pub(crate) fn aim_at(&self, owner: Option<(String, Ownership)>) {
        let mut known = self.owner.lock().expect("owner lock");
        if let (Some((_, new)), Some((_, learned))) = (&owner, &*known) {
            if new.object == learned.object && new.epoch < learned.epoch {
                return;
            }
        }
        *known = owner;
    }

    /// Sends to the owner it knows, else to each host in turn, following
    /// one redirect per host.
    pub(crate) async fn call(&self, request: IoRequest, data: &[u8]) -> Result<Bytes, ClientError> {
        self.call_noting(request, data, None).await
    }

    /// [`ObjectClient::call`], noting in `at`, if given, the owner epoch
    /// each attempt is sent for while it waits for its answer (0: none
    /// yet, or an attempt that only asks which host owns the object, which
    /// no host carries out).
    pub(crate) async fn call_noting(
        &self,
        request: IoRequest,
        data: &[u8],
        at: Option<&AtomicU64>,
    ) -> Result<Bytes, ClientError> {
        let known = self.owner.lock().expect("owner lock").clone();
        let mut tried = Vec::new();
        // Hosts to ask, each with the ownership to ask it at (none for a
        // host that is not known to own the object: it answers which does).
        let mut candidates: Vec<(String, Option<Ownership>)> = known
            .map(|(address, ownership)| (address, Some(ownership)))
            .into_iter()
            .chain(self.hosts.iter().map(|address| (address.clone(), None)))
            .collect();
        let mut index = 0;
        // Hosts that answered they know no object of the name.
        let mut unknown = 0;
        let mut header = IoHeader { ownership: None, io: request };
        while index < candidates.len() && index < 16 {
            let (address, ownership) = candidates[index].clone();
            index += 1;
            header.ownership = ownership;
            if let Some(at) = at {
                at.store(ownership.map_or(0, |ownership| ownership.epoch), Ordering::Relaxed);
            }
            let payload = frame(&header, data);
            // A change that times out may still wait for the owner's host,
            // queued in the connection (the host cut off from this one, not
            // from its peers, and still the owner at the same epoch): it
            // must not be carried out there once this call has moved on,
            // perhaps after writes the caller sent since through another
            // host. So its connection is aborted, and what it queued with
            // it. (Not for a read, or a request that only asks which host
            // owns the object: the abort fails every other call on the
            // connection.)
            let call = match ownership.is_some() && header.io.changes() {
                true => self.transport.call_or_abort(&address, method::OBJECT_IO, payload, self.io_timeout),
                false => self.transport.call(&address, method::OBJECT_IO, payload, self.io_timeout),
            };
            let reply = match call.await {
                Ok(reply) => reply,
                // Sent, and perhaps carried out: a compare and write tried
                // again would fail its compare on its own data.
                Err(error @ (CallError::Timeout { .. } | CallError::ConnectionLost { .. }))
                    if ownership.is_some() && header.io.compares() =>
                {
                    return Err(ClientError::Failed(format!("{address}: {error}: whether it wrote is unknown")));
                }
                Err(error) => {
                    tried.push(format!("{address}: {error}"));
                    continue;
                }
            };
            let (reply, data): (IoReply, Bytes) =
                unframe(&reply).map_err(|reason| ClientError::Failed(format!("bad reply from {address}: {reason}")))?;
            match reply {
                IoReply::Done | IoReply::Data => {
                    // Not back to an earlier owner, should its answer come
                    // after the client learned of a later one.
                    if ownership.is_some() {
                        self.aim_at(ownership.map(|ownership| (address, ownership)));
                    }
                    return Ok(data);
                }
                IoReply::NotOwner { address: Some(redirect), ownership, .. } => {
                    tried.push(format!("{address}: the owner is at {redirect}"));
                    candidates.insert(index, (redirect, ownership));
                }
                IoReply::NotOwner { .. } => tried.push(format!("{address}: no owner open yet")),
                // Another host may know it (this one may have just started).
                IoReply::Unknown => {
                    unknown += 1;
                    tried.push(format!("{address}: no object named {:?} here", self.name));
                }
                IoReply::Error(reason) => return Err(ClientError::Failed(reason)),
                IoReply::NoSpace(reason) => return Err(ClientError::NoSpace(reason)),
                IoReply::Unavailable(reason) => return Err(ClientError::Unavailable(reason)),
            }
        }
        *self.owner.lock().expect("owner lock") = None;
        if unknown == index {
            // Every host asked knows no such object.
            return Err(ClientError::Failed(format!("no object named {:?}", self.name)));
        }
        Err(ClientError::Unreachable(tried.join("; ")))
    }
}

/// I/Os this host forwarded per object, in windows of `FOLLOW_WINDOW`.
#[derive(Default)]
struct Forwarded {
    /// Per object: when its window began, and its I/Os since.
    windows: HashMap<String, (Instant, u64)>,
    /// Per object: when this host last forwarded a COMPARE AND WRITE of it.
    compared: HashMap<String, Instant>,
}

impl Forwarded {
    fn note(&mut self, name: &str, compares: bool, now: Instant) {
        if compares {
            self.compared.insert(name.to_string(), now);
        }
        match self.windows.get_mut(name) {
            Some((since, count)) if now.duration_since(*since) <= FOLLOW_WINDOW => *count += 1,
            Some(window) => *window = (now, 1),
            None => {
                self.windows.insert(name.to_string(), (now, 1));
            }
        }
    }

    /// Objects forwarded `FOLLOW_IOS` times in their window, which start
    /// again. Not one sent a COMPARE AND WRITE within two windows (one
    /// sent before this window may still be running): the initiators that
    /// race them (VMFS's ATS locks, multipath) race from several hosts, so
    /// following one would hand the object to and fro, each handover
    /// holding its I/O back a moment. (A handover no longer leaves a
    /// COMPARE AND WRITE of unknown outcome: the owner answers those under
    /// way first, `hand_over`.)
    fn due(&mut self, now: Instant) -> Vec<String> {
        self.windows.retain(|_, (since, _)| now.duration_since(*since) <= FOLLOW_WINDOW);
        self.compared.retain(|_, at| now.duration_since(*at) <= FOLLOW_WINDOW * 2);
        let names: Vec<String> = self
            .windows
            .iter()
            .filter(|(name, (_, count))| *count >= FOLLOW_IOS && !self.compared.contains_key(*name))
            .map(|(name, _)| name.clone())
            .collect();
        for name in &names {
            self.windows.remove(name);
        }
        names
    }
}

/// Every object's status: the catalog's record and the owner's figures.
pub async fn object_statuses(node: &Node) -> Vec<crate::status::ObjectStatus> {
    let Some(services) = node.services() else { return Vec::new() };
    let records: Vec<ObjectRecord> =
        services.catalog.objects.entries_local().into_iter().map(|(_, record, _)| record).collect();
    let stats = gather_stats(node, &records).await;
    records.iter().map(|record| object_status(record, stats.get(&record.name))).collect()
}

pub fn object_status(record: &ObjectRecord, stats: Option<&ObjectStats>) -> crate::status::ObjectStatus {
    let block = BLOCK_SIZE as u64;
    let resync = stats.filter(|stats| stats.epoch == record.owner_epoch).map(|stats| {
        let elapsed = now_ms().saturating_sub(stats.resync_started_ms) as f64 / 1000.0;
        let copied = stats.resync_blocks_copied_current * block;
        let rate = if stats.resync_blocks_to_go > 0 && elapsed > 0.0 { copied as f64 / elapsed } else { 0.0 };
        let to_go = stats.resync_blocks_to_go * block;
        crate::status::ResyncProgress {
            bytes_to_go: to_go,
            bytes_copied: if stats.resync_blocks_to_go > 0 { copied } else { 0 },
            bytes_per_second: rate,
            eta_seconds: (rate > 0.0).then(|| to_go as f64 / rate),
            bytes_copied_total: stats.resync_blocks_copied * block,
            full_copies: stats.full_copies,
            resyncs_done: stats.resyncs_done,
            blocks_repaired: stats.blocks_repaired,
        }
    });
    crate::status::ObjectStatus {
        name: record.name.clone(),
        id: record.id,
        policy: record.policy.to_string(),
        size_bytes: record.size_bytes,
        owner: record.owner,
        owner_epoch: record.owner_epoch,
        health: record.health().into(),
        components: record
            .components
            .iter()
            .zip(&record.states)
            .map(|(component, state)| crate::status::ComponentStatus {
                id: component.id,
                host: component.host,
                disk: component.disk,
                state: state.name().into(),
                stale_lsn: match state {
                    ComponentState::Active => None,
                    ComponentState::Absent { stale, .. } | ComponentState::Resyncing { stale, .. } => Some(*stale),
                },
            })
            .collect(),
        resync,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_methods_are_told_apart_by_number() {
        let methods = [
            crate::daemon::method::PING,
            crate::membership::method::HIERARCHY,
            crate::membership::method::SCHEDULER,
            crate::membership::method::PLACE,
            method::OBJECT_IO,
            method::OBJECT_STATS,
            method::OBJECT_HAND_OVER,
            crate::reservations::method::SYNC,
        ];
        let distinct: HashSet<u32> = methods.into_iter().collect();
        assert_eq!(distinct.len(), methods.len(), "two node methods share a number: {methods:x?}");
    }

    /// An object forwarded `FOLLOW_IOS` times within a window is due to be
    /// taken over, and its count starts again; not one sent a COMPARE AND
    /// WRITE in that window (see `Forwarded::due`), nor one whose I/Os
    /// were spread over longer.
    #[test]
    fn objects_forwarded_often_are_followed_unless_they_were_sent_a_compare_and_write() {
        let start = Instant::now();
        let mut forwarded = Forwarded::default();
        for _ in 0..FOLLOW_IOS {
            forwarded.note("written", false, start);
            forwarded.note("compared", false, start);
        }
        forwarded.note("compared", true, start);
        let late = start + FOLLOW_WINDOW / 2;
        assert_eq!(forwarded.due(late), vec!["written".to_string()]);
        assert!(forwarded.due(late).is_empty(), "counts start again once due");
        // A new window, while the compare may still run: not yet.
        let next = start + FOLLOW_WINDOW + Duration::from_millis(1);
        for _ in 0..FOLLOW_IOS {
            forwarded.note("compared", false, next);
        }
        assert!(forwarded.due(next).is_empty(), "followed right after a compare");
        // Once the compare is two windows old, it is.
        let after = start + FOLLOW_WINDOW * 2 + Duration::from_millis(1);
        forwarded.note("compared", false, after);
        assert_eq!(forwarded.due(after), vec!["compared".to_string()]);
        // Half the I/Os in one window, half just after it ended: not due.
        for _ in 0..FOLLOW_IOS / 2 {
            forwarded.note("spread", false, after);
        }
        let just_after = after + FOLLOW_WINDOW + Duration::from_millis(1);
        for _ in 0..FOLLOW_IOS / 2 {
            forwarded.note("spread", false, just_after);
        }
        assert!(forwarded.due(just_after).is_empty());
    }
}
