//! One writer at a time: a second process waits, then gets an error naming the holder's pid.

mod common;

use std::time::{Duration, Instant};

use snapfork_store::{Error, OpenOptions, Store};

#[test]
fn a_second_writer_in_this_process_waits_then_names_the_holder() {
    // flock locks belong to open files, so a second open in one process conflicts like a second
    // process would (cli/tests/store_cli.rs tests a real second process).
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let _held = Store::open(&dir, OpenOptions::default()).unwrap();
    let start = Instant::now();
    let opts = OpenOptions { lock_timeout: Duration::from_millis(600), ..OpenOptions::default() };
    match Store::open(&dir, opts) {
        Err(e @ Error::Locked { .. }) => {
            assert!(e.to_string().contains(&format!("locked by process {}", std::process::id())), "{e}")
        }
        Err(e) => panic!("expected a lock error, got {e}"),
        Ok(_) => panic!("opened a store that is held"),
    }
    assert!(start.elapsed() >= Duration::from_millis(600), "it did not wait");
    // Readers do not wait.
    let ro = Store::open(&dir, OpenOptions { read_only: true, ..OpenOptions::default() }).unwrap();
    assert!(ro.list_refs("").unwrap().is_empty());
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

#[test]
fn a_store_opened_by_a_relative_path_reports_an_absolute_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let cwd = std::env::current_dir().unwrap();
    let rel = pathdiff(tmp.path(), &cwd).join("store");
    let store = Store::open(&rel, OpenOptions::default()).unwrap();
    assert!(store.dir().is_absolute(), "{}", store.dir().display());
    assert_eq!(store.dir().canonicalize().unwrap(), tmp.path().join("store").canonicalize().unwrap());
}

/// `path` relative to `base` (both absolute), with `..` components.
fn pathdiff(path: &std::path::Path, base: &std::path::Path) -> std::path::PathBuf {
    let (p, b): (Vec<_>, Vec<_>) = (path.components().collect(), base.components().collect());
    let common = p.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut out = std::path::PathBuf::new();
    for _ in common..b.len() {
        out.push("..");
    }
    for c in &p[common..] {
        out.push(c);
    }
    out
}
