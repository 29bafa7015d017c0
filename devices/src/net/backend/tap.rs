//! A Linux tap interface (/dev/net/tun): frames written here appear on the host interface.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::NetBackend;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// A tap interface carrying raw Ethernet frames (no packet-information header).
pub struct TapBackend {
    file: File,
    name: String,
    created: bool,
}

impl TapBackend {
    /// Attaches to tap `name`, creating it (and bringing it up) if it does not exist.
    pub fn open(name: &str) -> io::Result<Self> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("tap name {name:?} is not 1-15 bytes")));
        }
        let existed = Path::new("/sys/class/net").join(name).exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")?;
        let mut req = IfReq { name: [0; libc::IFNAMSIZ], flags: IFF_TAP | IFF_NO_PI, _pad: [0; 22] };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes an ifreq, which IfReq lays out.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let tap = Self { file, name: name.to_string(), created: !existed };
        if tap.created {
            set_link_up(name)?;
        }
        Ok(tap)
    }

    /// The host interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether this backend created the interface (it disappears when the backend closes).
    pub fn created(&self) -> bool {
        self.created
    }
}

/// Sets IFF_UP on an interface, as `ip link set NAME up` does.
fn set_link_up(name: &str) -> io::Result<()> {
    // SAFETY: a plain socket for interface ioctls; closed below.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut req = IfReq { name: [0; libc::IFNAMSIZ], flags: 0, _pad: [0; 22] };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read/write ifr_flags, which IfReq lays out.
    let result = unsafe {
        if libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req) < 0 {
            Err(io::Error::last_os_error())
        } else {
            req.flags |= libc::IFF_UP as libc::c_short;
            if libc::ioctl(sock, libc::SIOCSIFFLAGS, &req) < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
        }
    };
    // SAFETY: closing the socket we opened.
    unsafe { libc::close(sock) };
    result
}

impl NetBackend for TapBackend {
    fn description(&self) -> String {
        format!("tap {}", self.name)
    }

    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        // A tap takes whole frames; a short write does not happen.
        self.file.write(frame).map(|_| ())
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    fn mtu(&self) -> Option<u16> {
        let path = Path::new("/sys/class/net").join(&self.name).join("mtu");
        std::fs::read_to_string(path).ok()?.trim().parse().ok()
    }
}
