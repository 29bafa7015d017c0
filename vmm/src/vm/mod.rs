//! A running VM: the handle the builder returns and embedders drive.

mod replication;
mod shm;
mod state_file;

pub(crate) use replication::IN_DOUBT;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use devices::blk::UndoLog;
use devices::bus::lock_device;
use devices::legacy::SerialConsole;
use devices::metrics::MetricsSnapshot;

pub use crate::boot::VmInfo;
pub use crate::exit::{Crash, CrashKind, VmExit};

use crate::config::VmConfig;
use crate::device_manager::DeviceManager;
use crate::device_manager::shm::ShmWindows;
use crate::exit::ExitState;
use crate::hv::KvmVm;
use crate::memory::{GuestRam, RegionInfo};
use crate::replication::ReplicationManager;
use crate::snapshot::{DirtyTracker, SnapshotError, SnapshotReport, SnapshotRequest, SnapshotSource};
use crate::swap::memory::MemorySwap;
use crate::swap::{
    MemorySwapError, MemorySwapReport, MemorySwapRequest, SwapError, SwapHandle, SwapManager, SwapRequest,
};
use crate::vcpu::{ControlError, Target, Vcpus};

/// Whether the guest is running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmState {
    /// The vCPUs run (or are being resumed).
    Running,
    /// Paused through [`Vm::pause`]; the VM keeps its state until resumed.
    Paused,
    /// The VM has ended, and how.
    Exited(VmExit),
}

/// Why pausing or resuming a VM failed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The VM has already ended, and how.
    #[error("the VM has exited ({0})")]
    Exited(VmExit),
    /// The vCPU threads did not reach the requested state.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The VM was handed to a shadow and stays frozen until the switchover is committed or
    /// rolled back.
    #[error("the VM is frozen for a switchover to a shadow: commit or roll it back")]
    SwitchedOver,
}

/// Pushes bytes into the guest's serial port from any thread.
#[derive(Clone)]
pub struct SerialInput {
    serial: Arc<Mutex<SerialConsole>>,
}

impl SerialInput {
    /// Queues as many bytes as the UART's receive FIFO takes; returns how many.
    pub fn send(&self, bytes: &[u8]) -> usize {
        lock_device(&self.serial).push_input(bytes)
    }

    /// Queues all of `bytes`, waiting while the guest drains its receive FIFO, for at most
    /// `timeout`; returns how many went in (fewer only when the guest stopped reading).
    pub fn send_all(&self, bytes: &[u8], timeout: Duration) -> usize {
        let deadline = std::time::Instant::now() + timeout;
        let mut sent = 0;
        while sent < bytes.len() {
            let accepted = self.send(&bytes[sent..]);
            sent += accepted;
            if accepted == 0 {
                if std::time::Instant::now() >= deadline {
                    break;
                }
                // The UART raises no event when the guest reads; a FIFO is 64 bytes, so a
                // millisecond's wait costs a typist nothing.
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        sent
    }
}

/// One virtio device as [`Vm::device`] describes it.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    /// The device's id (`disk0`, `net0`, `vsock0` unless configured).
    pub id: String,
    /// `block`, `net` or `vsock`.
    pub kind: &'static str,
    /// The backend serving it now, in words (`io_uring file /var/disk.img`).
    pub backend: String,
    /// The device's virtio configuration space as the guest reads it (a disk's capacity in
    /// sectors first, a NIC's MAC first).
    pub config_space: Vec<u8>,
    /// Request counters per queue direction: `io` for disks, `rx` and `tx` for NICs and vsock.
    pub counters: BTreeMap<&'static str, MetricsSnapshot>,
}

/// How long undoing disk writes waits for the requests in flight.
const UNDO_DRAIN: Duration = Duration::from_secs(10);

/// A running VM.
///
/// Dropping it stops the guest. Field order is drop order: vCPU threads end before the VM
/// and the guest RAM they use go away.
pub struct Vm {
    vcpus: Mutex<Vcpus>,
    exit: Arc<ExitState>,
    serial: Arc<Mutex<SerialConsole>>,
    devices: Mutex<DeviceManager>,
    swaps: SwapManager,
    /// Pages changed since the last snapshot, for diff snapshots.
    dirty: DirtyTracker,
    /// Replication to a shadow VMM.
    replication: ReplicationManager,
    info: VmInfo,
    /// What the VM was built from: a snapshot rebuilds the same machine from it.
    config: VmConfig,
    kvm: KvmVm,
    /// Shared-memory regions: after `kvm`, so their memory outlives the slots that map it.
    shm: ShmWindows,
    ram: GuestRam,
    /// Disks logging what they overwrite (a shadow's, until commit or rollback).
    undo: Vec<(String, UndoLog)>,
    /// Image locks taken after the fact (a shadow's disks, once the switchover commits).
    disk_locks: Mutex<Vec<devices::blk::backend::ImageLock>>,
}

/// What the builder assembled, handed to [`Vm::new`].
pub(crate) struct VmParts {
    pub vcpus: Vcpus,
    pub exit: Arc<ExitState>,
    pub serial: Arc<Mutex<SerialConsole>>,
    pub devices: DeviceManager,
    pub info: VmInfo,
    pub config: VmConfig,
    pub kvm: KvmVm,
    pub shm: ShmWindows,
    pub ram: GuestRam,
    pub undo: Vec<(String, UndoLog)>,
}

impl Vm {
    pub(crate) fn new(parts: VmParts) -> Self {
        let VmParts { vcpus, exit, serial, devices, info, config, kvm, shm, ram, undo } = parts;
        Self {
            vcpus: Mutex::new(vcpus),
            exit,
            serial,
            devices: Mutex::new(devices),
            swaps: SwapManager::default(),
            dirty: DirtyTracker::default(),
            replication: ReplicationManager::default(),
            info,
            config,
            kvm,
            shm,
            ram,
            undo,
            disk_locks: Mutex::default(),
        }
    }

