//! `snapfork sandbox ...`, `snapfork export`, `snapfork import`: sandboxes and their snapshot
//! tree, over the engine (snapfork-engine).

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::json;
use snapfork_engine::{
    CheckpointOptions, DriverConfig, Engine, EngineOptions, GvisorConfig, RawConfig, RunSpec, SandboxInfo, tokio,
};
use snapfork_store::{OpenOptions, Store};

use crate::Global;
use crate::output::Report;

/// The engine's top-level commands.
#[derive(Subcommand, Debug)]
pub enum EngineCmd {
    /// Sandboxes and their snapshot tree.
    #[command(subcommand)]
    Sandbox(SandboxCmd),
    /// Write a snapshot (and all it links to) into one self-verifying bundle.
    Export {
        /// The snapshot: a tag, a sandbox name (its head) or an id.
        snap: String,
        /// The bundle file.
        #[arg(short = 'o', long = "output")]
        out: PathBuf,
    },
    /// Verify a bundle completely, then import it (refused bundles leave nothing behind).
    Import {
        /// The bundle file.
        file: PathBuf,
    },
    /// The end-to-end demo on a real gVisor sandbox: checkpoint, risky action, revert, fork 3.
    Demo(crate::demo::DemoArgs),
    /// Serve every engine operation over HTTP/JSON on a Unix socket (see docs/api.md).
    Daemon(crate::daemon::DaemonArgs),
}

/// What the spinner of `cmd` says.
fn command_name(cmd: &EngineCmd) -> String {
    use SandboxCmd as S;
    let name = match cmd {
        EngineCmd::Export { .. } => "export",
        EngineCmd::Import { .. } => "import",
        EngineCmd::Sandbox(s) => match s {
            S::Run(_) => "run",
            S::Checkpoint { .. } => "checkpoint",
            S::Restore { .. } => "restore",
            S::Fork { .. } => "fork",
            S::Revert { .. } => "revert",
            S::Diff { .. } => "diff",
            S::Log { .. } => "log",
            S::Show { .. } => "show",
            S::Tag { .. } => "tag",
            S::Rm { .. } => "rm",
            S::Stop { .. } => "stop",
            S::Ls => "ls",
            S::Exec { .. } => "exec",
        },
        EngineCmd::Demo(_) | EngineCmd::Daemon(_) => "",
    };
    name.to_string()
}

/// Runs one engine command: through the daemon when one serves this store, else directly.
pub fn run_top(mut cmd: EngineCmd, global: &Global) -> anyhow::Result<Report> {
    match cmd {
        EngineCmd::Demo(a) => return crate::demo::run(a, global),
        EngineCmd::Daemon(a) => return crate::daemon::serve(a, global),
        _ => {}
    }
    // Paths are the caller's: make them absolute before anything (the daemon has another cwd).
    absolutize(&mut cmd)?;
    // Checkpoints, restores, forks, exports take seconds to minutes, here or in the daemon.
    let _busy = crate::output::spinner(global, &command_name(&cmd));
    if let Some(report) = crate::daemon::try_call(&cmd, global)? {
        // The daemon's answer is JSON and text: a command's stderr and exit code are in the JSON.
        if matches!(cmd, EngineCmd::Sandbox(SandboxCmd::Exec { .. })) {
            return Ok(Report::command_output(report.json));
        }
        return Ok(report);
    }
    let engine = open_engine(global)?;
    let rt = runtime()?;
    // A restored Firecracker VM takes its memory from a UFFD server in the process that
    // restored it: that must be the daemon, not this short-lived command.
    if let EngineCmd::Sandbox(
        SandboxCmd::Restore { snap, .. } | SandboxCmd::Fork { snap, .. } | SandboxCmd::Revert { snap, .. },
    ) = &cmd
        && rt.block_on(engine.show(snap))?.body.driver == "firecracker"
    {
        bail!(
            "restoring a firecracker snapshot needs `snapfork daemon` running for this store \
                 (it serves the restored VMs' memory over userfaultfd for as long as they run)"
        );
    }
    rt.block_on(execute(cmd, global, &engine))
}

