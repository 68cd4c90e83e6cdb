//! A disk that runs out of room, on a real (small) tmpfs: writes that need
//! new blocks are refused with `NoSpace` before they are journaled, the
//! disk is not latched failed, and everything acknowledged stays readable.
//!
//! Needs: root (or CAP_SYS_ADMIN) to mount a tmpfs; the test fails, saying
//! so, without it.

use std::path::PathBuf;

use blockstore::{Disk, DiskConfig, Error, BLOCK_SIZE};
use fsio::tmpfs::Tmpfs;

use super::blocks;

const MIB_BLOCKS: u64 = (1 << 20) / BLOCK_SIZE as u64;

fn config(reserve_mib: u64) -> DiskConfig {
    DiskConfig { journal_max_bytes: 2 << 20, reserve_bytes: reserve_mib << 20, ..DiskConfig::default() }
}

/// Writes 1 MiB pieces from block 0 until one is refused; returns how many
/// were acknowledged. Any other error fails the test. The refusal halts the
/// component: `lsn` is the refused write's.
async fn fill(disk: &Disk, lsn: &mut u64) -> u64 {
    let mut written = 0;
    loop {
        *lsn += 1;
        match disk.write(1, *lsn, written * MIB_BLOCKS, blocks(written * MIB_BLOCKS, MIB_BLOCKS, 1)).await {
            Ok(()) => written += 1,
            Err(Error::NoSpace { reason, .. }) => {
                eprintln!("refused after {written} MiB: {reason}");
                return written;
            }
            Err(error) => panic!("after {written} MiB: {error}"),
        }
    }
}

fn check(disk: &Disk, pieces: std::ops::Range<u64>, version_of: impl Fn(u64) -> u64) {
    for piece in pieces {
        let read = disk.read(1, piece * MIB_BLOCKS, MIB_BLOCKS).unwrap();
        assert_eq!(read, blocks(piece * MIB_BLOCKS, MIB_BLOCKS, version_of(piece)), "MiB {piece}");
    }
}

#[tokio::test]
async fn a_full_disk_refuses_new_blocks_but_keeps_its_data_and_overwrites() {
    let tmpfs = Tmpfs::mount(48);
    let dir: PathBuf = tmpfs.path().join("disk");
    let disk = Disk::open(fsio::real(), &dir, config(8)).unwrap();
    // A component larger than the file system (sparse).
    disk.create(1, 128 * MIB_BLOCKS).await.unwrap();
    let mut lsn = 0;
    let written = fill(&disk, &mut lsn).await;
    // 48 MiB less the 8 MiB reserve, the journal and checkpoints.
    assert!((24..=40).contains(&written), "{written} MiB written before the refusal");
    assert_eq!(disk.failure(), None, "a full disk is not a failed one");
    let committed = disk.component(1).unwrap().committed_lsn;
    assert_eq!(committed, lsn - 1, "the refused write left no trace");
    // Halted: not even an overwrite goes in (its LSN would pass the one the
    // component lacks) until the owner says the refused write is settled.
    let refused = lsn;
    assert_eq!(disk.halted(1), Some(refused));
    lsn += 1;
    assert!(matches!(disk.write(1, lsn, 0, blocks(0, 1, 9)).await, Err(Error::NoSpace { .. })));
    lsn += 1;
    assert!(matches!(disk.unmap(1, lsn, 0, 1).await, Err(Error::NoSpace { .. })));
    assert_eq!(disk.component(1).unwrap().committed_lsn, committed);
    disk.resume(1, refused - 1);
    assert_eq!(disk.halted(1), Some(refused), "settled below the refusal: still halted");
    disk.resume(1, lsn);
    assert_eq!(disk.halted(1), None);
    // The refused piece reads as a hole.
    assert_eq!(disk.provisioning(1, written * MIB_BLOCKS, MIB_BLOCKS).unwrap(), (false, MIB_BLOCKS));
    check(&disk, 0..written, |_| 1);

    // Overwrites of allocated blocks go on (the journal has the reserve).
    for piece in 0..written.min(12) {
        lsn += 1;
        disk.write(1, lsn, piece * MIB_BLOCKS, blocks(piece * MIB_BLOCKS, MIB_BLOCKS, 2)).await.unwrap();
    }
    // Freeing space lets new blocks in again.
    lsn += 1;
    disk.unmap(1, lsn, 0, 4 * MIB_BLOCKS).await.unwrap();
    lsn += 1;
    disk.write(1, lsn, 100 * MIB_BLOCKS, blocks(100 * MIB_BLOCKS, MIB_BLOCKS, 3)).await.unwrap();
    disk.close();

    // All of it survives a restart; the refused write never appears.
    let disk = Disk::open(fsio::real(), &dir, config(8)).unwrap();
    assert_eq!(disk.component(1).unwrap().committed_lsn, lsn);
    assert_eq!(disk.read(1, 0, MIB_BLOCKS).unwrap(), vec![0u8; MIB_BLOCKS as usize * BLOCK_SIZE]);
    check(&disk, 4..written, |piece| if piece < 12 { 2 } else { 1 });
    assert_eq!(disk.read(1, 100 * MIB_BLOCKS, MIB_BLOCKS).unwrap(), blocks(100 * MIB_BLOCKS, MIB_BLOCKS, 3));
    assert_eq!(disk.provisioning(1, written * MIB_BLOCKS, MIB_BLOCKS).unwrap(), (false, MIB_BLOCKS));
    disk.close();
}

