//! Tree manifests: one store node per directory, so that unchanged subtrees of successive
//! checkpoints are the very same nodes, and the garbage collector reaches every file object
//! through the nodes' links.
//!
//! A directory node (kind [`KIND_DIR`]) has as body `FSD1` followed by its entries sorted by
//! name bytes, each:
//! `name_len u32 | name | kind u8 | mode u32 | uid u32 | gid u32 | size u64 | atime i64 u32 |
//! mtime i64 u32 | rdev u64 | link_group u64 | link u32 | target_len u32 | target |
//! xattr_count u32 | (name_len u32 | name | value_len u32 | value)*`, all little-endian.
//! `link` indexes the node's links (a file's content id or a subdirectory's node id;
//! `u32::MAX` for none), `link_group` is non-zero for files with several hard links inside the
//! tree (equal values are one inode), `target` is a symlink's target bytes.

use crate::error::{Error, Result};
use crate::repo::{Id, NodeData};
use crate::sys::Time;
use crate::walk::Kind;

/// Node kind of a directory listing.
pub const KIND_DIR: u8 = 16;
/// Node kind of a checkpoint (links: root wrapper, then the parent checkpoint if any).
pub const KIND_CHECKPOINT: u8 = 17;
const MAGIC: &[u8; 4] = b"FSD1";

/// One entry of a directory node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestEntry {
    /// Name bytes.
    pub name: Vec<u8>,
    /// Kind.
    pub kind: Kind,
    /// Full st_mode.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size (files and symlinks; 0 for directories).
    pub size: u64,
    /// Access time.
    pub atime: Time,
    /// Modification time.
    pub mtime: Time,
    /// Device number of device nodes.
    pub rdev: u64,
    /// Hard link group (0: none).
    pub link_group: u64,
    /// Content id (files) or node id (directories).
    pub link: Option<Id>,
    /// Symlink target.
    pub target: Vec<u8>,
    /// Extended attributes, sorted by name.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

fn put_u32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_le_bytes());
}
fn put_bytes(b: &mut Vec<u8>, v: &[u8]) {
    put_u32(b, v.len() as u32);
    b.extend_from_slice(v);
}

/// Encodes a directory's entries (sorted here) as a node.
pub fn encode_dir(mut entries: Vec<ManifestEntry>) -> NodeData {
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    let mut body = Vec::with_capacity(16 + entries.len() * 80);
    body.extend_from_slice(MAGIC);
    let mut links = Vec::new();
    for e in &entries {
        put_bytes(&mut body, &e.name);
        body.push(e.kind.code());
        put_u32(&mut body, e.mode);
        put_u32(&mut body, e.uid);
        put_u32(&mut body, e.gid);
        put_u64(&mut body, e.size);
        put_u64(&mut body, e.atime.sec as u64);
        put_u32(&mut body, e.atime.nsec);
        put_u64(&mut body, e.mtime.sec as u64);
        put_u32(&mut body, e.mtime.nsec);
        put_u64(&mut body, e.rdev);
        put_u64(&mut body, e.link_group);
        match e.link {
            Some(id) => {
                put_u32(&mut body, links.len() as u32);
                links.push(id);
            }
            None => put_u32(&mut body, u32::MAX),
        }
        put_bytes(&mut body, &e.target);
        put_u32(&mut body, e.xattrs.len() as u32);
        for (n, v) in &e.xattrs {
            put_bytes(&mut body, n);
            put_bytes(&mut body, v);
        }
    }
    NodeData { kind: KIND_DIR, links, body }
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
    id: Id,
}

impl<'a> Reader<'a> {
    fn err(&self, what: &str) -> Error {
        Error::Corrupt { id: self.id.hex(), reason: format!("{what} at byte {}", self.pos) }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.b.len()).ok_or_else(|| self.err("truncated"))?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Result<u64> {
        let s = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }
    fn bytes(&mut self) -> Result<Vec<u8>> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
    fn time(&mut self) -> Result<Time> {
        let sec = self.u64()? as i64;
        let nsec = self.u32()?;
        Ok(Time { sec, nsec })
    }
}

