//! The hierarchical scheduler at 5,000 simulated hosts: throughput, latency
//! and placement quality against an all-knowing best fit.

use placement::SchedulerConfig;
use sim::placement::{run, Report, Scenario};

fn print(label: &str, report: &Report) {
    println!(
        "{label}: {} hosts, {} placed, {} failed, {:.0} placements/s, latency p50 {:.2} ms p99 {:.2} ms, {:.0} messages/placement, \\
         fullest bucket {:.1}% (best fit {:.1}%), utilization stddev {:.3} (best fit {:.3}), {:.0} ns of scheduler code per message",
        report.hosts,
        report.placed,
        report.failed,
        report.placements_per_second,
        report.latency_p50_ms,
        report.latency_p99_ms,
        report.messages_per_placement,
        report.max_utilization.0 * 100.0,
        report.max_utilization.1 * 100.0,
        report.utilization_stddev.0,
        report.utilization_stddev.1,
        report.measured_ns_per_message,
    );
}

fn sampled() -> SchedulerConfig {
    SchedulerConfig { sample_branches: Some(16), sample_leaves: Some(8), ..SchedulerConfig::default() }
}

#[test]
fn throughput_at_5000_hosts() {
    let mut scenario = Scenario::new(5000);
    scenario.scheduler = sampled();
    scenario.requests = if std::env::var_os("TESSERA_SLOW").is_some() { 20_000 } else { 3_000 };
    // Small components: this measures the scheduler, not a full cluster.
    scenario.fill = 0.02;
    let report = run(5000, &scenario);
    print("5000 hosts, sampled 16 branches x 8 leaves", &report);
    assert!(report.violations.is_empty(), "{:?}", report.violations);
    assert_eq!(report.failed, 0);
    assert!(report.placements_per_second >= 810.0, "{:.0} placements/s", report.placements_per_second);
}

#[test]
fn quality_against_an_all_knowing_best_fit() {
    let mut scenario = Scenario::new(1000);
    scenario.scheduler = sampled();
    // Components of about a tenth of a disk, until the cluster is 60% full.
    scenario.requests = 4_000;
    scenario.fill = 0.6;
    let report = run(1000, &scenario);
    print("1000 hosts filled to 60%, sampled", &report);
    assert!(report.violations.is_empty(), "{:?}", report.violations);
    assert!(
        report.max_utilization.0 <= report.max_utilization.1 * 1.12,
        "the fullest bucket is {:.1}% against {:.1}% for the best fit",
        report.max_utilization.0 * 100.0,
        report.max_utilization.1 * 100.0
    );
}
