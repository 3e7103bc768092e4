//! The machines of the power-cut tests (`tests/tests/power_cut.rs`), and what they and their
//! tests share. Each machine runs
//! as a process of its own (`power-cut-machine`, `src/bin/power-cut-machine.rs`): it does its
//! work on a loop-mounted filesystem, reports on stdout what it committed, cuts the power of
//! that filesystem and dies on the spot (`testfs::power_cut_and_exit`); the test then mounts
//! the filesystem again and checks that everything reported is there.

use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use snapfork_engine::{CheckpointOptions, DriverConfig, Engine, EngineOptions, RawConfig, RunSpec};
use snapfork_fsfork::testfs;
use snapfork_fsfork::workspace;
use snapfork_store::{GcOptions, IngestOptions, OpenOptions, Store};

/// The page size of every image here.
pub const PAGE: usize = 4096;

/// A memory-like image: zero pages, random pages and repetitive (compressible) ones.
pub fn image(seed: u64, pages: usize) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = vec![0u8; pages * PAGE];
    for page in out.chunks_mut(PAGE) {
        match rng.random_range(0..3) {
            0 => {}
            1 => rng.fill(page),
            _ => {
                let word: [u8; 8] = rng.random();
                for (i, b) in page.iter_mut().enumerate() {
                    *b = word[i % 8];
                }
            }
        }
    }
    out
}

/// The pack files of the store in `store_dir`, sorted.
pub fn packs(store_dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(store_dir.join("packs")).unwrap().flatten().map(|e| e.path()).collect();
    v.sort();
    v
}

/// Inputs of the machine that loses power: written by the test, read by its child.
pub fn inputs(dir: &Path) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let (a, b, c) = (image(1, 2048), image(2, 2048), image(3, 2048));
    let mut b_on_a = a.clone();
    for p in (0..2048).step_by(37) {
        b_on_a[p * PAGE..(p + 1) * PAGE].copy_from_slice(&b[p * PAGE..(p + 1) * PAGE]);
    }
    for (name, data) in [("a.raw", &a), ("b.raw", &b_on_a), ("c.raw", &c)] {
        std::fs::write(dir.join(name), data).unwrap();
    }
    (a, b_on_a, c)
}

/// The machine that loses power, run as a child process of the test: commits what it reports
/// on stdout, starts a transaction it never
/// commits, cuts the power of the filesystem holding the store and dies on the spot, as the
/// machine would, without closing anything.
pub fn store_machine(mount: &Path, inputs: &Path) -> ! {
    testfs::machine_panics_are_failures();
    let dir = mount.join("store");
    let store = Store::open(&dir, OpenOptions::default()).expect("open store");
    // In flight at the cut: a transaction that writes pack data and never commits. The kernel
    // wrote back its first part (it may, at any time): flushed here, before anything else
    // happened, so that the flush makes nothing that the reported commits wrote durable.
    let before = packs(&dir);
    let mut in_flight_tx = store.begin().unwrap();
    in_flight_tx.ingest_image(&inputs.join("c.raw"), &IngestOptions::default()).unwrap();
    let f = std::fs::File::open(&dir).unwrap();
    // SAFETY: syncfs on a descriptor we own; it touches no memory of ours.
    assert_eq!(unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&f)) }, 0);
    let in_flight: Vec<PathBuf> = packs(&dir).into_iter().filter(|p| !before.contains(p)).collect();

    // Reported commits: a full ingest, an incremental one, a workspace checkpoint.
    let ia = store.ingest_image(&inputs.join("a.raw"), &IngestOptions::default(), Some("a")).unwrap();
    let opts = IngestOptions { parent: Some(ia.id), ..Default::default() };
    let ib = store.ingest_image(&inputs.join("b.raw"), &opts, Some("b")).unwrap();
    let ws = mount.join("ws");
    std::fs::create_dir_all(ws.join("src")).unwrap();
    std::fs::write(ws.join("src/main.rs"), "fn main() {}\n").unwrap();
    std::fs::write(ws.join("disk.img"), &std::fs::read(inputs.join("c.raw")).unwrap()[..1 << 20]).unwrap();
    std::fs::hard_link(ws.join("disk.img"), ws.join("disk-link.img")).unwrap();
    let ck = workspace::checkpoint(&store, &ws, Some("before the cut")).unwrap();
    // The agent's risky action, then the revert that undoes it (reported, so it must hold).
    std::fs::write(ws.join("src/main.rs"), "fn main() { broken }\n").unwrap();
    std::fs::remove_file(ws.join("disk-link.img")).unwrap();
    std::fs::write(ws.join("new.txt"), "made after the checkpoint\n").unwrap();
    workspace::checkpoint(&store, &ws, Some("the risky action")).unwrap();
    workspace::revert(&store, &ws, &ck.id).unwrap();
    // A runtime's checkpoint image (gVisor's), written and not synced by its runtime, adopted
    // whole as a pack.
    let runtime_image = mount.join("checkpoint.img");
    std::fs::write(&runtime_image, image(4, 768)).unwrap();
    let mut tx = store.begin().unwrap();
    for (k, blob) in tx.adopt_file_as_blobs(&runtime_image, 1 << 20).unwrap().iter().enumerate() {
        tx.set_ref(&format!("runtime-{k}"), blob.id).unwrap();
    }
    tx.commit().unwrap();
    let refs: Vec<(String, String)> =
        store.list_refs("").unwrap().into_iter().map(|(n, id)| (n, id.to_hex())).collect();

    // The transaction in flight writes more, which the cut loses: its pack survives torn.
    in_flight_tx.ingest_image(&inputs.join("b.raw"), &IngestOptions::default()).unwrap();
    in_flight_tx.set_ref("c", snapfork_store::Hash::of(b"never committed")).unwrap();
    let report = serde_json::json!({
        "a": ia.id.to_hex(), "b": ib.id.to_hex(),
        "checkpoint": ck.id.hex(), "refs": refs, "in_flight": in_flight,
    });
    println!("MACHINE {report}");
    testfs::power_cut_and_exit(mount)
}

