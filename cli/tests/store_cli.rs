//! The store through the `snapfork` binary: JSON output, errors, verify's exit code, and crash
//! safety under SIGKILL at random points.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng, rngs::StdRng};
use serde_json::Value;
use snapfork_store::{GcOptions, OpenOptions, Store};

mod common;
use common::json;

const PAGE: usize = 4096;

fn snapfork(store: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_snapfork"));
    c.arg("--store").arg(store);
    c
}

fn image(rng: &mut StdRng, pages: usize) -> Vec<u8> {
    let mut data = vec![0u8; pages * PAGE];
    for page in data.chunks_mut(PAGE) {
        match rng.random_range(0..4) {
            0 => {}
            1 => page.fill(rng.random()),
            _ => rng.fill(&mut page[..PAGE / 2]),
        }
    }
    data
}

#[test]
fn ingest_cat_ls_stats_rm_gc_speak_json() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let mut rng = StdRng::seed_from_u64(1);
    let data = image(&mut rng, 300);
    let file = tmp.path().join("vm.mem");
    fs::write(&file, &data).unwrap();
    let out = json(&snapfork(&store).args(["ingest", "--json", "--name", "vm/a"]).arg(&file).output().unwrap());
    let id = out["id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 64);
    assert_eq!(out["pages"], 300);

    let copy = tmp.path().join("copy");
    json(&snapfork(&store).args(["cat", "vm/a", "--json", "-o"]).arg(&copy).output().unwrap());
    assert_eq!(fs::read(&copy).unwrap(), data);
    // By id, too.
    json(&snapfork(&store).args(["cat", &id, "--json", "-o"]).arg(&copy).output().unwrap());
    assert_eq!(fs::read(&copy).unwrap(), data);

    let ls = json(&snapfork(&store).args(["ls", "--json"]).output().unwrap());
    assert_eq!(ls["refs"][0]["name"], "vm/a");
    assert_eq!(ls["refs"][0]["size"], data.len());
    let stats = json(&snapfork(&store).args(["stats", "--json"]).output().unwrap());
    let zero_pages = data.chunks(PAGE).filter(|p| p.iter().all(|&b| b == 0)).count();
    assert_eq!(stats["refs"][0]["zero_pages"], zero_pages);

    // A blob.
    let blob =
        json(&snapfork(&store).args(["ingest", "--blob", "--json", "--name", "state"]).arg(&file).output().unwrap());
    assert_eq!(blob["kind"], "blob");
    json(&snapfork(&store).args(["cat", "state", "--json", "-o"]).arg(&copy).output().unwrap());
    assert_eq!(fs::read(&copy).unwrap(), data);

    json(&snapfork(&store).args(["rm", "vm/a", "state", "--json"]).output().unwrap());
    let dry = json(&snapfork(&store).args(["gc", "--dry-run", "--grace", "0", "--json"]).output().unwrap());
    assert!(dry["removed_chunks"].as_u64().unwrap() > 0);
    let gc = json(&snapfork(&store).args(["gc", "--grace", "0", "--json"]).output().unwrap());
    assert_eq!(gc["removed_chunks"], dry["removed_chunks"]);
    let after = json(&snapfork(&store).args(["stats", "--json"]).output().unwrap());
    assert_eq!(after["total"]["chunks"], 0);
}

/// A file object left in `objects/` without its index entry (a checkpoint killed between moving
/// it into place and indexing it): `gc` reports it in its text and JSON, and removes it once it
/// is older than `--grace`.
#[test]
fn gc_reports_and_removes_orphaned_file_objects() {
    let tmp = tempfile::tempdir().unwrap();
    let store_dir = tmp.path().join("store");
    let content = vec![3u8; 5000];
    let orphan = {
        let store = Store::open(&store_dir, OpenOptions::default()).unwrap();
        let path = store.file_object_path(&snapfork_store::Hash::of(&content));
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, &content).unwrap();
        path
    };
    let kept = json(&snapfork(&store_dir).args(["gc", "--json"]).output().unwrap());
    assert_eq!(kept["orphaned_files"], 0, "younger than the default grace period: {kept}");
    let dry = json(&snapfork(&store_dir).args(["gc", "--dry-run", "--grace", "0", "--json"]).output().unwrap());
    assert_eq!((&dry["orphaned_files"], &dry["orphaned_file_bytes"]), (&1.into(), &5000.into()), "{dry}");
    assert!(orphan.exists(), "a dry run removed it");
    let out = snapfork(&store_dir).args(["gc", "--grace", "0"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text} {}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("1 orphaned file objects (4.9 KiB)"), "{text}");
    assert!(!orphan.exists(), "gc left it");
}

