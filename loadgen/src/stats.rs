//! Latency histograms (HdrHistogram, nanoseconds) and what each thread counts per target.
//!
//! Every thread keeps its own [`TargetStats`] per target, so recording never crosses threads;
//! the main thread merges them once the run is over.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::client::Timings;

/// The longest latency recorded exactly, in nanoseconds; longer ones count as this (60 s).
pub const MAX_RECORDED_NS: u64 = 60_000_000_000;

/// Significant decimal digits every histogram keeps (0.1% resolution).
const SIGNIFICANT_DIGITS: u8 = 3;

/// Nanoseconds per microsecond, for reporting.
const NS_PER_US: f64 = 1_000.0;

/// A latency histogram in nanoseconds, from 1 ns to [`MAX_RECORDED_NS`].
#[derive(Clone, Debug)]
pub struct Latency(Histogram<u64>);

impl Default for Latency {
    fn default() -> Self {
        Self::new()
    }
}

impl Latency {
    /// An empty histogram.
    pub fn new() -> Self {
        // Constant bounds that hdrhistogram accepts (low >= 1, high >= 2 * low, sigfig <= 5).
        let histogram = Histogram::new_with_bounds(1, MAX_RECORDED_NS, SIGNIFICANT_DIGITS)
            .expect("constant histogram bounds are valid");
        Self(histogram)
    }

    /// Records one latency; zero counts as 1 ns, anything above the maximum as the maximum.
    pub fn record(&mut self, latency: Duration) {
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.0.saturating_record(ns.clamp(1, MAX_RECORDED_NS));
    }

    /// Adds every value of `other`.
    pub fn merge(&mut self, other: &Latency) {
        // Both histograms have the same bounds, so addition cannot fail.
        let _ = self.0.add(&other.0);
    }

    /// Number of recorded values.
    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// The latency at quantile `q` (0.0 to 1.0) in microseconds; 0 for an empty histogram.
    pub fn quantile_us(&self, q: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        self.0.value_at_quantile(q) as f64 / NS_PER_US
    }

    /// The largest recorded latency in microseconds; 0 for an empty histogram.
    pub fn max_us(&self) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        self.0.max() as f64 / NS_PER_US
    }

    /// p50, p90, p99, p99.9 and max.
    pub fn summary(&self) -> Summary {
        Summary {
            p50: round_us(self.quantile_us(0.5)),
            p90: round_us(self.quantile_us(0.9)),
            p99: round_us(self.quantile_us(0.99)),
            p999: round_us(self.quantile_us(0.999)),
            max: round_us(self.max_us()),
        }
    }
}

/// Percentiles of one histogram, in microseconds rounded to 0.1 µs (`latency_us` in the JSON).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest value.
    pub max: f64,
}

fn round_us(us: f64) -> f64 {
    (us * 10.0).round() / 10.0
}

/// Connection setup phases, each measured from the end of the previous one, and the time to a
/// TLS session.
#[derive(Clone, Debug, Default)]
pub struct Phases {
    /// connect() until the TCP connection is established.
    pub tcp: Latency,
    /// TCP established until the server's `S` to SSLRequest: one round trip, recorded only for
    /// connections that sent SSLRequest (not for direct SSL, not without TLS).
    pub ssl_request: Latency,
    /// The TLS handshake: from the `S` (direct SSL: from TCP established) until it is done;
    /// 0 without TLS.
    pub tls: Latency,
    /// TLS done until AuthenticationOk.
    pub auth: Latency,
    /// AuthenticationOk until ReadyForQuery.
    pub ready: Latency,
    /// Not a phase: connect() until the TLS session is established (TCP, SSLRequest round trip
    /// if any, handshake), recorded only for TLS connections. Direct SSL's saving shows here.
    pub tls_established: Latency,
}

impl Phases {
    /// Records the phases of one connection setup.
    pub fn record(&mut self, t: &Timings) {
        self.tcp.record(t.tcp - t.start);
        if let Some(answered) = t.ssl_request {
            self.ssl_request.record(answered - t.tcp);
        }
        let handshake = t
            .tls
            .map_or(Duration::ZERO, |done| done - t.handshake_start());
        self.tls.record(handshake);
        self.auth.record(t.auth - t.channel_ready());
        self.ready.record(t.ready - t.auth);
        if let Some(done) = t.tls {
            self.tls_established.record(done - t.start);
        }
    }

    fn merge(&mut self, other: &Phases) {
        self.tcp.merge(&other.tcp);
        self.ssl_request.merge(&other.ssl_request);
        self.tls.merge(&other.tls);
        self.tls_established.merge(&other.tls_established);
        self.auth.merge(&other.auth);
        self.ready.merge(&other.ready);
    }
}

/// What one thread (or, merged, the whole run) measured for one target.
#[derive(Clone, Debug, Default)]
pub struct TargetStats {
    /// Operations that succeeded while recording (connections or queries).
    pub count: u64,
    /// Operations that failed while recording, plus connections that could not be set up.
    pub errors: u64,
    /// The first error seen, as one line.
    pub first_error: Option<String>,
    /// Latency of each successful operation.
    pub latency: Latency,
    /// Connection setup phases (connect mode).
    pub phases: Phases,
    /// Per global slice index: from the slice's start until the last operation started in it
    /// completed. Their sum is the time the target was busy.
    pub busy_ns: Vec<u64>,
}

