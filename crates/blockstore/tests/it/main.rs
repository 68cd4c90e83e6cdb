//! The component store on a real directory and on the simulated file
//! system: round trips, checksums, unmap, bitmaps, resync, crashes, and the
//! failure latch.

mod crash;
mod space;

use std::path::Path;
use std::sync::Arc;

use blockstore::{Disk, DiskConfig, Error, BLOCK_SIZE};
use bytes::Bytes;

/// A block that says what it is: its number and a version.
pub fn block(number: u64, version: u64) -> Vec<u8> {
    let mut data = vec![0u8; BLOCK_SIZE];
    for (index, chunk) in data.chunks_mut(16).enumerate() {
        chunk[..8].copy_from_slice(&number.to_le_bytes());
        chunk[8..].copy_from_slice(&(version ^ index as u64).to_le_bytes());
    }
    data
}

fn blocks(first: u64, count: u64, version: u64) -> Bytes {
    Bytes::from((first..first + count).flat_map(|number| block(number, version)).collect::<Vec<u8>>())
}

fn open(dir: &Path) -> Disk {
    Disk::open(fsio::real(), dir, DiskConfig::default()).unwrap()
}

#[tokio::test]
async fn writes_survive_a_restart_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let disk = open(dir.path());
    disk.create(1, 1000).await.unwrap();
    disk.write(1, 1, 10, blocks(10, 5, 1)).await.unwrap();
    disk.write(1, 2, 12, blocks(12, 1, 2)).await.unwrap();
    assert_eq!(disk.read(1, 10, 2).unwrap(), blocks(10, 2, 1));
    disk.close();
    drop(disk);
    let disk = open(dir.path());
    let info = disk.component(1).unwrap();
    assert_eq!((info.blocks, info.committed_lsn), (1000, 2));
    assert_eq!(disk.read(1, 12, 1).unwrap(), blocks(12, 1, 2));
    assert_eq!(disk.read(1, 13, 2).unwrap(), blocks(13, 2, 1));
    assert_eq!(disk.read(1, 0, 1).unwrap(), Bytes::from(vec![0u8; BLOCK_SIZE]), "never written reads as zeros");
    assert!(matches!(disk.read(1, 999, 2), Err(Error::OutOfRange { .. })));
    assert!(matches!(disk.create(1, 5).await, Err(Error::Exists(1))));
    assert!(matches!(disk.read(2, 0, 1), Err(Error::NoSuchComponent(2))));
}

#[tokio::test]
async fn the_journal_is_zeroed_ahead_and_replay_stops_at_the_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let disk = open(dir.path());
    disk.create(1, 100).await.unwrap();
    let journal_size = || {
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap())
            .filter(|entry| entry.file_name().to_string_lossy().starts_with("journal-"))
            .collect();
        assert_eq!(names.len(), 1, "one journal at a time");
        names[0].metadata().unwrap().len()
    };
    disk.write(1, 1, 3, blocks(3, 2, 1)).await.unwrap();
    let zeroed = journal_size();
    assert!(zeroed >= 1 << 20, "the journal was not zeroed ahead: {zeroed} bytes");
    for lsn in 2..20 {
        disk.write(1, lsn, lsn, blocks(lsn, 1, lsn)).await.unwrap();
    }
    assert_eq!(journal_size(), zeroed, "appends grew the journal instead of overwriting its zeros");
    // What a crash leaves: every acknowledged write is in the journal,
    // followed by zeros. Replaying a copy of the directory finds them all.
    let image = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), image.path().join(entry.file_name())).unwrap();
    }
    let replayed = open(image.path());
    assert_eq!(replayed.component(1).unwrap().committed_lsn, 19);
    for lsn in 2..20 {
        assert!(replayed.read(1, lsn, 1).unwrap() == blocks(lsn, 1, lsn), "block {lsn} lost its last write");
    }
}

#[tokio::test]
async fn a_corrupted_block_is_detected_and_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let disk = open(dir.path());
    disk.create(7, 64).await.unwrap();
    disk.write(7, 1, 0, blocks(0, 8, 1)).await.unwrap();
    disk.close();
    drop(disk);
    // Flip one byte of block 5 on disk, behind the store's back.
    let path = dir.path().join("c-7.data");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[5 * BLOCK_SIZE + 100] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let disk = open(dir.path());
    match disk.read(7, 0, 8) {
        Err(Error::Corrupt { component: 7, blocks }) => assert_eq!(blocks, vec![5]),
        other => panic!("expected a checksum error, got {other:?}"),
    }
    assert_eq!(disk.read(7, 0, 5).unwrap(), blocks(0, 5, 1), "the other blocks read fine");
    disk.repair(7, 5, blocks(5, 1, 1)).await.unwrap();
    assert_eq!(disk.read(7, 0, 8).unwrap(), blocks(0, 8, 1));
    assert_eq!(disk.component(7).unwrap().committed_lsn, 1, "a repair carries no LSN");
}

