//! The engine: sandboxes, their snapshots and the operations on both.
//!
//! Concurrency: every public operation is `async`; it takes the per-sandbox lock of each sandbox
//! it touches (sorted, so two operations never deadlock) and then does its blocking work
//! (runsc, hashing, file copies) on tokio's blocking pool. Operations on different sandboxes
//! therefore run in parallel and two on one sandbox run one after the other.
//!
//! Atomicity: a snapshot becomes visible only when its store transaction commits (node, parts and
//! refs in one batch); everything before that is staged and dropped on error. Operations that
//! change a running sandbox prepare everything first and undo their runtime step on failure (see
//! each operation).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use snapfork_store::{Hash, Store};

use crate::error::{Error, Result};
use crate::firecracker::{ApiClient, FirecrackerConfig, Make};
use crate::gvisor::GvisorConfig;
use crate::model::{
    self, PartKind, Role, SandboxRecord, Snapshot, SnapshotBody, Status, check_name, head_ref, snaps_prefix, tag_ref,
};
use crate::raw::RawConfig;
use crate::runsc::Runsc;
use crate::workspace;

/// Where an engine keeps its state, next to its store.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// The engine's state directory (sandbox records, bundles, runsc state, workspaces).
    /// Workspaces are forked with reflinks, so this should be on the store's filesystem.
    pub state_dir: PathBuf,
    /// The runsc binary (default: `$RUNSC` or `runsc`).
    pub runsc: Option<PathBuf>,
    /// How long a memory image's UFFD page server (Firecracker restores) stays up with no VM
    /// connected before it stops and frees its page cache; the next restore starts a new one.
    pub uffd_idle: Duration,
    /// Host directories a snapshot that came by import may show its sandbox (a gVisor rootfs
    /// or read-only mount must lie under one of them). A bundle's configuration is its
    /// exporter's word: one naming `/` as its rootfs, or another sandbox's workspace as a
    /// mount, would otherwise hand those files to the code in the sandbox. Empty by default:
    /// no imported gVisor snapshot restores until its directories are vouched for here.
    pub trusted_host_dirs: Vec<PathBuf>,
    /// Restore Firecracker snapshots that came by import. Their VM state (Firecracker's
    /// format, not read here) names the host files the VM opens, its disks above all, and a
    /// VMM started without the jailer opens them as they are named: a bundle's word would
    /// choose which host files the guest gets to read and write. Off by default: such a
    /// snapshot is refused until its source is trusted here.
    pub trust_imported_vm_state: bool,
    /// How long a Firecracker API call may go unanswered before its VMM is taken as hung (and,
    /// for `snapshot/create`, unanswered with its files not growing: a snapshot of a big VM
    /// may take minutes, but never stops writing for this long).
    pub vmm_timeout: Duration,
    /// Every runsc command leads a process group of its own, not only those that leave
    /// processes behind (see [`Runsc::own_groups`]): for a daemon, whose terminal's Ctrl-C must
    /// reach it alone. VMMs always do.
    pub detach_children: bool,
}

/// [`EngineOptions::uffd_idle`] by default.
pub const UFFD_IDLE: Duration = Duration::from_secs(300);

/// [`EngineOptions::vmm_timeout`] by default.
pub const VMM_TIMEOUT: Duration = Duration::from_secs(30);

impl EngineOptions {
    /// The default: `STORE/engine`.
    pub fn for_store(store: &Store) -> EngineOptions {
        EngineOptions {
            state_dir: store.dir().join("engine"),
            runsc: None,
            uffd_idle: UFFD_IDLE,
            trusted_host_dirs: Vec::new(),
            trust_imported_vm_state: false,
            vmm_timeout: VMM_TIMEOUT,
            detach_children: false,
        }
    }
}

/// The driver a sandbox runs under and its configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "driver", content = "config", rename_all = "lowercase")]
pub enum DriverConfig {
    /// gVisor's runsc.
    Gvisor(GvisorConfig),
    /// Memory, state and disk files of any VMM, given as paths.
    Raw(RawConfig),
    /// A Firecracker microVM driven through its API socket.
    Firecracker(FirecrackerConfig),
}

impl DriverConfig {
    /// The driver's name.
    pub fn name(&self) -> &'static str {
        match self {
            DriverConfig::Gvisor(_) => "gvisor",
            DriverConfig::Raw(_) => "raw",
            DriverConfig::Firecracker(_) => "firecracker",
        }
    }

    fn to_value(&self) -> Result<serde_json::Value> {
        match self {
            DriverConfig::Gvisor(c) => serde_json::to_value(c),
            DriverConfig::Raw(c) => serde_json::to_value(c),
            DriverConfig::Firecracker(c) => serde_json::to_value(c),
        }
        .map_err(|e| Error::Invalid(e.to_string()))
    }

    fn from_parts(driver: &str, config: &serde_json::Value) -> Result<DriverConfig> {
        let bad = |e: serde_json::Error| Error::Invalid(format!("{driver} config: {e}"));
        match driver {
            "gvisor" => Ok(DriverConfig::Gvisor(serde_json::from_value(config.clone()).map_err(bad)?)),
            "raw" => Ok(DriverConfig::Raw(serde_json::from_value(config.clone()).map_err(bad)?)),
            "firecracker" => Ok(DriverConfig::Firecracker(serde_json::from_value(config.clone()).map_err(bad)?)),
            other => Err(Error::Invalid(format!("unknown driver {other}"))),
        }
    }
}

/// What `run` starts.
#[derive(Clone, Debug)]
pub struct RunSpec {
    /// The sandbox's name.
    pub name: String,
    /// Its driver and configuration.
    pub driver: DriverConfig,
    /// An existing host directory to use as its workspace; default: a fresh, engine-owned one.
    /// It may not overlap another sandbox's workspace, the engine's state or the store.
    pub workspace: Option<PathBuf>,
}

/// Options of `checkpoint`.
#[derive(Clone, Debug, Default)]
pub struct CheckpointOptions {
    /// The message recorded with the snapshot.
    pub message: String,
    /// Labels recorded with the snapshot.
    pub labels: BTreeMap<String, String>,
    /// Keep the sandbox running afterwards (otherwise it stops at the snapshot, like runsc).
    pub leave_running: bool,
}

/// Milliseconds spent in each step of an operation.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Timings {
    /// Steps in order, with their duration in milliseconds.
    pub steps: Vec<(String, f64)>,
    /// The whole operation.
    pub total_ms: f64,
}

struct Clock {
    start: Instant,
    last: Instant,
    t: Timings,
}

impl Clock {
    fn new() -> Clock {
        let now = Instant::now();
        Clock { start: now, last: now, t: Timings::default() }
    }
    fn step(&mut self, name: &str) {
        let now = Instant::now();
        self.t.steps.push((name.to_string(), ms(now - self.last)));
        self.last = now;
    }
    fn done(mut self) -> Timings {
        self.t.total_ms = ms(self.start.elapsed());
        self.t
    }
}

fn ms(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// What `checkpoint` returns.
#[derive(Clone, Debug, Serialize)]
pub struct CheckpointReport {
    /// The new snapshot's id (hex).
    pub id: String,
    /// The sandbox.
    pub sandbox: String,
    /// Its parent snapshot, if any.
    pub parent: Option<String>,
    /// The parts stored.
    pub parts: Vec<model::Part>,
    /// The sandbox's status afterwards.
    pub status: Status,
    /// Bytes the snapshot added to the store (new chunks, compressed; workspace file objects).
    pub stored_bytes_added: u64,
    /// Time per step.
    pub timings: Timings,
}

/// Most of each of stdout and stderr that `exec` returns: beyond it, output is dropped.
pub const MAX_EXEC_OUTPUT: usize = 16 << 20;

/// What `exec` returns: the command's exit code and output (text; bytes that are not UTF-8
/// are replaced).
#[derive(Clone, Debug, Serialize)]
pub struct ExecReport {
    /// Its exit code (128 + N when signal N ended it).
    pub exit_code: i32,
    /// Its stdout, up to [`MAX_EXEC_OUTPUT`] bytes.
    pub stdout: String,
    /// Its stderr, up to [`MAX_EXEC_OUTPUT`] bytes.
    pub stderr: String,
    /// True when stdout or stderr was longer than [`MAX_EXEC_OUTPUT`] (the rest was dropped).
    pub truncated: bool,
}

/// A sandbox as reported by `ls`, `run`, `restore`, `fork`, `revert`.
#[derive(Clone, Debug, Serialize)]
pub struct SandboxInfo {
    /// The sandbox's name (named `id` in CLI output as it is what was created).
    pub name: String,
    /// Its driver.
    pub driver: String,
    /// Its status.
    pub status: Status,
    /// Its head snapshot.
    pub head: Option<String>,
    /// Its workspace directory.
    pub workspace: Option<PathBuf>,
    /// The runtime's container id.
    pub runtime_id: Option<String>,
    /// A Firecracker VM's API socket: where to reach its VMM.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_socket: Option<PathBuf>,
    /// A Firecracker VM's vsock socket, when it has a vsock device and the engine restored it:
    /// where to reach the guest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vsock: Option<PathBuf>,
    /// A restored Firecracker VM's network namespace (`/proc/PID/ns/net`), when it has network
    /// interfaces: it holds the VM's taps and nothing else, for the host to wire.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
    /// Why snapfork ended its VM, when it did (`ls` only): the memory server killed it because
    /// a page of its memory failed verification in the store, or could no longer be served.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended: Option<String>,
    /// Time per step of the operation that produced this (empty for `ls`).
    pub timings: Timings,
}

/// A VM taken over by [`Engine::adopt_vms`].
#[derive(Clone, Debug, Serialize)]
pub struct AdoptedVm {
    /// Its Firecracker process.
    pub pid: i32,
    /// The sandbox it runs, when a record names that process.
    pub sandbox: Option<String>,
    /// The memory image it is served from (hex id).
    pub image: String,
}

/// One snapshot in `log`.
#[derive(Clone, Debug, Serialize)]
pub struct LogEntry {
    /// Snapshot id.
    pub id: String,
    /// Parent id.
    pub parent: Option<String>,
    /// The sandbox that took it.
    pub sandbox: String,
    /// Its message.
    pub message: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Creation time (ms since epoch).
    pub created_ms: u64,
    /// Driver.
    pub driver: String,
    /// Refs naming it (`sandbox/NAME` heads and `tag/T`).
    pub refs: Vec<String>,
    /// Bytes of its parts (logical).
    pub size: u64,
}

/// The snapshot tree.
#[derive(Clone, Debug, Serialize)]
pub struct Log {
    /// Every snapshot reachable from the refs considered, oldest first.
    pub snapshots: Vec<LogEntry>,
    /// The tree drawn as text.
    pub tree: String,
}

/// Differences between two snapshots.
#[derive(Clone, Debug, Serialize)]
pub struct SnapshotDiff {
    /// First snapshot.
    pub from: String,
    /// Second snapshot.
    pub to: String,
    /// Per part.
    pub parts: Vec<PartDiff>,
    /// Workspace files changed.
    pub files: Vec<workspace::FileChange>,
}

/// How one part differs.
#[derive(Clone, Debug, Serialize)]
pub struct PartDiff {
    /// Role.
    pub role: Role,
    /// Name.
    pub name: String,
    /// `same`, `changed`, `added`, `removed`.
    pub change: String,
    /// For images: pages that differ; for blobs: chunks of `to` absent from `from`.
    pub units_changed: u64,
    /// For images: page count; for blobs: chunk count of `to`.
    pub units_total: u64,
    /// `pages` or `chunks`.
    pub unit: String,
}

struct Inner {
    store: Store,
    state: PathBuf,
    runsc: Runsc,
    /// Short hash of the state directory, part of every runtime id.
    tag: String,
    /// One UFFD page server per memory image restored (Firecracker), while it is in use.
    uffd: Arc<Mutex<HashMap<Hash, UffdServerHandle>>>,
    uffd_idle: Duration,
    /// Page caches of the VMs taken over from an earlier process, one per image.
    adopted_caches: snapfork_lazy_restore::SharedSources,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// [`EngineOptions::trusted_host_dirs`], resolved (symlinks and `..` gone).
    trusted_host_dirs: Vec<PathBuf>,
    /// [`EngineOptions::trust_imported_vm_state`].
    trust_imported_vm_state: bool,
    /// [`EngineOptions::vmm_timeout`].
    vmm_timeout: Duration,
    /// Threads using the store in the background (working sets saved, preloaded): joined when
    /// the engine goes, so that none is still inside RocksDB when the process exits (its C++ teardown
    /// aborts the process then).
    background: Arc<Mutex<Vec<std::thread::JoinHandle<()>>>>,
    /// Threads serving the memory of lazily restored VMs (UFFD servers, VMs taken over): stopped
    /// and joined by [`Engine::shutdown`], for the same reason.
    serving: Mutex<Vec<ServingThread>>,
    /// Set by [`Engine::shutdown`]: no thread that serves VM memory starts after it.
    shutting_down: AtomicBool,
    /// Adoptions under way (`adopt_when_free` threads past their check): shutdown waits for them.
    adopting: std::sync::atomic::AtomicUsize,
}

/// A thread that serves VM memory from the store, and how to stop it.
struct ServingThread {
    stop: Box<dyn Fn() + Send>,
    thread: std::thread::JoinHandle<()>,
}

impl Inner {
    /// See [`Engine::shutdown`].
    fn shutdown(&self) {
        // Under the lock: a serving thread registered from now on is stopped at once (below).
        let serving = {
            let mut list = self.serving.lock().unwrap_or_else(|p| p.into_inner());
            self.shutting_down.store(true, Ordering::SeqCst);
            std::mem::take(&mut *list)
        };
        for s in &serving {
            (s.stop)();
        }
        for s in serving {
            let _ = s.thread.join();
        }
        // An adoption past its check reads the store, then registers its thread (stopped and
        // joined at once now): short, but waited for.
        let waited = Instant::now();
        while self.adopting.load(Ordering::SeqCst) > 0 && waited.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(5));
        }
        // After the servers: a restore they stop may still hand its working set to be saved.
        // Taken under the lock that `keep_background` checks the flag under.
        let threads = std::mem::take(&mut *self.background.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }

    /// Keeps a serving thread for [`Engine::shutdown`] to stop and join; false (the thread
    /// stopped and joined already) when the engine is shutting down.
    fn keep_serving_thread(&self, stop: Box<dyn Fn() + Send>, thread: std::thread::JoinHandle<()>) -> bool {
        let mut serving = self.serving.lock().unwrap_or_else(|p| p.into_inner());
        if self.shutting_down.load(Ordering::SeqCst) {
            drop(serving);
            stop();
            let _ = thread.join();
            return false;
        }
        serving.retain(|s| !s.thread.is_finished());
        serving.push(ServingThread { stop, thread });
        true
    }

    /// Keeps a thread that uses the store for [`Engine::shutdown`] to join, or joins it now
    /// when the engine is shutting down.
    fn keep_background(&self, thread: std::thread::JoinHandle<()>) {
        let mut threads = self.background.lock().unwrap_or_else(|p| p.into_inner());
        if self.shutting_down.load(Ordering::SeqCst) {
            drop(threads);
            let _ = thread.join();
            return;
        }
        keep_live(&mut threads, thread);
    }

    fn refuse_when_shutting_down(&self) -> Result<()> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(Error::Runtime {
                what: "serve VM memory".into(),
                detail: "the engine is shutting down".into(),
            });
        }
        Ok(())
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Adds `thread` to `threads`, dropping those that have ended.
fn keep_live(threads: &mut Vec<std::thread::JoinHandle<()>>, thread: std::thread::JoinHandle<()>) {
    threads.retain(|t| !t.is_finished());
    threads.push(thread);
}

