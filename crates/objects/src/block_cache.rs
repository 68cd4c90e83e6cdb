//! The owner's block cache (issue 7): recently read blocks of the objects
//! this host owns, kept in one node-wide [`cache::Cache`] and served again
//! without asking a component. The reasoning behind every rule here is in
//! `docs/design/cache.md`; in short:
//!
//! - **Writes and unmaps** count themselves *started* on their stripes
//!   before they are sent to any component, and when answered (done,
//!   refused, or the object closing) drop their blocks from the cache and
//!   only then count themselves *finished* ([`WriteMark`]).
//! - **A read that misses** takes a [`Ticket`] (every stripe it touches
//!   must have as many writes finished as started) and fills the blocks it
//!   read only if no write started on those stripes since, a check made
//!   under the block's bucket lock ([`cache::Cache::insert_if`]), the lock
//!   a write's removal takes too.
//! - **A hit** is served only within [`LEASE`] of the send of the last
//!   request a copy the owner counts active answered; a new owner takes no
//!   write until a lease has passed since the copies it reached fenced the
//!   old one (so the old one has stopped serving its cache by then). An
//!   object of copies also serves a hit only while its serving lease holds
//!   (`crate::lease`): this one alone is renewed by a copy the new owner
//!   could not reach, and so not fenced.
//! - Each object, and each object again after a resync or after a copy
//!   became the copy of record, reads and fills under a namespace of its
//!   own, so nothing an earlier owner or state filled is served to a read
//!   that begins after the change (one already looking may still find it).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use blockstore::BLOCK_SIZE;
use bytes::{Bytes, BytesMut};
use foldhash::fast::FixedState;

/// How long after a component's last answer cached blocks may be served.
pub const LEASE: Duration = Duration::from_secs(1);
/// Reads longer than this bypass the cache (streaming reads would only
/// push the hot set out).
pub const READ_BLOCKS_MAX: u64 = 32;
/// Write stripes per object: block `b` is in stripe `b % STRIPES`, so
/// small writes hold up the fills of few other blocks (with runs of 32
/// blocks a stripe, four writers on a hot run kept every read of it from
/// filling), and a write of `STRIPES` blocks or more takes them all.
const STRIPES: usize = 256;
/// A write over more blocks than this moves the object to a new namespace
/// instead of removing its blocks one by one.
const REMOVE_BLOCKS_MAX: u64 = 1024;
/// What an entry costs besides its data: key, element, table slot, queue
/// positions (measured by bench/cache.sh, rounded up).
const ENTRY_OVERHEAD: u64 = 128;

/// Namespaces are unique within the process, so two objects (or one object
/// before and after a change of owner) never share a key.
static NEXT_NAMESPACE: AtomicU64 = AtomicU64::new(1);

fn new_namespace() -> u64 {
    NEXT_NAMESPACE.fetch_add(1, Ordering::Relaxed)
}

type Key = (u64, u64);

/// Entries a cache of `capacity` bytes holds when full.
fn items(capacity: u64) -> usize {
    (capacity / (BLOCK_SIZE as u64 + ENTRY_OVERHEAD)).max(1) as usize
}

/// A block weighs its bytes and the entry's overhead.
struct Weight;

impl cache::Weigher<Key, Bytes> for Weight {
    fn weigh(&self, _key: &Key, value: &Bytes) -> u64 {
        value.len() as u64 + ENTRY_OVERHEAD
    }
}

/// The node's block cache, shared by every object it owns.
pub struct BlockCache {
    blocks: cache::Cache<Key, Bytes, Weight, FixedState>,
    /// Blocks found and not found by lookups (the cache counts only
    /// insertions and evictions).
    reads: Reads,
}

/// Hits and misses, apart from the cache's own lines: every reading
/// thread adds to them.
#[derive(Default)]
#[repr(align(64))]
struct Reads {
    hits: AtomicU64,
    misses: AtomicU64,
}

