//! Replication to a shadow VMM, with real processes: a primary `vmm run`, a `vmm shadow`
//! beside it, epochs of dirty pages between them, then a switchover under load, and a commit
//! or a rollback. The guests check themselves: `memdirty` verifies every page against a count
//! it keeps in a register (a page lost or stale in the shadow's copy fails it), `blk-stress`
//! verifies every block it reads (DMA the dirty log missed would show as a mismatch).

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Reaped, TempDir};
use serde_json::{Value, json};
use vmm::api::ApiClient;

const WAIT: Duration = Duration::from_secs(120);

/// A `vmm run --api-sock` child, its serial console in a file.
struct Primary {
    child: Reaped,
    socket: PathBuf,
    console: PathBuf,
}

impl Primary {
    fn start(dir: &TempDir, cmdline: &str, extra: &[&str]) -> Self {
        let (socket, console) = (dir.join("primary.sock"), dir.join("primary.log"));
        let mut cmd = Command::new(common::vmm_bin());
        cmd.args(["run", "--kernel", common::microguest(), "--cmdline", cmdline, "--api-sock"])
            .arg(&socket)
            .args(["--serial", &format!("file:{}", console.display())])
            .args(extra)
            .stdin(Stdio::null());
        let child = Reaped(cmd.spawn().expect("spawn the primary"));
        ApiClient::connect_within(&socket, WAIT, WAIT).expect("the primary's API answers");
        Self { child, socket, console }
    }
}

/// A `vmm shadow` child; its stderr is read for its progress lines.
struct Shadow {
    child: Reaped,
    listen: PathBuf,
    socket: PathBuf,
    console: PathBuf,
    stderr: BufReader<std::process::ChildStderr>,
}

impl Shadow {
    fn start(dir: &TempDir, name: &str) -> Self {
        Self::start_from(common::vmm_bin(), dir, name)
    }

