//! Putting a kernel in guest memory and describing the machine to it.
//!
//! Three ways in: a vmlinux ELF through the 64-bit Linux boot protocol (long mode, identity
//! page tables, `boot_params` in RSI, as Firecracker does), a bzImage through the same
//! protocol, and PVH when the ELF carries a `XEN_ELFNOTE_PHYS32_ENTRY` note (32-bit protected
//! mode, `hvm_start_info` in EBX). Every structure is built by a pure function here and
//! unit-tested byte by byte; [`load`] writes them.

pub mod cpu;
pub mod kernel;
pub mod layout;
pub mod linux;
pub mod memmap;
pub mod mptable;
pub mod pvh;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

pub use cpu::CpuBootState;
pub use kernel::{KernelFormat, LoadedKernel};

use crate::memory::GuestMem;

/// Which boot protocol to use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootProtocol {
    /// PVH if the kernel has the PVH note, otherwise the 64-bit Linux protocol.
    #[default]
    Auto,
    /// The 64-bit Linux boot protocol (ELF or bzImage).
    Linux,
    /// PVH (ELF with the PVH note).
    Pvh,
}

impl std::fmt::Display for BootProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            BootProtocol::Auto => "auto",
            BootProtocol::Linux => "linux",
            BootProtocol::Pvh => "pvh",
        })
    }
}

impl std::str::FromStr for BootProtocol {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(BootProtocol::Auto),
            "linux" => Ok(BootProtocol::Linux),
            "pvh" => Ok(BootProtocol::Pvh),
            other => Err(format!("unknown boot protocol {other:?} (expected auto, linux or pvh)")),
        }
    }
}

