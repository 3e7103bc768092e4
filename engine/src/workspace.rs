//! Workspace checkpoints. Interim implementation (a flat tree node over blobs) with the same
//! interface as the fsfork-backed one that replaces it once fsfork's store adapter is merged.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use snapfork_store::{Hash, Node, Store, Txn};

use crate::error::{Error, Result};
use crate::model::{Part, Snapshot};

/// Node kind of an interim workspace tree.
pub const KIND_TREE: u8 = 40;

/// A file that differs between two workspace checkpoints.
#[derive(Clone, Debug, Serialize)]
pub struct FileChange {
    /// Path relative to the workspace root.
    pub path: String,
    /// `added`, `removed`, `modified`.
    pub change: String,
}

#[derive(Serialize, Deserialize)]
struct Entry {
    path: String,
    mode: u32,
    kind: char,
    link: Option<usize>,
    target: Option<String>,
    size: u64,
}

/// What a workspace checkpoint produced.
#[derive(Clone, Debug)]
pub struct WorkspaceCheckpoint {
    /// The tree id.
    pub id: Hash,
    /// Logical bytes of regular files.
    pub bytes: u64,
}

fn walk(root: &Path, rel: &str, out: &mut Vec<(String, std::fs::Metadata)>) -> Result<()> {
    let dir = if rel.is_empty() { root.to_path_buf() } else { root.join(rel) };
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .map_err(|e| Error::io(format!("read {}", dir.display()), e))?
        .filter_map(|e| e.ok())
        .collect();
    names.sort_by_key(|e| e.file_name());
    for e in names {
        let name = e.file_name().to_string_lossy().into_owned();
        let p = if rel.is_empty() { name } else { format!("{rel}/{name}") };
        let md = std::fs::symlink_metadata(root.join(&p)).map_err(|e| Error::io(format!("stat {p}"), e))?;
        let is_dir = md.is_dir();
        out.push((p.clone(), md));
        if is_dir {
            walk(root, &p, out)?;
        }
    }
    Ok(())
}

/// Checkpoints the tree at `dir` in its own transaction.
pub fn checkpoint(s: &Store, dir: &Path, _message: &str) -> Result<WorkspaceCheckpoint> {
    let mut tx = s.begin()?;
    let (id, bytes) = checkpoint_in(&mut tx, dir)?;
    tx.commit()?;
    Ok(WorkspaceCheckpoint { id, bytes })
}

fn checkpoint_in(tx: &mut Txn, dir: &Path) -> Result<(Hash, u64)> {
    let mut files = Vec::new();
    walk(dir, "", &mut files)?;
    let mut entries = Vec::new();
    let mut links = Vec::new();
    let mut size = 0;
    for (p, md) in files {
        let mode = md.permissions().mode() & 0o7777;
        if md.is_dir() {
            entries.push(Entry { path: p, mode, kind: 'd', link: None, target: None, size: 0 });
        } else if md.file_type().is_symlink() {
            let t = std::fs::read_link(dir.join(&p)).map_err(|e| Error::io("readlink", e))?;
            entries.push(Entry { path: p, mode, kind: 'l', link: None, target: Some(t.to_string_lossy().into()), size: 0 });
        } else if md.is_file() {
            let info = tx.put_blob_file(&dir.join(&p))?;
            size += md.len();
            links.push(info.id);
            entries.push(Entry { path: p, mode, kind: 'f', link: Some(links.len() - 1), target: None, size: md.len() });
        }
    }
    let body = serde_json::to_vec(&entries).map_err(|e| Error::Invalid(e.to_string()))?;
    let id = tx.put_node(&Node::new(KIND_TREE, links, body))?;
    Ok((id, size))
}

fn load(s: &Store, id: &Hash) -> Result<(Node, Vec<Entry>)> {
    let n = s.get_node(id)?;
    let e: Vec<Entry> = serde_json::from_slice(&n.body).map_err(|e| Error::corrupt("tree", e.to_string()))?;
    Ok((n, e))
}

