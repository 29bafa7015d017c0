//! The swarm's shared-memory fabric on the host: regions of memory shared by several VMs (and
//! the processes that manage them), each with one doorbell per party, and the Unix socket that
//! hands them to `vmm` processes.
//!
//! A region is a sealed memfd (its size cannot change under a peer, so nobody can make another
//! party's mapping fault) holding a [`swarm_ring`] layout. A doorbell is an eventfd: the
//! party it belongs to waits on it (a VM through KVM's irqfd, a host process through epoll), the
//! others signal it (a VM through KVM's ioeventfd on its doorbell register, a host process by a
//! write). Because every file lives in the [`FabricServer`] that created it, a `vmm` process
//! that restarts simply attaches again: unlike ivshmem, no peer has to restart with it.
//!
//! The hand-over protocol, one exchange per connection: the client writes one JSON line,
//! `{"region": NAME, "party": N}`; the server answers with one message carrying a JSON reply
//! (`{"size", "parties"}` or `{"error"}`) and, on success, the region's memfd followed by every
//! party's doorbell, in party order, as `SCM_RIGHTS`.

mod region;
mod server;

pub use region::{RegionSpec, SharedRegion};
pub use server::{Attachment, FabricServer, attach};

/// The most parties one region may have (each gets a doorbell, all of which travel in one
/// message).
pub const MAX_PARTIES: u16 = 16;

/// Why a fabric operation failed.
#[derive(Debug, thiserror::Error)]
pub enum FabricError {
    /// A region's description makes no sense.
    #[error("region {name:?}: {why}")]
    Spec {
        /// The region.
        name: String,
        /// What is wrong.
        why: String,
    },
    /// A system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The server refused the request.
    #[error("the fabric server at {socket} refused: {reason}")]
    Refused {
        /// The server's socket.
        socket: String,
        /// Its reason.
        reason: String,
    },
    /// The server answered something that is not a hand-over.
    #[error("the fabric server at {socket} answered badly: {why}")]
    Protocol {
        /// The server's socket.
        socket: String,
        /// What was wrong.
        why: String,
    },
}

impl FabricError {
    fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        FabricError::Io { what: what.into(), source }
    }
}

/// Result of fabric operations.
pub type Result<T> = std::result::Result<T, FabricError>;
