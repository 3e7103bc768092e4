//! The firecracker driver against Firecracker's published API, served by a stand-in (Firecracker
//! cannot be installed here). This test binary is both the test and, when started with
//! `--api-sock PATH`, the stand-in: it implements the endpoints the driver uses (`GET /`,
//! `PATCH /vm`, `PUT /snapshot/create` Full and Diff, `PUT /snapshot/load` with the Uffd backend,
//! `GET /vm/config`, `PATCH /drives/{id}`) the way the swagger definition describes them. It keeps
//! "guest memory" in a buffer, and on load maps that memory exactly as Firecracker does
//! (lazy-restore's `FakeVm`: anonymous mapping registered with userfaultfd, handshake over the
//! backend socket) and reads it, so every page comes from snapfork's UFFD server. Its drives
//! (`$FAKE_FC_DRIVES`: the bodies of `PUT /drives`) are files it holds open; a load reopens them
//! by the paths the vmstate names, relative to its working directory, as Firecracker does.
//! Test-only endpoints: `PUT /fake/write` (a guest write, which dirties a page),
//! `PUT /fake/discard` (the guest gives a page back: madvise DONTNEED, as a balloon does),
//! `GET /fake/memory` (reads all of it), `PUT /fake/disk-write` (the guest writes a block of a
//! drive), `GET /fake/disks` (each drive's open file and its hash), `PUT /fake/fail-next-create`,
//! `PUT /fake/die-in-next-create` (the process exits half way through the memory file),
//! `PUT /fake/hang-in-next-create` (the process hangs inside its write of the memory file). A
//! loaded VM reads half its memory at load, like a guest that resumes; the rest faults in when
//! touched.
//!
//! `harness = false` with the small part of libtest's protocol nextest uses (`--list`).

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::engine_at;
use serde_json::{Value, json};
use snapfork_engine::firecracker::{ApiClient, wait_for_api};
use snapfork_engine::{CheckpointOptions, DriverConfig, FirecrackerConfig, RunSpec, Status};

const PAGE: usize = 4096;
const PAGES: usize = 64;
const TEST: &str = "firecracker_checkpoint_diff_restore_fork_via_uffd";
const TEST_ADOPT: &str = "firecracker_vm_outlives_the_process_serving_its_memory";
const TEST_EXITED: &str = "firecracker_checkpoint_of_a_vm_that_exited_is_refused_at_once";
const TEST_UNSERVABLE: &str = "firecracker_vm_that_cannot_be_taken_over_is_killed_not_left_stalled";
const TEST_UNSERVED: &str = "firecracker_checkpoint_of_a_vm_nobody_serves_is_refused_until_it_is_taken_over";
const TEST_HUNG: &str = "firecracker_checkpoint_of_a_vmm_hung_in_snapshot_create_fails_in_time_and_holds_nothing";
const TEST_RM_HUNG: &str = "firecracker_rm_does_not_wait_for_a_checkpoint_hung_in_the_vmm";
const TEST_CORRUPT: &str = "firecracker_vm_killed_for_a_corrupt_page_says_so_in_ls";
const TEST_OLD: &str = "firecracker_vm_restored_from_a_snapshot_without_devices_still_stores_its_disks";
const TEST_JAILED: &str = "firecracker_checkpoints_no_restore_could_use_are_refused";
const TEST_DRIVES: &str = "firecracker_forks_get_their_own_disks_and_sockets";

