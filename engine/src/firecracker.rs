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
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

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
}

fn default_page() -> u32 {
    4096
}

impl FirecrackerConfig {
    /// The VMM's process: the one the engine started, else (a VM handed over with `run`) the
    /// process listening on the API socket, by `SO_PEERCRED`. `None` when neither is known (the
    /// VMM is gone).
    pub fn vmm_pid(&self) -> Option<i32> {
        if self.pid.is_some() {
            return self.pid;
        }
        let s = std::os::unix::net::UnixStream::connect(&self.api_socket).ok()?;
        let cred = nix::sys::socket::getsockopt(&s, nix::sys::socket::sockopt::PeerCredentials).ok()?;
        Some(cred.pid()).filter(|&p| p > 1)
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
    /// A client of the API socket at `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> ApiClient {
        ApiClient { socket: socket.into(), timeout: Duration::from_secs(60) }
    }

    fn err(&self, what: &str, detail: impl Into<String>) -> Error {
        Error::Runtime { what: format!("firecracker {what} ({})", self.socket.display()), detail: detail.into() }
    }

    /// One HTTP/1.1 request; Firecracker keeps connections alive, so the body is read by its
    /// Content-Length.
    pub fn call(&self, method: &str, path: &str, body: Option<&serde_json::Value>) -> Result<ApiResponse> {
        let what = format!("{method} {path}");
        let mut s = UnixStream::connect(&self.socket).map_err(|e| self.err(&what, format!("connect: {e}")))?;
        s.set_read_timeout(Some(self.timeout)).map_err(|e| self.err(&what, e.to_string()))?;
        let b = body.map(|v| v.to_string()).unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        );
        s.write_all(req.as_bytes()).map_err(|e| self.err(&what, format!("send: {e}")))?;
        let mut r = BufReader::new(s);
        let mut status_line = String::new();
        r.read_line(&mut status_line).map_err(|e| self.err(&what, format!("read: {e}")))?;
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
            let n = r.read_line(&mut line).map_err(|e| self.err(&what, format!("read: {e}")))?;
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

    fn expect_ok(&self, method: &str, path: &str, body: Option<&serde_json::Value>) -> Result<ApiResponse> {
        let r = self.call(method, path, body)?;
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
        let r = self.expect_ok("GET", "/", None)?;
        serde_json::from_str(&r.body).map_err(|e| self.err("GET /", format!("bad JSON: {e}")))
    }

    /// `PATCH /vm {"state": "Paused"}`.
    pub fn pause(&self) -> Result<()> {
        self.expect_ok("PATCH", "/vm", Some(&serde_json::json!({"state": "Paused"}))).map(|_| ())
    }

    /// `PATCH /vm {"state": "Resumed"}`.
    pub fn resume(&self) -> Result<()> {
        self.expect_ok("PATCH", "/vm", Some(&serde_json::json!({"state": "Resumed"}))).map(|_| ())
    }

    /// `PUT /snapshot/create`: a Full or Diff snapshot of the paused VM.
    pub fn create_snapshot(&self, diff: bool, vmstate: &Path, mem: &Path) -> Result<()> {
        let body = serde_json::json!({
            "snapshot_type": if diff { "Diff" } else { "Full" },
            "snapshot_path": vmstate,
            "mem_file_path": mem,
        });
        self.expect_ok("PUT", "/snapshot/create", Some(&body)).map(|_| ())
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
        self.expect_ok("PUT", "/snapshot/load", Some(&body)).map(|_| ())
    }
}

/// Waits until a freshly started Firecracker answers on `socket`.
pub fn wait_for_api(socket: &Path, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        if UnixStream::connect(socket).is_ok() {
            return Ok(());
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
