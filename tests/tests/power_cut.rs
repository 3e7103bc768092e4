//! Power cuts, simulated on loop-mounted XFS and ext4 (`FS_IOC_SHUTDOWN` without a log flush:
//! whatever was not durable is lost; btrfs has no such ioctl). The machine is a child process
//! that dies on the spot. Every commit the store reported before the cut is there afterwards,
//! byte for byte and verified: full and incremental image ingests, a runtime image adopted as a
//! pack, a workspace checkpoint and the revert to it. A transaction that had not committed leaves no ref, and gc takes its torn
//! pack. A busy machine (ingests, checkpoints and gc at once) loses power at random moments.
//! Needs root.

use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use snapfork_fsfork::testfs::{self, FsType, TestFs, require_root};
use snapfork_fsfork::workspace;
use snapfork_store::{GcOptions, IngestOptions, OpenOptions, Store};

const PAGE: usize = 4096;
/// Longer than any machine here runs (a few seconds): past it, it is killed as hung.
const MACHINE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// A memory-like image: zero pages, random pages and repetitive (compressible) ones.
fn image(seed: u64, pages: usize) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = vec![0u8; pages * PAGE];
    for page in out.chunks_mut(PAGE) {
        match rng.random_range(0..3) {
            0 => {}
            1 => rng.fill(page),
            _ => {
                let word: [u8; 8] = rng.random();
                for (i, b) in page.iter_mut().enumerate() {
                    *b = word[i % 8];
                }
            }
        }
    }
    out
}

fn packs(store_dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(store_dir.join("packs")).unwrap().flatten().map(|e| e.path()).collect();
    v.sort();
    v
}

/// Inputs of the machine that loses power: written by the test, read by its child.
fn inputs(dir: &Path) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let (a, b, c) = (image(1, 2048), image(2, 2048), image(3, 2048));
    let mut b_on_a = a.clone();
    for p in (0..2048).step_by(37) {
        b_on_a[p * PAGE..(p + 1) * PAGE].copy_from_slice(&b[p * PAGE..(p + 1) * PAGE]);
    }
    for (name, data) in [("a.raw", &a), ("b.raw", &b_on_a), ("c.raw", &c)] {
        std::fs::write(dir.join(name), data).unwrap();
    }
    (a, b_on_a, c)
}

/// The machine that loses power, run as a child process of the test (through
/// [`power_cut_child`]): commits what it reports on stdout, starts a transaction it never
/// commits, cuts the power of the filesystem holding the store and dies on the spot, as the
/// machine would, without closing anything.
fn machine(mount: &Path, inputs: &Path) -> ! {
    testfs::machine_panics_are_failures();
    let dir = mount.join("store");
    let store = Store::open(&dir, OpenOptions::default()).expect("open store");
    // In flight at the cut: a transaction that writes pack data and never commits. The kernel
    // wrote back its first part (it may, at any time): flushed here, before anything else
    // happened, so that the flush makes nothing that the reported commits wrote durable.
    let before = packs(&dir);
    let mut in_flight_tx = store.begin().unwrap();
    in_flight_tx.ingest_image(&inputs.join("c.raw"), &IngestOptions::default()).unwrap();
    let f = std::fs::File::open(&dir).unwrap();
    // SAFETY: syncfs on a descriptor we own; it touches no memory of ours.
    assert_eq!(unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&f)) }, 0);
    let in_flight: Vec<PathBuf> = packs(&dir).into_iter().filter(|p| !before.contains(p)).collect();

    // Reported commits: a full ingest, an incremental one, a workspace checkpoint.
    let ia = store.ingest_image(&inputs.join("a.raw"), &IngestOptions::default(), Some("a")).unwrap();
    let opts = IngestOptions { parent: Some(ia.id), ..Default::default() };
    let ib = store.ingest_image(&inputs.join("b.raw"), &opts, Some("b")).unwrap();
    let ws = mount.join("ws");
    std::fs::create_dir_all(ws.join("src")).unwrap();
    std::fs::write(ws.join("src/main.rs"), "fn main() {}\n").unwrap();
    std::fs::write(ws.join("disk.img"), &std::fs::read(inputs.join("c.raw")).unwrap()[..1 << 20]).unwrap();
    std::fs::hard_link(ws.join("disk.img"), ws.join("disk-link.img")).unwrap();
    let ck = workspace::checkpoint(&store, &ws, Some("before the cut")).unwrap();
    // The agent's risky action, then the revert that undoes it (reported, so it must hold).
    std::fs::write(ws.join("src/main.rs"), "fn main() { broken }\n").unwrap();
    std::fs::remove_file(ws.join("disk-link.img")).unwrap();
    std::fs::write(ws.join("new.txt"), "made after the checkpoint\n").unwrap();
    workspace::checkpoint(&store, &ws, Some("the risky action")).unwrap();
    workspace::revert(&store, &ws, &ck.id).unwrap();
    // A runtime's checkpoint image (gVisor's), written and not synced by its runtime, adopted
    // whole as a pack.
    let runtime_image = mount.join("checkpoint.img");
    std::fs::write(&runtime_image, image(4, 768)).unwrap();
    let mut tx = store.begin().unwrap();
    for (k, blob) in tx.adopt_file_as_blobs(&runtime_image, 1 << 20).unwrap().iter().enumerate() {
        tx.set_ref(&format!("runtime-{k}"), blob.id).unwrap();
    }
    tx.commit().unwrap();
    let refs: Vec<(String, String)> =
        store.list_refs("").unwrap().into_iter().map(|(n, id)| (n, id.to_hex())).collect();

    // The transaction in flight writes more, which the cut loses: its pack survives torn.
    in_flight_tx.ingest_image(&inputs.join("b.raw"), &IngestOptions::default()).unwrap();
    in_flight_tx.set_ref("c", snapfork_store::Hash::of(b"never committed")).unwrap();
    let report = serde_json::json!({
        "a": ia.id.to_hex(), "b": ib.id.to_hex(),
        "checkpoint": ck.id.hex(), "refs": refs, "in_flight": in_flight,
    });
    println!("MACHINE {report}");
    testfs::power_cut_and_exit(mount)
}

