//! Shared benchmark plumbing: finding (or installing) the peer VMM, running a guest as a child
//! process with timestamps on its output, reading a process's memory, statistics and tables.

use std::cell::RefCell;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub mod qmp;
pub mod swap;

/// The `vmm` binary built alongside this benchmark. Under `cargo run` it is (re)built first,
/// a no-op when up to date: `cargo run -p bench` builds only the bench's own dependencies, and
/// an old binary left in the target directory would measure old code.
pub fn vmm_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe dir");
    let vmm = dir.join("vmm");
    if !vmm.exists() || std::env::var_os("CARGO").is_some() {
        let profile = if dir.ends_with("release") { "--release" } else { "--profile=dev" };
        eprintln!("building the vmm binary ({profile})...");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo).args(["build", profile, "-p", "vmm", "--bin", "vmm"]).status();
        assert!(status.is_ok_and(|s| s.success()), "building vmm failed");
    }
    vmm
}

/// The microguest image, written to a file for the VMMs to load.
pub fn microguest_file() -> PathBuf {
    let path = std::env::temp_dir().join(format!("bench-microguest-{}", std::process::id()));
    std::fs::write(&path, guest_agent::microguest()).expect("write microguest");
    path
}

/// Debian's QEMU, installed by `scripts/install-deps.sh` (QEMU 10, from the suite that matches
/// the host's qemu-utils) if missing. `None` if it cannot be had.
pub fn qemu_binary() -> Option<PathBuf> {
    let find = || {
        ["/usr/bin/qemu-system-x86_64", "/usr/local/bin/qemu-system-x86_64"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
    };
    if let Some(p) = find() {
        return Some(p);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/install-deps.sh");
    eprintln!("qemu-system-x86_64 not found; running {}...", script.display());
    match Command::new("bash").arg(&script).status() {
        Ok(status) if status.success() => {}
        Ok(status) => eprintln!("{} failed ({status})", script.display()),
        Err(e) => eprintln!("cannot run {}: {e}", script.display()),
    }
    find()
}

/// QEMU's arguments for the microguest on `-M microvm`, equivalent to `vmm run`. ACPI is off
/// so microvm announces virtio-mmio devices on the command line, where the microguest looks.
pub fn qemu_args(kernel: &Path, cmdline: &str, mem_mib: u64, vcpus: u32) -> Vec<String> {
    [
        "-M",
        "microvm,acpi=off",
        "-enable-kvm",
        "-no-user-config",
        "-nodefaults",
        "-nographic",
        "-serial",
        "stdio",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=4",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        "-m".into(),
        mem_mib.to_string(),
        "-smp".into(),
        vcpus.to_string(),
        "-kernel".into(),
        kernel.display().to_string(),
        "-append".into(),
        cmdline.into(),
    ])
    .collect()
}

/// A guest VMM process; killed and reaped on drop.
pub struct GuestProcess {
    pub child: Child,
    pub started: Instant,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<(Instant, String)>,
    first_byte: mpsc::Receiver<Instant>,
    pub stderr: mpsc::Receiver<String>,
    /// Every stdout line consumed so far by the `wait_*` methods.
    transcript: RefCell<String>,
}

impl GuestProcess {
    pub fn spawn(program: &Path, args: &[String]) -> Self {
        let started = Instant::now();
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", program.display()));
        let (line_tx, lines) = mpsc::channel();
        let (byte_tx, first_byte) = mpsc::channel();
        let mut stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut first = [0u8; 1];
            if stdout.read(&mut first).unwrap_or(0) == 0 {
                return;
            }
            let _ = byte_tx.send(Instant::now());
            let mut reader = BufReader::new(stdout);
            let mut line = String::from_utf8_lossy(&first).into_owned();
            loop {
                let mut rest = String::new();
                if reader.read_line(&mut rest).unwrap_or(0) == 0 {
                    break;
                }
                line.push_str(&rest);
                let _ = line_tx.send((Instant::now(), std::mem::take(&mut line)));
            }
        });
        let (err_tx, stderr) = mpsc::channel();
        let mut err_pipe = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = err_pipe.read_to_string(&mut text);
            let _ = err_tx.send(text);
        });
        let stdin = child.stdin.take();
        Self { child, started, stdin, lines, first_byte, stderr, transcript: RefCell::default() }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Time from spawn to the first byte on stdout.
    pub fn wait_first_byte(&self, timeout: Duration) -> Duration {
        let at = self.first_byte.recv_timeout(timeout).expect("no output from the guest");
        at - self.started
    }

    /// Waits for a stdout line containing `needle`.
    pub fn wait_line(&self, needle: &str, timeout: Duration) -> Duration {
        let (at, _) = self.find_line(needle, timeout).unwrap_or_else(|| panic!("no line with {needle:?}"));
        at - self.started
    }

    /// The next stdout line containing `needle` with the time it arrived, or `None` if none
    /// comes within `timeout` (or the process closed its stdout first).
    pub fn find_line(&self, needle: &str, timeout: Duration) -> Option<(Instant, String)> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (at, line) = self.lines.recv_timeout(left).ok()?;
            self.transcript.borrow_mut().push_str(&line);
            if line.contains(needle) {
                return Some((at, line));
            }
        }
    }

    /// Everything the process printed on stdout so far (consuming lines not yet waited for).
    pub fn transcript(&self) -> String {
        let mut text = self.transcript.borrow_mut();
        while let Ok((_, line)) = self.lines.try_recv() {
            text.push_str(&line);
        }
        text.clone()
    }

    pub fn send(&mut self, bytes: &[u8]) {
        if let Some(stdin) = &mut self.stdin {
            let _ = stdin.write_all(bytes);
            let _ = stdin.flush();
        }
    }

    /// Waits for exit; returns (time since spawn, exit code, user+system CPU time).
    pub fn wait_exit(&mut self) -> (Duration, Option<i32>, Duration) {
        let mut status = 0;
        // SAFETY: plain wait4 on our own child; rusage is filled in by the kernel.
        let usage = unsafe {
            let mut usage: libc::rusage = std::mem::zeroed();
            libc::wait4(self.child.id() as i32, &mut status, 0, &mut usage);
            usage
        };
        let elapsed = self.started.elapsed();
        let tv = |t: libc::timeval| Duration::from_micros(t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64);
        let code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
        (elapsed, code, tv(usage.ru_utime) + tv(usage.ru_stime))
    }
}

