//! Filesystem forks: checkpoint, fork, revert and diff workspace trees and disk images with
//! reflinks.
//!
//! - [`clone`]: FICLONE of files and whole trees (metadata, hard links, symlinks as links,
//!   special files), falling back to a sparse-aware copy where reflinks are impossible.
//! - [`walk`]: a tree walk that never follows symlinks below its root.
//! - [`hash`]: BLAKE3 content ids, recomputed only for the blocks of a large file that no
//!   longer share extents with its previous version.

pub mod clone;
pub mod dirfds;
pub mod error;
pub mod hash;
pub mod manifest;
pub mod repo;
pub mod statcache;
mod store_impl;
pub mod sys;
#[cfg(feature = "testfs")]
pub mod testfs;
pub mod walk;
pub mod workspace;

pub use clone::{CloneOptions, CloneReport, CopyMode, clone_file, clone_tree};
pub use error::{Error, Result};
