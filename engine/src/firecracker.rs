//! The firecracker driver: a client of Firecracker's API socket (per the published swagger
//! definition, `src/firecracker/swagger/firecracker.yaml`) and the pieces the engine needs to
//! checkpoint a running microVM and to restore or fork it with the Uffd memory backend served by
//! lazy-restore.
//!
//! Calls used: `GET /` (instance info), `PATCH /vm {"state": "Paused"|"Resumed"}`,
//! `PUT /snapshot/create {"snapshot_type": "Full"|"Diff", "snapshot_path", "mem_file_path"}`,
//! `PUT /snapshot/load {"snapshot_path", "mem_backend": {"backend_type": "Uffd", "backend_path"},
//! "enable_diff_snapshots", "track_dirty_pages", "resume_vm", "vsock_override"}`,
//! `GET /vm/config` (drives, vsock, network interfaces) and `PATCH /drives/{id} {"drive_id", "path_on_host"}`.
//! Successful calls answer 204 (or 200 with a body); failures answer 4xx with
//! `{"fault_message": "..."}`.
//!
//! Devices: the vmstate names each block device's host file, and the vsock device's socket, by
//! the path it had, and a VMM that loads it reopens (rebinds) that path: without more, every fork
//! of a snapshot would write the one disk, and all but one would fail to bind the socket. A
//! checkpoint asks the VMM for its devices (`GET /vm/config`), stores each writable drive
//! (read-only ones are shared, as Firecracker intends) and records them in the snapshot
//! ([`Devices`]). A restore starts its VMM in a directory of its own and gives it a copy of each
//! writable drive there: at the same relative path when the vmstate names it relatively (the
//! jailer's way; the copy is then what the load opens), else loaded from the original path and
//! pointed at the copy with `PATCH /drives/{id}` (a relative path) before the guest runs a single
//! instruction. The vsock socket goes there too (`vsock_override` where the vmstate names it
//! absolutely). Snapshots of restored VMs therefore name their devices relatively, and restore
//! with nothing outside their directory but the shared files of read-only drives. [`plan_devices`] says where each file goes. Network
//! interfaces keep their tap names: a restored VM runs in a network namespace of its own that
//! holds those taps (the engine's `vmnet`).

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
    /// The VM's host-side devices: in a snapshot, as they were when it was taken (the paths its
    /// vmstate holds); in the record of a VM the engine started, as its restore set them up.
    /// None for a VM handed over with `run`, whose VMM reports them ([`ApiClient::devices`]),
    /// and in snapshots taken before they were recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<Devices>,
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

/// What a restore must know of a VM's host-side devices to give it its own: Firecracker's
/// vmstate names each by the host path it had, and a VMM that loads it reopens that path.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Devices {
    /// Its block devices.
    #[serde(default)]
    pub drives: Vec<Drive>,
    /// Its vsock device. A restore binds its socket anew, so forks cannot share one: each gets
    /// its own in its directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<Vsock>,
    /// Its network interfaces. A load opens each one's tap by name, and a tap serves one VMM at
    /// a time: a restored VM runs in a network namespace of its own with taps of these names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network: Vec<NetInterface>,
}

/// A VM's network interface, as a snapshot records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetInterface {
    /// Firecracker's `iface_id`.
    pub iface_id: String,
    /// The host tap device it is backed by (`host_dev_name`).
    pub host_dev_name: String,
}

/// A VM's vsock device, as a snapshot records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vsock {
    /// Its host socket as the VMM names it (`uds_path`): what its vmstate holds. Relative to the
    /// VMM's working directory when relative.
    pub uds_path: PathBuf,
    /// The socket itself, as the engine (and whoever talks to the guest) reaches it.
    pub host_path: PathBuf,
}

/// The vsock socket of a restored VM, in its working directory.
pub const VSOCK_SOCKET: &str = "vsock.sock";