    /// A shadow run by the `vmm` executable `binary`.
    fn start_from(binary: &str, dir: &TempDir, name: &str) -> Self {
        let listen = dir.join(&format!("{name}-repl.sock"));
        let socket = dir.join(&format!("{name}.sock"));
        let console = dir.join(&format!("{name}.log"));
        let mut cmd = Command::new(binary);
        cmd.args(["shadow", "--listen", &format!("unix:{}", listen.display()), "--api-sock"])
            .arg(&socket)
            .args(["--dir", dir.join(&format!("{name}-state")).to_str().unwrap()])
            .args(["--serial", &format!("file:{}", console.display())])
            .stdin(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = Reaped(cmd.spawn().expect("spawn the shadow"));
        let mut stderr = BufReader::new(child.0.stderr.take().unwrap());
        let mut line = String::new();
        stderr.read_line(&mut line).unwrap();
        assert!(line.contains("waiting for a primary"), "{line}");
        // The socket exists once the shadow listens.
        let deadline = Instant::now() + WAIT;
        while !listen.exists() {
            assert!(Instant::now() < deadline, "the shadow never listened");
            std::thread::sleep(Duration::from_millis(10));
        }
        Self { child, listen, socket, console, stderr }
    }

    fn target(&self) -> String {
        format!("unix:{}", self.listen.display())
    }
}

fn call(socket: &Path, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut api = ApiClient::connect(socket, WAIT).expect("connect");
    let response = match body {
        Some(body) => api.send_json(method, path, &body),
        None => api.request(method, path, None),
    }
    .expect("an answer");
    (response.status, serde_json::from_slice(&response.body).unwrap_or(Value::Null))
}

/// Waits until replication has run `epochs` epochs.
fn wait_for_epochs(primary: &Primary, epochs: u64) -> Value {
    wait_for_epochs_at(&primary.socket, epochs)
}

fn wait_for_epochs_at(socket: &Path, epochs: u64) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        // The latest replication: ended ones stay listed before it.
        let (_, all) = call(socket, "GET", "/replication", None);
        let status = all["shadows"].as_array().and_then(|s| s.last()).cloned().unwrap_or_default();
        assert!(status["state"] != "failed", "replication failed: {status}");
        if status["epochs"].as_u64().unwrap_or(0) >= epochs {
            return status;
        }
        assert!(Instant::now() < deadline, "no {epochs} epochs: {status}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn console(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Waits for `child` to exit (killing it after `WAIT`).
fn exit_status(child: &mut Reaped) -> Option<i32> {
    let _watchdog = common::peers::Watchdog::kill_after(child.0.id(), WAIT);
    child.0.wait().unwrap().code()
}

/// Replicates, switches over while `memdirty` rewrites its pages, commits, and has the shadow's
/// guest verify every page.
#[test]
fn switchover_under_a_dirtying_guest_then_commit() {
    let dir = TempDir::new("repl-memdirty");
    let mut primary = Primary::start(&dir, "prog=memdirty mib=16 pages_per_ms=5", &[]);
    let mut shadow = Shadow::start(&dir, "shadow");
    let (status, started) =
        call(&primary.socket, "POST", "/replication", Some(json!({"target": shadow.target(), "epoch_ms": 50})));
    assert_eq!(status, 202, "{started}");
    let progress = wait_for_epochs(&primary, 3);
    let totals = &progress["totals"];
    assert!(totals["pages"].as_u64() > Some(0), "{progress}");
    // Snapshots and memory swaps read or rebuild the dirty log: refused while replicating.
    let (refused, _) = call(&primary.socket, "POST", "/snapshots", Some(json!({"path": dir.join("snap")})));
    assert_eq!(refused, 409);

    let (status, report) = call(&primary.socket, "POST", "/replication/switchover", None);
    assert_eq!(status, 200, "{report}");
    eprintln!("switchover: {report}");
    let mut line = String::new();
    while !line.contains("the VM runs here") {
        line.clear();
        assert!(shadow.stderr.read_line(&mut line).unwrap() > 0, "the shadow ended before running the VM");
    }
    // The primary stays frozen until the commit; its guest writes nothing more.
    let (_, vm) = call(&primary.socket, "GET", "/vm", None);
    assert_eq!(vm["state"], "paused", "{vm}");
    // Nothing but a commit or a rollback may wake it: not a resume, a snapshot, a memory swap.
    let (resumed, _) = call(&primary.socket, "PATCH", "/vm", Some(json!({"state": "running"})));
    assert_eq!(resumed, 409);
    let (snapshot, _) = call(&primary.socket, "POST", "/snapshots", Some(json!({"path": dir.join("late")})));
    assert_eq!(snapshot, 409);
    let (memory, _) =
        call(&primary.socket, "POST", "/memory/regions/0/swap", Some(json!({"backing": {"kind": "memfd"}})));
    assert_eq!(memory, 409);
    let frozen = console(&primary.console);

    ApiClient::connect_within(&shadow.socket, WAIT, WAIT).expect("the shadow's API answers");
    let (status, committed) = call(&primary.socket, "POST", "/replication/commit", None);
    assert_eq!(status, 200, "{committed}");
    assert_eq!(exit_status(&mut primary.child), Some(0), "the primary stops after the commit");
    assert_eq!(console(&primary.console), frozen, "the primary's guest ran after the freeze");

    // The shadow's guest carries on from the primary's last round and verifies everything.
    let rounds_before = frozen.matches("ok (").count();
    let deadline = Instant::now() + WAIT;
    while console(&shadow.console).matches("ok (").count() < 2 {
        assert!(Instant::now() < deadline, "the guest made no progress on the shadow:\n{}", console(&shadow.console));
        std::thread::sleep(Duration::from_millis(20));
    }
    let (status, _) = call(&shadow.socket, "POST", "/serial/input", Some(json!({"data": "q"})));
    assert_eq!(status, 200);
    assert_eq!(exit_status(&mut shadow.child), Some(0), "{}", console(&shadow.console));
    let text = console(&shadow.console);
    assert!(text.contains("all verified"), "{text}");
    assert!(!text.contains("FAILED") && !text.contains("mismatch"), "{text}");
    eprintln!(
        "memdirty: {rounds_before} rounds on the primary, then on the shadow:\n{}",
        text.lines().last().unwrap_or("")
    );
}

/// Twenty switchovers in a row while `blk-stress` keeps 16 requests in flight on a disk every
/// process opens in turn: each shadow becomes the primary of the next. Nothing the disk DMAed
/// into guest RAM may be missing on a shadow, and no request may be lost or repeated.
#[test]
fn twenty_switchovers_under_disk_load_lose_no_dma() {
    const SWITCHOVERS: usize = 20;
    let dir = TempDir::new("repl-blk");
    let image = dir.join("disk.img");
    std::fs::File::create(&image).unwrap().set_len(64 << 20).unwrap();
    let primary = Primary::start(
        &dir,
        "prog=blk-stress qd=16 blocks=4096 until_input=1",
        &["--disk", &format!("path={},engine=io_uring", image.display())],
    );
    let deadline = Instant::now() + WAIT;
    while !console(&primary.console).contains("blk-stress: running") {
        assert!(Instant::now() < deadline, "blk-stress never ran:\n{}", console(&primary.console));
        std::thread::sleep(Duration::from_millis(20));
    }
    // The VM's current home: its process, API socket and console.
    let (mut child, mut socket, mut log) = (primary.child, primary.socket, primary.console);
    let mut downtimes = Vec::new();
    for round in 0..SWITCHOVERS {
        let shadow = Shadow::start(&dir, &format!("shadow{round}"));
        let (status, started) =
            call(&socket, "POST", "/replication", Some(json!({"target": shadow.target(), "epoch_ms": 20})));
        assert_eq!(status, 202, "round {round}: {started}\n{}", console(&log));
        wait_for_epochs_at(&socket, 3);
        let (status, report) = call(&socket, "POST", "/replication/switchover", None);
        assert_eq!(status, 200, "round {round}: {report}");
        downtimes.push(report["downtime_us"].as_u64().unwrap_or(0));
        ApiClient::connect_within(&shadow.socket, WAIT, WAIT).expect("the shadow's API answers");
        let (status, _) = call(&socket, "POST", "/replication/commit", None);
        assert_eq!(status, 200, "round {round}");
        assert_eq!(
            exit_status(&mut child),
            Some(0),
            "round {round}: the old home stops after the commit:\n{}",
            console(&log)
        );
        let Shadow { child: next, socket: next_socket, console: next_log, .. } = shadow;
        (child, socket, log) = (next, next_socket, next_log);
    }
    // The VM's last home locked the image once the commit was done: another VMM is refused.
    let deadline = Instant::now() + WAIT;
    loop {
        let out = common::run_microguest("prog=hello", &["--disk", &format!("path={},readonly=on", image.display())]);
        if out.stderr.contains("is in use by another process") {
            break;
        }
        assert!(Instant::now() < deadline, "the shadow never locked the image: {}", out.stderr);
        std::thread::sleep(Duration::from_millis(50));
    }
    let (status, _) = call(&socket, "POST", "/serial/input", Some(json!({"data": "q"})));
    assert_eq!(status, 200);
    assert_eq!(exit_status(&mut child), Some(0), "{}", console(&log));
    let text = console(&log);
    let summary = text.lines().rev().find(|l| l.starts_with("blk-stress: ops=")).unwrap_or_else(|| panic!("{text}"));
    assert!(summary.contains("errors=0 mismatches=0 final_verify=4096/4096"), "{summary}");
    downtimes.sort_unstable();
    eprintln!(
        "{SWITCHOVERS} switchovers under blk-stress (debug build): downtime p50 {} us, max {} us; {summary}",
        downtimes[SWITCHOVERS / 2],
        downtimes[SWITCHOVERS - 1]
    );
}

/// A rollback after the switchover: the shadow stops, takes back what its guest wrote to the
/// disk, and the primary runs on from its freeze; its guest, which verifies every block it
/// reads, finds the disk exactly as it left it.
#[test]
fn rollback_after_a_switchover_resumes_the_primary() {
    const BLOCKS: u32 = 1024;
    let dir = TempDir::new("repl-rollback");
    let (primary, mut shadow, _) = replicating_blk_stress(&dir, BLOCKS);
    let (status, report) = call(&primary.socket, "POST", "/replication/switchover", None);
    assert_eq!(status, 200, "{report}");
    // The guest writes on the shadow for a while.
    ApiClient::connect_within(&shadow.socket, WAIT, WAIT).expect("the shadow's API answers");
    // The counters came over with the device's state: count from where they stand.
    let requests = |disk: &Value| disk["counters"]["io"]["requests"].as_u64().unwrap_or(0);
    let base = requests(&call(&shadow.socket, "GET", "/devices/disk0", None).1);
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, disk) = call(&shadow.socket, "GET", "/devices/disk0", None);
        if requests(&disk) > base + 200 {
            break;
        }
        assert!(Instant::now() < deadline, "no I/O on the shadow: {disk}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (status, rolled) = call(&primary.socket, "POST", "/replication/rollback", None);
    assert_eq!(status, 200, "{rolled}");
    assert_eq!(rolled["state"], "stopped", "{rolled}");
    assert_eq!(exit_status(&mut shadow.child), Some(0), "the shadow ends after a rollback");
    let (_, vm) = call(&primary.socket, "GET", "/vm", None);
    assert_eq!(vm["state"], "running", "{vm}");
    let Primary { mut child, socket, console: log } = primary;
    let summary = finish_blk_stress(&mut child, &socket, &log, BLOCKS);
    eprintln!("after a rollback: {summary}");
}

/// The shadow dies mid-replication: the primary runs on, says why, and replicates again to a
/// new shadow.
#[test]
fn a_shadow_that_dies_leaves_the_primary_running() {
    let dir = TempDir::new("repl-cut");
    let primary = Primary::start(&dir, "prog=memdirty mib=8 pages_per_ms=5", &[]);
    let mut first = Shadow::start(&dir, "first");
    let (status, _) =
        call(&primary.socket, "POST", "/replication", Some(json!({"target": first.target(), "epoch_ms": 20})));
    assert_eq!(status, 202);
    wait_for_epochs(&primary, 2);
    first.child.0.kill().unwrap();
    first.child.0.wait().unwrap();
    let deadline = Instant::now() + WAIT;
    let failed = loop {
        let (_, all) = call(&primary.socket, "GET", "/replication", None);
        let status = all["shadows"][0].clone();
        if status["state"] == "failed" {
            break status;
        }
        assert!(Instant::now() < deadline, "the primary never noticed: {status}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(failed["error"].as_str().is_some_and(|e| !e.is_empty()), "{failed}");
    let (_, vm) = call(&primary.socket, "GET", "/vm", None);
    assert_eq!(vm["state"], "running");
    // No switchover without replication, and a second start works.
    let (status, _) = call(&primary.socket, "POST", "/replication/switchover", None);
    assert_eq!(status, 409);
    let second = Shadow::start(&dir, "second");
    let (status, restarted) = call(&primary.socket, "POST", "/replication", Some(json!({"target": second.target()})));
    assert_eq!(status, 202, "{restarted}");
    wait_for_epochs(&primary, 2);
}

/// Two network namespaces joined by a veth pair, as two hosts; deleted when dropped.
struct Hosts {
    names: [String; 2],
    addresses: [String; 2],
    /// Each host's end of the link.
    devices: [String; 2],
}

impl Hosts {
    fn new() -> Self {
        // Unique among this process's tests too; interface names stay under 16 bytes.
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst) % 10;
        let tag = std::process::id() % 10_000 * 10 + n;
        let names = [format!("vmmA{tag}"), format!("vmmB{tag}")];
        let subnet = (tag % 250) + 1;
        let addresses = [format!("10.213.{subnet}.1"), format!("10.213.{subnet}.2")];
        let devices = [format!("va{tag}"), format!("vb{tag}")];
        let hosts = Self { names, addresses, devices };
        let run = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().expect("run ip");
            assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        let (a, b) = (&hosts.names[0], &hosts.names[1]);
        run(&["netns", "add", a]);
        run(&["netns", "add", b]);
        let (va, vb) = (hosts.devices[0].clone(), hosts.devices[1].clone());
        run(&["link", "add", &va, "netns", a, "type", "veth", "peer", "name", &vb, "netns", b]);
        for (ns, dev, addr) in [(a, &va, &hosts.addresses[0]), (b, &vb, &hosts.addresses[1])] {
            run(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev]);
            run(&["-n", ns, "link", "set", dev, "up"]);
            run(&["-n", ns, "link", "set", "lo", "up"]);
        }
        hosts
    }

    /// `program` run inside host `i`.
    fn command(&self, i: usize, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.names[i], program]);
        cmd
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = Command::new("ip").args(["netns", "delete", name]).status();
        }
    }
}

