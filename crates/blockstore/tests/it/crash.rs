//! Crashes at random points, on the simulated file system (unsynced data
//! lost, unsynced appends torn): after every crash the store holds exactly
//! what was acknowledged, and of what was in flight, a prefix in journal
//! order.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use blockstore::{Disk, DiskConfig, Lsn, BLOCK_SIZE};
use bytes::Bytes;
use futures::FutureExt;
use proptest::prelude::*;

use crate::block;

const BLOCKS: u64 = 48;

#[derive(Clone, Debug)]
enum Op {
    Write {
        component: u64,
        first: u64,
        count: u64,
    },
    Unmap {
        component: u64,
        first: u64,
        count: u64,
    },
    Track {
        component: u64,
    },
    Untrack {
        component: u64,
    },
    /// Writes queued one after another, then a crash before they are answered.
    Burst {
        component: u64,
        blocks: Vec<u64>,
    },
    Crash {
        torn: bool,
    },
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    let component = 1u64..3;
    prop_oneof![
        6 => (component.clone(), 0..BLOCKS, 1u64..6).prop_map(|(component, first, count)| Op::Write { component, first: first.min(BLOCKS - count), count }),
        1 => (component.clone(), 0..BLOCKS, 1u64..10).prop_map(|(component, first, count)| Op::Unmap { component, first: first.min(BLOCKS - count), count }),
        1 => component.clone().prop_map(|component| Op::Track { component }),
        1 => component.clone().prop_map(|component| Op::Untrack { component }),
        1 => (component, proptest::collection::vec(0..BLOCKS, 1..12)).prop_map(|(component, blocks)| Op::Burst { component, blocks }),
        1 => any::<bool>().prop_map(|torn| Op::Crash { torn }),
        1 => Just(Op::Reopen),
    ]
}

/// What the store must hold for one component.
#[derive(Clone, Default)]
struct Model {
    /// Block → version written (absent: zeros).
    blocks: BTreeMap<u64, u64>,
    lsn: Lsn,
    tracking: BTreeMap<Lsn, BTreeSet<u64>>,
}

fn config(inline_writer: bool) -> DiskConfig {
    // Small journals: checkpoints happen all through a run.
    DiskConfig { journal_max_bytes: 96 * 1024, inline_writer, ..DiskConfig::default() }
}

fn open(fs: &fsio::SimFs, inline_writer: bool) -> Disk {
    Disk::open(Arc::new(fs.clone()), Path::new("/disk"), config(inline_writer)).expect("the store opens after a crash")
}

fn expected(model: &Model, number: u64) -> Vec<u8> {
    model.blocks.get(&number).map(|version| block(number, *version)).unwrap_or_else(|| vec![0u8; BLOCK_SIZE])
}

fn check(disk: &Disk, models: &BTreeMap<u64, Model>) -> Result<(), TestCaseError> {
    for (id, model) in models {
        let info = disk.component(*id).map_err(|error| TestCaseError::fail(error.to_string()))?;
        prop_assert_eq!(info.committed_lsn, model.lsn, "component {} LSN", id);
        let data = disk.read(*id, 0, BLOCKS).map_err(|error| TestCaseError::fail(error.to_string()))?;
        for number in 0..BLOCKS {
            let at = number as usize * BLOCK_SIZE;
            prop_assert!(data[at..at + BLOCK_SIZE] == expected(model, number)[..], "component {} block {}", id, number);
        }
        let tracked: Vec<Lsn> = info.tracking.iter().map(|(lsn, _, _)| *lsn).collect();
        prop_assert_eq!(tracked, model.tracking.keys().copied().collect::<Vec<_>>());
        for (stale, marked) in &model.tracking {
            let bitmap = disk.tracking_bitmap(*id, *stale).unwrap().unwrap();
            let got: BTreeSet<u64> = bitmap.iter().map(u64::from).collect();
            prop_assert_eq!(&got, marked, "component {} tracking for {}", id, stale);
        }
    }
    Ok(())
}

fn run(ops: Vec<Op>, seed: u64, inline_writer: bool) -> Result<(), TestCaseError> {
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    runtime.block_on(async move {
        let fs = fsio::SimFs::new(seed);
        let mut disk = open(&fs, inline_writer);
        let mut models: BTreeMap<u64, Model> = BTreeMap::new();
        for id in 1..3 {
            disk.create(id, BLOCKS).await.unwrap();
            models.insert(id, Model::default());
        }
        let mut version = 0u64;
        for op in ops {
            match op {
                Op::Write { component, first, count } => {
                    version += 1;
                    let model = models.get_mut(&component).unwrap();
                    let lsn = model.lsn + 1;
                    let data: Vec<u8> = (first..first + count).flat_map(|number| block(number, version)).collect();
                    disk.write(component, lsn, first, Bytes::from(data)).await.unwrap();
                    model.lsn = lsn;
                    for number in first..first + count {
                        model.blocks.insert(number, version);
                    }
                    for marked in model.tracking.values_mut() {
                        marked.extend(first..first + count);
                    }
                }
                Op::Unmap { component, first, count } => {
                    let model = models.get_mut(&component).unwrap();
                    let lsn = model.lsn + 1;
                    disk.unmap(component, lsn, first, count).await.unwrap();
                    model.lsn = lsn;
                    for number in first..first + count {
                        model.blocks.remove(&number);
                    }
                    for marked in model.tracking.values_mut() {
                        marked.extend(first..first + count);
                    }
                }
                Op::Track { component } => {
                    let model = models.get_mut(&component).unwrap();
                    disk.track(component, model.lsn, Some(vec![])).await.unwrap();
                    model.tracking.entry(model.lsn).or_default();
                }
                Op::Untrack { component } => {
                    let model = models.get_mut(&component).unwrap();
                    if let Some(stale) = model.tracking.keys().next().copied() {
                        disk.untrack(component, stale).await.unwrap();
                        model.tracking.remove(&stale);
                    }
                }
                Op::Burst { component, blocks } => {
                    // Queue them in LSN order without waiting, then crash.
                    let base = models[&component].lsn;
                    let mut queued = Vec::new();
                    for (index, number) in blocks.iter().enumerate() {
                        version += 1;
                        let lsn = base + 1 + index as u64;
                        let _ =
                            disk.write(component, lsn, *number, Bytes::from(block(*number, version))).now_or_never();
                        queued.push((lsn, *number, version));
                    }
                    disk.abandon();
                    fs.crash(true);
                    disk = open(&fs, inline_writer);
                    // What survived must be a prefix of the queue.
                    let survived_lsn = disk.component(component).unwrap().committed_lsn;
                    prop_assert!(survived_lsn >= base && survived_lsn <= base + blocks.len() as u64);
                    let model = models.get_mut(&component).unwrap();
                    for (lsn, number, version) in queued {
                        if lsn <= survived_lsn {
                            model.blocks.insert(number, version);
                            for marked in model.tracking.values_mut() {
                                marked.insert(number);
                            }
                        }
                    }
                    model.lsn = survived_lsn;
                }
                Op::Crash { torn } => {
                    disk.abandon();
                    fs.crash(torn);
                    disk = open(&fs, inline_writer);
                }
                Op::Reopen => {
                    disk.close();
                    disk = open(&fs, inline_writer);
                }
            }
            check(&disk, &models)?;
        }
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn after_any_crash_the_store_holds_what_was_acknowledged(
        ops in proptest::collection::vec(op(), 1..60),
        seed in any::<u64>(),
        inline_writer in any::<bool>(),
    ) {
        run(ops, seed, inline_writer)?;
    }
}
