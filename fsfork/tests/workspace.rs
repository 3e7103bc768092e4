//! Workspace checkpoints, restores, forks, reverts, diffs and logs against the real store on
//! real, loop-mounted XFS, btrfs and ext4.

mod common;

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use snapfork_fsfork::CopyMode;
use snapfork_fsfork::repo::{Id, NodeData, Repo, RepoTx};
use snapfork_fsfork::testfs::{FsType, TestFs, require_root};
use snapfork_fsfork::workspace::{self, Side};
use snapfork_store::{GcOptions, OpenOptions, Store};

struct Env {
    fs: TestFs,
    store: Store,
}

impl Env {
    fn new(kind: FsType, test: &str, mib: u64) -> Option<Env> {
        if !require_root(test) {
            return None;
        }
        let fs = TestFs::new(kind, mib).expect("make test filesystem");
        // The store lives on the same filesystem as the workspaces, so objects are reflinks.
        let store = Store::open(fs.path().join("store"), OpenOptions::default()).expect("open store");
        Some(Env { fs, store })
    }
    fn p(&self, rel: &str) -> PathBuf {
        self.fs.path().join(rel)
    }
}

fn sh(script: &str, dir: &Path) {
    let st = Command::new("sh").arg("-c").arg(script).current_dir(dir).status().unwrap();
    assert!(st.success(), "shell command failed: {script}");
}