/// Image `i` of round `r` of the busy machine: one base shared by all, pages of its own, and a
/// third of the previous image's own pages. Dropping an image then leaves its pack a third
/// live, which gc rewrites: the cuts also fall among pack rewrites.
pub fn busy_image(r: u64, i: u64) -> Vec<u8> {
    let mut img = image(7, 1024);
    let mut take = |i: u64, every: usize| {
        let own = image(r * 1000 + i, 1024);
        for p in ((i % 13) as usize..1024).step_by(13 * every) {
            img[p * PAGE..(p + 1) * PAGE].copy_from_slice(&own[p * PAGE..(p + 1) * PAGE]);
        }
    };
    if i > 0 {
        take(i - 1, 3);
    }
    take(i, 1);
    img
}

/// File `k` of checkpoint `i` of round `r` of the busy machine's workspace.
pub fn busy_file(r: u64, i: u64, k: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64((r * 1000 + i) * 10 + k);
    let mut v = vec![0u8; (k as usize + 1) * 40_000];
    rng.fill(&mut v[..]);
    v
}

/// The ref of image `i` of round `r` (zero-padded: refs list in the order they were made).
pub fn busy_ref(r: u64, i: u64) -> String {
    format!("img-{r}-{i:06}")
}

/// A machine at work when its power goes, `after_ms` after its first commit: one thread
/// ingests images, one edits and checkpoints a workspace, one drops old image refs and
/// collects garbage. Each commit is reported on stdout once it returned (`COMMIT image r i ID`,
/// `COMMIT ckpt r i ID`); each ref drop before it is made (`DROPPING NAME`). `scratch` is off
/// the filesystem that loses power.
pub fn busy_machine(mount: &Path, scratch: &Path, r: u64, after_ms: u64) -> ! {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};
    testfs::machine_panics_are_failures();
    let store = Store::open(mount.join("store"), OpenOptions::default()).expect("open store");
    let committed = std::sync::Arc::new(AtomicBool::new(false));
    let say = |line: String| {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}").unwrap();
        out.flush().unwrap();
    };
    let report = {
        let committed = committed.clone();
        move |what: &str, i: u64, id: String| {
            say(format!("COMMIT {what} {r} {i} {id}"));
            committed.store(true, Ordering::SeqCst);
        }
    };
    let _ingest = {
        let (store, dir, report) = (store.clone(), scratch.to_path_buf(), report.clone());
        std::thread::spawn(move || {
            for i in 0.. {
                let path = dir.join(format!("img-{i}.raw"));
                std::fs::write(&path, busy_image(r, i)).unwrap();
                let info = store.ingest_image(&path, &IngestOptions::default(), Some(&busy_ref(r, i))).unwrap();
                report("image", i, info.id.to_hex());
                std::fs::remove_file(&path).unwrap();
            }
        })
    };
    let _checkpoints = {
        let (store, ws) = (store.clone(), mount.join(format!("ws-{r}")));
        std::thread::spawn(move || {
            std::fs::create_dir_all(&ws).unwrap();
            for i in 0.. {
                for k in 0..3 {
                    std::fs::write(ws.join(format!("f{k}")), busy_file(r, i, k)).unwrap();
                }
                let ck = workspace::checkpoint(&store, &ws, None).unwrap();
                report("ckpt", i, ck.id.hex());
            }
        })
    };
    let _gc = {
        let store = store.clone();
        std::thread::spawn(move || {
            loop {
                // Images are dropped (all but the newest four) and collected while others are
                // ingested.
                for (name, _) in store.list_refs("img-").unwrap().into_iter().rev().skip(4) {
                    say(format!("DROPPING {name}"));
                    let mut tx = store.begin().unwrap();
                    tx.delete_ref(&name);
                    tx.commit().unwrap();
                }
                let gc = store.gc(&GcOptions { grace: std::time::Duration::ZERO, ..Default::default() }).unwrap();
                if gc.repacked > 0 {
                    say(format!("REPACKED {}", gc.repacked));
                }
            }
        })
    };
    while !committed.load(Ordering::SeqCst) {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    std::thread::sleep(std::time::Duration::from_millis(after_ms));
    testfs::power_cut_and_exit(mount)
}

