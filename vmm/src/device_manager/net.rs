//! The virtio-net device in the registry: its backends are a tap (`{"tap"}`) or a Unix
//! datagram socket (`{"unix"}`); the MAC and MTU belong to the NIC and never change.

use std::sync::{Arc, Mutex};

use devices::bus::lock_device;
use devices::lifecycle::Lifecycle;
use devices::metrics::RequestMetrics;
use devices::net::VirtioNet;
use devices::virtio::VirtioDevice;

use super::backends;
use super::registry::VmDevice;
use crate::config::json::FieldError;
use crate::config::{DeviceConfig, NetConfig};
use crate::swap::{SwapError, SwapLauncher, SwapRequest};

pub struct NetDevice {
    device: Arc<Mutex<VirtioNet>>,
    /// The configuration of the backend serving now (updated when a swap commits).
    config: Arc<Mutex<NetConfig>>,
}

impl NetDevice {
    pub fn new(device: Arc<Mutex<VirtioNet>>, config: NetConfig) -> Self {
        Self { device, config: Arc::new(Mutex::new(config)) }
    }
}

impl VmDevice for NetDevice {
    fn kind(&self) -> &'static str {
        "net"
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
        DeviceConfig::Net(lock_device(&self.config).clone())
    }

    fn check_swap(&self, id: &str, request: &SwapRequest) -> Result<(), FieldError> {
        request.switch_only(id, self.kind())
    }

    fn start_swap(&self, launcher: &SwapLauncher<'_>) -> Result<(), SwapError> {
        let net: NetConfig = launcher.backend()?;
        if net.id.is_some() || net.mac.is_some() || net.mtu.is_some() {
            let e = "id, mac and mtu belong to the NIC and do not change in a swap";
            return Err(FieldError::new("backend", e).into());
        }
        net.check().map_err(|e| FieldError::new("backend", e))?;
        let backend = backends::open_net(&net, launcher.id()).map_err(|e| SwapError::Prepare(e.to_string()))?;
        let description = backend.description();
        let current = self.config.clone();
        let new_config = {
            let now = lock_device(&current);
            NetConfig { id: now.id.clone(), mac: now.mac.clone(), mtu: now.mtu, ..net }
        };
        launcher.launch_switch(self.device.clone(), backend, description, move || {
            *lock_device(&current) = new_config;
        })
    }
}
