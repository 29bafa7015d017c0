//! Snapshots taken of a running guest (through the library) and continued in a second, real
//! `vmm run --restore` process, with each memory mode; diff chains; and snapshot files that are
//! bad in every way we can think of, each refused with the reason.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Capture, TempDir};
use serde_json::json;
use vmm::RamBacking;
use vmm::snapshot::{ParentRef, SnapshotKind, SnapshotReport, SnapshotRequest, VmSnapshot, format};
use vmm::swap::MemorySwapRequest;
use vmm::{SerialOutput, Vm, VmBuilder, VmConfig};

const WAIT: Duration = Duration::from_secs(60);

fn boot(config: VmConfig) -> (Vm, Capture) {
    let serial = Capture::default();
    let vm =
        VmBuilder::from_config(config).serial_output(SerialOutput::Writer(Box::new(serial.clone()))).start().unwrap();
    (vm, serial)
}

fn microguest(cmdline: &str, vcpus: u32) -> VmConfig {
    let mut config = VmConfig::new(common::microguest());
    config.cmdline = cmdline.into();
    config.vcpus = vcpus;
    config.mem_mib = 64;
    config
}

fn snapshot(vm: &Vm, dir: &Path, kind: SnapshotKind) -> SnapshotReport {
    let request = SnapshotRequest { path: dir.to_path_buf(), kind, drain_timeout_ms: 2000 };
    vm.snapshot(&request).unwrap_or_else(|e| panic!("snapshot into {}: {e}", dir.display()))
}

/// Continues the snapshot in `dir` in a new `vmm` process; the byte on its serial input tells
/// the guest programs used here to finish (after a full verification of their work).
fn restore(dir: &Path, memory: &str) -> common::Output {
    let dir = dir.to_str().unwrap();
    common::vmm_with(&["run", "--restore", dir, "--memory", memory], Some(b"q"), WAIT)
}

/// The highest `memdirty: round N ok` in `text`.
fn last_round(text: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.strip_prefix("memdirty: round ")?.split_once(" ok")?.0.parse().ok())
        .max()
        .unwrap_or(0)
}

/// N from the final `memdirty: W writes in N rounds ...`.
fn final_rounds(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("memdirty: ")?.split_once(" writes in ")?.1.split_once(' ')?.0.parse().ok())
}

#[test]
fn memdirty_continues_from_full_and_diff_snapshots_in_every_memory_mode() {
    let dir = TempDir::new("snap-chain");
    // A round rewrites all 32 MiB in about 400 ms: a diff taken tens of ms after its parent
    // holds a small part of it.
    let (vm, serial) = boot(microguest("prog=memdirty mib=32 pages_per_ms=20", 1));
    serial.wait_for("memdirty: round 1 ok", WAIT);
    let mut taken: Vec<(PathBuf, u64, SnapshotReport)> = Vec::new();
    for (i, kind) in [SnapshotKind::Full, SnapshotKind::Diff, SnapshotKind::Diff].into_iter().enumerate() {
        std::thread::sleep(Duration::from_millis(20));
        let round = last_round(&serial.text());
        let path = dir.join(&format!("s{i}"));
        let report = snapshot(&vm, &path, kind);
        taken.push((path, round, report));
    }
    drop(vm);
    let (full, diff) = (&taken[0].2, &taken[1].2);
    assert!(full.memory_written_bytes >= 32 << 20, "{full:?}");
    assert!(diff.memory_written_bytes > 0, "{diff:?}");
    assert!(diff.memory_written_bytes < full.memory_written_bytes, "a diff holds only what changed: {diff:?}");

    // The check can fail: a diff that forgets its pages brings back old copies of them.
    let lossy = dir.join("lossy");
    std::fs::create_dir_all(&lossy).unwrap();
    std::fs::copy(taken[2].0.join("memory"), lossy.join("memory")).unwrap();
    let mut state: VmSnapshot = format::read_state(&taken[2].0.join("state")).unwrap();
    for region in &mut state.regions {
        region.dirty.iter_mut().flatten().for_each(|word| *word = 0);
    }
    format::write_state(&lossy.join("state"), &state).unwrap();
    let out = restore(&lossy, "eager");
    assert_eq!(out.status, Some(1), "a restore that lost pages passed:\n{}", out.stdout);
    assert!(out.stdout.contains("FAILED"), "{}", out.stdout);

    for (path, round, _) in &taken {
        for mode in ["eager", "mmap", "uffd"] {
            let out = restore(path, mode);
            out.expect_status(0).expect_stdout("all verified");
            // The guest's own count carries on from where the snapshot caught it.
            let rounds = final_rounds(&out.stdout).unwrap_or(0);
            assert!(rounds >= *round, "{mode} restore of {} restarted the count: {}", path.display(), out.stdout);
        }
    }
}

