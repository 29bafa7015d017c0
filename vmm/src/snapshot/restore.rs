//! The pieces of a restore the builder composes: the snapshot chain (a diff names its parent,
//! back to a full snapshot), guest RAM from the memory files, and the virtio devices' state.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::dirty::dirty_ranges;
use super::format::{self, FormatError};
use super::{MemoryMode, OnFatal, RegionSnapshot, SnapshotError, SnapshotKind, VmSnapshot};
use crate::device_manager::DeviceEntry;
use crate::memory::{GuestRam, RamBacking, data_extents};

/// Longest diff chain followed (a loop of parents must end somewhere).
const MAX_CHAIN: usize = 1024;

/// A snapshot ready to restore: the newest state, and the memory layers from the full
/// snapshot up to it.
pub struct LoadedSnapshot {
    pub state: VmSnapshot,
    /// Base (full) first, then each diff in order.
    pub layers: Vec<MemoryLayer>,
}

pub struct MemoryLayer {
    pub path: PathBuf,
    pub file: File,
    pub regions: Vec<RegionSnapshot>,
}

/// Loads the snapshot in `dir` and, for a diff, its parents back to a full snapshot; every
/// file is checked (see [`format`]) and every parent must be the one the child names.
pub fn load(dir: &Path) -> Result<LoadedSnapshot, SnapshotError> {
    let (state, newest) = load_one(dir)?;
    let mut seen = std::collections::HashSet::from([state.id]);
    let mut layers = vec![newest];
    let (mut kind, mut parent) = (state.kind, state.parent.clone());
    let mut child_dir = dir.to_path_buf();
    while kind == SnapshotKind::Diff {
        let chain = |reason: String| SnapshotError::from(RestoreError::Chain { path: child_dir.clone(), reason });
        let Some(wanted) = parent else {
            return Err(chain("a diff without a parent".into()));
        };
        if layers.len() >= MAX_CHAIN {
            return Err(chain(format!("more than {MAX_CHAIN} links")));
        }
        if !seen.insert(wanted.id) {
            return Err(chain(format!("its parents loop back to snapshot {:016x}", wanted.id)));
        }
        let (older, layer) = load_one(&wanted.path)?;
        if older.id != wanted.id {
            return Err(chain(format!(
                "its parent {} holds snapshot {:016x}, not {:016x} (was it replaced?)",
                wanted.path.display(),
                older.id,
                wanted.id
            )));
        }
        if older.config.mem_mib != state.config.mem_mib {
            return Err(chain(format!("its parent {} has another RAM size", wanted.path.display())));
        }
        layers.push(layer);
        (kind, parent, child_dir) = (older.kind, older.parent, wanted.path);
    }
    layers.reverse();
    Ok(LoadedSnapshot { state, layers })
}

fn load_one(dir: &Path) -> Result<(VmSnapshot, MemoryLayer), SnapshotError> {
    let snapshot: VmSnapshot = format::read_state(&dir.join(format::STATE_FILE))?;
    let path = dir.join(format::MEMORY_FILE);
    check_regions(&path, &snapshot)?;
    let read_err = |source| SnapshotError::Read { path: path.clone(), source };
    let file = File::open(&path).map_err(read_err)?;
    let len = file.metadata().map_err(read_err)?.len();
    // Checked in check_regions: no sum overflows.
    let needed = snapshot.regions.iter().map(|r| r.file_offset + r.size).max().unwrap_or(0);
    if len < needed {
        let what = format!("{len} bytes, the state describes {needed} bytes of guest RAM");
        return Err(FormatError::Truncated { path, what }.into());
    }
    let layer = MemoryLayer { path, file, regions: snapshot.regions.clone() };
    Ok((snapshot, layer))
}