/// A running UFFD page server of one memory image.
#[derive(Clone)]
struct UffdServerHandle {
    /// Where Firecracker connects.
    sock: PathBuf,
    /// Set to stop the server.
    stop: Arc<AtomicBool>,
    /// VMs connected now.
    active: Arc<std::sync::atomic::AtomicUsize>,
    /// When a VM last connected or left, or a restore was handed the socket.
    last_used: Arc<Mutex<Instant>>,
}

impl UffdServerHandle {
    fn touch(&self) {
        if let Ok(mut t) = self.last_used.lock() {
            *t = Instant::now();
        }
    }
}

/// The lock runs given a workspace take (no sandbox or tag is named with a '/').
const RUN_WORKSPACE_LOCK: &str = "/run-workspace";

/// The engine. Cheap to clone; share one per store.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl Engine {
    /// Opens the engine on `store`, creating its state directory.
    pub fn open(store: Store, opts: EngineOptions) -> Result<Engine> {
        // Absolute: restored VMMs run in directories of their own, and get paths under it.
        let state = std::path::absolute(&opts.state_dir)
            .map_err(|e| Error::io(format!("state directory {}", opts.state_dir.display()), e))?;
        for d in ["sandboxes", "workspaces", "runsc", "tmp"] {
            let p = state.join(d);
            std::fs::create_dir_all(&p).map_err(|e| Error::io(format!("mkdir {}", p.display()), e))?;
        }
        let mut runsc = Runsc::new(state.join("runsc"));
        runsc.own_groups = opts.detach_children;
        if let Some(b) = opts.runsc {
            runsc.binary = b;
        }
        let mut trusted_host_dirs = Vec::new();
        for d in &opts.trusted_host_dirs {
            let real = d.canonicalize().map_err(|e| Error::io(format!("trusted host directory {}", d.display()), e))?;
            trusted_host_dirs.push(real);
        }
        let canonical = std::fs::canonicalize(&state).unwrap_or_else(|_| state.clone());
        let tag = Hash::of(canonical.as_os_str().as_encoded_bytes()).to_hex()[..8].to_string();
        Ok(Engine {
            inner: Arc::new(Inner {
                store,
                state,
                runsc,
                tag,
                uffd: Arc::new(Mutex::new(HashMap::new())),
                uffd_idle: opts.uffd_idle,
                adopted_caches: snapfork_lazy_restore::SharedSources::new(),
                locks: Mutex::new(HashMap::new()),
                trusted_host_dirs,
                trust_imported_vm_state: opts.trust_imported_vm_state,
                vmm_timeout: opts.vmm_timeout,
                background: Arc::default(),
                serving: Mutex::default(),
                shutting_down: AtomicBool::new(false),
                adopting: Default::default(),
            }),
        })
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The runsc wrapper this engine uses.
    pub fn runsc(&self) -> &Runsc {
        &self.inner.runsc
    }

    /// Takes the locks of `names` (sorted: no deadlock between operations).
    async fn lock(&self, names: &[String]) -> Vec<tokio::sync::OwnedMutexGuard<()>> {
        let mut sorted: Vec<&String> = names.iter().collect();
        sorted.sort();
        sorted.dedup();
        let mutexes: Vec<_> = {
            let mut map = self.inner.locks.lock().unwrap_or_else(|p| p.into_inner());
            sorted.iter().map(|n| map.entry((*n).clone()).or_default().clone()).collect()
        };
        let mut guards = Vec::with_capacity(mutexes.len());
        for m in mutexes {
            guards.push(m.lock_owned().await);
        }
        guards
    }

    async fn blocking<T: Send + 'static>(&self, f: impl FnOnce(&Inner) -> Result<T> + Send + 'static) -> Result<T> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| Error::Runtime { what: "engine task".into(), detail: e.to_string() })?
    }

    /// Starts a new sandbox.
    pub async fn run(&self, spec: RunSpec) -> Result<SandboxInfo> {
        check_name(&spec.name)?;
        // Runs given a workspace take turns, so that two cannot both find the same one free.
        let mut keys = vec![spec.name.clone()];
        if spec.workspace.is_some() {
            keys.push(RUN_WORKSPACE_LOCK.into());
        }
        let _g = self.lock(&keys).await;
        self.blocking(move |i| i.run(spec)).await
    }

    /// Checkpoints sandbox `name` into a new snapshot.
    pub async fn checkpoint(&self, name: &str, opts: CheckpointOptions) -> Result<CheckpointReport> {
        let name = name.to_string();
        let _g = self.lock(std::slice::from_ref(&name)).await;
        self.blocking(move |i| i.checkpoint(&name, &opts)).await
    }

    /// Starts a new sandbox `as_name` from snapshot `snap` (a tag, a sandbox name or an id).
    pub async fn restore(&self, snap: &str, as_name: &str) -> Result<SandboxInfo> {
        check_name(as_name)?;
        let snap = snap.to_string();
        let as_name = as_name.to_string();
        let _g = self.lock(std::slice::from_ref(&as_name)).await;
        self.blocking(move |i| {
            let s = i.load_snapshot(i.resolve(&snap)?)?;
            let prepared = i.prepare_state(&s)?;
            let r = i.restore_as(&s, &as_name, prepared.as_ref().map(|p| p.dir.as_path()));
            if let Some(p) = prepared {
                p.release();
            }
            r
        })
        .await
    }

    /// Starts `n` sandboxes from snapshot `snap`, named `PREFIX-1`.. (the first free numbers;
    /// PREFIX defaults to the snapshot's sandbox). They restore in parallel.
    pub async fn fork(&self, snap: &str, n: usize, prefix: Option<&str>) -> Result<Vec<SandboxInfo>> {
        if n == 0 || n > 256 {
            return Err(Error::Invalid(format!("fork count {n} must be 1..=256")));
        }
        let snap = snap.to_string();
        let s = self.blocking(move |i| i.load_snapshot(i.resolve(&snap)?)).await?;
        let prefix = prefix.map_or_else(|| s.body.sandbox.clone(), str::to_string);
        let (names, _g) = self.inner.claim_free_names(&prefix, n)?;
        // One materialized state image serves every fork.
        let s2 = s.clone();
        let prepared = self.blocking(move |i| i.prepare_state(&s2)).await?;
        let mut tasks = Vec::new();
        for name in names {
            let s = s.clone();
            let prepared = prepared.clone();
            let inner = self.inner.clone();
            tasks.push(tokio::task::spawn_blocking(move || {
                inner.restore_as(&s, &name, prepared.as_ref().map(|p| p.dir.as_path()))
            }));
        }
        let mut out = Vec::new();
        let mut first_err = None;
        for t in tasks {
            match t.await {
                Ok(Ok(info)) => out.push(info),
                Ok(Err(e)) => first_err = first_err.or(Some(e)),
                Err(e) => {
                    first_err = first_err.or(Some(Error::Runtime { what: "fork task".into(), detail: e.to_string() }))
                }
            }
        }
        if let Some(p) = prepared {
            p.release();
        }
        if let Some(e) = first_err {
            // All or nothing: forks that did start are removed again.
            for info in &out {
                let _ = self.inner.remove(&info.name);
            }
            return Err(e);
        }
        Ok(out)
    }

    /// Puts sandbox `name` back to snapshot `snap`: memory, runtime state and workspace.
    pub async fn revert(&self, name: &str, snap: &str) -> Result<SandboxInfo> {
        let name = name.to_string();
        let snap = snap.to_string();
        let _g = self.lock(std::slice::from_ref(&name)).await;
        self.blocking(move |i| i.revert(&name, &snap)).await
    }

    /// Stops sandbox `name` (its head and snapshots stay). It comes after an operation in
    /// flight on the sandbox, but waits for one at most [`EngineOptions::vmm_timeout`] (a
    /// checkpoint of a VMM that hangs, say): then its runtime is ended, so that the operation
    /// fails and lets go.
    pub async fn stop(&self, name: &str) -> Result<SandboxInfo> {
        let name = name.to_string();
        let _g = self.lock_ending(&name).await;
        self.blocking(move |i| i.stop(&name)).await
    }

    /// Removes sandbox `name`: its runtime, state, owned workspace and refs (snapshots that other
    /// refs still reach stay; gc collects the rest). Like [`Engine::stop`], it ends the runtime
    /// of an operation in flight rather than wait for it longer than the VMM timeout.
    pub async fn rm(&self, name: &str) -> Result<()> {
        let name = name.to_string();
        let _g = self.lock_ending(&name).await;
        self.blocking(move |i| i.remove(&name)).await
    }

    /// The lock of sandbox `name`, for an operation that ends the sandbox anyway: when another
    /// operation still holds it after the VMM timeout, the sandbox's runtime is killed, which
    /// makes that one fail (leaving the sandbox as it was, runtime gone) and let go.
    async fn lock_ending(&self, name: &str) -> Vec<tokio::sync::OwnedMutexGuard<()>> {
        let mutex =
            self.inner.locks.lock().unwrap_or_else(|p| p.into_inner()).entry(name.to_string()).or_default().clone();
        if let Ok(g) = tokio::time::timeout(self.inner.vmm_timeout, mutex.clone().lock_owned()).await {
            return vec![g];
        }
        tracing::warn!(sandbox = name, "still busy with another operation: ending its runtime to end that");
        let n = name.to_string();
        let _ = self
            .blocking(move |i| {
                i.kill_runtime(&n);
                Ok(())
            })
            .await;
        vec![mutex.lock_owned().await]
    }

    /// Stops serving the memory of the VMs restored lazily (the engine's UFFD servers and the
    /// VMs it took over) and waits for every thread of the engine that uses the store, so that
    /// the process can exit: one still inside RocksDB then would abort it. The VMs run on and
    /// stall on their next fault until the next engine on this state directory serves them
    /// again ([`Engine::adopt_vms`], from their journals). For a daemon's exit; also done when
    /// the last clone of the engine goes.
    pub fn shutdown(&self) {
        self.inner.shutdown();
    }

    /// Kills every sandbox's runtime now, synchronously (test teardown, `snapfork sandbox rm
    /// --all`); records, workspaces and snapshots stay.
    pub fn kill_all_blocking(&self) {
        let dir = self.inner.state.join("sandboxes");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        for e in entries.flatten() {
            let Some(name) = e.file_name().to_str().map(str::to_string) else {
                continue;
            };
            // (It says so in the log when a runtime may survive.)
            self.inner.kill_runtime(&name);
        }
    }

    /// Every sandbox, with its status refreshed from the runtime.
    pub async fn ls(&self) -> Result<Vec<SandboxInfo>> {
        self.blocking(|i| i.ls()).await
    }

    /// Takes over the lazily restored VMs (Firecracker) whose page server died with an earlier
    /// process, typically the previous daemon: without this they stall on their next page
    /// fault. VMs a live restore serves already (this process's) are left alone. The daemon calls it as it starts,
    /// before it takes requests; a process that does not stay up to serve the VMs must not.
    pub async fn adopt_vms(&self) -> Result<Vec<AdoptedVm>> {
        let inner = self.inner.clone();
        self.blocking(move |_| inner.adopt_vms()).await
    }

    /// Names snapshot `snap` with tag `tag`. A tag that names another snapshot is moved only
    /// with `force` (an agent's "known good" tag must not move by accident); else `Exists`.
    pub async fn tag(&self, snap: &str, tag: &str, force: bool) -> Result<String> {
        check_name(tag)?;
        let snap = snap.to_string();
        let tag = tag.to_string();
        let guards = self.lock(&[tag_ref(&tag)]).await;
        self.blocking(move |i| {
            let _guards = guards;
            let s = i.load_snapshot(i.resolve(&snap)?)?;
            if let Some(old) = i.store.get_ref(&tag_ref(&tag))?
                && old != s.id
                && !force
            {
                return Err(Error::Exists(format!("tag {tag} (on snapshot {}; move it with --force)", old.to_hex())));
            }
            let mut tx = i.store.begin()?;
            tx.set_ref(&tag_ref(&tag), s.id)?;
            tx.commit()?;
            Ok(s.id.to_hex())
        })
        .await
    }

    /// Removes tag `tag`.
    pub async fn untag(&self, tag: &str) -> Result<()> {
        let tag = tag.to_string();
        self.blocking(move |i| {
            if i.store.get_ref(&tag_ref(&tag))?.is_none() {
                return Err(Error::NotFound(format!("tag {tag}")));
            }
            let mut tx = i.store.begin()?;
            tx.delete_ref(&tag_ref(&tag));
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// The snapshot tree: all of it, or what sandbox `name` reaches.
    pub async fn log(&self, name: Option<&str>) -> Result<Log> {
        let name = name.map(str::to_string);
        self.blocking(move |i| i.log(name.as_deref())).await
    }

    /// Pages changed per image, chunks per blob and files changed between two snapshots.
    pub async fn diff(&self, a: &str, b: &str) -> Result<SnapshotDiff> {
        let a = a.to_string();
        let b = b.to_string();
        self.blocking(move |i| i.diff(&a, &b)).await
    }

    /// One snapshot, decoded.
    pub async fn show(&self, snap: &str) -> Result<Snapshot> {
        let snap = snap.to_string();
        self.blocking(move |i| i.load_snapshot(i.resolve(&snap)?)).await
    }

    /// Resolves a snapshot spec: a tag, a sandbox name (its head), or a (prefix of an) id.
    pub fn resolve(&self, spec: &str) -> Result<Hash> {
        self.inner.resolve(spec)
    }

    /// Runs a command inside running sandbox `name` (gvisor: `runsc exec`); returns its exit
    /// code and (up to [`MAX_EXEC_OUTPUT`] bytes each) its stdout and stderr.
    pub async fn exec(&self, name: &str, args: Vec<String>) -> Result<ExecReport> {
        let name = name.to_string();
        let _g = self.lock(std::slice::from_ref(&name)).await;
        self.blocking(move |i| {
            let mut rec = i.load_record(&name)?;
            if rec.driver != "gvisor" {
                return Err(Error::Invalid(format!("exec needs a gvisor sandbox; {name} is {}", rec.driver)));
            }
            // Once it is known to run, a failure is the command's (runsc's own errors are rare
            // then, and come as exit code 128 with their message on stderr).
            i.refresh(&mut rec)?;
            let rid = match (&rec.runtime_id, rec.status) {
                (Some(rid), Status::Running) => rid.clone(),
                (_, status) => return Err(Error::Invalid(format!("sandbox {name} is {status:?}, not running"))),
            };
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = i.runsc.exec_in(&rid, &args, MAX_EXEC_OUTPUT)?;
            Ok(ExecReport {
                exit_code: out.exit_code,
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
                truncated: out.truncated,
            })
        })
        .await
    }

    /// Writes snapshot `snap` and everything it links to into one self-verifying bundle.
    pub async fn export(&self, snap: &str, out: &Path) -> Result<crate::bundle::BundleReport> {
        let snap = snap.to_string();
        let out = out.to_path_buf();
        self.blocking(move |i| crate::bundle::export(&i.store, i.resolve(&snap)?, &out)).await
    }

    /// Verifies a bundle completely, then imports it (kept by ref `imported/ID`); a bundle that
    /// fails any check is refused and leaves nothing in the store.
    pub async fn import(&self, path: &Path) -> Result<crate::bundle::BundleReport> {
        let path = path.to_path_buf();
        self.blocking(move |i| crate::bundle::import(&i.store, &path)).await
    }
}

impl Inner {
    /// Refuses a caller's workspace that overlaps another sandbox's (the same directory, one
    /// inside the other), the engine's state or the store: a revert puts the whole tree back,
    /// so it would rewrite the other sandbox's files, or the store's own.
    fn check_workspace_free(&self, w: &Path) -> Result<()> {
        let overlap = |other: &Path| w.starts_with(other) || other.starts_with(w);
        for (what, dir) in [("the engine's state directory", self.state.as_path()), ("the store", self.store.dir())] {
            let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
            if overlap(&dir) {
                return Err(Error::Invalid(format!(
                    "workspace {} overlaps {what} {}: a revert would rewrite it",
                    w.display(),
                    dir.display()
                )));
            }
        }
        for name in self.sandbox_names()? {
            let Ok(rec) = self.load_record(&name) else {
                continue;
            };
            if let Some(theirs) = &rec.workspace
                && overlap(theirs)
            {
                return Err(Error::Exists(format!(
                    "workspace {} overlaps sandbox {name}'s workspace {} (one sandbox's revert would rewrite the other's files); remove {name} first or give another directory",
                    w.display(),
                    theirs.display()
                )));
            }
        }
        Ok(())
    }

    fn sandbox_dir(&self, name: &str) -> PathBuf {
        self.state.join("sandboxes").join(name)
    }

    fn record_path(&self, name: &str) -> PathBuf {
        self.sandbox_dir(name).join(RECORD_FILE)
    }

    fn load_record(&self, name: &str) -> Result<SandboxRecord> {
        check_name(name)?;
        read_record(&self.record_path(name)).map_err(|e| match e {
            Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                Error::NotFound(format!("sandbox {name}"))
            }
            e => e,
        })
    }

    /// Writes the record atomically (temp file, fsync, rename).
    fn save_record(&self, rec: &SandboxRecord) -> Result<()> {
        let dir = self.sandbox_dir(&rec.name);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("mkdir {}", dir.display()), e))?;
        let path = self.record_path(&rec.name);
        // A temporary name of its own per write, so two writers can never interleave in one file.
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let tmp = dir.join(format!("sandbox.json.{}-{}.tmp", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed)));
        let bytes = serde_json::to_vec_pretty(rec).map_err(|e| Error::Invalid(e.to_string()))?;
        write_synced(&tmp, &bytes)?;
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(format!("rename {}", path.display()), e))?;
        sync_dir(&dir)
    }

    fn exists(&self, name: &str) -> bool {
        self.record_path(name).exists()
    }

    /// The first `n` names `PREFIX-K` that no sandbox has, each returned with its lock held. A
    /// name whose lock another operation holds is being created (a concurrent fork): skipped,
    /// so two forks with one prefix take different numbers instead of colliding.
    fn claim_free_names(&self, prefix: &str, n: usize) -> Result<(Vec<String>, Vec<tokio::sync::OwnedMutexGuard<()>>)> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        let (mut names, mut guards) = (Vec::with_capacity(n), Vec::with_capacity(n));
        let mut k = 1;
        while names.len() < n {
            let candidate = format!("{prefix}-{k}");
            check_name(&candidate)?;
            k += 1;
            if self.exists(&candidate) {
                continue;
            }
            if let Ok(g) = locks.entry(candidate.clone()).or_default().clone().try_lock_owned() {
                names.push(candidate);
                guards.push(g);
            }
        }
        Ok((names, guards))
    }

    /// runsc names each sandbox's control socket after the container id in the *abstract*
    /// socket namespace, which is host-wide: ids must be unique across engines, not only within
    /// one runsc root. The engine's tag (a hash of its state directory) makes them so.
    fn runtime_id(&self, name: &str, generation: u64) -> String {
        format!("sf-{}-{name}-{generation}", self.tag)
    }

    fn console_log(&self, name: &str) -> PathBuf {
        self.sandbox_dir(name).join("console.log")
    }

    fn bundle_dir(&self, name: &str) -> PathBuf {
        self.sandbox_dir(name).join("bundle")
    }

    fn info(rec: &SandboxRecord, timings: Timings) -> SandboxInfo {
        let vm = match DriverConfig::from_parts(&rec.driver, &rec.config) {
            Ok(DriverConfig::Firecracker(c)) => Some(c),
            _ => None,
        };
        SandboxInfo {
            name: rec.name.clone(),
            driver: rec.driver.clone(),
            status: rec.status,
            head: rec.head.clone(),
            workspace: rec.workspace.clone(),
            runtime_id: rec.runtime_id.clone(),
            api_socket: vm.as_ref().map(|c| c.api_socket.clone()),
            netns: vm
                .as_ref()
                .filter(|c| c.pid.is_some() && c.devices.as_ref().is_some_and(|d| !d.network.is_empty()))
                .and_then(|c| c.vmm_process())
                .map(|(pid, _)| PathBuf::from(format!("/proc/{pid}/ns/net"))),
            // (Only while something listens on it.)
            vsock: vm
                .filter(|_| matches!(rec.status, Status::Running | Status::Paused))
                .and_then(|c| c.devices?.vsock)
                .map(|v| v.host_path),
            ended: None,
            timings,
        }
    }

    fn resolve(&self, spec: &str) -> Result<Hash> {
        if let Some(h) = model::parse_hash(spec) {
            return Ok(h);
        }
        if check_name(spec).is_ok() {
            if let Some(h) = self.store.get_ref(&tag_ref(spec))? {
                return Ok(h);
            }
            if let Some(h) = self.store.get_ref(&head_ref(spec))? {
                return Ok(h);
            }
            if self.exists(spec) {
                return Err(Error::NotFound(format!("sandbox {spec} has no snapshot yet")));
            }
        }
        self.store
            .resolve(spec)
            .map_err(|_| Error::NotFound(format!("snapshot {spec} (no tag, sandbox or id of that name)")))
    }

    fn load_snapshot(&self, id: Hash) -> Result<Snapshot> {
        let node = self.store.get_node(&id)?;
        SnapshotBody::from_node(id, &node)
    }

    // ---- run ------------------------------------------------------------------------------

    fn run(&self, spec: RunSpec) -> Result<SandboxInfo> {
        let mut clock = Clock::new();
        if self.exists(&spec.name) {
            return Err(Error::Exists(format!("sandbox {}", spec.name)));
        }
        let name = spec.name.clone();
        let dir = self.sandbox_dir(&name);
        let (workspace, owns) = match &spec.workspace {
            Some(w) => {
                let w = std::fs::canonicalize(w).map_err(|e| Error::io(format!("workspace {}", w.display()), e))?;
                self.check_workspace_free(&w)?;
                (w, false)
            }
            // A fresh path per sandbox incarnation: fsfork keys its stat cache by path, and a
            // later sandbox of the same name must not inherit it.
            None => (self.state.join("workspaces").join(format!("{name}.{}", model::now_ms())), true),
        };
        let result = (|| -> Result<SandboxRecord> {
            std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("mkdir {}", dir.display()), e))?;
            if owns {
                std::fs::create_dir_all(&workspace)
                    .map_err(|e| Error::io(format!("mkdir {}", workspace.display()), e))?;
            }
            let mut rec = SandboxRecord {
                name: name.clone(),
                driver: spec.driver.name().into(),
                config: spec.driver.to_value()?,
                status: Status::Stopped,
                runtime_id: None,
                generation: 1,
                workspace: Some(workspace.clone()),
                owns_workspace: owns,
                head: None,
                created_ms: model::now_ms(),
            };
            match &spec.driver {
                DriverConfig::Gvisor(cfg) => {
                    cfg.validate()?;
                    let bundle = self.bundle_dir(&name);
                    cfg.write_bundle(&bundle, Some(&workspace))?;
                    let rid = self.runtime_id(&name, rec.generation);
                    self.runsc.run_detached(&rid, &bundle, &self.console_log(&name))?;
                    rec.runtime_id = Some(rid);
                    rec.status = Status::Running;
                }
                DriverConfig::Raw(cfg) => {
                    cfg.validate()?;
                    // A raw sandbox is driven by its own VMM; the engine only records it.
                    rec.status = Status::Running;
                }
                DriverConfig::Firecracker(cfg) => {
                    // What the engine knows of VMMs it started is not a caller's to say: a
                    // read-only drive's recorded file becomes what a restore links to.
                    if cfg.devices.is_some() || cfg.pid.is_some() {
                        return Err(Error::Invalid(
                            "firecracker: devices and pid are the engine's own record of VMs it \
                             started; a running VM is handed over by its api_socket"
                                .into(),
                        ));
                    }
                    // Attach to a running microVM: it must answer on its API socket.
                    let info = self.api(&cfg.api_socket).instance_info()?;
                    tracing::info!(sandbox = %name, ?info, "attached to firecracker");
                    rec.status = Status::Running;
                }
            }
            self.save_record(&rec)?;
            Ok(rec)
        })();
        match result {
            Ok(rec) => {
                clock.step("start");
                tracing::info!(sandbox = %name, "started");
                Ok(Self::info(&rec, clock.done()))
            }
            Err(e) => {
                let _ = self.runsc.destroy(&self.runtime_id(&name, 1));
                let _ = std::fs::remove_dir_all(&dir);
                if owns {
                    let _ = std::fs::remove_dir_all(&workspace);
                }
                Err(e)
            }
        }
    }

    // ---- checkpoint -----------------------------------------------------------------------

    fn checkpoint(&self, name: &str, opts: &CheckpointOptions) -> Result<CheckpointReport> {
        let mut created = Vec::new();
        let r = self.checkpoint_inner(name, opts, &mut created);
        // fsfork names every workspace checkpoint with a ref of its own. A committed snapshot
        // links its workspace checkpoint (that keeps it alive); a failed one must leave nothing
        // behind; either way fsfork's ref goes, so gc can reclaim the tree with the snapshot.
        if !created.is_empty() {
            let dropped = self.store.begin().and_then(|mut tx| {
                for w in &created {
                    tx.delete_ref(&workspace::checkpoint_ref(w));
                }
                tx.commit()
            });
            if let Err(e) = dropped {
                tracing::warn!(error = %e, "could not drop fsfork's workspace checkpoint refs");
            }
        }
        r
    }

    fn checkpoint_inner(
        &self,
        name: &str,
        opts: &CheckpointOptions,
        created: &mut Vec<Hash>,
    ) -> Result<CheckpointReport> {
        let mut clock = Clock::new();
        let mut rec = self.load_record(name)?;
        self.refresh(&mut rec)?;
        let driver = DriverConfig::from_parts(&rec.driver, &rec.config)?;
        let parent = match &rec.head {
            Some(h) => Some(model::parse_hash(h).ok_or_else(|| Error::corrupt("sandbox record", "bad head"))?),
            None => None,
        };
        let parent_snap = match parent {
            Some(p) => self.load_snapshot(p).ok(),
            None => None,
        };
        let mut tx = self.store.begin()?;
        let mut parts = Vec::new();
        // Bytes this snapshot adds to the store (after dedup and compression).
        let mut added = 0u64;
        match &driver {
            DriverConfig::Gvisor(_) => {
                if rec.status != Status::Running && rec.status != Status::Paused {
                    return Err(Error::Invalid(format!(
                        "sandbox {name} is {:?}: only a running sandbox can be checkpointed",
                        rec.status
                    )));
                }
                let rid = rec.runtime_id.clone().ok_or_else(|| Error::Invalid("no runtime id".into()))?;
                let was_paused = rec.status == Status::Paused;
                if was_paused && opts.leave_running {
                    // Seen with this runsc: `pause` of a restored sandbox succeeds, `state` says
                    // paused, and its tasks go on running.
                    return Err(Error::Invalid(format!(
                        "sandbox {name} is paused, and runsc cannot pause the sandbox a checkpoint \
                         leaves running (it restores it): resume it first, or checkpoint without \
                         --leave-running"
                    )));
                }
                // runsc ends the sandbox when it cannot write its image (a full disk): refuse
                // first, while the sandbox is untouched, when the image cannot fit.
                let usage = self.runsc.memory_usage(&rid);
                check_room_for_image(&self.state.join("tmp"), usage, self.store.min_free_bytes(), name)?;
                let img_dir = tempdir(&self.state.join("tmp"), "ckpt")?;
                // No pause of our own: runsc checkpoint stops every task before it saves memory
                // and ends the sandbox afterwards, so once it returns nothing can change the
                // workspace, which then holds exactly the files of the memory image's instant.
                // The workspace is checkpointed right then, before anything (a restore in place)
                // may write to it again.
                // The image itself becomes the store's pack (adopted, not copied): while runsc
                // writes it, its bytes are only handed to the disk, which costs runsc no CPU
                // (runsc's checkpoint keeps both cores busy: any work of ours beside it slows it
                // down as much); afterwards it is chunked and hashed in place.
                let image = img_dir.join("checkpoint.img");
                let done = AtomicBool::new(false);
                let ck = std::thread::scope(|scope| {
                    scope.spawn(|| write_back_while_written(&image, &done));
                    let ck = self.runsc.checkpoint(&rid, &img_dir);
                    done.store(true, Ordering::SeqCst);
                    ck
                });
                clock.step("runsc checkpoint (image written back meanwhile)");
                if let Err(e) = ck {
                    let _ = std::fs::remove_dir_all(&img_dir);
                    // runsc ends the sandbox after a complete image, but also when it fails to
                    // write one: say which, and record it.
                    self.refresh(&mut rec)?;
                    if rec.status == Status::Exited {
                        return Err(Error::Runtime {
                            what: "checkpoint".into(),
                            detail: format!(
                                "{e}; the sandbox {name} ended with it (its state since the last checkpoint is lost)"
                            ),
                        });
                    }
                    return Err(e);
                }
                // runsc checkpoint ended the sandbox (its container is deleted in the background).
                self.runsc.discard(&rid);
                let new_rid = self.runtime_id(name, rec.generation + 1);
                // A restore that fails half way leaves no container behind.
                let restore_in_place = || -> Result<()> {
                    let r = self.runsc.restore_detached(
                        &new_rid,
                        &self.bundle_dir(name),
                        &img_dir,
                        &self.console_log(name),
                    );
                    if r.is_err() {
                        let _ = self.runsc.destroy(&new_rid);
                    }
                    r
                };
                // The image is stored (chunked and hashed on the cores runsc no longer needs) and
                // checksummed for the image cache while the workspace is checkpointed. With
                // --leave-running the sandbox comes back from the image (it only reads it) as
                // soon as the workspace's files are captured, so the rest overlaps the restore.
                let (mut ws_err, stored, file_hash, restored) = std::thread::scope(|scope| {
                    // With --leave-running the image is stored once the sandbox is back: runsc's
                    // restore needs both cores, and the sandbox running again is what the caller
                    // waits for first. (The store's wait for the disk overlaps either way.)
                    let (restore_ended, wait_for_restore) = std::sync::mpsc::channel::<()>();
                    let (tx, image) = (&mut tx, &image);
                    let storing = scope.spawn(move || {
                        // Returns once every sender is gone: the restore ended or never started.
                        let _ = wait_for_restore.recv();
                        tx.adopt_file_as_blobs(image, SEGMENT)
                    });
                    let hashing = scope.spawn(|| file_checksum(image));
                    let mut restoring = None;
                    let mut captured = || {
                        if opts.leave_running && restoring.is_none() {
                            let ended = restore_ended.clone();
                            restoring = Some(scope.spawn(move || {
                                let r = restore_in_place();
                                drop(ended);
                                r
                            }));
                        }
                    };
                    // A failure fails the snapshot; the sandbox is brought back below.
                    let ws = add_workspace_part_then(
                        &self.store,
                        rec.workspace.as_deref(),
                        &opts.message,
                        created,
                        &mut parts,
                        &mut captured,
                    )
                    .err();
                    drop(restore_ended);
                    let restored = restoring
                        .map(|h| h.join().unwrap_or_else(|_| Err(Error::Invalid("restore thread panicked".into()))));
                    let stored = storing
                        .join()
                        .map_err(|_| Error::Invalid("store thread panicked".into()))
                        .and_then(|r| r.map_err(Error::from));
                    (ws, stored, hashing.join().ok().and_then(|h| h.ok()), restored)
                });
                clock.step(if opts.leave_running {
                    "image stored + workspace + restore in place"
                } else {
                    "image stored + workspace"
                });
                let stored = (|| -> Result<Hash> {
                    if let Some(e) = ws_err.take() {
                        return Err(e);
                    }
                    for (k, info) in stored?.iter().enumerate() {
                        added += info.new_stored_bytes;
                        parts.push(model::Part {
                            role: Role::State,
                            name: format!("checkpoint.img.{k:03}"),
                            kind: PartKind::Blob,
                            id: info.id.to_hex(),
                            size: info.size,
                        });
                    }
                    Ok(state_key(&parts))
                })();
                let committed =
                    stored.and_then(|blob| Ok((self.commit_snapshot(tx, &rec, parent, opts, &parts)?, blob)));
                clock.step("commit");
                // The sandbox must stay as it was when the snapshot failed: bring it back then too.
                let restored = match restored {
                    Some(r) => Some(r),
                    None if committed.is_err() => Some(restore_in_place()),
                    None => None,
                };
                let mut restart_err = None;
                match restored {
                    Some(Ok(())) => {
                        rec.generation += 1;
                        rec.runtime_id = Some(new_rid.clone());
                        rec.status = Status::Running;
                        if was_paused {
                            tracing::warn!(
                                sandbox = name,
                                "the paused sandbox's checkpoint failed and it was restored running: \
                                 runsc cannot pause a restored sandbox"
                            );
                        }
                    }
                    Some(Err(e)) => {
                        rec.generation += 1;
                        rec.runtime_id = None;
                        rec.status = Status::Exited;
                        restart_err = Some(e);
                    }
                    None => {
                        rec.runtime_id = None;
                        rec.status = Status::Stopped;
                    }
                }
                // Keep the image for later restores and forks of this snapshot (verified by its
                // whole-file hash before use); drop it when it cannot be cached.
                match (&committed, file_hash) {
                    (Ok((_, blob)), Some(h)) => self.cache_image(blob, &img_dir, &h),
                    _ => {
                        let _ = std::fs::remove_dir_all(&img_dir);
                    }
                }
                let committed = committed.map(|(id, _)| id);
                match committed {
                    Ok(id) => {
                        rec.head = Some(id.to_hex());
                        self.save_record(&rec)?;
                        if let Some(e) = restart_err {
                            return Err(Error::Runtime {
                                what: format!("snapshot {} committed, but restarting {name}", id.short()),
                                detail: e.to_string(),
                            });
                        }
                        Ok(CheckpointReport {
                            id: id.to_hex(),
                            sandbox: name.to_string(),
                            parent: parent.map(|p| p.to_hex()),
                            parts,
                            status: rec.status,
                            stored_bytes_added: added,
                            timings: clock.done(),
                        })
                    }
                    Err(e) => {
                        self.save_record(&rec)?;
                        match restart_err {
                            // Both failed: the caller must learn the sandbox is gone too.
                            Some(r) => Err(Error::Runtime {
                                what: format!("checkpoint of {name} failed ({e}), and restarting it"),
                                detail: r.to_string(),
                            }),
                            None => Err(e),
                        }
                    }
                }
            }
            DriverConfig::Firecracker(cfg) => {
                if rec.status != Status::Running && rec.status != Status::Paused {
                    return Err(Error::Invalid(format!(
                        "sandbox {name} is {:?}: only a running VM can be checkpointed",
                        rec.status
                    )));
                }
                // Its memory file is written from guest memory: a VM whose pages nobody serves
                // would stall the VMM on the first missing one, and the checkpoint with it.
                if self.memory_unserved(cfg)? {
                    return Err(Error::Invalid(format!(
                        "sandbox {name} was restored lazily and nothing serves its memory now (the \
                         process that restored it is gone): start `snapfork daemon` for this store, \
                         which takes the VM over, and checkpoint it through the daemon"
                    )));
                }
                cfg.check_unjailed()?;
                let api = self.api(&cfg.api_socket);
                // Before the pause, so that failing to make it leaves the VM running.
                let dir = tempdir(&self.state.join("tmp"), "fc")?;
                // Firecracker clears its dirty log at every snapshot/create. When the checkpoint
                // then fails, the pages dirtied before it would be missing from every later
                // Diff, so the next snapshot must be Full: this mark says so, written before the
                // call and removed once a checkpoint has committed.
                let full_needed = self.sandbox_dir(name).join("needs-full-snapshot");
                if let Err(e) = api.pause() {
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(e);
                }
                clock.step("pause");
                let result = (|| -> Result<Hash> {
                    // Files first, while paused (memory and files of one instant).
                    add_workspace_part(&self.store, rec.workspace.as_deref(), &opts.message, created, &mut parts)?;
                    clock.step("workspace");
                    let prev = |role: Role, name: &str| {
                        let part = parent_snap.as_ref()?.part_named(role, name)?;
                        (part.kind == PartKind::Image).then(|| Snapshot::part_id(part).ok())?
                    };
                    let prev_mem = prev(Role::Memory, "mem");
                    // A Diff snapshot holds only the pages dirtied since the last one: it is
                    // ingested onto the parent's image.
                    let diff = cfg.diff && prev_mem.is_some() && !full_needed.exists();
                    let devices = cfg.current_devices(&api)?;
                    let (vmstate, mem) = (dir.join("vmstate"), dir.join("mem"));
                    if cfg.diff {
                        write_synced(&full_needed, b"")?;
                    }
                    api.create_snapshot(diff, &vmstate, &mem)?;
                    clock.step(if diff { "snapshot/create Diff" } else { "snapshot/create Full" });
                    let info = tx.put_blob_file(&vmstate)?;
                    added += info.new_stored_bytes;
                    parts.push(model::Part {
                        role: Role::State,
                        name: "vmstate".into(),
                        kind: PartKind::Blob,
                        id: info.id.to_hex(),
                        size: info.size,
                    });
                    let opts_mem = snapfork_store::IngestOptions {
                        page_size: cfg.page_size,
                        parent: prev_mem,
                        diff_snapshot: diff,
                        ..Default::default()
                    };
                    let m = tx.ingest_image(&mem, &opts_mem)?;
                    added += m.new_stored_bytes;
                    parts.push(model::Part {
                        role: Role::Memory,
                        name: "mem".into(),
                        kind: PartKind::Image,
                        id: m.id.to_hex(),
                        size: m.size,
                    });
                    // Flushed by snapshot/create; read-only drives are shared, not stored.
                    // (Their ids were checked with the rest by `current_devices`.)
                    for drive in devices.drives.iter().filter(|d| !d.is_read_only) {
                        let o = snapfork_store::IngestOptions {
                            page_size: 4096,
                            parent: prev(Role::Disk, &drive.drive_id),
                            ..Default::default()
                        };
                        let d = tx.ingest_image(&drive.host_path, &o)?;
                        added += d.new_stored_bytes;
                        parts.push(model::Part {
                            role: Role::Disk,
                            name: drive.drive_id.clone(),
                            kind: PartKind::Image,
                            id: d.id.to_hex(),
                            size: d.size,
                        });
                    }
                    clock.step("ingest");
                    // The snapshot records the devices as its vmstate names them, for restores.
                    let taken = FirecrackerConfig { devices: Some(devices), ..cfg.clone() };
                    let config = serde_json::to_value(&taken).map_err(|e| Error::Invalid(e.to_string()))?;
                    let id =
                        self.commit_snapshot(tx, &SandboxRecord { config, ..rec.clone() }, parent, opts, &parts)?;
                    clock.step("commit");
                    Ok(id)
                })();
                if result.is_ok() {
                    let _ = std::fs::remove_dir_all(&dir);
                } else {
                    // The VMM may still be writing its files (it did not answer in time), and
                    // a file being written cannot be unlinked until the write ends: a VMM
                    // stalled inside one would hold this checkpoint, and its sandbox, forever.
                    remove_dir_in_background(dir);
                }
                // Resume when asked to, and always when the snapshot failed (as it was).
                let mut resume_failed = None;
                rec.status = Status::Paused;
                if opts.leave_running || result.is_err() {
                    match api.resume() {
                        Ok(()) => rec.status = Status::Running,
                        Err(e) => resume_failed = Some(e),
                    }
                    clock.step("resume");
                }
                let id = match result {
                    Ok(id) => id,
                    Err(e) => {
                        self.save_record(&rec)?;
                        return Err(match resume_failed {
                            None => e,
                            Some(r) => Error::Runtime {
                                what: format!("checkpoint of {name} failed ({e}), and resuming its VM (left paused)"),
                                detail: r.to_string(),
                            },
                        });
                    }
                };
                let _ = std::fs::remove_file(&full_needed);
                rec.head = Some(id.to_hex());
                self.save_record(&rec)?;
                if let Some(r) = resume_failed {
                    return Err(Error::Runtime {
                        what: format!(
                            "checkpoint {} of {name} was taken, but resuming its VM (left paused)",
                            id.short()
                        ),
                        detail: r.to_string(),
                    });
                }
                Ok(CheckpointReport {
                    id: id.to_hex(),
                    sandbox: name.to_string(),
                    parent: parent.map(|p| p.to_hex()),
                    parts,
                    status: rec.status,
                    stored_bytes_added: added,
                    timings: clock.done(),
                })
            }
            DriverConfig::Raw(cfg) => {
                let prev_parts = parent_snap.map(|s| s.body.parts).unwrap_or_default();
                let (p, new) = crate::raw::checkpoint(&self.store, &mut tx, cfg, &prev_parts)?;
                parts = p;
                added += new;
                clock.step("ingest files");
                add_workspace_part(&self.store, rec.workspace.as_deref(), &opts.message, created, &mut parts)?;
                clock.step("workspace");
                let id = self.commit_snapshot(tx, &rec, parent, opts, &parts)?;
                clock.step("commit");
                rec.head = Some(id.to_hex());
                self.save_record(&rec)?;
                Ok(CheckpointReport {
                    id: id.to_hex(),
                    sandbox: name.to_string(),
                    parent: parent.map(|p| p.to_hex()),
                    parts,
                    status: rec.status,
                    stored_bytes_added: added,
                    timings: clock.done(),
                })
            }
        }
    }

    /// Stores the snapshot node of `parts` in `tx`, names it the sandbox's head and one of its
    /// snapshots, and commits: the snapshot exists, durably, when this returns.
    fn commit_snapshot(
        &self,
        mut tx: snapfork_store::Txn,
        rec: &SandboxRecord,
        parent: Option<Hash>,
        opts: &CheckpointOptions,
        parts: &[model::Part],
    ) -> Result<Hash> {
        let id = tx.put_node(&self.snapshot_body(rec, parent, opts, parts).to_node()?)?;
        tx.set_ref(&head_ref(&rec.name), id)?;
        tx.set_ref(&format!("{}{}", snaps_prefix(&rec.name), id.to_hex()), id)?;
        tx.commit()?;
        Ok(id)
    }

    fn snapshot_body(
        &self,
        rec: &SandboxRecord,
        parent: Option<Hash>,
        opts: &CheckpointOptions,
        parts: &[model::Part],
    ) -> SnapshotBody {
        SnapshotBody {
            version: 1,
            parent: parent.map(|p| p.to_hex()),
            sandbox: rec.name.clone(),
            message: opts.message.clone(),
            labels: opts.labels.clone(),
            created_ms: model::now_ms(),
            driver: rec.driver.clone(),
            config: rec.config.clone(),
            parts: parts.to_vec(),
        }
    }

    // ---- restore / fork / revert ----------------------------------------------------------

    /// The directory of the image cache entry for state blob `blob`.
    fn cache_dir(&self, blob: &Hash) -> PathBuf {
        self.state.join("cache").join(blob.to_hex())
    }

    /// Moves a checkpoint image directory into the cache under its blob id, with the image's
    /// [`file_checksum`] beside it; evicts the least recently used entries beyond the budget.
    fn cache_image(&self, blob: &Hash, img_dir: &Path, file_hash: &u128) {
        let dest = self.cache_dir(blob);
        let moved = (|| -> Result<()> {
            if dest.exists() {
                return Err(Error::Exists(dest.display().to_string()));
            }
            std::fs::create_dir_all(self.state.join("cache")).map_err(|e| Error::io("mkdir cache", e))?;
            write_synced(&img_dir.join(CHECKSUM_FILE), format!("{file_hash:032x}").as_bytes())?;
            rename(img_dir, &dest)
        })();
        if moved.is_err() {
            let _ = std::fs::remove_dir_all(img_dir);
        }
        self.evict_cache();
    }

    fn evict_cache(&self) {
        let Ok(entries) = std::fs::read_dir(self.state.join("cache")) else {
            return;
        };
        let mut v: Vec<(std::time::SystemTime, u64, PathBuf)> = entries
            .flatten()
            .filter_map(|e| {
                let img = e.path().join("checkpoint.img");
                let m = std::fs::metadata(&img).ok()?;
                Some((m.modified().ok()?, m.len(), e.path()))
            })
            .collect();
        v.sort();
        let mut total: u64 = v.iter().map(|x| x.1).sum();
        let mut count = v.len();
        let recent = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
        for (mtime, len, path) in v {
            if (total <= IMAGE_CACHE_BYTES && count <= IMAGE_CACHE_ENTRIES) || mtime > recent {
                break;
            }
            let _ = std::fs::remove_dir_all(&path);
            total -= len;
            count -= 1;
        }
    }

    /// Materializes the runtime state a restore needs (gvisor: the checkpoint image): from the
    /// image cache when its whole-file hash still matches, else out of the store, verified chunk
    /// by chunk, into a temporary directory (linked there when the store holds it as one file).
    fn prepare_state(&self, s: &Snapshot) -> Result<Option<Prepared>> {
        if s.body.driver != "gvisor" {
            return Ok(None);
        }
        let segs: Vec<&model::Part> =
            s.body.parts.iter().filter(|p| p.role == Role::State && p.kind == PartKind::Blob).collect();
        if segs.is_empty() {
            return Err(Error::corrupt(format!("snapshot {}", s.id), "gvisor snapshot without a state image"));
        }
        let total: u64 = segs.iter().map(|p| p.size).sum();
        let blob = state_key(&s.body.parts);
        let cached = self.cache_dir(&blob);
        if let Ok(expected) = std::fs::read_to_string(cached.join(CHECKSUM_FILE)) {
            let img = cached.join("checkpoint.img");
            match file_checksum(&img) {
                Ok(h) if format!("{h:032x}") == expected.trim() && file_size(&img).ok() == Some(total) => {
                    // Mark it used, so eviction leaves it alone while runsc reads it.
                    let _ = std::fs::File::options()
                        .append(true)
                        .open(&img)
                        .and_then(|f| f.set_modified(std::time::SystemTime::now()));
                    return Ok(Some(Prepared { dir: cached, temporary: false }));
                }
                _ => {
                    tracing::warn!(blob = %blob.short(), "cached image does not match its hash; reading the store");
                    let _ = std::fs::remove_dir_all(&cached);
                }
            }
        }
        let dir = tempdir(&self.state.join("tmp"), "img")?;
        let path = dir.join("checkpoint.img");
        let r = (|| -> Result<()> {
            // The image the store adopted at checkpoint is still one of its packs, unless its
            // chunks were deduplicated against older ones: then it is linked, not rewritten.
            let ids = segs.iter().map(|p| Snapshot::part_id(p)).collect::<Result<Vec<_>>>()?;
            if self.store.link_blobs_as_file(&ids, &path)? {
                return Ok(());
            }
            let f = std::fs::File::create(&path).map_err(|e| Error::io(format!("create {}", path.display()), e))?;
            // Segments are read (decompressed, verified) on two threads, each written at its
            // offset: reading the store is CPU, and it is on the restore's path.
            let mut jobs = Vec::with_capacity(segs.len());
            let mut at = 0u64;
            for p in &segs {
                jobs.push((Snapshot::part_id(p)?, at, p.size));
                at += p.size;
            }
            let next = std::sync::atomic::AtomicUsize::new(0);
            let failed = AtomicBool::new(false);
            let segment = |&(id, offset, size): &(Hash, u64, u64)| -> Result<()> {
                let mut w = std::io::BufWriter::with_capacity(1 << 20, OffsetWriter { file: &f, offset });
                if self.store.read_blob(&id, &mut w)? != size {
                    return Err(Error::corrupt(
                        format!("state blob {}", id.short()),
                        "size differs from the snapshot's",
                    ));
                }
                std::io::Write::flush(&mut w).map_err(|e| Error::io(format!("write {}", path.display()), e))
            };
            let worker = || -> Result<()> {
                while !failed.load(Ordering::Relaxed)
                    && let Some(job) = jobs.get(next.fetch_add(1, Ordering::Relaxed))
                {
                    // The first failure stops both threads.
                    segment(job).inspect_err(|_| failed.store(true, Ordering::Relaxed))?;
                }
                Ok(())
            };
            std::thread::scope(|scope| {
                let other = scope.spawn(worker);
                let mine = worker();
                other.join().unwrap_or_else(|_| Err(Error::Invalid("image writer thread panicked".into()))).and(mine)
            })
        })();
        match r {
            Ok(()) => Ok(Some(Prepared { dir, temporary: true })),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    /// Refuses an imported snapshot whose sandbox would see a host directory (its rootfs, a
    /// read-only mount) outside [`EngineOptions::trusted_host_dirs`]. Paths are resolved first,
    /// so neither `..` nor a symlink leads out of a trusted directory.
    fn check_imported_host_dirs(&self, s: &Snapshot, cfg: &GvisorConfig) -> Result<()> {
        let shown = std::iter::once(&cfg.rootfs).chain(cfg.ro_mounts.iter().map(|(src, _)| src));
        for dir in shown {
            let real = dir.canonicalize().map_err(|e| Error::io(format!("resolve {}", dir.display()), e))?;
            if !self.trusted_host_dirs.iter().any(|t| real.starts_with(t)) {
                return Err(Error::Invalid(format!(
                    "snapshot {} came by import and would show its sandbox host directory {}, which is not \
                     under a trusted host directory (EngineOptions::trusted_host_dirs, CLI --trust-host-dir)",
                    s.id.short(),
                    real.display()
                )));
            }
        }
        Ok(())
    }

    fn restore_as(&self, s: &Snapshot, name: &str, prepared: Option<&Path>) -> Result<SandboxInfo> {
        let mut clock = Clock::new();
        check_name(name)?;
        if self.exists(name) {
            return Err(Error::Exists(format!("sandbox {name}")));
        }
        let driver = DriverConfig::from_parts(&s.body.driver, &s.body.config)?;
        let dir = self.sandbox_dir(name);
        let ws = self.state.join("workspaces").join(format!("{name}.{}", model::now_ms()));
        let mut started_vm = None;
        let result = (|| -> Result<SandboxRecord> {
            std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("mkdir {}", dir.display()), e))?;
            match s.part(Role::Workspace) {
                Some(p) => workspace::materialize(&self.store, p, &ws)?,
                None => std::fs::create_dir_all(&ws).map_err(|e| Error::io(format!("mkdir {}", ws.display()), e))?,
            }
            clock.step("workspace");
            let mut rec = SandboxRecord {
                name: name.to_string(),
                driver: s.body.driver.clone(),
                config: s.body.config.clone(),
                status: Status::Stopped,
                runtime_id: None,
                generation: 1,
                workspace: Some(ws.clone()),
                owns_workspace: true,
                head: Some(s.id.to_hex()),
                created_ms: model::now_ms(),
            };
            match &driver {
                DriverConfig::Gvisor(cfg) => {
                    let img = prepared.ok_or_else(|| Error::Invalid("state image not prepared".into()))?;
                    // The configuration may come from an imported bundle: held to the rules of
                    // `run`, and what it shows of the host must be vouched for here.
                    cfg.validate()?;
                    if crate::bundle::is_imported(&self.store, &s.id)? {
                        self.check_imported_host_dirs(s, cfg)?;
                    }
                    let bundle = self.bundle_dir(name);
                    cfg.write_bundle(&bundle, Some(&ws))?;
                    let rid = self.runtime_id(name, rec.generation);
                    self.runsc.restore_detached(&rid, &bundle, img, &self.console_log(name))?;
                    rec.runtime_id = Some(rid);
                    rec.status = Status::Running;
                    clock.step("runsc restore");
                }
                DriverConfig::Firecracker(cfg) => {
                    // Each incarnation in a directory of its own, which goes with it (revert).
                    let new_cfg = self.start_firecracker(s, cfg, &dir.join("vm-1"), name, true)?;
                    rec.config = serde_json::to_value(&new_cfg).map_err(|e| Error::Invalid(e.to_string()))?;
                    rec.status = Status::Running;
                    started_vm = Some(new_cfg);
                    clock.step("firecracker load (uffd)");
                }
                DriverConfig::Raw(_) => {
                    let files = dir.join("files");
                    let cfg = crate::raw::materialize(&self.store, &s.body.parts, &files)?;
                    rec.config = serde_json::to_value(&cfg).map_err(|e| Error::Invalid(e.to_string()))?;
                    rec.status = Status::Stopped;
                    clock.step("materialize files");
                }
            }
            let mut tx = self.store.begin()?;
            tx.set_ref(&head_ref(name), s.id)?;
            tx.commit()?;
            self.save_record(&rec)?;
            Ok(rec)
        })();
        match result {
            Ok(rec) => Ok(Self::info(&rec, clock.done())),
            Err(e) => {
                let _ = self.runsc.destroy(&self.runtime_id(name, 1));
                if let Some(vm) = started_vm {
                    vm.kill_vmm();
                }
                let _ = std::fs::remove_dir_all(&dir);
                let _ = workspace::forget(&self.store, &ws);
                let _ = std::fs::remove_dir_all(&ws);
                Err(e)
            }
        }
    }

    fn revert(&self, name: &str, snap: &str) -> Result<SandboxInfo> {
        let mut clock = Clock::new();
        let mut rec = self.load_record(name)?;
        self.refresh(&mut rec)?;
        let s = self.load_snapshot(self.resolve(snap)?)?;
        if s.body.driver != rec.driver {
            return Err(Error::Invalid(format!(
                "snapshot {} is a {} snapshot, sandbox {name} runs {}",
                s.id.short(),
                s.body.driver,
                rec.driver
            )));
        }
        let driver = DriverConfig::from_parts(&rec.driver, &rec.config)?;
        // Prepare the state image while the sandbox still runs untouched.
        let prepared = self.prepare_state(&s)?;
        clock.step("prepare state");
        let cleanup_prepared = || {
            if let Some(p) = &prepared {
                p.release();
            }
        };
        let old_rid = rec.runtime_id.clone();
        let was_running = rec.status == Status::Running;
        // Freeze the old incarnation (not kill: on failure it resumes as if nothing happened).
        if was_running
            && let Some(rid) = &old_rid
            && let Err(e) = self.runsc.pause(rid)
        {
            cleanup_prepared();
            return Err(e);
        }
        // A Firecracker VM too: its successor may open the same files (it loads from the paths
        // its vmstate names before it is pointed at its copies; one of a snapshot that recorded
        // no devices keeps them), so the two must never run at once. The successor loads paused and resumes only once this one is gone
        // (below); one that does not pause runs until it is ended.
        let old_vm = match &driver {
            DriverConfig::Firecracker(c) => Some(c),
            _ => None,
        };
        if old_vm.is_some()
            && let Err(e) = self.check_vm_state_trusted(&s)
        {
            cleanup_prepared();
            return Err(e);
        }
        let mut vm_paused = false;
        if was_running && let Some(c) = old_vm {
            match ApiClient::new(&c.api_socket).with_timeout(Duration::from_secs(10)).pause() {
                Ok(()) => vm_paused = true,
                Err(e) => tracing::warn!(sandbox = name, "the VM does not pause; it runs until it is ended: {e}"),
            }
        }
        let resume_old = || {
            if was_running && let Some(rid) = &old_rid {
                let _ = self.runsc.resume(rid);
            }
            if vm_paused && let Some(c) = old_vm {
                let _ = self.api(&c.api_socket).resume();
            }
        };
        // What the record and the head ref were, put back if the revert fails half committed.
        let before = rec.clone();
        clock.step("pause");
        // The workspace goes back atomically; the old tree stays aside until the end. The paused
        // sandbox's gofer holds the old directory by fd, so it keeps seeing the old tree.
        let ws = rec.workspace.clone();
        let old_tree = match (&ws, s.part(Role::Workspace)) {
            (Some(dir), Some(p)) => match workspace::revert(&self.store, dir, p) {
                Ok(old) => Some(old),
                Err(e) => {
                    resume_old();
                    cleanup_prepared();
                    return Err(e);
                }
            },
            _ => None,
        };
        clock.step("revert workspace");
        let undo = |e: Error| -> Error {
            // Put the old tree back (and the workspace's record), then resume the old sandbox.
            if let Some(reverted) = &old_tree
                && let Err(x) = workspace::undo_revert(&self.store, reverted)
            {
                tracing::error!(sandbox = name, "the failed revert's workspace could not be put back: {x}");
            }
            resume_old();
            cleanup_prepared();
            e
        };
        let new_gen = rec.generation + 1;
        match &driver {
            DriverConfig::Gvisor(cfg) => {
                let rid = self.runtime_id(name, new_gen);
                let bundle = self.bundle_dir(name);
                let img = prepared
                    .as_ref()
                    .map(|p| p.dir.clone())
                    .ok_or_else(|| Error::Invalid("state image not prepared".into()));
                let started = img.and_then(|img| {
                    cfg.write_bundle(&bundle, ws.as_deref())?;
                    self.runsc.restore_detached(&rid, &bundle, &img, &self.console_log(name))
                });
                if let Err(e) = started {
                    let _ = self.runsc.destroy(&rid);
                    return Err(undo(e));
                }
                clock.step("runsc restore");
                rec.runtime_id = Some(rid);
                rec.status = Status::Running;
            }
            DriverConfig::Firecracker(cfg) => {
                // Firecracker loads snapshots only before boot: a new process takes over.
                let dir = self.sandbox_dir(name).join(format!("vm-{new_gen}"));
                // Loaded paused: it runs only once its predecessor is gone.
                let started = self.start_firecracker(&s, cfg, &dir, name, false).and_then(|new_cfg| {
                    let v = serde_json::to_value(&new_cfg).map_err(|e| Error::Invalid(e.to_string()));
                    if v.is_err() {
                        new_cfg.kill_vmm();
                    }
                    v
                });
                match started {
                    Ok(new_cfg) => {
                        rec.config = new_cfg;
                        rec.status = Status::Running;
                    }
                    Err(e) => {
                        let _ = std::fs::remove_dir_all(&dir);
                        return Err(undo(e));
                    }
                }
                clock.step("firecracker load (uffd)");
            }
            DriverConfig::Raw(cfg) => {
                if let Err(e) = crate::raw::revert(&self.store, &s.body.parts, cfg) {
                    return Err(undo(e));
                }
                clock.step("write files");
            }
        }
        rec.generation = new_gen;
        rec.head = Some(s.id.to_hex());
        let committed = (|| -> Result<()> {
            let mut tx = self.store.begin()?;
            tx.set_ref(&head_ref(name), s.id)?;
            tx.commit()?;
            self.save_record(&rec)
        })();
        // Until the record names the new runtime, the old one stays (paused): a failure here
        // ends the new one, puts back whatever of the commit went through (the head ref, the
        // record), and resumes the old, as if the revert never ran.
        if let Err(e) = committed {
            self.end_runtime(&rec);
            self.put_back(&before);
            return Err(undo(e));
        }
        let old_gone = match &driver {
            DriverConfig::Gvisor(_) => {
                if let Some(old) = &old_rid {
                    self.runsc.discard(old);
                }
                true
            }
            // Also one handed over with `run` (found by its API socket).
            DriverConfig::Firecracker(old) => old.kill_vmm(),
            DriverConfig::Raw(_) => true,
        };
        cleanup_prepared();
        if let Some(old) = old_tree {
            workspace::remove_old_tree(old);
        }
        if let (DriverConfig::Firecracker(old), Ok(DriverConfig::Firecracker(new))) =
            (&driver, DriverConfig::from_parts(&rec.driver, &rec.config))
        {
            // The new VM runs only once the old one is known to be gone: the two share disk files.
            let resumed = if old_gone {
                self.api(&new.api_socket).resume().map_err(|e| e.to_string())
            } else {
                Err("its predecessor could not be confirmed ended, and the two would share disk files".to_string())
            };
            if old_gone {
                self.discard_vm_files(name, old);
            }
            if let Err(e) = resumed {
                rec.status = Status::Paused;
                let _ = self.save_record(&rec);
                return Err(Error::Runtime {
                    what: format!("revert {name}"),
                    detail: format!("reverted to {}, but its VM stays paused: {e}", s.id.short()),
                });
            }
        }
        clock.step("commit");
        Ok(Self::info(&rec, clock.done()))
    }

    /// Puts sandbox `before.name`'s record and head ref back as `before` has them (best effort:
    /// after a revert's commit failed half way).
    fn put_back(&self, before: &SandboxRecord) {
        let name = &before.name;
        let restored = self.store.begin().and_then(|mut tx| {
            match before.head.as_deref().map(str::parse::<Hash>) {
                Some(Ok(h)) => tx.set_ref(&head_ref(name), h)?,
                None => tx.delete_ref(&head_ref(name)),
                // (A record that names no valid head: its ref is left as it is.)
                Some(Err(_)) => {}
            }
            tx.commit()
        });
        if let Err(e) = restored.map_err(Error::from).and_then(|_| self.save_record(before)) {
            tracing::error!(sandbox = %name, "a failed revert could not put the sandbox back as it was: {e}");
        }
    }

    /// Ends the runtime `rec` names (a revert's new incarnation that could not be committed)
    /// and removes what only it used.
    fn end_runtime(&self, rec: &SandboxRecord) {
        match DriverConfig::from_parts(&rec.driver, &rec.config) {
            Ok(DriverConfig::Gvisor(_)) => {
                if let Some(rid) = &rec.runtime_id {
                    let _ = self.runsc.destroy(rid);
                }
            }
            Ok(DriverConfig::Firecracker(cfg)) => {
                cfg.kill_vmm();
                self.discard_vm_files(&rec.name, &cfg);
            }
            _ => {}
        }
    }

    /// Removes the files the engine made for a Firecracker VM it started for sandbox `name` (its
    /// `vm-N` directory: vmstate, disk copies, API socket) once that VM is gone. A VM handed
    /// over with `run` owns its files: they stay.
    fn discard_vm_files(&self, name: &str, cfg: &FirecrackerConfig) {
        let sandbox = self.sandbox_dir(name);
        let Some(dir) = cfg.api_socket.parent() else {
            return;
        };
        let is_vm_dir = dir.parent() == Some(sandbox.as_path())
            && dir.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("vm-"));
        if cfg.pid.is_some()
            && is_vm_dir
            && let Err(e) = std::fs::remove_dir_all(dir)
        {
            tracing::warn!(dir = %dir.display(), "cannot remove the files of a replaced VM: {e}");
        }
    }

    /// The UFFD page server for memory image `mem` (one per image, shared by every restore and
    /// fork of it, with one cache of decompressed pages), started on first use. It prefetches the
    /// image's stored working set (its pages streamed in from their own blob), and when the
    /// image has none yet, stores the one its first restore recorded, as `serve-uffd` does.
    fn uffd_server(&self, mem: Hash) -> Result<PathBuf> {
        use snapfork_lazy_restore::{CachedSource, RestoreOptions, ServerEvent, ServerOptions, workingset};
        let mut map = self.uffd.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = map.get(&mem) {
            // A server that stopped (it failed, or is stopping) is replaced below.
            if !h.stop.load(Ordering::SeqCst) {
                // Handed out under the lock: the idle stop (which takes it too) now waits a
                // whole idle period for this VM to connect.
                h.touch();
                return Ok(h.sock.clone());
            }
        }
        self.refuse_when_shutting_down()?;
        let dir = self.state.join("uffd");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("mkdir {}", dir.display()), e))?;
        // A name of its own per server: one that stopped removes its socket as it exits, which
        // must not be its successor's.
        static SERVERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let sock = dir.join(format!(
            "{}-{}-{}.sock",
            &mem.to_hex()[..16],
            std::process::id(),
            SERVERS.fetch_add(1, Ordering::Relaxed)
        ));
        let reader = self.store.open_image(&mem)?;
        let page_size = reader.page_size();
        let runtime =
            |e: snapfork_lazy_restore::Error| Error::Runtime { what: "uffd server".into(), detail: e.to_string() };
        let stored_ws = workingset::load(&self.store, &mem).map_err(runtime)?;
        let cache =
            Arc::new(CachedSource::new(Arc::new(snapfork_lazy_restore::StoreSource::new(reader)), UFFD_CACHE_BYTES));
        if stored_ws.is_some() {
            // Finishes on its own; a failure only costs speed (it is logged).
            let preload =
                workingset::spawn_preload(self.store.clone(), mem, workingset::pages_ref_name(&mem), cache.clone())
                    .map_err(|e| Error::io("spawn working-set preload", e))?;
            // It reads the store: joined with the other background threads (through one that
            // ends with it, so that they all have one type).
            let waiter = std::thread::Builder::new()
                .name(format!("ws-preload-{}", mem.short()))
                .spawn(move || drop(preload.join()))
                .map_err(|e| Error::io("spawn working-set preload", e))?;
            self.keep_background(waiter);
        }
        let opts = ServerOptions {
            restore: RestoreOptions { prefetch: stored_ws.clone().unwrap_or_default(), ..Default::default() },
            journal_dir: Some(self.vm_journals()),
            ..Default::default()
        };
        let server = snapfork_lazy_restore::UffdServer::bind(&sock, cache, opts).map_err(runtime)?;
        let handle = UffdServerHandle {
            sock: sock.clone(),
            stop: server.stopper(),
            active: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            last_used: Arc::new(Mutex::new(Instant::now())),
        };
        let id = mem.short();
        let store = self.store.clone();
        let mut need_ws = stored_ws.is_none();
        let background = self.background.clone();
        let (active, in_use, ended) = (handle.active.clone(), handle.clone(), handle.stop.clone());
        let sandboxes = self.state.join("sandboxes");
        let thread = std::thread::Builder::new()
            .name(format!("uffd-{id}"))
            .spawn(move || {
                let r = server.run(|srv, ev| {
                    match &ev {
                        ServerEvent::Started { .. } => {
                            active.fetch_add(1, Ordering::SeqCst);
                        }
                        ServerEvent::Ended(rep) => {
                            active.fetch_sub(1, Ordering::SeqCst);
                            if let Some(pid) = rep.pid {
                                note_vm_end(&sandboxes, pid, &rep.end);
                            }
                        }
                        ServerEvent::Refused { .. } | ServerEvent::WorkingSet { .. } => {}
                    }
                    in_use.touch();
                    // The first VM's working set, from when its window closed or, if it ended
                    // sooner, from its end.
                    let recorded = match &ev {
                        ServerEvent::WorkingSet { pages, .. } => Some(pages),
                        ServerEvent::Ended(rep) => Some(&rep.working_set),
                        _ => None,
                    };
                    if let Some(pages) = recorded
                        && need_ws
                        && !pages.is_empty()
                    {
                        need_ws = false;
                        srv.set_prefetch(pages.clone());
                        // Stored beside the server (it reads and writes the working set's pages):
                        // the server goes on accepting VMs meanwhile.
                        let (store, ws, image) = (store.clone(), pages.clone(), id.clone());
                        let saving = std::thread::Builder::new().name(format!("ws-save-{id}")).spawn(move || {
                            if let Err(e) = workingset::save(&store, &mem, page_size, &ws) {
                                tracing::warn!(%image, error = %e, "could not store the working set");
                            }
                        });
                        match saving {
                            // (No shutdown check: shutdown joins this server before it takes
                            // the background threads.)
                            Ok(t) => keep_live(&mut background.lock().unwrap_or_else(|p| p.into_inner()), t),
                            Err(e) => {
                                tracing::warn!(image = %id, error = %e, "could not start storing the working set")
                            }
                        }
                    }
                    tracing::info!(image = %id, ?ev, "uffd")
                });
                // However it ended, the next restore of this image gets a new server.
                ended.store(true, Ordering::SeqCst);
                tracing::info!(image = %id, result = ?r.map(|s| format!("{s:?}")), "uffd server ended");
            })
            .map_err(|e| Error::io("spawn uffd server", e))?;
        let stop = handle.stop.clone();
        if !self.keep_serving_thread(Box::new(move || stop.store(true, Ordering::SeqCst)), thread) {
            self.refuse_when_shutting_down()?;
        }
        if let Err(e) = self.stop_when_idle(mem, &handle) {
            handle.stop.store(true, Ordering::SeqCst);
            return Err(e);
        }
        map.insert(mem, handle);
        Ok(sock)
    }

    /// Where each lazily restored VM's journal lives: what a later daemon needs to serve it on.
    fn vm_journals(&self) -> PathBuf {
        self.state.join("vm-journals")
    }

    /// Takes over every VM whose UFFD server died with an earlier process (a daemon restart or
    /// crash): each stalls on its next page fault until served again. Journals of VMs that are
    /// gone are removed; a VM that cannot be taken over is logged and skipped. A VM still served
    /// (by a daemon that is stopping, say) gets a thread that takes it over once that server lets
    /// go of it.
    fn adopt_vms(self: &Arc<Self>) -> Result<Vec<AdoptedVm>> {
        use snapfork_lazy_restore::journal;
        let runtime =
            |e: snapfork_lazy_restore::Error| Error::Runtime { what: "adopt a VM".into(), detail: e.to_string() };
        let mut adopted = Vec::new();
        for path in journal::list(&self.vm_journals()).map_err(runtime)? {
            match self.adopt_vm(&path) {
                Ok(Some(vm)) => adopted.push(vm),
                Ok(None) => {
                    let (me, waited) = (self.clone(), path.clone());
                    let spawned = std::thread::Builder::new()
                        .name("uffd-await".into())
                        .spawn(move || me.adopt_when_free(&waited));
                    if let Err(e) = spawned {
                        tracing::error!(journal = %path.display(), "cannot wait for this VM's server to let go: {e}");
                    }
                }
                // One VM that cannot be taken over must not keep the others stalled.
                Err(e) => end_unservable_vm(&path, &e),
            }
        }
        Ok(adopted)
    }

    /// Waits until the server of the VM of journal `path` lets go of it, then takes it over
    /// (unless it is gone by then, or somebody else was quicker).
    fn adopt_when_free(&self, path: &Path) {
        loop {
            if let Err(e) = snapfork_lazy_restore::journal::wait_free(path) {
                // Removed meanwhile (its VM exited), typically.
                tracing::debug!(journal = %path.display(), "no VM to take over: {e}");
                return;
            }
            // Counted before the check: shutdown either sees this adoption or it sees the flag.
            self.adopting.fetch_add(1, Ordering::SeqCst);
            let adopted = if self.shutting_down.load(Ordering::SeqCst) { Ok(None) } else { self.adopt_vm(path) };
            self.adopting.fetch_sub(1, Ordering::SeqCst);
            if self.shutting_down.load(Ordering::SeqCst) {
                return;
            }
            match adopted {
                Ok(Some(_)) => return,
                Ok(None) => continue,
                Err(e) => return end_unservable_vm(path, &e),
            }
        }
    }

    /// Takes over the VM of journal `path` and serves it on a thread of its own (its pages
    /// through the cache the adopted VMs of its image share). None when a live restore serves it (this process's, or a
    /// server that has not let go yet); a journal whose VM is gone is removed, and also None.
    fn adopt_vm(&self, path: &Path) -> Result<Option<AdoptedVm>> {
        use snapfork_lazy_restore::{RestoreOptions, StoreSource, journal};
        let runtime =
            |e: snapfork_lazy_restore::Error| Error::Runtime { what: "adopt a VM".into(), detail: e.to_string() };
        let orphan = match journal::read(path) {
            Err(snapfork_lazy_restore::Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Ok(None);
            }
            other => other.map_err(runtime)?,
        };
        let (pid, start_time) = (orphan.pid, orphan.start_time);
        if !orphan.is_alive() {
            tracing::info!(pid, "VM of a journal is gone: journal removed");
            orphan.discard();
            return Ok(None);
        }
        let mem =
            orphan.image.as_deref().and_then(|h| h.parse::<Hash>().ok()).ok_or_else(|| {
                Error::corrupt(orphan.path.display().to_string(), "no memory image id in the journal")
            })?;
        // Adopted VMs of one image share one cache (alive while any of them is served).
        let cache = self
            .adopted_caches
            .get_or_open(&mem.to_hex(), UFFD_CACHE_BYTES, || {
                let reader = self.store.open_image(&mem).map_err(snapfork_lazy_restore::Error::Store)?;
                Ok(Arc::new(StoreSource::new(reader)))
            })
            .map_err(runtime)?;
        let handle = match orphan.adopt(cache, RestoreOptions::default()) {
            Ok(h) => h,
            Err(snapfork_lazy_restore::Error::Busy(_)) => return Ok(None),
            Err(e) => return Err(runtime(e)),
        };
        let sandbox = self.sandbox_of_vm(pid, start_time);
        tracing::info!(pid, sandbox = sandbox.as_deref(), image = %mem.short(), "VM adopted: its pages are served again");
        // Joined on a thread of its own; if that cannot start, the restore still serves (its
        // handle is only dropped, which does not stop it).
        let stopper = handle.stopper();
        let name = sandbox.clone();
        let sandboxes = self.state.join("sandboxes");
        let watch = std::thread::Builder::new().name(format!("uffd-adopted-{pid}")).spawn(move || {
            let r = handle.join();
            use snapfork_lazy_restore::EndReason;
            if matches!(r.end, EndReason::CorruptPage { .. } | EndReason::Failed { .. }) {
                tracing::warn!(pid, sandbox = name.as_deref(), end = ?r.end, "adopted VM was ended by its memory server");
                note_vm_end(&sandboxes, pid, &r.end);
            } else {
                tracing::info!(pid, end = ?r.end, "adopted VM's restore ended");
            }
        });
        match watch {
            Ok(t) => {
                if !self.keep_serving_thread(Box::new(move || stopper.stop()), t) {
                    // Stopped at once: the VM is left to the next engine, as the others are.
                    return Ok(None);
                }
            }
            Err(e) => tracing::warn!(pid, "cannot watch the adopted VM's restore: {e}"),
        }
        Ok(Some(AdoptedVm { pid, sandbox, image: mem.to_hex() }))
    }

    /// The sandbox whose Firecracker process is `pid`, started at `start_time`, if any.
    fn sandbox_of_vm(&self, pid: i32, start_time: u64) -> Option<String> {
        let (dir, _) = find_vm_sandbox(&self.state.join("sandboxes"), pid, Some(start_time))?;
        dir.file_name()?.to_str().map(str::to_string)
    }

    /// Stops `server` (and frees its page cache) once no VM has been connected to it, nor been
    /// handed its socket, for [`EngineOptions::uffd_idle`]. Checked under the servers' lock, so
    /// a restore either gets this server before it stops or starts a new one.
    fn stop_when_idle(&self, mem: Hash, server: &UffdServerHandle) -> Result<()> {
        let (servers, server, idle) = (self.uffd.clone(), server.clone(), self.uffd_idle);
        let tick = (idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
        std::thread::Builder::new()
            .name(format!("uffd-idle-{}", mem.short()))
            .spawn(move || {
                loop {
                    std::thread::sleep(tick);
                    let mut map = servers.lock().unwrap_or_else(|p| p.into_inner());
                    let unused = server.active.load(Ordering::SeqCst) == 0
                        && server.last_used.lock().map_or(true, |t| t.elapsed() >= idle);
                    if unused || server.stop.load(Ordering::SeqCst) {
                        server.stop.store(true, Ordering::SeqCst);
                        if map.get(&mem).is_some_and(|h| Arc::ptr_eq(&h.stop, &server.stop)) {
                            map.remove(&mem);
                        }
                        tracing::info!(image = %mem.short(), "uffd server idle: stopped");
                        return;
                    }
                }
            })
            .map(drop)
            .map_err(|e| Error::io("spawn uffd idle watch", e))
    }

    /// Refuses a Firecracker snapshot that came by import unless its source is trusted
    /// ([`EngineOptions::trust_imported_vm_state`]); returns whether it came by import.
    fn check_vm_state_trusted(&self, s: &Snapshot) -> Result<bool> {
        let imported = crate::bundle::is_imported(&self.store, &s.id)?;
        if imported && !self.trust_imported_vm_state {
            return Err(Error::Invalid(format!(
                "snapshot {} came by import: its Firecracker VM state names the host files the VM would open \
                 (its disks), chosen by whoever made the bundle; restore it only from a source you trust \
                 (EngineOptions::trust_imported_vm_state, CLI --trust-imported-vm-state)",
                s.id.short()
            )));
        }
        Ok(imported)
    }

    /// Starts a Firecracker process in `dir` and loads snapshot `s` into it with its memory served
    /// by the UFFD server of the snapshot's memory image; returns the new VM's config.
    fn start_firecracker(
        &self,
        s: &Snapshot,
        cfg: &FirecrackerConfig,
        dir: &Path,
        name: &str,
        resume: bool,
    ) -> Result<FirecrackerConfig> {
        let imported = self.check_vm_state_trusted(s)?;
        std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("mkdir {}", dir.display()), e))?;
        let part = |role: Role| {
            s.part(role)
                .ok_or_else(|| Error::corrupt(format!("snapshot {}", s.id.short()), format!("no {role:?} part")))
        };
        let vmstate = dir.join("vmstate");
        {
            let mut f = std::fs::File::create(&vmstate).map_err(|e| Error::io("create vmstate", e))?;
            self.store.read_blob(&Snapshot::part_id(part(Role::State)?)?, &mut f)?;
        }
        // The VMM runs in a directory of its own, where each writable drive gets its copy and
        // its vsock device its socket.
        let cwd = dir.join("files");
        let (plan, recorded) = self.set_up_devices(s, &cwd)?;
        let patches: Vec<&crate::firecracker::Drive> =
            plan.drives.iter().filter(|d| d.patch).map(|d| &d.drive).collect();
        let vsock_override = plan.vsock_override.as_deref();
        let uffd = self.uffd_server(Snapshot::part_id(part(Role::Memory)?)?)?;
        let api_sock = dir.join("api.sock");
        let _ = std::fs::remove_file(&api_sock);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.console_log(name))
            .map_err(|e| Error::io("open console log", e))?;
        let log2 = log.try_clone().map_err(|e| Error::io("dup console log", e))?;
        let cfg = &FirecrackerConfig { binary: if imported { None } else { cfg.binary.clone() }, ..cfg.clone() };
        let binary = cfg.binary();
        use std::os::unix::process::CommandExt;
        let mut command = std::process::Command::new(&binary);
        command.current_dir(&cwd).arg("--api-sock").arg(&api_sock).stdin(std::process::Stdio::null());
        command.stdout(log).stderr(log2);
        // Its own process group: the caller's Ctrl-C or hangup must not end the VM.
        command.process_group(0);
        let networked = !plan.network.is_empty();
        if networked {
            // Its taps, by the names the vmstate holds, in a network namespace of its own.
            let taps =
                crate::vmnet::Taps::new(&plan.network.iter().map(|n| n.host_dev_name.clone()).collect::<Vec<_>>())?;
            // SAFETY: `enter` only makes system calls (unshare, open, ioctl, socket, close) and
            // allocates nothing, as code between fork and exec must.
            unsafe { command.pre_exec(move || taps.enter()) };
        }
        let mut child = command.spawn().map_err(|e| Error::Runtime {
            what: "firecracker start".into(),
            detail: if networked {
                format!("{}: {e} (or making its network namespace and taps)", binary.display())
            } else {
                format!("{}: {e} (set $FIRECRACKER or the config's binary)", binary.display())
            },
        })?;
        let pid = child.id() as i32;
        // Read before it can be reaped: what tells this VMM from a later process of its pid.
        let start_time = snapfork_lazy_restore::journal::process_start_time(pid);
        // Reap it whenever it exits (it is ours; a zombie would look alive to `ls`).
        std::thread::spawn(move || child.wait());
        let started = FirecrackerConfig {
            api_socket: api_sock,
            binary: cfg.binary.clone(),
            // (From a snapshot that recorded none, its VMM is asked at each checkpoint.)
            devices: recorded.then(|| plan.devices()),
            page_size: cfg.page_size,
            diff: cfg.diff,
            pid: Some(pid),
            pid_start_time: start_time,
        };
        let loaded = match start_time {
            None => Err(Error::Runtime {
                what: "firecracker start".into(),
                detail: format!("{} exited at once (see {})", binary.display(), self.console_log(name).display()),
            }),
            Some(t) => crate::firecracker::wait_for_vmm_api(
                &started.api_socket,
                std::time::Duration::from_secs(10),
                Some((pid, t)),
            )
            .and_then(|_| {
                // Pointed at their copies before the guest runs: loaded paused when any is.
                let api = self.api(&started.api_socket);
                api.load_snapshot_uffd(&vmstate, &uffd, cfg.diff, resume && patches.is_empty(), vsock_override)?;
                for d in &patches {
                    api.patch_drive(&d.drive_id, &d.path_on_host)?;
                }
                if resume && !patches.is_empty() {
                    api.resume()?;
                }
                Ok(())
            }),
        };
        if let Err(e) = loaded {
            started.kill_vmm();
            return Err(e);
        }
        Ok(started)
    }

    /// Makes `cwd` afresh (what a crashed restore left there, a symlink at a drive's name, must
    /// never be written through) and sets up snapshot `s`'s devices in it: a copy of each
    /// writable drive, a link for each relatively named read-only one. Returns the plan and
    /// whether the snapshot recorded its devices.
    fn set_up_devices(&self, s: &Snapshot, cwd: &Path) -> Result<(crate::firecracker::DevicePlan, bool)> {
        if std::fs::symlink_metadata(cwd).is_ok() {
            std::fs::remove_dir_all(cwd).map_err(|e| Error::io(format!("remove {}", cwd.display()), e))?;
        }
        std::fs::create_dir(cwd).map_err(|e| Error::io(format!("mkdir {}", cwd.display()), e))?;
        let mkdir_for = |path: &Path| match path.parent() {
            Some(parent) => {
                std::fs::create_dir_all(parent).map_err(|e| Error::io(format!("mkdir {}", parent.display()), e))
            }
            None => Ok(()),
        };
        // The snapshot's devices, as its vmstate names them (a revert's config is its sandbox's).
        let recorded = match DriverConfig::from_parts(&s.body.driver, &s.body.config)? {
            DriverConfig::Firecracker(taken) => taken.devices,
            _ => None,
        };
        let none = crate::firecracker::Devices::default();
        let plan = crate::firecracker::plan_devices(recorded.as_ref().unwrap_or(&none), cwd)?;
        if let Some(v) = &plan.vsock {
            mkdir_for(&v.host_path)?;
        }
        for d in &plan.drives {
            let Some(dest) = d.place() else { continue };
            mkdir_for(dest)?;
            match &d.make {
                Make::Copy => {
                    let p = s.part_named(Role::Disk, &d.drive.drive_id).ok_or_else(|| {
                        Error::corrupt(
                            format!("snapshot {}", s.id.short()),
                            format!("no disk part {}", d.drive.drive_id),
                        )
                    })?;
                    self.store.open_image(&Snapshot::part_id(p)?)?.materialize(dest, None)?;
                }
                Make::Link { .. } => std::os::unix::fs::symlink(&d.drive.host_path, dest)
                    .map_err(|e| Error::io(format!("symlink {}", dest.display()), e))?,
                Make::Nothing => {}
            }
        }
        if recorded.is_none() {
            // A snapshot taken before devices were recorded: its disks by name, for a vmstate
            // that names them relatively.
            for p in s.body.parts.iter().filter(|p| p.role == Role::Disk) {
                model::check_part_name(&p.name)?;
                self.store.open_image(&Snapshot::part_id(p)?)?.materialize(&cwd.join(&p.name), None)?;
            }
        }
        Ok((plan, recorded.is_some()))
    }

    /// A client of the Firecracker API at `socket`, with [`EngineOptions::vmm_timeout`].
    fn api(&self, socket: &Path) -> ApiClient {
        ApiClient::new(socket).with_timeout(self.vmm_timeout)
    }

    /// True when the VM of `cfg` was restored lazily and no live server serves its memory (the
    /// process that restored it, and took its journal, is gone; nothing took it over yet).
    fn memory_unserved(&self, cfg: &FirecrackerConfig) -> Result<bool> {
        let (Some(pid), Some(start_time)) = (cfg.pid, cfg.pid_start_time) else {
            return Ok(false);
        };
        snapfork_lazy_restore::journal::unserved(&self.vm_journals(), pid, start_time)
            .map_err(|e| Error::Runtime { what: "the VM's journal".into(), detail: e.to_string() })
    }

    /// Kills sandbox `name`'s runtime (its VMM, or its runsc container), whatever it is doing;
    /// its record is left to whoever holds the sandbox.
    fn kill_runtime(&self, name: &str) {
        let Ok(rec) = self.load_record(name) else { return };
        if !self.kill_firecracker(&rec) {
            tracing::warn!(sandbox = name, "its VMM may still run: it did not die in time, or cannot be found");
        }
        if let Some(rid) = &rec.runtime_id
            && let Err(e) = self.runsc.destroy(rid)
        {
            tracing::warn!(sandbox = name, "cannot end its runsc container: {e}");
        }
    }

    /// Kills the Firecracker process of `rec`, if any. False when it may still run: it did
    /// not die in time, or (a VM handed over with `run`) it cannot be told which process it is.
    fn kill_firecracker(&self, rec: &SandboxRecord) -> bool {
        match DriverConfig::from_parts(&rec.driver, &rec.config) {
            Ok(DriverConfig::Firecracker(cfg)) => cfg.kill_vmm(),
            _ => true,
        }
    }

    /// Kills sandbox `name`'s VMM, if it has one, or says that it may still run: a sandbox
    /// recorded as stopped, or removed, must not leave a VM running that nothing knows of.
    fn end_vmm(&self, rec: &SandboxRecord) -> Result<()> {
        if self.kill_firecracker(rec) {
            return Ok(());
        }
        Err(Error::Runtime {
            what: format!("stop the VMM of sandbox {}", rec.name),
            detail: "it neither exited when killed nor can be found by its API socket (it accepts no \
                     connection): it may still run, and the sandbox is left as it was"
                .into(),
        })
    }

    // ---- stop / rm / ls -------------------------------------------------------------------

    /// Updates `rec.status` from what the runtime says.
    fn refresh(&self, rec: &mut SandboxRecord) -> Result<()> {
        if rec.driver == "firecracker" {
            if let Ok(DriverConfig::Firecracker(cfg)) = DriverConfig::from_parts(&rec.driver, &rec.config)
                && matches!(rec.status, Status::Running | Status::Paused)
            {
                let gone = match cfg.pid {
                    // A VM the engine started: its process (not a later one given its pid).
                    Some(_) => cfg.vmm_process().is_none(),
                    // One it was handed (`run`): nobody listens on its API socket any more.
                    None => cfg.api_gone(),
                };
                if gone {
                    rec.status = Status::Exited;
                    self.save_record(rec)?;
                }
            }
            return Ok(());
        }
        if rec.driver != "gvisor" {
            return Ok(());
        }
        let Some(rid) = rec.runtime_id.clone() else {
            return Ok(());
        };
        let status = match self.runsc.state(&rid)? {
            // (Only a paused container's status goes stale: runsc checks a running one.)
            Some(st) if st.status == "paused" && !st.sandbox_alive() => Status::Exited,
            Some(st) if st.status == "running" => Status::Running,
            Some(st) if st.status == "paused" => Status::Paused,
            _ => Status::Exited,
        };
        if status != rec.status {
            rec.status = status;
            self.save_record(rec)?;
        }
        Ok(())
    }

    fn stop(&self, name: &str) -> Result<SandboxInfo> {
        let mut rec = self.load_record(name)?;
        self.end_vmm(&rec)?;
        if let Some(rid) = rec.runtime_id.take() {
            self.runsc.destroy(&rid)?;
        }
        rec.status = Status::Stopped;
        self.save_record(&rec)?;
        Ok(Self::info(&rec, Timings::default()))
    }

    fn remove(&self, name: &str) -> Result<()> {
        let rec = self.load_record(name)?;
        self.end_vmm(&rec)?;
        if let Some(rid) = &rec.runtime_id {
            self.runsc.destroy(rid)?;
        }
        let mut tx = self.store.begin()?;
        tx.delete_ref(&head_ref(name));
        for (r, _) in self.store.list_refs(&snaps_prefix(name))? {
            tx.delete_ref(&r);
        }
        tx.commit()?;
        if rec.owns_workspace
            && let Some(ws) = &rec.workspace
        {
            workspace::forget(&self.store, ws)?;
            remove_dir_if_exists(ws)?;
        }
        remove_dir_if_exists(&self.sandbox_dir(name))?;
        Ok(())
    }

    /// The names of every recorded sandbox, sorted.
    fn sandbox_names(&self) -> Result<Vec<String>> {
        let dir = self.state.join("sandboxes");
        let entries = std::fs::read_dir(&dir).map_err(|e| Error::io(format!("read {}", dir.display()), e))?;
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| check_name(n).is_ok())
            .collect();
        names.sort();
        Ok(names)
    }

    fn ls(&self) -> Result<Vec<SandboxInfo>> {
        let mut out = Vec::new();
        for n in self.sandbox_names()? {
            // Refreshing saves the record: only while no operation holds the sandbox, which
            // would otherwise have its own save overwritten with what was read before it.
            let lock = self.locks.lock().unwrap_or_else(|p| p.into_inner()).entry(n.clone()).or_default().clone();
            let held = lock.try_lock();
            let Ok(mut rec) = self.load_record(&n) else {
                continue;
            };
            if held.is_ok() {
                let _ = self.refresh(&mut rec);
            }
            let mut info = Self::info(&rec, Timings::default());
            if rec.status == Status::Exited {
                info.ended = vm_end(&self.sandbox_dir(&n), &rec);
            }
            out.push(info);
        }
        Ok(out)
    }

    // ---- log / diff -----------------------------------------------------------------------

    fn log(&self, name: Option<&str>) -> Result<Log> {
        let refs: Vec<(String, Hash)> = match name {
            Some(n) => {
                let _ = self.load_record(n)?;
                let mut r = self.store.list_refs(&snaps_prefix(n))?;
                if let Some(h) = self.store.get_ref(&head_ref(n))? {
                    r.push((head_ref(n), h));
                }
                r
            }
            None => {
                let mut r = self.store.list_refs("sandbox/")?;
                r.extend(self.store.list_refs("tag/")?);
                r.extend(self.store.list_refs("snap/")?);
                r.extend(self.store.list_refs("imported/")?);
                r
            }
        };
        let mut named: HashMap<Hash, Vec<String>> = HashMap::new();
        for (r, h) in &refs {
            if !r.starts_with("snap/") && !r.starts_with("imported/") {
                named.entry(*h).or_default().push(r.clone());
            }
        }
        // Also label heads and tags when showing one sandbox's part of the tree.
        if name.is_some() {
            for (r, h) in self.store.list_refs("tag/")?.into_iter().chain(self.store.list_refs("sandbox/")?) {
                let v = named.entry(h).or_default();
                if !v.contains(&r) {
                    v.push(r);
                }
            }
        }
        let mut seen: HashMap<Hash, Snapshot> = HashMap::new();
        for (_, h) in &refs {
            let mut cur = Some(*h);
            while let Some(id) = cur {
                if seen.contains_key(&id) {
                    break;
                }
                let s = self.load_snapshot(id)?;
                cur = s.parent();
                seen.insert(id, s);
            }
        }
        let mut snaps: Vec<&Snapshot> = seen.values().collect();
        snaps.sort_by_key(|s| (s.body.created_ms, s.id.to_hex()));
        let entries: Vec<LogEntry> = snaps
            .iter()
            .map(|s| {
                let mut r = named.get(&s.id).cloned().unwrap_or_default();
                r.sort();
                LogEntry {
                    id: s.id.to_hex(),
                    parent: s.body.parent.clone(),
                    sandbox: s.body.sandbox.clone(),
                    message: s.body.message.clone(),
                    labels: s.body.labels.clone(),
                    created_ms: s.body.created_ms,
                    driver: s.body.driver.clone(),
                    refs: r,
                    size: s.body.parts.iter().map(|p| p.size).sum(),
                }
            })
            .collect();
        let tree = render_tree(&entries);
        Ok(Log { snapshots: entries, tree })
    }

    fn diff(&self, a: &str, b: &str) -> Result<SnapshotDiff> {
        let sa = self.load_snapshot(self.resolve(a)?)?;
        let sb = self.load_snapshot(self.resolve(b)?)?;
        let mut parts = Vec::new();
        let mut files = Vec::new();
        for pb in &sb.body.parts {
            let pa = sa.body.parts.iter().find(|p| p.role == pb.role && p.name == pb.name);
            let unit = match pb.kind {
                PartKind::Image => "pages",
                PartKind::Blob => "chunks",
                PartKind::Workspace => "files",
            };
            let Some(pa) = pa else {
                parts.push(PartDiff {
                    role: pb.role,
                    name: pb.name.clone(),
                    change: "added".into(),
                    units_changed: 0,
                    units_total: 0,
                    unit: unit.into(),
                });
                continue;
            };
            let (ida, idb) = (Snapshot::part_id(pa)?, Snapshot::part_id(pb)?);
            let (changed, total) = match pb.kind {
                PartKind::Image => {
                    let ra = self.store.open_image(&ida)?;
                    let rb = self.store.open_image(&idb)?;
                    let n = ra.page_count().max(rb.page_count());
                    let mut changed = 0;
                    for i in 0..n {
                        let x = if i < ra.page_count() { ra.page_id(i)? } else { Hash::ZERO };
                        let y = if i < rb.page_count() { rb.page_id(i)? } else { Hash::ZERO };
                        if x != y {
                            changed += 1;
                        }
                    }
                    (changed, n)
                }
                PartKind::Blob => {
                    let la: std::collections::HashSet<Hash> = self.store.get_node(&ida)?.links.into_iter().collect();
                    let lb = self.store.get_node(&idb)?.links;
                    let changed = lb.iter().filter(|h| !la.contains(h)).count() as u64;
                    (changed, lb.len() as u64)
                }
                PartKind::Workspace => {
                    let changes = workspace::diff(&self.store, pa, pb)?;
                    let n = changes.len() as u64;
                    files = changes;
                    (n, n)
                }
            };
            parts.push(PartDiff {
                role: pb.role,
                name: pb.name.clone(),
                change: if ida == idb { "same".into() } else { "changed".into() },
                units_changed: changed,
                units_total: total,
                unit: unit.into(),
            });
        }
        for pa in &sa.body.parts {
            if !sb.body.parts.iter().any(|p| p.role == pa.role && p.name == pa.name) {
                parts.push(PartDiff {
                    role: pa.role,
                    name: pa.name.clone(),
                    change: "removed".into(),
                    units_changed: 0,
                    units_total: 0,
                    unit: String::new(),
                });
            }
        }
        Ok(SnapshotDiff { from: sa.id.to_hex(), to: sb.id.to_hex(), parts, files })
    }
}

