//! Replacing the backing of a guest RAM region while the VM runs: map the new backing, stop
//! everything that touches guest memory (device I/O drained, vCPUs paused), copy, point the
//! KVM memory slot and the devices' view at the new mapping, resume.
//!
//! Contents are copied rather than remapped: no system call moves pages between an anonymous
//! mapping, a memfd, a file and hugetlbfs. Chunks that are all zeros are not written, so a
//! lightly used region costs little more than reading it.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::device_manager::DeviceManager;
use crate::hv::{HvError, KvmVm, MemSlot};
use crate::memory::{GuestRam, MemoryError, RamBacking, RamRegion, RegionInfo};
use crate::quiesce::{QuiesceError, Quiesced};
use crate::vcpu::{ControlError, Vcpus};

const COPY_CHUNK: usize = 2 << 20;

/// A request to move a guest RAM region to another backing.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemorySwapRequest {
    /// The new backing; it must differ from the region's current one.
    pub backing: RamBacking,
    /// Compare old and new contents before resuming (doubles the pause).
    #[serde(default)]
    pub verify: bool,
    /// How long to wait for device requests in flight before pausing, in milliseconds
    /// (1 to [`MAX_DRAIN_MS`](super::MAX_DRAIN_MS); 2000 by default).
    #[serde(default = "default_drain_ms")]
    pub drain_timeout_ms: u64,
}

fn default_drain_ms() -> u64 {
    2000
}

/// What a memory swap did and cost; times are in microseconds.
#[derive(Clone, Debug, Serialize)]
pub struct MemorySwapReport {
    /// The KVM memory slot of the region swapped.
    pub slot: u32,
    /// The region's backing before.
    pub from: RamBacking,
    /// The region's backing now.
    pub to: RamBacking,
    /// Size of the region in bytes.
    pub bytes: u64,
    /// Bytes written into the new backing (all-zero chunks are skipped).
    pub bytes_copied: u64,
    /// Time the vCPUs were paused.
    pub pause_us: u64,
    /// Time to copy the contents (and compare them, with `verify`), within the pause.
    pub copy_us: u64,
    /// Time to point the KVM memory slot and the devices at the new mapping.
    pub memslot_us: u64,
    /// Time to stop device I/O before the pause.
    pub devices_quiesce_us: u64,
    /// Whether the copy was compared with the original (the request's `verify`).
    pub verified: bool,
    /// The pause divided by the region's size in GiB, in microseconds per GiB.
    pub pause_us_per_gib: u64,
}

/// Why a memory swap failed; in every case the region keeps its old backing.
#[derive(Debug, thiserror::Error)]
pub enum MemorySwapError {
    /// A field of the [`MemorySwapRequest`] is invalid.
    #[error("invalid memory swap request: {0}")]
    Invalid(#[from] crate::config::json::FieldError),
    /// No region has this slot, or the new backing cannot be mapped or installed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The VM was restored with lazily filled RAM that is not all filled yet.
    #[error(
        "guest RAM is still being filled from the snapshot it was restored from (--memory uffd); swap once that is done"
    )]
    StillFilling,
    /// The VM is replicating to a shadow, which tracks the region's pages by its dirty log.
    #[error("the VM is replicating to a shadow; stop replication first")]
    Replicating,
    /// The region already has the requested backing.
    #[error("region {slot} already uses {backing}")]
    Same {
        /// The region's KVM memory slot.
        slot: u32,
        /// Its current backing.
        backing: RamBacking,
    },
    /// A device did not finish its requests in flight in time.
    #[error("device {device} still has {pending} request(s) in flight after {timeout_ms} ms; nothing changed")]
    Drain {
        /// The device's id.
        device: String,
        /// Requests still in flight when the wait ended.
        pending: usize,
        /// How long it was waited for, in milliseconds.
        timeout_ms: u64,
    },
    /// The vCPUs could not be paused (or the VM has stopped).
    #[error(transparent)]
    Pause(#[from] ControlError),
    /// KVM refused to remove the memory slot or to map it to the new backing.
    #[error("cannot replace memory slot {slot}: {source}; nothing changed")]
    Kvm {
        /// The region's KVM memory slot.
        slot: u32,
        /// The KVM error.
        #[source]
        source: HvError,
    },
    /// With `verify`, the copy differs from the original.
    #[error("the copy of region {slot} differs at offset {offset:#x}; nothing changed")]
    Mismatch {
        /// The region's KVM memory slot.
        slot: u32,
        /// Byte offset in the region of the first chunk that differs.
        offset: u64,
    },
}

