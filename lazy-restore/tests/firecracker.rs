//! End-to-end: a separate process does Firecracker's side of the handshake byte for byte (and in
//! one test runs a KVM guest on the registered memory); the server restores from an image.

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use snapfork_lazy_restore::client::{FakeVm, RegionSpec, send_with_fds};
use snapfork_lazy_restore::{CachedSource, EndReason, PageSource, RawFileSource, ServerEvent, ServerOptions};

const T: Duration = Duration::from_secs(60);

fn raw_source(path: &std::path::Path) -> Arc<dyn PageSource> {
    let raw: Arc<dyn PageSource> = Arc::new(RawFileSource::open(path, PAGE).unwrap());
    Arc::new(CachedSource::new(raw, 64 << 20))
}

#[test]
fn every_release_shape_restores_exact_content_concurrently() {
    if !require_root() {
        return;
    }
    let dir = tempdir();
    let image = dir.path().join("mem.raw");
    make_image(&image, 3072); // 12 MiB
    let srv = TestServer::start(dir.path().join("uffd.sock"), raw_source(&image), ServerOptions::default());
    // Two regions: the second starts where the first ends in the file, like Firecracker's layout.
    let regions = json!([
        {"size": 8 << 20, "offset": 0},
        {"size": 4 << 20, "offset": 8 << 20}
    ]);
    let shapes = [("1.1", 0), ("1.7", 0), ("1.12", 0), ("future", 2)];
    let children: Vec<_> = shapes
        .iter()
        .map(|(s, extra)| {
            spawn_child(json!({
                "role": "fc", "socket": srv.socket, "image": image, "regions": regions,
                "shape": s, "extra_fds": extra,
            }))
        })
        .collect();
    for c in children {
        let (status, res) = wait_child(c);
        assert!(status.success(), "child failed: {status:?} {res:?}");
    }
    let (ended, refused) = srv.wait_ended(4, T);
    assert!(refused.is_empty(), "{refused:?}");
    for r in &ended {
        assert_eq!(r.end, EndReason::PeerExited, "{r:?}");
        // Data pages were copied, zero pages mapped, never copied.
        assert!(r.stats.pages_copied > 0 && r.stats.pages_zeroed > 0);
        assert_eq!(r.stats.pages_copied + r.stats.pages_zeroed, 3072);
    }
    srv.stop();
}

#[test]
fn handshake_over_one_kib_with_many_regions() {
    if !require_root() {
        return;
    }
    let dir = tempdir();
    let image = dir.path().join("mem.raw");
    make_image(&image, 2048);
    let srv = TestServer::start(dir.path().join("uffd.sock"), raw_source(&image), ServerOptions::default());
    // 64 regions of 128 KiB, listed out of file order: ~8 KiB of JSON.
    let regions: Vec<_> = (0..64u64).rev().map(|i| json!({"size": 128 << 10, "offset": i * (128 << 10)})).collect();
    let child = spawn_child(json!({
        "role": "fc", "socket": srv.socket, "image": image, "regions": regions, "shape": "1.12",
    }));
    let (status, res) = wait_child(child);
    assert!(status.success(), "{status:?} {res:?}");
    match srv.next(T) {
        ServerEvent::Started { regions, .. } => assert_eq!(regions.len(), 64),
        other => panic!("{other:?}"),
    }
    let (ended, _) = srv.wait_ended(1, T);
    assert_eq!(ended[0].end, EndReason::PeerExited);
    srv.stop();
}

#[test]
fn remove_after_madvise_dontneed_reads_zeros() {
    if !require_root() {
        return;
    }
    let dir = tempdir();
    let image = dir.path().join("mem.raw");
    make_image(&image, 1024);
    let srv = TestServer::start(dir.path().join("uffd.sock"), raw_source(&image), ServerOptions::default());
    let child = spawn_child(json!({
        "role": "remove", "socket": srv.socket, "image": image,
        "regions": [{"size": 4 << 20, "offset": 0}],
    }));
    let (status, res) = wait_child(child);
    assert!(status.success(), "{status:?} {res:?}");
    let (ended, _) = srv.wait_ended(1, T);
    assert!(ended[0].stats.pages_removed >= 512, "{:?}", ended[0].stats);
    srv.stop();
}

