//! Raw disks on block devices (here loop devices) ingest by the device's size and materialize
//! back onto a device byte for byte, zero pages included; what has no size (a FIFO, a character
//! device) is refused at once instead of ingested as empty or waited on.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use snapfork_store::{Error, IngestOptions};

/// A loop device over `file`, detached on drop.
struct Loop(PathBuf);

impl Loop {
    fn over(file: &Path) -> Loop {
        let out = Command::new("losetup").args(["--find", "--show"]).arg(file).output().expect("run losetup");
        assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
        Loop(PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

#[test]
fn a_block_device_ingests_by_its_size_and_materializes_back_onto_one() {
    if !require_root("a_block_device_ingests_by_its_size_and_materializes_back_onto_one", "loop devices") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    // 8 MiB: every 4th page zero.
    let image = make_image(2048, 4, 7);
    let disk = Loop::over(&write(dir.path(), "disk.img", &image));
    let from_device = store.ingest_image(&disk.0, &IngestOptions::default(), Some("disk")).unwrap();
    assert_eq!(from_device.size, image.len() as u64);
    assert_eq!(from_device.zero_pages, 512);
    let from_file = store.ingest_image(&dir.path().join("disk.img"), &IngestOptions::default(), None).unwrap();
    assert_eq!(from_device.id, from_file.id, "the device's image is its file's");
    // As a blob too.
    let mut tx = store.begin().unwrap();
    let blob = tx.put_blob_file(&disk.0).unwrap();
    tx.commit().unwrap();
    assert_eq!(blob.size, image.len() as u64);
    let mut back = Vec::new();
    store.read_blob(&blob.id, &mut back).unwrap();
    assert!(back == image, "the blob is not the device's bytes");

    // Onto a device full of other bytes: zero pages must read zero there, not what was there.
    let target = Loop::over(&write(dir.path(), "target.img", &make_image(2048, 0, 8)));
    store.open_image_ref("disk").unwrap().materialize(&target.0, None).unwrap();
    assert!(std::fs::read(&target.0).unwrap() == image, "the device does not hold the image");
    // A device too small for the image is refused before anything is written.
    let small_bytes = make_image(1024, 0, 9);
    let small = Loop::over(&write(dir.path(), "small.img", &small_bytes));
    let err = store.open_image_ref("disk").unwrap().materialize(&small.0, None).unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)) && err.to_string().contains("less than the image"), "{err}");
    assert!(std::fs::read(&small.0).unwrap() == small_bytes);
}

#[test]
fn what_has_no_size_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let image = store.ingest_image(&write(dir.path(), "img", &make_image(4, 0, 1)), &IngestOptions::default(), None);
    let id = image.unwrap().id;
    // On a thread, so that a FIFO waited on fails the test instead of hanging it.
    let (tx, rx) = std::sync::mpsc::channel();
    let (store2, fifo2) = (store.clone(), fifo.clone());
    let checks = std::thread::spawn(move || {
        let mut errors = Vec::new();
        for (path, what) in [(fifo2.as_path(), "a FIFO"), (Path::new("/dev/zero"), "a character device")] {
            let err = store2.ingest_image(path, &IngestOptions::default(), Some("x")).unwrap_err();
            assert!(matches!(err, Error::InvalidInput(_)), "{err}");
            errors.push((err.to_string(), what));
            let mut txn = store2.begin().unwrap();
            errors.push((txn.put_blob_file(path).unwrap_err().to_string(), what));
        }
        let reader = store2.open_image(&id).unwrap();
        for (path, what) in [(fifo2.as_path(), "a FIFO"), (Path::new("/dev/null"), "a character device")] {
            errors.push((reader.materialize(path, None).unwrap_err().to_string(), what));
        }
        let _ = tx.send(errors);
    });
    let errors = match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(errors) => errors,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("a FIFO or device was waited on"),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => panic!("a check failed on its thread (above)"),
    };
    // Its store handle goes before ours (RocksDB aborts a process it outlives).
    checks.join().unwrap();
    for (err, what) in errors {
        assert!(err.contains(what), "{err} (expected it to name {what})");
    }
    assert!(store.resolve("x").is_err(), "nothing was committed");
}
