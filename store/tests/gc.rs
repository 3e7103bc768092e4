//! gc keeps everything reachable, frees the rest, and is safe while an ingest runs.

mod common;

use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::*;
use snapfork_store::{GcOptions, IngestOptions};

fn gc_now() -> GcOptions {
    GcOptions { grace: Duration::ZERO, ..GcOptions::default() }
}

#[test]
fn gc_frees_what_no_ref_reaches_and_keeps_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let a = make_image(400, 4, 1);
    let b = make_image(400, 4, 2);
    let mut c = a.clone();
    c[0..PAGE].fill(9); // shares all but one page with a
    for (name, data) in [("a", &a), ("b", &b), ("c", &c)] {
        store.ingest_image(&write(tmp.path(), name, data), &IngestOptions::default(), Some(name)).unwrap();
    }
    let dry = store.gc(&GcOptions { dry_run: true, ..gc_now() }).unwrap();
    assert_eq!(dry.removed_chunks, 0, "nothing is garbage yet: {dry:?}");

    let mut tx = store.begin().unwrap();
    tx.delete_ref("a");
    tx.delete_ref("b");
    tx.commit().unwrap();
    let dry = store.gc(&GcOptions { dry_run: true, ..gc_now() }).unwrap();
    // b's 300 data pages + the manifests of a and b (root + 1 segment each); a's page 0, which
    // c replaced, was a zero page and stored nothing.
    assert_eq!(dry.removed_chunks, 300 + 4, "{dry:?}");
    let before = store.stats("").unwrap().total;
    let report = store.gc(&gc_now()).unwrap();
    assert_eq!(report.removed_chunks, dry.removed_chunks);
    assert!(report.pack_bytes_after < report.pack_bytes_before, "{report:?}");
    let after = store.stats("").unwrap().total;
    assert!(after.pack_bytes < before.pack_bytes);
    // c is whole and verifies; nothing dangling.
    assert!(store.verify(None, None).unwrap().is_ok());
    let out = tmp.path().join("c.out");
    store.open_image_ref("c").unwrap().materialize(&out, None).unwrap();
    assert_eq!(std::fs::read(out).unwrap(), c);
    // A second gc finds nothing more.
    assert_eq!(store.gc(&gc_now()).unwrap().removed_chunks, 0);
}

#[test]
fn gc_running_during_an_ingest_never_loses_its_pages() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let base = make_image(2000, 5, 3);
    store.ingest_image(&write(tmp.path(), "base", &base), &IngestOptions::default(), Some("base")).unwrap();
    // The next image shares its pages with "base", which gets deleted while the ingest runs:
    // the ingest found those pages in the store, so gc must keep them.
    let mut next = base.clone();
    next[5 * PAGE] ^= 1;
    let next_path = write(tmp.path(), "next", &next);
    for round in 0..5 {
        let barrier = Arc::new(Barrier::new(2));
        let (s2, b2) = (store.clone(), barrier.clone());
        let gc = std::thread::spawn(move || {
            b2.wait();
            for _ in 0..20 {
                s2.gc(&GcOptions { grace: Duration::ZERO, ..GcOptions::default() }).unwrap();
            }
        });
        let mut tx = store.begin().unwrap();
        barrier.wait();
        let name = format!("next-{round}");
        let info = tx.ingest_image(&next_path, &IngestOptions::default()).unwrap();
        tx.delete_ref("base");
        tx.set_ref(&name, info.id).unwrap();
        tx.commit().unwrap();
        gc.join().unwrap();
        store.gc(&gc_now()).unwrap();
        let out = tmp.path().join("out");
        store.open_image_ref(&name).unwrap().materialize(&out, None).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), next, "round {round}");
        assert!(store.verify(None, None).unwrap().is_ok(), "round {round}");
        let mut tx = store.begin().unwrap();
        tx.set_ref("base", info.id).unwrap();
        tx.commit().unwrap();
    }
}

