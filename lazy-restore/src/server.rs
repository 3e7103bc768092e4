//! The Firecracker-facing listener: one AF_UNIX socket, one connection per VM, many VMs at once.

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;
use tracing::{error, info, warn};

use crate::handshake::{self, PeerCred};
use crate::journal::Journal;
use crate::restore::{self, Peer, Region, RestoreHandle, RestoreOptions, RestoreReport};
use crate::source::PageSource;
use crate::{Error, Result};

/// How the listener behaves.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Longest wait for a connected peer's handshake message.
    pub handshake_timeout: Duration,
    /// Exit when no VM is being served and none has connected for this long.
    pub idle_timeout: Option<Duration>,
    /// Exit after this many restores have ended (or been refused).
    pub max_restores: Option<usize>,
    /// Options for every restore.
    pub restore: RestoreOptions,
    /// Where each restore keeps its [`Journal`], so that another process can take its VM over
    /// if this one dies (None: no journals).
    pub journal_dir: Option<PathBuf>,
    /// How long after a restore starts its demand faults count as its working set: a VM still
    /// running when this has passed is reported by [`ServerEvent::WorkingSet`] (long-lived
    /// sandboxes would otherwise record theirs only when they exit, and then everything they
    /// ever touched). A VM that ends sooner has its working set in [`ServerEvent::Ended`] only.
    pub working_set_window: Duration,
}

/// [`ServerOptions::working_set_window`] by default: what a resumed sandbox touches while it
/// takes up its work again.
pub const WORKING_SET_WINDOW: Duration = Duration::from_secs(10);

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            handshake_timeout: Duration::from_secs(5),
            idle_timeout: None,
            max_restores: None,
            restore: RestoreOptions::default(),
            journal_dir: None,
            working_set_window: WORKING_SET_WINDOW,
        }
    }
}

/// What happened on the listener, reported to the caller as it happens.
#[derive(Debug)]
pub enum ServerEvent {
    /// A VM's handshake was accepted and its restore started.
    Started {
        /// SO_PEERCRED of the connection.
        pid: i32,
        /// Its regions.
        regions: Vec<Region>,
        /// Descriptors received.
        fds: usize,
    },
    /// A connection was refused (bad handshake); other VMs are unaffected.
    Refused {
        /// SO_PEERCRED pid, if it could be read.
        pid: Option<i32>,
        /// Why.
        error: String,
    },
    /// A VM has run for [`ServerOptions::working_set_window`]: the image pages it faulted on
    /// until now, in first-fault order (not sent for a VM that faulted on none).
    WorkingSet {
        /// SO_PEERCRED pid of the VM.
        pid: Option<i32>,
        /// Image pages in first-fault order.
        pages: Vec<u64>,
    },
    /// A restore ended.
    Ended(Box<RestoreReport>),
}

/// Totals of a server run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ServerSummary {
    /// Restores started.
    pub started: usize,
    /// Connections refused.
    pub refused: usize,
    /// Restores ended.
    pub ended: usize,
    /// Why the server returned: "stopped", "idle" or "max_restores".
    pub reason: String,
}

/// Handshakes in progress at once; more connections wait in the listen backlog.
const MAX_HANDSHAKES: usize = 64;

/// A listening page-fault server for one image.
pub struct UffdServer {
    listener: UnixListener,
    path: PathBuf,
    source: Arc<dyn PageSource>,
    opts: ServerOptions,
    stop: Arc<AtomicBool>,
    prefetch: Arc<Mutex<Vec<u64>>>,
}

