//! A pseudo-terminal for tests that need `vmm run` on an interactive terminal: started in a
//! session of its own with the terminal as its controlling tty, as a shell starts a job.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::Reaped;

/// The master side, and everything read from it so far.
pub struct Pty {
    master: File,
    /// Kept open so the terminal's settings can be read after the child exits.
    slave: OwnedFd,
    seen: Vec<u8>,
}

impl Pty {
    pub fn new() -> Self {
        // Both ends close-on-exec from the start: tests run in parallel, and a child another
        // test spawns must not inherit (and hold open) this terminal.
        let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
        // SAFETY: posix_openpt returns a descriptor we own (or -1).
        let master = unsafe { libc::posix_openpt(flags) };
        assert!(master >= 0, "posix_openpt: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh descriptor.
        let master = unsafe { File::from_raw_fd(master) };
        let mut name = [0 as libc::c_char; 128];
        // SAFETY: the master is a pty master; ptsname_r writes at most `name.len()` bytes.
        unsafe {
            assert_eq!(libc::grantpt(master.as_raw_fd()), 0, "grantpt");
            assert_eq!(libc::unlockpt(master.as_raw_fd()), 0, "unlockpt");
            assert_eq!(libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()), 0, "ptsname_r");
        }
        // SAFETY: ptsname_r wrote a NUL-terminated path.
        let slave = unsafe { libc::open(name.as_ptr(), flags) };
        assert!(slave >= 0, "open the pty slave: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh descriptor.
        Self { master, slave: unsafe { OwnedFd::from_raw_fd(slave) }, seen: Vec::new() }
    }

    /// Spawns `cmd` as the leader of a new session whose controlling terminal is this pty,
    /// with stdin, stdout and stderr on it: the foreground job of that terminal.
    pub fn spawn(&self, mut cmd: Command) -> Reaped {
        for stdio in 0..3 {
            let fd = self.slave.try_clone().expect("dup the pty");
            match stdio {
                0 => cmd.stdin(Stdio::from(fd)),
                1 => cmd.stdout(Stdio::from(fd)),
                _ => cmd.stderr(Stdio::from(fd)),
            };
        }
        // SAFETY: setsid and ioctl are async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Reaped(cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}")))
    }

    /// Types `bytes` at the terminal.
    pub fn write(&mut self, bytes: &[u8]) {
        self.master.write_all(bytes).expect("write to the pty");
    }

    /// Everything the terminal showed so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.seen).into_owned()
    }

    /// Reads until the terminal has shown `needle`; fails the test after `timeout`.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        while !self.text().contains(needle) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "the terminal did not show {needle:?} within {timeout:?}:\n{}", self.text());
            let mut poll = libc::pollfd { fd: self.master.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one pollfd we own.
            let ready = unsafe { libc::poll(&mut poll, 1, left.as_millis().min(1000) as i32) };
            if ready <= 0 {
                continue;
            }
            let mut buf = [0u8; 4096];
            match self.master.read(&mut buf) {
                Ok(n @ 1..) => self.seen.extend_from_slice(&buf[..n]),
                // EIO: every slave descriptor is closed (the child and ours are what is left).
                _ => panic!("the terminal closed before showing {needle:?}:\n{}", self.text()),
            }
        }
        self.text()
    }

    /// Whether the terminal is in canonical (line-buffered, echoing) mode, as a shell leaves it.
    pub fn is_canonical(&self) -> bool {
        // SAFETY: tcgetattr fills a termios we own.
        let mut termios: libc::termios = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::tcgetattr(self.slave.as_raw_fd(), &mut termios) }, 0);
        termios.c_lflag & libc::ICANON != 0 && termios.c_lflag & libc::ECHO != 0
    }
}
