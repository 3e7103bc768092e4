//! Cloning files and trees with reflinks, falling back to a sparse-aware copy.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use rayon::prelude::*;
use serde::Serialize;

use crate::dirfds::{self, DirTable};
use crate::error::{Error, IoContext, Result};
use crate::sys::{self, XattrTarget};
use crate::walk::{self, Kind, Meta};

/// How file contents reached the destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CopyMode {
    /// Every non-empty file shares its extents with the source (FICLONE).
    Reflink,
    /// Every non-empty file was copied (sparse-aware: holes stay holes).
    Copy,
    /// Some files were reflinked and some copied.
    Mixed,
    /// No non-empty regular file was involved.
    None,
}

impl std::fmt::Display for CopyMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CopyMode::Reflink => "reflink",
            CopyMode::Copy => "copy",
            CopyMode::Mixed => "mixed",
            CopyMode::None => "none",
        })
    }
}

/// Counts shared by the workers of one clone; also remembers whether reflinks failed as
/// unsupported so that later files go straight to the copy.
#[derive(Default, Debug)]
pub struct Counters {
    reflink_unsupported: AtomicBool,
    /// Files whose contents were reflinked.
    pub reflinked: AtomicU64,
    /// Files whose contents were copied.
    pub copied: AtomicU64,
    /// Data bytes copied (holes excluded).
    pub copied_bytes: AtomicU64,
    /// Logical bytes of all regular files.
    pub bytes: AtomicU64,
    /// Extended attributes that could not be set.
    pub xattr_failures: AtomicU64,
    /// Entries that keep this process's owner because it may not give them theirs.
    pub owner_failures: AtomicU64,
    /// Bytes a copy must leave free on its destination's filesystem (see [`transfer`]).
    keep_free: u64,
}

impl Counters {
    /// Counters for a clone whose copies must leave `bytes` free on the destination's filesystem
    /// (a store's reserve, when that filesystem holds the store).
    pub fn keeping_free(bytes: u64) -> Self {
        Counters { keep_free: bytes, ..Default::default() }
    }

    /// The overall mode.
    pub fn mode(&self) -> CopyMode {
        match (self.reflinked.load(Ordering::Relaxed), self.copied.load(Ordering::Relaxed)) {
            (0, 0) => CopyMode::None,
            (_, 0) => CopyMode::Reflink,
            (0, _) => CopyMode::Copy,
            _ => CopyMode::Mixed,
        }
    }
}

/// Something that could not be recreated in the destination.
#[derive(Clone, Debug, Serialize)]
pub struct Skipped {
    /// Path relative to the tree root (lossy for non-UTF-8 names).
    pub path: String,
    /// Why.
    pub reason: String,
}

/// What a tree clone did.
#[derive(Clone, Debug, Serialize)]
pub struct CloneReport {
    /// How contents were transferred.
    pub mode: CopyMode,
    /// Directories created (including the root).
    pub dirs: u64,
    /// Regular files created (hard links excluded).
    pub files: u64,
    /// Symlinks created.
    pub symlinks: u64,
    /// Extra hard links created.
    pub hardlinks: u64,
    /// FIFOs, sockets and device nodes created.
    pub special: u64,
    /// Files reflinked.
    pub reflinked: u64,
    /// Files copied.
    pub copied: u64,
    /// Logical bytes of regular files.
    pub bytes: u64,
    /// Data bytes actually copied.
    pub copied_bytes: u64,
    /// Extended attributes that could not be set (logged as warnings).
    pub xattr_failures: u64,
    /// Entries that keep this process's owner: only root may give files away (see
    /// [`apply_meta_fd`]).
    pub owner_failures: u64,
    /// Entries that could not be recreated (e.g. device nodes without privilege).
    pub skipped: Vec<Skipped>,
}

