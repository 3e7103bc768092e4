//! `snapfork demo`: the main job end to end on a real gVisor sandbox.
//!
//! A sandboxed shell keeps a counter in memory and appends it to a file in its workspace. The demo
//! checkpoints it before a risky action (which deletes the workspace and corrupts the counter),
//! reverts, forks three ways that each continue differently, and prints the history tree, the
//! timings and the store's dedup figures.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use serde_json::json;
use snapfork_engine::{CheckpointOptions, DriverConfig, Engine, GvisorConfig, RunSpec, tokio};

use crate::Global;
use crate::output::Report;
use crate::sandbox_cmds::{busybox_rootfs, open_engine, runtime};

/// The sandbox's program: `i` lives only in the shell's memory; the file is its trace.
/// USR1 is the "risky action" corrupting memory; USR2 reads a new step size (forks diverge).
pub const COUNTER_SCRIPT: &str = "i=0; step=1; trap 'i=-999999' USR1; \
     trap 'step=$(cat /workspace/step)' USR2; \
     while true; do i=$((i+step)); echo $i >> /workspace/counter.log; sleep 0.2; done";

/// `demo` options.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Name of the demo sandbox (forks are NAME-1..3). Earlier sandboxes of these names are removed.
    #[arg(long, default_value = "demo")]
    pub name: String,
    /// Leave the sandboxes running at the end.
    #[arg(long)]
    pub keep: bool,
}

fn lines(path: &Path) -> Vec<i64> {
    std::fs::read_to_string(path).unwrap_or_default().lines().filter_map(|l| l.trim().parse().ok()).collect()
}

fn tail(v: &[i64], n: usize) -> String {
    let s: Vec<String> = v[v.len().saturating_sub(n)..].iter().map(|x| x.to_string()).collect();
    s.join(" ")
}

