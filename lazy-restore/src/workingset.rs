//! Working sets: the image pages a restore faulted on, in first-fault order, stored with the
//! snapshot so that later restores prefetch them.
//!
//! Storage: the list is encoded ([`encode`]) and stored as a blob; the ref
//! `attached/<image id hex>/working-set` points at it. An attached ref (see
//! [`snapfork_store::attached_name`]): the blob lives exactly as long as its image, and gc
//! removes both together.
//!
//! Beside the list, the working set's pages themselves are stored once more, back to back in
//! fault order, as one blob (`attached/<image id hex>/working-set-pages`, [`save_pages`]). In the
//! image's packs those pages lie wherever their image put them, so a cold prefetch would read
//! them one small random read at a time; from this blob a restore streams them sequentially
//! ([`preload`]) into the shared page cache, verifying each against the image's manifest, while
//! the prefetch readers follow right behind it (REAP's working-set file, in the store). The
//! cost is a second compressed copy of the working set, about a tenth of the image.
//!
//! Encoding: `b"SFWS1\n"`, the page size (u32 LE), the count (u64 LE), then each page index as a
//! LEB128 varint of the zigzag-encoded difference from the previous index (0 before the first).
//! Working sets are mostly ascending runs, so most entries take one byte.

use std::collections::HashSet;
use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use snapfork_store::{Hash, ImageReader, Store};

use crate::source::{CachedSource, PageSource};
use crate::{Error, Result};

const MAGIC: &[u8] = b"SFWS1\n";

/// The ref under which the working set of image `image` is stored.
pub fn ref_name(image: &Hash) -> String {
    snapfork_store::attached_name(image, "working-set")
}

/// Encodes an ordered page list.
pub fn encode(page_size: u32, pages: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(18 + pages.len() * 2);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&page_size.to_le_bytes());
    out.extend_from_slice(&(pages.len() as u64).to_le_bytes());
    let mut prev: u64 = 0;
    for &p in pages {
        let d = p.wrapping_sub(prev) as i64;
        let mut z = ((d << 1) ^ (d >> 63)) as u64;
        loop {
            let b = (z & 0x7f) as u8;
            z >>= 7;
            if z == 0 {
                out.push(b);
                break;
            }
            out.push(b | 0x80);
        }
        prev = p;
    }
    out
}

/// Decodes [`encode`]'s output into (page size, pages).
pub fn decode(data: &[u8]) -> Result<(u32, Vec<u64>)> {
    let bad = |m: &str| Error::WorkingSet(m.to_string());
    if data.len() < MAGIC.len() + 12 || &data[..MAGIC.len()] != MAGIC {
        return Err(bad("not a working-set record"));
    }
    let mut at = MAGIC.len();
    let page_size = u32::from_le_bytes(data[at..at + 4].try_into().map_err(|_| bad("short"))?);
    at += 4;
    let count = u64::from_le_bytes(data[at..at + 8].try_into().map_err(|_| bad("short"))?);
    at += 8;
    if count > (data.len() - at) as u64 {
        return Err(bad("count exceeds the record"));
    }
    let mut pages = Vec::with_capacity(count as usize);
    let mut prev: u64 = 0;
    for _ in 0..count {
        let mut z: u64 = 0;
        let mut shift = 0;
        loop {
            let b = *data.get(at).ok_or_else(|| bad("truncated"))?;
            at += 1;
            if shift > 63 {
                return Err(bad("varint too long"));
            }
            z |= ((b & 0x7f) as u64) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                break;
            }
        }
        let d = ((z >> 1) as i64) ^ -((z & 1) as i64);
        prev = prev.wrapping_add(d as u64);
        pages.push(prev);
    }
    if at != data.len() {
        return Err(bad("trailing bytes"));
    }
    Ok((page_size, pages))
}

/// Stores `pages` as the working set of `image` (replacing any previous one), with its pages
/// ([`save_pages`]). Returns the blob id of the list.
pub fn save(store: &Store, image: &Hash, page_size: u32, pages: &[u64]) -> Result<Hash> {
    let record = pages_record(&store.open_image(image)?, pages);
    let mut tx = store.begin()?;
    let blob = tx.put_blob(&encode(page_size, pages))?;
    tx.set_ref(&ref_name(image), blob.id)?;
    let stored = tx.put_blob(&record)?;
    tx.set_ref(&pages_ref_name(image), stored.id)?;
    tx.commit()?;
    Ok(blob.id)
}

/// The ref under which the working-set pages of image `image` are stored.
pub fn pages_ref_name(image: &Hash) -> String {
    snapfork_store::attached_name(image, "working-set-pages")
}

