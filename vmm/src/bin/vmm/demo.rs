//! `vmm demo`: boots the bundled microguest a few ways and narrates what happens.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use serde_json::json;
use test_peers::{DatagramEcho, NbdServer, StreamEcho};
use vmm::config::{BlockEngine, DiskConfig, NetConfig, VsockConfig};
use vmm::snapshot::{MemoryMode, SnapshotKind, SnapshotRequest};
use vmm::swap::{MemorySwapRequest, SwapRecord, SwapState};
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
    failures += swap_steps(&image.0, &say)?;
    failures += snapshot_steps(&image.0, &say)?;
    failures += replication_steps(&image.0, &say)?;
    failures += swarm_steps(&image.0, &say)?;

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

/// Serial output shown on stdout and kept, so the demo can wait for what the guest says.
#[derive(Clone, Default)]
struct Console(Arc<(Mutex<Vec<u8>>, Condvar)>);

impl Console {
    fn wait_for(&self, needle: &str, timeout: Duration) -> Option<String> {
        let (lock, cond) = &*self.0;
        let guard = lock.lock().unwrap_or_else(|p| p.into_inner());
        let found = |buf: &Vec<u8>| String::from_utf8_lossy(buf).contains(needle);
        let (guard, _) = cond.wait_timeout_while(guard, timeout, |b| !found(b)).unwrap_or_else(|p| p.into_inner());
        found(&guard).then(|| String::from_utf8_lossy(&guard).into_owned())
    }
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        std::io::stdout().write_all(buf)?;
        let (lock, cond) = &*self.0;
        lock.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(buf);
        cond.notify_all();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
}

fn qemu_nbd_available() -> bool {
    Command::new("qemu-nbd").arg("--version").stdout(Stdio::null()).status().is_ok_and(|s| s.success())
}

