//! Replication to a shadow VMM: a second `vmm` process that keeps a copy of a running VM's
//! memory, up to date epoch by epoch, so that it can take over in milliseconds.
//!
//! [`codec`] is how pages travel: zero pages as a flag, pages the shadow already holds as a
//! reference, changed pages as a delta against their last version, the rest whole, and each
//! batch LZ4-compressed where that pays.

pub mod codec;
pub mod primary;
pub mod shadow;
pub mod wire;

pub use primary::{ReplicationError, ReplicationRequest, ReplicationState, ReplicationStatus, SwitchoverReport};
pub use wire::Endpoint;
