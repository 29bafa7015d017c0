//! The virtio-net device: guest frames from the TX queue go to the backend; frames from the
//! backend fill the RX queue's buffers (merged across several when negotiated).
//!
//! Nothing is dropped for lack of room: when the backend cannot take a frame, TX waits for it
//! to become writable; when the guest has no RX buffers, the frame waits and the backend is not
//! read until the guest adds some.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::time::Instant;

use event_manager::EventSet;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use super::backend::{MAX_FRAME, NetBackend};
use crate::SharedGuestMem;
use crate::interrupt::InterruptLine;
use crate::lifecycle::{BackendSlot, Incompatible};
use crate::metrics::RequestMetrics;
use crate::virtio::{
    ActivateError, DEVICE_TOKEN_BASE, DeviceType, EventSource, QueueProcessor, VirtioCore, VirtioDevice, features,
};

/// Maximum size of each of the device's two queues (RX, TX), in descriptors.
pub const NET_QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
const BACKEND_TOKEN: u32 = DEVICE_TOKEN_BASE;
/// `struct virtio_net_hdr_v1`: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers.
const HDR_LEN: usize = 12;
/// Frames handled per event before yielding to other devices.
const BUDGET: usize = 256;
/// Most frames a replaced backend hands over when it closes (its socket buffer's worth).
const MAX_TAKEN_AT_CLOSE: usize = 4096;

mod feature {
    pub const MTU: u64 = 1 << 3;
    pub const MAC: u64 = 1 << 5;
    pub const MRG_RXBUF: u64 = 1 << 15;
    pub const STATUS: u64 = 1 << 16;
}
const LINK_UP: u16 = 1;

/// Identity of the NIC, kept across backend swaps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetSettings {
    /// The guest's MAC address.
    pub mac: [u8; 6],
    /// The MTU announced to the guest, in bytes (VIRTIO_NET_F_MTU); `None` offers no MTU
    /// feature, and the guest is assumed to use 1500.
    pub mtu: Option<u16>,
}

/// A virtio-net device: one RX/TX queue pair connected to a swappable [`NetBackend`].
pub struct VirtioNet {
    core: VirtioCore,
    backend: Box<dyn NetBackend>,
    settings: NetSettings,
    /// A guest frame the backend could not take yet, and its descriptor head.
    pending_tx: Option<(u16, Vec<u8>)>,
    /// Frames from a backend waiting for RX buffers, oldest first (one, unless a replaced
    /// backend's were taken in before it closed).
    pending_rx: VecDeque<Vec<u8>>,
    rx_buf: Vec<u8>,
    rx_metrics: Arc<RequestMetrics>,
    tx_metrics: Arc<RequestMetrics>,
    /// Under probation a frame the backend fails to send is kept for the next backend.
    probation: bool,
    probation_failures: u64,
}

impl VirtioNet {
    /// Creates the NIC described by `settings`, its frames going to and from `backend`.
    pub fn new(
        backend: Box<dyn NetBackend>,
        settings: NetSettings,
        interrupt: Box<dyn InterruptLine>,
        memory: SharedGuestMem,
    ) -> io::Result<Self> {
        let mut avail =
            features::VERSION_1 | features::RING_EVENT_IDX | feature::MAC | feature::MRG_RXBUF | feature::STATUS;
        if settings.mtu.is_some() {
            avail |= feature::MTU;
        }
        let core = VirtioCore::new(DeviceType::Net, avail, &[NET_QUEUE_SIZE, NET_QUEUE_SIZE], interrupt, memory)?;
        Ok(Self {
            core,
            backend,
            settings,
            pending_tx: None,
            pending_rx: VecDeque::new(),
            rx_buf: vec![0; MAX_FRAME],
            rx_metrics: Arc::default(),
            tx_metrics: Arc::default(),
            probation: false,
            probation_failures: 0,
        })
    }

    /// The current backend.
    pub fn backend(&self) -> &dyn NetBackend {
        &*self.backend
    }

    /// The NIC's identity (MAC, MTU), as the guest sees it.
    pub fn settings(&self) -> NetSettings {
        self.settings
    }

    /// Counters for received (host to guest) and transmitted (guest to host) frames.
    pub fn metrics(&self) -> (Arc<RequestMetrics>, Arc<RequestMetrics>) {
        (self.rx_metrics.clone(), self.tx_metrics.clone())
    }

