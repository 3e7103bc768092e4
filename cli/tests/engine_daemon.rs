//! The daemon end to end: ten gVisor sandboxes checkpointed at once from ten client processes,
//! SIGTERM, restart, sandboxes found again (and a dead VM's page-server journal cleared);
//! SIGTERM with a checkpoint in flight (finished, then a clean exit); and clients that stall, or a
//! daemon that does, hold nobody up. Root and runsc required (CI has both).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::json;

fn snapfork(store: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_snapfork"));
    c.arg("--store").arg(store).arg("--json");
    c
}

/// One raw HTTP request to the daemon, as curl would send it: its status and JSON body.
fn request(store: &Path, method: &str, target: &str, body: &str) -> (u16, serde_json::Value) {
    use std::io::{Read, Write};
    let mut c = std::os::unix::net::UnixStream::connect(store.join("engine/run/daemon.sock")).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let req = format!("{method} {target} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    c.write_all(req.as_bytes()).unwrap();
    let mut resp = String::new();
    c.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, serde_json::from_str(body).unwrap())
}

/// The pid of the daemon the store's socket leads to, if one answers.
fn health_pid(store: &Path) -> Option<u32> {
    use std::io::{Read, Write};
    let mut c = std::os::unix::net::UnixStream::connect(store.join("engine/run/daemon.sock")).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    c.write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
    let mut resp = String::new();
    c.read_to_string(&mut resp).ok()?;
    let v: serde_json::Value = serde_json::from_str(resp.split_once("\r\n\r\n")?.1).ok()?;
    v["result"]["pid"].as_u64().and_then(|p| u32::try_from(p).ok())
}

struct Daemon {
    child: std::process::Child,
    store: PathBuf,
}

impl Daemon {
    fn start(store: &Path) -> Daemon {
        Daemon::start_with(store, |_| {})
    }

    /// The daemon as a terminal's foreground job runs: leading a process group of its own.
    fn start_as_job(store: &Path) -> Daemon {
        use std::os::unix::process::CommandExt;
        Daemon::start_with(store, |c| {
            c.process_group(0);
        })
    }

