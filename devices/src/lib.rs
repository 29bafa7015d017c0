//! Device models for the VMM.
//!
//! Devices never touch KVM. They see the guest through narrow handles: a [`bus::BusDevice`]
//! receives the guest's port and MMIO accesses, an [`interrupt::InterruptLine`] raises its
//! interrupt, and an [`exit::ExitSink`] is how a device asks the VM to end (debug-exit port,
//! keyboard-controller reset). The VMM wires those handles to KVM objects, so every device can
//! be unit-tested with plain fakes.

pub mod bus;
pub mod exit;
pub mod interrupt;
pub mod legacy;
pub mod ratelimit;
