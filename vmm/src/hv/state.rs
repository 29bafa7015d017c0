//! The architectural state KVM holds for a VM: per vCPU (registers, FPU/SSE/AVX through XSAVE,
//! debug registers, every MSR KVM lists as saveable, LAPIC, pending events, MP state, TSC
//! frequency) and per VM (PIC pair, IOAPIC, PIT, KVM clock). Typed serde structs, so the
//! snapshot format needs no code of its own for them (kvm-bindings' `serde` feature).
//!
//! Capture and restore follow the order KVM needs: MP state, general and special registers,
//! XSAVE and XCRs, debug registers, LAPIC (before MSRs: TSC_DEADLINE is relative to it), MSRs,
//! then events last (an injected exception refers to the registers).

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, Msrs, kvm_clock_data, kvm_debugregs,
    kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events,
    kvm_xcrs, kvm_xsave,
};
use serde::{Deserialize, Serialize};

use super::{HvError, IoctlContext, KvmVcpu, KvmVm, Result};

/// Everything KVM keeps for one vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// The vCPU's KVM id (its index, counted from 0).
    pub id: u32,
    /// Multiprocessing state: runnable, halted, or waiting for INIT/SIPI.
    pub mp_state: kvm_mp_state,
    /// General-purpose registers, RIP and RFLAGS.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER and the APIC base.
    pub sregs: kvm_sregs,
    /// x87, SSE and AVX state (the XSAVE legacy area is the FPU state, so no separate FPU).
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers DR0 to DR3, DR6 and DR7.
    pub debugregs: kvm_debugregs,
    /// The local APIC's register page.
    pub lapic: kvm_lapic_state,
    /// Every MSR in KVM's saveable list that reads back on this host, TSC included.
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending and injected exceptions, interrupts and NMIs, and interrupt shadow.
    pub events: kvm_vcpu_events,
    /// The guest's TSC frequency, if KVM reports one.
    pub tsc_khz: Option<u32>,
}

/// VM-wide in-kernel device state.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    /// The master 8259 PIC.
    pub pic_master: kvm_irqchip,
    /// The slave 8259 PIC.
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC's redirection table and registers.
    pub ioapic: kvm_irqchip,
    /// The 8254 PIT's channels.
    pub pit: kvm_pit_state2,
    /// The KVM clock; only its value is restored, its flags describe the host it was read on.
    pub clock: kvm_clock_data,
}

/// Largest batch per KVM_GET_MSRS/KVM_SET_MSRS call (`Msrs` is a FAM struct with this cap).
const MSR_BATCH: usize = 64;

impl KvmVcpu {
    /// Reads the vCPU's whole state. Call with the vCPU out of `KVM_RUN` and with no port or
    /// MMIO access left half done (see `vcpu::run_loop`, which parks only after completing one).
    pub fn capture_state(&self) -> Result<VcpuState> {
        let fd = &self.fd;
        Ok(VcpuState {
            id: self.id,
            mp_state: fd.get_mp_state().op("KVM_GET_MP_STATE")?,
            regs: fd.get_regs().op("KVM_GET_REGS")?,
            sregs: fd.get_sregs().op("KVM_GET_SREGS")?,
            xsave: fd.get_xsave().op("KVM_GET_XSAVE")?,
            xcrs: fd.get_xcrs().op("KVM_GET_XCRS")?,
            debugregs: fd.get_debug_regs().op("KVM_GET_DEBUGREGS")?,
            lapic: fd.get_lapic().op("KVM_GET_LAPIC")?,
            msrs: self.read_msrs()?,
            events: fd.get_vcpu_events().op("KVM_GET_VCPU_EVENTS")?,
            tsc_khz: self.tsc_khz(),
        })
    }

