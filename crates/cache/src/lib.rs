//! A concurrent cache with three queues, for object reads on their owner
//! (the block cache) and for anything else that wants one: `Cache<K, V>`
//! with a weigher and a capacity in weight (bytes, for the block cache).
//!
//! The structure follows ../shared/specs/cache.md:
//! - **A hash table whose buckets each hold a list of elements and a
//!   mutex**, so threads working on different buckets never contend. A
//!   bucket's list also remembers the hashes of recently evicted keys (the
//!   ghosts), so a lookup and a ghost check are one scan under one lock.
//!   The mutex is a lock word released by a plain store (`lock.rs`); the
//!   word and the first slots fill one cache line (`bucket.rs`).
//! - **Three queues**, S3-FIFO's: *small* (where new keys enter), *main*
//!   (keys that were read again while in small, or that come back soon
//!   after eviction) and *ghost* (hashes of keys evicted from small). Small
//!   and main are rings whose positions are claimed with one atomic
//!   compare-and-swap (`ring.rs`), so threads push and pop at once without
//!   a queue-wide lock. The ghost queue's position is a counter advanced
//!   with one atomic add per ghost; each ghost sits in its key's bucket
//!   with the position it was pushed at, and it has left the queue once
//!   `GHOST_PERCENT` of the estimated items' worth of ghosts came after it.
//!   So pushing a ghost takes no lock but the evicted key's bucket's, which
//!   the eviction holds anyway. A ghost that left stays in its slot until
//!   its key comes back, or until an insertion into its bucket that finds
//!   no empty near slot reuses its slot.
//! - **Each element carries its own lock word** (`Element::state`): the
//!   queue it is in, or removed. Every move between queues and every
//!   removal that can race is a compare-and-swap on it, so two threads that
//!   race on one element (an evictor moving it to main while a writer
//!   replaces it or a remover removes it) find out: exactly one wins, and
//!   the loser drops its claim or retries with the element's new state. An
//!   evictor removes the element it popped under its bucket's lock, which
//!   the others need to remove it, so there a load and a store do.
//! - Two threads inserting the same key meet under the bucket's mutex: the
//!   second replaces the first, so a key is never in the table twice.
//! - The cache is split into a few shards per core by hash, each with the
//!   queues above for its share of the capacity and its own range of the
//!   table's buckets: the queues' counters and weights are shared by every
//!   insertion, and sharding keeps two cores from writing the same ones
//!   (with one shard, 50/50 reads and inserts ran 3-6 times slower than
//!   quick_cache on 2 cores). The table is one, so a key's bucket is found
//!   without reading its shard (`Cache::table`).
//!
//! **Ownership:** an element is owned by exactly one party at a time: the
//! thread that inserted it, until it pushes it into a ring; the ring slot
//! that holds it; or the thread that popped it, until it pushes it again
//! or frees it (`ring::Owned`). A bucket lists an element by a borrowed
//! pointer, read only under the bucket's lock. The owner frees an element
//! only once it is out of its bucket: it took it out itself, under the
//! bucket's lock, or it found it removed (a remover marks an element
//! removed and takes it out of its bucket in one hold of the bucket's
//! lock) and then took the bucket's lock once, to wait for that hold to
//! end. No reference count: sharing costs no atomic instruction.
//!
//! **Invariant:** a key has at most one live element; a live element is in
//! the bucket list of its hash and in the ring its state names; the small
//! and main weights are the sums of their live elements' weights (exactly,
//! once no operation is in flight). A `get` never returns a value older
//! than one whose `insert` (or `remove`) had returned before the `get` began.
//!
//! **Boundary:** this crate knows nothing of objects, blocks or I/O.

mod bucket;
mod lock;
mod ring;

use std::borrow::Borrow;
use std::cell::UnsafeCell;
use std::hash::{BuildHasher, Hash};
use std::ops::Range;
use std::ptr;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use bucket::{tag, List, Slot, View};
use crossbeam_utils::{Backoff, CachePadded};
use lock::BucketLock;
use ring::{Owned, Ring};

/// How much of the capacity one entry takes.
pub trait Weigher<K, V>: Send + Sync {
    fn weigh(&self, key: &K, value: &V) -> u64;
}

impl<K, V, F> Weigher<K, V> for F
where
    F: Fn(&K, &V) -> u64 + Send + Sync,
{
    fn weigh(&self, key: &K, value: &V) -> u64 {
        self(key, value)
    }
}

/// Every entry weighs 1: the capacity is a number of entries.
#[derive(Clone, Copy, Debug, Default)]
pub struct UnitWeigher;

impl<K, V> Weigher<K, V> for UnitWeigher {
    fn weigh(&self, _key: &K, _value: &V) -> u64 {
        1
    }
}

