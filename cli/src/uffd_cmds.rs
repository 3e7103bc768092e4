//! Lazy restore commands: `serve-uffd` (Firecracker's UFFD memory backend) and
//! `bench restore` (restore latency against Firecracker's File backend, on the user's snapshot).

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};
use snapfork_lazy_restore::client::{FakeVm, RegionSpec, Shape};
use snapfork_lazy_restore::{
    CachedSource, CorruptPolicy, PageSource, RestoreOptions, ServerEvent, ServerOptions, StoreSource, UffdServer,
    journal, workingset,
};
use snapfork_store::{OpenOptions, Store};

use crate::Global;
use crate::output::Report;

/// Lazy-restore commands.
#[derive(Subcommand, Debug)]
pub enum UffdCmd {
    /// Serve a stored memory image to Firecracker VMs: point `"mem_backend": {"backend_type":
    /// "Uffd", "backend_path": SOCKET}` here. One connection per VM, many VMs at once.
    ServeUffd(ServeArgs),
    /// Benchmarks on your own snapshots.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// The recorded working set of a memory image (what `serve-uffd` prefetches).
    #[command(subcommand, name = "working-set")]
    WorkingSet(WsCmd),
    /// Internal: the guest process of `bench restore`.
    #[command(name = "__bench-guest", hide = true)]
    BenchGuest(GuestArgs),
}

/// `serve-uffd` options.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The image: a ref or a hex id.
    reference: String,
    /// The socket Firecracker connects to.
    #[arg(long)]
    socket: PathBuf,
    /// Do not prefetch the stored working set.
    #[arg(long)]
    no_prefetch: bool,
    /// After the working set, install every other page in the background.
    #[arg(long)]
    fill: bool,
    /// Do not store the first restore's working set when the snapshot has none.
    #[arg(long)]
    no_record: bool,
    /// Seconds after its start that a VM's page faults count as its working set: recorded
    /// then, or when the VM ends if sooner.
    #[arg(long, default_value_t = snapfork_lazy_restore::WORKING_SET_WINDOW.as_secs_f64())]
    working_set_window: f64,
    /// Install this many KiB per demand fault (the faulting page and the next pages not yet
    /// present).
    #[arg(long, default_value_t = 4)]
    fault_around_kib: usize,
    /// Largest sequential read-ahead window, KiB (faults that follow one another through memory
    /// install 2, 4, 8... pages at once); 0 disables.
    #[arg(long, default_value_t = 256)]
    readahead_kib: usize,
    /// Cache of decompressed pages shared by the restores, in MiB.
    #[arg(long, default_value_t = 1024)]
    cache_mib: usize,
    /// Seconds to wait for a connected VM's handshake.
    #[arg(long, default_value_t = 5.0)]
    handshake_timeout: f64,
    /// Exit when no VM has been served for this many seconds.
    #[arg(long)]
    idle_timeout: Option<f64>,
    /// Exit after this many restores have ended.
    #[arg(long)]
    max_restores: Option<usize>,
    /// On a corrupt page: `kill` the VM (default) or `poison` the page (SIGBUS on access).
    #[arg(long, default_value = "kill")]
    on_corrupt: String,
    /// Keep a journal per VM in DIR, and on start take over the VMs of this image whose server
    /// (an earlier `serve-uffd --journal DIR`) stopped or died: restart the server without
    /// stopping the VMs.
    #[arg(long, value_name = "DIR")]
    journal: Option<PathBuf>,
}

/// Benchmarks.
#[derive(Subcommand, Debug)]
pub enum BenchCmd {
    /// Restore latency of a stored image: Firecracker's File backend (cold and warm page cache),
    /// eager restore, lazy restore and lazy restore with the working set prefetched, side by side.
    Restore(BenchArgs),
}

/// Working-set commands.
#[derive(Subcommand, Debug)]
pub enum WsCmd {
    /// Show the stored working set of an image.
    Show {
        /// The image: a ref or a hex id.
        reference: String,
        /// Also list the pages.
        #[arg(long)]
        pages: bool,
    },
    /// Store a working set for an image from a page list (whitespace/comma separated, `a-b`).
    Set {
        /// The image: a ref or a hex id.
        reference: String,
        /// The page list.
        #[arg(long)]
        pattern: PathBuf,
    },
    /// Delete the stored working set of an image.
    Rm {
        /// The image: a ref or a hex id.
        reference: String,
    },
}

/// `bench restore` options.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// The image: a ref or a hex id.
    reference: String,
    /// The working set: this fraction of the pages, as random runs of 1-16 pages.
    #[arg(long, conflicts_with = "pattern", default_value_t = 0.1)]
    working_set: f64,
    /// The working set: page numbers from FILE (whitespace/comma separated, `a-b` ranges).
    #[arg(long)]
    pattern: Option<PathBuf>,
    /// Also run N restores of each kind at once.
    #[arg(long, default_value_t = 1)]
    forks: usize,
    /// Write a chart of the results to this .svg file.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Demand-fault size for the lazy modes, KiB.
    #[arg(long, default_value_t = 4)]
    fault_around_kib: usize,
    /// Drop the store's pack files from the page cache before each store-backed run too.
    #[arg(long)]
    cold_store: bool,
    /// Run only these groups of rows (for profiling one of them): file, eager, lazy (lazy,
    /// lazy+prefetch, lazy+pf warm), full (full sequential fault-in).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Seed of the random working set.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where to put the materialised raw image (default: a temporary directory).
    #[arg(long)]
    workdir: Option<PathBuf>,
}

/// The hidden guest process.
#[derive(Args, Debug)]
pub struct GuestArgs {
    /// file | eager | uffd | copy (the memcpy floor)
    #[arg(long)]
    mode: String,
    /// Image size in bytes.
    #[arg(long)]
    size: u64,
    /// The raw image (file mode).
    #[arg(long)]
    image: Option<PathBuf>,
    /// The server socket (uffd mode).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// The image ref (eager mode).
    #[arg(long)]
    reference: Option<String>,
    /// The page list to touch (working-set encoding).
    #[arg(long)]
    pattern: PathBuf,
    /// Touch the first half of the pattern, print `{"held": true}`, wait for a line on stdin,
    /// then touch the rest (for tests that replace the server in between).
    #[arg(long)]
    hold: bool,
}