/// Draws the snapshot tree, children under parents, oldest first.
fn render_tree(entries: &[LogEntry]) -> String {
    let ids: std::collections::HashSet<&str> = entries.iter().map(|e| e.id.as_str()).collect();
    let mut children: HashMap<Option<&str>, Vec<&LogEntry>> = HashMap::new();
    for e in entries {
        let parent = e.parent.as_deref().filter(|p| ids.contains(p));
        children.entry(parent).or_default().push(e);
    }
    let mut out = String::new();
    fn walk(out: &mut String, children: &HashMap<Option<&str>, Vec<&LogEntry>>, parent: Option<&str>, prefix: &str) {
        let Some(kids) = children.get(&parent) else {
            return;
        };
        for (i, e) in kids.iter().enumerate() {
            let last = i + 1 == kids.len();
            let branch = if parent.is_none() {
                ""
            } else if last {
                "└─ "
            } else {
                "├─ "
            };
            let refs = if e.refs.is_empty() { String::new() } else { format!(" ({})", e.refs.join(", ")) };
            let msg = if e.message.is_empty() { String::new() } else { format!(" \"{}\"", e.message) };
            out.push_str(&format!("{prefix}{branch}{} [{}]{msg}{refs}\n", &e.id[..12], e.sandbox));
            let next = if parent.is_none() {
                prefix.to_string()
            } else if last {
                format!("{prefix}   ")
            } else {
                format!("{prefix}│  ")
            };
            walk(out, children, Some(e.id.as_str()), &next);
        }
    }
    walk(&mut out, &children, None, "");
    out
}