/// Makes sure `n` free 2 MiB huge pages exist (root can grow the pool).
fn ensure_hugepages(n: u64) -> bool {
    let (total, free) = (meminfo("HugePages_Total:"), meminfo("HugePages_Free:"));
    if free < n {
        let _ = std::fs::write("/proc/sys/vm/nr_hugepages", format!("{}", total + n - free));
    }
    meminfo("HugePages_Free:") >= n
}

/// An 8 MiB image served from a raw file, with 8 free huge pages for a client to map it in.
fn hugetlb_setup() -> (tempfile::TempDir, std::path::PathBuf, TestServer) {
    assert!(ensure_hugepages(8), "could not reserve 8 huge pages");
    let dir = tempdir();
    let image = dir.path().join("mem.raw");
    make_image(&image, 2048);
    let srv = TestServer::start(dir.path().join("uffd.sock"), raw_source(&image), ServerOptions::default());
    (dir, image, srv)
}

#[test]
fn hugetlb_2mib_regions() {
    if !require_root() {
        return;
    }
    let (_dir, image, srv) = hugetlb_setup();
    let child = spawn_child(json!({
        "role": "fc", "socket": srv.socket, "image": image, "shape": "1.12",
        "regions": [
            {"size": 4 << 20, "offset": 4 << 20, "page_size": 2 << 20},
            {"size": 4 << 20, "offset": 0, "page_size": 2 << 20}
        ],
    }));
    let (status, res) = wait_child(child);
    assert!(status.success(), "{status:?} {res:?}");
    let (ended, _) = srv.wait_ended(1, T);
    assert_eq!(ended[0].end, EndReason::PeerExited);
    assert_eq!(ended[0].stats.pages_copied + ended[0].stats.pages_zeroed, 4, "{:?}", ended[0].stats);
    srv.stop();
}

/// Huge pages the guest gives back (madvise DONTNEED on hugetlb, as a balloon does) read zero
/// when touched again: the fault on one is answered with a zero huge page (it used to be
/// skipped as "removed", leaving the guest waiting forever).
#[test]
fn hugetlb_pages_given_back_read_zero() {
    if !require_root() {
        return;
    }
    let (_dir, image, srv) = hugetlb_setup();
    let child = spawn_child(json!({
        "role": "remove", "socket": srv.socket, "image": image,
        "regions": [{"size": 8 << 20, "offset": 0, "page_size": 2 << 20}],
    }));
    let (status, res) = wait_child(child);
    assert!(status.success(), "{status:?} {res:?}");
    let (ended, _) = srv.wait_ended(1, T);
    assert_eq!(ended[0].end, EndReason::PeerExited);
    srv.stop();
}

/// The huge-page pool cut down to `free` free pages while it lives, then put back. Tests that
/// change the pool run one at a time (`.config/nextest.toml`, group `hugetlb`).
struct ScarcePool(u64);

impl ScarcePool {
    fn leaving(free: u64) -> Self {
        assert!(ensure_hugepages(free), "could not reserve {free} huge pages");
        let overcommit = std::fs::read_to_string("/proc/sys/vm/nr_overcommit_hugepages").unwrap();
        assert_eq!(overcommit.trim(), "0", "surplus huge pages would hide an empty pool");
        let (total, now_free) = (meminfo("HugePages_Total:"), meminfo("HugePages_Free:"));
        std::fs::write("/proc/sys/vm/nr_hugepages", format!("{}", total - (now_free - free))).unwrap();
        assert_eq!(meminfo("HugePages_Free:"), free);
        ScarcePool(total)
    }
}

impl Drop for ScarcePool {
    fn drop(&mut self) {
        let _ = std::fs::write("/proc/sys/vm/nr_hugepages", self.0.to_string());
    }
}

fn meminfo(key: &str) -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    meminfo.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()).unwrap()
}

/// A VM whose memory the server cannot install (UFFDIO_COPY fails: here no huge page is left
/// in the pool) is killed, as the kernel's SIGBUS would end it, instead of being left waiting
/// for its page forever; the report says why.
#[test]
fn hugetlb_pool_exhausted_kills_the_vm_rather_than_leaving_it_waiting() {
    if !require_root() {
        return;
    }
    let (_dir, image, srv) = hugetlb_setup();
    let _pool = ScarcePool::leaving(2);
    let child = spawn_child(json!({
        "role": "fc", "socket": srv.socket, "image": image,
        "regions": [{"size": 8 << 20, "offset": 0, "page_size": 2 << 20}],
    }));
    let (status, res) = wait_child_for(child, T);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL), "the VM was not killed: {status:?} {res:?}");
    let (ended, _) = srv.wait_ended(1, T);
    let EndReason::Failed { message } = &ended[0].end else { panic!("{:?}", ended[0]) };
    assert!(message.contains("pool exhausted") && message.contains("the VM was killed"), "{message}");
    assert_eq!(ended[0].stats.pages_copied, 2, "{:?}", ended[0].stats);
    srv.stop();
}

