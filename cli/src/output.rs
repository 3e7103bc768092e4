//! How commands report: one JSON object with `--json`, text otherwise, errors as one line.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;

use crate::Global;

/// What a command returns: a JSON object for agents and the text for people.
pub struct Report {
    /// The JSON object printed with `--json`.
    pub json: Value,
    /// The text printed otherwise.
    pub text: String,
    /// A command run in a sandbox (`sandbox exec`): its output is printed as it is (stdout
    /// and stderr) and its exit code becomes ours.
    pub passthrough: Option<Passthrough>,
}

/// The stderr and exit code of a command run in a sandbox (its stdout is the report's text).
pub struct Passthrough {
    /// What it wrote to stderr.
    pub stderr: String,
    /// Its exit code.
    pub exit_code: i32,
}

impl Report {
    /// A report whose text is given and whose JSON is `json`.
    pub fn new(json: Value, text: impl Into<String>) -> Self {
        Report { json, text: text.into(), passthrough: None }
    }

    /// The report of a command run in a sandbox, from the JSON of its `ExecReport`.
    pub fn command_output(json: Value) -> Self {
        let field = |k: &str| json[k].as_str().unwrap_or_default().to_string();
        let passthrough = Passthrough {
            stderr: field("stderr"),
            exit_code: json["exit_code"].as_i64().and_then(|c| i32::try_from(c).ok()).unwrap_or(1),
        };
        Report { text: field("stdout"), passthrough: Some(passthrough), json }
    }
}

/// Logs go to stderr, filtered by `RUST_LOG` (default: warnings).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

/// An error and its causes on one line, `outer: cause: root`. A cause that the message above it
/// already quotes (library errors that print their source) is not repeated.
pub fn error_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if !line.ends_with(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
}

/// Prints the result and returns the process exit code.
pub fn finish(result: anyhow::Result<Report>, global: &Global) -> i32 {
    match result {
        Ok(report) => {
            let code = report.passthrough.as_ref().map_or(0, |p| p.exit_code);
            if global.json {
                println!("{}", report.json);
            } else if let Some(p) = &report.passthrough {
                use std::io::Write;
                let _ = std::io::stdout().write_all(report.text.as_bytes());
                let _ = std::io::stderr().write_all(p.stderr.as_bytes());
            } else if !report.text.is_empty() {
                println!("{}", report.text.trim_end());
            }
            code
        }
        Err(err) => {
            let message = error_line(&err);
            if global.json {
                println!("{}", serde_json::json!({ "error": message }));
            }
            eprintln!("snapfork: error: {message}");
            1
        }
    }
}

/// True when progress is to be shown: stderr is a terminal and `--json` is off.
fn shows_progress(global: &Global) -> bool {
    !global.json && std::io::stderr().is_terminal()
}

/// A progress bar of `len` bytes on stderr (see [`shows_progress`]; hidden otherwise).
pub fn progress(global: &Global, len: u64, what: &str) -> ProgressBar {
    bar(global, len, what, "{msg:>12} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
}

/// A progress bar of `len` items (forks, files) on stderr.
pub fn progress_count(global: &Global, len: u64, what: &str) -> ProgressBar {
    bar(global, len, what, "{msg:>12} [{bar:40}] {pos}/{len} eta {eta}")
}

fn bar(global: &Global, len: u64, what: &str, template: &str) -> ProgressBar {
    if !shows_progress(global) {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()).progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

/// A spinner on stderr for work whose size is not known ahead (a checkpoint, a gc, a verify):
/// what runs, the time so far, and the bytes done when the work reports them (`inc`). Cleared
/// when dropped.
pub fn spinner(global: &Global, what: &str) -> Spinner {
    if !shows_progress(global) {
        return Spinner(ProgressBar::hidden());
    }
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} {elapsed} {bytes} {binary_bytes_per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.set_message(what.to_string());
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    Spinner(bar)
}

/// See [`spinner`].
pub struct Spinner(pub ProgressBar);

impl Drop for Spinner {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::error_line;

    #[test]
    fn a_quoted_cause_is_not_repeated() {
        let io = std::io::Error::from_raw_os_error(libc::EPERM);
        let quoted = anyhow::Error::new(snapfork_fsfork::Error::io("create", "/w/a", io));
        assert_eq!(error_line(&quoted), "create /w/a: Operation not permitted (os error 1)");
        let plain = anyhow::anyhow!("disk full").context("checkpoint s1");
        assert_eq!(error_line(&plain), "checkpoint s1: disk full");
    }
}
