//! What the sandbox costs: the same guest workloads with the seccomp filters on (the default)
//! and off (`--no-seccomp`), next to QEMU with and without its own seccomp sandbox
//! (`-sandbox on`), in one run. Each cell is the median of `RUNS` runs, the two sides of a
//! comparison run alternately (this host's I/O rates drift by tens of percent run to run).
//!
//! `cargo run --release -p bench --bin sandbox [OPS]`

use std::path::{Path, PathBuf};
use std::time::Duration;

use bench::{Table, microguest_file, qemu_args, qemu_binary, run_counted, vmm_binary};

const MEM_MIB: u64 = 256;
const TIMEOUT: Duration = Duration::from_secs(300);
const RUNS: usize = 5;
const QEMU_CPU: &str = "host,-arch-capabilities,+invtsc,vmware-cpuid-freq=on";

fn field(out: &str, key: &str) -> Option<f64> {
    out.split_whitespace().find_map(|w| w.strip_prefix(key)).and_then(|v| v.trim_end_matches(',').parse().ok())
}

/// The median IOPS of `RUNS` runs of each of two commands, run alternately so that both see
/// the same drift of a noisy host; `None` where a run failed.
fn median_pair(a: (&Path, &[String]), b: (&Path, &[String])) -> (Option<f64>, Option<f64>) {
    let mut rates = [Vec::new(), Vec::new()];
    for _ in 0..RUNS {
        for (i, (program, args)) in [a, b].into_iter().enumerate() {
            let (out, code, _) = run_counted(program, args, false, TIMEOUT);
            match field(&out, "iops=") {
                Some(rate) if out.contains("microguest: done status=0") => rates[i].push(rate),
                _ => eprintln!("run failed (exit {code:?}):\n{out}"),
            }
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v.len() == RUNS).then(|| v[RUNS / 2])
    };
    let [ra, rb] = rates;
    (median(ra), median(rb))
}

fn ours(guest: &Path, cmdline: &str, disk: &Path, engine: &str, seccomp: bool) -> Vec<String> {
    let mut args: Vec<String> = vec!["run".into(), "--kernel".into(), guest.display().to_string()];
    args.extend(["--cmdline".into(), cmdline.into(), "--mem-mib".into(), MEM_MIB.to_string()]);
    args.extend(["--disk".into(), format!("path={},engine={engine}", disk.display())]);
    if !seccomp {
        args.push("--no-seccomp".into());
    }
    args
}

fn qemu(guest: &Path, cmdline: &str, disk: &Path, aio: &str, sandbox: bool) -> Vec<String> {
    let mut args = qemu_args(guest, cmdline, MEM_MIB, 1);
    args.extend(["-cpu".into(), QEMU_CPU.into(), "-global".into(), "virtio-mmio.force-legacy=false".into()]);
    args.extend(["-drive".into(), format!("file={},format=raw,if=none,id=d0,aio={aio}", disk.display())]);
    args.extend(["-device".into(), "virtio-blk-device,drive=d0".into()]);
    args.extend(["-sandbox".into(), if sandbox { "on" } else { "off" }.into()]);
    args
}

fn cell(v: Option<f64>) -> String {
    v.map_or("n/a".into(), |v| format!("{v:.0} IOPS"))
}

fn cost(on: Option<f64>, off: Option<f64>) -> String {
    match (on, off) {
        (Some(on), Some(off)) if off > 0.0 => format!("{:+.1}%", (on / off - 1.0) * 100.0),
        _ => "n/a".into(),
    }
}

fn main() {
    let ops: u64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let (vmm, guest, qemu_bin) = (vmm_binary(), microguest_file(), qemu_binary());
    let dir: PathBuf = std::env::temp_dir().join(format!("bench-sandbox-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(256 << 20).unwrap();

    let mut t = Table::new(&[
        "workload",
        "ours, seccomp on",
        "ours, --no-seccomp",
        "cost",
        "QEMU -sandbox on",
        "QEMU -sandbox off",
        "cost (QEMU)",
    ]);
    for (engine, aio) in [("sync", "threads"), ("io_uring", "io_uring")] {
        for qd in [1, 16] {
            eprintln!("block: {engine} randread qd={qd}...");
            let cmdline = format!("prog=blk-bench mode=randread ops={ops} qd={qd} bs=4096");
            let (on_args, off_args) =
                (ours(&guest, &cmdline, &disk, engine, true), ours(&guest, &cmdline, &disk, engine, false));
            let (on, off) = median_pair((&vmm, &on_args), (&vmm, &off_args));
            let (q_on, q_off) = match &qemu_bin {
                Some(q) => {
                    let (on_args, off_args) =
                        (qemu(&guest, &cmdline, &disk, aio, true), qemu(&guest, &cmdline, &disk, aio, false));
                    median_pair((q, &on_args), (q, &off_args))
                }
                None => (None, None),
            };
            t.row(vec![
                format!("blk 4K randread qd{qd}, {engine} (QEMU aio={aio})"),
                cell(on),
                cell(off),
                cost(on, off),
                cell(q_on),
                cell(q_off),
                cost(q_on, q_off),
            ]);
        }
    }
    t.print();
    let _ = std::fs::remove_dir_all(&dir);
}
