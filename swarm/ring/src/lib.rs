//! Rings in a memory region shared between sibling VMs (and the VMMs that map it): the region's
//! layout, single-producer single-consumer lanes of fixed-size slots, the header of a request
//! moving through a pipeline of VMs ([`packet`]), the status record each VM publishes
//! ([`status`]) and the register window that announces a region to a VM ([`window`]).
//!
//! `no_std` and without allocation, so the bare-metal microguest and the host crates compile the
//! very same code. Nothing here trusts the peer: every index and length read from shared memory
//! is checked before it is used, and a bad one is an error ([`RingError`]), never a panic, an
//! out-of-bounds access or a wait that does not end. A hostile or crashed peer can only corrupt
//! the lanes it writes.
//!
//! A lane's memory, at a 64-byte aligned offset of the region:
//!
//! | offset | size | what | written by |
//! |---|---|---|---|
//! | 0 | 4 | `head`: messages pushed so far (wrapping) | producer |
//! | 64 | 4 | `tail`: messages popped so far (wrapping) | consumer |
//! | 128 | `slots * slot_size` | slots: a 4-byte length, then the message | producer |
//!
//! `head` and `tail` sit on cache lines of their own, so producer and consumer do not share
//! one. The producer writes slots, then publishes `head` (release); the consumer reads `head`
//! (acquire), then the slots, then publishes `tail` (release). Batches publish once per batch.
#![no_std]
#![warn(missing_docs)]

pub mod packet;
pub mod region;
pub mod status;
pub mod window;
pub mod work;

mod lane;

pub use lane::{Consumer, LaneMemory, Producer, lane_bytes};
pub use region::{Region, RegionLayout};

/// The cache line the indices are kept apart by.
pub const CACHE_LINE: usize = 64;

/// Why a ring operation failed. `Full` and `Empty` are the normal back-pressure of a ring;
/// the others mean the peer wrote something no correct peer writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingError {
    /// No free slot: the consumer has not caught up.
    Full,
    /// The message does not fit in a slot.
    TooLong {
        /// The message's length.
        len: usize,
        /// The most a slot holds.
        max: usize,
    },
    /// The peer's index says more messages are in flight than the lane has slots.
    BadIndex {
        /// The producer's index as read.
        head: u32,
        /// The consumer's index as read.
        tail: u32,
    },
    /// A slot's length is more than a slot holds.
    BadLength {
        /// The length as read.
        len: u32,
    },
    /// The region's header is not one this crate wrote, or describes lanes outside the region.
    BadRegion(&'static str),
}

impl core::fmt::Display for RingError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            RingError::Full => write!(f, "the ring is full"),
            RingError::TooLong { len, max } => write!(f, "a message of {len} bytes does not fit in a slot of {max}"),
            RingError::BadIndex { head, tail } => {
                write!(f, "the peer's indices are corrupt: head {head}, tail {tail}")
            }
            RingError::BadLength { len } => write!(f, "the peer wrote a slot length of {len} bytes"),
            RingError::BadRegion(why) => write!(f, "not a ring region: {why}"),
        }
    }
}
