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
//! is one whose server is gone, whichever process that was, and a VM is never served twice. When
//! a restore ends, its journal is removed if the VM is gone (it exited, or was killed for a
//! corrupt page) and kept, unlocked, if the VM runs on (the restore was stopped, or failed). A
//! journal is rewritten with its ranges merged as it grows (balloon free-page reporting gives
//! memory back all the time), and removed if a range cannot be written down: a VM nobody can take
//! over stalls, which is better than one that reads old bytes where it gave memory back.
//!
//! Journals are written without fsync: they must outlive the serving process, not the machine (a
//! reboot ends the VM too). One window remains: ranges are written down just after they are read
//! (up to 64 events at a time), and the guest goes on as soon as they are read, so a server killed
//! in between forgets them; its successor would then serve the snapshot's bytes there, instead of
//! zeros, if the guest reads that memory before writing it.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

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

/// Lines after which a journal is rewritten with its ranges merged (balloon free-page reporting
/// gives memory back all the time).
const COMPACT_AFTER: usize = 4096;

/// The open journal of one restore (see the module documentation). It holds the journal's lock
/// for as long as it lives.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
    header: Header,
    /// Everything given back so far: sorted, merged ranges.
    removed: Vec<(u64, u64)>,
    /// Range lines in the file.
    lines: usize,
    /// Written by a process that took the VM over (pages installed before are unknown to it).
    adopted: bool,
    /// A range could not be written down: the journal was removed, so that no successor serves
    /// the snapshot's bytes where the guest gave memory back.
    broken: bool,
}

impl Journal {
    /// Starts the journal of a restore serving process `pid`'s `regions` from `image`, in `dir`.
    /// It appears complete and locked, or not at all.
    pub fn create(dir: &Path, pid: i32, image: Option<String>, regions: &[Region]) -> Result<Journal> {
        let start_time = process_start_time(pid)
            .ok_or_else(|| Error::Invalid(format!("process {pid} is gone: no journal to write for it")))?;
        std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("mkdir {}", dir.display()), e))?;
        let path = dir.join(format!("{pid}-{start_time}{SUFFIX}"));
        let header = Header { version: VERSION, pid, start_time, image, regions: regions.to_vec() };
        let file = write_locked(&path, &header, &[])?;
        Ok(Journal { path, file, header, removed: Vec::new(), lines: 0, adopted: false, broken: false })
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A second handle on the journal's lock (the same open file): the lock stays while either
    /// lives. Lets a caller that hands the journal over remove it, still locked, if that fails.
    pub fn lock_guard(&self) -> Result<File> {
        self.file.try_clone().map_err(|e| Error::io(format!("dup {}", self.path.display()), e))
    }

    /// Ranges given back so far (sorted, merged): served as zeros, never as snapshot bytes.
    pub(crate) fn removed_ranges(&self) -> &[(u64, u64)] {
        &self.removed
    }

    /// True when a process that took the VM over writes it.
    pub(crate) fn adopted(&self) -> bool {
        self.adopted
    }

    /// Writes down that the guest gave `[start, end)` back: one `write(2)` of one line, which a
    /// process killed around it leaves whole or absent. If it cannot be written, the journal is
    /// removed: a VM nobody can take over stalls, which is better than one that reads old bytes.
    pub(crate) fn removed(&mut self, start: u64, end: u64) {
        if self.broken {
            return;
        }
        merge(&mut self.removed, start, end);
        let mut line = serde_json::to_vec(&Removed { removed: (start, end) }).unwrap_or_default();
        line.push(b'\n');
        let written = if self.lines >= COMPACT_AFTER && self.lines >= 4 * self.removed.len() {
            // Rewritten whole, merged; the new file is locked before it takes the name.
            write_locked(&self.path, &self.header, &self.removed).map(|f| {
                self.file = f;
                self.lines = self.removed.len();
            })
        } else {
            self.file.write_all(&line).map(|()| self.lines += 1).map_err(|e| Error::io("append", e))
        };
        if let Err(e) = written {
            error!(journal = %self.path.display(), "cannot write a range the guest gave back ({e}): removing the journal; this VM now stalls if its server dies");
            self.broken = true;
            remove(&self.path);
        }
    }

    /// Ends the journal of a restore that ended: removed when its VM is gone, kept (and
    /// unlocked, by dropping it) while the VM runs on, for a successor to take over. Whether it
    /// is gone is asked of the process itself: a restore that took an error for the peer's exit
    /// (an unmapped range) must not cost a live VM its successor.
    pub(crate) fn close(self) {
        if process_start_time(self.header.pid) != Some(self.header.start_time) {
            self.discard();
        } else {
            info!(pid = self.header.pid, journal = %self.path.display(), "restore ended with its VM alive: journal kept for a successor");
        }
    }

    /// Removes the journal (unlinked while still locked): its VM needs no successor.
    pub fn discard(self) {
        remove(&self.path)
    }
}

