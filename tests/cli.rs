//! Bad input of every kind gets one line on stderr and a non-zero exit, never a panic.

mod common;

use common::{TempDir, microguest, vmm, write_raw_elf};

#[test]
fn no_subcommand_prints_usage() {
    let out = vmm(&[]);
    assert_eq!(out.status, Some(2));
    assert!(out.stderr.contains("Usage"), "{}", out.stderr);
}

#[test]
fn missing_kernel_flag() {
    vmm(&["run"]).expect_status(2).expect_one_line_error("no kernel given");
}

#[test]
fn kernel_file_does_not_exist() {
    vmm(&["run", "--kernel", "/nonexistent/vmlinux"])
        .expect_status(2)
        .expect_one_line_error("kernel /nonexistent/vmlinux does not exist");
}

#[test]
fn kernel_is_a_directory() {
    let dir = TempDir::new("kernel-dir");
    vmm(&["run", "--kernel", dir.path().to_str().unwrap()])
        .expect_status(2)
        .expect_one_line_error("is not a regular file");
}

#[test]
fn kernel_is_not_a_kernel() {
    let dir = TempDir::new("not-kernel");
    let junk = dir.join("junk");
    std::fs::write(&junk, "this is not a kernel image, just some text that is long enough to be read\n".repeat(20))
        .unwrap();
    vmm(&["run", "--kernel", junk.to_str().unwrap()])
        .expect_status(2)
        .expect_one_line_error("neither an ELF (vmlinux) nor a bzImage");
    let empty = dir.join("empty");
    std::fs::write(&empty, "").unwrap();
    vmm(&["run", "--kernel", empty.to_str().unwrap()]).expect_status(2).expect_one_line_error("neither an ELF");
}

#[test]
fn kernel_for_another_architecture() {
    let dir = TempDir::new("arm-elf");
    let path = dir.join("arm");
    write_raw_elf(&path, &[0x0f, 0x0b]);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[18] = 183; // EM_AARCH64
    std::fs::write(&path, bytes).unwrap();
    vmm(&["run", "--kernel", path.to_str().unwrap()]).expect_status(2).expect_one_line_error("another architecture");
}

#[test]
fn kernel_that_does_not_fit_in_memory() {
    let dir = TempDir::new("big-elf");
    let path = dir.join("big");
    write_raw_elf(&path, &vec![0x90; 20 << 20]);
    vmm(&["run", "--kernel", path.to_str().unwrap(), "--mem-mib", "16"])
        .expect_status(2)
        .expect_one_line_error("16 MiB of guest memory");
}

#[test]
fn too_little_memory() {
    vmm(&["run", "--kernel", microguest(), "--mem-mib", "4"])
        .expect_status(2)
        .expect_one_line_error("a guest needs at least 16 MiB");
}

#[test]
fn too_many_or_zero_vcpus() {
    vmm(&["run", "--kernel", microguest(), "--vcpus", "100000"])
        .expect_status(2)
        .expect_one_line_error("vcpus (--vcpus) is 100000");
    vmm(&["run", "--kernel", microguest(), "--vcpus", "0"])
        .expect_status(2)
        .expect_one_line_error("must be between 1 and");
}

#[test]
fn malformed_numbers_and_values() {
    vmm(&["run", "--kernel", microguest(), "--mem-mib", "lots"]).expect_status(2).expect_usage_error("--mem-mib");
    vmm(&["run", "--kernel", microguest(), "--serial", "tty"])
        .expect_status(2)
        .expect_usage_error("expected stdout, none or file:PATH");
    vmm(&["run", "--kernel", microguest(), "--boot-protocol", "uefi"])
        .expect_status(2)
        .expect_usage_error("unknown boot protocol");
    vmm(&["run", "--kernel", microguest(), "--frobnicate"]).expect_status(2).expect_usage_error("--frobnicate");
}

#[test]
fn pvh_requested_for_a_kernel_without_the_note() {
    let dir = TempDir::new("no-pvh");
    let path = dir.join("k");
    write_raw_elf(&path, &[0xf4]);
    vmm(&["run", "--kernel", path.to_str().unwrap(), "--boot-protocol", "pvh"])
        .expect_status(2)
        .expect_one_line_error("no PVH entry note");
}

#[test]
fn command_line_too_long() {
    let long = "x".repeat(5000);
    vmm(&["run", "--kernel", microguest(), "--cmdline", &long])
        .expect_status(2)
        .expect_one_line_error("command line is 5000 bytes");
}

