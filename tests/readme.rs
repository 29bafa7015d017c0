//! The documentation's walkthroughs, pasted into an interactive shell as a new user would:
//! the README's quick-start and the full live-swap walkthrough in docs/live-swap.md must run
//! as written, show swaps and a live migration under load, and end the guest cleanly.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::TempDir;
use common::pty::Pty;

const WAIT: Duration = Duration::from_secs(300);

/// Held by the walkthroughs that load both CPUs (the swarm's wrk) or that judge timing (the
/// shadow's validation watches a swap for a stall of 100 ms): on this two-core host, run side
/// by side, the first starves the second's trial and fails its validation.
static CPU_HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The first shell block after the line containing `after` in `file` (relative to the
/// repository root).
fn doc_block(file: &str, after: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let rest = text.split(after).nth(1).unwrap_or_else(|| panic!("{file} lacks {after:?}"));
    let block = rest.split("```sh\n").nth(1).and_then(|b| b.split("```").next()).expect("a sh block");
    block.to_string()
}

/// Stops the walkthrough's VMM if the test fails midway: it is the shell's child, which the
/// shell's own reaping does not reach.
struct StopVmm(PathBuf);

impl Drop for StopVmm {
    fn drop(&mut self) {
        if self.0.exists() {
            let _ = common::vmm_with(
                &["ctl", "--api-sock", self.0.to_str().unwrap(), "--timeout", "2", "stop"],
                None,
                WAIT,
            );
        }
    }
}

/// Pastes `block` into `bash -i` on a terminal, in `dir`, with the `vmm` under test on PATH;
/// returns everything the terminal showed.
fn paste_into_a_shell(dir: &TempDir, block: &str) -> String {
    let bin_dir = Path::new(common::vmm_bin()).parent().unwrap();
    let mut pty = Pty::new();
    let mut shell = std::process::Command::new("bash");
    shell
        .args(["--norc", "--noprofile", "-i"])
        .env("PATH", format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default()))
        .env("PS1", "$ ")
        .env("HISTFILE", "/dev/null")
        .env_remove("VMM_API_SOCK")
        .current_dir(dir.path());
    let mut child = pty.spawn(shell);
    let _watchdog = common::peers::Watchdog::kill_after(child.0.id(), WAIT);
    pty.write(block.as_bytes());
    // The terminal echoes what is typed: the marker shows only once the shell computes it.
    pty.write(b"echo \"walkthrough-$((40 + 2))\"; exit\n");
    let shown = pty.wait_for("walkthrough-42", WAIT);
    child.0.wait().unwrap();
    eprintln!("--- the terminal\n{shown}");
    assert!(!shown.contains("Stopped"), "a job was stopped:\n{shown}");
    shown
}

/// The summary line `blk-stress` printed at the end, which must report a clean run.
fn blk_stress_summary(dir: &TempDir, shown: &str) -> String {
    blk_stress_summary_in(dir, "console.log", shown)
}

fn blk_stress_summary_in(dir: &TempDir, log: &str, shown: &str) -> String {
    let console = std::fs::read_to_string(dir.join(log)).unwrap();
    let summary = console.lines().rev().find(|l| l.starts_with("blk-stress: ops=")).unwrap_or_else(|| {
        panic!("blk-stress printed no summary:\n{console}\n--- terminal\n{shown}");
    });
    assert!(summary.contains("errors=0 mismatches=0 final_verify=8192/8192"), "{summary}");
    summary.to_string()
}

#[test]
fn the_readme_quick_start_works_as_pasted() {
    let dir = TempDir::new("readme");
    let _stop = StopVmm(dir.join("vm.sock"));
    // The README's /tmp paths, made private to this test.
    let private = format!("{}/", dir.path().display());
    let block = doc_block("README.md", "Start a guest that keeps").replace("/tmp/", &private);
    let shown = paste_into_a_shell(&dir, &block);

    assert_eq!(shown.matches("\"state\": \"committed\"").count(), 2, "both swaps commit:\n{shown}");
    assert!(shown.contains("\"mode\": \"migrate\""), "{shown}");
    assert!(shown.contains("exit status 0"), "{shown}");
    let summary = blk_stress_summary(&dir, &shown);
    assert!(shown.contains(&summary), "the README's `tail` shows the summary:\n{shown}");
    assert!(!dir.join("vm.sock").exists(), "the API socket was left behind");
}

#[test]
fn the_live_swap_walkthrough_works_as_pasted() {
    let dir = TempDir::new("walkthrough");
    let _stop = StopVmm(dir.join("vm.sock"));
    let private = format!("{}/", dir.path().display());
    let block = doc_block("docs/live-swap.md", "**From the command line**").replace("/tmp/", &private);
    let shown = paste_into_a_shell(&dir, &block);

    // Engine, NBD and migration commit; the dead backend fails, the flaky one rolls back.
    for tally in ["committed\"} 3", "failed\"} 1", "rolled_back\"} 1"] {
        assert!(shown.contains(&format!("vmm_swaps_total{{device=\"disk0\",state=\"{tally}")), "{tally}: {shown}");
    }
    assert!(shown.contains("\"verified\": true"), "the memory swap: {shown}");
    assert!(shown.contains("exit status 0"), "{shown}");
    blk_stress_summary(&dir, &shown);
}

#[test]
fn the_readme_shadow_walkthrough_works_as_pasted() {
    let _alone = CPU_HEAVY.lock().unwrap_or_else(|p| p.into_inner());
    let dir = TempDir::new("readme-shadow");
    let _stop = StopVmm(dir.join("vm.sock"));
    let _stop_shadow = StopVmm(dir.join("shadow-api.sock"));
    let private = format!("{}/", dir.path().display());
    // The quick-start's files first: this block continues it.
    let setup = doc_block("README.md", "Start a guest that keeps").lines().next().unwrap().to_string();
    let block = doc_block("README.md", "**Moving the whole VM to another process**");
    let shown = paste_into_a_shell(&dir, &format!("{setup}\n{block}").replace("/tmp/", &private));

    assert!(shown.contains("\"passed\": true"), "the validation passes:\n{shown}");
    assert!(shown.contains("\"downtime_us\""), "the switchover reports its downtime:\n{shown}");
    assert!(shown.contains("engine io_uring") || shown.contains("io_uring file"), "the update applied:\n{shown}");
    assert!(shown.contains("exit status 0"), "{shown}");
    let summary = blk_stress_summary_in(&dir, "shadow.log", &shown);
    assert!(shown.contains(&summary), "the README's `tail` shows the summary:\n{shown}");
}

#[test]
fn the_readme_swarm_walkthrough_works_as_pasted() {
    let _alone = CPU_HEAVY.lock().unwrap_or_else(|p| p.into_inner());
    let dir = TempDir::new("readme-swarm");
    let private = format!("{}/", dir.path().display());
    // A free port instead of the README's 8080, so tests and other programs do not collide.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let block = doc_block("README.md", "**A pipeline of VMs behind one HTTP port**")
        .replace("/tmp/", &private)
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"));
    let shown = paste_into_a_shell(&dir, &block);

    assert!(shown.contains("path=/hello bytes=12 fnv="), "curl's answer went through every layer:\n{shown}");
    assert!(shown.contains("Requests/sec"), "wrk ran:\n{shown}");
    assert!(!shown.contains("Non-2xx") && !shown.contains("Socket errors"), "wrk saw errors:\n{shown}");
    assert!(shown.contains("\"answered_error\": 0") && shown.contains("\"duplicates_dropped\": 0"), "{shown}");
    assert!(!dir.join("swarm.sock").exists(), "the control socket was left behind");
}