/// Reads that a main-queue element survives eviction passes for (S3-FIFO's
/// two-bit frequency).
const FREQUENCY_MAX: u8 = 3;
/// The small queue's share of the capacity. S3-FIFO's paper uses 10%;
/// tuned on bench/cache.sh with the ghost queue's length below: 10% lost
/// up to 7% of quick_cache's hit ratio on the scan mix, 3% up to 1.5%, 2%
/// up to 0.8% (with the hot set exactly the capacity); 1% (with ghosts for
/// 40% of the items) is at or above it on every trace over four seeds, and
/// above 2% on each (bench/RESULTS.md). A key read twice soon after it
/// came in still reaches main through its ghost.
const SMALL_PERCENT: u64 = 1;
/// Live elements per bucket at the estimated item count; queued ghosts add
/// up to two fifths as many again, and ghosts that left the queue sit in
/// their slots until reused. Short lists keep a lookup to a few compares in
/// one cache line or two.
const ITEMS_PER_BUCKET: usize = 2;
/// Shards per core, at most (each shard has its own queues, weights and
/// range of the table, so threads on different shards share no cache
/// line), and estimated items per shard, at least (a shard too small evicts
/// by its own share rather than by the whole cache's). At the least, a
/// shard's small queue (`SMALL_PERCENT`) holds two or three entries of
/// the average weight: new keys then reach main mostly through their
/// ghosts, which is what bench/cache.sh measured best.
const SHARDS_PER_CORE: usize = 4;
const SHARDS_MAX: usize = 64;
const SHARD_ITEMS_MIN: usize = 256;
/// The ghost queue's length, as a share of the estimated items. Tuned with
/// `SMALL_PERCENT` when the ghost queue was a ring whose length was this
/// share rounded up to a power of two: 50% and 100% gave lower hit ratios,
/// 25% a higher one on Zipf traces but a lower one on the scan mix. Since
/// the length is exactly this share (a shorter queue, by up to half), hit
/// ratios stayed at or above quick_cache's on every Zipf trace of
/// bench/cache.sh, and within the scan mix's usual swing (bench/RESULTS.md).
const GHOST_PERCENT: usize = 40;

/// An element's state, its lock word.
const IN_SMALL: u8 = 0;
const IN_MAIN: u8 = 1;
const REMOVED: u8 = 2;

struct Element<K, V> {
    key: K,
    value: Guarded<V>,
    hash: u64,
    /// At most `u32::MAX`: a heavier entry is not cached.
    weight: u32,
    /// Reads since it entered its queue (or since main's last pass), up to
    /// `FREQUENCY_MAX`.
    frequency: AtomicU8,
    state: AtomicU8,
}

impl<K, V> Element<K, V> {
    fn touch(&self) {
        // A load and a store rather than a read-modify-write: a lost
        // increment under a race costs nothing, a contended RMW on a hot
        // element would cost every reader.
        let frequency = self.frequency.load(Ordering::Relaxed);
        if frequency < FREQUENCY_MAX {
            self.frequency.store(frequency + 1, Ordering::Relaxed);
        }
    }
}

/// An element's value: read (cloned) and replaced only by a thread that
/// holds the mutex of the bucket listing the element, so a writer can
/// replace a value in place, as under a `Mutex<V>` (the bucket's).
struct Guarded<V>(UnsafeCell<V>);

// SAFETY: every access goes through `get` or `replace`, whose callers hold
// the bucket mutex that orders them; like `Mutex<V>`, sharing it across
// threads needs only `V: Send`.
unsafe impl<V: Send> Sync for Guarded<V> {}

impl<V> Guarded<V> {
    /// # Safety
    /// The caller holds the mutex of the bucket that lists the element.
    unsafe fn get(&self) -> &V {
        // SAFETY: per the contract, no `replace` runs meanwhile.
        unsafe { &*self.0.get() }
    }

    /// # Safety
    /// As for `get`.
    unsafe fn replace(&self, value: V) -> V {
        // SAFETY: per the contract, this thread alone reaches the value.
        unsafe { std::mem::replace(&mut *self.0.get(), value) }
    }
}

/// A bucket of the hash table: its list (`bucket.rs`), under its own
/// mutex (`lock.rs`).
type Bucket<K, V> = BucketLock<List<Element<K, V>>>;

/// Insertions and evictions since the cache was made, if it counts them
/// ([`Cache::with_stats`]); zeros if not. Hits and misses are the caller's
/// to count: it sees every answer of `get`, and counting them here would
/// slow every read (see `with_stats`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub inserts: u64,
    pub evictions: u64,
}

const INSERT: usize = 0;
const EVICTION: usize = 1;

