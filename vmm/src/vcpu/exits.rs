//! What a vCPU thread does with each exit: device accesses go to the buses, anything fatal
//! becomes a [`VmExit`] for the controller.

use std::sync::Arc;

use devices::bus::Bus;
use devices::ratelimit::LogOnce;

use crate::exit::{Crash, CrashKind, ExitState, VmExit};
use crate::hv::{Exit, KvmVcpu, SystemEvent};

/// What the run loop does after an exit.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Re-enter the guest.
    Continue,
    /// The vCPU was kicked: clear the kick and look at the run target.
    Kicked,
    /// This vCPU must not run again.
    Stop,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Access {
    PioRead,
    PioWrite,
    MmioRead,
    MmioWrite,
}

/// Everything a vCPU thread needs besides its vCPU.
pub struct ExitContext {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub exit: Arc<ExitState>,
    unhandled: LogOnce<(Access, u64)>,
}

impl ExitContext {
    pub fn new(pio: Arc<Bus>, mmio: Arc<Bus>, exit: Arc<ExitState>) -> Self {
        Self { pio, mmio, exit, unhandled: LogOnce::new(256) }
    }

    fn unhandled(&self, vcpu: u32, access: Access, addr: u64, len: usize) {
        if self.unhandled.first((access, addr)) {
            log::warn!("vCPU {vcpu}: unhandled {access:?} of {len} bytes at {addr:#x} (reported once per address)");
        }
    }

    /// Runs `vcpu` once and handles the exit.
    pub fn run_once(&self, vcpu: &mut KvmVcpu) -> Next {
        let id = vcpu.id();
        let exit = match vcpu.run() {
            Ok(exit) => exit,
            Err(e) => return self.crash(vcpu, CrashKind::Hypervisor(e.to_string())),
        };
        match exit {
            Exit::IoOut { port, size, data } => {
                // `rep outs` delivers several units in one exit.
                let handled = if data.len() == size {
                    self.pio.write(u64::from(port), data)
                } else {
                    self.pio.write_units(u64::from(port), size, data)
                };
                if !handled {
                    self.unhandled(id, Access::PioWrite, u64::from(port), size);
                }
            }
            Exit::IoIn { port, size, data } => {
                for unit in data.chunks_mut(size.max(1)) {
                    if !self.pio.read(u64::from(port), unit) {
                        unit.fill(0xff);
                        self.unhandled(id, Access::PioRead, u64::from(port), unit.len());
                    }
                }
            }
            Exit::MmioWrite { addr, data } => {
                if !self.mmio.write(addr, data) {
                    self.unhandled(id, Access::MmioWrite, addr, data.len());
                }
            }
            Exit::MmioRead { addr, data } => {
                if !self.mmio.read(addr, data) {
                    data.fill(0xff);
                    self.unhandled(id, Access::MmioRead, addr, data.len());
                }
            }
            Exit::Interrupted => return Next::Kicked,
            Exit::Halted => {}
            Exit::Shutdown => return self.crash(vcpu, CrashKind::TripleFault),
            Exit::FailEntry { reason } => return self.crash(vcpu, CrashKind::FailEntry(reason)),
            Exit::InternalError { suberror } => {
                return self.crash(vcpu, CrashKind::InternalError(suberror));
            }
            Exit::SystemEvent(SystemEvent::Shutdown) => {
                self.exit.report(VmExit::PowerOff);
                return Next::Stop;
            }
            Exit::SystemEvent(SystemEvent::Reset) => {
                self.exit.report(VmExit::Reset);
                return Next::Stop;
            }
            Exit::SystemEvent(SystemEvent::Crash) => {
                return self.crash(vcpu, CrashKind::GuestPanic);
            }
            Exit::SystemEvent(SystemEvent::Other(kind)) => {
                return self.crash(vcpu, CrashKind::UnexpectedExit(format!("system event {kind}")));
            }
            Exit::Unexpected(what) => return self.crash(vcpu, CrashKind::UnexpectedExit(what)),
        }
        // A device may have asked the VM to end (debug-exit, reset): stop running the guest.
        if self.exit.is_set() { Next::Stop } else { Next::Continue }
    }

    /// Ends the VM because handling an exit panicked (a VMM bug): the VM stops with a clear
    /// error instead of waiting for ever on a vCPU thread that is gone.
    pub fn vmm_panicked(&self, vcpu: &KvmVcpu, panic: &(dyn std::any::Any + Send)) {
        self.crash(vcpu, CrashKind::VmmPanic(crate::panic_message(panic)));
    }

    fn crash(&self, vcpu: &KvmVcpu, kind: CrashKind) -> Next {
        let rip = vcpu.regs().ok().map(|r| r.rip);
        let crash = Crash { vcpu: vcpu.id(), kind, rip };
        log::debug!("{crash}");
        self.exit.report(VmExit::Crashed(crash));
        Next::Stop
    }
}
