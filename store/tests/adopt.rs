//! Adopting a file as a pack of raw chunks (`Txn::adopt_file_as_blobs`): the same blobs as a
//! copying ingest, no second copy of the bytes, verifiable, reclaimable, and nothing left behind
//! by an abandoned transaction.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use common::*;
use rand::RngCore;
use snapfork_store::{BlobInfo, GcOptions};

const SEGMENT: u64 = 1 << 20;

fn random(len: usize, seed: u8) -> Vec<u8> {
    let mut v = vec![seed; len];
    rand::rng().fill_bytes(&mut v);
    v
}

fn adopt(store: &snapfork_store::Store, path: &Path, name: &str) -> Vec<BlobInfo> {
    let mut tx = store.begin().unwrap();
    let infos = tx.adopt_file_as_blobs(path, SEGMENT).unwrap();
    for (k, info) in infos.iter().enumerate() {
        tx.set_ref(&format!("{name}.{k}"), info.id).unwrap();
    }
    tx.commit().unwrap();
    infos
}

fn read_back(store: &snapfork_store::Store, infos: &[BlobInfo]) -> Vec<u8> {
    infos.iter().flat_map(|i| store.get_blob(&i.id).unwrap()).collect()
}

fn ids(infos: &[BlobInfo]) -> Vec<snapfork_store::Hash> {
    infos.iter().map(|i| i.id).collect()
}

fn packs(store: &snapfork_store::Store) -> Vec<fs::Metadata> {
    fs::read_dir(store.dir().join("packs")).unwrap().map(|e| e.unwrap().metadata().unwrap()).collect()
}

#[test]
fn an_adopted_file_reads_back_as_the_same_blobs_a_copying_ingest_makes_without_a_copy() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let data = random(3 * SEGMENT as usize + 12_345, 1);
    let path = write(tmp.path(), "checkpoint.img", &data);
    let infos = adopt(&store, &path, "img");
    assert_eq!(infos.len(), 4);
    assert_eq!(infos.iter().map(|i| i.size).sum::<u64>(), data.len() as u64);
    assert_eq!(read_back(&store, &infos), data);
    // The file is one of the store's packs: same inode, two names, no second copy of its bytes.
    let ino = fs::metadata(&path).unwrap().ino();
    assert!(packs(&store).iter().any(|m| m.ino() == ino), "the file was not linked into the packs");
    assert_eq!(fs::metadata(&path).unwrap().nlink(), 2);
    // A copying ingest of each segment makes exactly the same blobs.
    let other = open(&tmp.path().join("other"));
    for (k, info) in infos.iter().enumerate() {
        let seg = &data[k * SEGMENT as usize..][..info.size as usize];
        let mut tx = other.begin().unwrap();
        assert_eq!(tx.put_blob(seg).unwrap().id, info.id, "segment {k}");
    }
    assert!(store.verify(None, None).unwrap().is_ok());
}

#[test]
fn adopted_chunks_dedupe_against_the_store_and_the_store_survives_gc() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let v1 = random(2 * SEGMENT as usize, 2);
    let mut v2 = v1.clone();
    v2[1_500_000..1_500_100].copy_from_slice(&[7u8; 100]);
    let a = adopt(&store, &write(tmp.path(), "v1", &v1), "v1");
    let b = adopt(&store, &write(tmp.path(), "v2", &v2), "v2");
    let (chunks, new): (u64, u64) = (b.iter().map(|i| i.chunks).sum(), b.iter().map(|i| i.new_chunks).sum());
    assert!(new <= 2, "one changed range re-stored {new} of {chunks} chunks");
    // Without v1's refs, gc reclaims what only v1 used; v2 (partly in v1's file) still reads.
    let mut tx = store.begin().unwrap();
    for k in 0..a.len() {
        tx.delete_ref(&format!("v1.{k}"));
    }
    tx.commit().unwrap();
    let report = store.gc(&GcOptions { grace: Duration::ZERO, ..GcOptions::default() }).unwrap();
    assert!(report.removed_chunks >= 1, "{report:?}");
    assert_eq!(read_back(&store, &b), v2);
    assert!(store.verify(None, None).unwrap().is_ok());
}

#[test]
fn a_changed_byte_in_an_adopted_file_is_caught_by_verify_and_on_read() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let data = random(SEGMENT as usize, 3);
    let path = write(tmp.path(), "img", &data);
    let infos = adopt(&store, &path, "img");
    // Writing through the caller's name changes the pack: exactly what the store must catch.
    use std::os::unix::fs::FileExt;
    fs::OpenOptions::new().write(true).open(&path).unwrap().write_all_at(&[data[500_000] ^ 1], 500_000).unwrap();
    let report = store.verify(None, None).unwrap();
    assert_eq!(report.damaged.len(), 1, "{report:?}");
    let err = store.get_blob(&infos[0].id).unwrap_err();
    assert!(err.is_corruption(), "{err}");
}

