//! A KVM virtual machine monitor built on the rust-vmm crates, designed around changing a
//! running VM without stopping it.
//!
//! Embedders start a VM with [`VmBuilder`] and drive it through the returned [`Vm`] handle:
//!
//! ```no_run
//! use vmm::{VmBuilder, VmExit};
//!
//! let vm = VmBuilder::new("/path/to/microguest").cmdline("prog=smp").vcpus(4).start()?;
//! vm.pause()?;   // every vCPU stopped at an instruction boundary
//! vm.resume()?;
//! assert_eq!(vm.wait(), VmExit::Guest(0));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Layout: [`hv`] owns every KVM object; [`memory`] the guest RAM regions and their
//! backings; [`boot`] the kernel loaders and boot structures; [`vcpu`] the vCPU threads and
//! their pause/resume rendezvous; [`vm`] the running-VM handle; [`builder`] composes them from
//! a [`VmConfig`]. Device models live in the `devices` crate.

mod acpi;
pub mod api;
mod boot;
mod builder;
pub mod config;
mod device_manager;
mod exit;
mod hv;
mod memory;
mod quiesce;
pub mod snapshot;
pub mod swap;
mod vcpu;
mod vm;

pub use boot::BootProtocol;
pub use builder::{BuildError, VmBuilder};
pub use config::{SerialConfig, VmConfig};
pub use devices::legacy::SerialOutput;
pub use memory::{HUGE_PAGE, RamBacking, free_huge_pages};
pub use vm::{SerialInput, Vm, VmError, VmExit, VmInfo, VmState};

/// What a caught panic said, for an error report (threads that must not take the VM down
/// with them catch their panics: vCPUs, swaps).
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}
