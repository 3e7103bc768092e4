//! The workspace part of a snapshot, through fsfork: checkpoint a directory tree into the store,
//! restore it into a new directory, revert a live one in place, diff two checkpoints, and check
//! an imported tree before anything of it is stored.
//!
//! fsfork commits its own store transaction for a workspace checkpoint (its tree nodes, file
//! objects and its own refs). The engine's snapshot node, committed after it, links to that
//! checkpoint; if the snapshot's commit fails, the workspace checkpoint is an ordinary fsfork
//! checkpoint that no snapshot names (no half snapshot exists).

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::Path;

use serde::Serialize;
use snapfork_fsfork::manifest::{self, KIND_CHECKPOINT, KIND_DIR};
use snapfork_fsfork::repo::{Id, NodeData};
use snapfork_fsfork::walk::Kind;
use snapfork_fsfork::workspace as ws;
use snapfork_store::{Hash, Node, Store};

use crate::error::{Error, Result};
use crate::model::{Part, Snapshot};

/// A path that differs between two workspace checkpoints.
#[derive(Clone, Debug, Serialize)]
pub struct FileChange {
    /// Path relative to the workspace root.
    pub path: String,
    /// `added`, `removed`, or `changed (content, mode, ...)`.
    pub change: String,
}

fn id(h: Hash) -> Id {
    Id(h.0)
}

fn part_id(part: &Part) -> Result<Id> {
    Ok(id(Snapshot::part_id(part)?))
}

/// What a workspace checkpoint produced.
#[derive(Clone, Debug)]
pub struct WorkspaceCheckpoint {
    /// The fsfork checkpoint id.
    pub id: Hash,
    /// Logical bytes of regular files.
    pub bytes: u64,
    /// Files read and hashed (the rest were unchanged since the last checkpoint).
    pub hashed_files: u64,
    /// File objects new to the store.
    pub new_objects: u64,
}

/// Checkpoints the tree at `dir` (the sandbox must be paused or stopped), calling `captured`
/// once the tree's state is taken and before the store commit (see
/// `snapfork_fsfork::workspace::checkpoint_then`): the sandbox may resume then.
pub fn checkpoint(store: &Store, dir: &Path, message: &str, captured: &mut dyn FnMut()) -> Result<WorkspaceCheckpoint> {
    let msg = if message.is_empty() { None } else { Some(message) };
    let r = ws::checkpoint_then(store, dir, msg, captured)?;
    Ok(WorkspaceCheckpoint {
        id: Hash(r.id.0),
        bytes: r.bytes,
        hashed_files: r.hashed_files,
        new_objects: r.new_objects,
    })
}

/// The ref fsfork sets for workspace checkpoint `id`.
pub fn checkpoint_ref(id: &Hash) -> String {
    format!("{}{}", ws::CHECKPOINT_REF_PREFIX, id.to_hex())
}

/// Forgets the fsfork records of workspace `dir` (its record, stat cache and place in
/// offspring lists): the sandbox that owned it is removed.
pub fn forget(store: &Store, dir: &Path) -> Result<()> {
    ws::forget(store, dir)?;
    Ok(())
}

/// Materializes the workspace of `part` into the new directory `dest` (reflinks where the
/// store's filesystem allows).
pub fn materialize(store: &Store, part: &Part, dest: &Path) -> Result<()> {
    ws::restore(store, &part_id(part)?, dest)?;
    Ok(())
}

/// Puts the live workspace `dir` back to `part` atomically (fsfork builds the tree beside it and
/// swaps with RENAME_EXCHANGE); returns where the previous tree now is. A process that holds the
/// old directory open (a paused sandbox's gofer) keeps seeing the old tree.
pub fn revert(store: &Store, dir: &Path, part: &Part) -> Result<ws::RevertReport> {
    Ok(ws::revert(store, dir, &part_id(part)?)?)
}

/// Puts back the tree (and the workspace's record) that [`revert`] replaced.
pub fn undo_revert(store: &Store, reverted: &ws::RevertReport) -> Result<()> {
    Ok(ws::undo_revert(store, reverted)?)
}

/// Removes the tree [`revert`] replaced, without making the caller wait.
pub fn remove_old_tree(reverted: ws::RevertReport) {
    drop(ws::remove_tree_background(reverted.old_tree));
}