impl TargetStats {
    /// Counts a failure, keeping the first message.
    #[cold]
    pub fn error(&mut self, message: impl FnOnce() -> String) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(message());
        }
    }

    /// Notes that an operation started in slice `index` (which began at `slice_start`) ended
    /// at `done`.
    pub fn busy(&mut self, index: usize, busy: Duration) {
        if self.busy_ns.len() <= index {
            self.busy_ns.resize(index + 1, 0);
        }
        let ns = u64::try_from(busy.as_nanos()).unwrap_or(u64::MAX);
        self.busy_ns[index] = self.busy_ns[index].max(ns);
    }

    /// Merges another thread's stats for the same target. Busy times merge by maximum: the
    /// threads ran the same slices at the same time.
    pub fn merge(&mut self, other: &TargetStats) {
        self.count += other.count;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error.clone_from(&other.first_error);
        }
        self.latency.merge(&other.latency);
        self.phases.merge(&other.phases);
        if self.busy_ns.len() < other.busy_ns.len() {
            self.busy_ns.resize(other.busy_ns.len(), 0);
        }
        for (mine, theirs) in self.busy_ns.iter_mut().zip(&other.busy_ns) {
            *mine = (*mine).max(*theirs);
        }
    }

    /// Counts each of `slices` as busy for at least `len`: a slice lasts its whole length even
    /// when its last operation ended early. With `except_last`, the last slice that saw any
    /// operation keeps its own time (a count ran out there).
    pub fn fill_slices(&mut self, slices: &[usize], len: Duration, except_last: bool) {
        let len = u64::try_from(len.as_nanos()).unwrap_or(u64::MAX);
        let last_active = self.busy_ns.iter().rposition(|&ns| ns > 0);
        for &index in slices {
            if except_last && Some(index) >= last_active {
                continue;
            }
            if self.busy_ns.len() <= index {
                self.busy_ns.resize(index + 1, 0);
            }
            self.busy_ns[index] = self.busy_ns[index].max(len);
        }
    }

    /// Total busy time in seconds.
    pub fn busy_s(&self) -> f64 {
        self.busy_ns.iter().map(|&ns| ns as f64).sum::<f64>() / 1e9
    }
}

/// Merges per-thread stats (outer: threads, inner: targets) into one per target.
pub fn merge_threads(targets: usize, threads: Vec<Vec<TargetStats>>) -> Vec<TargetStats> {
    let mut merged = vec![TargetStats::default(); targets];
    for per_target in threads {
        for (total, stats) in merged.iter_mut().zip(&per_target) {
            total.merge(stats);
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn percentiles_of_one_to_a_thousand() {
        let mut h = Latency::new();
        for i in 1..=1000 {
            h.record(us(i));
        }
        let s = h.summary();
        // 3 significant digits: values are exact to within 0.1%.
        assert!((s.p50 - 500.0).abs() <= 0.5, "{s:?}");
        assert!((s.p90 - 900.0).abs() <= 0.9, "{s:?}");
        assert!((s.p99 - 990.0).abs() <= 1.0, "{s:?}");
        assert!((s.p999 - 999.0).abs() <= 1.0, "{s:?}");
        assert!((s.max - 1000.0).abs() <= 1.0, "{s:?}");
        assert_eq!(h.count(), 1000);
    }

    #[test]
    fn outlier_shows_only_in_the_tail() {
        let mut h = Latency::new();
        for _ in 0..999 {
            h.record(us(100));
        }
        h.record(Duration::from_secs(1));
        let s = h.summary();
        assert_eq!((s.p50, s.p90, s.p99), (100.0, 100.0, 100.0));
        assert!(s.p999 <= 100.1, "{s:?}");
        assert!((s.max - 1_000_000.0).abs() <= 1_000.0, "{s:?}");
    }

    #[test]
    fn empty_zero_and_saturation() {
        assert_eq!(Latency::new().summary(), Summary::default());
        let mut h = Latency::new();
        h.record(Duration::ZERO);
        h.record(Duration::from_secs(3600));
        assert_eq!(h.count(), 2);
        assert!(h.quantile_us(0.0) <= 0.01);
        assert!(h.max_us() >= MAX_RECORDED_NS as f64 / 1_000.0 * 0.999);
    }

    #[test]
    fn slices_last_their_whole_length() {
        let ms = Duration::from_millis;
        let mut timed = TargetStats::default();
        timed.busy(0, ms(990));
        timed.busy(2, ms(1010));
        timed.fill_slices(&[0, 2, 4], ms(1000), false);
        assert_eq!(
            timed.busy_ns,
            [1_000_000_000, 0, 1_010_000_000, 0, 1_000_000_000]
        );
        let mut counted = TargetStats::default();
        counted.busy(0, ms(990));
        counted.busy(2, ms(300));
        counted.fill_slices(&[0, 2, 4], ms(1000), true);
        assert_eq!(counted.busy_ns, [1_000_000_000, 0, 300_000_000]);
    }

    #[test]
    fn merging_threads_adds_counts_and_takes_the_longest_busy_time() {
        let mut a = TargetStats {
            count: 2,
            ..TargetStats::default()
        };
        a.latency.record(us(10));
        a.latency.record(us(10));
        a.busy(0, Duration::from_millis(900));
        a.busy(2, Duration::from_millis(1000));
        a.error(|| "first".into());
        let mut b = TargetStats {
            count: 1,
            ..TargetStats::default()
        };
        b.latency.record(us(40));
        b.busy(2, Duration::from_millis(1100));
        b.error(|| "second".into());
        let merged = merge_threads(1, vec![vec![a], vec![b]]);
        let m = &merged[0];
        assert_eq!((m.count, m.errors), (3, 2));
        assert_eq!(m.first_error.as_deref(), Some("first"));
        assert_eq!(m.latency.count(), 3);
        assert_eq!(m.busy_ns, vec![900_000_000, 0, 1_100_000_000]);
        assert!((m.busy_s() - 2.0).abs() < 1e-9);
    }
}
