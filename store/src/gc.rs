//! Garbage collection: mark what refs reach, sweep the rest, rewrite sparse packs.
//!
//! Safe while transactions run in this process: gc holds the commit lock from its mark to the end
//! of its sweep (ingests keep writing; their hashing of a batch and their final commit wait),
//! keeps the closure of every id a transaction has pinned (dedup hits, parents), and never
//! touches packs a transaction is writing. The rewrite of sparse packs, which copies data and
//! takes long, runs without it and takes it again only to point the index at the copies (see
//! `rewrite_packs`). One gc runs at a time. Pack files, file objects and staged files that no
//! index entry names (the remains of a killed process, or of a removal that failed) are removed
//! once older than the grace period.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::Path;
use std::time::{Duration, SystemTime};

use rocksdb::WriteBatch;
use serde::Serialize;

use crate::error::{IoContext, Result};
use crate::hash::Hash;
use crate::image::Progress;
use crate::node::Node;
use crate::pack::{FILE_MAGIC, Location, PackWriter, RECORD_HEADER, pack_path, parse_pack_name};
use crate::store::{Store, key, sync_dir};

/// How to collect.
#[derive(Clone)]
pub struct GcOptions {
    /// Report what would go; change nothing.
    pub dry_run: bool,
    /// Unreferenced pack and staged files younger than this are kept: they may belong to an
    /// ingest that has not committed yet. Object files that the index does not name are kept as
    /// long, as a margin (gc never sees one that a commit of this process is still indexing).
    pub grace: Duration,
    /// Packs whose live fraction falls below this are rewritten.
    pub repack_below: f64,
    /// Called with the pack bytes copied as sparse packs are rewritten (the long part of a gc).
    pub progress: Option<Progress>,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions { dry_run: false, grace: Duration::from_secs(3600), repack_below: 0.5, progress: None }
    }
}

impl std::fmt::Debug for GcOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GcOptions")
            .field("dry_run", &self.dry_run)
            .field("grace", &self.grace)
            .field("repack_below", &self.repack_below)
            .field("progress", &self.progress.is_some())
            .finish()
    }
}

/// What gc did (or, with `dry_run`, would do).
#[derive(Clone, Debug, Default, Serialize)]
pub struct GcReport {
    /// True when nothing was changed.
    pub dry_run: bool,
    /// Refs (roots) followed.
    pub roots: u64,
    /// Objects reachable from them (chunks and file objects).
    pub live_objects: u64,
    /// Chunks removed from the index.
    pub removed_chunks: u64,
    /// Their stored bytes.
    pub removed_chunk_bytes: u64,
    /// File objects removed.
    pub removed_files: u64,
    /// Their bytes.
    pub removed_file_bytes: u64,
    /// Files in the object directory that no index entry names (a commit killed between moving
    /// them into place and indexing them, or a dead file object whose removal failed), removed
    /// because they were older than the grace period.
    pub orphaned_files: u64,
    /// Their bytes.
    pub orphaned_file_bytes: u64,
    /// Packs rewritten because most of them was dead.
    pub repacked: u64,
    /// Pack files deleted (emptied, rewritten or orphaned).
    pub removed_packs: u64,
    /// Pack bytes on disk before and after.
    pub pack_bytes_before: u64,
    /// Pack bytes on disk after (or as they would be).
    pub pack_bytes_after: u64,
    /// Attached refs and meta entries removed with their owner (see [`attached_name`]).
    pub removed_attached: u64,
    /// Packs that were due for a rewrite but kept: their live bytes did not fit in the free
    /// space beyond [`crate::OpenOptions::min_free_bytes`] (a later gc, with room, rewrites them).
    pub repacks_skipped_for_space: u64,
}

/// How old a staging entry of this very process must be before gc takes it for a leftover.
pub const OWN_STAGING_GRACE: Duration = Duration::from_secs(24 * 3600);

/// How long ago `meta`'s file last changed: the later of its modification and its status
/// change time. A file object keeps the modification time of the file it was made from (a
/// checkpointed file may be years old), while the move into `objects/` updates its ctime, so
/// the ctime is what says how recently it arrived. A time in the future counts as now.
fn age(meta: &fs::Metadata) -> Duration {
    use std::os::unix::fs::MetadataExt;
    let ctime = u64::try_from(meta.ctime()).ok().and_then(|s| {
        SystemTime::UNIX_EPOCH.checked_add(Duration::new(s, meta.ctime_nsec().clamp(0, 999_999_999) as u32))
    });
    let changed = meta.modified().ok().into_iter().chain(ctime).max().unwrap_or_else(SystemTime::now);
    SystemTime::now().duration_since(changed).unwrap_or_default()
}