/// The first pass of a snapshot runs with the guest writing: pages it changes meanwhile must
/// come out as they were at the pause, not as the first pass saw them.
#[test]
fn a_guest_dirtying_at_full_speed_is_snapshotted_consistently() {
    let dir = TempDir::new("snap-fast");
    let (vm, serial) = boot(microguest("prog=memdirty mib=32", 1));
    serial.wait_for("memdirty: round 1 ok", WAIT);
    snapshot(&vm, &dir.join("full"), SnapshotKind::Full);
    let diff = snapshot(&vm, &dir.join("diff"), SnapshotKind::Diff);
    assert!(diff.memory_written_bytes > 0, "{diff:?}");
    drop(vm);
    for path in ["full", "diff"] {
        restore(&dir.join(path), "eager").expect_status(0).expect_stdout("all verified");
    }
}

#[test]
fn four_vcpus_continue_after_restore() {
    let dir = TempDir::new("snap-smp");
    let (vm, serial) = boot(microguest("prog=smp until_input=1", 4));
    serial.wait_for("all cpus incrementing", WAIT);
    let report = snapshot(&vm, &dir.join("s"), SnapshotKind::Full);
    assert_eq!(report.vcpus, 4);
    drop(vm);
    for mode in ["eager", "mmap", "uffd"] {
        restore(&dir.join("s"), mode).expect_status(0).expect_stdout("as expected");
    }
}

#[test]
fn blk_stress_continues_on_the_same_disk_after_restore() {
    let dir = TempDir::new("snap-blk");
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(16 << 20).unwrap();
    let mut config = microguest("prog=blk-stress blocks=4096 qd=16 until_input=1 progress_ms=0", 1);
    config.disks = vec![serde_json::from_value(json!({ "path": disk, "engine": "io_uring" })).unwrap()];
    let (vm, serial) = boot(config);
    serial.wait_for("blk-stress: running", WAIT);
    // Requests in flight are drained into the snapshot; the guest stays paused after it so the
    // disk holds exactly what the snapshot's RAM expects, then the source VM goes away.
    vm.pause().unwrap();
    let report = snapshot(&vm, &dir.join("s"), SnapshotKind::Full);
    assert_eq!(report.devices, 1);
    drop(vm);
    // Lazily: the disk's DMA into guest RAM faults pages in through the handler too.
    let out = restore(&dir.join("s"), "uffd");
    out.expect_status(0).expect_stdout("errors=0 mismatches=0 final_verify=4096/4096");
}

/// net-stream's closing counts.
fn net_stream_summary(stdout: &str) -> std::collections::BTreeMap<String, u64> {
    let line = stdout.lines().rfind(|l| l.starts_with("net-stream: sent=")).unwrap_or_default();
    line.trim_start_matches("net-stream: ")
        .split(' ')
        .filter_map(|kv| Some((kv.split_once('=')?.0.to_string(), kv.split_once('=')?.1.parse().ok()?)))
        .collect()
}