fn absolutize(cmd: &mut EngineCmd) -> anyhow::Result<()> {
    let abs = |p: &mut PathBuf| -> anyhow::Result<()> {
        *p = std::path::absolute(&*p)?;
        Ok(())
    };
    match cmd {
        EngineCmd::Sandbox(SandboxCmd::Run(a)) => {
            if let Some(p) = a.rootfs.as_mut() {
                abs(p)?;
            }
            if let Some(p) = a.workspace.as_mut() {
                abs(p)?;
            }
            if let Some(p) = a.memory.as_mut() {
                abs(p)?;
            }
            if let Some(p) = a.api_socket.as_mut() {
                abs(p)?;
            }
            if let Some(p) = a.firecracker_bin.as_mut() {
                abs(p)?;
            }
            for p in a.state.iter_mut().chain(a.disk.iter_mut()) {
                abs(p)?;
            }
            for m in a.ro_mounts.iter_mut() {
                if let Some((src, dst)) = m.split_once(':') {
                    *m = format!("{}:{dst}", std::path::absolute(src)?.display());
                }
            }
        }
        EngineCmd::Export { out, .. } => abs(out)?,
        EngineCmd::Import { file } => abs(file)?,
        _ => {}
    }
    Ok(())
}

/// Executes one engine command on an open engine (the CLI's direct path and the daemon's).
pub async fn execute(cmd: EngineCmd, global: &Global, engine: &Engine) -> anyhow::Result<Report> {
    match cmd {
        EngineCmd::Sandbox(c) => run_async(c, global, engine).await,
        EngineCmd::Export { snap, out } => {
            let r = engine.export(&snap, &out).await?;
            let text = format!(
                "exported {} to {}: {} nodes, {} chunks, {} files, {} bytes",
                &r.id[..12],
                out.display(),
                r.nodes,
                r.chunks,
                r.files,
                r.bytes
            );
            Ok(Report::new(serde_json::to_value(&r)?, text))
        }
        EngineCmd::Import { file } => {
            let r = engine.import(&file).await?;
            let text = format!(
                "imported snapshot {}: {} nodes, {} chunks, {} files ({} already present)",
                r.id, r.nodes, r.chunks, r.files, r.already_present
            );
            Ok(Report::new(serde_json::to_value(&r)?, text))
        }
        EngineCmd::Demo(_) | EngineCmd::Daemon(_) => bail!("not available through the daemon"),
    }
}

