//! Fixed-size bitmaps: plain for the serving thread, atomic where the prefetch reader peeks.

use std::sync::atomic::{AtomicU64, Ordering};

/// A plain bitmap.
#[derive(Debug, Clone, Default)]
pub struct Bitmap {
    words: Vec<u64>,
    len: u64,
}

impl Bitmap {
    /// `len` cleared bits.
    pub fn new(len: u64) -> Self {
        Bitmap { words: vec![0; len.div_ceil(64) as usize], len }
    }
    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.len
    }
    /// True when the bitmap holds no bits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Bit `i` (false when out of range).
    pub fn get(&self, i: u64) -> bool {
        i < self.len && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }
    /// Sets bit `i` to `v`; returns the old value.
    pub fn set(&mut self, i: u64, v: bool) -> bool {
        if i >= self.len {
            return false;
        }
        let w = &mut self.words[(i / 64) as usize];
        let old = *w & (1 << (i % 64)) != 0;
        if v {
            *w |= 1 << (i % 64);
        } else {
            *w &= !(1 << (i % 64));
        }
        old
    }
    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| w.count_ones() as u64).sum()
    }
    /// Indices of the set bits, ascending.
    pub fn iter_ones(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.len).filter(|&i| self.get(i))
    }
}

/// A bitmap shared between threads (relaxed: `installed` is a hint for the readers, written by
/// the serving thread alone; `claimed` is an ownership token taken with [`AtomicBitmap::claim`]).
#[derive(Debug)]
pub struct AtomicBitmap {
    words: Vec<AtomicU64>,
    len: u64,
}

impl AtomicBitmap {
    /// `len` cleared bits.
    pub fn new(len: u64) -> Self {
        AtomicBitmap { words: (0..len.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(), len }
    }
    /// Bit `i` (false when out of range).
    pub fn get(&self, i: u64) -> bool {
        i < self.len && self.words[(i / 64) as usize].load(Ordering::Relaxed) & (1 << (i % 64)) != 0
    }
    /// Sets bit `i` to `v`.
    pub fn set(&self, i: u64, v: bool) {
        if i >= self.len {
            return;
        }
        let w = &self.words[(i / 64) as usize];
        if v {
            w.fetch_or(1 << (i % 64), Ordering::Relaxed);
        } else {
            w.fetch_and(!(1 << (i % 64)), Ordering::Relaxed);
        }
    }
    /// Sets bit `i`; true when this call set it (it was clear): an atomic claim, so of several
    /// threads claiming one bit exactly one wins.
    pub fn claim(&self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        let bit = 1 << (i % 64);
        self.words[(i / 64) as usize].fetch_or(bit, Ordering::Relaxed) & bit == 0
    }
    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| w.load(Ordering::Relaxed).count_ones() as u64).sum()
    }
}