/// Runs one lazy-restore command.
pub fn run(cmd: UffdCmd, global: &Global) -> anyhow::Result<Report> {
    match cmd {
        UffdCmd::ServeUffd(a) => serve(a, global),
        UffdCmd::Bench(BenchCmd::Restore(a)) => bench(a, global),
        UffdCmd::WorkingSet(c) => working_set(c, global),
        UffdCmd::BenchGuest(a) => guest(a, global),
    }
}

fn open_ro(global: &Global) -> anyhow::Result<Store> {
    Store::open(
        &global.store,
        OpenOptions { read_only: true, create: false, lock_timeout: global.lock_timeout(), ..Default::default() },
    )
    .with_context(|| format!("open store {}", global.store.display()))
}

/// What `bench restore` names the working-set pages it stores for its own working set
/// (`attached/<image>/bench-working-set-pages`), deleted when it ends.
const BENCH_PAGES: &str = "bench-working-set-pages";

static SIGNALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    SIGNALLED.store(true, Ordering::Relaxed);
}

fn serve(a: ServeArgs, global: &Global) -> anyhow::Result<Report> {
    let store = open_ro(global)?;
    let src = StoreSource::open(&store, &a.reference)?;
    let id = src.id();
    let page_size = src.page_size();
    let stored_ws = workingset::load(&store, &id)?;
    let on_corrupt = match a.on_corrupt.as_str() {
        "kill" => CorruptPolicy::KillPeer,
        "poison" => CorruptPolicy::Poison,
        other => bail!("--on-corrupt must be kill or poison, not {other:?}"),
    };
    let cache = Arc::new(CachedSource::new(Arc::new(src), a.cache_mib.saturating_mul(1 << 20)));
    let source: Arc<dyn PageSource> = cache.clone();
    let prefetch = if a.no_prefetch { Vec::new() } else { stored_ws.clone().unwrap_or_default() };
    // The stored working-set pages stream into the shared cache from now on, ahead of the
    // prefetch readers of whichever VM connects first.
    let preload = if prefetch.is_empty() {
        None
    } else {
        Some(workingset::spawn_preload(store.clone(), id, workingset::pages_ref_name(&id), cache)?)
    };
    let opts = ServerOptions {
        handshake_timeout: crate::seconds(a.handshake_timeout.max(0.001)),
        idle_timeout: a.idle_timeout.map(crate::seconds),
        max_restores: a.max_restores,
        restore: RestoreOptions {
            fault_around: a.fault_around_kib.max(4) << 10,
            readahead: a.readahead_kib << 10,
            prefetch: prefetch.clone(),
            fill: a.fill,
            on_corrupt,
            ..Default::default()
        },
        journal_dir: a.journal.clone(),
        working_set_window: crate::seconds(a.working_set_window),
    };
    let window = opts.working_set_window;
    // An adopted VM has most of its pages already: no prefetch, no fill.
    let adopt_opts = RestoreOptions { prefetch: Vec::new(), fill: false, ..opts.restore.clone() };
    let server = UffdServer::bind(&a.socket, source.clone(), opts)?;
    // The VMs of this image that an earlier server left behind are served again first.
    let adopted = match &a.journal {
        Some(dir) => adopt_orphans(dir, &id, &source, &adopt_opts)?,
        None => Vec::new(),
    };
    // SIGINT/SIGTERM end the server cleanly (restores stopped, summary printed).
    // SAFETY: installing an async-signal-safe handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let stop = server.stopper();
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (stop, done) = (stop.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                if SIGNALLED.load(Ordering::Relaxed) {
                    stop.store(true, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    eprintln!(
        "serving image {} ({} bytes) on {}{}",
        id.short(),
        store.open_image(&id)?.size(),
        a.socket.display(),
        if prefetch.is_empty() {
            String::new()
        } else {
            format!(", prefetching a working set of {} pages", prefetch.len())
        }
    );
    let mut restores = Vec::new();
    let mut need_ws = stored_ws.is_none() && !a.no_record;
    // The working set is stored on a thread of its own: that reads its pages out of the store
    // and writes them again (seconds for a large guest), and waits for the writer lock, while
    // this loop must keep accepting VMs.
    let (summary, saved) = std::thread::scope(|scope| {
        let mut saving = None;
        let summary = server.run(|srv, ev| {
            let recorded = match ev {
                ServerEvent::Started { pid, regions, fds } => {
                    eprintln!("vm pid {pid}: {} regions, {fds} fds", regions.len());
                    None
                }
                ServerEvent::Refused { pid, error } => {
                    eprintln!("refused pid {pid:?}: {error}");
                    None
                }
                ServerEvent::WorkingSet { pid, pages } => {
                    eprintln!("vm pid {pid:?}: faulted on {} pages in its first {:?}", pages.len(), window);
                    Some(pages)
                }
                ServerEvent::Ended(r) => {
                    eprintln!(
                        "vm pid {:?}: ended ({:?}); {} faults, {} pages copied, {} zero",
                        r.pid, r.end, r.stats.faults, r.stats.pages_copied, r.stats.pages_zeroed
                    );
                    restores.push(json!({
                        "pid": r.pid, "end": r.end, "stats": r.stats,
                        "working_set_pages": r.working_set.len(), "touched_pages": r.touched.len(),
                    }));
                    Some(r.working_set)
                }
            };
            // The first VM's working set: when its window closed, or at its end if sooner.
            if let Some(ws) = recorded
                && need_ws
                && !ws.is_empty()
            {
                need_ws = false;
                // The server's cache holds these pages now: later VMs prefetch from it.
                if !a.no_prefetch {
                    srv.set_prefetch(ws.clone());
                }
                saving = Some(scope.spawn(move || match save_ws(global, &id, page_size as u32, &ws) {
                    Ok(blob) => {
                        eprintln!("stored a working set of {} pages", ws.len());
                        Some(blob)
                    }
                    Err(e) => {
                        eprintln!("could not store the working set: {e:#}");
                        None
                    }
                }));
            }
        });
        (summary, saving.and_then(|h| h.join().ok().flatten()))
    });
    let summary = summary?;
    done.store(true, Ordering::Relaxed);
    let _ = watcher.join();
    // Stopped with the server: their journals stay, for the next server to take them over.
    for h in &adopted {
        h.stop();
    }
    let adopted: Vec<Value> = adopted
        .into_iter()
        .map(|h| {
            let r = h.join();
            json!({"pid": r.pid, "end": r.end, "stats": r.stats})
        })
        .collect();
    let preloaded = preload.and_then(|h| h.join().ok().flatten());
    let text =
        format!("served {} restores ({} refused), stopped: {}", summary.started, summary.refused, summary.reason);
    let mut j = json!({
        "image": id.to_hex(), "socket": a.socket, "started": summary.started,
        "refused": summary.refused, "ended": summary.ended, "reason": summary.reason,
        "restores": restores, "preloaded": preloaded, "adopted": adopted,
    });
    if let Some(blob) = saved {
        j["id"] = json!(blob);
        j["working_set_ref"] = json!(workingset::ref_name(&id));
    }
    Ok(Report::new(j, text))
}

/// Takes over the VMs of image `id` whose journals in `dir` no live server holds; removes the
/// journals of VMs that are gone. VMs of other images are left to their own servers.
fn adopt_orphans(
    dir: &Path,
    id: &snapfork_store::Hash,
    source: &Arc<dyn PageSource>,
    opts: &RestoreOptions,
) -> anyhow::Result<Vec<snapfork_lazy_restore::RestoreHandle>> {
    let mut adopted = Vec::new();
    for path in journal::list(dir)? {
        let orphan = match journal::read(&path) {
            Ok(o) => o,
            Err(e) => {
                eprintln!("cannot take over the VM of {}: {e}", path.display());
                continue;
            }
        };
        if orphan.image.as_deref() != Some(id.to_hex().as_str()) {
            continue;
        }
        if !orphan.is_alive() {
            orphan.discard();
            continue;
        }
        let pid = orphan.pid;
        match orphan.adopt(source.clone(), opts.clone()) {
            Ok(h) => {
                eprintln!("vm pid {pid}: taken over from its journal");
                adopted.push(h);
            }
            Err(snapfork_lazy_restore::Error::Busy(_)) => eprintln!("vm pid {pid}: another server serves it"),
            Err(e) => eprintln!("vm pid {pid}: cannot take it over: {e}"),
        }
    }
    Ok(adopted)
}

fn open_rw(global: &Global) -> anyhow::Result<Store> {
    Store::open(&global.store, OpenOptions { create: false, lock_timeout: global.lock_timeout(), ..Default::default() })
        .with_context(|| format!("open store {}", global.store.display()))
}

fn working_set(cmd: WsCmd, global: &Global) -> anyhow::Result<Report> {
    match cmd {
        WsCmd::Show { reference, pages } => {
            let store = open_ro(global)?;
            let image = store.open_image_ref(&reference)?;
            let id = image.id();
            let blob = store.get_ref(&workingset::ref_name(&id))?;
            let ws = workingset::load(&store, &id)?;
            let n = ws.as_ref().map_or(0, |w| w.len());
            let total = image.page_count().max(1) as f64;
            let mut j = json!({
                "image": id.to_hex(), "ref": workingset::ref_name(&id),
                "id": blob.map(|b| b.to_hex()), "pages": n, "fraction": n as f64 / total,
            });
            // Its pages, stored again back to back for restores to preload.
            let pages_ref = workingset::pages_ref_name(&id);
            let pages_blob = match store.get_ref(&pages_ref)? {
                Some(b) => Some((b, store.blob_size(&b)?)),
                None => None,
            };
            j["pages_ref"] = json!(pages_ref);
            j["pages_blob"] = json!(pages_blob.map(|(b, _)| b.to_hex()));
            j["pages_blob_bytes"] = json!(pages_blob.map(|(_, n)| n));
            if pages {
                j["list"] = json!(ws.clone().unwrap_or_default());
            }
            let text = match &ws {
                None => format!("image {} has no working set", id.short()),
                Some(w) => {
                    let mut t = format!(
                        "image {}: working set of {} pages ({:.1}%)",
                        id.short(),
                        w.len(),
                        100.0 * w.len() as f64 / total
                    );
                    t += &match pages_blob {
                        Some((_, n)) => {
                            format!("; its pages stored again for preloading: {:.1} MiB", n as f64 / 1048576.0)
                        }
                        None => "; its pages are not stored for preloading".to_string(),
                    };
                    if pages {
                        t += "\n";
                        t += &w.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(" ");
                    }
                    t
                }
            };
            Ok(Report::new(j, text))
        }
        WsCmd::Set { reference, pattern } => {
            let store = open_rw(global)?;
            let image = store.open_image_ref(&reference)?;
            let text = std::fs::read_to_string(&pattern).with_context(|| format!("read {}", pattern.display()))?;
            let pages = workingset::parse_pattern(&text, image.page_count())?;
            let blob = workingset::save(&store, &image.id(), image.page_size(), &pages)?;
            Ok(Report::new(
                json!({"id": blob.to_hex(), "image": image.id().to_hex(), "pages": pages.len()}),
                format!("stored a working set of {} pages for {}", pages.len(), image.id().short()),
            ))
        }
        WsCmd::Rm { reference } => {
            let store = open_rw(global)?;
            let id = store.resolve(&reference)?;
            workingset::delete(&store, &id)?;
            Ok(Report::new(
                json!({"image": id.to_hex(), "deleted": true}),
                format!("deleted the working set of {}", id.short()),
            ))
        }
    }
}

fn save_ws(global: &Global, id: &snapfork_store::Hash, ps: u32, ws: &[u64]) -> anyhow::Result<String> {
    // The serving store is read-only (the engine may hold the writer lock); take it briefly.
    let store = open_rw(global)?;
    Ok(workingset::save(&store, id, ps, ws)?.to_hex())
}

// ---------------------------------------------------------------------------------------------
// bench restore

/// Drops `path` from the page cache: fsync first (dirty pages cannot be dropped), then
/// POSIX_FADV_DONTNEED over the whole file.
fn drop_cache(path: &Path) -> anyhow::Result<()> {
    let f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    f.sync_all()?;
    // SAFETY: fadvise on a descriptor we own; no memory is passed.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if r != 0 {
        bail!("posix_fadvise({}): {}", path.display(), std::io::Error::from_raw_os_error(r));
    }
    Ok(())
}

fn drop_store_cache(store: &Path) -> anyhow::Result<()> {
    for e in std::fs::read_dir(store.join("packs"))? {
        drop_cache(&e?.path())?;
    }
    Ok(())
}

fn warm_cache(path: &Path) -> anyhow::Result<()> {
    let mut f = std::fs::File::open(path)?;
    std::io::copy(&mut f, &mut std::io::sink())?;
    Ok(())
}

/// What one guest process measured.
#[derive(Debug, Clone, Default)]
struct GuestResult {
    setup_ns: u64,
    touch_ns: u64,
    p50_ns: u64,
    p99_ns: u64,
    faults: u64,
    pss_kib: u64,
    checksum: u64,
}

fn parse_guest(v: &Value) -> GuestResult {
    let g = |k: &str| v[k].as_u64().unwrap_or(0);
    GuestResult {
        setup_ns: g("setup_ns"),
        touch_ns: g("touch_ns"),
        p50_ns: g("p50_ns"),
        p99_ns: g("p99_ns"),
        faults: g("minflt") + g("majflt"),
        pss_kib: g("pss_kib"),
        checksum: g("checksum"),
    }
}

/// One row of the table.
#[derive(Debug, Clone, Default, serde::Serialize)]
struct Row {
    mode: String,
    setup_ms: f64,
    touch_ms: f64,
    total_ms: f64,
    pages_installed: u64,
    p50_us: f64,
    p99_us: f64,
    server_p50_us: f64,
    server_p99_us: f64,
    /// The server's counters for this restore (lazy rows).
    server: Option<snapfork_lazy_restore::StatsSnapshot>,
    forks: usize,
    forks_wall_ms: f64,
    forks_mem_mib: f64,
    #[serde(skip)]
    checksum: u64,
}

/// How one uffd-served benchmark run is set up.
#[derive(Default)]
struct LazyRun<'a> {
    /// The pages to prefetch.
    prefetch: Vec<u64>,
    /// Fill the rest of the image in the background.
    fill: bool,
    /// Measure only after a first restore warmed the server's cache.
    warm: bool,
    /// The ref of working-set pages to preload into the cache.
    preload: Option<&'a str>,
}

struct Bench<'a> {
    global: &'a Global,
    exe: PathBuf,
    raw: PathBuf,
    size: u64,
    reference: String,
    work: PathBuf,
    store: Store,
    fault_around: usize,
    cold_store: bool,
    /// The ref of the working-set pages this benchmark stored, deleted when it ends.
    bench_pages: Option<String>,
}

