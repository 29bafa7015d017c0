//! Live component swaps under load: disk engines, live storage migration, NICs, vsock, memory
//! regions, and automatic rollback from a failing backend.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::peers::NbdServer;
use common::{Capture, TempDir};
use microguest_protocol::blk_stress::{BLOCK_SIZE, Digest, image_block_seq};
use serde_json::json;
use vmm::config::DiskConfig;
use vmm::swap::{MemorySwapRequest, SwapError, SwapRecord, SwapRequest, SwapState};
use vmm::{RamBacking, SerialOutput, Vm, VmBuilder, VmConfig, VmExit};

const WAIT: Duration = Duration::from_secs(120);

fn request(backend: serde_json::Value) -> SwapRequest {
    serde_json::from_value(json!({ "backend": backend })).unwrap()
}

/// A swap request from its full JSON form.
fn swap_request(value: serde_json::Value) -> SwapRequest {
    serde_json::from_value(value).unwrap()
}

/// Boots `config` with its serial output captured.
fn boot(config: VmConfig) -> (Vm, Capture) {
    let serial = Capture::default();
    let vm =
        VmBuilder::from_config(config).serial_output(SerialOutput::Writer(Box::new(serial.clone()))).start().unwrap();
    (vm, serial)
}

/// A zero-filled (sparse) image file of `bytes` bytes.
fn image(dir: &TempDir, name: &str, bytes: u64) -> PathBuf {
    let path = dir.join(name);
    std::fs::File::create(&path).unwrap().set_len(bytes).unwrap();
    path
}

/// What device `id` is backed by now.
fn backend_of(vm: &Vm, id: &str) -> String {
    vm.device(id).unwrap_or_else(|| panic!("no device {id}")).backend
}

/// Starts a swap that must be accepted and waits for its outcome.
fn swap(vm: &Vm, id: &str, request: SwapRequest) -> SwapRecord {
    let handle = vm.swap_device(id, request).unwrap_or_else(|e| panic!("swap of {id} refused: {e}"));
    let record = handle.wait(WAIT);
    assert_ne!(record.state, SwapState::Running, "swap still running after {WAIT:?}: {record:?}");
    record
}

/// Stops an `until_input=1` program and waits for the guest to exit.
fn stop_guest(vm: &Vm, serial: &Capture) -> VmExit {
    assert_eq!(vm.serial_input().send(b"q"), 1, "the UART took no input");
    vm.wait_timeout(WAIT).unwrap_or_else(|| panic!("guest did not exit after input:\n{}", serial.text()))
}

/// The `key=value` fields of the last line of `text` that starts with `prefix` (which may end
/// in the first key).
fn fields(text: &str, prefix: &str) -> BTreeMap<String, String> {
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting with {prefix:?} in:\n{text}"));
    line.split_whitespace().filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn field<'a>(f: &'a BTreeMap<String, String>, key: &str) -> &'a str {
    f.get(key).unwrap_or_else(|| panic!("no {key}= in {f:?}"))
}

/// Percentile `p` (0..=100) of sorted values, nearest rank.
fn percentile(sorted: &[u64], p: usize) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (sorted.len() * p).div_ceil(100).max(1);
    sorted[rank - 1]
}

fn blackout_summary(values: &[u64]) -> String {
    let mut v = values.to_vec();
    v.sort_unstable();
    format!(
        "n={} p50={} us p99={} us max={} us",
        v.len(),
        percentile(&v, 50),
        percentile(&v, 99),
        v.last().copied().unwrap_or(0)
    )
}

/// The blk-stress digest of a disk image: what the guest's sequence table should be, if every
/// completed write is on the image exactly as written (and nothing else is).
fn image_digest(path: &Path, blocks: u64, seed: u64) -> (u64, u64) {
    let bytes = std::fs::read(path).unwrap();
    let mut digest = Digest::new();
    let mut unwritten = 0;
    for block in 0..blocks {
        let at = block as usize * BLOCK_SIZE;
        let seq = image_block_seq(&bytes[at..at + BLOCK_SIZE], block, seed);
        unwritten += u64::from(seq == 0);
        digest.add(block, seq);
    }
    (digest.value(), unwritten)
}

/// Checks blk-stress's summary line: no errors, no mismatches, every block verified. Returns the
/// guest's digest.
fn check_blk_stress_summary(text: &str, blocks: u64) -> u64 {
    let f = fields(text, "blk-stress: ops=");
    assert_eq!(field(&f, "errors"), "0", "the guest saw I/O errors:\n{text}");
    assert_eq!(field(&f, "mismatches"), "0", "the guest read wrong data:\n{text}");
    assert_eq!(field(&f, "final_verify"), format!("{blocks}/{blocks}"), "final verify failed:\n{text}");
    assert!(field(&f, "writes").parse::<u64>().unwrap() > 0, "no writes in the random phase:\n{text}");
    u64::from_str_radix(field(&f, "digest"), 16).unwrap()
}

const STRESS_SEED: u64 = 0x5eed_f00d;
/// 16 MiB of 4 KiB blocks.
const STRESS_BLOCKS: u64 = 4096;

fn blk_stress_config(disk: &Path, engine: &str) -> VmConfig {
    let mut config = VmConfig::new(common::microguest());
    config.cmdline =
        format!("prog=blk-stress blocks={STRESS_BLOCKS} qd=16 until_input=1 seed={STRESS_SEED} progress_ms=0");
    config.disks = vec![serde_json::from_value(json!({ "path": disk, "engine": engine })).unwrap()];
    config
}

