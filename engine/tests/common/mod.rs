//! Helpers shared by the engine's end-to-end tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use snapfork_engine::{DriverConfig, Engine, EngineOptions, GvisorConfig, RunSpec};
use snapfork_store::{OpenOptions, Store};

/// The sandboxed program: `i` lives in the shell's memory, the file is its trace.
pub const COUNTER: &str = "i=0; step=1; trap 'i=-999999' USR1; \
     trap 'step=$(cat /workspace/step)' USR2; \
     while true; do i=$((i+step)); echo $i >> /workspace/counter.log; sleep 0.1; done";

/// True when the test may run; false (after a loud message) when it must be skipped, which is only
/// allowed with SNAPFORK_ALLOW_SKIP=1; otherwise panics.
pub fn require(test: &str, need_runsc: bool) -> bool {
    let root = nix::unistd::Uid::effective().is_root();
    let runsc = !need_runsc
        || std::process::Command::new("runsc").arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
    if root && runsc {
        return true;
    }
    let why = if !root { "needs root" } else { "needs runsc (scripts/setup.sh)" };
    eprintln!("!!!!!!!! {test}: {why}: NOT RUN !!!!!!!!");
    if std::env::var("SNAPFORK_ALLOW_SKIP").as_deref() == Ok("1") {
        return false;
    }
    panic!("{test} {why}; set SNAPFORK_ALLOW_SKIP=1 to skip");
}

/// A fresh store and engine in a temp dir (kept alive by the returned TempDir).
pub fn new_engine() -> (tempfile::TempDir, Engine) {
    new_engine_trusting(&[])
}

/// Like [`new_engine`], with host directories that imported snapshots may show their sandboxes.
pub fn new_engine_trusting(trusted_host_dirs: &[PathBuf]) -> (tempfile::TempDir, Engine) {
    let dir = tempfile::Builder::new().prefix("sf-engine-").tempdir_in("/var/tmp").unwrap();
    let engine = engine_trusting_at(dir.path(), trusted_host_dirs);
    (dir, engine)
}

/// The engine of the store in `dir/store`, its state in `dir/engine`: opened again, it finds
/// what an earlier engine there left (as a restarted daemon does).
pub fn engine_at(dir: &Path) -> Engine {
    engine_trusting_at(dir, &[])
}

fn engine_trusting_at(dir: &Path, trusted_host_dirs: &[PathBuf]) -> Engine {
    engine_at_with(dir, |o| o.trusted_host_dirs = trusted_host_dirs.to_vec())
}

/// [`engine_at`] with its options changed by `change`.
pub fn engine_at_with(dir: &Path, change: impl FnOnce(&mut EngineOptions)) -> Engine {
    let store = Store::open(dir.join("store"), OpenOptions::default()).unwrap();
    let mut opts = EngineOptions { state_dir: dir.join("engine"), ..EngineOptions::for_store(&store) };
    change(&mut opts);
    Engine::open(store, opts).unwrap()
}

/// A busybox rootfs under `dir`.
pub fn rootfs(dir: &Path) -> PathBuf {
    let r = dir.join("rootfs");
    snapfork_engine::gvisor::make_busybox_rootfs(&r).unwrap();
    r
}

/// The counter sandbox spec.
pub fn counter_spec(name: &str, rootfs: &Path) -> RunSpec {
    let cfg = GvisorConfig::new(rootfs.to_path_buf(), vec!["/bin/sh".into(), "-c".into(), COUNTER.into()]);
    RunSpec { name: name.into(), driver: DriverConfig::Gvisor(cfg), workspace: None }
}

/// The numbers in a counter log.
pub fn lines(path: &Path) -> Vec<i64> {
    std::fs::read_to_string(path).unwrap_or_default().lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// Waits until `path` holds at least `n` numbers.
pub async fn wait_lines(path: &Path, n: usize) -> Vec<i64> {
    for _ in 0..400 {
        let l = lines(path);
        if l.len() >= n {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{} never reached {n} lines: {:?}", path.display(), lines(path));
}

/// Removes every sandbox of the engine (tests must not leave sandboxes running).
pub async fn cleanup(engine: &Engine) {
    for s in engine.ls().await.unwrap_or_default() {
        let _ = engine.rm(&s.name).await;
    }
}

/// Kills every sandbox of an engine when dropped, also when a test panics.
pub struct Guard(pub Engine);

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.kill_all_blocking();
    }
}
