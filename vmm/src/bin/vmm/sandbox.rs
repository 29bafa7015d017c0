//! `vmm run`'s sandbox flags: seccomp (on unless `--no-seccomp`) and `--jail`.
//!
//! With `--jail DIR`, the VMM moves into a PID namespace of its own first thing, works in DIR
//! from then on, and enters the rest of the jail once the VM's host resources are open. DIR is
//! its working directory both before and after `pivot_root` makes it `/`, so a relative path
//! means the same file throughout; a file the VMM creates or reopens once jailed (its API
//! socket, its state file, its vsock socket) is given relative to DIR, or as an absolute path
//! inside DIR, which is rewritten relative to it.

use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
use clap::Args;
use vmm_sandbox::{Jail, Process, Sandbox};

use crate::cli::Failure;

#[derive(Args, Clone, Debug, Default)]
pub struct SandboxArgs {
    /// Run without the seccomp filters. They are on by default: every thread may make only
    /// the system calls its role needs (vCPU, device loop, control plane), and any other call
    /// stops the VMM with a line naming the thread and the call (exit status 159).
    #[arg(long)]
    pub no_seccomp: bool,
    /// Jail the VMM in DIR: its own PID, mount, IPC and UTS namespaces, DIR as its root (by
    /// pivot_root), rlimits, and --uid/--gid as its user, entered once /dev/kvm, taps and
    /// images are open. Needs root. Relative paths are relative to DIR; the API socket, state
    /// file and vsock socket must lie inside it.
    #[arg(long, value_name = "DIR", requires_all = ["uid", "gid"], conflicts_with = "restore")]
    pub jail: Option<PathBuf>,
    /// The unprivileged user the jailed VMM runs as.
    #[arg(long, value_name = "N", requires = "jail")]
    pub uid: Option<u32>,
    /// The group the jailed VMM runs as.
    #[arg(long, value_name = "N", requires = "jail")]
    pub gid: Option<u32>,
}

impl SandboxArgs {
    /// Checks the jail and moves the process into it as far as can be done before the VM is
    /// built: its PID namespace and working directory. Call it before any thread starts.
    pub fn prepare(&self) -> Result<Option<Jail>, Failure> {
        let (Some(dir), Some(uid), Some(gid)) = (&self.jail, self.uid, self.gid) else {
            return Ok(None);
        };
        let mut jail = Jail::new(dir, uid, gid).map_err(|e| Failure::bad_input(anyhow!(e)))?;
        vmm_sandbox::jail::enter_pid_namespace().map_err(|e| Failure::runtime(anyhow!(e)))?;
        // Still the only thread: the namespaces take the whole process.
        jail.isolate().map_err(|e| Failure::runtime(anyhow!(e)))?;
        std::env::set_current_dir(jail.root())
            .with_context(|| format!("cannot work in the jail directory {}", jail.root().display()))
            .map_err(Failure::runtime)?;
        Ok(Some(jail))
    }

    /// What the VM builder closes around the process.
    pub fn sandbox(&self, jail: Option<Jail>) -> Sandbox {
        Sandbox { jail, seccomp: (!self.no_seccomp).then_some(Process::Run) }
    }
}

/// `path` as the jailed VMM must name it: relative to the jail directory.
pub fn jailed_path(jail: Option<&Jail>, path: &Path) -> Result<PathBuf, Failure> {
    match jail {
        Some(jail) if path.is_absolute() => jail.relative(path).map_err(|e| Failure::bad_input(anyhow!(e))),
        _ => Ok(path.to_path_buf()),
    }
}
