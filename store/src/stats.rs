//! Space accounting: logical bytes, zero pages, dedup and compression, per ref and in total.

use std::collections::HashSet;
use std::fs;

use serde::Serialize;

use crate::blob::BlobManifest;
use crate::error::Result;
use crate::hash::Hash;
use crate::image::Root;
use crate::node::kind;
use crate::pack::parse_pack_name;
use crate::store::{Store, key};

/// Space figures for one ref.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RefStats {
    /// The ref's name.
    pub name: String,
    /// The id it names.
    pub id: Hash,
    /// "image", "blob" or "node:KIND".
    pub kind: String,
    /// Bytes it represents (an image's or blob's size).
    pub logical_bytes: u64,
    /// Pages (images).
    pub pages: u64,
    /// Zero pages, which store nothing (images).
    pub zero_pages: u64,
    /// Their bytes.
    pub zero_bytes: u64,
    /// Distinct data chunks it uses.
    pub unique_chunks: u64,
    /// Their uncompressed bytes.
    pub unique_raw_bytes: u64,
    /// Their bytes in packs (shared with other refs where deduplicated).
    pub stored_bytes: u64,
    /// Non-zero logical bytes per unique byte: what dedup within this ref saves.
    pub dedup_ratio: f64,
    /// Unique bytes per stored byte: what compression saves.
    pub compression_ratio: f64,
}

/// Space figures for the whole store.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Totals {
    /// Refs counted.
    pub refs: u64,
    /// Sum of the refs' logical bytes.
    pub logical_bytes: u64,
    /// Sum of their zero pages' bytes.
    pub zero_bytes: u64,
    /// Chunks in the index.
    pub chunks: u64,
    /// Their uncompressed bytes.
    pub raw_bytes: u64,
    /// Their stored bytes.
    pub stored_bytes: u64,
    /// Pack files' size on disk (includes dead bytes until gc).
    pub pack_bytes: u64,
    /// File objects and their bytes.
    pub file_objects: u64,
    /// Bytes of file objects (shared by reflink with workspaces where the filesystem allows).
    pub file_bytes: u64,
    /// (logical - zero) / raw: dedup across all refs.
    pub dedup_ratio: f64,
    /// raw / stored: compression.
    pub compression_ratio: f64,
    /// logical / pack bytes: all savings together.
    pub overall_ratio: f64,
}

/// [`Store::stats`]'s answer.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StoreStats {
    /// Per ref.
    pub refs: Vec<RefStats>,
    /// For the store.
    pub total: Totals,
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

impl Store {
    /// Space figures for one ref.
    pub fn ref_stats(&self, name: &str) -> Result<RefStats> {
        let id = self.resolve(name)?;
        let node = self.get_node(&id)?;
        let mut s = RefStats { name: name.to_string(), id, ..RefStats::default() };
        let mut chunks = HashSet::new();
        match node.kind {
            kind::IMAGE_ROOT => {
                let root = Root::from_node(&node, &|| format!("image {name}"))?;
                s.kind = "image".into();
                s.logical_bytes = root.size;
                let reader = self.open_image(&id)?;
                s.pages = reader.page_count();
                for seg in 0..root.segments.len() {
                    for (k, page) in reader.segment(seg)?.iter().enumerate() {
                        if page.is_zero() {
                            s.zero_pages += 1;
                            s.zero_bytes += reader.page_len(seg as u64 * crate::image::SEGMENT_PAGES + k as u64) as u64;
                        } else {
                            chunks.insert(*page);
                        }
                    }
                }
            }
            kind::BLOB => {
                let m = BlobManifest::from_node(&node, &|| format!("blob {name}"))?;
                s.kind = "blob".into();
                s.logical_bytes = m.size;
                chunks.extend(m.chunks.iter().map(|(h, _)| *h));
            }
            k => {
                s.kind = format!("node:{k}");
                self.reachable(node.links.iter().copied(), &mut chunks)?;
            }
        }
        let ids: Vec<Hash> = chunks.into_iter().collect();
        for loc in self.locations(&ids)?.into_iter().flatten() {
            if loc.is_node && !matches!(node.kind, kind::IMAGE_ROOT | kind::BLOB) {
                continue;
            }
            s.unique_chunks += 1;
            s.unique_raw_bytes += u64::from(loc.raw_len);
            s.stored_bytes += u64::from(loc.stored_len);
        }
        if s.kind != "image" && s.kind != "blob" {
            s.logical_bytes = s.unique_raw_bytes;
        }
        s.dedup_ratio = ratio(s.logical_bytes - s.zero_bytes, s.unique_raw_bytes);
        s.compression_ratio = ratio(s.unique_raw_bytes, s.stored_bytes);
        Ok(s)
    }

    /// Space figures per ref (those under `prefix`) and for the whole store.
    pub fn stats(&self, prefix: &str) -> Result<StoreStats> {
        let mut out = StoreStats::default();
        for (name, _) in self.list_refs(prefix)? {
            let s = self.ref_stats(&name)?;
            out.total.logical_bytes += s.logical_bytes;
            out.total.zero_bytes += s.zero_bytes;
            out.refs.push(s);
        }
        out.total.refs = out.refs.len() as u64;
        let t = &mut out.total;
        self.scan(key::CHUNK, |_, v| {
            if let Some(loc) = crate::pack::Location::decode(v) {
                t.chunks += 1;
                t.raw_bytes += u64::from(loc.raw_len);
                t.stored_bytes += u64::from(loc.stored_len);
            }
            Ok(())
        })?;
        self.scan(key::FILE, |_, v| {
            t.file_objects += 1;
            t.file_bytes += v.get(..8).and_then(|b| b.try_into().ok()).map_or(0, u64::from_le_bytes);
            Ok(())
        })?;
        if let Ok(entries) = fs::read_dir(self.packs_dir()) {
            for e in entries.flatten() {
                if e.file_name().to_str().and_then(parse_pack_name).is_some() {
                    t.pack_bytes += e.metadata().map_or(0, |m| m.len());
                }
            }
        }
        t.dedup_ratio = ratio(t.logical_bytes.saturating_sub(t.zero_bytes), t.raw_bytes);
        t.compression_ratio = ratio(t.raw_bytes, t.stored_bytes);
        t.overall_ratio = ratio(t.logical_bytes, t.pack_bytes);
        Ok(out)
    }
}