    /// Sends the waiting frame, if any; false if the backend still cannot take it.
    fn flush_pending_tx(&mut self) -> bool {
        let Some((head, frame)) = self.pending_tx.take() else { return true };
        match self.backend.send(&frame) {
            Ok(()) => {
                self.tx_metrics.record(std::time::Duration::ZERO, true, 0, frame.len() as u64);
                self.core.complete(TX, head, 0);
                true
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.pending_tx = Some((head, frame));
                false
            }
            Err(_) if self.probation => {
                self.probation_failures += 1;
                self.pending_tx = Some((head, frame));
                false
            }
            Err(e) => {
                self.core.guest_error("backend send failed, frame dropped", format_args!("{e}"));
                self.tx_metrics.record_rejected();
                self.core.complete(TX, head, 0);
                true
            }
        }
    }

    fn process_tx(&mut self) {
        if !self.flush_pending_tx() {
            return;
        }
        let Self { core, backend, pending_tx, tx_metrics, probation, probation_failures, .. } = self;
        QueueProcessor::drain(core, TX, |core, chain| {
            let head = chain.head_index();
            let mem = core.mem();
            let mut frame = Vec::with_capacity(1514 + HDR_LEN);
            let mut bad = false;
            for desc in chain {
                if desc.is_write_only() || frame.len() + desc.len() as usize > MAX_FRAME + HDR_LEN {
                    bad = true;
                    break;
                }
                let start = frame.len();
                frame.resize(start + desc.len() as usize, 0);
                if mem.read_slice(&mut frame[start..], desc.addr()).is_err() {
                    bad = true;
                    break;
                }
            }
            drop(mem);
            if bad || frame.len() < HDR_LEN {
                core.guest_error("malformed TX chain dropped", format_args!("head {head}"));
                tx_metrics.record_rejected();
                core.complete(TX, head, 0);
                return true;
            }
            match backend.send(&frame[HDR_LEN..]) {
                Ok(()) => {
                    tx_metrics.record(std::time::Duration::ZERO, true, 0, (frame.len() - HDR_LEN) as u64);
                    core.complete(TX, head, 0);
                    true
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock || *probation => {
                    if e.kind() != io::ErrorKind::WouldBlock {
                        *probation_failures += 1;
                    }
                    frame.drain(..HDR_LEN);
                    *pending_tx = Some((head, frame));
                    false
                }
                Err(e) => {
                    core.guest_error("backend send failed, frame dropped", format_args!("{e}"));
                    tx_metrics.record_rejected();
                    core.complete(TX, head, 0);
                    true
                }
            }
        });
    }

    /// Moves frames from the backend into RX buffers until either runs out.
    fn process_rx(&mut self) {
        self.receive(None);
    }

    /// Moves frames from `previous` (a replaced backend), or from the current backend when
    /// `None`, into RX buffers until either runs out. Returns how many frames it handled.
    fn receive(&mut self, mut previous: Option<&mut dyn NetBackend>) -> usize {
        let mut handled = 0;
        if self.core.activated && !self.core.quiesced() {
            // While it has buffers, the driver need not tell us it added more: we look when
            // frames arrive. Kicks are asked for again only when we run dry (below).
            let mem = self.core.mem();
            let _ = self.core.queues[RX].disable_notification(&*mem);
        }
        for _ in 0..BUDGET {
            if self.core.quiesced() || !self.core.activated {
                return handled;
            }
            let frame = match self.pending_rx.pop_front() {
                Some(frame) => frame,
                None => match match previous.as_deref_mut() {
                    Some(previous) => previous.recv(&mut self.rx_buf),
                    None => self.backend.recv(&mut self.rx_buf),
                } {
                    Ok(n) => self.rx_buf[..n].to_vec(),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return handled,
                    Err(e) => {
                        self.core.guest_error("backend receive failed", format_args!("{e}"));
                        return handled;
                    }
                },
            };
            handled += 1;
            let started = Instant::now();
            match self.deliver(&frame) {
                Some(true) => self.rx_metrics.record(started.elapsed(), true, frame.len() as u64, 0),
                Some(false) => self.rx_metrics.record_rejected(),
                None => {
                    // No RX buffers: keep the frame and stop reading the backend. Ask the
                    // driver to kick when it adds buffers (with EVENT_IDX it only does when
                    // re-armed), and retry at once if some arrived in the meantime.
                    self.pending_rx.push_front(frame);
                    match self.core.rearm_notification(RX) {
                        true => continue,
                        false => return handled,
                    }
                }
            }
        }
        handled
    }

    /// Writes one frame into as many RX chains as it needs. `None`: not enough buffers
    /// available (nothing consumed); `Some(false)`: dropped because the guest's buffers cannot
    /// hold it; `Some(true)`: delivered.
    fn deliver(&mut self, frame: &[u8]) -> Option<bool> {
        let mergeable = self.core.has_feature(feature::MRG_RXBUF);
        let need = HDR_LEN + frame.len();
        let mem = self.core.mem();
        let mut start_avail = self.core.queues[RX].next_avail();

        // First gather enough buffers, so num_buffers is known before anything is written.
        let mut chains: Vec<(u16, Vec<(GuestAddress, usize)>)> = Vec::new();
        let mut capacity = 0usize;
        while capacity < need {
            let Some(chain) = self.core.queues[RX].pop_descriptor_chain(mem.clone()) else {
                self.core.queues[RX].set_next_avail(start_avail);
                return None;
            };
            let head = chain.head_index();
            // An indirect table never offered is not followed: the buffer goes back unused (or,
            // met after other buffers of this frame, stops the frame where it is: only a guest
            // mixing such buffers with good ones stalls, and only its own receive queue).
            if self.core.indirect_not_negotiated(RX, head) {
                if chains.is_empty() {
                    self.core.complete(RX, head, 0);
                    start_avail = self.core.queues[RX].next_avail();
                    continue;
                }
                self.core.queues[RX].set_next_avail(start_avail);
                return None;
            }
            let segs: Vec<(GuestAddress, usize)> =
                chain.filter(|d| d.is_write_only()).map(|d| (d.addr(), d.len() as usize)).collect();
            capacity += segs.iter().map(|s| s.1).sum::<usize>();
            chains.push((head, segs));
            if !mergeable {
                break;
            }
        }

        let mut packet = vec![0u8; HDR_LEN];
        // num_buffers (the header's last field) is 1 unless buffers are merged.
        packet[10..12].copy_from_slice(&(chains.len() as u16).to_le_bytes());
        packet.extend_from_slice(frame);
        let fits = capacity >= need;
        if !fits {
            self.core.guest_error("RX buffers too small for the frame", format_args!("{} bytes", frame.len()));
        }

        let mut written = 0usize;
        let mut ok = fits;
        for (head, segs) in chains {
            let mut chain_len = 0u32;
            for (addr, len) in segs {
                if !ok || written == packet.len() {
                    break;
                }
                let n = len.min(packet.len() - written);
                if mem.write_slice(&packet[written..written + n], addr).is_err() {
                    self.core.guest_error("RX buffer outside guest memory", format_args!("head {head}"));
                    ok = false;
                    break;
                }
                written += n;
                chain_len += n as u32;
            }
            let len = if ok { chain_len } else { 0 };
            if self.core.queues[RX].add_used(&*mem, head, len).is_err() {
                self.core.guest_error("bad used ring", format_args!("RX head {head}"));
            }
        }
        drop(mem);
        self.core.notify_if_needed(RX);
        Some(ok && written == packet.len())
    }
}

impl VirtioDevice for VirtioNet {
    fn core(&self) -> &VirtioCore {
        &self.core
    }

