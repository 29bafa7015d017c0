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

/// Frequency assumed for deadlines when the hypervisor does not tell us the TSC's: at 4 GHz a
/// deadline lasts at least as long as asked on any slower TSC.
const ASSUMED_TSC_KHZ: u64 = 4_000_000;

/// TSC ticks in `ms` milliseconds, for timeouts (an assumed 4 GHz when the frequency is
/// unknown).
pub fn ticks_for_ms(ms: u64) -> u64 {
    ms.saturating_mul(tsc_khz().unwrap_or(ASSUMED_TSC_KHZ))
}

/// A point in time a wait must not pass, measured with the TSC.
#[derive(Clone, Copy)]
pub struct Deadline {
    start: u64,
    ticks: u64,
}

impl Deadline {
    /// `ms` milliseconds from now (from the known TSC frequency, else an assumed 4 GHz).
    pub fn after_ms(ms: u64) -> Self {
        Deadline { start: arch::rdtsc(), ticks: ticks_for_ms(ms) }
    }

    pub fn expired(&self) -> bool {
        arch::rdtsc().wrapping_sub(self.start) >= self.ticks
    }
}
