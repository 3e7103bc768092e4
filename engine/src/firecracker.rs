//! The firecracker driver: a client of Firecracker's API socket (per the published swagger
//! definition, `src/firecracker/swagger/firecracker.yaml`) and the pieces the engine needs to
//! checkpoint a running microVM and to restore or fork it with the Uffd memory backend served by
//! lazy-restore.
//!
//! Calls used: `GET /` (instance info), `PATCH /vm {"state": "Paused"|"Resumed"}`,
//! `PUT /snapshot/create {"snapshot_type": "Full"|"Diff", "snapshot_path", "mem_file_path"}` and
//! `PUT /snapshot/load {"snapshot_path", "mem_backend": {"backend_type": "Uffd", "backend_path"},
//! "enable_diff_snapshots", "track_dirty_pages", "resume_vm"}`. Successful calls answer 204 (or
//! 200 with a body); failures answer 4xx with `{"fault_message": "..."}`.
//!
//! Limits, by Firecracker's design: the vmstate names the block devices' host paths, so a
//! restored VM reopens the *original* disk files. The engine stores and restores disk images (a
//! fork gets its own copies in its directory), but pointing the restored VM at them needs the
//! jailer's chroot with the same relative paths; the restore does not rewrite the vmstate.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use snapfork_lazy_restore::journal::process_start_time;

use crate::error::{Error, Result};

/// How to drive one Firecracker microVM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FirecrackerConfig {
    /// The API socket of the running microVM.
    pub api_socket: PathBuf,
    /// The firecracker binary for restores (default: `$FIRECRACKER`, else `firecracker`).
    #[serde(default)]
    pub binary: Option<PathBuf>,
    /// Disk images to store with each snapshot.
    #[serde(default)]
    pub disks: Vec<PathBuf>,
    /// Guest page size (4096, or 2097152 for huge pages).
    #[serde(default = "default_page")]
    pub page_size: u32,
    /// Take Diff snapshots on top of the previous one (the VM must track dirty pages; restores
    /// turn tracking on).
    #[serde(default)]
    pub diff: bool,
    /// Host pid of the Firecracker process, when the engine started it (restores and forks).
    #[serde(default)]
    pub pid: Option<i32>,
    /// That process's start time (field 22 of `/proc/PID/stat`): a later process given the same
    /// pid is not this VMM, and is never signalled or taken for it. (Records written before it
    /// was kept have none and trust the pid.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_start_time: Option<u64>,
}

fn default_page() -> u32 {
    4096
}

impl FirecrackerConfig {
    /// The VMM's process, as (pid, start time): the one the engine started, while that very
    /// process lives, else (a VM handed over with `run`) the process listening on the API
    /// socket, by `SO_PEERCRED`. `None` when the VMM is gone.
    pub fn vmm_process(&self) -> Option<(i32, u64)> {
        if let Some(pid) = self.pid.filter(|&p| p > 1) {
            let now = process_start_time(pid)?;
            return self.pid_start_time.is_none_or(|t| t == now).then_some((pid, now));
        }
        // A VMM that stopped accepting connections does not hold the engine up.
        let s = connect_by(&self.api_socket, Instant::now() + Duration::from_secs(2)).ok()?;
        let cred = nix::sys::socket::getsockopt(&s, nix::sys::socket::sockopt::PeerCredentials).ok()?;
        let pid = Some(cred.pid()).filter(|&p| p > 1)?;
        Some((pid, process_start_time(pid)?))
    }

