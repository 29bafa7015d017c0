//! Guest RAM: the list of regions, each with its backing, mapped into this process.
//!
//! [`GuestRam`] is the single home of "what RAM does the guest have and what backs it". Devices
//! reach guest memory through [`GuestRam::memory`], a `GuestMemoryAtomic` handle that always
//! shows the current set of mappings, so a region's backing can later be replaced while the VM
//! runs without devices holding stale pointers.

pub mod layout;
pub mod uffd;

use std::fs::{File, OpenOptions};
use std::os::fd::FromRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use devices::DirtyBitmap;
use serde::{Deserialize, Serialize};
use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryAtomic, GuestMemoryRegion, GuestRegionMmap};

pub use devices::{GuestMem, SharedGuestMem};

/// What a RAM region's pages live in.
///
/// As JSON: `{"kind": "anonymous" | "memfd" | "hugetlbfs"}` or `{"kind": "file", "path": P}`;
/// any other key is an error.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", try_from = "RamBackingJson")]
pub enum RamBacking {
    /// Private anonymous memory (the default).
    #[default]
    Anonymous,
    /// A memfd: shareable with another process by passing the descriptor.
    Memfd,
    /// A regular file, mapped shared; at boot regions sit at consecutive offsets, a region
    /// swapped to a file later starts at offset 0.
    File {
        /// The file; created if missing, and refused unless empty (guest RAM starts as zeros).
        path: PathBuf,
    },
    /// 2 MiB huge pages from the kernel's pool (a hugetlb memfd; needs `vm.nr_hugepages`).
    Hugetlbfs,
}

/// How [`RamBacking`] is read from JSON. serde's internally tagged enums let unknown keys
/// through for variants without fields (`{"kind": "memfd", "x": 1}`); this flat form refuses
/// them all.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RamBackingJson {
    kind: RamBackingKind,
    path: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum RamBackingKind {
    Anonymous,
    Memfd,
    File,
    Hugetlbfs,
}

impl TryFrom<RamBackingJson> for RamBacking {
    type Error = String;

    fn try_from(json: RamBackingJson) -> Result<Self, String> {
        match (json.kind, json.path) {
            (RamBackingKind::File, Some(path)) => Ok(RamBacking::File { path }),
            (RamBackingKind::File, None) => Err("missing field `path` (kind file needs it)".into()),
            (_, Some(_)) => Err("unknown field `path`: only kind file has one".into()),
            (RamBackingKind::Anonymous, None) => Ok(RamBacking::Anonymous),
            (RamBackingKind::Memfd, None) => Ok(RamBacking::Memfd),
            (RamBackingKind::Hugetlbfs, None) => Ok(RamBacking::Hugetlbfs),
        }
    }
}

/// The command line's form: `anonymous`, `memfd`, `hugetlbfs` or `file=PATH`.
impl std::str::FromStr for RamBacking {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('=') {
            Some(("file", path)) if !path.is_empty() => Ok(RamBacking::File { path: path.into() }),
            None if s == "anonymous" => Ok(RamBacking::Anonymous),
            None if s == "memfd" => Ok(RamBacking::Memfd),
            None if s == "hugetlbfs" => Ok(RamBacking::Hugetlbfs),
            _ => Err(format!("{s:?}: expected anonymous, memfd, hugetlbfs or file=PATH")),
        }
    }
}

impl std::fmt::Display for RamBacking {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            RamBacking::Anonymous => write!(f, "anonymous"),
            RamBacking::Memfd => write!(f, "memfd"),
            RamBacking::File { path } => write!(f, "file {}", path.display()),
            RamBacking::Hugetlbfs => write!(f, "hugetlbfs"),
        }
    }
}