/// Commits two images in one transaction, so in one pack: `big` (1000 pages, for the test to
/// let die) and `small` (50 pages), whose bytes it returns.
fn big_and_small_in_one_pack(store: &snapfork_store::Store, dir: &std::path::Path) -> Vec<u8> {
    let big = make_image(1000, 0, 4);
    let small = make_image(50, 0, 5);
    let mut tx = store.begin().unwrap();
    let ib = tx.ingest_image(&write(dir, "big", &big), &IngestOptions::default()).unwrap();
    let is = tx.ingest_image(&write(dir, "small", &small), &IngestOptions::default()).unwrap();
    tx.set_ref("big", ib.id).unwrap();
    tx.set_ref("small", is.id).unwrap();
    tx.commit().unwrap();
    small
}

#[test]
fn gc_rewrites_packs_that_are_mostly_dead() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    // One transaction, one pack, holding two images; then most of it dies.
    let small = big_and_small_in_one_pack(&store, tmp.path());
    let mut tx = store.begin().unwrap();
    tx.delete_ref("big");
    tx.commit().unwrap();
    // A reader opened before the repack caches where its pages were stored.
    let before = store.open_image_ref("small").unwrap();
    let mut page = vec![0u8; 4096];
    before.read_page(7, &mut page).unwrap();
    let report = store.gc(&gc_now()).unwrap();
    assert_eq!(report.repacked, 1, "{report:?}");
    assert!(report.pack_bytes_after * 5 < report.pack_bytes_before, "{report:?}");
    let out = tmp.path().join("out");
    store.open_image_ref("small").unwrap().materialize(&out, None).unwrap();
    assert_eq!(std::fs::read(out).unwrap(), small);
    // Its cached locations are stale now: it reads the moved pages, page by page and in runs.
    for i in 0..50 {
        before.read_page(i, &mut page).unwrap();
        assert_eq!(page, small[i as usize * 4096..][..4096], "page {i}");
    }
    let mut all = vec![0u8; 50 * 4096];
    before.read_pages(0, &mut all).unwrap();
    assert_eq!(all, small);
    assert!(store.verify(None, None).unwrap().is_ok());
}

/// Rewriting packs copies data and takes long; ingests and commits go on meanwhile (a VM paused
/// for its checkpoint must not wait for a gc to finish copying).
#[test]
fn ingests_commit_while_gc_rewrites_packs() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let small = big_and_small_in_one_pack(&store, tmp.path());
    let mut tx = store.begin().unwrap();
    tx.delete_ref("big");
    tx.commit().unwrap();
    let during = make_image(300, 7, 77);
    let during_path = write(tmp.path(), "during", &during);
    // Called as gc copies: the first time, an ingest and commit run to the end on another
    // thread while the copy waits for them.
    let committed = Arc::new(std::sync::Mutex::new(None));
    let progress: snapfork_store::Progress = {
        let (store, committed, path) = (store.clone(), committed.clone(), during_path.clone());
        let once = std::sync::Once::new();
        Arc::new(move |_| {
            once.call_once(|| {
                let (store, path) = (store.clone(), path.clone());
                let (done, finished) = std::sync::mpsc::channel();
                std::thread::spawn(move || {
                    let _ = done.send(store.ingest_image(&path, &IngestOptions::default(), Some("during")));
                });
                let result = finished.recv_timeout(Duration::from_secs(60));
                *committed.lock().unwrap() =
                    Some(result.map_err(|e| format!("{e}")).and_then(|r| r.map_err(|e| format!("{e}"))));
            })
        })
    };
    let report = store.gc(&GcOptions { progress: Some(progress), ..gc_now() }).unwrap();
    assert_eq!(report.repacked, 1, "{report:?}");
    let during_info = committed
        .lock()
        .unwrap()
        .take()
        .expect("gc reported its copying")
        .expect("an ingest and commit completed while gc was copying (they waited for it: timeout)");
    assert_eq!(store.get_ref("during").unwrap(), Some(during_info.id));
    for (name, data) in [("small", &small), ("during", &during)] {
        let out = tmp.path().join(format!("{name}.out"));
        store.open_image_ref(name).unwrap().materialize(&out, None).unwrap();
        assert_eq!(&std::fs::read(out).unwrap(), data, "{name}");
    }
    assert!(store.verify(None, None).unwrap().is_ok());
}

