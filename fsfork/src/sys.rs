//! Thin, safe wrappers over the Linux system calls fsfork needs, all relative to directory file
//! descriptors so that no path component is ever resolved through a symlink.

use std::ffi::{CStr, CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};

/// `FICLONE` = `_IOW(0x94, 9, int)`: share all of a file's extents with another (XFS, btrfs).
const FICLONE: libc::c_ulong = 0x4004_9409;
/// `FS_IOC_FIEMAP` = `_IOWR('f', 11, struct fiemap)`.
const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;

/// Converts a -1 return into the thread's `errno`.
fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 { Err(io::Error::last_os_error()) } else { Ok(ret) }
}

/// Like `cvt`, retrying on EINTR.
fn cvt_retry(mut f: impl FnMut() -> libc::c_int) -> io::Result<libc::c_int> {
    loop {
        match cvt(f()) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// A name as a C string; names with an interior NUL cannot exist on Linux.
pub fn cstr(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "name contains a NUL byte"))
}

/// Opens `name` relative to `dir` with `flags | O_CLOEXEC | O_NOFOLLOW`.
pub fn openat(dir: BorrowedFd<'_>, name: &CStr, flags: libc::c_int, mode: u32) -> io::Result<OwnedFd> {
    let fd = cvt_retry(|| {
        // SAFETY: `name` is a valid NUL-terminated string and `dir` a live descriptor; the
        // returned descriptor is owned by nobody else.
        unsafe {
            libc::openat(
                dir.as_raw_fd(),
                name.as_ptr(),
                flags | libc::O_CLOEXEC | libc::O_NOFOLLOW,
                mode as libc::c_uint,
            )
        }
    })?;
    // SAFETY: `fd` was just returned by openat and is not owned elsewhere.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens the directory `name` under `dir` without following a symlink at the last component.
pub fn open_dir_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<OwnedFd> {
    openat(dir, name, libc::O_RDONLY | libc::O_DIRECTORY, 0)
}

/// Opens a path given by the user as the root of a tree. The path itself may go through
/// symlinks (like `cp -a src dst` does for its operands), but the final component must be a
/// directory.
pub fn open_root_dir(path: &std::path::Path) -> io::Result<OwnedFd> {
    let c = cstr(path.as_os_str())?;
    let fd = cvt_retry(|| {
        // SAFETY: valid NUL-terminated path; the result is owned by us.
        unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC) }
    })?;
    // SAFETY: fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`.
pub fn lstatat(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    cvt_retry(|| {
        // SAFETY: `st` points to writable memory of the right size.
        unsafe { libc::fstatat(dir.as_raw_fd(), name.as_ptr(), st.as_mut_ptr(), libc::AT_SYMLINK_NOFOLLOW) }
    })?;
    // SAFETY: fstatat succeeded, so it filled the whole struct.
    Ok(unsafe { st.assume_init() })
}

/// `fstat(fd)`.
pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `st` points to writable memory of the right size.
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstat succeeded.
    Ok(unsafe { st.assume_init() })
}

/// Lists a directory (without `.` and `..`) from its start. Moves the descriptor's offset, so
/// one descriptor must not be listed from two threads at once (a walk lists each once).
pub fn read_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<(CString, u8)>> {
    // getdents64 straight on the descriptor: fdopendir would cost a dup, an fstat, an fcntl
    // and a close per directory (a workspace walk lists thousands).
    // SAFETY: lseek on a live descriptor; rewinds one that was read before.
    if unsafe { libc::lseek(dir.as_raw_fd(), 0, libc::SEEK_SET) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 32 * 1024];
    let mut out = Vec::new();
    loop {
        let n = cvt_retry(|| {
            // SAFETY: `buf` is writable for its length; getdents64 writes at most that much.
            unsafe { libc::syscall(libc::SYS_getdents64, dir.as_raw_fd(), buf.as_mut_ptr(), buf.len()) as libc::c_int }
        })? as usize;
        if n == 0 {
            return Ok(out);
        }
        let mut pos = 0;
        // Each record: d_ino u64, d_off i64, d_reclen u16, d_type u8, d_name (NUL-terminated).
        while pos + 19 < n {
            let reclen = u16::from_ne_bytes([buf[pos + 16], buf[pos + 17]]) as usize;
            let dtype = buf[pos + 18];
            if reclen < 20 {
                return Err(io::Error::from(io::ErrorKind::InvalidData));
            }
            let rec =
                buf.get(pos + 19..(pos + reclen).min(n)).ok_or_else(|| io::Error::from(io::ErrorKind::InvalidData))?;
            let name = CStr::from_bytes_until_nul(rec).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
            let b = name.to_bytes();
            if b != b"." && b != b".." {
                out.push((name.to_owned(), dtype));
            }
            pos += reclen;
        }
    }
}

