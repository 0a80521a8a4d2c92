//! What the router counts, and `/metrics` and `/healthz` on `[listen] admin` ([`admin`]).
//!
//! Each worker counts into its own [`WorkerStats`] (one writer, relaxed atomics on cache lines
//! no other worker writes), which a scrape reads from the admin thread and encodes with the
//! Prometheus client ([`collect`]); per-branch figures come from the router-wide
//! [`crate::pooled::BranchClients`], per-backend ones from [`crate::upstream::Upstreams`].
//! Gauges of things that come and go (clients, waiting clients, backends) are kept as two
//! counters, in and out, and read as their difference: nothing on the hot path but an add.

pub mod admin;
pub mod collect;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::probes::ProbePort;

/// A count that only grows.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// One more.
    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }

    /// `n` more.
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The count now.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds of the latency histograms' buckets, in microseconds (50 µs to 10 s).
pub const BUCKETS_US: [u64; 16] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 10_000_000,
];

/// A latency histogram: counts per bucket of [`BUCKETS_US`] (the last one past them all), the
/// sum and the count.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [Counter; BUCKETS_US.len() + 1],
    sum_us: Counter,
}

impl Histogram {
    /// Counts one observation of `elapsed`.
    #[inline]
    pub fn observe(&self, elapsed: Duration) {
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let bucket = BUCKETS_US
            .iter()
            .position(|&bound| us <= bound)
            .unwrap_or(BUCKETS_US.len());
        self.buckets[bucket].inc();
        self.sum_us.add(us);
    }

    /// (sum in seconds, count, (upper bound in seconds, count) per bucket), the last bucket
    /// +Inf. Each bucket's own count, not the cumulative one: prometheus_client's encoder adds
    /// them up into the text format's cumulative `le` buckets.
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut count = 0;
        let mut buckets = Vec::with_capacity(BUCKETS_US.len() + 1);
        for (i, bucket) in self.buckets.iter().enumerate() {
            let n = bucket.get();
            count += n;
            let bound = BUCKETS_US
                .get(i)
                .map_or(f64::INFINITY, |&us| us as f64 / 1e6);
            buckets.push((bound, n));
        }
        (self.sum_us.get() as f64 / 1e6, count, buckets)
    }
}

/// Per port (direct, pooled): `[direct, pooled]`.
pub type PerPort<T> = [T; 2];

/// The slot of `port` in a [`PerPort`].
pub fn port_index(port: ProbePort) -> usize {
    port as usize
}

/// One worker's counts. Written by that worker only; read by a scrape.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct WorkerStats {
    /// Connections accepted.
    pub accepted: PerPort<Counter>,
    /// Connections from a balancer in `[listen] proxy_from` closed for want of a valid PROXY
    /// header ([`crate::front_door::balancer`]).
    pub proxy_headers_refused: PerPort<Counter>,
    /// Clients that logged in, and logged-in clients whose session ended.
    pub logins: PerPort<Counter>,
    /// See `logins`.
    pub sessions_ended: PerPort<Counter>,
    /// From accept to a client's login answered.
    pub login_time: PerPort<Histogram>,
    /// Backend connections of this worker's pools opened, and closed.
    pub pool_backends_opened: Counter,
    /// See `pool_backends_opened`.
    pub pool_backends_closed: Counter,
    /// Pooled transactions (a backend lent and given back, or closed).
    pub transactions: Counter,
    /// Simple queries and Executes pooled clients sent.
    pub queries: Counter,
    /// How long pooled transactions held their backend.
    pub transaction_time: Histogram,
    /// Pooled clients that began waiting for a backend, and that stopped waiting.
    pub waits_started: Counter,
    /// See `waits_started`.
    pub waits_ended: Counter,
    /// How long pooled clients waited for a backend.
    pub wait_time: Histogram,
    /// Authenticated clients this worker handed over to the worker that owns their branch
    /// ([`crate::handoff`]).
    pub handoffs_out: Counter,
    /// Authenticated clients this worker took over from another worker.
    pub handoffs_in: Counter,
    /// Hand-offs this worker took over: from the accepting worker's start (taking the socket
    /// out of its runtime) to the connection registered in this one, the queue and the wake-up
    /// between them included.
    pub handoff_time: Histogram,
}

impl WorkerStats {
    /// A pooled client waits for a backend until the returned guard is dropped.
    pub fn wait(&self) -> Waiting<'_> {
        self.waits_started.inc();
        Waiting {
            stats: self,
            since: std::time::Instant::now(),
        }
    }
}

/// A pooled client waiting for a backend ([`WorkerStats::wait`]).
#[derive(Debug)]
pub struct Waiting<'a> {
    stats: &'a WorkerStats,
    since: std::time::Instant,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.stats.waits_ended.inc();
        self.stats.wait_time.observe(self.since.elapsed());
    }
}

/// Counts a pooled backend connection as open until dropped.
#[derive(Debug)]
pub struct OpenBackend(std::sync::Arc<WorkerStats>);

impl OpenBackend {
    /// A backend of this worker's pools was opened.
    pub fn new(stats: &std::sync::Arc<WorkerStats>) -> Self {
        stats.pool_backends_opened.inc();
        OpenBackend(stats.clone())
    }
}

impl Drop for OpenBackend {
    fn drop(&mut self) {
        self.0.pool_backends_closed.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_end_at_infinity() {
        let h = std::sync::Arc::new(Histogram::default());
        h.observe(Duration::from_micros(40));
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_micros(700));
        h.observe(Duration::from_secs(60));
        let (sum, count, buckets) = h.snapshot();
        assert_eq!(count, 4);
        assert!((sum - 60.00079).abs() < 1e-9, "{sum}");
        assert_eq!(buckets[0], (50e-6, 2), "40 and 50 µs are at most 50 µs");
        assert_eq!(buckets[4], (1e-3, 1));
        assert_eq!(buckets[16], (f64::INFINITY, 1));
        // As /metrics shows them: cumulative, through prometheus_client's encoder.
        let text = collect::tests::histogram_text(h.clone());
        let bucket = |le: &str| {
            let line = text
                .lines()
                .find(|l| l.starts_with(&format!("h_bucket{{le=\"{le}\"}}")))
                .unwrap_or_else(|| panic!("no bucket {le} in {text}"));
            line.rsplit(' ').next().map(str::to_owned)
        };
        assert_eq!(bucket("0.00005").as_deref(), Some("2"), "{text}");
        assert_eq!(bucket("0.0005").as_deref(), Some("2"), "{text}");
        assert_eq!(bucket("0.001").as_deref(), Some("3"), "{text}");
        assert_eq!(bucket("10.0").as_deref(), Some("3"), "{text}");
        assert_eq!(bucket("+Inf").as_deref(), Some("4"), "{text}");
        assert!(text.contains("h_count 4"), "{text}");
    }

    #[test]
    fn a_wait_counts_in_and_out() {
        let stats = WorkerStats::default();
        let waiting = stats.wait();
        assert_eq!(stats.waits_started.get() - stats.waits_ended.get(), 1);
        drop(waiting);
        assert_eq!(stats.waits_started.get() - stats.waits_ended.get(), 0);
        assert_eq!(stats.wait_time.snapshot().1, 1);
    }
}
