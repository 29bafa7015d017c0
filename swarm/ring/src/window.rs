//! The register window through which a VM learns about a shared region mapped into it, and
//! rings its peers' doorbells. Each window is a 4 KiB MMIO page with one interrupt line,
//! announced on the kernel command line as `shm.window=ADDRESS:IRQ` (one per window).
//!
//! All registers are 32 bits wide.
//!
//! | offset | access | what |
//! |---|---|---|
//! | 0x00 | read | [`MAGIC`] |
//! | 0x04 | read | [`VERSION`] |
//! | 0x08 | read | [`WindowState`] |
//! | 0x0c | read | this VM's party in the region |
//! | 0x10 | read | parties in the region |
//! | 0x14 | read | generation: changes at every attach and detach |
//! | 0x18, 0x1c | read | the region's guest-physical address, low and high half |
//! | 0x20, 0x24 | read | the region's size in bytes, low and high half |
//! | 0x28 | write | detach acknowledgement: the guest no longer touches the region |
//! | 0x40 | write | doorbell: the value is the party to wake |
//!
//! The window's interrupt fires when a peer rings this VM's doorbell, and when the window's
//! state changes (attach, detach requested): a guest reads the generation to tell them apart.

/// The size of a window.
pub const WINDOW_SIZE: u64 = 0x1000;
/// What the magic register reads: "SHMW".
pub const MAGIC: u32 = u32::from_le_bytes(*b"SHMW");
/// The register layout's version.
pub const VERSION: u32 = 1;

/// Register offsets.
pub mod reg {
    /// [`super::MAGIC`].
    pub const MAGIC: u64 = 0x00;
    /// [`super::VERSION`].
    pub const VERSION: u64 = 0x04;
    /// [`super::WindowState`].
    pub const STATE: u64 = 0x08;
    /// This VM's party.
    pub const PARTY: u64 = 0x0c;
    /// Parties in the region.
    pub const PARTIES: u64 = 0x10;
    /// Changes at every attach and detach.
    pub const GENERATION: u64 = 0x14;
    /// Guest-physical address, low half.
    pub const ADDR_LO: u64 = 0x18;
    /// Guest-physical address, high half.
    pub const ADDR_HI: u64 = 0x1c;
    /// Size, low half.
    pub const SIZE_LO: u64 = 0x20;
    /// Size, high half.
    pub const SIZE_HI: u64 = 0x24;
    /// Written by the guest once it no longer touches a region being detached.
    pub const DETACH_ACK: u64 = 0x28;
    /// Written with the party whose doorbell rings.
    pub const DOORBELL: u64 = 0x40;
}

/// Where a window stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum WindowState {
    /// No region.
    Empty = 0,
    /// A region is mapped at the address the window gives.
    Attached = 1,
    /// The host wants the region back: stop touching it and write the acknowledgement.
    Detaching = 2,
}

impl WindowState {
    /// The state a register value names, if any.
    pub fn from_u32(value: u32) -> Option<Self> {
        Some(match value {
            0 => Self::Empty,
            1 => Self::Attached,
            2 => Self::Detaching,
            _ => return None,
        })
    }
}
