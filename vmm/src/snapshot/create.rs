//! Taking a snapshot of a running VM.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use devices::bus::lock_device;
use devices::legacy::SerialConsole;

use super::dirty::dirty_ranges;
use super::format::{self, LiveMemory};
use super::{
    DeviceSnapshot, DirtyTracker, ParentRef, RegionSnapshot, SnapshotError, SnapshotKind, SnapshotReport,
    SnapshotRequest, VmSnapshot, new_id, unix_ms, us, us_since,
};
use crate::boot::VmInfo;
use crate::config::VmConfig;
use crate::device_manager::DeviceManager;
use crate::hv::KvmVm;
use crate::memory::GuestRam;
use crate::quiesce::Quiesced;
use crate::swap::SwapManager;
use crate::vcpu::Vcpus;

/// What a quiesced VM's state is, RAM aside.
pub(crate) struct CapturedMachine {
    pub vcpus: Vec<crate::hv::VcpuState>,
    pub vm: crate::hv::VmState,
    pub serial: devices::legacy::SerialSnapshot,
    pub devices: Vec<DeviceSnapshot>,
}

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
    /// Writes a snapshot into `request.path`. The guest is paused while its state and the
    /// pages it changed during the first pass are read (see [`take_into`](Self::take_into)).
    pub fn take(&self, request: &SnapshotRequest) -> Result<SnapshotReport, SnapshotError> {
        let started = Instant::now();
        request.check()?;
        self.refuse_running_swaps()?;
        let parent = match request.kind {
            SnapshotKind::Full => None,
            SnapshotKind::Diff => Some(self.dirty.parent().ok_or(SnapshotError::NoParent)?),
        };
        let (memory_file, created) = request.prepare_directory()?;
        let result = self.take_into(request, parent, &memory_file, started);
        if result.is_err() {
            // Leave nothing that could pass for a snapshot, nor block a retry into the same
            // directory.
            for name in [format::MEMORY_FILE, format::STATE_FILE, format::STATE_TMP_FILE] {
                let _ = std::fs::remove_file(request.path.join(name));
            }
            if created {
                let _ = std::fs::remove_dir(&request.path);
            }
        }
        result
    }

    /// Three passes, so the guest pauses only for what it changes meanwhile: with the guest
    /// running, read (and clear) the dirty log and write what the snapshot needs (every
    /// populated page for a full one, the pages changed since the parent for a diff); then,
    /// paused, read the log again and copy just the pages changed during the first pass, with
    /// the vCPU and device state; then, running again, write those copies over the first pass.
    fn take_into(
        &self,
        request: &SnapshotRequest,
        parent: Option<ParentRef>,
        memory_file: &File,
        started: Instant,
    ) -> Result<SnapshotReport, SnapshotError> {
        // From the first read of the log on, a failure breaks the chain.
        let result = self.take_passes(request, parent, memory_file, started);
        if result.is_err() {
            self.dirty.forget(true);
        }
        result
    }

    fn take_passes(
        &self,
        request: &SnapshotRequest,
        parent: Option<ParentRef>,
        memory_file: &File,
        started: Instant,
    ) -> Result<SnapshotReport, SnapshotError> {
        let write_err = |source| SnapshotError::Write { path: request.path.join(format::MEMORY_FILE), source };
        let regions = self.ram.regions();
        let live = |region: &crate::memory::RegionInfo| {
            // SAFETY: GuestRam owns the mapping for the VM's life; a memory swap (which could
            // replace it) needs the vCPU lock our caller holds.
            unsafe { LiveMemory::new(region.host_addr as *const u8, region.size as usize) }
        };
        let file_offsets: Vec<u64> =
            regions.iter().scan(0, |at, r| Some(std::mem::replace(at, *at + r.size))).collect();

        // First pass, the guest running.
        let before = self.dirty.take(self.ram, self.kvm)?;
        let mut written = 0;
        for ((region, dirty), offset) in regions.iter().zip(&before).zip(&file_offsets) {
            let ranges = match request.kind {
                SnapshotKind::Full => self.ram.populated_ranges(region.slot).unwrap_or_else(|_| vec![(0, region.size)]),
                SnapshotKind::Diff => dirty_ranges(dirty, format::PAGE as u64, region.size),
            };
            for (start, len) in ranges {
                let range = start as usize..(start + len) as usize;
                written += live(region).write_sparse(memory_file, *offset, range).map_err(write_err)?;
            }
        }

        // Second pass, paused.
        let drain = Duration::from_millis(request.drain_timeout_ms);
        let quiesced = Quiesced::new(self.vcpus, self.devices, drain, self.resume_vcpus)?;
        let during = self.dirty.take(self.ram, self.kvm)?;
        let mut changed = Vec::new();
        for ((region, dirty), offset) in regions.iter().zip(&during).zip(&file_offsets) {
            for (start, len) in dirty_ranges(dirty, format::PAGE as u64, region.size) {
                changed.push((offset + start, live(region).copy_out(start as usize..(start + len) as usize)));
            }
        }
        let CapturedMachine { vcpus, vm, serial, devices } = self.capture(&quiesced)?;
        let pause_us = us(quiesced.paused_for());
        let devices_quiesce_us = us(quiesced.devices_quiesce);
        drop(quiesced);

        // Third pass, running again: the pages changed during the first, as they were when
        // paused (zeros included: the first pass may have written older data there).
        for (at, bytes) in &changed {
            memory_file.write_all_at(bytes, *at).map_err(write_err)?;
            written += bytes.len() as u64;
        }
        let regions: Vec<RegionSnapshot> = regions
            .iter()
            .zip(before.into_iter().zip(during))
            .zip(&file_offsets)
            .map(|((region, (before, during)), &file_offset)| RegionSnapshot {
                slot: region.slot,
                guest_addr: region.guest_addr,
                size: region.size,
                file_offset,
                dirty: (request.kind == SnapshotKind::Diff)
                    .then(|| before.iter().zip(&during).map(|(a, b)| a | b).collect()),
            })
            .collect();
        let file_offset = regions.last().map_or(0, |r| r.file_offset + r.size);
        memory_file.set_len(file_offset).map_err(write_err)?;
        memory_file.sync_all().map_err(write_err)?;
        let snapshot = self.describe(request.kind, parent, regions, CapturedMachine { vcpus, vm, serial, devices });
        let id = snapshot.id;
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

    /// Reads every vCPU's, the VM's, the serial port's and every device's state; the VM must
    /// be quiesced (a snapshot's pause, a switchover's freeze).
    pub(crate) fn capture(&self, quiesced: &Quiesced) -> Result<CapturedMachine, SnapshotError> {
        let vcpus = quiesced.vcpus().capture_state().map_err(|e| SnapshotError::State(e.to_string()))?;
        let vm = self.kvm.capture_state().map_err(|e| SnapshotError::State(e.to_string()))?;
        let serial = lock_device(self.serial).export_state();
        let devices = quiesced
            .devices()
            .devices()
            .iter()
            .map(|entry| DeviceSnapshot { id: entry.id.clone(), state: entry.handle.lifecycle(|d| d.export_state()) })
            .collect();
        Ok(CapturedMachine { vcpus, vm, serial, devices })
    }

    /// The state file's content for `machine`, with RAM laid out as `regions` say.
    pub(crate) fn describe(
        &self,
        kind: SnapshotKind,
        parent: Option<ParentRef>,
        regions: Vec<RegionSnapshot>,
        machine: CapturedMachine,
    ) -> VmSnapshot {
        VmSnapshot {
            id: new_id(),
            created_unix_ms: unix_ms(),
            kind,
            parent,
            // With each device's current backend: a committed swap changed it.
            config: self.config.clone().with_devices(self.devices.devices().iter().map(|e| e.handle.current_config())),
            info: self.info.clone(),
            regions,
            vcpus: machine.vcpus,
            vm: machine.vm,
            serial: machine.serial,
            devices: machine.devices,
        }
    }

    /// A swap in progress moves a device between backends: the snapshot waits for none.
    fn refuse_running_swaps(&self) -> Result<(), SnapshotError> {
        let (_, running) = self.swaps.tallies();
        match running.into_keys().next() {
            Some(device) => Err(SnapshotError::SwapRunning { device }),
            None => Ok(()),
        }
    }
}
