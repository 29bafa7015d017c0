//! What each endpoint does: parse the request, call the [`Vm`], shape the answer. The route
//! table is data, so the OpenAPI test can check the document and the server name the same
//! endpoints.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::http::{Request, Response};
use super::{ApiError, metrics};
use crate::config::ShmConfig;
use crate::config::json::{self, FieldError};
use crate::device_manager::DeviceEntry;
use crate::replication::{ReplicationRequest, SwitchoverRequest, ValidateRequest};
use crate::snapshot::SnapshotRequest;
use crate::swap::{MemorySwapRequest, SwapRecord, SwapRequest};
use crate::{RamBacking, Vm, VmState};

/// Every endpoint, as (method, path template). Kept in step with `openapi.json` by a test.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/vm"),
    ("PATCH", "/vm"),
    ("GET", "/devices"),
    ("GET", "/devices/{id}"),
    ("POST", "/devices/{id}/swap"),
    ("GET", "/swaps"),
    ("GET", "/swaps/{id}"),
    ("GET", "/memory/regions"),
    ("POST", "/memory/regions/{slot}/swap"),
    ("POST", "/snapshots"),
    ("POST", "/serial/input"),
    ("GET", "/replication"),
    ("POST", "/replication"),
    ("POST", "/replication/stop"),
    ("POST", "/replication/switchover"),
    ("POST", "/replication/validate"),
    ("POST", "/replication/commit"),
    ("POST", "/replication/rollback"),
    ("GET", "/shm"),
    ("PUT", "/shm/{window}"),
    ("DELETE", "/shm/{window}"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
];

/// Longest a `GET /swaps/{id}?wait_ms=` may wait.
const MAX_WAIT: Duration = Duration::from_secs(60);

/// Matches `path` against a template; returns the `{...}` parameters.
fn match_template<'a>(template: &str, path: &'a str) -> Option<Vec<&'a str>> {
    let mut params = Vec::new();
    let mut parts = path.trim_end_matches('/').split('/');
    for want in template.split('/') {
        let got = parts.next()?;
        if want.starts_with('{') {
            if got.is_empty() {
                return None;
            }
            params.push(got);
        } else if want != got {
            return None;
        }
    }
    parts.next().is_none().then_some(params)
}

/// Answers one request.
pub fn handle(vm: &Arc<Vm>, request: &Request) -> Response {
    let mut allowed = Vec::new();
    for &(method, template) in ROUTES {
        let Some(params) = match_template(template, &request.path) else { continue };
        if method != request.method {
            allowed.push(method);
            continue;
        }
        let result = dispatch(vm, request, method, template, &params);
        return result.unwrap_or_else(|e| e.response());
    }
    if allowed.is_empty() {
        return ApiError::new(404, format!("no endpoint {}", request.path)).response();
    }
    let message = format!("{} does not support {}; allowed: {}", request.path, request.method, allowed.join(", "));
    ApiError::new(405, message).response().with_header("Allow", allowed.join(", "))
}

