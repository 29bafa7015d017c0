//! The client end of the control API: what `vmm ctl` and the tests speak.

use std::io::BufReader;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::http::{self, HttpError, Response};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the API socket {path}: {source} (is `vmm run --api-sock` running?)")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("API request failed: {0}")]
    Http(#[from] HttpError),
}

/// One connection to a VMM's API socket, reused across requests.
pub struct ApiClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl ApiClient {
    /// Connects; `timeout` bounds each read and write (long polls need a generous one).
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, ClientError> {
        let connect_err = |source| ClientError::Connect { path: path.to_path_buf(), source };
        let stream = UnixStream::connect(path).map_err(connect_err)?;
        stream.set_read_timeout(Some(timeout)).map_err(connect_err)?;
        stream.set_write_timeout(Some(timeout)).map_err(connect_err)?;
        let writer = stream.try_clone().map_err(connect_err)?;
        Ok(Self { reader: BufReader::new(stream), writer })
    }

    /// Sends a request (`body` as JSON) and reads the response.
    pub fn request(&mut self, method: &str, target: &str, body: Option<&[u8]>) -> Result<Response, ClientError> {
        http::write_request(&mut self.writer, method, target, body).map_err(HttpError::Io)?;
        Ok(http::read_response(&mut self.reader)?)
    }

    pub fn get(&mut self, target: &str) -> Result<Response, ClientError> {
        self.request("GET", target, None)
    }

    pub fn send_json(&mut self, method: &str, target: &str, body: &serde_json::Value) -> Result<Response, ClientError> {
        let body = serde_json::to_vec(body).unwrap_or_default();
        self.request(method, target, Some(&body))
    }
}
