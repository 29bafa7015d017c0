//! Multiprocessor support: CPU discovery from the Intel MP table, and starting application
//! processors with INIT/SIPI through the local APIC (the same sequence Linux uses, so it works
//! on any VMM that models a real APIC).
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use microguest_protocol::{AP_TRAMPOLINE_ADDR, MAX_CPUS};

use crate::{arch, time};

const LAPIC_BASE: u64 = 0xfee0_0000;
const LAPIC_ID: u64 = LAPIC_BASE + 0x20;
const LAPIC_ICR_LOW: u64 = LAPIC_BASE + 0x300;
const LAPIC_ICR_HIGH: u64 = LAPIC_BASE + 0x310;
const ICR_DELIVERY_PENDING: u32 = 1 << 12;
/// INIT, level assert, destination shorthand "all excluding self".
const ICR_INIT_OTHERS: u32 = 0x000c_4500;
/// Start-up IPI to "all excluding self"; the low byte is the start page number.
const ICR_SIPI_OTHERS: u32 = 0x000c_4600;

/// The CPUs the firmware tables describe.
pub struct CpuList {
    pub apic_ids: [u8; MAX_CPUS],
    pub count: usize,
}

/// This CPU's local APIC id.
pub fn apic_id() -> u32 {
    // SAFETY: the local APIC page is mapped user-accessible by the boot page tables.
    unsafe { arch::mmio_read32(LAPIC_ID) >> 24 }
}

/// # Safety
/// `addr..addr+len` must be readable physical memory.
unsafe fn checksum_ok(addr: u64, len: u64) -> bool {
    let mut sum = 0u8;
    for i in 0..len {
        // SAFETY: guaranteed by the caller.
        sum = sum.wrapping_add(unsafe { ((addr + i) as *const u8).read_volatile() });
    }
    sum == 0
}

/// # Safety
/// The range must be readable physical memory.
unsafe fn find_signature(start: u64, end: u64, sig: &[u8; 4]) -> Option<u64> {
    (start..end).step_by(16).find(|&a| {
        // SAFETY: guaranteed by the caller.
        unsafe { core::ptr::read_unaligned(a as *const [u8; 4]) == *sig && checksum_ok(a, 16) }
    })
}

/// Reads the processor entries of the MP configuration table, if one exists.
pub fn discover_cpus() -> Option<CpuList> {
    // SAFETY: the scanned ranges are the legacy BIOS areas, always backed by guest RAM or ROM.
    unsafe {
        let ebda = u64::from(core::ptr::read_unaligned(0x40e as *const u16)) << 4;
        let floating = (ebda != 0)
            .then(|| find_signature(ebda, ebda + 1024, b"_MP_"))
            .flatten()
            .or_else(|| find_signature(0x9_fc00, 0xa_0000, b"_MP_"))
            .or_else(|| find_signature(0xf_0000, 0x10_0000, b"_MP_"))?;
        let table = u64::from(core::ptr::read_unaligned((floating + 4) as *const u32));
        if table == 0 || core::ptr::read_unaligned(table as *const [u8; 4]) != *b"PCMP" {
            return None;
        }
        let length = u64::from(core::ptr::read_unaligned((table + 4) as *const u16));
        if !checksum_ok(table, length) {
            return None;
        }
        // Walk entries by the table length, as Linux does: some producers leave the entry
        // count at zero.
        let mut list = CpuList { apic_ids: [0; MAX_CPUS], count: 0 };
        let mut entry = table + 44;
        while entry < table + length {
            let kind = *(entry as *const u8);
            if kind == 0 {
                let apic_id = *((entry + 1) as *const u8);
                let enabled = *((entry + 3) as *const u8) & 1 != 0;
                if enabled && list.count < MAX_CPUS {
                    list.apic_ids[list.count] = apic_id;
                    list.count += 1;
                }
                entry += 20;
            } else if kind <= 4 {
                entry += 8;
            } else {
                break;
            }
        }
        Some(list)
    }
}

/// What each application processor runs once it reaches ring 3.
static AP_TASK: AtomicU64 = AtomicU64::new(0);
static APS_ENTERED: AtomicUsize = AtomicUsize::new(0);

fn send_ipi(icr_low: u32) {
    // SAFETY: local APIC registers, mapped user-accessible.
    unsafe {
        arch::mmio_write32(LAPIC_ICR_HIGH, 0);
        arch::mmio_write32(LAPIC_ICR_LOW, icr_low);
        while arch::mmio_read32(LAPIC_ICR_LOW) & ICR_DELIVERY_PENDING != 0 {
            arch::pause();
        }
    }
}

/// Starts every other CPU running `task(cpu_index)` and waits up to `timeout_us` for `expected`
/// of them to arrive. Returns how many arrived.
pub fn start_aps(expected: usize, task: fn(usize), timeout_us: u64) -> usize {
    AP_TASK.store(task as usize as u64, Ordering::SeqCst);
    // SAFETY: the trampoline page lies in low RAM that nothing else uses after boot; the
    // source is the assembled trampoline in our image.
    unsafe {
        let start = &raw const arch::ap_trampoline_start;
        let len = (&raw const arch::ap_trampoline_end as usize) - (start as usize);
        core::ptr::copy_nonoverlapping(start, AP_TRAMPOLINE_ADDR as *mut u8, len);
    }
    send_ipi(ICR_INIT_OTHERS);
    let vector = (AP_TRAMPOLINE_ADDR >> 12) as u32;
    send_ipi(ICR_SIPI_OTHERS | vector);
    send_ipi(ICR_SIPI_OTHERS | vector);

    let step_us = 100;
    let mut waited = 0;
    while APS_ENTERED.load(Ordering::Acquire) < expected && waited < timeout_us {
        time::spin_us(step_us);
        waited += step_us;
    }
    APS_ENTERED.load(Ordering::Acquire)
}

/// Called on each application processor in ring 3.
pub fn ap_entered(cpu_index: usize) -> ! {
    APS_ENTERED.fetch_add(1, Ordering::AcqRel);
    let task = AP_TASK.load(Ordering::Acquire);
    if task != 0 {
        // SAFETY: AP_TASK only ever holds a `fn(usize)` stored by `start_aps`.
        let task: fn(usize) = unsafe { core::mem::transmute(task as usize) };
        task(cpu_index);
    }
    arch::halt_forever()
}
