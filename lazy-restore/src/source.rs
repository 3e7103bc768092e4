//! Where page contents come from: the [`PageSource`] trait, a raw memory file, and a shared cache
//! of decompressed pages that every restore of one snapshot reads through.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// A memory image, page by page. Implementations verify what they return (a page that fails its
/// check is an error, never wrong bytes).
pub trait PageSource: Send + Sync {
    /// Bytes per image page (4096 for every image the store ingests today).
    fn page_size(&self) -> usize;
    /// Number of pages; the image is `page_count() * page_size()` bytes.
    fn page_count(&self) -> u64;
    /// True when page `index` is known to be all zeros (it is then never read nor copied).
    fn is_zero(&self, index: u64) -> bool;
    /// Reads page `index` into `buf` (exactly `page_size()` bytes), verified.
    fn read_page(&self, index: u64, buf: &mut [u8]) -> Result<()>;
    /// Reads the consecutive pages `first..` into `buf` (a whole number of pages; zero pages
    /// zero-filled), verified. Sources that can batch (the store) override it.
    fn read_pages(&self, first: u64, buf: &mut [u8]) -> Result<()> {
        for (k, page) in buf.chunks_mut(self.page_size()).enumerate() {
            let i = first + k as u64;
            if self.is_zero(i) {
                page.fill(0);
            } else {
                self.read_page(i, page)?;
            }
        }
        Ok(())
    }
    /// [`PageSource::read_pages`] for pages read once in bulk (`fill`, sequential read-ahead):
    /// a cache in front serves what it holds but does not keep these pages (they would push out
    /// the working sets it exists for, and inserting costs more than it saves).
    fn read_pages_bulk(&self, first: u64, buf: &mut [u8]) -> Result<()> {
        self.read_pages(first, buf)
    }
    /// Waits (briefly) while a preload of stored working-set pages is about to bring any of
    /// pages `first..first + count` into a cache in front: a prefetch read then finds them there
    /// instead of reading them once more, scattered, from the store. Demand reads never wait.
    fn wait_preloaded(&self, _first: u64, _count: u64) {}
    /// The store id of the image, for sources that read one from the store.
    fn image_id(&self) -> Option<snapfork_store::Hash> {
        None
    }
    /// A short name for logs and errors (the image id or the file path).
    fn name(&self) -> String;
    /// Image size in bytes.
    fn size(&self) -> u64 {
        self.page_count() * self.page_size() as u64
    }
}

/// A raw memory file (Firecracker's memory file format: all regions back to back, no header).
///
/// Holes of a sparse file count as zero pages; data pages are read as they are (a raw file carries
/// no checksums, so this source cannot verify: use the store for that).
pub struct RawFileSource {
    file: File,
    path: PathBuf,
    page_size: usize,
    pages: u64,
    holes: Vec<u64>,
}

impl RawFileSource {
    /// Opens `path` with `page_size`-byte pages; the file size must be a multiple of it.
    pub fn open(path: &Path, page_size: usize) -> Result<Self> {
        if page_size == 0 || !page_size.is_power_of_two() {
            return Err(Error::Invalid(format!("page size {page_size} is not a power of two")));
        }
        let file = File::open(path).map_err(|e| Error::io(format!("open {}", path.display()), e))?;
        let size = file.metadata().map_err(|e| Error::io(format!("stat {}", path.display()), e))?.len();
        if size % page_size as u64 != 0 {
            return Err(Error::Invalid(format!(
                "{}: size {size} is not a multiple of the page size {page_size}",
                path.display()
            )));
        }
        let pages = size / page_size as u64;
        let holes = hole_bitmap(&file, size, page_size as u64, pages);
        Ok(RawFileSource { file, path: path.to_path_buf(), page_size, pages, holes })
    }
}

