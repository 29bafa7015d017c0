//! The microguest's virtio-blk driver against QEMU's device (Debian's qemu-system-x86, which
//! CI installs): the same driver passes against our device in tests/virtio.rs, so driver,
//! QEMU and our VMM agree on the spec.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Reaped, TempDir, microguest};

/// Runs the microguest on `qemu-system-x86_64 -M microvm` with `extra` device arguments.
fn qemu(cmdline: &str, extra: &[String]) -> (Option<i32>, String) {
    let mut cmd = Command::new("qemu-system-x86_64");
    // acpi=off: only then does microvm announce its virtio-mmio devices on the command line.
    cmd.args(["-M", "microvm,acpi=off", "-enable-kvm", "-m", "256", "-no-user-config", "-nodefaults", "-nographic"])
        .args(["-serial", "stdio", "-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
        // QEMU's virtio-mmio defaults to the legacy (version 1) layout; the microguest is 1.x only.
        .args(["-global", "virtio-mmio.force-legacy=false", "-kernel", microguest(), "-append", cmdline])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let child = Reaped(cmd.spawn().expect("qemu-system-x86_64 (package qemu-system-x86) is needed"));
    wait_with_timeout(child, Duration::from_secs(120))
}

fn wait_with_timeout(mut child: Reaped, timeout: Duration) -> (Option<i32>, String) {
    use std::io::Read;
    let mut stdout = child.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        let _ = tx.send(text);
    });
    let text = rx.recv_timeout(timeout).expect("QEMU did not finish in time");
    let status = child.0.wait().expect("wait for QEMU").code();
    (status, text)
}

#[test]
fn blk_rw_driver_agrees_with_qemus_virtio_blk() {
    let dir = TempDir::new("qemu-blk");
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(16 << 20).unwrap();
    let extra = vec![
        "-drive".to_string(),
        format!("file={},format=raw,if=none,id=d0", disk.display()),
        "-device".into(),
        "virtio-blk-device,drive=d0,serial=qemu-disk".into(),
    ];
    let (status, out) = qemu("prog=blk-rw", &extra);
    let success = guest_agent::protocol::qemu_exit_status(guest_agent::protocol::status::SUCCESS);
    assert_eq!(status, Some(success), "{out}");
    assert!(out.contains("blk-rw: disk id \"qemu-disk\""), "{out}");
    assert!(out.contains("blk-rw: wrote and verified 16 MiB (32768 sectors) on a 16 MiB disk"), "{out}");
}
