//! Images: VM memory files and raw disk images, stored page by page.
//!
//! An image's manifest is a two-level tree of [`Node`]s: a root holding the image's geometry and
//! the ids of its segments, and segments of [`SEGMENT_PAGES`] page ids each ([`Hash::ZERO`] for a
//! zero page, which stores nothing). Two images that share most pages share most segments, so
//! their manifests share most of their bytes, and diffing them compares segment ids first and
//! looks inside only the segments that differ.
//!
//! An image whose size is not a multiple of the page size ends in a short page: its id is the hash
//! of the bytes that exist, and reads return exactly `size` bytes.

use std::collections::HashSet;
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::{Arc, OnceLock, RwLock};

use rayon::prelude::*;
use serde::Serialize;

use crate::error::{Error, IoContext, Result};
use crate::hash::Hash;
use crate::node::{Node, kind};
use crate::pack::{Codec, Location};
use crate::pageset::PageSet;
use crate::store::Store;
use crate::txn::{Txn, compress};

/// Pages per segment: 1024 ids (32 KiB of manifest) describe 4 MiB of 4 KiB pages.
pub const SEGMENT_PAGES: u64 = 1024;
/// The default page size.
pub const DEFAULT_PAGE_SIZE: u32 = 4096;
/// Work is done in batches of about this many bytes, hashed and compressed in parallel.
const BATCH_BYTES: u64 = 8 << 20;
/// An [`ImageReader`] caches where its pages are stored by groups of this many pages (a
/// divisor of [`SEGMENT_PAGES`]).
const LOCATION_GROUP: u64 = 64;
/// A group's locations are loaded (one `multi_get` of its non-zero pages) once the pages read
/// from it by their own lookups, times this, reach its non-zero pages. Ski rental: a key costs
/// about as much in a `multi_get` as alone (3.6-7.2 vs 2.6-5.2 us per key,
/// `lazy-restore/examples/read_pattern`), and a loaded group also lets runs of pages be read with
/// one `pread` per span, so the group is bought once a third of its price has gone on rent.
/// Measured against 8 (which loads groups sooner): a 10% working set read with a fresh reader
/// 13-19 vs 17-19 us per page.
const LOOKUPS_PER_READ: u64 = 3;

/// A progress callback: called with the number of image bytes just processed.
pub type Progress = Arc<dyn Fn(u64) + Send + Sync>;

/// How to ingest an image.
#[derive(Clone, Default)]
pub struct IngestOptions {
    /// Page size in bytes (0 means 4096). A power of two from 512 bytes to 1 GiB; memory files
    /// backed by 2 MiB huge pages use 2097152.
    pub page_size: u32,
    /// The image this one derives from (a previous checkpoint of the same VM).
    pub parent: Option<Hash>,
    /// With `parent`: the pages that may differ from it (a dirty log, the pages a lazy restore
    /// installed). Only these are read and hashed; the others are taken from the parent.
    pub dirty: Option<PageSet>,
    /// With `parent`: the file is a Firecracker diff snapshot, a sparse file holding only the
    /// dirty pages at their offsets; holes mean "as in the parent".
    pub diff_snapshot: bool,
    /// Called as bytes are processed.
    pub progress: Option<Progress>,
}

/// What an ingest produced.
#[derive(Clone, Debug, Serialize)]
pub struct ImageInfo {
    /// The image's id (its root manifest).
    pub id: Hash,
    /// Size in bytes.
    pub size: u64,
    /// Page size in bytes.
    pub page_size: u32,
    /// Number of pages (the last may be short).
    pub pages: u64,
    /// Pages that are all zero.
    pub zero_pages: u64,
    /// Pages read and hashed by this ingest (the rest came from the parent).
    pub hashed_pages: u64,
    /// Pages (chunks) the store did not have before.
    pub new_pages: u64,
    /// Uncompressed bytes of the new pages.
    pub new_raw_bytes: u64,
    /// Bytes the new pages and manifests take in packs.
    pub new_stored_bytes: u64,
    /// Segments taken unchanged from the parent.
    pub reused_segments: u64,
}

/// The root of an image manifest.
#[derive(Clone, Debug)]
pub(crate) struct Root {
    pub page_size: u32,
    pub size: u64,
    pub segments: Vec<Hash>,
}

impl Root {
    fn node(&self) -> Node {
        let mut body = Vec::with_capacity(17);
        body.push(1u8);
        body.extend_from_slice(&self.page_size.to_le_bytes());
        body.extend_from_slice(&self.size.to_le_bytes());
        body.extend_from_slice(&(SEGMENT_PAGES as u32).to_le_bytes());
        Node::new(kind::IMAGE_ROOT, self.segments.clone(), body)
    }

    pub(crate) fn from_node(node: &Node, what: &dyn Fn() -> String) -> Result<Root> {
        let bad = |d: &str| Error::Corrupt { what: what(), detail: d.to_string() };
        if node.kind != kind::IMAGE_ROOT {
            return Err(Error::InvalidInput(format!("{} is not an image (node kind {})", what(), node.kind)));
        }
        let b = &node.body;
        if b.len() != 17 || b[0] != 1 {
            return Err(bad("unknown image root format"));
        }
        let page_size = u32::from_le_bytes(b[1..5].try_into().map_err(|_| bad("body"))?);
        let size = u64::from_le_bytes(b[5..13].try_into().map_err(|_| bad("body"))?);
        let seg = u32::from_le_bytes(b[13..17].try_into().map_err(|_| bad("body"))?);
        if !valid_page_size(page_size) || u64::from(seg) != SEGMENT_PAGES {
            return Err(bad("bad geometry"));
        }
        let pages = size.div_ceil(u64::from(page_size));
        if node.links.len() as u64 != pages.div_ceil(SEGMENT_PAGES) {
            return Err(bad("segment count does not match size"));
        }
        Ok(Root { page_size, size, segments: node.links.clone() })
    }

