//! snapfork-engine: sandbox snapshots in one history tree, driving real runtimes.
//!
//! A sandbox is a running (or stopped) runtime instance plus a workspace directory. A snapshot
//! ties together everything needed to bring it back: memory images, runtime state blobs, disk
//! images and a workspace checkpoint, with its parent, message, labels, time, driver and driver
//! configuration. Snapshots are store nodes ([`model::KIND_SNAPSHOT`]) whose links are the parent
//! and every part, so they form one tree that the store's gc and verify walk like any other
//! object. Refs name sandbox heads (`sandbox/NAME`), tags (`tag/T`) and keep every snapshot a
//! sandbox took (`snap/NAME/ID`) until the sandbox is removed.
//!
//! Drivers: [`gvisor`] (Debian's runsc: `runsc checkpoint`/`restore` around a workspace
//! checkpoint taken while the sandbox is paused) and [`raw`] (files of any VMM). Workspaces go
//! through fsfork ([`workspace`]); runsc's checkpoint image is stored as a content-defined-chunked
//! blob. Bundles ([`bundle`]) move one snapshot between stores, verified object by object.

pub mod bundle;
pub mod engine;
pub mod error;
pub mod firecracker;
pub mod gvisor;
pub mod model;
pub mod raw;
pub mod runsc;
mod vmnet;
pub mod workspace;

pub use engine::{
    AdoptedVm, CheckpointOptions, CheckpointReport, DriverConfig, Engine, EngineOptions, ExecReport, Log, LogEntry,
    MAX_EXEC_OUTPUT, RunSpec, SandboxInfo, SnapshotDiff, Timings, UFFD_IDLE,
};
pub use error::{Error, Result};
pub use firecracker::FirecrackerConfig;
pub use gvisor::GvisorConfig;
pub use model::{Snapshot, SnapshotBody, Status};
pub use raw::RawConfig;

/// The tokio runtime the engine runs on, re-exported for callers without their own dependency.
pub use tokio;
