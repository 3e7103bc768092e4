//! The snapfork store: content-addressed, deduplicating, verifiable storage for sandbox state.
//!
//! - **Images** (VM memory, raw disks) are stored page by page: all-zero pages cost nothing,
//!   every other page is keyed by the blake3 of its bytes, stored once across all images and
//!   zstd-compressed where that pays ([`image`]).
//! - **Blobs** (VMM state, runtime checkpoint files) are stored with content-defined chunking
//!   ([`blob`]).
//! - **Nodes** are manifests with explicit links, for any higher-level structure ([`node`]).
//! - **File objects** are whole files kept in the store's object directory, for reflink-based
//!   workspace checkpoints.
//!
//! Data lives in append-only pack files; the index (RocksDB) maps ids to pack locations, refs to
//! ids. Writes go through a [`Txn`]: pack data is made durable before one synced index batch
//! commits it, so a crash at any instant leaves a consistent store. Every read re-hashes what it
//! read: corruption is an error naming the image and page, never wrong data.
//!
//! ```no_run
//! use snapfork_store::{IngestOptions, OpenOptions, Store};
//! let store = Store::open("/var/lib/snapfork", OpenOptions::default())?;
//! let info = store.ingest_image("vm.mem".as_ref(), &IngestOptions::default(), Some("vm/base"))?;
//! let image = store.open_image(&info.id)?;
//! let mut page = vec![0u8; image.page_size() as usize];
//! image.read_page(42, &mut page)?;
//! # Ok::<(), snapfork_store::Error>(())
//! ```

pub mod blob;
mod device;
mod error;
pub mod gc;
mod hash;
pub mod image;
mod lock;
pub mod node;
pub mod pack;
mod pageset;
mod stats;
mod store;
mod txn;
mod verify;

pub use blob::BlobInfo;
pub use error::{Error, Result};
pub use gc::{ATTACHED, GcOptions, GcReport, attached_name};
pub use hash::Hash;
pub use image::{ImageInfo, ImageReader, IngestOptions, Progress, is_zero};
pub use node::Node;
pub use pack::free_bytes;
pub use pageset::{PageSet, parse_page_list};
pub use stats::{RefStats, StoreStats, Totals};
pub use store::{MIN_FREE_BYTES, OpenOptions, Store};
pub use txn::{Txn, validate_ref_name};
pub use verify::{Damage, VerifyReport};
