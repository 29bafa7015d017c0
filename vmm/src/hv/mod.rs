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
    /// `/dev/kvm` could not be opened (KVM missing, or no permission).
    #[error("cannot open /dev/kvm: {0} (is KVM available and accessible to this user?)")]
    Open(#[source] kvm_ioctls::Error),
    /// KVM reports an API version (the one given) other than 12.
    #[error("KVM API version {0} is not supported (expected 12)")]
    ApiVersion(i32),
    /// KVM lacks a capability the VMM needs (named).
    #[error("this KVM lacks a required capability: {0}")]
    MissingCapability(&'static str),
    /// A KVM ioctl failed.
    #[error("{op} failed: {source}")]
    Ioctl {
        /// The ioctl, such as `KVM_SET_REGS`.
        op: &'static str,
        /// The error it returned.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM set only some of a batch of MSRs, or the batch could not be built (`done` is then 0).
    #[error("{op}: KVM accepted {done} of {wanted} MSRs")]
    PartialMsrs {
        /// The ioctl: `KVM_SET_MSRS` or `KVM_GET_MSRS`.
        op: &'static str,
        /// How many MSRs KVM took, in order.
        done: usize,
        /// How many were in the batch.
        wanted: usize,
    },
    /// KVM refused to set an MSR while restoring a vCPU's state.
    #[error("{op}: KVM refused MSR {index:#x} (was the state taken on a host with other CPU features?)")]
    MsrRefused {
        /// The ioctl: `KVM_SET_MSRS`.
        op: &'static str,
        /// The MSR's index.
        index: u32,
    },
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
