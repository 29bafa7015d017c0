//! What every virtio device has in common, and the trait each device implements.

use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use event_manager::EventSet;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryLoadGuard};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::DeviceType;
use crate::interrupt::InterruptLine;
use crate::ratelimit::LogOnce;
use crate::{GuestMem, SharedGuestMem};

/// The virtio-mmio interrupt: a status register the driver reads and acknowledges, and the
/// line that tells it to look.
pub struct VirtioInterrupt {
    status: AtomicU32,
    line: Box<dyn InterruptLine>,
}

impl VirtioInterrupt {
    /// Bit 0 of InterruptStatus: a used buffer was added.
    pub const USED_BUFFER: u32 = 1;
    /// Bit 1: the configuration space changed.
    pub const CONFIG_CHANGE: u32 = 2;

    /// Creates the interrupt with no status bits set, raising `line` when signalled.
    pub fn new(line: Box<dyn InterruptLine>) -> Self {
        Self { status: AtomicU32::new(0), line }
    }

    /// The InterruptStatus register: the reasons raised since the driver last acknowledged them.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Clears `bits` from the status (the driver's InterruptACK write).
    pub fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Sets `bits` in the status and raises the interrupt line; a failure to raise it is logged.
    pub fn signal(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = self.line.trigger() {
            log::warn!("virtio: cannot raise interrupt: {e}");
        }
    }
}

/// Why a device could not start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The queue with this index has a bad size or ring addresses outside guest memory.
    #[error("queue {0} is not valid (size or ring addresses outside guest memory)")]
    InvalidQueue(usize),
    /// The driver did not set QueueReady on the queue with this index.
    #[error("the driver did not enable queue {0}")]
    QueueNotReady(usize),
    /// A device-specific failure, described by the message.
    #[error("{0}")]
    Device(String),
}

/// A file descriptor a device wants the event loop to watch (its backend's), and the token
/// its events come back with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventSource {
    /// The descriptor to watch; the device keeps owning it.
    pub fd: RawFd,
    /// Passed back to [`VirtioDevice::handle_event`] when the descriptor is ready.
    pub token: u32,
    /// The readiness events to watch for.
    pub events: EventSet,
}

/// Which half of the feature words and which queue the driver's next register accesses mean.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Selectors {
    /// DeviceFeaturesSel: which 32-bit word of the device features DeviceFeatures shows.
    pub device_features: u32,
    /// DriverFeaturesSel: which 32-bit word of the driver features DriverFeatures sets.
    pub driver_features: u32,
    /// QueueSel: the queue the Queue* registers refer to.
    pub queue: u32,
}

/// The state every virtio device embeds and the transport manages (see [`VirtioDevice::core`]):
/// negotiated features, queues and their notification eventfds, the interrupt, and whether the
/// device is taking requests.
pub struct VirtioCore {
    /// What kind of device this is (the DeviceID register).
    pub device_type: DeviceType,
    /// Feature bits the device offers.
    pub avail_features: u64,
    /// Feature bits the driver wrote to DriverFeatures.
    pub acked_features: u64,
    /// The device status register (bits from [`status`](super::status)).
    pub status: u32,
    /// The virtqueues, indexed as the driver selects them.
    pub queues: Vec<Queue>,
    /// One per queue; KVM signals them (ioeventfd) when the guest writes QueueNotify.
    pub queue_events: Vec<EventFd>,
    /// The device's interrupt, shared with whatever completes its requests.
    pub interrupt: Arc<VirtioInterrupt>,
    /// Bumped whenever the device changes its configuration space.
    pub config_generation: u32,
    /// The transport's selector registers: device state the driver set, so they live here
    /// (and move with [`Lifecycle::export_state`](crate::lifecycle::Lifecycle::export_state)).
    pub selectors: Selectors,
    /// Guest memory, where the rings and buffers live.
    pub memory: SharedGuestMem,
    /// Set once the driver wrote DRIVER_OK and the queues checked out.
    pub activated: bool,
    /// How many parties hold the device quiesced (a backend swap and a memory swap may overlap):
    /// while any does, no new requests are taken from the avail rings.
    quiesce_holds: u32,
    /// Queues notified while quiesced (bit per queue), replayed on resume.
    pub pending_notifications: u64,
    /// Guest-caused errors, reported once per kind.
    pub guest_errors: LogOnce<&'static str>,
}