/// Puts the contents of `src` (an open regular file of `len` bytes) into the new, empty file
/// `dst`: a reflink where possible, else a sparse-aware copy. A copy that would leave less than
/// the counters' `keep_free` bytes free on `dst`'s filesystem is refused (`StorageFull`) before
/// it starts: the store keeps that much free for its index.
pub fn transfer(src: BorrowedFd<'_>, dst: BorrowedFd<'_>, len: u64, c: &Counters) -> std::io::Result<CopyMode> {
    let keep_free = c.keep_free;
    c.bytes.fetch_add(len, Ordering::Relaxed);
    if len == 0 {
        return Ok(CopyMode::None);
    }
    if !c.reflink_unsupported.load(Ordering::Relaxed) {
        match sys::ficlone(dst, src) {
            Ok(()) => {
                c.reflinked.fetch_add(1, Ordering::Relaxed);
                return Ok(CopyMode::Reflink);
            }
            Err(e) if sys::is_reflink_unsupported(&e) => {
                if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP) | Some(libc::EXDEV) | Some(libc::ENOTTY)) {
                    // The filesystem pair cannot reflink at all: stop trying for this clone.
                    c.reflink_unsupported.store(true, Ordering::Relaxed);
                }
                tracing::debug!(error = %e, "reflink not possible, copying");
            }
            Err(e) => return Err(e),
        }
    }
    if keep_free > 0 {
        let free = sys::free_bytes(dst)?;
        if free < len.saturating_add(keep_free) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                format!(
                    "copying {} MB would leave less than the {} MB the store keeps free ({} MB free)",
                    len >> 20,
                    keep_free >> 20,
                    free >> 20
                ),
            ));
        }
    }
    let n = sys::sparse_copy(src, dst, len)?;
    c.copied.fetch_add(1, Ordering::Relaxed);
    c.copied_bytes.fetch_add(n, Ordering::Relaxed);
    Ok(CopyMode::Copy)
}

/// Takes the result of giving an entry its owner. An owner this process may not give (EPERM:
/// not root; EINVAL: an id outside its user namespace) is counted, not an error, the way
/// `cp -a` and `tar` behave for a regular user: the entry keeps our owner, and then at least
/// its group is tried alone. Returns whether the owner was set.
fn owner_set(
    r: std::io::Result<()>,
    c: &Counters,
    group_only: impl FnOnce() -> std::io::Result<()>,
) -> std::io::Result<bool> {
    match r {
        Ok(()) => Ok(true),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EINVAL)) => {
            if c.owner_failures.fetch_add(1, Ordering::Relaxed) == 0 {
                tracing::debug!(error = %e, "cannot give entries their owner; they keep ours");
            }
            // The group may still be one of ours; if not, the entry keeps our group too.
            let _ = group_only();
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Says on stderr (a warning) what a clone or restore into `dst` could not keep.
pub(crate) fn warn_lost_metadata(c: &Counters, dst: &Path) {
    let (owners, xattrs) = (c.owner_failures.load(Ordering::Relaxed), c.xattr_failures.load(Ordering::Relaxed));
    if owners > 0 {
        tracing::warn!(
            path = %dst.display(),
            entries = owners,
            "entries keep this user's owner (only root may give files their owners) and lose setuid/setgid"
        );
    }
    if xattrs > 0 {
        tracing::warn!(path = %dst.display(), xattrs, "extended attributes could not be set");
    }
}

/// The permissions to set: `meta`'s, less setuid and setgid where the entry did not get its
/// owner (a program meant to run as root must not become one that runs as us).
fn perm_for(meta: &Meta, owned: bool) -> u32 {
    if owned { meta.perm() } else { meta.perm() & !0o6000 }
}

/// Sets owner, extended attributes, permissions and times of an open file or directory, in
/// that order: chown clears setuid bits and file capabilities (so both come after it), and
/// `user.*` xattrs need write permission on the inode, which a read-only mode would take away
/// from anyone but root. An owner this process may not give is counted (see [`owner_set`]).
pub fn apply_meta_fd(
    fd: BorrowedFd<'_>,
    meta: &Meta,
    xattrs: &[(Vec<u8>, Vec<u8>)],
    c: &Counters,
) -> std::io::Result<()> {
    let owned = owner_set(sys::fchown(fd, meta.uid, meta.gid), c, || sys::fchown(fd, u32::MAX, meta.gid))?;
    if !xattrs.is_empty() {
        let failed = sys::write_xattrs(XattrTarget::Fd(fd), xattrs)?;
        c.xattr_failures.fetch_add(failed as u64, Ordering::Relaxed);
    }
    sys::fchmod(fd, perm_for(meta, owned))?;
    sys::futimens(fd, meta.atime, meta.mtime)
}

/// Sets the metadata of an entry that cannot be opened (symlink, FIFO, socket, device).
pub fn apply_meta_at(
    dir: BorrowedFd<'_>,
    name: &CStr,
    meta: &Meta,
    xattrs: &[(Vec<u8>, Vec<u8>)],
    c: &Counters,
) -> std::io::Result<()> {
    let owned =
        owner_set(sys::lchownat(dir, name, meta.uid, meta.gid), c, || sys::lchownat(dir, name, u32::MAX, meta.gid))?;
    // The same order as `apply_meta_fd`: xattrs before the mode.
    if !xattrs.is_empty() {
        let p = sys::proc_path(dir, name);
        let failed = sys::write_xattrs(XattrTarget::Path(&p), xattrs)?;
        c.xattr_failures.fetch_add(failed as u64, Ordering::Relaxed);
    }
    if meta.kind() != Kind::Symlink {
        // The entry was created by us a moment ago under a directory only we know about, so
        // fchmodat (which follows symlinks) cannot be redirected.
        sys::fchmodat(dir, name, perm_for(meta, owned))?;
    }
    sys::lutimensat(dir, name, meta.atime, meta.mtime)
}

/// Creates a new regular file `name` in `dir` (failing if anything exists there) with the
/// contents of `src`, then the metadata.
pub fn create_file(
    dir: BorrowedFd<'_>,
    name: &CStr,
    src: BorrowedFd<'_>,
    meta: &Meta,
    xattrs: &[(Vec<u8>, Vec<u8>)],
    c: &Counters,
) -> std::io::Result<OwnedFd> {
    let dst = sys::openat(dir, name, libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL, 0o600)?;
    transfer(src, dst.as_fd(), meta.size, c)?;
    apply_meta_fd(dst.as_fd(), meta, xattrs, c)?;
    Ok(dst)
}

/// What a file we create gets without `fchown`/`fchmod`: our filesystem uid and gid, and the
/// creation mode less the umask. Read once per process; `None` fields are unknown.
struct Defaults {
    uid: u32,
    gid: u32,
    umask: Option<u32>,
}

fn defaults() -> &'static Defaults {
    static D: std::sync::OnceLock<Defaults> = std::sync::OnceLock::new();
    D.get_or_init(|| {
        // The umask from /proc (Linux 4.7+): calling umask() to read it would change it for
        // every thread for a moment.
        let umask = std::fs::read_to_string("/proc/self/status").ok().and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Umask:")).and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        });
        // SAFETY: geteuid and getegid cannot fail.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        Defaults { uid, gid, umask }
    })
}

