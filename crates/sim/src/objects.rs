//! The distributed-object scenario: one RAID-1 object with three copies on
//! three simulated hosts (or an erasure-coded object, a component on each
//! of k + m hosts), each a real component service over a real block
//! store on a `SimFs` disk, driven by writers and readers through the block
//! client API of a real owner, while a nemesis crashes hosts (power loss:
//! unsynced data lost, appends torn), partitions them, and drops messages.
//!
//! The cluster around the object is modelled: the catalog record (owner
//! epoch and component states, written by compare-and-set), host failure
//! detection (a host down or cut off for [`DETECTION`] is declared failed),
//! and the owner's tending loop (fail components whose host is declared
//! failed, probe absent ones that are back). When the owner's host is
//! declared failed, the lowest live host takes the object over with the
//! next epoch. Everything runs on one current-thread runtime with paused
//! time and every choice comes from the seed, so a failing seed replays.
//!
//! The checker: every acknowledged write is there, on every copy, unless a
//! later write to the block replaced it; a read never returns a block older
//! than the last write acknowledged before it began; at the end, once every
//! host is back and healed, every copy is byte-identical. Erasure-coded:
//! every block is checked in the data chunk that holds it, and every
//! stripe's parity chunks must be the code of its data chunks.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blockstore::{Disk, DiskConfig, BLOCK_SIZE};
use bytes::Bytes;
use fsio::SimFs;
use objects::block_cache::BlockCache;
use objects::component::{Client, Request, Service};
use objects::crypt::{DataKey, Xts};
use objects::ec::Layout;
use objects::object::{Hooks, Object, ObjectError, PersistError, Persister};
use objects::owner::Status;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use wire::sim::{Faults, SimNetwork, SimTransport};
use wire::{ServeHandle, Transport};

/// How long a host is down or cut off before the cluster declares it failed.
pub const DETECTION: Duration = Duration::from_millis(1500);
/// How long every copy must have been active before the run ends: longer
/// than a call to a component can wait.
const SETTLED: Duration = Duration::from_secs(12);
/// The owner's block cache, in blocks.
const CACHE_BLOCKS: u64 = 16;
/// How often the owner's host tends the object.
const TEND_EVERY: Duration = Duration::from_millis(200);

#[derive(Clone, Debug)]
pub struct Scenario {
    /// Components (one per host): the copies, or for an erasure-coded
    /// object its layout's width.
    pub copies: usize,
    /// The object's blocks.
    pub blocks: u64,
    /// Erasure-coded with this layout (None: copies).
    pub erasure: Option<Layout>,
    pub writers: usize,
    /// Virtual time the nemesis runs for (then everything heals).
    pub duration: Duration,
    /// Background message loss (the nemesis adds bursts on top).
    pub loss_probability: f64,
    pub crashes: bool,
    pub partitions: bool,
    /// Bursts of message loss (up to 20%) on top of the background loss.
    /// Calls time out on every host at once, so several components can
    /// fail together: more than an erasure-coded object's m.
    pub loss_bursts: bool,
    /// The nemesis also fills disks (one host's, or every host's at once),
    /// and writers unmap now and then, so writes keep needing new blocks.
    pub full_disks: bool,
    /// The object is encrypted at rest ([`KEY`]): the checker decrypts
    /// what it reads straight from the components.
    pub encrypted: bool,
    /// Now and then the owner hands the object over to another live host,
    /// as ownership following I/O does: it closes once idle
    /// (`Object::close_when_idle`), and the other opens it without waiting
    /// out a cache lease (`Hooks::handed_over`), under the same faults.
    pub handovers: bool,
    /// Now and then the cluster wrongly declares the owner's host failed
    /// (it was cut off from the failure detector alone, say): another host
    /// takes the object over at once, as after a crash, while the old owner
    /// still runs, still reaches every copy and still serves reads from its
    /// cache until it hears of the new epoch (0-3 s later). The new owner
    /// must wait out that cache's lease before its first write.
    pub false_suspicions: bool,
}

/// The key of an encrypted scenario's object.
pub const KEY: DataKey = DataKey({
    let mut key = [0u8; objects::crypt::KEY_BYTES];
    let mut index = 0;
    while index < key.len() {
        key[index] = (index as u8).wrapping_mul(13).wrapping_add(5);
        index += 1;
    }
    key
});

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            copies: 3,
            blocks: 64,
            erasure: None,
            writers: 4,
            duration: Duration::from_secs(40),
            loss_probability: 0.0,
            crashes: true,
            partitions: true,
            loss_bursts: true,
            full_disks: false,
            encrypted: false,
            handovers: false,
            false_suspicions: false,
        }
    }
}

