//! The microguest's virtio drivers against our devices, with every backend: a VM with a disk,
//! a NIC and a vsock device runs blk-rw on each block backend (file, io_uring, NBD served by a
//! real qemu-nbd), net-echo on both network backends (a real tap, a Unix datagram socket) and
//! vsock-echo through the hybrid vsock socket.

mod common;

use common::peers::{DatagramEcho, NbdServer, StreamEcho, Tap, TapEcho};
use common::{Output, TempDir, microguest, vmm};

/// Boots the microguest with one device of each kind plus `extra` flags, running `prog`.
struct Rig {
    dir: TempDir,
    disk: std::path::PathBuf,
    _net_echo: DatagramEcho,
    _vsock_echo: StreamEcho,
}

impl Rig {
    fn new(tag: &str) -> Self {
        let dir = TempDir::new(tag);
        let disk = dir.join("disk.img");
        std::fs::File::create(&disk).unwrap().set_len(32 << 20).unwrap();
        let net_echo = DatagramEcho::start(&dir.join("net.sock"));
        let vsock_echo = StreamEcho::start(&dir.join("vsock.sock_1234"));
        Self { dir, disk, _net_echo: net_echo, _vsock_echo: vsock_echo }
    }

    fn run(&self, prog: &str, disk: &str, net: &str) -> Output {
        let vsock = format!("cid=3,socket={}", self.dir.join("vsock.sock").display());
        vmm(&["run", "--kernel", microguest(), "--cmdline", prog, "--disk", disk, "--net", net, "--vsock", &vsock])
    }

    fn file_disk(&self, extra: &str) -> String {
        format!("path={}{extra}", self.disk.display())
    }

    fn unix_net(&self) -> String {
        format!("unix={}", self.dir.join("net.sock").display())
    }
}

#[test]
fn blk_rw_on_the_sync_file_backend() {
    let rig = Rig::new("blk-sync");
    rig.run("prog=blk-rw", &rig.file_disk(",engine=sync"), &rig.unix_net())
        .expect_status(0)
        .expect_stdout("blk-rw: wrote and verified 32 MiB (65536 sectors) on a 32 MiB disk");
}

#[test]
fn blk_rw_on_the_io_uring_backend() {
    let rig = Rig::new("blk-uring");
    rig.run("prog=blk-rw", &rig.file_disk(",engine=io_uring,id=fast"), &rig.unix_net())
        .expect_status(0)
        .expect_stdout("blk-rw: disk id \"fast\"")
        .expect_stdout("blk-rw: wrote and verified 32 MiB");
}

#[test]
fn blk_rw_on_the_nbd_backend_served_by_qemu_nbd() {
    let rig = Rig::new("blk-nbd");
    let server = NbdServer::start(&rig.disk, &rig.dir.join("nbd.sock"), &[]);
    let disk = format!("nbd=unix:{}", server.socket.display());
    rig.run("prog=blk-rw", &disk, &rig.unix_net()).expect_status(0).expect_stdout("blk-rw: wrote and verified 32 MiB");
    // The data is really in the image qemu-nbd serves: read it back through the file backend.
    rig.run("prog=blk-rw expect_pattern=1", &rig.file_disk(",readonly=on"), &rig.unix_net())
        .expect_status(0)
        .expect_stdout("65536 sectors carry a valid pattern");
}

#[test]
fn read_only_disk_refuses_writes() {
    let rig = Rig::new("blk-ro");
    rig.run("prog=blk-rw", &rig.file_disk(",readonly=on"), &rig.unix_net())
        .expect_status(0)
        .expect_stdout("read-only disk refused a write with IOERR and kept its data");
}

#[test]
fn net_echo_over_the_unix_datagram_backend() {
    let rig = Rig::new("net-unix");
    rig.run("prog=net-echo frames=2000", &rig.file_disk(""), &rig.unix_net())
        .expect_status(0)
        .expect_stdout("net-echo: sent 2000 frames, received 2000, lost 0, duplicated 0, corrupt 0");
}

#[test]
fn net_echo_over_a_real_tap() {
    let rig = Rig::new("net-tap");
    // A tap per test process, so parallel test runs do not collide.
    let tap = Tap::create(&format!("vmt{}", std::process::id() % 100_000));
    let _echo = TapEcho::start(&tap.name);
    rig.run("prog=net-echo frames=1000", &rig.file_disk(""), &format!("tap={},mac=52:54:00:aa:bb:cc", tap.name))
        .expect_status(0)
        .expect_stdout("mac 52:54:00:aa:bb:cc")
        .expect_stdout("net-echo: sent 1000 frames, received 1000, lost 0");
}

#[test]
fn vsock_echo_through_the_hybrid_socket() {
    let rig = Rig::new("vsock");
    rig.run("prog=vsock-echo bytes=1048576", &rig.file_disk(""), &rig.unix_net())
        .expect_status(0)
        .expect_stdout("vsock-echo: echoed and verified 1048576 bytes")
        .expect_stdout("closed cleanly");
}

#[test]
fn all_devices_are_listed_by_the_guest() {
    let rig = Rig::new("list");
    rig.run("prog=virtio-list", &rig.file_disk(""), &rig.unix_net())
        .expect_status(0)
        .expect_stdout("virtio-list: 3 described, 3 present");
}

/// Runtime failures are one line; flag errors are clap's, naming the flag and the help to read.
#[test]
fn device_option_errors_are_clear() {
    let rig = Rig::new("bad");
    vmm(&["run", "--kernel", microguest(), "--disk", "path=/nonexistent.img"])
        .expect_status(2)
        .expect_one_line_error("disk image /nonexistent.img does not exist");
    vmm(&["run", "--kernel", microguest(), "--net", &format!("unix={}", rig.dir.join("nobody.sock").display())])
        .expect_status(1)
        .expect_one_line_error("cannot connect to");
    let server_less = format!("nbd=unix:{}", rig.dir.join("none.sock").display());
    vmm(&["run", "--kernel", microguest(), "--disk", &server_less])
        .expect_status(1)
        .expect_one_line_error("device disk0");
    vmm(&["run", "--kernel", microguest(), "--vsock", "cid=1,socket=/tmp/x"])
        .expect_status(2)
        .expect_usage_error("cid=1");
    let twice = rig.file_disk(",id=x");
    vmm(&["run", "--kernel", microguest(), "--disk", &twice, "--disk", &twice])
        .expect_status(2)
        .expect_one_line_error("device id \"x\" is used twice");
    vmm(&["run", "--kernel", microguest(), "--disk", "path=/a,cache=none"])
        .expect_status(2)
        .expect_usage_error("unknown option \"cache\"");
}
