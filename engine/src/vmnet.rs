//! A network namespace of its own for each restored Firecracker VM that has network interfaces.
//!
//! The vmstate names each interface's tap device, which a load opens by name, and a tap serves
//! one VMM at a time: of the forks of a VM with a network, all but one would fail to load (the
//! tap is busy), and the one that loads would share the original's. So such a VM's VMM starts in
//! a fresh network namespace holding a tap of each recorded name, persistent, up and unattached:
//! Firecracker's own recipe for networking clones (same names, separate namespaces). Nothing
//! else is in it, so the guest's network is isolated until the host wires that namespace
//! (`/proc/PID/ns/net`, which `ls` shows as the sandbox's `netns`), with a veth pair and NAT for
//! instance. It goes away with the VMM.

use crate::error::{Error, Result};

/// The taps a restored VMM needs, ready to be made in the child between fork and exec.
pub(crate) struct Taps {
    names: Vec<[libc::c_char; libc::IFNAMSIZ]>,
}

impl Taps {
    /// Taps named `names` (Linux interface names: 1-15 bytes, no `/`, whitespace or `:`).
    pub(crate) fn new(names: &[String]) -> Result<Taps> {
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let ok = !name.is_empty()
                && name.len() < libc::IFNAMSIZ
                && name != "."
                && name != ".."
                && name.bytes().all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
            if !ok {
                return Err(Error::Invalid(format!("bad tap device name {name:?}")));
            }
            if names.iter().filter(|n| *n == name).count() > 1 {
                return Err(Error::Invalid(format!("two network interfaces on one tap, {name}")));
            }
            let mut raw = [0 as libc::c_char; libc::IFNAMSIZ];
            for (r, b) in raw.iter_mut().zip(name.bytes()) {
                *r = b as libc::c_char;
            }
            out.push(raw);
        }
        Ok(Taps { names: out })
    }

    /// Moves the calling process into a new network namespace and makes the taps there. Runs in
    /// the child between fork and exec (`pre_exec`): it only makes system calls, allocating
    /// nothing.
    pub(crate) fn enter(&self) -> std::io::Result<()> {
        // SAFETY: unshare takes no pointers; it affects only this (child) process.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        self.names.iter().try_for_each(make_tap)
    }
}

/// An `ifreq` naming `name`, all else zero.
fn ifreq(name: &[libc::c_char; libc::IFNAMSIZ]) -> libc::ifreq {
    // SAFETY: ifreq is plain old data (a name and a union of integers and addresses), for which
    // all zero bytes is a valid value.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    r.ifr_name = *name;
    r
}

/// Closes `fd` and passes `result` on.
fn closing<T>(fd: libc::c_int, result: std::io::Result<T>) -> std::io::Result<T> {
    // SAFETY: fd is a descriptor this function's caller opened and owns; nothing uses it after.
    unsafe { libc::close(fd) };
    result
}

/// Fails with errno when a system call returned a negative value.
fn check(ret: libc::c_int) -> std::io::Result<libc::c_int> {
    if ret < 0 { Err(std::io::Error::last_os_error()) } else { Ok(ret) }
}

/// Makes a persistent tap `name` (as Firecracker opens it: no packet info, virtio-net headers)
/// and sets it up.
fn make_tap(name: &[libc::c_char; libc::IFNAMSIZ]) -> std::io::Result<()> {
    // SAFETY: a NUL-terminated path literal; the flags ask for a new descriptor.
    let tun = check(unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) })?;
    let mut req = ifreq(name);
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: TUNSETIFF reads (and writes back) one ifreq, which `req` is; TUNSETPERSIST takes
    // an int by value. Both on the tun descriptor just opened.
    let made = check(unsafe { libc::ioctl(tun, libc::TUNSETIFF, &mut req) })
        .and_then(|_| check(unsafe { libc::ioctl(tun, libc::TUNSETPERSIST, 1 as libc::c_int) }));
    closing(tun, made)?;
    // SAFETY: a plain socket(2) call; the descriptor is closed below.
    let sock = check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    let mut flags = ifreq(name);
    // SAFETY: SIOCGIFFLAGS and SIOCSIFFLAGS read and write one ifreq, which `flags` is; reading
    // ifru_flags after SIOCGIFFLAGS filled it is reading the field the kernel wrote.
    let up = check(unsafe { libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut flags) }).and_then(|_| {
        unsafe { flags.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
        check(unsafe { libc::ioctl(sock, libc::SIOCSIFFLAGS, &flags) })
    });
    closing(sock, up).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_are_checked() {
        assert!(Taps::new(&["tap0".into(), "fc_tap-1".into(), "a".repeat(15)]).is_ok());
        for bad in ["", "a/b", "tap 0", "eth0:1", "..", &"a".repeat(16)] {
            assert!(Taps::new(&[bad.to_string()]).is_err(), "{bad:?}");
        }
        assert!(Taps::new(&["tap0".into(), "tap0".into()]).is_err());
    }
}
