//! A shared region: a sealed memfd holding a ring layout, mapped here, with a doorbell per
//! party.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use serde::{Deserialize, Serialize};
use swarm_ring::{Region, RegionLayout};
use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK, EventFd};

use crate::{FabricError, MAX_PARTIES, Result};

/// What a region is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionSpec {
    /// Its name, unique within a fabric server.
    pub name: String,
    /// Parties that attach to it (2 to [`MAX_PARTIES`]); each has a doorbell.
    pub parties: u16,
    /// Lanes in it.
    pub lanes: u32,
    /// Slots per lane (a power of two).
    pub slots: u32,
    /// Bytes per slot (a multiple of 8).
    pub slot_size: u32,
    /// Back it with huge pages (hugetlbfs must have free 2 MiB pages).
    #[serde(default)]
    pub hugetlb: bool,
}

impl RegionSpec {
    fn layout(&self) -> RegionLayout {
        RegionLayout { lanes: self.lanes, slots: self.slots, slot_size: self.slot_size }
    }

    /// The region's size: its lanes, rounded up to the page size it is backed with.
    pub fn size(&self) -> u64 {
        let page = if self.hugetlb { 2 << 20 } else { 4096 };
        (self.layout().bytes() as u64).next_multiple_of(page)
    }

    /// Checks the numbers.
    pub fn check(&self) -> Result<()> {
        let bad = |why: String| Err(FabricError::Spec { name: self.name.clone(), why });
        if self.name.is_empty() || self.name.len() > 64 || self.name.contains(['\0', '\n']) {
            return bad("a name is 1 to 64 characters, without NUL or newline".into());
        }
        if !(2..=MAX_PARTIES).contains(&self.parties) {
            return bad(format!("parties must be 2 to {MAX_PARTIES}, not {}", self.parties));
        }
        if let Err(e) = self.layout().check() {
            return bad(e.to_string());
        }
        if self.size() > 1 << 30 {
            return bad(format!("{} bytes is more than the 1 GiB a region may have", self.size()));
        }
        Ok(())
    }
}

/// A region created here: its memfd, its mapping in this process and its doorbells.
pub struct SharedRegion {
    spec: RegionSpec,
    memfd: OwnedFd,
    map: *mut u8,
    size: usize,
    doorbells: Vec<EventFd>,
}

// SAFETY: the mapping is shared memory used through `swarm_ring`'s atomic and volatile accesses;
// the pointer itself is never written after creation.
unsafe impl Send for SharedRegion {}
// SAFETY: as above.
unsafe impl Sync for SharedRegion {}