impl VirtioCore {
    /// Creates the state of a device in reset, with one queue (and notification eventfd) per
    /// entry of `queue_sizes`, each entry the queue's maximum size.
    pub fn new(
        device_type: DeviceType,
        avail_features: u64,
        queue_sizes: &[u16],
        interrupt: Box<dyn InterruptLine>,
        memory: SharedGuestMem,
    ) -> std::io::Result<Self> {
        let queues = queue_sizes
            .iter()
            .map(|&size| Queue::new(size).map_err(|e| std::io::Error::other(format!("{e:?}"))))
            .collect::<std::io::Result<Vec<_>>>()?;
        let queue_events =
            queue_sizes.iter().map(|_| EventFd::new(EFD_NONBLOCK)).collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self {
            device_type,
            avail_features,
            acked_features: 0,
            status: 0,
            queues,
            queue_events,
            interrupt: Arc::new(VirtioInterrupt::new(interrupt)),
            config_generation: 0,
            selectors: Selectors::default(),
            memory,
            activated: false,
            quiesce_holds: 0,
            pending_notifications: 0,
            guest_errors: LogOnce::new(64),
        })
    }

    /// Whether the driver acknowledged feature `bit` (a mask, e.g.
    /// [`features::VERSION_1`](super::features::VERSION_1)).
    pub fn has_feature(&self, bit: u64) -> bool {
        self.acked_features & bit != 0
    }

    /// Whether the chain at `head` of queue `index` uses an indirect table the device never
    /// offered (reported once as a guest error): its descriptors must not be followed.
    pub fn indirect_not_negotiated(&self, index: usize, head: u16) -> bool {
        let refused = !self.has_feature(super::features::RING_INDIRECT_DESC)
            && uses_indirect_table(&self.queues[index], &*self.mem(), head);
        if refused {
            self.guest_error("indirect descriptor not negotiated", format_args!("queue {index}"));
        }
        refused
    }

    /// The current guest memory mappings (kept alive while the guard lives).
    pub fn mem(&self) -> GuestMemoryLoadGuard<GuestMem> {
        self.memory.memory()
    }

    /// Reports a guest mistake once per kind.
    pub fn guest_error(&self, kind: &'static str, detail: std::fmt::Arguments) {
        if self.guest_errors.first(kind) {
            log::warn!("{} device: {kind}: {detail} (reported once)", self.device_type.name());
        }
    }

    /// Tells the driver the configuration space changed (e.g. a new disk size).
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt.signal(VirtioInterrupt::CONFIG_CHANGE);
    }

    /// Whether anyone holds the device quiesced.
    pub fn quiesced(&self) -> bool {
        self.quiesce_holds > 0
    }

    /// Takes one hold on the device: it stops taking requests at the next request boundary.
    pub fn hold_quiesced(&mut self) {
        self.quiesce_holds += 1;
    }

    /// Gives back one hold; returns true when that was the last and the device runs again.
    /// Unbalanced releases are ignored.
    pub fn release_quiesced(&mut self) -> bool {
        self.quiesce_holds = self.quiesce_holds.saturating_sub(1);
        self.quiesce_holds == 0
    }

    /// Records a notification that arrived while quiesced; returns true if it may be processed now
    /// (false while quiesced, or when the device is not activated yet).
    pub fn accept_notification(&mut self, queue: usize) -> bool {
        if self.quiesced() {
            self.pending_notifications |= 1 << queue;
            return false;
        }
        self.activated
    }

    /// Checks that every queue the driver enabled is usable, for DRIVER_OK.
    pub fn check_queues(&self) -> Result<(), ActivateError> {
        let mem = self.mem();
        for (i, q) in self.queues.iter().enumerate() {
            if !q.ready() {
                return Err(ActivateError::QueueNotReady(i));
            }
            if !q.is_valid(&*mem) {
                return Err(ActivateError::InvalidQueue(i));
            }
        }
        Ok(())
    }

    /// Returns the device to its reset state (queues unconfigured, features cleared).
    pub fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.acked_features = 0;
        self.status = 0;
        self.activated = false;
        self.pending_notifications = 0;
        self.interrupt.acknowledge(u32::MAX);
    }

    /// Adds a used element and raises the interrupt if the driver wants one.
    pub fn complete(&mut self, queue: usize, head: u16, len: u32) {
        let mem = self.mem();
        let q = &mut self.queues[queue];
        if let Err(e) = q.add_used(&*mem, head, len) {
            drop(mem);
            self.guest_error("bad used ring", format_args!("queue {queue}: {e:?}"));
            return;
        }
        self.notify_if_needed(queue);
    }

    /// For a device that found `queue` out of buffers: asks the driver to kick when it adds
    /// some, and says whether some arrived meanwhile (look again). A broken avail ring (its
    /// index more than a queue's worth ahead, which nothing can be popped from) counts as
    /// empty, reported as a guest error: looking again would find the same nothing forever.
    pub fn rearm_notification(&mut self, queue: usize) -> bool {
        let mem = self.mem();
        let q = &mut self.queues[queue];
        if !matches!(q.enable_notification(&*mem), Ok(true)) {
            return false;
        }
        match q.avail_idx(&*mem, std::sync::atomic::Ordering::Acquire) {
            Ok(idx) if idx.0.wrapping_sub(q.next_avail()) <= q.size() => true,
            _ => {
                self.guest_error("avail index beyond the queue size", format_args!("queue {queue}"));
                false
            }
        }
    }

    /// Raises the used-buffer interrupt unless the driver suppressed notifications for `queue`.
    pub fn notify_if_needed(&mut self, queue: usize) {
        let mem = self.mem();
        let needed = self.queues[queue].needs_notification(&*mem).unwrap_or(true);
        if needed {
            self.interrupt.signal(VirtioInterrupt::USED_BUFFER);
        }
    }
}