impl Drop for Bench<'_> {
    /// The benchmark's working-set pages go however it ends (gc reclaims their bytes).
    fn drop(&mut self) {
        if let Some(name) = self.bench_pages.take() {
            let deleted = open_rw(self.global).and_then(|store| {
                let mut tx = store.begin()?;
                tx.delete_ref(&name);
                Ok(tx.commit()?)
            });
            if let Err(e) = deleted {
                eprintln!("bench: could not delete {name}: {e:#}");
            }
        }
    }
}

impl Bench<'_> {
    fn guest_cmd(&self, mode: &str, pattern: &Path, socket: Option<&Path>) -> Command {
        let mut c = Command::new(&self.exe);
        c.arg("--store")
            .arg(&self.global.store)
            .arg("__bench-guest")
            .args(["--mode", mode, "--size", &self.size.to_string()])
            .arg("--pattern")
            .arg(pattern)
            .arg("--image")
            .arg(&self.raw)
            .args(["--reference", &self.reference])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(s) = socket {
            c.arg("--socket").arg(s);
        }
        c
    }

    /// Runs `n` guests at once; returns their results and the wall time.
    fn guests(
        &self,
        mode: &str,
        pattern: &Path,
        socket: Option<&Path>,
        n: usize,
    ) -> anyhow::Result<(Vec<GuestResult>, u64)> {
        let t0 = Instant::now();
        let children: Vec<_> =
            (0..n).map(|_| self.guest_cmd(mode, pattern, socket).spawn()).collect::<std::io::Result<_>>()?;
        let mut out = Vec::new();
        for c in children {
            let o = c.wait_with_output()?;
            if !o.status.success() {
                bail!("{mode} guest failed: {:?}", o.status);
            }
            let v: Value = serde_json::from_slice(&o.stdout).context("guest output")?;
            out.push(parse_guest(&v));
        }
        Ok((out, t0.elapsed().as_nanos() as u64))
    }

    /// The lazy rows: demand only (its recorded working set, returned, feeds the others),
    /// prefetched with a fresh server cache (the working-set pages preloaded from their own
    /// blob, as `serve-uffd` does, and read page by page from the image), and prefetched with a
    /// warm cache. Returns the working set and the ref of its pages blob, if it could be stored.
    fn lazy_rows(&mut self, ws_file: &Path, rows: &mut Vec<Row>) -> anyhow::Result<(Vec<u64>, Option<String>)> {
        let (g, _, reps) = self.lazy("lazy", ws_file, 1, LazyRun::default())?;
        let mut r = lazy_row("lazy", &g[0], &reps);
        let recorded = reps.first().map(|r| r.working_set.clone()).unwrap_or_default();
        if let Some(rep) = reps.first() {
            // The server's own service time per fault (the table's p50/p99 are what the guest felt).
            let mut ns = rep.fault_ns.clone();
            r.server_p50_us = pct(&mut ns, 0.5) as f64 / 1e3;
            r.server_p99_us = pct(&mut ns, 0.99) as f64 / 1e3;
        }
        rows.push(r);
        let sidecar = match self.store_bench_pages(&recorded) {
            Ok(name) => Some(name),
            Err(e) => {
                eprintln!("bench: could not store the working-set pages ({e:#}); lazy+prefetch reads pages one by one");
                None
            }
        };
        let (g, _, reps) = self.lazy(
            "prefetch",
            ws_file,
            1,
            LazyRun { prefetch: recorded.clone(), preload: sidecar.as_deref(), ..Default::default() },
        )?;
        rows.push(lazy_row("lazy+prefetch", &g[0], &reps));
        if sidecar.is_some() {
            let (g, _, reps) =
                self.lazy("prefetchp", ws_file, 1, LazyRun { prefetch: recorded.clone(), ..Default::default() })?;
            rows.push(lazy_row("lazy+pf by page", &g[0], &reps));
        }
        // The same when the server has restored this snapshot before (its page cache is warm).
        let (g, _, reps) = self.lazy(
            "prefetchw",
            ws_file,
            1,
            LazyRun { prefetch: recorded.clone(), warm: true, ..Default::default() },
        )?;
        rows.push(lazy_row("lazy+pf warm", &g[0], &reps));
        Ok((recorded, sidecar))
    }

    /// Stores the working-set pages of `ws` under a ref of the benchmark's own (the image's
    /// real working set, if any, is left alone), and reopens the store to see it.
    fn store_bench_pages(&mut self, ws: &[u64]) -> anyhow::Result<String> {
        let image = self.store.open_image_ref(&self.reference)?.id();
        let name = snapfork_store::attached_name(&image, BENCH_PAGES);
        workingset::save_pages(&open_rw(self.global)?, &image, ws, &name)?;
        self.bench_pages = Some(name.clone());
        self.store = open_ro(self.global)?;
        Ok(name)
    }

    /// A uffd-served run: an in-process server with a fresh cache, `n` guests.
    fn lazy(
        &self,
        name: &str,
        pattern: &Path,
        n: usize,
        run: LazyRun<'_>,
    ) -> anyhow::Result<(Vec<GuestResult>, u64, Vec<snapfork_lazy_restore::RestoreReport>)> {
        if self.cold_store {
            drop_store_cache(self.store.dir())?;
        }
        let src = StoreSource::open(&self.store, &self.reference)?;
        let image = src.id();
        let cache = Arc::new(CachedSource::new(Arc::new(src), 1 << 30));
        let source: Arc<dyn PageSource> = cache.clone();
        let preload = match run.preload {
            Some(name) => Some(workingset::spawn_preload(self.store.clone(), image, name.to_string(), cache)?),
            None => None,
        };
        let socket = self.work.join(format!("{name}.sock"));
        let server = UffdServer::bind(
            &socket,
            source,
            ServerOptions {
                max_restores: Some(n + run.warm as usize),
                restore: RestoreOptions {
                    fault_around: self.fault_around,
                    prefetch: run.prefetch,
                    fill: run.fill,
                    ..Default::default()
                },
                ..Default::default()
            },
        )?;
        let stopper = server.stopper();
        let reports = Arc::new(Mutex::new(Vec::new()));
        let r2 = reports.clone();
        let th = std::thread::spawn(move || {
            server.run(|_, ev| {
                if let ServerEvent::Ended(r) = ev
                    && let Ok(mut v) = r2.lock()
                {
                    v.push(*r);
                }
            })
        });
        // With `warm`, a first restore fills the server's shared page cache, as when a snapshot
        // is forked again; only the following restores are measured.
        let res = if run.warm {
            self.guests("uffd", pattern, Some(&socket), 1).and_then(|_| self.guests("uffd", pattern, Some(&socket), n))
        } else {
            self.guests("uffd", pattern, Some(&socket), n)
        };
        if res.is_err() {
            stopper.store(true, Ordering::Relaxed);
        }
        let _ = th.join();
        if let Some(h) = preload {
            let _ = h.join();
        }
        let (g, wall) = res?;
        let mut reports = std::mem::take(&mut *reports.lock().unwrap_or_else(|p| p.into_inner()));
        if run.warm && !reports.is_empty() {
            reports.remove(0);
        }
        Ok((g, wall, reports))
    }
}