/// Not a test of its own (so ignored): the entry point of [`machine`] and [`busy_machine`] in
/// the child process.
#[test]
#[ignore = "the child process of the power-cut tests"]
fn power_cut_child() {
    let Some(mount) = std::env::var_os("POWER_CUT_MOUNT") else { return };
    let inputs = std::env::var_os("POWER_CUT_INPUTS").expect("POWER_CUT_INPUTS");
    match std::env::var("POWER_CUT_ROUND") {
        Err(_) => machine(Path::new(&mount), Path::new(&inputs)),
        Ok(round) => {
            let after_ms = std::env::var("POWER_CUT_AFTER_MS").unwrap().parse().unwrap();
            busy_machine(Path::new(&mount), Path::new(&inputs), round.parse().unwrap(), after_ms)
        }
    }
}

/// Image `i` of round `r` of the busy machine: one base shared by all, pages of its own, and a
/// third of the previous image's own pages. Dropping an image then leaves its pack a third
/// live, which gc rewrites: the cuts also fall among pack rewrites.
fn busy_image(r: u64, i: u64) -> Vec<u8> {
    let mut img = image(7, 1024);
    let mut take = |i: u64, every: usize| {
        let own = image(r * 1000 + i, 1024);
        for p in ((i % 13) as usize..1024).step_by(13 * every) {
            img[p * PAGE..(p + 1) * PAGE].copy_from_slice(&own[p * PAGE..(p + 1) * PAGE]);
        }
    };
    if i > 0 {
        take(i - 1, 3);
    }
    take(i, 1);
    img
}

/// File `k` of checkpoint `i` of round `r` of the busy machine's workspace.
fn busy_file(r: u64, i: u64, k: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64((r * 1000 + i) * 10 + k);
    let mut v = vec![0u8; (k as usize + 1) * 40_000];
    rng.fill(&mut v[..]);
    v
}

/// The ref of image `i` of round `r` (zero-padded: refs list in the order they were made).
fn busy_ref(r: u64, i: u64) -> String {
    format!("img-{r}-{i:06}")
}

