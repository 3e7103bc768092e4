//! Firecracker's side of the UFFD handshake, byte for byte, for tests, benchmarks and diagnosis
//! (Firecracker itself cannot be installed everywhere).
//!
//! Like Firecracker (src/vmm/src/persist.rs): the userfaultfd comes from /dev/userfaultfd,
//! close-on-exec, non-blocking, not user-mode-only (faults taken by KVM are delivered), with
//! UFFD_FEATURE_EVENT_REMOVE required; each region is an anonymous MAP_PRIVATE mapping (hugetlb
//! for 2 MiB pages) registered in MISSING mode *before* connecting; then one `sendmsg` carries
//! the compact JSON array and the descriptor(s) in SCM_RIGHTS, and the connection stays open.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Instant;

use userfaultfd::{FeatureFlags, Uffd, UffdBuilder};

use crate::restore::HUGE_PAGE;
use crate::{Error, Result};

/// Which Firecracker release's message to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// 1.1 to 1.6: no page size field.
    V1_1,
    /// 1.7 to 1.11: `page_size_kib` (holding bytes).
    V1_7,
    /// 1.12 and later: `page_size` and the deprecated `page_size_kib`.
    V1_12,
    /// Unreleased branches: extra fields (and possibly extra descriptors).
    Future,
}

/// A region to map: its size, position in the memory file and page size.
#[derive(Debug, Clone, Copy)]
pub struct RegionSpec {
    /// Bytes.
    pub size: u64,
    /// Offset in the memory file.
    pub offset: u64,
    /// 4096 or 2 MiB.
    pub page_size: u64,
}

/// One mapped, registered region.
#[derive(Debug)]
pub struct Mapped {
    /// Start address.
    pub ptr: *mut u8,
    /// The spec it was made from.
    pub spec: RegionSpec,
}

/// A fake VMM: registered guest memory, and (after [`FakeVm::connect`]) the handshake sent.
pub struct FakeVm {
    /// The userfaultfd (a copy goes to the server).
    pub uffd: Uffd,
    /// The regions, in spec order.
    pub regions: Vec<Mapped>,
    /// The connection, kept open like Firecracker 1.12+.
    pub stream: Option<UnixStream>,
    /// Time spent creating, mapping and registering.
    pub setup_ns: u64,
}

// SAFETY: the raw pointers are addresses of mappings owned by the FakeVm for its whole life.
unsafe impl Send for FakeVm {}

/// Firecracker's userfaultfd: /dev/userfaultfd, cloexec, non-blocking, EVENT_REMOVE.
pub fn firecracker_uffd() -> Result<Uffd> {
    UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(true)
        .user_mode_only(false)
        .require_features(FeatureFlags::EVENT_REMOVE)
        .create()
        .map_err(|e| Error::Invalid(format!("create userfaultfd: {e}")))
}

/// Anonymous private memory (hugetlb for 2 MiB pages), reserved but not populated.
pub fn map_anonymous(size: u64, page_size: u64) -> Result<*mut u8> {
    let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    if page_size == HUGE_PAGE {
        flags |= libc::MAP_HUGETLB | libc::MAP_HUGE_2MB;
    }
    // SAFETY: a fresh anonymous mapping at an address the kernel picks.
    let ptr =
        unsafe { libc::mmap(std::ptr::null_mut(), size as usize, libc::PROT_READ | libc::PROT_WRITE, flags, -1, 0) };
    if ptr == libc::MAP_FAILED {
        return Err(Error::last_os(format!("mmap {size} bytes")));
    }
    Ok(ptr.cast())
}

impl FakeVm {
    /// Creates the userfaultfd and maps and registers every region.
    pub fn new(specs: &[RegionSpec]) -> Result<Self> {
        let t0 = Instant::now();
        let uffd = firecracker_uffd()?;
        let mut regions: Vec<Mapped> = Vec::new();
        let mut vm = FakeVm { uffd, regions: Vec::new(), stream: None, setup_ns: 0 };
        for spec in specs {
            let ptr = map_anonymous(spec.size, spec.page_size)?;
            regions.push(Mapped { ptr, spec: *spec });
            vm.uffd
                .register(ptr.cast(), spec.size as usize)
                .map_err(|e| Error::Invalid(format!("UFFDIO_REGISTER: {e}")))?;
        }
        vm.regions = regions;
        vm.setup_ns = t0.elapsed().as_nanos() as u64;
        Ok(vm)
    }

