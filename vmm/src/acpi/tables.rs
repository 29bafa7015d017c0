//! The fixed-layout ACPI structures: RSDP, XSDT, FADT and MADT (ACPI 6.3 layouts).
//!
//! Each builder is a pure function of the addresses and counts it needs, so every field can be
//! checked byte by byte; [`super::build`] decides where they go.

use devices::legacy::ports;

use super::checksum;
use crate::memory::layout::{IOAPIC_BASE, LAPIC_BASE};

/// Every system description table starts with this 36-byte header.
pub const HEADER_LEN: usize = 36;
pub const RSDP_LEN: usize = 36;
/// The ACPI 6.x FADT, up to and including the hypervisor vendor identity.
pub const FADT_LEN: usize = 276;
const MADT_FIXED_LEN: usize = HEADER_LEN + 8;
const MADT_LAPIC_LEN: usize = 8;
const MADT_IOAPIC_LEN: usize = 12;
const MADT_LAPIC_NMI_LEN: usize = 6;

pub const OEM_ID: &[u8; 6] = b"RUSTVM";
pub const OEM_TABLE_ID: &[u8; 8] = b"MICROVM ";
pub const OEM_REVISION: u32 = 1;
pub const CREATOR_ID: &[u8; 4] = b"RVMM";
pub const CREATOR_REVISION: u32 = 1;

/// RSDP revision 2 (ACPI 2.0+): has the XSDT address and extended checksum.
const RSDP_REVISION: u8 = 2;
const XSDT_REVISION: u8 = 1;
/// FADT 6.3: major revision in the header, minor in the body.
pub const FADT_REVISION: u8 = 6;
pub const FADT_MINOR_REVISION: u8 = 3;
/// MADT revision of ACPI 6.3.
pub const MADT_REVISION: u8 = 5;
/// DSDT revision 2: AML integers are 64 bits wide.
pub const DSDT_REVISION: u8 = 2;

/// FADT flags: the platform has none of the fixed ACPI hardware (PM timer, PM1 event and
/// control blocks, GPEs, SCI); everything is described in the DSDT instead. Linux then skips
/// all of it, which is what a VMM without those devices needs.
pub const FADT_HW_REDUCED_ACPI: u32 = 1 << 20;
/// FADT flags: the reset register below is valid.
pub const FADT_RESET_REG_SUP: u32 = 1 << 10;
/// IA-PC boot architecture flags. The VMM models the i8042 (its CPU-reset command is how
/// Linux reboots), so claim it present: without the bit Linux's i8042 driver gives up.
pub const IAPC_8042: u16 = 1 << 1;
/// No VGA: keeps the kernel from poking legacy VGA ports and memory.
pub const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
/// No CMOS RTC: the VMM does not model one (ports 0x70/0x71 read all-ones), so Linux should
/// not register an rtc_cmos device; wall-clock time comes from kvmclock.
pub const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

/// Generic Address Structure address space: system I/O ports.
const GAS_SYSTEM_IO: u8 = 1;
/// Generic Address Structure access size: byte.
const GAS_ACCESS_BYTE: u8 = 1;
/// Writing 0xfe to the i8042 command port pulses the CPU reset line; the VMM's i8042 model
/// turns that into a clean guest exit. Advertising it as the ACPI reset register lets Linux
/// reboot through its default (ACPI) method, not only with `reboot=k`.
const RESET_PORT: u64 = ports::I8042 + 4;
const RESET_VALUE: u8 = 0xfe;

const MADT_PCAT_COMPAT: u32 = 1;
const MADT_TYPE_LAPIC: u8 = 0;
const MADT_TYPE_IOAPIC: u8 = 1;
const MADT_TYPE_LAPIC_NMI: u8 = 4;
const MADT_LAPIC_ENABLED: u32 = 1;
/// Processor UID meaning "every processor" in a Local APIC NMI entry.
const ALL_PROCESSORS: u8 = 0xff;
/// LINT1 carries NMIs, as the MP table also says.
const NMI_LINT: u8 = 1;

/// Most vCPUs the MADT describes: xAPIC ids are 8 bits, 0xff is broadcast and the IOAPIC
/// takes the id after the last CPU's.
pub const MAX_CPUS: u32 = 254;

