//! End-to-end Linux boot. Linux cannot boot on the development machines (their KVM emulates
//! ring-0 code and rejects SSE there), so this test is ignored by default: on a host with VMX
//! or SVM, set `VMM_TEST_LINUX_KERNEL` and `VMM_TEST_LINUX_INITRD` and run it with
//! `--ignored` (see the README). Asked for without the variables, it fails rather than pass
//! without having booted anything.

mod common;

use std::time::Duration;

#[test]
#[ignore = "needs a Linux kernel and a host with VMX/SVM: set VMM_TEST_LINUX_KERNEL and VMM_TEST_LINUX_INITRD, run with --ignored"]
fn linux_boots_to_its_init_and_reboots_cleanly() {
    let var = |name: &str| {
        std::env::var(name)
            .unwrap_or_else(|_| panic!("{name} is not set: it names the Linux image to boot (see the README)"))
    };
    let (kernel, initrd) = (var("VMM_TEST_LINUX_KERNEL"), var("VMM_TEST_LINUX_INITRD"));
    let expect = std::env::var("VMM_TEST_LINUX_EXPECT").unwrap_or_else(|_| "Run /init as init process".into());
    // reboot=k: the guest's reboot goes through the i8042, which ends the VMM cleanly.
    let cmdline = "console=ttyS0 reboot=k panic=-1 rdinit=/init i8042.noaux i8042.nomux i8042.dumbkbd";
    let out = common::vmm_with(
        &["run", "--kernel", &kernel, "--initrd", &initrd, "--cmdline", cmdline, "--mem-mib", "512", "--vcpus", "2"],
        None,
        Duration::from_secs(300),
    );
    out.expect_stdout("Linux version").expect_stdout(&expect).expect_status(0);
}