#[derive(Debug, Default)]
pub struct Report {
    pub seed: u64,
    pub violations: Vec<String>,
    /// A digest of everything observable: equal for equal seeds.
    pub trace_hash: u64,
    pub acknowledged_writes: u64,
    pub failed_writes: u64,
    pub reads_checked: u64,
    /// Blocks the owners' caches served.
    pub cache_hits: u64,
    pub crashes: u64,
    pub partitions: u64,
    pub loss_bursts: u64,
    pub owner_moves: u64,
    /// Owner moves that were handovers (the owner consented, idle).
    pub handovers: u64,
    /// Owner moves on a false suspicion (the old owner still running).
    pub false_suspicions: u64,
    /// Reads an owner answered after it was deposed (before it heard).
    pub reads_via_deposed: u64,
    /// Writes refused for want of space (checked to land nowhere).
    pub no_space_writes: u64,
    pub disks_filled: u64,
    pub blocks_resynced: u64,
    pub full_copies: u64,
    /// Erasure-coded: times the last owner took components back after more
    /// than m were away at once.
    pub readmissions: u64,
    pub virtual_seconds: f64,
    pub messages: (u64, u64),
    /// What happened, in order (faults, ownership, each write's outcome).
    pub trace: Vec<String>,
}

/// Runs one seed.
pub fn run(seed: u64, scenario: &Scenario) -> Report {
    crate::runtime(seed).block_on(simulate(seed, scenario.clone()))
}

fn address(host: usize) -> String {
    format!("host{host}")
}

/// One simulated host: its disk survives crashes; its process does not.
struct Host {
    fs: SimFs,
    process: Option<(Disk, ServeHandle)>,
}

/// The catalog's record of the object.
#[derive(Clone, Debug)]
struct Record {
    owner: usize,
    epoch: u64,
    states: Vec<Status>,
}

/// What the scenario shares between its tasks.
struct World {
    network: SimNetwork,
    scenario: Scenario,
    hosts: Vec<Host>,
    /// Hosts whose process is down, and hosts cut off from the rest (and
    /// from the catalog), with when that began.
    down: BTreeMap<usize, tokio::time::Instant>,
    isolated: BTreeMap<usize, tokio::time::Instant>,
    record: Record,
    /// The running owner, at the record's epoch (None while none is open).
    owner: Option<Arc<Object<SimTransport>>>,
    /// Owners opened before, kept to stop them when their host goes down.
    old_owners: Vec<(usize, Arc<Object<SimTransport>>)>,
    history: History,
    trace: Vec<String>,
    report: Report,
    /// Writers stop when set; then `writers_done` when all have.
    stop: bool,
    writers_done: bool,
    started: tokio::time::Instant,
    /// Every owner's block cache.
    caches: Vec<Arc<BlockCache>>,
}

type Shared = Arc<Mutex<World>>;

fn lock(world: &Shared) -> std::sync::MutexGuard<'_, World> {
    world.lock().expect("world lock poisoned")
}

/// Per block: what its writer did to it.
#[derive(Default)]
struct History {
    blocks: BTreeMap<u64, BlockHistory>,
}

#[derive(Default, Clone)]
struct BlockHistory {
    /// The last write acknowledged, by sequence number (None: never
    /// written, or unmapped since).
    acked: Option<u64>,
    /// Writes that failed or were cut short after it: any may have landed.
    maybe: BTreeSet<u64>,
    /// An unmap failed or was cut short after it: zeros may have landed.
    maybe_zeros: bool,
}

impl BlockHistory {
    fn allows(&self, seen: Option<u64>) -> bool {
        match seen {
            None => self.acked.is_none() || self.maybe_zeros,
            Some(seq) => self.acked == Some(seq) || self.maybe.contains(&seq),
        }
    }
}

/// A block that says which block it is and which write made it: block
/// number, sequence number, a filler derived from both, and a checksum.
fn pattern(block: u64, seq: u64) -> Vec<u8> {
    let mut data = vec![0u8; BLOCK_SIZE];
    data[0..8].copy_from_slice(&block.to_le_bytes());
    data[8..16].copy_from_slice(&seq.to_le_bytes());
    let mut state = block.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seq;
    for chunk in data[24..].chunks_mut(8) {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        chunk.copy_from_slice(&state.to_le_bytes());
    }
    let sum = crc32c::crc32c(&data[24..]) as u64;
    data[16..24].copy_from_slice(&sum.to_le_bytes());
    data
}

