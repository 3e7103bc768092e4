//! Hostile bundles: a workspace tree whose entry names would escape the restore directory or
//! whose entries would carry privileges onto the host (device nodes, set-id files, capability
//! xattrs), a snapshot whose parent is no snapshot, a forged snapshot, garbage after the end, an
//! object sent twice (as data, then as a node).
//! Each is refused and leaves nothing in the store.

mod common;

use std::collections::BTreeMap;

use common::*;
use snapfork_engine::model::{Part, PartKind, Role, SnapshotBody};
use snapfork_fsfork::manifest::{self, KIND_CHECKPOINT, ManifestEntry};
use snapfork_fsfork::sys::Time;
use snapfork_fsfork::walk::Kind;
use snapfork_store::{Hash, Node};

fn entry(name: &[u8], kind: Kind, link: Option<Hash>) -> ManifestEntry {
    ManifestEntry {
        name: name.to_vec(),
        kind,
        mode: if kind == Kind::Dir { 0o40755 } else { 0o100644 },
        uid: 0,
        gid: 0,
        size: 0,
        atime: Time { sec: 0, nsec: 0 },
        mtime: Time { sec: 0, nsec: 0 },
        rdev: 0,
        link_group: 0,
        link: link.map(|h| snapfork_fsfork::repo::Id(h.0)),
        target: Vec::new(),
        xattrs: Vec::new(),
    }
}

fn node(d: snapfork_fsfork::repo::NodeData) -> Node {
    Node::new(d.kind, d.links.iter().map(|l| Hash(l.0)).collect(), d.body)
}

/// Stores a snapshot whose workspace tree holds `evil` and tags it `evil`; with
/// `parent_is_checkpoint`, the snapshot names its workspace checkpoint as its parent.
fn plant(engine: &snapfork_engine::Engine, evil: ManifestEntry, parent_is_checkpoint: bool) -> Hash {
    let store = engine.store();
    let mut tx = store.begin().unwrap();
    let inner = tx.put_node(&node(manifest::encode_dir(vec![evil]))).unwrap();
    let root = tx.put_node(&node(manifest::encode_dir(vec![entry(b"", Kind::Dir, Some(inner))]))).unwrap();
    let info = serde_json::json!({"v": 1, "message": null, "time": 0.0, "workspace": "/x",
        "parent": null, "files": 0, "bytes": 0});
    let ck = tx.put_node(&Node::new(KIND_CHECKPOINT, vec![root], serde_json::to_vec(&info).unwrap())).unwrap();
    let body = SnapshotBody {
        version: 1,
        parent: parent_is_checkpoint.then(|| ck.to_hex()),
        sandbox: "evil".into(),
        message: String::new(),
        labels: BTreeMap::new(),
        created_ms: 0,
        driver: "raw".into(),
        config: serde_json::json!({}),
        parts: vec![Part {
            role: Role::Workspace,
            name: "workspace".into(),
            kind: PartKind::Workspace,
            id: ck.to_hex(),
            size: 0,
        }],
    };
    let id = tx.put_node(&body.to_node().unwrap()).unwrap();
    tx.set_ref("tag/evil", id).unwrap();
    tx.commit().unwrap();
    id
}

