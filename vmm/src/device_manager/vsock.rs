//! The virtio-vsock device in the registry: its backend is the Unix socket host connections
//! go to (`{"socket"}`); swapping it moves new connections to another socket.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use devices::bus::lock_device;
use devices::lifecycle::Lifecycle;
use devices::metrics::RequestMetrics;
use devices::virtio::VirtioDevice;
use devices::vsock::{VirtioVsock, VsockBackend};
use serde::Deserialize;

use super::backends;
use super::registry::VmDevice;
use crate::config::json::FieldError;
use crate::config::{DeviceConfig, VsockConfig};
use crate::swap::{SwapError, SwapLauncher, SwapRequest};

pub struct VsockDevice {
    device: Arc<Mutex<VirtioVsock>>,
    /// The configuration of the backend serving now (updated when a swap commits).
    config: Arc<Mutex<VsockConfig>>,
}

impl VsockDevice {
    pub fn new(device: Arc<Mutex<VirtioVsock>>, config: VsockConfig) -> Self {
        Self { device, config: Arc::new(Mutex::new(config)) }
    }
}

/// The vsock backend in a swap request.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VsockBackendSpec {
    socket: PathBuf,
}

impl VmDevice for VsockDevice {
    fn kind(&self) -> &'static str {
        "vsock"
    }

    fn backend_description(&self) -> String {
        lock_device(&self.device).backend().description()
    }

    fn with_lifecycle(&self, f: &mut dyn FnMut(&mut dyn Lifecycle)) {
        f(&mut *lock_device(&self.device))
    }

    fn metrics(&self) -> Vec<(&'static str, Arc<RequestMetrics>)> {
        let (rx, tx) = lock_device(&self.device).metrics();
        vec![("rx", rx), ("tx", tx)]
    }

    fn config_space(&self) -> Vec<u8> {
        lock_device(&self.device).config_space()
    }

    fn current_config(&self) -> DeviceConfig {
        DeviceConfig::Vsock(lock_device(&self.config).clone())
    }

    fn check_swap(&self, id: &str, request: &SwapRequest) -> Result<(), FieldError> {
        request.switch_only(id, self.kind())
    }

    fn start_swap(&self, launcher: &SwapLauncher<'_>) -> Result<(), SwapError> {
        let spec: VsockBackendSpec = launcher.backend()?;
        // Checked first for a clear answer; binding would refuse the live socket anyway.
        if self.backend_description() == format!("unix {}", spec.socket.display()) {
            return Err(SwapError::Incompatible(format!("already using {}", spec.socket.display())));
        }
        let backend =
            backends::open_vsock(&spec.socket, launcher.id()).map_err(|e| SwapError::Prepare(e.to_string()))?;
        let backend: Box<dyn VsockBackend> = Box::new(backend);
        let description = backend.description();
        let current = self.config.clone();
        launcher.launch_switch(self.device.clone(), backend, description, move || {
            lock_device(&current).socket = spec.socket;
        })
    }
}
