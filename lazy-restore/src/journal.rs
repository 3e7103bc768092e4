//! Takeover: what a restore writes down so that another process can go on serving its VM.
//!
//! A lazily restored VM stalls on its next fault when the process serving it dies (a daemon
//! restart, a crash): the VM keeps its userfaultfd, but nobody reads it any more. A restore
//! started with a [`Journal`] writes down, in a directory the caller chooses, who the VM is (pid
//! and process start time, so a recycled pid is never mistaken for it), its regions, the image
//! it is served from, and every range the guest has given back (REMOVE and UNMAP events).
//!
//! A later process lists the journals ([`orphans`]) and [`Orphan::adopt`]s each VM that is still
//! alive: it takes a copy of the VM's userfaultfd with `pidfd_getfd(2)`, wakes every thread that
//! was waiting on the dead server (a fault it had read but not served would otherwise never be
//! answered), and serves on: zeros where the guest gave memory back, the image elsewhere. Pages
//! already installed stay as the guest left them (UFFDIO_COPY answers EEXIST for them).
//!
//! The restore serving a VM holds its journal locked (`flock`), so a journal that can be locked
//! is one whose server is gone, whichever process that was, and a VM is never served twice. A
//! journal is removed when its restore ends because the VM exited or was stopped for a corrupt
//! page; a restore stopped on purpose ([`crate::RestoreHandle::stop`]) keeps it (unlocked),
//! because the VM goes on running. Journals are written without fsync: they must outlive the serving process,
//! not the machine (a reboot ends the VM too). One window remains: a REMOVE is written down just
//! after it is read, and the guest goes on as soon as it is read, so a server killed between the
//! two forgets that range; its successor would then serve the snapshot's bytes there, instead of
//! zeros, if the guest reads that memory before writing it.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::restore::{self, Peer, Region, RestoreHandle, RestoreOptions};
use crate::source::PageSource;
use crate::{Error, Result, uffd};

const VERSION: u32 = 1;
const SUFFIX: &str = ".journal";

/// The first line of a journal.
#[derive(Debug, Serialize, Deserialize)]
struct Header {
    version: u32,
    pid: i32,
    /// Field 22 of `/proc/PID/stat`: tells the VM from a later process given the same pid.
    start_time: u64,
    /// The store id of the image (hex), when the source has one.
    image: Option<String>,
    regions: Vec<Region>,
}

/// Every later line.
#[derive(Debug, Serialize, Deserialize)]
struct Removed {
    /// `[start, end)` in the VM's address space.
    removed: (u64, u64),
}

/// The open journal of one restore (see the module documentation).
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
    /// Ranges given back before this process took over, applied before serving starts.
    replay: Vec<(u64, u64)>,
}

impl Journal {
    /// Starts the journal of a restore serving process `pid`'s `regions` from `image`, in `dir`.
    /// It appears complete or not at all (written beside, then renamed).
    pub fn create(dir: &Path, pid: i32, image: Option<String>, regions: &[Region]) -> Result<Journal> {
        let start_time = process_start_time(pid)
            .ok_or_else(|| Error::Invalid(format!("process {pid} is gone: no journal to write for it")))?;
        std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("mkdir {}", dir.display()), e))?;
        let path = dir.join(format!("{pid}-{start_time}{SUFFIX}"));
        let tmp = dir.join(format!(".{pid}-{start_time}.tmp"));
        let header = Header { version: VERSION, pid, start_time, image, regions: regions.to_vec() };
        let mut line = serde_json::to_vec(&header).map_err(|e| Error::Invalid(format!("journal header: {e}")))?;
        line.push(b'\n');
        let io = |what: &str, e| Error::io(format!("{what} {}", tmp.display()), e);
        let mut file = File::create(&tmp).map_err(|e| io("create", e))?;
        // Locked before it has its name: nobody can take the VM over while this restore serves it.
        lock(&file).map_err(|e| io("flock", e))?;
        file.write_all(&line).map_err(|e| io("write", e))?;
        std::fs::rename(&tmp, &path).map_err(|e| io("rename", e))?;
        Ok(Journal { path, file, replay: Vec::new() })
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes down that the guest gave `[start, end)` back. One `write(2)` of one line: a
    /// process killed around it leaves the line whole or absent.
    pub(crate) fn removed(&mut self, start: u64, end: u64) {
        let mut line = serde_json::to_vec(&Removed { removed: (start, end) }).unwrap_or_default();
        line.push(b'\n');
        if let Err(e) = self.file.write_all(&line) {
            warn!(journal = %self.path.display(), "cannot write a removed range down: {e}");
        }
    }

    /// The ranges to apply before serving (given back under an earlier server).
    pub(crate) fn take_replay(&mut self) -> Vec<(u64, u64)> {
        std::mem::take(&mut self.replay)
    }

    /// Removes the journal: its VM needs no successor.
    pub fn discard(self) {
        remove(&self.path)
    }
}

