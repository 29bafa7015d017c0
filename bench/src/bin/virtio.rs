//! Virtio benchmark, from the microguest: 4 KiB random read and write IOPS and latency on the
//! sync and io_uring block engines, and network packets per second over the userspace (Unix
//! datagram) and tap backends; our VMM and QEMU's devices side by side, with the VM exits
//! each request costs (on this host every exit to the VMM costs ~50 us, so fewer is better).
//!
//! Usage: `cargo run --release -p bench --bin virtio [OPS]` (root, for the taps).

use std::path::{Path, PathBuf};
use std::time::Duration;

use bench::{ExitCounts, Table, microguest_file, perf_counts_kvm, qemu_args, qemu_binary, run_counted, vmm_binary};
use test_peers::{DatagramEcho, Tap, TapEcho};

const MEM_MIB: u64 = 256;
const TIMEOUT: Duration = Duration::from_secs(300);
/// QEMU's CPU model exposing the TSC frequency, so the guest can time itself there too.
const QEMU_CPU: &str = "host,-arch-capabilities,+invtsc,vmware-cpuid-freq=on";

/// One measurement: the guest's own numbers and the exits per request.
#[derive(Default)]
struct Result {
    rate: Option<f64>,
    latency_us: Option<f64>,
    per_request: Option<(f64, f64)>,
}

/// Which VMM runs the guest, and how to give it each device.
enum Runner<'a> {
    Ours(&'a Path),
    Qemu(&'a Path),
}

impl Runner<'_> {
    fn command(&self, guest: &Path, cmdline: &str, devices: &[String]) -> (PathBuf, Vec<String>) {
        match self {
            Runner::Ours(vmm) => {
                let mut args: Vec<String> = ["run", "--kernel"].iter().map(|s| s.to_string()).collect();
                args.extend([guest.display().to_string(), "--cmdline".into(), cmdline.into()]);
                args.extend(["--mem-mib".into(), MEM_MIB.to_string()]);
                args.extend(devices.iter().cloned());
                (vmm.to_path_buf(), args)
            }
            Runner::Qemu(qemu) => {
                let mut args = qemu_args(guest, cmdline, MEM_MIB, 1);
                args.extend([
                    "-cpu".into(),
                    QEMU_CPU.into(),
                    "-global".into(),
                    "virtio-mmio.force-legacy=false".into(),
                ]);
                args.extend(devices.iter().cloned());
                (qemu.to_path_buf(), args)
            }
        }
    }
}

fn field(out: &str, key: &str) -> Option<f64> {
    out.split_whitespace().find_map(|w| w.strip_prefix(key)).and_then(|v| v.trim_end_matches(',').parse().ok())
}

/// Runs `cmdline(n)` with n and 2n requests; the difference in exits, divided by n, is the cost
/// per request without boot and teardown.
fn measure(
    runner: &Runner,
    guest: &Path,
    devices: &[String],
    count: bool,
    n: u64,
    cmdline: impl Fn(u64) -> String,
    parse: impl Fn(&str) -> (Option<f64>, Option<f64>),
) -> Result {
    let mut runs = Vec::new();
    for ops in [n, 2 * n] {
        let (program, args) = runner.command(guest, &cmdline(ops), devices);
        let (out, code, counts) = run_counted(&program, &args, count, TIMEOUT);
        if !out.contains("microguest: done status=0") {
            eprintln!("run failed (exit {code:?}):\n{out}");
            return Result::default();
        }
        runs.push((parse(&out), counts.unwrap_or_default()));
    }
    let (rate, latency_us) = runs[1].0;
    let per_request = count.then(|| {
        let (a, b): (ExitCounts, ExitCounts) = (runs[0].1, runs[1].1);
        let diff = |x: u64, y: u64| y.saturating_sub(x) as f64 / n as f64;
        (diff(a.to_vmm, b.to_vmm), diff(a.mmio, b.mmio))
    });
    Result { rate, latency_us, per_request }
}

fn cell(r: &Result, unit: &str) -> String {
    match (r.rate, r.latency_us) {
        (Some(rate), Some(lat)) => format!("{rate:.0} {unit}, {lat:.1} us"),
        (Some(rate), None) => format!("{rate:.0} {unit}"),
        _ => "n/a".into(),
    }
}

fn exits(r: &Result) -> String {
    r.per_request.map_or("n/a".into(), |(to_vmm, mmio)| format!("{to_vmm:.2} / {mmio:.2}"))
}

fn ratio(ours: &Result, peer: &Result) -> String {
    match (ours.rate, peer.rate) {
        (Some(o), Some(p)) if p > 0.0 => format!("{:.2}x", o / p),
        _ => "n/a".into(),
    }
}

