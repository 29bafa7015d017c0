//! virtio-net (device ID 1, virtio spec 5.1): receive queue 0 kept full of buffers, transmit
//! queue 1, no offloads and no control queue. With VIRTIO_F_VERSION_1 every packet starts
//! with the 12-byte `virtio_net_hdr` (its `num_buffers` field included), which we leave zero
//! on transmit.
use super::{Buf, Error, F_ACCESS_PLATFORM, F_ORDER_PLATFORM, Transport, Virtqueue};
use crate::dma;
use crate::time::Deadline;

pub const HDR_LEN: usize = 12;
pub const ETH_HLEN: usize = 14;
/// Ethernet payload size when the device does not state an MTU.
pub const DEFAULT_MTU: u16 = 1500;

const F_MTU: u64 = 1 << 3;
const F_MAC: u64 = 1 << 5;
const F_MRG_RXBUF: u64 = 1 << 15;
const F_STATUS: u64 = 1 << 16;

const CFG_MAC: u64 = 0;
const CFG_STATUS: u64 = 6;
const CFG_MTU: u64 = 10;
const S_LINK_UP: u16 = 1;

const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;
/// Offset of `num_buffers` in the header.
const HDR_NUM_BUFFERS: u64 = 10;
/// How long the rest of a merged packet may lag behind its first buffer.
const MERGE_TIMEOUT_MS: u64 = 100;
/// How long `shutdown` waits for queued transmissions.
const DRAIN_TIMEOUT_MS: u64 = 100;
/// Receive buffers we keep posted (at most).
const MAX_RX_BUFFERS: u16 = 128;

pub struct Net {
    transport: Transport,
    rx: Virtqueue,
    tx: Virtqueue,
    rx_base: u64,
    rx_buf_len: u32,
    tx_base: u64,
    tx_buf_len: u32,
    tx_free: &'static mut [u16],
    tx_free_count: usize,
    pub mac: [u8; 6],
    /// The MAC came from the device (VIRTIO_NET_F_MAC), rather than made up by us.
    pub mac_from_device: bool,
    pub mtu: u16,
    pub mtu_from_device: bool,
    pub mergeable: bool,
    /// Link state, if the device reports it (VIRTIO_NET_F_STATUS).
    pub link_up: Option<bool>,
    pub features: u64,
}

impl Net {
    /// Initializes the device with `tx_slots` transmit buffers. Sets FAILED on error.
    pub fn open(transport: Transport, tx_slots: usize) -> Result<Net, Error> {
        Self::init(transport.clone(), tx_slots).inspect_err(|_| transport.fail())
    }

    fn init(transport: Transport, tx_slots: usize) -> Result<Net, Error> {
        let features =
            transport.negotiate(F_MTU | F_MAC | F_MRG_RXBUF | F_STATUS | F_ACCESS_PLATFORM | F_ORDER_PLATFORM)?;
        let (mac, status, mtu) = transport.config(|c| {
            let mut mac = [0u8; 6];
            for (i, b) in mac.iter_mut().enumerate() {
                *b = c.u8(CFG_MAC + i as u64);
            }
            (mac, c.u16(CFG_STATUS), c.u16(CFG_MTU))
        });
        let mac_from_device = features & F_MAC != 0;
        let mac = if mac_from_device {
            mac
        } else {
            // A locally administered unicast address of our own.
            let r = crate::arch::rdtsc().to_le_bytes();
            [0x02, 0x4d, 0x47, r[0], r[1], r[2]]
        };
        let mtu_from_device = features & F_MTU != 0 && mtu >= 68;
        let mtu = if mtu_from_device { mtu } else { DEFAULT_MTU };
        let mergeable = features & F_MRG_RXBUF != 0;

        let rx = transport.setup_queue(RX_QUEUE, MAX_RX_BUFFERS)?;
        let tx_want = tx_slots.clamp(1, 1024).next_power_of_two() as u16;
        let tx = transport.setup_queue(TX_QUEUE, tx_want)?;
        // Without mergeable buffers each buffer must hold a whole packet: header, Ethernet
        // header, a VLAN tag and the MTU (at least 1526 bytes, spec 5.1.6.3.1).
        let frame_max = (HDR_LEN + ETH_HLEN + 4) as u32 + u32::from(mtu);
        let rx_buf_len = if mergeable { 2048 } else { frame_max.max(2048).next_multiple_of(1024) };
        let rx_count = rx.size();
        let rx_base = dma::alloc(u64::from(rx_count) * u64::from(rx_buf_len)).ok_or(Error::OutOfMemory)?;
        let tx_slots = tx_slots.clamp(1, usize::from(tx.size()));
        let tx_buf_len = frame_max.next_multiple_of(64);
        let tx_base = dma::alloc(tx_slots as u64 * u64::from(tx_buf_len)).ok_or(Error::OutOfMemory)?;
        let tx_free = dma::alloc_slice::<u16>(tx_slots).ok_or(Error::OutOfMemory)?;
        for (i, slot) in tx_free.iter_mut().enumerate() {
            *slot = i as u16;
        }
        let mut net = Net {
            transport,
            rx,
            tx,
            rx_base,
            rx_buf_len,
            tx_base,
            tx_buf_len,
            tx_free,
            tx_free_count: tx_slots,
            mac,
            mac_from_device,
            mtu,
            mtu_from_device,
            mergeable,
            link_up: (features & F_STATUS != 0).then_some(status & S_LINK_UP != 0),
            features,
        };
        for i in 0..rx_count {
            net.post_rx(i)?;
        }
        net.transport.driver_ok();
        // Notifications only after DRIVER_OK (spec 3.1.1).
        net.rx.kick();
        Ok(net)
    }