fn checkpoint_restore_roundtrip(kind: FsType) {
    let Some(env) = Env::new(kind, "checkpoint_restore_roundtrip", 768) else {
        return;
    };
    let outside = env.p("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("target.txt"), b"outside\n").unwrap();
    let ws = env.p("ws");
    common::build_rich_tree(&ws, &outside);
    // Identical contents in two places share one object.
    std::fs::write(ws.join("dup1"), b"same bytes").unwrap();
    std::fs::write(ws.join("dup2"), b"same bytes").unwrap();
    let before = common::snapshot(&ws);
    let before_outside = common::snapshot(&outside);

    let r = workspace::checkpoint(&env.store, &ws, Some("first")).unwrap();
    assert_eq!(r.mode, if kind.reflinks() { CopyMode::Reflink } else { CopyMode::Copy });
    assert!(r.parent.is_none());
    assert_eq!(r.unchanged_files, 0);
    // 11 regular files with content; hl-a/b/c are one inode, dup1/dup2 one object.
    assert_eq!(r.new_objects, 9, "{r:?}");
    // The workspace itself is untouched by the checkpoint.
    common::assert_same(&before, &common::snapshot(&ws));

    let dst = env.p("restored");
    let rr = workspace::restore(&env.store, &r.id, &dst).unwrap();
    assert_eq!(rr.mode, if kind.reflinks() { CopyMode::Reflink } else { CopyMode::Copy });
    assert!(rr.skipped.is_empty());
    common::assert_same(&before, &common::snapshot(&dst));
    common::assert_same(&before_outside, &common::snapshot(&outside));
    assert!(common::allocated(&dst.join("disk.img")) < 4 << 20, "restored image is dense");
    let hl = std::fs::metadata(dst.join("hl-a")).unwrap();
    assert_eq!(hl.nlink(), 3);
    assert_eq!(hl.ino(), std::fs::metadata(dst.join("src/deep/hl-c")).unwrap().ino());

    // A second checkpoint of an unchanged workspace reads nothing and gives the same tree.
    let r2 = workspace::checkpoint(&env.store, &ws, None).unwrap();
    assert_eq!(r2.hashed_files, 0, "{r2:?}");
    assert_eq!(r2.parent, Some(r.id));
    // Its directory nodes were reused from the stat cache: restoring it gives the same tree.
    let dst2 = env.p("restored2");
    workspace::restore(&env.store, &r2.id, &dst2).unwrap();
    common::assert_same(&before, &common::snapshot(&dst2));
    let d = workspace::diff(&env.store, Side::Checkpoint(r.id), Side::Checkpoint(r2.id)).unwrap();
    assert!(d.added.is_empty() && d.removed.is_empty() && d.changed.is_empty(), "{d:?}");
    // The restored tree checkpoints without reading anything either (its stat cache was seeded).
    let r3 = workspace::checkpoint(&env.store, &dst, None).unwrap();
    assert_eq!(r3.hashed_files, 0, "{r3:?}");

    // gc follows the manifests' links: everything is still restorable after it.
    env.store.gc(&GcOptions { grace: std::time::Duration::ZERO, ..GcOptions::default() }).unwrap();
    let again = env.p("after-gc");
    workspace::restore(&env.store, &r.id, &again).unwrap();
    common::assert_same(&before, &common::snapshot(&again));
}

#[test]
fn checkpoint_restore_roundtrip_xfs() {
    checkpoint_restore_roundtrip(FsType::Xfs);
}
#[test]
fn checkpoint_restore_roundtrip_btrfs() {
    checkpoint_restore_roundtrip(FsType::Btrfs);
}
#[test]
fn checkpoint_restore_roundtrip_ext4() {
    checkpoint_restore_roundtrip(FsType::Ext4);
}

/// Edits made by a shell, including one that keeps size and mtime, are all captured; the diff
/// names them; the live directory equals its latest checkpoint.
fn shell_edits_are_captured(kind: FsType) {
    let Some(env) = Env::new(kind, "shell_edits_are_captured", 512) else {
        return;
    };
    let ws = env.p("ws");
    std::fs::create_dir_all(ws.join("src")).unwrap();
    for i in 0..50 {
        std::fs::write(ws.join(format!("src/f{i}.txt")), format!("file {i}\n")).unwrap();
    }
    std::fs::write(ws.join("same-size"), b"AAAA").unwrap();
    std::os::unix::fs::symlink("src/f1.txt", ws.join("link")).unwrap();
    let c1 = workspace::checkpoint(&env.store, &ws, Some("base")).unwrap();
    assert_eq!(c1.files, 51);

    sh(
        "echo more >> src/f3.txt && rm src/f4.txt && mkdir -p build/out && echo obj > build/out/a.o \
         && chmod 700 src/f5.txt && ln -sf src/f2.txt link \
         && printf BBBB > same-size.new && touch -r same-size same-size.new && mv same-size.new same-size \
         && printf CCCC | dd of=src/f6.txt conv=notrunc status=none && touch -d @1000000000 src/f6.txt \
         && chown 99:99 src/f7.txt",
        &ws,
    );
    let c2 = workspace::checkpoint(&env.store, &ws, Some("after shell")).unwrap();
    // f3, f6, same-size, a.o changed content; f5 and f7 changed ctime (chmod, chown).
    assert!(c2.hashed_files <= 6, "unchanged files were read again: {c2:?}");
    let d = workspace::diff(&env.store, Side::Checkpoint(c1.id), Side::Checkpoint(c2.id)).unwrap();
    assert_eq!(d.added, vec!["build", "build/out", "build/out/a.o"]);
    assert_eq!(d.removed, vec!["src/f4.txt"]);
    let changed: BTreeMap<String, Vec<String>> = d.changed.iter().map(|c| (c.path.clone(), c.what.clone())).collect();
    assert_eq!(changed.get("src/f3.txt").unwrap(), &vec!["content".to_string()]);
    assert_eq!(changed.get("src/f5.txt").unwrap(), &vec!["mode".to_string()]);
    assert_eq!(changed.get("src/f6.txt").unwrap(), &vec!["content".to_string()]);
    assert_eq!(changed.get("src/f7.txt").unwrap(), &vec!["owner".to_string()]);
    assert_eq!(changed.get("link").unwrap(), &vec!["link".to_string()]);
    assert_eq!(changed.get("same-size").unwrap(), &vec!["content".to_string()]);
    // The root and src directories changed mtime only: not a reported change.
    assert_eq!(changed.len(), 6, "{changed:?}");
    // The live directory equals its latest checkpoint, and differs from the first one.
    let live = workspace::diff(&env.store, Side::Checkpoint(c2.id), Side::Dir(&ws)).unwrap();
    assert!(live.added.is_empty() && live.removed.is_empty() && live.changed.is_empty(), "{live:?}");
    let live1 = workspace::diff(&env.store, Side::Checkpoint(c1.id), Side::Dir(&ws)).unwrap();
    assert_eq!(live1.removed, vec!["src/f4.txt"]);
    // Restoring the second checkpoint gives the workspace as the shell left it.
    let dst = env.p("r2");
    workspace::restore(&env.store, &c2.id, &dst).unwrap();
    common::assert_same(&common::snapshot(&ws), &common::snapshot(&dst));
}

#[test]
fn shell_edits_are_captured_xfs() {
    shell_edits_are_captured(FsType::Xfs);
}
#[test]
fn shell_edits_are_captured_btrfs() {
    shell_edits_are_captured(FsType::Btrfs);
}
#[test]
fn shell_edits_are_captured_ext4() {
    shell_edits_are_captured(FsType::Ext4);
}

/// A large image changed in 1% of its pages is re-hashed only where its extents changed, and
/// the id is still the BLAKE3 of its bytes.
fn large_image_is_hashed_incrementally(kind: FsType) {
    let Some(env) = Env::new(kind, "large_image_is_hashed_incrementally", 1024) else {
        return;
    };
    let ws = env.p("ws");
    std::fs::create_dir(&ws).unwrap();
    let img = ws.join("disk.img");
    let size: u64 = 128 << 20;
    let mut data = vec![0u8; size as usize];
    let mut x = 0x9e3779b97f4a7c15u64;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(&img, &data).unwrap();
    let c1 = workspace::checkpoint(&env.store, &ws, None).unwrap();
    assert_eq!(c1.hashed_bytes, size);
    // 1% of the 4 KiB pages, scattered, written in place.
    let pages = size / 4096;
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    for k in 0..pages / 100 {
        let page = (k * 7919 * 13) % pages;
        let buf = [k as u8 ^ 0x5a; 4096];
        std::os::unix::fs::FileExt::write_all_at(&f, &buf, page * 4096).unwrap();
        data[(page * 4096) as usize..(page * 4096 + 4096) as usize].copy_from_slice(&buf);
    }
    drop(f);
    let c2 = workspace::checkpoint(&env.store, &ws, None).unwrap();
    assert_eq!(c2.hashed_files, 1);
    if kind.reflinks() {
        assert!(c2.hashed_bytes < size / 10, "hashed {} of {size} bytes", c2.hashed_bytes);
    } else {
        // ext4 cannot share extents: the whole file is hashed again.
        assert_eq!(c2.hashed_bytes, size);
    }
    let dst = env.p("r");
    workspace::restore(&env.store, &c2.id, &dst).unwrap();
    assert!(std::fs::read(dst.join("disk.img")).unwrap() == data, "restored image differs");
    let expect = blake3::hash(&data);
    let obj = env.store.file_object_path(&snapfork_store::Hash(*expect.as_bytes()));
    assert!(obj.exists(), "object is not named by the BLAKE3 of the image");
}

#[test]
fn large_image_is_hashed_incrementally_xfs() {
    large_image_is_hashed_incrementally(FsType::Xfs);
}
#[test]
fn large_image_is_hashed_incrementally_btrfs() {
    large_image_is_hashed_incrementally(FsType::Btrfs);
}
#[test]
fn large_image_is_hashed_incrementally_ext4() {
    large_image_is_hashed_incrementally(FsType::Ext4);
}

/// A checkpoint that copied a file (ext4: no reflinks) makes it durable before its stat cache
/// vouches for it. Otherwise a power cut can keep the file's new mtime (journaled) and lose its
/// new bytes (an overwrite in place is not ordered before the inode), and every later
/// checkpoint would trust the cache and record bytes the file no longer holds.
#[test]
fn a_copied_file_is_durable_before_the_stat_cache_vouches_for_it() {
    let Some(Env { fs, store }) =
        Env::new(FsType::Ext4, "a_copied_file_is_durable_before_the_stat_cache_vouches_for_it", 256)
    else {
        return;
    };
    let ws = fs.path().join("ws");
    std::fs::create_dir(&ws).unwrap();
    let f = ws.join("f");
    std::fs::write(&f, vec![b'A'; 1 << 20]).unwrap();
    sh("sync", &ws);
    workspace::checkpoint(&store, &ws, Some("a")).unwrap();
    // An in-place overwrite of blocks already on disk, captured by the next checkpoint.
    let out = std::fs::OpenOptions::new().write(true).open(&f).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&out, &[b'B'; 4096], 0).unwrap();
    drop(out);
    let b = workspace::checkpoint(&store, &ws, Some("b")).unwrap();
    assert_eq!((b.hashed_files, b.mode), (1, CopyMode::Copy), "{b:?}");
    drop(store);
    fs.power_cut().expect("power cut");
    fs.remount().expect("remount");

    let store = Store::open(fs.path().join("store"), OpenOptions::default()).expect("open store after the crash");
    let live = std::fs::read(&f).unwrap();
    let c = workspace::checkpoint(&store, &ws, Some("after the crash")).unwrap();
    let dst = fs.path().join("r");
    workspace::restore(&store, &c.id, &dst).unwrap();
    assert!(std::fs::read(dst.join("f")).unwrap() == live, "the checkpoint records bytes the file does not hold");
    assert_eq!(&live[..4], b"BBBB", "the checkpointed write was lost in the crash");
}

fn read_tree_via_dirfd(ws: &Path) -> Option<Vec<Vec<u8>>> {
    let c = CString::new(ws.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: valid path; the descriptor is closed below.
    let dfd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY) };
    if dfd < 0 {
        return None;
    }
    let mut out = Vec::new();
    for i in 0..20 {
        let name = CString::new(format!("f{i:02}")).unwrap();
        // SAFETY: valid descriptor and name.
        let fd = unsafe { libc::openat(dfd, name.as_ptr(), libc::O_RDONLY) };
        if fd < 0 {
            // The old tree is being removed in the background: this read is void.
            // SAFETY: our descriptor.
            unsafe { libc::close(dfd) };
            return None;
        }
        let mut buf = vec![0u8; 64];
        // SAFETY: `buf` is writable.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        // SAFETY: our descriptor.
        unsafe { libc::close(fd) };
        buf.truncate(n.max(0) as usize);
        out.push(buf);
    }
    // SAFETY: our descriptor.
    unsafe { libc::close(dfd) };
    Some(out)
}

