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
use vmm::RamBacking;
use vmm::api::http::Response;
use vmm::api::{ApiClient, ClientError};

use crate::cli::Failure;

#[derive(Args)]
pub struct CtlArgs {
    /// The API socket of a VMM started with `vmm run --api-sock PATH`.
    #[arg(long, value_name = "PATH", global = true, env = "VMM_API_SOCK")]
    pub api_sock: Option<PathBuf>,
    /// Give up when the VMM does not answer a request within this many seconds (a VMM
    /// stopped by job control, say) [default: 10; 300 for snapshot and memory-swap, which
    /// copy guest RAM]. Waiting for a swap polls, so it is not bounded by this.
    #[arg(long, value_name = "SECS", global = true, value_parser = parse_timeout)]
    pub timeout: Option<f64>,
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
pub enum ReplicateCommand {
    /// Start replicating to a shadow (`vmm shadow --listen`) (POST /replication).
    Start {
        /// The shadow: unix:PATH or tcp:ADDR:PORT.
        #[arg(long, value_name = "ENDPOINT")]
        to: String,
        /// Milliseconds from one epoch's start to the next [default: 100].
        #[arg(long, value_name = "MS")]
        epoch_ms: Option<u64>,
        /// Give up on a link silent this long, in milliseconds [default: 10000].
        #[arg(long, value_name = "MS")]
        timeout_ms: Option<u64>,
    },
    /// Where replication stands (GET /replication); --watch redraws a progress line.
    Status {
        /// Follow it until replication ends or switches over.
        #[arg(long)]
        watch: bool,
    },
    /// Stop replicating (POST /replication/stop).
    Stop {
        /// The shadow, when several replicate: unix:PATH or tcp:ADDR:PORT.
        #[arg(long, value_name = "ENDPOINT")]
        to: Option<String>,
    },
    /// Try an update on a clone of the shadow's copy, apart from everything this VM uses
    /// (POST /replication/validate); fails unless the update passed.
    Validate {
        /// The shadow to run the trial, when several replicate.
        #[arg(long, value_name = "ENDPOINT")]
        to: Option<String>,
        /// A new backend for a device, as `ID=BACKEND` with BACKEND in the device flag's form
        /// (`disk0=path=/images/new.img,engine=io_uring`) or as a JSON object; repeatable.
        #[arg(long = "device", value_name = "ID=BACKEND", value_parser = parse_device_update)]
        devices: Vec<(String, Value)>,
        /// A new RAM backing: anonymous, memfd, hugetlbfs or file=PATH.
        #[arg(long, value_name = "BACKING", value_parser = parse_backing)]
        ram_backing: Option<Value>,
        /// Health check: how long to watch the clone [default: 500].
        #[arg(long, value_name = "MS")]
        window_ms: Option<u64>,
    },
    /// Freeze this VM and hand it to the shadow (POST /replication/switchover); it comes back
    /// by itself if the VM fails its health check there.
    Switchover {
        /// The shadow to switch to, when several replicate.
        #[arg(long, value_name = "ENDPOINT")]
        to: Option<String>,
        /// Apply the update of this passed validation on the shadow.
        #[arg(long, value_name = "ID")]
        validation: Option<u64>,
        /// Health check: how long to watch the VM on the shadow [default: 500].
        #[arg(long, value_name = "MS")]
        window_ms: Option<u64>,
    },
    /// After a switchover: the shadow keeps the VM, this one ends (POST /replication/commit).
    Commit,
    /// After a switchover: the shadow stops, this VM runs on (POST /replication/rollback).
    Rollback,
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
    Devices {
        /// One device: disk0, disk1, ..., net0, ..., vsock0 unless the configuration named it.
        id: Option<String>,
    },
    /// Replace a device's backend while the guest runs (POST /devices/ID/swap).
    Swap(SwapArgs),
    /// Swaps and their timelines (GET /swaps[/ID]).
    Swaps {
        /// One swap, by the id `vmm ctl swap` printed.
        id: Option<u64>,
        /// With an ID: wait for the swap to end, showing its progress.
        #[arg(long, requires = "id")]
        wait: bool,
    },
    /// Guest RAM regions and their backings (GET /memory/regions).
    Memory,
    /// Replace a RAM region's backing (POST /memory/regions/SLOT/swap).
    MemorySwap {
        /// The region's slot, as `vmm ctl memory` lists it (0 is the RAM below the 32-bit
        /// MMIO gap, 1 the RAM above it).
        slot: u32,
        /// The new backing: anonymous, memfd, hugetlbfs or file=PATH (created; a relative
        /// PATH is taken from this directory).
        #[arg(value_parser = parse_backing)]
        backing: Value,
        /// Compare old and new contents before resuming the guest.
        #[arg(long)]
        verify: bool,
    },
    /// Snapshots of the running VM (POST /snapshots); continue one with `vmm run --restore DIR`.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Replication to a shadow VMM, switchover, commit and rollback (/replication).
    #[command(subcommand)]
    Replicate(ReplicateCommand),
    /// Type TEXT at the guest's serial console (POST /serial/input), as if on the terminal of
    /// `vmm run`; works while it runs in the background. Use $'q\n' for control characters.
    SerialInput {
        /// The bytes to send.
        text: String,
    },
    /// Counters in the Prometheus text format (GET /metrics).
    Metrics,
    /// The API's OpenAPI document (GET /openapi.json).
    Openapi,
    /// Any request: METHOD PATH [JSON-BODY].
    Raw {
        /// GET, PATCH, POST, ...
        method: String,
        /// The path, with its query: /swaps/3?wait_ms=1000.
        path: String,
        /// The JSON body.
        body: Option<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Mode {
    /// Another backend for the same disk, NIC or vsock socket.
    Switch,
    /// Copy the disk to a new image while the guest runs, then serve from it.
    Migrate,
    /// A different disk image (needs --allow-new-image; the guest sees a capacity change).
    #[value(alias = "new_image")]
    NewImage,
}

#[derive(Args)]
pub struct SwapArgs {
    /// The device: disk0, net0, vsock0, ... (`vmm ctl devices` lists them).
    pub id: String,
    /// The new backend in the device flag's form (`path=FILE,engine=io_uring`,
    /// `nbd=unix:PATH`, `tap=NAME`, `unix=PATH`, `socket=PATH`) or as a JSON object;
    /// relative paths are taken from this directory.
    #[arg(value_parser = parse_backend)]
    pub backend: Value,
    /// What kind of swap.
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

/// `key=value,...` (the device flags' syntax) or a JSON object. Paths become absolute: the
/// VMM does not share our working directory (and its API refuses relative paths).
/// A shadow's endpoint as the VMM must see it: it does not share our directory, so a
/// relative socket path is made ours.
fn shadow_endpoint(to: &str) -> String {
    match to.strip_prefix("unix:") {
        Some(path) if !path.starts_with('/') => format!("unix:{}", absolute(path)),
        _ => to.to_string(),
    }
}

/// `ID=BACKEND`: a device and its new backend.
fn parse_device_update(s: &str) -> Result<(String, Value), String> {
    match s.split_once('=') {
        Some((id, backend)) if !id.is_empty() && !id.contains(',') => Ok((id.to_string(), parse_backend(backend)?)),
        _ => Err(format!("expected ID=BACKEND, as in disk0=path=/images/new.img; got {s:?}")),
    }
}

fn parse_backend(s: &str) -> Result<Value, String> {
    let mut map = if s.trim_start().starts_with('{') {
        match serde_json::from_str(s).map_err(|e| format!("invalid JSON: {e}"))? {
            Value::Object(map) => map,
            _ => return Err("expected a JSON object".into()),
        }
    } else {
        let mut map = Map::new();
        for pair in s.split(',').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').ok_or_else(|| {
                format!(
                    "{pair:?} is not key=value: name the setting, e.g. path={pair} for a disk, tap={pair} for a NIC"
                )
            })?;
            let value = match (key, value) {
                ("readonly", "on" | "true") => Value::Bool(true),
                ("readonly", "off" | "false") => Value::Bool(false),
                _ => Value::from(value),
            };
            map.insert(key.to_string(), value);
        }
        map
    };
    if map.is_empty() {
        return Err("empty backend".into());
    }
    for (key, value) in map.iter_mut() {
        let Value::String(text) = value else { continue };
        match key.as_str() {
            "path" | "socket" | "unix" => *text = absolute(text),
            "nbd" if text.starts_with("unix:") => *text = format!("unix:{}", absolute(&text["unix:".len()..])),
            _ => {}
        }
    }
    Ok(Value::Object(map))
}

fn absolute(path: &str) -> String {
    std::path::absolute(path).map_or_else(|_| path.to_string(), |p| p.to_string_lossy().into_owned())
}

fn parse_backing(s: &str) -> Result<Value, String> {
    let backing = match s.parse::<RamBacking>()? {
        RamBacking::File { path } => RamBacking::File { path: std::path::absolute(&path).unwrap_or(path) },
        other => other,
    };
    serde_json::to_value(backing).map_err(|e| e.to_string())
}

fn parse_timeout(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(secs) if secs > 0.0 && secs <= 86_400.0 => Ok(secs),
        _ => Err(format!("{s:?}: expected seconds, more than 0 and at most 86400")),
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

/// How long `vmm ctl` waits for an answer by default, and for calls that copy guest RAM.
const TIMEOUT_S: f64 = 10.0;
const SLOW_TIMEOUT_S: f64 = 300.0;

/// How long `vmm ctl` waits for a socket that does not exist yet (or refuses connections).
const STARTUP_WAIT: Duration = Duration::from_secs(2);

/// Following a swap, each poll asks the server to wait this long for it to end (at most half
/// the timeout): also how often the progress line moves.
const POLL_MS: u64 = 500;

pub fn run(args: &CtlArgs) -> Result<u8, Failure> {
    let Some(api_sock) = &args.api_sock else {
        return Err(Failure::bad_input(anyhow!("which VMM? pass --api-sock PATH (or set VMM_API_SOCK)")));
    };
    let slow = matches!(
        args.command,
        CtlCommand::Snapshot(_)
            | CtlCommand::MemorySwap { .. }
            | CtlCommand::Replicate(
                ReplicateCommand::Switchover { .. }
                    | ReplicateCommand::Validate { .. }
                    | ReplicateCommand::Commit
                    | ReplicateCommand::Rollback
            )
    );
    let default_secs = if slow { SLOW_TIMEOUT_S } else { TIMEOUT_S };
    let timeout = Duration::from_secs_f64(args.timeout.unwrap_or(default_secs));
    // A poll's answer comes after up to `poll_ms` by design: well inside the timeout.
    let poll_ms = POLL_MS.min(timeout.as_millis() as u64 / 2);
    // A VMM just started in the background may not have bound its socket yet.
    let startup = timeout.min(STARTUP_WAIT);
    let mut client = ApiClient::connect_within(api_sock, timeout, startup).map_err(|e| Failure::runtime(anyhow!(e)))?;
    let flags = match &args.command {
        CtlCommand::Swap(_) => SWAP_FLAGS,
        _ => &[],
    };
    let mut call = |method: &str, path: &str, body: Option<Value>| -> Result<Response, Failure> {
        let response = match body {
            Some(body) => client.send_json(method, path, &body),
            None => client.request(method, path, None),
        };
        let response = response.map_err(|e| match e {
            ClientError::NoAnswer { .. } => Failure::runtime(anyhow!("{e}; a slow call may need a longer --timeout")),
            e => Failure::runtime(anyhow!(e)),
        })?;
        if response.status >= 400 {
            return Err(Failure::runtime(api_error(&response, flags)));
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
            return wait_for_swap(&mut call, &id, poll_ms);
        }
        CtlCommand::Swaps { id: None, .. } => call("GET", "/swaps", None)?,
        CtlCommand::Swaps { id: Some(id), wait: false } => call("GET", &format!("/swaps/{id}"), None)?,
        CtlCommand::Swaps { id: Some(id), wait: true } => return wait_for_swap(&mut call, &id.to_string(), poll_ms),
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
        CtlCommand::SerialInput { text } => {
            let response = call("POST", "/serial/input", Some(json!({ "data": text })))?;
            let answer: Value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
            let (sent, requested) = (answer["bytes"].as_u64(), answer["requested"].as_u64());
            if sent != requested {
                let (sent, requested) = (sent.unwrap_or(0), requested.unwrap_or(0));
                let e = anyhow!("the guest took {sent} of {requested} bytes: it is not reading its serial port");
                return Err(Failure::runtime(e));
            }
            response
        }
        CtlCommand::Replicate(command) => match command {
            ReplicateCommand::Start { to, epoch_ms, timeout_ms } => {
                let mut body = json!({ "target": shadow_endpoint(to) });
                if let Some(ms) = epoch_ms {
                    body["epoch_ms"] = json!(ms);
                }
                if let Some(ms) = timeout_ms {
                    body["timeout_ms"] = json!(ms);
                }
                // A shadow started in the background a moment ago may not listen yet.
                let asked = std::time::Instant::now();
                loop {
                    match call("POST", "/replication", Some(body.clone())) {
                        Err(e)
                            if e.error.to_string().contains("cannot reach the shadow") && asked.elapsed() < startup =>
                        {
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        answer => break answer?,
                    }
                }
            }
            ReplicateCommand::Status { watch: false } => call("GET", "/replication", None)?,
            ReplicateCommand::Status { watch: true } => return watch_replication(&mut call, poll_ms),
            ReplicateCommand::Stop { to } => {
                let body = to.as_deref().map(|to| json!({ "target": shadow_endpoint(to) }));
                call("POST", "/replication/stop", body)?
            }
            ReplicateCommand::Validate { to, devices, ram_backing, window_ms } => {
                let mut update = json!({});
                if !devices.is_empty() {
                    let devices: Map<String, Value> =
                        devices.iter().map(|(id, backend)| (id.clone(), json!({ "backend": backend }))).collect();
                    update["devices"] = Value::Object(devices);
                }
                if let Some(backing) = ram_backing {
                    update["ram_backing"] = backing.clone();
                }
                let mut body = json!({ "update": update });
                if let Some(to) = to {
                    body["target"] = json!(shadow_endpoint(to));
                }
                if let Some(ms) = window_ms {
                    body["health"] = json!({ "window_ms": ms });
                }
                let response = call("POST", "/replication/validate", Some(body))?;
                print(&response);
                let record: Value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
                return match record["report"]["passed"].as_bool() {
                    Some(true) => Ok(0),
                    _ => {
                        let reason = record["report"]["reason"].as_str().unwrap_or("no verdict");
                        Err(Failure::runtime(anyhow!("the update failed its trial: {reason}")))
                    }
                };
            }
            ReplicateCommand::Switchover { to, validation, window_ms } => {
                let mut body = json!({});
                if let Some(to) = to {
                    body["target"] = json!(shadow_endpoint(to));
                }
                if let Some(id) = validation {
                    body["validation"] = json!(id);
                }
                if let Some(ms) = window_ms {
                    body["health"] = json!({ "window_ms": ms });
                }
                call("POST", "/replication/switchover", Some(body))?
            }
            ReplicateCommand::Commit => call("POST", "/replication/commit", None)?,
            ReplicateCommand::Rollback => call("POST", "/replication/rollback", None)?,
        },
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

/// Follows a swap until it ends, with a progress line on stderr (redrawn in place on a
/// terminal, one line per phase otherwise); prints the final record.
fn wait_for_swap(
    call: &mut impl FnMut(&str, &str, Option<Value>) -> Result<Response, Failure>,
    id: &str,
    poll_ms: u64,
) -> Result<u8, Failure> {
    let mut progress = Progress::new(id);
    loop {
        let response = call("GET", &format!("/swaps/{id}?wait_ms={poll_ms}"), None)?;
        let record: Value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
        match record.get("state").and_then(Value::as_str) {
            Some("running") => progress.show(&record),
            Some(state) => {
                progress.finish(&record);
                print(&response);
                return Ok(if state == "committed" { 0 } else { 1 });
            }
            None => return Err(Failure::runtime(anyhow!("swap {id}: the API answered without a state"))),
        }
    }
}

/// Redraws a line with replication's progress until it ends or switches over.
fn watch_replication(
    call: &mut impl FnMut(&str, &str, Option<Value>) -> Result<Response, Failure>,
    poll_ms: u64,
) -> Result<u8, Failure> {
    use std::io::IsTerminal;
    let terminal = std::io::stderr().is_terminal();
    loop {
        let response = call("GET", "/replication", None)?;
        let status: Value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
        let shadows = status["shadows"].as_array().cloned().unwrap_or_default();
        let state_of = |shadow: &Value| shadow["state"].as_str().unwrap_or("?").to_string();
        // One part per shadow; with one, no target needed.
        let parts: Vec<String> = shadows
            .iter()
            .map(|shadow| {
                let n = |k: &str| shadow[k].as_u64().unwrap_or(0);
                let totals = &shadow["totals"];
                let (raw, sent) =
                    (totals["raw_bytes"].as_u64().unwrap_or(0), totals["sent_bytes"].as_u64().unwrap_or(0));
                let to = if shadows.len() > 1 {
                    format!(" to {}", shadow["target"].as_str().unwrap_or("?"))
                } else {
                    String::new()
                };
                format!(
                    "replication{to} {}: {} epochs, lag {:.1} ms, {} MiB of pages sent as {} MiB, {:.1} MiB/s",
                    state_of(shadow),
                    n("epochs"),
                    n("lag_us") as f64 / 1e3,
                    raw >> 20,
                    sent >> 20,
                    n("rate_bytes_per_s") as f64 / f64::from(1 << 20)
                )
            })
            .collect();
        let line = if parts.is_empty() { "no replication".to_string() } else { parts.join(" | ") };
        let running =
            shadows.iter().any(|s| matches!(state_of(s).as_str(), "starting" | "replicating" | "switching_over"));
        let failed = !shadows.is_empty() && shadows.iter().all(|s| state_of(s) == "failed");
        match (terminal, running) {
            (true, true) => eprint!("\r\x1b[K{line}"),
            (true, false) => eprintln!("\r\x1b[K{line}"),
            (false, _) => eprintln!("{line}"),
        }
        if !running {
            print(&response);
            return Ok(if failed { 1 } else { 0 });
        }
        std::thread::sleep(Duration::from_millis(poll_ms.max(100)));
    }
}

/// The live line `swap --wait` draws: the phase, and for a copy how far it got and how fast.
struct Progress {
    id: String,
    terminal: bool,
    started: std::time::Instant,
    last_line: String,
}

impl Progress {
    fn new(id: &str) -> Self {
        use std::io::IsTerminal;
        let terminal = std::io::stderr().is_terminal();
        Self { id: id.to_string(), terminal, started: std::time::Instant::now(), last_line: String::new() }
    }

    /// How far a migration's copy got, if the swap copies: `, 12 of 64 MiB copied (19%), ...`.
    fn copy_progress(&self, record: &Value) -> String {
        let Some(copy) = record.get("copy") else { return String::new() };
        let field = |k: &str| copy.get(k).and_then(Value::as_u64).unwrap_or(0);
        // Chunks the guest rewrote are copied again: what is done is capped at the disk.
        let (total, copy_us) = (field("bytes_total"), field("copy_us"));
        let copied = field("bytes_copied");
        let done = copied.min(total);
        let percent = if total == 0 { 100.0 } else { done as f64 * 100.0 / total as f64 };
        let elapsed_s = if copy_us > 0 { copy_us as f64 / 1e6 } else { self.started.elapsed().as_secs_f64() };
        let rate = copied as f64 / elapsed_s.max(1e-3) / f64::from(1 << 20);
        format!(", {} of {} MiB copied ({percent:.0}%), {rate:.0} MiB/s", done >> 20, total >> 20)
    }

    fn show(&mut self, record: &Value) {
        let phase = record.get("phase").and_then(Value::as_str).unwrap_or("?");
        let line = format!("swap {}: {phase}{}", self.id, self.copy_progress(record));
        if self.terminal {
            eprint!("\r\x1b[K{line}");
        } else if !self.last_line.starts_with(&format!("swap {}: {phase}", self.id)) {
            // Not a terminal: a line per phase, not per poll.
            eprintln!("{line}");
        }
        self.last_line = line;
    }

    fn finish(&mut self, record: &Value) {
        let state = record.get("state").and_then(Value::as_str).unwrap_or("?").replace('_', " ");
        let line = format!("swap {} {state}{}", self.id, self.copy_progress(record));
        let clear = if self.terminal { "\r\x1b[K" } else { "" };
        eprintln!("{clear}{line}");
        self.last_line.clear();
    }
}

impl Drop for Progress {
    /// An error while the line is drawn starts on a line of its own.
    fn drop(&mut self) {
        if self.terminal && !self.last_line.is_empty() {
            eprintln!();
        }
    }
}

/// API fields of a swap request and the `vmm ctl swap` flags that set them, so that errors
/// name what the user typed.
const SWAP_FLAGS: &[(&str, &str)] = &[
    ("allow_new_image", "--allow-new-image"),
    ("drain_timeout_ms", "--drain-timeout-ms"),
    ("verify.window_ms", "--verify-window-ms"),
    ("verify.min_requests", "--verify-min-requests"),
    ("verify.max_error_rate", "--verify-max-error-rate"),
    ("verify.max_mean_latency_us", "--verify-max-mean-latency-us"),
    ("mode", "--mode"),
    ("fault", "--fault"),
];

fn json_field(response: &Response, key: &str) -> Option<String> {
    let value: Value = serde_json::from_slice(&response.body).ok()?;
    match value.get(key)? {
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

/// The API's error as the user should read it: where the field at fault came from one of
/// our flags, named by the flag.
fn api_error(response: &Response, flags: &[(&str, &str)]) -> anyhow::Error {
    let body: Value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
    let mut message = body.get("error").and_then(Value::as_str).unwrap_or("(no error message)").to_string();
    let field = body.get("field").and_then(Value::as_str);
    let flag = field.and_then(|field| flags.iter().find(|(f, _)| *f == field)).map(|(f, flag)| (*f, *flag));
    if let Some((field, flag)) = flag {
        // Messages name fields by their whole path or its last segment (`window_ms`).
        message = replace_word(&message, field, flag);
        if let Some((_, short)) = field.rsplit_once('.') {
            message = replace_word(&message, short, flag);
        }
        return anyhow!("{message} [HTTP {}]", response.status);
    }
    match field {
        Some(field) => anyhow!("{message} [HTTP {}, field {field}]", response.status),
        None => anyhow!("{message} [HTTP {}]", response.status),
    }
}

/// `text` with each whole-word `word` (not inside a longer identifier) replaced by `with`.
fn replace_word(text: &str, word: &str, with: &str) -> String {
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '.';
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(word) {
        let before = rest[..at].chars().next_back();
        let after = rest[at + word.len()..].chars().next();
        out.push_str(&rest[..at]);
        if before.is_some_and(is_ident) || after.is_some_and(|c| is_ident(c) && c != '.') {
            out.push_str(word);
        } else {
            out.push_str(with);
        }
        rest = &rest[at + word.len()..];
    }
    out.push_str(rest);
    out
}

fn print(response: &Response) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(&response.body);
    if !response.body.ends_with(b"\n") {
        let _ = out.write_all(b"\n");
    }
}

#[cfg(test)]
mod tests {
    use super::replace_word;

    #[test]
    fn only_whole_words_become_flags() {
        assert_eq!(
            replace_word("mode: mode migrate applies to disks", "mode", "--mode"),
            "--mode: --mode migrate applies to disks"
        );
        assert_eq!(replace_word("by default, fault: no", "fault", "--fault"), "by default, --fault: no");
        assert_eq!(
            replace_word("verify.window_ms: too long", "verify.window_ms", "--verify-window-ms"),
            "--verify-window-ms: too long"
        );
        assert_eq!(
            replace_word("confirm it with allow_new_image", "allow_new_image", "--allow-new-image"),
            "confirm it with --allow-new-image"
        );
        assert_eq!(replace_word("a new_image swap", "image", "--x"), "a new_image swap");
    }
}
