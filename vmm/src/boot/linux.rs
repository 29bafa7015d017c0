//! The Linux boot protocol's `boot_params` ("zero page"), for the 64-bit entry of both vmlinux
//! ELF and bzImage kernels.

use linux_loader::bootparam::{boot_e820_entry, boot_params, setup_header};

use super::memmap::MemoryMapEntry;

/// "HdrS": marks a setup header.
pub const HEADER_MAGIC: u32 = 0x5372_6448;
/// Boot sector signature.
pub const BOOT_FLAG: u16 = 0xaa55;
/// "Undefined" boot loader id (we are not one of the registered loaders).
pub const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// loadflags: the kernel may use the setup heap (`heap_end_ptr` is valid).
pub const CAN_USE_HEAP: u8 = 0x80;
/// Kernel alignment we announce for vmlinux (16 MiB, the x86_64 default).
pub const KERNEL_ALIGNMENT: u32 = 0x0100_0000;
/// Where the kernel's setup heap ends, relative to the real-mode code (conventional value).
pub const HEAP_END_PTR: u16 = 0xfe00;
/// e820 slots in the zero page.
pub const E820_MAX_ENTRIES: usize = 128;

/// What goes into the zero page besides the memory map.
#[derive(Clone, Copy, Debug, Default)]
pub struct ZeroPageInputs {
    /// The bzImage's own setup header, or `None` for a vmlinux ELF.
    pub setup_header: Option<setup_header>,
    pub cmdline_addr: u64,
    /// Length without the NUL terminator.
    pub cmdline_len: usize,
    pub initrd: Option<(u64, u64)>,
    /// Physical address of the ACPI RSDP, if the VMM wrote ACPI tables.
    pub rsdp_addr: Option<u64>,
}

/// Why the Linux zero page (`boot_params`) could not be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ZeroPageError {
    /// More RAM ranges than the zero page's e820 table holds.
    #[error("the memory map has {0} entries; the zero page holds at most 128")]
    TooManyMemoryMapEntries(usize),
}

