//! Updates a switchover carries to the shadow, and the health check the VM passes after a
//! switchover or in a trial (see [`super::trial`]).
//!
//! An update is applied to the restored VM with the live swap machinery (device backends,
//! RAM backing), so it is drained, verified and rolled back like any swap; then the whole VM
//! is watched for a window, judged like a swapped backend: it keeps running, its devices'
//! requests keep succeeding. A new `vmm` build is not part of the update: it is the shadow
//! itself (`/path/to/new/vmm shadow ...`), so a trial runs the very binary a switchover runs.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::json::{self, FieldError};
use crate::memory::RamBacking;
use crate::swap::{self, MemorySwapRequest, SwapRequest, SwapState, VerifyPolicy};
use crate::vm::Vm;

/// What to change on the shadow's VM before it takes over.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmUpdate {
    /// New device backends by device id, each a swap request as `PUT /devices/{id}/backend`
    /// takes it (`{"backend": {...}, "verify": {...}}`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub devices: BTreeMap<String, serde_json::Value>,
    /// A new backing for guest RAM (every region).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram_backing: Option<RamBacking>,
}

impl VmUpdate {
    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty() && self.ram_backing.is_none()
    }

    /// The device swaps, parsed (naming the field at fault).
    pub fn device_swaps(&self) -> Result<Vec<(String, SwapRequest)>, FieldError> {
        self.devices
            .iter()
            .map(|(id, body)| match json::from_value::<SwapRequest>(body.clone()) {
                Ok(request) => Ok((id.clone(), request)),
                Err(e) => Err(e.nested_in(&format!("update.devices.{id}"))),
            })
            .collect()
    }

    /// Refuses, before anything starts, an update that cannot parse.
    pub fn check(&self) -> Result<(), FieldError> {
        self.device_swaps().map(|_| ())
    }
}

/// The longest a health check may watch the VM.
pub const MAX_HEALTH_WINDOW_MS: u64 = 600_000;

/// The health policy of a switchover or a trial: 500 ms with no failed request, by default.
pub fn default_health() -> VerifyPolicy {
    VerifyPolicy { window_ms: 500, ..VerifyPolicy::default() }
}

/// Refuses a health policy no check can run with.
pub fn check_health_policy(field: &str, policy: &VerifyPolicy) -> Result<(), FieldError> {
    swap::check_ms(&format!("{field}.window_ms"), policy.window_ms, MAX_HEALTH_WINDOW_MS)?;
    if !(0.0..=1.0).contains(&policy.max_error_rate) {
        let e = format!("must be between 0 and 1, got {}", policy.max_error_rate);
        return Err(FieldError::new(format!("{field}.max_error_rate"), e));
    }
    Ok(())
}

/// How long one step of an update may take (a swap's drain, probe and verification).
pub(crate) const STEP_TIMEOUT: Duration = Duration::from_secs(120);

/// Applies `update` to `vm`, step by step; returns what each step did, in words. The first
/// step that fails ends it (a swap that failed has rolled itself back).
pub fn apply(vm: &Vm, update: &VmUpdate) -> Result<Vec<String>, String> {
    let mut done = Vec::new();
    let swaps = update.device_swaps().map_err(|e| e.to_string())?;
    for (id, request) in swaps {
        let handle = vm.swap_device(&id, request).map_err(|e| format!("swapping {id}: {e}"))?;
        let record = handle.wait(STEP_TIMEOUT);
        if record.state != SwapState::Committed {
            let reason = record.reason.unwrap_or_else(|| format!("still {:?}", record.phase));
            return Err(format!("swapping {id} to {}: {:?}: {reason}", record.to, record.state));
        }
        done.push(format!("{id}: {} -> {}", record.from, record.to));
    }
    if let Some(backing) = &update.ram_backing {
        let regions = vm.memory_regions();
        if matches!(backing, RamBacking::File { .. }) && regions.len() > 1 {
            return Err(format!("a file backing holds one RAM region, and this VM has {}", regions.len()));
        }
        for region in regions {
            let request = MemorySwapRequest { backing: backing.clone(), verify: false, drain_timeout_ms: 2000 };
            let report = vm.swap_memory(region.slot, &request).map_err(|e| format!("RAM slot {}: {e}", region.slot))?;
            done.push(format!("RAM slot {}: {} -> {}", report.slot, report.from, report.to));
        }
    }
    Ok(done)
}

/// What a health check saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthReport {
    /// Device requests completed during the window, all devices together.
    pub requests: u64,
    /// Of which failed.
    pub errors: u64,
    /// How long it watched, in milliseconds.
    pub watched_ms: u64,
}

/// Watches `vm` for the whole of `policy.window_ms`: it must keep running, and its devices'
/// requests pass the policy as a swapped backend's would.
pub fn check_health(vm: &Vm, policy: &VerifyPolicy) -> Result<HealthReport, String> {
    let started = Instant::now();
    let metrics = vm.request_metrics();
    let alive = || match vm.wait_timeout(Duration::ZERO) {
        Some(exit) => Err(format!("the VM ended: {exit}")),
        None => Ok(()),
    };
    // A swap's verification ends as soon as enough requests succeeded; a VM must last the
    // window, so the count is judged here, at its end.
    let whole_window = VerifyPolicy { min_requests: 0, ..*policy };
    let observed = swap::verify::verify(&whole_window, &metrics, || 0, || 0, alive)?;
    alive()?;
    let succeeded = observed.requests.saturating_sub(observed.errors);
    if succeeded < policy.min_requests {
        let e = format!(
            "only {succeeded} successful request(s) in {} ms, {} required",
            policy.window_ms, policy.min_requests
        );
        return Err(e);
    }
    Ok(HealthReport {
        requests: observed.requests,
        errors: observed.errors,
        watched_ms: started.elapsed().as_millis() as u64,
    })
}
