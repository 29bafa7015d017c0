//! Loading the kernel (vmlinux ELF or bzImage) and the initrd into guest memory.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::bootparam::setup_header;
use linux_loader::loader::{self, BzImage, Elf, KernelLoader, elf::PvhBootCapability};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::BootError;
use super::layout::KERNEL_MIN_ADDR;
use crate::memory::GuestMem;

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const ELF_CLASS_64: u8 = 2;
const EM_X86_64: u16 = 62;
/// bzImage: offset of the "HdrS" magic and of the protocol version.
const BZ_HEADER_OFFSET: u64 = 0x202;
/// xloadflags bit: the kernel has a 64-bit entry at load address + 0x200.
const XLF_KERNEL_64: u16 = 1 << 0;
const BZ_ENTRY64_OFFSET: u64 = 0x200;
/// Highest initrd address for boot protocols older than 2.03.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// The kernel image's format, detected from its first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum KernelFormat {
    /// A 64-bit x86_64 ELF (vmlinux), which may carry a PVH entry note.
    Elf,
    /// A compressed bzImage with a 64-bit entry point.
    BzImage,
}

impl std::fmt::Display for KernelFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            KernelFormat::Elf => "ELF",
            KernelFormat::BzImage => "bzImage",
        })
    }
}

/// A kernel placed in guest memory.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    pub format: KernelFormat,
    /// Entry point of the 64-bit Linux boot protocol.
    pub entry64: u64,
    /// Entry point of the PVH boot protocol, if the ELF carries the note.
    pub pvh_entry: Option<u64>,
    /// The bzImage's setup header.
    pub setup_header: Option<setup_header>,
    /// First address after the kernel (bss included).
    pub end: u64,
    /// Highest address the initrd may occupy.
    pub initrd_addr_max: u64,
}

fn open(path: &Path, what: &'static str) -> Result<File, BootError> {
    File::open(path).map_err(|source| BootError::Open { what, path: path.to_path_buf(), source })
}

/// Identifies the image format from its first bytes.
pub fn detect_format(file: &mut File, path: &Path) -> Result<KernelFormat, BootError> {
    let read_err = |source| BootError::Open { what: "kernel", path: path.to_path_buf(), source };
    let mut ident = [0u8; 20];
    let n = file.read(&mut ident).map_err(read_err)?;
    if n >= 20 && &ident[..4] == ELF_MAGIC {
        if ident[4] != ELF_CLASS_64 {
            return Err(BootError::UnsupportedKernel {
                path: path.to_path_buf(),
                reason: "a 32-bit ELF; only 64-bit ELF kernels boot",
            });
        }
        if u16::from_le_bytes([ident[18], ident[19]]) != EM_X86_64 {
            return Err(BootError::UnsupportedKernel {
                path: path.to_path_buf(),
                reason: "an ELF for another architecture than x86_64",
            });
        }
        return Ok(KernelFormat::Elf);
    }
    let mut magic = [0u8; 4];
    file.seek(SeekFrom::Start(BZ_HEADER_OFFSET)).map_err(read_err)?;
    if file.read(&mut magic).map_err(read_err)? == 4 && u32::from_le_bytes(magic) == super::linux::HEADER_MAGIC {
        return Ok(KernelFormat::BzImage);
    }
    Err(BootError::UnsupportedKernel { path: path.to_path_buf(), reason: "neither an ELF (vmlinux) nor a bzImage" })
}

