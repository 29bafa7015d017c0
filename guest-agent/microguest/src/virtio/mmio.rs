//! The virtio-mmio register interface (virtio spec 4.2.2, version 2) and the generic device
//! initialization sequence (3.1.1).
use core::sync::atomic::{Ordering, fence};

use super::queue::Virtqueue;
use super::{DeviceDesc, Error, F_VERSION_1};
use crate::time::Deadline;

pub const MAGIC: u32 = 0x7472_6976; // "virt"

const MAGIC_VALUE: u64 = 0x000;
const VERSION: u64 = 0x004;
const DEVICE_ID: u64 = 0x008;
const VENDOR_ID: u64 = 0x00c;
const DEVICE_FEATURES: u64 = 0x010;
const DEVICE_FEATURES_SEL: u64 = 0x014;
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM_MAX: u64 = 0x034;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
pub const QUEUE_NOTIFY: u64 = 0x050;
const STATUS: u64 = 0x070;
const QUEUE_DESC_LOW: u64 = 0x080;
const QUEUE_DESC_HIGH: u64 = 0x084;
const QUEUE_DRIVER_LOW: u64 = 0x090;
const QUEUE_DRIVER_HIGH: u64 = 0x094;
const QUEUE_DEVICE_LOW: u64 = 0x0a0;
const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG: u64 = 0x100;

/// Device status bits (virtio spec 2.1).
pub const S_ACKNOWLEDGE: u32 = 1;
pub const S_DRIVER: u32 = 2;
pub const S_DRIVER_OK: u32 = 4;
pub const S_FEATURES_OK: u32 = 8;
pub const S_FAILED: u32 = 0x80;

/// How long a device may take to finish a reset.
const RESET_TIMEOUT_MS: u64 = 1000;
/// The boot page tables identity map this much; device windows must lie inside.
const IDENTITY_MAP_END: u64 = 16 << 30;

/// One virtio-mmio register window.
#[derive(Clone)]
pub struct Transport {
    base: u64,
    size: u64,
}

impl Transport {
    pub fn new(desc: DeviceDesc) -> Result<Transport, Error> {
        let usable = desc.size >= CONFIG
            && desc.base.is_multiple_of(4)
            && desc.base.checked_add(desc.size).is_some_and(|end| end <= IDENTITY_MAP_END);
        if !usable {
            return Err(Error::BadWindow { base: desc.base, size: desc.size });
        }
        Ok(Transport { base: desc.base, size: desc.size })
    }

    pub fn base(&self) -> u64 {
        self.base
    }

    fn read(&self, offset: u64) -> u32 {
        // SAFETY: `new` checked that the window lies inside the identity map and holds the
        // register block; the registers are naturally aligned.
        unsafe { core::ptr::read_volatile((self.base + offset) as *const u32) }
    }

    fn write(&self, offset: u64, value: u32) {
        // SAFETY: as in `read`.
        unsafe { core::ptr::write_volatile((self.base + offset) as *mut u32, value) }
    }

    /// (MagicValue, Version, DeviceID, VendorID).
    pub fn identify(&self) -> (u32, u32, u32, u32) {
        (self.read(MAGIC_VALUE), self.read(VERSION), self.read(DEVICE_ID), self.read(VENDOR_ID))
    }

    pub fn status(&self) -> u32 {
        self.read(STATUS)
    }

    fn add_status(&self, bits: u32) {
        self.write(STATUS, self.read(STATUS) | bits);
    }

    /// Resets the device and waits until it reads back as reset (spec 4.2.3.1).
    pub fn reset(&self) -> Result<(), Error> {
        self.write(STATUS, 0);
        let deadline = Deadline::after_ms(RESET_TIMEOUT_MS);
        while self.read(STATUS) != 0 {
            if deadline.expired() {
                return Err(Error::ResetTimeout);
            }
            crate::arch::pause();
        }
        Ok(())
    }

    /// Tells the device the driver gave up on it.
    pub fn fail(&self) {
        self.add_status(S_FAILED);
    }

    /// Steps 1-6 of device initialization (spec 3.1.1): reset, ACKNOWLEDGE, DRIVER, feature
    /// negotiation and FEATURES_OK. Accepts VIRTIO_F_VERSION_1 (required) and whatever of
    /// `supported` the device offers; returns the negotiated set. Sets FAILED on error.
    pub fn negotiate(&self, supported: u64) -> Result<u64, Error> {
        self.reset()?;
        self.add_status(S_ACKNOWLEDGE);
        self.add_status(S_DRIVER);
        let offered = self.device_features();
        if offered & F_VERSION_1 == 0 {
            self.fail();
            return Err(Error::NoVersion1);
        }
        let accepted = offered & (supported | F_VERSION_1);
        for half in 0..2u32 {
            self.write(DRIVER_FEATURES_SEL, half);
            self.write(DRIVER_FEATURES, (accepted >> (32 * half)) as u32);
        }
        self.add_status(S_FEATURES_OK);
        if self.status() & S_FEATURES_OK == 0 {
            self.fail();
            return Err(Error::FeaturesRejected { accepted });
        }
        Ok(accepted)
    }

