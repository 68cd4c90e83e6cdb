use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::{File, Fs};

const BLOCK_SIZE: u64 = 4096;

/// Contents of one file: what is durable and what is only in the "page cache".
#[derive(Default)]
struct Inode {
    durable: Vec<u8>,
    current: Vec<u8>,
    /// Whether `current` differs from `durable`.
    dirty: bool,
    /// Blocks freed by punch_hole (index = block number), for allocated_bytes.
    holes: std::collections::BTreeSet<u64>,
    durable_holes: std::collections::BTreeSet<u64>,
}

#[derive(Default)]
struct State {
    /// Every inode a path names, now or as a crash would leave it; one
    /// neither names is freed (an open handle keeps its own).
    inodes: BTreeMap<usize, Arc<Mutex<Inode>>>,
    next_inode: usize,
    /// Path → inode index, as the running system sees it.
    current: BTreeMap<PathBuf, usize>,
    /// Path → inode index, as a crash would leave it.
    durable: BTreeMap<PathBuf, usize>,
    /// Directories that exist (directories are always durable here: Tessera
    /// creates them once at start-up and syncs their parents).
    directories: std::collections::BTreeSet<PathBuf>,
}

/// An in-memory file system that loses unsynced data on [`SimFs::crash`].
#[derive(Clone)]
pub struct SimFs {
    state: Arc<Mutex<State>>,
    rng: Arc<Mutex<StdRng>>,
    full: Arc<AtomicBool>,
}

impl SimFs {
    pub fn new(seed: u64) -> SimFs {
        SimFs {
            state: Arc::new(Mutex::new(State::default())),
            rng: Arc::new(Mutex::new(StdRng::seed_from_u64(seed))),
            full: Arc::new(AtomicBool::new(false)),
        }
    }

    /// A full file system: nothing is available, allocating ahead fails,
    /// and so does a write that would make a file longer (`StorageFull`);
    /// writes inside a file's length, and making it longer as a sparse
    /// file does, still work.
    pub fn set_full(&self, full: bool) {
        self.full.store(full, Ordering::SeqCst);
    }

    /// What a power loss does: every file reverts to its last synced
    /// contents, except that an unsynced append may survive as a torn,
    /// random-length prefix when `torn_writes` is set. Directory entries
    /// revert to the last `sync_dir`. Open handles from before the crash
    /// must not be used again (the process died with them).
    pub fn crash(&self, torn_writes: bool) {
        let mut state = self.state.lock().expect("simfs lock poisoned");
        let mut rng = self.rng.lock().expect("simfs rng lock poisoned");
        let mut fresh = BTreeMap::new();
        for (index, inode) in &state.inodes {
            let old = inode.lock().expect("inode lock poisoned");
            let mut contents = old.durable.clone();
            if torn_writes && old.dirty && old.current.len() > old.durable.len() {
                let common = old.durable.len();
                if old.current[..common] == old.durable[..] {
                    let extra = rng.gen_range(0..=old.current.len() - common);
                    contents.extend_from_slice(&old.current[common..common + extra]);
                }
            }
            let inode = Inode {
                durable: contents.clone(),
                current: contents,
                dirty: false,
                holes: old.durable_holes.clone(),
                durable_holes: old.durable_holes.clone(),
            };
            fresh.insert(*index, Arc::new(Mutex::new(inode)));
        }
        state.inodes = fresh;
        state.current = state.durable.clone();
        state.free_unnamed();
    }

    /// How many inodes are kept (for tests).
    pub fn inode_count(&self) -> usize {
        self.state.lock().expect("simfs lock poisoned").inodes.len()
    }
}

impl State {
    fn free_unnamed(&mut self) {
        let named: std::collections::BTreeSet<usize> =
            self.current.values().chain(self.durable.values()).copied().collect();
        self.inodes.retain(|index, _| named.contains(index));
    }
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("{}: no such file", path.display()))
}

struct SimFile(Arc<Mutex<Inode>>, Arc<AtomicBool>);

impl SimFile {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inode> {
        self.0.lock().expect("inode lock poisoned")
    }

    fn full(&self) -> io::Result<()> {
        match self.1.load(Ordering::SeqCst) {
            true => Err(io::Error::new(io::ErrorKind::StorageFull, "no space left on the simulated disk")),
            false => Ok(()),
        }
    }
}

impl File for SimFile {
    fn read_at(&self, buffer: &mut [u8], offset: u64) -> io::Result<usize> {
        let inode = self.lock();
        let offset = offset as usize;
        if offset >= inode.current.len() {
            return Ok(0);
        }
        let count = buffer.len().min(inode.current.len() - offset);
        buffer[..count].copy_from_slice(&inode.current[offset..offset + count]);
        Ok(count)
    }

