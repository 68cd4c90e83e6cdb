//! `volume`: a LUN's bytes over `ceil(S / B)` backend objects (the seed's
//! "logical unit using a plurality of backend objects").
//!
//! - [`Layout`]: object `i` holds volume bytes `[i * B, (i + 1) * B)`;
//!   [`Layout::pieces`] splits a request at object boundaries.
//! - [`Volume`]: reads, writes, unmaps and flushes in sectors (512 bytes)
//!   over objects that store whole 4 KiB blocks: a write or unmap covering
//!   part of a block reads the block, patches it and writes it back. The
//!   caller runs such requests alone (the SCSI layer does: it takes its
//!   unit's lock exclusively for them), so no update is lost.
//! - Growing appends objects; the layout is swapped in place.
//!
//! **Boundary:** knows objects only through [`ObjectIo`]; the node supplies
//! it (owner-local calls or the block client API over the wire).

use std::sync::{Arc, RwLock};

use bytes::{Bytes, BytesMut};
use futures::future::{join_all, try_join_all, BoxFuture};

/// The sector: the volume's logical block.
pub const SECTOR: u64 = 512;
/// The objects' block.
pub const BLOCK: u64 = 4096;
/// The most one object request carries (requests are split at multiples
/// of it within an object, as well as at object boundaries).
pub const CHUNK: u64 = 4 << 20;

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum VolumeError {
    #[error("{0}")]
    Invalid(String),
    /// The object's owner could not serve the request (it failed it, or
    /// cannot tell whether it was carried out): the initiator may retry.
    #[error("object {object} unavailable: {reason}")]
    Unavailable { object: String, reason: String },
    /// No host serves the object now (its owner's host died and no other
    /// has taken it over yet), or no copy of it is available: the same
    /// request may go through in a moment, and nothing of it was carried
    /// out that a second try could not repeat.
    #[error("object {object} unavailable for now: {reason}")]
    Later { object: String, reason: String },
    #[error("object {object} failed: {reason}")]
    Failed { object: String, reason: String },
    /// No room on the object's disks for the blocks the write needed;
    /// nothing was written.
    #[error("object {object}: no room for the write: {reason}")]
    NoSpace { object: String, reason: String },
}

/// Block I/O on named objects (offsets and lengths in whole 4 KiB blocks).
pub trait ObjectIo: Send + Sync + 'static {
    fn read(&self, object: &str, offset: u64, length: u64) -> BoxFuture<'static, Result<Bytes, VolumeError>>;
    fn write(&self, object: &str, offset: u64, data: Bytes) -> BoxFuture<'static, Result<(), VolumeError>>;
    fn unmap(&self, object: &str, offset: u64, length: u64) -> BoxFuture<'static, Result<(), VolumeError>>;
    fn flush(&self, object: &str) -> BoxFuture<'static, Result<(), VolumeError>>;
    /// Replaces the key of an object encrypted at rest: what it held reads
    /// as noise from then on, blocks never written as zeros. Without keys
    /// of its own, refused.
    fn erase_key(&self, object: &str) -> BoxFuture<'static, Result<(), VolumeError>> {
        let refused = VolumeError::Invalid(format!("object {object} is not encrypted at rest"));
        Box::pin(std::future::ready(Err(refused)))
    }
    /// Writes `new` at `offset` (any bytes within the object) if the bytes
    /// there are `expected` (empty: unconditionally), as one step no other
    /// write to the object overlaps, whichever host it comes from (at the
    /// object's owner). `Ok(Some(at))`: byte `at` differs, nothing written.
    fn compare_and_write(
        &self,
        object: &str,
        offset: u64,
        expected: Bytes,
        new: Bytes,
    ) -> BoxFuture<'static, Result<Option<u64>, VolumeError>>;
    /// Whether the block at `offset` is allocated, and for how many bytes
    /// from it (up to `length`) that holds. Without an answer of its own,
    /// everything is allocated.
    fn provisioning(
        &self,
        _object: &str,
        _offset: u64,
        length: u64,
    ) -> BoxFuture<'static, Result<(bool, u64), VolumeError>> {
        Box::pin(std::future::ready(Ok((true, length))))
    }
}

