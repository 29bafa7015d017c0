//! The backend lifecycle every device shares, written once.
//!
//! Replacing a component of a running VM (a backend swap, a snapshot, a switchover to a shadow)
//! needs three things from every device: stop at a request boundary, hand over state, start
//! again. [`Lifecycle`] provides them for any [`VirtioDevice`]: `quiesce` stops taking new
//! requests from the avail rings (guest notifications are remembered, never lost), `in_flight`
//! and `poll_backend` drain what the backend still holds, `export_state`/`import_state` move
//! queue state (features, ring addresses, avail/used indices, config space) to another device
//! instance, and `resume` lets the device take requests again, replaying a kick on every queue
//! so the event loop serves whatever arrived in the meantime. Quiesce holds nest (a backend
//! swap may overlap a memory swap): the device runs again only when every holder resumed it.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState};

use crate::virtio::Selectors;
use crate::virtio::VirtioDevice;

/// One virtqueue's transferable state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// Largest size the device allows, in descriptors.
    pub max_size: u16,
    /// Size the driver chose, in descriptors.
    pub size: u16,
    /// The driver enabled the queue.
    pub ready: bool,
    /// `VIRTIO_F_EVENT_IDX` notification suppression is in use.
    pub event_idx: bool,
    /// Guest physical address of the descriptor table.
    pub desc_table: u64,
    /// Guest physical address of the available (driver) ring.
    pub avail_ring: u64,
    /// Guest physical address of the used (device) ring.
    pub used_ring: u64,
    /// Index of the next available-ring entry the device will take.
    pub next_avail: u16,
    /// Index of the next used-ring entry the device will fill.
    pub next_used: u16,
}

impl From<QueueState> for QueueSnapshot {
    fn from(s: QueueState) -> Self {
        Self {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            event_idx: s.event_idx_enabled,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(s: QueueSnapshot) -> Self {
        QueueState {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

/// A device's transferable state: what a new instance needs to continue where this one stopped.
///
/// Whole by these rules: the driver-visible registers (features, status, selectors, queue
/// setup, interrupt status, configuration generation) are carried and imported; the
/// configuration space is derived from the device's settings and backend (capacity, MAC, CID),
/// so it is carried to be *checked*: a new instance that would show the guest another one is
/// refused. Requests in flight are never carried: every holder drains them before exporting
/// (a quiesced, drained device has none). What a backend keeps of its own (a vsock
/// connection's host socket) is the backend's rule, written where it lives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    /// Virtio device ID (2 for a block device, for instance); must match on import.
    pub device_type: u32,
    /// Feature bits the device offered.
    pub avail_features: u64,
    /// Feature bits the driver accepted; a subset of what the importing device offers.
    pub acked_features: u64,
    /// The device status register (`ACKNOWLEDGE`, `DRIVER`, `DRIVER_OK`, ... bits).
    pub status: u32,
    /// The driver set `DRIVER_OK` and the device activated.
    pub activated: bool,
    /// Pending interrupt reasons, as the interrupt status register shows them.
    pub interrupt_status: u32,
    /// The configuration generation counter the driver sees.
    pub config_generation: u32,
    /// The transport's feature and queue selector registers.
    pub selectors: Selectors,
    /// Every virtqueue's state, in queue order.
    pub queues: Vec<QueueSnapshot>,
    /// The configuration space as the driver sees it.
    pub config: Vec<u8>,
}

/// Why a [`DeviceState`] cannot be imported.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    /// The state belongs to another kind of device.
    #[error("state is for device type {found}, this device is type {expected}")]
    DeviceType {
        /// This device's virtio device ID.
        expected: u32,
        /// The device ID in the state.
        found: u32,
    },
    /// The state has a different number of queues.
    #[error("state has {found} queues, this device has {expected}")]
    QueueCount {
        /// Queues this device has.
        expected: usize,
        /// Queues in the state.
        found: usize,
    },
    /// The driver accepted features this device does not offer.
    #[error("the negotiated features {acked:#x} are not all offered by this device ({avail:#x})")]
    Features {
        /// Features acknowledged in the state.
        acked: u64,
        /// Features this device offers.
        avail: u64,
    },
    /// The queue with this index has a state the queue implementation rejects.
    #[error("queue {0} state is invalid")]
    Queue(usize),
    /// The device is not quiesced, or still has requests in flight.
    #[error("state can only be imported while the device is quiesced with nothing in flight")]
    Busy,
    /// The configuration space differs from the one the guest saw.
    #[error(
        "the guest saw a different configuration space ({found} bytes) than this device shows ({expected} bytes{differs})"
    )]
    Config {
        /// Length of this device's configuration space.
        expected: usize,
        /// Length of the configuration space in the state.
        found: usize,
        /// Where they first differ, as text for the message (empty when one is a prefix of the other).
        differs: String,
    },
}

/// Quiesce, drain, hand over, resume: the same for every device.
pub trait Lifecycle {
    /// Stops taking new requests at a request boundary; in-flight requests still complete.
    /// Holds nest: a device quiesced twice (a backend swap during a memory swap) runs again
    /// only after both have called [`resume`](Self::resume).
    fn quiesce(&mut self);
    /// Whether at least one quiesce hold is in place.
    fn is_quiesced(&self) -> bool;
    /// Requests still held by the backend.
    fn pending_requests(&self) -> usize;
    /// Makes progress on in-flight requests (call while waiting for them to drain).
    fn drive(&mut self);
    /// Descriptors that become ready when in-flight requests may have progressed: poll them
    /// between calls to [`drive`](Self::drive) instead of sleeping.
    fn progress_fds(&self) -> Vec<std::os::fd::RawFd>;
    /// Releases one quiesce hold; with none left, takes requests again, starting with any that
    /// arrived while quiesced.
    fn resume(&mut self);
    /// The state another instance needs to take over; meaningful once quiesced and drained.
    fn export_state(&self) -> DeviceState;
    /// Adopts another instance's state; only while quiesced and drained.
    fn import_state(&mut self, state: &DeviceState) -> Result<(), StateError>;
}

impl<D: VirtioDevice + ?Sized> Lifecycle for D {
    fn quiesce(&mut self) {
        self.core_mut().hold_quiesced();
    }

