//! The raw driver: memory, state and disk files of any VMM (no runtime needed; root only for
//! uniformity with CI).

mod common;

use common::*;
use snapfork_engine::{CheckpointOptions, DriverConfig, RawConfig, RunSpec};

fn write(p: &std::path::Path, pages: &[u8]) {
    let mut v = Vec::new();
    for &b in pages {
        v.extend(std::iter::repeat_n(b, 4096));
    }
    std::fs::write(p, v).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_checkpoint_diff_restore_revert() {
    if !require("raw_checkpoint_diff_restore_revert", false) {
        return;
    }
    let (dir, engine) = new_engine();
    let _guard = Guard(engine.clone());
    let vm = dir.path().join("vm");
    std::fs::create_dir_all(&vm).unwrap();
    let (mem, state, disk) = (vm.join("mem"), vm.join("vmstate"), vm.join("disk.img"));
    write(&mem, &[1, 0, 2, 3, 0, 4, 5, 6]);
    std::fs::write(&state, b"cpu registers v1").unwrap();
    write(&disk, &[9, 9, 0, 0]);
    let cfg =
        RawConfig { memory: Some(mem.clone()), state: vec![state.clone()], disks: vec![disk.clone()], page_size: 4096 };
    let ws = dir.path().join("ws");
    std::fs::create_dir_all(&ws).unwrap();
    std::fs::write(ws.join("notes.txt"), "v1").unwrap();
    engine
        .run(RunSpec { name: "vm".into(), driver: DriverConfig::Raw(cfg), workspace: Some(ws.clone()) })
        .await
        .unwrap();
    let a = engine.checkpoint("vm", CheckpointOptions { message: "a".into(), ..Default::default() }).await.unwrap();
    assert_eq!(a.parts.len(), 4, "{:?}", a.parts);

    // Two pages of memory change, the state changes, a file changes.
    write(&mem, &[1, 0, 7, 3, 0, 4, 5, 8]);
    std::fs::write(&state, b"cpu registers v2").unwrap();
    std::fs::write(ws.join("notes.txt"), "v2").unwrap();
    std::fs::write(ws.join("new.txt"), "x").unwrap();
    let b = engine.checkpoint("vm", CheckpointOptions::default()).await.unwrap();
    assert_eq!(b.parent.as_deref(), Some(a.id.as_str()));
    let d = engine.diff(&a.id, &b.id).await.unwrap();
    let memd = d.parts.iter().find(|p| p.name == "mem").unwrap();
    assert_eq!((memd.units_changed, memd.units_total), (2, 8));
    let diskd = d.parts.iter().find(|p| p.name == "disk.img").unwrap();
    assert_eq!(diskd.change, "same");
    let paths: Vec<&str> = d.files.iter().map(|f| f.path.as_str()).collect();
    assert!(paths.contains(&"notes.txt") && paths.contains(&"new.txt"), "{paths:?}");

    // Restore A as a new sandbox: its files are A's.
    let r = engine.restore(&a.id, "vm2").await.unwrap();
    let snap = engine.show("vm2").await.unwrap();
    assert_eq!(snap.id.to_hex(), a.id);
    let files = dir.path().join("engine/sandboxes/vm2/files");
    assert_eq!(std::fs::read(files.join("vmstate")).unwrap(), b"cpu registers v1");
    assert_eq!(
        std::fs::read(files.join("mem")).unwrap(),
        std::fs::read(&mem)
            .map(|_| {
                let mut v = Vec::new();
                for b in [1u8, 0, 2, 3, 0, 4, 5, 6] {
                    v.extend(std::iter::repeat_n(b, 4096));
                }
                v
            })
            .unwrap()
    );
    assert_eq!(std::fs::read_to_string(r.workspace.unwrap().join("notes.txt")).unwrap(), "v1");

    // Revert the original to A: files in place and workspace back.
    engine.revert("vm", &a.id).await.unwrap();
    assert_eq!(std::fs::read(&state).unwrap(), b"cpu registers v1");
    assert_eq!(std::fs::read_to_string(ws.join("notes.txt")).unwrap(), "v1");
    assert!(!ws.join("new.txt").exists());
    let log = engine.log(None).await.unwrap();
    assert_eq!(log.snapshots.len(), 2);
    assert!(log.tree.contains(&a.id[..12]) && log.tree.contains(&b.id[..12]));

    // rm drops the refs of the sandbox; the tag keeps A.
    engine.tag(&a.id, "keep", false).await.unwrap();
    // A tag moves only when told to; naming the same snapshot again is fine.
    engine.tag(&a.id, "keep", false).await.unwrap();
    match engine.tag(&b.id, "keep", false).await {
        Err(snapfork_engine::Error::Exists(what)) => assert!(what.contains(&a.id), "{what}"),
        other => panic!("moving a tag without force gave {other:?}"),
    }
    assert_eq!(engine.tag(&b.id, "keep", true).await.unwrap(), b.id);
    assert_eq!(engine.tag(&a.id, "keep", true).await.unwrap(), a.id);
    engine.rm("vm").await.unwrap();
    engine.rm("vm2").await.unwrap();
    let log = engine.log(None).await.unwrap();
    assert_eq!(log.snapshots.len(), 1);
    assert_eq!(log.snapshots[0].refs, ["tag/keep"]);
}

/// Two forks of one snapshot at once, with the same prefix: each takes free numbers of its own
/// (before, both chose the same names and one failed), and every fork's workspace is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_forks_with_one_prefix_take_different_names() {
    if !require("concurrent_forks_with_one_prefix_take_different_names", false) {
        return;
    }
    let (dir, engine) = new_engine();
    let _guard = Guard(engine.clone());
    let mem = dir.path().join("mem");
    write(&mem, &[1, 2, 0, 3]);
    let ws = dir.path().join("ws");
    std::fs::create_dir_all(&ws).unwrap();
    std::fs::write(ws.join("f"), "x").unwrap();
    let cfg = RawConfig { memory: Some(mem), state: vec![], disks: vec![], page_size: 4096 };
    engine.run(RunSpec { name: "vm".into(), driver: DriverConfig::Raw(cfg), workspace: Some(ws) }).await.unwrap();
    let snap = engine.checkpoint("vm", CheckpointOptions::default()).await.unwrap().id;
    let (e1, e2) = (engine.clone(), engine.clone());
    let (s1, s2) = (snap.clone(), snap.clone());
    let (a, b) = tokio::join!(
        tokio::spawn(async move { e1.fork(&s1, 3, Some("f")).await }),
        tokio::spawn(async move { e2.fork(&s2, 3, Some("f")).await })
    );
    let mut names: Vec<String> = a.unwrap().unwrap().into_iter().chain(b.unwrap().unwrap()).map(|i| i.name).collect();
    names.sort();
    let want: Vec<String> = (1..=6).map(|k| format!("f-{k}")).collect();
    assert_eq!(names, want);
    let infos = engine.ls().await.unwrap();
    for n in &want {
        let i = infos.iter().find(|i| &i.name == n).unwrap_or_else(|| panic!("{n} missing"));
        assert_eq!(std::fs::read_to_string(i.workspace.as_ref().unwrap().join("f")).unwrap(), "x");
    }
}

