//! virtio-vsock (device ID 19, virtio spec 5.10): receive queue 0, transmit queue 1, event
//! queue 2, and a client-side stream connection with credit-based flow control.
//!
//! Every packet is a 44-byte little-endian header, followed by `len` payload bytes for RW.
//! Packets go out as a chain of two descriptors (header, then payload) and receive buffers
//! are posted the same way, the layout every device implementation accepts.
use core::fmt;

use super::{Buf, Error, F_ACCESS_PLATFORM, F_ORDER_PLATFORM, Transport, Virtqueue};
use crate::dma;
use crate::time::Deadline;

pub const HDR_LEN: usize = 44;
/// The host's CID (spec 5.10.4: the host is always 2).
pub const HOST_CID: u64 = 2;

pub const TYPE_STREAM: u16 = 1;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// The event the device sends when every connection was dropped (e.g. after migration).
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// Stream sockets are supported (newer devices offer it; accepting it changes nothing).
const F_STREAM: u64 = 1 << 0;

const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;
const EVENT_QUEUE: u16 = 2;
const CFG_GUEST_CID: u64 = 0;

/// Payload room of each receive buffer (what Linux posts).
pub const RX_PAYLOAD: u32 = 4096;
/// Largest payload we put in one packet (Linux's limit as well).
pub const MAX_TX_PAYLOAD: usize = 64 * 1024;
/// Headers are laid out at this stride.
const HDR_STRIDE: u64 = 64;
const MAX_RX_BUFFERS: u16 = 64;
/// How long `shutdown` waits for queued transmissions.
const DRAIN_TIMEOUT_MS: u64 = 100;
const EVENT_BUFFERS: u16 = 4;
const EVENT_LEN: u32 = 4;

/// The packet header (`struct virtio_vsock_hdr`).
#[derive(Clone, Copy, Default, Debug)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub kind: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    fn store(&self, addr: u64) {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.kind.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        // SAFETY: `addr` is a header slot of HDR_STRIDE bytes that we own.
        unsafe { core::ptr::write_volatile(addr as *mut [u8; HDR_LEN], b) };
    }

    fn load(addr: u64) -> Header {
        // SAFETY: `addr` is a header slot the device has finished writing.
        let b = unsafe { core::ptr::read_volatile(addr as *const [u8; HDR_LEN]) };
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| u64::from(u32_at(o)) | (u64::from(u32_at(o + 4)) << 32);
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            kind: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }
}

pub struct Vsock {
    transport: Transport,
    rx: Virtqueue,
    tx: Virtqueue,
    event: Virtqueue,
    rx_hdrs: u64,
    rx_data: u64,
    tx_hdrs: u64,
    tx_data: u64,
    tx_free: &'static mut [u16],
    tx_free_count: usize,
    events: u64,
    pub guest_cid: u64,
    pub features: u64,
}

impl Vsock {
    /// Initializes the device with `tx_slots` transmit buffers. Sets FAILED on error.
    pub fn open(transport: Transport, tx_slots: usize) -> Result<Vsock, Error> {
        Self::init(transport.clone(), tx_slots).inspect_err(|_| transport.fail())
    }

