//! The three measurements, and what their worker threads share.
//!
//! - [`connect`]: connection storms.
//! - [`query`]: query latency and throughput.
//! - [`idle`]: memory per held connection, logged in or stopped before authentication.

pub mod connect;
pub mod idle;
pub mod query;

use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::io;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use branchgate::auth::scram::SaltedPasswordCache;

use crate::client::{self, ClientError, Conn, ConnectOptions, Held, Stage, Timings};
use crate::plan::Plan;
use crate::runtime::{Counters, RuntimeError};
use crate::sampler::{CpuUse, SamplerError};
use crate::settings::Common;
use crate::stats::TargetStats;
use crate::target::Target;
use crate::timer::Timer;

/// What `connect` and `query` measured, per target in command-line order.
#[derive(Debug)]
pub struct Measured {
    /// Counts, latencies and busy time.
    pub stats: Vec<TargetStats>,
    /// The CPU time of the target's `--pid` process in its recorded slices.
    pub cpu: Vec<Option<CpuUse>>,
}

/// Why `connect` or `query` stopped.
#[derive(Debug, thiserror::Error)]
pub enum MeasureError {
    /// The worker threads failed.
    #[error("{0}")]
    Runtime(#[from] RuntimeError),
    /// A `--pid` process could not be measured.
    #[error("{0}")]
    Cpu(#[from] SamplerError),
}

/// What one worker thread owns: its stats per target, its PBKDF2 cache, its precise timer and
/// its count of connections (for the round robin over source addresses).
#[derive(Debug)]
pub struct Local {
    /// Settings.
    pub common: Arc<Common>,
    /// Progress counters shared with the main thread.
    pub counters: Arc<Counters>,
    /// Stats per target.
    pub stats: RefCell<Vec<TargetStats>>,
    /// Sleeps for the schedules.
    pub timer: Rc<Timer>,
    cache: RefCell<SaltedPasswordCache>,
    thread: usize,
    connections: Cell<usize>,
}

impl Local {
    /// The state of worker thread `thread`; call inside its runtime (it starts the timer).
    pub fn new(common: Arc<Common>, counters: Arc<Counters>, thread: usize) -> io::Result<Local> {
        let targets = common.targets.len();
        Ok(Local {
            common,
            counters,
            stats: RefCell::new(vec![TargetStats::default(); targets]),
            timer: Timer::start()?,
            cache: RefCell::new(SaltedPasswordCache::new()),
            thread,
            connections: Cell::new(0),
        })
    }

    /// [`Local::new`], shared by the tasks of worker thread `thread`.
    pub fn for_thread(
        common: &Arc<Common>,
        counters: &Arc<Counters>,
        thread: usize,
    ) -> io::Result<Rc<Local>> {
        Ok(Rc::new(Local::new(
            common.clone(),
            counters.clone(),
            thread,
        )?))
    }

    /// Opens a connection to target `index` (branch and source address chosen here), giving up
    /// after `--timeout`.
    pub async fn connect(&self, index: usize) -> Result<(Conn, Timings), ClientError> {
        let branch = self
            .common
            .branch_for(self.next_source(), &mut rand::thread_rng());
        self.connect_to(index, branch).await
    }

    /// [`Local::connect`] to a given branch (`None`: the user name as it is).
    pub async fn connect_to(
        &self,
        index: usize,
        branch: Option<&str>,
    ) -> Result<(Conn, Timings), ClientError> {
        let (target, user, source) = self.destination(index, branch);
        let options = ConnectOptions {
            target,
            user: &user,
            source,
        };
        match monoio::time::timeout(self.common.timeout, client::connect(options, &self.cache))
            .await
        {
            Ok(result) => result,
            Err(_) => Err(ClientError::Timeout),
        }
    }

    /// Opens a connection to target `index` as far as `stage` (idle mode), giving up after
    /// `--timeout`; returns it with when it got there.
    pub async fn open_to(
        &self,
        index: usize,
        stage: Stage,
    ) -> Result<(Held, Instant), ClientError> {
        let branch = self
            .common
            .branch_for(self.next_source(), &mut rand::thread_rng());
        let (target, user, source) = self.destination(index, branch);
        let options = ConnectOptions {
            target,
            user: &user,
            source,
        };
        let opening = client::open_to(options, &self.cache, stage);
        match monoio::time::timeout(self.common.timeout, opening).await {
            Ok(result) => result,
            Err(_) => Err(ClientError::Timeout),
        }
    }

    /// Target `index`, its user name for `branch`, and the next source address.
    fn destination(
        &self,
        index: usize,
        branch: Option<&str>,
    ) -> (&Target, Cow<'_, str>, Option<IpAddr>) {
        let common = &self.common;
        let target = &common.targets[index];
        let n = self.next_source();
        self.connections.set(self.connections.get() + 1);
        let source = common.source_ip(n);
        (target, target.user(branch), source)
    }

    /// The connection number that picks the next connection's source address (and under
    /// `--branch-by-source` its branch). Threads interleave so together they walk the
    /// addresses in order.
    fn next_source(&self) -> usize {
        self.connections.get() * self.common.threads + self.thread
    }

    /// Records a failure for target `index`.
    #[cold]
    pub fn error(&self, index: usize, error: &dyn std::fmt::Display) {
        self.counters.error();
        self.stats.borrow_mut()[index].error(|| error.to_string());
    }

    /// The stats, once the thread's work is over.
    pub fn into_stats(self) -> Vec<TargetStats> {
        self.stats.into_inner()
    }

    /// The stats of a thread whose tasks have all been awaited.
    pub fn finish(local: Rc<Local>) -> Vec<TargetStats> {
        match Rc::try_unwrap(local) {
            Ok(local) => local.into_stats(),
            // Every task holding a clone has been awaited; this is unreachable in practice.
            Err(local) => local.stats.borrow().clone(),
        }
    }
}

/// The progress line while `plan` runs: the current target and the counts so far.
pub fn progress_line(
    plan: &Plan,
    common: &Common,
    now: Instant,
    (done, errors): (u64, u64),
    what: &str,
) -> String {
    let name = plan
        .slice_at(now)
        .map_or("", |s| common.targets[s.target].name.as_str());
    format!("{name}: {done} {what}, {errors} errors")
}

/// Whole milliseconds of `d`, for progress bars (saturating).
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// This thread's share of `total` when it is split over `threads` threads.
pub fn share(total: usize, threads: usize, thread: usize) -> usize {
    let threads = threads.max(1);
    total / threads + usize::from(thread < total % threads)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up() {
        for (total, threads) in [(10, 3), (2, 4), (0, 2), (64, 2), (7, 1)] {
            let sum: usize = (0..threads).map(|t| share(total, threads, t)).sum();
            assert_eq!(sum, total, "{total} over {threads}");
        }
        assert_eq!(share(10, 3, 0), 4);
        assert_eq!(share(10, 3, 2), 3);
    }
}
