//! Power cuts, simulated on loop-mounted XFS and ext4 (`FS_IOC_SHUTDOWN` without a log flush:
//! whatever was not durable is lost; btrfs has no such ioctl). The machine
//! (`power-cut-machine`, see `snapfork_tests::power_cut`) is a process of its own that dies on
//! the spot. Every commit reported before the cut is there afterwards, byte for byte and
//! verified: full and incremental image ingests, a runtime image adopted as a pack, a
//! workspace checkpoint and the revert to it, and a raw sandbox of the engine checkpointed and
//! reverted. A transaction that had not committed leaves no ref, and gc takes its torn pack. A
//! busy machine (ingests, checkpoints and gc at once) loses power at random moments. Needs
//! root.

use std::path::PathBuf;

use rand::{Rng, SeedableRng};
use snapfork_fsfork::testfs::{self, FsType, TestFs, require_root};
use snapfork_fsfork::workspace;
use snapfork_store::{GcOptions, OpenOptions, Store};
use snapfork_tests::power_cut::{busy_file, busy_image, busy_ref, engine_at, image, inputs, version};

/// The machine binary, as Cargo builds it for this package's tests.
fn machine_command() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_power-cut-machine"))
}

/// Longer than any machine here runs (a few seconds): past it, it is killed as hung.
const MACHINE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

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
            machine_command().arg("busy").args([fs.path(), out.path()]).args([r.to_string(), after_ms.to_string()]),
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
        machine_command().arg("store").args([fs.path(), inputs_dir.path()]),
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

/// A power cut right after the engine reported a checkpoint, a second checkpoint and a revert
/// of a raw sandbox (memory, state file, disk, workspace): afterwards the engine opens, the
/// sandbox's head is the snapshot it was reverted to and its files hold that snapshot's bytes,
/// both snapshots are in the history and restore byte for byte, and the store verifies.
async fn engine_power_cut_after_checkpoint_and_revert(kind: FsType, test: &str) {
    if !require_root(test) {
        return;
    }
    let fs = TestFs::new(kind, 512).expect("make test filesystem");
    let stdout = testfs::run_machine(
        machine_command().arg("engine").arg(fs.path()),
        fs.path(),
        std::time::Duration::from_secs(120),
    )
    .unwrap();
    let Some((a, b)) = stdout.lines().find_map(|l| l.split_once("MACHINE ").and_then(|(_, m)| m.split_once(' ')))
    else {
        panic!("the machine reported nothing: {stdout}");
    };
    fs.remount().expect("remount after the power cut");

    let root = fs.path();
    let engine = engine_at(root);
    // The sandbox was reverted to v1: its head and its files say so.
    assert_eq!(engine.show("vm").await.unwrap().id.to_hex(), a, "the head lost the revert");
    for (f, data) in version(1) {
        assert!(std::fs::read(root.join(f)).unwrap() == data, "{f} is not v1's after the power cut");
    }
    assert!(!root.join("ws/new.txt").exists(), "the workspace lost the revert");
    let log = engine.log(None).await.unwrap();
    for id in [a, b] {
        assert!(log.snapshots.iter().any(|s| s.id == id), "snapshot {id} is gone from the history");
    }
    // v2 restores byte for byte.
    let r = engine.restore(b, "vm2").await.unwrap();
    let files = root.join("engine/sandboxes/vm2/files");
    for (f, data) in version(2) {
        let got = match f.split_once('/') {
            Some(("ws", name)) => std::fs::read(r.workspace.as_ref().unwrap().join(name)).unwrap(),
            Some((_, name)) => std::fs::read(files.join(name)).unwrap(),
            None => unreachable!(),
        };
        assert!(got == data, "{f} of v2 differs after the power cut");
    }
    let report = engine.store().verify(None, None).unwrap();
    assert!(report.is_ok(), "damage after the power cut: {:?}", report.damaged);
    engine.rm("vm2").await.unwrap();
    engine.rm("vm").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_power_cut_after_checkpoint_and_revert_xfs() {
    engine_power_cut_after_checkpoint_and_revert(FsType::Xfs, "engine_power_cut_after_checkpoint_and_revert_xfs").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_power_cut_after_checkpoint_and_revert_ext4() {
    engine_power_cut_after_checkpoint_and_revert(FsType::Ext4, "engine_power_cut_after_checkpoint_and_revert_ext4")
        .await;
}