fn dispatch(
    vm: &Arc<Vm>,
    request: &Request,
    method: &str,
    template: &str,
    params: &[&str],
) -> Result<Response, ApiError> {
    match (method, template) {
        ("GET", "/vm") => Ok(Response::json(200, &vm_status(vm))),
        ("PATCH", "/vm") => patch_vm(vm, request),
        ("GET", "/devices") => {
            let devices = vm.devices();
            let list: Vec<_> = devices.devices().iter().map(|d| device_status(vm, d)).collect();
            Ok(Response::json(200, &list))
        }
        ("GET", "/devices/{id}") => {
            let devices = vm.devices();
            let entry = devices.find(params[0]).ok_or_else(|| no_device(params[0]))?;
            Ok(Response::json(200, &device_status(vm, entry)))
        }
        ("POST", "/devices/{id}/swap") => {
            let swap: SwapRequest = body(request)?;
            absolute_backend_paths(&swap.backend)?;
            let handle = vm.swap_device(params[0], swap)?;
            let record = handle.snapshot();
            Ok(Response::json(202, &record).with_header("Location", format!("/swaps/{}", record.id)))
        }
        ("GET", "/swaps") => Ok(Response::json(200, &vm.swaps().list())),
        ("GET", "/swaps/{id}") => get_swap(vm, request, params[0]).map(|r| Response::json(200, &r)),
        ("GET", "/memory/regions") => Ok(Response::json(200, &vm.ram().regions())),
        ("POST", "/memory/regions/{slot}/swap") => {
            let slot = params[0].parse::<u32>().map_err(|_| no_region(params[0]))?;
            let swap: MemorySwapRequest = body(request)?;
            if let RamBacking::File { path } = &swap.backing {
                absolute("backing.path", path)?;
            }
            Ok(Response::json(200, &vm.swap_memory(slot, &swap)?))
        }
        ("POST", "/snapshots") => {
            let request: SnapshotRequest = body(request)?;
            absolute("path", &request.path)?;
            Ok(Response::json(201, &vm.snapshot(&request)?))
        }
        ("POST", "/serial/input") => serial_input(vm, request),
        ("GET", "/replication") => Ok(Response::json(200, &vm.replication())),
        ("POST", "/replication") => {
            let request: ReplicationRequest = body(request)?;
            Ok(Response::json(202, &vm.start_replication(&request)?))
        }
        ("POST", "/replication/stop") => {
            vm.stop_replication(&optional_body(request)?)?;
            Ok(Response::json(200, &vm.replication()))
        }
        ("POST", "/replication/switchover") => {
            // A plain switchover, to the only shadow, applies nothing.
            let request: SwitchoverRequest = optional_body(request)?;
            Ok(Response::json(200, &vm.switch_over(&request)?))
        }
        ("POST", "/replication/validate") => {
            let request: ValidateRequest = body(request)?;
            for (id, swap) in &request.update.devices {
                if let Some(backend) = swap.get("backend") {
                    absolute_backend_paths(backend).map_err(|mut e| {
                        e.field = e.field.map(|f| format!("update.devices.{id}.{f}"));
                        e
                    })?;
                }
            }
            if let Some(RamBacking::File { path }) = &request.update.ram_backing {
                absolute("update.ram_backing.path", path)?;
            }
            Ok(Response::json(200, &vm.validate_update(&request)?))
        }
        ("POST", "/replication/commit") => Ok(Response::json(200, &vm.commit_switchover()?)),
        ("POST", "/replication/rollback") => Ok(Response::json(200, &vm.rollback_switchover()?)),
        ("GET", "/shm") => Ok(Response::json(200, &vm.shm())),
        ("PUT", "/shm/{window}") => {
            let window = params[0].parse::<u32>().map_err(|_| no_window(params[0]))?;
            let config: ShmConfig = body(request)?;
            config.check().map_err(|e| FieldError::new("region", e))?;
            absolute("socket", &config.socket)?;
            Ok(Response::json(200, &vm.attach_shm(window, &config)?))
        }
        ("DELETE", "/shm/{window}") => {
            let window = params[0].parse::<u32>().map_err(|_| no_window(params[0]))?;
            let timeout = match request.query("timeout_ms") {
                Some(ms) => Some(Duration::from_millis(
                    ms.parse::<u64>()
                        .ok()
                        .filter(|&ms| ms <= 60_000)
                        .ok_or_else(|| ApiError::new(400, format!("timeout_ms={ms:?}: expected 0 to 60000")))?,
                )),
                None => None,
            };
            Ok(Response::json(200, &vm.detach_shm(window, timeout)?))
        }
        ("GET", "/metrics") => Ok(Response::new(200, "text/plain; version=0.0.4", metrics::render(vm).into_bytes())),
        ("GET", "/openapi.json") => Ok(Response::new(200, "application/json", super::OPENAPI.as_bytes().to_vec())),
        _ => Err(ApiError::new(500, format!("route {method} {template} has no handler"))),
    }
}

