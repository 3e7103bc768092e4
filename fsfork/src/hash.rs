//! Content ids: BLAKE3 of a file's bytes, computed from per-block chaining values so that a large
//! file whose extents are still shared with its previous version is re-hashed only where they
//! differ.
//!
//! BLAKE3 is a Merkle tree over 1 KiB chunks in which every aligned power-of-two run of chunks is
//! a subtree. A file is cut into [`BLOCK`]-sized blocks; the chaining value (CV) of each block is
//! kept (32 bytes per 16 KiB, 2 MiB per GiB) and the root is rebuilt from the CVs, giving exactly
//! `blake3::hash(contents)`. When a file changes in a few places, only the blocks whose extents
//! no longer match the previous object (FIEMAP) are read and hashed again.

use std::os::fd::{AsRawFd, BorrowedFd};

use blake3::hazmat::{ChainingValue, HasherExt, Mode, left_subtree_len, merge_subtrees_non_root, merge_subtrees_root};
use rayon::prelude::*;

use crate::sys::{self, Extent};

/// The block size for which chaining values are kept. Small enough that 1% of randomly
/// scattered 4 KiB page writes dirties only ~4% of the blocks.
pub const BLOCK: u64 = 16 * 1024;
/// Files at least this large keep their block CVs so that the next checkpoint can be
/// incremental.
pub const CV_THRESHOLD: u64 = 4 << 20;
/// Blocks read and hashed per task.
const GROUP: u64 = 64;

/// The id of some contents, and the block CVs when the file is large.
#[derive(Clone, Debug)]
pub struct FileHash {
    /// `blake3::hash` of the whole contents.
    pub id: [u8; 32],
    /// CV of each [`BLOCK`] (only for files of at least [`CV_THRESHOLD`] bytes).
    pub cvs: Option<Vec<ChainingValue>>,
    /// Bytes that were actually read and hashed.
    pub hashed_bytes: u64,
}

/// Reads exactly `buf.len()` bytes at `off` (the file must not shrink while being hashed: it is
/// a private reflink in the store's staging area).
fn pread_exact(fd: BorrowedFd<'_>, buf: &mut [u8], off: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: `buf[done..]` is writable for its length.
        let n = unsafe {
            libc::pread64(fd.as_raw_fd(), buf[done..].as_mut_ptr().cast(), buf.len() - done, (off + done as u64) as i64)
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "file shrank while being hashed"));
        }
        done += n as usize;
    }
    Ok(())
}

/// Hashes a whole file of `len` bytes.
pub fn hash_file(fd: BorrowedFd<'_>, len: u64) -> std::io::Result<FileHash> {
    hash_incremental(fd, len, None)
}

/// What is known about the previous version of a file.
pub struct Previous<'a> {
    /// Its length.
    pub len: u64,
    /// Its block CVs.
    pub cvs: &'a [ChainingValue],
    /// For each block of the new file, whether it is known to be identical to the same block of
    /// the previous version.
    pub same: &'a [bool],
}