/// One block device of a VM, as a snapshot records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drive {
    /// Firecracker's `drive_id`; a stored drive's part is named after it.
    pub drive_id: String,
    /// The host path as the VMM names it: what its vmstate holds and a load reopens. Relative
    /// to the VMM's working directory when relative.
    pub path_on_host: PathBuf,
    /// Read-only drives are shared by every VM restored from the snapshot, never copied.
    pub is_read_only: bool,
    /// The file itself, as the engine reaches it (`path_on_host` resolved in the VMM's root
    /// and working directory).
    pub host_path: PathBuf,
}

/// Where a restore puts one drive of a snapshot for the VMM it starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriveSetup {
    /// The drive as the restored VM has it: `host_path` is its file (its copy, or the shared
    /// file of a read-only drive).
    pub drive: Drive,
    /// What to make before the VMM starts.
    pub make: Make,
    /// The vmstate names the drive by an absolute path (the VM it was taken of was not started
    /// by snapfork): the VMM loads it from there, and `PATCH /drives` then points it at its
    /// copy, `drive.path_on_host`, before it runs.
    pub patch: bool,
}

/// What a restore makes for one drive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Make {
    /// A writable drive: the stored image, written out at `drive.host_path`.
    Copy,
    /// A read-only drive named relatively: a symlink at `at` to the shared file.
    Link {
        /// Where the vmstate's relative path leads in the VMM's directory.
        at: PathBuf,
    },
    /// A read-only drive named absolutely: nothing; the VMM opens the shared file where it is.
    Nothing,
}

impl DriveSetup {
    /// The path the restore creates, if any.
    pub fn place(&self) -> Option<&Path> {
        match &self.make {
            Make::Copy => Some(&self.drive.host_path),
            Make::Link { at } => Some(at),
            Make::Nothing => None,
        }
    }
}

/// How a restore sets up a snapshot's devices ([`plan_devices`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevicePlan {
    /// Each drive.
    pub drives: Vec<DriveSetup>,
    /// The vsock device as the restored VM has it, if it has one.
    pub vsock: Option<Vsock>,
    /// The `vsock_override` that puts its socket there (the vmstate names it absolutely).
    pub vsock_override: Option<PathBuf>,
    /// The network interfaces, whose taps the VMM's own network namespace holds.
    pub network: Vec<NetInterface>,
}

impl DevicePlan {
    /// The devices as the restored VM has them, for its record.
    pub fn devices(&self) -> Devices {
        Devices {
            drives: self.drives.iter().map(|d| d.drive.clone()).collect(),
            vsock: self.vsock.clone(),
            network: self.network.clone(),
        }
    }
}

/// Refuses a relative path that would leave the VMM's working directory.
fn check_inside(what: &str, path: &Path) -> Result<()> {
    use std::path::Component;
    let mut parts = path.components().filter(|c| *c != Component::CurDir).peekable();
    if parts.peek().is_none() || !parts.all(|c| matches!(c, Component::Normal(_))) {
        return Err(Error::Invalid(format!("{what}: its path {} leaves the VM's directory", path.display())));
    }
    Ok(())
}

