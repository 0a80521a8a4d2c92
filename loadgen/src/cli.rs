//! The command line (clap): `branchgate-loadgen <connect|query|idle> --target NAME=URL ...`.
//!
//! Options shared by every mode are in [`CommonArgs`]; each mode adds its own. Values that
//! need more than syntax (URLs, files) are checked in [`crate::settings`].

use std::net::{IpAddr, Ipv4Addr};
use std::num::{NonZeroU64, NonZeroUsize};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::client::query::Protocol;
use crate::client::Stage;
use crate::dist::BranchDist;

/// The most source addresses `--source-ips` may list (a /8 has 16M; nobody needs more).
const MAX_SOURCE_IPS: u32 = 1 << 16;

/// branchgate-loadgen: connection storms, query latency and idle memory, several targets
/// (branchgate, PgBouncer, PostgreSQL) interleaved in one run.
#[derive(Debug, Parser)]
#[command(name = "branchgate-loadgen", version)]
pub struct Cli {
    /// What to measure.
    #[command(subcommand)]
    pub mode: ModeArgs,
}

/// The modes.
#[derive(Debug, Subcommand)]
pub enum ModeArgs {
    /// Connection storms: time from connect() to ReadyForQuery, split into TCP, TLS, auth, ready.
    Connect(ConnectArgs),
    /// Query latency and throughput over a fixed set of connections, open or closed loop.
    Query(QueryArgs),
    /// Hold N connections (logged in, or stopped at a stage before authentication) and report
    /// the server's resident memory per connection.
    Idle(IdleArgs),
}

/// Options of every mode.
#[derive(Debug, Args)]
pub struct CommonArgs {
    /// A server to measure, repeatable:
    /// NAME=postgres://USER:PASSWORD@HOST:PORT/DB?sslmode=disable|require|verify-full&sslnegotiation=postgres|direct&sslrootcert=PATH.
    /// USER may contain {branch}.
    #[arg(long = "target", value_name = "NAME=URL", required = true)]
    pub targets: Vec<String>,
    /// Branches that replace {branch} in user names, comma-separated.
    #[arg(long, value_name = "B1,B2,..", value_delimiter = ',')]
    pub branches: Vec<String>,
    /// How each connection picks its branch: uniform, or zipf:S (skewed towards the first).
    #[arg(long, value_name = "uniform|zipf:S", default_value = "uniform")]
    pub branch_dist: BranchDist,
    /// A client mix of application servers: the first N source addresses each talk to one
    /// branch (address i to branch i modulo the branch count); the others pick a branch per
    /// connection (--branch-dist). Needs --source-ips and --branches.
    #[arg(long, value_name = "N")]
    pub branch_by_source: Option<usize>,
    /// Worker threads, each with its own io_uring runtime [default: number of CPUs].
    #[arg(long, value_name = "N")]
    pub threads: Option<NonZeroUsize>,
    /// Source addresses to bind, round robin: FIRST-LAST or a comma-separated list (IPv4), or
    /// `none` for the kernel's choice. Idle mode picks loopback addresses by itself when one
    /// address could run out of ephemeral ports.
    #[arg(long, value_name = "FIRST-LAST|none")]
    pub source_ips: Option<SourceIps>,
    /// Give up on a connection setup or query after this long.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_positive_duration)]
    pub timeout: Duration,
    /// Print one JSON document on stdout instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Draw the latency percentile curves of all targets into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
    /// Exit with status 1 if any operation failed.
    #[arg(long)]
    pub strict: bool,
    /// The target's server process, PID for every target or NAME=PID for one: idle reads its
    /// memory, connect and query its CPU time during the target's slices.
    #[arg(long, value_name = "[NAME=]PID")]
    pub pid: Vec<PidSpec>,
    /// Like --pid, with the process id read from the first line of a file when the run starts.
    #[arg(long, value_name = "[NAME=]FILE")]
    pub pid_file: Vec<PidSpec>,
}

/// `connect` mode.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("pace").required(true).args(["rate", "max"])))]
pub struct ConnectArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// New connections per second while a target runs (open loop).
    #[arg(long, value_name = "N", value_parser = parse_rate)]
    pub rate: Option<f64>,
    /// As many connections as possible, --concurrency at a time.
    #[arg(long)]
    pub max: bool,
    /// Connection setups in flight at most (all threads together).
    #[arg(long, value_name = "C", default_value = "64")]
    pub concurrency: NonZeroUsize,
    /// Measure each target for this long [default: 10s].
    #[arg(long, value_name = "DURATION", value_parser = parse_positive_duration, conflicts_with = "count")]
    pub duration: Option<Duration>,
    /// Measure each target for this many connections instead of a duration.
    #[arg(long, value_name = "N")]
    pub count: Option<NonZeroU64>,
    /// Run each target this long first without recording.
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Targets take turns in slices of about this length.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_positive_duration)]
    pub slice: Duration,
}