/// Why guest RAM, or a region's new backing, could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The RAM size in bytes (given) is under 1 MiB or not a multiple of 4 KiB.
    #[error("guest memory size must be a multiple of 4 KiB and at least 1 MiB, got {0} bytes")]
    BadSize(u64),
    /// A memfd (plain or hugetlb) for RAM could not be created or sized.
    #[error("cannot create memfd for guest RAM: {0}")]
    Memfd(#[source] std::io::Error),
    /// A file backing could not be opened, created, inspected or extended.
    #[error("cannot open RAM backing file {path}: {source}")]
    File {
        /// The backing file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// Mapping a region's backing into the VMM failed.
    #[error("cannot map {size} bytes of guest RAM ({backing}): {source}")]
    Mmap {
        /// The region's length in bytes.
        size: u64,
        /// What the region was to be backed by.
        backing: RamBacking,
        /// What failed.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// A file backing already holds data, which guest RAM (starting as zeros) would overwrite.
    #[error(
        "RAM backing file {path} already holds {len} bytes; guest RAM starts empty, so it would be \
         overwritten: remove it or pick a new path"
    )]
    FileNotEmpty {
        /// The backing file.
        path: PathBuf,
        /// Its length in bytes.
        len: u64,
    },
    /// More guest RAM than the host has, counting its swap: it could never all be backed, and
    /// the guest would be killed (or take the host down) when it touches the rest.
    #[error(
        "guest RAM of {} MiB is more than this host's {} MiB of memory and swap",
        wanted >> 20,
        host >> 20
    )]
    HostTooSmall {
        /// Bytes of guest RAM asked for.
        wanted: u64,
        /// Bytes of host memory plus swap.
        host: u64,
    },
    /// Too few free huge pages in the kernel's pool for a hugetlbfs backing.
    #[error("hugetlbfs backing needs {needed} free 2 MiB huge pages, {free} are free (raise vm.nr_hugepages)")]
    HugePages {
        /// 2 MiB pages the region needs.
        needed: u64,
        /// 2 MiB pages free in the pool now.
        free: u64,
    },
    /// No RAM region has this KVM slot number.
    #[error("no RAM region with slot {0}")]
    NoSuchRegion(u32),
    /// A region's addresses overflow, or the regions overlap (an internal error).
    #[error("guest RAM regions overlap or are misplaced: {0}")]
    Layout(String),
}

/// Huge page size used for hugetlbfs backings.
pub const HUGE_PAGE: u64 = 2 << 20;

/// One contiguous range of guest RAM and what backs it.
pub struct RamRegion {
    /// KVM memory slot number.
    pub slot: u32,
    pub backing: RamBacking,
    mapping: Arc<GuestRegionMmap<DirtyBitmap>>,
    /// The page tables and the file say nothing about what the region holds: a private
    /// (copy-on-write) mapping of a snapshot's memory file (pages the guest wrote are anonymous,
    /// and may sit over the file's holes), or RAM filled on first touch (a lazy restore).
    contents_elsewhere: bool,
    /// A RAM file this region created: removed with it (the guest's memory is not left on
    /// disk; a file that was there before stays).
    created_file: Option<PathBuf>,
}

