//! End to end on real gVisor sandboxes (root and runsc required; CI has both).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use snapfork_engine::{CheckpointOptions, DriverConfig, Status};

fn consecutive_from_one(v: &[i64]) -> bool {
    v.first() == Some(&1) && v.windows(2).all(|w| w[1] == w[0] + 1)
}

/// Counter in memory + file in the workspace; checkpoint; fork 3 that continue independently
/// from the checkpointed counter and file; revert the original: counter and file both back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gvisor_checkpoint_fork3_revert() {
    if !require("gvisor_checkpoint_fork3_revert", true) {
        return;
    }
    let (dir, engine) = new_engine();
    let _guard = Guard(engine.clone());
    let rootfs = rootfs(dir.path());
    let info = engine.run(counter_spec("orig", &rootfs)).await.unwrap();
    assert_eq!(info.status, Status::Running);
    let log = info.workspace.clone().unwrap().join("counter.log");
    wait_lines(&log, 5).await;

    let ck = engine
        .checkpoint("orig", CheckpointOptions { message: "five".into(), leave_running: true, ..Default::default() })
        .await
        .unwrap();
    assert_eq!(ck.status, Status::Running);
    assert_eq!(ck.parts.len(), 2, "{:?}", ck.parts);
    // The original keeps running after the checkpoint.
    let n_at_ck = lines(&log).len();
    let later = wait_lines(&log, n_at_ck + 5).await;
    assert!(consecutive_from_one(&later), "original after checkpoint: {later:?}");

    let forks = engine.fork(&ck.id, 3, Some("f")).await.unwrap();
    let names: Vec<&str> = forks.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["f-1", "f-2", "f-3"]);
    // Each fork continues with its own step: memory diverges, files are separate.
    for (k, f) in forks.iter().enumerate() {
        let step = 10i64.pow(k as u32 + 1);
        let r = engine
            .exec(&f.name, vec!["/bin/sh".into(), "-c".into(), format!("echo {step} > /workspace/step; kill -USR2 1")])
            .await
            .unwrap();
        assert_eq!(r.exit_code, 0, "{}", r.stderr);
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    // The checkpointed file, read back from the snapshot: 1..=N.
    let snap = engine.show(&ck.id).await.unwrap();
    let part = snap.part(snapfork_engine::model::Role::Workspace).unwrap().clone();
    let ckdir = dir.path().join("ck-workspace");
    snapfork_engine::workspace::materialize(engine.store(), &part, &ckdir).unwrap();
    let at_ck = lines(&ckdir.join("counter.log"));
    let n = at_ck.len();
    assert!(consecutive_from_one(&at_ck) && n >= 5 && n <= n_at_ck + 1, "checkpointed: {at_ck:?}");
    for (k, f) in forks.iter().enumerate() {
        let step = 10i64.pow(k as u32 + 1);
        let l = wait_lines(&f.workspace.clone().unwrap().join("counter.log"), n + 3).await;
        // Its file starts as the checkpointed file, and its counter continues from the
        // checkpointed memory (N+1, or N+step if the signal beat the first tick).
        assert_eq!(&l[..n], &at_ck[..], "fork {k}: {l:?}");
        assert!(l[n] == n as i64 + 1 || l[n] == n as i64 + step, "fork {k}: {l:?}");
        // Then each goes its own way.
        let tail = &l[l.len() - 2..];
        assert_eq!(tail[1] - tail[0], step, "fork {k} continues with its own step: {l:?}");
    }

    // Wreck the original, then revert it.
    let r = engine
        .exec("orig", vec!["/bin/sh".into(), "-c".into(), "rm -rf /workspace/*; kill -USR1 1".into()])
        .await
        .unwrap();
    assert_eq!(r.exit_code, 0, "{}", r.stderr);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let wrecked = lines(&log);
    // The file was deleted and the counter corrupted (at most one line raced the signal).
    assert!(
        wrecked.iter().filter(|&&x| x > 0).count() <= 1 && wrecked.last().is_none_or(|&x| x < 0),
        "wrecked: {wrecked:?}"
    );
    let rv = engine.revert("orig", &ck.id).await.unwrap();
    assert_eq!(rv.status, Status::Running);
    let back = wait_lines(&log, n + 5).await;
    // Files back (1..=N) and the counter continues N+1.. from memory: one consecutive run.
    assert!(consecutive_from_one(&back), "after revert: {back:?}");

    // The tree: orig's snapshot with the forks' heads pointing at it.
    let tree = engine.log(None).await.unwrap();
    assert_eq!(tree.snapshots.len(), 1);
    let refs = &tree.snapshots[0].refs;
    for r in ["sandbox/orig", "sandbox/f-1", "sandbox/f-2", "sandbox/f-3"] {
        assert!(refs.iter().any(|x| x == r), "{refs:?}");
    }
    // A second checkpoint of a fork is a child of the first.
    let ck2 = engine.checkpoint("f-1", CheckpointOptions { leave_running: false, ..Default::default() }).await.unwrap();
    assert_eq!(ck2.parent.as_deref(), Some(ck.id.as_str()));
    assert_eq!(ck2.status, Status::Stopped);
    let d = engine.diff(&ck.id, &ck2.id).await.unwrap();
    assert!(d.files.iter().any(|f| f.path.contains("counter.log")), "{:?}", d.files);
    cleanup(&engine).await;
}