/// Hashes a file of `len` bytes, reusing the CVs of `prev` for the blocks marked the same.
pub fn hash_incremental(fd: BorrowedFd<'_>, len: u64, prev: Option<Previous<'_>>) -> std::io::Result<FileHash> {
    if len < CV_THRESHOLD {
        let mut buf = vec![0u8; len as usize];
        pread_exact(fd, &mut buf, 0)?;
        let id =
            if len > 128 * 1024 { blake3::Hasher::new().update_rayon(&buf).finalize() } else { blake3::hash(&buf) };
        return Ok(FileHash { id: *id.as_bytes(), cvs: None, hashed_bytes: len });
    }
    let nblocks = len.div_ceil(BLOCK);
    let keep = prev.as_ref().map(|p| reusable(len, p));
    let reusable = |b: u64| -> Option<ChainingValue> {
        if !*keep.as_ref()?.get(b as usize)? {
            return None;
        }
        prev.as_ref()?.cvs.get(b as usize).copied()
    };
    let groups: Vec<u64> = (0..nblocks.div_ceil(GROUP)).collect();
    let results: Vec<std::io::Result<(Vec<ChainingValue>, u64)>> = groups
        .par_iter()
        .map(|&g| {
            let first = g * GROUP;
            let last = ((g + 1) * GROUP).min(nblocks);
            let mut cvs = Vec::with_capacity((last - first) as usize);
            let mut buf = Vec::new();
            let mut hashed = 0u64;
            let mut b = first;
            while b < last {
                if let Some(cv) = reusable(b) {
                    cvs.push(cv);
                    b += 1;
                    continue;
                }
                // Read the whole run of blocks that must be hashed in one pread.
                let mut end = b + 1;
                while end < last && reusable(end).is_none() {
                    end += 1;
                }
                let off = b * BLOCK;
                let n = ((end * BLOCK).min(len) - off) as usize;
                buf.resize(n, 0);
                pread_exact(fd, &mut buf, off)?;
                for (k, chunk) in buf.chunks(BLOCK as usize).enumerate() {
                    let cv = blake3::Hasher::new()
                        .set_input_offset(off + k as u64 * BLOCK)
                        .update(chunk)
                        .finalize_non_root();
                    cvs.push(cv);
                }
                hashed += n as u64;
                b = end;
            }
            Ok((cvs, hashed))
        })
        .collect();
    let mut cvs = Vec::with_capacity(nblocks as usize);
    let mut hashed_bytes = 0;
    for r in results {
        let (c, h) = r?;
        cvs.extend(c);
        hashed_bytes += h;
    }
    let id = root_from_cvs(&cvs, len);
    Ok(FileHash { id, cvs: Some(cvs), hashed_bytes })
}

/// For each block of a file of `len` bytes, whether its CV can be taken from `prev`: the block
/// is marked the same and had the same length before.
pub fn reusable(len: u64, prev: &Previous<'_>) -> Vec<bool> {
    let nblocks = len.div_ceil(BLOCK);
    (0..nblocks)
        .map(|b| {
            let block_len = (len - b * BLOCK).min(BLOCK);
            let plen = prev.len.checked_sub(b * BLOCK).map(|l| l.min(BLOCK));
            prev.same.get(b as usize).copied().unwrap_or(false)
                && plen == Some(block_len)
                && (b as usize) < prev.cvs.len()
        })
        .collect()
}

/// Hashes `blocks` of the `len`-byte file `fd` again, replacing their CVs in `h` and its id;
/// returns the bytes read.
pub fn rehash_blocks(fd: BorrowedFd<'_>, len: u64, h: &mut FileHash, blocks: &[u64]) -> std::io::Result<u64> {
    let Some(cvs) = h.cvs.as_mut() else {
        return Err(std::io::Error::other("no block CVs to update"));
    };
    let fresh: Vec<std::io::Result<(u64, ChainingValue, u64)>> = blocks
        .par_iter()
        .map(|&b| {
            let off = b * BLOCK;
            let n = (len - off).min(BLOCK) as usize;
            let mut buf = vec![0u8; n];
            pread_exact(fd, &mut buf, off)?;
            Ok((b, blake3::Hasher::new().set_input_offset(off).update(&buf).finalize_non_root(), n as u64))
        })
        .collect();
    let mut read = 0;
    for r in fresh {
        let (b, cv, n) = r?;
        let slot = cvs.get_mut(b as usize).ok_or_else(|| std::io::Error::other("block beyond the file"))?;
        *slot = cv;
        read += n;
    }
    h.id = root_from_cvs(cvs, len);
    h.hashed_bytes += read;
    Ok(read)
}

