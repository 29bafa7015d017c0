//! Shared-memory windows: regions of a swarm fabric mapped as guest RAM, and their doorbells
//! wired into KVM, attached at start or while the guest runs and detached again.
//!
//! Per window: a 4 KiB register page ([`ShmWindow`]) on the MMIO bus, an interrupt line, a
//! guest-physical range for the region and a KVM memory slot. Attaching maps the region's
//! memfd, adds the memory slot, routes this VM's doorbell into the window's interrupt
//! (irqfd) and makes the guest's writes to the doorbell register signal each peer's doorbell
//! in the kernel (an ioeventfd per peer, matched on the party written). Nothing here pauses
//! the vCPUs: KVM updates memory slots and eventfd routes under a running guest.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use devices::bus::{Bus, BusRange};
use devices::shm::{ShmWindow, ShmWindowDevice, WindowContents};
use serde::Serialize;
use swarm_fabric::{Attachment, FabricError};
use swarm_ring::window::{WINDOW_SIZE, WindowState, reg};

use crate::config::ShmConfig;
use crate::hv::{HvError, KvmVm, MemSlot};
use crate::memory::layout::{SHM_REGION_SPAN, SHM_WINDOW_BASE, shm_region_base};

/// KVM memory slots for regions start here, far from guest RAM's.
const FIRST_SHM_MEMSLOT: u32 = 32;

/// Why a window could not be attached or detached.
#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    /// No such window.
    #[error("no shared-memory window {0} (the VM has {1}; see shm_windows)")]
    NoWindow(u32, u32),
    /// The window holds a region already.
    #[error("window {0} holds region {1:?} already: detach it first")]
    Busy(u32, String),
    /// The VM replicates to a shadow, which could not carry the region.
    #[error("the VM is replicating to a shadow, which cannot carry a shared region: stop replication first")]
    Replicating,
    /// The window holds no region.
    #[error("window {0} holds no region")]
    Empty(u32),
    /// The fabric refused or failed.
    #[error(transparent)]
    Fabric(#[from] FabricError),
    /// The region does not fit the window's span.
    #[error("region {region:?} is {size} bytes; a window maps at most {SHM_REGION_SPAN}")]
    TooBig {
        /// The region.
        region: String,
        /// Its size.
        size: u64,
    },
    /// The region's party in the request is not the one the fabric handed over.
    #[error("mapping region {region:?}: {source}")]
    Map {
        /// The region.
        region: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Another VM already sleeps on this party's doorbell (KVM lets one irqfd use an eventfd).
    #[error("party {party} of region {region:?} is taken: its doorbell is wired into another VM already")]
    PartyTaken {
        /// The region.
        region: String,
        /// The party.
        party: u16,
    },
    /// KVM refused a memory slot or an eventfd route.
    #[error("wiring region {region:?} into KVM: {source}")]
    Kvm {
        /// The region.
        region: String,
        /// The error.
        #[source]
        source: HvError,
    },
}

/// A window as `GET /shm` shows it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ShmStatus {
    /// The window's number.
    pub window: u32,
    /// `empty`, `attached` or `detaching`.
    pub state: &'static str,
    /// Its register page's guest-physical address.
    pub mmio_base: u64,
    /// Its interrupt line.
    pub irq: u32,
    /// The region held, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<ShmConfig>,
    /// Where the region is mapped in the guest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_addr: Option<u64>,
    /// The region's size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Parties in the region.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parties: Option<u16>,
    /// Doorbell writes that named no peer (its own party, or none).
    pub stray_doorbells: u64,
    /// Set on a detach the guest did not acknowledge in time: the region was taken anyway.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub forced: bool,
}

/// A region mapped into the guest.
struct Mapped {
    config: ShmConfig,
    files: Attachment,
    host_addr: *mut u8,
    size: u64,
}

// SAFETY: the mapping is owned by this struct and only handed to KVM; nothing in the VMM reads
// or writes through the pointer.
unsafe impl Send for Mapped {}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: our own mapping; the memory slot using it was removed first (see detach) or
        // the VM is being torn down with its vCPUs stopped.
        unsafe { libc::munmap(self.host_addr as *mut libc::c_void, self.size as usize) };
    }
}

struct Window {
    index: u32,
    base: u64,
    irq: u32,
    guest_addr: u64,
    registers: Arc<ShmWindow>,
    mapped: Mutex<Option<Mapped>>,
}

/// The VM's shared-memory windows.
pub struct ShmWindows {
    windows: Vec<Window>,
}