/// Checkpoints of different sandboxes run in parallel; a sandbox whose runtime died cannot be
/// checkpointed and leaves no snapshot behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gvisor_parallel_checkpoints_and_dead_runtime() {
    if !require("gvisor_parallel_checkpoints_and_dead_runtime", true) {
        return;
    }
    let (dir, engine) = new_engine();
    let _guard = Guard(engine.clone());
    let rootfs = rootfs(dir.path());
    let mut logs = Vec::new();
    for k in 0..3 {
        let i = engine.run(counter_spec(&format!("p{k}"), &rootfs)).await.unwrap();
        logs.push(i.workspace.unwrap().join("counter.log"));
    }
    for l in &logs {
        wait_lines(l, 3).await;
    }
    let mut tasks = Vec::new();
    for k in 0..3 {
        let e = engine.clone();
        tasks.push(tokio::spawn(async move {
            e.checkpoint(&format!("p{k}"), CheckpointOptions { leave_running: true, ..Default::default() }).await
        }));
    }
    // An agent polling `ls` meanwhile (runsc stops each sandbox for its checkpoint) must not
    // write a stale record over the one a checkpoint saves.
    let done = Arc::new(AtomicBool::new(false));
    let poller = {
        let (e, done) = (engine.clone(), done.clone());
        tokio::spawn(async move {
            let mut polls = 0;
            while !done.load(Ordering::SeqCst) {
                e.ls().await.unwrap();
                polls += 1;
            }
            polls
        })
    };
    let mut heads = Vec::new();
    for t in tasks {
        heads.push(t.await.unwrap().unwrap().id);
    }
    done.store(true, Ordering::SeqCst);
    assert!(poller.await.unwrap() > 0);
    for (k, head) in heads.iter().enumerate() {
        let info = engine.ls().await.unwrap().into_iter().find(|s| s.name == format!("p{k}")).unwrap();
        assert_eq!(info.head.as_ref(), Some(head), "p{k}'s record names its checkpoint");
        assert_eq!(info.status, Status::Running, "p{k} keeps running");
    }
    assert_eq!(engine.log(None).await.unwrap().snapshots.len(), 3);

    // Kill p0's runtime behind the engine's back: checkpoint fails, nothing is added.
    let rid = engine.ls().await.unwrap().into_iter().find(|s| s.name == "p0").unwrap().runtime_id.unwrap();
    engine.runsc().kill(&rid).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = engine.store().list_refs("").unwrap();
    assert!(engine.checkpoint("p0", CheckpointOptions::default()).await.is_err());
    assert_eq!(engine.store().list_refs("").unwrap(), before);
    cleanup(&engine).await;
}

