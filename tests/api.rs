//! The library API for embedders: build, pause, resume, stop, serial in and out.

mod common;

use std::time::Duration;

use common::Capture;
use vmm::{SerialOutput, VmBuilder, VmExit, VmState};

const WAIT: Duration = Duration::from_secs(60);

#[test]
fn pause_resume_a_running_four_vcpu_guest() {
    let serial = Capture::default();
    let vm = VmBuilder::new(common::microguest())
        .cmdline("prog=idle")
        .vcpus(4)
        .memory_mib(64)
        .serial_output(SerialOutput::Writer(Box::new(serial.clone())))
        .start()
        .unwrap();
    serial.wait_for("idle: ready", WAIT);
    assert_eq!(vm.state(), VmState::Running);
    for _ in 0..20 {
        vm.pause().unwrap();
        assert_eq!(vm.state(), VmState::Paused);
        vm.resume().unwrap();
        assert_eq!(vm.state(), VmState::Running);
    }
    // While paused, input is queued but not consumed; after resume the guest sees it.
    vm.pause().unwrap();
    assert_eq!(vm.serial_input().send(b"q"), 1);
    assert!(vm.wait_timeout(Duration::from_millis(200)).is_none(), "a paused guest cannot finish");
    vm.resume().unwrap();
    assert_eq!(vm.wait_timeout(WAIT), Some(VmExit::Guest(0)));
    assert!(serial.text().contains("idle: input received"));
    assert!(vm.pause().is_err(), "an exited VM cannot be paused");
    assert!(matches!(vm.state(), VmState::Exited(VmExit::Guest(0))));
}

#[test]
fn stop_ends_a_running_guest() {
    let serial = Capture::default();
    let vm = VmBuilder::new(common::microguest())
        .cmdline("prog=idle")
        .vcpus(2)
        .serial_output(SerialOutput::Writer(Box::new(serial.clone())))
        .start()
        .unwrap();
    serial.wait_for("idle: ready", WAIT);
    assert_eq!(vm.stop(), VmExit::Stopped);
    assert_eq!(vm.state(), VmState::Exited(VmExit::Stopped));
}

#[test]
fn dropping_a_running_vm_stops_it() {
    let serial = Capture::default();
    let vm = VmBuilder::new(common::microguest())
        .cmdline("prog=idle")
        .vcpus(4)
        .serial_output(SerialOutput::Writer(Box::new(serial.clone())))
        .start()
        .unwrap();
    serial.wait_for("idle: ready", WAIT);
    drop(vm);
}

#[test]
fn paused_guest_resumes_where_it_stopped() {
    let serial = Capture::default();
    let vm = VmBuilder::new(common::microguest())
        .cmdline("prog=smp until_input=1")
        .vcpus(4)
        .serial_output(SerialOutput::Writer(Box::new(serial.clone())))
        .start()
        .unwrap();
    serial.wait_for("all cpus incrementing", WAIT);
    for _ in 0..20 {
        vm.pause().unwrap();
        vm.resume().unwrap();
    }
    vm.serial_input().send(b"s");
    assert_eq!(vm.wait_timeout(WAIT), Some(VmExit::Guest(0)), "{}", serial.text());
    assert!(serial.text().contains("smp: 4/4 cpus online, shared counter"), "{}", serial.text());
    assert!(serial.text().contains("as expected"), "{}", serial.text());
}

#[test]
fn info_describes_the_vm() {
    let vm = VmBuilder::new(common::microguest())
        .cmdline("prog=hello")
        .vcpus(2)
        .memory_mib(32)
        .serial_output(SerialOutput::Sink)
        .start()
        .unwrap();
    let info = vm.info().clone();
    assert_eq!((info.vcpus, info.mem_bytes), (2, 32 << 20));
    assert_eq!(info.boot_protocol, vmm::BootProtocol::Pvh);
    assert_eq!(vm.wait(), VmExit::Guest(0));
}