    /// SIGKILLs the VMM ([`vmm_process`](Self::vmm_process)), if it still runs, and waits up to
    /// 5 s for it to exit. Through a pidfd whose process is checked after it is opened, so that
    /// a pid recycled at any moment is never signalled. True when the VMM is known to be gone;
    /// false when it may still run (it did not die in time, or a VM handed over with `run`
    /// could not be reached to learn its pid).
    pub fn kill_vmm(&self) -> bool {
        if self.pid.is_none() && self.api_gone() {
            return true;
        }
        let Some((pid, start)) = self.vmm_process() else {
            return self.pid.is_some();
        };
        let Ok(pidfd) = snapfork_lazy_restore::restore::pidfd_open(pid) else {
            return true;
        };
        if process_start_time(pid) != Some(start) {
            return true;
        }
        if let Err(e) = snapfork_lazy_restore::restore::pidfd_kill(std::os::fd::AsFd::as_fd(&pidfd)) {
            tracing::warn!(pid, "cannot kill the VMM: {e}");
            return false;
        }
        snapfork_lazy_restore::restore::pidfd_wait(std::os::fd::AsFd::as_fd(&pidfd), Duration::from_secs(5))
    }

    /// True when nobody listens on the API socket any more (refused, or no socket): how a VM
    /// handed over with `run` is known to be gone. One that does not accept in time is not.
    pub(crate) fn api_gone(&self) -> bool {
        connect_by(&self.api_socket, Instant::now() + Duration::from_secs(2))
            .is_err_and(|e| matches!(e.kind(), std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound))
    }

    /// The binary restores start.
    pub fn binary(&self) -> PathBuf {
        self.binary
            .clone()
            .or_else(|| std::env::var_os("FIRECRACKER").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("firecracker"))
    }
}

/// A client of one Firecracker API socket.
#[derive(Clone, Debug)]
pub struct ApiClient {
    socket: PathBuf,
    timeout: Duration,
}

/// The answer to one API call.
#[derive(Clone, Debug)]
pub struct ApiResponse {
    /// HTTP status.
    pub status: u16,
    /// Body (empty for 204).
    pub body: String,
}

impl ApiClient {
    /// A client of the API socket at `socket`, whose calls fail after 60 s.
    pub fn new(socket: impl Into<PathBuf>) -> ApiClient {
        ApiClient { socket: socket.into(), timeout: Duration::from_secs(60) }
    }

    /// The same client with calls failing after `timeout`, whatever the VMM does: one that
    /// stopped accepting connections, stopped reading, or answers a byte at a time.
    pub fn with_timeout(self, timeout: Duration) -> ApiClient {
        ApiClient { timeout, ..self }
    }

    fn err(&self, what: &str, detail: impl Into<String>) -> Error {
        Error::Runtime { what: format!("firecracker {what} ({})", self.socket.display()), detail: detail.into() }
    }

    /// One HTTP/1.1 request; Firecracker keeps connections alive, so the body is read by its
    /// Content-Length.
    pub fn call(&self, method: &str, path: &str, body: Option<&serde_json::Value>) -> Result<ApiResponse> {
        self.call_watching(method, path, body, None)
    }

