//! A volume over in-memory objects against a plain byte array: any mix of
//! sector-aligned reads, writes and unmaps, across object boundaries and
//! parts of blocks, reads back what the array holds.

use std::collections::HashMap;
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
        Box::pin(async { Ok(()) })
    }

    fn unmap(&self, object: &str, offset: u64, length: u64) -> BoxFuture<'static, Result<(), VolumeError>> {
        self.check(offset, length);
        let mut objects = self.data.lock().unwrap();
        let bytes = objects.entry(object.to_string()).or_insert_with(|| vec![0; self.object_size as usize]);
        bytes[offset as usize..(offset + length) as usize].fill(0);
        Box::pin(async { Ok(()) })
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
        prop_assert_eq!(*objects.unaligned.lock().unwrap(), 0, "objects only ever see whole blocks");
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
