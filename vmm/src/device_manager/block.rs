//! The virtio-blk device in the registry: its backends are disks (`{"path", "engine"}`,
//! `{"nbd", "export"}`), swapped by a switch, a live migration or a new image.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use devices::blk::{BlockBackend, FaultyBackend, Takeover, UndoLog, VirtioBlock};
use devices::bus::lock_device;
use devices::metrics::RequestMetrics;

use super::backends;
use super::registry::{DeviceKind, Registered};
use crate::config::json::FieldError;
use crate::config::{DeviceConfig, DiskConfig};
use crate::swap::{
    MigrateOptions, SwapError, SwapHandle, SwapLauncher, SwapMode, SwapParams, SwapRequest, SwapState, SwapTarget,
    migration, transaction,
};

/// The least time a new disk backend gets to answer its probe reads (a drain timeout may be
/// set much shorter than a network round trip to an NBD server).
const PROBE_MIN_TIMEOUT: Duration = Duration::from_secs(1);

impl DeviceKind for VirtioBlock {
    type Config = DiskConfig;
    const KIND: &'static str = "block";

    fn describe_backend(&self) -> String {
        self.backend().info().description.clone()
    }

    fn request_metrics(&self) -> Vec<(&'static str, Arc<RequestMetrics>)> {
        vec![("io", self.metrics())]
    }

    fn device_config(config: DiskConfig) -> DeviceConfig {
        DeviceConfig::Disk(config)
    }

    fn check_swap(_id: &str, _request: &SwapRequest) -> Result<(), FieldError> {
        // Every mode and fault injection apply to disks.
        Ok(())
    }

    fn start_swap(this: &Registered<Self>, launcher: &SwapLauncher<'_>) -> Result<(), SwapError> {
        let (id, request) = (launcher.id(), launcher.request());
        let disk: DiskConfig = launcher.backend()?;
        if disk.id.is_some() {
            return Err(FieldError::new("backend.id", "the device id cannot change in a swap").into());
        }
        disk.check().map_err(|e| FieldError::new("backend", e))?;
        let mut backend = backends::open_disk(&disk, id).map_err(|e| SwapError::Prepare(e.to_string()))?;
        if let Some(fault) = request.fault {
            backend = Box::new(FaultyBackend::new(backend, fault).map_err(|e| SwapError::Prepare(e.to_string()))?);
        }
        // A switch must serve the same data, a migration target be as big as the disk (and
        // writable, which the mirror checks); a new image may be anything.
        let takeover = match request.mode {
            SwapMode::Switch => Takeover::SameData,
            SwapMode::Migrate => Takeover::CopiedData,
            SwapMode::NewImage => Takeover::NewImage,
        };
        let compatible = lock_device(&this.device).check_takeover(&*backend, takeover);
        compatible.map_err(|e| SwapError::Incompatible(e.to_string()))?;
        launcher.record().set_target(backend.info().description.clone());
        let target = launcher.target(this.device.clone());
        let (current, new_config) =
            (this.config.clone(), DiskConfig { id: lock_device(&this.config).id.clone(), ..disk });
        let (record, params, mode, migrate) =
            (launcher.record().clone(), launcher.params(), request.mode, request.migrate);
        record.on_commit(move || *lock_device(&current) = new_config);
        launcher.spawn(move || run_disk_swap(mode, &target, backend, &params, &migrate, &record));
        Ok(())
    }

    fn log_overwrites(this: &Registered<Self>, id: &str, dir: &Path) -> Result<Option<UndoLog>, String> {
        let disk = lock_device(&this.config).clone();
        let Some(path) = disk.path.filter(|_| !disk.readonly) else {
            if disk.nbd.is_some() {
                log::warn!("{id} is an NBD export: its writes cannot be undone by a rollback");
            }
            return Ok(None);
        };
        let undo = UndoLog::start(&path, &dir.join(format!("{id}.undo"))).map_err(|e| format!("{id}: {e}"))?;
        lock_device(&this.device).log_overwrites(undo.clone());
        Ok(Some(undo))
    }
}

/// The rest of a disk swap, on its thread.
fn run_disk_swap(
    mode: SwapMode,
    target: &SwapTarget<VirtioBlock>,
    backend: Box<dyn BlockBackend>,
    params: &SwapParams,
    migrate: &MigrateOptions,
    record: &SwapHandle,
) {
    match mode {
        // The copy itself tries the target at once, and rolls back if it fails.
        SwapMode::Migrate => migration::run(target, backend, params, migrate, record),
        _ => {
            let mut backend = backend;
            // Off the API thread, and before the disk stops: a dead or hung backend is
            // refused here rather than switched in and rolled back.
            let patience = params.drain_timeout.max(PROBE_MIN_TIMEOUT);
            if let Err(e) = devices::blk::probe(&mut *backend, patience) {
                let reason = format!("the new backend failed its probe: {e}; nothing changed");
                return record.finish(SwapState::Failed, Some(reason));
            }
            transaction::run(target, backend, params, record)
        }
    }
}