/// `mkdirat(dir, name, mode)`; fails if anything already exists there.
pub fn mkdirat(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: valid descriptor and NUL-terminated name.
    cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode as libc::mode_t) }).map(drop)
}

/// `mknodat(dir, name, mode, rdev)` for FIFOs, sockets and device nodes.
pub fn mknodat(dir: BorrowedFd<'_>, name: &CStr, mode: u32, rdev: u64) -> io::Result<()> {
    // SAFETY: valid descriptor and NUL-terminated name.
    cvt(unsafe { libc::mknodat(dir.as_raw_fd(), name.as_ptr(), mode as libc::mode_t, rdev as libc::dev_t) }).map(drop)
}

/// `readlinkat(dir, name)`: the raw bytes of a symlink's target.
pub fn readlinkat(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<OsString> {
    let mut buf = vec![0u8; 256];
    loop {
        // SAFETY: `buf` is writable for `buf.len()` bytes.
        let n = unsafe { libc::readlinkat(dir.as_raw_fd(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        if n < buf.len() {
            buf.truncate(n);
            return Ok(OsString::from_vec(buf));
        }
        // The target may have been truncated: try again with more room.
        buf.resize(buf.len() * 4, 0);
    }
}

/// `symlinkat(target, dir, name)`: the target is stored as given, never resolved.
pub fn symlinkat(target: &OsStr, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    let t = cstr(target)?;
    // SAFETY: NUL-terminated strings and a live descriptor.
    cvt(unsafe { libc::symlinkat(t.as_ptr(), dir.as_raw_fd(), name.as_ptr()) }).map(drop)
}

/// `linkat(odir, oname, ndir, nname, 0)`: a hard link; never follows symlinks.
pub fn linkat(odir: BorrowedFd<'_>, oname: &CStr, ndir: BorrowedFd<'_>, nname: &CStr) -> io::Result<()> {
    // SAFETY: NUL-terminated strings and live descriptors.
    cvt(unsafe { libc::linkat(odir.as_raw_fd(), oname.as_ptr(), ndir.as_raw_fd(), nname.as_ptr(), 0) }).map(drop)
}

/// `fchownat(dir, name, uid, gid, AT_SYMLINK_NOFOLLOW)` (for symlinks and special files).
pub fn lchownat(dir: BorrowedFd<'_>, name: &CStr, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: NUL-terminated name, live descriptor.
    cvt(unsafe { libc::fchownat(dir.as_raw_fd(), name.as_ptr(), uid, gid, libc::AT_SYMLINK_NOFOLLOW) }).map(drop)
}

/// `fchmodat(dir, name, mode, 0)`; only used on entries we just created that are not symlinks.
pub fn fchmodat(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: NUL-terminated name, live descriptor.
    cvt(unsafe { libc::fchmodat(dir.as_raw_fd(), name.as_ptr(), mode as libc::mode_t, 0) }).map(drop)
}

/// `fchown(fd, uid, gid)`.
pub fn fchown(fd: BorrowedFd<'_>, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: live descriptor.
    cvt(unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) }).map(drop)
}

/// `fchmod(fd, mode)`.
pub fn fchmod(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    // SAFETY: live descriptor.
    cvt(unsafe { libc::fchmod(fd.as_raw_fd(), mode as libc::mode_t) }).map(drop)
}

/// A timestamp with nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default, serde::Serialize, serde::Deserialize)]
pub struct Time {
    /// Seconds since the epoch.
    pub sec: i64,
    /// Nanoseconds.
    pub nsec: u32,
}

impl Time {
    fn ts(self) -> libc::timespec {
        libc::timespec { tv_sec: self.sec as libc::time_t, tv_nsec: self.nsec as libc::c_long }
    }
}

/// The coarse wall clock the kernel stamps inode times with (`CLOCK_REALTIME_COARSE`): a
/// file changed from now on gets a ctime no earlier than this.
pub fn coarse_now() -> Time {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid clock id and a pointer to a live timespec; cannot fail for this clock.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) };
    Time { sec: ts.tv_sec, nsec: ts.tv_nsec as u32 }
}

