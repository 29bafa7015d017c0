//! `vmm ctl`: one command per control API call, for scripts and people.
//!
//! Answers are printed to stdout as the API sends them (JSON, or Prometheus text for
//! `metrics`). A refused request prints the API's error on stderr and exits 1; so does a
//! `swap --wait` that ends rolled back or failed.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::anyhow;
use clap::{Args, Subcommand, ValueEnum};
use serde_json::{Map, Value, json};
use vmm::api::ApiClient;
use vmm::api::http::Response;

use crate::cli::Failure;

#[derive(Args)]
pub struct CtlArgs {
    /// The API socket of a VMM started with `vmm run --api-sock PATH`.
    #[arg(long, value_name = "PATH")]
    pub api_sock: PathBuf,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Subcommand)]
pub enum SnapshotCommand {
    /// Write a snapshot into a new (or empty) directory; prints what it cost.
    Create {
        /// The snapshot directory.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Only the pages changed since this VM's last snapshot, which it names as its parent.
        #[arg(long)]
        diff: bool,
    },
}

#[derive(Subcommand)]
pub enum CtlCommand {
    /// The VM's state (GET /vm).
    Status,
    /// Pause every vCPU (PATCH /vm).
    Pause,
    /// Resume the vCPUs (PATCH /vm).
    Resume,
    /// End the VM (PATCH /vm).
    Stop,
    /// Devices with their backends and counters (GET /devices[/ID]).
    Devices { id: Option<String> },
    /// Replace a device's backend while the guest runs (POST /devices/ID/swap).
    Swap(SwapArgs),
    /// Swaps and their timelines (GET /swaps[/ID]).
    Swaps {
        id: Option<u64>,
        /// With an ID: wait for the swap to end.
        #[arg(long, requires = "id")]
        wait: bool,
    },
    /// Guest RAM regions and their backings (GET /memory/regions).
    Memory,
    /// Replace a RAM region's backing (POST /memory/regions/SLOT/swap).
    MemorySwap {
        slot: u32,
        /// anonymous, memfd, hugetlbfs or file=PATH.
        #[arg(value_parser = parse_backing)]
        backing: Value,
        /// Compare old and new contents before resuming the guest.
        #[arg(long)]
        verify: bool,
    },
    /// Snapshots of the running VM (POST /snapshots); continue one with `vmm run --restore DIR`.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Counters in the Prometheus text format (GET /metrics).
    Metrics,
    /// The API's OpenAPI document (GET /openapi.json).
    Openapi,
    /// Any request: METHOD PATH [JSON-BODY].
    Raw { method: String, path: String, body: Option<String> },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Mode {
    Switch,
    Migrate,
    NewImage,
}

#[derive(Args)]
pub struct SwapArgs {
    /// The device, e.g. disk0.
    pub id: String,
    /// The new backend in the device flag's form (`path=FILE,engine=io_uring`,
    /// `nbd=unix:PATH`, `tap=NAME`, `unix=PATH`, `socket=PATH`) or as a JSON object.
    #[arg(value_parser = parse_backend)]
    pub backend: Value,
    #[arg(long, value_enum, default_value = "switch")]
    pub mode: Mode,
    /// Confirm that `--mode new-image` replaces the guest's disk.
    #[arg(long)]
    pub allow_new_image: bool,
    /// Give up the swap (and roll back) if in-flight requests take longer than this.
    #[arg(long, value_name = "MS")]
    pub drain_timeout_ms: Option<u64>,
    /// Health check: how long to watch the new backend.
    #[arg(long, value_name = "MS")]
    pub verify_window_ms: Option<u64>,
    /// Health check: successful requests needed within the window.
    #[arg(long, value_name = "N")]
    pub verify_min_requests: Option<u64>,
    /// Health check: largest tolerated share of failed requests.
    #[arg(long, value_name = "RATE")]
    pub verify_max_error_rate: Option<f64>,
    /// Health check: largest tolerated mean latency.
    #[arg(long, value_name = "US")]
    pub verify_max_mean_latency_us: Option<u64>,
    /// Testing rollback (disks): make the new backend fail (error, stall, error-after=N or stall-after=N).
    #[arg(long, value_parser = parse_fault)]
    pub fault: Option<Value>,
    /// Wait for the swap to end; exit 1 unless it committed.
    #[arg(long)]
    pub wait: bool,
}

/// `key=value,...` (the device flags' syntax) or a JSON object.
fn parse_backend(s: &str) -> Result<Value, String> {
    if s.trim_start().starts_with('{') {
        return serde_json::from_str(s).map_err(|e| format!("invalid JSON: {e}"));
    }
    let mut map = Map::new();
    for pair in s.split(',').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').ok_or_else(|| format!("expected key=value, got {pair:?}"))?;
        let value = match (key, value) {
            ("readonly", "on" | "true") => Value::Bool(true),
            ("readonly", "off" | "false") => Value::Bool(false),
            _ => Value::from(value),
        };
        map.insert(key.to_string(), value);
    }
    if map.is_empty() {
        return Err("empty backend".into());
    }
    Ok(Value::Object(map))
}

