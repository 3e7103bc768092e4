//! A thin, synchronous wrapper around Debian's `runsc` (gVisor release 2022-12-19).
//!
//! Quirks of that release, measured on this machine (see `engine/README.md`):
//! - Global flags (`--root`, `--network`, `--platform`) must be repeated on *every* command: a
//!   `restore` without `--network=none` tries to rebuild a network namespace the sandbox never had.
//! - `run -detach` / `restore -detach` hand their own stdio to the sandbox, so their stdout/stderr
//!   must be files (a pipe would never reach EOF while the sandbox lives).
//! - `checkpoint` kills the sandbox once the image is written; the container then reports
//!   `stopped` (or keeps reporting `paused` if it was paused, until `resume` finds it gone).
//! - `pause` of a restored sandbox returns 0 and `state` says `paused`, but its tasks run on; a
//!   paused container whose sandbox died stays `paused`; `delete --force` of a paused container
//!   removes it and then panics.
//! - `checkpoint --leave-running` is implemented by runsc as "checkpoint, destroy, then `run` a new
//!   container with the same id and *wait for it*": the command never returns, and the gofer of the
//!   new sandbox is its child, so killing the command (e.g. on a timeout) leaves a sandbox whose
//!   mounts fail with EIO. The engine therefore never uses it; it checkpoints and then restores the
//!   image in place with `restore -detach` (see [`crate::gvisor`]).

use std::fs::{File, OpenOptions};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::error::{Error, Result};

/// How to call runsc: the binary and the global flags every command must carry.
#[derive(Clone, Debug)]
pub struct Runsc {
    /// The runsc binary.
    pub binary: PathBuf,
    /// runsc's state directory (`--root`), private to one engine.
    pub root: PathBuf,
    /// `--network` (`none` by default: sandboxes get no network).
    pub network: String,
    /// `--platform`, when not runsc's default (ptrace).
    pub platform: Option<String>,
    /// Every command leads a process group of its own (a daemon's choice: a Ctrl-C in its
    /// terminal must reach the daemon alone, which then lets its operations finish). Otherwise
    /// only the commands that leave processes behind (`run`, `restore`: their gofers) do, and
    /// a Ctrl-C of a command that waits for runsc (`sandbox exec`) reaches runsc too.
    pub own_groups: bool,
    /// Upper bound on any one runsc command.
    pub timeout: Duration,
}

/// What `runsc state` reports about a container.
#[derive(Clone, Debug, Deserialize)]
pub struct ContainerState {
    /// The container id.
    pub id: String,
    /// `created`, `running`, `paused` or `stopped`.
    pub status: String,
    /// The sandbox's host pid (-1 or 0 once stopped).
    #[serde(default)]
    pub pid: i64,
}

/// What a command run in a sandbox (`runsc exec`) returned.
#[derive(Clone, Debug, Default)]
pub struct ExecOutput {
    /// Its exit code (128 + N when signal N ended it).
    pub exit_code: i32,
    /// Its stdout, up to the limit asked for.
    pub stdout: Vec<u8>,
    /// Its stderr (and runsc's errors), up to the limit asked for.
    pub stderr: Vec<u8>,
    /// True when either stream printed more than the limit (the rest was dropped).
    pub truncated: bool,
}

impl ContainerState {
    /// False when the sandbox process runsc names is gone (or a zombie, or another process
    /// now has its pid): this runsc goes on reporting a paused container whose sandbox died
    /// as `paused`. True when it cannot tell.
    pub fn sandbox_alive(&self) -> bool {
        if self.pid <= 0 {
            return true;
        }
        let proc = PathBuf::from(format!("/proc/{}", self.pid));
        let cmdline = match std::fs::read(proc.join("cmdline")) {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return false,
            // Hidden (hidepid) or not ours to read: only a signal can tell (EPERM: it exists).
            Err(_) => {
                let pid = nix::unistd::Pid::from_raw(self.pid as i32);
                return !matches!(nix::sys::signal::kill(pid, None), Err(nix::errno::Errno::ESRCH));
            }
        };
        // A zombie has an empty command line; any other process that is not this sandbox
        // does not name its container.
        let stat = std::fs::read_to_string(proc.join("stat")).unwrap_or_default();
        let zombie = stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z'));
        !zombie && cmdline.split(|&b| b == 0).any(|arg| arg == self.id.as_bytes())
    }
}