#[tokio::test]
async fn unmapped_blocks_read_as_zeros_and_free_their_space() {
    let dir = tempfile::tempdir().unwrap();
    let disk = open(dir.path());
    disk.create(3, 4096).await.unwrap();
    disk.write(3, 1, 0, blocks(0, 1024, 1)).await.unwrap();
    disk.write(3, 2, 1024, blocks(1024, 1024, 1)).await.unwrap();
    disk.close();
    drop(disk);
    let disk = open(dir.path());
    let before = disk.component(3).unwrap().allocated_bytes;
    assert!(before >= 2048 * BLOCK_SIZE as u64, "{before}");
    disk.unmap(3, 3, 0, 1024).await.unwrap();
    let after = disk.component(3).unwrap().allocated_bytes;
    assert!(after <= before - 1000 * BLOCK_SIZE as u64, "space returned: {before} -> {after}");
    assert_eq!(disk.read(3, 1000, 24).unwrap(), Bytes::from(vec![0u8; 24 * BLOCK_SIZE]));
    assert_eq!(disk.read(3, 1024, 4).unwrap(), blocks(1024, 4, 1));
    assert_eq!(disk.component(3).unwrap().committed_lsn, 3);
}

/// A block of `seed` bytes whose last four bytes are chosen so that its
/// CRC32C is 0 (CRC32C is affine over GF(2) in those bits: solve for them).
fn block_with_zero_crc(seed: u8) -> Vec<u8> {
    let mut block = vec![seed; BLOCK_SIZE];
    block[BLOCK_SIZE - 4..].fill(0);
    let base = crc32c::crc32c(&block);
    // Each row: the CRC change one bit makes, and which bit it is.
    let mut rows: Vec<(u32, u32)> = (0..32)
        .map(|bit| {
            let mut flipped = block.clone();
            flipped[BLOCK_SIZE - 4 + bit / 8] ^= 1 << (bit % 8);
            (crc32c::crc32c(&flipped) ^ base, 1u32 << bit)
        })
        .collect();
    // Gaussian elimination, then combine rows to cancel `base`.
    let mut pivots = Vec::new();
    for column in (0..32).rev() {
        let Some(at) = (pivots.len()..32).find(|&row| rows[row].0 >> column & 1 == 1) else { continue };
        rows.swap(pivots.len(), at);
        let pivot = rows[pivots.len()];
        for (index, row) in rows.iter_mut().enumerate() {
            if index != pivots.len() && row.0 >> column & 1 == 1 {
                row.0 ^= pivot.0;
                row.1 ^= pivot.1;
            }
        }
        pivots.push(column);
    }
    let mut flips = 0u32;
    for (row, column) in pivots.iter().enumerate() {
        if base >> column & 1 == 1 {
            flips ^= rows[row].1;
        }
    }
    for bit in 0..32 {
        if flips >> bit & 1 == 1 {
            block[BLOCK_SIZE - 4 + bit / 8] ^= 1 << (bit % 8);
        }
    }
    assert_eq!(crc32c::crc32c(&block), 0);
    block
}

