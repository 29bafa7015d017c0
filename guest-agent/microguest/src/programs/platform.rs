//! Programs that exercise the VMM's platform handling rather than guest work.
//!
//! `prog=reset` asks the i8042 keyboard controller for a CPU reset (what Linux does with
//! `reboot=k`). `prog=unhandled` touches a port and an MMIO address no device claims, twice
//! each, then exits 0: the VMM must answer (all ones) and keep running.
use super::{Context, Failure, Outcome, Program};
use crate::{arch, println};

pub const RESET: Program = Program { name: "reset", about: "reset the machine through the i8042", run: reset };

pub const UNHANDLED: Program =
    Program { name: "unhandled", about: "access a port and MMIO address nobody claims", run: unhandled };

const I8042_COMMAND: u16 = 0x64;
const I8042_RESET_CPU: u8 = 0xfe;
/// A port and an MMIO address (in the MMIO gap below 4 GiB) with no device behind them.
const UNCLAIMED_PORT: u16 = 0x510;
const UNCLAIMED_MMIO: u64 = 0xc000_0000;

fn reset(_ctx: &Context) -> Outcome {
    println!("reset: asking the i8042 for a CPU reset");
    arch::outb(I8042_COMMAND, I8042_RESET_CPU);
    println!("reset: FAILED: still running after the reset command");
    Err(Failure::Check)
}

fn unhandled(_ctx: &Context) -> Outcome {
    let mut reads = [0u32; 2];
    for read in &mut reads {
        arch::outb(UNCLAIMED_PORT, 0x42);
        let port = u32::from(arch::inb(UNCLAIMED_PORT));
        // SAFETY: the address is identity mapped; nothing is behind it, so the VMM answers.
        let mmio = unsafe {
            arch::mmio_write32(UNCLAIMED_MMIO, 0x1234_5678);
            arch::mmio_read32(UNCLAIMED_MMIO)
        };
        *read = port ^ mmio;
    }
    println!("unhandled: port and MMIO reads returned {reads:#x?}");
    if reads.iter().all(|&r| r == 0xff ^ 0xffff_ffff) {
        Ok(())
    } else {
        println!("unhandled: FAILED: expected all-ones reads");
        Err(Failure::Check)
    }
}
