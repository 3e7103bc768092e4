//! The gvisor driver's configuration and the OCI bundle it generates for runsc.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Where the workspace appears inside a gVisor sandbox unless configured otherwise.
pub const DEFAULT_WORKSPACE_MOUNT: &str = "/workspace";

/// How to run a gVisor sandbox. Stored in every snapshot so a restore needs nothing else.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GvisorConfig {
    /// The root filesystem directory (mounted read-only).
    pub rootfs: PathBuf,
    /// The process to run.
    pub args: Vec<String>,
    /// Its environment (`KEY=VALUE`).
    #[serde(default = "default_env")]
    pub env: Vec<String>,
    /// Its working directory.
    #[serde(default = "default_cwd")]
    pub cwd: String,
    /// Where the workspace is mounted inside the sandbox.
    #[serde(default = "default_mount")]
    pub workspace_mount: String,
    /// Extra read-only bind mounts `(host source, sandbox destination)`, e.g. `/usr`.
    #[serde(default)]
    pub ro_mounts: Vec<(PathBuf, String)>,
    /// The sandbox's hostname.
    #[serde(default = "default_hostname")]
    pub hostname: String,
}

fn default_env() -> Vec<String> {
    vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(), "HOME=/workspace".into()]
}
fn default_cwd() -> String {
    "/".into()
}
fn default_mount() -> String {
    DEFAULT_WORKSPACE_MOUNT.into()
}
fn default_hostname() -> String {
    "sandbox".into()
}

impl GvisorConfig {
    /// A config running `args` on `rootfs` with defaults for the rest.
    pub fn new(rootfs: PathBuf, args: Vec<String>) -> GvisorConfig {
        GvisorConfig {
            rootfs,
            args,
            env: default_env(),
            cwd: default_cwd(),
            workspace_mount: default_mount(),
            ro_mounts: Vec::new(),
            hostname: default_hostname(),
        }
    }

    /// Checks what runsc would otherwise reject late and obscurely.
    pub fn validate(&self) -> Result<()> {
        if self.args.is_empty() {
            return Err(Error::Invalid("gvisor: no command given".into()));
        }
        if !self.rootfs.is_absolute() {
            return Err(Error::Invalid(format!("gvisor: rootfs {} must be an absolute path", self.rootfs.display())));
        }
        if !self.rootfs.is_dir() {
            return Err(Error::Invalid(format!("gvisor: rootfs {} is not a directory", self.rootfs.display())));
        }
        for dst in std::iter::once(&self.workspace_mount).chain(self.ro_mounts.iter().map(|m| &m.1)) {
            if !dst.starts_with('/') || dst.split('/').any(|c| c == "..") {
                return Err(Error::Invalid(format!("gvisor: bad mount destination {dst}")));
            }
        }
        Ok(())
    }

    /// The OCI runtime spec (config.json) for this sandbox with `workspace` bind-mounted.
    pub fn oci_spec(&self, workspace: Option<&Path>) -> serde_json::Value {
        let caps = serde_json::json!(["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]);
        let mut mounts = vec![
            serde_json::json!({"destination": "/proc", "type": "proc", "source": "proc"}),
            serde_json::json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs"}),
            serde_json::json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
                "options": ["nosuid", "noexec", "nodev", "ro"]}),
            serde_json::json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"}),
        ];
        for (src, dst) in &self.ro_mounts {
            mounts.push(serde_json::json!({"destination": dst, "type": "bind",
                "source": src, "options": ["rbind", "ro"]}));
        }
        if let Some(ws) = workspace {
            mounts.push(serde_json::json!({"destination": self.workspace_mount, "type": "bind",
                "source": ws, "options": ["rbind", "rw"]}));
        }
        serde_json::json!({
            "ociVersion": "1.0.0",
            "process": {
                "terminal": false,
                "user": {"uid": 0, "gid": 0},
                "args": self.args,
                "env": self.env,
                "cwd": self.cwd,
                "capabilities": {"bounding": caps, "effective": caps, "inheritable": caps,
                    "permitted": caps},
                "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
                "noNewPrivileges": true
            },
            "root": {"path": self.rootfs, "readonly": true},
            "hostname": self.hostname,
            "mounts": mounts,
            "linux": {
                "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"},
                    {"type": "uts"}, {"type": "mount"}]
            }
        })
    }

    /// Writes `bundle/config.json`.
    pub fn write_bundle(&self, bundle: &Path, workspace: Option<&Path>) -> Result<()> {
        std::fs::create_dir_all(bundle).map_err(|e| Error::io(format!("mkdir {}", bundle.display()), e))?;
        let spec = serde_json::to_vec_pretty(&self.oci_spec(workspace)).map_err(|e| Error::Invalid(e.to_string()))?;
        let path = bundle.join("config.json");
        std::fs::write(&path, spec).map_err(|e| Error::io(format!("write {}", path.display()), e))
    }
}