/// Builds `boot_params` for the 64-bit boot protocol.
pub fn zero_page(inputs: &ZeroPageInputs, memory_map: &[MemoryMapEntry]) -> Result<boot_params, ZeroPageError> {
    if memory_map.len() > E820_MAX_ENTRIES {
        return Err(ZeroPageError::TooManyMemoryMapEntries(memory_map.len()));
    }
    let mut params = boot_params::default();
    let hdr = &mut params.hdr;
    match inputs.setup_header {
        Some(image_header) => {
            *hdr = image_header;
            hdr.loadflags |= CAN_USE_HEAP;
            hdr.heap_end_ptr = HEAP_END_PTR;
        }
        None => {
            hdr.boot_flag = BOOT_FLAG;
            hdr.header = HEADER_MAGIC;
            hdr.kernel_alignment = KERNEL_ALIGNMENT;
        }
    }
    hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    hdr.cmd_line_ptr = inputs.cmdline_addr as u32;
    params.ext_cmd_line_ptr = (inputs.cmdline_addr >> 32) as u32;
    if inputs.setup_header.is_none() {
        hdr.cmdline_size = inputs.cmdline_len as u32;
    }
    if let Some((addr, size)) = inputs.initrd {
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = size as u32;
        params.ext_ramdisk_image = (addr >> 32) as u32;
        params.ext_ramdisk_size = (size >> 32) as u32;
    }
    params.acpi_rsdp_addr = inputs.rsdp_addr.unwrap_or(0);
    for (slot, entry) in params.e820_table.iter_mut().zip(memory_map) {
        *slot = boot_e820_entry { addr: entry.addr, size: entry.size, r#type: entry.kind as u32 };
    }
    params.e820_entries = memory_map.len() as u8;
    Ok(params)
}

#[cfg(test)]
mod tests {
    use vm_memory::ByteValued;

    use super::*;
    use crate::boot::memmap::{MemoryKind, memory_map};

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
    }
    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    #[test]
    fn vmlinux_zero_page_bytes() {
        let map = memory_map(&[(0, 128 << 20)]);
        let inputs = ZeroPageInputs {
            setup_header: None,
            cmdline_addr: 0x2_0000,
            cmdline_len: 42,
            initrd: Some((0x700_0000, 0x12_3456)),
            rsdp_addr: Some(0xe_0000),
        };
        let params = zero_page(&inputs, &map).unwrap();
        let b = params.as_slice();
        assert_eq!(b.len(), 4096);
        // Offsets from Documentation/arch/x86/zero-page.rst and boot.rst.
        assert_eq!(u64_at(b, 0x070), 0xe_0000, "acpi_rsdp_addr");
        assert_eq!(u32_at(b, 0x0c8), 0, "ext_cmd_line_ptr");
        assert_eq!(b[0x1e8], 4, "e820_entries");
        assert_eq!(u16_at(b, 0x1fe), 0xaa55, "boot_flag");
        assert_eq!(u32_at(b, 0x202), 0x5372_6448, "header HdrS");
        assert_eq!(b[0x210], 0xff, "type_of_loader");
        assert_eq!(u32_at(b, 0x218), 0x700_0000, "ramdisk_image");
        assert_eq!(u32_at(b, 0x21c), 0x12_3456, "ramdisk_size");
        assert_eq!(u32_at(b, 0x228), 0x2_0000, "cmd_line_ptr");
        assert_eq!(u32_at(b, 0x230), 0x0100_0000, "kernel_alignment");
        assert_eq!(u32_at(b, 0x238), 42, "cmdline_size");
        // e820 table at 0x2d0, 20-byte entries.
        let e = |i: usize| (u64_at(b, 0x2d0 + i * 20), u64_at(b, 0x2d8 + i * 20), u32_at(b, 0x2e0 + i * 20));
        assert_eq!(e(0), (0, 0x9_fc00, 1));
        assert_eq!(e(1), (0x9_fc00, 0x400, 2));
        assert_eq!(e(2), (0xe_0000, 0x2_0000, 2));
        assert_eq!(e(3), (0x10_0000, (128 << 20) - 0x10_0000, 1));
        assert_eq!(e(4), (0, 0, 0));
    }

    #[test]
    fn bzimage_header_is_kept_and_completed() {
        let image = setup_header {
            setup_sects: 27,
            boot_flag: BOOT_FLAG,
            header: HEADER_MAGIC,
            version: 0x020f,
            loadflags: 0x01,
            code32_start: 0x10_0000,
            initrd_addr_max: 0x7fff_ffff,
            cmdline_size: 2047,
            xloadflags: 0x7f,
            ..Default::default()
        };
        let inputs =
            ZeroPageInputs { setup_header: Some(image), cmdline_addr: 0x2_0000, cmdline_len: 10, ..Default::default() };
        let map = [MemoryMapEntry { addr: 0, size: 1 << 20, kind: MemoryKind::Ram }];
        let params = zero_page(&inputs, &map).unwrap();
        let b = params.as_slice();
        assert_eq!(b[0x1f1], 27, "setup_sects from the image");
        assert_eq!(u16_at(b, 0x206), 0x020f, "protocol version from the image");
        assert_eq!(b[0x211], 0x81, "LOADED_HIGH kept, CAN_USE_HEAP added");
        assert_eq!(u16_at(b, 0x224), 0xfe00, "heap_end_ptr");
        assert_eq!(u32_at(b, 0x238), 2047, "cmdline_size is the kernel's, not ours");
        assert_eq!(u32_at(b, 0x218), 0, "no initrd");
        assert_eq!(b[0x1e8], 1);
    }

    #[test]
    fn too_many_memory_map_entries() {
        let map = vec![MemoryMapEntry { addr: 0, size: 4096, kind: MemoryKind::Ram }; 129];
        assert_eq!(
            zero_page(&ZeroPageInputs::default(), &map).unwrap_err(),
            ZeroPageError::TooManyMemoryMapEntries(129)
        );
    }
}
