//! The NBD engine: the disk is an export of a Network Block Device server, over TCP or a Unix
//! socket.
//!
//! `connect` runs the fixed-newstyle handshake synchronously (it happens while the VM is being
//! built), then hands the socket to a dedicated I/O thread so that the device's event loop never
//! waits on the network. That thread multiplexes the non-blocking socket and a wake-up eventfd
//! with `poll`: submitted operations arrive through a shared queue and become one or more NBD
//! requests, each tagged with its own handle; replies, which a server may send in any order,
//! are matched by handle, and read data lands directly in the guest's buffers. Finished
//! operations go back through a second queue, announced by the eventfd the device watches.
//!
//! Only simple replies are used (structured replies are never negotiated), so every reply is a
//! 16-byte header, followed by the data for a successful read.
//!
//! `protocol` has the wire format and the handshake, `engine` the I/O thread.

mod engine;
mod protocol;

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{BackendError, BlockBackend, BlockInfo, BlockOp, Completion};
use engine::{Engine, Session};
use protocol::*;

/// Operations accepted and not yet reaped; `can_submit` refuses more. Large operations may
/// become several NBD requests, so the server can see more than this.
const MAX_IN_FLIGHT: usize = 64;

/// Where an NBD server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NbdTarget {
    /// A TCP server.
    Tcp {
        /// Host name or IP address (an IPv6 address without brackets).
        host: String,
        /// TCP port.
        port: u16,
    },
    /// A Unix domain socket.
    Unix {
        /// Path of the socket.
        path: PathBuf,
    },
}

impl fmt::Display for NbdTarget {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            NbdTarget::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            NbdTarget::Tcp { host, port } => write!(f, "{host}:{port}"),
            NbdTarget::Unix { path } => write!(f, "unix:{}", path.display()),
        }
    }
}

/// What the event loop and the I/O thread share.
struct Shared {
    state: Mutex<State>,
    /// Wakes the I/O thread: new submissions, or stop.
    wake: EventFd,
    /// Readable when `state.done` has completions.
    done: EventFd,
}

#[derive(Default)]
struct State {
    submitted: VecDeque<(u64, BlockOp)>,
    done: Vec<Completion>,
    stop: bool,
    /// The connection is gone (the I/O thread has exited): fail requests on arrival.
    dead: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The lock is never held across anything that can panic; tolerate poisoning anyway.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// How long the NBD backend waits on a server before it gives up on the connection, and how
/// long it then tries to open a new one before failing the guest's requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NbdTimeouts {
    /// Requests waiting and not a byte from the server for this long: the connection is
    /// treated as lost (a hung server, a black-holed link).
    pub io: Duration,
    /// After a lost connection: keep reconnecting for this long, then fail what is in flight
    /// and everything after. Zero: fail at once.
    pub reconnect: Duration,
}

impl Default for NbdTimeouts {
    fn default() -> Self {
        // Linux's nbd client waits 30 s per request by default; a server restart (a package
        // upgrade, a failover) fits in the reconnect window.
        NbdTimeouts { io: Duration::from_secs(30), reconnect: Duration::from_secs(30) }
    }
}

/// Connects to `target` and negotiates export `name`: the blocking socket, and the export.
fn open_session(target: &NbdTarget, name: &str, timeout: Duration) -> Result<(Stream, Export), String> {
    let mut stream = Stream::connect(target).map_err(|e| format!("cannot connect: {e}"))?;
    stream.set_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    let export = handshake(&mut stream, name)?;
    Ok((stream, export))
}

fn connection_lost(reason: &str) -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, format!("NBD connection lost: {reason}"))
}

/// An export of an NBD server, served by a dedicated I/O thread; up to 64 operations in flight.
pub struct NbdBackend {
    info: BlockInfo,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    in_flight: usize,
}

impl NbdBackend {
    /// Connects to `target` and opens `export` (the server's default export if `None`), with
    /// the default timeouts.
    pub fn connect(target: &NbdTarget, export: Option<&str>, read_only: bool) -> Result<Self, BackendError> {
        Self::connect_with(target, export, read_only, NbdTimeouts::default())
    }

