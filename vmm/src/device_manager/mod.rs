//! Virtio devices of one VM: where each lives (MMIO window, interrupt line), how it is wired
//! to KVM (irqfd, ioeventfd per queue), the event loop that runs them, and the registry the
//! control API walks.

pub mod backends;
mod block;
mod event_loop;
mod net;
mod registry;
pub mod shm;
mod vsock;

use std::sync::{Arc, Mutex};

use devices::bus::{Bus, BusRange, lock_device};
use devices::interrupt::{EventFdInterrupt, InterruptLine};
use devices::virtio::{DeviceWorker, MMIO_WINDOW_SIZE, MmioTransport, QUEUE_NOTIFY_OFFSET, ResyncHandle, VirtioDevice};

pub use event_loop::{EventLoop, EventLoopBuilder};
pub use registry::{DeviceHandle, Registered};

use crate::hv::{HvError, KvmVm};
use crate::memory::SharedGuestMem;
use crate::memory::layout::VIRTIO_MMIO_BASE;

/// First interrupt line for virtio devices (0-4 are the PIT, keyboard, cascade, COM2, COM1).
const FIRST_VIRTIO_IRQ: u32 = 5;
/// Last IOAPIC pin.
const LAST_IRQ: u32 = 23;

/// Where a device sits in the guest's physical address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioSlot {
    pub base: u64,
    pub size: u64,
    pub irq: u32,
}

impl MmioSlot {
    /// The kernel command-line announcement Linux (CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES) and
    /// the microguest read.
    pub fn cmdline_entry(&self) -> String {
        format!("virtio_mmio.device={}K@{:#x}:{}", self.size >> 10, self.base, self.irq)
    }
}

/// One registered device.
#[derive(Clone)]
pub struct DeviceEntry {
    pub id: String,
    pub slot: MmioSlot,
    pub handle: DeviceHandle,
    /// Wakes the device's worker after its event sources changed from outside the loop.
    pub resync: ResyncHandle,
}

/// Why a virtio device could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// Every virtio-mmio window is taken (one per interrupt line, GSI 5 to 23).
    #[error("no free virtio-mmio slot (interrupt lines {FIRST_VIRTIO_IRQ}-{LAST_IRQ} are all used)")]
    NoSlot,
    /// Registering the device's irqfd or a queue's ioeventfd with KVM failed.
    #[error("cannot wire device {id}: {source}")]
    Kvm {
        /// The device's id.
        id: String,
        /// The KVM error.
        #[source]
        source: HvError,
    },
    /// The device, its interrupt eventfd or its worker could not be created.
    #[error("cannot create device {id}: {source}")]
    Create {
        /// The device's id.
        id: String,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The device's backend could not be opened (file, NBD server, tap, socket), its MAC is
    /// invalid, or its MMIO window could not be placed on the bus.
    #[error("device {id}: {reason}")]
    Backend {
        /// The device's id.
        id: String,
        /// What went wrong, in words.
        reason: String,
    },
}

/// Builds the device set of a VM.
pub struct DeviceManagerBuilder {
    mmio: Bus,
    entries: Vec<DeviceEntry>,
    event_loop: EventLoopBuilder,
    memory: SharedGuestMem,
}

impl DeviceManagerBuilder {
    pub fn new(memory: SharedGuestMem) -> std::io::Result<Self> {
        Ok(Self { mmio: Bus::new(), entries: Vec::new(), event_loop: EventLoopBuilder::new()?, memory })
    }

    fn next_slot(&self) -> Result<MmioSlot, DeviceError> {
        let index = self.entries.len() as u32;
        let irq = FIRST_VIRTIO_IRQ + index;
        if irq > LAST_IRQ {
            return Err(DeviceError::NoSlot);
        }
        Ok(MmioSlot { base: VIRTIO_MMIO_BASE + u64::from(index) * MMIO_WINDOW_SIZE, size: MMIO_WINDOW_SIZE, irq })
    }

