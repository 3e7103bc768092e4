//! Verification: re-read and re-hash stored data, and name every damaged page.

use std::collections::{HashMap, HashSet};

use rayon::prelude::*;
use serde::Serialize;

use crate::blob::BlobManifest;
use crate::error::{Error, Result};
use crate::hash::Hash;
use crate::image::{Progress, Root, SEGMENT_PAGES};
use crate::node::kind;
use crate::pack::Location;
use crate::store::{Store, key};

/// One damaged object, named by where it is used.
#[derive(Clone, Debug, Serialize)]
pub struct Damage {
    /// Where: "image vm-a page 1234", "blob state chunk 3", "file object 1a2b…".
    pub what: String,
    /// The damaged object's id.
    pub id: Hash,
    /// What is wrong.
    pub detail: String,
}

/// What [`Store::verify`] found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct VerifyReport {
    /// Refs checked.
    pub refs: u64,
    /// Objects re-read and re-hashed.
    pub objects: u64,
    /// Their uncompressed bytes.
    pub bytes: u64,
    /// Everything damaged; empty when the store is sound.
    pub damaged: Vec<Damage>,
}

impl VerifyReport {
    /// True when nothing is damaged.
    pub fn is_ok(&self) -> bool {
        self.damaged.is_empty()
    }
}

impl Store {
    /// Re-reads and re-hashes every object (with `only`, every object that ref reaches) and names
    /// each damaged one by every place a ref uses it.
    ///
    /// A read-only store sees the store as it was when it opened, while a writer elsewhere may
    /// since have collected or moved what it checks: damage found there is checked again once
    /// caught up with the writer, and only what is still damaged then is reported.
    pub fn verify(&self, only: Option<&str>, progress: Option<&Progress>) -> Result<VerifyReport> {
        let report = self.verify_once(only, progress)?;
        if report.is_ok() || !self.is_read_only() {
            return Ok(report);
        }
        self.catch_up()?;
        self.verify_once(only, progress)
    }

    fn verify_once(&self, only: Option<&str>, progress: Option<&Progress>) -> Result<VerifyReport> {
        let roots: Vec<(String, Hash)> = match only {
            Some(name) => vec![(name.to_string(), self.resolve(name)?)],
            None => self.list_refs("")?,
        };
        let mut chunks: Vec<(Hash, Option<Location>)> = Vec::new();
        let mut files: Vec<Hash> = Vec::new();
        if only.is_some() {
            let mut reach = HashSet::new();
            self.reachable_tolerant(roots.iter().map(|(_, h)| *h), &mut reach)?;
            for id in reach {
                if self.has_file_object(&id)? {
                    files.push(id);
                } else {
                    chunks.push((id, self.location(&id)?));
                }
            }
        } else {
            self.scan(key::CHUNK, |k, v| {
                if let Some(id) = Hash::from_slice(k) {
                    chunks.push((id, Location::decode(v)));
                }
                Ok(())
            })?;
            self.scan(key::FILE, |k, _| {
                files.extend(Hash::from_slice(k));
                Ok(())
            })?;
            // Everything the refs reach must exist: a link to nothing is damage too.
            let mut reach = HashSet::new();
            self.reachable_tolerant(roots.iter().map(|(_, h)| *h), &mut reach)?;
            for id in reach {
                if self.location(&id)?.is_none() && !self.has_file_object(&id)? {
                    chunks.push((id, None));
                }
            }
        }

        let checked: Vec<(Hash, u64, Option<String>)> = chunks
            .par_iter()
            .map(|(id, loc)| {
                let Some(loc) = loc else {
                    return (*id, 0, Some("missing from the store".to_string()));
                };
                let mut buf = vec![0u8; loc.raw_len as usize];
                let result = self.read_located(id, loc, &mut buf, &|| String::new());
                if let Some(p) = progress {
                    p(u64::from(loc.raw_len));
                }
                match result {
                    Ok(n) => (*id, n as u64, None),
                    Err(Error::Corrupt { detail, .. }) => (*id, 0, Some(detail)),
                    Err(e) => (*id, 0, Some(e.to_string())),
                }
            })
            .chain(files.par_iter().map(|id| {
                let path = self.file_object_path(id);
                let mut hasher = blake3::Hasher::new();
                match hasher.update_mmap(&path).map(|h| (Hash(*h.finalize().as_bytes()), h.count())) {
                    Ok((actual, n)) if actual == *id => (*id, n, None),
                    Ok(_) => (*id, 0, Some("file content does not match its id".to_string())),
                    Err(e) => (*id, 0, Some(format!("unreadable: {e}"))),
                }
            }))
            .collect();
        let mut report = VerifyReport { refs: roots.len() as u64, ..VerifyReport::default() };
        let mut bad: HashMap<Hash, String> = HashMap::new();
        for (id, bytes, err) in checked {
            report.objects += 1;
            report.bytes += bytes;
            if let Some(e) = err {
                bad.insert(id, e);
            }
        }
        if bad.is_empty() {
            return Ok(report);
        }
        let mut named = HashSet::new();
        for (name, root) in &roots {
            self.name_damage(name, root, &bad, &mut report.damaged, &mut named)?;
        }
        let mut rest: Vec<(&Hash, &String)> = bad.iter().filter(|(id, _)| !named.contains(*id)).collect();
        rest.sort();
        for (id, detail) in rest {
            report.damaged.push(Damage {
                what: format!("unreferenced object {}", id.short()),
                id: *id,
                detail: detail.clone(),
            });
        }
        Ok(report)
    }

