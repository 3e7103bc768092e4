//! `snapfork daemon`: owns a store and serves every engine operation over HTTP/JSON on a Unix
//! socket, so that many agents can act at once (operations on different sandboxes run in
//! parallel; two on one sandbox run one after the other). The CLI uses it when it runs.
//!
//! The socket is `STORE/engine/run/daemon.sock`: the `run` directory is mode 0700 and the socket
//! 0600, so only the store's owner can talk to it. HTTP/1.1, one request per connection. Every
//! response body is `{"result": <the CLI's --json object>, "text": <the CLI's text>}` on success
//! and `{"error": "..."}` (status 4xx/5xx) otherwise. The routes are in docs/api.md.
//!
//! SIGTERM or SIGINT: stop accepting, let in-flight operations finish (they cannot be half done:
//! see the engine's atomicity rules), remove the socket, stop serving VM memory
//! (`Engine::shutdown`), exit. Sandboxes keep running; a restarted
//! daemon finds them in the engine's state directory, and serves the memory of the Firecracker
//! VMs an earlier daemon restored lazily again (`Engine::adopt_vms`), whether that daemon stopped
//! or crashed.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::Args;
use serde_json::{Value, json};
use snapfork_engine::tokio;
use snapfork_engine::tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::Global;
use crate::output::Report;
use crate::sandbox_cmds::{EngineCmd, RunArgs, SandboxCmd, execute, runtime};

/// `daemon` options.
#[derive(Args, Debug)]
pub struct DaemonArgs {
    /// Socket path (default: STORE/engine/run/daemon.sock, where a symlink to it is left
    /// otherwise, so that the CLI finds the daemon either way).
    #[arg(long)]
    pub socket: Option<PathBuf>,
}

const MAX_HEAD: usize = 64 << 10;
const MAX_BODY: usize = 1 << 20;
/// Longest a client may take to send its request, and to take its response: a client that
/// stalls is dropped instead of holding a task and a descriptor.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Most operations served at once; more wait (connected, their request read).
const MAX_OPERATIONS: usize = 256;
/// How many connections are open at once, operations and requests still being read together:
/// beyond [`MAX_OPERATIONS`], so that a health probe is answered while every operation slot
/// is taken (or held by clients that have not sent their request yet).
const MAX_CONNECTIONS: usize = 1024;
/// How long the CLI waits for a daemon to answer its health probe before calling it hung.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// The daemon socket of the store in `global`.
pub fn socket_path(global: &Global) -> PathBuf {
    let store = std::path::absolute(&global.store).unwrap_or_else(|_| global.store.clone());
    store.join("engine").join("run").join("daemon.sock")
}

// ---------------------------------------------------------------------------------------------
// Routes: EngineCmd <-> (method, path, body). The client and the server use the same table.

fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn dec(s: &str) -> anyhow::Result<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = s.get(i + 1..i + 3).context("bad percent-encoding")?;
            out.push(u8::from_str_radix(h, 16).context("bad percent-encoding")?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Ok(String::from_utf8(out)?)
}

