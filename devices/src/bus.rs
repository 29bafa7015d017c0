//! Address-range buses that dispatch guest port I/O and MMIO accesses to devices.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

/// A device on a bus. `offset` is relative to the base of the range the device was inserted at;
/// `data.len()` is the access size (1, 2, 4 or 8 bytes).
pub trait BusDevice: Send {
    /// A guest read: fills `data` with the register contents at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A guest write of `data` to the register at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);

    /// A string write (`rep outs`): `data` holds several `unit`-byte writes to one register,
    /// delivered by a single VM exit. Devices that can batch (the serial console) override it.
    fn write_units(&mut self, offset: u64, unit: usize, data: &[u8]) {
        for chunk in data.chunks(unit.max(1)) {
            self.write(offset, chunk);
        }
    }
}

/// A device shared between the bus and whoever else drives it (e.g. serial input).
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Locks a device, recovering from poisoning: a device that panicked mid-access is still better
/// served than a VMM that cascades the panic into every vCPU thread.
pub fn lock_device<T: ?Sized>(device: &Mutex<T>) -> MutexGuard<'_, T> {
    device.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A half-open address range `[base, base + len)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BusRange {
    /// First address (port number or guest physical address).
    pub base: u64,
    /// Length in bytes; a range on a bus is never empty.
    pub len: u64,
}

impl BusRange {
    /// The range `[base, base + len)`.
    pub const fn new(base: u64, len: u64) -> Self {
        Self { base, len }
    }

    fn end(&self) -> u64 {
        self.base.saturating_add(self.len)
    }

    fn overlaps(&self, other: &BusRange) -> bool {
        self.base < other.end() && other.base < self.end()
    }
}

impl fmt::Display for BusRange {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{:#x}..{:#x}", self.base, self.end())
    }
}

/// Why a device cannot be placed on a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The range overlaps one already taken.
    #[error("bus range {new} overlaps the device already at {existing}")]
    Overlap {
        /// The range asked for.
        new: BusRange,
        /// The range of the device already there.
        existing: BusRange,
    },
    /// The range has length zero; the value is its base.
    #[error("bus range at {0:#x} is empty")]
    Empty(u64),
}

struct Entry {
    range: BusRange,
    name: &'static str,
    device: SharedDevice,
}

/// A set of devices keyed by non-overlapping address ranges.
#[derive(Default)]
pub struct Bus {
    entries: BTreeMap<u64, Entry>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `range`; `name` is used in diagnostics.
    pub fn insert(&mut self, range: BusRange, name: &'static str, device: SharedDevice) -> Result<(), BusError> {
        if range.len == 0 {
            return Err(BusError::Empty(range.base));
        }
        if let Some(existing) = self.entries.values().find(|e| e.range.overlaps(&range)) {
            return Err(BusError::Overlap { new: range, existing: existing.range });
        }
        self.entries.insert(range.base, Entry { range, name, device });
        Ok(())
    }

    /// The device whose range holds the whole access `[addr, addr + len)`, with the offset.
    fn resolve(&self, addr: u64, len: usize) -> Option<(&Entry, u64)> {
        let (_, entry) = self.entries.range(..=addr).next_back()?;
        let offset = addr - entry.range.base;
        (offset.checked_add(len as u64)? <= entry.range.len).then_some((entry, offset))
    }

    /// Dispatches a read; returns false (and leaves `data` alone) if no device claims it.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((entry, offset)) => {
                lock_device(&entry.device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false if no device claims it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((entry, offset)) => {
                lock_device(&entry.device).write(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a string write of `unit`-byte units; returns false if no device claims it.
    pub fn write_units(&self, addr: u64, unit: usize, data: &[u8]) -> bool {
        match self.resolve(addr, unit.min(data.len())) {
            Some((entry, offset)) => {
                lock_device(&entry.device).write_units(offset, unit, data);
                true
            }
            None => false,
        }
    }

    /// `(range, name)` of every device, in address order.
    pub fn devices(&self) -> impl Iterator<Item = (BusRange, &'static str)> + '_ {
        self.entries.values().map(|e| (e.range, e.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_with_offsets() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Recorder::default()));
        let b = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(BusRange::new(0x3f8, 8), "a", a.clone()).unwrap();
        bus.insert(BusRange::new(0x400, 4), "b", b.clone()).unwrap();

        let mut data = [0u8; 1];
        assert!(bus.read(0x3fd, &mut data));
        assert_eq!(data, [5]);
        assert!(bus.write(0x401, &[1, 2]));
        assert_eq!(b.lock().unwrap().writes, vec![(1, vec![1, 2])]);
        assert!(a.lock().unwrap().writes.is_empty());
    }

    #[test]
    fn string_writes_arrive_as_units() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(BusRange::new(0x3f8, 8), "d", dev.clone()).unwrap();
        assert!(bus.write_units(0x3f8, 1, b"abc"));
        assert!(bus.write_units(0x3fa, 2, &[1, 2, 3, 4]));
        assert!(!bus.write_units(0x400, 1, b"x"));
        let writes = &dev.lock().unwrap().writes;
        assert_eq!(writes.len(), 5);
        assert_eq!(writes[2], (0, b"c".to_vec()));
        assert_eq!(writes[4], (2, vec![3, 4]));
    }

    #[test]
    fn misses_outside_and_across_ranges() {
        let mut bus = Bus::new();
        bus.insert(BusRange::new(0x10, 4), "d", Arc::new(Mutex::new(Recorder::default()))).unwrap();
        let mut data = [0xaa; 4];
        assert!(!bus.read(0xf, &mut data[..1]));
        assert!(!bus.read(0x14, &mut data[..1]));
        // Starts inside but runs past the end.
        assert!(!bus.read(0x12, &mut data));
        assert_eq!(data, [0xaa; 4]);
        assert!(!bus.write(u64::MAX, &[0; 4]));
    }

    #[test]
    fn rejects_overlaps_and_empty_ranges() {
        let mut bus = Bus::new();
        let dev = || Arc::new(Mutex::new(Recorder::default()));
        bus.insert(BusRange::new(0x100, 0x10), "a", dev()).unwrap();
        assert!(matches!(bus.insert(BusRange::new(0x10f, 1), "b", dev()), Err(BusError::Overlap { .. })));
        assert!(matches!(bus.insert(BusRange::new(0xf0, 0x11), "c", dev()), Err(BusError::Overlap { .. })));
        assert_eq!(bus.insert(BusRange::new(0x200, 0), "d", dev()), Err(BusError::Empty(0x200)));
        bus.insert(BusRange::new(0x110, 1), "e", dev()).unwrap();
        assert_eq!(bus.devices().count(), 2);
    }
}
