//! Workspace checkpoints in the store: checkpoint, restore, fork, revert, diff and log.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{CString, OsStr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use blake3::hazmat::ChainingValue;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::clone::{self, CopyMode, Counters, Skipped};
use crate::dirfds::{self, DirTable};
use crate::error::{Error, IoContext, Result};
use crate::hash::{self, Previous};
use crate::manifest::{self, CheckpointInfo, KIND_CHECKPOINT, ManifestEntry};
use crate::repo::{Id, NodeData, Repo, RepoTx};
use crate::statcache::{self, CacheEntry, DirCache, StatCache};
use crate::sys::{self, XattrTarget};
use crate::walk::{self, Kind, Meta};

/// Ref prefix under which every checkpoint is kept (so that gc keeps it).
pub const CHECKPOINT_REF_PREFIX: &str = "fsfork/ckpt/";

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// A workspace is identified by its canonical path; metadata keys use a hash of its bytes so
/// that non-UTF-8 paths work.
fn ws_key(path: &Path) -> String {
    blake3::hash(path.as_os_str().as_bytes()).to_hex()[..32].to_string()
}

/// The (device, inode) of the store's directory: a workspace walk leaves it out, so that a
/// store kept inside a workspace (e.g. the default `.snapfork`) is never recorded in it.
fn store_key(repo: &dyn Repo) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(repo.root_dir()).ok().map(|m| (m.dev(), m.ino()))
}

fn canonical(dir: &Path) -> Result<PathBuf> {
    let p = std::fs::canonicalize(dir).ctx("resolve", dir)?;
    if !p.is_dir() {
        return Err(Error::InvalidPath { path: dir.to_path_buf(), reason: "not a directory".into() });
    }
    Ok(p)
}

/// Where a new tree's canonical path will be (its parent must exist).
fn canonical_new(dst: &Path) -> Result<PathBuf> {
    let (parent, name) = crate::clone::split_destination(dst)?;
    Ok(std::fs::canonicalize(parent).ctx("resolve", parent)?.join(name))
}

/// One event in a workspace's history.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Event {
    /// "checkpoint", "revert", "restore" or "fork".
    pub kind: String,
    /// The checkpoint concerned (hex).
    pub checkpoint: String,
    /// Seconds since the epoch.
    pub time: f64,
    /// Message of a checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// What the store remembers about a workspace directory.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct WorkspaceRecord {
    /// The canonical path (lossy).
    pub path: String,
    /// The checkpoint the tree was last taken at or put back to.
    pub head: Option<String>,
    /// The events, oldest first.
    pub events: Vec<Event>,
}

/// A tree made from a checkpoint (a fork or restore), listed under the checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Offspring {
    /// The path of the new tree.
    pub path: String,
    /// "fork" or "restore".
    pub kind: String,
    /// Seconds since the epoch.
    pub time: f64,
}

fn load_json<T: for<'de> Deserialize<'de> + Default>(repo: &dyn Repo, key: &str) -> Result<T> {
    Ok(match repo.meta_get(key)? {
        Some(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
            tracing::warn!(key, error = %e, "unreadable fsfork metadata; starting afresh");
            T::default()
        }),
        None => T::default(),
    })
}

/// The metadata key of workspace `ws`'s record.
fn record_key(ws: &Path) -> String {
    format!("{RECORD_PREFIX}{}", ws_key(ws))
}

/// Where workspace records are kept (see [`record_key`]).
const RECORD_PREFIX: &str = "fsfork/ws/";

/// The record of the workspace at `path` (canonical).
pub fn workspace_record(repo: &dyn Repo, path: &Path) -> Result<WorkspaceRecord> {
    let mut r: WorkspaceRecord = load_json(repo, &record_key(path))?;
    r.path = path.to_string_lossy().into_owned();
    Ok(r)
}

/// Metadata keys of a workspace's stat cache: one record per directory, under
/// `fsfork/sc/<workspace key>/<hash of the directory's relative path>`.
fn cache_prefix(ws: &Path) -> String {
    format!("fsfork/sc/{}/", ws_key(ws))
}

fn cache_key(prefix: &str, rel: &[u8]) -> String {
    format!("{prefix}{}", &blake3::hash(rel).to_hex()[..32])
}

/// The single-record stat cache of earlier versions: no longer read, deleted when the cache is
/// next written (a workspace that had it is read once more, as after losing its cache).
fn legacy_cache_key(ws: &Path) -> String {
    format!("fsfork/statcache/{}", ws_key(ws))
}

/// A relative path as bytes (the stat cache's directory key).
fn rel_of(p: &Path) -> &[u8] {
    p.as_os_str().as_bytes()
}

/// A workspace's stat cache as loaded, with what a rewrite must clean up.
struct LoadedCache {
    cache: StatCache,
    /// Keys of records that could not be decoded (or sit under the wrong key).
    bad_keys: Vec<String>,
    /// Whether the pre-split single record exists.
    legacy: bool,
}

fn load_cache(repo: &dyn Repo, ws: &Path) -> Result<LoadedCache> {
    let prefix = cache_prefix(ws);
    let raw = repo.meta_list(&prefix)?;
    let decoded: Vec<_> = raw.into_par_iter().map(|(k, v)| (k, DirCache::decode(&v))).collect();
    let mut out = LoadedCache { cache: StatCache::default(), bad_keys: Vec::new(), legacy: false };
    for (k, d) in decoded {
        match d {
            Some((rel, dc)) if cache_key(&prefix, &rel) == k => {
                out.cache.dirs.insert(rel, dc);
            }
            _ => {
                tracing::warn!(key = k, "stat cache record unreadable; its directory will be read again");
                out.bad_keys.push(k);
            }
        }
    }
    out.legacy = repo.meta_get(&legacy_cache_key(ws))?.is_some();
    Ok(out)
}

/// Replaces the whole stat cache of `ws` (after a restore or revert) as part of `tx`.
fn save_cache(repo: &dyn Repo, tx: &mut dyn RepoTx, ws: &Path, c: &StatCache) -> Result<()> {
    let prefix = cache_prefix(ws);
    let mut written = HashSet::new();
    for (rel, d) in &c.dirs {
        if d.entries.is_empty() {
            continue;
        }
        let k = cache_key(&prefix, rel);
        tx.meta_put(&k, &d.encode(rel));
        written.insert(k);
    }
    for (k, _) in repo.meta_list(&prefix)? {
        if !written.contains(&k) {
            tx.meta_delete(&k);
        }
    }
    if repo.meta_get(&legacy_cache_key(ws))?.is_some() {
        tx.meta_delete(&legacy_cache_key(ws));
    }
    Ok(())
}

fn json_bytes<T: Serialize>(what: &str, v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| Error::Corrupt { id: what.into(), reason: e.to_string() })
}

/// Block CVs of a large object in full: 32 bytes per block. Attached to the object (see
/// [`snapfork_store::attached_name`]), so gc removes them with it.
fn cvs_key(id: &Id) -> String {
    format!("{}{}/fsfork-cvs", snapfork_store::ATTACHED, id.hex())
}

/// Block CVs of a large object as the blocks that differ from an earlier object's (a disk image
/// with 1% changed: 4% of the blocks, 80 KB instead of 2 MB per GiB written per checkpoint):
/// `CVD1 | base id (32) | block count u32 | n u32 | n x (block index u32 | CV (32))`.
fn cvd_key(id: &Id) -> String {
    format!("{}{}/fsfork-cvd", snapfork_store::ATTACHED, id.hex())
}

const CVD_MAGIC: &[u8; 4] = b"CVD1";

/// Block CVs as they are stored: whether the bytes are a delta ([`cvd_key`]) or the full list
/// ([`cvs_key`]), and the bytes.
type CvRecord = (bool, Vec<u8>);

/// How many deltas may stand between an object's CVs and a full record (bounds the reads of a
/// load; the next record after that is written in full).
const MAX_CV_DEPTH: u8 = 8;

/// The block CVs of object `id` and how many deltas they were built from. Unverified: the
/// caller checks them against the object's id.
fn load_cvs(repo: &dyn Repo, id: &Id) -> Option<(Vec<ChainingValue>, u8)> {
    load_cvs_at(repo, id, 0)
}

fn load_cvs_at(repo: &dyn Repo, id: &Id, level: u8) -> Option<(Vec<ChainingValue>, u8)> {
    if level > MAX_CV_DEPTH {
        return None;
    }
    if let Some(b) = repo.meta_get(&cvs_key(id)).ok()? {
        if b.len() % 32 != 0 {
            return None;
        }
        return Some((b.chunks_exact(32).map(|c| c.try_into().unwrap_or([0u8; 32])).collect(), 0));
    }
    let b = repo.meta_get(&cvd_key(id)).ok()??;
    let u32_at = |at: usize| -> Option<u32> { Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?)) };
    if b.get(..4)? != CVD_MAGIC {
        return None;
    }
    let base = Id(b.get(4..36)?.try_into().ok()?);
    let (count, n) = (u32_at(36)? as usize, u32_at(40)? as usize);
    if b.len() != 44 + n.checked_mul(36)? {
        return None;
    }
    let (mut cvs, depth) = load_cvs_at(repo, &base, level + 1)?;
    cvs.resize(count, [0u8; 32]);
    for k in 0..n {
        let at = 44 + k * 36;
        let slot = cvs.get_mut(u32_at(at)? as usize)?;
        *slot = b.get(at + 4..at + 36)?.try_into().ok()?;
    }
    Some((cvs, depth + 1))
}

/// The record to store for the new CVs `cvs`: a delta against `base` (its id, CVs and depth)
/// when that is much smaller and the chain not too long, else the full list. Returns the key
/// function to use (full or delta) and the bytes.
fn cv_record(cvs: &[ChainingValue], base: Option<(&Id, &[ChainingValue], u8)>) -> CvRecord {
    if let Some((bid, bcvs, depth)) = base
        && depth < MAX_CV_DEPTH
    {
        let changed: Vec<usize> = (0..cvs.len()).filter(|&i| bcvs.get(i) != Some(&cvs[i])).collect();
        if changed.len() * 36 < cvs.len() * 8 {
            let mut b = Vec::with_capacity(44 + changed.len() * 36);
            b.extend_from_slice(CVD_MAGIC);
            b.extend_from_slice(&bid.0);
            b.extend_from_slice(&(cvs.len() as u32).to_le_bytes());
            b.extend_from_slice(&(changed.len() as u32).to_le_bytes());
            for i in changed {
                b.extend_from_slice(&(i as u32).to_le_bytes());
                b.extend_from_slice(&cvs[i]);
            }
            return (true, b);
        }
    }
    (false, cvs.as_flattened().to_vec())
}

fn has_cvs(repo: &dyn Repo, id: &Id) -> Result<bool> {
    Ok(repo.meta_get(&cvs_key(id))?.is_some() || repo.meta_get(&cvd_key(id))?.is_some())
}