/// A rewrite that fails half way (the pack it copies from is cut short under it) keeps the
/// index as it was and removes the pack it was writing; once the pack is whole again, the next
/// gc rewrites it and every page reads back.
#[test]
fn a_failed_pack_rewrite_leaves_no_half_pack() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let small = big_and_small_in_one_pack(&store, tmp.path());
    let mut tx = store.begin().unwrap();
    tx.delete_ref("big");
    tx.commit().unwrap();
    let packs_dir = tmp.path().join("store/packs");
    let packs = || {
        let mut names: Vec<_> = std::fs::read_dir(&packs_dir).unwrap().map(|e| e.unwrap().path()).collect();
        names.sort();
        names
    };
    let before = packs();
    let [shared] = before.as_slice() else { panic!("one pack expected: {before:?}") };
    let whole = std::fs::read(shared).unwrap();
    let progress: snapfork_store::Progress = {
        let shared = shared.clone();
        Arc::new(move |_| {
            let f = std::fs::OpenOptions::new().write(true).open(&shared).unwrap();
            f.set_len(16).unwrap();
        })
    };
    let err = store.gc(&GcOptions { progress: Some(progress), ..gc_now() }).expect_err("the pack was cut short");
    assert!(err.to_string().contains("read pack"), "{err}");
    assert_eq!(packs(), before, "a half-written pack was left behind");
    std::fs::write(shared, &whole).unwrap();
    let report = store.gc(&gc_now()).unwrap();
    assert_eq!(report.repacked, 1, "{report:?}");
    assert_eq!(packs().len(), 1);
    let out = tmp.path().join("out");
    store.open_image_ref("small").unwrap().materialize(&out, None).unwrap();
    assert_eq!(std::fs::read(out).unwrap(), small);
    assert!(store.verify(None, None).unwrap().is_ok());
}

/// A reader that opened the store read-only beside its writer (`snapfork serve-uffd`, `cat`,
/// `verify` next to a daemon) sees the index as it was; the writer's gc then moves its pages.
#[test]
fn a_read_only_reader_follows_pages_the_writers_gc_moved() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let small = big_and_small_in_one_pack(&store, tmp.path());
    // The next version of `small` has its manifest in a pack of its own, most pages in the
    // first one (where `big` is).
    let mut small = small;
    small[3 * 4096..4 * 4096].fill(0xEE);
    let mut tx = store.begin().unwrap();
    let is2 = tx.ingest_image(&write(tmp.path(), "small2", &small), &IngestOptions::default()).unwrap();
    tx.set_ref("small", is2.id).unwrap();
    tx.commit().unwrap();
    let ro = || {
        let opts = snapfork_store::OpenOptions { read_only: true, create: false, ..Default::default() };
        snapfork_store::Store::open(tmp.path().join("store"), opts).unwrap()
    };
    // One reader has read a page of the first pack (which it keeps open), the other only the
    // manifest, from the second.
    let (ro_a, ro_b) = (ro(), ro());
    let reader_a = ro_a.open_image_ref("small").unwrap();
    let mut page = vec![0u8; 4096];
    reader_a.read_page(7, &mut page).unwrap();
    let reader_b = ro_b.open_image_ref("small").unwrap();
    let mut tx = store.begin().unwrap();
    tx.delete_ref("big");
    tx.commit().unwrap();
    let report = store.gc(&gc_now()).unwrap();
    assert_eq!(report.repacked, 1, "{report:?}");
    // A later pack takes the old pack's number: the readers must not read it as theirs.
    let mut tx = store.begin().unwrap();
    let other =
        tx.ingest_image(&write(tmp.path(), "other", &make_image(300, 0, 9)), &IngestOptions::default()).unwrap();
    tx.set_ref("other", other.id).unwrap();
    tx.commit().unwrap();
    for reader in [&reader_a, &reader_b] {
        for i in 0..50 {
            reader.read_page(i, &mut page).unwrap();
            assert_eq!(page, small[i as usize * 4096..][..4096], "page {i}");
        }
        let mut all = vec![0u8; 50 * 4096];
        reader.read_pages(0, &mut all).unwrap();
        assert_eq!(all, small);
    }
    // verify from a read-only view that predates the gc: what the gc removed is no damage.
    let ro_c = ro();
    let mut tx = store.begin().unwrap();
    tx.delete_ref("other");
    tx.commit().unwrap();
    store.gc(&gc_now()).unwrap();
    let v = ro_c.verify(None, None).unwrap();
    assert!(v.is_ok(), "{v:?}");
}