/// Paths added, removed and changed from `a` to `b`.
pub fn diff(store: &Store, a: &Part, b: &Part) -> Result<Vec<FileChange>> {
    let d = ws::diff(store, ws::Side::Checkpoint(part_id(a)?), ws::Side::Checkpoint(part_id(b)?))?;
    let mut out: Vec<FileChange> = Vec::new();
    out.extend(d.added.into_iter().map(|path| FileChange { path, change: "added".into() }));
    out.extend(d.removed.into_iter().map(|path| FileChange { path, change: "removed".into() }));
    out.extend(
        d.changed.into_iter().map(|c| FileChange { path: c.path, change: format!("changed ({})", c.what.join(", ")) }),
    );
    out.sort_by(|x, y| x.path.cmp(&y.path));
    Ok(out)
}

/// Checks a workspace tree that is about to be imported: every checkpoint and directory node
/// reachable from `tree` (in `nodes`, else in the store) must decode under fsfork's rules, which
/// refuse entry names that could escape the restore directory (`/`, `.`, `..`), and no entry
/// may carry privileges onto this host (see [`refuse_privileged`]). Anything else the tree links
/// to must be a file object (`is_file`): a directory listing sent as plain data would otherwise
/// go unchecked.
pub fn check_tree(
    store: &Store,
    nodes: &HashMap<Hash, Node>,
    tree: Hash,
    is_file: &dyn Fn(&Hash) -> Result<bool>,
) -> Result<()> {
    let get = |h: &Hash| -> Result<Option<NodeData>> {
        let n = match nodes.get(h) {
            Some(n) => n.clone(),
            None => match store.location(h)? {
                Some(loc) if loc.is_node => store.get_node(h)?,
                _ => return Ok(None),
            },
        };
        Ok(Some(NodeData { kind: n.kind, links: n.links.iter().map(|l| id(*l)).collect(), body: n.body }))
    };
    let first = get(&tree)?.ok_or_else(|| Error::corrupt("workspace tree", "missing checkpoint node"))?;
    if first.kind != KIND_CHECKPOINT {
        return Err(Error::corrupt("workspace tree", format!("node kind {} is not a checkpoint", first.kind)));
    }
    let mut seen = HashSet::new();
    let mut queue = VecDeque::from([tree]);
    while let Some(h) = queue.pop_front() {
        if h.is_zero() || !seen.insert(h) {
            continue;
        }
        let Some(n) = get(&h)? else {
            if is_file(&h)? {
                continue;
            }
            return Err(Error::corrupt(
                "workspace tree",
                format!("it links {}, which is neither a node nor a file object", h.short()),
            ));
        };
        match n.kind {
            KIND_CHECKPOINT => {
                manifest::decode_checkpoint(&id(h), &n)?;
            }
            KIND_DIR => {
                for e in manifest::decode_dir(&id(h), &n)? {
                    refuse_privileged(&e)?;
                }
            }
            k => {
                return Err(Error::corrupt(
                    "workspace tree",
                    format!("node {} of kind {k} inside a workspace tree", h.short()),
                ));
            }
        }
        queue.extend(n.links.iter().map(|l| Hash(l.0)));
    }
    Ok(())
}

/// Refuses what a workspace from elsewhere must not bring onto this host, where the engine
/// restores it as root: device nodes (raw access to this machine's disks or memory), set-user-
/// and set-group-id files, and the extended attributes that grant privileges (file
/// capabilities, security labels, `trusted.*`). An agent's workspace has no need of them, and
/// stripping them silently would restore a tree other than the one exported.
fn refuse_privileged(e: &manifest::ManifestEntry) -> Result<()> {
    let name = String::from_utf8_lossy(&e.name);
    let refuse =
        |what: String| Err(Error::Invalid(format!("entry {name:?} {what}, which an imported workspace may not hold")));
    if matches!(e.kind, Kind::CharDevice | Kind::BlockDevice) {
        return refuse(format!("is a device node ({:#x})", e.rdev));
    }
    if e.mode & (libc::S_ISUID | libc::S_ISGID) != 0 && e.kind != Kind::Dir {
        return refuse(format!("is set-user-id or set-group-id (mode {:o})", e.mode & 0o7777));
    }
    if let Some((x, _)) = e.xattrs.iter().find(|(x, _)| x.starts_with(b"security.") || x.starts_with(b"trusted.")) {
        return refuse(format!("has the extended attribute {}", String::from_utf8_lossy(x)));
    }
    Ok(())
}