impl ShmWindows {
    /// `count` empty windows on `mmio`, with interrupt lines `irqs` and region ranges above
    /// `ram_bytes` of RAM.
    pub fn new(count: u32, irqs: &[u32], ram_bytes: u64, mmio: &mut Bus) -> Result<Self, devices::bus::BusError> {
        let mut windows = Vec::new();
        for (index, &irq) in (0..count).zip(irqs) {
            let base = SHM_WINDOW_BASE + u64::from(index) * WINDOW_SIZE;
            let registers = Arc::new(ShmWindow::new());
            mmio.insert(
                BusRange::new(base, WINDOW_SIZE),
                "shm-window",
                Arc::new(Mutex::new(ShmWindowDevice(registers.clone()))),
            )?;
            let guest_addr = shm_region_base(ram_bytes, index);
            windows.push(Window { index, base, irq, guest_addr, registers, mapped: Mutex::new(None) });
        }
        Ok(Self { windows })
    }

    /// The kernel command-line announcements: `shm.window=ADDRESS:IRQ` for each window (the
    /// microguest reads them), and for Linux, which finds the windows in the DSDT, the
    /// `compatible` its generic UIO driver is to bind (each window then is a `/dev/uioN` whose
    /// maps are the register page and the region).
    pub fn cmdline_entries(&self) -> Vec<String> {
        let mut entries: Vec<String> =
            self.windows.iter().map(|w| format!("shm.window={:#x}:{}", w.base, w.irq)).collect();
        if !self.windows.is_empty() {
            entries.push(format!("uio_pdrv_genirq.of_id={}", crate::acpi::SHM_WINDOW_COMPATIBLE));
        }
        entries
    }

    /// The windows as the DSDT describes them.
    pub fn acpi_windows(&self) -> Vec<crate::acpi::ShmWindowAcpi> {
        let describe = |w: &Window| crate::acpi::ShmWindowAcpi {
            base: w.base,
            size: WINDOW_SIZE,
            region_base: w.guest_addr,
            region_span: SHM_REGION_SPAN,
            irq: w.irq,
        };
        self.windows.iter().map(describe).collect()
    }

    /// Whether any window holds a region (snapshots cannot carry one).
    pub fn any_attached(&self) -> bool {
        self.windows.iter().any(|w| lock(&w.mapped).is_some())
    }

    /// Every window.
    pub fn status(&self) -> Vec<ShmStatus> {
        self.windows.iter().map(|w| w.status(&lock(&w.mapped), false)).collect()
    }

    fn window(&self, index: u32) -> Result<&Window, ShmError> {
        self.windows.get(index as usize).ok_or(ShmError::NoWindow(index, self.windows.len() as u32))
    }

    /// Asks the fabric for `config`'s region, maps it into window `index` and wires its
    /// doorbells; the guest learns of it through the window's interrupt.
    pub fn attach(&self, kvm: &KvmVm, index: u32, config: &ShmConfig) -> Result<ShmStatus, ShmError> {
        let window = self.window(index)?;
        let mut mapped = lock(&window.mapped);
        if let Some(m) = mapped.as_ref() {
            return Err(ShmError::Busy(index, m.config.region.clone()));
        }
        let files = swarm_fabric::attach(&config.socket, &config.region, config.party)?;
        if files.size > SHM_REGION_SPAN {
            return Err(ShmError::TooBig { region: config.region.clone(), size: files.size });
        }
        let host_addr = map(&files).map_err(|source| ShmError::Map { region: config.region.clone(), source })?;
        let size = files.size;
        let new = Mapped { config: config.clone(), files, host_addr, size };
        let kvm_err = |source| ShmError::Kvm { region: config.region.clone(), source };
        let slot = window.memslot(&new);
        // SAFETY: the mapping lives in `new`, which the window keeps until the slot is removed.
        unsafe { kvm.set_memslot(&slot) }.map_err(kvm_err)?;
        if let Err(e) = window.wire(kvm, &new) {
            if kvm.remove_memslot(slot.slot).is_err() {
                // The slot may still point at the mapping: it must never be reused.
                log::error!("shm window {index}: the memory slot could not be removed; keeping its mapping");
                std::mem::forget(new);
                return Err(kvm_err(e));
            }
            if let HvError::Ioctl { op: "KVM_IRQFD", source } = &e
                && source.errno() == libc::EBUSY
            {
                return Err(ShmError::PartyTaken { region: config.region.clone(), party: config.party });
            }
            return Err(kvm_err(e));
        }
        let contents = WindowContents {
            party: new.files.party,
            parties: new.files.parties,
            addr: window.guest_addr,
            size: new.size,
        };
        window.registers.attached(contents);
        window.notify(&new);
        log::info!("shm window {index}: region {:?} attached as party {}", config.region, config.party);
        *mapped = Some(new);
        Ok(window.status(&mapped, false))
    }

