//! Shared-memory windows (`shm.window=ADDRESS:IRQ` on the command line, registers in
//! `swarm_ring::window`) and the interrupt plumbing a VM needs to sleep on its doorbell: the
//! LAPIC enabled, the legacy PIC masked, each window's IOAPIC pin routed to a vector, and a
//! one-shot LAPIC timer that bounds every sleep.
use swarm_ring::Region;
use swarm_ring::window::{MAGIC, WindowState, reg};

use crate::arch;
use crate::cmdline::Args;

const CMDLINE_KEY: &str = "shm.window";
const MAX_WINDOWS: usize = 4;

const LAPIC: u64 = 0xfee0_0000;
const LAPIC_TPR: u64 = LAPIC + 0x80;
const LAPIC_SVR: u64 = LAPIC + 0xf0;
const LAPIC_LVT_TIMER: u64 = LAPIC + 0x320;
const LAPIC_LVT_LINT0: u64 = LAPIC + 0x350;
const LAPIC_LVT_LINT1: u64 = LAPIC + 0x360;
const LAPIC_TIMER_INITIAL: u64 = LAPIC + 0x380;
const LAPIC_TIMER_DIVIDE: u64 = LAPIC + 0x3e0;
const IOAPIC: u64 = 0xfec0_0000;
/// Vectors 0x30-0x3f only acknowledge (see boot.S); the timer takes the last.
const VECTOR_BASE: u32 = 0x30;
const TIMER_VECTOR: u32 = 0x3f;
const SPURIOUS_VECTOR: u32 = 0x3e;
const MASKED: u32 = 1 << 16;

/// One window.
#[derive(Clone, Copy)]
pub struct Window {
    pub base: u64,
    pub irq: u32,
}

/// The windows the VMM announced, in order.
pub fn windows(args: &Args) -> ([Option<Window>; MAX_WINDOWS], usize) {
    let mut found = [None; MAX_WINDOWS];
    let mut count = 0;
    for value in args.all(CMDLINE_KEY) {
        let Some((base, irq)) = value.split_once(':') else { continue };
        let base = base.strip_prefix("0x").and_then(|h| u64::from_str_radix(h, 16).ok());
        let (Some(base), Ok(irq)) = (base, irq.parse::<u32>()) else { continue };
        if count < MAX_WINDOWS && irq < 24 {
            found[count] = Some(Window { base, irq });
            count += 1;
        }
    }
    (found, count)
}

impl Window {
    fn read(&self, offset: u64) -> u32 {
        // SAFETY: the window is a register page the VMM announced, identity mapped.
        unsafe { arch::mmio_read32(self.base + offset) }
    }

    fn write(&self, offset: u64, value: u32) {
        // SAFETY: as above.
        unsafe { arch::mmio_write32(self.base + offset, value) }
    }

    pub fn present(&self) -> bool {
        self.read(reg::MAGIC) == MAGIC
    }

    pub fn state(&self) -> Option<WindowState> {
        WindowState::from_u32(self.read(reg::STATE))
    }

    pub fn generation(&self) -> u32 {
        self.read(reg::GENERATION)
    }

    pub fn party(&self) -> u16 {
        self.read(reg::PARTY) as u16
    }

    /// Where the attached region is: guest-physical address and size, inside the identity map.
    pub fn range(&self) -> Result<(u64, u64), &'static str> {
        if self.state() != Some(WindowState::Attached) {
            return Err("no region attached");
        }
        let addr = u64::from(self.read(reg::ADDR_LO)) | u64::from(self.read(reg::ADDR_HI)) << 32;
        let size = u64::from(self.read(reg::SIZE_LO)) | u64::from(self.read(reg::SIZE_HI)) << 32;
        if addr == 0 || size == 0 || addr.checked_add(size).is_none_or(|end| end > 16 << 30) {
            return Err("the region is outside the identity map");
        }
        Ok((addr, size))
    }

    /// The region's rings, while one is attached.
    pub fn region(&self) -> Result<Region, &'static str> {
        let (addr, size) = self.range()?;
        // SAFETY: the VMM mapped `size` bytes of shared memory at `addr`, identity mapped and
        // page aligned; the ring code validates everything it reads there.
        unsafe { Region::open(addr as *mut u8, size as usize) }.map_err(|_| "the region holds no rings")
    }

    /// Rings party `party`'s doorbell.
    pub fn ring(&self, party: u16) {
        self.write(reg::DOORBELL, u32::from(party));
    }

    /// Tells the VMM this VM no longer touches the region.
    pub fn ack_detach(&self) {
        self.write(reg::DETACH_ACK, 1);
    }

    /// Routes the window's interrupt to this CPU.
    fn route(&self) {
        let entry = 0x10 + 2 * self.irq;
        // SAFETY: the IOAPIC's index and data registers, identity mapped.
        unsafe {
            arch::mmio_write32(IOAPIC, entry + 1);
            arch::mmio_write32(IOAPIC + 0x10, 0); // destination: APIC id 0
            arch::mmio_write32(IOAPIC, entry);
            arch::mmio_write32(IOAPIC + 0x10, VECTOR_BASE + (self.irq & 0xf)); // edge, high, unmasked
        }
    }
}

/// Turns on what a doorbell sleep needs; call once, on the BSP, before [`sleep_us`].
pub fn enable_interrupts(windows: &[Option<Window>]) {
    // The 8259s would deliver unconfigured vectors; every line here goes through the IOAPIC.
    arch::outb(0x21, 0xff);
    arch::outb(0xa1, 0xff);
    // SAFETY: the LAPIC's registers, identity mapped.
    unsafe {
        arch::mmio_write32(LAPIC_LVT_LINT0, MASKED);
        arch::mmio_write32(LAPIC_LVT_LINT1, MASKED);
        arch::mmio_write32(LAPIC_TPR, 0);
        // Enabled; spurious interrupts on a vector that has a gate (0xff has none).
        arch::mmio_write32(LAPIC_SVR, 0x100 | SPURIOUS_VECTOR);
        arch::mmio_write32(LAPIC_TIMER_DIVIDE, 0xb); // divide by 1
        arch::mmio_write32(LAPIC_LVT_TIMER, TIMER_VECTOR); // one-shot
    }
    for window in windows.iter().flatten() {
        window.route();
    }
}

/// Sleeps until a doorbell, a window change or `us` microseconds (the LAPIC timer; KVM's runs
/// at 1 GHz), whichever comes first.
pub fn sleep_us(us: u32) {
    // SAFETY: the LAPIC timer's initial count, identity mapped.
    unsafe { arch::mmio_write32(LAPIC_TIMER_INITIAL, us.saturating_mul(1000).max(1)) };
    arch::wait_for_interrupt();
    // SAFETY: as above; stops a timer a doorbell beat.
    unsafe { arch::mmio_write32(LAPIC_TIMER_INITIAL, 0) };
}
