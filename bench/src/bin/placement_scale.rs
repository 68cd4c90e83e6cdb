//! The hierarchical scheduler at 5,000 simulated hosts (`sim::placement`):
//! placements per second and latency under a cost model (every host is a
//! single-threaded server; a message costs a fixed time plus a little per
//! candidate it carries), and placement quality against an all-knowing best
//! fit given the same requests in the same run.
//!
//!     bench/placement.sh [--requests 20000]

use clap::Parser;
use placement::SchedulerConfig;
use sim::placement::{run, Report, Scenario};

#[derive(Parser)]
struct Args {
    /// Requests in each throughput run.
    #[arg(long, default_value_t = 20_000)]
    requests: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn sampled(branches: usize, leaves: usize) -> SchedulerConfig {
    SchedulerConfig { sample_branches: Some(branches), sample_leaves: Some(leaves), ..SchedulerConfig::default() }
}

fn throughput_row(label: &str, report: &Report) {
    println!(
        "| {} | {label} | {} | {} | {:.0} | {:.1}x | {:.2} ms | {:.2} ms | {:.0} | {:.0} ns |",
        report.hosts,
        report.placed,
        report.failed,
        report.placements_per_second,
        report.placements_per_second / 810.0,
        report.latency_p50_ms,
        report.latency_p99_ms,
        report.messages_per_placement,
        report.measured_ns_per_message,
    );
    assert!(report.violations.is_empty(), "{:?}", report.violations);
}

fn quality_row(label: &str, fill: f64, report: &Report) {
    let (ours, best) = report.max_utilization;
    println!(
        "| {} | {label} | {:.0}% | {} | {} | {:.1}% | {:.1}% | {:.3} | {:.3} | {:+.1}% |",
        report.hosts,
        fill * 100.0,
        report.placed,
        report.failed,
        ours * 100.0,
        best * 100.0,
        report.utilization_stddev.0,
        report.utilization_stddev.1,
        (ours / best - 1.0) * 100.0,
    );
    assert!(report.violations.is_empty(), "{:?}", report.violations);
}

fn main() {
    let args = Args::parse();
    println!("Throughput and latency, 5,000 hosts, 64 requests outstanding, 3 components each:\n");
    println!("| hosts | fan-out | placed | failed | placements/s | / 810 | latency p50 | latency p99 | messages/placement | scheduler code per message |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (label, config) in [
        ("sampled: 16 branches x 8 leaves", sampled(16, 8)),
        ("sampled: 8 branches x 4 leaves", sampled(8, 4)),
        ("everyone (every branch, every leaf)", SchedulerConfig::default()),
    ] {
        let mut scenario = Scenario::new(5000);
        scenario.scheduler = config;
        scenario.requests = if label.starts_with("everyone") { (args.requests / 20).max(200) } else { args.requests };
        scenario.fill = 0.02;
        throughput_row(label, &run(args.seed, &scenario));
    }
    println!("\nQuality: the same request sequence placed by the hierarchy and by an all-knowing best fit:\n");
    println!("| hosts | fan-out | filled to | placed | failed | fullest bucket | best fit's fullest | utilization stddev | best fit's stddev | fullest vs best fit |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (hosts, fill) in [(1000, 0.6), (1000, 0.85), (5000, 0.6)] {
        let mut designs = vec![("sampled 16 x 8", sampled(16, 8))];
        if hosts <= 1000 {
            // Asking every host for every request: 1,000 hosts keep it short.
            designs.push(("everyone", SchedulerConfig::default()));
        }
        for (label, config) in designs {
            let mut scenario = Scenario::new(hosts);
            scenario.scheduler = config;
            scenario.requests = hosts as usize * 4;
            scenario.fill = fill;
            quality_row(label, fill, &run(args.seed, &scenario));
        }
    }
}
