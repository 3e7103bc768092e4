//! Helpers shared by the fsfork integration tests: a tree with every kind of entry and
//! metadata, and a tree walk that compares every field.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr, OsString};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A non-UTF-8 file name.
pub fn latin1_name() -> OsString {
    OsString::from_vec(b"caf\xe9-\xff.txt".to_vec())
}

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

/// Sets atime and mtime with nanoseconds, not following symlinks.
pub fn set_times(p: &Path, sec: i64, nsec: i64) {
    let ts = [libc::timespec { tv_sec: sec - 1000, tv_nsec: nsec / 2 }, libc::timespec { tv_sec: sec, tv_nsec: nsec }];
    // SAFETY: valid path and two timespecs.
    let r = unsafe { libc::utimensat(libc::AT_FDCWD, c(p).as_ptr(), ts.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) };
    assert_eq!(r, 0, "utimensat {}", p.display());
}

pub fn lchown(p: &Path, uid: u32, gid: u32) {
    // SAFETY: valid path.
    assert_eq!(unsafe { libc::lchown(c(p).as_ptr(), uid, gid) }, 0, "lchown {}", p.display());
}

pub fn mknod(p: &Path, mode: u32, dev: u64) {
    // SAFETY: valid path.
    assert_eq!(unsafe { libc::mknod(c(p).as_ptr(), mode, dev) }, 0, "mknod {}", p.display());
}

