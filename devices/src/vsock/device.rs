//! The virtio-vsock device: guest packets (TX queue) drive a table of connections to host Unix
//! streams; host data and control packets go back through the RX queue as the guest's credit
//! and buffers allow.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use event_manager::EventSet;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use super::backend::VsockBackend;
use super::connection::{CONN_BUF, Connection, State};
use super::packet::{HEADER_LEN, Header, TYPE_STREAM, op, shutdown};
use super::HOST_CID;
use crate::interrupt::InterruptLine;
use crate::metrics::RequestMetrics;
use crate::virtio::{
    ActivateError, DEVICE_TOKEN_BASE, DeviceType, EventSource, QueueProcessor, VirtioCore, VirtioDevice, features,
};
use crate::SharedGuestMem;

pub const VSOCK_QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
const EVENT: usize = 2;
const BACKEND_TOKEN: u32 = DEVICE_TOKEN_BASE;
const FIRST_CONN_TOKEN: u32 = DEVICE_TOKEN_BASE + 1;
/// Largest payload in one packet (Linux uses up to 64 KiB).
const MAX_PAYLOAD: usize = 64 * 1024;
/// Host ports for host-initiated connections are taken from here up.
const FIRST_EPHEMERAL_PORT: u32 = 1 << 30;

type ConnKey = (u32, u32); // (host port, guest port)

pub struct VirtioVsock {
    core: VirtioCore,
    guest_cid: u64,
    backend: Box<dyn VsockBackend>,
    conns: HashMap<ConnKey, Connection>,
    tokens: HashMap<u32, ConnKey>,
    next_token: u32,
    next_host_port: u32,
    /// RSTs for packets that belong to no connection.
    stray_resets: VecDeque<Header>,
    /// The guest has no RX buffers: stop reading hosts until it adds some.
    rx_starved: bool,
    rx_metrics: Arc<RequestMetrics>,
    tx_metrics: Arc<RequestMetrics>,
}

impl VirtioVsock {
    pub fn new(
        guest_cid: u64,
        backend: Box<dyn VsockBackend>,
        interrupt: Box<dyn InterruptLine>,
        memory: SharedGuestMem,
    ) -> io::Result<Self> {
        let sizes = [VSOCK_QUEUE_SIZE; 3];
        let core = VirtioCore::new(DeviceType::Vsock, features::VERSION_1, &sizes, interrupt, memory)?;
        Ok(Self {
            core,
            guest_cid,
            backend,
            conns: HashMap::new(),
            tokens: HashMap::new(),
            next_token: FIRST_CONN_TOKEN,
            next_host_port: FIRST_EPHEMERAL_PORT,
            stray_resets: VecDeque::new(),
            rx_starved: false,
            rx_metrics: Arc::default(),
            tx_metrics: Arc::default(),
        })
    }

    pub fn backend(&self) -> &dyn VsockBackend {
        &*self.backend
    }

    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    pub fn metrics(&self) -> (Arc<RequestMetrics>, Arc<RequestMetrics>) {
        (self.rx_metrics.clone(), self.tx_metrics.clone())
    }

    fn add_connection(&mut self, stream: std::os::unix::net::UnixStream, host_port: u32, guest_port: u32, state: State) -> &mut Connection {
        let token = self.next_token;
        self.next_token = self.next_token.checked_add(1).unwrap_or(FIRST_CONN_TOKEN);
        self.tokens.insert(token, (host_port, guest_port));
        self.conns.entry((host_port, guest_port)).or_insert(Connection::new(stream, host_port, guest_port, state, token))
    }

    fn remove_connection(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.remove(&key) {
            self.tokens.remove(&conn.token);
        }
    }

    /// An RST answering `hdr`, for packets that match no connection.
    fn reset_for(&mut self, hdr: &Header) {
        if hdr.op != op::RST {
            self.stray_resets.push_back(Header {
                src_cid: HOST_CID,
                dst_cid: self.guest_cid,
                src_port: hdr.dst_port,
                dst_port: hdr.src_port,
                type_: TYPE_STREAM,
                op: op::RST,
                ..Default::default()
            });
        }
    }

    /// Takes packets from the guest's TX queue.
    fn process_tx(&mut self) {
        let mut packets: Vec<(Header, Vec<u8>)> = Vec::new();
        let tx_metrics = self.tx_metrics.clone();
        QueueProcessor::drain(&mut self.core, TX, |core, chain| {
            let head = chain.head_index();
            let mem = core.mem();
            let mut bytes = Vec::new();
            let mut bad = false;
            for desc in chain {
                if desc.is_write_only() || bytes.len() + desc.len() as usize > HEADER_LEN + MAX_PAYLOAD {
                    bad = true;
                    break;
                }
                let start = bytes.len();
                bytes.resize(start + desc.len() as usize, 0);
                if mem.read_slice(&mut bytes[start..], desc.addr()).is_err() {
                    bad = true;
                    break;
                }
            }
            drop(mem);
            core.complete(TX, head, 0);
            let Some(header) = bytes.first_chunk::<HEADER_LEN>().map(Header::from_bytes).filter(|_| !bad) else {
                core.guest_error("malformed TX packet dropped", format_args!("head {head}"));
                tx_metrics.record_rejected();
                return true;
            };
            let payload = bytes[HEADER_LEN..].to_vec();
            if header.len as usize != payload.len() {
                core.guest_error("packet length does not match its buffers", format_args!("len {}", header.len));
                tx_metrics.record_rejected();
                return true;
            }
            tx_metrics.record(Duration::ZERO, true, 0, payload.len() as u64);
            packets.push((header, payload));
            true
        });
        for (header, payload) in packets {
            self.handle_packet(header, payload);
        }
        self.fill_rx();
    }