/// Plans the devices of a snapshot for a VMM that will run in `cwd`. Refuses names that would
/// leave `cwd`, two devices in one place, and (with a clear word on why) a snapshot whose
/// vmstate names a file that is gone: Firecracker opens every drive when it loads.
pub fn plan_devices(devices: &Devices, cwd: &Path) -> Result<DevicePlan> {
    let mut plan = Vec::with_capacity(devices.drives.len());
    for d in &devices.drives {
        check_drive_id(&d.drive_id)?;
        let relative = !d.path_on_host.is_absolute();
        if relative {
            check_inside(&format!("drive {}", d.drive_id), &d.path_on_host)?;
        }
        if !relative && std::fs::metadata(&d.path_on_host).is_err() {
            return Err(Error::Invalid(format!(
                "drive {}: the snapshot's vmstate names {}, which Firecracker opens when it loads the \
                 snapshot (before snapfork points the VM at a copy of its own), and that file is gone; \
                 snapshots of VMs snapfork restored name their drives relatively and need no file \
                 outside their directory",
                d.drive_id,
                d.path_on_host.display()
            )));
        }
        let setup = match (d.is_read_only, relative) {
            (true, false) => DriveSetup { drive: d.clone(), make: Make::Nothing, patch: false },
            (true, true) => {
                if !d.host_path.is_absolute() || std::fs::metadata(&d.host_path).is_err() {
                    return Err(Error::Invalid(format!(
                        "drive {}: the shared file {} it stands for is gone (or not named absolutely)",
                        d.drive_id,
                        d.host_path.display()
                    )));
                }
                DriveSetup { drive: d.clone(), make: Make::Link { at: cwd.join(&d.path_on_host) }, patch: false }
            }
            (false, true) => DriveSetup {
                drive: Drive { host_path: cwd.join(&d.path_on_host), ..d.clone() },
                make: Make::Copy,
                patch: false,
            },
            (false, false) => DriveSetup {
                drive: Drive {
                    path_on_host: PathBuf::from(&d.drive_id),
                    host_path: cwd.join(&d.drive_id),
                    ..d.clone()
                },
                make: Make::Copy,
                patch: true,
            },
        };
        // One file each, and none inside another's place (through a drive's symlink, a write
        // would leave the directory).
        if let Some(mine) = setup.place()
            && let Some(other) = plan.iter().find(|o: &&DriveSetup| {
                o.place().is_some_and(|theirs| theirs.starts_with(mine) || mine.starts_with(theirs))
            })
        {
            return Err(Error::Invalid(format!(
                "drives {} and {}: the snapshot restores them to one place ({} and {})",
                other.drive.drive_id,
                d.drive_id,
                other.drive.path_on_host.display(),
                setup.drive.path_on_host.display()
            )));
        }
        plan.push(setup);
    }
    let (vsock, vsock_override) = match devices.vsock.as_ref().map(|v| &v.uds_path) {
        None => (None, None),
        Some(uds) if uds.is_absolute() => {
            let relative = PathBuf::from(VSOCK_SOCKET);
            (Some(Vsock { host_path: cwd.join(&relative), uds_path: relative.clone() }), Some(relative))
        }
        Some(uds) => {
            check_inside("the vsock socket", uds)?;
            (Some(Vsock { uds_path: uds.clone(), host_path: cwd.join(uds) }), None)
        }
    };
    if let Some(at) = vsock.as_ref().map(|v| &v.host_path)
        && let Some(d) = plan.iter().find(|d| d.place().is_some_and(|p| p.starts_with(at) || at.starts_with(p)))
    {
        return Err(Error::Invalid(format!(
            "drive {} and the vsock socket: the snapshot restores them to one place ({})",
            d.drive.drive_id,
            at.display()
        )));
    }
    crate::vmnet::Taps::new(&devices.network.iter().map(|n| n.host_dev_name.clone()).collect::<Vec<_>>())?;
    Ok(DevicePlan { drives: plan, vsock, vsock_override, network: devices.network.clone() })
}

/// Firecracker's rule for API resource ids (1-64 of `[A-Za-z0-9_]`), which makes a drive id a
/// plain file name and a URL path segment as it is.
fn check_drive_id(id: &str) -> Result<()> {
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(Error::Invalid(format!("bad drive id {id:?}: Firecracker's are 1-64 of [A-Za-z0-9_]")));
    }
    Ok(())
}

/// The file `path` (of `what`: a drive, the vsock socket) names for the VMM `pid`: relative paths
/// resolve in its working directory, absolute ones under its root (a jailer's chroot). Without
/// the process, an absolute path is taken as it is.
fn resolve_path(what: &str, path: &Path, pid: Option<i32>) -> Result<PathBuf> {
    let through = match (pid, path.strip_prefix("/")) {
        (Some(pid), Ok(rest)) => PathBuf::from(format!("/proc/{pid}/root")).join(rest),
        (Some(pid), Err(_)) => PathBuf::from(format!("/proc/{pid}/cwd")).join(path),
        (None, Ok(_)) => return Ok(path.to_path_buf()),
        (None, Err(_)) => {
            return Err(Error::Runtime {
                what: what.to_string(),
                detail: format!(
                    "its path {} is relative to the VMM's working directory, and the VMM's process \
                     cannot be found",
                    path.display()
                ),
            });
        }
    };
    std::fs::canonicalize(&through).map_err(|e| Error::io(format!("{what}: {}", path.display()), e))
}