/// Upper bounds of the local cache of runsc images (beyond them, least recently used go).
const IMAGE_CACHE_BYTES: u64 = 4 << 30;
/// Decompressed pages each memory image's UFFD server keeps for its restores and forks.
const UFFD_CACHE_BYTES: usize = 256 << 20;
/// The file beside a cached runsc image that holds its [`file_checksum`] (hex).
const CHECKSUM_FILE: &str = "xxh3-128";
const IMAGE_CACHE_ENTRIES: usize = 32;

/// A state image ready for `runsc restore`: a cache entry or a temporary directory.
#[derive(Clone, Debug)]
struct Prepared {
    dir: PathBuf,
    temporary: bool,
}

impl Prepared {
    fn release(&self) {
        if self.temporary {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Size of the segments a runsc image is stored in (one blob each, chunked in parallel).
const SEGMENT: u64 = 16 << 20;

/// How much newly written image [`write_back_while_written`] collects before handing it to
/// the disk.
const WRITEBACK_STEP: u64 = 4 << 20;
/// Refuses a checkpoint of sandbox `name` whose image (at most `usage` bytes, the sandbox's
/// memory, plus 4 MiB of runtime state) cannot fit on the filesystem of `dir` beside the
/// `reserve` the store keeps free. Unknown usage passes.
fn check_room_for_image(dir: &Path, usage: Option<u64>, reserve: u64, name: &str) -> Result<()> {
    let Some(usage) = usage else { return Ok(()) };
    let free = snapfork_store::free_bytes(dir)?;
    let need = usage + (4 << 20) + reserve;
    if free < need {
        return Err(Error::Runtime {
            what: "checkpoint".into(),
            detail: format!(
                "not enough space on {} for the image of {name}: it may take {} MB (the sandbox's memory, and the store's reserve), {} MB are free; nothing was changed",
                dir.display(),
                need >> 20,
                free >> 20
            ),
        });
    }
    Ok(())
}

/// Starts writeback of `image`'s pages as runsc writes them, until `done` is set: the file
/// becomes the store's pack, and the commit's fdatasync then finds little left to write. Costs a
/// stat and, every [`WRITEBACK_STEP`], one syscall; an error only loses the head start.
fn write_back_while_written(image: &Path, done: &AtomicBool) {
    use std::os::fd::AsRawFd;
    let mut file: Option<std::fs::File> = None;
    let mut from = 0u64;
    loop {
        // Read the flag before the size: once set, the size seen next is the final one.
        let finished = done.load(Ordering::SeqCst);
        if file.is_none() {
            file = std::fs::File::open(image).ok();
        }
        if let Some(f) = &file {
            let size = f.metadata().map_or(from, |m| m.len());
            if size >= from + WRITEBACK_STEP || (finished && size > from) {
                // SAFETY: `f` is open for the whole call, which only starts writeback of a range
                // of that file and touches no memory of ours.
                let rc = unsafe {
                    libc::sync_file_range(f.as_raw_fd(), from as i64, (size - from) as i64, libc::SYNC_FILE_RANGE_WRITE)
                };
                if rc != 0 {
                    tracing::debug!("sync_file_range on {}: {}", image.display(), std::io::Error::last_os_error());
                    return;
                }
                from = size;
            }
        }
        if finished {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// The key of a snapshot's runsc image (its segments' ids, in order) in the image cache.
fn state_key(parts: &[model::Part]) -> Hash {
    let mut h = blake3::Hasher::new();
    for p in parts.iter().filter(|p| p.role == Role::State && p.kind == PartKind::Blob) {
        h.update(p.id.as_bytes());
    }
    Hash(*h.finalize().as_bytes())
}

/// A runsc image file's checksum (xxh3-128), held beside it in the image cache and checked
/// before each use. It guards a local file of ours against change and damage, not against a
/// forger (the store's blake3 ids do that for the stored copy), so it is the cheapest strong
/// checksum: four times faster than blake3 here, and it sits on the path of every checkpoint
/// and every cached restore.
fn file_checksum(p: &Path) -> Result<u128> {
    let f = std::fs::File::open(p).map_err(|e| Error::io(format!("open {}", p.display()), e))?;
    if f.metadata().map_err(|e| Error::io(format!("stat {}", p.display()), e))?.len() == 0 {
        return Ok(xxhash_rust::xxh3::xxh3_128(&[]));
    }
    // SAFETY: a file in the engine's own directories, which nothing truncates while it is read.
    let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(format!("map {}", p.display()), e))?;
    Ok(xxhash_rust::xxh3::xxh3_128(&map))
}

fn file_size(p: &Path) -> Result<u64> {
    std::fs::metadata(p).map(|m| m.len()).map_err(|e| Error::io(format!("stat {}", p.display()), e))
}

fn rename(a: &Path, b: &Path) -> Result<()> {
    std::fs::rename(a, b).map_err(|e| Error::io(format!("rename {} -> {}", a.display(), b.display()), e))
}

/// Writes into `file` from `offset` on (positioned writes: several can fill one file at once).
struct OffsetWriter<'a> {
    file: &'a std::fs::File,
    offset: u64,
}

impl std::io::Write for OffsetWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = std::os::unix::fs::FileExt::write_at(self.file, buf, self.offset)?;
        self.offset += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn remove_dir_if_exists(p: &Path) -> Result<()> {
    match std::fs::remove_dir_all(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("remove {}", p.display()), e)),
    }
}

/// Writes `bytes` to `path` and fsyncs it.
pub(crate) fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(|e| Error::io(format!("create {}", path.display()), e))?;
    f.write_all(bytes).map_err(|e| Error::io(format!("write {}", path.display()), e))?;
    f.sync_all().map_err(|e| Error::io(format!("fsync {}", path.display()), e))
}

/// fsyncs a directory: what was created, renamed or removed in it survives a crash.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("fsync directory {}", dir.display()), e))
}

