//! The replication stream between a primary and its shadow: length-prefixed frames over a Unix
//! or TCP socket. Page batches travel as they come from the [codec](super::codec); everything
//! else is a [`Control`] message in CBOR, the format of snapshot state files.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::codec::CodecStats;
use super::trial::TrialReport;
use super::update::{HealthReport, VmUpdate};
use crate::snapshot::VmSnapshot;
use crate::swap::VerifyPolicy;

/// Bumped when a frame's meaning changes: a shadow refuses a primary that speaks another.
pub const PROTOCOL_VERSION: u32 = 2;
/// The largest frame either side accepts (a batch of 4096 pages sent whole is ~16 MiB).
pub const MAX_FRAME: usize = 64 << 20;

const PAGES: u8 = 1;
const CONTROL: u8 = 2;

/// Where a shadow listens, as `unix:PATH` or `tcp:ADDR:PORT`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Endpoint {
    /// A Unix socket (the same host).
    Unix(PathBuf),
    /// A TCP address (another host).
    Tcp(SocketAddr),
}

impl std::str::FromStr for Endpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err(format!("{s:?}: the socket path must be absolute"));
            }
            return Ok(Endpoint::Unix(path.into()));
        }
        if let Some(addr) = s.strip_prefix("tcp:") {
            return addr.parse().map(Endpoint::Tcp).map_err(|_| format!("{s:?}: expected tcp:ADDR:PORT"));
        }
        Err(format!("{s:?}: expected unix:PATH or tcp:ADDR:PORT"))
    }
}

impl TryFrom<String> for Endpoint {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Endpoint> for String {
    fn from(e: Endpoint) -> String {
        e.to_string()
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            Endpoint::Unix(path) => write!(f, "unix:{}", path.display()),
            Endpoint::Tcp(addr) => write!(f, "tcp:{addr}"),
        }
    }
}

/// A connected stream, whichever the transport.
pub trait Stream: Read + Write + Send {
    /// Bounds every read (None: wait as long as it takes).
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
    /// Bounds every write: a peer that stops reading must not block the sender for good.
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
    /// A second handle on the same connection.
    fn try_clone_box(&self) -> io::Result<Box<dyn Stream>>;
    /// Ends the connection both ways.
    fn shutdown(&self);
}

impl Stream for UnixStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, timeout)
    }
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_write_timeout(self, timeout)
    }
    fn try_clone_box(&self) -> io::Result<Box<dyn Stream>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn shutdown(&self) {
        let _ = UnixStream::shutdown(self, std::net::Shutdown::Both);
    }
}

impl Stream for TcpStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, timeout)
    }
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_write_timeout(self, timeout)
    }
    fn try_clone_box(&self) -> io::Result<Box<dyn Stream>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn shutdown(&self) {
        let _ = TcpStream::shutdown(self, std::net::Shutdown::Both);
    }
}

impl Endpoint {
    /// Connects to a shadow listening here.
    pub fn connect(&self, timeout: Duration) -> io::Result<Box<dyn Stream>> {
        Ok(match self {
            Endpoint::Unix(path) => Box::new(UnixStream::connect(path)?),
            Endpoint::Tcp(addr) => {
                let stream = TcpStream::connect_timeout(addr, timeout)?;
                // Epochs are latency-bound: no Nagle delay on the small control frames.
                stream.set_nodelay(true)?;
                Box::new(stream)
            }
        })
    }

    /// Listens here and waits for one primary.
    pub fn accept_one(&self) -> io::Result<Box<dyn Stream>> {
        Ok(match self {
            Endpoint::Unix(path) => {
                // Bound and listening under another name, then renamed into place: the path
                // appears only once a primary can connect, and only as 0600 (this user's
                // processes; the API socket is 0600 too).
                if path.exists() {
                    let e = format!("{} exists (another shadow's socket, or one left behind)", path.display());
                    return Err(io::Error::new(io::ErrorKind::AddrInUse, e));
                }
                let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                let staging = path.with_file_name(format!(".{name}.{}.binding", std::process::id()));
                let _ = std::fs::remove_file(&staging);
                let listener = UnixListener::bind(&staging)?;
                use std::os::unix::fs::PermissionsExt;
                let placed = std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o600))
                    .and_then(|()| std::fs::rename(&staging, path));
                if let Err(e) = placed {
                    let _ = std::fs::remove_file(&staging);
                    return Err(e);
                }
                let (stream, _) = listener.accept()?;
                let _ = std::fs::remove_file(path);
                Box::new(stream)
            }
            Endpoint::Tcp(addr) => {
                let (stream, _) = TcpListener::bind(addr)?.accept()?;
                stream.set_nodelay(true)?;
                Box::new(stream)
            }
        })
    }
}