/// Removing a fork removes what the store kept about its workspace: its record, its stat
/// cache and its place in the checkpoint's list of offspring. Forks made and removed leave the
/// store's workspace metadata as it was (before, each left its records for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn removed_forks_leave_no_workspace_records_behind() {
    if !require("removed_forks_leave_no_workspace_records_behind", false) {
        return;
    }
    let (dir, engine) = new_engine();
    let _guard = Guard(engine.clone());
    let mem = dir.path().join("mem");
    write(&mem, &[1, 2, 0, 3]);
    let ws = dir.path().join("ws");
    std::fs::create_dir_all(ws.join("sub")).unwrap();
    std::fs::write(ws.join("sub/f"), "x").unwrap();
    let cfg = RawConfig { memory: Some(mem), state: vec![], disks: vec![], page_size: 4096 };
    engine.run(RunSpec { name: "vm".into(), driver: DriverConfig::Raw(cfg), workspace: Some(ws) }).await.unwrap();
    let snap = engine.checkpoint("vm", CheckpointOptions::default()).await.unwrap().id;
    let keys = || -> Vec<String> { engine.store().meta_list("fsfork/").unwrap().into_iter().map(|(k, _)| k).collect() };
    let before = keys();
    let forks = engine.fork(&snap, 3, Some("f")).await.unwrap();
    // A fork's checkpoint adds a stat cache of its own; the one left is removed with it.
    engine.checkpoint("f-1", CheckpointOptions::default()).await.unwrap();
    let offspring = keys().into_iter().filter(|k| k.starts_with("fsfork/offspring/")).count();
    assert!(offspring > before.iter().filter(|k| k.starts_with("fsfork/offspring/")).count());
    assert!(keys().len() >= before.len() + 3 * 2, "{:?}", keys());
    for f in &forks[..2] {
        engine.rm(&f.name).await.unwrap();
    }
    // The one left is still listed as an offspring of the checkpoint it was made from.
    let lists: Vec<String> = engine
        .store()
        .meta_list("fsfork/offspring/")
        .unwrap()
        .into_iter()
        .map(|(_, v)| String::from_utf8_lossy(&v).into_owned())
        .collect();
    let kept = forks[2].workspace.as_ref().unwrap().canonicalize().unwrap();
    assert!(lists.iter().any(|l| l.contains(kept.to_str().unwrap())), "{lists:?}");
    assert!(!lists.iter().any(|l| l.contains("f-1") || l.contains("f-2")), "{lists:?}");
    engine.rm(&forks[2].name).await.unwrap();
    assert_eq!(keys(), before);
}