fn parse_backing(s: &str) -> Result<Value, String> {
    match s.split_once('=') {
        Some(("file", path)) if !path.is_empty() => Ok(json!({"kind": "file", "path": path})),
        None if matches!(s, "anonymous" | "memfd" | "hugetlbfs") => Ok(json!({"kind": s})),
        _ => Err(format!("{s:?}: expected anonymous, memfd, hugetlbfs or file=PATH")),
    }
}

fn parse_fault(s: &str) -> Result<Value, String> {
    match s.split_once('=') {
        Some(("error-after", n)) => {
            n.parse::<u64>().map(|n| json!({"error_after": n})).map_err(|_| format!("error-after={n:?}: not a number"))
        }
        Some(("stall-after", n)) => {
            n.parse::<u64>().map(|n| json!({"stall_after": n})).map_err(|_| format!("stall-after={n:?}: not a number"))
        }
        None if matches!(s, "error" | "stall") => Ok(Value::from(s)),
        _ => Err(format!("{s:?}: expected error, stall, error-after=N or stall-after=N")),
    }
}

/// Long polls ask the server to wait this long per round trip.
const POLL_MS: u64 = 30_000;

pub fn run(args: &CtlArgs) -> Result<u8, Failure> {
    let timeout = Duration::from_millis(POLL_MS) + Duration::from_secs(30);
    let mut client = ApiClient::connect(&args.api_sock, timeout).map_err(|e| Failure::runtime(anyhow!(e)))?;
    let mut call = |method: &str, path: &str, body: Option<Value>| -> Result<Response, Failure> {
        let response = match body {
            Some(body) => client.send_json(method, path, &body),
            None => client.get(path),
        };
        let response = response.map_err(|e| Failure::runtime(anyhow!(e)))?;
        if response.status >= 400 {
            return Err(Failure::runtime(api_error(&response)));
        }
        Ok(response)
    };
    let state = |s: &str| Some(json!({ "state": s }));
    let response = match &args.command {
        CtlCommand::Status => call("GET", "/vm", None)?,
        CtlCommand::Pause => call("PATCH", "/vm", state("paused"))?,
        CtlCommand::Resume => call("PATCH", "/vm", state("running"))?,
        CtlCommand::Stop => call("PATCH", "/vm", state("stopped"))?,
        CtlCommand::Devices { id: None } => call("GET", "/devices", None)?,
        CtlCommand::Devices { id: Some(id) } => call("GET", &format!("/devices/{id}"), None)?,
        CtlCommand::Swap(swap) => {
            let started = call("POST", &format!("/devices/{}/swap", swap.id), Some(swap_body(swap)))?;
            if !swap.wait {
                print(&started);
                return Ok(0);
            }
            let id = json_field(&started, "id").ok_or_else(|| Failure::runtime(anyhow!("the API gave no swap id")))?;
            return wait_for_swap(&mut call, &id);
        }
        CtlCommand::Swaps { id: None, .. } => call("GET", "/swaps", None)?,
        CtlCommand::Swaps { id: Some(id), wait: false } => call("GET", &format!("/swaps/{id}"), None)?,
        CtlCommand::Swaps { id: Some(id), wait: true } => return wait_for_swap(&mut call, &id.to_string()),
        CtlCommand::Memory => call("GET", "/memory/regions", None)?,
        CtlCommand::MemorySwap { slot, backing, verify } => {
            let body = json!({ "backing": backing, "verify": verify });
            call("POST", &format!("/memory/regions/{slot}/swap"), Some(body))?
        }
        CtlCommand::Snapshot(SnapshotCommand::Create { out, diff }) => {
            // The server resolves relative paths against its own directory, not ours.
            let out = std::path::absolute(out).unwrap_or_else(|_| out.clone());
            let body = json!({ "path": out, "kind": if *diff { "diff" } else { "full" } });
            call("POST", "/snapshots", Some(body))?
        }
        CtlCommand::Metrics => call("GET", "/metrics", None)?,
        CtlCommand::Openapi => call("GET", "/openapi.json", None)?,
        CtlCommand::Raw { method, path, body } => {
            let body = body
                .as_deref()
                .map(serde_json::from_str::<Value>)
                .transpose()
                .map_err(|e| Failure::bad_input(anyhow!("body is not valid JSON: {e}")))?;
            call(&method.to_ascii_uppercase(), path, body)?
        }
    };
    print(&response);
    Ok(0)
}

