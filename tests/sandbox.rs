//! The sandbox from outside: a `vmm run --jail` process looked at through /proc while its
//! guest keeps a disk busy, a disk swap inside the jail, one that names a host path, and a
//! clean exit that leaves nothing behind. (The seccomp filters are on in every other test of
//! the suite: they are the default.)

mod common;

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Capture, Reaped, TempDir};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(120);
/// `nobody` on Debian: an unprivileged user that owns nothing on the host.
const NOBODY: u32 = 65534;

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn call(api: &mut vmm::api::ApiClient, method: &str, target: &str, body: Option<Value>) -> (u16, Value) {
    let body = body.map(|b| b.to_string());
    let response = api.request(method, target, body.as_deref().map(str::as_bytes)).unwrap();
    let value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
    (response.status, value)
}

/// The jailed VMM: the child of the process we started (which waits outside the namespace).
fn jailed_pid(outer: u32) -> u32 {
    let children = std::fs::read_to_string(format!("/proc/{outer}/task/{outer}/children")).unwrap();
    let pids: Vec<u32> = children.split_whitespace().map(|p| p.parse().unwrap()).collect();
    assert_eq!(pids.len(), 1, "the outer process waits for exactly one: {children:?}");
    pids[0]
}

fn status_field(pid: u32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(&format!("{name}:"))).unwrap_or_else(|| panic!("no {name}"));
    line[name.len() + 1..].split_whitespace().collect::<Vec<_>>().join(" ")
}

fn image(path: &Path, bytes: u64) {
    std::fs::File::create(path).unwrap().set_len(bytes).unwrap();
    std::os::unix::fs::chown(path, Some(NOBODY), Some(NOBODY)).unwrap();
}

#[test]
fn a_jailed_vmm_serves_its_disk_swaps_inside_the_jail_and_cannot_reach_the_host() {
    if !is_root() {
        eprintln!("SKIPPED: --jail needs root (to create namespaces and change user); this test did not run");
        return;
    }
    let dir = TempDir::new("jail");
    let jail = dir.join("jail");
    std::fs::create_dir(&jail).unwrap();
    std::os::unix::fs::chown(&jail, Some(NOBODY), Some(NOBODY)).unwrap();
    image(&jail.join("disk.img"), 16 << 20);
    image(&jail.join("target.img"), 16 << 20);
    // A host file the jailed VMM must not be able to name.
    let outside = dir.join("outside.img");
    image(&outside, 16 << 20);

    let mut cmd = Command::new(common::vmm_bin());
    cmd.args(["run", "--jail"])
        .arg(&jail)
        .args(["--uid", &NOBODY.to_string(), "--gid", &NOBODY.to_string()])
        .args(["--kernel", common::microguest()])
        .args(["--cmdline", "prog=blk-stress blocks=4096 qd=16 until_input=1 seed=7 progress_ms=0"])
        .args(["--disk", &format!("path={}", jail.join("disk.img").display())])
        .args(["--api-sock", &jail.join("api.sock").display().to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = Reaped(cmd.spawn().unwrap());
    let serial = Capture::default();
    let mut stdout = child.0.stdout.take().unwrap();
    let mut sink = serial.clone();
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut sink));
    let mut stderr_pipe = child.0.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr_pipe.read_to_string(&mut text);
        text
    });
    serial.wait_for("blk-stress: running", WAIT);

    // What the kernel says about the jailed process.
    let pid = jailed_pid(child.0.id());
    let ids = format!("{NOBODY} {NOBODY} {NOBODY} {NOBODY}");
    assert_eq!(status_field(pid, "Uid"), ids, "real, effective, saved and file-system user");
    assert_eq!(status_field(pid, "Gid"), ids);
    assert_eq!(status_field(pid, "Groups"), "", "no supplementary groups");
    assert_eq!(status_field(pid, "CapEff"), "0000000000000000", "no capabilities");
    assert_eq!(status_field(pid, "Seccomp"), "2", "filtered (mode 2)");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    assert_eq!(status_field(pid, "NSpid").split(' ').nth(1), Some("1"), "PID 1 of its own namespace");
    for ns in ["mnt", "pid", "ipc", "uts"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(theirs, ours, "{ns} namespace");
    }
    // Its / is the jail: what it sees at its root is exactly the jail's files (readlink of
    // /proc/PID/root shows "/" from another mount namespace, so the contents are compared).
    let listing = |dir: &Path| {
        let mut names: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        names
    };
    assert_eq!(listing(Path::new(&format!("/proc/{pid}/root"))), listing(&jail), "its / is the jail");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let core = limits.lines().find(|l| l.starts_with("Max core file size")).unwrap();
    assert!(core.split_whitespace().nth(4) == Some("0"), "no core files of guest memory: {core}");
    let socket = std::fs::metadata(jail.join("api.sock")).unwrap();
    assert_eq!((socket.uid(), socket.mode() & 0o777), (NOBODY, 0o600), "the API socket is the jailed user's");

    let mut api = vmm::api::ApiClient::connect(&jail.join("api.sock"), WAIT).unwrap();
    // A host path means nothing inside the jail: the swap fails and the disk stays as it was.
    let (status, refused) = call(
        &mut api,
        "POST",
        "/devices/disk0/swap",
        Some(json!({"backend": {"path": outside, "engine": "sync"}, "mode": "migrate"})),
    );
    let failed = match status {
        202 => call(&mut api, "GET", &format!("/swaps/{}?wait_ms=30000", refused["id"]), None).1,
        _ => refused,
    };
    assert!(failed.to_string().contains("No such file"), "a host path inside the jail: {failed:#}");
    let (_, disk) = call(&mut api, "GET", "/devices/disk0", None);
    assert!(disk["backend"].as_str().unwrap().contains("disk.img"), "{disk:#}");

    // A live migration to an image inside the jail, named as the VMM sees it.
    let swap = json!({
        "backend": {"path": "/target.img", "engine": "sync"},
        "mode": "migrate",
        "verify": {"window_ms": 20000, "min_requests": 64},
    });
    let (status, record) = call(&mut api, "POST", "/devices/disk0/swap", Some(swap));
    assert_eq!(status, 202, "{record:#}");
    let (_, done) = call(&mut api, "GET", &format!("/swaps/{}?wait_ms=60000", record["id"]), None);
    assert_eq!(done["state"], "committed", "{done:#}");
    let (_, disk) = call(&mut api, "GET", "/devices/disk0", None);
    assert!(disk["backend"].as_str().unwrap().contains("target.img"), "{disk:#}");

    let (status, _) = call(&mut api, "POST", "/serial/input", Some(json!({"data": "q"})));
    assert_eq!(status, 200);
    let exit = child.0.wait().unwrap();
    let stderr = stderr.join().unwrap();
    let text = serial.text();
    assert_eq!(exit.code(), Some(0), "{text}\n{stderr}");
    let summary = text.lines().find(|l| l.starts_with("blk-stress: ops=")).unwrap_or_else(|| panic!("{text}"));
    assert!(summary.contains(" errors=0 ") && summary.contains(" mismatches=0 "), "{summary}");
    assert!(!jail.join("api.sock").exists(), "the jailed VMM removed its socket");
    assert!(!stderr.contains("seccomp"), "{stderr}");
}

