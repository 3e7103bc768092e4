//! Walking a tree without following symlinks: every directory is opened relative to its parent's
//! descriptor with `O_NOFOLLOW | O_DIRECTORY`, so a symlink can never redirect the walk.

use std::ffi::{CStr, CString, OsStr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::dirfds::{self, DirTable, FdRef};
use crate::error::{Error, IoContext, Result};
use crate::sys::{self, Time};

/// What kind of entry a tree holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A directory.
    Dir,
    /// A regular file.
    File,
    /// A symbolic link (kept as a link, never followed).
    Symlink,
    /// A named pipe.
    Fifo,
    /// A Unix socket (recreated as a socket inode; no listener comes with it).
    Socket,
    /// A character device node.
    CharDevice,
    /// A block device node.
    BlockDevice,
}

impl Kind {
    /// The kind of an `st_mode`.
    pub fn from_mode(mode: u32) -> Kind {
        match mode & libc::S_IFMT {
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            libc::S_IFCHR => Kind::CharDevice,
            libc::S_IFBLK => Kind::BlockDevice,
            _ => Kind::File,
        }
    }

    /// The on-disk code used in manifests.
    pub fn code(self) -> u8 {
        match self {
            Kind::Dir => 1,
            Kind::File => 2,
            Kind::Symlink => 3,
            Kind::Fifo => 4,
            Kind::Socket => 5,
            Kind::CharDevice => 6,
            Kind::BlockDevice => 7,
        }
    }

    /// The kind of a manifest code.
    pub fn from_code(c: u8) -> Option<Kind> {
        Some(match c {
            1 => Kind::Dir,
            2 => Kind::File,
            3 => Kind::Symlink,
            4 => Kind::Fifo,
            5 => Kind::Socket,
            6 => Kind::CharDevice,
            7 => Kind::BlockDevice,
            _ => return None,
        })
    }
}

/// The metadata of one entry, as `lstat` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Meta {
    /// Full `st_mode` (type and permission bits).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size in bytes.
    pub size: u64,
    /// Last access.
    pub atime: Time,
    /// Last modification.
    pub mtime: Time,
    /// Last status change (cannot be set; used by the stat cache).
    pub ctime: Time,
    /// Inode number.
    pub ino: u64,
    /// Device of the filesystem.
    pub dev: u64,
    /// Number of hard links.
    pub nlink: u64,
    /// Device number of a device node.
    pub rdev: u64,
    /// 512-byte blocks allocated.
    pub blocks: u64,
}

impl Meta {
    /// Converts a `struct stat`.
    pub fn from_stat(st: &libc::stat) -> Meta {
        Meta {
            mode: st.st_mode,
            uid: st.st_uid,
            gid: st.st_gid,
            size: st.st_size as u64,
            atime: Time { sec: st.st_atime, nsec: st.st_atime_nsec as u32 },
            mtime: Time { sec: st.st_mtime, nsec: st.st_mtime_nsec as u32 },
            ctime: Time { sec: st.st_ctime, nsec: st.st_ctime_nsec as u32 },
            ino: st.st_ino,
            dev: st.st_dev,
            nlink: st.st_nlink,
            rdev: st.st_rdev,
            blocks: st.st_blocks as u64,
        }
    }

    /// The kind of entry.
    pub fn kind(&self) -> Kind {
        Kind::from_mode(self.mode)
    }

    /// Permission bits including setuid, setgid and sticky.
    pub fn perm(&self) -> u32 {
        self.mode & 0o7777
    }
}

/// A directory found by a walk.
#[derive(Debug)]
pub struct Dir {
    /// Index of the parent directory (`None` for the root).
    pub parent: Option<usize>,
    /// Name in the parent (empty for the root).
    pub name: CString,
    /// Path relative to the root.
    pub rel: PathBuf,
    /// Its metadata.
    pub meta: Meta,
}

/// A non-directory entry found by a walk (directories other than the root also appear here,
/// with `subdir` set, so that every directory's listing is complete).
#[derive(Debug)]
pub struct Entry {
    /// Index of the directory holding it.
    pub dir: usize,
    /// Its name in that directory (any bytes but `/` and NUL).
    pub name: CString,
    /// Its metadata.
    pub meta: Meta,
    /// For a directory, its index in [`Scan::dirs`].
    pub subdir: Option<usize>,
}

impl Entry {
    /// The name as an `OsStr`.
    pub fn name_os(&self) -> &OsStr {
        OsStr::from_bytes(self.name.to_bytes())
    }
}

/// The result of walking a tree.
#[derive(Debug)]
pub struct Scan {
    /// Directories, parents before children; `dirs[0]` is the root.
    pub dirs: Vec<Dir>,
    /// Every entry below the root, grouped by directory in walk order.
    pub entries: Vec<Entry>,
    /// Descriptors of the directories (kept open up to a budget, reopened beyond it).
    pub fds: DirTable,
}