impl UffdServer {
    /// Binds `path` (a stale socket file there is replaced; any other file is an error).
    pub fn bind(path: &Path, source: Arc<dyn PageSource>, opts: ServerOptions) -> Result<Self> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if meta.file_type().is_socket() {
                let _ = std::fs::remove_file(path);
            } else {
                return Err(Error::Invalid(format!("{} exists and is not a socket", path.display())));
            }
        }
        let listener = UnixListener::bind(path).map_err(|e| Error::io(format!("bind {}", path.display()), e))?;
        listener.set_nonblocking(true).map_err(|e| Error::io("set_nonblocking", e))?;
        let prefetch = Arc::new(Mutex::new(opts.restore.prefetch.clone()));
        Ok(UffdServer {
            listener,
            path: path.to_path_buf(),
            source,
            opts,
            stop: Arc::new(AtomicBool::new(false)),
            prefetch,
        })
    }

    /// A flag that makes [`UffdServer::run`] stop every restore and return once set.
    pub fn stopper(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Replaces the prefetch list given to restores that start from now on (e.g. after the first
    /// restore recorded a working set).
    pub fn set_prefetch(&self, pages: Vec<u64>) {
        if let Ok(mut p) = self.prefetch.lock() {
            *p = pages;
        }
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts VMs and serves them until stopped, idle or `max_restores`; `on_event` sees every
    /// start, refusal and end (with the restore's report).
    pub fn run(&self, mut on_event: impl FnMut(&UffdServer, ServerEvent)) -> Result<ServerSummary> {
        let (tx, rx) = mpsc::channel::<(Option<i32>, Result<(RestoreHandle, Vec<Region>, usize)>)>();
        let mut handshakes: Vec<JoinHandle<()>> = Vec::new();
        // Each restore with when it started and whether its working set was reported.
        let mut active: Vec<(RestoreHandle, Instant, bool)> = Vec::new();
        let mut summary = ServerSummary::default();
        let mut last_activity = Instant::now();
        let reason = loop {
            if self.stop.load(Ordering::Relaxed) {
                break "stopped";
            }
            // Accept everything queued, up to MAX_HANDSHAKES at once (a flood of peers that
            // connect and say nothing waits in the listen backlog, not in threads); an accept
            // that fails (EMFILE) backs off instead of spinning on a listener still readable.
            let mut back_off = false;
            loop {
                handshakes.retain(|h| !h.is_finished());
                if handshakes.len() >= MAX_HANDSHAKES {
                    back_off = true;
                    break;
                }
                match self.listener.accept() {
                    Ok((stream, _)) => {
                        last_activity = Instant::now();
                        let cred = handshake::peer_cred(&stream).ok();
                        let tx = tx.clone();
                        let source = self.source.clone();
                        let mut ropts = self.opts.restore.clone();
                        ropts.prefetch = self.prefetch.lock().map(|p| p.clone()).unwrap_or_default();
                        let timeout = self.opts.handshake_timeout;
                        let journals = self.opts.journal_dir.clone();
                        let spawned = std::thread::Builder::new().name("uffd-handshake".into()).spawn(move || {
                            let pid = cred.map(|c| c.pid);
                            let res = accept_vm(stream, cred, source, ropts, timeout, journals.as_deref());
                            let _ = tx.send((pid, res));
                        });
                        match spawned {
                            Ok(h) => handshakes.push(h),
                            Err(e) => error!("cannot spawn a handshake thread: {e}"),
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        warn!("accept: {e}");
                        back_off = true;
                        break;
                    }
                }
            }
            while let Ok((pid, res)) = rx.try_recv() {
                match res {
                    Ok((handle, regions, fds)) => {
                        summary.started += 1;
                        on_event(self, ServerEvent::Started { pid: pid.unwrap_or(0), regions, fds });
                        active.push((handle, Instant::now(), false));
                    }
                    Err(e) => {
                        summary.refused += 1;
                        error!(pid, "refused a connection: {e}");
                        on_event(self, ServerEvent::Refused { pid, error: e.to_string() });
                    }
                }
            }
            handshakes.retain(|h| !h.is_finished());
            let mut i = 0;
            while i < active.len() {
                let (handle, started, reported) = &mut active[i];
                if handle.is_finished() {
                    let report = active.swap_remove(i).0.join();
                    summary.ended += 1;
                    last_activity = Instant::now();
                    on_event(self, ServerEvent::Ended(Box::new(report)));
                    continue;
                }
                if !*reported && started.elapsed() >= self.opts.working_set_window {
                    *reported = true;
                    let (pid, pages) = (handle.pid(), handle.working_set());
                    if !pages.is_empty() {
                        on_event(self, ServerEvent::WorkingSet { pid, pages });
                    }
                }
                i += 1;
            }
            if let Some(max) = self.opts.max_restores
                && summary.ended + summary.refused >= max
                && active.is_empty()
                && handshakes.is_empty()
            {
                break "max_restores";
            }
            if let Some(idle) = self.opts.idle_timeout
                && active.is_empty()
                && handshakes.is_empty()
                && last_activity.elapsed() >= idle
            {
                break "idle";
            }
            let mut pfd =
                libc::pollfd { fd: std::os::fd::AsRawFd::as_raw_fd(&self.listener), events: libc::POLLIN, revents: 0 };
            if back_off {
                std::thread::sleep(std::time::Duration::from_millis(20));
            } else {
                // Wake for connections at once; otherwise every 20 ms to reap ended restores.
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut pfd, 1, 20) };
            }
        };
        for (h, _, _) in &active {
            h.stop();
        }
        for h in handshakes {
            let _ = h.join();
        }
        while let Ok((pid, res)) = rx.try_recv() {
            if let Ok((h, _, _)) = res {
                h.stop();
                active.push((h, Instant::now(), true));
            } else if let Err(e) = res {
                on_event(self, ServerEvent::Refused { pid, error: e.to_string() });
            }
        }
        for (h, _, _) in active {
            summary.ended += 1;
            on_event(self, ServerEvent::Ended(Box::new(h.join())));
        }
        summary.reason = reason.into();
        Ok(summary)
    }
}

impl Drop for UffdServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Receives one VM's handshake and starts its restore.
fn accept_vm(
    stream: UnixStream,
    cred: Option<PeerCred>,
    source: Arc<dyn PageSource>,
    opts: RestoreOptions,
    timeout: Duration,
    journal_dir: Option<&Path>,
) -> Result<(RestoreHandle, Vec<Region>, usize)> {
    let pid = cred.map(|c| c.pid);
    // Open the pidfd before anything slow, so the pid cannot be recycled under us.
    let pidfd = pid.filter(|&p| p > 0).and_then(|p| restore::pidfd_open(p).ok());
    if pidfd.is_none() {
        warn!(pid, "no pidfd for the peer: its exit is detected only through ESRCH");
    }
    let hs = handshake::receive(&stream, timeout)?;
    info!(
        pid,
        uid = cred.map(|c| c.uid),
        regions = hs.regions.len(),
        fds = hs.fds,
        bytes = hs.bytes,
        "handshake received"
    );
    let regions = hs.regions.clone();
    restore::validate_regions(&regions, source.size(), source.page_size() as u64)?;
    let journal = match (journal_dir, pid.filter(|&p| p > 0)) {
        (Some(dir), Some(pid)) => {
            let image = source.image_id().map(|h| h.to_hex());
            // Without its journal the VM still runs; it only cannot outlive this process.
            Journal::create(dir, pid, image, &regions)
                .inspect_err(|e| error!(pid, "no journal: this VM stalls if this server dies: {e}"))
                .ok()
        }
        _ => None,
    };
    // If the restore does not start, the VM will not run on this memory: its journal goes, removed
    // while this second handle still holds its lock, so that nobody takes that VM over meanwhile.
    let guard = journal.as_ref().map(|j| (j.path().to_path_buf(), j.lock_guard()));
    let peer = Peer { pid, pidfd, conn: Some(stream) };
    let handle = restore::start_journaled(hs.uffd, hs.regions, source, peer, opts, journal).inspect_err(|_| {
        if let Some((path, _lock)) = &guard {
            let _ = std::fs::remove_file(path);
        }
    })?;
    drop(guard);
    Ok((handle, regions, hs.fds))
}

/// Connects to `path` (for tests and tools).
pub fn connect(path: &Path) -> Result<UnixStream> {
    UnixStream::connect(path).map_err(|e| Error::io(format!("connect {}", path.display()), e))
}