/// Verification a disk swap must pass under blk-stress: enough requests served by the new
/// backend without a single error (the guest keeps the disk busy, so this is quick).
fn busy_disk_verify() -> serde_json::Value {
    json!({ "window_ms": 20_000, "min_requests": 64 })
}

#[test]
fn idle_disk_engine_swap_and_memory_swap_smoke() {
    let dir = TempDir::new("swap-smoke");
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(16 << 20).unwrap();
    let mut config = VmConfig::new(common::microguest());
    config.cmdline = "prog=idle".into();
    config.disks = vec![DiskConfig { path: Some(disk.clone()), ..Default::default() }];
    let serial = Capture::default();
    let vm =
        VmBuilder::from_config(config).serial_output(SerialOutput::Writer(Box::new(serial.clone()))).start().unwrap();
    serial.wait_for("idle: ready", WAIT);

    let swap = vm.swap_device("disk0", request(json!({ "path": disk, "engine": "io_uring" }))).unwrap();
    let record = swap.wait(WAIT);
    assert_eq!(record.state, SwapState::Committed, "{record:?}");
    assert!(record.blackout_us.is_some());
    assert!(record.to.contains("io_uring"), "{record:?}");

    let report = vm
        .swap_memory(0, &MemorySwapRequest { backing: RamBacking::Memfd, verify: true, drain_timeout_ms: 2000 })
        .unwrap();
    assert_eq!(report.to, RamBacking::Memfd);
    assert!(report.bytes_copied > 0, "{report:?}");
    vm.serial_input().send(b"q");
    assert_eq!(vm.wait_timeout(WAIT), Some(VmExit::Guest(0)), "{}", serial.text());
}

/// The main disk scenario: blk-stress keeps 16 random verified 4 KiB requests in
/// flight while the disk's backend changes 100 times (sync file -> io_uring file -> NBD served
/// by a real qemu-nbd from the same image -> sync ...) and then moves to another image by live
/// storage migration. Every write must land exactly once: the guest sees no error and no
/// mismatch, and the digest recomputed from the final image equals the guest's.
#[test]
fn blk_stress_survives_100_engine_swaps_and_a_live_migration() {
    let dir = TempDir::new("swap-engines");
    // blk-stress uses the first 16 MiB; the rest makes the migration's background copy take
    // several turns of the event loop, with the guest writing (and re-dirtying) in between.
    let disk_bytes = 64 << 20;
    let disk = image(&dir, "disk.img", disk_bytes);
    let target = image(&dir, "target.img", disk_bytes);
    // Declared before the VM so it outlives it; killed and reaped on drop.
    let nbd = NbdServer::start(&disk, &dir.join("nbd.sock"), &[]);
    let nbd_address = format!("unix:{}", nbd.socket.display());

    let (vm, serial) = boot(blk_stress_config(&disk, "sync"));
    serial.wait_for("blk-stress: running", WAIT);

    let engines = [
        ("sync", json!({ "path": disk, "engine": "sync" })),
        ("io_uring", json!({ "path": disk, "engine": "io_uring" })),
        ("nbd", json!({ "nbd": nbd_address })),
    ];
    let mut blackouts: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut all = Vec::new();
    let mut current = 0;
    for i in 0..100 {
        let next = (current + 1) % engines.len();
        let record =
            swap(&vm, "disk0", swap_request(json!({ "backend": engines[next].1, "verify": busy_disk_verify() })));
        assert_eq!(
            record.state,
            SwapState::Committed,
            "swap {i} ({} -> {}): {record:#?}",
            engines[current].0,
            engines[next].0
        );
        let blackout = record.blackout_us.expect("a committed swap has a blackout");
        blackouts.entry(format!("{} -> {}", engines[current].0, engines[next].0)).or_default().push(blackout);
        all.push(blackout);
        current = next;
    }

    let record = swap(
        &vm,
        "disk0",
        swap_request(json!({
            "backend": { "path": target, "engine": "sync" },
            "mode": "migrate",
            "verify": busy_disk_verify(),
        })),
    );
    assert_eq!(record.state, SwapState::Committed, "live migration: {record:#?}");
    let copy = record.copy.expect("a migration reports copy statistics");
    assert_eq!(copy.bytes_total, disk_bytes, "{record:#?}");
    assert!(copy.bytes_copied >= copy.bytes_total, "not everything was copied: {record:#?}");
    assert!(backend_of(&vm, "disk0").contains(&target.display().to_string()), "{}", backend_of(&vm, "disk0"));
    // A committed migration ends in `commit`, and nothing of the swap happens after it.
    assert_eq!(record.phase, vmm::swap::Phase::Commit, "{record:#?}");
    let commits = record.timeline.iter().filter(|t| t.phase == vmm::swap::Phase::Commit).count();
    assert_eq!((commits, record.timeline.last().map(|t| t.phase)), (1, Some(vmm::swap::Phase::Commit)), "{record:#?}");

    let exit = stop_guest(&vm, &serial);
    let text = serial.text();
    assert_eq!(exit, VmExit::Guest(0), "{text}");
    let guest_digest = check_blk_stress_summary(&text, STRESS_BLOCKS);
    drop(vm);
    drop(nbd);

    let (digest, unwritten) = image_digest(&target, STRESS_BLOCKS, STRESS_SEED);
    assert_eq!(unwritten, 0, "{unwritten} blocks of the migrated image hold no valid blk-stress data");
    assert_eq!(
        digest, guest_digest,
        "the migrated image does not hold exactly the writes the guest completed (guest digest {guest_digest:016x}, image {digest:016x})"
    );

    eprintln!("engine swaps: blackout over all 100: {}", blackout_summary(&all));
    for (pair, values) in &blackouts {
        eprintln!("engine swaps: blackout {pair}: {}", blackout_summary(values));
    }
    eprintln!(
        "live migration: blackout {} us, {} of {} bytes copied in {} us, {} bytes in the final copy",
        record.blackout_us.unwrap_or(0),
        copy.bytes_copied,
        copy.bytes_total,
        copy.copy_us,
        copy.final_copy_bytes
    );
    let timeline: Vec<String> = record.timeline.iter().map(|t| format!("{:?}@{}us", t.phase, t.at_us)).collect();
    eprintln!("live migration timeline: {}", timeline.join(" "));
    eprintln!("blk-stress: {}", text.lines().rev().find(|l| l.starts_with("blk-stress: ops=")).unwrap());
}

