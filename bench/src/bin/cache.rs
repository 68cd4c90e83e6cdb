//! Tessera's cache (`crates/cache`) against quick_cache (S3-FIFO) and moka
//! (TinyLFU), in one run, on the same request traces:
//! - hit ratio on Zipf 0.8, 1.0 and 1.2 at 0.5% to 10% of the keys, and on
//!   a scan mixed with a hot set;
//! - throughput at 1, 2 and 4 threads for 90/10 and 50/50 read/insert mixes;
//! - bytes of memory per entry beyond the key and value (a counting
//!   allocator measures what filling each cache allocated).
//!
//!
//! ```sh
//! bench/cache.sh [--keys 100000] [--requests 2000000] [--tables hit,throughput,memory]
//! CACHE_BENCH_ALLOCATOR=system bench/cache.sh    # glibc's malloc, not mimalloc
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, Ordering};
use std::time::Instant;

use clap::Parser;
use mimalloc::MiMalloc;

/// Counts the bytes held, to measure each cache's memory per entry, and
/// hands every call to one allocator: mimalloc, which the node links
/// (crates/tessera), or the system's (glibc's malloc) with
/// `CACHE_BENCH_ALLOCATOR=system`. Both caches run on the same one.
struct Counting;

static HELD_BYTES: AtomicI64 = AtomicI64::new(0);
/// Whether allocations are counted: only while memory is measured, so the
/// counter (one atomic every thread adds to) does not slow the throughput
/// runs of a cache that allocates per insert.
static COUNTING: AtomicBool = AtomicBool::new(false);
/// The allocator: 0 until the first allocation asks, then `SYSTEM` or
/// `MIMALLOC`. Threads that ask at once each read the same environment
/// (which this program never changes), so all choose alike, and no block
/// is freed by an allocator other than the one that gave it.
static CHOSEN: AtomicU8 = AtomicU8::new(0);
const SYSTEM: u8 = 1;
const MIMALLOC: u8 = 2;

fn chosen() -> &'static dyn GlobalAlloc {
    let mut chosen = CHOSEN.load(Ordering::Relaxed);
    if chosen == 0 {
        // SAFETY: getenv does not allocate, and the environment is not
        // changed by this program; the string it returns is read at once.
        let system = unsafe {
            let value = libc::getenv(c"CACHE_BENCH_ALLOCATOR".as_ptr());
            !value.is_null() && std::ffi::CStr::from_ptr(value).to_bytes() == b"system"
        };
        chosen = if system { SYSTEM } else { MIMALLOC };
        CHOSEN.store(chosen, Ordering::Relaxed);
    }
    if chosen == SYSTEM {
        &System
    } else {
        &MiMalloc
    }
}

fn allocator_name() -> &'static str {
    chosen();
    if CHOSEN.load(Ordering::Relaxed) == SYSTEM {
        "the system's (glibc malloc)"
    } else {
        "mimalloc"
    }
}

fn count(bytes: i64) {
    if COUNTING.load(Ordering::Relaxed) {
        HELD_BYTES.fetch_add(bytes, Ordering::Relaxed);
    }
}

