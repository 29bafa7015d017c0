//! Why a VM ended, and the one place every thread reports it.

use std::fmt;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use devices::exit::{ExitSink, GuestRequest};

/// How a VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest wrote this status to the debug-exit port.
    Guest(u32),
    /// The guest reset the machine (i8042 or KVM reset event); treated as a clean shutdown.
    Reset,
    /// The guest powered off.
    PowerOff,
    /// The host stopped the VM.
    Stopped,
    /// The guest or the hypervisor failed.
    Crashed(Crash),
}

impl VmExit {
    /// The status a `vmm` process exits with: the guest's debug-exit status (low 8 bits; 255
    /// for a non-zero status whose low 8 bits are zero, never success), 0 for a clean
    /// shutdown, 1 for a crash.
    pub fn process_status(&self) -> i32 {
        match self {
            VmExit::Guest(status) if *status != 0 && status & 0xff == 0 => 255,
            VmExit::Guest(status) => (status & 0xff) as i32,
            VmExit::Reset | VmExit::PowerOff | VmExit::Stopped => 0,
            VmExit::Crashed(_) => 1,
        }
    }
}

impl fmt::Display for VmExit {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            VmExit::Guest(status) => write!(f, "guest exited with status {status}"),
            VmExit::Reset => write!(f, "guest reset the machine"),
            VmExit::PowerOff => write!(f, "guest powered off"),
            VmExit::Stopped => write!(f, "stopped by the host"),
            VmExit::Crashed(crash) => write!(f, "{crash}"),
        }
    }
}

/// A fatal condition on one vCPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Crash {
    /// The vCPU's id (0 for a [`CrashKind::Memory`] failure, which belongs to no vCPU).
    pub vcpu: u32,
    /// What went wrong.
    pub kind: CrashKind,
    /// Guest RIP when it happened, if it could be read.
    pub rip: Option<u64>,
}

/// What made a VM crash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CrashKind {
    /// KVM_EXIT_SHUTDOWN: the guest triple-faulted.
    TripleFault,
    /// KVM could not emulate an instruction (KVM_EXIT_INTERNAL_ERROR with this suberror).
    InternalError(u32),
    /// The CPU refused VM entry (hardware reason code).
    FailEntry(u64),
    /// The guest reported a crash (KVM_SYSTEM_EVENT_CRASH).
    GuestPanic,
    /// KVM_RUN itself failed.
    Hypervisor(String),
    /// An exit the VMM does not handle.
    UnexpectedExit(String),
    /// The VMM itself failed while handling an exit (a bug: the vCPU thread panicked).
    VmmPanic(String),
    /// Guest RAM could not be filled (a lazy restore could not read its snapshot).
    Memory(String),
}

impl fmt::Display for Crash {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        if let CrashKind::VmmPanic(what) = &self.kind {
            return write!(f, "internal error in the VMM on vCPU {} ({what}); this is a bug", self.vcpu);
        }
        if let CrashKind::Memory(what) = &self.kind {
            return write!(f, "guest RAM could not be filled: {what}");
        }
        write!(f, "guest crashed on vCPU {}: ", self.vcpu)?;
        match &self.kind {
            CrashKind::VmmPanic(_) | CrashKind::Memory(_) => {}
            CrashKind::TripleFault => write!(f, "triple fault (the guest hit an unhandled exception)")?,
            CrashKind::InternalError(1) => write!(f, "KVM could not emulate an instruction (internal error 1)")?,
            CrashKind::InternalError(code) => write!(f, "KVM internal error {code}")?,
            CrashKind::FailEntry(reason) => write!(f, "VM entry failed (hardware reason {reason:#x})")?,
            CrashKind::GuestPanic => write!(f, "the guest reported a crash")?,
            CrashKind::Hypervisor(e) => write!(f, "KVM_RUN failed: {e}")?,
            CrashKind::UnexpectedExit(e) => write!(f, "unexpected VM exit {e}")?,
        }
        if let Some(rip) = self.rip {
            write!(f, " at RIP {rip:#x}")?;
        }
        Ok(())
    }
}

/// Collects the first reason the VM should end; later reports are ignored.
#[derive(Default)]
pub struct ExitState {
    reason: Mutex<Option<VmExit>>,
    reported: Condvar,
}

impl ExitState {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `exit` unless a reason was already recorded.
    pub fn report(&self, exit: VmExit) {
        let mut reason = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if reason.is_none() {
            *reason = Some(exit);
            self.reported.notify_all();
        }
    }

    pub fn get(&self) -> Option<VmExit> {
        self.reason.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn is_set(&self) -> bool {
        self.get().is_some()
    }

    /// Blocks until a reason is recorded, or `timeout` passes.
    pub fn wait(&self, timeout: Option<Duration>) -> Option<VmExit> {
        let guard = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        let guard = match timeout {
            None => self.reported.wait_while(guard, |r| r.is_none()).unwrap_or_else(|p| p.into_inner()),
            Some(t) => self.reported.wait_timeout_while(guard, t, |r| r.is_none()).unwrap_or_else(|p| p.into_inner()).0,
        };
        guard.clone()
    }
}

impl ExitSink for ExitState {
    fn request(&self, request: GuestRequest) {
        self.report(match request {
            GuestRequest::Exit(status) => VmExit::Guest(status),
            GuestRequest::Reset => VmExit::Reset,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_report_wins() {
        let state = ExitState::new();
        assert_eq!(state.wait(Some(Duration::from_millis(1))), None);
        state.request(GuestRequest::Exit(3));
        state.report(VmExit::Stopped);
        assert_eq!(state.wait(None), Some(VmExit::Guest(3)));
    }

    #[test]
    fn process_status_mapping() {
        assert_eq!(VmExit::Guest(0x105).process_status(), 5);
        assert_eq!(VmExit::Guest(0x100).process_status(), 255, "a failure never reads as success");
        assert_eq!(VmExit::Reset.process_status(), 0);
        let crash = Crash { vcpu: 1, kind: CrashKind::TripleFault, rip: Some(0x1000) };
        assert_eq!(VmExit::Crashed(crash.clone()).process_status(), 1);
        assert_eq!(
            crash.to_string(),
            "guest crashed on vCPU 1: triple fault (the guest hit an unhandled exception) at RIP 0x1000"
        );
    }
}