/// Where a volume's bytes live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub size: u64,
    pub object_size: u64,
    pub objects: Vec<String>,
}

/// One part of a request that falls in one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Piece {
    pub object: usize,
    /// Offset within the object.
    pub offset: u64,
    pub length: u64,
    /// Offset within the request.
    pub at: u64,
}

impl Layout {
    /// How many objects a volume of `size` bytes needs.
    pub fn objects_for(size: u64, object_size: u64) -> u64 {
        size.div_ceil(object_size)
    }

    pub fn check(&self) -> Result<(), VolumeError> {
        if self.object_size == 0 || !self.object_size.is_multiple_of(BLOCK) {
            return Err(VolumeError::Invalid(format!("object size {} is not a multiple of {BLOCK}", self.object_size)));
        }
        if !self.size.is_multiple_of(BLOCK) {
            return Err(VolumeError::Invalid(format!("size {} is not a multiple of {BLOCK}", self.size)));
        }
        if (self.objects.len() as u64) < Self::objects_for(self.size, self.object_size) {
            return Err(VolumeError::Invalid(format!(
                "{} objects cannot hold {} bytes of {}-byte objects",
                self.objects.len(),
                self.size,
                self.object_size
            )));
        }
        Ok(())
    }

    /// Splits `[offset, offset + length)` at object boundaries and at
    /// [`CHUNK`] boundaries within objects.
    pub fn pieces(&self, offset: u64, length: u64) -> Result<Vec<Piece>, VolumeError> {
        let end = offset.checked_add(length).filter(|end| *end <= self.size).ok_or_else(|| {
            VolumeError::Invalid(format!("bytes {offset}+{length} beyond the volume's {}", self.size))
        })?;
        let mut pieces = Vec::new();
        let mut at = offset;
        while at < end {
            let object = (at / self.object_size) as usize;
            let within = at % self.object_size;
            let chunk_end = ((within / CHUNK + 1) * CHUNK).min(self.object_size);
            let length = (chunk_end - within).min(end - at);
            pieces.push(Piece { object, offset: within, length, at: at - offset });
            at += length;
        }
        Ok(pieces)
    }
}

/// A volume served over its objects.
pub struct Volume {
    layout: RwLock<Layout>,
    io: Arc<dyn ObjectIo>,
}

fn align_down(value: u64) -> u64 {
    value / BLOCK * BLOCK
}

fn align_up(value: u64) -> u64 {
    value.div_ceil(BLOCK) * BLOCK
}

impl Volume {
    pub fn new(layout: Layout, io: Arc<dyn ObjectIo>) -> Result<Volume, VolumeError> {
        layout.check()?;
        Ok(Volume { layout: RwLock::new(layout), io })
    }

    pub fn size(&self) -> u64 {
        self.layout.read().expect("layout").size
    }

    pub fn layout(&self) -> Layout {
        self.layout.read().expect("layout").clone()
    }

    /// Takes a grown layout (same objects first, more after).
    pub fn set_layout(&self, layout: Layout) -> Result<(), VolumeError> {
        layout.check()?;
        *self.layout.write().expect("layout") = layout;
        Ok(())
    }

    fn sectors(offset: u64, length: u64) -> Result<(), VolumeError> {
        if !offset.is_multiple_of(SECTOR) || !length.is_multiple_of(SECTOR) {
            return Err(VolumeError::Invalid(format!("bytes {offset}+{length} are not whole {SECTOR}-byte sectors")));
        }
        Ok(())
    }

