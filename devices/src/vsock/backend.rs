//! Where a vsock device's host-side connections come from and go to.

use std::collections::HashMap;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use crate::unix_socket::{bind_private, connect_nonblocking};

/// The host side of a vsock device.
pub trait VsockBackend: Send {
    /// A human-readable description of the backend, for logs.
    fn description(&self) -> String;
    /// Descriptors to watch for host programs connecting in.
    fn event_fds(&self) -> Vec<RawFd>;
    /// Makes progress on incoming host connections; returns those that completed the
    /// handshake, with the guest port they asked for.
    fn accept(&mut self) -> Vec<(UnixStream, u32)>;
    /// Opens a stream to host port `port`, for a connection the guest initiated.
    fn connect(&mut self, port: u32) -> io::Result<UnixStream>;
}

/// The longest `CONNECT <port>\n` line accepted.
const MAX_HANDSHAKE: usize = 64;

/// Firecracker's hybrid vsock: a listening Unix socket for host-initiated connections,
/// `<path>_<port>` sockets for guest-initiated ones.
pub struct UnixVsockBackend {
    path: PathBuf,
    listener: UnixListener,
    /// Accepted streams still sending their `CONNECT` line.
    handshakes: HashMap<RawFd, (UnixStream, Vec<u8>)>,
}

impl UnixVsockBackend {
    /// Listens at `path`, replacing a stale socket file left by a previous run. A socket
    /// someone still listens on (another VMM, or this one under another name for the same
    /// file) is refused, not taken over.
    pub fn bind(path: &Path) -> io::Result<Self> {
        let listener = bind_private(path)?;
        listener.set_nonblocking(true)?;
        Ok(Self { path: path.to_path_buf(), listener, handshakes: HashMap::new() })
    }

    /// The listening socket's path; guest-initiated connections go to `<path>_<port>`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Parses `CONNECT <port>\n`.
    fn parse_connect(line: &[u8]) -> Option<u32> {
        let line = std::str::from_utf8(line).ok()?.trim_end_matches(['\n', '\r']);
        let port = line.strip_prefix("CONNECT ")?;
        port.trim().parse().ok()
    }
}

impl Drop for UnixVsockBackend {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl VsockBackend for UnixVsockBackend {
    fn description(&self) -> String {
        format!("unix {}", self.path.display())
    }

    fn event_fds(&self) -> Vec<RawFd> {
        std::iter::once(self.listener.as_raw_fd()).chain(self.handshakes.keys().copied()).collect()
    }

    fn accept(&mut self) -> Vec<(UnixStream, u32)> {
        while let Ok((stream, _)) = self.listener.accept() {
            if stream.set_nonblocking(true).is_ok() {
                self.handshakes.insert(stream.as_raw_fd(), (stream, Vec::new()));
            }
        }
        let mut ready = Vec::new();
        let mut finished = Vec::new();
        for (fd, (stream, line)) in self.handshakes.iter_mut() {
            // Read one byte at a time: data after the newline belongs to the connection.
            let mut byte = [0u8; 1];
            loop {
                match stream.read(&mut byte) {
                    Ok(1) => {
                        line.push(byte[0]);
                        if byte[0] == b'\n' || line.len() > MAX_HANDSHAKE {
                            finished.push(*fd);
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    // EOF or error: the client gave up.
                    _ => {
                        finished.push(*fd);
                        line.clear();
                        break;
                    }
                }
            }
        }
        for fd in finished {
            if let Some((stream, line)) = self.handshakes.remove(&fd) {
                match Self::parse_connect(&line) {
                    Some(port) => ready.push((stream, port)),
                    None if !line.is_empty() => {
                        log::warn!(
                            "vsock: bad handshake {:?} on {}",
                            String::from_utf8_lossy(&line),
                            self.path.display()
                        );
                    }
                    None => {}
                }
            }
        }
        ready
    }

    fn connect(&mut self, port: u32) -> io::Result<UnixStream> {
        let mut target = self.path.clone().into_os_string();
        target.push(format!("_{port}"));
        connect_nonblocking(Path::new(&target))
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn connecting_to_a_listener_that_never_accepts_does_not_wait() {
        let dir = std::env::temp_dir().join(format!("vsock-full-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("full.sock");
        let _listener = UnixListener::bind(&path).unwrap();
        let mut pending = Vec::new();
        let refused = loop {
            match connect_nonblocking(&path) {
                Ok(stream) => pending.push(stream),
                Err(e) => break e,
            }
            assert!(pending.len() < 100_000, "the backlog never filled");
        };
        assert_eq!(refused.kind(), io::ErrorKind::WouldBlock, "{refused}");
        let live = UnixVsockBackend::bind(&path).err().expect("a live socket is not taken over");
        assert_eq!(live.kind(), io::ErrorKind::WouldBlock, "{live}");
        assert!(path.exists());
        let long = dir.join("x".repeat(200));
        assert_eq!(connect_nonblocking(&long).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn handshake_and_guest_side_connect() {
        let dir = std::env::temp_dir().join(format!("vsock-be-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.sock");
        let mut backend = UnixVsockBackend::bind(&path).unwrap();
        let mut client = UnixStream::connect(&path).unwrap();
        client.write_all(b"CONNECT 52\nhello").unwrap();
        let mut got = Vec::new();
        for _ in 0..100 {
            let mut fds: Vec<libc::pollfd> = backend
                .event_fds()
                .into_iter()
                .map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 })
                .collect();
            // SAFETY: a valid pollfd array.
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) };
            got = backend.accept();
            if !got.is_empty() {
                break;
            }
        }
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].1, 52);
        let mut rest = [0u8; 5];
        let mut stream = &got[0].0;
        stream.set_nonblocking(false).unwrap();
        stream.read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"hello", "bytes after the handshake stay in the stream");

        let mut bad = UnixStream::connect(&path).unwrap();
        bad.write_all(b"HELLO\n").unwrap();
        assert!(UnixVsockBackend::parse_connect(b"CONNECT x\n").is_none());
        assert_eq!(UnixVsockBackend::parse_connect(b"CONNECT 1024\r\n"), Some(1024));

        let port_path = dir.join("v.sock_1234");
        let host = UnixListener::bind(&port_path).unwrap();
        let _guest_side = backend.connect(1234).unwrap();
        host.accept().unwrap();
        assert!(backend.connect(9).is_err(), "nobody listens on port 9");
        drop(backend);
        assert!(!path.exists(), "the socket file is removed with the backend");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
