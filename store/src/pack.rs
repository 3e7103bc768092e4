//! Pack files: append-only files of compressed chunks.
//!
//! A pack starts with a 16-byte file header; then records, each a 48-byte header (magic, codec,
//! kind, lengths and the chunk's id) followed by its payload. The id in the header lets gc and
//! repair tools read a pack without the index. A transaction appends to packs of its own and
//! makes them durable (fdatasync, plus an fsync of the directory for a new file) before the index
//! points into them, so the index never names bytes that a crash could lose.
//!
//! An *adopted* pack is a file taken over whole (`Txn::adopt_file_as_blobs`): no file header
//! and no record headers, only raw chunk payloads that the index alone locates. gc treats it
//! like any other pack (its chunks are found through the index).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use crate::error::{Error, IoContext, Result};
use crate::hash::Hash;

/// The 16 bytes at the start of every pack.
pub const FILE_MAGIC: &[u8; 16] = b"SNAPFORK-PACK-1\n";
/// The 4 bytes at the start of every record.
pub const RECORD_MAGIC: &[u8; 4] = b"SFR1";
/// A record header's length.
pub const RECORD_HEADER: u64 = 48;
/// A transaction starts a new pack once its current one passes this size.
pub const MAX_PACK_BYTES: u64 = 512 << 20;

/// How a chunk's payload is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Codec {
    /// Stored as is (compression did not pay).
    Raw = 0,
    /// One zstd frame.
    Zstd = 1,
}

impl Codec {
    pub(crate) fn from_u8(v: u8) -> Option<Codec> {
        match v {
            0 => Some(Codec::Raw),
            1 => Some(Codec::Zstd),
            _ => None,
        }
    }
}

/// Where a chunk lives: what the index maps an id to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    /// A node (followed by gc) or plain data.
    pub is_node: bool,
    /// How the payload is encoded.
    pub codec: Codec,
    /// The pack's number.
    pub pack: u32,
    /// Offset of the payload (after the record header) in the pack.
    pub offset: u64,
    /// Payload length as stored.
    pub stored_len: u32,
    /// Length of the uncompressed chunk.
    pub raw_len: u32,
}

impl Location {
    /// Encoded length in the index.
    pub const LEN: usize = 22;

    /// The index value.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[0] = u8::from(self.is_node);
        out[1] = self.codec as u8;
        out[2..6].copy_from_slice(&self.pack.to_le_bytes());
        out[6..14].copy_from_slice(&self.offset.to_le_bytes());
        out[14..18].copy_from_slice(&self.stored_len.to_le_bytes());
        out[18..22].copy_from_slice(&self.raw_len.to_le_bytes());
        out
    }

    /// Parses an index value.
    pub fn decode(v: &[u8]) -> Option<Location> {
        if v.len() != Self::LEN || v[0] > 1 {
            return None;
        }
        Some(Location {
            is_node: v[0] == 1,
            codec: Codec::from_u8(v[1])?,
            pack: u32::from_le_bytes(v[2..6].try_into().ok()?),
            offset: u64::from_le_bytes(v[6..14].try_into().ok()?),
            stored_len: u32::from_le_bytes(v[14..18].try_into().ok()?),
            raw_len: u32::from_le_bytes(v[18..22].try_into().ok()?),
        })
    }
}

/// The path of pack `n` in `dir`.
pub fn pack_path(dir: &Path, n: u32) -> PathBuf {
    dir.join(format!("pack-{n:08}.sfp"))
}

/// Parses a pack file name back to its number.
pub fn parse_pack_name(name: &str) -> Option<u32> {
    name.strip_prefix("pack-")?.strip_suffix(".sfp")?.parse().ok()
}

/// Encodes a record header.
pub fn record_header(id: &Hash, is_node: bool, codec: Codec, raw_len: u32, stored_len: u32) -> [u8; 48] {
    let mut h = [0u8; 48];
    h[..4].copy_from_slice(RECORD_MAGIC);
    h[4] = codec as u8;
    h[5] = u8::from(is_node);
    h[8..12].copy_from_slice(&raw_len.to_le_bytes());
    h[12..16].copy_from_slice(&stored_len.to_le_bytes());
    h[16..48].copy_from_slice(id.as_bytes());
    h
}

/// A writer hands the kernel its pack bytes for writeback every this many bytes, so that the
/// fdatasync at commit finds little left to write.
const WRITEBACK_STEP: u64 = 8 << 20;

/// One pack being appended to by one writer.
pub struct PackWriter {
    /// The pack's number.
    pub number: u32,
    path: PathBuf,
    out: BufWriter<File>,
    len: u64,
    /// Bytes already handed to the kernel for writeback.
    written_back: u64,
    /// Bytes of the filesystem the writer leaves free (checked every [`WRITEBACK_STEP`]).
    reserve: u64,
}

