//! Bundles: one snapshot (and everything it links to, its ancestry included) in one file that
//! verifies itself.
//!
//! Format (all integers little-endian):
//! ```text
//! "SNAPFORK-BUNDLE1"  root id (32 bytes)
//! record*:  tag (1 = node, 2 = chunk, 3 = file object)  id (32)  length (u64)  bytes
//! end:      tag 0xFF  blake3 of every byte before this hash, the tag included (32)
//! ```
//! Import reads the bundle twice. The first pass checks everything without touching the store:
//! each record's bytes hash to its id, lengths are bounded, nothing follows the end record, the
//! whole-file hash matches, every link reachable from the root is present (in the bundle or the
//! store), the root and its ancestors decode as snapshots, and workspace trees pass fsfork's
//! checks (names that cannot escape the restore directory). Only then does the second pass write
//! the objects in one transaction (hashing them again as they go in), so a refused bundle leaves
//! nothing behind.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;

use snapfork_store::{Hash, Node, Store};

use crate::error::{Error, Result};
use crate::model::{KIND_SNAPSHOT, PartKind, SnapshotBody};

const MAGIC: &[u8; 16] = b"SNAPFORK-BUNDLE1";
const TAG_NODE: u8 = 1;
const TAG_CHUNK: u8 = 2;
const TAG_FILE: u8 = 3;
const TAG_END: u8 = 0xFF;
/// Largest node or chunk accepted (the store's largest page is 1 GiB, but no snapshot this
/// engine writes has chunks above a few MiB; a bigger claim is an attack on memory).
const MAX_CHUNK: u64 = 64 << 20;

/// What an export or import moved.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct BundleReport {
    /// The snapshot id (hex).
    pub id: String,
    /// Nodes.
    pub nodes: u64,
    /// Chunks (pages, blob chunks).
    pub chunks: u64,
    /// File objects (workspace files).
    pub files: u64,
    /// Bundle size in bytes.
    pub bytes: u64,
    /// Objects the importing store already had (import only).
    pub already_present: u64,
}