/// Export, import into a fresh store, restore from it; a tampered bundle is refused and leaves
/// nothing; gc with live sandboxes removes nothing they need.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gvisor_export_import_restore_and_gc() {
    if !require("gvisor_export_import_restore_and_gc", true) {
        return;
    }
    let (dir, engine) = new_engine();
    let _guard = Guard(engine.clone());
    let rootfs = rootfs(dir.path());
    // A host directory shown read-only at /etc: part of the configuration a bundle carries.
    let shared = dir.path().join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    std::fs::write(shared.join("motd"), "from the host\n").unwrap();
    let mut spec = counter_spec("src", &rootfs);
    let DriverConfig::Gvisor(cfg) = &mut spec.driver else { unreachable!() };
    cfg.ro_mounts.push((shared.clone(), "/etc".into()));
    let info = engine.run(spec).await.unwrap();
    let log = info.workspace.unwrap().join("counter.log");
    wait_lines(&log, 4).await;
    let ck = engine.checkpoint("src", CheckpointOptions { leave_running: true, ..Default::default() }).await.unwrap();

    // gc with the live sandbox: everything its head needs stays.
    let store = engine.store().clone();
    tokio::task::spawn_blocking(move || {
        store.gc(&snapfork_store::GcOptions { grace: Duration::ZERO, ..Default::default() })
    })
    .await
    .unwrap()
    .unwrap();

    // The cached image and the store's copy are one file: the store adopted runsc's image as a
    // pack (two names, no second copy on disk).
    use std::os::unix::fs::MetadataExt;
    let cache = dir.path().join("engine/cache");
    let entry = std::fs::read_dir(&cache).unwrap().next().unwrap().unwrap().path();
    let ino = std::fs::metadata(entry.join("checkpoint.img")).unwrap().ino();
    let pack = std::fs::read_dir(dir.path().join("store/packs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| std::fs::metadata(p).unwrap().ino() == ino)
        .expect("runsc's image is one of the store's packs");
    // Without the cached image (evicted), a restore reads the store's copy.
    std::fs::remove_dir_all(&cache).unwrap();
    let r = engine.restore(&ck.id, "from-store").await.unwrap();
    let l = wait_lines(&r.workspace.unwrap().join("counter.log"), 8).await;
    assert!(l.first() == Some(&1) && l.windows(2).all(|w| w[1] == w[0] + 1), "{l:?}");

    let bundle = dir.path().join("snap.sfb");
    let ex = engine.export(&ck.id, &bundle).await.unwrap();
    assert!(ex.bytes > 0 && ex.nodes > 0);
    // Imported back into the store it came from, it stays this store's own snapshot.
    engine.import(&bundle).await.unwrap();
    engine.restore(&ck.id, "reimported").await.unwrap();
    engine.rm("reimported").await.unwrap();

    let (dir2, engine2) = new_engine();
    let _guard2 = Guard(engine2.clone());
    // Tampered: flip one byte in the middle.
    let mut bytes = std::fs::read(&bundle).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    let bad = dir2.path().join("bad.sfb");
    std::fs::write(&bad, &bytes).unwrap();
    let before = engine2.store().stats("").unwrap().total;
    assert!(engine2.import(&bad).await.is_err());
    // Truncated.
    std::fs::write(&bad, &std::fs::read(&bundle).unwrap()[..mid]).unwrap();
    assert!(engine2.import(&bad).await.is_err());
    let after = engine2.store().stats("").unwrap().total;
    assert_eq!(before.chunks, after.chunks);
    assert_eq!(before.file_objects, after.file_objects);
    assert!(engine2.store().list_refs("").unwrap().is_empty());

    // An imported snapshot restores only where its host directories are vouched for: its
    // rootfs and its read-only mount, each named when refused, and a refusal leaves nothing.
    let im = engine2.import(&bundle).await.unwrap();
    assert_eq!(im.id, ck.id);
    let err = engine2.restore(&ck.id, "copy").await.unwrap_err().to_string();
    assert!(err.contains("came by import") && err.contains(&rootfs.display().to_string()), "{err}");
    assert!(engine2.ls().await.unwrap().is_empty());
    assert_eq!(std::fs::read_dir(dir2.path().join("engine/workspaces")).unwrap().count(), 0);
    let (_dir3, engine3) = new_engine_trusting(std::slice::from_ref(&rootfs));
    engine3.import(&bundle).await.unwrap();
    let err = engine3.restore(&ck.id, "copy").await.unwrap_err().to_string();
    assert!(err.contains(&shared.display().to_string()), "{err}");
    let (_dir4, engine4) = new_engine_trusting(&[rootfs.clone(), shared.clone()]);
    let _guard4 = Guard(engine4.clone());
    engine4.import(&bundle).await.unwrap();
    let r = engine4.restore(&ck.id, "copy").await.unwrap();
    let l = wait_lines(&r.workspace.unwrap().join("counter.log"), 8).await;
    assert!(l.first() == Some(&1) && l.windows(2).all(|w| w[1] == w[0] + 1), "{l:?}");
    cleanup(&engine4).await;

    // A damaged byte in the adopted image is caught, named, and never restored from.
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&pack).unwrap();
    let at = file.metadata().unwrap().len() / 3;
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, at).unwrap();
    file.write_all_at(&[byte[0] ^ 0xFF], at).unwrap();
    let err = engine.restore(&ck.id, "damaged").await.unwrap_err().to_string();
    assert!(err.contains("blob") && err.contains("chunk"), "{err}");
    // verify names it once per ref that reaches it: one damaged chunk.
    let report = engine.store().verify(None, None).unwrap();
    assert!(!report.damaged.is_empty() && report.damaged.iter().all(|d| d.id == report.damaged[0].id), "{report:?}");
    cleanup(&engine).await;
    drop(dir2);
}