/// A machine at work when its power goes, `after_ms` after its first commit: one thread
/// ingests images, one edits and checkpoints a workspace, one drops old image refs and
/// collects garbage. Each commit is reported on stdout once it returned (`COMMIT image r i ID`,
/// `COMMIT ckpt r i ID`); each ref drop before it is made (`DROPPING NAME`). `scratch` is off
/// the filesystem that loses power.
fn busy_machine(mount: &Path, scratch: &Path, r: u64, after_ms: u64) -> ! {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};
    testfs::machine_panics_are_failures();
    let store = Store::open(mount.join("store"), OpenOptions::default()).expect("open store");
    let committed = std::sync::Arc::new(AtomicBool::new(false));
    let say = |line: String| {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}").unwrap();
        out.flush().unwrap();
    };
    let report = {
        let committed = committed.clone();
        move |what: &str, i: u64, id: String| {
            say(format!("COMMIT {what} {r} {i} {id}"));
            committed.store(true, Ordering::SeqCst);
        }
    };
    let ingest = {
        let (store, dir, report) = (store.clone(), scratch.to_path_buf(), report.clone());
        std::thread::spawn(move || {
            for i in 0.. {
                let path = dir.join(format!("img-{i}.raw"));
                std::fs::write(&path, busy_image(r, i)).unwrap();
                let info = store.ingest_image(&path, &IngestOptions::default(), Some(&busy_ref(r, i))).unwrap();
                report("image", i, info.id.to_hex());
                std::fs::remove_file(&path).unwrap();
            }
        })
    };
    let checkpoints = {
        let (store, ws) = (store.clone(), mount.join(format!("ws-{r}")));
        std::thread::spawn(move || {
            std::fs::create_dir_all(&ws).unwrap();
            for i in 0.. {
                for k in 0..3 {
                    std::fs::write(ws.join(format!("f{k}")), busy_file(r, i, k)).unwrap();
                }
                let ck = workspace::checkpoint(&store, &ws, None).unwrap();
                report("ckpt", i, ck.id.hex());
            }
        })
    };
    let gc = {
        let store = store.clone();
        std::thread::spawn(move || {
            loop {
                // Images are dropped (all but the newest four) and collected while others are
                // ingested.
                for (name, _) in store.list_refs("img-").unwrap().into_iter().rev().skip(4) {
                    say(format!("DROPPING {name}"));
                    let mut tx = store.begin().unwrap();
                    tx.delete_ref(&name);
                    tx.commit().unwrap();
                }
                let gc = store.gc(&GcOptions { grace: std::time::Duration::ZERO, ..Default::default() }).unwrap();
                if gc.repacked > 0 {
                    say(format!("REPACKED {}", gc.repacked));
                }
            }
        })
    };
    while !committed.load(Ordering::SeqCst) {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    std::thread::sleep(std::time::Duration::from_millis(after_ms));
    drop((ingest, checkpoints, gc));
    testfs::power_cut_and_exit(mount)
}