/// A ref already in use moves only when asked: by `--force`, or by an ingest onto it.
#[test]
fn ingest_does_not_move_a_ref_unless_asked() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let mut rng = StdRng::seed_from_u64(2);
    let files: Vec<PathBuf> = (0..3)
        .map(|i| {
            let f = tmp.path().join(format!("img-{i}"));
            fs::write(&f, image(&mut rng, 20)).unwrap();
            f
        })
        .collect();
    let ingest = |args: &[&str], file: &Path| snapfork(&store).arg("ingest").args(args).arg(file).output().unwrap();
    let named = || json(&snapfork(&store).args(["ls", "--json"]).output().unwrap())["refs"][0]["id"].clone();
    let a = json(&ingest(&["--json", "--name", "vm"], &files[0]));
    assert_eq!(a["replaced"], Value::Null);

    for args in [&["--name", "vm"][..], &["--name", "vm", "--blob"]] {
        let out = ingest(args, &files[1]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("already names") && err.contains("--force"), "{err}");
        assert_eq!(named(), a["id"], "{args:?} moved the ref");
    }
    let b = json(&ingest(&["--json", "--name", "vm", "--parent", "vm"], &files[1]));
    assert_eq!((&b["replaced"], named()), (&a["id"], b["id"].clone()));
    let c = json(&ingest(&["--json", "--name", "vm", "--force", "--blob"], &files[2]));
    assert_eq!((&c["replaced"], named()), (&b["id"], c["id"].clone()));
}

#[test]
fn a_second_process_waits_for_the_writer_then_names_it() {
    let tmp = tempfile::tempdir().unwrap();
    let store_dir = tmp.path().join("store");
    let file = tmp.path().join("f");
    fs::write(&file, vec![1u8; 3 * PAGE]).unwrap();
    let held = Store::open(&store_dir, OpenOptions::default()).unwrap();
    let start = Instant::now();
    let out =
        snapfork(&store_dir).args(["--lock-timeout", "0.7", "ingest", "--name", "x"]).arg(&file).output().unwrap();
    let waited = start.elapsed();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("locked by process {}", std::process::id())), "{err}");
    assert!(waited >= Duration::from_millis(700), "it did not wait: {waited:?}");
    // Readers do not wait for the writer.
    let ls = json(&snapfork(&store_dir).args(["ls", "--json"]).output().unwrap());
    assert_eq!(ls["refs"].as_array().map(Vec::len), Some(0));
    // Once the holder goes, the same command succeeds.
    drop(held);
    json(
        &snapfork(&store_dir)
            .args(["--lock-timeout", "0.7", "ingest", "--json", "--name", "x"])
            .arg(&file)
            .output()
            .unwrap(),
    );
}

