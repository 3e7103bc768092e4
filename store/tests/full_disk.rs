//! A store whose filesystem fills up in the middle of an ingest: the ingest stops while the room
//! kept for the index is still free (RocksDB aborts the process when its own disk fills), fails
//! with a clear error, and commits nothing; nothing committed before is lost, the store opens and
//! verifies, gc gives the half-written pack bytes back, and ingests work again once there is
//! room. Needs root (it mounts a small tmpfs); CI runs as root.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use rand::RngCore;
use snapfork_store::{Error, GcOptions, IngestOptions, OpenOptions, Store};

fn random(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rng().fill_bytes(&mut v);
    v
}

fn packs_bytes(store_dir: &Path) -> u64 {
    std::fs::read_dir(store_dir.join("packs")).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum()
}

struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn an_ingest_that_fills_the_disk_fails_cleanly_and_loses_nothing() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "!!!!!!!! an_ingest_that_fills_the_disk_fails_cleanly_and_loses_nothing: needs root: NOT RUN !!!!!!!!"
        );
        assert_eq!(std::env::var("SNAPFORK_ALLOW_SKIP").as_deref(), Ok("1"), "needs root; SNAPFORK_ALLOW_SKIP=1 skips");
        return;
    }
    let outer = tempfile::Builder::new().prefix("sf-store-full-").tempdir_in("/var/tmp").unwrap();
    let small = outer.path().join("small");
    std::fs::create_dir(&small).unwrap();
    let st = std::process::Command::new("mount").args(["-t", "tmpfs", "-o", "size=24m", "tmpfs"]).arg(&small).status();
    assert!(st.unwrap().success(), "mount tmpfs");
    let _unmount = Unmount(small.clone());
    // The default reserve (64 MiB) is larger than this whole filesystem.
    let opts = OpenOptions { min_free_bytes: 8 << 20, ..Default::default() };
    let open = |dir: &Path| Store::open(dir.join("store"), opts.clone()).unwrap();
    let store = open(&small);
    let a = random(4 << 20);
    let a_path = write(outer.path(), "a.raw", &a);
    store.ingest_image(&a_path, &IngestOptions::default(), Some("a")).unwrap();
    let before = packs_bytes(&small.join("store"));

    // 32 MiB that does not compress, into what is left of 24 MiB.
    let b_path = write(outer.path(), "b.raw", &random(32 << 20));
    let err = store.ingest_image(&b_path, &IngestOptions::default(), Some("b")).unwrap_err();
    assert!(matches!(err, Error::Full { .. }), "{err}");
    assert!(err.to_string().contains("nearly full"), "{err}");
    assert!(packs_bytes(&small.join("store")) > before, "the failed ingest wrote nothing?");
    assert!(snapfork_store::free_bytes(&small).unwrap() > 2 << 20, "the reserve was not kept");
    assert!(store.get_ref("b").unwrap().is_none());

    // Everything committed before is there, byte for byte, also after reopening.
    drop(store);
    let store = open(&small);
    let out = outer.path().join("a.out");
    store.open_image_ref("a").unwrap().materialize(&out, None).unwrap();
    assert!(std::fs::read(&out).unwrap() == a);
    assert!(store.verify(None, None).unwrap().is_ok());

    // gc gives the half-written pack back; then there is room for the next ingest.
    store.gc(&GcOptions { grace: Duration::ZERO, ..Default::default() }).unwrap();
    assert_eq!(packs_bytes(&small.join("store")), before);
    let c_path = write(outer.path(), "c.raw", &random(4 << 20));
    store.ingest_image(&c_path, &IngestOptions::default(), Some("c")).unwrap();
    assert!(store.verify(None, None).unwrap().is_ok());
}
