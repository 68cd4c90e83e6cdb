//! A thin-provisioned block device in memory: blocks are allocated on
//! first write and freed by unmap, so provisioning status is truthful.

use std::collections::BTreeMap;
use std::sync::Mutex;

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;

use crate::scsi::{BlockDevice, IoResult};

pub struct MemoryDevice {
    block_size: u32,
    blocks: u64,
    data: Mutex<BTreeMap<u64, Bytes>>,
}

impl MemoryDevice {
    pub fn new(block_size: u32, blocks: u64) -> MemoryDevice {
        MemoryDevice { block_size, blocks, data: Mutex::new(BTreeMap::new()) }
    }

    pub fn mapped_blocks(&self) -> usize {
        self.data.lock().expect("blocks").len()
    }
}

impl BlockDevice for MemoryDevice {
    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn blocks(&self) -> u64 {
        self.blocks
    }

    fn read(&self, lba: u64, count: u32) -> BoxFuture<'_, IoResult<Bytes>> {
        let block = self.block_size as usize;
        let data = self.data.lock().expect("blocks");
        let mut out = BytesMut::zeroed(count as usize * block);
        for (at, bytes) in data.range(lba..lba + u64::from(count)) {
            let offset = (at - lba) as usize * block;
            out[offset..offset + block].copy_from_slice(bytes);
        }
        Box::pin(std::future::ready(Ok(out.freeze())))
    }

    fn write(&self, lba: u64, data: Bytes) -> BoxFuture<'_, IoResult<()>> {
        let block = self.block_size as usize;
        let mut blocks = self.data.lock().expect("blocks");
        for (index, chunk) in data.chunks(block).enumerate() {
            blocks.insert(lba + index as u64, Bytes::copy_from_slice(chunk));
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn unmap(&self, lba: u64, count: u64) -> BoxFuture<'_, IoResult<()>> {
        let mut blocks = self.data.lock().expect("blocks");
        let doomed: Vec<u64> = blocks.range(lba..lba + count).map(|(at, _)| *at).collect();
        for at in doomed {
            blocks.remove(&at);
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn flush(&self) -> BoxFuture<'_, IoResult<()>> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn provisioning(&self, lba: u64) -> BoxFuture<'_, IoResult<(bool, u64)>> {
        let blocks = self.data.lock().expect("blocks");
        let mapped = blocks.contains_key(&lba);
        let mut run = 1;
        while lba + run < self.blocks && blocks.contains_key(&(lba + run)) == mapped && run < 1 << 20 {
            run += 1;
        }
        Box::pin(std::future::ready(Ok((mapped, run))))
    }
}