impl Reads {
    fn count(&self, block: Option<Bytes>) -> Option<Bytes> {
        let counter = if block.is_some() { &self.hits } else { &self.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        block
    }
}

/// Hits, misses, fills and evictions, in blocks; the bytes held.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockCacheStats {
    pub hits: u64,
    pub misses: u64,
    pub fills: u64,
    pub evictions: u64,
    pub bytes: u64,
    pub capacity: u64,
}

impl BlockCache {
    /// A cache of at most `capacity` bytes (data and overhead).
    pub fn new(capacity: u64) -> Arc<BlockCache> {
        let seed = std::hash::BuildHasher::hash_one(&foldhash::fast::RandomState::default(), 0u64);
        let blocks = cache::Cache::with(items(capacity), capacity, Weight, FixedState::with_seed(seed)).with_stats();
        Arc::new(BlockCache { blocks, reads: Reads::default() })
    }

    /// As [`BlockCache::new`], in one shard hashing with `seed`: the same
    /// operations evict the same blocks every run, on any machine (the
    /// simulator replays by seed).
    pub fn seeded(capacity: u64, seed: u64) -> Arc<BlockCache> {
        let blocks =
            cache::Cache::with_shards(1, items(capacity), capacity, Weight, FixedState::with_seed(seed)).with_stats();
        Arc::new(BlockCache { blocks, reads: Reads::default() })
    }

    pub fn stats(&self) -> BlockCacheStats {
        let stats = self.blocks.stats();
        BlockCacheStats {
            hits: self.reads.hits.load(Ordering::Relaxed),
            misses: self.reads.misses.load(Ordering::Relaxed),
            fills: stats.inserts,
            evictions: stats.evictions,
            bytes: self.blocks.weight(),
            capacity: self.blocks.capacity(),
        }
    }
}

/// Padded: neighbouring blocks' stripes are written by different writers.
#[derive(Default)]
#[repr(align(64))]
struct Stripe {
    started: AtomicU64,
    finished: AtomicU64,
}

/// One object's view of the block cache.
pub(crate) struct ObjectCache {
    shared: Arc<BlockCache>,
    namespace: AtomicU64,
    stripes: [Stripe; STRIPES],
    /// When (ms after `origin`) the last request a component answered was
    /// sent; 0: none yet.
    answered: AtomicU64,
    /// The object is closed: it serves no more hits.
    closed: AtomicBool,
    origin: tokio::time::Instant,
}

/// What a read that missed saw: the namespace, and how many writes had
/// started on each stripe it touches (all of them finished).
pub(crate) struct Ticket {
    namespace: u64,
    started: Vec<(usize, u64)>,
}

/// The stripes of blocks `first..first + count`, each once.
fn stripes_of(first: u64, count: u64) -> impl Iterator<Item = usize> {
    let (first, count) = if count >= STRIPES as u64 { (0, STRIPES as u64) } else { (first, count) };
    (first..first + count).map(|block| (block % STRIPES as u64) as usize)
}

impl ObjectCache {
    /// `origin`: its lease clock's, which the object's serving lease
    /// shares (one clock read per request stamps both).
    pub(crate) fn new(shared: Arc<BlockCache>, origin: tokio::time::Instant) -> Arc<ObjectCache> {
        Arc::new(ObjectCache {
            shared,
            namespace: AtomicU64::new(new_namespace()),
            stripes: std::array::from_fn(|_| Stripe::default()),
            answered: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            origin,
        })
    }

    /// The clock the lease is kept on (ms; never 0).
    pub(crate) fn now(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64 + 1
    }

    /// A component answered a request sent at `sent` (from [`Self::now`]).
    pub(crate) fn answered(&self, sent: u64) {
        self.answered.fetch_max(sent, Ordering::Relaxed);
    }

