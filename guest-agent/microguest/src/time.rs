//! Time from the TSC. The frequency comes from the hypervisor timing leaf (0x40000010), which
//! our VMM fills in; without it (e.g. QEMU's default CPU model) durations are not reported.
use core::sync::atomic::{AtomicU64, Ordering};

use microguest_protocol::CPUID_TIMING_LEAF;

use crate::arch;

/// 0 = not asked yet, 1 = unknown, otherwise the frequency in kHz.
static TSC_KHZ: AtomicU64 = AtomicU64::new(0);

/// TSC frequency in kHz, if the hypervisor tells us (asked once: each CPUID is a trip to ring 0).
pub fn tsc_khz() -> Option<u64> {
    let mut khz = TSC_KHZ.load(Ordering::Relaxed);
    if khz == 0 {
        let (max_hv_leaf, ..) = arch::cpuid(0x4000_0000, 0);
        let (leaf_khz, ..) =
            if max_hv_leaf >= CPUID_TIMING_LEAF { arch::cpuid(CPUID_TIMING_LEAF, 0) } else { (0, 0, 0, 0) };
        khz = if leaf_khz == 0 { 1 } else { u64::from(leaf_khz) };
        TSC_KHZ.store(khz, Ordering::Relaxed);
    }
    (khz > 1).then_some(khz)
}

/// Microseconds between two TSC readings, if the frequency is known.
pub fn elapsed_us(start: u64, end: u64) -> Option<u64> {
    tsc_khz().map(|khz| end.wrapping_sub(start) * 1000 / khz)
}

/// Spins until `us` microseconds have passed (or about that many pause instructions without a
/// known TSC frequency).
pub fn spin_us(us: u64) {
    match tsc_khz() {
        Some(khz) => {
            let start = arch::rdtsc();
            let ticks = us * khz / 1000;
            while arch::rdtsc().wrapping_sub(start) < ticks {
                arch::pause();
            }
        }
        None => {
            for _ in 0..us * 30 {
                arch::pause();
            }
        }
    }
}
