//! The store benchmark: ingest, incremental ingest and reads on real captured memory images,
//! side by side with `zstd -1 -T0` on the same files in the same run.
//!
//! `cargo run --release -p snapfork-benches --bin store -- [--size-mib 256] [--reps 3] [--json]`

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde_json::json;
use snapfork_benches::{captured_images, cpu_seconds, mbps, median, percentile, sync};
use snapfork_store::{IngestOptions, OpenOptions, PageSet, Store};

const PAGE: usize = 4096;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let size_mib: u64 = flag("--size-mib").map_or(Ok(256), |s| s.parse())?;
    let reps: usize = flag("--reps").map_or(Ok(3), |s| s.parse())?;
    let as_json = args.iter().any(|a| a == "--json");
    let (a, b) = captured_images(size_mib)?;
    let size = fs::metadata(&a)?.len();
    let tmp = tempfile::Builder::new().prefix("snapfork-bench-").tempdir_in("/var/tmp")?;
    // Warm the page cache for both contenders.
    let (da, db) = (fs::read(&a)?, fs::read(&b)?);

    // zstd -1 -T0, the baseline, and the first ingest into a fresh store, interleaved round by
    // round; each timed step starts after `sync`, so that none pays for the writeback of another's
    // output. The ingest is timed without creating the store (once per store, not per image), and
    // zstd also with its output made durable, as the store's packs are before it commits.
    let zst = tmp.path().join("a.zst");
    let (mut zstd_times, mut zstd_sync_times, mut ingest_times, mut open_times) = (vec![], vec![], vec![], vec![]);
    let (mut zstd_cpu, mut ingest_cpu) = (0.0, 0.0);
    let mut first = None;
    let mut first_pack_bytes = 0;
    for n in 0..reps {
        sync();
        let cpu0 = cpu_seconds(true);
        let t = Instant::now();
        zstd(&a, &zst)?;
        zstd_times.push(t.elapsed());
        zstd_cpu += cpu_seconds(true) - cpu0;
        fs::File::open(&zst)?.sync_all()?;
        zstd_sync_times.push(t.elapsed());
        sync();
        let dir = tmp.path().join(format!("first-{n}"));
        let t = Instant::now();
        let store = Store::open(&dir, OpenOptions::default())?;
        open_times.push(t.elapsed());
        let cpu0 = cpu_seconds(false);
        let t = Instant::now();
        first = Some(store.ingest_image(&a, &IngestOptions::default(), Some("a"))?);
        ingest_times.push(t.elapsed());
        ingest_cpu += cpu_seconds(false) - cpu0;
        first_pack_bytes = dir_size(&dir.join("packs"))?;
    }
    let first = first.context("no repetitions")?;
    let mid = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (zstd_time, zstd_sync_time) = (mid(zstd_times), mid(zstd_sync_times));
    let (ingest_time, open_time) = (mid(ingest_times), mid(open_times));
    let (zstd_cpu, ingest_cpu) = (zstd_cpu / reps as f64, ingest_cpu / reps as f64);
    let zstd_size = fs::metadata(&zst)?.len();

    // Second ingest (mem-b onto mem-a): full re-ingest vs with the dirty-page set.
    let changed: PageSet = (0..da.len() / PAGE)
        .filter(|&p| da[p * PAGE..(p + 1) * PAGE] != db[p * PAGE..(p + 1) * PAGE])
        .map(|p| p as u64)
        .collect();
    let changed_bytes: Vec<u8> =
        changed.iter().flat_map(|p| db[p as usize * PAGE..(p as usize + 1) * PAGE].to_vec()).collect();
    let changed_path = tmp.path().join("changed.raw");
    fs::write(&changed_path, &changed_bytes)?;
    zstd(&changed_path, &zst)?;
    let changed_zstd = fs::metadata(&zst)?.len();
    let per_page_zstd: u64 = changed_bytes
        .chunks(PAGE)
        .filter(|p| p.iter().any(|&b| b != 0))
        .map(|p| zstd::bulk::compress(p, 1).map_or(PAGE as u64, |c| c.len().min(PAGE) as u64))
        .sum();

    // Each repetition starts from a fresh store holding mem-a; only the second ingest is timed.
    let second = |n: usize, dirty: Option<PageSet>| -> anyhow::Result<(Duration, snapfork_store::ImageInfo)> {
        let store = Store::open(tmp.path().join(format!("second-{n}")), OpenOptions::default())?;
        let parent = store.ingest_image(&a, &IngestOptions::default(), Some("a"))?.id;
        let opts = IngestOptions { parent: Some(parent), dirty, ..IngestOptions::default() };
        let t = Instant::now();
        let info = store.ingest_image(&b, &opts, Some("b"))?;
        Ok((t.elapsed(), info))
    };
    let mut full_times = Vec::new();
    let mut inc_times = Vec::new();
    let (mut full2, mut inc) = (None, None);
    for r in 0..reps {
        let (t, i) = second(2 * r, None)?;
        full_times.push(t);
        full2 = Some(i);
        let (t, i) = second(2 * r + 1, Some(changed.clone()))?;
        inc_times.push(t);
        inc = Some(i);
    }
    full_times.sort();
    inc_times.sort();
    let (full2_time, inc_time) = (full_times[reps / 2], inc_times[reps / 2]);
    let (full2, inc) = (full2.context("no repetitions")?, inc.context("no repetitions")?);
    if inc.id != full2.id {
        bail!("incremental and full ingest disagree");
    }

    // A later checkpoint where 1% of pages changed (mem-c = mem-b with 1% of its data pages
    // rewritten): full re-ingest vs with the dirty set, each onto a store holding mem-b.
    let mut rng = StdRng::seed_from_u64(11);
    let mut dc = db.clone();
    let data_pages_b: Vec<usize> =
        (0..db.len() / PAGE).filter(|&p| db[p * PAGE..(p + 1) * PAGE].iter().any(|&x| x != 0)).collect();
    let mut sparse = PageSet::new();
    for _ in 0..(db.len() / PAGE / 100) {
        let p = data_pages_b[rng.random_range(0..data_pages_b.len())];
        rng.fill(&mut dc[p * PAGE..p * PAGE + 256]);
        sparse.insert(p as u64);
    }
    let c = tmp.path().join("mem-c.raw");
    fs::write(&c, &dc)?;
    let third = |n: usize, dirty: Option<PageSet>| -> anyhow::Result<(Duration, snapfork_store::ImageInfo)> {
        let store = Store::open(tmp.path().join(format!("third-{n}")), OpenOptions::default())?;
        let parent = store.ingest_image(&b, &IngestOptions::default(), Some("b"))?.id;
        let opts = IngestOptions { parent: Some(parent), dirty, ..IngestOptions::default() };
        let t = Instant::now();
        let info = store.ingest_image(&c, &opts, Some("c"))?;
        Ok((t.elapsed(), info))
    };
    let (mut full3, mut inc3) = (Vec::new(), Vec::new());
    for r in 0..reps {
        full3.push(third(2 * r, None)?.0);
        inc3.push(third(2 * r + 1, Some(sparse.clone()))?.0);
    }
    full3.sort();
    inc3.sort();
    let (full3_time, inc3_time) = (full3[reps / 2], inc3[reps / 2]);

    // Reads: random pages (p50/p99) and sequential materialization.
    let store = Store::open(tmp.path().join("first-1"), OpenOptions::default())?;
    let image = store.open_image_ref("a")?;
    let data_pages: Vec<u64> =
        (0..image.page_count()).filter(|&i| image.page_id(i).is_ok_and(|h| !h.is_zero())).collect();
    let mut rng = StdRng::seed_from_u64(7);
    let mut buf = vec![0u8; PAGE];
    let mut lat = Vec::with_capacity(20_000);
    for _ in 0..20_000 {
        let p = data_pages[rng.random_range(0..data_pages.len())];
        let t = Instant::now();
        image.read_page(p, &mut buf)?;
        lat.push(t.elapsed());
    }
    lat.sort();
    let out = tmp.path().join("out.raw");
    let (seq_time, _) = median(reps, || Ok(image.materialize(&out, None)?))?;
    if fs::read(&out)? != da {
        bail!("materialized image differs from mem-a.raw");
    }

    let report = json!({
        "image_bytes": size,
        "zstd_T0": {"seconds": zstd_time.as_secs_f64(), "cpu_seconds": zstd_cpu, "mb_per_s": mbps(size, zstd_time), "bytes": zstd_size,
            "seconds_with_fsync": zstd_sync_time.as_secs_f64()},
        "first_ingest": {"seconds": ingest_time.as_secs_f64(), "cpu_seconds": ingest_cpu, "mb_per_s": mbps(size, ingest_time),
            "cpu_vs_zstd": zstd_cpu / ingest_cpu,
            "stored_bytes": first_pack_bytes, "zero_pages": first.zero_pages, "new_pages": first.new_pages,
            "speed_vs_zstd": zstd_time.as_secs_f64() / ingest_time.as_secs_f64(),
            "speed_vs_durable_zstd": zstd_sync_time.as_secs_f64() / ingest_time.as_secs_f64(),
            "store_creation_seconds": open_time.as_secs_f64(),
            "size_vs_zstd": first_pack_bytes as f64 / zstd_size as f64},
        "second_ingest": {"changed_pages": changed.len(), "changed_zstd_stream_bytes": changed_zstd,
            "changed_zstd_per_page_bytes": per_page_zstd,
            "full": {"seconds": full2_time.as_secs_f64(), "mb_per_s": mbps(size, full2_time), "stored_bytes": full2.new_stored_bytes},
            "with_dirty_set": {"seconds": inc_time.as_secs_f64(), "stored_bytes": inc.new_stored_bytes, "hashed_pages": inc.hashed_pages},
            "increment_vs_changed_zstd": full2.new_stored_bytes as f64 / changed_zstd as f64,
            "dirty_set_speedup": full2_time.as_secs_f64() / inc_time.as_secs_f64()},
        "sparse_checkpoint": {"dirty_pages": sparse.len(), "full_seconds": full3_time.as_secs_f64(),
            "with_dirty_set_seconds": inc3_time.as_secs_f64(), "dirty_set_speedup": full3_time.as_secs_f64() / inc3_time.as_secs_f64()},
        "reads": {"random_page_p50_us": us(percentile(&lat, 50.0)), "random_page_p99_us": us(percentile(&lat, 99.0)),
            "sequential_materialize_mb_per_s": mbps(size, seq_time)},
    });
    if as_json {
        println!("{report}");
        return Ok(());
    }
    let r = &report;
    println!("store benchmark on {} MiB captured images (median of {reps})", size >> 20);
    println!("{:<44} {:>10} {:>10} {:>12}", "", "seconds", "MB/s", "bytes");
    println!(
        "{:<44} {:>10.3} {:>10.0} {:>12}",
        "zstd -1 -T0 mem-a (baseline)",
        zstd_time.as_secs_f64(),
        mbps(size, zstd_time),
        zstd_size
    );
    println!(
        "{:<44} {:>10.3} {:>10.0}",
        "zstd -1 -T0 mem-a, then fsync of its output",
        zstd_sync_time.as_secs_f64(),
        mbps(size, zstd_sync_time)
    );
    println!("{:<44} {:>10.3}", "creating a store (once per store)", open_time.as_secs_f64());
    println!(
        "{:<44} {:>10.3} {:>10.0} {:>12}",
        "snapfork ingest mem-a (fresh store)",
        ingest_time.as_secs_f64(),
        mbps(size, ingest_time),
        first_pack_bytes
    );
    println!(
        "{:<44} {:>10.3} {:>10.0} {:>12}",
        "snapfork ingest mem-b onto mem-a (full)",
        full2_time.as_secs_f64(),
        mbps(size, full2_time),
        full2.new_stored_bytes
    );
    println!(
        "{:<44} {:>10.3} {:>10} {:>12}",
        "snapfork ingest mem-b with dirty-page set",
        inc_time.as_secs_f64(),
        "",
        inc.new_stored_bytes
    );
    println!("{:<44} {:>10} {:>10} {:>12}", "zstd -1 of mem-b's changed pages (stream)", "", "", changed_zstd);
    println!("{:<44} {:>10} {:>10} {:>12}", "zstd -1 of mem-b's changed pages (per page)", "", "", per_page_zstd);
    println!("{:<44} {:>10.3}", "1% changed: full re-ingest onto parent", full3_time.as_secs_f64());
    println!("{:<44} {:>10.3}", "1% changed: ingest with dirty-page set", inc3_time.as_secs_f64());
    println!("{:<44} {:>10.0}", "snapfork sequential materialize (MB/s)", mbps(size, seq_time));
    println!("random page read p50 {:.1} us, p99 {:.1} us", us(percentile(&lat, 50.0)), us(percentile(&lat, 99.0)));
    println!(
        "ratios: ingest speed vs zstd {:.2}x (vs zstd + fsync {:.2}x; CPU {:.2}x), size vs zstd {:.2}x, increment vs changed-pages zstd {:.2}x, dirty-set speedup {:.1}x (23% changed) {:.1}x (1% changed)",
        r["first_ingest"]["speed_vs_zstd"].as_f64().unwrap_or(0.0),
        r["first_ingest"]["speed_vs_durable_zstd"].as_f64().unwrap_or(0.0),
        r["first_ingest"]["cpu_vs_zstd"].as_f64().unwrap_or(0.0),
        r["first_ingest"]["size_vs_zstd"].as_f64().unwrap_or(0.0),
        r["second_ingest"]["increment_vs_changed_zstd"].as_f64().unwrap_or(0.0),
        r["second_ingest"]["dirty_set_speedup"].as_f64().unwrap_or(0.0),
        r["sparse_checkpoint"]["dirty_set_speedup"].as_f64().unwrap_or(0.0),
    );
    Ok(())
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn zstd(input: &Path, output: &Path) -> anyhow::Result<()> {
    let status = Command::new("zstd")
        .args(["-1", "-T0", "-q", "-f", "-o"])
        .arg(output)
        .arg(input)
        .stdout(Stdio::null())
        .status()
        .context("run zstd (scripts/setup.sh installs it)")?;
    if !status.success() {
        bail!("zstd failed: {status}");
    }
    Ok(())
}

fn dir_size(dir: &Path) -> anyhow::Result<u64> {
    let mut n = 0;
    for e in fs::read_dir(dir)? {
        n += e?.metadata()?.len();
    }
    Ok(n)
}
