//! Transactions: the only way data enters the store.
//!
//! A transaction appends new chunks to packs of its own, stages file objects and collects index
//! updates. [`Txn::commit`] makes pack data and file objects durable first, then applies every
//! index update in one synced RocksDB batch: a crash before that batch leaves only unreferenced
//! pack bytes and object files (which gc reclaims), never an index entry pointing at lost data.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use rocksdb::WriteBatch;

use crate::error::{Error, IoContext, Result};
use crate::hash::Hash;
use crate::node::Node;
use crate::pack::{Codec, Location, MAX_PACK_BYTES, PackWriter};
use crate::store::{Store, key, sync_dir};

thread_local! {
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
}

/// From this many new chunks on, a commit hands their index entries over as one table file.
const TABLE_FILE_ENTRIES: usize = 4096;

/// What a batch of chunk writes added.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Added {
    pub chunks: u64,
    pub raw_bytes: u64,
    pub stored_bytes: u64,
}

/// An open transaction (see the module docs). Dropping it without commit abandons its writes.
pub struct Txn {
    pub(crate) store: Store,
    pack: Option<PackWriter>,
    finished_packs: Vec<PackWriter>,
    pub(crate) new_chunks: HashMap<Hash, Location>,
    /// Ids pinned against gc until this transaction ends (each pinned once). A pin alone says
    /// nothing of presence: [`Txn::pin`] pins what a manifest will name, found or not.
    pub(crate) pinned: HashSet<Hash>,
    /// Pinned ids found in the index, and whether as a node: what need not be written again.
    pub(crate) found: HashMap<Hash, bool>,
    files: Vec<(PathBuf, Hash, u64)>,
    batch: WriteBatch,
    created_packs: bool,
    /// Numbers of the packs this transaction created (registered as active until it ends).
    my_packs: Vec<u32>,
    /// Bytes appended to packs so far.
    appended: u64,
    /// Files adopted whole as packs of raw chunks ([`Txn::adopt_file_as_blobs`]).
    adopted: Vec<PathBuf>,
}

impl Txn {
    pub(crate) fn new(store: Store) -> Txn {
        Txn {
            store,
            pack: None,
            finished_packs: Vec::new(),
            new_chunks: HashMap::new(),
            pinned: HashSet::new(),
            found: HashMap::new(),
            files: Vec::new(),
            batch: WriteBatch::default(),
            created_packs: false,
            my_packs: Vec::new(),
            appended: 0,
            adopted: Vec::new(),
        }
    }

    /// The store this transaction writes to.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Stores `data` as a chunk; returns its id.
    pub fn put_chunk(&mut self, data: &[u8]) -> Result<Hash> {
        let id = Hash::of(data);
        self.put_chunks(&[(id, data)], false)?;
        Ok(id)
    }

    /// Stores a node; returns its id.
    pub fn put_node(&mut self, node: &Node) -> Result<Hash> {
        let bytes = node.encode();
        let id = Hash::of(&bytes);
        self.put_chunks(&[(id, &bytes)], true)?;
        Ok(id)
    }

    /// Pins `id` (and so all it links to) against gc until this transaction ends: for objects a
    /// new manifest refers to without writing them (a parent image's segments, say).
    pub fn pin(&mut self, id: Hash) {
        if self.pinned.insert(id) {
            self.store.pin(&[id]);
        }
    }

