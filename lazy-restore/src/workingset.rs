//! Working sets: the image pages a restore faulted on, in first-fault order, stored with the
//! snapshot so that later restores prefetch them.
//!
//! Storage: the list is encoded ([`encode`]) and stored as a blob; the ref
//! `attached/<image id hex>/working-set` points at it. An attached ref (see
//! [`snapfork_store::attached_name`]): the blob lives exactly as long as its image, and gc
//! removes both together.
//!
//! Encoding: `b"SFWS1\n"`, the page size (u32 LE), the count (u64 LE), then each page index as a
//! LEB128 varint of the zigzag-encoded difference from the previous index (0 before the first).
//! Working sets are mostly ascending runs, so most entries take one byte.

use snapfork_store::{Hash, Store};

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

/// Stores `pages` as the working set of `image` (replacing any previous one). Returns the blob id.
pub fn save(store: &Store, image: &Hash, page_size: u32, pages: &[u64]) -> Result<Hash> {
    let mut tx = store.begin()?;
    let blob = tx.put_blob(&encode(page_size, pages))?;
    tx.set_ref(&ref_name(image), blob.id)?;
    tx.commit()?;
    Ok(blob.id)
}

/// The stored working set of `image`, if any.
pub fn load(store: &Store, image: &Hash) -> Result<Option<Vec<u64>>> {
    let Some(id) = store.get_ref(&ref_name(image))? else {
        return Ok(None);
    };
    let (_, pages) = decode(&store.get_blob(&id)?)?;
    Ok(Some(pages))
}

/// Deletes the stored working set of `image` (its blob goes at the next gc).
pub fn delete(store: &Store, image: &Hash) -> Result<()> {
    let mut tx = store.begin()?;
    tx.delete_ref(&ref_name(image));
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

/// Reads a page list from text: page indices separated by whitespace or commas, `#` comments,
/// and `a-b` inclusive ranges (the `--pattern FILE` format).
pub fn parse_pattern(text: &str) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("");
        for tok in line.split(|c: char| c.is_whitespace() || c == ',') {
            if tok.is_empty() {
                continue;
            }
            let num = |s: &str| s.parse::<u64>().map_err(|_| Error::WorkingSet(format!("bad page number {s:?}")));
            if let Some((a, b)) = tok.split_once('-') {
                let (a, b) = (num(a)?, num(b)?);
                if b < a {
                    return Err(Error::WorkingSet(format!("empty range {tok}")));
                }
                out.extend(a..=b);
            } else {
                out.push(num(tok)?);
            }
        }
    }
    Ok(out)
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
        assert_eq!(parse_pattern("1, 2 # c\n10-12\n").unwrap(), vec![1, 2, 10, 11, 12]);
        assert!(parse_pattern("x").is_err());
    }
}