/// What a block holds: None for zeros (never written), Some(seq) for a
/// whole write of this block, Err for anything else (torn, misplaced,
/// corrupt).
fn decode(block: u64, data: &[u8]) -> Result<Option<u64>, String> {
    if data.iter().all(|byte| *byte == 0) {
        return Ok(None);
    }
    let number = u64::from_le_bytes(data[0..8].try_into().expect("8 bytes"));
    let seq = u64::from_le_bytes(data[8..16].try_into().expect("8 bytes"));
    if number != block {
        return Err(format!("block {block} holds block {number}'s data"));
    }
    if data != pattern(block, seq) {
        return Err(format!("block {block} holds a damaged copy of write {seq}"));
    }
    Ok(Some(seq))
}

fn note(world: &Shared, event: String) {
    tracing::debug!("{event}");
    let at = tokio::time::Instant::now();
    let mut world = lock(world);
    let at = at.duration_since(world.started).as_millis();
    world.trace.push(format!("{at:>7} ms  {event}"));
}

async fn start_process(world: &Shared, host: usize) {
    let fs = lock(world).hosts[host].fs.clone();
    let config = DiskConfig { inline_writer: true, journal_max_bytes: 256 * 1024, ..DiskConfig::default() };
    let disk = Disk::open(Arc::new(fs), Path::new("/disk"), config).expect("the store opens after a crash");
    let service = Service::new(vec![disk.clone()]);
    let transport = lock(world).network.transport(&address(host));
    let handle = transport
        .serve(&address(host), Arc::new(move |request| service.clone().handle(request)))
        .await
        .expect("serving on the simulated network");
    lock(world).hosts[host].process = Some((disk, handle));
}

/// Power loss on `host`: its process stops (an owner there with it), its
/// disk keeps only what was synced, with torn appends.
fn crash(world: &Shared, host: usize) {
    let mut world = lock(world);
    if let Some((disk, handle)) = world.hosts[host].process.take() {
        disk.abandon();
        drop(handle);
        world.network.take_down(&address(host));
    }
    world.hosts[host].fs.crash(true);
    for (at, owner) in &world.old_owners {
        if *at == host {
            owner.close();
        }
    }
    if world.record.owner == host {
        if let Some(owner) = world.owner.take() {
            owner.close();
        }
    }
    let now = tokio::time::Instant::now();
    world.down.insert(host, now);
    world.report.crashes += 1;
}

fn clients(world: &World, from: usize) -> Vec<(u64, Client<SimTransport>)> {
    let transport = world.network.transport(&address(from));
    (0..world.scenario.copies)
        .map(|index| (component_id(index), Client::new(transport.clone(), address(index))))
        .collect()
}

/// Blocks each component holds: the object's, or its rows of chunks.
fn component_blocks(scenario: &Scenario) -> u64 {
    scenario.erasure.map_or(scenario.blocks, |layout| layout.rows(scenario.blocks))
}

fn component_id(index: usize) -> u64 {
    (1 << 8) | index as u64
}

/// Records statuses in the catalog for the owner at `epoch` on `host`: a
/// host cut off cannot reach the catalog; an owner whose epoch is not the
/// record's is deposed.
/// The owner's hooks: states recorded in the modelled catalog; resyncs run
/// at once (no task queue is modelled); a block cache of a few blocks, so
/// that reads fill, hit and evict under every fault (the checker of what
/// reads return covers the cache).
fn hooks(world: &Shared, persister: Persister, seed: u64, first_owner: bool) -> Hooks {
    let cache = BlockCache::seeded(CACHE_BLOCKS * (BLOCK_SIZE as u64 + 128), seed);
    let (erasure, encrypted) = {
        let mut world = lock(world);
        world.caches.push(cache.clone());
        (world.scenario.erasure, world.scenario.encrypted)
    };
    Hooks {
        persister: Some(persister),
        admission: None,
        cache: Some(cache),
        resync_pace: None,
        first_owner,
        handed_over: false,
        erasure,
        key: encrypted.then_some(KEY),
        rekeyer: None,
    }
}

fn persister(world: &Shared, host: usize, epoch: u64) -> Persister {
    // Weak: the world holds the owner, which holds this.
    let world = Arc::downgrade(world);
    Arc::new(move |statuses: Vec<Status>| {
        let world = world.clone();
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(2)).await;
            let Some(world) = world.upgrade() else {
                return Err(PersistError::Failed("the simulation is over".into()));
            };
            let reachable = {
                let world = lock(&world);
                !world.isolated.contains_key(&host) && !world.down.contains_key(&host)
            };
            if !reachable {
                tokio::time::sleep(Duration::from_millis(100)).await;
                return Err(PersistError::Failed("the catalog is out of reach".into()));
            }
            {
                let mut world = lock(&world);
                if world.record.epoch != epoch {
                    return Err(PersistError::Deposed);
                }
                world.record.states = statuses.clone();
            }
            // Not `since`, wall-clock time: the trace must replay exactly.
            let shown: Vec<String> = statuses
                .iter()
                .map(|status| match status {
                    Status::Active => "active".to_string(),
                    Status::Absent { stale, .. } => format!("away at {stale}"),
                    Status::Resyncing { stale, target } => format!("resyncing {stale} to {target}"),
                })
                .collect();
            note(&world, format!("host {host} records [{}] at epoch {epoch}", shown.join(", ")));
            Ok(())
        })
    })
}

