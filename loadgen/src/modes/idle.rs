//! `idle`: for each target in turn, open N connections as far as a [`Stage`] (by default all
//! the way: TLS, authentication, ReadyForQuery), hold them, and read the server's resident
//! memory (VmRSS of `--pid`) before and after: the difference over the connections still open
//! is the memory one held connection costs it. With `--process-tree` the proportional set size
//! and page tables of the process and all its descendants are read too (PostgreSQL forks a
//! process per connection, which its postmaster's VmRSS does not show).
//!
//! Held connections are watched for the server closing them (a handshake or login timeout, a
//! limit on connections before authentication): those are counted, not hidden, and left out of
//! the per-connection figure when they closed before the memory was read.
//!
//! Targets are measured one after the other, not interleaved: each holds its connections
//! while its memory is read, and they would otherwise count in another target's figure when
//! both are the same process.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{share, Local};
use crate::client::{ClientError, Held, Stage};
use crate::progress::Progress;
use crate::runtime::{self, join_all, Counters, Gate, RuntimeError};
use crate::settings::Common;
use crate::stats::{Latency, TargetStats};
use crate::sys::{self, ProcError, TreeMemory};

/// How often idle threads look for the signal to close, and for connections the server closed.
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
    /// Where each connection stops.
    pub stage: Stage,
    /// Also read the memory of the `--pid` process's descendants.
    pub process_tree: bool,
    /// Statements each logged-in connection prepares and describes ([`prepared_statements`]).
    pub prepare: usize,
}

/// Bytes of each text `--prepare` has its connections prepare: about what an ORM's statement
/// with a column list takes.
pub const PREPARED_TEXT_BYTES: usize = 400;

/// The `count` statements (name, text) every connection prepares with `--prepare`: the same
/// in each connection, each [`PREPARED_TEXT_BYTES`] long, three parameters whose types the
/// server infers (the Parse gives none), no table needed.
pub fn prepared_statements(count: usize) -> Vec<(String, String)> {
    (0..count)
        .map(|i| {
            let mut sql = format!(
                "SELECT {i} AS statement, $1::int4 + 1 AS a, $2::text AS b, \
                 $3::timestamptz AS c FROM pg_catalog.pg_class WHERE relname = $2 \
                 /* branchgate-loadgen idle --prepare "
            );
            while sql.len() < PREPARED_TEXT_BYTES - 3 {
                sql.push('.');
            }
            sql.push_str(" */");
            (format!("loadgen_{i}"), sql)
        })
        .collect()
}

/// What idle mode measured for one target.
#[derive(Clone, Debug)]
pub struct IdleResult {
    /// Connections that reached the stage (`count`), failures, setup latency (connect() until
    /// the stage); busy time = time to open all.
    pub stats: TargetStats,
    /// The process measured.
    pub pid: Option<u32>,
    /// VmRSS before opening, in bytes.
    pub rss_before: Option<u64>,
    /// VmRSS with all connections open, in bytes.
    pub rss_after: Option<u64>,
    /// The process and its descendants before opening (`--process-tree`).
    pub tree_before: Option<TreeMemory>,
    /// The process and its descendants with all connections open (`--process-tree`).
    pub tree_after: Option<TreeMemory>,
    /// Held connections the server closed, before the connections were closed by us.
    pub closed_by_server: u64,
    /// Of those, the ones seen closed by the time the memory was read.
    pub closed_before_reading: u64,
    /// How long each of those had been held (since it reached the stage) when its close was
    /// seen.
    pub closed_after: Latency,
}

impl IdleResult {
    /// Connections open when the memory was read: the ones the server had closed by then are
    /// not in the reading.
    pub fn open_at_reading(&self) -> u64 {
        self.stats.count.saturating_sub(self.closed_before_reading)
    }

    /// (after - before) / connections open at the reading, if both readings and a connection
    /// exist.
    pub fn bytes_per_connection(&self) -> Option<f64> {
        self.per_connection(self.rss_before?, self.rss_after?)
    }

    /// The change in the process tree's summed Pss per connection open at the reading.
    pub fn tree_pss_per_connection(&self) -> Option<f64> {
        let (before, after) = (self.tree_before?, self.tree_after?);
        self.per_connection(before.pss_bytes, after.pss_bytes)
    }

    /// The change in the process tree's page tables per connection open at the reading.
    pub fn tree_page_tables_per_connection(&self) -> Option<f64> {
        let (before, after) = (self.tree_before?, self.tree_after?);
        self.per_connection(before.page_table_bytes, after.page_table_bytes)
    }

