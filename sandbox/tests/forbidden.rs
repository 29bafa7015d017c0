//! Forbidden system calls from filtered threads, for real: each case runs in a child process
//! (this test binary again), which the filter must stop with status 159 and one line naming
//! the thread, its role and the call.

use std::process::Command;

use vmm_sandbox::seccomp::{self, FORBIDDEN_EXIT_STATUS};
use vmm_sandbox::{Process, Role};

const CHILD: &str = "VMM_SANDBOX_TEST_CASE";

/// What a child does under its filter; the last call is the forbidden one.
fn child_case(case: &str) {
    let process = if case == "shadow-exec" { Process::Shadow } else { Process::Run };
    seccomp::enable(process).expect("enable the filters");
    let (thread, role) = match case {
        "vcpu-socket" | "vcpu-tty-ioctl" => ("vcpu0", Role::Vcpu),
        "devices-bind" => ("devices", Role::Devices),
        _ => ("api-conn", Role::Control),
    };
    let case = case.to_string();
    let worker = std::thread::Builder::new().name(thread.into()).spawn(move || {
        // Control-plane threads inherit their filter without entering a role: the report
        // must still name them.
        if role != Role::Control {
            seccomp::enter(role).expect("enter the role");
        }
        // Allowed calls go through: the thread is alive and working before it errs.
        let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: plain system calls with valid arguments.
        unsafe {
            assert_eq!(libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now), 0);
            assert_eq!(libc::write(2, b"working\n".as_ptr().cast(), 8), 8);
            match case.as_str() {
                "vcpu-socket" => {
                    libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                }
                "vcpu-tty-ioctl" => {
                    let mut termios: libc::termios = std::mem::zeroed();
                    libc::ioctl(0, libc::TCGETS, &mut termios);
                }
                "devices-bind" => {
                    // Its socket is allowed (a vsock connection to a host port); binding is not.
                    let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                    assert!(fd >= 0, "socket is on the device loop's list");
                    let addr: libc::sockaddr_un = std::mem::zeroed();
                    libc::bind(fd, (&addr as *const libc::sockaddr_un).cast(), 2);
                }
                "run-exec" | "shadow-exec" => {
                    let argv = [c"/bin/true".as_ptr(), std::ptr::null()];
                    libc::execv(c"/bin/true".as_ptr(), argv.as_ptr());
                }
                "control-ptrace" => {
                    libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0);
                }
                other => panic!("unknown case {other}"),
            }
        }
    });
    worker.expect("spawn").join().expect("join");
    std::process::exit(0);
}

/// Runs `case` in a child; returns its status and stderr.
fn run_case(case: &str) -> (Option<i32>, String) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
        .env(CHILD, case)
        .output()
        .expect("run the test binary as a child");
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The child's entry point: a no-op unless run by [`run_case`].
#[test]
fn child_entry() {
    if let Ok(case) = std::env::var(CHILD) {
        child_case(&case);
    }
}

fn assert_stopped(case: &str, thread: &str, role: &str, call: &str) {
    let (status, stderr) = run_case(case);
    assert_eq!(status, Some(FORBIDDEN_EXIT_STATUS), "{case}: {stderr}");
    assert!(stderr.contains("working"), "{case}: allowed calls must work first: {stderr}");
    let line = format!("vmm: seccomp: thread '{thread}' ({role} filter) made system call ");
    assert!(stderr.contains(&line), "{case}: {stderr}");
    assert!(stderr.contains(&format!("({call}), which its filter forbids; stopping the VMM")), "{case}: {stderr}");
}

#[test]
fn a_vcpu_thread_may_not_open_a_socket() {
    assert_stopped("vcpu-socket", "vcpu0", "vcpu", "socket");
}

#[test]
fn a_vcpu_thread_may_ask_only_kvm_by_ioctl() {
    assert_stopped("vcpu-tty-ioctl", "vcpu0", "vcpu", "ioctl");
}

#[test]
fn the_device_loop_may_connect_but_not_bind() {
    assert_stopped("devices-bind", "devices", "devices", "bind");
}

#[test]
fn no_thread_of_vmm_run_may_start_a_program() {
    assert_stopped("run-exec", "api-conn", "control", "execve");
}

#[test]
fn no_thread_may_ptrace() {
    assert_stopped("control-ptrace", "api-conn", "control", "ptrace");
}

#[test]
fn the_shadow_control_plane_may_start_its_trial_tools() {
    // The shadow's control plane is unfiltered (its trials start qemu-nbd, which would
    // inherit a filter): /bin/true runs, and the process exits with its status.
    let (status, stderr) = run_case("shadow-exec");
    assert_eq!(status, Some(0), "{stderr}");
}
