//! Restores served from the snapfork store: verified pages, a corrupt page stops only its VM,
//! working sets stored with the snapshot, touched pages feed an incremental ingest.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::json;
use snapfork_lazy_restore::{CachedSource, EndReason, PageSource, ServerOptions, StoreSource, workingset};
use snapfork_store::{IngestOptions, OpenOptions, Store};

const T: Duration = Duration::from_secs(60);

fn store_with_image(dir: &std::path::Path, pages: u64) -> (Store, std::path::PathBuf) {
    let image = dir.join("mem.raw");
    make_image(&image, pages);
    let store = Store::open(dir.join("store"), OpenOptions::default()).unwrap();
    store.ingest_image(&image, &IngestOptions::default(), Some("vm")).unwrap();
    (store, image)
}

fn cached(store: &Store) -> Arc<dyn PageSource> {
    let src: Arc<dyn PageSource> = Arc::new(StoreSource::open(store, "vm").unwrap());
    Arc::new(CachedSource::new(src, 64 << 20))
}

/// A store holding the synthetic image as "vm", with the stored bytes of page 100 flipped.
fn corrupt_store(dir: &std::path::Path) -> (Store, std::path::PathBuf) {
    let (store, image) = store_with_image(dir, 1024);
    let reader = store.open_image_ref("vm").unwrap();
    let id = reader.page_id(100).unwrap();
    let loc = store.location(&id).unwrap().unwrap();
    let pack = snapfork_store::pack::pack_path(&store.dir().join("packs"), loc.pack);
    drop(reader);
    drop(store);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&pack).unwrap();
        let at = loc.offset + loc.stored_len as u64 / 2;
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0x40], at).unwrap();
    }
    let store = Store::open(dir.join("store"), OpenOptions { read_only: true, ..Default::default() }).unwrap();
    (store, image)
}

#[test]
fn corrupt_page_poisoned_raises_sigbus_only_on_that_page() {
    if !require_root() {
        return;
    }
    let dir = tempdir();
    let (store, image) = corrupt_store(dir.path());
    let srv = TestServer::start(
        dir.path().join("uffd.sock"),
        cached(&store),
        ServerOptions {
            restore: snapfork_lazy_restore::RestoreOptions {
                on_corrupt: snapfork_lazy_restore::CorruptPolicy::Poison,
                ..Default::default()
            },
            ..Default::default()
        },
    );
    // Pages 0..99 read fine, then page 100 raises SIGBUS instead of showing wrong bytes.
    let child = spawn_child(json!({
        "role": "fc", "socket": srv.socket, "image": image,
        "regions": [{"size": 4 << 20, "offset": 0}],
    }));
    let (st, res) = wait_child(child);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(st.signal(), Some(libc::SIGBUS), "{st:?} {res:?}");
    let (ended, _) = srv.wait_ended(1, T);
    assert_eq!(ended[0].end, EndReason::PeerExited, "{:?}", ended[0]);
    // The pages before the corrupt one were installed (the child compared them with the image);
    // page 100 got the poison marker. Read-ahead may also have installed verified pages past it.
    let st = &ended[0].stats;
    assert!(st.pages_copied + st.pages_zeroed >= 100, "{st:?}");
    srv.stop();
}

#[test]
fn corrupt_page_kills_only_its_vm() {
    if !require_root() {
        return;
    }
    let dir = tempdir();
    let (store, image) = corrupt_store(dir.path());
    let srv = TestServer::start(dir.path().join("uffd.sock"), cached(&store), ServerOptions::default());
    // The victim maps the whole image (it will touch page 100); the other maps pages 256..768.
    let victim = spawn_child(json!({
        "role": "fc", "socket": srv.socket, "image": image,
        "regions": [{"size": 4 << 20, "offset": 0}],
    }));
    let victim_pid = victim.id() as i32;
    let other = spawn_child(json!({
        "role": "fc", "socket": srv.socket, "image": image,
        "regions": [{"size": 2 << 20, "offset": 1 << 20}],
    }));
    let (vs, vres) = wait_child(victim);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(vs.signal(), Some(libc::SIGKILL), "victim not killed: {vs:?} {vres:?}");
    let (os, ores) = wait_child(other);
    assert!(os.success(), "{os:?} {ores:?}");
    let (ended, _) = srv.wait_ended(2, T);
    let corrupt: Vec<_> = ended.iter().filter(|r| matches!(r.end, EndReason::CorruptPage { .. })).collect();
    assert_eq!(corrupt.len(), 1, "{ended:?}");
    match &corrupt[0].end {
        EndReason::CorruptPage { page, pid, message } => {
            assert_eq!(*page, 100);
            assert_eq!(*pid, Some(victim_pid));
            assert!(message.contains("page 100"), "{message}");
        }
        _ => unreachable!(),
    }
    assert!(ended.iter().any(|r| r.end == EndReason::PeerExited));
    srv.stop();
}

