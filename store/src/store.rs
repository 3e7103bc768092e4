//! The store handle: opening, the index, chunk reads, refs, metadata and file objects.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rocksdb::{BlockBasedOptions, DB, Direction, IteratorMode, WriteBatch, WriteOptions};

use crate::error::{Error, IoContext, Result};
use crate::hash::Hash;
use crate::lock::StoreLock;
use crate::node::Node;
use crate::pack::{Codec, Location, PackFiles, parse_pack_name};
use crate::txn::Txn;

/// Index key prefixes. One RocksDB column family; the first byte says what a key is.
pub(crate) mod key {
    /// `c` + id: a chunk's [`Location`](crate::pack::Location).
    pub const CHUNK: u8 = b'c';
    /// `f` + id: a file object (value: its size, u64 LE).
    pub const FILE: u8 = b'f';
    /// `r` + name: a ref (value: the id it names).
    pub const REF: u8 = b'r';
    /// `m` + key: caller metadata.
    pub const META: u8 = b'm';

    pub fn id(prefix: u8, id: &crate::Hash) -> [u8; 33] {
        let mut k = [0u8; 33];
        k[0] = prefix;
        k[1..].copy_from_slice(id.as_bytes());
        k
    }

    pub fn named(prefix: u8, name: &str) -> Vec<u8> {
        let mut k = Vec::with_capacity(1 + name.len());
        k.push(prefix);
        k.extend_from_slice(name.as_bytes());
        k
    }
}

const FORMAT: &str = "snapfork-store 1\n";

/// How to open a store.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// Open without the writer lock; writes fail with [`Error::ReadOnly`]. Several readers and one
    /// writer may have a store open at once.
    pub read_only: bool,
    /// How long to wait for another process that holds the writer lock.
    pub lock_timeout: Duration,
    /// Create the store if `dir` holds none.
    pub create: bool,
    /// zstd level for new chunks.
    pub compression_level: i32,
    /// Bytes of the store's filesystem that writing packs leaves free: room for the index,
    /// whose RocksDB fails hard (aborts, with Debian's build) when its disk fills, and for gc. An
    /// ingest that would eat into it fails with [`Error::Full`] and commits nothing.
    pub min_free_bytes: u64,
}

/// [`OpenOptions::min_free_bytes`] by default.
pub const MIN_FREE_BYTES: u64 = 64 << 20;

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            read_only: false,
            lock_timeout: Duration::from_secs(30),
            create: true,
            compression_level: 1,
            min_free_bytes: MIN_FREE_BYTES,
        }
    }
}

/// A content-addressed store on local disk. Cheap to clone; all clones share one open store.
#[derive(Clone)]
pub struct Store {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub dir: PathBuf,
    pub db: DB,
    pub packs: PackFiles,
    pub read_only: bool,
    pub level: i32,
    /// See [`OpenOptions::min_free_bytes`].
    pub min_free: u64,
    /// Next pack number to hand out.
    pub next_pack: AtomicU32,
    /// Packs that uncommitted transactions are writing: gc leaves them alone.
    pub active_packs: Mutex<HashSet<u32>>,
    /// Ids that uncommitted transactions rely on (dedup hits, parents): gc keeps their closure.
    pub pins: Mutex<HashMap<Hash, u32>>,
    /// Commits take it shared; gc takes it exclusively so that nothing commits between its mark
    /// and its sweep.
    pub commit_lock: RwLock<()>,
    /// Held by a gc from start to end: one gc at a time (its rewrite of sparse packs runs
    /// without the commit lock).
    pub gc_lock: Mutex<()>,
    _lock: Option<StoreLock>,
    /// A read-only store's own directory for its secondary index instance (last: removed after
    /// the index closes).
    _secondary: Option<SecondaryDir>,
}

/// The directory a secondary RocksDB instance keeps its own files in (its info log), removed
/// when the store closes. A private one (mkdtemp, mode 0700) in the system's temporary
/// directory: a reader need not be able to write the store.
struct SecondaryDir(tempfile::TempDir);

impl SecondaryDir {
    const PREFIX: &str = "snapfork-reader-";