/// The trees made from a checkpoint.
pub fn offspring(repo: &dyn Repo, ckpt: &Id) -> Result<Vec<Offspring>> {
    load_json(repo, &format!("fsfork/offspring/{}", ckpt.hex()))
}

/// Resolves a checkpoint given as a full or abbreviated id or a ref name.
pub fn resolve_checkpoint(repo: &dyn Repo, name: &str) -> Result<Id> {
    let id = repo.resolve(name)?.or_else(|| repo.get_ref(&format!("{CHECKPOINT_REF_PREFIX}{name}")).ok().flatten());
    let id = id.ok_or_else(|| Error::NoSuchCheckpoint(name.to_string()))?;
    let node = repo.get_node(&id)?;
    if node.kind != KIND_CHECKPOINT {
        return Err(Error::NoSuchCheckpoint(format!("{name} is not a workspace checkpoint")));
    }
    Ok(id)
}

/// Reads a checkpoint's info.
pub fn checkpoint_info(repo: &dyn Repo, id: &Id) -> Result<CheckpointInfo> {
    let node = repo.get_node(id)?;
    Ok(manifest::decode_checkpoint(id, &node)?.0)
}

/// What a checkpoint did.
#[derive(Clone, Debug, Serialize)]
pub struct CheckpointReport {
    /// The checkpoint id.
    pub id: Id,
    /// The previous checkpoint of the workspace.
    pub parent: Option<Id>,
    /// Directories in the tree.
    pub dirs: u64,
    /// Regular files in the tree.
    pub files: u64,
    /// Logical bytes of regular files.
    pub bytes: u64,
    /// Files whose stat was unchanged (not read).
    pub unchanged_files: u64,
    /// Files read (reflinked into staging and hashed).
    pub hashed_files: u64,
    /// Bytes actually hashed (less than the changed files' size when blocks were reused).
    pub hashed_bytes: u64,
    /// File objects added to the store.
    pub new_objects: u64,
    /// How new objects got their bytes (reflink, or copy where the store is elsewhere).
    pub mode: CopyMode,
    /// Wall time in milliseconds.
    pub elapsed_ms: f64,
}

impl Serialize for Id {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.hex())
    }
}

/// The result of looking at one entry during a checkpoint.
#[derive(Default)]
struct Seen {
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    id: Option<Id>,
    target: Vec<u8>,
    staged: Option<PathBuf>,
    /// The block CVs record of a new large object (delta or full, see [`cv_record`]).
    cvs: Option<CvRecord>,
    hashed: Option<u64>,
    /// The stat cache vouched for it.
    hit: bool,
    /// Removed between the walk and the read: not part of this checkpoint.
    vanished: bool,
    /// The stat to cache (the one taken before the contents were read).
    meta: Meta,
}

static STAGE_SEQ: AtomicU64 = AtomicU64::new(0);

/// Hashes the reflinked copy `staged` (whose extents are `staged_ext`) of `source`, reading the
/// blocks that differ from the previous object from `source` instead: its page cache usually
/// holds them (they were just written), while the fresh copy's page cache is empty, so reading
/// the copy means one device read per block. Returns the hash and the bytes read from `source`.
///
/// Why the bytes read are the copy's: right after the reflink the two files share every extent,
/// and the source's page cache was written back by the reflink, so it held exactly the copy's
/// bytes. Any later change to the source (write, mmap store, direct I/O) must copy-on-write the
/// shared block, so once flushed (FIEMAP_FLAG_SYNC) that block maps elsewhere. Every block read
/// from the source whose mapping no longer matches the copy's is read again from the copy.
fn hash_via_source(
    source: BorrowedFd<'_>,
    staged: BorrowedFd<'_>,
    size: u64,
    staged_ext: &[sys::Extent],
    prev: &Previous<'_>,
) -> std::io::Result<(hash::FileHash, u64)> {
    let mut h =
        match hash::hash_incremental(source, size, Some(Previous { len: prev.len, cvs: prev.cvs, same: prev.same })) {
            Ok(h) => h,
            // The source shrank meanwhile: the copy is what counts.
            Err(_) => {
                return Ok((
                    hash::hash_incremental(
                        staged,
                        size,
                        Some(Previous { len: prev.len, cvs: prev.cvs, same: prev.same }),
                    )?,
                    0,
                ));
            }
        };
    let from_source = h.hashed_bytes;
    let now = sys::fiemap(source, true)?;
    let still = hash::same_blocks_from_extents(&now, size, staged_ext, size);
    let reused = hash::reusable(size, prev);
    let redo: Vec<u64> = (0..size.div_ceil(hash::BLOCK))
        .filter(|&b| !reused[b as usize] && !still.get(b as usize).copied().unwrap_or(false))
        .collect();
    if !redo.is_empty() {
        tracing::debug!(blocks = redo.len(), "source changed after the reflink; reading those blocks from the copy");
        hash::rehash_blocks(staged, size, &mut h, &redo)?;
    }
    Ok((h, from_source))
}

/// The manifest's name for the hard-link group of inode `ino` on device `dev`: the same in every
/// checkpoint (directory nodes are reused across checkpoints), and unique across the
/// filesystems a tree spans (btrfs subvolumes and mounts number their inodes alike), where the
/// inode number alone would merge unrelated files on restore.
fn link_group(dev: u64, ino: u64) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(&dev.to_le_bytes());
    h.update(&ino.to_le_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&h.finalize().as_bytes()[..8]);
    u64::from_le_bytes(b).max(1)
}

/// Reflinks (or copies) an open file into the staging area and hashes the staged copy, reusing
/// the block CVs of `prev` where the staged copy still shares extents with that object.
fn stage_and_hash(
    repo: &dyn Repo,
    (staging, sdir): (&Path, BorrowedFd<'_>),
    sfd: &OwnedFd,
    size: u64,
    prev: Option<Id>,
    c: &Counters,
) -> Result<(PathBuf, Id, Option<CvRecord>, u64, u64)> {
    let name = format!("fsfork-{}-{}", std::process::id(), STAGE_SEQ.fetch_add(1, Ordering::Relaxed));
    let path = staging.join(&name);
    let cname = sys::cstr(OsStr::new(&name)).ctx("name", &path)?;
    let dfd = sys::openat(sdir, &cname, libc::O_RDWR | libc::O_CREAT | libc::O_EXCL, 0o444).ctx("create", &path)?;
    let result = (|| {
        let t0 = Instant::now();
        let mode = clone::transfer(sfd.as_fd(), dfd.as_fd(), size, c).ctx("stage", &path)?;
        // The staged copy is the version recorded, whatever its length: a reflink takes the
        // whole file as it is at that instant, which may have grown or shrunk since `size` was
        // read. Hashing any other length would give the object an id its bytes do not have.
        let size = sys::fstat(dfd.as_fd()).ctx("stat", &path)?.st_size as u64;
        let t_stage = t0.elapsed();
        // Incremental: the previous object of this path, if it is still a file object with
        // known block CVs, and the extents both share.
        let mut h = None;
        let (mut t_cvs, mut t_extents, mut from_source) = (t_stage, t_stage, 0u64);
        if size >= hash::CV_THRESHOLD
            && let Some(p) = prev
            && let Some((cvs, depth)) = load_cvs(repo, &p)
            && let Ok(obj) = std::fs::File::open(repo.file_object_path(&p))
            && let Ok(om) = obj.metadata()
            // CVs that do not give the previous object's id are never used (a wrong CV would
            // give the new object a wrong id).
            && (cvs.len() as u64 == om.len().div_ceil(hash::BLOCK)
                && om.len() > hash::BLOCK
                && hash::root_from_cvs(&cvs, om.len()) == p.0
                || {
                    tracing::warn!(object = %p, "stored block CVs do not match their object; hashing in full");
                    false
                })
            && let Ok((staged_ext, same)) = {
                t_cvs = t0.elapsed();
                let r = sys::fiemap(dfd.as_fd(), false).and_then(|staged_ext| {
                    let old_ext = sys::fiemap(obj.as_fd(), false)?;
                    let same = hash::same_blocks_from_extents(&staged_ext, size, &old_ext, om.len());
                    Ok((staged_ext, same))
                });
                t_extents = t0.elapsed();
                r
            }
        {
            let prev = Previous { len: om.len(), cvs: &cvs, same: &same };
            let hh = match mode {
                CopyMode::Reflink => {
                    let (hh, n) =
                        hash_via_source(sfd.as_fd(), dfd.as_fd(), size, &staged_ext, &prev).ctx("hash", &path)?;
                    from_source = n;
                    hh
                }
                _ => hash::hash_incremental(dfd.as_fd(), size, Some(prev)).ctx("hash", &path)?,
            };
            let record = hh.cvs.as_ref().map(|new| cv_record(new, Some((&p, &cvs, depth))));
            h = Some((hh, record));
        }
        let incremental = h.is_some();
        let (h, record) = match h {
            Some(h) => h,
            None => {
                let h = hash::hash_file(dfd.as_fd(), size).ctx("hash", &path)?;
                let record = h.cvs.as_ref().map(|new| cv_record(new, None));
                (h, record)
            }
        };
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        tracing::debug!(
            size,
            incremental,
            hashed = h.hashed_bytes,
            stage_ms = ms(t_stage),
            load_cvs_ms = ms(t_cvs - t_stage),
            extents_ms = ms(t_extents - t_cvs),
            hash_ms = ms(t0.elapsed() - t_extents.max(t_stage)),
            from_source,
            total_ms = ms(t0.elapsed()),
            "staged and hashed"
        );
        Ok((Id(h.id), record, h.hashed_bytes, size))
    })();
    match result {
        Ok((id, cvs, hashed, size)) => Ok((path, id, cvs, hashed, size)),
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            Err(e)
        }
    }
}

/// Records the tree `dir` as a checkpoint. Unchanged files (stat cache) are not read; changed
/// files are reflinked into the store's staging area and hashed there (so the recorded bytes
/// are exactly one version of the file even if it is being written), large ones only where
/// their extents differ from the previous object.
///
/// A directory whose own entry and every entry in it are exactly as cached (and whose
/// subdirectories are reused too) keeps the manifest node it had: nothing in it is looked up,
/// encoded or written again, and its stat-cache record stays as it is. Only the topmost such
/// directories are pinned in the transaction (a pinned node keeps its whole closure alive), so
/// a checkpoint after a few edits costs the walk plus work proportional to what changed.
pub fn checkpoint(repo: &dyn Repo, dir: &Path, message: Option<&str>) -> Result<CheckpointReport> {
    checkpoint_then(repo, dir, message, &mut || {})
}

