//! Serving one restore: a userfaultfd, the regions it covers, and the image behind them.
//!
//! Each restore runs on its own thread, plus reader threads that read pages ahead (read-ahead
//! windows of a guest streaming through memory, then the prefetch plan). The serving thread
//! alone issues ioctls on the userfaultfd, so a REMOVE event is always applied before any later
//! copy into that range: no copy can race a balloon/DONTNEED and resurrect old content. Between
//! two batches it reads the userfaultfd again, so a demand fault waits for at most one batch
//! (≤ 256 KiB of data) and always jumps the prefetch queue. Pages being read are claimed, so a
//! page is read once and a fault on it waits for the reader's batch instead of reading it again.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;
use tracing::{debug, error, info, warn};

use crate::bitmap::{AtomicBitmap, Bitmap};
use crate::journal::Journal;
use crate::source::PageSource;
use crate::uffd::{self, Event, Fill};
use crate::{Error, Result};

/// Most zero pages mapped by one demand fault on a zero page (2 MiB of 4 KiB pages).
const ZERO_AROUND_PAGES: u64 = 512;
/// Most zero pages per prefetch/fill zero batch (one UFFDIO_ZEROPAGE of 8 MiB).
const ZERO_RUN_PAGES: u64 = 2048;

/// 2 MiB: the hugetlb page size Firecracker uses.
pub const HUGE_PAGE: u64 = 2 << 20;

/// One guest memory region registered with the userfaultfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Region {
    /// Start address in the address space that owns the userfaultfd.
    pub base: u64,
    /// Length in bytes.
    pub size: u64,
    /// Position of the region's first byte in the memory image.
    pub offset: u64,
    /// The region's page size (4096, or 2 MiB for hugetlb).
    pub page_size: u64,
}

impl Region {
    fn pages(&self) -> u64 {
        self.size / self.page_size
    }
}

/// Checks regions against an image of `image_size` bytes made of `image_page`-byte pages:
/// aligned, non-empty, inside the image, and overlapping neither in the image nor in memory.
pub fn validate_regions(regions: &[Region], image_size: u64, image_page: u64) -> Result<()> {
    let bad = |m: String| Err(Error::Handshake(m));
    if regions.is_empty() {
        return bad("no regions".into());
    }
    for (i, r) in regions.iter().enumerate() {
        if r.page_size != 4096 && r.page_size != HUGE_PAGE {
            return bad(format!("region {i}: unsupported page size {}", r.page_size));
        }
        if r.page_size % image_page != 0 {
            return bad(format!("region {i}: page size {} is not a multiple of the image's {image_page}", r.page_size));
        }
        if r.size == 0 || r.size % r.page_size != 0 {
            return bad(format!(
                "region {i}: size {} is not a positive multiple of its page size {}",
                r.size, r.page_size
            ));
        }
        if r.base % r.page_size != 0 || r.offset % r.page_size != 0 {
            return bad(format!(
                "region {i}: base {:#x} or offset {:#x} not aligned to {}",
                r.base, r.offset, r.page_size
            ));
        }
        let end = r.offset.checked_add(r.size);
        if end.is_none_or(|e| e > image_size) {
            return bad(format!(
                "region {i}: [{:#x}, +{:#x}) lies beyond the image ({image_size} bytes)",
                r.offset, r.size
            ));
        }
        if r.base.checked_add(r.size).is_none() {
            return bad(format!("region {i}: address range overflows"));
        }
        for (j, o) in regions.iter().enumerate().take(i) {
            if r.offset < o.offset + o.size && o.offset < r.offset + r.size {
                return bad(format!("regions {j} and {i} overlap in the image"));
            }
            if r.base < o.base + o.size && o.base < r.base + r.size {
                return bad(format!("regions {j} and {i} overlap in memory"));
            }
        }
    }
    Ok(())
}

/// What to do when a page fails verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum CorruptPolicy {
    /// SIGKILL the process that owns the memory (through its pidfd) and end the restore.
    KillPeer,
    /// Poison the page (UFFDIO_POISON): an access raises SIGBUS; other pages keep being served.
    Poison,
}

/// How a restore is served.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// Bytes installed per demand fault on 4 KiB regions: the faulting page plus following
    /// pages not yet installed (stops at zero, removed or installed pages). 4096 = one page.
    pub fault_around: usize,
    /// Image pages to prefetch, in order (a recorded working set).
    pub prefetch: Vec<u64>,
    /// After the prefetch list, install every other page in the background.
    pub fill: bool,
    /// Largest single prefetch copy in bytes.
    pub batch_bytes: usize,
    /// What to do with a corrupt page.
    pub on_corrupt: CorruptPolicy,
    /// Keep at most this many fault service times (for percentiles).
    pub max_latency_samples: usize,
    /// Threads reading (decompressing, verifying) read-ahead windows and prefetch batches ahead
    /// of the copies (at least 1).
    pub prefetch_threads: usize,
    /// Largest sequential read-ahead window in bytes (4 KiB regions): demand faults that follow
    /// one another through memory install 2, 4, 8... pages at once, and past two windows the
    /// readers read the stream ahead, `prefetch_threads + 1` windows deep. 0 or 4096 disables it.
    pub readahead: usize,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions {
            fault_around: 4096,
            prefetch: Vec::new(),
            fill: false,
            batch_bytes: 256 << 10,
            on_corrupt: CorruptPolicy::KillPeer,
            max_latency_samples: 1 << 20,
            prefetch_threads: 2,
            readahead: 256 << 10,
        }
    }
}

/// The process whose memory is restored.
#[derive(Debug, Default)]
pub struct Peer {
    /// Its pid (from SO_PEERCRED), if known.
    pub pid: Option<i32>,
    /// A pidfd for it: exit detection and race-free signalling.
    pub pidfd: Option<OwnedFd>,
    /// The handshake connection, kept open for the life of the restore.
    pub conn: Option<UnixStream>,
}

impl Peer {
    /// A peer identified by `pid`, with a pidfd opened now.
    pub fn from_pid(pid: i32) -> Self {
        Peer { pid: Some(pid), pidfd: pidfd_open(pid).ok(), conn: None }
    }
}

/// `pidfd_open(2)`.
pub fn pidfd_open(pid: i32) -> Result<OwnedFd> {
    // SAFETY: plain syscall with integer arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(Error::last_os(format!("pidfd_open({pid})")));
    }
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// SIGKILLs the process of `pidfd`: unlike `kill(2)` by pid, never a later process that was
/// given the same pid.
pub fn pidfd_kill(pidfd: BorrowedFd<'_>) -> std::io::Result<()> {
    // SAFETY: plain syscall; a null siginfo means "as if by kill(2)".
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

/// Waits up to `timeout` for the process of `pidfd` to exit; true once it has.
pub fn pidfd_wait(pidfd: BorrowedFd<'_>, timeout: std::time::Duration) -> bool {
    // A pidfd polls readable once its process has exited.
    let mut pfd = libc::pollfd { fd: pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd, for the duration of the call.
    unsafe { libc::poll(&mut pfd, 1, ms) > 0 }
}

/// True when process `pid`, started at `t0`, has exited (or its pid names another process
/// now). A `/proc` entry that cannot be read for another reason (`hidepid`) says nothing: alive.
fn peer_gone(pid: i32, t0: u64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
        // A zombie (no start time) or another process given the pid is gone too.
        Ok(stat) => crate::journal::start_time_in(&stat) != Some(t0),
    }
}

/// Live counters of a restore.
#[derive(Debug, Default)]
pub struct RestoreStats {
    /// Demand faults served.
    pub faults: AtomicU64,
    /// Pages (of the region's page size) installed with UFFDIO_COPY.
    pub pages_copied: AtomicU64,
    /// Pages installed as zero pages.
    pub pages_zeroed: AtomicU64,
    /// Of the installed pages, those installed by prefetch or fill.
    pub pages_prefetched: AtomicU64,
    /// Of the installed pages, those read ahead of a guest streaming through memory.
    pub pages_readahead: AtomicU64,
    /// UFFDIO_COPY / UFFDIO_ZEROPAGE calls.
    pub ioctls: AtomicU64,
    /// Pages zapped by REMOVE events.
    pub pages_removed: AtomicU64,
    /// EEXIST answers (page already present).
    pub eexist: AtomicU64,
    /// EAGAIN answers (pending mapping change).
    pub eagain: AtomicU64,
    /// Sleeps (1 to 100 ms each) of installs that found the VM's memory cgroup full (ENOMEM).
    pub memory_waits: AtomicU64,
    /// Set once the prefetch list (and fill) has been fully installed.
    pub prefetch_done: AtomicBool,
}

/// A copy of [`RestoreStats`] at one moment.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StatsSnapshot {
    /// Demand faults served.
    pub faults: u64,
    /// Pages installed with UFFDIO_COPY.
    pub pages_copied: u64,
    /// Pages installed as zero pages.
    pub pages_zeroed: u64,
    /// Pages installed by prefetch or fill.
    pub pages_prefetched: u64,
    /// Pages read ahead of a guest streaming through memory.
    pub pages_readahead: u64,
    /// Fill ioctls issued.
    pub ioctls: u64,
    /// Pages zapped by REMOVE events.
    pub pages_removed: u64,
    /// EEXIST answers.
    pub eexist: u64,
    /// EAGAIN answers.
    pub eagain: u64,
    /// Sleeps (1 to 100 ms each) waiting for the VM's memory cgroup to have room.
    pub memory_waits: u64,
    /// Whether prefetch (and fill) completed.
    pub prefetch_done: bool,
}

