//! The aggregation hierarchy under seeded loss, stalls and kills, at 100,
//! 1,000 and 5,000 hosts (virtual time; `TESSERA_SLOW=1` runs longer).

use sim::hierarchy::{run, Report, Scenario, Victim};

const DETECTION_BOUND_MS: u64 = 5_000;

fn slow() -> bool {
    std::env::var_os("TESSERA_SLOW").is_some()
}

fn print(report: &Report, loss: f64) {
    let detections: Vec<String> = report
        .detections
        .iter()
        .map(|d| {
            format!("{:?} {}: detected {:?} ms, repaired {:?} ms", d.victim, d.host, d.detected_after, d.repaired_after)
        })
        .collect();
    println!(
        "{} hosts, loss {:.0}%: {:.3} messages/host/s (heartbeats, summaries, probes, replies: {:?}), {} false positives in {:.1} host-hours ({:.2} per 1000), {} tree changes\n  {}",
        report.hosts,
        loss * 100.0,
        report.messages_per_host_per_second,
        report.messages_by_kind,
        report.false_positives,
        report.host_hours,
        report.false_positives_per_1000_host_hours(),
        report.tree_changes,
        detections.join("\n  ")
    );
}

fn check(hosts: u64, loss: f64, duration_ms: u64, seed: u64) -> Report {
    let mut scenario = Scenario::new(hosts);
    scenario.loss_probability = loss;
    scenario.duration = duration_ms;
    let report = run(seed, &scenario);
    print(&report, loss);
    assert!(report.invariant_violations.is_empty(), "{:?}", report.invariant_violations);
    for detection in &report.detections {
        let detected = detection.detected_after.unwrap_or_else(|| panic!("{detection:?} was never detected"));
        assert!(detected < DETECTION_BOUND_MS, "{detection:?}: detection took {detected} ms");
        if detection.victim != Victim::Leaf {
            assert!(detection.repaired_after.is_some(), "{detection:?}: the tree was not repaired");
        }
    }
    assert!(report.detections.iter().any(|d| d.victim == Victim::Root), "a root was killed");
    report
}

#[test]
fn at_100_hosts() {
    for loss in [0.01, 0.05] {
        let report = check(100, loss, if slow() { 1_800_000 } else { 300_000 }, 100);
        assert!(
            report.messages_per_host_per_second <= 1.05,
            "{:.3} messages per host per second",
            report.messages_per_host_per_second
        );
    }
}

#[test]
fn at_1000_hosts() {
    let report = check(1000, 0.01, if slow() { 1_800_000 } else { 120_000 }, 1000);
    assert!(report.messages_per_host_per_second <= 1.0, "{:.3}", report.messages_per_host_per_second);
    assert_eq!(report.false_positives, 0);
}

#[test]
fn at_5000_hosts() {
    let report = check(5000, 0.01, if slow() { 3_600_000 } else { 60_000 }, 5000);
    assert!(report.messages_per_host_per_second <= 1.0, "{:.3}", report.messages_per_host_per_second);
    assert_eq!(report.false_positives, 0);
}
