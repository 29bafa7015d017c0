//! Request counters and latency histograms, updated by devices on the event loop and read by
//! the control API from other threads (hence atomics).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the latency histogram buckets, in microseconds (the last bucket is +Inf).
pub const LATENCY_BUCKETS_US: [u64; 12] = [10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 50_000, 250_000];

/// Counters for one device.
#[derive(Default)]
pub struct RequestMetrics {
    /// Requests (or frames, packets) handled, failed and rejected ones included.
    pub requests: AtomicU64,
    /// Requests that failed or were rejected.
    pub errors: AtomicU64,
    /// Bytes delivered into guest memory (disk reads, received frames).
    pub bytes_read: AtomicU64,
    /// Bytes taken from guest memory (disk writes, sent frames).
    pub bytes_written: AtomicU64,
    /// Non-cumulative count per bucket of [`LATENCY_BUCKETS_US`] plus +Inf (each request
    /// counts in the one bucket its latency falls in).
    latency: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    latency_sum_us: AtomicU64,
}

/// A copy of the counters at one instant.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MetricsSnapshot {
    /// Requests handled, failed and rejected ones included.
    pub requests: u64,
    /// Requests that failed or were rejected.
    pub errors: u64,
    /// Bytes delivered into guest memory.
    pub bytes_read: u64,
    /// Bytes taken from guest memory.
    pub bytes_written: u64,
    /// Non-cumulative count per bucket, +Inf last.
    pub latency_buckets: Vec<u64>,
    /// Sum of all recorded latencies, in microseconds (rejected requests add nothing).
    pub latency_sum_us: u64,
}

impl RequestMetrics {
    /// A finished request: its latency, whether it succeeded, and the bytes it read and wrote.
    pub fn record(&self, latency: Duration, ok: bool, read: u64, written: u64) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.bytes_read.fetch_add(read, Ordering::Relaxed);
        self.bytes_written.fetch_add(written, Ordering::Relaxed);
        let us = latency.as_micros() as u64;
        let bucket = LATENCY_BUCKETS_US.iter().position(|&b| us <= b).unwrap_or(LATENCY_BUCKETS_US.len());
        self.latency[bucket].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// A request that failed before reaching a backend (malformed, out of range).
    pub fn record_rejected(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads every counter; each is read on its own, so a snapshot taken while requests finish
    /// may be off by those requests.
    pub fn snapshot(&self) -> MetricsSnapshot {
        MetricsSnapshot {
            requests: self.requests.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
            latency_buckets: self.latency.iter().map(|b| b.load(Ordering::Relaxed)).collect(),
            latency_sum_us: self.latency_sum_us.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_and_totals() {
        let m = RequestMetrics::default();
        m.record(Duration::from_micros(5), true, 4096, 0);
        m.record(Duration::from_micros(30), false, 0, 512);
        m.record(Duration::from_secs(2), true, 0, 0);
        m.record_rejected();
        let s = m.snapshot();
        assert_eq!((s.requests, s.errors, s.bytes_read, s.bytes_written), (4, 2, 4096, 512));
        assert_eq!(s.latency_buckets[0], 1);
        assert_eq!(s.latency_buckets[2], 1);
        assert_eq!(*s.latency_buckets.last().unwrap(), 1);
        assert_eq!(s.latency_sum_us, 2_000_035);
    }
}
