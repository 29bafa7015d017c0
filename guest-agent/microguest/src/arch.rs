//! Privileged-instruction wrappers usable from ring 3 (port I/O is allowed by the TSS I/O
//! bitmap; MMIO pages are user-accessible) and the two ways to stop: the debug-exit port and a
//! ring-0 halt.
use core::arch::asm;

use microguest_protocol::DEBUG_EXIT_PORT;

core::arch::global_asm!(include_str!("arch/boot.S"), options(att_syntax));

unsafe extern "C" {
    pub static ap_trampoline_start: u8;
    pub static ap_trampoline_end: u8;
    static __image_end: u8;
}

/// First physical address after the loaded image (page aligned).
pub fn image_end() -> u64 {
    &raw const __image_end as u64
}

#[inline]
pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O has no memory effects visible to Rust.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags)) }
}

#[inline]
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: port I/O has no memory effects visible to Rust.
    unsafe { asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags)) }
    value
}

#[inline]
pub fn outl(port: u16, value: u32) {
    // SAFETY: as above.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags)) }
}

/// Writes `bytes` to one port with a single `rep outsb` (one VM exit for the whole buffer where
/// KVM batches string I/O).
#[inline]
pub fn outsb(port: u16, bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    // SAFETY: reads `bytes.len()` bytes from a live slice.
    unsafe {
        asm!("rep outsb", in("dx") port, inout("rsi") bytes.as_ptr() => _,
             inout("rcx") bytes.len() => _, options(nostack, preserves_flags, readonly))
    }
}

#[inline]
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC is allowed in ring 3 (CR4.TSD is clear).
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Ring-0 services, requested by executing HLT in ring 3 with the number in RDI (see boot.S).
const SERVICE_HALT: u64 = 0;
const SERVICE_CPUID: u64 = 1;
const SERVICE_WAIT: u64 = 2;

/// CPUID as the VMM defines it. Native (ring-3) CPUID may show the host's values instead (it
/// does on the PVM host), so this asks ring 0, whose CPUID the hypervisor always intercepts.
pub fn cpuid(leaf: u32, subleaf: u32) -> (u32, u32, u32, u32) {
    let (eax, ebx, ecx, edx): (u32, u64, u32, u32);
    // SAFETY: the ring-0 service returns CPUID's results in EAX-EDX and touches nothing else.
    // RBX is reserved by LLVM, so it is swapped with a scratch register around the call.
    unsafe {
        asm!("xchg {tmp}, rbx", "hlt", "xchg {tmp}, rbx",
             tmp = inout(reg) 0u64 => ebx, in("rdi") SERVICE_CPUID,
             inout("eax") leaf => eax, inout("ecx") subleaf => ecx, out("edx") edx,
             options(nostack));
    }
    (eax, ebx as u32, ecx, edx)
}

#[inline]
pub fn pause() {
    core::hint::spin_loop();
}

/// Reads a 32-bit MMIO register.
///
/// # Safety
/// `addr` must be a device register (or RAM) inside the identity map.
#[inline]
pub unsafe fn mmio_read32(addr: u64) -> u32 {
    // SAFETY: guaranteed by the caller.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

/// Writes a 32-bit MMIO register.
///
/// # Safety
/// `addr` must be a device register (or RAM) inside the identity map.
#[inline]
pub unsafe fn mmio_write32(addr: u64, value: u32) {
    // SAFETY: guaranteed by the caller.
    unsafe { core::ptr::write_volatile(addr as *mut u32, value) }
}

/// Sleeps until an interrupt arrives (one pending since the last wait ends it at once). Costs
/// the host nothing while asleep: the vCPU thread blocks in KVM.
pub fn wait_for_interrupt() {
    // SAFETY: ring 0 sees service 2, enables interrupts for one HLT and returns after it.
    unsafe { asm!("hlt", in("rdi") SERVICE_WAIT, options(nomem, nostack)) };
}

/// Halts this CPU for good (ring-0 `cli; hlt`), so an idle CPU costs the host nothing.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: HLT in ring 3 raises #GP; ring 0 sees service 0 and halts the CPU.
        unsafe { asm!("hlt", in("rdi") SERVICE_HALT, options(nomem, nostack)) };
    }
}

/// Ends the VM with `status` through the debug-exit port; halts if no such device exists.
pub fn exit(status: u32) -> ! {
    outl(DEBUG_EXIT_PORT, status);
    halt_forever()
}