fn pct(v: &mut [u32], q: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    v[(((v.len() - 1) as f64) * q).round() as usize] as u64
}

/// A lazy row: what the guest felt, and the server's counters.
fn lazy_row(mode: &str, one: &GuestResult, reps: &[snapfork_lazy_restore::RestoreReport]) -> Row {
    let rep = reps.first();
    let mut r = row(mode, one, rep.map(|r| r.stats.pages_copied + r.stats.pages_zeroed).unwrap_or(0));
    r.server = rep.map(|r| r.stats.clone());
    r
}

fn row(mode: &str, one: &GuestResult, pages: u64) -> Row {
    Row {
        mode: mode.into(),
        setup_ms: one.setup_ns as f64 / 1e6,
        touch_ms: one.touch_ns as f64 / 1e6,
        total_ms: (one.setup_ns + one.touch_ns) as f64 / 1e6,
        pages_installed: pages,
        p50_us: one.p50_ns as f64 / 1e3,
        p99_us: one.p99_ns as f64 / 1e3,
        forks: 1,
        checksum: one.checksum,
        ..Default::default()
    }
}

fn bench(a: BenchArgs, global: &Global) -> anyhow::Result<Report> {
    // Before minutes of measuring: the chart is SVG, and a file named otherwise would lie.
    if let Some(p) = &a.plot
        && !p.extension().is_some_and(|e| e.eq_ignore_ascii_case("svg"))
    {
        bail!("--plot writes an SVG chart: name the file .svg (not {})", p.display());
    }
    let store = open_ro(global)?;
    let reader = store.open_image_ref(&a.reference)?;
    let page_size = reader.page_size() as u64;
    if page_size != 4096 {
        bail!("bench restore handles 4 KiB-page images (this one has {page_size}-byte pages)");
    }
    let size = reader.page_count() * page_size;
    let pages = reader.page_count();
    let tmp;
    let work = match &a.workdir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = TempDir::new()?;
            tmp.0.clone()
        }
    };
    let ws = match &a.pattern {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("read {}", p.display()))?;
            workingset::parse_pattern(&text, pages)?
        }
        None => workingset::random(pages, a.working_set, a.seed),
    };
    if ws.is_empty() {
        bail!("the working set is empty");
    }
    // Firecracker's File backend needs the raw memory file: materialise it (sparse).
    let raw = work.join("mem.raw");
    let bar = crate::output::progress(global, size, "materialise");
    let b2 = bar.clone();
    let prog: snapfork_store::Progress = Arc::new(move |n| b2.inc(n));
    reader.materialize(&raw, Some(&prog))?;
    bar.finish_and_clear();
    let ws_file = work.join("ws.bin");
    std::fs::write(&ws_file, workingset::encode(4096, &ws))?;
    let all: Vec<u64> = (0..pages).collect();
    let all_file = work.join("all.bin");
    std::fs::write(&all_file, workingset::encode(4096, &all))?;
    let mut b = Bench {
        global,
        exe: std::env::current_exe()?,
        raw: raw.clone(),
        size,
        reference: a.reference.clone(),
        work: work.clone(),
        store: store.clone(),
        fault_around: a.fault_around_kib.max(4) << 10,
        cold_store: a.cold_store,
        bench_pages: None,
    };
    let nonzero = (0..pages).filter(|&i| reader.page_id(i).is_ok_and(|h| !h.is_zero())).count() as u64;
    let mut rows: Vec<Row> = Vec::new();
    let forks = a.forks.max(1);

    let want = |group: &str| a.only.is_empty() || a.only.iter().any(|o| o == group);
    // 1. File backend, cold then warm.
    if want("file") {
        drop_cache(&raw)?;
        let (g, _) = b.guests("file", &ws_file, None, 1)?;
        rows.push(row("file-cold", &g[0], g[0].faults));
        warm_cache(&raw)?;
        let (g, _) = b.guests("file", &ws_file, None, 1)?;
        rows.push(row("file-warm", &g[0], g[0].faults));
        // The floor of every restore that copies memory (userfaultfd's COPY included): the
        // working set's data pages copied from this process's memory into fresh anonymous
        // memory, zero pages left to the kernel. File warm maps page-cache pages instead.
        let (g, _) = b.guests("copy", &ws_file, None, 1)?;
        rows.push(row("floor: memcpy", &g[0], g[0].faults));
    }
    // 2. Eager.
    if want("eager") {
        if a.cold_store {
            drop_store_cache(store.dir())?;
        }
        let (g, _) = b.guests("eager", &ws_file, None, 1)?;
        rows.push(row("eager", &g[0], nonzero));
    }
    let mut recorded = Vec::new();
    let mut sidecar = None;
    if want("lazy") {
        (recorded, sidecar) = b.lazy_rows(&ws_file, &mut rows)?;
    }
    if want("full") {
        // Full sequential fault-in: eager vs lazy (demand only) vs lazy with --fill.
        if a.cold_store {
            drop_store_cache(store.dir())?;
        }
        let (g, _) = b.guests("eager", &all_file, None, 1)?;
        rows.push(row("full: eager", &g[0], nonzero));
        let (g, _, reps) = b.lazy("seq", &all_file, 1, LazyRun::default())?;
        rows.push(lazy_row("full: lazy", &g[0], &reps));
        let (g, _, reps) = b.lazy("fill", &all_file, 1, LazyRun { fill: true, ..Default::default() })?;
        rows.push(lazy_row("full: lazy+fill", &g[0], &reps));
    }

    // Every mode read the same bytes.
    for group in [
        &rows.iter().filter(|r| !r.mode.starts_with("full")).collect::<Vec<_>>()[..],
        &rows.iter().filter(|r| r.mode.starts_with("full")).collect::<Vec<_>>()[..],
    ] {
        if let Some(first) = group.first()
            && let Some(bad) = group.iter().find(|r| r.checksum != first.checksum)
        {
            bail!("{} read different bytes than {} (checksum mismatch)", bad.mode, first.mode);
        }
    }

    // N concurrent restores of each kind.
    if forks > 1 && want("file") && want("eager") && want("lazy") {
        let fork_row = |rows: &mut Vec<Row>, mode: &str, g: &[GuestResult], wall: u64, extra_kib: u64| {
            if let Some(r) = rows.iter_mut().find(|r| r.mode == mode) {
                r.forks = g.len();
                r.forks_wall_ms = wall as f64 / 1e6;
                r.forks_mem_mib = (g.iter().map(|x| x.pss_kib).sum::<u64>() + extra_kib) as f64 / 1024.0;
            }
        };
        drop_cache(&raw)?;
        let (g, w) = b.guests("file", &ws_file, None, forks)?;
        fork_row(&mut rows, "file-cold", &g, w, 0);
        let (g, w) = b.guests("file", &ws_file, None, forks)?;
        fork_row(&mut rows, "file-warm", &g, w, 0);
        let (g, w) = b.guests("eager", &ws_file, None, forks)?;
        fork_row(&mut rows, "eager", &g, w, 0);
        // The server's shared cache holds each distinct page once: count it once.
        let cache_kib = |reps: &[snapfork_lazy_restore::RestoreReport]| {
            reps.iter().map(|r| r.stats.pages_copied).max().unwrap_or(0) * 4
        };
        let (g, w, reps) = b.lazy("forks", &ws_file, forks, LazyRun::default())?;
        fork_row(&mut rows, "lazy", &g, w, cache_kib(&reps));
        let (g, w, reps) = b.lazy(
            "forksp",
            &ws_file,
            forks,
            LazyRun { prefetch: recorded, preload: sidecar.as_deref(), ..Default::default() },
        )?;
        fork_row(&mut rows, "lazy+prefetch", &g, w, cache_kib(&reps));
    }
    let get = |m: &str| rows.iter().find(|r| r.mode == m).cloned().unwrap_or_default();
    let (cold, warm, pf) = (get("file-cold"), get("file-warm"), get("lazy+prefetch"));
    let pfw = get("lazy+pf warm");
    let (feager, fseq, ffill) = (get("full: eager"), get("full: lazy"), get("full: lazy+fill"));
    let ratios = json!({
        "prefetch_vs_file_warm": pf.total_ms / warm.total_ms,
        "prefetch_vs_file_cold": pf.total_ms / cold.total_ms,
        "prefetch_warm_cache_vs_file_warm": pfw.total_ms / warm.total_ms,
        "prefetch_warm_cache_vs_file_cold": pfw.total_ms / cold.total_ms,
        "prefetch_by_page_vs_file_cold": get("lazy+pf by page").total_ms / cold.total_ms,
        "full_lazy_vs_eager": fseq.total_ms / feager.total_ms,
        "full_lazy_fill_vs_eager": ffill.total_ms / feager.total_ms,
        "lazy_setup_ms": get("lazy").setup_ms,
        "memcpy_floor_vs_file_warm": get("floor: memcpy").total_ms / warm.total_ms,
    });
    let mut text = format!(
        "image {} ({} MiB, {} pages, {} non-zero), working set {} pages ({:.1}%)\n",
        reader.id().short(),
        size >> 20,
        pages,
        nonzero,
        ws.len(),
        100.0 * ws.len() as f64 / pages as f64
    );
    text += &format!(
        "{:<16} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8}{}\n",
        "mode",
        "setup ms",
        "touch ms",
        "total ms",
        "pages",
        "p50 us",
        "p99 us",
        if forks > 1 { format!(" {:>12} {:>12}", format!("{forks} forks ms"), "forks MiB") } else { String::new() }
    );
    for r in &rows {
        text += &format!(
            "{:<16} {:>9.3} {:>9.2} {:>9.2} {:>8} {:>8.1} {:>8.1}{}\n",
            r.mode,
            r.setup_ms,
            r.touch_ms,
            r.total_ms,
            r.pages_installed,
            r.p50_us,
            r.p99_us,
            if r.forks > 1 { format!(" {:>12.1} {:>12.1}", r.forks_wall_ms, r.forks_mem_mib) } else { String::new() }
        );
    }
    text += &format!(
        "lazy+prefetch / file-warm = {:.2}x, / file-cold = {:.2}x (warm server cache: {:.2}x, {:.2}x; memcpy floor: {:.2}x); full fault-in lazy / eager = {:.2}x (with --fill {:.2}x)",
        pf.total_ms / warm.total_ms,
        pf.total_ms / cold.total_ms,
        pfw.total_ms / warm.total_ms,
        pfw.total_ms / cold.total_ms,
        get("floor: memcpy").total_ms / warm.total_ms,
        fseq.total_ms / feager.total_ms,
        ffill.total_ms / feager.total_ms
    );
    if let Some(p) = &a.plot {
        std::fs::write(p, svg(&rows)).with_context(|| format!("write {}", p.display()))?;
    }
    let j = json!({
        "image": reader.id().to_hex(), "size": size, "pages": pages, "nonzero_pages": nonzero,
        "working_set_pages": ws.len(), "forks": forks, "cold_store": a.cold_store,
        "fault_around_kib": b.fault_around >> 10,
        "rows": rows, "ratios": ratios,
    });
    Ok(Report::new(j, text))
}

