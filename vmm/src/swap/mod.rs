//! Live component replacement: swapping a device's backend or a RAM region's backing while
//! the guest runs.
//!
//! A device swap is a transaction (`transaction`) written once for every device type:
//! prepare (open the new backend, check it can take over; refused before anything changes),
//! quiesce at a request boundary, drain in-flight requests (a disk instead lets them finish on
//! the old backend while the new one serves, and settles them before it commits), switch
//! (queue state stays in the device), resume, verify under real traffic, then commit (close
//! the old backend) or roll back automatically (the old backend was kept open; requests the
//! new one failed are retried on it, so the guest sees no error). Live storage migration
//! (`migration`) and memory region swaps (`memory`) reuse the same pieces. [`SwapManager`]
//! runs swaps on their own threads and keeps their records.

mod launch;
pub(crate) mod memory;
pub(crate) mod migration;
mod record;
mod tally;
pub(crate) mod transaction;
mod urgent;
pub(crate) mod verify;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use devices::blk::Fault;
use serde::{Deserialize, Serialize};

pub(crate) use launch::SwapLauncher;
pub use memory::{MemorySwapError, MemorySwapReport, MemorySwapRequest};
pub use migration::MigrateOptions;
pub use record::{CopyStats, Phase, SwapHandle, SwapRecord, SwapState, TimelineEntry};
pub use tally::{SWAP_BUCKETS_S, SwapTally, TimeHistogram};
pub(crate) use transaction::{SwapParams, SwapTarget};
pub use verify::VerifyPolicy;

use crate::config::json::FieldError;
use crate::device_manager::DeviceEntry;

/// What kind of swap.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SwapMode {
    /// Same data through another backend (engine change, tap A to tap B, new vsock socket).
    #[default]
    Switch,
    /// Disks only: copy the data to the new backend while the guest writes, then switch.
    Migrate,
    /// Disks only: a different disk (the guest is told its configuration changed). Needs
    /// `allow_new_image`.
    NewImage,
}

/// The API's names: `switch`, `migrate`, `new_image`.
impl std::fmt::Display for SwapMode {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            Self::Switch => "switch",
            Self::Migrate => "migrate",
            Self::NewImage => "new_image",
        })
    }
}

fn default_drain_ms() -> u64 {
    2000
}

/// A request to swap a device's backend.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwapRequest {
    /// The new backend, in the form the device's configuration uses: for a disk
    /// `{"path": ..., "engine": ...}` or `{"nbd": ..., "export": ...}`; for a NIC `{"tap": ...}`
    /// or `{"unix": ...}`; for vsock `{"socket": ...}`.
    pub backend: serde_json::Value,
    /// What kind of swap ([`SwapMode::Switch`] by default).
    #[serde(default)]
    pub mode: SwapMode,
    /// Confirms a [`SwapMode::NewImage`] swap, which replaces the guest's disk contents.
    #[serde(default)]
    pub allow_new_image: bool,
    /// Disks only, for testing rollback: wrap the new backend in a fault injector.
    #[serde(default)]
    pub fault: Option<Fault>,
    /// How long to wait for requests in flight when quiescing, in milliseconds
    /// (1 to [`MAX_DRAIN_MS`]; 2000 by default).
    #[serde(default = "default_drain_ms")]
    pub drain_timeout_ms: u64,
    /// The health check the new backend must pass before the swap commits.
    #[serde(default)]
    pub verify: VerifyPolicy,
    /// Options for [`SwapMode::Migrate`].
    #[serde(default)]
    pub migrate: MigrateOptions,
}

/// Longest a drain may wait: the device takes no requests meanwhile.
pub const MAX_DRAIN_MS: u64 = 60_000;
/// Longest a health check may watch a new backend.
pub const MAX_VERIFY_WINDOW_MS: u64 = 600_000;
/// Longest a storage migration may copy before giving up.
pub const MAX_MIGRATE_MS: u64 = 24 * 3600 * 1000;

/// Checks that `value` is within `1..=max`, naming `field` if not.
pub(crate) fn check_ms(field: &str, value: u64, max: u64) -> Result<(), FieldError> {
    if value == 0 || value > max {
        return Err(FieldError::new(field, format!("must be between 1 and {max} ms, got {value}")));
    }
    Ok(())
}

impl SwapRequest {
    /// Refuses the modes and options only disks have (for devices of another `kind`).
    pub fn switch_only(&self, id: &str, kind: &str) -> Result<(), FieldError> {
        if self.mode != SwapMode::Switch {
            let e = format!("mode {} applies to disks, {id} is a {kind} device", self.mode);
            return Err(FieldError::new("mode", e));
        }
        if self.fault.is_some() {
            return Err(FieldError::new("fault", "fault injection applies to disks"));
        }
        Ok(())
    }