/// A cgroup-v1 memory cgroup with `limit` bytes and the OOM killer disabled (Docker's
/// `--oom-kill-disable`): its tasks wait for memory instead of being killed. Removed on drop.
struct MemCgroup(std::path::PathBuf);

impl MemCgroup {
    fn new(limit: u64) -> Self {
        let root = std::path::Path::new("/sys/fs/cgroup/memory");
        assert!(
            root.join("memory.oom_control").exists(),
            "this test needs the cgroup-v1 memory controller at {} (oom_kill_disable)",
            root.display()
        );
        let dir = root.join(format!("snapfork-test-{}", std::process::id()));
        std::fs::create_dir(&dir).unwrap();
        let cg = MemCgroup(dir);
        cg.set_limit(limit);
        std::fs::write(cg.0.join("memory.oom_control"), "1").unwrap();
        cg
    }

    fn set_limit(&self, bytes: u64) {
        std::fs::write(self.0.join("memory.limit_in_bytes"), bytes.to_string()).unwrap();
    }

    /// Charges refused because the cgroup was full.
    fn failcnt(&self) -> u64 {
        std::fs::read_to_string(self.0.join("memory.failcnt")).unwrap().trim().parse().unwrap()
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        // Its last task may take a moment to leave after exiting.
        for _ in 0..100 {
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A VM in a full memory cgroup (its OOM killer disabled) waits for memory, as its own page
/// faults would, rather than being dropped by the server; once the cgroup has room again it runs
/// on and reads every page right.
#[test]
fn a_vm_whose_memory_cgroup_is_full_waits_for_memory_then_runs_on() {
    if !require_root() {
        return;
    }
    let dir = tempdir();
    let image = dir.path().join("mem.raw");
    make_image(&image, 16384); // 64 MiB, some 50 MiB of it data pages
    let srv = TestServer::start(dir.path().join("uffd.sock"), raw_source(&image), ServerOptions::default());
    let cg = MemCgroup::new(24 << 20);
    let mut child = spawn_child(json!({
        "role": "fc", "socket": srv.socket, "image": image, "cgroup": cg.0,
        "regions": [{"size": 64 << 20, "offset": 0}],
    }));
    let deadline = Instant::now() + T;
    while cg.failcnt() == 0 {
        assert!(child.try_wait().unwrap().is_none(), "the VM ended before its cgroup filled up");
        assert!(Instant::now() < deadline, "the VM's cgroup never filled up");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    if child.try_wait().unwrap().is_some() {
        let (status, res) = wait_child(child);
        panic!("the VM did not wait for memory: {status:?} {res:?}");
    }
    cg.set_limit(1 << 30);
    let (status, res) = wait_child_for(child, T);
    assert!(status.success(), "the VM did not run on once its cgroup had room: {status:?} {res:?}");
    let (ended, _) = srv.wait_ended(1, T);
    assert_eq!(ended[0].end, EndReason::PeerExited, "{:?}", ended[0]);
    assert!(ended[0].stats.memory_waits > 0, "{:?}", ended[0].stats);
    srv.stop();
}

/// With `--fill`, a VM whose memory cgroup fills up has its fill stopped, for good: the room is
/// the guest's own faults' to take, not speculation's, and once there is room again the guest's
/// pages are served and the fill stays off.
#[test]
fn a_full_memory_cgroup_stops_the_fill_and_leaves_its_room_to_the_guest() {
    if !require_root() {
        return;
    }
    let dir = tempdir();
    let image = dir.path().join("mem.raw");
    make_image(&image, 16384);
    let opts = ServerOptions {
        restore: snapfork_lazy_restore::RestoreOptions { fill: true, ..Default::default() },
        ..Default::default()
    };
    let srv = TestServer::start(dir.path().join("uffd.sock"), raw_source(&image), opts);
    let cg = MemCgroup::new(24 << 20);
    // The guest starts once the fill has filled its cgroup, and writes pages near the top.
    let pages: Vec<u64> = (16000..16016).collect();
    let mut child = spawn_child(json!({
        "role": "write", "socket": srv.socket, "image": image, "cgroup": cg.0, "start_delay_ms": 1500,
        "regions": [{"size": 64 << 20, "offset": 0}], "write": pages,
    }));
    let deadline = Instant::now() + T;
    while cg.failcnt() == 0 {
        assert!(child.try_wait().unwrap().is_none(), "the VM ended before its cgroup filled up");
        assert!(Instant::now() < deadline, "the fill never filled the VM's cgroup");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(2000));
    cg.set_limit(1 << 30);
    let (status, res) = wait_child_for(child, T);
    assert!(status.success(), "{status:?} {res:?}");
    let (ended, _) = srv.wait_ended(1, T);
    let st = &ended[0].stats;
    assert_eq!(ended[0].end, EndReason::PeerExited, "{:?}", ended[0]);
    // The fill got no further than the cgroup's 24 MiB: not to the image's ~50 MiB of data.
    assert!(st.pages_copied * 4096 < 28 << 20, "the fill went on: {st:?}");
    assert!(!st.prefetch_done, "{st:?}");
    srv.stop();
}

/// A VM that unmaps part of its memory without an event goes on being served: installs that
/// run into the unmapped part (read-ahead past its edge) are retried page by page and the
/// pages no longer mapped are left alone, rather than the restore ending with the VM waiting
/// for its next page forever.
#[test]
fn memory_unmapped_without_an_event_is_left_alone_and_the_rest_served() {
    if !require_root() {
        return;
    }
    let dir = tempdir();
    let image = dir.path().join("mem.raw");
    make_image(&image, 4096);
    let srv = TestServer::start(dir.path().join("uffd.sock"), raw_source(&image), ServerOptions::default());
    let child = spawn_child(json!({
        "role": "unmap", "socket": srv.socket, "image": image,
        "regions": [{"size": 16 << 20, "offset": 0}],
    }));
    let (status, res) = wait_child_for(child, T);
    assert!(status.success(), "{status:?} {res:?}");
    let (ended, _) = srv.wait_ended(1, T);
    assert_eq!(ended[0].end, EndReason::PeerExited, "{:?}", ended[0]);
    srv.stop();
}

#[test]
fn killed_client_leaves_others_served_and_leaks_nothing() {
    if !require_root() {
        return;
    }
    let dir = tempdir();
    let image = dir.path().join("mem.raw");
    make_image(&image, 4096);
    let threads0 = thread_count();
    let fds0 = fd_count();
    let srv = TestServer::start(dir.path().join("uffd.sock"), raw_source(&image), ServerOptions::default());
    let regions = json!([{"size": 16 << 20, "offset": 0}]);
    let mut victim = spawn_child(json!({
        "role": "hang", "socket": srv.socket, "image": image, "regions": regions,
        "touch_pages": 300,
    }));
    // Wait until the victim has been served its first pages.
    let mut line = String::new();
    {
        use std::io::BufRead;
        let mut out = std::io::BufReader::new(victim.stdout.as_mut().unwrap());
        while !line.contains("CHILD_RESULT") {
            line.clear();
            assert!(out.read_line(&mut line).unwrap() > 0, "victim exited early");
        }
    }
    let other = spawn_child(json!({
        "role": "fc", "socket": srv.socket, "image": image, "regions": regions,
    }));
    victim.kill().unwrap();
    let _ = victim.wait();
    drop(victim);
    let (status, res) = wait_child(other);
    assert!(status.success(), "{status:?} {res:?}");
    let (ended, _) = srv.wait_ended(2, T);
    assert!(ended.iter().all(|r| r.end == EndReason::PeerExited), "{ended:?}");
    assert!(ended.iter().any(|r| r.stats.pages_copied + r.stats.pages_zeroed >= 300));
    srv.stop();
    // Every serving thread and descriptor is gone once the server returns.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(thread_count(), threads0, "threads leaked");
    assert_eq!(fd_count(), fds0, "descriptors leaked");
}

#[test]
fn hostile_handshakes_are_refused_and_disturb_no_other_vm() {
    if !require_root() {
        return;
    }
    let dir = tempdir();
    let image = dir.path().join("mem.raw");
    make_image(&image, 1024); // 4 MiB
    let fds0 = fd_count();
    let srv = TestServer::start(
        dir.path().join("uffd.sock"),
        raw_source(&image),
        ServerOptions { handshake_timeout: Duration::from_millis(500), ..Default::default() },
    );
    // A well-behaved VM runs alongside the hostile ones.
    let good = spawn_child(json!({
        "role": "fc", "socket": srv.socket, "image": image,
        "regions": [{"size": 4 << 20, "offset": 0}],
    }));
    let vm = FakeVm::new(&[RegionSpec { size: 1 << 20, offset: 0, page_size: 4096 }]).unwrap();
    let base = vm.regions[0].ptr as u64;
    let uffd = vm.uffd.as_raw_fd();
    let null = std::fs::File::open("/dev/null").unwrap();
    let n = null.as_raw_fd();
    let region = |size: u64, offset: u64| {
        format!(
            r#"{{"base_host_virt_addr":{base},"size":{size},"offset":{offset},"page_size":4096,"page_size_kib":4096}}"#
        )
    };
    let ok = format!("[{}]", region(1 << 20, 0));
    // A userfaultfd of its own that never asked for REMOVE events.
    let no_remove =
        userfaultfd::UffdBuilder::new().close_on_exec(true).non_blocking(true).user_mode_only(false).create().unwrap();
    let cases: Vec<(&str, String, Vec<i32>, bool)> = vec![
        ("bad json", "[{\"base_host_virt_addr\": 1,".to_string() + "]", vec![uffd], false),
        ("not an array", r#"{"regions": []}"#.into(), vec![uffd], false),
        ("empty array", "[]".into(), vec![uffd], false),
        ("wrong size", format!("[{}]", region(1000, 0)), vec![uffd], false),
        ("beyond the image", format!("[{}]", region(1 << 20, 4 << 20)), vec![uffd], false),
        (
            "overlapping regions",
            format!(
                r#"[{},{{"base_host_virt_addr":{},"size":1048576,"offset":524288,"page_size":4096}}]"#,
                region(1 << 20, 0),
                base + (4 << 20)
            ),
            vec![uffd],
            false,
        ),
        ("bad page size", ok.replace("4096", "8192"), vec![uffd], false),
        ("no fd", ok.clone(), vec![], false),
        ("four fds", ok.clone(), vec![uffd, n, n, n], false),
        ("no userfaultfd", ok.clone(), vec![n], false),
        ("no EVENT_REMOVE", ok.clone(), vec![no_remove.as_raw_fd()], false),
        ("trailing garbage", format!("{ok}xyz"), vec![uffd], false),
        ("truncated then closed", ok[..ok.len() / 2].to_string(), vec![uffd], true),
        ("silent", String::new(), vec![], false),
    ];
    let mut streams = Vec::new();
    for (name, body, fds, close) in &cases {
        let s = UnixStream::connect(&srv.socket).unwrap();
        if !body.is_empty() || !fds.is_empty() {
            send_with_fds(&s, body.as_bytes(), fds).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        if *close {
            drop(s);
        } else {
            streams.push(s);
        }
    }
    let (status, res) = wait_child(good);
    assert!(status.success(), "{status:?} {res:?}");
    let mut refused = Vec::new();
    let mut ended = 0;
    let deadline = std::time::Instant::now() + T;
    while (refused.len() < cases.len() || ended < 1) && std::time::Instant::now() < deadline {
        match srv.next(T) {
            ServerEvent::Refused { error, pid } => {
                assert_eq!(pid, Some(std::process::id() as i32));
                refused.push(error)
            }
            ServerEvent::Ended(r) => {
                assert_eq!(r.end, EndReason::PeerExited);
                ended += 1;
            }
            ServerEvent::Started { pid, .. } => {
                assert_ne!(pid, std::process::id() as i32, "a hostile handshake was accepted")
            }
            ServerEvent::WorkingSet { .. } => {}
        }
    }
    assert_eq!(refused.len(), cases.len(), "{refused:#?}");
    let all = refused.join("\n");
    for needle in [
        "not a JSON array",
        "empty region array",
        "not a positive multiple",
        "beyond the image",
        "overlap in the image",
        "unsupported page size",
        "no file descriptor",
        "4 file descriptors",
        "none of the descriptors is a userfaultfd",
        "without UFFD_FEATURE_EVENT_REMOVE",
        "trailing bytes",
        "no handshake within",
    ] {
        assert!(all.contains(needle), "no refusal mentions {needle:?}:\n{all}");
    }
    drop(streams);
    srv.stop();
    drop(vm);
    drop(null);
    drop(no_remove);
    assert_eq!(fd_count(), fds0, "descriptors leaked");
}

#[test]
fn kvm_guest_faults_are_served() {
    if !require_root() {
        return;
    }
    assert!(std::path::Path::new("/dev/kvm").exists(), "/dev/kvm missing");
    let dir = tempdir();
    let image = dir.path().join("mem.raw");
    make_image(&image, 2048); // 8 MiB
    let srv = TestServer::start(dir.path().join("uffd.sock"), raw_source(&image), ServerOptions::default());
    // Region 0 (the guest's memory) is the second half of the file: offsets are honoured.
    let child = spawn_child(json!({
        "role": "kvm", "socket": srv.socket, "image": image, "shape": "1.12",
        "regions": [{"size": 4 << 20, "offset": 4 << 20}],
    }));
    let (status, res) = wait_child(child);
    assert!(status.success(), "{status:?} {res:?}");
    let bytes = std::fs::read(&image).unwrap();
    let want = expected_checksum(&bytes[4 << 20..]);
    assert_eq!(res.unwrap()["checksum"].as_u64().unwrap() as u32, want);
    let (ended, _) = srv.wait_ended(1, T);
    // Only KVM touched guest memory: every page was installed through faults KVM took (the
    // guest reads sequentially, so read-ahead serves several pages per fault).
    let st = &ended[0].stats;
    assert!(st.faults > 0, "{st:?}");
    assert_eq!(st.pages_copied + st.pages_zeroed, 1024, "{st:?}");
    srv.stop();
}

#[test]
fn working_set_is_recorded_in_order_and_prefetched_next_time() {
    if !require_root() {
        return;
    }
    let dir = tempdir();
    let image = dir.path().join("mem.raw");
    make_image(&image, 2048);
    let source = raw_source(&image);
    let pattern: Vec<u64> = (0..200u64).map(|i| (i * 37) % 2048).collect();
    let regions = json!([{"size": 8 << 20, "offset": 0}]);
    let srv = TestServer::start(dir.path().join("a.sock"), source.clone(), ServerOptions::default());
    let c = spawn_child(json!({
        "role": "fc", "socket": srv.socket, "image": image, "regions": regions,
        "touch": pattern,
    }));
    let (status, res) = wait_child(c);
    assert!(status.success(), "{status:?} {res:?}");
    let (ended, _) = srv.wait_ended(1, T);
    srv.stop();
    let ws = &ended[0].working_set;
    // The recorded order starts with the touch pattern (zero pages included: they fault too).
    assert_eq!(&ws[..pattern.len()], &pattern[..]);
    // Then the sequential comparison faults the rest (with read-ahead: fewer faults than pages).
    assert!(ws.len() > pattern.len() && ws.len() <= 2048, "{}", ws.len());
    // Second restore prefetches the first 200 recorded pages.
    let srv = TestServer::start(
        dir.path().join("b.sock"),
        source,
        ServerOptions {
            restore: snapfork_lazy_restore::RestoreOptions { prefetch: ws[..200].to_vec(), ..Default::default() },
            ..Default::default()
        },
    );
    // The guest starts its touches after a pause long enough for the prefetch to have run
    // (otherwise its demand faults may win every page, and there is nothing to observe).
    let c = spawn_child(json!({
        "role": "fc", "socket": srv.socket, "image": image, "regions": regions,
        "touch": pattern, "start_delay_ms": 500,
    }));
    let (status, res) = wait_child(c);
    assert!(status.success(), "{status:?} {res:?}");
    let (ended, _) = srv.wait_ended(1, T);
    let s = &ended[0].stats;
    assert!(s.pages_prefetched > 0, "{s:?}");
    assert_eq!(s.pages_copied + s.pages_zeroed, 2048, "{s:?}");
    // Touched pages: everything was installed, so everything may differ.
    assert_eq!(ended[0].touched.len(), 2048);
    srv.stop();
}

/// A VM that runs on reports its working set once its window has passed (what it faulted on
/// so far, in order), not only when it exits; one that exits sooner reports it at its end only.
#[test]
fn a_long_running_vm_reports_its_working_set_when_its_window_closes() {
    if !require_root() {
        return;
    }
    let dir = tempdir();
    let image = dir.path().join("mem.raw");
    make_image(&image, 1024);
    let window = Duration::from_millis(400);
    let opts = ServerOptions { working_set_window: window, ..Default::default() };
    let srv = TestServer::start(dir.path().join("ws.sock"), raw_source(&image), opts);
    let mut vm = spawn_child(json!({
        "role": "hang", "socket": srv.socket, "image": image,
        "regions": [{"size": 4 << 20, "offset": 0}], "touch_pages": 64,
    }));
    let _reap = KillOnPanic(vec![vm.id() as i32]);
    let started = std::time::Instant::now();
    assert!(matches!(srv.next(T), ServerEvent::Started { .. }));
    let pages = match srv.next(T) {
        ServerEvent::WorkingSet { pages, .. } => pages,
        other => panic!("expected the working set, got {other:?}"),
    };
    assert!(started.elapsed() >= window);
    assert!(vm.try_wait().unwrap().is_none(), "reported only because the VM is still running");
    // The guest read pages 0..64 in order: those first, in that order (then what read-ahead
    // installed past them, which counts too).
    assert_eq!(pages[..64], (0..64).collect::<Vec<u64>>()[..], "{pages:?}");
    assert!(pages.windows(2).all(|w| w[0] < w[1]), "{pages:?}");
    vm.kill().unwrap();
    vm.wait().unwrap();
    let (ended, _) = srv.wait_ended(1, T);
    assert_eq!(ended[0].working_set, pages, "nothing faulted after the window in this guest");

    // A VM that ends inside its window: no WorkingSet event, its set comes with its end.
    let srv2 = TestServer::start(
        dir.path().join("ws2.sock"),
        raw_source(&image),
        ServerOptions { working_set_window: Duration::from_secs(600), ..Default::default() },
    );
    let c = spawn_child(json!({
        "role": "fc", "socket": srv2.socket, "image": image, "regions": [{"size": 4 << 20, "offset": 0}],
    }));
    let (status, res) = wait_child(c);
    assert!(status.success(), "{status:?} {res:?}");
    assert!(matches!(srv2.next(T), ServerEvent::Started { .. }));
    match srv2.next(T) {
        ServerEvent::Ended(r) => assert!(!r.working_set.is_empty()),
        other => panic!("expected the end, got {other:?}"),
    }
    srv2.stop();
    srv.stop();
}

/// Reads the child's stdout up to its next CHILD_RESULT line.
fn next_result(out: &mut impl std::io::BufRead) -> serde_json::Value {
    let mut line = String::new();
    loop {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "the child exited early");
        if let Some((_, j)) = line.split_once("CHILD_RESULT ") {
            return serde_json::from_str(j).unwrap();
        }
    }
}

#[test]
fn a_new_server_takes_over_a_running_vm_from_its_journal() {
    use snapfork_lazy_restore::{RestoreOptions, journal};
    use std::io::Write;
    if !require_root() {
        return;
    }
    let dir = tempdir();
    let image = dir.path().join("mem.raw");
    make_image(&image, 1024);
    let journals = dir.path().join("journals");
    let socket = dir.path().join("uffd.sock");
    let marker = dir.path().join("stuck");
    // The first server runs in a process of its own, and gets stuck reading page 700.
    let mut server = spawn_child(json!({
        "role": "server", "socket": socket, "image": image, "journals": journals,
        "stuck_page": 700, "marker": marker,
    }));
    assert_eq!(next_result(&mut std::io::BufReader::new(server.stdout.take().unwrap()))["ready"], true);
    let mut child = spawn_child(json!({
        "role": "takeover", "socket": socket, "image": image,
        "regions": [{"size": 4 << 20, "offset": 0}], "first_touch": 700,
    }));
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let pid = child.id() as i32;
    let _reap = KillOnPanic(vec![pid, server.id() as i32]);
    assert_eq!(next_result(&mut out)["ready"], true);

    // Its journal names the VM, its region and the 16 pages it gave back; while the server
    // lives, nobody else can take the VM over. (The guest's madvise returns once the server has
    // read the REMOVE, a moment before the range is written down: wait for it.)
    let t = std::time::Instant::now();
    let found = loop {
        let found = journal::orphans(&journals).unwrap();
        if found.iter().any(|o| !o.removed.is_empty()) || t.elapsed() > T {
            break found;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!((found[0].pid, found[0].regions.len()), (pid, 1));
    assert_eq!(
        found[0].removed,
        vec![(found[0].regions[0].base + 8 * PAGE as u64, found[0].regions[0].base + 24 * PAGE as u64)]
    );
    assert!(found[0].is_alive());
    match journal::orphans(&journals).unwrap().pop().unwrap().adopt(raw_source(&image), RestoreOptions::default()) {
        Err(snapfork_lazy_restore::Error::Busy(_)) => {}
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a VM was taken over while its server served it"),
    }

    // The guest faults on page 700; the server takes the fault and never answers; it dies.
    child.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    let t = std::time::Instant::now();
    while !marker.exists() {
        assert!(t.elapsed() < T, "the server never read page 700");
        std::thread::sleep(Duration::from_millis(10));
    }
    server.kill().unwrap();
    server.wait().unwrap();

    // A new server adopts the VM: the waiting guest is woken, faults again, and reads every
    // page right (zeros where it gave pages back).
    let orphan = journal::orphans(&journals).unwrap().pop().unwrap();
    let handle = orphan.adopt(raw_source(&image), RestoreOptions::default()).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(next_result(&mut out)));
    let done = rx.recv_timeout(T).expect("the guest still waits on the fault the dead server took");
    assert_eq!((done["mismatches"].as_u64(), done["nonzero_removed"].as_u64()), (Some(0), Some(0)), "{done}");
    assert!(child.wait().unwrap().success());
    let report = handle.join();
    assert_eq!(report.end, EndReason::PeerExited, "{report:?}");
    let st = &report.stats;
    assert!(report.adopted && st.pages_removed == 16 && st.faults > 0 && st.pages_copied > 0, "{st:?}");
    // The VM is gone: so is its journal.
    assert!(journal::orphans(&journals).unwrap().is_empty());
}

#[test]
fn a_journal_is_not_believed_for_another_process_with_its_pid() {
    use snapfork_lazy_restore::journal;
    if !require_root() {
        return;
    }
    let dir = tempdir();
    let region = snapfork_lazy_restore::Region { base: 1 << 30, size: 1 << 20, offset: 0, page_size: 4096 };
    let me = std::process::id() as i32;
    let j = journal::Journal::create(dir.path(), me, None, &[region]).unwrap();
    let path = j.path().to_path_buf();
    drop(j);
    let mut orphan = journal::orphans(dir.path()).unwrap().pop().unwrap();
    assert!(orphan.is_alive());
    // Same pid, another start time: a recycled pid is not the VM.
    orphan.start_time += 1;
    assert!(!orphan.is_alive());
    let image = dir.path().join("mem.raw");
    make_image(&image, 256);
    match orphan.adopt(raw_source(&image), Default::default()) {
        Err(e) => assert!(e.to_string().contains("is not the VM of journal"), "{e}"),
        Ok(_) => panic!("adopted a process that is not the journal's VM"),
    }
    // A damaged journal is an error naming it.
    std::fs::write(&path, "{\"version\": 1, \"pid\":").unwrap();
    let err = journal::orphans(dir.path()).unwrap_err();
    assert!(err.to_string().contains(&path.display().to_string()), "{err}");
}

/// Kills the test's child processes if it fails (a guest left waiting on a fault never exits).
struct KillOnPanic(Vec<i32>);

impl Drop for KillOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for &pid in &self.0 {
                // SAFETY: plain kill(2) of this test's own children, not yet reaped.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// A flood of peers that connect and say nothing: the server holds at most 64 handshakes (and
/// threads for them) at once, the rest wait in the backlog, and a real VM among them is served.
#[test]
fn a_flood_of_silent_connections_is_bounded_and_a_vm_still_gets_served() {
    if !require_root() {
        return;
    }
    let dir = tempdir();
    let image = dir.path().join("mem.raw");
    make_image(&image, 256);
    let threads = || std::fs::read_dir("/proc/self/task").unwrap().count();
    let before = threads();
    let srv = TestServer::start(
        dir.path().join("uffd.sock"),
        raw_source(&image),
        ServerOptions { handshake_timeout: Duration::from_millis(1500), ..Default::default() },
    );
    let silent: Vec<UnixStream> = (0..150).map(|_| UnixStream::connect(&srv.socket).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(300));
    let during = threads();
    assert!(during <= before + 64 + 8, "{during} threads for 150 silent peers ({before} before)");
    let good = spawn_child(json!({
        "role": "fc", "socket": srv.socket, "image": image,
        "regions": [{"size": 1 << 20, "offset": 0}],
    }));
    let (status, res) = wait_child(good);
    assert!(status.success(), "{status:?} {res:?}");
    drop(silent);
    srv.stop();
}