/// One shard: three queues and a range of the cache's table, for its share
/// of the keys and of the capacity. Every operation on a key stays within
/// its shard.
struct Shard<K, V> {
    /// The whole cache's table (`Cache::table`): this shard's buckets are
    /// those whose index it is found by.
    table: Arc<[Bucket<K, V>]>,
    table_mask: u64,
    /// This shard's buckets in the table, for audits.
    own: Range<usize>,
    small: Ring<Element<K, V>>,
    main: Ring<Element<K, V>>,
    /// Ghosts pushed so far: the ghost queue's head. A ghost pushed at
    /// position `p` is in the queue while fewer than `ghost_window` were
    /// pushed after it.
    ghosts_pushed: CachePadded<AtomicU64>,
    ghost_window: u64,
    /// Weights of the live elements in each queue. Signed: a remover may
    /// subtract an element's weight a moment before the evictor that moved
    /// it between queues adds it.
    small_weight: CachePadded<AtomicI64>,
    main_weight: CachePadded<AtomicI64>,
    capacity: u64,
    small_capacity: u64,
    /// Insertions and evictions, if `counting`.
    counters: CachePadded<[AtomicU64; 2]>,
    counting: bool,
}

/// A concurrent S3-FIFO cache. See the crate documentation.
pub struct Cache<K, V, W = UnitWeigher, S = foldhash::fast::RandomState> {
    /// Every shard's buckets, one table: a key's bucket and its shard are
    /// both found from this struct's own fields (`locate`), which every
    /// operation reads, rather than from its shard's, which an operation
    /// reads only for its shard's share of the keys: on one thread those
    /// lines fall out of the processor's nearest cache between uses, and
    /// a lookup waited for one before it could even ask for its bucket.
    table: Arc<[Bucket<K, V>]>,
    /// Bits 32 and up of a hash, masked, give its bucket's index; the
    /// index's top bits (above `shard_shift`) give its shard.
    table_mask: u64,
    shard_shift: u32,
    shards: Box<[Shard<K, V>]>,
    /// Each shard's share of the capacity: the heaviest entry cached.
    shard_capacity: u64,
    /// Whether insertions are counted (each shard's `counting` says the
    /// same for its evictions): both kept here, like the table, so an
    /// insertion reads no shard's line to decide.
    counting: bool,
    capacity: u64,
    weigher: W,
    hasher: S,
}

impl<K: Hash + Eq, V: Clone> Cache<K, V> {
    /// A cache of at most `capacity` entries.
    pub fn new(capacity: usize) -> Self {
        Cache::with(capacity, capacity as u64, UnitWeigher, Default::default())
    }
}

impl<K: Hash + Eq, V: Clone, W: Weigher<K, V>> Cache<K, V, W> {
    /// A cache of at most `capacity` weight, sized for about
    /// `estimated_items` entries (the queues hold at most that many, the
    /// ghost queue remembers 40% as many evicted keys).
    pub fn with_weigher(estimated_items: usize, capacity: u64, weigher: W) -> Self {
        Cache::with(estimated_items, capacity, weigher, Default::default())
    }
}

/// The table index of a hash's bucket: its bits from 32 up (the low 32 are
/// its tag), masked to the table (at most 2^32 buckets: `with_shards`).
fn bucket_index(hash: u64, table_mask: u64) -> usize {
    ((hash >> 32) & table_mask) as usize
}

/// The value listed in `bucket` for `key`, if any, marked read if `touch`.
fn lookup<K, V, Q>(bucket: &Bucket<K, V>, hash: u64, key: &Q, touch: bool) -> Option<V>
where
    K: Borrow<Q>,
    V: Clone,
    Q: Eq + ?Sized,
{
    let bucket = bucket.lock();
    bucket.live(tag(hash), |element| element.key.borrow() == key).map(|element| {
        if touch {
            element.touch();
        }
        // SAFETY: this bucket's lock is held (`bucket`).
        unsafe { element.value.get() }.clone()
    })
}

/// Shards for a cache of `estimated_items`: a few per core, each with at
/// least `SHARD_ITEMS_MIN` items (a power of two).
fn shard_count(estimated_items: usize) -> usize {
    let cores = std::thread::available_parallelism().map(|cores| cores.get()).unwrap_or(1);
    let by_cores = (cores * SHARDS_PER_CORE).next_power_of_two().min(SHARDS_MAX);
    let by_items = (estimated_items / SHARD_ITEMS_MIN).max(1);
    let by_items = 1 << (usize::BITS - 1 - by_items.leading_zeros());
    by_cores.min(by_items)
}

impl<K: Hash + Eq, V: Clone, W: Weigher<K, V>, S: BuildHasher> Cache<K, V, W, S> {
    /// A cache with every parameter given, the hasher among them (tests use
    /// a fixed one so that runs repeat).
    pub fn with(estimated_items: usize, capacity: u64, weigher: W, hasher: S) -> Self {
        Cache::with_shards(shard_count(estimated_items), estimated_items, capacity, weigher, hasher)
    }

