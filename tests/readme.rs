//! The README's quick-start, pasted into an interactive shell as a new user would: it must
//! show a live swap and a live migration under load, then stop the guest cleanly.

mod common;

use std::path::Path;
use std::time::Duration;

use common::TempDir;
use common::pty::Pty;

const WAIT: Duration = Duration::from_secs(300);

/// The shell block of the README section `heading` that comes after the line `after`.
fn readme_block(heading: &str, after: &str) -> String {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).unwrap();
    let section = readme.split(heading).nth(1).unwrap_or_else(|| panic!("README has no {heading:?}"));
    let rest = section.split(after).nth(1).unwrap_or_else(|| panic!("README's {heading:?} lacks {after:?}"));
    let block = rest.split("```sh\n").nth(1).and_then(|b| b.split("```").next()).expect("a sh block");
    block.to_string()
}

#[test]
fn the_quick_start_works_as_pasted_into_an_interactive_shell() {
    let dir = TempDir::new("readme");
    // The README's /tmp paths, made private to this test.
    let private = format!("{}/", dir.path().display());
    let block = readme_block("## Live swap in three commands", "Start a guest").replace("/tmp/", &private);
    let bin_dir = Path::new(common::vmm_bin()).parent().unwrap();

    let mut pty = Pty::new();
    let mut shell = std::process::Command::new("bash");
    shell
        .args(["--norc", "--noprofile", "-i"])
        .env("PATH", format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default()))
        .env("PS1", "$ ")
        .current_dir(dir.path());
    let mut child = pty.spawn(shell);
    let _watchdog = common::peers::Watchdog::kill_after(child.0.id(), WAIT);
    pty.write(block.as_bytes());
    // The terminal echoes what is typed: the marker shows only once the shell computes it.
    pty.write(b"echo \"quick-start-$((40 + 2))\"; exit\n");
    let shown = pty.wait_for("quick-start-42", WAIT);
    child.0.wait().unwrap();
    eprintln!("--- the terminal\n{shown}");

    assert!(!shown.contains("Stopped"), "a job was stopped:\n{shown}");
    assert_eq!(shown.matches("\"state\": \"committed\"").count(), 2, "both swaps commit:\n{shown}");
    assert!(shown.contains("\"mode\": \"migrate\""), "{shown}");
    let console = std::fs::read_to_string(dir.join("console.log")).unwrap();
    let summary = console.lines().rev().find(|l| l.starts_with("blk-stress: ops=")).unwrap_or_else(|| {
        panic!("blk-stress printed no summary:\n{console}\n--- terminal\n{shown}");
    });
    assert!(summary.contains("errors=0 mismatches=0 final_verify=8192/8192"), "{summary}");
    assert!(shown.contains(summary), "the README's `tail` shows the summary:\n{shown}");
    assert!(!dir.join("vm.sock").exists(), "the API socket was left behind");
}
