//! The stat cache: for each path of a workspace, the (size, mtime, ctime, inode, device) seen
//! when its content id and extended attributes were last read. An entry whose `lstat` still
//! matches is not read again (ctime changes on every write, chmod, chown and xattr change, and
//! cannot be set by users, so a match means nothing changed).

use std::collections::HashMap;

use crate::repo::Id;
use crate::sys::Time;
use crate::walk::Meta;

/// One cached entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheEntry {
    /// Size.
    pub size: u64,
    /// Modification time.
    pub mtime: Time,
    /// Access time (not part of the match: reading a file changes it without changing the
    /// file; used to tell whether a directory's manifest node is exactly as before).
    pub atime: Time,
    /// Status change time.
    pub ctime: Time,
    /// Inode number.
    pub ino: u64,
    /// Device.
    pub dev: u64,
    /// Content id of a regular file, or node id of a directory.
    pub id: Option<Id>,
    /// Extended attributes.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl CacheEntry {
    /// A cache entry for `meta`.
    pub fn new(meta: &Meta, id: Option<Id>, xattrs: Vec<(Vec<u8>, Vec<u8>)>) -> Self {
        CacheEntry {
            size: meta.size,
            mtime: meta.mtime,
            atime: meta.atime,
            ctime: meta.ctime,
            ino: meta.ino,
            dev: meta.dev,
            id,
            xattrs,
        }
    }

    /// Whether `meta` shows the entry unchanged since it was cached.
    pub fn matches(&self, meta: &Meta) -> bool {
        self.size == meta.size
            && self.mtime == meta.mtime
            && self.ctime == meta.ctime
            && self.ino == meta.ino
            && self.dev == meta.dev
    }
}

/// Path (relative, raw bytes) to cached entry.
#[derive(Clone, Debug, Default)]
pub struct StatCache {
    /// The entries.
    pub entries: HashMap<Vec<u8>, CacheEntry>,
}

const MAGIC: &[u8; 4] = b"FSC2";

impl StatCache {
    /// Encodes the cache.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(16 + self.entries.len() * 96);
        b.extend_from_slice(MAGIC);
        for (path, e) in &self.entries {
            b.extend_from_slice(&(path.len() as u32).to_le_bytes());
            b.extend_from_slice(path);
            for v in [e.size, e.mtime.sec as u64, e.ctime.sec as u64, e.ino, e.dev, e.atime.sec as u64] {
                b.extend_from_slice(&v.to_le_bytes());
            }
            b.extend_from_slice(&e.mtime.nsec.to_le_bytes());
            b.extend_from_slice(&e.ctime.nsec.to_le_bytes());
            b.extend_from_slice(&e.atime.nsec.to_le_bytes());
            match e.id {
                Some(id) => {
                    b.push(1);
                    b.extend_from_slice(&id.0);
                }
                None => b.push(0),
            }
            b.extend_from_slice(&(e.xattrs.len() as u32).to_le_bytes());
            for (n, v) in &e.xattrs {
                b.extend_from_slice(&(n.len() as u32).to_le_bytes());
                b.extend_from_slice(n);
                b.extend_from_slice(&(v.len() as u32).to_le_bytes());
                b.extend_from_slice(v);
            }
        }
        b
    }

    /// Decodes a cache; a damaged cache is simply empty (it is only an optimisation).
    pub fn decode(b: &[u8]) -> StatCache {
        Self::try_decode(b).unwrap_or_else(|| {
            tracing::warn!("stat cache unreadable; every file will be hashed");
            StatCache::default()
        })
    }

    fn try_decode(b: &[u8]) -> Option<StatCache> {
        let mut pos = 0usize;
        let mut take = |n: usize| -> Option<&[u8]> {
            let s = b.get(pos..pos.checked_add(n)?)?;
            pos += n;
            Some(s)
        };
        if take(4)? != MAGIC {
            return None;
        }
        let mut entries = HashMap::new();
        while let Some(l) = take(4) {
            let l = u32::from_le_bytes(l.try_into().ok()?) as usize;
            let path = take(l)?.to_vec();
            let mut u = [0u64; 6];
            for v in &mut u {
                *v = u64::from_le_bytes(take(8)?.try_into().ok()?);
            }
            let mn = u32::from_le_bytes(take(4)?.try_into().ok()?);
            let cn = u32::from_le_bytes(take(4)?.try_into().ok()?);
            let an = u32::from_le_bytes(take(4)?.try_into().ok()?);
            let id = match take(1)?[0] {
                1 => Some(Id(take(32)?.try_into().ok()?)),
                _ => None,
            };
            let nx = u32::from_le_bytes(take(4)?.try_into().ok()?);
            let mut xattrs = Vec::new();
            for _ in 0..nx {
                let nl = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
                let n = take(nl)?.to_vec();
                let vl = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
                let v = take(vl)?.to_vec();
                xattrs.push((n, v));
            }
            entries.insert(
                path,
                CacheEntry {
                    size: u[0],
                    mtime: Time { sec: u[1] as i64, nsec: mn },
                    ctime: Time { sec: u[2] as i64, nsec: cn },
                    atime: Time { sec: u[5] as i64, nsec: an },
                    ino: u[3],
                    dev: u[4],
                    id,
                    xattrs,
                },
            );
        }
        Some(StatCache { entries })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_damage() {
        let mut c = StatCache::default();
        let meta = Meta {
            size: 5,
            mtime: Time { sec: 1, nsec: 2 },
            atime: Time { sec: 3, nsec: 4 },
            ctime: Time { sec: 5, nsec: 6 },
            ino: 7,
            dev: 8,
            ..Meta::default()
        };
        c.entries.insert(
            b"a/\xff".to_vec(),
            CacheEntry::new(&meta, Some(Id([9; 32])), vec![(b"user.x".to_vec(), b"y".to_vec())]),
        );
        c.entries.insert(b"b".to_vec(), CacheEntry::new(&meta, None, vec![]));
        let back = StatCache::decode(&c.encode());
        assert_eq!(back.entries, c.entries);
        assert!(back.entries[&b"b".to_vec()].matches(&meta));
        let mut other = meta;
        other.ctime.nsec += 1;
        assert!(!back.entries[&b"b".to_vec()].matches(&other));
        // A damaged cache is an empty cache, never an error.
        let enc = c.encode();
        assert!(StatCache::decode(&enc[..enc.len() - 3]).entries.is_empty());
    }
}
