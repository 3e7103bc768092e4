//! Firecracker's UFFD handshake: one message on a fresh AF_UNIX stream connection, a JSON array
//! of regions with the userfaultfd in SCM_RIGHTS.
//!
//! Accepted shapes: 1.1-1.6 (no page size), 1.7-1.11 (`page_size_kib`, which holds bytes),
//! 1.12+ (`page_size` and the deprecated `page_size_kib`), unknown extra fields, 1 to 3
//! descriptors (one of them the userfaultfd), messages of any size up to [`MAX_MESSAGE`] even if
//! the kernel splits them across reads. Anything else is refused with a precise error.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::restore::{HUGE_PAGE, Region};
use crate::uffd;
use crate::{Error, Result};

/// Largest handshake accepted (Firecracker sends ~130 bytes per region).
pub const MAX_MESSAGE: usize = 1 << 20;
/// Most descriptors accepted in the message.
pub const MAX_FDS: usize = 3;

/// One element of the array, as Firecracker's `GuestRegionUffdMapping` serialises it.
#[derive(Debug, Deserialize)]
struct FcRegion {
    base_host_virt_addr: u64,
    size: u64,
    offset: u64,
    #[serde(default)]
    page_size: Option<u64>,
    #[serde(default)]
    page_size_kib: Option<u64>,
}

/// Parses the JSON array of regions (exact: one array, nothing but whitespace after it).
pub fn parse_regions(msg: &[u8]) -> Result<Vec<Region>> {
    let text = std::str::from_utf8(msg).map_err(|e| Error::Handshake(format!("message is not UTF-8: {e}")))?;
    let mut de = serde_json::Deserializer::from_str(text);
    let raw: Vec<FcRegion> = serde::Deserialize::deserialize(&mut de)
        .map_err(|e| Error::Handshake(format!("not a JSON array of regions: {e}")))?;
    de.end().map_err(|e| Error::Handshake(format!("trailing bytes after the region array: {e}")))?;
    if raw.is_empty() {
        return Err(Error::Handshake("empty region array".into()));
    }
    raw.into_iter()
        .enumerate()
        .map(|(i, r)| {
            let norm = |v: u64| {
                // The field named _kib has always held bytes; tolerate a true KiB value too.
                if v == 4 || v == 2048 { v * 1024 } else { v }
            };
            let page_size = match (r.page_size, r.page_size_kib.map(norm)) {
                (Some(a), Some(b)) if a != b => {
                    return Err(Error::Handshake(format!("region {i}: page_size {a} and page_size_kib {b} disagree")));
                }
                (Some(a), _) => a,
                (None, Some(b)) => b,
                (None, None) => 4096,
            };
            if page_size != 4096 && page_size != HUGE_PAGE {
                return Err(Error::Handshake(format!("region {i}: unsupported page size {page_size}")));
            }
            Ok(Region { base: r.base_host_virt_addr, size: r.size, offset: r.offset, page_size })
        })
        .collect()
}

/// The credentials of the connected peer (SO_PEERCRED).
#[derive(Debug, Clone, Copy)]
pub struct PeerCred {
    /// Process id (0 when the peer is in another pid namespace).
    pub pid: i32,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

/// SO_PEERCRED of a connected AF_UNIX socket.
pub fn peer_cred(stream: &UnixStream) -> Result<PeerCred> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of the sizes given.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(Error::last_os("getsockopt(SO_PEERCRED)"));
    }
    Ok(PeerCred { pid: cred.pid, uid: cred.uid, gid: cred.gid })
}

/// A received handshake.
#[derive(Debug)]
pub struct Handshake {
    /// The regions, in message order.
    pub regions: Vec<Region>,
    /// The userfaultfd.
    pub uffd: OwnedFd,
    /// How many descriptors came with the message.
    pub fds: usize,
    /// Message length in bytes.
    pub bytes: usize,
}

