//! Property: for any image, any change to it and any dirty set covering the change, incremental
//! ingest onto the parent yields the same manifest as a full ingest, whatever the two sizes.

mod common;

use common::*;
use proptest::prelude::*;
use snapfork_store::{IngestOptions, PageSet};

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn incremental_equals_full(
        pages in 1usize..2100,
        seed in any::<u64>(),
        changes in proptest::collection::vec((0usize..2200, any::<u8>()), 0..40),
        extra_dirty in proptest::collection::vec(0u64..2200, 0..40),
        resize in -3000i64..3000,
        parent_tail in prop_oneof![Just(0usize), 1usize..PAGE],
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let store = open(tmp.path());
        // The parent may end inside a page: its last page is short.
        let mut a = make_image(pages, 3, seed);
        a.truncate(a.len().saturating_sub(parent_tail).max(1));
        let mut b = a.clone();
        let new_len = (a.len() as i64 + resize).max(0) as usize;
        b.resize(new_len, 0xab);
        let mut dirty: PageSet = extra_dirty.into_iter().collect();
        for (p, v) in changes {
            if p * PAGE < b.len() {
                b[p * PAGE] = v;
                dirty.insert(p as u64);
            }
        }
        let ia = store.ingest_image(&write(tmp.path(), "a", &a), &IngestOptions::default(), None).unwrap();
        let pb = write(tmp.path(), "b", &b);
        let full = store.ingest_image(&pb, &IngestOptions::default(), None).unwrap();
        let inc = store.ingest_image(&pb, &IngestOptions { parent: Some(ia.id), dirty: Some(dirty), ..IngestOptions::default() }, None).unwrap();
        prop_assert_eq!(inc.id, full.id);
        let out = tmp.path().join("out");
        store.open_image(&inc.id).unwrap().materialize(&out, None).unwrap();
        prop_assert!(std::fs::read(&out).unwrap() == b);
    }
}
