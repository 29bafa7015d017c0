//! vCPU threads and their control: start, pause at once, resume, stop.
//!
//! Pausing is a rendezvous: the controller sets the target to `Pause`, sets each vCPU's
//! `immediate_exit` and signals its thread. A vCPU inside `KVM_RUN` is thrown out by the
//! signal; one about to enter finds `immediate_exit` set and returns at once (KVM still
//! completes a pending port or MMIO access first, so device state stays consistent). A vCPU
//! that has just served an exit in user space enters `KVM_RUN` once more, with
//! `immediate_exit` set, before it parks: the result of a port or MMIO read reaches the guest's
//! registers only then, and a snapshot taken meanwhile would lose it. Every vCPU then parks
//! until the target changes, and `pause` returns when all are parked. Parked vCPU threads run
//! the work posted to them ([`Vcpus::capture_state`]).

mod control;
mod exits;

use std::sync::Arc;
use std::sync::OnceLock;
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

pub use control::{ControlError, Target};
pub use exits::ExitContext;

use crate::hv::{HvError, KvmVcpu, VcpuKicker, VcpuState};
use control::RunControl;
use exits::Next;

/// Real-time signal used to kick vCPU threads out of `KVM_RUN`.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: delivering the signal is what interrupts KVM_RUN.
}

/// Installs the kick handler once per process; a failure is remembered, so no VM ever starts
/// without it (the first kick would kill the process).
fn install_kick_handler() -> std::io::Result<()> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    let result = INSTALLED.get_or_init(|| register_signal_handler(kick_signal(), on_kick).map_err(|e| e.errno()));
    result.map_err(std::io::Error::from_raw_os_error)
}

/// How long `pause`/`resume` wait for every vCPU before reporting a stuck one.
const RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(10);

struct VcpuThread {
    /// Returns the vCPU so its `kvm_run` page outlives any kick sent before the join.
    handle: Option<JoinHandle<KvmVcpu>>,
    kicker: VcpuKicker,
}

/// The running vCPU threads of one VM.
pub struct Vcpus {
    threads: Vec<VcpuThread>,
    control: Arc<RunControl<KvmVcpu>>,
}

/// Why the vCPUs' state could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("vCPU {vcpu}: {source}")]
    Hv {
        vcpu: u32,
        #[source]
        source: HvError,
    },
}

impl Vcpus {
    /// Starts one thread per vCPU, each running the guest until told otherwise.
    pub fn start(vcpus: Vec<KvmVcpu>, ctx: Arc<ExitContext>) -> std::io::Result<Self> {
        install_kick_handler()?;
        let control = Arc::new(RunControl::new(vcpus.len()));
        let mut threads = Vec::with_capacity(vcpus.len());
        for (index, vcpu) in vcpus.into_iter().enumerate() {
            let kicker = vcpu.kicker();
            let (ctx, control_for_thread) = (ctx.clone(), control.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu{}", vcpu.id()))
                .spawn(move || run_loop(index, vcpu, &ctx, &control_for_thread));
            match spawned {
                Ok(handle) => threads.push(VcpuThread { handle: Some(handle), kicker }),
                Err(e) => {
                    // Do not leave the threads already started running.
                    let mut partial = Vcpus { threads, control };
                    partial.stop();
                    return Err(e);
                }
            }
        }
        Ok(Self { threads, control })
    }

    pub fn target(&self) -> Target {
        self.control.target()
    }

    fn kick_all(&self) {
        // A joined thread has dropped its vCPU, and with it the page the kicker points into.
        for t in self.threads.iter().filter(|t| t.handle.is_some()) {
            t.kicker.set_immediate_exit();
            if let Some(handle) = &t.handle {
                // ESRCH only means the thread already left its loop.
                let _ = handle.kill(kick_signal());
            }
        }
    }

    /// Stops every vCPU at its next instruction boundary; returns once all are parked.
    pub fn pause(&self) -> Result<(), ControlError> {
        self.control.set_target(Target::Pause)?;
        self.kick_all();
        self.control.wait_all_parked(RENDEZVOUS_TIMEOUT)
    }

    /// Lets every vCPU run again; returns once none is parked.
    pub fn resume(&self) -> Result<(), ControlError> {
        self.control.set_target(Target::Run)?;
        self.control.wait_none_parked(RENDEZVOUS_TIMEOUT)
    }

    /// Reads every vCPU's state, in vCPU order, on the vCPU threads. Only while paused.
    pub fn capture_state(&self) -> Result<Vec<VcpuState>, CaptureError> {
        let (tx, rx) = std::sync::mpsc::channel();
        for index in 0..self.threads.len() {
            let tx = tx.clone();
            let job = Box::new(move |vcpu: &mut KvmVcpu| {
                let _ = tx.send((index, vcpu.id(), vcpu.capture_state()));
            });
            self.control.post(index, job)?;
        }
        drop(tx);
        let mut states: Vec<Option<VcpuState>> = (0..self.threads.len()).map(|_| None).collect();
        for _ in 0..self.threads.len() {
            let (index, vcpu, state) = rx
                .recv_timeout(RENDEZVOUS_TIMEOUT)
                .map_err(|_| ControlError::NoAnswer(states.iter().position(Option::is_none).unwrap_or(0) as u32))?;
            states[index] = Some(state.map_err(|source| CaptureError::Hv { vcpu, source })?);
        }
        Ok(states.into_iter().flatten().collect())
    }

    /// Ends every vCPU thread and waits for them.
    pub fn stop(&mut self) {
        let _ = self.control.set_target(Target::Stop);
        self.kick_all();
        for t in &mut self.threads {
            if let Some(handle) = t.handle.take()
                && handle.join().is_err()
            {
                log::error!("a vCPU thread panicked");
            }
        }
    }
}

impl Drop for Vcpus {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run_loop(index: usize, mut vcpu: KvmVcpu, ctx: &ExitContext, control: &RunControl<KvmVcpu>) -> KvmVcpu {
    // The creating thread may block signals; the kick must get through.
    let _ = vmm_sys_util::signal::unblock_signal(kick_signal());
    // The thread a guest drives most directly: narrowed to what KVM_RUN and its exits need.
    if let Err(e) = vmm_sandbox::seccomp::enter(vmm_sandbox::Role::Vcpu) {
        ctx.vmm_panicked(&vcpu, &format!("vCPU thread cannot enter its sandbox: {e}"));
        return vcpu;
    }
    // Whether the last KVM_RUN ended in an exit served here, whose result KVM has yet to apply.
    let mut exit_served = false;
    loop {
        match control.target() {
            Target::Run => {}
            // Completes the served access first (see the module docs): with immediate_exit
            // set, KVM_RUN applies it and returns without running the guest.
            Target::Pause if exit_served => vcpu.kicker().set_immediate_exit(),
            Target::Pause => {
                if control.park(index, &mut vcpu) == Target::Stop {
                    break;
                }
                continue;
            }
            Target::Stop => break,
        }
        // A panic while handling an exit (a VMM bug, in a device the guest reached) ends the
        // VM with an error; unwinding past here would leave `Vm::wait` waiting for ever.
        let next = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ctx.run_once(&mut vcpu)));
        exit_served = matches!(next, Ok(Next::Continue));
        match next {
            Ok(Next::Continue) => {}
            // Clear the kick before looking at the target again (see the module docs).
            Ok(Next::Kicked) => vcpu.clear_immediate_exit(),
            Ok(Next::Stop) => break,
            Err(panic) => {
                ctx.vmm_panicked(&vcpu, &*panic);
                break;
            }
        }
    }
    control.exited();
    vcpu
}