impl RestoreStats {
    /// The counters now.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            faults: self.faults.load(Relaxed),
            pages_copied: self.pages_copied.load(Relaxed),
            pages_zeroed: self.pages_zeroed.load(Relaxed),
            pages_prefetched: self.pages_prefetched.load(Relaxed),
            pages_readahead: self.pages_readahead.load(Relaxed),
            ioctls: self.ioctls.load(Relaxed),
            pages_removed: self.pages_removed.load(Relaxed),
            eexist: self.eexist.load(Relaxed),
            eagain: self.eagain.load(Relaxed),
            memory_waits: self.memory_waits.load(Relaxed),
            prefetch_done: self.prefetch_done.load(Relaxed),
        }
    }
}

/// Why a restore ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EndReason {
    /// The process exited (pidfd readable) or its mm is gone (ESRCH).
    PeerExited,
    /// [`RestoreHandle::stop`] was called.
    Stopped,
    /// A page failed verification; the peer was killed.
    CorruptPage {
        /// Image page index.
        page: u64,
        /// The peer's pid, when known.
        pid: Option<i32>,
        /// The error.
        message: String,
    },
    /// An unexpected error ended the restore; the peer was killed through its pidfd, where it
    /// has one (it could no longer be served, and would otherwise wait for its next page
    /// forever).
    Failed {
        /// The error.
        message: String,
    },
}

/// Everything known about a finished restore.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    /// The peer's pid.
    pub pid: Option<i32>,
    /// Why it ended.
    pub end: EndReason,
    /// Final counters.
    pub stats: StatsSnapshot,
    /// Image pages the guest faulted on, in first-fault order: the working set.
    pub working_set: Vec<u64>,
    /// Image pages that may differ from the snapshot (installed, or zapped by REMOVE): the set the
    /// next checkpoint must hash. Sorted. Incomplete when `adopted`.
    pub touched: Vec<u64>,
    /// This restore took the VM over from a server that died ([`crate::journal`]): pages that
    /// server installed are missing from `touched` and `working_set`.
    pub adopted: bool,
    /// Fault service times in nanoseconds (read of the event to wake-up), in order.
    #[serde(skip)]
    pub fault_ns: Vec<u32>,
}

impl RestoreReport {
    /// [`RestoreReport::touched`] as the store's page set, for an incremental ingest
    /// (`IngestOptions { parent, dirty: Some(..) }`): only these pages can differ.
    pub fn touched_pages(&self) -> snapfork_store::PageSet {
        let mut set = snapfork_store::PageSet::new();
        for &p in &self.touched {
            set.insert(p);
        }
        set
    }
}

/// Stops one restore: [`RestoreHandle::stopper`].
#[derive(Clone, Debug)]
pub struct RestoreStopper(Arc<OwnedFd>);

impl RestoreStopper {
    /// Asks the serving thread to stop (it ends with [`EndReason::Stopped`]).
    pub fn stop(&self) {
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a local to an eventfd we own.
        unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
}

/// A running restore.
pub struct RestoreHandle {
    thread: Option<JoinHandle<RestoreReport>>,
    stop: Arc<OwnedFd>,
    stats: Arc<RestoreStats>,
    pid: Option<i32>,
    live_ws: Arc<Mutex<Vec<u64>>>,
}

impl RestoreHandle {
    /// Asks the serving thread to stop (it ends with [`EndReason::Stopped`]).
    pub fn stop(&self) {
        self.stopper().stop();
    }
    /// What stops this restore from elsewhere (the handle itself may be waiting in `join`).
    pub fn stopper(&self) -> RestoreStopper {
        RestoreStopper(self.stop.clone())
    }
    /// True once the serving thread has ended.
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }
    /// Live counters.
    pub fn stats(&self) -> &Arc<RestoreStats> {
        &self.stats
    }
    /// The peer's pid.
    pub fn pid(&self) -> Option<i32> {
        self.pid
    }
    /// The working set recorded so far (image pages in first-fault order).
    pub fn working_set(&self) -> Vec<u64> {
        self.live_ws.lock().map(|w| w.clone()).unwrap_or_default()
    }
    /// Waits for the restore to end and returns its report.
    pub fn join(mut self) -> RestoreReport {
        let pid = self.pid;
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            _ => RestoreReport {
                pid,
                end: EndReason::Failed { message: "serving thread panicked".into() },
                stats: self.stats.snapshot(),
                working_set: Vec::new(),
                touched: Vec::new(),
                adopted: false,
                fault_ns: Vec::new(),
            },
        }
    }
}

fn eventfd() -> Result<OwnedFd> {
    // SAFETY: plain syscall.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(Error::last_os("eventfd"));
    }
    // SAFETY: fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Starts serving `uffd` (which must already have `regions` registered in MISSING mode, by this
/// process or by the peer) from `source`. Regions are validated against the image first.
pub fn start(
    uffd: OwnedFd,
    regions: Vec<Region>,
    source: Arc<dyn PageSource>,
    peer: Peer,
    opts: RestoreOptions,
) -> Result<RestoreHandle> {
    start_journaled(uffd, regions, source, peer, opts, None)
}

