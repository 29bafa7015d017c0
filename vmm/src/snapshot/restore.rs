//! The pieces of a restore the builder composes: guest RAM from the memory file, and the
//! state of the virtio devices.

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::{MemoryMode, SnapshotError, VmSnapshot};
use crate::device_manager::DeviceEntry;
use crate::memory::{GuestRam, RamBacking, data_extents};

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("the snapshot's RAM layout does not match this vmm's for {mem_mib} MiB: {detail}")]
    Layout { mem_mib: u64, detail: String },
    #[error("the snapshot has {found} devices, the configuration it carries builds {expected}")]
    DeviceCount { expected: usize, found: usize },
    #[error("device {expected:?} comes next, the snapshot's next device is {found:?}")]
    DeviceOrder { expected: String, found: String },
    #[error("device {device}: {reason}")]
    Device { device: String, reason: String },
    #[error("cannot read guest RAM from the memory file: {0}")]
    Read(#[source] std::io::Error),
}

/// Guest RAM holding the snapshot's memory, as `mode` says.
pub fn guest_ram(snapshot: &VmSnapshot, memory: &File, mode: MemoryMode) -> Result<GuestRam, SnapshotError> {
    let size = snapshot.config.mem_mib << 20;
    let ram = match mode {
        MemoryMode::Mmap => GuestRam::map_file_private(size, memory),
        // The pages must be new: a file backing would be refused (it holds the old VM's RAM,
        // or another restore's), so file-backed guests come back anonymous.
        MemoryMode::Eager => match &snapshot.config.ram_backing {
            RamBacking::File { .. } => GuestRam::new(size, &RamBacking::Anonymous),
            backing => GuestRam::new(size, backing),
        },
    }
    .map_err(|e| SnapshotError::State(e.to_string()))?;
    let regions = ram.regions();
    let matches = regions.len() == snapshot.regions.len()
        && regions.iter().zip(&snapshot.regions).all(|(r, s)| {
            (r.slot, r.guest_addr, r.size) == (s.slot, s.guest_addr, s.size)
                && (mode == MemoryMode::Eager || s.file_offset == offset_of(&snapshot.regions, s.slot))
        });
    if !matches {
        let detail = format!("snapshot regions {:?}", snapshot.regions);
        return Err(RestoreError::Layout { mem_mib: snapshot.config.mem_mib, detail }.into());
    }
    if mode == MemoryMode::Eager {
        for (region, saved) in regions.iter().zip(&snapshot.regions) {
            // SAFETY: the mapping is GuestRam's, alive, and no vCPU or device runs yet.
            let bytes = unsafe { std::slice::from_raw_parts_mut(region.host_addr as *mut u8, region.size as usize) };
            read_data(memory, saved.file_offset, bytes).map_err(RestoreError::Read)?;
        }
    }
    Ok(ram)
}

/// Where [`GuestRam::map_file_private`] maps region `slot`: regions back to back.
fn offset_of(regions: &[super::RegionSnapshot], slot: u32) -> u64 {
    regions.iter().take_while(|r| r.slot != slot).map(|r| r.size).sum()
}

/// Reads the data extents of `file` at `offset` into `out` (holes stay as the zeros fresh RAM
/// already holds).
fn read_data(file: &File, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
    for (start, len) in data_extents(file, offset, out.len() as u64)? {
        let range = start as usize..(start + len) as usize;
        file.read_exact_at(&mut out[range], offset + start)?;
    }
    Ok(())
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
