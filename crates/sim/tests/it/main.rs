//! Seeded simulation runs. `TESSERA_SIM_SEED=<seed>` replays one seed;
//! `TESSERA_SLOW=1` runs many more seeds.

mod hierarchy;
mod objects;
mod placement;

use sim::log::{run, Report, Scenario};

/// The seeds to run: the one `TESSERA_SIM_SEED` names, else 1..=`quick`,
/// or 1..=`slow` with `TESSERA_SLOW`.
fn seeds_up_to(quick: u64, slow: u64) -> Vec<u64> {
    if let Ok(seed) = std::env::var("TESSERA_SIM_SEED") {
        return vec![seed.parse().expect("TESSERA_SIM_SEED must be a number")];
    }
    let count = if std::env::var_os("TESSERA_SLOW").is_some() { slow } else { quick };
    (1..=count).collect()
}

fn seeds() -> Vec<u64> {
    seeds_up_to(40, 500)
}

fn assert_clean(report: &Report) {
    println!(
        "seed {:>4}: {} appends acknowledged, {} operations failed, {} crashes, {} partitions, {} snapshot installs, log length {}, {:.0} virtual s, {} messages ({} dropped)",
        report.seed,
        report.acknowledged_appends,
        report.failed_operations,
        report.crashes,
        report.partitions,
        report.snapshot_installs,
        report.final_length,
        report.virtual_seconds,
        report.messages.0,
        report.messages.1
    );
    assert!(
        report.violations.is_empty(),
        "seed {} violates linearizability: {:#?}\nreplay: TESSERA_SIM_SEED={} cargo test -p sim",
        report.seed,
        report.violations,
        report.seed
    );
    assert!(report.acknowledged_appends > 0, "seed {} made no progress at all", report.seed);
}

#[test]
fn the_log_is_linearizable_under_partitions_loss_and_leader_crashes() {
    let scenario = Scenario::default();
    let (mut crashes, mut partitions, mut installs) = (0, 0, 0);
    for seed in seeds() {
        let report = run(seed, &scenario);
        crashes += report.crashes;
        partitions += report.partitions;
        installs += report.snapshot_installs;
        assert_clean(&report);
    }
    if std::env::var_os("TESSERA_SIM_SEED").is_none() {
        assert!(crashes > 0 && partitions > 0, "the nemesis must actually crash replicas and partition hosts");
        assert!(installs > 0, "over all seeds, some replica must catch up through a snapshot");
    }
}

#[test]
fn a_seed_replays_exactly() {
    let scenario = Scenario { operations_per_client: 60, ..Scenario::default() };
    let first = run(7, &scenario);
    let second = run(7, &scenario);
    assert_eq!(first.trace_hash, second.trace_hash, "the same seed must give the same run");
    assert_eq!(first.messages, second.messages);
}