fn swap_body(swap: &SwapArgs) -> Value {
    let mode = match swap.mode {
        Mode::Switch => "switch",
        Mode::Migrate => "migrate",
        Mode::NewImage => "new_image",
    };
    let mut body = json!({ "backend": swap.backend, "mode": mode, "allow_new_image": swap.allow_new_image });
    let mut verify = Map::new();
    let set = |map: &mut Map<String, Value>, key: &str, value: Option<Value>| {
        if let Some(v) = value {
            map.insert(key.into(), v);
        }
    };
    set(&mut verify, "window_ms", swap.verify_window_ms.map(Value::from));
    set(&mut verify, "min_requests", swap.verify_min_requests.map(Value::from));
    set(&mut verify, "max_error_rate", swap.verify_max_error_rate.map(Value::from));
    set(&mut verify, "max_mean_latency_us", swap.verify_max_mean_latency_us.map(Value::from));
    let fields = body.as_object_mut().expect("a JSON object literal");
    if !verify.is_empty() {
        fields.insert("verify".into(), Value::Object(verify));
    }
    set(fields, "drain_timeout_ms", swap.drain_timeout_ms.map(Value::from));
    set(fields, "fault", swap.fault.clone());
    body
}

/// Follows a swap until it ends, printing each new phase on stderr; prints the final record.
fn wait_for_swap(
    call: &mut impl FnMut(&str, &str, Option<Value>) -> Result<Response, Failure>,
    id: &str,
) -> Result<u8, Failure> {
    loop {
        let response = call("GET", &format!("/swaps/{id}?wait_ms={POLL_MS}"), None)?;
        match json_field(&response, "state").as_deref() {
            Some("running") => eprintln!("swap {id}: still {}", json_field(&response, "phase").unwrap_or_default()),
            Some(state) => {
                print(&response);
                return Ok(if state == "committed" { 0 } else { 1 });
            }
            None => return Err(Failure::runtime(anyhow!("swap {id}: the API answered without a state"))),
        }
    }
}

fn json_field(response: &Response, key: &str) -> Option<String> {
    let value: Value = serde_json::from_slice(&response.body).ok()?;
    match value.get(key)? {
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

fn api_error(response: &Response) -> anyhow::Error {
    let body: Value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
    let message = body.get("error").and_then(Value::as_str).unwrap_or("(no error message)");
    match body.get("field").and_then(Value::as_str) {
        Some(field) => anyhow!("{message} [HTTP {}, field {field}]", response.status),
        None => anyhow!("{message} [HTTP {}]", response.status),
    }
}

fn print(response: &Response) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(&response.body);
    if !response.body.ends_with(b"\n") {
        let _ = out.write_all(b"\n");
    }
}