    /// Timeouts a client may ask for: a typo must not park a device or a swap thread for days.
    fn check_limits(&self) -> Result<(), FieldError> {
        check_ms("drain_timeout_ms", self.drain_timeout_ms, MAX_DRAIN_MS)?;
        check_ms("verify.window_ms", self.verify.window_ms, MAX_VERIFY_WINDOW_MS)?;
        if !(0.0..=1.0).contains(&self.verify.max_error_rate) {
            let e = format!("must be between 0 and 1, got {}", self.verify.max_error_rate);
            return Err(FieldError::new("verify.max_error_rate", e));
        }
        check_ms("migrate.timeout_ms", self.migrate.timeout_ms, MAX_MIGRATE_MS)
    }
}

/// Why a swap was refused.
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    /// The VM has no device with this id.
    #[error("no device {0:?}")]
    NoSuchDevice(String),
    /// A field of the [`SwapRequest`] is invalid, or does not apply to this device.
    #[error("invalid swap request: {0}")]
    Invalid(#[from] FieldError),
    /// The backend is well-formed but for another kind of device (a vsock socket for a disk):
    /// a valid request this device cannot carry out.
    #[error("{id} is a {kind} device, which has no backend setting {setting:?}")]
    OtherKindOfBackend {
        /// The device.
        id: String,
        /// Its kind (`block`, `net`, `vsock`).
        kind: &'static str,
        /// The setting it does not have.
        setting: String,
    },
    /// The VM is replicating to a shadow, or frozen for a switchover.
    #[error("the VM is replicating to a shadow (or frozen for a switchover): stop replication first")]
    Replicating,
    /// The VM has exited, or is stopping; the string says how.
    #[error("the VM has exited ({0})")]
    VmExited(String),
    /// Another swap of the same device is still running.
    #[error("device {device} is already swapping (swap {swap})")]
    Busy {
        /// The device's id.
        device: String,
        /// The id of the swap running on it.
        swap: u64,
    },
    /// The new backend opened but cannot stand in for the old one (another disk capacity, a
    /// lower MTU, the socket already in use...).
    #[error("the new backend cannot take over: {0}")]
    Incompatible(String),
    /// The new backend could not be opened.
    #[error("cannot open the new backend: {0}")]
    Prepare(String),
}

/// Finished swaps remembered (per kind); older ones are forgotten, running ones never.
pub const HISTORY: usize = 1000;

/// Runs swaps and remembers them.
#[derive(Default)]
pub struct SwapManager {
    swaps: Mutex<Vec<SwapHandle>>,
    /// What forgotten records counted, per device. Locked after `swaps`, never before.
    retired: Mutex<BTreeMap<String, SwapTally>>,
    next_id: AtomicU64,
    memory: Mutex<MemorySwapHistory>,
    /// Set when the VM stops; swaps in progress see it through their [`SwapTarget`].
    vm_stopping: Arc<AtomicBool>,
    /// Called after every committed device swap.
    committed: Mutex<Option<record::CommitListener>>,
}

/// Memory swaps done so far (they run synchronously, so only their outcome is kept).
#[derive(Clone, Debug, Default)]
pub struct MemorySwapHistory {
    /// The latest [`HISTORY`] reports.
    pub completed: Vec<MemorySwapReport>,
    /// Memory swaps that succeeded, forgotten reports included.
    pub completed_total: u64,
    /// Memory swaps that failed or were refused.
    pub failed: u64,
    /// The vCPU pauses of the successful swaps.
    pub pauses: TimeHistogram,
}

