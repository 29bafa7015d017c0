//! Polling drivers for virtio 1.x ("modern") devices on the virtio-mmio transport.
//!
//! Devices are described on the kernel command line the way Linux expects them,
//! `virtio_mmio.device=<size>@<base>:<irq>[:<id>]` (QEMU's microvm appends these itself when
//! ACPI is off; our VMM passes them explicitly). Interrupts are off in the microguest, so every
//! driver sets `VIRTQ_AVAIL_F_NO_INTERRUPT` and polls the used rings; every wait has a
//! deadline so a device that never answers ends the program with a message instead of a hang.
//!
//! Only split virtqueues, no indirect descriptors, no event index: the smallest feature set a
//! virtio 1.x device must support, so the same code runs against QEMU and our own VMM.
use core::fmt;

use crate::cmdline::Args;

pub mod blk;
mod mmio;
pub mod net;
mod queue;
pub mod vsock;

pub use mmio::Transport;
pub use queue::{Buf, Virtqueue};

/// Command-line key carrying one device description (Linux's `virtio_mmio.device=` parameter).
pub const CMDLINE_KEY: &str = "virtio_mmio.device";

/// Device IDs (virtio spec section 5).
pub const ID_NET: u32 = 1;
pub const ID_BLOCK: u32 = 2;
pub const ID_VSOCK: u32 = 19;

/// Transport feature bits (virtio spec section 6) that any driver here may accept.
pub const F_VERSION_1: u64 = 1 << 32;
/// The device's addresses are platform (bus) addresses; ours are identity mapped without an
/// IOMMU, so accepting it changes nothing.
pub const F_ACCESS_PLATFORM: u64 = 1 << 33;
/// Ring accesses need real memory barriers: x86's ordering plus our fences already give them.
pub const F_ORDER_PLATFORM: u64 = 1 << 36;

/// Human name of a device ID.
pub fn device_name(id: u32) -> &'static str {
    match id {
        0 => "none",
        ID_NET => "net",
        ID_BLOCK => "block",
        3 => "console",
        4 => "entropy",
        5 => "balloon",
        9 => "9p",
        16 => "gpu",
        18 => "input",
        ID_VSOCK => "vsock",
        26 => "fs",
        _ => "other",
    }
}

/// Something went wrong talking to a device.
#[derive(Clone, Copy, Debug)]
pub enum Error {
    /// The window lies outside the identity map or is too small for the registers.
    BadWindow {
        base: u64,
        size: u64,
    },
    /// No virtio-mmio magic value at the window.
    BadMagic {
        base: u64,
        magic: u32,
    },
    /// A version 1 (legacy) virtio-mmio device: not supported.
    Legacy {
        base: u64,
    },
    UnknownVersion {
        base: u64,
        version: u32,
    },
    /// The device does not offer VIRTIO_F_VERSION_1.
    NoVersion1,
    /// The device cleared FEATURES_OK: it rejected the features we accepted.
    FeaturesRejected {
        accepted: u64,
    },
    /// Writing 0 to Status never read back as 0.
    ResetTimeout,
    QueueUnavailable {
        queue: u16,
    },
    QueueAlreadyReady {
        queue: u16,
    },
    /// Free RAM for rings or buffers ran out.
    OutOfMemory,
    /// The device returned a used element for a descriptor that was not in flight.
    BadUsedId {
        queue: u16,
        id: u32,
    },
    /// The device wrote more than a buffer holds, or a malformed packet.
    BadUsedLen {
        queue: u16,
        len: u32,
    },
    /// A request found the queue without enough free descriptors.
    QueueFull {
        queue: u16,
    },
    /// The device did not complete a request in time; `status` is its Status register then.
    Timeout {
        what: &'static str,
        ms: u64,
        status: u32,
    },
    /// A device-specific condition a driver refuses to work with.
    Unsupported(&'static str),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match *self {
            Error::BadWindow { base, size } => {
                write!(f, "unusable virtio-mmio window {size:#x}@{base:#x}")
            }
            Error::BadMagic { base, magic } => {
                write!(f, "no virtio-mmio device at {base:#x} (magic {magic:#x})")
            }
            Error::Legacy { base } => write!(
                f,
                "virtio-mmio device at {base:#x} is legacy (version 1); only virtio 1.x \
                 (version 2) is supported (QEMU: -global virtio-mmio.force-legacy=false)"
            ),
            Error::UnknownVersion { base, version } => {
                write!(f, "virtio-mmio device at {base:#x} has unknown version {version}")
            }
            Error::NoVersion1 => write!(f, "device does not offer VIRTIO_F_VERSION_1"),
            Error::FeaturesRejected { accepted } => {
                write!(f, "device rejected features {accepted:#x} (FEATURES_OK not set)")
            }
            Error::ResetTimeout => write!(f, "device did not complete its reset"),
            Error::QueueUnavailable { queue } => write!(f, "queue {queue} is not available"),
            Error::QueueAlreadyReady { queue } => {
                write!(f, "queue {queue} is already ready before setup")
            }
            Error::OutOfMemory => write!(f, "out of memory for rings and buffers"),
            Error::BadUsedId { queue, id } => {
                write!(f, "queue {queue}: device returned unknown descriptor id {id}")
            }
            Error::BadUsedLen { queue, len } => {
                write!(f, "queue {queue}: device reported an invalid used length {len}")
            }
            Error::QueueFull { queue } => write!(f, "queue {queue} has no free descriptors"),
            Error::Timeout { what, ms, status } => {
                write!(f, "timed out after {ms} ms waiting for {what} (device status {status:#x})")
            }
            Error::Unsupported(what) => write!(f, "{what}"),
        }
    }
}