    fn core_mut(&mut self) -> &mut VirtioCore {
        &mut self.core
    }

    /// `struct virtio_net_config`: mac, status, max_virtqueue_pairs, mtu.
    fn config_space(&self) -> Vec<u8> {
        let mut c = vec![0u8; 12];
        c[0..6].copy_from_slice(&self.settings.mac);
        c[6..8].copy_from_slice(&LINK_UP.to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c[10..12].copy_from_slice(&self.settings.mtu.unwrap_or(1500).to_le_bytes());
        c
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        self.core.guest_error("write to read-only config space", format_args!("offset {offset:#x}"));
    }

    fn activate(&mut self) -> Result<(), ActivateError> {
        Ok(())
    }

    fn reset(&mut self) {
        self.pending_tx = None;
        self.pending_rx.clear();
    }

    fn queue_notified(&mut self, index: usize) {
        if !self.core.accept_notification(index) {
            return;
        }
        match index {
            RX => self.process_rx(),
            TX => self.process_tx(),
            _ => {}
        }
    }

    fn event_sources(&self) -> Vec<EventSource> {
        let mut events = EventSet::empty();
        // Read the backend only when there is somewhere to put frames.
        if self.core.activated && !self.core.quiesced() && self.pending_rx.is_empty() {
            events |= EventSet::IN;
        }
        // Wait for room when a guest frame is stuck (also while draining).
        if self.pending_tx.is_some() {
            events |= EventSet::OUT;
        }
        if events.is_empty() {
            return Vec::new();
        }
        vec![EventSource { fd: self.backend.fd(), token: BACKEND_TOKEN, events }]
    }

    fn handle_event(&mut self, token: u32, events: EventSet) {
        if token != BACKEND_TOKEN {
            return;
        }
        if events.contains(EventSet::OUT) {
            self.process_tx();
        }
        if events.contains(EventSet::IN) {
            self.process_rx();
        }
    }

    fn in_flight(&self) -> usize {
        usize::from(self.pending_tx.is_some())
    }

    fn poll_backend(&mut self) {
        self.flush_pending_tx();
    }
}

impl BackendSlot for VirtioNet {
    type Backend = dyn NetBackend;

