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

/// Set in the child process that [`dropping_a_running_vm_stops_it`] runs itself in.
const DROP_CHECK_CHILD: &str = "VMM_TEST_DROP_CHECK_CHILD";

/// Dropping a running `Vm` ends its vCPU threads and closes every descriptor it opened. Threads
/// and descriptors are per process and the other tests create their own, so the check runs in
/// a child process of this test binary that runs this test alone.
#[test]
fn dropping_a_running_vm_stops_it() {
    if std::env::var_os(DROP_CHECK_CHILD).is_some() {
        return drop_check_in_this_process();
    }
    let mut child = std::process::Command::new(std::env::current_exe().unwrap());
    child
        .args(["dropping_a_running_vm_stops_it", "--exact", "--nocapture", "--test-threads=1"])
        .env(DROP_CHECK_CHILD, "1");
    let out = common::run_to_completion(child, None, WAIT);
    let report = format!("--- stdout\n{}\n--- stderr\n{}", out.stdout, out.stderr);
    assert_eq!(out.status, Some(0), "the drop check failed in its own process\n{report}");
    assert!(out.stdout.contains("drop check: clean"), "the child did not run the check\n{report}");
}

fn drop_check_in_this_process() {
    let before = ProcessResources::now();
    let serial = Capture::default();
    let vm = VmBuilder::new(common::microguest())
        .cmdline("prog=idle")
        .vcpus(4)
        .serial_output(SerialOutput::Writer(Box::new(serial.clone())))
        .start()
        .unwrap();
    serial.wait_for("idle: ready", WAIT);
    let running = ProcessResources::now();
    // The baseline must be able to see what the VM holds, or the check below proves nothing.
    assert_eq!(running.fds_to("anon_inode:kvm-vcpu"), 4, "{running:#?}");
    assert_eq!(running.fds_to("anon_inode:kvm-vm"), 1, "{running:#?}");
    assert!(running.threads.len() >= before.threads.len() + 4, "{before:#?}\n{running:#?}");

    drop(vm);
    let after = ProcessResources::now();
    let lingering_threads: Vec<_> = after.threads.difference(&before.threads).collect();
    assert!(lingering_threads.is_empty(), "threads left after the drop: {lingering_threads:?}");
    let leaked_fds: Vec<_> = after.fds.difference(&before.fds).collect();
    assert!(leaked_fds.is_empty(), "descriptors left open after the drop: {leaked_fds:?}");
    println!(
        "drop check: clean ({} threads and {} descriptors while running, none left)",
        running.threads.len() - before.threads.len(),
        running.fds.len() - before.fds.len()
    );
}

/// This process's threads (id and name) and open descriptors (number and target).
#[derive(Debug)]
struct ProcessResources {
    threads: std::collections::BTreeSet<(String, String)>,
    fds: std::collections::BTreeSet<(String, String)>,
}

impl ProcessResources {
    fn now() -> Self {
        let entries = |dir: &str, describe: &dyn Fn(&std::path::Path) -> String| {
            std::fs::read_dir(dir)
                .unwrap_or_else(|e| panic!("read {dir}: {e}"))
                .filter_map(|entry| {
                    let path = entry.ok()?.path();
                    Some((path.file_name()?.to_string_lossy().into_owned(), describe(&path)))
                })
                .collect()
        };
        let threads = entries("/proc/self/task", &|task: &std::path::Path| {
            std::fs::read_to_string(task.join("comm")).unwrap_or_default().trim().to_string()
        });
        // A descriptor that closes between the listing and its readlink (the listing's own)
        // reads as empty in both snapshots.
        let fds = entries("/proc/self/fd", &|fd: &std::path::Path| {
            std::fs::read_link(fd).map(|t| t.display().to_string()).unwrap_or_default()
        });
        Self { threads, fds }
    }

    /// Descriptors whose target starts with `target` (vCPU descriptors end in `:<index>`).
    fn fds_to(&self, target: &str) -> usize {
        self.fds.iter().filter(|(_, t)| t.starts_with(target)).count()
    }
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
