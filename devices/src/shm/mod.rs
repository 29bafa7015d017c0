//! The register window of a shared-memory region (see [`swarm_ring::window`] for the layout the
//! guest sees). The window only describes: mapping the region as guest RAM, and wiring the
//! doorbells to KVM's ioeventfd and irqfd, is the VMM's part. Doorbell writes normally never
//! reach this model (KVM completes them in the kernel); those that do name no peer and are
//! counted, never acted on.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use swarm_ring::window::{MAGIC, VERSION, WindowState, reg};

use crate::bus::BusDevice;

/// What a window says about its region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowContents {
    /// This VM's party.
    pub party: u16,
    /// Parties in the region.
    pub parties: u16,
    /// The region's guest-physical address.
    pub addr: u64,
    /// Its size in bytes.
    pub size: u64,
}

#[derive(Debug)]
struct Registers {
    state: WindowState,
    contents: Option<WindowContents>,
    generation: u32,
    detach_acked: bool,
}

/// One window, shared by the MMIO bus (the guest's side) and the VMM (which attaches and
/// detaches regions).
#[derive(Debug)]
pub struct ShmWindow {
    regs: Mutex<Registers>,
    acked: Condvar,
    stray_doorbells: AtomicU64,
}

impl Default for ShmWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl ShmWindow {
    /// An empty window.
    pub fn new() -> Self {
        let regs = Registers { state: WindowState::Empty, contents: None, generation: 0, detach_acked: false };
        Self { regs: Mutex::new(regs), acked: Condvar::new(), stray_doorbells: AtomicU64::new(0) }
    }

    fn regs(&self) -> MutexGuard<'_, Registers> {
        self.regs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The window's state.
    pub fn state(&self) -> WindowState {
        self.regs().state
    }

    /// What it describes, while a region is attached or detaching.
    pub fn contents(&self) -> Option<WindowContents> {
        self.regs().contents
    }

    /// Doorbell writes that named no peer.
    pub fn stray_doorbells(&self) -> u64 {
        self.stray_doorbells.load(Ordering::Relaxed)
    }

    /// Shows a region the VMM has just mapped.
    pub fn attached(&self, contents: WindowContents) {
        let mut regs = self.regs();
        regs.state = WindowState::Attached;
        regs.contents = Some(contents);
        regs.generation = regs.generation.wrapping_add(1);
        regs.detach_acked = false;
    }

    /// Asks the guest to stop touching the region.
    pub fn request_detach(&self) {
        let mut regs = self.regs();
        if regs.state == WindowState::Attached {
            regs.state = WindowState::Detaching;
            regs.generation = regs.generation.wrapping_add(1);
            regs.detach_acked = false;
        }
    }

    /// Waits up to `timeout` for the guest's acknowledgement; true if it came.
    pub fn wait_detach_ack(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut regs = self.regs();
        while !regs.detach_acked {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            regs = self.acked.wait_timeout(regs, left).unwrap_or_else(|p| p.into_inner()).0;
        }
        true
    }

    /// Shows the window empty again, once the VMM unmapped the region.
    pub fn detached(&self) {
        let mut regs = self.regs();
        regs.state = WindowState::Empty;
        regs.contents = None;
        regs.generation = regs.generation.wrapping_add(1);
    }

    fn register(&self, offset: u64) -> u32 {
        let regs = self.regs();
        let c = regs.contents.unwrap_or(WindowContents { party: 0, parties: 0, addr: 0, size: 0 });
        match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::STATE => regs.state as u32,
            reg::PARTY => u32::from(c.party),
            reg::PARTIES => u32::from(c.parties),
            reg::GENERATION => regs.generation,
            reg::ADDR_LO => c.addr as u32,
            reg::ADDR_HI => (c.addr >> 32) as u32,
            reg::SIZE_LO => c.size as u32,
            reg::SIZE_HI => (c.size >> 32) as u32,
            _ => 0,
        }
    }
}

/// The bus's handle on a window.
pub struct ShmWindowDevice(pub Arc<ShmWindow>);

impl BusDevice for ShmWindowDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if data.len() == 4 {
            data.copy_from_slice(&self.0.register(offset).to_le_bytes());
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            reg::DETACH_ACK => {
                let mut regs = self.0.regs();
                if regs.state == WindowState::Detaching {
                    regs.detach_acked = true;
                    self.0.acked.notify_all();
                }
            }
            reg::DOORBELL => {
                self.0.stray_doorbells.fetch_add(1, Ordering::Relaxed);
            }
            _ => log::debug!("shm window: write of {} bytes to {offset:#x} ignored", data.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(dev: &mut ShmWindowDevice, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        dev.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn the_window_describes_its_region_and_changes_generation() {
        let window = Arc::new(ShmWindow::new());
        let mut dev = ShmWindowDevice(window.clone());
        assert_eq!(read(&mut dev, reg::MAGIC), MAGIC);
        assert_eq!(read(&mut dev, reg::STATE), WindowState::Empty as u32);
        let g0 = read(&mut dev, reg::GENERATION);
        window.attached(WindowContents { party: 1, parties: 2, addr: 0x3_0000_0000, size: 1 << 20 });
        assert_eq!(read(&mut dev, reg::STATE), WindowState::Attached as u32);
        assert_eq!(read(&mut dev, reg::ADDR_HI), 3);
        assert_eq!(read(&mut dev, reg::SIZE_LO), 1 << 20);
        assert_eq!(read(&mut dev, reg::PARTY), 1);
        assert_ne!(read(&mut dev, reg::GENERATION), g0);
        // Odd widths read as zero rather than half a register.
        let mut byte = [0xffu8; 1];
        dev.read(reg::MAGIC, &mut byte);
        assert_eq!(byte, [0]);
    }

    #[test]
    fn a_detach_waits_for_the_guest_and_gives_up_at_its_deadline() {
        let window = Arc::new(ShmWindow::new());
        let mut dev = ShmWindowDevice(window.clone());
        // An acknowledgement before a request means nothing.
        dev.write(reg::DETACH_ACK, &1u32.to_le_bytes());
        window.attached(WindowContents { party: 0, parties: 2, addr: 0, size: 4096 });
        window.request_detach();
        assert!(!window.wait_detach_ack(Duration::from_millis(10)), "no acknowledgement yet");
        let waiter = {
            let window = window.clone();
            std::thread::spawn(move || window.wait_detach_ack(Duration::from_secs(10)))
        };
        dev.write(reg::DETACH_ACK, &1u32.to_le_bytes());
        assert!(waiter.join().unwrap());
        window.detached();
        assert_eq!(window.state(), WindowState::Empty);
        dev.write(reg::DOORBELL, &7u32.to_le_bytes());
        assert_eq!(window.stray_doorbells(), 1);
    }
}