#[tokio::test]
async fn provisioning_tells_written_blocks_from_deallocated_ones() {
    let dir = tempfile::tempdir().unwrap();
    let disk = open(dir.path());
    disk.create(5, 4096).await.unwrap();
    assert_eq!(disk.provisioning(5, 0, 4096).unwrap(), (false, 4096));
    disk.write(5, 1, 100, blocks(100, 50, 1)).await.unwrap();
    // Zeros written are allocated, and so is a block whose CRC32C is 0.
    disk.write(5, 2, 150, Bytes::from(vec![0u8; BLOCK_SIZE])).await.unwrap();
    let tricky = block_with_zero_crc(0x5a);
    disk.write(5, 3, 151, Bytes::from(tricky.clone())).await.unwrap();
    assert_eq!(disk.provisioning(5, 0, 4096).unwrap(), (false, 100));
    assert_eq!(disk.provisioning(5, 100, 4096).unwrap(), (true, 52));
    assert_eq!(disk.provisioning(5, 120, 10).unwrap(), (true, 10), "at most the count asked");
    assert_eq!(disk.provisioning(5, 152, 4096).unwrap(), (false, 4096 - 152));
    disk.unmap(5, 4, 110, 10).await.unwrap();
    assert_eq!(disk.provisioning(5, 100, 4096).unwrap(), (true, 10));
    assert_eq!(disk.provisioning(5, 110, 4096).unwrap(), (false, 10));
    assert!(disk.provisioning(5, 4096, 1).is_err(), "past the end");
    // Which of some blocks are allocated: runs and single blocks, across
    // the unmapped hole, with a block past the end ignored.
    let among: roaring::RoaringBitmap =
        [0u32, 99, 100, 105, 109, 110, 119, 120, 151, 152, 4000, 5000].into_iter().collect();
    let allocated: Vec<u32> = disk.allocated_among(5, &among).unwrap().iter().collect();
    assert_eq!(allocated, vec![100, 105, 109, 120, 151]);
    let run: roaring::RoaringBitmap = (90..160).collect();
    assert_eq!(disk.allocated_among(5, &run).unwrap().len(), 10 + 32, "100..110 and 120..152");
    disk.close();
    drop(disk);
    let disk = open(dir.path());
    assert_eq!(disk.read(5, 151, 1).unwrap(), Bytes::from(tricky), "the zero-CRC block reads back");
    assert_eq!(disk.provisioning(5, 150, 2).unwrap(), (true, 2));
}

#[tokio::test]
async fn tracking_bitmaps_mark_blocks_written_after_their_stale_lsn_and_persist() {
    let dir = tempfile::tempdir().unwrap();
    let disk = open(dir.path());
    disk.create(1, 100).await.unwrap();
    disk.write(1, 5, 0, blocks(0, 2, 1)).await.unwrap();
    // A peer went stale at LSN 5, another at 7.
    disk.track(1, 5, Some(vec![])).await.unwrap();
    disk.track(1, 7, Some(vec![])).await.unwrap();
    disk.write(1, 6, 10, blocks(10, 2, 1)).await.unwrap();
    disk.write(1, 8, 20, blocks(20, 1, 1)).await.unwrap();
    disk.unmap(1, 9, 30, 3).await.unwrap();
    disk.close();
    drop(disk);
    let disk = open(dir.path());
    let five: Vec<u32> = disk.tracking_bitmap(1, 5).unwrap().unwrap().iter().collect();
    let seven: Vec<u32> = disk.tracking_bitmap(1, 7).unwrap().unwrap().iter().collect();
    assert_eq!(five, vec![10, 11, 20, 30, 31, 32]);
    assert_eq!(seven, vec![20, 30, 31, 32]);
    disk.untrack(1, 5).await.unwrap();
    assert!(disk.tracking_bitmap(1, 5).unwrap().is_none());
    assert_eq!(disk.component(1).unwrap().tracking, vec![(7, 4, true)]);
}

#[tokio::test]
async fn resync_data_never_overwrites_a_newer_write() {
    let dir = tempfile::tempdir().unwrap();
    let disk = open(dir.path());
    disk.create(1, 100).await.unwrap();
    disk.write(1, 3, 0, blocks(0, 10, 1)).await.unwrap();
    // Back from an absence at LSN 3; the object is at LSN 9.
    disk.begin_sync(1, 3, 9, 1).await.unwrap();
    assert_eq!(disk.component(1).unwrap().committed_lsn, 3, "current only to its stale LSN while resyncing");
    // A new write lands on block 4 during the resync (LSN 10) ...
    disk.write(1, 10, 4, blocks(4, 1, 10)).await.unwrap();
    // ... then older resync data for blocks 3-5 arrives.
    disk.sync_write(1, 1, 3, blocks(3, 3, 9)).await.unwrap();
    assert_eq!(disk.read(1, 3, 1).unwrap(), blocks(3, 1, 9));
    assert_eq!(disk.read(1, 4, 1).unwrap(), blocks(4, 1, 10), "the newer write stays");
    assert_eq!(disk.read(1, 5, 1).unwrap(), blocks(5, 1, 9));
    let done: Vec<u32> = disk.sync_bitmap(1).unwrap().unwrap().iter().collect();
    assert_eq!(done, vec![3, 4, 5]);
    disk.close();
    drop(disk);
    let disk = open(dir.path());
    assert_eq!(disk.component(1).unwrap().sync, Some((3, 9, 3)), "the resync survives a restart");
    assert!(!disk.end_sync(1, 2).await.unwrap(), "the end of another plan changes nothing");
    assert!(disk.end_sync(1, 1).await.unwrap());
    let info = disk.component(1).unwrap();
    assert_eq!((info.committed_lsn, info.sync), (10, None));
}

