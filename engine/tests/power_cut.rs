//! A power cut right after the engine reported a checkpoint, a second checkpoint and a revert of
//! a raw sandbox (memory, state file, disk, workspace) on loop-mounted XFS and ext4
//! (`testfs::power_cut`: `FS_IOC_SHUTDOWN` without a log flush). The machine is a child process
//! that dies with its filesystem. Afterwards the engine opens, the sandbox's head is the
//! snapshot it was reverted to and its files hold that snapshot's bytes, both snapshots are in
//! the history and restore byte for byte, and the store verifies. Needs root.

mod common;

use std::path::Path;

use common::require;
use snapfork_engine::{CheckpointOptions, DriverConfig, Engine, EngineOptions, RawConfig, RunSpec};
use snapfork_fsfork::testfs::{self, FsType, TestFs};
use snapfork_store::{OpenOptions, Store};

const PAGE: usize = 4096;

fn engine_at(root: &Path) -> Engine {
    let store = Store::open(root.join("store"), OpenOptions::default()).expect("open store");
    let opts = EngineOptions { state_dir: root.join("engine"), ..EngineOptions::for_store(&store) };
    Engine::open(store, opts).expect("open engine")
}

/// The sandbox's files in version `v` (1 or 2): memory, state, disk, a workspace file.
fn version(v: u8) -> [(&'static str, Vec<u8>); 4] {
    let mut mem = vec![0u8; 64 * PAGE];
    for (i, page) in mem.chunks_mut(PAGE).enumerate() {
        if i % 3 != 0 {
            page.fill((i as u8).wrapping_mul(v).wrapping_add(v));
        }
    }
    let disk: Vec<u8> = (0..16 * PAGE).map(|i| (i / PAGE) as u8 ^ if i < PAGE { v } else { 0 }).collect();
    [
        ("vm/mem", mem),
        ("vm/vmstate", format!("cpu registers v{v}").into_bytes()),
        ("vm/disk.img", disk),
        ("ws/notes.txt", format!("notes v{v}\n").into_bytes()),
    ]
}

fn write_version(root: &Path, v: u8) {
    for (f, data) in version(v) {
        std::fs::write(root.join(f), data).unwrap();
    }
}

/// The machine: run, checkpoint (v1), change everything, checkpoint (v2), revert to v1; report
/// the snapshots, cut the power and die on the spot.
async fn machine(root: &Path) -> ! {
    testfs::machine_panics_are_failures();
    std::fs::create_dir_all(root.join("vm")).unwrap();
    std::fs::create_dir_all(root.join("ws")).unwrap();
    write_version(root, 1);
    let engine = engine_at(root);
    let cfg = RawConfig {
        memory: Some(root.join("vm/mem")),
        state: vec![root.join("vm/vmstate")],
        disks: vec![root.join("vm/disk.img")],
        page_size: PAGE as u32,
    };
    let spec = RunSpec { name: "vm".into(), driver: DriverConfig::Raw(cfg), workspace: Some(root.join("ws")) };
    engine.run(spec).await.unwrap();
    let a = engine.checkpoint("vm", CheckpointOptions { message: "v1".into(), ..Default::default() }).await.unwrap();
    write_version(root, 2);
    std::fs::write(root.join("ws/new.txt"), "after v1").unwrap();
    let b = engine.checkpoint("vm", CheckpointOptions { message: "v2".into(), ..Default::default() }).await.unwrap();
    engine.revert("vm", &a.id).await.unwrap();
    println!("MACHINE {} {}", a.id, b.id);
    testfs::power_cut_and_exit(root)
}

/// Not a test of its own (so ignored): the entry point of [`machine`] in the child process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the child process of the power-cut tests"]
async fn engine_power_cut_child() {
    if let Some(root) = std::env::var_os("POWER_CUT_MOUNT") {
        machine(Path::new(&root)).await;
    }
}

async fn engine_power_cut_after_checkpoint_and_revert(kind: FsType, test: &str) {
    if !require(test, false) {
        return;
    }
    let fs = TestFs::new(kind, 512).expect("make test filesystem");
    let stdout = testfs::run_machine(
        std::process::Command::new(std::env::current_exe().unwrap())
            .args(["engine_power_cut_child", "--exact", "--ignored", "--nocapture", "--test-threads", "1"])
            .env("POWER_CUT_MOUNT", fs.path()),
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