    pub async fn read(&self, offset: u64, length: u64) -> Result<Bytes, VolumeError> {
        Self::sectors(offset, length)?;
        let layout = self.layout();
        let pieces = layout.pieces(offset, length)?;
        let reads = pieces.iter().map(|piece| {
            let object = layout.objects[piece.object].clone();
            let (start, end) = (align_down(piece.offset), align_up(piece.offset + piece.length));
            let io = self.io.clone();
            let piece = piece.clone();
            async move {
                let data = io.read(&object, start, end - start).await?;
                let from = (piece.offset - start) as usize;
                Ok::<Bytes, VolumeError>(data.slice(from..from + piece.length as usize))
            }
        });
        let parts = try_join_all(reads).await?;
        if parts.len() == 1 {
            return Ok(parts.into_iter().next().expect("one part"));
        }
        let mut out = BytesMut::with_capacity(length as usize);
        for part in parts {
            out.extend_from_slice(&part);
        }
        Ok(out.freeze())
    }

    /// Writes whole sectors; parts of blocks are read-modify-written at the
    /// object's owner, as one step (two hosts writing different sectors of
    /// one block lose neither). Answers once every object's piece has
    /// ended, even when one has failed: a piece given up on could still
    /// land after the caller was told the write failed, over a later write.
    pub async fn write(&self, offset: u64, data: Bytes) -> Result<(), VolumeError> {
        Self::sectors(offset, data.len() as u64)?;
        let layout = self.layout();
        let pieces = layout.pieces(offset, data.len() as u64)?;
        let writes = pieces.iter().map(|piece| {
            let object = layout.objects[piece.object].clone();
            let part = data.slice(piece.at as usize..(piece.at + piece.length) as usize);
            self.write_piece(object, piece.offset, part)
        });
        join_all(writes).await.into_iter().collect::<Result<Vec<()>, VolumeError>>()?;
        Ok(())
    }

    async fn write_piece(&self, object: String, offset: u64, part: Bytes) -> Result<(), VolumeError> {
        let (start, end) = (align_down(offset), align_up(offset + part.len() as u64));
        if start == offset && end == offset + part.len() as u64 {
            return self.io.write(&object, offset, part).await;
        }
        self.io.compare_and_write(&object, offset, Bytes::new(), part).await.map(|_| ())
    }

    /// Writes `new` at `offset` (whole sectors, within one object) if the
    /// bytes there are `expected`, as one step at the object's owner (SCSI
    /// COMPARE AND WRITE through any host). `Ok(Some(at))`: byte `at`
    /// differs, nothing written.
    pub async fn compare_and_write(
        &self,
        offset: u64,
        expected: Bytes,
        new: Bytes,
    ) -> Result<Option<u64>, VolumeError> {
        Self::sectors(offset, new.len() as u64)?;
        Self::sectors(offset, expected.len() as u64)?;
        let layout = self.layout();
        let pieces = layout.pieces(offset, expected.len().max(new.len()) as u64)?;
        let [piece] = &pieces[..] else {
            return Err(VolumeError::Invalid(format!(
                "a compare-and-write of bytes {offset}+{} spans two objects",
                new.len()
            )));
        };
        self.io.compare_and_write(&layout.objects[piece.object], piece.offset, expected, new).await
    }

    /// Whether the sector at `offset` is allocated, and how many bytes from
    /// it share that state (to the end of its object at most). A sector is
    /// allocated when its 4 KiB block is.
    pub async fn provisioning(&self, offset: u64) -> Result<(bool, u64), VolumeError> {
        Self::sectors(offset, 0)?;
        let layout = self.layout();
        if offset >= layout.size {
            return Err(VolumeError::Invalid(format!("byte {offset} is beyond the volume's {}", layout.size)));
        }
        let object = (offset / layout.object_size) as usize;
        let within = offset % layout.object_size;
        let start = align_down(within);
        // The object's bytes that lie inside the volume.
        let object_end = (layout.size - object as u64 * layout.object_size).min(layout.object_size);
        let (mapped, bytes) = self.io.provisioning(&layout.objects[object], start, object_end - start).await?;
        let bytes = bytes.clamp(BLOCK, object_end - start);
        Ok((mapped, bytes - (within - start)))
    }