fn main() {
    // Restores of imported snapshots start the local Firecracker: here, the stand-in.
    if std::env::var_os("FIRECRACKER").is_none() {
        // SAFETY: no other thread runs yet (the runtime starts below).
        unsafe { std::env::set_var("FIRECRACKER", std::env::current_exe().unwrap()) };
    }
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--api-sock") {
        fake::serve(Path::new(&args[i + 1]));
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--restore-and-serve") {
        runtime().block_on(restore_and_serve(&args[i + 1..]));
        return;
    }
    if args.iter().any(|a| a == "--list") {
        if !args.iter().any(|a| a == "--ignored") {
            for t in [
                TEST,
                TEST_DRIVES,
                TEST_OLD,
                TEST_JAILED,
                TEST_ADOPT,
                TEST_UNSERVABLE,
                TEST_EXITED,
                TEST_UNSERVED,
                TEST_HUNG,
                TEST_RM_HUNG,
                TEST_CORRUPT,
            ] {
                println!("{t}: test");
            }
        }
        return;
    }
    let filter: Vec<&String> = args.iter().skip(1).filter(|a| !a.starts_with('-')).collect();
    let selected = |name: &str| filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str()));
    if selected(TEST) {
        runtime().block_on(firecracker_checkpoint_diff_restore_fork_via_uffd());
        println!("test {TEST} ... ok");
    }
    if selected(TEST_DRIVES) {
        runtime().block_on(firecracker_forks_get_their_own_disks_and_sockets());
        println!("test {TEST_DRIVES} ... ok");
    }
    if selected(TEST_OLD) {
        runtime().block_on(firecracker_vm_restored_from_a_snapshot_without_devices_still_stores_its_disks());
        println!("test {TEST_OLD} ... ok");
    }
    if selected(TEST_JAILED) {
        runtime().block_on(firecracker_checkpoints_no_restore_could_use_are_refused());
        println!("test {TEST_JAILED} ... ok");
    }
    if selected(TEST_ADOPT) {
        runtime().block_on(firecracker_vm_outlives_the_process_serving_its_memory());
        println!("test {TEST_ADOPT} ... ok");
    }
    if selected(TEST_EXITED) {
        runtime().block_on(firecracker_checkpoint_of_a_vm_that_exited_is_refused_at_once());
        println!("test {TEST_EXITED} ... ok");
    }
    if selected(TEST_UNSERVABLE) {
        runtime().block_on(firecracker_vm_that_cannot_be_taken_over_is_killed_not_left_stalled());
        println!("test {TEST_UNSERVABLE} ... ok");
    }
    if selected(TEST_UNSERVED) {
        runtime().block_on(firecracker_checkpoint_of_a_vm_nobody_serves_is_refused_until_it_is_taken_over());
        println!("test {TEST_UNSERVED} ... ok");
    }
    if selected(TEST_HUNG) {
        runtime().block_on(firecracker_checkpoint_of_a_vmm_hung_in_snapshot_create_fails_in_time_and_holds_nothing());
        println!("test {TEST_HUNG} ... ok");
    }
    if selected(TEST_CORRUPT) {
        runtime().block_on(firecracker_vm_killed_for_a_corrupt_page_says_so_in_ls());
        println!("test {TEST_CORRUPT} ... ok");
    }
    if selected(TEST_RM_HUNG) {
        runtime().block_on(firecracker_rm_does_not_wait_for_a_checkpoint_hung_in_the_vmm());
        println!("test {TEST_RM_HUNG} ... ok");
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

mod fake {
    use super::*;

    struct Vm {
        /// Guest memory until a snapshot is loaded.
        own: Vec<u8>,
        dirty: BTreeSet<usize>,
        state: &'static str,
        fail_next_create: bool,
        die_in_next_create: bool,
        hang_in_next_create: bool,
        short_next_create: bool,
        /// After a load: guest memory is this registered mapping, filled by the UFFD server.
        loaded: Option<snapfork_lazy_restore::client::FakeVm>,
        /// Block devices: config (`drive_id`, `path_on_host`, `is_read_only`) and the open file.
        drives: Vec<(Value, std::fs::File)>,
        /// What `GET /vm/config` reports of the drives.
        drives_config: Vec<Value>,
        /// The vsock device: its config (`guest_cid`, `uds_path`) and the socket it listens on.
        vsock: Option<(Value, UnixListener)>,
        /// Network interfaces: config (`iface_id`, `host_dev_name`) and the tap it has open.
        net: Vec<(Value, std::fs::File)>,
    }

    /// Opens a network interface's tap as Firecracker does (TUNSETIFF by name; a tap another
    /// process has open is busy).
    fn open_tap(cfg: &Value) -> Result<std::fs::File, String> {
        use std::os::fd::AsRawFd;
        let name = cfg["host_dev_name"].as_str().unwrap_or("");
        let f = std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun").map_err(|e| e.to_string())?;
        // SAFETY: zeroed ifreq is valid; TUNSETIFF reads one ifreq on the tun descriptor.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (r, b) in req.ifr_name.iter_mut().zip(name.bytes().take(libc::IFNAMSIZ - 1)) {
            *r = b as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        if unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
            return Err(format!("tap {name}: {}", std::io::Error::last_os_error()));
        }
        Ok(f)
    }

    /// Binds a vsock device's host socket as Firecracker does, which fails where one exists.
    fn bind_vsock(cfg: &Value, uds_path: &Value) -> Result<(Value, UnixListener), String> {
        let path = uds_path.as_str().unwrap_or("");
        let l = UnixListener::bind(path).map_err(|e| format!("vsock: cannot bind {path}: {e}"))?;
        let mut cfg = cfg.clone();
        cfg["uds_path"] = uds_path.clone();
        Ok((cfg, l))
    }

    /// Opens a drive's file as Firecracker does: relative to the working directory, writable
    /// unless read-only.
    fn open_drive(d: &Value) -> std::io::Result<std::fs::File> {
        let ro = d["is_read_only"].as_bool().unwrap_or(false);
        std::fs::OpenOptions::new().read(true).write(!ro).open(d["path_on_host"].as_str().unwrap_or(""))
    }

    impl Vm {
        fn mem(&self) -> &[u8] {
            self.loaded.as_ref().map_or(&self.own[..], |l| l.region(0))
        }
        fn mem_mut(&mut self) -> &mut [u8] {
            match &mut self.loaded {
                Some(l) => l.region_mut(0),
                None => &mut self.own[..],
            }
        }
    }

    fn reply(s: &mut UnixStream, status: u16, body: Option<Value>) {
        let b = body.map(|v| v.to_string()).unwrap_or_default();
        let reason = if status < 300 { "OK" } else { "Bad Request" };
        let _ = write!(
            s,
            "HTTP/1.1 {status} {reason}\r\nServer: Firecracker API\r\nContent-Length: {}\r\n{}\r\n{b}",
            b.len(),
            if b.is_empty() { "" } else { "Content-Type: application/json\r\n" }
        );
    }

    fn fault(s: &mut UnixStream, msg: &str) {
        reply(s, 400, Some(json!({"fault_message": msg})));
    }

    pub fn serve(sock: &Path) {
        let _ = std::fs::remove_file(sock);
        let listener = UnixListener::bind(sock).unwrap();
        // Jailed: the rest happens inside a chroot, as under Firecracker's jailer.
        if let Ok(root) = std::env::var("FAKE_FC_CHROOT") {
            std::os::unix::fs::chroot(&root).unwrap();
            std::env::set_current_dir("/").unwrap();
        }
        let mut vm = Vm {
            own: vec![0; PAGES * PAGE],
            dirty: BTreeSet::new(),
            state: "Not started",
            fail_next_create: false,
            die_in_next_create: false,
            hang_in_next_create: false,
            short_next_create: false,
            loaded: None,
            drives: vec![],
            drives_config: vec![],
            vsock: None,
            net: vec![],
        };
        // Drives configured before boot (`PUT /drives/{id}`), as a JSON list of their bodies.
        if let Ok(list) = std::env::var("FAKE_FC_DRIVES") {
            let list: Vec<Value> = serde_json::from_str(&list).unwrap();
            vm.drives = list.iter().map(|d| (d.clone(), open_drive(d).unwrap())).collect();
            vm.drives_config = list;
        }
        if let Ok(list) = std::env::var("FAKE_FC_NET") {
            let list: Vec<Value> = serde_json::from_str(&list).unwrap();
            vm.net = list.iter().map(|n| (n.clone(), open_tap(n).unwrap())).collect();
        }
        if let Ok(v) = std::env::var("FAKE_FC_VSOCK") {
            let cfg: Value = serde_json::from_str(&v).unwrap();
            vm.vsock = Some(bind_vsock(&cfg, &cfg["uds_path"]).unwrap());
        }
        if std::env::var("FAKE_FC_SEED").is_ok() {
            for (i, page) in vm.own.chunks_mut(PAGE).enumerate() {
                page.fill((i * 7 % 251) as u8 + 1);
            }
            vm.state = "Running";
        }
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut r = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            if r.read_line(&mut line).is_err() {
                continue;
            }
            let mut it = line.split_whitespace();
            let (method, path) = (it.next().unwrap_or("").to_string(), it.next().unwrap_or("").to_string());
            let mut len = 0;
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                    break;
                }
                if let Some((k, v)) = h.split_once(':')
                    && k.eq_ignore_ascii_case("content-length")
                {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; len];
            let _ = r.read_exact(&mut body);
            let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            handle(&mut vm, &mut conn, &method, &path, &body);
        }
    }

    fn handle(vm: &mut Vm, s: &mut UnixStream, method: &str, path: &str, body: &Value) {
        match (method, path) {
            ("GET", "/") => reply(
                s,
                200,
                Some(json!({"id": "fake-fc", "state": vm.state,
                "vmm_version": "1.7.0", "app_name": "Firecracker"})),
            ),
            ("PATCH", "/vm") => match body["state"].as_str() {
                Some("Paused") if vm.state == "Running" => {
                    vm.state = "Paused";
                    reply(s, 204, None)
                }
                Some("Resumed") if vm.state == "Paused" => {
                    vm.state = "Running";
                    reply(s, 204, None)
                }
                other => fault(s, &format!("cannot change state to {other:?} from {}", vm.state)),
            },
            ("PUT", "/snapshot/create") => {
                if vm.state != "Paused" {
                    return fault(s, "Create snapshot error: the microVM is not paused");
                }
                if std::mem::take(&mut vm.fail_next_create) {
                    return fault(s, "Create snapshot error: injected failure");
                }
                let (Some(st), Some(mp)) = (body["snapshot_path"].as_str(), body["mem_file_path"].as_str()) else {
                    return fault(s, "missing snapshot_path or mem_file_path");
                };
                if vm.hang_in_next_create {
                    // The VMM hangs inside its write of the memory file: the guest memory it
                    // copies from faults, and nothing serves that userfaultfd (as with a
                    // Firecracker whose page server froze). The write holds the file meanwhile.
                    let spec = snapfork_lazy_restore::client::RegionSpec {
                        size: vm.own.len() as u64,
                        offset: 0,
                        page_size: PAGE as u64,
                    };
                    let unserved = snapfork_lazy_restore::client::FakeVm::new(&[spec]).unwrap();
                    std::fs::write(st, b"{}").unwrap();
                    let _ = std::fs::write(mp, unserved.region(0));
                    unreachable!("a write from memory nobody serves returned");
                }
                if vm.die_in_next_create {
                    // The VMM crashes half way through writing its memory file.
                    std::fs::write(mp, &vm.mem()[..vm.mem().len() / 2]).unwrap();
                    std::process::exit(137);
                }
                let drives: Vec<&Value> = vm.drives.iter().map(|(d, _)| d).collect();
                let vsock = vm.vsock.as_ref().map(|(v, _)| v);
                let net: Vec<&Value> = vm.net.iter().map(|(n, _)| n).collect();
                let vmstate = json!({"regions": [{"size": vm.mem().len(), "offset": 0}], "page_size": PAGE,
                    "drives": drives, "vsock": vsock, "network-interfaces": net});
                std::fs::write(st, vmstate.to_string()).unwrap();
                let mut f = std::fs::File::create(mp).unwrap();
                match body["snapshot_type"].as_str().unwrap_or("Full") {
                    "Full" => f.write_all(vm.mem()).unwrap(),
                    "Diff" => {
                        // Sparse: only dirty pages at their offsets, holes elsewhere.
                        f.set_len(vm.mem().len() as u64).unwrap();
                        for &p in &vm.dirty {
                            use std::os::unix::fs::FileExt;
                            f.write_all_at(&vm.mem()[p * PAGE..(p + 1) * PAGE], (p * PAGE) as u64).unwrap();
                        }
                    }
                    t => return fault(s, &format!("bad snapshot_type {t}")),
                }
                if std::mem::take(&mut vm.short_next_create) {
                    // Answers success with a memory file the store must refuse (a page short):
                    // the dirty log is cleared all the same, as Firecracker's is.
                    f.set_len((vm.mem().len() - PAGE) as u64).unwrap();
                }
                vm.dirty.clear();
                reply(s, 204, None)
            }
            ("PUT", "/snapshot/load") => {
                if vm.state != "Not started" {
                    return fault(
                        s,
                        "Loading a microVM snapshot not allowed after configuring boot-specific resources.",
                    );
                }
                if body["mem_backend"]["backend_type"] != "Uffd" {
                    return fault(s, "this stand-in only does the Uffd backend");
                }
                let st: Value =
                    serde_json::from_slice(&std::fs::read(body["snapshot_path"].as_str().unwrap()).unwrap()).unwrap();
                // Each drive reopened by the path the vmstate names, as Firecracker does.
                let mut drives = vec![];
                for d in st["drives"].as_array().into_iter().flatten() {
                    match open_drive(d) {
                        Ok(f) => drives.push((d.clone(), f)),
                        Err(e) => {
                            return fault(
                                s,
                                &format!("Load snapshot error: cannot open block device {}: {e}", d["path_on_host"]),
                            );
                        }
                    }
                }
                // Each interface's tap, opened by name.
                let mut net = vec![];
                for n in st["network-interfaces"].as_array().into_iter().flatten() {
                    match open_tap(n) {
                        Ok(f) => net.push((n.clone(), f)),
                        Err(e) => return fault(s, &format!("Load snapshot error: {e}")),
                    }
                }
                vm.net = net;
                // The vsock device binds its socket anew: the vmstate's, or the override.
                if st["vsock"].is_object() {
                    let uds = match &body["vsock_override"] {
                        Value::Null => &st["vsock"]["uds_path"],
                        o => &o["uds_path"],
                    };
                    match bind_vsock(&st["vsock"], uds) {
                        Ok(v) => vm.vsock = Some(v),
                        Err(e) => return fault(s, &format!("Load snapshot error: {e}")),
                    }
                }
                vm.drives_config = drives.iter().map(|(d, _)| d.clone()).collect();
                vm.drives = drives;
                let size = st["regions"][0]["size"].as_u64().unwrap();
                let spec = snapfork_lazy_restore::client::RegionSpec { size, offset: 0, page_size: PAGE as u64 };
                let mut fvm = snapfork_lazy_restore::client::FakeVm::new(&[spec]).unwrap();
                let sock = PathBuf::from(body["mem_backend"]["backend_path"].as_str().unwrap());
                fvm.connect(&sock, snapfork_lazy_restore::client::Shape::V1_12, &[]).unwrap();
                // The guest resumes and reads half its memory, served by snapfork's UFFD server
                // from the store; the rest faults in when touched. Backwards, page by page: a
                // forward stream would have the server's read-ahead install the other half too.
                let half = &fvm.region(0)[..size as usize / 2];
                std::hint::black_box(half.chunks(PAGE).rev().map(|p| p[0] as u64).sum::<u64>());
                vm.loaded = Some(fvm);
                vm.state = if body["resume_vm"].as_bool() == Some(true) { "Running" } else { "Paused" };
                reply(s, 204, None)
            }
            ("GET", "/vm/config") => {
                let vsock = vm.vsock.as_ref().map(|(v, _)| v);
                let net: Vec<&Value> = vm.net.iter().map(|(n, _)| n).collect();
                reply(s, 200, Some(json!({"drives": vm.drives_config, "vsock": vsock, "network-interfaces": net})))
            }
            ("PATCH", p) if p.starts_with("/drives/") => {
                if vm.state == "Not started" {
                    return fault(s, "The requested operation is not supported before starting the microVM.");
                }
                if vm.state == "Running" {
                    // Firecracker allows it; the engine must never need it (the guest would have
                    // run on another VM's disk until then).
                    return fault(s, "stand-in: a drive patched while the guest runs");
                }
                let id = &p["/drives/".len()..];
                if body["drive_id"] != id {
                    return fault(s, "The id from the path does not match the id from the body!");
                }
                let Some(drive) = vm.drives.iter_mut().find(|(d, _)| d["drive_id"] == id) else {
                    return fault(s, "Invalid block device ID!");
                };
                let mut new = drive.0.clone();
                new["path_on_host"] = body["path_on_host"].clone();
                match open_drive(&new) {
                    Ok(f) => *drive = (new.clone(), f),
                    Err(e) => return fault(s, &format!("Unable to patch the block device: {e}")),
                }
                // What `GET /vm/config` reports follows the device.
                for d in vm.drives_config.iter_mut().filter(|d| d["drive_id"] == id) {
                    *d = new.clone();
                }
                reply(s, 204, None)
            }
            ("PUT", "/fake/disk-write") => {
                // The guest writes a block of its disk.
                use std::os::unix::fs::FileExt;
                let Some((_, f)) = vm.drives.iter().find(|(d, _)| d["drive_id"] == body["drive"]) else {
                    return fault(s, "no such drive");
                };
                let block = vec![body["byte"].as_u64().unwrap() as u8; PAGE];
                match f.write_all_at(&block, body["block"].as_u64().unwrap() * PAGE as u64) {
                    Ok(()) => reply(s, 204, None),
                    Err(e) => fault(s, &format!("write: {e}")),
                }
            }
            ("GET", "/fake/net") => {
                // The network namespace it runs in, and the taps it has open there.
                let ns = std::fs::read_link("/proc/self/ns/net").unwrap();
                let taps: Vec<&Value> = vm.net.iter().map(|(n, _)| &n["host_dev_name"]).collect();
                reply(s, 200, Some(json!({"netns": ns, "taps": taps})))
            }
            ("GET", "/fake/disks") => {
                // Each drive: the file it really has open, and what that file holds.
                use std::os::fd::AsRawFd;
                let mut out = serde_json::Map::new();
                for (d, f) in &vm.drives {
                    let path = std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd())).unwrap();
                    let bytes = std::fs::read(format!("/proc/self/fd/{}", f.as_raw_fd())).unwrap();
                    out.insert(
                        d["drive_id"].as_str().unwrap().into(),
                        json!({"path": path, "blake3": blake3::hash(&bytes).to_hex().to_string()}),
                    );
                }
                reply(s, 200, Some(Value::Object(out)))
            }
            ("PUT", "/fake/write") => {
                let p = body["page"].as_u64().unwrap() as usize;
                vm.mem_mut()[p * PAGE..(p + 1) * PAGE].fill(body["byte"].as_u64().unwrap() as u8);
                vm.dirty.insert(p);
                reply(s, 204, None)
            }
            ("PUT", "/fake/discard") => {
                let p = body["page"].as_u64().unwrap() as usize;
                let Some(l) = &vm.loaded else { return fault(s, "no snapshot loaded") };
                // SAFETY: one page inside the registered mapping, page aligned.
                let r = unsafe { libc::madvise(l.regions[0].ptr.add(p * PAGE).cast(), PAGE, libc::MADV_DONTNEED) };
                assert_eq!(r, 0, "madvise: {}", std::io::Error::last_os_error());
                reply(s, 204, None)
            }
            ("PUT", "/fake/fail-next-create") => {
                vm.fail_next_create = true;
                reply(s, 204, None)
            }
            ("PUT", "/fake/short-next-create") => {
                vm.short_next_create = true;
                reply(s, 204, None)
            }
            ("PUT", "/fake/hang-in-next-create") => {
                vm.hang_in_next_create = true;
                reply(s, 204, None)
            }
            ("PUT", "/fake/die-in-next-create") => {
                vm.die_in_next_create = true;
                reply(s, 204, None)
            }
            ("GET", "/fake/memory") => {
                let firsts: Vec<u8> = vm.mem().chunks(PAGE).map(|p| p[0]).collect();
                reply(s, 200, Some(json!({"blake3": blake3::hash(vm.mem()).to_hex().to_string(), "firsts": firsts})))
            }
            _ => fault(s, &format!("no route {method} {path}")),
        }
    }
}

