//! Embedding the VMM: boot the bundled microguest on 4 vCPUs, capture its serial output in
//! memory, pause and resume it while it runs, then collect its exit status.
//!
//! Run with `cargo run --example embed`.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm::{SerialOutput, VmBuilder, VmExit};

/// Serial output kept in memory so the embedding program decides what to do with it.
#[derive(Clone, Default)]
struct Console(Arc<Mutex<Vec<u8>>>);

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let console = Console::default();
    let vm = VmBuilder::new(guest_agent::MICROGUEST_IMAGE)
        .cmdline("prog=smp until_input=1")
        .vcpus(4)
        .memory_mib(64)
        .serial_output(SerialOutput::Writer(Box::new(console.clone())))
        .start()?;
    println!("started: {:?}", vm.info());

    // Freeze the guest a few times while its four vCPUs hammer a shared counter.
    for _ in 0..5 {
        let t = Instant::now();
        vm.pause()?;
        let paused_in = t.elapsed();
        vm.resume()?;
        println!("paused in {paused_in:?}, state now {:?}", vm.state());
    }

    // Any byte on the serial port tells the guest to stop and check its counter.
    vm.serial_input().send(b"\n");
    let exit = vm.wait_timeout(Duration::from_secs(60)).unwrap_or_else(|| vm.stop());
    println!("--- guest console ---\n{}", String::from_utf8_lossy(&console.0.lock().unwrap()));
    println!("exit: {exit}");
    if exit == VmExit::Guest(0) { Ok(()) } else { Err(format!("guest failed: {exit}").into()) }
}
