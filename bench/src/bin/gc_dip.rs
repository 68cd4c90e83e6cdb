//! The throughput cost of in-place garbage collection.
//!
//! The same workload twice, in one run, on the same 3-replica cluster of
//! node processes: concurrent writers overwrite the keys of a replicated map
//! (every write makes an earlier entry obsolete). In one phase the SMR
//! runtime reports obsolete entries every 100 ms, so the log deletes them in
//! place as it goes; in the other it never reports (nothing is collected).
//! The dip is 1 - (writes/s with GC) / (writes/s without).
//!
//!     bench/gc_dip.sh [--seconds 10] [--writers 64] [--value-bytes 1024]

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use bench::LocalCluster;
use clap::Parser;
use sharedlog::client::{ClientConfig, LogClient};
use sharedlog::objects::Map;
use sharedlog::smr::{Runtime, RuntimeConfig};
use sharedlog::types::StreamId;
use wire::tcp::TcpTransport;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    #[arg(long, default_value_t = 64)]
    writers: u64,
    #[arg(long, default_value_t = 1024)]
    value_bytes: usize,
    /// Distinct keys the writers overwrite.
    #[arg(long, default_value_t = 100)]
    keys: u64,
    #[arg(long, default_value = "target/bench-data/gc_dip")]
    dir: PathBuf,
}

struct Phase {
    writes_per_second: f64,
    live_entries: u64,
    deleted_entries: u64,
}

async fn phase(cluster: &LocalCluster, args: &Args, name: &str, gc: bool, client_id: u64) -> Result<Phase> {
    let client = LogClient::new(TcpTransport::new(), ClientConfig::new(cluster.replica_addresses(), client_id));
    let mut config = RuntimeConfig::new(name);
    config.gc_interval = if gc { Duration::from_millis(100) } else { Duration::from_secs(24 * 3600) };
    config.gc_client_id = Some(client_id);
    let runtime = Runtime::new(client.clone(), config);
    let map = runtime.open::<Map<u64, Vec<u8>>>(StreamId::from_name(name)).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let counting = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for writer in 0..args.writers {
        let (map, stop, counting, writes) = (map.clone(), stop.clone(), counting.clone(), writes.clone());
        let (keys, value_bytes) = (args.keys, args.value_bytes);
        tasks.push(tokio::spawn(async move {
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let key = (writer + round * 7919) % keys;
                map.put(key, vec![(round % 251) as u8; value_bytes]).await.expect("put failed during the benchmark");
                round += 1;
                if counting.load(Ordering::Relaxed) {
                    writes.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    counting.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    counting.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await?;
    }
    let status = client.status(&cluster.replica_addresses()[0]).await?;
    // The stream is done with; let it not hold back the next phase.
    client.unregister(client_id).await?;
    Ok(Phase {
        writes_per_second: writes.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64(),
        live_entries: status.live_entries,
        deleted_entries: status.gc_deleted_entries,
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.dir)?;
    let dir = args.dir.canonicalize()?;
    eprintln!("starting 3 log replicas (node processes) under {}", dir.display());
    let cluster = LocalCluster::start(&dir.join("cluster"), 3)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    // GC off first, so the store is not already compacted in its favour.
    let without = runtime.block_on(phase(&cluster, &args, "bench/gc-off", false, 0xB0FF))?;
    let with = runtime.block_on(phase(&cluster, &args, "bench/gc-on", true, 0xB011))?;
    println!(
        "{} writers overwriting {} keys with {} B values, {} s per phase, 3 replicas, fsync on.\n",
        args.writers, args.keys, args.value_bytes, args.seconds
    );
    println!("| phase | writes/s | live entries in the log after | entries collected (cumulative) |");
    println!("|---|---|---|---|");
    println!("| GC off | {:.0} | {} | {} |", without.writes_per_second, without.live_entries, without.deleted_entries);
    println!(
        "| GC on (reports every 100 ms) | {:.0} | {} | {} |",
        with.writes_per_second, with.live_entries, with.deleted_entries
    );
    println!("\nThroughput dip with GC: {:.1}%", 100.0 * (1.0 - with.writes_per_second / without.writes_per_second));
    drop(cluster);
    Ok(())
}
