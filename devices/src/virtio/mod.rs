//! Virtio 1.x over MMIO: the transport, the state every device shares, and the event-loop
//! adapter that runs device work off the vCPU threads.
//!
//! A device (block, net, vsock) implements [`VirtioDevice`]: it owns a [`VirtioCore`]
//! (features, queues, interrupt, quiesce state) plus its own config space and backend. The
//! [`MmioTransport`] turns guest register accesses into calls on it (vCPU threads); the
//! [`DeviceWorker`] turns queue notifications and backend readiness into calls on it (the
//! device event loop). Both reach the device through one `Arc<Mutex<_>>`.

mod core;
mod mmio;
#[cfg(test)]
pub(crate) mod testing;
mod worker;

pub use self::core::{
    ActivateError, EventSource, PASS_BUDGET, QueueProcessor, Selectors, VirtioCore, VirtioDevice, VirtioInterrupt,
};
pub use mmio::{MMIO_WINDOW_SIZE, MmioTransport, QUEUE_NOTIFY_OFFSET};
pub use worker::{DeviceWorker, ResyncHandle};

/// First event token a device may use for its own sources (tokens below are queue indices).
pub const DEVICE_TOKEN_BASE: u32 = 0x100;

/// Feature bits common to all device types.
pub mod features {
    /// The device conforms to virtio 1.x ("modern").
    pub const VERSION_1: u64 = 1 << 32;
    /// Driver and device suppress notifications with the used/avail event fields.
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    /// Descriptors may point at tables of descriptors (no device offers it: a driver that uses
    /// them anyway gets its chain back unused).
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
}

/// Device status bits (virtio 1.x section 2.1).
pub mod status {
    /// The guest found the device and recognised it as a virtio device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for the device.
    pub const DRIVER: u32 = 2;
    /// The driver is set up and ready to drive the device.
    pub const DRIVER_OK: u32 = 4;
    /// The driver finished feature negotiation; the device clears it to refuse the features.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 128;
}

/// Virtio device IDs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum DeviceType {
    /// Network card.
    Net = 1,
    /// Block device.
    Block = 2,
    /// Socket device (vsock).
    Vsock = 19,
}

impl DeviceType {
    /// Short lowercase name, for logs.
    pub fn name(self) -> &'static str {
        match self {
            DeviceType::Net => "net",
            DeviceType::Block => "block",
            DeviceType::Vsock => "vsock",
        }
    }
}