    /// Loads `state` into this (new, not yet run) vCPU, whose CPUID is already set.
    pub fn restore_state(&self, state: &VcpuState) -> Result<()> {
        let fd = &self.fd;
        if let Some(khz) = state.tsc_khz
            && self.tsc_khz() != Some(khz)
        {
            fd.set_tsc_khz(khz).op("KVM_SET_TSC_KHZ")?;
        }
        fd.set_mp_state(state.mp_state).op("KVM_SET_MP_STATE")?;
        fd.set_regs(&state.regs).op("KVM_SET_REGS")?;
        fd.set_sregs(&state.sregs).op("KVM_SET_SREGS")?;
        // SAFETY: `kvm_xsave` is the legacy 4 KiB buffer KVM_SET_XSAVE takes; it was filled by
        // KVM_GET_XSAVE on a vCPU with the same CPUID.
        unsafe { fd.set_xsave(&state.xsave) }.op("KVM_SET_XSAVE")?;
        fd.set_xcrs(&state.xcrs).op("KVM_SET_XCRS")?;
        fd.set_debug_regs(&state.debugregs).op("KVM_SET_DEBUGREGS")?;
        fd.set_lapic(&state.lapic).op("KVM_SET_LAPIC")?;
        for batch in state.msrs.chunks(MSR_BATCH) {
            let msrs = msr_batch(batch, "KVM_SET_MSRS")?;
            let done = fd.set_msrs(&msrs).op("KVM_SET_MSRS")?;
            if done != batch.len() {
                return Err(HvError::MsrRefused { op: "KVM_SET_MSRS", index: batch[done].index });
            }
        }
        fd.set_vcpu_events(&state.events).op("KVM_SET_VCPU_EVENTS")
    }

    /// Reads every saveable MSR. KVM_GET_MSRS stops at the first MSR it cannot read (KVM lists
    /// a few that depend on CPU features this host's guest lacks): that one is skipped.
    fn read_msrs(&self) -> Result<Vec<kvm_msr_entry>> {
        let mut out = Vec::with_capacity(self.saveable_msrs.len());
        let mut wanted: &[u32] = &self.saveable_msrs;
        while !wanted.is_empty() {
            let batch: Vec<kvm_msr_entry> =
                wanted.iter().take(MSR_BATCH).map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
            let mut msrs = msr_batch(&batch, "KVM_GET_MSRS")?;
            let done = self.fd.get_msrs(&mut msrs).op("KVM_GET_MSRS")?;
            out.extend_from_slice(&msrs.as_slice()[..done]);
            // Skip the unreadable one (if the batch stopped early) and go on after it.
            let consumed = if done < batch.len() { done + 1 } else { done };
            wanted = &wanted[consumed..];
        }
        Ok(out)
    }
}

fn msr_batch(entries: &[kvm_msr_entry], op: &'static str) -> Result<Msrs> {
    Msrs::from_entries(entries).map_err(|_| HvError::PartialMsrs { op, done: 0, wanted: entries.len() })
}

impl KvmVm {
    /// Reads the PICs, IOAPIC, PIT and KVM clock. Call with every vCPU paused.
    pub fn capture_state(&self) -> Result<VmState> {
        let chip = |chip_id| -> Result<kvm_irqchip> {
            let mut irqchip = kvm_irqchip { chip_id, ..Default::default() };
            self.fd.get_irqchip(&mut irqchip).op("KVM_GET_IRQCHIP")?;
            Ok(irqchip)
        };
        Ok(VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: self.fd.get_pit2().op("KVM_GET_PIT2")?,
            clock: self.fd.get_clock().op("KVM_GET_CLOCK")?,
        })
    }

    /// Loads `state` into this new VM, after its vCPUs were restored.
    pub fn restore_state(&self, state: &VmState) -> Result<()> {
        for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
            self.fd.set_irqchip(chip).op("KVM_SET_IRQCHIP")?;
        }
        self.fd.set_pit2(&state.pit).op("KVM_SET_PIT2")?;
        // Only the clock value moves; the flags describe the host it was read on.
        let clock = kvm_clock_data { clock: state.clock.clock, ..Default::default() };
        self.fd.set_clock(&clock).op("KVM_SET_CLOCK")
    }
}