pub fn setxattr(p: &Path, name: &str, value: &[u8]) {
    let n = CString::new(name).unwrap();
    // SAFETY: valid strings and buffer.
    let r = unsafe { libc::lsetxattr(c(p).as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    assert_eq!(r, 0, "setxattr {} {name}: {}", p.display(), std::io::Error::last_os_error());
}

/// Writes `data` at `offset` of a file, creating it.
pub fn write_at(p: &Path, offset: u64, data: &[u8]) {
    let mut f = std::fs::OpenOptions::new().create(true).write(true).truncate(false).open(p).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(data).unwrap();
}

/// Builds a tree holding every kind of entry and metadata the clone must keep. `outside` is a
/// directory outside the tree that symlinks point into.
pub fn build_rich_tree(root: &Path, outside: &Path) {
    std::fs::create_dir_all(root.join("src/deep/er/est")).unwrap();
    std::fs::create_dir_all(root.join("empty-dir")).unwrap();
    std::fs::write(root.join("src/main.rs"), b"fn main() { println!(\"hi\"); }\n").unwrap();
    std::fs::write(root.join("src/deep/er/est/leaf.txt"), vec![b'x'; 70_000]).unwrap();
    std::fs::write(root.join("empty-file"), b"").unwrap();
    // Permissions, including setuid/setgid/sticky.
    std::fs::write(root.join("setuid-bin"), b"#!/bin/sh\n").unwrap();
    std::fs::write(root.join("secret"), b"0600\n").unwrap();
    // Non-UTF-8 name.
    std::fs::write(root.join(latin1_name()), b"latin1\n").unwrap();
    std::fs::create_dir(root.join(OsStr::from_bytes(b"dir-\x80\x81"))).unwrap();
    std::fs::write(root.join(OsStr::from_bytes(b"dir-\x80\x81")).join("inner"), b"in\n").unwrap();
    // A sparse file: 64 MiB with data at 3 places.
    let sparse = root.join("disk.img");
    write_at(&sparse, 0, &[1u8; 4096]);
    write_at(&sparse, 20 << 20, &[2u8; 8192]);
    write_at(&sparse, (64 << 20) - 4096, &[3u8; 4096]);
    // Hard links, within a directory and across directories.
    std::fs::write(root.join("hl-a"), b"hard link\n").unwrap();
    std::fs::hard_link(root.join("hl-a"), root.join("hl-b")).unwrap();
    std::fs::hard_link(root.join("hl-a"), root.join("src/deep/hl-c")).unwrap();
    // Symlinks: relative inside, absolute outside, relative escaping, dangling, to a directory
    // outside (which must never be walked).
    std::os::unix::fs::symlink("main.rs", root.join("src/link-in")).unwrap();
    std::os::unix::fs::symlink(outside.join("target.txt"), root.join("link-out-abs")).unwrap();
    std::os::unix::fs::symlink("../../../../../../../../etc/passwd", root.join("link-escape")).unwrap();
    std::os::unix::fs::symlink("does/not/exist", root.join("link-dangling")).unwrap();
    std::os::unix::fs::symlink(outside, root.join("link-outside-dir")).unwrap();
    std::os::unix::fs::symlink(OsStr::from_bytes(b"\xfe\xfftarget"), root.join("link-nonutf8")).unwrap();
    // Special files.
    mknod(&root.join("fifo"), libc::S_IFIFO | 0o640, 0);
    mknod(&root.join("socket"), libc::S_IFSOCK | 0o755, 0);
    mknod(&root.join("null-dev"), libc::S_IFCHR | 0o666, libc::makedev(1, 3));
    mknod(&root.join("blk-dev"), libc::S_IFBLK | 0o660, libc::makedev(7, 200));
    // Extended attributes on a file, a directory.
    setxattr(&root.join("src/main.rs"), "user.origin", b"test\0binary\xff");
    setxattr(&root.join("src"), "user.dir", b"yes");
    setxattr(&root.join("setuid-bin"), "trusted.t", b"trusted");
    // Owners.
    lchown(&root.join("src/main.rs"), 1234, 5678);
    lchown(&root.join("link-out-abs"), 4321, 8765);
    lchown(&root.join("empty-dir"), 42, 43);
    lchown(&root.join("fifo"), 7, 8);
    // Modes after chown (chown clears setuid).
    std::fs::set_permissions(root.join("setuid-bin"), std::fs::Permissions::from_mode(0o4755)).unwrap();
    std::fs::set_permissions(root.join("secret"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(root.join("empty-dir"), std::fs::Permissions::from_mode(0o3775)).unwrap();
    std::fs::set_permissions(root.join("src/deep"), std::fs::Permissions::from_mode(0o1777)).unwrap();
    // Distinct times everywhere, directories last (creating entries changes them).
    let mut all: Vec<PathBuf> = walk_paths(root);
    all.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for (i, p) in all.iter().enumerate() {
        set_times(p, 1_600_000_000 + i as i64 * 1000, 123_456_789 + i as i64);
    }
    set_times(root, 1_500_000_000, 1);
}

/// Every path below `root` (not following symlinks).
pub fn walk_paths(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let md = std::fs::symlink_metadata(&p).unwrap();
            if md.is_dir() {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out
}

/// What a tree walk records of one entry: every field a clone must keep.
#[derive(Debug, PartialEq, Eq, Clone)]
pub struct Snap {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub atime: (i64, i64),
    pub mtime: (i64, i64),
    pub rdev: u64,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    pub link: Option<Vec<u8>>,
    pub content: Option<[u8; 32]>,
    /// Paths (relative) of the other names of the same inode.
    pub hardlinks: Vec<Vec<u8>>,
}

fn xattrs(p: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let cp = c(p);
    let mut names = vec![0u8; 4096];
    // SAFETY: valid path and buffer.
    let n = unsafe { libc::llistxattr(cp.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(n >= 0, "llistxattr {}", p.display());
    let mut out = Vec::new();
    for name in names[..n as usize].split(|&b| b == 0).filter(|s| !s.is_empty()) {
        let cn = CString::new(name).unwrap();
        let mut v = vec![0u8; 65536];
        // SAFETY: valid strings and buffer.
        let m = unsafe { libc::lgetxattr(cp.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        assert!(m >= 0);
        v.truncate(m as usize);
        out.push((name.to_vec(), v));
    }
    out.sort();
    out
}

/// Walks a tree and records every entry (the root itself under the empty path).
pub fn snapshot(root: &Path) -> BTreeMap<Vec<u8>, Snap> {
    let mut out = BTreeMap::new();
    let mut by_ino: BTreeMap<u64, Vec<Vec<u8>>> = BTreeMap::new();
    let mut paths = walk_paths(root);
    paths.push(root.to_path_buf());
    for p in paths {
        let rel = p.strip_prefix(root).unwrap().as_os_str().as_bytes().to_vec();
        let md = std::fs::symlink_metadata(&p).unwrap();
        let ft = md.file_type();
        let link = ft.is_symlink().then(|| std::fs::read_link(&p).unwrap().into_os_string().into_vec());
        let content = ft.is_file().then(|| {
            let mut h = blake3::Hasher::new();
            let mut f = std::fs::File::open(&p).unwrap();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = f.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
            *h.finalize().as_bytes()
        });
        if ft.is_file() && md.nlink() > 1 {
            by_ino.entry(md.ino()).or_default().push(rel.clone());
        }
        out.insert(
            rel,
            Snap {
                mode: md.mode(),
                uid: md.uid(),
                gid: md.gid(),
                size: if ft.is_dir() { 0 } else { md.size() },
                atime: (md.atime(), md.atime_nsec()),
                mtime: (md.mtime(), md.mtime_nsec()),
                rdev: md.rdev(),
                xattrs: if ft.is_symlink() { Vec::new() } else { xattrs(&p) },
                link,
                content,
                hardlinks: Vec::new(),
            },
        );
    }
    for (_, mut names) in by_ino {
        names.sort();
        for n in &names {
            let others: Vec<Vec<u8>> = names.iter().filter(|o| *o != n).cloned().collect();
            out.get_mut(n).unwrap().hardlinks = others;
        }
    }
    out
}

/// Asserts two walks are equal field by field, naming the first difference.
pub fn assert_same(a: &BTreeMap<Vec<u8>, Snap>, b: &BTreeMap<Vec<u8>, Snap>) {
    let ka: Vec<_> = a.keys().map(|k| String::from_utf8_lossy(k).into_owned()).collect();
    let kb: Vec<_> = b.keys().map(|k| String::from_utf8_lossy(k).into_owned()).collect();
    assert_eq!(ka, kb, "different entries");
    for (k, va) in a {
        assert_eq!(Some(va), b.get(k), "entry {:?} differs", String::from_utf8_lossy(k));
    }
}

/// Allocated bytes of a file.
pub fn allocated(p: &Path) -> u64 {
    std::fs::symlink_metadata(p).unwrap().blocks() * 512
}

/// A scratch directory for one test on the root filesystem.
pub fn scratch(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("fsfork-{name}-{}-{}", std::process::id(), rand::random::<u64>()));
    std::fs::create_dir_all(&p).unwrap();
    p
}