/// Rounds of a busy machine losing power at a random moment, on one filesystem: after each,
/// every commit it reported is there and verifies, byte for byte.
fn power_cut_at_a_random_moment(kind: FsType, test: &str) {
    if !require_root(test) {
        return;
    }
    let fs = TestFs::new(kind, 2048).expect("make test filesystem");
    let mut rng = rand::rngs::StdRng::seed_from_u64(std::process::id() as u64);
    let out = tempfile::Builder::new().prefix("sf-powercut-").tempdir_in("/var/tmp").unwrap();
    let mut images: Vec<(u64, u64, String)> = Vec::new();
    let mut dropping = std::collections::HashSet::new();
    let (mut commits, mut repacked) = (0, 0);
    for r in 0..4u64 {
        let after_ms = rng.random_range(0..1200);
        let stdout = testfs::run_machine(
            std::process::Command::new(std::env::current_exe().unwrap())
                .args(["power_cut_child", "--exact", "--ignored", "--nocapture", "--test-threads", "1"])
                .env("POWER_CUT_MOUNT", fs.path())
                .env("POWER_CUT_INPUTS", out.path())
                .env("POWER_CUT_ROUND", r.to_string())
                .env("POWER_CUT_AFTER_MS", after_ms.to_string()),
            fs.path(),
            MACHINE_TIMEOUT,
        )
        .unwrap_or_else(|e| panic!("round {r}: {e}"));
        dropping.extend(stdout.lines().filter_map(|l| l.split_once("DROPPING ").map(|(_, n)| n.to_string())));
        let reported: Vec<(String, u64, String)> = stdout
            .lines()
            .filter_map(|l| l.split_once("COMMIT ").map(|(_, c)| c))
            .filter_map(|c| match c.split(' ').collect::<Vec<_>>()[..] {
                [what, rr, i, id] if rr == r.to_string() => Some((what.to_string(), i.parse().ok()?, id.to_string())),
                _ => None,
            })
            .collect();
        assert!(!reported.is_empty(), "round {r}: the machine reported nothing\n{stdout}");
        fs.remount().expect("remount after the power cut");
        let store = Store::open(fs.path().join("store"), OpenOptions::default())
            .unwrap_or_else(|e| panic!("round {r} (cut after {after_ms} ms): the store does not open: {e}"));
        let report = store.verify(None, None).unwrap();
        assert!(report.is_ok(), "round {r} (cut after {after_ms} ms): damage {:?}", report.damaged);
        for (what, i, id) in &reported {
            commits += 1;
            if what == "image" {
                images.push((r, *i, id.clone()));
                continue;
            }
            let ck = workspace::resolve_checkpoint(&store, id).unwrap();
            let dst = fs.path().join(format!("check-{r}-{i}"));
            workspace::restore(&store, &ck, &dst).unwrap();
            for k in 0..3 {
                let got = std::fs::read(dst.join(format!("f{k}"))).unwrap();
                assert!(got == busy_file(r, *i, k), "round {r}: checkpoint {i}, file f{k} differs after the cut");
            }
            std::fs::remove_dir_all(&dst).unwrap();
        }
        // Every reported image the machine had not begun to drop is there.
        let refs = store.list_refs("img-").unwrap();
        for (rr, i, id) in &images {
            let name = busy_ref(*rr, *i);
            let Some((_, got)) = refs.iter().find(|(n, _)| *n == name) else {
                assert!(dropping.contains(&name), "{name} was reported committed and is gone after the cut");
                continue;
            };
            assert_eq!(got.to_hex(), *id, "{name} names another image after the cut");
            let path = out.path().join("img.raw");
            store.open_image_ref(&name).unwrap().materialize(&path, None).unwrap();
            assert!(std::fs::read(&path).unwrap() == busy_image(*rr, *i), "{name} differs after the cut");
        }
        let last = |w: &str| reported.iter().filter(|c| c.0 == w).map(|c| c.1).max();
        let round_repacks: u64 =
            stdout.lines().filter_map(|l| l.split_once("REPACKED ").and_then(|(_, n)| n.parse::<u64>().ok())).sum();
        repacked += round_repacks;
        eprintln!(
            "{kind:?} round {r}: power cut after {after_ms} ms; last reported image {:?}, checkpoint {:?}; \
             {round_repacks} packs rewritten by gc",
            last("image"),
            last("ckpt")
        );
    }
    assert!(commits > 0);
    // The cuts also fell among gc's pack rewrites (copy, index switch, removal of the old pack).
    assert!(repacked > 0, "gc rewrote no pack in any round: the rewrite was never cut into");
}

#[test]
fn power_cut_at_a_random_moment_xfs() {
    power_cut_at_a_random_moment(FsType::Xfs, "power_cut_at_a_random_moment_xfs");
}

#[test]
fn power_cut_at_a_random_moment_ext4() {
    power_cut_at_a_random_moment(FsType::Ext4, "power_cut_at_a_random_moment_ext4");
}