#[test]
fn verify_reports_a_link_to_a_missing_object() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let mut tx = store.begin().unwrap();
    let present = tx.put_chunk(b"present").unwrap();
    let missing = snapfork_store::Hash::of(b"never stored");
    let node = tx.put_node(&snapfork_store::Node::new(40, vec![present, missing], Vec::new())).unwrap();
    tx.set_ref("holder", node).unwrap();
    tx.commit().unwrap();
    let report = store.verify(None, None).unwrap();
    assert_eq!(report.damaged.len(), 1, "{report:?}");
    assert_eq!(report.damaged[0].id, missing);
    assert!(report.damaged[0].what.starts_with("holder"), "{:?}", report.damaged[0]);
}

#[test]
fn attached_refs_and_meta_live_and_die_with_their_owner() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let image = store.ingest_image(&write(tmp.path(), "img", &make_image(64, 0, 6)), &Default::default(), Some("vm"));
    let image = image.unwrap().id;
    // A description of the image (as a working set is), attached to it, and one level deeper.
    let mut tx = store.begin().unwrap();
    let note = tx.put_blob(b"pages the guest touched").unwrap().id;
    let deeper = tx.put_blob(b"attached to the note").unwrap().id;
    tx.set_ref(&snapfork_store::attached_name(&image, "working-set"), note).unwrap();
    tx.set_ref(&snapfork_store::attached_name(&note, "more"), deeper).unwrap();
    tx.meta_put(&snapfork_store::attached_name(&image, "cvs"), Some(b"block hashes"));
    tx.commit().unwrap();
    let report = store.gc(&gc_now()).unwrap();
    assert_eq!(report.removed_attached, 0, "{report:?}");
    assert_eq!(report.roots, 1, "attached refs are not roots: {report:?}");
    assert_eq!(store.get_blob(&note).unwrap(), b"pages the guest touched");
    assert_eq!(store.get_blob(&deeper).unwrap(), b"attached to the note");
    assert!(store.meta_get(&snapfork_store::attached_name(&image, "cvs")).unwrap().is_some());

    // The owner goes: so does everything attached to it, directly or not.
    let mut tx = store.begin().unwrap();
    tx.delete_ref("vm");
    tx.commit().unwrap();
    let dry = store.gc(&GcOptions { dry_run: true, ..gc_now() }).unwrap();
    assert_eq!(dry.removed_attached, 3, "{dry:?}");
    assert_eq!(store.list_refs("").unwrap().len(), 2, "a dry run removes nothing");
    let report = store.gc(&gc_now()).unwrap();
    assert_eq!(report.removed_attached, 3, "{report:?}");
    assert!(store.list_refs("").unwrap().is_empty());
    assert!(store.meta_get(&snapfork_store::attached_name(&image, "cvs")).unwrap().is_none());
    assert!(store.get_blob(&note).is_err());
    assert!(!store.contains(&image).unwrap());
}

/// gc with no grace period, over and over, while transactions start and commit: a pack that
/// appears after gc looked at which ones are in use is still in use, never "abandoned".
#[test]
fn gc_without_grace_never_deletes_the_pack_of_a_transaction_that_started_meanwhile() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (s2, stop2) = (store.clone(), stop.clone());
    let gc = std::thread::spawn(move || {
        let mut runs = 0;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            s2.gc(&GcOptions { grace: Duration::ZERO, ..GcOptions::default() }).unwrap();
            runs += 1;
            // Room for commits: a gc holds them off between its mark and its sweep.
            std::thread::sleep(Duration::from_millis(2));
        }
        runs
    });
    let mut blobs = Vec::new();
    for k in 0..60u32 {
        let data: Vec<u8> = (0..20_000u32).map(|i| (i.wrapping_mul(k + 7) >> 3) as u8).collect();
        let mut tx = store.begin().unwrap();
        let id = tx.put_blob(&data).unwrap().id;
        tx.set_ref(&format!("b{k}"), id).unwrap();
        tx.commit().unwrap();
        blobs.push((id, data));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let runs = gc.join().unwrap();
    for (id, data) in &blobs {
        let mut out = Vec::new();
        store.read_blob(id, &mut out).unwrap();
        assert_eq!(&out, data);
    }
    assert!(store.verify(None, None).unwrap().is_ok());
    eprintln!("{runs} gc runs beside 60 commits");
}

