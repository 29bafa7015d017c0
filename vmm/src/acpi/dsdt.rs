//! The Differentiated System Description Table: the devices a guest cannot discover by
//! probing, written in AML.
//!
//! ```text
//! Scope (\_SB) {
//!     Device (COM1) { _HID EisaId ("PNP0501"), _UID 0, _CRS: IO 0x3f8/8, IRQ 4 }
//!     Device (VR00) { _HID "LNRO0005", _UID 0, _CRS: Memory32Fixed window, Interrupt irq }
//!     ...
//! }
//! ```
//!
//! The virtio-mmio windows must be here: Debian's kernel (like most distribution kernels)
//! lacks `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`, so `virtio_mmio.device=` on the command line
//! does nothing, and Linux's virtio_mmio driver binds through its ACPI match table, which
//! holds the single ID "LNRO0005".

use devices::legacy::ports;

use super::aml::resource::{self, INT_CONSUMER, INT_EDGE};
use super::aml::{device, eisa_id, integer, name, package, scope, string, uuid};
use super::tables::{DSDT_REVISION, table};
use super::{MmioDevice, ShmWindowAcpi};

/// The ID Linux's virtio_mmio driver matches in its ACPI table.
pub const VIRTIO_MMIO_HID: &str = "LNRO0005";
/// 16550 UART.
const COM1_HID: &str = "PNP0501";
/// Digits of the virtio device names `VRxx`: 0-9 then A-Z, so `VR00`..`VR09`, `VR0A`.. and
/// 36 * 36 names in all; the table area fills up before they run out.
const NAME_DIGITS: &[u8; 36] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ";
/// How many virtio-mmio devices can be named.
pub const MAX_MMIO_DEVICES: usize = NAME_DIGITS.len() * NAME_DIGITS.len();

/// The AML name of virtio-mmio device `index`.
pub fn device_name(index: usize) -> String {
    assert!(index < MAX_MMIO_DEVICES, "callers validate the device count");
    let n = NAME_DIGITS.len();
    let hi = NAME_DIGITS[index / n] as char;
    let lo = NAME_DIGITS[index % n] as char;
    format!("VR{hi}{lo}")
}

/// Edge-triggered, active-high, exclusive: how the VMM raises these lines (irqfd pulses on
/// IOAPIC pins), and what the ISA IRQs among them default to anyway.
const INTERRUPT_FLAGS: u8 = INT_CONSUMER | INT_EDGE;

fn com1() -> Vec<u8> {
    device(
        "COM1",
        &[
            name("_HID", &eisa_id(COM1_HID)),
            name("_UID", &integer(0)),
            name(
                "_CRS",
                &resource::template(&[
                    resource::io(ports::COM1 as u16, ports::COM1_LEN as u8),
                    resource::interrupt(INTERRUPT_FLAGS, ports::COM1_IRQ),
                ]),
            ),
        ],
    )
}

/// One virtio-mmio device. Windows are validated to lie below 4 GiB before this runs.
fn virtio_mmio(index: usize, dev: &MmioDevice) -> Vec<u8> {
    device(
        &device_name(index),
        &[
            name("_HID", &string(VIRTIO_MMIO_HID)),
            name("_UID", &integer(index as u64)),
            name(
                "_CRS",
                &resource::template(&[
                    resource::memory32_fixed(dev.base as u32, dev.size as u32),
                    resource::interrupt(INTERRUPT_FLAGS, dev.irq),
                ]),
            ),
        ],
    )
}

/// The ID that makes Linux match a device by its `compatible` property (ACPI PRP0001).
const PRP0001: &str = "PRP0001";
/// The `_DSD` UUID of device properties.
const DEVICE_PROPERTIES_UUID: &str = "daffd814-6eba-4d8c-8a91-bc9bbf4aa301";
/// What a shared-memory window is `compatible` with: Linux's generic UIO driver binds it when
/// given `uio_pdrv_genirq.of_id=` this string, and maps the register page and the region.
pub const SHM_WINDOW_COMPATIBLE: &str = "vmm,shm-window";

/// One shared-memory window: its register page, the range its region is mapped in, its
/// interrupt, and `compatible` for Linux's generic UIO driver.
fn shm_window(index: usize, window: &ShmWindowAcpi) -> Vec<u8> {
    assert!(index < 10, "callers validate the window count");
    let properties = package(&[package(&[string("compatible"), string(SHM_WINDOW_COMPATIBLE)])]);
    device(
        &format!("SHM{index}"),
        &[
            name("_HID", &string(PRP0001)),
            name("_UID", &integer(index as u64)),
            name(
                "_CRS",
                &resource::template(&[
                    resource::memory32_fixed(window.base as u32, window.size as u32),
                    resource::qword_memory(window.region_base, window.region_span),
                    resource::interrupt(INTERRUPT_FLAGS, window.irq),
                ]),
            ),
            name("_DSD", &package(&[uuid(DEVICE_PROPERTIES_UUID), properties])),
        ],
    )
}

