//! The health check a new backend passes before a swap commits: enough requests succeed within
//! a window, errors and latency stay within bounds, and nothing is stuck.
//!
//! It judges by the device's counters, so requests the device itself rejects (malformed by
//! the guest) count as errors too: a guest that sends them during the window makes the swap
//! roll back, which costs it nothing but the swap. A backend that fails only on requests the
//! window did not see (a region of the disk nobody touched) passes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::metrics::{MetricsSnapshot, RequestMetrics};
use serde::{Deserialize, Serialize};

/// When a swapped-in backend counts as healthy.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VerifyPolicy {
    /// How long to watch the new backend.
    pub window_ms: u64,
    /// Successful requests needed within the window (0: an idle device passes).
    pub min_requests: u64,
    /// Largest tolerated share of failed requests.
    pub max_error_rate: f64,
    /// Largest tolerated mean latency, if any.
    pub max_mean_latency_us: Option<u64>,
}

impl Default for VerifyPolicy {
    fn default() -> Self {
        Self { window_ms: 100, min_requests: 0, max_error_rate: 0.0, max_mean_latency_us: None }
    }
}

/// Requests seen during verification.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    pub requests: u64,
    pub errors: u64,
    pub latency_sum_us: u64,
}

fn totals(metrics: &[Arc<RequestMetrics>]) -> MetricsSnapshot {
    let mut sum = MetricsSnapshot::default();
    for m in metrics {
        let s = m.snapshot();
        sum.requests += s.requests;
        sum.errors += s.errors;
        sum.latency_sum_us += s.latency_sum_us;
    }
    sum
}

/// Watches `metrics` after a switch. `failures` reports requests the device held back under
/// probation; `pending` reports requests still in flight (a stall if nothing completes);
/// `tick` runs at every look (the transaction lets the device drain the previous backend);
/// an error from it ends the verification, failed, with that reason.
pub fn verify(
    policy: &VerifyPolicy,
    metrics: &[Arc<RequestMetrics>],
    failures: impl Fn() -> u64,
    pending: impl Fn() -> usize,
    mut tick: impl FnMut() -> Result<(), String>,
) -> Result<Observed, String> {
    let base = totals(metrics);
    let deadline = Instant::now() + Duration::from_millis(policy.window_ms);
    let observe = || {
        let now = totals(metrics);
        Observed {
            requests: now.requests - base.requests,
            errors: now.errors - base.errors + failures(),
            latency_sum_us: now.latency_sum_us - base.latency_sum_us,
        }
    };
    loop {
        tick()?;
        let seen = observe();
        if seen.errors > 0 && policy.max_error_rate == 0.0 {
            return Err(format!("{} request(s) failed on the new backend", seen.errors));
        }
        let enough = policy.min_requests > 0 && seen.requests.saturating_sub(seen.errors) >= policy.min_requests;
        if enough || Instant::now() >= deadline {
            return judge(policy, seen, pending());
        }
        // Polling counters from a control thread; the data path never waits on this.
        std::thread::sleep(Duration::from_micros(500));
    }
}

fn judge(policy: &VerifyPolicy, seen: Observed, pending: usize) -> Result<Observed, String> {
    let ok = seen.requests.saturating_sub(seen.errors);
    if ok < policy.min_requests {
        return Err(format!(
            "only {ok} successful request(s) in {} ms, {} required{}",
            policy.window_ms,
            policy.min_requests,
            if pending > 0 { format!("; {pending} still in flight (stalled?)") } else { String::new() }
        ));
    }
    if seen.requests == 0 && pending > 0 {
        return Err(format!(
            "no request completed in {} ms while {pending} were in flight (stalled)",
            policy.window_ms
        ));
    }
    if seen.requests > 0 && seen.errors as f64 / seen.requests as f64 > policy.max_error_rate {
        return Err(format!("error rate {}/{} above {}", seen.errors, seen.requests, policy.max_error_rate));
    }
    if let Some(bound) = policy.max_mean_latency_us
        && seen.requests > 0
        && seen.latency_sum_us / seen.requests > bound
    {
        return Err(format!("mean latency {} us above {bound} us", seen.latency_sum_us / seen.requests));
    }
    Ok(seen)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn judge_with(
        policy: VerifyPolicy,
        requests: u64,
        errors: u64,
        latency: u64,
        pending: usize,
    ) -> Result<Observed, String> {
        judge(&policy, Observed { requests, errors, latency_sum_us: latency }, pending)
    }

    #[test]
    fn verdicts() {
        let p = VerifyPolicy::default();
        assert!(judge_with(p, 0, 0, 0, 0).is_ok(), "idle device passes by default");
        assert!(judge_with(p, 0, 0, 0, 3).unwrap_err().contains("stalled"));
        assert!(judge_with(p, 10, 1, 0, 0).unwrap_err().contains("error rate"));
        let need = VerifyPolicy { min_requests: 5, ..p };
        assert!(judge_with(need, 4, 0, 0, 0).unwrap_err().contains("only 4 successful"));
        assert!(judge_with(need, 5, 0, 0, 0).is_ok());
        let slow = VerifyPolicy { max_mean_latency_us: Some(100), ..p };
        assert!(judge_with(slow, 10, 0, 1000, 0).is_ok());
        assert!(judge_with(slow, 10, 0, 1010, 0).unwrap_err().contains("mean latency"));
        let tolerant = VerifyPolicy { max_error_rate: 0.5, ..p };
        assert!(judge_with(tolerant, 10, 5, 0, 0).is_ok());
    }

    #[test]
    fn watches_live_counters() {
        let m = Arc::new(RequestMetrics::default());
        let policy = VerifyPolicy { window_ms: 2000, min_requests: 3, ..Default::default() };
        // Requests arrive while verify watches (fed from its per-look callback, so they
        // cannot land before it takes its baseline), one per look.
        let mut fed = 0;
        let feed = || {
            if fed < 3 {
                fed += 1;
                m.record(Duration::from_micros(10), true, 512, 0);
            }
            Ok(())
        };
        let seen = verify(&policy, std::slice::from_ref(&m), || 0, || 0, feed).unwrap();
        assert_eq!(seen.requests, 3);
        let failing = verify(&VerifyPolicy { window_ms: 50, ..Default::default() }, &[m], || 1, || 0, || Ok(()));
        assert!(failing.unwrap_err().contains("failed on the new backend"));
        let stopped = verify(&policy, &[], || 0, || 0, || Err("the VM is stopping".into()));
        assert_eq!(stopped.unwrap_err(), "the VM is stopping");
    }
}