/// Pages entirely inside a hole of a sparse file (SEEK_DATA/SEEK_HOLE); none if unsupported.
fn hole_bitmap(file: &File, size: u64, page: u64, pages: u64) -> Vec<u64> {
    use std::os::fd::AsRawFd;
    let mut bits = vec![0u64; pages.div_ceil(64) as usize];
    let fd = file.as_raw_fd();
    let mut pos: u64 = 0;
    while pos < size {
        // SAFETY: lseek on a descriptor we own; no memory is passed.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        let data = if data < 0 { size } else { data as u64 };
        // [pos, data) is a hole: mark the pages fully inside it.
        let first = pos.div_ceil(page);
        let last = data / page;
        for p in first..last.min(pages) {
            bits[(p / 64) as usize] |= 1 << (p % 64);
        }
        if data >= size {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        if hole < 0 {
            break;
        }
        pos = hole as u64;
    }
    bits
}

impl PageSource for RawFileSource {
    fn page_size(&self) -> usize {
        self.page_size
    }
    fn page_count(&self) -> u64 {
        self.pages
    }
    fn is_zero(&self, index: u64) -> bool {
        self.holes.get((index / 64) as usize).is_some_and(|w| w & (1 << (index % 64)) != 0)
    }
    fn read_page(&self, index: u64, buf: &mut [u8]) -> Result<()> {
        if index >= self.pages || buf.len() != self.page_size {
            return Err(Error::Page { image: self.name(), page: index, message: "out of range".into() });
        }
        self.file.read_exact_at(buf, index * self.page_size as u64).map_err(|e| Error::Page {
            image: self.name(),
            page: index,
            message: e.to_string(),
        })
    }
    fn name(&self) -> String {
        self.path.display().to_string()
    }
}

const SHARDS: usize = 16;

struct Shard {
    pages: HashMap<u64, Arc<[u8]>>,
    order: VecDeque<u64>,
    bytes: usize,
}

/// A bounded cache of decompressed, verified pages in front of a [`PageSource`]. Every restore of
/// one snapshot reads through the same `CachedSource`, so N forks decompress each page once.
/// Eviction is first-in first-out per shard: restores of a snapshot fault in much the same order.
pub struct CachedSource {
    inner: Arc<dyn PageSource>,
    shards: Vec<Mutex<Shard>>,
    shard_capacity: usize,
    hits: std::sync::atomic::AtomicU64,
    misses: std::sync::atomic::AtomicU64,
    /// Pages a running preload ([`crate::workingset::preload`]) has yet to insert.
    preload: Mutex<HashSet<u64>>,
    preloaded: Condvar,
}

/// How long a prefetch read waits for a preload before giving up on it and reading the store
/// itself: a preload streams one contiguous blob, so a wait this long means its disk stalled.
const PRELOAD_WAIT: Duration = Duration::from_secs(1);

impl CachedSource {
    /// Caches up to `capacity` bytes of `inner`'s pages (0 disables caching).
    pub fn new(inner: Arc<dyn PageSource>, capacity: usize) -> Self {
        CachedSource {
            inner,
            shards: (0..SHARDS)
                .map(|_| Mutex::new(Shard { pages: HashMap::new(), order: VecDeque::new(), bytes: 0 }))
                .collect(),
            shard_capacity: capacity / SHARDS,
            hits: Default::default(),
            misses: Default::default(),
            preload: Mutex::new(HashSet::new()),
            preloaded: Condvar::new(),
        }
    }

    /// The cache's capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.shard_capacity * SHARDS
    }

    /// Announces a preload of `pages` (image page indices, in the order they will arrive):
    /// prefetch reads of them wait for [`CachedSource::preload_pages`] instead of reading the
    /// store. Every announced page must be delivered, or released by [`CachedSource::end_preload`].
    /// One preload at a time per cache.
    pub fn begin_preload(&self, pages: &[u64]) {
        self.preload.lock().unwrap_or_else(|p| p.into_inner()).extend(pages.iter().copied());
    }

    /// Inserts preloaded pages (verified by the caller) and wakes the reads waiting for them.
    pub fn preload_pages(&self, pages: &[(u64, &[u8])]) {
        for &(index, page) in pages {
            self.insert(index, page);
        }
        self.release_preload(pages.iter().map(|&(i, _)| i));
    }

    /// Releases announced pages without inserting them (they failed their check).
    pub fn release_preload(&self, pages: impl IntoIterator<Item = u64>) {
        let mut pending = self.preload.lock().unwrap_or_else(|p| p.into_inner());
        for i in pages {
            pending.remove(&i);
        }
        drop(pending);
        self.preloaded.notify_all();
    }

    /// Ends a preload: whatever it did not deliver is read from the store as usual.
    pub fn end_preload(&self) {
        self.preload.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.preloaded.notify_all();
    }

    /// (hits, misses) so far.
    pub fn counters(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.hits.load(Relaxed), self.misses.load(Relaxed))
    }

    fn shard(&self, index: u64) -> &Mutex<Shard> {
        // Runs of 16 pages share a shard, so one fault-around batch takes one lock.
        &self.shards[((index / 16) as usize) % SHARDS]
    }
}

impl CachedSource {
    /// Caches page `index`, evicting the shard's oldest pages to stay within its capacity.
    fn insert(&self, index: u64, page: &[u8]) {
        let mut shard = self.shard(index).lock().unwrap_or_else(|p| p.into_inner());
        if !shard.pages.contains_key(&index) {
            while shard.bytes + page.len() > self.shard_capacity {
                let Some(old) = shard.order.pop_front() else {
                    break;
                };
                if let Some(p) = shard.pages.remove(&old) {
                    shard.bytes -= p.len();
                }
            }
            shard.pages.insert(index, Arc::from(page));
            shard.order.push_back(index);
            shard.bytes += page.len();
        }
    }