    /// As [`Cache::with`], in `shards` shards (rounded up to a power of
    /// two, at most 64): one shard makes every decision on the whole
    /// capacity, which the model test relies on. An entry heavier than a
    /// shard's share of the capacity (or than `u32::MAX`) is not cached.
    pub fn with_shards(shards: usize, estimated_items: usize, capacity: u64, weigher: W, hasher: S) -> Self {
        let shards = shards.clamp(1, SHARDS_MAX).next_power_of_two();
        let items = estimated_items.max(1).div_ceil(shards);
        let share = (capacity / shards as u64).max(1);
        // The index has 32 bits of hash (`bucket_index`).
        let shard_buckets = (items / ITEMS_PER_BUCKET).max(16).next_power_of_two();
        let shard_buckets = shard_buckets.min(((1u64 << 32) / shards as u64) as usize);
        let buckets = shards * shard_buckets;
        let table: Arc<[Bucket<K, V>]> = (0..buckets).map(|_| BucketLock::default()).collect();
        let table_mask = buckets as u64 - 1;
        Cache {
            shards: (0..shards)
                .map(|shard| {
                    let own = shard * shard_buckets..(shard + 1) * shard_buckets;
                    Shard::new(Arc::clone(&table), table_mask, own, items, share)
                })
                .collect(),
            table,
            table_mask,
            shard_shift: shard_buckets.trailing_zeros(),
            shard_capacity: share,
            counting: false,
            capacity,
            weigher,
            hasher,
        }
    }

    /// The shard and the bucket of a hash: the bucket index takes the bits
    /// from 32 up, the ghost tag the lowest 32.
    fn locate(&self, hash: u64) -> (&Shard<K, V>, &Bucket<K, V>) {
        let index = bucket_index(hash, self.table_mask);
        (&self.shards[index >> self.shard_shift], &self.table[index])
    }

    /// The value cached for `key`, marking it read (for eviction).
    pub fn get<Q>(&self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let hash = self.hasher.hash_one(key);
        lookup(self.locate(hash).1, hash, key, true)
    }

    /// The value cached for `key`, without counting a read (eviction order
    /// is unchanged).
    pub fn peek<Q>(&self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let hash = self.hasher.hash_one(key);
        lookup(self.locate(hash).1, hash, key, false)
    }

    /// Caches `value` for `key`, replacing any value it had.
    pub fn insert(&self, key: K, value: V) {
        self.insert_if(key, value, || true);
    }

    /// Caches `value` for `key` only if `still_valid()`, called under the
    /// key's bucket lock, says so; returns whether it did. A reader that
    /// filled the value from slower storage passes a check that no write
    /// began since: a writer that removes the key after writing takes the
    /// same lock, so the check and the insertion are one step to it.
    pub fn insert_if(&self, key: K, value: V, still_valid: impl FnOnce() -> bool) -> bool {
        let weight = self.weigher.weigh(&key, &value);
        let hash = self.hasher.hash_one(&key);
        let (shard, bucket) = self.locate(hash);
        let inserted = match u32::try_from(weight) {
            Ok(weight) if u64::from(weight) <= self.shard_capacity => {
                shard.insert_if(bucket, hash, key, value, weight, still_valid)
            }
            _ => {
                // It can never fit: drop any older value so no reader sees it.
                shard.remove(bucket, hash, &key);
                false
            }
        };
        // Counted once the insertion (and any eviction it made) is done: a
        // `stats` meanwhile may see an eviction before its insertion; the
        // counts are exact once no operation is in flight.
        if inserted && self.counting {
            shard.counters[INSERT].fetch_add(1, Ordering::Relaxed);
        }
        inserted
    }