/// The product's point: a guest keeps verified I/O running while its disk backend changes
/// engine, moves to another image, survives a failing backend, and its RAM changes backing.
fn swap_steps(image: &PathBuf, say: &dyn Fn(String)) -> Result<usize, Failure> {
    let runtime = |e: &dyn std::fmt::Display| Failure::runtime(anyhow!("{e}"));
    let dir = std::env::temp_dir().join(format!("vmm-demo-swap-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| runtime(&e))?;
    let _cleanup = Temp(dir.clone());
    let (disk, copy) = (dir.join("disk.img"), dir.join("copy.img"));
    for path in [&disk, &copy] {
        std::fs::File::create(path).and_then(|f| f.set_len(32 << 20)).map_err(|e| runtime(&e))?;
    }
    let cmdline = "prog=blk-stress qd=16 until_input=1 progress_ms=0";
    say(format!("\n== live swaps while the guest keeps 16 verified 4 KiB requests in flight (cmdline \"{cmdline}\")"));
    let mut config = VmConfig::new(image);
    config.cmdline = cmdline.into();
    config.disks = vec![DiskConfig { path: Some(disk.clone()), ..Default::default() }];
    let console = Console::default();
    let vm = VmBuilder::from_config(config).serial_output(SerialOutput::Writer(Box::new(console.clone()))).start()?;
    let wait = Duration::from_secs(60);
    console.wait_for("blk-stress: running", wait).ok_or_else(|| runtime(&"blk-stress did not start"))?;

    let nbd = qemu_nbd_available().then(|| NbdServer::start(&disk, &dir.join("nbd.sock"), &[]));
    let mut backends = vec![json!({"path": disk, "engine": "io_uring"}), json!({"path": disk, "engine": "sync"})];
    if let Some(nbd) = &nbd {
        backends.push(json!({"nbd": format!("unix:{}", nbd.socket.display())}));
    }
    let swap = |body: serde_json::Value| -> Result<SwapRecord, Failure> {
        let request = serde_json::from_value(body).map_err(|e| runtime(&e))?;
        Ok(vm.swap_device("disk0", request).map_err(|e| runtime(&e))?.wait(wait))
    };
    let mut blackouts = Vec::new();
    let mut failures = 0;
    for i in 0..30 {
        let record = swap(json!({ "backend": backends[i % backends.len()] }))?;
        if record.state != SwapState::Committed {
            say(format!(
                "   swap {} did not commit: {} {}",
                record.id,
                record.state,
                record.reason.unwrap_or_default()
            ));
            failures += 1;
        }
        blackouts.extend(record.blackout_us);
    }
    blackouts.sort_unstable();
    let engines =
        if nbd.is_some() { "sync -> io_uring -> NBD (qemu-nbd)" } else { "sync -> io_uring (no qemu-nbd here)" };
    say(format!(
        "   -> 30 engine swaps ({engines}): blackout p50 {} us, max {} us",
        blackouts.get(blackouts.len() / 2).unwrap_or(&0),
        blackouts.last().unwrap_or(&0)
    ));

    let record = swap(json!({ "backend": { "path": copy }, "mode": "migrate" }))?;
    let copied = record.copy.unwrap_or_default();
    say(format!(
        "   -> live storage migration to another image: {}, {:.1} MiB copied in {:.1} ms while the guest wrote, blackout {} us",
        record.state,
        copied.bytes_copied as f64 / (1 << 20) as f64,
        copied.copy_us as f64 / 1e3,
        record.blackout_us.unwrap_or(0)
    ));
    failures += usize::from(record.state != SwapState::Committed);

    // The same image the disk now serves (a switch must keep the data), through a fault injector.
    let dead = json!({ "backend": { "path": copy }, "fault": "error" });
    let record = swap(dead)?;
    say(format!(
        "   -> a backend that fails every request: {} ({})",
        record.state,
        record.reason.as_deref().unwrap_or("no reason")
    ));
    failures += usize::from(record.state != SwapState::Failed);
    let failing = json!({ "backend": { "path": copy }, "fault": { "error_after": 2 },
                          "verify": { "min_requests": 50, "window_ms": 500 } });
    let record = swap(failing)?;
    say(format!(
        "   -> a backend that passes its probe, then fails under load: {} ({})",
        record.state,
        record.reason.as_deref().unwrap_or("no reason")
    ));
    failures += usize::from(record.state != SwapState::RolledBack);

    let memory = MemorySwapRequest { backing: vmm::RamBacking::Memfd, verify: true, drain_timeout_ms: 2000 };
    match vm.swap_memory(0, &memory) {
        Ok(r) => say(format!(
            "   -> RAM region 0 ({} MiB) anonymous -> memfd: guest paused {:.2} ms, {:.1} MiB copied, contents verified",
            r.bytes >> 20,
            r.pause_us as f64 / 1e3,
            r.bytes_copied as f64 / (1 << 20) as f64
        )),
        Err(e) => {
            say(format!("   -> memory swap failed: {e}"));
            failures += 1;
        }
    }

    vm.serial_input().send(b"q");
    let exit = vm.wait_timeout(wait).unwrap_or_else(|| vm.stop());
    say(format!("   -> {exit}: the guest saw no I/O error and every block read back as last written"));
    Ok(failures + usize::from(exit != VmExit::Guest(0)))
}

/// A guest rewriting its RAM is snapshotted (full, then diff) and continued from the diff in
/// each memory mode; the guest verifies every page after the restore.
fn snapshot_steps(image: &PathBuf, say: &dyn Fn(String)) -> Result<usize, Failure> {
    let runtime = |e: &dyn std::fmt::Display| Failure::runtime(anyhow!("{e}"));
    let dir = std::env::temp_dir().join(format!("vmm-demo-snapshot-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let _cleanup = Temp(dir.clone());
    let cmdline = "prog=memdirty mib=16 pages_per_ms=50";
    say(format!(
        "\n== snapshots of a guest rewriting 16 MiB of its RAM, continued in each memory mode (cmdline \"{cmdline}\")"
    ));
    let console = Console::default();
    let vm = VmBuilder::new(image)
        .cmdline(cmdline)
        .serial_output(SerialOutput::Writer(Box::new(console.clone())))
        .start()?;
    let wait = Duration::from_secs(60);
    console.wait_for("memdirty: round 1 ok", wait).ok_or_else(|| runtime(&"memdirty did not start"))?;
    let mut failures = 0;
    let take = |name: &str, kind: SnapshotKind| -> Result<PathBuf, Failure> {
        let path = dir.join(name);
        let report = vm
            .snapshot(&SnapshotRequest { path: path.clone(), kind, drain_timeout_ms: 2000 })
            .map_err(|e| runtime(&e))?;
        say(format!(
            "   -> {kind} snapshot: guest paused {:.2} ms, {:.1} MiB of RAM written, {:.1} ms in all",
            report.pause_us as f64 / 1e3,
            report.memory_written_bytes as f64 / (1 << 20) as f64,
            report.total_us as f64 / 1e3
        ));
        Ok(path)
    };
    take("full", SnapshotKind::Full)?;
    std::thread::sleep(Duration::from_millis(50));
    let diff = take("diff", SnapshotKind::Diff)?;
    drop(vm);
    for mode in [MemoryMode::Eager, MemoryMode::Mmap, MemoryMode::Uffd] {
        let console = Console::default();
        let started = Instant::now();
        let vm =
            VmBuilder::restore(&diff, mode).serial_output(SerialOutput::Writer(Box::new(console.clone()))).start()?;
        let running = started.elapsed();
        vm.serial_input().send(b"q");
        let exit = vm.wait_timeout(wait).unwrap_or_else(|| vm.stop());
        let verified = console.wait_for("all verified", Duration::ZERO).is_some();
        say(format!(
            "   -> restored ({mode}, diff on full) running after {:.1} ms; {exit}, every page {}",
            ms(running),
            if verified { "as the guest last wrote it" } else { "NOT verified" }
        ));
        failures += usize::from(exit != VmExit::Guest(0) || !verified);
    }
    Ok(failures)
}

/// A guest keeping 16 verified disk requests in flight moves from process to process... here
/// from VM to VM in this one: replicated to a shadow, switched over, committed, three times;
/// then it verifies every block.
fn replication_steps(image: &PathBuf, say: &dyn Fn(String)) -> Result<usize, Failure> {
    use std::sync::Arc;
    use vmm::replication::{Endpoint, ReplicationRequest, shadow};
    let runtime = |e: &dyn std::fmt::Display| Failure::runtime(anyhow!("{e}"));
    let dir = std::env::temp_dir().join(format!("vmm-demo-replication-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| runtime(&e))?;
    let _cleanup = Temp(dir.clone());
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk).and_then(|f| f.set_len(64 << 20)).map_err(|e| runtime(&e))?;
    let cmdline = "prog=blk-stress qd=16 blocks=4096 until_input=1";
    say(format!(
        "\n== switchovers to a shadow VMM while the guest keeps 16 disk requests in flight (cmdline \"{cmdline}\")"
    ));
    let mut console = Console::default();
    let mut config = VmConfig::new(image);
    config.cmdline = cmdline.into();
    config.disks = vec![DiskConfig { path: Some(disk), engine: BlockEngine::IoUring, ..Default::default() }];
    let mut vm = Arc::new(
        VmBuilder::from_config(config).serial_output(SerialOutput::Writer(Box::new(console.clone()))).start()?,
    );
    let wait = Duration::from_secs(60);
    console.wait_for("blk-stress: running", wait).ok_or_else(|| runtime(&"blk-stress did not start"))?;
    for round in 0..3 {
        let endpoint = Endpoint::Unix(dir.join(format!("shadow{round}.sock")));
        let state = dir.join(format!("shadow{round}"));
        let next_console = Console::default();
        let shadow_console = next_console.clone();
        let listen = endpoint.clone();
        // The shadow: here a thread of this process; `vmm shadow` is the same code.
        let shadow = std::thread::spawn(move || -> Result<Arc<vmm::Vm>, String> {
            let received = shadow::receive(&listen, &state, |_| {}).map_err(|e| e.to_string())?;
            let activated = received
                .activate(|b| b.serial_output(SerialOutput::Writer(Box::new(shadow_console))))
                .map_err(|e| e.to_string())?;
            Ok(activated.vm)
        });
        let Endpoint::Unix(path) = &endpoint else { unreachable!() };
        while !path.exists() {
            std::thread::sleep(Duration::from_millis(1));
        }
        vm.start_replication(&ReplicationRequest { target: endpoint.clone(), epoch_ms: 20, timeout_ms: 10_000 })
            .map_err(|e| runtime(&e))?;
        let deadline = Instant::now() + wait;
        let epochs = |vm: &vmm::Vm| vm.replication().shadows.first().map_or(0, |s| s.epochs);
        while epochs(&vm) < 3 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let report = vm.switch_over(&Default::default()).map_err(|e| runtime(&e))?;
        let status = vm.commit_switchover().map_err(|e| runtime(&e))?;
        say(format!(
            "   -> switchover {}: {} epochs, {:.1} MiB of pages sent as {:.1} MiB; VM frozen {:.2} ms ({} pages in the last epoch, restore {:.2} ms), healthy on the shadow",
            round + 1,
            status.epochs,
            status.totals.raw_bytes as f64 / f64::from(1 << 20),
            status.totals.sent_bytes as f64 / f64::from(1 << 20),
            report.downtime_us as f64 / 1e3,
            report.final_pages,
            report.restore_us as f64 / 1e3
        ));
        vm.wait();
        vm = shadow.join().map_err(|_| runtime(&"the shadow thread panicked"))?.map_err(|e| runtime(&e))?;
        console = next_console;
    }
    vm.serial_input().send(b"q");
    let exit = vm.wait_timeout(wait).unwrap_or_else(|| vm.stop());
    let summary = console.wait_for("blk-stress: ops=", Duration::ZERO).unwrap_or_default();
    let clean = summary.contains("errors=0 mismatches=0 final_verify=4096/4096");
    say(format!(
        "   -> {exit} on the third shadow: {}",
        if clean { "no I/O error, every block read back as last written" } else { "VERIFICATION FAILED" }
    ));
    Ok(usize::from(exit != VmExit::Guest(0) || !clean))
}

/// A three-layer swarm under load from four HTTP clients, its auth layer scaled 1 -> 3 -> 1.
fn swarm_steps(image: &std::path::Path, say: &dyn Fn(String)) -> Result<usize, Failure> {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let runtime = |e: &dyn std::fmt::Display| Failure::runtime(anyhow!("{e}"));
    let dir = std::env::temp_dir().join(format!("vmm-demo-swarm-{}", std::process::id()));
    let _cleanup = Temp(dir.clone());
    say("\n== a swarm: HTTP requests through three layer VMs joined by shared-memory rings; the auth layer scaled 1 -> 3 -> 1 under load".into());
    let config: swarm::SwarmConfig = serde_json::from_value(json!({
        "listen": "127.0.0.1:0", "control": dir.join("swarm.sock"), "state_dir": dir, "key": "demo-key",
        "autoscale": false,
        "layers": [{"name": "parse", "work": ["http"]}, {"name": "auth", "work": ["auth"], "max": 3},
                   {"name": "respond", "work": ["digest", "respond"]}]
    }))
    .map_err(|e| runtime(&e))?;
    let vmm = std::env::current_exe().map_err(|e| runtime(&e))?;
    let swarm = swarm::Swarm::start(config, vmm, image.to_path_buf()).map_err(|e| runtime(&e))?;
    let status = || swarm.status().unwrap_or_default();
    let auth_ready = |s: &serde_json::Value| {
        s["vms"].as_array().map_or(0, |v| v.iter().filter(|v| v["layer"] == "auth" && v["state"] == "ready").count())
    };
    let wait_until = |what: &str, done: &dyn Fn(&serde_json::Value) -> bool| -> Result<(), Failure> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !done(&status()) {
            if Instant::now() > deadline {
                return Err(runtime(&format!("the swarm never reached: {what}")));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    };
    wait_until("every VM ready", &|s| {
        s["layers"].as_array().is_some_and(|l| l.iter().all(|l| l["ready"] == l["target"]))
    })?;
    let (stop, ok, bad) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let tag = format!("{:016x}", swarm_ring::work::auth_tag(b"demo-key", b"/demo"));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (stop, ok, bad, tag, address) = (stop.clone(), ok.clone(), bad.clone(), tag.clone(), swarm.address());
            std::thread::spawn(move || {
                let Ok(mut stream) = std::net::TcpStream::connect(address) else { return };
                let request = format!("POST /demo HTTP/1.1\r\nX-Auth: {tag}\r\nContent-Length: 5\r\n\r\nhello");
                let mut reader = std::io::BufReader::new(stream.try_clone().expect("clone a socket"));
                while !stop.load(Ordering::Relaxed) {
                    let answered = stream.write_all(request.as_bytes()).ok().and_then(|_| http_answer(&mut reader));
                    match answered {
                        Some(200) => ok.fetch_add(1, Ordering::Relaxed),
                        _ => bad.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    let started = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    swarm.scale("auth", 3).map_err(|e| runtime(&e))?;
    wait_until("three auth VMs", &|s| auth_ready(s) == 3)?;
    say(format!(
        "   -> {:.1} s: auth layer at 3 VMs, {} requests answered so far",
        started.elapsed().as_secs_f64(),
        ok.load(Ordering::Relaxed)
    ));
    std::thread::sleep(Duration::from_millis(500));
    swarm.scale("auth", 1).map_err(|e| runtime(&e))?;
    wait_until("one auth VM", &|s| {
        s["vms"].as_array().is_some_and(|v| v.iter().filter(|v| v["layer"] == "auth").count() == 1)
    })?;
    say(format!(
        "   -> {:.1} s: auth layer drained back to 1 VM, {} requests answered so far",
        started.elapsed().as_secs_f64(),
        ok.load(Ordering::Relaxed)
    ));
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        let _ = client.join();
    }
    let r = status()["requests"].clone();
    let (ok, bad) = (ok.load(Ordering::Relaxed), bad.load(Ordering::Relaxed));
    say(format!(
        "   -> {ok} requests answered 200 ({:.0}/s), {bad} failed; the router answered {} once each, dropped {} duplicates",
        ok as f64 / started.elapsed().as_secs_f64(),
        r["answered_ok"],
        r["duplicates_dropped"]
    ));
    Ok(usize::from(bad != 0 || r["answered_ok"].as_u64() != Some(ok) || r["duplicates_dropped"] != 0))
}

/// Reads one HTTP response (status line, headers, Content-Length body); its status.
fn http_answer(reader: &mut impl std::io::BufRead) -> Option<u16> {
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let status = line.get(9..12)?.parse().ok()?;
    let mut length = 0;
    loop {
        let mut header = String::new();
        reader.read_line(&mut header).ok()?;
        if header.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().ok()?;
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    Some(status)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