fn memory(api: &Path) -> Value {
    let r = ApiClient::new(api).call("GET", "/fake/memory", None).unwrap();
    serde_json::from_str(&r.body).unwrap()
}

fn state(api: &Path) -> String {
    ApiClient::new(api).instance_info().unwrap()["state"].as_str().unwrap().to_string()
}

/// The store's refs but the working sets a restored VM's server records as it sees fit (in the
/// background, once the VM is gone): what a failed checkpoint must leave as it was.
fn snapshot_refs(engine: &snapfork_engine::Engine) -> Vec<(String, snapfork_store::Hash)> {
    let refs = engine.store().list_refs("").unwrap();
    refs.into_iter().filter(|(name, _)| !(name.starts_with("attached/") && name.contains("/working-set"))).collect()
}

fn api_of(dir: &Path, name: &str) -> PathBuf {
    let rec: Value =
        serde_json::from_slice(&std::fs::read(dir.join("engine/sandboxes").join(name).join("sandbox.json")).unwrap())
            .unwrap();
    PathBuf::from(rec["config"]["api_socket"].as_str().unwrap())
}

async fn firecracker_checkpoint_diff_restore_fork_via_uffd() {
    if !common::require(TEST, false) {
        return;
    }
    // UFFD servers stop after 2 s without a VM (300 s by default), so that the test sees it.
    let dir = tempfile::Builder::new().prefix("sf-engine-").tempdir_in("/var/tmp").unwrap();
    let store = snapfork_store::Store::open(dir.path().join("store"), Default::default()).unwrap();
    let opts = snapfork_engine::EngineOptions {
        state_dir: dir.path().join("engine"),
        uffd_idle: Duration::from_secs(2),
        ..snapfork_engine::EngineOptions::for_store(&store)
    };
    let engine = snapfork_engine::Engine::open(store, opts).unwrap();
    let _guard = common::Guard(engine.clone());
    let me = std::env::current_exe().unwrap();
    let api = dir.path().join("vm.sock");
    let _vm = KillOnDrop(
        std::process::Command::new(&me).arg("--api-sock").arg(&api).env("FAKE_FC_SEED", "1").spawn().unwrap(),
    );
    wait_for_api(&api, Duration::from_secs(10)).unwrap();
    let ws = dir.path().join("ws");
    std::fs::create_dir_all(&ws).unwrap();
    std::fs::write(ws.join("task.txt"), "step 1").unwrap();
    let cfg = FirecrackerConfig {
        api_socket: api.clone(),
        binary: Some(me.clone()),
        devices: None,
        page_size: PAGE as u32,
        diff: true,
        pid: None,
        pid_start_time: None,
    };
    engine
        .run(RunSpec { name: "vm".into(), driver: DriverConfig::Firecracker(cfg), workspace: Some(ws.clone()) })
        .await
        .unwrap();

    // A: a Full snapshot; the VM runs on.
    let at_a = memory(&api);
    let a = engine.checkpoint("vm", CheckpointOptions { leave_running: true, ..Default::default() }).await.unwrap();
    assert_eq!(state(&api), "Running");
    assert!(a.timings.steps.iter().any(|(s, _)| s == "snapshot/create Full"), "{:?}", a.timings);

    // The guest dirties two pages; B is a Diff snapshot ingested onto A's image.
    for (page, byte) in [(3, 0xAA), (10, 0xBB)] {
        ApiClient::new(&api).call("PUT", "/fake/write", Some(&json!({"page": page, "byte": byte}))).unwrap();
    }
    std::fs::write(ws.join("task.txt"), "step 2").unwrap();
    let at_b = memory(&api);
    let b = engine.checkpoint("vm", CheckpointOptions { leave_running: true, ..Default::default() }).await.unwrap();
    assert!(b.timings.steps.iter().any(|(s, _)| s == "snapshot/create Diff"), "{:?}", b.timings);
    let d = engine.diff(&a.id, &b.id).await.unwrap();
    let mem = d.parts.iter().find(|p| p.name == "mem").unwrap();
    assert_eq!((mem.units_changed, mem.units_total), (2, PAGES as u64), "{d:?}");
    assert!(d.files.iter().any(|f| f.path == "task.txt"));

    // A Diff snapshot/create that succeeds but whose checkpoint then fails has still cleared
    // the VM's dirty log: the next snapshot is Full, so the pages dirtied before it are kept.
    ApiClient::new(&api).call("PUT", "/fake/write", Some(&json!({"page": 5, "byte": 0xCC}))).unwrap();
    ApiClient::new(&api).call("PUT", "/fake/short-next-create", None).unwrap();
    let refs = snapshot_refs(&engine);
    let err =
        engine.checkpoint("vm", CheckpointOptions { leave_running: true, ..Default::default() }).await.unwrap_err();
    eprintln!("checkpoint of a short memory file: {err}");
    assert_eq!(snapshot_refs(&engine), refs);
    assert_eq!(state(&api), "Running");
    let at_c = memory(&api);
    let c = engine.checkpoint("vm", CheckpointOptions { leave_running: true, ..Default::default() }).await.unwrap();
    assert!(c.timings.steps.iter().any(|(s, _)| s == "snapshot/create Full"), "{:?}", c.timings);
    engine.restore(&c.id, "vm-c").await.unwrap();
    assert_eq!(memory(&api_of(dir.path(), "vm-c"))["blake3"], at_c["blake3"], "C holds page 5's write");
    engine.rm("vm-c").await.unwrap();
    let d = engine.checkpoint("vm", CheckpointOptions { leave_running: true, ..Default::default() }).await.unwrap();
    assert!(d.timings.steps.iter().any(|(s, _)| s == "snapshot/create Diff"), "after a Full, Diffs again");

    // A failing snapshot/create leaves no snapshot and the VM running.
    ApiClient::new(&api).call("PUT", "/fake/fail-next-create", None).unwrap();
    let refs = snapshot_refs(&engine);
    assert!(engine.checkpoint("vm", CheckpointOptions::default()).await.is_err());
    assert_eq!(snapshot_refs(&engine), refs);
    assert_eq!(state(&api), "Running");

    // Restore B: a new Firecracker process loads it; its memory comes from the UFFD server.
    let r = engine.restore(&b.id, "vm-b").await.unwrap();
    let rapi = api_of(dir.path(), "vm-b");
    assert_eq!(memory(&rapi)["blake3"], at_b["blake3"]);
    assert_eq!(state(&rapi), "Running");
    let ws_b = r.workspace.clone().unwrap();
    assert_eq!(std::fs::read_to_string(ws_b.join("task.txt")).unwrap(), "step 2");
    // Its server keeps a journal for a successor, but this process serves it: nothing to adopt.
    assert_eq!(std::fs::read_dir(dir.path().join("engine/vm-journals")).unwrap().count(), 1);
    let adopted = engine.adopt_vms().await.unwrap();
    assert!(adopted.is_empty(), "adopted a VM this process serves: {adopted:?}");

    // Fork A twice: both get A's memory (one server serves both), each in its own process.
    let forks = engine.fork(&a.id, 2, Some("vm-a")).await.unwrap();
    for f in &forks {
        let fapi = api_of(dir.path(), &f.name);
        assert_eq!(memory(&fapi)["blake3"], at_a["blake3"], "{}", f.name);
    }
    assert_ne!(at_a["blake3"], at_b["blake3"]);

    // A revert that fails (its workspace cannot be swapped: immutable) leaves the VM running
    // as it was, not paused.
    let chattr = |flag: &str| {
        let st = std::process::Command::new("chattr").arg(flag).arg(&ws_b).status().unwrap();
        assert!(st.success(), "chattr {flag}");
    };
    chattr("+i");
    let err = engine.revert("vm-b", &a.id).await;
    chattr("-i");
    eprintln!("revert with an immutable workspace: {}", err.unwrap_err());
    assert_eq!(state(&rapi), "Running");
    assert_eq!(memory(&rapi)["blake3"], at_b["blake3"]);

    // A revert whose new VM does not start (its binary exits at once) is undone after its
    // workspace was swapped: the tree, fsfork's record of it and the VM are as they were.
    let rec_path = dir.path().join("engine/sandboxes/vm-b/sandbox.json");
    let good = std::fs::read(&rec_path).unwrap();
    let mut rec: Value = serde_json::from_slice(&good).unwrap();
    rec["config"]["binary"] = json!("/bin/false");
    std::fs::write(&rec_path, serde_json::to_vec(&rec).unwrap()).unwrap();
    let ws_record = || {
        let r = snapfork_fsfork::workspace::workspace_record(engine.store(), &ws_b).unwrap();
        (r.head, r.events.len())
    };
    let ws_before = ws_record();
    let err = engine.revert("vm-b", &a.id).await.unwrap_err();
    eprintln!("revert with a VMM that exits at once: {err}");
    std::fs::write(&rec_path, &good).unwrap();
    assert_eq!(std::fs::read_to_string(ws_b.join("task.txt")).unwrap(), "step 2");
    assert_eq!(ws_record(), ws_before, "fsfork's record still tells of the revert");
    assert_eq!(state(&rapi), "Running");
    assert_eq!(memory(&rapi)["blake3"], at_b["blake3"]);

    // Revert the restored VM to A: a new process with A's memory replaces it.
    engine.revert("vm-b", &a.id).await.unwrap();
    let rapi2 = api_of(dir.path(), "vm-b");
    assert_ne!(rapi2, rapi);
    assert_eq!(memory(&rapi2)["blake3"], at_a["blake3"]);
    // Loaded paused, it was resumed once its predecessor was gone.
    assert_eq!(state(&rapi2), "Running");
    // The replaced VM is gone, and with it its directory (vmstate, disk copies, socket).
    let old_dir = rapi.parent().unwrap();
    assert!(old_dir.starts_with(dir.path().join("engine/sandboxes/vm-b")), "{}", old_dir.display());
    assert!(!old_dir.exists(), "the replaced VM's files stay: {}", old_dir.display());

    // The VMM dies half way through its snapshot: no snapshot, nothing left in the engine's
    // tmp, the store sound, the sandbox reported exited; its last snapshot still restores.
    ApiClient::new(&rapi2).call("PUT", "/fake/die-in-next-create", None).unwrap();
    // (Working sets are stored in the background as restores end: only snapshot refs count.)
    let snapshot_refs = || {
        let refs = engine.store().list_refs("").unwrap();
        refs.into_iter().filter(|(n, _)| !n.starts_with("attached/")).collect::<Vec<_>>()
    };
    let refs = snapshot_refs();
    let err = engine.checkpoint("vm-b", CheckpointOptions::default()).await.unwrap_err();
    eprintln!("checkpoint with the VMM dying: {err}");
    assert_eq!(snapshot_refs(), refs);
    // A failed checkpoint removes its scratch directory in the background (the VMM may still
    // be writing into it): give that a moment.
    let tmp_left =
        || std::fs::read_dir(dir.path().join("engine/tmp")).unwrap().flatten().map(|e| e.path()).collect::<Vec<_>>();
    let waited = std::time::Instant::now();
    while !tmp_left().is_empty() && waited.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(tmp_left().is_empty(), "left in the engine's tmp: {:?}", tmp_left());
    assert!(engine.store().verify(None, None).unwrap().is_ok());
    let vm_b = engine.ls().await.unwrap().into_iter().find(|s| s.name == "vm-b").unwrap();
    assert_eq!(vm_b.status, snapfork_engine::Status::Exited, "{vm_b:?}");
    engine.restore(&a.id, "vm-b2").await.unwrap();
    assert_eq!(memory(&api_of(dir.path(), "vm-b2"))["blake3"], at_a["blake3"]);

    // The pid a record names has since been given to another process (the VMM died, the pid
    // was recycled): that process is not the VM. `ls` reports the VM exited, `rm` spares it.
    let rec_path = dir.path().join("engine/sandboxes/vm-b2/sandbox.json");
    let mut rec: Value = serde_json::from_slice(&std::fs::read(&rec_path).unwrap()).unwrap();
    let vmm = rec["config"]["pid"].as_i64().unwrap() as i32;
    assert!(rec["config"]["pid_start_time"].is_u64(), "{rec}");
    // (Start times tick at 100 Hz: the other process starts in a later tick, as a process that
    // recycles a pid does.)
    std::thread::sleep(Duration::from_millis(30));
    let mut other = KillOnDrop(std::process::Command::new("sleep").arg("600").spawn().unwrap());
    rec["config"]["pid"] = json!(other.0.id());
    std::fs::write(&rec_path, serde_json::to_vec(&rec).unwrap()).unwrap();
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(vmm), nix::sys::signal::Signal::SIGKILL);
    let vm_b2 = engine.ls().await.unwrap().into_iter().find(|s| s.name == "vm-b2").unwrap();
    assert_eq!(vm_b2.status, snapfork_engine::Status::Exited, "{vm_b2:?}");
    engine.rm("vm-b2").await.unwrap();
    assert!(other.0.try_wait().unwrap().is_none(), "rm killed a process that is not the VM's");

    // The VM the test started and handed over with `run`: `stop` ends its process, found by
    // the API socket's peer credentials (the engine never knew its pid).
    let mut vmm = _vm;
    engine.stop("vm").await.unwrap();
    let t = std::time::Instant::now();
    while vmm.0.try_wait().unwrap().is_none() {
        assert!(t.elapsed() < Duration::from_secs(5), "stop left the handed-over VMM running");
        std::thread::sleep(Duration::from_millis(20));
    }

    for s in engine.ls().await.unwrap() {
        engine.rm(&s.name).await.unwrap();
    }
    // The VMs are gone: the first restore of each memory image recorded its working set, and
    // the image's server stored it with its pages, for the next restore to prefetch.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let stored = loop {
        let refs: Vec<String> = engine.store().list_refs("attached/").unwrap().into_iter().map(|(n, _)| n).collect();
        if refs.iter().filter(|n| n.ends_with("/working-set-pages")).count() == 3
            || std::time::Instant::now() > deadline
        {
            break refs;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // (Three memory images were restored: A's, B's and C's.)
    assert_eq!(stored.iter().filter(|n| n.ends_with("/working-set")).count(), 3, "{stored:?}");
    assert_eq!(stored.iter().filter(|n| n.ends_with("/working-set-pages")).count(), 3, "{stored:?}");

    // With no VM left, the servers stop (freeing their page caches) once idle; the next restore
    // starts a new one, which serves the same memory.
    let sockets = || std::fs::read_dir(dir.path().join("engine/uffd")).unwrap().count();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while sockets() > 0 {
        assert!(std::time::Instant::now() < deadline, "{} idle UFFD servers still up", sockets());
        std::thread::sleep(Duration::from_millis(100));
    }
    engine.restore(&a.id, "vm-again").await.unwrap();
    assert_eq!(memory(&api_of(dir.path(), "vm-again"))["blake3"], at_a["blake3"]);
    assert_eq!(sockets(), 1);
    engine.rm("vm-again").await.unwrap();

    // Exported and imported into another store: its VM state names host files (the disks),
    // so it restores only where its source is trusted, and then with the local binary.
    let bundle = dir.path().join("a.sfb");
    engine.export(&a.id, &bundle).await.unwrap();
    let elsewhere = |sub: &str, trust: bool| {
        let d = dir.path().join(sub);
        let store = snapfork_store::Store::open(d.join("store"), Default::default()).unwrap();
        let opts = snapfork_engine::EngineOptions {
            state_dir: d.join("engine"),
            trust_imported_vm_state: trust,
            ..snapfork_engine::EngineOptions::for_store(&store)
        };
        snapfork_engine::Engine::open(store, opts).unwrap()
    };
    let wary = elsewhere("wary", false);
    let _g2 = common::Guard(wary.clone());
    wary.import(&bundle).await.unwrap();
    let err = wary.restore(&a.id, "vm-imported").await.unwrap_err().to_string();
    assert!(err.contains("came by import") && err.contains("--trust-imported-vm-state"), "{err}");
    assert!(wary.ls().await.unwrap().is_empty());
    let trusting = elsewhere("trusting", true);
    let _g3 = common::Guard(trusting.clone());
    trusting.import(&bundle).await.unwrap();
    trusting.restore(&a.id, "vm-imported").await.unwrap();
    assert_eq!(memory(&api_of(&dir.path().join("trusting"), "vm-imported"))["blake3"], at_a["blake3"]);
    trusting.rm("vm-imported").await.unwrap();
}

