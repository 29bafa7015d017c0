//! A userspace backend: frames as datagrams on a Unix socket, so a switch, a test harness or
//! another VM's VMM can be the other end without root.
//!
//! The backend connects to the peer's socket at `path` and binds itself to an automatic
//! (abstract) address, so the peer can answer with `recvfrom`/`sendto`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

use super::NetBackend;

/// Frames exchanged as datagrams with a peer's Unix socket.
pub struct UnixBackend {
    socket: UnixDatagram,
    peer: PathBuf,
}

impl UnixBackend {
    /// Connects to the peer's datagram socket at `peer`, which must exist. Frames sent after the
    /// peer goes away are dropped.
    pub fn connect(peer: &Path) -> io::Result<Self> {
        // SAFETY: creating a socket; ownership passes to UnixDatagram below.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh socket we own.
        let socket = unsafe { UnixDatagram::from_raw_fd(fd) };
        // Binding with only the address family asks Linux for an automatic abstract address.
        let addr = libc::sockaddr_un { sun_family: libc::AF_UNIX as libc::sa_family_t, sun_path: [0; 108] };
        // SAFETY: the address is valid for the length we pass.
        let r = unsafe { libc::bind(fd, (&raw const addr).cast(), std::mem::size_of::<libc::sa_family_t>() as u32) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        socket.connect(peer)?;
        // Room for bursts: a default-sized buffer holds only a few dozen full frames.
        let size: libc::c_int = 4 << 20;
        for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
            // SAFETY: setting an int socket option.
            unsafe { libc::setsockopt(fd, libc::SOL_SOCKET, opt, (&raw const size).cast(), 4) };
        }
        Ok(Self { socket, peer: peer.to_path_buf() })
    }
}

impl NetBackend for UnixBackend {
    fn description(&self) -> String {
        format!("unix {}", self.peer.display())
    }

    fn fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        match self.socket.send(frame) {
            Ok(_) => Ok(()),
            // The peer went away or is not there yet: the frame is lost, as on a cable.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ECONNREFUSED) | Some(libc::ENOENT)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.socket.recv(buf)
    }
}

#[cfg(test)]
mod tests {
    use std::os::linux::net::SocketAddrExt;

    use super::*;

    #[test]
    fn frames_round_trip_through_a_peer() {
        let dir = std::env::temp_dir().join(format!("net-unix-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("peer.sock");
        let peer = UnixDatagram::bind(&path).unwrap();
        let mut backend = UnixBackend::connect(&path).unwrap();
        backend.send(b"frame one").unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = peer.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"frame one");
        // The peer can answer to the backend's automatic address.
        let from = from.as_abstract_name().map(|n| n.to_vec());
        assert!(from.is_some(), "backend is autobound");
        peer.send_to_addr(b"reply", &std::os::unix::net::SocketAddr::from_abstract_name(from.unwrap()).unwrap())
            .unwrap();
        let mut pfd = libc::pollfd { fd: backend.fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, 5000) };
        let n = backend.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"reply");
        assert_eq!(backend.recv(&mut buf).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