/// Why the kernel could not be loaded or the boot structures written.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel or initrd could not be opened or read.
    #[error("cannot read {what} {path}: {source}")]
    Open {
        /// `kernel` or `initrd`.
        what: &'static str,
        /// The file's path.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The kernel image is not a 64-bit x86_64 ELF or a bzImage with a 64-bit entry point.
    #[error("kernel {path} is {reason}")]
    UnsupportedKernel {
        /// The kernel's path.
        path: PathBuf,
        /// What the image is instead.
        reason: &'static str,
    },
    /// linux-loader could not place the kernel in guest memory.
    #[error("cannot load kernel {path} into {} MiB of guest memory: {source}", mem_bytes >> 20)]
    Load {
        /// The kernel's path.
        path: PathBuf,
        /// Guest RAM size in bytes.
        mem_bytes: u64,
        /// The loader's error.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// A bzImage needs more room to decompress than guest RAM offers.
    #[error("the kernel needs memory up to {needed:#x} but the guest has only {} MiB", mem_bytes >> 20)]
    TooLittleMemory {
        /// Guest physical address the kernel's load area extends to (load address plus init_size).
        needed: u64,
        /// Guest RAM size in bytes.
        mem_bytes: u64,
    },
    /// [`BootProtocol::Pvh`] was requested for a kernel without the PVH ELF note.
    #[error("PVH boot was requested but the kernel has no PVH entry note")]
    NoPvhEntry,
    /// The initrd file (path given) is empty.
    #[error("initrd {0} is empty")]
    EmptyInitrd(PathBuf),
    /// The initrd does not fit between the end of the kernel and the highest address allowed.
    #[error("initrd of {size} bytes does not fit: {room} bytes free between the kernel and the top of low memory")]
    InitrdTooLarge {
        /// The initrd's size in bytes.
        size: u64,
        /// Bytes free above the kernel, below low RAM's end and the kernel's initrd limit.
        room: u64,
    },
    /// Copying the initrd into guest memory failed.
    #[error("cannot read initrd {path} into guest memory: {source}")]
    InitrdRead {
        /// The initrd's path.
        path: PathBuf,
        /// What failed.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The command line is longer than the boot area, or than the bzImage accepts.
    #[error("kernel command line is {len} bytes; the limit is {max}")]
    CmdlineTooLong {
        /// The command line's length in bytes.
        len: usize,
        /// The most bytes allowed (without the terminating NUL).
        max: usize,
    },
    /// The command line contains a NUL byte.
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    /// The vCPU count (given) is zero or more than the MP table can describe.
    #[error("{0} vCPUs cannot be described in the MP table (at most {max})", max = mptable::MAX_CPUS)]
    TooManyCpus(u32),
    /// The 64-bit boot protocol's zero page could not be built.
    #[error(transparent)]
    ZeroPage(#[from] linux::ZeroPageError),
    /// The PVH start info could not be built or written.
    #[error(transparent)]
    Pvh(#[from] pvh::PvhError),
    /// Writing the command line, page tables, GDT, MP table or zero page to guest memory failed.
    #[error("cannot write boot structures to guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// What to boot.
#[derive(Clone, Copy, Debug)]
pub struct BootSpec<'a> {
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a str,
    pub protocol: BootProtocol,
    pub vcpus: u32,
    /// ACPI RSDP address, passed to the kernel when the VMM wrote ACPI tables.
    pub rsdp: Option<u64>,
}

/// The result of loading: how the boot CPU starts, and facts for the log.
#[derive(Clone, Debug)]
pub struct BootOutcome {
    pub cpu: CpuBootState,
    /// The protocol actually used (never `Auto`).
    pub protocol: BootProtocol,
    pub kernel: LoadedKernel,
    pub initrd: Option<(u64, u64)>,
}

/// Loads kernel, initrd and command line and writes every boot structure for `ram`
/// (the guest's RAM ranges).
pub fn load(mem: &GuestMem, ram: &[(u64, u64)], spec: &BootSpec) -> Result<BootOutcome, BootError> {
    if spec.cmdline.len() >= layout::CMDLINE_MAX {
        return Err(BootError::CmdlineTooLong { len: spec.cmdline.len(), max: layout::CMDLINE_MAX - 1 });
    }
    if spec.cmdline.contains('\0') {
        return Err(BootError::CmdlineNul);
    }
    if spec.vcpus == 0 || spec.vcpus > mptable::MAX_CPUS {
        return Err(BootError::TooManyCpus(spec.vcpus));
    }

    let kernel = kernel::load_kernel(mem, spec.kernel)?;
    let protocol = match (spec.protocol, kernel.pvh_entry) {
        (BootProtocol::Pvh, None) => return Err(BootError::NoPvhEntry),
        (BootProtocol::Pvh | BootProtocol::Auto, Some(_)) => BootProtocol::Pvh,
        (BootProtocol::Linux | BootProtocol::Auto, _) => BootProtocol::Linux,
    };
    if let Some(hdr) = kernel.setup_header {
        // A bzImage states how long a command line it accepts.
        let max = hdr.cmdline_size as usize;
        if hdr.version >= 0x0206 && spec.cmdline.len() > max {
            return Err(BootError::CmdlineTooLong { len: spec.cmdline.len(), max });
        }
    }

    let low_ram_end = ram.first().map_or(0, |&(addr, len)| addr + len);
    let initrd = spec.initrd.map(|path| kernel::load_initrd(mem, path, &kernel, low_ram_end)).transpose()?;

    let mut cmdline = spec.cmdline.as_bytes().to_vec();
    cmdline.push(0);
    mem.write_slice(&cmdline, GuestAddress(layout::CMDLINE_ADDR))?;

    let memory_map = memmap::memory_map(ram);
    let cpu = match protocol {
        BootProtocol::Pvh => {
            let start_info = pvh::write(mem, layout::CMDLINE_ADDR, initrd, spec.rsdp, &memory_map)?;
            cpu::write_descriptor_tables(mem, cpu::CodeMode::Protected32)?;
            // `protocol` is Pvh only when the entry exists.
            CpuBootState::pvh(kernel.pvh_entry.unwrap_or_default(), start_info)
        }
        _ => {
            let inputs = linux::ZeroPageInputs {
                setup_header: kernel.setup_header,
                cmdline_addr: layout::CMDLINE_ADDR,
                cmdline_len: spec.cmdline.len(),
                initrd,
                rsdp_addr: spec.rsdp,
            };
            mem.write_obj(linux::zero_page(&inputs, &memory_map)?, GuestAddress(layout::ZERO_PAGE_ADDR))?;
            cpu::write_descriptor_tables(mem, cpu::CodeMode::Long64)?;
            cpu::write_identity_page_tables(mem)?;
            CpuBootState::linux64(kernel.entry64, layout::ZERO_PAGE_ADDR)
        }
    };
    mem.write_slice(&mptable::build(layout::MPTABLE_ADDR, spec.vcpus), GuestAddress(layout::MPTABLE_ADDR))?;

    Ok(BootOutcome { cpu, protocol, kernel, initrd })
}

/// Facts about how the VM was put together (kept in snapshots).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct VmInfo {
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest RAM size in bytes.
    pub mem_bytes: u64,
    /// The protocol the kernel was booted with (never [`BootProtocol::Auto`]).
    pub boot_protocol: BootProtocol,
    /// Whether the kernel was an ELF or a bzImage.
    pub kernel_format: KernelFormat,
    /// Guest address of the kernel entry point: the boot vCPU's initial RIP.
    pub entry_point: u64,
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use linux_loader::bootparam::boot_params;
    use vm_memory::{ByteValued, GuestMemoryBackend};

    use super::*;

    /// A file that looks like a bzImage to the loader: setup sectors with a 2.15 header, then
    /// a "protected-mode kernel" of `payload` bytes.
    fn fake_bzimage(dir: &Path, payload: usize, xloadflags: u16) -> PathBuf {
        let setup_sects = 4usize;
        let mut image = vec![0u8; (setup_sects + 1) * 512 + payload];
        image[0x1f1] = setup_sects as u8;
        image[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        image[0x211] = 0x01; // LOADED_HIGH
        image[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        image[0x22c..0x230].copy_from_slice(&0x37ff_ffffu32.to_le_bytes()); // initrd_addr_max
        image[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
        image[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes()); // cmdline_size
        image[0x260..0x264].copy_from_slice(&(4u32 << 20).to_le_bytes()); // init_size
        for (i, b) in image[(setup_sects + 1) * 512..].iter_mut().enumerate() {
            *b = i as u8;
        }
        let path = dir.join("bzImage");
        std::fs::File::create(&path).unwrap().write_all(&image).unwrap();
        path
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vmm-boot-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn bzimage_with_initrd_lands_where_the_zero_page_says() {
        let dir = temp_dir("bz");
        let kernel = fake_bzimage(&dir, 64 * 1024, 0x1);
        let initrd = dir.join("initrd");
        std::fs::write(&initrd, vec![0x5a; 10_000]).unwrap();
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let spec = BootSpec {
            kernel: &kernel,
            initrd: Some(&initrd),
            cmdline: "console=ttyS0 root=/dev/vda",
            protocol: BootProtocol::Auto,
            vcpus: 2,
            rsdp: None,
        };
        let out = load(&mem, &[(0, 64 << 20)], &spec).unwrap();
        assert_eq!(out.protocol, BootProtocol::Linux, "a bzImage has no PVH entry");
        assert_eq!(out.kernel.format, KernelFormat::BzImage);
        assert_eq!(out.cpu.regs.rip, 0x10_0200, "64-bit entry at load address + 0x200");
        assert_eq!(out.cpu.regs.rsi, layout::ZERO_PAGE_ADDR);

        // The protected-mode payload is at code32_start.
        let mut payload = [0u8; 4];
        mem.read_slice(&mut payload, GuestAddress(0x10_0000 + 255)).unwrap();
        assert_eq!(payload, [255, 0, 1, 2]);

        let params: boot_params = mem.read_obj(GuestAddress(layout::ZERO_PAGE_ADDR)).unwrap();
        let b = params.as_slice();
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        // The initrd sits page aligned at the top of RAM, below initrd_addr_max.
        let (initrd_addr, initrd_size) = out.initrd.unwrap();
        assert_eq!((initrd_addr, initrd_size), ((64 << 20) - 0x3000, 10_000));
        assert_eq!(u32_at(0x218) as u64, initrd_addr, "ramdisk_image");
        assert_eq!(u32_at(0x21c), 10_000, "ramdisk_size");
        let mut initrd_bytes = vec![0u8; 10_000];
        mem.read_slice(&mut initrd_bytes, GuestAddress(initrd_addr)).unwrap();
        assert!(initrd_bytes.iter().all(|&b| b == 0x5a));
        // Command line, NUL terminated, where cmd_line_ptr points.
        assert_eq!(u32_at(0x228) as u64, layout::CMDLINE_ADDR);
        let mut cmdline = vec![0u8; spec.cmdline.len() + 1];
        mem.read_slice(&mut cmdline, GuestAddress(layout::CMDLINE_ADDR)).unwrap();
        assert_eq!(&cmdline[..cmdline.len() - 1], spec.cmdline.as_bytes());
        assert_eq!(cmdline[cmdline.len() - 1], 0);
        assert_eq!(b[0x210], 0xff, "type_of_loader");
        assert_eq!(b[0x1e8], 4, "e820 entries");
        // MP table and page tables are in place too.
        let mut sig = [0u8; 4];
        mem.read_slice(&mut sig, GuestAddress(layout::MPTABLE_ADDR)).unwrap();
        assert_eq!(&sig, b"_MP_");
        assert_eq!(mem.read_obj::<u64>(GuestAddress(layout::PML4_ADDR)).unwrap(), layout::PDPT_ADDR | 3);
        assert!(mem.iter().count() == 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bzimage_without_64_bit_entry_is_refused() {
        let dir = temp_dir("bz32");
        let kernel = fake_bzimage(&dir, 4096, 0);
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap();
        let spec =
            BootSpec { kernel: &kernel, initrd: None, cmdline: "", protocol: BootProtocol::Auto, vcpus: 1, rsdp: None };
        let err = load(&mem, &[(0, 32 << 20)], &spec).unwrap_err();
        assert!(err.to_string().contains("without a 64-bit entry point"), "{err}");
        let spec = BootSpec { protocol: BootProtocol::Pvh, ..spec };
        assert!(load(&mem, &[(0, 32 << 20)], &spec).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn initrd_that_does_not_fit_and_bad_cmdlines() {
        let dir = temp_dir("fit");
        let kernel = fake_bzimage(&dir, 4096, 0x1);
        let initrd = dir.join("big");
        std::fs::write(&initrd, vec![0u8; 30 << 20]).unwrap();
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap();
        let ram = [(0, 32 << 20)];
        let spec = BootSpec {
            kernel: &kernel,
            initrd: Some(&initrd),
            cmdline: "",
            protocol: BootProtocol::Auto,
            vcpus: 1,
            rsdp: None,
        };
        assert!(matches!(load(&mem, &ram, &spec), Err(BootError::InitrdTooLarge { .. })));
        let long = "x".repeat(3000);
        let spec = BootSpec { initrd: None, cmdline: &long, ..spec };
        assert!(matches!(load(&mem, &ram, &spec), Err(BootError::CmdlineTooLong { max: 2047, .. })));
        let spec = BootSpec { cmdline: "a\0b", ..spec };
        assert!(matches!(load(&mem, &ram, &spec), Err(BootError::CmdlineNul)));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
