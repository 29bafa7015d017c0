//! One KVM vCPU: architectural state setup and `KVM_RUN`, with exits decoded into [`Exit`].

use std::sync::atomic::{AtomicU8, Ordering};

use kvm_bindings::{
    CpuId, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN, Msrs, kvm_fpu, kvm_msr_entry,
    kvm_regs, kvm_run, kvm_sregs,
};
use kvm_ioctls::{VcpuExit, VcpuFd};

use super::{HvError, IoctlContext, Result};

/// Why `KVM_RUN` returned.
#[derive(Debug)]
pub enum Exit<'a> {
    /// Port read of `size`-byte units; `data` holds `count * size` bytes to fill.
    IoIn {
        port: u16,
        size: usize,
        data: &'a mut [u8],
    },
    /// Port write; a `rep outs` delivers several `size`-byte units at once.
    IoOut {
        port: u16,
        size: usize,
        data: &'a [u8],
    },
    MmioRead {
        addr: u64,
        data: &'a mut [u8],
    },
    MmioWrite {
        addr: u64,
        data: &'a [u8],
    },
    /// HLT reached user space (only without an in-kernel irqchip).
    Halted,
    /// A signal or `immediate_exit` kicked the vCPU out.
    Interrupted,
    /// Triple fault.
    Shutdown,
    /// KVM_EXIT_SYSTEM_EVENT.
    SystemEvent(SystemEvent),
    /// The hardware refused to enter the guest.
    FailEntry {
        reason: u64,
    },
    /// KVM could not emulate something (`KVM_INTERNAL_ERROR_*` suberror).
    InternalError {
        suberror: u32,
    },
    /// Anything else, by name.
    Unexpected(String),
}

/// Lets another thread make this vCPU's next (or current) `KVM_RUN` return at once.
///
/// Valid while the [`KvmVcpu`] it came from is alive (the vCPU thread keeps it alive until
/// joined, see `vcpu::VcpuThreads`).
#[derive(Clone, Copy)]
pub struct VcpuKicker {
    immediate_exit: *const AtomicU8,
}

// SAFETY: the pointer targets the vCPU's shared `kvm_run` page, which is designed to be written
// concurrently (by KVM and the VMM); we only store a byte atomically.
unsafe impl Send for VcpuKicker {}
// SAFETY: as above.
unsafe impl Sync for VcpuKicker {}

impl VcpuKicker {
    /// Sets `kvm_run.immediate_exit`; pair with a signal to interrupt a running `KVM_RUN`.
    pub fn set_immediate_exit(&self) {
        // SAFETY: see the type's documentation.
        unsafe { (*self.immediate_exit).store(1, Ordering::SeqCst) }
    }
}

pub struct KvmVcpu {
    pub(super) fd: VcpuFd,
    pub(super) id: u32,
    run: *mut kvm_run,
    run_size: usize,
    /// What [`capture_state`](Self::capture_state) reads as MSRs.
    pub(super) saveable_msrs: std::sync::Arc<[u32]>,
}

// SAFETY: `run` points into the mmap owned by `fd`, which moves with it.
unsafe impl Send for KvmVcpu {}

/// MSRs a freshly started x86 CPU should have, as firmware would leave them.
const BOOT_MSRS: &[(u32, u64)] = &[
    (0x174, 0),               // IA32_SYSENTER_CS
    (0x175, 0),               // IA32_SYSENTER_ESP
    (0x176, 0),               // IA32_SYSENTER_EIP
    (0xc000_0081, 0),         // STAR
    (0xc000_0082, 0),         // LSTAR
    (0xc000_0083, 0),         // CSTAR
    (0xc000_0084, 0),         // SYSCALL_MASK
    (0xc000_0102, 0),         // KERNEL_GS_BASE
    (0x10, 0),                // IA32_TSC
    (0x1a0, 1),               // IA32_MISC_ENABLE: fast strings
    (0x2ff, (1 << 11) | 0x6), // MTRR default type: enabled, write-back
];

const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