/// A fresh, uniquely named directory under `parent`.
/// The file in a sandbox's directory that holds its record.
const RECORD_FILE: &str = "sandbox.json";

/// The file in a sandbox's directory that says why snapfork ended its VM.
const VM_END_FILE: &str = "vm-ended.json";

/// Writes down, for `ls`, why the memory server ended VM `pid` (in the sandbox, under
/// `sandboxes`, whose Firecracker process it was) when that was not the VM's own doing: a
/// corrupt page, a failure to serve. Keyed by the VM's pid and start time, so that it never
/// describes a later incarnation of the sandbox.
fn note_vm_end(sandboxes: &Path, pid: i32, end: &snapfork_lazy_restore::EndReason) {
    use snapfork_lazy_restore::EndReason;
    let reason = match end {
        EndReason::CorruptPage { page, message, .. } => {
            format!("killed: page {page} of its memory is corrupt in the store ({message})")
        }
        EndReason::Failed { message } => format!("killed: its memory could no longer be served ({message})"),
        EndReason::PeerExited | EndReason::Stopped => return,
    };
    // Its start time is gone with it: the record's is the one the note is keyed by.
    let Some((dir, cfg)) = find_vm_sandbox(sandboxes, pid, None) else { return };
    let note = serde_json::json!({"pid": pid, "start_time": cfg.pid_start_time, "reason": reason});
    if let Err(e) = std::fs::write(dir.join(VM_END_FILE), note.to_string()) {
        tracing::warn!(pid, "cannot write down why the VM was ended: {e}");
    }
}

