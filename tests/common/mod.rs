//! Helpers shared by the integration tests: unique temp dirs, a `vmm` child process that is
//! always reaped, and captured serial output that can be waited on.
#![allow(dead_code)]

pub mod pty;

#[allow(unused_imports)]
pub use test_peers as peers;
pub use test_peers::Reaped;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::time::{Duration, Instant};

/// The `vmm` binary under test.
pub fn vmm_bin() -> &'static str {
    env!("CARGO_BIN_EXE_vmm")
}

/// The bundled microguest image.
pub fn microguest() -> &'static str {
    guest_agent::MICROGUEST_IMAGE
}

/// A directory unique to this test, removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!("vmm-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What a finished `vmm` run produced.
#[derive(Debug)]
pub struct Output {
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// Asserts exit status `want`, printing both streams otherwise.
    pub fn expect_status(&self, want: i32) -> &Self {
        assert_eq!(
            self.status,
            Some(want),
            "unexpected exit status\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout,
            self.stderr
        );
        self
    }

    pub fn expect_stdout(&self, needle: &str) -> &Self {
        assert!(
            self.stdout.contains(needle),
            "stdout lacks {needle:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout,
            self.stderr
        );
        self
    }

    /// Asserts a flag error as clap reports it: `error: ...` naming `needle`, then where to
    /// read more; no panic.
    pub fn expect_usage_error(&self, needle: &str) -> &Self {
        let first = self.stderr.lines().next().unwrap_or_default();
        assert!(first.starts_with("error: ") && first.contains(needle), "stderr lacks {needle:?}: {}", self.stderr);
        assert!(self.stderr.contains("For more information, try 'vmm "), "{}", self.stderr);
        assert!(!self.stderr.contains("panicked"), "{}", self.stderr);
        self
    }

    /// Asserts stderr is exactly one line containing `needle`, and no panic or backtrace.
    pub fn expect_one_line_error(&self, needle: &str) -> &Self {
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "expected one stderr line, got:\n{}", self.stderr);
        assert!(lines[0].starts_with("error: "), "{}", self.stderr);
        assert!(lines[0].contains(needle), "stderr lacks {needle:?}: {}", self.stderr);
        assert!(!self.stderr.contains("panicked") && !self.stderr.contains("backtrace"), "{}", self.stderr);
        self
    }
}

/// Runs `vmm` with `args` to completion (killed after `timeout`).
pub fn vmm_with(args: &[&str], stdin: Option<&[u8]>, timeout: Duration) -> Output {
    let mut cmd = Command::new(vmm_bin());
    cmd.args(args);
    run_to_completion(cmd, stdin, timeout)
}

/// Runs `cmd` to completion with its output captured (killed, and the test failed, after
/// `timeout`).
pub fn run_to_completion(mut cmd: Command, stdin: Option<&[u8]>, timeout: Duration) -> Output {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    let mut child = Reaped(cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}")));
    if let (Some(bytes), Some(mut pipe)) = (stdin, child.0.stdin.take()) {
        pipe.write_all(bytes).expect("write stdin");
    }
    let (tx, rx) = mpsc::channel();
    for (is_stdout, mut pipe) in [
        (true, Box::new(child.0.stdout.take().unwrap()) as Box<dyn Read + Send>),
        (false, Box::new(child.0.stderr.take().unwrap())),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            let _ = tx.send((is_stdout, text));
        });
    }
    let deadline = Instant::now() + timeout;
    let (mut stdout, mut stderr) = (None, None);
    while stdout.is_none() || stderr.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((true, text)) => stdout = Some(text),
            Ok((false, text)) => stderr = Some(text),
            Err(_) => panic!("{cmd:?} did not finish within {timeout:?}"),
        }
    }
    let status = child.0.wait().expect("wait for the child").code();
    Output { status, stdout: stdout.unwrap(), stderr: stderr.unwrap() }
}

pub fn vmm(args: &[&str]) -> Output {
    vmm_with(args, None, Duration::from_secs(120))
}

/// Boots the microguest with `cmdline` plus extra `vmm run` flags.
pub fn run_microguest(cmdline: &str, extra: &[&str]) -> Output {
    let mut args = vec!["run", "--kernel", microguest(), "--cmdline", cmdline];
    args.extend_from_slice(extra);
    vmm(&args)
}

/// A writer whose contents can be waited on: serial output captured in-process.
#[derive(Clone, Default)]
pub struct Capture(Arc<(Mutex<Vec<u8>>, Condvar)>);

impl Capture {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.0.lock().unwrap()).into_owned()
    }

    /// Blocks until the output contains `needle`.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> String {
        let (lock, cond) = &*self.0;
        let guard = lock.lock().unwrap();
        let (guard, result) =
            cond.wait_timeout_while(guard, timeout, |buf| !String::from_utf8_lossy(buf).contains(needle)).unwrap();
        let text = String::from_utf8_lossy(&guard).into_owned();
        assert!(!result.timed_out(), "serial output lacks {needle:?} after {timeout:?}:\n{text}");
        text
    }

    /// Blocks until `found` returns something for the output so far, and returns it; `what`
    /// describes the wait for the failure message.
    pub fn wait_until<T>(&self, what: &str, timeout: Duration, mut found: impl FnMut(&str) -> Option<T>) -> T {
        let (lock, cond) = &*self.0;
        let deadline = Instant::now() + timeout;
        let mut guard = lock.lock().unwrap();
        loop {
            if let Some(value) = found(&String::from_utf8_lossy(&guard)) {
                return value;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "serial output: no {what} after {timeout:?}:\n{}",
                String::from_utf8_lossy(&guard)
            );
            guard = cond.wait_timeout(guard, left).unwrap().0;
        }
    }
}

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let (lock, cond) = &*self.0;
        lock.lock().unwrap().extend_from_slice(buf);
        cond.notify_all();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Writes a minimal x86_64 ELF executable whose single segment holds `code` at 1 MiB and
/// whose entry point is its first byte.
pub fn write_raw_elf(path: &Path, code: &[u8]) {
    const LOAD: u64 = 0x10_0000;
    let phoff = 64u64;
    let code_off = phoff + 56;
    let mut elf = Vec::new();
    elf.extend_from_slice(b"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00");
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&LOAD.to_le_bytes()); // e_entry
    elf.extend_from_slice(&phoff.to_le_bytes());
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    for v in [64u16, 56, 1, 64, 0, 0] {
        elf.extend_from_slice(&v.to_le_bytes()); // ehsize, phentsize, phnum, shentsize, shnum, shstrndx
    }
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&7u32.to_le_bytes()); // RWX
    for v in [code_off, LOAD, LOAD, code.len() as u64, code.len() as u64, 0x1000] {
        elf.extend_from_slice(&v.to_le_bytes());
    }
    elf.extend_from_slice(code);
    std::fs::write(path, elf).expect("write ELF");
}