fn power_cut_keeps_every_reported_commit(kind: FsType, test: &str) {
    if !require_root(test) {
        return;
    }
    let fs = TestFs::new(kind, 1024).expect("make test filesystem");
    // Inputs live off the filesystem that loses power.
    let inputs_dir = tempfile::Builder::new().prefix("sf-powercut-").tempdir_in("/var/tmp").unwrap();
    let (a, b_on_a, c) = inputs(inputs_dir.path());
    let stdout = testfs::run_machine(
        std::process::Command::new(std::env::current_exe().unwrap())
            .args(["power_cut_child", "--exact", "--ignored", "--nocapture", "--test-threads", "1"])
            .env("POWER_CUT_MOUNT", fs.path())
            .env("POWER_CUT_INPUTS", inputs_dir.path()),
        fs.path(),
        MACHINE_TIMEOUT,
    )
    .unwrap();
    let Some(line) = stdout.lines().find_map(|l| l.split_once("MACHINE ").map(|(_, m)| m)) else {
        panic!("the machine reported nothing: {stdout}");
    };
    let m: serde_json::Value = serde_json::from_str(line).unwrap();
    let in_flight: Vec<PathBuf> = serde_json::from_value(m["in_flight"].clone()).unwrap();
    assert!(!in_flight.is_empty(), "the uncommitted ingest wrote no pack");
    let refs_before: Vec<(String, String)> = serde_json::from_value(m["refs"].clone()).unwrap();
    fs.remount().expect("remount after the power cut");

    let dir = fs.path().join("store");
    let store = Store::open(&dir, OpenOptions::default()).expect("the store opens after the power cut");
    let refs: Vec<(String, String)> =
        store.list_refs("").unwrap().into_iter().map(|(n, id)| (n, id.to_hex())).collect();
    assert_eq!(refs, refs_before, "refs changed across the power cut");
    let out = inputs_dir.path().join("out.raw");
    for (name, data) in [("a", &a), ("b", &b_on_a)] {
        let reader = store.open_image_ref(name).unwrap();
        assert_eq!(reader.id().to_hex(), m[name].as_str().unwrap());
        reader.materialize(&out, None).unwrap();
        assert!(std::fs::read(&out).unwrap() == *data, "image {name} differs after the power cut");
    }
    let mut runtime_image = Vec::new();
    for k in 0..3 {
        store.read_blob(&store.resolve(&format!("runtime-{k}")).unwrap(), &mut runtime_image).unwrap();
    }
    assert!(runtime_image == image(4, 768), "the adopted runtime image differs after the power cut");
    let report = store.verify(None, None).unwrap();
    assert!(report.is_ok(), "damage after the power cut: {:?}", report.damaged);
    let dst = fs.path().join("restored");
    let ck = workspace::resolve_checkpoint(&store, m["checkpoint"].as_str().unwrap()).unwrap();
    workspace::restore(&store, &ck, &dst).unwrap();
    // Both the restored checkpoint and the reverted workspace hold the checkpoint's files.
    let ws = fs.path().join("ws");
    let files: [(&str, &[u8]); 3] =
        [("src/main.rs", b"fn main() {}\n"), ("disk.img", &c[..1 << 20]), ("disk-link.img", &c[..1 << 20])];
    use std::os::unix::fs::MetadataExt;
    for tree in [&dst, &ws] {
        for (f, data) in files {
            let got = std::fs::read(tree.join(f)).unwrap_or_else(|e| panic!("{}: {e}", tree.join(f).display()));
            assert!(got == data, "{} differs after the power cut", tree.join(f).display());
        }
        let ino = |f: &str| std::fs::metadata(tree.join(f)).unwrap().ino();
        assert_eq!(ino("disk.img"), ino("disk-link.img"), "{}: the hard link came back as two files", tree.display());
    }
    assert!(!ws.join("new.txt").exists(), "the revert was lost in the power cut");
    assert_eq!(workspace::workspace_record(&store, &ws).unwrap().head, Some(ck.hex()));
    // gc takes what the dead transaction wrote (whatever of it survived), and nothing else.
    let survived: Vec<u64> = in_flight.iter().filter_map(|p| std::fs::metadata(p).ok()).map(|m| m.len()).collect();
    eprintln!("{kind:?}: the uncommitted pack came through the power cut with {survived:?} bytes");
    assert!(!survived.is_empty(), "the uncommitted pack written back before the cut was lost");
    let gc = store.gc(&GcOptions { grace: std::time::Duration::ZERO, ..Default::default() }).unwrap();
    for p in &in_flight {
        assert!(!p.exists(), "gc kept the uncommitted pack {} ({gc:?})", p.display());
    }
    let report = store.verify(None, None).unwrap();
    assert!(report.is_ok(), "damage after gc: {:?}", report.damaged);
    store.open_image_ref("a").unwrap().materialize(&out, None).unwrap();
    assert!(std::fs::read(&out).unwrap() == a, "image a differs after gc");
    // The stat cache that came through the cut vouches only for what the files hold: a new
    // checkpoint of the workspace restores to the same bytes.
    let again = workspace::checkpoint(&store, &ws, Some("after the cut")).unwrap();
    let dst2 = fs.path().join("restored-again");
    workspace::restore(&store, &again.id, &dst2).unwrap();
    for (f, data) in files {
        assert!(std::fs::read(dst2.join(f)).unwrap() == data, "{f}: the checkpoint after the cut records other bytes");
    }
}

#[test]
fn power_cut_keeps_every_reported_commit_xfs() {
    power_cut_keeps_every_reported_commit(FsType::Xfs, "power_cut_keeps_every_reported_commit_xfs");
}

#[test]
fn power_cut_keeps_every_reported_commit_ext4() {
    power_cut_keeps_every_reported_commit(FsType::Ext4, "power_cut_keeps_every_reported_commit_ext4");
}
