//! The virtio-vsock device: guest packets (TX queue) drive a table of connections to host Unix
//! streams; host data and control packets go back through the RX queue as the guest's credit
//! and buffers allow.
//!
//! Connections do not move with the device's state (a snapshot, a restore): each one is a host
//! socket held by this process. A device continuing from exported state starts with no
//! connections, and the guest's next packet on one it still thinks open is answered with RST,
//! as after a host-side close; new connections work at once.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use event_manager::EventSet;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use super::HOST_CID;
use super::backend::VsockBackend;
use super::connection::{CONN_BUF, Connection, State};
use super::packet::{HEADER_LEN, Header, TYPE_STREAM, op, shutdown};
use crate::SharedGuestMem;
use crate::interrupt::InterruptLine;
use crate::lifecycle::{BackendSlot, Incompatible};
use crate::metrics::RequestMetrics;
use crate::virtio::{
    ActivateError, DEVICE_TOKEN_BASE, DeviceType, EventSource, QueueProcessor, VirtioCore, VirtioDevice, features,
};

/// Maximum size of each of the device's three queues (RX, TX, event), in descriptors.
pub const VSOCK_QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
const EVENT: usize = 2;
const BACKEND_TOKEN: u32 = DEVICE_TOKEN_BASE;
const FIRST_CONN_TOKEN: u32 = DEVICE_TOKEN_BASE + 1;
/// Largest payload in one packet (Linux uses up to 64 KiB).
const MAX_PAYLOAD: usize = 64 * 1024;
/// Most connections open at once: each holds a host descriptor and buffers, and the guest
/// must not be able to run the VMM out of either.
pub const MAX_CONNECTIONS: usize = 512;
/// Most RSTs waiting for RX buffers (for packets matching no connection); more are dropped,
/// so a guest that sends junk and posts no buffers cannot grow the queue without bound.
const MAX_STRAY_RESETS: usize = VSOCK_QUEUE_SIZE as usize;
/// Host ports for host-initiated connections are taken from here up.
const FIRST_EPHEMERAL_PORT: u32 = 1 << 30;

type ConnKey = (u32, u32); // (host port, guest port)