/// The cluster's part: failure detection, ownership, and the owner's
/// tending loop.
async fn cluster(world: Shared) {
    let probing: Arc<Mutex<BTreeSet<(u64, usize)>>> = Arc::default();
    let mut healthy_since: Option<tokio::time::Instant> = None;
    loop {
        tokio::time::sleep(TEND_EVERY).await;
        let now = tokio::time::Instant::now();
        let (owner, record, failed, copies) = {
            let world = lock(&world);
            let healthy = world.writers_done
                && world.owner.as_ref().is_some_and(|owner| {
                    !owner.is_closed() && owner.statuses().iter().all(|status| *status == Status::Active)
                });
            // Done once every copy has been active for longer than any
            // call can wait (so no write still in flight can fail one).
            healthy_since = healthy.then(|| healthy_since.unwrap_or(now));
            let settled = healthy_since.is_some_and(|since| now.duration_since(since) >= SETTLED);
            if settled && world.down.is_empty() && world.isolated.is_empty() {
                return;
            }
            let failed: BTreeSet<usize> = world
                .down
                .iter()
                .chain(world.isolated.iter())
                .filter(|(_, since)| now.duration_since(**since) >= DETECTION)
                .map(|(host, _)| *host)
                .collect();
            (world.owner.clone(), world.record.clone(), failed, world.scenario.copies)
        };
        let owner = match owner {
            Some(owner) if !failed.contains(&record.owner) && !owner.is_closed() => owner,
            _ => {
                // The owner's host is declared failed (or its owner closed):
                // the lowest live host takes the object over.
                let Some(host) =
                    (0..copies).find(|host| !failed.contains(host) && !lock(&world).down.contains_key(host))
                else {
                    continue;
                };
                take_over(&world, host, &record, false).await;
                continue;
            }
        };
        for index in 0..copies {
            let status = owner.statuses()[index].clone();
            if failed.contains(&index) {
                if !matches!(status, Status::Absent { .. }) {
                    owner.fail_component(index);
                }
            } else if matches!(status, Status::Absent { .. }) && !lock(&world).down.contains_key(&index) {
                // Probes run on their own: one that waits for an answer
                // must not hold up failing another component.
                if !probing.lock().expect("probing lock").insert((record.epoch, index)) {
                    continue;
                }
                let (owner, probing, epoch) = (owner.clone(), probing.clone(), record.epoch);
                tokio::spawn(async move {
                    owner.probe(index).await;
                    probing.lock().expect("probing lock").remove(&(epoch, index));
                });
            }
        }
    }
}

/// Host `host` takes the object over from the owner at `record`'s epoch,
/// if the record still names that epoch; returns whether it did.
/// `handed_over`: that owner closed once idle and consented (see
/// `handovers`).
async fn take_over(world: &Shared, host: usize, record: &Record, handed_over: bool) -> bool {
    let epoch = record.epoch + 1;
    {
        // Compare-and-set on the record's epoch.
        let mut world = lock(world);
        if world.record.epoch != record.epoch {
            return false;
        }
        if let Some(owner) = world.owner.take() {
            let previous = world.record.owner;
            world.old_owners.push((previous, owner));
        }
        world.record.owner = host;
        world.record.epoch = epoch;
        world.report.owner_moves += 1;
        world.report.handovers += u64::from(handed_over);
    }
    let how = if handed_over { " (handed over)" } else { "" };
    note(world, format!("host {host} takes the object over at epoch {epoch}{how}"));
    let (components, recorded, blocks) = {
        let world = lock(world);
        (clients(&world, host), world.record.states.clone(), world.scenario.blocks)
    };
    let persist = persister(world, host, epoch);
    let seed = lock(world).report.seed ^ epoch;
    let hooks = Hooks { handed_over, ..hooks(world, persist, seed, false) };
    match Object::recover(epoch, blocks, components, recorded, hooks).await {
        Ok(object) => {
            let mut world = lock(world);
            if world.record.epoch == epoch && !world.down.contains_key(&host) {
                world.owner = Some(object);
            } else {
                object.close();
            }
        }
        Err(error) => note(world, format!("host {host} cannot open the object at epoch {epoch}: {error}")),
    }
    true
}

