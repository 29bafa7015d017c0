//! Snapshots: the VM's whole state, written to a directory, and VMs continued from one.
//!
//! Taking one is the same for every VM and never names a device type: quiesce everything
//! (`Quiesced`), read the vCPUs (on their own threads), the in-kernel irqchip, PIT and clock,
//! the serial port and every virtio device through `Lifecycle`, write guest RAM (zero pages
//! as holes), resume; the state file is written after the guest runs again. The i8042 and the
//! debug-exit port have no state to carry (vm-superio's i8042 keeps only its reset line).
//!
//! Rules for what cannot move, written once here: requests in flight are drained before the
//! state is read (the quiesce waits for them); the serial port's output has already been
//! written; disk contents are not part of a snapshot (a restore opens the same images: pause
//! the guest before snapshotting it and do not run the source on after, or copy the images);
//! frames on the wire are lost as on a real network; vsock connections are reset (see
//! `devices::vsock`); devices are rebuilt with the backend serving at the snapshot (a committed
//! swap updates it), and a swap still running refuses the snapshot.
//!
//! Restoring ([`crate::VmBuilder::restore`]) builds the same machine from the snapshot's
//! configuration, fills RAM by the chosen [`MemoryMode`], loads the state and runs.

mod create;
mod dirty;
pub mod format;
mod lazy;
pub(crate) mod restore;

/// The KVM state a snapshot holds, per vCPU and VM-wide.
pub use crate::hv::{VcpuState, VmState as MachineState};
pub(crate) use create::SnapshotSource;
pub use dirty::{DirtyError, ParentRef};
pub(crate) use dirty::{DirtyTracker, dirty_ranges};
pub(crate) use lazy::OnFatal;
pub use restore::RestoreError;
pub(crate) use restore::load;

use std::fs::{File, OpenOptions};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use devices::legacy::SerialSnapshot;
use devices::lifecycle::DeviceState;
use serde::{Deserialize, Serialize};

use crate::boot::VmInfo;
use crate::config::VmConfig;
use crate::quiesce::QuiesceError;
use format::FormatError;

/// The state file's payload.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmSnapshot {
    /// Random, to tell snapshots apart.
    pub id: u64,
    /// When the snapshot was taken, in milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// Full, or a diff holding only the pages changed since [`parent`](Self::parent).
    pub kind: SnapshotKind,
    /// For a diff: the snapshot whose memory it changes (checked by id when restoring).
    pub parent: Option<ParentRef>,
    /// The machine to rebuild: memory size, vCPUs, devices in their order.
    pub config: VmConfig,
    /// How the VM was booted (protocol, kernel format, entry point); the restored VM reports it.
    pub info: VmInfo,
    /// Where each RAM region's bytes are in the memory file, in the VM's region order.
    pub regions: Vec<RegionSnapshot>,
    /// Every vCPU's KVM state (registers, LAPIC, MSRs...), in vCPU id order.
    pub vcpus: Vec<VcpuState>,
    /// The VM-wide in-kernel state: PICs, IOAPIC, PIT and KVM clock.
    pub vm: MachineState,
    /// The COM1 serial port's registers.
    pub serial: SerialSnapshot,
    /// Every virtio device, in the order they were added (which fixes their MMIO slots).
    pub devices: Vec<DeviceSnapshot>,
}

/// Where one RAM region's bytes are in the memory file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionSnapshot {
    /// KVM memory slot number.
    pub slot: u32,
    /// Guest physical address where the region starts.
    pub guest_addr: u64,
    /// Length of the region in bytes (a multiple of 4 KiB).
    pub size: u64,
    /// Byte offset of the region in the memory file (regions follow each other without gaps).
    pub file_offset: u64,
    /// For a diff: the pages it holds (one bit per 4 KiB page); the rest are the parent's.
    /// A set page in a hole of the memory file is a page of zeros.
    pub dirty: Option<Vec<u64>>,
}

/// One virtio device's saved state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSnapshot {
    /// The device's id; a restore checks it against the device built in the same place.
    pub id: String,
    /// What the device exported: transport registers, queues and device-specific state.
    pub state: DeviceState,
}

/// `POST /snapshots`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// A directory that does not exist yet or is empty.
    pub path: PathBuf,
    /// Full (the default) or diff.
    #[serde(default)]
    pub kind: SnapshotKind,
    /// How long to wait for device requests in flight before pausing, in milliseconds
    /// (1 to [`MAX_DRAIN_MS`](crate::swap::MAX_DRAIN_MS); 2000 by default).
    #[serde(default = "default_drain_ms")]
    pub drain_timeout_ms: u64,
}

fn default_drain_ms() -> u64 {
    2000
}

/// Whether a snapshot holds all of guest RAM or only what changed since its parent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotKind {
    /// Every populated page of guest RAM; starts a new chain of diffs.
    #[default]
    Full,
    /// Only the pages that changed since the VM's last snapshot, which it names as its parent.
    Diff,
}

/// How a restore fills guest RAM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemoryMode {
    /// Read the memory file's data into fresh RAM before the guest runs.
    #[default]
    Eager,
    /// Map the memory file privately: the guest runs at once, pages come in as it touches them
    /// and its writes never reach the file.
    Mmap,
    /// Start with empty RAM and fill each page on first touch from a userfaultfd handler
    /// (zero pages without I/O); diff chains need no copying up front.
    Uffd,
}

/// The names the API and `--memory` use.
impl std::fmt::Display for MemoryMode {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            Self::Eager => "eager",
            Self::Mmap => "mmap",
            Self::Uffd => "uffd",
        })
    }
}