    /// Which of `ids` already exist (in the store or in this transaction). Existing ones are
    /// pinned first, then looked up, so that a concurrent gc cannot remove them under us. With
    /// `nodes`, bytes the store holds as data do not count: a node must be written as one (the
    /// same bytes as a page are not it: gc follows only nodes' links).
    pub(crate) fn known(&mut self, ids: &[Hash], nodes: bool) -> Result<Vec<bool>> {
        let mut answer = vec![true; ids.len()];
        let mut ask = Vec::new();
        let mut asked = HashSet::new();
        for id in ids {
            let written = self.new_chunks.contains_key(id);
            let found = self.found.get(id).is_some_and(|&is_node| is_node || !nodes);
            if !written && !found && asked.insert(*id) {
                ask.push(*id);
            }
        }
        if ask.is_empty() {
            return Ok(answer);
        }
        // Pinned before the lookup (once: an id pinned already, but not found, is asked again).
        let newly: Vec<Hash> = ask.iter().filter(|id| !self.pinned.contains(*id)).copied().collect();
        self.store.pin(&newly);
        let found = match self.store.locations(&ask) {
            Ok(f) => f,
            Err(e) => {
                self.store.unpin(&newly);
                return Err(e);
            }
        };
        let mut missing = HashSet::new();
        for (id, loc) in ask.iter().zip(found) {
            match loc {
                Some(l) if l.is_node || !nodes => {
                    self.found.insert(*id, l.is_node);
                    self.pinned.insert(*id);
                }
                _ => {
                    missing.insert(*id);
                }
            }
        }
        // What was missing and pinned just now (not in `pinned`) goes back.
        let unpin: Vec<Hash> = missing.iter().filter(|id| !self.pinned.contains(*id)).copied().collect();
        self.store.unpin(&unpin);
        for (i, id) in ids.iter().enumerate() {
            if missing.contains(id) {
                answer[i] = false;
            }
        }
        Ok(answer)
    }

    /// Stores every chunk of `items` (id, uncompressed bytes) that the store lacks: compressed in
    /// parallel, appended in order.
    pub(crate) fn put_chunks(&mut self, items: &[(Hash, &[u8])], is_node: bool) -> Result<Added> {
        let ids: Vec<Hash> = items.iter().map(|(id, _)| *id).collect();
        let known = self.known(&ids, is_node)?;
        let mut seen = HashSet::new();
        let todo: Vec<&(Hash, &[u8])> = items
            .iter()
            .zip(known)
            .filter(|(item, known)| !known && seen.insert(item.0))
            .map(|(item, _)| item)
            .collect();
        let level = self.store.inner.level;
        let encoded: Vec<(Codec, Option<Vec<u8>>)> = todo.par_iter().map(|(_, data)| compress(data, level)).collect();
        let mut added = Added::default();
        for ((id, data), (codec, compressed)) in todo.into_iter().zip(encoded) {
            let payload: &[u8] = compressed.as_deref().unwrap_or(data);
            let raw_len = u32::try_from(data.len())
                .map_err(|_| Error::InvalidInput(format!("chunk of {} bytes is too large", data.len())))?;
            if self.append_chunk(id, is_node, codec, raw_len, payload)? {
                added.chunks += 1;
                added.raw_bytes += data.len() as u64;
                added.stored_bytes += payload.len() as u64;
            }
        }
        Ok(added)
    }

    /// Appends one encoded chunk unless this transaction already wrote it; true if appended.
    pub(crate) fn append_chunk(
        &mut self,
        id: &Hash,
        is_node: bool,
        codec: Codec,
        raw_len: u32,
        payload: &[u8],
    ) -> Result<bool> {
        if self.new_chunks.contains_key(id) {
            return Ok(false);
        }
        let loc = self.pack_writer()?.append(id, is_node, codec, raw_len, payload)?;
        self.new_chunks.insert(*id, loc);
        self.appended += payload.len() as u64;
        Ok(true)
    }

    /// Registers `path`, a file just linked into the packs directory as pack `pack`, as this
    /// transaction's: kept from gc until it ends, made durable by its commit, removed if it
    /// is abandoned.
    pub(crate) fn adopted_pack(&mut self, pack: u32, path: PathBuf) {
        self.store.inner.active_packs.lock().unwrap_or_else(|e| e.into_inner()).insert(pack);
        self.my_packs.push(pack);
        self.adopted.push(path);
        self.created_packs = true;
    }

    /// Indexes chunk `id` as the raw bytes at `offset` of adopted pack `pack`, unless this
    /// transaction already stored it; true if indexed.
    pub(crate) fn index_adopted(&mut self, id: Hash, pack: u32, offset: u64, len: u32) -> bool {
        if self.new_chunks.contains_key(&id) {
            return false;
        }
        let loc = Location { is_node: false, codec: Codec::Raw, pack, offset, stored_len: len, raw_len: len };
        self.new_chunks.insert(id, loc);
        self.appended += u64::from(len);
        true
    }