/// `query` mode.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("pace").required(true).args(["rate", "closed"])))]
pub struct QueryArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Connections per target, opened before measuring.
    #[arg(long, value_name = "N", default_value = "1")]
    pub connections: NonZeroUsize,
    /// Queries per second per target, on a constant schedule (open loop, coordinated omission
    /// corrected: latency counts from the scheduled send time).
    #[arg(long, value_name = "R", value_parser = parse_rate)]
    pub rate: Option<f64>,
    /// Closed loop: each connection sends its next query as soon as the last one is answered.
    #[arg(long)]
    pub closed: bool,
    /// simple: Query each time; extended: Parse (unnamed), Bind, Execute, Sync each time;
    /// prepared: each distinct statement prepared once per connection, then Bind/Execute/Sync.
    #[arg(long, value_enum, default_value = "simple")]
    pub protocol: Protocol,
    /// SQL statements, one per line, used round robin [default: SELECT 1]. A tab ends the
    /// SQL; each further tab-separated field is a text value for $1, $2, ... (extended and
    /// prepared only).
    #[arg(long, value_name = "FILE")]
    pub query_file: Option<PathBuf>,
    /// Measure each target for this long.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_positive_duration)]
    pub duration: Duration,
    /// Run each target this long first without recording.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Targets take turns in slices of about this length.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_positive_duration)]
    pub slice: Duration,
}

/// `idle` mode.
#[derive(Debug, Args)]
pub struct IdleArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Connections to open and hold, per target.
    #[arg(long, value_name = "N")]
    pub connections: NonZeroUsize,
    /// Connection setups in flight at most (all threads together).
    #[arg(long, value_name = "C", default_value = "64")]
    pub concurrency: NonZeroUsize,
    /// How long to hold the connections once they are all open.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub hold: Duration,
    /// Pause between the last connection opening and reading the memory.
    #[arg(long, value_name = "DURATION", default_value = "500ms", value_parser = parse_duration)]
    pub settle: Duration,
    /// Where each connection stops and is held: tcp (connected, nothing sent), hello (TLS
    /// ClientHello sent, after the SSLRequest round trip unless direct SSL), tls (handshake
    /// done, nothing sent over it), startup (StartupMessage sent, the server's authentication
    /// request received and left unanswered), ready (logged in).
    #[arg(long, value_enum, value_name = "STAGE", default_value = "ready")]
    pub stage: Stage,
    /// Once logged in (stage ready), each connection prepares N named statements and
    /// describes them, one at a time (a Parse, a Describe and a Sync each: as asyncpg and
    /// tokio-postgres prepare), the same N texts in every connection, as an application's
    /// connections all prepare its statements: what a server keeps for clients that hold
    /// prepared statements.
    #[arg(long, value_name = "N", default_value = "0")]
    pub prepare: usize,
    /// Also read the proportional set size (Pss) and page tables of the --pid process and all
    /// its descendants: for a server that forks a process per connection (PostgreSQL).
    #[arg(long)]
    pub process_tree: bool,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("'{text}': {e} (try 10s or 500ms)"))
}

/// A duration that must be more than zero (a run, a slice, a timeout of nothing is a mistake).
fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    match parse_duration(text)? {
        Duration::ZERO => Err(format!("'{text}' is zero; it must be more than that")),
        duration => Ok(duration),
    }
}

fn parse_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 => Ok(rate),
        _ => Err(format!("'{text}' is not a positive number")),
    }
}

/// Source addresses to bind, in order; empty for `none` (the kernel chooses).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceIps(pub Vec<IpAddr>);

impl FromStr for SourceIps {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text == "none" {
            return Ok(SourceIps(Vec::new()));
        }
        let ip = |s: &str| {
            s.trim()
                .parse::<Ipv4Addr>()
                .map_err(|_| format!("'{s}' is not an IPv4 address"))
        };
        if let Some((first, last)) = text.split_once('-') {
            let (first, last) = (u32::from(ip(first)?), u32::from(ip(last)?));
            if last < first {
                return Err(format!("'{text}': the range ends before it starts"));
            }
            if last - first >= MAX_SOURCE_IPS {
                return Err(format!("'{text}': more than {MAX_SOURCE_IPS} addresses"));
            }
            return Ok(SourceIps(
                (first..=last)
                    .map(|n| IpAddr::V4(Ipv4Addr::from(n)))
                    .collect(),
            ));
        }
        let list = text
            .split(',')
            .map(|s| ip(s).map(IpAddr::V4))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(SourceIps(list))
    }
}