/// [`start`], writing down in `journal` what a successor needs to take the VM over (see
/// [`crate::journal`]); ranges the journal says were given back are served as zeros.
pub fn start_journaled(
    uffd: OwnedFd,
    regions: Vec<Region>,
    source: Arc<dyn PageSource>,
    peer: Peer,
    opts: RestoreOptions,
    journal: Option<Journal>,
) -> Result<RestoreHandle> {
    validate_regions(&regions, source.size(), source.page_size() as u64)?;
    // The fd must be non-blocking: the serving loop reads it until EAGAIN.
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let fl = libc::fcntl(uffd.as_raw_fd(), libc::F_GETFL);
        if fl >= 0 && fl & libc::O_NONBLOCK == 0 {
            libc::fcntl(uffd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
    }
    let stop = Arc::new(eventfd()?);
    let stats = Arc::new(RestoreStats::default());
    let installed: Vec<Arc<AtomicBitmap>> = regions.iter().map(|r| Arc::new(AtomicBitmap::new(r.pages()))).collect();
    let claimed: Vec<Arc<AtomicBitmap>> = regions.iter().map(|r| Arc::new(AtomicBitmap::new(r.pages()))).collect();
    let pid = peer.pid;
    let live_ws = Arc::new(Mutex::new(Vec::new()));
    let max_page = regions.iter().map(|r| r.page_size).max().unwrap_or(4096) as usize;
    // Large enough for whatever one demand fault installs: its fault-around, a read-ahead
    // window, or a planned run (at most a batch).
    let buf_len = opts.fault_around.max(max_page).max(opts.batch_bytes).max(opts.readahead);
    let plan = prefetch_plan(&regions, source.as_ref(), &opts);
    // Which run each region page belongs to: a demand fault on a planned page moves the
    // readers' cursor past its run (they follow the guest instead of trailing it) and installs
    // the rest of that run at once.
    let mut run_of: Vec<Vec<u32>> = regions.iter().map(|_| Vec::new()).collect();
    if !plan.is_empty() {
        run_of = regions.iter().map(|r| vec![u32::MAX; r.pages() as usize]).collect();
        for (i, run) in plan.iter().enumerate() {
            for p in run.first..run.first + run.count {
                run_of[run.region][p as usize] = i.min(u32::MAX as usize - 1) as u32;
            }
        }
    } else {
        stats.prefetch_done.store(true, Relaxed);
    }
    let shared = Arc::new(Shared {
        regions: regions.clone(),
        source: source.clone(),
        installed: installed.clone(),
        claimed: claimed.clone(),
        plan,
        next: AtomicUsize::new(0),
        sweep: AtomicUsize::new(0),
        swept: AtomicUsize::new(0),
        queue: Mutex::new(VecDeque::new()),
        wake: Condvar::new(),
        quit: AtomicBool::new(false),
        efd: eventfd()?,
    });
    // The readers read (look up, decompress, verify) ahead of the serving thread: read-ahead
    // windows of a guest streaming through memory first, then the prefetch plan. Store reads
    // are the cost and they parallelise; the serving thread alone installs.
    let (tx, rx) = std::sync::mpsc::sync_channel(8);
    let mut threads = Vec::new();
    for i in 0..opts.prefetch_threads.max(1) {
        let (sh, tx) = (shared.clone(), tx.clone());
        match std::thread::Builder::new().name(format!("uffd-reader-{i}")).spawn(move || reader_loop(&sh, tx)) {
            Ok(h) => threads.push(h),
            Err(e) => {
                drop(Readers { shared, rx: Some(rx), threads, run_of: Vec::new() });
                return Err(Error::io("spawn reader thread", e));
            }
        }
    }
    drop(tx);
    let readers = Readers { shared, rx: Some(rx), threads, run_of };
    let mut serving = Serving {
        uffd,
        states: regions
            .iter()
            .zip(&installed)
            .zip(&claimed)
            .map(|((r, inst), cl)| RegionState {
                r: *r,
                installed: inst.clone(),
                claimed: cl.clone(),
                removed: Bitmap::new(r.pages()),
                recorded: Bitmap::new(r.pages()),
            })
            .collect(),
        source: source.clone(),
        peer_start: peer.pid.filter(|&p| p > 0).and_then(crate::journal::process_start_time),
        peer,
        opts: opts.clone(),
        stats: stats.clone(),
        stop: stop.clone(),
        memory_wait: None,
        refaults: HashMap::new(),
        speculate: true,
        in_batch: false,
        buf: vec![0; buf_len],
        zeros: Vec::new(),
        pending: VecDeque::new(),
        parked: Vec::new(),
        events: Vec::new(),
        ws: Vec::new(),
        live_ws: live_ws.clone(),
        fault_ns: Vec::new(),
        readers: Some(readers),
        seq_next: (usize::MAX, 0),
        seq: 0,
        seq_start: 0,
        stream: None,
        journal: None,
    };
    let removed = journal.as_ref().map(|j| j.removed_ranges().to_vec()).unwrap_or_default();
    for (start, end) in removed {
        serving.apply_remove(start, end);
    }
    serving.journal = journal;
    let thread = std::thread::Builder::new()
        .name(format!("uffd-{}", pid.unwrap_or(0)))
        .spawn(move || serving.run())
        .map_err(|e| Error::io("spawn serving thread", e))?;
    Ok(RestoreHandle { thread: Some(thread), stop, stats, pid, live_ws })
}

struct RegionState {
    r: Region,
    installed: Arc<AtomicBitmap>,
    /// Pages a reader (or the serving thread) is reading: whoever claimed a page installs it or
    /// gives it back; a fault on a claimed page waits for that install instead of reading again.
    claimed: Arc<AtomicBitmap>,
    removed: Bitmap,
    recorded: Bitmap,
}

/// A run of region pages to prefetch: region index, first page, count.
#[derive(Debug, Clone, Copy)]
struct Run {
    region: usize,
    first: u64,
    count: u64,
    /// Data (non-zero) pages among them.
    data: u64,
    /// From `fill` (pages nobody asked for yet) rather than the working set.
    bulk: bool,
}

/// Work for a reader: claimed page ranges of one region.
struct Job {
    region: usize,
    ranges: Vec<(u64, u64)>,
    /// From the prefetch plan (else a read-ahead window).
    prefetch: bool,
    /// Pages read once in bulk (fill, read-ahead): not worth a place in a shared page cache.
    bulk: bool,
}

/// Homogeneous pages of a read job: zero pages, or data at `at` in the batch's buffer.
#[derive(Debug, Clone, Copy)]
struct Piece {
    first: u64,
    count: u64,
    zero: bool,
    at: usize,
}

enum Batch {
    /// A job's pages, read and verified. `failed`: claimed pages that did not read (left to the
    /// demand path, which applies the corrupt-page policy if the guest touches them).
    Pages { region: usize, pieces: Vec<Piece>, data: Vec<u8>, failed: Vec<u64>, prefetch: bool },
    /// Every run of the plan has been read (its batches were all sent before this).
    PlanDone,
}

/// State shared by the serving thread and its readers.
struct Shared {
    regions: Vec<Region>,
    source: Arc<dyn PageSource>,
    installed: Vec<Arc<AtomicBitmap>>,
    claimed: Vec<Arc<AtomicBitmap>>,
    plan: Vec<Run>,
    /// First pass over the plan (demand faults push it forward).
    next: AtomicUsize,
    /// Second pass: picks up the runs a jump skipped.
    sweep: AtomicUsize,
    /// Runs the second pass has finished.
    swept: AtomicUsize,
    /// Read-ahead windows, taken before plan runs.
    queue: Mutex<VecDeque<Job>>,
    wake: Condvar,
    quit: AtomicBool,
    /// Signalled after each batch sent (the serving thread polls it).
    efd: OwnedFd,
}

struct Readers {
    shared: Arc<Shared>,
    /// Always Some until dropped.
    rx: Option<Receiver<Batch>>,
    threads: Vec<JoinHandle<()>>,
    run_of: Vec<Vec<u32>>,
}

/// Dropping the readers stops them and waits for them: when a restore ends, and also when its
/// serving thread panics or cannot start (they would otherwise wait for work forever).
impl Drop for Readers {
    fn drop(&mut self) {
        self.shared.quit.store(true, Relaxed);
        {
            // Under the lock, so a reader between its quit check and its wait cannot miss it.
            let _q = self.shared.queue.lock().unwrap_or_else(|p| p.into_inner());
            self.shared.wake.notify_all();
        }
        // A reader blocked on a full channel fails its send once the receiver is gone.
        drop(self.rx.take());
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Readers {
    fn push(&self, job: Job) {
        let mut q = self.shared.queue.lock().unwrap_or_else(|p| p.into_inner());
        q.push_back(job);
        self.shared.wake.notify_one();
    }
}

/// Faults on one page after its install after which the page is taken to be missing in spite
/// of the kernel's word (the faults of every vCPU queued before its install stay far below
/// this).
const REFAULT_LIMIT: u32 = 1000;

enum Stop {
    Gone,
    /// [`RestoreHandle::stop`] was called.
    Requested,
    /// No memory for a speculative install (caught in `batch_step`).
    NoRoom,
    Corrupt(u64, String),
    Fatal(String),
}

struct Serving {
    uffd: OwnedFd,
    states: Vec<RegionState>,
    source: Arc<dyn PageSource>,
    peer: Peer,
    /// The peer's start time when the restore began (a pid we can see, > 0): without a pidfd,
    /// what tells its exit from a live process, or a later one given its pid.
    peer_start: Option<u64>,
    opts: RestoreOptions,
    stats: Arc<RestoreStats>,
    /// Readable once the restore is asked to stop.
    stop: Arc<OwnedFd>,
    /// Since when, and how long the next sleep is, while the VM's memory cgroup is full.
    memory_wait: Option<(Instant, Duration)>,
    /// Faults on pages already installed, per page (address), since each page's last install
    /// or removal.
    refaults: HashMap<u64, u32>,
    /// Prefetch, fill and read-ahead still install pages; off once the VM's memory cgroup is
    /// full, where speculative pages would take the room its own faults need.
    speculate: bool,
    /// A batch from the readers (speculative pages) is being installed.
    in_batch: bool,
    buf: Vec<u8>,
    zeros: Vec<u8>,
    /// Faults to serve: address, and for a fault served again after waiting on a claimed page,
    /// when it was first read.
    pending: VecDeque<(u64, Option<Instant>)>,
    /// Faults on claimed pages, waiting for the reader's batch (address, when read).
    parked: Vec<(u64, Instant)>,
    events: Vec<Event>,
    ws: Vec<u64>,
    live_ws: Arc<Mutex<Vec<u64>>>,
    fault_ns: Vec<u32>,
    readers: Option<Readers>,
    /// The page right after the last demand-installed run, and how many faults in a row hit it.
    seq_next: (usize, u64),
    seq: u32,
    /// Where the current sequential run of faults began.
    seq_start: u64,
    /// A sequential read-ahead stream: region and the first page not yet given to the readers.
    stream: Option<(usize, u64)>,
    /// Where ranges given back are written down for a successor.
    journal: Option<Journal>,
}

/// The image pages behind region page `p` of `r`.
fn image_pages(r: &Region, p: u64, image_page: u64) -> std::ops::Range<u64> {
    let first = (r.offset + p * r.page_size) / image_page;
    first..first + r.page_size / image_page
}

/// Turns the prefetch list (and fill) into runs of region pages, each at most `batch_bytes`.
fn prefetch_plan(regions: &[Region], source: &dyn PageSource, opts: &RestoreOptions) -> Vec<Run> {
    let ip = source.page_size() as u64;
    let mut seen: Vec<Bitmap> = regions.iter().map(|r| Bitmap::new(r.pages())).collect();
    let mut runs: Vec<Run> = Vec::new();
    // Runs are contiguous pages with up to `batch_bytes` of data pages and up to 8 MiB in all
    // (zero pages cost no read and no copy). Zero and data pages alternate every 2.6 pages on
    // average in a captured 256 MiB guest: runs of one kind each would be tiny batches.
    let push = |runs: &mut Vec<Run>, region: usize, p: u64, bulk: bool| {
        let r = &regions[region];
        let data = u64::from(!all_zero(source, r, p));
        let max_data = (opts.batch_bytes as u64 / r.page_size).max(1);
        let max_span = if r.page_size == 4096 { ZERO_RUN_PAGES } else { max_data };
        if let Some(last) = runs.last_mut()
            && last.region == region
            && last.first + last.count == p
            && last.bulk == bulk
            && last.data + data <= max_data
            && last.count < max_span
        {
            last.count += 1;
            last.data += data;
            return;
        }
        runs.push(Run { region, first: p, count: 1, data, bulk });
    };
    for &page in &opts.prefetch {
        let byte = page.saturating_mul(ip);
        let Some(ri) = regions.iter().position(|r| byte >= r.offset && byte < r.offset + r.size) else {
            continue;
        };
        let p = (byte - regions[ri].offset) / regions[ri].page_size;
        if !seen[ri].set(p, true) {
            push(&mut runs, ri, p, false);
        }
    }
    if opts.fill {
        for (ri, r) in regions.iter().enumerate() {
            for p in 0..r.pages() {
                if !seen[ri].get(p) {
                    push(&mut runs, ri, p, true);
                }
            }
        }
    }
    runs
}

fn all_zero(source: &dyn PageSource, r: &Region, p: u64) -> bool {
    image_pages(r, p, source.page_size() as u64).all(|i| source.is_zero(i))
}

/// Reads region page `p` of `r` into `dst` (one region page), zero image pages zero-filled.
fn read_region_page(source: &dyn PageSource, r: &Region, p: u64, dst: &mut [u8]) -> Result<()> {
    let ip = source.page_size();
    for (j, i) in image_pages(r, p, ip as u64).enumerate() {
        let d = &mut dst[j * ip..(j + 1) * ip];
        if source.is_zero(i) {
            d.fill(0);
        } else {
            source.read_page(i, d)?;
        }
    }
    Ok(())
}

/// Claims the pages of plan run `run` that are neither installed nor claimed.
fn claim_run(sh: &Shared, run: Run) -> Job {
    let (inst, cl) = (&sh.installed[run.region], &sh.claimed[run.region]);
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for p in run.first..run.first + run.count {
        if !inst.get(p) && cl.claim(p) {
            match ranges.last_mut() {
                Some((f, n)) if *f + *n == p => *n += 1,
                _ => ranges.push((p, 1)),
            }
        }
    }
    Job { region: run.region, ranges, prefetch: true, bulk: run.bulk }
}

/// Reads a job's claimed pages: zero pieces cost nothing, data pieces one batched read each (on
/// an error page by page, keeping the good pages and leaving the bad ones to the demand path).
fn read_job(sh: &Shared, job: Job) -> Batch {
    let source = &*sh.source;
    let r = &sh.regions[job.region];
    let (ip, rps) = (source.page_size() as u64, r.page_size as usize);
    let mut pieces: Vec<Piece> = Vec::new();
    let mut data: Vec<u8> = Vec::new();
    let mut failed = Vec::new();
    for &(first, count) in &job.ranges {
        let end = first + count;
        let mut p = first;
        while p < end {
            let zero = all_zero(source, r, p);
            let mut q = p + 1;
            while q < end && all_zero(source, r, q) == zero {
                q += 1;
            }
            if zero {
                pieces.push(Piece { first: p, count: q - p, zero: true, at: 0 });
                p = q;
                continue;
            }
            let at = data.len();
            data.resize(at + (q - p) as usize * rps, 0);
            let first_image_page = image_pages(r, p, ip).start;
            let read = if job.bulk {
                source.read_pages_bulk(first_image_page, &mut data[at..])
            } else {
                source.read_pages(first_image_page, &mut data[at..])
            };
            if read.is_ok() {
                pieces.push(Piece { first: p, count: q - p, zero: false, at });
            } else {
                for k in p..q {
                    let off = at + (k - p) as usize * rps;
                    match read_region_page(source, r, k, &mut data[off..off + rps]) {
                        Ok(()) => match pieces.last_mut() {
                            Some(pc)
                                if !pc.zero && pc.first + pc.count == k && pc.at + pc.count as usize * rps == off =>
                            {
                                pc.count += 1
                            }
                            _ => pieces.push(Piece { first: k, count: 1, zero: false, at: off }),
                        },
                        Err(e) => {
                            // Not installing it leaves it to the demand path, which applies the
                            // corrupt-page policy if (and only if) the guest touches it.
                            warn!(page = k, "read-ahead skips an unreadable page: {e}");
                            failed.push(k);
                        }
                    }
                }
            }
            p = q;
        }
    }
    Batch::Pages { region: job.region, pieces, data, failed, prefetch: job.prefetch }
}

/// A reader thread: read-ahead windows first (a guest is waiting on them), then the prefetch
/// plan in order; asleep when there is neither.
fn reader_loop(sh: &Shared, tx: SyncSender<Batch>) {
    let send = |b: Batch| -> bool {
        if tx.send(b).is_err() {
            return false;
        }
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a local to an eventfd we share.
        unsafe { libc::write(sh.efd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        true
    };
    let len = sh.plan.len();
    loop {
        let queued = {
            let mut q = sh.queue.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if sh.quit.load(Relaxed) {
                    return;
                }
                if let Some(job) = q.pop_front() {
                    break Some(job);
                }
                if sh.next.load(Relaxed) < len || sh.sweep.load(Relaxed) < len {
                    break None;
                }
                q = sh.wake.wait(q).unwrap_or_else(|p| p.into_inner());
            }
        };
        let (job, swept) = match queued {
            Some(job) => (job, false),
            None => {
                // First pass follows the cursor (which demand faults push forward); the second
                // picks up the runs a jump skipped (pages installed or claimed are left out).
                let i = sh.next.fetch_add(1, Relaxed);
                if i < len {
                    // Pages a preload is about to bring are waited for before they are claimed:
                    // meanwhile a demand fault on one reads it itself rather than wait here.
                    let run = sh.plan[i];
                    let r = &sh.regions[run.region];
                    let ip = sh.source.page_size() as u64;
                    let first = image_pages(r, run.first, ip).start;
                    sh.source.wait_preloaded(first, run.count * (r.page_size / ip));
                    (claim_run(sh, run), false)
                } else {
                    let i = sh.sweep.fetch_add(1, Relaxed);
                    if i >= len {
                        continue;
                    }
                    (claim_run(sh, sh.plan[i]), true)
                }
            }
        };
        if !job.ranges.is_empty() && !send(read_job(sh, job)) {
            return;
        }
        if swept && sh.swept.fetch_add(1, Relaxed) + 1 == len && !send(Batch::PlanDone) {
            return;
        }
    }
}

impl Serving {
    fn fd(&self) -> BorrowedFd<'_> {
        self.uffd.as_fd()
    }

    fn run(mut self) -> RestoreReport {
        let stop = self.stop.clone();
        let end = match self.serve(&stop) {
            Ok(()) | Err(Stop::Requested | Stop::NoRoom) => EndReason::Stopped,
            Err(Stop::Gone) => EndReason::PeerExited,
            Err(Stop::Corrupt(page, message)) => EndReason::CorruptPage { page, pid: self.peer.pid, message },
            Err(Stop::Fatal(message)) => {
                // Nobody else will answer its faults: ended, the VM fails visibly instead of
                // hanging on its next page.
                let killed = self.end_peer();
                error!(pid = self.peer.pid, "restore failed: {message}{killed}");
                EndReason::Failed { message: format!("{message}{killed}") }
            }
        };
        // Dropping the readers stops them and waits for them.
        self.readers = None;
        let adopted = self.journal.as_ref().is_some_and(Journal::adopted);
        // A VM killed for a corrupt page or a failure, or whose memory is being torn down (ESRCH), may not
        // have exited yet: give it a moment, so that its journal goes with it.
        if matches!(end, EndReason::PeerExited | EndReason::CorruptPage { .. } | EndReason::Failed { .. })
            && let Some(pidfd) = &self.peer.pidfd
        {
            pidfd_wait(pidfd.as_fd(), std::time::Duration::from_secs(2));
        }
        if let Some(journal) = self.journal.take() {
            // Removed once the VM is gone; kept, for a successor, while it runs on.
            journal.close();
        }
        let ip = self.source.page_size() as u64;
        let mut touched = Vec::new();
        for st in &self.states {
            for p in 0..st.r.pages() {
                if st.installed.get(p) || st.removed.get(p) {
                    touched.extend(image_pages(&st.r, p, ip));
                }
            }
        }
        touched.sort_unstable();
        info!(pid = self.peer.pid, ?end, faults = self.ws.len(), "restore ended");
        RestoreReport {
            pid: self.peer.pid,
            end,
            stats: self.stats.snapshot(),
            working_set: std::mem::take(&mut self.ws),
            touched,
            adopted,
            fault_ns: std::mem::take(&mut self.fault_ns),
        }
    }

    fn serve(&mut self, stop: &OwnedFd) -> std::result::Result<(), Stop> {
        loop {
            self.drain()?;
            if let Some((addr, t0)) = self.pending.pop_front() {
                self.on_fault(addr, t0)?;
                continue;
            }
            if self.batch_step()? {
                continue;
            }
            // Nothing to do: sleep until a fault, the peer's exit, a stop request or a batch.
            let mut fds = vec![
                libc::pollfd { fd: self.uffd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: stop.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            ];
            if let Some(pidfd) = &self.peer.pidfd {
                fds.push(libc::pollfd { fd: pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 });
            }
            if let Some(rd) = &self.readers {
                fds.push(libc::pollfd { fd: rd.shared.efd.as_raw_fd(), events: libc::POLLIN, revents: 0 });
            }
            // Without a pidfd nothing wakes us when the peer exits (a userfaultfd reports no
            // hangup while we hold it): look for its pid now and then instead.
            let timeout = if self.peer.pidfd.is_none() { 1000 } else { -1 };
            // SAFETY: `fds` is a valid array of pollfd of the given length.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            if n == 0
                && let (Some(pid), Some(t0)) = (self.peer.pid, self.peer_start)
                && peer_gone(pid, t0)
            {
                return Err(Stop::Gone);
            }
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(Stop::Fatal(format!("poll: {e}")));
            }
            if fds[1].revents != 0 {
                return Ok(());
            }
            if self.peer.pidfd.is_some() && fds[2].revents != 0 {
                return Err(Stop::Gone);
            }
            if fds[0].revents & (libc::POLLERR | libc::POLLHUP) != 0 {
                return Err(Stop::Gone);
            }
            if let Some(rd) = &self.readers
                && fds.last().is_some_and(|f| f.revents != 0)
            {
                let mut v = 0u64;
                // SAFETY: reading 8 bytes into a local from an eventfd we own (resets it).
                unsafe { libc::read(rd.shared.efd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
            }
        }
    }

    /// Reads every pending event: faults are queued, REMOVE/UNMAP applied at once.
    fn drain(&mut self) -> std::result::Result<(), Stop> {
        self.events.clear();
        let mut events = std::mem::take(&mut self.events);
        let res = uffd::read_events(self.fd(), &mut events);
        for ev in events.drain(..) {
            match ev {
                Event::Pagefault { addr, .. } => self.pending.push_back((addr, None)),
                Event::Remove { start, end } | Event::Unmap { start, end } => {
                    self.apply_remove(start, end);
                    if let Some(j) = &mut self.journal {
                        j.removed(start, end);
                    }
                }
                Event::Other(code) => debug!(code, "ignored userfaultfd event"),
            }
        }
        self.events = events;
        match res {
            Ok(_) => Ok(()),
            Err(e) => Err(Stop::Fatal(format!("read userfaultfd: {e}"))),
        }
    }

    /// Later faults in `[start, end)` are served as zero pages: the guest gave those pages back.
    fn apply_remove(&mut self, start: u64, end: u64) {
        for st in &mut self.states {
            let (rs, re) = (st.r.base, st.r.base + st.r.size);
            let (s, e) = (start.max(rs), end.min(re));
            if s >= e {
                continue;
            }
            let first = (s - rs) / st.r.page_size;
            let last = (e - rs).div_ceil(st.r.page_size);
            for p in first..last {
                st.installed.set(p, false);
                if !st.removed.set(p, true) {
                    self.stats.pages_removed.fetch_add(1, Relaxed);
                }
            }
            debug!(start, end, pages = last - first, "range removed");
            self.refaults.clear();
        }
    }

    fn locate(&self, addr: u64) -> Option<(usize, u64)> {
        self.states
            .iter()
            .position(|s| addr >= s.r.base && addr < s.r.base + s.r.size)
            .map(|i| (i, (addr - self.states[i].r.base) / self.states[i].r.page_size))
    }

    fn on_fault(&mut self, addr: u64, first_seen: Option<Instant>) -> std::result::Result<(), Stop> {
        let t0 = first_seen.unwrap_or_else(Instant::now);
        let Some((ri, p)) = self.locate(addr) else {
            // Cannot happen with a sane peer; the faulting thread stays blocked, so say so.
            error!(addr, pid = self.peer.pid, "fault outside every region");
            return Ok(());
        };
        if first_seen.is_none() {
            self.stats.faults.fetch_add(1, Relaxed);
        }
        let st = &self.states[ri];
        let r = st.r;
        let dst = r.base + p * r.page_size;
        if st.installed.get(p) {
            // Installed since the fault was queued (prefetch or fault-around): just wake.
            let _ = uffd::wake(self.fd(), dst, r.page_size as usize);
            // Unless the page is not there after all and the guest faults on it again and again:
            // a hugetlb UFFDIO_COPY answers EEXIST when no huge page can be allocated, so this
            // is what an exhausted pool looks like. End it rather than spin with the guest.
            if self.refaults.len() >= 4096 {
                // Kept small: forgetting counts only delays the verdict.
                self.refaults.clear();
            }
            let count = self.refaults.entry(dst).or_insert(0);
            *count += 1;
            if *count > REFAULT_LIMIT {
                let hint = if r.page_size == 4096 {
                    ""
                } else {
                    " (the kernel answers EEXIST to a hugetlb copy when no huge page is free: is the pool exhausted?)"
                };
                return Err(Stop::Fatal(format!(
                    "the guest faulted {REFAULT_LIMIT} times on the page at {dst:#x} since the kernel said it was present{hint}"
                )));
            }
            return Ok(());
        }
        let removed = st.removed.get(p);
        self.record(ri, p, 1);
        let in_stream = self.in_stream(ri, p);
        if self.states[ri].claimed.get(p) {
            // A reader is reading this page: its batch installs it (and the copy wakes the
            // guest). Keep the read-ahead ahead of a guest streaming through memory.
            self.parked.push((addr, t0));
            if in_stream {
                self.feed_stream(ri, p);
            }
            return Ok(());
        }
        if self.seq_next == (ri, p) {
            self.seq = self.seq.saturating_add(1);
        } else {
            self.seq = 0;
            self.seq_start = p;
        }
        if removed || all_zero(&*self.source, &r, p) {
            // Zero pages come in long runs (free guest memory): map the following zero (or
            // removed) pages too, in the same ioctl. They cost a page-table entry each, no copy.
            // Claimed pages are a reader's to install.
            let mut n = 1;
            if r.page_size == 4096 {
                let st = &self.states[ri];
                while n < ZERO_AROUND_PAGES
                    && p + n < r.pages()
                    && !st.installed.get(p + n)
                    && !st.claimed.get(p + n)
                    && (st.removed.get(p + n) || all_zero(&*self.source, &r, p + n))
                {
                    n += 1;
                }
            }
            self.install_zero(ri, p, n)?;
            self.seq_next = (ri, p + n);
        } else {
            if !self.states[ri].claimed.claim(p) {
                // A reader claimed it just now.
                self.parked.push((addr, t0));
                return Ok(());
            }
            let mut max = if r.page_size == 4096 { (self.opts.fault_around as u64 / r.page_size).max(1) } else { 1 };
            // Sequential read-ahead: a fault right after the previous demand run reads as many
            // pages as the guest has gone through sequentially so far (so 2, 4, 8... up to
            // `readahead`), which keeps short runs cheap; once the guest has gone through two
            // windows it is streaming through memory and the readers take over, several windows
            // deep. Measured in pages, not faults: zero pages between data pages make many
            // faults in a short run.
            let window = self.window_pages();
            let gone = p - self.seq_start;
            let streaming = r.page_size == 4096 && window > 1 && (in_stream || (self.seq > 0 && gone >= 2 * window));
            if r.page_size == 4096 && self.seq > 0 && !streaming {
                max = max.max(gone.clamp(1, window));
            }
            if let Some(rd) = &self.readers
                && let Some(&idx) = rd.run_of[ri].get(p as usize)
                && idx != u32::MAX
            {
                rd.shared.next.fetch_max(idx as usize + 1, Relaxed);
                let run = rd.shared.plan[idx as usize];
                max = max.max(run.first + run.count - p);
            }
            // Read (and claim) the following pages that nobody else will install, as many as
            // the buffer holds.
            let max = max.min((self.buf.len() as u64 / r.page_size).max(1));
            let st = &self.states[ri];
            let mut n = 1;
            while n < max
                && p + n < r.pages()
                && !st.installed.get(p + n)
                && !st.removed.get(p + n)
                && !all_zero(&*self.source, &r, p + n)
                && st.claimed.claim(p + n)
            {
                n += 1;
            }
            let res = self.read_run(ri, p, n).and_then(|k| self.install_data(ri, p, k, None).map(|_| k));
            for q in p..p + n {
                self.states[ri].claimed.set(q, false);
            }
            let read = res?;
            if self.states[ri].removed.get(p) && !self.states[ri].installed.get(p) {
                // Given back while its install retried (a REMOVE drained meanwhile): its fault
                // event is spent, so serve it again, as the zero page it now is.
                self.pending.push_front((addr, Some(t0)));
                return Ok(());
            }
            self.record(ri, p, read);
            self.seq_next = (ri, p + n);
            // Hand the pages ahead to the readers, so they are read in parallel while this
            // thread installs and the guest runs.
            if streaming {
                self.feed_stream(ri, p + n);
            }
        }
        self.record_latency(t0);
        Ok(())
    }

    /// Adds region pages `p..p + n` to the working set where they are not in it yet: the page a
    /// fault asked for, and the data pages installed with it (fault-around, read-ahead), which a
    /// restore that prefetches only the faulted pages would have to fault in again.
    fn record(&mut self, ri: usize, p: u64, n: u64) {
        // On the fault path: no allocation, and the shared copy is locked only when it grows.
        let image_page = self.source.page_size() as u64;
        let from = self.ws.len();
        let st = &mut self.states[ri];
        for q in p..p + n {
            if !st.removed.get(q) && !st.recorded.set(q, true) {
                self.ws.push(image_pages(&st.r, q, image_page).start);
            }
        }
        if self.ws.len() > from
            && let Ok(mut w) = self.live_ws.lock()
        {
            w.extend_from_slice(&self.ws[from..]);
        }
    }

    fn record_latency(&mut self, t0: Instant) {
        if self.fault_ns.len() < self.opts.max_latency_samples {
            self.fault_ns.push(t0.elapsed().as_nanos().min(u32::MAX as u128) as u32);
        }
    }

    /// Read-ahead windows in flight at once: one per reader, plus one queued.
    fn stream_depth(&self) -> u64 {
        self.readers.as_ref().map_or(1, |r| r.threads.len() as u64 + 1)
    }

    fn window_pages(&self) -> u64 {
        (self.opts.readahead as u64 / 4096).max(1)
    }

    /// True when page `p` of region `ri` lies in the current read-ahead stream's reach.
    fn in_stream(&self, ri: usize, p: u64) -> bool {
        let reach = self.window_pages() * (self.stream_depth() + 1);
        matches!(self.stream, Some((r, next)) if r == ri && p <= next && next <= p + reach)
    }

    /// Gives the readers the pages from `from` on, window by window (each up to `readahead`
    /// bytes of data pages, or 8 MiB of zero pages), until [`Serving::stream_depth`] windows lie
    /// ahead of `from`. Pages installed, removed or claimed are left out.
    fn feed_stream(&mut self, ri: usize, from: u64) {
        if !self.speculate {
            return;
        }
        let (w, depth) = (self.window_pages(), self.stream_depth());
        let pages = self.states[ri].r.pages();
        let mut next = match self.stream {
            Some((r, n)) if r == ri && n >= from && n <= from + depth * w => n,
            _ => from,
        };
        while next < from + depth * w && next < pages {
            let st = &self.states[ri];
            let mut ranges: Vec<(u64, u64)> = Vec::new();
            let (mut data, mut p) = (0, next);
            while p < pages && data < w && p - next < ZERO_RUN_PAGES {
                if !st.installed.get(p) && !st.removed.get(p) && st.claimed.claim(p) {
                    match ranges.last_mut() {
                        Some((f, n)) if *f + *n == p => *n += 1,
                        _ => ranges.push((p, 1)),
                    }
                    if !all_zero(&*self.source, &st.r, p) {
                        data += 1;
                    }
                }
                p += 1;
            }
            if !ranges.is_empty()
                && let Some(rd) = &self.readers
            {
                rd.push(Job { region: ri, ranges, prefetch: false, bulk: true });
            }
            next = p;
        }
        tracing::trace!(region = ri, from, next, seq = self.seq, "read-ahead stream");
        self.stream = Some((ri, next));
    }

    /// Reads region pages `p..p+n` into `self.buf`; returns how many leading pages were read.
    /// A bad first page applies the corrupt-page policy.
    fn read_run(&mut self, ri: usize, p: u64, n: u64) -> std::result::Result<u64, Stop> {
        let r = self.states[ri].r;
        let ip = self.source.page_size();
        let rps = r.page_size as usize;
        // The whole run in one batched read; on an error, page by page to find the bad one.
        let first = image_pages(&r, p, ip as u64).start;
        if self.source.read_pages(first, &mut self.buf[..n as usize * rps]).is_ok() {
            return Ok(n);
        }
        for k in 0..n {
            for (j, i) in image_pages(&r, p + k, ip as u64).enumerate() {
                let at = k as usize * rps + j * ip;
                let dst = &mut self.buf[at..at + ip];
                if self.source.is_zero(i) {
                    dst.fill(0);
                    continue;
                }
                if let Err(e) = self.source.read_page(i, dst) {
                    if k > 0 {
                        return Ok(k);
                    }
                    return self.corrupt(ri, p, i, e).map(|()| 0);
                }
            }
        }
        Ok(n)
    }

    /// Applies the corrupt-page policy to region page `p` whose image page `i` failed.
    fn corrupt(&mut self, ri: usize, p: u64, i: u64, e: Error) -> std::result::Result<(), Stop> {
        let r = self.states[ri].r;
        let msg = e.to_string();
        match (&self.opts.on_corrupt, &self.peer.pidfd) {
            (CorruptPolicy::KillPeer, Some(pidfd)) => {
                error!(
                    pid = self.peer.pid,
                    page = i,
                    "corrupt page: killing the VM rather than letting it run on wrong bytes: {msg}"
                );
                if let Err(ke) = pidfd_kill(pidfd.as_fd()) {
                    error!(pid = self.peer.pid, "could not kill the VM: {ke}");
                }
                Err(Stop::Corrupt(i, msg))
            }
            _ => {
                error!(pid = self.peer.pid, page = i, "corrupt page: poisoning it (an access raises SIGBUS): {msg}");
                let dst = r.base + p * r.page_size;
                loop {
                    match uffd::poison(self.fd(), dst, r.page_size as usize) {
                        Ok(Fill::Gone) => return Err(Stop::Gone),
                        Ok(Fill::Done) => break,
                        Ok(Fill::Exists) => {
                            let _ = uffd::wake(self.fd(), dst, r.page_size as usize);
                            break;
                        }
                        // Nothing poisoned yet (a mapping change is pending): apply the events,
                        // then poison again, unless the guest gave the page back meanwhile,
                        // when it is a zero page like any other given back.
                        Ok(Fill::Again | Fill::Partial(_)) => {
                            self.stats.eagain.fetch_add(1, Relaxed);
                            self.drain()?;
                            if self.states[ri].removed.get(p) {
                                return self.install_zero(ri, p, 1);
                            }
                        }
                        Err(pe) => {
                            // (UFFDIO_POISON is Linux 6.6+.) Left unanswered the guest would wait
                            // forever: the VM is ended instead, as KillPeer would.
                            let killed = self.end_peer();
                            error!(pid = self.peer.pid, page = i, "corrupt page, poison failed ({pe}){killed}");
                            return Err(Stop::Corrupt(i, format!("{msg}; poison failed: {pe}{killed}")));
                        }
                    }
                }
                self.states[ri].installed.set(p, true);
                Ok(())
            }
        }
    }

    fn install_zero(&mut self, ri: usize, p: u64, n: u64) -> std::result::Result<(), Stop> {
        let r = self.states[ri].r;
        if r.page_size != 4096 {
            // hugetlb has no UFFDIO_ZEROPAGE: copy zeros, one huge page at a time.
            if self.zeros.len() < r.page_size as usize {
                self.zeros = vec![0; r.page_size as usize];
            }
            for k in p..p + n {
                let zeros = std::mem::take(&mut self.zeros);
                // Zeros are right for a page given back too: no skipping it here (the guest
                // faulted on it and waits for this copy).
                let res = self.copy_pages(ri, k, 1, zeros.as_ptr(), false);
                self.zeros = zeros;
                self.stats.pages_zeroed.fetch_add(res?, Relaxed);
            }
            return Ok(());
        }
        let mut k = p;
        let mut single = false;
        while k < p + n {
            let dst = r.base + k * r.page_size;
            let len = if single { r.page_size as usize } else { ((p + n - k) * r.page_size) as usize };
            self.stats.ioctls.fetch_add(1, Relaxed);
            match uffd::zeropage(self.fd(), dst, len) {
                Ok(Fill::Done) => {
                    self.memory_is_back();
                    let d = len as u64 / r.page_size;
                    for q in k..k + d {
                        self.mark_installed(ri, q);
                    }
                    self.forget_refaults(ri, k, d);
                    self.stats.pages_zeroed.fetch_add(d, Relaxed);
                    k += d;
                }
                Ok(Fill::Partial(done)) => {
                    self.memory_is_back();
                    let d = done as u64 / r.page_size;
                    for q in k..k + d {
                        self.mark_installed(ri, q);
                    }
                    self.forget_refaults(ri, k, d);
                    self.stats.pages_zeroed.fetch_add(d, Relaxed);
                    k += d;
                }
                Ok(Fill::Exists) => {
                    self.exists(ri, k);
                    k += 1;
                }
                Ok(Fill::Again) => {
                    self.stats.eagain.fetch_add(1, Relaxed);
                    self.drain()?;
                }
                Ok(Fill::Gone) => return Err(Stop::Gone),
                Err(e) if e.raw_os_error() == Some(libc::ENOMEM) => self.out_of_memory("UFFDIO_ZEROPAGE", dst)?,
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EINVAL)) => {
                    let multi = len > r.page_size as usize;
                    if self.unmapped("UFFDIO_ZEROPAGE", ri, k, multi, &e)? {
                        single = true;
                    } else {
                        k += 1;
                    }
                }
                Err(e) => return Err(self.ioctl_failed("UFFDIO_ZEROPAGE", dst, e)),
            }
        }
        Ok(())
    }

    fn mark_installed(&mut self, ri: usize, p: u64) {
        let st = &mut self.states[ri];
        st.installed.set(p, true);
        st.removed.set(p, false);
    }

    /// An install of region pages `p..p+n` succeeded: faults on them start counting afresh.
    fn forget_refaults(&mut self, ri: usize, p: u64, n: u64) {
        if self.refaults.is_empty() {
            return;
        }
        let r = self.states[ri].r;
        for q in p..p + n {
            self.refaults.remove(&(r.base + q * r.page_size));
        }
    }

    /// EEXIST for region page `p`: present, so installed, unless a REMOVE for it was read: then
    /// the page is still to be zapped and the guest's next fault on it gets zeros. Either way
    /// the threads waiting on it are woken.
    fn exists(&mut self, ri: usize, p: u64) {
        self.stats.eexist.fetch_add(1, Relaxed);
        self.memory_is_back();
        let r = self.states[ri].r;
        let _ = uffd::wake(self.fd(), r.base + p * r.page_size, r.page_size as usize);
        if !self.states[ri].removed.get(p) {
            self.mark_installed(ri, p);
        }
    }

    fn ioctl_failed(&self, what: &str, dst: u64, e: std::io::Error) -> Stop {
        if e.raw_os_error() == Some(libc::ENOMEM) {
            // (4 KiB pages wait for memory instead: `wait_for_memory`.)
            return Stop::Fatal(format!("{what} at {dst:#x}: no free huge page (the hugetlb pool is exhausted): {e}"));
        }
        Stop::Fatal(format!("{what} at {dst:#x}: {e}"))
    }

    /// ENOENT or EINVAL installing region page `page` (`multi`: as the first of several): the
    /// range is no longer mapped and registered as it was. If the peer is gone (tearing down),
    /// the restore ends. If it lives on, it changed part of its memory's mapping (unmapped,
    /// moved or split it, without an event): a range is retried page by page (returns true),
    /// and a single page that fails is not ours any more and is left alone, marked done.
    fn unmapped(
        &mut self,
        what: &str,
        ri: usize,
        page: u64,
        multi: bool,
        e: &std::io::Error,
    ) -> std::result::Result<bool, Stop> {
        let r = self.states[ri].r;
        let dst = r.base + page * r.page_size;
        if !self.peer_alive() {
            warn!(pid = self.peer.pid, dst, "{what}: {e}; ending this restore");
            return Err(Stop::Gone);
        }
        if multi {
            return Ok(true);
        }
        debug!(pid = self.peer.pid, dst, "{what}: {e}: no longer mapped as registered; left alone");
        let _ = uffd::wake(self.fd(), dst, r.page_size as usize);
        self.mark_installed(ri, page);
        Ok(false)
    }

    /// Whether the peer is known to be running still.
    fn peer_alive(&self) -> bool {
        match (&self.peer.pidfd, self.peer.pid, self.peer_start) {
            (Some(pidfd), ..) => !pidfd_wait(pidfd.as_fd(), Duration::ZERO),
            (None, Some(pid), Some(t0)) => !peer_gone(pid, t0),
            _ => false,
        }
    }

    /// SIGKILLs the peer, which nobody will serve any more; says what happened, for the log.
    fn end_peer(&self) -> String {
        match &self.peer.pidfd {
            Some(pidfd) => pidfd_kill(pidfd.as_fd())
                .map_or_else(|e| format!("; could not kill the VM: {e}"), |()| "; the VM was killed".into()),
            None => "; the VM could not be killed (no pidfd) and stalls".into(),
        }
    }

    /// ENOMEM installing at `dst` (4 KiB pages): a speculative install (a batch of prefetch,
    /// fill or read-ahead) gives up, and speculation stops for good, leaving the cgroup's room
    /// to the guest's own faults; a demand install waits for memory.
    fn out_of_memory(&mut self, what: &str, dst: u64) -> std::result::Result<(), Stop> {
        if !self.in_batch {
            return self.wait_for_memory(what, dst);
        }
        if self.speculate {
            warn!(
                pid = self.peer.pid,
                "{what} at {dst:#x}: the VM's memory cgroup is full (ENOMEM); prefetch and read-ahead stop, faults are served as they come"
            );
            self.speculate = false;
            self.stream = None;
            if let Some(rd) = &self.readers {
                // The readers see the plan done (they only count past its end from here).
                rd.shared.next.fetch_max(rd.shared.plan.len(), Relaxed);
                rd.shared.sweep.fetch_max(rd.shared.plan.len(), Relaxed);
            }
        }
        Err(Stop::NoRoom)
    }

    /// An install at `dst` found the VM's memory cgroup full: ENOMEM from charging the page to
    /// it (cgroup v1 with `oom_kill_disable`; otherwise the kernel's OOM killer acts first).
    /// The VM's own page faults would wait there until memory is freed or the limit raised, so
    /// its faults on us wait too: sleep a little (1 ms, doubling to 100 ms), then the caller
    /// retries. Meanwhile events are drained (a balloon giving pages back frees memory and
    /// blocks until its REMOVE is read), and a stop request or the peer's exit ends the wait.
    fn wait_for_memory(&mut self, what: &str, dst: u64) -> std::result::Result<(), Stop> {
        let (since, sleep) = match self.memory_wait {
            Some(w) => w,
            None => {
                warn!(
                    pid = self.peer.pid,
                    "{what} at {dst:#x}: the VM's memory cgroup is full (ENOMEM); waiting for memory, as its own page faults would"
                );
                (Instant::now(), Duration::from_millis(1))
            }
        };
        self.stats.memory_waits.fetch_add(1, Relaxed);
        self.memory_wait = Some((since, (sleep * 2).min(Duration::from_millis(100))));
        let mut fds = vec![libc::pollfd { fd: self.stop.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
        if let Some(pidfd) = &self.peer.pidfd {
            fds.push(libc::pollfd { fd: pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 });
        }
        // SAFETY: `fds` is a valid array of pollfd of the given length. (EINTR: a shorter sleep.)
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, sleep.as_millis() as i32) };
        if fds[0].revents != 0 {
            return Err(Stop::Requested);
        }
        if fds.get(1).is_some_and(|f| f.revents != 0) {
            return Err(Stop::Gone);
        }
        if let (None, Some(pid), Some(t0)) = (&self.peer.pidfd, self.peer.pid, self.peer_start)
            && peer_gone(pid, t0)
        {
            return Err(Stop::Gone);
        }
        self.drain()
    }

    /// An install succeeded: if the VM's memory cgroup was full, it has room again.
    fn memory_is_back(&mut self) {
        if let Some((since, _)) = self.memory_wait.take() {
            info!(pid = self.peer.pid, waited = ?since.elapsed(), "the VM's memory cgroup has room again");
        }
    }

    /// Installs region pages `p..p+n` from `data` (or `self.buf`), skipping pages already
    /// installed or removed meanwhile. Returns pages installed.
    fn install_data(&mut self, ri: usize, p: u64, n: u64, data: Option<&[u8]>) -> std::result::Result<u64, Stop> {
        let rps = self.states[ri].r.page_size;
        let buf = std::mem::take(&mut self.buf);
        let src = data.unwrap_or(&buf);
        let mut installed = 0;
        let mut k = p;
        let res = loop {
            if k >= p + n {
                break Ok(installed);
            }
            let st = &self.states[ri];
            if st.installed.get(k) || st.removed.get(k) {
                k += 1;
                continue;
            }
            let mut e = k + 1;
            while e < p + n && !st.installed.get(e) && !st.removed.get(e) {
                e += 1;
            }
            let ptr = src[((k - p) * rps) as usize..].as_ptr();
            match self.copy_pages(ri, k, e - k, ptr, true) {
                Ok(done) => {
                    self.stats.pages_copied.fetch_add(done, Relaxed);
                    installed += done;
                }
                Err(s) => break Err(s),
            }
            k = e;
        };
        self.buf = buf;
        res
    }

    /// UFFDIO_COPY of `n` region pages at page `p` from `src`, following the kernel's rules.
    /// With `skip_removed` (snapshot content), pages given back are left out. Returns the
    /// pages this call installed.
    fn copy_pages(
        &mut self,
        ri: usize,
        p: u64,
        n: u64,
        src: *const u8,
        skip_removed: bool,
    ) -> std::result::Result<u64, Stop> {
        let r = self.states[ri].r;
        let len = (n * r.page_size) as usize;
        let dst = r.base + p * r.page_size;
        let mut done = 0usize;
        let mut installed = 0;
        // After a range failed as no longer mapped: the rest one page at a time.
        let mut single = false;
        while done < len {
            let page = p + (done as u64) / r.page_size;
            let removed = |q: u64| skip_removed && self.states[ri].removed.get(q);
            if removed(page) {
                // A REMOVE drained while retrying covers this page: it must read zero now,
                // not the snapshot's content. Leave it to fault again.
                done += r.page_size as usize;
                continue;
            }
            // Copy up to the next removed page (none unless a retry drained a REMOVE).
            let mut end = done + r.page_size as usize;
            while !single && end < len && !removed(p + end as u64 / r.page_size) {
                end += r.page_size as usize;
            }
            self.stats.ioctls.fetch_add(1, Relaxed);
            // SAFETY: `src` points to `len` readable bytes (the caller's buffer of n pages).
            let res = unsafe { uffd::copy(self.fd(), dst + done as u64, src.add(done), end - done) };
            match res {
                Ok(Fill::Done) => {
                    self.memory_is_back();
                    let d = (end - done) as u64 / r.page_size;
                    for q in page..page + d {
                        self.mark_installed(ri, q);
                    }
                    self.forget_refaults(ri, page, d);
                    installed += d;
                    done = end;
                }
                Ok(Fill::Partial(k)) => {
                    self.memory_is_back();
                    let d = k as u64 / r.page_size;
                    for q in page..page + d {
                        self.mark_installed(ri, q);
                    }
                    self.forget_refaults(ri, page, d);
                    installed += d;
                    done += (d * r.page_size) as usize;
                }
                Ok(Fill::Exists) => {
                    self.exists(ri, page);
                    done += r.page_size as usize;
                }
                Ok(Fill::Again) => {
                    self.stats.eagain.fetch_add(1, Relaxed);
                    self.drain()?;
                }
                Ok(Fill::Gone) => return Err(Stop::Gone),
                Err(e) if e.raw_os_error() == Some(libc::ENOMEM) && r.page_size == 4096 => {
                    self.out_of_memory("UFFDIO_COPY", dst + done as u64)?;
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EINVAL)) => {
                    let multi = end - done > r.page_size as usize;
                    if self.unmapped("UFFDIO_COPY", ri, page, multi, &e)? {
                        single = true;
                    } else {
                        done += r.page_size as usize;
                    }
                }
                Err(e) => return Err(self.ioctl_failed("UFFDIO_COPY", dst + done as u64, e)),
            }
        }
        Ok(installed)
    }

    /// Installs one batch from the readers if one is ready. Returns false when there is none now.
    fn batch_step(&mut self) -> std::result::Result<bool, Stop> {
        let Some(rx) = self.readers.as_ref().and_then(|rd| rd.rx.as_ref()) else {
            return Ok(false);
        };
        let (region, pieces, data, failed, prefetch) = match rx.try_recv() {
            Ok(Batch::Pages { region, pieces, data, failed, prefetch }) => (region, pieces, data, failed, prefetch),
            Ok(Batch::PlanDone) => {
                self.stats.prefetch_done.store(true, Relaxed);
                debug!(pid = self.peer.pid, "prefetch complete");
                return Ok(true);
            }
            // Readers end only when told to (or if one panicked): nothing more will come.
            Err(_) => return Ok(false),
        };
        // Once the cgroup is full, what the readers still send is dropped: the demand path
        // serves those pages if the guest wants them.
        let res = if self.speculate {
            self.in_batch = true;
            let res = self.install_pieces(region, &pieces, &data, prefetch);
            self.in_batch = false;
            if matches!(res, Err(Stop::NoRoom)) { Ok(()) } else { res }
        } else {
            Ok(())
        };
        // Give the claims back whatever happened: a page not installed now (removed meanwhile,
        // or unreadable) is the demand path's again.
        let cl = &self.states[region].claimed;
        for pc in &pieces {
            for q in pc.first..pc.first + pc.count {
                cl.set(q, false);
            }
        }
        for &q in &failed {
            cl.set(q, false);
        }
        res?;
        self.recheck_parked();
        Ok(true)
    }

    fn install_pieces(
        &mut self,
        region: usize,
        pieces: &[Piece],
        data: &[u8],
        prefetch: bool,
    ) -> std::result::Result<(), Stop> {
        let rps = self.states[region].r.page_size as usize;
        let stats = self.stats.clone();
        let counter = if prefetch { &stats.pages_prefetched } else { &stats.pages_readahead };
        for pc in pieces {
            if !pc.zero {
                let done =
                    self.install_data(region, pc.first, pc.count, Some(&data[pc.at..pc.at + pc.count as usize * rps]))?;
                counter.fetch_add(done, Relaxed);
                if !prefetch {
                    // Read ahead of a streaming guest: part of what it needed.
                    self.record(region, pc.first, pc.count);
                }
                continue;
            }
            let st = &self.states[region];
            // Zero pieces skip pages installed or removed since they were claimed.
            let todo: Vec<u64> =
                (pc.first..pc.first + pc.count).filter(|&q| !st.installed.get(q) && !st.removed.get(q)).collect();
            let mut i = 0;
            while i < todo.len() {
                let mut j = i + 1;
                while j < todo.len() && todo[j] == todo[j - 1] + 1 {
                    j += 1;
                }
                self.install_zero(region, todo[i], (j - i) as u64)?;
                counter.fetch_add((j - i) as u64, Relaxed);
                i = j;
            }
        }
        Ok(())
    }

    /// After a batch: parked faults whose page is now installed were woken by the install;
    /// those whose page is neither installed nor claimed any more are served on the demand path.
    fn recheck_parked(&mut self) {
        let mut i = 0;
        while i < self.parked.len() {
            let (addr, t0) = self.parked[i];
            let Some((ri, p)) = self.locate(addr) else {
                self.parked.swap_remove(i);
                continue;
            };
            let st = &self.states[ri];
            if st.installed.get(p) {
                self.parked.swap_remove(i);
                self.record_latency(t0);
            } else if !st.claimed.get(p) {
                self.parked.swap_remove(i);
                self.pending.push_front((addr, Some(t0)));
            } else {
                i += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(base: u64, size: u64, offset: u64) -> Region {
        Region { base, size, offset, page_size: 4096 }
    }

    #[test]
    fn region_validation() {
        let img = 1 << 20;
        assert!(validate_regions(&[r(0x10000, 0x8000, 0), r(0x40000, 0x8000, 0x8000)], img, 4096).is_ok());
        for (regions, needle) in [
            (vec![], "no regions"),
            (vec![r(0x10000, 0x8000, img)], "beyond the image"),
            (vec![r(0x10000, u64::MAX - 4095, 0)], "beyond the image"),
            (vec![r(0x10001, 0x8000, 0)], "not aligned"),
            (vec![r(0x10000, 0x8000, 0), r(0x80000, 0x8000, 0x4000)], "overlap in the image"),
            (vec![r(0x10000, 0x8000, 0), r(0x14000, 0x8000, 0x8000)], "overlap in memory"),
        ] {
            let e = validate_regions(&regions, img, 4096).unwrap_err().to_string();
            assert!(e.contains(needle), "{e} lacks {needle}");
        }
    }
}