/// Reads the extended attributes of a walked entry without following it: a directory through
/// its own descriptor, anything else through its parent's.
fn xattrs_of(scan: &walk::Scan, e: &walk::Entry, path: &dyn Fn() -> PathBuf) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let read = match e.subdir {
        Some(d) => {
            let f = scan.dir_fd(d).map_err(|x| Error::io("open", path(), x))?;
            sys::read_xattrs(XattrTarget::Fd(f.fd()))
        }
        None => walk::entry_xattrs(scan.dir_fd(e.dir).map_err(|x| Error::io("open", path(), x))?.fd(), &e.name),
    };
    read.map_err(|x| Error::io("read xattrs", path(), x))
}

/// [`checkpoint`], calling `captured` once the tree's state is taken (every file's content
/// staged or known, nothing more read from `dir`) and before the store commit: from then on
/// the workspace may change again (a sandbox may resume) while the commit waits for the disk.
/// Not called when the checkpoint fails before that point.
pub fn checkpoint_then(
    repo: &dyn Repo,
    dir: &Path,
    message: Option<&str>,
    captured: &mut dyn FnMut(),
) -> Result<CheckpointReport> {
    let start = Instant::now();
    let ws = canonical(dir)?;
    let exclude = store_key(repo);
    // The cache load (one index scan) and the walk (syscalls) do not depend on each other.
    let (loaded, walked) = rayon::join(
        || {
            let t = Instant::now();
            load_cache(repo, &ws).map(|c| (c, t.elapsed()))
        },
        || {
            let t = Instant::now();
            walk::scan_excluding(&ws, exclude).map(|s| (s, t.elapsed()))
        },
    );
    let ((loaded, t_cache), (scan, t_walk)) = (loaded?, walked?);
    let LoadedCache { cache, bad_keys, legacy } = loaded;
    let record = workspace_record(repo, &ws)?;
    let staging = repo.staging_dir();
    std::fs::create_dir_all(&staging).ctx("create", &staging)?;
    let staging_fd = sys::open_root_dir(&staging).ctx("open", &staging)?;
    let t_scan = start.elapsed();
    let parent = match &record.head {
        Some(h) => Id::from_hex(h).filter(|id| repo.get_node(id).is_ok()),
        None => None,
    };
    let (ndirs, nent) = (scan.dirs.len(), scan.entries.len());

    // The entries of one directory are contiguous in the walk and sorted by name, as are the
    // directory's cache record: one merge pairs each entry with its cached state and tells
    // whether the listing has exactly the cached names.
    let mut range = vec![0..0; ndirs];
    let mut dir_entry = vec![usize::MAX; ndirs];
    {
        let mut i = 0;
        while i < nent {
            let (d, from) = (scan.entries[i].dir, i);
            while i < nent && scan.entries[i].dir == d {
                if let Some(sd) = scan.entries[i].subdir {
                    dir_entry[sd] = i;
                }
                i += 1;
            }
            range[d] = from..i;
        }
    }
    let no_record = DirCache::default();
    let dcache: Vec<&DirCache> =
        scan.dirs.iter().map(|d| cache.dirs.get(rel_of(&d.rel)).unwrap_or(&no_record)).collect();
    let mut cached: Vec<Option<&CacheEntry>> = vec![None; nent];
    let mut complete = vec![false; ndirs];
    for d in 0..ndirs {
        let list = &dcache[d].entries;
        let (mut k, mut matched) = (0, 0);
        for i in range[d].clone() {
            let name = scan.entries[i].name.to_bytes();
            while k < list.len() && list[k].0.as_slice() < name {
                k += 1;
            }
            if k < list.len() && list[k].0 == name {
                cached[i] = Some(&list[k].1);
                matched += 1;
                k += 1;
            }
        }
        complete[d] = matched == range[d].len() && matched == list.len();
    }

    // Hard links inside the tree: one link group per inode, hashed once.
    let mut first: HashMap<(u64, u64), usize> = HashMap::new();
    let mut secondary: Vec<Option<usize>> = vec![None; nent];
    for (i, e) in scan.entries.iter().enumerate() {
        if e.subdir.is_none() && e.meta.nlink > 1 && e.meta.kind() == Kind::File {
            match first.entry((e.meta.dev, e.meta.ino)) {
                std::collections::hash_map::Entry::Occupied(o) => secondary[i] = Some(*o.get()),
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(i);
                }
            }
        }
    }
    let groups: HashSet<(u64, u64)> =
        scan.entries.iter().enumerate().filter_map(|(i, e)| secondary[i].map(|_| (e.meta.dev, e.meta.ino))).collect();

    // Exactly as cached, access time included: its manifest entry is the one recorded.
    let same: Vec<bool> = (0..nent)
        .map(|i| {
            let m = &scan.entries[i].meta;
            secondary[i].is_none() && cached[i].is_some_and(|c| c.matches(m) && c.atime == m.atime)
        })
        .collect();
    // Directories that can keep their node, bottom-up (children have larger indices).
    let mut candidate = vec![false; ndirs];
    for d in (1..ndirs).rev() {
        let own = dir_entry[d];
        candidate[d] = own != usize::MAX
            && same[own]
            && cached[own].is_some_and(|c| c.id.is_some())
            && complete[d]
            && range[d].clone().all(|i| same[i] && scan.entries[i].subdir.is_none_or(|sd| candidate[sd]));
    }
    let mut tx = repo.begin()?;
    // The new checkpoint links its parent: keep it against a gc that runs meanwhile (the
    // engine removes checkpoint refs with their snapshots). One gone already starts no line.
    let parent = match parent {
        Some(p) if tx.keep_node(&p)? => Some(p),
        _ => None,
    };
    // Top-down: pin each topmost reused node (pin, then look: a concurrent gc either sees the
    // pin or had removed the node, and then the directory is read like a changed one). A node
    // the store holds has its whole closure (gc drops index entries of unreachable objects in
    // one batch), so nothing below it needs a lookup.
    let mut reused = vec![false; ndirs];
    let mut pinned = 0u64;
    for d in 1..ndirs {
        if !candidate[d] {
            continue;
        }
        let p = scan.dirs[d].parent.unwrap_or(0);
        reused[d] = reused[p]
            || match cached[dir_entry[d]].and_then(|c| c.id) {
                Some(nid) => {
                    pinned += 1;
                    tx.keep_node(&nid)?
                }
                None => false,
            };
    }
    let t_match = start.elapsed();

    // File contents are copied (without reflinks) into the store's staging: leave its reserve.
    let c = Counters::keeping_free(repo.min_free_bytes());
    // Entries of reused directories are not looked at again.
    let mut seen: Vec<Seen> = scan
        .entries
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let file = e.subdir.is_none() && e.meta.kind() == Kind::File;
            Seen {
                meta: e.meta,
                hit: reused[e.dir],
                id: if reused[e.dir] && file { cached[i].and_then(|c| c.id) } else { None },
                ..Seen::default()
            }
        })
        .collect();
    let work: Vec<usize> = (0..nent).filter(|&i| !reused[scan.entries[i].dir]).collect();
    // A file changed in the tick it is read in could change again unseen: let the tick of the
    // newest change pass (usually it has), and cache what changed since smudged (see `statcache`).
    if let Some(newest) = work.iter().map(|&i| scan.entries[i].meta.ctime).max() {
        statcache::wait_past(newest);
    }
    let read_from = sys::coarse_now();
    // Reads entry `i`; the further names of a hard link take their content from the first.
    let look = |i: usize, further_name: bool| -> Result<Seen> {
        let r = (|| -> Result<Seen> {
            let e = &scan.entries[i];
            if further_name {
                return Ok(Seen { meta: e.meta, ..Seen::default() });
            }
            let cached = cached[i];
            // A cache hit names a file object; gc may have removed it since (every
            // checkpoint that used it deleted): then the file is read again like a changed one.
            let mut hit = cached.filter(|ce| ce.matches(&e.meta));
            if let Some(id) = hit.and_then(|ce| ce.id).filter(|_| e.subdir.is_none())
                && !repo.has_file_object(&id)?
            {
                hit = None;
            }
            let err_path = || ws.join(scan.rel_path(e));
            // Only opened when needed (a reopen if the walk could not keep it open).
            let sdir = || scan.dir_fd(e.dir).map_err(|x| Error::io("open", err_path(), x));
            let mut s = Seen { meta: e.meta, hit: hit.is_some(), ..Seen::default() };
            s.xattrs = match hit {
                Some(h) => h.xattrs.clone(),
                None => xattrs_of(&scan, e, &err_path)?,
            };
            match e.meta.kind() {
                Kind::File => {
                    if let Some(h) = hit.filter(|h| h.id.is_some()) {
                        s.id = h.id;
                    } else if e.meta.size == 0 {
                        s.id = None;
                    } else {
                        let sfd =
                            sys::openat(sdir()?.fd(), &e.name, libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY, 0)
                                .map_err(|x| Error::io("open", err_path(), x))?;
                        let st = sys::fstat(sfd.as_fd()).map_err(|x| Error::io("stat", err_path(), x))?;
                        let m = Meta::from_stat(&st);
                        if m.kind() != Kind::File {
                            return Err(Error::InvalidPath {
                                path: err_path(),
                                reason: "changed type during the checkpoint".into(),
                            });
                        }
                        let (staged, id, cvs, hashed, size) = stage_and_hash(
                            repo,
                            (&staging, staging_fd.as_fd()),
                            &sfd,
                            m.size,
                            cached.and_then(|c| c.id),
                            &c,
                        )?;
                        s.id = Some(id);
                        s.staged = Some(staged);
                        s.cvs = cvs;
                        s.hashed = Some(hashed);
                        // Record the size that was actually captured.
                        s.meta.size = size;
                    }
                }
                Kind::Symlink => {
                    s.target = sys::readlinkat(sdir()?.fd(), &e.name)
                        .map_err(|x| Error::io("readlink", err_path(), x))?
                        .into_encoded_bytes();
                }
                _ => {}
            }
            Ok(s)
        })();
        match r {
            // A live workspace loses files all the time (temporary files, builds): an entry
            // that disappears between the walk and its read is simply not in the checkpoint.
            Err(Error::Io { op: "open" | "readlink" | "read xattrs", ref source, .. })
                if source.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(Seen { vanished: true, ..Seen::default() })
            }
            r => r,
        }
    };
    let looked: Vec<(usize, Result<Seen>)> = work.par_iter().map(|&i| (i, look(i, secondary[i].is_some()))).collect();
    // Collect, cleaning every staged file if anything failed.
    let mut failure = None;
    for (i, s) in looked {
        match s {
            Ok(s) => seen[i] = s,
            Err(e) => {
                failure.get_or_insert(e);
            }
        }
    }
    // A hard link whose first name vanished (renamed away, replaced) is read through its next
    // name that is still there; the rest of its names link to that one.
    while failure.is_none() {
        let mut next_first: HashMap<usize, usize> = HashMap::new();
        for (i, p) in secondary.iter().enumerate() {
            if let Some(p) = *p
                && seen[p].vanished
            {
                next_first.entry(p).or_insert(i);
            }
        }
        if next_first.is_empty() {
            break;
        }
        for &i in next_first.values() {
            secondary[i] = None;
            match look(i, false) {
                Ok(s) => seen[i] = s,
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
        for p in secondary.iter_mut().flatten() {
            if let Some(&n) = next_first.get(p) {
                *p = n;
            }
        }
    }
    if let Some(e) = failure {
        for s in &seen {
            if let Some(p) = &s.staged {
                let _ = std::fs::remove_file(p);
            }
        }
        return Err(e);
    }
    for i in 0..nent {
        if let Some(p) = secondary[i] {
            seen[i].id = seen[p].id;
            seen[i].meta.size = seen[p].meta.size;
            seen[i].vanished = seen[p].vanished;
            // One inode, one set of xattrs: every name records them (and caches them), so that
            // whichever name comes first in a later walk carries them.
            seen[i].xattrs = seen[p].xattrs.clone();
        }
    }

    let result = (|| -> Result<(Id, u64, u64, u64)> {
        let mut record = record;
        let t_seen = start.elapsed();
        let mut adopted = HashSet::new();
        let mut new_objects = 0u64;
        for s in &seen {
            let (Some(p), Some(id)) = (&s.staged, &s.id) else {
                continue;
            };
            // `keep_file` pins before it looks: a gc cannot take the object away before our commit.
            if adopted.contains(id) || tx.keep_file(id)? {
                let _ = std::fs::remove_file(p);
                continue;
            }
            tx.adopt_file_object(p, id)?;
            adopted.insert(*id);
            new_objects += 1;
        }
        // Objects taken from the stat cache outside reused directories are linked without
        // being written: keep them alive until commit (a concurrent gc cannot remove them once
        // kept). Those inside reused directories are kept by their pinned ancestor.
        for &i in &work {
            let s = &seen[i];
            if let (None, Some(id), false) = (&s.staged, &s.id, s.vanished)
                && !adopted.contains(id)
                && !tx.keep_file(id)?
            {
                return Err(Error::Corrupt {
                    id: id.to_string(),
                    reason: "a file object vanished during the checkpoint (a concurrent gc?); retry".into(),
                });
            }
        }
        let mut dir_ids: Vec<Option<Id>> = vec![None; ndirs];
        let entry_of = |i: usize, dir_ids: &[Option<Id>]| -> ManifestEntry {
            let e = &scan.entries[i];
            let s = &seen[i];
            let kind = e.meta.kind();
            ManifestEntry {
                name: e.name.to_bytes().to_vec(),
                kind,
                mode: e.meta.mode,
                uid: e.meta.uid,
                gid: e.meta.gid,
                size: match kind {
                    Kind::File => s.meta.size,
                    Kind::Symlink => s.target.len() as u64,
                    _ => 0,
                },
                atime: e.meta.atime,
                mtime: e.meta.mtime,
                rdev: if matches!(kind, Kind::CharDevice | Kind::BlockDevice) { e.meta.rdev } else { 0 },
                link_group: if groups.contains(&(e.meta.dev, e.meta.ino)) {
                    link_group(e.meta.dev, e.meta.ino)
                } else {
                    0
                },
                link: match e.subdir {
                    Some(d) => dir_ids[d],
                    None => s.id,
                },
                target: s.target.clone(),
                xattrs: s.xattrs.clone(),
            }
        };
        let (mut files, mut bytes) = (0u64, 0u64);
        for (e, s) in scan.entries.iter().zip(&seen) {
            if e.meta.kind() == Kind::File && !s.vanished {
                files += 1;
                bytes += s.meta.size;
            }
        }
        // Directory nodes bottom-up: children have larger indices than their parents.
        let mut encoded = 0u64;
        for d in (0..ndirs).rev() {
            if reused[d] {
                dir_ids[d] = cached[dir_entry[d]].and_then(|c| c.id);
                continue;
            }
            let entries: Vec<ManifestEntry> =
                range[d].clone().filter(|&i| !seen[i].vanished).map(|i| entry_of(i, &dir_ids)).collect();
            dir_ids[d] = Some(tx.put_node(&manifest::encode_dir(entries))?);
            encoded += 1;
        }
        let root = &scan.dirs[0];
        let root_xattrs =
            sys::read_xattrs(XattrTarget::Fd(scan.dir_fd(0).ctx("open", &ws)?.fd())).ctx("read xattrs", &ws)?;
        let wrapper = manifest::encode_dir(vec![ManifestEntry {
            name: Vec::new(),
            kind: Kind::Dir,
            mode: root.meta.mode,
            uid: root.meta.uid,
            gid: root.meta.gid,
            size: 0,
            atime: root.meta.atime,
            mtime: root.meta.mtime,
            rdev: 0,
            link_group: 0,
            link: dir_ids[0],
            target: Vec::new(),
            xattrs: root_xattrs,
        }]);
        let wrapper_id = tx.put_node(&wrapper)?;
        let info = CheckpointInfo {
            v: 1,
            message: message.map(str::to_string),
            time: now(),
            workspace: ws.to_string_lossy().into_owned(),
            parent: parent.map(|p| p.hex()),
            files,
            bytes,
        };
        let mut links = vec![wrapper_id];
        links.extend(parent);
        let body =
            serde_json::to_vec(&info).map_err(|e| Error::Corrupt { id: "checkpoint".into(), reason: e.to_string() })?;
        let id = tx.put_node(&NodeData { kind: KIND_CHECKPOINT, links, body })?;
        tx.set_ref(&format!("{CHECKPOINT_REF_PREFIX}{}", id.hex()), &id)?;
        // Block CVs of new large objects, the stat cache and the history commit with the
        // checkpoint, so that they can never describe a checkpoint that does not exist.
        let mut written_cvs = HashSet::new();
        for s in &seen {
            if let (Some((delta, rec)), Some(oid)) = (&s.cvs, &s.id)
                && written_cvs.insert(*oid)
                && !has_cvs(repo, oid)?
            {
                tx.meta_put(&if *delta { cvd_key(oid) } else { cvs_key(oid) }, rec);
            }
        }
        // The stat cache: only the records of directories that were not reused can differ.
        let prefix = cache_prefix(&ws);
        let mut records_written = 0u64;
        for d in (0..ndirs).filter(|&d| !reused[d]) {
            let mut rec = DirCache::default();
            for i in range[d].clone().filter(|&i| !seen[i].vanished) {
                let s = &seen[i];
                // Directories cache their node id, files their content id.
                let id = match scan.entries[i].subdir {
                    Some(sd) => dir_ids[sd],
                    None => s.id,
                };
                let mut ce = CacheEntry::new(&s.meta, id, s.xattrs.clone());
                if ce.is_racy(read_from) {
                    ce.smudge();
                }
                rec.entries.push((scan.entries[i].name.to_bytes().to_vec(), ce));
            }
            if &rec == dcache[d] {
                continue;
            }
            let rel = rel_of(&scan.dirs[d].rel);
            if rec.entries.is_empty() {
                tx.meta_delete(&cache_key(&prefix, rel));
            } else {
                tx.meta_put(&cache_key(&prefix, rel), &rec.encode(rel));
            }
            records_written += 1;
        }
        // Records of directories that are gone, damaged records, the pre-split cache.
        let live: HashSet<&[u8]> = scan.dirs.iter().map(|d| rel_of(&d.rel)).collect();
        for rel in cache.dirs.keys().filter(|r| !live.contains(r.as_slice())) {
            tx.meta_delete(&cache_key(&prefix, rel));
        }
        for k in &bad_keys {
            tx.meta_delete(k);
        }
        if legacy {
            tx.meta_delete(&legacy_cache_key(&ws));
        }
        record.head = Some(id.hex());
        record.events.push(Event {
            kind: "checkpoint".into(),
            checkpoint: id.hex(),
            time: now(),
            message: message.map(str::to_string),
        });
        let rec = serde_json::to_vec(&record)
            .map_err(|e| Error::Corrupt { id: "workspace record".into(), reason: e.to_string() })?;
        tx.meta_put(&record_key(&ws), &rec);
        let t_nodes = start.elapsed();
        captured();
        // A file read by copying may hold bytes that are still only in the page cache. After a
        // crash ext4 can keep its new mtime (journaled) and lose those bytes (an overwrite in
        // place is not ordered before its inode): the stat cache committed here would then
        // vouch for bytes the file no longer holds, and every later checkpoint would record
        // them. So each filesystem that files were read from is flushed first (one syncfs
        // each: the walk crosses mount points). Reflinked files need none: FICLONE writes its
        // source back before it shares the blocks, and the store's fsync of the staged object
        // flushes them. After `captured`: a runtime paused for the checkpoint goes on meanwhile
        // (its later writes give newer mtimes, which the cache does not vouch for).
        if c.copied.load(Ordering::Relaxed) > 0 {
            let t_sync = Instant::now();
            let mut flushed = HashSet::new();
            for (i, s) in seen.iter().enumerate() {
                let e = &scan.entries[i];
                if s.staged.is_some() && flushed.insert(e.meta.dev) {
                    let dir = scan.dir_fd(e.dir).map_err(|x| Error::io("open", ws.join(scan.rel_path(e)), x))?;
                    sys::syncfs(dir.fd()).map_err(|x| Error::io("sync", ws.join(scan.rel_path(e)), x))?;
                }
            }
            tracing::debug!(
                ms = t_sync.elapsed().as_secs_f64() * 1e3,
                filesystems = flushed.len(),
                "checkpoint: copied sources flushed (syncfs)"
            );
        }
        tx.commit()?;
        tracing::debug!(
            walk_ms = t_walk.as_secs_f64() * 1e3,
            cache_load_ms = t_cache.as_secs_f64() * 1e3,
            walk_and_load_ms = t_scan.as_secs_f64() * 1e3,
            match_ms = (t_match - t_scan).as_secs_f64() * 1e3,
            read_ms = (t_seen - t_match).as_secs_f64() * 1e3,
            nodes_ms = (t_nodes - t_seen).as_secs_f64() * 1e3,
            commit_ms = (start.elapsed() - t_nodes).as_secs_f64() * 1e3,
            dirs = ndirs,
            reused = ndirs as u64 - encoded,
            pinned,
            looked_at = work.len(),
            records_written,
            "checkpoint phases"
        );
        Ok((id, new_objects, files, bytes))
    })();
    let (id, new_objects, files, bytes) = match result {
        Ok(v) => v,
        Err(e) => {
            for s in &seen {
                if let Some(p) = &s.staged {
                    let _ = std::fs::remove_file(p);
                }
            }
            return Err(e);
        }
    };

    let hashed: Vec<u64> = seen.iter().filter_map(|s| s.hashed).collect();
    let (hashed_files, hashed_bytes) = (hashed.len() as u64, hashed.iter().sum::<u64>());
    let report = CheckpointReport {
        id,
        parent,
        dirs: ndirs as u64,
        files,
        bytes,
        unchanged_files: seen.iter().zip(&scan.entries).filter(|(s, e)| s.hit && e.meta.kind() == Kind::File).count()
            as u64,
        hashed_files,
        hashed_bytes,
        new_objects,
        mode: c.mode(),
        elapsed_ms: start.elapsed().as_secs_f64() * 1000.0,
    };
    tracing::info!(id = %id, files, hashed_files, hashed_bytes, ms = report.elapsed_ms, "checkpoint");
    Ok(report)
}

/// A directory of a checkpoint loaded for materialization.
struct LoadedDir {
    parent: usize,
    name: CString,
    rel: PathBuf,
    meta: ManifestEntry,
    entries: Vec<ManifestEntry>,
}

/// Loads every directory node of a checkpoint, parents first; `dirs[0]` is the root.
fn load_tree(repo: &dyn Repo, ckpt: &Id) -> Result<(CheckpointInfo, Vec<LoadedDir>)> {
    let node = repo.get_node(ckpt)?;
    let (info, wrapper_id) = manifest::decode_checkpoint(ckpt, &node)?;
    let wrapper = manifest::decode_dir(&wrapper_id, &repo.get_node(&wrapper_id)?)?;
    let root = wrapper
        .into_iter()
        .next()
        .ok_or_else(|| Error::Corrupt { id: wrapper_id.hex(), reason: "empty root".into() })?;
    let mut dirs = Vec::new();
    let rid = root.link.ok_or_else(|| Error::Corrupt { id: wrapper_id.hex(), reason: "root has no listing".into() })?;
    let entries = manifest::decode_dir(&rid, &repo.get_node(&rid)?)?;
    dirs.push(LoadedDir { parent: usize::MAX, name: CString::default(), rel: PathBuf::new(), meta: root, entries });
    let mut i = 0;
    while i < dirs.len() {
        let subs: Vec<ManifestEntry> = dirs[i].entries.iter().filter(|e| e.kind == Kind::Dir).cloned().collect();
        for e in subs {
            let did =
                e.link.ok_or_else(|| Error::Corrupt { id: rid.hex(), reason: "directory without listing".into() })?;
            let entries = manifest::decode_dir(&did, &repo.get_node(&did)?)?;
            let name = valid_name(&e.name, &did)?;
            let rel = dirs[i].rel.join(OsStr::from_bytes(&e.name));
            dirs.push(LoadedDir { parent: i, name, rel, meta: e, entries });
        }
        i += 1;
    }
    Ok((info, dirs))
}

/// A manifest name as a C string: never empty, `.`, `..`, or containing `/` or NUL, so that
/// materializing cannot step outside the destination.
fn valid_name(name: &[u8], node: &Id) -> Result<CString> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
        return Err(Error::Corrupt {
            id: node.hex(),
            reason: format!("invalid name {:?}", String::from_utf8_lossy(name)),
        });
    }
    CString::new(name).map_err(|_| Error::Corrupt { id: node.hex(), reason: "name with NUL".into() })
}