/// A table: header (with a zero checksum placeholder) then `body`, checksummed.
pub fn table(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let len = HEADER_LEN + body.len();
    let mut t = Vec::with_capacity(len);
    t.extend_from_slice(signature);
    t.extend_from_slice(&(len as u32).to_le_bytes());
    t.push(revision);
    t.push(0); // checksum, below
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(OEM_TABLE_ID);
    t.extend_from_slice(&OEM_REVISION.to_le_bytes());
    t.extend_from_slice(CREATOR_ID);
    t.extend_from_slice(&CREATOR_REVISION.to_le_bytes());
    t.extend_from_slice(body);
    t[9] = checksum(&t);
    t
}

/// The Root System Description Pointer, pointing at the XSDT only (no RSDT: every OS that
/// understands the rest of these tables reads the XSDT).
pub fn rsdp(xsdt_addr: u64) -> [u8; RSDP_LEN] {
    let mut r = [0u8; RSDP_LEN];
    r[0..8].copy_from_slice(b"RSD PTR ");
    r[9..15].copy_from_slice(OEM_ID);
    r[15] = RSDP_REVISION;
    // 16..20: RSDT address, none.
    r[20..24].copy_from_slice(&(RSDP_LEN as u32).to_le_bytes());
    r[24..32].copy_from_slice(&xsdt_addr.to_le_bytes());
    // 33..36 reserved.
    r[8] = checksum(&r[..20]);
    r[32] = checksum(&r);
    r
}

/// The Extended System Description Table: 64-bit pointers to the other tables (except the
/// DSDT, which the FADT points to).
pub fn xsdt(tables: &[u64]) -> Vec<u8> {
    let body: Vec<u8> = tables.iter().flat_map(|a| a.to_le_bytes()).collect();
    table(b"XSDT", XSDT_REVISION, &body)
}

/// Length in bytes of the XSDT for `entries` tables.
pub fn xsdt_len(entries: usize) -> usize {
    HEADER_LEN + 8 * entries
}

/// A Generic Address Structure.
fn gas(space: u8, bit_width: u8, access_size: u8, address: u64) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = space;
    g[1] = bit_width;
    // g[2]: bit offset 0.
    g[3] = access_size;
    g[4..12].copy_from_slice(&address.to_le_bytes());
    g
}

/// The Fixed ACPI Description Table for a hardware-reduced platform: no FACS, no PM blocks,
/// no SCI; it carries the flags, the boot architecture flags, the reset register and the
/// DSDT's address.
pub fn fadt(dsdt_addr: u64) -> Vec<u8> {
    // Offsets below are into the whole table; the body starts after the header.
    let mut f = [0u8; FADT_LEN];
    // 36 FIRMWARE_CTRL, 40 DSDT: zero. A 64-bit X_DSDT is given, and ACPI says the 32-bit
    // field must then be zero.
    // 45 Preferred_PM_Profile: 0, unspecified. 46 SCI_INT: 0, unused when hardware-reduced.
    f[109..111].copy_from_slice(&(IAPC_8042 | IAPC_VGA_NOT_PRESENT | IAPC_CMOS_RTC_NOT_PRESENT).to_le_bytes());
    f[112..116].copy_from_slice(&(FADT_HW_REDUCED_ACPI | FADT_RESET_REG_SUP).to_le_bytes());
    f[116..128].copy_from_slice(&gas(GAS_SYSTEM_IO, 8, GAS_ACCESS_BYTE, RESET_PORT));
    f[128] = RESET_VALUE;
    // 129 ARM_BOOT_ARCH: 0.
    f[131] = FADT_MINOR_REVISION;
    // 132 X_FIRMWARE_CTRL: 0 (no FACS).
    f[140..148].copy_from_slice(&dsdt_addr.to_le_bytes());
    // 148..268: the extended PM, GPE and sleep registers, all absent. 268: hypervisor vendor
    // identity, unused.
    table(b"FACP", FADT_REVISION, &f[HEADER_LEN..])
}

