//! Shared-log append throughput and latency, side by side with a plain file.
//!
//! Tessera: 3 log replicas as real node processes on loopback, fsync on
//! (every Raft append is fdatasynced on every replica before it counts).
//! Reference, in the same run on the same disk: a plain file written the
//! best way a single durable writer can, group commit (one fdatasync for
//! every append waiting). Both see the same offered load: N clients, each
//! keeping W appends outstanding.
//!
//!     bench/log_append.sh                 the whole matrix (about 4 minutes)
//!     bench/log_append.sh --quick         one configuration per table

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use bench::{Latencies, LocalCluster};
use clap::Parser;
use sharedlog::client::{ClientConfig, LogClient};
use sharedlog::types::StreamId;
use wire::tcp::TcpTransport;

#[derive(Parser)]
struct Args {
    /// Seconds measured per configuration (after one second of warm-up).
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// A shorter matrix, for a quick look.
    #[arg(long)]
    quick: bool,
    /// Where the cluster and the reference file live (a real disk, not tmpfs).
    #[arg(long, default_value = "target/bench-data/log_append")]
    dir: PathBuf,
}

#[derive(Clone, Copy)]
struct Load {
    clients: usize,
    payload: usize,
    /// Appends each client keeps outstanding.
    window: usize,
    /// Clients share one log-client instance (its batcher groups their
    /// appends), as threads of one process would.
    shared: bool,
}

struct Measurement {
    appends_per_second: f64,
    p50: Duration,
    p99: Duration,
}

const STREAM: StreamId = StreamId::from_name("bench/append");

/// Runs `body` per client until told to stop, counting completed appends
/// (with their latency) only inside the measured window.
struct Meter {
    stop: AtomicBool,
    counting: AtomicBool,
    count: AtomicU64,
    latencies: Mutex<Latencies>,
}

impl Meter {
    fn new() -> Arc<Meter> {
        Arc::new(Meter {
            stop: AtomicBool::new(false),
            counting: AtomicBool::new(false),
            count: AtomicU64::new(0),
            latencies: Mutex::new(Latencies::default()),
        })
    }

    fn done(&self, elapsed: Duration, local: &mut Latencies) {
        if self.counting.load(Ordering::Relaxed) {
            self.count.fetch_add(1, Ordering::Relaxed);
            local.record(elapsed);
        }
    }

    /// Warm-up, measurement, stop; returns the measured window's length.
    fn run_window(&self, seconds: u64, sleep: impl Fn(Duration)) -> Duration {
        sleep(Duration::from_secs(1));
        self.counting.store(true, Ordering::Relaxed);
        let started = Instant::now();
        sleep(Duration::from_secs(seconds));
        self.counting.store(false, Ordering::Relaxed);
        let elapsed = started.elapsed();
        self.stop.store(true, Ordering::Relaxed);
        elapsed
    }

    fn result(&self, elapsed: Duration) -> Measurement {
        let mut latencies = std::mem::take(&mut *self.latencies.lock().unwrap());
        Measurement {
            appends_per_second: self.count.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64(),
            p50: latencies.percentile(0.50),
            p99: latencies.percentile(0.99),
        }
    }
}

async fn measure_tessera(cluster: &LocalCluster, load: Load, seconds: u64, client_base: u64) -> Measurement {
    let transport = TcpTransport::new();
    let new_client =
        |id: u64| LogClient::new(transport.clone(), ClientConfig::new(cluster.replica_addresses(), client_base + id));
    let shared = new_client(u32::MAX as u64);
    let meter = Meter::new();
    let mut tasks = Vec::new();
    for client in 0..load.clients {
        let log = if load.shared { shared.clone() } else { new_client(client as u64) };
        let meter = meter.clone();
        tasks.push(tokio::spawn(async move {
            let payload = bytes::Bytes::from(vec![0x5a; load.payload]);
            let mut local = Latencies::default();
            let mut outstanding = tokio::task::JoinSet::new();
            while !meter.stop.load(Ordering::Relaxed) {
                while outstanding.len() < load.window {
                    let (log, payload) = (log.clone(), payload.clone());
                    outstanding.spawn(async move {
                        let started = Instant::now();
                        log.append(&[STREAM], payload).await.expect("append failed during the benchmark");
                        started.elapsed()
                    });
                }
                let elapsed = outstanding.join_next().await.expect("one is outstanding").expect("append task");
                meter.done(elapsed, &mut local);
            }
            while outstanding.join_next().await.is_some() {}
            meter.latencies.lock().unwrap().0.extend(local.0);
        }));
    }
    // The measuring clock runs on its own thread so the runtime's workers
    // stay free for the clients.
    let waiter = std::thread::spawn({
        let meter = meter.clone();
        move || meter.run_window(seconds, std::thread::sleep)
    });
    for task in tasks {
        task.await.unwrap();
    }
    let elapsed = waiter.join().unwrap();
    meter.result(elapsed)
}

