//! `query`: a fixed set of connections per target, opened first; then targets take turns in
//! slices, and while a target runs its connections send queries.
//!
//! Open loop (`--rate R`): each of a target's n connections sends on its own constant schedule
//! of R/n per second, the schedules offset so that together they are evenly spaced. Latency
//! is measured from the scheduled send time (coordinated omission corrected, see
//! [`crate::plan`]). Closed loop (`--closed`): each connection sends as soon as it has its reply.
//! With `--pid`, a [`Sampler`] reads the server's CPU time at the boundaries of the slices: it
//! checks the processes before the connections open, and samples once the plan is known.

use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{millis, progress_line, Local, MeasureError, Measured};
use crate::client::query::{distinct_sql, Outcome, Protocol, Request, Statement};
use crate::client::{ClientError, Conn};
use crate::plan::{latency, Pacer, Plan, Step};
use crate::progress::Progress;
use crate::runtime::{self, join_all, Counters, Gate};
use crate::sampler::Sampler;
use crate::settings::Common;
use crate::stats::TargetStats;

/// Connections being set up at once per thread before the measurement.
const OPEN_CONCURRENCY: usize = 32;
/// Time between the last thread being ready and the first slice.
const START_DELAY: Duration = Duration::from_millis(20);
/// How often a ready thread looks for the start time.
const START_POLL: Duration = Duration::from_millis(5);

/// Open or closed loop.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum QueryPace {
    /// As fast as replies come back.
    Closed,
    /// This many queries per second per target, all its connections together.
    Rate(f64),
}

/// `query` mode settings.
#[derive(Clone, Debug)]
pub struct QuerySettings {
    /// Connections per target.
    pub connections: usize,
    /// Open or closed loop.
    pub pace: QueryPace,
    /// Simple, extended or prepared.
    pub protocol: Protocol,
    /// Statements, used round robin by each connection.
    pub queries: Vec<Statement>,
    /// Measured time per target.
    pub duration: Duration,
    /// Unrecorded time per target first.
    pub warmup: Duration,
    /// Approximate slice length.
    pub slice: Duration,
}

struct Shared {
    common: Arc<Common>,
    settings: QuerySettings,
    counters: Arc<Counters>,
    /// Connections open per target.
    opened: Vec<AtomicUsize>,
    /// Threads done opening.
    ready: AtomicUsize,
    /// The plan's start, in nanoseconds after `base`; 0 until every thread is ready.
    start_ns: AtomicU64,
    base: Instant,
}

/// The prepared statement name of the `k`th distinct SQL text.
fn statement_name(k: usize) -> String {
    format!("lg{k}")
}

/// Opens the connections, runs the plan and returns what was measured per target.
pub fn run(common: Arc<Common>, settings: QuerySettings) -> Result<Measured, MeasureError> {
    let sampler = Sampler::start(&common)?;
    let targets = common.targets.len();
    let shared = Arc::new(Shared {
        common: common.clone(),
        counters: Arc::new(Counters::default()),
        opened: (0..targets).map(|_| AtomicUsize::new(0)).collect(),
        ready: AtomicUsize::new(0),
        start_ns: AtomicU64::new(0),
        base: Instant::now(),
        settings,
    });
    let opening = (shared.settings.connections * targets) as u64;
    let progress = Progress::new(!common.quiet, opening);
    progress.update(0, || "opening connections".into());
    let mut plan: Option<Plan> = None;
    let worker = shared.clone();
    let results = runtime::run_threads(
        common.threads,
        move |thread| runtime::block_on(run_thread(worker.clone(), thread))?,
        || {
            let (done, errors) = shared.counters.read();
            let now = Instant::now();
            let Some(plan) = plan else {
                if shared.ready.load(Ordering::Acquire) < common.threads {
                    let open: usize = shared
                        .opened
                        .iter()
                        .map(|o| o.load(Ordering::Relaxed))
                        .sum();
                    progress.update(open as u64, || "connections opened".into());
                    return;
                }
                let start = now + START_DELAY;
                let ns = u64::try_from((start - shared.base).as_nanos()).unwrap_or(u64::MAX);
                shared.start_ns.store(ns, Ordering::Release);
                let new = shared.plan(start);
                sampler.begin(new);
                let total = new.end().map_or(0, |end| millis(end - start));
                progress.reset(total, String::new());
                plan = Some(new);
                return;
            };
            let elapsed = millis(now.saturating_duration_since(plan.start()));
            progress.update(elapsed, || {
                progress_line(&plan, &common, now, (done, errors), "queries")
            });
        },
    )?;
    progress.finish();
    let cpu = sampler.finish()?;
    let mut merged = crate::stats::merge_threads(targets, results);
    if let Some(plan) = plan {
        for (target, stats) in merged.iter_mut().enumerate() {
            let slices = plan.recorded_slices_of(target, usize::MAX);
            stats.fill_slices(&slices, plan.slice_len(), false);
        }
    }
    Ok(Measured { stats: merged, cpu })
}

impl Shared {
    fn plan(&self, start: Instant) -> Plan {
        let s = &self.settings;
        Plan::timed(
            start,
            self.common.targets.len(),
            s.slice,
            s.warmup,
            s.duration,
        )
    }
}