/// The prefix of attached names: see [`attached_name`].
pub const ATTACHED: &str = "attached/";

/// The name of an entry attached to object `owner`: a ref or meta key `attached/<owner hex>/<what>`.
///
/// An attached entry describes its owner (the working set recorded for an image, the block
/// hashes of a file object) and lives exactly as long as the owner does: an attached ref is not
/// a gc root of its own (its target is kept while the owner is reachable), and gc deletes
/// attached refs and meta entries whose owner it removes.
pub fn attached_name(owner: &Hash, what: &str) -> String {
    format!("{ATTACHED}{}/{what}", owner.to_hex())
}

/// The owner named by an attached ref or meta key, if `name` is one.
fn attached_owner(name: &str) -> Option<Hash> {
    let hex = name.strip_prefix(ATTACHED)?.split('/').next()?;
    hex.parse().ok()
}

impl Store {
    /// Every object reachable from `roots` (chunk ids and file object ids).
    pub(crate) fn reachable(&self, roots: impl IntoIterator<Item = Hash>, marked: &mut HashSet<Hash>) -> Result<()> {
        let mut stack: Vec<Hash> = roots.into_iter().filter(|h| !h.is_zero()).collect();
        while let Some(id) = stack.pop() {
            if !marked.insert(id) {
                continue;
            }
            if let Some(loc) = self.location(&id)?
                && loc.is_node
            {
                let node = Node::decode(&self.get_chunk(&id)?, &|| format!("node {id}"))?;
                stack.extend(node.links.into_iter().filter(|h| !h.is_zero() && !marked.contains(h)));
            }
        }
        Ok(())
    }