/// True when process `pid` has `file` open (the same inode behind one of its descriptors).
fn has_open(pid: i32, file: &Path) -> Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let want = std::fs::metadata(file).map_err(|e| Error::io(format!("stat {}", file.display()), e))?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_err(|e| Error::io(format!("/proc/{pid}/fd"), e))?;
    Ok(fds
        .filter_map(|e| std::fs::metadata(e.ok()?.path()).ok())
        .any(|m| m.dev() == want.dev() && m.ino() == want.ino()))
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

    /// The VM's devices now, each drive with the file the engine reads it from: the ones the
    /// engine set up when it started the VMM (it knows where it put each file and what a
    /// read-only drive's link stands for, whatever a release reports after a load), else what
    /// the VMM reports. A writable drive's file must be one the VMM has open: a path
    /// that since names another file (moved, replaced, patched) is refused rather than stored as
    /// the VM's disk; so is a writable drive of a VMM whose process cannot be told.
    pub fn current_devices(&self, api: &ApiClient) -> Result<Devices> {
        let pid = self.vmm_process().map(|(pid, _)| pid);
        let devices = match &self.devices {
            Some(known) => known.clone(),
            None => {
                let reported = api.devices()?;
                let mut drives = Vec::new();
                for (drive_id, path_on_host, is_read_only) in reported.drives {
                    let host_path = resolve_path(&format!("drive {drive_id}"), &path_on_host, pid)?;
                    drives.push(Drive { drive_id, path_on_host, is_read_only, host_path });
                }
                // (Where it is only tells users where to reach the guest: never a reason to fail.)
                let vsock = reported.vsock.map(|uds_path| Vsock {
                    host_path: resolve_path("vsock", &uds_path, pid).unwrap_or_else(|_| uds_path.clone()),
                    uds_path,
                });
                Devices { drives, vsock, network: reported.network }
            }
        };
        for d in devices.drives.iter().filter(|d| !d.is_read_only) {
            let refuse = |detail: String| Error::Runtime { what: format!("drive {}", d.drive_id), detail };
            let Some(pid) = pid else {
                return Err(refuse(
                    "the VMM's process cannot be told (in another pid namespace?), nor the file it \
                     writes: refusing to store a file it may not use"
                        .into(),
                ));
            };
            if !has_open(pid, &d.host_path)? {
                return Err(refuse(format!(
                    "the VMM (pid {pid}) does not have {} open: it names another file now (moved, \
                     replaced, patched?), not the VM's disk",
                    d.host_path.display()
                )));
            }
        }
        // The checks a restore makes: no snapshot is taken that nothing could restore.
        plan_devices(&devices, Path::new("files"))?;
        Ok(devices)
    }

    /// Refuses a VMM that runs in a chroot (Firecracker's jailer): the paths the engine gives
    /// it (snapshot files) and takes from it (drives) are host paths, which name other files in
    /// there.
    pub fn check_unjailed(&self) -> Result<()> {
        let Some((pid, _)) = self.vmm_process() else { return Ok(()) };
        match std::fs::canonicalize(format!("/proc/{pid}/root")) {
            Ok(root) if root != Path::new("/") => Err(Error::Invalid(format!(
                "the VMM (pid {pid}) runs in a chroot ({}, the jailer's?), where the host paths of \
                 snapshot files and drives name other files: snapfork checkpoints VMMs that run \
                 unjailed",
                root.display()
            ))),
            _ => Ok(()),
        }
    }

    /// The binary restores start: a bare name is looked up in `$PATH`, any other path made
    /// absolute (the VMM starts in a directory of its own, where a relative one means another
    /// file).
    pub fn binary(&self) -> PathBuf {
        let b = self
            .binary
            .clone()
            .or_else(|| std::env::var_os("FIRECRACKER").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("firecracker"));
        if b.components().count() > 1 { std::path::absolute(&b).unwrap_or(b) } else { b }
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

    /// `GET /vm/config`'s drives, vsock and network interfaces. A vhost-user drive is refused: its contents live in
    /// its backend, out of the VMM's and snapfork's reach.
    pub fn devices(&self) -> Result<ReportedDevices> {
        let r = self.expect_ok("GET", "/vm/config", None, None)?;
        let bad = |d: String| self.err("GET /vm/config", d);
        let v: serde_json::Value = serde_json::from_str(&r.body).map_err(|e| bad(format!("bad JSON: {e}")))?;
        let list = match v.get("drives") {
            None | Some(serde_json::Value::Null) => &[][..],
            Some(serde_json::Value::Array(list)) => list.as_slice(),
            Some(other) => return Err(bad(format!("drives is not a list: {other}"))),
        };
        let drives = list
            .iter()
            .map(|d| {
                let id = d["drive_id"].as_str().ok_or_else(|| bad(format!("a drive without drive_id: {d}")))?;
                let path = d["path_on_host"].as_str().ok_or_else(|| {
                    bad(format!(
                        "drive {id} has no path_on_host (a vhost-user drive?): its contents cannot be snapshotted"
                    ))
                })?;
                Ok((id.to_string(), PathBuf::from(path), d["is_read_only"].as_bool().unwrap_or(false)))
            })
            .collect::<Result<_>>()?;
        let vsock = match v.get("vsock") {
            None | Some(serde_json::Value::Null) => None,
            Some(vs) => Some(PathBuf::from(
                vs["uds_path"].as_str().ok_or_else(|| bad(format!("a vsock without uds_path: {vs}")))?,
            )),
        };
        // A pmem device's file is reopened by path like a drive's, with no PATCH to point it
        // elsewhere: a writable one would be shared by every fork, and one named relatively
        // would not be found.
        for p in v.get("pmem").and_then(|p| p.as_array()).into_iter().flatten() {
            let path = p["path_on_host"].as_str().unwrap_or("");
            if !p["read_only"].as_bool().unwrap_or(false) || !path.starts_with('/') {
                return Err(bad(format!(
                    "pmem device {} ({path}) is {}: snapfork cannot give each restore its own",
                    p["id"],
                    if path.starts_with('/') { "writable" } else { "named relatively" }
                )));
            }
        }
        let network = match v.get("network-interfaces") {
            None | Some(serde_json::Value::Null) => vec![],
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .map(|n| match (n["iface_id"].as_str(), n["host_dev_name"].as_str()) {
                    (Some(i), Some(h)) => Ok(NetInterface { iface_id: i.into(), host_dev_name: h.into() }),
                    _ => Err(bad(format!("a network interface without iface_id or host_dev_name: {n}"))),
                })
                .collect::<Result<_>>()?,
            Some(other) => return Err(bad(format!("network-interfaces is not a list: {other}"))),
        };
        Ok(ReportedDevices { drives, vsock, network })
    }

    /// `PATCH /drives/{drive_id}`: the drive's backing file is now `path_on_host` (after a load,
    /// before the guest resumes).
    pub fn patch_drive(&self, drive_id: &str, path_on_host: &Path) -> Result<()> {
        let body = serde_json::json!({"drive_id": drive_id, "path_on_host": path_on_host});
        self.expect_ok("PATCH", &format!("/drives/{drive_id}"), Some(&body), None).map(|_| ())
    }

    /// `PUT /snapshot/load` with the Uffd memory backend at `uffd_socket`. Both the old
    /// (`enable_diff_snapshots`, before 1.13) and the new (`track_dirty_pages`) field are sent.
    ///
    /// With `vsock` (`vsock_override`), the VM's vsock device binds that socket instead of the
    /// one its vmstate names; only Firecracker releases that know the field take it.
    pub fn load_snapshot_uffd(
        &self,
        vmstate: &Path,
        uffd_socket: &Path,
        track_dirty: bool,
        resume: bool,
        vsock: Option<&Path>,
    ) -> Result<()> {
        let mut body = serde_json::json!({
            "snapshot_path": vmstate,
            "mem_backend": {"backend_type": "Uffd", "backend_path": uffd_socket},
            "enable_diff_snapshots": track_dirty,
            "track_dirty_pages": track_dirty,
            "resume_vm": resume,
        });
        if let Some(uds) = vsock {
            body["vsock_override"] = serde_json::json!({"uds_path": uds});
        }
        self.expect_ok("PUT", "/snapshot/load", Some(&body), None).map(|_| ()).map_err(|e| match e {
            Error::Runtime { what, detail }
                if detail.contains("unknown field") && detail.contains("vsock_override") =>
            {
                Error::Runtime {
                    what,
                    detail: format!(
                        "{detail} (this Firecracker does not take vsock_override, which a restore of a \
                     VM whose vsock socket is named absolutely needs: each restore binds its own)"
                    ),
                }
            }
            e => e,
        })
    }
}