/// A revert that fails on its last file (the disk's directory is gone) changes nothing: the
/// memory image written before it, the workspace and the sandbox's head are all as they were;
/// once the directory is back, the same revert puts every file back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_revert_is_all_or_nothing() {
    if !require("raw_revert_is_all_or_nothing", false) {
        return;
    }
    let (dir, engine) = new_engine();
    let _guard = Guard(engine.clone());
    let (vm, disks) = (dir.path().join("vm"), dir.path().join("disks"));
    std::fs::create_dir_all(&vm).unwrap();
    std::fs::create_dir_all(&disks).unwrap();
    let (mem, state, disk) = (vm.join("mem"), vm.join("vmstate"), disks.join("disk.img"));
    write(&mem, &[1, 2, 3, 4]);
    std::fs::write(&state, b"state v1").unwrap();
    write(&disk, &[5, 0, 6]);
    let cfg =
        RawConfig { memory: Some(mem.clone()), state: vec![state.clone()], disks: vec![disk.clone()], page_size: 4096 };
    let ws = dir.path().join("ws");
    std::fs::create_dir_all(&ws).unwrap();
    std::fs::write(ws.join("notes.txt"), "v1").unwrap();
    engine
        .run(RunSpec { name: "vm".into(), driver: DriverConfig::Raw(cfg), workspace: Some(ws.clone()) })
        .await
        .unwrap();
    let a = engine.checkpoint("vm", CheckpointOptions::default()).await.unwrap();
    write(&mem, &[1, 9, 3, 9]);
    std::fs::write(&state, b"state v2").unwrap();
    std::fs::write(ws.join("notes.txt"), "v2").unwrap();
    let b = engine.checkpoint("vm", CheckpointOptions::default()).await.unwrap();
    let (mem_b, disk_b) = (std::fs::read(&mem).unwrap(), std::fs::read(&disk).unwrap());

    std::fs::remove_dir_all(&disks).unwrap();
    let err = engine.revert("vm", &a.id).await.expect_err("a revert onto a missing directory succeeded");
    assert!(err.to_string().contains("disk.img"), "{err}");
    assert_eq!(std::fs::read(&mem).unwrap(), mem_b, "memory was reverted although the revert failed");
    assert_eq!(std::fs::read(&state).unwrap(), b"state v2");
    assert_eq!(std::fs::read_to_string(ws.join("notes.txt")).unwrap(), "v2");
    assert_eq!(engine.show("vm").await.unwrap().id.to_hex(), b.id);
    let leftovers: Vec<_> = std::fs::read_dir(&vm).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), 2, "staged files left behind: {leftovers:?}");

    std::fs::create_dir_all(&disks).unwrap();
    engine.revert("vm", &a.id).await.unwrap();
    let mut want = Vec::new();
    for p in [1u8, 2, 3, 4] {
        want.extend(std::iter::repeat_n(p, 4096));
    }
    assert_eq!(std::fs::read(&mem).unwrap(), want);
    assert_eq!(std::fs::read(&state).unwrap(), b"state v1");
    assert_eq!(std::fs::read(&disk).unwrap().len(), 3 * 4096);
    assert_ne!(std::fs::read(&disk).unwrap(), disk_b.iter().map(|_| 0u8).collect::<Vec<_>>());
    assert_eq!(std::fs::read_to_string(ws.join("notes.txt")).unwrap(), "v1");
    assert_eq!(engine.show("vm").await.unwrap().id.to_hex(), a.id);
}

