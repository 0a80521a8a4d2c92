//! Checked settings: the command line with its URLs parsed, hosts resolved, files read.
//! A [`Common`] that exists is usable; every problem is a [`UsageError`] (exit status 2).

use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::Rng;

use crate::cli::{CommonArgs, PidSpec};
use crate::client::query::{Protocol, Statement, MAX_PARAMS};
use crate::client::Stage;
use crate::dist::BranchPicker;
use crate::source::{self, Spread};
use crate::sys::{self, ProcError};
use crate::target::{Target, TargetError};

/// The query when no `--query-file` is given.
pub const DEFAULT_QUERY: &str = "SELECT 1";

/// A bad argument, found after clap's syntax checks.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    /// A `--target` is not usable.
    #[error("target '{name}': {error}")]
    Target {
        /// The target's name (or the whole argument if it has none).
        name: String,
        /// Why.
        error: TargetError,
    },
    /// Two `--target`s share a name.
    #[error("two targets are named '{0}'")]
    DuplicateTarget(String),
    /// A user name has `{branch}` but there are no branches to put there.
    #[error("target '{0}' has {{branch}} in its user name but --branches is empty")]
    NoBranches(String),
    /// The query file could not be read.
    #[error("cannot read query file {path}: {source}")]
    QueryFile {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The query file has no statement.
    #[error("query file {0} has no statements")]
    EmptyQueryFile(String),
    /// A query-file line has parameter values (after a tab) but the simple protocol has no
    /// way to send them.
    #[error(
        "query file {path}, line {line}: parameter values (after a tab) need \
         --protocol extended or prepared"
    )]
    ParamsNeedExtended {
        /// The file.
        path: String,
        /// The line, from 1.
        line: usize,
    },
    /// A query-file line has more parameter values than the protocol can count.
    #[error("query file {path}, line {line}: more than {MAX_PARAMS} parameter values")]
    TooManyParams {
        /// The file.
        path: String,
        /// The line, from 1.
        line: usize,
    },
    /// `--pid NAME=...` names no target.
    #[error("--pid/--pid-file names unknown target '{0}'")]
    UnknownPidTarget(String),
    /// `--pid` is not a number.
    #[error("--pid '{0}' is not a process id")]
    BadPid(String),
    /// `--source-ips` are IPv4 and a target is IPv6: the socket could not bind them.
    #[error(
        "--source-ips are IPv4 addresses but target '{target}' is IPv6 ({addr}); \
         give the target an IPv4 address (e.g. 127.0.0.1) or drop --source-ips"
    )]
    SourceFamily {
        /// The target.
        target: String,
        /// Its address.
        addr: SocketAddr,
    },
    /// `--branch-by-source N` without N source addresses, or without branches.
    #[error(
        "--branch-by-source {wanted} needs at least {wanted} --source-ips (there are {sources}) \
         and --branches (there are {branches})"
    )]
    BranchBySource {
        /// N.
        wanted: usize,
        /// Source addresses given.
        sources: usize,
        /// Branches given.
        branches: usize,
    },
    /// `idle --stage hello|tls` with a target that does not use TLS.
    #[error("target '{target}': --stage {stage} needs TLS (sslmode=require or verify-full)")]
    StageNeedsTls {
        /// The target.
        target: String,
        /// The stage.
        stage: Stage,
    },
    /// The `--plot` file cannot be written (checked before measuring).
    #[error("cannot write plot {path}: {source}")]
    Plot {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Settings every mode uses.
#[derive(Debug)]
pub struct Common {
    /// The targets, in command-line order.
    pub targets: Vec<Target>,
    /// Branch choice for `{branch}`.
    pub branches: BranchPicker,
    /// Worker threads.
    pub threads: usize,
    /// Source addresses to bind, round robin (empty: the kernel chooses).
    pub source_ips: Vec<IpAddr>,
    /// Whether `--source-ips` was given (then idle mode keeps it as it is).
    pub source_ips_given: bool,
    /// `--branch-by-source`: how many of the first source addresses keep to one branch each.
    pub branch_by_source: usize,
    /// Limit per connection setup and per query.
    pub timeout: Duration,
    /// JSON output.
    pub json: bool,
    /// `--plot`: the SVG file, created before measuring so a bad path fails at once.
    pub plot: Option<PlotFile>,
    /// No progress bar.
    pub quiet: bool,
    /// Exit 1 on any error.
    pub strict: bool,
    /// Each target's server process (`--pid`, `--pid-file`), in target order.
    pub pids: Vec<Option<PidSource>>,
}

impl Common {
    /// Parses and checks the shared arguments.
    pub fn from_args(args: CommonArgs) -> Result<Common, UsageError> {
        let mut targets: Vec<Target> = Vec::with_capacity(args.targets.len());
        for spec in &args.targets {
            let target =
                Target::parse(spec).map_err(|(name, error)| UsageError::Target { name, error })?;
            if targets.iter().any(|t| t.name == target.name) {
                return Err(UsageError::DuplicateTarget(target.name));
            }
            if target.has_branch_placeholder() && args.branches.is_empty() {
                return Err(UsageError::NoBranches(target.name));
            }
            targets.push(target);
        }
        let threads = match args.threads {
            Some(n) => n.get(),
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        let pids = pid_sources(&targets, &args.pid, &args.pid_file)?;
        let source_ips_given = args.source_ips.is_some();
        let source_ips = args.source_ips.map(|s| s.0).unwrap_or_default();
        if source_ips.iter().any(IpAddr::is_ipv4) {
            if let Some(target) = targets.iter().find(|t| t.addr.is_ipv6()) {
                return Err(UsageError::SourceFamily {
                    target: target.name.clone(),
                    addr: target.addr,
                });
            }
        }
        let branch_by_source = match args.branch_by_source {
            None | Some(0) => 0,
            Some(n) if source_ips.len() < n || args.branches.is_empty() => {
                return Err(UsageError::BranchBySource {
                    wanted: n,
                    sources: source_ips.len(),
                    branches: args.branches.len(),
                })
            }
            Some(n) => n,
        };
        let plot = args.plot.map(PlotFile::create).transpose()?;
        Ok(Common {
            targets,
            branches: BranchPicker::new(args.branches, args.branch_dist),
            threads,
            source_ips,
            source_ips_given,
            branch_by_source,
            timeout: args.timeout,
            json: args.json,
            plot,
            quiet: args.quiet,
            strict: args.strict,
            pids,
        })
    }

    /// Refuses a stage that only exists with TLS when a target has none.
    pub fn check_stage(&self, stage: Stage) -> Result<(), UsageError> {
        match self.targets.iter().find(|t| t.tls.is_none()) {
            Some(target) if stage.needs_tls() => Err(UsageError::StageNeedsTls {
                target: target.name.clone(),
                stage,
            }),
            _ => Ok(()),
        }
    }

    /// A branch for a new connection.
    pub fn pick_branch(&self, rng: &mut impl Rng) -> Option<&str> {
        self.branches.pick(rng)
    }

    /// The branch of the `n`-th connection: its source address's own under
    /// `--branch-by-source`, else one picked at random.
    pub fn branch_for(&self, n: usize, rng: &mut impl Rng) -> Option<&str> {
        match self.source_index(n) {
            Some(i) if i < self.branch_by_source => {
                let branches = self.branches.branches();
                branches.get(i % branches.len().max(1)).map(String::as_str)
            }
            _ => self.pick_branch(rng),
        }
    }

    /// The source address of the `n`-th connection, if there are source addresses.
    pub fn source_ip(&self, n: usize) -> Option<IpAddr> {
        self.source_index(n).map(|i| self.source_ips[i])
    }

    /// The index in `source_ips` of the `n`-th connection's address.
    fn source_index(&self, n: usize) -> Option<usize> {
        match self.source_ips.len() {
            0 => None,
            len => Some(n % len),
        }
    }

    /// Idle mode: without `--source-ips`, spreads `connections` per target over loopback
    /// addresses when one address has too few of its `ephemeral_ports` for them.
    pub fn spread_sources(&mut self, connections: usize, ephemeral_ports: u32) -> Spread {
        if self.source_ips_given {
            return Spread::Unneeded;
        }
        let spread = source::spread(connections, &self.targets, ephemeral_ports);
        if let Spread::Loopback(ips) = &spread {
            self.source_ips.clone_from(ips);
        }
        spread
    }
}

/// The `--plot` file, created (empty) when the arguments are checked and written at the end.
#[derive(Debug)]
pub struct PlotFile {
    /// Where it is.
    pub path: PathBuf,
    /// Open for writing.
    pub file: fs::File,
}

impl PlotFile {
    fn create(path: PathBuf) -> Result<PlotFile, UsageError> {
        match fs::File::create(&path) {
            Ok(file) => Ok(PlotFile { path, file }),
            Err(source) => Err(UsageError::Plot {
                path: path.display().to_string(),
                source,
            }),
        }
    }
}

/// The statements of `--query-file` (one per line; blank lines and `--` comments skipped), or
/// the default query.
pub fn load_queries(path: Option<&Path>, protocol: Protocol) -> Result<Vec<Statement>, UsageError> {
    let Some(path) = path else {
        return Ok(vec![Statement::plain(DEFAULT_QUERY)]);
    };
    let shown = || path.display().to_string();
    let text = fs::read_to_string(path).map_err(|source| UsageError::QueryFile {
        path: shown(),
        source,
    })?;
    let mut queries = Vec::new();
    for (n, line) in text.lines().enumerate() {
        // Only the start is trimmed: a tab at the end is an empty last parameter value.
        let line = line.trim_start();
        if line.trim_end().is_empty() || line.starts_with("--") {
            continue;
        }
        let statement = Statement::from_line(line);
        let line = n + 1;
        if statement.params.len() > MAX_PARAMS {
            return Err(UsageError::TooManyParams {
                path: shown(),
                line,
            });
        }
        if !statement.params.is_empty() && protocol == Protocol::Simple {
            return Err(UsageError::ParamsNeedExtended {
                path: shown(),
                line,
            });
        }
        queries.push(statement);
    }
    if queries.is_empty() {
        return Err(UsageError::EmptyQueryFile(shown()));
    }
    Ok(queries)
}

/// Where a target's process id comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PidSource {
    /// This pid.
    Pid(u32),
    /// The first line of this file, read when the run starts (idle: when the target is measured).
    File(PathBuf),
}

impl PidSource {
    /// The process id, reading the file now if it comes from one.
    pub fn read(&self) -> Result<u32, ProcError> {
        match self {
            PidSource::Pid(pid) => Ok(*pid),
            PidSource::File(path) => sys::read_pid_file(path),
        }
    }
}

/// The process to measure for each target: a named `--pid`/`--pid-file` wins over one for all.
fn pid_sources(
    targets: &[Target],
    pids: &[PidSpec],
    pid_files: &[PidSpec],
) -> Result<Vec<Option<PidSource>>, UsageError> {
    let mut specs = Vec::with_capacity(pids.len() + pid_files.len());
    for spec in pids {
        let pid = spec
            .value
            .parse()
            .map_err(|_| UsageError::BadPid(spec.value.clone()))?;
        specs.push((spec.target.as_deref(), PidSource::Pid(pid)));
    }
    for spec in pid_files {
        let source = PidSource::File(PathBuf::from(&spec.value));
        specs.push((spec.target.as_deref(), source));
    }
    for (name, _) in &specs {
        if let Some(name) = name {
            if !targets.iter().any(|t| t.name == *name) {
                return Err(UsageError::UnknownPidTarget((*name).to_owned()));
            }
        }
    }
    Ok(targets
        .iter()
        .map(|target| {
            let named = specs.iter().find(|(n, _)| *n == Some(target.name.as_str()));
            let any = specs.iter().find(|(n, _)| n.is_none());
            named.or(any).map(|(_, source)| source.clone())
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn common(args: &str) -> Result<Common, UsageError> {
        let argv = ["branchgate-loadgen", "connect", "--max"]
            .into_iter()
            .chain(args.split(' '));
        let cli = crate::cli::Cli::try_parse_from(argv).expect("clap accepts it");
        let crate::cli::ModeArgs::Connect(args) = cli.mode else {
            panic!("connect")
        };
        Common::from_args(args.common)
    }

    #[test]
    fn checks_targets() {
        let ok = common(
            "--target a=postgres://u@127.0.0.1 --threads 3 --source-ips 127.0.0.2-127.0.0.3",
        )
        .expect("valid");
        assert_eq!((ok.targets.len(), ok.threads), (1, 3));
        assert_eq!(ok.source_ip(3), Some(IpAddr::from([127, 0, 0, 3])));
        let messages = [
            (
                "--target a=postgres://u@127.0.0.1 --target a=postgres://v@127.0.0.1",
                "two targets are named 'a'",
            ),
            (
                "--target a=postgres://{branch}@127.0.0.1",
                "target 'a' has {branch} in its user name but --branches is empty",
            ),
            (
                "--target a=mysql://u@h",
                "target 'a': URL must start with postgres:// or postgresql://",
            ),
            (
                "--target postgres://u@h",
                "target 'postgres://u@h': expected NAME=URL",
            ),
            (
                "--target a=postgres://u@127.0.0.1 --target b=postgres://u@[::1] --source-ips 127.0.0.2",
                "--source-ips are IPv4 addresses but target 'b' is IPv6 ([::1]:5432); \
                 give the target an IPv4 address (e.g. 127.0.0.1) or drop --source-ips",
            ),
            (
                "--target a=postgres://u@127.0.0.1 --plot /nonexistent/dir/x.svg",
                "cannot write plot /nonexistent/dir/x.svg: No such file or directory (os error 2)",
            ),
        ];
        for (args, message) in messages {
            let error = common(args).expect_err(args);
            assert_eq!(error.to_string(), message);
        }
    }

    #[test]
    fn application_servers_keep_to_their_branch() {
        let c = common(
            "--target a=postgres://{branch}@127.0.0.1 --branches b1,b2,b3 \
             --source-ips 127.0.0.2-127.0.0.6 --branch-by-source 4",
        )
        .expect("valid");
        let mut rng = rand::thread_rng();
        for round in 0..3 {
            for (i, branch) in ["b1", "b2", "b3", "b1"].into_iter().enumerate() {
                assert_eq!(c.branch_for(round * 5 + i, &mut rng), Some(branch), "{i}");
            }
        }
        // The fifth address picks any branch.
        let picked: std::collections::HashSet<_> = (0..200)
            .filter_map(|round| c.branch_for(round * 5 + 4, &mut rng))
            .collect();
        assert_eq!(picked.len(), 3, "{picked:?}");
        for args in [
            "--target a=postgres://u@127.0.0.1 --branches b1 --source-ips 127.0.0.2 --branch-by-source 2",
            "--target a=postgres://u@127.0.0.1 --source-ips 127.0.0.2-127.0.0.3 --branch-by-source 2",
        ] {
            let error = common(args).expect_err(args);
            assert!(
                error.to_string().starts_with("--branch-by-source 2 needs"),
                "{error}"
            );
        }
    }

    #[test]
    fn tls_stages_need_tls() {
        let c = common("--target a=postgres://u@127.0.0.1?sslmode=require --target b=postgres://u@127.0.0.1?sslmode=disable")
            .expect("valid");
        for stage in [Stage::Tcp, Stage::Startup, Stage::Ready] {
            assert!(c.check_stage(stage).is_ok(), "{stage}");
        }
        let error = c.check_stage(Stage::Tls).expect_err("plaintext b");
        assert_eq!(
            error.to_string(),
            "target 'b': --stage tls needs TLS (sslmode=require or verify-full)"
        );
        assert!(c.check_stage(Stage::Hello).is_err());
    }

    #[test]
    fn source_addresses_given_or_spread() {
        let ipv6 = common("--target a=postgres://u@[::1] --source-ips none").expect("no IPv4");
        assert!(ipv6.source_ips.is_empty() && ipv6.source_ips_given);
        let mut auto = common("--target a=postgres://u@127.0.0.1").expect("valid");
        assert!(!auto.source_ips_given);
        assert_eq!(auto.spread_sources(100, 28_232), Spread::Unneeded);
        assert_eq!(auto.source_ip(0), None);
        assert!(matches!(
            auto.spread_sources(30_000, 28_232),
            Spread::Loopback(_)
        ));
        assert_eq!(auto.source_ips.len(), 3);
        assert_eq!(auto.source_ip(4), Some(IpAddr::from([127, 0, 0, 3])));
        // Given addresses, or `none`, are kept however many connections there are.
        for (arg, len) in [("none", 0), ("127.0.0.5", 1)] {
            let mut given = common(&format!(
                "--target a=postgres://u@127.0.0.1 --source-ips {arg}"
            ))
            .expect("valid");
            assert_eq!(given.spread_sources(1_000_000, 28_232), Spread::Unneeded);
            assert_eq!(given.source_ips.len(), len);
        }
    }

    #[test]
    fn plot_file_is_created_at_once() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("p.svg");
        let c = common(&format!(
            "--target a=postgres://u@127.0.0.1 --plot {}",
            path.display()
        ))
        .expect("valid");
        assert_eq!(c.plot.map(|p| p.path), Some(path.clone()));
        assert!(path.exists());
    }

    #[test]
    fn query_files() {
        let simple = Protocol::Simple;
        assert_eq!(
            load_queries(None, simple).expect("default"),
            [Statement::plain(DEFAULT_QUERY)]
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("q.sql");
        fs::write(&path, "SELECT 1\n\n-- comment\n  SELECT 2  \n").expect("write");
        assert_eq!(
            load_queries(Some(&path), simple).expect("read"),
            [Statement::plain("SELECT 1"), Statement::plain("SELECT 2")]
        );
        fs::write(&path, "\n-- nothing\n").expect("write");
        assert!(matches!(
            load_queries(Some(&path), simple),
            Err(UsageError::EmptyQueryFile(_))
        ));
        assert!(matches!(
            load_queries(Some(&dir.path().join("missing")), simple),
            Err(UsageError::QueryFile { .. })
        ));
    }

    #[test]
    fn query_file_parameters() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("q.sql");
        fs::write(&path, "SELECT 1\nSELECT $1, $2\t4\t\n").expect("write");
        for protocol in [Protocol::Extended, Protocol::Prepared] {
            let got = load_queries(Some(&path), protocol).expect("read");
            assert_eq!(got[1].sql, "SELECT $1, $2");
            assert_eq!(got[1].params, ["4", ""]);
        }
        let error = load_queries(Some(&path), Protocol::Simple).expect_err("simple");
        assert!(
            matches!(error, UsageError::ParamsNeedExtended { line: 2, .. }),
            "{error}"
        );
        let many = format!("SELECT 1{}\n", "\t1".repeat(MAX_PARAMS + 1));
        fs::write(&path, many).expect("write");
        assert!(matches!(
            load_queries(Some(&path), Protocol::Prepared),
            Err(UsageError::TooManyParams { line: 1, .. })
        ));
    }

    #[test]
    fn pids_per_target() {
        let c = common("--target a=postgres://u@127.0.0.1 --target b=postgres://u@127.0.0.1")
            .expect("valid");
        let spec = |s: &str| s.parse::<PidSpec>().expect("spec");
        let got = pid_sources(&c.targets, &[spec("7"), spec("b=8")], &[]).expect("valid");
        assert_eq!(got, [Some(PidSource::Pid(7)), Some(PidSource::Pid(8))]);
        let got = pid_sources(&c.targets, &[], &[spec("a=/run/a.pid")]).expect("valid");
        assert_eq!(got, [Some(PidSource::File("/run/a.pid".into())), None]);
        assert!(matches!(
            pid_sources(&c.targets, &[spec("c=1")], &[]),
            Err(UsageError::UnknownPidTarget(_))
        ));
        assert!(matches!(
            pid_sources(&c.targets, &[spec("x")], &[]),
            Err(UsageError::BadPid(_))
        ));
        let c = common("--target a=postgres://u@127.0.0.1 --pid 9").expect("valid");
        assert_eq!(c.pids, [Some(PidSource::Pid(9))]);
        assert_eq!(PidSource::Pid(9).read().ok(), Some(9));
        let error = common("--target a=postgres://u@127.0.0.1 --pid-file b=/x").expect_err("b");
        assert_eq!(
            error.to_string(),
            "--pid/--pid-file names unknown target 'b'"
        );
    }
}
