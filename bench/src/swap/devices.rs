//! Table 1: device backend swaps under load. A guest keeps a disk (blk-stress, queue depth 16)
//! or a NIC (net-stream) busy while the host swaps the device's backend back and forth through
//! the control API; each direction of a pair is a row. Blackout (the time the device took no
//! new requests) and swap duration come from the VMM's swap records; failed requests from the
//! guest's own summary at the end.

use std::path::Path;

use serde_json::{Value, json};
use test_peers::{DatagramEcho, NbdServer, Tap, TapEcho};

use super::{ApiGuest, GUEST_TIMEOUT, GuestEnd, TempDir, is_root, median, percentiles_us, report_failures};
use crate::Table;

const DISK_BYTES: u64 = 64 << 20;
const MEM_MIB: u64 = 128;
/// The p99 blackout the table is judged against.
pub const GOAL_P99_US: f64 = 1000.0;

/// The health check each swap passes before committing: 64 successful requests on the new
/// backend (within 1 s); any failed request rolls the swap back.
pub fn verify_policy() -> Value {
    json!({ "window_ms": 1000, "min_requests": 64 })
}

/// One direction of a swap pair.
#[derive(Default)]
pub struct Direction {
    pub label: String,
    pub attempted: usize,
    pub committed: usize,
    pub blackout_us: Vec<f64>,
    pub duration_us: Vec<f64>,
    /// Why swaps did not commit (state and reason, or the API error).
    pub failures: Vec<String>,
    /// The longest blackout and that swap's timeline, for diagnosis.
    pub worst: Option<(f64, String)>,
}

impl Direction {
    fn record(&mut self, outcome: Result<Value, String>) {
        self.attempted += 1;
        let record = match outcome {
            Ok(record) => record,
            Err(e) => return self.failures.push(e),
        };
        if let Some(us) = record["blackout_us"].as_f64() {
            self.blackout_us.push(us);
            if self.worst.as_ref().is_none_or(|(worst, _)| us > *worst) {
                self.worst = Some((us, timeline(&record)));
            }
        }
        if let Some(us) = record["duration_us"].as_f64() {
            self.duration_us.push(us);
        }
        match record["state"].as_str() {
            Some("committed") => self.committed += 1,
            state => self.failures.push(format!(
                "swap {} {}: {}",
                record["id"],
                state.unwrap_or("?"),
                record["reason"].as_str().unwrap_or("no reason given")
            )),
        }
    }

    fn p99_us(&self) -> f64 {
        if self.blackout_us.is_empty() {
            return f64::INFINITY;
        }
        crate::Samples::new(self.blackout_us.clone()).pct(99.0)
    }
}

/// A swap's phases as `phase@us` from the request.
pub fn timeline(record: &Value) -> String {
    let phases = record["timeline"].as_array().map(Vec::as_slice).unwrap_or_default();
    let parts: Vec<String> =
        phases.iter().map(|e| format!("{}@{}", e["phase"].as_str().unwrap_or("?"), e["at_us"])).collect();
    parts.join(" ")
}

/// Two backends of one device, swapped back and forth; the guest starts on `a`, given to
/// `vmm run` as `start` (the device's command-line option).
struct Pair {
    device: &'static str,
    a: (String, Value),
    b: (String, Value),
    start: [String; 2],
}

/// Swaps `pair` back and forth `2 * swaps` times (`swaps` in each direction while every swap
/// commits; a swap that does not commit is retried in the same direction).
fn alternate(guest: &mut ApiGuest, pair: &Pair, swaps: usize) -> [Direction; 2] {
    let mut dirs = [
        Direction { label: format!("{} -> {}", pair.a.0, pair.b.0), ..Default::default() },
        Direction { label: format!("{} -> {}", pair.b.0, pair.a.0), ..Default::default() },
    ];
    let mut on_a = true;
    for i in 0..2 * swaps {
        let (dir, to) = if on_a { (0, &pair.b.1) } else { (1, &pair.a.1) };
        let request = json!({ "backend": to, "verify": verify_policy() });
        let outcome = guest.swap_device(pair.device, &request);
        let committed = outcome.as_ref().is_ok_and(|r| r["state"] == "committed");
        dirs[dir].record(outcome);
        if committed {
            on_a = !on_a;
        }
        if guest.broken() {
            eprintln!("  the API stopped answering after {} swaps; giving up on this pair", i + 1);
            break;
        }
        if (i + 1) % 50 == 0 {
            eprintln!("  {} swaps done", i + 1);
        }
    }
    for d in &dirs {
        report_failures(&d.label, &d.failures);
        if let Some((us, phases)) = &d.worst {
            eprintln!("  {}: longest blackout {us:.0} us: {phases}", d.label);
        }
    }
    dirs
}

/// Rows of the disk table and the NIC table.
pub struct Results {
    pub disks: Vec<(Direction, GuestEnd)>,
    pub nics: Vec<(Direction, GuestEnd)>,
    pub notes: Vec<String>,
}

fn disk_spec(image: &Path, engine: &str) -> (String, Value) {
    (engine.into(), json!({ "path": image, "engine": engine }))
}

