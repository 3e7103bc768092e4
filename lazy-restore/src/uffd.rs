//! Raw userfaultfd operations on a descriptor that may belong to another process.
//!
//! The `userfaultfd` crate's `Uffd` hides the `copy` field of a failed `UFFDIO_COPY` (which says
//! how much of a partial copy landed) and wraps neither `UFFDIO_POISON` nor explicit errno
//! classification, all of which the server needs to follow the kernel's rules exactly. These are
//! thin, documented wrappers around the ioctls (ABI from `<linux/userfaultfd.h>`).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `UFFD_EVENT_PAGEFAULT`.
pub const EVENT_PAGEFAULT: u8 = 0x12;
/// `UFFD_EVENT_FORK`.
pub const EVENT_FORK: u8 = 0x13;
/// `UFFD_EVENT_REMAP`.
pub const EVENT_REMAP: u8 = 0x14;
/// `UFFD_EVENT_REMOVE`.
pub const EVENT_REMOVE: u8 = 0x15;
/// `UFFD_EVENT_UNMAP`.
pub const EVENT_UNMAP: u8 = 0x16;
/// `UFFD_PAGEFAULT_FLAG_WRITE`.
pub const PAGEFAULT_FLAG_WRITE: u64 = 1;

const UFFDIO: u64 = 0xAA;

/// `_IOC(dir, 0xAA, nr, size)` as the kernel encodes it on x86-64 and arm64.
const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (UFFDIO << 8) | nr
}
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Debug, Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Debug, Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

#[repr(C)]
#[derive(Debug, Default)]
struct UffdioPoison {
    range: UffdioRange,
    mode: u64,
    updated: i64,
}

const UFFDIO_WAKE: u64 = ioc(IOC_READ, 0x02, std::mem::size_of::<UffdioRange>());
const UFFDIO_COPY: u64 = ioc(IOC_READ | IOC_WRITE, 0x03, std::mem::size_of::<UffdioCopy>());
const UFFDIO_ZEROPAGE: u64 = ioc(IOC_READ | IOC_WRITE, 0x04, std::mem::size_of::<UffdioZeropage>());
const UFFDIO_POISON: u64 = ioc(IOC_READ | IOC_WRITE, 0x08, std::mem::size_of::<UffdioPoison>());

/// The outcome of an ioctl that fills a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// The whole range was filled (and waiters woken).
    Done,
    /// Only `n` bytes landed: the kernel returned EAGAIN after a partial copy; retry the rest.
    Partial(usize),
    /// The first page of the range is already present (EEXIST): success for that page.
    Exists,
    /// A mapping change is pending (EAGAIN with nothing copied): drain the events, then retry.
    Again,
    /// The process that owns the memory is gone (ESRCH).
    Gone,
}

fn classify(res: libc::c_int, done: i64) -> io::Result<Fill> {
    if res == 0 {
        return Ok(Fill::Done);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EAGAIN) if done > 0 => Ok(Fill::Partial(done as usize)),
        Some(libc::EAGAIN) => Ok(Fill::Again),
        Some(libc::EEXIST) => Ok(Fill::Exists),
        Some(libc::ESRCH) => Ok(Fill::Gone),
        _ => Err(err),
    }
}

/// `UFFDIO_COPY`: atomically installs `len` bytes from `src` (in this process) at `dst` (in the
/// registered range) and wakes the threads waiting on it.
///
/// # Safety
/// `src` must be valid for reads of `len` bytes.
pub unsafe fn copy(fd: BorrowedFd<'_>, dst: u64, src: *const u8, len: usize) -> io::Result<Fill> {
    let mut arg = UffdioCopy { dst, src: src as u64, len: len as u64, mode: 0, copy: 0 };
    // SAFETY: `arg` is a valid uffdio_copy for the duration of the call; the kernel reads `len`
    // bytes from `src`, which the caller guarantees are readable, and writes only into the other
    // process's registered range (never into ours).
    let res = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_COPY as _, &mut arg) };
    classify(res, arg.copy)
}

/// `UFFDIO_ZEROPAGE`: maps the shared zero page over `[dst, dst+len)` and wakes the waiters.
/// Not available on hugetlb ranges (copy a zeroed buffer there).
pub fn zeropage(fd: BorrowedFd<'_>, dst: u64, len: usize) -> io::Result<Fill> {
    let mut arg = UffdioZeropage { range: UffdioRange { start: dst, len: len as u64 }, mode: 0, zeropage: 0 };
    // SAFETY: `arg` is a valid uffdio_zeropage; the ioctl touches only the registered range.
    let res = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_ZEROPAGE as _, &mut arg) };
    classify(res, arg.zeropage)
}

