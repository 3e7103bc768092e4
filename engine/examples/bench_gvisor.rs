//! Benchmark: checkpoint, restore and fork of a gVisor sandbox whose process holds ~100 MiB of
//! heap, through snapfork vs plain `runsc checkpoint` / `runsc restore` on the same kind of
//! sandbox, side by side in one run; plus the bytes a second checkpoint adds to the store.
//!
//! Run (root, runsc, python3 on the host):
//! `cargo run --release -p snapfork-engine --example bench_gvisor -- [--mib 100] [--rounds 3]`
//!
//! The sandbox runs the host's python3 (host `/usr` bind-mounted read-only): it fills a
//! bytearray with `--mib` MiB of random bytes (incompressible, like real heap at worst), then
//! appends a counter to /workspace/counter.log every 0.1 s.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use snapfork_engine::runsc::Runsc;
use snapfork_engine::{CheckpointOptions, DriverConfig, Engine, EngineOptions, GvisorConfig, RunSpec};
use snapfork_store::{OpenOptions, Store};

fn program(mib: u64) -> String {
    format!(
        "import os, time\n\
         heap = bytearray(os.urandom({mib} << 20))\n\
         i = 0\n\
         while True:\n\
         \x20   i += 1\n\
         \x20   heap[(i * 4096) % len(heap)] = i % 256\n\
         \x20   with open('/workspace/counter.log', 'a') as f:\n\
         \x20       f.write('%d\\n' % i)\n\
         \x20   time.sleep(0.1)\n"
    )
}

fn rootfs(dir: &Path) -> PathBuf {
    let r = dir.join("rootfs");
    for d in ["proc", "dev", "sys", "tmp", "workspace", "usr", "etc"] {
        std::fs::create_dir_all(r.join(d)).unwrap();
    }
    for (l, t) in [("bin", "usr/bin"), ("lib", "usr/lib"), ("lib64", "usr/lib64"), ("sbin", "usr/sbin")] {
        let _ = std::os::unix::fs::symlink(t, r.join(l));
    }
    r
}

fn config(rootfs: &Path, mib: u64) -> GvisorConfig {
    let mut c = GvisorConfig::new(rootfs.to_path_buf(), vec!["/usr/bin/python3".into(), "-c".into(), program(mib)]);
    c.ro_mounts.push((PathBuf::from("/usr"), "/usr".into()));
    c
}

fn count(path: &Path) -> usize {
    std::fs::read_to_string(path).map(|s| s.lines().count()).unwrap_or(0)
}