struct HashingWriter<W: Write> {
    inner: W,
    hasher: blake3::Hasher,
    written: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes snapshot `root` and its closure to `out` (atomically: a temp file renamed at the end).
pub fn export(store: &Store, root: Hash, out: &Path) -> Result<BundleReport> {
    let root_node = store.get_node(&root)?;
    SnapshotBody::from_node(root, &root_node)?;
    let tmp =
        out.with_file_name(format!(".{}.partial", out.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()));
    let io = |e: std::io::Error| Error::io(format!("write {}", tmp.display()), e);
    let file = File::create(&tmp).map_err(io)?;
    let mut w =
        HashingWriter { inner: BufWriter::with_capacity(1 << 20, file), hasher: blake3::Hasher::new(), written: 0 };
    let mut report = BundleReport { id: root.to_hex(), ..Default::default() };
    let result = (|| -> Result<()> {
        w.write_all(MAGIC).map_err(io)?;
        w.write_all(root.as_bytes()).map_err(io)?;
        let mut seen = HashSet::new();
        let mut queue = VecDeque::from([root]);
        while let Some(id) = queue.pop_front() {
            if id.is_zero() || !seen.insert(id) {
                continue;
            }
            match store.location(&id)? {
                Some(loc) if loc.is_node => {
                    let bytes = store.get_chunk(&id)?;
                    let node = Node::decode(&bytes, &|| format!("node {id}"))?;
                    queue.extend(node.links.iter().copied());
                    write_record(&mut w, TAG_NODE, &id, &bytes).map_err(io)?;
                    report.nodes += 1;
                }
                Some(_) => {
                    let bytes = store.get_chunk(&id)?;
                    write_record(&mut w, TAG_CHUNK, &id, &bytes).map_err(io)?;
                    report.chunks += 1;
                }
                None if store.has_file_object(&id)? => {
                    let path = store.file_object_path(&id);
                    let mut f = File::open(&path).map_err(|e| Error::io(format!("open {}", path.display()), e))?;
                    let len = f.metadata().map_err(|e| Error::io(format!("stat {}", path.display()), e))?.len();
                    w.write_all(&[TAG_FILE]).map_err(io)?;
                    w.write_all(id.as_bytes()).map_err(io)?;
                    w.write_all(&len.to_le_bytes()).map_err(io)?;
                    let mut hasher = blake3::Hasher::new();
                    let copied = copy_hashing(&mut f, &mut w, len, &mut hasher)
                        .map_err(|e| Error::io(format!("read {}", path.display()), e))?;
                    if copied != len || Hash(*hasher.finalize().as_bytes()) != id {
                        return Err(Error::corrupt(format!("file object {id}"), "content does not match its id"));
                    }
                    report.files += 1;
                }
                None => {
                    return Err(Error::corrupt(
                        format!("snapshot {}", root.short()),
                        format!("object {id} is missing"),
                    ));
                }
            }
        }
        // The digest covers everything before it, the end tag included.
        w.write_all(&[TAG_END]).map_err(io)?;
        let digest = *w.hasher.finalize().as_bytes();
        w.write_all(&digest).map_err(io)?;
        w.flush().map_err(io)?;
        report.bytes = w.written;
        w.inner.get_ref().sync_all().map_err(io)?;
        Ok(())
    })();
    match result {
        Ok(()) => {
            std::fs::rename(&tmp, out).map_err(|e| Error::io(format!("rename to {}", out.display()), e))?;
            Ok(report)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn write_record(w: &mut impl Write, tag: u8, id: &Hash, bytes: &[u8]) -> std::io::Result<()> {
    w.write_all(&[tag])?;
    w.write_all(id.as_bytes())?;
    w.write_all(&(bytes.len() as u64).to_le_bytes())?;
    w.write_all(bytes)
}

fn copy_hashing(r: &mut impl Read, w: &mut impl Write, len: u64, hasher: &mut blake3::Hasher) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let n = r.read(&mut buf[..want])?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        w.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(len - left)
}

struct Entry {
    tag: u8,
    offset: u64,
    len: u64,
}

/// Reads, fully verifies, then imports a bundle; returns the snapshot id. The snapshot is kept
/// alive by ref `imported/ID`.
pub fn import(store: &Store, path: &Path) -> Result<BundleReport> {
    let what = format!("bundle {}", path.display());
    let bad = |detail: String| Error::corrupt(what.clone(), detail);
    let file = File::open(path).map_err(|e| Error::io(format!("open {}", path.display()), e))?;
    let total = file.metadata().map_err(|e| Error::io(format!("stat {}", path.display()), e))?.len();
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut whole = blake3::Hasher::new();
    let mut pos = 0u64;
    let read_exact =
        |r: &mut BufReader<File>, buf: &mut [u8], whole: &mut blake3::Hasher, pos: &mut u64| -> Result<()> {
            r.read_exact(buf).map_err(|e| bad(format!("truncated at byte {pos}: {e}")))?;
            whole.update(buf);
            *pos += buf.len() as u64;
            Ok(())
        };
    // ---- pass 1: verify everything, keep nodes (small) and record where each object is ----
    let mut magic = [0u8; 16];
    read_exact(&mut r, &mut magic, &mut whole, &mut pos)?;
    if &magic != MAGIC {
        return Err(bad("not a snapfork bundle (bad magic)".into()));
    }
    let mut root = [0u8; 32];
    read_exact(&mut r, &mut root, &mut whole, &mut pos)?;
    let root = Hash(root);
    let mut entries: HashMap<Hash, Entry> = HashMap::new();
    let mut nodes: HashMap<Hash, Node> = HashMap::new();
    let mut buf = Vec::new();
    loop {
        let mut tag = [0u8; 1];
        read_exact(&mut r, &mut tag, &mut whole, &mut pos)?;
        if tag[0] == TAG_END {
            let expected = *whole.finalize().as_bytes();
            let mut digest = [0u8; 32];
            r.read_exact(&mut digest).map_err(|e| bad(format!("truncated end record: {e}")))?;
            if digest != expected {
                return Err(bad("whole-bundle checksum mismatch".into()));
            }
            let mut rest = [0u8; 1];
            if r.read(&mut rest).map_err(|e| Error::io(format!("read {}", path.display()), e))? != 0 {
                return Err(bad("data after the end record".into()));
            }
            break;
        }
        let mut id = [0u8; 32];
        read_exact(&mut r, &mut id, &mut whole, &mut pos)?;
        let id = Hash(id);
        let mut len = [0u8; 8];
        read_exact(&mut r, &mut len, &mut whole, &mut pos)?;
        let len = u64::from_le_bytes(len);
        // Sent twice (say as data, then as a node), an object would be checked as one and
        // written as the other.
        if entries.contains_key(&id) {
            return Err(bad(format!("object {} appears twice", id.short())));
        }
        if len > total.saturating_sub(pos) {
            return Err(bad(format!("object {} claims {len} bytes, more than the bundle holds", id.short())));
        }
        let offset = pos;
        match tag[0] {
            TAG_NODE | TAG_CHUNK => {
                if len > MAX_CHUNK {
                    return Err(bad(format!("object {} of {len} bytes is too large", id.short())));
                }
                buf.resize(len as usize, 0);
                read_exact(&mut r, &mut buf, &mut whole, &mut pos)?;
                if Hash::of(&buf) != id {
                    return Err(bad(format!("object {} does not match its id", id.short())));
                }
                if tag[0] == TAG_NODE {
                    let node = Node::decode(&buf, &|| format!("bundle node {id}"))?;
                    nodes.insert(id, node);
                }
            }
            TAG_FILE => {
                let mut h = blake3::Hasher::new();
                let mut left = len;
                let mut chunk = vec![0u8; 1 << 20];
                while left > 0 {
                    let n = left.min(chunk.len() as u64) as usize;
                    read_exact(&mut r, &mut chunk[..n], &mut whole, &mut pos)?;
                    h.update(&chunk[..n]);
                    left -= n as u64;
                }
                if Hash(*h.finalize().as_bytes()) != id {
                    return Err(bad(format!("file object {} does not match its id", id.short())));
                }
            }
            t => {
                return Err(bad(format!("unknown record tag {t} at byte {}", offset - 41)));
            }
        }
        entries.insert(id, Entry { tag: tag[0], offset, len });
    }
    // ---- closure: everything reachable from the root exists, snapshots decode ----
    // What the bundle leaves out must stay until the import commits: the transaction pins each
    // such object before asking for it, so a gc meanwhile (the daemon runs both) keeps it.
    let tx = RefCell::new(store.begin()?);
    let pin = |id: &Hash| tx.borrow_mut().pin(*id);
    let root_node = nodes.get(&root).ok_or_else(|| bad("the root snapshot is not in the bundle".into()))?;
    if root_node.kind != KIND_SNAPSHOT {
        return Err(bad("the root is not a snapshot".into()));
    }
    let mut report = BundleReport { id: root.to_hex(), bytes: total, ..Default::default() };
    let mut seen = HashSet::new();
    let mut snapshots = Vec::new();
    let mut queue = VecDeque::from([root]);
    while let Some(id) = queue.pop_front() {
        if id.is_zero() || !seen.insert(id) {
            continue;
        }
        if let Some(node) = nodes.get(&id) {
            if node.kind == KIND_SNAPSHOT {
                snapshots.push(id);
                let snap = SnapshotBody::from_node(id, node).map_err(|e| bad(e.to_string()))?;
                // A snapshot's parent is a snapshot: `log` and `diff` walk that chain.
                if let Some(p) = &snap.body.parent {
                    let parent = crate::model::parse_hash(p).ok_or_else(|| bad(format!("bad parent id {p}")))?;
                    let is_snapshot = match nodes.get(&parent) {
                        Some(n) => n.kind == KIND_SNAPSHOT,
                        None => {
                            pin(&parent);
                            store.contains(&parent)? && store.get_node(&parent)?.kind == KIND_SNAPSHOT
                        }
                    };
                    if !is_snapshot {
                        return Err(bad(format!(
                            "snapshot {}'s parent {} is not a snapshot",
                            id.short(),
                            parent.short()
                        )));
                    }
                }
                for p in &snap.body.parts {
                    if p.kind == PartKind::Workspace {
                        let tree = crate::model::Snapshot::part_id(p)?;
                        let is_file = |h: &Hash| -> Result<bool> {
                            Ok(match entries.get(h) {
                                Some(e) => e.tag == TAG_FILE,
                                None => {
                                    pin(h);
                                    store.has_file_object(h)?
                                }
                            })
                        };
                        crate::workspace::check_tree(store, &nodes, tree, &is_file)
                            .map_err(|e| bad(format!("workspace tree {}: {e}", tree.short())))?;
                    }
                }
            }
            queue.extend(node.links.iter().copied());
            continue;
        }
        if entries.contains_key(&id) {
            continue;
        }
        pin(&id);
        if store.contains(&id)? || store.has_file_object(&id)? {
            report.already_present += 1;
            continue;
        }
        return Err(bad(format!("object {id} is referenced but not in the bundle")));
    }
    // A snapshot this store holds already (as a node: the same bytes sent before as plain data
    // are no snapshot of ours) was made here or imported before: it stays as trusted as it was.
    let mut arriving = Vec::new();
    for id in snapshots {
        if !store.location(&id)?.is_some_and(|l| l.is_node) {
            arriving.push(id);
        }
    }
    // ---- pass 2: write, in one transaction ----
    let staging = crate::engine::tempdir(&store.staging_dir(), "import")?;
    let result = (|| -> Result<()> {
        let mut f = File::open(path).map_err(|e| Error::io(format!("open {}", path.display()), e))?;
        let mut tx = tx.into_inner();
        let mut ordered: Vec<(&Hash, &Entry)> = entries.iter().filter(|(id, _)| seen.contains(*id)).collect();
        ordered.sort_by_key(|(_, e)| e.offset);
        for (id, e) in ordered {
            f.seek(SeekFrom::Start(e.offset)).map_err(|err| Error::io("seek bundle", err))?;
            match e.tag {
                TAG_NODE | TAG_CHUNK => {
                    let mut b = vec![0u8; e.len as usize];
                    f.read_exact(&mut b).map_err(|err| Error::io("read bundle", err))?;
                    let got = if e.tag == TAG_NODE {
                        report.nodes += 1;
                        tx.put_node(&Node::decode(&b, &|| format!("bundle node {id}"))?)?
                    } else {
                        report.chunks += 1;
                        tx.put_chunk(&b)?
                    };
                    if got != *id {
                        return Err(bad(format!("object {} changed while importing", id.short())));
                    }
                }
                _ => {
                    let staged = staging.join(id.to_hex());
                    let mut out =
                        File::create(&staged).map_err(|err| Error::io(format!("create {}", staged.display()), err))?;
                    let mut h = blake3::Hasher::new();
                    let n = copy_hashing(&mut (&mut f).take(e.len), &mut out, e.len, &mut h)
                        .map_err(|err| Error::io("copy file object", err))?;
                    if n != e.len || Hash(*h.finalize().as_bytes()) != *id {
                        return Err(bad(format!("file object {} changed while importing", id.short())));
                    }
                    drop(out);
                    tx.adopt_file_object(&staged, *id)?;
                    report.files += 1;
                }
            }
        }
        tx.set_ref(&format!("imported/{}", root.to_hex()), root)?;
        // What an imported snapshot's configuration names is the exporter's word: see
        // `is_imported`.
        for id in &arriving {
            tx.meta_put(&imported_key(id), Some(b"1"));
        }
        tx.commit()?;
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&staging);
    result.map(|_| report)
}

fn imported_key(snapshot: &Hash) -> String {
    format!("imported-snapshot/{}", snapshot.to_hex())
}

/// Whether snapshot `id` came into this store by import. Such a snapshot's configuration was
/// written elsewhere, so the engine never runs a program it names (a Firecracker binary): its
/// restores start the local one.
pub(crate) fn is_imported(store: &Store, id: &Hash) -> Result<bool> {
    Ok(store.meta_get(&imported_key(id))?.is_some())
}
