//! Device models for the VMM.
//!
//! Devices never touch KVM. They see the guest through narrow handles: a [`bus::BusDevice`]
//! receives the guest's port and MMIO accesses, an [`interrupt::InterruptLine`] raises its
//! interrupt, and an [`exit::ExitSink`] is how a device asks the VM to end (debug-exit port,
//! keyboard-controller reset). The VMM wires those handles to KVM objects, so every device can
//! be unit-tested with plain fakes.

#![warn(missing_docs)]

pub mod blk;
pub mod bus;
pub mod exit;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod interrupt;
pub mod legacy;
pub mod lifecycle;
pub mod metrics;
pub mod net;
pub mod ratelimit;
pub mod shm;
pub mod unix_socket;
pub mod virtio;
pub mod vsock;

/// The guest memory type used throughout the VMM.
pub type GuestMem = vm_memory::GuestMemoryMmap<DirtyBitmap>;
/// Pages the VMM itself wrote into guest memory (virtio DMA, used rings), one bit per page:
/// KVM's dirty log sees only the guest's writes, and a diff snapshot needs both.
pub type DirtyBitmap = vm_memory::bitmap::AtomicBitmap;
/// A live view of guest memory that follows region replacements.
pub type SharedGuestMem = vm_memory::GuestMemoryAtomic<GuestMem>;