fn disk_start(image: &Path, engine: &str) -> [String; 2] {
    ["--disk".into(), format!("path={},engine={engine}", image.display())]
}

/// One guest per pair: blk-stress over the whole disk while the pair is swapped.
fn disk_pair(
    vmm: &Path,
    kernel: &Path,
    dir: &TempDir,
    pair: &Pair,
    swaps: usize,
    seed: u32,
) -> Vec<(Direction, GuestEnd)> {
    eprintln!("disk: {} <-> {}, {swaps} swaps each way under blk-stress qd=16...", pair.a.0, pair.b.0);
    let cmdline = format!("prog=blk-stress qd=16 until_input=1 seed={seed} progress_ms=0");
    let socket = dir.join(&format!("api-{seed}.sock"));
    let mut guest = match ApiGuest::start(vmm, kernel, &cmdline, MEM_MIB, &pair.start, &socket, "blk-stress: running") {
        Ok(g) => g,
        Err(e) => return start_failed(pair, e),
    };
    let [ab, ba] = alternate(&mut guest, pair, swaps);
    let end = guest.stop("blk-stress: ops=", GUEST_TIMEOUT);
    check_guest_end(&end, "blk-stress");
    let again = GuestEnd { summary: end.summary.clone(), exit: end.exit, transcript: String::new() };
    vec![(ab, end), (ba, again)]
}

/// Rows for a pair whose guest did not start.
fn start_failed(pair: &Pair, e: String) -> Vec<(Direction, GuestEnd)> {
    eprintln!("  cannot start the guest: {e}");
    let failed = |label: String| Direction { label, failures: vec![e.clone()], ..Default::default() };
    vec![
        (failed(format!("{} -> {}", pair.a.0, pair.b.0)), GuestEnd::default()),
        (failed(format!("{} -> {}", pair.b.0, pair.a.0)), GuestEnd::default()),
    ]
}

/// Says on stderr what went wrong in a guest, if anything did.
fn check_guest_end(end: &GuestEnd, program: &str) {
    if end.summary.is_none() || end.exit != Some(0) {
        eprintln!("  {program} did not end cleanly (exit {:?}); its console:\n{}", end.exit, end.transcript);
    }
}

/// One guest per pair: net-stream through an echo on each side while the pair is swapped.
fn nic_pair(vmm: &Path, kernel: &Path, dir: &TempDir, pair: &Pair, swaps: usize) -> Vec<(Direction, GuestEnd)> {
    eprintln!("nic: {} <-> {}, {swaps} swaps each way under net-stream...", pair.a.0, pair.b.0);
    // Named by both ends: one backend takes part in more than one pair.
    let socket = dir.join(&format!("api-{}-{}.sock", pair.a.0.replace(' ', "-"), pair.b.0.replace(' ', "-")));
    // Frames not echoed within 100 ms count as lost, so frames lost in a swap free the guest's
    // window quickly and the stream keeps flowing for the next swap's health check.
    let cmdline = "prog=net-stream until_input=1 timeout_ms=100 progress_ms=0";
    let mut guest = match ApiGuest::start(vmm, kernel, cmdline, MEM_MIB, &pair.start, &socket, "net-stream: running") {
        Ok(g) => g,
        Err(e) => return start_failed(pair, e),
    };
    let [ab, ba] = alternate(&mut guest, pair, swaps);
    let end = guest.stop("net-stream: sent=", GUEST_TIMEOUT);
    check_guest_end(&end, "net-stream");
    let again = GuestEnd { summary: end.summary.clone(), exit: end.exit, transcript: String::new() };
    vec![(ab, end), (ba, again)]
}

pub fn run(vmm: &Path, kernel: &Path, swaps: usize) -> Results {
    let dir = TempDir::new("devices");
    let image = dir.image("disk.img", DISK_BYTES);
    let nbd = NbdServer::start(&image, &dir.join("nbd.sock"), &[]);
    let nbd_spec = ("nbd".to_string(), json!({ "nbd": format!("unix:{}", nbd.socket.display()) }));
    let (sync, uring) = (disk_spec(&image, "sync"), disk_spec(&image, "io_uring"));
    let pairs = [
        Pair { device: "disk0", a: sync.clone(), b: uring.clone(), start: disk_start(&image, "sync") },
        Pair { device: "disk0", a: sync, b: nbd_spec.clone(), start: disk_start(&image, "sync") },
        Pair { device: "disk0", a: uring, b: nbd_spec, start: disk_start(&image, "io_uring") },
    ];
    let mut disks = Vec::new();
    for (i, pair) in pairs.iter().enumerate() {
        disks.extend(disk_pair(vmm, kernel, &dir, pair, swaps, 11 + i as u32));
    }
    drop(nbd);

    let mut nics = Vec::new();
    let mut notes = Vec::new();
    let (sock_a, sock_b) = (dir.join("echo-a.sock"), dir.join("echo-b.sock"));
    let _echoes = (DatagramEcho::start(&sock_a), DatagramEcho::start(&sock_b));
    if is_root() {
        let id = std::process::id() % 100_000;
        let (tap_a, tap_b) = (Tap::create(&format!("bsa{id}")), Tap::create(&format!("bsb{id}")));
        let _echoes = (TapEcho::start(&tap_a.name), TapEcho::start(&tap_b.name));
        let pair = Pair {
            device: "net0",
            a: ("tap A".into(), json!({ "tap": tap_a.name })),
            b: ("tap B".into(), json!({ "tap": tap_b.name })),
            start: ["--net".into(), format!("tap={}", tap_a.name)],
        };
        nics.extend(nic_pair(vmm, kernel, &dir, &pair, swaps));
        // Across kinds: a real tap and the userspace backend.
        let pair = Pair {
            device: "net0",
            a: ("tap A".into(), json!({ "tap": tap_a.name })),
            b: ("unix A".into(), json!({ "unix": sock_a })),
            start: ["--net".into(), format!("tap={}", tap_a.name)],
        };
        nics.extend(nic_pair(vmm, kernel, &dir, &pair, swaps));
    } else {
        notes.push("tap rows skipped: creating taps needs root".into());
    }
    let pair = Pair {
        device: "net0",
        a: ("unix A".into(), json!({ "unix": sock_a })),
        b: ("unix B".into(), json!({ "unix": sock_b })),
        start: ["--net".into(), format!("unix={}", sock_a.display())],
    };
    nics.extend(nic_pair(vmm, kernel, &dir, &pair, swaps));
    Results { disks, nics, notes }
}