/// What [`MemorySwap::replace`] did.
struct Replaced {
    bytes_copied: u64,
    copy_us: u64,
    memslot_us: u64,
    /// The old mapping, to unmap once the guest runs again.
    old: RamRegion,
}

/// The pieces of a running VM a memory swap touches.
pub struct MemorySwap<'a> {
    pub ram: &'a GuestRam,
    pub kvm: &'a KvmVm,
    pub vcpus: &'a Vcpus,
    pub devices: &'a DeviceManager,
    /// False when the guest was already paused and must stay so.
    pub resume_vcpus: bool,
}

impl MemorySwap<'_> {
    /// Moves RAM region `slot` to `request.backing`: maps and prefaults the new backing while
    /// the guest runs, then quiesces devices and vCPUs for the copy and the memory slot switch.
    pub fn run(&self, slot: u32, request: &MemorySwapRequest) -> Result<MemorySwapReport, MemorySwapError> {
        super::check_ms("drain_timeout_ms", request.drain_timeout_ms, super::MAX_DRAIN_MS)?;
        if self.ram.still_filling() {
            return Err(MemorySwapError::StillFilling);
        }
        let old = self.ram.region(slot).ok_or(MemoryError::NoSuchRegion(slot))?;
        if old.backing == request.backing {
            return Err(MemorySwapError::Same { slot, backing: old.backing });
        }
        // Mapping the new backing (and failing on it) happens before anything stops.
        let new = self.ram.prepare_replacement(slot, &request.backing)?;
        // What is in use now will very likely still be when the guest is paused: fault those
        // pages of the new backing in beforehand, while the guest runs.
        new.prefault(&self.ram.populated_ranges(slot)?);

        // Devices writing guest memory during the copy would write into the old mapping.
        let drain = Duration::from_millis(request.drain_timeout_ms);
        let quiesced = Quiesced::new(self.vcpus, self.devices, drain, self.resume_vcpus).map_err(|e| match e {
            QuiesceError::Drain { device, pending, timeout_ms } => {
                MemorySwapError::Drain { device, pending, timeout_ms }
            }
            QuiesceError::Pause(e) => MemorySwapError::Pause(e),
        })?;
        let devices_quiesce_us = quiesced.devices_quiesce.as_micros() as u64;
        // Only now: a page the guest or a device touched before the pause must be copied.
        let result = self
            .ram
            .populated_ranges(slot)
            .map_err(MemorySwapError::from)
            .and_then(|populated| self.replace(&old, new, &populated, request.verify));
        let pause_us = quiesced.paused_for().as_micros() as u64;
        drop(quiesced);
        let Replaced { bytes_copied, copy_us, memslot_us, old: old_mapping } = result?;
        drop(old_mapping);
        Ok(MemorySwapReport {
            slot,
            from: old.backing,
            to: request.backing.clone(),
            bytes: old.size,
            bytes_copied,
            pause_us,
            copy_us,
            memslot_us,
            devices_quiesce_us,
            verified: request.verify,
            pause_us_per_gib: (pause_us as f64 / (old.size as f64 / (1u64 << 30) as f64)) as u64,
        })
    }

    /// With everything stopped: copy, swap the memory slot and the devices' view.
    fn replace(
        &self,
        old: &RegionInfo,
        new: RamRegion,
        populated: &[(u64, u64)],
        verify: bool,
    ) -> Result<Replaced, MemorySwapError> {
        let slot = old.slot;
        let started = Instant::now();
        // SAFETY: both mappings are `old.size` bytes, alive (the old one until `install`
        // drops it below), and nothing else touches guest memory while the VM is stopped.
        let (src, dst) = unsafe {
            (
                std::slice::from_raw_parts(old.host_addr as *const u8, old.size as usize),
                std::slice::from_raw_parts_mut(new.host_addr() as *mut u8, old.size as usize),
            )
        };
        let copied = copy_nonzero(src, dst, populated);
        if verify && let Some(offset) = first_difference(src, dst, populated) {
            return Err(MemorySwapError::Mismatch { slot, offset });
        }
        let copy_us = started.elapsed().as_micros() as u64;
        let memslot_started = Instant::now();
        let kvm_err = |source| MemorySwapError::Kvm { slot, source };
        self.kvm.remove_memslot(slot).map_err(kvm_err)?;
        let new_slot = MemSlot { slot, guest_addr: old.guest_addr, size: old.size, host_addr: new.host_addr() };
        // SAFETY: the new mapping is owned by GuestRam from `install` on, for the VM's life.
        let back = MemSlot { slot, guest_addr: old.guest_addr, size: old.size, host_addr: old.host_addr };
        let restore = || {
            // SAFETY: the old mapping is still installed in GuestRam.
            if let Err(e) = unsafe { self.kvm.set_memslot(&back) } {
                log::error!("memory slot {slot}: cannot put the old backing back in KVM: {e}");
            }
        };
        if let Err(source) = unsafe { self.kvm.set_memslot(&new_slot) } {
            restore();
            return Err(kvm_err(source));
        }
        // The old mapping goes back to the caller: unmapping it frees every page it held,
        // which takes long enough to belong after the guest resumes.
        let replaced = self.ram.install(new).inspect_err(|_| {
            // The new mapping is gone with the error: KVM must not keep pointing at it. The
            // guest is still paused, so nothing touched it meanwhile.
            let _ = self.kvm.remove_memslot(slot);
            restore();
        })?;
        let memslot_us = memslot_started.elapsed().as_micros() as u64;
        Ok(Replaced { bytes_copied: copied, copy_us, memslot_us, old: replaced })
    }
}