/// The DSDT for COM1, the virtio `devices` and the shared-memory `windows`.
pub fn dsdt(devices: &[MmioDevice], windows: &[ShmWindowAcpi]) -> Vec<u8> {
    let mut sb = vec![com1()];
    sb.extend(devices.iter().enumerate().map(|(i, d)| virtio_mmio(i, d)));
    sb.extend(windows.iter().enumerate().map(|(i, w)| shm_window(i, w)));
    table(b"DSDT", DSDT_REVISION, &scope("\\_SB_", &sb))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names() {
        assert_eq!(device_name(0), "VR00");
        assert_eq!(device_name(9), "VR09");
        assert_eq!(device_name(10), "VR0A");
        assert_eq!(device_name(36), "VR10");
        assert_eq!(device_name(MAX_MMIO_DEVICES - 1), "VRZZ");
    }

    #[test]
    fn com1_bytes() {
        let expected: &[u8] = &[
            0x5b, 0x82, 0x31, b'C', b'O', b'M', b'1', // Device (COM1), PkgLength 49
            0x08, b'_', b'H', b'I', b'D', 0x0c, 0x41, 0xd0, 0x05, 0x01, // EisaId ("PNP0501")
            0x08, b'_', b'U', b'I', b'D', 0x00, // _UID Zero
            0x08, b'_', b'C', b'R', b'S', 0x11, 0x16, 0x0a, 0x13, // Buffer (19)
            0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08, // IO (Decode16, 0x3f8, 0x3f8, 1, 8)
            0x89, 0x06, 0x00, 0x03, 0x01, 0x04, 0x00, 0x00, 0x00, // Interrupt {4}
            0x79, 0x00, // end tag, checksum below
        ];
        let mut expected = expected.to_vec();
        let n = expected.len();
        let sum = expected[32..n - 1].iter().fold(0u8, |s, b| s.wrapping_add(*b));
        expected[n - 1] = 0u8.wrapping_sub(sum);
        assert_eq!(com1(), expected);
    }

    #[test]
    fn virtio_device_bytes() {
        let d = virtio_mmio(1, &MmioDevice { base: 0xd000_1000, size: 0x1000, irq: 6 });
        let expected_head: &[u8] = &[
            0x5b, 0x82, 0x3a, b'V', b'R', b'0', b'1', // Device (VR01), PkgLength 58
            0x08, b'_', b'H', b'I', b'D', 0x0d, b'L', b'N', b'R', b'O', b'0', b'0', b'0', b'5',
            0x00, // _HID "LNRO0005"
            0x08, b'_', b'U', b'I', b'D', 0x01, // _UID One
            0x08, b'_', b'C', b'R', b'S', 0x11, 0x1a, 0x0a, 0x17, // Buffer (23)
            0x86, 0x09, 0x00, 0x01, 0x00, 0x10, 0x00, 0xd0, 0x00, 0x10, 0x00, 0x00, // Memory32Fixed
            0x89, 0x06, 0x00, 0x03, 0x01, 0x06, 0x00, 0x00, 0x00, // Interrupt {6}
            0x79, // end tag
        ];
        assert_eq!(&d[..d.len() - 1], expected_head);
        assert_eq!(d.len(), 2 + 58);
        let template_sum = d[37..].iter().fold(0u8, |s, b| s.wrapping_add(*b));
        assert_eq!(template_sum, 0);
    }

    #[test]
    fn dsdt_wraps_everything_in_sb() {
        let devs = [
            MmioDevice { base: 0xd000_0000, size: 0x1000, irq: 5 },
            MmioDevice { base: 0xd000_1000, size: 0x1000, irq: 6 },
        ];
        let t = dsdt(&devs, &[]);
        assert_eq!(&t[0..4], b"DSDT");
        assert_eq!(u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize, t.len());
        assert_eq!(t[8], 2);
        assert_eq!(t.iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0);
        let body = &t[36..];
        let sb = [com1(), virtio_mmio(0, &devs[0]), virtio_mmio(1, &devs[1])].concat();
        // ScopeOp, two-byte PkgLength (1 + ... > 63), \_SB_, devices.
        let len = 2 + 5 + sb.len();
        assert_eq!(body[0], 0x10);
        assert_eq!(body[1..3], [0x40 | (len & 0xf) as u8, (len >> 4) as u8]);
        assert_eq!(&body[3..8], b"\\_SB_");
        assert_eq!(&body[8..], &sb[..]);
    }
}