    fn is_quiesced(&self) -> bool {
        self.core().quiesced()
    }

    fn pending_requests(&self) -> usize {
        self.in_flight()
    }

    fn drive(&mut self) {
        self.poll_backend();
    }

    fn progress_fds(&self) -> Vec<std::os::fd::RawFd> {
        self.event_sources().into_iter().map(|s| s.fd).collect()
    }

    fn resume(&mut self) {
        let core = self.core_mut();
        if !core.release_quiesced() {
            return;
        }
        core.pending_notifications = 0;
        // With notifications suppressed the driver may not have kicked at all while we were
        // quiesced, so replay a kick on every queue. The device's event loop serves them, as
        // it serves the guest's own kicks: the caller (a swap, holding the device lock) is
        // done as soon as the device takes requests again.
        if core.activated {
            for kick in &core.queue_events {
                let _ = kick.write(1);
            }
        }
    }

    fn export_state(&self) -> DeviceState {
        let core = self.core();
        DeviceState {
            device_type: core.device_type as u32,
            avail_features: core.avail_features,
            acked_features: core.acked_features,
            status: core.status,
            activated: core.activated,
            interrupt_status: core.interrupt.status(),
            config_generation: core.config_generation,
            selectors: core.selectors,
            queues: core.queues.iter().map(|q| q.state().into()).collect(),
            config: self.config_space(),
        }
    }

