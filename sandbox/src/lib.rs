//! The VMM's sandbox: what a guest that takes over a VMM thread, or a local user who reaches
//! its API, can still do to the host.
//!
//! - [`seccomp`]: an allow-list filter per thread role (vCPU, device loop, control plane),
//!   compiled with `seccompiler`; a forbidden call is reported by thread and name and stops
//!   the VMM.
//! - [`jail`]: namespaces, `pivot_root` into a directory, rlimits and an unprivileged user,
//!   entered once the VM's host resources are open.
//!
//! Nothing here knows about KVM or devices: the `vmm` crate says which role each of its
//! threads plays and when the sandbox closes ([`Sandbox::enter`]).

pub mod jail;
pub mod seccomp;
mod syscalls;

pub use jail::{Jail, JailError, Limits};
pub use seccomp::{Process, Role, SeccompError};

/// Everything the VMM closes around itself before its first guest-facing thread starts.
#[derive(Clone, Debug, Default)]
pub struct Sandbox {
    /// Jail the process (namespaces, new root, user); `None` leaves it where it is.
    pub jail: Option<Jail>,
    /// Filter every thread's system calls, with the lists of this kind of process.
    pub seccomp: Option<Process>,
}

/// Why the sandbox could not be entered.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    Jail(#[from] JailError),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
}

impl Sandbox {
    /// Jails the process (if asked), then puts every thread it has under the control-plane
    /// filter (if asked). Threads started later inherit the filter; guest-facing ones narrow
    /// it with [`seccomp::enter`].
    pub fn enter(&self) -> Result<(), SandboxError> {
        if let Some(jail) = &self.jail {
            jail.enter()?;
        }
        if let Some(process) = self.seccomp {
            seccomp::enable(process)?;
        }
        Ok(())
    }
}