/// `--pid`/`--pid-file` value: for every target, or for the one named.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PidSpec {
    /// The target it applies to; `None` for all.
    pub target: Option<String>,
    /// The pid or the pid file's path, as given.
    pub value: String,
}

impl FromStr for PidSpec {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (target, value) = match text.split_once('=') {
            Some((name, value)) => (Some(name.to_owned()), value),
            None => (None, text),
        };
        if value.is_empty() {
            return Err(format!("'{text}' names no process"));
        }
        Ok(PidSpec {
            target,
            value: value.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &str) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("branchgate-loadgen").chain(args.split(' ')))
    }

    #[test]
    fn definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn modes_parse() {
        let cli =
            parse("connect --target a=postgres://u@h --target b=postgres://u@h --max --count 100")
                .expect("valid");
        let ModeArgs::Connect(args) = cli.mode else {
            panic!("not connect")
        };
        assert_eq!(args.common.targets.len(), 2);
        assert!(args.max && args.rate.is_none());
        assert_eq!(args.count.map(NonZeroU64::get), Some(100));

        let cli = parse("query --target a=x --rate 500 --protocol extended --branches b1,b2 --branch-dist zipf:1.2 --duration 2s --pid a=7")
            .expect("valid");
        let ModeArgs::Query(args) = cli.mode else {
            panic!("not query")
        };
        assert_eq!(args.rate, Some(500.0));
        assert_eq!(args.protocol, Protocol::Extended);
        assert_eq!(args.common.branches, ["b1", "b2"]);
        assert_eq!(args.common.branch_dist, BranchDist::Zipf(1.2));
        assert_eq!(args.duration, Duration::from_secs(2));
        assert_eq!(args.common.pid[0].value, "7");
        let cli = parse("query --target a=x --closed --protocol prepared").expect("valid");
        let ModeArgs::Query(args) = cli.mode else {
            panic!("not query")
        };
        assert_eq!(args.protocol, Protocol::Prepared);

        let cli = parse("idle --target a=x --connections 10 --pid 42 --pid-file b=/run/x.pid")
            .expect("valid");
        let ModeArgs::Idle(args) = cli.mode else {
            panic!("not idle")
        };
        assert_eq!(args.common.pid[0].target, None);
        assert_eq!(args.common.pid_file[0].target.as_deref(), Some("b"));
        assert_eq!(args.stage, Stage::Ready);
        assert!(!args.process_tree);

        let cli = parse("idle --target a=x --connections 10 --stage hello --process-tree")
            .expect("valid");
        let ModeArgs::Idle(args) = cli.mode else {
            panic!("not idle")
        };
        assert_eq!(args.stage, Stage::Hello);
        assert!(args.process_tree);
    }

    #[test]
    fn bad_arguments_are_refused() {
        for args in [
            "connect --target a=x",
            "connect --target a=x --max --rate 5",
            "connect --target a=x --max --count 5 --duration 1s",
            "connect --target a=x --rate 0",
            "connect --target a=x --rate -1",
            "connect --max",
            "query --target a=x",
            "query --target a=x --closed --duration 5",
            "query --target a=x --closed --protocol binary",
            "query --target a=x --closed --connections 0",
            "idle --target a=x",
            "connect --target a=x --max --duration 0s",
            "connect --target a=x --max --slice 0ms",
            "query --target a=x --closed --duration 0s",
            "query --target a=x --closed --slice 0s",
            "idle --target a=x --connections 5 --timeout 0s",
            "idle --target a=x --connections 5 --source-ips 127.0.0.9-127.0.0.1",
            "idle --target a=x --connections 5 --stage auth",
        ] {
            assert!(parse(args).is_err(), "{args}");
        }
    }

    #[test]
    fn source_ip_ranges_and_lists() {
        let range: SourceIps = "127.0.0.2-127.0.1.1".parse().expect("range");
        assert_eq!(range.0.len(), 256);
        assert_eq!(range.0[0], IpAddr::from([127, 0, 0, 2]));
        assert_eq!(range.0[255], IpAddr::from([127, 0, 1, 1]));
        let list: SourceIps = "127.0.0.2, 127.0.0.3".parse().expect("list");
        assert_eq!(list.0.len(), 2);
        assert_eq!("none".parse::<SourceIps>(), Ok(SourceIps(Vec::new())));
        for bad in ["", "x", "127.0.0.1-", "::1", "127.0.0.0-127.255.255.255"] {
            assert!(bad.parse::<SourceIps>().is_err(), "{bad}");
        }
    }
}
