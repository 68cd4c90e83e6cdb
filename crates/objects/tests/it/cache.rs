//! The owner's block cache through the object layer: writers and readers
//! on the same blocks never see a block older than a write acknowledged
//! before the read began, while a small cache fills, hits and evicts; a
//! deposed owner does not serve what it cached once a newer owner writes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blockstore::BLOCK_SIZE;
use bytes::Bytes;
use objects::block_cache::BlockCache;
use objects::ec::Layout;
use objects::object::{Hooks, Object};
use objects::owner::Status;
use wire::tcp::TcpTransport;

use crate::object::{components, hosts, Host, BLOCKS};

/// Blocks the writers and readers share: four writers own every fourth.
const HOT: u64 = 24;
const WRITERS: u64 = 4;
const READERS: usize = 4;

/// A block holding its number and a version in every word.
fn versioned(block: u64, version: u64) -> Vec<u8> {
    let word = (block << 40 | version).to_le_bytes();
    word.iter().copied().cycle().take(BLOCK_SIZE).collect()
}

/// The version a block read holds (0: never written); a block that is not
/// one whole versioned block of its own number is an error.
fn version_of(block: u64, data: &[u8]) -> Result<u64, String> {
    if data.iter().all(|byte| *byte == 0) {
        return Ok(0);
    }
    let word = u64::from_le_bytes(data[..8].try_into().unwrap());
    if word >> 40 != block || data != versioned(block, word & ((1 << 40) - 1)) {
        return Err(format!("block {block} holds a torn or foreign block (first word {word:#x})"));
    }
    Ok(word & ((1 << 40) - 1))
}

fn hooks(cache: &Arc<BlockCache>) -> Hooks {
    Hooks { cache: Some(cache.clone()), ..Hooks::default() }
}

fn erasure_hooks(cache: &Arc<BlockCache>, layout: Layout) -> Hooks {
    Hooks { erasure: Some(layout), ..hooks(cache) }
}

/// Room for about a third of the hot blocks: fills, hits and evictions
/// all happen.
fn small_cache(seed: u64) -> Arc<BlockCache> {
    BlockCache::seeded(8 * (BLOCK_SIZE as u64 + 128), seed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_never_see_a_block_older_than_an_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let transport = TcpTransport::new();
    let hosts = hosts(dir.path(), &transport, 2, 100).await;
    let cache = small_cache(7);
    let object = Object::open_with(1, BLOCKS, components(&hosts), 0, hooks(&cache));
    no_stale_reads(object, &cache, 0).await;
}

/// The same on a RAID-5 (2+1) object, whose writes change rows of chunks:
/// the hot blocks straddle two stripes and two data chunks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_of_an_erasure_coded_object_never_see_a_block_older_than_an_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let transport = TcpTransport::new();
    let hosts = hosts(dir.path(), &transport, 3, 100).await;
    let cache = small_cache(8);
    let layout = Layout::new(2, 1);
    let blocks = BLOCKS * layout.data as u64;
    let object = Object::open_with(1, blocks, components(&hosts), 0, erasure_hooks(&cache, layout));
    let base = layout.stripe_blocks() - HOT / 2;
    no_stale_reads(object, &cache, base).await;
}