/// The HTTP request that performs `cmd`.
pub fn to_request(cmd: &EngineCmd) -> anyhow::Result<(&'static str, String, Value)> {
    use SandboxCmd as S;
    Ok(match cmd {
        EngineCmd::Sandbox(c) => match c {
            S::Run(a) => ("POST", "/v1/sandboxes".into(), serde_json::to_value(a)?),
            S::Checkpoint { name, message, labels, leave_running } => (
                "POST",
                format!("/v1/sandboxes/{}/checkpoint", enc(name)),
                json!({"message": message, "labels": labels, "leave_running": leave_running}),
            ),
            S::Restore { snap, as_name } => {
                ("POST", format!("/v1/snapshots/{}/restore", enc(snap)), json!({"as": as_name}))
            }
            S::Fork { snap, n, prefix } => {
                ("POST", format!("/v1/snapshots/{}/fork", enc(snap)), json!({"n": n, "prefix": prefix}))
            }
            S::Revert { name, snap } => {
                ("POST", format!("/v1/sandboxes/{}/revert", enc(name)), json!({"snapshot": snap}))
            }
            S::Diff { a, b } => ("GET", format!("/v1/diff?a={}&b={}", enc(a), enc(b)), Value::Null),
            S::Log { name: Some(n) } => ("GET", format!("/v1/log?sandbox={}", enc(n)), Value::Null),
            S::Log { name: None } => ("GET", "/v1/log".into(), Value::Null),
            S::Show { snap } => ("GET", format!("/v1/snapshots/{}", enc(snap)), Value::Null),
            S::Tag { snap, delete: true, .. } => ("DELETE", format!("/v1/tags/{}", enc(snap)), Value::Null),
            S::Tag { snap, tag: Some(t), delete: false, force } => {
                ("PUT", format!("/v1/tags/{}", enc(t)), json!({"snapshot": snap, "force": force}))
            }
            S::Tag { tag: None, .. } => bail!("give SNAP TAG"),
            S::Rm { names } => ("POST", "/v1/rm".into(), json!({"names": names})),
            S::Stop { name } => ("POST", format!("/v1/sandboxes/{}/stop", enc(name)), Value::Null),
            S::Ls => ("GET", "/v1/sandboxes".into(), Value::Null),
            S::Exec { name, cmd } => ("POST", format!("/v1/sandboxes/{}/exec", enc(name)), json!({"cmd": cmd})),
        },
        EngineCmd::Export { snap, out } => ("POST", "/v1/export".into(), json!({"snapshot": snap, "output": out})),
        EngineCmd::Import { file } => ("POST", "/v1/import".into(), json!({"file": file})),
        EngineCmd::Demo(_) | EngineCmd::Daemon(_) => bail!("not available through the daemon"),
    })
}

fn field<T: serde::de::DeserializeOwned>(body: &Value, key: &str) -> anyhow::Result<T> {
    serde_json::from_value(body.get(key).cloned().unwrap_or(Value::Null)).with_context(|| format!("body field {key:?}"))
}

fn opt_field<T: serde::de::DeserializeOwned + Default>(body: &Value, key: &str) -> anyhow::Result<T> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(T::default()),
        Some(v) => serde_json::from_value(v.clone()).with_context(|| format!("body field {key:?}")),
    }
}

/// Refuses a body that is not an object of the fields `allowed`: a misspelt field (say
/// `leave-running`) must fail the call, not be ignored and change what it does.
fn only_fields(body: &Value, allowed: &[&str]) -> anyhow::Result<()> {
    let fields = match body {
        Value::Null => return Ok(()),
        Value::Object(m) => m,
        other => bail!("body must be a JSON object, not {other}"),
    };
    match fields.keys().find(|k| !allowed.contains(&k.as_str())) {
        None => Ok(()),
        Some(k) if allowed.is_empty() => bail!("unknown body field {k:?}: this call takes no body fields"),
        Some(k) => bail!("unknown body field {k:?} (this call takes {})", allowed.join(", ")),
    }
}

/// The body fields each route takes (`POST /v1/sandboxes` is checked by its own type); None
/// for no route (a 404, whatever the body).
fn route_fields(method: &str, seg: &[&str]) -> Option<&'static [&'static str]> {
    Some(match (method, seg) {
        ("POST", ["v1", "sandboxes", _, "checkpoint"]) => &["message", "labels", "leave_running"],
        ("POST", ["v1", "sandboxes", _, "revert"]) => &["snapshot"],
        ("POST", ["v1", "sandboxes", _, "exec"]) => &["cmd"],
        ("POST", ["v1", "rm"]) => &["names"],
        ("POST", ["v1", "snapshots", _, "restore"]) => &["as"],
        ("POST", ["v1", "snapshots", _, "fork"]) => &["n", "prefix"],
        ("PUT", ["v1", "tags", _]) => &["snapshot", "force"],
        ("POST", ["v1", "export"]) => &["snapshot", "output"],
        ("POST", ["v1", "import"]) => &["file"],
        ("POST", ["v1", "gc"]) => &["dry_run", "grace_seconds"],
        ("POST", ["v1", "sandboxes", _, "stop"])
        | ("DELETE", ["v1", "sandboxes", _] | ["v1", "tags", _])
        | ("GET", ["v1", "sandboxes"] | ["v1", "snapshots", _] | ["v1", "diff"] | ["v1", "log"]) => &[],
        _ => return None,
    })
}