/// What a state file says of its memory must hold together before anything relies on it:
/// sizes that fit in a file, a page map of the right length on every region of a diff and on
/// none of a full snapshot, a parent for a diff only.
fn check_regions(path: &Path, snapshot: &VmSnapshot) -> Result<(), SnapshotError> {
    let bad = |what: String| SnapshotError::from(FormatError::Decode { path: path.to_path_buf(), reason: what });
    let diff = snapshot.kind == SnapshotKind::Diff;
    if diff != snapshot.parent.is_some() {
        return Err(bad(format!("a {:?} snapshot {} a parent", snapshot.kind, if diff { "without" } else { "with" })));
    }
    for region in &snapshot.regions {
        if region.file_offset.checked_add(region.size).is_none() || region.size % format::PAGE as u64 != 0 {
            return Err(bad(format!(
                "region {} has offset {} and size {}",
                region.slot, region.file_offset, region.size
            )));
        }
        let words = (region.size / format::PAGE as u64).div_ceil(64) as usize;
        match (&region.dirty, diff) {
            (None, false) => {}
            (Some(map), true) if map.len() == words => {}
            (map, _) => {
                let found = map.as_ref().map_or("none".to_string(), |m| format!("{} words", m.len()));
                let wanted = if diff { format!("{words} words") } else { "none".into() };
                return Err(bad(format!("region {}'s page map has {found}, expected {wanted}", region.slot)));
            }
        }
    }
    Ok(())
}

/// Why a snapshot cannot be continued on the machine rebuilt from it.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// A memory file's regions differ from the RAM regions this vmm lays out for the saved size.
    #[error("the snapshot's RAM layout does not match this vmm's for {mem_mib} MiB: {detail}")]
    Layout {
        /// The saved guest RAM size, in MiB.
        mem_mib: u64,
        /// The regions the snapshot describes.
        detail: String,
    },
    /// The snapshot holds state for another number of devices than its configuration builds.
    #[error("the snapshot has {found} devices, the configuration it carries builds {expected}")]
    DeviceCount {
        /// Devices built from the configuration.
        expected: usize,
        /// Device states in the snapshot.
        found: usize,
    },
    /// The devices' states are not in the order the configuration builds the devices.
    #[error("device {expected:?} comes next, the snapshot's next device is {found:?}")]
    DeviceOrder {
        /// The id of the device built next.
        expected: String,
        /// The id on the snapshot's next device state.
        found: String,
    },
    /// A device refused its saved state.
    #[error("device {device}: {reason}")]
    Device {
        /// The device's id.
        device: String,
        /// Why the device refused it.
        reason: String,
    },
    /// Reading guest RAM from a memory file failed.
    #[error("cannot read guest RAM from {path}: {source}")]
    Read {
        /// The memory file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A diff's chain of parents is broken: missing, looping, too long, replaced or of another
    /// RAM size.
    #[error("snapshot {path}: {reason}")]
    Chain {
        /// The directory of the snapshot whose parent is at fault.
        path: PathBuf,
        /// What is wrong with the chain.
        reason: String,
    },
}

/// Guest RAM holding the snapshot's memory, as `mode` says: the full snapshot's memory file
/// read or mapped, then each diff's pages copied over it; or empty RAM whose pages a fault
/// handler fills on first touch (`on_fatal` ends the VM if it cannot).
pub fn guest_ram(snapshot: &LoadedSnapshot, mode: MemoryMode, on_fatal: OnFatal) -> Result<GuestRam, SnapshotError> {
    let config = &snapshot.state.config;
    let size = config.mem_mib << 20;
    let (base, diffs) = snapshot.layers.split_first().ok_or(SnapshotError::State("no memory layers".into()))?;
    let ram = match mode {
        MemoryMode::Mmap => GuestRam::map_file_private(size, &base.file),
        // The pages must be new: a file backing would be refused (it holds the old VM's RAM,
        // or another restore's), so file-backed guests come back anonymous.
        MemoryMode::Eager => match &config.ram_backing {
            RamBacking::File { .. } => GuestRam::new(size, &RamBacking::Anonymous),
            backing => GuestRam::new(size, backing),
        },
        // userfaultfd's MISSING mode serves private anonymous memory.
        MemoryMode::Uffd => GuestRam::new(size, &RamBacking::Anonymous),
    }
    .map_err(|e| SnapshotError::State(e.to_string()))?;
    let regions = ram.regions();
    for layer in &snapshot.layers {
        let mut offset = 0;
        let matches = regions.len() == layer.regions.len()
            && regions.iter().zip(&layer.regions).all(|(r, s)| {
                let same = (r.slot, r.guest_addr, r.size, offset) == (s.slot, s.guest_addr, s.size, s.file_offset);
                offset += s.size;
                same
            });
        if !matches {
            let detail = format!("{} describes regions {:?}", layer.path.display(), layer.regions);
            return Err(RestoreError::Layout { mem_mib: config.mem_mib, detail }.into());
        }
    }
    if mode == MemoryMode::Uffd {
        let filler = super::lazy::start(&ram, snapshot, on_fatal)?;
        ram.attach_filler(Box::new(filler));
        return Ok(ram);
    }
    if mode == MemoryMode::Eager {
        ram.advise_huge_pages();
    }
    let read_err = |layer: &MemoryLayer| {
        let path = layer.path.clone();
        move |source| RestoreError::Read { path, source }
    };
    for (index, region) in regions.iter().enumerate() {
        // SAFETY: the mapping is GuestRam's, alive, and no vCPU or device runs yet.
        let bytes = unsafe { std::slice::from_raw_parts_mut(region.host_addr as *mut u8, region.size as usize) };
        if mode == MemoryMode::Eager {
            let saved = &base.regions[index];
            read_data(&base.file, saved.file_offset, bytes).map_err(read_err(base))?;
        }
        for diff in diffs {
            let saved = &diff.regions[index];
            // Present and of the right length on every diff (checked when loading).
            let dirty = saved.dirty.as_deref().unwrap_or_default();
            for (start, len) in dirty_ranges(dirty, format::PAGE as u64, region.size) {
                // A hole in the diff's file is a page of zeros: pread returns zeros there.
                let range = start as usize..(start + len) as usize;
                diff.file.read_exact_at(&mut bytes[range], saved.file_offset + start).map_err(read_err(diff))?;
            }
        }
    }
    Ok(ram)
}