/// `UFFDIO_POISON`: makes later accesses to `[dst, dst+len)` raise SIGBUS (KVM reports
/// a hardware-poisoned page) instead of seeing any content.
pub fn poison(fd: BorrowedFd<'_>, dst: u64, len: usize) -> io::Result<Fill> {
    let mut arg = UffdioPoison { range: UffdioRange { start: dst, len: len as u64 }, mode: 0, updated: 0 };
    // SAFETY: `arg` is a valid uffdio_poison; the ioctl touches only the registered range.
    let res = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_POISON as _, &mut arg) };
    classify(res, arg.updated)
}

/// `UFFDIO_WAKE`: wakes threads waiting on `[start, start+len)` (needed after EEXIST, when our copy
/// did not wake anyone).
pub fn wake(fd: BorrowedFd<'_>, start: u64, len: usize) -> io::Result<()> {
    let mut arg = UffdioRange { start, len: len as u64 };
    // SAFETY: `arg` is a valid uffdio_range for the duration of the call.
    let res = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_WAKE as _, &mut arg) };
    if res == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// One event read from a userfaultfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A thread (or KVM on behalf of a vCPU) faulted on `addr`.
    Pagefault {
        /// The faulting address (not aligned).
        addr: u64,
        /// `UFFD_PAGEFAULT_FLAG_*`.
        flags: u64,
    },
    /// `[start, end)` was zapped (madvise DONTNEED/REMOVE, balloon): later faults there read zero.
    Remove {
        /// Start of the range.
        start: u64,
        /// End of the range (exclusive).
        end: u64,
    },
    /// `[start, end)` was unmapped.
    Unmap {
        /// Start of the range.
        start: u64,
        /// End of the range (exclusive).
        end: u64,
    },
    /// An event the server does not act on (fork, remap, unknown).
    Other(u8),
}

/// Size of `struct uffd_msg`.
pub const MSG_SIZE: usize = 32;

/// Reads every event available now from a non-blocking userfaultfd into `out`.
/// Returns `Ok(false)` when the read would block and nothing was read.
pub fn read_events(fd: BorrowedFd<'_>, out: &mut Vec<Event>) -> io::Result<bool> {
    let mut buf = [0u8; MSG_SIZE * 64];
    let mut any = false;
    loop {
        // SAFETY: reading into a stack buffer of the given length.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EAGAIN) => return Ok(any),
                Some(libc::EINTR) => continue,
                _ => return Err(err),
            }
        }
        if n == 0 {
            return Ok(any);
        }
        let n = n as usize;
        for msg in buf[..n - n % MSG_SIZE].chunks_exact(MSG_SIZE) {
            any = true;
            let word = |i: usize| {
                let mut w = [0u8; 8];
                w.copy_from_slice(&msg[8 + 8 * i..16 + 8 * i]);
                u64::from_ne_bytes(w)
            };
            out.push(match msg[0] {
                EVENT_PAGEFAULT => Event::Pagefault { flags: word(0), addr: word(1) },
                EVENT_REMOVE => Event::Remove { start: word(0), end: word(1) },
                EVENT_UNMAP => Event::Unmap { start: word(0), end: word(1) },
                other => Event::Other(other),
            });
        }
        if n < buf.len() {
            return Ok(any);
        }
    }
}

/// The features the owner of userfaultfd `fd` enabled with `UFFDIO_API` (the middle field of
/// the `API:` line of its /proc fdinfo); `None` when that cannot be read.
pub fn enabled_features(fd: BorrowedFd<'_>) -> Option<u64> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).ok()?;
    let api = info.lines().find_map(|l| l.strip_prefix("API:"))?;
    u64::from_str_radix(api.trim().split(':').nth(1)?, 16).ok()
}

/// `UFFD_FEATURE_EVENT_REMOVE`: the kernel reports `madvise(MADV_DONTNEED)` and balloon zaps.
pub const FEATURE_EVENT_REMOVE: u64 = 1 << 3;
/// `UFFD_FEATURE_EVENT_FORK`: each fork of the peer would hand us the child's userfaultfd.
pub const FEATURE_EVENT_FORK: u64 = 1 << 1;
/// `UFFD_FEATURE_EVENT_REMAP`: mremap of a region would move it out from under its image.
pub const FEATURE_EVENT_REMAP: u64 = 1 << 2;

/// True when `fd` is a userfaultfd (its /proc link reads `anon_inode:[userfaultfd]`).
pub fn is_userfaultfd(fd: BorrowedFd<'_>) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map(|p| p.as_os_str() == "anon_inode:[userfaultfd]")
        .unwrap_or(false)
}