    fn pages(&self) -> u64 {
        self.size.div_ceil(u64::from(self.page_size))
    }

    fn segment_len(&self, s: u64) -> u64 {
        (self.pages() - s * SEGMENT_PAGES).min(SEGMENT_PAGES)
    }
}

fn valid_page_size(ps: u32) -> bool {
    ps.is_power_of_two() && (512..=1 << 30).contains(&ps)
}

/// True when every byte of `buf` is zero.
pub fn is_zero(buf: &[u8]) -> bool {
    // SAFETY: any initialised bytes are a valid u128; align_to only reinterprets them.
    let (head, body, tail) = unsafe { buf.align_to::<u128>() };
    head.iter().all(|&b| b == 0) && body.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// What SEEK_DATA/SEEK_HOLE said about where a file holds data.
#[derive(Debug, Default)]
struct DataExtents {
    /// The byte ranges that hold data, ascending, as far as the filesystem answered.
    ranges: Vec<(u64, u64)>,
    /// Where the filesystem stopped answering, and how: an lseek error other than ENXIO (which
    /// only means "no data past here"), or an answer that contradicts itself. Nothing is known
    /// about the file from that offset on.
    failed: Option<(u64, String)>,
}

impl DataExtents {
    /// The data ranges, everything the filesystem did not answer for counted as data: right for
    /// a full image, where a hole is a zero page and reading one as data is only slower.
    fn or_data(&self, size: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ranges.iter().copied().chain(self.failed.as_ref().map(|&(at, _)| (at, size)))
    }
}

/// Where `file` (of `size` bytes) holds data, by SEEK_DATA/SEEK_HOLE.
fn data_extents(file: &File, size: u64) -> DataExtents {
    use nix::errno::Errno;
    use nix::unistd::{Whence, lseek};
    let fd = file.as_fd();
    let mut out = DataExtents::default();
    // `size` came from st_size, an off_t: every offset below it fits in one.
    let mut pos: u64 = 0;
    while pos < size {
        let start = match lseek(fd, pos as i64, Whence::SeekData) {
            Ok(start) if start as u64 >= pos => start as u64,
            Ok(start) => {
                out.failed = Some((pos, format!("lseek SEEK_DATA from {pos} answered {start}")));
                break;
            }
            // No data past `pos` (a file that ends in a hole, or is all hole).
            Err(Errno::ENXIO) => break,
            Err(e) => {
                out.failed = Some((pos, format!("lseek SEEK_DATA at {pos}: {e}")));
                break;
            }
        };
        if start >= size {
            break;
        }
        let end = match lseek(fd, start as i64, Whence::SeekHole) {
            Ok(end) if end as u64 > start => (end as u64).min(size),
            Ok(end) => {
                out.failed = Some((start, format!("lseek SEEK_HOLE from data at {start} answered {end}")));
                break;
            }
            Err(e) => {
                out.failed = Some((start, format!("lseek SEEK_HOLE at {start}: {e}")));
                break;
            }
        };
        out.ranges.push((start, end));
        pos = end;
    }
    out
}

/// Why the holes of a diff snapshot of `size` bytes, `allocated` of them allocated on disk
/// (st_blocks × 512), cannot be told from its written pages by `extents`; `None` when they can.
///
/// Refused: a filesystem that failed to answer, and one that calls (nearly) the whole file data
/// although more than `slack` (a page, at least 4 KiB) of it is not allocated. The second is
/// what a filesystem without SEEK_HOLE support answers through the kernel's generic code (one
/// extent from 0 to the end: NFS before 4.2, ramfs, many FUSE filesystems); read as data, every
/// hole, which means "as in the parent", would become a zero page over the parent's content.
///
/// Why this rarely refuses a file it should take: where the filesystem does report holes,
/// (nearly) no holes means (nearly) every block allocated, so st_blocks covers the size. What
/// can make st_blocks smaller than the data: inline data and tail packing (ext4 inline data,
/// btrfs inline extents), only in files smaller than a page, which `slack` covers; and ZFS,
/// which counts compressed bytes (and fewer until its transaction group syncs), so a diff there
/// without a single hole may be refused: loudly, and it ingests as a full snapshot. What makes
/// st_blocks larger never refuses: preallocation (fallocate, XFS speculative preallocation),
/// metadata blocks, delayed allocations (ext4 and XFS count them). btrfs counts a compressed
/// extent at its uncompressed length (seen with compress-force=zstd), so it is no exception.
fn diff_holes_unknown(size: u64, allocated: u64, page_size: u64, extents: &DataExtents) -> Option<String> {
    if let Some((_, why)) = &extents.failed {
        return Some(format!("the filesystem cannot say where its holes are ({why})"));
    }
    let slack = page_size.max(4096);
    let data: u64 = extents.ranges.iter().map(|(start, end)| end - start).sum();
    if data.saturating_add(slack) > size && allocated.saturating_add(slack) < size {
        return Some(format!(
            "the filesystem calls {data} of its {size} bytes data, but only {allocated} are allocated: it does not \
             report holes"
        ));
    }
    None
}

impl Txn {
    /// Ingests the image file at `path` (see [`IngestOptions`]). The image is readable by id
    /// after [`Txn::commit`].
    pub fn ingest_image(&mut self, path: &Path, opts: &IngestOptions) -> Result<ImageInfo> {
        let crate::device::Opened { file, meta, size, .. } = crate::device::open_source(path)?;
        let ps = if opts.page_size == 0 { DEFAULT_PAGE_SIZE } else { opts.page_size };
        if !valid_page_size(ps) {
            return Err(Error::InvalidInput(format!("page size {ps} is not a power of two from 512 to 1 GiB")));
        }
        let ps64 = u64::from(ps);
        let pages = size.div_ceil(ps64);
        let parent = match opts.parent {
            Some(p) => {
                self.pin(p);
                let root = Root::from_node(&self.store.get_node(&p)?, &|| format!("parent image {p}"))?;
                if root.page_size != ps {
                    return Err(Error::InvalidInput(format!(
                        "page size {ps} differs from the parent's {}",
                        root.page_size
                    )));
                }
                Some(root)
            }
            None => None,
        };
        if (opts.dirty.is_some() || opts.diff_snapshot) && parent.is_none() {
            return Err(Error::InvalidInput("a dirty-page set or a diff snapshot needs a parent image".into()));
        }
        let parent_pages = parent.as_ref().map_or(0, Root::pages);
        // A diff snapshot covers the whole guest memory (holes mean "unchanged"), so one shorter
        // than its parent cannot say what became of the pages past its end: a truncated write.
        if let Some(p) = &parent
            && opts.diff_snapshot
            && size < p.size
        {
            return Err(Error::InvalidInput(format!(
                "the diff snapshot is {size} bytes, shorter than its parent image ({} bytes): truncated?",
                p.size
            )));
        }
        // Pages that hold data in the file: holes are zero (or, in a diff snapshot, unchanged).
        let extents = data_extents(&file, size);
        if opts.diff_snapshot {
            use std::os::unix::fs::MetadataExt;
            let allocated = meta.blocks().saturating_mul(512);
            if let Some(why) = diff_holes_unknown(size, allocated, ps64, &extents) {
                return Err(Error::InvalidInput(format!(
                    "diff snapshot {}: {why}. Its holes mean \"as in the parent\", and this filesystem cannot tell \
                     them from the pages written; read as zeros they would overwrite the parent's pages. Write diff \
                     snapshots on a filesystem that reports holes (SEEK_DATA/SEEK_HOLE: ext4, XFS, btrfs, tmpfs), \
                     or take a full snapshot",
                    path.display()
                )));
            }
        }
        let mut data = PageSet::new();
        for (start, end) in extents.or_data(size) {
            data.insert_range(start / ps64, end.div_ceil(ps64));
        }
        let parent_size = parent.as_ref().map_or(0, |p| p.size);
        let read_from_file = |i: u64| -> bool {
            // New pages come from the file, and so does every page whose length or extent differs
            // from the parent's: the last page when the sizes differ, and the parent's short last
            // page, which the file has since grown past.
            let parent_short_tail = i + 1 == parent_pages && parent_size % ps64 != 0;
            let reshaped = parent_size != size && (i + 1 == pages || parent_short_tail);
            if i >= parent_pages || reshaped {
                return true;
            }
            if opts.diff_snapshot {
                data.contains(i)
            } else if let Some(dirty) = &opts.dirty {
                dirty.contains(i)
            } else {
                true
            }
        };

        let nseg = pages.div_ceil(SEGMENT_PAGES);
        let batch_pages = (BATCH_BYTES / ps64).clamp(1, SEGMENT_PAGES);
        let store = self.store.clone();
        let hasher = Hasher {
            store: &store,
            file: &file,
            path,
            size,
            ps: ps64,
            data: &data,
            read_from_file: &read_from_file,
            level: store.inner.level,
            // Chunks this transaction already holds: not compressed again.
            known: self.new_chunks.keys().chain(self.found.keys()).copied().collect(),
            pinned: Vec::new(),
        };
        // Two stages run at once: this thread hashes and compresses batch after batch (on all
        // cores), while a second thread appends the previous batch to the pack, in order.
        let mut hasher = hasher;
        let info = std::thread::scope(|scope| {
            let (to_writer, batches) = mpsc::sync_channel::<Step>(2);
            let writer = scope.spawn(|| self.write_steps(batches, size, ps64, pages, opts));
            let produced = (|| -> Result<()> {
                for s in 0..nseg {
                    let start = s * SEGMENT_PAGES;
                    let end = (start + SEGMENT_PAGES).min(pages);
                    // The parent's segment at this position, and whether it covers exactly these pages.
                    let parent_seg = parent.as_ref().and_then(|p| p.segments.get(s as usize).copied());
                    let parent_ids = match parent_seg {
                        Some(seg) => Some(segment_ids(&store, &seg)?),
                        None => None,
                    };
                    if let (Some(seg), Some(p)) = (parent_seg, &parent) {
                        // The last page's length must match too: a parent of another size ends differently.
                        let same_shape = p.segment_len(s) == end - start && (end < pages || p.size == size);
                        if same_shape && !(start..end).any(&read_from_file) {
                            let ids = parent_ids.as_deref().unwrap_or_default();
                            let zero_pages = ids.iter().filter(|h| h.is_zero()).count() as u64;
                            let step = Step::Reused { seg, zero_pages, bytes: (end - start) * ps64 };
                            if to_writer.send(step).is_err() {
                                return Ok(()); // the writer failed: its error is the one to report
                            }
                            continue;
                        }
                    }
                    let mut b = start;
                    while b < end {
                        let e = (b + batch_pages).min(end);
                        let step = hasher.hash_batch((b, e), parent_ids.as_deref(), start)?;
                        if to_writer.send(step).is_err() {
                            return Ok(());
                        }
                        b = e;
                    }
                    if to_writer.send(Step::EndSegment).is_err() {
                        return Ok(());
                    }
                }
                Ok(())
            })();
            drop(to_writer);
            let written = writer.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
            produced.and(written)
        });
        // The pins the hashing stage took are the transaction's now (released when it ends),
        // whether or not the ingest succeeded; each id stays pinned once.
        for id in hasher.pinned {
            self.found.entry(id).or_insert(false);
            if !self.pinned.insert(id) {
                self.store.unpin(&[id]);
            }
        }
        info
    }

    /// The writing stage of [`Txn::ingest_image`]: appends each batch's new pages in image order
    /// and stores segment and root manifests.
    fn write_steps(
        &mut self,
        steps: mpsc::Receiver<Step>,
        size: u64,
        ps: u64,
        pages: u64,
        opts: &IngestOptions,
    ) -> Result<ImageInfo> {
        let mut info = ImageInfo {
            id: Hash::ZERO,
            size,
            page_size: ps as u32,
            pages,
            zero_pages: 0,
            hashed_pages: 0,
            new_pages: 0,
            new_raw_bytes: 0,
            new_stored_bytes: 0,
            reused_segments: 0,
        };
        let mut segments = Vec::with_capacity(pages.div_ceil(SEGMENT_PAGES) as usize);
        let mut ids = Vec::with_capacity(SEGMENT_PAGES as usize);
        for step in steps {
            match step {
                Step::Reused { seg, zero_pages, bytes } => {
                    info.zero_pages += zero_pages;
                    info.reused_segments += 1;
                    segments.push(seg);
                    report(opts, bytes);
                }
                Step::Batch { pages, bytes } => {
                    for page in pages {
                        match page {
                            Page::Parent(id) => ids.push(id),
                            Page::Hashed(id) => {
                                info.hashed_pages += 1;
                                ids.push(id);
                            }
                            Page::New(id, codec, payload, raw_len) => {
                                info.hashed_pages += 1;
                                if self.append_chunk(&id, false, codec, raw_len, &payload)? {
                                    info.new_pages += 1;
                                    info.new_raw_bytes += u64::from(raw_len);
                                    info.new_stored_bytes += payload.len() as u64;
                                }
                                ids.push(id);
                            }
                        }
                    }
                    report(opts, bytes);
                }
                Step::EndSegment => {
                    info.zero_pages += ids.iter().filter(|h| h.is_zero()).count() as u64;
                    let before = self.appended_bytes();
                    let seg = self.put_node(&Node::new(kind::IMAGE_SEGMENT, std::mem::take(&mut ids), Vec::new()))?;
                    segments.push(seg);
                    info.new_stored_bytes += self.appended_bytes() - before;
                }
            }
        }
        if segments.len() as u64 != pages.div_ceil(SEGMENT_PAGES) {
            // The hashing stage stopped early: its error is returned instead of this image.
            return Err(Error::InvalidInput("ingest stopped before its last segment".into()));
        }
        let before = self.appended_bytes();
        info.id = self.put_node(&Root { page_size: ps as u32, size, segments }.node())?;
        info.new_stored_bytes += self.appended_bytes() - before;
        Ok(info)
    }
}

/// What the hashing stage of an ingest hands to the writing stage, in image order.
enum Step {
    /// A whole segment taken from the parent.
    Reused { seg: Hash, zero_pages: u64, bytes: u64 },
    /// Consecutive pages, hashed.
    Batch { pages: Vec<Page>, bytes: u64 },
    /// The pages of the current segment are all sent.
    EndSegment,
}

/// The hashing stage of an ingest: reads, hashes and compresses pages on all cores.
struct Hasher<'a> {
    store: &'a Store,
    file: &'a File,
    path: &'a Path,
    size: u64,
    ps: u64,
    data: &'a PageSet,
    read_from_file: &'a (dyn Fn(u64) -> bool + Sync),
    level: i32,
    /// Chunks known to be stored or on their way (sent as new by this ingest).
    known: HashSet<Hash>,
    /// Existing chunks this stage pinned (handed to the transaction at the end).
    pinned: Vec<Hash>,
}

