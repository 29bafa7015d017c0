//! Where the VMM puts boot structures in low guest memory (below 1 MiB, out of the kernel's way).

/// Boot GDT (4 entries).
pub const GDT_ADDR: u64 = 0x500;
/// Empty boot IDT: interrupts stay off until the kernel loads its own.
pub const IDT_ADDR: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_START_INFO_ADDR: u64 = 0x6000;
/// PVH module list (the initrd).
pub const PVH_MODLIST_ADDR: u64 = 0x6040;
/// PVH memory map.
pub const PVH_MEMMAP_ADDR: u64 = 0x6100;
/// Room for PVH memory-map entries before the zero page.
pub const PVH_MEMMAP_MAX_ENTRIES: usize = ((ZERO_PAGE_ADDR - PVH_MEMMAP_ADDR) / 24) as usize;
/// Linux `boot_params` ("zero page").
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer for the 64-bit entry.
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
/// Identity-map page tables for the 64-bit entry: PML4, one PDPT, four PDs (4 GiB, 2 MiB pages).
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
pub const PD_COUNT: u64 = 4;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Longest command line accepted, including the terminating NUL.
pub const CMDLINE_MAX: usize = 4096;
/// Extended BIOS data area: reserved in the memory map.
pub const EBDA_START: u64 = 0x9_fc00;
/// Legacy BIOS area (0xe0000..1 MiB): firmware tables live here, reserved in the memory map.
pub const BIOS_AREA_START: u64 = 0xe_0000;
/// Intel MP table (floating pointer + configuration table).
pub const MPTABLE_ADDR: u64 = 0xf_0000;
/// Lowest address a kernel may be loaded at.
pub const KERNEL_MIN_ADDR: u64 = 0x10_0000;
