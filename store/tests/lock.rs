//! One writer at a time: a second process waits, then gets an error naming the holder's pid.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use snapfork_store::{Error, OpenOptions, Store};

#[test]
fn a_second_writer_waits_then_names_the_holder() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let _held = Store::open(&dir, OpenOptions::default()).unwrap();
    // Another process (flock locks are per open file, so a second open in this process would
    // also conflict, but a real second process is what users run into).
    let exe = std::env::current_exe().unwrap();
    let start = Instant::now();
    let out = Command::new(exe)
        .args(["--exact", "second_writer_child", "--nocapture"])
        .env("SNAPFORK_LOCK_TEST_DIR", &dir)
        .output()
        .unwrap();
    let waited = start.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(&format!("locked by process {}", std::process::id())), "{stdout}");
    assert!(waited >= Duration::from_millis(500), "the child did not wait: {waited:?}");
    // Readers do not wait.
    let ro = Store::open(&dir, OpenOptions { read_only: true, ..OpenOptions::default() }).unwrap();
    assert!(ro.list_refs("").unwrap().is_empty());
}

/// Runs inside the child process of the test above.
#[test]
fn second_writer_child() {
    let Some(dir) = std::env::var_os("SNAPFORK_LOCK_TEST_DIR") else { return };
    let opts = OpenOptions { lock_timeout: Duration::from_millis(600), ..OpenOptions::default() };
    match Store::open(dir, opts) {
        Err(e @ Error::Locked { .. }) => println!("{e}"),
        Err(e) => panic!("expected a lock error, got {e}"),
        Ok(_) => panic!("opened a store another process holds"),
    }
}

#[test]
fn the_lock_is_released_when_the_holder_goes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let store = Store::open(&dir, OpenOptions::default()).unwrap();
    drop(store);
    let opts = OpenOptions { lock_timeout: Duration::ZERO, ..OpenOptions::default() };
    Store::open(&dir, opts).unwrap();
}
