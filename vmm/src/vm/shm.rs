//! Shared-memory regions on a running VM: attach, detach, list. The guest keeps running; only
//! KVM's memory slots and eventfd routes change.

use std::time::Duration;

use super::Vm;
use crate::config::ShmConfig;
use crate::device_manager::shm::{DEFAULT_DETACH_TIMEOUT, ShmError, ShmStatus};

impl Vm {
    /// Every shared-memory window and what it holds.
    pub fn shm(&self) -> Vec<ShmStatus> {
        self.shm.status()
    }

    /// Attaches the region `config` names to window `window`, while the guest runs.
    pub fn attach_shm(&self, window: u32, config: &ShmConfig) -> Result<ShmStatus, ShmError> {
        // A shadow would not get the region: replication and attached regions exclude each other.
        if self.replication.in_use() {
            return Err(ShmError::Replicating);
        }
        self.shm.attach(&self.kvm, window, config)
    }

    /// Detaches window `window`'s region, giving the guest `timeout` (default 2 s) to let go.
    pub fn detach_shm(&self, window: u32, timeout: Option<Duration>) -> Result<ShmStatus, ShmError> {
        self.shm.detach(&self.kvm, window, timeout.unwrap_or(DEFAULT_DETACH_TIMEOUT))
    }

    /// Whether a region is attached: snapshots and replication cannot carry one (its memory is
    /// not the VM's), so they are refused meanwhile.
    pub fn shm_attached(&self) -> bool {
        self.shm.any_attached()
    }
}
