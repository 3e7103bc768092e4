//! fsfork benchmark, side by side in one run on a loop-mounted XFS (root needed):
//!
//! 1. fork of a 10,000-file, ~1 GiB tree: `snapfork fork` (from a checkpoint in the store) and a
//!    direct tree clone, against `cp -a --reflink=always` and `cp -a --reflink=never`;
//! 2. a checkpoint after 10 files changed;
//! 3. a revert of the whole tree;
//! 4. a checkpoint after 1% of a 1 GiB image changed, against hashing the whole image.
//!
//! Run: `cargo run --release -p snapfork-benches --bin fsfork -- [--rounds N] [--files N] [--json]`

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use rand::{Rng, RngCore, SeedableRng};
use snapfork_benches::sync;
use snapfork_fsfork::testfs::{FsType, TestFs};
use snapfork_fsfork::workspace;
use snapfork_fsfork::{CloneOptions, clone_tree};
use snapfork_store::{OpenOptions, Store};

fn secs<T>(f: impl FnOnce() -> Result<T>) -> Result<(f64, T)> {
    let t = Instant::now();
    let v = f()?;
    Ok((t.elapsed().as_secs_f64(), v))
}

fn sh(args: &[&str]) -> Result<()> {
    let st = Command::new(args[0]).args(&args[1..]).status().with_context(|| format!("run {args:?}"))?;
    if !st.success() {
        bail!("{args:?} failed");
    }
    Ok(())
}

fn rm(p: &Path) -> Result<()> {
    if p.exists() {
        std::fs::remove_dir_all(p).with_context(|| format!("remove {}", p.display()))?;
    }
    sync();
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// 10 large files (~80 MiB each) and many small ones (1-40 KiB), 100 per directory.
fn make_tree(root: &Path, files: usize, rng: &mut impl RngCore) -> Result<u64> {
    let mut total = 0u64;
    let mut buf = vec![0u8; 80 << 20];
    let large = 10.min(files);
    for i in 0..files {
        let dir = root.join(format!("pkg{:03}/sub{}", i / 100, (i / 10) % 10));
        std::fs::create_dir_all(&dir)?;
        let len = if i < large { 80 << 20 } else { rng.random_range(1024..40 * 1024) };
        rng.fill_bytes(&mut buf[..len]);
        std::fs::File::create(dir.join(format!("f{i}.dat")))?.write_all(&buf[..len])?;
        total += len as u64;
    }
    sync();
    Ok(total)
}

fn hash_whole(path: &Path) -> Result<blake3::Hash> {
    let f = std::fs::File::open(path)?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 16 << 20];
    let mut off = 0u64;
    loop {
        let n = f.read_at(&mut buf, off)?;
        if n == 0 {
            break;
        }
        h.update_rayon(&buf[..n]);
        off += n as u64;
    }
    Ok(h.finalize())
}