    fn start_with(store: &Path, set_up: impl FnOnce(&mut Command)) -> Daemon {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_snapfork"));
        cmd.arg("--store").arg(store).arg("daemon").stdout(Stdio::null()).stderr(Stdio::null());
        set_up(&mut cmd);
        let child = cmd.spawn().unwrap();
        // Up once the store's socket leads to this daemon (not one a stale link leads to).
        let t = Instant::now();
        while health_pid(store) != Some(child.id()) {
            assert!(t.elapsed() < Duration::from_secs(30), "daemon did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
        Daemon { child, store: store.to_path_buf() }
    }

    fn term(mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let st = self.child.wait().unwrap();
        std::mem::forget(self);
        st
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // On a failed test: stop every sandbox, then the daemon.
        if let Ok(out) = snapfork(&self.store).args(["sandbox", "ls"]).output()
            && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout)
        {
            for s in v["sandboxes"].as_array().cloned().unwrap_or_default() {
                let _ = snapfork(&self.store).args(["sandbox", "rm", s["name"].as_str().unwrap_or("")]).output();
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const COUNTER: &str = "i=0; while true; do i=$((i+1)); echo $i >> /workspace/counter.log; sleep 0.1; done";

#[test]
fn daemon_ten_parallel_checkpoints_from_ten_clients() {
    if !common::require("daemon_ten_parallel_checkpoints_from_ten_clients", true) {
        return;
    }
    let tmp = std::env::temp_dir().join(format!("sf-daemon-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let store = tmp.join("store");
    let daemon = Daemon::start(&store);
    // The socket is private.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(store.join("engine/run/daemon.sock")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    let names: Vec<String> = (0..10).map(|k| format!("s{k}")).collect();
    // Ten clients start ten sandboxes at once.
    let starts: Vec<_> = names
        .iter()
        .map(|n| {
            snapfork(&store)
                .args(["sandbox", "run", "--busybox", n, "--", "/bin/sh", "-c", COUNTER])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in starts {
        let v = json(&c.wait_with_output().unwrap());
        assert_eq!(v["status"], "running");
    }
    std::thread::sleep(Duration::from_millis(800));
    // Ten clients checkpoint ten sandboxes at once.
    let t = Instant::now();
    let cks: Vec<_> = names
        .iter()
        .map(|n| {
            snapfork(&store)
                .args(["sandbox", "checkpoint", n, "-m", "parallel", "--leave-running"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut ids = Vec::new();
    for c in cks {
        let v = json(&c.wait_with_output().unwrap());
        assert_eq!(v["status"], "running");
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    eprintln!("10 parallel checkpoints through the daemon: {:?}", t.elapsed());
    let log = json(&snapfork(&store).args(["sandbox", "log"]).output().unwrap());
    assert_eq!(log["snapshots"].as_array().unwrap().len(), 10);

    // SIGTERM: clean exit; the sandboxes keep running; a new daemon finds them.
    assert!(daemon.term().success());
    assert!(!store.join("engine/run/daemon.sock").exists());
    // A lazily restored VM that exited while no daemon ran left its journal: the new daemon,
    // which takes over the VMs still running, removes it.
    let stale = {
        let mut vm = Command::new("sleep").arg("60").spawn().unwrap();
        let region = snapfork_lazy_restore::Region { base: 1 << 30, size: 1 << 20, offset: 0, page_size: 4096 };
        let dir = store.join("engine/vm-journals");
        let j = snapfork_lazy_restore::journal::Journal::create(&dir, vm.id() as i32, None, &[region]).unwrap();
        vm.kill().unwrap();
        vm.wait().unwrap();
        j.path().to_path_buf()
    };
    let daemon = Daemon::start(&store);
    let t = Instant::now();
    while stale.exists() {
        assert!(t.elapsed() < Duration::from_secs(10), "the daemon left a dead VM's journal");
        std::thread::sleep(Duration::from_millis(20));
    }
    let ls = json(&snapfork(&store).args(["sandbox", "ls"]).output().unwrap());
    let list = ls["sandboxes"].as_array().unwrap();
    assert_eq!(list.len(), 10);
    for s in list {
        assert_eq!(s["status"], "running", "{s}");
    }
    // Restore one of the snapshots through the restarted daemon.
    let r = json(&snapfork(&store).args(["sandbox", "restore", &ids[3], "--as", "again"]).output().unwrap());
    assert_eq!(r["id"], "again");
    // Tags through the daemon: set, refused to move without --force, moved with it.
    let t = json(&snapfork(&store).args(["sandbox", "tag", &ids[0], "good"]).output().unwrap());
    assert_eq!((t["id"].as_str(), t["snapshot"].as_str()), (Some("good"), Some(ids[0].as_str())));
    // What an HTTP client acts on: the status says whose fault and what kind.
    let (status, v) = request(&store, "PUT", "/v1/tags/good", &format!(r#"{{"snapshot":"{}"}}"#, ids[1]));
    assert_eq!(status, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("--force"), "{v}");
    let (status, v) = request(&store, "GET", "/v1/snapshots/0123456789abcdef", "");
    assert_eq!(status, 404, "{v}");
    let (status, v) =
        request(&store, "POST", "/v1/sandboxes", r#"{"name":"again","busybox":true,"cmd":["/bin/true"]}"#);
    assert_eq!(status, 409, "{v}");
    let (status, v) = request(&store, "POST", "/v1/sandboxes", r#"{"name":"x","busybox":true,"colour":"red"}"#);
    assert_eq!(status, 400, "{v}");
    let (status, v) = request(&store, "POST", "/v1/sandboxes/nobody/checkpoint", "");
    assert_eq!(status, 404, "{v}");
    let moved = snapfork(&store).args(["sandbox", "tag", &ids[1], "good"]).output().unwrap();
    assert!(!moved.status.success(), "a tag moved without --force");
    assert!(String::from_utf8_lossy(&moved.stderr).contains("--force"), "{moved:?}");
    let t = json(&snapfork(&store).args(["sandbox", "tag", &ids[1], "good", "--force"]).output().unwrap());
    assert_eq!(t["snapshot"].as_str(), Some(ids[1].as_str()));
    drop(daemon);
    let _ = std::fs::remove_dir_all(&tmp);
}

/// Clients that connect and say nothing neither block other clients nor keep the daemon from
/// stopping, and are dropped after a while; a daemon that accepts but does not answer (stopped)
/// is reported by the CLI within seconds instead of hanging it.
#[test]
fn daemon_is_not_held_up_by_silent_clients_and_a_hung_daemon_is_reported() {
    use std::io::Read;
    let tmp = tempfile::Builder::new().prefix("sf-daemon-silent-").tempdir_in("/var/tmp").unwrap();
    let store = tmp.path().join("store");
    let daemon = Daemon::start(&store);
    let sock = store.join("engine/run/daemon.sock");
    // More silent clients than operations may run at once (256).
    let silent: Vec<_> = (0..300).map(|_| std::os::unix::net::UnixStream::connect(&sock).unwrap()).collect();
    // Others are served meanwhile.
    let t = Instant::now();
    let ls = json(&snapfork(&store).args(["sandbox", "ls"]).output().unwrap());
    assert!(ls["sandboxes"].as_array().unwrap().is_empty());
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // A silent client is answered with an error and dropped.
    let mut first = &silent[0];
    first.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut resp = String::new();
    first.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 400") && resp.contains("no complete request"), "{resp}");
    // A stopped daemon: the CLI says so within seconds.
    let pid = daemon.child.id().to_string();
    Command::new("kill").args(["-STOP", &pid]).status().unwrap();
    let t = Instant::now();
    let out = snapfork(&store).args(["sandbox", "ls"]).output().unwrap();
    Command::new("kill").args(["-CONT", &pid]).status().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not answer"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    // SIGTERM with silent clients still connected: the daemon does not wait for them.
    let idle = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    let t = Instant::now();
    assert!(daemon.term().success());
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    drop((silent, idle));
}

/// `daemon --socket` in a directory others share (a sticky, world-writable one like /tmp): the
/// socket is 0600 from the moment it appears and the directory keeps its mode.
#[test]
fn daemon_socket_in_a_shared_directory_is_private_and_leaves_the_directory_alone() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let sock = shared.join("d.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_snapfork"))
        .arg("--store")
        .arg(dir.path().join("store"))
        .arg("daemon")
        .arg("--socket")
        .arg(&sock)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(t.elapsed() < Duration::from_secs(30), "daemon did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&sock), 0o600);
    assert_eq!(mode(&shared), 0o1777, "the shared directory's mode is left alone");
    let names: Vec<_> = std::fs::read_dir(&shared).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("d.sock")], "nothing left beside the socket");
    // The CLI finds this daemon through the store (it holds the store: opening it directly
    // would fail after the 1 s lock timeout), and the store's run directory is private.
    let store = dir.path().join("store");
    let out = snapfork(&store).args(["--lock-timeout", "1", "sandbox", "ls"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(json(&out)["sandboxes"], serde_json::json!([]));
    assert_eq!(mode(&store.join("engine/run")), 0o700);
    let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
    assert!(child.wait().unwrap().success());
    assert!(std::fs::symlink_metadata(store.join("engine/run/daemon.sock")).is_err(), "its link goes with it");
}

/// Bodies the daemon would misread are refused, never half understood: a misspelt field (a
/// checkpoint's `leave-running` would stop the sandbox), a field of the wrong type (a gc's
/// `"dry_run": "true"` would be a real gc), a body that is not an object, a chunked body (read
/// as none). The sandbox keeps running and the store keeps its data.
#[test]
fn daemon_refuses_request_bodies_it_would_misread() {
    use std::io::{Read, Write};
    if !common::require("daemon_refuses_request_bodies_it_would_misread", true) {
        return;
    }
    let tmp = tempfile::Builder::new().prefix("sf-daemon-body-").tempdir_in("/var/tmp").unwrap();
    let store = tmp.path().join("store");
    // Something a real gc with no grace would remove: a ref's image, its ref deleted (store
    // commands other than gc open the store themselves: before the daemon holds it).
    let img = tmp.path().join("img");
    std::fs::write(&img, vec![7u8; 1 << 20]).unwrap();
    json(&snapfork(&store).args(["ingest"]).arg(&img).args(["--name", "scratch"]).output().unwrap());
    json(&snapfork(&store).args(["rm", "scratch"]).output().unwrap());
    let daemon = Daemon::start(&store);
    json(
        &snapfork(&store)
            .args(["sandbox", "run", "--busybox", "busy", "--", "/bin/sh", "-c", COUNTER])
            .output()
            .unwrap(),
    );
    let before = json(&snapfork(&store).args(["gc", "--dry-run", "--grace", "0"]).output().unwrap());
    assert!(before["removed_chunks"].as_u64().unwrap() > 0, "{before}");

    for (target, body, expect) in [
        ("/v1/sandboxes/busy/checkpoint", r#"{"leave-running": true}"#, "unknown body field \"leave-running\""),
        ("/v1/sandboxes/busy/checkpoint", r#""x""#, "must be a JSON object"),
        ("/v1/sandboxes/busy/stop", r#"{"force": true}"#, "takes no body fields"),
        ("/v1/gc", r#"{"dry_run": "true", "grace_seconds": 0}"#, "dry_run"),
        ("/v1/gc", r#"{"grace_seconds": 0.5}"#, "grace_seconds"),
        ("/v1/sandboxes", r#"["busy2", "gvisor"]"#, "must be a JSON object"),
    ] {
        let (status, v) = request(&store, "POST", target, body);
        assert_eq!(status, 400, "{target} {body}: {v}");
        let err = v["error"].as_str().unwrap();
        assert!(err.contains(expect), "{target} {body}: {err}");
    }
    // No such route is a 404, whatever the body.
    assert_eq!(request(&store, "POST", "/v1/nothing", r#"{"x": 1}"#).0, 404);
    let mut c = std::os::unix::net::UnixStream::connect(store.join("engine/run/daemon.sock")).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let chunk = r#"{"leave_running":true}"#;
    // In one write: the daemon answers once it has read the head, and may close before a
    // second write.
    let req = format!(
        "POST /v1/sandboxes/busy/checkpoint HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
        chunk.len()
    );
    c.write_all(req.as_bytes()).unwrap();
    let mut resp = String::new();
    c.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 400") && resp.contains("Content-Length"), "{resp}");

    let ls = json(&snapfork(&store).args(["sandbox", "ls"]).output().unwrap());
    assert_eq!(ls["sandboxes"][0]["status"], "running", "{ls}");
    assert_eq!(ls["sandboxes"][0]["head"], serde_json::Value::Null, "a refused checkpoint took a snapshot: {ls}");
    let after = json(&snapfork(&store).args(["gc", "--dry-run", "--grace", "0"]).output().unwrap());
    assert_eq!(after["removed_chunks"], before["removed_chunks"], "a refused gc removed data");
    json(&snapfork(&store).args(["sandbox", "rm", "busy"]).output().unwrap());
    assert!(daemon.term().success());
}

/// Ctrl-C in the daemon's terminal sends SIGINT to its whole process group: the daemon shuts
/// down gracefully, and what it started is not in that group. Its sandboxes, one run and one
/// restored by a checkpoint that left it running, go on working: their gofers (without which
/// the workspace fails) are alive, and they keep writing their workspaces.
#[test]
fn ctrl_c_in_the_daemons_terminal_leaves_its_sandboxes_running() {
    if !common::require("ctrl_c_in_the_daemons_terminal_leaves_its_sandboxes_running", true) {
        return;
    }
    let tmp = tempfile::Builder::new().prefix("sf-daemon-int-").tempdir_in("/var/tmp").unwrap();
    let store = tmp.path().join("store");
    let mut daemon = Daemon::start_as_job(&store);
    let mut logs = vec![];
    for name in ["a", "b"] {
        let run = json(
            &snapfork(&store)
                .args(["sandbox", "run", "--busybox", name, "--", "/bin/sh", "-c", COUNTER])
                .output()
                .unwrap(),
        );
        logs.push(PathBuf::from(run["workspace"].as_str().unwrap()).join("counter.log"));
    }
    json(&snapfork(&store).args(["sandbox", "checkpoint", "b", "--leave-running"]).output().unwrap());
    let count = |log: &Path| std::fs::read_to_string(log).unwrap_or_default().lines().count();
    let group = format!("-{}", daemon.child.id());
    assert!(Command::new("kill").args(["-INT", "--", &group]).status().unwrap().success());
    assert!(daemon.child.wait().unwrap().success(), "the daemon's exit on SIGINT");
    std::mem::forget(daemon);
    let at_int: Vec<usize> = logs.iter().map(|l| count(l)).collect();
    let t = Instant::now();
    while logs.iter().zip(&at_int).any(|(l, &n)| count(l) < n + 5) {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "a sandbox stopped writing its workspace after the Ctrl-C: {:?} then {:?}",
            at_int,
            logs.iter().map(|l| count(l)).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let ls = json(&snapfork(&store).args(["sandbox", "ls"]).output().unwrap());
    for s in ls["sandboxes"].as_array().unwrap() {
        assert_eq!(s["status"], "running", "{s}");
    }
    json(&snapfork(&store).args(["sandbox", "rm", "a", "b"]).output().unwrap());
}

/// `sandbox exec`, directly and through the daemon: the command's stdout and stderr come out
/// as it wrote them and its exit code is the CLI's (`--json`: the same in one object); output
/// past 16 MiB is dropped and said to be; a command that leaves a process in the background
/// holding its output returns when the command does; a sandbox that is not running is an error.
#[test]
fn sandbox_exec_returns_the_commands_output_and_exit_code() {
    if !common::require("sandbox_exec_returns_the_commands_output_and_exit_code", true) {
        return;
    }
    let tmp = tempfile::Builder::new().prefix("sf-exec-").tempdir_in("/var/tmp").unwrap();
    let store = tmp.path().join("store");
    json(
        &snapfork(&store).args(["sandbox", "run", "--busybox", "x", "--", "/bin/sh", "-c", COUNTER]).output().unwrap(),
    );
    let exec = |args: &[&str], json_out: bool| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_snapfork"));
        c.arg("--store").arg(&store);
        if json_out {
            c.arg("--json");
        }
        c.args(["sandbox", "exec", "x", "--"]).args(args).output().unwrap()
    };
    let mut daemon = None;
    for via in ["direct", "daemon"] {
        if via == "daemon" {
            daemon = Some(Daemon::start(&store));
        }
        let out = exec(&["/bin/sh", "-c", "echo out; echo err >&2; exit 3"], false);
        assert_eq!(out.status.code(), Some(3), "{via}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n", "{via}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("err\n"), "{via}");
        let out = exec(&["/bin/sh", "-c", "echo out; echo err >&2; exit 3"], true);
        assert_eq!(out.status.code(), Some(3), "{via}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            (v["exit_code"].as_i64(), v["stdout"].as_str(), v["truncated"].as_bool()),
            (Some(3), Some("out\n"), Some(false)),
            "{via}: {v}"
        );
        assert!(v["stderr"].as_str().unwrap().contains("err\n"), "{via}: {v}");
        // 20 MB printed: 16 MiB kept, said to be cut.
        let v: serde_json::Value =
            serde_json::from_slice(&exec(&["/bin/sh", "-c", "head -c 20000000 /dev/zero; exit 0"], true).stdout)
                .unwrap();
        assert_eq!((v["exit_code"].as_i64(), v["truncated"].as_bool()), (Some(0), Some(true)), "{via}");
        assert_eq!(v["stdout"].as_str().unwrap().len(), 16 << 20, "{via}");
        // A background process keeps the output open: the call returns with the command.
        let t = Instant::now();
        let out = exec(&["/bin/sh", "-c", "sleep 30 & echo started"], false);
        assert!(t.elapsed() < Duration::from_secs(10), "{via}: {:?}", t.elapsed());
        assert_eq!(
            (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned()),
            (Some(0), "started\n".into()),
            "{via}"
        );
    }
    json(&snapfork(&store).args(["sandbox", "stop", "x"]).output().unwrap());
    let out = exec(&["/bin/true"], true);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("not running"), "{}", String::from_utf8_lossy(&out.stdout));
    json(&snapfork(&store).args(["sandbox", "rm", "x"]).output().unwrap());
    assert!(daemon.take().unwrap().term().success());
}

/// A `daemon --socket P` of store X dies (killed), leaving X's socket path a link to P; a
/// daemon of store Y then serves at P. The CLI on X must not act through Y's daemon (it opens
/// X itself), and X's daemon starts again (before, it found Y's daemon through the link and
/// refused, "a daemon already serves this store").
#[test]
fn a_stale_socket_link_never_leads_to_another_stores_daemon() {
    if !common::require("a_stale_socket_link_never_leads_to_another_stores_daemon", true) {
        return;
    }
    let tmp = tempfile::Builder::new().prefix("sf-daemon-link-").tempdir_in("/var/tmp").unwrap();
    let (x, y, p) = (tmp.path().join("x"), tmp.path().join("y"), tmp.path().join("d.sock"));
    let with_socket = |store: &Path| {
        Daemon::start_with(store, |c| {
            c.arg("--socket").arg(&p);
        })
    };
    let mut dx = with_socket(&x);
    dx.child.kill().unwrap();
    dx.child.wait().unwrap();
    std::mem::forget(dx);
    assert!(std::fs::symlink_metadata(x.join("engine/run/daemon.sock")).unwrap().file_type().is_symlink());
    std::fs::remove_file(&p).unwrap();
    let dy = with_socket(&y);
    json(&snapfork(&y).args(["sandbox", "run", "--busybox", "in-y", "--", "/bin/sh", "-c", COUNTER]).output().unwrap());
    let ls = json(&snapfork(&x).args(["--lock-timeout", "1", "sandbox", "ls"]).output().unwrap());
    assert_eq!(ls["sandboxes"], serde_json::json!([]), "store x listed store y's sandboxes");
    // X's own daemon starts (on its default socket) and is the one its CLI uses.
    let dx = Daemon::start(&x);
    let ls = json(&snapfork(&x).args(["--lock-timeout", "1", "sandbox", "ls"]).output().unwrap());
    assert_eq!(ls["sandboxes"], serde_json::json!([]));
    let (status, health) = request(&x, "GET", "/v1/health", "");
    assert_eq!(status, 200);
    assert_eq!(health["result"]["store"].as_str(), Some(std::fs::canonicalize(&x).unwrap().to_str().unwrap()));
    assert!(dx.term().success());
    json(&snapfork(&y).args(["sandbox", "rm", "in-y"]).output().unwrap());
    assert!(dy.term().success());
}

/// `snapfork gc` while a daemon holds the store: the daemon runs it (the CLI alone would wait
/// for the writer lock and fail).
#[test]
fn gc_runs_in_the_daemon_that_holds_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let daemon = Daemon::start(&store);
    for args in [&["gc", "--dry-run"][..], &["gc", "--grace", "0"]] {
        let out = snapfork(&store).args(["--lock-timeout", "1"]).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        let v = json(&out);
        assert!(v["removed_chunks"].is_u64() && v["pack_bytes_after"].is_u64(), "{v}");
    }
    // A command that writes the store itself is refused at once, naming the daemon (not after
    // the 30 s lock timeout); one that only reads runs.
    let img = dir.path().join("img");
    std::fs::write(&img, vec![3u8; 8192]).unwrap();
    let t = Instant::now();
    let out = snapfork(&store).arg("ingest").arg(&img).args(["--name", "i"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("daemon") && err.contains("holds the store"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert_eq!(json(&snapfork(&store).arg("ls").output().unwrap())["refs"], serde_json::json!([]));
    assert!(daemon.term().success());
}

/// SIGTERM while a checkpoint is in flight (held in runsc by a stopped sandbox): the daemon
/// takes no new work at once (its socket goes), finishes the checkpoint, answers its client,
/// then exits cleanly; a restarted daemon lists the snapshot and the running sandbox.
#[test]
fn daemon_sigterm_finishes_the_checkpoint_in_flight() {
    if !common::require("daemon_sigterm_finishes_the_checkpoint_in_flight", true) {
        return;
    }
    let tmp = tempfile::Builder::new().prefix("sf-daemon-term-").tempdir_in("/var/tmp").unwrap();
    let store = tmp.path().join("store");
    let mut daemon = Daemon::start(&store);
    let run = json(
        &snapfork(&store)
            .args(["sandbox", "run", "--busybox", "busy", "--", "/bin/sh", "-c", COUNTER])
            .output()
            .unwrap(),
    );
    let counter = PathBuf::from(run["workspace"].as_str().unwrap()).join("counter.log");
    let t = Instant::now();
    while std::fs::read_to_string(&counter).unwrap_or_default().lines().count() < 3 {
        assert!(t.elapsed() < Duration::from_secs(30), "the sandbox does not count");
        std::thread::sleep(Duration::from_millis(50));
    }
    let state = Command::new("runsc")
        .arg("--root")
        .arg(store.join("engine/runsc"))
        .args(["state", run["runtime_id"].as_str().unwrap()])
        .output()
        .unwrap();
    let pid = serde_json::from_slice::<serde_json::Value>(&state.stdout).unwrap()["pid"].as_i64().unwrap();
    let signal = |sig: &str, pid: i64| Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status();
    // Whatever happens below, the sandbox must not stay stopped.
    struct Cont(i64);
    impl Drop for Cont {
        fn drop(&mut self) {
            let _ = Command::new("kill").arg("-CONT").arg(self.0.to_string()).status();
        }
    }
    assert!(signal("STOP", pid).unwrap().success());
    let cont = Cont(pid);

    let checkpoint = snapfork(&store)
        .args(["sandbox", "checkpoint", "busy", "-m", "in flight", "--leave-running"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(signal("TERM", daemon.child.id() as i64).unwrap().success());
    let sock = store.join("engine/run/daemon.sock");
    let t = Instant::now();
    while sock.exists() {
        assert!(t.elapsed() < Duration::from_secs(10), "the stopping daemon still takes work");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(daemon.child.try_wait().unwrap().is_none(), "the daemon exited with a checkpoint in flight");

    drop(cont);
    let out = checkpoint.wait_with_output().unwrap();
    let ck = json(&out);
    let id = ck["id"].as_str().unwrap().to_string();
    assert_eq!(ck["status"], "running");
    let t = Instant::now();
    let exited = loop {
        if let Some(st) = daemon.child.try_wait().unwrap() {
            break st;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "the daemon did not exit after its last operation");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exited.success(), "{exited:?}");
    std::mem::forget(daemon);

    let daemon = Daemon::start(&store);
    let log = json(&snapfork(&store).args(["sandbox", "log", "busy"]).output().unwrap());
    let snaps = log["snapshots"].as_array().unwrap();
    assert!(snaps.iter().any(|s| s["id"] == id.as_str()), "{log}");
    let ls = json(&snapfork(&store).args(["sandbox", "ls"]).output().unwrap());
    assert_eq!(ls["sandboxes"][0]["status"], "running", "{ls}");
    assert_eq!(ls["sandboxes"][0]["head"], id.as_str(), "{ls}");
    drop(daemon);
}