#[test]
fn config_file_problems() {
    let dir = TempDir::new("config");
    let unknown = dir.join("unknown.json");
    std::fs::write(&unknown, format!(r#"{{"kernel": "{}", "memory_mib": 64}}"#, microguest())).unwrap();
    vmm(&["run", "--config", unknown.to_str().unwrap()])
        .expect_status(2)
        .expect_one_line_error("unknown field `memory_mib`");

    let broken = dir.join("broken.json");
    std::fs::write(&broken, "{ \"kernel\": ").unwrap();
    vmm(&["run", "--config", broken.to_str().unwrap()]).expect_status(2).expect_one_line_error("is not valid JSON");

    let wrong_type = dir.join("type.json");
    std::fs::write(&wrong_type, format!(r#"{{"kernel": "{}", "vcpus": "four"}}"#, microguest())).unwrap();
    vmm(&["run", "--config", wrong_type.to_str().unwrap()]).expect_status(2).expect_one_line_error("invalid type");

    let not_object = dir.join("list.json");
    std::fs::write(&not_object, "[1, 2]").unwrap();
    vmm(&["run", "--config", not_object.to_str().unwrap()])
        .expect_status(2)
        .expect_one_line_error("expected a JSON object");

    vmm(&["run", "--config", "/nonexistent.json"]).expect_status(2).expect_one_line_error("cannot read config file");
}

#[test]
fn serial_file_in_missing_directory() {
    vmm(&["run", "--kernel", microguest(), "--serial", "file:/nonexistent/dir/log"])
        .expect_status(2)
        .expect_one_line_error("cannot open serial output file");
}

#[test]
fn no_dev_kvm() {
    // Hide /dev behind an empty tmpfs in a private mount namespace.
    let out = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!("mount -t tmpfs none /dev && exec {} run --kernel {}", common::vmm_bin(), microguest()))
        .output()
        .expect("unshare (util-linux) is needed for this test");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("error: cannot open /dev/kvm"), "{stderr}");
}

#[test]
fn guest_triple_fault_is_a_clear_error() {
    let dir = TempDir::new("triple");
    let path = dir.join("ud2");
    // `ud2` with the boot IDT (no gates): #UD -> #GP -> #DF -> triple fault.
    write_raw_elf(&path, &[0x0f, 0x0b]);
    vmm(&["run", "--kernel", path.to_str().unwrap()])
        .expect_status(1)
        .expect_one_line_error("guest crashed on vCPU 0: triple fault");
}

#[test]
fn help_and_version_succeed() {
    let out = vmm(&["--version"]);
    assert_eq!(out.status, Some(0));
    assert!(out.stdout.starts_with("vmm "));
    let out = vmm(&["run", "--help"]);
    assert_eq!(out.status, Some(0));
    assert!(out.stdout.contains("--mem-mib"));
}

/// A flag error is clap's own: the error, one tip, the usage of the subcommand at fault and
/// which `--help` to read (not the top-level one).
#[test]
fn flag_errors_point_at_the_subcommand_help() {
    let out = vmm(&["run", "--kernell", microguest()]);
    out.expect_status(2);
    assert!(out.stderr.starts_with("error: unexpected argument '--kernell'"), "{}", out.stderr);
    assert_eq!(out.stderr.matches("tip:").count(), 1, "{}", out.stderr);
    assert!(out.stderr.contains("Usage: vmm run"), "{}", out.stderr);
    assert!(out.stderr.contains("For more information, try 'vmm run --help'."), "{}", out.stderr);
    let out = vmm(&["ctl", "--api-sock", "/nonexistent.sock", "swap", "disk0", "--mode", "sideways", "path=/x"]);
    out.expect_status(2);
    assert!(out.stderr.contains("try 'vmm ctl swap --help'"), "{}", out.stderr);
}

#[test]
fn a_device_flag_without_keys_suggests_one() {
    let out = vmm(&["run", "--kernel", microguest(), "--disk", "/var/disk.img"]);
    out.expect_status(2);
    assert!(out.stderr.contains("did you mean --disk path=/var/disk.img?"), "{}", out.stderr);
    let out = vmm(&["run", "--kernel", microguest(), "--net", "vmtap0"]);
    assert!(out.stderr.contains("did you mean --net tap=vmtap0?"), "{}", out.stderr);
}

/// `--mode new_image` (the API's spelling) is accepted beside `new-image`.
#[test]
fn swap_mode_takes_both_spellings() {
    for mode in ["new-image", "new_image"] {
        let out = vmm(&[
            "ctl",
            "--api-sock",
            "/nonexistent/api.sock",
            "--timeout",
            "0.2",
            "swap",
            "disk0",
            "path=/x.img",
            "--mode",
            mode,
        ]);
        // Parsed: it got as far as connecting.
        out.expect_status(1).expect_one_line_error("cannot connect to the API socket /nonexistent/api.sock");
    }
}

/// The OS error is said once, not again after the hint.
#[test]
fn ctl_without_a_vmm_says_so_once() {
    let out = vmm(&["ctl", "--api-sock", "/nonexistent/api.sock", "--timeout", "0.2", "status"]);
    out.expect_status(1).expect_one_line_error("(is `vmm run --api-sock` running?)");
    assert_eq!(out.stderr.matches("No such file or directory").count(), 1, "{}", out.stderr);
}

/// A VMM that took the connection but never answers (stopped by job control, say) costs
/// `vmm ctl` its timeout, not forever.
#[test]
fn ctl_against_a_socket_that_never_answers_returns_within_its_timeout() {
    let dir = TempDir::new("ctl-timeout");
    let socket = dir.join("silent.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let started = std::time::Instant::now();
    let out = common::vmm_with(
        &["ctl", "--api-sock", socket.to_str().unwrap(), "--timeout", "1", "status"],
        None,
        std::time::Duration::from_secs(30),
    );
    out.expect_status(1).expect_one_line_error("no answer from the API socket");
    assert!(out.stderr.contains("within 1s"), "the error says how long it waited: {}", out.stderr);
    // Generous against a loaded machine, yet far below "forever".
    assert!(started.elapsed() < std::time::Duration::from_secs(10), "ctl took {:?}", started.elapsed());
}

/// The escape key's help line, printed when the console goes raw.
const CONSOLE_HINT: &str = "Ctrl-A x stops the VM";
const WAIT: std::time::Duration = std::time::Duration::from_secs(60);

fn idle_guest(extra: &[&str]) -> std::process::Command {
    let mut cmd = std::process::Command::new(common::vmm_bin());
    cmd.args(["run", "--kernel", microguest(), "--cmdline", "prog=idle"]).args(extra);
    cmd
}

/// On an interactive terminal the console is raw: one key reaches the guest without Enter
/// (`idle` exits on the first byte), and the terminal is line-buffered again afterwards.
#[test]
fn a_key_reaches_the_guest_at_once_and_the_terminal_is_restored() {
    let mut pty = common::pty::Pty::new();
    let mut child = pty.spawn(idle_guest(&[]));
    let _watchdog = common::peers::Watchdog::kill_after(child.0.id(), WAIT);
    pty.wait_for(CONSOLE_HINT, WAIT);
    pty.wait_for("idle: ready", WAIT);
    pty.write(b"q");
    let status = child.0.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{}", pty.text());
    assert!(pty.is_canonical(), "the terminal was left raw");
}

/// Ctrl-A x stops the VM from its console, as in QEMU.
#[test]
fn ctrl_a_x_stops_the_vm() {
    let mut pty = common::pty::Pty::new();
    let mut child = pty.spawn(idle_guest(&[]));
    let _watchdog = common::peers::Watchdog::kill_after(child.0.id(), WAIT);
    pty.wait_for("idle: ready", WAIT);
    pty.write(b"\x01h");
    pty.wait_for("Ctrl-A Ctrl-A", WAIT);
    pty.write(b"\x01x");
    pty.wait_for("stopped from the console", WAIT);
    let status = child.0.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{}", pty.text());
    assert!(pty.is_canonical(), "the terminal was left raw");
}

/// Ctrl-A x works when the guest reads nothing: paused, its receive FIFO full, keys waiting.
#[test]
fn ctrl_a_x_stops_a_guest_that_reads_nothing() {
    let dir = TempDir::new("ctrl-a-x-paused");
    let socket = dir.join("api.sock");
    let mut pty = common::pty::Pty::new();
    let mut child = pty.spawn(idle_guest(&["--api-sock", socket.to_str().unwrap()]));
    let _watchdog = common::peers::Watchdog::kill_after(child.0.id(), WAIT);
    pty.wait_for("idle: ready", WAIT);
    vmm(&["ctl", "--api-sock", socket.to_str().unwrap(), "pause"]).expect_status(0);
    pty.write(&[b'a'; 300]);
    pty.write(b"\x01x");
    pty.wait_for("stopped from the console", WAIT);
    assert_eq!(child.0.wait().unwrap().code(), Some(0), "{}", pty.text());
}

/// Stops a VMM through its socket when dropped (a VMM some other process started, which
/// `Reaped` cannot reach), unless it is already gone.
struct StopVmm(std::path::PathBuf);

impl Drop for StopVmm {
    fn drop(&mut self) {
        if self.0.exists() {
            let _ = vmm(&["ctl", "--api-sock", self.0.to_str().unwrap(), "--timeout", "2", "stop"]);
        }
    }
}

/// `vmm run ... &` from an interactive shell: the VMM leaves the terminal alone instead of
/// being stopped by SIGTTIN (which `wait` would report as status 149), and its guest takes
/// input through the API instead.
#[test]
fn background_run_does_not_stop_on_tty_input() {
    let dir = TempDir::new("bg-run");
    let socket = dir.join("api.sock");
    let mut pty = common::pty::Pty::new();
    let script = format!(
        "set -m; '{}' run --kernel '{}' --cmdline prog=idle --api-sock '{}' & wait $!; echo \"vmm-status=$?\"",
        common::vmm_bin(),
        microguest(),
        socket.display()
    );
    let mut shell = std::process::Command::new("bash");
    shell.args(["-c", &script]);
    let mut child = pty.spawn(shell);
    let _watchdog = common::peers::Watchdog::kill_after(child.0.id(), WAIT);
    // The VMM is the shell's child: if this test fails midway, stop it through its socket.
    let _stop = StopVmm(socket.clone());
    pty.wait_for("idle: ready", WAIT);
    assert!(!pty.text().contains(CONSOLE_HINT), "a background VMM took the terminal: {}", pty.text());
    let out = vmm(&["ctl", "--api-sock", socket.to_str().unwrap(), "serial-input", "q"]);
    out.expect_status(0).expect_stdout("\"bytes\": 1");
    pty.wait_for("vmm-status=", WAIT);
    child.0.wait().unwrap();
    assert!(pty.text().contains("vmm-status=0"), "{}", pty.text());
    assert!(!socket.exists(), "the API socket was left behind");
}

/// SIGINT (Ctrl-C where the terminal is not the guest's) stops the VM cleanly: status 130,
/// a word on stderr, and the API socket removed.
#[test]
fn sigint_stops_the_vm_and_removes_the_socket() {
    use std::io::BufRead;
    let dir = TempDir::new("sigint");
    let socket = dir.join("api.sock");
    let mut cmd = idle_guest(&["--api-sock", socket.to_str().unwrap()]);
    cmd.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let mut child = common::Reaped(cmd.spawn().unwrap());
    let _watchdog = common::peers::Watchdog::kill_after(child.0.id(), WAIT);
    let mut stdout = std::io::BufReader::new(child.0.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("idle: ready") {
        line.clear();
        assert!(stdout.read_line(&mut line).unwrap() > 0, "vmm ended before the guest was ready");
    }
    // The API answers: the socket is there to be removed.
    vmm(&["ctl", "--api-sock", socket.to_str().unwrap(), "status"]).expect_status(0);
    // SAFETY: only sends a signal to our child.
    unsafe { libc::kill(child.0.id() as libc::pid_t, libc::SIGINT) };
    let status = child.0.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.0.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("SIGINT: stopping the guest"), "{stderr}");
    assert!(!socket.exists(), "the API socket was left behind");
}

/// `vmm man` writes a page per command, `vmm completions` a script that knows the commands.
#[test]
fn man_pages_and_completions() {
    let dir = TempDir::new("man");
    let out_dir = dir.join("man1");
    vmm(&["man", "--out", out_dir.to_str().unwrap()]).expect_status(0);
    for page in ["vmm.1", "vmm-run.1", "vmm-ctl.1", "vmm-ctl-swap.1", "vmm-ctl-serial-input.1"] {
        let text = std::fs::read_to_string(out_dir.join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.starts_with(".ie") || text.contains(".TH"), "{page} is not a man page:\n{text}");
    }
    let run_page = std::fs::read_to_string(out_dir.join("vmm-run.1")).unwrap();
    assert!(run_page.contains("ram\\-backing"), "{run_page}");
    let out = vmm(&["completions", "bash"]);
    out.expect_status(0).expect_stdout("_vmm()").expect_stdout("serial-input");
}

#[test]
fn a_guest_larger_than_the_host_is_refused_before_it_runs() {
    // 1 TiB: more than any machine this runs on has as memory and swap.
    common::run_microguest("prog=hello", &["--mem-mib", "1048576"])
        .expect_status(1)
        .expect_one_line_error("guest RAM of 1048576 MiB is more than this host's");
}

#[test]
fn a_second_vmm_on_an_image_another_one_writes_is_refused() {
    let dir = common::TempDir::new("cli-lock");
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(1 << 20).unwrap();
    let socket = dir.join("first.sock");
    let disk_arg = format!("path={}", disk.display());
    let mut first = std::process::Command::new(common::vmm_bin());
    first
        .args(["run", "--kernel", common::microguest(), "--cmdline", "prog=idle", "--serial", "none"])
        .args(["--disk", &disk_arg, "--api-sock"])
        .arg(&socket)
        .stdin(std::process::Stdio::null());
    let _first = common::Reaped(first.spawn().unwrap());
    vmm::api::ApiClient::connect_within(
        &socket,
        std::time::Duration::from_secs(60),
        std::time::Duration::from_secs(60),
    )
    .expect("the first VM is up");
    // Read-write and read-only alike: the first one writes it.
    for arg in [disk_arg.clone(), format!("{disk_arg},readonly=on")] {
        common::run_microguest("prog=hello", &["--disk", &arg])
            .expect_status(1)
            .expect_one_line_error("is in use by another process (it is locked)");
    }
}

#[test]
fn sigterm_leaves_none_of_the_files_the_vmm_created() {
    let dir = common::TempDir::new("cli-sigterm");
    let (socket, vsock, ram) = (dir.join("api.sock"), dir.join("vsock.sock"), dir.join("guest.ram"));
    let mut cmd = std::process::Command::new(common::vmm_bin());
    cmd.args(["run", "--kernel", common::microguest(), "--cmdline", "prog=idle", "--serial", "none"])
        .args(["--vsock", &format!("cid=3,socket={}", vsock.display())])
        .args(["--ram-backing", &format!("file={}", ram.display()), "--api-sock"])
        .arg(&socket)
        .stdin(std::process::Stdio::null());
    let mut child = common::Reaped(cmd.spawn().unwrap());
    vmm::api::ApiClient::connect_within(
        &socket,
        std::time::Duration::from_secs(60),
        std::time::Duration::from_secs(60),
    )
    .expect("the VM is up");
    for (path, what) in [(&socket, "API socket"), (&vsock, "vsock socket"), (&ram, "RAM file")] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the {what} is the owner's only");
    }
    // SAFETY: signals our own child.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    let status = child.0.wait().unwrap();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM));
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn resume_state_after_kill_9_reuses_a_file_ram_backing() {
    let dir = common::TempDir::new("cli-resume-ram");
    let (state, ram, socket) = (dir.join("vm.state"), dir.join("guest.ram"), dir.join("api.sock"));
    let start = |args: &[&str]| {
        let mut cmd = std::process::Command::new(common::vmm_bin());
        cmd.args(["run", "--serial", "none", "--api-sock"]).arg(&socket).args(args).stdin(std::process::Stdio::null());
        let child = common::Reaped(cmd.spawn().unwrap());
        let wait = std::time::Duration::from_secs(60);
        vmm::api::ApiClient::connect_within(&socket, wait, wait).expect("the VM is up");
        child
    };
    let ram_arg = format!("file={}", ram.display());
    let mut first = start(&[
        "--kernel",
        common::microguest(),
        "--cmdline",
        "prog=memtouch mib=8 verify_until_input=1",
        "--ram-backing",
        &ram_arg,
        "--state-file",
        state.to_str().unwrap(),
    ]);
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    let _ = std::fs::remove_file(&socket);
    assert!(std::fs::metadata(&ram).unwrap().len() > 0, "kill -9 leaves the RAM file behind");
    // The resumed VM boots on it anyway: the dead guest's memory is emptied first.
    let mut resumed = start(&["--resume-state", state.to_str().unwrap()]);
    let mut api = vmm::api::ApiClient::connect(&socket, std::time::Duration::from_secs(60)).unwrap();
    assert_eq!(api.request("GET", "/vm", None).unwrap().status, 200);
    // SAFETY: signals our own child.
    unsafe { libc::kill(resumed.0.id() as i32, libc::SIGTERM) };
    resumed.0.wait().unwrap();
}