/// Reads the sandbox record at `path`.
fn read_record(path: &Path) -> Result<SandboxRecord> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(format!("read {}", path.display()), e))?;
    serde_json::from_slice(&bytes).map_err(|e| Error::corrupt(path.display().to_string(), e.to_string()))
}

/// The sandbox under `sandboxes` whose Firecracker process is `pid` (started at `start_time`,
/// when given and recorded): its directory and VM configuration.
fn find_vm_sandbox(sandboxes: &Path, pid: i32, start_time: Option<u64>) -> Option<(PathBuf, FirecrackerConfig)> {
    std::fs::read_dir(sandboxes).ok()?.flatten().map(|e| e.path()).find_map(|dir| {
        let rec = read_record(&dir.join(RECORD_FILE)).ok()?;
        let DriverConfig::Firecracker(cfg) = DriverConfig::from_parts(&rec.driver, &rec.config).ok()? else {
            return None;
        };
        let same_start = match (start_time, cfg.pid_start_time) {
            (Some(want), Some(t)) => want == t,
            _ => true,
        };
        (cfg.pid == Some(pid) && same_start).then_some((dir, cfg))
    })
}

/// Why snapfork ended the VM of `rec` (in `dir`), if it did ([`note_vm_end`]).
fn vm_end(dir: &Path, rec: &SandboxRecord) -> Option<String> {
    let Ok(DriverConfig::Firecracker(cfg)) = DriverConfig::from_parts(&rec.driver, &rec.config) else { return None };
    let note: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join(VM_END_FILE)).ok()?).ok()?;
    let same_vm = note["pid"].as_i64() == cfg.pid.map(i64::from) && note["start_time"].as_u64() == cfg.pid_start_time;
    same_vm.then(|| note["reason"].as_str().map(str::to_string)).flatten()
}

