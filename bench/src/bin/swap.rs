//! Live swap benchmark: what changing a running VM costs the guest. Three tables:
//!
//! 1. Device backend swaps under load: blackout percentiles per backend pair (disk engines,
//!    NBD, taps, Unix datagram sockets) while the guest stresses the device, and the guest's
//!    own count of failed requests. Goal: p99 blackout < 1 ms with zero failed guest requests.
//! 2. Live storage migration: copy throughput, data copied again, final copy and blackout,
//!    with QEMU's drive-mirror on the same guest side by side.
//! 3. Memory region backing swaps: the vCPU pause per GiB for idle and busy guests.
//!
//! Everything goes through the control API of a `vmm run --api-sock` child process.
//! Usage: `cargo run --release -p bench --bin swap [SWAPS]` (default 100 swaps each way per
//! pair; root for the taps, whose rows are skipped otherwise).

use std::time::Instant;

use bench::swap::{devices, memory, migration};
use bench::{microguest_file, qemu_binary, vmm_binary};

fn main() {
    let swaps: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(100);
    let started = Instant::now();
    let vmm = vmm_binary();
    let guest = microguest_file();
    let qemu = qemu_binary();
    if qemu.is_none() {
        eprintln!("QEMU could not be installed: the migration table has no QEMU rows");
    }

    let device_results = devices::run(&vmm, &guest, swaps);
    let migrations = migration::run(&vmm, &guest, qemu.as_deref());
    let memory_results = memory::run(&vmm, &guest);
    let _ = std::fs::remove_file(&guest);

    devices::print(&device_results, swaps);
    migration::print(&migrations, qemu.is_some());
    memory::print(&memory_results);
    eprintln!("done in {:.0} s", started.elapsed().as_secs_f64());
}