/// Like [`create_file`], but skips `fchown` when the file would get the wanted owner anyway
/// and `fchmod` when creating it with the wanted mode is enough: two of its three metadata
/// transactions on XFS. The prediction can be wrong (a setgid or default-ACL parent, a
/// different fsuid), so it is checked on the final `fstat` and everything is set where it
/// was wrong. Returns the file and that `fstat`.
pub fn create_file_lean(
    dir: BorrowedFd<'_>,
    name: &CStr,
    src: BorrowedFd<'_>,
    meta: &Meta,
    xattrs: &[(Vec<u8>, Vec<u8>)],
    c: &Counters,
) -> std::io::Result<(OwnedFd, libc::stat)> {
    let d = defaults();
    let perm = meta.perm();
    // setuid/setgid/sticky bits are cleared by the reflink (it removes privileges) and by
    // chown, so they are always set explicitly, last.
    // A file that gets xattrs is created writable: `user.*` xattrs need write permission.
    let mode_at_create =
        perm & 0o7000 == 0 && d.umask.is_some_and(|u| perm & u == 0) && (xattrs.is_empty() || perm & 0o200 != 0);
    let owner_at_create = (meta.uid, meta.gid) == (d.uid, d.gid);
    let dst = sys::openat(
        dir,
        name,
        libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
        if mode_at_create { perm } else { 0o600 },
    )?;
    transfer(src, dst.as_fd(), meta.size, c)?;
    let fd = dst.as_fd();
    let owned =
        owner_at_create || owner_set(sys::fchown(fd, meta.uid, meta.gid), c, || sys::fchown(fd, u32::MAX, meta.gid))?;
    if !xattrs.is_empty() {
        let failed = sys::write_xattrs(XattrTarget::Fd(fd), xattrs)?;
        c.xattr_failures.fetch_add(failed as u64, Ordering::Relaxed);
    }
    if !mode_at_create || !owned {
        sys::fchmod(fd, perm_for(meta, owned))?;
    }
    sys::futimens(fd, meta.atime, meta.mtime)?;
    let mut st = sys::fstat(fd)?;
    // Where the owner could not be given, what we set is all there is to check.
    let got = Meta::from_stat(&st);
    if owned && (got.uid, got.gid, got.perm()) != (meta.uid, meta.gid, meta.perm()) {
        apply_meta_fd(fd, meta, xattrs, c)?;
        st = sys::fstat(fd)?;
    }
    Ok((dst, st))
}