/// A resync planned again (its source failed, say) must not take data from
/// the job of the plan before it, which may still be copying from a source
/// the new plan no longer trusts: such writes are refused and change nothing.
#[tokio::test]
async fn a_resync_write_of_a_superseded_plan_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let disk = open(dir.path());
    disk.create(1, 100).await.unwrap();
    disk.write(1, 3, 0, blocks(0, 10, 1)).await.unwrap();
    disk.begin_sync(1, 3, 9, 1).await.unwrap();
    disk.sync_write(1, 1, 0, blocks(0, 1, 9)).await.unwrap();
    // Planned again: a new synchronization bitmap, and plan 1 is over.
    disk.begin_sync(1, 3, 12, 2).await.unwrap();
    let refused = disk.sync_write(1, 1, 5, blocks(5, 2, 7)).await;
    assert!(matches!(&refused, Err(Error::Invalid(reason)) if reason.contains("superseded by plan 2")), "{refused:?}");
    assert_eq!(disk.read(1, 5, 2).unwrap(), blocks(5, 2, 1), "the refused data did not land");
    assert!(disk.sync_bitmap(1).unwrap().unwrap().is_empty(), "nor does it count as copied");
    assert!(disk.sync_write(1, 0, 5, blocks(5, 2, 7)).await.is_err(), "plan 0 is for old journals only");
    disk.sync_write(1, 2, 5, blocks(5, 2, 12)).await.unwrap();
    assert_eq!(disk.read(1, 5, 2).unwrap(), blocks(5, 2, 12));
    // A replay applies the journal as it ran: the refused write stays refused.
    disk.close();
    drop(disk);
    let disk = open(dir.path());
    assert_eq!(disk.read(1, 5, 2).unwrap(), blocks(5, 2, 12));
    assert_eq!(disk.sync_bitmap(1).unwrap().unwrap().iter().collect::<Vec<u32>>(), vec![5, 6]);
    // Not resyncing at all: refused as before.
    assert!(disk.end_sync(1, 2).await.unwrap());
    assert!(disk.sync_write(1, 2, 5, blocks(5, 1, 13)).await.is_err());
}

