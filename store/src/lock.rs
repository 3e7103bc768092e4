//! The writer lock: one process opens a store for writing at a time.
//!
//! An advisory `flock` on `DIR/lock`, which the kernel releases when the holder dies, so a killed
//! writer never leaves the store locked. The holder writes its pid into the file so that a waiting
//! process can say who holds it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::error::{Error, IoContext, Result};

/// A held writer lock; released on drop (or when the process exits).
#[derive(Debug)]
pub struct StoreLock {
    _file: File,
}

impl StoreLock {
    /// Takes the lock of the store at `dir`, waiting up to `timeout` for its holder.
    pub fn acquire(dir: &Path, timeout: Duration) -> Result<StoreLock> {
        let path = dir.join("lock");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .ctx(|| format!("open {}", path.display()))?;
        let start = Instant::now();
        let mut logged = false;
        loop {
            // SAFETY: flock on a descriptor we own; it neither reads nor writes our memory.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc == 0 {
                break;
            }
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(Error::Io { context: format!("lock {}", path.display()), source: err });
            }
            if start.elapsed() >= timeout {
                let mut holder = String::new();
                let _ = file.rewind().and_then(|()| file.read_to_string(&mut holder));
                let holder = holder.trim();
                return Err(Error::Locked {
                    path: dir.to_path_buf(),
                    holder: if holder.is_empty() { "unknown".into() } else { holder.to_string() },
                    waited: start.elapsed(),
                });
            }
            if !logged {
                tracing::info!(store = %dir.display(), "store is locked by another process; waiting");
                logged = true;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        file.set_len(0).ctx(|| format!("truncate {}", path.display()))?;
        file.rewind().ctx(|| format!("seek {}", path.display()))?;
        write!(file, "{}", std::process::id()).ctx(|| format!("write {}", path.display()))?;
        Ok(StoreLock { _file: file })
    }
}