impl KvmVcpu {
    pub(super) fn new(mut fd: VcpuFd, id: u32, run_size: usize, saveable_msrs: std::sync::Arc<[u32]>) -> Self {
        let run = fd.get_kvm_run() as *mut kvm_run;
        Self { fd, id, run, run_size, saveable_msrs }
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    pub fn set_cpuid(&self, cpuid: &CpuId) -> Result<()> {
        self.fd.set_cpuid2(cpuid).op("KVM_SET_CPUID2")
    }

    /// The TSC frequency KVM gives this vCPU, if known.
    pub fn tsc_khz(&self) -> Option<u32> {
        self.fd.get_tsc_khz().ok().filter(|&khz| khz != 0)
    }

    pub fn set_boot_msrs(&self) -> Result<()> {
        let entries: Vec<kvm_msr_entry> =
            BOOT_MSRS.iter().map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() }).collect();
        let msrs = Msrs::from_entries(&entries).map_err(|_| HvError::PartialMsrs {
            op: "KVM_SET_MSRS",
            done: 0,
            wanted: entries.len(),
        })?;
        let done = self.fd.set_msrs(&msrs).op("KVM_SET_MSRS")?;
        if done != entries.len() {
            return Err(HvError::PartialMsrs { op: "KVM_SET_MSRS", done, wanted: entries.len() });
        }
        Ok(())
    }

    /// x87 and SSE control words as after FNINIT / reset.
    pub fn set_fpu_defaults(&self) -> Result<()> {
        let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
        self.fd.set_fpu(&fpu).op("KVM_SET_FPU")
    }

    /// Wires LINT0 to the PIC (ExtINT) and LINT1 to NMI, as a PC BIOS does.
    pub fn set_lapic_lint(&self) -> Result<()> {
        let mut lapic = self.fd.get_lapic().op("KVM_GET_LAPIC")?;
        for (reg, mode) in [(APIC_LVT_LINT0, APIC_MODE_EXTINT), (APIC_LVT_LINT1, APIC_MODE_NMI)] {
            let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
            let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
            for (i, b) in value.to_le_bytes().iter().enumerate() {
                lapic.regs[reg + i] = *b as _;
            }
        }
        self.fd.set_lapic(&lapic).op("KVM_SET_LAPIC")
    }

    pub fn regs(&self) -> Result<kvm_regs> {
        self.fd.get_regs().op("KVM_GET_REGS")
    }

    pub fn set_regs(&self, regs: &kvm_regs) -> Result<()> {
        self.fd.set_regs(regs).op("KVM_SET_REGS")
    }

    /// Reads the special registers, lets `edit` change them, writes them back.
    pub fn update_sregs(&self, edit: impl FnOnce(&mut kvm_sregs)) -> Result<()> {
        let mut sregs = self.fd.get_sregs().op("KVM_GET_SREGS")?;
        edit(&mut sregs);
        self.fd.set_sregs(&sregs).op("KVM_SET_SREGS")
    }

    pub fn kicker(&self) -> VcpuKicker {
        // SAFETY: `run` is the live kvm_run mapping; we only take a field's address.
        let field = unsafe { &raw mut (*self.run).immediate_exit };
        VcpuKicker { immediate_exit: field.cast::<AtomicU8>() }
    }

    /// Clears `immediate_exit` after a kick has been seen.
    pub fn clear_immediate_exit(&self) {
        self.kicker().clear();
    }

    /// Enters the guest until the next exit.
    pub fn run(&mut self) -> Result<Exit<'_>> {
        debug_assert!(self.run_size >= std::mem::size_of::<kvm_run>());
        let run = self.run;
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                return Ok(Exit::Interrupted);
            }
            Err(e) => {
                return Err(HvError::Ioctl { op: "KVM_RUN", source: e });
            }
        };
        // SAFETY (both reads): `run` is the kvm_run page of this vCPU and exit_reason tells
        // which union member KVM filled in.
        let io_size = || usize::from(unsafe { (*run).__bindgen_anon_1.io.size });
        Ok(match exit {
            VcpuExit::IoIn(port, data) => Exit::IoIn { port, size: io_size(), data },
            VcpuExit::IoOut(port, data) => Exit::IoOut { port, size: io_size(), data },
            VcpuExit::MmioRead(addr, data) => Exit::MmioRead { addr, data },
            VcpuExit::MmioWrite(addr, data) => Exit::MmioWrite { addr, data },
            VcpuExit::Hlt => Exit::Halted,
            VcpuExit::Intr => Exit::Interrupted,
            VcpuExit::Shutdown => Exit::Shutdown,
            VcpuExit::SystemEvent(kind, _) => Exit::SystemEvent(match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => SystemEvent::Shutdown,
                KVM_SYSTEM_EVENT_RESET => SystemEvent::Reset,
                KVM_SYSTEM_EVENT_CRASH => SystemEvent::Crash,
                other => SystemEvent::Other(other),
            }),
            VcpuExit::FailEntry(reason, _) => Exit::FailEntry { reason },
            VcpuExit::InternalError => {
                // SAFETY: as above.
                Exit::InternalError { suberror: unsafe { (*run).__bindgen_anon_1.internal.suberror } }
            }
            other => Exit::Unexpected(format!("{other:?}")),
        })
    }
}

impl VcpuKicker {
    fn clear(&self) {
        // SAFETY: see the type's documentation.
        unsafe { (*self.immediate_exit).store(0, Ordering::SeqCst) }
    }
}

/// A platform event the guest raised (PSCI-like power control, or a crash notification).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SystemEvent {
    Shutdown,
    Reset,
    Crash,
    Other(u32),
}
