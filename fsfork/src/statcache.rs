//! The stat cache: for each entry of a workspace, the (size, mtime, ctime, inode, device) seen
//! when its content id and extended attributes were last read. An entry whose `lstat` still
//! matches is not read again (ctime changes on every write, chmod, chown and xattr change, and
//! cannot be set by users, so a match means nothing changed).
//!
//! A match proves nothing for a file changed in the same clock tick as it was read: the
//! kernel stamps inodes with a coarse clock (a jiffy; a whole second on filesystems without
//! sub-second times), so a second write in that tick leaves ctime as it was (git's "racily
//! clean" problem). So before reading, a checkpoint lets the clock pass the newest ctime it
//! saw (a jiffy at most, where that is all the tick is) and caches an entry whose ctime is
//! still not older than the clock when reading began as [smudged](CacheEntry::smudge) (read
//! again next time); a restore lets the clock pass the newest ctime it recorded, or smudges.
//!
//! The cache is split by directory: one record per directory holds that directory's entries,
//! sorted by name. A checkpoint rewrites only the records of directories in which something
//! changed, so after 10 edits it writes a few kilobytes instead of the whole cache (1.3 MB for
//! 10,000 files), and it can tell a directory whose every entry is as cached (whose manifest
//! node can be reused as is) with one merge of two sorted lists.

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

    /// Marks the entry as not to be trusted: the next checkpoint reads it again.
    pub fn smudge(&mut self) {
        self.ctime = Time::default();
    }

    /// Whether a write after `start` (the coarse clock, taken before this entry was read)
    /// could leave the entry's ctime as cached.
    pub fn is_racy(&self, start: Time) -> bool {
        self.ctime >= tick_of(self.ctime, start)
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

/// The start of the clock tick holding `t`, at the timestamp granularity `ctime` suggests: a
/// ctime with no nanoseconds comes from a filesystem that keeps whole seconds (or, rarely,
/// fell on one; then the entry is only read once more than needed).
fn tick_of(ctime: Time, t: Time) -> Time {
    if ctime.nsec == 0 { Time { sec: t.sec, nsec: 0 } } else { t }
}

/// How long a checkpoint or restore waits for the clock tick to end rather than leave entries
/// smudged: longer than a jiffy (1 to 10 ms), far shorter than a whole second.
pub const TICK_WAIT: std::time::Duration = std::time::Duration::from_millis(12);

/// Waits until the coarse clock has passed `ctime`'s tick, so that any later change of the
/// entry gives it a newer ctime. False, at once or after [`TICK_WAIT`], if that is further
/// off (a whole-second tick, a clock set back): then the entries as new as the clock must be
/// smudged.
pub fn wait_past(ctime: Time) -> bool {
    let deadline = std::time::Instant::now() + TICK_WAIT;
    loop {
        let now = crate::sys::coarse_now();
        if tick_of(ctime, now) > ctime {
            return true;
        }
        let whole_second_left = (ctime.sec as i128 + 1 - now.sec as i128) * 1_000_000_000 - now.nsec as i128;
        if std::time::Instant::now() > deadline || (ctime.nsec == 0 && whole_second_left > TICK_WAIT.as_nanos() as i128)
        {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_micros(500));
    }
}

/// The cached entries of one directory, sorted by name bytes (names are unique).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirCache {
    /// (name, entry), sorted by name.
    pub entries: Vec<(Vec<u8>, CacheEntry)>,
}

impl DirCache {
    /// The entry called `name`.
    pub fn get(&self, name: &[u8]) -> Option<&CacheEntry> {
        self.entries.binary_search_by(|(n, _)| n.as_slice().cmp(name)).ok().map(|i| &self.entries[i].1)
    }

    /// Encodes the record of the directory at `rel` (relative path bytes; empty for the root).
    pub fn encode(&self, rel: &[u8]) -> Vec<u8> {
        let mut b = Vec::with_capacity(16 + rel.len() + self.entries.len() * 112);
        b.extend_from_slice(MAGIC);
        put_bytes(&mut b, rel);
        for (name, e) in &self.entries {
            put_bytes(&mut b, name);
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
                put_bytes(&mut b, n);
                put_bytes(&mut b, v);
            }
        }
        b
    }

    /// Decodes a record: the directory's relative path and its entries. `None` when damaged
    /// (the caller then treats the directory as uncached: it is only an optimisation).
    pub fn decode(b: &[u8]) -> Option<(Vec<u8>, DirCache)> {
        let mut pos = 0usize;
        let mut take = |n: usize| -> Option<&[u8]> {
            let s = b.get(pos..pos.checked_add(n)?)?;
            pos += n;
            Some(s)
        };
        if take(4)? != MAGIC {
            return None;
        }
        let u32_of = |s: &[u8]| -> Option<u32> { Some(u32::from_le_bytes(s.try_into().ok()?)) };
        let l = u32_of(take(4)?)? as usize;
        let rel = take(l)?.to_vec();
        let mut entries: Vec<(Vec<u8>, CacheEntry)> = Vec::new();
        while let Some(l) = take(4) {
            let l = u32_of(l)? as usize;
            let name = take(l)?.to_vec();
            let mut u = [0u64; 6];
            for v in &mut u {
                *v = u64::from_le_bytes(take(8)?.try_into().ok()?);
            }
            let mn = u32_of(take(4)?)?;
            let cn = u32_of(take(4)?)?;
            let an = u32_of(take(4)?)?;
            let id = match take(1)?[0] {
                1 => Some(Id(take(32)?.try_into().ok()?)),
                _ => None,
            };
            let nx = u32_of(take(4)?)?;
            let mut xattrs = Vec::new();
            for _ in 0..nx {
                let nl = u32_of(take(4)?)? as usize;
                let n = take(nl)?.to_vec();
                let vl = u32_of(take(4)?)? as usize;
                let v = take(vl)?.to_vec();
                xattrs.push((n, v));
            }
            // Sorted and unique, or the merge with a directory listing would be wrong.
            if entries.last().is_some_and(|(prev, _)| prev.as_slice() >= name.as_slice()) {
                return None;
            }
            entries.push((
                name,
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
            ));
        }
        Some((rel, DirCache { entries }))
    }
}

