//! Byte-exact round trips, dedup, incremental ingest and corruption detection on a real RocksDB.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;

use common::*;
use snapfork_store::{IngestOptions, PageSet};

fn opts() -> IngestOptions {
    IngestOptions::default()
}

#[test]
fn random_zero_and_odd_sized_images_round_trip_byte_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let mut cases = vec![
        ("random", make_image(300, 0, 1)),
        ("zeros", vec![0u8; 64 * PAGE]),
        ("mixed", make_image(1500, 3, 2)),
        ("empty", Vec::new()),
    ];
    let mut odd = make_image(10, 4, 3);
    odd.truncate(10 * PAGE - 1234); // a short last page
    cases.push(("odd", odd));
    cases.push(("tiny", b"hello".to_vec()));
    for (name, data) in &cases {
        let path = write(tmp.path(), name, data);
        let info = store.ingest_image(&path, &opts(), Some(name)).unwrap();
        assert_eq!(info.size, data.len() as u64, "{name}");
        let out = tmp.path().join(format!("{name}.out"));
        store.open_image_ref(name).unwrap().materialize(&out, None).unwrap();
        assert_eq!(&fs::read(&out).unwrap(), data, "{name} differs after a round trip");
    }
    // Random access, including the short last page.
    let image = store.open_image_ref("odd").unwrap();
    let data = &cases[4].1;
    let mut buf = vec![0xffu8; PAGE];
    image.read_page(9, &mut buf).unwrap();
    let tail = data.len() - 9 * PAGE;
    assert_eq!(&buf[..tail], &data[9 * PAGE..]);
    assert!(buf[tail..].iter().all(|&b| b == 0));
}

#[test]
fn zero_pages_store_nothing_and_materialize_sparse() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let mut data = vec![0u8; 4096 * PAGE];
    data[100 * PAGE..101 * PAGE].fill(7);
    let path = write(tmp.path(), "sparse", &data);
    let info = store.ingest_image(&path, &opts(), Some("sparse")).unwrap();
    assert_eq!(info.zero_pages, 4095);
    assert_eq!(info.new_pages, 1);
    let out = tmp.path().join("sparse.out");
    store.open_image_ref("sparse").unwrap().materialize(&out, None).unwrap();
    assert_eq!(fs::read(&out).unwrap(), data);
    let allocated = fs::metadata(&out).unwrap().blocks() * 512;
    assert!(allocated <= 64 * 1024, "materialized file is dense: {allocated} bytes allocated");
}

#[test]
fn identical_pages_dedupe_across_images() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let a = make_image(512, 5, 10);
    let mut b = a.clone();
    for p in [3usize, 77, 400] {
        b[p * PAGE] ^= 0xff;
    }
    let ia = store.ingest_image(&write(tmp.path(), "a", &a), &opts(), Some("a")).unwrap();
    let ib = store.ingest_image(&write(tmp.path(), "b", &b), &opts(), Some("b")).unwrap();
    assert_eq!(ia.new_pages, 512 - 103);
    assert_eq!(ib.new_pages, 3, "only the three changed pages are new");
    let changed = store.open_image(&ia.id).unwrap().changed_pages(&store.open_image(&ib.id).unwrap()).unwrap();
    assert_eq!(changed.iter().collect::<Vec<_>>(), vec![3, 77, 400]);
}

#[test]
fn incremental_ingest_equals_full_ingest() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let a = make_image(3000, 4, 20);
    let mut b = a.clone();
    let dirty: PageSet = [5u64, 17, 2999].into_iter().collect();
    for p in dirty.iter() {
        b[p as usize * PAGE + 17] ^= 0x5a;
    }
    b.extend_from_slice(&make_image(7, 0, 21)); // the image grew
    let ia = store.ingest_image(&write(tmp.path(), "a", &a), &opts(), None).unwrap();
    let pb = write(tmp.path(), "b", &b);
    let full = store.ingest_image(&pb, &opts(), None).unwrap();
    let inc = store
        .ingest_image(&pb, &IngestOptions { parent: Some(ia.id), dirty: Some(dirty.clone()), ..opts() }, None)
        .unwrap();
    assert_eq!(inc.id, full.id, "incremental manifest differs from the full one");
    assert_eq!(inc.hashed_pages, 3 + 7, "only dirty and new pages are hashed");
    assert_eq!(inc.reused_segments, 1, "the middle segment is taken from the parent");

    // A Firecracker diff snapshot: a sparse file with only the dirty pages at their offsets.
    let diff_path = tmp.path().join("diff");
    let f = fs::File::create(&diff_path).unwrap();
    f.set_len(b.len() as u64).unwrap();
    use std::os::unix::fs::FileExt;
    for p in dirty.iter().chain(3000..3007) {
        let off = p as usize * PAGE;
        f.write_all_at(&b[off..off + PAGE], off as u64).unwrap();
    }
    drop(f);
    let diff = store
        .ingest_image(&diff_path, &IngestOptions { parent: Some(ia.id), diff_snapshot: true, ..opts() }, None)
        .unwrap();
    assert_eq!(diff.id, full.id, "diff snapshot onto its parent differs from the full image");
}

#[test]
fn huge_pages_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let data = make_image(4 * 512, 3, 30); // 8 MiB = four 2 MiB pages
    let info = store
        .ingest_image(&write(tmp.path(), "h", &data), &IngestOptions { page_size: 2 << 20, ..opts() }, Some("h"))
        .unwrap();
    assert_eq!(info.pages, 4);
    let image = store.open_image_ref("h").unwrap();
    let mut buf = vec![0u8; 2 << 20];
    image.read_page(2, &mut buf).unwrap();
    assert_eq!(&buf[..], &data[4 << 20..6 << 20]);
}

