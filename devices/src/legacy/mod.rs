//! The PC devices a minimal x86 guest expects: COM1, the i8042 reset line, and QEMU's
//! debug-exit port used by test guests to report a status.

mod debug_exit;
mod i8042;
mod serial;

pub use debug_exit::DebugExit;
pub use i8042::I8042;
pub use serial::{SerialConsole, SerialOutput, SerialSnapshot};

/// Standard I/O locations.
pub mod ports {
    /// COM1 and its 8 registers.
    pub const COM1: u64 = 0x3f8;
    /// Size of COM1's port range.
    pub const COM1_LEN: u64 = 8;
    /// COM1's ISA interrupt.
    pub const COM1_IRQ: u32 = 4;
    /// The i8042 keyboard controller: data port 0x60 .. command port 0x64.
    pub const I8042: u64 = 0x60;
    /// Size of the i8042's port range (0x60 through 0x64).
    pub const I8042_LEN: u64 = 5;
    /// QEMU's isa-debug-exit default (`iobase=0xf4,iosize=4`).
    pub const DEBUG_EXIT: u64 = 0xf4;
    /// Size of the debug-exit port range.
    pub const DEBUG_EXIT_LEN: u64 = 4;
}
