//! What a logical unit tells initiators of its device's geometry: the
//! physical block (READ CAPACITY (16)) and the optimal transfer and unmap
//! granularities (Block Limits VPD page), which an erasure-coded volume
//! sets to its stripe.

use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use iscsi::memory::MemoryDevice;
use iscsi::scsi::{BlockDevice, IoResult, LogicalUnit};
use iscsi::sense::status;

const NEXUS: &str = "iqn.2026-11.test:initiator,i,0x1";

/// A memory device with 4 KiB blocks under 512-byte logical blocks,
/// laid out in stripes of `stripe` logical blocks.
struct Striped {
    inner: MemoryDevice,
    stripe: u32,
    physical: u32,
}

impl BlockDevice for Striped {
    fn block_size(&self) -> u32 {
        512
    }
    fn blocks(&self) -> u64 {
        self.inner.blocks()
    }
    fn read(&self, lba: u64, count: u32) -> BoxFuture<'_, IoResult<Bytes>> {
        self.inner.read(lba, count)
    }
    fn write(&self, lba: u64, data: Bytes) -> BoxFuture<'_, IoResult<()>> {
        self.inner.write(lba, data)
    }
    fn unmap(&self, lba: u64, count: u64) -> BoxFuture<'_, IoResult<()>> {
        self.inner.unmap(lba, count)
    }
    fn flush(&self) -> BoxFuture<'_, IoResult<()>> {
        self.inner.flush()
    }
    fn granularity(&self) -> u32 {
        8
    }
    fn stripe(&self) -> u32 {
        self.stripe
    }
    fn physical_block(&self) -> u32 {
        self.physical
    }
}

/// (LBPPBE, optimal transfer length granularity, optimal unmap
/// granularity) the unit reports for `device`; checks that the optimal
/// transfer length is whole stripes.
async fn geometry(device: impl BlockDevice) -> (u8, u16, u32) {
    let unit = LogicalUnit::new(Arc::new(device), 1, "g1");
    let capacity = crate::execute(&unit, NEXUS, 1, &[0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0], &[]).await;
    assert_eq!(capacity.status, status::GOOD, "{capacity:?}");
    let limits = crate::execute(&unit, NEXUS, 1, &[0x12, 0x01, 0xb0, 0, 64, 0], &[]).await;
    assert_eq!(limits.status, status::GOOD, "{limits:?}");
    let page = &limits.data;
    assert_eq!(page[1], 0xb0);
    let transfer = u16::from_be_bytes([page[6], page[7]]);
    let unmap = u32::from_be_bytes([page[28], page[29], page[30], page[31]]);
    let optimal = u32::from_be_bytes([page[12], page[13], page[14], page[15]]);
    assert!(optimal > 0 && optimal.is_multiple_of(u32::from(transfer)), "optimal transfer length {optimal}");
    (capacity.data[13] & 0x0f, transfer, unmap)
}

#[tokio::test]
async fn a_plain_device_reports_one_logical_block_per_physical_block() {
    assert_eq!(geometry(MemoryDevice::new(512, 4096)).await, (0, 1, 1));
}

#[tokio::test]
async fn a_striped_device_reports_its_stripe_as_physical_block_and_granularities() {
    // raid5:2+1: 128 KiB of data per stripe, 256 logical blocks.
    let device = Striped { inner: MemoryDevice::new(512, 4096), stripe: 256, physical: 256 };
    assert_eq!(geometry(device).await, (8, 256, 256));
}

#[tokio::test]
async fn a_stripe_that_is_no_power_of_two_sets_the_granularities_only() {
    // raid5:3+1: 192 KiB per stripe; the physical block stays the device's.
    let device = Striped { inner: MemoryDevice::new(512, 4096), stripe: 384, physical: 1 };
    assert_eq!(geometry(device).await, (0, 384, 384));
}