fn meta_of(e: &ManifestEntry) -> Meta {
    Meta {
        mode: e.mode,
        uid: e.uid,
        gid: e.gid,
        size: e.size,
        atime: e.atime,
        mtime: e.mtime,
        rdev: e.rdev,
        ..Meta::default()
    }
}

/// What a restore did.
#[derive(Clone, Debug, Serialize)]
pub struct RestoreReport {
    /// The checkpoint restored.
    pub checkpoint: Id,
    /// The new tree.
    pub path: PathBuf,
    /// How file contents got there.
    pub mode: CopyMode,
    /// Directories created.
    pub dirs: u64,
    /// Regular files created.
    pub files: u64,
    /// Logical bytes of regular files.
    pub bytes: u64,
    /// Extended attributes that could not be set.
    pub xattr_failures: u64,
    /// Entries that keep this process's owner: only root may give files away.
    pub owner_failures: u64,
    /// Entries that could not be created.
    pub skipped: Vec<Skipped>,
    /// Wall time in milliseconds.
    pub elapsed_ms: f64,
}

/// Materializes a checkpoint into the new directory `dst` (reflinks from the store's file
/// objects). Returns the report and the stat cache of the new tree (keyed by relative path).
fn materialize(repo: &dyn Repo, ckpt: &Id, dst: &Path) -> Result<(RestoreReport, StatCache)> {
    let start = Instant::now();
    sys::raise_nofile_limit();
    let (_info, dirs) = load_tree(repo, ckpt)?;
    let t_load = start.elapsed();
    let (_pfd, _pname, root) = clone::create_root(dst)?;
    let result = (|| {
        let mut dfds = DirTable::new(root, dirfds::budget());
        for d in &dirs[1..] {
            let pfd = dfds.get(d.parent).ctx("open", dst.join(&d.rel))?;
            sys::mkdirat(pfd.fd(), &d.name, 0o700).ctx("mkdir", dst.join(&d.rel))?;
            let fd = if dfds.is_open(d.parent) {
                Some(sys::open_dir_at(pfd.fd(), &d.name).ctx("open", dst.join(&d.rel))?)
            } else {
                None
            };
            drop(pfd);
            dfds.push(d.parent, d.name.clone(), fd);
        }
        let mut work = Vec::new();
        let mut links = Vec::new();
        let mut group_first: HashMap<u64, (usize, usize)> = HashMap::new();
        for (di, d) in dirs.iter().enumerate() {
            for (ei, e) in d.entries.iter().enumerate() {
                if e.kind == Kind::Dir {
                    continue;
                }
                if e.link_group != 0 && e.kind == Kind::File {
                    if let Some(&f) = group_first.get(&e.link_group) {
                        links.push(((di, ei), f));
                        continue;
                    }
                    group_first.insert(e.link_group, (di, ei));
                }
                work.push((di, ei));
            }
        }
        // Copies into the store's own filesystem leave the store's reserve free.
        let c = match (std::fs::metadata(dst), std::fs::metadata(repo.root_dir())) {
            (Ok(d), Ok(s)) if d.dev() == s.dev() => Counters::keeping_free(repo.min_free_bytes()),
            _ => Counters::default(),
        };
        let cache = Mutex::new(StatCache::default());
        let skipped = Mutex::new(Vec::new());
        let files = AtomicU64::new(0);
        let t_dirs = start.elapsed();
        // File objects are opened relative to the objects directory (two path components
        // instead of the store's whole path for each of thousands of files).
        let objects = repo.file_object_path(&Id::default());
        let objects = objects.parent().and_then(Path::parent).map(Path::to_path_buf);
        let objects_fd = objects.as_deref().and_then(|p| sys::open_root_dir(p).ok());
        let open_object = |id: &Id| -> Result<std::fs::File> {
            let op = repo.file_object_path(id);
            let rel = objects.as_deref().and_then(|o| op.strip_prefix(o).ok());
            match (&objects_fd, rel.map(|r| sys::cstr(r.as_os_str()))) {
                (Some(ofd), Some(Ok(rel))) => {
                    sys::openat(ofd.as_fd(), &rel, libc::O_RDONLY, 0).map(std::fs::File::from)
                }
                _ => std::fs::File::open(&op),
            }
            .map_err(|x| Error::io("open object", &op, x))
        };
        work.par_iter().try_for_each(|&(di, ei)| -> Result<()> {
            let d = &dirs[di];
            let e = &d.entries[ei];
            let name = valid_name(&e.name, ckpt)?;
            let rel = d.rel.join(OsStr::from_bytes(&e.name));
            let ddir_ref = dfds.get(di).ctx("open", dst.join(&d.rel))?;
            let ddir = ddir_ref.fd();
            let path = || dst.join(&rel);
            let meta = meta_of(e);
            let cached = match e.kind {
                Kind::File => {
                    let st = match e.link {
                        Some(id) => {
                            let src = open_object(&id)?;
                            // An object truncated or extended in the store (disk damage, a bad
                            // copy) would come out as a file of the wrong size and content, and
                            // the stat cache seeded below would vouch for it as this object at
                            // the next checkpoint. Its size costs one fstat; damage that keeps
                            // the size is found by `snapfork verify` (the store re-hashes every
                            // object), not here: re-hashing on restore would read every byte,
                            // which reflinks exist to avoid. Nothing is created for this entry,
                            // and the error removes the partial tree like any other.
                            let found = sys::fstat(src.as_fd())
                                .map_err(|x| Error::io("stat object", repo.file_object_path(&id), x))?
                                .st_size as u64;
                            if found != e.size {
                                return Err(Error::CorruptObject {
                                    id: id.hex(),
                                    object: repo.file_object_path(&id),
                                    path: rel,
                                    expected: e.size,
                                    actual: found,
                                });
                            }
                            clone::create_file_lean(ddir, &name, src.as_fd(), &meta, &e.xattrs, &c)
                                .map_err(|x| Error::io("create", path(), x))?
                                .1
                        }
                        None => {
                            let fd = sys::openat(ddir, &name, libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL, 0o600)
                                .map_err(|x| Error::io("create", path(), x))?;
                            clone::apply_meta_fd(fd.as_fd(), &meta, &e.xattrs, &c)
                                .map_err(|x| Error::io("set metadata", path(), x))?;
                            sys::fstat(fd.as_fd()).map_err(|x| Error::io("stat", path(), x))?
                        }
                    };
                    files.fetch_add(1, Ordering::Relaxed);
                    (e.link_group == 0).then(|| CacheEntry::new(&Meta::from_stat(&st), e.link, e.xattrs.clone()))
                }
                Kind::Symlink => {
                    sys::symlinkat(OsStr::from_bytes(&e.target), ddir, &name)
                        .map_err(|x| Error::io("symlink", path(), x))?;
                    clone::apply_meta_at(ddir, &name, &meta, &e.xattrs, &c)
                        .map_err(|x| Error::io("set metadata", path(), x))?;
                    let st = sys::lstatat(ddir, &name).map_err(|x| Error::io("stat", path(), x))?;
                    Some(CacheEntry::new(&Meta::from_stat(&st), None, e.xattrs.clone()))
                }
                _ => match clone::create_special(ddir, &name, &meta) {
                    Ok(()) => {
                        clone::apply_meta_at(ddir, &name, &meta, &e.xattrs, &c)
                            .map_err(|x| Error::io("set metadata", path(), x))?;
                        let st = sys::lstatat(ddir, &name).map_err(|x| Error::io("stat", path(), x))?;
                        Some(CacheEntry::new(&Meta::from_stat(&st), None, e.xattrs.clone()))
                    }
                    Err(x) if x.raw_os_error() == Some(libc::EPERM) => {
                        skipped.lock().unwrap_or_else(|p| p.into_inner()).push(Skipped {
                            path: rel.to_string_lossy().into_owned(),
                            reason: format!("{:?}: {x}", e.kind),
                        });
                        None
                    }
                    Err(x) => return Err(Error::io("mknod", path(), x)),
                },
            };
            if let Some(ce) = cached {
                cache.lock().unwrap_or_else(|p| p.into_inner()).insert(rel.as_os_str().as_bytes(), ce);
            }
            Ok(())
        })?;
        for &((di, ei), (fdi, fei)) in &links {
            let (e, f) = (&dirs[di].entries[ei], &dirs[fdi].entries[fei]);
            let (n, fnm) = (valid_name(&e.name, ckpt)?, valid_name(&f.name, ckpt)?);
            let (fdir, edir) = (
                dfds.get(fdi).ctx("open", dst.join(&dirs[fdi].rel))?,
                dfds.get(di).ctx("open", dst.join(&dirs[di].rel))?,
            );
            sys::linkat(fdir.fd(), &fnm, edir.fd(), &n)
                .ctx("link", dst.join(&dirs[di].rel).join(OsStr::from_bytes(&e.name)))?;
        }
        let mut cache = cache.into_inner().unwrap_or_else(|p| p.into_inner());
        // The xattrs a link group's inode got: those of the name that created it (manifests
        // written before every name recorded them have none on the others).
        let group_xattrs: HashMap<u64, &Vec<_>> =
            links.iter().map(|&(_, (fdi, fei))| &dirs[fdi].entries[fei]).map(|f| (f.link_group, &f.xattrs)).collect();
        // Hard-linked files are cached once all their links exist (linking changes ctime).
        for (di, d) in dirs.iter().enumerate() {
            for e in d.entries.iter().filter(|e| e.link_group != 0 && e.kind == Kind::File) {
                let n = valid_name(&e.name, ckpt)?;
                let rel = d.rel.join(OsStr::from_bytes(&e.name));
                let st =
                    sys::lstatat(dfds.get(di).ctx("open", dst.join(&d.rel))?.fd(), &n).ctx("stat", dst.join(&rel))?;
                cache.insert(
                    rel.as_os_str().as_bytes(),
                    CacheEntry::new(
                        &Meta::from_stat(&st),
                        e.link,
                        group_xattrs.get(&e.link_group).copied().unwrap_or(&e.xattrs).clone(),
                    ),
                );
            }
        }
        // Directory metadata last, then their stat for the cache.
        let dir_cache: Vec<Result<(Vec<u8>, CacheEntry)>> = (0..dirs.len())
            .into_par_iter()
            .map(|i| {
                let d = &dirs[i];
                let fd_ref = dfds.get(i).ctx("open", dst.join(&d.rel))?;
                let fd = fd_ref.fd();
                clone::apply_meta_fd(fd, &meta_of(&d.meta), &d.meta.xattrs, &c)
                    .ctx("set metadata", dst.join(&d.rel))?;
                let st = sys::fstat(fd).ctx("stat", dst.join(&d.rel))?;
                Ok((
                    d.rel.clone().into_os_string().into_encoded_bytes(),
                    CacheEntry::new(&Meta::from_stat(&st), None, d.meta.xattrs.clone()),
                ))
            })
            .collect();
        tracing::debug!(
            load_ms = t_load.as_secs_f64() * 1e3,
            mkdir_ms = (t_dirs - t_load).as_secs_f64() * 1e3,
            total_ms = start.elapsed().as_secs_f64() * 1e3,
            "materialize phases"
        );
        for r in dir_cache {
            let (k, v) = r?;
            // The root is not an entry of the walk; only subdirectories are cached.
            if !k.is_empty() {
                cache.insert(&k, v);
            }
        }
        // The stat cache returned here vouches for each file as its object by (size, mtime,
        // ctime, inode): it must not become durable before the files' data. A copied file
        // (no reflink: ext4, another filesystem than the store's, a refused FICLONE) has its
        // size (ftruncate), times and mode in the journal long before its data is written back
        // (delayed allocation); after a crash it can read as zeros or old blocks with exactly
        // the stat we cached, and the next checkpoint would record it as the object. So a
        // tree with copies is flushed first: one syncfs (the data of thousands of files in one
        // go; fsync per file would cost a journal commit each). That also makes a revert's new
        // tree complete on disk before it is swapped in.
        //
        // A reflinked file needs none: its blocks are the object's, on disk since the store
        // committed it, and the clone is metadata, which XFS (one ordered log) and btrfs
        // (atomic transactions) recover as a prefix of what was done. The cached stat is the
        // one after the file's last change (futimens, after the clone), so if it survived, the
        // clone did too; if the crash lost it, the file is missing or has another size, mtime
        // or ctime, and the cache misses (it is read again), never matches wrong bytes.
        // Flushing anyway cost 24-105 ms per fork or revert of 10,000 files (BENCHMARKS.md),
        // more when other writers leave the filesystem dirty: syncfs waits for all of it.
        if c.copied.load(Ordering::Relaxed) > 0 {
            let t_sync = Instant::now();
            sys::syncfs(dfds.get(0).ctx("open", dst)?.fd()).ctx("sync", dst)?;
            tracing::debug!(ms = t_sync.elapsed().as_secs_f64() * 1e3, "materialize: copies flushed (syncfs)");
        }
        cache.finish();
        cache.settle();
        clone::warn_lost_metadata(&c, dst);
        Ok(RestoreReport {
            checkpoint: *ckpt,
            path: dst.to_path_buf(),
            mode: c.mode(),
            dirs: dirs.len() as u64,
            files: files.into_inner(),
            bytes: c.bytes.load(Ordering::Relaxed),
            xattr_failures: c.xattr_failures.load(Ordering::Relaxed),
            owner_failures: c.owner_failures.load(Ordering::Relaxed),
            skipped: skipped.into_inner().unwrap_or_else(|p| p.into_inner()),
            elapsed_ms: start.elapsed().as_secs_f64() * 1000.0,
        }
        .with_cache(cache))
    })();
    if result.is_err()
        && let Err(e) = std::fs::remove_dir_all(dst)
    {
        tracing::warn!(path = %dst.display(), error = %e, "could not remove partial restore");
    }
    result
}