/// A checkpoint that runs out of disk space leaves no snapshot and nothing half written, and the
/// sandbox runs on as it was; once there is room again, checkpoints work.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gvisor_checkpoint_on_a_full_disk_leaves_nothing_and_the_sandbox_running() {
    if !require("gvisor_checkpoint_on_a_full_disk_leaves_nothing_and_the_sandbox_running", true) {
        return;
    }
    let outer = tempfile::Builder::new().prefix("sf-engine-full-").tempdir_in("/var/tmp").unwrap();
    // The store and the engine's state on a small filesystem of their own.
    let fs = snapfork_fsfork::testfs::TestFs::new(snapfork_fsfork::testfs::FsType::Ext4, 160).unwrap();
    let small = fs.path().to_path_buf();
    // The store's default reserve (64 MiB) is most of this filesystem.
    let store_opts = snapfork_store::OpenOptions { min_free_bytes: 4 << 20, ..Default::default() };
    let store = snapfork_store::Store::open(small.join("store"), store_opts).unwrap();
    let opts = snapfork_engine::EngineOptions {
        state_dir: small.join("engine"),
        ..snapfork_engine::EngineOptions::for_store(&store)
    };
    let engine = snapfork_engine::Engine::open(store, opts).unwrap();
    let _guard = Guard(engine.clone());
    let rootfs = rootfs(outer.path());
    let log = engine.run(counter_spec("full", &rootfs)).await.unwrap().workspace.unwrap().join("counter.log");
    wait_lines(&log, 3).await;
    let a = engine.checkpoint("full", CheckpointOptions { leave_running: true, ..Default::default() }).await.unwrap();

    // Fill the filesystem, leaving room for the counter's log but not for a checkpoint.
    let vfs = nix::sys::statvfs::statvfs(&small).unwrap();
    let free = vfs.blocks_available() * vfs.fragment_size();
    let filler = small.join("filler");
    std::fs::write(&filler, vec![1u8; (free - (64 << 10)) as usize]).unwrap();
    let refs = engine.store().list_refs("").unwrap();
    let err = engine.checkpoint("full", CheckpointOptions::default()).await.unwrap_err();
    eprintln!("checkpoint on a full disk: {err}");
    assert_eq!(engine.store().list_refs("").unwrap(), refs, "a failed checkpoint left refs behind");
    let me = engine.ls().await.unwrap().into_iter().find(|s| s.name == "full").unwrap();
    assert_eq!(me.status, Status::Running, "{me:?}");
    assert_eq!(me.head.as_deref(), Some(a.id.as_str()));
    let n = lines(&log).len();
    let after = wait_lines(&log, n + 3).await;
    assert!(consecutive_from_one(&after), "the counter restarted or skipped: {after:?}");
    assert!(engine.store().verify(None, None).unwrap().is_ok());

    // With room again, the next checkpoint works and follows the last one.
    std::fs::remove_file(&filler).unwrap();
    let b = engine.checkpoint("full", CheckpointOptions { leave_running: true, ..Default::default() }).await.unwrap();
    assert_eq!(b.parent.as_deref(), Some(a.id.as_str()));
    cleanup(&engine).await;
}