    /// Places a virtio device: allocates its window and interrupt, creates it with `make`,
    /// wires irqfd and one ioeventfd per queue, and hands it to the event loop.
    pub fn add<D, F>(
        &mut self,
        kvm: &KvmVm,
        id: &str,
        make: F,
        handle: impl FnOnce(Arc<Mutex<D>>) -> DeviceHandle,
    ) -> Result<MmioSlot, DeviceError>
    where
        D: VirtioDevice + 'static,
        F: FnOnce(Box<dyn InterruptLine>, SharedGuestMem) -> std::io::Result<D>,
    {
        let slot = self.next_slot()?;
        let kvm_err = |source| DeviceError::Kvm { id: id.to_string(), source };
        let create_err = |source| DeviceError::Create { id: id.to_string(), source };
        let irq = EventFdInterrupt::new().map_err(create_err)?;
        kvm.register_irqfd(irq.eventfd(), slot.irq).map_err(kvm_err)?;
        let device = Arc::new(Mutex::new(make(Box::new(irq), self.memory.clone()).map_err(create_err)?));
        {
            let dev = lock_device(&device);
            for (queue, evt) in dev.core().queue_events.iter().enumerate() {
                kvm.register_mmio_ioevent(evt, slot.base + QUEUE_NOTIFY_OFFSET, Some(queue as u32)).map_err(kvm_err)?;
            }
        }
        let transport = MmioTransport::new(device.clone());
        self.mmio
            .insert(BusRange::new(slot.base, slot.size), "virtio-mmio", Arc::new(Mutex::new(transport)))
            .map_err(|e| DeviceError::Backend { id: id.to_string(), reason: e.to_string() })?;
        let worker = DeviceWorker::new(device.clone()).map_err(create_err)?;
        let resync = worker.resync_handle();
        self.event_loop.add(Box::new(worker));
        self.entries.push(DeviceEntry { id: id.to_string(), slot, handle: handle(device), resync });
        Ok(slot)
    }

    /// `count` shared-memory windows, their interrupt lines taken from the top (virtio devices
    /// take theirs from the bottom), their regions placed above `ram_bytes` of RAM.
    pub fn add_shm_windows(&mut self, count: u32, ram_bytes: u64) -> Result<shm::ShmWindows, DeviceError> {
        let irqs: Vec<u32> = (0..count).map(|i| LAST_IRQ - i).collect();
        let virtio_top = FIRST_VIRTIO_IRQ + self.entries.len() as u32;
        if irqs.last().is_some_and(|&lowest| lowest < virtio_top) {
            return Err(DeviceError::NoSlot);
        }
        shm::ShmWindows::new(count, &irqs, ram_bytes, &mut self.mmio)
            .map_err(|e| DeviceError::Backend { id: "shm".into(), reason: e.to_string() })
    }

    /// The devices added so far, in order.
    pub fn entries(&self) -> &[DeviceEntry] {
        &self.entries
    }

    pub fn cmdline_entries(&self) -> Vec<String> {
        self.entries.iter().map(|e| e.slot.cmdline_entry()).collect()
    }

    pub fn slots(&self) -> Vec<MmioSlot> {
        self.entries.iter().map(|e| e.slot).collect()
    }

    /// Starts the event loop; returns the MMIO bus for the vCPUs and the running manager.
    pub fn start(self) -> std::io::Result<(Bus, DeviceManager)> {
        let event_loop = self.event_loop.start()?;
        Ok((self.mmio, DeviceManager { entries: self.entries, event_loop }))
    }
}

/// The devices of a running VM.
pub struct DeviceManager {
    entries: Vec<DeviceEntry>,
    event_loop: EventLoop,
}

impl DeviceManager {
    pub fn devices(&self) -> &[DeviceEntry] {
        &self.entries
    }

    pub fn find(&self, id: &str) -> Option<&DeviceEntry> {
        self.entries.iter().find(|e| e.id == id)
    }

    /// Stops device processing (after the vCPUs are stopped).
    pub fn stop(&mut self) {
        self.event_loop.stop();
    }
}