/// Memory swaps quiesce every device, here while a disk is in the middle of a live migration
/// (its copy, its blackouts, its verification): quiesce holds nest, so neither swap lets the
/// disk run under the other, and every guest write lands exactly once on the migrated image.
#[test]
fn memory_swaps_overlap_a_live_migration() {
    let dir = TempDir::new("swap-overlap");
    let disk_bytes = 256 << 20;
    let disk = image(&dir, "disk.img", disk_bytes);
    let target = image(&dir, "target.img", disk_bytes);
    let (vm, serial) = boot(blk_stress_config(&disk, "sync"));
    serial.wait_for("blk-stress: running", WAIT);

    let request = swap_request(json!({
        "backend": { "path": target, "engine": "io_uring" },
        "mode": "migrate",
        "verify": busy_disk_verify(),
    }));
    let migration = vm.swap_device("disk0", request).expect("start the migration");
    let backings = [RamBacking::Memfd, RamBacking::Anonymous];
    let mut memory_swaps = 0;
    while migration.is_running() || memory_swaps < 2 {
        let backing = backings[memory_swaps % 2].clone();
        let request = MemorySwapRequest { backing: backing.clone(), verify: true, drain_timeout_ms: 5000 };
        vm.swap_memory(0, &request).unwrap_or_else(|e| panic!("memory swap {memory_swaps} to {backing}: {e}"));
        memory_swaps += 1;
    }
    let record = migration.wait(WAIT);
    assert_eq!(record.state, SwapState::Committed, "live migration: {record:#?}");
    eprintln!("{memory_swaps} memory swaps during the live migration");

    let exit = stop_guest(&vm, &serial);
    let text = serial.text();
    assert_eq!(exit, VmExit::Guest(0), "{text}");
    let guest_digest = check_blk_stress_summary(&text, STRESS_BLOCKS);
    drop(vm);
    let (digest, unwritten) = image_digest(&target, STRESS_BLOCKS, STRESS_SEED);
    assert_eq!(unwritten, 0);
    assert_eq!(digest, guest_digest, "the migrated image does not hold exactly the writes the guest completed");
}

