//! The live-swap benchmark (`bin/swap.rs`): device backend swaps under load, live storage
//! migration (QEMU's `drive-mirror` side by side) and memory region backing swaps, all driven
//! through the control API of a `vmm run --api-sock` child process.
//!
//! This module holds what the three measurements share: the guest process with its API
//! client, a temporary directory, statistics cells and parsing of the guests' summary lines.

pub mod devices;
pub mod memory;
pub mod migration;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use vmm::api::ApiClient;

use crate::{GuestProcess, Samples};

/// How long a guest may take to boot and print its ready line, or to print its summary.
pub const GUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for one swap to end (the API caps a long poll at 60 s).
const SWAP_WAIT_MS: u64 = 60_000;

/// A directory removed (with everything in it) on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!("bench-swap-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        Self(path)
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// A sparse file of `bytes` bytes.
    pub fn image(&self, name: &str, bytes: u64) -> PathBuf {
        let path = self.join(name);
        std::fs::File::create(&path).and_then(|f| f.set_len(bytes)).unwrap_or_else(|e| panic!("create image: {e}"));
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `vmm run --api-sock` child (killed and reaped on drop) and a client on its API socket.
pub struct ApiGuest {
    pub process: GuestProcess,
    api: ApiClient,
    /// A request failed in transport (the VMM died or closed the connection).
    broken: bool,
}

/// How a guest run ended: its summary line (if it printed one) and exit status.
#[derive(Default)]
pub struct GuestEnd {
    pub summary: Option<String>,
    pub exit: Option<i32>,
    /// The console output, for diagnosis when something went wrong.
    pub transcript: String,
}

impl GuestEnd {
    /// A `key=N` field of the summary line.
    pub fn count(&self, key: &str) -> Option<u64> {
        self.text(key).and_then(|v| v.parse().ok())
    }

    /// A `key=VALUE` field of the summary line, as text.
    pub fn text(&self, key: &str) -> Option<&str> {
        let prefix = format!("{key}=");
        self.summary.as_deref()?.split_whitespace().find_map(|w| w.strip_prefix(prefix.as_str()))
    }

    /// blk-stress's rate over its whole random phase (`... ops in T ms: N IOPS at queue depth`).
    pub fn blk_iops(&self) -> Option<u64> {
        let line = self.transcript.lines().find(|l| l.contains(" IOPS at queue depth"))?;
        line.split(" IOPS").next()?.rsplit(' ').next()?.parse().ok()
    }

    /// A count as a table cell; `?` when the guest printed no summary.
    pub fn cell(&self, key: &str) -> String {
        self.count(key).map_or_else(|| "? (no summary)".into(), |n| n.to_string())
    }
}

impl ApiGuest {
    /// Starts `vmm run` with the microguest running `cmdline` and waits for `ready` on its
    /// console. `devices` are extra `vmm run` arguments.
    pub fn start(
        vmm: &Path,
        kernel: &Path,
        cmdline: &str,
        mem_mib: u64,
        devices: &[String],
        socket: &Path,
        ready: &str,
    ) -> Result<Self, String> {
        let mut args: Vec<String> = vec!["run".into(), "--kernel".into(), kernel.display().to_string()];
        args.extend(["--cmdline".into(), cmdline.into(), "--mem-mib".into(), mem_mib.to_string()]);
        args.extend(["--api-sock".into(), socket.display().to_string()]);
        args.extend(devices.iter().cloned());
        let mut process = GuestProcess::spawn(vmm, &args);
        if process.find_line(ready, GUEST_TIMEOUT).is_none() {
            let transcript = process.transcript();
            let _ = process.child.kill();
            let stderr = process.stderr.recv_timeout(Duration::from_secs(5)).unwrap_or_default();
            return Err(format!("no {ready:?} from `vmm run {}`:\n{transcript}{stderr}", args.join(" ")));
        }
        // The API socket exists before the guest runs its program; allow for a slow start anyway.
        let deadline = Instant::now() + Duration::from_secs(10);
        let api = loop {
            match ApiClient::connect(socket, Duration::from_millis(SWAP_WAIT_MS + 10_000)) {
                Ok(api) => break api,
                Err(e) if Instant::now() >= deadline => return Err(e.to_string()),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        Ok(Self { process, api, broken: false })
    }

    fn call(&mut self, method: &str, target: &str, body: Option<&Value>) -> Result<(u16, Value), String> {
        let response = match body {
            Some(body) => self.api.send_json(method, target, body),
            None => self.api.get(target),
        }
        .map_err(|e| {
            self.broken = true;
            format!("{method} {target}: {e}")
        })?;
        let value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
        Ok((response.status, value))
    }

    /// Whether the API connection failed (later requests would fail too).
    pub fn broken(&self) -> bool {
        self.broken
    }

    pub fn get(&mut self, target: &str) -> Result<Value, String> {
        match self.call("GET", target, None)? {
            (200, value) => Ok(value),
            (status, value) => Err(format!("GET {target}: {status} {value}")),
        }
    }

    /// Starts a swap of `device` and waits for it to end; returns its final record.
    pub fn swap_device(&mut self, device: &str, request: &Value) -> Result<Value, String> {
        let target = format!("/devices/{device}/swap");
        let record = match self.call("POST", &target, Some(request))? {
            (202, record) => record,
            (status, value) => return Err(format!("POST {target}: {status} {value}")),
        };
        let id = record["id"].as_u64().ok_or_else(|| format!("swap record without an id: {record}"))?;
        let done = self.get(&format!("/swaps/{id}?wait_ms={SWAP_WAIT_MS}"))?;
        match done["state"].as_str() {
            Some("running") | None => Err(format!("swap {id} still running after {SWAP_WAIT_MS} ms: {done}")),
            Some(_) => Ok(done),
        }
    }

    /// Swaps the backing of RAM region `slot`; returns the report.
    pub fn swap_memory(&mut self, slot: u64, request: &Value) -> Result<Value, String> {
        let target = format!("/memory/regions/{slot}/swap");
        match self.call("POST", &target, Some(request))? {
            (200, report) => Ok(report),
            (status, value) => Err(format!("POST {target}: {status} {value}")),
        }
    }

    /// Sends a byte to the guest's serial port (the stress programs stop on it), waits for the
    /// line containing `summary` and for the process to exit.
    pub fn stop(mut self, summary: &str, timeout: Duration) -> GuestEnd {
        self.process.send(b"q");
        let summary = self.process.find_line(summary, timeout).map(|(_, line)| line.trim().to_string());
        let exit = wait_exit(&mut self.process, Duration::from_secs(10));
        GuestEnd { summary, exit, transcript: self.process.transcript() }
    }
}

/// Waits up to `timeout` for `process` to exit; its exit code (`None`: killed or still running,
/// then killed on drop).
pub fn wait_exit(process: &mut GuestProcess, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        match process.child.try_wait() {
            Ok(Some(status)) => return status.code(),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => return None,
        }
    }
}

/// Whether this process runs as root (taps need it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// `p50 / p99 / max` of microsecond samples.
pub fn percentiles_us(values: &[f64]) -> String {
    if values.is_empty() {
        return "n/a".into();
    }
    let s = Samples::new(values.to_vec());
    format!("{:.0} / {:.0} / {:.0}", s.median(), s.pct(99.0), s.pct(100.0))
}

/// The median of `values`, formatted with `decimals`, or `n/a`.
pub fn median(values: &[f64], decimals: usize) -> String {
    if values.is_empty() {
        return "n/a".into();
    }
    format!("{:.*}", decimals, Samples::new(values.to_vec()).median())
}

/// Prints the first few failure descriptions of a phase on stderr, and how many there were.
pub fn report_failures(what: &str, failures: &[String]) {
    for f in failures.iter().take(3) {
        eprintln!("  {what}: {f}");
    }
    if failures.len() > 3 {
        eprintln!("  {what}: ... {} more", failures.len() - 3);
    }
}
