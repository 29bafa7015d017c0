//! The microguest: the project's bare-metal test guest.
//!
//! A tiny ring-0 stub (`arch/boot.S`, emulated on the PVM host, so a few hundred
//! instructions at most) sets up GDT, TSS, IDT and page tables and drops to ring 3, where this
//! Rust code runs natively. It reads `prog=NAME key=value ...` from the kernel command line,
//! runs that program from the registry in [`programs`], prints to the serial port and ends the
//! VM through the debug-exit port with the program's status.
#![no_std]
#![no_main]

mod arch;
mod bootinfo;
mod cmdline;
mod console;
mod dma;
mod programs;
mod rt;
mod shm;
mod smp;
mod time;
mod virtio;

use microguest_protocol::DONE_MARKER;

/// Ring-3 entry of the bootstrap processor (see `enter_ring3` in `arch/boot.S`).
#[unsafe(no_mangle)]
extern "C" fn microguest_main(boot_info_addr: u64, protocol: u64) -> ! {
    // SAFETY: the boot stub passes the physical address of the loader's boot structure,
    // identity mapped and still intact: nothing has written guest memory yet.
    let boot = unsafe { bootinfo::BootInfo::capture(boot_info_addr, protocol) };
    let args = cmdline::Args::parse(boot.cmdline());
    let status = programs::run(&args, &boot);
    println!("{DONE_MARKER} status={status}");
    arch::exit(status)
}

/// Ring-3 entry of each application processor, once the BSP has started it.
#[unsafe(no_mangle)]
extern "C" fn ap_main(cpu_index: u64) -> ! {
    smp::ap_entered(cpu_index as usize)
}
