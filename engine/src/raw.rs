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

fn write_part(store: &Store, part: &Part, dest: &Path) -> Result<()> {
    let id: Hash = Snapshot::part_id(part)?;
    let tmp = dest.with_file_name(format!(".{}.restore", part.name));
    let r = (|| -> Result<()> {
        match part.kind {
            PartKind::Image => {
                store.open_image(&id)?.materialize(&tmp, None)?;
            }
            PartKind::Blob => {
                let mut f =
                    std::fs::File::create(&tmp).map_err(|e| Error::io(format!("create {}", tmp.display()), e))?;
                let mut w = std::io::BufWriter::with_capacity(1 << 20, &mut f);
                store.read_blob(&id, &mut w)?;
                std::io::Write::flush(&mut w).map_err(|e| Error::io(format!("write {}", tmp.display()), e))?;
            }
            PartKind::Workspace => return Ok(()),
        }
        std::fs::rename(&tmp, dest).map_err(|e| Error::io(format!("rename to {}", dest.display()), e))
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
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

/// Writes the snapshot's files back over the paths in `cfg` (each file atomically).
pub fn revert(store: &Store, parts: &[Part], cfg: &RawConfig) -> Result<()> {
    for (role, path) in cfg.files() {
        let name = part_name(path)?;
        let part = parts
            .iter()
            .find(|p| p.role == role && p.name == name)
            .ok_or_else(|| Error::Invalid(format!("snapshot has no {name}")))?;
        write_part(store, part, path)?;
    }
    Ok(())
}