/// A stand-in VM's drives: for each, the file it really has open and that file's blake3.
fn disks(api: &Path) -> Value {
    serde_json::from_str(&ApiClient::new(api).call("GET", "/fake/disks", None).unwrap().body).unwrap()
}

/// The guest of the VM at `api` writes `byte` over block `block` of drive `drive`.
fn disk_write(api: &Path, drive: &str, block: u64, byte: u8) {
    let body = json!({"drive": drive, "block": block, "byte": byte});
    let r = ApiClient::new(api).call("PUT", "/fake/disk-write", Some(&body)).unwrap();
    assert_eq!(r.status, 204, "{}", r.body);
}

/// A stand-in VM's network namespace and the taps it holds open there.
fn net(api: &Path) -> Value {
    serde_json::from_str(&ApiClient::new(api).call("GET", "/fake/net", None).unwrap().body).unwrap()
}

/// The process listening on the Unix socket at `path`.
fn listener_pid(path: &Path) -> i32 {
    let s = UnixStream::connect(path).unwrap_or_else(|e| panic!("connect {}: {e}", path.display()));
    nix::sys::socket::getsockopt(&s, nix::sys::socket::sockopt::PeerCredentials).unwrap().pid()
}

/// The pid of sandbox `name`'s VMM, from its record.
fn vmm_pid(dir: &Path, name: &str) -> i32 {
    let rec: Value =
        serde_json::from_slice(&std::fs::read(dir.join("engine/sandboxes").join(name).join("sandbox.json")).unwrap())
            .unwrap();
    rec["config"]["pid"].as_i64().unwrap() as i32
}