    /// Drops `key`'s value; returns whether there was one.
    pub fn remove<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let hash = self.hasher.hash_one(key);
        let (shard, bucket) = self.locate(hash);
        shard.remove(bucket, hash, key)
    }

    /// Total weight of the cached entries.
    pub fn weight(&self) -> u64 {
        self.shards.iter().map(Shard::weight).sum()
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Number of cached entries (walks every bucket: for reports, not hot paths).
    pub fn len(&self) -> usize {
        let live =
            |bucket: &Bucket<K, V>| bucket.lock().slots().filter(|(_, slot)| matches!(slot, View::Live(_))).count();
        self.table.iter().map(live).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Makes the cache count insertions and evictions (for
    /// [`Cache::stats`]): an atomic add to a counter of the key's shard per
    /// insertion and per eviction. Off by default, as quick_cache's counts
    /// are. Reads are never counted: counting them in their bucket, under
    /// its lock, took a slot's room out of every bucket (bucket.rs), and
    /// behind this switch the check alone cost reads on one thread about a
    /// twentieth of their speed (bench/RESULTS.md).
    pub fn with_stats(mut self) -> Self {
        self.counting = true;
        for shard in self.shards.iter_mut() {
            shard.counting = true;
        }
        self
    }

    /// Counts since the cache was made, if it counts them
    /// ([`Cache::with_stats`]); zeros if not.
    pub fn stats(&self) -> CacheStats {
        let mut sums = [0u64; 2];
        for shard in self.shards.iter() {
            for (sum, counter) in sums.iter_mut().zip(shard.counters.iter()) {
                *sum += counter.load(Ordering::Relaxed);
            }
        }
        CacheStats { inserts: sums[INSERT], evictions: sums[EVICTION] }
    }

    /// Checks the invariants (see the crate documentation) of every shard
    /// of a quiescent cache, for tests: every key live at most once, every
    /// live element in the ring of its state exactly once, the weights
    /// exact and within capacity, no more ghosts queued than the ghost queue's length.
    pub fn audit(&mut self) -> Result<(), String> {
        for (index, shard) in self.shards.iter_mut().enumerate() {
            shard.audit().map_err(|error| format!("shard {index}: {error}"))?;
        }
        Ok(())
    }
}

impl<K: Eq, V: Clone> Shard<K, V> {
    fn new(
        table: Arc<[Bucket<K, V>]>,
        table_mask: u64,
        own: Range<usize>,
        estimated_items: usize,
        capacity: u64,
    ) -> Self {
        Shard {
            table,
            table_mask,
            own,
            small: Ring::new(estimated_items),
            main: Ring::new(estimated_items),
            ghosts_pushed: CachePadded::new(AtomicU64::new(0)),
            ghost_window: (estimated_items * GHOST_PERCENT / 100).max(1) as u64,
            small_weight: CachePadded::new(AtomicI64::new(0)),
            main_weight: CachePadded::new(AtomicI64::new(0)),
            capacity,
            small_capacity: (capacity * SMALL_PERCENT / 100).max(1),
            counters: CachePadded::new(Default::default()),
            counting: false,
        }
    }

    fn weight(&self) -> u64 {
        let weight = self.small_weight.load(Ordering::Relaxed) + self.main_weight.load(Ordering::Relaxed);
        weight.max(0) as u64
    }

    /// The bucket of a hash (as `Cache::locate` finds it).
    fn bucket(&self, hash: u64) -> &Bucket<K, V> {
        &self.table[bucket_index(hash, self.table_mask)]
    }

    /// Whether a ghost pushed at `position` is still in the ghost queue.
    fn ghost_is_queued(&self, position: u64) -> bool {
        // Read under the lock of the bucket that lists the ghost, which the
        // pusher held when it listed it: the head read is at or past it.
        let head = self.ghosts_pushed.load(Ordering::Relaxed);
        head.wrapping_sub(position) <= self.ghost_window
    }

    /// Inserts into `bucket`, the key's (`Cache::locate`). The caller
    /// counts the insertion.
    fn insert_if(
        &self,
        bucket: &Bucket<K, V>,
        hash: u64,
        key: K,
        value: V,
        weight: u32,
        still_valid: impl FnOnce() -> bool,
    ) -> bool {
        let element = {
            let mut bucket = bucket.lock();
            if !still_valid() {
                return false;
            }
            let tag = tag(hash);
            let place = bucket.place(tag, |element| element.key == key, |pushed| !self.ghost_is_queued(pushed));
            // A key replaced by a value of the same weight keeps its place:
            // the value changes in place and counts as a read. Otherwise
            // the key keeps its queue and its reads but goes to the back.
            // A key evicted from small not long ago (a ghost still queued)
            // goes straight to main.
            let (state, frequency) = match place.live {
                Some(position) => {
                    let View::Live(old) = bucket.get(position) else { unreachable!("a live slot") };
                    if old.weight == weight && old.state.load(Ordering::Acquire) != REMOVED {
                        // SAFETY: this bucket's lock is held (`bucket`).
                        let previous = unsafe { old.value.replace(value) };
                        old.touch();
                        drop(bucket);
                        drop(previous);
                        return true;
                    }
                    // Its owner frees it once this hold of the lock ends.
                    let state = self.retire(old).unwrap_or(IN_SMALL);
                    (state, old.frequency.load(Ordering::Relaxed))
                }
                None if place.ghost.is_some_and(|(_, pushed)| self.ghost_is_queued(pushed)) => (IN_MAIN, 0),
                None => (IN_SMALL, 0),
            };
            let element = Owned::new(Element {
                key,
                value: Guarded(UnsafeCell::new(value)),
                hash,
                weight,
                frequency: AtomicU8::new(frequency),
                state: AtomicU8::new(state),
            });
            // Counted before anyone can find it, so a remover never
            // subtracts what was not yet added.
            self.queue_weight(state).fetch_add(weight as i64, Ordering::Relaxed);
            let listed = Slot::Live(element.as_ptr());
            match place.live.or(place.ghost.map(|(position, _)| position)).or(place.left) {
                Some(position) => bucket.set(position, tag, listed),
                None => bucket.add(tag, listed),
            }
            element
        };
        self.enqueue(element);
        self.evict_to_capacity();
        true
    }

    /// Removes from `bucket`, the key's (`Cache::locate`).
    fn remove<Q>(&self, bucket: &Bucket<K, V>, hash: u64, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Eq + ?Sized,
    {
        let mut bucket = bucket.lock();
        let tag = tag(hash);
        let is_key = |slot_tag, view: View<'_, Element<K, V>>| match view {
            View::Live(element) => slot_tag == tag && element.key.borrow() == key,
            _ => false,
        };
        let Some(position) = bucket.find(is_key) else { return false };
        // Marked removed and unlisted in one hold of the lock: its owner
        // frees it once this hold ends (the crate's ownership rule).
        let View::Live(element) = bucket.get(position) else { unreachable!("found live") };
        let removed = self.retire(element).is_some();
        bucket.take(position);
        removed
    }

    fn queue_weight(&self, state: u8) -> &AtomicI64 {
        if state == IN_MAIN {
            &self.main_weight
        } else {
            &self.small_weight
        }
    }

    /// Marks an element removed and takes its weight off its queue; returns
    /// the queue it was in, or `None` if another thread removed it first.
    /// The element itself stays in its ring until an evictor pops and
    /// frees it.
    fn retire(&self, element: &Element<K, V>) -> Option<u8> {
        let mut state = element.state.load(Ordering::Acquire);
        loop {
            if state == REMOVED {
                return None;
            }
            match element.state.compare_exchange(state, REMOVED, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    self.queue_weight(state).fetch_sub(element.weight as i64, Ordering::Relaxed);
                    return Some(state);
                }
                // An evictor moved it from small to main meanwhile: retry from there.
                Err(now) => state = now,
            }
        }
    }

    /// Frees an element this thread owns that another thread marked
    /// removed. That thread marked it and took it out of its bucket in one
    /// hold of the bucket's lock, which may not have ended yet: taking the
    /// lock once waits for it to.
    fn free_removed(&self, element: Owned<Element<K, V>>) {
        drop(self.bucket(element.hash).lock());
        // SAFETY: out of its bucket (above), in no ring (this thread owns
        // it), so no other thread can reach it.
        unsafe { element.free() };
    }

    /// Puts an element into the ring its state names, making room first if
    /// that ring is full.
    fn enqueue(&self, mut element: Owned<Element<K, V>>) {
        let backoff = Backoff::new();
        loop {
            let state = element.state.load(Ordering::Acquire);
            let ring = match state {
                IN_SMALL => &self.small,
                IN_MAIN => &self.main,
                // Removed before it was queued.
                _ => return self.free_removed(element),
            };
            match ring.push(element) {
                Ok(()) => return,
                Err(back) => {
                    element = back;
                    let made_room = if state == IN_SMALL { self.evict_small() } else { self.evict_main() };
                    if !made_room {
                        // Other threads emptied the ring meanwhile: push again.
                        backoff.snooze();
                    }
                }
            }
        }
    }

    fn evict_to_capacity(&self) {
        while self.weight() > self.capacity {
            let small_first = self.small_weight.load(Ordering::Relaxed) > self.small_capacity as i64
                || self.main_weight.load(Ordering::Relaxed) <= 0;
            // Order matters: the other queue is tried only if the first is empty.
            let evict: [fn(&Self) -> bool; 2] =
                if small_first { [Self::evict_small, Self::evict_main] } else { [Self::evict_main, Self::evict_small] };
            if !(evict[0](self) || evict[1](self)) {
                // Both rings are empty: the weight belongs to elements other
                // threads have yet to queue, and they evict after queueing.
                return;
            }
        }
    }

    /// Takes the oldest element of the small queue: read since it came in,
    /// it moves to main; otherwise it is evicted and leaves a ghost.
    /// Returns whether the queue had an element.
    fn evict_small(&self) -> bool {
        let Some(element) = self.small.pop() else { return false };
        let frequency = element.frequency.load(Ordering::Relaxed);
        if frequency > 0 {
            if element.state.compare_exchange(IN_SMALL, IN_MAIN, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                element.frequency.store(frequency - 1, Ordering::Relaxed);
                self.small_weight.fetch_sub(element.weight as i64, Ordering::Relaxed);
                self.main_weight.fetch_add(element.weight as i64, Ordering::Relaxed);
                self.enqueue(element);
            } else {
                // Removed meanwhile.
                self.free_removed(element);
            }
            return true;
        }
        self.evict_popped(element, true);
        true
    }

    /// Takes the oldest element of the main queue: read since its last
    /// pass, it goes round again with one read fewer; otherwise it is
    /// evicted. Returns whether the queue had an element.
    fn evict_main(&self) -> bool {
        let Some(element) = self.main.pop() else { return false };
        let frequency = element.frequency.load(Ordering::Relaxed);
        if frequency > 0 && element.state.load(Ordering::Acquire) == IN_MAIN {
            element.frequency.store(frequency - 1, Ordering::Relaxed);
            if let Err(back) = self.main.push(element) {
                // Other threads filled the ring meanwhile: evict it after all.
                self.evict_popped(back, false);
            }
        } else {
            self.evict_popped(element, false);
        }
        true
    }

    /// Evicts a popped element (leaving its ghost if asked to) and frees it.
    ///
    /// Its bucket's lock is taken first: under it, the element's state can
    /// change only by this thread's hand. Others change it under that lock
    /// (a writer replacing the key, a remover), or as its owner (an evictor
    /// moving it to main), and this thread owns it. So a load and a store
    /// retire it, with no compare-and-swap; and a remover's hold of the lock
    /// has ended, so a removed element can be freed at once.
    fn evict_popped(&self, element: Owned<Element<K, V>>, leave_ghost: bool) {
        {
            let mut bucket = self.bucket(element.hash).lock();
            let state = element.state.load(Ordering::Acquire);
            if state == REMOVED {
                drop(bucket);
                // SAFETY: removed and unlisted under the lock just held, in
                // no ring (this thread owns it): no other thread can reach it.
                return unsafe { element.free() };
            }
            element.state.store(REMOVED, Ordering::Release);
            self.queue_weight(state).fetch_sub(element.weight as i64, Ordering::Relaxed);
            // Listed: an element leaves its bucket in the same hold of the
            // lock that marks it removed.
            let listed = bucket.position_of(element.as_ptr());
            debug_assert!(listed.is_some(), "an element not removed is listed");
            if let Some(position) = listed {
                if leave_ghost {
                    let pushed = self.ghosts_pushed.fetch_add(1, Ordering::Relaxed);
                    bucket.set(position, tag(element.hash), Slot::Ghost(pushed));
                } else {
                    bucket.take(position);
                }
            }
        }
        self.count(EVICTION);
        // SAFETY: out of its bucket (above), in no ring (this thread owns
        // it), so no other thread can reach it.
        unsafe { element.free() };
    }

    fn count(&self, counter: usize) {
        if self.counting {
            self.counters[counter].fetch_add(1, Ordering::Relaxed);
        }
    }

    fn audit(&mut self) -> Result<(), String> {
        let mut in_rings = std::collections::HashMap::new();
        let mut removed_in_rings = 0;
        for (ring, name) in [(&mut self.small, IN_SMALL), (&mut self.main, IN_MAIN)] {
            for element in ring.elements() {
                if in_rings.insert(ptr::from_ref(element), name).is_some() {
                    return Err("an element is queued twice".into());
                }
                let state = element.state.load(Ordering::Relaxed);
                removed_in_rings += usize::from(state == REMOVED);
                if state != REMOVED && state != name {
                    return Err(format!("an element in state {state} sits in queue {name}"));
                }
            }
        }
        let ghost_window = self.ghost_window;
        let ghosts_pushed = *self.ghosts_pushed.get_mut();
        let (mut small, mut main, mut ghosts, mut live) = (0i64, 0i64, 0u64, 0usize);
        for bucket in &self.table[self.own.clone()] {
            let list = bucket.lock();
            if !list.far_is_tidy() {
                return Err("a bucket's far slots are empty, or could be near".into());
            }
            let slots = list.slots().collect::<Vec<_>>();
            for (position, (slot_tag, slot)) in slots.iter().enumerate() {
                let element = match *slot {
                    View::Empty => continue,
                    View::Ghost(pushed) if pushed >= ghosts_pushed => {
                        return Err(format!("a ghost pushed at {pushed}, past the queue's head {ghosts_pushed}"))
                    }
                    View::Ghost(pushed) => {
                        ghosts += u64::from(ghosts_pushed - pushed <= ghost_window);
                        continue;
                    }
                    View::Live(element) => element,
                };
                live += 1;
                if *slot_tag != tag(element.hash) {
                    return Err("a live element's slot has another hash's tag".into());
                }
                let duplicate = slots[..position]
                    .iter()
                    .any(|(_, other)| matches!(other, View::Live(other) if other.key == element.key));
                if duplicate {
                    return Err("a key is live twice in its bucket".into());
                }
                let state = element.state.load(Ordering::Relaxed);
                match in_rings.get(&ptr::from_ref(element)) {
                    Some(&queue) if queue == state => {}
                    _ => return Err(format!("a live element in state {state} is not in that queue")),
                }
                if state == IN_MAIN {
                    main += element.weight as i64;
                } else {
                    small += element.weight as i64;
                }
            }
        }
        if live + removed_in_rings != in_rings.len() {
            return Err(format!("{} elements queued, {live} of them live in the table", in_rings.len()));
        }
        let (small_weight, main_weight) = (*self.small_weight.get_mut(), *self.main_weight.get_mut());
        if (small, main) != (small_weight, main_weight) {
            return Err(format!("weights {small_weight}/{main_weight} recorded, {small}/{main} live"));
        }
        if (small + main) as u64 > self.capacity {
            return Err(format!("weight {} over capacity {}", small + main, self.capacity));
        }
        if ghosts > ghost_window {
            return Err(format!("{ghosts} ghosts queued for a ghost queue of {ghost_window}"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_fills_one_cache_line() {
        assert_eq!(std::mem::size_of::<Bucket<u64, u64>>(), 64);
        assert_eq!(std::mem::align_of::<Bucket<u64, u64>>(), 64);
    }

    fn cache(capacity: usize) -> Cache<u64, u64, UnitWeigher, std::hash::BuildHasherDefault<std::hash::DefaultHasher>> {
        Cache::with_shards(1, capacity * 4, capacity as u64, UnitWeigher, Default::default())
    }

    #[test]
    fn a_value_read_back_is_the_last_one_inserted_and_a_removed_one_is_gone() {
        let mut cache = cache(100);
        cache.insert(1, 10);
        cache.insert(1, 11);
        assert_eq!(cache.get(&1), Some(11));
        assert!(cache.remove(&1));
        assert_eq!(cache.get(&1), None);
        assert!(!cache.remove(&1));
        assert_eq!(cache.len(), 0);
        cache.audit().unwrap();
    }

    #[test]
    fn a_scan_does_not_push_out_keys_that_are_read_again() {
        let mut cache = cache(100);
        for hot in 0..50 {
            cache.insert(hot, hot);
        }
        // Read twice: once in small, so they move to main, where they
        // keep a read in hand.
        for _ in 0..2 {
            for hot in 0..50 {
                assert!(cache.get(&hot).is_some(), "hot key {hot} lost before the scan");
            }
        }
        for scanned in 1000..11_000 {
            cache.insert(scanned, scanned);
        }
        let kept = (0..50).filter(|hot| cache.peek(hot).is_some()).count();
        assert!(kept >= 40, "only {kept} of 50 hot keys survived a scan of 10,000 cold ones");
        cache.audit().unwrap();
    }

    /// Key 7 inserted into a cache of 100 (400 estimated items: a ghost
    /// queue of 160), evicted unread by `cold` new keys, then inserted
    /// again: the queue it comes back to.
    fn queue_on_return_after(cold: u64) -> Option<u8> {
        let mut cache = cache(100);
        cache.insert(7, 7);
        for key in 100..100 + cold {
            cache.insert(key, key);
        }
        assert_eq!(cache.peek(&7), None, "evicted unread from small");
        cache.insert(7, 7);
        cache.audit().unwrap();
        cache.elements_state(&7)
    }

    #[test]
    fn a_key_evicted_from_small_and_inserted_again_soon_goes_to_main() {
        assert_eq!(queue_on_return_after(100), Some(IN_MAIN));
    }

    #[test]
    fn a_key_whose_ghost_has_left_the_ghost_queue_comes_back_to_small() {
        assert_eq!(queue_on_return_after(300), Some(IN_SMALL), "more than 160 ghosts came after 7's");
    }

    #[test]
    fn weight_is_bounded_by_the_capacity_and_oversized_values_are_refused() {
        let mut cache: Cache<u64, Vec<u8>, _> =
            Cache::with_weigher(64, 1000, |_: &u64, value: &Vec<u8>| value.len() as u64);
        cache.insert(1, vec![0; 300]);
        assert!(cache.get(&1).is_some());
        cache.insert(1, vec![0; 2000]);
        assert_eq!(cache.get(&1), None, "the older value must not survive a refused one");
        for key in 0..20 {
            cache.insert(key, vec![0; 100]);
            assert!(cache.weight() <= 1000);
        }
        cache.audit().unwrap();
    }

    #[test]
    fn insert_if_checks_under_the_bucket_lock_and_can_refuse() {
        let cache = cache(10);
        assert!(!cache.insert_if(1, 1, || false));
        assert_eq!(cache.get(&1), None);
        assert!(cache.insert_if(1, 1, || true));
        assert_eq!(cache.get(&1), Some(1));
    }

    #[test]
    fn stats_count_inserts_and_evictions_when_asked_to() {
        for counting in [true, false] {
            let cache = if counting { cache(10).with_stats() } else { cache(10) };
            for key in 0..20 {
                cache.insert(key, key);
            }
            // A value replaced in place counts as an insertion too.
            cache.insert(19, 190);
            let expected = if counting { CacheStats { inserts: 21, evictions: 10 } } else { CacheStats::default() };
            assert_eq!(cache.stats(), expected);
        }
    }

    impl<K: Hash + Eq, V: Clone, W: Weigher<K, V>, S: BuildHasher> Cache<K, V, W, S> {
        fn elements_state(&self, key: &K) -> Option<u8> {
            let hash = self.hasher.hash_one(key);
            let bucket = self.locate(hash).1.lock();
            bucket.live(tag(hash), |element| &element.key == key).map(|element| element.state.load(Ordering::Relaxed))
        }
    }
}