    /// [`connect`](Self::connect) with chosen timeouts.
    pub fn connect_with(
        target: &NbdTarget,
        export: Option<&str>,
        read_only: bool,
        timeouts: NbdTimeouts,
    ) -> Result<Self, BackendError> {
        let description = match export {
            Some(name) => format!("nbd {target} export={name}"),
            None => format!("nbd {target}"),
        };
        let fail = |reason: String| BackendError::Nbd { target: target.to_string(), reason };
        let name = export.unwrap_or("");
        if name.len() > MAX_NAME {
            return Err(fail(format!("export name longer than {MAX_NAME} bytes")));
        }
        let (mut stream, export) = open_session(target, name, HANDSHAKE_TIMEOUT).map_err(fail)?;
        let hang_up = |stream: &mut Stream| {
            let _ = stream.write_all(&request_header(CMD_DISC, 0, 0, 0));
        };
        if export.size % SECTOR != 0 {
            hang_up(&mut stream);
            return Err(BackendError::NbdSize { target: target.to_string(), size: export.size });
        }
        let max_chunk = u64::from(export.max_block) / SECTOR * SECTOR;
        if max_chunk == 0 {
            hang_up(&mut stream);
            return Err(fail(format!("the server's maximum request size is {} bytes", export.max_block)));
        }
        // A server that predates transmission flags offers nothing beyond reads and writes.
        let flags = if export.flags & FLAG_HAS_FLAGS != 0 { export.flags } else { 0 };
        let read_only = read_only || flags & FLAG_READ_ONLY != 0;
        let info = BlockInfo {
            capacity: export.size,
            read_only,
            discard: !read_only && flags & FLAG_SEND_TRIM != 0,
            write_zeroes: !read_only && flags & FLAG_SEND_WRITE_ZEROES != 0,
            description,
            // The server's image is out of sight.
            image: None,
        };
        let setup = |e: io::Error| fail(format!("cannot set up the I/O thread: {e}"));
        stream.set_timeout(None).map_err(setup)?;
        stream.set_nonblocking().map_err(setup)?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: EventFd::new(EFD_NONBLOCK).map_err(setup)?,
            done: EventFd::new(EFD_NONBLOCK).map_err(setup)?,
        });
        let session = Session { target: target.clone(), export: name.to_string(), size: export.size, timeouts };
        let engine =
            Engine::new(stream, shared.clone(), flags, read_only, max_chunk, info.description.clone(), session);
        let thread = std::thread::Builder::new().name("nbd-io".into()).spawn(move || engine.run()).map_err(setup)?;
        Ok(Self { info, shared, thread: Some(thread), in_flight: 0 })
    }
}

impl BlockBackend for NbdBackend {
    fn info(&self) -> &BlockInfo {
        &self.info
    }

    fn submit(&mut self, token: u64, op: BlockOp) -> io::Result<()> {
        let mut state = self.shared.lock();
        if state.dead {
            state.done.push((token, Err(connection_lost("no connection"))));
            drop(state);
            let _ = self.shared.done.write(1);
        } else {
            // The I/O thread is woken once per batch, in flush.
            state.submitted.push_back((token, op));
        }
        self.in_flight += 1;
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = self.shared.wake.write(1);
        Ok(())
    }

    fn can_submit(&self) -> bool {
        self.in_flight < MAX_IN_FLIGHT
    }

    fn poll_completions(&mut self, out: &mut Vec<Completion>) {
        // Reset before draining: a completion published after the drain signals again.
        let _ = self.shared.done.read();
        let mut state = self.shared.lock();
        self.in_flight = self.in_flight.saturating_sub(state.done.len());
        out.append(&mut state.done);
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.shared.done.as_raw_fd())
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }
}

