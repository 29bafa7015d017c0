//! Startup benchmark: the same microguest image on our `vmm` and on Debian's QEMU
//! (`-M microvm`), side by side.
//!
//! Measures process start to the guest's first serial byte and to its exit, CPU time, resident
//! memory excluding guest RAM, and vCPU pause/resume latency with 1 and 4 vCPUs.
//! Usage: `cargo run --release -p bench --bin startup [RUNS]`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use bench::{GuestProcess, Samples, Table, microguest_file, qemu_args, qemu_binary, rss_kib, vmm_binary};
use vmm::{SerialOutput, VmBuilder};

const MEM_MIB: u64 = 128;
const TIMEOUT: Duration = Duration::from_secs(60);
const PAUSE_ITERATIONS: usize = 200;

struct Startup {
    first_byte_ms: Samples,
    exit_ms: Samples,
    cpu_ms: Samples,
    /// Our VMM's own report of its setup time before the first vCPU entry (ms CPU).
    setup_cpu_ms: Option<Samples>,
}

fn vmm_args(kernel: &Path, cmdline: &str, vcpus: u32) -> Vec<String> {
    ["--log-level", "info", "run", "--kernel"]
        .iter()
        .map(|s| s.to_string())
        .chain([
            kernel.display().to_string(),
            "--cmdline".into(),
            cmdline.into(),
            "--mem-mib".into(),
            MEM_MIB.to_string(),
            "--vcpus".into(),
            vcpus.to_string(),
        ])
        .collect()
}

fn measure_startup(program: &Path, args: &[String], runs: usize, ours: bool) -> Startup {
    let (mut first, mut exit, mut cpu, mut setup) = (vec![], vec![], vec![], vec![]);
    for _ in 0..runs {
        let mut p = GuestProcess::spawn(program, args);
        first.push(p.wait_first_byte(TIMEOUT).as_secs_f64() * 1e3);
        let (elapsed, code, cpu_time) = p.wait_exit();
        let expected = if ours { 0 } else { microguest_protocol_qemu_success() };
        assert_eq!(code, Some(expected), "guest failed under {}", program.display());
        exit.push(elapsed.as_secs_f64() * 1e3);
        cpu.push(cpu_time.as_secs_f64() * 1e3);
        if ours {
            let stderr = p.stderr.recv_timeout(TIMEOUT).unwrap_or_default();
            if let Some(ms) = stderr.split(" ms wall, ").nth(1).and_then(|s| s.split(" ms CPU").next()) {
                setup.push(ms.parse().unwrap_or(f64::NAN));
            }
        }
    }
    Startup {
        first_byte_ms: Samples::new(first),
        exit_ms: Samples::new(exit),
        cpu_ms: Samples::new(cpu),
        setup_cpu_ms: ours.then(|| Samples::new(setup)),
    }
}

fn microguest_protocol_qemu_success() -> i32 {
    guest_agent::protocol::qemu_exit_status(guest_agent::protocol::status::SUCCESS)
}

/// Resident KiB (total, excluding guest RAM) of an idle guest.
fn measure_rss(program: &Path, args: &[String]) -> (u64, u64) {
    let mut p = GuestProcess::spawn(program, args);
    p.wait_line("idle: ready", TIMEOUT);
    let rss = rss_kib(p.pid(), MEM_MIB);
    p.send(b"\n");
    p.wait_exit();
    rss
}

