//! What the CLI's end-to-end tests share. Each test binary uses part of it.
#![allow(dead_code)]

use std::process::{Command, Output};

use serde_json::Value;

/// The one JSON object a successful `--json` command printed (exactly one line, as promised).
pub fn json(out: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "failed: {stdout} {}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "--json must print exactly one line: {stdout}");
    serde_json::from_str(lines[0]).expect("valid JSON")
}

/// True when `test` can run here: it needs root, and `runsc` when `runsc` is set. Where it cannot,
/// it says so loudly and fails, or, with `SNAPFORK_ALLOW_SKIP=1` (a local run without root),
/// skips loudly. CI runs as root with runsc installed, so nothing is skipped there.
pub fn require(test: &str, runsc: bool) -> bool {
    let root = Command::new("id").arg("-u").output().map(|o| o.stdout == b"0\n").unwrap_or(false);
    let have_runsc =
        !runsc || Command::new("runsc").arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
    if root && have_runsc {
        return true;
    }
    let needs = if runsc { "root and runsc" } else { "root" };
    eprintln!("!!!!!!!! {test}: needs {needs}: NOT RUN !!!!!!!!");
    if std::env::var("SNAPFORK_ALLOW_SKIP").as_deref() == Ok("1") {
        return false;
    }
    panic!("{test} needs {needs}; set SNAPFORK_ALLOW_SKIP=1 to skip");
}