const PAGES_MAGIC: &[u8] = b"SFWP1\n";
/// Magic, image id, page size (u32), count (u64).
const PAGES_HEADER: usize = 6 + 32 + 4 + 8;
/// At most this much page data goes into a working-set pages blob (the first pages faulted
/// matter most; a huge working set is better filled from the image itself).
const PAGES_MAX_BYTES: u64 = 512 << 20;

/// Stores the data pages of `pages` (zero pages, repeats and pages past the end left out) of
/// `image`, in that order, as one blob under ref `name`. Returns the blob id.
pub fn save_pages(store: &Store, image: &Hash, pages: &[u64], name: &str) -> Result<Hash> {
    let record = pages_record(&store.open_image(image)?, pages);
    let mut tx = store.begin()?;
    let stored = tx.put_blob(&record)?;
    tx.set_ref(name, stored.id)?;
    tx.commit()?;
    Ok(stored.id)
}

/// The working-set pages blob: `b"SFWP1\n"`, the image id, the page size (u32 LE), the count
/// (u64 LE), the page indices (u64 LE each), then the pages, read (and verified) from the store.
/// Built in one buffer (its size is the peak memory). A page that cannot be read (damaged in the
/// store) is stored as zeros: a preload then rejects it against the manifest, and the damage is
/// for the restore that touches that page (or `verify`) to report.
fn pages_record(reader: &ImageReader, pages: &[u64]) -> Vec<u8> {
    let ps = reader.page_size() as usize;
    let max = (PAGES_MAX_BYTES / ps as u64) as usize;
    let mut seen = HashSet::new();
    let indices: Vec<u64> = pages
        .iter()
        .copied()
        .filter(|&i| {
            i < reader.page_count()
                && reader.page_len(i) == ps
                && seen.insert(i)
                && reader.page_id(i).is_ok_and(|id| !id.is_zero())
        })
        .take(max)
        .collect();
    let mut out = Vec::with_capacity(PAGES_HEADER + indices.len() * (8 + ps));
    out.extend_from_slice(PAGES_MAGIC);
    out.extend_from_slice(&reader.id().0);
    out.extend_from_slice(&(ps as u32).to_le_bytes());
    out.extend_from_slice(&(indices.len() as u64).to_le_bytes());
    for &i in &indices {
        out.extend_from_slice(&i.to_le_bytes());
    }
    let at = out.len();
    out.resize(at + indices.len() * ps, 0);
    for (k, &i) in indices.iter().enumerate() {
        let page = &mut out[at + k * ps..at + (k + 1) * ps];
        if let Err(e) = reader.read_page(i, page) {
            tracing::warn!(page = i, error = %e, "damaged working-set page stored as zeros in its pages blob");
            page.fill(0);
        }
    }
    out
}

/// What a [`preload`] did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct PreloadReport {
    /// Pages inserted into the cache.
    pub pages: u64,
    /// Pages that did not match the image's manifest (left to the normal read path).
    pub rejected: u64,
    /// Milliseconds from start to the last page.
    pub ms: f64,
}

/// Streams the working-set pages stored under ref `name` for `image` into `cache`: sequential
/// reads of one blob (every chunk verified by the store), each page checked once more against
/// the image's manifest before it is inserted. Prefetch reads of announced pages wait for it
/// ([`CachedSource::begin_preload`]); demand faults never do. At most half the cache is filled.
/// `Ok(None)` when nothing is stored under `name`.
pub fn preload(store: &Store, image: &ImageReader, name: &str, cache: &CachedSource) -> Result<Option<PreloadReport>> {
    let Some(blob) = store.get_ref(name)? else {
        return Ok(None);
    };
    if cache.image_id() != Some(image.id()) {
        return Err(Error::WorkingSet(format!(
            "preload of image {} into the cache of another image ({})",
            image.id().short(),
            cache.name()
        )));
    }
    let start = Instant::now();
    // Two stages: this thread reads the blob (decompressing and verifying its chunks) and cuts
    // it into pages; a second one checks each page against the manifest and inserts it.
    let (tx, rx) = std::sync::mpsc::sync_channel::<PageBatch>(16);
    let (sink, read, report) = std::thread::scope(|scope| {
        let inserting = scope.spawn(|| verify_and_insert(image, cache, rx));
        // The sink (and with it the sender) lives in here: should reading panic, it is dropped
        // on the way out, the inserting thread ends, and the scope can finish.
        let mut sink = PreloadSink {
            cache,
            image,
            limit: cache.capacity() / 2 / image.page_size() as usize,
            header: Vec::new(),
            pages: None,
            next: 0,
            partial: Vec::new(),
            out: Some(tx),
            error: None,
        };
        let read = store.read_blob(&blob, &mut sink);
        sink.out = None;
        (sink, read, inserting.join())
    });
    cache.end_preload();
    let mut report = report.map_err(|_| Error::WorkingSet("working-set preload thread panicked".into()))??;
    if let Some(e) = sink.error {
        return Err(e);
    }
    // The sink stops the read early once it has all it wants: that is not an error.
    if sink.pages.as_ref().is_none_or(|p| sink.next < p.len()) {
        read?;
    }
    if sink.pages.as_ref().is_none_or(|p| sink.next != p.len()) {
        return Err(Error::WorkingSet(format!("working-set pages blob {} is truncated", blob.short())));
    }
    report.ms = start.elapsed().as_secs_f64() * 1e3;
    Ok(Some(report))
}