/// The runtime dies while runsc writes the checkpoint: the checkpoint fails, leaves no snapshot,
/// no image and nothing in the store, the sandbox is reported exited, and its last snapshot still
/// restores.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gvisor_runtime_killed_during_checkpoint_leaves_no_snapshot() {
    if !require("gvisor_runtime_killed_during_checkpoint_leaves_no_snapshot", true) {
        return;
    }
    let (dir, engine) = new_engine();
    let _guard = Guard(engine.clone());
    let rootfs = rootfs(dir.path());
    // 60 MB in the sandbox's memory (its /dev/shm): its checkpoint takes long enough to be cut short.
    let mut spec = counter_spec("big", &rootfs);
    if let snapfork_engine::DriverConfig::Gvisor(cfg) = &mut spec.driver {
        cfg.args[2] = format!("head -c 60000000 /dev/urandom > /dev/shm/blob; {COUNTER}");
    }
    let log = engine.run(spec).await.unwrap().workspace.unwrap().join("counter.log");
    wait_lines(&log, 3).await;
    let a = engine.checkpoint("big", CheckpointOptions { leave_running: true, ..Default::default() }).await.unwrap();
    let rid = engine.ls().await.unwrap().into_iter().find(|s| s.name == "big").unwrap().runtime_id.unwrap();
    let pid = engine.runsc().state(&rid).unwrap().unwrap().pid as i32;
    let refs = engine.store().list_refs("").unwrap();
    let e = engine.clone();
    let ck = tokio::spawn(async move { e.checkpoint("big", CheckpointOptions::default()).await });
    // Into runsc's checkpoint (its image half written, not a fixed time that a loaded machine
    // can make too early or too late), then the sandbox dies.
    let tmp = dir.path().join("engine/tmp");
    let written = || -> u64 {
        let dirs = std::fs::read_dir(&tmp).into_iter().flatten().flatten();
        dirs.filter_map(|d| std::fs::metadata(d.path().join("checkpoint.img")).ok()).map(|m| m.len()).sum()
    };
    let t = std::time::Instant::now();
    while written() < 8 << 20 {
        assert!(t.elapsed() < Duration::from_secs(60), "runsc never wrote its image");
        assert!(!ck.is_finished(), "the checkpoint ended before its image was half written");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    let err = ck.await.unwrap().unwrap_err();
    eprintln!("checkpoint with its runtime killed: {err}");
    assert_eq!(engine.store().list_refs("").unwrap(), refs, "a failed checkpoint left refs behind");
    let me = engine.ls().await.unwrap().into_iter().find(|s| s.name == "big").unwrap();
    assert_eq!((me.status, me.head.as_deref()), (Status::Exited, Some(a.id.as_str())), "{me:?}");
    assert!(engine.store().verify(None, None).unwrap().is_ok());
    let tmp: Vec<_> = std::fs::read_dir(dir.path().join("engine/tmp")).unwrap().collect();
    assert!(tmp.is_empty(), "left in the engine's tmp: {tmp:?}");
    // The last snapshot restores, with its counter.
    let r = engine.restore(&a.id, "big-again").await.unwrap();
    let back = wait_lines(&r.workspace.unwrap().join("counter.log"), 3).await;
    assert!(back.len() >= 3);
    cleanup(&engine).await;
}

/// Operations on different sandboxes run in parallel; two on one sandbox run in turn. While the
/// checkpoint of `stuck` hangs in its runtime (its sandbox process stopped with SIGSTOP), a
/// checkpoint of `free` completes, and a `stop` of `stuck` waits for the checkpoint before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gvisor_a_stuck_sandbox_holds_up_only_its_own_operations() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    if !require("gvisor_a_stuck_sandbox_holds_up_only_its_own_operations", true) {
        return;
    }
    let (dir, engine) = new_engine();
    let _guard = Guard(engine.clone());
    let rootfs = rootfs(dir.path());
    for name in ["stuck", "free"] {
        let log = engine.run(counter_spec(name, &rootfs)).await.unwrap().workspace.unwrap().join("counter.log");
        wait_lines(&log, 3).await;
    }
    let rid = engine.ls().await.unwrap().into_iter().find(|s| s.name == "stuck").unwrap().runtime_id.unwrap();
    let pid = Pid::from_raw(engine.runsc().state(&rid).unwrap().unwrap().pid as i32);
    kill(pid, Signal::SIGSTOP).unwrap();
    // Whatever happens below, the sandbox process must not stay stopped.
    struct Cont(Pid);
    impl Drop for Cont {
        fn drop(&mut self) {
            let _ = kill(self.0, Signal::SIGCONT);
        }
    }
    let cont = Cont(pid);
    // kill() returns before the stop takes effect (a thread of the sandbox must run to stop the
    // others): wait until every thread is stopped, so that the checkpoint really meets a
    // stopped sandbox.
    let stopped = || {
        std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten().all(|t| {
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            // The state follows the command name, which is in parentheses.
            stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('T'))
        })
    };
    let t = std::time::Instant::now();
    while !stopped() {
        assert!(t.elapsed() < Duration::from_secs(10), "the sandbox process never stopped");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let e = engine.clone();
    let stuck_ck = tokio::spawn(async move {
        e.checkpoint("stuck", CheckpointOptions { leave_running: true, ..Default::default() }).await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!stuck_ck.is_finished(), "runsc checkpoint of a stopped sandbox returned: {:?}", stuck_ck.await);
    let e = engine.clone();
    let stuck_stop = tokio::spawn(async move { e.stop("stuck").await });

    let free = tokio::time::timeout(
        Duration::from_secs(60),
        engine.checkpoint("free", CheckpointOptions { leave_running: true, ..Default::default() }),
    )
    .await
    .expect("a checkpoint of another sandbox waited for the stuck one")
    .unwrap();
    assert_eq!(free.status, Status::Running);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!stuck_ck.is_finished(), "the stuck checkpoint returned before its sandbox went on");
    assert!(!stuck_stop.is_finished(), "stop ran beside a checkpoint of the same sandbox: {:?}", stuck_stop.await);

    drop(cont);
    let ck = stuck_ck.await.unwrap().unwrap();
    let stopped = stuck_stop.await.unwrap().unwrap();
    assert_eq!(stopped.status, Status::Stopped);
    assert_eq!(stopped.head.as_deref(), Some(ck.id.as_str()), "the stop came after the checkpoint");
    cleanup(&engine).await;
}

