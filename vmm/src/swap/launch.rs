//! What a device kind gets to start a swap of its backend with ([`VmDevice::start_swap`]):
//! the request, the swap's record, and the generic pieces (the transaction's target, the swap
//! thread, the switch that every kind ends with). The kinds bring only what is theirs: how to
//! read and open a backend, and what may take over.
//!
//! [`VmDevice::start_swap`]: crate::device_manager::VmDevice::start_swap

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use devices::bus::lock_device;
use devices::lifecycle::{BackendSlot, Lifecycle};

use super::record::{SwapHandle, SwapState};
use super::transaction::{self, SwapParams, SwapTarget};
use super::{SwapError, SwapRequest};
use crate::config::json;
use crate::device_manager::DeviceEntry;

pub struct SwapLauncher<'a> {
    pub(super) entry: &'a DeviceEntry,
    pub(super) request: &'a SwapRequest,
    pub(super) record: &'a SwapHandle,
    pub(super) vm_stopping: &'a Arc<AtomicBool>,
}

impl SwapLauncher<'_> {
    /// The device's id.
    pub fn id(&self) -> &str {
        &self.entry.id
    }

    pub fn request(&self) -> &SwapRequest {
        self.request
    }

    pub fn record(&self) -> &SwapHandle {
        self.record
    }

    pub fn params(&self) -> SwapParams {
        SwapParams {
            drain_timeout: std::time::Duration::from_millis(self.request.drain_timeout_ms),
            verify: self.request.verify,
        }
    }

    /// The request's `backend`, read as the device's own configuration type (errors name the
    /// field inside `backend`).
    pub fn backend<T: serde::de::DeserializeOwned>(&self) -> Result<T, SwapError> {
        json::from_value(self.request.backend.clone()).map_err(|e| {
            // A setting this kind does not have, at the top of the backend: the shape of
            // another kind's backend, which the API document allows (it cannot tell kinds
            // apart by id). Anything else is malformed.
            let unknown = e.message.starts_with("unknown field");
            match (&e.field, unknown) {
                (Some(setting), true) if !setting.contains('.') => SwapError::OtherKindOfBackend {
                    id: self.entry.id.clone(),
                    kind: self.entry.handle.kind(),
                    setting: setting.clone(),
                },
                _ => SwapError::Invalid(e.nested_in("backend")),
            }
        })
    }

    /// The transaction's view of `device`.
    pub fn target<D: Lifecycle>(&self, device: Arc<Mutex<D>>) -> SwapTarget<D> {
        let metrics = self.entry.handle.metrics().into_iter().map(|(_, m)| m).collect();
        SwapTarget::new(device, self.entry.resync.clone(), metrics, self.vm_stopping.clone())
    }

    /// Runs the rest of the swap on its own thread (see [`spawn_swap`]).
    pub fn spawn(&self, f: impl FnOnce() + Send + 'static) {
        spawn_swap(self.id(), self.record, f)
    }

    /// The end of a switch to `backend`, the same for every device: refused unless the device
    /// says it can take over, otherwise the transaction runs on its own thread, and
    /// `on_commit` runs if it commits.
    pub fn launch_switch<D>(
        &self,
        device: Arc<Mutex<D>>,
        backend: Box<D::Backend>,
        description: String,
        on_commit: impl FnOnce() + Send + 'static,
    ) -> Result<(), SwapError>
    where
        D: BackendSlot + Send + 'static,
        D::Backend: Send,
    {
        lock_device(&device).check_compatible(&*backend).map_err(|e| SwapError::Incompatible(e.to_string()))?;
        self.record.set_target(description);
        let target = self.target(device);
        let (record, params) = (self.record.clone(), self.params());
        record.on_commit(on_commit);
        self.spawn(move || transaction::run(&target, backend, &params, &record));
        Ok(())
    }
}

/// Runs the rest of a swap on its own thread. If no thread can be had, nothing has changed
/// yet (the new backend is dropped with the closure) and the swap ends as failed. A swap
/// whose thread panics ends as failed too (its [`SwapTarget`] resumes the device as it
/// unwinds), so the device is not left marked busy.
pub(super) fn spawn_swap(device: &str, record: &SwapHandle, f: impl FnOnce() + Send + 'static) {
    let thread_record = record.clone();
    let guarded = move || {
        if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
            let what = crate::panic_message(&*panic);
            if thread_record.is_running() {
                let reason = format!("internal error: the swap thread panicked ({what}); the device keeps running");
                thread_record.finish(SwapState::Failed, Some(reason));
            }
        }
    };
    if let Err(e) = std::thread::Builder::new().name(format!("swap-{device}")).spawn(guarded) {
        log::error!("cannot start the swap thread for {device}: {e}");
        record.finish(SwapState::Failed, Some(format!("cannot start the swap thread: {e}; nothing changed")));
    }
}
