//! Shared pieces of the benchmark binaries: inputs, timing and reporting.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Where captured memory images are kept between runs (they are large and not committed).
pub fn images_dir() -> PathBuf {
    std::env::var_os("SNAPFORK_BENCH_IMAGES")
        .map_or_else(|| PathBuf::from("/var/tmp/snapfork-bench-images"), PathBuf::from)
}

/// mem-a.raw and mem-b.raw of `size_mib`, captured from real processes by
/// ../shared/tools/capture-memimg.py (needs root) unless already there.
pub fn captured_images(size_mib: u64) -> anyhow::Result<(PathBuf, PathBuf)> {
    let dir = images_dir().join(format!("{size_mib}mib"));
    let (a, b) = (dir.join("mem-a.raw"), dir.join("mem-b.raw"));
    if a.exists() && b.exists() {
        return Ok((a, b));
    }
    let tool = find_capture_tool()?;
    std::fs::create_dir_all(&dir)?;
    eprintln!("capturing {size_mib} MiB memory images with {} ...", tool.display());
    let status = Command::new("python3")
        .arg(&tool)
        .arg(&dir)
        .args(["--size-mib", &size_mib.to_string()])
        .status()
        .context("run capture-memimg.py")?;
    if !status.success() {
        bail!("capture-memimg.py failed ({status}); it needs root");
    }
    Ok((a, b))
}

/// ../shared/tools/capture-memimg.py, looked up from the workspace root upwards.
pub fn find_capture_tool() -> anyhow::Result<PathBuf> {
    let mut dir = Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf();
    loop {
        let candidate = dir.join("shared/tools/capture-memimg.py");
        if candidate.exists() {
            return Ok(candidate);
        }
        if !dir.pop() {
            bail!("shared/tools/capture-memimg.py not found beside the project");
        }
    }
}

/// Runs `f` `reps` times and returns the median duration and the last result.
pub fn median<T>(reps: usize, mut f: impl FnMut() -> anyhow::Result<T>) -> anyhow::Result<(Duration, T)> {
    let mut times = Vec::with_capacity(reps);
    let mut last = None;
    for _ in 0..reps {
        let t = Instant::now();
        last = Some(f()?);
        times.push(t.elapsed());
    }
    times.sort();
    Ok((times[times.len() / 2], last.context("no repetitions")?))
}

/// `sync(2)`: a timed step that follows starts with nothing of an earlier one's left to write back.
pub fn sync() {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
}

/// MB/s (10^6 bytes per second).
pub fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

/// Percentile `p` (0..=100) of sorted `v`.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p / 100.0).round() as usize;
    sorted[i]
}

/// CPU seconds (user + system) used so far by this process (`children`: by its waited-for
/// children). Under a noisy machine CPU time is steadier than wall time.
pub fn cpu_seconds(children: bool) -> f64 {
    let who = if children { libc::RUSAGE_CHILDREN } else { libc::RUSAGE_SELF };
    // SAFETY: getrusage writes into the zeroed struct we pass; nothing else is touched.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; `u` outlives the call.
    if unsafe { libc::getrusage(who, &mut u) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(u.ru_utime) + tv(u.ru_stime)
}