impl Drop for NbdBackend {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        let _ = self.shared.wake.write(1);
        if let Some(thread) = self.thread.take() {
            // Waiting matters: the thread may be touching guest buffers until it returns.
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::io::Read;
    use std::net::TcpListener;
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::path::Path;
    use std::process::{Child, Command, Stdio};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    use super::*;
    use crate::blk::backend::IoBuf;

    /// A fresh directory, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            static SEQ: AtomicUsize = AtomicUsize::new(0);
            let seq = SEQ.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("nbd-test-{}-{tag}-{seq}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A qemu-nbd serving a sparse raw image, killed and reaped on drop whatever happens.
    struct QemuNbd {
        child: Child,
        target: NbdTarget,
        // Dropped after the server is gone (fields drop after `Drop::drop`).
        dir: TempDir,
    }

    impl QemuNbd {
        fn start(tag: &str, size: u64, tcp: bool, extra: &[&str]) -> QemuNbd {
            let dir = TempDir::new(tag);
            let image = dir.0.join("disk.img");
            File::create(&image).unwrap().set_len(size).unwrap();
            let mut cmd = Command::new("qemu-nbd");
            cmd.args(["--format=raw", "--persistent", "--shared=4"]).args(extra);
            let target = if tcp {
                // Bind port 0 to learn a free port; the tiny reuse race is acceptable in tests.
                let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
                cmd.args(["--bind=127.0.0.1".to_string(), format!("--port={port}")]);
                NbdTarget::Tcp { host: "127.0.0.1".into(), port }
            } else {
                let path = dir.0.join("nbd.sock");
                cmd.arg(format!("--socket={}", path.display()));
                NbdTarget::Unix { path }
            };
            let log = File::create(dir.0.join("qemu-nbd.log")).unwrap();
            cmd.arg(&image).stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
            let child = cmd.spawn().expect("cannot run qemu-nbd (package qemu-utils)");
            let mut server = QemuNbd { child, target, dir };
            server.wait_ready();
            server
        }

        /// Polls with plain connections until the server listens (bounded).
        fn wait_ready(&mut self) {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Stream::connect(&self.target).is_err() {
                if let Ok(Some(status)) = self.child.try_wait() {
                    let log = std::fs::read_to_string(self.dir.0.join("qemu-nbd.log")).unwrap_or_default();
                    panic!("qemu-nbd exited ({status}): {log}");
                }
                assert!(Instant::now() < deadline, "qemu-nbd did not start listening");
                std::thread::sleep(Duration::from_millis(20));
            }
        }

        fn kill(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }

        /// Kills the server and starts a new one on the same image and socket (a restart).
        fn restart(&mut self) {
            self.kill();
            let _ = std::fs::remove_file(self.socket());
            let mut cmd = Command::new("qemu-nbd");
            cmd.args(["--format=raw", "--persistent", "--shared=4"])
                .arg(format!("--socket={}", self.socket().display()))
                .arg(self.dir.0.join("disk.img"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            self.child = cmd.spawn().expect("cannot run qemu-nbd (package qemu-utils)");
            self.wait_ready();
        }

        /// Stops (SIGSTOP) or continues (SIGCONT) the server: a hung one.
        fn signal(&self, signal: i32) {
            // SAFETY: signals our own child.
            unsafe { libc::kill(self.child.id() as i32, signal) };
        }

        fn socket(&self) -> &Path {
            match &self.target {
                NbdTarget::Unix { path } => path,
                NbdTarget::Tcp { .. } => panic!("not a Unix socket server"),
            }
        }
    }

    impl Drop for QemuNbd {
        fn drop(&mut self) {
            self.kill();
        }
    }

    fn iobuf(v: &mut [u8]) -> IoBuf {
        IoBuf { addr: v.as_mut_ptr(), len: v.len() }
    }

    fn wait_all(b: &mut NbdBackend, n: usize) -> Vec<Completion> {
        b.flush().unwrap();
        let mut done = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while done.len() < n {
            assert!(Instant::now() < deadline, "only {} of {n} completions arrived", done.len());
            let mut pfd = libc::pollfd { fd: b.completion_fd().unwrap(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, 100) };
            b.poll_completions(&mut done);
        }
        assert_eq!(done.len(), n);
        done
    }

    fn run(b: &mut NbdBackend, op: BlockOp) -> io::Result<u64> {
        b.submit(7, op).unwrap();
        let (token, result) = wait_all(b, 1).pop().unwrap();
        assert_eq!(token, 7);
        result
    }

    fn errno(r: io::Result<u64>) -> Option<i32> {
        r.err().and_then(|e| e.raw_os_error())
    }

    #[test]
    fn qemu_nbd_unix_io() {
        let server = QemuNbd::start("io", 64 << 20, false, &[]);
        let mut b = NbdBackend::connect(&server.target, None, false).unwrap();
        let info = b.info().clone();
        assert_eq!(info.capacity, 64 << 20);
        assert!(!info.read_only && info.discard && info.write_zeroes);
        assert_eq!(info.description, format!("nbd unix:{}", server.socket().display()));

        // Sixteen writes in flight at once, each from two guest buffers.
        let mut data: Vec<Vec<u8>> = (0..16).map(|i| vec![i as u8 + 1; 8192]).collect();
        for (i, d) in data.iter_mut().enumerate() {
            let (lo, hi) = d.split_at_mut(4096);
            b.submit(i as u64, BlockOp::Write { offset: i as u64 * 8192, bufs: vec![iobuf(lo), iobuf(hi)] }).unwrap();
        }
        assert_eq!(b.in_flight(), 16);
        let done = wait_all(&mut b, 16);
        assert!(done.iter().all(|(_, r)| matches!(r, Ok(8192))), "{done:?}");
        assert_eq!(b.in_flight(), 0);
        let mut back = vec![vec![0u8; 8192]; 16];
        for (i, d) in back.iter_mut().enumerate() {
            b.submit(100 + i as u64, BlockOp::Read { offset: i as u64 * 8192, bufs: vec![iobuf(d)] }).unwrap();
        }
        let mut tokens: Vec<u64> = wait_all(&mut b, 16).into_iter().map(|(t, r)| r.map(|_| t).unwrap()).collect();
        tokens.sort();
        assert_eq!(tokens, (100..116).collect::<Vec<_>>());
        assert_eq!(back, data);

        assert_eq!(run(&mut b, BlockOp::Flush).unwrap(), 0);
        assert_eq!(run(&mut b, BlockOp::WriteZeroes { offset: 8192, len: 8192 }).unwrap(), 0);
        // qemu-nbd ignores discards by default: success is all that can be checked.
        assert_eq!(run(&mut b, BlockOp::Discard { offset: 0, len: 8192 }).unwrap(), 0);
        let mut zeroed = vec![0xffu8; 8192];
        run(&mut b, BlockOp::Read { offset: 8192, bufs: vec![iobuf(&mut zeroed)] }).unwrap();
        assert!(zeroed.iter().all(|&x| x == 0));

        // 40 MiB: more than qemu-nbd's 32 MiB limit, so split into several requests.
        let mut big: Vec<u8> = (0..40 << 20).map(|i| (i % 251) as u8).collect();
        let n = big.len() as u64;
        assert_eq!(run(&mut b, BlockOp::Write { offset: 8 << 20, bufs: vec![iobuf(&mut big)] }).unwrap(), n);
        let mut big_back = vec![0u8; big.len()];
        let (lo, hi) = big_back.split_at_mut(3 << 20);
        assert_eq!(run(&mut b, BlockOp::Read { offset: 8 << 20, bufs: vec![iobuf(lo), iobuf(hi)] }).unwrap(), n);
        assert!(big_back == big);
    }

    #[test]
    fn qemu_nbd_tcp_and_client_read_only() {
        let server = QemuNbd::start("tcp", 1 << 20, true, &[]);
        let NbdTarget::Tcp { port, .. } = server.target else { unreachable!() };
        let mut b = NbdBackend::connect(&server.target, None, false).unwrap();
        assert_eq!(b.info().description, format!("nbd 127.0.0.1:{port}"));
        let mut data = vec![0x5au8; 4096];
        assert_eq!(run(&mut b, BlockOp::Write { offset: 4096, bufs: vec![iobuf(&mut data)] }).unwrap(), 4096);
        drop(b);

        // Asked for read-only: writes are refused locally, reads still work.
        let mut ro = NbdBackend::connect(&server.target, None, true).unwrap();
        assert!(ro.info().read_only && !ro.info().discard && !ro.info().write_zeroes);
        let mut back = vec![0u8; 4096];
        assert_eq!(errno(run(&mut ro, BlockOp::Write { offset: 0, bufs: vec![iobuf(&mut back)] })), Some(libc::EROFS));
        run(&mut ro, BlockOp::Read { offset: 4096, bufs: vec![iobuf(&mut back)] }).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn qemu_nbd_read_only_export() {
        let server = QemuNbd::start("ro", 1 << 20, false, &["--read-only"]);
        let mut b = NbdBackend::connect(&server.target, None, false).unwrap();
        assert!(b.info().read_only, "the server's read-only flag is honoured");
        assert!(!b.info().discard && !b.info().write_zeroes);
        let mut buf = vec![1u8; 4096];
        assert!(run(&mut b, BlockOp::Write { offset: 0, bufs: vec![iobuf(&mut buf)] }).is_err());
        assert!(run(&mut b, BlockOp::WriteZeroes { offset: 0, len: 4096 }).is_err());
        run(&mut b, BlockOp::Read { offset: 0, bufs: vec![iobuf(&mut buf)] }).unwrap();
        assert!(buf.iter().all(|&x| x == 0));
    }

    #[test]
    fn qemu_nbd_export_names() {
        let server = QemuNbd::start("name", 1 << 20, false, &["--export-name=vol"]);
        let b = NbdBackend::connect(&server.target, Some("vol"), false).unwrap();
        assert_eq!(b.info().description, format!("nbd unix:{} export=vol", server.socket().display()));
        drop(b);
        let err = NbdBackend::connect(&server.target, Some("nope"), false).err().expect("a wrong name must fail");
        let msg = err.to_string();
        assert!(msg.contains("\"nope\"") && msg.contains("unknown export"), "{msg}");
    }

    #[test]
    fn qemu_nbd_killed_mid_use_without_reconnecting() {
        let mut server = QemuNbd::start("kill", 1 << 20, false, &[]);
        let no_reconnect = NbdTimeouts { reconnect: Duration::ZERO, ..NbdTimeouts::default() };
        let mut b = NbdBackend::connect_with(&server.target, None, false, no_reconnect).unwrap();
        let mut buf = vec![3u8; 4096];
        run(&mut b, BlockOp::Write { offset: 0, bufs: vec![iobuf(&mut buf)] }).unwrap();
        // Requests in flight as the server dies: each completes, with data or an error.
        let mut bufs = vec![vec![0u8; 65536]; 32];
        for (i, d) in bufs.iter_mut().enumerate() {
            b.submit(i as u64, BlockOp::Read { offset: (i as u64 * 65536) % (1 << 20), bufs: vec![iobuf(d)] }).unwrap();
        }
        server.kill();
        wait_all(&mut b, 32);
        // Then everything fails, promptly.
        assert!(run(&mut b, BlockOp::Read { offset: 0, bufs: vec![iobuf(&mut buf)] }).is_err());
        assert!(run(&mut b, BlockOp::Flush).is_err());
        assert_eq!(b.in_flight(), 0);
        let started = Instant::now();
        drop(b);
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn a_restarted_server_gets_the_operations_in_flight_again() {
        let mut server = QemuNbd::start("restart", 1 << 20, false, &[]);
        let mut b = NbdBackend::connect(&server.target, None, false).unwrap();
        let mut pattern: Vec<u8> = (0..65536u32).map(|i| (i * 7) as u8).collect();
        for i in 0..16u64 {
            run(&mut b, BlockOp::Write { offset: i * 65536, bufs: vec![iobuf(&mut pattern)] }).unwrap();
        }
        // Reads in flight as the server dies, and a write submitted while it is gone.
        let mut bufs = vec![vec![0u8; 65536]; 16];
        for (i, d) in bufs.iter_mut().enumerate() {
            b.submit(i as u64, BlockOp::Read { offset: i as u64 * 65536, bufs: vec![iobuf(d)] }).unwrap();
        }
        b.flush().unwrap();
        server.kill();
        let mut late = vec![0xeeu8; 4096];
        b.submit(100, BlockOp::Write { offset: 0, bufs: vec![iobuf(&mut late)] }).unwrap();
        b.flush().unwrap();
        server.restart();
        let done = wait_all(&mut b, 17);
        for (token, result) in &done {
            assert!(result.is_ok(), "operation {token} failed across the restart: {result:?}");
        }
        for (i, d) in bufs.iter().enumerate() {
            // The first block may already hold the late write: only its tail is checked.
            let from = if i == 0 { 4096 } else { 0 };
            assert_eq!(&d[from..], &pattern[from..], "read {i} came back wrong after the reconnect");
        }
        let mut check = vec![0u8; 4096];
        run(&mut b, BlockOp::Read { offset: 0, bufs: vec![iobuf(&mut check)] }).unwrap();
        assert_eq!(check, late, "the write made while the server was down landed");
    }

    #[test]
    fn a_hung_server_times_out_and_requests_fail_after_the_reconnect_deadline() {
        let server = QemuNbd::start("hung", 1 << 20, false, &[]);
        let timeouts = NbdTimeouts { io: Duration::from_millis(300), reconnect: Duration::from_millis(700) };
        let mut b = NbdBackend::connect_with(&server.target, None, false, timeouts).unwrap();
        let mut buf = vec![0u8; 4096];
        run(&mut b, BlockOp::Read { offset: 0, bufs: vec![iobuf(&mut buf)] }).unwrap();
        server.signal(libc::SIGSTOP);
        let started = Instant::now();
        b.submit(1, BlockOp::Read { offset: 0, bufs: vec![iobuf(&mut buf)] }).unwrap();
        let done = wait_all(&mut b, 1);
        let waited = started.elapsed();
        server.signal(libc::SIGCONT);
        let err = done[0].1.as_ref().expect_err("a hung server's request must fail, not wait for ever");
        assert!(err.to_string().contains("NBD connection lost"), "{err}");
        // The I/O timeout, then the reconnect window (a stopped server accepts the connection
        // but never answers the handshake).
        assert!(waited >= Duration::from_millis(1000), "failed after {waited:?}, before both timeouts");
        assert!(waited < Duration::from_secs(5), "failed only after {waited:?}");
    }

    /// Plays a server qemu-nbd cannot: refuses NBD_OPT_GO (forcing the NBD_OPT_EXPORT_NAME
    /// fallback), advertises `flags`, and answers each batch of `batch` requests in reverse
    /// order. Returns the commands it saw.
    fn fake_server(path: &Path, size: u64, flags: u16, batch: usize) -> JoinHandle<Vec<u16>> {
        let listener = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            if let Ok((mut s, _)) = listener.accept() {
                let _ = fake_serve(&mut s, size, flags, batch, &mut seen);
            }
            seen
        })
    }

    fn fake_serve(s: &mut UnixStream, size: u64, flags: u16, batch: usize, seen: &mut Vec<u16>) -> io::Result<()> {
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut hello = NBDMAGIC.to_be_bytes().to_vec();
        hello.extend(IHAVEOPT.to_be_bytes());
        hello.extend((FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        s.write_all(&hello)?;
        let mut client_flags = [0u8; 4];
        s.read_exact(&mut client_flags)?;
        assert_eq!(be(&client_flags) as u32, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        loop {
            let mut h = [0u8; 16];
            s.read_exact(&mut h)?;
            let option = be(&h[8..12]) as u32;
            let mut data = vec![0u8; be(&h[12..16]) as usize];
            s.read_exact(&mut data)?;
            if option == OPT_EXPORT_NAME {
                break;
            }
            let mut reply = OPT_REPLY_MAGIC.to_be_bytes().to_vec();
            reply.extend(option.to_be_bytes());
            reply.extend(REP_ERR_UNSUP.to_be_bytes());
            reply.extend(0u32.to_be_bytes());
            s.write_all(&reply)?;
        }
        let mut export = size.to_be_bytes().to_vec();
        export.extend(flags.to_be_bytes());
        s.write_all(&export)?;
        let mut disk = vec![0u8; size as usize];
        loop {
            let mut replies = Vec::new();
            let mut disconnect = false;
            while replies.len() < batch && !disconnect {
                let mut h = [0u8; REQUEST_LEN];
                s.read_exact(&mut h)?;
                let (cmd, handle) = (be(&h[6..8]) as u16, be(&h[8..16]));
                let (offset, len) = (be(&h[16..24]) as usize, be(&h[24..28]) as usize);
                seen.push(cmd);
                let mut reply = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
                reply.extend(0u32.to_be_bytes());
                reply.extend(handle.to_be_bytes());
                match cmd {
                    CMD_READ => reply.extend_from_slice(&disk[offset..offset + len]),
                    CMD_WRITE => s.read_exact(&mut disk[offset..offset + len])?,
                    CMD_DISC => disconnect = true,
                    _ => {}
                }
                if !disconnect {
                    replies.push(reply);
                }
            }
            for reply in replies.iter().rev() {
                s.write_all(reply)?;
            }
            if disconnect {
                return Ok(());
            }
        }
    }

    #[test]
    fn export_name_fallback_and_reordered_replies() {
        let dir = TempDir::new("fake");
        let path = dir.0.join("fake.sock");
        let server = fake_server(&path, 1 << 20, FLAG_HAS_FLAGS | FLAG_SEND_TRIM, 8);
        let mut b = NbdBackend::connect(&NbdTarget::Unix { path }, None, false).unwrap();
        assert_eq!(b.info().capacity, 1 << 20);
        assert!(!b.info().read_only && b.info().discard && !b.info().write_zeroes);

        let mut data: Vec<Vec<u8>> = (0..8).map(|i| vec![i as u8 + 1; 4096]).collect();
        for (i, d) in data.iter_mut().enumerate() {
            b.submit(i as u64, BlockOp::Write { offset: i as u64 * 8192, bufs: vec![iobuf(d)] }).unwrap();
        }
        let done = wait_all(&mut b, 8);
        assert!(done.iter().all(|(_, r)| matches!(r, Ok(4096))));
        let tokens: Vec<u64> = done.iter().map(|(t, _)| *t).collect();
        assert_eq!(tokens, (0..8).rev().collect::<Vec<_>>(), "completions follow the server's order");
        let mut back = vec![vec![0u8; 4096]; 8];
        for (i, d) in back.iter_mut().enumerate() {
            b.submit(i as u64, BlockOp::Read { offset: i as u64 * 8192, bufs: vec![iobuf(d)] }).unwrap();
        }
        assert!(wait_all(&mut b, 8).iter().all(|(_, r)| matches!(r, Ok(4096))));
        assert_eq!(back, data, "each reply's data went to its own request");

        // No NBD_FLAG_SEND_FLUSH: flush succeeds without reaching the server.
        assert_eq!(run(&mut b, BlockOp::Flush).unwrap(), 0);
        assert_eq!(errno(run(&mut b, BlockOp::WriteZeroes { offset: 0, len: 512 })), Some(libc::EOPNOTSUPP));
        drop(b);
        let seen = server.join().unwrap();
        let mut expected = vec![CMD_WRITE; 8];
        expected.extend([CMD_READ; 8]);
        expected.push(CMD_DISC);
        assert_eq!(seen, expected, "the backend ends with NBD_CMD_DISC");
    }

    #[test]
    fn odd_sized_export_is_refused() {
        let dir = TempDir::new("odd");
        let path = dir.0.join("fake.sock");
        let server = fake_server(&path, 1000, FLAG_HAS_FLAGS, 1);
        let err = NbdBackend::connect(&NbdTarget::Unix { path }, None, false).err().expect("1000 bytes is not sectors");
        assert!(matches!(err, BackendError::NbdSize { size: 1000, .. }), "{err}");
        assert_eq!(server.join().unwrap(), vec![CMD_DISC]);
    }

    #[test]
    fn nothing_listening_is_a_clear_error() {
        let dir = TempDir::new("none");
        let target = NbdTarget::Unix { path: dir.0.join("absent.sock") };
        let msg = NbdBackend::connect(&target, None, false).err().unwrap().to_string();
        assert!(msg.contains("absent.sock") && msg.contains("cannot connect"), "{msg}");
    }
}