/// Everything but page batches.
#[derive(Debug, Serialize, Deserialize)]
pub enum Control {
    /// Primary -> shadow, first: the protocol spoken and the size of guest memory (its
    /// regions laid end to end, as in a snapshot's memory file).
    Hello {
        /// [`PROTOCOL_VERSION`].
        version: u32,
        /// Guest memory, in bytes.
        memory_bytes: u64,
        /// The shadow gives up on a primary it has not heard from for this long.
        idle_ms: u64,
    },
    /// Primary -> shadow: the pages of epoch `epoch` are all sent.
    EpochEnd {
        /// The epoch, from 0 (the first full pass).
        epoch: u64,
        /// What encoding the epoch cost and saved.
        stats: CodecStats,
    },
    /// Shadow -> primary: epoch `epoch` is applied.
    Ack {
        /// The epoch.
        epoch: u64,
    },
    /// Primary -> shadow, after the last epoch (sent with the primary frozen): the machine's
    /// state. The shadow becomes the VM, applies `update`, and checks the VM's health.
    Switchover {
        /// The machine's state.
        state: Box<VmSnapshot>,
        /// What to change once the VM runs there (a validated update, or nothing).
        update: VmUpdate,
        /// The health check that decides whether the VM stays on the shadow.
        health: VerifyPolicy,
    },
    /// Shadow -> primary: the VM runs on the shadow, restored in this many microseconds.
    Activated {
        /// From the state's arrival to the VM running.
        restore_us: u64,
        /// The `vmm` build running the VM now.
        build: String,
    },
    /// Shadow -> primary, after `Activated`: the update applied and the VM passed its health
    /// check; it stays on the shadow.
    Healthy {
        /// What each step of the update did.
        applied: Vec<String>,
        /// What the health check saw.
        health: HealthReport,
    },
    /// Primary -> shadow, after an epoch sent with the primary briefly frozen: the machine's
    /// state at that moment. The shadow runs a trial of `update` on a clone of it.
    Validate {
        /// The validation's number, from 1.
        id: u64,
        /// The machine's state.
        state: Box<VmSnapshot>,
        /// What to try.
        update: VmUpdate,
        /// The health check the clone must pass.
        health: VerifyPolicy,
    },
    /// Shadow -> primary, before any ack: trial `id` ended.
    Validated {
        /// The validation's number.
        id: u64,
        /// What it found.
        report: TrialReport,
    },
    /// Shadow -> primary: the shadow could not start the VM, or (after `Activated`) the VM
    /// failed its health check and the shadow stopped it; the primary carries on.
    Failed {
        /// Why.
        reason: String,
    },
    /// Shadow -> primary, instead of `Failed` or `RolledBack`: the shadow stopped the VM but
    /// could not undo its disk writes; the primary must not run on those disks as if nothing
    /// happened.
    UndoFailed {
        /// What failed.
        reason: String,
    },
    /// Primary -> shadow, after a switchover: the VM is the shadow's for good.
    Commit,
    /// Primary -> shadow, after a switchover: stop the VM, the primary takes it back.
    Rollback,
    /// Shadow -> primary: the VM is stopped here and its devices closed.
    RolledBack,
}

/// A frame.
pub enum Frame {
    /// A batch of encoded pages for epoch `epoch`.
    Pages {
        /// The epoch.
        epoch: u64,
        /// The batch, as [`super::codec::Encoder::finish`] wrote it.
        batch: Vec<u8>,
    },
    /// A control message.
    Control(Control),
}

/// Frames are named, never dumped: a batch is megabytes, a state kilobytes.
impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            Frame::Pages { epoch, batch } => write!(f, "pages of epoch {epoch} ({} bytes)", batch.len()),
            Frame::Control(Control::Switchover { .. }) => write!(f, "the switchover's state"),
            Frame::Control(Control::Validate { id, .. }) => write!(f, "the state for validation {id}"),
            Frame::Control(Control::Validated { id, report }) => {
                write!(f, "the result of validation {id} (passed: {})", report.passed)
            }
            Frame::Control(Control::Failed { reason }) => write!(f, "failed: {reason:.200}"),
            Frame::Control(control) => write!(f, "{control:?}"),
        }
    }
}

