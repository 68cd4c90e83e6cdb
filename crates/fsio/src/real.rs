use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use crate::{File, Fs};

/// The operating system's file system.
#[derive(Clone, Copy, Debug, Default)]
pub struct RealFs;

struct RealFile(std::fs::File);

impl File for RealFile {
    fn read_at(&self, buffer: &mut [u8], offset: u64) -> io::Result<usize> {
        self.0.read_at(buffer, offset)
    }

    fn write_at(&self, bytes: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(bytes, offset)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        // SAFETY: fallocate on a valid open descriptor with plain integer
        // arguments; it does not touch our memory.
        let result = unsafe {
            libc::fallocate(
                self.0.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if result == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.blocks() * 512)
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        // SAFETY: as in punch_hole. Mode 0 with the range inside the file
        // allocates holes and leaves every byte as it reads.
        let result = unsafe { libc::fallocate(self.0.as_raw_fd(), 0, offset as libc::off_t, len as libc::off_t) };
        if result == 0 {
            return Ok(());
        }
        let error = io::Error::last_os_error();
        match error.raw_os_error() {
            // This file system allocates only on write.
            Some(libc::EOPNOTSUPP) => Ok(()),
            _ => Err(error),
        }
    }
}

impl Fs for RealFs {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            names.push(entry?.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        Ok(names)
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn File>> {
        let file = OpenOptions::new().read(true).write(true).create(create).truncate(false).open(path)?;
        Ok(Arc::new(RealFile(file)))
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_dir_all(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        std::fs::File::open(dir)?.sync_all()
    }

    fn available(&self, dir: &Path) -> io::Result<u64> {
        filesystem_space(dir).map(|(_, available)| available)
    }
}

/// (capacity, bytes an unprivileged writer may still allocate) of the
/// file system holding `path` (`statvfs`).
pub fn filesystem_space(path: &Path) -> io::Result<(u64, u64)> {
    let path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path with a NUL byte"))?;
    let mut stats = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: a NUL-terminated path and a buffer statvfs fills whole when
    // it returns 0.
    if unsafe { libc::statvfs(path.as_ptr(), stats.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled the buffer.
    let stats = unsafe { stats.assume_init() };
    // The fields' widths differ between targets.
    #[allow(clippy::unnecessary_cast)]
    let (blocks, available, size) = (stats.f_blocks as u64, stats.f_bavail as u64, stats.f_frsize as u64);
    Ok((blocks.saturating_mul(size), available.saturating_mul(size)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn punching_frees_blocks_and_reads_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let fs = RealFs;
        let file = fs.open(&dir.path().join("f"), true).unwrap();
        file.write_at(&vec![0xab; 1 << 20], 0).unwrap();
        file.sync_data().unwrap();
        let before = file.allocated_bytes().unwrap();
        file.punch_hole(4096, 512 * 1024).unwrap();
        let after = file.allocated_bytes().unwrap();
        assert!(after + 500 * 1024 <= before, "before {before} after {after}");
        let mut buffer = vec![1u8; 4096];
        file.read_exact_at(&mut buffer, 8192).unwrap();
        assert!(buffer.iter().all(|byte| *byte == 0));
        assert_eq!(file.len().unwrap(), 1 << 20);
    }

    #[test]
    fn allocating_keeps_what_a_range_reads_and_takes_its_space() {
        let dir = tempfile::tempdir().unwrap();
        let fs = RealFs;
        let file = fs.open(&dir.path().join("f"), true).unwrap();
        file.set_len(1 << 20).unwrap();
        file.write_at(&[7u8; 4096], 8192).unwrap();
        let before = file.allocated_bytes().unwrap();
        file.allocate(0, 1 << 20).unwrap();
        assert!(file.allocated_bytes().unwrap() >= before + 900 * 1024, "nothing allocated");
        let mut buffer = vec![1u8; 3 * 4096];
        file.read_exact_at(&mut buffer, 4096).unwrap();
        assert!(buffer[..4096].iter().all(|byte| *byte == 0));
        assert!(buffer[4096..8192].iter().all(|byte| *byte == 7));
        assert_eq!(file.len().unwrap(), 1 << 20);
        let available = fs.available(dir.path()).unwrap();
        assert!(available > 0 && available < u64::MAX, "{available}");
    }

    #[test]
    fn atomic_replace() {
        let dir = tempfile::tempdir().unwrap();
        let fs = RealFs;
        let path = dir.path().join("meta");
        fs.write_file_atomic(&path, b"one").unwrap();
        fs.write_file_atomic(&path, b"two").unwrap();
        assert_eq!(fs.read_file(&path).unwrap(), b"two");
        assert_eq!(fs.list(dir.path()).unwrap(), vec!["meta".to_string()]);
    }
}