impl RestoreReport {
    fn with_cache(self, c: StatCache) -> (RestoreReport, StatCache) {
        (self, c)
    }
}

/// Materializes checkpoint `ckpt` into the new directory `dst` and records it as a workspace
/// descended from that checkpoint.
pub fn restore(repo: &dyn Repo, ckpt: &Id, dst: &Path) -> Result<RestoreReport> {
    restore_as(repo, ckpt, dst, "restore")
}

/// Held while an offspring list is read and written back: restores of one checkpoint run in
/// parallel (fork -n N), each adding itself to the list it read.
static OFFSPRING: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn restore_as(repo: &dyn Repo, ckpt: &Id, dst: &Path, kind: &str) -> Result<RestoreReport> {
    let target = canonical_new(dst)?;
    let (report, cache) = materialize(repo, ckpt, &target)?;
    let t = Instant::now();
    // The new tree's stat cache, its record and the checkpoint's offspring list: one commit.
    let mut tx = repo.begin()?;
    save_cache(repo, &mut *tx, &target, &cache)?;
    let record = WorkspaceRecord {
        path: target.to_string_lossy().into_owned(),
        head: Some(ckpt.hex()),
        events: vec![Event { kind: kind.into(), checkpoint: ckpt.hex(), time: now(), message: None }],
    };
    tx.meta_put(&record_key(&target), &json_bytes("workspace record", &record)?);
    let _one_at_a_time = OFFSPRING.lock().unwrap_or_else(|p| p.into_inner());
    let key = format!("fsfork/offspring/{}", ckpt.hex());
    let mut list: Vec<Offspring> = load_json(repo, &key)?;
    list.push(Offspring { path: target.to_string_lossy().into_owned(), kind: kind.into(), time: now() });
    tx.meta_put(&key, &json_bytes("offspring", &list)?);
    tx.commit()?;
    tracing::debug!(ms = t.elapsed().as_secs_f64() * 1e3, "restore: cache and records committed");
    Ok(report)
}

