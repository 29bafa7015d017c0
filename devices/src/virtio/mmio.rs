//! The virtio-mmio transport, version 2 ("modern") register layout (virtio 1.x, 4.2.2).
//!
//! Runs on vCPU threads: every register access is a VM exit. The one register on the hot path,
//! QueueNotify, is normally served by a KVM ioeventfd without exiting at all; if an access does
//! reach us, it is forwarded to the same eventfd so request processing always happens on the
//! device event loop, never here.

use std::sync::{Arc, Mutex};

use virtio_queue::QueueT;

use super::{VirtioDevice, VirtioInterrupt, features, status};
use crate::bus::{BusDevice, lock_device};

/// Size of each device's MMIO window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4d56_5652; // "RVVM"

mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Offset of the QueueNotify register, where the VMM places its ioeventfds.
pub const QUEUE_NOTIFY_OFFSET: u64 = reg::QUEUE_NOTIFY;

/// The MMIO window of one virtio device.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
}

impl MmioTransport {
    /// Creates the transport in front of `device`.
    pub fn new(device: Arc<Mutex<dyn VirtioDevice>>) -> Self {
        Self { device }
    }

    /// The device behind this window.
    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    fn read_register(&self, dev: &dyn VirtioDevice, offset: u64) -> u32 {
        let core = dev.core();
        let queue = core.queues.get(core.selectors.queue as usize);
        match offset {
            reg::MAGIC => MAGIC_VALUE,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => core.device_type as u32,
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match core.selectors.device_features {
                0 => core.avail_features as u32,
                1 => (core.avail_features >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => core.interrupt.status(),
            reg::STATUS => core.status,
            // No shared memory regions: length reads as all ones ("does not exist").
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => core.config_generation,
            _ => {
                core.guest_error("read of a write-only or unknown register", format_args!("offset {offset:#x}"));
                0
            }
        }
    }

    fn write_register(&mut self, dev: &mut dyn VirtioDevice, offset: u64, value: u32) {
        let core_status = dev.core().status;
        // Queue and feature setup is only allowed before the driver says it is done.
        let configuring = core_status & status::DRIVER_OK == 0;
        match offset {
            reg::DEVICE_FEATURES_SEL => dev.core_mut().selectors.device_features = value,
            reg::DRIVER_FEATURES_SEL => dev.core_mut().selectors.driver_features = value,
            reg::DRIVER_FEATURES => {
                if core_status & status::DRIVER == 0 || core_status & status::FEATURES_OK != 0 {
                    dev.core()
                        .guest_error("feature write outside negotiation", format_args!("status {core_status:#x}"));
                    return;
                }
                let core = dev.core_mut();
                let (shift, mask) = match core.selectors.driver_features {
                    0 => (0, 0xffff_ffffu64),
                    1 => (32, 0xffff_ffff_0000_0000u64),
                    _ => return,
                };
                core.acked_features = (core.acked_features & !mask) | ((u64::from(value) << shift) & mask);
            }
            reg::QUEUE_SEL => dev.core_mut().selectors.queue = value,
            reg::QUEUE_NOTIFY => {
                if let Some(evt) = dev.core().queue_events.get(value as usize) {
                    let _ = evt.write(1);
                } else {
                    dev.core().guest_error("notify of a nonexistent queue", format_args!("queue {value}"));
                }
            }
            reg::INTERRUPT_ACK => dev.core().interrupt.acknowledge(value),
            reg::STATUS => self.write_status(dev, value),
            reg::QUEUE_NUM
            | reg::QUEUE_READY
            | reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH => {
                let sel = dev.core().selectors.queue as usize;
                let core = dev.core_mut();
                let Some(q) = core.queues.get_mut(sel).filter(|_| configuring) else {
                    dev.core().guest_error(
                        "queue write after DRIVER_OK or to a nonexistent queue",
                        format_args!("queue {sel}"),
                    );
                    return;
                };
                match offset {
                    reg::QUEUE_NUM => q.set_size(value as u16),
                    reg::QUEUE_READY => q.set_ready(value == 1),
                    reg::QUEUE_DESC_LOW => q.set_desc_table_address(Some(value), None),
                    reg::QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(value)),
                    reg::QUEUE_DRIVER_LOW => q.set_avail_ring_address(Some(value), None),
                    reg::QUEUE_DRIVER_HIGH => q.set_avail_ring_address(None, Some(value)),
                    reg::QUEUE_DEVICE_LOW => q.set_used_ring_address(Some(value), None),
                    _ => q.set_used_ring_address(None, Some(value)),
                }
            }
            reg::SHM_SEL => {}
            _ => dev.core().guest_error("write to a read-only or unknown register", format_args!("offset {offset:#x}")),
        }
    }

    /// The device status state machine (virtio 1.x, 3.1.1).
    fn write_status(&mut self, dev: &mut dyn VirtioDevice, value: u32) {
        let old = dev.core().status;
        if value == 0 {
            dev.reset();
            dev.core_mut().reset();
            dev.core_mut().selectors = Default::default();
            return;
        }
        if value & old != old {
            dev.core().guest_error("status bits cleared without a reset", format_args!("{old:#x} -> {value:#x}"));
            return;
        }
        let newly = value & !old;
        let mut accepted = value;
        if newly & status::FEATURES_OK != 0 {
            let core = dev.core();
            let unsupported = core.acked_features & !core.avail_features;
            if unsupported != 0 || core.acked_features & features::VERSION_1 == 0 {
                // Leaving FEATURES_OK clear tells the driver the features were refused.
                core.guest_error("features refused", format_args!("acked {:#x}", core.acked_features));
                accepted &= !status::FEATURES_OK;
            }
        }
        if newly & status::DRIVER_OK != 0 {
            if old & status::FEATURES_OK == 0 && value & status::FEATURES_OK == 0 {
                dev.core().guest_error("DRIVER_OK without FEATURES_OK", format_args!("{value:#x}"));
                accepted &= !status::DRIVER_OK;
            } else {
                let event_idx = dev.core().has_feature(features::RING_EVENT_IDX);
                for q in &mut dev.core_mut().queues {
                    q.set_event_idx(event_idx);
                }
                match dev.core().check_queues().and_then(|()| dev.activate()) {
                    Ok(()) => dev.core_mut().activated = true,
                    Err(e) => {
                        dev.core().guest_error("activation failed", format_args!("{e}"));
                        accepted |= status::DEVICE_NEEDS_RESET;
                        dev.core_mut().status = accepted;
                        dev.core().interrupt.signal(VirtioInterrupt::CONFIG_CHANGE);
                        return;
                    }
                }
            }
        }
        dev.core_mut().status = accepted;
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let device = self.device.clone();
        let dev = lock_device(&device);
        if offset >= reg::CONFIG {
            let config = dev.config_space();
            let start = (offset - reg::CONFIG) as usize;
            for (i, byte) in data.iter_mut().enumerate() {
                *byte = config.get(start + i).copied().unwrap_or(0);
            }
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            dev.core().guest_error("unaligned or non-32-bit register read", format_args!("offset {offset:#x}"));
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(&*dev, offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let device = self.device.clone();
        let mut dev = lock_device(&device);
        if offset >= reg::CONFIG {
            dev.write_config(offset - reg::CONFIG, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            dev.core().guest_error("unaligned or non-32-bit register write", format_args!("offset {offset:#x}"));
            return;
        }
        let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        self.write_register(&mut *dev, offset, value);
    }
}
