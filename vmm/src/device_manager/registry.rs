//! The one registry of devices: everything generic code (the control API, swaps, snapshots,
//! the quiesce guard) needs of a device, behind one trait, so none of it names a device type
//! or downcasts. A device kind brings only what is its own ([`DeviceKind`], in its own file
//! next to this one); [`Registered`] does the rest for every kind.

use std::path::Path;
use std::sync::{Arc, Mutex};

use devices::blk::UndoLog;
use devices::bus::lock_device;
use devices::lifecycle::Lifecycle;
use devices::metrics::RequestMetrics;
use devices::virtio::VirtioDevice;

use crate::config::DeviceConfig;
use crate::config::json::FieldError;
use crate::swap::{SwapError, SwapLauncher, SwapRequest};

/// A device of the VM, whatever its type.
pub trait VmDevice: Send + Sync {
    /// "block", "net", "vsock": what the API shows.
    fn kind(&self) -> &'static str;
    /// What the device's backend currently is, in words.
    fn backend_description(&self) -> String;
    /// Runs `f` on the device as a [`Lifecycle`] (under its lock).
    fn with_lifecycle(&self, f: &mut dyn FnMut(&mut dyn Lifecycle));
    /// Request counters by direction ("io" for block, "rx"/"tx" for net and vsock).
    fn metrics(&self) -> Vec<(&'static str, Arc<RequestMetrics>)>;
    /// The configuration space as the driver reads it.
    fn config_space(&self) -> Vec<u8>;
    /// The device's configuration with its current backend (a committed swap changes it), to
    /// build the same device again (a restore).
    fn current_config(&self) -> DeviceConfig;
    /// Refuses, before anything starts, the swap modes and options this kind of device does
    /// not have (naming the field).
    fn check_swap(&self, id: &str, request: &SwapRequest) -> Result<(), FieldError>;
    /// Opens the backend the request describes (in the fields of this device's flag), checks
    /// it can take over and launches the swap. Errors mean nothing changed.
    fn start_swap(&self, launcher: &SwapLauncher<'_>) -> Result<(), SwapError>;
    /// From now on, saves in a log in `dir` whatever the device overwrites in storage the
    /// VM keeps (a disk image), so that it can be undone ([`UndoLog`]); `None` for devices
    /// that keep nothing. Call before the device takes requests.
    fn log_overwrites(&self, id: &str, dir: &Path) -> Result<Option<UndoLog>, String>;
}

/// What differs from one kind of device to another.
pub trait DeviceKind: VirtioDevice + Send + Sized + 'static {
    /// The device's configuration (its flag's fields), kept for its current backend.
    type Config: Clone + Send + 'static;
    /// What the API shows as the device's kind.
    const KIND: &'static str;
    fn describe_backend(&self) -> String;
    fn request_metrics(&self) -> Vec<(&'static str, Arc<RequestMetrics>)>;
    fn device_config(config: Self::Config) -> DeviceConfig;
    /// See [`VmDevice::check_swap`].
    fn check_swap(id: &str, request: &SwapRequest) -> Result<(), FieldError>;
    /// See [`VmDevice::start_swap`].
    fn start_swap(device: &Registered<Self>, launcher: &SwapLauncher<'_>) -> Result<(), SwapError>;
    /// See [`VmDevice::log_overwrites`]; a device that keeps nothing has nothing to undo.
    fn log_overwrites(_device: &Registered<Self>, _id: &str, _dir: &Path) -> Result<Option<UndoLog>, String> {
        Ok(None)
    }
}

/// A device in the registry, with the configuration of the backend serving it now (a
/// committed swap updates it).
pub struct Registered<D: DeviceKind> {
    pub device: Arc<Mutex<D>>,
    pub config: Arc<Mutex<D::Config>>,
}

impl<D: DeviceKind> Registered<D> {
    pub fn new(device: Arc<Mutex<D>>, config: D::Config) -> Self {
        Self { device, config: Arc::new(Mutex::new(config)) }
    }
}

impl<D: DeviceKind> VmDevice for Registered<D> {
    fn kind(&self) -> &'static str {
        D::KIND
    }

    fn backend_description(&self) -> String {
        lock_device(&self.device).describe_backend()
    }

    fn with_lifecycle(&self, f: &mut dyn FnMut(&mut dyn Lifecycle)) {
        f(&mut *lock_device(&self.device))
    }

    fn metrics(&self) -> Vec<(&'static str, Arc<RequestMetrics>)> {
        lock_device(&self.device).request_metrics()
    }

    fn config_space(&self) -> Vec<u8> {
        lock_device(&self.device).config_space()
    }

    fn current_config(&self) -> DeviceConfig {
        D::device_config(lock_device(&self.config).clone())
    }

    fn check_swap(&self, id: &str, request: &SwapRequest) -> Result<(), FieldError> {
        D::check_swap(id, request)
    }

    fn start_swap(&self, launcher: &SwapLauncher<'_>) -> Result<(), SwapError> {
        D::start_swap(self, launcher)
    }

    fn log_overwrites(&self, id: &str, dir: &Path) -> Result<Option<UndoLog>, String> {
        D::log_overwrites(self, id, dir)
    }
}

/// A shared handle on a registered device.
#[derive(Clone)]
pub struct DeviceHandle(Arc<dyn VmDevice>);

impl DeviceHandle {
    pub fn new(device: impl VmDevice + 'static) -> Self {
        Self(Arc::new(device))
    }

    /// Runs `f` on the device as a [`Lifecycle`], whatever its type.
    pub fn lifecycle<R>(&self, f: impl FnOnce(&mut dyn Lifecycle) -> R) -> R {
        let (mut f, mut result) = (Some(f), None);
        self.0.with_lifecycle(&mut |device| {
            if let Some(f) = f.take() {
                result = Some(f(device));
            }
        });
        result.expect("with_lifecycle calls back exactly once")
    }
}

impl std::ops::Deref for DeviceHandle {
    type Target = dyn VmDevice;
    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}