/// Bytes of consecutive pages a hashing task reads with one `pread` (when most of them are to
/// be read): one syscall per 16 pages of 4 KiB rather than one per page.
const READ_RUN_BYTES: u64 = 64 << 10;

impl Hasher<'_> {
    /// Hashes pages `b..e` of the segment that starts at page `seg_start`.
    ///
    /// One parallel pass reads runs of pages, detects zeros, hashes, probes the index and
    /// compresses what is new. It runs under the commit lock (shared), and pins the existing
    /// chunks it found before letting go of it, so gc cannot sweep a page between our probe
    /// and our pin.
    fn hash_batch(&mut self, (b, e): (u64, u64), parent_ids: Option<&[Hash]>, seg_start: u64) -> Result<Step> {
        let ps = self.ps;
        let _no_sweep = self.store.inner.commit_lock.read().unwrap_or_else(|e| e.into_inner());
        let this = &*self;
        let run = (READ_RUN_BYTES / ps).max(1);
        let runs: Vec<u64> = (b..e).step_by(run as usize).collect();
        let pages: Vec<Result<Vec<Page>>> = runs
            .into_par_iter()
            .map_init(
                || vec![0u8; (run * ps) as usize],
                |buf, r| this.hash_run(r, (r + run).min(e), buf, parent_ids, seg_start),
            )
            .collect();
        let mut out = Vec::with_capacity((e - b) as usize);
        for run in pages {
            out.extend(run?);
        }
        let first_new_pin = self.pinned.len();
        for page in &out {
            match page {
                Page::Hashed(id) if !id.is_zero() && self.known.insert(*id) => self.pinned.push(*id),
                Page::New(id, ..) => {
                    self.known.insert(*id);
                }
                _ => {}
            }
        }
        self.store.pin(&self.pinned[first_new_pin..]);
        Ok(Step::Batch { pages: out, bytes: (e - b) * ps })
    }

    /// Hashes pages `r..end` (one run), reading them with one `pread` when most are to be read.
    fn hash_run(
        &self,
        r: u64,
        end: u64,
        buf: &mut [u8],
        parent_ids: Option<&[Hash]>,
        seg_start: u64,
    ) -> Result<Vec<Page>> {
        let ps = self.ps;
        let wanted = |i: u64| (self.read_from_file)(i) && self.data.contains(i);
        let span_len = ((end * ps).min(self.size) - r * ps) as usize;
        let whole = (r..end).filter(|&i| wanted(i)).count() as u64 * 2 > end - r;
        if whole {
            self.file
                .read_exact_at(&mut buf[..span_len], r * ps)
                .ctx(|| format!("read {} at {}", self.path.display(), r * ps))?;
        }
        let mut out = Vec::with_capacity((end - r) as usize);
        for i in r..end {
            if !(self.read_from_file)(i) {
                let id = parent_ids.and_then(|p| p.get((i - seg_start) as usize)).copied();
                out.push(Page::Parent(id.unwrap_or(Hash::ZERO)));
                continue;
            }
            if !self.data.contains(i) {
                out.push(Page::Hashed(Hash::ZERO));
                continue;
            }
            let at = ((i - r) * ps) as usize;
            let len = ((self.size - i * ps).min(ps)) as usize;
            let page = &mut buf[at..at + len];
            if !whole {
                self.file.read_exact_at(page, i * ps).ctx(|| format!("read {} at {}", self.path.display(), i * ps))?;
            }
            out.push(self.hash_page(page)?);
        }
        Ok(out)
    }

    /// Hashes one page read from the file; compresses it when the store does not have it.
    fn hash_page(&self, page: &[u8]) -> Result<Page> {
        if is_zero(page) {
            return Ok(Page::Hashed(Hash::ZERO));
        }
        let id = Hash::of(page);
        if self.known.contains(&id) || self.store.contains(&id)? {
            return Ok(Page::Hashed(id));
        }
        let (codec, compressed) = compress(page, self.level);
        Ok(Page::New(id, codec, compressed.unwrap_or_else(|| page.to_vec()), page.len() as u32))
    }
}