/// Writes `header` and `removed` to a temporary file, locks it, then renames it to `path`: the
/// journal at `path` is always complete and, until its new owner lets go, locked.
fn write_locked(path: &Path, header: &Header, removed: &[(u64, u64)]) -> Result<File> {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let dir = path.parent().unwrap_or(Path::new("."));
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{}-{}-{seq}.tmp", header.pid, std::process::id()));
    let mut text = serde_json::to_vec(header).map_err(|e| Error::Invalid(format!("journal header: {e}")))?;
    text.push(b'\n');
    for &r in removed {
        text.extend(serde_json::to_vec(&Removed { removed: r }).unwrap_or_default());
        text.push(b'\n');
    }
    let io = |what: &str, e| Error::io(format!("{what} {}", tmp.display()), e);
    let written = (|| {
        let mut file =
            std::fs::OpenOptions::new().create_new(true).append(true).open(&tmp).map_err(|e| io("create", e))?;
        lock(&file).map_err(|e| io("flock", e))?;
        file.write_all(&text).map_err(|e| io("write", e))?;
        std::fs::rename(&tmp, path).map_err(|e| io("rename", e))?;
        Ok(file)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Adds `[start, end)` to sorted, merged `ranges`.
fn merge(ranges: &mut Vec<(u64, u64)>, start: u64, end: u64) {
    let (mut s, mut e) = (start, end);
    let first = ranges.partition_point(|&(_, re)| re < s);
    let mut last = first;
    while last < ranges.len() && ranges[last].0 <= e {
        s = s.min(ranges[last].0);
        e = e.max(ranges[last].1);
        last += 1;
    }
    ranges.splice(first..last, [(s, e)]);
}

/// Takes the journal's lock without waiting.
fn lock(file: &File) -> std::io::Result<()> {
    // SAFETY: flock on a descriptor we own.
    let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// True while `file` is still the file at `path`. A journal is rewritten by renaming a new
/// file over it, which releases the old file's lock: a lock taken on the old file, opened just
/// before, guards nothing.
fn is_current(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
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
    /// Ranges the guest gave back (sorted, merged).
    pub removed: Vec<(u64, u64)>,
}

/// Every journal in `dir` (none when it does not exist). A journal that does not parse is an
/// error naming the file; [`list`] and [`read`] take them one by one instead.
pub fn orphans(dir: &Path) -> Result<Vec<Orphan>> {
    let mut out = list(dir)?.iter().map(|p| read(p)).collect::<Result<Vec<_>>>()?;
    out.sort_by_key(|o| o.pid);
    Ok(out)
}

/// The journal files in `dir` (none when it does not exist). Temporary files that a process died
/// writing (nobody holds their lock) are removed on the way.
pub fn list(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(format!("read {}", dir.display()), e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| Error::io(format!("read {}", dir.display()), e))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.ends_with(SUFFIX) {
            out.push(path);
        } else if name.starts_with('.') && name.ends_with(".tmp") && File::open(&path).is_ok_and(|f| lock(&f).is_ok()) {
            remove(&path);
        }
    }
    Ok(out)
}

/// Reads one journal; an error names the file.
pub fn read(path: &Path) -> Result<Orphan> {
    let bad = |m: String| Error::Invalid(format!("journal {}: {m}", path.display()));
    let text = std::fs::read(path).map_err(|e| Error::io(format!("read {}", path.display()), e))?;
    // Only whole lines count: a last line without its newline is one being written now (the
    // reader holds no lock), or one its writer was killed writing, which is as if unwritten
    // (the window the module documentation describes).
    let whole = text.iter().rposition(|&b| b == b'\n').map_or(&text[..0], |end| &text[..end]);
    let mut lines = whole.split(|&b| b == b'\n');
    let first = lines.next().filter(|l| !l.is_empty()).ok_or_else(|| bad("empty".into()))?;
    let h: Header = serde_json::from_slice(first).map_err(|e| bad(format!("header: {e}")))?;
    if h.version != VERSION {
        return Err(bad(format!("version {} (this build reads {VERSION})", h.version)));
    }
    let mut removed = Vec::new();
    for line in lines {
        let r: Removed =
            serde_json::from_slice(line).map_err(|e| bad(format!("line {:?}: {e}", String::from_utf8_lossy(line))))?;
        merge(&mut removed, r.removed.0, r.removed.1);
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

/// True when the VM that was process `pid`, started at `start_time`, has a journal in `dir` that
/// nobody serves: it was restored lazily and its server is gone, so it stalls on its next fault
/// until taken over. False when it has no journal (it was not restored lazily, or its memory
/// needs no server any more) or a live restore holds it. Takes the journal's lock for an
/// instant when it is free: an [`Orphan::adopt`] that meets it then gets [`Error::Busy`], as
/// when a server is letting go.
pub fn unserved(dir: &Path, pid: i32, start_time: u64) -> Result<bool> {
    let path = dir.join(format!("{pid}-{start_time}{SUFFIX}"));
    loop {
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(Error::io(format!("open {}", path.display()), e)),
        };
        match lock(&file) {
            // Rewritten meanwhile: the lock that matters is the new file's.
            Ok(()) if !is_current(&file, &path) => continue,
            Ok(()) => return Ok(true), // released when `file` closes
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => return Ok(false),
            Err(e) => return Err(Error::io(format!("flock {}", path.display()), e)),
        }
    }
}

/// Waits until nobody serves the VM of the journal at `path` (its lock is free), without taking
/// it over: then [`Orphan::adopt`] can. For a VM found served by a server that is going away.
pub fn wait_free(path: &Path) -> Result<()> {
    let mut file = File::open(path).map_err(|e| Error::io(format!("open {}", path.display()), e))?;
    loop {
        // SAFETY: flock on a descriptor we own; blocks until the lock is ours.
        let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if r == 0 {
            if is_current(&file, path) {
                return Ok(()); // released when `file` closes
            }
            // Rewritten meanwhile: the lock that matters is the new file's.
            file = File::open(path).map_err(|e| Error::io(format!("open {}", path.display()), e))?;
            continue;
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(Error::io(format!("flock {}", path.display()), e));
        }
    }
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
    /// now on, writing to the journal (rewritten, merged). [`Error::Busy`] when a live restore
    /// (in this process or another) serves it already.
    pub fn adopt(self, source: Arc<dyn PageSource>, opts: RestoreOptions) -> Result<RestoreHandle> {
        let pid = self.pid;
        let file = loop {
            let file = File::open(&self.path).map_err(|e| Error::io(format!("open {}", self.path.display()), e))?;
            match lock(&file) {
                Ok(()) if is_current(&file, &self.path) => break file,
                // Rewritten (by its live server, or another adopter) between the open and the
                // lock: that lock guards nothing; try the file that is the journal now.
                Ok(()) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => {
                    return Err(Error::Busy(format!("VM {pid} is served by a live restore already")));
                }
                Err(e) => return Err(Error::io(format!("flock {}", self.path.display()), e)),
            }
        };
        // Open the pidfd, then check the start time: if the pid has been reused by then, the
        // check fails; if it is reused later, the pidfd still names the checked process (and
        // pidfd_getfd fails once it has exited).
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
        // Read again under the lock (the dead server may have written ranges down after the
        // listing read it), then rewrite it merged, locked by its new owner before it takes the
        // name; the old file's lock goes with `file`.
        let fresh = read(&self.path)?;
        let header = Header {
            version: VERSION,
            pid,
            start_time: self.start_time,
            image: fresh.image,
            regions: fresh.regions.clone(),
        };
        let new = write_locked(&self.path, &header, &fresh.removed)?;
        drop(file);
        let lines = fresh.removed.len();
        let journal =
            Journal { path: self.path, file: new, header, removed: fresh.removed, lines, adopted: true, broken: false };
        info!(pid, regions = fresh.regions.len(), removed = journal.removed.len(), "adopting a VM from its journal");
        let peer = Peer { pid: Some(pid), pidfd: Some(pidfd), conn: None };
        restore::start_journaled(uffd, fresh.regions, source, peer, opts, Some(journal))
    }
}

/// Field 22 of `/proc/PID/stat` (start time in clock ticks since boot), if the process exists
/// and has not exited (a zombie has no memory left to serve).
pub fn process_start_time(pid: i32) -> Option<u64> {
    start_time_in(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// [`process_start_time`] from the text of a `/proc/PID/stat`.
pub(crate) fn start_time_in(stat: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces and parentheses: fields resume after the last ')'.
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    if matches!(fields.next()?, "Z" | "X" | "x") {
        return None;
    }
    fields.nth(18)?.parse().ok()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_sorted_overlapping_and_adjacent() {
        let mut r = Vec::new();
        for (s, e) in [(100, 200), (300, 400), (0, 10), (200, 250), (350, 500), (10, 20), (600, 700)] {
            merge(&mut r, s, e);
        }
        assert_eq!(r, vec![(0, 20), (100, 250), (300, 500), (600, 700)]);
        merge(&mut r, 5, 650);
        assert_eq!(r, vec![(0, 700)]);
    }

    #[test]
    fn a_long_journal_is_rewritten_merged_and_reads_back_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let region = Region { base: 1 << 30, size: 64 << 20, offset: 0, page_size: 4096 };
        let mut j = Journal::create(dir.path(), std::process::id() as i32, Some("ab".into()), &[region]).unwrap();
        // 10,000 REMOVEs of the same 100 pages, as free-page reporting sends them.
        for k in 0..10_000u64 {
            let p = (k % 100) * 2;
            j.removed(region.base + p * 4096, region.base + (p + 1) * 4096);
        }
        let text = std::fs::read_to_string(j.path()).unwrap();
        assert!(text.lines().count() < 2 * COMPACT_AFTER, "{} lines", text.lines().count());
        let o = read(j.path()).unwrap();
        assert_eq!(o.removed.len(), 100);
        assert_eq!(o.removed, j.removed_ranges());
        assert_eq!((o.image.as_deref(), o.regions.as_slice()), (Some("ab"), &[region][..]));
        // The rewritten journal is still locked by its owner; no temporary file is left.
        let f = File::open(j.path()).unwrap();
        assert_eq!(lock(&f).unwrap_err().raw_os_error(), Some(libc::EWOULDBLOCK));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        j.discard();
        assert!(list(dir.path()).unwrap().is_empty());
    }

    /// A journal read while its last line is being written (or after its writer was killed
    /// writing it) reads as the whole lines before it.
    #[test]
    fn a_torn_last_line_reads_as_unwritten() {
        let dir = tempfile::tempdir().unwrap();
        let region = Region { base: 1 << 30, size: 1 << 20, offset: 0, page_size: 4096 };
        let mut j = Journal::create(dir.path(), std::process::id() as i32, None, &[region]).unwrap();
        j.removed(region.base, region.base + 4096);
        let mut f = std::fs::OpenOptions::new().append(true).open(j.path()).unwrap();
        f.write_all(br#"{"removed":[1073745"#).unwrap();
        let o = read(j.path()).unwrap();
        assert_eq!(o.removed, vec![(region.base, region.base + 4096)]);
        // A whole line that does not parse is damage, still refused.
        f.write_all(b"\n").unwrap();
        assert!(read(j.path()).is_err());
        j.discard();
    }

    /// A lock taken on a journal that was rewritten between its open and the lock (the rename
    /// released the old file's lock) is not taken for the journal's.
    #[test]
    fn a_lock_on_a_replaced_journal_is_not_the_journals() {
        let dir = tempfile::tempdir().unwrap();
        let region = Region { base: 1 << 30, size: 1 << 20, offset: 0, page_size: 4096 };
        let j = Journal::create(dir.path(), std::process::id() as i32, None, &[region]).unwrap();
        let path = j.path().to_path_buf();
        let stale = File::open(&path).unwrap();
        assert!(is_current(&stale, &path));
        let header = Header { regions: vec![region], image: None, ..j.header };
        let _new = write_locked(&path, &header, &[]).unwrap();
        drop(j); // the old file's owner lets go of it
        assert!(lock(&stale).is_ok(), "the replaced file's lock is free");
        assert!(!is_current(&stale, &path), "a lock on the replaced file taken for the journal's");
    }
}
