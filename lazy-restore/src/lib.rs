//! Lazy restore of guest memory from the snapfork store, over userfaultfd.
//!
//! A restored VM maps its memory empty and registers it with userfaultfd; this crate serves each
//! page the first time the guest (or KVM on its behalf) touches it: zero pages with
//! `UFFDIO_ZEROPAGE`, everything else read from the store, verified, and installed with
//! `UFFDIO_COPY`. It speaks Firecracker's UFFD handshake ([`server::UffdServer`]), serves many
//! VMs at once with one shared cache of decompressed pages per snapshot
//! ([`source::CachedSource`]), records the order in which pages were faulted (the working set,
//! [`workingset`]) and prefetches it on later restores while the guest runs.
//!
//! Layers, bottom up: [`uffd`] (raw ioctls on a possibly foreign userfaultfd), [`source`] (where
//! pages come from), [`restore`] (serving one userfaultfd), [`handshake`] + [`server`] (the
//! Firecracker-facing socket), [`journal`] (handing a VM over to a new server process),
//! [`client`] (Firecracker's side, for tests and benchmarks).

pub mod bitmap;
pub mod client;
mod error;
pub mod handshake;
pub mod journal;
pub mod restore;
pub mod server;
pub mod source;
pub mod uffd;
pub mod workingset;

pub use error::{Error, Result};
pub use restore::{
    CorruptPolicy, EndReason, Peer, Region, RestoreHandle, RestoreOptions, RestoreReport, RestoreStopper, StatsSnapshot,
};
pub use server::{ServerEvent, ServerOptions, ServerSummary, UffdServer, WORKING_SET_WINDOW};
pub use source::{CachedSource, PageSource, RawFileSource, SharedSources, StoreSource};
