//! Snapshot and restore, ours next to QEMU 10 saving to and loading from `file:` (with the
//! `mapped-ram` capability, its format for snapshots to files), on the same microguest.
//!
//! Rows, for a 128 MiB and a 1 GiB guest:
//! - full snapshot of a guest whose RAM is 3/4 in use (`memtouch` verifying it in a loop):
//!   time until the files are written, and how long the guest was paused;
//! - diff snapshot after 10 MiB were dirtied (`memdirty` over 10 MiB: one round writes each of
//!   its pages once), ours only: QEMU has no diff snapshots;
//! - restore of the full snapshot, each of our memory modes and QEMU's: time from process
//!   start until the guest runs again, and until it has touched its whole working set (the
//!   first `memtouch` pass after the restore, which reads all of it).
//!
//! `cargo run --release -p bench --bin snapshot [RUNS]` (default 3; medians).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bench::qmp::Qmp;
use bench::{GuestProcess, Samples, Table, microguest_file, qemu_args, qemu_binary, vmm_binary};
use serde_json::{Value, json};
use vmm::api::ApiClient;

const SIZES_MIB: [u64; 2] = [128, 1024];
const WAIT: Duration = Duration::from_secs(120);
const MODES: [&str; 3] = ["eager", "mmap", "uffd"];

fn main() {
    let runs: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(3);
    let vmm = vmm_binary();
    let guest = microguest_file();
    let qemu = qemu_binary();
    if qemu.is_none() {
        eprintln!("QEMU could not be installed: its rows show n/a");
    }
    let work = std::env::temp_dir().join(format!("bench-snapshot-{}", std::process::id()));
    std::fs::create_dir_all(&work).expect("work dir");

    let mut table = Table::new(&["guest", "operation", "vmm (ours)", "QEMU 10 (file:, mapped-ram)", "QEMU / ours"]);
    for mem in SIZES_MIB {
        eprintln!("snapshot: {mem} MiB guest, {runs} runs per row...");
        let ours = Ours { vmm: &vmm, guest: &guest, work: &work, mem };
        let full = ours.full_snapshots(runs);
        let peer = qemu.as_deref().map(|q| Peer { qemu: q, guest: &guest, work: &work, mem }.full_snapshots(runs));
        let label = format!("{mem} MiB");
        table.row(vec![
            label.clone(),
            "full snapshot: written (guest paused)".into(),
            format!("{:.1} ms ({:.1} ms)", full.total_ms.median(), full.pause_ms.median()),
            peer.as_ref()
                .map_or("n/a".into(), |p| format!("{:.1} ms ({:.1} ms)", p.total_ms.median(), p.pause_ms.median())),
            peer.as_ref().map_or("n/a".into(), |p| ratio(p.total_ms.median(), full.total_ms.median())),
        ]);
        let diff = ours.diff_snapshots(runs);
        table.row(vec![
            label.clone(),
            format!("diff snapshot after 10 MiB dirtied ({:.1} MiB written)", diff.written_mib),
            format!("{:.1} ms ({:.3} ms)", diff.total_ms.median(), diff.pause_ms.median()),
            "no diff snapshots".into(),
            "".into(),
        ]);
        let peer_restore = match (&qemu, &peer) {
            (Some(q), Some(p)) => Some(Peer { qemu: q, guest: &guest, work: &work, mem }.restores(&p.path, runs)),
            _ => None,
        };
        for mode in MODES {
            let restore = ours.restores(&full.path, mode, runs);
            for (what, ours_ms, peer_ms) in [
                ("running", &restore.running_ms, peer_restore.as_ref().map(|p| &p.running_ms)),
                (
                    "whole working set touched",
                    &restore.working_set_ms,
                    peer_restore.as_ref().map(|p| &p.working_set_ms),
                ),
            ] {
                table.row(vec![
                    label.clone(),
                    format!("restore ({mode}) until {what}"),
                    format!("{:.1} ms", ours_ms.median()),
                    peer_ms.map_or("n/a".into(), |p| format!("{:.1} ms", p.median())),
                    peer_ms.map_or("n/a".into(), |p| ratio(p.median(), ours_ms.median())),
                ]);
            }
        }
    }
    table.print();
    println!(
        "\nMedians of {runs} runs. Guest RAM 3/4 in use for full snapshots and restores (memtouch), 10 MiB rewritten \
         for diffs (memdirty). \"running\": ours from process start to the vCPUs running (the VMM's setup time), \
         QEMU's from process start to its RESUME event. Snapshot files on the same file system for both."
    );
    let _ = std::fs::remove_dir_all(&work);
}