/// Puts a file object into the store the way `Txn::commit` does, then takes its index entry
/// away again as a kill between the move and the index batch would: the file is at
/// `file_object_path(id)` and the index does not name it. Returns the id and the path.
fn orphan_file_object(store: &snapfork_store::Store, content: &[u8]) -> (snapfork_store::Hash, std::path::PathBuf) {
    let id = snapfork_store::Hash::of(content);
    let path = store.file_object_path(&id);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, content).unwrap();
    assert!(!store.has_file_object(&id).unwrap());
    (id, path)
}

/// Commits `content` as a file object named by ref `name`, through the staging directory as
/// fsfork does.
fn commit_file_object(store: &snapfork_store::Store, name: &str, content: &[u8]) -> std::path::PathBuf {
    let id = snapfork_store::Hash::of(content);
    let staged = store.staging_dir().join(format!("staged-{name}"));
    std::fs::write(&staged, content).unwrap();
    let mut tx = store.begin().unwrap();
    tx.adopt_file_object(&staged, id).unwrap();
    tx.set_ref(name, id).unwrap();
    tx.commit().unwrap();
    store.file_object_path(&id)
}

#[test]
fn gc_removes_object_files_that_no_index_entry_names_after_the_grace_period() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let live = commit_file_object(&store, "live", b"a file a ref names");
    // A dead file object: committed, then its ref deleted.
    let dead = commit_file_object(&store, "dead", b"a file nothing names any more");
    let mut tx = store.begin().unwrap();
    tx.delete_ref("dead");
    tx.commit().unwrap();
    let orphan_content = vec![7u8; 10_000];
    let (_, orphan) = orphan_file_object(&store, &orphan_content);
    // Not ours: another name in the object directory, and a file in a fan-out directory whose
    // name is no id.
    let stray = store.dir().join("objects").join("README");
    std::fs::write(&stray, b"left by someone").unwrap();
    let tmpfile = orphan.parent().unwrap().join(".tmp-editor-swap");
    std::fs::write(&tmpfile, b"also not an object").unwrap();

    // Young orphans are kept. A file object keeps the modification time of the file it was
    // made from, so an old one says nothing about when the file arrived in objects/.
    let year_ago = std::time::SystemTime::now() - Duration::from_secs(365 * 24 * 3600);
    std::fs::File::options().write(true).open(&orphan).unwrap().set_modified(year_ago).unwrap();
    let report = store.gc(&GcOptions { grace: Duration::from_secs(3600), ..GcOptions::default() }).unwrap();
    assert_eq!((report.orphaned_files, report.orphaned_file_bytes), (0, 0), "{report:?}");
    assert!(orphan.exists(), "an orphan younger than the grace period was removed");
    assert_eq!(report.removed_files, 1, "the dead file object goes whatever its age: {report:?}");
    assert!(!dead.exists());

    // A dry run says what would go and removes nothing.
    let dry = store.gc(&GcOptions { dry_run: true, ..gc_now() }).unwrap();
    assert_eq!((dry.orphaned_files, dry.orphaned_file_bytes), (1, orphan_content.len() as u64), "{dry:?}");
    assert!(orphan.exists(), "a dry run removed an orphan");

    let report = store.gc(&gc_now()).unwrap();
    assert_eq!((report.orphaned_files, report.orphaned_file_bytes), (1, orphan_content.len() as u64), "{report:?}");
    assert_eq!(report.removed_files, 0, "{report:?}");
    assert!(!orphan.exists(), "the orphan is still there");
    assert_eq!(std::fs::read(&live).unwrap(), b"a file a ref names", "the live file object was touched");
    assert!(stray.exists() && tmpfile.exists(), "gc removed a file that is not a file object");
    let verify = store.verify(None, None).unwrap();
    assert!(verify.is_ok(), "{verify:?}");
    assert_eq!(verify.objects, 1, "{verify:?}");
    // Nothing more to do.
    assert_eq!(store.gc(&gc_now()).unwrap().orphaned_files, 0);

    // An orphan whose content is checkpointed again: the commit moves its own copy over it and
    // indexes it, and from then on it is an object like any other.
    let (id, path) = orphan_file_object(&store, &orphan_content);
    assert_eq!(commit_file_object(&store, "again", &orphan_content), path);
    assert!(store.has_file_object(&id).unwrap());
    let report = store.gc(&gc_now()).unwrap();
    assert_eq!(report.orphaned_files, 0, "{report:?}");
    assert_eq!(std::fs::read(&path).unwrap(), orphan_content);
    assert!(store.verify(None, None).unwrap().is_ok());
}