    /// [`ApiClient::call`], where `progress` (when given) tells a VMM at work from a hung one:
    /// the answer may take any time while the value it returns keeps changing, and fails only
    /// once it has not changed for the client's timeout. For calls whose time grows with the
    /// VM (a snapshot of 32 GiB of memory to a slow disk), where any fixed deadline either
    /// fails big VMs or waits long on hung ones.
    fn call_watching(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
        progress: Option<&dyn Fn() -> u64>,
    ) -> Result<ApiResponse> {
        let what = format!("{method} {path}");
        let deadline = Instant::now() + self.timeout;
        let s = connect_by(&self.socket, deadline).map_err(|e| self.err(&what, format!("connect: {e}")))?;
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        s.set_write_timeout(Some(left)).map_err(|e| self.err(&what, e.to_string()))?;
        let b = body.map(|v| v.to_string()).unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        );
        (&s).write_all(req.as_bytes()).map_err(|e| self.err(&what, format!("send: {e}")))?;
        let last = progress.map_or(0, |p| p());
        let mut r = BufReader::new(Deadlined { stream: s, deadline, stall: self.timeout, progress, last });
        // Lines of a bounded length: a peer that never ends one cannot grow the engine.
        let read_line = |r: &mut BufReader<Deadlined<'_>>, line: &mut String| {
            let n = r.by_ref().take(MAX_LINE).read_line(line).map_err(|e| self.err(&what, format!("read: {e}")))?;
            if n as u64 == MAX_LINE {
                return Err(self.err(&what, format!("a response line of more than {MAX_LINE} bytes")));
            }
            Ok(n)
        };
        let mut status_line = String::new();
        read_line(&mut r, &mut status_line)?;
        if status_line.is_empty() {
            return Err(self.err(&what, "the VMM closed the connection without answering (did it exit?)"));
        }
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|x| x.parse().ok())
            .ok_or_else(|| self.err(&what, format!("bad status line {status_line:?}")))?;
        let mut len = 0usize;
        loop {
            let mut line = String::new();
            let n = read_line(&mut r, &mut line)?;
            if n == 0 || line == "\r\n" || line == "\n" {
                break;
            }
            if let Some((k, v)) = line.split_once(':')
                && k.trim().eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse().map_err(|_| self.err(&what, "bad Content-Length"))?;
            }
        }
        if len > 16 << 20 {
            return Err(self.err(&what, format!("response of {len} bytes")));
        }
        let mut body = vec![0u8; len];
        r.read_exact(&mut body).map_err(|e| self.err(&what, format!("read body: {e}")))?;
        Ok(ApiResponse { status, body: String::from_utf8_lossy(&body).into_owned() })
    }

    /// [`ApiClient::call_watching`], with any status but 2xx an error carrying Firecracker's
    /// `fault_message`.
    fn expect_ok(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
        progress: Option<&dyn Fn() -> u64>,
    ) -> Result<ApiResponse> {
        let r = self.call_watching(method, path, body, progress)?;
        if (200..300).contains(&r.status) {
            return Ok(r);
        }
        let fault = serde_json::from_str::<serde_json::Value>(&r.body)
            .ok()
            .and_then(|v| v.get("fault_message").and_then(|m| m.as_str()).map(str::to_string))
            .unwrap_or_else(|| r.body.clone());
        Err(self.err(&format!("{method} {path}"), format!("HTTP {}: {fault}", r.status)))
    }

    /// `GET /`: the instance information (id, state, vmm_version).
    pub fn instance_info(&self) -> Result<serde_json::Value> {
        let r = self.expect_ok("GET", "/", None, None)?;
        serde_json::from_str(&r.body).map_err(|e| self.err("GET /", format!("bad JSON: {e}")))
    }

    /// `PATCH /vm {"state": "Paused"}`.
    pub fn pause(&self) -> Result<()> {
        self.expect_ok("PATCH", "/vm", Some(&serde_json::json!({"state": "Paused"})), None).map(|_| ())
    }

    /// `PATCH /vm {"state": "Resumed"}`.
    pub fn resume(&self) -> Result<()> {
        self.expect_ok("PATCH", "/vm", Some(&serde_json::json!({"state": "Resumed"})), None).map(|_| ())
    }

    /// `PUT /snapshot/create`: a Full or Diff snapshot of the paused VM. It may take as long
    /// as the VMM takes to write the files, and fails once they have not grown for the client's
    /// timeout: a VMM stalled while it writes (on guest memory nobody serves, say) is hung.
    pub fn create_snapshot(&self, diff: bool, vmstate: &Path, mem: &Path) -> Result<()> {
        let body = serde_json::json!({
            "snapshot_type": if diff { "Diff" } else { "Full" },
            "snapshot_path": vmstate,
            "mem_file_path": mem,
        });
        // Bytes written so far: sizes, and blocks for a Diff's sparse file (sized first).
        let written = || {
            use std::os::unix::fs::MetadataExt;
            [vmstate, mem].iter().filter_map(|p| std::fs::metadata(p).ok()).map(|m| m.len() + m.blocks() * 512).sum()
        };
        self.expect_ok("PUT", "/snapshot/create", Some(&body), Some(&written)).map(|_| ())
    }

    /// `PUT /snapshot/load` with the Uffd memory backend at `uffd_socket`. Both the old
    /// (`enable_diff_snapshots`, before 1.13) and the new (`track_dirty_pages`) field are sent.
    pub fn load_snapshot_uffd(
        &self,
        vmstate: &Path,
        uffd_socket: &Path,
        track_dirty: bool,
        resume: bool,
    ) -> Result<()> {
        let body = serde_json::json!({
            "snapshot_path": vmstate,
            "mem_backend": {"backend_type": "Uffd", "backend_path": uffd_socket},
            "enable_diff_snapshots": track_dirty,
            "track_dirty_pages": track_dirty,
            "resume_vm": resume,
        });
        self.expect_ok("PUT", "/snapshot/load", Some(&body), None).map(|_| ())
    }
}