fn ratio(peer: f64, ours: f64) -> String {
    format!("{:.2}x", peer / ours)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

struct Snapshots {
    total_ms: Samples,
    pause_ms: Samples,
    written_mib: f64,
    /// The last one, for the restores.
    path: PathBuf,
}

struct Restores {
    running_ms: Samples,
    working_set_ms: Samples,
}

fn memtouch_cmdline(mem: u64) -> String {
    format!("prog=memtouch mib={} verify_until_input=1", mem * 3 / 4)
}

struct Ours<'a> {
    vmm: &'a Path,
    guest: &'a Path,
    work: &'a Path,
    mem: u64,
}

impl Ours<'_> {
    fn start(&self, cmdline: &str, tag: &str) -> (GuestProcess, ApiClient) {
        let sock = self.work.join(format!("ours-{tag}.sock"));
        let _ = std::fs::remove_file(&sock);
        let args: Vec<String> = [
            "run",
            "--kernel",
            &self.guest.display().to_string(),
            "--cmdline",
            cmdline,
            "--mem-mib",
            &self.mem.to_string(),
            "--api-sock",
            &sock.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let process = GuestProcess::spawn(self.vmm, &args);
        // The socket appears once the VM is built.
        let deadline = Instant::now() + WAIT;
        let api = loop {
            match ApiClient::connect(&sock, WAIT) {
                Ok(api) => break api,
                Err(e) if Instant::now() >= deadline => panic!("connect to the vmm API: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        (process, api)
    }

    fn snapshot(api: &mut ApiClient, path: &Path, kind: &str) -> (f64, f64, f64) {
        let started = Instant::now();
        let body = json!({ "path": path, "kind": kind });
        let response = api.send_json("POST", "/snapshots", &body).expect("POST /snapshots");
        let total = ms(started.elapsed());
        let report: Value = serde_json::from_slice(&response.body).expect("snapshot report");
        assert_eq!(response.status, 201, "snapshot failed: {report}");
        let pause = report["pause_us"].as_f64().unwrap_or(f64::NAN) / 1e3;
        let written = report["memory_written_bytes"].as_f64().unwrap_or(0.0) / (1 << 20) as f64;
        (total, pause, written)
    }

    fn full_snapshots(&self, runs: usize) -> Snapshots {
        let (mut total, mut pause, mut path) = (Vec::new(), Vec::new(), PathBuf::new());
        let mut written = 0.0;
        for run in 0..runs {
            let (mut process, mut api) = self.start(&memtouch_cmdline(self.mem), "full");
            process.wait_line("memtouch: pass 1 ok", WAIT);
            path = self.work.join(format!("ours-full-{}-{run}", self.mem));
            let _ = std::fs::remove_dir_all(&path);
            let (t, p, w) = Self::snapshot(&mut api, &path, "full");
            total.push(t);
            pause.push(p);
            written = w;
            process.send(b"q");
            process.wait_exit();
        }
        Snapshots { total_ms: Samples::new(total), pause_ms: Samples::new(pause), written_mib: written, path }
    }

    fn diff_snapshots(&self, runs: usize) -> Snapshots {
        let (mut total, mut pause, mut written) = (Vec::new(), Vec::new(), Vec::new());
        for run in 0..runs {
            let (mut process, mut api) = self.start("prog=memdirty mib=10 pages_per_ms=20", "diff");
            process.wait_line("memdirty: round 1 ok", WAIT);
            let base = self.work.join(format!("ours-base-{}-{run}", self.mem));
            let diff = self.work.join(format!("ours-diff-{}-{run}", self.mem));
            for dir in [&base, &diff] {
                let _ = std::fs::remove_dir_all(dir);
            }
            Self::snapshot(&mut api, &base, "full");
            // One more round: each of the 2560 pages rewritten once.
            process.wait_line(" ok (", WAIT);
            let (t, p, w) = Self::snapshot(&mut api, &diff, "diff");
            total.push(t);
            pause.push(p);
            written.push(w);
            process.send(b"q");
            process.wait_exit();
            let _ = std::fs::remove_dir_all(&base);
            let _ = std::fs::remove_dir_all(&diff);
        }
        let written_mib = Samples::new(written).median();
        Snapshots { total_ms: Samples::new(total), pause_ms: Samples::new(pause), written_mib, path: PathBuf::new() }
    }

    fn restores(&self, snapshot: &Path, mode: &str, runs: usize) -> Restores {
        let (mut running, mut working_set) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            let args: Vec<String> =
                ["--log-level", "info", "run", "--restore", &snapshot.display().to_string(), "--memory", mode]
                    .iter()
                    .map(|s| s.to_string())
                    .collect();
            let mut process = GuestProcess::spawn(self.vmm, &args);
            working_set.push(ms(process.wait_line("memtouch: pass", WAIT)));
            process.send(b"q");
            process.wait_exit();
            let stderr = process.stderr.recv_timeout(WAIT).unwrap_or_default();
            // "restored ... setup took X ms wall": from the start of `vmm run` to the vCPUs
            // running, as the VMM measures it (process start to main is not included).
            let setup = stderr
                .split("setup took ")
                .nth(1)
                .and_then(|rest| rest.split(" ms wall").next())
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(f64::NAN);
            running.push(setup);
        }
        Restores { running_ms: Samples::new(running), working_set_ms: Samples::new(working_set) }
    }
}

struct Peer<'a> {
    qemu: &'a Path,
    guest: &'a Path,
    work: &'a Path,
    mem: u64,
}

impl Peer<'_> {
    fn start(&self, tag: &str, incoming: bool) -> (GuestProcess, Qmp) {
        let sock = self.work.join(format!("qemu-{tag}.sock"));
        let _ = std::fs::remove_file(&sock);
        let mut args = qemu_args(self.guest, &memtouch_cmdline(self.mem), self.mem, 1);
        args.extend(["-qmp".into(), format!("unix:{},server=on,wait=off", sock.display())]);
        if incoming {
            args.extend(["-incoming".into(), "defer".into()]);
        }
        let process = GuestProcess::spawn(self.qemu, &args);
        let mut qmp = Qmp::connect(&sock, WAIT).expect("connect QMP");
        let caps = json!({ "capabilities": [{ "capability": "mapped-ram", "state": true }] });
        qmp.execute("migrate-set-capabilities", caps, WAIT).expect("mapped-ram");
        (process, qmp)
    }

    fn full_snapshots(&self, runs: usize) -> Snapshots {
        let (mut total, mut pause, mut path) = (Vec::new(), Vec::new(), PathBuf::new());
        for run in 0..runs {
            let (mut process, mut qmp) = self.start("save", false);
            process.wait_line("memtouch: pass 1 ok", WAIT);
            path = self.work.join(format!("qemu-{}-{run}.mig", self.mem));
            let _ = std::fs::remove_file(&path);
            let started = Instant::now();
            let uri = format!("file:{}", path.display());
            qmp.execute("migrate", json!({ "uri": uri }), WAIT).expect("migrate");
            let info = loop {
                let info = qmp.execute("query-migrate", json!({}), WAIT).expect("query-migrate");
                match info["status"].as_str() {
                    Some("completed") => break info,
                    Some("failed") | Some("cancelled") => panic!("QEMU's migration to a file failed: {info}"),
                    _ => std::thread::sleep(Duration::from_micros(500)),
                }
            };
            total.push(ms(started.elapsed()));
            pause.push(info["downtime"].as_f64().unwrap_or(f64::NAN));
            let _ = process.child.kill();
            process.wait_exit();
        }
        Snapshots { total_ms: Samples::new(total), pause_ms: Samples::new(pause), written_mib: 0.0, path }
    }

    fn restores(&self, saved: &Path, runs: usize) -> Restores {
        let (mut running, mut working_set) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            let (mut process, mut qmp) = self.start("load", true);
            let uri = format!("file:{}", saved.display());
            qmp.execute("migrate-incoming", json!({ "uri": uri }), WAIT).expect("migrate-incoming");
            let (resumed, _) = qmp.wait_event("RESUME", WAIT).expect("QEMU did not resume");
            running.push(ms(resumed - process.started));
            working_set.push(ms(process.wait_line("memtouch: pass", WAIT)));
            let _ = process.child.kill();
            process.wait_exit();
        }
        Restores { running_ms: Samples::new(running), working_set_ms: Samples::new(working_set) }
    }
}