/// The BLAKE3 root hash of `len` bytes (more than one block) from their block CVs.
pub fn root_from_cvs(cvs: &[ChainingValue], len: u64) -> [u8; 32] {
    debug_assert!(len > BLOCK && cvs.len() as u64 == len.div_ceil(BLOCK));
    fn subtree(cvs: &[ChainingValue], len: u64) -> ChainingValue {
        if cvs.len() == 1 {
            return cvs[0];
        }
        let left = left_subtree_len(len);
        let n = (left / BLOCK) as usize;
        // Large subtrees on both cores: a 1 GiB file has 65,536 CVs to merge (checked at
        // every incremental checkpoint).
        let (l, r) = if cvs.len() > 8192 {
            rayon::join(|| subtree(&cvs[..n], left), || subtree(&cvs[n..], len - left))
        } else {
            (subtree(&cvs[..n], left), subtree(&cvs[n..], len - left))
        };
        merge_subtrees_non_root(&l, &r, Mode::Hash)
    }
    let left = left_subtree_len(len);
    let n = (left / BLOCK) as usize;
    let (l, r) = rayon::join(|| subtree(&cvs[..n], left), || subtree(&cvs[n..], len - left));
    *merge_subtrees_root(&l, &r, Mode::Hash).as_bytes()
}

/// FIEMAP_EXTENT_ENCODED (compressed): addresses are not per byte.
const FIEMAP_EXTENT_ENCODED: u32 = 0x8;

/// For each [`BLOCK`] of a file of `new_len` bytes, whether it provably holds the same bytes as
/// the same block of `old` (of `old_len` bytes): both ranges are holes, or both map to the very
/// same device addresses (shared extents of a reflink). Anything uncertain counts as changed.
pub fn same_blocks(new: BorrowedFd<'_>, new_len: u64, old: BorrowedFd<'_>, old_len: u64) -> std::io::Result<Vec<bool>> {
    // `new` is a fresh reflink and `old` an immutable object: neither has dirty data, and
    // delayed allocations would show up flagged (and count as changed) anyway.
    let a = sys::fiemap(new, false)?;
    let b = sys::fiemap(old, false)?;
    Ok(same_blocks_from_extents(&a, new_len, &b, old_len))
}

/// A run of bytes: mapped at `phys` (`None` for a hole), and whether the address is reliable.
#[derive(Clone, Copy, Debug)]
struct Seg {
    start: u64,
    end: u64,
    phys: Option<u64>,
    reliable: bool,
}

fn segments(ext: &[Extent], len: u64) -> Vec<Seg> {
    let mut out = Vec::with_capacity(ext.len() * 2 + 1);
    let mut pos = 0u64;
    let mut sorted: Vec<&Extent> = ext.iter().collect();
    sorted.sort_by_key(|e| e.logical);
    for e in sorted {
        let s = e.logical.max(pos);
        let end = (e.logical + e.length).min(len);
        if s >= end {
            continue;
        }
        if s > pos {
            out.push(Seg { start: pos, end: s, phys: None, reliable: true });
        }
        let reliable = e.flags & (sys::FIEMAP_UNRELIABLE | FIEMAP_EXTENT_ENCODED) == 0;
        out.push(Seg { start: s, end, phys: Some(e.physical + (s - e.logical)), reliable });
        pos = end;
    }
    if pos < len {
        out.push(Seg { start: pos, end: len, phys: None, reliable: true });
    }
    out
}