/// A reader that opens the workspace again and again while it is reverted back and forth never
/// sees a tree mixing two checkpoints.
#[test]
fn revert_is_atomic_under_a_concurrent_reader() {
    let Some(env) = Env::new(FsType::Xfs, "revert_is_atomic_under_a_concurrent_reader", 512) else {
        return;
    };
    let ws = env.p("ws");
    std::fs::create_dir(&ws).unwrap();
    let write_all = |v: &str| {
        for i in 0..20 {
            std::fs::write(ws.join(format!("f{i:02}")), v).unwrap();
        }
    };
    write_all("version-1");
    let c1 = workspace::checkpoint(&env.store, &ws, Some("v1")).unwrap();
    write_all("version-2");
    let c2 = workspace::checkpoint(&env.store, &ws, Some("v2")).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(AtomicU64::new(0));
    let reader = {
        let (stop, seen, ws) = (stop.clone(), seen.clone(), ws.clone());
        std::thread::spawn(move || {
            let mut kinds = std::collections::BTreeSet::new();
            while !stop.load(Ordering::Relaxed) {
                if let Some(files) = read_tree_via_dirfd(&ws) {
                    let first = files[0].clone();
                    assert!(
                        files.iter().all(|f| *f == first),
                        "mixed tree seen: {:?}",
                        files.iter().map(|f| String::from_utf8_lossy(f).into_owned()).collect::<Vec<_>>()
                    );
                    kinds.insert(first);
                    seen.fetch_add(1, Ordering::Relaxed);
                }
            }
            kinds
        })
    };
    let mut cleanups = Vec::new();
    for round in 0..20 {
        let (target, expect) = if round % 2 == 0 { (c1.id, "version-1") } else { (c2.id, "version-2") };
        let r = workspace::revert(&env.store, &ws, &target).unwrap();
        cleanups.push(workspace::remove_tree_background(r.old_tree));
        assert_eq!(std::fs::read_to_string(ws.join("f07")).unwrap(), expect);
    }
    std::thread::sleep(std::time::Duration::from_millis(50));
    stop.store(true, Ordering::Relaxed);
    let kinds = reader.join().expect("reader saw a mixed tree");
    for c in cleanups {
        c.join().unwrap();
    }
    assert!(seen.load(Ordering::Relaxed) > 20);
    assert_eq!(kinds.len(), 2, "the reader should have seen both versions");
    // No leftovers beside the workspace.
    let names: Vec<_> = std::fs::read_dir(env.fs.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(!names.iter().any(|n| n.to_string_lossy().contains("snapfork-revert")), "{names:?}");
    // The history records the reverts.
    let (_rec, log) = workspace::log(&env.store, &ws).unwrap();
    assert_eq!(log.iter().filter(|e| e.kind == "revert").count(), 20);
}

/// Three forks of one checkpoint evolve independently; the log shows them under the checkpoint.
#[test]
fn three_forks_evolve_independently() {
    let Some(env) = Env::new(FsType::Btrfs, "three_forks_evolve_independently", 512) else {
        return;
    };
    let ws = env.p("ws");
    std::fs::create_dir_all(ws.join("app")).unwrap();
    std::fs::write(ws.join("app/state"), b"base\n").unwrap();
    let c = workspace::checkpoint(&env.store, &ws, Some("base")).unwrap();
    let forks = workspace::fork(&env.store, &c.id, 3, &env.p("forks")).unwrap();
    assert_eq!(forks.len(), 3);
    for (i, f) in forks.iter().enumerate() {
        sh(&format!("echo fork{i} >> app/state && echo {i} > only-{i}"), &f.path);
    }
    let mut ids = Vec::new();
    for (i, f) in forks.iter().enumerate() {
        assert_eq!(std::fs::read_to_string(f.path.join("app/state")).unwrap(), format!("base\nfork{i}\n"));
        for j in 0..3 {
            assert_eq!(f.path.join(format!("only-{j}")).exists(), i == j);
        }
        let r = workspace::checkpoint(&env.store, &f.path, None).unwrap();
        assert_eq!(r.parent, Some(c.id), "a fork's first checkpoint descends from the fork point");
        ids.push(r.id);
    }
    assert_eq!(std::fs::read_to_string(ws.join("app/state")).unwrap(), "base\n");
    let d = workspace::diff(&env.store, Side::Checkpoint(ids[0]), Side::Checkpoint(ids[1])).unwrap();
    assert_eq!(d.added, vec!["only-1"]);
    assert_eq!(d.removed, vec!["only-0"]);
    assert_eq!(d.changed.len(), 1);
    let (_rec, log) = workspace::log(&env.store, &ws).unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].offspring.len(), 3);
    assert!(log[0].offspring.iter().all(|o| o.kind == "fork"));
    let (_rec, flog) = workspace::log(&env.store, &forks[0].path).unwrap();
    assert_eq!(flog.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(), vec!["fork", "checkpoint"]);
}

