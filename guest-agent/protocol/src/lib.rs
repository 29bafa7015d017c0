//! The contract between the microguest and the host side (VMM, tests, benches).
//!
//! `no_std` so the bare-metal guest and the host crates compile the very same constants.
#![no_std]

pub mod blk_stress;

/// I/O port of the debug-exit device (QEMU's `isa-debug-exit` convention, `iobase=0xf4`).
pub const DEBUG_EXIT_PORT: u16 = 0xf4;

/// I/O port of the first 16550 UART (COM1).
pub const SERIAL_PORT: u16 = 0x3f8;

/// Exit statuses the microguest writes to [`DEBUG_EXIT_PORT`].
///
/// Our VMM turns the written value into its own process exit status; QEMU's
/// `isa-debug-exit` reports `(status << 1) | 1` instead (see [`qemu_exit_status`]).
pub mod status {
    /// The program ran and every check passed.
    pub const SUCCESS: u32 = 0;
    /// The program ran and a check failed.
    pub const FAILURE: u32 = 1;
    /// The command line named an unknown program or had invalid arguments.
    pub const USAGE: u32 = 2;
    /// The guest took an unexpected CPU exception or panicked.
    pub const CRASH: u32 = 3;
}

/// The process exit status QEMU's `isa-debug-exit` device produces when the guest writes `status`.
pub const fn qemu_exit_status(status: u32) -> i32 {
    (((status << 1) | 1) & 0xff) as i32
}

/// Physical address where the microguest copies its application-processor start-up code.
/// Must be page aligned and below 1 MiB (it is encoded in the SIPI vector).
pub const AP_TRAMPOLINE_ADDR: u64 = 0x1_0000;

/// Most vCPUs the microguest can bring up.
pub const MAX_CPUS: usize = 64;

/// Hypervisor CPUID leaf carrying timing information (the VMware/QEMU convention):
/// EAX = TSC frequency in kHz, EBX = local APIC timer frequency in kHz.
pub const CPUID_TIMING_LEAF: u32 = 0x4000_0010;

/// Marker line the microguest prints after a program returns, followed by ` status=<n>`.
pub const DONE_MARKER: &str = "microguest: done";