#[test]
fn working_set_stored_with_snapshot_and_kept_through_gc() {
    if !require_root() {
        return;
    }
    let dir = tempdir();
    let (store, image) = store_with_image(dir.path(), 2048);
    let source = cached(&store);
    let id = store.resolve("vm").unwrap();
    assert!(workingset::load(&store, &id).unwrap().is_none());
    let pattern: Vec<u64> = (0..300u64).map(|i| (i * 13) % 2048).collect();
    let srv = TestServer::start(dir.path().join("a.sock"), source.clone(), ServerOptions::default());
    let c = spawn_child(json!({
        "role": "fc", "socket": srv.socket, "image": image,
        "regions": [{"size": 8 << 20, "offset": 0}], "touch": pattern,
    }));
    let (st, res) = wait_child(c);
    assert!(st.success(), "{st:?} {res:?}");
    let (ended, _) = srv.wait_ended(1, T);
    srv.stop();
    let report = &ended[0];
    workingset::save(&store, &id, 4096, &report.working_set).unwrap();
    let loaded = workingset::load(&store, &id).unwrap().unwrap();
    assert_eq!(loaded, report.working_set);
    assert_eq!(&loaded[..300], &pattern[..]);
    // The ref keeps the blob through gc.
    store.gc(&snapfork_store::GcOptions { dry_run: false, grace: Duration::ZERO, ..Default::default() }).unwrap();
    assert_eq!(workingset::load(&store, &id).unwrap().unwrap(), loaded);
}

/// A guest writes into some pages (sequentially, so that read-ahead installs pages it then
/// writes without faulting, and a few scattered): the restore's touched set covers every page
/// it changed, and an incremental ingest of the guest's new memory that hashes only those
/// pages gives the same image as a full ingest.
#[test]
fn touched_pages_feed_an_incremental_ingest_of_what_the_guest_wrote() {
    if !require_root() {
        return;
    }
    let dir = tempdir();
    let (store, image) = store_with_image(dir.path(), 2048);
    let id = store.resolve("vm").unwrap();
    let writes: Vec<u64> = (100..400u64).chain([7, 1500, 1501, 2047]).collect();
    let srv = TestServer::start(dir.path().join("w.sock"), cached(&store), ServerOptions::default());
    let c = spawn_child(json!({
        "role": "write", "socket": srv.socket, "image": image,
        "regions": [{"size": 8 << 20, "offset": 0}], "write": writes,
    }));
    let (st, res) = wait_child(c);
    assert!(st.success(), "{st:?} {res:?}");
    let (ended, _) = srv.wait_ended(1, T);
    srv.stop();
    let touched = ended[0].touched_pages();
    assert!(writes.iter().all(|&p| touched.contains(p)), "a written page is missing from the touched set");
    assert!(touched.len() < 2048, "the guest touched a part of memory only, not {} pages", touched.len());
    // The guest's memory now: the snapshot with its writes.
    let mut mem = std::fs::read(&image).unwrap();
    for &p in &writes {
        mem[p as usize * 4096] = common::written_byte(p as usize);
    }
    let now = dir.path().join("now.raw");
    std::fs::write(&now, &mem).unwrap();
    let full = store.ingest_image(&now, &IngestOptions::default(), Some("full")).unwrap();
    assert_ne!(full.id, id);
    let inc = store
        .ingest_image(
            &now,
            &IngestOptions { parent: Some(id), dirty: Some(touched), ..Default::default() },
            Some("inc"),
        )
        .unwrap();
    assert_eq!(inc.id, full.id, "hashing the touched pages alone gives the guest's memory");
    assert!(inc.hashed_pages < 2048, "{} pages hashed", inc.hashed_pages);
}