#[test]
fn a_flipped_byte_is_caught_on_read_and_by_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let data = make_image(64, 0, 40);
    store.ingest_image(&write(tmp.path(), "vm", &data), &opts(), Some("vm")).unwrap();
    assert!(store.verify(None, None).unwrap().is_ok());
    // Flip one byte in the middle of the pack's data.
    let pack = fs::read_dir(store.dir().join("packs")).unwrap().next().unwrap().unwrap().path();
    let mut bytes = fs::read(&pack).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    fs::write(&pack, &bytes).unwrap();
    drop(store);
    let store = open(tmp.path());
    let report = store.verify(None, None).unwrap();
    assert_eq!(report.damaged.len(), 1, "{report:?}");
    let damage = &report.damaged[0];
    assert!(damage.what.starts_with("image vm page "), "{damage:?}");
    let page: u64 = damage.what.rsplit(' ').next().unwrap().parse().unwrap();
    let image = store.open_image_ref("vm").unwrap();
    let err = image.read_page(page, &mut vec![0u8; PAGE]).unwrap_err();
    assert!(err.is_corruption(), "{err}");
    assert!(err.to_string().contains(&format!("image vm page {page}")), "{err}");
    // Other pages still read.
    image.read_page((page + 1) % 64, &mut vec![0u8; PAGE]).unwrap();
}

#[test]
fn blobs_dedupe_successive_versions() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let v1 = make_image(1024, 0, 50); // 4 MiB
    let mut v2 = v1.clone();
    v2.splice(1_000_000..1_000_000, b"inserted bytes shift everything after them".iter().copied());
    let b1 = store.put_blob_file(&write(tmp.path(), "v1", &v1), Some("state-1")).unwrap();
    let b2 = store.put_blob_file(&write(tmp.path(), "v2", &v2), Some("state-2")).unwrap();
    assert!(b2.new_chunks <= 3, "an insertion re-stored {} of {} chunks", b2.new_chunks, b2.chunks);
    assert_eq!(store.get_blob(&b1.id).unwrap(), v1);
    assert_eq!(store.get_blob(&b2.id).unwrap(), v2);
}

#[test]
fn read_pages_matches_page_by_page_reads_and_names_a_corrupt_page() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let mut data = make_image(700, 3, 60);
    data.truncate(data.len() - 100); // short last page
    store.ingest_image(&write(tmp.path(), "img", &data), &IngestOptions::default(), Some("img")).unwrap();
    let image = store.open_image_ref("img").unwrap();
    for (first, n) in [(0u64, 1usize), (0, 64), (5, 200), (690, 10), (699, 1), (100, 0)] {
        let mut run = vec![0xeeu8; n * PAGE];
        image.read_pages(first, &mut run).unwrap();
        for k in 0..n {
            let i = first as usize + k;
            let end = ((i + 1) * PAGE).min(data.len());
            let page = &run[k * PAGE..(k + 1) * PAGE];
            assert_eq!(&page[..end - i * PAGE], &data[i * PAGE..end], "page {i}");
            assert!(page[end - i * PAGE..].iter().all(|&b| b == 0));
        }
    }
    assert!(image.read_pages(699, &mut vec![0u8; 2 * PAGE]).is_err(), "beyond the end");
    // Corrupt one stored page: a run over it fails naming that page; runs beside it still read.
    let pack = fs::read_dir(store.dir().join("packs")).unwrap().next().unwrap().unwrap().path();
    drop(image);
    let report_before = store.verify(None, None).unwrap();
    assert!(report_before.is_ok());
    let mut bytes = fs::read(&pack).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 4;
    fs::write(&pack, bytes).unwrap();
    let report = store.verify(None, None).unwrap();
    let bad: u64 = report.damaged[0].what.rsplit(' ').next().unwrap().parse().unwrap();
    let image = store.open_image_ref("img").unwrap();
    let start = bad.saturating_sub(10);
    let err = image.read_pages(start, &mut vec![0u8; 20 * PAGE]).unwrap_err();
    assert!(err.to_string().contains(&format!("image img page {bad}")), "{err}");
    if bad >= 1 {
        image.read_pages(start, &mut vec![0u8; (bad - start) as usize * PAGE]).unwrap();
    }
}

#[test]
fn incompressible_blob_chunks_are_stored_raw_and_compressible_ones_compressed() {
    use rand::RngCore;
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let mut random = vec![0u8; 2 << 20];
    rand::rng().fill_bytes(&mut random);
    let r = store.put_blob_file(&write(tmp.path(), "random", &random), Some("random")).unwrap();
    assert!(r.new_stored_bytes >= random.len() as u64, "random data cannot shrink: {r:?}");
    let text: Vec<u8> = (0..2 << 20).map(|i: usize| b"snapfork "[i % 9]).collect();
    let t = store.put_blob_file(&write(tmp.path(), "text", &text), Some("text")).unwrap();
    assert!(t.new_stored_bytes * 10 < text.len() as u64, "repetitive data must compress: {t:?}");
    assert_eq!(store.get_blob(&r.id).unwrap(), random);
    assert_eq!(store.get_blob(&t.id).unwrap(), text);
}