/// The longest status or header line a response may have.
const MAX_LINE: u64 = 8 << 10;

/// Connects to `socket`, giving up at `deadline`. A plain `connect` blocks for as long as the
/// listener's backlog is full (a VMM that stopped accepting); a non-blocking one fails with
/// EAGAIN instead (AF_UNIX has no connection in progress to wait for), and is retried.
fn connect_by(socket: &Path, deadline: Instant) -> std::io::Result<UnixStream> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket as new_socket};
    let fd = new_socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC, None)?;
    let addr = UnixAddr::new(socket)?;
    loop {
        match connect(fd.as_raw_fd(), &addr) {
            Ok(()) => break,
            Err(nix::errno::Errno::EAGAIN) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Err(nix::errno::Errno::EAGAIN) => {
                return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the VMM accepts no connection"));
            }
            Err(e) => return Err(e.into()),
        }
    }
    let stream = UnixStream::from(fd);
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// A stream whose reads fail once `deadline` has passed: a per-read timeout alone would let a
/// peer that sends a byte now and then hold a call forever. With `progress`, the deadline moves
/// `stall` on each time it passes with the value changed since the last time.
struct Deadlined<'a> {
    stream: UnixStream,
    deadline: Instant,
    stall: Duration,
    progress: Option<&'a dyn Fn() -> u64>,
    /// What `progress` said when the deadline was last set.
    last: u64,
}

impl Read for Deadlined<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let now = Instant::now();
            if now >= self.deadline {
                let Some(progress) = self.progress else {
                    let msg = format!("no answer in {:?}", self.stall);
                    return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, msg));
                };
                let seen = progress();
                if seen == self.last {
                    let msg = format!("no answer, and nothing more written, for {:?}: the VMM is hung", self.stall);
                    return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, msg));
                }
                self.last = seen;
                self.deadline = now + self.stall;
            }
            self.stream.set_read_timeout(Some(self.deadline - now))?;
            match self.stream.read(buf) {
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
                r => return r,
            }
        }
    }
}

/// Waits until a freshly started Firecracker answers on `socket`.
pub fn wait_for_api(socket: &Path, timeout: Duration) -> Result<()> {
    wait_for_vmm_api(socket, timeout, None)
}