    /// Like `reachable`, but steps over unreadable nodes instead of failing.
    fn reachable_tolerant(&self, roots: impl IntoIterator<Item = Hash>, marked: &mut HashSet<Hash>) -> Result<()> {
        let mut stack: Vec<Hash> = roots.into_iter().collect();
        while let Some(id) = stack.pop() {
            if id.is_zero() || !marked.insert(id) {
                continue;
            }
            if self.location(&id)?.is_some_and(|l| l.is_node)
                && let Ok(node) = self.get_node(&id)
            {
                stack.extend(node.links);
            }
        }
        Ok(())
    }

    /// Walks ref `name` and records a [`Damage`] for each use of a bad object.
    fn name_damage(
        &self,
        name: &str,
        root: &Hash,
        bad: &HashMap<Hash, String>,
        out: &mut Vec<Damage>,
        named: &mut HashSet<Hash>,
    ) -> Result<()> {
        let mut note = |what: String, id: &Hash| {
            if let Some(detail) = bad.get(id) {
                named.insert(*id);
                out.push(Damage { what, id: *id, detail: detail.clone() });
                true
            } else {
                false
            }
        };
        if note(format!("{name} (its manifest)"), root) {
            return Ok(());
        }
        let Ok(node) = self.get_node(root) else {
            return Ok(());
        };
        match node.kind {
            kind::IMAGE_ROOT => {
                let root_info = Root::from_node(&node, &|| format!("image {name}"))?;
                for (s, seg) in root_info.segments.iter().enumerate() {
                    if note(format!("image {name} segment {s}"), seg) {
                        continue;
                    }
                    let Ok(seg_node) = self.get_node(seg) else {
                        continue;
                    };
                    for (k, page) in seg_node.links.iter().enumerate() {
                        note(format!("image {name} page {}", s as u64 * SEGMENT_PAGES + k as u64), page);
                    }
                }
            }
            kind::BLOB => {
                let manifest = BlobManifest::from_node(&node, &|| format!("blob {name}"))?;
                for (k, (chunk, _)) in manifest.chunks.iter().enumerate() {
                    note(format!("blob {name} chunk {k}"), chunk);
                }
            }
            _ => {
                let mut seen = HashSet::new();
                let mut stack: Vec<(Hash, String)> =
                    node.links.iter().map(|l| (*l, format!("{name}: object"))).collect();
                while let Some((id, path)) = stack.pop() {
                    if id.is_zero() || !seen.insert(id) {
                        continue;
                    }
                    if note(format!("{path} {}", id.short()), &id) {
                        continue;
                    }
                    if let Ok(Some(loc)) = self.location(&id)
                        && loc.is_node
                        && let Ok(n) = self.get_node(&id)
                    {
                        for l in n.links {
                            stack.push((l, format!("{path} {} ->", id.short())));
                        }
                    }
                }
            }
        }
        Ok(())
    }
}