impl Drop for RamRegion {
    fn drop(&mut self) {
        if let Some(path) = &self.created_file {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl RamRegion {
    /// Maps `size` bytes of `backing` for guest address `guest_addr`.
    pub fn map(
        slot: u32,
        guest_addr: u64,
        size: u64,
        backing: &RamBacking,
        file_offset: u64,
    ) -> Result<Self, MemoryError> {
        let (mmap, created_file) = map_backing(backing, size, file_offset)?;
        let mapping = GuestRegionMmap::new(mmap, GuestAddress(guest_addr))
            .ok_or_else(|| MemoryError::Layout(format!("region at {guest_addr:#x} overflows")))?;
        Ok(Self { slot, backing: backing.clone(), mapping: Arc::new(mapping), contents_elsewhere: false, created_file })
    }

    /// Maps `size` bytes of `file` from `file_offset`, privately: the guest reads the file's
    /// pages as they are needed (page cache, shared with other restores of the same file) and
    /// its writes go to private anonymous pages, never to the file. Reported as anonymous.
    pub fn map_file_private(
        slot: u32,
        guest_addr: u64,
        size: u64,
        file: &File,
        file_offset: u64,
    ) -> Result<Self, MemoryError> {
        let backing = RamBacking::Anonymous;
        let mmap_err = |source| MemoryError::Mmap { size, backing: backing.clone(), source };
        let file = file.try_clone().map_err(|e| MemoryError::Mmap {
            size,
            backing: backing.clone(),
            source: vm_memory::mmap::MmapRegionError::Mmap(e),
        })?;
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let flags = libc::MAP_PRIVATE | libc::MAP_NORESERVE;
        let mmap = MmapRegion::build(Some(FileOffset::new(file, file_offset)), size as usize, prot, flags)
            .map_err(mmap_err)?;
        let mapping = GuestRegionMmap::new(mmap, GuestAddress(guest_addr))
            .ok_or_else(|| MemoryError::Layout(format!("region at {guest_addr:#x} overflows")))?;
        Ok(Self { slot, backing, mapping: Arc::new(mapping), contents_elsewhere: true, created_file: None })
    }

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

    /// Byte ranges, relative to the region's start, that may hold data; everything else is
    /// known to read as zeros. Found without touching the memory: from the page tables for
    /// anonymous memory (present or swapped pages), from the file's data extents otherwise.
    /// When the kernel cannot tell, the whole region is returned.
    pub fn populated_ranges(&self) -> Vec<(u64, u64)> {
        let size = self.size();
        if self.contents_elsewhere {
            return vec![(0, size)];
        }
        let found = match self.mapping.file_offset() {
            Some(fo) => data_extents(fo.file(), fo.start(), size),
            None => resident_pages(self.host_addr(), size),
        };
        found.unwrap_or_else(|_| vec![(0, size)])
    }

    /// Faults in the pages of `ranges` (relative to the region's start) for writing, so that a
    /// later copy into them, done with the guest paused, does not pay for page faults.
    /// Best effort: on failure the copy simply faults the pages in itself.
    pub fn prefault(&self, ranges: &[(u64, u64)]) {
        for &(start, len) in ranges {
            let len = len.min(self.size().saturating_sub(start));
            // SAFETY: the range lies inside our own mapping; MADV_POPULATE_WRITE (Linux 5.14)
            // only faults pages in, it does not change their contents.
            let ret = unsafe {
                libc::madvise((self.host_addr() + start) as *mut libc::c_void, len as usize, libc::MADV_POPULATE_WRITE)
            };
            if ret != 0 {
                log::debug!("cannot prefault guest RAM: {}", std::io::Error::last_os_error());
                return;
            }
        }
    }

    pub fn info(&self) -> RegionInfo {
        RegionInfo {
            slot: self.slot,
            guest_addr: self.guest_addr(),
            size: self.size(),
            backing: self.backing.clone(),
            host_addr: self.host_addr(),
        }
    }
}

/// One guest RAM region, as [`Vm::memory_regions`](crate::Vm::memory_regions) and
/// `GET /memory/regions` report it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RegionInfo {
    /// The KVM memory slot: 0 is the RAM below the 32-bit MMIO gap, 1 the RAM above it.
    pub slot: u32,
    /// Where the region starts in guest physical memory.
    pub guest_addr: u64,
    /// Its size in bytes.
    pub size: u64,
    /// What its pages live in now.
    pub backing: RamBacking,
    /// Where it is mapped in the VMM's address space.
    #[serde(skip)]
    pub(crate) host_addr: u64,
}

/// Something filling guest RAM's pages on first touch (a lazy restore); stopped when dropped.
pub trait RamFiller: Send {
    /// Some pages are still missing.
    fn filling(&self) -> bool;
}

/// All of the guest's RAM.
pub struct GuestRam {
    /// What serves this RAM's pages (a lazy restore's fault handler): dropped, and so stopped,
    /// before the mappings below go away.
    fillers: Mutex<Vec<Box<dyn RamFiller>>>,
    regions: Mutex<Vec<RamRegion>>,
    memory: SharedGuestMem,
}

impl GuestRam {
    /// Allocates `size` bytes of RAM laid out around the MMIO gap, all with `backing`.
    pub fn new(size: u64, backing: &RamBacking) -> Result<Self, MemoryError> {
        check_host_fits(size, backing)?;
        Self::laid_out(size, |slot, guest_addr, len, file_offset| {
            RamRegion::map(slot, guest_addr, len, backing, file_offset)
        })
    }

    /// RAM laid out as [`new`](Self::new) lays it out, each region a private mapping of `file`
    /// at consecutive offsets (a snapshot's memory file; see [`RamRegion::map_file_private`]).
    pub fn map_file_private(size: u64, file: &File) -> Result<Self, MemoryError> {
        Self::laid_out(size, |slot, guest_addr, len, file_offset| {
            RamRegion::map_file_private(slot, guest_addr, len, file, file_offset)
        })
    }

    /// `size` bytes around the MMIO gap, one region per range, each mapped by `map(slot,
    /// guest address, length, offset of the region in a file of all of RAM)`.
    fn laid_out(
        size: u64,
        mut map: impl FnMut(u32, u64, u64, u64) -> Result<RamRegion, MemoryError>,
    ) -> Result<Self, MemoryError> {
        if size < (1 << 20) || !size.is_multiple_of(4096) {
            return Err(MemoryError::BadSize(size));
        }
        let mut regions = Vec::new();
        let mut file_offset = 0;
        for (slot, (guest_addr, len)) in layout::ram_ranges(size).into_iter().enumerate() {
            regions.push(map(slot as u32, guest_addr, len, file_offset)?);
            file_offset += len;
        }
        let memory = GuestMemoryAtomic::new(collection(&regions)?);
        Ok(Self { fillers: Mutex::default(), regions: Mutex::new(regions), memory })
    }

    /// Asks for transparent huge pages on anonymous regions (best effort): filling most of RAM
    /// at once (an eager restore) then takes one fault per 2 MiB instead of one per 4 KiB, as
    /// QEMU's guest RAM always does. Not the default: a guest that touches little would cost
    /// 2 MiB per touch.
    pub fn advise_huge_pages(&self) {
        for region in self.lock().iter().filter(|r| r.backing == RamBacking::Anonymous && !r.contents_elsewhere) {
            // SAFETY: advice on our own mapping; it changes no contents.
            let ret = unsafe {
                libc::madvise(region.host_addr() as *mut libc::c_void, region.size() as usize, libc::MADV_HUGEPAGE)
            };
            if ret != 0 {
                log::debug!("no transparent huge pages for guest RAM: {}", std::io::Error::last_os_error());
            }
        }
    }

    /// Whether pages are still missing, to be filled on first touch: the mappings must stay
    /// (a memory swap would pull them from under the filler).
    pub fn still_filling(&self) -> bool {
        self.fillers.lock().unwrap_or_else(|p| p.into_inner()).iter().any(|f| f.filling())
    }

    /// Hands the RAM something that fills its pages on first touch (see `fillers`), and marks
    /// every region as holding more than its page tables show.
    pub fn attach_filler(&self, filler: Box<dyn RamFiller>) {
        self.lock().iter_mut().for_each(|r| r.contents_elsewhere = true);
        self.fillers.lock().unwrap_or_else(|p| p.into_inner()).push(filler);
    }

    fn lock(&self) -> MutexGuard<'_, Vec<RamRegion>> {
        self.regions.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn regions(&self) -> Vec<RegionInfo> {
        self.lock().iter().map(RamRegion::info).collect()
    }

    pub fn region(&self, slot: u32) -> Option<RegionInfo> {
        self.lock().iter().find(|r| r.slot == slot).map(RamRegion::info)
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.lock().iter().map(RamRegion::size).sum()
    }

    /// A handle on guest memory that follows region replacements.
    pub fn memory(&self) -> SharedGuestMem {
        self.memory.clone()
    }

    /// Where region `slot` may hold data (see [`RamRegion::populated_ranges`]).
    pub fn populated_ranges(&self, slot: u32) -> Result<Vec<(u64, u64)>, MemoryError> {
        self.lock()
            .iter()
            .find(|r| r.slot == slot)
            .map(RamRegion::populated_ranges)
            .ok_or(MemoryError::NoSuchRegion(slot))
    }

    /// The pages of region `slot` the VMM wrote (device DMA, used rings) since the last call,
    /// one bit per 4 KiB page like KVM's dirty log; reading clears them.
    pub fn take_vmm_dirty(&self, slot: u32) -> Result<Vec<u64>, MemoryError> {
        let regions = self.lock();
        let region = regions.iter().find(|r| r.slot == slot).ok_or(MemoryError::NoSuchRegion(slot))?;
        let mmap: &MmapRegion<DirtyBitmap> = &region.mapping;
        Ok(mmap.bitmap().get_and_reset())
    }

    /// Maps a replacement for region `slot` with `backing`, not yet in use.
    pub fn prepare_replacement(&self, slot: u32, backing: &RamBacking) -> Result<RamRegion, MemoryError> {
        let info = self.region(slot).ok_or(MemoryError::NoSuchRegion(slot))?;
        RamRegion::map(slot, info.guest_addr, info.size, backing, 0)
    }

    /// Puts `new` in place of the region with its slot and returns the old one. Whoever calls
    /// this has stopped everything that touches guest memory (vCPUs, device I/O); devices
    /// pick up the new mapping on their next access.
    pub fn install(&self, new: RamRegion) -> Result<RamRegion, MemoryError> {
        let mut regions = self.lock();
        let index = regions.iter().position(|r| r.slot == new.slot).ok_or(MemoryError::NoSuchRegion(new.slot))?;
        let old = std::mem::replace(&mut regions[index], new);
        match collection(&regions) {
            Ok(memory) => {
                self.memory.lock().unwrap_or_else(|p| p.into_inner()).replace(memory);
                Ok(old)
            }
            Err(e) => {
                regions[index] = old;
                Err(e)
            }
        }
    }
}

fn collection(regions: &[RamRegion]) -> Result<GuestMem, MemoryError> {
    GuestMem::from_arc_regions(regions.iter().map(|r| r.mapping.clone()).collect())
        .map_err(|e| MemoryError::Layout(e.to_string()))
}

/// Refuses anonymous or memfd RAM larger than the host's memory and swap together (pages come
/// on first touch, so nothing else would say so before the OOM killer), and warns when it is
/// larger than what is available now. A file backing is paged to its file; hugetlbfs has its
/// own check against the free huge pages.
fn check_host_fits(size: u64, backing: &RamBacking) -> Result<(), MemoryError> {
    if !matches!(backing, RamBacking::Anonymous | RamBacking::Memfd) {
        return Ok(());
    }
    let Some(info) = host_memory() else { return Ok(()) };
    if size > info.total + info.swap_total {
        return Err(MemoryError::HostTooSmall { wanted: size, host: info.total + info.swap_total });
    }
    if size > info.available + info.swap_free {
        log::warn!(
            "guest RAM of {} MiB is more than the {} MiB of memory and swap available now: the guest may be killed if it uses it all",
            size >> 20,
            (info.available + info.swap_free) >> 20
        );
    }
    Ok(())
}

/// The host's memory, from /proc/meminfo, in bytes.
struct HostMemory {
    total: u64,
    available: u64,
    swap_total: u64,
    swap_free: u64,
}

fn host_memory() -> Option<HostMemory> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name) && l[name.len()..].starts_with(':'))?;
        let kib: u64 = line[name.len() + 1..].trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kib << 10)
    };
    Some(HostMemory {
        total: field("MemTotal")?,
        available: field("MemAvailable")?,
        swap_total: field("SwapTotal").unwrap_or(0),
        swap_free: field("SwapFree").unwrap_or(0),
    })
}

