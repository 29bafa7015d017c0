//! The x86_64 guest-physical address map.
//!
//! ```text
//! 0            .. low RAM end    RAM (legacy BIOS areas inside it are reserved in e820)
//! 3 GiB        .. 4 GiB          MMIO gap: virtio-mmio windows, KVM's TSS pages, IOAPIC, LAPIC
//! 4 GiB        .. 4 GiB + rest   RAM above the gap, when the guest has more than 3 GiB
//! 8 GiB or the GiB after RAM      shared-memory regions, 1 GiB apart (see `shm_region_base`)
//! ```

/// Start of the MMIO gap below 4 GiB; RAM beyond this address continues at 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the MMIO gap.
pub const MMIO_GAP_END: u64 = 1 << 32;
/// Where virtio-mmio device windows are allocated, inside the gap.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Where shared-memory windows (a 4 KiB register page each) are placed, inside the gap.
pub const SHM_WINDOW_BASE: u64 = 0xe000_0000;
/// The most bytes a shared-memory region takes in the guest's address space.
pub const SHM_REGION_SPAN: u64 = 1 << 30;
/// The IOAPIC's MMIO page.
pub const IOAPIC_BASE: u64 = 0xfec0_0000;
/// The local APICs' MMIO page.
pub const LAPIC_BASE: u64 = 0xfee0_0000;

/// Guest RAM ranges `(guest address, length)` for `size` bytes of RAM.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO_GAP_START {
        vec![(0, size)]
    } else {
        vec![(0, MMIO_GAP_START), (MMIO_GAP_END, size - MMIO_GAP_START)]
    }
}

/// Where shared-memory region `index` is mapped for a guest with `ram` bytes of RAM: from
/// 8 GiB (inside the 16 GiB the microguest maps), or from the first GiB boundary above RAM.
pub fn shm_region_base(ram: u64, index: u32) -> u64 {
    let ram_end = ram_ranges(ram).last().map_or(0, |&(start, len)| start + len);
    let first = ram_end.next_multiple_of(SHM_REGION_SPAN).max(8 << 30);
    first + u64::from(index) * SHM_REGION_SPAN
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_splits_around_the_mmio_gap() {
        assert_eq!(ram_ranges(128 << 20), vec![(0, 128 << 20)]);
        assert_eq!(ram_ranges(MMIO_GAP_START), vec![(0, MMIO_GAP_START)]);
        assert_eq!(ram_ranges(4 << 30), vec![(0, MMIO_GAP_START), (1 << 32, 1 << 30)]);
    }

    #[test]
    fn shared_regions_sit_above_ram() {
        assert_eq!(shm_region_base(128 << 20, 0), 8 << 30);
        assert_eq!(shm_region_base(128 << 20, 2), 10 << 30);
        // 16 GiB of RAM ends at 17 GiB (1 GiB of it moved above the gap).
        assert_eq!(shm_region_base(16 << 30, 0), 17 << 30);
    }
}