    /// The object is closed (deposed, deleted, moved): no more hits.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    fn leased(&self) -> bool {
        let answered = self.answered.load(Ordering::Relaxed);
        answered != 0 && !self.closed.load(Ordering::SeqCst) && self.now() < answered + LEASE.as_millis() as u64
    }

    /// Forgets every block cached for the object (they stay in the shared
    /// cache, unreachable, until evicted).
    pub(crate) fn forget(&self) {
        self.namespace.store(new_namespace(), Ordering::SeqCst);
    }

    /// Blocks `first..first + count`, if every one is cached and the lease
    /// holds.
    pub(crate) fn lookup(&self, first: u64, count: u64) -> Option<Bytes> {
        if count > READ_BLOCKS_MAX || !self.leased() {
            return None;
        }
        let namespace = self.namespace.load(Ordering::SeqCst);
        let get = |block: u64| self.shared.reads.count(self.shared.blocks.get(&(namespace, block)));
        if count == 1 {
            return get(first);
        }
        let mut data = BytesMut::with_capacity(count as usize * BLOCK_SIZE);
        for block in first..first + count {
            data.extend_from_slice(&get(block)?);
        }
        Some(data.freeze())
    }

    /// A ticket to fill what a read of `first..first + count` returns, if
    /// no write to its stripes is under way.
    pub(crate) fn ticket(&self, first: u64, count: u64) -> Option<Ticket> {
        if count > READ_BLOCKS_MAX {
            return None;
        }
        let namespace = self.namespace.load(Ordering::SeqCst);
        let mut started = Vec::with_capacity(count as usize);
        for index in stripes_of(first, count) {
            let stripe = &self.stripes[index];
            // `started` first: a write that starts after it is caught by
            // the fill's check (even if it also finishes before the second
            // load and so hides a write still under way); one that
            // finishes between the two loads was answered before the read
            // was sent.
            let begun = stripe.started.load(Ordering::SeqCst);
            if stripe.finished.load(Ordering::SeqCst) != begun {
                return None;
            }
            started.push((index, begun));
        }
        Some(Ticket { namespace, started })
    }

    /// Caches the blocks a read under `ticket` returned, each only if no
    /// write started on the ticket's stripes since it was taken.
    pub(crate) fn fill(&self, ticket: &Ticket, first: u64, data: &Bytes) {
        let unchanged = || {
            ticket.started.iter().all(|(index, begun)| self.stripes[*index].started.load(Ordering::SeqCst) == *begun)
        };
        for (offset, block) in data.chunks(BLOCK_SIZE).enumerate() {
            // A copy: a slice would pin the whole message buffer.
            let value = Bytes::copy_from_slice(block);
            if !self.shared.blocks.insert_if((ticket.namespace, first + offset as u64), value, unchanged) {
                return;
            }
        }
    }

    /// Counts a write or unmap of `first..first + count` started; the mark
    /// returned ends it when dropped.
    pub(crate) fn start_write(self: &Arc<Self>, first: u64, count: u64) -> WriteMark {
        for index in stripes_of(first, count) {
            self.stripes[index].started.fetch_add(1, Ordering::SeqCst);
        }
        WriteMark { cache: self.clone(), first, count }
    }
}

/// A write or unmap under way. Dropped when it is answered (or can no
/// longer be): its blocks leave the cache, then it counts as finished.
pub(crate) struct WriteMark {
    cache: Arc<ObjectCache>,
    first: u64,
    count: u64,
}

