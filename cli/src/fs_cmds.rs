//! Workspace commands: checkpoint, restore, fork, revert, diff and log of directory trees, plus
//! a plain reflink clone.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use serde_json::json;
use snapfork_fsfork::workspace::{self, Side};
use snapfork_store::{OpenOptions, Store};

use crate::Global;
use crate::output::{self, Report};

/// Workspace (directory tree) commands.
#[derive(Subcommand, Debug)]
pub enum FsCmd {
    /// Record a workspace directory as a checkpoint in the store.
    Checkpoint {
        /// The workspace directory.
        dir: PathBuf,
        /// A message describing the checkpoint.
        #[arg(short, long)]
        message: Option<String>,
    },
    /// Materialize a checkpoint into a new directory.
    Restore {
        /// Checkpoint id (or unique prefix, or ref name).
        checkpoint: String,
        /// The new directory (must not exist).
        dir: PathBuf,
    },
    /// Make N independent copies of a checkpoint as DIR/fork-1 .. DIR/fork-N.
    Fork {
        /// Checkpoint id (or unique prefix, or ref name).
        checkpoint: String,
        /// How many copies.
        #[arg(short = 'n', long, default_value_t = 1)]
        count: usize,
        /// The directory to create the copies in.
        #[arg(long)]
        into: PathBuf,
    },
    /// Put a workspace back to a checkpoint, atomically (swap with RENAME_EXCHANGE).
    Revert {
        /// The workspace directory.
        dir: PathBuf,
        /// Checkpoint id (or unique prefix, or ref name).
        checkpoint: String,
        /// Remove the old tree before returning instead of in the background.
        #[arg(long)]
        wait: bool,
    },
    /// Show what differs between two checkpoints, or a checkpoint and a live directory.
    Diff {
        /// A checkpoint or a directory.
        a: String,
        /// A checkpoint or a directory.
        b: String,
    },
    /// Show a workspace's history: checkpoints, reverts, and the trees forked from them.
    Log {
        /// The workspace directory.
        dir: PathBuf,
    },
    /// Forget workspaces: their records, stat caches and places in their checkpoints' lists of
    /// forks (the trees and checkpoints stay). For trees you remove yourself.
    Forget {
        /// The workspace directories (gone or not).
        #[arg(required_unless_present = "gone", conflicts_with = "gone")]
        dirs: Vec<PathBuf>,
        /// Every recorded workspace whose directory is gone (removed by hand).
        #[arg(long)]
        gone: bool,
        /// With --gone: only list them.
        #[arg(long, requires = "gone")]
        dry_run: bool,
    },
    /// Clone a directory tree with reflinks (sparse-aware copy where impossible).
    Clone {
        /// The source tree.
        src: PathBuf,
        /// The new directory (must not exist).
        dst: PathBuf,
    },
}

fn open(global: &Global, read_only: bool) -> anyhow::Result<Store> {
    if !read_only {
        crate::daemon::refuse_if_serving(global, "this command")?;
    }
    Store::open(
        &global.store,
        OpenOptions { read_only, lock_timeout: global.lock_timeout(), create: !read_only, ..OpenOptions::default() },
    )
    .with_context(|| format!("open store {}", global.store.display()))
}

fn side<'a>(store: &Store, arg: &'a str) -> anyhow::Result<Side<'a>> {
    let p = std::path::Path::new(arg);
    if p.is_dir() {
        return Ok(Side::Dir(p));
    }
    Ok(Side::Checkpoint(workspace::resolve_checkpoint(store, arg)?))
}