/// Sandbox commands.
#[derive(Subcommand, Debug)]
pub enum SandboxCmd {
    /// Start a sandbox.
    Run(Box<RunArgs>),
    /// Snapshot a sandbox (memory, runtime state and workspace, consistent with each other).
    Checkpoint {
        /// The sandbox.
        name: String,
        /// A message for the snapshot.
        #[arg(short, long, default_value = "")]
        message: String,
        /// Labels, KEY=VALUE (repeatable).
        #[arg(long = "label")]
        labels: Vec<String>,
        /// Keep the sandbox running (otherwise it stops at the snapshot).
        #[arg(long)]
        leave_running: bool,
    },
    /// Start a new sandbox from a snapshot.
    Restore {
        /// The snapshot: a tag, a sandbox name (its head) or an id (prefix).
        snap: String,
        /// The new sandbox's name.
        #[arg(long = "as")]
        as_name: String,
    },
    /// Start N sandboxes from a snapshot, in parallel.
    Fork {
        /// The snapshot.
        snap: String,
        /// How many.
        #[arg(short = 'n', default_value_t = 1)]
        n: usize,
        /// Name prefix (default: the snapshot's sandbox); forks are PREFIX-1, PREFIX-2, ...
        #[arg(long)]
        prefix: Option<String>,
    },
    /// Put a sandbox back to a snapshot: memory, runtime state and files.
    Revert {
        /// The sandbox.
        name: String,
        /// The snapshot.
        snap: String,
    },
    /// What differs between two snapshots (pages per image, chunks per blob, files).
    Diff {
        /// From.
        a: String,
        /// To.
        b: String,
    },
    /// The snapshot tree (all of it, or what one sandbox reaches).
    Log {
        /// Only this sandbox's snapshots and their ancestors.
        name: Option<String>,
    },
    /// Show one snapshot.
    Show {
        /// The snapshot.
        snap: String,
    },
    /// Name a snapshot (or remove a tag with --delete).
    Tag {
        /// The snapshot (ignored with --delete).
        snap: String,
        /// The tag.
        tag: Option<String>,
        /// Remove tag SNAP instead.
        #[arg(long)]
        delete: bool,
        /// Move the tag if it names another snapshot.
        #[arg(long, short)]
        force: bool,
    },
    /// Remove a sandbox (its snapshots stay while other refs reach them).
    Rm {
        /// The sandboxes.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Stop a sandbox (keeps its head snapshot).
    Stop {
        /// The sandbox.
        name: String,
    },
    /// List sandboxes.
    Ls,
    /// Run a command inside a running gvisor sandbox: its stdout and stderr come out as it
    /// wrote them (at most 16 MiB of each), and its exit code is ours (also with --json, whose
    /// object holds exit_code, stdout, stderr and truncated).
    Exec {
        /// The sandbox.
        name: String,
        /// The command.
        #[arg(trailing_var_arg = true, required = true)]
        cmd: Vec<String>,
    },
}

/// `sandbox run` arguments (also the body of `POST /v1/sandboxes`).
#[derive(Args, Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunArgs {
    /// The sandbox's name.
    pub name: String,
    /// gvisor, firecracker or raw.
    #[arg(long, default_value = "gvisor")]
    pub driver: String,
    /// gvisor: root filesystem directory.
    #[arg(long)]
    pub rootfs: Option<PathBuf>,
    /// gvisor: use a minimal busybox root filesystem (built once from busybox-static).
    #[arg(long)]
    pub busybox: bool,
    /// Host directory to use as the workspace (default: a fresh one owned by the sandbox); not
    /// one another sandbox's workspace overlaps.
    #[arg(long)]
    pub workspace: Option<PathBuf>,
    /// gvisor: where the workspace appears in the sandbox.
    #[arg(long, default_value = "/workspace")]
    pub workspace_mount: String,
    /// gvisor: extra read-only bind mount SRC:DST (repeatable), e.g. /usr:/usr.
    #[arg(long = "ro-mount")]
    pub ro_mounts: Vec<String>,
    /// gvisor: environment KEY=VALUE (repeatable; added to the defaults).
    #[arg(long = "env")]
    pub env: Vec<String>,
    /// gvisor: working directory.
    #[arg(long, default_value = "/")]
    pub cwd: String,
    /// raw: memory image.
    #[arg(long)]
    pub memory: Option<PathBuf>,
    /// raw: runtime state file (repeatable).
    #[arg(long)]
    pub state: Vec<PathBuf>,
    /// raw: disk image (repeatable).
    #[arg(long)]
    pub disk: Vec<PathBuf>,
    /// raw, firecracker: memory page size.
    #[arg(long, default_value_t = 4096)]
    pub page_size: u32,
    /// firecracker: the running microVM's API socket.
    #[arg(long)]
    pub api_socket: Option<PathBuf>,
    /// firecracker: the binary restores start (default: $FIRECRACKER, else firecracker).
    #[arg(long)]
    pub firecracker_bin: Option<PathBuf>,
    /// firecracker: take Diff snapshots on top of the previous one.
    #[arg(long)]
    pub diff: bool,
    /// gvisor: the command to run (after --).
    #[arg(last = true)]
    pub cmd: Vec<String>,
}

impl Default for RunArgs {
    fn default() -> Self {
        RunArgs {
            name: String::new(),
            driver: "gvisor".into(),
            rootfs: None,
            busybox: false,
            workspace: None,
            workspace_mount: "/workspace".into(),
            ro_mounts: vec![],
            env: vec![],
            cwd: "/".into(),
            memory: None,
            state: vec![],
            disk: vec![],
            page_size: 4096,
            api_socket: None,
            firecracker_bin: None,
            diff: false,
            cmd: vec![],
        }
    }
}

/// Opens the store (creating it) and the engine next to it.
pub fn open_engine(global: &Global) -> anyhow::Result<Engine> {
    open_engine_as(global, false)
}

/// [`open_engine`], for a daemon when `daemon` (see `EngineOptions::detach_children`).
pub fn open_engine_as(global: &Global, daemon: bool) -> anyhow::Result<Engine> {
    let opts = OpenOptions { lock_timeout: global.lock_timeout(), ..Default::default() };
    let store =
        Store::open(&global.store, opts).with_context(|| format!("opening store {}", global.store.display()))?;
    let mut eopts = EngineOptions::for_store(&store);
    eopts.trusted_host_dirs = global.trust_host_dirs.clone();
    eopts.trust_imported_vm_state = global.trust_imported_vm_state;
    eopts.detach_children = daemon;
    // Made by snapfork itself: nothing of the host's in it.
    let busybox = eopts.state_dir.join(BUSYBOX_ROOTFS);
    if busybox.is_dir() {
        eopts.trusted_host_dirs.push(busybox);
    }
    Ok(Engine::open(store, eopts)?)
}

