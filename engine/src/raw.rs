//! The raw driver: memory image, state files and disk images of any VMM (Cloud Hypervisor,
//! QEMU, Kata), given as paths. The VMM is run (and paused before a checkpoint) by its owner; the
//! engine stores the files as one snapshot, restores them into a new directory, and writes them
//! back in place on revert.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use snapfork_store::{Hash, IngestOptions, Store, Txn};

use crate::error::{Error, Result};
use crate::model::{Part, PartKind, Role, Snapshot, check_part_name};

/// Files making up a raw sandbox.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RawConfig {
    /// Guest memory image (stored page by page, deduplicated against the parent's).
    #[serde(default)]
    pub memory: Option<PathBuf>,
    /// Runtime state files (stored as chunked blobs).
    #[serde(default)]
    pub state: Vec<PathBuf>,
    /// Disk images (stored page by page; holes stay holes).
    #[serde(default)]
    pub disks: Vec<PathBuf>,
    /// Page size of the memory image.
    #[serde(default = "default_page")]
    pub page_size: u32,
}

fn default_page() -> u32 {
    4096
}

impl RawConfig {
    fn files(&self) -> Vec<(Role, &Path)> {
        let mut v: Vec<(Role, &Path)> = Vec::new();
        if let Some(m) = &self.memory {
            v.push((Role::Memory, m));
        }
        v.extend(self.state.iter().map(|p| (Role::State, p.as_path())));
        v.extend(self.disks.iter().map(|p| (Role::Disk, p.as_path())));
        v
    }

    /// Checks that every file has a distinct plain file name (the names parts are stored under).
    pub fn validate(&self) -> Result<()> {
        let mut names = HashSet::new();
        for (_, p) in self.files() {
            let name = part_name(p)?;
            if !names.insert(name.clone()) {
                return Err(Error::Invalid(format!("raw: two files named {name}")));
            }
        }
        if !self.page_size.is_power_of_two() || self.page_size < 4096 {
            return Err(Error::Invalid(format!("raw: bad page size {}", self.page_size)));
        }
        Ok(())
    }
}

fn part_name(p: &Path) -> Result<String> {
    let name = p
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::Invalid(format!("raw: bad file path {}", p.display())))?
        .to_string();
    check_part_name(&name)?;
    Ok(name)
}

/// Stores every file of `cfg` in `tx`; images are diffed against the same-named part of the
/// parent snapshot (`prev`) so unchanged pages cost nothing.
/// Returns the parts and the bytes they added to the store.
pub fn checkpoint(store: &Store, tx: &mut Txn, cfg: &RawConfig, prev: &[Part]) -> Result<(Vec<Part>, u64)> {
    let _ = store;
    cfg.validate()?;
    let mut parts = Vec::new();
    let mut added = 0;
    for (role, path) in cfg.files() {
        let name = part_name(path)?;
        let size = std::fs::metadata(path).map_err(|e| Error::io(format!("stat {}", path.display()), e))?.len();
        let (kind, id) = match role {
            Role::State => {
                let info = tx.put_blob_file(path)?;
                added += info.new_stored_bytes;
                (PartKind::Blob, info.id)
            }
            _ => {
                let parent = prev
                    .iter()
                    .find(|p| p.role == role && p.name == name && p.kind == PartKind::Image)
                    .and_then(|p| Snapshot::part_id(p).ok());
                let page_size = if role == Role::Memory { cfg.page_size } else { 4096 };
                let opts = IngestOptions { page_size, parent, ..Default::default() };
                let info = tx.ingest_image(path, &opts)?;
                added += info.new_stored_bytes;
                (PartKind::Image, info.id)
            }
        };
        parts.push(Part { role, name, kind, id: id.to_hex(), size });
    }
    Ok((parts, added))
}

/// Writes `part` into a temporary file beside `dest` and syncs it; returns that file. Nothing at
/// `dest` changes.
fn stage_part(store: &Store, part: &Part, dest: &Path) -> Result<PathBuf> {
    let id: Hash = Snapshot::part_id(part)?;
    let tmp = dest.with_file_name(format!(".{}.restore", part.name));
    let r = (|| -> Result<()> {
        match part.kind {
            PartKind::Image => {
                // materialize syncs the file itself.
                store.open_image(&id)?.materialize(&tmp, None)?;
            }
            PartKind::Workspace => return Err(Error::Invalid(format!("{} is a workspace, not a file", part.name))),
            PartKind::Blob => {
                let mut f =
                    std::fs::File::create(&tmp).map_err(|e| Error::io(format!("create {}", tmp.display()), e))?;
                let mut w = std::io::BufWriter::with_capacity(1 << 20, &mut f);
                store.read_blob(&id, &mut w)?;
                std::io::Write::flush(&mut w).map_err(|e| Error::io(format!("write {}", tmp.display()), e))?;
                drop(w);
                f.sync_all().map_err(|e| Error::io(format!("fsync {}", tmp.display()), e))?;
            }
        }
        Ok(())
    })();
    match r {
        Ok(()) => Ok(tmp),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn write_part(store: &Store, part: &Part, dest: &Path) -> Result<()> {
    let tmp = stage_part(store, part, dest)?;
    std::fs::rename(&tmp, dest).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(format!("rename to {}", dest.display()), e)
    })
}