/// Copies the `populated` ranges of `src` into the zero-filled `dst` on every core, skipping
/// chunks that are all zeros anyway (the rest of `src` is known to be zeros).
fn copy_nonzero(src: &[u8], dst: &mut [u8], populated: &[(u64, u64)]) -> u64 {
    // Work items: chunk-sized pieces of the populated ranges.
    let mut pieces: Vec<(usize, usize)> = Vec::new();
    for &(start, len) in populated {
        let (mut at, end) = (start as usize, ((start + len) as usize).min(src.len()));
        while at < end {
            let n = (end - at).min(COPY_CHUNK);
            pieces.push((at, n));
            at += n;
        }
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
    let per_thread = pieces.len().div_ceil(threads).max(1);
    let dst_addr = dst.as_mut_ptr() as usize;
    std::thread::scope(|scope| {
        let workers: Vec<_> = pieces
            .chunks(per_thread)
            .map(|work| {
                scope.spawn(move || {
                    let mut copied = 0u64;
                    for &(at, n) in work {
                        let piece = &src[at..at + n];
                        if !is_zero(piece) {
                            // SAFETY: pieces never overlap, so each byte of `dst` is written by
                            // one thread; `dst` outlives the scope.
                            unsafe { std::ptr::copy_nonoverlapping(piece.as_ptr(), (dst_addr + at) as *mut u8, n) };
                            copied += n as u64;
                        }
                    }
                    copied
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap_or(0)).sum()
    })
}

fn is_zero(bytes: &[u8]) -> bool {
    // SAFETY: reinterpreting bytes as u128 words; align_to handles the unaligned ends.
    let (head, words, tail) = unsafe { bytes.align_to::<u128>() };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// The start of the first chunk where `a` and `b` differ within `ranges`. Outside them `a` is
/// known to be zeros and `b`, a fresh mapping, is too; reading there would only fault pages in.
fn first_difference(a: &[u8], b: &[u8], ranges: &[(u64, u64)]) -> Option<u64> {
    ranges.iter().find_map(|&(start, len)| {
        let (start, end) = (start as usize, ((start + len) as usize).min(a.len()));
        let (a, b) = (&a[start..end], &b[start..end]);
        a.chunks(COPY_CHUNK)
            .zip(b.chunks(COPY_CHUNK))
            .position(|(x, y)| x != y)
            .map(|chunk| (start + chunk * COPY_CHUNK) as u64)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_only_nonzero_chunks_and_finds_differences() {
        let mut src = vec![0u8; 9 * COPY_CHUNK + 123];
        src[3 * COPY_CHUNK + 7] = 1;
        src[9 * COPY_CHUNK + 100] = 2;
        let mut dst = vec![0u8; src.len()];
        let all = [(0, src.len() as u64)];
        let copied = copy_nonzero(&src, &mut dst, &all);
        assert_eq!(copied, (COPY_CHUNK + 123) as u64);
        assert_eq!(src, dst);
        assert_eq!(first_difference(&src, &dst, &all), None);
        dst[5 * COPY_CHUNK] = 9;
        assert_eq!(first_difference(&src, &dst, &all), Some((5 * COPY_CHUNK) as u64));
        assert_eq!(first_difference(&src, &dst, &[(0, 4096), (5 * COPY_CHUNK as u64 + 4096, 4096)]), None);
        // Only the populated ranges are looked at.
        let mut partial = vec![0u8; src.len()];
        copy_nonzero(&src, &mut partial, &[(3 * COPY_CHUNK as u64, 4096)]);
        assert_eq!(partial[3 * COPY_CHUNK + 7], 1);
        assert_eq!(partial[9 * COPY_CHUNK + 100], 0);
        assert!(is_zero(&[0u8; 37]));
        assert!(!is_zero(&[0, 0, 0, 1]));
    }
}
