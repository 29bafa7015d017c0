//! The virtio-vsock device in the registry: its backend is the Unix socket host connections
//! go to (`{"socket"}`); swapping it moves new connections to another socket.

use std::path::PathBuf;
use std::sync::Arc;

use devices::bus::lock_device;
use devices::metrics::RequestMetrics;
use devices::vsock::{VirtioVsock, VsockBackend};
use serde::Deserialize;

use super::backends;
use super::registry::{DeviceKind, Registered};
use crate::config::json::FieldError;
use crate::config::{DeviceConfig, VsockConfig};
use crate::swap::{SwapError, SwapLauncher, SwapRequest};

/// The vsock backend in a swap request.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VsockBackendSpec {
    socket: PathBuf,
}

impl DeviceKind for VirtioVsock {
    type Config = VsockConfig;
    const KIND: &'static str = "vsock";

    fn describe_backend(&self) -> String {
        self.backend().description()
    }

    fn request_metrics(&self) -> Vec<(&'static str, Arc<RequestMetrics>)> {
        let (rx, tx) = self.metrics();
        vec![("rx", rx), ("tx", tx)]
    }

    fn device_config(config: VsockConfig) -> DeviceConfig {
        DeviceConfig::Vsock(config)
    }

    fn check_swap(id: &str, request: &SwapRequest) -> Result<(), FieldError> {
        request.switch_only(id, Self::KIND)
    }

    fn start_swap(this: &Registered<Self>, launcher: &SwapLauncher<'_>) -> Result<(), SwapError> {
        let spec: VsockBackendSpec = launcher.backend()?;
        // Checked first for a clear answer; binding would refuse the live socket anyway.
        if lock_device(&this.device).describe_backend() == format!("unix {}", spec.socket.display()) {
            return Err(SwapError::Incompatible(format!("already using {}", spec.socket.display())));
        }
        let backend =
            backends::open_vsock(&spec.socket, launcher.id()).map_err(|e| SwapError::Prepare(e.to_string()))?;
        let backend: Box<dyn VsockBackend> = Box::new(backend);
        let description = backend.description();
        let current = this.config.clone();
        launcher.launch_switch(this.device.clone(), backend, description, move || {
            lock_device(&current).socket = spec.socket;
        })
    }
}
