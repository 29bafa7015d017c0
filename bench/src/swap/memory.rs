//! Table 3: replacing the backing of a running guest's 1 GiB RAM region. The guest is idle or
//! keeps verifying a pattern over part of its RAM (memtouch) while the region goes anonymous
//! -> memfd -> file -> (hugetlbfs ->) anonymous, then once more to memfd with the VMM's own
//! comparison of old and new contents. memtouch must find its pattern intact afterwards.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{ApiGuest, TempDir};
use crate::Table;

const MEM_MIB: u64 = 1024;
/// MiB the guest writes and keeps verifying; 0 runs the idle program instead.
pub const TOUCHED_MIB: [u64; 3] = [0, 256, 768];
const TWO_MIB_PAGES_NEEDED: u64 = MEM_MIB / 2;

struct Swap {
    from: String,
    to: String,
    report: Result<Value, String>,
}

pub struct GuestRun {
    touched_mib: u64,
    slot: Option<u64>,
    swaps: Vec<Swap>,
    /// The guest's verdict after the swaps: Ok(last line) or Err(what went wrong).
    check: Result<String, String>,
}

pub struct Results {
    runs: Vec<GuestRun>,
    hugetlbfs: Result<(), String>,
}

/// Whether the kernel's huge page pool can hold the whole region.
fn hugepages_available() -> Result<(), String> {
    let configured = std::fs::read_to_string("/proc/sys/vm/nr_hugepages").unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let free = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("HugePages_Free:"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    if free >= TWO_MIB_PAGES_NEEDED {
        Ok(())
    } else {
        Err(format!(
            "hugetlbfs skipped: vm.nr_hugepages is {} with {free} free 2 MiB pages, {TWO_MIB_PAGES_NEEDED} needed \
             (sysctl vm.nr_hugepages={TWO_MIB_PAGES_NEEDED} enables it)",
            configured.trim()
        ))
    }
}

/// The RAM region at guest address 0 (slot 0, below the MMIO gap).
fn low_region(guest: &mut ApiGuest) -> Result<(u64, u64), String> {
    let regions = guest.get("/memory/regions")?;
    regions
        .as_array()
        .and_then(|r| r.iter().find(|r| r["guest_addr"] == 0))
        .and_then(|r| Some((r["slot"].as_u64()?, r["size"].as_u64()?)))
        .ok_or_else(|| format!("no region at guest address 0: {regions}"))
}

fn guest_run(vmm: &Path, kernel: &Path, dir: &TempDir, touched_mib: u64, huge: bool) -> GuestRun {
    eprintln!("memory: {MEM_MIB} MiB guest, {touched_mib} MiB touched, swapping the region's backing...");
    let mut run = GuestRun { touched_mib, slot: None, swaps: vec![], check: Err("not run".into()) };
    let (cmdline, ready) = match touched_mib {
        0 => ("prog=idle".to_string(), "idle: ready"),
        n => (format!("prog=memtouch mib={n} verify_until_input=1"), "verifying until a byte arrives"),
    };
    let socket = dir.join(&format!("api-{touched_mib}.sock"));
    let mut guest = match ApiGuest::start(vmm, kernel, &cmdline, MEM_MIB, &[], &socket, ready) {
        Ok(g) => g,
        Err(e) => {
            run.check = Err(e);
            return run;
        }
    };
    let (slot, size) = match low_region(&mut guest) {
        Ok(r) => r,
        Err(e) => {
            run.check = Err(e);
            return run;
        }
    };
    run.slot = Some(slot);
    if size != MEM_MIB << 20 {
        eprintln!("  note: region {slot} is {} MiB, not {MEM_MIB}", size >> 20);
    }
    let file = dir.join(&format!("ram-{touched_mib}.bin"));
    let mut cycle = vec![("memfd", json!({"kind": "memfd"})), ("file", json!({"kind": "file", "path": file}))];
    if huge {
        cycle.push(("hugetlbfs", json!({"kind": "hugetlbfs"})));
    }
    cycle.push(("anonymous", json!({"kind": "anonymous"})));
    let mut plan: Vec<(&str, Value, bool)> = cycle.into_iter().map(|(n, b)| (n, b, false)).collect();
    plan.push(("memfd", json!({"kind": "memfd"}), true));
    let mut from = "anonymous";
    let mut since = Instant::now();
    for (to, backing, verify) in plan {
        if touched_mib > 0 && !settle(&guest, since) {
            eprintln!("  memtouch stopped passing; no more swaps");
            break;
        }
        let report = guest.swap_memory(slot, &json!({ "backing": backing, "verify": verify }));
        if let Err(e) = &report {
            eprintln!("  {from} -> {to}: {e}");
        }
        since = Instant::now();
        let done = report.is_ok();
        run.swaps.push(Swap { from: from.into(), to: to.into(), report });
        if done {
            from = to;
        }
        if guest.broken() {
            break;
        }
    }
    run.check = finish(guest, touched_mib);
    run
}

/// Waits until memtouch has ended two passes after `since`, so one whole pass ran after it: the
/// guest's pages are mapped again (each swap starts from the guest's steady state) and its
/// pattern survived. False if memtouch stopped passing.
fn settle(guest: &ApiGuest, since: Instant) -> bool {
    let mut passes = 0;
    while passes < 2 {
        match guest.process.find_line("memtouch: pass", Duration::from_secs(60)) {
            Some((_, line)) if line.contains("FAILED") => return false,
            Some((at, _)) if at > since => passes += 1,
            Some(_) => {}
            None => return false,
        }
    }
    true
}

/// After the swaps: memtouch must pass twice more (see [`settle`]), then stop cleanly with no
/// FAILED line.
fn finish(guest: ApiGuest, touched_mib: u64) -> Result<String, String> {
    if touched_mib > 0 {
        settle(&guest, Instant::now());
    }
    let needle = if touched_mib > 0 { "written and verified" } else { "idle: input received" };
    let end = guest.stop(needle, Duration::from_secs(60));
    let failed: Vec<&str> = end.transcript.lines().filter(|l| l.contains("FAILED")).collect();
    match (&end.summary, end.exit, failed.is_empty()) {
        (Some(line), Some(0), true) => Ok(line.clone()),
        _ => Err(format!("exit {:?}, FAILED lines: {failed:?}\n{}", end.exit, end.transcript)),
    }
}

pub fn run(vmm: &Path, kernel: &Path) -> Results {
    let dir = TempDir::new("memory");
    let hugetlbfs = hugepages_available();
    let runs = TOUCHED_MIB.iter().map(|&mib| guest_run(vmm, kernel, &dir, mib, hugetlbfs.is_ok())).collect();
    Results { runs, hugetlbfs }
}

fn ms(report: &Value, key: &str) -> String {
    report[key].as_f64().map_or("?".into(), |us| format!("{:.1}", us / 1e3))
}

pub fn print(results: &Results) {
    let slot = results.runs.iter().find_map(|r| r.slot).map_or("?".into(), |s| s.to_string());
    println!("\nMemory region swap pause: {MEM_MIB} MiB guest, the region below the MMIO gap (slot {slot})\n");
    let mut t = Table::new(&[
        "from -> to",
        "touched MiB",
        "copied MiB",
        "pause (ms)",
        "pause per GiB (ms)",
        "copy (ms)",
        "memslot (ms)",
        "devices quiesce (ms)",
        "VMM verify",
        "guest check after the swaps",
    ]);
    for run in &results.runs {
        let guest_check = match &run.check {
            Ok(_) if run.touched_mib == 0 => "idle guest exited 0".to_string(),
            Ok(_) => "memtouch ok, no FAILED".to_string(),
            Err(e) => format!("FAILED: {}", e.lines().next().unwrap_or("")),
        };
        if run.swaps.is_empty() {
            t.row(vec!["(none)".into(), run.touched_mib.to_string(), guest_check.clone()]);
        }
        for swap in &run.swaps {
            let mut cells = vec![format!("{} -> {}", swap.from, swap.to), run.touched_mib.to_string()];
            match &swap.report {
                Ok(r) => cells.extend([
                    r["bytes_copied"].as_u64().map_or("?".into(), |b| format!("{:.1}", b as f64 / (1u64 << 20) as f64)),
                    ms(r, "pause_us"),
                    ms(r, "pause_us_per_gib"),
                    ms(r, "copy_us"),
                    ms(r, "memslot_us"),
                    ms(r, "devices_quiesce_us"),
                    if r["verified"] == true { "yes, equal" } else { "no" }.into(),
                ]),
                Err(e) => cells.extend([
                    format!("swap failed: {e}"),
                    "".into(),
                    "".into(),
                    "".into(),
                    "".into(),
                    "".into(),
                    "".into(),
                ]),
            }
            cells.push(guest_check.clone());
            t.row(cells);
        }
    }
    t.print();
    println!(
        "\nPause: vCPUs stopped (after device I/O was quiesced), from the VMM's report; it covers the scan of\n\
         populated pages, the copy of non-zero chunks (on every core), the memory slot replacement and,\n\
         with VMM verify, a comparison of old and new contents before resuming. Touched MiB is what the\n\
         guest program wrote (0: the idle program); copied MiB also counts the guest's image and tables.\n\
         memtouch keeps verifying its pattern; each swap waits until one whole pass ran after the previous\n\
         one (so the guest's pages are mapped again), and after the last swap it must pass twice more.\n\
         No peer does this: as far as we know QEMU, Cloud Hypervisor and Firecracker offer no way to\n\
         replace the backing of a running guest's RAM in place (QEMU gets there only by migrating the\n\
         whole VM to a new process, or by hot-plugging other memory), so there is no column for them."
    );
    if let Err(note) = &results.hugetlbfs {
        println!("Note: {note}.");
    }
    for run in &results.runs {
        if let Err(e) = &run.check {
            println!("Guest with {} MiB touched: {e}", run.touched_mib);
        }
    }
}
