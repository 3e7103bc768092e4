//! Sets of page numbers: dirty logs, the pages a lazy restore installed, working sets.

use crate::error::{Error, Result};

/// A set of page numbers, as a bitmap.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageSet {
    words: Vec<u64>,
}

impl PageSet {
    /// An empty set.
    pub fn new() -> PageSet {
        PageSet::default()
    }

    /// Adds page `i`.
    pub fn insert(&mut self, i: u64) {
        let w = (i / 64) as usize;
        if self.words.len() <= w {
            self.words.resize(w + 1, 0);
        }
        self.words[w] |= 1 << (i % 64);
    }

    /// Adds pages `start..end`.
    pub fn insert_range(&mut self, start: u64, end: u64) {
        for i in start..end {
            self.insert(i);
        }
    }

    /// True when page `i` is in the set.
    pub fn contains(&self, i: u64) -> bool {
        self.words.get((i / 64) as usize).is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    /// True when any page of `start..end` is in the set.
    pub fn any_in(&self, start: u64, end: u64) -> bool {
        (start..end).any(|i| self.contains(i))
    }

    /// How many pages the set holds.
    pub fn len(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// True when the set is empty.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|w| *w == 0)
    }

    /// The pages in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words
            .iter()
            .enumerate()
            .flat_map(|(wi, &w)| (0..64).filter(move |b| w & (1 << b) != 0).map(move |b| wi as u64 * 64 + b))
    }

    /// A KVM-style dirty bitmap: bit `i % 64` of little-endian u64 word `i / 64` is page `i`.
    pub fn from_bitmap(bytes: &[u8]) -> PageSet {
        let mut words: Vec<u64> = bytes
            .chunks(8)
            .map(|c| {
                let mut w = [0u8; 8];
                w[..c.len()].copy_from_slice(c);
                u64::from_le_bytes(w)
            })
            .collect();
        while words.last() == Some(&0) {
            words.pop();
        }
        PageSet { words }
    }

    /// The bitmap form of [`PageSet::from_bitmap`].
    pub fn to_bitmap(&self) -> Vec<u8> {
        self.words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    /// Parses the text form ([`parse_page_list`]); pages must be below `limit`.
    pub fn parse_text(text: &str, limit: u64) -> Result<PageSet> {
        let mut set = PageSet::new();
        for r in parse_page_list(text, limit)? {
            set.insert_range(*r.start(), r.end() + 1);
        }
        Ok(set)
    }

    /// The text form, with runs as ranges.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let mut iter = self.iter().peekable();
        while let Some(start) = iter.next() {
            let mut end = start;
            while iter.peek() == Some(&(end + 1)) {
                end += 1;
                iter.next();
            }
            if start == end {
                out.push_str(&format!("{start}\n"));
            } else {
                out.push_str(&format!("{start}-{end}\n"));
            }
        }
        out
    }
}

impl FromIterator<u64> for PageSet {
    fn from_iter<I: IntoIterator<Item = u64>>(iter: I) -> PageSet {
        let mut s = PageSet::new();
        for i in iter {
            s.insert(i);
        }
        s
    }
}

/// Parses a page list, in order: page numbers or inclusive ranges `A-B`, separated by
/// whitespace, commas or newlines; `#` starts a comment (dirty-page files, working-set patterns).
/// Pages must be below `limit` (the image's page count): a number past it is an error, not a
/// bitmap or list sized to fit it.
pub fn parse_page_list(text: &str, limit: u64) -> Result<Vec<std::ops::RangeInclusive<u64>>> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("");
        for item in line.split(|c: char| c.is_whitespace() || c == ',').filter(|s| !s.is_empty()) {
            let num = |s: &str| {
                s.parse::<u64>().map_err(|_| Error::InvalidInput(format!("bad page number {s:?} in page list")))
            };
            let (a, b) = match item.split_once('-') {
                Some((a, b)) => (num(a)?, num(b)?),
                None => (num(item)?, num(item)?),
            };
            if b < a {
                return Err(Error::InvalidInput(format!("empty page range {item:?}")));
            }
            if b >= limit {
                return Err(Error::InvalidInput(format!("page {b} in page list is past the image's {limit} pages")));
            }
            out.push(a..=b);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_bitmap_round_trip() {
        let s = PageSet::parse_text("1, 3-5\n# comment\n64 200", 201).unwrap();
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![1, 3, 4, 5, 64, 200]);
        assert_eq!(PageSet::parse_text(&s.to_text(), 201).unwrap(), s);
        assert_eq!(PageSet::from_bitmap(&s.to_bitmap()), s);
        assert!(PageSet::parse_text("5-3", 201).is_err());
        assert!(PageSet::parse_text("x", 201).is_err());
        // Numbers past the image are refused before anything is allocated for them.
        assert!(PageSet::parse_text("201", 201).is_err());
        assert!(PageSet::parse_text("0-18446744073709551615", 201).is_err());
    }
}