    fn rx_addr(&self, index: u32) -> u64 {
        self.rx_base + u64::from(index) * u64::from(self.rx_buf_len)
    }

    fn post_rx(&mut self, index: u16) -> Result<(), Error> {
        let addr = self.rx_addr(index.into());
        self.rx.push(&[Buf::writable(addr, self.rx_buf_len)], u32::from(index))
    }

    /// Largest Ethernet frame (header included, no FCS) we may send.
    pub fn max_frame(&self) -> usize {
        ETH_HLEN + usize::from(self.mtu)
    }

    /// Collects finished transmissions.
    pub fn reclaim_tx(&mut self) -> Result<(), Error> {
        while let Some(used) = self.tx.pop()? {
            self.tx_free[self.tx_free_count] = used.token as u16;
            self.tx_free_count += 1;
        }
        Ok(())
    }

    /// Queues one Ethernet frame for transmission and notifies the device. Returns false
    /// (sending nothing) when every transmit buffer is still in flight.
    pub fn send(&mut self, frame: &[u8]) -> Result<bool, Error> {
        assert!(frame.len() <= self.max_frame(), "frame larger than the MTU");
        self.reclaim_tx()?;
        if self.tx_free_count == 0 {
            return Ok(false);
        }
        self.tx_free_count -= 1;
        let slot = self.tx_free[self.tx_free_count];
        let addr = self.tx_base + u64::from(slot) * u64::from(self.tx_buf_len);
        // SAFETY: the slot's buffer is ours (not in flight) and holds the header and a frame
        // of up to max_frame() bytes.
        unsafe {
            core::ptr::write_bytes(addr as *mut u8, 0, HDR_LEN);
            core::ptr::copy_nonoverlapping(frame.as_ptr(), (addr + HDR_LEN as u64) as *mut u8, frame.len());
        }
        let len = (HDR_LEN + frame.len()) as u32;
        self.tx.push(&[Buf::readable(addr, len)], u32::from(slot))?;
        self.tx.kick();
        Ok(true)
    }

    /// Copies `len` bytes at `src` to `out[*total..]` (as much as fits) and advances `total`
    /// by the full length.
    fn gather(src: u64, len: usize, out: &mut [u8], total: &mut usize) {
        let n = len.min(out.len().saturating_sub(*total));
        // SAFETY: `src..src+len` lies in a receive buffer the device has finished with and
        // `out` has room for `n` more bytes.
        unsafe { core::ptr::copy_nonoverlapping(src as *const u8, out.as_mut_ptr().add(*total), n) };
        *total += len;
    }

    /// Receives one frame into `out`, if one has arrived. Returns the frame's full length
    /// (only the part that fits in `out` is copied). Buffers go straight back to the device.
    pub fn recv(&mut self, out: &mut [u8]) -> Result<Option<usize>, Error> {
        let Some(first) = self.rx.pop()? else {
            return Ok(None);
        };
        if first.len < HDR_LEN as u32 || first.len > self.rx_buf_len {
            return Err(Error::BadUsedLen { queue: RX_QUEUE, len: first.len });
        }
        let addr = self.rx_addr(first.token);
        let buffers = if self.mergeable {
            // SAFETY: the header the device wrote at the start of the buffer.
            u16::from_le(unsafe { core::ptr::read_volatile((addr + HDR_NUM_BUFFERS) as *const u16) }).max(1)
        } else {
            1
        };
        let mut total = 0usize;
        let payload = first.len as usize - HDR_LEN;
        Self::gather(addr + HDR_LEN as u64, payload, out, &mut total);
        self.post_rx(first.token as u16)?;
        for _ in 1..buffers {
            let deadline = Deadline::after_ms(MERGE_TIMEOUT_MS);
            let more = loop {
                if let Some(u) = self.rx.pop()? {
                    break u;
                }
                if deadline.expired() {
                    return Err(Error::Timeout {
                        what: "the rest of a merged receive packet",
                        ms: MERGE_TIMEOUT_MS,
                        status: self.transport.status(),
                    });
                }
                crate::arch::pause();
            };
            if more.len > self.rx_buf_len {
                return Err(Error::BadUsedLen { queue: RX_QUEUE, len: more.len });
            }
            Self::gather(self.rx_addr(more.token), more.len as usize, out, &mut total);
            self.post_rx(more.token as u16)?;
        }
        self.rx.kick();
        Ok(Some(total))
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
