//! A shared region: a header saying how its lanes are laid out, then the lanes.
//!
//! | offset | size | what |
//! |---|---|---|
//! | 0 | 8 | magic `b"SWRMRING"` |
//! | 8 | 4 | layout version ([`VERSION`]) |
//! | 12 | 4 | lanes |
//! | 16 | 4 | slots per lane (a power of two) |
//! | 20 | 4 | bytes per slot (a multiple of 8) |
//! | 64 | ... | the lanes, each [`lane_bytes`] long, rounded up to a cache line |

use crate::lane::{LaneMemory, lane_bytes};
use crate::{CACHE_LINE, RingError};

/// What a region's first 8 bytes say.
pub const MAGIC: [u8; 8] = *b"SWRMRING";
/// The layout this crate writes and reads.
pub const VERSION: u32 = 1;
/// Where the first lane starts.
const LANES: usize = CACHE_LINE;
/// Bounds that keep every offset far from overflowing.
const MAX_LANES: u32 = 4096;
const MAX_SLOTS: u32 = 1 << 20;
const MAX_SLOT: u32 = 1 << 20;

/// How a region's lanes are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionLayout {
    /// Lanes in the region.
    pub lanes: u32,
    /// Slots per lane, a power of two.
    pub slots: u32,
    /// Bytes per slot, a multiple of 8 above 8 (8 of them are the slot's header).
    pub slot_size: u32,
}

impl RegionLayout {
    /// Checks the numbers: what `Region::format` and `Region::open` accept.
    pub fn check(&self) -> Result<(), RingError> {
        if self.lanes == 0 || self.lanes > MAX_LANES {
            return Err(RingError::BadRegion("lanes must be 1 to 4096"));
        }
        if !self.slots.is_power_of_two() || self.slots > MAX_SLOTS {
            return Err(RingError::BadRegion("slots per lane must be a power of two up to 2^20"));
        }
        if self.slot_size <= 8 || !self.slot_size.is_multiple_of(8) || self.slot_size > MAX_SLOT {
            return Err(RingError::BadRegion("a slot's size must be a multiple of 8 from 16 to 1 MiB"));
        }
        Ok(())
    }

    /// The bytes one lane takes, rounded up to a cache line.
    pub fn lane_stride(&self) -> usize {
        lane_bytes(self.slots, self.slot_size).next_multiple_of(CACHE_LINE)
    }

    /// The bytes the whole region takes.
    pub fn bytes(&self) -> usize {
        LANES + self.lanes as usize * self.lane_stride()
    }
}

/// A region mapped here.
#[derive(Clone, Copy, Debug)]
pub struct Region {
    base: *mut u8,
    layout: RegionLayout,
}

// SAFETY: shared memory by design; the lanes it hands out use atomic and volatile accesses.
unsafe impl Send for Region {}

impl Region {
    /// Writes a new region's header and empties every lane.
    ///
    /// # Safety
    /// `base` is aligned to [`CACHE_LINE`] and valid for reads and writes of `len` bytes for
    /// as long as the region and its lanes are used, and nobody uses the lanes meanwhile.
    pub unsafe fn format(base: *mut u8, len: usize, layout: RegionLayout) -> Result<Self, RingError> {
        layout.check()?;
        if layout.bytes() > len {
            return Err(RingError::BadRegion("the lanes do not fit in the region"));
        }
        if !(base as usize).is_multiple_of(CACHE_LINE) {
            return Err(RingError::BadRegion("the region is not cache-line aligned"));
        }
        let words = [
            u64::from_le_bytes(MAGIC),
            u64::from(VERSION) | u64::from(layout.lanes) << 32,
            u64::from(layout.slots) | u64::from(layout.slot_size) << 32,
        ];
        for (i, word) in words.iter().enumerate() {
            // SAFETY: the first 24 bytes, inside the region, aligned.
            unsafe { core::ptr::write_volatile((base as *mut u64).add(i), word.to_le()) };
        }
        let region = Self { base, layout };
        for lane in 0..layout.lanes {
            region.lane(lane)?.reset();
        }
        Ok(region)
    }

    /// Reads the header of a region another party formatted, and checks it describes lanes
    /// inside the region.
    ///
    /// # Safety
    /// As for [`format`](Self::format), except that others may use the lanes.
    pub unsafe fn open(base: *mut u8, len: usize) -> Result<Self, RingError> {
        if len < LANES || !(base as usize).is_multiple_of(CACHE_LINE) {
            return Err(RingError::BadRegion("too small, or not cache-line aligned"));
        }
        // SAFETY: the first 24 bytes, inside the region (len >= 64), aligned; read once.
        let word = |i: usize| u64::from_le(unsafe { core::ptr::read_volatile((base as *const u64).add(i)) });
        let (magic, version_lanes, slots_size) = (word(0), word(1), word(2));
        if magic.to_le_bytes() != MAGIC {
            return Err(RingError::BadRegion("no ring header"));
        }
        if version_lanes as u32 != VERSION {
            return Err(RingError::BadRegion("another layout version"));
        }
        let layout = RegionLayout {
            lanes: (version_lanes >> 32) as u32,
            slots: slots_size as u32,
            slot_size: (slots_size >> 32) as u32,
        };
        layout.check()?;
        if layout.bytes() > len {
            return Err(RingError::BadRegion("the header describes lanes beyond the region"));
        }
        Ok(Self { base, layout })
    }

    /// How the lanes are laid out.
    pub fn layout(&self) -> RegionLayout {
        self.layout
    }

    /// Lane `index`.
    pub fn lane(&self, index: u32) -> Result<LaneMemory, RingError> {
        if index >= self.layout.lanes {
            return Err(RingError::BadRegion("no such lane"));
        }
        let at = LANES + index as usize * self.layout.lane_stride();
        // SAFETY: `at + lane_bytes` is within `layout.bytes()`, which `format`/`open` checked
        // against the region's length; the stride keeps lanes cache-line aligned.
        unsafe { LaneMemory::new(self.base.add(at), self.layout.slots, self.layout.slot_size) }
    }
}
