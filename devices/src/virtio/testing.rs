//! Test harness for device models: guest memory, virtqueues placed in it, a driver-side way to
//! offer chains, and an interrupt line that counts.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use virtio_queue::desc::{RawDescriptor, split::Descriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use super::VirtioCore;
use crate::SharedGuestMem;
use crate::interrupt::InterruptLine;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
/// Where mock queue `i` lives in guest memory.
pub fn queue_base(i: usize) -> GuestAddress {
    GuestAddress(0x1_0000 * (i as u64 + 1))
}

#[derive(Default)]
pub struct CountingIrq(pub AtomicUsize);

impl InterruptLine for CountingIrq {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

pub fn memory() -> SharedGuestMem {
    GuestMemoryAtomic::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap())
}

/// Builds mock queues at `queue_base(i)` and installs them, ready, into `core`; the device
/// counts as activated.
pub fn install(core: &mut VirtioCore, sizes: &[u16]) {
    let mem = core.memory.memory();
    for (i, &size) in sizes.iter().enumerate() {
        let mock = MockSplitQueue::create(&*mem, queue_base(i), size);
        let queue: Queue = mock.create_queue().unwrap();
        core.queues[i] = queue;
    }
    core.activated = true;
}

/// Makes a chain available on queue `i` the way a driver does: descriptors written at
/// `first_index`.., the head appended to the avail ring, the avail index bumped. Flags
/// (address, length, flags); NEXT is added automatically.
pub fn add_chain(core: &VirtioCore, i: usize, descs: &[(u64, u32, u16)], first_index: u16) {
    let mem = core.mem();
    let q = &core.queues[i];
    let size = q.size();
    for (n, &(addr, len, flags)) in descs.iter().enumerate() {
        let index = (first_index + n as u16) % size;
        let next = if n + 1 < descs.len() { flags | F_NEXT } else { flags };
        let desc = RawDescriptor::from(Descriptor::new(addr, len, next, (index + 1) % size));
        mem.write_obj(desc, GuestAddress(q.desc_table() + 16 * u64::from(index))).unwrap();
    }
    let avail = q.avail_ring();
    let idx: u16 = mem.read_obj(GuestAddress(avail + 2)).unwrap();
    mem.write_obj(first_index % size, GuestAddress(avail + 4 + 2 * u64::from(idx % size))).unwrap();
    mem.write_obj(idx.wrapping_add(1), GuestAddress(avail + 2)).unwrap();
}

/// Number of used elements so far, and every element's (id, len), read straight from guest
/// memory (re-creating a MockSplitQueue would reset the rings).
pub fn used(core: &VirtioCore, i: usize) -> (u16, Vec<(u32, u32)>) {
    let mem = core.mem();
    let (used, size) = (core.queues[i].used_ring(), core.queues[i].size());
    let idx: u16 = mem.read_obj(GuestAddress(used + 2)).unwrap();
    let elems = (0..idx)
        .map(|n| {
            let at = used + 4 + 8 * u64::from(n % size);
            (mem.read_obj::<u32>(GuestAddress(at)).unwrap(), mem.read_obj::<u32>(GuestAddress(at + 4)).unwrap())
        })
        .collect();
    (idx, elems)
}

pub fn irq() -> (Arc<CountingIrq>, Box<dyn InterruptLine>) {
    let irq = Arc::new(CountingIrq::default());
    (irq.clone(), Box::new(irq))
}

/// Gives `old` driver-set state that a fresh device does not have (selectors, a config
/// generation, a status, queue positions), exports it, sends it through serde (JSON), imports
/// it into `new` and checks that `new` then exports exactly the same state.
pub fn assert_state_moves<D: super::VirtioDevice>(old: &mut D, new: &mut D) {
    use crate::lifecycle::{DeviceState, Lifecycle};
    let core = old.core_mut();
    core.selectors = super::Selectors { device_features: 1, driver_features: 1, queue: 1 };
    core.config_generation = 3;
    core.status = super::status::ACKNOWLEDGE | super::status::DRIVER | super::status::FEATURES_OK;
    old.quiesce();
    let state = old.export_state();
    let back: DeviceState = serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();
    assert_eq!(back, state, "the state survives serde");
    assert_ne!(new.export_state(), state, "the new device starts elsewhere");
    new.quiesce();
    new.import_state(&back).unwrap();
    assert_eq!(new.export_state(), state, "the new device continues where the old one stopped");
    new.resume();
    old.resume();
}
