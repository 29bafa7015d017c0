//! virtio-vsock: guest sockets that reach host programs through Unix sockets, following
//! Firecracker's "hybrid vsock" convention so existing tooling works unchanged.
//!
//! Host to guest: connect to the device's Unix socket and write `CONNECT <port>\n`; the VMM
//! answers `OK <host port>\n` once the guest accepts. Guest to host: a guest connection to
//! host (CID 2) port P arrives at the Unix socket `<socket>_P`.

mod backend;
mod connection;
mod device;
mod packet;

pub use backend::{UnixVsockBackend, VsockBackend};
pub use device::{VSOCK_QUEUE_SIZE, VirtioVsock};
pub use packet::{HEADER_LEN, Header, op};

/// The host's context id.
pub const HOST_CID: u64 = 2;
