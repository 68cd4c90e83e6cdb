//! A volume over in-memory objects against a plain byte array: any mix of
//! sector-aligned reads, writes and unmaps, across object boundaries and
//! parts of blocks, reads back what the array holds.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::future::BoxFuture;
use proptest::prelude::*;
use volume::{Layout, ObjectIo, Volume, VolumeError, BLOCK, SECTOR};

#[derive(Default)]
struct Objects {
    data: Mutex<HashMap<String, Vec<u8>>>,
    object_size: u64,
    /// Requests that were not whole blocks (there must be none).
    unaligned: Mutex<u64>,
    /// Allocated blocks: (object, block within it).
    allocated: Mutex<HashSet<(String, u64)>>,
}

impl Objects {
    fn check(&self, offset: u64, length: u64) {
        if !offset.is_multiple_of(BLOCK) || !length.is_multiple_of(BLOCK) || offset + length > self.object_size {
            *self.unaligned.lock().unwrap() += 1;
        }
    }
}

impl ObjectIo for Objects {
    fn read(&self, object: &str, offset: u64, length: u64) -> BoxFuture<'static, Result<Bytes, VolumeError>> {
        self.check(offset, length);
        let mut data = self.data.lock().unwrap();
        let bytes = data.entry(object.to_string()).or_insert_with(|| vec![0; self.object_size as usize]);
        let out = Bytes::copy_from_slice(&bytes[offset as usize..(offset + length) as usize]);
        Box::pin(async move { Ok(out) })
    }

    fn write(&self, object: &str, offset: u64, data: Bytes) -> BoxFuture<'static, Result<(), VolumeError>> {
        self.check(offset, data.len() as u64);
        let mut objects = self.data.lock().unwrap();
        let bytes = objects.entry(object.to_string()).or_insert_with(|| vec![0; self.object_size as usize]);
        bytes[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        let mut allocated = self.allocated.lock().unwrap();
        for block in offset / BLOCK..(offset + data.len() as u64) / BLOCK {
            allocated.insert((object.to_string(), block));
        }
        Box::pin(async { Ok(()) })
    }

    fn unmap(&self, object: &str, offset: u64, length: u64) -> BoxFuture<'static, Result<(), VolumeError>> {
        self.check(offset, length);
        let mut objects = self.data.lock().unwrap();
        let bytes = objects.entry(object.to_string()).or_insert_with(|| vec![0; self.object_size as usize]);
        bytes[offset as usize..(offset + length) as usize].fill(0);
        let mut allocated = self.allocated.lock().unwrap();
        for block in offset / BLOCK..(offset + length) / BLOCK {
            allocated.remove(&(object.to_string(), block));
        }
        Box::pin(async { Ok(()) })
    }

    fn provisioning(
        &self,
        object: &str,
        offset: u64,
        length: u64,
    ) -> BoxFuture<'static, Result<(bool, u64), VolumeError>> {
        self.check(offset, length);
        let allocated = self.allocated.lock().unwrap();
        let is = |block: u64| allocated.contains(&(object.to_string(), block));
        let first = offset / BLOCK;
        let mapped = is(first);
        let blocks = (first..(offset + length) / BLOCK).take_while(|&block| is(block) == mapped).count() as u64;
        Box::pin(std::future::ready(Ok((mapped, blocks * BLOCK))))
    }

    fn compare_and_write(
        &self,
        object: &str,
        offset: u64,
        expected: Bytes,
        new: Bytes,
    ) -> BoxFuture<'static, Result<Option<u64>, VolumeError>> {
        // One lock over everything: atomic as an owner makes it.
        let mut objects = self.data.lock().unwrap();
        let bytes = objects.entry(object.to_string()).or_insert_with(|| vec![0; self.object_size as usize]);
        let at = offset as usize;
        let differs = bytes[at..at + expected.len()].iter().zip(&expected[..]).position(|(old, want)| old != want);
        if differs.is_none() {
            bytes[at..at + new.len()].copy_from_slice(&new);
            let mut allocated = self.allocated.lock().unwrap();
            for block in offset / BLOCK..(offset + new.len() as u64).div_ceil(BLOCK) {
                allocated.insert((object.to_string(), block));
            }
        }
        Box::pin(std::future::ready(Ok(differs.map(|at| at as u64))))
    }

    fn flush(&self, _object: &str) -> BoxFuture<'static, Result<(), VolumeError>> {
        Box::pin(async { Ok(()) })
    }
}