/// gc with no grace period, over and over, while transactions commit file objects: a file a
/// commit has moved into `objects/` but not indexed yet is never taken for an orphan.
#[test]
fn gc_without_grace_never_removes_a_file_object_a_commit_is_indexing() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (s2, stop2) = (store.clone(), stop.clone());
    let gc = std::thread::spawn(move || {
        let (mut orphaned, mut runs) = (0, 0);
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            orphaned += s2.gc(&GcOptions { grace: Duration::ZERO, ..GcOptions::default() }).unwrap().orphaned_files;
            runs += 1;
            // Room for commits: a gc holds them off from its mark to its end.
            std::thread::sleep(Duration::from_millis(1));
        }
        (orphaned, runs)
    });
    let mut paths = Vec::new();
    for k in 0..60u32 {
        // Many files per commit (more than the syncfs threshold, half of the commits) to widen
        // the window between the moves and the index batch.
        let mut tx = store.begin().unwrap();
        let files = if k % 2 == 0 { 1 } else { 40 };
        for f in 0..files {
            let content = format!("commit {k} file {f}").into_bytes();
            let id = snapfork_store::Hash::of(&content);
            // Staged beside the store, on its filesystem, rather than in staging/ (whose names
            // gc keeps apart by pid): this test is about what happens after the move.
            let staged = tmp.path().join(format!("s-{k}-{f}"));
            std::fs::write(&staged, &content).unwrap();
            tx.adopt_file_object(&staged, id).unwrap();
            tx.set_ref(&format!("f/{k}/{f}"), id).unwrap();
            paths.push((store.file_object_path(&id), content));
        }
        tx.commit().unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (orphaned, runs) = gc.join().unwrap();
    assert_eq!(orphaned, 0, "gc took a committed file object for an orphan");
    for (path, content) in &paths {
        assert_eq!(&std::fs::read(path).unwrap(), content, "{}", path.display());
    }
    assert!(store.verify(None, None).unwrap().is_ok());
    eprintln!("{runs} gc runs beside 60 commits");
}

/// Staged files of an operation under way in this process (the writer: gc runs there too, in a
/// daemon) are never taken for leftovers, whatever the grace; an earlier writer's are.
#[test]
fn gc_leaves_this_writers_staged_files_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let staging = store.staging_dir();
    std::fs::create_dir_all(&staging).unwrap();
    let me = std::process::id();
    let ours = staging.join(format!("fsfork-{me}-7"));
    let ours_dir = staging.join(format!("import-{me}-1700000000000"));
    let earlier = staging.join("fsfork-1-7");
    std::fs::write(&ours, b"a checkpoint's staged copy").unwrap();
    std::fs::create_dir_all(&ours_dir).unwrap();
    std::fs::write(&earlier, b"left by a writer that died").unwrap();
    store.gc(&gc_now()).unwrap();
    assert!(ours.exists() && ours_dir.exists(), "gc removed a staged file of this process");
    assert!(!earlier.exists(), "gc kept an earlier writer's leftover");
}