/// A dead or hung new backend is refused by its probe before anything changes. One that fails
/// later, under the guest's load, is caught by the swap's health check and the old one is put
/// back, with the guest none the wiser: requests the failed backend refused or swallowed are
/// retried on the old one.
#[test]
fn failing_backends_roll_back_without_guest_errors() {
    let dir = TempDir::new("swap-rollback");
    let disk = image(&dir, "disk.img", STRESS_BLOCKS * BLOCK_SIZE as u64);
    let (vm, serial) = boot(blk_stress_config(&disk, "sync"));
    serial.wait_for("blk-stress: running", WAIT);
    let original = backend_of(&vm, "disk0");
    assert!(original.contains(&disk.display().to_string()), "{original}");

    let faulty = |fault: serde_json::Value, verify: serde_json::Value| {
        swap_request(json!({
            "backend": { "path": disk, "engine": "io_uring" },
            "fault": fault,
            "drain_timeout_ms": 500,
            "verify": verify,
        }))
    };
    for (name, fault) in [("error", json!("error")), ("stall", json!("stall"))] {
        let record = swap(&vm, "disk0", faulty(fault, json!({})));
        assert_eq!(record.state, SwapState::Failed, "fault {name}: {record:#?}");
        let reason = record.reason.clone().unwrap_or_default();
        assert!(reason.contains("failed its probe") && reason.contains("nothing changed"), "fault {name}: {reason}");
        assert!(record.blackout_us.is_none(), "fault {name}: the disk never stopped: {record:#?}");
        assert_eq!(backend_of(&vm, "disk0"), original, "fault {name}");
    }
    let cases = [
        // The probe's two reads pass, then every request fails with EIO: the first failure
        // ends the verification.
        (
            "error_after",
            json!({ "error_after": 2 }),
            json!({ "window_ms": 20_000, "min_requests": 64 }),
            "failed on the new backend",
        ),
        // The probe passes, then nothing completes: the window runs out with requests stuck.
        ("stall_after", json!({ "stall_after": 2 }), json!({ "window_ms": 300, "min_requests": 16 }), "stalled"),
        // 50 good requests, then EIO: caught because 500 good ones are required first.
        (
            "error_after 50",
            json!({ "error_after": 50 }),
            json!({ "window_ms": 20_000, "min_requests": 500 }),
            "failed on the new backend",
        ),
    ];
    for (name, fault, verify, why) in cases {
        let record = swap(&vm, "disk0", faulty(fault, verify));
        assert_eq!(record.state, SwapState::RolledBack, "fault {name}: {record:#?}");
        let reason = record.reason.clone().unwrap_or_default();
        assert!(reason.contains(why), "fault {name}: reason {reason:?} lacks {why:?}: {record:#?}");
        assert!(record.to.contains("fault injected"), "fault {name}: {record:#?}");
        assert!(
            record.timeline.iter().any(|t| t.phase == vmm::swap::Phase::Rollback),
            "fault {name}: no rollback in the timeline: {record:#?}"
        );
        assert_eq!(backend_of(&vm, "disk0"), original, "fault {name}: the original backend is not back");
        eprintln!("rollback after fault {name}: {reason}; blackout {} us", record.blackout_us.unwrap_or(0));
    }

    // A live migration whose target fails while chunks are being copied: the copies in flight
    // are waited for (or abandoned, when the target stalls) before the source goes back, and
    // guest writes stuck on the stalled target are retried on the source.
    let target = image(&dir, "target.img", STRESS_BLOCKS * BLOCK_SIZE as u64);
    let migrations = [
        ("error", json!("error"), "copying to the target failed"),
        // Fewer good requests than the copy needs (16 chunks), whatever the guest writes meanwhile.
        ("error_after", json!({ "error_after": 8 }), "copying to the target failed"),
        ("stall", json!("stall"), "did not converge"),
    ];
    for (name, fault, why) in migrations {
        let record = swap(
            &vm,
            "disk0",
            swap_request(json!({
                "backend": { "path": target, "engine": "io_uring" },
                "mode": "migrate",
                "fault": fault,
                "drain_timeout_ms": 500,
                "migrate": { "timeout_ms": 1000 },
            })),
        );
        assert_eq!(record.state, SwapState::RolledBack, "migration fault {name}: {record:#?}");
        let reason = record.reason.clone().unwrap_or_default();
        assert!(reason.contains(why), "migration fault {name}: reason {reason:?} lacks {why:?}: {record:#?}");
        assert_eq!(backend_of(&vm, "disk0"), original, "migration fault {name}: the source is not back");
        eprintln!("migration rollback after fault {name}: {reason}; blackout {} us", record.blackout_us.unwrap_or(0));
    }

    // The old backend is really serving: a healthy swap still goes through afterwards.
    let record = swap(
        &vm,
        "disk0",
        swap_request(json!({ "backend": { "path": disk, "engine": "io_uring" }, "verify": busy_disk_verify() })),
    );
    assert_eq!(record.state, SwapState::Committed, "{record:#?}");

    let exit = stop_guest(&vm, &serial);
    let text = serial.text();
    assert_eq!(exit, VmExit::Guest(0), "{text}");
    let guest_digest = check_blk_stress_summary(&text, STRESS_BLOCKS);
    drop(vm);
    let (digest, unwritten) = image_digest(&disk, STRESS_BLOCKS, STRESS_SEED);
    assert_eq!(unwritten, 0);
    assert_eq!(digest, guest_digest, "the image does not hold exactly the writes the guest completed");
}

/// `received=` of net-stream's last progress line.
fn progress_received(text: &str) -> Option<u64> {
    let line = text.lines().rev().find(|l| l.starts_with("net-stream: progress "))?;
    line.split_whitespace().find_map(|kv| kv.strip_prefix("received="))?.parse().ok()
}

/// Frames the guest has sent through net0 so far (the device's transmit counter).
fn nic_frames_sent(vm: &Vm) -> u64 {
    vm.device("net0").expect("no net0").counters["tx"].requests
}

/// A tap name unique to this test process and `tag` (interface names are at most 15 bytes).
fn tap_name(tag: &str) -> String {
    let name = format!("sw{}{tag}", std::process::id() % 1_000_000);
    assert!(name.len() <= 15, "{name}");
    name
}

const NIC_MAC: &str = "52:54:00:5a:b0:01";

fn net_stream_config(backend: serde_json::Value) -> VmConfig {
    let mut config = VmConfig::new(common::microguest());
    // Frames not echoed within 500 ms count as lost, so the end comes quickly after a swap;
    // progress lines every 100 ms show the stream going on.
    config.cmdline = "prog=net-stream until_input=1 size=256 window=32 timeout_ms=500 progress_ms=100".into();
    let mut nic = backend;
    nic["mac"] = json!(NIC_MAC);
    config.nets = vec![serde_json::from_value(nic).unwrap()];
    config
}