/// One writer: its own range of blocks, written in order, read back now
/// and then.
async fn writer(world: Shared, index: usize, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let (first, end) = {
        let world = lock(&world);
        let per = world.scenario.blocks / world.scenario.writers as u64;
        (index as u64 * per, (index as u64 + 1) * per)
    };
    let mut seq = 0u64;
    loop {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(1..20))).await;
        let owner = {
            let world = lock(&world);
            if world.stop {
                return;
            }
            world.owner.clone()
        };
        let Some(owner) = owner else { continue };
        let start = rng.gen_range(first..end);
        let count = rng.gen_range(1..=4u64).min(end - start);
        let full_disks = lock(&world).scenario.full_disks;
        if full_disks && rng.gen_bool(0.1) {
            unmap(&world, &owner, index, start, count).await;
            continue;
        }
        if rng.gen_bool(0.25) {
            let (expected, reader) = {
                let world = lock(&world);
                let expected: Vec<BlockHistory> = (start..start + count)
                    .map(|block| world.history.blocks.get(&block).cloned().unwrap_or_default())
                    .collect();
                // With handovers or false suspicions, a third of the reads
                // go to the owner before this one, as from a host that has
                // not heard of the move yet: what it still serves (from its
                // cache, say) must be no older than what this writer was
                // answered since. (No draw otherwise: the other scenarios'
                // seeds replay as they did.)
                let moves = world.scenario.handovers || world.scenario.false_suspicions;
                let stale = moves && rng.gen_bool(0.33);
                let before = world.old_owners.last().map(|(_, owner)| owner.clone());
                (expected, if stale { before.unwrap_or_else(|| owner.clone()) } else { owner.clone() })
            };
            if let Ok(data) = reader.read_at(start * BLOCK_SIZE as u64, count * BLOCK_SIZE as u64).await {
                let mut world = lock(&world);
                world.report.reads_checked += 1;
                let deposed = world.owner.as_ref().is_none_or(|current| !Arc::ptr_eq(current, &reader));
                world.report.reads_via_deposed += u64::from(deposed);
                for (offset, history) in expected.iter().enumerate() {
                    let block = start + offset as u64;
                    let at = offset * BLOCK_SIZE;
                    match decode(block, &data[at..at + BLOCK_SIZE]) {
                        Ok(seen) if history.allows(seen) => {}
                        Ok(seen) => world.report.violations.push(format!(
                            "a read of block {block} returned write {seen:?}; the last acknowledged was {:?} (maybe {:?})",
                            history.acked, history.maybe
                        )),
                        Err(damage) => world.report.violations.push(format!("a read returned damage: {damage}")),
                    }
                }
            }
            continue;
        }
        seq += 1;
        let data: Vec<u8> = (start..start + count).flat_map(|block| pattern(block, seq)).collect();
        {
            // In flight: it may land whatever the answer.
            let mut world = lock(&world);
            for block in start..start + count {
                world.history.blocks.entry(block).or_default().maybe.insert(seq);
            }
        }
        let result = owner.write_at(start * BLOCK_SIZE as u64, Bytes::from(data)).await;
        let world_ref = world.clone();
        let mut world = lock(&world);
        match result {
            Ok(()) => {
                world.report.acknowledged_writes += 1;
                for block in start..start + count {
                    let history = world.history.blocks.entry(block).or_default();
                    history.acked = Some(seq);
                    history.maybe.clear();
                    history.maybe_zeros = false;
                }
                drop(world);
                note(&world_ref, format!("w{index} ack {start}+{count} #{seq}"));
            }
            Err(ObjectError::NoSpace) => {
                // Refused having changed nothing: it must land nowhere.
                world.report.no_space_writes += 1;
                for block in start..start + count {
                    world.history.blocks.entry(block).or_default().maybe.remove(&seq);
                }
                drop(world);
                note(&world_ref, format!("w{index} no space {start}+{count} #{seq}"));
            }
            Err(error) => {
                world.report.failed_writes += 1;
                drop(world);
                note(&world_ref, format!("w{index} fail {start}+{count} #{seq}: {error}"));
            }
        }
    }
}

/// Unmaps blocks `start..start + count` (writer `index`'s own).
async fn unmap(world: &Shared, owner: &Arc<Object<SimTransport>>, index: usize, start: u64, count: u64) {
    for block in start..start + count {
        lock(world).history.blocks.entry(block).or_default().maybe_zeros = true;
    }
    let result = owner.unmap(start * BLOCK_SIZE as u64, count * BLOCK_SIZE as u64).await;
    if result.is_ok() {
        let mut world = lock(world);
        for block in start..start + count {
            let history = world.history.blocks.entry(block).or_default();
            history.acked = None;
            history.maybe.clear();
            history.maybe_zeros = false;
        }
    }
    let outcome = match &result {
        Ok(()) => "ack".to_string(),
        Err(error) => format!("fail: {error}"),
    };
    note(world, format!("w{index} unmap {start}+{count} {outcome}"));
}

