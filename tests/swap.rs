//! Live component swaps under load: disk engines, live storage migration, NICs, vsock, memory
//! regions, and automatic rollback from a failing backend.

mod common;

use std::time::Duration;

use common::{Capture, TempDir};
use serde_json::json;
use vmm::config::DiskConfig;
use vmm::swap::{MemorySwapRequest, SwapRequest, SwapState};
use vmm::{RamBacking, SerialOutput, VmBuilder, VmConfig, VmExit};

const WAIT: Duration = Duration::from_secs(120);

fn request(backend: serde_json::Value) -> SwapRequest {
    serde_json::from_value(json!({ "backend": backend })).unwrap()
}

#[test]
fn idle_disk_engine_swap_and_memory_swap_smoke() {
    let dir = TempDir::new("swap-smoke");
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(16 << 20).unwrap();
    let mut config = VmConfig::new(common::microguest());
    config.cmdline = "prog=idle".into();
    config.disks = vec![DiskConfig { path: Some(disk.clone()), ..Default::default() }];
    let serial = Capture::default();
    let vm =
        VmBuilder::from_config(config).serial_output(SerialOutput::Writer(Box::new(serial.clone()))).start().unwrap();
    serial.wait_for("idle: ready", WAIT);

    let swap = vm.swap_device("disk0", request(json!({ "path": disk, "engine": "io_uring" }))).unwrap();
    let record = swap.wait(WAIT);
    assert_eq!(record.state, SwapState::Committed, "{record:?}");
    assert!(record.blackout_us.is_some());
    assert!(record.to.contains("io_uring"), "{record:?}");

    let report = vm
        .swap_memory(0, &MemorySwapRequest { backing: RamBacking::Memfd, verify: true, drain_timeout_ms: 2000 })
        .unwrap();
    assert_eq!(report.to, RamBacking::Memfd);
    assert!(report.bytes_copied > 0, "{report:?}");
    vm.serial_input().send(b"q");
    assert_eq!(vm.wait_timeout(WAIT), Some(VmExit::Guest(0)), "{}", serial.text());
}