impl From<io::Error> for WireError {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            // A socket timeout reads as either, depending on the call.
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => WireError::Silent,
            io::ErrorKind::UnexpectedEof | io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => {
                WireError::Closed
            }
            _ => WireError::Io(e),
        }
    }
}

/// Why the stream failed.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The connection failed.
    #[error("replication stream: {0}")]
    Io(io::Error),
    /// Nothing came, or nothing could be sent, within the link's timeout.
    #[error("replication stream: the other side went silent past the link's timeout (link down, or peer stuck)")]
    Silent,
    /// The other side closed the connection.
    #[error("replication stream: the other side closed the link")]
    Closed,
    /// The replication ended for the reason given (not a fault of the stream).
    #[error("{0}")]
    Ended(String),
    /// The peer sent something no `vmm` writes.
    #[error("replication stream: malformed frame: {0}")]
    Malformed(String),
}

/// Writes one frame.
pub fn write_frame(out: &mut dyn Write, frame: &Frame) -> Result<(), WireError> {
    let (kind, body) = match frame {
        Frame::Pages { epoch, batch } => {
            let mut body = Vec::with_capacity(8 + batch.len());
            body.extend_from_slice(&epoch.to_le_bytes());
            body.extend_from_slice(batch);
            (PAGES, body)
        }
        Frame::Control(control) => {
            let mut body = Vec::new();
            ciborium::into_writer(control, &mut body).map_err(|e| WireError::Malformed(e.to_string()))?;
            (CONTROL, body)
        }
    };
    if body.len() + 1 > MAX_FRAME {
        return Err(WireError::Malformed(format!("a {} byte frame is over the limit", body.len())));
    }
    let mut header = [0u8; 5];
    header[..4].copy_from_slice(&((body.len() + 1) as u32).to_le_bytes());
    header[4] = kind;
    out.write_all(&header)?;
    out.write_all(&body)?;
    out.flush()?;
    Ok(())
}

/// Reads one frame.
pub fn read_frame(input: &mut dyn Read) -> Result<Frame, WireError> {
    let mut len = [0u8; 4];
    input.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len == 0 || len > MAX_FRAME {
        return Err(WireError::Malformed(format!("frame length {len}")));
    }
    let mut body = vec![0u8; len];
    input.read_exact(&mut body)?;
    match body[0] {
        PAGES if len >= 9 => {
            let epoch = u64::from_le_bytes(body[1..9].try_into().unwrap_or_default());
            Ok(Frame::Pages { epoch, batch: body[9..].to_vec() })
        }
        CONTROL => ciborium::from_reader(&body[1..])
            .map(Frame::Control)
            .map_err(|e| WireError::Malformed(format!("control message: {e}"))),
        kind => Err(WireError::Malformed(format!("frame kind {kind} ({len} bytes)"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_garbage_is_refused() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &Frame::Pages { epoch: 7, batch: vec![1, 2, 3] }).unwrap();
        write_frame(&mut buf, &Frame::Control(Control::Ack { epoch: 9 })).unwrap();
        let mut input = &buf[..];
        assert!(matches!(read_frame(&mut input).unwrap(), Frame::Pages { epoch: 7, ref batch } if batch == &[1, 2, 3]));
        assert!(matches!(read_frame(&mut input).unwrap(), Frame::Control(Control::Ack { epoch: 9 })));
        assert!(matches!(read_frame(&mut input), Err(WireError::Closed)), "end of stream");
        for garbage in [&[0u8, 0, 0, 0][..], &[255, 255, 255, 255], &[2, 0, 0, 0, 9, 9], &[3, 0, 0, 0, 2, 0xff, 0xff]] {
            let mut input = garbage;
            assert!(read_frame(&mut input).is_err(), "{garbage:?}");
        }
    }

    #[test]
    fn endpoints_parse_and_print() {
        assert_eq!("unix:/run/s.sock".parse::<Endpoint>(), Ok(Endpoint::Unix("/run/s.sock".into())));
        assert_eq!("tcp:10.0.0.2:7000".parse::<Endpoint>().unwrap().to_string(), "tcp:10.0.0.2:7000");
        assert!("unix:rel.sock".parse::<Endpoint>().is_err());
        assert!("tcp:nohost".parse::<Endpoint>().is_err());
        assert!("/run/s.sock".parse::<Endpoint>().is_err());
    }
}
