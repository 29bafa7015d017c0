//! Split virtqueues (virtio spec 2.7): a descriptor table, the driver's available ring and the
//! device's used ring, all in identity-mapped RAM from [`crate::dma`].
//!
//! The rings are shared with a device that runs concurrently (another host thread), so every
//! access to them is volatile, and fences order them: descriptor and buffer contents before
//! the available index is published, the available index before the device's notification
//! flag is read, and the used index before the used element and buffer contents are read.
use core::sync::atomic::{Ordering, fence};

use super::Error;
use crate::dma;

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const AVAIL_F_NO_INTERRUPT: u16 = 1;
const USED_F_NO_NOTIFY: u16 = 1;
/// Chain length recorded for a descriptor that heads no chain in flight.
const NOT_IN_FLIGHT: u16 = 0;

/// One buffer of a request: `len` bytes at guest-physical `addr`, which the device either
/// reads or (with `device_writes`) writes.
#[derive(Clone, Copy)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub device_writes: bool,
}

impl Buf {
    pub fn readable(addr: u64, len: u32) -> Buf {
        Buf { addr, len, device_writes: false }
    }

    pub fn writable(addr: u64, len: u32) -> Buf {
        Buf { addr, len, device_writes: true }
    }
}

/// A completed request: the token it was submitted with and the number of bytes the device
/// wrote into its device-writable buffers.
#[derive(Clone, Copy)]
pub struct Used {
    pub token: u32,
    pub len: u32,
}

pub struct Virtqueue {
    index: u16,
    size: u16,
    notify_addr: u64,
    desc: u64,
    avail: u64,
    used: u64,
    /// The free list, linked through `next` (a private copy: the device only reads the
    /// descriptor table, but we never trust shared memory for our own bookkeeping).
    next: &'static mut [u16],
    /// For each chain head in flight, the chain's length; 0 otherwise.
    chain_len: &'static mut [u16],
    tokens: &'static mut [u32],
    free_head: u16,
    num_free: u16,
    avail_idx: u16,
    last_used: u16,
}

impl Virtqueue {
    /// Allocates zeroed rings for `size` (a power of two) entries.
    pub fn new(index: u16, size: u16, notify_addr: u64) -> Result<Virtqueue, Error> {
        let n = u64::from(size);
        let desc = dma::alloc(16 * n).ok_or(Error::OutOfMemory)?;
        let avail = dma::alloc(6 + 2 * n).ok_or(Error::OutOfMemory)?;
        let used = dma::alloc(6 + 8 * n).ok_or(Error::OutOfMemory)?;
        let next = dma::alloc_slice::<u16>(size.into()).ok_or(Error::OutOfMemory)?;
        let chain_len = dma::alloc_slice::<u16>(size.into()).ok_or(Error::OutOfMemory)?;
        let tokens = dma::alloc_slice::<u32>(size.into()).ok_or(Error::OutOfMemory)?;
        for (i, link) in next.iter_mut().enumerate() {
            *link = (i as u16).wrapping_add(1);
        }
        let queue = Virtqueue {
            index,
            size,
            notify_addr,
            desc,
            avail,
            used,
            next,
            chain_len,
            tokens,
            free_head: 0,
            num_free: size,
            avail_idx: 0,
            last_used: 0,
        };
        // We poll: ask the device not to interrupt (a hint it may ignore; IF=0 anyway).
        queue.write16(avail, AVAIL_F_NO_INTERRUPT);
        Ok(queue)
    }