/// Creates a FIFO, socket or device node like `meta`.
pub fn create_special(dir: BorrowedFd<'_>, name: &CStr, meta: &Meta) -> std::io::Result<()> {
    sys::mknodat(dir, name, (meta.mode & libc::S_IFMT) | 0o600, meta.rdev)
}

/// Options for [`clone_tree`].
#[derive(Clone, Debug)]
pub struct CloneOptions {
    /// Clone files on all cores (rayon). Default true.
    pub parallel: bool,
}

impl Default for CloneOptions {
    fn default() -> Self {
        CloneOptions { parallel: true }
    }
}

/// Splits a destination into the directory it goes in ("." for a bare name) and its name.
pub(crate) fn split_destination(dst: &Path) -> Result<(&Path, &std::ffi::OsStr)> {
    let name = dst
        .file_name()
        .ok_or_else(|| Error::InvalidPath { path: dst.to_path_buf(), reason: "has no final component".into() })?;
    let parent = match dst.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    Ok((parent, name))
}

/// Creates the directory `dst` (which must not exist; its parent must) and returns its parent's
/// descriptor, its name and its own descriptor.
pub fn create_root(dst: &Path) -> Result<(OwnedFd, CString, OwnedFd)> {
    let (parent, name) = split_destination(dst)?;
    let pfd = sys::open_root_dir(parent).ctx("open", parent)?;
    let cname = sys::cstr(name).ctx("name", dst)?;
    match sys::mkdirat(pfd.as_fd(), &cname, 0o700) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            return Err(Error::DestinationExists(dst.to_path_buf()));
        }
        Err(e) => return Err(Error::io("mkdir", dst, e)),
    }
    let fd = sys::open_dir_at(pfd.as_fd(), &cname).ctx("open", dst)?;
    Ok((pfd, cname, fd))
}

/// Clones the tree `src` into the new directory `dst`: directories, regular files (reflinked,
/// or copied sparse-aware where reflinks are impossible), symlinks (as links, never followed),
/// hard links (kept as links inside the clone), FIFOs, sockets and device nodes, with owners,
/// permissions, times and extended attributes. Every destination entry is created relative to
/// a descriptor of a directory this function created, with `O_EXCL`/`O_NOFOLLOW`, so nothing is
/// written outside `dst`. On error the partial destination is removed.
pub fn clone_tree(src: &Path, dst: &Path, opts: &CloneOptions) -> Result<CloneReport> {
    let scan = walk::scan(src)?;
    let (_pfd, _name, root) = create_root(dst)?;
    let result = clone_scanned(&scan, src, root, dst, opts);
    if result.is_err()
        && let Err(e) = std::fs::remove_dir_all(dst)
    {
        tracing::warn!(path = %dst.display(), error = %e, "could not remove partial clone");
    }
    result
}

