//! 4 KiB random writes and reads through the block client API
//! (`Object::write_at` / `read_at`) for policies none, raid1(2),
//! raid1(3) and none encrypted at rest, side by side with pwrite+fdatasync and pread on a plain file in
//! the same run; then raid1(2) with and without the owner's block cache, on
//! uniform and hot-set reads and a read/write mix; then resync throughput,
//! alone and with writers busy meanwhile (and their latency while it runs).
//!
//! Three component hosts run in this process, each with its own disk
//! directory and component threads serving real TCP on 127.0.0.1; the
//! objects run on an owner thread, as on a node. Every write is durable
//! (fdatasync'd by group commit) on every copy before it is acknowledged,
//! like the file's pwrite+fdatasync.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bench::Latencies;
use blockstore::{Disk, DiskConfig, BLOCK_SIZE};
use bytes::Bytes;
use clap::Parser;
use objects::block_cache::BlockCache;
use objects::component::{Client, Request, Service};
use objects::object::{Hooks, Object};
use objects::owner::Status;
use objects::threads::{ComponentThreads, OwnerThreads};
use wire::tcp::{LocalHandlers, TcpTransport};

#[derive(Parser)]
struct Args {
    /// Seconds per measurement (one policy, one round).
    #[arg(long, default_value_t = 2)]
    seconds: u64,
    /// Rounds per row: the policies take turns, in a rotating order, so a
    /// slow patch of the shared machine hits them alike; the table shows
    /// the median round and the median of the per-round ratios to none.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Operations outstanding (closed loop), comma-separated.
    #[arg(long, default_value = "1,16")]
    depths: String,
    /// Object size in 4 KiB blocks.
    #[arg(long, default_value_t = 65536)]
    blocks: u64,
    /// Blocks written while a copy is away, for the resync measurement.
    #[arg(long, default_value_t = 16384)]
    resync_blocks: u64,
    /// The owner's block cache for the cache rows, in MiB.
    #[arg(long, default_value_t = 64)]
    cache_mib: u64,
    /// Where the disks and the file go (default: the system temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
}

struct Host {
    service: Arc<Service>,
    threads: ComponentThreads,
}

fn start_host(dir: &Path) -> Result<Host> {
    std::fs::create_dir_all(dir)?;
    let disk = Disk::open(fsio::real(), dir, DiskConfig::default()).context("opening a disk")?;
    let service = Service::new(vec![disk]);
    // Registered with no owner threads: the owner reaches every copy over
    // TCP, as an owner on a host of its own would.
    let threads = ComponentThreads::start(service.clone(), "127.0.0.1", 2, &LocalHandlers::default())?;
    Ok(Host { service, threads })
}

struct Row {
    label: String,
    ops_per_second: f64,
    p50: Duration,
    p99: Duration,
}

fn block_data(block: u64) -> Bytes {
    Bytes::from(vec![(block % 251) as u8 + 1; BLOCK_SIZE])
}

/// What the clients do: the share of writes, and whether 90% of the
/// operations go to a hot tenth of the blocks.
#[derive(Clone, Copy)]
struct Mix {
    write_percent: u64,
    hot: bool,
}

const WRITES: Mix = Mix { write_percent: 100, hot: false };
const READS: Mix = Mix { write_percent: 0, hot: false };