/// A body that may be left out, its defaults then applying.
fn optional_body<T: serde::de::DeserializeOwned + Default>(request: &Request) -> Result<T, ApiError> {
    match request.body.is_empty() {
        true => Ok(T::default()),
        false => body(request),
    }
}

fn body<T: serde::de::DeserializeOwned>(request: &Request) -> Result<T, ApiError> {
    if let Some(ct) = request.header("content-type")
        && !ct.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
    {
        return Err(ApiError::new(415, format!("expected Content-Type application/json, got {ct:?}")));
    }
    json::from_slice(&request.body).map_err(ApiError::from)
}

/// Paths in requests must be absolute: the VMM's working directory is not the caller's, and a
/// relative path would quietly create or open files wherever the VMM happened to start.
fn absolute(field: &str, path: &Path) -> Result<(), ApiError> {
    if path.is_absolute() {
        return Ok(());
    }
    let message = format!(
        "{} is a relative path: give an absolute one (the VMM does not share your working directory)",
        path.display()
    );
    Err(FieldError::new(field, message).into())
}

/// A backend's path-valued settings, whatever the device kind: `path` (a disk image), `socket`
/// (vsock), `unix` (a NIC's datagram peer) and `nbd=unix:PATH`.
fn absolute_backend_paths(backend: &serde_json::Value) -> Result<(), ApiError> {
    let Some(fields) = backend.as_object() else { return Ok(()) };
    for (key, value) in fields {
        let Some(text) = value.as_str() else { continue };
        let path = match key.as_str() {
            "path" | "socket" | "unix" => text,
            "nbd" => match text.strip_prefix("unix:") {
                Some(path) => path,
                None => continue,
            },
            _ => continue,
        };
        absolute(&format!("backend.{key}"), Path::new(path))?;
    }
    Ok(())
}

fn no_device(id: &str) -> ApiError {
    ApiError::new(404, format!("no device {id:?}"))
}

fn no_window(window: &str) -> ApiError {
    ApiError::new(404, format!("no shared-memory window {window:?}: windows are numbered from 0"))
}

fn no_region(slot: &str) -> ApiError {
    ApiError::new(404, format!("no RAM region with slot {slot:?}"))
}

/// `GET /vm`.
#[derive(Serialize)]
struct VmStatus {
    /// running, paused or exited.
    state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    exit: Option<String>,
    vcpus: u32,
    mem_bytes: u64,
    boot_protocol: String,
    kernel_format: String,
}

fn vm_status(vm: &Vm) -> VmStatus {
    let (state, exit) = match vm.state() {
        VmState::Running => ("running", None),
        VmState::Paused => ("paused", None),
        VmState::Exited(exit) => ("exited", Some(exit.to_string())),
    };
    let info = vm.info();
    VmStatus {
        state,
        exit,
        vcpus: info.vcpus,
        mem_bytes: info.mem_bytes,
        boot_protocol: info.boot_protocol.to_string(),
        kernel_format: info.kernel_format.to_string(),
    }
}

/// `PATCH /vm`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VmPatch {
    state: RequestedState,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum RequestedState {
    Running,
    Paused,
    Stopped,
}

fn patch_vm(vm: &Vm, request: &Request) -> Result<Response, ApiError> {
    let patch: VmPatch = body(request)?;
    match patch.state {
        RequestedState::Running => vm.resume()?,
        RequestedState::Paused => vm.pause()?,
        RequestedState::Stopped => {
            vm.stop();
        }
    }
    Ok(Response::json(200, &vm_status(vm)))
}

/// `POST /serial/input`: bytes typed at the guest's serial console.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SerialInputRequest {
    data: String,
}

/// The most characters one `POST /serial/input` takes (its document's `maxLength`).
const SERIAL_INPUT_MAX_CHARS: usize = 65_000;

/// How long `POST /serial/input` waits for a guest that reads its console slowly.
const SERIAL_INPUT_WAIT: Duration = Duration::from_secs(2);