    fn create() -> Result<SecondaryDir> {
        static SWEPT: std::sync::Once = std::sync::Once::new();
        let tmp = std::env::temp_dir();
        // Those of this user's readers that were killed (or exited without closing the store).
        SWEPT.call_once(|| {
            let me = nix::unistd::geteuid().as_raw();
            let Ok(entries) = fs::read_dir(&tmp) else {
                return;
            };
            for e in entries.flatten() {
                let name = e.file_name();
                let pid =
                    name.to_str().and_then(|n| n.strip_prefix(Self::PREFIX)?.split('-').next()?.parse::<u32>().ok());
                let mine = e.metadata().is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == me);
                if mine && pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        });
        let dir = tempfile::Builder::new()
            .prefix(&format!("{}{}-", Self::PREFIX, std::process::id()))
            .tempdir_in(&tmp)
            .ctx(|| format!("create a reader's directory in {}", tmp.display()))?;
        Ok(SecondaryDir(dir))
    }
}

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

impl Store {
    /// Opens (or with `opts.create`, creates) the store at `dir`.
    pub fn open(dir: impl AsRef<Path>, opts: OpenOptions) -> Result<Store> {
        // Kept absolute: callers hand paths inside the store to other processes (runsc, VMMs)
        // that do not share our working directory.
        let dir = std::path::absolute(dir.as_ref()).ctx(|| format!("resolve {}", dir.as_ref().display()))?;
        let format_path = dir.join("FORMAT");
        if !format_path.exists() {
            if !opts.create || opts.read_only {
                return Err(Error::NotFound(format!("no snapfork store at {}", dir.display())));
            }
            fs::create_dir_all(&dir).ctx(|| format!("create {}", dir.display()))?;
        }
        let lock = if opts.read_only { None } else { Some(StoreLock::acquire(&dir, opts.lock_timeout)?) };
        if !opts.read_only {
            for sub in ["packs", "objects", "staging"] {
                fs::create_dir_all(dir.join(sub)).ctx(|| format!("create {}/{sub}", dir.display()))?;
            }
            if !format_path.exists() {
                write_durably(&format_path, FORMAT.as_bytes())?;
            }
        }
        let found = fs::read_to_string(&format_path).ctx(|| format!("read {}", format_path.display()))?;
        if found != FORMAT {
            return Err(Error::InvalidInput(format!(
                "{} holds format {:?}; this snapfork reads {:?}",
                dir.display(),
                found.trim(),
                FORMAT.trim()
            )));
        }
        let secondary = if opts.read_only { Some(SecondaryDir::create()?) } else { None };
        let db = open_index(&dir.join("index"), secondary.as_ref().map(|d| d.0.path()))?;
        let next_pack = max_pack_number(&dir.join("packs"))?.map_or(1, |n| n + 1);
        Ok(Store {
            inner: Arc::new(Inner {
                packs: PackFiles::new(dir.join("packs")),
                dir,
                db,
                read_only: opts.read_only,
                level: opts.compression_level,
                min_free: opts.min_free_bytes,
                next_pack: AtomicU32::new(next_pack),
                active_packs: Mutex::default(),
                pins: Mutex::default(),
                commit_lock: RwLock::default(),
                gc_lock: Mutex::default(),
                _lock: lock,
                _secondary: secondary,
            }),
        })
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// True when opened read-only.
    pub fn is_read_only(&self) -> bool {
        self.inner.read_only
    }

    /// Starts a transaction: everything it writes becomes visible, durably and at once, on
    /// [`Txn::commit`], or not at all.
    pub fn begin(&self) -> Result<Txn> {
        if self.inner.read_only {
            return Err(Error::ReadOnly);
        }
        Ok(Txn::new(self.clone()))
    }

    /// Where a chunk lives, if the store has it.
    pub fn location(&self, id: &Hash) -> Result<Option<Location>> {
        match self.inner.db.get_pinned(key::id(key::CHUNK, id))? {
            None => Ok(None),
            Some(v) => Location::decode(&v)
                .map(Some)
                .ok_or_else(|| Error::Corrupt { what: format!("index entry of {id}"), detail: "bad location".into() }),
        }
    }

    /// True when the store holds chunk `id` (a page, blob chunk or node).
    pub fn contains(&self, id: &Hash) -> Result<bool> {
        Ok(self.inner.db.get_pinned(key::id(key::CHUNK, id))?.is_some())
    }

    /// Reads chunk `id`, verified against its id, into `out`, which must hold at least its raw
    /// length; returns that length. `what` names the chunk in errors ("image vm page 7").
    pub fn read_chunk_into(&self, id: &Hash, out: &mut [u8], what: &dyn Fn() -> String) -> Result<usize> {
        let loc = self
            .location(id)?
            .ok_or_else(|| Error::Corrupt { what: what(), detail: format!("chunk {id} is missing from the store") })?;
        self.read_found(id, &loc, out, what)
    }

    /// Reads chunk `id`, just found at `loc`, into `out`, verified.
    ///
    /// gc may have moved the chunk to a new pack between the lookup and the read: the old pack
    /// is gone, so it is looked up again. A read-only store's index shows the store as it was
    /// when it opened (or last caught up) while a writer elsewhere goes on, so its lookup may
    /// name a pack that the writer's gc deleted, or whose number a later pack took (which then
    /// reads other bytes): it catches up with the writer, forgets the packs it had open, and
    /// looks again. A chunk that really is damaged fails the second read too, by name.
    fn read_found(&self, id: &Hash, loc: &Location, out: &mut [u8], what: &dyn Fn() -> String) -> Result<usize> {
        match self.read_located(id, loc, out, what) {
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
            // (A renumbered pack may also be shorter: any failed read.)
            Err(Error::Io { .. } | Error::Corrupt { .. }) if self.inner.read_only => {}
            other => return other,
        }
        if self.inner.read_only {
            self.catch_up()?;
        }
        let loc = self
            .location(id)?
            .ok_or_else(|| Error::Corrupt { what: what(), detail: format!("chunk {id} is missing from the store") })?;
        self.read_located(id, &loc, out, what)
    }

    /// A read-only store's view moves on to what the writer has committed since; the packs it
    /// had open are closed (a later pack may have taken one's number).
    pub(crate) fn catch_up(&self) -> Result<()> {
        self.inner.db.try_catch_up_with_primary()?;
        self.inner.packs.forget_all();
        Ok(())
    }

    pub(crate) fn read_located(
        &self,
        id: &Hash,
        loc: &Location,
        out: &mut [u8],
        what: &dyn Fn() -> String,
    ) -> Result<usize> {
        if out.len() < loc.raw_len as usize {
            return Err(Error::InvalidInput(format!("buffer of {} bytes for a chunk of {}", out.len(), loc.raw_len)));
        }
        match loc.codec {
            // Stored raw: read straight into `out` and check it there.
            Codec::Raw if loc.stored_len == loc.raw_len => {
                let out = &mut out[..loc.raw_len as usize];
                self.inner.packs.read_at(loc.pack, loc.offset, out)?;
                check_id(id, out, what)?;
                Ok(out.len())
            }
            Codec::Raw => Err(Error::Corrupt { what: what(), detail: "raw chunk with mismatched lengths".into() }),
            Codec::Zstd => SCRATCH.with_borrow_mut(|scratch| {
                scratch.resize(loc.stored_len as usize, 0);
                self.inner.packs.read_at(loc.pack, loc.offset, scratch)?;
                decode_verified(id, loc, scratch, out, what)
            }),
        }
    }

    /// Reads `len` bytes at `offset` of pack `pack` (a span of adjacent records).
    pub(crate) fn read_pack_span(&self, pack: u32, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.inner.packs.read_at(pack, offset, buf)
    }

    /// Reads chunk `id`, verified.
    pub fn get_chunk(&self, id: &Hash) -> Result<Vec<u8>> {
        let loc = self.location(id)?.ok_or_else(|| Error::NotFound(format!("object {id}")))?;
        let mut out = vec![0u8; loc.raw_len as usize];
        self.read_found(id, &loc, &mut out, &|| format!("object {id}"))?;
        Ok(out)
    }

    /// Reads node `id`, verified. Bytes stored as data are not a node, whatever they decode
    /// to: gc follows only nodes' links, and an importer vets only what arrives as nodes.
    pub fn get_node(&self, id: &Hash) -> Result<Node> {
        let what = || format!("node {id}");
        let loc = self.location(id)?.ok_or_else(|| Error::NotFound(what()))?;
        if !loc.is_node {
            return Err(Error::Corrupt { what: what(), detail: "stored as data, not as a node".into() });
        }
        let mut bytes = vec![0u8; loc.raw_len as usize];
        self.read_found(id, &loc, &mut bytes, &what)?;
        Node::decode(&bytes, &what)
    }

    // ----- refs -----

    /// The id that ref `name` names.
    pub fn get_ref(&self, name: &str) -> Result<Option<Hash>> {
        Ok(self.inner.db.get_pinned(key::named(key::REF, name))?.and_then(|v| Hash::from_slice(&v)))
    }

    /// All refs whose names start with `prefix`, sorted by name.
    pub fn list_refs(&self, prefix: &str) -> Result<Vec<(String, Hash)>> {
        let start = key::named(key::REF, prefix);
        let mut out = Vec::new();
        for item in self.inner.db.iterator(IteratorMode::From(&start, Direction::Forward)) {
            let (k, v) = item?;
            if !k.starts_with(&start) {
                break;
            }
            let name = String::from_utf8_lossy(&k[1..]).into_owned();
            if let Some(id) = Hash::from_slice(&v) {
                out.push((name, id));
            }
        }
        Ok(out)
    }

    /// Resolves a ref name or a 64-character hex id to an id the store holds.
    pub fn resolve(&self, name_or_id: &str) -> Result<Hash> {
        if let Some(id) = self.get_ref(name_or_id)? {
            return Ok(id);
        }
        if let Ok(id) = name_or_id.parse::<Hash>()
            && self.contains(&id)?
        {
            return Ok(id);
        }
        Err(Error::NotFound(format!("no ref or object named {name_or_id:?}")))
    }

    // ----- caller metadata -----

    /// Reads metadata `key`.
    pub fn meta_get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.inner.db.get(key::named(key::META, key))?)
    }

    /// All metadata entries whose keys start with `prefix`.
    pub fn meta_list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let start = key::named(key::META, prefix);
        let mut out = Vec::new();
        for item in self.inner.db.iterator(IteratorMode::From(&start, Direction::Forward)) {
            let (k, v) = item?;
            if !k.starts_with(&start) {
                break;
            }
            out.push((String::from_utf8_lossy(&k[1..]).into_owned(), v.to_vec()));
        }
        Ok(out)
    }

    /// Writes metadata `key` durably (`None` deletes it).
    pub fn meta_put(&self, key: &str, value: Option<&[u8]>) -> Result<()> {
        if self.inner.read_only {
            return Err(Error::ReadOnly);
        }
        let mut batch = WriteBatch::default();
        match value {
            Some(v) => batch.put(key::named(key::META, key), v),
            None => batch.delete(key::named(key::META, key)),
        }
        self.write_batch(batch)
    }

    // ----- file objects -----

    /// Where file object `id` lives once committed.
    pub fn file_object_path(&self, id: &Hash) -> PathBuf {
        let hex = id.to_hex();
        self.inner.dir.join("objects").join(&hex[..2]).join(&hex[2..])
    }

    /// Bytes of its filesystem the store leaves free ([`OpenOptions::min_free_bytes`]).
    pub fn min_free_bytes(&self) -> u64 {
        self.inner.min_free
    }

    /// A directory, on the store's filesystem, where callers prepare files for
    /// [`Txn::adopt_file_object`].
    pub fn staging_dir(&self) -> PathBuf {
        self.inner.dir.join("staging")
    }

    /// True when the store holds file object `id`.
    pub fn has_file_object(&self, id: &Hash) -> Result<bool> {
        Ok(self.inner.db.get_pinned(key::id(key::FILE, id))?.is_some())
    }

    // ----- internals shared by the other modules -----

    pub(crate) fn write_batch(&self, batch: WriteBatch) -> Result<()> {
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.inner.db.write_opt(batch, &opts)?;
        Ok(())
    }

    /// Adds the index entries of many new chunks at once: written sorted into a table file
    /// in the staging directory, which the index then takes in whole (atomically and durably,
    /// like a synced batch). For tens of thousands of entries this is several times cheaper
    /// than a batch, which inserts each entry into the memtable, logs it, and later flushes it.
    pub(crate) fn ingest_chunk_entries(&self, chunks: &HashMap<Hash, Location>) -> Result<()> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let mut entries: Vec<([u8; 33], Location)> =
            chunks.iter().map(|(id, loc)| (key::id(key::CHUNK, id), *loc)).collect();
        entries.sort_unstable_by_key(|e| e.0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = self.staging_dir().join(format!("index-{}-{n}.sst", std::process::id()));
        let opts = index_options();
        let written = (|| {
            let mut table = rocksdb::SstFileWriter::create(&opts);
            table.open(&path)?;
            for (key, loc) in &entries {
                table.put(key, loc.encode())?;
            }
            table.finish()?;
            let mut ingest = rocksdb::IngestExternalFileOptions::default();
            ingest.set_move_files(true);
            self.inner.db.ingest_external_file_opts(&ingest, vec![&path])
        })();
        // Moved into the index on success; a leftover on failure.
        if let Err(e) = fs::remove_file(&path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!("removing {}: {e}", path.display());
        }
        Ok(written?)
    }

    pub(crate) fn alloc_pack(&self) -> u32 {
        self.inner.next_pack.fetch_add(1, Ordering::SeqCst)
    }

    pub(crate) fn packs_dir(&self) -> PathBuf {
        self.inner.dir.join("packs")
    }

    /// Every (key suffix, value) under one key prefix.
    pub(crate) fn scan(&self, prefix: u8, mut f: impl FnMut(&[u8], &[u8]) -> Result<()>) -> Result<()> {
        let start = [prefix];
        for item in self.inner.db.iterator(IteratorMode::From(&start, Direction::Forward)) {
            let (k, v) = item?;
            if k.first() != Some(&prefix) {
                break;
            }
            f(&k[1..], &v)?;
        }
        Ok(())
    }

    /// Marks `ids` as relied upon by an uncommitted transaction.
    pub(crate) fn pin(&self, ids: &[Hash]) {
        let mut pins = self.inner.pins.lock().unwrap_or_else(|e| e.into_inner());
        for id in ids {
            *pins.entry(*id).or_insert(0) += 1;
        }
    }

    pub(crate) fn unpin(&self, ids: &[Hash]) {
        let mut pins = self.inner.pins.lock().unwrap_or_else(|e| e.into_inner());
        for id in ids {
            if let Some(n) = pins.get_mut(id) {
                *n -= 1;
                if *n == 0 {
                    pins.remove(id);
                }
            }
        }
    }

    /// Looks up many chunk locations at once.
    pub(crate) fn locations(&self, ids: &[Hash]) -> Result<Vec<Option<Location>>> {
        let keys: Vec<[u8; 33]> = ids.iter().map(|id| key::id(key::CHUNK, id)).collect();
        self.inner
            .db
            .multi_get(&keys)
            .into_iter()
            .zip(ids)
            .map(|(r, id)| match r? {
                None => Ok(None),
                Some(v) => Location::decode(&v).map(Some).ok_or_else(|| Error::Corrupt {
                    what: format!("index entry of {id}"),
                    detail: "bad location".into(),
                }),
            })
            .collect()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Leave the index in sorted files with bloom filters rather than in the write-ahead log:
        // the next open then neither replays it nor looks pages up in a skiplist.
        if !self.read_only
            && let Err(e) = self.db.flush()
        {
            tracing::warn!("flushing the index on close failed: {e}");
        }
    }
}