    /// Collects garbage (see the module docs).
    pub fn gc(&self, opts: &GcOptions) -> Result<GcReport> {
        if self.is_read_only() && !opts.dry_run {
            return Err(crate::Error::ReadOnly);
        }
        let mut report = GcReport { dry_run: opts.dry_run, ..GcReport::default() };
        let _one_gc = self.inner.gc_lock.lock().unwrap_or_else(|e| e.into_inner());
        let commits = self.inner.commit_lock.write().unwrap_or_else(|e| e.into_inner());

        // Mark.
        let (attached, refs): (Vec<_>, Vec<_>) =
            self.list_refs("")?.into_iter().partition(|(name, _)| attached_owner(name).is_some());
        report.roots = refs.len() as u64;
        let mut marked = HashSet::new();
        self.reachable(refs.iter().map(|(_, h)| *h), &mut marked)?;

        // Sweep, holding the pin table so no transaction can start relying on what we remove.
        let pins = self.inner.pins.lock().unwrap_or_else(|e| e.into_inner());
        let pinned: Vec<Hash> = pins.keys().copied().collect();
        self.reachable(pinned, &mut marked)?;
        let mut batch = WriteBatch::default();
        // Attached refs keep their targets while their owners live (an attached target may own
        // attached refs in turn: repeat until nothing new is reached); the others go.
        let mut pending = attached;
        loop {
            let (live, waiting): (Vec<_>, Vec<_>) =
                pending.into_iter().partition(|(name, _)| attached_owner(name).is_some_and(|o| marked.contains(&o)));
            if live.is_empty() {
                for (name, _) in &waiting {
                    report.removed_attached += 1;
                    batch.delete(key::named(key::REF, name));
                }
                break;
            }
            self.reachable(live.iter().map(|(_, h)| *h), &mut marked)?;
            pending = waiting;
        }
        for (name, _) in self.meta_list(ATTACHED)? {
            if attached_owner(&name).is_some_and(|o| !marked.contains(&o)) {
                report.removed_attached += 1;
                batch.delete(key::named(key::META, &name));
            }
        }
        report.live_objects = marked.len() as u64;
        let mut live_per_pack: HashMap<u32, u64> = HashMap::new();
        let mut live_locs: HashMap<u32, Vec<(Hash, Location)>> = HashMap::new();
        let mut indexed_packs = HashSet::new();
        self.scan(key::CHUNK, |k, v| {
            let (Some(id), Some(loc)) = (Hash::from_slice(k), Location::decode(v)) else {
                return Ok(());
            };
            indexed_packs.insert(loc.pack);
            if marked.contains(&id) {
                *live_per_pack.entry(loc.pack).or_default() += RECORD_HEADER + u64::from(loc.stored_len);
                live_locs.entry(loc.pack).or_default().push((id, loc));
            } else {
                report.removed_chunks += 1;
                report.removed_chunk_bytes += u64::from(loc.stored_len);
                batch.delete(key::id(key::CHUNK, &id));
            }
            Ok(())
        })?;
        let mut dead_files = Vec::new();
        let mut indexed_files = HashSet::new();
        self.scan(key::FILE, |k, v| {
            let Some(id) = Hash::from_slice(k) else {
                return Ok(());
            };
            indexed_files.insert(id);
            if !marked.contains(&id) {
                report.removed_files += 1;
                report.removed_file_bytes += v.get(..8).and_then(|b| b.try_into().ok()).map_or(0, u64::from_le_bytes);
                batch.delete(key::id(key::FILE, &id));
                dead_files.push(id);
            }
            Ok(())
        })?;
        if !opts.dry_run {
            self.write_batch(batch)?;
        }
        drop(pins);
        if !opts.dry_run {
            for id in &dead_files {
                let path = self.file_object_path(id);
                if let Err(e) = fs::remove_file(&path) {
                    tracing::warn!(path = %path.display(), error = %e, "could not remove a dead file object");
                }
            }
        }
        self.sweep_orphaned_files(&indexed_files, &marked, opts, &mut report);

        // Packs: delete the dead now, plan the rewrite of the sparse. Both are decided under the
        // commit lock: a pack that a commit indexes after the scan above would look dead.
        // Asked afresh for each pack: one a transaction starts meanwhile is active (registered
        // before its file exists) and must not be taken for an abandoned one.
        let is_active = |n: &u32| self.inner.active_packs.lock().unwrap_or_else(|e| e.into_inner()).contains(n);
        let packs_dir = self.packs_dir();
        // Rewriting needs room for the live bytes first; what does not fit beyond the store's
        // reserve waits for a later gc (deleting dead packs needs none).
        let mut room = crate::pack::free_bytes(&packs_dir)?.saturating_sub(self.inner.min_free);
        let mut dead_packs = Vec::new();
        let mut rewrite: Vec<(u32, Vec<(Hash, Location)>)> = Vec::new();
        for entry in fs::read_dir(&packs_dir).ctx(|| format!("list {}", packs_dir.display()))? {
            let entry = entry.ctx(|| format!("list {}", packs_dir.display()))?;
            let Some(n) = entry.file_name().to_str().and_then(parse_pack_name) else {
                continue;
            };
            let meta = entry.metadata().ctx(|| format!("stat {}", entry.path().display()))?;
            report.pack_bytes_before += meta.len();
            if is_active(&n) {
                report.pack_bytes_after += meta.len();
                continue;
            }
            let live = live_per_pack.get(&n).copied().unwrap_or(0);
            let payload = meta.len().saturating_sub(FILE_MAGIC.len() as u64).max(1);
            if live == 0 {
                let age =
                    SystemTime::now().duration_since(meta.modified().unwrap_or(SystemTime::now())).unwrap_or_default();
                // A pack whose chunks all died is garbage; one that the index never named may be
                // an ingest in progress elsewhere, so it gets the grace period.
                if indexed_packs.contains(&n) || age >= opts.grace {
                    dead_packs.push(n);
                    report.removed_packs += 1;
                } else {
                    report.pack_bytes_after += meta.len();
                }
                continue;
            }
            if (live as f64) / (payload as f64) < opts.repack_below {
                if live > room {
                    report.repacks_skipped_for_space += 1;
                    report.pack_bytes_after += meta.len();
                    continue;
                }
                room -= live;
                report.repacked += 1;
                report.removed_packs += 1;
                report.pack_bytes_after += live;
                rewrite.push((n, live_locs.remove(&n).unwrap_or_default()));
            } else {
                report.pack_bytes_after += meta.len();
            }
        }
        if !rewrite.is_empty() {
            report.pack_bytes_after += FILE_MAGIC.len() as u64;
        }
        if opts.dry_run {
            return Ok(report);
        }
        self.remove_packs(&dead_packs)?;
        self.clean_staging(opts.grace)?;
        drop(commits);
        if !rewrite.is_empty() {
            self.rewrite_packs(rewrite, opts.progress.as_ref())?;
        }
        Ok(report)
    }

