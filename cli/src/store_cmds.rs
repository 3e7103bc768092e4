//! Commands on the content-addressed store: ingest, cat, ls, rm, gc, verify, stats.

use clap::Subcommand;

use crate::Global;
use crate::output::Report;

/// Store commands.
#[derive(Subcommand, Debug)]
pub enum StoreCmd {}

/// Runs one store command.
pub fn run(cmd: StoreCmd, _global: &Global) -> anyhow::Result<Report> {
    match cmd {}
}