/// `futimens(fd, [atime, mtime])`.
pub fn futimens(fd: BorrowedFd<'_>, atime: Time, mtime: Time) -> io::Result<()> {
    let ts = [atime.ts(), mtime.ts()];
    // SAFETY: live descriptor and an array of two timespecs.
    cvt(unsafe { libc::futimens(fd.as_raw_fd(), ts.as_ptr()) }).map(drop)
}

/// `utimensat(dir, name, [atime, mtime], AT_SYMLINK_NOFOLLOW)`.
pub fn lutimensat(dir: BorrowedFd<'_>, name: &CStr, atime: Time, mtime: Time) -> io::Result<()> {
    let ts = [atime.ts(), mtime.ts()];
    // SAFETY: live descriptor, NUL-terminated name and two timespecs.
    cvt(unsafe { libc::utimensat(dir.as_raw_fd(), name.as_ptr(), ts.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) }).map(drop)
}

/// Bytes an unprivileged writer may still use on the filesystem of `fd` (`fstatvfs(3)`).
pub fn free_bytes(fd: BorrowedFd<'_>) -> io::Result<u64> {
    // SAFETY: an all-zero statvfs is a valid value for the call to overwrite.
    let mut v: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open for the call; `v` is a valid, writable statvfs.
    if unsafe { libc::fstatvfs(fd.as_raw_fd(), &mut v) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v.f_bavail as u64 * v.f_frsize as u64)
}

/// `FICLONE`: makes `dst` share all of `src`'s extents.
pub fn ficlone(dst: BorrowedFd<'_>, src: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: the ioctl takes the source descriptor as its integer argument.
    cvt(unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE as _, src.as_raw_fd()) }).map(drop)
}

/// Whether an error from FICLONE means "reflinks are not possible here" (rather than a real
/// failure): not supported by the filesystem, or source and destination on different ones.
pub fn is_reflink_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::EXDEV) | Some(libc::EINVAL) | Some(libc::ENOTTY) | Some(libc::ENOSYS)
    )
}

/// `lseek` with SEEK_DATA/SEEK_HOLE; `Ok(None)` at ENXIO (no more data past `off`).
fn seek(fd: RawFd, off: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    // SAFETY: plain lseek on a live descriptor.
    let r = unsafe { libc::lseek64(fd, off as i64, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r as u64))
}

/// Copies `len` bytes of `src` into `dst` (a new, empty file) without turning holes into data:
/// only the data ranges reported by SEEK_DATA/SEEK_HOLE are copied, with copy_file_range (which
/// itself shares extents on filesystems that can), and the size is set with ftruncate.
/// Returns the number of data bytes copied.
pub fn sparse_copy(src: BorrowedFd<'_>, dst: BorrowedFd<'_>, len: u64) -> io::Result<u64> {
    let (s, d) = (src.as_raw_fd(), dst.as_raw_fd());
    let mut copied = 0u64;
    let mut off = 0u64;
    while off < len {
        let Some(data) = seek(s, off, libc::SEEK_DATA)? else {
            break;
        };
        if data >= len {
            break;
        }
        let end = seek(s, data, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        let mut pos = data;
        while pos < end {
            let mut ip = pos as libc::loff_t;
            let mut op = pos as libc::loff_t;
            let want = ((end - pos) as usize).min(1 << 30);
            // SAFETY: both descriptors are live; offsets are passed by pointer and updated.
            let n = unsafe { libc::copy_file_range(s, &mut ip, d, &mut op, want, 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EXDEV) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP) | Some(libc::EINVAL)
                ) {
                    // Old kernels or odd filesystem pairs: copy this range by hand.
                    copied += rw_copy(s, d, pos, end)?;
                    pos = end;
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                // The source shrank under us: stop here.
                break;
            }
            pos += n as u64;
            copied += n as u64;
        }
        off = end;
    }
    // SAFETY: live descriptor.
    cvt(unsafe { libc::ftruncate64(d, len as i64) })?;
    Ok(copied)
}