    fn backend_description(&self) -> String {
        self.backend.description()
    }

    /// The NIC's identity (MAC, MTU) belongs to the device, and the guest keeps it across a
    /// swap, so the only check is the MTU: a backend reporting an MTU below the one the device
    /// announced (1500 when none was set) is refused; one reporting none, or at least that, is
    /// accepted.
    fn check_compatible(&self, new: &dyn NetBackend) -> Result<(), Incompatible> {
        let announced = self.settings.mtu.unwrap_or(1500);
        match new.mtu() {
            Some(mtu) if mtu < announced => Err(Incompatible(format!(
                "{} has MTU {mtu}, below the {announced} the guest was told",
                new.description()
            ))),
            _ => Ok(()),
        }
    }

    fn replace_backend(&mut self, new: Box<dyn NetBackend>) -> Box<dyn NetBackend> {
        // A frame already read from the old backend (pending_rx) is still delivered, and one
        // the guest sent (pending_tx) goes out through the new backend.
        std::mem::replace(&mut self.backend, new)
    }

    fn set_probation(&mut self, on: bool) {
        self.probation = on;
        if on {
            self.probation_failures = 0;
        }
    }

    fn probation_failures(&self) -> u64 {
        self.probation_failures
    }

    /// The device holds nothing in the backend: a stuck frame stays in `pending_tx`.
    fn abandon_in_flight(&mut self) {}