#[test]
fn jail_flags_are_checked_before_anything_starts() {
    let dir = TempDir::new("jail-flags");
    let out = common::vmm(&["run", "--kernel", common::microguest(), "--jail", dir.path().to_str().unwrap()]);
    out.expect_usage_error("required arguments were not provided");
    assert!(out.stderr.contains("--uid <N>") && out.stderr.contains("--gid <N>"), "{}", out.stderr);
    if !is_root() {
        eprintln!("SKIPPED (in part): the root-only refusals need root");
        return;
    }
    let jail = dir.path().to_str().unwrap();
    common::run_microguest("prog=hello", &["--jail", jail, "--uid", "0", "--gid", "0"])
        .expect_status(2)
        .expect_one_line_error("--uid 0 would keep root");
    common::run_microguest("prog=hello", &["--jail", "/no/such/jail", "--uid", "1", "--gid", "1"])
        .expect_status(2)
        .expect_one_line_error("jail directory /no/such/jail");
    let api = dir.join("elsewhere.sock");
    let inner = dir.join("inner");
    std::fs::create_dir(&inner).unwrap();
    common::run_microguest(
        "prog=hello",
        &["--jail", inner.to_str().unwrap(), "--uid", "1", "--gid", "1", "--api-sock", api.to_str().unwrap()],
    )
    .expect_status(2)
    .expect_one_line_error("outside the jail");
}

#[test]
fn a_jailed_vmm_stops_on_sigterm_even_while_it_starts_and_leaves_nothing() {
    if !is_root() {
        eprintln!("SKIPPED: --jail needs root; this test did not run");
        return;
    }
    let dir = TempDir::new("jail-term");
    let jail = dir.join("jail");
    std::fs::create_dir(&jail).unwrap();
    std::os::unix::fs::chown(&jail, Some(NOBODY), Some(NOBODY)).unwrap();
    for early in [true, false] {
        let mut cmd = Command::new(common::vmm_bin());
        cmd.args(["run", "--jail"])
            .arg(&jail)
            .args(["--uid", &NOBODY.to_string(), "--gid", &NOBODY.to_string()])
            .args(["--kernel", common::microguest(), "--cmdline", "prog=idle", "--serial", "none"])
            .args(["--api-sock", "api.sock"])
            .stdin(Stdio::null());
        let mut child = Reaped(cmd.spawn().unwrap());
        // A hang fails the test instead of stalling the suite.
        let _watchdog = common::peers::Watchdog::kill_after(child.0.id(), WAIT);
        if !early {
            vmm::api::ApiClient::connect_within(&jail.join("api.sock"), WAIT, WAIT).expect("the VM is up");
        }
        // Early: the signal lands while the VMM is still being built (its handlers may not
        // exist yet), and must not be lost by PID 1 of the new namespace.
        // SAFETY: signals our own child (the process waiting outside the namespace).
        unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
        let status = child.0.wait().unwrap();
        // Early enough, the signal ends the process before it installed anything (as it
        // would any program); later, the VMM stops the guest and exits 143. Never a hang
        // (the watchdog's SIGKILL), never a leftover file.
        use std::os::unix::process::ExitStatusExt;
        let stopped = status.code() == Some(128 + libc::SIGTERM) || status.signal() == Some(libc::SIGTERM);
        assert!(stopped, "early={early}: {status:?}");
        if !early {
            assert_eq!(status.code(), Some(128 + libc::SIGTERM));
        }
        let left: Vec<_> = std::fs::read_dir(&jail).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(left.is_empty(), "early={early}: left behind {left:?}");
    }
}