/// pread/pwrite copy of `[from, to)`, skipping all-zero blocks so that they stay holes.
fn rw_copy(s: RawFd, d: RawFd, from: u64, to: u64) -> io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = from;
    let mut copied = 0;
    while pos < to {
        let want = ((to - pos) as usize).min(buf.len());
        // SAFETY: `buf` is writable for `want` bytes.
        let n = unsafe { libc::pread64(s, buf.as_mut_ptr().cast(), want, pos as i64) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            break;
        }
        let n = n as usize;
        if buf[..n].iter().any(|&b| b != 0) {
            let mut w = 0;
            while w < n {
                // SAFETY: `buf[w..n]` is initialised.
                let m = unsafe { libc::pwrite64(d, buf[w..].as_ptr().cast(), n - w, (pos + w as u64) as i64) };
                if m < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(e);
                }
                w += m as usize;
            }
            copied += n as u64;
        }
        pos += n as u64;
    }
    Ok(copied)
}

/// Reads the names of all extended attributes of `fd` (or of `path` with `l*xattr` when `fd`
/// is `None`) and their values.
pub fn read_xattrs(target: XattrTarget<'_>) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut names = vec![0u8; 1024];
    let n = loop {
        let r = match target {
            // SAFETY: `names` is writable for its length.
            XattrTarget::Fd(fd) => unsafe { libc::flistxattr(fd.as_raw_fd(), names.as_mut_ptr().cast(), names.len()) },
            // SAFETY: NUL-terminated path; `names` is writable.
            XattrTarget::Path(p) => unsafe { libc::llistxattr(p.as_ptr(), names.as_mut_ptr().cast(), names.len()) },
        };
        if r >= 0 {
            break r as usize;
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ERANGE) => names.resize(names.len() * 4, 0),
            Some(libc::ENOTSUP) => return Ok(Vec::new()),
            _ => return Err(e),
        }
    };
    let mut out = Vec::new();
    for name in names[..n].split(|&b| b == 0).filter(|s| !s.is_empty()) {
        let cname = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
        let mut val = vec![0u8; 256];
        loop {
            let r = match target {
                // SAFETY: NUL-terminated name; `val` is writable.
                XattrTarget::Fd(fd) => unsafe {
                    libc::fgetxattr(fd.as_raw_fd(), cname.as_ptr(), val.as_mut_ptr().cast(), val.len())
                },
                // SAFETY: NUL-terminated strings; `val` is writable.
                XattrTarget::Path(p) => unsafe {
                    libc::lgetxattr(p.as_ptr(), cname.as_ptr(), val.as_mut_ptr().cast(), val.len())
                },
            };
            if r >= 0 {
                val.truncate(r as usize);
                out.push((name.to_vec(), val));
                break;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ERANGE) => val.resize(val.len() * 4, 0),
                // Removed between list and get: skip it.
                Some(libc::ENODATA) => break,
                _ => return Err(e),
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Where extended attributes are read or written.
#[derive(Clone, Copy)]
pub enum XattrTarget<'a> {
    /// An open file or directory.
    Fd(BorrowedFd<'a>),
    /// A path whose last component is not followed (used for symlinks, through
    /// `/proc/self/fd/N/name` so that the parent is still pinned by a descriptor).
    Path(&'a CStr),
}

/// Sets extended attributes; returns how many could not be set (e.g. `security.*` without
/// privilege) after logging them.
pub fn write_xattrs(target: XattrTarget<'_>, xattrs: &[(Vec<u8>, Vec<u8>)]) -> io::Result<usize> {
    let mut failed = 0;
    for (name, value) in xattrs {
        let cname = CString::new(name.as_slice()).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
        let r = match target {
            // SAFETY: NUL-terminated name, value readable for its length.
            XattrTarget::Fd(fd) => unsafe {
                libc::fsetxattr(fd.as_raw_fd(), cname.as_ptr(), value.as_ptr().cast(), value.len(), 0)
            },
            // SAFETY: as above.
            XattrTarget::Path(p) => unsafe {
                libc::lsetxattr(p.as_ptr(), cname.as_ptr(), value.as_ptr().cast(), value.len(), 0)
            },
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            tracing::warn!(xattr = %String::from_utf8_lossy(name), error = %e, "could not set extended attribute");
            failed += 1;
        }
    }
    Ok(failed)
}

/// The `/proc/self/fd/DIR/NAME` path of an entry, for the `l*xattr` calls that have no `*at`
/// form: the directory stays pinned by its descriptor and the last component is not followed.
pub fn proc_path(dir: BorrowedFd<'_>, name: &CStr) -> CString {
    let mut p = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    p.extend_from_slice(name.to_bytes());
    // A name from readdir has no NUL, so this cannot fail; fall back to an impossible path.
    CString::new(p).unwrap_or_else(|_| c"/nonexistent".to_owned())
}

/// `renameat2(odir, oname, ndir, nname, RENAME_EXCHANGE)`: swaps two entries atomically.
pub fn rename_exchange(odir: BorrowedFd<'_>, oname: &CStr, ndir: BorrowedFd<'_>, nname: &CStr) -> io::Result<()> {
    // SAFETY: NUL-terminated names and live descriptors.
    cvt(unsafe {
        libc::renameat2(odir.as_raw_fd(), oname.as_ptr(), ndir.as_raw_fd(), nname.as_ptr(), libc::RENAME_EXCHANGE)
    })
    .map(drop)
}

/// `renameat(odir, oname, ndir, nname)`.
pub fn renameat(odir: BorrowedFd<'_>, oname: &CStr, ndir: BorrowedFd<'_>, nname: &CStr) -> io::Result<()> {
    // SAFETY: NUL-terminated names and live descriptors.
    cvt(unsafe { libc::renameat(odir.as_raw_fd(), oname.as_ptr(), ndir.as_raw_fd(), nname.as_ptr()) }).map(drop)
}

/// `unlinkat(dir, name, flags)`.
pub fn unlinkat(dir: BorrowedFd<'_>, name: &CStr, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: NUL-terminated name and a live descriptor.
    cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) }).map(drop)
}

