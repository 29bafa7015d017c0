//! Live component replacement: swapping a device's backend or a RAM region's backing while
//! the guest runs.
//!
//! A device swap is a transaction ([`transaction`]) written once for every device type:
//! prepare (open the new backend, check it can take over; refused before anything changes),
//! quiesce at a request boundary, drain in-flight requests, switch (queue state stays in the
//! device), resume, verify under real traffic, then commit (close the old backend) or roll
//! back automatically (the old backend was kept open; requests the new one failed are retried
//! on it, so the guest sees no error). Live storage migration ([`migration`]) and memory
//! region swaps ([`memory`]) reuse the same pieces. [`SwapManager`] runs swaps on their own
//! threads and keeps their records.

pub mod memory;
pub mod migration;
mod record;
pub mod transaction;
mod urgent;
mod verify;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use devices::blk::{Fault, FaultyBackend};
use devices::bus::lock_device;
use devices::lifecycle::BackendSlot;
use serde::{Deserialize, Serialize};

pub use memory::{MemorySwapError, MemorySwapReport, MemorySwapRequest};
pub use migration::MigrateOptions;
pub use record::{CopyStats, Phase, SwapHandle, SwapRecord, SwapState, TimelineEntry};
pub use transaction::{SwapParams, SwapTarget};
pub use verify::VerifyPolicy;

use crate::config::json::{self, FieldError};
use crate::config::{DiskConfig, NetConfig};
use crate::device_manager::{DeviceEntry, DeviceHandle, DeviceManager, backends};

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
    #[serde(default)]
    pub mode: SwapMode,
    #[serde(default)]
    pub allow_new_image: bool,
    /// Disks only, for testing rollback: wrap the new backend in a fault injector.
    #[serde(default)]
    pub fault: Option<Fault>,
    #[serde(default = "default_drain_ms")]
    pub drain_timeout_ms: u64,
    #[serde(default)]
    pub verify: VerifyPolicy,
    #[serde(default)]
    pub migrate: MigrateOptions,
}

/// The vsock backend in a swap request.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VsockBackendSpec {
    socket: PathBuf,
}

/// Why a swap was refused.
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    #[error("no device {0:?}")]
    NoSuchDevice(String),
    #[error("invalid swap request: {0}")]
    Invalid(#[from] FieldError),
    #[error("the VM has exited ({0})")]
    VmExited(String),
    #[error("device {device} is already swapping (swap {swap})")]
    Busy { device: String, swap: u64 },
    #[error("the new backend cannot take over: {0}")]
    Incompatible(String),
    #[error("cannot open the new backend: {0}")]
    Prepare(String),
}

/// Runs swaps and remembers them.
#[derive(Default)]
pub struct SwapManager {
    swaps: Mutex<Vec<SwapHandle>>,
    next_id: AtomicU64,
    memory: Mutex<MemorySwapHistory>,
}

/// Memory swaps done so far (they run synchronously, so only their outcome is kept).
#[derive(Clone, Debug, Default)]
pub struct MemorySwapHistory {
    pub completed: Vec<MemorySwapReport>,
    pub failed: u64,
}

fn parse<T: serde::de::DeserializeOwned>(value: &serde_json::Value) -> Result<T, SwapError> {
    json::from_value(value.clone()).map_err(|e| SwapError::Invalid(e.nested_in("backend")))
}

impl SwapManager {
    fn lock(&self) -> MutexGuard<'_, Vec<SwapHandle>> {
        self.swaps.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn list(&self) -> Vec<SwapRecord> {
        self.lock().iter().map(SwapHandle::snapshot).collect()
    }

    pub fn get(&self, id: u64) -> Option<SwapHandle> {
        self.lock().iter().find(|s| s.id() == id).cloned()
    }

