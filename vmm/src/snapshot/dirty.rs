//! Which guest pages changed since the last snapshot: KVM's dirty log (what the guest wrote)
//! merged with the VMM's own bitmap (what devices wrote into guest memory: a disk read lands
//! in RAM without the guest writing it). A diff snapshot holds exactly these pages.
//!
//! Tracking starts with the first snapshot (KVM's log is turned on then, so a VM nobody
//! snapshots pays nothing for it) and is read, and cleared, by every snapshot after it. Anything
//! that breaks the chain (a memory swap re-creates the slot without the log; a snapshot that
//! failed after reading the log) forgets the parent, and the next diff is refused until a full
//! snapshot starts a new chain.

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::hv::{HvError, KvmVm, MemSlot};
use crate::memory::{GuestRam, MemoryError};

/// The snapshot a diff builds on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentRef {
    /// Its [`VmSnapshot::id`](super::VmSnapshot::id), checked against the parent found at `path`.
    pub id: u64,
    /// Its directory, absolute.
    pub path: PathBuf,
}

/// Why the pages written since the last snapshot could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// KVM could not turn its dirty log on or return it.
    #[error(transparent)]
    Kvm(#[from] HvError),
    /// The VMM's own dirty bitmap of a RAM region could not be read.
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

#[derive(Default)]
struct Tracking {
    /// KVM's log is on for every slot.
    logging: bool,
    /// The last snapshot, while the log has run unbroken since it.
    parent: Option<ParentRef>,
}

/// One VM's dirty tracking.
#[derive(Default)]
pub struct DirtyTracker {
    state: Mutex<Tracking>,
}

impl DirtyTracker {
    fn lock(&self) -> MutexGuard<'_, Tracking> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The snapshot a diff taken now would build on.
    pub fn parent(&self) -> Option<ParentRef> {
        self.lock().parent.clone()
    }

    /// The chain is broken (see the module docs): the next diff is refused.
    pub fn forget(&self, logging_still_on: bool) {
        let mut state = self.lock();
        state.parent = None;
        state.logging &= logging_still_on;
    }

    /// A snapshot was written; the next diff builds on it.
    pub fn completed(&self, parent: ParentRef) {
        self.lock().parent = Some(parent);
    }

    /// Reads and clears, per RAM region in order, the pages written since the last call: the
    /// guest's (KVM) and the VMM's. Turns KVM's log on first if it is off (the result is then
    /// meaningless and the caller must take a full snapshot). Call with the VM quiesced.
    pub fn take(&self, ram: &GuestRam, kvm: &KvmVm) -> Result<Vec<Vec<u64>>, DirtyError> {
        let mut state = self.lock();
        let mut out = Vec::new();
        for region in ram.regions() {
            let mut dirty = ram.take_vmm_dirty(region.slot)?;
            if state.logging {
                let guest = kvm.take_dirty_log(region.slot, region.size)?;
                dirty.resize(dirty.len().max(guest.len()), 0);
                for (word, g) in dirty.iter_mut().zip(guest) {
                    *word |= g;
                }
            } else {
                let slot = MemSlot {
                    slot: region.slot,
                    guest_addr: region.guest_addr,
                    size: region.size,
                    host_addr: region.host_addr,
                };
                // SAFETY: the slot describes the mapping GuestRam owns and KVM uses now.
                unsafe { kvm.set_dirty_logging(&slot, true)? };
            }
            out.push(dirty);
        }
        state.logging = true;
        Ok(out)
    }
}

/// Runs of set bits in a page bitmap, as byte ranges `(start, len)`, clipped to `size`.
pub fn dirty_ranges(bitmap: &[u64], page: u64, size: u64) -> Vec<(u64, u64)> {
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for (w, &word) in bitmap.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            let bit = bits.trailing_zeros() as u64;
            bits &= bits - 1;
            let start = (w as u64 * 64 + bit) * page;
            if start >= size {
                break;
            }
            let len = page.min(size - start);
            match ranges.last_mut() {
                Some((s, l)) if *s + *l == start => *l += len,
                _ => ranges.push((start, len)),
            }
        }
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_ranges_merge_adjacent_pages_and_clip() {
        assert_eq!(dirty_ranges(&[], 4096, 1 << 20), vec![]);
        // Pages 0, 1, 3 and 63, then page 64 in the next word (adjacent to 63).
        let bitmap = [0b1011 | 1 << 63, 1];
        assert_eq!(dirty_ranges(&bitmap, 4096, 1 << 30), vec![(0, 8192), (3 * 4096, 4096), (63 * 4096, 8192)]);
        // A size that ends inside page 64 clips it.
        assert_eq!(dirty_ranges(&[0, 1], 4096, 64 * 4096 + 100), vec![(64 * 4096, 100)]);
        assert_eq!(dirty_ranges(&[0, 2], 4096, 64 * 4096 + 100), vec![]);
    }
}