/// Maps a region's backing; with a file backing, also the file's path if this call created it.
fn map_backing(
    backing: &RamBacking,
    size: u64,
    file_offset: u64,
) -> Result<(MmapRegion<DirtyBitmap>, Option<PathBuf>), MemoryError> {
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let mut created = None;
    let (file, flags) = match backing {
        RamBacking::Anonymous => (None, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE),
        RamBacking::Memfd => {
            let file = memfd(size, 0).map_err(MemoryError::Memfd)?;
            (Some(FileOffset::new(file, 0)), libc::MAP_SHARED | libc::MAP_NORESERVE)
        }
        RamBacking::Hugetlbfs => {
            let needed = size.div_ceil(HUGE_PAGE);
            let free = free_huge_pages();
            if free < needed {
                return Err(MemoryError::HugePages { needed, free });
            }
            let file = memfd(size.next_multiple_of(HUGE_PAGE), libc::MFD_HUGETLB).map_err(MemoryError::Memfd)?;
            (Some(FileOffset::new(file, 0)), libc::MAP_SHARED)
        }
        RamBacking::File { path } => {
            let file_err = |source| MemoryError::File { path: path.clone(), source };
            // Guest RAM is the guest's secrets: a file created for it is the owner's alone, and
            // goes with the region.
            let file = match OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).open(path) {
                Ok(file) => {
                    created = Some(path.clone());
                    file
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    OpenOptions::new().read(true).write(true).open(path).map_err(file_err)?
                }
                Err(e) => return Err(file_err(e)),
            };
            let len = file.metadata().map_err(file_err)?.len();
            // Guest RAM starts as zeros (and a swap skips copying zero chunks), so a file with
            // data in it would be overwritten: it may be a disk image, or back another region.
            // So is a file this VM's RAM used before (swapping back to it, restarting with it):
            // the user removes it, knowingly.
            if file_offset == 0 && len > 0 {
                return Err(MemoryError::FileNotEmpty { path: path.clone(), len });
            }
            let needed = file_offset + size;
            if len < needed {
                file.set_len(needed).map_err(file_err)?;
            }
            (Some(FileOffset::new(file, file_offset)), libc::MAP_SHARED)
        }
    };
    let mapped = MmapRegion::build(file, size as usize, prot, flags);
    let mapped = mapped.map_err(|source| MemoryError::Mmap { size, backing: backing.clone(), source });
    if mapped.is_err()
        && let Some(path) = &created
    {
        let _ = std::fs::remove_file(path);
    }
    Ok((mapped?, created))
}