#[tokio::test]
async fn concurrent_writers_share_group_commits() {
    let dir = tempfile::tempdir().unwrap();
    let disk = open(dir.path());
    disk.create(1, 4096).await.unwrap();
    let mut tasks = Vec::new();
    for writer in 0..16u64 {
        let disk = disk.clone();
        tasks.push(tokio::spawn(async move {
            for round in 0..32u64 {
                let number = writer * 32 + round;
                disk.write(1, number + 1, number, blocks(number, 1, 1)).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(disk.read(1, 0, 512).unwrap(), blocks(0, 512, 1));
    assert_eq!(disk.component(1).unwrap().committed_lsn, 512);
}

/// A file system whose syncs start failing on demand, as a dying disk's do.
struct FailingFs {
    inner: Arc<dyn fsio::Fs>,
    failing: Arc<std::sync::atomic::AtomicBool>,
}

struct FailingFile {
    inner: Arc<dyn fsio::File>,
    failing: Arc<std::sync::atomic::AtomicBool>,
}

impl fsio::File for FailingFile {
    fn read_at(&self, buffer: &mut [u8], offset: u64) -> std::io::Result<usize> {
        self.inner.read_at(buffer, offset)
    }
    fn write_at(&self, bytes: &[u8], offset: u64) -> std::io::Result<()> {
        self.inner.write_at(bytes, offset)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(std::io::Error::other("EIO (injected)"));
        }
        self.inner.sync_data()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.punch_hole(offset, len)
    }
    fn allocated_bytes(&self) -> std::io::Result<u64> {
        self.inner.allocated_bytes()
    }
}

impl fsio::Fs for FailingFs {
    fn create_dir_all(&self, path: &Path) -> std::io::Result<()> {
        self.inner.create_dir_all(path)
    }
    fn list(&self, dir: &Path) -> std::io::Result<Vec<String>> {
        self.inner.list(dir)
    }
    fn exists(&self, path: &Path) -> bool {
        self.inner.exists(path)
    }
    fn open(&self, path: &Path, create: bool) -> std::io::Result<Arc<dyn fsio::File>> {
        Ok(Arc::new(FailingFile { inner: self.inner.open(path, create)?, failing: self.failing.clone() }))
    }
    fn remove_file(&self, path: &Path) -> std::io::Result<()> {
        self.inner.remove_file(path)
    }
    fn remove_dir_all(&self, path: &Path) -> std::io::Result<()> {
        self.inner.remove_dir_all(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        self.inner.rename(from, to)
    }
    fn sync_dir(&self, dir: &Path) -> std::io::Result<()> {
        self.inner.sync_dir(dir)
    }
}

#[tokio::test]
async fn a_failed_fdatasync_latches_the_disk_failed() {
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let fs = Arc::new(FailingFs { inner: Arc::new(fsio::SimFs::new(1)), failing: failing.clone() });
    let disk = Disk::open(fs, Path::new("/disk"), DiskConfig::default()).unwrap();
    disk.create(1, 10).await.unwrap();
    disk.write(1, 1, 0, blocks(0, 1, 1)).await.unwrap();
    failing.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(matches!(disk.write(1, 2, 1, blocks(1, 1, 1)).await, Err(Error::DiskFailed { .. })));
    // The disk stays failed even once syncs would work again.
    failing.store(false, std::sync::atomic::Ordering::SeqCst);
    assert!(matches!(disk.write(1, 3, 2, blocks(2, 1, 1)).await, Err(Error::DiskFailed { .. })));
    assert!(matches!(disk.read(1, 0, 1), Err(Error::DiskFailed { .. })));
    assert!(disk.failure().unwrap().contains("fdatasync"), "{:?}", disk.failure());
}

#[tokio::test]
async fn tracking_started_late_is_seeded_with_recent_writes_above_its_lsn() {
    let dir = tempfile::tempdir().unwrap();
    let disk = open(dir.path());
    disk.create(1, 100).await.unwrap();
    disk.write(1, 1, 0, blocks(0, 1, 1)).await.unwrap();
    disk.write(1, 2, 1, blocks(1, 1, 1)).await.unwrap();
    disk.write(1, 3, 2, blocks(2, 1, 1)).await.unwrap();
    // A peer's absence at LSN 1 is noticed only now: blocks 1 and 2 were
    // written above it before the tracking began.
    disk.track(1, 1, None).await.unwrap();
    let marked: Vec<u32> = disk.tracking_bitmap(1, 1).unwrap().unwrap().iter().collect();
    // A superset, by at most the writes of one window (here block 0).
    assert!(marked == vec![1, 2] || marked == vec![0, 1, 2], "{marked:?}");
    assert!(disk.component(1).unwrap().tracking[0].2, "complete");
    // The owner, which knows its writes in flight, seeds it exactly.
    disk.track(1, 2, Some(vec![(2, 1)])).await.unwrap();
    let marked: Vec<u32> = disk.tracking_bitmap(1, 2).unwrap().unwrap().iter().collect();
    assert_eq!(marked, vec![2]);
}

#[tokio::test]
async fn tracking_started_beyond_the_recent_windows_says_it_is_incomplete() {
    let dir = tempfile::tempdir().unwrap();
    let disk = open(dir.path());
    disk.create(1, 100).await.unwrap();
    let windows = blockstore::RECENT_WINDOWS as u64 + 2;
    for window in 0..windows {
        let lsn = window * blockstore::WINDOW_LSNS + 1;
        disk.write(1, lsn, window % 100, blocks(window % 100, 1, lsn)).await.unwrap();
    }
    disk.track(1, 5, None).await.unwrap();
    let newest = (windows - 1) * blockstore::WINDOW_LSNS;
    disk.track(1, newest, None).await.unwrap();
    disk.close();
    drop(disk);
    let disk = open(dir.path());
    let tracking = disk.component(1).unwrap().tracking;
    assert_eq!(tracking[0].0, 5);
    assert!(!tracking[0].2, "writes above LSN 5 fell out of the windows: {tracking:?}");
    assert_eq!(tracking[1], (newest, 1, true));
}

#[tokio::test]
async fn a_fence_only_rises_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let disk = open(dir.path());
    disk.create(1, 10).await.unwrap();
    assert_eq!(disk.component(1).unwrap().epoch, 0);
    disk.fence(1, 5).await.unwrap();
    disk.fence(1, 3).await.unwrap();
    assert_eq!(disk.component(1).unwrap().epoch, 5);
    disk.close();
    drop(disk);
    assert_eq!(open(dir.path()).component(1).unwrap().epoch, 5);
}

/// A deposed owner's write is refused as soon as the newer owner's fence
/// is queued, before it is applied: otherwise the write would land behind
/// the fence, after the newer owner read the component's state.
#[tokio::test]
async fn an_older_epoch_is_refused_once_a_newer_fence_is_queued() {
    let dir = tempfile::tempdir().unwrap();
    let disk = open(dir.path());
    disk.create(1, 2048).await.unwrap();
    disk.fence(1, 1).await.unwrap();
    // Keep the writer busy so the fence waits in the queue.
    let mut waits = Vec::new();
    for lsn in 1..=8u64 {
        let record = blockstore::Record::Write { component: 1, lsn, first: 0, data: blocks(0, 256, lsn) };
        waits.push(disk.submit_in_epoch(1, 1, Some(record)).unwrap().1.unwrap());
    }
    let (fence, _) = disk.submit_in_epoch(1, 2, None).unwrap();
    let late = blockstore::Record::Write { component: 1, lsn: 9, first: 0, data: blocks(0, 1, 9) };
    match disk.submit_in_epoch(1, 1, Some(late)) {
        Err(Error::StaleEpoch { epoch: 1, current: 2 }) => {}
        Err(other) => panic!("refused for the wrong reason: {other}"),
        Ok(_) => panic!("a write of epoch 1 was queued behind the fence of epoch 2"),
    }
    assert_eq!(disk.accepted_epoch(1).unwrap(), 2);
    fence.unwrap().await.unwrap();
    for wait in waits {
        wait.await.unwrap();
    }
    assert_eq!(disk.component(1).unwrap().committed_lsn, 8);
    // The newer owner goes on; no second fence is queued for it.
    let next = blockstore::Record::Write { component: 1, lsn: 10, first: 0, data: blocks(0, 1, 10) };
    let (fence, wait) = disk.submit_in_epoch(1, 2, Some(next)).unwrap();
    assert!(fence.is_none());
    wait.unwrap().await.unwrap();
    assert_eq!(disk.read(1, 0, 1).unwrap(), blocks(0, 1, 10));
}

#[tokio::test]
async fn records_submitted_in_order_are_applied_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let disk = open(dir.path());
    disk.create(1, 8).await.unwrap();
    let mut waits = Vec::new();
    for lsn in 1..=200u64 {
        let record = blockstore::Record::Write { component: 1, lsn, first: lsn % 2, data: blocks(lsn % 2, 1, lsn) };
        waits.push(disk.submit_now(record).unwrap());
    }
    for wait in waits {
        wait.await.unwrap();
    }
    assert_eq!(disk.read(1, 0, 2).unwrap(), [blocks(0, 1, 200), blocks(1, 1, 199)].concat());
    assert_eq!(disk.component(1).unwrap().committed_lsn, 200);
    let too_big = blockstore::Record::Write { component: 1, lsn: 201, first: 0, data: blocks(0, 9, 1) };
    assert!(matches!(disk.submit_now(too_big), Err(Error::OutOfRange { .. })));
}

/// Before-images the stable mark holds back, more than a journal holds:
/// each checkpoint carries them into the next journal, which must not be
/// checkpointed again at once (one group commit, one copy of them all).
#[tokio::test]
async fn before_images_kept_past_a_journal_s_size_are_not_copied_on_every_commit() {
    use blockstore::Record;
    let dir = tempfile::tempdir().unwrap();
    let config = DiskConfig { journal_max_bytes: 96 * 1024, ..DiskConfig::default() };
    let disk = Disk::open(fsio::real(), dir.path(), config).unwrap();
    disk.create(1, 64).await.unwrap();
    let writes = 200u64;
    for lsn in 1..=writes {
        let first = (lsn * 4) % 64;
        let undo = disk.read(1, first, 4).unwrap();
        let data = blocks(first, 4, lsn);
        // Each waits for the one before: a group commit each.
        disk.submit_now(Record::ChunkWrite { component: 1, lsn, first, stable: 0, data, undo }).unwrap().await.unwrap();
    }
    let generation = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|entry| entry.unwrap().file_name().to_str()?.strip_prefix("journal-")?.parse::<u64>().ok())
        .max()
        .expect("a journal");
    // 200 writes keep 3.2 MiB of before-images against a 96 KiB journal:
    // checkpointing whenever the journal is twice what it began with
    // takes a few dozen at most, where checkpointing on every commit past
    // 96 KiB took one per write.
    assert!(generation < writes / 4, "{generation} checkpoints for {writes} group commits");
    // They are all still there to roll back.
    disk.submit_now(Record::RollBack { component: 1, to: 0 }).unwrap().await.unwrap();
    assert_eq!(disk.read(1, 0, 64).unwrap(), vec![0u8; 64 * BLOCK_SIZE]);
}

#[tokio::test]
async fn chunk_writes_roll_back_from_before_images_kept_across_checkpoints_until_stable() {
    use blockstore::Record;
    let dir = tempfile::tempdir().unwrap();
    let disk = open(dir.path());
    disk.create(1, 64).await.unwrap();
    disk.write(1, 1, 0, blocks(0, 8, 1)).await.unwrap();
    let chunk = |lsn: u64, first: u64, count: u64, version: u64, stable: u64, disk: &Disk| {
        let undo = disk.read(1, first, count).unwrap();
        let data = blocks(first, count, version);
        disk.submit_now(Record::ChunkWrite { component: 1, lsn, first, stable, data, undo }).unwrap()
    };
    chunk(2, 0, 4, 2, 1, &disk).await.unwrap();
    chunk(3, 2, 4, 3, 1, &disk).await.unwrap();
    disk.submit_now(Record::ChunkUnmap { component: 1, lsn: 4, first: 16, count: 16, stable: 1 })
        .unwrap()
        .await
        .unwrap();
    // A restart checkpoints: the before-images go on in the next journal,
    // and a second restart finds them there.
    disk.close();
    drop(disk);
    let disk = open(dir.path());
    disk.close();
    drop(disk);
    let disk = open(dir.path());
    assert_eq!(disk.component(1).unwrap().committed_lsn, 4);
    assert_eq!(disk.unmapped_above(1, 2).unwrap(), vec![(16, 16)]);
    // Back to LSN 2: write 3 is undone (blocks 4..6 hold version 1 again,
    // 2..4 write 2's), write 2 stays.
    disk.submit_now(Record::RollBack { component: 1, to: 2 }).unwrap().await.unwrap();
    assert_eq!(disk.component(1).unwrap().committed_lsn, 2);
    assert_eq!(disk.read(1, 0, 4).unwrap(), blocks(0, 4, 2));
    assert_eq!(disk.read(1, 4, 4).unwrap(), blocks(4, 4, 1));
    // Back to 1: write 2 is undone too.
    disk.submit_now(Record::RollBack { component: 1, to: 1 }).unwrap().await.unwrap();
    assert_eq!(disk.read(1, 0, 8).unwrap(), blocks(0, 8, 1));

    // A write whose LSN is stable has no before-image left to roll back.
    chunk(5, 0, 2, 5, 1, &disk).await.unwrap();
    chunk(6, 4, 2, 6, 5, &disk).await.unwrap();
    disk.submit_now(Record::RollBack { component: 1, to: 4 }).unwrap().await.unwrap();
    assert_eq!(disk.read(1, 0, 2).unwrap(), blocks(0, 2, 5), "write 5 was stable: kept");
    assert_eq!(disk.read(1, 4, 2).unwrap(), blocks(4, 2, 1), "write 6 was not: undone");
    assert!(disk.unmapped_above(1, 0).unwrap().is_empty(), "the unmap's entry went with the stable mark");
}

/// Whether anything landed under a resync since the component was last
/// complete: a new plan empties the blocks it counts as done, not this
/// account, which survives a restart; metadata written before the account
/// existed reads as nothing landed.
#[tokio::test]
async fn what_landed_under_a_resync_is_kept_across_plans_and_restarts() {
    use blockstore::Record;
    let dir = tempfile::tempdir().unwrap();
    let disk = open(dir.path());
    disk.create(1, 16).await.unwrap();
    disk.create(2, 16).await.unwrap();
    disk.write(1, 3, 0, blocks(0, 4, 3)).await.unwrap();
    disk.begin_sync(1, 3, 5, 1).await.unwrap();
    disk.begin_sync(2, 0, 5, 1).await.unwrap();
    assert!(disk.component(1).unwrap().untouched_by_resync, "nothing landed yet");
    disk.begin_sync(1, 3, 6, 2).await.unwrap();
    assert!(disk.component(1).unwrap().untouched_by_resync, "a new plan lands nothing");
    disk.sync_write(1, 2, 8, blocks(8, 1, 6)).await.unwrap();
    assert!(!disk.component(1).unwrap().untouched_by_resync);
    disk.begin_sync(1, 3, 7, 3).await.unwrap();
    let info = disk.component(1).unwrap();
    assert_eq!(info.sync, Some((3, 7, 0)), "the new plan counts no block done");
    assert!(!info.untouched_by_resync, "but what the plan before landed is still there");
    // A rollback leaves such a resync under way.
    disk.submit_now(Record::RollBack { component: 1, to: 2 }).unwrap().await.unwrap();
    assert_eq!(disk.component(1).unwrap().sync, Some((3, 7, 0)));
    // What a crash leaves (no checkpoint since the disk opened): the
    // journal's replay finds the same.
    let image = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), image.path().join(entry.file_name())).unwrap();
    }
    let replayed = open(image.path());
    let (one, two) = (replayed.component(1).unwrap(), replayed.component(2).unwrap());
    assert_eq!(one.sync, Some((3, 7, 0)));
    assert!(!one.untouched_by_resync && two.untouched_by_resync, "replayed: {one:?} {two:?}");
    replayed.close();
    drop(replayed);
    disk.close();
    drop(disk);
    let disk = open(dir.path());
    let (one, two) = (disk.component(1).unwrap(), disk.component(2).unwrap());
    assert!(!one.untouched_by_resync, "kept across a restart: {one:?}");
    assert!(two.untouched_by_resync, "{two:?}");
    disk.close();
    drop(disk);
    // Metadata from before the account: `Meta` alone. With nothing landed
    // under a resync anywhere, the account is one byte (an empty list).
    let disk = open(dir.path());
    disk.end_sync(1, 0).await.unwrap();
    disk.close();
    drop(disk);
    let meta = dir.path().join("meta");
    let bytes = std::fs::read(&meta).unwrap();
    assert_eq!(bytes.last(), Some(&0));
    std::fs::write(&meta, &bytes[..bytes.len() - 1]).unwrap();
    // Read back, it cannot say what landed: every resync under way counts
    // as touched (as every one did before the account).
    let disk = open(dir.path());
    assert!(!disk.component(2).unwrap().untouched_by_resync, "unknown counts as touched");
    assert_eq!(disk.component(1).unwrap().sync, None);
}

