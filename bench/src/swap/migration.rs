//! Table 2: live storage migration while blk-stress writes over the whole disk. Ours: a swap
//! in mode "migrate" from a sync file to another file (a mirror copies while the guest runs,
//! then a short blackout copies what is still dirty). QEMU: `drive-mirror` (sync full, raw, to
//! a new file) until BLOCK_JOB_READY, then `block-job-complete` until BLOCK_JOB_COMPLETED.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{ApiGuest, GUEST_TIMEOUT, GuestEnd, TempDir, median, report_failures, wait_exit};
use crate::qmp::Qmp;
use crate::{GuestProcess, Samples, Table, qemu_args};

/// Migrations per disk size and VMM.
pub const MIGRATIONS: usize = 3;
pub const SIZES_MIB: [u64; 2] = [64, 256];
const MEM_MIB: u64 = 128;
const JOB_TIMEOUT: Duration = Duration::from_secs(120);
/// QEMU's CPU model exposing the TSC frequency, as in the virtio benchmark.
const QEMU_CPU: &str = "host,-arch-capabilities,+invtsc,vmware-cpuid-freq=on";

/// One migration, from either VMM.
#[derive(Default)]
struct Run {
    /// Bulk copy throughput in MiB/s.
    mib_s: Option<f64>,
    bytes_copied: Option<u64>,
    final_copy_bytes: Option<u64>,
    blackout_us: Option<f64>,
    /// Ours: from the end of the bulk copy (final quiesce) to commit. QEMU: block-job-complete
    /// to BLOCK_JOB_COMPLETED.
    switch_over_ms: Option<f64>,
    /// Request to the end.
    total_ms: Option<f64>,
}

pub struct Row {
    size_mib: u64,
    vmm: &'static str,
    runs: Vec<Run>,
    committed: usize,
    failures: Vec<String>,
    guest: GuestEnd,
}

fn blk_stress(size_mib: u64, seed: u64) -> String {
    format!("prog=blk-stress qd=16 blocks={} until_input=1 seed={seed} progress_ms=0", size_mib * 256)
}

/// Ours: `MIGRATIONS` migrations between two files, back and forth.
fn ours(vmm: &Path, kernel: &Path, size_mib: u64) -> Row {
    eprintln!("migration: ours, {size_mib} MiB disk, {MIGRATIONS} migrations under blk-stress...");
    let dir = TempDir::new("migrate");
    let files = [dir.image("a.img", size_mib << 20), dir.image("b.img", size_mib << 20)];
    let mut row =
        Row { size_mib, vmm: "vmm (ours)", runs: vec![], committed: 0, failures: vec![], guest: GuestEnd::default() };
    let devices = ["--disk".to_string(), format!("path={},engine=sync", files[0].display())];
    let cmdline = blk_stress(size_mib, 21 + size_mib);
    let mut guest =
        match ApiGuest::start(vmm, kernel, &cmdline, MEM_MIB, &devices, &dir.join("api.sock"), "blk-stress: running") {
            Ok(g) => g,
            Err(e) => {
                row.failures.push(e);
                return row;
            }
        };
    let mut on = 0;
    for _ in 0..MIGRATIONS {
        let request = json!({
            "backend": { "path": files[1 - on], "engine": "sync" },
            "mode": "migrate",
            "verify": super::devices::verify_policy(),
        });
        match guest.swap_device("disk0", &request) {
            Ok(record) if record["state"] == "committed" => {
                row.runs.push(our_run(&record));
                row.committed += 1;
                on = 1 - on;
            }
            Ok(record) => {
                row.runs.push(our_run(&record));
                row.failures.push(format!("{}: {}", record["state"], record["reason"]));
            }
            Err(e) => row.failures.push(e),
        }
        if guest.broken() {
            break;
        }
    }
    row.guest = guest.stop("blk-stress: ops=", GUEST_TIMEOUT);
    row
}

