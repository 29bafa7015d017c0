//! Taking a snapshot of a running VM.

use std::fs::File;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use devices::bus::lock_device;
use devices::legacy::SerialConsole;

use super::dirty::dirty_ranges;
use super::format::{self, write_sparse};
use super::{
    DeviceSnapshot, DirtyTracker, ParentRef, RegionSnapshot, SnapshotError, SnapshotKind, SnapshotReport,
    SnapshotRequest, VmSnapshot, new_id, unix_ms, us, us_since,
};
use crate::config::VmConfig;
use crate::device_manager::DeviceManager;
use crate::hv::KvmVm;
use crate::memory::GuestRam;
use crate::swap::{SwapManager, SwapState, SwapTally};
use crate::vcpu::Vcpus;
use crate::vm::VmInfo;
use crate::vm::quiesce::Quiesced;

/// The pieces of a running VM a snapshot reads.
pub struct SnapshotSource<'a> {
    pub config: &'a VmConfig,
    pub info: &'a VmInfo,
    pub ram: &'a GuestRam,
    pub kvm: &'a KvmVm,
    pub vcpus: &'a Vcpus,
    pub devices: &'a DeviceManager,
    pub serial: &'a Mutex<SerialConsole>,
    pub swaps: &'a SwapManager,
    pub dirty: &'a DirtyTracker,
    /// False when the guest was paused by its user and must stay paused.
    pub resume_vcpus: bool,
}

impl SnapshotSource<'_> {
    /// Writes a full snapshot into `request.path`. The guest is paused while its state and RAM
    /// are read, and runs again before the state file is written.
    pub fn take(&self, request: &SnapshotRequest) -> Result<SnapshotReport, SnapshotError> {
        let started = Instant::now();
        request.check()?;
        self.refuse_swapped_devices()?;
        let parent = match request.kind {
            SnapshotKind::Full => None,
            SnapshotKind::Diff => Some(self.dirty.parent().ok_or(SnapshotError::NoParent)?),
        };
        let memory_file = request.prepare_directory()?;
        let result = self.take_into(request, parent, &memory_file, started);
        if result.is_err() {
            // Leave nothing that could pass for a snapshot.
            let _ = std::fs::remove_file(request.path.join(format::MEMORY_FILE));
            let _ = std::fs::remove_file(request.path.join(format::STATE_FILE));
        }
        result
    }

    fn take_into(
        &self,
        request: &SnapshotRequest,
        parent: Option<ParentRef>,
        memory_file: &File,
        started: Instant,
    ) -> Result<SnapshotReport, SnapshotError> {
        let drain = Duration::from_millis(request.drain_timeout_ms);
        let quiesced = Quiesced::new(self.vcpus, self.devices, drain, self.resume_vcpus)?;
        // From here on the log may have been read: a failure breaks the chain.
        let result = self.write_paused(request, parent, memory_file, quiesced, started);
        if result.is_err() {
            self.dirty.forget(true);
        }
        result
    }

    fn write_paused(
        &self,
        request: &SnapshotRequest,
        parent: Option<ParentRef>,
        memory_file: &File,
        quiesced: Quiesced<'_>,
        started: Instant,
    ) -> Result<SnapshotReport, SnapshotError> {
        let write_err = |source| SnapshotError::Write { path: request.path.join(format::MEMORY_FILE), source };
        // Read (and cleared) for a full snapshot too: the next diff starts from this one.
        let dirty = self.dirty.take(self.ram, self.kvm)?;
        let vcpus = quiesced.vcpus().capture_state().map_err(|e| SnapshotError::State(e.to_string()))?;
        let vm = self.kvm.capture_state().map_err(|e| SnapshotError::State(e.to_string()))?;
        let serial = lock_device(self.serial).export_state();
        let devices: Vec<DeviceSnapshot> = quiesced
            .devices()
            .devices()
            .iter()
            .map(|entry| DeviceSnapshot { id: entry.id.clone(), state: entry.handle.lifecycle(|d| d.export_state()) })
            .collect();
        let mut regions = Vec::new();
        let (mut file_offset, mut written) = (0, 0);
        for (region, dirty) in self.ram.regions().into_iter().zip(dirty) {
            // SAFETY: the region's mapping stays alive (GuestRam owns it) and nothing writes
            // guest memory while the VM is quiesced.
            let bytes = unsafe { std::slice::from_raw_parts(region.host_addr as *const u8, region.size as usize) };
            let ranges = match request.kind {
                SnapshotKind::Full => self.ram.populated_ranges(region.slot).unwrap_or_else(|_| vec![(0, region.size)]),
                SnapshotKind::Diff => dirty_ranges(&dirty, format::PAGE as u64, region.size),
            };
            for (start, len) in ranges {
                let range = start as usize..(start + len).min(region.size) as usize;
                written += write_sparse(memory_file, file_offset + start, &bytes[range]).map_err(write_err)?;
            }
            regions.push(RegionSnapshot {
                slot: region.slot,
                guest_addr: region.guest_addr,
                size: region.size,
                file_offset,
                dirty: (request.kind == SnapshotKind::Diff).then_some(dirty),
            });
            file_offset += region.size;
        }
        let pause_us = us(quiesced.paused_for());
        let devices_quiesce_us = us(quiesced.devices_quiesce);
        drop(quiesced);

        memory_file.set_len(file_offset).map_err(write_err)?;
        memory_file.sync_all().map_err(write_err)?;
        let id = new_id();
        let snapshot = VmSnapshot {
            id,
            created_unix_ms: unix_ms(),
            kind: request.kind,
            parent,
            config: self.config.clone(),
            info: self.info.clone(),
            regions,
            vcpus,
            vm,
            serial,
            devices,
        };
        let state_bytes = format::write_state(&request.path.join(format::STATE_FILE), &snapshot)?;
        let path = std::path::absolute(&request.path).unwrap_or_else(|_| request.path.clone());
        self.dirty.completed(ParentRef { id, path });
        Ok(SnapshotReport {
            path: request.path.clone(),
            id: format!("{id:016x}"),
            kind: request.kind,
            pause_us,
            devices_quiesce_us,
            total_us: us_since(started),
            memory_bytes: file_offset,
            memory_written_bytes: written,
            state_bytes,
            vcpus: snapshot.vcpus.len(),
            devices: snapshot.devices.len(),
        })
    }

    fn refuse_swapped_devices(&self) -> Result<(), SnapshotError> {
        let (tallies, running) = self.swaps.tallies();
        let committed = SwapTally::STATES.iter().position(|s| *s == SwapState::Committed).unwrap_or(0);
        let swapped = tallies.iter().find(|(_, t)| t.by_state[committed] > 0).map(|(device, _)| device);
        match swapped.or_else(|| running.keys().next()) {
            Some(device) => Err(SnapshotError::SwappedDevice { device: device.clone() }),
            None => Ok(()),
        }
    }
}