/// A primary on host 0 and a shadow on host 1, replicating over TCP.
struct AcrossHosts {
    primary: Reaped,
    socket: PathBuf,
    log: PathBuf,
    shadow: Reaped,
    shadow_socket: PathBuf,
    shadow_log: PathBuf,
}

impl AcrossHosts {
    fn start(dir: &TempDir, hosts: &Hosts, cmdline: &str, replication: Value) -> Self {
        let port = 7000 + std::process::id() % 1000;
        let listen = format!("tcp:{}:{port}", hosts.addresses[1]);
        let (shadow_socket, shadow_log) = (dir.join("shadow.sock"), dir.join("shadow.log"));
        let mut shadow = hosts.command(1, common::vmm_bin());
        shadow
            .args(["shadow", "--listen", &listen, "--api-sock", shadow_socket.to_str().unwrap()])
            .args(["--dir", dir.join("shadow-state").to_str().unwrap()])
            .args(["--serial", &format!("file:{}", shadow_log.display())])
            .stdin(Stdio::null())
            .stderr(Stdio::piped());
        let mut shadow = Reaped(shadow.spawn().expect("spawn the shadow"));
        let mut stderr = BufReader::new(shadow.0.stderr.take().unwrap());
        let mut line = String::new();
        stderr.read_line(&mut line).unwrap();
        assert!(line.contains("waiting for a primary"), "{line}");
        // The rest goes to the test's output (a pipe nobody reads would fill and block it).
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                eprintln!("shadow: {line}");
            }
        });

        let (socket, log) = (dir.join("primary.sock"), dir.join("primary.log"));
        let mut primary = hosts.command(0, common::vmm_bin());
        primary
            .args(["run", "--kernel", common::microguest(), "--cmdline", cmdline])
            .args(["--api-sock", socket.to_str().unwrap(), "--serial", &format!("file:{}", log.display())])
            .stdin(Stdio::null());
        let primary = Reaped(primary.spawn().expect("spawn the primary"));
        ApiClient::connect_within(&socket, WAIT, WAIT).expect("the primary's API answers");
        // The shadow binds its port after printing; a refused first try is retried.
        let mut body = replication;
        body["target"] = json!(listen);
        let deadline = Instant::now() + WAIT;
        loop {
            let (status, started) = call(&socket, "POST", "/replication", Some(body.clone()));
            if status == 202 {
                break;
            }
            assert!(status == 422 && Instant::now() < deadline, "{status}: {started}");
            std::thread::sleep(Duration::from_millis(20));
        }
        wait_for_epochs_at(&socket, 3);
        Self { primary, socket, log, shadow, shadow_socket, shadow_log }
    }
}