/// Writes every file part into `dir` and returns the config pointing at them.
pub fn materialize(store: &Store, parts: &[Part], dir: &Path) -> Result<RawConfig> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("mkdir {}", dir.display()), e))?;
    let mut cfg = RawConfig { memory: None, state: vec![], disks: vec![], page_size: 4096 };
    for p in parts {
        if p.kind == PartKind::Workspace {
            continue;
        }
        check_part_name(&p.name)?;
        let dest = dir.join(&p.name);
        write_part(store, p, &dest)?;
        crate::engine::sync_dir(dir)?;
        match p.role {
            Role::Memory => {
                cfg.page_size = store.open_image(&Snapshot::part_id(p)?)?.page_size();
                cfg.memory = Some(dest)
            }
            Role::State => cfg.state.push(dest),
            Role::Disk => cfg.disks.push(dest),
            Role::Workspace => {}
        }
    }
    Ok(cfg)
}

/// Writes the snapshot's files back over the paths in `cfg`, all or none: every file is first
/// written in full beside its path, then each is swapped in (RENAME_EXCHANGE, so the old content
/// stays at hand until all are in). A failure at any point leaves every file as it was.
pub fn revert(store: &Store, parts: &[Part], cfg: &RawConfig) -> Result<()> {
    let mut staged: Vec<(PathBuf, &Path)> = Vec::new();
    let remove_staged = |staged: &[(PathBuf, &Path)]| {
        for (tmp, _) in staged {
            let _ = std::fs::remove_file(tmp);
        }
    };
    for (role, path) in cfg.files() {
        let r = part_name(path).and_then(|name| {
            let part = parts
                .iter()
                .find(|p| p.role == role && p.name == name && p.kind != PartKind::Workspace)
                .ok_or_else(|| Error::Invalid(format!("snapshot has no {name}")))?;
            stage_part(store, part, path)
        });
        match r {
            Ok(tmp) => staged.push((tmp, path)),
            Err(e) => {
                remove_staged(&staged);
                return Err(e);
            }
        }
    }
    // Swap each new file in; what was there moves to the staged name. `existed` says which
    // paths had a file (a plain rename put the new one where nothing was).
    let mut swapped: Vec<(&Path, &Path, bool)> = Vec::new();
    // Undone in reverse: the old files go back where they were.
    let undo = |swapped: Vec<(&Path, &Path, bool)>| {
        for (tmp, dest, existed) in swapped.into_iter().rev() {
            let _ = if existed { swap(tmp, dest).map_err(std::io::Error::from) } else { std::fs::rename(dest, tmp) };
        }
    };
    for (tmp, dest) in &staged {
        let r = match swap(tmp, dest) {
            Err(e) if e == nix::errno::Errno::ENOENT && !dest.exists() => std::fs::rename(tmp, dest)
                .map(|_| false)
                .map_err(|e| Error::io(format!("rename to {}", dest.display()), e)),
            r => r.map(|_| true).map_err(|e| Error::io(format!("swap {} into place", dest.display()), e.into())),
        };
        match r {
            Ok(existed) => swapped.push((tmp, dest, existed)),
            Err(e) => {
                undo(swapped);
                remove_staged(&staged);
                return Err(e);
            }
        }
    }
    // All are in. The swaps are made durable before the old contents (now under the staged
    // names) go: once this returns, a crash cannot bring them back.
    let mut dirs: Vec<&Path> = staged.iter().filter_map(|(_, dest)| dest.parent()).collect();
    dirs.sort();
    dirs.dedup();
    if let Err(e) = dirs.into_iter().try_for_each(crate::engine::sync_dir) {
        undo(swapped);
        remove_staged(&staged);
        return Err(e);
    }
    remove_staged(&staged);
    Ok(())
}

/// Atomically exchanges the files at `a` and `b` (renameat2 RENAME_EXCHANGE).
fn swap(a: &Path, b: &Path) -> nix::Result<()> {
    use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
    renameat2(AT_FDCWD, a, AT_FDCWD, b, RenameFlags::RENAME_EXCHANGE)
}