fn serial_input(vm: &Vm, request: &Request) -> Result<Response, ApiError> {
    let input: SerialInputRequest = body(request)?;
    let chars = input.data.chars().count();
    if chars > SERIAL_INPUT_MAX_CHARS {
        let message = format!("{chars} characters; at most {SERIAL_INPUT_MAX_CHARS} at once");
        return Err(FieldError::new("data", message).into());
    }
    if let VmState::Exited(exit) = vm.state() {
        return Err(ApiError::new(409, format!("the VM has exited ({exit})")));
    }
    let bytes = input.data.as_bytes();
    // A short write, as write(2) has: what went in cannot be taken back, so a guest that
    // stops reading is not an error of the request, and the answer says how much it took.
    let sent = vm.serial_input().send_all(bytes, SERIAL_INPUT_WAIT);
    Ok(Response::json(200, &serde_json::json!({ "bytes": sent, "requested": bytes.len() })))
}

/// `GET /devices/{id}`.
#[derive(Serialize)]
struct DeviceStatus {
    id: String,
    kind: &'static str,
    backend: String,
    mmio_base: u64,
    mmio_size: u64,
    irq: u32,
    /// Request counters per direction ("io" for disks, "rx" and "tx" for NICs and vsock).
    counters: std::collections::BTreeMap<&'static str, Counters>,
    /// The most recent swap of this device.
    #[serde(skip_serializing_if = "Option::is_none")]
    last_swap: Option<SwapSummary>,
}

#[derive(Serialize)]
struct Counters {
    requests: u64,
    errors: u64,
    bytes_read: u64,
    bytes_written: u64,
    latency_mean_us: u64,
}

#[derive(Serialize)]
struct SwapSummary {
    id: u64,
    state: crate::swap::SwapState,
}

fn device_status(vm: &Vm, entry: &DeviceEntry) -> DeviceStatus {
    let counters = entry
        .handle
        .metrics()
        .into_iter()
        .map(|(direction, m)| {
            let s = m.snapshot();
            let latency_mean_us = s.latency_sum_us.checked_div(s.requests).unwrap_or(0);
            let c = Counters {
                requests: s.requests,
                errors: s.errors,
                bytes_read: s.bytes_read,
                bytes_written: s.bytes_written,
                latency_mean_us,
            };
            (direction, c)
        })
        .collect();
    let last_swap = vm
        .swaps()
        .list()
        .into_iter()
        .rev()
        .find(|s| s.device == entry.id)
        .map(|s| SwapSummary { id: s.id, state: s.state });
    DeviceStatus {
        id: entry.id.clone(),
        kind: entry.handle.kind(),
        backend: entry.handle.backend_description(),
        mmio_base: entry.slot.base,
        mmio_size: entry.slot.size,
        irq: entry.slot.irq,
        counters,
        last_swap,
    }
}

fn get_swap(vm: &Vm, request: &Request, id: &str) -> Result<SwapRecord, ApiError> {
    let handle = id
        .parse()
        .ok()
        .and_then(|id| vm.swaps().get(id))
        .ok_or_else(|| ApiError::new(404, format!("no swap {id:?}")))?;
    match request.query("wait_ms") {
        None => Ok(handle.snapshot()),
        Some(ms) => {
            let ms: u64 = ms.parse().map_err(|_| {
                ApiError::from(FieldError::new("wait_ms", format!("expected milliseconds, got {ms:?}")))
            })?;
            Ok(handle.wait(Duration::from_millis(ms).min(MAX_WAIT)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_match_whole_paths() {
        assert_eq!(match_template("/devices/{id}", "/devices/disk0"), Some(vec!["disk0"]));
        assert_eq!(match_template("/devices/{id}", "/devices/disk0/"), Some(vec!["disk0"]));
        assert_eq!(match_template("/devices/{id}", "/devices/"), None);
        assert_eq!(match_template("/devices/{id}", "/devices/a/b"), None);
        assert_eq!(match_template("/devices/{id}/swap", "/devices/a/swap"), Some(vec!["a"]));
        assert_eq!(match_template("/vm", "/vm"), Some(vec![]));
        assert_eq!(match_template("/vm", "/vmx"), None);
    }
}
