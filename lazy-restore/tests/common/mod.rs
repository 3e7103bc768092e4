//! Shared helpers: root checks, synthetic images, the child process that plays Firecracker (and
//! a KVM guest), and a server running on a thread.
#![allow(dead_code)]

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{Value, json};
use snapfork_lazy_restore::client::{FakeVm, RegionSpec, Shape};
use snapfork_lazy_restore::{PageSource, ServerEvent, ServerOptions, ServerSummary, UffdServer};

pub const PAGE: usize = 4096;
pub const CHILD_ENV: &str = "SNAPFORK_TEST_CHILD";

/// Tests here need root (userfaultfd, /dev/kvm, killing processes): fail loudly otherwise.
pub fn require_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 && Path::new("/dev/userfaultfd").exists() {
        return true;
    }
    if std::env::var("SNAPFORK_ALLOW_SKIP").as_deref() == Ok("1") {
        eprintln!("!!! SKIPPED: needs root and /dev/userfaultfd (SNAPFORK_ALLOW_SKIP=1)");
        return false;
    }
    panic!("this test needs root and /dev/userfaultfd; set SNAPFORK_ALLOW_SKIP=1 to skip");
}

fn xorshift(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// A synthetic image of `pages` pages: data pages (page number in the first 8 bytes, then
/// pseudo-random bytes), explicit zero pages (i % 7 == 3) and sparse holes (i % 11 == 5).
pub fn make_image(path: &Path, pages: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(pages * PAGE as u64).unwrap();
    let mut buf = vec![0u8; PAGE];
    for i in 0..pages {
        if i % 11 == 5 {
            continue;
        }
        if i % 7 == 3 {
            buf.fill(0);
        } else {
            let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            for w in buf.chunks_exact_mut(8) {
                x = xorshift(x);
                w.copy_from_slice(&x.to_le_bytes());
            }
            buf[..8].copy_from_slice(&i.to_le_bytes());
        }
        f.write_all_at(&buf, i * PAGE as u64).unwrap();
    }
    f.sync_all().unwrap();
}

/// A unique temporary directory.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("lazy-restore-test").tempdir().unwrap()
}

/// A server on a thread; events are forwarded to a channel.
pub struct TestServer {
    pub socket: PathBuf,
    pub events: mpsc::Receiver<ServerEvent>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<ServerSummary>>,
}