/// The MAC the guest reads from the NIC's configuration space.
fn guest_visible_mac(vm: &Vm) -> String {
    let nic = vm.device("net0").expect("no net0");
    assert_eq!(nic.kind, "net");
    nic.config_space[..6].iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// Swaps net0 between `a` and `b` (starting on `a`) `swaps` times under net-stream, then
/// stops the guest and returns net-stream's summary fields. Every swap must commit, the MAC
/// must stay, and a swap that tries to change the MAC must be refused.
fn net_stream_across_swaps(
    vm: &Vm,
    serial: &Capture,
    a: serde_json::Value,
    b: serde_json::Value,
    swaps: usize,
) -> BTreeMap<String, String> {
    serial.wait_for("net-stream: running", WAIT);
    assert!(serial.text().contains(&format!("mac {NIC_MAC} (from device)")), "{}", serial.text());
    assert_eq!(guest_visible_mac(vm), NIC_MAC);

    let mut with_mac = b.clone();
    with_mac["mac"] = json!("52:54:00:00:00:99");
    let before = backend_of(vm, "net0");
    match vm.swap_device("net0", request(with_mac)) {
        Err(SwapError::Invalid(e)) => assert!(e.message.contains("mac"), "{e:?}"),
        other => panic!("a swap changing the MAC must be refused, got {:?}", other.map(|h| h.snapshot())),
    }
    assert_eq!(backend_of(vm, "net0"), before, "a refused swap changed the backend");

    // Echoes flow before the first swap.
    serial
        .wait_until("net-stream progress with 64 frames echoed", WAIT, |t| (progress_received(t)? >= 64).then_some(()));
    let mut blackouts = Vec::new();
    for i in 0..swaps {
        let to = if i % 2 == 0 { &b } else { &a };
        // Verification watches the new backend for 300 ms (min_requests 0: the whole window),
        // and meanwhile the old one stays open: answers to frames sent through it before the
        // switch still reach the guest.
        let record =
            swap(vm, "net0", swap_request(json!({ "backend": to, "verify": { "window_ms": 300, "min_requests": 0 } })));
        assert_eq!(record.state, SwapState::Committed, "swap {i}: {record:#?}");
        blackouts.push(record.blackout_us.unwrap_or(0));
        assert_eq!(guest_visible_mac(vm), NIC_MAC, "swap {i} changed the MAC");
        // The stream goes on through the new backend: once the guest has more echoes than
        // frames had been sent at the commit, some frame sent after it (when only the new
        // backend was left) made the round trip.
        let sent_at_commit = nic_frames_sent(vm);
        serial.wait_until(&format!("echoes of frames sent after swap {i}"), WAIT, |t| {
            (progress_received(t)? > sent_at_commit).then_some(())
        });
    }
    eprintln!("nic swaps ({}): blackout {}", backend_of(vm, "net0"), blackout_summary(&blackouts));

    let exit = stop_guest(vm, serial);
    let text = serial.text();
    assert_eq!(exit, VmExit::Guest(0), "{text}");
    let f = fields(&text, "net-stream: sent=");
    assert_eq!(field(&f, "duplicated"), "0", "{text}");
    assert_eq!(field(&f, "corrupt"), "0", "{text}");
    let (sent, received, lost): (u64, u64, u64) = (
        field(&f, "sent").parse().unwrap(),
        field(&f, "received").parse().unwrap(),
        field(&f, "lost").parse().unwrap(),
    );
    assert_eq!(sent, received + lost, "{text}");
    assert!(received > 0, "{text}");
    f
}

/// net-stream keeps 32 frames in flight to an echo on a real tap while the NIC moves between
/// two taps 10 times. Frames in flight on the tap being left can be lost (its echo comes back
/// to a descriptor that is closed); none may come back twice or corrupt.
#[test]
fn net_stream_across_tap_swaps() {
    let (tap_a, tap_b) = (common::peers::Tap::create(&tap_name("a")), common::peers::Tap::create(&tap_name("b")));
    let _echo_a = common::peers::TapEcho::start(&tap_a.name);
    let _echo_b = common::peers::TapEcho::start(&tap_b.name);
    let (vm, serial) = boot(net_stream_config(json!({ "tap": tap_a.name })));
    let f = net_stream_across_swaps(&vm, &serial, json!({ "tap": tap_a.name }), json!({ "tap": tap_b.name }), 10);
    eprintln!(
        "net-stream across 10 tap swaps: sent={} received={} lost={} duplicated={} corrupt={}",
        field(&f, "sent"),
        field(&f, "received"),
        field(&f, "lost"),
        field(&f, "duplicated"),
        field(&f, "corrupt")
    );
}

/// The same over the userspace backend (Unix datagram sockets, each with its own echo): here
/// nothing may be lost either.
#[test]
fn net_stream_across_userspace_backend_swaps() {
    let dir = TempDir::new("swap-net-unix");
    let (sock_a, sock_b) = (dir.join("a.sock"), dir.join("b.sock"));
    let _echo_a = common::peers::DatagramEcho::start(&sock_a);
    let _echo_b = common::peers::DatagramEcho::start(&sock_b);
    let (vm, serial) = boot(net_stream_config(json!({ "unix": sock_a })));
    let f = net_stream_across_swaps(&vm, &serial, json!({ "unix": sock_a }), json!({ "unix": sock_b }), 10);
    eprintln!(
        "net-stream across 10 userspace-backend swaps: sent={} received={} lost={} duplicated={} corrupt={}",
        field(&f, "sent"),
        field(&f, "received"),
        field(&f, "lost"),
        field(&f, "duplicated"),
        field(&f, "corrupt")
    );
    assert_eq!(field(&f, "lost"), "0", "frames lost across userspace-backend swaps:\n{}", serial.text());
}

/// Between kinds of backend: the NIC moves from a real tap to the userspace backend and back,
/// 10 times, with the MAC kept. Frames in flight on a tap being left can be lost, as above.
#[test]
fn net_stream_across_tap_and_userspace_backend_swaps() {
    let dir = TempDir::new("swap-net-mixed");
    let tap = common::peers::Tap::create(&tap_name("m"));
    let _echo_tap = common::peers::TapEcho::start(&tap.name);
    let sock = dir.join("user.sock");
    let _echo_user = common::peers::DatagramEcho::start(&sock);
    let (vm, serial) = boot(net_stream_config(json!({ "tap": tap.name })));
    let f = net_stream_across_swaps(&vm, &serial, json!({ "tap": tap.name }), json!({ "unix": sock }), 10);
    eprintln!(
        "net-stream across 10 tap <-> userspace swaps: sent={} received={} lost={} duplicated={} corrupt={}",
        field(&f, "sent"),
        field(&f, "received"),
        field(&f, "lost"),
        field(&f, "duplicated"),
        field(&f, "corrupt")
    );
}

/// The highest `memtouch: pass N ok` in `text`, 0 before the first.
fn last_memtouch_pass(text: &str) -> u64 {
    text.lines().rev().find_map(|l| l.strip_prefix("memtouch: pass ")?.strip_suffix(" ok")?.parse().ok()).unwrap_or(0)
}

/// memtouch keeps verifying its pattern over 64 MiB of guest RAM while the RAM region behind
/// it moves from anonymous memory to a memfd, a file, hugetlbfs (when the host has the huge
/// pages) and back. After each swap a whole verification pass must run on the new backing.
#[test]
fn memtouch_pattern_survives_memory_backing_swaps() {
    let dir = TempDir::new("swap-memory");
    let mut config = VmConfig::new(common::microguest());
    config.cmdline = "prog=memtouch mib=64 verify_until_input=1".into();
    config.mem_mib = 128;
    let (vm, serial) = boot(config);
    serial.wait_for("memtouch: pass 1 ok", WAIT);

    let regions = vm.memory_regions();
    let region = regions.iter().find(|r| r.slot == 0).expect("no RAM region in slot 0").clone();
    assert_eq!(region.backing, RamBacking::Anonymous, "{regions:?}");

    let mut plan = vec![RamBacking::Memfd, RamBacking::File { path: dir.join("guest-ram") }];
    let huge_needed = region.size.div_ceil(vmm::HUGE_PAGE);
    let huge_free = vmm::free_huge_pages();
    if huge_free >= huge_needed {
        plan.push(RamBacking::Hugetlbfs);
    } else {
        eprintln!(
            "memory swaps: skipping hugetlbfs: {huge_free} free 2 MiB huge pages, {huge_needed} needed (vm.nr_hugepages)"
        );
    }
    plan.push(RamBacking::Anonymous);

    for backing in plan {
        let before = last_memtouch_pass(&serial.text());
        let request = MemorySwapRequest { backing: backing.clone(), verify: true, drain_timeout_ms: 2000 };
        let report = vm.swap_memory(0, &request).unwrap_or_else(|e| panic!("swap to {backing} failed: {e}"));
        assert_eq!(report.to, backing, "{report:?}");
        assert!(report.verified, "{report:?}");
        assert_eq!(report.bytes, region.size, "{report:?}");
        // The pattern alone is 64 MiB of non-zero data.
        assert!(report.bytes_copied >= 64 << 20, "{report:?}");
        let now = vm.memory_regions().into_iter().find(|r| r.slot == 0).unwrap();
        assert_eq!(now.backing, backing);
        assert_eq!((now.guest_addr, now.size), (region.guest_addr, region.size));
        // The pass running during the swap may have started before it: wait for the one after,
        // which verified all 64 MiB on the new backing.
        let want = before + 2;
        let pass = serial.wait_until(&format!("memtouch pass {want} after the swap to {backing}"), WAIT, |text| {
            assert!(!text.contains("FAILED"), "memtouch failed after the swap to {backing}:\n{text}");
            let pass = last_memtouch_pass(text);
            (pass >= want).then_some(pass)
        });
        eprintln!(
            "memory swap {} -> {}: paused {} us ({} us per GiB), copied {} of {} bytes in {} us, devices quiesced in {} us; \
             verified by memtouch pass {pass}",
            report.from,
            report.to,
            report.pause_us,
            report.pause_us_per_gib,
            report.bytes_copied,
            report.bytes,
            report.copy_us,
            report.devices_quiesce_us
        );
    }

    let exit = stop_guest(&vm, &serial);
    let text = serial.text();
    assert_eq!(exit, VmExit::Guest(0), "{text}");
    assert!(!text.contains("FAILED"), "{text}");
    assert!(text.contains("memtouch: 64 MiB at"), "{text}");
}

/// disk0's capacity as the guest sees it (virtio-blk config space: 512-byte sectors), in bytes.
fn disk_capacity(vm: &Vm) -> u64 {
    let disk = vm.device("disk0").expect("no disk0");
    assert_eq!(disk.kind, "block");
    let sectors = u64::from_le_bytes(disk.config_space[..8].try_into().unwrap());
    sectors * 512
}

/// Swaps that must be refused before anything changes: a new image without the confirmation,
/// a "switch" to an image of another size, a second swap while one runs. Then a confirmed
/// new-image swap to a bigger disk goes through and the guest-visible capacity changes.
#[test]
fn refused_swaps_change_nothing_and_new_image_changes_capacity() {
    let dir = TempDir::new("swap-refused");
    let disk = image(&dir, "disk.img", 16 << 20);
    let bigger = image(&dir, "bigger.img", 32 << 20);
    let mut config = VmConfig::new(common::microguest());
    config.cmdline = "prog=idle".into();
    config.disks = vec![DiskConfig { path: Some(disk.clone()), ..Default::default() }];
    let (vm, serial) = boot(config);
    serial.wait_for("idle: ready", WAIT);
    let original = backend_of(&vm, "disk0");
    assert_eq!(disk_capacity(&vm), 16 << 20);
    let unchanged = |what: &str| {
        assert_eq!(backend_of(&vm, "disk0"), original, "{what} changed the backend");
        assert_eq!(disk_capacity(&vm), 16 << 20, "{what} changed the capacity");
    };

    // A new image replaces the guest's data: refused unless confirmed.
    let new_image = |allow: bool| {
        swap_request(json!({ "backend": { "path": bigger }, "mode": "new_image", "allow_new_image": allow }))
    };
    match vm.swap_device("disk0", new_image(false)) {
        Err(SwapError::Invalid(e)) => assert_eq!(e.field.as_deref(), Some("allow_new_image"), "{e:?}"),
        other => panic!("an unconfirmed new-image swap must be refused, got {:?}", other.map(|h| h.snapshot())),
    }
    unchanged("an unconfirmed new-image swap");

    // Switch mode promises the same disk: another size is incompatible.
    match vm.swap_device("disk0", request(json!({ "path": bigger }))) {
        Err(SwapError::Incompatible(why)) => assert!(why.contains("capacity"), "{why}"),
        other => panic!("a switch to another size must be refused, got {:?}", other.map(|h| h.snapshot())),
    }
    unchanged("an incompatible swap");
    // Nor may a switch put another file of the same size under the guest.
    let lookalike = image(&dir, "lookalike.img", 16 << 20);
    match vm.swap_device("disk0", request(json!({ "path": lookalike }))) {
        Err(SwapError::Incompatible(why)) => assert!(why.contains("another file"), "{why}"),
        other => panic!("a switch to another file must be refused, got {:?}", other.map(|h| h.snapshot())),
    }
    unchanged("a switch to another file");

    // One swap at a time per device. The first verifies for 3 s (an idle guest sends nothing,
    // and with min_requests 0 the window runs to its end), so it is still running when the
    // second arrives.
    let first = vm
        .swap_device(
            "disk0",
            swap_request(json!({
                "backend": { "path": disk, "engine": "io_uring" },
                "verify": { "window_ms": 3000, "min_requests": 0 },
            })),
        )
        .unwrap();
    match vm.swap_device("disk0", request(json!({ "path": disk, "engine": "sync" }))) {
        Err(SwapError::Busy { device, swap }) => assert_eq!((device.as_str(), swap), ("disk0", first.id())),
        other => panic!("a second concurrent swap must be refused, got {:?}", other.map(|h| h.snapshot())),
    }
    let record = first.wait(WAIT);
    assert_eq!(record.state, SwapState::Committed, "{record:#?}");
    assert!(backend_of(&vm, "disk0").contains("io_uring"), "{}", backend_of(&vm, "disk0"));

    // Confirmed, the new image goes in and the guest is told the new capacity.
    let record = swap(&vm, "disk0", new_image(true));
    assert_eq!(record.state, SwapState::Committed, "{record:#?}");
    assert_eq!(record.mode, "new_image");
    assert!(backend_of(&vm, "disk0").contains(&bigger.display().to_string()), "{}", backend_of(&vm, "disk0"));
    assert_eq!(disk_capacity(&vm), 32 << 20);

    // A migration that cannot finish (its target stalls) gives up when the VM stops, instead
    // of copying on until its timeout (ten minutes by default).
    let stuck = image(&dir, "stuck.img", 32 << 20);
    let migration = vm
        .swap_device(
            "disk0",
            swap_request(json!({ "backend": { "path": stuck }, "mode": "migrate", "fault": "stall" })),
        )
        .unwrap();
    assert_eq!(stop_guest(&vm, &serial), VmExit::Guest(0), "{}", serial.text());
    let record = migration.wait(WAIT);
    assert_eq!(record.state, SwapState::RolledBack, "{record:#?}");
    assert!(record.reason.as_deref().is_some_and(|r| r.contains("stopping")), "{record:#?}");
    assert!(backend_of(&vm, "disk0").contains(&bigger.display().to_string()), "{}", backend_of(&vm, "disk0"));
}

/// A host connection to the guest's port `port` through the hybrid vsock socket at `socket`.
fn vsock_connect(socket: &Path, port: u32) -> std::io::Result<std::os::unix::net::UnixStream> {
    use std::io::{Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(WAIT))?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
    // The answer is one line, `OK <host port>`; read it byte by byte so no echo is swallowed.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.last() != Some(&b'\n') {
        stream.read_exact(&mut byte)?;
        line.push(byte[0]);
    }
    let line = String::from_utf8_lossy(&line);
    assert!(line.starts_with("OK "), "CONNECT {port} through {} answered {line:?}", socket.display());
    Ok(stream)
}