/// Forgets the workspace at `dir` (about to be deleted, or gone): its record, its stat cache
/// and its entries in the offspring lists of the checkpoints it was made from, in one commit.
/// Its checkpoints stay (refs keep them). Returns the path it forgot. Without this, every
/// restore and fork that is later removed would leave metadata behind for good, and each
/// offspring list, read and rewritten whole by every restore of its checkpoint, would grow
/// without end.
pub fn forget(repo: &dyn Repo, dir: &Path) -> Result<PathBuf> {
    // A tree already gone is named as it was recorded: its parent resolved, or absolute.
    let ws = std::fs::canonicalize(dir)
        .or_else(|_| canonical_new(dir))
        .or_else(|_| std::path::absolute(dir).ctx("resolve", dir))?;
    let record = workspace_record(repo, &ws)?;
    let mut tx = repo.begin()?;
    tx.meta_delete(&record_key(&ws));
    for (k, _) in repo.meta_list(&cache_prefix(&ws))? {
        tx.meta_delete(&k);
    }
    tx.meta_delete(&legacy_cache_key(&ws));
    let _one_at_a_time = OFFSPRING.lock().unwrap_or_else(|p| p.into_inner());
    let made_from: HashSet<&str> = record
        .events
        .iter()
        .filter(|e| e.kind == "restore" || e.kind == "fork")
        .map(|e| e.checkpoint.as_str())
        .collect();
    for ckpt in made_from {
        let key = format!("fsfork/offspring/{ckpt}");
        let mut list: Vec<Offspring> = load_json(repo, &key)?;
        let before = list.len();
        list.retain(|o| Path::new(&o.path) != ws);
        if list.is_empty() {
            tx.meta_delete(&key);
        } else if list.len() != before {
            tx.meta_put(&key, &json_bytes("offspring", &list)?);
        }
    }
    tx.commit()?;
    Ok(ws)
}

/// Forgets (see [`forget`]) every recorded workspace whose directory is gone: trees removed by
/// hand (`rm -rf` of a fork) rather than through the engine. With `dry_run`, only lists them.
/// A directory that cannot be told gone (a permission error on its parent, say) is kept; so
/// is a record whose path is not valid UTF-8 (its stored path is lossy). Returns the paths.
pub fn prune(repo: &dyn Repo, dry_run: bool) -> Result<Vec<PathBuf>> {
    let mut gone = Vec::new();
    for (key, bytes) in repo.meta_list(RECORD_PREFIX)? {
        let Ok(record) = serde_json::from_slice::<WorkspaceRecord>(&bytes) else {
            tracing::warn!(key, "unreadable workspace record; kept");
            continue;
        };
        let path = PathBuf::from(&record.path);
        if key != record_key(&path) {
            tracing::warn!(key, path = %path.display(), "a workspace record whose path is not UTF-8; kept");
            continue;
        }
        if matches!(std::fs::symlink_metadata(&path), Err(e) if e.kind() == std::io::ErrorKind::NotFound) {
            gone.push(path);
        }
    }
    if !dry_run {
        for path in &gone {
            forget(repo, path)?;
        }
    }
    Ok(gone)
}