    fn init(transport: Transport, tx_slots: usize) -> Result<Vsock, Error> {
        let features = transport.negotiate(F_STREAM | F_ACCESS_PLATFORM | F_ORDER_PLATFORM)?;
        let guest_cid = transport.config(|c| c.u64(CFG_GUEST_CID));
        if guest_cid <= HOST_CID || guest_cid >= 0xffff_ffff {
            return Err(Error::Unsupported("vsock device reports an invalid guest CID"));
        }
        let rx = transport.setup_queue(RX_QUEUE, 2 * MAX_RX_BUFFERS)?;
        let tx_want = (2 * tx_slots.clamp(1, 512)).next_power_of_two() as u16;
        let tx = transport.setup_queue(TX_QUEUE, tx_want)?;
        let event = transport.setup_queue(EVENT_QUEUE, EVENT_BUFFERS)?;
        if rx.size() < 2 || tx.size() < 2 {
            return Err(Error::Unsupported("vsock queues too small for a packet"));
        }
        let rx_count = u64::from(rx.size() / 2);
        let rx_hdrs = dma::alloc(rx_count * HDR_STRIDE).ok_or(Error::OutOfMemory)?;
        let rx_data = dma::alloc(rx_count * u64::from(RX_PAYLOAD)).ok_or(Error::OutOfMemory)?;
        let tx_slots = tx_slots.clamp(1, usize::from(tx.size() / 2));
        let tx_hdrs = dma::alloc(tx_slots as u64 * HDR_STRIDE).ok_or(Error::OutOfMemory)?;
        let tx_data = dma::alloc((tx_slots * MAX_TX_PAYLOAD) as u64).ok_or(Error::OutOfMemory)?;
        let tx_free = dma::alloc_slice::<u16>(tx_slots).ok_or(Error::OutOfMemory)?;
        for (i, slot) in tx_free.iter_mut().enumerate() {
            *slot = i as u16;
        }
        let events = dma::alloc(u64::from(event.size()) * u64::from(EVENT_LEN)).ok_or(Error::OutOfMemory)?;
        let mut vsock = Vsock {
            transport,
            rx,
            tx,
            event,
            rx_hdrs,
            rx_data,
            tx_hdrs,
            tx_data,
            tx_free,
            tx_free_count: tx_slots,
            events,
            guest_cid,
            features,
        };
        for i in 0..rx_count as u16 {
            vsock.post_rx(i)?;
        }
        for i in 0..vsock.event.size() {
            vsock.post_event(i)?;
        }
        vsock.transport.driver_ok();
        // Notifications only after DRIVER_OK (spec 3.1.1).
        vsock.rx.kick();
        vsock.event.kick();
        Ok(vsock)
    }

    fn post_rx(&mut self, index: u16) -> Result<(), Error> {
        let i = u64::from(index);
        let hdr = self.rx_hdrs + i * HDR_STRIDE;
        let data = self.rx_data + i * u64::from(RX_PAYLOAD);
        self.rx.push(&[Buf::writable(hdr, HDR_LEN as u32), Buf::writable(data, RX_PAYLOAD)], u32::from(index))
    }

    fn post_event(&mut self, index: u16) -> Result<(), Error> {
        let addr = self.events + u64::from(index) * u64::from(EVENT_LEN);
        self.event.push(&[Buf::writable(addr, EVENT_LEN)], u32::from(index))
    }

    /// Collects finished transmissions.
    pub fn reclaim_tx(&mut self) -> Result<(), Error> {
        while let Some(used) = self.tx.pop()? {
            self.tx_free[self.tx_free_count] = used.token as u16;
            self.tx_free_count += 1;
        }
        Ok(())
    }

    /// Sends one packet (`hdr.len` is set from `payload`) and notifies the device. Returns
    /// false (sending nothing) when every transmit slot is still in flight.
    pub fn send(&mut self, hdr: &Header, payload: &[u8]) -> Result<bool, Error> {
        assert!(payload.len() <= MAX_TX_PAYLOAD, "vsock payload too large");
        self.reclaim_tx()?;
        if self.tx_free_count == 0 {
            return Ok(false);
        }
        self.tx_free_count -= 1;
        let slot = self.tx_free[self.tx_free_count];
        let hdr_addr = self.tx_hdrs + u64::from(slot) * HDR_STRIDE;
        let data_addr = self.tx_data + u64::from(slot) * MAX_TX_PAYLOAD as u64;
        let mut hdr = *hdr;
        hdr.len = payload.len() as u32;
        hdr.store(hdr_addr);
        let head = Buf::readable(hdr_addr, HDR_LEN as u32);
        if payload.is_empty() {
            self.tx.push(&[head], u32::from(slot))?;
        } else {
            // SAFETY: the slot's payload buffer is ours and MAX_TX_PAYLOAD bytes long.
            unsafe { core::ptr::copy_nonoverlapping(payload.as_ptr(), data_addr as *mut u8, payload.len()) };
            let body = Buf::readable(data_addr, payload.len() as u32);
            self.tx.push(&[head, body], u32::from(slot))?;
        }
        self.tx.kick();
        Ok(true)
    }