fn clone_scanned(scan: &walk::Scan, src: &Path, root: OwnedFd, dst: &Path, opts: &CloneOptions) -> Result<CloneReport> {
    // Destination directories, parents first (scan order guarantees parents come first).
    let mut ddirs = DirTable::new(root, dirfds::budget());
    for d in &scan.dirs[1..] {
        let parent = d.parent.unwrap_or(0);
        let pfd = ddirs.get(parent).ctx("open", dst.join(&d.rel))?;
        sys::mkdirat(pfd.fd(), &d.name, 0o700).ctx("mkdir", dst.join(&d.rel))?;
        let fd = if ddirs.is_open(parent) {
            Some(sys::open_dir_at(pfd.fd(), &d.name).ctx("open", dst.join(&d.rel))?)
        } else {
            None
        };
        drop(pfd);
        ddirs.push(parent, d.name.clone(), fd);
    }

    // Hard links: the first entry of each (dev, inode) is cloned, the others linked to it.
    let mut first: HashMap<(u64, u64), usize> = HashMap::new();
    let mut primaries = Vec::with_capacity(scan.entries.len());
    let mut links = Vec::new();
    for (i, e) in scan.entries.iter().enumerate() {
        if e.subdir.is_some() {
            continue;
        }
        if e.meta.nlink > 1 {
            match first.entry((e.meta.dev, e.meta.ino)) {
                std::collections::hash_map::Entry::Occupied(o) => {
                    links.push((i, *o.get()));
                    continue;
                }
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(i);
                }
            }
        }
        primaries.push(i);
    }

    let c = Counters::default();
    let skipped = Mutex::new(Vec::new());
    let (files, symlinks, special) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let one = |i: &usize| -> Result<()> {
        let e = &scan.entries[*i];
        let rel = || scan.rel_path(e);
        let sdir_ref = scan.dir_fd(e.dir).map_err(|err| Error::io("open", src.join(rel()), err))?;
        let ddir_ref = ddirs.get(e.dir).map_err(|err| Error::io("open", dst.join(rel()), err))?;
        let (sdir, ddir) = (sdir_ref.fd(), ddir_ref.fd());
        match e.meta.kind() {
            Kind::File => {
                // O_NONBLOCK: if the entry was swapped for a FIFO since the walk, do not hang.
                let sfd = sys::openat(sdir, &e.name, libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY, 0)
                    .map_err(|err| Error::io("open", src.join(rel()), err))?;
                let st = sys::fstat(sfd.as_fd()).map_err(|err| Error::io("stat", src.join(rel()), err))?;
                let meta = Meta::from_stat(&st);
                if meta.kind() != Kind::File {
                    return Err(Error::InvalidPath {
                        path: src.join(rel()),
                        reason: "changed type during the clone".into(),
                    });
                }
                let xattrs = sys::read_xattrs(XattrTarget::Fd(sfd.as_fd()))
                    .map_err(|err| Error::io("read xattrs", src.join(rel()), err))?;
                create_file_lean(ddir, &e.name, sfd.as_fd(), &meta, &xattrs, &c)
                    .map_err(|err| Error::io("clone", dst.join(rel()), err))?;
                files.fetch_add(1, Ordering::Relaxed);
            }
            Kind::Symlink => {
                let target =
                    sys::readlinkat(sdir, &e.name).map_err(|err| Error::io("readlink", src.join(rel()), err))?;
                let xattrs =
                    walk::entry_xattrs(sdir, &e.name).map_err(|err| Error::io("read xattrs", src.join(rel()), err))?;
                sys::symlinkat(&target, ddir, &e.name).map_err(|err| Error::io("symlink", dst.join(rel()), err))?;
                apply_meta_at(ddir, &e.name, &e.meta, &xattrs, &c)
                    .map_err(|err| Error::io("set metadata", dst.join(rel()), err))?;
                symlinks.fetch_add(1, Ordering::Relaxed);
            }
            Kind::Fifo | Kind::Socket | Kind::CharDevice | Kind::BlockDevice => {
                match create_special(ddir, &e.name, &e.meta) {
                    Ok(()) => {
                        let xattrs = walk::entry_xattrs(sdir, &e.name).unwrap_or_default();
                        apply_meta_at(ddir, &e.name, &e.meta, &xattrs, &c)
                            .map_err(|err| Error::io("set metadata", dst.join(rel()), err))?;
                        special.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(err) if err.raw_os_error() == Some(libc::EPERM) => {
                        tracing::warn!(path = %rel().display(), "cannot create device node without privilege; skipped");
                        skipped.lock().unwrap_or_else(|p| p.into_inner()).push(Skipped {
                            path: rel().to_string_lossy().into_owned(),
                            reason: format!("{:?}: {err}", e.meta.kind()),
                        });
                    }
                    Err(err) => return Err(Error::io("mknod", dst.join(rel()), err)),
                }
            }
            Kind::Dir => {}
        }
        Ok(())
    };
    if opts.parallel {
        primaries.par_iter().try_for_each(one)?;
    } else {
        primaries.iter().try_for_each(one)?;
    }

    for &(i, target) in &links {
        let e = &scan.entries[i];
        let t = &scan.entries[target];
        let (tdir, edir) = (ddirs.get(t.dir), ddirs.get(e.dir));
        let (tdir, edir) = (
            tdir.map_err(|err| Error::io("open", dst.join(scan.rel_path(t)), err))?,
            edir.map_err(|err| Error::io("open", dst.join(scan.rel_path(e)), err))?,
        );
        sys::linkat(tdir.fd(), &t.name, edir.fd(), &e.name)
            .map_err(|err| Error::io("link", dst.join(scan.rel_path(e)), err))?;
    }

    // Directory metadata last: creating entries changes a directory's mtime.
    let dir_meta = |i: usize| -> Result<()> {
        let d = &scan.dirs[i];
        let sfd = scan.dir_fd(i).map_err(|err| Error::io("open", src.join(&d.rel), err))?;
        let xattrs = sys::read_xattrs(XattrTarget::Fd(sfd.fd()))
            .map_err(|err| Error::io("read xattrs", src.join(&d.rel), err))?;
        let dfd = ddirs.get(i).map_err(|err| Error::io("open", dst.join(&d.rel), err))?;
        apply_meta_fd(dfd.fd(), &d.meta, &xattrs, &c).map_err(|err| Error::io("set metadata", dst.join(&d.rel), err))
    };
    if opts.parallel {
        (0..scan.dirs.len()).into_par_iter().try_for_each(dir_meta)?;
    } else {
        (0..scan.dirs.len()).try_for_each(dir_meta)?;
    }

    warn_lost_metadata(&c, dst);
    Ok(CloneReport {
        mode: c.mode(),
        dirs: scan.dirs.len() as u64,
        files: files.into_inner(),
        symlinks: symlinks.into_inner(),
        hardlinks: links.len() as u64,
        special: special.into_inner(),
        reflinked: c.reflinked.load(Ordering::Relaxed),
        copied: c.copied.load(Ordering::Relaxed),
        bytes: c.bytes.load(Ordering::Relaxed),
        copied_bytes: c.copied_bytes.load(Ordering::Relaxed),
        xattr_failures: c.xattr_failures.load(Ordering::Relaxed),
        owner_failures: c.owner_failures.load(Ordering::Relaxed),
        skipped: skipped.into_inner().unwrap_or_else(|p| p.into_inner()),
    })
}

