//! The I/O thread: owns the non-blocking socket, turns operations into NBD requests, and
//! matches replies to them by handle.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::protocol::*;
use super::{NbdTarget, NbdTimeouts, Shared, connection_lost, open_session};
use crate::blk::backend::{BlockOp, Completion, IoBuf, total_len};

/// How long the I/O thread tries to say goodbye (NBD_CMD_DISC) before just closing.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// The kernel's limit on iovecs per call; longer lists are sent in several calls.
const IOV_MAX: usize = 1024;

/// An operation with NBD requests outstanding; kept whole, to be sent again on a new
/// connection if this one fails.
struct OpState {
    op: BlockOp,
    parts: usize,
    bytes: u64,
    error: Option<io::Error>,
}

/// What it takes to open the same export again.
pub(super) struct Session {
    pub target: NbdTarget,
    pub export: String,
    pub size: u64,
    pub timeouts: NbdTimeouts,
}

/// A request waiting for its reply.
struct Awaiting {
    token: u64,
    /// Where a read's data goes; empty for other commands.
    read_into: Vec<IoBuf>,
    /// Counted towards the operation's result on success.
    bytes: u64,
}

/// A request to send: its header, then a write's data straight from guest memory.
struct Outgoing {
    header: [u8; REQUEST_LEN],
    payload: Vec<IoBuf>,
}

/// Where the reply stream stands: inside a reply header, or inside a read's data.
enum Rx {
    Header { buf: [u8; REPLY_LEN], filled: usize },
    Data { req: Awaiting, len: usize, filled: usize },
}

impl Rx {
    fn header() -> Rx {
        Rx::Header { buf: [0; REPLY_LEN], filled: 0 }
    }
}

/// The I/O thread's state; nothing else touches the socket.
pub(super) struct Engine {
    fd: RawFd,
    /// Owns `fd`.
    _stream: Stream,
    shared: Arc<Shared>,
    flags: u16,
    read_only: bool,
    /// Largest request payload (and range), a multiple of 512.
    max_chunk: u64,
    /// The backend's description, for log messages.
    name: String,
    next_handle: u64,
    /// By token.
    ops: HashMap<u64, OpState>,
    /// By handle.
    awaiting: HashMap<u64, Awaiting>,
    /// The first may be partly sent.
    outgoing: VecDeque<Outgoing>,
    /// Bytes of `outgoing[0]` already sent.
    sent: usize,
    rx: Rx,
    /// Completions not yet handed to the event loop.
    finished: Vec<Completion>,
    session: Session,
    /// When the server last sent something, or requests started waiting on an idle link.
    last_progress: Instant,
}

/// The iovecs for `bufs` minus their first `skip` bytes, at most `IOV_MAX` of them.
fn iovecs_from(bufs: &[IoBuf], mut skip: usize, out: &mut Vec<libc::iovec>) {
    for b in bufs {
        if out.len() == IOV_MAX {
            break;
        }
        if skip >= b.len {
            skip -= b.len;
            continue;
        }
        out.push(libc::iovec { iov_base: b.addr.wrapping_add(skip).cast(), iov_len: b.len - skip });
        skip = 0;
    }
}

/// Cuts a buffer list into pieces of at most `max` bytes.
fn split_bufs(bufs: &[IoBuf], max: usize) -> Vec<Vec<IoBuf>> {
    let mut pieces = Vec::new();
    let mut piece = Vec::new();
    let mut piece_len = 0;
    for b in bufs {
        let mut done = 0;
        while done < b.len {
            let n = (b.len - done).min(max - piece_len);
            piece.push(IoBuf { addr: b.addr.wrapping_add(done), len: n });
            piece_len += n;
            done += n;
            if piece_len == max {
                pieces.push(std::mem::take(&mut piece));
                piece_len = 0;
            }
        }
    }
    if !piece.is_empty() {
        pieces.push(piece);
    }
    pieces
}