/// [`wait_for_api`] for the VMM `vmm` (pid, start time) just started: fails as soon as that
/// process is gone rather than at the timeout.
pub fn wait_for_vmm_api(socket: &Path, timeout: Duration, vmm: Option<(i32, u64)>) -> Result<()> {
    let start = Instant::now();
    loop {
        if connect_by(socket, start + timeout).is_ok() {
            return Ok(());
        }
        if let Some((pid, t)) = vmm
            && process_start_time(pid) != Some(t)
        {
            return Err(Error::Runtime {
                what: "firecracker start".into(),
                detail: format!("the VMM (pid {pid}) exited before it served its API at {}", socket.display()),
            });
        }
        if start.elapsed() > timeout {
            return Err(Error::Runtime {
                what: "firecracker start".into(),
                detail: format!("no API socket at {} after {timeout:?}", socket.display()),
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A VMM that hangs: its API socket listens but never accepts, and its backlog is full.
    #[test]
    fn a_vmm_that_accepts_no_connection_fails_the_call_in_time() {
        use nix::sys::socket::{AddressFamily, Backlog, SockFlag, SockType, UnixAddr, bind, listen, socket};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let l = socket(AddressFamily::Unix, SockType::Stream, SockFlag::empty(), None).unwrap();
        bind(l.as_raw_fd(), &UnixAddr::new(&path).unwrap()).unwrap();
        listen(&l, Backlog::new(0).unwrap()).unwrap();
        let mut pending = Vec::new();
        while let Ok(s) = connect_by(&path, Instant::now()) {
            pending.push(s);
            assert!(pending.len() < 64, "the backlog never filled");
        }
        let t = Instant::now();
        let err = ApiClient::new(&path).with_timeout(Duration::from_millis(300)).instance_info().unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(5), "took {:?}", t.elapsed());
        assert!(err.to_string().contains("connect"), "{err}");
    }

    /// An API socket whose one connection `answer` serves, on a thread of its own.
    fn vmm_answering(answer: impl FnOnce(UnixStream) + Send + 'static) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || answer(l.accept().unwrap().0));
        (dir, path)
    }

    /// A VMM that accepts and then answers one byte every 50 ms, forever.
    #[test]
    fn a_vmm_that_answers_slowly_fails_the_call_by_its_deadline() {
        let (_dir, path) = vmm_answering(|mut s| {
            while s.write_all(b"H").is_ok() {
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let t = Instant::now();
        let err = ApiClient::new(&path).with_timeout(Duration::from_millis(500)).instance_info().unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(3), "took {:?}", t.elapsed());
        assert!(err.to_string().contains("read"), "{err}");
    }

    /// A VMM that takes longer than the timeout to answer, while it keeps writing (a snapshot
    /// of a big VM), is waited for; one that stops writing fails once it has been still for the
    /// timeout, named hung.
    #[test]
    fn a_call_watching_progress_waits_while_it_moves_and_fails_once_it_stops() {
        let answer_after = |delay: Duration| {
            move |mut s: UnixStream| {
                std::thread::sleep(delay);
                let _ = s.write_all(b"HTTP/1.1 204 No Content\r\n\r\n");
            }
        };
        let started = Instant::now();
        let moving = || started.elapsed().as_millis() as u64 / 100;
        let (_dir, path) = vmm_answering(answer_after(Duration::from_millis(1500)));
        let client = ApiClient::new(&path).with_timeout(Duration::from_millis(400));
        let r = client.call_watching("PUT", "/snapshot/create", None, Some(&moving)).unwrap();
        assert_eq!(r.status, 204);
        assert!(started.elapsed() >= Duration::from_millis(1500));

        let (_dir, path) = vmm_answering(answer_after(Duration::from_secs(30)));
        let t = Instant::now();
        let stops = || t.elapsed().min(Duration::from_millis(600)).as_millis() as u64;
        let err = ApiClient::new(&path)
            .with_timeout(Duration::from_millis(400))
            .call_watching("PUT", "/snapshot/create", None, Some(&stops))
            .unwrap_err();
        // Still from 600 ms on: the deadline moved at 400 and 800 ms, and passed at 1200.
        assert!((Duration::from_millis(1000)..Duration::from_secs(3)).contains(&t.elapsed()), "took {:?}", t.elapsed());
        assert!(err.to_string().contains("the VMM is hung"), "{err}");
    }

    /// A VMM whose answer is one endless line.
    #[test]
    fn an_endless_response_line_is_refused() {
        let (_dir, path) = vmm_answering(|mut s| {
            let chunk = vec![b'x'; 64 << 10];
            while s.write_all(&chunk).is_ok() {}
        });
        let err = ApiClient::new(&path).with_timeout(Duration::from_secs(10)).instance_info().unwrap_err();
        assert!(err.to_string().contains("response line"), "{err}");
    }
}
