//! The client end of the control API: what `vmm ctl` and the tests speak.

use std::io::{BufReader, ErrorKind};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::http::{self, HttpError, Response};

/// Why a request through [`ApiClient`] got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing accepts connections on the socket.
    #[error("cannot connect to the API socket {}: {source} (is `vmm run --api-sock` running?)", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// What `connect` said.
        #[source]
        source: std::io::Error,
    },
    /// The VMM took the connection but did not answer in time: it is stopped (say, by job
    /// control), wedged, or the timeout is shorter than what was asked of it.
    #[error("no answer from the API socket {} within {timeout:?} (is the VMM stopped or busy?)", path.display())]
    NoAnswer {
        /// The socket.
        path: PathBuf,
        /// How long the client waited.
        timeout: Duration,
    },
    /// The exchange itself failed (the connection closed, or a malformed answer).
    #[error("API request failed: {0}")]
    Http(#[from] HttpError),
}

/// One connection to a VMM's API socket, reused across requests.
///
/// ```no_run
/// use std::time::Duration;
/// use vmm::api::ApiClient;
///
/// let mut client = ApiClient::connect("/tmp/vm.sock".as_ref(), Duration::from_secs(5))?;
/// let status = client.get("/vm")?;
/// println!("{}", String::from_utf8_lossy(&status.body));
/// # Ok::<(), vmm::api::ClientError>(())
/// ```
pub struct ApiClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    path: PathBuf,
    timeout: Duration,
}

impl ApiClient {
    /// Connects; `timeout` bounds each read and write (long polls need a generous one).
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, ClientError> {
        Self::connect_within(path, timeout, Duration::ZERO)
    }

    /// Like [`connect`](Self::connect), but while nothing listens at `path` yet (no socket
    /// file, or nobody accepting: a VMM still starting, as after `vmm run ... &`), tries again
    /// for up to `startup`.
    pub fn connect_within(path: &Path, timeout: Duration, startup: Duration) -> Result<Self, ClientError> {
        let connect_err = |source| ClientError::Connect { path: path.to_path_buf(), source };
        let deadline = std::time::Instant::now() + startup;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(stream) => break stream,
                Err(e)
                    if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused)
                        && std::time::Instant::now() < deadline =>
                {
                    // Polled: the socket file appears with no event we could wait on short of
                    // inotify, and this lasts a VMM's start-up at most.
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(connect_err(e)),
            }
        };
        stream.set_read_timeout(Some(timeout)).map_err(connect_err)?;
        stream.set_write_timeout(Some(timeout)).map_err(connect_err)?;
        let writer = stream.try_clone().map_err(connect_err)?;
        Ok(Self { reader: BufReader::new(stream), writer, path: path.to_path_buf(), timeout })
    }

    /// Sends a request (`body` as JSON) and reads the response.
    pub fn request(&mut self, method: &str, target: &str, body: Option<&[u8]>) -> Result<Response, ClientError> {
        let timed_out = |e: &HttpError| matches!(e, HttpError::Io(io) if matches!(io.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut));
        let exchange = http::write_request(&mut self.writer, method, target, body)
            .map_err(HttpError::Io)
            .and_then(|()| http::read_response(&mut self.reader));
        exchange.map_err(|e| match timed_out(&e) {
            true => ClientError::NoAnswer { path: self.path.clone(), timeout: self.timeout },
            false => ClientError::Http(e),
        })
    }

    /// `GET target`.
    pub fn get(&mut self, target: &str) -> Result<Response, ClientError> {
        self.request("GET", target, None)
    }

    /// `method target` with `body` serialized as JSON.
    pub fn send_json(&mut self, method: &str, target: &str, body: &serde_json::Value) -> Result<Response, ClientError> {
        let body = serde_json::to_vec(body).unwrap_or_default();
        self.request(method, target, Some(&body))
    }
}