async fn run_thread(shared: Arc<Shared>, thread: usize) -> io::Result<Vec<TargetStats>> {
    let local = Local::for_thread(&shared.common, &shared.counters, thread)?;
    let threads = shared.common.threads;
    let gate = Gate::new(OPEN_CONCURRENCY);
    let mut opening = Vec::new();
    for target in 0..shared.common.targets.len() {
        for ordinal in (thread..shared.settings.connections).step_by(threads) {
            let (shared, local, gate) = (shared.clone(), local.clone(), gate.clone());
            opening.push(monoio::spawn(async move {
                let _permit = gate.acquire().await;
                open(&shared, &local, target)
                    .await
                    .map(|c| (target, ordinal, c))
            }));
        }
    }
    let conns: Vec<(usize, usize, Conn)> = join_all(opening).await.into_iter().flatten().collect();
    shared.ready.fetch_add(1, Ordering::AcqRel);
    let start = loop {
        match shared.start_ns.load(Ordering::Acquire) {
            0 => monoio::time::sleep(START_POLL).await,
            ns => break shared.base + Duration::from_nanos(ns),
        }
    };
    let plan = shared.plan(start);
    let driving = conns
        .into_iter()
        .map(|(target, ordinal, conn)| {
            let (shared, local) = (shared.clone(), local.clone());
            monoio::spawn(async move {
                drive(&shared, &local, plan, target, ordinal, conn).await;
            })
        })
        .collect();
    join_all(driving).await;
    Ok(Local::finish(local))
}

/// Opens one connection and prepares the statements (prepared protocol: each distinct SQL
/// text once).
async fn open(shared: &Shared, local: &Local, target: usize) -> Option<Conn> {
    let result = async {
        let (mut conn, _) = local.connect(target).await?;
        if shared.settings.protocol == Protocol::Prepared {
            let (texts, _) = distinct_sql(&shared.settings.queries);
            for (k, sql) in texts.into_iter().enumerate() {
                let name = statement_name(k);
                let prepare = conn.prepare(&name, sql);
                monoio::time::timeout(shared.common.timeout, prepare)
                    .await
                    .map_err(|_| ClientError::Timeout)??;
            }
        }
        Ok::<_, ClientError>(conn)
    }
    .await;
    match result {
        Ok(conn) => {
            shared.opened[target].fetch_add(1, Ordering::Relaxed);
            Some(conn)
        }
        Err(error) => {
            local.error(target, &error);
            None
        }
    }
}

/// Sends queries on `conn` during its target's slices, then terminates it.
async fn drive(
    shared: &Shared,
    local: &Local,
    plan: Plan,
    target: usize,
    ordinal: usize,
    mut conn: Conn,
) {
    let settings = &shared.settings;
    let queries = &settings.queries;
    let mut requests: Vec<Request> = match settings.protocol {
        Protocol::Simple => queries.iter().map(|q| Request::simple(&q.sql)).collect(),
        Protocol::Extended => queries
            .iter()
            .map(|q| Request::extended(&q.sql, &q.params))
            .collect(),
        Protocol::Prepared => {
            let (_, text_of) = distinct_sql(queries);
            queries
                .iter()
                .zip(text_of)
                .map(|(q, k)| Request::prepared(&statement_name(k), &q.params))
                .collect()
        }
    };
    let mut next = ordinal % requests.len();
    let open = shared.opened[target].load(Ordering::Relaxed).max(1) as f64;
    let mut from = 0;
    while let Some(slice) = plan.next_slice_of(target, from) {
        from = slice.index + 1;
        local.timer.sleep_until(slice.start).await;
        let mut pacer = match settings.pace {
            QueryPace::Closed => Pacer::closed(slice.end),
            QueryPace::Rate(rate) => {
                let interval = open / rate;
                let offset = interval * (ordinal as f64 / settings.connections as f64);
                let first = slice.start + Duration::from_secs_f64(offset);
                Pacer::open(first, Duration::from_secs_f64(interval), slice.end)
            }
        };
        loop {
            let intended = match pacer.step(Instant::now()) {
                Step::Wait(until) => {
                    local.timer.sleep_until(until).await;
                    continue;
                }
                Step::Send { intended } => intended,
                Step::Done => break,
            };
            let run = conn.run(&mut requests[next]);
            let result = monoio::time::timeout(shared.common.timeout, run).await;
            next = (next + 1) % requests.len();
            let done = Instant::now();
            if !slice.recording {
                match result {
                    Ok(Ok(_)) => continue,
                    // A broken connection is an error even in warmup: it is gone for good.
                    Ok(Err(error)) => return local.error(target, &error),
                    Err(_) => return local.error(target, &ClientError::Timeout),
                }
            }
            local.stats.borrow_mut()[target].busy(slice.index, done - slice.start);
            match result {
                Ok(Ok(Outcome::Done { .. })) => {
                    let mut stats = local.stats.borrow_mut();
                    stats[target].count += 1;
                    stats[target].latency.record(latency(intended, done));
                    local.counters.done();
                }
                Ok(Ok(Outcome::Failed(message))) => local.error(target, &message),
                // The connection is unusable after an I/O error or a timeout mid-reply.
                Ok(Err(error)) => return local.error(target, &error),
                Err(_) => return local.error(target, &ClientError::Timeout),
            }
        }
    }
    conn.terminate().await;
}