/// The engine of the store in `root/store`, its state in `root/engine`.
pub fn engine_at(root: &Path) -> Engine {
    let store = Store::open(root.join("store"), OpenOptions::default()).expect("open store");
    let opts = EngineOptions { state_dir: root.join("engine"), ..EngineOptions::for_store(&store) };
    Engine::open(store, opts).expect("open engine")
}

/// The sandbox's files in version `v` (1 or 2): memory, state, disk, a workspace file.
pub fn version(v: u8) -> [(&'static str, Vec<u8>); 4] {
    let mut mem = vec![0u8; 64 * PAGE];
    for (i, page) in mem.chunks_mut(PAGE).enumerate() {
        if i % 3 != 0 {
            page.fill((i as u8).wrapping_mul(v).wrapping_add(v));
        }
    }
    let disk: Vec<u8> = (0..16 * PAGE).map(|i| (i / PAGE) as u8 ^ if i < PAGE { v } else { 0 }).collect();
    [
        ("vm/mem", mem),
        ("vm/vmstate", format!("cpu registers v{v}").into_bytes()),
        ("vm/disk.img", disk),
        ("ws/notes.txt", format!("notes v{v}\n").into_bytes()),
    ]
}

pub fn write_version(root: &Path, v: u8) {
    for (f, data) in version(v) {
        std::fs::write(root.join(f), data).unwrap();
    }
}

/// The machine of a raw sandbox: run, checkpoint (v1), change everything, checkpoint (v2), revert to v1; report
/// the snapshots, cut the power and die on the spot.
pub async fn engine_machine(root: &Path) -> ! {
    testfs::machine_panics_are_failures();
    std::fs::create_dir_all(root.join("vm")).unwrap();
    std::fs::create_dir_all(root.join("ws")).unwrap();
    write_version(root, 1);
    let engine = engine_at(root);
    let cfg = RawConfig {
        memory: Some(root.join("vm/mem")),
        state: vec![root.join("vm/vmstate")],
        disks: vec![root.join("vm/disk.img")],
        page_size: PAGE as u32,
    };
    let spec = RunSpec { name: "vm".into(), driver: DriverConfig::Raw(cfg), workspace: Some(root.join("ws")) };
    engine.run(spec).await.unwrap();
    let a = engine.checkpoint("vm", CheckpointOptions { message: "v1".into(), ..Default::default() }).await.unwrap();
    write_version(root, 2);
    std::fs::write(root.join("ws/new.txt"), "after v1").unwrap();
    let b = engine.checkpoint("vm", CheckpointOptions { message: "v2".into(), ..Default::default() }).await.unwrap();
    engine.revert("vm", &a.id).await.unwrap();
    println!("MACHINE {} {}", a.id, b.id);
    testfs::power_cut_and_exit(root)
}
