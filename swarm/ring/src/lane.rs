//! One lane: a single-producer single-consumer ring of fixed-size slots in shared memory.

use core::sync::atomic::{AtomicU32, Ordering};

use crate::{CACHE_LINE, RingError};

/// Where `tail` sits in a lane.
const TAIL: usize = CACHE_LINE;
/// Where the consumer says it is about to sleep until a doorbell (on its own cache line, next
/// to `tail`).
const SLEEPING: usize = CACHE_LINE + 8;
/// Where the slots start.
const SLOTS: usize = 2 * CACHE_LINE;
/// A slot's header: the message's length, then 4 bytes kept zero (the message stays 8-byte
/// aligned).
const SLOT_HEADER: usize = 8;

/// The bytes a lane of `slots` slots of `slot_size` bytes takes.
pub const fn lane_bytes(slots: u32, slot_size: u32) -> usize {
    SLOTS + slots as usize * slot_size as usize
}

/// A lane's memory, shared with the peer.
#[derive(Clone, Copy, Debug)]
pub struct LaneMemory {
    base: *mut u8,
    slots: u32,
    slot_size: u32,
}

// SAFETY: the memory is shared by design; every access is atomic or volatile (see `new`).
unsafe impl Send for LaneMemory {}

impl LaneMemory {
    /// A lane of `slots` slots (a power of two) of `slot_size` bytes (a multiple of 8, more
    /// than 8) at `base`.
    ///
    /// # Safety
    /// `base` is aligned to [`CACHE_LINE`] and valid for reads and writes of
    /// [`lane_bytes`]`(slots, slot_size)` bytes for as long as the lane is used, and at most one
    /// [`Producer`] and one [`Consumer`] use it at a time (each may be in another process or
    /// VM).
    pub unsafe fn new(base: *mut u8, slots: u32, slot_size: u32) -> Result<Self, RingError> {
        if !slots.is_power_of_two() {
            return Err(RingError::BadRegion("a lane's slot count is not a power of two"));
        }
        if slot_size as usize <= SLOT_HEADER || !slot_size.is_multiple_of(8) {
            return Err(RingError::BadRegion("a slot's size is not a multiple of 8 above 8"));
        }
        if !(base as usize).is_multiple_of(CACHE_LINE) {
            return Err(RingError::BadRegion("a lane is not cache-line aligned"));
        }
        Ok(Self { base, slots, slot_size })
    }

    /// The largest message a slot holds.
    pub fn max_message(&self) -> usize {
        self.slot_size as usize - SLOT_HEADER
    }

    /// The number of slots.
    pub fn slots(&self) -> u32 {
        self.slots
    }

    /// Sets both indices to 0: a new, empty lane. Only while nobody uses it.
    pub fn reset(&self) {
        self.head().store(0, Ordering::Release);
        self.tail().store(0, Ordering::Release);
        self.sleeping().store(0, Ordering::Release);
    }

    fn sleeping(&self) -> &AtomicU32 {
        // SAFETY: as for `head`, at offset SLEEPING.
        unsafe { &*(self.base.add(SLEEPING) as *const AtomicU32) }
    }

    fn head(&self) -> &AtomicU32 {
        // SAFETY: offset 0 of the lane, aligned, valid as `new` requires; AtomicU32 has the
        // size and alignment of u32.
        unsafe { &*(self.base as *const AtomicU32) }
    }

    fn tail(&self) -> &AtomicU32 {
        // SAFETY: as for `head`, at offset TAIL.
        unsafe { &*(self.base.add(TAIL) as *const AtomicU32) }
    }

    /// The slot message number `index` goes in.
    fn slot(&self, index: u32) -> *mut u8 {
        let at = (index & (self.slots - 1)) as usize * self.slot_size as usize;
        // SAFETY: inside the lane: `index & (slots - 1)` < slots.
        unsafe { self.base.add(SLOTS + at) }
    }

    /// The messages in flight by these indices, if the indices make sense.
    fn in_flight(&self, head: u32, tail: u32) -> Result<u32, RingError> {
        let used = head.wrapping_sub(tail);
        match used <= self.slots {
            true => Ok(used),
            false => Err(RingError::BadIndex { head, tail }),
        }
    }
}

