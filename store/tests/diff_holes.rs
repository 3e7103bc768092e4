//! Firecracker diff snapshots on a filesystem that cannot report holes (ramfs: the kernel's
//! generic SEEK_DATA/SEEK_HOLE calls the whole file data) are refused, not read as zero pages
//! over their parent. Needs root for the mount.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use snapfork_store::{Error, IngestOptions};

/// A ramfs mounted for one test; unmounted on drop (also while unwinding from a panic).
struct Ramfs(PathBuf);

impl Ramfs {
    fn mount(at: &Path) -> Ramfs {
        fs::create_dir_all(at).unwrap();
        let out = Command::new("mount").args(["-t", "ramfs", "ramfs"]).arg(at).output().expect("run mount");
        assert!(out.status.success(), "mount -t ramfs: {}", String::from_utf8_lossy(&out.stderr));
        Ramfs(at.to_path_buf())
    }
}

impl Drop for Ramfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A diff snapshot of `image` as Firecracker writes one: a file of the full size holding only
/// the pages in `written`, at their offsets.
fn write_diff(path: &Path, image: &[u8], written: impl IntoIterator<Item = usize>) {
    let f = fs::File::create(path).unwrap();
    f.set_len(image.len() as u64).unwrap();
    for p in written {
        f.write_all_at(&image[p * PAGE..][..PAGE], (p * PAGE) as u64).unwrap();
    }
}

#[test]
fn a_diff_snapshot_on_a_filesystem_without_holes_is_refused_not_zeroed_over_its_parent() {
    if !require_root(
        "a_diff_snapshot_on_a_filesystem_without_holes_is_refused_not_zeroed_over_its_parent",
        "mounts a ramfs",
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let parent = make_image(600, 0, 50);
    let ip = store.ingest_image(&write(tmp.path(), "parent", &parent), &IngestOptions::default(), None).unwrap();
    let mut child = parent.clone();
    for p in [3usize, 300, 599] {
        child[p * PAGE + 9] ^= 0xa5;
    }
    let full = store.ingest_image(&write(tmp.path(), "child", &child), &IngestOptions::default(), None).unwrap();
    let diff_opts = IngestOptions { parent: Some(ip.id), diff_snapshot: true, ..IngestOptions::default() };

    let ram = Ramfs::mount(&tmp.path().join("ramfs"));
    // Three pages written: the rest are holes, which ramfs calls data.
    let diff = ram.0.join("diff");
    write_diff(&diff, &child, [3, 300, 599]);
    match store.ingest_image(&diff, &diff_opts, Some("child")) {
        Err(Error::InvalidInput(msg)) => {
            assert!(msg.contains(&diff.display().to_string()), "names the file: {msg}");
            assert!(msg.contains("reports holes") && msg.contains("ext4"), "says what to do: {msg}");
        }
        Ok(info) => panic!(
            "ingested as {} (the image itself is {}): {} of 600 pages zero",
            info.id.short(),
            full.id.short(),
            info.zero_pages
        ),
        Err(e) => panic!("refused for another reason: {e}"),
    }
    assert!(store.get_ref("child").unwrap().is_none(), "nothing was committed");

    // A diff in which every page was written has no holes to mistake: taken, and right.
    let dense = ram.0.join("dense");
    write_diff(&dense, &child, 0..600);
    assert_eq!(store.ingest_image(&dense, &diff_opts, None).unwrap().id, full.id);
    // A full image there reads as before (its holes are zero pages anyway).
    let sparse_full = ram.0.join("full");
    write_diff(&sparse_full, &child, [3, 300, 599]);
    let mut zeroed = vec![0u8; child.len()];
    for p in [3usize, 300, 599] {
        zeroed[p * PAGE..][..PAGE].copy_from_slice(&child[p * PAGE..][..PAGE]);
    }
    let expect = store.ingest_image(&write(tmp.path(), "zeroed", &zeroed), &IngestOptions::default(), None).unwrap();
    assert_eq!(store.ingest_image(&sparse_full, &IngestOptions::default(), None).unwrap().id, expect.id);
}