/// Makes one independent copy of a checkpoint at the new directory `dst`, recorded as a fork.
pub fn fork_one(repo: &dyn Repo, ckpt: &Id, dst: &Path) -> Result<RestoreReport> {
    restore_as(repo, ckpt, dst, "fork")
}

/// Makes `n` independent copies of a checkpoint as `into/fork-1` .. `into/fork-N` (`into` is
/// created if missing).
pub fn fork(repo: &dyn Repo, ckpt: &Id, n: usize, into: &Path) -> Result<Vec<RestoreReport>> {
    std::fs::create_dir_all(into).ctx("create", into)?;
    let mut out = Vec::with_capacity(n);
    for i in 1..=n {
        out.push(fork_one(repo, ckpt, &into.join(format!("fork-{i}")))?);
    }
    Ok(out)
}

/// What a revert did.
#[derive(Clone, Debug, Serialize)]
pub struct RevertReport {
    /// The checkpoint the workspace was put back to.
    pub checkpoint: Id,
    /// The checkpoint its record named before (for [`undo_revert`]).
    pub previous_head: Option<String>,
    /// The workspace.
    pub path: PathBuf,
    /// Where the previous tree now is, until it is removed.
    pub old_tree: PathBuf,
    /// How file contents got there.
    pub mode: CopyMode,
    /// Extended attributes that could not be set.
    pub xattr_failures: u64,
    /// Entries that keep this process's owner: only root may give files away.
    pub owner_failures: u64,
    /// Entries that could not be created.
    pub skipped: Vec<Skipped>,
    /// Time to build the new tree beside the old one (ms).
    pub build_ms: f64,
    /// Wall time until the swap (ms).
    pub elapsed_ms: f64,
}

/// Puts the workspace `dir` back to checkpoint `ckpt` atomically: the tree is built beside it
/// and swapped in with one `renameat2(RENAME_EXCHANGE)`, so anyone opening the directory sees
/// either the whole old tree or the whole new one. The old tree is left at
/// [`RevertReport::old_tree`] for the caller to remove (see [`remove_tree_background`]).
pub fn revert(repo: &dyn Repo, dir: &Path, ckpt: &Id) -> Result<RevertReport> {
    let start = Instant::now();
    let ws = canonical(dir)?;
    // Swapping the tree would carry a store kept inside it off to the old tree, to be removed.
    if let Ok(store) = std::fs::canonicalize(repo.root_dir())
        && store.starts_with(&ws)
    {
        return Err(Error::InvalidPath {
            path: ws,
            reason: format!(
                "the store {} is inside this workspace; keep it outside (--store) to revert",
                store.display()
            ),
        });
    }
    // A filesystem mounted inside would move with the old tree, and its files be removed with it.
    if let Some(mount) = sys::mount_points_under(&ws).ctx("read", "/proc/self/mountinfo")?.first() {
        return Err(Error::InvalidPath {
            path: ws,
            reason: format!(
                "{} is a mount point inside this workspace: a revert would move it away with the old tree \
                 and remove its files; unmount it first",
                mount.display()
            ),
        });
    }
    let name =
        ws.file_name().ok_or_else(|| Error::InvalidPath { path: ws.clone(), reason: "cannot revert /".into() })?;
    let parent = ws.parent().unwrap_or(Path::new("/")).to_path_buf();
    let mut side_name = OsStr::new(".").to_os_string();
    side_name.push(name);
    side_name.push(format!(".snapfork-revert-{}-{}", std::process::id(), STAGE_SEQ.fetch_add(1, Ordering::Relaxed)));
    let side = parent.join(&side_name);
    let (report, cache) = materialize(repo, ckpt, &side)?;
    let build_ms = start.elapsed().as_secs_f64() * 1000.0;
    if let Err(e) = exchange(&ws, &side) {
        let _ = std::fs::remove_dir_all(&side);
        return Err(Error::io("exchange", &ws, e));
    }
    let elapsed_ms = start.elapsed().as_secs_f64() * 1000.0;
    let mut previous_head = None;
    // The cache was built while the tree was at `side`; paths are relative, inodes unchanged.
    let recorded = (|| -> Result<()> {
        let mut tx = repo.begin()?;
        save_cache(repo, &mut *tx, &ws, &cache)?;
        let mut record = workspace_record(repo, &ws)?;
        previous_head = record.head.take();
        record.head = Some(ckpt.hex());
        record.events.push(Event { kind: "revert".into(), checkpoint: ckpt.hex(), time: now(), message: None });
        tx.meta_put(&record_key(&ws), &json_bytes("workspace record", &record)?);
        tx.commit()
    })();
    if let Err(e) = recorded {
        // A revert the store does not record is undone: the old tree goes back in place (the
        // same atomic exchange), so that an error means the workspace is as it was.
        return match exchange(&ws, &side) {
            Ok(()) => {
                let _ = std::fs::remove_dir_all(&side);
                Err(e)
            }
            Err(x) => Err(Error::RevertUnrecorded { path: ws, old_tree: side, reason: e.to_string(), source: x }),
        };
    }
    Ok(RevertReport {
        checkpoint: *ckpt,
        previous_head,
        path: ws,
        old_tree: side,
        mode: report.mode,
        xattr_failures: report.xattr_failures,
        owner_failures: report.owner_failures,
        skipped: report.skipped,
        build_ms,
        elapsed_ms,
    })
}

/// Swaps the directories `ws` and `side` (siblings) with one `renameat2(RENAME_EXCHANGE)`, and
/// syncs their parent.
fn exchange(ws: &Path, side: &Path) -> std::io::Result<()> {
    let parent = ws.parent().unwrap_or(Path::new("/"));
    let name = |p: &Path| {
        p.file_name()
            .ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{} has no name", p.display()))
            })
            .and_then(sys::cstr)
    };
    let (a, b) = (name(side)?, name(ws)?);
    let pfd = sys::open_root_dir(parent)?;
    sys::rename_exchange(pfd.as_fd(), &a, pfd.as_fd(), &b)?;
    // Durable before anyone records it: a crash must not leave a record of a swap that did not
    // survive. The swap itself is done, so a failure here is only reported.
    if let Err(e) = sys::fsync(pfd.as_fd()) {
        tracing::warn!(dir = %parent.display(), "cannot sync a tree swap: {e}");
    }
    Ok(())
}

/// Undoes a [`revert`] that its caller could not carry through (the sandbox it was for could
/// not be started on it): the old tree is exchanged back into place (the same atomic swap, so a
/// reader sees one whole tree or the other), the reverted one is removed, and the workspace's
/// record names its previous head again, without the revert. Its stat cache needs nothing: its
/// entries name the reverted tree's inodes, so they only miss.
pub fn undo_revert(repo: &dyn Repo, report: &RevertReport) -> Result<()> {
    let ws = &report.path;
    exchange(ws, &report.old_tree).map_err(|source| Error::RevertUnrecorded {
        path: ws.clone(),
        old_tree: report.old_tree.clone(),
        reason: "the revert was to be undone".into(),
        source,
    })?;
    drop(remove_tree_background(report.old_tree.clone()));
    let mut record = workspace_record(repo, ws)?;
    if record.events.last().is_some_and(|e| e.kind == "revert" && e.checkpoint == report.checkpoint.hex()) {
        record.events.pop();
    }
    record.head = report.previous_head.clone();
    repo.meta_put(&record_key(ws), &json_bytes("workspace record", &record)?)
}

/// Removes a tree on another thread (symlinks are removed, never followed).
pub fn remove_tree_background(path: PathBuf) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        if let Err(e) = std::fs::remove_dir_all(&path) {
            tracing::warn!(path = %path.display(), error = %e, "could not remove old tree");
        }
    })
}

/// One side of a diff, flattened: relative path to entry.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Flat {
    kind: Kind,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    id: Option<Id>,
    target: Vec<u8>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// One side of a diff: a checkpoint or a live directory.
pub enum Side<'a> {
    /// A checkpoint.
    Checkpoint(Id),
    /// A live directory (hashed where its stat cache does not vouch for it).
    Dir(&'a Path),
}

fn flatten_checkpoint(repo: &dyn Repo, id: &Id) -> Result<BTreeMap<Vec<u8>, Flat>> {
    let (_info, dirs) = load_tree(repo, id)?;
    let mut out = BTreeMap::new();
    for d in &dirs {
        for e in &d.entries {
            let rel = d.rel.join(OsStr::from_bytes(&e.name)).into_os_string().into_encoded_bytes();
            out.insert(
                rel,
                Flat {
                    kind: e.kind,
                    mode: e.mode,
                    uid: e.uid,
                    gid: e.gid,
                    size: if e.kind == Kind::Dir { 0 } else { e.size },
                    id: if e.kind == Kind::File { e.link } else { None },
                    target: e.target.clone(),
                    xattrs: e.xattrs.clone(),
                },
            );
        }
    }
    Ok(out)
}

fn flatten_dir(repo: &dyn Repo, dir: &Path) -> Result<BTreeMap<Vec<u8>, Flat>> {
    let ws = canonical(dir)?;
    let cache = load_cache(repo, &ws)?.cache;
    let scan = walk::scan_excluding(&ws, store_key(repo))?;
    let items: Vec<Result<(Vec<u8>, Flat)>> = scan
        .entries
        .par_iter()
        .map(|e| {
            let rel = scan.rel_path(e).into_os_string().into_encoded_bytes();
            let hit = cache.get(&rel).filter(|c| c.matches(&e.meta));
            let p = || ws.join(scan.rel_path(e));
            let sdir = || scan.dir_fd(e.dir).map_err(|x| Error::io("open", p(), x));
            let kind = e.meta.kind();
            let xattrs = match hit {
                Some(h) => h.xattrs.clone(),
                None => xattrs_of(&scan, e, &p)?,
            };
            let id = if kind == Kind::File && e.meta.size > 0 {
                match hit.and_then(|h| h.id) {
                    Some(id) => Some(id),
                    None => {
                        let fd =
                            sys::openat(sdir()?.fd(), &e.name, libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY, 0)
                                .map_err(|x| Error::io("open", p(), x))?;
                        Some(Id(hash::hash_file(fd.as_fd(), e.meta.size).map_err(|x| Error::io("hash", p(), x))?.id))
                    }
                }
            } else {
                None
            };
            let target = if kind == Kind::Symlink {
                sys::readlinkat(sdir()?.fd(), &e.name).map_err(|x| Error::io("readlink", p(), x))?.into_encoded_bytes()
            } else {
                Vec::new()
            };
            Ok((
                rel,
                Flat {
                    kind,
                    mode: e.meta.mode,
                    uid: e.meta.uid,
                    gid: e.meta.gid,
                    size: if kind == Kind::Dir { 0 } else { e.meta.size },
                    id,
                    target,
                    xattrs,
                },
            ))
        })
        .collect();
    items.into_iter().collect()
}