    /// Copies page `index` from the cache into `buf`; false on a miss.
    fn cached(&self, index: u64, buf: &mut [u8]) -> bool {
        let shard = self.shard(index).lock().unwrap_or_else(|p| p.into_inner());
        match shard.pages.get(&index) {
            Some(page) => {
                buf.copy_from_slice(page);
                true
            }
            None => false,
        }
    }
}

impl PageSource for CachedSource {
    fn page_size(&self) -> usize {
        self.inner.page_size()
    }
    fn read_pages(&self, first: u64, buf: &mut [u8]) -> Result<()> {
        use std::sync::atomic::Ordering::Relaxed;
        let ps = self.page_size();
        if self.shard_capacity < ps {
            return self.inner.read_pages(first, buf);
        }
        let all_cached = buf
            .chunks_mut(ps)
            .enumerate()
            .all(|(k, page)| self.is_zero(first + k as u64) || self.cached(first + k as u64, page));
        if all_cached {
            self.hits.fetch_add((buf.len() / ps) as u64, Relaxed);
            return Ok(());
        }
        self.inner.read_pages(first, buf)?;
        self.misses.fetch_add((buf.len() / ps) as u64, Relaxed);
        for (k, page) in buf.chunks(ps).enumerate() {
            if !self.is_zero(first + k as u64) {
                self.insert(first + k as u64, page);
            }
        }
        Ok(())
    }
    fn read_pages_bulk(&self, first: u64, buf: &mut [u8]) -> Result<()> {
        use std::sync::atomic::Ordering::Relaxed;
        let ps = self.page_size();
        if self.shard_capacity >= ps
            && buf
                .chunks_mut(ps)
                .enumerate()
                .all(|(k, page)| self.is_zero(first + k as u64) || self.cached(first + k as u64, page))
        {
            self.hits.fetch_add((buf.len() / ps) as u64, Relaxed);
            return Ok(());
        }
        self.inner.read_pages_bulk(first, buf)
    }
    fn page_count(&self) -> u64 {
        self.inner.page_count()
    }
    fn is_zero(&self, index: u64) -> bool {
        self.inner.is_zero(index)
    }
    fn read_page(&self, index: u64, buf: &mut [u8]) -> Result<()> {
        use std::sync::atomic::Ordering::Relaxed;
        if self.shard_capacity < self.page_size() {
            return self.inner.read_page(index, buf);
        }
        if self.cached(index, buf) {
            self.hits.fetch_add(1, Relaxed);
            return Ok(());
        }
        // Decompress outside the lock: two restores racing on one page both read it, which is
        // rarer and cheaper than serialising every miss of a shard.
        self.inner.read_page(index, buf)?;
        self.misses.fetch_add(1, Relaxed);
        self.insert(index, buf);
        Ok(())
    }
    fn image_id(&self) -> Option<snapfork_store::Hash> {
        self.inner.image_id()
    }
    fn wait_preloaded(&self, first: u64, count: u64) {
        let deadline = Instant::now() + PRELOAD_WAIT;
        let mut pending = self.preload.lock().unwrap_or_else(|p| p.into_inner());
        while !pending.is_empty() && (first..first + count).any(|i| pending.contains(&i)) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                // Its disk stalled: nobody waits for it any more (what it still brings is
                // cached all the same).
                tracing::warn!(first, count, "working-set preload stalled; prefetch reads the image");
                pending.clear();
                return;
            }
            pending = self.preloaded.wait_timeout(pending, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
    fn name(&self) -> String {
        self.inner.name()
    }
}

/// An image in the snapfork store: every page read is verified against its blake3 id by
/// [`snapfork_store::ImageReader`]; a mismatch is an error naming the image and the page. The
/// reader keeps where pages are stored, by groups it looks up whole once reads from a group
/// make that pay (scattered working-set reads keep one lookup per page).
pub struct StoreSource {
    reader: snapfork_store::ImageReader,
}

impl StoreSource {
    /// Wraps an opened image.
    pub fn new(reader: snapfork_store::ImageReader) -> Self {
        StoreSource { reader }
    }

    /// Opens the image `name_or_id` (a ref or a hex id) of `store`.
    pub fn open(store: &snapfork_store::Store, name_or_id: &str) -> Result<Self> {
        Ok(StoreSource { reader: store.open_image_ref(name_or_id)? })
    }