impl SwapManager {
    fn lock(&self) -> MutexGuard<'_, Vec<SwapHandle>> {
        self.swaps.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The records of the swaps remembered (all running ones, the latest finished ones; see
    /// [`HISTORY`]), oldest first.
    pub fn list(&self) -> Vec<SwapRecord> {
        self.lock().iter().map(SwapHandle::snapshot).collect()
    }

    /// Tells swaps in progress that the VM is stopping: they roll back rather than wait.
    pub fn vm_stopping(&self) {
        self.vm_stopping.store(true, Ordering::Release);
    }

    /// Every finished swap, summed up per device (forgotten records included), and the swaps
    /// running now per device.
    pub fn tallies(&self) -> (BTreeMap<String, SwapTally>, BTreeMap<String, u64>) {
        let swaps = self.lock();
        let mut tallies = self.retired.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut running = BTreeMap::new();
        for swap in swaps.iter() {
            let record = swap.snapshot();
            tallies.entry(record.device.clone()).or_default();
            match record.state {
                SwapState::Running => *running.entry(record.device.clone()).or_default() += 1,
                _ => tallies.entry(record.device.clone()).or_default().add(&record),
            }
        }
        (tallies, running)
    }

    /// The swap with this id, unless it was never started or has been forgotten.
    pub fn get(&self, id: u64) -> Option<SwapHandle> {
        self.lock().iter().find(|s| s.id() == id).cloned()
    }

    /// A copy of the memory swaps' outcomes so far.
    pub fn memory_history(&self) -> MemorySwapHistory {
        self.memory.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn record_memory_swap(&self, outcome: &Result<MemorySwapReport, MemorySwapError>) {
        let mut history = self.memory.lock().unwrap_or_else(|p| p.into_inner());
        match outcome {
            Ok(report) => {
                if history.completed.len() == HISTORY {
                    history.completed.remove(0);
                }
                history.completed.push(report.clone());
                history.completed_total += 1;
                history.pauses.add_us(report.pause_us);
            }
            Err(_) => history.failed += 1,
        }
    }

    /// Has `listener` called after every swap that commits from now on.
    pub(crate) fn on_every_commit(&self, listener: record::CommitListener) {
        *self.committed.lock().unwrap_or_else(|p| p.into_inner()) = Some(listener);
    }

    /// Validates and prepares a swap of device `id`, then runs the rest on its own thread.
    /// Errors mean nothing changed; a swap refused once its record exists (the new backend
    /// failed to open or is incompatible) stays in the list, as failed.
    pub fn start(&self, entry: &DeviceEntry, request: SwapRequest) -> Result<SwapHandle, SwapError> {
        let id = entry.id.as_str();
        entry.handle.check_swap(id, &request)?;
        if request.mode == SwapMode::NewImage && !request.allow_new_image {
            let e = "a new image replaces the guest's disk contents; confirm it with allow_new_image";
            return Err(FieldError::new("allow_new_image", e).into());
        }
        request.check_limits()?;
        let mode =
            serde_json::to_value(request.mode).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
        let listener = self.committed.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let record = SwapHandle::new(
            self.next_id.fetch_add(1, Ordering::SeqCst) + 1,
            id,
            &mode,
            entry.handle.backend_description(),
        )
        .with_listener(listener);
        {
            // Checked and registered at once, so two requests cannot both start.
            let mut swaps = self.lock();
            if self.vm_stopping.load(Ordering::Acquire) {
                return Err(SwapError::VmExited("stopping".into()));
            }
            if let Some(running) = swaps.iter().find(|s| s.is_running() && s.device() == id) {
                return Err(SwapError::Busy { device: id.to_string(), swap: running.id() });
            }
            if swaps.len() >= HISTORY
                && let Some(oldest) = swaps.iter().position(|s| !s.is_running())
            {
                let gone = swaps.remove(oldest).snapshot();
                self.retired
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(gone.device.clone())
                    .or_default()
                    .add(&gone);
            }
            swaps.push(record.clone());
        }
        let launcher = SwapLauncher { entry, request: &request, record: &record, vm_stopping: &self.vm_stopping };
        entry.handle.start_swap(&launcher).inspect_err(|e| record.finish(SwapState::Failed, Some(e.to_string())))?;
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use std::time::Duration;

    use devices::blk::{FileBackend, VirtioBlock};
    use devices::bus::lock_device;
    use devices::interrupt::InterruptLine;
    use devices::lifecycle::Lifecycle;
    use devices::virtio::DeviceWorker;
    use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

    use super::launch::spawn_swap;
    use super::*;

    struct NoIrq;
    impl InterruptLine for NoIrq {
        fn trigger(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn disk_target(tag: &str) -> (Arc<Mutex<VirtioBlock>>, SwapTarget<VirtioBlock>, std::path::PathBuf) {
        let path = std::env::temp_dir().join(format!("swap-guard-{tag}-{}", std::process::id()));
        std::fs::File::create(&path).unwrap().write_all(&[0; 4096]).unwrap();
        let memory = GuestMemoryAtomic::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
        let backend = Box::new(FileBackend::open(&path, false).unwrap());
        let disk = Arc::new(Mutex::new(VirtioBlock::new(backend, "guard", Box::new(NoIrq), memory).unwrap()));
        let resync = DeviceWorker::new(disk.clone()).unwrap().resync_handle();
        let target = SwapTarget::new(disk.clone(), resync, Vec::new(), Arc::new(AtomicBool::new(false)));
        (disk, target, path)
    }

    #[test]
    fn a_swap_target_releases_only_its_own_holds() {
        let (disk, target, path) = disk_target("holds");
        lock_device(&disk).quiesce(); // someone else's hold (a memory swap)
        target.quiesce();
        target.quiesce();
        target.resume();
        target.resume();
        target.resume(); // one too many: not ours to release
        assert!(lock_device(&disk).is_quiesced(), "the other holder still has it stopped");
        target.quiesce();
        drop(target);
        assert!(lock_device(&disk).is_quiesced(), "dropping releases the target's hold only");
        lock_device(&disk).resume();
        assert!(!lock_device(&disk).is_quiesced());
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_panicking_swap_thread_fails_the_swap_and_resumes_the_device() {
        let (disk, target, path) = disk_target("panic");
        let record = SwapHandle::new(1, "guard", "switch", "file".into());
        spawn_swap("guard", &record, move || {
            target.quiesce();
            panic!("injected");
        });
        let done = record.wait(Duration::from_secs(60));
        assert_eq!(done.state, SwapState::Failed);
        assert!(done.reason.as_deref().unwrap_or_default().contains("panicked (injected)"), "{:?}", done.reason);
        assert!(!lock_device(&disk).is_quiesced(), "the device takes requests again");
        std::fs::remove_file(path).unwrap();
    }
}