#[test]
fn net_stream_goes_on_after_restore() {
    let dir = TempDir::new("snap-net");
    let socket = dir.join("echo.sock");
    let _echo = common::peers::DatagramEcho::start(&socket);
    let mut config = microguest("prog=net-stream until_input=1 size=256 window=32 timeout_ms=300 progress_ms=0", 1);
    config.nets = vec![serde_json::from_value(json!({ "unix": socket, "mac": "52:54:00:5a:b0:02" })).unwrap()];
    let (vm, serial) = boot(config);
    serial.wait_for("net-stream: running", WAIT);
    std::thread::sleep(Duration::from_millis(200));
    vm.pause().unwrap();
    snapshot(&vm, &dir.join("s"), SnapshotKind::Full);
    drop(vm);
    // The restored NIC reconnects to the same echo peer; frames that were on the wire at the
    // snapshot are lost (as on a real network), none may come back twice or corrupt.
    let out = restore(&dir.join("s"), "uffd");
    out.expect_status(0);
    let counts = net_stream_summary(&out.stdout);
    assert_eq!((counts.get("duplicated"), counts.get("corrupt")), (Some(&0), Some(&0)), "{}", out.stdout);
    let (sent, received, lost) = (counts["sent"], counts["received"], counts["lost"]);
    assert!(received > 0 && sent == received + lost, "{}", out.stdout);
    assert!(lost <= 32, "at most a window of frames is lost: {}", out.stdout);
}

/// A disk live-migrated to another image before the snapshot: the restore opens the image the
/// disk was served from at the snapshot (the original is gone), and blk-stress finds every
/// block it wrote.
#[test]
fn a_vm_whose_disk_was_migrated_restores_on_the_new_image() {
    let dir = TempDir::new("snap-migrated");
    let (old, new) = (dir.join("old.img"), dir.join("new.img"));
    for image in [&old, &new] {
        std::fs::File::create(image).unwrap().set_len(16 << 20).unwrap();
    }
    let mut config = microguest("prog=blk-stress blocks=4096 qd=16 until_input=1 progress_ms=0", 1);
    config.disks = vec![serde_json::from_value(json!({ "path": old, "engine": "io_uring" })).unwrap()];
    let (vm, serial) = boot(config);
    serial.wait_for("blk-stress: running", WAIT);
    let request = serde_json::from_value(json!({ "backend": { "path": new, "engine": "sync" }, "mode": "migrate" }));
    let swap = vm.swap_device("disk0", request.unwrap()).unwrap();
    let record = swap.wait(WAIT);
    assert_eq!(record.state, vmm::swap::SwapState::Committed, "{record:?}");
    vm.pause().unwrap();
    snapshot(&vm, &dir.join("s"), SnapshotKind::Full);
    drop(vm);
    std::fs::remove_file(&old).unwrap();
    let state: VmSnapshot = format::read_state(&dir.join("s").join("state")).unwrap();
    assert_eq!(state.config.disks[0].path.as_deref(), Some(new.as_path()), "{:?}", state.config.disks);
    let out = restore(&dir.join("s"), "eager");
    out.expect_status(0).expect_stdout("errors=0 mismatches=0 final_verify=4096/4096");
}

#[test]
fn a_vm_whose_ram_backing_was_swapped_snapshots_and_restores() {
    let dir = TempDir::new("snap-swapped");
    let (vm, serial) = boot(microguest("prog=memtouch mib=8 verify_until_input=1", 1));
    serial.wait_for("memtouch: pass 1 ok", WAIT);
    let swap = MemorySwapRequest { backing: RamBacking::Memfd, verify: false, drain_timeout_ms: 2000 };
    vm.swap_memory(0, &swap).unwrap();
    // The swap re-created the memory slot without a dirty log: no diff until a full one.
    let diff = vm.snapshot(&SnapshotRequest { path: dir.join("d"), kind: SnapshotKind::Diff, drain_timeout_ms: 2000 });
    assert!(diff.unwrap_err().to_string().contains("needs a parent"));
    snapshot(&vm, &dir.join("s"), SnapshotKind::Full);
    snapshot(&vm, &dir.join("s2"), SnapshotKind::Diff);
    drop(vm);
    for snapshot in ["s", "s2"] {
        restore(&dir.join(snapshot), "eager").expect_status(0).expect_stdout("written and verified");
    }
}

/// A snapshot directory copied from `from` with `edit` applied to its state file's bytes.
fn tampered(from: &Path, to: &Path, edit: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    std::fs::create_dir_all(to).unwrap();
    let mut state = std::fs::read(from.join("state")).unwrap();
    edit(&mut state);
    std::fs::write(to.join("state"), state).unwrap();
    std::fs::copy(from.join("memory"), to.join("memory")).unwrap();
    to.to_path_buf()
}