/// `fsync(fd)`.
pub fn fsync(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: live descriptor.
    cvt(unsafe { libc::fsync(fd.as_raw_fd()) }).map(drop)
}

/// `syncfs(fd)`: writes back all dirty data and metadata of the filesystem holding `fd`.
pub fn syncfs(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: live descriptor; syncfs touches no memory of ours.
    cvt(unsafe { libc::syncfs(fd.as_raw_fd()) }).map(drop)
}

/// One extent as reported by FIEMAP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Offset in the file.
    pub logical: u64,
    /// Address on the device (comparable between files of one filesystem).
    pub physical: u64,
    /// Length in bytes.
    pub length: u64,
    /// FIEMAP_EXTENT_* flags.
    pub flags: u32,
}

/// FIEMAP_EXTENT_LAST.
const FIEMAP_EXTENT_LAST: u32 = 0x1;
/// Extent flags under which the physical address says nothing about the data
/// (UNKNOWN 0x2, DELALLOC 0x4, DATA_INLINE 0x200, DATA_TAIL 0x400, NOT_ALIGNED 0x100).
pub const FIEMAP_UNRELIABLE: u32 = 0x2 | 0x4 | 0x100 | 0x200 | 0x400;
/// FIEMAP_FLAG_SYNC: flush dirty data first so that delayed allocations get addresses.
const FIEMAP_FLAG_SYNC: u32 = 0x1;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FiemapExtent {
    fe_logical: u64,
    fe_physical: u64,
    fe_length: u64,
    fe_reserved64: [u64; 2],
    fe_flags: u32,
    fe_reserved: [u32; 3],
}