impl Runsc {
    /// A runsc whose state lives in `root`; the binary is `$RUNSC` or `runsc` from `PATH`.
    pub fn new(root: PathBuf) -> Runsc {
        let binary = std::env::var_os("RUNSC").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("runsc"));
        Runsc {
            binary,
            root,
            network: "none".into(),
            platform: None,
            own_groups: false,
            timeout: Duration::from_secs(120),
        }
    }

    /// A runsc command; `outlives_call` for one that leaves processes behind.
    fn command(&self, outlives_call: bool) -> Command {
        let mut cmd = Command::new(&self.binary);
        // Every command gets the same global flags (see the module docs).
        cmd.arg(format!("--root={}", self.root.display()));
        cmd.arg(format!("--network={}", self.network));
        if let Some(p) = &self.platform {
            cmd.arg(format!("--platform={p}"));
        }
        cmd.stdin(Stdio::null());
        // A process group of its own: a terminal's Ctrl-C or hangup reaches the caller's group,
        // never the gofer that `run`/`restore` leave behind (its sandbox's files fail without
        // it), nor, in a daemon, a command in flight (see `own_groups`).
        if outlives_call || self.own_groups {
            cmd.process_group(0);
        }
        cmd
    }

    /// Runs `args`, with stdout and stderr appended to `log` (or captured when `log` is None),
    /// failing after the timeout. Returns captured stdout.
    fn exec(&self, args: &[&str], log: Option<&Path>, what: &str) -> Result<String> {
        self.exec_as(args, log, what, false)
    }

    /// [`Runsc::exec`] of a command that leaves processes behind when `outlives_call`.
    fn exec_as(&self, args: &[&str], log: Option<&Path>, what: &str, outlives_call: bool) -> Result<String> {
        let mut cmd = self.command(outlives_call);
        cmd.args(args);
        let start = Instant::now();
        // Output goes to files, never pipes: detached sandboxes inherit it (see module docs).
        let (out_path, err_path, _tmp) = match log {
            Some(l) => (l.to_path_buf(), l.to_path_buf(), None),
            None => {
                let dir = tempdir_in(&self.root)?;
                (dir.join("out"), dir.join("err"), Some(TempDirGuard(dir)))
            }
        };
        let out = open_append(&out_path)?;
        let err = open_append(&err_path)?;
        // A sandbox's console log holds everything its guest ever printed: only what this
        // command adds to it can explain its failure.
        let err_from = err.metadata().map(|m| m.len()).unwrap_or(0);
        cmd.stdout(out).stderr(err);
        tracing::debug!(?args, "runsc");
        let mut child = cmd.spawn().map_err(|e| Error::Runtime {
            what: format!("runsc {what}"),
            detail: format!("cannot start {}: {e}", self.binary.display()),
        })?;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) => {}
                Err(e) => {
                    return Err(Error::Runtime { what: format!("runsc {what}"), detail: e.to_string() });
                }
            }
            if start.elapsed() > self.timeout {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Runtime {
                    what: format!("runsc {what}"),
                    detail: format!("timed out after {:?}", self.timeout),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        if !status.success() {
            let tail: String = last_lines(&read_tail(&err_path, err_from, MAX_ERROR_TAIL), 3);
            return Err(Error::Runtime { what: format!("runsc {what}"), detail: format!("{status}: {tail}") });
        }
        tracing::debug!(?args, elapsed = ?start.elapsed(), "runsc done");
        // Captured output only: a console log is the guest's, not an answer.
        Ok(if log.is_some() { String::new() } else { read_tail(&out_path, 0, u64::MAX) })
    }

    /// Runs a create-style command; when a stale container of that id exists (left by a crashed
    /// engine), removes it and tries once more. Checking first would cost a runsc call every time.
    fn create_retrying(&self, args: &[&str], id: &str, log: &Path, what: &str) -> Result<()> {
        match self.exec_as(args, Some(log), what, true) {
            Err(Error::Runtime { detail, .. }) if detail.contains("already exists") => {
                tracing::warn!(id, "removing a stale container of the same id");
                self.destroy(id)?;
                self.exec_as(args, Some(log), what, true).map(|_| ())
            }
            r => r.map(|_| ()),
        }
    }

    /// `runsc run -detach`: creates and starts container `id` from `bundle`; its stdio goes to `log`.
    pub fn run_detached(&self, id: &str, bundle: &Path, log: &Path) -> Result<()> {
        let b = bundle.display().to_string();
        self.create_retrying(&["run", "-detach", "-bundle", &b, id], id, log, "run")
    }

    /// `runsc restore -detach`: a new container `id` from the image in `image_dir`.
    pub fn restore_detached(&self, id: &str, bundle: &Path, image_dir: &Path, log: &Path) -> Result<()> {
        let b = bundle.display().to_string();
        let img = image_dir.display().to_string();
        self.create_retrying(&["restore", "-detach", "--image-path", &img, "-bundle", &b, id], id, log, "restore")
    }

    /// `runsc checkpoint`: writes `image_dir/checkpoint.img`; the sandbox is gone afterwards.
    pub fn checkpoint(&self, id: &str, image_dir: &Path) -> Result<()> {
        let img = image_dir.display().to_string();
        self.exec(&["checkpoint", "--image-path", &img, id], None, "checkpoint")?;
        let file = image_dir.join("checkpoint.img");
        // runsc has been seen exiting 0 without a usable image when the sandbox died under it.
        match std::fs::metadata(&file) {
            Ok(m) if m.len() > 0 => Ok(()),
            _ => Err(Error::Runtime {
                what: "runsc checkpoint".into(),
                detail: format!("no image written at {}", file.display()),
            }),
        }
    }

    /// The memory sandbox `id` uses, from its cgroup (runsc names it after the container, under
    /// cgroup v1's memory hierarchy or v2's unified one); None where neither is found. A checkpoint
    /// image holds at most about this much (runsc compresses it).
    pub fn memory_usage(&self, id: &str) -> Option<u64> {
        [format!("/sys/fs/cgroup/memory/{id}/memory.usage_in_bytes"), format!("/sys/fs/cgroup/{id}/memory.current")]
            .iter()
            .find_map(|p| std::fs::read_to_string(p).ok()?.trim().parse().ok())
    }

    /// `runsc pause`.
    pub fn pause(&self, id: &str) -> Result<()> {
        self.exec(&["pause", id], None, "pause").map(|_| ())
    }

    /// `runsc resume`.
    pub fn resume(&self, id: &str) -> Result<()> {
        self.exec(&["resume", id], None, "resume").map(|_| ())
    }

    /// `runsc kill ID KILL` (errors ignored by callers that only want it gone).
    pub fn kill(&self, id: &str) -> Result<()> {
        self.exec(&["kill", id, "KILL"], None, "kill").map(|_| ())
    }

    /// `runsc delete --force`: removes the container, killing it if it still runs.
    pub fn delete(&self, id: &str) -> Result<()> {
        self.exec(&["delete", "--force", id], None, "delete").map(|_| ())
    }

    /// `runsc exec ID ARGS...`: runs a command inside the sandbox; returns its exit code and
    /// up to `limit` bytes of each of its stdout and stderr (the rest is read and dropped, so
    /// the command never blocks on a full pipe). Its output goes through pipes, never files:
    /// a command that prints without end cannot fill the disk. runsc hands the pipes to the
    /// sandbox, where a process the command left in the background may hold them open: once
    /// runsc exits, what they hold is read and they are closed.
    pub fn exec_in(&self, id: &str, args: &[&str], limit: usize) -> Result<ExecOutput> {
        use std::io::Read;
        use std::os::fd::AsFd;
        let fail = |detail: String| Error::Runtime { what: "runsc exec".into(), detail };
        let mut cmd = self.command(false);
        cmd.arg("exec").arg(id).args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| fail(format!("cannot start {}: {e}", self.binary.display())))?;
        let (Some(mut out), Some(mut err)) = (child.stdout.take(), child.stderr.take()) else {
            return Err(fail("no pipes".into()));
        };
        for fd in [out.as_fd(), err.as_fd()] {
            let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL).map_err(|e| fail(e.to_string()))?;
            let flags = nix::fcntl::OFlag::from_bits_retain(flags) | nix::fcntl::OFlag::O_NONBLOCK;
            nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFL(flags)).map_err(|e| fail(e.to_string()))?;
        }
        let mut res = ExecOutput::default();
        let mut buf = vec![0u8; 64 << 10];
        // Waits up to `wait_ms` for output, then reads what each pipe holds, keeping up to
        // `limit` bytes of each; at most 16 buffers (1 MiB) per pipe per call, so the timeout is
        // checked however fast the command prints.
        let mut drain = |res: &mut ExecOutput, wait_ms: u16| {
            let mut fds = [out.as_fd(), err.as_fd()].map(|fd| nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN));
            let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(wait_ms));
            for (pipe, kept) in [(&mut out as &mut dyn Read, &mut res.stdout), (&mut err, &mut res.stderr)] {
                for _ in 0..16 {
                    match pipe.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            let room = limit.saturating_sub(kept.len()).min(n);
                            kept.extend_from_slice(&buf[..room]);
                            res.truncated |= room < n;
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                }
            }
        };
        let start = Instant::now();
        let status = loop {
            drain(&mut res, 5);
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) => {}
                Err(e) => return Err(fail(e.to_string())),
            }
            if start.elapsed() > self.timeout {
                let _ = child.kill();
                let _ = child.wait();
                return Err(fail(format!("timed out after {:?}", self.timeout)));
            }
        };
        // What the pipes still hold (a background process may go on writing: not waited for).
        for _ in 0..64 {
            let before = res.stdout.len() + res.stderr.len();
            drain(&mut res, 0);
            if res.stdout.len() + res.stderr.len() == before {
                break;
            }
        }
        use std::os::unix::process::ExitStatusExt;
        res.exit_code = status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
        Ok(res)
    }

    /// Deletes container `id` (killing it if needed) in the background: runsc's `delete` waits
    /// about a second for the sandbox's processes, which no caller should wait for once the
    /// sandbox is replaced. The delete runs as its own process, so it completes even if this one exits.
    pub fn discard(&self, id: &str) {
        let mut cmd = self.command(true);
        cmd.args(["delete", "--force", id]).stdout(Stdio::null()).stderr(Stdio::null());
        match cmd.spawn() {
            Ok(mut child) => {
                // Reap it in a long-running process (daemon, tests); in a CLI that exits first,
                // init does.
                std::thread::spawn(move || child.wait());
            }
            Err(e) => tracing::warn!(id, error = %e, "cannot start runsc delete"),
        }
    }

    /// `runsc state`, or None when runsc does not know the container.
    pub fn state(&self, id: &str) -> Result<Option<ContainerState>> {
        match self.exec(&["state", id], None, "state") {
            Ok(out) => serde_json::from_str(&out).map(Some).map_err(|e| Error::Runtime {
                what: "runsc state".into(),
                detail: format!("unparsable output ({e}): {}", last_lines(&out, 2)),
            }),
            Err(Error::Runtime { detail, .. }) if detail.contains("does not exist") || detail.contains("not exist") => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Removes the container whatever its state; a container runsc does not know is fine.
    /// A `delete` that fails is fine too once the container is gone: this runsc's `delete` of a
    /// paused container whose sandbox died panics after removing it.
    pub fn destroy(&self, id: &str) -> Result<()> {
        let _ = self.kill(id);
        match self.delete(id) {
            Ok(()) => Ok(()),
            Err(e) => match self.state(id) {
                Ok(None) => Ok(()),
                _ => Err(e),
            },
        }
    }
}

/// How much of what a failed command wrote is read for its error message.
const MAX_ERROR_TAIL: u64 = 64 << 10;

/// The last `max` bytes of `path` after offset `from`, as text (bytes that are not UTF-8 are
/// replaced, not lost with the rest); empty when it cannot be read.
fn read_tail(path: &Path, from: u64, max: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = from.max(len.saturating_sub(max));
    let mut buf = Vec::new();
    if f.seek(SeekFrom::Start(start)).is_err() || f.take(len.saturating_sub(start)).read_to_end(&mut buf).is_err() {
        return String::new();
    }
    String::from_utf8_lossy(&buf).into_owned()
}

fn last_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

fn open_append(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(format!("open {}", path.display()), e))
}