/// A runtime for the engine's async API.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

fn info_json(i: &SandboxInfo) -> serde_json::Value {
    let mut v = serde_json::to_value(i).unwrap_or_default();
    v["id"] = json!(i.name);
    v
}

fn info_text(i: &SandboxInfo) -> String {
    let mut line = format!(
        "{}\t{}\t{:?}\thead {}\t{:.0} ms",
        i.name,
        i.driver,
        i.status,
        i.head.as_deref().map(|h| &h[..12]).unwrap_or("-"),
        i.timings.total_ms
    );
    if let Some(vsock) = &i.vsock {
        line.push_str(&format!("\tvsock {}", vsock.display()));
    }
    if let Some(netns) = &i.netns {
        line.push_str(&format!("\tnetns {}", netns.display()));
    }
    if let Some(why) = &i.ended {
        line.push_str(&format!("\t{why}"));
    }
    line
}

/// Where under the engine's state directory [`busybox_rootfs`] keeps its tree.
const BUSYBOX_ROOTFS: &str = "rootfs-busybox";

/// The busybox rootfs the demo and `--busybox` use, kept under the engine's state directory.
pub fn busybox_rootfs(global: &Global) -> anyhow::Result<PathBuf> {
    let dir = std::path::absolute(global.store.join("engine").join(BUSYBOX_ROOTFS))?;
    snapfork_engine::gvisor::make_busybox_rootfs(&dir)?;
    Ok(dir)
}

/// A request that cannot be carried out as given: the daemon answers 400.
fn invalid(message: &str) -> anyhow::Error {
    snapfork_engine::Error::Invalid(message.to_string()).into()
}

fn run_spec(a: RunArgs, global: &Global) -> anyhow::Result<RunSpec> {
    let driver = match a.driver.as_str() {
        "gvisor" => {
            let rootfs = match (a.rootfs, a.busybox) {
                (Some(r), false) => std::path::absolute(r)?,
                (None, true) => busybox_rootfs(global)?,
                _ => return Err(invalid("gvisor: give exactly one of rootfs (--rootfs DIR) or busybox (--busybox)")),
            };
            if a.cmd.is_empty() {
                return Err(invalid("gvisor: give the command (cmd, or after --)"));
            }
            let mut cfg = GvisorConfig::new(rootfs, a.cmd);
            cfg.env.extend(a.env);
            cfg.cwd = a.cwd;
            cfg.workspace_mount = a.workspace_mount;
            for m in a.ro_mounts {
                let (src, dst) =
                    m.split_once(':').ok_or_else(|| invalid("a read-only mount (--ro-mount) is SRC:DST"))?;
                cfg.ro_mounts.push((std::path::absolute(src)?, dst.to_string()));
            }
            DriverConfig::Gvisor(cfg)
        }
        "raw" => {
            let abs = |p: PathBuf| std::path::absolute(p);
            DriverConfig::Raw(RawConfig {
                memory: a.memory.map(abs).transpose()?,
                state: a.state.into_iter().map(abs).collect::<Result<_, _>>()?,
                disks: a.disk.into_iter().map(abs).collect::<Result<_, _>>()?,
                page_size: a.page_size,
            })
        }
        "firecracker" if !a.disk.is_empty() => {
            return Err(invalid(
                "firecracker: the VM's drives come from its API (GET /vm/config), each writable one stored \
                 with every snapshot; --disk is for the raw driver",
            ));
        }
        "firecracker" => DriverConfig::Firecracker(snapfork_engine::FirecrackerConfig {
            api_socket: std::path::absolute(
                a.api_socket.ok_or_else(|| invalid("firecracker: give api_socket (--api-socket PATH)"))?,
            )?,
            binary: a.firecracker_bin.map(std::path::absolute).transpose()?,
            devices: None,
            page_size: a.page_size,
            diff: a.diff,
            pid: None,
            pid_start_time: None,
        }),
        other => return Err(invalid(&format!("unknown driver {other} (gvisor, firecracker, raw)"))),
    };
    Ok(RunSpec { name: a.name, driver, workspace: a.workspace })
}