fn our_run(record: &Value) -> Run {
    let copy = &record["copy"];
    let bytes_copied = copy["bytes_copied"].as_u64();
    let copy_us = copy["copy_us"].as_f64().filter(|&us| us > 0.0);
    let mib_s = bytes_copied.zip(copy_us).map(|(b, us)| b as f64 / (1u64 << 20) as f64 / (us / 1e6));
    let total_us = record["duration_us"].as_f64();
    // The second quiesce of the timeline is the one before the final copy.
    let final_quiesce = record["timeline"]
        .as_array()
        .and_then(|t| t.iter().filter(|e| e["phase"] == "quiesce").nth(1))
        .and_then(|e| e["at_us"].as_f64());
    Run {
        mib_s,
        bytes_copied,
        final_copy_bytes: copy["final_copy_bytes"].as_u64(),
        blackout_us: record["blackout_us"].as_f64(),
        switch_over_ms: total_us.zip(final_quiesce).map(|(t, q)| (t - q) / 1e3),
        total_ms: total_us.map(|us| us / 1e3),
    }
}

/// QEMU: `MIGRATIONS` drive-mirror jobs, each to a new file.
fn qemu(qemu: &Path, kernel: &Path, size_mib: u64) -> Row {
    eprintln!("migration: QEMU, {size_mib} MiB disk, {MIGRATIONS} drive-mirror jobs under blk-stress...");
    let dir = TempDir::new("mirror");
    let image = dir.image("a.img", size_mib << 20);
    let mut row = Row {
        size_mib,
        vmm: "QEMU drive-mirror",
        runs: vec![],
        committed: 0,
        failures: vec![],
        guest: GuestEnd::default(),
    };
    let socket = dir.join("qmp.sock");
    let mut args = qemu_args(kernel, &blk_stress(size_mib, 21 + size_mib), MEM_MIB, 1);
    args.extend(["-cpu".into(), QEMU_CPU.into(), "-global".into(), "virtio-mmio.force-legacy=false".into()]);
    args.extend(["-drive".into(), format!("file={},format=raw,if=none,id=d0,aio=threads", image.display())]);
    args.extend(["-device".into(), "virtio-blk-device,drive=d0".into()]);
    args.extend(["-qmp".into(), format!("unix:{},server=on,wait=off", socket.display())]);
    let mut process = GuestProcess::spawn(qemu, &args);
    if process.find_line("blk-stress: running", GUEST_TIMEOUT).is_none() {
        row.failures.push(format!("QEMU's guest did not start:\n{}", process.transcript()));
        return row;
    }
    match Qmp::connect(&socket, Duration::from_secs(10)) {
        Ok(mut qmp) => {
            for i in 0..MIGRATIONS {
                match mirror(&mut qmp, &dir.join(&format!("mirror-{i}.img"))) {
                    Ok(run) => {
                        row.runs.push(run);
                        row.committed += 1;
                    }
                    Err(e) => {
                        row.failures.push(e);
                        break;
                    }
                }
            }
        }
        Err(e) => row.failures.push(e),
    }
    process.send(b"q");
    let summary = process.find_line("blk-stress: ops=", GUEST_TIMEOUT).map(|(_, l)| l.trim().to_string());
    let exit = wait_exit(&mut process, Duration::from_secs(10));
    // QEMU's isa-debug-exit reports (status << 1) | 1.
    let success = guest_agent::protocol::qemu_exit_status(guest_agent::protocol::status::SUCCESS);
    row.guest =
        GuestEnd { summary, exit: exit.map(|c| if c == success { 0 } else { c }), transcript: process.transcript() };
    row
}

/// One drive-mirror job to `target`, completed once READY.
fn mirror(qmp: &mut Qmp, target: &Path) -> Result<Run, String> {
    let args = json!({
        "device": "d0", "target": target, "sync": "full", "format": "raw", "mode": "absolute-paths",
    });
    let started = Instant::now();
    qmp.execute("drive-mirror", args, JOB_TIMEOUT)?;
    let (ready_at, ready) = qmp.wait_event("BLOCK_JOB_READY", JOB_TIMEOUT)?;
    let ready_len = ready["len"].as_u64().unwrap_or(0);
    let completing = Instant::now();
    qmp.execute("block-job-complete", json!({ "device": "d0" }), JOB_TIMEOUT)?;
    let (done_at, done) = qmp.wait_event("BLOCK_JOB_COMPLETED", JOB_TIMEOUT)?;
    if let Some(error) = done.get("error") {
        return Err(format!("drive-mirror failed: {error}"));
    }
    let len = done["len"].as_u64().unwrap_or(ready_len);
    let secs = (ready_at - started).as_secs_f64();
    Ok(Run {
        mib_s: (secs > 0.0).then(|| ready_len as f64 / (1u64 << 20) as f64 / secs),
        bytes_copied: Some(len),
        final_copy_bytes: Some(len.saturating_sub(ready_len)),
        blackout_us: None,
        switch_over_ms: Some((done_at - completing).as_secs_f64() * 1e3),
        total_ms: Some((done_at - started).as_secs_f64() * 1e3),
    })
}