    /// Takes back every disk write since the VM started, for a VM built with
    /// [`VmBuilder::log_disk_overwrites`](crate::VmBuilder::log_disk_overwrites): stops the VM first
    /// (nothing may write meanwhile), then writes the saved blocks back. Returns the blocks
    /// restored per disk, in words.
    pub fn undo_disk_writes(&self) -> Result<Vec<String>, String> {
        // Requests in flight finish first (the devices take no new ones): a write landing
        // after the undo would stay.
        let drained = crate::quiesce::drain_devices(self.devices().devices(), UNDO_DRAIN);
        self.stop();
        let mut failed: Vec<String> =
            drained.err().map(|e| format!("the disks did not drain: {e}")).into_iter().collect();
        let mut undone = Vec::new();
        // Every disk, whatever happened to the one before.
        for (id, log) in &self.undo {
            match log.roll_back() {
                Ok(u) => undone.push(format!("{id}: {} blocks ({} bytes) restored", u.blocks, u.bytes)),
                Err(e) => failed.push(format!("{id}: cannot undo its writes: {e}")),
            }
        }
        match failed.is_empty() {
            true => Ok(undone),
            false => Err(failed.join("; ")),
        }
    }

    /// Keeps every disk write for good and stops logging them (see
    /// [`undo_disk_writes`](Self::undo_disk_writes)).
    pub fn keep_disk_writes(&self) {
        for (_, log) in &self.undo {
            log.commit();
        }
    }

    /// Locks the images of the disks now in use (a shadow's, which opened them while the
    /// primary held them): turns locking back on for this process, and tries each image for up
    /// to `patience` while the primary lets go. Returns the images it could not lock.
    pub fn lock_disks(&self, patience: Duration) -> Vec<String> {
        devices::blk::backend::lock::set_enabled(true);
        let disks: Vec<_> =
            self.current_config().disks.into_iter().filter_map(|d| Some((d.path?, d.readonly))).collect();
        let deadline = std::time::Instant::now() + patience;
        let mut failed = Vec::new();
        for (path, readonly) in disks {
            loop {
                match devices::blk::backend::lock_image(&path, readonly) {
                    Ok(lock) => break self.disk_locks.lock().unwrap_or_else(|p| p.into_inner()).push(lock),
                    Err(_) if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                    Err(e) => {
                        log::warn!("{e}");
                        failed.push(path.display().to_string());
                        break;
                    }
                }
            }
        }
        failed
    }

    /// The VM's virtio devices.
    pub(crate) fn devices(&self) -> MutexGuard<'_, DeviceManager> {
        self.devices.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The ids of the VM's virtio devices, in the order they were added.
    pub fn device_ids(&self) -> Vec<String> {
        self.devices().devices().iter().map(|e| e.id.clone()).collect()
    }

    /// What device `id` is now: its kind, current backend, configuration space and counters.
    pub fn device(&self, id: &str) -> Option<DeviceInfo> {
        let devices = self.devices();
        let entry = devices.find(id)?;
        let handle = &entry.handle;
        Some(DeviceInfo {
            id: entry.id.clone(),
            kind: handle.kind(),
            backend: handle.backend_description(),
            config_space: handle.config_space(),
            counters: handle.metrics().into_iter().map(|(direction, m)| (direction, m.snapshot())).collect(),
        })
    }

    /// Every device's request counters, for a health check of the whole VM.
    pub(crate) fn request_metrics(&self) -> Vec<Arc<devices::metrics::RequestMetrics>> {
        let devices = self.devices();
        devices.devices().iter().flat_map(|e| e.handle.metrics()).map(|(_, m)| m).collect()
    }

    /// The guest's RAM regions: slot, guest address, size and backing of each.
    pub fn memory_regions(&self) -> Vec<RegionInfo> {
        self.ram.regions()
    }

    fn vcpus(&self) -> MutexGuard<'_, Vcpus> {
        self.vcpus.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How the VM was put together: vCPUs, RAM size, boot protocol, kernel format, entry point.
    pub fn info(&self) -> &VmInfo {
        &self.info
    }

    /// The guest's RAM.
    pub(crate) fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// Whether the guest is running, paused or has exited, as of now.
    pub fn state(&self) -> VmState {
        if let Some(exit) = self.exit.get() {
            return VmState::Exited(exit);
        }
        match self.vcpus().target() {
            Target::Pause => VmState::Paused,
            _ => VmState::Running,
        }
    }