async fn run_async(cmd: SandboxCmd, global: &Global, engine: &Engine) -> anyhow::Result<Report> {
    Ok(match cmd {
        SandboxCmd::Run(a) => {
            let spec = run_spec(*a, global)?;
            let i = engine.run(spec).await?;
            Report::new(info_json(&i), format!("started {}", info_text(&i)))
        }
        SandboxCmd::Checkpoint { name, message, labels, leave_running } => {
            let mut l = BTreeMap::new();
            for kv in labels {
                let (k, v) = kv.split_once('=').ok_or_else(|| invalid("a label (--label) is KEY=VALUE"))?;
                l.insert(k.to_string(), v.to_string());
            }
            let r = engine.checkpoint(&name, CheckpointOptions { message, labels: l, leave_running }).await?;
            let steps: Vec<String> = r.timings.steps.iter().map(|(s, ms)| format!("{s} {ms:.0} ms")).collect();
            let text = format!(
                "snapshot {} of {} ({:?}): {:.0} ms [{}], {} bytes added to the store",
                &r.id[..12],
                r.sandbox,
                r.status,
                r.timings.total_ms,
                steps.join(", "),
                r.stored_bytes_added
            );
            Report::new(serde_json::to_value(&r)?, text)
        }
        SandboxCmd::Restore { snap, as_name } => {
            let i = engine.restore(&snap, &as_name).await?;
            Report::new(info_json(&i), format!("restored {}", info_text(&i)))
        }
        SandboxCmd::Fork { snap, n, prefix } => {
            let v = engine.fork(&snap, n, prefix.as_deref()).await?;
            let text: Vec<String> = v.iter().map(info_text).collect();
            let ids: Vec<&str> = v.iter().map(|i| i.name.as_str()).collect();
            Report::new(json!({"id": ids, "sandboxes": v.iter().map(info_json).collect::<Vec<_>>()}), text.join("\n"))
        }
        SandboxCmd::Revert { name, snap } => {
            let i = engine.revert(&name, &snap).await?;
            Report::new(info_json(&i), format!("reverted {}", info_text(&i)))
        }
        SandboxCmd::Diff { a, b } => {
            let d = engine.diff(&a, &b).await?;
            let mut text = format!("{} -> {}\n", &d.from[..12], &d.to[..12]);
            for p in &d.parts {
                text.push_str(&format!(
                    "  {:?} {}: {} ({} of {} {})\n",
                    p.role, p.name, p.change, p.units_changed, p.units_total, p.unit
                ));
            }
            for f in &d.files {
                text.push_str(&format!("  {} {}\n", f.change, f.path));
            }
            Report::new(serde_json::to_value(&d)?, text)
        }
        SandboxCmd::Log { name } => {
            let l = engine.log(name.as_deref()).await?;
            Report::new(serde_json::to_value(&l)?, l.tree.clone())
        }
        SandboxCmd::Show { snap } => {
            let s = engine.show(&snap).await?;
            let mut v = serde_json::to_value(&s.body)?;
            v["id"] = json!(s.id.to_hex());
            let text = serde_json::to_string_pretty(&v)?;
            Report::new(v, text)
        }
        SandboxCmd::Tag { snap, tag, delete, force } => {
            if delete {
                engine.untag(&snap).await?;
                Report::new(json!({"id": snap, "deleted": true}), format!("removed tag {snap}"))
            } else {
                let tag = tag.context("give SNAP TAG")?;
                let id = engine.tag(&snap, &tag, force).await?;
                Report::new(json!({"id": tag, "snapshot": id}), format!("tag {tag} -> {}", &id[..12]))
            }
        }
        SandboxCmd::Rm { names } => {
            for n in &names {
                engine.rm(n).await?;
            }
            Report::new(json!({"removed": names}), format!("removed {}", names.join(" ")))
        }
        SandboxCmd::Stop { name } => {
            let i = engine.stop(&name).await?;
            Report::new(info_json(&i), format!("stopped {}", info_text(&i)))
        }
        SandboxCmd::Ls => {
            let v = engine.ls().await?;
            let text: Vec<String> = v.iter().map(info_text).collect();
            Report::new(json!({"sandboxes": v.iter().map(info_json).collect::<Vec<_>>()}), text.join("\n"))
        }
        SandboxCmd::Exec { name, cmd } => Report::command_output(serde_json::to_value(engine.exec(&name, cmd).await?)?),
    })
}