/// Pages cut from the blob, with their image page index, on their way to be checked.
type PageBatch = Vec<(u64, Vec<u8>)>;

/// The second stage of [`preload`]: pages that match the image's manifest go into the cache,
/// the others are released to the normal read path.
fn verify_and_insert(
    image: &ImageReader,
    cache: &CachedSource,
    batches: std::sync::mpsc::Receiver<PageBatch>,
) -> Result<PreloadReport> {
    let mut report = PreloadReport::default();
    for batch in batches {
        let mut good: Vec<(u64, &[u8])> = Vec::with_capacity(batch.len());
        let mut rejected = Vec::new();
        for (index, page) in &batch {
            if Hash::of(page) == image.page_id(*index)? {
                good.push((*index, page));
            } else {
                rejected.push(*index);
            }
        }
        report.pages += good.len() as u64;
        report.rejected += rejected.len() as u64;
        cache.preload_pages(&good);
        if !rejected.is_empty() {
            tracing::warn!(pages = ?rejected, "working-set pages blob disagrees with the image; those pages are read from the image");
            cache.release_preload(rejected);
        }
    }
    Ok(report)
}

/// [`preload`] on a thread of its own (the cache is released when the thread ends). A failed
/// preload only costs speed: it is logged, and prefetch reads the store as usual.
pub fn spawn_preload(
    store: Store,
    image: Hash,
    name: String,
    cache: Arc<CachedSource>,
) -> std::io::Result<std::thread::JoinHandle<Option<PreloadReport>>> {
    std::thread::Builder::new().name("ws-preload".into()).spawn(move || {
        let run = || preload(&store, &store.open_image(&image)?, &name, &cache);
        match run() {
            Ok(r) => {
                if let Some(r) = &r {
                    tracing::info!(pages = r.pages, rejected = r.rejected, ms = r.ms, "working set preloaded");
                }
                r
            }
            Err(e) => {
                cache.end_preload();
                tracing::warn!(error = %e, "working-set preload failed; prefetch reads the image instead");
                None
            }
        }
    })
}

/// Receives the working-set pages blob as the store reads it.
struct PreloadSink<'a> {
    cache: &'a CachedSource,
    image: &'a ImageReader,
    /// Most pages to insert.
    limit: usize,
    header: Vec<u8>,
    /// The page indices, once the header is complete (cut to `limit`).
    pages: Option<Vec<u64>>,
    /// How many of `pages` have arrived.
    next: usize,
    partial: Vec<u8>,
    /// To [`verify_and_insert`].
    out: Option<std::sync::mpsc::SyncSender<PageBatch>>,
    error: Option<Error>,
}

impl PreloadSink<'_> {
    /// Parses the header once all of it is in `self.header`; returns the bytes it did not use.
    fn parse_header(&mut self) -> Result<Option<usize>> {
        let bad = |m: &str| Error::WorkingSet(format!("working-set pages blob: {m}"));
        if self.header.len() < PAGES_HEADER {
            return Ok(None);
        }
        if &self.header[..6] != PAGES_MAGIC {
            return Err(bad("bad magic"));
        }
        if self.header[6..38] != self.image.id().0 {
            return Err(bad("it belongs to another image"));
        }
        let ps = u32::from_le_bytes(self.header[38..42].try_into().map_err(|_| bad("short"))?);
        if ps != self.image.page_size() {
            return Err(bad("page size differs from the image's"));
        }
        let count = u64::from_le_bytes(self.header[42..50].try_into().map_err(|_| bad("short"))?);
        if count > self.image.page_count() {
            return Err(bad("more pages than the image has"));
        }
        let end = PAGES_HEADER + count as usize * 8;
        if self.header.len() < end {
            return Ok(None);
        }
        let mut pages: Vec<u64> = self.header[PAGES_HEADER..end]
            .chunks_exact(8)
            .map(|b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
            .collect();
        if pages.iter().any(|&i| i >= self.image.page_count()) {
            return Err(bad("a page index beyond the image"));
        }
        pages.truncate(self.limit);
        self.cache.begin_preload(&pages);
        self.pages = Some(pages);
        Ok(Some(end))
    }

    /// Hands the whole pages at the front of `data` on; keeps a partial one for later.
    fn take_pages(&mut self, mut data: &[u8]) -> Result<()> {
        let Some(pages) = &self.pages else { return Ok(()) };
        let ps = self.image.page_size() as usize;
        let mut batch: PageBatch = Vec::new();
        while self.next < pages.len() && !data.is_empty() {
            let n = (ps - self.partial.len()).min(data.len());
            self.partial.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.partial.len() < ps {
                break;
            }
            batch.push((pages[self.next], std::mem::take(&mut self.partial)));
            self.next += 1;
        }
        if let Some(out) = &self.out
            && !batch.is_empty()
            && out.send(batch).is_err()
        {
            return Err(Error::WorkingSet("working-set preload: the inserting thread ended".into()));
        }
        Ok(())
    }
}