/// Faults, one host at a time, with loss bursts on top.
async fn nemesis(world: Shared, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x006e_656d_6573_6973);
    let (duration, copies, crashes, partitions, loss, full_disks, bursts) = {
        let world = lock(&world);
        let scenario = &world.scenario;
        let kinds = (scenario.crashes, scenario.partitions, scenario.full_disks, scenario.loss_bursts);
        (scenario.duration, scenario.copies, kinds.0, kinds.1, scenario.loss_probability, kinds.2, kinds.3)
    };
    let end = tokio::time::Instant::now() + duration;
    while tokio::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(500..3000))).await;
        let host = rng.gen_range(0..copies);
        let outage = Duration::from_millis(rng.gen_range(300..6000));
        match rng.gen_range(0..if full_disks { 4 } else { 3 }) {
            3 => {
                // One disk, or (a third of the time) every disk at once.
                let filled: Vec<usize> = match rng.gen_range(0..3) {
                    0 => (0..copies).collect(),
                    _ => vec![host],
                };
                note(&world, format!("fill the disks of hosts {filled:?} for {outage:?}"));
                for &host in &filled {
                    lock(&world).hosts[host].fs.set_full(true);
                }
                lock(&world).report.disks_filled += 1;
                tokio::time::sleep(outage).await;
                for &host in &filled {
                    lock(&world).hosts[host].fs.set_full(false);
                }
                note(&world, format!("the disks of hosts {filled:?} have room again"));
            }
            0 if crashes => {
                note(&world, format!("crash host {host} for {outage:?}"));
                crash(&world, host);
                tokio::time::sleep(outage).await;
                start_process(&world, host).await;
                lock(&world).down.remove(&host);
                note(&world, format!("host {host} restarted"));
            }
            1 if partitions => {
                note(&world, format!("cut host {host} off for {outage:?}"));
                {
                    let mut world = lock(&world);
                    let others: Vec<String> = (0..copies).map(address).collect();
                    world.network.isolate(&address(host), &others);
                    world.isolated.insert(host, tokio::time::Instant::now());
                    world.report.partitions += 1;
                }
                tokio::time::sleep(outage).await;
                {
                    let mut world = lock(&world);
                    world.network.heal_all();
                    world.isolated.remove(&host);
                }
                note(&world, format!("host {host} reconnected"));
            }
            _ if !bursts => {}
            _ => {
                let burst = rng.gen_range(0.02..0.2);
                note(&world, format!("lose {burst:.2} of messages for {outage:?}"));
                lock(&world).network.set_faults(Faults { loss_probability: burst, ..Faults::default() });
                lock(&world).report.loss_bursts += 1;
                tokio::time::sleep(outage).await;
                lock(&world).network.set_faults(Faults { loss_probability: loss, ..Faults::default() });
            }
        }
    }
}

/// How long an owner asked to hand the object over waits for what it has
/// under way (the node's `HAND_OVER_WAIT` plays this part).
const HAND_OVER_WITHIN: Duration = Duration::from_millis(500);

/// The open owner, if its host is up and reachable, the record, and
/// another such host drawn at random to move the object to.
fn owner_and_another_host(world: &World, rng: &mut StdRng) -> Option<(Arc<Object<SimTransport>>, Record, usize)> {
    let owner = world.owner.clone()?;
    let record = world.record.clone();
    let reachable = |host: &usize| !world.down.contains_key(host) && !world.isolated.contains_key(host);
    let others: Vec<usize> =
        (0..world.scenario.copies).filter(|host| *host != record.owner && reachable(host)).collect();
    if owner.is_closed() || others.is_empty() || !reachable(&record.owner) {
        return None;
    }
    let to = others[rng.gen_range(0..others.len())];
    Some((owner, record, to))
}

/// Now and then, while the nemesis runs, the owner hands the object over
/// to another host that is up and reachable: it closes once idle, and
/// that host opens it at the next epoch without a lease wait, as the
/// node's `OBJECT_HAND_OVER` and the takeover after it do. A handover the
/// owner cannot make in time leaves it as it is.
async fn handovers(world: Shared, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x0068_616e_646f_7665);
    loop {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(200..1500))).await;
        let Some((owner, record, to)) = owner_and_another_host(&lock(&world), &mut rng) else { continue };
        note(&world, format!("hand the object over from host {} to host {to}", record.owner));
        if owner.close_when_idle(HAND_OVER_WITHIN).await {
            take_over(&world, to, &record, true).await;
        } else {
            note(&world, "the owner did not hand the object over".to_string());
        }
    }
}

