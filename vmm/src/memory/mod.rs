//! Guest RAM: the list of regions, each with its backing, mapped into this process.
//!
//! [`GuestRam`] is the single home of "what RAM does the guest have and what backs it". Devices
//! reach guest memory through [`GuestRam::memory`], a `GuestMemoryAtomic` handle that always
//! shows the current set of mappings, so a region's backing can later be replaced while the VM
//! runs without devices holding stale pointers.

pub mod layout;

use std::fs::{File, OpenOptions};
use std::os::fd::FromRawFd;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryAtomic, GuestMemoryRegion, GuestRegionMmap};

pub use devices::{GuestMem, SharedGuestMem};

/// What a RAM region's pages live in.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", deny_unknown_fields)]
pub enum RamBacking {
    /// Private anonymous memory (the default).
    #[default]
    Anonymous,
    /// A memfd: shareable with another process by passing the descriptor.
    Memfd,
    /// A regular file, mapped shared; regions sit at consecutive offsets.
    File { path: PathBuf },
}

impl std::fmt::Display for RamBacking {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            RamBacking::Anonymous => write!(f, "anonymous"),
            RamBacking::Memfd => write!(f, "memfd"),
            RamBacking::File { path } => write!(f, "file {}", path.display()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory size must be a multiple of 4 KiB and at least 1 MiB, got {0} bytes")]
    BadSize(u64),
    #[error("cannot create memfd for guest RAM: {0}")]
    Memfd(#[source] std::io::Error),
    #[error("cannot open RAM backing file {path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot map {size} bytes of guest RAM ({backing}): {source}")]
    Mmap {
        size: u64,
        backing: RamBacking,
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("guest RAM regions overlap or are misplaced: {0}")]
    Layout(String),
}

/// One contiguous range of guest RAM and what backs it.
pub struct RamRegion {
    /// KVM memory slot number.
    pub slot: u32,
    pub backing: RamBacking,
    mapping: Arc<GuestRegionMmap>,
}

impl RamRegion {
    pub fn guest_addr(&self) -> u64 {
        self.mapping.start_addr().0
    }

    pub fn size(&self) -> u64 {
        self.mapping.len()
    }

    /// Address of the region's mapping in this process.
    pub fn host_addr(&self) -> u64 {
        self.mapping.as_ptr() as u64
    }
}

/// All of the guest's RAM.
pub struct GuestRam {
    regions: Vec<RamRegion>,
    memory: SharedGuestMem,
}

impl GuestRam {
    /// Allocates `size` bytes of RAM laid out around the MMIO gap, all with `backing`.
    pub fn new(size: u64, backing: &RamBacking) -> Result<Self, MemoryError> {
        if size < (1 << 20) || !size.is_multiple_of(4096) {
            return Err(MemoryError::BadSize(size));
        }
        let mut regions = Vec::new();
        let mut file_offset = 0;
        for (slot, (guest_addr, len)) in layout::ram_ranges(size).into_iter().enumerate() {
            let mmap = map_backing(backing, len, file_offset)?;
            file_offset += len;
            let mapping = GuestRegionMmap::new(mmap, GuestAddress(guest_addr))
                .ok_or_else(|| MemoryError::Layout(format!("region at {guest_addr:#x} overflows")))?;
            regions.push(RamRegion { slot: slot as u32, backing: backing.clone(), mapping: Arc::new(mapping) });
        }
        let memory = GuestMem::from_arc_regions(regions.iter().map(|r| r.mapping.clone()).collect())
            .map_err(|e| MemoryError::Layout(e.to_string()))?;
        Ok(Self { regions, memory: GuestMemoryAtomic::new(memory) })
    }

    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.regions.iter().map(RamRegion::size).sum()
    }

    /// A handle on guest memory that follows future region replacements.
    pub fn memory(&self) -> SharedGuestMem {
        self.memory.clone()
    }
}

fn map_backing(backing: &RamBacking, size: u64, file_offset: u64) -> Result<MmapRegion, MemoryError> {
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let (file, flags) = match backing {
        RamBacking::Anonymous => (None, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE),
        RamBacking::Memfd => {
            let file = memfd(size).map_err(MemoryError::Memfd)?;
            (Some(FileOffset::new(file, 0)), libc::MAP_SHARED | libc::MAP_NORESERVE)
        }
        RamBacking::File { path } => {
            let file_err = |source| MemoryError::File { path: path.clone(), source };
            let file =
                OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).map_err(file_err)?;
            let needed = file_offset + size;
            if file.metadata().map_err(file_err)?.len() < needed {
                file.set_len(needed).map_err(file_err)?;
            }
            (Some(FileOffset::new(file, file_offset)), libc::MAP_SHARED)
        }
    };
    MmapRegion::build(file, size as usize, prot, flags).map_err(|source| MemoryError::Mmap {
        size,
        backing: backing.clone(),
        source,
    })
}

/// A sealed-size anonymous file for guest RAM.
fn memfd(size: u64) -> std::io::Result<File> {
    // SAFETY: the name is a valid C string; the returned descriptor is checked.
    let fd = unsafe { libc::memfd_create(c"guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor we own.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddressSpace};

    use super::*;

    #[test]
    fn rejects_bad_sizes() {
        assert!(matches!(GuestRam::new(4096, &RamBacking::Anonymous), Err(MemoryError::BadSize(_))));
        assert!(matches!(GuestRam::new((2 << 20) + 1, &RamBacking::Anonymous), Err(MemoryError::BadSize(_))));
    }

    #[test]
    fn every_backing_holds_data() {
        let dir = std::env::temp_dir().join(format!("vmm-ram-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for backing in [RamBacking::Anonymous, RamBacking::Memfd, RamBacking::File { path: dir.join("ram") }] {
            let ram = GuestRam::new(4 << 20, &backing).unwrap();
            assert_eq!(ram.size(), 4 << 20);
            assert_eq!(ram.regions().len(), 1);
            let mem = ram.memory();
            mem.memory().write_obj(0xdead_beef_u32, GuestAddress(0x1000)).unwrap();
            assert_eq!(mem.memory().read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 0xdead_beef);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
