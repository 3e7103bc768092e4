//! The snapshot model: snapshot nodes in the store, sandbox records on disk, ref names.
//!
//! A snapshot is one store [`Node`] of kind [`KIND_SNAPSHOT`]. Its links are the parent (or
//! [`Hash::ZERO`] for a root) followed by every part (memory images, runtime state blobs, disk
//! images, the workspace tree), so the store's gc and verify follow the whole history without
//! knowing this format. Its body is JSON ([`SnapshotBody`]) that names each part by its link index;
//! decoding checks that body and links agree, so a hand-made node cannot smuggle in ids.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use snapfork_store::{Hash, Node};

use crate::error::{Error, Result};

/// The store node kind of a sandbox snapshot (engine kinds are 32..=47).
pub const KIND_SNAPSHOT: u8 = 32;

/// What kind of stored object a part is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PartKind {
    /// A paged image (`ingest_image`): guest memory or a disk.
    Image,
    /// A content-defined-chunked blob: runtime state (runsc checkpoint image, vmstate).
    Blob,
    /// A workspace tree checkpointed by fsfork.
    Workspace,
}

/// The role of a part in the sandbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Guest memory.
    Memory,
    /// Runtime state (runsc's checkpoint image, Firecracker's vmstate).
    State,
    /// A disk image.
    Disk,
    /// The workspace directory.
    Workspace,
}

/// One part of a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    /// What the part is for.
    pub role: Role,
    /// Its name within the snapshot (a file name for state/disk parts, "workspace").
    pub name: String,
    /// How it is stored.
    pub kind: PartKind,
    /// Its store id (hex); equal to the node link at `link`.
    pub id: String,
    /// Its size in bytes (logical).
    pub size: u64,
}

/// The JSON body of a snapshot node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapshotBody {
    /// Format version (1).
    pub version: u32,
    /// The parent snapshot (hex), if any.
    pub parent: Option<String>,
    /// The sandbox that took it.
    pub sandbox: String,
    /// The user's message.
    pub message: String,
    /// Free-form labels.
    pub labels: BTreeMap<String, String>,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// The driver (`gvisor`, `firecracker`, `raw`).
    pub driver: String,
    /// The driver's configuration, enough to restore the sandbox elsewhere.
    pub config: serde_json::Value,
    /// The stored parts, in link order after the parent.
    pub parts: Vec<Part>,
}

/// A decoded snapshot with its id.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// Its store id.
    pub id: Hash,
    /// Its contents.
    pub body: SnapshotBody,
}

impl Snapshot {
    /// The parent's id, if any.
    pub fn parent(&self) -> Option<Hash> {
        self.body.parent.as_deref().and_then(parse_hash)
    }

    /// The first part with `role`.
    pub fn part(&self, role: Role) -> Option<&Part> {
        self.body.parts.iter().find(|p| p.role == role)
    }

    /// The part with `role` named `name`.
    pub fn part_named(&self, role: Role, name: &str) -> Option<&Part> {
        self.body.parts.iter().find(|p| p.role == role && p.name == name)
    }

    /// A part's store id.
    pub fn part_id(part: &Part) -> Result<Hash> {
        parse_hash(&part.id).ok_or_else(|| Error::corrupt("snapshot part", format!("bad id {}", part.id)))
    }
}

/// Parses a 64-hex-digit id.
pub fn parse_hash(s: &str) -> Option<Hash> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(Hash(out))
}

impl SnapshotBody {
    /// The node that stores this body: links are the parent (or ZERO) then each part.
    pub fn to_node(&self) -> Result<Node> {
        let mut links = Vec::with_capacity(1 + self.parts.len());
        links.push(match &self.parent {
            Some(p) => parse_hash(p).ok_or_else(|| Error::Invalid(format!("bad parent id {p}")))?,
            None => Hash::ZERO,
        });
        for p in &self.parts {
            links.push(Snapshot::part_id(p)?);
        }
        let body = serde_json::to_vec(self).map_err(|e| Error::Invalid(e.to_string()))?;
        Ok(Node::new(KIND_SNAPSHOT, links, body))
    }