    fn pack_writer(&mut self) -> Result<&mut PackWriter> {
        if self.pack.as_ref().is_some_and(|p| p.len() >= MAX_PACK_BYTES)
            && let Some(full) = self.pack.take()
        {
            self.finished_packs.push(full);
        }
        if self.pack.is_none() {
            let number = self.store.alloc_pack();
            self.store.inner.active_packs.lock().unwrap_or_else(|e| e.into_inner()).insert(number);
            self.my_packs.push(number);
            self.pack = Some(PackWriter::create(&self.store.packs_dir(), number, self.store.inner.min_free)?);
            self.created_packs = true;
        }
        Ok(self.pack.as_mut().expect("pack was just created"))
    }

    /// Payload bytes this transaction has appended to packs so far.
    pub fn appended_bytes(&self) -> u64 {
        self.appended
    }

    /// Adds file object `id`: a file at `staged`, inside [`Store::staging_dir`], whose content
    /// hashes to `id`. On commit it is made durable and moved into the object directory.
    pub fn adopt_file_object(&mut self, staged: &Path, id: Hash) -> Result<()> {
        // Pinned before looking, so that a gc cannot remove it between the look and our commit.
        self.pin(id);
        if self.store.has_file_object(&id)? {
            fs::remove_file(staged).ctx(|| format!("remove {}", staged.display()))?;
            return Ok(());
        }
        if self.files.iter().any(|(_, f, _)| *f == id) {
            fs::remove_file(staged).ctx(|| format!("remove {}", staged.display()))?;
            return Ok(());
        }
        let size = fs::symlink_metadata(staged).ctx(|| format!("stat {}", staged.display()))?.len();
        self.files.push((staged.to_path_buf(), id, size));
        Ok(())
    }

    /// Points ref `name` at `id` on commit.
    pub fn set_ref(&mut self, name: &str, id: Hash) -> Result<()> {
        validate_ref_name(name)?;
        self.pin(id);
        self.batch.put(key::named(key::REF, name), id.as_bytes());
        Ok(())
    }

    /// Deletes ref `name` on commit.
    pub fn delete_ref(&mut self, name: &str) {
        self.batch.delete(key::named(key::REF, name));
    }

    /// Writes metadata `key` on commit (`None` deletes it).
    pub fn meta_put(&mut self, key: &str, value: Option<&[u8]>) {
        match value {
            Some(v) => self.batch.put(key::named(key::META, key), v),
            None => self.batch.delete(key::named(key::META, key)),
        }
    }

    /// Makes everything durable, then visible in one atomic index update.
    pub fn commit(mut self) -> Result<()> {
        let started = std::time::Instant::now();
        // 1. Pack data on disk before anything names it.
        let mut packs = std::mem::take(&mut self.finished_packs);
        packs.extend(self.pack.take());
        for p in &mut packs {
            p.sync()?;
        }
        for path in &self.adopted {
            fs::File::open(path).and_then(|f| f.sync_data()).ctx(|| format!("fdatasync {}", path.display()))?;
        }
        if self.created_packs {
            sync_dir(&self.store.packs_dir())?;
        }
        let packs_synced = started.elapsed();
        // From here on gc must not be between its mark and its sweep: it would unlink as dead
        // an object file moved into place below (not indexed yet) with its own stale copy, and
        // its sweep of unindexed object files would take one for the remains of a crash.
        let store = self.store.clone();
        let _guard = store.inner.commit_lock.read().unwrap_or_else(|e| e.into_inner());
        // 2. File objects: durable, moved into place, the moves durable. Many files (a first
        //    workspace checkpoint) are flushed with one syncfs per step rather than an fsync each.
        let files = std::mem::take(&mut self.files);
        let batched = files.len() > SYNCFS_THRESHOLD;
        if batched {
            syncfs(&self.store.staging_dir())?;
        }
        let mut dirs = HashSet::new();
        for (staged, id, size) in files {
            if !batched {
                fs::File::open(&staged).and_then(|f| f.sync_all()).ctx(|| format!("fsync {}", staged.display()))?;
            }
            let dest = self.store.file_object_path(&id);
            let dir = dest.parent().map(Path::to_path_buf).unwrap_or_default();
            if dirs.insert(dir.clone()) {
                fs::create_dir_all(&dir).ctx(|| format!("create {}", dir.display()))?;
            }
            fs::rename(&staged, &dest).ctx(|| format!("move {} to {}", staged.display(), dest.display()))?;
            self.batch.put(key::id(key::FILE, &id), size.to_le_bytes());
        }
        if batched {
            syncfs(&self.store.dir().join("objects"))?;
        } else {
            for dir in &dirs {
                sync_dir(dir)?;
            }
            if !dirs.is_empty() {
                sync_dir(&self.store.dir().join("objects"))?;
            }
        }
        // 3. The index, while gc is not between its mark and its sweep: the new chunks' entries
        //    (many of them as one table file), then refs and the rest in one synced batch. A
        //    crash between the two leaves chunks that nothing names yet, which gc reclaims.
        let files_done = started.elapsed();
        let entries = self.new_chunks.len() + self.batch.len();
        // From here on the index may name the adopted packs' bytes: they stay whatever happens.
        self.adopted.clear();
        if self.new_chunks.len() >= TABLE_FILE_ENTRIES {
            store.ingest_chunk_entries(&self.new_chunks)?;
        } else {
            for (id, loc) in &self.new_chunks {
                self.batch.put(key::id(key::CHUNK, id), loc.encode());
            }
        }
        store.write_batch(std::mem::take(&mut self.batch))?;
        drop(packs);
        tracing::debug!(
            "commit: packs durable after {packs_synced:?}, file objects after {files_done:?}, \
             {entries} index entries after {:?}",
            started.elapsed()
        );
        Ok(())
    }
}