/// The reference: a plain file, group commit by one syncing thread, the
/// same clients and outstanding appends.
fn measure_plain_file(dir: &Path, load: Load, seconds: u64) -> Measurement {
    use std::io::Write;
    let path = dir.join("plain-file.log");
    let _ = std::fs::remove_file(&path);
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&path).unwrap();
    let (submit, queue) = mpsc::channel::<(Instant, mpsc::Sender<Duration>)>();
    let record = vec![0x5a; load.payload + 16];
    let syncer = std::thread::spawn(move || {
        let mut buffer = Vec::new();
        while let Ok(first) = queue.recv() {
            let mut waiters = vec![first];
            while let Ok(more) = queue.try_recv() {
                waiters.push(more);
            }
            buffer.clear();
            for _ in &waiters {
                buffer.extend_from_slice(&record);
            }
            file.write_all(&buffer).unwrap();
            file.sync_data().unwrap();
            for (started, waiter) in waiters {
                let _ = waiter.send(started.elapsed());
            }
        }
    });
    let meter = Meter::new();
    let threads: Vec<_> = (0..load.clients)
        .map(|_| {
            let (submit, meter) = (submit.clone(), meter.clone());
            std::thread::spawn(move || {
                let mut local = Latencies::default();
                let (done, completions) = mpsc::channel();
                let mut outstanding = 0;
                while !meter.stop.load(Ordering::Relaxed) {
                    while outstanding < load.window {
                        submit.send((Instant::now(), done.clone())).unwrap();
                        outstanding += 1;
                    }
                    let elapsed = completions.recv().unwrap();
                    outstanding -= 1;
                    meter.done(elapsed, &mut local);
                }
                for _ in 0..outstanding {
                    let _ = completions.recv();
                }
                meter.latencies.lock().unwrap().0.extend(local.0);
            })
        })
        .collect();
    drop(submit);
    let elapsed = meter.run_window(seconds, std::thread::sleep);
    for thread in threads {
        thread.join().unwrap();
    }
    syncer.join().unwrap();
    meter.result(elapsed)
}

fn micros(duration: Duration) -> String {
    if duration >= Duration::from_millis(10) {
        format!("{:.1} ms", duration.as_secs_f64() * 1e3)
    } else {
        format!("{:.0} µs", duration.as_secs_f64() * 1e6)
    }
}

fn table(
    title: &str,
    loads: &[Load],
    cluster: &LocalCluster,
    dir: &Path,
    seconds: u64,
    runtime: &tokio::runtime::Runtime,
) {
    println!("\n{title}\n");
    println!("| payload | clients | outstanding each | client library | Tessera appends/s | p50 | p99 | plain file appends/s | p50 | p99 | Tessera / file |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    static CLIENT_BASE: AtomicU64 = AtomicU64::new(1_000_000);
    for load in loads {
        let base = CLIENT_BASE.fetch_add(1_000_000, Ordering::Relaxed);
        let tessera = runtime.block_on(measure_tessera(cluster, *load, seconds, base));
        let plain = measure_plain_file(dir, *load, seconds);
        println!(
            "| {} B | {} | {} | {} | {:.0} | {} | {} | {:.0} | {} | {} | {:.2} |",
            load.payload,
            load.clients,
            load.window,
            if load.shared { "shared" } else { "one each" },
            tessera.appends_per_second,
            micros(tessera.p50),
            micros(tessera.p99),
            plain.appends_per_second,
            micros(plain.p50),
            micros(plain.p99),
            tessera.appends_per_second / plain.appends_per_second
        );
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.dir)?;
    let dir = args.dir.canonicalize()?;
    eprintln!("starting 3 log replicas (node processes) under {}", dir.display());
    let cluster = LocalCluster::start(&dir.join("cluster"), 3)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let (payloads, client_counts): (Vec<usize>, Vec<usize>) =
        if args.quick { (vec![64], vec![1, 256]) } else { (vec![64, 4096], vec![1, 4, 16, 64, 256]) };
    let closed_loop: Vec<Load> = payloads
        .iter()
        .flat_map(|payload| {
            client_counts.iter().map(move |clients| Load {
                clients: *clients,
                payload: *payload,
                window: 1,
                shared: false,
            })
        })
        .collect();
    table(
        "Closed loop: each client appends and waits, one at a time.",
        &closed_loop,
        &cluster,
        &dir,
        args.seconds,
        &runtime,
    );
    let saturation: Vec<Load> = payloads
        .iter()
        .flat_map(|payload| {
            [true, false].map(move |shared| Load { clients: 256, payload: *payload, window: 16, shared })
        })
        .collect();
    table(
        "Saturation: 256 clients keeping 16 appends outstanding each.",
        &saturation,
        &cluster,
        &dir,
        args.seconds,
        &runtime,
    );
    drop(cluster);
    Ok(())
}