/// Forks of one snapshot write disks of their own, never the original's or each other's:
/// drives named absolutely and relatively (to the VMM's working directory), writable (stored
/// with the snapshot, copied for each restore) and read-only (shared). Each has its own vsock
/// socket too (Firecracker binds it anew on load), and its own tap of the original's name in a
/// network namespace of its own (a load opens the tap by name, and the original holds it). A
/// snapshot of a restored VM restores with nothing outside the engine's directory but its
/// read-only drives' shared files.
async fn firecracker_forks_get_their_own_disks_and_sockets() {
    if !common::require(TEST_DRIVES, false) {
        return;
    }
    let dir = tempfile::Builder::new().prefix("sf-engine-").tempdir_in("/var/tmp").unwrap();
    let engine = engine_at(dir.path());
    let _guard = common::Guard(engine.clone());
    let vm_cwd = dir.path().join("vm");
    std::fs::create_dir_all(&vm_cwd).unwrap();
    let (rootfs, base) = (dir.path().join("rootfs.ext4"), dir.path().join("base.img"));
    std::fs::write(&rootfs, vec![5u8; 8 * PAGE]).unwrap();
    std::fs::write(vm_cwd.join("data.img"), vec![6u8; 4 * PAGE]).unwrap();
    std::fs::write(&base, vec![7u8; 4 * PAGE]).unwrap();
    std::fs::write(vm_cwd.join("tools.img"), vec![8u8; 2 * PAGE]).unwrap();
    let drives = json!([
        {"drive_id": "rootfs", "path_on_host": rootfs, "is_root_device": true, "is_read_only": false},
        {"drive_id": "data", "path_on_host": "data.img", "is_root_device": false, "is_read_only": false},
        {"drive_id": "base", "path_on_host": base, "is_root_device": false, "is_read_only": true},
        {"drive_id": "tools", "path_on_host": "tools.img", "is_root_device": false, "is_read_only": true},
    ]);
    let api = dir.path().join("vm.sock");
    // A tap of the host's (gone with the stand-in that holds it, which is not persistent).
    let tap = format!("sft{}", std::process::id() % 100_000);
    let vm = seeded_stand_in(
        &api,
        &vm_cwd,
        &[
            ("FAKE_FC_DRIVES", drives.to_string()),
            ("FAKE_FC_VSOCK", json!({"guest_cid": 3, "uds_path": dir.path().join("vm-vsock.sock")}).to_string()),
            ("FAKE_FC_NET", json!([{"iface_id": "eth0", "host_dev_name": tap}]).to_string()),
        ],
    );
    // Devices are the engine's own record, never a caller's word (a read-only drive's recorded
    // file is what restores link to).
    let mut told = stand_in_vm(&api);
    if let DriverConfig::Firecracker(c) = &mut told.driver {
        c.devices = Some(Default::default());
    }
    let err = engine.run(told).await.unwrap_err().to_string();
    assert!(err.contains("engine's own record"), "{err}");
    engine.run(stand_in_vm(&api)).await.unwrap();
    let at_a = disks(&api);
    let a = engine.checkpoint("vm", CheckpointOptions { leave_running: true, ..Default::default() }).await.unwrap();
    let disks_of = |snap: &snapfork_engine::Snapshot| -> BTreeSet<String> {
        let disk = snapfork_engine::model::Role::Disk;
        snap.body.parts.iter().filter(|p| p.role == disk).map(|p| p.name.clone()).collect()
    };
    let stored = disks_of(&engine.show(&a.id).await.unwrap());
    assert_eq!(stored, BTreeSet::from(["data".to_string(), "rootfs".to_string()]), "read-only drives are shared");
    // The original VM goes on writing its disk after A.
    disk_write(&api, "rootfs", 0, 0x11);
    let original = disks(&api);
    assert_ne!(original["rootfs"]["blake3"], at_a["rootfs"]["blake3"]);

    // Two forks of A: each has A's disks, in files of its own; read-only drives are shared.
    let forks = engine.fork(&a.id, 2, Some("f")).await.unwrap();
    let fork_apis: Vec<PathBuf> = forks.iter().map(|f| api_of(dir.path(), &f.name)).collect();
    for (f, fapi) in forks.iter().zip(&fork_apis) {
        let d = disks(fapi);
        let own = dir.path().join("engine/sandboxes").join(&f.name);
        for id in ["rootfs", "data"] {
            assert_eq!(d[id]["blake3"], at_a[id]["blake3"], "{}: drive {id} is not A's", f.name);
            let path = PathBuf::from(d[id]["path"].as_str().unwrap());
            assert!(path.starts_with(&own), "{}: drive {id} is {}, not its own", f.name, path.display());
        }
        assert_eq!(d["base"]["path"], json!(base));
        assert_eq!(d["tools"]["path"], json!(vm_cwd.join("tools.img")));
        // Its vsock socket, in its own directory, answered by its own VMM.
        assert_eq!(f.api_socket.as_ref(), Some(fapi));
        let vsock = f.vsock.clone().unwrap_or_else(|| panic!("{}: no vsock socket in {f:?}", f.name));
        assert!(vsock.starts_with(&own), "{}: vsock socket {}", f.name, vsock.display());
        assert_eq!(listener_pid(&vsock), vmm_pid(dir.path(), &f.name), "{}", f.name);
        // In a process group of its own: a Ctrl-C to the engine's does not end the VM.
        let group = nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(vmm_pid(dir.path(), &f.name)))).unwrap();
        assert_ne!(group, nix::unistd::getpgrp(), "{}", f.name);
        // Its tap, of the same name, in a network namespace of its own.
        let net = net(fapi);
        assert_eq!(net["taps"], json!([tap]), "{}", f.name);
        assert_ne!(net["netns"], json!(std::fs::read_link("/proc/self/ns/net").unwrap()), "{}", f.name);
        let netns = f.netns.clone().unwrap_or_else(|| panic!("{}: no netns in {f:?}", f.name));
        assert_eq!(json!(std::fs::read_link(&netns).unwrap()), net["netns"]);
    }
    assert_ne!(net(&fork_apis[0])["netns"], net(&fork_apis[1])["netns"], "the forks share a network namespace");
    // Their guests write their disks: each sees only its own writes; the original sees none.
    for (i, fapi) in fork_apis.iter().enumerate() {
        disk_write(fapi, "rootfs", 1, 0x20 + i as u8);
        disk_write(fapi, "data", 0, 0x30 + i as u8);
    }
    let (d0, d1) = (disks(&fork_apis[0]), disks(&fork_apis[1]));
    for id in ["rootfs", "data"] {
        assert_ne!(d0[id]["blake3"], d1[id]["blake3"], "the forks share drive {id}");
        assert_ne!(d0[id]["blake3"], at_a[id]["blake3"]);
    }
    assert_eq!(disks(&api), original, "a fork wrote the original VM's disks");

    // A revert to A (its rootfs named absolutely: loaded paused, patched, resumed once the old
    // VMM is gone) gives A's disks in new files, and a new socket and namespace that work.
    let back = engine.revert(&forks[1].name, &a.id).await.unwrap();
    let bapi = api_of(dir.path(), &back.name);
    let b = disks(&bapi);
    for id in ["rootfs", "data"] {
        assert_eq!(b[id]["blake3"], at_a[id]["blake3"], "drive {id} after the revert to A");
        assert_ne!(b[id]["path"], d1[id]["path"]);
    }
    assert_eq!(state(&bapi), "Running");
    assert_eq!(listener_pid(back.vsock.as_ref().unwrap()), vmm_pid(dir.path(), &back.name));
    assert_eq!(net(&bapi)["taps"], json!([tap]));
    assert_ne!(Some(back.vsock.clone().unwrap()), forks[1].vsock);

    // A snapshot of a fork names its drives relatively: once the original VM, its disk files
    // and the fork are gone, it still restores, with the fork's disks.
    let f0 = engine
        .checkpoint(&forks[0].name, CheckpointOptions { leave_running: true, ..Default::default() })
        .await
        .unwrap();
    engine.rm("vm").await.unwrap();
    drop(vm);
    engine.rm(&forks[0].name).await.unwrap();
    std::fs::remove_file(&rootfs).unwrap();
    std::fs::remove_file(vm_cwd.join("data.img")).unwrap();
    let f0_again = engine.restore(&f0.id, "f0-again").await.unwrap();
    assert_eq!(listener_pid(&f0_again.vsock.unwrap()), vmm_pid(dir.path(), "f0-again"));
    let again = disks(&api_of(dir.path(), "f0-again"));
    for id in ["rootfs", "data"] {
        assert_eq!(again[id]["blake3"], d0[id]["blake3"], "drive {id} of the fork's snapshot");
    }
    assert_eq!(again["tools"]["path"], json!(vm_cwd.join("tools.img")), "the shared read-only drive");
    // A itself names the original's rootfs, which Firecracker would open on load: refused,
    // saying why, with nothing left behind.
    let err = engine.restore(&a.id, "a-again").await.unwrap_err().to_string();
    assert!(err.contains("rootfs") && err.contains("gone"), "{err}");
    assert!(engine.ls().await.unwrap().iter().all(|s| s.name != "a-again"));
    assert!(!dir.path().join("engine/sandboxes/a-again").exists(), "the refused restore left files");

    // Revert: the other fork gets that snapshot's disks, in new files of its own.
    let reverted = engine.revert(&forks[1].name, &f0.id).await.unwrap();
    let rapi = api_of(dir.path(), &reverted.name);
    assert_ne!(rapi, bapi);
    let r = disks(&rapi);
    for id in ["rootfs", "data"] {
        assert_eq!(r[id]["blake3"], d0[id]["blake3"], "drive {id} after the revert");
        assert_ne!(r[id]["path"], d1[id]["path"]);
        assert_ne!(r[id]["path"], again[id]["path"]);
    }
    // A stopped VM's vsock socket is no longer shown: nothing listens on it.
    let stopped = engine.stop(&reverted.name).await.unwrap();
    assert_eq!(stopped.vsock, None, "{stopped:?}");
    let listed = engine.ls().await.unwrap().into_iter().find(|s| s.name == reverted.name).unwrap();
    assert_eq!((listed.status, listed.vsock), (Status::Stopped, None));
    for s in engine.ls().await.unwrap() {
        engine.rm(&s.name).await.unwrap();
    }
}