fn sqlite(db: &Path, sql: &str) -> String {
    let out = Command::new("sqlite3").arg(db).arg(sql).output().expect("run sqlite3 (installed by scripts/setup.sh)");
    assert!(out.status.success(), "sqlite3 {sql}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// A quiesced SQLite database forks like any other file: each fork writes its own rows and
/// opens with them.
#[test]
fn sqlite_database_forks() {
    let Some(env) = Env::new(FsType::Xfs, "sqlite_database_forks", 512) else {
        return;
    };
    let ws = env.p("ws");
    std::fs::create_dir(&ws).unwrap();
    let db = ws.join("app.db");
    sqlite(
        &db,
        "PRAGMA journal_mode=WAL; CREATE TABLE t(k TEXT, v INTEGER); INSERT INTO t VALUES ('base', 1), ('base', 2);",
    );
    // Quiesce: fold the WAL into the database file.
    sqlite(&db, "PRAGMA wal_checkpoint(TRUNCATE);");
    let c = workspace::checkpoint(&env.store, &ws, Some("db")).unwrap();
    let forks = workspace::fork(&env.store, &c.id, 2, &env.p("forks")).unwrap();
    for (i, f) in forks.iter().enumerate() {
        sqlite(&f.path.join("app.db"), &format!("INSERT INTO t VALUES ('fork{i}', {});", 100 + i));
    }
    sqlite(&db, "INSERT INTO t VALUES ('origin', 9);");
    let q = "PRAGMA integrity_check; SELECT k || ':' || v FROM t ORDER BY v;";
    assert_eq!(sqlite(&forks[0].path.join("app.db"), q), "ok\nbase:1\nbase:2\nfork0:100\n");
    assert_eq!(sqlite(&forks[1].path.join("app.db"), q), "ok\nbase:1\nbase:2\nfork1:101\n");
    assert_eq!(sqlite(&db, q), "ok\nbase:1\nbase:2\norigin:9\n");
}

/// Restore and revert never write through symlinks, even when the workspace holds links to
/// directories outside it.
#[test]
fn restore_and_revert_never_write_outside() {
    let Some(env) = Env::new(FsType::Xfs, "restore_and_revert_never_write_outside", 512) else {
        return;
    };
    let outside = env.p("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("keep"), b"keep\n").unwrap();
    let ws = env.p("ws");
    std::fs::create_dir(&ws).unwrap();
    // The checkpoint has a real directory `d` with a file in it.
    std::fs::create_dir(ws.join("d")).unwrap();
    std::fs::write(ws.join("d/keep"), b"from checkpoint\n").unwrap();
    let c = workspace::checkpoint(&env.store, &ws, None).unwrap();
    // Now `d` is a symlink to the outside directory; reverting must replace the link, not
    // write through it.
    std::fs::remove_dir_all(ws.join("d")).unwrap();
    std::os::unix::fs::symlink(&outside, ws.join("d")).unwrap();
    let before = common::snapshot(&outside);
    let r = workspace::revert(&env.store, &ws, &c.id).unwrap();
    std::fs::remove_dir_all(&r.old_tree).unwrap();
    common::assert_same(&before, &common::snapshot(&outside));
    assert!(std::fs::symlink_metadata(ws.join("d")).unwrap().is_dir());
    assert_eq!(std::fs::read(ws.join("d/keep")).unwrap(), b"from checkpoint\n");
    // A workspace path that is itself a link to a directory is resolved once (like cp).
    let _ = common::latin1_name();
}

/// A store kept inside the workspace (like the default `.snapfork`) is never recorded in its
/// checkpoints, and reverting such a workspace is refused rather than moving the store away.
#[test]
fn store_inside_the_workspace_is_left_out() {
    if !require_root("store_inside_the_workspace_is_left_out") {
        return;
    }
    let fs = TestFs::new(FsType::Xfs, 512).unwrap();
    let ws = fs.path().join("ws");
    std::fs::create_dir(&ws).unwrap();
    std::fs::write(ws.join("a"), b"a").unwrap();
    let store = Store::open(ws.join(".snapfork"), OpenOptions::default()).unwrap();
    let c = workspace::checkpoint(&store, &ws, None).unwrap();
    assert_eq!(c.files, 1);
    let live = workspace::diff(&store, Side::Checkpoint(c.id), Side::Dir(&ws)).unwrap();
    assert!(live.added.is_empty(), "{live:?}");
    let dst = fs.path().join("r");
    workspace::restore(&store, &c.id, &dst).unwrap();
    assert!(!dst.join(".snapfork").exists());
    let err = workspace::revert(&store, &ws, &c.id).unwrap_err();
    assert!(err.to_string().contains("inside this workspace"), "{err}");
    assert!(ws.join(".snapfork").exists());
}

/// More directories than the walk may keep open (half the 20,000 open-file limit here):
/// checkpoint, restore and a second checkpoint still work, reopening directories on demand.
#[test]
fn checkpoint_restore_many_directories() {
    let Some(env) = Env::new(FsType::Xfs, "checkpoint_restore_many_directories", 768) else {
        return;
    };
    let ws = env.p("ws");
    for a in 0..110 {
        for b in 0..100 {
            std::fs::create_dir_all(ws.join(format!("a{a}/b{b}"))).unwrap();
        }
        std::fs::write(ws.join(format!("a{a}/b{}/f", a % 100)), format!("{a}")).unwrap();
    }
    let c = workspace::checkpoint(&env.store, &ws, None).unwrap();
    assert_eq!((c.dirs, c.files), (1 + 110 + 11_000, 110));
    let dst = env.p("r");
    workspace::restore(&env.store, &c.id, &dst).unwrap();
    common::assert_same(&common::snapshot(&ws), &common::snapshot(&dst));
    std::fs::write(ws.join("a109/b9/f"), "changed").unwrap();
    let c2 = workspace::checkpoint(&env.store, &ws, None).unwrap();
    assert_eq!(c2.hashed_files, 1);
    let d = workspace::diff(&env.store, Side::Checkpoint(c.id), Side::Checkpoint(c2.id)).unwrap();
    assert_eq!(d.changed.len(), 1);
}

/// Files created and deleted while checkpoints run (a build, temporary files): every checkpoint
/// succeeds, holding each file either whole or not at all.
#[test]
fn checkpoint_while_files_come_and_go() {
    let Some(env) = Env::new(FsType::Xfs, "checkpoint_while_files_come_and_go", 512) else { return };
    let ws = env.p("ws");
    std::fs::create_dir_all(ws.join("tmp")).unwrap();
    std::fs::write(ws.join("stable"), b"stable").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let side = env.p("side");
    std::fs::create_dir(&side).unwrap();
    let churn = {
        let (stop, dir) = (stop.clone(), ws.join("tmp"));
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for i in 0..50 {
                    // Written beside the workspace and renamed in: a file is always whole.
                    let tmp = side.join(format!("t{i}"));
                    std::fs::write(&tmp, format!("content {i}")).unwrap();
                    std::fs::rename(&tmp, dir.join(format!("t{i}"))).unwrap();
                    let _ = std::os::unix::fs::symlink("x", dir.join(format!("l{i}")));
                    // A directory that may be gone by the time the walk descends into it.
                    let sub = dir.join(format!("d{i}"));
                    std::fs::create_dir(&sub).unwrap();
                    std::fs::write(&tmp, format!("inner {i}")).unwrap();
                    std::fs::rename(&tmp, sub.join("f")).unwrap();
                }
                for i in 0..50 {
                    let _ = std::fs::remove_file(dir.join(format!("t{i}")));
                    let _ = std::fs::remove_file(dir.join(format!("l{i}")));
                    std::fs::remove_dir_all(dir.join(format!("d{i}"))).unwrap();
                }
                n += 1;
            }
            n
        })
    };
    let mut ids = Vec::new();
    for _ in 0..15 {
        ids.push(workspace::checkpoint(&env.store, &ws, None).expect("checkpoint during churn").id);
    }
    stop.store(true, Ordering::Relaxed);
    assert!(churn.join().unwrap() > 0);
    for (k, id) in ids.iter().enumerate() {
        let dst = env.p(&format!("r{k}"));
        workspace::restore(&env.store, id, &dst).unwrap();
        assert_eq!(std::fs::read(dst.join("stable")).unwrap(), b"stable");
        for e in std::fs::read_dir(dst.join("tmp")).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            if let Some(i) = name.strip_prefix('t') {
                assert_eq!(std::fs::read_to_string(&p).unwrap(), format!("content {i}"));
            }
            // A directory caught while it was being removed is restored empty (as rmdir saw it).
            if let Some(i) = name.strip_prefix('d') {
                for f in std::fs::read_dir(&p).unwrap() {
                    assert_eq!(std::fs::read_to_string(f.unwrap().path()).unwrap(), format!("inner {i}"));
                }
            }
        }
    }
}