    /// Deallocates whole blocks and zeroes the parts of blocks at the
    /// edges, so the whole range reads as zeros.
    pub async fn unmap(&self, offset: u64, length: u64) -> Result<(), VolumeError> {
        Self::sectors(offset, length)?;
        let layout = self.layout();
        for piece in layout.pieces(offset, length)? {
            let object = layout.objects[piece.object].clone();
            let end = piece.offset + piece.length;
            let (inner_start, inner_end) = (align_up(piece.offset), align_down(end));
            if inner_start < inner_end {
                self.io.unmap(&object, inner_start, inner_end - inner_start).await?;
                if piece.offset < inner_start {
                    self.zero(&object, piece.offset, inner_start - piece.offset).await?;
                }
                if inner_end < end {
                    self.zero(&object, inner_end, end - inner_end).await?;
                }
            } else {
                self.zero(&object, piece.offset, piece.length).await?;
            }
        }
        Ok(())
    }

    async fn zero(&self, object: &str, offset: u64, length: u64) -> Result<(), VolumeError> {
        self.write_piece(object.to_string(), offset, Bytes::from(vec![0u8; length as usize])).await
    }

    pub async fn flush(&self) -> Result<(), VolumeError> {
        let layout = self.layout();
        try_join_all(layout.objects.iter().map(|object| self.io.flush(object))).await?;
        Ok(())
    }

    /// Replaces the key of every object of an encrypted volume
    /// ([`ObjectIo::erase_key`]), `KEYS_AT_ONCE` at a time: nothing
    /// written before reads back (SANITIZE's CRYPTO ERASE).
    pub async fn erase_keys(&self) -> Result<(), VolumeError> {
        use futures::{StreamExt, TryStreamExt};
        const KEYS_AT_ONCE: usize = 16;
        let erases: Vec<_> = self.layout().objects.iter().map(|object| self.io.erase_key(object)).collect();
        futures::stream::iter(erases).buffer_unordered(KEYS_AT_ONCE).try_collect::<()>().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(size: u64, object_size: u64) -> Layout {
        let count = Layout::objects_for(size, object_size);
        Layout { size, object_size, objects: (0..count).map(|index| format!("v.{index}")).collect() }
    }

    #[test]
    fn a_request_across_an_object_boundary_is_split_there() {
        let layout = layout(3 * 8192, 8192);
        let pieces = layout.pieces(8192 - 512, 1024).unwrap();
        assert_eq!(
            pieces,
            vec![
                Piece { object: 0, offset: 8192 - 512, length: 512, at: 0 },
                Piece { object: 1, offset: 0, length: 512, at: 512 },
            ]
        );
    }

    #[test]
    fn a_long_request_is_split_into_chunks() {
        let layout = layout(4 * CHUNK, 4 * CHUNK);
        let pieces = layout.pieces(CHUNK - 4096, 2 * CHUNK).unwrap();
        let lengths: Vec<u64> = pieces.iter().map(|piece| piece.length).collect();
        assert_eq!(lengths, vec![4096, CHUNK, CHUNK - 4096]);
        assert!(pieces.iter().all(|piece| piece.length <= CHUNK));
    }

    #[test]
    fn requests_beyond_the_end_are_refused() {
        let layout = layout(8192, 4096);
        assert!(layout.pieces(4096, 8192).is_err());
        assert!(layout.pieces(u64::MAX, 2).is_err());
        assert_eq!(layout.pieces(8192, 0).unwrap(), vec![]);
    }

    #[test]
    fn a_volume_needs_ceil_size_over_object_size_objects() {
        assert_eq!(Layout::objects_for(10 * 4096, 4 * 4096), 3);
        assert_eq!(Layout::objects_for(8 * 4096, 4 * 4096), 2);
        assert!(Layout { size: 8 * 4096, object_size: 4 * 4096, objects: vec!["a".into()] }.check().is_err());
    }
}
