//! `fsio`: the file operations Tessera's stores use, behind a trait.
//!
//! [`RealFs`] is the operating system's file system (with `fallocate` hole
//! punching and `fdatasync`). [`SimFs`] keeps files in memory and models what
//! a crash does: everything not made durable by `sync_data` (file contents)
//! or `sync_dir` (creations, renames, removals) is lost, optionally leaving a
//! torn, seeded-random prefix of unsynced appends. Stores written against
//! [`Fs`] run unchanged under the `sim` crate, where a missing fsync shows up
//! as lost data.
//!
//! **Invariant:** after `sync_data` returns, a file's contents survive a
//! crash; after `sync_dir` returns, the directory's entries do.
//!
//! **Boundary:** knows nothing of any record format; no other Tessera crate.

mod real;
mod sim;
pub mod tmpfs;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use real::{filesystem_space, RealFs};
pub use sim::SimFs;

/// An open file. Offsets are absolute; there is no cursor.
pub trait File: Send + Sync {
    fn read_at(&self, buffer: &mut [u8], offset: u64) -> io::Result<usize>;
    fn write_at(&self, bytes: &[u8], offset: u64) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes the file's contents durable (`fdatasync`).
    fn sync_data(&self) -> io::Result<()>;
    /// Frees the blocks wholly inside `[offset, offset + len)` and zeroes the
    /// partial blocks at either end; the file's length does not change.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Bytes the file occupies on disk (not its length).
    fn allocated_bytes(&self) -> io::Result<u64>;
    /// Allocates the blocks of `[offset, offset + len)` that are holes,
    /// leaving what they read as unchanged, so that a later write inside
    /// the range cannot fail for want of space (`fallocate` mode 0). Fails
    /// with `StorageFull` (ENOSPC) when the file system has no room. A file
    /// system that cannot allocate ahead answers `Ok` and allocates on
    /// write, as before.
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }

    /// Reads exactly `buffer.len()` bytes or fails with `UnexpectedEof`.
    fn read_exact_at(&self, buffer: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buffer.len() {
            let read = self.read_at(&mut buffer[done..], offset + done as u64)?;
            if read == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "read past end of file"));
            }
            done += read;
        }
        Ok(())
    }
}

/// A file system.
pub trait Fs: Send + Sync + 'static {
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Names (not paths) of the entries of `dir`, sorted.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    fn exists(&self, path: &Path) -> bool;
    /// Opens for reading and writing; creates the file if `create`.
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn File>>;
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    fn remove_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Atomic rename. Fails if `to` is a non-empty directory.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Makes creations, removals and renames in `dir` durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Bytes an unprivileged writer can still allocate on the file system
    /// holding `dir` (`statvfs`: free blocks available times their size).
    /// A file system without a limit answers `u64::MAX`.
    fn available(&self, dir: &Path) -> io::Result<u64> {
        let _ = dir;
        Ok(u64::MAX)
    }

    fn read_file(&self, path: &Path) -> io::Result<Vec<u8>> {
        let file = self.open(path, false)?;
        let mut bytes = vec![0u8; file.len()? as usize];
        file.read_exact_at(&mut bytes, 0)?;
        Ok(bytes)
    }

    /// Replaces `path` with `bytes` so that a crash leaves either the old or
    /// the new contents, never a mix: write a temporary file, sync it, rename
    /// it over `path`, sync the directory.
    fn write_file_atomic(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        let temporary = self.write_aside(path, bytes)?;
        self.put_in_place(&temporary, path)
    }

    /// The first half of [`Fs::write_file_atomic`]: writes and syncs
    /// `bytes` to a temporary file beside `path`, which it returns. Until
    /// [`Fs::put_in_place`], `path` is untouched, whatever fails.
    fn write_aside(&self, path: &Path, bytes: &[u8]) -> io::Result<PathBuf> {
        let mut temporary = path.as_os_str().to_owned();
        temporary.push(".tmp");
        let temporary = PathBuf::from(temporary);
        let file = self.open(&temporary, true)?;
        file.set_len(0)?;
        file.write_at(bytes, 0)?;
        file.sync_data()?;
        Ok(temporary)
    }

    /// The second half: renames `temporary` over `path` and syncs the
    /// directory.
    fn put_in_place(&self, temporary: &Path, path: &Path) -> io::Result<()> {
        self.rename(temporary, path)?;
        self.sync_dir(path.parent().unwrap_or_else(|| Path::new(".")))
    }
}

/// The real file system, shared.
pub fn real() -> Arc<dyn Fs> {
    Arc::new(RealFs)
}