/// Takes the journal's lock without waiting.
fn lock(file: &File) -> std::io::Result<()> {
    // SAFETY: flock on a descriptor we own.
    let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

fn remove(path: &Path) {
    if let Err(e) = std::fs::remove_file(path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        warn!(journal = %path.display(), "cannot remove: {e}");
    }
}

/// A VM whose journal was found: its server may have died.
#[derive(Debug)]
pub struct Orphan {
    /// The journal file.
    pub path: PathBuf,
    /// The VM's pid.
    pub pid: i32,
    /// Its start time (field 22 of `/proc/PID/stat`).
    pub start_time: u64,
    /// The store id of its image (hex), if recorded.
    pub image: Option<String>,
    /// Its regions, as its handshake gave them.
    pub regions: Vec<Region>,
    /// Ranges the guest gave back, in order.
    pub removed: Vec<(u64, u64)>,
}

/// Every journal in `dir` (none when it does not exist). A journal that does not parse is an
/// error naming the file; [`list`] and [`read`] take them one by one instead.
pub fn orphans(dir: &Path) -> Result<Vec<Orphan>> {
    let mut out = list(dir)?.iter().map(|p| read(p)).collect::<Result<Vec<_>>>()?;
    out.sort_by_key(|o| o.pid);
    Ok(out)
}

/// The journal files in `dir` (none when it does not exist).
pub fn list(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(format!("read {}", dir.display()), e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| Error::io(format!("read {}", dir.display()), e))?.path();
        if path.to_str().is_some_and(|p| p.ends_with(SUFFIX)) {
            out.push(path);
        }
    }
    Ok(out)
}

/// Reads one journal; an error names the file.
pub fn read(path: &Path) -> Result<Orphan> {
    let bad = |m: String| Error::Invalid(format!("journal {}: {m}", path.display()));
    let file = File::open(path).map_err(|e| Error::io(format!("open {}", path.display()), e))?;
    let mut lines = BufReader::new(file).lines();
    let first = lines.next().ok_or_else(|| bad("empty".into()))?;
    let first = first.map_err(|e| Error::io(format!("read {}", path.display()), e))?;
    let h: Header = serde_json::from_str(&first).map_err(|e| bad(format!("header: {e}")))?;
    if h.version != VERSION {
        return Err(bad(format!("version {} (this build reads {VERSION})", h.version)));
    }
    let mut removed = Vec::new();
    for line in lines {
        let line = line.map_err(|e| Error::io(format!("read {}", path.display()), e))?;
        let r: Removed = serde_json::from_str(&line).map_err(|e| bad(format!("line {line:?}: {e}")))?;
        removed.push(r.removed);
    }
    Ok(Orphan {
        path: path.to_path_buf(),
        pid: h.pid,
        start_time: h.start_time,
        image: h.image,
        regions: h.regions,
        removed,
    })
}