    /// Copies the live chunks of the packs in `rewrite` into one new pack, points the index at
    /// the copies, and deletes the old packs.
    ///
    /// The copy runs without the commit lock, so ingests and commits go on meanwhile (a paused
    /// VM waiting for its checkpoint to commit is not kept waiting for gc). That is safe because
    /// nothing else writes to these packs: they are not active, nothing can index a new chunk
    /// into them, and only this gc (it holds the gc lock) moves or removes chunks. A commit may
    /// index one of their chunks afresh elsewhere meanwhile (a transaction that wrote the same
    /// page before it could see ours): the index then keeps that entry, and our copy of it is
    /// garbage for a later gc. Readers that looked a chunk up before the move and read after
    /// the old pack went look it up again (see `read_found`).
    fn rewrite_packs(&self, rewrite: Vec<(u32, Vec<(Hash, Location)>)>, progress: Option<&Progress>) -> Result<()> {
        let packs_dir = self.packs_dir();
        let mut out = RepackOutput::create(self, &packs_dir)?;
        let mut moved = Vec::new();
        for (_, locs) in &rewrite {
            for (id, loc) in locs {
                let mut payload = vec![0u8; loc.stored_len as usize];
                self.inner.packs.read_at(loc.pack, loc.offset, &mut payload)?;
                let new = out.writer.append(id, loc.is_node, loc.codec, loc.raw_len, &payload)?;
                moved.push((*id, *loc, new));
                if let Some(p) = progress {
                    p(RECORD_HEADER + u64::from(loc.stored_len));
                }
            }
        }
        out.writer.sync()?;
        sync_dir(&packs_dir)?;
        let _commits = self.inner.commit_lock.write().unwrap_or_else(|e| e.into_inner());
        let mut batch = WriteBatch::default();
        for (id, old, new) in &moved {
            if self.location(id)? == Some(*old) {
                batch.put(key::id(key::CHUNK, id), new.encode());
            }
        }
        self.write_batch(batch)?;
        out.done();
        let old: Vec<u32> = rewrite.iter().map(|(n, _)| *n).collect();
        self.remove_packs(&old)
    }

    /// Deletes packs that no index entry names, durably.
    fn remove_packs(&self, packs: &[u32]) -> Result<()> {
        if packs.is_empty() {
            return Ok(());
        }
        let packs_dir = self.packs_dir();
        for &n in packs {
            let path = pack_path(&packs_dir, n);
            fs::remove_file(&path).ctx(|| format!("remove {}", path.display()))?;
            self.inner.packs.forget(n);
        }
        sync_dir(&packs_dir)
    }

