//! The other ends virtio tests and benchmarks talk to: echo servers on Unix sockets and on a
//! tap interface, a qemu-nbd server and a persistent tap. Each stops (and is reaped) on drop.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

/// A child process killed and reaped on drop, whatever happens in the test.
pub struct Reaped(pub Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Kills process `pid` if not dropped within `timeout`, so a test blocked reading a child's
/// output (or waiting for it to exit) fails instead of hanging.
pub struct Watchdog(Option<std::sync::mpsc::Sender<()>>);

impl Watchdog {
    pub fn kill_after(pid: u32, timeout: std::time::Duration) -> Self {
        let (disarm, disarmed) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = disarmed.recv_timeout(timeout) {
                eprintln!("watchdog: process {pid} still blocking after {timeout:?}; killing it");
                // SAFETY: only sends a signal. Callers drop the watchdog as soon as the child
                // is reaped, so after a timeout this long the pid is still that child.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
        });
        Self(Some(disarm))
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        // Dropping the sender disarms it: the thread's recv returns Disconnected.
        self.0.take();
    }
}

/// A thread that runs until dropped.
struct Worker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    fn spawn(f: impl FnOnce(Arc<AtomicBool>) + Send + 'static) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        Self { stop, thread: Some(std::thread::spawn(move || f(flag))) }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Echoes every datagram back to its sender (the userspace network backend's peer).
pub struct DatagramEcho {
    _worker: Worker,
}

impl DatagramEcho {
    pub fn start(path: &Path) -> Self {
        let socket = UnixDatagram::bind(path).expect("bind echo socket");
        socket.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let worker = Worker::spawn(move |stop| {
            let mut buf = vec![0u8; 70_000];
            while !stop.load(Ordering::SeqCst) {
                // The backend's address is abstract (autobound), so answer to whatever sent.
                if let Ok((n, from)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to_addr(&buf[..n], &from);
                }
            }
        });
        Self { _worker: worker }
    }
}

/// Accepts Unix stream connections and echoes each (the vsock host side).
pub struct StreamEcho {
    _worker: Worker,
}

impl StreamEcho {
    pub fn start(path: &Path) -> Self {
        let listener = UnixListener::bind(path).expect("bind stream echo");
        listener.set_nonblocking(true).unwrap();
        let worker = Worker::spawn(move |stop| {
            let mut clients = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                if let Ok((stream, _)) = listener.accept() {
                    stream.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
                    let stop = stop.clone();
                    clients.push(std::thread::spawn(move || {
                        use std::io::{Read, Write};
                        let mut stream = stream;
                        let mut buf = vec![0u8; 65536];
                        while !stop.load(Ordering::SeqCst) {
                            match stream.read(&mut buf) {
                                Ok(0) => break,
                                Ok(n) => {
                                    if stream.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                                Err(_) => break,
                            }
                        }
                    }));
                }
                wait_readable(listener.as_raw_fd(), 50);
            }
            for c in clients {
                let _ = c.join();
            }
        });
        Self { _worker: worker }
    }
}

fn wait_readable(fd: i32, ms: i32) {
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, ms) };
}

/// A persistent tap interface created for a test (`ip tuntap add`), deleted on drop.
pub struct Tap {
    pub name: String,
}

impl Tap {
    pub fn create(name: &str) -> Self {
        let _ = Command::new("ip").args(["link", "del", name]).stderr(Stdio::null()).status();
        let ok =
            Command::new("ip").args(["tuntap", "add", "dev", name, "mode", "tap"]).status().is_ok_and(|s| s.success());
        assert!(ok, "cannot create tap {name} (needs root and iproute2)");
        // No IPv6 chatter (router solicitations) on the test wire.
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
        let ok = Command::new("ip").args(["link", "set", name, "up"]).status().is_ok_and(|s| s.success());
        assert!(ok, "cannot bring {name} up");
        Self { name: name.to_string() }
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.name]).status();
    }
}

/// Echoes frames that arrive on a host interface back out of it, with a raw packet socket:
/// what the VMM writes to the tap comes back to it.
pub struct TapEcho {
    _worker: Worker,
}