    fn per_connection(&self, before: u64, after: u64) -> Option<f64> {
        match self.open_at_reading() {
            0 => None,
            open => Some((after as f64 - before as f64) / open as f64),
        }
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
    stage: Stage,
    /// What each logged-in connection prepares.
    prepare: Vec<(String, String)>,
    connections: usize,
    concurrency: usize,
    counters: Arc<Counters>,
    /// Held connections the server closed so far, all threads.
    closed: AtomicU64,
    close: AtomicBool,
}

/// What one worker thread brings back.
struct ThreadResult {
    stats: Vec<TargetStats>,
    closed_after: Latency,
}

enum Phase {
    Opening,
    Settling(Instant),
    Holding(Instant),
    Closing,
}

/// One memory reading of a target's process: VmRSS, and the tree's if asked.
struct Reading {
    rss: Result<u64, ProcError>,
    tree: Option<Result<TreeMemory, ProcError>>,
}

impl Reading {
    fn take(pid: u32, process_tree: bool) -> Reading {
        Reading {
            rss: sys::rss_bytes(pid),
            tree: process_tree.then(|| sys::tree_memory(pid)),
        }
    }

    fn split(reading: Option<Reading>) -> Result<(Option<u64>, Option<TreeMemory>), ProcError> {
        match reading {
            None => Ok((None, None)),
            Some(r) => Ok((Some(r.rss?), r.tree.transpose()?)),
        }
    }
}

/// Measures every target in turn.
pub fn run(common: Arc<Common>, settings: IdleSettings) -> Result<Vec<IdleResult>, IdleError> {
    let progress = Progress::new(!common.quiet, settings.connections as u64);
    let mut results = Vec::with_capacity(common.targets.len());
    for (index, pid) in common.pids.iter().enumerate() {
        let pid = pid.as_ref().map(|source| source.read()).transpose()?;
        let before = pid.map(|pid| Reading::take(pid, settings.process_tree));
        let (rss_before, tree_before) = Reading::split(before)?;
        let name = common.targets[index].name.clone();
        progress.reset(settings.connections as u64, format!("{name}: opening"));
        let shared = Arc::new(Shared {
            common: common.clone(),
            target: index,
            stage: settings.stage,
            prepare: prepared_statements(settings.prepare),
            connections: settings.connections,
            concurrency: settings.concurrency,
            counters: Arc::new(Counters::default()),
            closed: AtomicU64::new(0),
            close: AtomicBool::new(false),
        });
        let mut phase = Phase::Opening;
        let mut after = None;
        let mut closed_before_reading = 0;
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
                        closed_before_reading = shared.closed.load(Ordering::Acquire);
                        after = pid.map(|pid| Reading::take(pid, settings.process_tree));
                        progress.update(done + errors, || format!("{name}: {done} open, holding"));
                        phase = Phase::Holding(Instant::now());
                    }
                    Phase::Holding(since) if now - since >= settings.hold => {
                        shared.close.store(true, Ordering::Release);
                        phase = Phase::Closing;
                    }
                    _ => {}
                }
            },
        )?;
        let (rss_after, tree_after) = Reading::split(after)?;
        let mut stats = TargetStats::default();
        let mut closed_after = Latency::new();
        for thread in &per_thread {
            stats.merge(&thread.stats[index]);
            closed_after.merge(&thread.closed_after);
        }
        results.push(IdleResult {
            stats,
            pid,
            rss_before,
            rss_after,
            tree_before,
            tree_after,
            closed_by_server: closed_after.count(),
            closed_before_reading,
            closed_after,
        });
    }
    progress.finish();
    Ok(results)
}

async fn run_thread(shared: Arc<Shared>, thread: usize) -> io::Result<ThreadResult> {
    let common = &shared.common;
    let local = Local::for_thread(common, &shared.counters, thread)?;
    let count = share(shared.connections, common.threads, thread);
    let gate = Gate::new(share(shared.concurrency, common.threads, thread));
    let start = Instant::now();
    let mut opening = Vec::with_capacity(count);
    for _ in 0..count {
        let permit = gate.acquire().await;
        let (local, shared) = (local.clone(), shared.clone());
        opening.push(monoio::spawn(async move {
            let opened = open(&local, &shared, start).await;
            drop(permit);
            opened
        }));
    }
    let mut held: Vec<(Held, Instant)> = join_all(opening).await.into_iter().flatten().collect();
    let mut closed_after = Latency::new();
    loop {
        // Once more after the signal, so a close during the last tick is counted too.
        let closing = shared.close.load(Ordering::Acquire);
        let closed = sweep(&mut held, &mut closed_after)?;
        shared.closed.fetch_add(closed, Ordering::AcqRel);
        if closing {
            break;
        }
        monoio::time::sleep(CLOSE_POLL).await;
    }
    for (conn, _) in held {
        conn.close().await;
    }
    Ok(ThreadResult {
        stats: Local::finish(local),
        closed_after,
    })
}

