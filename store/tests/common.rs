//! Helpers shared by the store's integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng, rngs::StdRng};
use snapfork_store::{OpenOptions, Store};

pub const PAGE: usize = 4096;

pub fn open(dir: &Path) -> Store {
    Store::open(dir.join("store"), OpenOptions::default()).expect("open store")
}

/// An image of `pages` pages: every `zero_every`-th page zero, the rest random but compressible
/// (a random 256-byte pattern repeated, like heap pages).
pub fn make_image(pages: usize, zero_every: usize, seed: u64) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut data = vec![0u8; pages * PAGE];
    for (i, page) in data.chunks_mut(PAGE).enumerate() {
        if zero_every != 0 && i % zero_every == 0 {
            continue;
        }
        let mut pattern = [0u8; 256];
        rng.fill(&mut pattern[..]);
        for (j, b) in page.iter_mut().enumerate() {
            *b = if j % 512 < 256 { pattern[j % 256] } else { rng.random() };
        }
    }
    data
}

pub fn write(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).expect("write image");
    p
}

/// Whether the process is root. If not, says so loudly and fails, unless `SNAPFORK_ALLOW_SKIP=1`
/// (a local run without root), where the test is skipped.
pub fn require_root(test: &str, why: &str) -> bool {
    // SAFETY: geteuid has no preconditions and touches no memory of ours.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    eprintln!("!!!!!!!! {test}: needs root ({why}); NOT RUN !!!!!!!!");
    if std::env::var("SNAPFORK_ALLOW_SKIP").as_deref() == Ok("1") {
        return false;
    }
    panic!("{test} needs root; set SNAPFORK_ALLOW_SKIP=1 to skip");
}