/// Pops available descriptor chains with notification suppression handled the way the spec
/// requires: notifications are disabled while draining and re-enabled (and re-checked, so a
/// buffer added in between is not missed) when the ring looks empty.
pub struct QueueProcessor;

/// Chains one pass over a queue takes before other work gets its turn.
pub const PASS_BUDGET: usize = 64;

impl QueueProcessor {
    /// Calls `handle` for each available chain of `core.queues[index]` until the ring is empty,
    /// `handle` returns false (e.g. no room in the backend), or [`PASS_BUDGET`] chains were
    /// taken; returns how many it took. A pass that hits the budget signals the queue's own
    /// event again, so the event loop serves every other device before it comes back: a guest
    /// that keeps its ring full cannot keep the device thread to itself.
    pub fn drain(
        core: &mut VirtioCore,
        index: usize,
        mut handle: impl FnMut(&mut VirtioCore, DescriptorChain<GuestMemoryLoadGuard<GuestMem>>) -> bool,
    ) -> usize {
        let mut taken = 0;
        loop {
            let mem = core.mem();
            if core.queues[index].disable_notification(&*mem).is_err() {
                core.guest_error("bad avail ring", format_args!("queue {index}"));
                return taken;
            }
            loop {
                if core.quiesced() {
                    return taken;
                }
                let guard = core.mem();
                let chain = match core.queues[index].iter(guard) {
                    Ok(mut iter) => iter.next(),
                    Err(e) => {
                        core.guest_error("bad avail ring", format_args!("queue {index}: {e:?}"));
                        return taken;
                    }
                };
                let Some(chain) = chain else { break };
                if taken == PASS_BUDGET {
                    QueueProcessor::unpop(core, index);
                    if let Err(e) = core.queue_events[index].write(1) {
                        core.guest_error("cannot re-arm a queue", format_args!("queue {index}: {e}"));
                    }
                    return taken;
                }
                taken += 1;
                // Indirect tables were never offered: following one would let the driver name
                // 65,535 descriptors per chain. Such a chain goes back unused.
                if core.indirect_not_negotiated(index, chain.head_index()) {
                    let (head, mem) = (chain.head_index(), core.mem());
                    if core.queues[index].add_used(&*mem, head, 0).is_err() {
                        core.guest_error("bad used ring", format_args!("queue {index}"));
                        return taken;
                    }
                    core.pending_notifications |= 1 << index;
                    continue;
                }
                if !handle(core, chain) {
                    return taken;
                }
            }
            match core.queues[index].enable_notification(&*mem) {
                Ok(true) => continue,
                Ok(false) => return taken,
                Err(e) => {
                    core.guest_error("bad avail ring", format_args!("queue {index}: {e:?}"));
                    return taken;
                }
            }
        }
    }