/// The data pages of `ws` in first-seen order (what a working-set pages blob holds).
fn data_pages(reader: &snapfork_store::ImageReader, ws: &[u64]) -> Vec<u64> {
    let mut seen = std::collections::HashSet::new();
    ws.iter().copied().filter(|&i| seen.insert(i) && !reader.page_id(i).unwrap().is_zero()).collect()
}

#[test]
fn working_set_pages_preload_into_the_shared_cache_and_go_with_their_image() {
    let dir = tempdir();
    let (store, _) = store_with_image(dir.path(), 2048);
    let id = store.resolve("vm").unwrap();
    let reader = store.open_image(&id).unwrap();
    // Repeats, zero pages (i % 7 == 3, i % 11 == 5) and a page past the end are left out.
    let mut ws: Vec<u64> = (0..400u64).map(|i| (i * 7) % 2048).collect();
    ws.extend([3, 5, 9_999]);
    workingset::save(&store, &id, 4096, &ws).unwrap();
    let want = data_pages(&reader, &ws[..400]);
    assert!(want.len() > 200 && want.len() < 400, "{}", want.len());

    let cache = CachedSource::new(Arc::new(StoreSource::open(&store, "vm").unwrap()), 64 << 20);
    let report = workingset::preload(&store, &reader, &workingset::pages_ref_name(&id), &cache).unwrap().unwrap();
    assert_eq!((report.pages, report.rejected), (want.len() as u64, 0));
    // Every preloaded page now comes from the cache, and is the image's page.
    let (mut got, mut expect) = (vec![0u8; 4096], vec![0u8; 4096]);
    for &i in &want {
        cache.read_page(i, &mut got).unwrap();
        reader.read_page(i, &mut expect).unwrap();
        assert!(got == expect, "page {i}");
    }
    assert_eq!(cache.counters(), (want.len() as u64, 0), "(hits, misses)");

    // Attached to the image: gc keeps it while the image lives, removes it with the image.
    let gc = snapfork_store::GcOptions { dry_run: false, grace: Duration::ZERO, ..Default::default() };
    store.gc(&gc).unwrap();
    assert!(store.get_ref(&workingset::pages_ref_name(&id)).unwrap().is_some());
    let mut tx = store.begin().unwrap();
    tx.delete_ref("vm");
    tx.commit().unwrap();
    let report = store.gc(&gc).unwrap();
    assert_eq!(report.removed_attached, 2, "the working set and its pages");
    assert!(store.get_ref(&workingset::pages_ref_name(&id)).unwrap().is_none());
}