impl Drop for GuestProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident memory of `pid` in KiB: (total, excluding mappings that look like `ram_mib` of
/// guest RAM, i.e. anonymous mappings between ram_mib and ram_mib + 8 MiB).
pub fn rss_kib(pid: u32, ram_mib: u64) -> (u64, u64) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let (mut total, mut guest) = (0u64, 0u64);
    let mut size_kib = 0u64;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        match fields.next() {
            Some("Size:") => size_kib = fields.next().and_then(|v| v.parse().ok()).unwrap_or(0),
            Some("Rss:") => {
                let rss: u64 = fields.next().and_then(|v| v.parse().ok()).unwrap_or(0);
                total += rss;
                if (ram_mib * 1024..=(ram_mib + 8) * 1024).contains(&size_kib) {
                    guest += rss;
                }
            }
            _ => {}
        }
    }
    (total, total - guest)
}

/// VM exits counted by KVM's tracepoints for a whole process: exits to user space (to the VMM)
/// and MMIO traps (including those KVM serves in the kernel, such as ioeventfd notifications).
#[derive(Clone, Copy, Debug, Default)]
pub struct ExitCounts {
    pub to_vmm: u64,
    pub mmio: u64,
}

/// Whether `perf stat` can count KVM tracepoints here (it needs tracefs and permissions).
pub fn perf_counts_kvm() -> bool {
    Command::new("perf")
        .args(["stat", "-e", "kvm:kvm_userspace_exit", "-x,", "-o", "/dev/null", "--", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `program` to completion (under `perf stat` when `count` is set); returns its stdout,
/// exit code and the exits it caused.
pub fn run_counted(
    program: &Path,
    args: &[String],
    count: bool,
    timeout: Duration,
) -> (String, Option<i32>, Option<ExitCounts>) {
    let counts_file = std::env::temp_dir().join(format!("bench-perf-{}.csv", std::process::id()));
    let mut full: Vec<String> = Vec::new();
    let runner = if count {
        full.extend(["stat", "-e", "kvm:kvm_userspace_exit,kvm:kvm_mmio", "-x,", "-o"].iter().map(|s| s.to_string()));
        full.push(counts_file.display().to_string());
        full.push("--".into());
        full.push(program.display().to_string());
        PathBuf::from("perf")
    } else {
        program.to_path_buf()
    };
    full.extend(args.iter().cloned());
    let mut p = GuestProcess::spawn(&runner, &full);
    let deadline = Instant::now() + timeout;
    let mut out = String::new();
    while let Ok((_, line)) = p.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        out.push_str(&line);
    }
    let (_, code, _) = p.wait_exit();
    let counts = count.then(|| {
        let text = std::fs::read_to_string(&counts_file).unwrap_or_default();
        let value = |event: &str| {
            text.lines()
                .find(|l| l.contains(event))
                .and_then(|l| l.split(',').next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        ExitCounts { to_vmm: value("kvm_userspace_exit"), mmio: value("kvm_mmio") }
    });
    let _ = std::fs::remove_file(&counts_file);
    (out, code, counts)
}

/// Sorted samples with percentile lookup.
pub struct Samples(Vec<f64>);

impl Samples {
    pub fn new(mut v: Vec<f64>) -> Self {
        v.sort_by(|a, b| a.total_cmp(b));
        Self(v)
    }

    pub fn pct(&self, p: f64) -> f64 {
        if self.0.is_empty() {
            return f64::NAN;
        }
        let idx = ((self.0.len() - 1) as f64 * p / 100.0).round() as usize;
        self.0[idx]
    }

    pub fn median(&self) -> f64 {
        self.pct(50.0)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A plain-text table with a header row.
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Self { rows: vec![header.iter().map(|s| s.to_string()).collect()] }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn print(&self) {
        let cols = self.rows[0].len();
        let widths: Vec<usize> =
            (0..cols).map(|c| self.rows.iter().map(|r| r.get(c).map_or(0, |s| s.len())).max().unwrap_or(0)).collect();
        for (i, row) in self.rows.iter().enumerate() {
            let line: Vec<String> = row.iter().enumerate().map(|(c, s)| format!("{s:<w$}", w = widths[c])).collect();
            println!("| {} |", line.join(" | "));
            if i == 0 {
                let sep: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
                println!("|-{}-|", sep.join("-|-"));
            }
        }
    }
}