    fn write_at(&self, bytes: &[u8], offset: u64) -> io::Result<()> {
        let mut inode = self.lock();
        let end = offset as usize + bytes.len();
        if inode.current.len() < end {
            self.full()?;
            inode.current.resize(end, 0);
        }
        inode.current[offset as usize..end].copy_from_slice(bytes);
        let first = offset / BLOCK_SIZE;
        let last = (end as u64).div_ceil(BLOCK_SIZE);
        for block in first..last {
            inode.holes.remove(&block);
        }
        inode.dirty = true;
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().current.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut inode = self.lock();
        inode.current.resize(len as usize, 0);
        inode.dirty = true;
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut inode = self.lock();
        inode.durable = inode.current.clone();
        inode.durable_holes = inode.holes.clone();
        inode.dirty = false;
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut inode = self.lock();
        let file_len = inode.current.len() as u64;
        let end = (offset + len).min(file_len);
        if offset >= end {
            return Ok(());
        }
        inode.current[offset as usize..end as usize].fill(0);
        for block in offset.div_ceil(BLOCK_SIZE)..end / BLOCK_SIZE {
            inode.holes.insert(block);
        }
        // Hole punching is a metadata operation that the real file systems
        // Tessera runs on journal; model it as durable at once, like the
        // zeroing of the partial blocks, so a crash never resurrects data a
        // store has already forgotten about.
        let durable_end = (end as usize).min(inode.durable.len());
        if (offset as usize) < durable_end {
            inode.durable[offset as usize..durable_end].fill(0);
        }
        inode.durable_holes = inode.holes.clone();
        Ok(())
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        let inode = self.lock();
        let blocks = (inode.current.len() as u64).div_ceil(BLOCK_SIZE);
        Ok((blocks - inode.holes.len() as u64) * BLOCK_SIZE)
    }

    fn allocate(&self, _offset: u64, _len: u64) -> io::Result<()> {
        self.full()
    }
}

