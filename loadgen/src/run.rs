//! One run: check the arguments (and create the plot file), raise the open-file limit, make
//! sure every target answers on every branch, measure, report.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::cli::{Cli, ConnectArgs, IdleArgs, ModeArgs, QueryArgs};
use crate::client::query::{Protocol, Statement};
use crate::modes::connect::{self, ConnectSettings, Limit, Pace};
use crate::modes::idle::{self, IdleError, IdleSettings};
use crate::modes::query::{self, QueryPace, QuerySettings};
use crate::modes::{MeasureError, Measured};
use crate::probe::{self, ProbeError};
use crate::report::{Report, TargetReport};
use crate::runtime::{self, RuntimeError};
use crate::settings::{load_queries, Common, UsageError};
use crate::source::{self, Spread};
use crate::{plot, sys};

/// `connect --duration` when neither a duration nor a count is given.
const DEFAULT_CONNECT_DURATION: Duration = Duration::from_secs(10);

/// Why a run failed. [`Error::exit_code`] is 2 for bad arguments, 1 otherwise.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bad argument.
    #[error("{0}")]
    Usage(#[from] UsageError),
    /// A target or branch failed the check before the run.
    #[error(transparent)]
    Probe(#[from] ProbeError),
    /// The worker threads failed.
    #[error("{0}")]
    Runtime(#[from] RuntimeError),
    /// Connect or query mode stopped (worker threads, or a `--pid` process unreadable).
    #[error("{0}")]
    Measure(#[from] MeasureError),
    /// Idle mode could not read the process's memory.
    #[error("{0}")]
    Idle(#[from] IdleError),
    /// The plot could not be written.
    #[error("cannot write plot {path}: {source}")]
    Plot {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl Error {
    /// The process exit status for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Usage(_) => 2,
            _ => 1,
        }
    }
}

/// A finished run.
#[derive(Debug)]
pub struct Outcome {
    /// What was measured.
    pub report: Report,
    /// Tables or JSON, as asked.
    pub output: String,
    /// With `--strict`: what makes the run a failure, one entry per target that failed an
    /// operation or recorded none (empty without `--strict`).
    pub failures: Vec<String>,
}

/// Runs the command line's measurement.
pub fn run(cli: Cli) -> Result<Outcome, Error> {
    let (common, report) = match cli.mode {
        ModeArgs::Connect(args) => run_connect(args)?,
        ModeArgs::Query(args) => run_query(args)?,
        ModeArgs::Idle(args) => run_idle(args)?,
    };
    if let Some(plot) = &common.plot {
        let title = format!("{} latency by percentile", report.mode);
        let series: Vec<(&str, &crate::stats::Latency)> = report
            .results
            .iter()
            .map(|r| (r.target.as_str(), &r.latency))
            .collect();
        plot::write(&plot.file, &title, &series).map_err(|source| Error::Plot {
            path: plot.path.clone(),
            source,
        })?;
    }
    let output = if common.json {
        report.json()
    } else {
        report.table()
    };
    let failures = if common.strict {
        strict_failures(&report)
    } else {
        Vec::new()
    };
    Ok(Outcome {
        report,
        output,
        failures,
    })
}

/// What `--strict` refuses: a target with failed operations, or with no successful one (a
/// target that recorded nothing measured nothing, however few errors it had), or (idle) whose
/// server closed held connections: its memory figure is then not the one asked for.
pub fn strict_failures(report: &Report) -> Vec<String> {
    let mut failures = Vec::new();
    for r in &report.results {
        match (r.errors, r.count) {
            (0, 0) => failures.push(format!("target '{}' recorded no operations", r.target)),
            (0, _) => {}
            (errors, _) => failures.push(format!(
                "target '{}' had {errors} failed operations (first: {})",
                r.target,
                r.first_error.as_deref().unwrap_or("unknown")
            )),
        }
        if let Some(idle) = r.idle.filter(|i| i.closed_by_server > 0) {
            failures.push(format!(
                "target '{}': the server closed {} of {} held connections",
                r.target, idle.closed_by_server, r.count
            ));
        }
    }
    failures
}

fn run_connect(args: ConnectArgs) -> Result<(Arc<Common>, Report), Error> {
    let common = Arc::new(Common::from_args(args.common)?);
    let pace = match args.rate {
        Some(rate) => Pace::Rate(rate),
        None => Pace::Max,
    };
    let limit = match (args.count, args.duration) {
        (Some(count), _) => Limit::Count(count.get()),
        (None, duration) => Limit::Duration(duration.unwrap_or(DEFAULT_CONNECT_DURATION)),
    };
    let settings = ConnectSettings {
        pace,
        concurrency: args.concurrency.get(),
        limit,
        warmup: args.warmup,
        slice: args.slice,
    };
    prepare(&common, settings.concurrency, None)?;
    let measured = connect::run(common.clone(), settings)?;
    let (pace_text, rate) = match pace {
        Pace::Max => (format!("--max, {} in flight", settings.concurrency), None),
        Pace::Rate(rate) => (format!("{rate}/s"), Some(rate)),
    };
    let (limit_text, duration_s, count) = match limit {
        Limit::Duration(d) => (
            format!("{} per target", secs(d)),
            Some(d.as_secs_f64()),
            None,
        ),
        Limit::Count(n) => (format!("{n} per target"), None, Some(n)),
    };
    let report = Report {
        mode: "connect",
        threads: common.threads,
        settings: json!({
            "max": pace == Pace::Max, "rate": rate, "concurrency": settings.concurrency,
            "duration_s": duration_s, "count": count, "warmup_s": args.warmup.as_secs_f64(),
            "slice_s": args.slice.as_secs_f64(), "timeout_s": common.timeout.as_secs_f64(),
        }),
        headline: format!(
            "connect: {pace_text}, {limit_text}, {} threads, targets interleaved in {} slices",
            common.threads,
            secs(args.slice)
        ),
        results: reports(&common, "connect", measured),
    };
    Ok((common, report))
}

fn run_query(args: QueryArgs) -> Result<(Arc<Common>, Report), Error> {
    let common = Arc::new(Common::from_args(args.common)?);
    let queries = load_queries(args.query_file.as_deref(), args.protocol)?;
    let pace = match args.rate {
        Some(rate) => QueryPace::Rate(rate),
        None => QueryPace::Closed,
    };
    let connections = args.connections.get();
    prepare(
        &common,
        connections * common.targets.len(),
        Some((&queries, args.protocol)),
    )?;
    let settings = QuerySettings {
        connections,
        pace,
        protocol: args.protocol,
        queries,
        duration: args.duration,
        warmup: args.warmup,
        slice: args.slice,
    };
    let query_count = settings.queries.len();
    let measured = query::run(common.clone(), settings)?;
    let (pace_text, rate) = match pace {
        QueryPace::Closed => ("closed loop".to_owned(), None),
        QueryPace::Rate(rate) => (format!("{rate}/s open loop"), Some(rate)),
    };
    let report = Report {
        mode: "query",
        threads: common.threads,
        settings: json!({
            "connections": connections, "closed": rate.is_none(), "rate": rate,
            "protocol": args.protocol.as_str(), "queries": query_count,
            "duration_s": args.duration.as_secs_f64(), "warmup_s": args.warmup.as_secs_f64(),
            "slice_s": args.slice.as_secs_f64(), "timeout_s": common.timeout.as_secs_f64(),
        }),
        headline: format!(
            "query: {connections} connections per target, {pace_text}, {} protocol, {} per target \
             (+{} warmup), {} threads, targets interleaved in {} slices",
            args.protocol.as_str(),
            secs(args.duration),
            secs(args.warmup),
            common.threads,
            secs(args.slice)
        ),
        results: reports(&common, "query", measured),
    };
    Ok((common, report))
}

fn run_idle(args: IdleArgs) -> Result<(Arc<Common>, Report), Error> {
    let mut common = Common::from_args(args.common)?;
    common.check_stage(args.stage)?;
    let connections = args.connections.get();
    let ports = sys::ephemeral_ports().unwrap_or(sys::DEFAULT_EPHEMERAL_PORTS);
    let spread = common.spread_sources(connections, ports);
    if !common.quiet {
        match &spread {
            Spread::Unneeded => {}
            Spread::Loopback(ips) => eprintln!(
                "note: {connections} connections per target, one source address has {ports} \
                 ephemeral ports: spreading them over {} loopback addresses from {} \
                 (servers must accept 127.0.0.0/8; --source-ips overrides)",
                ips.len(),
                source::FIRST_AUTO_SOURCE
            ),
            Spread::Impossible(why) => eprintln!(
                "note: {connections} connections from one source address may run out of its \
                 {ports} ephemeral ports: {why}"
            ),
        }
    }
    let common = Arc::new(common);
    prepare(&common, connections, None)?;
    let settings = IdleSettings {
        connections,
        concurrency: args.concurrency.get(),
        hold: args.hold,
        settle: args.settle,
        stage: args.stage,
        process_tree: args.process_tree,
        prepare: args.prepare,
    };
    let results = idle::run(common.clone(), settings)?;
    let report = Report {
        mode: "idle",
        threads: common.threads,
        settings: json!({
            "connections": connections, "concurrency": args.concurrency.get(),
            "stage": args.stage.as_str(), "process_tree": args.process_tree,
            "prepare": args.prepare,
            "hold_s": args.hold.as_secs_f64(), "settle_s": args.settle.as_secs_f64(),
            "source_ips": common.source_ips.len(),
            "source_ips_auto": matches!(spread, Spread::Loopback(_)),
            "timeout_s": common.timeout.as_secs_f64(),
        }),
        headline: format!(
            "idle: {connections} connections per target held at stage {}, for {} after the \
             reading, {} threads, targets one after another",
            args.stage,
            secs(args.hold),
            common.threads
        ),
        results: common
            .targets
            .iter()
            .zip(results)
            .map(|(t, r)| TargetReport::idle(&t.name, connections as u64, args.stage, r))
            .collect(),
    };
    Ok((common, report))
}

fn reports(common: &Common, mode: &'static str, measured: Measured) -> Vec<TargetReport> {
    common
        .targets
        .iter()
        .zip(measured.stats)
        .zip(&measured.cpu)
        .map(|((target, stats), cpu)| {
            TargetReport::new(&target.name, mode, stats).with_cpu(cpu.as_ref())
        })
        .collect()
}

fn secs(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// Raises the open-file limit for `connections` and checks that every target answers on every
/// branch (and, in query mode, runs every statement there).
fn prepare(
    common: &Arc<Common>,
    connections: usize,
    queries: Option<(&[Statement], Protocol)>,
) -> Result<(), Error> {
    let wanted = connections as u64 + sys::SPARE_DESCRIPTORS;
    match sys::raise_nofile(wanted) {
        Ok(limit) if limit.now < wanted && !common.quiet => eprintln!(
            "note: open-file limit is {} (hard limit), {connections} connections need about {wanted}; \
             expect 'Too many open files' errors",
            limit.now
        ),
        Ok(limit) if limit.now > limit.before && !common.quiet && connections > 1_000 => {
            eprintln!("note: raised the open-file limit from {} to {}", limit.before, limit.now)
        }
        Ok(_) => {}
        Err(error) if !common.quiet => eprintln!("note: cannot raise the open-file limit: {error}"),
        Err(_) => {}
    }
    let queries = queries.map(|(q, p)| (q.to_vec(), p));
    let checked = runtime::block_on(probe::check(common.clone(), queries));
    Ok(checked.map_err(RuntimeError::Start)??)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::TargetStats;

    fn target(name: &str, count: u64, errors: u64) -> TargetReport {
        let mut stats = TargetStats {
            count,
            ..TargetStats::default()
        };
        for _ in 0..errors {
            stats.error(|| "timed out".into());
        }
        TargetReport::new(name, "query", stats)
    }

    #[test]
    fn strict_refuses_errors_and_targets_that_recorded_nothing() {
        let report = |results| Report {
            mode: "query",
            threads: 1,
            settings: json!({}),
            results,
            headline: String::new(),
        };
        assert!(strict_failures(&report(vec![target("a", 5, 0)])).is_empty());
        let failures = strict_failures(&report(vec![
            target("a", 5, 0),
            target("idle", 0, 0),
            target("bad", 3, 2),
        ]));
        assert_eq!(
            failures,
            [
                "target 'idle' recorded no operations",
                "target 'bad' had 2 failed operations (first: timed out)"
            ]
        );
    }
}