    /// Frames that reach the old backend after the switch are mostly the peer's answers to
    /// frames the guest sent through it just before: delivered like any other, not lost.
    /// Before it closes, everything it still holds is taken in, RX buffers or not.
    fn drain_previous(&mut self, previous: &mut Self::Backend, last: bool) -> bool {
        let mut taken = 0;
        while last && taken < MAX_TAKEN_AT_CLOSE {
            match previous.recv(&mut self.rx_buf) {
                Ok(n) => self.pending_rx.push_back(self.rx_buf[..n].to_vec()),
                Err(_) => break,
            }
            taken += 1;
        }
        // Any frame handled may have filled the RX queue or emptied `pending_rx`, which
        // changes what the event loop must watch.
        self.receive(Some(previous)) + taken > 0
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::os::fd::{AsRawFd, RawFd};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::lifecycle::Lifecycle;
    use crate::virtio::testing::{F_WRITE, add_chain, install, irq, memory, used};

    /// Frames in memory; `blocked` makes `send` report WouldBlock.
    #[derive(Clone, Default)]
    struct Wire {
        to_guest: Arc<Mutex<VecDeque<Vec<u8>>>>,
        from_guest: Arc<Mutex<Vec<Vec<u8>>>>,
        blocked: Arc<AtomicBool>,
    }

    struct FakeBackend {
        wire: Wire,
        evt: EventFd,
        mtu: Option<u16>,
    }

    impl NetBackend for FakeBackend {
        fn description(&self) -> String {
            "fake".into()
        }
        fn fd(&self) -> RawFd {
            self.evt.as_raw_fd()
        }
        fn send(&mut self, frame: &[u8]) -> io::Result<()> {
            if self.wire.blocked.load(Ordering::SeqCst) {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.wire.from_guest.lock().unwrap().push(frame.to_vec());
            Ok(())
        }
        fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let frame = self.wire.to_guest.lock().unwrap().pop_front().ok_or(io::ErrorKind::WouldBlock)?;
            buf[..frame.len()].copy_from_slice(&frame);
            Ok(frame.len())
        }
        fn mtu(&self) -> Option<u16> {
            self.mtu
        }
    }

    #[test]
    fn a_backend_with_a_smaller_mtu_cannot_take_over() {
        let (dev, _) = device(true);
        let backend = |mtu| FakeBackend { wire: Wire::default(), evt: EventFd::new(0).unwrap(), mtu };
        let err = dev.check_compatible(&backend(Some(1300))).unwrap_err();
        assert!(err.to_string().contains("MTU 1300, below the 1400"), "{err}");
        assert!(dev.check_compatible(&backend(Some(1400))).is_ok());
        assert!(dev.check_compatible(&backend(None)).is_ok());
    }

    const QS: u16 = NET_QUEUE_SIZE;
    const MAC: [u8; 6] = [0x52, 0x54, 0, 1, 2, 3];

    fn device(mergeable: bool) -> (VirtioNet, Wire) {
        let wire = Wire::default();
        let backend = Box::new(FakeBackend { wire: wire.clone(), evt: EventFd::new(0).unwrap(), mtu: None });
        let (_, line) = irq();
        let mut dev = VirtioNet::new(backend, NetSettings { mac: MAC, mtu: Some(1400) }, line, memory()).unwrap();
        install(&mut dev.core, &[QS, QS]);
        dev.core.acked_features = features::VERSION_1 | if mergeable { feature::MRG_RXBUF } else { 0 };
        (dev, wire)
    }

    #[test]
    fn whole_state_moves_to_a_new_instance() {
        let (mut old, _) = device(true);
        let (mut new, _) = device(false);
        crate::virtio::testing::assert_state_moves(&mut old, &mut new);
    }

    #[test]
    fn tx_strips_the_header_and_sends_the_frame() {
        let (mut dev, wire) = device(true);
        let mem = dev.core.mem();
        mem.write_slice(&[0u8; HDR_LEN], GuestAddress(0x8_0000)).unwrap();
        mem.write_slice(b"ethernet frame bytes", GuestAddress(0x8_1000)).unwrap();
        add_chain(&dev.core, TX, &[(0x8_0000, HDR_LEN as u32, 0), (0x8_1000, 20, 0)], 0);
        // A malformed chain (a device-writable buffer on TX) is returned, not sent.
        add_chain(&dev.core, TX, &[(0x8_2000, 64, F_WRITE)], 2);
        dev.queue_notified(TX);
        assert_eq!(*wire.from_guest.lock().unwrap(), vec![b"ethernet frame bytes".to_vec()]);
        assert_eq!(used(&dev.core, TX), (2, vec![(0, 0), (2, 0)]));
        assert_eq!(dev.tx_metrics.snapshot().errors, 1);
    }

    #[test]
    fn rx_merges_buffers_and_sets_num_buffers() {
        let (mut dev, wire) = device(true);
        let mem = dev.core.mem();
        for i in 0..3u16 {
            add_chain(&dev.core, RX, &[(0x9_0000 + u64::from(i) * 0x1000, 1000, F_WRITE)], i);
        }
        let frame: Vec<u8> = (0..2500u32).map(|i| i as u8).collect();
        wire.to_guest.lock().unwrap().push_back(frame.clone());
        dev.handle_event(BACKEND_TOKEN, EventSet::IN);
        assert_eq!(used(&dev.core, RX), (3, vec![(0, 1000), (1, 1000), (2, 512)]));
        assert_eq!(mem.read_obj::<u16>(GuestAddress(0x9_000a)).unwrap(), 3, "num_buffers");
        let mut got = vec![0u8; 2512];
        for i in 0..3u64 {
            let n = if i == 2 { 512 } else { 1000 };
            mem.read_slice(&mut got[i as usize * 1000..i as usize * 1000 + n], GuestAddress(0x9_0000 + i * 0x1000))
                .unwrap();
        }
        assert_eq!(&got[HDR_LEN..], &frame[..]);
    }

    #[test]
    fn rx_waits_for_buffers_instead_of_dropping() {
        let (mut dev, wire) = device(false);
        wire.to_guest.lock().unwrap().push_back(vec![7u8; 100]);
        dev.handle_event(BACKEND_TOKEN, EventSet::IN);
        assert_eq!(dev.pending_rx.len(), 1, "held until the guest offers a buffer");
        assert!(dev.event_sources().is_empty(), "the backend is not read meanwhile");
        let mem = dev.core.mem();
        add_chain(&dev.core, RX, &[(0x9_0000, 2048, F_WRITE)], 0);
        dev.queue_notified(RX);
        assert_eq!(used(&dev.core, RX), (1, vec![(0, 112)]));
        assert_eq!(mem.read_obj::<u16>(GuestAddress(0x9_000a)).unwrap(), 1, "num_buffers is 1 unmerged");
        assert!(dev.pending_rx.is_empty());
        assert_eq!(dev.event_sources()[0].events, EventSet::IN);
    }

    #[test]
    fn frames_reaching_a_replaced_backend_are_delivered_not_dropped() {
        let (mut dev, old_wire) = device(false);
        let new_wire = Wire::default();
        let new = Box::new(FakeBackend { wire: new_wire.clone(), evt: EventFd::new(0).unwrap(), mtu: None });
        dev.quiesce();
        dev.set_probation(true);
        let mut old = dev.replace_backend(new);
        dev.resume();
        // Answers to frames sent through the old backend arrive there after the switch.
        old_wire.to_guest.lock().unwrap().extend([vec![1u8; 60], vec![2u8; 60], vec![3u8; 60]]);
        add_chain(&dev.core, RX, &[(0x9_0000, 2048, F_WRITE)], 0);
        assert!(dev.drain_previous(&mut *old, false), "a frame was delivered");
        assert_eq!(used(&dev.core, RX).0, 1);
        // No buffers left: a look during verification leaves the rest where it is...
        assert!(dev.drain_previous(&mut *old, false));
        assert_eq!(old_wire.to_guest.lock().unwrap().len(), 1);
        // ...but before the old backend closes, the device takes everything it holds.
        assert!(dev.drain_previous(&mut *old, true));
        assert!(old_wire.to_guest.lock().unwrap().is_empty());
        drop(old);
        assert_eq!(dev.pending_rx.len(), 2);
        for i in 1..3u16 {
            add_chain(&dev.core, RX, &[(0x9_0000 + u64::from(i) * 0x1000, 2048, F_WRITE)], i);
        }
        dev.queue_notified(RX);
        assert_eq!(used(&dev.core, RX).0, 3, "both held frames delivered once buffers came");
        let mem = dev.core.mem();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x9_2000 + HDR_LEN as u64)).unwrap(), 3, "in order");
        assert!(!dev.drain_previous(
            &mut *Box::new(FakeBackend { wire: Wire::default(), evt: EventFd::new(0).unwrap(), mtu: None }),
            true
        ));
    }