/// A workspace is one sandbox's: a second sandbox given the same directory, one inside it or
/// one around it, or the store's or the engine's own directories, is refused (a revert of
/// either would rewrite the other's files). Once the first is removed, the directory is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workspace_belongs_to_one_sandbox() {
    if !require("a_workspace_belongs_to_one_sandbox", false) {
        return;
    }
    let (dir, engine) = new_engine();
    let _guard = Guard(engine.clone());
    let mem = dir.path().join("mem");
    write(&mem, &[1, 2]);
    let spec = |name: &str, ws: &std::path::Path| RunSpec {
        name: name.into(),
        driver: DriverConfig::Raw(RawConfig {
            memory: Some(mem.clone()),
            state: vec![],
            disks: vec![],
            page_size: 4096,
        }),
        workspace: Some(ws.to_path_buf()),
    };
    let ws = dir.path().join("work");
    std::fs::create_dir_all(ws.join("sub")).unwrap();
    std::fs::write(ws.join("sub/f"), "a's").unwrap();
    engine.run(spec("a", &ws)).await.unwrap();
    // Through a symlink too: the check compares real paths.
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&ws, &link).unwrap();
    for (what, other) in
        [("same", ws.clone()), ("link", link.clone()), ("inside", ws.join("sub")), ("around", dir.path().to_path_buf())]
    {
        let e = engine.run(spec("b", &other)).await.expect_err(what);
        assert!(matches!(e, snapfork_engine::Error::Exists(_) | snapfork_engine::Error::Invalid(_)), "{what}: {e}");
        assert!(e.to_string().contains("overlaps"), "{what}: {e}");
        assert!(engine.ls().await.unwrap().iter().all(|s| s.name != "b"), "{what}: no sandbox b is recorded");
    }
    for own in [dir.path().join("store"), dir.path().join("engine").join("workspaces")] {
        let e = engine.run(spec("b", &own)).await.expect_err("the engine's own directory");
        assert!(matches!(e, snapfork_engine::Error::Invalid(_)), "{}: {e}", own.display());
    }
    // A's files are untouched, and the directory is free again once a is removed.
    assert_eq!(std::fs::read_to_string(ws.join("sub/f")).unwrap(), "a's");
    engine.rm("a").await.unwrap();
    engine.run(spec("b", &ws)).await.unwrap();
    assert_eq!(std::fs::read_to_string(ws.join("sub/f")).unwrap(), "a's");
}