/// Pause and resume latency of our VMM through the library API, in microseconds.
fn vmm_pause_resume(kernel: &Path, vcpus: u32) -> (Samples, Samples) {
    let vm = VmBuilder::new(kernel)
        .cmdline("prog=idle")
        .vcpus(vcpus)
        .memory_mib(MEM_MIB)
        .serial_output(SerialOutput::Sink)
        .start()
        .expect("start VM");
    let (mut pause, mut resume) = (vec![], vec![]);
    for _ in 0..PAUSE_ITERATIONS {
        let t = Instant::now();
        vm.pause().expect("pause");
        pause.push(t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        vm.resume().expect("resume");
        resume.push(t.elapsed().as_secs_f64() * 1e6);
    }
    vm.stop();
    (Samples::new(pause), Samples::new(resume))
}

/// Pause (`stop`) and resume (`cont`) latency of QEMU through QMP, in microseconds.
fn qemu_pause_resume(qemu: &Path, kernel: &Path, vcpus: u32) -> (Samples, Samples) {
    let sock = std::env::temp_dir().join(format!("bench-qmp-{}-{vcpus}.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    let mut args = qemu_args(kernel, "prog=idle", MEM_MIB, vcpus);
    args.extend(["-qmp".into(), format!("unix:{},server=on,wait=off", sock.display())]);
    let mut p = GuestProcess::spawn(qemu, &args);
    p.wait_line("idle: ready", TIMEOUT);
    let stream = UnixStream::connect(&sock).expect("connect QMP");
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let mut line = String::new();
    reader.read_line(&mut line).unwrap(); // greeting
    let mut call = |cmd: &str| {
        writeln!(writer, "{{\"execute\": \"{cmd}\"}}").unwrap();
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            if line.contains("\"return\"") || line.contains("\"error\"") {
                break;
            }
        }
    };
    call("qmp_capabilities");
    let (mut pause, mut resume) = (vec![], vec![]);
    for _ in 0..PAUSE_ITERATIONS {
        let t = Instant::now();
        call("stop");
        pause.push(t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        call("cont");
        resume.push(t.elapsed().as_secs_f64() * 1e6);
    }
    p.send(b"\n");
    p.wait_exit();
    let _ = std::fs::remove_file(&sock);
    (Samples::new(pause), Samples::new(resume))
}

fn ratio(ours: f64, peer: Option<f64>) -> String {
    match peer {
        Some(p) if ours > 0.0 => format!("{:.1}x", p / ours),
        _ => "n/a".into(),
    }
}

fn cell(v: Option<f64>, unit: &str) -> String {
    v.map_or("n/a".into(), |v| format!("{v:.2} {unit}"))
}

fn main() {
    let runs: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(20);
    let vmm = vmm_binary();
    let guest = microguest_file();
    let qemu = qemu_binary();
    if qemu.is_none() {
        eprintln!("QEMU could not be installed: its column shows n/a");
    }

    eprintln!("startup: {runs} runs each of prog=hello ({MEM_MIB} MiB, 1 vCPU)...");
    let ours = measure_startup(&vmm, &vmm_args(&guest, "prog=hello", 1), runs, true);
    let peer = qemu.as_ref().map(|q| measure_startup(q, &qemu_args(&guest, "prog=hello", MEM_MIB, 1), runs, false));

    eprintln!("memory: idle guest...");
    let ours_rss = measure_rss(&vmm, &vmm_args(&guest, "prog=idle", 1));
    let peer_rss = qemu.as_ref().map(|q| measure_rss(q, &qemu_args(&guest, "prog=idle", MEM_MIB, 1)));

    eprintln!("pause/resume: {PAUSE_ITERATIONS} cycles each with 1 and 4 vCPUs...");
    let pr: Vec<_> = [1u32, 4]
        .iter()
        .map(|&n| {
            let ours = vmm_pause_resume(&guest, n);
            let peer = qemu.as_ref().map(|q| qemu_pause_resume(q, &guest, n));
            (n, ours, peer)
        })
        .collect();

    println!(
        "\nStartup and footprint: microguest prog=hello, {MEM_MIB} MiB, 1 vCPU, {runs} runs each (median, p90 in brackets)\n"
    );
    let mut t = Table::new(&["metric", "vmm (ours)", "QEMU -M microvm", "QEMU / ours"]);
    let startup_row = |name: &str, f: fn(&Startup) -> &Samples| {
        let o = f(&ours);
        let p = peer.as_ref().map(f);
        vec![
            name.to_string(),
            format!("{:.2} ms [{:.2}]", o.median(), o.pct(90.0)),
            p.map_or("n/a".into(), |p| format!("{:.2} ms [{:.2}]", p.median(), p.pct(90.0))),
            ratio(o.median(), p.map(Samples::median)),
        ]
    };
    t.row(startup_row("process start -> first serial byte", |s| &s.first_byte_ms));
    t.row(startup_row("process start -> guest exit", |s| &s.exit_ms));
    t.row(startup_row("CPU time, whole run (user+sys)", |s| &s.cpu_ms));
    if let Some(setup) = &ours.setup_cpu_ms {
        t.row(vec![
            "VMM setup CPU before first vCPU entry".into(),
            format!("{:.2} ms [{:.2}]", setup.median(), setup.pct(90.0)),
            "n/a".into(),
            "Firecracker target: <= 8 ms".into(),
        ]);
    }
    let mib = |kib: u64| kib as f64 / 1024.0;
    t.row(vec![
        "RSS excluding guest RAM (idle guest)".into(),
        format!("{:.2} MiB", mib(ours_rss.1)),
        cell(peer_rss.map(|r| mib(r.1)), "MiB"),
        ratio(mib(ours_rss.1), peer_rss.map(|r| mib(r.1))),
    ]);
    t.row(vec![
        "RSS total (idle guest)".into(),
        format!("{:.2} MiB", mib(ours_rss.0)),
        cell(peer_rss.map(|r| mib(r.0)), "MiB"),
        ratio(mib(ours_rss.0), peer_rss.map(|r| mib(r.0))),
    ]);
    for (n, (op, oq), peer) in &pr {
        for (what, o, p) in [("pause", op, peer.as_ref().map(|x| &x.0)), ("resume", oq, peer.as_ref().map(|x| &x.1))] {
            t.row(vec![
                format!("{what} latency, {n} vCPU{}", if *n == 1 { "" } else { "s" }),
                format!("{:.1} us [p99 {:.1}]", o.median(), o.pct(99.0)),
                p.map_or("n/a".into(), |p| format!("{:.1} us [p99 {:.1}]", p.median(), p.pct(99.0))),
                ratio(o.median(), p.map(Samples::median)),
            ]);
        }
    }
    t.print();
    println!(
        "\nPause/resume: ours is the library call (returns when every vCPU has stopped / is running again);\n\
         QEMU's is a QMP stop/cont round trip on its control socket. Firecracker anchors: <= 8 CPU ms\n\
         VMM start, <= 5 MiB VMM memory overhead."
    );
    let _ = std::fs::remove_file(&guest);
}