/// The producing end of a lane.
#[derive(Debug)]
pub struct Producer {
    lane: LaneMemory,
    /// Messages written, published or not.
    head: u32,
    /// The consumer's index as last read.
    tail: u32,
}

impl Producer {
    /// Takes over producing into `lane` where it stands (a producer that restarted picks up
    /// its own index); fails if the indices in memory are corrupt.
    pub fn attach(lane: LaneMemory) -> Result<Self, RingError> {
        let head = lane.head().load(Ordering::Acquire);
        let tail = lane.tail().load(Ordering::Acquire);
        lane.in_flight(head, tail)?;
        Ok(Self { lane, head, tail })
    }

    /// The largest message a slot holds.
    pub fn max_message(&self) -> usize {
        self.lane.max_message()
    }

    /// Free slots, reading the consumer's index again when the last reading shows none.
    pub fn free(&mut self) -> Result<u32, RingError> {
        let used = self.lane.in_flight(self.head, self.tail)?;
        if used < self.lane.slots {
            return Ok(self.lane.slots - used);
        }
        self.tail = self.lane.tail().load(Ordering::Acquire);
        Ok(self.lane.slots - self.lane.in_flight(self.head, self.tail)?)
    }

    /// Writes `message` into the next slot without publishing it (see [`publish`](Self::publish)):
    /// a batch of writes costs one publication.
    pub fn write(&mut self, message: &[u8]) -> Result<(), RingError> {
        if message.len() > self.lane.max_message() {
            return Err(RingError::TooLong { len: message.len(), max: self.lane.max_message() });
        }
        if self.free()? == 0 {
            return Err(RingError::Full);
        }
        let slot = self.lane.slot(self.head);
        // SAFETY: the slot is inside the lane, and the consumer does not read it until `head`
        // is published past it.
        unsafe {
            core::ptr::write_volatile(slot as *mut u32, message.len() as u32);
            core::ptr::write_volatile(slot.add(4) as *mut u32, 0);
            copy_to_shared(slot.add(SLOT_HEADER), message);
        }
        self.head = self.head.wrapping_add(1);
        Ok(())
    }

    /// Makes every message written so far visible to the consumer.
    pub fn publish(&mut self) {
        self.lane.head().store(self.head, Ordering::Release);
    }

    /// Writes and publishes one message.
    pub fn push(&mut self, message: &[u8]) -> Result<(), RingError> {
        self.write(message)?;
        self.publish();
        Ok(())
    }

    /// Whether the consumer said it sleeps until a doorbell: call after
    /// [`publish`](Self::publish), and ring the consumer's doorbell when it does. Together with
    /// [`Consumer::prepare_sleep`] no wake-up is lost: each side writes its own word, fences,
    /// then reads the other's, so at least one of them sees the other's write.
    pub fn consumer_sleeping(&self) -> bool {
        core::sync::atomic::fence(Ordering::SeqCst);
        self.lane.sleeping().load(Ordering::Relaxed) != 0
    }

    /// Messages published and not yet consumed, as of the consumer's index last read.
    pub fn depth(&self) -> u32 {
        self.head.wrapping_sub(self.tail)
    }
}

/// The consuming end of a lane.
#[derive(Debug)]
pub struct Consumer {
    lane: LaneMemory,
    /// Messages read, released or not.
    tail: u32,
    /// The producer's index as last read.
    head: u32,
}

impl Consumer {
    /// Takes over consuming from `lane` where it stands; fails if its indices are corrupt.
    pub fn attach(lane: LaneMemory) -> Result<Self, RingError> {
        let head = lane.head().load(Ordering::Acquire);
        let tail = lane.tail().load(Ordering::Acquire);
        lane.in_flight(head, tail)?;
        Ok(Self { lane, tail, head })
    }

    /// The lane's slots: the most messages that can wait in it.
    pub fn slots(&self) -> u32 {
        self.lane.slots
    }

