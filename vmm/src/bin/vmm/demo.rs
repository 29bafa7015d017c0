//! `vmm demo`: boots the bundled microguest a few ways and narrates what happens.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use test_peers::{DatagramEcho, StreamEcho};
use vmm::config::{BlockEngine, DiskConfig, NetConfig, VsockConfig};
use vmm::{BootProtocol, SerialOutput, VmBuilder, VmConfig, VmExit};

use crate::cli::{DemoArgs, Failure};

struct Step {
    title: &'static str,
    cmdline: &'static str,
    vcpus: u32,
    mem_mib: u64,
    protocol: BootProtocol,
}

const STEPS: &[Step] = &[
    Step { title: "boot through PVH", cmdline: "prog=hello", vcpus: 1, mem_mib: 64, protocol: BootProtocol::Auto },
    Step {
        title: "boot through the 64-bit Linux entry",
        cmdline: "prog=hello",
        vcpus: 1,
        mem_mib: 64,
        protocol: BootProtocol::Linux,
    },
    Step {
        title: "touch and verify 64 MiB of guest RAM",
        cmdline: "prog=memtouch mib=64",
        vcpus: 1,
        mem_mib: 128,
        protocol: BootProtocol::Auto,
    },
    Step {
        title: "start 4 vCPUs (INIT/SIPI), each reports in",
        cmdline: "prog=smp",
        vcpus: 4,
        mem_mib: 64,
        protocol: BootProtocol::Auto,
    },
];

/// Removes a temporary file or directory when the demo ends, however it ends.
struct Temp(PathBuf);

impl Drop for Temp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0).or_else(|_| std::fs::remove_file(&self.0));
    }
}

pub fn run(args: &DemoArgs) -> Result<u8, Failure> {
    let path = std::env::temp_dir().join(format!("vmm-demo-microguest-{}", std::process::id()));
    std::fs::write(&path, guest_agent::microguest())
        .with_context(|| format!("cannot write the microguest to {}", path.display()))
        .map_err(Failure::runtime)?;
    let image = Temp(path);
    let say = |s: String| {
        if !args.quiet {
            println!("{s}");
        }
    };

    let mut failures = 0;
    for step in STEPS {
        say(format!(
            "\n== {} ({} vCPU{}, {} MiB, cmdline \"{}\")",
            step.title,
            step.vcpus,
            if step.vcpus == 1 { "" } else { "s" },
            step.mem_mib,
            step.cmdline
        ));
        let started = Instant::now();
        let vm = VmBuilder::new(&image.0)
            .cmdline(step.cmdline)
            .vcpus(step.vcpus)
            .memory_mib(step.mem_mib)
            .boot_protocol(step.protocol)
            .serial_output(SerialOutput::Stdout)
            .start()?;
        let exit = vm.wait();
        say(format!("   -> {exit} after {:.1} ms ({} entry)", ms(started.elapsed()), vm.info().boot_protocol));
        if exit != VmExit::Guest(0) {
            failures += 1;
        }
    }

    failures += virtio_steps(&image.0, &say)?;

    say("\n== pause and resume a running 4-vCPU guest 100 times".into());
    let vm = VmBuilder::new(&image.0)
        .cmdline("prog=idle")
        .vcpus(4)
        .memory_mib(64)
        .serial_output(SerialOutput::Stdout)
        .start()?;
    let (mut pauses, mut resumes) = (Vec::new(), Vec::new());
    for _ in 0..100 {
        let t = Instant::now();
        vm.pause().map_err(|e| Failure::runtime(anyhow!(e)))?;
        pauses.push(t.elapsed());
        let t = Instant::now();
        vm.resume().map_err(|e| Failure::runtime(anyhow!(e)))?;
        resumes.push(t.elapsed());
    }
    vm.serial_input().send(b"\n");
    let exit = vm.wait_timeout(Duration::from_secs(30)).unwrap_or_else(|| vm.stop());
    pauses.sort();
    resumes.sort();
    say(format!(
        "   -> pause p50 {:.1} us, p99 {:.1} us; resume p50 {:.1} us, p99 {:.1} us; guest: {exit}",
        us(pauses[49]),
        us(pauses[98]),
        us(resumes[49]),
        us(resumes[98])
    ));
    if exit != VmExit::Guest(0) {
        failures += 1;
    }

    if failures == 0 {
        say("\nAll demo steps passed.".into());
        Ok(0)
    } else {
        Err(Failure::runtime(anyhow!("{failures} demo step(s) failed")))
    }
}

/// A VM with a disk (io_uring), a NIC (userspace backend) and a vsock device, running each
/// device's test program; the host ends are echo servers in this process.
fn virtio_steps(image: &PathBuf, say: &dyn Fn(String)) -> Result<usize, Failure> {
    let dir = std::env::temp_dir().join(format!("vmm-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create {}", dir.display()))
        .map_err(Failure::runtime)?;
    let _cleanup = Temp(dir.clone());
    std::fs::File::create(dir.join("disk.img"))
        .and_then(|f| f.set_len(32 << 20))
        .context("cannot create the demo disk")
        .map_err(Failure::runtime)?;
    let _net_echo = DatagramEcho::start(&dir.join("net.sock"));
    let _vsock_echo = StreamEcho::start(&dir.join("vsock.sock_1234"));
    let mut config = VmConfig::new(image);
    config.mem_mib = 128;
    config.disks =
        vec![DiskConfig { path: Some(dir.join("disk.img")), engine: BlockEngine::IoUring, ..Default::default() }];
    config.nets = vec![NetConfig { unix: Some(dir.join("net.sock")), ..Default::default() }];
    config.vsock = Some(VsockConfig { id: None, cid: 3, socket: dir.join("vsock.sock") });

    let mut failures = 0;
    for (title, cmdline) in [
        ("virtio-blk on an io_uring disk: write, read back, verify 32 MiB", "prog=blk-rw"),
        ("virtio-net over a Unix datagram backend: 2000 frames echoed", "prog=net-echo frames=2000"),
        ("virtio-vsock to a host Unix socket: 1 MiB echoed", "prog=vsock-echo bytes=1048576"),
    ] {
        say(format!("\n== {title} (cmdline \"{cmdline}\")"));
        let mut step = config.clone();
        step.cmdline = cmdline.into();
        let started = Instant::now();
        let vm = VmBuilder::from_config(step).serial_output(SerialOutput::Stdout).start()?;
        let exit = vm.wait();
        say(format!("   -> {exit} after {:.1} ms", ms(started.elapsed())));
        if exit != VmExit::Guest(0) {
            failures += 1;
        }
    }
    Ok(failures)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
