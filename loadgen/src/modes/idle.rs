//! `idle`: for each target in turn, open N connections (TLS and authentication included), hold
//! them idle, and read the server's resident memory (VmRSS of `--pid`) before and after: the
//! difference over N is the memory one idle connection costs it.
//!
//! Targets are measured one after the other, not interleaved: each holds its connections
//! while its memory is read, and they would otherwise count in another target's figure when
//! both are the same process.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{share, Local};
use crate::client::Conn;
use crate::progress::Progress;
use crate::runtime::{self, join_all, Counters, Gate, RuntimeError};
use crate::settings::Common;
use crate::stats::TargetStats;
use crate::sys::{self, ProcError};

/// How often idle threads look for the signal to close.
const CLOSE_POLL: Duration = Duration::from_millis(50);

/// `idle` mode settings.
#[derive(Clone, Debug)]
pub struct IdleSettings {
    /// Connections per target.
    pub connections: usize,
    /// Setups in flight at most, all threads together.
    pub concurrency: usize,
    /// How long to hold the connections after measuring.
    pub hold: Duration,
    /// Pause between the last connection and the memory reading.
    pub settle: Duration,
}

/// What idle mode measured for one target.
#[derive(Clone, Debug)]
pub struct IdleResult {
    /// Connections opened (`count`), failures, setup latency; busy time = time to open all.
    pub stats: TargetStats,
    /// The process measured.
    pub pid: Option<u32>,
    /// VmRSS before opening, in bytes.
    pub rss_before: Option<u64>,
    /// VmRSS with all connections open, in bytes.
    pub rss_after: Option<u64>,
}

impl IdleResult {
    /// (after - before) / connections opened, if both readings and a connection exist.
    pub fn bytes_per_connection(&self) -> Option<f64> {
        let (before, after) = (self.rss_before?, self.rss_after?);
        if self.stats.count == 0 {
            return None;
        }
        Some((after as f64 - before as f64) / self.stats.count as f64)
    }
}

/// Why idle mode stopped.
#[derive(Debug, thiserror::Error)]
pub enum IdleError {
    /// The worker threads failed.
    #[error("{0}")]
    Runtime(#[from] RuntimeError),
    /// The process's memory could not be read.
    #[error("{0}")]
    Proc(#[from] ProcError),
}

struct Shared {
    common: Arc<Common>,
    target: usize,
    connections: usize,
    concurrency: usize,
    counters: Arc<Counters>,
    close: AtomicBool,
}

enum Phase {
    Opening,
    Settling(Instant),
    Holding(Instant),
    Closing,
}

/// Measures every target in turn.
pub fn run(common: Arc<Common>, settings: IdleSettings) -> Result<Vec<IdleResult>, IdleError> {
    let progress = Progress::new(!common.quiet, settings.connections as u64);
    let mut results = Vec::with_capacity(common.targets.len());
    for (index, pid) in common.pids.iter().enumerate() {
        let pid = pid.as_ref().map(|source| source.read()).transpose()?;
        let rss_before = pid.map(sys::rss_bytes).transpose()?;
        let name = common.targets[index].name.clone();
        progress.reset(settings.connections as u64, format!("{name}: opening"));
        let shared = Arc::new(Shared {
            common: common.clone(),
            target: index,
            connections: settings.connections,
            concurrency: settings.concurrency,
            counters: Arc::new(Counters::default()),
            close: AtomicBool::new(false),
        });
        let mut phase = Phase::Opening;
        let mut rss_after = None;
        let worker = shared.clone();
        let per_thread = runtime::run_threads(
            common.threads,
            move |thread| runtime::block_on(run_thread(worker.clone(), thread))?,
            || {
                let (done, errors) = shared.counters.read();
                let now = Instant::now();
                match phase {
                    Phase::Opening => {
                        progress.update(done + errors, || {
                            format!("{name}: {done} open, {errors} errors")
                        });
                        if done + errors >= settings.connections as u64 {
                            phase = Phase::Settling(now);
                        }
                    }
                    Phase::Settling(since) if now - since >= settings.settle => {
                        rss_after = pid.map(sys::rss_bytes);
                        progress.update(done + errors, || format!("{name}: {done} open, holding"));
                        phase = Phase::Holding(now);
                    }
                    Phase::Holding(since) if now - since >= settings.hold => {
                        shared.close.store(true, Ordering::Release);
                        phase = Phase::Closing;
                    }
                    _ => {}
                }
            },
        )?;
        let rss_after = rss_after.transpose()?;
        let mut stats = TargetStats::default();
        for thread in &per_thread {
            stats.merge(&thread[index]);
        }
        results.push(IdleResult {
            stats,
            pid,
            rss_before,
            rss_after,
        });
    }
    progress.finish();
    Ok(results)
}

async fn run_thread(shared: Arc<Shared>, thread: usize) -> io::Result<Vec<TargetStats>> {
    let common = &shared.common;
    let local = Local::for_thread(common, &shared.counters, thread)?;
    let count = share(shared.connections, common.threads, thread);
    let gate = Gate::new(share(shared.concurrency, common.threads, thread));
    let start = Instant::now();
    let mut opening = Vec::with_capacity(count);
    for _ in 0..count {
        let permit = gate.acquire().await;
        let (local, target) = (local.clone(), shared.target);
        opening.push(monoio::spawn(async move {
            let opened = open(&local, target, start).await;
            drop(permit);
            opened
        }));
    }
    let conns: Vec<Conn> = join_all(opening).await.into_iter().flatten().collect();
    while !shared.close.load(Ordering::Acquire) {
        monoio::time::sleep(CLOSE_POLL).await;
    }
    for conn in conns {
        conn.terminate().await;
    }
    Ok(Local::finish(local))
}

async fn open(local: &Local, target: usize, start: Instant) -> Option<Conn> {
    match local.connect(target).await {
        Ok((mut conn, timings)) => {
            conn.shrink();
            let mut stats = local.stats.borrow_mut();
            stats[target].count += 1;
            stats[target].latency.record(timings.ready - timings.start);
            stats[target].busy(0, timings.ready.saturating_duration_since(start));
            local.counters.done();
            Some(conn)
        }
        Err(error) => {
            local.error(target, &error);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_per_connection() {
        let mut result = IdleResult {
            stats: TargetStats::default(),
            pid: Some(1),
            rss_before: Some(10_000_000),
            rss_after: Some(14_096_000),
        };
        assert_eq!(result.bytes_per_connection(), None);
        result.stats.count = 1000;
        assert_eq!(result.bytes_per_connection(), Some(4096.0));
        result.rss_after = Some(9_000_000);
        assert_eq!(result.bytes_per_connection(), Some(-1000.0));
        result.rss_before = None;
        assert_eq!(result.bytes_per_connection(), None);
    }
}