#[tokio::test]
async fn without_a_reserve_a_journal_that_cannot_grow_is_refused_not_failed() {
    let tmpfs = Tmpfs::mount(32);
    let dir: PathBuf = tmpfs.path().join("disk");
    let disk = Disk::open(fsio::real(), &dir, config(0)).unwrap();
    disk.create(1, 128 * MIB_BLOCKS).await.unwrap();
    let mut lsn = 0;
    let written = fill(&disk, &mut lsn).await;
    assert!(written >= 16, "only {written} MiB written before the refusal");
    // The data files took the space: writes of any kind now find no room
    // for the journal, or squeeze in after an early checkpoint; none may
    // latch the disk failed.
    disk.resume(1, lsn);
    for piece in 0..written {
        lsn += 1;
        match disk.write(1, lsn, piece * MIB_BLOCKS, blocks(piece * MIB_BLOCKS, MIB_BLOCKS, 1)).await {
            Ok(()) => {}
            Err(Error::NoSpace { .. }) => disk.resume(1, lsn),
            Err(error) => panic!("an overwrite of MiB {piece}: {error}"),
        }
    }
    assert_eq!(disk.failure(), None, "a full disk is not a failed one");
    check(&disk, 0..written, |_| 1);
    disk.close();
    // Too full to checkpoint on open: it goes on with the replayed journal.
    let disk = Disk::open(fsio::real(), &dir, config(0)).unwrap();
    check(&disk, 0..written, |_| 1);
    let mut rewritten = Vec::new();
    for piece in 0..written {
        lsn += 1;
        match disk.write(1, lsn, piece * MIB_BLOCKS, blocks(piece * MIB_BLOCKS, MIB_BLOCKS, 5)).await {
            Ok(()) => rewritten.push(piece),
            Err(Error::NoSpace { .. }) => disk.resume(1, lsn),
            Err(error) => panic!("an overwrite of MiB {piece} after reopening: {error}"),
        }
    }
    assert_eq!(disk.failure(), None);
    disk.close();
    let disk = Disk::open(fsio::real(), &dir, config(0)).unwrap();
    eprintln!("{} of {written} overwrites found room", rewritten.len());
    check(&disk, 0..written, |piece| if rewritten.contains(&piece) { 5 } else { 1 });
    disk.close();
}

/// An erasure-coded chunk write with no room halts its component like any
/// write; a rollback to below it (a readmission, or a new owner, gives up
/// every write above) lifts the halt, and one that keeps it does not.
#[tokio::test]
async fn a_rollback_below_a_chunk_write_refused_for_want_of_room_lets_writes_in_again() {
    use blockstore::Record;
    let tmpfs = Tmpfs::mount(32);
    let dir: PathBuf = tmpfs.path().join("disk");
    let disk = Disk::open(fsio::real(), &dir, config(8)).unwrap();
    disk.create(1, 128 * MIB_BLOCKS).await.unwrap();
    let chunk = |lsn: u64, piece: u64, version: u64| Record::ChunkWrite {
        component: 1,
        lsn,
        first: piece * MIB_BLOCKS,
        stable: 0,
        data: blocks(piece * MIB_BLOCKS, MIB_BLOCKS, version),
        undo: bytes::Bytes::from(vec![0u8; MIB_BLOCKS as usize * BLOCK_SIZE]),
    };
    let mut lsn = 0;
    let refused = loop {
        lsn += 1;
        match disk.submit_now(chunk(lsn, lsn - 1, 1)).unwrap().await {
            Ok(()) => {}
            Err(Error::NoSpace { .. }) => break lsn,
            Err(error) => panic!("chunk write {lsn}: {error}"),
        }
        assert!(lsn < 32, "32 MiB of chunks fit a 32 MiB file system");
    };
    assert_eq!(disk.halted(1), Some(refused));
    // A rollback that keeps the write before it changes nothing here.
    disk.submit_now(Record::RollBack { component: 1, to: refused }).unwrap().await.unwrap();
    assert_eq!(disk.halted(1), Some(refused), "a rollback to the refused write itself keeps the halt");
    let overwrite = disk.submit_now(chunk(refused + 1, 0, 2)).unwrap().await;
    assert!(matches!(overwrite, Err(Error::NoSpace { .. })), "halted: {overwrite:?}");
    // Just below it (where a component that declined it stands): given up
    // with the others, nothing waits on it.
    disk.submit_now(Record::RollBack { component: 1, to: refused - 1 }).unwrap().await.unwrap();
    assert_eq!(disk.halted(1), None);
    assert_eq!(disk.component(1).unwrap().committed_lsn, refused - 1);
    // An overwrite of one allocated block (what room is left is the
    // reserve's, for the journal).
    let overwrite = Record::ChunkWrite {
        component: 1,
        lsn: refused + 2,
        first: 0,
        stable: 0,
        data: blocks(0, 1, 3),
        undo: blocks(0, 1, 1),
    };
    disk.submit_now(overwrite).unwrap().await.unwrap();
    assert_eq!(disk.read(1, 0, 1).unwrap(), blocks(0, 1, 3));
    assert_eq!(disk.failure(), None);
    disk.close();
}