/// A snapshot as taken before devices were recorded (no `devices` in its config; its disks
/// named by file): its restore reopens the original disk, as its vmstate says, and the engine
/// asks that VMM for its devices at each checkpoint, so its disk is still stored.
async fn firecracker_vm_restored_from_a_snapshot_without_devices_still_stores_its_disks() {
    if !common::require(TEST_OLD, false) {
        return;
    }
    let dir = tempfile::Builder::new().prefix("sf-engine-").tempdir_in("/var/tmp").unwrap();
    let engine = engine_at(dir.path());
    let _guard = common::Guard(engine.clone());
    let rootfs = dir.path().join("rootfs.ext4");
    std::fs::write(&rootfs, vec![5u8; 8 * PAGE]).unwrap();
    let drives = json!([{"drive_id": "rootfs", "path_on_host": rootfs, "is_root_device": true, "is_read_only": false}]);
    let api = dir.path().join("vm.sock");
    let _vm = seeded_stand_in(&api, dir.path(), &[("FAKE_FC_DRIVES", drives.to_string())]);
    engine.run(stand_in_vm(&api)).await.unwrap();
    let a = engine.checkpoint("vm", CheckpointOptions { leave_running: true, ..Default::default() }).await.unwrap();
    let mut old = engine.show(&a.id).await.unwrap().body;
    old.config.as_object_mut().unwrap().remove("devices");
    for p in old.parts.iter_mut().filter(|p| p.name == "rootfs") {
        p.name = "rootfs.ext4".into();
    }
    let old_id = {
        let mut tx = engine.store().begin().unwrap();
        let id = tx.put_node(&old.to_node().unwrap()).unwrap();
        tx.set_ref("tag/before-devices", id).unwrap();
        tx.commit().unwrap();
        id
    };
    engine.restore(&old_id.to_hex(), "from-old").await.unwrap();
    assert_eq!(disks(&api_of(dir.path(), "from-old"))["rootfs"]["path"], json!(rootfs), "the original, as before");
    let c =
        engine.checkpoint("from-old", CheckpointOptions { leave_running: true, ..Default::default() }).await.unwrap();
    let parts = engine.show(&c.id).await.unwrap().body.parts;
    assert!(
        parts.iter().any(|p| p.role == snapfork_engine::model::Role::Disk && p.name == "rootfs"),
        "a VM restored from it stores no disk: {parts:?}"
    );
    for s in engine.ls().await.unwrap() {
        engine.rm(&s.name).await.unwrap();
    }
}

/// Checkpoints no restore could use are refused, saying why, and the VM runs on untouched: a VM
/// run by the jailer, in a chroot (the host paths the engine passes, snapshot files, and reads,
/// drives, mean other files in there), and one with a drive outside its working directory.
async fn firecracker_checkpoints_no_restore_could_use_are_refused() {
    if !common::require(TEST_JAILED, false) {
        return;
    }
    let dir = tempfile::Builder::new().prefix("sf-engine-").tempdir_in("/var/tmp").unwrap();
    let engine = engine_at(dir.path());
    let _guard = common::Guard(engine.clone());
    let jail = dir.path().join("jail");
    std::fs::create_dir_all(&jail).unwrap();
    std::fs::write(jail.join("rootfs.ext4"), vec![5u8; 4 * PAGE]).unwrap();
    let drives =
        json!([{"drive_id": "rootfs", "path_on_host": "/rootfs.ext4", "is_root_device": true, "is_read_only": false}]);
    let api = dir.path().join("vm.sock");
    let chroot = jail.display().to_string();
    let _vm = seeded_stand_in(&api, dir.path(), &[("FAKE_FC_CHROOT", chroot), ("FAKE_FC_DRIVES", drives.to_string())]);
    engine.run(stand_in_vm(&api)).await.unwrap();
    let err = engine.checkpoint("vm", CheckpointOptions::default()).await.unwrap_err().to_string();
    assert!(err.contains("chroot") && err.contains(&jail.display().to_string()), "{err}");
    assert_eq!(state(&api), "Running");
    assert!(snapshot_refs(&engine).is_empty());
    engine.rm("vm").await.unwrap();
    drop(_vm);

    // Unjailed, with a drive named relatively but outside the VMM's working directory: no
    // restore could give it a copy, so no snapshot is taken, and the VM runs on.
    let vm_cwd = dir.path().join("vm");
    std::fs::create_dir_all(&vm_cwd).unwrap();
    std::fs::write(dir.path().join("outside.img"), vec![5u8; 4 * PAGE]).unwrap();
    let drives =
        json!([{"drive_id": "data", "path_on_host": "../outside.img", "is_root_device": false, "is_read_only": false}]);
    let api = dir.path().join("vm2.sock");
    let _vm = seeded_stand_in(&api, &vm_cwd, &[("FAKE_FC_DRIVES", drives.to_string())]);
    engine.run(stand_in_vm(&api)).await.unwrap();
    let err = engine.checkpoint("vm", CheckpointOptions::default()).await.unwrap_err().to_string();
    assert!(err.contains("leaves the VM's directory"), "{err}");
    assert_eq!(state(&api), "Running");
    assert!(snapshot_refs(&engine).is_empty());
    engine.rm("vm").await.unwrap();
}

/// The serving process of [`firecracker_vm_outlives_the_process_serving_its_memory`], in a
/// process of its own so that the test can SIGKILL it: restores `SNAP` as `NAME` from the store
/// in `DIR`, says so on stdout, and serves the VM's memory until killed.
async fn restore_and_serve(args: &[String]) {
    let [dir, snap, name, ..] = args else { panic!("--restore-and-serve DIR SNAP NAME") };
    let engine = engine_at(Path::new(dir));
    engine.restore(snap, name).await.unwrap();
    println!("RESTORED {}", api_of(Path::new(dir), name).display());
    loop {
        tokio::time::sleep(Duration::from_secs(60)).await;
    }
}

/// Sandbox `vm` over the stand-in Firecracker listening at `api` (Full snapshots, no disks).
fn stand_in_vm(api: &Path) -> RunSpec {
    let cfg = FirecrackerConfig {
        api_socket: api.to_path_buf(),
        binary: Some(std::env::current_exe().unwrap()),
        devices: None,
        page_size: PAGE as u32,
        diff: false,
        pid: None,
        pid_start_time: None,
    };
    RunSpec { name: "vm".into(), driver: DriverConfig::Firecracker(cfg), workspace: None }
}