#[test]
fn bad_snapshots_are_refused_with_the_reason() {
    let dir = TempDir::new("snap-bad");
    let (vm, serial) = boot(microguest("prog=idle", 1));
    serial.wait_for("idle: ready", WAIT);
    // Refused before anything is written.
    let no_parent =
        vm.snapshot(&SnapshotRequest { path: dir.join("d"), kind: SnapshotKind::Diff, drain_timeout_ms: 1 });
    assert!(no_parent.unwrap_err().to_string().contains("take a full snapshot first"));
    assert!(!dir.join("d").join("state").exists());
    let good = dir.join("good");
    snapshot(&vm, &good, SnapshotKind::Full);
    let not_empty = vm.snapshot(&SnapshotRequest { path: good.clone(), kind: SnapshotKind::Full, drain_timeout_ms: 1 });
    assert!(not_empty.unwrap_err().to_string().contains("not empty"));
    let child = dir.join("child");
    snapshot(&vm, &child, SnapshotKind::Diff);
    let other = dir.join("other");
    snapshot(&vm, &other, SnapshotKind::Full);
    drop(vm);

    let cases: Vec<(&str, PathBuf)> = vec![
        ("is corrupted", tampered(&good, &dir.join("flipped"), |s| *s.last_mut().unwrap() ^= 1)),
        ("is truncated", tampered(&good, &dir.join("short"), |s| s.truncate(s.len() / 2))),
        ("is truncated", tampered(&good, &dir.join("tiny"), |s| s.truncate(5))),
        ("format version 7", tampered(&good, &dir.join("version"), |s| s[8] = 7)),
        ("not a snapshot state file", tampered(&good, &dir.join("garbage"), |s| s[0] = b'X')),
        ("No such file", dir.join("missing")),
    ];
    for (reason, path) in &cases {
        let out = common::vmm(&["run", "--restore", path.to_str().unwrap()]);
        out.expect_status(2).expect_one_line_error(reason);
    }
    // The memory file is shorter than the RAM the state describes.
    let short_memory = tampered(&good, &dir.join("short-memory"), |_| {});
    std::fs::File::options().write(true).open(short_memory.join("memory")).unwrap().set_len(4096).unwrap();
    common::vmm(&["run", "--restore", short_memory.to_str().unwrap()])
        .expect_status(2)
        .expect_one_line_error("is truncated");
    // Diffs whose state is consistent on the surface but not inside: a parent chain that
    // loops, a page map shorter than the region.
    let edited = |name: &str, edit: &dyn Fn(&mut VmSnapshot, &Path)| {
        let to = dir.join(name);
        std::fs::create_dir_all(&to).unwrap();
        std::fs::copy(child.join("memory"), to.join("memory")).unwrap();
        let mut state: VmSnapshot = format::read_state(&child.join("state")).unwrap();
        edit(&mut state, &to);
        format::write_state(&to.join("state"), &state).unwrap();
        to
    };
    let looping = edited("loop", &|state, to| {
        state.parent = Some(ParentRef { id: state.id, path: to.to_path_buf() });
    });
    let short_map = edited("short-map", &|state, _| {
        state.regions[0].dirty.as_mut().unwrap().pop();
    });
    for (reason, path) in [("loop back", &looping), ("page map has", &short_map)] {
        let out = common::vmm(&["run", "--restore", path.to_str().unwrap()]);
        out.expect_status(2).expect_one_line_error(reason);
    }
    // The child's parent replaced by another snapshot: refused, naming both.
    std::fs::copy(other.join("state"), good.join("state")).unwrap();
    common::vmm(&["run", "--restore", child.to_str().unwrap()])
        .expect_status(2)
        .expect_one_line_error("was it replaced?");
    // Only --serial, --api-sock and --memory go with --restore.
    let out = common::vmm(&["run", "--restore", child.to_str().unwrap(), "--vcpus", "2"]);
    assert_eq!(out.status, Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("cannot be used with"), "{}", out.stderr);
}