/// What `POST /v1/gc` asks for: a field of the wrong type is refused, never read as a real
/// gc with the default grace.
fn gc_options(body: &Value) -> anyhow::Result<snapfork_store::GcOptions> {
    only_fields(body, route_fields("POST", &["v1", "gc"]).unwrap_or_default())?;
    Ok(snapfork_store::GcOptions {
        dry_run: opt_field(body, "dry_run")?,
        grace: std::time::Duration::from_secs(opt_field::<Option<u64>>(body, "grace_seconds")?.unwrap_or(3600)),
        ..Default::default()
    })
}

/// The command an HTTP request asks for.
pub fn from_request(method: &str, target: &str, body: &Value) -> anyhow::Result<EngineCmd> {
    use SandboxCmd as S;
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut q = std::collections::HashMap::new();
    for kv in query.split('&').filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        q.insert(dec(k)?, dec(v)?);
    }
    let seg: Vec<String> = path.trim_matches('/').split('/').map(dec).collect::<anyhow::Result<_>>()?;
    let seg: Vec<&str> = seg.iter().map(String::as_str).collect();
    let qget = |k: &str| q.get(k).cloned().ok_or_else(|| anyhow!("query parameter {k} missing"));
    let sb = |c| Ok(EngineCmd::Sandbox(c));
    if let Some(fields) = route_fields(method, &seg) {
        only_fields(body, fields)?;
    }
    match (method, seg.as_slice()) {
        ("GET", ["v1", "sandboxes"]) => sb(S::Ls),
        ("POST", ["v1", "sandboxes"]) => {
            // (serde would read an array field by field, in order.)
            if !body.is_object() {
                bail!("body must be a JSON object, not {body}");
            }
            sb(S::Run(Box::new(serde_json::from_value::<RunArgs>(body.clone())?)))
        }
        ("POST", ["v1", "sandboxes", name, "checkpoint"]) => sb(S::Checkpoint {
            name: name.to_string(),
            message: opt_field(body, "message")?,
            labels: opt_field(body, "labels")?,
            leave_running: opt_field(body, "leave_running")?,
        }),
        ("POST", ["v1", "sandboxes", name, "revert"]) => {
            sb(S::Revert { name: name.to_string(), snap: field(body, "snapshot")? })
        }
        ("POST", ["v1", "sandboxes", name, "stop"]) => sb(S::Stop { name: name.to_string() }),
        ("POST", ["v1", "sandboxes", name, "exec"]) => sb(S::Exec { name: name.to_string(), cmd: field(body, "cmd")? }),
        ("DELETE", ["v1", "sandboxes", name]) => sb(S::Rm { names: vec![name.to_string()] }),
        ("POST", ["v1", "rm"]) => sb(S::Rm { names: field(body, "names")? }),
        ("POST", ["v1", "snapshots", snap, "restore"]) => {
            sb(S::Restore { snap: snap.to_string(), as_name: field(body, "as")? })
        }
        ("POST", ["v1", "snapshots", snap, "fork"]) => sb(S::Fork {
            snap: snap.to_string(),
            n: opt_field::<Option<usize>>(body, "n")?.unwrap_or(1),
            prefix: opt_field(body, "prefix")?,
        }),
        ("GET", ["v1", "snapshots", snap]) => sb(S::Show { snap: snap.to_string() }),
        ("GET", ["v1", "diff"]) => sb(S::Diff { a: qget("a")?, b: qget("b")? }),
        ("GET", ["v1", "log"]) => sb(S::Log { name: q.get("sandbox").cloned() }),
        ("PUT", ["v1", "tags", tag]) => sb(S::Tag {
            snap: field(body, "snapshot")?,
            tag: Some(tag.to_string()),
            delete: false,
            force: opt_field(body, "force")?,
        }),
        ("DELETE", ["v1", "tags", tag]) => sb(S::Tag { snap: tag.to_string(), tag: None, delete: true, force: false }),
        ("POST", ["v1", "export"]) => {
            Ok(EngineCmd::Export { snap: field(body, "snapshot")?, out: field(body, "output")? })
        }
        ("POST", ["v1", "import"]) => Ok(EngineCmd::Import { file: field(body, "file")? }),
        _ => Err(anyhow!(NotFound(format!("no route {method} {path}")))),
    }
}

#[derive(Debug)]
struct NotFound(String);

impl std::fmt::Display for NotFound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NotFound {}

// ---------------------------------------------------------------------------------------------
// Client.