/// Starts a stand-in VM (its memory seeded, running) listening at `api`, in `cwd`, with the
/// `FAKE_FC_*` settings `env`; killed when dropped.
fn seeded_stand_in(api: &Path, cwd: &Path, env: &[(&str, String)]) -> KillOnDrop {
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.arg("--api-sock").arg(api).current_dir(cwd).env("FAKE_FC_SEED", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let vm = KillOnDrop(cmd.spawn().unwrap());
    wait_for_api(api, Duration::from_secs(10)).unwrap();
    vm
}

/// Starts a stand-in VM (its memory seeded, running) at `dir/vm.sock` and hands it to `engine`
/// as sandbox `vm`: the VM (killed when dropped) and its API socket.
async fn run_stand_in(engine: &snapfork_engine::Engine, dir: &Path) -> (KillOnDrop, PathBuf) {
    let api = dir.join("vm.sock");
    let vm = seeded_stand_in(&api, dir, &[]);
    engine.run(stand_in_vm(&api)).await.unwrap();
    (vm, api)
}

/// A snapshot of a running (stand-in) VM, restored as `vm-r` by another process
/// ([`restore_and_serve`]) that serves its memory: that server, the VM's API socket and pid.
async fn restored_in_another_process(dir: &Path) -> (KillOnDrop, PathBuf, i32) {
    let me = std::env::current_exe().unwrap();
    // A snapshot of a running VM, taken by one engine that then closes the store.
    let snap = {
        let engine = engine_at(dir);
        let (_vm, _api) = run_stand_in(&engine, dir).await;
        let a = engine.checkpoint("vm", CheckpointOptions { leave_running: true, ..Default::default() }).await.unwrap();
        engine.rm("vm").await.unwrap();
        a.id
    };

    // Another process restores it and serves its memory.
    let mut server = KillOnDrop(
        std::process::Command::new(&me)
            .arg("--restore-and-serve")
            .arg(dir)
            .arg(&snap)
            .arg("vm-r")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(server.0.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let api = PathBuf::from(line.trim().strip_prefix("RESTORED ").unwrap_or_else(|| panic!("{line:?}")));
    let vm_pid = {
        let rec: Value =
            serde_json::from_slice(&std::fs::read(dir.join("engine/sandboxes/vm-r/sandbox.json")).unwrap()).unwrap();
        rec["config"]["pid"].as_i64().unwrap() as i32
    };
    (server, api, vm_pid)
}

/// A daemon dies (SIGKILL) while it serves a lazily restored VM's memory, and in the worst
/// moment: the guest is waiting on a page fault. The next engine process finds the VM from its
/// journal, serves it on, and the guest reads exactly its memory: the snapshot's pages, and zeros
/// where it gave pages back before the kill.
async fn firecracker_vm_outlives_the_process_serving_its_memory() {
    if !common::require(TEST_ADOPT, false) {
        return;
    }
    let dir = tempfile::Builder::new().prefix("sf-engine-").tempdir_in("/var/tmp").unwrap();
    let (server, api, vm_pid) = restored_in_another_process(dir.path()).await;
    let mut expected: Vec<u8> = (0..PAGES).flat_map(|i| vec![(i * 7 % 251) as u8 + 1; PAGE]).collect();
    let _vm = KillPid(vm_pid);
    // The guest gives two pages back: one it had read (in the half read at load), one not.
    for page in [5, 40] {
        ApiClient::new(&api).call("PUT", "/fake/discard", Some(&json!({"page": page}))).unwrap();
        expected[page * PAGE..(page + 1) * PAGE].fill(0);
    }
    let journals = || std::fs::read_dir(dir.path().join("engine/vm-journals")).map_or(0, |d| d.count());
    assert_eq!(journals(), 1);
    // The guest's madvise returns once the server has read the REMOVE, a moment before it writes
    // the range down: wait until both are.
    let t = std::time::Instant::now();
    while snapfork_lazy_restore::journal::orphans(&dir.path().join("engine/vm-journals")).unwrap()[0].removed.len() < 2
    {
        assert!(t.elapsed() < Duration::from_secs(10), "the ranges given back were never written down");
        std::thread::sleep(Duration::from_millis(5));
    }

    // The server freezes, the guest faults on the half it has not read, the server dies.
    freeze(&server);
    let (tx, rx) = std::sync::mpsc::channel();
    let reader_api = api.clone();
    std::thread::spawn(move || {
        let _ = tx.send(memory(&reader_api));
    });
    std::thread::sleep(Duration::from_millis(300));
    if let Ok(got) = rx.try_recv() {
        panic!("the guest read its memory with nobody serving it: {got}");
    }
    drop(server);

    // A new engine process (as a restarted daemon does) takes the VM over.
    let engine = engine_at(dir.path());
    let adopted = engine.adopt_vms().await.unwrap();
    assert_eq!(adopted.len(), 1, "{adopted:?}");
    assert_eq!((adopted[0].pid, adopted[0].sandbox.as_deref()), (vm_pid, Some("vm-r")));
    let mem = rx.recv_timeout(Duration::from_secs(30)).expect("the adopted VM still stalls");
    assert_eq!(mem["blake3"], blake3::hash(&expected).to_hex().to_string(), "{mem}");
    assert_eq!(state(&api), "Running");

    // That engine shuts down, as a daemon does when it exits: the VM runs on, its journal is
    // kept, and no thread of the engine still uses the store (RocksDB's teardown would abort
    // the process: CI saw "terminate called without an active exception").
    let serving =
        |t: &std::fs::DirEntry| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with("uffd-"));
    engine.shutdown();
    let left: Vec<_> = std::fs::read_dir("/proc/self/task").unwrap().flatten().filter(serving).collect();
    assert!(left.is_empty(), "{} serving threads outlived shutdown", left.len());
    assert_eq!(journals(), 1, "the running VM's journal went with the engine");
    drop(engine);
    // The next engine takes it over again.
    let engine = engine_at(dir.path());
    let adopted = engine.adopt_vms().await.unwrap();
    assert_eq!(adopted.len(), 1, "{adopted:?}");
    assert_eq!(memory(&api)["blake3"], blake3::hash(&expected).to_hex().to_string());

    // Removing the sandbox ends the VM, and with it the journal; nothing is left to adopt.
    engine.rm("vm-r").await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while journals() > 0 {
        assert!(std::time::Instant::now() < deadline, "the journal outlived its VM");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(engine.adopt_vms().await.unwrap().is_empty());
    engine.shutdown();
}

/// A checkpoint of a VM whose Firecracker has exited says so at once (a clear refusal, as for
/// gVisor), instead of failing on the API socket nobody answers.
async fn firecracker_checkpoint_of_a_vm_that_exited_is_refused_at_once() {
    if !common::require(TEST_EXITED, false) {
        return;
    }
    let dir = tempfile::Builder::new().prefix("sf-engine-").tempdir_in("/var/tmp").unwrap();
    let engine = engine_at(dir.path());
    let api = dir.path().join("vm.sock");
    let me = std::env::current_exe().unwrap();
    let vm = KillOnDrop(std::process::Command::new(&me).arg("--api-sock").arg(&api).spawn().unwrap());
    wait_for_api(&api, Duration::from_secs(10)).unwrap();
    engine.run(stand_in_vm(&api)).await.unwrap();
    drop(vm);
    let err = engine.checkpoint("vm", CheckpointOptions::default()).await.unwrap_err().to_string();
    assert!(err.contains("is Exited") && err.contains("only a running VM"), "{err}");
    engine.rm("vm").await.unwrap();
    engine.shutdown();
}

/// A VM whose server died and that the next engine cannot take over (its journal names an
/// image the store does not hold) is killed, since nothing would answer its next page fault,
/// rather than left stalled while its sandbox reads as running; its journal goes with it.
async fn firecracker_vm_that_cannot_be_taken_over_is_killed_not_left_stalled() {
    if !common::require(TEST_UNSERVABLE, false) {
        return;
    }
    let dir = tempfile::Builder::new().prefix("sf-engine-").tempdir_in("/var/tmp").unwrap();
    let (server, _api, vm_pid) = restored_in_another_process(dir.path()).await;
    let _vm = KillPid(vm_pid);
    drop(server);
    let journals = dir.path().join("engine/vm-journals");
    let journal = std::fs::read_dir(&journals).unwrap().next().unwrap().unwrap().path();
    let text = std::fs::read_to_string(&journal).unwrap();
    let (header, rest) = text.split_once('\n').unwrap();
    let mut header: Value = serde_json::from_str(header).unwrap();
    header["image"] = json!("f".repeat(64));
    std::fs::write(&journal, format!("{header}\n{rest}")).unwrap();
    let alive = || std::fs::read_to_string(format!("/proc/{vm_pid}/stat")).is_ok_and(|s| !s.contains(") Z "));
    assert!(alive(), "the VM died with its server");

    let engine = engine_at(dir.path());
    assert!(engine.adopt_vms().await.unwrap().is_empty());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while alive() {
        assert!(std::time::Instant::now() < deadline, "the VM nobody can serve was left running (stalled)");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!journal.exists(), "its journal outlived it");
    engine.shutdown();
}

/// A lazily restored VM whose server is gone (its daemon was killed) and that nothing took over
/// yet, checkpointed by an engine that does not serve it (the CLI without a daemon): writing its
/// memory file would stall the VMM on the first page nobody serves, and the checkpoint with it,
/// for minutes. It is refused at once, naming the daemon, and the VM and its sandbox are left
/// as they were; once an engine takes the VM over, the same checkpoint works.
async fn firecracker_checkpoint_of_a_vm_nobody_serves_is_refused_until_it_is_taken_over() {
    if !common::require(TEST_UNSERVED, false) {
        return;
    }
    let dir = tempfile::Builder::new().prefix("sf-engine-").tempdir_in("/var/tmp").unwrap();
    let (server, api, vm_pid) = restored_in_another_process(dir.path()).await;
    let _vm = KillPid(vm_pid);
    drop(server);
    let engine = engine_at(dir.path());
    let t = std::time::Instant::now();
    let err = engine.checkpoint("vm-r", CheckpointOptions::default()).await.unwrap_err().to_string();
    assert!(t.elapsed() < Duration::from_secs(5), "refused only after {:?}", t.elapsed());
    assert!(err.contains("nothing serves its memory") && err.contains("snapfork daemon"), "{err}");
    assert_eq!(state(&api), "Running", "the refused checkpoint paused the VM");
    let info = engine.ls().await.unwrap().into_iter().find(|s| s.name == "vm-r").unwrap();
    assert_eq!(info.status, snapfork_engine::Status::Running);

    assert_eq!(engine.adopt_vms().await.unwrap().len(), 1);
    let report = engine.checkpoint("vm-r", CheckpointOptions::default()).await.unwrap();
    let expected: Vec<u8> = (0..PAGES).flat_map(|i| vec![(i * 7 % 251) as u8 + 1; PAGE]).collect();
    let mem = report.parts.iter().find(|p| p.name == "mem").unwrap();
    let mut got = vec![0; PAGES * PAGE];
    engine.store().open_image(&mem.id.parse().unwrap()).unwrap().read_pages(0, &mut got).unwrap();
    assert_eq!(blake3::hash(&got), blake3::hash(&expected), "the checkpoint holds other memory");
    engine.rm("vm-r").await.unwrap();
    engine.shutdown();
}

/// Connections to the API socket at `api` until its listener's backlog is full (its VMM does
/// not accept them): held, the next connect fails at once.
fn fill_backlog(api: &Path) -> Vec<std::os::fd::OwnedFd> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};
    use std::os::fd::AsRawFd;
    let addr = UnixAddr::new(api).unwrap();
    let mut pending = Vec::new();
    loop {
        let fd = socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_NONBLOCK, None).unwrap();
        match connect(fd.as_raw_fd(), &addr) {
            Ok(()) => pending.push(fd),
            Err(nix::errno::Errno::EAGAIN) => return pending,
            Err(e) => panic!("connect {}: {e}", api.display()),
        }
        assert!(pending.len() < 4096, "the backlog never filled");
    }
}

