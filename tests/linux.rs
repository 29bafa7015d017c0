//! End-to-end Linux boot. Linux cannot boot on the development machines (their KVM emulates
//! ring-0 code and rejects SSE there), so this runs only where `VMM_TEST_LINUX_KERNEL` and
//! `VMM_TEST_LINUX_INITRD` are set, on a host with VMX or SVM. See the README.

mod common;

use std::time::Duration;

#[test]
fn linux_boots_to_its_init_and_reboots_cleanly() {
    let (Ok(kernel), Ok(initrd)) = (std::env::var("VMM_TEST_LINUX_KERNEL"), std::env::var("VMM_TEST_LINUX_INITRD"))
    else {
        eprintln!("skipped: set VMM_TEST_LINUX_KERNEL and VMM_TEST_LINUX_INITRD to run the Linux boot test");
        return;
    };
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