    pub fn memory_history(&self) -> MemorySwapHistory {
        self.memory.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn record_memory_swap(&self, outcome: &Result<MemorySwapReport, MemorySwapError>) {
        let mut history = self.memory.lock().unwrap_or_else(|p| p.into_inner());
        match outcome {
            Ok(report) => history.completed.push(report.clone()),
            Err(_) => history.failed += 1,
        }
    }

    /// Validates and prepares a swap of device `id`, then runs the rest on its own thread.
    /// Errors mean nothing changed (the refused swap is still recorded, as failed).
    pub fn start(&self, devices: &DeviceManager, id: &str, request: SwapRequest) -> Result<SwapHandle, SwapError> {
        let entry = devices.find(id).ok_or_else(|| SwapError::NoSuchDevice(id.to_string()))?;
        if let Some(running) = self.lock().iter().find(|s| s.is_running() && s.device() == id) {
            return Err(SwapError::Busy { device: id.to_string(), swap: running.id() });
        }
        let kind = entry.handle.kind();
        if request.mode != SwapMode::Switch && kind != "block" {
            let e = format!("mode {:?} applies to disks, {id} is a {kind} device", request.mode);
            return Err(FieldError::new("mode", e).into());
        }
        if request.mode == SwapMode::NewImage && !request.allow_new_image {
            let e = "mode new_image replaces the guest's disk contents: set allow_new_image to true to confirm";
            return Err(FieldError::new("allow_new_image", e).into());
        }
        if request.fault.is_some() && kind != "block" {
            return Err(FieldError::new("fault", "fault injection applies to disks").into());
        }
        let mode =
            serde_json::to_value(request.mode).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
        let record = SwapHandle::new(
            self.next_id.fetch_add(1, Ordering::SeqCst) + 1,
            id,
            &mode,
            entry.handle.backend_description(),
        );
        self.lock().push(record.clone());
        let fail = |e: SwapError| {
            record.finish(SwapState::Failed, Some(e.to_string()));
            e
        };
        let params =
            SwapParams { drain_timeout: Duration::from_millis(request.drain_timeout_ms), verify: request.verify };
        match entry.handle.clone() {
            DeviceHandle::Block(device) => {
                let disk: DiskConfig = parse(&request.backend).map_err(fail)?;
                if disk.id.is_some() {
                    return Err(fail(FieldError::new("backend.id", "the device id cannot change in a swap").into()));
                }
                disk.check().map_err(|e| fail(FieldError::new("backend", e).into()))?;
                let mut backend =
                    backends::open_disk(&disk, id).map_err(|e| fail(SwapError::Prepare(e.to_string())))?;
                if let Some(fault) = request.fault {
                    backend = Box::new(
                        FaultyBackend::new(backend, fault).map_err(|e| fail(SwapError::Prepare(e.to_string())))?,
                    );
                }
                if request.mode == SwapMode::Switch
                    && let Err(e) = lock_device(&device).check_compatible(&*backend)
                {
                    return Err(fail(SwapError::Incompatible(e.to_string())));
                }
                record.set_target(backend.info().description.clone());
                let target = swap_target(entry, device);
                let (record, mode, migrate) = (record.clone(), request.mode, request.migrate);
                spawn(id, move || match mode {
                    SwapMode::Migrate => migration::run(&target, backend, &params, &migrate, &record),
                    _ => transaction::run(&target, backend, &params, &record),
                });
            }
            DeviceHandle::Net(device) => {
                let net: NetConfig = parse(&request.backend).map_err(fail)?;
                if net.id.is_some() || net.mac.is_some() || net.mtu.is_some() {
                    let e = "id, mac and mtu belong to the NIC and do not change in a swap";
                    return Err(fail(FieldError::new("backend", e).into()));
                }
                net.check().map_err(|e| fail(FieldError::new("backend", e).into()))?;
                let backend = backends::open_net(&net, id).map_err(|e| fail(SwapError::Prepare(e.to_string())))?;
                record.set_target(backend.description());
                let target = swap_target(entry, device);
                let record = record.clone();
                spawn(id, move || transaction::run(&target, backend, &params, &record));
            }
            DeviceHandle::Vsock(device) => {
                let spec: VsockBackendSpec = parse(&request.backend).map_err(fail)?;
                // Checked before binding: binding replaces a stale socket file at that path,
                // which would be the live one.
                let current = lock_device(&device).backend_description();
                if current == format!("unix {}", spec.socket.display()) {
                    return Err(fail(SwapError::Incompatible(format!("already using {}", spec.socket.display()))));
                }
                let backend =
                    backends::open_vsock(&spec.socket, id).map_err(|e| fail(SwapError::Prepare(e.to_string())))?;
                let backend: Box<dyn devices::vsock::VsockBackend> = Box::new(backend);
                record.set_target(backend.description());
                let target = swap_target(entry, device);
                let record = record.clone();
                spawn(id, move || transaction::run(&target, backend, &params, &record));
            }
        }
        Ok(record)
    }
}

fn swap_target<D>(entry: &DeviceEntry, device: std::sync::Arc<Mutex<D>>) -> SwapTarget<D> {
    SwapTarget {
        device,
        resync: entry.resync.clone(),
        metrics: entry.handle.metrics().into_iter().map(|(_, m)| m).collect(),
    }
}

fn spawn(device: &str, f: impl FnOnce() + Send + 'static) {
    if let Err(e) = std::thread::Builder::new().name(format!("swap-{device}")).spawn(f) {
        log::error!("cannot start the swap thread for {device}: {e}");
    }
}