#[derive(Clone, Debug)]
enum Op {
    Write { sector: u64, sectors: u64, seed: u8 },
    Unmap { sector: u64, sectors: u64 },
    Read { sector: u64, sectors: u64 },
}

fn op(total: u64) -> impl Strategy<Value = Op> {
    (0..total, 1..40u64, any::<u8>(), 0..3u8).prop_map(move |(sector, sectors, seed, kind)| {
        let sectors = sectors.min(total - sector).max(1);
        match kind {
            0 => Op::Write { sector, sectors, seed },
            1 => Op::Unmap { sector, sectors },
            _ => Op::Read { sector, sectors },
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn a_volume_reads_back_what_a_byte_array_would(ops in proptest::collection::vec(op(3 * 16), 1..60)) {
        // Three objects of two blocks (16 sectors) each.
        let object_size = 2 * BLOCK;
        let size = 3 * object_size;
        let objects = Arc::new(Objects { object_size, ..Objects::default() });
        let layout = Layout { size, object_size, objects: (0..3).map(|index| format!("v.{index}")).collect() };
        let volume = Volume::new(layout, objects.clone()).unwrap();
        let mut model = vec![0u8; size as usize];
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        for op in ops {
            match op {
                Op::Write { sector, sectors, seed } => {
                    let data: Vec<u8> = (0..sectors * SECTOR).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
                    let start = (sector * SECTOR) as usize;
                    model[start..start + data.len()].copy_from_slice(&data);
                    runtime.block_on(volume.write(sector * SECTOR, data.into())).unwrap();
                }
                Op::Unmap { sector, sectors } => {
                    let start = (sector * SECTOR) as usize;
                    model[start..start + (sectors * SECTOR) as usize].fill(0);
                    runtime.block_on(volume.unmap(sector * SECTOR, sectors * SECTOR)).unwrap();
                }
                Op::Read { sector, sectors } => {
                    let got = runtime.block_on(volume.read(sector * SECTOR, sectors * SECTOR)).unwrap();
                    let start = (sector * SECTOR) as usize;
                    prop_assert_eq!(&got[..], &model[start..start + (sectors * SECTOR) as usize]);
                }
            }
        }
        let all = runtime.block_on(volume.read(0, size)).unwrap();
        prop_assert_eq!(&all[..], &model[..]);
        prop_assert_eq!(*objects.unaligned.lock().unwrap(), 0, "objects are read, written and unmapped in whole blocks (parts of blocks go through compare_and_write)");
    }
}

#[test]
fn parts_of_sectors_and_the_end_are_refused() {
    let objects = Arc::new(Objects { object_size: BLOCK, ..Objects::default() });
    let layout = Layout { size: BLOCK, object_size: BLOCK, objects: vec!["v.0".into()] };
    let volume = Volume::new(layout, objects).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    assert!(runtime.block_on(volume.read(1, 512)).is_err());
    assert!(runtime.block_on(volume.write(BLOCK, Bytes::from(vec![0; 512]))).is_err());
}

#[test]
fn provisioning_follows_writes_and_unmaps_across_objects() {
    // Objects of two blocks; the volume's last object has one block inside.
    let objects = Arc::new(Objects { object_size: 2 * BLOCK, ..Objects::default() });
    let layout =
        Layout { size: 5 * BLOCK, object_size: 2 * BLOCK, objects: (0..3).map(|i| format!("v.{i}")).collect() };
    let volume = Volume::new(layout, objects.clone()).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let at = |offset: u64| runtime.block_on(volume.provisioning(offset)).unwrap();
    assert_eq!(at(0), (false, 2 * BLOCK), "nothing written: to the object's end");
    assert_eq!(at(4 * BLOCK), (false, BLOCK), "only the part of the last object inside the volume");
    // One sector written: its whole block is allocated.
    runtime.block_on(volume.write(BLOCK + SECTOR, Bytes::from(vec![7; SECTOR as usize]))).unwrap();
    assert_eq!(at(0), (false, BLOCK));
    assert_eq!(at(BLOCK), (true, BLOCK));
    assert_eq!(at(BLOCK + 3 * SECTOR), (true, BLOCK - 3 * SECTOR), "from a sector inside the block");
    runtime.block_on(volume.write(2 * BLOCK, Bytes::from(vec![7; 3 * BLOCK as usize]))).unwrap();
    assert_eq!(at(2 * BLOCK), (true, 2 * BLOCK));
    assert_eq!(at(4 * BLOCK), (true, BLOCK));
    runtime.block_on(volume.unmap(2 * BLOCK, BLOCK)).unwrap();
    assert_eq!(at(2 * BLOCK), (false, BLOCK));
    assert_eq!(at(3 * BLOCK), (true, BLOCK));
    assert!(runtime.block_on(volume.provisioning(5 * BLOCK)).is_err(), "past the end");
    assert!(runtime.block_on(volume.provisioning(1)).is_err(), "not a sector");
}

/// Objects whose write to `v.0` fails at once and whose write to `v.1`
/// ends 200 ms later, noting that it did.
#[derive(Default)]
struct OneFailsFast {
    slow_write_ended: Arc<std::sync::atomic::AtomicBool>,
}

impl ObjectIo for OneFailsFast {
    fn read(&self, object: &str, _offset: u64, _length: u64) -> BoxFuture<'static, Result<Bytes, VolumeError>> {
        let object = object.to_string();
        Box::pin(async move { Err(VolumeError::Failed { object, reason: "not read here".into() }) })
    }

    fn write(&self, object: &str, _offset: u64, _data: Bytes) -> BoxFuture<'static, Result<(), VolumeError>> {
        let (object, ended) = (object.to_string(), self.slow_write_ended.clone());
        Box::pin(async move {
            if object == "v.0" {
                return Err(VolumeError::Later { object, reason: "its owner is changing".into() });
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            ended.store(true, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        })
    }

    fn unmap(&self, object: &str, _offset: u64, _length: u64) -> BoxFuture<'static, Result<(), VolumeError>> {
        let object = object.to_string();
        Box::pin(async move { Err(VolumeError::Failed { object, reason: "not unmapped here".into() }) })
    }

    fn compare_and_write(
        &self,
        object: &str,
        _offset: u64,
        _expected: Bytes,
        _new: Bytes,
    ) -> BoxFuture<'static, Result<Option<u64>, VolumeError>> {
        let object = object.to_string();
        Box::pin(async move { Err(VolumeError::Failed { object, reason: "not compared here".into() }) })
    }

    fn flush(&self, _object: &str) -> BoxFuture<'static, Result<(), VolumeError>> {
        Box::pin(async { Ok(()) })
    }
}

/// A write across two objects, one of which fails at once, answers only
/// once the other object's piece has ended: dropped on the way, that
/// piece could still reach its owner after the caller was told the write
/// failed, and land over a write sent since.
#[test]
fn a_write_across_objects_answers_only_once_every_piece_has_ended() {
    let objects = Arc::new(OneFailsFast::default());
    let layout = Layout { size: 2 * BLOCK, object_size: BLOCK, objects: vec!["v.0".into(), "v.1".into()] };
    let volume = Volume::new(layout, objects.clone()).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    let written = runtime.block_on(volume.write(0, Bytes::from(vec![7; 2 * BLOCK as usize])));
    assert!(matches!(written, Err(VolumeError::Later { .. })), "{written:?}");
    assert!(
        objects.slow_write_ended.load(std::sync::atomic::Ordering::SeqCst),
        "the write answered while a piece of it was still on its way"
    );
}