/// The shadow on another "host": replication over TCP between two network namespaces, a
/// switchover and a commit; the guest verifies every page on the other side.
#[test]
fn shadow_over_tcp_on_another_host() {
    let dir = TempDir::new("repl-tcp");
    let hosts = Hosts::new();
    let cmdline = "prog=memdirty mib=8 pages_per_ms=5";
    let AcrossHosts { mut primary, socket, mut shadow, shadow_socket, shadow_log, .. } =
        AcrossHosts::start(&dir, &hosts, cmdline, json!({"epoch_ms": 20}));
    let (status, report) = call(&socket, "POST", "/replication/switchover", None);
    assert_eq!(status, 200, "{report}");
    eprintln!("switchover over TCP: {report}");
    ApiClient::connect_within(&shadow_socket, WAIT, WAIT).expect("the shadow's API answers");
    let (status, _) = call(&socket, "POST", "/replication/commit", None);
    assert_eq!(status, 200);
    assert_eq!(exit_status(&mut primary), Some(0));
    let (status, _) = call(&shadow_socket, "POST", "/serial/input", Some(json!({"data": "q"})));
    assert_eq!(status, 200);
    assert_eq!(exit_status(&mut shadow), Some(0), "{}", console(&shadow_log));
    assert!(console(&shadow_log).contains("all verified"), "{}", console(&shadow_log));
}