/// A VM's devices as its VMM reports them (`GET /vm/config`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportedDevices {
    /// Each drive's `drive_id`, `path_on_host` and `is_read_only`.
    pub drives: Vec<(String, PathBuf, bool)>,
    /// The vsock's `uds_path`.
    pub vsock: Option<PathBuf>,
    /// The network interfaces.
    pub network: Vec<NetInterface>,
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

    #[test]
    fn a_relative_binary_is_made_absolute_and_a_bare_name_left_to_path() {
        let cfg = |b: &str| FirecrackerConfig {
            api_socket: "api.sock".into(),
            binary: Some(b.into()),
            devices: None,
            page_size: 4096,
            diff: false,
            pid: None,
            pid_start_time: None,
        };
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(cfg("./bin/firecracker").binary(), cwd.join("bin/firecracker"));
        assert_eq!(cfg("/opt/fc").binary(), PathBuf::from("/opt/fc"));
        assert_eq!(cfg("firecracker").binary(), PathBuf::from("firecracker"));
    }

    fn drive(id: &str, path: &Path, ro: bool) -> Drive {
        Drive { drive_id: id.into(), path_on_host: path.into(), is_read_only: ro, host_path: path.into() }
    }

    /// Where a restore puts each kind of drive, and what it refuses.
    #[test]
    fn drives_are_planned_inside_the_vms_directory() {
        let dir = tempfile::tempdir().unwrap();
        let (orig, shared) = (dir.path().join("rootfs.ext4"), dir.path().join("base.img"));
        std::fs::write(&orig, b"").unwrap();
        std::fs::write(&shared, b"").unwrap();
        let cwd = dir.path().join("vm/files");
        let drives = vec![
            drive("rootfs", &orig, false),
            drive("data", Path::new("img/data.img"), false),
            drive("base", &shared, true),
            Drive { host_path: shared.clone(), ..drive("tools", Path::new("tools.img"), true) },
        ];
        let vsock = |p: &str| Some(Vsock { uds_path: p.into(), host_path: p.into() });
        let plan =
            plan_devices(&Devices { drives: drives.clone(), vsock: vsock("/run/vm/v.sock"), network: vec![] }, &cwd)
                .unwrap();
        // A vsock socket named absolutely is overridden with one in the VM's directory.
        let own = Vsock { uds_path: VSOCK_SOCKET.into(), host_path: cwd.join(VSOCK_SOCKET) };
        assert_eq!((plan.vsock.as_ref(), plan.vsock_override.as_deref()), (Some(&own), Some(Path::new(VSOCK_SOCKET))));
        // "./x" is "x": a relative name Firecracker opens in its working directory.
        let dotted = drive("root", Path::new("./root.ext4"), false);
        let p = plan_devices(&Devices { drives: vec![dotted], vsock: None, network: vec![] }, &cwd).unwrap();
        assert_eq!(p.drives[0].drive.host_path, cwd.join("./root.ext4"));
        let relative =
            plan_devices(&Devices { drives: vec![], vsock: vsock("s/v.sock"), network: vec![] }, &cwd).unwrap();
        let own = Vsock { uds_path: "s/v.sock".into(), host_path: cwd.join("s/v.sock") };
        assert_eq!((relative.vsock, relative.vsock_override), (Some(own), None));
        let got: Vec<(&Path, &Path, &Make, bool)> = plan
            .drives
            .iter()
            .map(|d| (d.drive.path_on_host.as_path(), d.drive.host_path.as_path(), &d.make, d.patch))
            .collect();
        let link = Make::Link { at: cwd.join("tools.img") };
        assert_eq!(
            got,
            [
                (Path::new("rootfs"), cwd.join("rootfs").as_path(), &Make::Copy, true),
                (Path::new("img/data.img"), cwd.join("img/data.img").as_path(), &Make::Copy, false),
                (shared.as_path(), shared.as_path(), &Make::Nothing, false),
                // Its record keeps the shared file: a later snapshot links to it, not to this link.
                (Path::new("tools.img"), shared.as_path(), &link, false),
            ]
        );
        for (bad, why) in [
            (vec![drive("d", Path::new("../escape.img"), false)], "leaves"),
            (vec![drive("d", Path::new("a/../../b"), true)], "leaves"),
            (vec![drive("d", Path::new(""), false)], "leaves"),
            (vec![drive("d", &dir.path().join("gone.img"), false)], "gone"),
            (vec![drive("d/x", Path::new("d.img"), false)], "bad drive id"),
            (vec![drive("a", &orig, false), drive("b", Path::new("a"), false)], "one place"),
            (
                vec![
                    Drive { host_path: shared.clone(), ..drive("a", Path::new("x"), true) },
                    drive("b", Path::new("x/y"), false),
                ],
                "one place",
            ),
            (vec![drive("a", Path::new("x"), true)], "not named absolutely"),
            (vec![Drive { host_path: dir.path().join("gone"), ..drive("a", Path::new("x"), true) }], "gone"),
        ] {
            let err = plan_devices(&Devices { drives: bad.clone(), vsock: None, network: vec![] }, &cwd)
                .unwrap_err()
                .to_string();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
        for (bad, why) in [
            (Devices { drives: vec![], vsock: vsock("../v.sock"), network: vec![] }, "leaves"),
            (
                Devices {
                    drives: vec![drive("a", Path::new("v.sock"), false)],
                    vsock: vsock("v.sock"),
                    network: vec![],
                },
                "one place",
            ),
        ] {
            let err = plan_devices(&bad, &cwd).unwrap_err().to_string();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
    }

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

    /// `GET /vm/config` answered with `body`, as the devices the VMM reports.
    fn reported(body: serde_json::Value) -> Result<ReportedDevices> {
        let (_dir, path) = vmm_answering(move |mut s| {
            let mut req = [0u8; 4096];
            let _ = s.read(&mut req);
            let b = body.to_string();
            let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{b}", b.len());
        });
        ApiClient::new(&path).devices()
    }

    /// The devices of `GET /vm/config`, and the ones no restore can give a VM of its own.
    #[test]
    fn vm_config_devices_are_read_and_unforkable_ones_refused() {
        let got = reported(serde_json::json!({
            "drives": [{"drive_id": "rootfs", "path_on_host": "/img/root.ext4", "is_read_only": false}],
            "vsock": {"guest_cid": 3, "uds_path": "v.sock"},
            "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:00:00:00:01"}],
            "pmem": [{"id": "pm0", "path_on_host": "/img/base.pmem", "read_only": true}],
        }))
        .unwrap();
        assert_eq!(got.drives, [("rootfs".to_string(), PathBuf::from("/img/root.ext4"), false)]);
        assert_eq!(got.vsock, Some(PathBuf::from("v.sock")));
        assert_eq!(got.network, [NetInterface { iface_id: "eth0".into(), host_dev_name: "tap0".into() }]);
        for (body, why) in [
            (serde_json::json!({"pmem": [{"id": "pm0", "path_on_host": "/img/p", "read_only": false}]}), "writable"),
            (serde_json::json!({"pmem": [{"id": "pm0", "path_on_host": "p", "read_only": true}]}), "relatively"),
            (serde_json::json!({"drives": [{"drive_id": "vhost", "socket": "/run/vu.sock"}]}), "vhost-user"),
        ] {
            let err = reported(body).unwrap_err().to_string();
            assert!(err.contains(why), "{err}");
        }
    }
}