/// The page ids of image segment `seg`.
fn segment_ids(store: &Store, seg: &Hash) -> Result<Vec<Hash>> {
    let node = store.get_node(seg)?;
    if node.kind != kind::IMAGE_SEGMENT {
        return Err(Error::Corrupt { what: format!("segment {seg}"), detail: "not a segment node".into() });
    }
    Ok(node.links)
}

/// One page after the parallel pass.
enum Page {
    /// Not read: the parent's id.
    Parent(Hash),
    /// Read and hashed; zero, or already stored.
    Hashed(Hash),
    /// Read, hashed and new: its encoded payload and raw length.
    New(Hash, Codec, Vec<u8>, u32),
}

fn report(opts: &IngestOptions, bytes: u64) {
    if let Some(p) = &opts.progress {
        p(bytes);
    }
}

impl Store {
    /// Ingests one image in its own transaction and, with `name`, points that ref at it.
    pub fn ingest_image(&self, path: &Path, opts: &IngestOptions, name: Option<&str>) -> Result<ImageInfo> {
        let mut tx = self.begin()?;
        let info = tx.ingest_image(path, opts)?;
        if let Some(name) = name {
            tx.set_ref(name, info.id)?;
        }
        tx.commit()?;
        Ok(info)
    }

    /// Opens image `id` for reading; errors name it by its id.
    pub fn open_image(&self, id: &Hash) -> Result<ImageReader> {
        ImageReader::open(self.clone(), *id, id.short())
    }

