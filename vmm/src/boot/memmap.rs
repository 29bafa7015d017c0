//! The guest's e820 memory map, shared by the Linux zero page and the PVH start info.

use super::layout::{BIOS_AREA_START, EBDA_START, KERNEL_MIN_ADDR};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryKind {
    Ram = 1,
    Reserved = 2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryMapEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: MemoryKind,
}

/// The memory map for the given RAM ranges: RAM except the EBDA and BIOS area, which are
/// reserved (the MP and ACPI tables live there).
pub fn memory_map(ram: &[(u64, u64)]) -> Vec<MemoryMapEntry> {
    let mut map = Vec::new();
    for &(addr, size) in ram {
        let end = addr + size;
        if addr < KERNEL_MIN_ADDR && end > EBDA_START {
            if addr < EBDA_START {
                map.push(MemoryMapEntry { addr, size: EBDA_START - addr, kind: MemoryKind::Ram });
            }
            map.push(MemoryMapEntry { addr: EBDA_START, size: 0xa_0000 - EBDA_START, kind: MemoryKind::Reserved });
            map.push(MemoryMapEntry {
                addr: BIOS_AREA_START,
                size: KERNEL_MIN_ADDR - BIOS_AREA_START,
                kind: MemoryKind::Reserved,
            });
            if end > KERNEL_MIN_ADDR {
                map.push(MemoryMapEntry { addr: KERNEL_MIN_ADDR, size: end - KERNEL_MIN_ADDR, kind: MemoryKind::Ram });
            }
        } else {
            map.push(MemoryMapEntry { addr, size, kind: MemoryKind::Ram });
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn low_ram_has_the_bios_holes_reserved() {
        let map = memory_map(&[(0, 64 << 20)]);
        assert_eq!(
            map,
            vec![
                MemoryMapEntry { addr: 0, size: 0x9_fc00, kind: MemoryKind::Ram },
                MemoryMapEntry { addr: 0x9_fc00, size: 0x400, kind: MemoryKind::Reserved },
                MemoryMapEntry { addr: 0xe_0000, size: 0x2_0000, kind: MemoryKind::Reserved },
                MemoryMapEntry { addr: 0x10_0000, size: (64 << 20) - 0x10_0000, kind: MemoryKind::Ram },
            ]
        );
    }

    #[test]
    fn high_ram_is_plain_ram() {
        let map = memory_map(&[(0, 0xc000_0000), (1 << 32, 1 << 30)]);
        assert_eq!(map.len(), 5);
        assert_eq!(map[4], MemoryMapEntry { addr: 1 << 32, size: 1 << 30, kind: MemoryKind::Ram });
    }
}
