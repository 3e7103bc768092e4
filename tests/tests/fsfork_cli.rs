//! The `snapfork` workspace commands end to end, on a loop-mounted XFS: every command with
//! `--json` prints exactly one JSON object, created things are named `id`, errors are one line
//! and a non-zero exit.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use snapfork_fsfork::testfs::{FsType, TestFs, require_root};

/// The newest modification time of `path`, or of any file under it.
fn newest(path: &Path) -> std::time::SystemTime {
    let Ok(meta) = std::fs::metadata(path) else { return std::time::SystemTime::UNIX_EPOCH };
    let own = meta.modified().unwrap_or(std::time::SystemTime::UNIX_EPOCH);
    if !meta.is_dir() {
        return own;
    }
    std::fs::read_dir(path).into_iter().flatten().flatten().map(|e| newest(&e.path())).fold(own, |a, b| a.max(b))
}

/// The `snapfork` binary of this target directory, built if needed: a workspace test run
/// (`scripts/test.sh`) has built it already, newer than every source; only an older one is
/// rebuilt (a build of the CLI alone unifies features differently and takes a minute).
fn snapfork() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/snapfork
    let dir = exe.parent().and_then(Path::parent).expect("target dir").to_path_buf();
    let bin = dir.join("snapfork");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root");
    let sources = ["cli", "engine", "fsfork", "lazy-restore", "store", "Cargo.lock", "Cargo.toml"]
        .iter()
        .map(|c| newest(&root.join(c)))
        .max();
    if let (Ok(built), Some(sources)) = (std::fs::metadata(&bin).and_then(|m| m.modified()), sources)
        && built > sources
    {
        return bin;
    }
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(["build", "-q", "-p", "snapfork-cli"]);
    if dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let st = cmd.status().expect("run cargo build -p snapfork-cli");
    assert!(st.success(), "cargo build -p snapfork-cli failed");
    assert!(bin.exists(), "{} not built", bin.display());
    bin
}

struct Cli {
    bin: PathBuf,
    store: PathBuf,
    cwd: PathBuf,
    /// Run as user `nobody` rather than as ourselves (root).
    as_nobody: bool,
}

