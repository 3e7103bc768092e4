//! Errors of the lazy-restore crate.

use std::io;

/// Everything that can go wrong while serving a restore.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The peer sent a handshake we refuse.
    #[error("bad handshake: {0}")]
    Handshake(String),
    /// A page could not be read or failed verification.
    #[error("page {page} of {image}: {message}")]
    Page {
        /// The image the page belongs to.
        image: String,
        /// The page index in image pages.
        page: u64,
        /// What went wrong.
        message: String,
    },
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] snapfork_store::Error),
    /// A working-set record is malformed.
    #[error("working set: {0}")]
    WorkingSet(String),
    /// Invalid arguments.
    #[error("{0}")]
    Invalid(String),
    /// Someone serves that VM already (its journal is locked by a live restore).
    #[error("{0}")]
    Busy(String),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An `Io` error from the current `errno`.
    pub(crate) fn last_os(what: impl Into<String>) -> Self {
        Error::Io { what: what.into(), source: io::Error::last_os_error() }
    }

    /// An `Io` error wrapping `source`.
    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> Self {
        Error::Io { what: what.into(), source }
    }
}