    /// The device's 64-bit feature set.
    pub fn device_features(&self) -> u64 {
        let mut features = 0u64;
        for half in 0..2u32 {
            self.write(DEVICE_FEATURES_SEL, half);
            features |= u64::from(self.read(DEVICE_FEATURES)) << (32 * half);
        }
        features
    }

    /// Sets up queue `index` with at most `max_size` entries (spec 4.2.3.2). Rings are
    /// allocated here; the queue is enabled (QueueReady) before returning.
    pub fn setup_queue(&self, index: u16, max_size: u16) -> Result<Virtqueue, Error> {
        self.write(QUEUE_SEL, u32::from(index));
        if self.read(QUEUE_READY) != 0 {
            return Err(Error::QueueAlreadyReady { queue: index });
        }
        let device_max = self.read(QUEUE_NUM_MAX);
        if device_max == 0 {
            return Err(Error::QueueUnavailable { queue: index });
        }
        // Split queue sizes are powers of two; take the largest that both sides allow.
        let limit = device_max.min(u32::from(max_size)).min(32768);
        let size = 1u16 << (31 - limit.leading_zeros());
        let queue = Virtqueue::new(index, size, self.base + QUEUE_NOTIFY)?;
        let (desc, driver, device) = queue.addresses();
        self.write(QUEUE_NUM, u32::from(size));
        self.write(QUEUE_DESC_LOW, desc as u32);
        self.write(QUEUE_DESC_HIGH, (desc >> 32) as u32);
        self.write(QUEUE_DRIVER_LOW, driver as u32);
        self.write(QUEUE_DRIVER_HIGH, (driver >> 32) as u32);
        self.write(QUEUE_DEVICE_LOW, device as u32);
        self.write(QUEUE_DEVICE_HIGH, (device >> 32) as u32);
        // The ring contents (NO_INTERRUPT flag) must be visible before the device may use them.
        fence(Ordering::SeqCst);
        self.write(QUEUE_READY, 1);
        Ok(queue)
    }

    /// Step 8 of initialization: the device is live. Notifications are allowed from now on.
    pub fn driver_ok(&self) {
        fence(Ordering::SeqCst);
        self.add_status(S_DRIVER_OK);
    }

    /// Reads device configuration space consistently: `read` is repeated until the
    /// configuration generation is the same before and after it (spec 2.5.1 / 4.2.2.2).
    pub fn config<T>(&self, read: impl Fn(&ConfigSpace) -> T) -> T {
        let space = ConfigSpace { base: self.base + CONFIG, len: self.size - CONFIG };
        loop {
            let before = self.read(CONFIG_GENERATION);
            let value = read(&space);
            if self.read(CONFIG_GENERATION) == before {
                return value;
            }
        }
    }
}

/// The device-specific configuration space, read with accesses of each field's own width.
/// Reads past the window return 0.
pub struct ConfigSpace {
    base: u64,
    len: u64,
}

impl ConfigSpace {
    fn inside(&self, offset: u64, width: u64) -> bool {
        offset.is_multiple_of(width) && offset + width <= self.len
    }

    pub fn u8(&self, offset: u64) -> u8 {
        if !self.inside(offset, 1) {
            return 0;
        }
        // SAFETY: inside the device window checked by `Transport::new`.
        unsafe { core::ptr::read_volatile((self.base + offset) as *const u8) }
    }

    pub fn u16(&self, offset: u64) -> u16 {
        if !self.inside(offset, 2) {
            return 0;
        }
        // SAFETY: as above; aligned.
        u16::from_le(unsafe { core::ptr::read_volatile((self.base + offset) as *const u16) })
    }

    pub fn u32(&self, offset: u64) -> u32 {
        if !self.inside(offset, 4) {
            return 0;
        }
        // SAFETY: as above; aligned.
        u32::from_le(unsafe { core::ptr::read_volatile((self.base + offset) as *const u32) })
    }

    /// A 64-bit field, as two 32-bit reads (spec: wider reads are not atomic; the generation
    /// check in [`Transport::config`] makes the pair consistent).
    pub fn u64(&self, offset: u64) -> u64 {
        u64::from(self.u32(offset)) | (u64::from(self.u32(offset + 4)) << 32)
    }
}