struct TempDirGuard(PathBuf);

impl Drop for TempDirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir_in(parent: &Path) -> Result<PathBuf> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let dir = parent.join(format!(".exec-{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed)));
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("mkdir {}", dir.display()), e))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_error_tail_is_what_the_command_added_bounded_and_lossy() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        // The guest's earlier output: much of it, not UTF-8.
        let mut earlier = vec![0xffu8; 1 << 20];
        earlier.extend_from_slice(b"\nold error from the guest\n");
        std::fs::write(&log, &earlier).unwrap();
        let from = earlier.len() as u64;
        let mut f = open_append(&log).unwrap();
        std::io::Write::write_all(&mut f, b"\xfe\xfe running...\ncreating container: boom\n").unwrap();
        let tail = last_lines(&read_tail(&log, from, MAX_ERROR_TAIL), 3);
        assert!(tail.contains("creating container: boom"), "{tail}");
        assert!(!tail.contains("old error"), "{tail}");
        // A command that wrote more than the bound: its last bytes.
        let mut big = vec![b'x'; 2 << 20];
        big.extend_from_slice(b"\nthe real cause\n");
        std::io::Write::write_all(&mut f, &big).unwrap();
        let t = read_tail(&log, from, MAX_ERROR_TAIL);
        assert!(t.len() as u64 <= MAX_ERROR_TAIL + 8 && t.ends_with("the real cause\n"), "{} bytes", t.len());
    }
}