/// A grouped bar chart: setup and touch time per mode, log-free, labelled.
fn svg(rows: &[Row]) -> String {
    let max = rows.iter().map(|r| r.total_ms).fold(0.0f64, f64::max).max(1e-3);
    let (w, bar_h, gap, left) = (900.0, 22.0, 10.0, 150.0);
    let h = rows.len() as f64 * (bar_h + gap) + 60.0;
    let scale = (w - left - 120.0) / max;
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    s += r#"<text x="10" y="18" font-size="14">snapfork bench restore: time until the working set is touched (ms)</text>"#;
    for (i, r) in rows.iter().enumerate() {
        let y = 40.0 + i as f64 * (bar_h + gap);
        let sw = r.setup_ms * scale;
        let tw = r.touch_ms * scale;
        s += &format!(
            r##"<text x="10" y="{}">{}</text><rect x="{left}" y="{y}" width="{sw:.1}" height="{bar_h}" fill="#e39c37"/><rect x="{:.1}" y="{y}" width="{tw:.1}" height="{bar_h}" fill="#3b7dd8"/><text x="{:.1}" y="{}">{:.1}</text>"##,
            y + 15.0,
            r.mode,
            left + sw,
            left + sw + tw + 5.0,
            y + 15.0,
            r.total_ms
        );
    }
    s += &format!(
        r##"<rect x="{left}" y="{}" width="12" height="12" fill="#e39c37"/><text x="{}" y="{}">setup</text><rect x="{}" y="{}" width="12" height="12" fill="#3b7dd8"/><text x="{}" y="{}">touch working set</text></svg>"##,
        h - 18.0,
        left + 16.0,
        h - 8.0,
        left + 70.0,
        h - 18.0,
        left + 86.0,
        h - 8.0
    );
    s
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> anyhow::Result<Self> {
        let base = std::env::temp_dir();
        for i in 0..1000u32 {
            let p = base.join(format!("snapfork-bench-{}-{i}", std::process::id()));
            if std::fs::create_dir(&p).is_ok() {
                return Ok(TempDir(p));
            }
        }
        bail!("cannot create a temporary directory in {}", base.display())
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// The guest process: restores memory one way, touches the working set, reports.

fn rusage_faults() -> (u64, u64) {
    // SAFETY: getrusage fills the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    (ru.ru_minflt as u64, ru.ru_majflt as u64)
}

fn pss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/smaps_rollup")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Pss:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn guest(a: GuestArgs, global: &Global) -> anyhow::Result<Report> {
    let (_, pages) = workingset::decode(&std::fs::read(&a.pattern)?)?;
    let offsets: Vec<u64> = pages.iter().map(|p| p * 4096).collect();
    // The `copy` floor: the working set's data pages, already in this process's memory (as in a
    // server whose cache is warm), before the clock starts.
    let mut staged: Vec<(u64, Vec<u8>)> = Vec::new();
    if a.mode == "copy" {
        let f = std::fs::File::open(a.image.as_deref().context("--image")?)?;
        let mut seen = std::collections::HashSet::new();
        for &o in &offsets {
            let mut page = vec![0u8; 4096];
            if seen.insert(o) && f.read_at(&mut page, o)? == 4096 && page.iter().any(|&b| b != 0) {
                staged.push((o, page));
            }
        }
    }
    let t0 = Instant::now();
    // Keep whatever backs the memory alive until the end.
    let mut _vm = None;
    let mut _file = None;
    let base: *const u8 = match a.mode.as_str() {
        "file" => {
            let path = a.image.as_deref().context("--image")?;
            let f = std::fs::File::open(path)?;
            // SAFETY: a private read-write mapping of a file we opened, as Firecracker's File
            // backend does; unmapped at process exit.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    a.size as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_NORESERVE,
                    f.as_raw_fd(),
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                bail!("mmap: {}", std::io::Error::last_os_error());
            }
            _file = Some(f);
            p as *const u8
        }
        "eager" => {
            let store = open_ro(global)?;
            let reader = store.open_image_ref(a.reference.as_deref().context("--reference")?)?;
            let p = snapfork_lazy_restore::client::map_anonymous(a.size, 4096)?;
            let n = reader.page_count();
            let addr = p as usize;
            // Two threads: decompression is the cost, and this machine has two cores.
            std::thread::scope(|s| -> anyhow::Result<()> {
                let hs: Vec<_> = (0..2u64)
                    .map(|t| {
                        let reader = &reader;
                        s.spawn(move || -> anyhow::Result<()> {
                            let mut i = t;
                            while i < n {
                                let id = reader.page_id(i)?;
                                if !id.is_zero() {
                                    // SAFETY: page i of our fresh mapping; threads write
                                    // disjoint pages.
                                    let dst = unsafe {
                                        std::slice::from_raw_parts_mut((addr + (i * 4096) as usize) as *mut u8, 4096)
                                    };
                                    reader.read_page_with_id(i, &id, dst)?;
                                }
                                i += 2;
                            }
                            Ok(())
                        })
                    })
                    .collect();
                for h in hs {
                    h.join().map_err(|_| anyhow::anyhow!("reader panicked"))??;
                }
                Ok(())
            })?;
            p as *const u8
        }
        "uffd" => {
            let socket = a.socket.as_deref().context("--socket")?;
            let mut vm = FakeVm::new(&[RegionSpec { size: a.size, offset: 0, page_size: 4096 }])?;
            vm.connect(socket, Shape::V1_12, &[])?;
            let p = vm.regions[0].ptr as *const u8;
            _vm = Some(vm);
            p
        }
        "copy" => snapfork_lazy_restore::client::map_anonymous(a.size, 4096)? as *const u8,
        other => bail!("unknown mode {other}"),
    };
    let setup_ns = t0.elapsed().as_nanos() as u64;
    let (f0, m0) = rusage_faults();
    let t1 = Instant::now();
    for (o, page) in &staged {
        // SAFETY: `o` is a page of the fresh `size`-byte anonymous mapping at `base`, ours alone.
        unsafe { std::ptr::copy_nonoverlapping(page.as_ptr(), base.add(*o as usize) as *mut u8, 4096) };
    }
    let mut held = 0;
    if a.hold {
        held = offsets.len() / 2;
        // SAFETY: every offset is a page of the `size`-byte mapping at `base`.
        unsafe { snapfork_lazy_restore::client::touch(base, &offsets[..held]) };
        println!("{}", json!({"held": true}));
        std::io::stdout().flush()?;
        std::io::stdin().read_line(&mut String::new())?;
    }
    // SAFETY: every offset is a page of the `size`-byte mapping at `base`.
    let (mut lat, _) = unsafe { snapfork_lazy_restore::client::touch(base, &offsets[held..]) };
    let touch_ns = t1.elapsed().as_nanos() as u64;
    let (f1, m1) = rusage_faults();
    // A checksum of the first word of every touched page: all modes must agree.
    let mut checksum = 0u64;
    for &o in &offsets {
        // SAFETY: as above; the pages are present now.
        let w = unsafe { std::ptr::read_unaligned(base.add(o as usize) as *const u64) };
        checksum = checksum.rotate_left(5) ^ w;
    }
    let out = json!({
        "setup_ns": setup_ns, "touch_ns": touch_ns,
        "p50_ns": pct(&mut lat, 0.5), "p99_ns": pct(&mut lat, 0.99),
        "minflt": f1 - f0, "majflt": m1 - m0, "pss_kib": pss_kib(), "checksum": checksum,
    });
    let mut so = std::io::stdout().lock();
    writeln!(so, "{out}")?;
    so.flush()?;
    // The report was printed directly (the parent parses it): exit without a second object.
    std::process::exit(0);
}