/// Writers and readers on blocks `base..base + HOT`; fails on any read of
/// a block older than a write acknowledged before the read began (or torn,
/// or never written), and if the cache did not both hit and evict.
async fn no_stale_reads(object: Arc<Object<TcpTransport>>, cache: &BlockCache, base: u64) {
    // Per hot block: the newest version acknowledged, and the newest sent.
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..HOT).map(|_| AtomicU64::new(0)).collect());
    let sent: Arc<Vec<AtomicU64>> = Arc::new((0..HOT).map(|_| AtomicU64::new(0)).collect());
    let violations = Arc::new(Mutex::new(Vec::<String>::new()));
    let deadline = Instant::now() + Duration::from_secs(4);

    let mut tasks = Vec::new();
    for writer in 0..WRITERS {
        let (object, acked, sent) = (object.clone(), acked.clone(), sent.clone());
        tasks.push(tokio::spawn(async move {
            let mut writes = 0u64;
            let mut version = 0;
            while Instant::now() < deadline {
                version += 1;
                // Each writer writes its own blocks, one at a time, so that
                // versions only grow per block.
                for block in (writer..HOT).step_by(WRITERS as usize) {
                    if (block + version) % 3 != 0 {
                        continue;
                    }
                    sent[block as usize].store(version, Ordering::SeqCst);
                    let data = Bytes::from(versioned(base + block, version));
                    object.write_at((base + block) * BLOCK_SIZE as u64, data).await.unwrap();
                    acked[block as usize].store(version, Ordering::SeqCst);
                    writes += 1;
                }
            }
            writes
        }));
    }
    let mut readers = Vec::new();
    for reader in 0..READERS {
        let (object, acked, sent, violations) = (object.clone(), acked.clone(), sent.clone(), violations.clone());
        readers.push(tokio::spawn(async move {
            let mut reads = 0u64;
            let mut at = reader as u64 * 5;
            while Instant::now() < deadline {
                // Mostly single blocks, now and then a run across writers.
                at = (at * 7 + 3) % HOT;
                let count = if at.is_multiple_of(5) { (HOT - at).min(4) } else { 1 };
                let before: Vec<u64> =
                    (at..at + count).map(|block| acked[block as usize].load(Ordering::SeqCst)).collect();
                let data = object.read_at((base + at) * BLOCK_SIZE as u64, count * BLOCK_SIZE as u64).await.unwrap();
                reads += 1;
                // A hit does not wait for anything: let the writers run.
                tokio::task::yield_now().await;
                for (offset, floor) in before.iter().enumerate() {
                    let block = at + offset as u64;
                    let ceiling = sent[block as usize].load(Ordering::SeqCst);
                    let seen = version_of(base + block, &data[offset * BLOCK_SIZE..(offset + 1) * BLOCK_SIZE]);
                    let problem = match seen {
                        Ok(seen) if seen < *floor => {
                            Some(format!("block {block}: read version {seen} after version {floor} was acknowledged"))
                        }
                        Ok(seen) if seen > ceiling => Some(format!("block {block}: version {seen} was never written")),
                        Ok(_) => None,
                        Err(error) => Some(error),
                    };
                    if let Some(problem) = problem {
                        violations.lock().unwrap().push(problem);
                    }
                }
            }
            reads
        }));
    }
    let mut writes = 0;
    for task in tasks {
        writes += task.await.unwrap();
    }
    let mut reads = 0;
    for task in readers {
        reads += task.await.unwrap();
    }
    let stats = cache.stats();
    println!("{writes} writes, {reads} reads; cache: {stats:?}");
    let violations = violations.lock().unwrap();
    assert!(
        violations.is_empty(),
        "{} stale or damaged reads, first: {:?}",
        violations.len(),
        &violations[..5.min(violations.len())]
    );
    // The cache really served reads, and really evicted.
    assert!(stats.hits > 0, "no read of {reads} hit the cache");
    assert!(stats.evictions > 0, "nothing was evicted: {stats:?}");
    assert!(stats.bytes <= stats.capacity, "{stats:?}");
}

/// Copies (raid1, 2 copies), or an erasure-coded object of `layout`: its
/// components' hosts, its blocks, and the hooks of an owner with `cache`.
async fn fixture(dir: &std::path::Path, layout: Option<Layout>) -> (Vec<Host>, u64) {
    let width = layout.map_or(2, |layout| layout.width());
    let hosts = hosts(dir, &TcpTransport::new(), width, 100).await;
    (hosts, BLOCKS * layout.map_or(1, |layout| layout.data as u64))
}

