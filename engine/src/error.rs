//! The engine's errors.

use std::io;

/// Everything an engine operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store failed (I/O, corruption, lock, missing object).
    #[error(transparent)]
    Store(#[from] snapfork_store::Error),
    /// The workspace layer (fsfork) failed.
    #[error("workspace: {0}")]
    Workspace(#[from] snapfork_fsfork::Error),
    /// A runtime (runsc, Firecracker, ...) command failed.
    #[error("{what}: {detail}")]
    Runtime {
        /// Which runtime call.
        what: String,
        /// What it said.
        detail: String,
    },
    /// An I/O call failed; `context` says on what.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// No sandbox, snapshot or tag of that name.
    #[error("not found: {0}")]
    NotFound(String),
    /// A name that is already used.
    #[error("already exists: {0}")]
    Exists(String),
    /// The caller asked for something invalid (bad name, wrong state, bad config).
    #[error("invalid: {0}")]
    Invalid(String),
    /// A bundle or stored record that fails verification.
    #[error("corrupt {what}: {detail}")]
    Corrupt {
        /// What was being read.
        what: String,
        /// What is wrong with it.
        detail: String,
    },
}

impl Error {
    /// An I/O error with context.
    pub fn io(context: impl Into<String>, source: io::Error) -> Error {
        Error::Io { context: context.into(), source }
    }

    /// A corruption error.
    pub fn corrupt(what: impl Into<String>, detail: impl Into<String>) -> Error {
        Error::Corrupt { what: what.into(), detail: detail.into() }
    }
}

/// The engine's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