/// Runs of pages of the mapping at `addr` that are present or swapped out, from
/// /proc/self/pagemap (bit 63 present, bit 62 swapped; readable without privileges).
fn resident_pages(addr: u64, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let pagemap = File::open("/proc/self/pagemap")?;
    match pagemap_scan(&pagemap, addr, size) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTTY | libc::EINVAL)) => pagemap_read(&pagemap, addr, size),
        found => found,
    }
}

/// The kernel's PAGEMAP_SCAN ioctl (Linux 6.7+): present or swapped pages as ranges, skipping
/// empty page tables wholesale and pages that only map the shared zero page.
fn pagemap_scan(pagemap: &File, addr: u64, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    #[derive(Default)]
    struct ScanArg {
        size: u64,
        flags: u64,
        start: u64,
        end: u64,
        walk_end: u64,
        vec: u64,
        vec_len: u64,
        max_pages: u64,
        category_inverted: u64,
        category_mask: u64,
        category_anyof_mask: u64,
        return_mask: u64,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct PageRegion {
        start: u64,
        end: u64,
        categories: u64,
    }
    const PAGE_IS_PRESENT: u64 = 1 << 3;
    const PAGE_IS_SWAPPED: u64 = 1 << 4;
    const PAGE_IS_PFNZERO: u64 = 1 << 5;
    // _IOWR('f', 16, struct pm_scan_arg)
    const PAGEMAP_SCAN: libc::c_ulong = 0xc000_0000 | ((size_of::<ScanArg>() as libc::c_ulong) << 16) | 0x6610;

    let end = addr + size;
    let mut regions = vec![PageRegion::default(); 1024];
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut start = addr;
    while start < end {
        let mut arg = ScanArg {
            size: size_of::<ScanArg>() as u64,
            start,
            end,
            vec: regions.as_mut_ptr() as u64,
            vec_len: regions.len() as u64,
            // Required: not the zero page. Wanted: present or swapped.
            category_inverted: PAGE_IS_PFNZERO,
            category_mask: PAGE_IS_PFNZERO,
            category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            ..Default::default()
        };
        // SAFETY: `arg` and the `regions` buffer it points to outlive the call; the kernel
        // writes at most `vec_len` regions and `walk_end`.
        let n = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN, &mut arg) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        for r in &regions[..n as usize] {
            let (offset, len) = (r.start - addr, r.end - r.start);
            match ranges.last_mut() {
                Some((s, l)) if *s + *l == offset => *l += len,
                _ => ranges.push((offset, len)),
            }
        }
        if arg.walk_end <= start {
            break;
        }
        start = arg.walk_end;
    }
    Ok(ranges)
}