    /// Removes (with `dry_run`, only counts) the files under `objects/` that no `f` index entry
    /// names and nothing reaches, once older than `opts.grace`. `indexed` holds every file object
    /// the index named when gc scanned it (dead ones included: this gc removes those itself).
    ///
    /// Called with the commit lock held exclusively, which is what makes "unindexed" mean
    /// "abandoned": [`Txn::commit`](crate::Txn::commit) holds it shared from before it moves its
    /// file objects into `objects/` until its index batch is written, so no commit of this
    /// process is between the two while we look, and a commit waiting for the lock moves its
    /// files (over any orphan of the same id: a rename replaces it) and indexes them after we
    /// are done. Files a transaction has only staged are in `staging/`, not here. No other
    /// process writes the store meanwhile: a writer holds `DIR/lock` (see `lock.rs`) for as
    /// long as it has the store open, and read-only openers never write `objects/` (a gc of
    /// one is a dry run: beside a live writer it may count a file that writer is indexing, but
    /// removes nothing). So an unindexed object file was left by a writer that died or failed
    /// between the move and the index batch, or by a failed removal; the grace period is only
    /// a margin on top.
    fn sweep_orphaned_files(
        &self,
        indexed: &HashSet<Hash>,
        marked: &HashSet<Hash>,
        opts: &GcOptions,
        report: &mut GcReport,
    ) {
        // Cleaning up after a crash is best effort: a directory that cannot be listed is
        // logged and skipped rather than failing the gc whose sweep has already committed.
        let list = |dir: &Path| match fs::read_dir(dir) {
            Ok(entries) => entries.filter_map(|e| e.ok()).collect(),
            Err(e) => {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %dir.display(), error = %e, "could not list for orphaned file objects");
                }
                Vec::new()
            }
        };
        for fan in list(&self.dir().join("objects")) {
            let Some(prefix) = fan.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if prefix.len() != 2 || !fan.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            for entry in list(&fan.path()) {
                // Only names that are exactly where `file_object_path` puts an id are ours:
                // anything else (a temporary file of some tool, a name in upper case) stays.
                let Some(id) = entry
                    .file_name()
                    .to_str()
                    .and_then(|rest| format!("{prefix}{rest}").parse::<Hash>().ok())
                    .filter(|id| self.file_object_path(id) == entry.path())
                else {
                    continue;
                };
                if indexed.contains(&id) {
                    continue;
                }
                let path = entry.path();
                if marked.contains(&id) {
                    // Something refers to it (a ref, or a transaction that is adopting the same
                    // content and will move its own copy over it): never ours to delete.
                    tracing::warn!(path = %path.display(), "kept a file object that the index does not name: something refers to it");
                    continue;
                }
                // DirEntry::metadata does not follow a symlink: the entry itself is judged.
                let Ok(meta) = entry.metadata() else {
                    continue;
                };
                if meta.is_dir() || age(&meta) < opts.grace {
                    continue;
                }
                if !opts.dry_run
                    && let Err(e) = fs::remove_file(&path)
                {
                    tracing::warn!(path = %path.display(), error = %e, "could not remove an orphaned file object");
                    continue;
                }
                tracing::info!(path = %path.display(), bytes = meta.len(), dry_run = opts.dry_run, "orphaned file object");
                report.orphaned_files += 1;
                report.orphaned_file_bytes += meta.len();
            }
        }
    }

    /// Removes staged files older than `grace` (files prepared for transactions that never
    /// committed, leftover index table files).
    ///
    /// Only the writer stages, and gc runs in the writer: an entry whose name carries this
    /// process's pid (`fsfork-PID-N`, `import-PID-MS`, `index-PID-N.sst`) may belong to an
    /// operation still under way, and goes only once older than [`OWN_STAGING_GRACE`] (one that
    /// failed without cleaning up). Those of earlier writers go after `grace`. Age counts from
    /// the later of mtime and ctime: a staged copy may keep its source's old mtime.
    fn clean_staging(&self, grace: Duration) -> Result<()> {
        let staging = self.staging_dir();
        let Ok(entries) = fs::read_dir(&staging) else {
            return Ok(());
        };
        let me = std::process::id().to_string();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let ours = name.to_str().and_then(|n| n.split('-').nth(1)).is_some_and(|pid| pid == me);
            let wait = if ours { grace.max(OWN_STAGING_GRACE) } else { grace };
            let old = entry.metadata().ok().is_some_and(|m| age(&m) >= wait);
            if old {
                let path = entry.path();
                let result = if path.is_dir() { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
                if let Err(e) = result {
                    tracing::warn!(path = %path.display(), error = %e, "could not clean staging");
                }
            }
        }
        Ok(())
    }
}

/// The pack a gc rewrites live chunks into: active while it is written (no other gc or scan
/// takes it for abandoned), and deleted again unless [`RepackOutput::done`] says the index
/// names it.
struct RepackOutput<'a> {
    store: &'a Store,
    writer: PackWriter,
    indexed: bool,
}

impl<'a> RepackOutput<'a> {
    fn create(store: &'a Store, packs_dir: &Path) -> Result<Self> {
        let number = store.alloc_pack();
        store.inner.active_packs.lock().unwrap_or_else(|e| e.into_inner()).insert(number);
        // No reserve check of its own: gc's plan already keeps the reserve.
        match PackWriter::create(packs_dir, number, 0) {
            Ok(writer) => Ok(RepackOutput { store, writer, indexed: false }),
            Err(e) => {
                store.inner.active_packs.lock().unwrap_or_else(|e| e.into_inner()).remove(&number);
                Err(e)
            }
        }
    }

    /// The index names the pack now: it stays.
    fn done(&mut self) {
        self.indexed = true;
    }
}

impl Drop for RepackOutput<'_> {
    fn drop(&mut self) {
        let n = self.writer.number;
        if !self.indexed {
            let path = pack_path(&self.store.packs_dir(), n);
            if let Err(e) = fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "could not remove the pack of a failed repack");
            }
        }
        self.store.inner.active_packs.lock().unwrap_or_else(|e| e.into_inner()).remove(&n);
    }
}