impl PackWriter {
    /// Creates pack `number` in `dir`; fails if it exists, or with [`Error::Full`] once fewer
    /// than `reserve` bytes of the filesystem are free (checked now and every 8 MiB written).
    pub fn create(dir: &Path, number: u32, reserve: u64) -> Result<PackWriter> {
        check_free(dir, reserve)?;
        let path = pack_path(dir, number);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .ctx(|| format!("create pack {}", path.display()))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(FILE_MAGIC).ctx(|| format!("write {}", path.display()))?;
        Ok(PackWriter { number, path, out, len: FILE_MAGIC.len() as u64, written_back: 0, reserve })
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when nothing but the header was written.
    pub fn is_empty(&self) -> bool {
        self.len == FILE_MAGIC.len() as u64
    }

    /// Appends one record; returns where its payload lives.
    pub fn append(&mut self, id: &Hash, is_node: bool, codec: Codec, raw_len: u32, payload: &[u8]) -> Result<Location> {
        let stored_len = payload.len() as u32;
        let header = record_header(id, is_node, codec, raw_len, stored_len);
        self.out
            .write_all(&header)
            .and_then(|()| self.out.write_all(payload))
            .ctx(|| format!("write {}", self.path.display()))?;
        let offset = self.len + RECORD_HEADER;
        self.len = offset + u64::from(stored_len);
        if self.len - self.written_back >= WRITEBACK_STEP {
            self.start_writeback()?;
        }
        Ok(Location { is_node, codec, pack: self.number, offset, stored_len, raw_len })
    }

    /// Starts (without waiting for) writeback of what was appended since the last call: the
    /// disk then writes while ingest goes on, rather than all at once in [`PackWriter::sync`].
    fn start_writeback(&mut self) -> Result<()> {
        self.out.flush().ctx(|| format!("write {}", self.path.display()))?;
        let fd = self.out.get_ref().as_raw_fd();
        let (from, len) = (self.written_back as i64, (self.len - self.written_back) as i64);
        // SAFETY: `fd` is the pack file this writer owns, open for the whole call; the call only
        // starts writeback of that range and touches no memory of ours.
        let rc = unsafe { libc::sync_file_range(fd, from, len, libc::SYNC_FILE_RANGE_WRITE) };
        if rc != 0 {
            // Only an optimisation: sync() still makes everything durable.
            tracing::debug!("sync_file_range on {}: {}", self.path.display(), std::io::Error::last_os_error());
        }
        self.written_back = self.len;
        check_free(&self.path, self.reserve)
    }

    /// Flushes and fdatasyncs the pack: after this, its records survive a crash.
    pub fn sync(&mut self) -> Result<()> {
        self.out.flush().ctx(|| format!("flush {}", self.path.display()))?;
        self.out.get_ref().sync_data().ctx(|| format!("fdatasync {}", self.path.display()))
    }
}

/// Fails with [`Error::Full`] when fewer than `reserve` bytes are free on the filesystem of
/// `path`.
pub(crate) fn check_free(path: &Path, reserve: u64) -> Result<()> {
    if reserve == 0 {
        return Ok(());
    }
    let free = free_bytes(path)?;
    if free < reserve {
        return Err(Error::Full { path: path.to_path_buf(), free, reserve });
    }
    Ok(())
}

/// Bytes an unprivileged writer may still use on the filesystem of `path`.
pub fn free_bytes(path: &Path) -> Result<u64> {
    let vfs = nix::sys::statvfs::statvfs(path)
        .map_err(|e| Error::Io { context: format!("statvfs {}", path.display()), source: e.into() })?;
    Ok(vfs.blocks_available() as u64 * vfs.fragment_size() as u64)
}

/// Open pack files, shared by all readers.
#[derive(Default)]
pub struct PackFiles {
    dir: PathBuf,
    open: RwLock<HashMap<u32, Arc<File>>>,
}

impl PackFiles {
    /// Pack files of `dir`.
    pub fn new(dir: PathBuf) -> PackFiles {
        PackFiles { dir, open: RwLock::default() }
    }

    /// The open file of pack `n`.
    pub fn get(&self, n: u32) -> Result<Arc<File>> {
        if let Some(f) = self.open.read().unwrap_or_else(|e| e.into_inner()).get(&n) {
            return Ok(f.clone());
        }
        let path = pack_path(&self.dir, n);
        let file = Arc::new(File::open(&path).ctx(|| format!("open pack {}", path.display()))?);
        self.open.write().unwrap_or_else(|e| e.into_inner()).insert(n, file.clone());
        Ok(file)
    }

    /// Forgets pack `n` (after gc removed it).
    pub fn forget(&self, n: u32) {
        self.open.write().unwrap_or_else(|e| e.into_inner()).remove(&n);
    }

    /// Closes every pack (a reader whose view of the index moved on).
    pub fn forget_all(&self) {
        self.open.write().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Reads `len` bytes at `offset` of pack `n` into `buf`.
    pub fn read_at(&self, n: u32, offset: u64, buf: &mut [u8]) -> Result<()> {
        let file = self.get(n)?;
        file.read_exact_at(buf, offset).ctx(|| format!("read pack {n} at {offset}"))
    }
}
