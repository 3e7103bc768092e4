//! The crate's error type.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong in fsfork.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call failed on a path.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done (e.g. "open", "clone").
        op: &'static str,
        /// The path concerned (relative to the tree root where that is more useful).
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The destination of a clone, restore or fork already exists.
    #[error("destination {} already exists", .0.display())]
    DestinationExists(PathBuf),
    /// A path given by the user is not usable (e.g. the root of a tree is a symlink).
    #[error("invalid path {}: {reason}", path.display())]
    InvalidPath {
        /// The path.
        path: PathBuf,
        /// Why it is refused.
        reason: String,
    },
    /// A manifest object in the store could not be decoded.
    #[error("corrupt manifest {id}: {reason}")]
    Corrupt {
        /// The id of the object.
        id: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A file object in the store does not have the size its checkpoint records: the store's
    /// copy was truncated or extended (disk damage, a bad copy). Damage that keeps the size is
    /// found by re-hashing (`snapfork verify`), not here.
    #[error(
        "corrupt file object {id} ({}): it is {actual} bytes, but checkpoint entry {} records {expected}",
        object.display(),
        path.display()
    )]
    CorruptObject {
        /// The object's id (hex).
        id: String,
        /// Where the store keeps it.
        object: PathBuf,
        /// The entry that links it, relative to the checkpoint's root.
        path: PathBuf,
        /// The size the checkpoint records.
        expected: u64,
        /// The size of the object as found.
        actual: u64,
    },
    /// A revert swapped the tree in, then could neither record it in the store nor swap it
    /// back: the one case where an error leaves a workspace changed, so it says where both are.
    #[error(
        "the revert of {} could not be recorded ({reason}) nor undone ({source}): the workspace holds the reverted \
         tree, its old tree is at {}",
        path.display(),
        old_tree.display()
    )]
    RevertUnrecorded {
        /// The workspace.
        path: PathBuf,
        /// Where its old tree is.
        old_tree: PathBuf,
        /// Why the revert could not be recorded.
        reason: String,
        /// Why the old tree could not be put back.
        source: io::Error,
    },
    /// A checkpoint name or id could not be resolved.
    #[error("no such checkpoint: {0}")]
    NoSuchCheckpoint(String),
    /// An error from the content-addressed store.
    #[error(transparent)]
    Store(#[from] snapfork_store::Error),
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An I/O error on `path` while doing `op`.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io { op, path: path.into(), source }
    }
}

/// Adds the operation and path to an `io::Result`.
pub(crate) trait IoContext<T> {
    fn ctx(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|e| Error::io(op, path, e))
    }
}