fn main() {
    let ops: u64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let vmm = vmm_binary();
    let guest = microguest_file();
    let qemu = qemu_binary();
    let count = perf_counts_kvm();
    if !count {
        eprintln!("perf cannot count KVM tracepoints here: exit columns show n/a");
    }
    let dir = std::env::temp_dir().join(format!("bench-virtio-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(256 << 20).unwrap();

    let mut t = Table::new(&[
        "workload",
        "vmm (ours)",
        "QEMU -M microvm",
        "ours / QEMU",
        "exits to VMM / MMIO traps per request (ours)",
        "(QEMU)",
    ]);
    let blk_parse = |out: &str| (field(out, "iops="), field(out, "lat_us="));
    for (engine, aio) in [("sync", "threads"), ("io_uring", "io_uring")] {
        for mode in ["randread", "randwrite"] {
            for qd in [1, 16] {
                eprintln!("block: {engine} {mode} qd={qd}...");
                let cmdline = |n: u64| format!("prog=blk-bench mode={mode} ops={n} qd={qd} bs=4096");
                let ours_dev = vec!["--disk".to_string(), format!("path={},engine={engine}", disk.display())];
                let ours = measure(&Runner::Ours(&vmm), &guest, &ours_dev, count, ops, cmdline, blk_parse);
                let peer = qemu.as_ref().map_or_else(Result::default, |q| {
                    let dev = vec![
                        "-drive".to_string(),
                        format!("file={},format=raw,if=none,id=d0,aio={aio}", disk.display()),
                        "-device".into(),
                        "virtio-blk-device,drive=d0".into(),
                    ];
                    measure(&Runner::Qemu(q), &guest, &dev, count, ops, cmdline, blk_parse)
                });
                t.row(vec![
                    format!("blk 4K {mode} qd{qd}, {engine} (QEMU aio={aio})"),
                    cell(&ours, "IOPS"),
                    cell(&peer, "IOPS"),
                    ratio(&ours, &peer),
                    exits(&ours),
                    exits(&peer),
                ]);
            }
        }
    }

    let net_parse = |out: &str| {
        let fps = out.split(" frames/s").next().and_then(|s| s.rsplit(' ').next()).and_then(|v| v.parse().ok());
        (fps, None)
    };
    let frames = |n: u64| format!("prog=net-echo frames={n} size=1024 window=16");
    let echo_path = dir.join("echo.sock");
    let _echo = DatagramEcho::start(&echo_path);
    eprintln!("net: unix datagram backend...");
    let ours_dev = vec!["--net".to_string(), format!("unix={}", echo_path.display())];
    let ours = measure(&Runner::Ours(&vmm), &guest, &ours_dev, count, ops, frames, net_parse);
    let peer = qemu.as_ref().map_or_else(Result::default, |q| {
        let dev = vec![
            "-netdev".to_string(),
            format!(
                "dgram,id=n0,local.type=unix,local.path={},remote.type=unix,remote.path={}",
                dir.join("qemu.sock").display(),
                echo_path.display()
            ),
            "-device".into(),
            "virtio-net-device,netdev=n0".into(),
        ];
        measure(&Runner::Qemu(q), &guest, &dev, count, ops, frames, net_parse)
    });
    t.row(vec![
        "net 1024-byte frames echoed, Unix datagram backend".into(),
        cell(&ours, "frames/s"),
        cell(&peer, "frames/s"),
        ratio(&ours, &peer),
        exits(&ours),
        exits(&peer),
    ]);

    eprintln!("net: tap backend...");
    let tap = Tap::create(&format!("bvt{}", std::process::id() % 100_000));
    let _tap_echo = TapEcho::start(&tap.name);
    let ours = measure(
        &Runner::Ours(&vmm),
        &guest,
        &["--net".into(), format!("tap={}", tap.name)],
        count,
        ops,
        frames,
        net_parse,
    );
    let peer = qemu.as_ref().map_or_else(Result::default, |q| {
        let dev = vec![
            "-netdev".to_string(),
            format!("tap,id=n0,ifname={},script=no,downscript=no", tap.name),
            "-device".into(),
            "virtio-net-device,netdev=n0".into(),
        ];
        measure(&Runner::Qemu(q), &guest, &dev, count, ops, frames, net_parse)
    });
    t.row(vec![
        "net 1024-byte frames echoed, tap backend".into(),
        cell(&ours, "frames/s"),
        cell(&peer, "frames/s"),
        ratio(&ours, &peer),
        exits(&ours),
        exits(&peer),
    ]);

    println!("\nVirtio from the microguest (polling drivers), {ops} requests per measurement, 1 vCPU, {MEM_MIB} MiB\n");
    t.print();
    println!(
        "\nRates and latencies are the guest's own (TSC). Exits per request come from KVM's tracepoints\n\
         (kvm_userspace_exit, kvm_mmio) for the whole process, as the difference between runs with\n\
         {ops} and {} requests, so boot and teardown cancel out. An MMIO trap that KVM serves in the\n\
         kernel (an ioeventfd doorbell) costs about a third of an exit to the VMM on this host.",
        2 * ops
    );
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&guest);
}
