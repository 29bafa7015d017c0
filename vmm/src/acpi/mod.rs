//! ACPI tables: how a Linux guest finds its CPUs, its IOAPIC and its virtio-mmio devices.
//!
//! The MP table (see [`crate::boot::mptable`]) covers CPUs and interrupts, but distribution
//! kernels can only find virtio-mmio devices through ACPI (see [`dsdt`]), so the VMM also
//! provides a minimal hardware-reduced ACPI platform:
//!
//! ```text
//! RSDP -> XSDT -> FADT (hardware-reduced) -> DSDT (\_SB: COM1, one device per virtio window)
//!              -> MADT (local APICs, IOAPIC)
//! ```
//!
//! [`build`] lays every table out in one buffer for a given guest address (pure, tested byte
//! by byte and through `iasl -d`); [`write`] puts it at [`ACPI_TABLES_ADDR`], inside the BIOS
//! area the e820 map reserves. The guest is told the RSDP address through the boot protocol
//! (`boot_params.acpi_rsdp_addr` or PVH's `rsdp_paddr`); it also sits where a legacy scan of
//! 0xe0000..0xfffff would find it.

pub mod aml;
pub mod dsdt;
pub mod tables;

#[cfg(test)]
mod iasl_tests;

use vm_memory::{Bytes, GuestAddress};

use crate::boot::layout::{BIOS_AREA_START, MPTABLE_ADDR};
use crate::memory::GuestMem;
use dsdt::MAX_MMIO_DEVICES;
pub use dsdt::SHM_WINDOW_COMPATIBLE;
use tables::{FADT_LEN, MAX_CPUS, RSDP_LEN};

/// Guest-physical region reserved for ACPI tables (already reserved in the e820 map by the
/// boot code): 0xe0000..0xf0000, just below the MP table.
pub const ACPI_TABLES_ADDR: u64 = 0xe_0000;
pub const ACPI_TABLES_MAX: usize = 0x1_0000;
const _: () = assert!(
    ACPI_TABLES_ADDR >= BIOS_AREA_START
        && ACPI_TABLES_ADDR + ACPI_TABLES_MAX as u64 <= MPTABLE_ADDR
        && ACPI_TABLES_ADDR.is_multiple_of(16),
    "the ACPI area must be 16-byte aligned inside the reserved BIOS area, below the MP table"
);
/// Pins on KVM's in-kernel IOAPIC (`KVM_IOAPIC_NUM_PINS`): the GSIs a device can use.
pub const IOAPIC_PINS: u32 = 24;

/// One virtio-mmio window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioDevice {
    pub base: u64,
    pub size: u64,
    /// The GSI (IOAPIC pin) the device raises.
    pub irq: u32,
}

/// What the tables describe.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AcpiConfig {
    pub vcpus: u32,
    pub virtio_mmio: Vec<MmioDevice>,
    pub shm_windows: Vec<ShmWindowAcpi>,
}

/// A shared-memory window as the DSDT describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShmWindowAcpi {
    /// The register page.
    pub base: u64,
    pub size: u64,
    /// The range the window's region is mapped in when attached.
    pub region_base: u64,
    pub region_span: u64,
    pub irq: u32,
}

/// Every table, laid out for one guest address.
#[derive(Clone, Debug)]
pub struct AcpiTables {
    /// The tables, laid out to be copied to the `base` passed to [`build`].
    pub bytes: Vec<u8>,
    /// Where the RSDP lands: `base` rounded up to 16 bytes.
    pub rsdp_addr: u64,
    /// The DSDT alone (also inside `bytes`), for the tests that decode it.
    #[cfg_attr(not(test), expect(dead_code))]
    pub dsdt: Vec<u8>,
}

