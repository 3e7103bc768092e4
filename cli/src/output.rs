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
}

impl Report {
    /// A report whose text is given and whose JSON is `json`.
    pub fn new(json: Value, text: impl Into<String>) -> Self {
        Report { json, text: text.into() }
    }
}

/// Logs go to stderr, filtered by `RUST_LOG` (default: warnings).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

/// Prints the result and returns the process exit code.
pub fn finish(result: anyhow::Result<Report>, global: &Global) -> i32 {
    match result {
        Ok(report) => {
            if global.json {
                println!("{}", report.json);
            } else if !report.text.is_empty() {
                println!("{}", report.text.trim_end());
            }
            0
        }
        Err(err) => {
            let message = format!("{err:#}");
            if global.json {
                println!("{}", serde_json::json!({ "error": message }));
            }
            eprintln!("snapfork: error: {message}");
            1
        }
    }
}

/// A progress bar on stderr when it is a terminal (and `--json` is off); hidden otherwise.
pub fn progress(global: &Global, len: u64, what: &str) -> ProgressBar {
    if global.json || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg:>12} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}
