//! Failure detection at scale: the aggregation hierarchy against a flat
//! monitor, side by side in one run, on the seeded discrete-event simulator
//! (`sim::hierarchy`), at 100, 1,000 and 5,000 hosts with 1% and 5% message
//! loss, short and long host stalls, and kills of leaves, branches and roots.
//!
//! The flat monitor is the design the hierarchy replaces: every host
//! heartbeats one central host at the same interval and is declared failed
//! after the same silence, without suspicion or probing.
//!
//!     bench/hierarchy.sh [--minutes 10] [--hosts 100,1000,5000] [--loss 1,5]

use clap::Parser;
use sim::hierarchy::{run, run_flat, Report, Scenario, Victim};

#[derive(Parser)]
struct Args {
    /// Virtual minutes per scenario.
    #[arg(long, default_value_t = 10)]
    minutes: u64,
    #[arg(long, value_delimiter = ',', default_value = "100,1000,5000")]
    hosts: Vec<u64>,
    /// Message loss, percent.
    #[arg(long, value_delimiter = ',', default_value = "1,5")]
    loss: Vec<f64>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn percentile(values: &mut [u64], fraction: f64) -> Option<u64> {
    values.sort_unstable();
    (!values.is_empty()).then(|| values[((values.len() - 1) as f64 * fraction).round() as usize])
}

fn seconds(millis: Option<u64>) -> String {
    millis.map_or("never".to_string(), |millis| format!("{:.2} s", millis as f64 / 1000.0))
}

fn row(design: &str, scenario: &Scenario, report: &Report) -> String {
    let mut detected: Vec<u64> = report.detections.iter().filter_map(|d| d.detected_after).collect();
    let missed = report.detections.iter().filter(|d| d.detected_after.is_none()).count();
    let mut repairs: Vec<u64> =
        report.detections.iter().filter(|d| d.victim != Victim::Leaf).filter_map(|d| d.repaired_after).collect();
    let repair = if design == "flat monitor" {
        "n/a".to_string()
    } else {
        format!("{} / {}", seconds(percentile(&mut repairs, 0.5)), seconds(repairs.iter().max().copied()))
    };
    format!(
        "| {} | {:.0}% | {design} | {} ({} missed) | {} | {} | {repair} | {:.3} | {:.0} | {} in {:.0} h = {:.2} | {} |",
        scenario.hosts,
        scenario.loss_probability * 100.0,
        report.detections.len(),
        missed,
        seconds(percentile(&mut detected, 0.5)),
        seconds(detected.iter().max().copied()),
        report.messages_per_host_per_second,
        report.busiest_inbound_per_second,
        report.false_positives,
        report.host_hours,
        report.false_positives_per_1000_host_hours(),
        report.stall_detections,
    )
}

fn main() {
    let args = Args::parse();
    println!(
        "| hosts | loss | design | kills | detection p50 | detection worst | tree repair p50 / worst | messages/host/s | busiest host's inbound msgs/s | false positives per 1000 host-hours | long stalls declared |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for &hosts in &args.hosts {
        for &loss in &args.loss {
            let mut scenario = Scenario::new(hosts);
            scenario.loss_probability = loss / 100.0;
            scenario.duration = args.minutes * 60_000;
            // One kill a minute, at least six (two each of leaf, branch, root).
            scenario.kills = (args.minutes as usize).max(6);
            // Short stalls (0.5-2 s) that must not be declared, long ones that may.
            scenario.stalls = (hosts as usize / 5).clamp(20, 200) * args.minutes as usize / 2;
            scenario.long_stalls = (args.minutes as usize / 2).max(2);
            let hierarchy = run(args.seed, &scenario);
            assert!(hierarchy.invariant_violations.is_empty(), "{:?}", hierarchy.invariant_violations);
            println!("{}", row("hierarchy", &scenario, &hierarchy));
            for detection in hierarchy.detections.iter().filter(|d| d.detected_after.is_none_or(|after| after >= 5000))
            {
                eprintln!("slow detection at {hosts} hosts, {loss}% loss: {detection:?}");
            }
            let flat = run_flat(args.seed, &scenario);
            println!("{}", row("flat monitor", &scenario, &flat));
        }
    }
}
