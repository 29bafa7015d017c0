//! The PVH boot protocol's `hvm_start_info`, module list and memory map.

use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use vm_memory::{Bytes, GuestAddress};

use super::layout::{PVH_MEMMAP_ADDR, PVH_MEMMAP_MAX_ENTRIES, PVH_MODLIST_ADDR, PVH_START_INFO_ADDR};
use super::memmap::MemoryMapEntry;
use crate::memory::GuestMem;

pub const START_INFO_MAGIC: u32 = 0x336e_c578;
/// Version 1 adds the memory map.
pub const START_INFO_VERSION: u32 = 1;

/// Why the PVH start info could not be written.
#[derive(Debug, thiserror::Error)]
pub enum PvhError {
    /// More RAM ranges than the PVH memory map area holds.
    #[error("the memory map has {0} entries; the PVH area holds at most {PVH_MEMMAP_MAX_ENTRIES}")]
    TooManyMemoryMapEntries(usize),
    /// Writing it into guest memory failed.
    #[error("cannot write PVH start info: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// Builds the start info; pure, so its fields can be checked byte by byte.
pub fn start_info(
    cmdline_addr: u64,
    initrd: Option<(u64, u64)>,
    rsdp_addr: Option<u64>,
    memmap_entries: usize,
) -> hvm_start_info {
    hvm_start_info {
        magic: START_INFO_MAGIC,
        version: START_INFO_VERSION,
        flags: 0,
        nr_modules: u32::from(initrd.is_some()),
        modlist_paddr: if initrd.is_some() { PVH_MODLIST_ADDR } else { 0 },
        cmdline_paddr: cmdline_addr,
        rsdp_paddr: rsdp_addr.unwrap_or(0),
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: memmap_entries as u32,
        reserved: 0,
    }
}

/// Writes start info, module list and memory map; returns the start info's address (for EBX).
pub fn write(
    mem: &GuestMem,
    cmdline_addr: u64,
    initrd: Option<(u64, u64)>,
    rsdp_addr: Option<u64>,
    memory_map: &[MemoryMapEntry],
) -> Result<u64, PvhError> {
    if memory_map.len() > PVH_MEMMAP_MAX_ENTRIES {
        return Err(PvhError::TooManyMemoryMapEntries(memory_map.len()));
    }
    let info = start_info(cmdline_addr, initrd, rsdp_addr, memory_map.len());
    mem.write_obj(info, GuestAddress(PVH_START_INFO_ADDR))?;
    if let Some((paddr, size)) = initrd {
        let module = hvm_modlist_entry { paddr, size, cmdline_paddr: 0, reserved: 0 };
        mem.write_obj(module, GuestAddress(PVH_MODLIST_ADDR))?;
    }
    for (i, entry) in memory_map.iter().enumerate() {
        let e = hvm_memmap_table_entry { addr: entry.addr, size: entry.size, type_: entry.kind as u32, reserved: 0 };
        mem.write_obj(e, GuestAddress(PVH_MEMMAP_ADDR + i as u64 * 24))?;
    }
    Ok(PVH_START_INFO_ADDR)
}

#[cfg(test)]
mod tests {
    use vm_memory::ByteValued;

    use super::*;
    use crate::boot::memmap::memory_map;

    #[test]
    fn start_info_bytes() {
        let info = start_info(0x2_0000, Some((0x300_0000, 0x1000)), None, 4);
        let b = info.as_slice();
        assert_eq!(b.len(), 56);
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        assert_eq!(u32_at(0), 0x336e_c578);
        assert_eq!(u32_at(4), 1);
        assert_eq!(u32_at(12), 1, "nr_modules");
        assert_eq!(u64_at(16), PVH_MODLIST_ADDR);
        assert_eq!(u64_at(24), 0x2_0000);
        assert_eq!(u64_at(32), 0, "no RSDP");
        assert_eq!(u64_at(40), PVH_MEMMAP_ADDR);
        assert_eq!(u32_at(48), 4);
    }

    #[test]
    fn writes_modules_and_memory_map() {
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let map = memory_map(&[(0, 64 << 20)]);
        let addr = write(&mem, 0x2_0000, Some((0x300_0000, 0x1000)), Some(0xe_0000), &map).unwrap();
        assert_eq!(addr, PVH_START_INFO_ADDR);
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(PVH_MODLIST_ADDR)).unwrap();
        assert_eq!((module.paddr, module.size), (0x300_0000, 0x1000));
        let last: hvm_memmap_table_entry = mem.read_obj(GuestAddress(PVH_MEMMAP_ADDR + 3 * 24)).unwrap();
        assert_eq!((last.addr, last.size, last.type_), (0x10_0000, (64 << 20) - 0x10_0000, 1));
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_START_INFO_ADDR)).unwrap();
        assert_eq!(info.rsdp_paddr, 0xe_0000);
    }
}