fn main() -> Result<()> {
    // RUST_LOG=snapfork_fsfork=debug shows where a checkpoint spends its time.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: usize| -> usize {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let rounds = arg("--rounds", 3);
    let nfiles = arg("--files", 10_000);
    let json = args.iter().any(|a| a == "--json");
    // --only fork|checkpoint|revert|image runs one part (for profiling with RUST_LOG=debug).
    let only = args.iter().position(|a| a == "--only").and_then(|i| args.get(i + 1)).cloned();
    let part = |name: &str| only.as_deref().is_none_or(|o| o == name);
    if !snapfork_fsfork::testfs::require_root("fsfork bench") {
        return Ok(());
    }
    let fs = TestFs::new(FsType::Xfs, 16 << 10)?;
    let root = fs.path();
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let src = root.join("ws");
    let bytes = make_tree(&src, nfiles, &mut rng)?;
    eprintln!("tree: {nfiles} files, {:.0} MiB on XFS at {}", bytes as f64 / 1048576.0, root.display());
    let store = Store::open(root.join("store"), OpenOptions::default())?;
    let (t_first, c0) = secs(|| Ok(workspace::checkpoint(&store, &src, Some("base"))?))?;
    eprintln!("first checkpoint: {:.3} s ({} new objects)", t_first, c0.new_objects);

    // 1. Forks, alternating so that every contender sees the same cache state.
    let (mut t_fork, mut t_clone, mut t_cp_ref, mut t_cp_copy) = (vec![], vec![], vec![], vec![]);
    for r in 0..if part("fork") { rounds } else { 0 } {
        let into = root.join(format!("forks{r}"));
        let (t, forks) = secs(|| Ok(workspace::fork(&store, &c0.id, 1, &into)?))?;
        t_fork.push(t);
        assert_eq!(forks[0].files as usize, nfiles);
        rm(&into)?;
        let dst = root.join(format!("clone{r}"));
        t_clone.push(secs(|| Ok(clone_tree(&src, &dst, &CloneOptions::default())?))?.0);
        rm(&dst)?;
        let dst = root.join(format!("cpref{r}"));
        t_cp_ref.push(
            secs(|| sh(&["cp", "-a", "--reflink=always", src.to_str().unwrap_or(""), dst.to_str().unwrap_or("")]))?.0,
        );
        rm(&dst)?;
        let dst = root.join(format!("cpcopy{r}"));
        t_cp_copy.push(
            secs(|| sh(&["cp", "-a", "--reflink=never", src.to_str().unwrap_or(""), dst.to_str().unwrap_or("")]))?.0,
        );
        rm(&dst)?;
    }

    // 2. Checkpoint after 10 files changed.
    let mut t_ck10 = vec![];
    let mut hashed10 = 0;
    for r in 0..if part("checkpoint") { rounds } else { 0 } {
        for k in 0..10 {
            let i = 10 + (r * 977 + k * 131) % (nfiles - 10);
            let p = src.join(format!("pkg{:03}/sub{}/f{i}.dat", i / 100, (i / 10) % 10));
            std::fs::OpenOptions::new().append(true).open(&p)?.write_all(format!("edit {r} {k}\n").as_bytes())?;
        }
        let (t, c) = secs(|| Ok(workspace::checkpoint(&store, &src, Some("10 files"))?))?;
        hashed10 = c.hashed_files;
        t_ck10.push(t);
    }

    // 3. Revert the whole tree to the first checkpoint and back (until the swap; the old tree
    //    is removed afterwards, untimed), against rm -rf + cp -a --reflink=always.
    let mut t_revert = vec![];
    let mut t_revert_cp = vec![];
    let last = workspace::checkpoint(&store, &src, None)?.id;
    for r in 0..if part("revert") { rounds } else { 0 } {
        let target = if r % 2 == 0 { c0.id } else { last };
        let (t, rep) = secs(|| Ok(workspace::revert(&store, &src, &target)?))?;
        t_revert.push(t);
        rm(&rep.old_tree)?;
        let copy = root.join("revert-baseline");
        let other = root.join("revert-src");
        if r == 0 {
            sh(&["cp", "-a", "--reflink=always", src.to_str().unwrap_or(""), other.to_str().unwrap_or("")])?;
            sync();
        }
        t_revert_cp.push(
            secs(|| {
                if copy.exists() {
                    std::fs::remove_dir_all(&copy)?;
                }
                sh(&["cp", "-a", "--reflink=always", other.to_str().unwrap_or(""), copy.to_str().unwrap_or("")])
            })?
            .0,
        );
    }

    // 4. A 1 GiB image with one earlier checkpoint; 1% of it changed, either as scattered 4 KiB
    //    pages or as one contiguous 10 MiB run; checkpointed right after the writes (their
    //    writeback is part of the checkpoint) or after a `sync` (untimed). A fresh image per
    //    case, so that fragmentation from earlier cases does not accumulate.
    let pages = (1u64 << 30) / 4096;
    let mut cases: Vec<(&str, Vec<f64>, u64)> = vec![
        ("scattered, right after the writes", vec![], 0),
        ("scattered, after sync", vec![], 0),
        ("contiguous, right after the writes", vec![], 0),
        ("contiguous, after sync", vec![], 0),
    ];
    let mut t_whole = vec![];
    let mut t_img_first = 0.0;
    let mut buf = vec![0u8; 64 << 20];
    for r in 0..if part("image") { rounds } else { 0 } {
        for (ci, case) in cases.iter_mut().enumerate() {
            let ws2 = root.join(format!("vm-{r}-{ci}"));
            std::fs::create_dir(&ws2)?;
            let img = ws2.join("disk.img");
            {
                let f = std::fs::File::create(&img)?;
                for k in 0..16u64 {
                    rng.fill_bytes(&mut buf);
                    f.write_all_at(&buf, k * (64 << 20))?;
                }
            }
            sync();
            t_img_first = secs(|| Ok(workspace::checkpoint(&store, &ws2, None)?))?.0;
            {
                let f = std::fs::OpenOptions::new().write(true).open(&img)?;
                if ci < 2 {
                    let mut page = [0u8; 4096];
                    for _ in 0..pages / 100 {
                        rng.fill_bytes(&mut page);
                        f.write_all_at(&page, rng.random_range(0..pages) * 4096)?;
                    }
                } else {
                    let run = &mut buf[..(pages / 100 * 4096) as usize];
                    rng.fill_bytes(run);
                    f.write_all_at(run, rng.random_range(0..900u64) << 20)?;
                }
            }
            if ci % 2 == 1 {
                sync();
            }
            let (t, c) = secs(|| Ok(workspace::checkpoint(&store, &ws2, None)?))?;
            case.1.push(t);
            case.2 = c.hashed_bytes;
            if ci == 3 {
                t_whole.push(secs(|| hash_whole(&img))?.0);
            }
            rm(&ws2)?;
        }
    }
    let t_img: Vec<f64> = cases[0].1.clone();
    let t_img_synced: Vec<f64> = cases[1].1.clone();
    let t_img_contig: Vec<f64> = cases[2].1.clone();
    let t_img_contig_synced: Vec<f64> = cases[3].1.clone();
    let (hashed_scatter, hashed_contig) = (cases[0].2, cases[2].2);

    let m = |v: &Vec<f64>| {
        if v.is_empty() { f64::NAN } else { median(v.clone()) }
    };
    let report = serde_json::json!({
        "files": nfiles, "bytes": bytes, "rounds": rounds, "fs": "xfs (loop, reflink=1)",
        "first_checkpoint_s": t_first,
        "fork_snapfork_s": m(&t_fork), "clone_tree_s": m(&t_clone),
        "cp_reflink_always_s": m(&t_cp_ref), "cp_reflink_never_s": m(&t_cp_copy),
        "checkpoint_10_files_s": m(&t_ck10), "checkpoint_10_files_hashed_files": hashed10,
        "revert_s": m(&t_revert), "revert_baseline_rm_cp_reflink_s": m(&t_revert_cp),
        "image_first_checkpoint_s": t_img_first,
        "image_1pct_scattered_checkpoint_s": m(&t_img), "image_1pct_scattered_hashed_bytes": hashed_scatter,
        "image_1pct_contiguous_checkpoint_s": m(&t_img_contig), "image_1pct_contiguous_hashed_bytes": hashed_contig,
        "image_hash_whole_s": m(&t_whole),
        "image_1pct_scattered_after_sync_checkpoint_s": m(&t_img_synced),
        "image_1pct_contiguous_after_sync_checkpoint_s": m(&t_img_contig_synced),
        "all": { "fork": t_fork, "clone": t_clone, "cp_ref": t_cp_ref, "cp_copy": t_cp_copy, "ck10": t_ck10,
                 "revert": t_revert, "revert_cp": t_revert_cp, "img": t_img, "img_contig": t_img_contig, "whole": t_whole,
                 "img_synced": t_img_synced, "img_contig_synced": t_img_contig_synced },
    });
    if json {
        println!("{report}");
    } else {
        println!(
            "fsfork benchmark: {nfiles} files, {:.0} MiB, XFS (loop, reflink=1), median of {rounds}",
            bytes as f64 / 1048576.0
        );
        println!("{:<48} {:>10}", "what", "seconds");
        let rows = [
            ("snapfork fork (restore from checkpoint)", m(&t_fork)),
            ("snapfork clone_tree (tree to tree)", m(&t_clone)),
            ("cp -a --reflink=always", m(&t_cp_ref)),
            ("cp -a --reflink=never", m(&t_cp_copy)),
            ("first checkpoint (all files)", t_first),
            ("checkpoint after 10 files changed", m(&t_ck10)),
            ("revert (build beside + RENAME_EXCHANGE)", m(&t_revert)),
            ("baseline: rm -rf + cp -a --reflink=always", m(&t_revert_cp)),
            ("checkpoint, 1 GiB image, 1% pages scattered", m(&t_img)),
            ("checkpoint, 1 GiB image, 1% contiguous", m(&t_img_contig)),
            ("  same, scattered, after sync (untimed)", m(&t_img_synced)),
            ("  same, contiguous, after sync (untimed)", m(&t_img_contig_synced)),
            ("baseline: BLAKE3 of the whole 1 GiB image", m(&t_whole)),
        ];
        for (k, v) in rows {
            println!("{k:<48} {v:>10.3}");
        }
        println!(
            "hashed bytes: scattered {hashed_scatter}, contiguous {hashed_contig}; 10-file checkpoint read {hashed10} files"
        );
        println!("{report}");
    }
    Ok(())
}