/// A hard link whose first name (in walk order) is removed during the checkpoint is still
/// recorded through its other name.
#[test]
fn a_hard_link_losing_its_first_name_keeps_the_other() {
    let Some(env) = Env::new(FsType::Xfs, "a_hard_link_losing_its_first_name_keeps_the_other", 512) else {
        return;
    };
    let ws = env.p("ws");
    std::fs::create_dir(&ws).unwrap();
    std::fs::write(ws.join("z"), b"linked").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let churn = {
        let (stop, ws) = (stop.clone(), ws.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                std::fs::hard_link(ws.join("z"), ws.join("a")).unwrap();
                std::fs::remove_file(ws.join("a")).unwrap();
                n += 1;
            }
            n
        })
    };
    let ids: Vec<_> =
        (0..30).map(|_| workspace::checkpoint(&env.store, &ws, None).expect("checkpoint during churn").id).collect();
    stop.store(true, Ordering::Relaxed);
    assert!(churn.join().unwrap() > 0);
    for (k, id) in ids.iter().enumerate() {
        let dst = env.p(&format!("r{k}"));
        workspace::restore(&env.store, id, &dst).unwrap();
        assert_eq!(std::fs::read(dst.join("z")).unwrap(), b"linked", "checkpoint {k} lost z");
        // A walk of a live tree is not atomic: `a` may have been stat'ed as a link and `z`
        // after `a` went (so one name each), but whatever is there holds the content.
        if dst.join("a").exists() {
            assert_eq!(std::fs::read(dst.join("a")).unwrap(), b"linked");
        }
    }
}

/// The stat cache must not vouch for a file object or a directory node that gc removed after
/// every checkpoint that used it was deleted: the next checkpoint reads the file again, writes
/// the directory's node again (the same bytes: its entries did not change), and restores whole.
#[test]
fn stat_cache_never_links_an_object_gc_removed() {
    let Some(env) = Env::new(FsType::Xfs, "stat_cache_never_links_an_object_gc_removed", 512) else {
        return;
    };
    let ws = env.p("ws");
    std::fs::create_dir_all(ws.join("sub/deeper")).unwrap();
    std::fs::write(ws.join("sub/deeper/c.txt"), b"in a subdirectory\n").unwrap();
    std::fs::write(ws.join("a.txt"), b"kept across checkpoints\n").unwrap();
    std::fs::write(ws.join("b.bin"), vec![7u8; 100_000]).unwrap();
    let first = workspace::checkpoint(&env.store, &ws, Some("first")).unwrap();
    // Delete every root that reaches the first checkpoint, then collect.
    let mut tx = env.store.begin().unwrap();
    for (name, _) in env.store.list_refs("").unwrap() {
        tx.delete_ref(&name);
    }
    tx.commit().unwrap();
    let gc = env.store.gc(&GcOptions { grace: std::time::Duration::ZERO, ..GcOptions::default() }).unwrap();
    assert!(gc.removed_files >= 2, "gc removed the first checkpoint's objects: {gc:?}");
    // Nothing changed in the workspace: every entry is a stat-cache hit.
    let second = workspace::checkpoint(&env.store, &ws, Some("second")).unwrap();
    assert_ne!(first.id, second.id, "the first checkpoint is gone; a new one must be written");
    assert!(env.store.verify(None, None).unwrap().is_ok(), "the second checkpoint links missing objects");
    let out = env.p("restored");
    workspace::restore(&env.store, &second.id, &out).unwrap();
    assert_eq!(std::fs::read(out.join("a.txt")).unwrap(), b"kept across checkpoints\n");
    assert_eq!(std::fs::read(out.join("b.bin")).unwrap(), vec![7u8; 100_000]);
    assert_eq!(std::fs::read(out.join("sub/deeper/c.txt")).unwrap(), b"in a subdirectory\n");
}

/// Directories that hold at least one entry, below and including `root`.
fn non_empty_dirs(root: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mut any = false;
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            any = true;
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
        }
        n += usize::from(any);
    }
    n
}

/// After edits here and there in a tree, untouched directories keep their manifest nodes and
/// stat-cache records while the checkpoint still equals the live tree exactly; records of
/// removed or emptied directories are deleted.
#[test]
fn partial_checkpoints_match_the_tree() {
    let Some(env) = Env::new(FsType::Xfs, "partial_checkpoints_match_the_tree", 512) else {
        return;
    };
    let ws = env.p("ws");
    for d in 0..5 {
        for e in 0..5 {
            std::fs::create_dir_all(ws.join(format!("d{d}/e{e}"))).unwrap();
            for f in 0..5 {
                std::fs::write(ws.join(format!("d{d}/e{e}/f{f}.txt")), format!("{d} {e} {f}\n")).unwrap();
            }
        }
    }
    let c1 = workspace::checkpoint(&env.store, &ws, Some("first")).unwrap();
    assert_eq!((c1.files, c1.hashed_files), (125, 125));
    let c2 = workspace::checkpoint(&env.store, &ws, Some("unchanged")).unwrap();
    assert_eq!((c2.files, c2.hashed_files, c2.unchanged_files), (125, 0, 125));
    let records = |store: &Store| store.meta_list("fsfork/sc/").unwrap().len();
    assert_eq!(records(&env.store), non_empty_dirs(&ws));

    sh(
        "echo more >> d1/e2/f3.txt && rm -r d2/e1 && rm d0/e3/* && mv d3/e0/f0.txt d3/e0/g0.txt \
         && chmod 700 d0/e0 && mkdir d4/new && echo n > d4/new/n.txt && touch -a -d @1234567 d0/e1/f1.txt \
         && ln -s ../e0/f1.txt d3/e1/link",
        &ws,
    );
    common::setxattr(&ws.join("d4/e4"), "user.note", b"dir xattr");
    let c3 = workspace::checkpoint(&env.store, &ws, Some("edits")).unwrap();
    // f3 appended, g0 renamed (new name), n.txt new, f1's times set: nothing else is read.
    assert!((3..=4).contains(&c3.hashed_files), "{c3:?}");
    assert_eq!(c3.files, 125 - 5 - 5 + 1);
    assert_eq!(records(&env.store), non_empty_dirs(&ws));
    let live = workspace::diff(&env.store, Side::Checkpoint(c3.id), Side::Dir(&ws)).unwrap();
    assert!(live.added.is_empty() && live.removed.is_empty() && live.changed.is_empty(), "{live:?}");
    let dst = env.p("r3");
    workspace::restore(&env.store, &c3.id, &dst).unwrap();
    common::assert_same(&common::snapshot(&ws), &common::snapshot(&dst));

    // Nothing changed since: the next checkpoint reads nothing and records the same tree.
    let c4 = workspace::checkpoint(&env.store, &ws, Some("again")).unwrap();
    assert_eq!(c4.hashed_files, 0);
    let d = workspace::diff(&env.store, Side::Checkpoint(c3.id), Side::Checkpoint(c4.id)).unwrap();
    assert!(d.added.is_empty() && d.removed.is_empty() && d.changed.is_empty(), "{d:?}");
    assert!(env.store.verify(None, None).unwrap().is_ok());
}

