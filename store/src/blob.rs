//! Blobs: arbitrary files (a VMM state file, a gVisor checkpoint image), stored with
//! content-defined chunking so that successive versions share their unchanged chunks even when
//! bytes were inserted or removed before them.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use rayon::prelude::*;

use crate::error::{Error, IoContext, Result};
use crate::hash::Hash;
use crate::node::{Node, kind};
use crate::store::Store;
use crate::txn::Txn;

/// Chunk size bounds (FastCDC 2020): 16 KiB minimum, 64 KiB average, 256 KiB maximum.
pub const CHUNK_MIN: usize = 16 << 10;
/// Average chunk size.
pub const CHUNK_AVG: usize = 64 << 10;
/// Maximum chunk size.
pub const CHUNK_MAX: usize = 256 << 10;

/// What storing a blob added.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BlobInfo {
    /// The blob's id (its manifest node).
    pub id: Hash,
    /// Size in bytes.
    pub size: u64,
    /// Number of chunks.
    pub chunks: u64,
    /// Chunks the store did not have before.
    pub new_chunks: u64,
    /// Bytes the new chunks and the manifest take in packs.
    pub new_stored_bytes: u64,
}

impl Txn {
    /// Stores `data` as a blob.
    pub fn put_blob(&mut self, data: &[u8]) -> Result<BlobInfo> {
        let before = self.appended_bytes();
        let cuts: Vec<(usize, usize)> =
            fastcdc::v2020::FastCDC::new(data, CHUNK_MIN, CHUNK_AVG, CHUNK_MAX).map(|c| (c.offset, c.length)).collect();
        let items: Vec<(Hash, &[u8])> = cuts
            .par_iter()
            .map(|&(off, len)| {
                let chunk = &data[off..off + len];
                (Hash::of(chunk), chunk)
            })
            .collect();
        let mut new_chunks = 0;
        for batch in items.chunks(256) {
            new_chunks += self.put_chunks(batch, false)?.chunks;
        }
        let lens: Vec<u32> = items.iter().map(|(_, chunk)| chunk.len() as u32).collect();
        let links = items.iter().map(|(h, _)| *h).collect();
        let id = self.put_node(&blob_node(data.len() as u64, links, &lens))?;
        Ok(BlobInfo {
            id,
            size: data.len() as u64,
            chunks: items.len() as u64,
            new_chunks,
            new_stored_bytes: self.appended_bytes() - before,
        })
    }

    /// Stores the file at `path` as a blob.
    pub fn put_blob_file(&mut self, path: &Path) -> Result<BlobInfo> {
        let source = crate::device::open_source(path)?;
        // Read rather than mmap: a file truncated by another process while we read it must be
        // an error, not a SIGBUS.
        let mut data = vec![0u8; source.size as usize];
        source.file.read_exact_at(&mut data, 0).ctx(|| format!("read {}", path.display()))?;
        self.put_blob(&data)
    }