/// Sends `cmd` to the daemon serving this store, if one runs; None when there is none.
pub fn try_call(cmd: &EngineCmd, global: &Global) -> anyhow::Result<Option<Report>> {
    let (method, target, body) = to_request(cmd)?;
    try_request(method, &target, &body, global)
}

/// Refuses at once, naming the daemon, to open this store for writing while its daemon holds
/// it: waiting for the lock (`--lock-timeout`) would only end in a less clear error.
pub fn refuse_if_serving(global: &Global, what: &str) -> anyhow::Result<()> {
    let path = socket_path(global);
    if !path.exists() {
        return Ok(());
    }
    match probe(&path) {
        Ok(Some(serves)) if serves.as_ref().is_none_or(|s| s.is_store(&global.store)) => bail!(
            "the snapfork daemon serving {} holds the store: {what} opens the store itself and runs only \
             while the daemon is stopped (the daemon serves sandbox commands and gc)",
            path.display()
        ),
        _ => Ok(()),
    }
}

/// Sends one request to the daemon serving this store, if one runs; None when there is none.
pub fn try_request(method: &str, target: &str, body: &Value, global: &Global) -> anyhow::Result<Option<Report>> {
    let path = socket_path(global);
    if !path.exists() {
        return Ok(None);
    }
    // A socket left by a daemon that died: nobody listens.
    let Some(serves) = probe(&path)? else {
        return Ok(None);
    };
    // A link left by a daemon of this store that died (`daemon --socket`) may now lead to
    // another store's daemon: that one must not be told what to do here.
    if let Some(other) = serves.filter(|s| !s.is_store(&global.store)) {
        tracing::warn!(
            socket = %path.display(),
            serves = %other.path,
            "the daemon socket of this store leads to another store's daemon; opening the store directly"
        );
        return Ok(None);
    }
    let mut stream =
        std::os::unix::net::UnixStream::connect(&path).with_context(|| format!("connecting to {}", path.display()))?;
    let body = if body.is_null() { String::new() } else { body.to_string() };
    write!(
        stream,
        "{method} {target} HTTP/1.1\r\nHost: snapfork\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut resp = Vec::new();
    stream.read_to_end(&mut resp)?;
    let text = String::from_utf8_lossy(&resp);
    let (head, body) = text.split_once("\r\n\r\n").context("malformed response from the daemon")?;
    let status: u16 =
        head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).context("malformed status line from the daemon")?;
    let v: Value = serde_json::from_str(body).context("daemon response is not JSON")?;
    if status != 200 {
        bail!("{}", v.get("error").and_then(Value::as_str).unwrap_or("daemon error"));
    }
    Ok(Some(Report::new(
        v.get("result").cloned().unwrap_or(Value::Null),
        v.get("text").and_then(Value::as_str).unwrap_or_default().to_string(),
    )))
}

/// The store a daemon serves, as its health says: its directory's (device, inode), which name
/// it whatever path (a bind mount, another mount namespace) each side knows it by.
struct Serves {
    path: String,
    inode: (u64, u64),
}

impl Serves {
    fn is_store(&self, store: &Path) -> bool {
        store_inode(store) == Some(self.inode)
    }
}

/// The (device, inode) of the store directory.
fn store_inode(store: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(store).ok().map(|m| (m.dev(), m.ino()))
}

