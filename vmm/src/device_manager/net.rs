//! The virtio-net device in the registry: its backends are a tap (`{"tap"}`) or a Unix
//! datagram socket (`{"unix"}`); the MAC and MTU belong to the NIC and never change.

use std::sync::Arc;

use devices::bus::lock_device;
use devices::metrics::RequestMetrics;
use devices::net::VirtioNet;

use super::backends;
use super::registry::{DeviceKind, Registered};
use crate::config::json::FieldError;
use crate::config::{DeviceConfig, NetConfig};
use crate::swap::{SwapError, SwapLauncher, SwapRequest};

impl DeviceKind for VirtioNet {
    type Config = NetConfig;
    const KIND: &'static str = "net";

    fn describe_backend(&self) -> String {
        self.backend().description()
    }

    fn request_metrics(&self) -> Vec<(&'static str, Arc<RequestMetrics>)> {
        let (rx, tx) = self.metrics();
        vec![("rx", rx), ("tx", tx)]
    }

    fn device_config(config: NetConfig) -> DeviceConfig {
        DeviceConfig::Net(config)
    }

    fn check_swap(id: &str, request: &SwapRequest) -> Result<(), FieldError> {
        request.switch_only(id, Self::KIND)
    }

    fn start_swap(this: &Registered<Self>, launcher: &SwapLauncher<'_>) -> Result<(), SwapError> {
        let net: NetConfig = launcher.backend()?;
        if net.id.is_some() || net.mac.is_some() || net.mtu.is_some() {
            let e = "id, mac and mtu belong to the NIC and do not change in a swap";
            return Err(FieldError::new("backend", e).into());
        }
        net.check().map_err(|e| FieldError::new("backend", e))?;
        let backend = backends::open_net(&net, launcher.id()).map_err(|e| SwapError::Prepare(e.to_string()))?;
        let description = backend.description();
        let current = this.config.clone();
        let new_config = {
            let now = lock_device(&current);
            NetConfig { id: now.id.clone(), mac: now.mac.clone(), mtu: now.mtu, ..net }
        };
        launcher.launch_switch(this.device.clone(), backend, description, move || {
            *lock_device(&current) = new_config;
        })
    }
}