impl Cli {
    fn run(&self, args: &[&str]) -> (bool, String, String) {
        let mut cmd = if self.as_nobody {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"]).arg(&self.bin);
            c
        } else {
            Command::new(&self.bin)
        };
        let out = cmd
            .arg("--json")
            .arg("--store")
            .arg(&self.store)
            .args(args)
            .current_dir(&self.cwd)
            .output()
            .expect("run snapfork");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn json(&self, args: &[&str]) -> Value {
        let (ok, out, err) = self.run(args);
        assert!(ok, "snapfork {args:?} failed: {err}");
        assert_eq!(out.trim_end().lines().count(), 1, "more than one line of output: {out}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
    }
}

#[test]
fn fsfork_cli_end_to_end() {
    if !require_root("fsfork_cli_end_to_end") {
        return;
    }
    let fs = TestFs::new(FsType::Xfs, 512).expect("make XFS");
    let cli = Cli { bin: snapfork(), store: fs.path().join("store"), cwd: fs.path().to_path_buf(), as_nobody: false };
    let ws = fs.path().join("ws");
    std::fs::create_dir_all(ws.join("src")).unwrap();
    std::fs::write(ws.join("src/main.rs"), "fn main() {}\n").unwrap();
    std::fs::write(ws.join("README"), "v1\n").unwrap();

    let c1 = cli.json(&["checkpoint", "ws", "-m", "first"]);
    let id1 = c1["id"].as_str().unwrap().to_string();
    assert_eq!(c1["files"], 2);
    assert_eq!(c1["mode"], "reflink");

    let st = Command::new("sh")
        .arg("-c")
        .arg("echo v2 > README && rm src/main.rs && echo new > NEW")
        .current_dir(&ws)
        .status()
        .unwrap();
    assert!(st.success());
    let c2 = cli.json(&["checkpoint", "ws", "-m", "second"]);
    let id2 = c2["id"].as_str().unwrap().to_string();
    assert_eq!(c2["parent"], id1.as_str());

    let d = cli.json(&["diff", &id1, &id2]);
    assert_eq!(d["added"], serde_json::json!(["NEW"]));
    assert_eq!(d["removed"], serde_json::json!(["src/main.rs"]));
    assert_eq!(d["changed"][0]["path"], "README");
    let live = cli.json(&["diff", &id2[..12], "ws"]);
    assert_eq!(live["added"], serde_json::json!([]));
    assert_eq!(live["changed"], serde_json::json!([]));

    let f = cli.json(&["fork", &id1, "-n", "3", "--into", "forks"]);
    let ids = f["id"].as_array().unwrap();
    assert_eq!(ids.len(), 3);
    for p in ids {
        assert_eq!(std::fs::read_to_string(Path::new(p.as_str().unwrap()).join("README")).unwrap(), "v1\n");
    }

    let r = cli.json(&["restore", &id2, "restored"]);
    assert!(r["id"].as_str().unwrap().ends_with("/restored"));
    assert_eq!(std::fs::read_to_string(fs.path().join("restored/NEW")).unwrap(), "new\n");

    let rv = cli.json(&["revert", "ws", &id1, "--wait"]);
    assert_eq!(rv["checkpoint"], id1.as_str());
    assert_eq!(std::fs::read_to_string(ws.join("README")).unwrap(), "v1\n");
    assert!(!ws.join("NEW").exists());
    assert!(!Path::new(rv["old_tree"].as_str().unwrap()).exists());

    let log = cli.json(&["log", "ws"]);
    let kinds: Vec<&str> = log["events"].as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, vec!["checkpoint", "checkpoint", "revert"]);
    assert_eq!(log["events"][0]["offspring"].as_array().unwrap().len(), 3);

    // A fork removed by hand is forgotten by `forget --gone` (listed first by --dry-run), one
    // still there only when named; the rest stays recorded.
    let offspring = |cli: &Cli| cli.json(&["log", "ws"])["events"][0]["offspring"].as_array().unwrap().len();
    std::fs::remove_dir_all(fs.path().join("forks/fork-1")).unwrap();
    let fork1 = std::fs::canonicalize(fs.path()).unwrap().join("forks/fork-1");
    let listed = cli.json(&["forget", "--gone", "--dry-run"]);
    assert_eq!(listed["forgotten"], serde_json::json!([fork1]));
    assert_eq!(offspring(&cli), 3, "a dry run forgets nothing");
    assert_eq!(cli.json(&["forget", "--gone"])["forgotten"], serde_json::json!([fork1]));
    assert_eq!(offspring(&cli), 2);
    assert_eq!(cli.json(&["forget", "--gone"])["forgotten"], serde_json::json!([]));
    assert_eq!(cli.json(&["forget", "forks/fork-2"])["forgotten"].as_array().unwrap().len(), 1);
    assert_eq!(offspring(&cli), 1);
    assert!(fs.path().join("forks/fork-2/README").exists(), "forget leaves the tree");
    assert_eq!(cli.json(&["log", "ws"])["events"].as_array().unwrap().len(), 3, "ws keeps its history");

    let cl = cli.json(&["clone", "ws", "ws2"]);
    assert_eq!(cl["mode"], "reflink");
    assert_eq!(cl["id"], "ws2");

    // Errors: one JSON object on stdout with --json, one line on stderr, non-zero exit.
    let (ok, out, err) = cli.run(&["restore", "no-such-checkpoint", "x"]);
    assert!(!ok);
    assert!(serde_json::from_str::<Value>(&out).unwrap()["error"].as_str().unwrap().contains("no such checkpoint"));
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    let (ok, _, _) = cli.run(&["restore", &id1, "restored"]);
    assert!(!ok, "restoring over an existing directory must fail");
}

/// A regular user restores a workspace whose files belong to others (root, a uid of a
/// container), as `cp -a` and `tar` do for one: the restore succeeds with every byte and mode,
/// the entries become the user's, a setuid-root program loses its setuid bit, and the report
/// counts the entries whose owner could not be kept. Root, restoring the same checkpoint, keeps
/// every owner.
#[test]
fn a_regular_user_restores_files_owned_by_others() {
    if !require_root("a_regular_user_restores_files_owned_by_others") {
        return;
    }
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let fs = TestFs::new(FsType::Xfs, 512).expect("make XFS");
    let top = fs.path();
    std::fs::set_permissions(top, std::fs::Permissions::from_mode(0o755)).unwrap();
    let ws = top.join("ws");
    std::fs::create_dir_all(ws.join("bin")).unwrap();
    std::fs::write(ws.join("notes.txt"), "root's notes\n").unwrap();
    std::fs::copy("/bin/true", ws.join("bin/su-tool")).unwrap();
    std::fs::set_permissions(ws.join("bin/su-tool"), std::fs::Permissions::from_mode(0o4755)).unwrap();
    std::fs::write(ws.join("bin/theirs"), "a container user's file\n").unwrap();
    std::fs::set_permissions(ws.join("bin/theirs"), std::fs::Permissions::from_mode(0o640 | 0o004)).unwrap();
    std::os::unix::fs::lchown(ws.join("bin/theirs"), Some(1234), Some(1234)).unwrap();
    std::os::unix::fs::symlink("notes.txt", ws.join("link")).unwrap();
    // The store and the place to restore to are the user's; the workspace is root's.
    let (store, out) = (top.join("store"), top.join("out"));
    std::fs::create_dir_all(&out).unwrap();
    let nobody = 65534;
    std::os::unix::fs::chown(&out, Some(nobody), Some(nobody)).unwrap();
    std::os::unix::fs::chown(top, Some(nobody), Some(nobody)).unwrap();
    let user = Cli { bin: snapfork(), store: store.clone(), cwd: top.to_path_buf(), as_nobody: true };

    let c = user.json(&["checkpoint", "ws"]);
    let id = c["id"].as_str().unwrap().to_string();
    let r = user.json(&["restore", &id, "out/mine"]);
    let mine = out.join("mine");
    // ws, bin, notes.txt, su-tool, theirs, link: none is nobody's.
    assert_eq!(r["owner_failures"], 6, "{r}");
    for rel in ["notes.txt", "bin/su-tool", "bin/theirs"] {
        assert_eq!(std::fs::read(mine.join(rel)).unwrap(), std::fs::read(ws.join(rel)).unwrap(), "{rel}");
    }
    assert_eq!(std::fs::read_link(mine.join("link")).unwrap(), Path::new("notes.txt"));
    for rel in ["", "bin", "notes.txt", "bin/su-tool", "bin/theirs", "link"] {
        let m = std::fs::symlink_metadata(mine.join(rel)).unwrap();
        assert_eq!((m.uid(), m.gid()), (nobody, nobody), "{rel} is the user's");
    }
    let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().mode() & 0o7777;
    assert_eq!(mode(&mine.join("bin/su-tool")), 0o755, "setuid dropped with the owner");
    assert_eq!(mode(&mine.join("bin/theirs")), 0o644);
    assert_eq!(mode(&mine.join("notes.txt")), mode(&ws.join("notes.txt")));

    // Root restores the same checkpoint with every owner and the setuid bit.
    let root = Cli { as_nobody: false, ..user };
    let r = root.json(&["restore", &id, "out/roots"]);
    assert_eq!(r["owner_failures"], 0, "{r}");
    let roots = out.join("roots");
    for rel in ["", "bin", "notes.txt", "bin/su-tool", "bin/theirs", "link"] {
        let (a, b) =
            (std::fs::symlink_metadata(ws.join(rel)).unwrap(), std::fs::symlink_metadata(roots.join(rel)).unwrap());
        assert_eq!((a.uid(), a.gid(), a.mode()), (b.uid(), b.gid(), b.mode()), "{rel}");
    }
}
