//! Commands on the content-addressed store: ingest, cat, ls, rm, gc, verify, stats.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Subcommand;
use serde_json::json;
use snapfork_store::{GcOptions, IngestOptions, OpenOptions, PageSet, Store, node::kind};

use crate::Global;
use crate::output::{Report, progress};

/// Store commands.
#[derive(Subcommand, Debug)]
pub enum StoreCmd {
    /// Store an image (VM memory, raw disk) page by page, or any file as a blob.
    Ingest {
        /// The file to store.
        file: PathBuf,
        /// The ref to point at it.
        #[arg(long)]
        name: String,
        /// A previous image of the same VM: unchanged pages and segments are shared with it.
        #[arg(long)]
        parent: Option<String>,
        /// With --parent: a text list of the pages that may have changed ("12", "40-63", one or
        /// more per line); only those are read and hashed.
        #[arg(long, conflicts_with_all = ["dirty_bitmap", "diff_snapshot"])]
        dirty_pages: Option<PathBuf>,
        /// With --parent: the same as a bitmap (bit i of little-endian u64 word i/64 = page i),
        /// as KVM's dirty log hands it out.
        #[arg(long, conflicts_with = "diff_snapshot")]
        dirty_bitmap: Option<PathBuf>,
        /// With --parent: FILE is a Firecracker diff snapshot (sparse; holes are unchanged pages).
        #[arg(long)]
        diff_snapshot: bool,
        /// Page size in bytes (4096; 2097152 for huge pages).
        #[arg(long, default_value_t = 4096)]
        page_size: u32,
        /// Store FILE as a blob (content-defined chunks) rather than as an image of pages.
        #[arg(long, conflicts_with_all = ["parent", "dirty_pages", "dirty_bitmap", "diff_snapshot"])]
        blob: bool,
        /// Move NAME when it already names something else (without it, only an ingest onto
        /// NAME itself, `--parent NAME`, moves it).
        #[arg(long)]
        force: bool,
    },
    /// Write a stored image or blob to a file (images stay sparse where pages are zero).
    Cat {
        /// A ref or id.
        reference: String,
        /// Where to write it.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// List refs.
    Ls {
        /// Only refs starting with this.
        #[arg(default_value = "")]
        prefix: String,
    },
    /// Delete a ref (gc then frees what nothing else uses).
    Rm {
        /// The refs to delete.
        #[arg(required = true)]
        refs: Vec<String>,
    },
    /// Remove what no ref reaches; rewrite packs that are mostly dead.
    Gc {
        /// Say what would go; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Keep unreferenced pack files and file objects younger than this many seconds (an
        /// ingest in progress).
        #[arg(long, default_value_t = 3600)]
        grace: u64,
    },
    /// Re-read and re-hash everything (or what one ref reaches); exit non-zero on damage.
    Verify {
        /// Only this ref.
        reference: Option<String>,
    },
    /// Space figures: logical bytes, zero pages, unique pages, stored bytes, ratios.
    Stats {
        /// Only this ref (or refs with this prefix).
        reference: Option<String>,
    },
}

/// Opens the store named by the global options.
pub fn open_store(global: &Global, read_only: bool) -> anyhow::Result<Store> {
    if !read_only {
        crate::daemon::refuse_if_serving(global, "this command")?;
    }
    let opts = OpenOptions { read_only, lock_timeout: global.lock_timeout(), ..OpenOptions::default() };
    Store::open(&global.store, opts).with_context(|| format!("open store {}", global.store.display()))
}

/// " (was ID)" for a ref an ingest moved.
fn was(replaced: Option<snapfork_store::Hash>) -> String {
    replaced.map(|old| format!(" (was {})", old.short())).unwrap_or_default()
}

/// Runs one store command.
pub fn run(cmd: StoreCmd, global: &Global) -> anyhow::Result<Report> {
    match cmd {
        StoreCmd::Ingest { file, name, parent, dirty_pages, dirty_bitmap, diff_snapshot, page_size, blob, force } => {
            let store = open_store(global, false)?;
            let size = fs::metadata(&file).with_context(|| format!("stat {}", file.display()))?.len();
            // Checked before the work: nobody else writes refs while this process holds the store.
            let replaced = store.get_ref(&name)?;
            let parent = parent.map(|p| store.resolve(&p)).transpose()?;
            if let Some(old) = replaced
                && !force
                && parent != Some(old)
            {
                let onto = if blob { String::new() } else { format!(" (or --parent {name} ingests onto it)") };
                bail!("{name} already names {}: --force moves it{onto}", old.short());
            }
            let started = Instant::now();
            if blob {
                let busy = crate::output::spinner(global, "ingest (blob)");
                let info = store.put_blob_file(&file, Some(&name))?;
                drop(busy);
                let secs = started.elapsed().as_secs_f64();
                let text = format!(
                    "{name} = {}{} (blob, {} in {} chunks, {} new, {} stored, {:.2}s)",
                    info.id.short(),
                    was(replaced),
                    bytes(info.size),
                    info.chunks,
                    info.new_chunks,
                    bytes(info.new_stored_bytes),
                    secs
                );
                let mut j = serde_json::to_value(&info)?;
                j["name"] = json!(name);
                j["replaced"] = json!(replaced);
                j["kind"] = json!("blob");
                j["seconds"] = json!(secs);
                return Ok(Report::new(j, text));
            }
            let dirty = match (dirty_pages, dirty_bitmap) {
                (Some(p), _) => Some(PageSet::parse_text(&read_text(&p)?, size.div_ceil(u64::from(page_size).max(1)))?),
                (_, Some(p)) => {
                    Some(PageSet::from_bitmap(&fs::read(&p).with_context(|| format!("read {}", p.display()))?))
                }
                _ => None,
            };
            let bar = progress(global, size, "ingest");
            let b = bar.clone();
            let opts =
                IngestOptions { page_size, parent, dirty, diff_snapshot, progress: Some(Arc::new(move |n| b.inc(n))) };
            let info = store.ingest_image(&file, &opts, Some(&name))?;
            bar.finish_and_clear();
            let secs = started.elapsed().as_secs_f64();
            let text = format!(
                "{name} = {}{} ({} pages: {} zero, {} hashed, {} new; {} stored; {:.2}s, {}/s)",
                info.id.short(),
                was(replaced),
                info.pages,
                info.zero_pages,
                info.hashed_pages,
                info.new_pages,
                bytes(info.new_stored_bytes),
                secs,
                bytes((size as f64 / secs.max(1e-9)) as u64)
            );
            let mut j = serde_json::to_value(&info)?;
            j["name"] = json!(name);
            j["replaced"] = json!(replaced);
            j["kind"] = json!("image");
            j["seconds"] = json!(secs);
            Ok(Report::new(j, text))
        }
        StoreCmd::Cat { reference, output } => {
            let store = open_store(global, true)?;
            let id = store.resolve(&reference)?;
            let node = store.get_node(&id)?;
            let started = Instant::now();
            let (kind_name, size) = match node.kind {
                kind::IMAGE_ROOT => {
                    let image = store.open_image_ref(&reference)?;
                    let bar = progress(global, image.size(), "cat");
                    let b = bar.clone();
                    let progress: snapfork_store::Progress = Arc::new(move |n| b.inc(n));
                    image.materialize(&output, Some(&progress))?;
                    bar.finish_and_clear();
                    ("image", image.size())
                }
                kind::BLOB => {
                    let _busy = crate::output::spinner(global, "cat (blob)");
                    let mut out = fs::File::create(&output).with_context(|| format!("create {}", output.display()))?;
                    let n = store.read_blob(&id, &mut out)?;
                    out.sync_all()?;
                    ("blob", n)
                }
                k => bail!("{reference} is a node of kind {k}, neither an image nor a blob"),
            };
            let secs = started.elapsed().as_secs_f64();
            Ok(Report::new(
                json!({"id": output, "ref": reference, "source": id, "kind": kind_name, "size": size, "output": output, "seconds": secs}),
                format!("wrote {} ({kind_name}, {}) in {secs:.2}s", output.display(), bytes(size)),
            ))
        }
        StoreCmd::Ls { prefix } => {
            let store = open_store(global, true)?;
            let mut rows = Vec::new();
            let mut text = String::new();
            for (name, id) in store.list_refs(&prefix)? {
                let (k, size) = describe(&store, &id);
                text.push_str(&format!("{name:<40} {}  {k:<8} {}\n", id.short(), size.map(bytes).unwrap_or_default()));
                rows.push(json!({"name": name, "id": id, "kind": k, "size": size}));
            }
            Ok(Report::new(json!({ "refs": rows }), text))
        }
        StoreCmd::Rm { refs } => {
            let store = open_store(global, false)?;
            let mut tx = store.begin()?;
            for r in &refs {
                if store.get_ref(r)?.is_none() {
                    bail!("no ref named {r:?}");
                }
                tx.delete_ref(r);
            }
            tx.commit()?;
            Ok(Report::new(json!({ "removed": refs }), format!("removed {}", refs.join(", "))))
        }
        StoreCmd::Gc { dry_run, grace } => {
            let bar = crate::output::spinner(global, "gc");
            // A running daemon holds the store: it runs the gc.
            let body = json!({"dry_run": dry_run, "grace_seconds": grace});
            if let Some(r) = crate::daemon::try_request("POST", "/v1/gc", &body, global)? {
                return Ok(r);
            }
            let store = open_store(global, false)?;
            let b = bar.0.clone();
            let progress: snapfork_store::Progress = Arc::new(move |n| b.inc(n));
            let opts = GcOptions {
                dry_run,
                grace: Duration::from_secs(grace),
                progress: Some(progress),
                ..Default::default()
            };
            let report = store.gc(&opts)?;
            Ok(gc_report(&report, dry_run))
        }
        StoreCmd::Verify { reference } => {
            let store = open_store(global, true)?;
            let bar = crate::output::spinner(global, "verify");
            let b = bar.0.clone();
            let progress: snapfork_store::Progress = Arc::new(move |n| b.inc(n));
            let report = store.verify(reference.as_deref(), Some(&progress))?;
            drop(bar);
            if let Some(first) = report.damaged.first() {
                // Every damaged object on its own line first (stderr), then the one-line error;
                // with --json, one object: the report plus `error`. Exit status 2 either way.
                let summary = format!(
                    "{} damaged object(s), the first {}: {} ({})",
                    report.damaged.len(),
                    first.what,
                    first.detail,
                    first.id.short()
                );
                if global.json {
                    let mut j = serde_json::to_value(&report)?;
                    j["error"] = json!(summary);
                    println!("{j}");
                } else {
                    for d in &report.damaged {
                        eprintln!("damaged: {}: {} ({})", d.what, d.detail, d.id.short());
                    }
                }
                eprintln!("snapfork: error: {summary}");
                std::process::exit(2);
            }
            let text = format!("ok: {} objects, {} re-hashed", report.objects, bytes(report.bytes));
            Ok(Report::new(serde_json::to_value(&report)?, text))
        }
        StoreCmd::Stats { reference } => {
            let store = open_store(global, true)?;
            let stats = match &reference {
                Some(r) if store.get_ref(r)?.is_some() => {
                    let s = store.ref_stats(r)?;
                    snapfork_store::StoreStats { total: Default::default(), refs: vec![s] }
                }
                Some(prefix) => store.stats(prefix)?,
                None => store.stats("")?,
            };
            let mut text = String::new();
            for s in &stats.refs {
                text.push_str(&format!(
                    "{:<32} {:<6} {:>10} logical, {:>7} zero pages, {:>7} unique chunks, {:>10} stored, dedup {:.2}x, compression {:.2}x\n",
                    s.name,
                    s.kind,
                    bytes(s.logical_bytes),
                    s.zero_pages,
                    s.unique_chunks,
                    bytes(s.stored_bytes),
                    s.dedup_ratio,
                    s.compression_ratio
                ));
            }
            if reference.is_none() || stats.refs.len() != 1 || stats.total.refs > 0 {
                let t = &stats.total;
                text.push_str(&format!(
                    "total: {} logical in {} refs ({} zero), {} chunks = {} raw -> {} stored; packs {}; dedup {:.2}x, compression {:.2}x, overall {:.2}x\n",
                    bytes(t.logical_bytes),
                    t.refs,
                    bytes(t.zero_bytes),
                    t.chunks,
                    bytes(t.raw_bytes),
                    bytes(t.stored_bytes),
                    bytes(t.pack_bytes),
                    t.dedup_ratio,
                    t.compression_ratio,
                    t.overall_ratio
                ));
            }
            Ok(Report::new(serde_json::to_value(&stats)?, text))
        }
    }
}

fn describe(store: &Store, id: &snapfork_store::Hash) -> (String, Option<u64>) {
    match store.get_node(id) {
        Ok(n) if n.kind == kind::IMAGE_ROOT => ("image".into(), store.open_image(id).ok().map(|i| i.size())),
        Ok(n) if n.kind == kind::BLOB => ("blob".into(), store.blob_size(id).ok()),
        Ok(n) => (format!("node:{}", n.kind), None),
        Err(_) => ("?".into(), None),
    }
}

fn read_text(path: &Path) -> anyhow::Result<String> {
    fs::read_to_string(path).with_context(|| format!("read {}", path.display()))
}

/// Bytes for people: 1.5 GiB.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

/// What `gc` prints: the same from the CLI and from the daemon.
pub fn gc_report(report: &snapfork_store::GcReport, dry_run: bool) -> Report {
    let verb = if dry_run { "would remove" } else { "removed" };
    let text = format!(
        "{verb} {} chunks ({}), {} file objects ({}), {} orphaned file objects ({}) and {} attached entries; \
         {} packs rewritten, {} removed; packs {} -> {}",
        report.removed_chunks,
        bytes(report.removed_chunk_bytes),
        report.removed_files,
        bytes(report.removed_file_bytes),
        report.orphaned_files,
        bytes(report.orphaned_file_bytes),
        report.removed_attached,
        report.repacked,
        report.removed_packs,
        bytes(report.pack_bytes_before),
        bytes(report.pack_bytes_after)
    );
    Report::new(serde_json::to_value(report).unwrap_or_default(), text)
}