    /// The JSON Firecracker would send for these regions.
    pub fn handshake_json(&self, shape: Shape) -> String {
        let items: Vec<String> = self
            .regions
            .iter()
            .map(|m| {
                let (base, size, offset, ps) = (
                    m.ptr as u64,
                    m.spec.size,
                    m.spec.offset,
                    m.spec.page_size,
                );
                // Field order and compact form as serde_json prints Firecracker's struct.
                match shape {
                    Shape::V1_1 => format!(
                        r#"{{"base_host_virt_addr":{base},"size":{size},"offset":{offset}}}"#
                    ),
                    Shape::V1_7 => format!(
                        r#"{{"base_host_virt_addr":{base},"size":{size},"offset":{offset},"page_size_kib":{ps}}}"#
                    ),
                    Shape::V1_12 => format!(
                        r#"{{"base_host_virt_addr":{base},"size":{size},"offset":{offset},"page_size":{ps},"page_size_kib":{ps}}}"#
                    ),
                    Shape::Future => format!(
                        r#"{{"base_host_virt_addr":{base},"size":{size},"offset":{offset},"page_size":{ps},"page_size_kib":{ps},"slot":0,"plugged":true,"memfd_offset":{offset}}}"#
                    ),
                }
            })
            .collect();
        format!("[{}]", items.join(","))
    }

    /// Connects to `socket` and sends the handshake with `extra_fds` after the userfaultfd.
    pub fn connect(&mut self, socket: &Path, shape: Shape, extra_fds: &[RawFd]) -> Result<()> {
        let stream = UnixStream::connect(socket).map_err(|e| Error::io(format!("connect {}", socket.display()), e))?;
        let body = self.handshake_json(shape);
        let mut fds = vec![self.uffd.as_raw_fd()];
        fds.extend_from_slice(extra_fds);
        send_with_fds(&stream, body.as_bytes(), &fds)?;
        self.stream = Some(stream);
        Ok(())
    }

    /// The bytes of region `i`.
    ///
    /// Reading them faults the pages in through the server.
    pub fn region(&self, i: usize) -> &[u8] {
        let m = &self.regions[i];
        // SAFETY: the mapping is `size` bytes, readable, and lives as long as `self`.
        unsafe { std::slice::from_raw_parts(m.ptr, m.spec.size as usize) }
    }

    /// The bytes of region `i`, writable (a guest write). Touching them faults the pages in.
    pub fn region_mut(&mut self, i: usize) -> &mut [u8] {
        let m = &self.regions[i];
        // SAFETY: the mapping is `size` bytes, writable, lives as long as `self`, and the
        // exclusive borrow of `self` keeps any other slice of it from existing meanwhile.
        unsafe { std::slice::from_raw_parts_mut(m.ptr, m.spec.size as usize) }
    }
}

impl Drop for FakeVm {
    fn drop(&mut self) {
        for m in &self.regions {
            // SAFETY: unmapping exactly the mapping we created.
            unsafe { libc::munmap(m.ptr.cast(), m.spec.size as usize) };
        }
    }
}

/// One `sendmsg` of `data` with `fds` in SCM_RIGHTS (what Firecracker's `send_with_fds` does).
pub fn send_with_fds(stream: &UnixStream, data: &[u8], fds: &[RawFd]) -> Result<()> {
    let fd_bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() };
    // SAFETY: zeroed msghdr is valid; the fields are filled below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer has room for one header with `fds.len()` descriptors.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
            std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(c), fd_bytes);
        }
    }
    // SAFETY: `msg` refers to live buffers for the duration of the call.
    let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, 0) };
    if n < 0 {
        return Err(Error::last_os("sendmsg"));
    }
    if n as usize != data.len() {
        return Err(Error::Invalid(format!("sendmsg sent {n} of {} bytes", data.len())));
    }
    Ok(())
}

/// Reads one byte of each listed page (offsets in bytes from `base`), returning the time each
/// first access took in nanoseconds: what a guest feels.
///
/// # Safety
/// `base + off` must be readable for every `off` in `offsets`.
pub unsafe fn touch(base: *const u8, offsets: &[u64]) -> (Vec<u32>, u64) {
    let mut lat = Vec::with_capacity(offsets.len());
    let mut sum = 0u64;
    for &off in offsets {
        let t = Instant::now();
        // SAFETY: the caller guarantees the address is readable; volatile so it is not elided.
        let v = unsafe { std::ptr::read_volatile(base.add(off as usize)) };
        lat.push(t.elapsed().as_nanos().min(u32::MAX as u128) as u32);
        sum = sum.wrapping_add(v as u64);
    }
    (lat, sum)
}