#[test]
fn bad_input_is_one_clear_line_and_a_non_zero_exit() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let out = snapfork(&store).args(["ingest", "/nonexistent/file", "--name", "x"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/file"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let file = tmp.path().join("f");
    fs::write(&file, b"data").unwrap();
    let out = snapfork(&store).args(["ingest", "--name", "bad name!"]).arg(&file).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad ref name"));
    let out = snapfork(&store).args(["ingest", "--name", "x", "--page-size", "1000"]).arg(&file).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("page size 1000"));
    let out = snapfork(&store).args(["cat", "missing", "-o"]).arg(tmp.path().join("o")).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing"));
    assert!(!out.status.success());
    // A page list with a page past the image: refused, nothing allocated for it.
    let list = tmp.path().join("dirty");
    fs::write(&list, "0-18446744073709551615").unwrap();
    let out = snapfork(&store).args(["ingest", "--name", "y", "--dirty-pages"]).arg(&list).arg(&file).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("past the image"), "{out:?}");
    // Arguments clap refuses: one line, and with --json one object; "forever" is no crash.
    let out = snapfork(&store).args(["--json", "no-such-command"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(serde_json::from_str::<serde_json::Value>(&stdout).unwrap()["error"].is_string());
    assert_eq!(String::from_utf8_lossy(&out.stderr).trim().lines().count(), 1, "{out:?}");
    let out = snapfork(&store).args(["--lock-timeout", "inf", "ls", "--json"]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn verify_names_the_damaged_page_and_exits_non_zero() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let data: Vec<u8> = (0..64 * PAGE).map(|i| (i * 7 % 251) as u8 ^ (i / PAGE) as u8).collect();
    let file = tmp.path().join("vm.mem");
    fs::write(&file, &data).unwrap();
    json(&snapfork(&store).args(["ingest", "--json", "--name", "vm"]).arg(&file).output().unwrap());
    assert!(snapfork(&store).arg("verify").status().unwrap().success());
    let pack = fs::read_dir(store.join("packs")).unwrap().next().unwrap().unwrap().path();
    let mut bytes = fs::read(&pack).unwrap();
    let n = bytes.len();
    bytes[n / 3] ^= 0x80;
    fs::write(&pack, bytes).unwrap();
    let out = snapfork(&store).arg("verify").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("image vm page "), "{err}");
    // With --json: one object, the report and the error.
    let out = snapfork(&store).args(["verify", "--json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(String::from).collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    let v: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert!(v["error"].as_str().unwrap().contains("image vm page "), "{v}");
    assert!(!v["damaged"].as_array().unwrap().is_empty(), "{v}");
    let out = snapfork(&store).args(["cat", "vm", "-o"]).arg(tmp.path().join("o")).output().unwrap();
    assert!(!out.status.success(), "cat must refuse to write damaged data");
    assert!(String::from_utf8_lossy(&out.stderr).contains("corrupt image vm page"));
}

/// Kills `snapfork ingest` (and gc) with SIGKILL at random instants; after each kill the store
/// must open, verify, and hold every ref whose ingest reported success, byte for byte.
#[test]
fn sigkill_at_random_points_never_loses_a_reported_commit() {
    let tmp = tempfile::tempdir().unwrap();
    let store_dir = tmp.path().join("store");
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let base = image(&mut rng, 6000); // ~24 MiB
    let mut committed: Vec<(String, PathBuf, String)> = Vec::new();
    let mut killed = 0;
    // How long an ingest of this kind takes here, measured on the rounds that run to completion
    // (every fourth, starting with the first), so that kills land before, during and after the
    // writes whatever the machine's load.
    let mut full_ms: u64 = 0;
    for round in 0..24 {
        let mut data = base.clone();
        for _ in 0..500 {
            let p = rng.random_range(0..6000);
            rng.fill(&mut data[p * PAGE..p * PAGE + 64]);
        }
        let file = tmp.path().join(format!("img-{round}"));
        fs::write(&file, &data).unwrap();
        let name = format!("r{round}");
        // Every fourth ingest runs to completion, so commits exist whatever the machine's load;
        // the others are killed at a random instant within one ingest's duration.
        let completes = round % 4 == 0;
        let gc_round = round % 6 == 5 && !completes;
        let mut cmd = if gc_round {
            let mut c = snapfork(&store_dir);
            c.args(["gc", "--grace", "0", "--json"]);
            c
        } else {
            let mut c = snapfork(&store_dir);
            c.args(["ingest", "--json", "--name", &name]).arg(&file);
            c
        };
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
        let delay = if completes {
            Duration::from_secs(120)
        } else {
            Duration::from_millis(rng.random_range(0..full_ms * 11 / 10))
        };
        let start = Instant::now();
        while start.elapsed() < delay {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        if completes {
            full_ms = (start.elapsed().as_millis() as u64).max(10);
        }
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        if out.status.success() {
            if !gc_round {
                let v: Value = serde_json::from_slice(&out.stdout).unwrap();
                assert_eq!(v["name"], name.as_str());
                committed.push((name, file, v["id"].as_str().unwrap().to_string()));
            }
        } else {
            killed += 1;
        }
        // The store opens (the kernel dropped the dead writer's lock), verifies (every chunk
        // re-hashed), and every reported commit is there under the id it reported.
        let store = Store::open(&store_dir, OpenOptions { lock_timeout: Duration::from_secs(5), ..Default::default() })
            .expect("store opens after a kill");
        let report = store.verify(None, None).unwrap();
        assert!(report.is_ok(), "round {round}: {:?}", report.damaged);
        for (name, _, id) in &committed {
            let found = store.get_ref(name).unwrap().unwrap_or_else(|| panic!("round {round}: {name} lost"));
            assert_eq!(&found.to_hex(), id, "round {round}: {name} names another image");
        }
        if let Some((name, file, _)) = committed.last() {
            let out = tmp.path().join("check");
            store.open_image_ref(name).unwrap().materialize(&out, None).unwrap();
            assert!(fs::read(&out).unwrap() == fs::read(file).unwrap(), "round {round}: {name} differs");
        }
    }
    eprintln!(
        "{killed} children killed mid-way, {} ingests committed (last full ingest {full_ms} ms)",
        committed.len()
    );
    assert!(killed >= 6, "only {killed} children were killed mid-way: the test did not test");
    assert!(committed.len() >= 3, "only {} ingests completed", committed.len());
    // Half-written packs are garbage that gc reclaims.
    let store = Store::open(&store_dir, OpenOptions::default()).unwrap();
    store.gc(&GcOptions { grace: Duration::ZERO, ..GcOptions::default() }).unwrap();
    let stats = store.stats("").unwrap().total;
    assert!(stats.pack_bytes <= stats.stored_bytes + stats.chunks * 48 + 64 * 16, "{stats:?}");
    assert!(store.verify(None, None).unwrap().is_ok());
}
