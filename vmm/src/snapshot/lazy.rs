//! Lazy restore: the guest runs before its memory is read. Guest RAM starts empty and
//! registered with userfaultfd; a handler thread serves each first touch (by a vCPU, by KVM,
//! by a device) with the pages around it from the newest snapshot layer that holds them, or
//! with zero pages (no I/O) where none does. Between faults it fills the rest in the
//! background, so the guest soon stops faulting at all.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::SnapshotError;
use super::dirty::dirty_ranges;
use super::format::PAGE;
use super::restore::LoadedSnapshot;
use crate::memory::uffd::{Userfault, Wait};
use crate::memory::{GuestRam, RamFiller, data_extents};

/// Where a page comes from: 0 for zeros, else 1 + the index of the layer holding it.
type Source = u16;

struct Region {
    host_addr: u64,
    size: u64,
    /// Per page.
    sources: Vec<Source>,
    /// Per page: filled by us (only we fill pages: every first touch comes to us).
    filled: Vec<bool>,
    /// Per layer: where this region starts in its memory file.
    file_offsets: Vec<u64>,
}

/// Pages filled per fault, around the faulting one (one I/O and one ioctl for the lot): the
/// guest usually touches its neighbours next.
const FAULT_CHUNK: usize = 256;
/// Pages filled per background step, between looks at the fault queue.
const PREFETCH_CHUNK: usize = 512;

/// The running fault handler; stops when dropped.
pub struct LazyFiller {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
    /// Every page has been filled.
    complete: Arc<AtomicBool>,
}

impl RamFiller for LazyFiller {
    fn filling(&self) -> bool {
        !self.complete.load(Ordering::Acquire)
    }
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
        let filled = vec![false; pages];
        regions.push(Region { host_addr: region.host_addr, size: region.size, sources, filled, file_offsets });
    }
    let files = snapshot
        .layers
        .iter()
        .map(|l| l.file.try_clone().map_err(|source| SnapshotError::Read { path: l.path.clone(), source }))
        .collect::<Result<Vec<_>, _>>()?;
    let stop = EventFd::new(EFD_NONBLOCK).map_err(|e| SnapshotError::State(format!("eventfd: {e}")))?;
    let stop_fd = stop.try_clone().map_err(|e| SnapshotError::State(format!("eventfd: {e}")))?;
    let complete = Arc::new(AtomicBool::new(false));
    let done = complete.clone();
    let thread = std::thread::Builder::new()
        .name("uffd".into())
        .spawn(move || {
            if let Err(e) = serve(&uffd, &mut regions, &files, &stop_fd, &done) {
                log::error!("lazy restore: {e}");
                on_fatal(e);
                release(&uffd, &stop_fd);
            }
        })
        .map_err(|e| SnapshotError::State(format!("fault handler thread: {e}")))?;
    Ok(LazyFiller { stop, thread: Some(thread), complete })
}

/// After a page could not be served the VM has been ended (`on_fatal`), but threads may be
/// waiting on missing pages, some where no signal reaches them (KVM reading guest memory):
/// they get zero pages until the VM is gone, so that they can see the VM stop and leave. The
/// descriptor stays open meanwhile: closing it would let the guest itself, if it still ran,
/// read zeros for every page not yet filled.
fn release(uffd: &Userfault, stop: &EventFd) {
    while let Ok(Wait::Fault(address)) = uffd.next_fault(stop.as_raw_fd(), -1) {
        let _ = uffd.zero(address & !(PAGE as u64 - 1), PAGE as u64);
    }
}

/// Serves faults, and fills the rest between them, until stopped; an error means a page could
/// not be served.
fn serve(
    uffd: &Userfault,
    regions: &mut [Region],
    files: &[File],
    stop: &EventFd,
    complete: &AtomicBool,
) -> Result<(), String> {
    let mut buffer = vec![0u8; PREFETCH_CHUNK * PAGE];
    // The background fill's position: (region, page).
    let mut cursor = (0usize, 0usize);
    loop {
        let done = cursor.0 >= regions.len();
        if done {
            complete.store(true, Ordering::Release);
        }
        let address = match uffd.next_fault(stop.as_raw_fd(), if done { -1 } else { 0 }) {
            Ok(Wait::Fault(address)) => address & !(PAGE as u64 - 1),
            Ok(Wait::Stop) => return Ok(()),
            Ok(Wait::Idle) => {
                let (r, page) = cursor;
                let end = (page + PREFETCH_CHUNK).min(regions[r].sources.len());
                fill(uffd, &mut regions[r], files, page..end, &mut buffer)?;
                cursor = if end == regions[r].sources.len() { (r + 1, 0) } else { (r, end) };
                continue;
            }
            Err(e) => return Err(format!("reading page faults failed: {e}")),
        };
        let Some(region) = regions.iter_mut().find(|r| (r.host_addr..r.host_addr + r.size).contains(&address)) else {
            return Err(format!("a fault at {address:#x}, outside guest RAM"));
        };
        let page = ((address - region.host_addr) / PAGE as u64) as usize;
        if region.filled[page] {
            // Filled, yet missing: should not happen (every first touch comes here), but the
            // thread waiting on it must not wait for ever. Fill it again.
            region.filled[page] = false;
        }
        let first = page - page % FAULT_CHUNK;
        let end = (first + FAULT_CHUNK).min(region.sources.len());
        fill(uffd, region, files, first..end, &mut buffer)?;
    }
}

/// Fills the pages of `pages` not filled yet, a run of pages from one source at a time.
fn fill(
    uffd: &Userfault,
    region: &mut Region,
    files: &[File],
    pages: std::ops::Range<usize>,
    buffer: &mut [u8],
) -> Result<(), String> {
    let mut page = pages.start;
    while page < pages.end {
        if region.filled[page] {
            page += 1;
            continue;
        }
        let source = region.sources[page];
        let mut end = page + 1;
        while end < pages.end && !region.filled[end] && region.sources[end] == source {
            end += 1;
        }
        let address = region.host_addr + (page * PAGE) as u64;
        let len = (end - page) * PAGE;
        let served = match source {
            0 => uffd.zero(address, len as u64),
            source => {
                let layer = usize::from(source - 1);
                let offset = region.file_offsets[layer] + (page * PAGE) as u64;
                let bytes = &mut buffer[..len];
                files[layer].read_exact_at(bytes, offset).and_then(|()| uffd.copy(address, bytes))
            }
        };
        served.map_err(|e| format!("cannot fill {len} bytes at {address:#x}: {e}"))?;
        region.filled[page..end].fill(true);
        page = end;
    }
    Ok(())
}