/// Without reflinks a checkpoint copies file contents into the store, and a restore copies them
/// out; a copy onto the store's filesystem that would eat into the room the store keeps for its
/// index is refused before it starts, and leaves nothing.
#[test]
fn copies_that_would_fill_the_store_disk_are_refused_and_leave_nothing() {
    let test = "copies_that_would_fill_the_store_disk_are_refused_and_leave_nothing";
    if !require_root(test) {
        return;
    }
    let fs = TestFs::new(FsType::Ext4, 256).expect("make test filesystem");
    let store = Store::open(fs.path().join("store"), OpenOptions { min_free_bytes: 24 << 20, ..Default::default() })
        .expect("open store");
    let ws = fs.path().join("ws");
    std::fs::create_dir(&ws).unwrap();
    std::fs::write(ws.join("small.txt"), b"fits").unwrap();
    let first = workspace::checkpoint(&store, &ws, None).unwrap();
    // A file about as large as what is left beside the reserve: its copy would eat into it.
    let free = snapfork_store::free_bytes(fs.path()).unwrap();
    assert!(free > 48 << 20, "{free} bytes free");
    let big = vec![7u8; (free - (16 << 20)) as usize];
    std::fs::write(ws.join("big.bin"), &big).unwrap();
    let refs = store.list_refs("").unwrap();
    let err = workspace::checkpoint(&store, &ws, None).unwrap_err();
    assert!(err.to_string().contains("the store keeps free"), "{err}");
    assert_eq!(store.list_refs("").unwrap(), refs, "a refused checkpoint left refs");
    assert_eq!(std::fs::read_dir(store.staging_dir()).unwrap().count(), 0, "staged copies left behind");
    assert!(store.verify(None, None).unwrap().is_ok());
    // With the file gone again, checkpoints work, and the first one still restores.
    std::fs::remove_file(ws.join("big.bin")).unwrap();
    std::fs::write(ws.join("medium.bin"), vec![9u8; 32 << 20]).unwrap();
    let second = workspace::checkpoint(&store, &ws, None).unwrap();
    let back = fs.path().join("back");
    workspace::restore(&store, &first.id, &back).unwrap();
    assert_eq!(std::fs::read(back.join("small.txt")).unwrap(), b"fits");
    // A restore onto the store's filesystem copies too, and keeps the reserve the same way.
    let filler = fs.path().join("filler");
    std::fs::write(&filler, vec![0u8; (snapfork_store::free_bytes(fs.path()).unwrap() - (40 << 20)) as usize]).unwrap();
    let err = workspace::restore(&store, &second.id, &fs.path().join("back2")).unwrap_err();
    assert!(err.to_string().contains("the store keeps free"), "{err}");
    assert!(!fs.path().join("back2").exists(), "a refused restore left its tree");
    std::fs::remove_file(&filler).unwrap();
    workspace::restore(&store, &second.id, &fs.path().join("back2")).unwrap();
    assert!(store.verify(None, None).unwrap().is_ok());
}

/// Forks of one checkpoint made at once (the engine's `fork -n N` runs them in parallel) are all
/// in its log: none overwrites another's entry in the offspring list.
#[test]
fn parallel_forks_are_all_recorded() {
    let Some(env) = Env::new(FsType::Xfs, "parallel_forks_are_all_recorded", 512) else {
        return;
    };
    let ws = env.p("ws");
    std::fs::create_dir_all(&ws).unwrap();
    std::fs::write(ws.join("f"), b"x").unwrap();
    let c = workspace::checkpoint(&env.store, &ws, None).unwrap();
    std::thread::scope(|s| {
        for i in 0..8 {
            let (store, c, dst) = (&env.store, c.id, env.p(&format!("fork-{i}")));
            s.spawn(move || workspace::fork_one(store, &c, &dst).unwrap());
        }
    });
    let (_rec, log) = workspace::log(&env.store, &ws).unwrap();
    let mut paths: Vec<_> = log[0].offspring.iter().map(|o| o.path.clone()).collect();
    paths.sort();
    let mut want: Vec<_> = (0..8).map(|i| env.p(&format!("fork-{i}")).to_string_lossy().into_owned()).collect();
    want.sort();
    assert_eq!(paths, want);
}

/// Hard links in two btrfs subvolumes of one workspace whose inodes have the same numbers (each
/// subvolume numbers its own): each pair comes back as its own link, never merged with the other.
#[test]
fn hard_links_in_two_subvolumes_with_equal_inode_numbers_stay_apart() {
    let Some(env) = Env::new(FsType::Btrfs, "hard_links_in_two_subvolumes_with_equal_inode_numbers_stay_apart", 512)
    else {
        return;
    };
    let ws = env.p("ws");
    std::fs::create_dir(&ws).unwrap();
    for sub in ["a", "b"] {
        let st = Command::new("btrfs").args(["-q", "subvolume", "create"]).arg(ws.join(sub)).status().unwrap();
        assert!(st.success(), "btrfs subvolume create");
        std::fs::write(ws.join(sub).join("f"), format!("content of {sub}\n")).unwrap();
        std::fs::hard_link(ws.join(sub).join("f"), ws.join(sub).join("g")).unwrap();
    }
    let ino = |p: PathBuf| std::fs::metadata(p).unwrap().ino();
    assert_eq!(ino(ws.join("a/f")), ino(ws.join("b/f")), "the two subvolumes number their inodes alike");
    let c = workspace::checkpoint(&env.store, &ws, None).unwrap();
    let dst = env.p("restored");
    workspace::restore(&env.store, &c.id, &dst).unwrap();
    for sub in ["a", "b"] {
        let (f, g) = (dst.join(sub).join("f"), dst.join(sub).join("g"));
        assert_eq!(ino(f.clone()), ino(g.clone()), "{sub}/f and {sub}/g are one file again");
        assert_eq!(std::fs::read_to_string(&g).unwrap(), format!("content of {sub}\n"));
    }
    assert_ne!(ino(dst.join("a/f")), ino(dst.join("b/f")), "the two pairs stay apart");
}

/// Sleeps until just after the wall clock's next whole second.
fn align_to_second() {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    std::thread::sleep(std::time::Duration::from_nanos(1_000_000_000 - now.subsec_nanos() as u64 + 5_000_000));
}

fn ctime(p: &Path) -> (i64, i64) {
    let m = std::fs::symlink_metadata(p).unwrap();
    (m.ctime(), m.ctime_nsec())
}

