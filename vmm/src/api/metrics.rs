//! `GET /metrics`: the VM's counters in the Prometheus text exposition format (0.0.4).

use std::collections::BTreeMap;
use std::fmt::Write;

use devices::metrics::{LATENCY_BUCKETS_US, MetricsSnapshot};

use crate::swap::{SWAP_BUCKETS_S, SwapState, SwapTally, TimeHistogram};
use crate::{Vm, VmState};

/// A metric family read off a `T`: name, help, value.
type Family<T, V> = (&'static str, &'static str, fn(&T) -> V);

/// Collects output; `family` writes the HELP and TYPE lines once per metric.
struct Exposition(String);

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &str, value: impl std::fmt::Display) {
        match labels.is_empty() {
            true => {
                let _ = writeln!(self.0, "{name} {value}");
            }
            false => {
                let _ = writeln!(self.0, "{name}{{{labels}}} {value}");
            }
        }
    }

    /// A histogram from non-cumulative `counts` per bucket (+Inf last).
    fn histogram(&mut self, name: &str, labels: &str, bounds_s: &[f64], counts: &[u64], sum_s: f64) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (bound, count) in bounds_s.iter().zip(counts) {
            cumulative += count;
            self.sample(&format!("{name}_bucket"), &format!("{labels}{sep}le=\"{bound}\""), cumulative);
        }
        let total: u64 = counts.iter().sum();
        self.sample(&format!("{name}_bucket"), &format!("{labels}{sep}le=\"+Inf\""), total);
        self.sample(&format!("{name}_sum"), labels, sum_s);
        self.sample(&format!("{name}_count"), labels, total);
    }

    fn time_histogram(&mut self, name: &str, labels: &str, h: &TimeHistogram) {
        self.histogram(name, labels, &SWAP_BUCKETS_S, &h.counts, h.sum_s);
    }
}

/// Escapes a label value (backslash, quote, newline).
fn label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

pub fn render(vm: &Vm) -> String {
    let mut out = Exposition(String::new());
    let state = vm.state();
    out.family("vmm_vm_running", "gauge", "1 while the guest runs, 0 while paused or after it ended.");
    out.sample("vmm_vm_running", "", u8::from(state == VmState::Running));
    out.family("vmm_vcpus", "gauge", "vCPUs of the VM.");
    out.sample("vmm_vcpus", "", vm.info().vcpus);
    out.family("vmm_guest_memory_bytes", "gauge", "Guest RAM.");
    out.sample("vmm_guest_memory_bytes", "", vm.info().mem_bytes);

    device_metrics(&mut out, vm);
    swap_metrics(&mut out, &vm.swaps().tallies());
    memory_swap_metrics(&mut out, vm);
    out.0
}

fn device_metrics(out: &mut Exposition, vm: &Vm) {
    let devices = vm.devices();
    let snapshots: Vec<_> = devices
        .devices()
        .iter()
        .flat_map(|d| {
            d.handle.metrics().into_iter().map(move |(queue, m)| {
                let labels = format!("device=\"{}\",kind=\"{}\",queue=\"{queue}\"", label(&d.id), d.handle.kind());
                (labels, m.snapshot())
            })
        })
        .collect();
    let counters: [Family<MetricsSnapshot, u64>; 4] = [
        ("vmm_device_requests_total", "Requests the guest made, by device and queue.", |s| s.requests),
        ("vmm_device_errors_total", "Requests that failed (the guest saw an error status).", |s| s.errors),
        ("vmm_device_read_bytes_total", "Bytes the device read for the guest.", |s| s.bytes_read),
        ("vmm_device_written_bytes_total", "Bytes the device wrote for the guest.", |s| s.bytes_written),
    ];
    for (name, help, value) in counters {
        out.family(name, "counter", help);
        for (labels, s) in &snapshots {
            out.sample(name, labels, value(s));
        }
    }
    let name = "vmm_device_request_duration_seconds";
    out.family(name, "histogram", "Time from a request's arrival to its completion.");
    let bounds: Vec<f64> = LATENCY_BUCKETS_US.iter().map(|&us| us as f64 / 1e6).collect();
    for (labels, s) in &snapshots {
        out.histogram(name, labels, &bounds, &s.latency_buckets, s.latency_sum_us as f64 / 1e6);
    }
}

fn swap_state(state: SwapState) -> &'static str {
    match state {
        SwapState::Running => "running",
        SwapState::Committed => "committed",
        SwapState::RolledBack => "rolled_back",
        SwapState::Failed => "failed",
    }
}

fn swap_metrics(out: &mut Exposition, (tallies, running): &(BTreeMap<String, SwapTally>, BTreeMap<String, u64>)) {
    let name = "vmm_swaps_running";
    out.family(name, "gauge", "Device backend swaps in progress, by device.");
    for device in tallies.keys() {
        out.sample(name, &format!("device=\"{}\"", label(device)), running.get(device).copied().unwrap_or(0));
    }
    let name = "vmm_swaps_total";
    out.family(name, "counter", "Finished device backend swaps, by device and outcome.");
    for (device, tally) in tallies {
        for (state, n) in SwapTally::STATES.iter().zip(tally.by_state) {
            out.sample(name, &format!("device=\"{}\",state=\"{}\"", label(device), swap_state(*state)), n);
        }
    }
    let name = "vmm_swap_blackout_seconds";
    out.family(name, "histogram", "Time a device took no new requests during a swap.");
    for (device, tally) in tallies {
        out.time_histogram(name, &format!("device=\"{}\"", label(device)), &tally.blackout);
    }
    let name = "vmm_swap_duration_seconds";
    out.family(name, "histogram", "Time from a swap's request to its end.");
    for (device, tally) in tallies {
        out.time_histogram(name, &format!("device=\"{}\"", label(device)), &tally.duration);
    }
}

fn memory_swap_metrics(out: &mut Exposition, vm: &Vm) {
    let history = vm.swaps().memory_history();
    let name = "vmm_memory_swaps_total";
    out.family(name, "counter", "Guest RAM region backing swaps, by outcome.");
    out.sample(name, "result=\"completed\"", history.completed_total);
    out.sample(name, "result=\"failed\"", history.failed);
    let name = "vmm_memory_swap_pause_seconds";
    out.family(name, "histogram", "Time the vCPUs were paused for a memory swap.");
    out.time_histogram(name, "", &history.pauses);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_with_inf_and_count() {
        let mut out = Exposition(String::new());
        let mut h = TimeHistogram::default();
        [100, 300, 5_000_000, 100_000_000].into_iter().for_each(|us| h.add_us(us));
        out.histogram("h", "device=\"a\"", &SWAP_BUCKETS_S, &h.counts, h.sum_s);
        let text = out.0;
        assert!(text.contains("h_bucket{device=\"a\",le=\"0.0001\"} 1\n"), "{text}");
        assert!(text.contains("h_bucket{device=\"a\",le=\"0.0005\"} 2\n"), "{text}");
        assert!(text.contains("h_bucket{device=\"a\",le=\"60\"} 3\n"), "{text}");
        assert!(text.contains("h_bucket{device=\"a\",le=\"+Inf\"} 4\n"), "{text}");
        assert!(text.contains("h_count{device=\"a\"} 4\n"), "{text}");
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