impl SharedRegion {
    /// Creates the memfd (sealed against resizing), maps it, writes the ring header and creates
    /// a doorbell per party.
    pub fn create(spec: RegionSpec) -> Result<Self> {
        spec.check()?;
        let size = spec.size();
        let name = CString::new(format!("swarm-{}", spec.name)).expect("checked: no NUL");
        let mut flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
        if spec.hugetlb {
            flags |= libc::MFD_HUGETLB | libc::MFD_HUGE_2MB;
        }
        // SAFETY: a valid C string; the result is checked.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
        if fd < 0 {
            return Err(FabricError::io(format!("memfd_create for region {:?}", spec.name), last_error()));
        }
        // SAFETY: a descriptor we just created and own.
        let memfd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: plain system calls on our descriptor.
        if unsafe { libc::ftruncate(memfd.as_raw_fd(), size as libc::off_t) } != 0 {
            return Err(FabricError::io(format!("sizing region {:?} to {size} bytes", spec.name), last_error()));
        }
        // Sealed, so no holder can shrink it under the others' mappings (a fault in each).
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: as above.
        if unsafe { libc::fcntl(memfd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(FabricError::io(format!("sealing region {:?}", spec.name), last_error()));
        }
        let map = map_shared(&memfd, size as usize)
            .map_err(|e| FabricError::io(format!("mapping region {:?}", spec.name), e))?;
        let doorbells = (0..spec.parties)
            .map(|_| EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| FabricError::io("creating doorbells", e))?;
        let region = Self { spec, memfd, map, size: size as usize, doorbells };
        // SAFETY: the mapping is page aligned, `size` bytes long, lives as long as `region`,
        // and nobody else has it yet.
        unsafe { Region::format(region.map, region.size, region.spec.layout()) }
            .map_err(|e| FabricError::Spec { name: region.spec.name.clone(), why: e.to_string() })?;
        Ok(region)
    }

    /// What it is.
    pub fn spec(&self) -> &RegionSpec {
        &self.spec
    }

    /// Its size in bytes.
    pub fn size(&self) -> u64 {
        self.size as u64
    }

    /// Its lanes, as mapped here.
    ///
    /// # Safety
    /// The lanes (and anything attached to them) must not be used after `self` is dropped: the
    /// returned value does not borrow it, so that a holder can keep both side by side.
    pub unsafe fn rings(&self) -> Region {
        // SAFETY: the mapping lives as long as `self`, which the caller outlives; `create`
        // formatted it.
        unsafe { Region::open(self.map, self.size) }.expect("formatted by create")
    }

    /// The memfd.
    pub fn memfd(&self) -> &OwnedFd {
        &self.memfd
    }

    /// Party `party`'s doorbell: it waits on it, the others signal it.
    pub fn doorbell(&self, party: u16) -> Option<&EventFd> {
        self.doorbells.get(usize::from(party))
    }

    /// Every doorbell, in party order.
    pub fn doorbells(&self) -> &[EventFd] {
        &self.doorbells
    }
}

impl Drop for SharedRegion {
    fn drop(&mut self) {
        // SAFETY: our own mapping, no longer used: every Region handed out borrows `self`
        // only through raw pointers the owner promised not to use after the drop.
        unsafe { libc::munmap(self.map as *mut libc::c_void, self.size) };
    }
}

/// Maps `len` bytes of `fd` shared, read-write.
pub(crate) fn map_shared(fd: &OwnedFd, len: usize) -> std::io::Result<*mut u8> {
    // SAFETY: a fresh mapping at an address the kernel picks; the result is checked.
    let map = unsafe {
        libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd.as_raw_fd(), 0)
    };
    if map == libc::MAP_FAILED {
        return Err(last_error());
    }
    Ok(map as *mut u8)
}

fn last_error() -> std::io::Error {
    std::io::Error::last_os_error()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(parties: u16) -> RegionSpec {
        RegionSpec { name: "t".into(), parties, lanes: 2, slots: 64, slot_size: 128, hugetlb: false }
    }

    #[test]
    fn a_region_is_sealed_formatted_and_has_a_doorbell_per_party() {
        let region = SharedRegion::create(spec(3)).unwrap();
        assert_eq!(region.size() % 4096, 0);
        assert_eq!(region.doorbells().len(), 3);
        // SAFETY: used while `region` lives.
        assert_eq!(unsafe { region.rings() }.layout().lanes, 2);
        // SAFETY: our own descriptor.
        let grown = unsafe { libc::ftruncate(region.memfd().as_raw_fd(), region.size() as i64 * 2) };
        assert_ne!(grown, 0, "the seal keeps the region's size");
    }

    #[test]
    fn bad_specs_are_refused_with_the_reason() {
        let err = |s: RegionSpec| SharedRegion::create(s).err().unwrap().to_string();
        assert!(err(spec(1)).contains("parties must be 2"));
        assert!(err(RegionSpec { slots: 3, ..spec(2) }).contains("power of two"));
        assert!(err(RegionSpec { name: String::new(), ..spec(2) }).contains("name"));
        assert!(err(RegionSpec { slots: 1 << 20, slot_size: 4096, ..spec(2) }).contains("1 GiB"));
    }
}