/// The names the API uses.
impl std::fmt::Display for SnapshotKind {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            Self::Full => "full",
            Self::Diff => "diff",
        })
    }
}

impl std::str::FromStr for MemoryMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "eager" => Ok(Self::Eager),
            "mmap" => Ok(Self::Mmap),
            "uffd" => Ok(Self::Uffd),
            _ => Err(format!("memory mode {s:?}: expected eager, mmap or uffd")),
        }
    }
}

/// What taking a snapshot did and cost.
#[derive(Clone, Debug, Serialize)]
pub struct SnapshotReport {
    /// The snapshot directory, as requested.
    pub path: PathBuf,
    /// The snapshot's id, as 16 hex digits.
    pub id: String,
    /// Full or diff, as requested.
    pub kind: SnapshotKind,
    /// How long the vCPUs were paused.
    pub pause_us: u64,
    /// Draining the devices' requests before the pause (the guest ran meanwhile).
    pub devices_quiesce_us: u64,
    /// Time from the request to the state file written, in microseconds.
    pub total_us: u64,
    /// Length of the memory file in bytes: the size of guest RAM.
    pub memory_bytes: u64,
    /// Bytes of guest RAM written (zero pages are holes).
    pub memory_written_bytes: u64,
    /// Size of the state file in bytes, header included.
    pub state_bytes: u64,
    /// Number of vCPUs saved.
    pub vcpus: usize,
    /// Number of virtio devices saved.
    pub devices: usize,
}

/// Why a snapshot could not be taken or loaded.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The VM has already exited; the string says how.
    #[error("the VM has exited ({0})")]
    Exited(String),
    /// A field of the [`SnapshotRequest`] is invalid.
    #[error("{field}: {reason}")]
    Request {
        /// The request field at fault.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The snapshot directory is not empty, or cannot be read or created.
    #[error("snapshot directory {path}: {reason}")]
    Directory {
        /// The requested directory.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The devices did not drain in time or the vCPUs could not be paused; nothing was kept.
    #[error("{0}; nothing was written")]
    Quiesce(#[from] QuiesceError),
    /// The VM's state could not be read or set up (vCPU or KVM state, restored RAM, page fault
    /// handler), or a snapshot's state does not hold together.
    #[error("cannot read the VM's state: {0}")]
    State(String),
    /// A snapshot file could not be created or written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file being written.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A snapshot's memory file could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file being read.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A state file could not be encoded, or one being read is not a valid snapshot.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// The snapshot does not fit the machine rebuilt from it, or its chain of diffs is broken.
    #[error("cannot restore: {0}")]
    Restore(#[from] RestoreError),
    /// The VM is replicating to a shadow, which reads the same dirty log.
    #[error("the VM is replicating to a shadow; stop replication (or switch over) first")]
    Replicating,
    /// A shared-memory region is attached: its memory belongs to the fabric, not the VM.
    #[error("a shared-memory region is attached; a snapshot cannot carry it: detach it first")]
    SharedMemory,
    /// A device is in the middle of a backend swap.
    #[error("device {device} is swapping its backend; take the snapshot once the swap has ended")]
    SwapRunning {
        /// The id of the device being swapped.
        device: String,
    },
    /// A diff was requested but there is no snapshot it could build on.
    #[error(
        "a diff snapshot needs a parent: this VM has no snapshot since it started, its last one failed, or a memory \
         swap came after it; take a full snapshot first"
    )]
    NoParent,
    /// KVM's dirty page log could not be turned on or read, or the VMM's own dirty bitmap read.
    #[error(transparent)]
    Dirty(#[from] dirty::DirtyError),
}

impl SnapshotRequest {
    /// Checks the request's fields: a non-empty path and a drain timeout within limits.
    pub fn check(&self) -> Result<(), SnapshotError> {
        crate::swap::check_ms("drain_timeout_ms", self.drain_timeout_ms, crate::swap::MAX_DRAIN_MS)
            .map_err(|e| SnapshotError::Request { field: "drain_timeout_ms", reason: e.to_string() })?;
        if self.path.as_os_str().is_empty() {
            return Err(SnapshotError::Request { field: "path", reason: "must name a directory".into() });
        }
        Ok(())
    }

    /// Creates the snapshot directory (it may exist if empty) and opens the memory file;
    /// returns whether it created the directory.
    pub(crate) fn prepare_directory(&self) -> Result<(File, bool), SnapshotError> {
        let dir_err = |reason: String| SnapshotError::Directory { path: self.path.clone(), reason };
        let created = match std::fs::read_dir(&self.path) {
            Ok(mut entries) => {
                if entries.next().is_some() {
                    return Err(dir_err("is not empty (a snapshot never overwrites files)".into()));
                }
                false
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(&self.path).map_err(|e| dir_err(e.to_string()))?;
                true
            }
            Err(e) => return Err(dir_err(e.to_string())),
        };
        let path = self.path.join(format::MEMORY_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|source| SnapshotError::Write { path, source })?;
        Ok((file, created))
    }
}

/// A new random snapshot id (the kernel's random pool; no crate needed for 8 bytes).
pub(crate) fn new_id() -> u64 {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into the buffer we own.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        // Never fails for 8 bytes once the pool is initialised; fall back to the clock.
        return SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    }
    u64::from_ne_bytes(bytes)
}

/// The current time in milliseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Time since `start`, in microseconds.
pub(crate) fn us_since(start: Instant) -> u64 {
    start.elapsed().as_micros() as u64
}

pub(crate) fn us(d: Duration) -> u64 {
    d.as_micros() as u64
}