async fn wait_lines(path: &Path, n: usize) -> anyhow::Result<()> {
    for _ in 0..200 {
        if lines(path).len() >= n {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("the sandbox did not write {} lines to {}", n, path.display())
}

/// Runs the demo.
pub fn run(a: DemoArgs, global: &Global) -> anyhow::Result<Report> {
    let engine = open_engine(global)?;
    let rootfs = busybox_rootfs(global)?;
    runtime()?.block_on(demo(engine, rootfs, a, global.json))
}

/// Runs `script` in sandbox `name`'s shell; a non-zero exit is an error.
async fn sh(engine: &Engine, name: &str, script: &str) -> anyhow::Result<()> {
    let r = engine.exec(name, vec!["/bin/sh".into(), "-c".into(), script.into()]).await?;
    anyhow::ensure!(r.exit_code == 0, "`{script}` in {name} exited {}: {}", r.exit_code, r.stderr.trim_end());
    Ok(())
}

async fn demo(engine: Engine, rootfs: PathBuf, a: DemoArgs, quiet: bool) -> anyhow::Result<Report> {
    let say = |s: String| {
        if !quiet {
            println!("{s}");
        }
    };
    let name = a.name.clone();
    for s in engine.ls().await? {
        if s.name == name || s.name.starts_with(&format!("{name}-")) {
            engine.rm(&s.name).await?;
        }
    }
    let mut timings: Vec<(String, f64)> = Vec::new();
    let cfg = GvisorConfig::new(rootfs, vec!["/bin/sh".into(), "-c".into(), COUNTER_SCRIPT.into()]);
    let started =
        engine.run(RunSpec { name: name.clone(), driver: DriverConfig::Gvisor(cfg), workspace: None }).await?;
    timings.push(("run".into(), started.timings.total_ms));
    let ws = started.workspace.clone().unwrap_or_default();
    let log = ws.join("counter.log");
    say(format!(
        "1. started gVisor sandbox '{name}' ({:.0} ms): a shell keeps counter i in memory and appends it to /workspace/counter.log every 0.2 s",
        started.timings.total_ms
    ));
    wait_lines(&log, 5).await?;
    say(format!("   counter.log ends: {}", tail(&lines(&log), 5)));

    let ck = engine
        .checkpoint(
            &name,
            CheckpointOptions { message: "before risky action".into(), leave_running: true, ..Default::default() },
        )
        .await?;
    timings.push(("checkpoint".into(), ck.timings.total_ms));
    let at_ck = *lines(&log).iter().filter(|&&x| x > 0).max().unwrap_or(&0);
    // Forced: a demo run again marks its own new safe point.
    engine.tag(&ck.id, &format!("{name}-safe"), true).await?;
    say(format!(
        "2. checkpoint {} \"before risky action\" in {:.0} ms (memory image + workspace of one instant); {} bytes stored; tagged {name}-safe",
        &ck.id[..12],
        ck.timings.total_ms,
        ck.stored_bytes_added
    ));

    sh(&engine, &name, "rm -rf /workspace/*; kill -USR1 1").await?;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let after = lines(&log);
    say(format!(
        "3. risky action: workspace deleted and counter corrupted; counter.log now: {}",
        if after.is_empty() { "(gone)".into() } else { tail(&after, 3) }
    ));

    let rv = engine.revert(&name, &ck.id).await?;
    timings.push(("revert".into(), rv.timings.total_ms));
    wait_lines(&log, at_ck as usize + 3).await?;
    let back = lines(&log);
    let consecutive = back.windows(2).all(|w| w[1] == w[0] + 1) && back.first() == Some(&1);
    say(format!(
        "4. reverted to {} in {:.0} ms: counter.log is back and the counter continues from memory: ... {} (1..{} consecutive: {})",
        &ck.id[..12],
        rv.timings.total_ms,
        tail(&back, 6),
        back.last().unwrap_or(&0),
        consecutive
    ));

    let forks = engine.fork(&ck.id, 3, Some(&name)).await?;
    let fork_ms = forks.iter().map(|f| f.timings.total_ms).fold(0.0, f64::max);
    timings.push(("fork x3 (slowest)".into(), fork_ms));
    for (k, f) in forks.iter().enumerate() {
        let step = 10i64.pow(k as u32 + 1);
        sh(
            &engine,
            &f.name,
            &format!("echo {step} > /workspace/step; echo branch {k} > /workspace/branch.txt; kill -USR2 1"),
        )
        .await?;
    }
    say(format!(
        "5. forked 3 sandboxes from {} in parallel (slowest {:.0} ms); each now counts in steps of 10, 100, 1000:",
        &ck.id[..12],
        fork_ms
    ));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut fork_tails = Vec::new();
    for f in &forks {
        let l = lines(&f.workspace.clone().unwrap_or_default().join("counter.log"));
        say(format!("   {}: ... {}", f.name, tail(&l, 4)));
        fork_tails.push(json!({"name": f.name, "tail": l[l.len().saturating_sub(4)..].to_vec()}));
    }
    let ck2 = engine
        .checkpoint(
            &forks[0].name,
            CheckpointOptions { message: "fork 1 after diverging".into(), leave_running: true, ..Default::default() },
        )
        .await?;
    timings.push(("second checkpoint (fork 1)".into(), ck2.timings.total_ms));
    say(format!(
        "6. checkpoint of {} on top: {} bytes added to the store (runsc's image is one compressed stream; see BENCHMARKS.md)",
        forks[0].name, ck2.stored_bytes_added
    ));
    let tree = engine.log(None).await?;
    say(format!("\nhistory tree:\n{}", tree.tree.trim_end()));
    say("\ntimings:".into());
    for (op, ms) in &timings {
        say(format!("   {op:<28} {ms:>8.0} ms"));
    }
    let store = engine.store().clone();
    let stats = tokio::task::spawn_blocking(move || store.stats("")).await??;
    say(format!(
        "\nstore: {} logical bytes across {} refs, {} stored in packs; dedup ratio {:.2}",
        stats.total.logical_bytes, stats.total.refs, stats.total.stored_bytes, stats.total.dedup_ratio
    ));
    if !a.keep {
        for f in &forks {
            engine.rm(&f.name).await?;
        }
        engine.rm(&name).await?;
    }
    let report = json!({
        "id": ck.id,
        "consecutive_after_revert": consecutive,
        "forks": fork_tails,
        "timings_ms": timings.iter().map(|(k, v)| json!({"op": k, "ms": v})).collect::<Vec<_>>(),
        "second_checkpoint_bytes": ck2.stored_bytes_added,
        "tree": tree,
        "store": serde_json::to_value(&stats.total)?,
    });
    if !consecutive {
        anyhow::bail!("revert did not restore memory and files consistently: {}", tail(&back, 12));
    }
    Ok(Report::new(report, String::new()))
}
