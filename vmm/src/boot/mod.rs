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
            other => Err(format!(
                "unknown boot protocol {other:?} (expected auto, linux or pvh)"
            )),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot read {what} {path}: {source}")]
    Open {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel {path} is {reason}")]
    UnsupportedKernel { path: PathBuf, reason: &'static str },
    #[error("cannot load kernel {path} into {} MiB of guest memory: {source}", mem_bytes >> 20)]
    Load {
        path: PathBuf,
        mem_bytes: u64,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error("the kernel needs memory up to {needed:#x} but the guest has only {} MiB", mem_bytes >> 20)]
    TooLittleMemory { needed: u64, mem_bytes: u64 },
    #[error("PVH boot was requested but the kernel has no PVH entry note")]
    NoPvhEntry,
    #[error("initrd {0} is empty")]
    EmptyInitrd(PathBuf),
    #[error(
        "initrd of {size} bytes does not fit: {room} bytes free between the kernel and the top of low memory"
    )]
    InitrdTooLarge { size: u64, room: u64 },
    #[error("cannot read initrd {path} into guest memory: {source}")]
    InitrdRead {
        path: PathBuf,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("kernel command line is {len} bytes; the limit is {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("{0} vCPUs cannot be described in the MP table (at most {max})", max = mptable::MAX_CPUS)]
    TooManyCpus(u32),
    #[error(transparent)]
    ZeroPage(#[from] linux::ZeroPageError),
    #[error(transparent)]
    Pvh(#[from] pvh::PvhError),
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
        return Err(BootError::CmdlineTooLong {
            len: spec.cmdline.len(),
            max: layout::CMDLINE_MAX - 1,
        });
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
            return Err(BootError::CmdlineTooLong {
                len: spec.cmdline.len(),
                max,
            });
        }
    }

    let low_ram_end = ram.first().map_or(0, |&(addr, len)| addr + len);
    let initrd = spec
        .initrd
        .map(|path| kernel::load_initrd(mem, path, &kernel, low_ram_end))
        .transpose()?;

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
            mem.write_obj(
                linux::zero_page(&inputs, &memory_map)?,
                GuestAddress(layout::ZERO_PAGE_ADDR),
            )?;
            cpu::write_descriptor_tables(mem, cpu::CodeMode::Long64)?;
            cpu::write_identity_page_tables(mem)?;
            CpuBootState::linux64(kernel.entry64, layout::ZERO_PAGE_ADDR)
        }
    };
    mem.write_slice(
        &mptable::build(layout::MPTABLE_ADDR, spec.vcpus),
        GuestAddress(layout::MPTABLE_ADDR),
    )?;

    Ok(BootOutcome {
        cpu,
        protocol,
        kernel,
        initrd,
    })
}