/// An NBD error code as an errno: the protocol's values are Linux's, anything else is EIO.
fn nbd_error(code: u32) -> io::Error {
    let known = [
        libc::EPERM,
        libc::EIO,
        libc::ENOMEM,
        libc::EINVAL,
        libc::ENOSPC,
        libc::EOVERFLOW,
        libc::EOPNOTSUPP,
        libc::ESHUTDOWN,
    ];
    let errno = code as i32;
    io::Error::from_raw_os_error(if known.contains(&errno) { errno } else { libc::EIO })
}

impl Engine {
    /// `max_chunk`: the largest request payload (and range), a non-zero multiple of 512.
    pub(super) fn new(
        stream: Stream,
        shared: Arc<Shared>,
        flags: u16,
        read_only: bool,
        max_chunk: u64,
        name: String,
        session: Session,
    ) -> Engine {
        Engine {
            fd: stream.as_raw_fd(),
            _stream: stream,
            shared,
            flags,
            read_only,
            max_chunk,
            name,
            next_handle: 1,
            ops: HashMap::new(),
            awaiting: HashMap::new(),
            outgoing: VecDeque::new(),
            sent: 0,
            rx: Rx::header(),
            finished: Vec::new(),
            session,
            last_progress: Instant::now(),
        }
    }

    pub(super) fn run(mut self) {
        loop {
            match self.serve() {
                Ok(()) => return self.disconnect(),
                Err(reason) if self.reconnect(&reason) => continue,
                Err(reason) => return self.fail_all(&reason),
            }
        }
    }

    /// Opens the export again, retrying until the reconnect deadline, then sends every
    /// operation still in flight once more (NBD commands are idempotent: a write repeated
    /// lands the same bytes). Requests submitted meanwhile wait in the queue. `false`: the
    /// deadline passed, the export changed, or the backend is stopping.
    fn reconnect(&mut self, reason: &str) -> bool {
        let timeout = self.session.timeouts.reconnect;
        if timeout.is_zero() {
            return false;
        }
        // What finished before the failure goes to the guest now, not after the reconnect.
        self.publish();
        log::warn!(
            "{}: {reason}; reconnecting for up to {} ms, {} operation(s) to retry",
            self.name,
            timeout.as_millis(),
            self.ops.len()
        );
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(20);
        loop {
            if self.shared.lock().stop {
                return false;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                log::error!("{}: the server did not come back within {} ms", self.name, timeout.as_millis());
                return false;
            }
            match open_session(&self.session.target, &self.session.export, left.min(HANDSHAKE_TIMEOUT)) {
                Ok((stream, export)) if export.size != self.session.size => {
                    log::error!(
                        "{}: the export came back with {} bytes instead of {}",
                        self.name,
                        export.size,
                        self.session.size
                    );
                    drop(stream);
                    return false;
                }
                Ok((stream, _)) => match stream.set_timeout(None).and_then(|()| stream.set_nonblocking()) {
                    Ok(()) => {
                        self.fd = stream.as_raw_fd();
                        self._stream = stream;
                        self.retry_all();
                        log::warn!("{}: reconnected; {} operation(s) sent again", self.name, self.ops.len());
                        return true;
                    }
                    Err(e) => log::debug!("{}: reconnect: {e}", self.name),
                },
                Err(e) => log::debug!("{}: reconnect: {e}", self.name),
            }
            // Sleeps, but wakes for a stop.
            let mut pfd = libc::pollfd { fd: self.shared.wake.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, pause.min(left).as_millis().max(1) as i32) };
            let _ = self.shared.wake.read();
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    /// Starts every unfinished operation afresh on the new connection.
    fn retry_all(&mut self) {
        self.awaiting.clear();
        self.outgoing.clear();
        self.sent = 0;
        self.rx = Rx::header();
        let ops: Vec<(u64, OpState)> = self.ops.drain().collect();
        for (token, state) in ops {
            self.start(token, state.op);
        }
        self.last_progress = Instant::now();
    }

    /// Moves requests and replies until told to stop (`Ok`) or the connection fails (`Err`).
    fn serve(&mut self) -> Result<(), String> {
        loop {
            let (batch, stop) = {
                let mut state = self.shared.lock();
                (std::mem::take(&mut state.submitted), state.stop)
            };
            if stop {
                return Ok(());
            }
            for (token, op) in batch {
                self.start(token, op);
            }
            // Optimistically: the socket usually has room, and this saves a poll round trip.
            self.send()?;
            self.publish();
            let out = if self.outgoing.is_empty() { 0 } else { libc::POLLOUT };
            let mut fds = [
                libc::pollfd { fd: self.fd, events: libc::POLLIN | out, revents: 0 },
                libc::pollfd { fd: self.shared.wake.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            ];
            // Requests waiting: the server has `timeouts.io` to say something.
            let wait_ms = match self.awaiting.is_empty() {
                true => -1,
                false => {
                    let io = self.session.timeouts.io;
                    let left = io.saturating_sub(self.last_progress.elapsed());
                    if left.is_zero() {
                        return Err(format!("no answer from the server for {} ms", io.as_millis()));
                    }
                    left.as_millis().clamp(1, i32::MAX as u128) as i32
                }
            };
            // SAFETY: two valid pollfds.
            if unsafe { libc::poll(fds.as_mut_ptr(), 2, wait_ms) } < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(format!("poll failed: {e}"));
            }
            if fds[1].revents != 0 {
                let _ = self.shared.wake.read();
            }
            let events = fds[0].revents;
            if events & libc::POLLNVAL != 0 {
                return Err("socket closed under us".into());
            }
            if events & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                self.receive()?;
            }
            if events & libc::POLLOUT != 0 {
                self.send()?;
            }
            self.publish();
        }
    }