fn assert_empty(engine: &snapfork_engine::Engine) {
    let store = engine.store();
    assert!(store.list_refs("").unwrap().is_empty(), "{:?}", store.list_refs("").unwrap());
    let t = store.stats("").unwrap().total;
    assert_eq!((t.chunks, t.file_objects), (0, 0), "{t:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_bundles_refused_and_nothing_kept() {
    if !require("hostile_bundles_refused_and_nothing_kept", false) {
        return;
    }
    let (dir, src) = new_engine();
    let (_dir2, dst) = new_engine();
    let device = ManifestEntry { mode: 0o20600, rdev: 0x801, ..entry(b"sda1", Kind::CharDevice, None) };
    let setuid = ManifestEntry { mode: 0o104755, ..entry(b"su", Kind::File, None) };
    let caps = ManifestEntry {
        xattrs: vec![(b"security.capability".to_vec(), vec![1, 0, 0, 2])],
        ..entry(b"d", Kind::Dir, None)
    };
    let cases = [
        (entry(b"..", Kind::Dir, None), false, "workspace tree"),
        (entry(b"a/../../etc", Kind::Dir, None), false, "workspace tree"),
        (entry(b".", Kind::Dir, None), false, "workspace tree"),
        (device, false, "device node"),
        (setuid, false, "set-user-id"),
        (caps, false, "security.capability"),
        (entry(b"ok", Kind::Dir, None), true, "is not a snapshot"),
    ];
    for (k, (evil, parent_is_checkpoint, expect)) in cases.into_iter().enumerate() {
        let id = plant(&src, evil, parent_is_checkpoint);
        let bundle = dir.path().join(format!("evil{k}.sfb"));
        src.export(&id.to_hex(), &bundle).await.unwrap();
        let err = dst.import(&bundle).await.unwrap_err().to_string();
        assert!(err.contains(expect), "case {k}: {err}");
        assert_empty(&dst);
    }
    // A good bundle with garbage appended, and one with a record's bytes swapped for others.
    let (_d3, ok) = new_engine();
    let ws = dir.path().join("ws");
    std::fs::create_dir_all(&ws).unwrap();
    std::fs::write(ws.join("f"), vec![7u8; 100_000]).unwrap();
    let mem = dir.path().join("mem");
    std::fs::write(&mem, vec![1u8; 65536]).unwrap();
    let cfg = snapfork_engine::RawConfig { memory: Some(mem), state: vec![], disks: vec![], page_size: 4096 };
    ok.run(snapfork_engine::RunSpec {
        name: "g".into(),
        driver: snapfork_engine::DriverConfig::Raw(cfg),
        workspace: Some(ws),
    })
    .await
    .unwrap();
    let ck = ok.checkpoint("g", Default::default()).await.unwrap();
    let good = dir.path().join("good.sfb");
    ok.export(&ck.id, &good).await.unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let mut trailing = bytes.clone();
    trailing.extend_from_slice(b"more");
    let p = dir.path().join("bad.sfb");
    std::fs::write(&p, &trailing).unwrap();
    assert!(dst.import(&p).await.is_err());
    assert_empty(&dst);
    // Every single-byte corruption in the records region is refused (sampled).
    for off in (16..bytes.len()).step_by(bytes.len() / 40 + 1) {
        let mut b = bytes.clone();
        b[off] ^= 0x01;
        std::fs::write(&p, &b).unwrap();
        assert!(dst.import(&p).await.is_err(), "flip at {off} accepted");
        assert_empty(&dst);
    }
    // The root snapshot sent twice, first as data: refused (it would be checked as a node
    // and written as data).
    let mut b = bytes.clone();
    let (mut pos, mut at) = (48, None);
    while b[pos] != 0xFF {
        let len = u64::from_le_bytes(b[pos + 33..pos + 41].try_into().unwrap()) as usize;
        if b[pos + 1..pos + 33] == b[16..48] {
            at = Some((pos, 41 + len));
        }
        pos += 41 + len;
    }
    let (at, len) = at.expect("the root's record");
    let mut record = b[at..at + len].to_vec();
    record[0] = 2;
    b.splice(at..at, record);
    let end = pos + len;
    let digest = *blake3::hash(&b[..end + 1]).as_bytes();
    b[end + 1..end + 33].copy_from_slice(&digest);
    std::fs::write(&p, &b).unwrap();
    let err = dst.import(&p).await.unwrap_err().to_string();
    assert!(err.contains("appears twice"), "{err}");
    assert_empty(&dst);
    let r = dst.import(&good).await.unwrap();
    assert_eq!(r.id, ck.id);
    // Imported twice: the second import adds nothing new.
    let again = dst.import(&good).await.unwrap();
    assert_eq!(again.id, ck.id);
}

/// A directory listing sent as plain data (its record tagged as a chunk, the bundle's digest
/// made to match) would pass unchecked: refused, nothing kept. And bytes stored as data are never
/// read as a node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_disguised_as_data_is_refused() {
    let (dir, src) = new_engine();
    let (_dir2, dst) = new_engine();
    let dev = ManifestEntry { mode: 0o20666, rdev: 0x103, ..entry(b"evil-dev", Kind::CharDevice, None) };
    let disguised = Hash::of(&node(manifest::encode_dir(vec![dev.clone()])).encode());
    let id = plant(&src, dev, false);
    let bundle = dir.path().join("evil.sfb");
    src.export(&id.to_hex(), &bundle).await.unwrap();
    assert!(dst.import(&bundle).await.unwrap_err().to_string().contains("device"));

    // Records: tag (1 byte), id (32), length (8 LE), bytes; after the 48-byte header; the
    // end tag is followed by the blake3 of everything before it.
    let mut b = std::fs::read(&bundle).unwrap();
    let mut pos = 48;
    let mut retagged = false;
    while b[pos] != 0xFF {
        let len = u64::from_le_bytes(b[pos + 33..pos + 41].try_into().unwrap()) as usize;
        if &b[pos + 1..pos + 33] == disguised.as_bytes() {
            b[pos] = 2;
            retagged = true;
        }
        pos += 41 + len;
    }
    assert!(retagged);
    let digest = *blake3::hash(&b[..pos + 1]).as_bytes();
    b[pos + 1..pos + 33].copy_from_slice(&digest);
    std::fs::write(&bundle, &b).unwrap();
    let err = dst.import(&bundle).await.unwrap_err().to_string();
    assert!(err.contains("neither a node nor a file object"), "{err}");
    assert_empty(&dst);

    // Data that decodes as a node is not one; storing it as a node makes it one.
    let store = dst.store();
    let bytes = node(manifest::encode_dir(vec![entry(b"a", Kind::File, None)])).encode();
    let mut tx = store.begin().unwrap();
    let as_data = tx.put_chunk(&bytes).unwrap();
    tx.commit().unwrap();
    assert!(store.get_node(&as_data).unwrap_err().to_string().contains("stored as data"));
    let mut tx = store.begin().unwrap();
    let as_node = tx.put_node(&Node::decode(&bytes, &|| "test".into()).unwrap()).unwrap();
    tx.commit().unwrap();
    assert_eq!(as_node, as_data);
    assert!(store.get_node(&as_node).is_ok());
}
