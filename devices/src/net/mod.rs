//! virtio-net: the device model and its swappable backends.

pub mod backend;
mod device;

pub use backend::{NetBackend, TapBackend, UnixBackend};
pub use device::{NET_QUEUE_SIZE, NetSettings, VirtioNet};