fn check_path(p: &str) -> Result<()> {
    if p.is_empty() || p.starts_with('/') || p.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Err(Error::corrupt("workspace tree", format!("path {p:?} escapes the workspace")));
    }
    Ok(())
}

/// Materializes the tree of `part` into new directory `dest`.
pub fn materialize(s: &Store, part: &Part, dest: &Path) -> Result<()> {
    let (n, entries) = load(s, &Snapshot::part_id(part)?)?;
    std::fs::create_dir_all(dest).map_err(|e| Error::io("mkdir", e))?;
    for e in &entries {
        check_path(&e.path)?;
        let p = dest.join(&e.path);
        match e.kind {
            'd' => std::fs::create_dir_all(&p).map_err(|x| Error::io("mkdir", x))?,
            'l' => std::os::unix::fs::symlink(e.target.clone().unwrap_or_default(), &p).map_err(|x| Error::io("symlink", x))?,
            _ => {
                let id = n.links.get(e.link.unwrap_or(usize::MAX)).ok_or_else(|| Error::corrupt("tree", "bad link"))?;
                let mut f = std::fs::File::create(&p).map_err(|x| Error::io("create", x))?;
                s.read_blob(id, &mut f)?;
            }
        }
        if e.kind != 'l' {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(e.mode)).map_err(|x| Error::io("chmod", x))?;
        }
    }
    Ok(())
}

/// Puts `dir` back to `part`: the tree is built beside it and swapped in by rename; returns where
/// the old tree is.
pub fn revert(s: &Store, dir: &Path, part: &Part) -> Result<PathBuf> {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let side = dir.with_file_name(format!(".{name}.revert-{}", crate::model::now_ms()));
    let old = dir.with_file_name(format!(".{name}.old-{}", crate::model::now_ms()));
    materialize(s, part, &side)?;
    std::fs::rename(dir, &old).map_err(|e| Error::io("rename", e))?;
    std::fs::rename(&side, dir).map_err(|e| Error::io("rename", e))?;
    Ok(old)
}

/// Removes an old tree in the background.
pub fn remove_old_tree(p: PathBuf) {
    std::thread::spawn(move || std::fs::remove_dir_all(p));
}

/// Files that differ.
pub fn diff(s: &Store, a: &Part, b: &Part) -> Result<Vec<FileChange>> {
    let (na, ea) = load(s, &Snapshot::part_id(a)?)?;
    let (nb, eb) = load(s, &Snapshot::part_id(b)?)?;
    let key = |n: &Node, e: &Entry| (e.kind, e.link.and_then(|l| n.links.get(l).copied()), e.target.clone(), e.mode);
    let ma: HashMap<&str, _> = ea.iter().map(|e| (e.path.as_str(), key(&na, e))).collect();
    let mb: HashMap<&str, _> = eb.iter().map(|e| (e.path.as_str(), key(&nb, e))).collect();
    let mut out = Vec::new();
    for (p, k) in &mb {
        match ma.get(p) {
            None => out.push(FileChange { path: p.to_string(), change: "added".into() }),
            Some(x) if x != k => out.push(FileChange { path: p.to_string(), change: "modified".into() }),
            _ => {}
        }
    }
    for p in ma.keys() {
        if !mb.contains_key(p) {
            out.push(FileChange { path: p.to_string(), change: "removed".into() });
        }
    }
    out.sort_by(|x, y| x.path.cmp(&y.path));
    Ok(out)
}

/// Checks a tree in a bundle: no path may escape the restore directory.
pub fn check_tree(s: &Store, nodes: &HashMap<Hash, Node>, t: Hash) -> Result<()> {
    let n = match nodes.get(&t) {
        Some(n) => n.clone(),
        None => s.get_node(&t)?,
    };
    let entries: Vec<Entry> = serde_json::from_slice(&n.body).map_err(|e| Error::corrupt("tree", e.to_string()))?;
    for e in &entries {
        check_path(&e.path)?;
    }
    Ok(())
}