impl Drop for Txn {
    fn drop(&mut self) {
        let pinned: Vec<Hash> = self.pinned.drain().collect();
        self.store.unpin(&pinned);
        let mut active = self.store.inner.active_packs.lock().unwrap_or_else(|e| e.into_inner());
        for n in &self.my_packs {
            active.remove(n);
        }
        // Packs of an abandoned transaction stay on disk unreferenced until gc reclaims them;
        // staged files likewise (gc clears staging entries older than its grace period). An
        // adopted file's link goes now: it is only a second name for the caller's file.
        for path in &self.adopted {
            let _ = fs::remove_file(path);
        }
    }
}

/// Above this many file objects, a commit flushes the filesystem once (syncfs) instead of
/// fsyncing each file and directory.
const SYNCFS_THRESHOLD: usize = 16;

/// Flushes the filesystem that holds `path` (all its dirty data and metadata).
fn syncfs(path: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let dir = fs::File::open(path).ctx(|| format!("open {}", path.display()))?;
    // SAFETY: syncfs takes a descriptor we own and touches no memory of ours.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
        return Err(Error::Io {
            context: format!("syncfs {}", path.display()),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Refuses ref names that would be ambiguous or unprintable.
pub fn validate_ref_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('/')
        && !name.contains("..")
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-/@:+=".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidInput(format!(
            "bad ref name {name:?}: use 1-255 of A-Z a-z 0-9 . _ - / @ : + = (no leading '/', no '..')"
        )))
    }
}

/// The probe size for [`compress`]'s incompressibility check.
const SAMPLE: usize = 4096;

/// True when compressing `sample` saves at least 1/16.
fn compresses(c: &mut zstd::bulk::Compressor<'static>, sample: &[u8]) -> bool {
    let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(sample.len()));
    c.compress_to_buffer(sample, &mut out).is_ok_and(|n| n + sample.len() / 16 < sample.len())
}

/// Compresses `data` with zstd at `level`; `None` when that does not save at least 1/16.
pub(crate) fn compress(data: &[u8], level: i32) -> (Codec, Option<Vec<u8>>) {
    COMPRESSOR.with_borrow_mut(|slot| {
        if slot.as_ref().is_none_or(|(l, _)| *l != level) {
            *slot = zstd::bulk::Compressor::new(level).ok().map(|c| (level, c));
        }
        let Some((_, c)) = slot.as_mut() else {
            return (Codec::Raw, None);
        };
        // A large chunk whose first 4 KiB does not compress (random heap, an already-compressed
        // runtime image) is stored raw without paying for a full compression attempt.
        if data.len() >= 4 * SAMPLE && !compresses(c, &data[..SAMPLE]) {
            return (Codec::Raw, None);
        }
        let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(data.len()));
        match c.compress_to_buffer(data, &mut out) {
            Ok(n) if n + data.len() / 16 < data.len() => (Codec::Zstd, Some(out)),
            _ => (Codec::Raw, None),
        }
    })
}