/// A changed attribute of an entry present on both sides.
#[derive(Clone, Debug, Serialize)]
pub struct Change {
    /// Path relative to the tree root (lossy for non-UTF-8 names).
    pub path: String,
    /// What changed: "content", "type", "mode", "owner", "link", "xattrs".
    pub what: Vec<String>,
    /// Human-readable before/after values of the changed attributes.
    pub detail: Vec<String>,
}

/// Differences between two trees.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Diff {
    /// Paths only in B.
    pub added: Vec<String>,
    /// Paths only in A.
    pub removed: Vec<String>,
    /// Paths in both whose content, type, mode, owner, link target or xattrs differ.
    pub changed: Vec<Change>,
}

/// Compares two trees (checkpoints or live directories).
pub fn diff(repo: &dyn Repo, a: Side<'_>, b: Side<'_>) -> Result<Diff> {
    let flat = |s: Side<'_>| match s {
        Side::Checkpoint(id) => flatten_checkpoint(repo, &id),
        Side::Dir(p) => flatten_dir(repo, p),
    };
    let (fa, fb) = (flat(a)?, flat(b)?);
    let lossy = |k: &Vec<u8>| String::from_utf8_lossy(k).into_owned();
    let mut d = Diff::default();
    for (k, va) in &fa {
        match fb.get(k) {
            None => d.removed.push(lossy(k)),
            Some(vb) if vb != va => {
                let mut what = Vec::new();
                let mut detail = Vec::new();
                if va.kind != vb.kind {
                    what.push("type".into());
                    detail.push(format!("type {:?} -> {:?}", va.kind, vb.kind));
                } else {
                    if va.id != vb.id || va.size != vb.size {
                        what.push("content".into());
                        detail.push(format!("size {} -> {}", va.size, vb.size));
                    }
                    if va.target != vb.target {
                        what.push("link".into());
                        detail.push(format!(
                            "link {} -> {}",
                            String::from_utf8_lossy(&va.target),
                            String::from_utf8_lossy(&vb.target)
                        ));
                    }
                }
                if va.mode & 0o7777 != vb.mode & 0o7777 {
                    what.push("mode".into());
                    detail.push(format!("mode {:o} -> {:o}", va.mode & 0o7777, vb.mode & 0o7777));
                }
                if (va.uid, va.gid) != (vb.uid, vb.gid) {
                    what.push("owner".into());
                    detail.push(format!("owner {}:{} -> {}:{}", va.uid, va.gid, vb.uid, vb.gid));
                }
                if va.xattrs != vb.xattrs {
                    what.push("xattrs".into());
                }
                if !what.is_empty() {
                    d.changed.push(Change { path: lossy(k), what, detail });
                }
            }
            Some(_) => {}
        }
    }
    for k in fb.keys() {
        if !fa.contains_key(k) {
            d.added.push(lossy(k));
        }
    }
    Ok(d)
}

/// One node of a workspace's history.
#[derive(Clone, Debug, Serialize)]
pub struct LogEntry {
    /// "checkpoint", "revert", "restore" or "fork".
    pub kind: String,
    /// The checkpoint (hex).
    pub checkpoint: String,
    /// Its parent checkpoint (for checkpoints).
    pub parent: Option<String>,
    /// Its message (for checkpoints).
    pub message: Option<String>,
    /// Seconds since the epoch.
    pub time: f64,
    /// Trees forked or restored from this checkpoint.
    pub offspring: Vec<Offspring>,
}

/// The history of a workspace: where it came from, its checkpoints and reverts, and the trees
/// forked from each checkpoint.
pub fn log(repo: &dyn Repo, dir: &Path) -> Result<(WorkspaceRecord, Vec<LogEntry>)> {
    let ws = canonical(dir)?;
    let record = workspace_record(repo, &ws)?;
    let mut out = Vec::new();
    for ev in &record.events {
        let id = Id::from_hex(&ev.checkpoint);
        let (parent, message) = match (ev.kind.as_str(), id) {
            ("checkpoint", Some(id)) => match checkpoint_info(repo, &id) {
                Ok(info) => (info.parent, info.message),
                Err(_) => (None, ev.message.clone()),
            },
            _ => (None, None),
        };
        let offspring = match (ev.kind.as_str(), id) {
            ("checkpoint", Some(id)) => offspring(repo, &id)?,
            _ => Vec::new(),
        };
        out.push(LogEntry {
            kind: ev.kind.clone(),
            checkpoint: ev.checkpoint.clone(),
            parent,
            message,
            time: ev.time,
            offspring,
        });
    }
    Ok((record, out))
}

#[cfg(all(test, feature = "testfs"))]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;
    use crate::testfs::{FsType, TestFs, require_root};

    /// A source written after its reflink into staging: the hash is always the copy's bytes,
    /// whatever the source's page cache held when it was read.
    #[test]
    fn hash_via_source_returns_the_copys_bytes() {
        if !require_root("hash_via_source_returns_the_copys_bytes") {
            return;
        }
        let fs = TestFs::new(FsType::Xfs, 512).unwrap();
        let len = 8u64 << 20;
        let mut data: Vec<u8> = (0..len).map(|i| (i * 31 + i / 4099) as u8).collect();
        let open = |name: &str| {
            std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(fs.path().join(name))
        };
        let old = open("old").unwrap();
        old.write_all_at(&data, 0).unwrap();
        old.sync_all().unwrap();
        let old_hash = hash::hash_file(old.as_fd(), len).unwrap();
        let src = open("src").unwrap();
        sys::ficlone(src.as_fd(), old.as_fd()).unwrap();
        // Changed since the previous object: blocks 5 and 77.
        for (off, bytes) in [(5 * hash::BLOCK + 100, b"edit"), (77 * hash::BLOCK, b"more")] {
            src.write_all_at(bytes, off).unwrap();
            data[off as usize..off as usize + 4].copy_from_slice(bytes);
        }
        let staged = open("staged").unwrap();
        sys::ficlone(staged.as_fd(), src.as_fd()).unwrap();
        let expected = *blake3::hash(&data).as_bytes();
        // Written after the reflink: one block that is read from the source, one that is not.
        src.write_all_at(b"later", 5 * hash::BLOCK + 200).unwrap();
        src.write_all_at(b"later", 300 * hash::BLOCK).unwrap();
        let staged_ext = sys::fiemap(staged.as_fd(), false).unwrap();
        let old_ext = sys::fiemap(old.as_fd(), false).unwrap();
        let same = hash::same_blocks_from_extents(&staged_ext, len, &old_ext, len);
        assert_eq!(same.iter().filter(|s| !**s).count(), 2);
        let cvs = old_hash.cvs.unwrap();
        let prev = Previous { len, cvs: &cvs, same: &same };
        let (h, from_source) = hash_via_source(src.as_fd(), staged.as_fd(), len, &staged_ext, &prev).unwrap();
        assert_eq!(h.id, expected, "the hash must be the staged copy's");
        assert_eq!(from_source, 2 * hash::BLOCK);
        // Block 5 was read again from the copy.
        assert_eq!(h.hashed_bytes, 3 * hash::BLOCK);
    }
    /// A file that grows or shrinks between the walk's fstat and its reflink into staging is
    /// recorded as the staged copy holds it: the object's id is the hash of all its bytes.
    #[test]
    fn a_file_that_changes_length_before_staging_is_recorded_as_staged() {
        if !require_root("a_file_that_changes_length_before_staging_is_recorded_as_staged") {
            return;
        }
        let fs = TestFs::new(FsType::Xfs, 512).unwrap();
        let store = snapfork_store::Store::open(fs.path().join("store"), Default::default()).unwrap();
        let repo: &dyn Repo = &store;
        let staging = repo.staging_dir();
        std::fs::create_dir_all(&staging).unwrap();
        let sdir = sys::open_root_dir(&staging).unwrap();
        let seen = 64 << 10;
        for (name, len) in [("grown", seen + 8192), ("shrunk", seen - 5000)] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 251) as u8).collect();
            let path = fs.path().join(name);
            std::fs::write(&path, &data).unwrap();
            let src: OwnedFd = std::fs::File::open(&path).unwrap().into();
            // `seen` is the size the walk read before the file changed.
            let (staged, id, _, _, size) =
                stage_and_hash(repo, (&staging, sdir.as_fd()), &src, seen as u64, None, &Counters::default()).unwrap();
            assert_eq!(size, len as u64, "{name}: the recorded size is the staged copy's");
            assert_eq!(std::fs::metadata(&staged).unwrap().len(), len as u64);
            assert_eq!(id.0, *blake3::hash(&data).as_bytes(), "{name}: the id is the hash of every staged byte");
            std::fs::remove_file(staged).unwrap();
        }
    }
}

#[cfg(test)]
mod cv_tests {
    use super::*;

    fn cvs(n: usize, seed: u8) -> Vec<ChainingValue> {
        (0..n).map(|i| [(i as u8).wrapping_mul(seed); 32]).collect()
    }

    /// Deltas chain back to a full record, stop at MAX_CV_DEPTH, and a damaged one is ignored.
    #[test]
    fn cv_deltas_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let store = snapfork_store::Store::open(dir.path().join("s"), snapfork_store::OpenOptions::default()).unwrap();
        let repo: &dyn Repo = &store;
        let mut prev: Option<(Id, Vec<ChainingValue>, u8)> = None;
        let mut all = Vec::new();
        for k in 0..(MAX_CV_DEPTH as usize + 3) {
            let id = Id([k as u8 + 1; 32]);
            let mut new = prev.as_ref().map(|p| p.1.clone()).unwrap_or_else(|| cvs(1000, 3));
            new[k * 7] = [0xee; 32];
            if k == 2 {
                new.push([0xaa; 32]);
            }
            let (delta, rec) = cv_record(&new, prev.as_ref().map(|(i, c, d)| (i, c.as_slice(), *d)));
            let expect_delta = prev.as_ref().is_some_and(|p| p.2 < MAX_CV_DEPTH);
            assert_eq!(delta, expect_delta, "record {k}");
            repo.meta_put(&if delta { cvd_key(&id) } else { cvs_key(&id) }, &rec).unwrap();
            let (back, depth) = load_cvs(repo, &id).unwrap();
            assert_eq!(back, new, "record {k}");
            assert!(depth <= MAX_CV_DEPTH);
            all.push(id);
            prev = Some((id, new, depth));
        }
        // A delta whose base is gone, or that is damaged, gives nothing.
        let (_, rec) = cv_record(&prev.as_ref().unwrap().1, Some((&Id([0x77; 32]), &cvs(1000, 3), 0)));
        repo.meta_put(&cvd_key(&Id([0x55; 32])), &rec).unwrap();
        assert!(load_cvs(repo, &Id([0x55; 32])).is_none());
        repo.meta_put(&cvd_key(&Id([0x56; 32])), &rec[..rec.len() - 1]).unwrap();
        assert!(load_cvs(repo, &Id([0x56; 32])).is_none());
    }
}