const ETHERTYPE_TEST: u16 = 0x88b5;

impl TapEcho {
    pub fn start(ifname: &str) -> Self {
        // Protocol 0: the socket receives nothing until bound to our interface below. Created
        // with the test ethertype it would take that ethertype from every interface until the
        // bind, and later echo those frames out of the interface each came from: another
        // test's NIC would see its frames twice.
        // SAFETY: creating a socket; ownership is taken right away.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` is a fresh descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let name = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: a NUL-terminated name.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert!(index != 0, "no interface {ifname}");
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = ETHERTYPE_TEST.to_be();
        addr.sll_ifindex = index as i32;
        // SAFETY: a valid sockaddr_ll.
        let r = unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), std::mem::size_of_val(&addr) as u32) };
        assert_eq!(r, 0, "bind AF_PACKET: {}", std::io::Error::last_os_error());
        let worker = Worker::spawn(move |stop| {
            let mut buf = vec![0u8; 70_000];
            while !stop.load(Ordering::SeqCst) {
                wait_readable(fd.as_raw_fd(), 50);
                let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                let mut len = std::mem::size_of_val(&from) as u32;
                // SAFETY: buffers sized as passed.
                let n = unsafe {
                    libc::recvfrom(
                        fd.as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        libc::MSG_DONTWAIT,
                        (&raw mut from).cast(),
                        &mut len,
                    )
                };
                if n <= 0 || from.sll_pkttype == libc::PACKET_OUTGOING || from.sll_ifindex != index as i32 {
                    continue;
                }
                // SAFETY: sending the bytes just received out of the same interface.
                unsafe {
                    libc::sendto(fd.as_raw_fd(), buf.as_ptr().cast(), n as usize, 0, (&raw const from).cast(), len)
                };
            }
        });
        Self { _worker: worker }
    }
}

/// Ends a readiness probe's NBD session the way the protocol wants (greeting read, client flags
/// sent, NBD_OPT_ABORT acknowledged), so qemu-nbd does not log a failed negotiation.
fn say_goodbye(mut probe: std::os::unix::net::UnixStream) {
    use std::io::{Read, Write};
    const FIXED_NEWSTYLE_NO_ZEROES: u32 = 3;
    const OPT_ABORT: u32 = 2;
    let _ = probe.set_read_timeout(Some(Duration::from_secs(5)));
    let mut greeting = [0u8; 18];
    if probe.read_exact(&mut greeting).is_err() {
        return;
    }
    let mut abort = FIXED_NEWSTYLE_NO_ZEROES.to_be_bytes().to_vec();
    abort.extend_from_slice(b"IHAVEOPT");
    abort.extend_from_slice(&OPT_ABORT.to_be_bytes());
    abort.extend_from_slice(&0u32.to_be_bytes());
    let mut reply = [0u8; 20];
    let _ = probe.write_all(&abort).and_then(|_| probe.read_exact(&mut reply));
}

/// A qemu-nbd server exporting an image on a Unix socket.
pub struct NbdServer {
    pub socket: PathBuf,
    _process: Reaped,
}

impl NbdServer {
    pub fn start(image: &Path, socket: &Path, extra: &[&str]) -> Self {
        let child = Command::new("qemu-nbd")
            .args(["--format=raw", "--persistent", "--shared=4"])
            .arg(format!("--socket={}", socket.display()))
            .args(extra)
            .arg(image)
            .stdout(Stdio::null())
            .spawn()
            .expect("qemu-nbd (package qemu-utils) is needed for the NBD tests");
        let server = Self { socket: socket.to_path_buf(), _process: Reaped(child) };
        // Ready once it accepts a connection; qemu-nbd has no other readiness signal short of
        // daemonizing (which would make it impossible to reap), so poll, bounded.
        for _ in 0..400 {
            if let Ok(probe) = std::os::unix::net::UnixStream::connect(socket) {
                say_goodbye(probe);
                return server;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("qemu-nbd did not start listening on {}", socket.display());
    }
}
