//! What fsfork needs from the content-addressed store, as a narrow trait implemented for
//! `snapfork_store::Store` (see [`crate::store_impl`]). Keeping the surface small documents
//! exactly which store features checkpoints rely on.

use std::path::{Path, PathBuf};

use crate::error::Result;

/// A 32-byte BLAKE3 id (of a file's bytes, or of a store node).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Id(pub [u8; 32]);

impl Id {
    /// Lower-case hex.
    pub fn hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Option<Id> {
        if s.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Id(out))
    }

    /// The first 12 hex digits, for people.
    pub fn short(&self) -> String {
        self.hex()[..12].to_string()
    }
}

impl std::fmt::Display for Id {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.hex())
    }
}

impl std::fmt::Debug for Id {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Id({})", self.short())
    }
}

/// A generic manifest object: the store's garbage collector follows `links`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeData {
    /// Object kind (fsfork uses 16..31).
    pub kind: u8,
    /// Ids this object refers to (file objects and other nodes).
    pub links: Vec<Id>,
    /// Kind-specific encoding.
    pub body: Vec<u8>,
}

/// The store operations fsfork uses.
pub trait Repo: Send + Sync {
    /// The store's own directory (never part of a workspace tree).
    fn root_dir(&self) -> PathBuf;
    /// A directory on the store's filesystem where file objects are prepared before adoption.
    fn staging_dir(&self) -> PathBuf;
    /// Bytes of that filesystem the store keeps free: a copy into staging must leave them.
    fn min_free_bytes(&self) -> u64 {
        0
    }
    /// Where the file object `id` lives once adopted.
    fn file_object_path(&self, id: &Id) -> PathBuf;
    /// Whether the store holds file object `id`.
    fn has_file_object(&self, id: &Id) -> Result<bool>;
    /// Whether the store holds object `id` (a node or chunk).
    fn contains(&self, id: &Id) -> Result<bool>;
    /// Reads a node.
    fn get_node(&self, id: &Id) -> Result<NodeData>;
    /// Reads a ref.
    fn get_ref(&self, name: &str) -> Result<Option<Id>>;
    /// Lists refs under a prefix.
    fn list_refs(&self, prefix: &str) -> Result<Vec<(String, Id)>>;
    /// Resolves a ref name, a full hex id or a unique hex prefix.
    fn resolve(&self, name_or_hex: &str) -> Result<Option<Id>>;
    /// Reads small mutable metadata.
    fn meta_get(&self, key: &str) -> Result<Option<Vec<u8>>>;
    /// Every metadata entry whose key starts with `prefix` (key, value).
    fn meta_list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>>;
    /// Writes small mutable metadata (synced).
    fn meta_put(&self, key: &str, value: &[u8]) -> Result<()>;
    /// Starts a transaction.
    fn begin(&self) -> Result<Box<dyn RepoTx + '_>>;
}

/// A store transaction: nothing is visible until [`RepoTx::commit`].
pub trait RepoTx {
    /// Adds a node and returns its id.
    fn put_node(&mut self, node: &NodeData) -> Result<Id>;
    /// Adopts a file that was hashed and placed in the staging directory as object `id`.
    fn adopt_file_object(&mut self, staged: &Path, id: &Id) -> Result<()>;
    /// Points a ref at an id.
    fn set_ref(&mut self, name: &str, id: &Id) -> Result<()>;
    /// Writes small mutable metadata as part of the transaction.
    fn meta_put(&mut self, key: &str, value: &[u8]);
    /// Deletes metadata `key` as part of the transaction.
    fn meta_delete(&mut self, key: &str);
    /// Keeps file object `id`, which this transaction links without writing it, alive until
    /// commit, even against a concurrent gc; false when the store holds no such file object.
    /// A chunk of the same id (a memory page, a blob chunk with the same bytes) is not one:
    /// restore reads file contents from file objects only.
    fn keep_file(&mut self, id: &Id) -> Result<bool>;
    /// As [`RepoTx::keep_file`], for node `id` (a directory listing): false unless the store
    /// holds it as a node.
    fn keep_node(&mut self, id: &Id) -> Result<bool>;
    /// Makes everything durable and visible.
    fn commit(self: Box<Self>) -> Result<()>;
}
