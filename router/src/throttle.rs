//! Rate-limited logging: a warning that can repeat once per refused connection (a backend that
//! is down, a flood of bad cancel requests) is logged at most once per interval, with a count
//! of the ones left out.
//!
//! ```
//! use branchgate::throttle::LogThrottle;
//! static BACKEND_DOWN: LogThrottle = LogThrottle::new();
//! if let Some(suppressed) = BACKEND_DOWN.allow() {
//!     tracing::warn!(suppressed, "connection refused: backend unreachable");
//! }
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How often one throttled message may be logged.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// One log site's throttle; a `static` beside the log line. Shared by every thread.
#[derive(Debug)]
pub struct LogThrottle {
    /// Milliseconds since [`epoch`] (plus one, so zero means never) of the last logged message.
    last_ms: AtomicU64,
    /// Messages left out since the last one logged.
    suppressed: AtomicU64,
}

/// The process's time origin for [`LogThrottle`] (a monotonic clock, unlike wall time).
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl LogThrottle {
    /// A throttle that lets the first message through.
    pub const fn new() -> LogThrottle {
        LogThrottle {
            last_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)`: log now, mentioning the `n` messages left out since the last one; `None`:
    /// leave this one out (it is counted). At most one caller per [`LOG_INTERVAL`] gets `Some`.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(epoch().elapsed(), LOG_INTERVAL)
    }

    fn allow_at(&self, now: Duration, interval: Duration) -> Option<u64> {
        let now_ms = u64::try_from(now.as_millis()).unwrap_or(u64::MAX - 1) + 1;
        let last = self.last_ms.load(Ordering::Relaxed);
        let due = last == 0 || now_ms.saturating_sub(last) >= interval.as_millis() as u64;
        if due
            && self
                .last_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

impl Default for LogThrottle {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_message_per_interval_with_the_count_left_out() {
        let throttle = LogThrottle::new();
        let interval = Duration::from_secs(10);
        let at = Duration::from_secs;
        assert_eq!(throttle.allow_at(at(0), interval), Some(0));
        for _ in 0..19 {
            assert_eq!(throttle.allow_at(at(5), interval), None);
        }
        assert_eq!(throttle.allow_at(at(10), interval), Some(19));
        assert_eq!(throttle.allow_at(at(11), interval), None);
        assert_eq!(throttle.allow_at(at(30), interval), Some(1));
        assert_eq!(throttle.allow_at(at(30), interval), None);
    }
}