    fn import_state(&mut self, state: &DeviceState) -> Result<(), StateError> {
        if !self.core().quiesced() || self.in_flight() != 0 {
            return Err(StateError::Busy);
        }
        let core = self.core();
        if state.device_type != core.device_type as u32 {
            return Err(StateError::DeviceType { expected: core.device_type as u32, found: state.device_type });
        }
        if state.queues.len() != core.queues.len() {
            return Err(StateError::QueueCount { expected: core.queues.len(), found: state.queues.len() });
        }
        if state.acked_features & !core.avail_features != 0 {
            return Err(StateError::Features { acked: state.acked_features, avail: core.avail_features });
        }
        let config = self.config_space();
        if config != state.config {
            let differs = match config.iter().zip(&state.config).position(|(a, b)| a != b) {
                Some(at) => format!(", first difference at byte {at}"),
                None => String::new(),
            };
            return Err(StateError::Config { expected: config.len(), found: state.config.len(), differs });
        }
        let queues = state
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| Queue::try_from(QueueState::from(*q)).map_err(|_| StateError::Queue(i)))
            .collect::<Result<Vec<_>, _>>()?;
        let core = self.core_mut();
        core.queues = queues;
        core.acked_features = state.acked_features;
        core.status = state.status;
        core.activated = state.activated;
        core.config_generation = state.config_generation;
        core.selectors = state.selectors;
        core.interrupt.acknowledge(u32::MAX);
        if state.interrupt_status != 0 {
            core.interrupt.signal(state.interrupt_status);
        }
        Ok(())
    }
}

/// Why a backend cannot take over without the guest noticing.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct Incompatible(pub String);

/// A device whose backend can be replaced while the guest runs. This is the only per-device
/// part of a swap; the transaction around it (quiesce, drain, switch, verify, commit or roll
/// back) is written once, over this trait and [`Lifecycle`].
pub trait BackendSlot: Lifecycle {
    /// The kind of backend the device holds (a trait object such as `dyn BlockBackend`).
    type Backend: ?Sized + Send;

    /// What the current backend is, in words.
    fn backend_description(&self) -> String;
    /// Whether `new` can take over from the current backend unnoticed (same capacity and
    /// read-only flag for a disk, a different socket for vsock, ...).
    fn check_compatible(&self, new: &Self::Backend) -> Result<(), Incompatible>;
    /// Installs `new` and returns the previous backend. Only while quiesced: with nothing in
    /// flight, after [`abandon_in_flight`](Self::abandon_in_flight), or where the device
    /// [`hands over in flight`](Self::hands_over_in_flight), with requests that then finish on
    /// the previous backend.
    fn replace_backend(&mut self, new: Box<Self::Backend>) -> Box<Self::Backend>;
    /// Whether requests in flight may stay with the previous backend across a switch, finishing
    /// there (through [`drain_previous`](Self::drain_previous)) while the new one serves: the
    /// swap then need not wait for them with the device stopped. Sound where the requests are
    /// independent of each other, as a disk's are (virtio orders nothing among requests in
    /// flight, and a driver flushes only what already completed).
    fn hands_over_in_flight(&self) -> bool {
        false
    }
    /// Requests still in flight on the previous backend (see
    /// [`hands_over_in_flight`](Self::hands_over_in_flight)). They are never abandoned: a swap
    /// whose previous backend does not finish them rolls back to it instead.
    fn in_flight_on_previous(&self) -> usize {
        0
    }
    /// Probation: while on, requests the backend fails are held back from the guest instead
    /// of being failed, so a rollback can retry them on the previous backend.
    fn set_probation(&mut self, on: bool);
    /// Requests that failed during probation (held, or counted where a device cannot hold).
    fn probation_failures(&self) -> u64;
    /// Gives up on requests the current backend still holds (it stalled): they are held and
    /// retried on whatever backend is installed next. Requests on the previous backend (see
    /// [`hands_over_in_flight`](Self::hands_over_in_flight)) are not touched. The abandoned
    /// backend may still finish them later (a stale write landing after its retry), so this is
    /// only for a backend that failed its health check and is about to be dropped; engines that
    /// hand buffers to the kernel or a thread wait a bounded time for them when dropped.
    fn abandon_in_flight(&mut self);
    /// While a new backend is on probation, the replaced one can still receive input that was
    /// in flight when it was replaced (a NIC's peer answering frames sent through it, a disk's
    /// requests handed over in flight). The swap calls this now and then during verification,
    /// and once more (`last`) just before it commits and closes `previous`, so the device can
    /// take that input. Most devices have none. Returns true when the device's event sources
    /// may have changed (this runs off the event loop, so the caller then asks the event loop
    /// to re-read them).
    fn drain_previous(&mut self, _previous: &mut Self::Backend, _last: bool) -> bool {
        false
    }
}
