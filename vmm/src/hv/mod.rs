//! The hypervisor layer: the only code that calls kvm-ioctls.
//!
//! [`Hypervisor`] is the opened `/dev/kvm`, [`KvmVm`] one VM (memory slots, in-kernel irqchip
//! and PIT, irqfds), [`KvmVcpu`] one vCPU (state setup, `KVM_RUN` decoded into [`Exit`]);
//! [`VcpuState`] and [`VmState`] are their whole state, for snapshots.
//! Everything above works with these types and plain data, never with raw ioctls.

mod cpuid;
mod kvm;
mod state;
mod vcpu;

pub use cpuid::{CpuidShape, shape_cpuid};
pub use kvm::{Hypervisor, KvmVm, MemSlot};
pub use state::{VcpuState, VmState};
pub use vcpu::{Exit, KvmVcpu, SystemEvent, VcpuKicker};

/// A failed KVM operation, naming the operation.
#[derive(Debug, thiserror::Error)]
pub enum HvError {
    #[error("cannot open /dev/kvm: {0} (is KVM available and accessible to this user?)")]
    Open(#[source] kvm_ioctls::Error),
    #[error("KVM API version {0} is not supported (expected 12)")]
    ApiVersion(i32),
    #[error("this KVM lacks a required capability: {0}")]
    MissingCapability(&'static str),
    #[error("{op} failed: {source}")]
    Ioctl {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("{op}: KVM accepted {done} of {wanted} MSRs")]
    PartialMsrs { op: &'static str, done: usize, wanted: usize },
    #[error("{op}: KVM refused MSR {index:#x} (was the state taken on a host with other CPU features?)")]
    MsrRefused { op: &'static str, index: u32 },
}

pub type Result<T> = std::result::Result<T, HvError>;

/// Attaches the operation name to a kvm-ioctls error.
trait IoctlContext<T> {
    fn op(self, op: &'static str) -> Result<T>;
}

impl<T> IoctlContext<T> for std::result::Result<T, kvm_ioctls::Error> {
    fn op(self, op: &'static str) -> Result<T> {
        self.map_err(|source| HvError::Ioctl { op, source })
    }
}