    /// Turns an operation into queued requests, or finishes it at once.
    fn start(&mut self, token: u64, op: BlockOp) {
        let unsupported = || Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        let read_only = || Err(io::Error::from_raw_os_error(libc::EROFS));
        let plan = match op {
            BlockOp::Read { offset, ref bufs } => Ok(self.data_requests(CMD_READ, offset, bufs)),
            BlockOp::Write { .. } if self.read_only => read_only(),
            BlockOp::Write { offset, ref bufs } => Ok(self.data_requests(CMD_WRITE, offset, bufs)),
            // Without NBD_FLAG_SEND_FLUSH the server has no volatile cache worth flushing.
            BlockOp::Flush if self.flags & FLAG_SEND_FLUSH == 0 => Ok(Vec::new()),
            BlockOp::Flush => Ok(vec![(CMD_FLUSH, 0, 0, Vec::new())]),
            BlockOp::Discard { .. } | BlockOp::WriteZeroes { .. } if self.read_only => read_only(),
            BlockOp::Discard { offset, len } if self.flags & FLAG_SEND_TRIM != 0 => {
                Ok(self.range_requests(CMD_TRIM, offset, len))
            }
            BlockOp::WriteZeroes { offset, len } if self.flags & FLAG_SEND_WRITE_ZEROES != 0 => {
                Ok(self.range_requests(CMD_WRITE_ZEROES, offset, len))
            }
            BlockOp::Discard { .. } | BlockOp::WriteZeroes { .. } => unsupported(),
        };
        let requests = match plan {
            Err(e) => return self.finished.push((token, Err(e))),
            Ok(r) if r.is_empty() => return self.finished.push((token, Ok(0))),
            Ok(r) => r,
        };
        if self.awaiting.is_empty() {
            // The server's time to answer starts now, not when it last answered.
            self.last_progress = Instant::now();
        }
        self.ops.insert(token, OpState { op, parts: requests.len(), bytes: 0, error: None });
        for (cmd, offset, len, bufs) in requests {
            let handle = self.next_handle;
            self.next_handle = self.next_handle.wrapping_add(1);
            let header = request_header(cmd, handle, offset, len);
            let bytes = total_len(&bufs);
            let (read_into, payload) = if cmd == CMD_READ { (bufs, Vec::new()) } else { (Vec::new(), bufs) };
            self.awaiting.insert(handle, Awaiting { token, read_into, bytes });
            self.outgoing.push_back(Outgoing { header, payload });
        }
    }

