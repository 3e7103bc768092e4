//! Tree and file clones on real, loop-mounted XFS, btrfs and ext4.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use snapfork_fsfork::testfs::{FsType, TestFs, require_root};
use snapfork_fsfork::{CloneOptions, CopyMode, clone_file, clone_tree};

fn fs(kind: FsType, test: &str) -> Option<TestFs> {
    if !require_root(test) {
        return None;
    }
    Some(TestFs::new(kind, 512).expect("make test filesystem"))
}

fn clone_keeps_everything(kind: FsType) {
    let Some(fs) = fs(kind, "clone_keeps_everything") else {
        return;
    };
    let outside = fs.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("target.txt"), b"outside, never to be touched\n").unwrap();
    let before_outside = common::snapshot(&outside);
    let src = fs.path().join("src-tree");
    common::build_rich_tree(&src, &outside);
    let before = common::snapshot(&src);

    let dst = fs.path().join("clone");
    let report = clone_tree(&src, &dst, &CloneOptions::default()).unwrap();
    let expected = if kind.reflinks() { CopyMode::Reflink } else { CopyMode::Copy };
    assert_eq!(report.mode, expected, "{report:?}");
    assert_eq!(report.hardlinks, 2);
    assert_eq!(report.special, 4);
    assert!(report.skipped.is_empty());
    assert_eq!(report.xattr_failures, 0);

    common::assert_same(&before, &common::snapshot(&src));
    common::assert_same(&before, &common::snapshot(&dst));
    // Nothing outside the destination was touched, and the symlinked directory was not walked.
    common::assert_same(&before_outside, &common::snapshot(&outside));
    assert!(std::fs::symlink_metadata(dst.join("link-outside-dir")).unwrap().file_type().is_symlink());
    // Hard links are links inside the clone, not to the source.
    let a = std::fs::metadata(dst.join("hl-a")).unwrap();
    assert_eq!(a.ino(), std::fs::metadata(dst.join("src/deep/hl-c")).unwrap().ino());
    assert_ne!(a.ino(), std::fs::metadata(src.join("hl-a")).unwrap().ino());
    assert_eq!(a.nlink(), 3);
    // Sparse stays sparse: 64 MiB logical, 16 KiB of data.
    let alloc = common::allocated(&dst.join("disk.img"));
    assert!(alloc < 4 << 20, "sparse image became {alloc} bytes allocated");
    // The clone is independent of the source.
    std::fs::write(dst.join("src/main.rs"), b"changed").unwrap();
    assert_eq!(std::fs::read(src.join("src/main.rs")).unwrap(), b"fn main() { println!(\"hi\"); }\n");
    // A clone into an existing destination is refused.
    assert!(matches!(
        clone_tree(&src, &dst, &CloneOptions::default()),
        Err(snapfork_fsfork::Error::DestinationExists(_))
    ));
}

#[test]
fn clone_keeps_everything_xfs() {
    clone_keeps_everything(FsType::Xfs);
}
#[test]
fn clone_keeps_everything_btrfs() {
    clone_keeps_everything(FsType::Btrfs);
}
#[test]
fn clone_keeps_everything_ext4() {
    clone_keeps_everything(FsType::Ext4);
}

fn file_clone_mode(kind: FsType) {
    let Some(fs) = fs(kind, "file_clone_mode") else {
        return;
    };
    let img = fs.path().join("vm.img");
    common::write_at(&img, 0, &[7u8; 65536]);
    common::write_at(&img, 200 << 20, &[9u8; 65536]);
    let copy = fs.path().join("vm2.img");
    let mode = clone_file(&img, &copy).unwrap();
    assert_eq!(mode, if kind.reflinks() { CopyMode::Reflink } else { CopyMode::Copy });
    assert_eq!(std::fs::read(&img).unwrap(), std::fs::read(&copy).unwrap());
    assert!(common::allocated(&copy) < 8 << 20, "copy became dense");
    assert!(matches!(clone_file(&img, &copy), Err(snapfork_fsfork::Error::DestinationExists(_))));
}