    /// Stores the file at `path` as blobs of `segment` bytes each (the last may be shorter),
    /// without copying its bytes: the file itself becomes a pack of raw chunks, hard-linked
    /// into the packs directory, so that the only disk write its data ever needs is the one that
    /// created it. For large files that compress poorly and were just written (a runsc
    /// checkpoint image, flate-compressed by runsc): storing them costs chunking and hashing,
    /// not a second copy on disk. Blobs and chunks are the same as [`Txn::put_blob`] makes of
    /// each segment; chunks the store already holds keep their location, and their copies in
    /// the adopted file are dead bytes that gc reclaims when it repacks the file.
    ///
    /// The file must not change from now on (the caller's link keeps pointing at the pack's
    /// bytes). A file on another filesystem is stored by copying instead.
    pub fn adopt_file_as_blobs(&mut self, path: &Path, segment: u64) -> Result<Vec<BlobInfo>> {
        if segment == 0 {
            return Err(Error::InvalidInput("segment size 0".into()));
        }
        let file = File::open(path).ctx(|| format!("open {}", path.display()))?;
        let size = file.metadata().ctx(|| format!("stat {}", path.display()))?.len();
        if size == 0 {
            return Ok(vec![self.put_blob(&[])?]);
        }
        // SAFETY: a read-only shared mapping of a file the caller no longer changes (documented
        // above); it lives until the end of this function, and every chunk's id is computed
        // from the mapped bytes that the index will point at.
        let map = unsafe { memmap2::Mmap::map(&file) }.ctx(|| format!("map {}", path.display()))?;
        let segments: Vec<(u64, u64)> =
            (0..size.div_ceil(segment)).map(|k| (k * segment, segment.min(size - k * segment))).collect();
        let pack = self.store.alloc_pack();
        let pack_path = crate::pack::pack_path(&self.store.packs_dir(), pack);
        // Active before it appears: a gc must never take it for an abandoned pack (its age is
        // the source file's, and the grace period may be zero).
        let active = &self.store.inner.active_packs;
        active.lock().unwrap_or_else(|e| e.into_inner()).insert(pack);
        let linked = std::fs::hard_link(path, &pack_path);
        if linked.is_err() {
            active.lock().unwrap_or_else(|e| e.into_inner()).remove(&pack);
        }
        match linked {
            Ok(()) => self.adopted_pack(pack, pack_path),
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                tracing::debug!(path = %path.display(), "not on the store's filesystem: copying it");
                return segments
                    .iter()
                    .map(|&(off, len)| self.put_blob(&map[off as usize..(off + len) as usize]))
                    .collect();
            }
            Err(e) => {
                return Err(Error::Io { context: format!("link {} into the store", path.display()), source: e });
            }
        }
        // (offset in the file, length, id) of every chunk, segment by segment.
        let chunked: Vec<Vec<(u64, u32, Hash)>> = segments
            .par_iter()
            .map(|&(off, len)| {
                let data = &map[off as usize..(off + len) as usize];
                fastcdc::v2020::FastCDC::new(data, CHUNK_MIN, CHUNK_AVG, CHUNK_MAX)
                    .map(|c| (off + c.offset as u64, c.length as u32, Hash::of(&data[c.offset..c.offset + c.length])))
                    .collect()
            })
            .collect();
        let mut infos = Vec::with_capacity(segments.len());
        for ((_, len), chunks) in segments.iter().zip(chunked) {
            let before = self.appended_bytes();
            let ids: Vec<Hash> = chunks.iter().map(|c| c.2).collect();
            let known = self.known(&ids, false)?;
            let mut new_chunks = 0;
            for (&(offset, chunk_len, id), known) in chunks.iter().zip(known) {
                if !known && self.index_adopted(id, pack, offset, chunk_len) {
                    new_chunks += 1;
                }
            }
            let lens: Vec<u32> = chunks.iter().map(|c| c.1).collect();
            let id = self.put_node(&blob_node(*len, ids, &lens))?;
            infos.push(BlobInfo {
                id,
                size: *len,
                chunks: chunks.len() as u64,
                new_chunks,
                new_stored_bytes: self.appended_bytes() - before,
            });
        }
        Ok(infos)
    }
}

/// A blob's manifest node: its size, then each chunk's length; the chunks are its links.
fn blob_node(size: u64, links: Vec<Hash>, lens: &[u32]) -> Node {
    let mut body = Vec::with_capacity(8 + 4 * lens.len());
    body.extend_from_slice(&size.to_le_bytes());
    for len in lens {
        body.extend_from_slice(&len.to_le_bytes());
    }
    Node::new(kind::BLOB, links, body)
}

/// A stored blob's manifest.
pub(crate) struct BlobManifest {
    pub size: u64,
    pub chunks: Vec<(Hash, u32)>,
}

impl BlobManifest {
    pub(crate) fn from_node(node: &Node, what: &dyn Fn() -> String) -> Result<BlobManifest> {
        if node.kind != kind::BLOB {
            return Err(Error::InvalidInput(format!("{} is not a blob (node kind {})", what(), node.kind)));
        }
        let bad = || Error::Corrupt { what: what(), detail: "malformed blob manifest".into() };
        let b = &node.body;
        if b.len() != 8 + 4 * node.links.len() {
            return Err(bad());
        }
        let size = u64::from_le_bytes(b[..8].try_into().map_err(|_| bad())?);
        let chunks: Vec<(Hash, u32)> = node
            .links
            .iter()
            .zip(b[8..].chunks_exact(4))
            .map(|(h, l)| (*h, u32::from_le_bytes([l[0], l[1], l[2], l[3]])))
            .collect();
        if chunks.iter().map(|(_, l)| u64::from(*l)).sum::<u64>() != size {
            return Err(bad());
        }
        Ok(BlobManifest { size, chunks })
    }
}

impl Store {
    /// Stores one blob in its own transaction and, with `name`, points that ref at it.
    pub fn put_blob_file(&self, path: &Path, name: Option<&str>) -> Result<BlobInfo> {
        let mut tx = self.begin()?;
        let info = tx.put_blob_file(path)?;
        if let Some(name) = name {
            tx.set_ref(name, info.id)?;
        }
        tx.commit()?;
        Ok(info)
    }

    /// The size of blob `id`.
    pub fn blob_size(&self, id: &Hash) -> Result<u64> {
        let what = || format!("blob {}", id.short());
        Ok(BlobManifest::from_node(&self.get_node(id)?, &what)?.size)
    }