impl Fs for SimFs {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut state = self.state.lock().expect("simfs lock poisoned");
        for ancestor in path.ancestors() {
            state.directories.insert(ancestor.to_path_buf());
        }
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let state = self.state.lock().expect("simfs lock poisoned");
        if !state.directories.contains(dir) {
            return Err(not_found(dir));
        }
        let mut names: Vec<String> = state
            .current
            .keys()
            .chain(state.directories.iter())
            .filter(|path| path.parent() == Some(dir))
            .filter_map(|path| path.file_name().map(|name| name.to_string_lossy().into_owned()))
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    fn exists(&self, path: &Path) -> bool {
        let state = self.state.lock().expect("simfs lock poisoned");
        state.current.contains_key(path) || state.directories.contains(path)
    }

    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn File>> {
        let mut state = self.state.lock().expect("simfs lock poisoned");
        if let Some(index) = state.current.get(path) {
            return Ok(Arc::new(SimFile(state.inodes[index].clone(), self.full.clone())));
        }
        if !create {
            return Err(not_found(path));
        }
        let parent = path.parent().unwrap_or_else(|| Path::new("/"));
        if !state.directories.contains(parent) {
            return Err(not_found(parent));
        }
        let index = state.next_inode;
        state.next_inode += 1;
        let inode = Arc::new(Mutex::new(Inode::default()));
        state.inodes.insert(index, inode.clone());
        state.current.insert(path.to_path_buf(), index);
        Ok(Arc::new(SimFile(inode, self.full.clone())))
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut state = self.state.lock().expect("simfs lock poisoned");
        state.current.remove(path).ok_or_else(|| not_found(path))?;
        state.free_unnamed();
        Ok(())
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut state = self.state.lock().expect("simfs lock poisoned");
        state.current.retain(|file, _| !file.starts_with(path));
        state.durable.retain(|file, _| !file.starts_with(path));
        state.directories.retain(|directory| !directory.starts_with(path));
        state.free_unnamed();
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut state = self.state.lock().expect("simfs lock poisoned");
        if state.directories.contains(from) {
            if state.directories.contains(to) || state.current.contains_key(to) {
                return Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("{} exists", to.display())));
            }
            let moved: Vec<PathBuf> = state.current.keys().filter(|path| path.starts_with(from)).cloned().collect();
            for path in moved {
                let index = state.current.remove(&path).expect("listed above");
                let renamed = to.join(path.strip_prefix(from).expect("listed under from"));
                state.current.insert(renamed.clone(), index);
                // Directory renames are modelled as durable at once.
                state.durable.remove(&path);
                state.durable.insert(renamed, index);
            }
            state.directories.remove(from);
            state.directories.insert(to.to_path_buf());
            return Ok(());
        }
        let index = state.current.remove(from).ok_or_else(|| not_found(from))?;
        state.current.insert(to.to_path_buf(), index);
        state.free_unnamed();
        Ok(())
    }

    fn available(&self, _dir: &Path) -> io::Result<u64> {
        Ok(if self.full.load(Ordering::SeqCst) { 0 } else { u64::MAX })
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut state = self.state.lock().expect("simfs lock poisoned");
        let current: Vec<(PathBuf, usize)> = state
            .current
            .iter()
            .filter(|(path, _)| path.parent() == Some(dir))
            .map(|(path, index)| (path.clone(), *index))
            .collect();
        state.durable.retain(|path, _| path.parent() != Some(dir));
        state.durable.extend(current);
        state.free_unnamed();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_loses_unsynced_data_and_entries() {
        let fs = SimFs::new(1);
        let dir = Path::new("/d");
        fs.create_dir_all(dir).unwrap();
        let synced = fs.open(&dir.join("a"), true).unwrap();
        synced.write_at(b"durable", 0).unwrap();
        synced.sync_data().unwrap();
        fs.sync_dir(dir).unwrap();
        synced.write_at(b" and not", 7).unwrap();
        let unsynced_entry = fs.open(&dir.join("b"), true).unwrap();
        unsynced_entry.write_at(b"x", 0).unwrap();
        unsynced_entry.sync_data().unwrap();
        fs.crash(false);
        assert_eq!(fs.read_file(&dir.join("a")).unwrap(), b"durable");
        assert!(!fs.exists(&dir.join("b")), "a file whose directory entry was never synced is gone");
    }

    #[test]
    fn a_removed_file_is_freed_once_no_directory_entry_names_it() {
        let fs = SimFs::new(1);
        let dir = Path::new("/d");
        fs.create_dir_all(dir).unwrap();
        for generation in 0..100 {
            let path = dir.join(format!("journal-{generation}"));
            let file = fs.open(&path, true).unwrap();
            file.write_at(&[1; 4096], 0).unwrap();
            file.sync_data().unwrap();
            fs.sync_dir(dir).unwrap();
            if generation > 0 {
                fs.remove_file(&dir.join(format!("journal-{}", generation - 1))).unwrap();
            }
        }
        // The newest, and the one removed last (a crash would bring its
        // entry back until the directory is synced).
        assert_eq!(fs.inode_count(), 2);
        fs.crash(false);
        assert_eq!(fs.read_file(&dir.join("journal-98")).unwrap(), vec![1; 4096]);
        fs.sync_dir(dir).unwrap();
        assert_eq!(fs.inode_count(), 2);
        fs.remove_file(&dir.join("journal-98")).unwrap();
        fs.sync_dir(dir).unwrap();
        assert_eq!(fs.inode_count(), 1);
    }

    #[test]
    fn torn_append_keeps_a_prefix() {
        let fs = SimFs::new(3);
        let dir = Path::new("/d");
        fs.create_dir_all(dir).unwrap();
        let file = fs.open(&dir.join("log"), true).unwrap();
        fs.sync_dir(dir).unwrap();
        file.write_at(b"0123", 0).unwrap();
        file.sync_data().unwrap();
        file.write_at(b"456789", 4).unwrap();
        fs.crash(true);
        let contents = fs.read_file(&dir.join("log")).unwrap();
        assert!(contents.len() >= 4 && b"0123456789".starts_with(&contents), "{contents:?}");
    }

    #[test]
    fn atomic_replace_survives_crash_whole() {
        let fs = SimFs::new(5);
        let dir = Path::new("/d");
        fs.create_dir_all(dir).unwrap();
        fs.write_file_atomic(&dir.join("meta"), b"v1").unwrap();
        fs.write_file_atomic(&dir.join("meta"), b"v2").unwrap();
        fs.crash(true);
        assert_eq!(fs.read_file(&dir.join("meta")).unwrap(), b"v2");
    }

    #[test]
    fn punched_blocks_are_not_allocated() {
        let fs = SimFs::new(9);
        fs.create_dir_all(Path::new("/d")).unwrap();
        let file = fs.open(Path::new("/d/f"), true).unwrap();
        file.write_at(&[7u8; 40960], 0).unwrap();
        assert_eq!(file.allocated_bytes().unwrap(), 40960);
        file.punch_hole(100, 20000).unwrap();
        // Blocks 1, 2 and 3 are wholly inside [100, 20100); block 4 ends at 20480.
        assert_eq!(file.allocated_bytes().unwrap(), 40960 - 3 * 4096);
        let mut byte = [9u8; 1];
        file.read_exact_at(&mut byte, 150).unwrap();
        assert_eq!(byte[0], 0);
    }
}
