//! Directory descriptors for trees larger than the open-file limit: up to a budget they stay
//! open; beyond it a directory is reopened on demand by walking down from its nearest open
//! ancestor, one `O_NOFOLLOW | O_DIRECTORY` component at a time (so a reopen can never leave
//! the tree through a symlink either).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::sys;

/// A directory descriptor, borrowed from the table or opened for this use only.
#[derive(Debug)]
pub enum FdRef<'a> {
    /// Kept open by the table.
    Borrowed(BorrowedFd<'a>),
    /// Reopened for this use.
    Owned(OwnedFd),
}

impl FdRef<'_> {
    /// The descriptor.
    pub fn fd(&self) -> BorrowedFd<'_> {
        match self {
            FdRef::Borrowed(b) => *b,
            FdRef::Owned(o) => o.as_fd(),
        }
    }
}

/// How many directory descriptors one table may keep open: half of what is left of the
/// open-file limit after raising it (a clone holds a source and a destination table).
pub fn budget() -> usize {
    sys::raise_nofile_limit();
    ((sys::nofile_limit() as usize).saturating_sub(512) / 2).max(16)
}

/// Directories of one tree: index 0 is the root, every other one has a parent and a name.
#[derive(Debug)]
pub struct DirTable {
    links: Vec<(usize, CString)>,
    fds: Vec<Option<OwnedFd>>,
    kept: usize,
    budget: usize,
}

impl DirTable {
    /// A table whose root is `root`.
    pub fn new(root: OwnedFd, budget: usize) -> DirTable {
        DirTable { links: vec![(usize::MAX, CString::default())], fds: vec![Some(root)], kept: 1, budget }
    }

    /// Adds directory `name` under `parent`, keeping `fd` open if the budget allows; returns its
    /// index.
    pub fn push(&mut self, parent: usize, name: CString, fd: Option<OwnedFd>) -> usize {
        self.links.push((parent, name));
        self.fds.push(None);
        let i = self.fds.len() - 1;
        if let Some(fd) = fd {
            self.keep(i, fd);
        }
        i
    }

    /// Keeps `fd` as the descriptor of directory `i` if the budget allows.
    pub fn keep(&mut self, i: usize, fd: OwnedFd) {
        if self.fds[i].is_none() && self.kept < self.budget {
            self.fds[i] = Some(fd);
            self.kept += 1;
        }
    }

    /// Whether directory `i` has a descriptor kept open.
    pub fn is_open(&self, i: usize) -> bool {
        self.fds[i].is_some()
    }

    /// A descriptor of directory `i`.
    pub fn get(&self, i: usize) -> io::Result<FdRef<'_>> {
        if let Some(fd) = &self.fds[i] {
            return Ok(FdRef::Borrowed(fd.as_fd()));
        }
        let mut chain = Vec::new();
        let mut j = i;
        while self.fds[j].is_none() {
            chain.push(j);
            j = self.links[j].0;
        }
        let mut cur = FdRef::Borrowed(
            self.fds[j].as_ref().map(|f| f.as_fd()).ok_or_else(|| io::Error::other("no root descriptor"))?,
        );
        for &k in chain.iter().rev() {
            let fd = sys::open_dir_at(cur.fd(), &self.links[k].1)?;
            cur = FdRef::Owned(fd);
        }
        Ok(cur)
    }
}