// SAFETY: every call forwards to the chosen allocator unchanged (always
// the same one: see `CHOSEN`); the counter is only arithmetic on the sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size() as i64);
        unsafe { chosen().alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size() as i64);
        unsafe { chosen().alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(-(layout.size() as i64));
        unsafe { chosen().dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size as i64 - layout.size() as i64);
        unsafe { chosen().realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[derive(Parser)]
struct Args {
    /// Distinct keys in the Zipf traces.
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// Requests per hit-ratio trace.
    #[arg(long, default_value_t = 2_000_000)]
    requests: usize,
    /// Operations per thread in each throughput run.
    #[arg(long, default_value_t = 2_000_000)]
    operations: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Which tables to print: any of hit, throughput, memory.
    #[arg(long, value_delimiter = ',', default_value = "hit,throughput,memory")]
    tables: Vec<String>,
    /// Thread counts for the throughput table.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    threads: Vec<usize>,
    /// Caches to run the throughput table on (tessera, quick_cache, moka), for profiling one alone.
    #[arg(long, value_delimiter = ',', default_value = "tessera,quick_cache,moka,tessera_counting")]
    caches: Vec<String>,
    /// Percent of reads in each throughput mix.
    #[arg(long, value_delimiter = ',', default_value = "90,50")]
    reads: Vec<u64>,
    /// Throughput rounds per cell: the caches take turns, the order
    /// alternating each round; the table gives medians (this machine's
    /// speed drifts by tens of percent from one second to the next).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

/// The three caches behind one face: a u64 -> u64 map of a given entry capacity.
trait Subject: Sync {
    fn new(capacity: usize) -> Self;
    fn get(&self, key: u64) -> Option<u64>;
    fn insert(&self, key: u64, value: u64);
}

/// Tessera's cache as quick_cache's default build: keeping no counts.
struct Tessera(cache::Cache<u64, u64>);
/// Tessera's cache counting insertions and evictions, as the block cache
/// has it do (the block cache counts its hits and misses itself, an atomic
/// add per lookup, not measured here; quick_cache keeps counts only with its
/// `stats` feature, which this bench leaves off).
struct TesseraCounting(cache::Cache<u64, u64>);
struct Quick(quick_cache::sync::Cache<u64, u64>);
struct Moka(moka::sync::Cache<u64, u64>);

impl Subject for Tessera {
    fn new(capacity: usize) -> Self {
        Tessera(cache::Cache::new(capacity))
    }
    fn get(&self, key: u64) -> Option<u64> {
        self.0.get(&key)
    }
    fn insert(&self, key: u64, value: u64) {
        self.0.insert(key, value)
    }
}

impl Subject for TesseraCounting {
    fn new(capacity: usize) -> Self {
        TesseraCounting(cache::Cache::new(capacity).with_stats())
    }
    fn get(&self, key: u64) -> Option<u64> {
        self.0.get(&key)
    }
    fn insert(&self, key: u64, value: u64) {
        self.0.insert(key, value)
    }
}

impl Subject for Quick {
    fn new(capacity: usize) -> Self {
        Quick(quick_cache::sync::Cache::new(capacity))
    }
    fn get(&self, key: u64) -> Option<u64> {
        self.0.get(&key)
    }
    fn insert(&self, key: u64, value: u64) {
        self.0.insert(key, value)
    }
}

impl Subject for Moka {
    fn new(capacity: usize) -> Self {
        Moka(moka::sync::Cache::new(capacity as u64))
    }
    fn get(&self, key: u64) -> Option<u64> {
        self.0.get(&key)
    }
    fn insert(&self, key: u64, value: u64) {
        self.0.insert(key, value)
    }
}

/// xorshift64*: a fixed, fast source of numbers, so every cache sees the same trace.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Samples ranks 0..keys with probability proportional to 1/(rank+1)^s, by
/// inverting the cumulative distribution. Ranks are scattered over the key
/// space so that popularity is not key order.
struct Zipf {
    cumulative: Vec<f64>,
}

impl Zipf {
    fn new(keys: u64, exponent: f64) -> Self {
        let mut total = 0.0;
        let cumulative = (1..=keys)
            .map(|rank| {
                total += 1.0 / (rank as f64).powf(exponent);
                total
            })
            .collect::<Vec<_>>();
        Zipf { cumulative: cumulative.iter().map(|sum| sum / total).collect() }
    }

    fn sample(&self, random: &mut Random) -> u64 {
        let point = random.unit();
        let rank = self.cumulative.partition_point(|sum| *sum < point) as u64;
        rank.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }
}

fn zipf_trace(keys: u64, exponent: f64, requests: usize, seed: u64) -> Vec<u64> {
    let zipf = Zipf::new(keys, exponent);
    let mut random = Random(seed | 1);
    (0..requests).map(|_| zipf.sample(&mut random)).collect()
}

/// 70% of requests go to a hot set of `hot` keys, 30% walk a scan of keys
/// never seen before: a cache that lets the scan through keeps the hot set.
fn scan_trace(hot: u64, requests: usize, seed: u64) -> Vec<u64> {
    let mut random = Random(seed | 1);
    let mut scan = 1u64 << 40;
    (0..requests)
        .map(|_| {
            if random.next() % 10 < 7 {
                random.next() % hot
            } else {
                scan += 1;
                scan
            }
        })
        .collect()
}

fn hit_ratio<C: Subject>(trace: &[u64], capacity: usize) -> f64 {
    let cache = C::new(capacity);
    let mut hits = 0usize;
    for &key in trace {
        if cache.get(key).is_some() {
            hits += 1;
        } else {
            cache.insert(key, key);
        }
    }
    hits as f64 / trace.len() as f64
}

/// Million operations per second over `threads` threads, each with its own
/// slice of a Zipf 1.0 trace; `read_percent` of operations are reads (a
/// miss is not followed by an insert: the mix is what it says).
fn throughput<C: Subject>(trace: &[u64], capacity: usize, threads: usize, read_percent: u64, operations: usize) -> f64 {
    let cache = C::new(capacity);
    for &key in &trace[..capacity.min(trace.len())] {
        cache.insert(key, key);
    }
    let started = Instant::now();
    std::thread::scope(|scope| {
        for thread in 0..threads {
            let cache = &cache;
            scope.spawn(move || {
                let mut random = Random(0x1234_5678 + thread as u64);
                let offset = thread * 7919;
                for index in 0..operations {
                    let key = trace[(offset + index) % trace.len()];
                    if random.next() % 100 < read_percent {
                        black_box(cache.get(key));
                    } else {
                        cache.insert(key, key);
                    }
                }
            });
        }
    });
    (threads * operations) as f64 / started.elapsed().as_secs_f64() / 1e6
}

/// Bytes allocated per entry kept, beyond the 16 of a u64 key and value,
/// once `entries` keys fill a cache of that capacity; and the entries kept.
fn overhead<C: Subject>(entries: usize) -> (f64, usize) {
    COUNTING.store(true, Ordering::SeqCst);
    let before = HELD_BYTES.load(Ordering::Relaxed);
    let cache = C::new(entries);
    for key in 0..entries as u64 {
        cache.insert(key.wrapping_mul(0x9E37_79B9_7F4A_7C15), key);
    }
    // Let every cache settle what it buffered (moka applies writes
    // lazily), and count what it holds: a cache that kept fewer than it
    // was given would look smaller per entry than it is.
    let kept = (0..entries as u64).filter(|key| cache.get(key.wrapping_mul(0x9E37_79B9_7F4A_7C15)).is_some()).count();
    let held = HELD_BYTES.load(Ordering::Relaxed) - before;
    drop(cache);
    COUNTING.store(false, Ordering::SeqCst);
    (held as f64 / kept as f64 - 16.0, kept)
}

fn main() {
    let args = Args::parse();
    println!("Allocator: {} (CACHE_BENCH_ALLOCATOR=system for glibc's malloc)", allocator_name());
    let wanted = |table: &str| args.tables.iter().any(|name| name == table);
    if wanted("hit") {
        hit_ratios(&args);
    }
    if wanted("throughput") {
        throughputs(&args);
    }
    if wanted("memory") {
        memory();
    }
}

fn hit_ratios(args: &Args) {
    println!("## Hit ratio ({} keys, {} requests per trace; miss → insert)\n", args.keys, args.requests);
    println!("| trace | capacity | tessera | quick_cache | moka | tessera / quick_cache |");
    println!("|---|---|---|---|---|---|");
    for exponent in [0.8, 1.0, 1.2] {
        let trace = zipf_trace(args.keys, exponent, args.requests, args.seed);
        for percent in [0.5, 1.0, 2.0, 5.0, 10.0] {
            let capacity = (args.keys as f64 * percent / 100.0) as usize;
            let ours = hit_ratio::<Tessera>(&trace, capacity);
            let quick = hit_ratio::<Quick>(&trace, capacity);
            let moka = hit_ratio::<Moka>(&trace, capacity);
            println!(
                "| Zipf {exponent} | {percent}% ({capacity}) | {:.2}% | {:.2}% | {:.2}% | {:.3} |",
                ours * 100.0,
                quick * 100.0,
                moka * 100.0,
                ours / quick
            );
        }
    }
    let hot = args.keys / 20;
    let trace = scan_trace(hot, args.requests, args.seed);
    for capacity in [hot as usize, (hot * 2) as usize] {
        let ours = hit_ratio::<Tessera>(&trace, capacity);
        let quick = hit_ratio::<Quick>(&trace, capacity);
        let moka = hit_ratio::<Moka>(&trace, capacity);
        println!(
            "| scan + hot set of {hot} (70% hot) | {capacity} | {:.2}% | {:.2}% | {:.2}% | {:.3} |",
            ours * 100.0,
            quick * 100.0,
            moka * 100.0,
            ours / quick
        );
    }
}

fn throughputs(args: &Args) {
    let capacity = (args.keys / 10) as usize;
    println!(
        "\n## Throughput (million operations/s, median of {} rounds; Zipf 1.0 over {} keys, capacity {capacity}, \
         {} operations per thread)\n",
        args.rounds, args.keys, args.operations
    );
    println!(
        "| threads | reads/inserts | tessera | quick_cache | moka | tessera / quick_cache (median of rounds) | (min-max) \
         | tessera counting | counting / quick_cache (median of rounds) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let trace = zipf_trace(args.keys, 1.0, args.requests, args.seed + 1);
    for &read_percent in &args.reads {
        for &threads in &args.threads {
            let run = |name: &str, measure: fn(&[u64], usize, usize, u64, usize) -> f64| {
                if args.caches.iter().any(|cache| cache == name) {
                    measure(&trace, capacity, threads, read_percent, args.operations)
                } else {
                    f64::NAN
                }
            };
            let (mut ours, mut quick, mut moka, mut ratios) = (vec![], vec![], vec![], vec![]);
            let (mut counting, mut counting_ratios) = (vec![], vec![]);
            for round in 0..args.rounds.max(1) {
                let (tessera, quick_cache) = if round % 2 == 0 {
                    let tessera = run("tessera", throughput::<Tessera>);
                    (tessera, run("quick_cache", throughput::<Quick>))
                } else {
                    let quick_cache = run("quick_cache", throughput::<Quick>);
                    (run("tessera", throughput::<Tessera>), quick_cache)
                };
                ours.push(tessera);
                quick.push(quick_cache);
                ratios.push(tessera / quick_cache);
                let counted = run("tessera_counting", throughput::<TesseraCounting>);
                counting.push(counted);
                counting_ratios.push(counted / quick_cache);
                if round == 0 {
                    // moka is an order of magnitude slower: one round.
                    moka.push(run("moka", throughput::<Moka>));
                }
            }
            let (low, high) = ratios
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(low, high), &ratio| (low.min(ratio), high.max(ratio)));
            println!(
                "| {threads} | {read_percent}/{} | {:.2} | {:.2} | {:.2} | {:.2} | {low:.2}-{high:.2} | {:.2} | {:.2} |",
                100 - read_percent,
                median(&mut ours),
                median(&mut quick),
                median(&mut moka),
                median(&mut ratios),
                median(&mut counting),
                median(&mut counting_ratios),
            );
        }
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn memory() {
    let entries = 1_000_000;
    println!("\n## Memory per entry ({entries} u64 → u64 entries; bytes beyond the 16 of key and value)\n");
    println!("| | tessera | quick_cache | moka |");
    println!("|---|---|---|---|");
    let measured = [overhead::<Tessera>(entries), overhead::<Quick>(entries), overhead::<Moka>(entries)];
    println!("| bytes per entry kept | {:.1} | {:.1} | {:.1} |", measured[0].0, measured[1].0, measured[2].0);
    println!("| entries kept | {} | {} | {} |", measured[0].1, measured[1].1, measured[2].1);
}