    /// Guest-physical addresses of the descriptor table, driver area and device area.
    pub fn addresses(&self) -> (u64, u64, u64) {
        (self.desc, self.avail, self.used)
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    fn write16(&self, addr: u64, value: u16) {
        // SAFETY: `addr` lies in one of this queue's ring allocations.
        unsafe { core::ptr::write_volatile(addr as *mut u16, value.to_le()) }
    }

    fn read16(&self, addr: u64) -> u16 {
        // SAFETY: as in `write16`.
        u16::from_le(unsafe { core::ptr::read_volatile(addr as *const u16) })
    }

    fn read32(&self, addr: u64) -> u32 {
        // SAFETY: as in `write16`.
        u32::from_le(unsafe { core::ptr::read_volatile(addr as *const u32) })
    }

    fn write_desc(&self, i: u16, buf: Buf, flags: u16, next: u16) {
        let d = self.desc + 16 * u64::from(i);
        // SAFETY: descriptor `i` < size lies in the descriptor table.
        unsafe {
            core::ptr::write_volatile(d as *mut u64, buf.addr.to_le());
            core::ptr::write_volatile((d + 8) as *mut u32, buf.len.to_le());
        }
        self.write16(d + 12, flags);
        self.write16(d + 14, next);
    }

    /// Makes `bufs` (device-readable ones first, as the spec requires) available as one
    /// descriptor chain, remembered by `token`. Does not notify: call [`Self::kick`] after
    /// one or more pushes. Fails if the queue lacks free descriptors.
    pub fn push(&mut self, bufs: &[Buf], token: u32) -> Result<(), Error> {
        let count = bufs.len() as u16;
        if count == 0 || count > self.num_free {
            return Err(Error::QueueFull { queue: self.index });
        }
        let head = self.free_head;
        let mut i = head;
        for (n, buf) in bufs.iter().enumerate() {
            let last = n + 1 == bufs.len();
            let mut flags = if buf.device_writes { DESC_F_WRITE } else { 0 };
            if !last {
                flags |= DESC_F_NEXT;
            }
            let next = self.next[usize::from(i)];
            self.write_desc(i, *buf, flags, if last { 0 } else { next });
            if last {
                self.free_head = next;
            } else {
                i = next;
            }
        }
        self.num_free -= count;
        self.chain_len[usize::from(head)] = count;
        self.tokens[usize::from(head)] = token;

        let slot = u64::from(self.avail_idx % self.size);
        self.write16(self.avail + 4 + 2 * slot, head);
        // Descriptors, the ring entry and the buffers they point to must be visible before
        // the device can see the new index.
        fence(Ordering::Release);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.write16(self.avail + 2, self.avail_idx);
        Ok(())
    }

    /// Notifies the device of new available buffers unless it asked not to be (it sets
    /// VIRTQ_USED_F_NO_NOTIFY while it is already processing the queue).
    pub fn kick(&self) {
        // The available index store must be globally visible before the flag is read, or the
        // device could miss the new buffers after deciding to sleep (spec 2.7.10.1).
        fence(Ordering::SeqCst);
        if self.read16(self.used) & USED_F_NO_NOTIFY == 0 {
            // SAFETY: QueueNotify of this queue's own transport window.
            unsafe { core::ptr::write_volatile(self.notify_addr as *mut u32, u32::from(self.index)) };
        }
    }

    /// Chains made available and not yet collected.
    pub fn in_flight(&self) -> u16 {
        self.size - self.num_free
    }

    /// Collects one completed request, if any.
    pub fn pop(&mut self) -> Result<Option<Used>, Error> {
        let used_idx = self.read16(self.used + 2);
        if used_idx == self.last_used {
            return Ok(None);
        }
        // The element and the buffers it names must be read after the index.
        fence(Ordering::Acquire);
        let slot = u64::from(self.last_used % self.size);
        let elem = self.used + 4 + 8 * slot;
        let id = self.read32(elem);
        let len = self.read32(elem + 4);
        self.last_used = self.last_used.wrapping_add(1);
        let head = match u16::try_from(id) {
            Ok(h) if h < self.size && self.chain_len[usize::from(h)] != NOT_IN_FLIGHT => h,
            _ => {
                return Err(Error::BadUsedId { queue: self.index, id });
            }
        };
        // Return the chain to the free list: it is still linked through `next`.
        let count = core::mem::replace(&mut self.chain_len[usize::from(head)], NOT_IN_FLIGHT);
        let mut last = head;
        for _ in 1..count {
            last = self.next[usize::from(last)];
        }
        self.next[usize::from(last)] = self.free_head;
        self.free_head = head;
        self.num_free += count;
        Ok(Some(Used { token: self.tokens[usize::from(head)], len }))
    }
}