    /// Puts the last popped chain back (the backend could not take it yet).
    pub fn unpop(core: &mut VirtioCore, index: usize) {
        core.queues[index].go_to_previous_position();
    }
}

/// Whether the chain from `head` reaches a descriptor flagged INDIRECT, walking the queue's
/// descriptor table (at most its size: a looping chain ends the walk).
pub fn uses_indirect_table<M: vm_memory::GuestMemory>(queue: &Queue, mem: &M, head: u16) -> bool {
    use vm_memory::{Address, Bytes};
    const F_NEXT: u16 = 1;
    const F_INDIRECT: u16 = 4;
    let (table, size) = (queue.desc_table(), queue.size());
    let mut index = head;
    for _ in 0..size {
        if index >= size {
            return false;
        }
        let at = vm_memory::GuestAddress(table + u64::from(index) * 16);
        let Ok(flags) = mem.read_obj::<u16>(at.unchecked_add(12)) else { return false };
        if flags & F_INDIRECT != 0 {
            return true;
        }
        if flags & F_NEXT == 0 {
            return false;
        }
        let Ok(next) = mem.read_obj::<u16>(at.unchecked_add(14)) else { return false };
        index = next;
    }
    false
}

/// A virtio device model. The transport calls the configuration side from vCPU threads; the
/// [`DeviceWorker`](super::DeviceWorker) calls the processing side from the event loop.
pub trait VirtioDevice: Send {
    /// The state shared by every device type.
    fn core(&self) -> &VirtioCore;
    /// The state shared by every device type, mutably.
    fn core_mut(&mut self) -> &mut VirtioCore;

    /// The device-specific configuration space, as the driver reads it.
    fn config_space(&self) -> Vec<u8>;
    /// A driver write into the configuration space (most devices have nothing writable).
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// The driver set DRIVER_OK and the queues are valid: start taking requests.
    fn activate(&mut self) -> Result<(), ActivateError>;
    /// The driver reset the device: forget everything tied to the old queues.
    fn reset(&mut self);

    /// The guest notified queue `index`.
    fn queue_notified(&mut self, index: usize);
    /// File descriptors to watch besides the queue notifications (backend readiness).
    fn event_sources(&self) -> Vec<EventSource>;
    /// One of [`event_sources`](Self::event_sources) became ready.
    fn handle_event(&mut self, token: u32, events: EventSet);

    /// Requests handed to the backend and not yet completed.
    fn in_flight(&self) -> usize;
    /// Makes progress on in-flight requests without taking new ones (used while draining).
    fn poll_backend(&mut self);
}
