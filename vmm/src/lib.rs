//! A KVM virtual machine monitor built on the rust-vmm crates, designed around changing a
//! running VM without stopping it: device backends and RAM backings swapped under load,
//! snapshots taken while the guest runs, all driven from the same handle.
//!
//! Add it to an embedding program's `Cargo.toml` from a checkout of this repository (it is not
//! on crates.io), with `guest-agent` for the bundled test guest:
//!
//! ```toml
//! [dependencies]
//! # the library alone; the default feature `cli` is the `vmm` command and its dependencies
//! vmm = { path = "../vmm/vmm", default-features = false }
//! guest-agent = { path = "../vmm/guest-agent" }   # the microguest, for trying it out
//! ```
//!
//! Start a VM with [`VmBuilder`], drive it through the returned [`Vm`]:
//!
//! ```
//! use vmm::{SerialOutput, VmBuilder, VmExit};
//!
//! // The bundled microguest: `prog=smp` has every vCPU bump a shared counter until a byte
//! // arrives on its serial port, then checks the count and exits with status 0.
//! let vm = VmBuilder::new(guest_agent::MICROGUEST_IMAGE)
//!     .cmdline("prog=smp until_input=1")
//!     .vcpus(2)
//!     .memory_mib(32)
//!     .serial_output(SerialOutput::Sink)
//!     .start()?;
//! vm.pause()?; // returns once every vCPU is stopped at an instruction boundary
//! vm.resume()?;
//! vm.serial_input().send(b"\n");
//! assert_eq!(vm.wait(), VmExit::Guest(0));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! What a running VM offers beyond that, each with its own module:
//! - [`swap`]: replace a device's backend ([`Vm::swap_device`]) or a RAM region's backing
//!   ([`Vm::swap_memory`]) while the guest runs: drained, verified, rolled back on failure.
//! - [`snapshot`]: full and diff snapshots of a running VM ([`Vm::snapshot`]), continued with
//!   [`VmBuilder::restore`].
//! - [`api`]: the HTTP control API ([`api::ApiServer`]) that `vmm run --api-sock` serves, and
//!   its client.
//! - [`config`]: the VM's configuration ([`VmConfig`]), the JSON of `vmm run --config`.
//!
//! Device models live in the `devices` crate and never touch KVM; this crate owns KVM (the
//! `hv` module), guest RAM, the boot path and the vCPU threads, all private: embedders see
//! the VM through [`Vm`] only. The one window onto KVM's structures is a snapshot's content
//! ([`snapshot::VmSnapshot`], read and written by [`snapshot::format`]), for tools that
//! inspect snapshot files.

#![warn(missing_docs)]

mod acpi;
pub mod api;
mod boot;
mod builder;
pub mod config;
mod device_manager;
mod exit;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
mod hv;
mod memory;
#[cfg(test)]
mod mutate;
mod quiesce;
pub mod replication;
pub mod snapshot;
pub mod swap;
mod vcpu;
mod vm;

pub use boot::BootProtocol;
pub use builder::{BuildError, VmBuilder};
pub use config::{SerialConfig, VmConfig};
pub use device_manager::shm::{ShmError, ShmStatus};
pub use devices::legacy::SerialOutput;
pub use memory::{HUGE_PAGE, RamBacking, RegionInfo, free_huge_pages};
pub use vm::{Crash, CrashKind, DeviceInfo, SerialInput, Vm, VmError, VmExit, VmInfo, VmState};

/// The errors behind [`BuildError`], [`VmError`] and the swap and snapshot errors, for
/// embedders that match on causes.
pub mod error {
    pub use crate::acpi::AcpiError;
    pub use crate::boot::BootError;
    pub use crate::boot::linux::ZeroPageError;
    pub use crate::boot::pvh::PvhError;
    pub use crate::device_manager::DeviceError;
    pub use crate::hv::HvError;
    pub use crate::memory::MemoryError;
    pub use crate::quiesce::QuiesceError;
    pub use crate::vcpu::ControlError;
}

pub use boot::KernelFormat;

/// What a caught panic said, for an error report (threads that must not take the VM down
/// with them catch their panics: vCPUs, swaps).
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}
