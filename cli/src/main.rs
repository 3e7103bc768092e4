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
}

impl Global {
    /// The lock timeout as a `Duration`.
    pub fn lock_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.lock_timeout.max(0.0))
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

fn main() {
    let cli = Cli::parse();
    output::init_tracing();
    let result = match cli.command {
        Command::Store(cmd) => store_cmds::run(cmd, &cli.global),
        Command::Engine(cmd) => sandbox_cmds::run_top(cmd, &cli.global),
        Command::Fs(cmd) => fs_cmds::run(cmd, &cli.global),
        Command::Uffd(cmd) => uffd_cmds::run(cmd, &cli.global),
    };
    std::process::exit(output::finish(result, &cli.global));
}
