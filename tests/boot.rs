//! Booting the microguest through the `vmm` binary: both entry protocols, 1 and 4 vCPUs, and
//! the guest's status becoming the process exit status.

mod common;

use common::{TempDir, run_microguest};

#[test]
fn hello_pvh_one_vcpu() {
    run_microguest("prog=hello", &[])
        .expect_status(0)
        .expect_stdout("hello: Hello from the microguest! boot=pvh ram=127MiB cpus=1")
        .expect_stdout("microguest: done status=0");
}

#[test]
fn hello_linux64_entry_four_vcpus() {
    run_microguest("prog=hello", &["--boot-protocol", "linux", "--vcpus", "4", "--mem-mib", "64"])
        .expect_status(0)
        .expect_stdout("boot=linux64 ram=63MiB cpus=4");
}

#[test]
fn hello_sees_the_vmm_timing_leaf() {
    let out = run_microguest("prog=hello", &[]);
    out.expect_status(0);
    let khz: u64 = out.stdout.split("tsc_khz=").nth(1).and_then(|s| s.split(' ').next()).unwrap().parse().unwrap();
    assert!(khz > 100_000, "TSC frequency from the VMM's CPUID leaf: {khz} kHz");
}

#[test]
fn memtouch_one_and_four_vcpus() {
    for vcpus in ["1", "4"] {
        run_microguest("prog=memtouch mib=64", &["--vcpus", vcpus, "--mem-mib", "128"])
            .expect_status(0)
            .expect_stdout("memtouch: 64 MiB at")
            .expect_stdout("written and verified");
    }
}

/// More RAM than fits below the MMIO gap: the rest lives in a second region from 4 GiB, which
/// both entry protocols' memory maps must report (memtouch uses the largest free range, which
/// is then that one).
#[test]
fn memory_above_the_mmio_gap_through_both_entry_protocols() {
    for protocol in ["pvh", "linux"] {
        run_microguest("prog=memtouch mib=64", &["--boot-protocol", protocol, "--mem-mib", "6144"])
            .expect_status(0)
            .expect_stdout("memtouch: 64 MiB at 0x100000000")
            .expect_stdout("written and verified");
    }
}

#[test]
fn memtouch_more_than_the_guest_has_is_a_usage_error() {
    run_microguest("prog=memtouch mib=512", &["--mem-mib", "64"]).expect_status(2).expect_stdout("does not fit");
}

#[test]
fn smp_every_vcpu_reports_in() {
    let out = run_microguest("prog=smp", &["--vcpus", "4"]);
    out.expect_status(0).expect_stdout("smp: 4/4 cpus online, shared counter 400000 as expected");
    for cpu in 0..4 {
        out.expect_stdout(&format!("smp: cpu {cpu} (apic id"));
    }
}

#[test]
fn smp_single_vcpu() {
    run_microguest("prog=smp", &["--vcpus", "1"]).expect_status(0).expect_stdout("smp: 1/1 cpus online");
}

#[test]
fn guest_status_becomes_exit_status() {
    run_microguest("prog=no-such-program", &[])
        .expect_status(2)
        .expect_stdout("unknown program \"no-such-program\"")
        .expect_stdout("memtouch");
}

#[test]
fn serial_input_reaches_the_guest() {
    let out = common::vmm_with(
        &["run", "--kernel", common::microguest(), "--cmdline", "prog=idle"],
        Some(b"x"),
        std::time::Duration::from_secs(60),
    );
    out.expect_status(0).expect_stdout("idle: input received");
}

#[test]
fn serial_to_file_and_config_file() {
    let dir = TempDir::new("serial-file");
    let log = dir.join("console.log");
    let config = dir.join("vm.json");
    std::fs::write(
        &config,
        format!(
            r#"{{"kernel": "{}", "cmdline": "prog=smp", "vcpus": 2, "mem_mib": 64, "serial": "file:{}"}}"#,
            common::microguest(),
            log.display()
        ),
    )
    .unwrap();
    let out = common::vmm(&["run", "--config", config.to_str().unwrap()]);
    out.expect_status(0);
    assert!(out.stdout.is_empty(), "serial went to the file, not stdout: {}", out.stdout);
    let console = std::fs::read_to_string(&log).unwrap();
    assert!(console.contains("smp: 2/2 cpus online"), "{console}");
}

#[test]
fn flags_override_the_config_file() {
    let dir = TempDir::new("override");
    let config = dir.join("vm.json");
    std::fs::write(
        &config,
        format!(r#"{{"kernel": "{}", "cmdline": "prog=hello", "vcpus": 2}}"#, common::microguest()),
    )
    .unwrap();
    common::vmm(&["run", "--config", config.to_str().unwrap(), "--vcpus", "3"])
        .expect_status(0)
        .expect_stdout("cpus=3");
}

#[test]
fn demo_runs_every_step() {
    common::vmm(&["demo"]).expect_status(0).expect_stdout("All demo steps passed.");
}

#[test]
fn i8042_reset_is_a_clean_shutdown() {
    run_microguest("prog=reset", &[]).expect_status(0).expect_stdout("reset: asking the i8042");
}

#[test]
fn unhandled_accesses_are_logged_once_and_read_as_all_ones() {
    let out = run_microguest("prog=unhandled", &[]);
    out.expect_status(0).expect_stdout("unhandled: port and MMIO reads returned");
    for needle in [
        "unhandled PioWrite of 1 bytes at 0x510",
        "unhandled PioRead of 1 bytes at 0x510",
        "unhandled MmioWrite of 4 bytes at 0xc0000000",
        "unhandled MmioRead of 4 bytes at 0xc0000000",
    ] {
        assert_eq!(out.stderr.matches(needle).count(), 1, "{needle:?} once in:\n{}", out.stderr);
    }
}