/// Runs one workspace command.
pub fn run(cmd: FsCmd, global: &Global) -> anyhow::Result<Report> {
    match cmd {
        FsCmd::Checkpoint { dir, message } => {
            let _busy = output::spinner(global, "checkpoint");
            let store = open(global, false)?;
            let r = workspace::checkpoint(&store, &dir, message.as_deref())?;
            let text = format!(
                "checkpoint {} of {}: {} files ({} read, {} bytes hashed), {} new objects, {} in {:.1} ms",
                r.id,
                dir.display(),
                r.files,
                r.hashed_files,
                r.hashed_bytes,
                r.new_objects,
                r.mode,
                r.elapsed_ms
            );
            Ok(Report::new(serde_json::to_value(&r)?, text))
        }
        FsCmd::Restore { checkpoint, dir } => {
            let _busy = output::spinner(global, "restore");
            let store = open(global, false)?;
            let id = workspace::resolve_checkpoint(&store, &checkpoint)?;
            let r = workspace::restore(&store, &id, &dir)?;
            let mut j = serde_json::to_value(&r)?;
            j["id"] = json!(r.path);
            let mut text = format!(
                "restored {} into {} ({}, {} files, {:.1} ms)",
                id.short(),
                r.path.display(),
                r.mode,
                r.files,
                r.elapsed_ms
            );
            if r.owner_failures > 0 {
                text += &format!(
                    "; {} entries are yours, not their recorded owner's (only root may chown)",
                    r.owner_failures
                );
            }
            Ok(Report::new(j, text))
        }
        FsCmd::Fork { checkpoint, count, into } => {
            let store = open(global, false)?;
            let id = workspace::resolve_checkpoint(&store, &checkpoint)?;
            let start = std::time::Instant::now();
            std::fs::create_dir_all(&into).with_context(|| format!("create {}", into.display()))?;
            let bar = output::progress_count(global, count as u64, "forking");
            let mut forks = Vec::with_capacity(count);
            for i in 1..=count {
                forks.push(workspace::fork_one(&store, &id, &into.join(format!("fork-{i}")))?);
                bar.inc(1);
            }
            bar.finish_and_clear();
            let ms = start.elapsed().as_secs_f64() * 1000.0;
            let ids: Vec<_> = forks.iter().map(|f| f.path.clone()).collect();
            let text = forks
                .iter()
                .map(|f| format!("{}  ({}, {:.1} ms)", f.path.display(), f.mode, f.elapsed_ms))
                .collect::<Vec<_>>()
                .join("\n");
            Ok(Report::new(json!({ "id": ids, "checkpoint": id, "forks": forks, "elapsed_ms": ms }), text))
        }
        FsCmd::Revert { dir, checkpoint, wait } => {
            let _busy = output::spinner(global, "revert");
            let store = open(global, false)?;
            let id = workspace::resolve_checkpoint(&store, &checkpoint)?;
            let r = workspace::revert(&store, &dir, &id)?;
            if wait {
                std::fs::remove_dir_all(&r.old_tree).with_context(|| format!("remove {}", r.old_tree.display()))?;
            } else {
                // The old tree goes away after we exit: a detached `rm` in its own process group.
                use std::os::unix::process::CommandExt;
                std::process::Command::new("rm")
                    .args(["-rf", "--one-file-system", "--"])
                    .arg(&r.old_tree)
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .process_group(0)
                    .spawn()
                    .with_context(|| format!("start removal of {}", r.old_tree.display()))?;
            }
            let text = format!("reverted {} to {} ({:.1} ms)", r.path.display(), id.short(), r.elapsed_ms);
            Ok(Report::new(serde_json::to_value(&r)?, text))
        }
        FsCmd::Diff { a, b } => {
            let _busy = output::spinner(global, "diff");
            let store = open(global, true)?;
            let d = workspace::diff(&store, side(&store, &a)?, side(&store, &b)?)?;
            let mut text = String::new();
            for p in &d.added {
                text.push_str(&format!("A {p}\n"));
            }
            for p in &d.removed {
                text.push_str(&format!("D {p}\n"));
            }
            for c in &d.changed {
                text.push_str(&format!("M {} ({})\n", c.path, c.detail.join(", ")));
            }
            Ok(Report::new(serde_json::to_value(&d)?, text))
        }
        FsCmd::Log { dir } => {
            let store = open(global, true)?;
            let (record, entries) = workspace::log(&store, &dir)?;
            let mut text = format!("workspace {}\n", record.path);
            for e in &entries {
                let short = &e.checkpoint[..12.min(e.checkpoint.len())];
                match e.kind.as_str() {
                    "checkpoint" => text.push_str(&format!(
                        "* checkpoint {short}{}{}\n",
                        e.parent.as_deref().map(|p| format!(" (parent {})", &p[..12.min(p.len())])).unwrap_or_default(),
                        e.message.as_deref().map(|m| format!("  {m}")).unwrap_or_default()
                    )),
                    kind => text.push_str(&format!("* {kind} from {short}\n")),
                }
                for o in &e.offspring {
                    text.push_str(&format!("|\\_ {} {}\n", o.kind, o.path));
                }
            }
            Ok(Report::new(json!({ "workspace": record.path, "head": record.head, "events": entries }), text))
        }
        FsCmd::Forget { dirs, gone, dry_run } => {
            let store = open(global, dry_run)?;
            let forgotten = if gone {
                workspace::prune(&store, dry_run)?
            } else {
                let forget =
                    |d: &PathBuf| workspace::forget(&store, d).with_context(|| format!("forget {}", d.display()));
                dirs.iter().map(forget).collect::<anyhow::Result<Vec<_>>>()?
            };
            let verb = if dry_run { "would forget" } else { "forgot" };
            let text = if forgotten.is_empty() {
                "every recorded workspace is still there".to_string()
            } else {
                forgotten.iter().map(|p| format!("{verb} {}", p.display())).collect::<Vec<_>>().join("\n")
            };
            Ok(Report::new(json!({ "forgotten": forgotten, "dry_run": dry_run }), text))
        }
        FsCmd::Clone { src, dst } => {
            let _busy = output::spinner(global, "clone");
            let r = snapfork_fsfork::clone_tree(&src, &dst, &Default::default())?;
            let mut j = serde_json::to_value(&r)?;
            j["id"] = json!(dst);
            let text = format!(
                "cloned {} to {}: {} files, {} dirs ({})",
                src.display(),
                dst.display(),
                r.files,
                r.dirs,
                r.mode
            );
            Ok(Report::new(j, text))
        }
    }
}