/// Reads the data extents of `file` at `offset` into `out` (holes stay as the zeros fresh RAM
/// already holds), on every core: page faults in fresh RAM cost more than the copies.
fn read_data(file: &File, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
    const PIECE: u64 = 8 << 20;
    let mut pieces: Vec<(u64, u64)> = Vec::new();
    for (start, len) in data_extents(file, offset, out.len() as u64)? {
        let mut at = start;
        while at < start + len {
            let n = PIECE.min(start + len - at);
            pieces.push((at, n));
            at += n;
        }
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
    let per_thread = pieces.len().div_ceil(threads).max(1);
    // Disjoint destinations, handed out as separate slices.
    let mut rest: &mut [u8] = out;
    let mut consumed = 0u64;
    let mut jobs: Vec<Vec<(u64, &mut [u8])>> = Vec::new();
    for batch in pieces.chunks(per_thread) {
        let mut job = Vec::new();
        for &(start, len) in batch {
            let (_, tail) = std::mem::take(&mut rest).split_at_mut((start - consumed) as usize);
            let (piece, tail) = tail.split_at_mut(len as usize);
            rest = tail;
            consumed = start + len;
            job.push((start, piece));
        }
        jobs.push(job);
    }
    std::thread::scope(|scope| {
        let handles: Vec<_> = jobs
            .into_iter()
            .map(|job| {
                scope.spawn(move || {
                    job.into_iter().try_for_each(|(start, piece)| file.read_exact_at(piece, offset + start))
                })
            })
            .collect();
        handles.into_iter().try_for_each(|h| h.join().unwrap_or_else(|_| Err(std::io::Error::other("reader panicked"))))
    })
}

/// Loads each device's saved state into the device built in its place (same order, same id).
pub fn import_devices(entries: &[DeviceEntry], snapshot: &VmSnapshot) -> Result<(), RestoreError> {
    if entries.len() != snapshot.devices.len() {
        return Err(RestoreError::DeviceCount { expected: entries.len(), found: snapshot.devices.len() });
    }
    for (entry, saved) in entries.iter().zip(&snapshot.devices) {
        if entry.id != saved.id {
            return Err(RestoreError::DeviceOrder { expected: entry.id.clone(), found: saved.id.clone() });
        }
        entry
            .handle
            .lifecycle(|d| {
                d.quiesce();
                let imported = d.import_state(&saved.state);
                // Resuming replays a kick on every queue: requests the guest queued before the
                // snapshot are served as soon as the event loop runs.
                d.resume();
                imported
            })
            .map_err(|e| RestoreError::Device { device: entry.id.clone(), reason: e.to_string() })?;
    }
    Ok(())
}