/// Decodes a directory node (`id` is only used in error messages).
pub fn decode_dir(id: &Id, node: &NodeData) -> Result<Vec<ManifestEntry>> {
    if node.kind != KIND_DIR {
        return Err(Error::Corrupt { id: id.hex(), reason: format!("node kind {} is not a directory", node.kind) });
    }
    let mut r = Reader { b: &node.body, pos: 0, id: *id };
    if r.take(4)? != MAGIC {
        return Err(r.err("bad magic"));
    }
    let mut out = Vec::new();
    while r.pos < r.b.len() {
        let name = r.bytes()?;
        let kind = Kind::from_code(r.u8()?).ok_or_else(|| r.err("bad kind"))?;
        let mode = r.u32()?;
        let uid = r.u32()?;
        let gid = r.u32()?;
        let size = r.u64()?;
        let atime = r.time()?;
        let mtime = r.time()?;
        let rdev = r.u64()?;
        let link_group = r.u64()?;
        let li = r.u32()?;
        let link = if li == u32::MAX {
            None
        } else {
            Some(*node.links.get(li as usize).ok_or_else(|| r.err("link index out of range"))?)
        };
        let target = r.bytes()?;
        let nx = r.u32()?;
        let mut xattrs = Vec::with_capacity(nx.min(64) as usize);
        for _ in 0..nx {
            let n = r.bytes()?;
            let v = r.bytes()?;
            xattrs.push((n, v));
        }
        if name.is_empty() && !out.is_empty() || name.contains(&b'/') || name == b"." || name == b".." {
            return Err(r.err("invalid entry name"));
        }
        out.push(ManifestEntry {
            name,
            kind,
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
            rdev,
            link_group,
            link,
            target,
            xattrs,
        });
    }
    Ok(out)
}

/// What a checkpoint node's body records (JSON).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct CheckpointInfo {
    /// Format version.
    pub v: u32,
    /// The message given with `-m`.
    pub message: Option<String>,
    /// Seconds since the epoch.
    pub time: f64,
    /// The workspace it was taken of (lossy for non-UTF-8 paths).
    pub workspace: String,
    /// The previous checkpoint of that workspace, if any (hex).
    pub parent: Option<String>,
    /// Regular files in the tree.
    pub files: u64,
    /// Logical bytes of regular files.
    pub bytes: u64,
}

/// Decodes a checkpoint node: its info and the id of the root wrapper directory node.
pub fn decode_checkpoint(id: &Id, node: &NodeData) -> Result<(CheckpointInfo, Id)> {
    if node.kind != KIND_CHECKPOINT {
        return Err(Error::NoSuchCheckpoint(format!(
            "{} is not a workspace checkpoint (node kind {})",
            id.short(),
            node.kind
        )));
    }
    let info: CheckpointInfo =
        serde_json::from_slice(&node.body).map_err(|e| Error::Corrupt { id: id.hex(), reason: e.to_string() })?;
    let root = *node.links.first().ok_or_else(|| Error::Corrupt { id: id.hex(), reason: "no root link".into() })?;
    Ok((info, root))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let e = ManifestEntry {
            name: b"caf\xe9".to_vec(),
            kind: Kind::File,
            mode: 0o100644,
            uid: 1,
            gid: 2,
            size: 3,
            atime: Time { sec: -5, nsec: 6 },
            mtime: Time { sec: 7, nsec: 8 },
            rdev: 0,
            link_group: 9,
            link: Some(Id([7; 32])),
            target: vec![],
            xattrs: vec![(b"user.a".to_vec(), b"\0\xff".to_vec())],
        };
        let l = ManifestEntry {
            name: b"l".to_vec(),
            kind: Kind::Symlink,
            link: None,
            target: b"/etc".to_vec(),
            xattrs: vec![],
            ..e.clone()
        };
        let node = encode_dir(vec![l.clone(), e.clone()]);
        let back = decode_dir(&Id::default(), &node).unwrap();
        assert_eq!(back, vec![e, l]);
        let mut bad = node.clone();
        bad.body.truncate(bad.body.len() - 1);
        assert!(decode_dir(&Id::default(), &bad).is_err());
    }
}