/// A virtio-vsock device: stream connections between guest ports and host Unix sockets.
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
    /// Creates the device for a guest with context id `guest_cid`, its host side served by
    /// `backend`.
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

    /// The current host side.
    pub fn backend(&self) -> &dyn VsockBackend {
        &*self.backend
    }

    /// Number of open connections (including ones awaiting the guest's answer or closing).
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Packet counters: (RX, host to guest; TX, guest to host).
    pub fn metrics(&self) -> (Arc<RequestMetrics>, Arc<RequestMetrics>) {
        (self.rx_metrics.clone(), self.tx_metrics.clone())
    }

    fn add_connection(
        &mut self,
        stream: std::os::unix::net::UnixStream,
        host_port: u32,
        guest_port: u32,
        state: State,
    ) -> &mut Connection {
        let token = self.next_token;
        self.next_token = self.next_token.checked_add(1).unwrap_or(FIRST_CONN_TOKEN);
        self.tokens.insert(token, (host_port, guest_port));
        self.conns
            .entry((host_port, guest_port))
            .or_insert(Connection::new(stream, host_port, guest_port, state, token))
    }

    fn remove_connection(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.remove(&key) {
            self.tokens.remove(&conn.token);
        }
    }

    /// An RST answering `hdr`, for packets that match no connection.
    fn reset_for(&mut self, hdr: &Header) {
        if hdr.op != op::RST {
            if self.stray_resets.len() >= MAX_STRAY_RESETS {
                self.core.guest_error("stray packets faster than RX buffers; reset dropped", format_args!(""));
                return;
            }
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
            self.core
                .guest_error("packet with wrong addresses dropped", format_args!("{} -> {}", hdr.src_cid, hdr.dst_cid));
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
            if self.conns.len() >= MAX_CONNECTIONS {
                self.core.guest_error("too many vsock connections; request refused", format_args!("{MAX_CONNECTIONS}"));
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
                    conn.reset();
                    return;
                }
                conn.tx_buf.extend(payload);
            }
            op::CREDIT_UPDATE => {}
            // One pending update answers any number of requests.
            op::CREDIT_REQUEST if !conn.control.contains(&(op::CREDIT_UPDATE, 0)) => {
                conn.control.push_back((op::CREDIT_UPDATE, 0))
            }
            op::CREDIT_REQUEST => {}
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
                conn.reset();
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
            conn.reset();
            return;
        }
        if conn.guest_done && conn.tx_buf.is_empty() && conn.state == State::Established {
            let _ = conn.stream.shutdown(std::net::Shutdown::Write);
            if conn.host_eof {
                conn.reset();
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
            if want == 0 {
                // Nothing fits (a header-sized buffer): reading zero bytes would look like EOF.
                continue;
            }
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
        if self.core.quiesced() || !self.core.activated {
            return;
        }
        let mut delivered = false;
        loop {
            let mem = self.core.mem();
            let Some(chain) = self.core.queues[RX].pop_descriptor_chain(mem.clone()) else {
                // Out of buffers: ask for a kick when the guest adds some, unless it just did.
                self.rx_starved = true;
                match self.core.rearm_notification(RX) {
                    true => continue,
                    false => break,
                }
            };
            self.rx_starved = false;
            let head = chain.head_index();
            if self.core.indirect_not_negotiated(RX, head) {
                self.core.complete(RX, head, 0);
                continue;
            }
            let segs: Vec<(GuestAddress, usize)> =
                chain.filter(|d| d.is_write_only()).map(|d| (d.addr(), d.len() as usize)).collect();
            let capacity: usize = segs.iter().map(|s| s.1).sum();
            if capacity <= HEADER_LEN {
                // With no room for data it could only ever carry control packets, and would
                // block the queue as soon as data is next: no driver posts such buffers.
                self.core.guest_error("RX buffer with no room for data", format_args!("head {head}"));
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
        if !self.core.quiesced() && self.core.activated {
            sources.extend(self.backend.event_fds().into_iter().map(|fd| EventSource {
                fd,
                token: BACKEND_TOKEN,
                events: EventSet::IN,
            }));
        }
        for conn in self.conns.values() {
            let mut events = EventSet::empty();
            if conn.wants_host_read() && !self.rx_starved && !self.core.quiesced() {
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
                if self.conns.len() >= MAX_CONNECTIONS {
                    log::warn!(
                        "vsock: {MAX_CONNECTIONS} connections open; host connection to port {guest_port} closed"
                    );
                    continue;
                }
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

/// Swapping the host side keeps every open connection: each is a host stream the device owns,
/// independent of the listening socket. New host connections arrive through the new socket,
/// and guest connections to host ports go to `<new socket>_<port>`.
impl BackendSlot for VirtioVsock {
    type Backend = dyn VsockBackend;

    fn backend_description(&self) -> String {
        self.backend.description()
    }

    fn check_compatible(&self, new: &dyn VsockBackend) -> Result<(), Incompatible> {
        if new.description() == self.backend.description() {
            return Err(Incompatible(format!("already using {}", new.description())));
        }
        Ok(())
    }

    fn replace_backend(&mut self, new: Box<dyn VsockBackend>) -> Box<dyn VsockBackend> {
        std::mem::replace(&mut self.backend, new)
    }

    /// Nothing to hold: a refused guest connection is answered with RST either way.
    fn set_probation(&mut self, _on: bool) {}

    fn probation_failures(&self) -> u64 {
        0
    }

    /// Connections live in the device, not the backend: nothing to abandon.
    fn abandon_in_flight(&mut self) {}
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::path::PathBuf;

    use super::*;
    use crate::GuestMem;
    use crate::virtio::testing::{F_WRITE, add_chain, install, irq, memory, used};
    use crate::vsock::UnixVsockBackend;

    const QS: u16 = VSOCK_QUEUE_SIZE;
    const CID: u64 = 3;

    struct Env {
        dev: VirtioVsock,
        dir: PathBuf,
        /// Next free descriptor index per queue, and RX buffers handed out so far.
        next_tx: u16,
        next_rx: u16,
    }

    impl Drop for Env {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn env(tag: &str) -> Env {
        let dir = std::env::temp_dir().join(format!("vsockdev-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let backend = Box::new(UnixVsockBackend::bind(&dir.join("v.sock")).unwrap());
        let (_, line) = irq();
        let mut dev = VirtioVsock::new(CID, backend, line, memory()).unwrap();
        install(&mut dev.core, &[QS, QS, QS]);
        Env { dev, dir, next_tx: 0, next_rx: 0 }
    }

    #[test]
    fn whole_state_moves_to_a_new_instance() {
        let (mut old, mut new) = (env("state-old"), env("state-new"));
        crate::virtio::testing::assert_state_moves(&mut old.dev, &mut new.dev);
    }

    fn guest_header(src_port: u32, dst_port: u32, op: u16, len: u32) -> Header {
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len,
            type_: TYPE_STREAM,
            op,
            buf_alloc: 64 * 1024,
            ..Default::default()
        }
    }

    impl Env {
        fn mem(&self) -> vm_memory::GuestMemoryLoadGuard<GuestMem> {
            self.dev.core.mem()
        }

        /// The guest sends one packet.
        fn send(&mut self, hdr: Header, payload: &[u8]) {
            let mem = self.mem();
            let at = 0x10_0000 + u64::from(self.next_tx) * 0x1_0000;
            mem.write_slice(&hdr.to_bytes(), GuestAddress(at)).unwrap();
            mem.write_slice(payload, GuestAddress(at + HEADER_LEN as u64)).unwrap();
            let len = (HEADER_LEN + payload.len()) as u32;
            drop(mem);
            add_chain(&self.dev.core, TX, &[(at, len, 0)], self.next_tx);
            self.next_tx += 1;
            self.dev.queue_notified(TX);
        }

        /// The guest offers `n` RX buffers of 4 KiB.
        fn offer_rx(&mut self, n: u16) {
            for _ in 0..n {
                let at = 0x30_0000 + u64::from(self.next_rx) * 0x1000;
                add_chain(&self.dev.core, RX, &[(at, 4096, F_WRITE)], self.next_rx);
                self.next_rx += 1;
            }
            self.dev.queue_notified(RX);
        }

        /// Every packet the device put in RX buffers so far.
        fn received(&self) -> Vec<(Header, Vec<u8>)> {
            let mem = self.mem();
            let (_, elems) = used(&self.dev.core, RX);
            elems
                .iter()
                .filter(|&&(_, len)| len as usize >= HEADER_LEN)
                .map(|&(id, len)| {
                    let at = 0x30_0000 + u64::from(id) * 0x1000;
                    let mut b = vec![0u8; len as usize];
                    mem.read_slice(&mut b, GuestAddress(at)).unwrap();
                    let hdr = Header::from_bytes(b[..HEADER_LEN].try_into().unwrap());
                    (hdr, b[HEADER_LEN..].to_vec())
                })
                .collect()
        }

        /// Runs the device's event handlers for every ready host-side descriptor.
        fn pump(&mut self) {
            for _ in 0..50 {
                let sources = self.dev.event_sources();
                let mut fds: Vec<libc::pollfd> = sources
                    .iter()
                    .map(|s| libc::pollfd { fd: s.fd, events: libc::POLLIN | libc::POLLOUT, revents: 0 })
                    .collect();
                // SAFETY: a valid pollfd array.
                let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 20) };
                if n <= 0 {
                    return;
                }
                for (s, p) in sources.iter().zip(&fds) {
                    if p.revents != 0 {
                        self.dev.handle_event(s.token, s.events);
                    }
                }
            }
        }
    }

    #[test]
    fn guest_connects_and_data_flows_both_ways() {
        let mut e = env("guest");
        let host = UnixListener::bind(e.dir.join("v.sock_5000")).unwrap();
        e.offer_rx(8);
        e.send(guest_header(49152, 5000, op::REQUEST, 0), &[]);
        let (mut conn, _) = host.accept().unwrap();
        conn.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        let rx = e.received();
        assert_eq!(rx[0].0.op, op::RESPONSE);
        assert_eq!((rx[0].0.src_port, rx[0].0.dst_port, rx[0].0.dst_cid), (5000, 49152, CID));

        e.send(guest_header(49152, 5000, op::RW, 5), b"hello");
        let mut buf = [0u8; 5];
        conn.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello");

        conn.write_all(b"world!").unwrap();
        e.pump();
        let rx = e.received();
        let data = rx.iter().find(|(h, _)| h.op == op::RW).expect("data reaches the guest");
        assert_eq!(data.1, b"world!");
        assert_eq!(data.0.fwd_cnt, 5, "our fwd_cnt counts what reached the host");

        drop(conn);
        e.pump();
        assert!(e.received().iter().any(|(h, _)| h.op == op::SHUTDOWN), "host close becomes SHUTDOWN");
        e.send(guest_header(49152, 5000, op::RST, 0), &[]);
        assert_eq!(e.dev.connections(), 0);
    }

    #[test]
    fn host_connects_with_the_connect_handshake() {
        let mut e = env("host");
        e.offer_rx(4);
        let mut client = UnixStream::connect(e.dir.join("v.sock")).unwrap();
        client.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        client.write_all(b"CONNECT 1234\n").unwrap();
        e.pump();
        let req = e.received().into_iter().find(|(h, _)| h.op == op::REQUEST).expect("REQUEST to the guest");
        assert_eq!(req.0.dst_port, 1234);
        let host_port = req.0.src_port;
        assert!(host_port >= FIRST_EPHEMERAL_PORT);
        e.send(guest_header(1234, host_port, op::RESPONSE, 0), &[]);
        e.pump();
        let mut line = [0u8; 64];
        let n = client.read(&mut line).unwrap();
        assert_eq!(std::str::from_utf8(&line[..n]).unwrap(), format!("OK {host_port}\n"));
    }

    #[test]
    fn unknown_connections_and_refused_ports_get_rst() {
        let mut e = env("rst");
        e.offer_rx(4);
        e.send(guest_header(40000, 7777, op::REQUEST, 0), &[]); // nobody listens on 7777
        e.send(guest_header(40001, 80, op::RW, 3), b"abc"); // no such connection
        let ops: Vec<u16> = e.received().iter().map(|(h, _)| h.op).collect();
        assert_eq!(ops, vec![op::RST, op::RST]);
        // Packets with a forged source CID are dropped without an answer.
        let mut forged = guest_header(1, 2, op::REQUEST, 0);
        forged.src_cid = 99;
        e.send(forged, &[]);
        assert_eq!(e.received().len(), 2);
    }

    #[test]
    fn guest_exceeding_its_credit_is_reset() {
        let mut e = env("credit");
        let host = UnixListener::bind(e.dir.join("v.sock_6000")).unwrap();
        e.offer_rx(4);
        e.send(guest_header(50000, 6000, op::REQUEST, 0), &[]);
        let (_conn, _) = host.accept().unwrap();
        // The host never reads, so the connection buffer fills; the socket takes some first.
        let chunk = vec![0x5a; 60 * 1024];
        for _ in 0..40 {
            e.send(guest_header(50000, 6000, op::RW, chunk.len() as u32), &chunk);
            if e.received().iter().any(|(h, _)| h.op == op::RST) {
                break;
            }
            e.offer_rx(1);
        }
        assert!(e.received().iter().any(|(h, _)| h.op == op::RST), "overrunning buf_alloc resets the connection");
        assert_eq!(e.dev.connections(), 0);
    }

    #[test]
    fn an_avail_index_beyond_the_queue_size_does_not_hang_rx() {
        let mut e = env("badidx");
        e.send(guest_header(40000, 7777, op::REQUEST, 0), &[]); // an RST waits for a buffer
        let mem = e.mem();
        let avail = e.dev.core.queues[RX].avail_ring();
        mem.write_obj(QS + 5, GuestAddress(avail + 2)).unwrap();
        drop(mem);
        e.dev.queue_notified(RX); // used to spin here for ever
        assert_eq!(e.received().len(), 0);
    }

    #[test]
    fn a_header_sized_rx_buffer_does_not_end_the_connection() {
        let mut e = env("tiny");
        let host = UnixListener::bind(e.dir.join("v.sock_5001")).unwrap();
        e.offer_rx(1);
        e.send(guest_header(49153, 5001, op::REQUEST, 0), &[]);
        let (mut conn, _) = host.accept().unwrap();
        conn.write_all(b"data").unwrap();
        // Only room for a header: nothing can be delivered, and nothing must look like EOF.
        add_chain(&e.dev.core, RX, &[(0x30_0000 + 0x1000, HEADER_LEN as u32, F_WRITE)], e.next_rx);
        e.next_rx += 1;
        e.dev.queue_notified(RX);
        e.pump();
        assert!(e.received().iter().all(|(h, _)| h.op != op::SHUTDOWN), "{:?}", e.received());
        e.offer_rx(1);
        e.pump();
        let data = e.received().into_iter().find(|(h, _)| h.op == op::RW).expect("the data arrives later");
        assert_eq!(data.1, b"data");
    }

    #[test]
    fn guest_state_is_bounded() {
        let mut e = env("bounds");
        // No RX buffers: RSTs for junk queue up, but only so many.
        for port in 0..(MAX_STRAY_RESETS as u32 + 50) {
            e.send(guest_header(40000 + port, 9, op::RW, 0), &[]);
            e.next_tx %= 32;
        }
        assert_eq!(e.dev.stray_resets.len(), MAX_STRAY_RESETS);
        e.dev.stray_resets.clear();
        // Credit requests are answered by one pending update, however many arrive.
        let host = UnixListener::bind(e.dir.join("v.sock_6001")).unwrap();
        e.send(guest_header(50001, 6001, op::REQUEST, 0), &[]);
        let (_conn, _) = host.accept().unwrap();
        for _ in 0..100 {
            e.send(guest_header(50001, 6001, op::CREDIT_REQUEST, 0), &[]);
            e.next_tx %= 32;
        }
        let conn = e.dev.conns.values().next().unwrap();
        assert_eq!(conn.control.iter().filter(|c| c.0 == op::CREDIT_UPDATE).count(), 1);
        // Bad packets on a connection being reset queue one RST, not one each.
        for _ in 0..100 {
            e.send(guest_header(50001, 6001, 99, 0), &[]);
            e.next_tx %= 32;
        }
        let conn = e.dev.conns.values().next().unwrap();
        assert_eq!(conn.control.iter().filter(|c| c.0 == op::RST).count(), 1);
    }
}
