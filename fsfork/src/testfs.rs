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
        fs.mount_image()?;
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
        retrying(|| run(Command::new("umount").arg(&self.mount)))?;
        self.mount_image()
    }

    /// Mounts the backing image at the mount point.
    fn mount_image(&self) -> io::Result<()> {
        let img = self.dir.join("backing.img");
        // Parallel tests race for free loop devices.
        retrying(|| {
            run(Command::new("mount").args(["-t", self.kind.name(), "-o", "loop,noatime"]).arg(&img).arg(&self.mount))
        })
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
    // SAFETY: an fd we own, and a pointer to a u32 that outlives the call: the kernel only reads
    // the flags through it (the `_IOR` in the number is historical).
    if unsafe { libc::ioctl(root.as_raw_fd(), FS_IOC_SHUTDOWN as _, &flags) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` up to 8 times, waiting a little longer after each failure; the last error if all
/// fail.
fn retrying(mut f: impl FnMut() -> io::Result<()>) -> io::Result<()> {
    let mut attempt = 0;
    loop {
        match f() {
            Ok(()) => return Ok(()),
            Err(e) if attempt == 7 => return Err(e),
            Err(_) => {
                attempt += 1;
                std::thread::sleep(Duration::from_millis(100 * attempt));
            }
        }
    }
}

/// Set as a machine cuts its power: panics from then on (its threads meeting a dead filesystem)
/// are the cut's doing, not failures.
static CUT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Marks, on stdout, a panic of a machine process before its power cut.
const PANIC_MARK: &str = "MACHINE-PANICKED-BEFORE-THE-CUT";

/// Called first by a process standing for a machine that will lose power: a panic of any of
/// its threads before [`power_cut_and_exit`] is reported to [`run_machine`] (a worker thread's
/// panic would otherwise go unseen while the main thread cuts the power regardless).
pub fn machine_panics_are_failures() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !CUT.load(Ordering::SeqCst) {
            println!("{PANIC_MARK}");
            previous(info);
        }
    }));
}

/// Cuts the power of the filesystem mounted at `mount` ([`power_cut`]) and ends this process
/// on the spot (`_exit`), as the machine would end: no destructor, no flush, no cleanup. Its
/// other threads may die first, of what they meet on the dead filesystem (RocksDB aborts).
pub fn power_cut_and_exit(mount: &Path) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    CUT.store(true, Ordering::SeqCst);
    let code = match power_cut(mount) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("power cut of {}: {e}", mount.display());
            1
        }
    };
    // SAFETY: ends this process at once, as a power cut would; nothing runs after it.
    unsafe { libc::_exit(code) }
}

/// True when the filesystem mounted at `mount` is shut down (a power cut): it refuses to
/// create a file.
pub fn is_shut_down(mount: &Path) -> bool {
    let probe = mount.join(".snapfork-testfs-probe");
    match std::fs::File::create(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            false
        }
        Err(e) => e.raw_os_error() == Some(libc::EIO),
    }
}

/// Runs `cmd`, a process standing for a machine that calls [`power_cut_and_exit`] on the
/// filesystem at `mount`, and returns its stdout. Fails unless that filesystem was cut and
/// nothing panicked before, and kills the machine if it has not ended within `timeout`.
pub fn run_machine(cmd: &mut Command, mount: &Path, timeout: Duration) -> io::Result<String> {
    use std::io::Read;
    let mut child = cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn()?;
    let (mut out, mut err) = (child.stdout.take().expect("piped"), child.stderr.take().expect("piped"));
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = std::time::Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    let failed = |why: String| io::Error::other(format!("{why}\n--- stdout\n{stdout}\n--- stderr\n{stderr}"));
    match status {
        None => Err(failed(format!("the machine did not end within {timeout:?}: killed"))),
        Some(_) if stdout.contains(PANIC_MARK) => Err(failed("the machine panicked before its power cut".into())),
        Some(st) if !is_shut_down(mount) => Err(failed(format!("the machine ended ({st}) without cutting its power"))),
        Some(_) => Ok(stdout),
    }
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