/// Why the ACPI tables could not be built or written.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The configuration has no vCPU.
    #[error("the ACPI tables need at least one vCPU")]
    NoCpus,
    /// More vCPUs (the count given) than the MADT can describe.
    #[error("{0} vCPUs cannot be described in the MADT (at most {MAX_CPUS})")]
    TooManyCpus(u32),
    /// More virtio-mmio devices (the count given) than the DSDT can name.
    #[error("{0} virtio-mmio devices cannot be named in the DSDT (at most {MAX_MMIO_DEVICES})")]
    TooManyDevices(usize),
    /// A virtio-mmio window is empty or does not end below 4 GiB.
    #[error("virtio-mmio window {index} at {base:#x} of {size:#x} bytes must be non-empty and lie below 4 GiB")]
    BadWindow {
        /// The window's position in the device list.
        index: usize,
        /// Its guest physical base address.
        base: u64,
        /// Its length in bytes.
        size: u64,
    },
    /// A virtio-mmio window's interrupt is not an IOAPIC pin.
    #[error(
        "virtio-mmio window {index} uses IRQ {irq}; the IOAPIC has pins 0 to {}",
        IOAPIC_PINS - 1
    )]
    BadIrq {
        /// The window's position in the device list.
        index: usize,
        /// The interrupt line given.
        irq: u32,
    },
    /// The tables outgrow the guest memory area reserved for them.
    #[error("the ACPI tables need {size} bytes; the area reserved for them holds {max}")]
    TooLarge {
        /// Bytes the tables need, from the base address.
        size: usize,
        /// Bytes the area holds.
        max: usize,
    },
    /// Copying the tables into guest memory failed.
    #[error("cannot write ACPI tables to guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// The byte that makes `bytes` plus itself sum to zero (mod 256), as every ACPI checksum
/// requires.
pub(crate) fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b)))
}

fn validate(config: &AcpiConfig) -> Result<(), AcpiError> {
    match config.vcpus {
        0 => return Err(AcpiError::NoCpus),
        n if n > MAX_CPUS => return Err(AcpiError::TooManyCpus(n)),
        _ => {}
    }
    if config.virtio_mmio.len() > MAX_MMIO_DEVICES {
        return Err(AcpiError::TooManyDevices(config.virtio_mmio.len()));
    }
    for (index, d) in config.virtio_mmio.iter().enumerate() {
        // Memory32Fixed holds 32-bit base and length.
        let end = d.base.checked_add(d.size);
        if d.size == 0 || end.is_none_or(|end| end > 1 << 32) {
            return Err(AcpiError::BadWindow { index, base: d.base, size: d.size });
        }
        if d.irq >= IOAPIC_PINS {
            return Err(AcpiError::BadIrq { index, irq: d.irq });
        }
    }
    Ok(())
}

/// Builds every table for `config`, laid out to be copied to guest address `base`: the RSDP
/// at `base` rounded up to 16 bytes (where the ACPI spec wants it), then the XSDT, FADT, MADT
/// and DSDT, each 8-byte aligned.
pub fn build(config: &AcpiConfig, base: u64) -> Result<AcpiTables, AcpiError> {
    validate(config)?;
    if config.shm_windows.len() > 10 {
        return Err(AcpiError::TooManyDevices(config.shm_windows.len()));
    }
    let dsdt = dsdt::dsdt(&config.virtio_mmio, &config.shm_windows);
    let madt = tables::madt(config.vcpus);

    let rsdp_addr = base.next_multiple_of(16);
    let xsdt_addr = (rsdp_addr + RSDP_LEN as u64).next_multiple_of(8);
    let fadt_addr = (xsdt_addr + tables::xsdt_len(2) as u64).next_multiple_of(8);
    let madt_addr = (fadt_addr + FADT_LEN as u64).next_multiple_of(8);
    let dsdt_addr = (madt_addr + madt.len() as u64).next_multiple_of(8);
    let size = (dsdt_addr - base) as usize + dsdt.len();
    if size > ACPI_TABLES_MAX {
        return Err(AcpiError::TooLarge { size, max: ACPI_TABLES_MAX });
    }

    let mut bytes = vec![0u8; size];
    let mut place = |addr: u64, table: &[u8]| {
        let off = (addr - base) as usize;
        bytes[off..off + table.len()].copy_from_slice(table);
    };
    place(rsdp_addr, &tables::rsdp(xsdt_addr));
    place(xsdt_addr, &tables::xsdt(&[fadt_addr, madt_addr]));
    place(fadt_addr, &tables::fadt(dsdt_addr));
    place(madt_addr, &madt);
    place(dsdt_addr, &dsdt);
    Ok(AcpiTables { bytes, rsdp_addr, dsdt })
}