    /// Decodes a snapshot node, checking that its body and links agree.
    pub fn from_node(id: Hash, node: &Node) -> Result<Snapshot> {
        let what = format!("snapshot {id}");
        if node.kind != KIND_SNAPSHOT {
            return Err(Error::NotFound(format!("{id} is not a snapshot (node kind {})", node.kind)));
        }
        let body: SnapshotBody =
            serde_json::from_slice(&node.body).map_err(|e| Error::corrupt(&what, format!("unparsable body: {e}")))?;
        if body.version != 1 {
            return Err(Error::corrupt(&what, format!("unknown version {}", body.version)));
        }
        let expected = body.to_node().map_err(|e| Error::corrupt(&what, e.to_string()))?;
        if expected.links != node.links {
            return Err(Error::corrupt(&what, "links do not match the body"));
        }
        for p in &body.parts {
            check_part_name(&p.name).map_err(|e| Error::corrupt(&what, e.to_string()))?;
        }
        check_name(&body.sandbox).map_err(|e| Error::corrupt(&what, e.to_string()))?;
        Ok(Snapshot { id, body })
    }
}

/// Part names become file names when restored: plain names only.
pub fn check_part_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 128 || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(Error::Invalid(format!("bad part name {name:?}")));
    }
    Ok(())
}

/// Sandbox and tag names: 1-64 of `[A-Za-z0-9_.-]`, not starting with `.` or `-`.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && !name.starts_with('-')
        // Refs are named after sandboxes and tags, and ref names refuse "..".
        && !name.contains("..")
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "bad name {name:?}: use 1-64 letters, digits, '_', '.', '-' (not leading '.' or '-', no '..')"
        )))
    }
}

/// The state of a sandbox as the engine last saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Its runtime is running.
    Running,
    /// Its runtime is paused.
    Paused,
    /// Not running; `head` (if any) is where it would continue.
    Stopped,
    /// Its process ended by itself (or the runtime died).
    Exited,
}

/// A sandbox's record, kept as JSON in the engine's state directory.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SandboxRecord {
    /// Its name.
    pub name: String,
    /// The driver.
    pub driver: String,
    /// The driver configuration.
    pub config: serde_json::Value,
    /// Last known status.
    pub status: Status,
    /// The runtime's container id for the current incarnation.
    pub runtime_id: Option<String>,
    /// Incarnation counter: each restore gets a fresh runtime id.
    pub generation: u64,
    /// The workspace directory on the host, if any.
    pub workspace: Option<PathBuf>,
    /// True when the engine created the workspace (and removes it with the sandbox).
    pub owns_workspace: bool,
    /// The snapshot it last checkpointed to or was restored/reverted from (hex).
    pub head: Option<String>,
    /// Creation time, ms since the Unix epoch.
    pub created_ms: u64,
}

/// Ref naming sandbox NAME's head.
pub fn head_ref(name: &str) -> String {
    format!("sandbox/{name}")
}

/// Ref naming a tag.
pub fn tag_ref(tag: &str) -> String {
    format!("tag/{tag}")
}

/// Prefix of the refs that keep every snapshot sandbox NAME took alive until it is removed.
pub fn snaps_prefix(name: &str) -> String {
    format!("snap/{name}/")
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body() -> SnapshotBody {
        SnapshotBody {
            version: 1,
            parent: Some(Hash::of(b"p").to_hex()),
            sandbox: "a".into(),
            message: "m".into(),
            labels: BTreeMap::new(),
            created_ms: 1,
            driver: "raw".into(),
            config: serde_json::json!({}),
            parts: vec![Part {
                role: Role::State,
                name: "state".into(),
                kind: PartKind::Blob,
                id: Hash::of(b"s").to_hex(),
                size: 1,
            }],
        }
    }

    #[test]
    fn node_round_trip_and_link_mismatch_refused() {
        let b = body();
        let node = b.to_node().unwrap();
        assert_eq!(node.links.len(), 2);
        let s = SnapshotBody::from_node(node.id(), &node).unwrap();
        assert_eq!(s.body, b);
        let mut forged = node.clone();
        forged.links[1] = Hash::of(b"other");
        assert!(SnapshotBody::from_node(forged.id(), &forged).is_err());
    }

    #[test]
    fn names_and_part_names_checked() {
        assert!(check_name("ok-1.x_y").is_ok());
        for bad in ["", ".x", "-x", "a/b", "a b", "a..b", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        for bad in ["", "..", ".", "a/b", "../../etc/passwd"] {
            assert!(check_part_name(bad).is_err(), "{bad}");
        }
    }
}