/// Clones one regular file `src` to the new path `dst` (which must not exist), keeping its
/// metadata: a reflink where possible, else a sparse-aware copy. Returns the mode used.
pub fn clone_file(src: &Path, dst: &Path) -> Result<CopyMode> {
    let sfd = std::fs::File::open(src).map_err(|e| Error::io("open", src, e))?;
    let st = sys::fstat(sfd.as_fd()).ctx("stat", src)?;
    let meta = Meta::from_stat(&st);
    if meta.kind() != Kind::File {
        return Err(Error::InvalidPath { path: src.to_path_buf(), reason: "not a regular file".into() });
    }
    let xattrs = sys::read_xattrs(XattrTarget::Fd(sfd.as_fd())).ctx("read xattrs", src)?;
    let name = dst
        .file_name()
        .ok_or_else(|| Error::InvalidPath { path: dst.to_path_buf(), reason: "has no file name".into() })?;
    let parent = match dst.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let pfd = sys::open_root_dir(&parent).ctx("open", &parent)?;
    let cname = sys::cstr(name).ctx("name", dst)?;
    let c = Counters::default();
    match create_file(pfd.as_fd(), &cname, sfd.as_fd(), &meta, &xattrs, &c) {
        Ok(_) => Ok(c.mode()),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Err(Error::DestinationExists(dst.to_path_buf())),
        Err(e) => {
            let _ = sys::unlinkat(pfd.as_fd(), &cname, 0);
            Err(Error::io("clone", dst, e))
        }
    }
}