/// Now and then, while the nemesis runs, the cluster declares the owner's
/// host failed though it is up and reaches every copy (`false_suspicions`):
/// another such host takes the object over at once, waiting out the old
/// owner's cache lease before its first write, and the old owner, which
/// still serves reads meanwhile, hears of the new epoch and closes 0-3 s
/// later.
async fn false_suspicions(world: Shared, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x0073_7573_7065_6374);
    loop {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(1000..4000))).await;
        let Some((owner, record, to)) = owner_and_another_host(&lock(&world), &mut rng) else { continue };
        note(&world, format!("host {} wrongly declared failed: host {to} takes the object over", record.owner));
        if take_over(&world, to, &record, false).await {
            lock(&world).report.false_suspicions += 1;
            let hears_after = Duration::from_millis(rng.gen_range(0..3000));
            let world = world.clone();
            tokio::spawn(async move {
                tokio::time::sleep(hears_after).await;
                note(&world, format!("host {} hears it was deposed and closes the object", record.owner));
                owner.close();
            });
        }
    }
}

async fn simulate(seed: u64, scenario: Scenario) -> Report {
    if let Some(layout) = scenario.erasure {
        assert_eq!(scenario.copies, layout.width(), "an erasure-coded object has a component per chunk of a stripe");
    }
    let network = SimNetwork::new(seed, Faults { loss_probability: scenario.loss_probability, ..Faults::default() });
    let hosts = (0..scenario.copies)
        .map(|host| Host { fs: SimFs::new(seed.wrapping_mul(31).wrapping_add(host as u64)), process: None })
        .collect();
    let world: Shared = Arc::new(Mutex::new(World {
        network: network.clone(),
        scenario: scenario.clone(),
        hosts,
        down: BTreeMap::new(),
        isolated: BTreeMap::new(),
        record: Record { owner: 0, epoch: 0, states: vec![Status::Active; scenario.copies] },
        owner: None,
        old_owners: Vec::new(),
        history: History::default(),
        trace: Vec::new(),
        report: Report { seed, ..Report::default() },
        stop: false,
        writers_done: false,
        started: tokio::time::Instant::now(),
        caches: Vec::new(),
    }));
    let started = tokio::time::Instant::now();
    for host in 0..scenario.copies {
        start_process(&world, host).await;
    }
    // Create the components and open the object, as `object create` does.
    {
        let components = clients(&lock(&world), 0);
        let blocks = component_blocks(&scenario);
        for (id, client) in &components {
            client
                .call(0, Request::Create { component: *id, disk: 0, blocks }, &[])
                .await
                .expect("creating a component on a healthy network");
        }
        let persist = persister(&world, 0, 0);
        let object = Object::recover(
            0,
            scenario.blocks,
            components,
            vec![Status::Active; scenario.copies],
            hooks(&world, persist, seed, true),
        )
        .await
        .expect("opening a new object");
        lock(&world).owner = Some(object);
    }
    let cluster = tokio::spawn(cluster(world.clone()));
    let handing = scenario.handovers.then(|| tokio::spawn(handovers(world.clone(), seed)));
    let suspecting = scenario.false_suspicions.then(|| tokio::spawn(false_suspicions(world.clone(), seed)));
    let writers: Vec<_> = (0..scenario.writers)
        .map(|index| tokio::spawn(writer(world.clone(), index, seed.wrapping_mul(1000).wrapping_add(index as u64))))
        .collect();
    nemesis(world.clone(), seed).await;
    for task in [handing, suspecting].into_iter().flatten() {
        task.abort();
        let _ = task.await;
    }
    // Heal: every host back, no loss; writers go on a little, then stop.
    network.set_faults(Faults::default());
    tokio::time::sleep(Duration::from_secs(2)).await;
    lock(&world).stop = true;
    for writer in writers {
        writer.await.expect("a writer panicked");
    }
    lock(&world).writers_done = true;
    let healed = tokio::time::timeout(Duration::from_secs(600), cluster).await;
    let mut report = check(&world, healed.is_ok()).await;
    {
        let mut world = lock(&world);
        world.owner = None;
        world.old_owners.clear();
        for host in &mut world.hosts {
            host.process = None;
        }
    }
    report.cache_hits = lock(&world).caches.iter().map(|cache| cache.stats().hits).sum();
    report.virtual_seconds = started.elapsed().as_secs_f64();
    report.messages = network.message_counts();
    report
}