#[test]
fn an_abandoned_adoption_leaves_the_file_and_nothing_in_the_store() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let data = random(SEGMENT as usize / 2, 4);
    let path = write(tmp.path(), "img", &data);
    let mut tx = store.begin().unwrap();
    let infos = tx.adopt_file_as_blobs(&path, SEGMENT).unwrap();
    drop(tx);
    assert!(packs(&store).iter().all(|m| m.ino() != fs::metadata(&path).unwrap().ino()));
    assert_eq!(fs::metadata(&path).unwrap().nlink(), 1);
    assert_eq!(fs::read(&path).unwrap(), data);
    assert!(store.get_blob(&infos[0].id).is_err());
}

#[test]
fn a_file_on_another_filesystem_is_copied_into_the_same_blobs() {
    let tmp = tempfile::tempdir().unwrap();
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let (dev_a, dev_b) = (fs::metadata(tmp.path()).unwrap().dev(), fs::metadata(shm.path()).unwrap().dev());
    assert_ne!(dev_a, dev_b, "this test needs /dev/shm on another filesystem than the temp dir");
    let store = open(tmp.path());
    let data = random(2 * SEGMENT as usize + 77, 5);
    let path = write(shm.path(), "img", &data);
    let infos = adopt(&store, &path, "img");
    assert_eq!(fs::metadata(&path).unwrap().nlink(), 1, "nothing links across filesystems");
    assert_eq!(read_back(&store, &infos), data);
    let again = adopt(&store, &write(tmp.path(), "same", &data), "same");
    assert_eq!(ids(&infos), ids(&again));
}

#[test]
fn an_adopted_file_links_back_as_one_verified_file_and_a_deduplicated_one_does_not() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let v1 = random(2 * SEGMENT as usize + 999, 6);
    let path = write(tmp.path(), "v1", &v1);
    let a = adopt(&store, &path, "v1");
    let dest = tmp.path().join("restored.img");
    assert!(store.link_blobs_as_file(&ids(&a), &dest).unwrap());
    assert_eq!(fs::read(&dest).unwrap(), v1);
    assert_eq!(fs::metadata(&dest).unwrap().ino(), fs::metadata(&path).unwrap().ino());
    // Part of the blobs, or a file whose chunks partly live in an older pack: no single file.
    let part = tmp.path().join("part.img");
    assert!(!store.link_blobs_as_file(&ids(&a)[1..], &part).unwrap());
    let mut v2 = v1.clone();
    v2[100] ^= 1;
    let b = adopt(&store, &write(tmp.path(), "v2", &v2), "v2");
    let other = tmp.path().join("v2.img");
    assert!(!store.link_blobs_as_file(&ids(&b), &other).unwrap());
    assert!(!other.exists() && !part.exists());
    // A damaged byte is named (blob and chunk) rather than linked.
    fs::remove_file(&dest).unwrap();
    use std::os::unix::fs::FileExt;
    fs::OpenOptions::new().write(true).open(&path).unwrap().write_all_at(&[v1[SEGMENT as usize] ^ 1], SEGMENT).unwrap();
    let err = store.link_blobs_as_file(&ids(&a), &dest).unwrap_err();
    assert!(err.is_corruption() && err.to_string().contains(&format!("blob {}", a[1].id.short())), "{err}");
    assert!(!dest.exists());
}

#[test]
fn a_crash_between_link_and_commit_leaves_an_orphan_that_gc_reclaims_and_nothing_else() {
    // What a kill after the link and before the commit leaves: the caller's file linked into
    // the packs directory under a pack name, with nothing in the index naming it.
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let kept = random(SEGMENT as usize, 7);
    let infos = adopt(&store, &write(tmp.path(), "kept", &kept), "kept");
    let data = random(SEGMENT as usize, 8);
    let path = write(tmp.path(), "img", &data);
    let orphan = store.dir().join("packs/pack-00000999.sfp");
    fs::hard_link(&path, &orphan).unwrap();
    drop(store);
    let store = open(tmp.path());
    assert!(store.verify(None, None).unwrap().is_ok());
    let report = store.gc(&GcOptions { grace: Duration::ZERO, ..GcOptions::default() }).unwrap();
    assert_eq!(report.removed_packs, 1, "{report:?}");
    assert!(!orphan.exists());
    assert_eq!(fs::read(&path).unwrap(), data, "the caller's file is untouched");
    assert_eq!(read_back(&store, &infos), kept);
}
