//! What the loader told us: command line and memory map, from either the Linux `boot_params`
//! (64-bit entry) or the PVH `hvm_start_info`. Copied out at entry so programs may reuse low
//! memory afterwards.

const CMDLINE_CAPACITY: usize = 2048;
const MAX_RANGES: usize = 64;

/// How the VMM entered the guest.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Linux64,
    Pvh,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Linux64 => "linux64",
            Protocol::Pvh => "pvh",
        }
    }
}

/// One entry of the memory map; `usable` is e820 type 1 (RAM).
#[derive(Clone, Copy, Default)]
pub struct MemRange {
    pub start: u64,
    pub len: u64,
    pub usable: bool,
}

impl MemRange {
    pub fn end(&self) -> u64 {
        self.start.saturating_add(self.len)
    }
}

pub struct BootInfo {
    pub protocol: Protocol,
    cmdline: [u8; CMDLINE_CAPACITY],
    cmdline_len: usize,
    ranges: [MemRange; MAX_RANGES],
    range_count: usize,
    /// Physical address of the ACPI RSDP, when the PVH loader passed one.
    pub rsdp: Option<u64>,
}

// Linux boot_params offsets (Documentation/arch/x86/zero-page.rst).
const BP_E820_ENTRIES: u64 = 0x1e8;
const BP_CMD_LINE_PTR: u64 = 0x228;
const BP_E820_TABLE: u64 = 0x2d0;
const E820_ENTRY_SIZE: u64 = 20;
const E820_MAX: usize = 128;

// PVH hvm_start_info offsets (xen/include/public/arch-x86/hvm/start_info.h).
const PVH_MAGIC: u32 = 0x336e_c578;
const PVH_VERSION: u64 = 4;
const PVH_CMDLINE_PADDR: u64 = 24;
const PVH_RSDP_PADDR: u64 = 32;
const PVH_MEMMAP_PADDR: u64 = 40;
const PVH_MEMMAP_ENTRIES: u64 = 48;
const PVH_MEMMAP_ENTRY_SIZE: u64 = 24;

const E820_RAM: u32 = 1;

/// # Safety
/// `addr` must be readable physical memory inside the identity map.
unsafe fn read<T: Copy>(addr: u64) -> T {
    // SAFETY: guaranteed by the caller.
    unsafe { core::ptr::read_unaligned(addr as *const T) }
}

impl BootInfo {
    /// Copies the command line and memory map out of the loader's structure.
    ///
    /// # Safety
    /// `addr` must point at a valid `boot_params` (protocol 1) or `hvm_start_info` (protocol 2).
    pub unsafe fn capture(addr: u64, protocol: u64) -> Self {
        let mut info = BootInfo {
            protocol: if protocol == 2 { Protocol::Pvh } else { Protocol::Linux64 },
            cmdline: [0; CMDLINE_CAPACITY],
            cmdline_len: 0,
            ranges: [MemRange::default(); MAX_RANGES],
            range_count: 0,
            rsdp: None,
        };
        // SAFETY: the caller guarantees the structure; every pointer in it is checked for null.
        unsafe {
            match info.protocol {
                Protocol::Linux64 => {
                    info.copy_cmdline(u64::from(read::<u32>(addr + BP_CMD_LINE_PTR)));
                    let count = usize::from(read::<u8>(addr + BP_E820_ENTRIES)).min(E820_MAX);
                    for i in 0..count as u64 {
                        let entry = addr + BP_E820_TABLE + i * E820_ENTRY_SIZE;
                        info.push_range(read(entry), read(entry + 8), read(entry + 16));
                    }
                }
                Protocol::Pvh => {
                    if read::<u32>(addr) != PVH_MAGIC {
                        return info;
                    }
                    info.copy_cmdline(read(addr + PVH_CMDLINE_PADDR));
                    let rsdp: u64 = read(addr + PVH_RSDP_PADDR);
                    info.rsdp = (rsdp != 0).then_some(rsdp);
                    if read::<u32>(addr + PVH_VERSION) >= 1 {
                        let table: u64 = read(addr + PVH_MEMMAP_PADDR);
                        let count: u32 = read(addr + PVH_MEMMAP_ENTRIES);
                        for i in 0..u64::from(count).min(E820_MAX as u64) {
                            let entry = table + i * PVH_MEMMAP_ENTRY_SIZE;
                            info.push_range(read(entry), read(entry + 8), read(entry + 16));
                        }
                    }
                }
            }
        }
        info
    }

    /// # Safety
    /// `ptr` is 0 or the address of a NUL-terminated string.
    unsafe fn copy_cmdline(&mut self, ptr: u64) {
        if ptr == 0 {
            return;
        }
        while self.cmdline_len < CMDLINE_CAPACITY {
            // SAFETY: guaranteed by the caller; we stop at the terminator.
            let b: u8 = unsafe { read(ptr + self.cmdline_len as u64) };
            if b == 0 {
                break;
            }
            self.cmdline[self.cmdline_len] = b;
            self.cmdline_len += 1;
        }
    }

    fn push_range(&mut self, start: u64, len: u64, kind: u32) {
        if self.range_count < MAX_RANGES {
            self.ranges[self.range_count] = MemRange { start, len, usable: kind == E820_RAM };
            self.range_count += 1;
        }
    }

    pub fn cmdline(&self) -> &str {
        core::str::from_utf8(&self.cmdline[..self.cmdline_len]).unwrap_or("")
    }

    pub fn ranges(&self) -> &[MemRange] {
        &self.ranges[..self.range_count]
    }

    /// Total usable RAM in bytes.
    pub fn ram_bytes(&self) -> u64 {
        self.ranges().iter().filter(|r| r.usable).map(|r| r.len).sum()
    }

    /// The largest usable range at or above `floor`, clipped to start at `floor`.
    pub fn largest_free_range_above(&self, floor: u64) -> Option<MemRange> {
        self.ranges()
            .iter()
            .filter(|r| r.usable && r.end() > floor)
            .map(|r| {
                let start = r.start.max(floor);
                MemRange { start, len: r.end() - start, usable: true }
            })
            .max_by_key(|r| r.len)
    }
}