    fn ensure_running(&self) -> Result<(), VmError> {
        match self.exit.get() {
            Some(exit) => Err(VmError::Exited(exit)),
            None => Ok(()),
        }
    }

    /// Stops every vCPU at an instruction boundary; returns once all are stopped.
    pub fn pause(&self) -> Result<(), VmError> {
        self.ensure_running()?;
        Ok(self.vcpus().pause()?)
    }

    /// Lets the vCPUs run again; returns once all are running.
    pub fn resume(&self) -> Result<(), VmError> {
        self.ensure_running()?;
        if self.replication.frozen() {
            return Err(VmError::SwitchedOver);
        }
        Ok(self.vcpus().resume()?)
    }

    /// Ends the VM (no-op if it already ended) and waits for its vCPU threads.
    pub fn stop(&self) -> VmExit {
        self.exit.report(VmExit::Stopped);
        self.finish()
    }

    /// Blocks until the VM ends, then reaps its vCPU threads.
    pub fn wait(&self) -> VmExit {
        self.exit.wait(None);
        self.finish()
    }

    /// Like [`wait`](Self::wait), giving up after `timeout`.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<VmExit> {
        self.exit.wait(Some(timeout))?;
        Some(self.finish())
    }

    fn finish(&self) -> VmExit {
        self.swaps.vm_stopping();
        self.vcpus().stop();
        self.devices().stop();
        self.exit.get().unwrap_or(VmExit::Stopped)
    }

    /// Starts replacing the backend of device `id` (see [`crate::swap`]); returns the swap's
    /// handle to follow it. Errors mean nothing changed.
    pub fn swap_device(&self, id: &str, request: SwapRequest) -> Result<SwapHandle, SwapError> {
        if let Some(exit) = self.exit.get() {
            return Err(SwapError::VmExited(exit.to_string()));
        }
        // A swap resumes its device and changes what the shadow must open: not while the
        // VM is being replicated or is handed over.
        if self.replication.in_use() {
            return Err(SwapError::Replicating);
        }
        // Not under the device manager's lock: opening the new backend can take a while (an
        // NBD server to connect to), and listing devices or stopping the VM must not wait.
        let entry = self.devices().find(id).cloned().ok_or_else(|| SwapError::NoSuchDevice(id.to_string()))?;
        self.swaps.start(&entry, request)
    }

    /// Swaps started on this VM, running and finished.
    pub fn swaps(&self) -> &SwapManager {
        &self.swaps
    }

    /// Replaces the backing of RAM region `slot`, pausing the guest for the copy.
    pub fn swap_memory(&self, slot: u32, request: &MemorySwapRequest) -> Result<MemorySwapReport, MemorySwapError> {
        if self.exit.is_set() {
            return Err(MemorySwapError::Pause(ControlError::Stopped));
        }
        if self.replication.in_use() {
            return Err(MemorySwapError::Replicating);
        }
        let vcpus = self.vcpus();
        // A guest the user paused stays paused after the swap.
        let resume_vcpus = vcpus.target() != Target::Pause;
        let devices = self.devices();
        let outcome = MemorySwap { ram: &self.ram, kvm: &self.kvm, vcpus: &vcpus, devices: &devices, resume_vcpus }
            .run(slot, request);
        // The slot may have been re-created without its dirty log (on success, and on some
        // failures): the next diff snapshot has no base.
        self.dirty.forget(false);
        self.swaps.record_memory_swap(&outcome);
        outcome
    }

    /// Writes a snapshot of the running VM (see [`crate::snapshot`]); the guest is paused only
    /// while its state and RAM are read, and a guest its user paused stays paused.
    pub fn snapshot(&self, request: &SnapshotRequest) -> Result<SnapshotReport, SnapshotError> {
        if let Some(exit) = self.exit.get() {
            return Err(SnapshotError::Exited(exit.to_string()));
        }
        if self.replication.in_use() {
            return Err(SnapshotError::Replicating);
        }
        if self.shm_attached() {
            return Err(SnapshotError::SharedMemory);
        }
        let vcpus = self.vcpus();
        let devices = self.devices();
        self.snapshot_source(&vcpus, &devices).take(request)
    }

    /// What a snapshot or a switchover reads, with the vCPU and device locks the caller holds;
    /// a guest its user paused stays paused.
    pub(crate) fn snapshot_source<'a>(&'a self, vcpus: &'a Vcpus, devices: &'a DeviceManager) -> SnapshotSource<'a> {
        SnapshotSource {
            config: &self.config,
            info: &self.info,
            ram: &self.ram,
            kvm: &self.kvm,
            vcpus,
            devices,
            serial: &self.serial,
            swaps: &self.swaps,
            dirty: &self.dirty,
            resume_vcpus: vcpus.target() != Target::Pause,
        }
    }

    /// A handle for feeding the guest's serial input.
    pub fn serial_input(&self) -> SerialInput {
        SerialInput { serial: self.serial.clone() }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.exit.report(VmExit::Stopped);
        self.swaps.vm_stopping();
        self.vcpus().stop();
    }
}
