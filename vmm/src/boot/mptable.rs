//! The Intel MultiProcessor Specification 1.4 table: how a guest without ACPI (and the
//! microguest) learns the CPUs, the IOAPIC and the ISA interrupt wiring.

use crate::memory::layout::{IOAPIC_BASE, LAPIC_BASE};

/// ISA interrupts routed 1:1 to IOAPIC pins, matching KVM's default GSI routing.
const ISA_IRQS: u8 = 16;
const SPEC_REV: u8 = 4;
const FLOATING_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const PROCESSOR_LEN: usize = 20;
const SMALL_ENTRY_LEN: usize = 8;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
/// Family 6, model/stepping left zero; features: FPU and APIC present.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

/// Most CPUs the table describes (xAPIC ids are 8 bits and 0xff is broadcast).
pub const MAX_CPUS: u32 = 254;

/// Size of the table for `cpus` processors.
pub fn size(cpus: u32) -> usize {
    FLOATING_LEN + HEADER_LEN + PROCESSOR_LEN * cpus as usize + SMALL_ENTRY_LEN * (2 + ISA_IRQS as usize + 2)
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b)))
}

/// Builds the floating pointer and configuration table for `cpus` CPUs (APIC ids 0..cpus),
/// to be placed at guest address `base`.
pub fn build(base: u64, cpus: u32) -> Vec<u8> {
    assert!((1..=MAX_CPUS).contains(&cpus), "callers validate the vCPU count");
    let ioapic_id = cpus as u8;
    let mut entries = Vec::new();
    for cpu in 0..cpus {
        entries.push(ENTRY_PROCESSOR);
        entries.push(cpu as u8);
        entries.push(APIC_VERSION);
        entries.push(CPU_ENABLED | if cpu == 0 { CPU_BOOTSTRAP } else { 0 });
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, CPU_ENABLED]);
    entries.extend_from_slice(&(IOAPIC_BASE as u32).to_le_bytes());
    for irq in 0..ISA_IRQS {
        // type, interrupt type, flags (conforming polarity and trigger), bus, bus irq, ioapic, pin
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INT_TYPE_INT, 0, 0, 0, irq, ioapic_id, irq]);
    }
    // LINT0 is ExtINT (the PIC), LINT1 is NMI, on every local APIC (0xff).
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    let entry_count = cpus as u16 + 2 + u16::from(ISA_IRQS) + 2;

    let table_len = HEADER_LEN + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.push(SPEC_REV);
    table.push(0); // checksum, below
    table.extend_from_slice(b"RUSTVMM ");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&entry_count.to_le_bytes());
    table.extend_from_slice(&(LAPIC_BASE as u32).to_le_bytes());
    table.extend_from_slice(&[0, 0, 0, 0]); // extended table length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut floating = Vec::with_capacity(FLOATING_LEN);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&((base + FLOATING_LEN as u64) as u32).to_le_bytes());
    floating.extend_from_slice(&[1, SPEC_REV, 0, 0, 0, 0, 0, 0]);
    floating[10] = checksum(&floating);

    floating.extend_from_slice(&table);
    debug_assert_eq!(floating.len(), size(cpus));
    floating
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sums_to_zero(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b)) == 0
    }

    #[test]
    fn floating_pointer_and_header() {
        let t = build(0xf_0000, 4);
        assert_eq!(t.len(), size(4));
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(u32::from_le_bytes(t[4..8].try_into().unwrap()), 0xf_0010);
        assert_eq!((t[8], t[9], t[11]), (1, 4, 0), "length in paragraphs, revision, table present");
        assert!(sums_to_zero(&t[..16]));
        let table = &t[16..];
        assert_eq!(&table[0..4], b"PCMP");
        let len = u16::from_le_bytes(table[4..6].try_into().unwrap()) as usize;
        assert_eq!(len, table.len());
        assert!(sums_to_zero(table));
        assert_eq!(u16::from_le_bytes(table[34..36].try_into().unwrap()), 4 + 2 + 16 + 2);
        assert_eq!(u32::from_le_bytes(table[36..40].try_into().unwrap()), 0xfee0_0000);
    }

    #[test]
    fn processors_bus_ioapic_and_interrupts() {
        let t = build(0xf_0000, 2);
        let e = &t[16 + 44..];
        assert_eq!(&e[0..4], &[0, 0, 0x14, 3], "cpu 0: enabled bootstrap");
        assert_eq!(&e[20..24], &[0, 1, 0x14, 1], "cpu 1: enabled");
        assert_eq!(&e[40..48], b"\x01\x00ISA   ");
        assert_eq!(&e[48..56], &[2, 2, 0x11, 1, 0, 0, 0xc0, 0xfe], "IOAPIC id 2 at 0xfec00000");
        assert_eq!(&e[56..64], &[3, 0, 0, 0, 0, 0, 2, 0], "IRQ0 -> pin 0");
        assert_eq!(&e[56 + 15 * 8..64 + 15 * 8], &[3, 0, 0, 0, 0, 15, 2, 15]);
        assert_eq!(&e[e.len() - 16..e.len() - 8], &[4, 3, 0, 0, 0, 0, 0xff, 0], "LINT0 ExtINT");
        assert_eq!(&e[e.len() - 8..], &[4, 1, 0, 0, 0, 0, 0xff, 1], "LINT1 NMI");
    }

    #[test]
    fn largest_table_fits_the_bios_area_slot() {
        assert!(size(MAX_CPUS) < 0x1_0000);
    }
}