pub fn run(vmm: &Path, kernel: &Path, qemu_bin: Option<&Path>) -> Vec<Row> {
    let mut rows = Vec::new();
    for size in SIZES_MIB {
        rows.push(ours(vmm, kernel, size));
        if let Some(q) = qemu_bin {
            rows.push(qemu(q, kernel, size));
        }
    }
    for row in &rows {
        report_failures(&format!("{} {} MiB", row.vmm, row.size_mib), &row.failures);
        if row.guest.summary.is_none() || row.guest.exit != Some(0) {
            eprintln!("  {} {} MiB: guest exit {:?}:\n{}", row.vmm, row.size_mib, row.guest.exit, row.guest.transcript);
        }
    }
    rows
}

fn values(runs: &[Run], f: impl Fn(&Run) -> Option<f64>) -> Vec<f64> {
    runs.iter().filter_map(f).collect()
}

pub fn print(rows: &[Row], qemu_ran: bool) {
    println!(
        "\nLive storage migration under blk-stress (qd 16, random 4 KiB over the whole disk), {MIGRATIONS} per row\n"
    );
    let mut t = Table::new(&[
        "disk",
        "VMM",
        "committed",
        "copy MiB/s (median)",
        "bytes copied / disk size (median)",
        "final copy KiB (median; QEMU: after READY)",
        "blackout p50 / max (us)",
        "switch-over p50 (ms)",
        "total p50 (ms)",
        "guest IOPS during the migrations",
        "guest errors",
        "guest mismatches",
    ]);
    for row in rows {
        let size = (row.size_mib << 20) as f64;
        let blackout = values(&row.runs, |r| r.blackout_us);
        let blackout = if blackout.is_empty() {
            "n/a".to_string()
        } else {
            let s = Samples::new(blackout);
            format!("{:.0} / {:.0}", s.median(), s.pct(100.0))
        };
        t.row(vec![
            format!("{} MiB", row.size_mib),
            row.vmm.into(),
            format!("{}/{MIGRATIONS}", row.committed),
            median(&values(&row.runs, |r| r.mib_s), 0),
            median(&values(&row.runs, |r| r.bytes_copied.map(|b| b as f64 / size)), 2),
            median(&values(&row.runs, |r| r.final_copy_bytes.map(|b| b as f64 / 1024.0)), 0),
            blackout,
            median(&values(&row.runs, |r| r.switch_over_ms), 1),
            median(&values(&row.runs, |r| r.total_ms), 0),
            row.guest.blk_iops().map_or("?".into(), |n| n.to_string()),
            row.guest.cell("errors"),
            row.guest.cell("mismatches"),
        ]);
    }
    t.print();
    println!(
        "\nOurs: a swap in mode \"migrate\" from a sync-engine file to another file (and back); copy MiB/s is\n\
         bytes_copied / copy_us of the swap record, bytes copied include chunks copied again after guest\n\
         writes, the final copy is what was still dirty at the switch (copied during the blackout), the\n\
         blackout sums the swap's quiesce-to-resume windows (mirror install, final copy, commit), and the\n\
         switch-over runs from the final quiesce to the commit. QEMU: drive-mirror (sync full, raw, new\n\
         file), copy MiB/s is the job's len at BLOCK_JOB_READY over the time from drive-mirror to READY,\n\
         bytes copied is len at BLOCK_JOB_COMPLETED, its final copy is len COMPLETED - len READY (writes\n\
         mirrored while the job completes, in QEMU's 64 KiB granules), and the\n\
         switch-over runs from block-job-complete to BLOCK_JOB_COMPLETED; QEMU reports no blackout.\n\
         Ours mirrors guest writes to the target while copying (as QEMU's copy-mode=write-blocking), so\n\
         the copy converges whatever the write rate and switches with nothing dirty (\"converge_chunks\": 0,\n\
         the default); the guest's writes run at the slower file's pace meanwhile. Guest IOPS are\n\
         blk-stress's own rate over its random phase, which spans the migrations back to back."
    );
    if !qemu_ran {
        println!("Note: QEMU could not be run here: no QEMU rows.");
    }
}