#[test]
fn a_working_set_pages_blob_that_disagrees_with_its_image_is_not_believed() {
    let dir = tempdir();
    let (store, _) = store_with_image(dir.path(), 1024);
    let id = store.resolve("vm").unwrap();
    let reader = store.open_image(&id).unwrap();
    let ws: Vec<u64> = (0..64).collect();
    let name = workingset::pages_ref_name(&id);
    workingset::save_pages(&store, &id, &ws, &name).unwrap();
    let want = data_pages(&reader, &ws);

    // One byte of the last page changed: that page is rejected, the others are preloaded, and
    // the rejected page is still read correctly (from the image).
    let blob = store.get_ref(&name).unwrap().unwrap();
    let mut bytes = store.get_blob(&blob).unwrap();
    *bytes.last_mut().unwrap() ^= 1;
    let mut tx = store.begin().unwrap();
    let forged = tx.put_blob(&bytes).unwrap();
    tx.set_ref(&name, forged.id).unwrap();
    tx.commit().unwrap();
    let cache = CachedSource::new(Arc::new(StoreSource::open(&store, "vm").unwrap()), 64 << 20);
    let report = workingset::preload(&store, &reader, &name, &cache).unwrap().unwrap();
    assert_eq!((report.pages, report.rejected), (want.len() as u64 - 1, 1));
    let last = *want.last().unwrap();
    let (mut got, mut expect) = (vec![0u8; 4096], vec![0u8; 4096]);
    cache.read_page(last, &mut got).unwrap();
    reader.read_page(last, &mut expect).unwrap();
    assert!(got == expect);
    assert_eq!(cache.counters().1, 1, "the rejected page was read from the image");

    // The pages of another image are refused whole, by name.
    let other = dir.path().join("other.raw");
    make_image(&other, 64);
    {
        use std::os::unix::fs::FileExt;
        std::fs::OpenOptions::new().write(true).open(&other).unwrap().write_all_at(b"different", 0).unwrap();
    }
    let other_id = store.ingest_image(&other, &snapfork_store::IngestOptions::default(), Some("other")).unwrap().id;
    workingset::save_pages(&store, &other_id, &ws, &name).unwrap();
    let err = workingset::preload(&store, &reader, &name, &cache).unwrap_err();
    assert!(err.to_string().contains("another image"), "{err}");
    // And no image's pages go into the cache of another.
    let others = CachedSource::new(Arc::new(StoreSource::open(&store, "other").unwrap()), 64 << 20);
    let err = workingset::preload(&store, &reader, &workingset::pages_ref_name(&id), &others).unwrap_err();
    assert!(err.to_string().contains("cache of another image"), "{err}");
}

#[test]
fn a_damaged_page_does_not_stop_the_working_set_being_stored_nor_gets_preloaded() {
    let dir = tempdir();
    let (store, _) = corrupt_store(dir.path());
    drop(store);
    let store = Store::open(dir.path().join("store"), OpenOptions::default()).unwrap();
    let id = store.resolve("vm").unwrap();
    let ws: Vec<u64> = (95..105).collect();
    workingset::save(&store, &id, 4096, &ws).unwrap();
    assert_eq!(workingset::load(&store, &id).unwrap().unwrap(), ws);
    let reader = store.open_image(&id).unwrap();
    let cache = CachedSource::new(Arc::new(StoreSource::open(&store, "vm").unwrap()), 64 << 20);
    let report = workingset::preload(&store, &reader, &workingset::pages_ref_name(&id), &cache).unwrap().unwrap();
    // Its place in the blob (zeros) fails the check against the manifest: rejected, not cached.
    let want = data_pages(&reader, &ws).len() as u64;
    assert_eq!((report.pages, report.rejected), (want - 1, 1));
    // The damaged page is still reported when something reads it.
    let mut buf = vec![0u8; 4096];
    let err = cache.read_page(100, &mut buf).unwrap_err();
    assert!(err.to_string().contains("100"), "{err}");
}

/// A read-ahead window larger than a prefetch batch (`serve-uffd --readahead-kib 1024`): a
/// guest streaming through dense data is served, and the serving thread never overruns its
/// buffer (it used to panic there, leaving the VM stalled and its reader threads behind).
#[test]
fn a_read_ahead_window_larger_than_a_batch_is_served() {
    if !require_root() {
        return;
    }
    let dir = tempdir();
    let image = dir.path().join("mem.raw");
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let dense: Vec<u8> = (0..(8 << 20) / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect();
    std::fs::write(&image, &dense).unwrap();
    let store = Store::open(dir.path().join("store"), OpenOptions::default()).unwrap();
    store.ingest_image(&image, &IngestOptions::default(), Some("vm")).unwrap();
    let opts = snapfork_lazy_restore::RestoreOptions { readahead: 1 << 20, ..Default::default() };
    let srv = TestServer::start(
        dir.path().join("uffd.sock"),
        cached(&store),
        ServerOptions { restore: opts, ..Default::default() },
    );
    let child = spawn_child(json!({
        "role": "fc", "socket": srv.socket, "image": image,
        "regions": [{"size": 8 << 20, "offset": 0}],
    }));
    let (st, res) = wait_child(child);
    assert!(st.success(), "{st:?} {res:?}");
    let (ended, _) = srv.wait_ended(1, T);
    assert_eq!(ended[0].end, EndReason::PeerExited, "{:?}", ended[0]);
    srv.stop();
}
