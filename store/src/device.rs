//! What the store reads images and blobs from, and materializes images onto: regular files and
//! block devices (a raw disk on an LVM volume, a loop device, a real disk). A block device's
//! `st_size` is 0, so its size is asked of the device; anything else (a FIFO, a character
//! device, a socket, a directory) has no size to read to and is refused with a clear error
//! rather than ingested as empty or waited on.

use std::fs::{File, Metadata, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;

use crate::error::{Error, IoContext, Result};

nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);

/// What the store can read from or write to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    File,
    BlockDevice,
}

/// An opened source or target, with its size in bytes.
pub(crate) struct Opened {
    pub file: File,
    pub meta: Metadata,
    pub kind: Kind,
    pub size: u64,
}

/// Opens `path` to read it whole: a regular file, or a block device.
pub(crate) fn open_source(path: &Path) -> Result<Opened> {
    // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer, before fstat
    // could tell what it is. (It changes nothing for files and block devices read with pread.)
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .ctx(|| format!("open {}", path.display()))?;
    opened(path, file, "read")
}

/// Opens `path` to materialize an image of `size` bytes onto: a regular file (created or
/// truncated to that size) or a block device at least that large (its size is kept).
pub(crate) fn open_target(path: &Path, size: u64) -> Result<Opened> {
    let existing = std::fs::metadata(path).ok().map(|m| m.file_type());
    if let Some(ft) = existing.filter(|ft| !ft.is_file() && !ft.is_block_device()) {
        return Err(refused(path, ft, "write"));
    }
    let is_block = existing.is_some_and(|ft| ft.is_block_device());
    let file = OpenOptions::new()
        .write(true)
        .create(!is_block)
        .truncate(!is_block)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .ctx(|| format!("create {}", path.display()))?;
    let target = opened(path, file, "write")?;
    match target.kind {
        Kind::File => target.file.set_len(size).ctx(|| format!("size {}", path.display()))?,
        Kind::BlockDevice if target.size < size => {
            return Err(Error::InvalidInput(format!(
                "{} holds {} bytes, less than the image's {size}",
                path.display(),
                target.size
            )));
        }
        Kind::BlockDevice => {}
    }
    Ok(target)
}

fn opened(path: &Path, file: File, verb: &str) -> Result<Opened> {
    let meta = file.metadata().ctx(|| format!("stat {}", path.display()))?;
    let ft = meta.file_type();
    let (kind, size) = if ft.is_file() {
        (Kind::File, meta.len())
    } else if ft.is_block_device() {
        let mut size = 0u64;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid for the call.
        unsafe { blkgetsize64(file.as_raw_fd(), &mut size) }
            .map_err(|e| Error::Io { context: format!("size of block device {}", path.display()), source: e.into() })?;
        (Kind::BlockDevice, size)
    } else {
        return Err(refused(path, ft, verb));
    };
    // SAFETY: plain fcntl on a descriptor we own; clears the O_NONBLOCK given to open.
    unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, 0) };
    Ok(Opened { file, meta, kind, size })
}

fn refused(path: &Path, ft: std::fs::FileType, verb: &str) -> Error {
    let what = if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    };
    Error::InvalidInput(format!(
        "{} is {what}: the store can {verb} only a regular file or a block device",
        path.display()
    ))
}

/// Makes `[offset, offset + len)` of a block device read as zeros: the device zeroes it itself
/// where it can (FALLOC_FL_ZERO_RANGE: a loop device keeps its file sparse, an SSD may unmap),
/// else zeros are written.
pub(crate) fn zero_range(target: &Opened, path: &Path, offset: u64, len: u64) -> Result<()> {
    let mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: plain fallocate on a descriptor we own.
    if unsafe { libc::fallocate(target.file.as_raw_fd(), mode, offset as i64, len as i64) } == 0 {
        return Ok(());
    }
    let zeros = vec![0u8; (len as usize).min(1 << 20)];
    let mut at = offset;
    while at < offset + len {
        let n = (offset + len - at).min(zeros.len() as u64) as usize;
        target.file.write_all_at(&zeros[..n], at).ctx(|| format!("write {}", path.display()))?;
        at += n as u64;
    }
    Ok(())
}