/// Receives and parses the handshake, waiting at most `timeout` for all of it.
pub fn receive(stream: &UnixStream, timeout: Duration) -> Result<Handshake> {
    let deadline = Instant::now() + timeout;
    let mut data: Vec<u8> = Vec::new();
    let mut fds: Vec<OwnedFd> = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    let mut end = ValueEnd::default();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::Handshake(format!("timed out after {timeout:?} with {} bytes received", data.len())));
        }
        wait_readable(stream, left)?;
        let first = data.is_empty();
        let had = fds.len();
        let n = recv_with_fds(stream, &mut chunk, &mut fds)?;
        // Refused as soon as they arrive: a peer sending descriptors with every byte would
        // otherwise fill the server's descriptor table (and starve every other VM) before its
        // message ends. Firecracker sends them once, with the start of its one message.
        if fds.len() > MAX_FDS {
            return Err(Error::Handshake(format!("{} file descriptors (at most {MAX_FDS} accepted)", fds.len())));
        }
        if !first && fds.len() > had {
            return Err(Error::Handshake("file descriptors after the start of the message".into()));
        }
        if n == 0 {
            if data.is_empty() {
                return Err(Error::Handshake("connection closed before the handshake".into()));
            }
            // Closed after a partial message: parse what we have, which fails precisely.
            break;
        }
        data.extend_from_slice(&chunk[..n]);
        if data.len() > MAX_MESSAGE {
            return Err(Error::Handshake(format!("message larger than {MAX_MESSAGE} bytes")));
        }
        // Complete once the JSON value is; an unfinished value means more is in flight. Only
        // the new bytes are scanned for the value's end, and the message is parsed once it
        // ends: a peer sending a byte at a time costs linear work, not a parse per byte.
        if !end.feed(&chunk[..n]) {
            continue;
        }
        match serde_json::from_slice::<serde::de::IgnoredAny>(&data) {
            Ok(_) => break,
            Err(e) if e.is_eof() => continue,
            Err(_) => break,
        }
    }
    let regions = parse_regions(&data)?;
    if fds.is_empty() {
        return Err(Error::Handshake("no file descriptor in the message".into()));
    }
    if fds.len() > MAX_FDS {
        return Err(Error::Handshake(format!("{} file descriptors (at most {MAX_FDS} accepted)", fds.len())));
    }
    let nfds = fds.len();
    let Some(pos) = fds.iter().position(|f| uffd::is_userfaultfd(f.as_fd())) else {
        return Err(Error::Handshake("none of the descriptors is a userfaultfd".into()));
    };
    let uffd = fds.swap_remove(pos);
    // Without REMOVE events a range the guest gives back (balloon, MADV_DONTNEED) is zapped
    // silently, and its next fault would be served the snapshot's old bytes instead of zeros.
    match uffd::enabled_features(uffd.as_fd()) {
        // Events this server does not follow: a forked child's faults (and its userfaultfd,
        // installed in the reader by each fork event) or a region moved by mremap would be
        // left waiting forever.
        Some(f) if f & (uffd::FEATURE_EVENT_FORK | uffd::FEATURE_EVENT_REMAP) != 0 => {
            return Err(Error::Handshake(format!(
                "the userfaultfd asks for fork or remap events (features {f:#x}), which this server does not follow"
            )));
        }
        Some(f) if f & uffd::FEATURE_EVENT_REMOVE != 0 => {}
        Some(f) => {
            return Err(Error::Handshake(format!(
                "the userfaultfd was created without UFFD_FEATURE_EVENT_REMOVE (features {f:#x}): \
                 pages the guest gives back could be served stale"
            )));
        }
        None => return Err(Error::Handshake("cannot read the userfaultfd's features from /proc".into())),
    }
    Ok(Handshake { regions, uffd, fds: nfds, bytes: data.len() })
}

/// Finds where a JSON text's top-level array or object ends, fed a piece at a time.
#[derive(Default)]
struct ValueEnd {
    depth: u32,
    in_string: bool,
    escaped: bool,
}