/// The same from `/proc/self/pagemap` entries, for kernels without PAGEMAP_SCAN.
fn pagemap_read(pagemap: &File, addr: u64, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use std::os::unix::fs::FileExt;
    const PAGE: u64 = 4096;
    let pages = size / PAGE;
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut entries = vec![0u8; 8 * 4096];
    let mut page = 0;
    while page < pages {
        let n = (pages - page).min(4096);
        let buf = &mut entries[..(n * 8) as usize];
        pagemap.read_exact_at(buf, (addr / PAGE + page) * 8)?;
        for (i, entry) in buf.chunks_exact(8).enumerate() {
            let flags = u64::from_le_bytes(entry.try_into().unwrap_or_default());
            if flags & (3 << 62) != 0 {
                let offset = (page + i as u64) * PAGE;
                match ranges.last_mut() {
                    Some((start, len)) if *start + *len == offset => *len += PAGE,
                    _ => ranges.push((offset, PAGE)),
                }
            }
        }
        page += n;
    }
    Ok(ranges)
}

/// Data extents of `file` in `[start, start + size)`, relative to `start` (SEEK_DATA/SEEK_HOLE).
pub(crate) fn data_extents(file: &File, start: u64, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let end = start + size;
    let mut ranges = Vec::new();
    let mut pos = start;
    while pos < end {
        // SAFETY: lseek on a descriptor we own; errors are checked.
        let data = unsafe { libc::lseek(fd, pos as i64, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            // ENXIO: no data after `pos`.
            if e.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return Err(e);
        }
        let data = data as u64;
        if data >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as i64, libc::SEEK_HOLE) };
        let hole = if hole < 0 { end } else { (hole as u64).min(end) };
        ranges.push((data - start, hole - data));
        pos = hole;
    }
    Ok(ranges)
}