    /// Reads or writes of at most `max_chunk` bytes each.
    fn data_requests(&self, cmd: u16, offset: u64, bufs: &[IoBuf]) -> Vec<(u16, u64, u32, Vec<IoBuf>)> {
        let mut at = offset;
        split_bufs(bufs, self.max_chunk as usize)
            .into_iter()
            .map(|piece| {
                let len = total_len(&piece);
                at += len;
                (cmd, at - len, len as u32, piece)
            })
            .collect()
    }

    /// Trims or zeroings of at most `max_chunk` bytes each.
    fn range_requests(&self, cmd: u16, offset: u64, len: u64) -> Vec<(u16, u64, u32, Vec<IoBuf>)> {
        let mut requests = Vec::new();
        let mut done = 0;
        while done < len {
            let n = (len - done).min(self.max_chunk);
            requests.push((cmd, offset + done, n as u32, Vec::new()));
            done += n;
        }
        requests
    }

    /// Sends queued requests until done or the socket is full.
    fn send(&mut self) -> Result<(), String> {
        let mut iovecs = Vec::new();
        while let Some(front) = self.outgoing.front() {
            iovecs.clear();
            if self.sent < REQUEST_LEN {
                let rest = &front.header[self.sent..];
                iovecs.push(libc::iovec { iov_base: rest.as_ptr() as *mut _, iov_len: rest.len() });
            }
            iovecs_from(&front.payload, self.sent.saturating_sub(REQUEST_LEN), &mut iovecs);
            // SAFETY: an all-zero msghdr is valid (no address, no control data).
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = iovecs.as_mut_ptr();
            msg.msg_iovlen = iovecs.len();
            // SAFETY: the iovecs cover the header (alive in `outgoing`) and guest memory that
            // stays mapped while the operation is in flight. MSG_NOSIGNAL: a vanished server
            // must be an error here, not a SIGPIPE for the whole VMM.
            let n = unsafe { libc::sendmsg(self.fd, &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => return Ok(()),
                    io::ErrorKind::Interrupted => continue,
                    _ => return Err(format!("send failed: {e}")),
                }
            }
            self.sent += n as usize;
            // A long write going out is the link working too.
            self.last_progress = Instant::now();
            if self.sent == REQUEST_LEN + total_len(&front.payload) as usize {
                self.outgoing.pop_front();
                self.sent = 0;
            }
        }
        Ok(())
    }