    fn handle_packet(&mut self, hdr: Header, payload: Vec<u8>) {
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != HOST_CID {
            self.core.guest_error("packet with wrong addresses dropped", format_args!("{} -> {}", hdr.src_cid, hdr.dst_cid));
            return;
        }
        if hdr.type_ != TYPE_STREAM {
            self.reset_for(&hdr);
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        if hdr.op == op::REQUEST {
            if self.conns.contains_key(&key) {
                self.reset_for(&hdr);
                return;
            }
            match self.backend.connect(hdr.dst_port) {
                Ok(stream) => {
                    let conn = self.add_connection(stream, hdr.dst_port, hdr.src_port, State::Established);
                    conn.update_peer_credit(&hdr);
                    conn.control.push_back((op::RESPONSE, 0));
                }
                Err(_) => self.reset_for(&hdr),
            }
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            self.reset_for(&hdr);
            return;
        };
        conn.update_peer_credit(&hdr);
        match hdr.op {
            op::RESPONSE if conn.state == State::AwaitingGuest => {
                conn.state = State::Established;
                conn.reply = format!("OK {}\n", conn.host_port).into_bytes();
            }
            op::RW if conn.state == State::Established => {
                if conn.tx_buf.len() + payload.len() > CONN_BUF as usize {
                    // The guest ignored our credit: a protocol violation.
                    self.core.guest_error("vsock peer exceeded its credit", format_args!("port {}", hdr.src_port));
                    conn.state = State::Closing;
                    conn.control.push_back((op::RST, 0));
                    return;
                }
                conn.tx_buf.extend(payload);
            }
            op::CREDIT_UPDATE => {}
            op::CREDIT_REQUEST => conn.control.push_back((op::CREDIT_UPDATE, 0)),
            op::SHUTDOWN => {
                if hdr.flags & shutdown::SEND != 0 {
                    conn.guest_done = true;
                }
                if hdr.flags & shutdown::RCV != 0 {
                    conn.host_eof = true;
                }
            }
            op::RST => {
                self.remove_connection(key);
                return;
            }
            _ => {
                conn.state = State::Closing;
                conn.control.push_back((op::RST, 0));
                return;
            }
        }
        self.flush_connection(key);
    }

    /// Writes what the guest sent to the host; closes the connection once both directions
    /// are finished.
    fn flush_connection(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else { return };
        if conn.flush_to_host().is_err() {
            conn.state = State::Closing;
            conn.control.push_back((op::RST, 0));
            return;
        }
        if conn.guest_done && conn.tx_buf.is_empty() && conn.state == State::Established {
            let _ = conn.stream.shutdown(std::net::Shutdown::Write);
            if conn.host_eof {
                conn.state = State::Closing;
                conn.control.push_back((op::RST, 0));
            }
        }
    }

    /// The next packet for the guest, with at most `room` payload bytes.
    fn next_rx_packet(&mut self, room: usize) -> Option<(Header, Vec<u8>)> {
        if let Some(reset) = self.stray_resets.pop_front() {
            return Some((reset, Vec::new()));
        }
        let guest_cid = self.guest_cid;
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in &keys {
            let Some(conn) = self.conns.get_mut(key) else { continue };
            if let Some((op, flags)) = conn.control.pop_front() {
                let hdr = conn.header(guest_cid, op, 0, flags);
                if op == op::RST {
                    self.remove_connection(*key);
                }
                return Some((hdr, Vec::new()));
            }
        }
        for key in keys {
            let Some(conn) = self.conns.get_mut(&key) else { continue };
            if !conn.wants_host_read() {
                continue;
            }
            let want = room.min(conn.guest_credit() as usize).min(MAX_PAYLOAD);
            let mut buf = vec![0u8; want];
            match conn.stream.read(&mut buf) {
                Ok(0) => {
                    // The host closed: tell the guest nothing more will come either way.
                    conn.host_eof = true;
                    let hdr = conn.header(guest_cid, op::SHUTDOWN, 0, shutdown::RCV | shutdown::SEND);
                    return Some((hdr, Vec::new()));
                }
                Ok(n) => {
                    buf.truncate(n);
                    conn.rx_cnt = conn.rx_cnt.wrapping_add(n as u32);
                    let hdr = conn.header(guest_cid, op::RW, n as u32, 0);
                    return Some((hdr, buf));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    conn.state = State::Closing;
                    let hdr = conn.header(guest_cid, op::RST, 0, 0);
                    self.remove_connection(key);
                    return Some((hdr, Vec::new()));
                }
            }
        }
        None
    }

    /// Fills the guest's RX buffers with whatever is ready.
    fn fill_rx(&mut self) {
        if self.core.quiesced || !self.core.activated {
            return;
        }
        let mut delivered = false;
        loop {
            let mem = self.core.mem();
            let Some(chain) = self.core.queues[RX].pop_descriptor_chain(mem.clone()) else {
                // Out of buffers: ask for a kick when the guest adds some, unless it just did.
                self.rx_starved = true;
                match self.core.queues[RX].enable_notification(&*mem) {
                    Ok(true) => continue,
                    _ => break,
                }
            };
            self.rx_starved = false;
            let head = chain.head_index();
            let segs: Vec<(GuestAddress, usize)> =
                chain.filter(|d| d.is_write_only()).map(|d| (d.addr(), d.len() as usize)).collect();
            let capacity: usize = segs.iter().map(|s| s.1).sum();
            if capacity < HEADER_LEN {
                self.core.guest_error("RX buffer smaller than a packet header", format_args!("head {head}"));
                self.core.complete(RX, head, 0);
                continue;
            }
            let Some((hdr, payload)) = self.next_rx_packet(capacity - HEADER_LEN) else {
                QueueProcessor::unpop(&mut self.core, RX);
                break;
            };
            let mut packet = hdr.to_bytes().to_vec();
            packet.extend_from_slice(&payload);
            let mut written = 0;
            for (addr, len) in segs {
                if written == packet.len() {
                    break;
                }
                let n = len.min(packet.len() - written);
                if mem.write_slice(&packet[written..written + n], addr).is_err() {
                    self.core.guest_error("RX buffer outside guest memory", format_args!("head {head}"));
                    break;
                }
                written += n;
            }
            if self.core.queues[RX].add_used(&*mem, head, written as u32).is_err() {
                self.core.guest_error("bad used ring", format_args!("RX head {head}"));
            }
            self.rx_metrics.record(Duration::ZERO, true, payload.len() as u64, 0);
            delivered = true;
        }
        if delivered {
            self.core.notify_if_needed(RX);
        }
    }
}

impl VirtioDevice for VirtioVsock {
    fn core(&self) -> &VirtioCore {
        &self.core
    }