/// Free 2 MiB huge pages in the kernel's pool.
pub fn free_huge_pages() -> u64 {
    std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// An anonymous file for guest RAM.
fn memfd(size: u64, flags: libc::c_uint) -> std::io::Result<File> {
    // SAFETY: the name is a valid C string; the returned descriptor is checked.
    let fd = unsafe { libc::memfd_create(c"guest-ram".as_ptr(), libc::MFD_CLOEXEC | flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor we own.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)?;
    Ok(file)
}

#[cfg(test)]
mod host_tests {
    use super::*;

    #[test]
    fn a_ram_file_is_created_for_its_owner_only_whatever_the_umask() {
        let path = std::env::temp_dir().join(format!("ram-mode-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        // SAFETY: umask changes only this process's creation mask; restored below.
        let old = unsafe { libc::umask(0) };
        let ram = GuestRam::new(2 << 20, &RamBacking::File { path: path.clone() });
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let ram = ram.unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        drop(ram);
        assert!(!path.exists(), "a RAM file the VMM created goes with the VM");
        // One that was there (empty) before stays.
        std::fs::write(&path, b"").unwrap();
        drop(GuestRam::new(2 << 20, &RamBacking::File { path: path.clone() }).unwrap());
        assert!(path.exists(), "a file the user made stays");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn ram_larger_than_the_host_is_refused_and_a_file_backing_is_not_counted() {
        let host = host_memory().expect("/proc/meminfo");
        let too_much = (host.total + host.swap_total + (1 << 30)).next_multiple_of(1 << 20);
        let err = GuestRam::new(too_much, &RamBacking::Anonymous).err().expect("refused").to_string();
        assert!(err.contains("more than this host's"), "{err}");
        assert!(check_host_fits(too_much, &RamBacking::File { path: "/nonexistent".into() }).is_ok());
    }
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
            assert_eq!(ram.regions()[0].backing, backing);
            let mem = ram.memory();
            mem.memory().write_obj(0xdead_beef_u32, GuestAddress(0x1000)).unwrap();
            assert_eq!(mem.memory().read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 0xdead_beef);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_with_data_in_it_is_never_overwritten() {
        let dir = std::env::temp_dir().join(format!("vmm-ram-keep-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let precious = dir.join("disk.img");
        std::fs::write(&precious, b"someone's data").unwrap();
        let backing = RamBacking::File { path: precious.clone() };
        let err = GuestRam::new(4 << 20, &backing).err().expect("a non-empty file was accepted");
        assert!(matches!(err, MemoryError::FileNotEmpty { len: 14, .. }), "{err}");
        let ram = GuestRam::new(4 << 20, &RamBacking::Anonymous).unwrap();
        assert!(matches!(ram.prepare_replacement(0, &backing), Err(MemoryError::FileNotEmpty { .. })));
        assert_eq!(std::fs::read(&precious).unwrap(), b"someone's data");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[cfg(test)]
mod replace_tests {
    use vm_memory::{Bytes, GuestAddressSpace};

    use super::*;

    #[test]
    fn a_replacement_region_becomes_the_live_view() {
        let ram = GuestRam::new(8 << 20, &RamBacking::Anonymous).unwrap();
        let view = ram.memory();
        view.memory().write_obj(1u64, GuestAddress(0x1000)).unwrap();
        let new = ram.prepare_replacement(0, &RamBacking::Memfd).unwrap();
        assert_eq!((new.guest_addr(), new.size()), (0, 8 << 20));
        // Nothing copies contents here: that is the swap's job.
        let old = ram.install(new).unwrap();
        assert_eq!(old.backing, RamBacking::Anonymous);
        assert_eq!(ram.regions()[0].backing, RamBacking::Memfd);
        assert_eq!(
            view.memory().read_obj::<u64>(GuestAddress(0x1000)).unwrap(),
            0,
            "the old handle sees the new mapping"
        );
        assert!(matches!(ram.prepare_replacement(7, &RamBacking::Memfd), Err(MemoryError::NoSuchRegion(7))));
    }

    #[test]
    fn populated_ranges_follow_what_was_touched() {
        for backing in [RamBacking::Anonymous, RamBacking::Memfd] {
            let ram = GuestRam::new(64 << 20, &backing).unwrap();
            let mem = ram.memory();
            assert_eq!(ram.lock()[0].populated_ranges(), vec![], "{backing}: nothing touched yet");
            mem.memory().write_obj(1u8, GuestAddress(0x3000)).unwrap();
            mem.memory().write_obj(1u8, GuestAddress(0x4000)).unwrap();
            mem.memory().write_obj(1u8, GuestAddress(40 << 20)).unwrap();
            let ranges = ram.lock()[0].populated_ranges();
            let covered = |addr: u64| ranges.iter().any(|&(s, l)| (s..s + l).contains(&addr));
            assert!(covered(0x3000) && covered(0x4000) && covered(40 << 20), "{backing}: {ranges:?}");
            let total: u64 = ranges.iter().map(|r| r.1).sum();
            assert!(total < 8 << 20, "{backing}: only touched pages, not {total} bytes");
        }
    }

    #[test]
    fn pagemap_scan_agrees_with_pagemap_entries() {
        let ram = GuestRam::new(64 << 20, &RamBacking::Anonymous).unwrap();
        let mem = ram.memory();
        for addr in [0x1000, 0x2000, 0x9000, 33 << 20, (64 << 20) - 4096] {
            mem.memory().write_obj(7u8, GuestAddress(addr)).unwrap();
        }
        let (addr, size) = (ram.lock()[0].host_addr(), 64 << 20);
        let pagemap = File::open("/proc/self/pagemap").unwrap();
        let read = pagemap_read(&pagemap, addr, size).unwrap();
        match pagemap_scan(&pagemap, addr, size) {
            Ok(scanned) => assert_eq!(scanned, read),
            Err(e) => eprintln!("PAGEMAP_SCAN unavailable here ({e}); the fallback is in use"),
        }
        assert!(read.iter().any(|&(s, l)| (s..s + l).contains(&(33 << 20))), "{read:?}");
    }

    #[test]
    fn hugetlbfs_without_huge_pages_is_a_clear_error() {
        if free_huge_pages() >= 4 {
            return;
        }
        let Err(err) = GuestRam::new(8 << 20, &RamBacking::Hugetlbfs) else {
            panic!("hugetlbfs RAM without huge pages")
        };
        assert!(err.to_string().contains("vm.nr_hugepages"), "{err}");
    }
}