/// Decodes a chunk's stored `payload` into `out` and checks it against `id`; returns its length.
pub(crate) fn decode_verified(
    id: &Hash,
    loc: &Location,
    payload: &[u8],
    out: &mut [u8],
    what: &dyn Fn() -> String,
) -> Result<usize> {
    let raw_len = loc.raw_len as usize;
    if out.len() < raw_len {
        return Err(Error::InvalidInput(format!("buffer of {} bytes for a chunk of {raw_len}", out.len())));
    }
    let out = &mut out[..raw_len];
    let corrupt = |detail: String| Error::Corrupt { what: what(), detail };
    if payload.len() != loc.stored_len as usize {
        return Err(corrupt("short read".into()));
    }
    match loc.codec {
        Codec::Raw => {
            if loc.stored_len != loc.raw_len {
                return Err(corrupt("raw chunk with mismatched lengths".into()));
            }
            out.copy_from_slice(payload);
        }
        Codec::Zstd => DECOMPRESSOR.with_borrow_mut(|d| {
            if d.is_none() {
                *d = Some(zstd::bulk::Decompressor::new().map_err(|e| corrupt(e.to_string()))?);
            }
            let d = d.as_mut().expect("decompressor was just created");
            match d.decompress_to_buffer(payload, &mut out[..]) {
                Ok(n) if n == raw_len => Ok(()),
                Ok(n) => Err(corrupt(format!("decompressed to {n} bytes, expected {raw_len}"))),
                Err(e) => Err(corrupt(format!("does not decompress: {e}"))),
            }
        })?,
    }
    check_id(id, out, what)?;
    Ok(raw_len)
}