    /// Receives one packet, if one has arrived: its header, with up to `out.len()` payload
    /// bytes copied into `out`. The buffer goes straight back to the device.
    pub fn recv(&mut self, out: &mut [u8]) -> Result<Option<Header>, Error> {
        let Some(used) = self.rx.pop()? else {
            return Ok(None);
        };
        let index = used.token as u16;
        let i = u64::from(index);
        let hdr = Header::load(self.rx_hdrs + i * HDR_STRIDE);
        let written = used.len as usize;
        if written < HDR_LEN || hdr.len > RX_PAYLOAD || hdr.len as usize > written - HDR_LEN {
            return Err(Error::BadUsedLen { queue: RX_QUEUE, len: used.len });
        }
        let n = (hdr.len as usize).min(out.len());
        // SAFETY: the payload buffer the device has finished writing; `out` has room.
        unsafe {
            core::ptr::copy_nonoverlapping((self.rx_data + i * u64::from(RX_PAYLOAD)) as *const u8, out.as_mut_ptr(), n)
        };
        self.post_rx(index)?;
        self.rx.kick();
        Ok(Some(hdr))
    }

    /// Collects one event from the event queue, if any (its `id`).
    pub fn poll_event(&mut self) -> Result<Option<u32>, Error> {
        let Some(used) = self.event.pop()? else {
            return Ok(None);
        };
        let index = used.token as u16;
        let addr = self.events + u64::from(index) * u64::from(EVENT_LEN);
        // SAFETY: an event buffer the device has finished writing.
        let id = u32::from_le(unsafe { core::ptr::read_volatile(addr as *const u32) });
        self.post_event(index)?;
        self.event.kick();
        if id == EVENT_TRANSPORT_RESET {
            // The CID may have changed (spec 5.10.6.7).
            self.guest_cid = self.transport.config(|c| c.u64(CFG_GUEST_CID));
        }
        Ok(Some(id))
    }

    fn status(&self) -> u32 {
        self.transport.status()
    }

    /// Stops the device (reset), so it no longer touches our memory. Packets still queued
    /// for transmission (a final RST, say) get a short while to go out first.
    pub fn shutdown(&mut self) {
        let deadline = Deadline::after_ms(DRAIN_TIMEOUT_MS);
        while self.tx.in_flight() > 0 && !deadline.expired() && self.reclaim_tx().is_ok() {
            crate::arch::pause();
        }
        let _ = self.transport.reset();
    }
}

/// Why a stream operation failed.
#[derive(Debug)]
pub enum StreamError {
    Device(Error),
    /// The peer answered our REQUEST with RST: nobody listens on that port.
    Refused,
    /// The peer reset an established connection.
    Reset,
    /// The device dropped all connections (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET).
    TransportReset,
    Timeout {
        what: &'static str,
        ms: u64,
        status: u32,
    },
}

impl From<Error> for StreamError {
    fn from(e: Error) -> Self {
        StreamError::Device(e)
    }
}

impl fmt::Display for StreamError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            StreamError::Device(e) => write!(f, "{e}"),
            StreamError::Refused => write!(f, "connection refused (RST in answer to REQUEST)"),
            StreamError::Reset => write!(f, "connection reset by the peer"),
            StreamError::TransportReset => write!(f, "device reported a transport reset"),
            StreamError::Timeout { what, ms, status } => {
                write!(f, "timed out after {ms} ms waiting for {what} (device status {status:#x})")
            }
        }
    }
}

/// What [`Stream::poll`] found.
pub enum Event {
    Nothing,
    /// This many payload bytes were copied into the caller's buffer.
    Data(usize),
    /// The peer announced it will send (SHUTDOWN_SEND) and/or receive (SHUTDOWN_RCV) no more.
    Shutdown(u32),
    /// The peer reset the connection.
    Reset,
}

/// Counters a test may want to report.
#[derive(Clone, Copy, Default)]
pub struct StreamStats {
    pub packets_sent: u64,
    pub packets_received: u64,
    pub credit_updates_sent: u64,
    pub credit_requests_sent: u64,
    pub stray_packets: u64,
}

/// A connected stream socket, as the client (we sent the REQUEST).
pub struct Stream<'a> {
    dev: &'a mut Vsock,
    pub local_port: u32,
    pub peer_cid: u64,
    pub peer_port: u32,
    /// Receive buffer space we advertise.
    buf_alloc: u32,
    /// Payload bytes we have received and consumed.
    fwd_cnt: u32,
    /// `fwd_cnt` as last told to the peer.
    reported_fwd_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Payload bytes we have sent.
    tx_cnt: u32,
    /// SHUTDOWN flags the peer has sent.
    pub peer_shutdown: u32,
    pub stats: StreamStats,
    timeout_ms: u64,
}