    /// Opens the image a ref (or hex id) names; errors name it as given.
    pub fn open_image_ref(&self, name_or_id: &str) -> Result<ImageReader> {
        let id = self.resolve(name_or_id)?;
        ImageReader::open(self.clone(), id, name_or_id.to_string())
    }
}

/// Where the pages of one group are stored; `None` for zero pages.
type LocationGroup = Arc<[Option<Location>]>;

/// Random and sequential access to a stored image. Every page read is verified.
/// Shareable across threads; segments are loaded once, on first use.
pub struct ImageReader {
    store: Store,
    id: Hash,
    name: String,
    root: Root,
    cache: Vec<OnceLock<Arc<[Hash]>>>,
    /// Where the pages of each group of [`LOCATION_GROUP`] pages are stored. A gc repack can
    /// move chunks: a read through a stale location fails, and the group is then looked up again.
    locations: Vec<GroupCache>,
}

/// The location cache of one group of pages.
#[derive(Default)]
struct GroupCache {
    /// The locations of the group's pages (`None` for zero pages), once loaded.
    loaded: RwLock<Option<LocationGroup>>,
    /// Pages of the group read by their own lookup so far.
    singles: std::sync::atomic::AtomicU64,
}

impl ImageReader {
    fn open(store: Store, id: Hash, name: String) -> Result<ImageReader> {
        let node = store.get_node(&id).map_err(|e| match e {
            Error::NotFound(_) => Error::NotFound(format!("image {name}")),
            e => e,
        })?;
        let root = Root::from_node(&node, &|| format!("image {name}"))?;
        let cache = (0..root.segments.len()).map(|_| OnceLock::new()).collect();
        let locations = (0..root.pages().div_ceil(LOCATION_GROUP)).map(|_| GroupCache::default()).collect();
        Ok(ImageReader { store, id, name, root, cache, locations })
    }

    /// The image's id.
    pub fn id(&self) -> Hash {
        self.id
    }