impl ValueEnd {
    /// True once the top-level value has closed, or the text cannot be one (anything else at
    /// the top level): either way the parser has the last word.
    fn feed(&mut self, bytes: &[u8]) -> bool {
        for &b in bytes {
            if self.in_string {
                match (self.escaped, b) {
                    (true, _) => self.escaped = false,
                    (false, b'\\') => self.escaped = true,
                    (false, b'"') => self.in_string = false,
                    _ => {}
                }
                continue;
            }
            match b {
                b'[' | b'{' => self.depth += 1,
                b']' | b'}' if self.depth <= 1 => return true,
                b']' | b'}' => self.depth -= 1,
                b'"' if self.depth > 0 => self.in_string = true,
                b if b.is_ascii_whitespace() => {}
                _ if self.depth == 0 => return true,
                _ => {}
            }
        }
        false
    }
}

fn wait_readable(stream: &UnixStream, left: Duration) -> Result<()> {
    let mut pfd = libc::pollfd { fd: stream.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
    loop {
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(Error::io("poll", e));
        }
        if n == 0 {
            return Err(Error::Handshake(format!("no handshake within {left:?}")));
        }
        return Ok(());
    }
}

/// One recvmsg: data into `buf`, any SCM_RIGHTS descriptors appended to `fds` (close-on-exec).
/// Room is made for more descriptors than accepted, so "too many" is reported as such.
fn recv_with_fds(stream: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> Result<usize> {
    const ROOM: usize = 16;
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE((ROOM * std::mem::size_of::<libc::c_int>()) as u32) };
    let mut cbuf = vec![0u64; (space as usize).div_ceil(8)];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: zeroed msghdr is a valid "empty" header; fields are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    let n = loop {
        // SAFETY: `msg` points to a valid iovec and control buffer that outlive the call.
        let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(Error::io("recvmsg", e));
        }
        break n as usize;
    };
    // Take ownership of every descriptor first, so they are closed on any error below.
    // SAFETY: walking the control buffer the kernel filled, with the libc CMSG helpers.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c) as *const libc::c_int;
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<libc::c_int>();
                for i in 0..count {
                    let fd = std::ptr::read_unaligned(data.add(i));
                    // SAFETY: SCM_RIGHTS installed this descriptor in our table for us.
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(Error::Handshake(format!("more than {ROOM} file descriptors (control data truncated)")));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_released_shape_parses() {
        let v11 = br#"[{"base_host_virt_addr":4096,"size":8192,"offset":0}]"#;
        let v17 = br#"[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size_kib":4096}]"#;
        let v112 = br#"[{"base_host_virt_addr":2097152,"size":4194304,"offset":0,"page_size":2097152,"page_size_kib":2097152}]"#;
        let extra = br#" [ {"offset":0,"size":8192,"base_host_virt_addr":4096,"slot":3,"x":{"y":[1]}} ] "#;
        for m in [&v11[..], &v17[..], &extra[..]] {
            let r = parse_regions(m).unwrap();
            assert_eq!(r[0].page_size, 4096);
            assert_eq!((r[0].base, r[0].size, r[0].offset), (4096, 8192, 0));
        }
        assert_eq!(parse_regions(v112).unwrap()[0].page_size, HUGE_PAGE);
    }

    #[test]
    fn malformed_messages_are_refused() {
        for (m, needle) in [
            (&br#"[{"base_host_virt_addr":1,"size":2}]"#[..], "missing field"),
            (br#"[{"base_host_virt_addr":1,"size":-2,"offset":0}]"#, "invalid value"),
            (br#"[]"#, "empty"),
            (
                br#"[{"base_host_virt_addr":0,"size":4096,"offset":0,"page_size":4096,"page_size_kib":2097152}]"#,
                "disagree",
            ),
            (br#"[{"base_host_virt_addr":0,"size":4096,"offset":0,"page_size":65536}]"#, "unsupported page size"),
            (br#"[{"base_host_virt_addr":0,"size":4096,"offset":0}] []"#, "trailing"),
            (b"\xff", "UTF-8"),
        ] {
            let e = parse_regions(m).unwrap_err().to_string();
            assert!(e.contains(needle), "{e} lacks {needle}");
        }
    }

    #[test]
    fn the_end_of_a_value_is_found_a_piece_at_a_time() {
        let msg = br#" [ {"a":"]\"}","b":[1,{"c":[]}]}, {"d":"\\"} ] "#;
        let last = msg.iter().rposition(|&c| c == b']').unwrap();
        for split in 1..msg.len() {
            let mut end = ValueEnd::default();
            let (a, b) = msg.split_at(split);
            let at_a = end.feed(a);
            let at_b = at_a || end.feed(b);
            // It ends exactly at the last ']', in whichever piece that is.
            assert_eq!((at_a, at_b), (split > last, true), "split at {split}");
        }
        assert!(ValueEnd::default().feed(b"garbage"));
        assert!(!ValueEnd::default().feed(b"[[[{\"x\":"));
    }

    /// Sends `data` with `fds` descriptors (copies of one of /dev/null) in one sendmsg.
    fn send_with(s: &UnixStream, data: &[u8], fds: usize) {
        let null = std::fs::File::open("/dev/null").unwrap();
        crate::client::send_with_fds(s, data, &vec![null.as_raw_fd(); fds]).unwrap();
    }

    fn open_fds() -> usize {
        std::fs::read_dir("/proc/self/fd").unwrap().count()
    }

    /// A userfaultfd that asks for fork events (each fork would hand the server the child's
    /// userfaultfd, whose faults nobody serves) is refused by name.
    #[test]
    fn a_userfaultfd_with_fork_events_is_refused() {
        use userfaultfd::{FeatureFlags, UffdBuilder};
        // SAFETY: geteuid has no preconditions (fork events need CAP_SYS_PTRACE).
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("!!!!!!!! a_userfaultfd_with_fork_events_is_refused: needs root; NOT RUN !!!!!!!!");
            assert_eq!(std::env::var("SNAPFORK_ALLOW_SKIP").as_deref(), Ok("1"), "needs root");
            return;
        }
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .require_features(FeatureFlags::EVENT_REMOVE | FeatureFlags::EVENT_FORK)
            .create()
            .unwrap();
        let (client, server) = UnixStream::pair().unwrap();
        let msg = br#"[{"base_host_virt_addr":4096,"size":8192,"offset":0}]"#;
        crate::client::send_with_fds(&client, msg, &[uffd.as_raw_fd()]).unwrap();
        let e = receive(&server, Duration::from_secs(5)).unwrap_err().to_string();
        assert!(e.contains("fork or remap"), "{e}");
    }

    /// A peer that sends descriptors with every piece of its message is refused at the first
    /// one that comes too many or too late, each closed as it comes: it cannot fill the
    /// server's descriptor table however long it keeps sending.
    #[test]
    fn descriptors_beyond_the_first_piece_are_refused_as_they_come() {
        let before = open_fds();
        for pieces in [[(&b"[{"[..], 1), (b"\"size\"", 1)], [(b"[", 3), (b"{", 2)]] {
            let (client, server) = UnixStream::pair().unwrap();
            for (data, fds) in pieces {
                send_with(&client, data, fds);
            }
            let e = receive(&server, Duration::from_secs(5)).unwrap_err().to_string();
            assert!(e.contains("file descriptors"), "{e}");
        }
        let (client, server) = UnixStream::pair().unwrap();
        send_with(&client, b"[", 4);
        let e = receive(&server, Duration::from_secs(5)).unwrap_err().to_string();
        assert!(e.contains("4 file descriptors"), "{e}");
        drop((client, server));
        assert_eq!(open_fds(), before, "descriptors a refused peer sent are still open");
    }
}