impl Orphan {
    /// True while the process the journal was written for runs (same pid, same start time).
    pub fn is_alive(&self) -> bool {
        process_start_time(self.pid) == Some(self.start_time)
    }

    /// Removes the journal (its VM is gone).
    pub fn discard(self) {
        remove(&self.path)
    }

    /// Takes the VM over: copies its userfaultfd out of it (`pidfd_getfd`, which needs ptrace
    /// rights over it: root, or the same user without Yama restrictions), wakes every thread
    /// waiting on a fault, and serves it from `source` (which must be the journal's image) from
    /// now on, writing to the same journal. [`Error::Busy`] when a live restore (in this process
    /// or another) serves it already.
    pub fn adopt(self, source: Arc<dyn PageSource>, opts: RestoreOptions) -> Result<RestoreHandle> {
        let pid = self.pid;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(|e| Error::io(format!("open {}", self.path.display()), e))?;
        match lock(&file) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => {
                return Err(Error::Busy(format!("VM {pid} is served by a live restore already")));
            }
            Err(e) => return Err(Error::io(format!("flock {}", self.path.display()), e)),
        }
        // The pidfd pins the process: checking the start time after opening it rules out a
        // recycled pid for the rest of this restore.
        let pidfd = restore::pidfd_open(pid)?;
        if !self.is_alive() {
            return Err(Error::Invalid(format!("process {pid} is not the VM of journal {}", self.path.display())));
        }
        let uffd = take_userfaultfd(pid, &pidfd)?;
        for r in &self.regions {
            // A thread whose fault the dead server read but never answered sleeps until woken;
            // woken, it faults again and the fault comes to us. Nothing to wake is no error.
            if let Err(e) = uffd::wake(uffd.as_fd(), r.base, r.size as usize) {
                warn!(pid, base = r.base, "UFFDIO_WAKE: {e}");
            }
        }
        // Read again under the lock: the dead server may have written ranges down after the
        // listing read this journal.
        let removed = read(&self.path)?.removed;
        let journal = Journal { path: self.path, file, replay: removed };
        info!(pid, regions = self.regions.len(), removed = journal.replay.len(), "adopting a VM from its journal");
        let peer = Peer { pid: Some(pid), pidfd: Some(pidfd), conn: None };
        restore::start_journaled(uffd, self.regions, source, peer, opts, Some(journal))
    }
}

/// Field 22 of `/proc/PID/stat` (start time in clock ticks since boot), if the process exists.
pub fn process_start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// A copy of process `pid`'s one userfaultfd, through its pidfd.
fn take_userfaultfd(pid: i32, pidfd: &OwnedFd) -> Result<OwnedFd> {
    let dir = format!("/proc/{pid}/fd");
    let entries = std::fs::read_dir(&dir).map_err(|e| Error::io(format!("read {dir}"), e))?;
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let is_uffd = std::fs::read_link(entry.path()).is_ok_and(|t| t.as_os_str() == "anon_inode:[userfaultfd]");
        if is_uffd && let Some(n) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) {
            found.push(n);
        }
    }
    let target = match found[..] {
        [one] => one,
        [] => return Err(Error::Invalid(format!("process {pid} holds no userfaultfd"))),
        _ => return Err(Error::Invalid(format!("process {pid} holds {} userfaultfds: {found:?}", found.len()))),
    };
    // SAFETY: plain syscall with integer arguments; a non-negative result is a new descriptor
    // (close-on-exec) that only we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target, 0) };
    if fd < 0 {
        return Err(Error::last_os(format!("pidfd_getfd(pid {pid}, fd {target})")));
    }
    // SAFETY: as above, the kernel just gave us this descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    if !uffd::is_userfaultfd(fd.as_fd()) {
        return Err(Error::Invalid(format!("fd {target} of process {pid} is no longer a userfaultfd")));
    }
    Ok(fd)
}