/// Drops the held connections the server has closed, recording how long each was held; returns
/// how many.
fn sweep(held: &mut Vec<(Held, Instant)>, closed_after: &mut Latency) -> io::Result<u64> {
    let fds: Vec<RawFd> = held.iter().map(|(conn, _)| conn.as_raw_fd()).collect();
    let closed = sys::peer_closed(&fds)?;
    if !closed.contains(&true) {
        return Ok(0);
    }
    let now = Instant::now();
    let mut count = 0;
    let mut closed = closed.into_iter();
    held.retain(|(_, reached)| {
        let gone = closed.next().unwrap_or(false);
        if gone {
            closed_after.record(now.saturating_duration_since(*reached));
            count += 1;
        }
        !gone
    });
    Ok(count)
}

async fn open(local: &Local, shared: &Shared, start: Instant) -> Option<(Held, Instant)> {
    let target = shared.target;
    let began = Instant::now();
    let opened = match local.open_to(target, shared.stage).await {
        Ok((Held::Ready(mut conn), reached)) => {
            let prepared = if shared.prepare.is_empty() {
                Ok(())
            } else {
                let preparing = conn.prepare_described(&shared.prepare);
                match monoio::time::timeout(shared.common.timeout, preparing).await {
                    Ok(prepared) => prepared,
                    Err(_) => Err(ClientError::Timeout),
                }
            };
            // Held with no buffers, as a quiet client's are.
            conn.shrink();
            prepared.map(|()| (Held::Ready(conn), reached))
        }
        other => other,
    };
    match opened {
        Ok((conn, reached)) => {
            let mut stats = local.stats.borrow_mut();
            stats[target].count += 1;
            stats[target]
                .latency
                .record(reached.saturating_duration_since(began));
            stats[target].busy(0, reached.saturating_duration_since(start));
            local.counters.done();
            Some((conn, reached))
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

    fn result() -> IdleResult {
        IdleResult {
            stats: TargetStats::default(),
            pid: Some(1),
            rss_before: Some(10_000_000),
            rss_after: Some(14_096_000),
            tree_before: None,
            tree_after: None,
            closed_by_server: 0,
            closed_before_reading: 0,
            closed_after: Latency::new(),
        }
    }

    #[test]
    fn bytes_per_connection() {
        let mut result = result();
        assert_eq!(result.bytes_per_connection(), None);
        result.stats.count = 1000;
        assert_eq!(result.bytes_per_connection(), Some(4096.0));
        result.rss_after = Some(9_000_000);
        assert_eq!(result.bytes_per_connection(), Some(-1000.0));
        result.rss_before = None;
        assert_eq!(result.bytes_per_connection(), None);
        assert_eq!(result.tree_pss_per_connection(), None);
    }

    #[test]
    fn connections_the_server_closed_before_the_reading_are_not_in_it() {
        let mut result = result();
        result.stats.count = 1200;
        result.closed_by_server = 300;
        result.closed_before_reading = 200;
        assert_eq!(result.open_at_reading(), 1000);
        assert_eq!(result.bytes_per_connection(), Some(4096.0));
        result.closed_before_reading = 1200;
        assert_eq!(result.bytes_per_connection(), None);
    }

    #[test]
    fn process_tree_per_connection() {
        let mut result = result();
        result.stats.count = 100;
        result.tree_before = Some(TreeMemory {
            processes: 6,
            pss_bytes: 50_000_000,
            page_table_bytes: 1_000_000,
        });
        result.tree_after = Some(TreeMemory {
            processes: 106,
            pss_bytes: 150_000_000,
            page_table_bytes: 11_000_000,
        });
        assert_eq!(result.tree_pss_per_connection(), Some(1_000_000.0));
        assert_eq!(result.tree_page_tables_per_connection(), Some(100_000.0));
    }

    #[test]
    fn sweep_drops_what_the_server_closed() {
        use std::net::TcpListener;
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        runtime::block_on(async move {
            let mut held = Vec::new();
            let mut servers = Vec::new();
            for _ in 0..3 {
                let tcp = crate::client::transport::tcp_connect(addr, None)
                    .await
                    .expect("connect");
                servers.push(listener.accept().expect("accept").0);
                held.push((Held::Socket(tcp), Instant::now()));
            }
            let mut closed_after = Latency::new();
            assert_eq!(sweep(&mut held, &mut closed_after).expect("poll"), 0);
            drop(servers.remove(1));
            monoio::time::sleep(Duration::from_millis(20)).await;
            assert_eq!(sweep(&mut held, &mut closed_after).expect("poll"), 1);
            assert_eq!((held.len(), closed_after.count()), (2, 1));
            assert_eq!(sweep(&mut held, &mut closed_after).expect("poll"), 0);
        })
        .expect("runtime");
    }
}
