//! The API socket: accepts connections and serves each on its own thread, one request at a
//! time, until the client leaves, goes quiet, or the server stops.

use std::collections::HashMap;
use std::io::{BufReader, ErrorKind, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::http::{self, Response};
use super::{ApiError, routes};
use crate::Vm;

/// Connections served at once; more are answered 503 and closed.
const MAX_CONNECTIONS: usize = 16;
/// A connection with no complete request for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stopping server waits for answers being written.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Why the API server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A process answers on the socket path already (a stale socket would have been replaced).
    #[error("API socket {0} is in use by a running process")]
    InUse(PathBuf),
    /// The socket could not be set up: a file that is not a socket is at the path, or removing
    /// a stale socket, binding, setting mode 0600 or starting the server's thread failed.
    #[error("cannot create API socket {path}: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
}

/// Open connections, so stopping the server can close them.
#[derive(Default)]
struct Connections {
    open: Mutex<HashMap<u64, UnixStream>>,
    closed: Condvar,
    next: AtomicU64,
}

impl Connections {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, UnixStream>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn remove(&self, id: u64) {
        self.lock().remove(&id);
        self.closed.notify_all();
    }

    /// Stops reading from every connection and waits (up to `timeout`) for the requests
    /// being handled to be answered: the answer to `PATCH /vm {"state": "stopped"}` must
    /// reach its client even though the VM, and so the server, ends meanwhile.
    fn close_all(&self, timeout: Duration) {
        let open = self.lock();
        for stream in open.values() {
            let _ = stream.shutdown(std::net::Shutdown::Read);
        }
        let (open, _) =
            self.closed.wait_timeout_while(open, timeout, |open| !open.is_empty()).unwrap_or_else(|p| p.into_inner());
        for stream in open.values() {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// A running API server. Dropping it stops it and removes the socket file.
pub struct ApiServer {
    path: PathBuf,
    stop: Arc<EventFd>,
    connections: Arc<Connections>,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Listens on `path` (mode 0600: only the owner controls the VM) and serves `vm`.
    pub fn start(path: &Path, vm: Arc<Vm>) -> Result<Self, ServerError> {
        let bind_err = |source| ServerError::Bind { path: path.to_path_buf(), source };
        let listener = devices::unix_socket::bind_private(path).map_err(|e| match e.kind() {
            ErrorKind::AddrInUse => ServerError::InUse(path.to_path_buf()),
            _ => bind_err(e),
        })?;
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(bind_err)?);
        let connections = Arc::new(Connections::default());
        let thread = {
            let (stop, connections) = (stop.clone(), connections.clone());
            std::thread::Builder::new()
                .name("api".into())
                .spawn(move || accept_loop(&listener, &stop, &connections, &vm))
                .map_err(bind_err)?
        };
        Ok(Self { path: path.to_path_buf(), stop, connections, thread: Some(thread) })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.connections.close_all(CLOSE_GRACE);
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Pause after a failed accept (out of descriptors, say) before the next try.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

fn accept_loop(listener: &UnixListener, stop: &EventFd, connections: &Arc<Connections>, vm: &Arc<Vm>) {
    let mut fds = [
        libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: stop.as_raw_fd(), events: libc::POLLIN, revents: 0 },
    ];
    let accept_failures = devices::ratelimit::LogOnce::new(16);
    loop {
        // SAFETY: `fds` is a valid array of two pollfds for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == ErrorKind::Interrupted {
                continue;
            }
            log::error!("API server stopped: poll failed: {}", std::io::Error::last_os_error());
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        match listener.accept() {
            Ok((stream, _)) => admit(stream, connections, vm),
            Err(e) => {
                // Out of descriptors (or memory): the listener stays readable, so without a
                // pause this would spin and flood the log until something closes.
                if accept_failures.first(e.raw_os_error().unwrap_or(0)) {
                    log::warn!("API: accept failed: {e} (retrying; reported once per kind)");
                }
                std::thread::sleep(ACCEPT_BACKOFF);
            }
        }
    }
}

fn admit(stream: UnixStream, connections: &Arc<Connections>, vm: &Arc<Vm>) {
    let id = connections.next.fetch_add(1, Ordering::Relaxed);
    let registered = stream.try_clone();
    let mut open = connections.lock();
    if open.len() >= MAX_CONNECTIONS {
        drop(open);
        let busy = ApiError::new(503, format!("too many API connections (at most {MAX_CONNECTIONS})"));
        let mut stream = stream;
        let _ = http::write_response(&mut stream, &busy.response(), true);
        return;
    }
    match registered {
        Ok(clone) => open.insert(id, clone),
        Err(e) => return log::warn!("API: cannot serve a connection: {e}"),
    };
    drop(open);
    let (connections, vm) = (connections.clone(), vm.clone());
    let serving = connections.clone();
    let spawned = std::thread::Builder::new().name("api-conn".into()).spawn(move || {
        serve(stream, &vm);
        serving.remove(id);
    });
    if let Err(e) = spawned {
        // The closure (and the stream in it) is gone; so must its slot be.
        connections.remove(id);
        log::warn!("API: cannot serve a connection: {e}");
    }
}

/// A connection's read side that gives up when the request being read is overdue, however
/// slowly its bytes trickle in (a per-read timeout alone would let a client hold a
/// connection forever with a byte every few seconds).
struct DeadlineReader {
    stream: UnixStream,
    until: Instant,
}

impl Read for DeadlineReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf)
    }
}

/// Serves requests on one connection until it closes or misbehaves.
fn serve(stream: UnixStream, vm: &Arc<Vm>) {
    let Ok(mut writer) = stream.try_clone() else { return };
    let _ = writer.set_write_timeout(Some(IDLE_TIMEOUT));
    let mut reader = BufReader::new(DeadlineReader { stream, until: Instant::now() });
    loop {
        // Each request must arrive whole within the idle timeout of the previous answer.
        reader.get_mut().until = Instant::now() + IDLE_TIMEOUT;
        let request = match http::read_request(&mut reader) {
            Ok(Some(request)) => request,
            Ok(None) => return,
            Err(e) => {
                // After a malformed message the stream position is unknown: answer and close.
                if let Some(status) = e.status() {
                    let _ = http::write_response(&mut writer, &ApiError::new(status, e.to_string()).response(), true);
                }
                return;
            }
        };
        let response: Response = routes::handle(vm, &request);
        log::debug!("API {} {} -> {}", request.method, request.path, response.status);
        let close = request.wants_close();
        if http::write_response(&mut writer, &response, close).is_err() || close {
            return;
        }
    }
}