/// A sandbox paused with `runsc pause`: a checkpoint that would leave it running is refused
/// (this runsc cannot pause the sandbox such a checkpoint restores: it would run) and leaves it
/// paused, with no snapshot; a plain checkpoint stores it and restores; once a paused sandbox's
/// process dies it is reported exited (this runsc goes on saying `paused`), and `stop` and
/// `rm` work (this runsc's `delete` of a paused container panics).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gvisor_paused_sandbox_checkpoints_and_is_seen_to_die() {
    if !require("gvisor_paused_sandbox_checkpoints_and_is_seen_to_die", true) {
        return;
    }
    let (dir, engine) = new_engine();
    let _guard = Guard(engine.clone());
    let rootfs = rootfs(dir.path());
    let mut logs = vec![];
    for name in ["p", "q"] {
        let info = engine.run(counter_spec(name, &rootfs)).await.unwrap();
        let log = info.workspace.clone().unwrap().join("counter.log");
        wait_lines(&log, 3).await;
        engine.runsc().pause(info.runtime_id.as_deref().unwrap()).unwrap();
        logs.push((log.clone(), lines(&log).len()));
    }
    let err = engine
        .checkpoint("p", CheckpointOptions { leave_running: true, ..Default::default() })
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("paused") && err.contains("resume it first"), "{err}");
    let ck = engine.checkpoint("q", CheckpointOptions::default()).await.unwrap();
    assert_eq!(ck.status, Status::Stopped);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(lines(&logs[0].0).len(), logs[0].1, "the paused sandbox ran");
    let me = engine.ls().await.unwrap().into_iter().find(|s| s.name == "p").unwrap();
    assert_eq!((me.status, me.head), (Status::Paused, None));
    let rid = me.runtime_id.clone().unwrap();
    // The plain checkpoint holds the paused state, and restores (running).
    let r = engine.restore(&ck.id, "q-again").await.unwrap();
    let again = wait_lines(&r.workspace.unwrap().join("counter.log"), logs[1].1 + 3).await;
    assert!(consecutive_from_one(&again), "{again:?}");

    // The paused sandbox's process dies.
    let pid = engine.runsc().state(&rid).unwrap().unwrap().pid;
    assert!(pid > 0);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    let t = std::time::Instant::now();
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        assert!(t.elapsed() < Duration::from_secs(10), "the sandbox process does not die");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let me = engine.ls().await.unwrap().into_iter().find(|s| s.name == "p").unwrap();
    assert_eq!(me.status, Status::Exited, "{me:?}");
    let stopped = engine.stop("p").await.unwrap();
    assert_eq!(stopped.status, Status::Stopped);
    assert_eq!(engine.runsc().state(&rid).unwrap().map(|s| s.status), None, "its container is left");
    engine.rm("p").await.unwrap();
    cleanup(&engine).await;
}