/// Runs `depth` closed-loop clients against an object for `seconds`;
/// `salt` picks their random sequences (the same salt, the same blocks).
async fn drive(
    object: Arc<Object<TcpTransport>>,
    depth: usize,
    seconds: u64,
    mix: Mix,
    blocks: u64,
    salt: u64,
) -> (u64, Latencies) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..depth)
        .map(|client| {
            let object = object.clone();
            tokio::spawn(async move {
                let mut latencies = Latencies::default();
                let mut random = RandomBlocks::new(client + (salt as usize) * 1024, blocks);
                while Instant::now() < deadline {
                    let mut block = random.next_block();
                    if mix.hot && !random.next_block().is_multiple_of(10) {
                        block %= (blocks / 10).max(1);
                    }
                    let started = Instant::now();
                    if random.next_block() % 100 < mix.write_percent {
                        object.write_at(block * BLOCK_SIZE as u64, block_data(block)).await.expect("write");
                    } else {
                        object.read_at(block * BLOCK_SIZE as u64, BLOCK_SIZE as u64).await.expect("read");
                    }
                    latencies.record(started.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut all = Latencies::default();
    for task in tasks {
        all.0.extend(task.await.expect("client task").0);
    }
    (all.0.len() as u64, all)
}

/// Client `client`'s random block numbers below `blocks` (xorshift): the
/// same sequence whichever target it drives.
struct RandomBlocks {
    state: u64,
    blocks: u64,
}

impl RandomBlocks {
    fn new(client: usize, blocks: u64) -> RandomBlocks {
        RandomBlocks { state: (client as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15), blocks }
    }

    fn next_block(&mut self) -> u64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.state % self.blocks
    }
}

/// A plain file of `blocks` blocks, written through and synced, so reads
/// find data (as the objects' reads do) and writes overwrite.
fn filled_file(path: &Path, blocks: u64) -> Result<Arc<std::fs::File>> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().create(true).truncate(true).read(true).write(true).open(path)?;
    file.set_len(blocks * BLOCK_SIZE as u64)?;
    let chunk = vec![7u8; 256 * BLOCK_SIZE];
    for first in (0..blocks).step_by(256) {
        file.write_all_at(&chunk, first * BLOCK_SIZE as u64)?;
    }
    file.sync_all()?;
    Ok(Arc::new(file))
}

fn file_rows(path: &Path, blocks: u64, depth: usize, seconds: u64) -> Result<(Row, Row)> {
    use std::os::unix::fs::FileExt;
    let file = filled_file(path, blocks)?;
    let mut rows = Vec::new();
    for write in [true, false] {
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let threads: Vec<_> = (0..depth)
            .map(|client| {
                let file = file.clone();
                std::thread::spawn(move || {
                    let mut latencies = Latencies::default();
                    let mut random = RandomBlocks::new(client, blocks);
                    let data = vec![3u8; BLOCK_SIZE];
                    let mut buffer = vec![0u8; BLOCK_SIZE];
                    while Instant::now() < deadline {
                        let offset = random.next_block() * BLOCK_SIZE as u64;
                        let started = Instant::now();
                        if write {
                            file.write_all_at(&data, offset).expect("pwrite");
                            file.sync_data().expect("fdatasync");
                        } else {
                            file.read_exact_at(&mut buffer, offset).expect("pread");
                        }
                        latencies.record(started.elapsed());
                    }
                    latencies
                })
            })
            .collect();
        let mut all = Latencies::default();
        for thread in threads {
            all.0.extend(thread.join().expect("file thread").0);
        }
        let count = all.0.len() as f64;
        rows.push(Row {
            label: if write { "file pwrite+fdatasync".into() } else { "file pread".into() },
            ops_per_second: count / seconds as f64,
            p50: all.percentile(0.5),
            p99: all.percentile(0.99),
        });
    }
    let read = rows.pop().unwrap();
    let write = rows.pop().unwrap();
    Ok((write, read))
}

/// The hardware's own mirroring cost: each write is a pwrite+fdatasync on
/// two files at once (one by the client, one by a helper thread), answered
/// when both are done, as raid1(2) answers when both copies are durable.
fn mirrored_file_row(dir: &Path, blocks: u64, depth: usize, seconds: u64) -> Result<Row> {
    use std::os::unix::fs::FileExt;
    let (first, second) =
        (filled_file(&dir.join("mirror-a.file"), blocks)?, filled_file(&dir.join("mirror-b.file"), blocks)?);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let threads: Vec<_> = (0..depth)
        .map(|client| {
            let (first, second) = (first.clone(), second.clone());
            std::thread::spawn(move || {
                let (to_helper, helper_gets) = std::sync::mpsc::channel::<u64>();
                let (helper_done, from_helper) = std::sync::mpsc::channel::<()>();
                let helper = std::thread::spawn(move || {
                    let data = vec![3u8; BLOCK_SIZE];
                    for offset in helper_gets {
                        second.write_all_at(&data, offset).expect("pwrite");
                        second.sync_data().expect("fdatasync");
                        helper_done.send(()).expect("client gone");
                    }
                });
                let mut latencies = Latencies::default();
                let mut random = RandomBlocks::new(client, blocks);
                let data = vec![3u8; BLOCK_SIZE];
                while Instant::now() < deadline {
                    let offset = random.next_block() * BLOCK_SIZE as u64;
                    let started = Instant::now();
                    to_helper.send(offset).expect("helper gone");
                    first.write_all_at(&data, offset).expect("pwrite");
                    first.sync_data().expect("fdatasync");
                    from_helper.recv().expect("helper gone");
                    latencies.record(started.elapsed());
                }
                drop(to_helper);
                helper.join().expect("helper thread");
                latencies
            })
        })
        .collect();
    let mut all = Latencies::default();
    for thread in threads {
        all.0.extend(thread.join().expect("file thread").0);
    }
    Ok(Row {
        label: "2 files pwrite+fdatasync at once".into(),
        ops_per_second: all.0.len() as f64 / seconds as f64,
        p50: all.percentile(0.5),
        p99: all.percentile(0.99),
    })
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

fn main() -> Result<()> {
    let args = Args::parse();
    let depths: Vec<usize> =
        args.depths.split(',').map(|depth| depth.trim().parse().context("--depths: numbers")).collect::<Result<_>>()?;
    let base = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!("tessera-object-io-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = run(&args, &depths, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run(args: &Args, depths: &[usize], dir: &Path) -> Result<()> {
    let hosts: Vec<Host> = (0..3).map(|index| start_host(&dir.join(format!("host{index}")))).collect::<Result<_>>()?;
    let owners = OwnerThreads::start(1, None)?;
    let main_runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let blocks = args.blocks;
    // The last: `none` encrypted at rest (XTS-AES-256 at the owner), its
    // one copy on the same host as `none`'s.
    let policies: [(&str, usize); 4] = [("none", 1), ("raid1(2)", 2), ("raid1(3)", 3), ("none, encrypted", 1)];
    let key = objects::crypt::DataKey(std::array::from_fn(|index| (index as u8).wrapping_mul(31).wrapping_add(7)));
    let mut objects = Vec::new();
    for (index, (label, copies)) in policies.iter().enumerate() {
        let copies = *copies;
        let hooks = Hooks { key: label.ends_with("encrypted").then(|| key.clone()), ..Hooks::default() };
        let addresses: Vec<(u64, String)> = (0..copies)
            .map(|copy| (((index as u64 + 1) << 8) | copy as u64, hosts[copy].threads.addresses()[0].clone()))
            .collect();
        objects.push(filled_object(&owners, &main_runtime, addresses, blocks, hooks)?);
    }
    println!(
        "# 4 KiB random I/O, {} rounds of {} s per policy and row (taking turns), {} MiB objects; one owner thread, 2 component threads per host",
        args.rounds,
        args.seconds,
        (blocks * BLOCK_SIZE as u64) >> 20
    );
    println!();
    println!("| workload | outstanding | target | IOPS (median round) | p50 | p99 | vs none (median of rounds) | vs none (min-max) | vs file |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let rounds = args.rounds.max(1);
    for &depth in depths {
        let (file_write, file_read) = file_rows(&dir.join("plain.file"), blocks, depth, args.seconds)?;
        for write in [true, false] {
            // rounds[policy][round]
            let mut measured: Vec<Vec<(f64, Latencies)>> = policies.iter().map(|_| Vec::new()).collect();
            for round in 0..rounds {
                for turn in 0..policies.len() {
                    let policy = (turn + round) % policies.len();
                    let object = objects[policy].clone();
                    let seconds = args.seconds;
                    let (count, latencies) = main_runtime.block_on(owners.run(0, move |_| async move {
                        drive(object, depth, seconds, if write { WRITES } else { READS }, blocks, 0).await
                    }))?;
                    measured[policy].push((count as f64 / seconds as f64, latencies));
                }
            }
            let file = if write { &file_write } else { &file_read };
            let workload = if write { "write" } else { "read" };
            for (policy, (label, _)) in policies.iter().enumerate() {
                let ratios: Vec<f64> =
                    (0..rounds).map(|round| measured[policy][round].0 / measured[0][round].0).collect();
                let iops: Vec<f64> = measured[policy].iter().map(|(iops, _)| *iops).collect();
                let mut all = Latencies::default();
                for (_, latencies) in &measured[policy] {
                    all.0.extend_from_slice(&latencies.0);
                }
                let median_iops = median(&iops);
                println!(
                    "| {workload} | {depth} | {label} | {median_iops:.0} | {} µs | {} µs | {:.2} | {:.2}-{:.2} | {:.2} |",
                    all.percentile(0.5).as_micros(),
                    all.percentile(0.99).as_micros(),
                    median(&ratios),
                    ratios.iter().copied().fold(f64::MAX, f64::min),
                    ratios.iter().copied().fold(0.0, f64::max),
                    median_iops / file.ops_per_second
                );
            }
            println!(
                "| {workload} | {depth} | {} | {:.0} | {} µs | {} µs | | | 1.00 |",
                file.label,
                file.ops_per_second,
                file.p50.as_micros(),
                file.p99.as_micros()
            );
            if write {
                // What mirroring costs this machine's disk by itself.
                let mirrored = mirrored_file_row(dir, blocks, depth, args.seconds)?;
                println!(
                    "| write | {depth} | {} | {:.0} | {} µs | {} µs | | | {:.2} |",
                    mirrored.label,
                    mirrored.ops_per_second,
                    mirrored.p50.as_micros(),
                    mirrored.p99.as_micros(),
                    mirrored.ops_per_second / file.ops_per_second
                );
            }
        }
    }
    cache_rows(args, &hosts, &owners, &main_runtime, &objects[1])?;
    resync(args, &hosts, &owners, &main_runtime, &objects[1])?;
    Ok(())
}

/// Creates an object's components at `addresses` (id, component thread)
/// and opens it on owner thread 0 with `hooks`, then fills it, so reads
/// find data.
fn filled_object(
    owners: &OwnerThreads,
    runtime: &tokio::runtime::Runtime,
    addresses: Vec<(u64, String)>,
    blocks: u64,
    hooks: Hooks,
) -> Result<Arc<Object<TcpTransport>>> {
    Ok(runtime.block_on(owners.run(0, move |transport| async move {
        let mut components = Vec::new();
        for (id, address) in addresses {
            let client = Client::new(transport.clone(), address);
            client.call(1, Request::Create { component: id, disk: 0, blocks }, &[]).await.expect("create");
            components.push((id, client));
        }
        let object = Object::open_with(1, blocks, components, 0, hooks);
        let chunk = Bytes::from(vec![9u8; 256 * BLOCK_SIZE]);
        for first in (0..blocks).step_by(256) {
            object.write_at(first * BLOCK_SIZE as u64, chunk.clone()).await.expect("fill");
        }
        object
    }))?)
}

/// raid1(2) read through an owner with a block cache, beside the same
/// object layout without one (rounds taking turns, as above).
fn cache_rows(
    args: &Args,
    hosts: &[Host],
    owners: &OwnerThreads,
    runtime: &tokio::runtime::Runtime,
    uncached: &Arc<Object<TcpTransport>>,
) -> Result<()> {
    let blocks = args.blocks;
    let cache = BlockCache::new(args.cache_mib << 20);
    let addresses: Vec<(u64, String)> =
        (0..2).map(|copy| ((9 << 8) | copy as u64, hosts[copy].threads.addresses()[0].clone())).collect();
    let hooks = Hooks { cache: Some(cache.clone()), ..Hooks::default() };
    let cached = filled_object(owners, runtime, addresses, blocks, hooks)?;
    println!();
    println!(
        "# raid1(2) with a {} MiB block cache on the owner ({} MiB objects) beside raid1(2) without one; 90% of hot-set operations go to a tenth of the blocks",
        args.cache_mib,
        (blocks * BLOCK_SIZE as u64) >> 20
    );
    println!();
    println!("| workload | outstanding | target | IOPS (median round) | p50 | p99 | cached / uncached (median of rounds) | (min-max) | blocks from the cache |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let mixes = [
        ("uniform reads", Mix { write_percent: 0, hot: false }),
        ("hot-set reads", Mix { write_percent: 0, hot: true }),
        ("hot set, 70% reads", Mix { write_percent: 30, hot: true }),
    ];
    let rounds = args.rounds.max(1);
    for depth in [1usize, 16] {
        for (name, mix) in mixes {
            let targets = [uncached.clone(), cached.clone()];
            let mut measured: Vec<Vec<(f64, Latencies)>> = vec![Vec::new(), Vec::new()];
            let mut hits = 0;
            let mut looked_up = 0;
            for round in 0..rounds {
                for turn in 0..2 {
                    let which = (turn + round) % 2;
                    let object = targets[which].clone();
                    let seconds = args.seconds;
                    let before = cache.stats();
                    // A new sequence each round (the same for both): a
                    // repeated one would find the blocks of the rounds before.
                    let salt = 1 + round as u64;
                    let (count, latencies) =
                        runtime
                            .block_on(owners.run(0, move |_| async move {
                                drive(object, depth, seconds, mix, blocks, salt).await
                            }))?;
                    if which == 1 {
                        let after = cache.stats();
                        hits += after.hits - before.hits;
                        looked_up += after.hits + after.misses - before.hits - before.misses;
                    }
                    measured[which].push((count as f64 / seconds as f64, latencies));
                }
            }
            let ratios: Vec<f64> = (0..rounds).map(|round| measured[1][round].0 / measured[0][round].0).collect();
            for (which, label) in ["raid1(2)", "raid1(2) + cache"].iter().enumerate() {
                let iops: Vec<f64> = measured[which].iter().map(|(iops, _)| *iops).collect();
                let mut all = Latencies::default();
                for (_, latencies) in &measured[which] {
                    all.0.extend_from_slice(&latencies.0);
                }
                let (ratio, range, from_cache) = if which == 1 {
                    (
                        format!("{:.2}", median(&ratios)),
                        format!(
                            "{:.2}-{:.2}",
                            ratios.iter().copied().fold(f64::MAX, f64::min),
                            ratios.iter().copied().fold(0.0, f64::max)
                        ),
                        format!("{:.0}%", 100.0 * hits as f64 / looked_up.max(1) as f64),
                    )
                } else {
                    Default::default()
                };
                println!(
                    "| {name} | {depth} | {label} | {:.0} | {} µs | {} µs | {ratio} | {range} | {from_cache} |",
                    median(&iops),
                    all.percentile(0.5).as_micros(),
                    all.percentile(0.99).as_micros(),
                );
            }
        }
    }
    cached.close();
    Ok(())
}

/// Takes raid1(2)'s second host off the network, writes distinct blocks,
/// brings it back on a new address and times the resync.
fn resync(
    args: &Args,
    hosts: &[Host],
    owners: &OwnerThreads,
    runtime: &tokio::runtime::Runtime,
    object: &Arc<Object<TcpTransport>>,
) -> Result<()> {
    hosts[1].threads.stop();
    let count = args.resync_blocks.min(args.blocks);
    let started = Instant::now();
    write_while_away(owners, runtime, object, count, 0)?;
    let degraded_seconds = started.elapsed().as_secs_f64();
    let back = ComponentThreads::start(hosts[1].service.clone(), "127.0.0.1", 2, &LocalHandlers::default())?;
    object.set_address(1, &back.addresses()[0]);
    let copied_before = object.resync_stats.blocks_copied.load(std::sync::atomic::Ordering::Relaxed);
    let started = Instant::now();
    let probing = object.clone();
    anyhow::ensure!(runtime.block_on(owners.run(0, move |_| async move { probing.probe(1).await }))?, "probe failed");
    while object.statuses()[1] != Status::Active {
        anyhow::ensure!(started.elapsed() < Duration::from_secs(600), "resync did not finish in 10 minutes");
        std::thread::sleep(Duration::from_millis(5));
    }
    let seconds = started.elapsed().as_secs_f64();
    let copied = object.resync_stats.blocks_copied.load(std::sync::atomic::Ordering::Relaxed) - copied_before;
    let bytes = copied * BLOCK_SIZE as u64;
    println!();
    println!(
        "resync: raid1(2), {count} distinct blocks written while one copy was away ({degraded_seconds:.1} s degraded); copied {copied} blocks ({} MiB) in {seconds:.2} s: {:.1} MiB/s; copied / written = {:.3}; full copies {}",
        bytes >> 20,
        bytes as f64 / seconds / (1 << 20) as f64,
        copied as f64 / count as f64,
        object.resync_stats.full_copies.load(std::sync::atomic::Ordering::Relaxed)
    );
    resync_under_load(args, hosts, owners, runtime, object, back)
}

/// Writes `count` distinct blocks spread evenly over the object, from
/// block `first` on, 32 at a time, while its copy 1 is away; checks that
/// the copy went absent.
fn write_while_away(
    owners: &OwnerThreads,
    runtime: &tokio::runtime::Runtime,
    object: &Arc<Object<TcpTransport>>,
    count: u64,
    first: u64,
) -> Result<()> {
    let writing = object.clone();
    runtime.block_on(owners.run(0, move |_| async move {
        let stride = (writing.size() / BLOCK_SIZE as u64 / count).max(1);
        for chunk in (0..count).collect::<Vec<_>>().chunks(32) {
            let waits: Vec<_> = chunk
                .iter()
                .map(|index| {
                    let (object, at) = (writing.clone(), first + index * stride);
                    tokio::spawn(async move { object.write_at(at * BLOCK_SIZE as u64, block_data(at + 1)).await })
                })
                .collect();
            for wait in waits {
                wait.await.expect("task").expect("degraded write");
            }
        }
    }))?;
    anyhow::ensure!(matches!(object.statuses()[1], Status::Absent { .. }), "the copy did not go absent");
    Ok(())
}

/// Writers that keep the object busy during a resync.
const LOAD_WRITERS: usize = 4;

/// As [`resync`], with [`LOAD_WRITERS`] closed-loop clients writing random
/// 4 KiB blocks from before the copy comes back until a second after its
/// resync ends: how long the resync takes under that load, and the
/// writes' latency while it runs and once it is over (what healing costs
/// the volume's own I/O, unpaced). `running` is the copy's component
/// threads, stopped here first.
fn resync_under_load(
    args: &Args,
    hosts: &[Host],
    owners: &OwnerThreads,
    runtime: &tokio::runtime::Runtime,
    object: &Arc<Object<TcpTransport>>,
    running: ComponentThreads,
) -> Result<()> {
    running.stop();
    drop(running);
    let count = args.resync_blocks.min(args.blocks);
    write_while_away(owners, runtime, object, count, 1)?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (loading, halt, blocks) = (object.clone(), stop.clone(), args.blocks);
    let load = owners.run(0, move |_| async move {
        let clients: Vec<_> = (0..LOAD_WRITERS)
            .map(|client| {
                let (object, halt) = (loading.clone(), halt.clone());
                tokio::spawn(async move {
                    let mut random = RandomBlocks::new(client + 7 * 1024, blocks);
                    let mut samples: Vec<(Instant, Duration)> = Vec::new();
                    while !halt.load(std::sync::atomic::Ordering::Relaxed) {
                        let block = random.next_block();
                        let started = Instant::now();
                        object.write_at(block * BLOCK_SIZE as u64, block_data(block)).await.expect("write");
                        samples.push((started, started.elapsed()));
                    }
                    samples
                })
            })
            .collect();
        let mut all = Vec::new();
        for client in clients {
            all.extend(client.await.expect("client task"));
        }
        all
    });
    let back = ComponentThreads::start(hosts[1].service.clone(), "127.0.0.1", 2, &LocalHandlers::default())?;
    object.set_address(1, &back.addresses()[0]);
    let copied_before = object.resync_stats.blocks_copied.load(std::sync::atomic::Ordering::Relaxed);
    let watching = object.clone();
    let watch = async move {
        // The writers first run a moment with the copy still away.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let started = Instant::now();
        let probing = watching.clone();
        let probed = owners.run(0, move |_| async move { probing.probe(1).await }).await;
        while probed.as_ref().is_ok_and(|probed| *probed) && watching.statuses()[1] != Status::Active {
            if started.elapsed() > Duration::from_secs(600) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let ended = Instant::now();
        tokio::time::sleep(Duration::from_secs(1)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (started, ended, probed)
    };
    let (samples, (started, ended, probed)) = runtime.block_on(async { tokio::join!(load, watch) });
    let samples = samples?;
    anyhow::ensure!(probed? && object.statuses()[1] == Status::Active, "the resync under load did not finish");
    let copied = object.resync_stats.blocks_copied.load(std::sync::atomic::Ordering::Relaxed) - copied_before;
    let seconds = ended.duration_since(started).as_secs_f64();
    let summary = |during: bool| {
        let mut latencies = Latencies::default();
        let (from, to) = if during { (started, ended) } else { (ended, ended + Duration::from_secs(1)) };
        for (at, took) in &samples {
            if *at >= from && *at < to {
                latencies.record(*took);
            }
        }
        let span = to.duration_since(from).as_secs_f64();
        let done = latencies.0.len();
        format!(
            "{done} writes, {:.0} IOPS, p50 {} µs, p99 {} µs",
            done as f64 / span,
            latencies.percentile(0.5).as_micros(),
            latencies.percentile(0.99).as_micros()
        )
    };
    println!(
        "resync under load: raid1(2), {count} distinct blocks written while one copy was away, {LOAD_WRITERS} clients \
         writing random 4 KiB blocks throughout; copied {copied} blocks ({} MiB) in {seconds:.2} s: {:.1} MiB/s; \
         writes while it ran: {}; in the second after: {}",
        (copied * BLOCK_SIZE as u64) >> 20,
        (copied * BLOCK_SIZE as u64) as f64 / seconds / (1 << 20) as f64,
        summary(true),
        summary(false)
    );
    drop(back);
    Ok(())
}
