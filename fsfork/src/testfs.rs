//! Loop-mounted scratch filesystems for tests and benchmarks (feature `testfs`, needs root).
//!
//! Each [`TestFs`] lives in its own directory under `/var/tmp` (a sparse backing file and a mount
//! point), so tests can run in parallel; dropping it (also while unwinding from a panic)
//! unmounts the filesystem and removes the directory.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A filesystem type the harness can make.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsType {
    /// XFS with reflinks (`mkfs.xfs -m reflink=1`).
    Xfs,
    /// btrfs (reflinks always available).
    Btrfs,
    /// ext4: no reflinks, for the copy fallback.
    Ext4,
    /// ext4 with 128-byte inodes, which keep whole-second timestamps: two writes in one
    /// second leave a file's ctime as it was (for the stat cache's racy-entry guard).
    Ext4Seconds,
}

impl FsType {
    /// All three, for tests that run on each.
    pub const ALL: [FsType; 3] = [FsType::Xfs, FsType::Btrfs, FsType::Ext4];

    /// The name `mount -t` knows.
    pub fn name(self) -> &'static str {
        match self {
            FsType::Xfs => "xfs",
            FsType::Btrfs => "btrfs",
            FsType::Ext4 | FsType::Ext4Seconds => "ext4",
        }
    }

    /// Whether FICLONE works on it.
    pub fn reflinks(self) -> bool {
        !matches!(self, FsType::Ext4 | FsType::Ext4Seconds)
    }
}

/// A mounted scratch filesystem; unmounted and deleted on drop.
#[derive(Debug)]
pub struct TestFs {
    kind: FsType,
    dir: PathBuf,
    mount: PathBuf,
}

/// Whether the process is root. If not, prints a loud message and panics unless
/// `SNAPFORK_ALLOW_SKIP=1`, in which case it returns false and the caller skips the test.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    eprintln!("!!!!!!!! {test}: needs root (loop mounts); NOT RUN !!!!!!!!");
    if std::env::var("SNAPFORK_ALLOW_SKIP").as_deref() == Ok("1") {
        return false;
    }
    panic!("{test} needs root; set SNAPFORK_ALLOW_SKIP=1 to skip");
}

fn run(cmd: &mut Command) -> io::Result<()> {
    let out = cmd.output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{:?} failed: {}{}",
            cmd,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        )))
    }
}

impl TestFs {
    /// Makes and mounts a filesystem of `size_mib` MiB (sparse: only used blocks cost space),
    /// `noatime` so that reading a tree does not change the times that tests compare.
    pub fn new(kind: FsType, size_mib: u64) -> io::Result<TestFs> {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let dir = PathBuf::from(format!(
            "/var/tmp/snapfork-testfs-{}-{}-{}-{}",
            kind.name(),
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            nanos
        ));
        std::fs::create_dir_all(&dir)?;
        // From here on, Drop cleans up whatever was made.
        let fs = TestFs { kind, mount: dir.join("mnt"), dir };
        let img = fs.dir.join("backing.img");
        let f = std::fs::File::create(&img)?;
        f.set_len(size_mib << 20)?;
        drop(f);
        std::fs::create_dir(&fs.mount)?;
        match kind {
            FsType::Xfs => run(Command::new("mkfs.xfs").args(["-q", "-f", "-m", "reflink=1"]).arg(&img))?,
            FsType::Btrfs => run(Command::new("mkfs.btrfs").args(["-q", "-f"]).arg(&img))?,
            FsType::Ext4 => run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img))?,
            FsType::Ext4Seconds => run(Command::new("mkfs.ext4").args(["-q", "-F", "-I", "128"]).arg(&img))?,
        }
        // Parallel tests race for free loop devices: retry a few times.
        let mut last = None;
        for attempt in 0..8 {
            match run(Command::new("mount").args(["-t", kind.name(), "-o", "loop,noatime"]).arg(&img).arg(&fs.mount)) {
                Ok(()) => {
                    last = None;
                    break;
                }
                Err(e) => {
                    last = Some(e);
                    std::thread::sleep(Duration::from_millis(100 * (attempt + 1)));
                }
            }
        }
        if let Some(e) = last {
            return Err(e);
        }
        Ok(fs)
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.mount
    }

    /// The filesystem type.
    pub fn kind(&self) -> FsType {
        self.kind
    }

    /// Simulates a power cut: see [`power_cut`].
    pub fn power_cut(&self) -> io::Result<()> {
        power_cut(&self.mount)
    }

    /// Unmounts the filesystem and mounts it again (after [`TestFs::power_cut`]: it recovers
    /// from its log as after a crash). Nothing may hold it open.
    pub fn remount(&self) -> io::Result<()> {
        run(Command::new("umount").arg(&self.mount))?;
        let img = self.dir.join("backing.img");
        run(Command::new("mount").args(["-t", self.kind.name(), "-o", "loop,noatime"]).arg(&img).arg(&self.mount))
    }
}

/// Simulates a power cut on the filesystem mounted at `mount`: it is shut down without flushing
/// its log (`FS_IOC_SHUTDOWN`, `NOLOGFLUSH`, as xfstests' crash tests do; XFS and ext4, not
/// btrfs), so whatever was not yet durable is lost and every later access fails. A process
/// that stands for the machine should then exit without cleaning up (`libc::_exit`), as its
/// cleanup would only meet a dead filesystem; [`TestFs::remount`] brings it back.
pub fn power_cut(mount: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // _IOR('X', 125, __u32): XFS_IOC_GOINGDOWN, the same number as EXT4_IOC_SHUTDOWN.
    const FS_IOC_SHUTDOWN: libc::c_ulong = 0x8004_587d;
    const NOLOGFLUSH: u32 = 2;
    let root = std::fs::File::open(mount)?;
    let flags = NOLOGFLUSH;
    // SAFETY: an fd we own and a pointer to a u32 that outlives the call, as the ioctl expects.
    if unsafe { libc::ioctl(root.as_raw_fd(), FS_IOC_SHUTDOWN as _, &flags) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Drop for TestFs {
    fn drop(&mut self) {
        let mounted = std::fs::read_to_string("/proc/self/mountinfo")
            .map(|m| m.lines().any(|l| l.split(' ').nth(4) == Some(&*self.mount.to_string_lossy())))
            .unwrap_or(true);
        if mounted {
            for _ in 0..20 {
                match run(Command::new("umount").arg(&self.mount)) {
                    Ok(()) => break,
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
            // Still busy (a leaked descriptor): detach lazily so the directory can go.
            let _ = run(Command::new("umount").arg("-l").arg(&self.mount));
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("testfs: could not remove {}: {e}", self.dir.display());
        }
    }
}