/// Checks that `data` hashes to `id`.
fn check_id(id: &Hash, data: &[u8], what: &dyn Fn() -> String) -> Result<()> {
    let actual = Hash::of(data);
    if actual != *id {
        return Err(Error::Corrupt {
            what: what(),
            detail: format!("content hashes to {} instead of {}", actual.short(), id.short()),
        });
    }
    Ok(())
}

/// Writes a small file and makes it and its directory entry durable.
pub(crate) fn write_durably(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, data).ctx(|| format!("write {}", tmp.display()))?;
    fs::File::open(&tmp).and_then(|f| f.sync_all()).ctx(|| format!("fsync {}", tmp.display()))?;
    fs::rename(&tmp, path).ctx(|| format!("rename to {}", path.display()))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// fsyncs a directory, making the creation or removal of its entries durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir).and_then(|f| f.sync_all()).ctx(|| format!("fsync directory {}", dir.display()))
}

/// The index's table format, shared by the database and the table files that
/// [`Store::ingest_chunk_entries`] writes for it.
fn index_options() -> rocksdb::Options {
    let mut opts = rocksdb::Options::default();
    // Keys are random hashes and values are tiny: compression buys nothing, bloom filters make
    // the misses of a first ingest (most of its lookups) cheap.
    opts.set_compression_type(rocksdb::DBCompressionType::None);
    let mut table = BlockBasedOptions::default();
    table.set_bloom_filter(10.0, false);
    if let Ok(cache) = rocksdb::Cache::new_lru_cache(64 << 20) {
        table.set_block_cache(&cache);
    }
    table.set_cache_index_and_filter_blocks(true);
    // Every read is a point lookup: a hash index inside each data block skips its binary search.
    table.set_data_block_index_type(rocksdb::DataBlockIndexType::BinaryAndHash);
    table.set_data_block_hash_ratio(0.75);
    opts.set_block_based_table_factory(&table);
    opts
}