/// Asks the daemon at `path` whether it is up, and which store it serves (None from a daemon
/// that does not say): None when nobody listens (a stale socket), an error when it accepts but
/// does not answer in time (stopped or hung), rather than waiting on it forever. Operations
/// themselves get no deadline: a checkpoint may take minutes.
fn probe(path: &Path) -> anyhow::Result<Option<Option<Serves>>> {
    let mut s = match std::os::unix::net::UnixStream::connect(path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("connecting to {}", path.display())),
    };
    s.set_read_timeout(Some(PROBE_TIMEOUT))?;
    s.set_write_timeout(Some(PROBE_TIMEOUT))?;
    let mut resp = Vec::new();
    let answered = s
        .write_all(b"GET /v1/health HTTP/1.1\r\nHost: snapfork\r\nConnection: close\r\n\r\n")
        .and_then(|_| s.read_to_end(&mut resp));
    match answered {
        Ok(_) if resp.starts_with(b"HTTP/1.1 200") => {
            let body = resp.windows(4).position(|w| w == b"\r\n\r\n").map_or(&[][..], |p| &resp[p + 4..]);
            let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            let r = &v["result"];
            let inode = r["store_inode"].as_array().and_then(|a| Some((a.first()?.as_u64()?, a.get(1)?.as_u64()?)));
            Ok(Some(inode.map(|inode| Serves { path: r["store"].as_str().unwrap_or_default().to_string(), inode })))
        }
        Ok(_) => bail!("the daemon at {} answered its health check with an error", path.display()),
        Err(e) => bail!(
            "the daemon at {} does not answer ({e}): is it stopped or hung? (stop it, or remove the socket if it is gone)",
            path.display()
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// Server.

struct Request {
    method: String,
    target: String,
    body: Vec<u8>,
}

async fn read_request(conn: &mut tokio::net::UnixStream) -> anyhow::Result<Request> {
    let mut buf = Vec::with_capacity(4096);
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        if buf.len() > MAX_HEAD {
            bail!("request head larger than {MAX_HEAD} bytes");
        }
        let mut chunk = [0u8; 4096];
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed mid-request");
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..head_end])?.to_string();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or_default().split_whitespace();
    let method = first.next().context("no method")?.to_string();
    let target = first.next().context("no target")?.to_string();
    let mut len = 0usize;
    for l in lines {
        let Some((k, v)) = l.split_once(':') else { continue };
        if k.trim().eq_ignore_ascii_case("content-length") {
            len = v.trim().parse().context("bad Content-Length")?;
        } else if k.trim().eq_ignore_ascii_case("transfer-encoding") {
            // Read as no body, a chunked request would run with its fields missing.
            bail!("Transfer-Encoding {} is not supported: send the body with a Content-Length", v.trim());
        }
    }
    if len > MAX_BODY {
        bail!("body larger than {MAX_BODY} bytes");
    }
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < len {
        let mut chunk = vec![0u8; (len - body.len()).min(65536)];
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed mid-body");
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(len);
    Ok(Request { method, target, body })
}

async fn respond(conn: &mut tokio::net::UnixStream, status: u16, body: &Value) {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        409 => "Conflict",
        503 => "Service Unavailable",
        507 => "Insufficient Storage",
        _ => "Internal Server Error",
    };
    let b = body.to_string();
    let msg = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}",
        b.len()
    );
    // A client that does not read its response is dropped after CLIENT_TIMEOUT.
    let _ = tokio::time::timeout(CLIENT_TIMEOUT, async {
        let _ = conn.write_all(msg.as_bytes()).await;
        let _ = conn.shutdown().await;
    })
    .await;
}

