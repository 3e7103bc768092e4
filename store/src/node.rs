//! Nodes: the store's one manifest format.
//!
//! Every structure that refers to other objects (an image's root and segments, a blob's chunk
//! list, a workspace tree, a sandbox snapshot) is a [`Node`]: a kind, a list of links and an
//! opaque body. Because links are explicit, gc and verify walk any node, including kinds defined by
//! higher crates, without knowing their format.

use crate::error::{Error, Result};
use crate::hash::Hash;

/// Node kinds the store itself defines. Kinds 16..=255 belong to higher crates
/// (fsfork uses 16..=31, engine 32..=47).
pub mod kind {
    /// An image's root: links are its segments.
    pub const IMAGE_ROOT: u8 = 1;
    /// A segment of an image: links are page ids, [`Hash::ZERO`](crate::Hash::ZERO) for zero pages.
    pub const IMAGE_SEGMENT: u8 = 2;
    /// A blob: links are its content-defined chunks, in order.
    pub const BLOB: u8 = 3;
    /// The first kind free for other crates.
    pub const FIRST_USER: u8 = 16;
}

const MAGIC: &[u8; 4] = b"SFN1";
const HEADER: usize = 16;

/// A manifest object: a kind, links that gc follows, and a body only its kind understands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// What this node is (see [`kind`]).
    pub kind: u8,
    /// The objects this node refers to; [`Hash::ZERO`] is an empty slot and refers to nothing.
    pub links: Vec<Hash>,
    /// The kind-specific payload.
    pub body: Vec<u8>,
}

impl Node {
    /// A node of `kind` with `links` and `body`.
    pub fn new(kind: u8, links: Vec<Hash>, body: Vec<u8>) -> Node {
        Node { kind, links, body }
    }

    /// The canonical encoding, whose blake3 is the node's id.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + self.links.len() * 32 + self.body.len());
        out.extend_from_slice(MAGIC);
        out.push(self.kind);
        out.extend_from_slice(&[0; 3]);
        out.extend_from_slice(&(self.links.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.body.len() as u32).to_le_bytes());
        for link in &self.links {
            out.extend_from_slice(link.as_bytes());
        }
        out.extend_from_slice(&self.body);
        out
    }

    /// Parses an encoded node; `what` names it in errors.
    pub fn decode(bytes: &[u8], what: &dyn Fn() -> String) -> Result<Node> {
        let bad = |detail: &str| Error::Corrupt { what: what(), detail: detail.to_string() };
        if bytes.len() < HEADER || &bytes[..4] != MAGIC {
            return Err(bad("not a node (bad header)"));
        }
        let kind = bytes[4];
        let nlinks = u32::from_le_bytes(bytes[8..12].try_into().map_err(|_| bad("header"))?) as usize;
        let body_len = u32::from_le_bytes(bytes[12..16].try_into().map_err(|_| bad("header"))?) as usize;
        let links_end =
            nlinks.checked_mul(32).and_then(|n| n.checked_add(HEADER)).ok_or_else(|| bad("link count overflows"))?;
        if links_end.checked_add(body_len) != Some(bytes.len()) {
            return Err(bad("length does not match its header"));
        }
        let links =
            bytes[HEADER..links_end].chunks_exact(32).map(|c| Hash::from_slice(c).unwrap_or(Hash::ZERO)).collect();
        Ok(Node { kind, links, body: bytes[links_end..].to_vec() })
    }

    /// The node's id.
    pub fn id(&self) -> Hash {
        Hash::of(&self.encode())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejects_truncation() {
        let n = Node::new(kind::BLOB, vec![Hash::of(b"a"), Hash::ZERO], b"body".to_vec());
        let bytes = n.encode();
        assert_eq!(Node::decode(&bytes, &|| "n".into()).unwrap(), n);
        assert!(Node::decode(&bytes[..bytes.len() - 1], &|| "n".into()).is_err());
        assert!(Node::decode(b"XXXX", &|| "n".into()).is_err());
    }
}
