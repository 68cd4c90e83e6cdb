//! A small tmpfs for tests that need a file system to run out of room.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

/// A tmpfs of a given size mounted on a fresh directory under the system's
/// temporary directory; unmounted, and the directory removed, on drop.
/// Mounting needs root (CAP_SYS_ADMIN); without it [`Tmpfs::mount`]
/// panics, saying so: a test that needs a full disk cannot pass without one.
pub struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    pub fn mount(mib: u64) -> Tmpfs {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!("tessera-tmpfs-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let dir = std::env::temp_dir().join(name);
        std::fs::create_dir_all(&dir).expect("a directory to mount on");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tessera-test"])
            .arg(&dir)
            .status()
            .expect("running mount(8)");
        if !status.success() {
            let _ = std::fs::remove_dir(&dir);
            panic!("mounting a {mib} MiB tmpfs on {} failed ({status}): this test needs root", dir.display());
        }
        Tmpfs { dir }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Tmpfs {
    /// A node a test started may still hold a file open here for a moment
    /// after the test ends with it ("target is busy"): try again briefly,
    /// then detach it lazily (the kernel frees it once the last file
    /// closes), so no test run leaves a mount behind.
    fn drop(&mut self) {
        let umount = |lazy: bool| {
            let mut command = Command::new("umount");
            if lazy {
                command.arg("-l");
            }
            command.arg(&self.dir).stderr(std::process::Stdio::null());
            command.status().is_ok_and(|status| status.success())
        };
        let unmounted = (0..5).any(|attempt| {
            if attempt > 0 {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            umount(false)
        }) || umount(true);
        if unmounted {
            let _ = std::fs::remove_dir(&self.dir);
        }
    }
}
