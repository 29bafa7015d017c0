//! Swaps summed up for the metrics. Records of finished swaps are forgotten after a while
//! (see [`HISTORY`](super::HISTORY)); what they counted is folded into a tally first, so the
//! Prometheus counters and histograms keep growing as counters must.

use super::record::{SwapRecord, SwapState};

/// Bucket bounds for swap blackouts, durations and memory swap pauses, in seconds.
pub const SWAP_BUCKETS_S: [f64; 10] = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.01, 0.1, 1.0, 10.0, 60.0];

/// Times in the buckets of [`SWAP_BUCKETS_S`], non-cumulative, +Inf last.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TimeHistogram {
    /// How many times fell in each bucket: `counts[i]` those above bound `i - 1` and up to
    /// bound `i`, the last those above every bound.
    pub counts: [u64; SWAP_BUCKETS_S.len() + 1],
    /// The sum of every time added, in seconds.
    pub sum_s: f64,
}

impl TimeHistogram {
    /// Adds a time given in microseconds.
    pub fn add_us(&mut self, us: u64) {
        let s = us as f64 / 1e6;
        let bucket = SWAP_BUCKETS_S.iter().position(|&b| s <= b).unwrap_or(SWAP_BUCKETS_S.len());
        self.counts[bucket] += 1;
        self.sum_s += s;
    }
}

/// One device's swaps: how many ended each way, and how long they took.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SwapTally {
    /// Indexed like [`SwapTally::STATES`].
    pub by_state: [u64; 3],
    /// How long the device took no new requests, per swap (see [`SwapRecord::blackout_us`]).
    pub blackout: TimeHistogram,
    /// How long each swap took from request to end.
    pub duration: TimeHistogram,
}

impl SwapTally {
    /// The states a finished swap can end in, in the order of [`by_state`](Self::by_state).
    pub const STATES: [SwapState; 3] = [SwapState::Committed, SwapState::RolledBack, SwapState::Failed];

    /// Counts a finished swap (a running one's blackout may still grow, and counters and
    /// histograms may only grow by whole swaps).
    pub fn add(&mut self, record: &SwapRecord) {
        if let Some(i) = Self::STATES.iter().position(|&s| s == record.state) {
            self.by_state[i] += 1;
        }
        if let Some(us) = record.blackout_us {
            self.blackout.add_us(us);
        }
        if let Some(us) = record.duration_us {
            self.duration.add_us(us);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_land_in_the_first_bucket_that_holds_them() {
        let mut h = TimeHistogram::default();
        for us in [50, 100, 300, 5_000_000, 100_000_000] {
            h.add_us(us);
        }
        assert_eq!(h.counts[0], 2, "50 us and exactly 100 us");
        assert_eq!(h.counts[2], 1);
        assert_eq!(h.counts[8], 1, "5 s");
        assert_eq!(h.counts[10], 1, "past the last bound: +Inf");
        assert!((h.sum_s - 105.00045).abs() < 1e-9);
    }
}