fn owner_hooks(cache: &Arc<BlockCache>, layout: Option<Layout>) -> Hooks {
    Hooks { erasure: layout, ..hooks(cache) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_owner_does_not_serve_what_it_cached() {
    deposed_owner_serves_nothing_stale(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_owner_of_an_erasure_coded_object_does_not_serve_what_it_cached() {
    deposed_owner_serves_nothing_stale(Some(Layout::new(2, 1))).await;
}

/// A first owner that wrote version 1 of block 0 and serves it from its
/// cache.
async fn an_owner_caching_block_0(hosts: &[Host], blocks: u64, layout: Option<Layout>) -> Arc<Object<TcpTransport>> {
    let old_cache = BlockCache::seeded(1 << 20, 1);
    let old = Object::open_with(1, blocks, components(hosts), 0, owner_hooks(&old_cache, layout));
    old.write_at(0, Bytes::from(versioned(0, 1))).await.unwrap();
    for _ in 0..2 {
        assert_eq!(version_of(0, &old.read_at(0, BLOCK_SIZE as u64).await.unwrap()), Ok(1));
    }
    assert!(old_cache.stats().hits >= 1, "the old owner serves block 0 from its cache: {:?}", old_cache.stats());
    old
}

async fn deposed_owner_serves_nothing_stale(layout: Option<Layout>) {
    let dir = tempfile::tempdir().unwrap();
    let (hosts, blocks) = fixture(dir.path(), layout).await;
    let old = an_owner_caching_block_0(&hosts, blocks, layout).await;

    // A new owner takes over (which fences the old one) and writes at once.
    let new_cache = BlockCache::seeded(1 << 20, 2);
    let recorded = vec![Status::Active; hosts.len()];
    let new = Object::recover(2, blocks, components(&hosts), recorded, owner_hooks(&new_cache, layout)).await.unwrap();
    let taken = Instant::now();
    new.write_at(0, Bytes::from(versioned(0, 2))).await.unwrap();
    println!("the new owner's first write was acknowledged {:?} after it took over", taken.elapsed());
    // From then on the old owner must not return version 1: it fails (it
    // is fenced) or, had it still a lease, it would have to be the new data.
    match old.read_at(0, BLOCK_SIZE as u64).await {
        Ok(data) => assert_eq!(version_of(0, &data), Ok(2), "the deposed owner served a stale block"),
        Err(error) => println!("the deposed owner's read fails: {error}"),
    }
    assert_eq!(version_of(0, &new.read_at(0, BLOCK_SIZE as u64).await.unwrap()), Ok(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmapped_blocks_are_not_served_from_the_cache() {
    unmapped_blocks_read_as_zeros(None, 0, 4, 1, 2).await;
}

/// Erasure-coded: an unmap of part of a stripe (written with zeros) and
/// one of whole stripes (their rows deallocated on every component).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmapped_blocks_of_an_erasure_coded_object_are_not_served_from_the_cache() {
    let layout = Layout::new(2, 1);
    let stripe = layout.stripe_blocks();
    // Blocks on both sides of the boundary of stripes 0 and 1.
    unmapped_blocks_read_as_zeros(Some(layout), stripe - 3, 6, 2, 2).await;
    // Stripe 1 whole, and a block of stripes 0 and 2 beside it.
    unmapped_blocks_read_as_zeros(Some(layout), stripe - 1, stripe + 2, 1, stripe).await;
}

/// Writes blocks `first..first + count`, reads them twice (the second time
/// from the cache), unmaps `unmapped` blocks from `first + from`, and reads
/// them all again: the unmapped ones must read as zeros, the rest as
/// written.
async fn unmapped_blocks_read_as_zeros(layout: Option<Layout>, first: u64, count: u64, from: u64, unmapped: u64) {
    let dir = tempfile::tempdir().unwrap();
    let (hosts, blocks) = fixture(dir.path(), layout).await;
    let cache = BlockCache::seeded(1 << 20, 3);
    let object = Object::open_with(1, blocks, components(&hosts), 0, owner_hooks(&cache, layout));
    let data: Vec<u8> = (first..first + count).flat_map(|block| versioned(block, 1)).collect();
    let offset = first * BLOCK_SIZE as u64;
    object.write_at(offset, Bytes::from(data)).await.unwrap();
    // In runs of 4 blocks: a read of more than 32 bypasses the cache.
    let read_all = || async {
        let mut read = Vec::new();
        for run in (first..first + count).step_by(4) {
            let blocks = 4.min(first + count - run);
            read.extend_from_slice(&object.read_at(run * BLOCK_SIZE as u64, blocks * BLOCK_SIZE as u64).await.unwrap());
        }
        read
    };
    for _ in 0..2 {
        read_all().await;
    }
    assert!(cache.stats().hits >= count, "{:?}", cache.stats());
    object.unmap((first + from) * BLOCK_SIZE as u64, unmapped * BLOCK_SIZE as u64).await.unwrap();
    let read = read_all().await;
    let versions: Vec<u64> = (0..count)
        .map(|index| version_of(first + index, &read[index as usize * BLOCK_SIZE..][..BLOCK_SIZE]).unwrap())
        .collect();
    let expected: Vec<u64> = (0..count).map(|index| u64::from(!(from..from + unmapped).contains(&index))).collect();
    assert_eq!(versions, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_refused_write_and_a_new_copy_of_record_reads_fill_and_hit_again() {
    let dir = tempfile::tempdir().unwrap();
    let transport = TcpTransport::new();
    let hosts = hosts(dir.path(), &transport, 1, 100).await;
    let cache = BlockCache::seeded(1 << 20, 4);
    let object = Object::open_with(1, BLOCKS, components(&hosts), 0, hooks(&cache));
    let at = 3 * BLOCK_SIZE as u64;
    object.write_at(at, Bytes::from(versioned(3, 1))).await.unwrap();
    object.read_at(at, BLOCK_SIZE as u64).await.unwrap();

    // The only copy goes away: the write is refused (its mark must still
    // end, or block 3's stripe would never fill again).
    hosts[0].online.store(false, std::sync::atomic::Ordering::SeqCst);
    assert!(object.write_at(at, Bytes::from(versioned(3, 2))).await.is_err());
    hosts[0].online.store(true, std::sync::atomic::Ordering::SeqCst);
    // It comes back as the copy of record: the cache starts over.
    assert!(object.probe(0).await);
    assert_eq!(object.statuses(), vec![Status::Active]);
    let hits = cache.stats().hits;
    for _ in 0..3 {
        let version = version_of(3, &object.read_at(at, BLOCK_SIZE as u64).await.unwrap()).unwrap();
        assert!(version == 1 || version == 2, "block 3 holds version {version}");
    }
    assert_eq!(cache.stats().hits, hits + 2, "the first read after the change fills, the next two hit");
}

/// An owner deposed without knowing it still serves what it cached, within
/// its lease. A new owner that writes nothing hands the object over at
/// once, and the next owner, taking it by that handover, does not wait out
/// a lease before its first write (`Hooks::handed_over`): the owner
/// handing over must have waited it out itself (`close_when_idle`), so the
/// deposed owner never serves its cached block over that write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_deposed_then_handed_over_at_once_serves_nothing_stale() {
    let dir = tempfile::tempdir().unwrap();
    let (hosts, blocks) = fixture(dir.path(), None).await;
    let old = an_owner_caching_block_0(&hosts, blocks, None).await;

    let recorded = vec![Status::Active; hosts.len()];
    let hooks = owner_hooks(&BlockCache::seeded(1 << 20, 2), None);
    let between = Object::recover(2, blocks, components(&hosts), recorded.clone(), hooks).await.unwrap();
    let taken = Instant::now();
    assert!(between.close_when_idle(Duration::from_secs(5)).await, "an idle owner hands over");
    println!("the owner that wrote nothing handed over {:?} after it took over", taken.elapsed());
    let hooks = Hooks { handed_over: true, ..owner_hooks(&BlockCache::seeded(1 << 20, 3), None) };
    let new = Object::recover(3, blocks, components(&hosts), recorded, hooks).await.unwrap();
    new.write_at(0, Bytes::from(versioned(0, 2))).await.unwrap();
    match old.read_at(0, BLOCK_SIZE as u64).await {
        Ok(data) => assert_eq!(version_of(0, &data), Ok(2), "the deposed owner served a stale block"),
        Err(error) => println!("the deposed owner's read fails: {error}"),
    }
    assert_eq!(version_of(0, &new.read_at(0, BLOCK_SIZE as u64).await.unwrap()), Ok(2));
}