impl TestServer {
    pub fn start(socket: PathBuf, source: Arc<dyn PageSource>, opts: ServerOptions) -> Self {
        let server = UffdServer::bind(&socket, source, opts).unwrap();
        let stop = server.stopper();
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            server
                .run(|_, ev| {
                    let _ = tx.send(ev);
                })
                .unwrap()
        });
        TestServer { socket, events: rx, stop, thread: Some(thread) }
    }

    /// Waits for the next event.
    pub fn next(&self, timeout: Duration) -> ServerEvent {
        self.events.recv_timeout(timeout).expect("no server event in time")
    }

    /// Waits until `n` restores have ended (ignoring starts), returning the end events and the
    /// refusals seen on the way.
    pub fn wait_ended(&self, n: usize, timeout: Duration) -> (Vec<snapfork_lazy_restore::RestoreReport>, Vec<String>) {
        let mut ended = Vec::new();
        let mut refused = Vec::new();
        let deadline = std::time::Instant::now() + timeout;
        while ended.len() < n {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.events.recv_timeout(left) {
                Ok(ServerEvent::Ended(r)) => ended.push(*r),
                Ok(ServerEvent::Refused { error, .. }) => refused.push(error),
                Ok(ServerEvent::Started { .. } | ServerEvent::WorkingSet { .. }) => {}
                Err(_) => panic!("only {} of {n} restores ended in time", ended.len()),
            }
        }
        (ended, refused)
    }

    pub fn stop(mut self) -> ServerSummary {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

/// Spawns the peer process (`examples/fc_peer.rs`, built by `cargo test`/`nextest` with the
/// tests) playing `role` (see [`child_main`]).
pub fn spawn_child(role: Value) -> Child {
    // The test binary is target/PROFILE/deps/NAME-HASH; examples are in target/PROFILE/examples.
    let exe = std::env::current_exe().unwrap();
    let peer = exe.parent().and_then(Path::parent).map(|p| p.join("examples/fc_peer")).unwrap();
    assert!(
        peer.exists(),
        "{} is missing: run the tests with cargo test or cargo nextest (they build examples)",
        peer.display()
    );
    Command::new(peer)
        .env(CHILD_ENV, role.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// Waits for a child and returns (exit status, its CHILD_RESULT object).
pub fn wait_child(child: Child) -> (std::process::ExitStatus, Option<Value>) {
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let result = text
        .lines()
        .find_map(|l| l.split_once("CHILD_RESULT ").map(|(_, j)| j))
        .map(|j| serde_json::from_str(j).unwrap());
    (out.status, result)
}

/// [`wait_child`], but a child still running after `timeout` is killed and fails the test.
pub fn wait_child_for(mut child: Child, timeout: Duration) -> (std::process::ExitStatus, Option<Value>) {
    let deadline = std::time::Instant::now() + timeout;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let (status, res) = wait_child(child);
            panic!("the child was still running after {timeout:?} (killed: {status:?} {res:?})");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    wait_child(child)
}

fn emit(v: Value) {
    println!("CHILD_RESULT {v}");
}

fn shape(s: &str) -> Shape {
    match s {
        "1.1" => Shape::V1_1,
        "1.7" => Shape::V1_7,
        "1.12" => Shape::V1_12,
        _ => Shape::Future,
    }
}

/// What a child compares its memory with.
enum Expected {
    /// The image file, read page by page.
    File(std::fs::File),
    /// The id of every image page, computed up front: for a child in a full memory cgroup, where
    /// reading a file fails with ENOMEM once its page cache can give nothing back.
    Ids(Vec<snapfork_store::Hash>),
}

impl Expected {
    fn matches(&self, at: u64, got: &[u8], buf: &mut [u8]) -> bool {
        match self {
            Expected::File(f) => {
                f.read_exact_at(buf, at).unwrap();
                got == buf
            }
            Expected::Ids(ids) => ids[(at / PAGE as u64) as usize] == snapfork_store::Hash::of(got),
        }
    }
}

/// Compares region `i` of `vm` with the image; returns the mismatching page numbers (first 16).
fn compare(vm: &FakeVm, i: usize, image: &Expected) -> (u64, Vec<u64>) {
    let m = &vm.regions[i];
    let mut buf = vec![0u8; PAGE];
    let mut bad = Vec::new();
    let mut count = 0;
    let region = vm.region(i);
    for (p, got) in region.chunks_exact(PAGE).enumerate() {
        if !image.matches(m.spec.offset + (p * PAGE) as u64, got, &mut buf) {
            count += 1;
            if bad.len() < 16 {
                bad.push(p as u64);
            }
        }
    }
    (count, bad)
}

/// A source that never returns page `page` (after creating `marker`): a server reading it for
/// a fault has taken the fault from the userfaultfd and will never answer it.
struct Stuck {
    inner: snapfork_lazy_restore::RawFileSource,
    page: u64,
    marker: PathBuf,
}

impl Stuck {
    fn check(&self, first: u64, count: u64) {
        if (first..first + count).contains(&self.page) {
            std::fs::write(&self.marker, b"stuck").unwrap();
            loop {
                std::thread::sleep(Duration::from_secs(60));
            }
        }
    }
}

impl PageSource for Stuck {
    fn page_size(&self) -> usize {
        self.inner.page_size()
    }
    fn page_count(&self) -> u64 {
        self.inner.page_count()
    }
    fn is_zero(&self, index: u64) -> bool {
        self.inner.is_zero(index)
    }
    fn read_page(&self, index: u64, buf: &mut [u8]) -> snapfork_lazy_restore::Result<()> {
        self.check(index, 1);
        self.inner.read_page(index, buf)
    }
    fn read_pages(&self, first: u64, buf: &mut [u8]) -> snapfork_lazy_restore::Result<()> {
        self.check(first, (buf.len() / PAGE) as u64);
        self.inner.read_pages(first, buf)
    }
    fn name(&self) -> String {
        self.inner.name()
    }
}

/// The `server` role: a UFFD server with journals, whose source gets stuck on one page, in a
/// process of its own that the test kills.
fn serve_until_killed(role: &Value) {
    let inner = snapfork_lazy_restore::RawFileSource::open(Path::new(role["image"].as_str().unwrap()), PAGE).unwrap();
    let source = Stuck {
        inner,
        page: role["stuck_page"].as_u64().unwrap(),
        marker: PathBuf::from(role["marker"].as_str().unwrap()),
    };
    let opts = ServerOptions { journal_dir: Some(role["journals"].as_str().unwrap().into()), ..Default::default() };
    let server = UffdServer::bind(Path::new(role["socket"].as_str().unwrap()), Arc::new(source), opts).unwrap();
    emit(json!({"ready": true}));
    server.run(|_, _| {}).unwrap();
}

/// Entry of the child process: plays the role described by the JSON in `SNAPFORK_TEST_CHILD`.
///
/// Roles: `fc` (handshake, read every page, compare), `remove` (fc + madvise DONTNEED then read
/// zeros), `takeover` (touch, give memory back, wait for "go" on stdin, read everything: the
/// server is replaced in between), `server` (a UFFD server that gets stuck on one page), `hang` (handshake, touch some pages, then sleep until
/// killed), `kvm` (handshake, then a KVM guest reads every page and reports a checksum through an
/// I/O port).
pub fn child_main() {
    let Ok(role) = std::env::var(CHILD_ENV) else {
        eprintln!("fc_peer: set {CHILD_ENV} to a JSON role (the lazy-restore tests do)");
        std::process::exit(2);
    };
    let role: Value = serde_json::from_str(&role).unwrap();
    if role["role"] == "server" {
        return serve_until_killed(&role);
    }
    let specs: Vec<RegionSpec> = role["regions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| RegionSpec {
            size: r["size"].as_u64().unwrap(),
            offset: r["offset"].as_u64().unwrap(),
            page_size: r["page_size"].as_u64().unwrap_or(4096),
        })
        .collect();
    let image_path = Path::new(role["image"].as_str().unwrap());
    let mut image = Expected::File(std::fs::File::open(image_path).unwrap());
    // A VMM confined to a memory cgroup, as a jailer puts it (joined before it maps memory).
    if let Some(cgroup) = role["cgroup"].as_str() {
        let bytes = std::fs::read(image_path).unwrap();
        image = Expected::Ids(bytes.chunks(PAGE).map(snapfork_store::Hash::of).collect());
        drop(bytes);
        std::fs::write(Path::new(cgroup).join("cgroup.procs"), std::process::id().to_string()).unwrap();
    }
    let mut vm = FakeVm::new(&specs).unwrap();
    let extra: Vec<std::fs::File> =
        (0..role["extra_fds"].as_u64().unwrap_or(0)).map(|_| std::fs::File::open("/dev/null").unwrap()).collect();
    let extra_fds: Vec<i32> = extra.iter().map(|f| f.as_raw_fd()).collect();
    vm.connect(
        Path::new(role["socket"].as_str().unwrap()),
        shape(role["shape"].as_str().unwrap_or("1.12")),
        &extra_fds,
    )
    .unwrap();
    // A guest that takes a while to start (so that a prefetch has run), if asked.
    if let Some(ms) = role["start_delay_ms"].as_u64() {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
    match role["role"].as_str().unwrap() {
        "fc" => {
            // Optional access pattern first (pages of region 0), then everything.
            if let Some(pat) = role["touch"].as_array() {
                let offs: Vec<u64> = pat.iter().map(|v| v.as_u64().unwrap() * PAGE as u64).collect();
                // SAFETY: every offset is inside region 0.
                unsafe { snapfork_lazy_restore::client::touch(vm.regions[0].ptr, &offs) };
            }
            let mut mismatches = 0;
            let mut first_bad = Vec::new();
            for i in 0..vm.regions.len() {
                let (n, bad) = compare(&vm, i, &image);
                mismatches += n;
                first_bad.extend(bad);
            }
            emit(json!({"mismatches": mismatches, "first_bad": first_bad}));
            std::process::exit(if mismatches == 0 { 0 } else { 3 });
        }
        "write" => {
            // A guest that writes one byte into each listed page (region 0) and reads nothing
            // else: the pages it changed are what the next checkpoint must hash.
            let m = &vm.regions[0];
            let pages: Vec<usize> =
                role["write"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
            for &p in &pages {
                assert!(p * PAGE < m.spec.size as usize);
                // SAFETY: the page lies inside region 0, which is mapped writable.
                unsafe { m.ptr.add(p * PAGE).write_volatile(written_byte(p)) };
            }
            emit(json!({"written": pages.len()}));
            std::process::exit(0);
        }
        "unmap" => {
            // A VMM that unmaps the second half of its memory without telling the server (no
            // UNMAP event: Firecracker asks only for REMOVE), then reads the first half, which
            // the server's read-ahead runs past.
            let m = &vm.regions[0];
            let half = m.spec.size as usize / 2;
            // SAFETY: the second half of region 0, page aligned; nothing here touches it again.
            let r = unsafe { libc::munmap(m.ptr.add(half).cast(), half) };
            assert_eq!(r, 0, "munmap: {}", std::io::Error::last_os_error());
            let mut buf = vec![0u8; PAGE];
            let region = &vm.region(0)[..half];
            let bad = region
                .chunks_exact(PAGE)
                .enumerate()
                .filter(|(p, got)| !image.matches(m.spec.offset + (p * PAGE) as u64, got, &mut buf))
                .count();
            emit(json!({"mismatches": bad}));
            std::process::exit(if bad == 0 { 0 } else { 3 });
        }
        "remove" => {
            let m = &vm.regions[0];
            let size = m.spec.size as usize;
            let half = size / 2;
            // Touch the first half, then give back a range straddling touched and untouched pages.
            let (n0, _) = compare(&vm, 0, &image);
            let (start, len) = (half / 2, half);
            // SAFETY: the range lies inside region 0, page aligned.
            let r = unsafe { libc::madvise(m.ptr.add(start).cast(), len, libc::MADV_DONTNEED) };
            assert_eq!(r, 0, "madvise: {}", std::io::Error::last_os_error());
            let region = vm.region(0);
            let nonzero = region[start..start + len].chunks_exact(PAGE).filter(|p| p.iter().any(|&b| b != 0)).count();
            // Outside the removed range the content is still the snapshot's.
            let mut buf = vec![0u8; PAGE];
            let mut outside_bad = 0;
            for p in (0..size / PAGE).filter(|p| p * PAGE < start || p * PAGE >= start + len) {
                if !image.matches(m.spec.offset + (p * PAGE) as u64, &region[p * PAGE..(p + 1) * PAGE], &mut buf) {
                    outside_bad += 1;
                }
            }
            emit(json!({"before": n0, "nonzero_in_removed": nonzero, "outside_bad": outside_bad}));
            std::process::exit(if n0 == 0 && nonzero == 0 && outside_bad == 0 { 0 } else { 3 });
        }
        "takeover" => {
            // Touch the first quarter, give back pages 8..24 (read, so installed), then
            // wait for the test to say "go" on stdin (it replaces the server meanwhile) and read
            // everything: given-back pages must read zero, all others the image.
            let m = &vm.regions[0];
            let size = m.spec.size as usize;
            let region = vm.region(0);
            let quarter: u64 = region[..size / 4].chunks_exact(PAGE).map(|p| p[0] as u64).sum();
            let (start, len) = (8 * PAGE, 16 * PAGE);
            // SAFETY: the range lies inside region 0, page aligned.
            let r = unsafe { libc::madvise(m.ptr.add(start).cast(), len, libc::MADV_DONTNEED) };
            assert_eq!(r, 0, "madvise: {}", std::io::Error::last_os_error());
            emit(json!({"ready": true, "quarter": quarter}));
            let mut go = String::new();
            std::io::stdin().read_line(&mut go).unwrap();
            if let Some(p) = role["first_touch"].as_u64() {
                // One fault, on its own (no sequential stream): the server reads it alone.
                std::hint::black_box(vm.region(0)[p as usize * PAGE]);
            }
            let mut buf = vec![0u8; PAGE];
            let (mut bad, mut nonzero_removed) = (Vec::new(), 0);
            for (p, got) in vm.region(0).chunks_exact(PAGE).enumerate() {
                if (start..start + len).contains(&(p * PAGE)) {
                    nonzero_removed += got.iter().any(|&b| b != 0) as u64;
                    continue;
                }
                if !image.matches(m.spec.offset + (p * PAGE) as u64, got, &mut buf) {
                    bad.push(p);
                }
            }
            emit(
                json!({"mismatches": bad.len(), "first_bad": &bad[..bad.len().min(16)], "nonzero_removed": nonzero_removed}),
            );
            std::process::exit(if bad.is_empty() && nonzero_removed == 0 { 0 } else { 3 });
        }
        "hang" => {
            let touch = role["touch_pages"].as_u64().unwrap_or(16) as usize;
            let region = vm.region(0);
            let mut sum = 0u64;
            for p in 0..touch {
                sum = sum.wrapping_add(region[p * PAGE] as u64);
            }
            emit(json!({"touched": touch, "sum": sum}));
            loop {
                std::thread::sleep(Duration::from_secs(60));
            }
        }
        "kvm" => {
            let sum = kvm_checksum(&vm);
            emit(json!({"checksum": sum}));
            std::process::exit(0);
        }
        other => panic!("unknown role {other}"),
    }
}

/// The guest's checksum over a region's bytes, computed on the host.
pub fn expected_checksum(bytes: &[u8]) -> u32 {
    let mut eax: u32 = 0;
    for page in bytes.chunks_exact(PAGE) {
        let w = u32::from_le_bytes(page[..4].try_into().unwrap());
        eax = eax.rotate_left(5) ^ w;
    }
    eax
}

/// Runs a tiny 32-bit guest whose memory (slot 0, gpa 0) is region 0 of `vm`: for each page,
/// `eax = rol(eax, 5) ^ dword[page]`, then `out dx, eax` and `hlt`. Faults on guest memory are
/// taken by KVM (get_user_pages), not by a user thread: the server must serve them too.
fn kvm_checksum(vm: &FakeVm) -> u32 {
    use kvm_bindings::{kvm_regs, kvm_userspace_memory_region};
    use kvm_ioctls::{Kvm, VcpuExit};
    const CODE_GPA: u64 = 0x1000_0000;
    const PORT: u16 = 0x10;
    let code: [u8; 13] = [
        0xC1, 0xC0, 0x05, // rol eax, 5
        0x33, 0x06, // xor eax, [esi]
        0x01, 0xFE, // add esi, edi
        0x49, // dec ecx
        0x75, 0xF6, // jnz -10
        0xEF, // out dx, eax
        0xF4, // hlt
        0xF4,
    ];
    let m = &vm.regions[0];
    let kvm = Kvm::new().expect("open /dev/kvm");
    let vmfd = kvm.create_vm().unwrap();
    let code_mem = snapfork_lazy_restore::client::map_anonymous(4096, 4096).unwrap();
    // SAFETY: the code page is ours, 4096 bytes.
    unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), code_mem, code.len()) };
    // SAFETY: both host ranges stay mapped for the life of the VM (this process exits after).
    unsafe {
        vmfd.set_user_memory_region(kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: m.spec.size,
            userspace_addr: m.ptr as u64,
        })
        .unwrap();
        vmfd.set_user_memory_region(kvm_userspace_memory_region {
            slot: 1,
            flags: 0,
            guest_phys_addr: CODE_GPA,
            memory_size: 4096,
            userspace_addr: code_mem as u64,
        })
        .unwrap();
    }
    let vcpu = vmfd.create_vcpu(0).unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    // Flat 32-bit protected mode without paging: no mode-switch code needed.
    for seg in [&mut sregs.ds, &mut sregs.es, &mut sregs.fs, &mut sregs.gs, &mut sregs.ss] {
        seg.base = 0;
        seg.limit = 0xffff_ffff;
        seg.selector = 0x10;
        seg.type_ = 3;
        seg.present = 1;
        seg.dpl = 0;
        seg.db = 1;
        seg.s = 1;
        seg.l = 0;
        seg.g = 1;
    }
    sregs.cs.base = 0;
    sregs.cs.limit = 0xffff_ffff;
    sregs.cs.selector = 0x08;
    sregs.cs.type_ = 11;
    sregs.cs.present = 1;
    sregs.cs.dpl = 0;
    sregs.cs.db = 1;
    sregs.cs.s = 1;
    sregs.cs.l = 0;
    sregs.cs.g = 1;
    sregs.cr0 |= 1;
    vcpu.set_sregs(&sregs).unwrap();
    let regs = kvm_regs {
        rip: CODE_GPA,
        rflags: 2,
        rax: 0,
        rsi: 0,
        rdi: PAGE as u64,
        rcx: m.spec.size / PAGE as u64,
        rdx: PORT as u64,
        ..Default::default()
    };
    vcpu.set_regs(&regs).unwrap();
    let mut vcpu = vcpu;
    let mut sum = None;
    loop {
        match vcpu.run().expect("KVM_RUN") {
            VcpuExit::IoOut(port, data) if port == PORT => {
                sum = Some(u32::from_le_bytes(data[..4].try_into().unwrap()));
            }
            VcpuExit::Hlt => break,
            other => panic!("unexpected exit {other:?}"),
        }
    }
    sum.expect("the guest reported no checksum")
}

/// Threads of this process.
pub fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

/// Open descriptors of this process.
pub fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// The byte the `write` role puts at the start of page `p`.
pub fn written_byte(p: usize) -> u8 {
    (p as u8) ^ 0x5a
}