/// The busybox applets [`make_busybox_rootfs`] links: those the demo and tests use.
const BUSYBOX_APPLETS: [&str; 18] = [
    "sh", "sleep", "echo", "cat", "ls", "rm", "mkdir", "head", "tail", "kill", "wc", "dd", "seq", "true", "date",
    "touch", "cp", "grep",
];

/// Builds a minimal root filesystem at `dir` from a static busybox (Debian's `busybox-static`):
/// `/bin/busybox` plus links for the applets the demo and tests use.
///
/// Safe to call from many processes at once (ten CLI clients starting sandboxes on one store do):
/// the tree is built beside `dir` and renamed into place, so no caller ever runs a sandbox on a
/// half-built rootfs, and a caller that loses the race keeps the winner's tree.
pub fn make_busybox_rootfs(dir: &Path) -> Result<()> {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"].iter().map(Path::new).find(|p| p.exists()).ok_or_else(|| {
        Error::Invalid("busybox not found: install Debian's busybox-static (scripts/setup.sh)".into())
    })?;
    let complete = |d: &Path| {
        d.join("bin/busybox").exists()
            && BUSYBOX_APPLETS.iter().all(|a| d.join("bin").join(a).symlink_metadata().is_ok())
    };
    if complete(dir) {
        return Ok(());
    }
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let building = dir.with_file_name(format!(".{name}.building-{}", unique_suffix()));
    populate_busybox_rootfs(busybox, &building)?;
    match std::fs::rename(&building, dir) {
        Ok(()) => Ok(()),
        // Someone else's tree is in place (it won the race, or an older, partial one is there):
        // keep it and fill in whatever it lacks.
        Err(_) if dir.is_dir() => {
            let _ = std::fs::remove_dir_all(&building);
            populate_busybox_rootfs(busybox, dir)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&building);
            Err(Error::io(format!("rename {} to {}", building.display(), dir.display()), e))
        }
    }
}

/// A name part no other caller, in this process or another, uses at the same time.
fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Creates whatever of the busybox rootfs is missing at `dir`; entries that exist, or that a
/// concurrent caller creates first, are kept.
fn populate_busybox_rootfs(busybox: &Path, dir: &Path) -> Result<()> {
    let bin = dir.join("bin");
    for d in ["bin", "proc", "dev", "sys", "tmp", "workspace", "etc"] {
        let p = dir.join(d);
        std::fs::create_dir_all(&p).map_err(|e| Error::io(format!("mkdir {}", p.display()), e))?;
    }
    let target = bin.join("busybox");
    if !target.exists() {
        // Copied under a private name and renamed, so nobody executes a half-copied binary.
        let partial = bin.join(format!(".busybox.{}", unique_suffix()));
        std::fs::copy(busybox, &partial).map_err(|e| Error::io(format!("copy {}", busybox.display()), e))?;
        std::fs::rename(&partial, &target).map_err(|e| Error::io(format!("rename {}", partial.display()), e))?;
    }
    for applet in BUSYBOX_APPLETS {
        let link = bin.join(applet);
        match std::os::unix::fs::symlink("busybox", &link) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(Error::io(format!("symlink {}", link.display()), e));
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ten CLI clients starting sandboxes at once all build the shared rootfs (CI saw this race
    /// fail with EEXIST); every one of them must succeed and find a complete tree.
    #[test]
    fn concurrent_callers_all_get_a_complete_busybox_rootfs() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("rootfs-busybox");
        let results: Vec<Result<()>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..10).map(|_| s.spawn(|| make_busybox_rootfs(&dir))).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for r in results {
            r.unwrap();
        }
        assert!(std::fs::metadata(dir.join("bin/busybox")).unwrap().len() > 100_000);
        for applet in BUSYBOX_APPLETS {
            assert_eq!(std::fs::read_link(dir.join("bin").join(applet)).unwrap(), Path::new("busybox"));
        }
        let leftovers: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from("rootfs-busybox")], "no half-built trees left");
    }
}