#[repr(C)]
struct Fiemap {
    fm_start: u64,
    fm_length: u64,
    fm_flags: u32,
    fm_mapped_extents: u32,
    fm_extent_count: u32,
    fm_reserved: u32,
    extents: [FiemapExtent; 256],
}

/// All extents of `fd` (holes are simply absent). With `sync`, dirty data is flushed first so
/// that delayed allocations get real addresses (not needed for a fresh reflink, whose extents
/// all exist on disk, nor for an immutable store object).
pub fn fiemap(fd: BorrowedFd<'_>, sync: bool) -> io::Result<Vec<Extent>> {
    let mut out = Vec::new();
    let mut start = 0u64;
    loop {
        let mut fm = Box::new(Fiemap {
            fm_start: start,
            fm_length: u64::MAX - start,
            fm_flags: if sync { FIEMAP_FLAG_SYNC } else { 0 },
            fm_mapped_extents: 0,
            fm_extent_count: 256,
            fm_reserved: 0,
            extents: [FiemapExtent::default(); 256],
        });
        // SAFETY: `fm` is a correctly laid out struct fiemap with room for 256 extents.
        cvt(unsafe { libc::ioctl(fd.as_raw_fd(), FS_IOC_FIEMAP as _, &mut *fm as *mut Fiemap) })?;
        let n = fm.fm_mapped_extents as usize;
        if n == 0 {
            return Ok(out);
        }
        let mut last = false;
        for e in &fm.extents[..n] {
            out.push(Extent { logical: e.fe_logical, physical: e.fe_physical, length: e.fe_length, flags: e.fe_flags });
            last |= e.fe_flags & FIEMAP_EXTENT_LAST != 0;
        }
        if last {
            return Ok(out);
        }
        let e = &fm.extents[n - 1];
        start = e.fe_logical + e.fe_length;
    }
}

/// Raises the limit on open files as far as allowed (trees are walked with one descriptor per
/// directory): to `fs.nr_open` where the process may raise its hard limit (root), else the soft
/// limit to the hard one.
pub fn raise_nofile_limit() {
    let mut rl = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `rl` is a valid rlimit struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } != 0 {
        return;
    }
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<libc::rlim_t>().ok())
        .unwrap_or(0);
    if nr_open > rl.rlim_max {
        let want = libc::rlimit { rlim_cur: nr_open, rlim_max: nr_open };
        // SAFETY: as above; fails harmlessly (EPERM) without CAP_SYS_RESOURCE.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } == 0 {
            return;
        }
    }
    if rl.rlim_cur < rl.rlim_max {
        rl.rlim_cur = rl.rlim_max;
        // SAFETY: as above.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &rl) };
    }
}

/// The current soft limit on open files.
pub fn nofile_limit() -> u64 {
    let mut rl = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `rl` is a valid rlimit struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } == 0 { rl.rlim_cur } else { 1024 }
}

/// The mount points strictly below `dir` (an absolute, canonical path), from
/// `/proc/self/mountinfo`: bind mounts of the same filesystem included, which `st_dev` alone
/// would not show.
pub fn mount_points_under(dir: &std::path::Path) -> io::Result<Vec<std::path::PathBuf>> {
    let info = std::fs::read("/proc/self/mountinfo")?;
    Ok(info
        .split(|&b| b == b'\n')
        // The fifth field is the mount point, with space, tab, newline and backslash as octal escapes.
        .filter_map(|line| line.split(|&b| b == b' ').nth(4))
        .map(|field| std::path::PathBuf::from(OsString::from_vec(unescape_octal(field))))
        .filter(|m| m != dir && m.starts_with(dir))
        .collect())
}

/// Undoes the kernel's `\ooo` escapes in a mountinfo field.
fn unescape_octal(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let digits =
            field.get(i + 1..i + 4).filter(|d| field[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match digits {
            Some(d) => {
                out.push(d.iter().fold(0u8, |v, c| v.wrapping_mul(8).wrapping_add(c - b'0')));
                i += 4;
            }
            None => {
                out.push(field[i]);
                i += 1;
            }
        }
    }
    out
}
