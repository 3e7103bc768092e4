//! Lazy restore through the `snapfork` binary: `serve-uffd` serving VMs that speak Firecracker's
//! handshake, recording the working set; `bench restore` with every mode, forks and a chart.
//! Root required (userfaultfd for other processes, dropping a file's page cache); CI runs as root.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng, rngs::StdRng};
use serde_json::Value;

mod common;
use common::json;

const PAGE: usize = 4096;

fn snapfork(store: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_snapfork"));
    c.arg("--store").arg(store).arg("--json");
    c
}

/// A memory image of `pages` pages: a quarter zero, the rest random or half random.
fn ingest_image(dir: &Path, store: &Path, pages: usize) -> (PathBuf, Vec<u8>) {
    let mut rng = StdRng::seed_from_u64(0x0ffd);
    let mut data = vec![0u8; pages * PAGE];
    for page in data.chunks_mut(PAGE) {
        match rng.random_range(0..4) {
            0 => {}
            1 => rng.fill(page),
            _ => rng.fill(&mut page[..PAGE / 2]),
        }
    }
    let file = dir.join("mem.raw");
    std::fs::write(&file, &data).unwrap();
    let out = json(&snapfork(store).args(["ingest", "--name", "vm"]).arg(&file).output().unwrap());
    assert_eq!(out["name"], "vm");
    (file, data)
}

/// A VM in its own process, as Firecracker would be (`snapfork __bench-guest`, the guest of
/// `bench restore`): restores from `socket`, touches `pattern`'s pages in order, and reports a
/// checksum of the first word of each.
fn vm_process(socket: &Path, size: usize, pattern: &Path) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_snapfork"))
        .args(["__bench-guest", "--mode", "uffd", "--size", &size.to_string(), "--socket"])
        .arg(socket)
        .arg("--pattern")
        .arg(pattern)
        .output()
        .unwrap();
    json(&out)
}

/// The checksum `vm_process` reports for `pages` of `data`.
fn checksum(data: &[u8], pages: &[u64]) -> u64 {
    pages.iter().fold(0u64, |c, &p| {
        let w = u64::from_ne_bytes(data[p as usize * PAGE..][..8].try_into().unwrap());
        c.rotate_left(5) ^ w
    })
}

