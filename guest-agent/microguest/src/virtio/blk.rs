//! virtio-blk (device ID 2, virtio spec 5.2): one request queue, requests made of a 16-byte
//! header, an optional data buffer and a one-byte status, several in flight at once.
use super::{Buf, Error, F_ACCESS_PLATFORM, F_ORDER_PLATFORM, Transport, Virtqueue};
use crate::dma;
use crate::time::Deadline;

pub const SECTOR_SIZE: u64 = 512;

const F_SIZE_MAX: u64 = 1 << 1;
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;

const CFG_CAPACITY: u64 = 0;
const CFG_SIZE_MAX: u64 = 8;
const CFG_BLK_SIZE: u64 = 20;

/// Request types.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    In = 0,
    Out = 1,
    Flush = 4,
    GetId = 8,
}

/// Request status values written by the device; `STATUS_PENDING` is what we leave in the
/// status byte until the device overwrites it.
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;
pub const STATUS_PENDING: u8 = 0xff;

/// Length of the GET_ID answer.
pub const ID_BYTES: u32 = 20;

/// Per-slot request header and status byte, packed into one allocation.
const META_STRIDE: u64 = 32;
const STATUS_OFFSET: u64 = 16;

/// Name of a request status.
pub fn status_name(status: u8) -> &'static str {
    match status {
        S_OK => "OK",
        S_IOERR => "IOERR",
        S_UNSUPP => "UNSUPP",
        STATUS_PENDING => "no status written",
        _ => "invalid status",
    }
}

pub struct Blk {
    transport: Transport,
    queue: Virtqueue,
    meta: u64,
    slots: usize,
    in_flight: usize,
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    pub read_only: bool,
    pub flush: bool,
    /// Largest single data segment (VIRTIO_BLK_F_SIZE_MAX), if the device limits it.
    pub size_max: Option<u32>,
    pub blk_size: Option<u32>,
    pub features: u64,
}

impl Blk {
    /// Initializes the device with room for `slots` requests in flight (fewer if its queue is
    /// too small: each takes three descriptors). Sets FAILED on error.
    pub fn open(transport: Transport, slots: usize) -> Result<Blk, Error> {
        Self::init(transport.clone(), slots).inspect_err(|_| transport.fail())
    }

    fn init(transport: Transport, slots: usize) -> Result<Blk, Error> {
        let features = transport
            .negotiate(F_SIZE_MAX | F_SEG_MAX | F_RO | F_BLK_SIZE | F_FLUSH | F_ACCESS_PLATFORM | F_ORDER_PLATFORM)?;
        let want = (slots.clamp(1, 341) * 3) as u16;
        let queue = transport.setup_queue(0, want.next_power_of_two())?;
        let slots = slots.clamp(1, usize::from(queue.size() / 3).max(1));
        if queue.size() < 3 {
            return Err(Error::Unsupported("virtio-blk queue too small for one request"));
        }
        let meta = dma::alloc(slots as u64 * META_STRIDE).ok_or(Error::OutOfMemory)?;
        let (capacity, size_max, blk_size) =
            transport.config(|c| (c.u64(CFG_CAPACITY), c.u32(CFG_SIZE_MAX), c.u32(CFG_BLK_SIZE)));
        transport.driver_ok();
        Ok(Blk {
            transport,
            queue,
            meta,
            slots,
            in_flight: 0,
            capacity,
            read_only: features & F_RO != 0,
            flush: features & F_FLUSH != 0,
            size_max: (features & F_SIZE_MAX != 0 && size_max != 0).then_some(size_max),
            blk_size: (features & F_BLK_SIZE != 0).then_some(blk_size),
            features,
        })
    }

    /// How many requests may be in flight at once.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Largest data buffer one request may carry (we use one data segment per request).
    pub fn max_transfer(&self) -> u32 {
        (self.size_max.unwrap_or(u32::MAX) & !(SECTOR_SIZE as u32 - 1)).max(SECTOR_SIZE as u32)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn status_addr(&self, slot: usize) -> u64 {
        self.meta + slot as u64 * META_STRIDE + STATUS_OFFSET
    }

    /// Queues a request in `slot` (which must be idle): `len` bytes of data at `data`, read
    /// by the device for OUT, written for IN and GET_ID, absent for FLUSH. Call [`Self::kick`]
    /// to start it.
    pub fn submit(&mut self, slot: usize, kind: Kind, sector: u64, data: u64, len: u32) -> Result<(), Error> {
        assert!(slot < self.slots, "virtio-blk slot out of range");
        let header = self.meta + slot as u64 * META_STRIDE;
        let status = self.status_addr(slot);
        // SAFETY: the slot's header and status bytes lie in `meta`, which we own; the device
        // does not touch them while the slot is idle.
        unsafe {
            core::ptr::write_volatile(header as *mut u32, (kind as u32).to_le());
            core::ptr::write_volatile((header + 4) as *mut u32, 0);
            core::ptr::write_volatile((header + 8) as *mut u64, sector.to_le());
            core::ptr::write_volatile(status as *mut u8, STATUS_PENDING);
        }
        let head = Buf::readable(header, 16);
        let tail = Buf::writable(status, 1);
        let result = match kind {
            Kind::Flush => self.queue.push(&[head, tail], slot as u32),
            Kind::Out => self.queue.push(&[head, Buf::readable(data, len), tail], slot as u32),
            Kind::In | Kind::GetId => self.queue.push(&[head, Buf::writable(data, len), tail], slot as u32),
        };
        if result.is_ok() {
            self.in_flight += 1;
        }
        result
    }

    pub fn kick(&self) {
        self.queue.kick();
    }

    /// Collects one finished request: its slot and status byte.
    pub fn poll(&mut self) -> Result<Option<(usize, u8)>, Error> {
        let Some(used) = self.queue.pop()? else {
            return Ok(None);
        };
        let slot = used.token as usize;
        self.in_flight -= 1;
        // SAFETY: the status byte of a slot we own; the device is done with it.
        let status = unsafe { core::ptr::read_volatile(self.status_addr(slot) as *const u8) };
        Ok(Some((slot, status)))
    }

    /// Waits up to `timeout_ms` for the next request to finish.
    pub fn wait(&mut self, timeout_ms: u64) -> Result<(usize, u8), Error> {
        let deadline = Deadline::after_ms(timeout_ms);
        loop {
            if let Some(done) = self.poll()? {
                return Ok(done);
            }
            if deadline.expired() {
                return Err(Error::Timeout {
                    what: "a virtio-blk request",
                    ms: timeout_ms,
                    status: self.transport.status(),
                });
            }
            crate::arch::pause();
        }
    }

    /// Runs one request to completion (nothing else may be in flight) and returns its status.
    pub fn run(&mut self, kind: Kind, sector: u64, data: u64, len: u32, timeout_ms: u64) -> Result<u8, Error> {
        self.submit(0, kind, sector, data, len)?;
        self.kick();
        Ok(self.wait(timeout_ms)?.1)
    }

    /// Stops the device (reset), so it no longer touches our memory.
    pub fn shutdown(&self) {
        let _ = self.transport.reset();
    }
}