/// One `virtio_mmio.device=` entry.
#[derive(Clone, Copy, Debug)]
pub struct DeviceDesc {
    pub base: u64,
    pub size: u64,
    pub irq: u32,
    pub id: Option<i64>,
}

/// Parses an integer the way the kernel's `memparse` does for these entries: decimal or
/// `0x` hex, with an optional K/M/G/T suffix (powers of 1024). Returns it and the rest.
fn parse_number(s: &str, suffixes: bool) -> Option<(u64, &str)> {
    let (digits_start, radix) = match s.get(..2) {
        Some("0x") | Some("0X") => (2, 16),
        _ => (0, 10),
    };
    let body = &s[digits_start..];
    let len = body.bytes().take_while(|b| (*b as char).is_digit(radix)).count();
    if len == 0 {
        return None;
    }
    let mut value = u64::from_str_radix(&body[..len], radix).ok()?;
    let mut rest = &body[len..];
    if suffixes {
        let shift = match rest.bytes().next() {
            Some(b'K' | b'k') => 10,
            Some(b'M' | b'm') => 20,
            Some(b'G' | b'g') => 30,
            Some(b'T' | b't') => 40,
            _ => 0,
        };
        if shift != 0 {
            value = value.checked_mul(1 << shift)?;
            rest = &rest[1..];
        }
    }
    Some((value, rest))
}

impl DeviceDesc {
    /// Parses `<size>@<base>:<irq>[:<id>]`.
    pub fn parse(value: &str) -> Option<DeviceDesc> {
        let (size, rest) = parse_number(value, true)?;
        let (base, rest) = parse_number(rest.strip_prefix('@')?, true)?;
        let (irq, rest) = parse_number(rest.strip_prefix(':')?, false)?;
        let id = match rest.strip_prefix(':') {
            None if rest.is_empty() => None,
            None => return None,
            Some(id) => {
                let (negative, digits) = match id.strip_prefix('-') {
                    Some(d) => (true, d),
                    None => (false, id),
                };
                let (n, tail) = parse_number(digits, false)?;
                if !tail.is_empty() {
                    return None;
                }
                let n = i64::try_from(n).ok()?;
                Some(if negative { -n } else { n })
            }
        };
        Some(DeviceDesc { base, size, irq: u32::try_from(irq).ok()?, id })
    }
}

/// The device descriptions on the command line, in order; malformed entries come back as
/// `Err(text)`.
pub fn descriptions<'a>(args: &'a Args<'a>) -> impl Iterator<Item = Result<DeviceDesc, &'a str>> {
    args.all(CMDLINE_KEY).map(|value| DeviceDesc::parse(value).ok_or(value))
}

/// What a window holds.
#[derive(Clone, Copy)]
pub struct Probed {
    pub version: u32,
    pub device_id: u32,
    pub vendor_id: u32,
}

/// Reads the identification registers of one window (no state is changed).
pub fn probe(desc: DeviceDesc) -> Result<Probed, Error> {
    let transport = Transport::new(desc)?;
    let (magic, version, device_id, vendor_id) = transport.identify();
    if magic != mmio::MAGIC {
        return Err(Error::BadMagic { base: desc.base, magic });
    }
    Ok(Probed { version, device_id, vendor_id })
}

/// Finds the `index`-th device (counting from 0, in command-line order) with `device_id` and
/// returns its transport, still untouched. Legacy devices of that type count, and are refused.
pub fn find(args: &Args, device_id: u32, index: u64) -> Result<Transport, FindError> {
    let (mut seen, mut unusable) = (0u64, 0u64);
    for desc in descriptions(args) {
        let Ok(probed) = desc.map_err(|_| ()).and_then(|d| probe(d).map_err(|_| ())) else {
            unusable += 1;
            continue;
        };
        let Ok(desc) = desc else { continue };
        if probed.device_id != device_id {
            continue;
        }
        if seen == index {
            return match probed.version {
                2 => Ok(Transport::new(desc).map_err(FindError::Device)?),
                1 => Err(FindError::Device(Error::Legacy { base: desc.base })),
                version => Err(FindError::Device(Error::UnknownVersion { base: desc.base, version })),
            };
        }
        seen += 1;
    }
    Err(FindError::NotFound { device_id, index, found: seen, unusable })
}

/// Why [`find`] returned no device.
pub enum FindError {
    NotFound {
        device_id: u32,
        index: u64,
        found: u64,
        /// Entries that were malformed or had no device behind them.
        unusable: u64,
    },
    Device(Error),
}

impl fmt::Display for FindError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            FindError::NotFound { device_id, index, found, unusable } => write!(
                f,
                "no virtio-{} device number {index} (found {found}, plus {unusable} malformed \
                 or empty entries; devices come from {CMDLINE_KEY}=<size>@<base>:<irq> entries \
                 on the command line)",
                device_name(*device_id)
            ),
            FindError::Device(e) => write!(f, "{e}"),
        }
    }
}