    fn core_mut(&mut self) -> &mut VirtioCore {
        &mut self.core
    }

    /// `struct virtio_vsock_config`: guest_cid.
    fn config_space(&self) -> Vec<u8> {
        self.guest_cid.to_le_bytes().to_vec()
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        self.core.guest_error("write to read-only config space", format_args!("offset {offset:#x}"));
    }

    fn activate(&mut self) -> Result<(), ActivateError> {
        Ok(())
    }

    /// The driver went away: every connection is gone with it.
    fn reset(&mut self) {
        self.conns.clear();
        self.tokens.clear();
        self.stray_resets.clear();
        self.rx_starved = false;
    }

    fn queue_notified(&mut self, index: usize) {
        if !self.core.accept_notification(index) {
            return;
        }
        match index {
            TX => self.process_tx(),
            RX => self.fill_rx(),
            // The event queue only carries transport resets, which we never send.
            EVENT => {}
            _ => {}
        }
    }

    fn event_sources(&self) -> Vec<EventSource> {
        let mut sources: Vec<EventSource> = Vec::new();
        if !self.core.quiesced && self.core.activated {
            sources.extend(
                self.backend.event_fds().into_iter().map(|fd| EventSource { fd, token: BACKEND_TOKEN, events: EventSet::IN }),
            );
        }
        for conn in self.conns.values() {
            let mut events = EventSet::empty();
            if conn.wants_host_read() && !self.rx_starved && !self.core.quiesced {
                events |= EventSet::IN;
            }
            if conn.wants_host_write() {
                events |= EventSet::OUT;
            }
            if !events.is_empty() {
                sources.push(EventSource { fd: conn.stream.as_raw_fd(), token: conn.token, events });
            }
        }
        sources
    }

    fn handle_event(&mut self, token: u32, events: EventSet) {
        if token == BACKEND_TOKEN {
            for (stream, guest_port) in self.backend.accept() {
                let host_port = self.next_host_port;
                self.next_host_port = self.next_host_port.checked_add(1).unwrap_or(FIRST_EPHEMERAL_PORT);
                let conn = self.add_connection(stream, host_port, guest_port, State::AwaitingGuest);
                conn.control.push_back((op::REQUEST, 0));
            }
        } else if let Some(&key) = self.tokens.get(&token)
            && events.contains(EventSet::OUT)
        {
            self.flush_connection(key);
        }
        self.fill_rx();
    }

    /// Guest data accepted but not yet written to its host stream.
    fn in_flight(&self) -> usize {
        self.conns.values().filter(|c| !c.tx_buf.is_empty()).count()
    }

    fn poll_backend(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.flush_connection(key);
        }
    }
}