/// The link between the hosts goes down mid-replication (no reset, packets just stop): the
/// primary gives up after its timeout and runs on, the shadow gives up too, and the guest
/// keeps verifying every page.
#[test]
fn a_link_cut_mid_epoch_leaves_both_sides_sane() {
    let dir = TempDir::new("repl-link-cut");
    let hosts = Hosts::new();
    // Busy enough that the cut lands inside an epoch's transfer most of the time.
    let cmdline = "prog=memdirty mib=16 pages_per_ms=20";
    let AcrossHosts { mut primary, socket, log, mut shadow, .. } =
        AcrossHosts::start(&dir, &hosts, cmdline, json!({"epoch_ms": 5, "timeout_ms": 1000}));
    let out = hosts.command(0, "ip").args(["link", "set", &hosts.devices[0], "down"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let deadline = Instant::now() + WAIT;
    let failed = loop {
        let (_, all) = call(&socket, "GET", "/replication", None);
        let status = all["shadows"][0].clone();
        if status["state"] == "failed" {
            break status;
        }
        assert!(Instant::now() < deadline, "the primary never gave up: {status}");
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!("after the cut: {failed}");
    assert!(failed["error"].as_str().is_some_and(|e| e.contains("silent")), "{failed}");
    assert_ne!(exit_status(&mut shadow), Some(0), "the shadow gives up on a silent primary");
    let (_, vm) = call(&socket, "GET", "/vm", None);
    assert_eq!(vm["state"], "running", "{vm}");
    let rounds = console(&log).matches("ok (").count();
    let deadline = Instant::now() + WAIT;
    while console(&log).matches("ok (").count() < rounds + 2 {
        assert!(Instant::now() < deadline, "the guest stopped:\n{}", console(&log));
        std::thread::sleep(Duration::from_millis(20));
    }
    let (status, _) = call(&socket, "POST", "/serial/input", Some(json!({"data": "q"})));
    assert_eq!(status, 200);
    assert_eq!(exit_status(&mut primary), Some(0), "{}", console(&log));
    assert!(console(&log).contains("all verified"), "{}", console(&log));
}

/// A switchover while `net-stream` streams frames through a NIC (the Unix datagram backend,
/// echoed by a peer on this host): the stream goes on from the shadow. Frames in flight at
/// the freeze may be lost, as on a real network; none may come back twice or corrupt.
#[test]
fn switchover_under_a_network_stream() {
    let dir = TempDir::new("repl-net");
    let echo_path = dir.join("echo.sock");
    let _echo = common::peers::DatagramEcho::start(&echo_path);
    let mut primary = Primary::start(
        &dir,
        "prog=net-stream until_input=1 size=256 window=32 timeout_ms=500 progress_ms=100",
        &["--net", &format!("unix={}", echo_path.display())],
    );
    let deadline = Instant::now() + WAIT;
    while !console(&primary.console).contains("net-stream: progress") {
        assert!(Instant::now() < deadline, "net-stream never ran:\n{}", console(&primary.console));
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut shadow = Shadow::start(&dir, "shadow");
    let (status, _) =
        call(&primary.socket, "POST", "/replication", Some(json!({"target": shadow.target(), "epoch_ms": 20})));
    assert_eq!(status, 202);
    wait_for_epochs(&primary, 3);
    let (status, report) = call(&primary.socket, "POST", "/replication/switchover", None);
    assert_eq!(status, 200, "{report}");
    ApiClient::connect_within(&shadow.socket, WAIT, WAIT).expect("the shadow's API answers");
    let (status, _) = call(&primary.socket, "POST", "/replication/commit", None);
    assert_eq!(status, 200);
    assert_eq!(exit_status(&mut primary.child), Some(0));
    // Echoes keep coming on the shadow: several progress lines there.
    let deadline = Instant::now() + WAIT;
    while console(&shadow.console).matches("net-stream: progress").count() < 3 {
        assert!(Instant::now() < deadline, "no stream on the shadow:\n{}", console(&shadow.console));
        std::thread::sleep(Duration::from_millis(20));
    }
    let (status, _) = call(&shadow.socket, "POST", "/serial/input", Some(json!({"data": "q"})));
    assert_eq!(status, 200);
    assert_eq!(exit_status(&mut shadow.child), Some(0), "{}", console(&shadow.console));
    let text = console(&shadow.console);
    let summary = text.lines().rev().find(|l| l.starts_with("net-stream: sent=")).unwrap_or_else(|| panic!("{text}"));
    let field = |name: &str| -> u64 {
        summary
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name}= in {summary}"))
    };
    assert_eq!((field("duplicated"), field("corrupt")), (0, 0), "{summary}");
    assert_eq!(field("sent"), field("received") + field("lost"), "{summary}");
    eprintln!("net-stream across a switchover: {summary}");
}

/// A shadow stopped while it waits for a primary leaves nothing behind: its listening socket
/// and its own directory go with it.
#[test]
fn a_waiting_shadow_stopped_by_a_signal_cleans_up() {
    let dir = TempDir::new("repl-sigterm");
    let listen = dir.join("repl.sock");
    let mut cmd = Command::new(common::vmm_bin());
    cmd.args(["shadow", "--listen", &format!("unix:{}", listen.display())]).stdin(Stdio::null()).stderr(Stdio::piped());
    let mut child = Reaped(cmd.spawn().expect("spawn the shadow"));
    let own_dir = std::env::temp_dir().join(format!("vmm-shadow-{}", child.0.id()));
    let mut stderr = BufReader::new(child.0.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    assert!(line.contains("waiting for a primary"), "{line}");
    let deadline = Instant::now() + WAIT;
    while !listen.exists() || !own_dir.exists() {
        assert!(Instant::now() < deadline, "the shadow never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: only sends a signal to our child.
    unsafe { libc::kill(child.0.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(exit_status(&mut child), Some(128 + libc::SIGTERM));
    assert!(!listen.exists(), "the listening socket was left behind");
    assert!(!own_dir.exists(), "the shadow's directory was left behind");
}

/// Starts `blk-stress` on a primary with a disk of its own, and replication to a new shadow.
fn replicating_blk_stress(dir: &TempDir, blocks: u32) -> (Primary, Shadow, PathBuf) {
    replicating_blk_stress_to(common::vmm_bin(), dir, blocks)
}

/// The same, the shadow run by the `vmm` executable `shadow_binary`.
fn replicating_blk_stress_to(shadow_binary: &str, dir: &TempDir, blocks: u32) -> (Primary, Shadow, PathBuf) {
    let image = dir.join("disk.img");
    std::fs::File::create(&image).unwrap().set_len(16 << 20).unwrap();
    let primary = Primary::start(
        dir,
        &format!("prog=blk-stress qd=4 blocks={blocks} until_input=1"),
        &["--disk", &format!("path={}", image.display())],
    );
    let deadline = Instant::now() + WAIT;
    while !console(&primary.console).contains("blk-stress: running") {
        assert!(Instant::now() < deadline, "blk-stress never ran:\n{}", console(&primary.console));
        std::thread::sleep(Duration::from_millis(20));
    }
    let shadow = Shadow::start_from(shadow_binary, dir, "shadow");
    let (status, started) =
        call(&primary.socket, "POST", "/replication", Some(json!({"target": shadow.target(), "epoch_ms": 50})));
    assert_eq!(status, 202, "{started}");
    wait_for_epochs(&primary, 2);
    (primary, shadow, image)
}

/// Ends `blk-stress` on the VM's final home and checks it lost nothing.
fn finish_blk_stress(child: &mut Reaped, socket: &Path, log: &Path, blocks: u32) -> String {
    let (status, _) = call(socket, "POST", "/serial/input", Some(json!({"data": "q"})));
    assert_eq!(status, 200);
    assert_eq!(exit_status(child), Some(0), "{}", console(log));
    let text = console(log);
    let summary = text.lines().rev().find(|l| l.starts_with("blk-stress: ops=")).unwrap_or_else(|| panic!("{text}"));
    assert!(summary.contains(&format!("errors=0 mismatches=0 final_verify={blocks}/{blocks}")), "{summary}");
    summary.to_string()
}

/// Validated updates: one that passes its trial on a clone (another disk engine and a memfd
/// RAM backing), one that fails (a disk backend that fails every request); the failed one
/// cannot be switched to, the passed one is applied by the switchover. The clone's disk
/// writes go to an overlay: the primary's guest, which keeps verifying every block it reads,
/// never sees them.
#[test]
fn a_validated_update_is_applied_by_the_switchover_and_a_failed_one_is_refused() {
    const BLOCKS: u32 = 2048;
    let dir = TempDir::new("repl-validate");
    let (mut primary, shadow, image) = replicating_blk_stress(&dir, BLOCKS);
    let backend = json!({ "path": image, "engine": "io_uring" });
    let good = json!({
        "update": { "devices": { "disk0": { "backend": backend } }, "ram_backing": { "kind": "memfd" } },
        "health": { "window_ms": 800, "min_requests": 20 },
    });
    let (status, passed) = call(&primary.socket, "POST", "/replication/validate", Some(good));
    assert_eq!(status, 200, "{passed}");
    let report = &passed["report"];
    assert_eq!(report["passed"], true, "{passed}");
    assert_eq!(report["applied"].as_array().map(Vec::len), Some(2), "the disk and the RAM: {passed}");
    assert!(report["health"]["requests"].as_u64() >= Some(20), "the clone's disk served: {passed}");
    eprintln!("passed trial: {passed}");

    let bad = json!({
        "update": { "devices": { "disk0": { "backend": { "path": image }, "fault": "error" } } },
    });
    let (status, failed) = call(&primary.socket, "POST", "/replication/validate", Some(bad));
    assert_eq!(status, 200, "{failed}");
    assert_eq!(failed["report"]["passed"], false, "{failed}");
    let reason = failed["report"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("disk0") && reason.contains("probe"), "{failed}");
    let (passed_id, failed_id) = (passed["id"].as_u64().unwrap(), failed["id"].as_u64().unwrap());

    // The primary ran through both trials untouched, still replicating.
    let (_, vm) = call(&primary.socket, "GET", "/vm", None);
    assert_eq!(vm["state"], "running", "{vm}");
    let (_, all) = call(&primary.socket, "GET", "/replication", None);
    let replication = &all["shadows"][0];
    assert_eq!(replication["state"], "replicating", "{replication}");
    assert_eq!(replication["validations"].as_array().map(Vec::len), Some(2), "{replication}");
    let (_, disk) = call(&primary.socket, "GET", "/devices/disk0", None);
    assert!(!disk["backend"].as_str().unwrap_or_default().contains("io_uring"), "{disk}");

    let body = json!({ "validation": failed_id });
    let (status, refused) = call(&primary.socket, "POST", "/replication/switchover", Some(body));
    assert_eq!(status, 409, "{refused}");
    let (status, unknown) = call(&primary.socket, "POST", "/replication/switchover", Some(json!({"validation": 99})));
    assert_eq!((status, unknown["field"].as_str()), (400, Some("validation")), "{unknown}");

    let (status, report) =
        call(&primary.socket, "POST", "/replication/switchover", Some(json!({ "validation": passed_id })));
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["applied"].as_array().map(Vec::len), Some(2), "{report}");
    ApiClient::connect_within(&shadow.socket, WAIT, WAIT).expect("the shadow's API answers");
    let (_, disk) = call(&shadow.socket, "GET", "/devices/disk0", None);
    assert!(disk["backend"].as_str().unwrap_or_default().contains("io_uring"), "{disk}");
    let (_, regions) = call(&shadow.socket, "GET", "/memory/regions", None);
    assert!(regions.as_array().unwrap().iter().all(|r| r["backing"]["kind"] == "memfd"), "{regions}");
    let (status, _) = call(&primary.socket, "POST", "/replication/commit", None);
    assert_eq!(status, 200);
    assert_eq!(exit_status(&mut primary.child), Some(0));
    let Shadow { child: mut shadow_child, socket, console: log, .. } = shadow;
    let summary = finish_blk_stress(&mut shadow_child, &socket, &log, BLOCKS);
    eprintln!("after a validated update: {summary}");
}

/// A VM that fails its health check on the shadow comes back by itself: the shadow stops it
/// and says why, and the primary runs on from where it froze.
#[test]
fn a_switchover_that_fails_its_health_check_rolls_back_by_itself() {
    const BLOCKS: u32 = 1024;
    let dir = TempDir::new("repl-unhealthy");
    let (primary, mut shadow, _) = replicating_blk_stress(&dir, BLOCKS);
    // More successful requests than the guest can make in the window.
    let body = json!({ "health": { "window_ms": 300, "min_requests": 1_000_000_000u64 } });
    let (status, failed) = call(&primary.socket, "POST", "/replication/switchover", Some(body));
    assert_eq!(status, 502, "{failed}");
    let error = failed["error"].as_str().unwrap_or_default();
    assert!(error.contains("runs here again") && error.contains("successful request"), "{failed}");
    assert_ne!(exit_status(&mut shadow.child), Some(0), "the shadow gives up");
    let (_, vm) = call(&primary.socket, "GET", "/vm", None);
    assert_eq!(vm["state"], "running", "{vm}");
    let (_, all) = call(&primary.socket, "GET", "/replication", None);
    let replication = &all["shadows"][0];
    assert_eq!(replication["state"], "failed", "{replication}");
    let Primary { mut child, socket, console: log } = primary;
    let summary = finish_blk_stress(&mut child, &socket, &log, BLOCKS);
    eprintln!("after an automatic rollback: {summary}");
}

/// Two shadows replicate at once, each with the pages dirtied since its own last epoch; the
/// switchover names one, the other stops, and the guest verifies every page where it lands.
#[test]
fn two_shadows_at_once_and_a_switchover_to_either() {
    let dir = TempDir::new("repl-two");
    let mut primary = Primary::start(&dir, "prog=memdirty mib=16 pages_per_ms=5", &[]);
    let mut first = Shadow::start(&dir, "first");
    let mut second = Shadow::start(&dir, "second");
    for (shadow, epoch_ms) in [(&first, 30), (&second, 70)] {
        let body = json!({"target": shadow.target(), "epoch_ms": epoch_ms});
        let (status, started) = call(&primary.socket, "POST", "/replication", Some(body));
        assert_eq!(status, 202, "{started}");
    }
    let (status, twice) = call(&primary.socket, "POST", "/replication", Some(json!({"target": first.target()})));
    assert_eq!(status, 409, "{twice}");
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, all) = call(&primary.socket, "GET", "/replication", None);
        let shadows = all["shadows"].as_array().unwrap();
        assert_eq!(shadows.len(), 2, "{all}");
        if shadows.iter().all(|s| s["epochs"].as_u64() >= Some(4)) {
            break;
        }
        assert!(shadows.iter().all(|s| s["state"] != "failed"), "{all}");
        assert!(Instant::now() < deadline, "{all}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (status, ambiguous) = call(&primary.socket, "POST", "/replication/switchover", None);
    assert_eq!((status, ambiguous["field"].as_str()), (400, Some("target")), "{ambiguous}");

    let body = json!({"target": second.target()});
    let (status, report) = call(&primary.socket, "POST", "/replication/switchover", Some(body));
    assert_eq!(status, 200, "{report}");
    let (_, all) = call(&primary.socket, "GET", "/replication", None);
    let state_of = |target: String| {
        all["shadows"].as_array().unwrap().iter().find(|s| s["target"] == target).map(|s| s["state"].clone())
    };
    assert_eq!(state_of(second.target()), Some(json!("switched_over")), "{all}");
    // The other shadow is told nothing more: it gives up, and its copy goes.
    assert_ne!(exit_status(&mut first.child), Some(0), "the first shadow gives up");
    // Its replication thread records the stop once it has wound down, which may come a moment
    // after the shadow's process is gone.
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, all) = call(&primary.socket, "GET", "/replication", None);
        let first_state = all["shadows"].as_array().unwrap().iter().find(|s| s["target"] == first.target()).cloned();
        let state = first_state.map(|s| s["state"].clone());
        if state == Some(json!("stopped")) {
            break;
        }
        assert_eq!(state, Some(json!("replicating")), "stopping, if not stopped yet: {all}");
        assert!(Instant::now() < deadline, "the first shadow never shows as stopped: {all}");
        std::thread::sleep(Duration::from_millis(20));
    }

    ApiClient::connect_within(&second.socket, WAIT, WAIT).expect("the second shadow's API answers");
    let (status, committed) = call(&primary.socket, "POST", "/replication/commit", None);
    assert_eq!((status, committed["state"].as_str()), (200, Some("committed")), "{committed}");
    assert_eq!(exit_status(&mut primary.child), Some(0));
    let deadline = Instant::now() + WAIT;
    while console(&second.console).matches("ok (").count() < 2 {
        assert!(Instant::now() < deadline, "no progress on the shadow:\n{}", console(&second.console));
        std::thread::sleep(Duration::from_millis(20));
    }
    let (status, _) = call(&second.socket, "POST", "/serial/input", Some(json!({"data": "q"})));
    assert_eq!(status, 200);
    assert_eq!(exit_status(&mut second.child), Some(0), "{}", console(&second.console));
    let text = console(&second.console);
    assert!(text.contains("all verified") && !text.contains("FAILED"), "{text}");
}

/// An update to another `vmm` build: the shadow is the optimized build (`cargo build
/// --release`, which `.ci/run` makes), the primary the test build. The VM is validated on the
/// new build (an empty update: the build is the update), switched over to it and committed;
/// `blk-stress` carries on there and loses nothing.
#[test]
fn an_update_to_another_vmm_build() {
    let other = std::env::var_os("VMM_OTHER_BUILD")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/vmm"));
    let Ok(other) = other.canonicalize() else {
        eprintln!(
            "SKIPPED: no other vmm build at {} (run `cargo build --release -p vmm`, or set VMM_OTHER_BUILD)",
            other.display()
        );
        return;
    };
    const BLOCKS: u32 = 1024;
    let dir = TempDir::new("repl-build");
    let (mut primary, shadow, _) = replicating_blk_stress_to(other.to_str().unwrap(), &dir, BLOCKS);
    let (status, validated) = call(&primary.socket, "POST", "/replication/validate", Some(json!({"update": {}})));
    assert_eq!(status, 200, "{validated}");
    assert_eq!(validated["report"]["passed"], true, "{validated}");
    let build = validated["report"]["build"].as_str().unwrap_or_default().to_string();
    assert!(build.contains("(release)") && build.contains(other.to_str().unwrap()), "{validated}");
    let body = json!({ "validation": validated["id"] });
    let (status, report) = call(&primary.socket, "POST", "/replication/switchover", Some(body));
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["build"], json!(build), "{report}");
    ApiClient::connect_within(&shadow.socket, WAIT, WAIT).expect("the shadow's API answers");
    let (status, _) = call(&primary.socket, "POST", "/replication/commit", None);
    assert_eq!(status, 200);
    assert_eq!(exit_status(&mut primary.child), Some(0));
    let Shadow { child: mut shadow_child, socket, console: log, .. } = shadow;
    let summary = finish_blk_stress(&mut shadow_child, &socket, &log, BLOCKS);
    eprintln!("on {build}: {summary}");
}
