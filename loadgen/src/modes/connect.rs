//! `connect`: connection storms. Each connection is timed from connect() to ReadyForQuery,
//! split into TCP, the SSLRequest round trip (SSLRequest targets only), the TLS handshake,
//! authentication and the rest of startup, then closed with Terminate.
//!
//! `--max` keeps `--concurrency` setups in flight (closed loop); `--rate N` starts N per second
//! on a constant schedule while a target runs (open loop, capped at `--concurrency` in flight).
//! Targets take turns in slices ([`Plan`]); a connection belongs to the slice it started in.
//! With `--pid`, a [`Sampler`] reads the server's CPU time at the boundaries of the slices.

use std::io;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{millis, progress_line, share, Local, MeasureError, Measured};
use crate::plan::{Pacer, Plan, Slice, Step};
use crate::progress::Progress;
use crate::runtime::{self, join_all, Counters, Gate};
use crate::sampler::Sampler;
use crate::settings::Common;
use crate::stats::TargetStats;

/// Time for the worker threads to start before the first slice.
const START_DELAY: Duration = Duration::from_millis(50);

/// How connections are started.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Pace {
    /// As fast as possible, `concurrency` at a time.
    Max,
    /// This many per second while a target runs.
    Rate(f64),
}

/// How much to measure per target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// For this long.
    Duration(Duration),
    /// This many connections (successful or not).
    Count(u64),
}

/// `connect` mode settings.
#[derive(Clone, Copy, Debug)]
pub struct ConnectSettings {
    /// Closed or open loop.
    pub pace: Pace,
    /// Setups in flight at most, all threads together.
    pub concurrency: usize,
    /// Time or count per target.
    pub limit: Limit,
    /// Unrecorded time per target first.
    pub warmup: Duration,
    /// Approximate slice length.
    pub slice: Duration,
}

struct Shared {
    common: Arc<Common>,
    settings: ConnectSettings,
    plan: Plan,
    counters: Arc<Counters>,
    /// Connections started per target while recording (count limit only).
    claimed: Vec<AtomicU64>,
}

impl Shared {
    /// Takes one connection of target `index`'s quota; false once it is used up.
    fn claim(&self, index: usize) -> bool {
        match self.settings.limit {
            Limit::Duration(_) => true,
            Limit::Count(count) => self.claimed[index].fetch_add(1, Ordering::Relaxed) < count,
        }
    }

    /// Whether every target's quota is used up (never, with a duration limit).
    fn all_claimed(&self) -> bool {
        match self.settings.limit {
            Limit::Duration(_) => false,
            Limit::Count(count) => self
                .claimed
                .iter()
                .all(|c| c.load(Ordering::Relaxed) >= count),
        }
    }
}

/// Runs the storm and returns what was measured per target.
pub fn run(common: Arc<Common>, settings: ConnectSettings) -> Result<Measured, MeasureError> {
    let sampler = Sampler::start(&common)?;
    let start = Instant::now() + START_DELAY;
    let targets = common.targets.len();
    let plan = match settings.limit {
        Limit::Duration(d) => Plan::timed(start, targets, settings.slice, settings.warmup, d),
        Limit::Count(_) => Plan::counted(start, targets, settings.slice, settings.warmup),
    };
    let shared = Arc::new(Shared {
        common: common.clone(),
        settings,
        plan,
        counters: Arc::new(Counters::default()),
        claimed: (0..targets).map(|_| AtomicU64::new(0)).collect(),
    });
    let threads = common.threads;
    let len = match (settings.limit, plan.end()) {
        (Limit::Count(count), _) => count * targets as u64,
        (Limit::Duration(_), Some(end)) => millis(end - start),
        (Limit::Duration(_), None) => 0,
    };
    let progress = Progress::new(!common.quiet, len);
    sampler.begin(plan);
    let worker = shared.clone();
    let results = runtime::run_threads(
        threads,
        move |thread| runtime::block_on(run_thread(worker.clone(), thread))?,
        || {
            let (done, errors) = shared.counters.read();
            let now = Instant::now();
            let pos = match settings.limit {
                Limit::Count(_) => done + errors,
                Limit::Duration(_) => millis(now.saturating_duration_since(start)),
            };
            progress.update(pos, || {
                progress_line(&plan, &common, now, (done, errors), "connections")
            });
        },
    )?;
    progress.finish();
    let mut cpu = sampler.finish()?;
    let mut merged = crate::stats::merge_threads(targets, results);
    let counted = matches!(settings.limit, Limit::Count(_));
    for (target, stats) in merged.iter_mut().enumerate() {
        let slices = plan.recorded_slices_of(target, stats.busy_ns.len());
        stats.fill_slices(&slices, plan.slice_len(), counted);
        // CPU counts in the slices that duration_s counts: not after a count ran out.
        if let Some(cpu) = &mut cpu[target] {
            cpu.truncate(stats.busy_ns.len());
        }
    }
    Ok(Measured { stats: merged, cpu })
}

