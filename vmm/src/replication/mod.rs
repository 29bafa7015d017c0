//! Replication to a shadow VMM: a second `vmm` process that keeps a copy of a running VM's
//! memory, up to date epoch by epoch, so that it can take over in milliseconds.
//!
//! [`codec`] is how pages travel: zero pages as a flag, pages the shadow already holds as a
//! reference, changed pages as a delta against their last version, the rest whole, and each
//! batch LZ4-compressed where that pays. [`trial`] runs an update on a clone of the shadow's
//! copy before a switchover may apply it ([`update`]).

pub mod codec;
pub mod manager;
pub mod primary;
pub mod shadow;
pub mod trial;
pub mod update;
pub mod wire;

pub use manager::ReplicationManager;
pub use primary::{
    ReplicationError, ReplicationRequest, ReplicationState, ReplicationStatus, ShadowSelector, ShadowStatus,
    SwitchoverReport, SwitchoverRequest, ValidateRequest, ValidationRecord,
};
pub use trial::TrialReport;
pub use update::{HealthReport, VmUpdate};
pub use wire::Endpoint;
