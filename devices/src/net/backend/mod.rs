//! Network backends: where a virtio-net device's frames go and come from.

mod tap;
mod unix;

use std::io;
use std::os::fd::RawFd;

pub use tap::TapBackend;
pub use unix::UnixBackend;

/// Largest frame accepted from either side (a 64 KiB IP packet plus Ethernet and VLAN headers).
pub const MAX_FRAME: usize = 65_550;

/// A source and sink of Ethernet frames, non-blocking.
pub trait NetBackend: Send {
    /// What this backend is, for listings: "tap vmtap0", "unix /run/sw.sock".
    fn description(&self) -> String;
    /// Readable when frames are waiting, writable when `send` may succeed again.
    fn fd(&self) -> RawFd;
    /// Sends one frame; `WouldBlock` if the backend cannot take it now (retry when writable).
    fn send(&mut self, frame: &[u8]) -> io::Result<()>;
    /// Receives one frame into `buf`; `WouldBlock` when none is waiting.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// The largest IP packet the backend carries, where it is limited (a tap's interface MTU).
    fn mtu(&self) -> Option<u16> {
        None
    }
}