fn put_bytes(b: &mut Vec<u8>, v: &[u8]) {
    b.extend_from_slice(&(v.len() as u32).to_le_bytes());
    b.extend_from_slice(v);
}

/// Directory (relative path bytes, empty for the root) to its cached entries.
#[derive(Clone, Debug, Default)]
pub struct StatCache {
    /// The directories.
    pub dirs: HashMap<Vec<u8>, DirCache>,
}

const MAGIC: &[u8; 4] = b"FSC3";

/// Splits a relative path into its directory and its name (names never contain `/`).
pub fn split_rel(rel: &[u8]) -> (&[u8], &[u8]) {
    match rel.iter().rposition(|&c| c == b'/') {
        Some(i) => (&rel[..i], &rel[i + 1..]),
        None => (&[], rel),
    }
}

impl StatCache {
    /// The entry at relative path `rel`.
    pub fn get(&self, rel: &[u8]) -> Option<&CacheEntry> {
        let (dir, name) = split_rel(rel);
        self.dirs.get(dir)?.get(name)
    }

    /// Adds the entry at relative path `rel`; call [`StatCache::finish`] before lookups.
    pub fn insert(&mut self, rel: &[u8], e: CacheEntry) {
        let (dir, name) = split_rel(rel);
        self.dirs.entry(dir.to_vec()).or_default().entries.push((name.to_vec(), e));
    }

    /// Returns once a change of any entry from now on would change its ctime: waits for the
    /// clock to pass the newest ctime (a jiffy at most where the filesystem keeps nanoseconds)
    /// or, where that is further off, smudges the entries it has not passed.
    pub fn settle(&mut self) {
        let newest = self.dirs.values().flat_map(|d| d.entries.iter().map(|(_, e)| e.ctime)).max();
        if newest.is_none_or(wait_past) {
            return;
        }
        let now = crate::sys::coarse_now();
        for (_, e) in self.dirs.values_mut().flat_map(|d| d.entries.iter_mut()) {
            if e.is_racy(now) {
                e.smudge();
            }
        }
    }

    /// Sorts every directory's entries by name (the last insert of a name wins).
    pub fn finish(&mut self) {
        for d in self.dirs.values_mut() {
            // Stable, so that equal names keep insertion order and the last one can win.
            d.entries.sort_by(|a, b| a.0.cmp(&b.0));
            let mut out: Vec<(Vec<u8>, CacheEntry)> = Vec::with_capacity(d.entries.len());
            for (n, e) in d.entries.drain(..) {
                match out.last_mut() {
                    Some(last) if last.0 == n => last.1 = e,
                    _ => out.push((n, e)),
                }
            }
            d.entries = out;
        }
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
        c.insert(b"a/\xff", CacheEntry::new(&meta, Some(Id([9; 32])), vec![(b"user.x".to_vec(), b"y".to_vec())]));
        c.insert(b"b", CacheEntry::new(&meta, None, vec![]));
        c.insert(b"a/c", CacheEntry::new(&meta, None, vec![]));
        c.finish();
        assert_eq!(c.dirs.len(), 2);
        for (rel, d) in &c.dirs {
            let (back_rel, back) = DirCache::decode(&d.encode(rel)).unwrap();
            assert_eq!(&back_rel, rel);
            assert_eq!(&back, d);
        }
        let a = &c.dirs[b"a".as_slice()];
        assert_eq!(a.entries[0].0, b"c");
        assert!(c.get(b"b").unwrap().matches(&meta));
        assert_eq!(c.get(b"a/\xff").unwrap().id, Some(Id([9; 32])));
        assert!(c.get(b"a/d").is_none());
        let mut other = meta;
        other.ctime.nsec += 1;
        assert!(!c.get(b"b").unwrap().matches(&other));
        // A damaged record is refused, never an error or a wrong entry.
        let enc = a.encode(b"a");
        assert!(DirCache::decode(&enc[..enc.len() - 3]).is_none());
        // Unsorted records are refused too.
        let mut bad = a.clone();
        bad.entries.reverse();
        assert!(DirCache::decode(&bad.encode(b"a")).is_none());
    }

    #[test]
    fn split_paths() {
        assert_eq!(split_rel(b"x"), (&b""[..], &b"x"[..]));
        assert_eq!(split_rel(b"a/b/x"), (&b"a/b"[..], &b"x"[..]));
    }
}