/// Serves one connection. `in_flight` counts it from the moment its request is read until its
/// response is written: what shutdown waits for (a client still sending is not waited for).
async fn handle(
    mut conn: tokio::net::UnixStream,
    engine: snapfork_engine::Engine,
    global: Arc<Global>,
    in_flight: Arc<AtomicUsize>,
    operations: Arc<tokio::sync::Semaphore>,
) {
    let req = match tokio::time::timeout(CLIENT_TIMEOUT, read_request(&mut conn)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return respond(&mut conn, 400, &json!({"error": crate::output::error_line(&e)})).await,
        Err(_) => {
            let e = format!("no complete request within {} s", CLIENT_TIMEOUT.as_secs());
            return respond(&mut conn, 400, &json!({"error": e})).await;
        }
    };
    if req.method == "GET" && req.target == "/v1/health" {
        let health = json!({"ok": true, "pid": std::process::id(), "store": global.store.to_string_lossy(), "store_inode": store_inode(&global.store)});
        return respond(&mut conn, 200, &json!({"result": health, "text": "ok"})).await;
    }
    // Counted until answered, even if serving panics: shutdown waits for the count.
    struct InFlight(Arc<AtomicUsize>);
    impl Drop for InFlight {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
    in_flight.fetch_add(1, Ordering::SeqCst);
    let _counted = InFlight(in_flight);
    // (Only fails once closed, which it never is.)
    let _slot = operations.acquire_owned().await;
    serve_request(&mut conn, req, engine, global).await;
}

async fn serve_request(
    conn: &mut tokio::net::UnixStream,
    req: Request,
    engine: snapfork_engine::Engine,
    global: Arc<Global>,
) {
    let body: Value = if req.body.is_empty() {
        Value::Null
    } else {
        match serde_json::from_slice(&req.body) {
            Ok(v) => v,
            Err(e) => {
                return respond(conn, 400, &json!({"error": format!("body is not JSON: {e}")})).await;
            }
        }
    };
    // gc is the store's, not a sandbox operation; it runs here because the daemon holds the
    // store's writer lock (sandboxes and their snapshots are refs, so gc keeps what they need).
    if req.method == "POST" && req.target == "/v1/gc" {
        let opts = match gc_options(&body) {
            Ok(o) => o,
            Err(e) => return respond(conn, 400, &json!({"error": crate::output::error_line(&e)})).await,
        };
        let dry_run = opts.dry_run;
        let e = engine.clone();
        tracing::info!(dry_run, "gc");
        let r = tokio::task::spawn_blocking(move || e.store().gc(&opts)).await;
        return match r {
            Ok(Ok(report)) => {
                let r = crate::store_cmds::gc_report(&report, dry_run);
                respond(conn, 200, &json!({"result": r.json, "text": r.text})).await
            }
            Ok(Err(e)) => respond(conn, 500, &json!({"error": format!("gc: {e}")})).await,
            Err(e) => respond(conn, 500, &json!({"error": format!("gc task: {e}")})).await,
        };
    }
    let cmd = match from_request(&req.method, &req.target, &body) {
        Ok(c) => c,
        Err(e) => {
            let status = if e.downcast_ref::<NotFound>().is_some() { 404 } else { 400 };
            return respond(conn, status, &json!({"error": crate::output::error_line(&e)})).await;
        }
    };
    tracing::info!(method = %req.method, target = %req.target, "request");
    match execute(cmd, &global, &engine).await {
        Ok(r) => respond(conn, 200, &json!({"result": r.json, "text": r.text})).await,
        Err(e) => respond(conn, status_of(&e), &json!({"error": crate::output::error_line(&e)})).await,
    }
}

/// The HTTP status of a failed operation: what the client can act on. Its own mistakes are 4xx
/// (400 invalid, 404 missing, 409 taken), a full disk 507, a store held by another process 503
/// (retry later), anything else (a runtime or an I/O failure, corruption) 500.
fn status_of(e: &anyhow::Error) -> u16 {
    use snapfork_engine::Error as E;
    use snapfork_store::Error as S;
    let store = |s: &S| match s {
        S::NotFound(_) => 404,
        S::InvalidInput(_) => 400,
        S::Full { .. } => 507,
        S::Locked { .. } => 503,
        _ => 500,
    };
    for cause in e.chain() {
        if let Some(e) = cause.downcast_ref::<E>() {
            return match e {
                E::NotFound(_) => 404,
                E::Exists(_) => 409,
                E::Invalid(_) => 400,
                E::Store(s) | E::Workspace(snapfork_fsfork::Error::Store(s)) => store(s),
                _ => 500,
            };
        }
        if let Some(s) = cause.downcast_ref::<S>() {
            return store(s);
        }
    }
    500
}

/// Makes `STORE/engine/run`, the directory of the store's socket, private (0700).
fn prepare_run_dir(default_socket: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let dir = default_socket.parent().context("socket path has no directory")?;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("make {} private", dir.display()))
}

/// Leaves a symlink at the store's socket path that leads to the socket a daemon serves
/// elsewhere (`--socket`), so that the CLI finds it the same way. Made under a private name and
/// renamed into place.
fn link_default_socket(default_socket: &Path, socket: &Path) -> anyhow::Result<()> {
    let tmp = default_socket.with_extension(format!("link-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(socket, &tmp).with_context(|| format!("create {}", tmp.display()))?;
    std::fs::rename(&tmp, default_socket).with_context(|| format!("create {}", default_socket.display()))
}

fn prepare_socket(path: &Path) -> anyhow::Result<()> {
    let dir = path.parent().context("socket path has no directory")?;
    std::fs::create_dir_all(dir)?;
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("a daemon already serves this store at {}", path.display());
        }
        std::fs::remove_file(path)?;
    }
    Ok(())
}

