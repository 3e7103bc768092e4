//! [`Repo`] for the real content-addressed store.

use std::path::{Path, PathBuf};

use snapfork_store::{Hash, Node, Store, Txn};

use crate::error::Result;
use crate::repo::{Id, NodeData, Repo, RepoTx};

fn h(id: &Id) -> Hash {
    Hash(id.0)
}

impl Repo for Store {
    fn root_dir(&self) -> PathBuf {
        self.dir().to_path_buf()
    }

    fn staging_dir(&self) -> PathBuf {
        Store::staging_dir(self)
    }
    fn min_free_bytes(&self) -> u64 {
        Store::min_free_bytes(self)
    }

    fn file_object_path(&self, id: &Id) -> PathBuf {
        Store::file_object_path(self, &h(id))
    }

    fn has_file_object(&self, id: &Id) -> Result<bool> {
        Ok(Store::has_file_object(self, &h(id))?)
    }

    fn contains(&self, id: &Id) -> Result<bool> {
        Ok(Store::contains(self, &h(id))?)
    }

    fn get_node(&self, id: &Id) -> Result<NodeData> {
        let n = Store::get_node(self, &h(id))?;
        Ok(NodeData { kind: n.kind, links: n.links.into_iter().map(|l| Id(l.0)).collect(), body: n.body })
    }

    fn get_ref(&self, name: &str) -> Result<Option<Id>> {
        Ok(Store::get_ref(self, name)?.map(|x| Id(x.0)))
    }

    fn list_refs(&self, prefix: &str) -> Result<Vec<(String, Id)>> {
        Ok(Store::list_refs(self, prefix)?.into_iter().map(|(n, x)| (n, Id(x.0))).collect())
    }

    fn resolve(&self, name_or_hex: &str) -> Result<Option<Id>> {
        match Store::resolve(self, name_or_hex) {
            Ok(x) => Ok(Some(Id(x.0))),
            Err(snapfork_store::Error::NotFound(_)) | Err(snapfork_store::Error::InvalidInput(_)) => {
                // Accept a unique prefix of a checkpoint id, as git does.
                let prefix = format!("{}{}", crate::workspace::CHECKPOINT_REF_PREFIX, name_or_hex.to_ascii_lowercase());
                let refs = Store::list_refs(self, &prefix)?;
                Ok(match refs.as_slice() {
                    [(_, x)] if name_or_hex.len() >= 4 => Some(Id(x.0)),
                    _ => None,
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    fn meta_get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(Store::meta_get(self, key)?)
    }

    fn meta_list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        Ok(Store::meta_list(self, prefix)?)
    }

    fn meta_put(&self, key: &str, value: &[u8]) -> Result<()> {
        Ok(Store::meta_put(self, key, Some(value))?)
    }

    fn begin(&self) -> Result<Box<dyn RepoTx + '_>> {
        Ok(Box::new(StoreTx(Store::begin(self)?)))
    }
}

struct StoreTx(Txn);

impl RepoTx for StoreTx {
    fn put_node(&mut self, node: &NodeData) -> Result<Id> {
        let n = Node::new(node.kind, node.links.iter().map(h).collect(), node.body.clone());
        Ok(Id(self.0.put_node(&n)?.0))
    }

    fn adopt_file_object(&mut self, staged: &Path, id: &Id) -> Result<()> {
        Ok(self.0.adopt_file_object(staged, h(id))?)
    }

    fn set_ref(&mut self, name: &str, id: &Id) -> Result<()> {
        Ok(self.0.set_ref(name, h(id))?)
    }

    fn meta_put(&mut self, key: &str, value: &[u8]) {
        self.0.meta_put(key, Some(value));
    }

    fn meta_delete(&mut self, key: &str) {
        self.0.meta_put(key, None);
    }

    fn keep_file(&mut self, id: &Id) -> Result<bool> {
        // Pin first, then look: gc either saw the pin (and keeps it) or had already removed it.
        self.0.pin(h(id));
        Ok(self.0.store().has_file_object(&h(id))?)
    }

    fn keep_node(&mut self, id: &Id) -> Result<bool> {
        self.0.pin(h(id));
        Ok(self.0.store().location(&h(id))?.is_some_and(|l| l.is_node))
    }

    fn commit(self: Box<Self>) -> Result<()> {
        Ok(self.0.commit()?)
    }
}