impl<'a> Stream<'a> {
    /// Connects `local_port` to `peer_cid:peer_port`, advertising `buf_alloc` bytes of
    /// receive space. Every wait (here and later) is bounded by `timeout_ms`.
    pub fn connect(
        dev: &'a mut Vsock,
        local_port: u32,
        peer_cid: u64,
        peer_port: u32,
        buf_alloc: u32,
        timeout_ms: u64,
    ) -> Result<Stream<'a>, StreamError> {
        let mut s = Stream {
            dev,
            local_port,
            peer_cid,
            peer_port,
            buf_alloc,
            fwd_cnt: 0,
            reported_fwd_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            peer_shutdown: 0,
            stats: StreamStats::default(),
            timeout_ms,
        };
        s.send_control(OP_REQUEST, 0)?;
        let deadline = Deadline::after_ms(timeout_ms);
        let mut scratch = [0u8; 64];
        loop {
            s.check_events()?;
            if let Some(hdr) = s.dev.recv(&mut scratch)? {
                s.stats.packets_received += 1;
                if !s.ours(&hdr) {
                    s.stray(&hdr)?;
                    continue;
                }
                match hdr.op {
                    OP_RESPONSE => {
                        s.update_credit(&hdr);
                        return Ok(s);
                    }
                    OP_RST => return Err(StreamError::Refused),
                    // Anything else before the response is a protocol error: give up on it.
                    _ => {
                        s.stats.stray_packets += 1;
                        s.send_control(OP_RST, 0)?;
                        return Err(StreamError::Reset);
                    }
                }
            }
            if deadline.expired() {
                let _ = s.send_control(OP_RST, 0);
                return Err(s.timeout("the connection RESPONSE"));
            }
            crate::arch::pause();
        }
    }

    fn timeout(&self, what: &'static str) -> StreamError {
        StreamError::Timeout { what, ms: self.timeout_ms, status: self.dev.status() }
    }

    fn header(&self, op: u16, flags: u32) -> Header {
        Header {
            src_cid: self.dev.guest_cid,
            dst_cid: self.peer_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: 0,
            kind: TYPE_STREAM,
            op,
            flags,
            buf_alloc: self.buf_alloc,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// Sends a packet without payload, waiting for a free transmit slot if need be.
    fn send_control(&mut self, op: u16, flags: u32) -> Result<(), StreamError> {
        let hdr = self.header(op, flags);
        let deadline = Deadline::after_ms(self.timeout_ms);
        while !self.dev.send(&hdr, &[])? {
            if deadline.expired() {
                return Err(self.timeout("a free vsock transmit slot"));
            }
            crate::arch::pause();
        }
        self.stats.packets_sent += 1;
        self.reported_fwd_cnt = self.fwd_cnt;
        Ok(())
    }

    fn ours(&self, hdr: &Header) -> bool {
        hdr.src_cid == self.peer_cid && hdr.src_port == self.peer_port && hdr.dst_port == self.local_port
    }

    /// A packet for no connection of ours: answer RST (unless it is one), as the spec asks.
    fn stray(&mut self, hdr: &Header) -> Result<(), StreamError> {
        self.stats.stray_packets += 1;
        if hdr.op == OP_RST {
            return Ok(());
        }
        let rst = Header {
            src_cid: self.dev.guest_cid,
            dst_cid: hdr.src_cid,
            src_port: hdr.dst_port,
            dst_port: hdr.src_port,
            len: 0,
            kind: hdr.kind,
            op: OP_RST,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        };
        // Best effort: a full transmit queue just means no RST for the stray packet.
        self.dev.send(&rst, &[])?;
        Ok(())
    }

    fn check_events(&mut self) -> Result<(), StreamError> {
        match self.dev.poll_event()? {
            Some(EVENT_TRANSPORT_RESET) => Err(StreamError::TransportReset),
            _ => Ok(()),
        }
    }

    fn update_credit(&mut self, hdr: &Header) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = hdr.fwd_cnt;
    }

    /// Bytes the peer can take right now: its buffer minus what is in flight toward it.
    pub fn credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Sends as much of `data` as the peer's credit, one packet and a free transmit slot
    /// allow. Returns the number of bytes sent (0 if none could be).
    pub fn send(&mut self, data: &[u8]) -> Result<usize, StreamError> {
        let n = data.len().min(self.credit() as usize).min(MAX_TX_PAYLOAD);
        if n == 0 {
            return Ok(0);
        }
        let hdr = self.header(OP_RW, 0);
        if !self.dev.send(&hdr, &data[..n])? {
            return Ok(0);
        }
        self.stats.packets_sent += 1;
        self.reported_fwd_cnt = self.fwd_cnt;
        self.tx_cnt = self.tx_cnt.wrapping_add(n as u32);
        Ok(n)
    }

    /// Asks the peer for a credit update (when its credit has stayed at zero for a while).
    pub fn request_credit(&mut self) -> Result<(), StreamError> {
        self.stats.credit_requests_sent += 1;
        self.send_control(OP_CREDIT_REQUEST, 0)
    }

    /// Handles one incoming packet, if any. RW payload (at most [`RX_PAYLOAD`] bytes) is
    /// copied into `out` and counted as consumed; credit updates go back to the peer once
    /// half the advertised buffer has been consumed since the last report.
    pub fn poll(&mut self, out: &mut [u8]) -> Result<Event, StreamError> {
        self.check_events()?;
        self.dev.reclaim_tx()?;
        let Some(hdr) = self.dev.recv(out)? else {
            return Ok(Event::Nothing);
        };
        self.stats.packets_received += 1;
        if !self.ours(&hdr) {
            self.stray(&hdr)?;
            return Ok(Event::Nothing);
        }
        if hdr.kind != TYPE_STREAM {
            self.stats.stray_packets += 1;
            return Ok(Event::Nothing);
        }
        self.update_credit(&hdr);
        match hdr.op {
            OP_RW => {
                let n = (hdr.len as usize).min(out.len());
                self.fwd_cnt = self.fwd_cnt.wrapping_add(hdr.len);
                if self.fwd_cnt.wrapping_sub(self.reported_fwd_cnt) >= self.buf_alloc / 2 {
                    self.stats.credit_updates_sent += 1;
                    self.send_control(OP_CREDIT_UPDATE, 0)?;
                }
                Ok(Event::Data(n))
            }
            OP_CREDIT_UPDATE => Ok(Event::Nothing),
            OP_CREDIT_REQUEST => {
                self.stats.credit_updates_sent += 1;
                self.send_control(OP_CREDIT_UPDATE, 0)?;
                Ok(Event::Nothing)
            }
            OP_SHUTDOWN => {
                self.peer_shutdown |= hdr.flags & SHUTDOWN_BOTH;
                Ok(Event::Shutdown(hdr.flags & SHUTDOWN_BOTH))
            }
            OP_RST => Ok(Event::Reset),
            _ => {
                // REQUEST or RESPONSE on an established connection: ignore it.
                self.stats.stray_packets += 1;
                Ok(Event::Nothing)
            }
        }
    }

    /// Clean disconnect (spec 5.10.6.6): SHUTDOWN with both flags, then wait for the peer's
    /// RST. A peer that shuts down both directions itself gets our RST instead. Returns
    /// false if the peer did neither in time; we then reset the connection ourselves.
    /// Payload still arriving meanwhile is counted in `discarded`.
    pub fn close(&mut self, discarded: &mut u64) -> Result<bool, StreamError> {
        self.send_control(OP_SHUTDOWN, SHUTDOWN_BOTH)?;
        let deadline = Deadline::after_ms(self.timeout_ms);
        let mut scratch = [0u8; RX_PAYLOAD as usize];
        loop {
            match self.poll(&mut scratch)? {
                Event::Reset => return Ok(true),
                Event::Shutdown(_) if self.peer_shutdown == SHUTDOWN_BOTH => {
                    self.send_control(OP_RST, 0)?;
                    return Ok(true);
                }
                Event::Data(n) => *discarded += n as u64,
                Event::Shutdown(_) | Event::Nothing => {}
            }
            if deadline.expired() {
                self.send_control(OP_RST, 0)?;
                return Ok(false);
            }
            crate::arch::pause();
        }
    }

    /// Resets the connection without the shutdown handshake.
    pub fn abort(&mut self) {
        let _ = self.send_control(OP_RST, 0);
    }
}