/// Builds the tables at [`ACPI_TABLES_ADDR`] and writes them into guest memory; returns the
/// RSDP address to hand to the guest.
pub fn write(mem: &GuestMem, config: &AcpiConfig) -> Result<u64, AcpiError> {
    let tables = build(config, ACPI_TABLES_ADDR)?;
    mem.write_slice(&tables.bytes, GuestAddress(ACPI_TABLES_ADDR))?;
    Ok(tables.rsdp_addr)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The configuration of a typical VM: 4 vCPUs, three virtio-mmio windows.
    pub(crate) fn realistic() -> AcpiConfig {
        AcpiConfig {
            vcpus: 4,
            virtio_mmio: (0..3)
                .map(|i| MmioDevice { base: 0xd000_0000 + i * 0x1000, size: 0x1000, irq: 5 + i as u32 })
                .collect(),
            shm_windows: vec![ShmWindowAcpi {
                base: 0xe000_0000,
                size: 0x1000,
                region_base: 8 << 30,
                region_span: 1 << 30,
                irq: 23,
            }],
        }
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    fn sums_to_zero(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b)) == 0
    }

    /// The table at guest address `addr` in tables built at `base`, by its header's length.
    pub(crate) fn table_at(t: &AcpiTables, base: u64, addr: u64) -> &[u8] {
        let off = (addr - base) as usize;
        let len = u32_at(&t.bytes, off + 4) as usize;
        &t.bytes[off..off + len]
    }

    /// The tables the XSDT lists, found by following the RSDP.
    pub(crate) fn xsdt_entries(t: &AcpiTables, base: u64) -> Vec<u64> {
        let rsdp = &t.bytes[(t.rsdp_addr - base) as usize..][..36];
        let xsdt = table_at(t, base, u64_at(rsdp, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        xsdt[36..].chunks(8).map(|c| u64_at(c, 0)).collect()
    }

    #[test]
    fn rsdp_xsdt_fadt_madt_dsdt_chain() {
        let base = ACPI_TABLES_ADDR;
        let t = build(&realistic(), base).unwrap();
        assert_eq!(t.rsdp_addr, base);
        let rsdp = &t.bytes[..36];
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(sums_to_zero(&rsdp[..20]) && sums_to_zero(rsdp));

        let entries = xsdt_entries(&t, base);
        assert_eq!(entries.len(), 2);
        let fadt = table_at(&t, base, entries[0]);
        let madt = table_at(&t, base, entries[1]);
        assert_eq!(&fadt[..4], b"FACP");
        assert_eq!(&madt[..4], b"APIC");
        let dsdt = table_at(&t, base, u64_at(fadt, 140));
        assert_eq!(dsdt, &t.dsdt[..], "X_DSDT points at the DSDT");
        assert_eq!(madt, &tables::madt(4)[..]);

        let xsdt = table_at(&t, base, u64_at(rsdp, 24));
        for table in [xsdt, fadt, madt, dsdt] {
            assert_eq!(u32_at(table, 4) as usize, table.len());
            assert!(sums_to_zero(table), "{:?}", std::str::from_utf8(&table[..4]));
            assert_eq!(&table[10..16], b"RUSTVM");
            assert_eq!(&table[16..24], b"MICROVM ");
        }
        for addr in [u64_at(rsdp, 24), entries[0], entries[1], u64_at(fadt, 140)] {
            assert_eq!(addr % 8, 0, "tables are 8-byte aligned");
            assert!(addr < base + ACPI_TABLES_MAX as u64);
        }
        assert_eq!(t.bytes.len(), (u64_at(fadt, 140) - base) as usize + dsdt.len());
    }

    #[test]
    fn the_rsdp_is_16_byte_aligned_at_any_base() {
        let base = 0xe_0004;
        let t = build(&realistic(), base).unwrap();
        assert_eq!(t.rsdp_addr, 0xe_0010);
        assert_eq!(&t.bytes[..12], &[0; 12]);
        assert_eq!(&t.bytes[12..20], b"RSD PTR ");
        let entries = xsdt_entries(&t, base);
        assert_eq!(&table_at(&t, base, entries[1])[..4], b"APIC");
    }

    #[test]
    fn no_virtio_devices_leaves_just_com1() {
        let t = build(&AcpiConfig { vcpus: 1, virtio_mmio: Vec::new(), shm_windows: Vec::new() }, ACPI_TABLES_ADDR)
            .unwrap();
        assert_eq!(t.dsdt, dsdt::dsdt(&[], &[]));
        assert!(!t.dsdt.windows(8).any(|w| w == b"LNRO0005"));
    }

    #[test]
    fn bad_vcpu_counts_are_errors() {
        let mut c = realistic();
        c.vcpus = 0;
        assert!(matches!(build(&c, ACPI_TABLES_ADDR), Err(AcpiError::NoCpus)));
        c.vcpus = MAX_CPUS + 1;
        assert!(matches!(build(&c, ACPI_TABLES_ADDR), Err(AcpiError::TooManyCpus(255))));
        c.vcpus = MAX_CPUS;
        assert!(build(&c, ACPI_TABLES_ADDR).is_ok());
    }

    fn windows(n: usize) -> Vec<MmioDevice> {
        (0..n)
            .map(|i| MmioDevice { base: 0xd000_0000 + i as u64 * 0x1000, size: 0x1000, irq: 5 + (i as u32 % 19) })
            .collect()
    }

    #[test]
    fn tables_that_do_not_fit_the_area_are_an_error() {
        let mut c = AcpiConfig { vcpus: MAX_CPUS, virtio_mmio: windows(1000), shm_windows: Vec::new() };
        let fits = build(&c, ACPI_TABLES_ADDR).unwrap();
        assert!(fits.bytes.len() <= ACPI_TABLES_MAX);
        c.virtio_mmio = windows(1100);
        let err = build(&c, ACPI_TABLES_ADDR).unwrap_err();
        assert!(matches!(err, AcpiError::TooLarge { size, max: ACPI_TABLES_MAX } if size > ACPI_TABLES_MAX), "{err}");
        c.virtio_mmio = windows(MAX_MMIO_DEVICES + 1);
        assert!(matches!(build(&c, ACPI_TABLES_ADDR), Err(AcpiError::TooManyDevices(1297))));
    }

    #[test]
    fn bad_windows_and_irqs_are_errors() {
        let bad = |d: MmioDevice| {
            let mut c = realistic();
            c.virtio_mmio.push(d);
            build(&c, ACPI_TABLES_ADDR).unwrap_err()
        };
        let above_4g = bad(MmioDevice { base: 1 << 32, size: 0x1000, irq: 8 });
        assert!(matches!(above_4g, AcpiError::BadWindow { index: 3, .. }));
        assert!(matches!(bad(MmioDevice { base: 0xffff_f000, size: 0x2000, irq: 8 }), AcpiError::BadWindow { .. }));
        assert!(matches!(bad(MmioDevice { base: u64::MAX, size: 2, irq: 8 }), AcpiError::BadWindow { .. }));
        assert!(matches!(bad(MmioDevice { base: 0xd000_3000, size: 0, irq: 8 }), AcpiError::BadWindow { .. }));
        let irq = bad(MmioDevice { base: 0xd000_3000, size: 0x1000, irq: 24 });
        assert!(matches!(irq, AcpiError::BadIrq { index: 3, irq: 24 }));
        assert_eq!(irq.to_string(), "virtio-mmio window 3 uses IRQ 24; the IOAPIC has pins 0 to 23");
        // The last page below 4 GiB is fine.
        let mut c = realistic();
        c.virtio_mmio.push(MmioDevice { base: 0xffff_f000, size: 0x1000, irq: 23 });
        assert!(build(&c, ACPI_TABLES_ADDR).is_ok());
    }

    #[test]
    fn write_puts_the_tables_in_guest_memory() {
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let rsdp = write(&mem, &realistic()).unwrap();
        assert_eq!(rsdp, ACPI_TABLES_ADDR);
        let expected = build(&realistic(), ACPI_TABLES_ADDR).unwrap().bytes;
        let mut got = vec![0u8; expected.len()];
        mem.read_slice(&mut got, GuestAddress(ACPI_TABLES_ADDR)).unwrap();
        assert_eq!(got, expected);
    }

    #[test]
    fn write_without_memory_there_is_an_error() {
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 0x8_0000)]).unwrap();
        assert!(matches!(write(&mem, &realistic()), Err(AcpiError::Memory(_))));
    }
}