    /// The image's id.
    pub fn id(&self) -> snapfork_store::Hash {
        self.reader.id()
    }

    /// The underlying reader.
    pub fn reader(&self) -> &snapfork_store::ImageReader {
        &self.reader
    }

    fn page_error(&self, page: u64, e: impl std::fmt::Display) -> Error {
        Error::Page { image: self.reader.name().to_string(), page, message: e.to_string() }
    }
}

impl PageSource for StoreSource {
    fn page_size(&self) -> usize {
        self.reader.page_size() as usize
    }
    fn page_count(&self) -> u64 {
        self.reader.page_count()
    }
    fn size(&self) -> u64 {
        // A short last page cannot be mapped by any region: the real size rejects such regions.
        self.reader.size()
    }
    fn is_zero(&self, index: u64) -> bool {
        // An unreadable segment is "not known zero": read_page then reports the error.
        self.reader.page_id(index).is_ok_and(|id| id.is_zero())
    }
    fn read_page(&self, index: u64, buf: &mut [u8]) -> Result<()> {
        self.reader.read_page(index, buf).map(|_| ()).map_err(|e| self.page_error(index, e))
    }
    fn read_pages(&self, first: u64, buf: &mut [u8]) -> Result<()> {
        self.reader.read_pages(first, buf).map_err(|e| self.page_error(first, e))
    }
    fn image_id(&self) -> Option<snapfork_store::Hash> {
        Some(self.reader.id())
    }
    fn name(&self) -> String {
        self.reader.name().to_string()
    }
}

/// Caches shared by all restores of a snapshot in one server process, keyed by image id.
/// A cache lives while any restore (or the caller) holds it.
#[derive(Default)]
pub struct SharedSources {
    map: Mutex<HashMap<String, std::sync::Weak<CachedSource>>>,
}

impl SharedSources {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The cache for `key`, created with `open` and `capacity` bytes if none is alive.
    pub fn get_or_open(
        &self,
        key: &str,
        capacity: usize,
        open: impl FnOnce() -> Result<Arc<dyn PageSource>>,
    ) -> Result<Arc<CachedSource>> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get(key).and_then(|w| w.upgrade()) {
            return Ok(c);
        }
        let c = Arc::new(CachedSource::new(open()?, capacity));
        map.retain(|_, w| w.strong_count() > 0);
        map.insert(key.to_string(), Arc::downgrade(&c));
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cache over a raw file of `pages` pages, each filled with its index.
    fn cache(dir: &Path, pages: u64) -> CachedSource {
        let path = dir.join("mem.raw");
        let data: Vec<u8> = (0..pages).flat_map(|i| vec![i as u8 + 1; 4096]).collect();
        std::fs::write(&path, data).unwrap();
        CachedSource::new(Arc::new(RawFileSource::open(&path, 4096).unwrap()), 1 << 20)
    }

    #[test]
    fn a_prefetch_read_waits_for_announced_pages_until_they_arrive() {
        let dir = tempfile::tempdir().unwrap();
        let c = cache(dir.path(), 8);
        c.begin_preload(&[1, 2]);
        let waited = std::thread::scope(|s| {
            let waiter = s.spawn(|| {
                let t = Instant::now();
                c.wait_preloaded(1, 2);
                t.elapsed()
            });
            std::thread::sleep(Duration::from_millis(150));
            let (one, two) = (vec![9u8; 4096], vec![8u8; 4096]);
            c.preload_pages(&[(1, &one), (2, &two)]);
            waiter.join().unwrap()
        });
        assert!(waited >= Duration::from_millis(140) && waited < PRELOAD_WAIT, "{waited:?}");
        // Delivered pages come from the cache (these bytes differ from the file's on purpose).
        let mut buf = vec![0u8; 4096];
        c.read_page(2, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 8));
        // Pages nobody announced are never waited for.
        let t = Instant::now();
        c.wait_preloaded(3, 4);
        assert!(t.elapsed() < Duration::from_millis(50));
    }

    #[test]
    fn a_stalled_preload_is_given_up_once_for_everybody() {
        let dir = tempfile::tempdir().unwrap();
        let c = cache(dir.path(), 8);
        c.begin_preload(&[5, 6]);
        let t = Instant::now();
        c.wait_preloaded(5, 1);
        let first = t.elapsed();
        assert!(first >= PRELOAD_WAIT - Duration::from_millis(50), "{first:?}");
        // The next read does not wait again, also for another announced page.
        let t = Instant::now();
        c.wait_preloaded(6, 1);
        assert!(t.elapsed() < Duration::from_millis(50));
        let mut buf = vec![0u8; 4096];
        c.read_page(6, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 7), "read from the file");
    }
}
