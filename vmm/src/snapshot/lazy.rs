//! Lazy restore: the guest runs before its memory is read. Guest RAM starts empty and
//! registered with userfaultfd; a handler thread serves each first touch (by a vCPU, by KVM,
//! by a device) with that page from the newest snapshot layer that holds it, or with the zero
//! page (no I/O) where none does.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::SnapshotError;
use super::dirty::dirty_ranges;
use super::format::PAGE;
use super::restore::LoadedSnapshot;
use crate::memory::uffd::Userfault;
use crate::memory::{GuestRam, data_extents};

/// Where a page comes from: 0 for zeros, else 1 + the index of the layer holding it.
type Source = u16;

struct Region {
    host_addr: u64,
    size: u64,
    /// Per page.
    sources: Vec<Source>,
    /// Per layer: where this region starts in its memory file.
    file_offsets: Vec<u64>,
}

/// The running fault handler; stops when dropped.
pub struct LazyFiller {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Drop for LazyFiller {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What the handler calls if it cannot go on (a memory file that fails to read): the VM must
/// end, since the vCPU waiting for that page cannot continue correctly.
pub type OnFatal = Box<dyn Fn(String) + Send>;

/// Registers every region of `ram` (fresh, anonymous, untouched) and starts serving faults
/// from `snapshot`'s layers.
pub fn start(ram: &GuestRam, snapshot: &LoadedSnapshot, on_fatal: OnFatal) -> Result<LazyFiller, SnapshotError> {
    let uffd = Userfault::open().map_err(|e| SnapshotError::State(format!("userfaultfd: {e}")))?;
    let mut regions = Vec::new();
    for (index, region) in ram.regions().iter().enumerate() {
        let pages = region.size.div_ceil(PAGE as u64) as usize;
        let mut sources = vec![0 as Source; pages];
        for (layer_index, layer) in snapshot.layers.iter().enumerate() {
            let saved = &layer.regions[index];
            let source = (layer_index + 1) as Source;
            let ranges = match (layer_index, &saved.dirty) {
                (0, _) => data_extents(&layer.file, saved.file_offset, saved.size)
                    .map_err(|source| SnapshotError::Read { path: layer.path.clone(), source })?,
                (_, Some(dirty)) => dirty_ranges(dirty, PAGE as u64, saved.size),
                (_, None) => return Err(SnapshotError::State("a diff layer without its page map".into())),
            };
            for (start, len) in ranges {
                let first = (start / PAGE as u64) as usize;
                let last = (start + len).div_ceil(PAGE as u64) as usize;
                sources[first..last.min(pages)].fill(source);
            }
        }
        uffd.register(region.host_addr, region.size)
            .map_err(|e| SnapshotError::State(format!("userfaultfd register: {e}")))?;
        let file_offsets = snapshot.layers.iter().map(|l| l.regions[index].file_offset).collect();
        regions.push(Region { host_addr: region.host_addr, size: region.size, sources, file_offsets });
    }
    let files = snapshot
        .layers
        .iter()
        .map(|l| l.file.try_clone().map_err(|source| SnapshotError::Read { path: l.path.clone(), source }))
        .collect::<Result<Vec<_>, _>>()?;
    let stop = EventFd::new(EFD_NONBLOCK).map_err(|e| SnapshotError::State(format!("eventfd: {e}")))?;
    let stop_fd = stop.try_clone().map_err(|e| SnapshotError::State(format!("eventfd: {e}")))?;
    let thread = std::thread::Builder::new()
        .name("uffd".into())
        .spawn(move || {
            if let Err(e) = serve(&uffd, &regions, &files, &stop_fd) {
                log::error!("lazy restore: {e}");
                on_fatal(e);
                // Keep the descriptor open until told to stop: closing it would turn the
                // missing pages into zeros under a guest that may still be running.
                let _ = uffd.next_fault(stop_fd.as_raw_fd());
            }
        })
        .map_err(|e| SnapshotError::State(format!("fault handler thread: {e}")))?;
    Ok(LazyFiller { stop, thread: Some(thread) })
}

/// Serves faults until stopped; an error means a page could not be served.
fn serve(uffd: &Userfault, regions: &[Region], files: &[File], stop: &EventFd) -> Result<(), String> {
    let mut page = vec![0u8; PAGE];
    loop {
        let address = match uffd.next_fault(stop.as_raw_fd()) {
            Ok(Some(address)) => address & !(PAGE as u64 - 1),
            Ok(None) => return Ok(()),
            Err(e) => return Err(format!("reading page faults failed: {e}")),
        };
        let Some(region) = regions.iter().find(|r| (r.host_addr..r.host_addr + r.size).contains(&address)) else {
            return Err(format!("a fault at {address:#x}, outside guest RAM"));
        };
        let index = ((address - region.host_addr) / PAGE as u64) as usize;
        let served = match region.sources[index] {
            0 => uffd.zero(address, PAGE as u64),
            source => {
                let layer = usize::from(source - 1);
                let offset = region.file_offsets[layer] + (address - region.host_addr);
                files[layer].read_exact_at(&mut page, offset).and_then(|()| uffd.copy(address, &page))
            }
        };
        served.map_err(|e| format!("cannot fill the page at {address:#x}: {e}"))?;
    }
}
