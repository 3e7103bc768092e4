//! `snapfork`: checkpoint, fork, revert and restore sandbox state.
//!
//! A thin layer over the library crates: it parses arguments, opens the store, calls one library
//! function per command and prints the result, as a human-readable line or (with `--json`) as one
//! JSON object for agents.

mod daemon;
mod demo;
mod fs_cmds;
mod output;
mod sandbox_cmds;
mod store_cmds;
mod uffd_cmds;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// Options every command takes.
#[derive(clap::Args, Debug, Clone)]
pub struct Global {
    /// The store directory.
    #[arg(long, global = true, env = "SNAPFORK_STORE", default_value = ".snapfork")]
    pub store: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// How long to wait for another process that holds the store, in seconds.
    #[arg(long, global = true, default_value_t = 30.0)]
    pub lock_timeout: f64,
    /// A host directory that snapshots imported from bundles may show their sandboxes (as a
    /// gVisor rootfs or read-only mount); repeat for more. The store's own busybox rootfs is
    /// always trusted. For a daemon, what counts is the daemon's own flag.
    #[arg(
        long = "trust-host-dir",
        value_name = "DIR",
        global = true,
        env = "SNAPFORK_TRUST_HOST_DIRS",
        value_delimiter = ':'
    )]
    pub trust_host_dirs: Vec<PathBuf>,
    /// Restore Firecracker snapshots imported from bundles: their VM state names the host
    /// files (disks) the VM opens, as whoever made the bundle chose. Only for bundles from a
    /// source you trust. For a daemon, what counts is the daemon's own flag.
    #[arg(long, global = true, env = "SNAPFORK_TRUST_IMPORTED_VM_STATE")]
    pub trust_imported_vm_state: bool,
}

impl Global {
    /// The lock timeout as a `Duration`.
    pub fn lock_timeout(&self) -> Duration {
        seconds(self.lock_timeout)
    }
}

#[derive(Parser, Debug)]
#[command(name = "snapfork", version, about = "Snapshot and fork engine for sandbox state")]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    #[command(flatten)]
    Store(store_cmds::StoreCmd),
    #[command(flatten)]
    Engine(sandbox_cmds::EngineCmd),
    #[command(flatten)]
    Fs(fs_cmds::FsCmd),
    #[command(flatten)]
    Uffd(uffd_cmds::UffdCmd),
}

/// `secs` seconds as a `Duration`: negative and NaN count as 0, and anything over ten years
/// (`inf`, `1e30`) as ten years, "forever", which deadlines computed from it can still hold.
pub fn seconds(secs: f64) -> Duration {
    const FOREVER: Duration = Duration::from_secs(10 * 365 * 86_400);
    Duration::try_from_secs_f64(secs.max(0.0)).map_or(FOREVER, |d| d.min(FOREVER))
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // Help and version print as clap prints them; a usage error is one line (an object with
        // --json, for agents) and exit status 2.
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let rendered = e.to_string();
            let first = rendered.lines().next().unwrap_or("invalid arguments").trim_start_matches("error: ");
            if std::env::args().any(|a| a == "--json") {
                println!("{}", serde_json::json!({ "error": first }));
            }
            eprintln!("snapfork: error: {first} (see snapfork --help)");
            std::process::exit(2);
        }
    };
    output::init_tracing();
    let result = match cli.command {
        Command::Store(cmd) => store_cmds::run(cmd, &cli.global),
        Command::Engine(cmd) => sandbox_cmds::run_top(cmd, &cli.global),
        Command::Fs(cmd) => fs_cmds::run(cmd, &cli.global),
        Command::Uffd(cmd) => uffd_cmds::run(cmd, &cli.global),
    };
    std::process::exit(output::finish(result, &cli.global));
}