    /// Writes blob `id` to `out`, verifying every chunk; returns its size.
    pub fn read_blob(&self, id: &Hash, out: &mut dyn Write) -> Result<u64> {
        let what = || format!("blob {}", id.short());
        let manifest = BlobManifest::from_node(&self.get_node(id)?, &what)?;
        let mut buf = vec![0u8; CHUNK_MAX];
        for (k, (chunk, len)) in manifest.chunks.iter().enumerate() {
            if *len as usize > buf.len() {
                // The manifest's word is checked against the index before it sizes a buffer: a
                // forged length (a bundle's) must not cost gigabytes of memory first.
                let stored = self.location(chunk)?.map(|l| l.raw_len);
                if stored != Some(*len) {
                    return Err(Error::Corrupt {
                        what: format!("blob {} chunk {k}", id.short()),
                        detail: match stored {
                            Some(n) => format!("the manifest says {len} bytes, the chunk holds {n}"),
                            None => format!("the manifest says {len} bytes of a chunk the store lacks"),
                        },
                    });
                }
                buf.resize(*len as usize, 0);
            }
            let n = self.read_chunk_into(chunk, &mut buf, &|| format!("blob {} chunk {k}", id.short()))?;
            if n != *len as usize {
                return Err(Error::Corrupt {
                    what: format!("blob {} chunk {k}", id.short()),
                    detail: "wrong length".into(),
                });
            }
            out.write_all(&buf[..n]).ctx(|| "write blob".to_string())?;
        }
        Ok(manifest.size)
    }

    /// Hard-links to `dest` the pack whose bytes are exactly blobs `ids` one after the other,
    /// after checking each chunk against its id; false (and nothing linked) when their chunks
    /// do not lie that way. That pack is a file adopted by [`Txn::adopt_file_as_blobs`] whose
    /// chunks were all new to the store: a caller that needs the blobs as one file (a runsc
    /// restore needs its image) then gets it without a copy. `dest` must only be read: it is
    /// the store's data.
    pub fn link_blobs_as_file(&self, ids: &[Hash], dest: &Path) -> Result<bool> {
        // (chunk id, length, what names it in errors), in file order.
        let mut chunks = Vec::new();
        for id in ids {
            let what = || format!("blob {}", id.short());
            let manifest = BlobManifest::from_node(&self.get_node(id)?, &what)?;
            chunks.extend(manifest.chunks.into_iter().enumerate().map(|(k, (c, len))| (c, len, (*id, k))));
        }
        let ids: Vec<Hash> = chunks.iter().map(|c| c.0).collect();
        let locations = self.locations(&ids)?;
        let (mut pack, mut end) = (None, 0u64);
        for ((_, len, _), loc) in chunks.iter().zip(&locations) {
            let Some(loc) = loc else { return Ok(false) };
            let contiguous = loc.codec == crate::pack::Codec::Raw
                && loc.stored_len == *len
                && loc.offset == end
                && pack.is_none_or(|p| p == loc.pack);
            if !contiguous {
                return Ok(false);
            }
            pack = Some(loc.pack);
            end += u64::from(*len);
        }
        let Some(pack) = pack else { return Ok(false) };
        let path = crate::pack::pack_path(&self.packs_dir(), pack);
        let Ok(file) = File::open(&path) else { return Ok(false) };
        let meta = file.metadata().ctx(|| format!("stat {}", path.display()))?;
        if meta.len() != end {
            return Ok(false);
        }
        // SAFETY: a read-only mapping of a pack, which the store never changes in place (gc
        // replaces packs, and the mapping keeps this one's bytes readable until it is dropped).
        let map = unsafe { memmap2::Mmap::map(&file) }.ctx(|| format!("map {}", path.display()))?;
        let mut spans = Vec::with_capacity(chunks.len());
        let mut at = 0usize;
        for &(id, len, named) in &chunks {
            spans.push((id, at, len as usize, named));
            at += len as usize;
        }
        spans.par_iter().try_for_each(|&(id, at, len, (blob, k))| {
            let got = Hash::of(&map[at..at + len]);
            if got == id {
                Ok(())
            } else {
                Err(Error::Corrupt {
                    what: format!("blob {} chunk {k}", blob.short()),
                    detail: format!("content hashes to {} instead of {}", got.short(), id.short()),
                })
            }
        })?;
        // The link must name the file just checked: gc may have removed the pack meanwhile (and
        // a later pack reused its number).
        use std::os::unix::fs::MetadataExt;
        if std::fs::hard_link(&path, dest).is_err() {
            return Ok(false);
        }
        if std::fs::metadata(dest).map(|m| m.ino()).ok() != Some(meta.ino()) {
            let _ = std::fs::remove_file(dest);
            return Ok(false);
        }
        Ok(true)
    }

    /// Reads blob `id` into memory.
    pub fn get_blob(&self, id: &Hash) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.read_blob(id, &mut out)?;
        Ok(out)
    }
}