/// A file rewritten (same size) in the second it was checkpointed keeps its ctime on a
/// filesystem with whole-second timestamps: the stat cache must not vouch for it, or the next
/// checkpoint silently keeps the old content. Likewise for a file written right after a restore.
#[test]
fn a_file_rewritten_in_the_tick_it_was_read_is_read_again() {
    let Some(env) = Env::new(FsType::Ext4Seconds, "a_file_rewritten_in_the_tick_it_was_read_is_read_again", 256) else {
        return;
    };
    let ws = env.p("ws");
    std::fs::create_dir(&ws).unwrap();
    std::fs::write(ws.join("other"), b"unchanged").unwrap();
    let f = ws.join("f");
    let mut raced = false;
    for attempt in 0..5 {
        align_to_second();
        std::fs::write(&f, format!("old {attempt}")).unwrap();
        let before = ctime(&f);
        let first = workspace::checkpoint(&env.store, &ws, None).unwrap();
        std::fs::write(&f, format!("new {attempt}")).unwrap();
        // The race needs both writes in one second; on a slow run, try again.
        if ctime(&f) != before {
            continue;
        }
        raced = true;
        let second = workspace::checkpoint(&env.store, &ws, None).unwrap();
        let out = env.p(&format!("r{attempt}"));
        workspace::restore(&env.store, &second.id, &out).unwrap();
        assert_eq!(std::fs::read_to_string(out.join("f")).unwrap(), format!("new {attempt}"));
        assert_eq!(std::fs::read_to_string(out.join("other")).unwrap(), "unchanged");
        assert_ne!(first.id, second.id);
        // A write right after the restore returns, same size: the fork's next checkpoint sees it.
        std::fs::write(out.join("f"), format!("mod {attempt}")).unwrap();
        let third = workspace::checkpoint(&env.store, &out, None).unwrap();
        let again = env.p(&format!("again{attempt}"));
        workspace::restore(&env.store, &third.id, &again).unwrap();
        assert_eq!(std::fs::read_to_string(again.join("f")).unwrap(), format!("mod {attempt}"));
        break;
    }
    assert!(raced, "five tries never wrote twice within one second");
}

/// A file object truncated or extended in the store (disk damage, a bad copy) is refused by
/// restore, fork and revert with an error naming the object, the entry and both sizes, instead
/// of coming back as a file of the wrong size that the stat cache would then vouch for. Nothing
/// is left behind or recorded, and the workspace a revert would have replaced is as it was.
#[test]
fn an_object_of_the_wrong_size_is_refused_and_nothing_changes() {
    let Some(env) = Env::new(FsType::Xfs, "an_object_of_the_wrong_size_is_refused_and_nothing_changes", 512) else {
        return;
    };
    let ws = env.p("ws");
    std::fs::create_dir_all(ws.join("src")).unwrap();
    for i in 0..200 {
        std::fs::write(ws.join(format!("src/f{i}.txt")), format!("file {i}\n")).unwrap();
    }
    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 + i / 253) as u8).collect();
    std::fs::write(ws.join("src/data.bin"), &data).unwrap();
    let c = workspace::checkpoint(&env.store, &ws, Some("base")).unwrap();
    // The workspace moves on after the checkpoint: a failed revert must keep these edits.
    std::fs::write(ws.join("src/data.bin"), b"edited after the checkpoint").unwrap();
    std::fs::write(ws.join("new.txt"), b"new").unwrap();
    let before = common::snapshot(&ws);
    let (_, log_before) = workspace::log(&env.store, &ws).unwrap();
    let id = blake3::hash(&data);
    let obj = env.store.file_object_path(&snapfork_store::Hash(*id.as_bytes()));
    assert!(obj.exists(), "no object {}", obj.display());

    for (damage, len) in [("truncated", 4096u64), ("extended", data.len() as u64 + 1)] {
        std::fs::OpenOptions::new().write(true).open(&obj).unwrap().set_len(len).unwrap();
        let refused = |what: &str, r: snapfork_fsfork::Result<()>| {
            let err = r.expect_err(&format!("{what} of a checkpoint whose object is {damage} succeeded"));
            let msg = err.to_string();
            assert!(
                matches!(
                    &err,
                    snapfork_fsfork::Error::CorruptObject { id: i, path, expected, actual, .. }
                        if *i == id.to_hex().as_str() && path == Path::new("src/data.bin")
                            && *expected == data.len() as u64 && *actual == len
                ),
                "{what}, object {damage}: {err:?}"
            );
            for part in [id.to_hex().as_str(), "src/data.bin", &len.to_string(), &data.len().to_string()] {
                assert!(msg.contains(part), "{what}, object {damage}: {part:?} not in {msg:?}");
            }
        };
        let dst = env.p(&format!("restored-{damage}"));
        refused("restore", workspace::restore(&env.store, &c.id, &dst).map(drop));
        assert!(!dst.exists(), "a refused restore left a tree");
        let into = env.p(&format!("forks-{damage}"));
        refused("fork", workspace::fork(&env.store, &c.id, 1, &into).map(drop));
        assert!(!into.join("fork-1").exists(), "a refused fork left a tree");
        refused("revert", workspace::revert(&env.store, &ws, &c.id).map(drop));
        common::assert_same(&before, &common::snapshot(&ws));
        // No side tree of the revert is left beside the workspace.
        let mut beside: Vec<String> = std::fs::read_dir(env.fs.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into())
            .collect();
        beside.sort();
        let mut want = vec!["store".to_string(), "ws".to_string(), "forks-truncated".to_string()];
        if damage == "extended" {
            want.push("forks-extended".into());
        }
        want.sort();
        assert_eq!(beside, want);
        // Nothing was recorded: no offspring of the checkpoint, no revert in the history.
        assert!(workspace::offspring(&env.store, &c.id).unwrap().is_empty());
        let (_, log) = workspace::log(&env.store, &ws).unwrap();
        assert_eq!(format!("{log:?}"), format!("{log_before:?}"));
    }

    // With the object as it was, the same checkpoint restores (only a wrong size is refused).
    std::fs::write(&obj, &data).unwrap();
    let dst = env.p("restored");
    workspace::restore(&env.store, &c.id, &dst).unwrap();
    assert_eq!(std::fs::read(dst.join("src/data.bin")).unwrap(), data);
    assert_eq!(std::fs::read_to_string(dst.join("src/f7.txt")).unwrap(), "file 7\n");
}

/// The store, except that nothing can be committed any more (a disk that filled up, a store
/// gone read-only): what a revert meets after it swapped the tree in.
struct CannotCommit<'a>(&'a snapfork_store::Store);

impl Repo for CannotCommit<'_> {
    fn root_dir(&self) -> PathBuf {
        Repo::root_dir(self.0)
    }
    fn staging_dir(&self) -> PathBuf {
        Repo::staging_dir(self.0)
    }
    fn file_object_path(&self, id: &Id) -> PathBuf {
        Repo::file_object_path(self.0, id)
    }
    fn has_file_object(&self, id: &Id) -> snapfork_fsfork::Result<bool> {
        Repo::has_file_object(self.0, id)
    }
    fn contains(&self, id: &Id) -> snapfork_fsfork::Result<bool> {
        Repo::contains(self.0, id)
    }
    fn get_node(&self, id: &Id) -> snapfork_fsfork::Result<NodeData> {
        Repo::get_node(self.0, id)
    }
    fn get_ref(&self, name: &str) -> snapfork_fsfork::Result<Option<Id>> {
        Repo::get_ref(self.0, name)
    }
    fn list_refs(&self, prefix: &str) -> snapfork_fsfork::Result<Vec<(String, Id)>> {
        Repo::list_refs(self.0, prefix)
    }
    fn resolve(&self, name_or_hex: &str) -> snapfork_fsfork::Result<Option<Id>> {
        Repo::resolve(self.0, name_or_hex)
    }
    fn meta_get(&self, key: &str) -> snapfork_fsfork::Result<Option<Vec<u8>>> {
        Repo::meta_get(self.0, key)
    }
    fn meta_list(&self, prefix: &str) -> snapfork_fsfork::Result<Vec<(String, Vec<u8>)>> {
        Repo::meta_list(self.0, prefix)
    }
    fn meta_put(&self, _key: &str, _value: &[u8]) -> snapfork_fsfork::Result<()> {
        Err(snapfork_store::Error::ReadOnly.into())
    }
    fn begin(&self) -> snapfork_fsfork::Result<Box<dyn RepoTx + '_>> {
        Err(snapfork_store::Error::ReadOnly.into())
    }
}

