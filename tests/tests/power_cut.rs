//! Power cuts, simulated on loop-mounted XFS and ext4 (`FS_IOC_SHUTDOWN` without a log flush:
//! whatever was not durable is lost; btrfs has no such ioctl). The machine is a child process
//! that dies on the spot. Every commit the store reported before the cut is there afterwards,
//! byte for byte and verified: full and incremental image ingests, a workspace checkpoint and
//! the revert to it. A transaction that had not committed leaves no ref, and gc takes its torn
//! pack. Needs root.

use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use snapfork_fsfork::testfs::{FsType, TestFs, require_root};
use snapfork_fsfork::workspace;
use snapfork_store::{GcOptions, IngestOptions, OpenOptions, Store};

const PAGE: usize = 4096;

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
    let dir = mount.join("store");
    let store = Store::open(&dir, OpenOptions::default()).expect("open store");
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
    let refs: Vec<(String, String)> =
        store.list_refs("").unwrap().into_iter().map(|(n, id)| (n, id.to_hex())).collect();

    // In flight at the cut: a transaction that wrote pack data and had not committed.
    let before = packs(&dir);
    let mut tx = store.begin().unwrap();
    tx.ingest_image(&inputs.join("c.raw"), &IngestOptions::default()).unwrap();
    // The kernel wrote back what the transaction had written so far (it may, at any time);
    // what it writes next is lost: the pack survives, torn, and no index entry names it.
    let f = std::fs::File::open(&dir).unwrap();
    // SAFETY: syncfs on a descriptor we own; it touches no memory of ours.
    assert_eq!(unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&f)) }, 0);
    tx.ingest_image(&inputs.join("b.raw"), &IngestOptions::default()).unwrap();
    tx.set_ref("c", snapfork_store::Hash::of(b"never committed")).unwrap();
    let in_flight: Vec<PathBuf> = packs(&dir).into_iter().filter(|p| !before.contains(p)).collect();
    let report = serde_json::json!({
        "a": ia.id.to_hex(), "b": ib.id.to_hex(),
        "checkpoint": ck.id.hex(), "refs": refs, "in_flight": in_flight,
    });
    println!("MACHINE {report}");
    use std::io::Write;
    std::io::stdout().flush().unwrap();
    snapfork_fsfork::testfs::power_cut(mount).expect("power cut");
    // SAFETY: ends this process at once, as a power cut would; nothing runs after it.
    unsafe { libc::_exit(0) }
}

/// Not a test of its own (so ignored): the entry point of [`machine`] in the child process.
#[test]
#[ignore = "the child process of the power-cut tests"]
fn power_cut_child() {
    if let (Some(mount), Some(inputs)) = (std::env::var_os("POWER_CUT_MOUNT"), std::env::var_os("POWER_CUT_INPUTS")) {
        machine(Path::new(&mount), Path::new(&inputs));
    }
}

fn power_cut_keeps_every_reported_commit(kind: FsType, test: &str) {
    if !require_root(test) {
        return;
    }
    let fs = TestFs::new(kind, 1024).expect("make test filesystem");
    // Inputs live off the filesystem that loses power.
    let inputs_dir = tempfile::Builder::new().prefix("sf-powercut-").tempdir_in("/var/tmp").unwrap();
    let (a, b_on_a, c) = inputs(inputs_dir.path());
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["power_cut_child", "--exact", "--ignored", "--nocapture", "--test-threads", "1"])
        .env("POWER_CUT_MOUNT", fs.path())
        .env("POWER_CUT_INPUTS", inputs_dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let Some(line) = stdout.lines().find_map(|l| l.split_once("MACHINE ").map(|(_, m)| m)) else {
        panic!("the machine reported nothing: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
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