/// A rollback ends a resync under which nothing landed: the component
/// holds what it held before it began, rolled back, and counts as current
/// only that far. One under which something landed goes on.
#[tokio::test]
async fn a_rollback_ends_a_resync_under_which_nothing_landed() {
    use blockstore::Record;
    let dir = tempfile::tempdir().unwrap();
    let disk = open(dir.path());
    disk.create(1, 16).await.unwrap();
    for lsn in 1..=4u64 {
        let undo = disk.read(1, lsn, 1).unwrap();
        let record = Record::ChunkWrite { component: 1, lsn, first: lsn, stable: 0, data: blocks(lsn, 1, lsn), undo };
        disk.submit_now(record).unwrap().await.unwrap();
    }
    // Back at stale LSN 3 (it holds 4, a write no other chunk has).
    disk.begin_sync(1, 3, 9, 1).await.unwrap();
    disk.submit_now(Record::RollBack { component: 1, to: 2 }).unwrap().await.unwrap();
    let info = disk.component(1).unwrap();
    assert_eq!((info.sync, info.committed_lsn), (None, 2), "{info:?}");
    assert_eq!(disk.read(1, 3, 2).unwrap(), vec![0u8; 2 * BLOCK_SIZE], "writes 3 and 4 rolled back");
    assert_eq!(disk.read(1, 2, 1).unwrap(), blocks(2, 1, 2));

    // A chunk write sent during the resync lands: the resync goes on.
    disk.begin_sync(1, 2, 9, 2).await.unwrap();
    let undo = disk.read(1, 6, 1).unwrap();
    let record = Record::ChunkWrite { component: 1, lsn: 10, first: 6, stable: 0, data: blocks(6, 1, 10), undo };
    disk.submit_now(record).unwrap().await.unwrap();
    assert!(!disk.component(1).unwrap().untouched_by_resync);
    disk.submit_now(Record::RollBack { component: 1, to: 2 }).unwrap().await.unwrap();
    let info = disk.component(1).unwrap();
    assert_eq!((info.sync, info.committed_lsn), (Some((2, 9, 1)), 2), "{info:?}");
}