    /// Reads replies until the socket is drained.
    fn receive(&mut self) -> Result<(), String> {
        let mut iovecs = Vec::new();
        loop {
            let n = match &mut self.rx {
                Rx::Header { buf, filled } => {
                    let rest = &mut buf[*filled..];
                    // SAFETY: reads into the rest of our own header buffer.
                    unsafe { libc::read(self.fd, rest.as_mut_ptr().cast(), rest.len()) }
                }
                Rx::Data { req, filled, .. } => {
                    iovecs.clear();
                    iovecs_from(&req.read_into, *filled, &mut iovecs);
                    // SAFETY: the iovecs cover guest memory of an operation still in flight.
                    unsafe { libc::readv(self.fd, iovecs.as_ptr(), iovecs.len() as i32) }
                }
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => return Ok(()),
                    io::ErrorKind::Interrupted => continue,
                    _ => return Err(format!("receive failed: {e}")),
                }
            }
            if n == 0 {
                return Err("the server closed the connection".into());
            }
            self.last_progress = Instant::now();
            match &mut self.rx {
                Rx::Header { buf, filled } => {
                    *filled += n as usize;
                    if *filled == REPLY_LEN {
                        let reply = *buf;
                        self.rx = Rx::header();
                        self.on_reply(&reply)?;
                    }
                }
                Rx::Data { len, filled, .. } => {
                    *filled += n as usize;
                    if *filled == *len
                        && let Rx::Data { req, .. } = std::mem::replace(&mut self.rx, Rx::header())
                    {
                        self.part_done(req, 0)?;
                    }
                }
            }
        }
    }

    fn on_reply(&mut self, reply: &[u8; REPLY_LEN]) -> Result<(), String> {
        let magic = be(&reply[0..4]) as u32;
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(format!("unexpected reply magic {magic:#x}"));
        }
        let error = be(&reply[4..8]) as u32;
        let handle = be(&reply[8..16]);
        let req = self.awaiting.remove(&handle).ok_or_else(|| format!("reply for unknown handle {handle:#x}"))?;
        // Data follows only a successful read.
        if error == 0 && !req.read_into.is_empty() {
            self.rx = Rx::Data { len: req.bytes as usize, req, filled: 0 };
            return Ok(());
        }
        self.part_done(req, error)
    }

    /// One request of an operation is answered; the operation finishes with its last one.
    fn part_done(&mut self, req: Awaiting, error: u32) -> Result<(), String> {
        if error == libc::ESHUTDOWN as u32 {
            // The protocol asks the client to disconnect now. The operation stays unfinished:
            // a reconnect sends it again (a server restarting is not the guest's I/O error).
            return Err("the server is shutting down".into());
        }
        if let Some(op) = self.ops.get_mut(&req.token) {
            op.parts -= 1;
            if error != 0 {
                op.error.get_or_insert_with(|| nbd_error(error));
            } else {
                op.bytes += req.bytes;
            }
            if op.parts == 0
                && let Some(op) = self.ops.remove(&req.token)
            {
                self.finished.push((req.token, op.error.map_or(Ok(op.bytes), Err)));
            }
        }
        Ok(())
    }

    /// Hands finished operations to the event loop.
    fn publish(&mut self) {
        if self.finished.is_empty() {
            return;
        }
        self.shared.lock().done.append(&mut self.finished);
        let _ = self.shared.done.write(1);
    }

    /// The connection is unusable: fail everything, now and from now on, and log it once.
    fn fail_all(&mut self, reason: &str) {
        let count = self.ops.len();
        for (token, _) in self.ops.drain() {
            self.finished.push((token, Err(connection_lost(reason))));
        }
        self.awaiting.clear();
        let mut state = self.shared.lock();
        let queued = state.submitted.len();
        for (token, _) in state.submitted.drain(..) {
            self.finished.push((token, Err(connection_lost(reason))));
        }
        // Under the same lock as the drain, so no submission slips between the two.
        state.dead = true;
        drop(state);
        log::error!("{}: {reason}; failing {} request(s), and all later ones", self.name, count + queued);
        self.publish();
        self.disconnect();
    }

    /// Sends NBD_CMD_DISC (bounded in time), then lets the socket close.
    fn disconnect(&mut self) {
        if self.sent != 0 {
            // Half a request is on the wire: anything more would be misparsed, so just close.
            return;
        }
        let handle = self.next_handle;
        self.outgoing.clear();
        self.outgoing.push_back(Outgoing { header: request_header(CMD_DISC, handle, 0, 0), payload: Vec::new() });
        let deadline = Instant::now() + DISCONNECT_TIMEOUT;
        loop {
            if self.send().is_err() || self.outgoing.is_empty() {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            let mut pfd = libc::pollfd { fd: self.fd, events: libc::POLLOUT, revents: 0 };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as i32) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iobuf(v: &mut [u8]) -> IoBuf {
        IoBuf { addr: v.as_mut_ptr(), len: v.len() }
    }

    #[test]
    fn split_bufs_cuts_at_the_limit_across_buffers() {
        let mut mem = vec![0u8; 3000];
        let (a, b) = mem.split_at_mut(1000);
        let pieces = split_bufs(&[iobuf(a), IoBuf { addr: b.as_mut_ptr(), len: 0 }, iobuf(b)], 1024);
        let lens: Vec<Vec<usize>> = pieces.iter().map(|p| p.iter().map(|b| b.len).collect()).collect();
        assert_eq!(lens, vec![vec![1000, 24], vec![1024], vec![952]]);
        assert_eq!(pieces[1][0].addr, mem[1024..].as_mut_ptr());
    }
}
