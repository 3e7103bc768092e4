//! README's main command: `snapfork demo` on the default store (a relative `.snapfork` in the
//! working directory), on a real gVisor sandbox.

use std::process::Command;

mod common;

#[test]
fn the_demo_runs_on_the_default_relative_store() {
    if !common::require("the_demo_runs_on_the_default_relative_store", true) {
        return;
    }
    let cwd = tempfile::Builder::new().prefix("snapfork-demo-").tempdir_in("/var/tmp").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_snapfork"))
        .args(["demo", "--json"])
        .env_remove("SNAPFORK_STORE")
        .current_dir(cwd.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "demo failed: {stdout} {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert_eq!(v["id"].as_str().map(str::len), Some(64), "{v}");
    assert_eq!(v["consecutive_after_revert"], true, "{v}");
    assert_eq!(v["forks"].as_array().map(Vec::len), Some(3), "{v}");
    assert!(cwd.path().join(".snapfork/FORMAT").exists(), "the demo did not use the default store");
}