/// Length in bytes of the MADT for `vcpus` processors.
pub fn madt_len(vcpus: u32) -> usize {
    MADT_FIXED_LEN + MADT_LAPIC_LEN * vcpus as usize + MADT_IOAPIC_LEN + MADT_LAPIC_NMI_LEN
}

/// The Multiple APIC Description Table: one enabled local APIC per vCPU (processor UID =
/// APIC id = index), the IOAPIC with id `vcpus` and GSIs from 0, and NMI on LINT1.
///
/// No interrupt source overrides: KVM's default routing sends ISA IRQ n to IOAPIC pin n (the
/// PIT included), edge-triggered and active-high, which is exactly what ACPI assumes for ISA
/// IRQs that no override mentions. The MP table describes the same wiring.
pub fn madt(vcpus: u32) -> Vec<u8> {
    assert!((1..=MAX_CPUS).contains(&vcpus), "callers validate the vCPU count");
    let mut body = Vec::with_capacity(madt_len(vcpus) - HEADER_LEN);
    body.extend_from_slice(&(LAPIC_BASE as u32).to_le_bytes());
    body.extend_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    for cpu in 0..vcpus {
        body.extend_from_slice(&[MADT_TYPE_LAPIC, MADT_LAPIC_LEN as u8, cpu as u8, cpu as u8]);
        body.extend_from_slice(&MADT_LAPIC_ENABLED.to_le_bytes());
    }
    body.extend_from_slice(&[MADT_TYPE_IOAPIC, MADT_IOAPIC_LEN as u8, vcpus as u8, 0]);
    body.extend_from_slice(&(IOAPIC_BASE as u32).to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes()); // GSI base
    // Flags 0: the bus's default polarity and trigger mode.
    body.extend_from_slice(&[MADT_TYPE_LAPIC_NMI, MADT_LAPIC_NMI_LEN as u8, ALL_PROCESSORS]);
    body.extend_from_slice(&0u16.to_le_bytes());
    body.push(NMI_LINT);
    let t = table(b"APIC", MADT_REVISION, &body);
    debug_assert_eq!(t.len(), madt_len(vcpus));
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sums_to_zero(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b)) == 0
    }

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    #[test]
    fn header_fields() {
        let t = table(b"TEST", 7, &[1, 2, 3]);
        assert_eq!(&t[0..4], b"TEST");
        assert_eq!(u32_at(&t, 4), 39);
        assert_eq!(t[8], 7);
        assert_eq!(&t[10..16], b"RUSTVM");
        assert_eq!(&t[16..24], b"MICROVM ");
        assert_eq!(u32_at(&t, 24), OEM_REVISION);
        assert_eq!(&t[28..32], CREATOR_ID);
        assert_eq!(u32_at(&t, 32), CREATOR_REVISION);
        assert_eq!(&t[36..], &[1, 2, 3]);
        assert!(sums_to_zero(&t));
    }

    #[test]
    fn rsdp_fields_and_both_checksums() {
        let r = rsdp(0x1234_5678_9abc_def0);
        assert_eq!(&r[0..8], b"RSD PTR ");
        assert_eq!(&r[9..15], b"RUSTVM");
        assert_eq!(r[15], 2, "revision");
        assert_eq!(u32_at(&r, 16), 0, "no RSDT");
        assert_eq!(u32_at(&r, 20), 36, "length");
        assert_eq!(u64_at(&r, 24), 0x1234_5678_9abc_def0);
        assert_eq!(&r[33..36], &[0, 0, 0]);
        assert!(sums_to_zero(&r[..20]), "ACPI 1.0 checksum");
        assert!(sums_to_zero(&r), "extended checksum");
        assert_ne!(r[8], 0, "the checksums are not trivially zero here");
    }

    #[test]
    fn xsdt_lists_its_pointers() {
        let x = xsdt(&[0xe_0100, 0xe_0300]);
        assert_eq!(&x[0..4], b"XSDT");
        assert_eq!(x.len(), xsdt_len(2));
        assert_eq!(u32_at(&x, 4) as usize, x.len());
        assert_eq!(x[8], 1);
        assert_eq!(u64_at(&x, 36), 0xe_0100);
        assert_eq!(u64_at(&x, 44), 0xe_0300);
        assert!(sums_to_zero(&x));
    }

    #[test]
    fn fadt_is_hardware_reduced_and_points_at_the_dsdt() {
        let f = fadt(0xe_0400);
        assert_eq!(&f[0..4], b"FACP");
        assert_eq!(f.len(), 276);
        assert_eq!(u32_at(&f, 4), 276);
        assert_eq!((f[8], f[131]), (6, 3), "FADT 6.3");
        assert!(sums_to_zero(&f));
        assert_eq!(u32_at(&f, 36), 0, "FIRMWARE_CTRL: no FACS");
        assert_eq!(u32_at(&f, 40), 0, "32-bit DSDT unused");
        assert_eq!(u64_at(&f, 132), 0, "X_FIRMWARE_CTRL: no FACS");
        assert_eq!(u64_at(&f, 140), 0xe_0400, "X_DSDT");
        let flags = u32_at(&f, 112);
        assert_eq!(flags, (1 << 20) | (1 << 10), "HW_REDUCED_ACPI, RESET_REG_SUP");
        assert_eq!(u16_at(&f, 109), 0b10_0110, "8042 present, no VGA, no CMOS RTC");
        assert_eq!(&f[116..129], &[1, 8, 0, 1, 0x64, 0, 0, 0, 0, 0, 0, 0, 0xfe], "reset: write 0xfe to I/O port 0x64");
        assert_eq!(u16_at(&f, 46), 0, "no SCI");
        assert!(f[148..].iter().all(|&b| b == 0), "no X_ PM blocks");
    }

    #[test]
    fn madt_for_one_vcpu() {
        let m = madt(1);
        assert_eq!(&m[0..4], b"APIC");
        assert_eq!(m.len(), 36 + 8 + 8 + 12 + 6);
        assert_eq!(u32_at(&m, 4) as usize, m.len());
        assert_eq!(m[8], 5);
        assert!(sums_to_zero(&m));
        assert_eq!(u32_at(&m, 36), 0xfee0_0000, "local APIC address");
        assert_eq!(u32_at(&m, 40), 1, "PCAT_COMPAT");
        assert_eq!(&m[44..52], &[0, 8, 0, 0, 1, 0, 0, 0], "CPU 0 enabled");
        assert_eq!(&m[52..64], &[1, 12, 1, 0, 0, 0, 0xc0, 0xfe, 0, 0, 0, 0], "IOAPIC id 1 at 0xfec00000, GSI base 0");
        assert_eq!(&m[64..70], &[4, 6, 0xff, 0, 0, 1], "NMI on LINT1");
    }

    #[test]
    fn madt_for_four_vcpus() {
        let m = madt(4);
        assert_eq!(m.len(), madt_len(4));
        assert_eq!(m.len(), 36 + 8 + 4 * 8 + 12 + 6);
        assert!(sums_to_zero(&m));
        for cpu in 0..4u8 {
            let e = 44 + 8 * cpu as usize;
            assert_eq!(&m[e..e + 8], &[0, 8, cpu, cpu, 1, 0, 0, 0], "CPU {cpu}");
        }
        assert_eq!(&m[76..80], &[1, 12, 4, 0], "IOAPIC id 4 after the CPUs");
        assert_eq!(u32_at(&m, 80), 0xfec0_0000);
        assert_eq!(u32_at(&m, 84), 0);
        // Walk the entries by their lengths: 4 local APICs, the IOAPIC, the NMI; no type 2
        // (interrupt source override).
        let mut types = Vec::new();
        let mut off = 44;
        while off < m.len() {
            types.push(m[off]);
            off += m[off + 1] as usize;
        }
        assert_eq!(off, m.len());
        assert_eq!(types, [0, 0, 0, 0, 1, 4]);
    }

    #[test]
    fn largest_madt() {
        let m = madt(MAX_CPUS);
        assert_eq!(m.len(), madt_len(MAX_CPUS));
        let ioapic = 44 + 8 * MAX_CPUS as usize;
        assert_eq!(&m[ioapic..ioapic + 3], &[1, 12, 254]);
    }
}