impl Write for PreloadSink<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut step = || -> Result<()> {
            let mut data = buf;
            if self.pages.is_none() {
                let before = self.header.len();
                self.header.extend_from_slice(data);
                match self.parse_header()? {
                    None => return Ok(()),
                    Some(end) => data = &data[end - before..],
                }
            }
            self.take_pages(data)
        };
        if let Err(e) = step() {
            self.error = Some(e);
            return Err(std::io::Error::other("working-set preload failed"));
        }
        if self.pages.as_ref().is_some_and(|p| self.next >= p.len()) {
            // All wanted pages are in: stop reading (the caller tells this from a failure).
            return Err(std::io::Error::other("working-set preload complete"));
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The stored working set of `image`, if any.
pub fn load(store: &Store, image: &Hash) -> Result<Option<Vec<u64>>> {
    let Some(id) = store.get_ref(&ref_name(image))? else {
        return Ok(None);
    };
    let (_, pages) = decode(&store.get_blob(&id)?)?;
    Ok(Some(pages))
}

/// Deletes the stored working set of `image` and its pages (their blobs go at the next gc).
pub fn delete(store: &Store, image: &Hash) -> Result<()> {
    let mut tx = store.begin()?;
    tx.delete_ref(&ref_name(image));
    tx.delete_ref(&pages_ref_name(image));
    tx.commit()?;
    Ok(())
}

/// A synthetic working set for benchmarks: `fraction` of `pages` as runs of 1-16 pages at random
/// places, in random order, reproducible from `seed` (xorshift, no dependency).
pub fn random(pages: u64, fraction: f64, seed: u64) -> Vec<u64> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let want = ((pages as f64) * fraction.clamp(0.0, 1.0)).round() as u64;
    let mut seen = vec![false; pages as usize];
    let mut out = Vec::with_capacity(want as usize);
    let mut tries = 0;
    while (out.len() as u64) < want && tries < pages * 4 {
        tries += 1;
        let len = 1 + next() % 16;
        let start = next() % pages;
        for p in start..(start + len).min(pages) {
            if (out.len() as u64) < want && !seen[p as usize] {
                seen[p as usize] = true;
                out.push(p);
            }
        }
    }
    out
}

/// Reads a page list in order (the `--pattern FILE` format, [`snapfork_store::parse_page_list`]:
/// page numbers and inclusive ranges `a-b`, `#` comments). Pages must be below `limit` (the
/// image's page count).
pub fn parse_pattern(text: &str, limit: u64) -> Result<Vec<u64>> {
    let ranges = snapfork_store::parse_page_list(text, limit).map_err(|e| Error::WorkingSet(e.to_string()))?;
    Ok(ranges.into_iter().flatten().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_rejects_garbage() {
        let pages = vec![5, 6, 7, 1_000_000, 3, 0, u64::MAX, 2];
        let enc = encode(4096, &pages);
        assert_eq!(decode(&enc).unwrap(), (4096, pages));
        assert!(decode(b"nope").is_err());
        let mut trunc = enc.clone();
        trunc.pop();
        assert!(decode(&trunc).is_err());
        let mut extra = enc;
        extra.push(0);
        assert!(decode(&extra).is_err());
    }

    #[test]
    fn pattern_text() {
        assert_eq!(parse_pattern("1, 2 # c\n10-12\n", 13).unwrap(), vec![1, 2, 10, 11, 12]);
        assert!(parse_pattern("x", 13).is_err());
        assert!(parse_pattern("13", 13).is_err());
        assert!(parse_pattern("0-18446744073709551615", 13).is_err());
    }
}