impl Scan {
    /// The path of an entry relative to the root.
    pub fn rel_path(&self, e: &Entry) -> PathBuf {
        self.dirs[e.dir].rel.join(e.name_os())
    }

    /// A descriptor of directory `i` (O_RDONLY | O_DIRECTORY).
    pub fn dir_fd(&self, i: usize) -> std::io::Result<FdRef<'_>> {
        self.fds.get(i)
    }
}

/// Walks the tree at `root` (which must be a directory; a symlink to one is accepted for the
/// root only, as `cp -a` accepts it for its operand). Nothing below the root is followed.
pub fn scan(root: &Path) -> Result<Scan> {
    scan_excluding(root, None)
}

/// Like [`scan`], leaving out the directory whose (device, inode) is `exclude` (the store's own
/// directory when it lies inside a workspace) and everything below it.
pub fn scan_excluding(root: &Path, exclude: Option<(u64, u64)>) -> Result<Scan> {
    let fd = sys::open_root_dir(root).ctx("open", root)?;
    let st = sys::fstat(fd.as_fd()).ctx("stat", root)?;
    let mut dirs =
        vec![Dir { parent: None, name: CString::default(), rel: PathBuf::new(), meta: Meta::from_stat(&st) }];
    let mut fds = DirTable::new(fd, dirfds::budget());
    let mut entries = Vec::new();
    // Level by level: the directories of one level are listed and stat'ed in parallel, then
    // appended in order, so the result is the same as a sequential breadth-first walk.
    let mut level: Vec<usize> = vec![0];
    while !level.is_empty() {
        let listed: Vec<Result<(Option<OwnedFd>, Vec<Found>)>> = level
            .par_iter()
            .map(|&i| {
                let path = || root.join(&dirs[i].rel);
                let fd = match fds.get(i) {
                    Ok(fd) => fd,
                    // Only an empty directory can be removed: one gone since its parent was
                    // listed was empty at that moment, and is recorded so.
                    Err(e) if i != 0 && e.raw_os_error() == Some(libc::ENOENT) => return Ok((None, Vec::new())),
                    Err(e) => return Err(Error::io("open", path(), e)),
                };
                let found = list_dir(root, &dirs[i], fd.fd(), exclude)?;
                Ok((
                    match fd {
                        FdRef::Owned(o) => Some(o),
                        FdRef::Borrowed(_) => None,
                    },
                    found,
                ))
            })
            .collect();
        let mut next = Vec::new();
        for (&i, listed) in level.iter().zip(listed) {
            let (opened, found) = listed?;
            if let Some(fd) = opened {
                // Kept for the consumers of the walk if the budget allows.
                fds.keep(i, fd);
            }
            for f in found {
                let subdir = if f.meta.kind() == Kind::Dir {
                    let rel = dirs[i].rel.join(OsStr::from_bytes(f.name.to_bytes()));
                    dirs.push(Dir { parent: Some(i), name: f.name.clone(), rel, meta: f.meta });
                    let d = fds.push(i, f.name.clone(), None);
                    debug_assert_eq!(d, dirs.len() - 1);
                    next.push(d);
                    Some(d)
                } else {
                    None
                };
                entries.push(Entry { dir: i, name: f.name, meta: f.meta, subdir });
            }
        }
        level = next;
    }
    Ok(Scan { dirs, entries, fds })
}

/// One entry found in a directory listing.
struct Found {
    name: CString,
    meta: Meta,
}

/// Lists one directory, sorted by name bytes, with every entry stat'ed (not followed).
/// Entries that vanish meanwhile are simply not part of the tree; a directory removed
/// meanwhile lists as empty.
fn list_dir(root: &Path, dir: &Dir, fd: BorrowedFd<'_>, exclude: Option<(u64, u64)>) -> Result<Vec<Found>> {
    let mut names = match sys::read_dir(fd) {
        Ok(names) => names,
        // Removed while listed (the kernel refuses to list a dead directory): it was empty.
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("read directory", root.join(&dir.rel), e)),
    };
    // Sorted by name bytes: deterministic manifests and walk order.
    names.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut out = Vec::with_capacity(names.len());
    for (name, _dtype) in names {
        let st = match sys::lstatat(fd, &name) {
            Ok(st) => st,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => {
                return Err(Error::io("stat", root.join(&dir.rel).join(OsStr::from_bytes(name.to_bytes())), e));
            }
        };
        let meta = Meta::from_stat(&st);
        if exclude == Some((meta.dev, meta.ino)) {
            continue;
        }
        out.push(Found { name, meta });
    }
    Ok(out)
}

/// Reads the extended attributes of an entry without following it.
pub fn entry_xattrs(dir: BorrowedFd<'_>, name: &CStr) -> std::io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let p = sys::proc_path(dir, name);
    sys::read_xattrs(sys::XattrTarget::Path(&p))
}