/// `snapfork serve-uffd vm` for `restores` VMs, once it listens on `socket`.
fn serve_uffd(store: &Path, socket: &Path, restores: u32) -> std::process::Child {
    let _ = std::fs::remove_file(socket);
    let server = snapfork(store)
        .args(["serve-uffd", "vm", "--max-restores", &restores.to_string(), "--socket"])
        .arg(socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !socket.exists() {
        assert!(start.elapsed() < Duration::from_secs(30), "serve-uffd never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
    server
}

#[test]
fn serve_uffd_serves_vms_and_records_the_working_set() {
    if !common::require("serve_uffd_serves_vms_and_records_the_working_set", false) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let (_, data) = ingest_image(tmp.path(), &store, 1024);
    let socket = tmp.path().join("uffd.sock");
    let server = serve_uffd(&store, &socket, 2);
    // Two VMs, one after the other, each touching every page: both see the image's bytes.
    let pages: Vec<u64> = (0..(data.len() / PAGE) as u64).collect();
    let pattern = tmp.path().join("all-pages");
    std::fs::write(&pattern, snapfork_lazy_restore::workingset::encode(PAGE as u32, &pages)).unwrap();
    for vm in 0..2 {
        let seen = vm_process(&socket, data.len(), &pattern);
        assert_eq!(seen["checksum"].as_u64(), Some(checksum(&data, &pages)), "vm {vm}: {seen}");
    }
    let out = server.wait_with_output().unwrap();
    let report = json(&out);
    assert_eq!(report["started"], 2, "{report}");
    assert_eq!(report["ended"], 2, "{report}");
    // The first restore's faults became the image's working set, stored under a ref...
    assert!(report["id"].is_string(), "no working set stored: {report}");
    let ws = json(&snapfork(&store).args(["working-set", "show", "vm"]).output().unwrap());
    assert!(ws["pages"].as_u64().unwrap() > 0, "{ws}");
    // ...with its data pages stored again, back to back, for the next server to preload.
    let nonzero = data.chunks(PAGE).filter(|p| p.iter().any(|&b| b != 0)).count() as u64;
    assert!(ws["pages_blob_bytes"].as_u64().unwrap() >= nonzero * PAGE as u64, "{ws}");
    // ...which the second restore prefetched or found already faulted in: together with its
    // own faults, every non-zero page was installed exactly once.
    let stats = &report["restores"][1]["stats"];
    assert_eq!(stats["pages_copied"].as_u64().unwrap(), nonzero, "{stats}");

    // A new server finds the working set with its pages and streams them into its cache before
    // any VM asks: all of the working set's data pages, each verified, none rejected.
    let server = serve_uffd(&store, &socket, 1);
    let seen = vm_process(&socket, data.len(), &pattern);
    assert_eq!(seen["checksum"].as_u64(), Some(checksum(&data, &pages)), "{seen}");
    let report = json(&server.wait_with_output().unwrap());
    assert_eq!(report["preloaded"]["pages"].as_u64(), Some(nonzero), "{report}");
    assert_eq!(report["preloaded"]["rejected"].as_u64(), Some(0), "{report}");
}

#[test]
fn bench_restore_measures_every_mode_and_plots_them() {
    if !common::require("bench_restore_measures_every_mode_and_plots_them", false) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    ingest_image(tmp.path(), &store, 2048);
    // A chart named for another format is refused before anything is measured.
    let png = tmp.path().join("restore.png");
    let out = snapfork(&store).args(["bench", "restore", "vm", "--plot"]).arg(&png).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("SVG"));
    assert!(!png.exists());
    let svg = tmp.path().join("restore.svg");
    let out = snapfork(&store)
        .args(["bench", "restore", "vm", "--working-set", "0.1", "--forks", "2", "--plot"])
        .arg(&svg)
        .output()
        .unwrap();
    let report = json(&out);
    let rows = report["rows"].as_array().unwrap();
    let modes: Vec<&str> = rows.iter().map(|r| r["mode"].as_str().unwrap()).collect();
    for mode in [
        "file-cold",
        "file-warm",
        "floor: memcpy",
        "eager",
        "lazy",
        "lazy+prefetch",
        "lazy+pf by page",
        "lazy+pf warm",
        "full: eager",
        "full: lazy",
        "full: lazy+fill",
    ] {
        assert!(modes.contains(&mode), "no {mode} row in {modes:?}");
    }
    for row in rows {
        assert!(row["pages_installed"].as_u64().unwrap() > 0, "{row}");
        assert!(row["touch_ms"].as_f64().unwrap() > 0.0, "{row}");
    }
    // The side-by-side ratios are computed, and the forks ran.
    for ratio in ["prefetch_vs_file_cold", "prefetch_vs_file_warm", "full_lazy_vs_eager", "memcpy_floor_vs_file_warm"] {
        assert!(report["ratios"][ratio].as_f64().is_some_and(|r| r > 0.0), "{ratio}: {}", report["ratios"]);
    }
    let lazy = rows.iter().find(|r| r["mode"] == "lazy").unwrap();
    assert_eq!(lazy["forks"], 2, "{lazy}");
    assert!(lazy["forks_wall_ms"].as_f64().unwrap() > 0.0, "{lazy}");
    // The working-set pages it stored for its own working set are gone again.
    let refs = json(&snapfork(&store).args(["ls"]).output().unwrap());
    assert!(!refs.to_string().contains("bench-working-set-pages"), "{refs}");
    let chart = std::fs::read_to_string(&svg).unwrap();
    assert!(chart.contains("<svg") && chart.contains("lazy+prefetch"), "not a chart of the rows");
}

/// `serve-uffd --journal` killed under a running VM and started again: the new server takes the
/// VM over, and the VM reads the rest of its memory right.
#[test]
fn serve_uffd_restarted_with_a_journal_takes_over_its_vms() {
    use std::io::{BufRead, Write};
    if !common::require("serve_uffd_restarted_with_a_journal_takes_over_its_vms", false) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let (_, data) = ingest_image(tmp.path(), &store, 2048);
    let pages: Vec<u64> = (0..(data.len() / PAGE) as u64).collect();
    let pattern = tmp.path().join("all-pages");
    std::fs::write(&pattern, snapfork_lazy_restore::workingset::encode(PAGE as u32, &pages)).unwrap();
    let (socket, journals) = (tmp.path().join("uffd.sock"), tmp.path().join("journals"));
    let serve = || {
        snapfork(&store)
            .args(["serve-uffd", "vm", "--no-record", "--socket"])
            .arg(&socket)
            .arg("--journal")
            .arg(&journals)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap()
    };
    let mut first = serve();
    let t = Instant::now();
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(t.elapsed() < Duration::from_secs(30), "serve-uffd never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The VM touches half its pages, then waits.
    let mut vm = Command::new(env!("CARGO_BIN_EXE_snapfork"))
        .args(["__bench-guest", "--mode", "uffd", "--hold", "--size", &data.len().to_string(), "--socket"])
        .arg(&socket)
        .arg("--pattern")
        .arg(&pattern)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(vm.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(line.contains("held"), "{line:?}");
    // The server dies; a new one starts on the same socket and journals.
    first.kill().unwrap();
    first.wait().unwrap();
    let second = serve();
    let _reap = KillOnPanic(vec![second.id(), vm.id()]);
    let t = Instant::now();
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(t.elapsed() < Duration::from_secs(30), "the second serve-uffd never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
    vm.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    let seen: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(seen["checksum"].as_u64(), Some(checksum(&data, &pages)), "{seen}");
    assert!(vm.wait().unwrap().success());
    // SIGINT: the second server reports the VM it took over, which ended when the VM exited.
    let st = Command::new("kill").args(["-INT", &second.id().to_string()]).status().unwrap();
    assert!(st.success());
    let report = json(&second.wait_with_output().unwrap());
    assert_eq!(report["adopted"].as_array().map(Vec::len), Some(1), "{report}");
    assert_eq!(report["adopted"][0]["end"]["kind"], "peer_exited", "{report}");
    assert_eq!(std::fs::read_dir(&journals).unwrap().count(), 0, "journal left behind");
}

/// Kills the test's child processes if it fails (a VM left waiting, a server left serving).
struct KillOnPanic(Vec<u32>);

impl Drop for KillOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for pid in &self.0 {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        }
    }
}
