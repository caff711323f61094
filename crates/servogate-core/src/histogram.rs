//! A fixed-bucket histogram of durations that a bus task records into without a lock and
//! the metrics endpoint reads at any time (Prometheus' `le` buckets: a bound includes
//! itself).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds of the buckets, in microseconds: from a fast RTU transaction (a few ms at
/// 115200 baud) or an SDO round trip (hundreds of us) up to a slow device's timeout.
pub const BOUNDS_US: [u64; 14] = [
    250, 500, 1_000, 2_000, 3_000, 5_000, 7_500, 10_000, 20_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000,
];

/// Durations counted per bucket, with their sum.
#[derive(Debug, Default)]
pub struct Histogram {
    /// `buckets[i]` counts durations in (BOUNDS_US[i-1], BOUNDS_US[i]]; the last one counts
    /// those above every bound (+Inf).
    buckets: [AtomicU64; BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
}

/// A copy of a [`Histogram`].
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// (upper bound in seconds, count of durations in this bucket alone), in order, the
    /// last bound `f64::INFINITY`. Not cumulative: the Prometheus encoder sums them.
    pub buckets: Vec<(f64, u64)>,
    /// Every recorded duration (the `+Inf` bucket).
    pub count: u64,
    pub sum_seconds: f64,
}

impl Histogram {
    pub fn record(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = BOUNDS_US.partition_point(|&b| b < us);
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }

    /// Reads the counters. Each is read once; a snapshot taken while a bus records may be
    /// one observation apart between `count` and `sum`, never inconsistent in its buckets.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let bounds = BOUNDS_US
            .iter()
            .map(|&b| b as f64 / 1e6)
            .chain([f64::INFINITY]);
        let buckets: Vec<(f64, u64)> = bounds
            .zip(&self.buckets)
            .map(|(bound, n)| (bound, n.load(Relaxed)))
            .collect();
        let count = buckets.iter().map(|&(_, n)| n).sum();
        HistogramSnapshot {
            buckets,
            count,
            sum_seconds: self.sum_us.load(Relaxed) as f64 / 1e6,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_land_in_their_buckets_with_their_sum() {
        let h = Histogram::default();
        h.record(Duration::from_micros(250)); // on a bound: that bucket (le is inclusive)
        h.record(Duration::from_micros(251));
        h.record(Duration::from_millis(6));
        h.record(Duration::from_secs(3)); // above every bound: only +Inf
        let s = h.snapshot();
        assert_eq!(s.buckets[0], (0.00025, 1));
        assert_eq!(s.buckets[1], (0.0005, 1));
        assert_eq!(s.buckets[5].1, 0, "(3 ms, 5 ms]");
        assert_eq!(s.buckets[6], (0.0075, 1), "(5 ms, 7.5 ms]");
        assert_eq!(*s.buckets.last().unwrap(), (f64::INFINITY, 1));
        assert_eq!(s.buckets.len(), BOUNDS_US.len() + 1);
        assert_eq!(s.count, 4);
        assert!((s.sum_seconds - 3.006501).abs() < 1e-9, "{}", s.sum_seconds);
    }
}