/// Waits until the counter file grows past `n` lines (the process is up and past its heap fill).
fn wait_past(path: &Path, n: usize) -> Duration {
    let t = Instant::now();
    while count(path) <= n {
        assert!(t.elapsed() < Duration::from_secs(120), "{} stuck at {n}", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
    t.elapsed()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Flushes every dirty page (the images earlier steps left in the page cache) so that each timed
/// operation starts with an idle disk, whichever side wrote last.
fn quiesce() {
    nix::unistd::sync();
}

fn copy_tree(src: &Path, dst: &Path) {
    let st = std::process::Command::new("cp").arg("-a").arg(src).arg(dst).status().unwrap();
    assert!(st.success());
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let get = |flag: &str, d: u64| {
        args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(d)
    };
    // RUST_LOG=snapfork_store=debug,snapfork_fsfork=debug shows where a checkpoint's time goes.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let mib = get("--mib", 100);
    let rounds = get("--rounds", 3) as usize;
    assert!(nix_is_root(), "bench_gvisor needs root (runsc)");
    let tmp = tempfile::Builder::new().prefix("sf-bench-gvisor-").tempdir_in("/var/tmp").unwrap();
    let dir = tmp.path();
    let rootfs = rootfs(dir);
    let cfg = config(&rootfs, mib);

    // ---- baseline: plain runsc on its own root ----
    let base = Runsc::new(dir.join("runsc-base"));
    std::fs::create_dir_all(&base.root).unwrap();
    let (mut b_ck, mut b_rs, mut b_fork, mut b_img) = (vec![], vec![], vec![], 0u64);
    let mut b_lr = vec![];
    let (mut s_lr, mut s_cold) = (vec![], vec![]);
    // ---- snapfork ----
    let store = Store::open(dir.join("store"), OpenOptions::default()).unwrap();
    let opts = EngineOptions { state_dir: dir.join("engine"), ..EngineOptions::for_store(&store) };
    let engine = Engine::open(store, opts).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (mut s_ck, mut s_rs, mut s_fork, mut second_added, mut first_added) = (vec![], vec![], vec![], vec![], vec![]);
    let mut s_ck_steps = Vec::new();
    let mut s_lr_steps = Vec::new();

    for round in 0..rounds {
        // Baseline round.
        let ws = dir.join(format!("b-ws-{round}"));
        std::fs::create_dir_all(&ws).unwrap();
        let bundle = dir.join(format!("b-bundle-{round}"));
        cfg.write_bundle(&bundle, Some(&ws)).unwrap();
        let log = dir.join(format!("b-console-{round}.log"));
        let id = format!("bench-base-{round}-{}", std::process::id());
        base.run_detached(&id, &bundle, &log).unwrap();
        wait_past(&ws.join("counter.log"), 5);
        let img = dir.join(format!("b-img-{round}"));
        std::fs::create_dir_all(&img).unwrap();
        quiesce();
        let t = Instant::now();
        base.checkpoint(&id, &img).unwrap();
        b_ck.push(ms(t.elapsed()));
        b_img = std::fs::metadata(img.join("checkpoint.img")).unwrap().len();
        let rid = format!("{id}-r");
        quiesce();
        let t = Instant::now();
        base.restore_detached(&rid, &bundle, &img, &log).unwrap();
        b_rs.push(ms(t.elapsed()));
        // Fork x3 by hand: copy the workspace, restore the image into 3 containers in parallel.
        quiesce();
        let t = Instant::now();
        let handles: Vec<_> = (0..3)
            .map(|k| {
                let (base, img, dir) = (base.clone(), img.clone(), dir.to_path_buf());
                let (ws, cfg, log, id) = (ws.clone(), cfg.clone(), log.clone(), id.clone());
                std::thread::spawn(move || {
                    let fws = dir.join(format!("b-fork-{round}-{k}"));
                    copy_tree(&ws, &fws);
                    let fb = dir.join(format!("b-fork-bundle-{round}-{k}"));
                    cfg.write_bundle(&fb, Some(&fws)).unwrap();
                    base.restore_detached(&format!("{id}-f{k}"), &fb, &img, &log).unwrap();
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        b_fork.push(ms(t.elapsed()));
        // Checkpoint and keep running: plain runsc needs checkpoint + restore (its own
        // --leave-running never returns; see engine/README.md).
        let img2 = dir.join(format!("b-img2-{round}"));
        std::fs::create_dir_all(&img2).unwrap();
        quiesce();
        let t = Instant::now();
        base.checkpoint(&rid, &img2).unwrap();
        base.restore_detached(&format!("{id}-r2"), &bundle, &img2, &log).unwrap();
        b_lr.push(ms(t.elapsed()));
        for rid in [
            format!("{id}-r"),
            format!("{id}-r2"),
            format!("{id}-f0"),
            format!("{id}-f1"),
            format!("{id}-f2"),
            id.clone(),
        ] {
            base.discard(&rid);
        }

        // snapfork round.
        let name = format!("s{round}");
        rt.block_on(async {
            let info = engine
                .run(RunSpec { name: name.clone(), driver: DriverConfig::Gvisor(cfg.clone()), workspace: None })
                .await
                .unwrap();
            let slog = info.workspace.clone().unwrap().join("counter.log");
            wait_past(&slog, 5);
            quiesce();
            let t = Instant::now();
            let ck = engine.checkpoint(&name, CheckpointOptions::default()).await.unwrap();
            s_ck.push(ms(t.elapsed()));
            first_added.push(ck.stored_bytes_added as f64);
            s_ck_steps.push(ck.timings.steps.clone());
            quiesce();
            let t = Instant::now();
            let r = engine.restore(&ck.id, &format!("{name}-r")).await.unwrap();
            s_rs.push(ms(t.elapsed()));
            quiesce();
            let t = Instant::now();
            engine.fork(&ck.id, 3, Some(&format!("{name}-f"))).await.unwrap();
            s_fork.push(ms(t.elapsed()));
            // Restore with the local image cache emptied: the image comes out of the store.
            let _ = std::fs::remove_dir_all(dir.join("engine/cache"));
            quiesce();
            let t = Instant::now();
            engine.restore(&ck.id, &format!("{name}-cold")).await.unwrap();
            s_cold.push(ms(t.elapsed()));
            // Second checkpoint of the restored sandbox after it ran a little, kept running:
            // its time, and what it adds to the store.
            let rlog = r.workspace.clone().unwrap().join("counter.log");
            let n = count(&rlog);
            wait_past(&rlog, n + 3);
            quiesce();
            let t = Instant::now();
            let ck2 = engine
                .checkpoint(&format!("{name}-r"), CheckpointOptions { leave_running: true, ..Default::default() })
                .await
                .unwrap();
            s_lr.push(ms(t.elapsed()));
            s_lr_steps.push(ck2.timings.steps.clone());
            second_added.push(ck2.stored_bytes_added as f64);
            for s in engine.ls().await.unwrap() {
                engine.rm(&s.name).await.unwrap();
            }
        });
        eprintln!("round {round} done");
    }
    engine.kill_all_blocking();

    let pct = |s: f64, b: f64| (s / b - 1.0) * 100.0;
    let (bc, sc) = (median(b_ck), median(s_ck));
    let (br, sr) = (median(b_rs), median(s_rs));
    let (bf, sf) = (median(b_fork), median(s_fork));
    println!(
        "gVisor sandbox, python3 holding {mib} MiB of random heap; median of {rounds} rounds; runsc image {:.1} MB",
        b_img as f64 / 1e6
    );
    println!("| operation | plain runsc | snapfork | overhead |");
    println!("|---|---|---|---|");
    println!("| checkpoint (sandbox stops) | {bc:.0} ms | {sc:.0} ms | {:+.0}% |", pct(sc, bc));
    println!("| restore into a new sandbox | {br:.0} ms | {sr:.0} ms | {:+.0}% |", pct(sr, br));
    println!("| fork x3 (parallel) | {bf:.0} ms | {sf:.0} ms | {:+.0}% |", pct(sf, bf));
    let (bl, sl) = (median(b_lr), median(s_lr));
    println!("| checkpoint, keep running | {bl:.0} ms | {sl:.0} ms | {:+.0}% |", pct(sl, bl));
    let sco = median(s_cold);
    println!("| restore, image read from the store (cache empty) | {br:.0} ms | {sco:.0} ms | {:+.0}% |", pct(sco, br));
    println!(
        "first checkpoint stored {:.1} MB; a second checkpoint (same process, seconds later) added {:.1} MB",
        median(first_added) / 1e6,
        median(second_added) / 1e6
    );
    println!("snapfork checkpoint steps (last round): {:?}", s_ck_steps.last().unwrap());
    println!("snapfork keep-running checkpoint steps (last round): {:?}", s_lr_steps.last().unwrap());
}

fn nix_is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}