/// Stops (SIGSTOP) the serving process `server` and returns once every thread of it has stopped.
fn freeze(server: &KillOnDrop) {
    let pid = server.0.id() as i32;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    // kill() returns before the stop takes effect: a thread of the server must first run to
    // stop the others, and until then its serving thread may still answer faults (seen under
    // load). waitpid(WUNTRACED) returns once every thread has stopped.
    let mut status = 0;
    // SAFETY: waiting for our own child; `status` outlives the call.
    let waited = unsafe { libc::waitpid(pid, &mut status, libc::WUNTRACED) };
    assert!(waited == pid && libc::WIFSTOPPED(status), "the server did not stop: {status:#x}");
}

/// A VMM that hangs inside `snapshot/create`, in its write of the memory file (the guest
/// memory it copies from faults, and its page server is frozen). The checkpoint fails once the
/// VMM has neither answered nor written more for the engine's VMM timeout, and says so; the
/// sandbox reads as paused (the resume is not answered either); no snapshot is left; and the
/// sandbox is not held (the stalled write holds the memory file too, and removing it would
/// wait with it). A `stop` that cannot kill the VMM (its API socket's backlog is full, so its
/// process cannot be found) says so and leaves the sandbox paused; once the VMM is gone, `rm`
/// works at once and the files go.
async fn firecracker_checkpoint_of_a_vmm_hung_in_snapshot_create_fails_in_time_and_holds_nothing() {
    if !common::require(TEST_HUNG, false) {
        return;
    }
    let dir = tempfile::Builder::new().prefix("sf-engine-").tempdir_in("/var/tmp").unwrap();
    let engine = common::engine_at_with(dir.path(), |o| o.vmm_timeout = Duration::from_secs(2));
    let (vm, api) = run_stand_in(&engine, dir.path()).await;
    ApiClient::new(&api).call("PUT", "/fake/hang-in-next-create", None).unwrap();
    let before = snapshot_refs(&engine);

    let t = std::time::Instant::now();
    let err = engine.checkpoint("vm", CheckpointOptions::default()).await.unwrap_err().to_string();
    assert!(t.elapsed() < Duration::from_secs(20), "failed only after {:?}", t.elapsed());
    assert!(err.contains("snapshot/create") && err.contains("hung") && err.contains("left paused"), "{err}");
    assert_eq!(snapshot_refs(&engine), before, "the failed checkpoint left refs behind");
    let info = engine.ls().await.unwrap().into_iter().find(|s| s.name == "vm").unwrap();
    assert_eq!(info.status, snapfork_engine::Status::Paused);

    // Its API socket's backlog fills up: the VMM cannot be found by it any more, so `stop`
    // cannot kill it, and says so instead of recording a stopped sandbox whose VM still runs.
    let pending = fill_backlog(&api);
    let err = engine.stop("vm").await.unwrap_err().to_string();
    assert!(err.contains("may still run"), "{err}");
    let info = engine.ls().await.unwrap().into_iter().find(|s| s.name == "vm").unwrap();
    assert_eq!(info.status, snapfork_engine::Status::Paused);
    // (Queued connections stay queued when their clients close: only the VMM's end frees them.)
    drop(vm);
    drop(pending);

    // Nothing of the engine waits on the hung VMM: the sandbox goes at once, and the snapshot
    // files once the VMM is gone.
    let t = std::time::Instant::now();
    engine.rm("vm").await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(10), "rm took {:?}", t.elapsed());
    let tmp = dir.path().join("engine/tmp");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::fs::read_dir(&tmp).unwrap().count() > 0 {
        assert!(std::time::Instant::now() < deadline, "the failed checkpoint's files stay");
        std::thread::sleep(Duration::from_millis(20));
    }
    engine.shutdown();
}

/// `rm` of a sandbox whose checkpoint is stuck in a hung VMM (which would hold the sandbox for
/// three VMM timeouts: two without progress in `snapshot/create`, one for the resume) waits one
/// VMM timeout, then ends the VMM, which fails the checkpoint, leaving no snapshot, and removes
/// the sandbox; it does not queue behind the checkpoint.
async fn firecracker_rm_does_not_wait_for_a_checkpoint_hung_in_the_vmm() {
    if !common::require(TEST_RM_HUNG, false) {
        return;
    }
    let dir = tempfile::Builder::new().prefix("sf-engine-").tempdir_in("/var/tmp").unwrap();
    let engine = common::engine_at_with(dir.path(), |o| o.vmm_timeout = Duration::from_secs(3));
    let (_vm, api) = run_stand_in(&engine, dir.path()).await;
    ApiClient::new(&api).call("PUT", "/fake/hang-in-next-create", None).unwrap();
    let before = snapshot_refs(&engine);
    let e2 = engine.clone();
    let checkpoint = tokio::spawn(async move { e2.checkpoint("vm", CheckpointOptions::default()).await });
    // Wait until the VMM hangs in its write of the memory file.
    let tmp = dir.path().join("engine/tmp");
    let writing = || std::fs::read_dir(&tmp).unwrap().flatten().any(|d| d.path().join("mem").exists());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !writing() {
        assert!(std::time::Instant::now() < deadline, "the VMM never started its memory file");
        std::thread::sleep(Duration::from_millis(10));
    }

    let t = std::time::Instant::now();
    engine.rm("vm").await.unwrap();
    assert!(t.elapsed() < Duration::from_millis(5500), "rm waited {:?} for the hung checkpoint", t.elapsed());
    let err = checkpoint.await.unwrap().unwrap_err().to_string();
    assert!(err.contains("snapshot/create"), "{err}");
    assert_eq!(snapshot_refs(&engine), before, "the checkpoint cut short left refs behind");
    assert!(engine.ls().await.unwrap().is_empty());
    engine.shutdown();
}

/// A lazily restored VM faults on a page that the store holds corrupt: its memory server kills
/// it rather than hand it wrong bytes, and `ls` says why the sandbox exited (a guest that
/// crashed by itself would look the same otherwise).
async fn firecracker_vm_killed_for_a_corrupt_page_says_so_in_ls() {
    if !common::require(TEST_CORRUPT, false) {
        return;
    }
    let dir = tempfile::Builder::new().prefix("sf-engine-").tempdir_in("/var/tmp").unwrap();
    let engine = engine_at(dir.path());
    let (_vm, _api) = run_stand_in(&engine, dir.path()).await;
    let a = engine.checkpoint("vm", CheckpointOptions::default()).await.unwrap();
    engine.restore(&a.id, "vm-r").await.unwrap();
    let restored = engine.ls().await.unwrap().into_iter().find(|s| s.name == "vm-r").unwrap();
    assert_eq!((restored.status, restored.ended.as_deref()), (snapfork_engine::Status::Running, None));
    // The guest has read half its memory; every stored byte goes bad now.
    for pack in std::fs::read_dir(dir.path().join("store/packs")).unwrap().flatten() {
        let len = pack.metadata().unwrap().len() as usize;
        std::fs::write(pack.path(), vec![0xa5; len]).unwrap();
    }
    let api_r = api_of(dir.path(), "vm-r");
    let read = ApiClient::new(&api_r).call("GET", "/fake/memory", None);
    assert!(read.is_err(), "the guest read memory the store holds corrupt: {:?}", read.map(|r| r.body));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let info = loop {
        let info = engine.ls().await.unwrap().into_iter().find(|s| s.name == "vm-r").unwrap();
        if info.ended.is_some() {
            break info;
        }
        assert!(std::time::Instant::now() < deadline, "ls never said why the VM ended: {info:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(info.status, snapfork_engine::Status::Exited);
    let why = info.ended.unwrap();
    assert!(why.contains("corrupt") && why.contains("page"), "{why}");
    // The original sandbox's VM ended by itself (it was never served): no reason of snapfork's.
    drop(_vm);
    let vm = engine.ls().await.unwrap().into_iter().find(|s| s.name == "vm").unwrap();
    assert_eq!((vm.status, vm.ended), (snapfork_engine::Status::Exited, None));
    engine.rm("vm-r").await.unwrap();
    engine.rm("vm").await.unwrap();
    engine.shutdown();
}

/// Kills a process (a stand-in VM whose parent is gone) when the test ends, also on panic.
struct KillPid(i32);

impl Drop for KillPid {
    fn drop(&mut self) {
        // SAFETY: plain kill(2); the pid is a stand-in VM this test made (still alive or gone).
        unsafe { libc::kill(self.0, libc::SIGKILL) };
    }
}

/// The stand-in "running VM" dies with the test, also when it panics.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
