//! Bad input of every kind gets one line on stderr and a non-zero exit, never a panic.

mod common;

use common::{TempDir, microguest, vmm, write_raw_elf};

#[test]
fn no_subcommand_prints_usage() {
    let out = vmm(&[]);
    assert_eq!(out.status, Some(2));
    assert!(out.stderr.contains("Usage"), "{}", out.stderr);
}

#[test]
fn missing_kernel_flag() {
    vmm(&["run"]).expect_status(2).expect_one_line_error("no kernel given");
}

#[test]
fn kernel_file_does_not_exist() {
    vmm(&["run", "--kernel", "/nonexistent/vmlinux"])
        .expect_status(2)
        .expect_one_line_error("kernel /nonexistent/vmlinux does not exist");
}

#[test]
fn kernel_is_a_directory() {
    let dir = TempDir::new("kernel-dir");
    vmm(&["run", "--kernel", dir.path().to_str().unwrap()])
        .expect_status(2)
        .expect_one_line_error("is not a regular file");
}

#[test]
fn kernel_is_not_a_kernel() {
    let dir = TempDir::new("not-kernel");
    let junk = dir.join("junk");
    std::fs::write(&junk, "this is not a kernel image, just some text that is long enough to be read\n".repeat(20))
        .unwrap();
    vmm(&["run", "--kernel", junk.to_str().unwrap()])
        .expect_status(2)
        .expect_one_line_error("neither an ELF (vmlinux) nor a bzImage");
    let empty = dir.join("empty");
    std::fs::write(&empty, "").unwrap();
    vmm(&["run", "--kernel", empty.to_str().unwrap()]).expect_status(2).expect_one_line_error("neither an ELF");
}

#[test]
fn kernel_for_another_architecture() {
    let dir = TempDir::new("arm-elf");
    let path = dir.join("arm");
    write_raw_elf(&path, &[0x0f, 0x0b]);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[18] = 183; // EM_AARCH64
    std::fs::write(&path, bytes).unwrap();
    vmm(&["run", "--kernel", path.to_str().unwrap()]).expect_status(2).expect_one_line_error("another architecture");
}

#[test]
fn kernel_that_does_not_fit_in_memory() {
    let dir = TempDir::new("big-elf");
    let path = dir.join("big");
    write_raw_elf(&path, &vec![0x90; 20 << 20]);
    vmm(&["run", "--kernel", path.to_str().unwrap(), "--mem-mib", "16"])
        .expect_status(2)
        .expect_one_line_error("16 MiB of guest memory");
}

#[test]
fn too_little_memory() {
    vmm(&["run", "--kernel", microguest(), "--mem-mib", "4"])
        .expect_status(2)
        .expect_one_line_error("a guest needs at least 16 MiB");
}

#[test]
fn too_many_or_zero_vcpus() {
    vmm(&["run", "--kernel", microguest(), "--vcpus", "100000"])
        .expect_status(2)
        .expect_one_line_error("vcpus (--vcpus) is 100000");
    vmm(&["run", "--kernel", microguest(), "--vcpus", "0"])
        .expect_status(2)
        .expect_one_line_error("must be between 1 and");
}

#[test]
fn malformed_numbers_and_values() {
    vmm(&["run", "--kernel", microguest(), "--mem-mib", "lots"]).expect_status(2).expect_one_line_error("--mem-mib");
    vmm(&["run", "--kernel", microguest(), "--serial", "tty"])
        .expect_status(2)
        .expect_one_line_error("expected stdout, none or file:PATH");
    vmm(&["run", "--kernel", microguest(), "--boot-protocol", "uefi"])
        .expect_status(2)
        .expect_one_line_error("unknown boot protocol");
    vmm(&["run", "--kernel", microguest(), "--frobnicate"]).expect_status(2).expect_one_line_error("--frobnicate");
}

#[test]
fn pvh_requested_for_a_kernel_without_the_note() {
    let dir = TempDir::new("no-pvh");
    let path = dir.join("k");
    write_raw_elf(&path, &[0xf4]);
    vmm(&["run", "--kernel", path.to_str().unwrap(), "--boot-protocol", "pvh"])
        .expect_status(2)
        .expect_one_line_error("no PVH entry note");
}

#[test]
fn command_line_too_long() {
    let long = "x".repeat(5000);
    vmm(&["run", "--kernel", microguest(), "--cmdline", &long])
        .expect_status(2)
        .expect_one_line_error("command line is 5000 bytes");
}

#[test]
fn config_file_problems() {
    let dir = TempDir::new("config");
    let unknown = dir.join("unknown.json");
    std::fs::write(&unknown, format!(r#"{{"kernel": "{}", "memory_mib": 64}}"#, microguest())).unwrap();
    vmm(&["run", "--config", unknown.to_str().unwrap()])
        .expect_status(2)
        .expect_one_line_error("unknown field `memory_mib`");

    let broken = dir.join("broken.json");
    std::fs::write(&broken, "{ \"kernel\": ").unwrap();
    vmm(&["run", "--config", broken.to_str().unwrap()]).expect_status(2).expect_one_line_error("is not valid JSON");

    let wrong_type = dir.join("type.json");
    std::fs::write(&wrong_type, format!(r#"{{"kernel": "{}", "vcpus": "four"}}"#, microguest())).unwrap();
    vmm(&["run", "--config", wrong_type.to_str().unwrap()]).expect_status(2).expect_one_line_error("invalid type");

    let not_object = dir.join("list.json");
    std::fs::write(&not_object, "[1, 2]").unwrap();
    vmm(&["run", "--config", not_object.to_str().unwrap()])
        .expect_status(2)
        .expect_one_line_error("expected a JSON object");

    vmm(&["run", "--config", "/nonexistent.json"]).expect_status(2).expect_one_line_error("cannot read config file");
}

#[test]
fn serial_file_in_missing_directory() {
    vmm(&["run", "--kernel", microguest(), "--serial", "file:/nonexistent/dir/log"])
        .expect_status(2)
        .expect_one_line_error("cannot open serial output file");
}

#[test]
fn no_dev_kvm() {
    // Hide /dev behind an empty tmpfs in a private mount namespace.
    let out = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!("mount -t tmpfs none /dev && exec {} run --kernel {}", common::vmm_bin(), microguest()))
        .output()
        .expect("unshare (util-linux) is needed for this test");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("error: cannot open /dev/kvm"), "{stderr}");
}

#[test]
fn guest_triple_fault_is_a_clear_error() {
    let dir = TempDir::new("triple");
    let path = dir.join("ud2");
    // `ud2` with the boot IDT (no gates): #UD -> #GP -> #DF -> triple fault.
    write_raw_elf(&path, &[0x0f, 0x0b]);
    vmm(&["run", "--kernel", path.to_str().unwrap()])
        .expect_status(1)
        .expect_one_line_error("guest crashed on vCPU 0: triple fault");
}

#[test]
fn help_and_version_succeed() {
    let out = vmm(&["--version"]);
    assert_eq!(out.status, Some(0));
    assert!(out.stdout.starts_with("vmm "));
    let out = vmm(&["run", "--help"]);
    assert_eq!(out.status, Some(0));
    assert!(out.stdout.contains("--mem-mib"));
}