impl Drop for WriteMark {
    fn drop(&mut self) {
        if self.count > REMOVE_BLOCKS_MAX {
            self.cache.forget();
        } else {
            let namespace = self.cache.namespace.load(Ordering::SeqCst);
            for block in self.first..self.first + self.count {
                self.cache.shared.blocks.remove(&(namespace, block));
            }
        }
        for index in stripes_of(self.first, self.count) {
            self.cache.stripes[index].finished.fetch_add(1, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(byte: u8) -> Bytes {
        Bytes::from(vec![byte; BLOCK_SIZE])
    }

    fn cache() -> Arc<ObjectCache> {
        let cache = ObjectCache::new(BlockCache::new(1 << 20), tokio::time::Instant::now());
        cache.answered(cache.now());
        cache
    }

    fn fill(cache: &ObjectCache, first: u64, byte: u8) -> bool {
        let Some(ticket) = cache.ticket(first, 1) else { return false };
        cache.fill(&ticket, first, &block(byte));
        cache.lookup(first, 1).is_some()
    }

    #[test]
    fn stripes_cover_a_range_once_each() {
        let stripes = |first, count| stripes_of(first, count).collect::<Vec<usize>>();
        assert_eq!(stripes(3, 2), vec![3, 4]);
        assert_eq!(stripes(STRIPES as u64 - 1, 2), vec![STRIPES - 1, 0], "stripes wrap around");
        assert_eq!(stripes(5, 10_000), (0..STRIPES).collect::<Vec<usize>>());
    }

    #[test]
    fn a_filled_block_is_served_until_a_write_to_it_is_answered() {
        let cache = cache();
        assert!(fill(&cache, 7, 1));
        let mark = cache.start_write(7, 1);
        assert_eq!(cache.lookup(7, 1), Some(block(1)), "the write is not answered yet");
        drop(mark);
        assert_eq!(cache.lookup(7, 1), None);
    }

    #[test]
    fn a_read_that_overlaps_a_write_under_way_does_not_fill() {
        let cache = cache();
        let mark = cache.start_write(40, 1);
        let twin = 40 + STRIPES as u64;
        assert!(cache.ticket(twin, 1).is_none(), "block {twin} shares the write's stripe");
        assert!(!fill(&cache, twin, 1));
        assert!(cache.ticket(39, 2).is_none(), "a read over the block");
        assert!(fill(&cache, 41, 1), "another stripe fills");
        drop(mark);
        assert!(fill(&cache, twin, 2));
    }

    #[test]
    fn a_fill_after_a_write_started_is_dropped() {
        let cache = cache();
        let ticket = cache.ticket(9, 1).unwrap();
        let mark = cache.start_write(9, 1);
        cache.fill(&ticket, 9, &block(1));
        drop(mark);
        assert_eq!(cache.lookup(9, 1), None);
        // Even when the write has finished by the time of the fill.
        cache.fill(&ticket, 9, &block(1));
        assert_eq!(cache.lookup(9, 1), None);
    }

    #[test]
    fn a_hit_needs_the_lease() {
        let cache = ObjectCache::new(BlockCache::new(1 << 20), tokio::time::Instant::now());
        let ticket = cache.ticket(1, 1).unwrap();
        cache.fill(&ticket, 1, &block(1));
        assert_eq!(cache.lookup(1, 1), None, "no component has answered yet");
        cache.answered(cache.now());
        assert_eq!(cache.lookup(1, 1), Some(block(1)));
        std::thread::sleep(LEASE + Duration::from_millis(50));
        assert_eq!(cache.lookup(1, 1), None, "the lease ran out");
    }

    #[test]
    fn a_closed_object_serves_no_hits() {
        let cache = cache();
        assert!(fill(&cache, 4, 1));
        cache.close();
        assert_eq!(cache.lookup(4, 1), None);
    }

    #[test]
    fn forgetting_drops_everything_and_a_large_write_forgets() {
        let cache = cache();
        assert!(fill(&cache, 1, 1) && fill(&cache, 2000, 1));
        cache.forget();
        assert_eq!(cache.lookup(1, 1), None);
        assert!(fill(&cache, 1, 1) && fill(&cache, 2000, 1));
        drop(cache.start_write(0, REMOVE_BLOCKS_MAX + 1));
        assert_eq!(cache.lookup(2000, 1), None);
    }

    #[test]
    fn a_read_of_several_blocks_hits_only_if_all_are_cached() {
        let cache = cache();
        let ticket = cache.ticket(10, 3).unwrap();
        let data: Bytes = [block(1), block(2), block(3)].concat().into();
        cache.fill(&ticket, 10, &data);
        assert_eq!(cache.lookup(10, 3), Some(data));
        assert_eq!(cache.lookup(10, 4), None);
        assert_eq!(cache.lookup(0, READ_BLOCKS_MAX + 1), None);
    }
}
