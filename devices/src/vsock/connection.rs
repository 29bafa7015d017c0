//! One vsock stream between a guest port and a host Unix stream, with virtio-vsock's credit
//! accounting: neither side may send more than the other has buffer for.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::unix::net::UnixStream;

use super::HOST_CID;
use super::packet::{Header, TYPE_STREAM, op};

/// Bytes we buffer per connection for the host (advertised to the guest as buf_alloc).
pub const CONN_BUF: u32 = 256 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST sent, waiting for the guest's RESPONSE.
    AwaitingGuest,
    Established,
    /// RST queued; removed once it is sent.
    Closing,
}

pub struct Connection {
    pub stream: UnixStream,
    pub host_port: u32,
    pub guest_port: u32,
    pub state: State,
    /// The guest's receive buffer and how much of what we sent it has consumed.
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    pub rx_cnt: u32,
    /// Bytes from the guest written to the host stream.
    pub fwd_cnt: u32,
    pub last_fwd_cnt_sent: u32,
    /// Guest data not yet written to the host stream.
    pub tx_buf: VecDeque<u8>,
    /// Control packets (op, flags) to send to the guest.
    pub control: VecDeque<(u16, u32)>,
    /// `OK <port>\n` for a host-initiated connection, written when the guest accepts.
    pub reply: Vec<u8>,
    /// The host closed its end.
    pub host_eof: bool,
    /// The guest will send no more; close once `tx_buf` is written.
    pub guest_done: bool,
    pub token: u32,
}

impl Connection {
    pub fn new(stream: UnixStream, host_port: u32, guest_port: u32, state: State, token: u32) -> Self {
        Self {
            stream,
            host_port,
            guest_port,
            state,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            rx_cnt: 0,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            tx_buf: VecDeque::new(),
            control: VecDeque::new(),
            reply: Vec::new(),
            host_eof: false,
            guest_done: false,
            token,
        }
    }

    /// Bytes the guest can still take.
    pub fn guest_credit(&self) -> u32 {
        let outstanding = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(outstanding)
    }

    /// Records the credit fields every guest packet carries.
    pub fn update_peer_credit(&mut self, hdr: &Header) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = hdr.fwd_cnt;
    }

    /// A header from the host end of this connection to the guest.
    pub fn header(&mut self, guest_cid: u64, op: u16, len: u32, flags: u32) -> Header {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: self.host_port,
            dst_port: self.guest_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: CONN_BUF,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// Ends the connection with an RST to the guest; once only, however many more bad
    /// packets the guest sends before it takes that RST.
    pub fn reset(&mut self) {
        if self.state != State::Closing {
            self.state = State::Closing;
            self.control.push_back((op::RST, 0));
        }
    }

    pub fn wants_host_read(&self) -> bool {
        self.state == State::Established && !self.host_eof && self.guest_credit() > 0
    }

    pub fn wants_host_write(&self) -> bool {
        !self.tx_buf.is_empty() || !self.reply.is_empty()
    }

    /// Writes buffered guest data to the host stream as far as it takes it; counts it as
    /// forwarded, and queues a credit update once the guest could be waiting for room.
    pub fn flush_to_host(&mut self) -> io::Result<()> {
        while !self.reply.is_empty() {
            match self.stream.write(&self.reply) {
                Ok(n) => drop(self.reply.drain(..n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match self.stream.write(front) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "host stream closed")),
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        if self.fwd_cnt.wrapping_sub(self.last_fwd_cnt_sent) >= CONN_BUF / 4
            && !self.control.iter().any(|(o, _)| *o == op::CREDIT_UPDATE)
        {
            self.control.push_back((op::CREDIT_UPDATE, 0));
        }
        Ok(())
    }
}