/// Binds the daemon's socket at `path` with mode 0600 and no instant in which anyone else could
/// connect: it is bound in a private directory beside `path`, given its mode, then renamed into
/// place. The directory that holds `path` (possibly a shared one such as /tmp) is left as it is.
fn bind_private(path: &Path) -> anyhow::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let dir = path.parent().context("socket path has no directory")?;
    let private = dir.join(format!(".snapfork-daemon-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new().mode(0o700).create(&private).with_context(|| format!("create {}", private.display()))?;
    let bound = (|| -> anyhow::Result<_> {
        let tmp = private.join("sock");
        let listener = std::os::unix::net::UnixListener::bind(&tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&tmp, path).with_context(|| format!("move the socket to {}", path.display()))?;
        listener.set_nonblocking(true)?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&private);
    bound
}

/// Runs the daemon until SIGTERM/SIGINT.
pub fn serve(a: DaemonArgs, global: &Global) -> anyhow::Result<Report> {
    let path = match a.socket {
        Some(p) => std::path::absolute(p)?,
        None => socket_path(global),
    };
    let engine = crate::sandbox_cmds::open_engine_as(global, true)?;
    // Each client holds a descriptor: allow many more than the connections served at once.
    snapfork_fsfork::sys::raise_nofile_limit();
    // Holding the store, we are its only daemon: what is at its socket path is stale, a link
    // (left by a `--socket` daemon) too, wherever it leads now.
    let default = socket_path(global);
    prepare_run_dir(&default)?;
    if std::fs::symlink_metadata(&default).is_ok_and(|m| m.file_type().is_symlink()) {
        std::fs::remove_file(&default).with_context(|| format!("remove {}", default.display()))?;
    }
    prepare_socket(&default)?;
    prepare_socket(&path)?;
    let rt = runtime()?;
    // The store as clients name it once resolved: health says which store this daemon serves.
    let store = std::fs::canonicalize(&global.store).with_context(|| format!("resolve {}", global.store.display()))?;
    let global = Arc::new(Global { store, ..global.clone() });
    let served = rt.block_on(async {
        let listener = tokio::net::UnixListener::from_std(bind_private(&path)?)?;
        if path != default {
            link_default_socket(&default, &path)?;
        }
        eprintln!("snapfork daemon: serving {} on {}", global.store.display(), path.display());
        // VMs an earlier daemon restored lazily stall until their pages are served again.
        match engine.adopt_vms().await {
            Ok(vms) if !vms.is_empty() => {
                eprintln!("snapfork daemon: serving the memory of {} running VM(s) again", vms.len())
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "could not take over the VMs of an earlier daemon"),
        }
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        let in_flight = Arc::new(AtomicUsize::new(0));
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        let operations = Arc::new(tokio::sync::Semaphore::new(MAX_OPERATIONS));
        let mut served = 0u64;
        loop {
            let slot = tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                slot = slots.clone().acquire_owned() => slot?,
            };
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                accepted = listener.accept() => {
                    let (conn, _) = match accepted {
                        Ok(c) => c,
                        Err(e) => {
                            // Out of descriptors, typically: back off instead of spinning.
                            tracing::warn!(error = %e, "accept");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    served += 1;
                    let (engine, global, n, ops) = (engine.clone(), global.clone(), in_flight.clone(), operations.clone());
                    tokio::spawn(async move {
                        handle(conn, engine, global, n, ops).await;
                        drop(slot);
                    });
                }
            }
        }
        // Stop taking work, then let what is in flight finish.
        drop(listener);
        let _ = std::fs::remove_file(&path);
        if path != default && std::fs::read_link(&default).is_ok_and(|to| to == path) {
            let _ = std::fs::remove_file(&default);
        }
        // However long they take (a checkpoint of a large VM takes minutes). A second signal
        // ends the wait for their answers; their work still ends (done, or failed leaving no
        // half snapshot) before the process exits, as the runtime waits for blocking tasks.
        while in_flight.load(Ordering::SeqCst) > 0 {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                _ = term.recv() => break,
                _ = int.recv() => break,
            }
        }
        let abandoned = in_flight.load(Ordering::SeqCst);
        if abandoned > 0 {
            eprintln!("snapfork daemon: second signal: {abandoned} operation(s) in flight go unanswered");
        }
        anyhow::Ok(served)
    })?;
    // VMs restored lazily run on; the next daemon serves their memory again (their journals
    // stay). Their servers go first: none may be inside the store as the process exits.
    engine.shutdown();
    Ok(Report::new(json!({"stopped": true, "requests": served}), format!("daemon stopped after {served} requests")))
}