async fn run_thread(shared: Arc<Shared>, thread: usize) -> io::Result<Vec<TargetStats>> {
    let local = Local::for_thread(&shared.common, &shared.counters, thread)?;
    let threads = shared.common.threads;
    let places = share(shared.settings.concurrency, threads, thread);
    match shared.settings.pace {
        Pace::Max => {
            let slots = (0..places)
                .map(|_| monoio::spawn(slot(shared.clone(), local.clone())))
                .collect();
            join_all(slots).await;
        }
        Pace::Rate(rate) => {
            paced(&shared, &local, rate, thread, places).await;
        }
    }
    Ok(Local::finish(local))
}

/// One closed-loop slot: a connection to whichever target runs, again and again.
async fn slot(shared: Arc<Shared>, local: Rc<Local>) {
    loop {
        let now = Instant::now();
        let Some(slice) = shared.plan.slice_at(now) else {
            return;
        };
        if shared.all_claimed() {
            return;
        }
        if now < slice.start {
            local.timer.sleep_until(slice.start).await;
            continue;
        }
        if slice.recording && !shared.claim(slice.target) {
            local.timer.sleep_until(slice.end).await;
            continue;
        }
        one_connection(&local, slice).await;
    }
}

/// Open loop: this thread's share of `rate` per second, on a schedule offset from the other
/// threads' so that together they are evenly spaced.
async fn paced(shared: &Shared, local: &Rc<Local>, rate: f64, thread: usize, places: usize) {
    let threads = shared.common.threads as f64;
    let interval = Duration::from_secs_f64(threads / rate);
    let offset = Duration::from_secs_f64(thread as f64 / rate);
    let gate = Gate::new(places);
    let mut index = 0;
    'slices: while let Some(slice) = shared.plan.slice(index) {
        if shared.all_claimed() {
            break;
        }
        let mut pacer = Pacer::open(slice.start + offset, interval, slice.end);
        loop {
            match pacer.step(Instant::now()) {
                Step::Wait(until) => local.timer.sleep_until(until).await,
                Step::Send { .. } => {
                    if slice.recording && !shared.claim(slice.target) {
                        continue 'slices;
                    }
                    let permit = gate.acquire().await;
                    let local = local.clone();
                    monoio::spawn(async move {
                        one_connection(&local, slice).await;
                        drop(permit);
                    });
                }
                Step::Done => break,
            }
        }
        index += 1;
    }
    // Taking every place waits for the connections still in flight.
    let mut all = Vec::with_capacity(places);
    for _ in 0..places {
        all.push(gate.acquire().await);
    }
}

/// Opens, times and closes one connection of the slice's target.
async fn one_connection(local: &Local, slice: Slice) {
    let index = slice.target;
    let result = local.connect(index).await;
    let done = Instant::now();
    if !slice.recording {
        if let Ok((conn, _)) = result {
            conn.terminate().await;
        }
        return;
    }
    match result {
        Ok((conn, t)) => {
            {
                let mut stats = local.stats.borrow_mut();
                let stats = &mut stats[index];
                stats.count += 1;
                stats.latency.record(t.ready - t.start);
                stats.phases.record(&t);
                stats.busy(slice.index, done - slice.start);
            }
            local.counters.done();
            conn.terminate().await;
        }
        Err(error) => {
            local.error(index, &error);
            local.stats.borrow_mut()[index].busy(slice.index, done - slice.start);
        }
    }
}