/// Sends `data` on a connection to the guest's echo and checks it comes back unchanged.
fn vsock_echo(stream: &mut std::os::unix::net::UnixStream, data: &[u8]) {
    use std::io::{Read, Write};
    stream.write_all(data).unwrap();
    let mut back = vec![0u8; data.len()];
    stream.read_exact(&mut back).unwrap();
    assert!(back == data, "the echo differs from what was sent");
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

/// The vsock device's host socket moves to a new path while a host connection to the guest
/// is open: that connection keeps working, new host connections go through the new path, and
/// the old path is gone.
#[test]
fn vsock_connection_survives_a_backend_socket_swap() {
    let dir = TempDir::new("swap-vsock");
    let (old_socket, new_socket) = (dir.join("old.vsock"), dir.join("new.vsock"));
    let mut config = VmConfig::new(common::microguest());
    config.cmdline = "prog=vsock-echo serve=1 port=5000".into();
    config.vsock = Some(vmm::config::VsockConfig { id: None, cid: 3, socket: old_socket.clone() });
    let (vm, serial) = boot(config);
    serial.wait_for("vsock-echo: listening on port 5000", WAIT);

    let mut first = vsock_connect(&old_socket, 5000).unwrap();
    serial.wait_for("vsock-echo: connection 1 accepted", WAIT);
    let before = pattern(1, 100_000);
    vsock_echo(&mut first, &before);

    let record = swap(&vm, "vsock0", request(json!({ "socket": new_socket })));
    assert_eq!(record.state, SwapState::Committed, "{record:#?}");
    assert_eq!(backend_of(&vm, "vsock0"), format!("unix {}", new_socket.display()));

    // The connection opened through the old socket still carries data both ways.
    let after = pattern(2, 100_000);
    vsock_echo(&mut first, &after);
    // The old path no longer takes connections; the new one does.
    assert!(!old_socket.exists(), "the old socket file is still there");
    assert!(vsock_connect(&old_socket, 5000).is_err(), "the old socket still accepts connections");
    let mut second = vsock_connect(&new_socket, 5000).unwrap();
    serial.wait_for("vsock-echo: connection 2 accepted", WAIT);
    let other = pattern(3, 50_000);
    vsock_echo(&mut second, &other);
    // Both at once.
    vsock_echo(&mut first, &pattern(4, 10_000));
    vsock_echo(&mut second, &pattern(5, 10_000));

    drop(first);
    drop(second);
    serial.wait_for("vsock-echo: connection 1 closed by the host after echoing 210000 bytes", WAIT);
    serial.wait_for("vsock-echo: connection 2 closed by the host after echoing 60000 bytes", WAIT);
    let exit = stop_guest(&vm, &serial);
    let text = serial.text();
    assert_eq!(exit, VmExit::Guest(0), "{text}");
    assert!(text.contains("vsock-echo: served 2 connections, echoed 270000 bytes, 0 still open"), "{text}");
}

/// Waits until the file at `path` contains `needle`; its text.
fn wait_for_text(path: &Path, needle: &str) -> String {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(std::time::Instant::now() < deadline, "{} lacks {needle:?}:\n{text}", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn api(socket: &Path, method: &str, path: &str, body: Option<serde_json::Value>) -> serde_json::Value {
    let mut client = vmm::api::ApiClient::connect(socket, WAIT).unwrap();
    let response = match body {
        Some(body) => client.send_json(method, path, &body),
        None => client.request(method, path, None),
    }
    .unwrap();
    serde_json::from_slice(&response.body).unwrap_or_default()
}

#[test]
fn after_a_migration_and_kill_9_the_resumed_vm_runs_on_the_new_image() {
    let dir = TempDir::new("swap-resume");
    let (old, new) = (image(&dir, "old.img", 16 << 20), image(&dir, "new.img", 16 << 20));
    let (state, console) = (dir.join("vm.state.json"), dir.join("console.log"));
    let cmdline =
        format!("prog=blk-stress blocks={STRESS_BLOCKS} qd=16 until_input=1 seed={STRESS_SEED} progress_ms=0");
    let socket = dir.join("vm.sock");
    let mut first = std::process::Command::new(common::vmm_bin());
    first
        .args(["run", "--kernel", common::microguest(), "--cmdline", &cmdline])
        .args(["--disk", &format!("path={}", old.display()), "--state-file"])
        .arg(&state)
        .args(["--serial", &format!("file:{}", console.display()), "--api-sock"])
        .arg(&socket)
        .stdin(std::process::Stdio::null());
    let mut first = common::Reaped(first.spawn().unwrap());
    wait_for_text(&console, "blk-stress: running");
    assert!(std::fs::read_to_string(&state).unwrap().contains("old.img"), "the state names the image at start");
    let swap = json!({"backend": {"path": new}, "mode": "migrate"});
    let started = api(&socket, "POST", "/devices/disk0/swap", Some(swap));
    let done = api(&socket, "GET", &format!("/swaps/{}?wait_ms=60000", started["id"]), None);
    assert_eq!(done["state"], "committed", "{done}");
    let recorded = std::fs::read_to_string(&state).unwrap();
    assert!(recorded.contains("new.img") && !recorded.contains("old.img"), "the state follows the commit:\n{recorded}");
    // kill -9: nothing is cleaned up, nothing is flushed by the VMM.
    first.0.kill().unwrap();
    first.0.wait().unwrap();

    let (socket, console) = (dir.join("resumed.sock"), dir.join("resumed.log"));
    let mut resumed = std::process::Command::new(common::vmm_bin());
    resumed
        .args(["run", "--resume-state"])
        .arg(&state)
        .args(["--serial", &format!("file:{}", console.display()), "--api-sock"])
        .arg(&socket)
        .stdin(std::process::Stdio::null());
    let mut resumed = common::Reaped(resumed.spawn().unwrap());
    wait_for_text(&console, "blk-stress: running");
    let disk = api(&socket, "GET", "/devices/disk0", None);
    assert!(disk["backend"].as_str().unwrap().contains("new.img"), "{disk}");
    api(&socket, "POST", "/serial/input", Some(json!({"data": "q"})));
    assert!(resumed.0.wait().unwrap().success());
    // The guest's writes of this run are on the new image, block for block.
    let text = wait_for_text(&console, "blk-stress: ops=");
    let guest_digest = check_blk_stress_summary(&text, STRESS_BLOCKS);
    assert_eq!(image_digest(&new, STRESS_BLOCKS, STRESS_SEED).0, guest_digest, "the resumed VM wrote the new image");
}
