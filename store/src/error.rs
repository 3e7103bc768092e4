//! The store's errors.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O call failed; `context` says on what.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// RocksDB, which holds the index, failed.
    #[error("index (RocksDB): {0}")]
    Index(#[from] rocksdb::Error),
    /// Another process holds the store for writing.
    #[error("store {path} is locked by process {holder} (waited {waited:?}); retry later or raise --lock-timeout")]
    Locked {
        /// The store directory.
        path: PathBuf,
        /// The holder's pid as it recorded it ("unknown" when unreadable).
        holder: String,
        /// How long this process waited.
        waited: Duration,
    },
    /// A ref or object that does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// Stored data that does not match its id, or a malformed stored structure.
    #[error("corrupt {what}: {detail}")]
    Corrupt {
        /// Which object: "image vm-a page 1234", "blob state chunk 3", "object 1a2b…".
        what: String,
        /// What is wrong with it.
        detail: String,
    },
    /// A caller's input that the store refuses (bad page size, bad ref name, ...).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A write on a store opened read-only.
    #[error("the store was opened read-only")]
    ReadOnly,
    /// The store's filesystem is nearly full: writing more would eat into the room kept for the
    /// index ([`crate::OpenOptions::min_free_bytes`]).
    #[error(
        "the filesystem of {} is nearly full: {} MB free, and the store keeps {} MB free for its index; nothing was committed",
        path.display(), free >> 20, reserve >> 20
    )]
    Full {
        /// Where the store was writing.
        path: PathBuf,
        /// Bytes free there.
        free: u64,
        /// Bytes the store keeps free.
        reserve: u64,
    },
}

/// The store's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Adds context to I/O errors.
pub(crate) trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io { context: context(), source })
    }
}

impl Error {
    /// True when this error means stored data is damaged.
    pub fn is_corruption(&self) -> bool {
        matches!(self, Error::Corrupt { .. })
    }
}