/// Reads every copy directly and checks them against the history and
/// against each other (erasure-coded: every block in its data chunk, and
/// every stripe's parity against its data).
async fn check(world: &Shared, healed: bool) -> Report {
    let (owner, components, scenario) = {
        let world = lock(world);
        (world.owner.clone(), clients(&world, 0), world.scenario.clone())
    };
    let mut violations = Vec::new();
    let statuses = owner.as_ref().map(|owner| owner.statuses());
    if !healed {
        violations.push(format!("the object did not heal within 600 s after the faults ended: {statuses:?}"));
    } else if statuses.as_ref().is_none_or(|statuses| statuses.iter().any(|status| *status != Status::Active)) {
        violations.push(format!("the object is not healthy at the end: {statuses:?}"));
    }
    let epoch = lock(world).record.epoch;
    let mut copies = Vec::new();
    for (id, client) in &components {
        match client.read(epoch, *id, 0, component_blocks(&scenario)).await {
            Ok(data) => copies.push(data),
            Err(error) => violations.push(format!("component {id} cannot be read: {error}")),
        }
    }
    let mut world = lock(world);
    let cipher = scenario.encrypted.then(|| Xts::new(&KEY));
    let check_block = |violations: &mut Vec<String>, block: u64, data: &[u8], on: String| {
        let history = world.history.blocks.get(&block).cloned().unwrap_or_default();
        let mut data = data.to_vec();
        if let Some(cipher) = &cipher {
            cipher.decrypt(block, &mut data);
        }
        match decode(block, &data) {
            Ok(seen) if history.allows(seen) => {}
            Ok(seen) => violations.push(format!(
                "{on} block {block} holds write {seen:?}; the last acknowledged was {:?} (maybe {:?})",
                history.acked, history.maybe
            )),
            Err(damage) => violations.push(format!("{on}: {damage}")),
        }
    };
    match scenario.erasure {
        None => {
            for (index, copy) in copies.iter().enumerate() {
                if copy != &copies[0] {
                    let differ: Vec<u64> = (0..scenario.blocks)
                        .filter(|block| {
                            let at = *block as usize * BLOCK_SIZE;
                            copy[at..at + BLOCK_SIZE] != copies[0][at..at + BLOCK_SIZE]
                        })
                        .collect();
                    let held = |copy: &[u8], block: u64| {
                        let at = block as usize * BLOCK_SIZE;
                        decode(block, &copy[at..at + BLOCK_SIZE]).ok().flatten()
                    };
                    let writes: Vec<String> = differ
                        .iter()
                        .map(|&block| format!("{block}: {:?} against {:?}", held(copy, block), held(&copies[0], block)))
                        .collect();
                    violations
                        .push(format!("copy {index} differs from copy 0 in blocks {differ:?} (writes {writes:?})"));
                }
                for block in 0..scenario.blocks {
                    let at = block as usize * BLOCK_SIZE;
                    check_block(&mut violations, block, &copy[at..at + BLOCK_SIZE], format!("copy {index}"));
                }
            }
        }
        Some(layout) if copies.len() == layout.width() => {
            let rows = |component: usize, row: u64, count: u64| {
                &copies[component][row as usize * BLOCK_SIZE..(row + count) as usize * BLOCK_SIZE]
            };
            for block in 0..scenario.blocks {
                let piece = layout.pieces(block, 1)[0];
                let on = format!("component {} row {}", piece.component, piece.row);
                check_block(&mut violations, block, rows(piece.component, piece.row, 1), on);
            }
            for stripe in 0..layout.stripes(scenario.blocks) {
                let row = stripe * layout.chunk_blocks;
                let chunk = |position: usize| rows(layout.component(stripe, position), row, layout.chunk_blocks);
                let data: Vec<&[u8]> = (0..layout.data).map(chunk).collect();
                let parity = layout.encode(&data).expect("chunks of one length");
                for (index, expected) in parity.iter().enumerate() {
                    if chunk(layout.data + index) != &expected[..] {
                        violations.push(format!("stripe {stripe}: parity chunk {index} is not the code of its data"));
                    }
                }
            }
        }
        // A component could not be read: already a violation above.
        Some(_) => {}
    }
    if let Some(owner) = &owner {
        world.report.blocks_resynced = owner.resync_stats.blocks_copied.load(std::sync::atomic::Ordering::Relaxed);
        world.report.full_copies = owner.resync_stats.full_copies.load(std::sync::atomic::Ordering::Relaxed);
        world.report.readmissions = owner.resync_stats.readmissions.load(std::sync::atomic::Ordering::Relaxed);
    }
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    world.trace.hash(&mut hasher);
    for copy in &copies {
        copy.hash(&mut hasher);
    }
    world.report.violations.extend(violations);
    let mut report = std::mem::take(&mut world.report);
    report.trace_hash = hasher.finish();
    report.trace = std::mem::take(&mut world.trace);
    report
}