fn goal(d: &Direction, failed_requests: Option<u64>) -> String {
    let mut misses = Vec::new();
    let p99 = d.p99_us();
    if p99 >= GOAL_P99_US {
        misses.push(if p99.is_finite() { format!("p99 {p99:.0} us") } else { "no blackout measured".into() });
    }
    if d.committed < d.attempted || d.attempted == 0 {
        misses.push(format!("{} not committed", d.attempted - d.committed));
    }
    match failed_requests {
        Some(0) => {}
        Some(n) => misses.push(format!("{n} failed in the guest")),
        None => misses.push("no guest summary".into()),
    }
    if misses.is_empty() { "yes".into() } else { format!("no: {}", misses.join(", ")) }
}

pub fn print(results: &Results, swaps: usize) {
    println!(
        "\nSwap blackout under load: goal p99 blackout < 1 ms with zero failed guest requests ({swaps} swaps each way)\n"
    );
    let mut t = Table::new(&[
        "disk backends (blk-stress qd16, 64 MiB)",
        "swaps",
        "committed",
        "blackout p50 / p99 / max (us)",
        "swap duration p50 (us)",
        "guest errors",
        "guest mismatches",
        "final verify",
        "goal met",
    ]);
    for (d, end) in &results.disks {
        let failed = end.count("errors").zip(end.count("mismatches")).map(|(e, m)| e + m);
        t.row(vec![
            d.label.clone(),
            d.attempted.to_string(),
            d.committed.to_string(),
            percentiles_us(&d.blackout_us),
            median(&d.duration_us, 0),
            end.cell("errors"),
            end.cell("mismatches"),
            end.text("final_verify").unwrap_or("?").to_string(),
            goal(d, failed),
        ]);
    }
    t.print();
    println!();
    let mut t = Table::new(&[
        "NIC backends (net-stream)",
        "swaps",
        "committed",
        "blackout p50 / p99 / max (us)",
        "swap duration p50 (us)",
        "frames sent",
        "lost",
        "duplicated",
        "corrupt",
        "goal met",
    ]);
    for (d, end) in &results.nics {
        let failed =
            end.count("lost").zip(end.count("duplicated")).zip(end.count("corrupt")).map(|((l, d), c)| l + d + c);
        t.row(vec![
            d.label.clone(),
            d.attempted.to_string(),
            d.committed.to_string(),
            percentiles_us(&d.blackout_us),
            median(&d.duration_us, 0),
            end.cell("sent"),
            end.cell("lost"),
            end.cell("duplicated"),
            end.cell("corrupt"),
            goal(d, failed),
        ]);
    }
    t.print();
    println!(
        "\nBlackout and duration come from the VMM's swap records (blackout: from the moment the device\n\
         stopped taking requests to its resume, drain included; duration: request to commit). Each swap commits once the new\n\
         backend has served 64 requests without error (verify policy {}); a failed request rolls it back.\n\
         Guest counts are the guest's own summary over the whole run of the pair (both directions), so\n\
         the two rows of a pair show the same numbers. nbd is qemu-nbd serving the same raw image on a\n\
         Unix socket; taps are echoed by a raw socket on the host side, unix backends by a datagram echo.\n\
         net-stream keeps 32 256-byte frames out and counts a frame lost when its echo is not back\n\
         within 100 ms; echoes that reach the old backend after the switch are still delivered (the NIC\n\
         keeps reading it until the swap commits). A disk's requests in flight at the switch finish on\n\
         the old backend while the new one serves, so the blackout does not wait for them (behind nbd\n\
         that is qemu-nbd, a process competing for this 2-core host's CPUs with the guest's vCPU).",
        verify_policy()
    );
    for note in &results.notes {
        println!("Note: {note}.");
    }
}