/// Opens the index; read-only (`secondary`: where that instance keeps its own files) as a
/// secondary instance, which can catch up with a writer's later changes (see
/// [`Store::read_found`]).
fn open_index(path: &Path, secondary: Option<&Path>) -> Result<DB> {
    let mut opts = index_options();
    opts.create_if_missing(secondary.is_none());
    opts.increase_parallelism(2);
    // A secondary instance must keep every table open (RocksDB requires it).
    opts.set_max_open_files(if secondary.is_some() { -1 } else { 512 });
    opts.set_write_buffer_size(64 << 20);
    // Most probes of a first ingest miss: a bloom filter over the memtable answers them without
    // walking its skiplist.
    opts.set_memtable_prefix_bloom_ratio(0.1);
    opts.set_memtable_whole_key_filtering(true);
    let db = match secondary {
        Some(own) => DB::open_as_secondary(&opts, path, own)?,
        None => DB::open(&opts, path)?,
    };
    Ok(db)
}

fn max_pack_number(dir: &Path) -> Result<Option<u32>> {
    let mut max = None;
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(Error::Io { context: format!("list {}", dir.display()), source: e });
        }
    };
    for entry in entries {
        let entry = entry.ctx(|| format!("list {}", dir.display()))?;
        if let Some(n) = entry.file_name().to_str().and_then(parse_pack_name) {
            max = max.max(Some(n));
        }
    }
    Ok(max)
}