/// The pure part of [`same_blocks`].
pub fn same_blocks_from_extents(new: &[Extent], new_len: u64, old: &[Extent], old_len: u64) -> Vec<bool> {
    let nblocks = new_len.div_ceil(BLOCK) as usize;
    let mut same = vec![true; nblocks];
    let common = new_len.min(old_len);
    // Everything past the old end differs.
    for (b, s) in same.iter_mut().enumerate() {
        if (b as u64 + 1) * BLOCK > common && (b as u64) * BLOCK < new_len && common < new_len {
            *s = false;
        }
    }
    let a = segments(new, common);
    let o = segments(old, common);
    let (mut i, mut j, mut x) = (0usize, 0usize, 0u64);
    let mark = |from: u64, to: u64, same: &mut Vec<bool>| {
        let (fb, lb) = (from / BLOCK, (to - 1) / BLOCK);
        for b in fb..=lb {
            if let Some(s) = same.get_mut(b as usize) {
                *s = false;
            }
        }
    };
    while i < a.len() && j < o.len() && x < common {
        let (sa, so) = (a[i], o[j]);
        let next = sa.end.min(so.end);
        let equal = match (sa.phys, so.phys) {
            (None, None) => true,
            (Some(pa), Some(po)) => sa.reliable && so.reliable && pa + (x - sa.start) == po + (x - so.start),
            _ => false,
        };
        if !equal {
            mark(x, next, &mut same);
        }
        x = next;
        if sa.end == next {
            i += 1;
        }
        if so.end == next {
            j += 1;
        }
    }
    same
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;

    #[test]
    fn block_cvs_give_the_blake3_hash() {
        for len in [CV_THRESHOLD, CV_THRESHOLD + 1, CV_THRESHOLD + BLOCK - 1, 5 * CV_THRESHOLD / 2 + 12345, 3 << 22] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4093) as u8).collect();
            let mut f = tempfile_in_tmp();
            f.write_all(&data).unwrap();
            let h = hash_file(f.as_fd(), len).unwrap();
            assert_eq!(h.id, *blake3::hash(&data).as_bytes(), "len {len}");
            assert_eq!(h.hashed_bytes, len);
            // Change one byte and rehash reusing every other block.
            let mut data2 = data.clone();
            let pos = (len / 3) as usize;
            data2[pos] ^= 0xff;
            let mut f2 = tempfile_in_tmp();
            f2.write_all(&data2).unwrap();
            let cvs = h.cvs.unwrap();
            let mut same = vec![true; cvs.len()];
            same[pos / BLOCK as usize] = false;
            let h2 = hash_incremental(f2.as_fd(), len, Some(Previous { len, cvs: &cvs, same: &same })).unwrap();
            assert_eq!(h2.id, *blake3::hash(&data2).as_bytes());
            assert_eq!(h2.hashed_bytes, BLOCK);
        }
    }

    #[test]
    fn small_files_hash_directly() {
        let mut f = tempfile_in_tmp();
        f.write_all(b"hello").unwrap();
        assert_eq!(hash_file(f.as_fd(), 5).unwrap().id, *blake3::hash(b"hello").as_bytes());
        let f = tempfile_in_tmp();
        assert_eq!(hash_file(f.as_fd(), 0).unwrap().id, *blake3::hash(b"").as_bytes());
    }

    #[test]
    fn extent_comparison() {
        let e = |logical, physical, length| Extent { logical, physical, length, flags: 0 };
        let len = 8 * BLOCK;
        let old = vec![e(0, 1_000_000, 8 * BLOCK)];
        // Block 3 remapped (copy-on-write), the rest shared.
        let new = vec![
            e(0, 1_000_000, 3 * BLOCK),
            e(3 * BLOCK, 9_000_000, BLOCK),
            e(4 * BLOCK, 1_000_000 + 4 * BLOCK, 4 * BLOCK),
        ];
        let same = same_blocks_from_extents(&new, len, &old, len);
        assert_eq!(same, vec![true, true, true, false, true, true, true, true]);
        // A hole in the new file where the old one had data.
        let new = vec![e(0, 1_000_000, 2 * BLOCK), e(5 * BLOCK, 1_000_000 + 5 * BLOCK, 3 * BLOCK)];
        let same = same_blocks_from_extents(&new, len, &old, len);
        assert_eq!(same, vec![true, true, false, false, false, true, true, true]);
        // Growth: new blocks differ.
        let same = same_blocks_from_extents(&old, 10 * BLOCK, &old, len);
        assert_eq!(same[8..], [false, false]);
        // Delayed allocation is never trusted.
        let new = vec![Extent { flags: 0x4, ..e(0, 1_000_000, 8 * BLOCK) }];
        assert!(same_blocks_from_extents(&new, len, &old, len).iter().all(|s| !s));
    }

    fn tempfile_in_tmp() -> std::fs::File {
        tempfile::tempfile().unwrap()
    }
}