/// Removes `dir` on a thread of its own, for files a process that may be stalled could still be
/// writing: their unlink waits for the write to end.
fn remove_dir_in_background(dir: PathBuf) {
    let spawned = std::thread::Builder::new().name("remove-tmp".into()).spawn(move || {
        if let Err(e) = std::fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %dir.display(), "cannot remove: {e}");
        }
    });
    if let Err(e) = spawned {
        tracing::warn!("cannot start removing a temporary directory: {e}; it stays");
    }
}

pub(crate) fn tempdir(parent: &Path, what: &str) -> Result<PathBuf> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let p = parent.join(format!(
        "{what}-{}-{}-{}",
        std::process::id(),
        model::now_ms(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&p).map_err(|e| Error::io(format!("mkdir {}", p.display()), e))?;
    Ok(p)
}

/// Checkpoints a sandbox's workspace, if it has one, as the snapshot's workspace part; the
/// checkpoint's id goes to `created` (released again if the snapshot fails).
fn add_workspace_part(
    store: &Store,
    workspace: Option<&Path>,
    message: &str,
    created: &mut Vec<Hash>,
    parts: &mut Vec<model::Part>,
) -> Result<()> {
    add_workspace_part_then(store, workspace, message, created, parts, &mut || {})
}

/// [`add_workspace_part`], calling `captured` once the workspace may change again (at once
/// when there is none).
fn add_workspace_part_then(
    store: &Store,
    workspace: Option<&Path>,
    message: &str,
    created: &mut Vec<Hash>,
    parts: &mut Vec<model::Part>,
    captured: &mut dyn FnMut(),
) -> Result<()> {
    if let Some(ws) = workspace {
        let w = workspace::checkpoint(store, ws, message, captured)?;
        created.push(w.id);
        parts.push(model::Part {
            role: Role::Workspace,
            name: "workspace".into(),
            kind: PartKind::Workspace,
            id: w.id.to_hex(),
            size: w.bytes,
        });
    } else {
        captured();
    }
    Ok(())
}

/// A VM whose journal says its memory needs serving, but that cannot be taken over (`e`): nothing
/// will answer its next page fault, so it is killed (as lazy-restore kills a VM it can no longer
/// serve) rather than left to hang while its sandbox reads as running. Its process is known by
/// pid and start time, so a recycled pid is never signalled; its journal goes with it.
fn end_unservable_vm(path: &Path, e: &Error) {
    use snapfork_lazy_restore::restore::{pidfd_kill, pidfd_open, pidfd_wait};
    let Ok(orphan) = snapfork_lazy_restore::journal::read(path) else {
        tracing::error!(journal = %path.display(), error = %e, "cannot take this VM over, nor read which process it is: it stalls on its next page fault");
        return;
    };
    let pid = orphan.pid;
    let killed = pidfd_open(pid).ok().filter(|_| orphan.is_alive()).map(|fd| {
        let sent = pidfd_kill(std::os::fd::AsFd::as_fd(&fd));
        sent.is_ok() && pidfd_wait(std::os::fd::AsFd::as_fd(&fd), Duration::from_secs(5))
    });
    match killed {
        Some(true) => {
            tracing::error!(pid, journal = %path.display(), error = %e, "cannot take this VM over: killed it, since nothing would serve its memory");
            orphan.discard();
        }
        Some(false) => {
            tracing::error!(pid, error = %e, "cannot take this VM over, and could not kill it: it stalls on its next page fault")
        }
        None => orphan.discard(),
    }
}