#[test]
fn a_revert_the_store_cannot_record_is_undone() {
    let Some(env) = Env::new(FsType::Xfs, "a_revert_the_store_cannot_record_is_undone", 512) else {
        return;
    };
    let ws = env.p("ws");
    std::fs::create_dir_all(ws.join("src")).unwrap();
    std::fs::write(ws.join("src/a.txt"), "version 1").unwrap();
    let c = workspace::checkpoint(&env.store, &ws, Some("v1")).unwrap();
    std::fs::write(ws.join("src/a.txt"), "version 2").unwrap();
    std::fs::write(ws.join("b.txt"), "new").unwrap();
    let before = common::snapshot(&ws);
    let (_, log_before) = workspace::log(&env.store, &ws).unwrap();
    let err = workspace::revert(&CannotCommit(&env.store), &ws, &c.id).unwrap_err();
    eprintln!("revert that cannot be recorded: {err}");
    // The workspace is as it was, nothing is left beside it, and the log does not show a revert.
    common::assert_same(&before, &common::snapshot(&ws));
    let beside: Vec<_> = std::fs::read_dir(ws.parent().unwrap())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("snapfork-revert"))
        .collect();
    assert!(beside.is_empty(), "{beside:?}");
    assert_eq!(workspace::log(&env.store, &ws).unwrap().1.len(), log_before.len());
    // The same revert against the store itself goes through.
    workspace::revert(&env.store, &ws, &c.id).unwrap();
    assert_eq!(std::fs::read_to_string(ws.join("src/a.txt")).unwrap(), "version 1");
}

/// A file's id and a memory page's id are both the blake3 of the bytes. A workspace file equal
/// to a page (or a small blob) the store already holds still becomes a file object of its own:
/// restore reads files from file objects.
#[test]
fn a_file_with_the_bytes_of_a_stored_page_still_restores() {
    let Some(env) = Env::new(FsType::Ext4, "a_file_with_the_bytes_of_a_stored_page_still_restores", 256) else {
        return;
    };
    let page: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let image = env.p("mem.raw");
    std::fs::write(&image, [&page[..], &page[..]].concat()).unwrap();
    env.store.ingest_image(&image, &snapfork_store::IngestOptions::default(), Some("mem")).unwrap();
    let ws = env.p("ws");
    std::fs::create_dir(&ws).unwrap();
    std::fs::write(ws.join("page.bin"), &page).unwrap();
    let c1 = workspace::checkpoint(&env.store, &ws, None).unwrap();
    assert_eq!(c1.new_objects, 1, "{c1:?}");
    // A second checkpoint takes the file from the stat cache: still the file object.
    std::fs::write(ws.join("other"), b"x").unwrap();
    let c2 = workspace::checkpoint(&env.store, &ws, None).unwrap();
    for (n, c) in [(1, &c1), (2, &c2)] {
        let dst = env.p(&format!("restored{n}"));
        workspace::restore(&env.store, &c.id, &dst).unwrap();
        assert_eq!(std::fs::read(dst.join("page.bin")).unwrap(), page, "checkpoint {n}");
    }
}

/// A filesystem mounted inside a workspace would move away with the old tree in a revert, and
/// the removal of the old tree would delete its files: the revert is refused, nothing changes.
#[test]
fn a_revert_refuses_a_workspace_with_a_mount_inside() {
    let Some(env) = Env::new(FsType::Ext4, "a_revert_refuses_a_workspace_with_a_mount_inside", 256) else {
        return;
    };
    let ws = env.p("ws");
    std::fs::create_dir_all(ws.join("data")).unwrap();
    std::fs::write(ws.join("a.txt"), "v1").unwrap();
    let c = workspace::checkpoint(&env.store, &ws, None).unwrap();
    std::fs::write(ws.join("a.txt"), "v2").unwrap();
    // A bind mount of a directory on the same filesystem: the same st_dev as the workspace.
    let elsewhere = env.p("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::fs::write(elsewhere.join("precious"), "keep me").unwrap();
    let st = Command::new("mount").arg("--bind").arg(&elsewhere).arg(ws.join("data")).status().unwrap();
    assert!(st.success(), "bind mount");
    let err = workspace::revert(&env.store, &ws, &c.id);
    let unmounted = Command::new("umount").arg(ws.join("data")).status().unwrap();
    let err = err.expect_err("a revert over a mount point").to_string();
    assert!(unmounted.success(), "the mount stayed where it was");
    assert!(err.contains("mount point") && err.contains("data"), "{err}");
    assert_eq!(std::fs::read_to_string(elsewhere.join("precious")).unwrap(), "keep me");
    assert_eq!(std::fs::read_to_string(ws.join("a.txt")).unwrap(), "v2");
    // Unmounted, the same revert goes through.
    workspace::revert(&env.store, &ws, &c.id).unwrap();
    assert_eq!(std::fs::read_to_string(ws.join("a.txt")).unwrap(), "v1");
}

/// The names of a hard-linked file share one inode and its xattrs. Whichever name a later walk
/// meets first (here, after its directory was renamed, a name that came second before) records
/// them: the restored inode keeps its xattrs.
#[test]
fn hard_linked_files_keep_their_xattrs_whichever_name_comes_first() {
    let Some(env) = Env::new(FsType::Ext4, "hard_linked_files_keep_their_xattrs_whichever_name_comes_first", 256)
    else {
        return;
    };
    let ws = env.p("ws");
    std::fs::create_dir_all(ws.join("a")).unwrap();
    std::fs::create_dir_all(ws.join("b")).unwrap();
    std::fs::write(ws.join("a/x"), "linked").unwrap();
    std::fs::hard_link(ws.join("a/x"), ws.join("b/y")).unwrap();
    common::setxattr(&ws.join("a/x"), "user.tag", b"kept");
    workspace::checkpoint(&env.store, &ws, None).unwrap();
    // A rename of the directory changes neither inode: `b/y` now comes first, from the cache.
    std::fs::rename(ws.join("a"), ws.join("z")).unwrap();
    let before = common::snapshot(&ws);
    let c = workspace::checkpoint(&env.store, &ws, None).unwrap();
    let dst = env.p("restored");
    workspace::restore(&env.store, &c.id, &dst).unwrap();
    common::assert_same(&before, &common::snapshot(&dst));
    let d = workspace::diff(&env.store, Side::Checkpoint(c.id), Side::Dir(&ws)).unwrap();
    assert!(d.changed.is_empty(), "{d:?}");
    // The restored tree, checkpointed from its seeded cache, records them too.
    let c2 = workspace::checkpoint(&env.store, &dst, None).unwrap();
    let again = env.p("again");
    workspace::restore(&env.store, &c2.id, &again).unwrap();
    common::assert_same(&before, &common::snapshot(&again));
}