/// Loads the kernel at `path`.
pub fn load_kernel(mem: &GuestMem, path: &Path) -> Result<LoadedKernel, BootError> {
    let mut file = open(path, "kernel")?;
    let format = detect_format(&mut file, path)?;
    let load_err =
        |source: loader::Error| BootError::Load { path: path.to_path_buf(), mem_bytes: mem_size(mem), source };
    match format {
        KernelFormat::Elf => {
            let result = Elf::load(mem, None, &mut file, Some(GuestAddress(KERNEL_MIN_ADDR))).map_err(load_err)?;
            let pvh_entry = match result.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => Some(addr.0),
                _ => None,
            };
            Ok(LoadedKernel {
                format,
                entry64: result.kernel_load.0,
                pvh_entry,
                setup_header: None,
                end: result.kernel_end,
                initrd_addr_max: u64::from(u32::MAX),
            })
        }
        KernelFormat::BzImage => {
            let result = BzImage::load(mem, None, &mut file, Some(GuestAddress(KERNEL_MIN_ADDR))).map_err(load_err)?;
            let hdr = result.setup_header.ok_or_else(|| BootError::UnsupportedKernel {
                path: path.to_path_buf(),
                reason: "a bzImage without a setup header",
            })?;
            if hdr.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(BootError::UnsupportedKernel {
                    path: path.to_path_buf(),
                    reason: "a bzImage without a 64-bit entry point (boot protocol 2.12+ with XLF_KERNEL_64 is required)",
                });
            }
            let load = result.kernel_load.0;
            // The decompressor needs init_size bytes from the load address.
            let end = result.kernel_end.max(load + u64::from(hdr.init_size));
            if end > mem_size(mem) {
                return Err(BootError::TooLittleMemory { needed: end, mem_bytes: mem_size(mem) });
            }
            let initrd_addr_max =
                if hdr.version >= 0x0203 { u64::from(hdr.initrd_addr_max) } else { DEFAULT_INITRD_ADDR_MAX };
            Ok(LoadedKernel {
                format,
                entry64: load + BZ_ENTRY64_OFFSET,
                pvh_entry: None,
                setup_header: Some(hdr),
                end,
                initrd_addr_max,
            })
        }
    }
}

fn mem_size(mem: &GuestMem) -> u64 {
    mem.iter().map(vm_memory::GuestMemoryRegion::len).sum()
}

/// Chooses the initrd's address: as high as allowed (below `ram_end` and `addr_max`), page
/// aligned, above the kernel. `None` if it does not fit.
pub fn place_initrd(size: u64, kernel_end: u64, ram_end: u64, addr_max: u64) -> Option<u64> {
    let top = ram_end.min(addr_max.saturating_add(1));
    let addr = top.checked_sub(size)? & !0xfff;
    (size > 0 && addr >= kernel_end.next_multiple_of(0x1000)).then_some(addr)
}

/// Loads the initrd at `path` as high as possible; returns `(address, size)`.
pub fn load_initrd(mem: &GuestMem, path: &Path, kernel: &LoadedKernel, ram_end: u64) -> Result<(u64, u64), BootError> {
    let mut file = open(path, "initrd")?;
    let size =
        file.metadata().map_err(|source| BootError::Open { what: "initrd", path: path.to_path_buf(), source })?.len();
    if size == 0 {
        return Err(BootError::EmptyInitrd(path.to_path_buf()));
    }
    let addr = place_initrd(size, kernel.end, ram_end, kernel.initrd_addr_max).ok_or(BootError::InitrdTooLarge {
        size,
        room: ram_end.min(kernel.initrd_addr_max).saturating_sub(kernel.end),
    })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| BootError::InitrdRead { path: path.to_path_buf(), source: e })?;
    Ok((addr, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initrd_goes_as_high_as_allowed() {
        let mib = 1 << 20;
        assert_eq!(place_initrd(0x1800, 2 * mib, 64 * mib, u64::from(u32::MAX)), Some(64 * mib - 0x2000));
        // The bzImage limit wins over RAM.
        assert_eq!(place_initrd(0x1000, 2 * mib, 1 << 30, 0x37ff_ffff), Some(0x3800_0000 - 0x1000));
        // Exactly fits above the kernel.
        assert_eq!(place_initrd(62 * mib, 2 * mib, 64 * mib, u64::MAX), Some(2 * mib));
        assert_eq!(place_initrd(62 * mib + 1, 2 * mib, 64 * mib, u64::MAX), None);
        assert_eq!(place_initrd(0, 2 * mib, 64 * mib, u64::MAX), None);
        assert_eq!(place_initrd(u64::MAX, 0, 64 * mib, u64::MAX), None);
    }
}