    /// Asks the guest to let go of window `index`'s region, waits up to `timeout` for it to say
    /// so (a guest that does not is overruled: its accesses then reach no memory), and unmaps
    /// it.
    pub fn detach(&self, kvm: &KvmVm, index: u32, timeout: Duration) -> Result<ShmStatus, ShmError> {
        let window = self.window(index)?;
        let mut mapped = lock(&window.mapped);
        let Some(current) = mapped.as_ref() else { return Err(ShmError::Empty(index)) };
        window.registers.request_detach();
        window.notify(current);
        let forced = !window.registers.wait_detach_ack(timeout);
        if forced {
            log::warn!("shm window {index}: the guest did not let go of its region within {timeout:?}; taking it");
        }
        let region = current.config.region.clone();
        window.unwire(kvm, current);
        if let Err(source) = kvm.remove_memslot(window.memslot(current).slot) {
            // The guest may still reach the mapping: keep it (and the window busy).
            return Err(ShmError::Kvm { region, source });
        }
        let current = mapped.take().expect("checked above");
        window.registers.detached();
        drop(current);
        Ok(window.status(&mapped, forced))
    }
}

impl Window {
    fn memslot(&self, mapped: &Mapped) -> MemSlot {
        MemSlot {
            slot: FIRST_SHM_MEMSLOT + self.index,
            guest_addr: self.guest_addr,
            size: mapped.size,
            host_addr: mapped.host_addr as u64,
        }
    }

    /// Own doorbell -> the window's interrupt; doorbell register writes naming a peer -> that
    /// peer's doorbell.
    fn wire(&self, kvm: &KvmVm, mapped: &Mapped) -> Result<(), HvError> {
        let own = &mapped.files.doorbells[usize::from(mapped.files.party)];
        kvm.register_irqfd(own, self.irq)?;
        for (party, doorbell) in self.peers(mapped) {
            if let Err(e) = kvm.register_mmio_ioevent(doorbell, self.base + reg::DOORBELL, Some(party)) {
                self.unwire(kvm, mapped);
                return Err(e);
            }
        }
        Ok(())
    }

    fn unwire(&self, kvm: &KvmVm, mapped: &Mapped) {
        let own = &mapped.files.doorbells[usize::from(mapped.files.party)];
        if let Err(e) = kvm.unregister_irqfd(own, self.irq) {
            log::debug!("shm window {}: {e}", self.index);
        }
        for (party, doorbell) in self.peers(mapped) {
            // Fails only for a route never made (an attach that failed half-way).
            let _ = kvm.unregister_mmio_ioevent(doorbell, self.base + reg::DOORBELL, Some(party));
        }
    }

    fn peers<'a>(&self, mapped: &'a Mapped) -> impl Iterator<Item = (u32, &'a vmm_sys_util::eventfd::EventFd)> {
        let own = mapped.files.party;
        mapped
            .files
            .doorbells
            .iter()
            .enumerate()
            .filter(move |&(p, _)| p != usize::from(own))
            .map(|(p, d)| (p as u32, d))
    }

    /// Raises the window's interrupt (through this VM's own doorbell) so the guest rereads it.
    fn notify(&self, mapped: &Mapped) {
        let _ = mapped.files.doorbells[usize::from(mapped.files.party)].write(1);
    }

    fn status(&self, mapped: &Option<Mapped>, forced: bool) -> ShmStatus {
        let state = match self.registers.state() {
            WindowState::Empty => "empty",
            WindowState::Attached => "attached",
            WindowState::Detaching => "detaching",
        };
        ShmStatus {
            window: self.index,
            state,
            mmio_base: self.base,
            irq: self.irq,
            region: mapped.as_ref().map(|m| m.config.clone()),
            guest_addr: mapped.as_ref().map(|_| self.guest_addr),
            size: mapped.as_ref().map(|m| m.size),
            parties: mapped.as_ref().map(|m| m.files.parties),
            stray_doorbells: self.registers.stray_doorbells(),
            forced,
        }
    }
}

fn map(files: &Attachment) -> std::io::Result<*mut u8> {
    // SAFETY: a fresh shared mapping of the memfd at an address the kernel picks; checked.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            files.size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            files.memfd.as_raw_fd(),
            0,
        )
    };
    if map == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(map as *mut u8)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How long a detach waits for the guest by default.
pub const DEFAULT_DETACH_TIMEOUT: Duration = Duration::from_secs(2);