    /// The name used in errors.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.root.size
    }

    /// Page size in bytes.
    pub fn page_size(&self) -> u32 {
        self.root.page_size
    }

    /// Number of pages (the last may be short).
    pub fn page_count(&self) -> u64 {
        self.root.pages()
    }

    /// Length of page `i` in bytes: the page size, less for a short last page.
    pub fn page_len(&self, i: u64) -> usize {
        let ps = u64::from(self.root.page_size);
        self.root.size.saturating_sub(i * ps).min(ps) as usize
    }

    /// The ids of the segments.
    pub fn segment_ids(&self) -> &[Hash] {
        &self.root.segments
    }

    /// The page ids of segment `s`.
    pub fn segment(&self, s: usize) -> Result<Arc<[Hash]>> {
        let slot = self.cache.get(s).ok_or_else(|| Error::InvalidInput(format!("segment {s} out of range")))?;
        if let Some(ids) = slot.get() {
            return Ok(ids.clone());
        }
        let seg = self.root.segments[s];
        let what = || format!("image {} segment {s}", self.name);
        let mut bytes = vec![0u8; 16 + SEGMENT_PAGES as usize * 32];
        let n = self.store.read_chunk_into(&seg, &mut bytes, &what)?;
        let node = Node::decode(&bytes[..n], &what)?;
        let expected = self.root.segment_len(s as u64) as usize;
        if node.kind != kind::IMAGE_SEGMENT || node.links.len() != expected {
            return Err(Error::Corrupt { what: what(), detail: "segment does not match its image".into() });
        }
        let ids: Arc<[Hash]> = node.links.into();
        Ok(slot.get_or_init(|| ids).clone())
    }

    /// The id of page `i`; [`Hash::ZERO`] for a zero page.
    pub fn page_id(&self, i: u64) -> Result<Hash> {
        if i >= self.page_count() {
            return Err(Error::InvalidInput(format!(
                "page {i} is beyond image {} ({} pages)",
                self.name,
                self.page_count()
            )));
        }
        let seg = self.segment((i / SEGMENT_PAGES) as usize)?;
        Ok(seg[(i % SEGMENT_PAGES) as usize])
    }

    /// Reads page `i` into `buf` (at least [`ImageReader::page_len`] bytes; anything past the
    /// page is zero-filled). Returns false for a zero page. A page whose bytes do not match its
    /// id is an error naming this image and the page.
    pub fn read_page(&self, i: u64, buf: &mut [u8]) -> Result<bool> {
        let id = self.page_id(i)?;
        self.read_page_with_id(i, &id, buf)
    }

    /// [`ImageReader::read_page`] for a caller that already knows the page's id.
    pub fn read_page_with_id(&self, i: u64, id: &Hash, buf: &mut [u8]) -> Result<bool> {
        let len = self.page_len(i);
        if buf.len() < len {
            return Err(Error::InvalidInput(format!("buffer of {} bytes for a page of {len}", buf.len())));
        }
        if id.is_zero() {
            buf.fill(0);
            return Ok(false);
        }
        let what = || format!("image {} page {i}", self.name);
        let cached = self.cached_location(i, id)?;
        let n = match cached.map(|loc| self.store.read_located(id, &loc, buf, &what)) {
            Some(Ok(n)) => n,
            // No usable location, or a stale one (gc moved the chunk): ask the index.
            cached => {
                if cached.is_some() {
                    self.forget_locations(i);
                }
                self.store.read_chunk_into(id, buf, &what)?
            }
        };
        if n != len {
            return Err(Error::Corrupt { what: what(), detail: format!("holds {n} bytes, expected {len}") });
        }
        buf[n..].fill(0);
        Ok(true)
    }

    /// The stored location of page `i` (whose id is `id`); `None` when the index has no entry
    /// (the caller's read then names the missing chunk).
    fn cached_location(&self, i: u64, id: &Hash) -> Result<Option<Location>> {
        // The cache holds the locations of this image's pages: a caller's id that differs
        // (which read_page_with_id allows) is looked up on its own.
        if self.page_id(i)? != *id {
            return self.store.location(id);
        }
        Ok(self.locations_of(&[(i, *id)])?[0])
    }

    /// The stored locations of `pages` (ascending (index, id) pairs of non-zero pages of this
    /// image), through the location cache: see [`LOOKUPS_PER_READ`].
    fn locations_of(&self, pages: &[(u64, Hash)]) -> Result<Vec<Option<Location>>> {
        let mut out = Vec::with_capacity(pages.len());
        let mut k = 0;
        while k < pages.len() {
            let g = pages[k].0 / LOCATION_GROUP;
            let end = k + pages[k..].iter().take_while(|(i, _)| i / LOCATION_GROUP == g).count();
            let part = &pages[k..end];
            let slot = self
                .locations
                .get(g as usize)
                .ok_or_else(|| Error::InvalidInput(format!("page group {g} is beyond image {}", self.name)))?;
            let loaded = slot.loaded.read().unwrap_or_else(|e| e.into_inner()).clone();
            let group = match loaded {
                Some(group) => Some(group),
                None => {
                    let singles = slot.singles.fetch_add(part.len() as u64, Ordering::Relaxed) + part.len() as u64;
                    // A group lies inside one segment (LOCATION_GROUP divides SEGMENT_PAGES).
                    let first = g * LOCATION_GROUP;
                    let seg = self.segment((first / SEGMENT_PAGES) as usize)?;
                    let at = (first % SEGMENT_PAGES) as usize;
                    let ids = &seg[at..(at + LOCATION_GROUP as usize).min(seg.len())];
                    let nonzero = ids.iter().filter(|id| !id.is_zero()).count() as u64;
                    if LOOKUPS_PER_READ * singles >= nonzero {
                        let data: Vec<Hash> = ids.iter().copied().filter(|id| !id.is_zero()).collect();
                        let mut found = self.store.locations(&data)?.into_iter();
                        let group: LocationGroup =
                            ids.iter().map(|id| if id.is_zero() { None } else { found.next().flatten() }).collect();
                        *slot.loaded.write().unwrap_or_else(|e| e.into_inner()) = Some(group.clone());
                        Some(group)
                    } else {
                        None
                    }
                }
            };
            match group {
                Some(group) => out.extend(part.iter().map(|(i, _)| group[(i % LOCATION_GROUP) as usize])),
                None if part.len() == 1 => out.push(self.store.location(&part[0].1)?),
                None => out.extend(self.store.locations(&part.iter().map(|(_, id)| *id).collect::<Vec<_>>())?),
            }
            k = end;
        }
        Ok(out)
    }

    /// Drops the cached locations of page `i`'s group (a gc moved its chunks).
    fn forget_locations(&self, i: u64) {
        if let Some(slot) = self.locations.get((i / LOCATION_GROUP) as usize) {
            *slot.loaded.write().unwrap_or_else(|e| e.into_inner()) = None;
        }
    }

    /// Reads the consecutive pages `first..first + n` into `out` (`n` = `out.len()` / page
    /// size; a short last page is zero-padded), every page verified. Cheaper per page than
    /// [`ImageReader::read_page`]: one index lookup for the run, and one `pread` for each span of
    /// pages stored next to each other (ingest appends an image's new pages in order).
    pub fn read_pages(&self, first: u64, out: &mut [u8]) -> Result<()> {
        let ps = self.root.page_size as usize;
        if !out.len().is_multiple_of(ps) {
            return Err(Error::InvalidInput(format!("buffer of {} bytes is not a whole number of pages", out.len())));
        }
        let n = (out.len() / ps) as u64;
        if first + n > self.page_count() {
            return Err(Error::InvalidInput(format!("pages {first}..{} are beyond image {}", first + n, self.name)));
        }
        let mut data = Vec::with_capacity(n as usize);
        for i in first..first + n {
            let id = self.page_id(i)?;
            if id.is_zero() {
                out[(i - first) as usize * ps..][..ps].fill(0);
            } else {
                data.push((i, id));
            }
        }
        let locs = self.locations_of(&data)?;
        let mut span = Vec::new();
        let mut k = 0;
        while k < data.len() {
            // A span: records that follow each other in one pack.
            let Some(first_loc) = locs[k] else {
                return Err(Error::Corrupt {
                    what: format!("image {} page {}", self.name, data[k].0),
                    detail: format!("chunk {} is missing from the store", data[k].1),
                });
            };
            let mut end = k + 1;
            let mut span_end = first_loc.offset + u64::from(first_loc.stored_len);
            while end < data.len()
                && let Some(l) = locs[end]
                && l.pack == first_loc.pack
                && l.offset == span_end + crate::pack::RECORD_HEADER
                && end - k < 256
            {
                span_end = l.offset + u64::from(l.stored_len);
                end += 1;
            }
            span.resize((span_end - first_loc.offset) as usize, 0);
            if let Err(e) = self.store.read_pack_span(first_loc.pack, first_loc.offset, &mut span) {
                // A gc may have moved these chunks since the lookup: read them one by one.
                tracing::debug!("span read failed ({e}); reading pages one by one");
                for (i, id) in &data[k..end] {
                    self.read_page_with_id(*i, id, &mut out[(i - first) as usize * ps..][..ps])?;
                }
                k = end;
                continue;
            }
            for j in k..end {
                let (i, id) = data[j];
                let loc = locs[j].expect("checked while building the span");
                let at = (loc.offset - first_loc.offset) as usize;
                let page = &mut out[(i - first) as usize * ps..][..ps];
                let what = || format!("image {} page {i}", self.name);
                match crate::store::decode_verified(&id, &loc, &span[at..at + loc.stored_len as usize], page, &what) {
                    Ok(len) if len == self.page_len(i) => page[len..].fill(0),
                    // A cached location that a gc repack made stale reads other bytes: look the
                    // page up again (a page that really is damaged fails there, by name).
                    _ => {
                        self.forget_locations(i);
                        self.read_page_with_id(i, &id, page)?;
                    }
                }
            }
            k = end;
        }
        Ok(())
    }

    /// Writes the image to `path`, leaving zero pages as holes so the file stays sparse.
    /// Returns the bytes of data written. The file is fsynced before this returns.
    pub fn materialize(&self, path: &Path, progress: Option<&Progress>) -> Result<u64> {
        let target = crate::device::open_target(path, self.root.size)?;
        let file = &target.file;
        // A file reads zero in its holes; a device holds whatever was there before.
        let zero_fill = target.kind == crate::device::Kind::BlockDevice;
        let ps = u64::from(self.root.page_size);
        let written = (0..self.root.segments.len())
            .into_par_iter()
            .map(|s| -> Result<u64> {
                let ids = self.segment(s)?;
                let base = s as u64 * SEGMENT_PAGES;
                let mut buf = vec![0u8; 64 * ps as usize];
                let mut written = 0;
                let mut k = 0;
                while k < ids.len() {
                    if ids[k].is_zero() {
                        let mut end = k + 1;
                        while end < ids.len() && ids[end].is_zero() {
                            end += 1;
                        }
                        if zero_fill {
                            let (first, last) = (base + k as u64, base + end as u64 - 1);
                            let len = (last - first) * ps + self.page_len(last) as u64;
                            crate::device::zero_range(&target, path, first * ps, len)?;
                        }
                        k = end;
                        continue;
                    }
                    // A run of up to 64 data pages, read with one lookup, written with one pwrite.
                    let mut end = k + 1;
                    while end < ids.len() && end - k < 64 && !ids[end].is_zero() {
                        end += 1;
                    }
                    let first = base + k as u64;
                    let last = base + end as u64 - 1;
                    let run = &mut buf[..(end - k) * ps as usize];
                    self.read_pages(first, run)?;
                    let len = ((last - first) * ps) as usize + self.page_len(last);
                    file.write_all_at(&run[..len], first * ps).ctx(|| format!("write {}", path.display()))?;
                    written += len as u64;
                    k = end;
                }
                if let Some(p) = progress {
                    p(ids.len() as u64 * ps);
                }
                Ok(written)
            })
            .try_reduce(|| 0, |a, b| Ok(a + b))?;
        file.sync_all().ctx(|| format!("fsync {}", path.display()))?;
        Ok(written)
    }

    /// The pages whose content differs between this image and `other`. Costs time in proportion
    /// to the segments that differ.
    pub fn changed_pages(&self, other: &ImageReader) -> Result<PageSet> {
        let mut changed = PageSet::new();
        let pages = self.page_count().max(other.page_count());
        let nseg = self.root.segments.len().max(other.root.segments.len());
        for s in 0..nseg {
            let start = s as u64 * SEGMENT_PAGES;
            let end = (start + SEGMENT_PAGES).min(pages);
            let (a, b) = (self.root.segments.get(s), other.root.segments.get(s));
            if a.is_some() && a == b && self.page_len(end - 1) == other.page_len(end - 1) {
                continue;
            }
            let ids_a = if a.is_some() { Some(self.segment(s)?) } else { None };
            let ids_b = if b.is_some() { Some(other.segment(s)?) } else { None };
            for i in start..end {
                let k = (i - start) as usize;
                let pa = ids_a.as_ref().and_then(|v| v.get(k));
                let pb = ids_b.as_ref().and_then(|v| v.get(k));
                if pa != pb || self.page_len(i) != other.page_len(i) {
                    changed.insert(i);
                }
            }
        }
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const PAGE: u64 = 4096;

    fn extents(ranges: &[(u64, u64)]) -> DataExtents {
        DataExtents { ranges: ranges.to_vec(), failed: None }
    }

    #[test]
    fn a_sparse_diff_that_the_filesystem_calls_all_data_is_refused() {
        // 64 MiB of guest memory, 1 MiB of it written: the generic SEEK_DATA answer.
        let why = diff_holes_unknown(64 * MIB, MIB, PAGE, &extents(&[(0, 64 * MIB)]));
        assert!(why.as_deref().is_some_and(|w| w.contains("does not report holes")), "{why:?}");
        // Huge pages: the same, with a 2 MiB page.
        assert!(diff_holes_unknown(64 * MIB, 4 * MIB, 2 * MIB, &extents(&[(0, 64 * MIB)])).is_some());
    }

    #[test]
    fn a_dense_diff_called_all_data_is_taken() {
        assert_eq!(diff_holes_unknown(64 * MIB, 64 * MIB, PAGE, &extents(&[(0, 64 * MIB)])), None);
        // Preallocated beyond its end, or with metadata blocks: more allocated than its size.
        assert_eq!(diff_holes_unknown(64 * MIB, 80 * MIB, PAGE, &extents(&[(0, 64 * MIB)])), None);
        // A partial last block, and inline data of a file smaller than a page (no blocks).
        assert_eq!(diff_holes_unknown(64 * MIB + 100, 64 * MIB, PAGE, &extents(&[(0, 64 * MIB + 100)])), None);
        assert_eq!(diff_holes_unknown(3000, 0, PAGE, &extents(&[(0, 3000)])), None);
    }

    #[test]
    fn a_sparse_diff_with_real_extents_is_taken() {
        let written = [(0, PAGE), (5 * PAGE, 7 * PAGE), (64 * MIB - PAGE, 64 * MIB)];
        assert_eq!(diff_holes_unknown(64 * MIB, 4 * PAGE, PAGE, &extents(&written)), None);
        // All data but one page: a real hole of one page, the rest written and allocated.
        assert_eq!(diff_holes_unknown(64 * MIB, 64 * MIB - PAGE, PAGE, &extents(&[(PAGE, 64 * MIB)])), None);
        // Nothing written at all.
        assert_eq!(diff_holes_unknown(64 * MIB, 0, PAGE, &extents(&[])), None);
    }

    #[test]
    fn a_filesystem_that_fails_to_answer_is_refused() {
        let failed = DataExtents {
            ranges: vec![(0, PAGE)],
            failed: Some((PAGE, "lseek SEEK_DATA at 4096: EINVAL: Invalid argument".into())),
        };
        let why = diff_holes_unknown(64 * MIB, 64 * MIB, PAGE, &failed);
        assert!(why.as_deref().is_some_and(|w| w.contains("EINVAL")), "{why:?}");
        // A full image counts what was not answered for as data.
        assert_eq!(failed.or_data(64 * MIB).collect::<Vec<_>>(), [(0, PAGE), (PAGE, 64 * MIB)]);
    }

    #[test]
    fn data_extents_of_a_sparse_file_name_its_written_pages() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse");
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        file.set_len(4 * MIB).unwrap();
        file.write_all_at(&[1u8; PAGE as usize], MIB).unwrap();
        let found = data_extents(&file, 4 * MIB);
        assert!(found.failed.is_none(), "{found:?}");
        // A filesystem that reports holes names the page (some round to larger blocks); one
        // that does not calls it all data. Both are the truth as far as the data goes.
        let data: u64 = found.ranges.iter().map(|(s, e)| e - s).sum();
        assert!(found.ranges.iter().any(|&(s, e)| s <= MIB && e >= MIB + PAGE), "{found:?}");
        assert!(data == 4 * MIB || data <= MIB, "{found:?}");
    }
}