#[test]
fn file_clone_mode_xfs() {
    file_clone_mode(FsType::Xfs);
}
#[test]
fn file_clone_mode_btrfs() {
    file_clone_mode(FsType::Btrfs);
}
#[test]
fn file_clone_mode_ext4() {
    file_clone_mode(FsType::Ext4);
}

/// Across filesystems (XFS to ext4) reflinks are impossible: the copy is used and said so.
#[test]
fn clone_across_filesystems_copies_sparse() {
    let Some(xfs) = fs(FsType::Xfs, "clone_across_filesystems_copies_sparse") else {
        return;
    };
    let ext4 = TestFs::new(FsType::Ext4, 512).unwrap();
    let src = xfs.path().join("tree");
    std::fs::create_dir(&src).unwrap();
    common::write_at(&src.join("sparse"), 100 << 20, b"end");
    std::fs::write(src.join("small"), b"small").unwrap();
    let dst = ext4.path().join("tree");
    let r = clone_tree(&src, &dst, &CloneOptions::default()).unwrap();
    assert_eq!(r.mode, CopyMode::Copy);
    assert_eq!(std::fs::metadata(dst.join("sparse")).unwrap().len(), (100 << 20) + 3);
    assert!(common::allocated(&dst.join("sparse")) < 1 << 20);
    assert_eq!(std::fs::read(dst.join("small")).unwrap(), b"small");
}

/// A tree of many files clones with the same result serially and in parallel.
#[test]
fn parallel_and_serial_agree() {
    let Some(fs) = fs(FsType::Xfs, "parallel_and_serial_agree") else {
        return;
    };
    let src = fs.path().join("many");
    for d in 0..20 {
        let dir = src.join(format!("d{d}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..50 {
            std::fs::write(dir.join(format!("f{f}")), format!("{d}/{f}").repeat(f + 1)).unwrap();
        }
    }
    let before = common::snapshot(&src);
    for (name, parallel) in [("par", true), ("ser", false)] {
        let dst = fs.path().join(name);
        let r = clone_tree(&src, &dst, &CloneOptions { parallel }).unwrap();
        assert_eq!(r.files, 1000);
        common::assert_same(&before, &common::snapshot(&dst));
    }
    let _ = Path::new("");
}

/// The harness unmounts and removes its filesystem even when the test panics.
#[test]
fn testfs_cleans_up_on_panic() {
    if !require_root("testfs_cleans_up_on_panic") {
        return;
    }
    let dir = std::sync::Mutex::new(None);
    let r = std::panic::catch_unwind(|| {
        let fs = TestFs::new(FsType::Btrfs, 300).unwrap();
        std::fs::write(fs.path().join("file"), b"data").unwrap();
        *dir.lock().unwrap() = Some(fs.path().to_path_buf());
        panic!("boom");
    });
    assert!(r.is_err());
    let mnt = dir.lock().unwrap().clone().unwrap();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&*mnt.to_string_lossy()), "still mounted");
    assert!(!mnt.parent().unwrap().exists(), "scratch directory left behind");
}

/// More directories than half the default open-file limit (20,000 here): the walk raises the
/// limit (as root, to fs.nr_open) instead of failing.
#[test]
fn clone_tree_with_many_directories() {
    let Some(fs) = fs(FsType::Xfs, "clone_tree_with_many_directories") else {
        return;
    };
    let src = fs.path().join("deep");
    for a in 0..120 {
        for b in 0..100 {
            std::fs::create_dir_all(src.join(format!("a{a}/b{b}"))).unwrap();
        }
        std::fs::write(src.join(format!("a{a}/f")), format!("{a}")).unwrap();
    }
    let dst = fs.path().join("copy");
    let r = clone_tree(&src, &dst, &CloneOptions::default()).unwrap();
    assert_eq!(r.dirs, 1 + 120 + 12_000);
    assert_eq!(r.files, 120);
    assert_eq!(std::fs::read_to_string(dst.join("a77/f")).unwrap(), "77");
    assert!(dst.join("a119/b99").is_dir());
}