    /// Messages waiting, reading the producer's index again.
    pub fn waiting(&mut self) -> Result<u32, RingError> {
        self.head = self.lane.head().load(Ordering::Acquire);
        self.lane.in_flight(self.head, self.tail)
    }

    /// Copies the next message into `out` and returns its length, without releasing its slot
    /// (see [`release`](Self::release)); `None` when the lane is empty. A message longer than
    /// `out` is an error and stays in the lane.
    pub fn read(&mut self, out: &mut [u8]) -> Result<Option<usize>, RingError> {
        if self.tail == self.head && self.waiting()? == 0 {
            return Ok(None);
        }
        let slot = self.lane.slot(self.tail);
        // SAFETY: the slot is inside the lane, and published: the producer does not write it
        // again until `tail` is released past it.
        let len = unsafe { core::ptr::read_volatile(slot as *const u32) };
        if len as usize > self.lane.max_message() {
            return Err(RingError::BadLength { len });
        }
        let len = len as usize;
        if len > out.len() {
            return Err(RingError::TooLong { len, max: out.len() });
        }
        // SAFETY: as above; `len` is within the slot.
        unsafe { copy_from_shared(&mut out[..len], slot.add(SLOT_HEADER)) };
        self.tail = self.tail.wrapping_add(1);
        Ok(Some(len))
    }

    /// Hands every slot read so far back to the producer.
    pub fn release(&mut self) {
        self.lane.tail().store(self.tail, Ordering::Release);
    }

    /// Says this consumer is about to sleep until a doorbell, then looks once more: `Ok(true)`
    /// when the lane is still empty and it may sleep (the producer will ring), `Ok(false)` when
    /// a message came meanwhile (the flag is taken back). Call [`woke`](Self::woke) after the
    /// sleep.
    pub fn prepare_sleep(&mut self) -> Result<bool, RingError> {
        self.lane.sleeping().store(1, Ordering::Relaxed);
        core::sync::atomic::fence(Ordering::SeqCst);
        if self.waiting()? > 0 {
            self.woke();
            return Ok(false);
        }
        Ok(true)
    }

    /// Takes back the word [`prepare_sleep`](Self::prepare_sleep) gave.
    pub fn woke(&mut self) {
        self.lane.sleeping().store(0, Ordering::Relaxed);
    }

    /// Reads and releases one message.
    pub fn pop(&mut self, out: &mut [u8]) -> Result<Option<usize>, RingError> {
        let read = self.read(out)?;
        if read.is_some() {
            self.release();
        }
        Ok(read)
    }
}

/// Copies `from` into shared memory at `to`, a word at a time where it can.
///
/// # Safety
/// `to` is valid for `from.len()` bytes of writes and 8-byte aligned.
unsafe fn copy_to_shared(to: *mut u8, from: &[u8]) {
    let words = from.len() / 8;
    for w in 0..words {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&from[w * 8..w * 8 + 8]);
        // SAFETY: within the range the caller vouches for, aligned.
        unsafe { core::ptr::write_volatile((to as *mut u64).add(w), u64::from_ne_bytes(bytes)) };
    }
    for (i, &byte) in from.iter().enumerate().skip(words * 8) {
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile(to.add(i), byte) };
    }
}

/// Copies shared memory at `from` into `to`: the peer may change it meanwhile, so it is read
/// once, with volatile loads, and only the copy is looked at.
///
/// # Safety
/// `from` is valid for `to.len()` bytes of reads and 8-byte aligned.
unsafe fn copy_from_shared(to: &mut [u8], from: *const u8) {
    let words = to.len() / 8;
    for w in 0..words {
        // SAFETY: within the range the caller vouches for, aligned.
        let word = unsafe { core::ptr::read_volatile((from as *const u64).add(w)) };
        to[w * 8..w * 8 + 8].copy_from_slice(&word.to_ne_bytes());
    }
    for (i, byte) in to.iter_mut().enumerate().skip(words * 8) {
        // SAFETY: as above.
        *byte = unsafe { core::ptr::read_volatile(from.add(i)) };
    }
}