    #[test]
    fn frame_too_big_for_unmerged_buffers_is_dropped_and_returned() {
        let (mut dev, wire) = device(false);
        add_chain(&dev.core, RX, &[(0x9_0000, 64, F_WRITE)], 0);
        wire.to_guest.lock().unwrap().push_back(vec![1u8; 1500]);
        dev.handle_event(BACKEND_TOKEN, EventSet::IN);
        assert_eq!(used(&dev.core, RX), (1, vec![(0, 0)]));
        assert_eq!(dev.rx_metrics.snapshot().errors, 1);
    }

    #[test]
    fn tx_back_pressure_waits_for_the_backend_then_drains() {
        let (mut dev, wire) = device(true);
        wire.blocked.store(true, Ordering::SeqCst);
        for i in 0..2u16 {
            add_chain(&dev.core, TX, &[(0x8_0000 + u64::from(i) * 0x100, 40, 0)], i);
        }
        dev.queue_notified(TX);
        assert_eq!(dev.pending_requests(), 1, "one frame held for the backend");
        assert_eq!(used(&dev.core, TX).0, 0);
        assert!(dev.event_sources()[0].events.contains(EventSet::OUT));
        dev.quiesce();
        wire.blocked.store(false, Ordering::SeqCst);
        dev.drive();
        assert_eq!(dev.pending_requests(), 0, "draining sends the held frame");
        assert_eq!(used(&dev.core, TX).0, 1, "but takes nothing new while quiesced");
        dev.resume();
        assert!(dev.core.queue_events[TX].read().unwrap() > 0, "resume replays a kick for the event loop");
        dev.queue_notified(TX);
        assert_eq!(used(&dev.core, TX).0, 2);
        assert_eq!(wire.from_guest.lock().unwrap().len(), 2);
    }

    #[test]
    fn config_space_has_mac_status_and_mtu() {
        let (dev, _) = device(true);
        let c = dev.config_space();
        assert_eq!(&c[0..6], &MAC);
        assert_eq!(u16::from_le_bytes([c[6], c[7]]), LINK_UP);
        assert_eq!(u16::from_le_bytes([c[10], c[11]]), 1400);
        assert_ne!(dev.core.avail_features & feature::MTU, 0);
    }
}
