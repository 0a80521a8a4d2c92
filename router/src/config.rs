//! The router's own TOML configuration (`router.toml`).
//!
//! Parse, don't validate: a [`Config`] that exists is valid. The file is read into private raw
//! serde structs (`deny_unknown_fields`, values wrapped in [`Spanned`] where a later check needs a
//! line number), then converted into the typed public structs with defaults filled in.
//!
//! ```toml
//! workers = 2                    # optional; default = number of cores
//! steering = "ebpf"              # optional: "ebpf" (default), "userspace" or "off"
//! pin_workers = true             # optional: each worker thread on a core of its own
//! rebalance = "30s"              # optional: move branches between workers by load this often
//! catalog = "catalog.toml"       # required; relative to this file's directory, or
//!                                # "etcd://host:2379,host:2379/prefix" (crate::catalog::etcd)
//! [tls]
//! cert = "server.crt"            # PEM certificate chain
//! key = "server.key"             # PEM private key
//! [listen]
//! direct = "127.0.0.1:5432"
//! pooled = "127.0.0.1:6432"      # optional: the pooled (transaction mode) port
//! admin = "127.0.0.1:9930"       # optional: /metrics and /healthz over HTTP
//! admin_public = false           # true: admin may be a non-loopback address
//! proxy_from = ["10.0.0.5", "10.0.1.0/24"]  # optional: balancers that send PROXY v2 headers
//! [timeouts]                     # all optional
//! startup = "10s"
//! handshake = "5s"
//! connect = "5s"
//! drain = "30s"
//! health_check_interval = "2s"
//! [limits]                       # all optional
//! max_client_connections = 10000
//! max_startup_connections = 1000
//! [auth]                         # optional
//! mock_secret_file = "branchgate-mock.secret"   # default: beside the catalog
//! [reload]                       # optional
//! max_removed_percent = 50
//! force = false
//! [admin]                        # optional
//! socket = "branchgate.sock"     # default: beside this file
//! [pool]                         # optional, the pooled port; PgBouncer's names and defaults
//! pool_size = 20                 # backend connections per branch
//! min_pool_size = 0              # kept open even when unused; at most pool_size
//! max_client_connections = 0     # clients per branch on the pooled port; 0: no own limit
//! max_prepared_statements = 200  # per backend connection; 0: not tracked
//! query_wait_timeout = "120s"    # wait for a backend connection; never 0
//! query_wait_notify = "5s"       # a NOTICE to a client queued this long; "0s": none
//! client_idle_timeout = "0s"     # "0s": off
//! idle_transaction_timeout = "0s"
//! server_idle_timeout = "600s"
//! server_lifetime = "3600s"
//! [node]                         # optional; used when the catalog is in etcd (crate::fleet)
//! id = "edge-1"                  # default: generated once, kept in `node-id` beside this file
//! peer = "10.0.0.11:7432"        # optional: where this node listens for other nodes' cancels
//! secret_file = "peer.secret"    # the fleet's shared secret (32+ bytes): forwards cancels
//! lease_ttl = "10s"              # how long a dead node still counts as live; at least 2s
//! ```
//!
//! The catalog may override `[pool]` per branch (`[branch.pool]`, see [`crate::catalog`]).

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

pub mod pool;
pub mod proxy_from;
mod raw;
mod toml_error;

pub use pool::{PoolOverrides, PoolSettings};
pub use proxy_from::ProxyFrom;
pub use toml_error::TomlError;

use crate::catalog::etcd::EtcdUrl;
use crate::fleet::registry::{DEFAULT_LEASE_TTL, MIN_LEASE_TTL};
use crate::fleet::NodeId;

use raw::{HumanDuration, RawConfig, RawTls};

/// Default time from accept until TLS is up (the first byte, then the handshake).
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Default time a client has to finish TLS, startup and authentication.
pub const DEFAULT_STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time for a backend TCP connect plus backend authentication.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default graceful-shutdown drain.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Default interval between replica health probes.
pub const DEFAULT_HEALTH_CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// Default cap on concurrent client connections (whole router).
pub const DEFAULT_MAX_CLIENT_CONNECTIONS: NonZeroU32 = match NonZeroU32::new(10_000) {
    Some(n) => n,
    None => unreachable!(),
};
/// Default cap, per worker, on connections not yet authenticated (TLS, startup, SCRAM).
pub const DEFAULT_MAX_STARTUP_CONNECTIONS: NonZeroU32 = match NonZeroU32::new(1_000) {
    Some(n) => n,
    None => unreachable!(),
};
/// Default share of the catalog's branches (or roles) one reload may remove, in percent.
pub const DEFAULT_MAX_REMOVED_PERCENT: u8 = 50;
/// Default file name of the fake-SCRAM secret, in the catalog's directory.
pub const DEFAULT_MOCK_SECRET_FILE: &str = "branchgate-mock.secret";
/// Default file name of the control socket, in the configuration file's directory.
pub const DEFAULT_CONTROL_SOCKET: &str = "branchgate.sock";
/// File name of a generated node id, in the configuration file's directory.
pub const NODE_ID_FILE: &str = "node-id";

/// The router configuration. Every field is checked and every default filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Worker threads (one runtime per core).
    pub workers: NonZeroUsize,
    /// Which worker accepts a new connection ([`crate::steering`]).
    pub steering: SteeringConfig,
    /// Pin each worker thread to a core of its own (the default). Off, the kernel's scheduler
    /// places them: on a machine whose cores PostgreSQL or the clients share, a worker is then
    /// not held to a core another process keeps busy (BENCHMARKS.md, "Tails").
    pub pin_workers: bool,
    /// How often branch ownership follows the load ([`crate::steering::Steering::rebalance`]);
    /// `None` (the default): never, each branch stays on its consistent-hash owner.
    pub rebalance: Option<Duration>,
    /// Where the branch catalog comes from: a file (the default) or etcd.
    pub catalog: CatalogSource,
    /// Certificate and key files (read by the TLS module, not here).
    pub tls: TlsFiles,
    /// Listening addresses.
    pub listen: Listen,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Resource limits.
    pub limits: Limits,
    /// Authentication settings.
    pub auth: Auth,
    /// What a catalog reload may change at once.
    pub reload: Reload,
    /// The local control socket (`branchgate reload`, `branchgate role`).
    pub admin: Admin,
    /// The pooled port's pools, unless a branch overrides them
    /// ([`PoolSettings::for_branch`]).
    pub pool: PoolSettings,
    /// This router as a node of a fleet (when the catalog is in etcd).
    pub node: NodeConfig,
}

/// `[node]`: this router's identity in the fleet that shares an etcd catalog
/// ([`crate::fleet`]). Unused with a catalog file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// Where the node id comes from.
    pub id: NodeIdSource,
    /// The address other nodes use for node-to-node traffic (forwarded cancels): this node
    /// listens there, and records it in the registry.
    pub peer: Option<SocketAddr>,
    /// The fleet's shared secret for forwarded cancels ([`crate::fleet::wire`]), resolved
    /// against the config file's directory. Without it cancels are not forwarded.
    pub secret_file: Option<PathBuf>,
    /// The time to live of the node's lease in etcd: how long a node that died without a word
    /// still counts as live ([`crate::fleet::registry`]).
    pub lease_ttl: Duration,
}

/// Where a node's id comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeIdSource {
    /// `[node] id`.
    Configured(NodeId),
    /// A file (`node-id` beside router.toml): read, or generated and written on first start,
    /// so that the id survives restarts.
    File(PathBuf),
}

/// `catalog`: where the branch catalog comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CatalogSource {
    /// A TOML file, resolved against the config file's directory; reloaded on SIGHUP, on
    /// `branchgate reload` and when it changes.
    File(PathBuf),
    /// Keys under a prefix in etcd, followed with a watch ([`crate::catalog::etcd`]): one
    /// catalog for a fleet of routers.
    Etcd(EtcdUrl),
}

impl CatalogSource {
    /// The catalog file, if the catalog is one.
    pub fn file(&self) -> Option<&Path> {
        match self {
            CatalogSource::File(path) => Some(path),
            CatalogSource::Etcd(_) => None,
        }
    }

    /// What the catalog is called in messages: the file's path, or the etcd URL.
    pub fn describe(&self) -> String {
        match self {
            CatalogSource::File(path) => path.display().to_string(),
            CatalogSource::Etcd(url) => url.to_string(),
        }
    }
}

/// `steering`: who chooses the worker of a new connection ([`crate::steering`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SteeringConfig {
    /// The `sk_reuseport` program. `required` when written out: then start-up fails if it
    /// cannot be loaded; the default falls back to [`SteeringConfig::Userspace`], and says so.
    Ebpf {
        /// `steering = "ebpf"` was written.
        required: bool,
    },
    /// No program: the kernel's hash, then a hand-off to the branch's owner ([`crate::handoff`]).
    Userspace,
    /// No program: the kernel's SO_REUSEPORT hash.
    Off,
}

/// Authentication settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Auth {
    /// 32 random bytes (hex) from which the SCRAM salts and keys of roles and branches that do
    /// not exist are derived, so that they look like real ones: stable across restarts and
    /// across routers that share the file. Created on first start if missing.
    pub mock_secret_file: PathBuf,
}

/// The guard against reloads that would tear the catalog down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reload {
    /// A reload that removes more than this share (1 to 100 percent) of the branches, or of
    /// the roles, is refused; one that removes every branch, or every role, always is.
    pub max_removed_percent: u8,
    /// Apply every valid catalog, whatever it removes.
    pub force: bool,
}

/// The local control socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin {
    /// The Unix socket the running router answers `reload` on (owner-only permissions).
    pub socket: PathBuf,
}

/// The server certificate chain and private key, both PEM, paths resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// Listening addresses, and who may speak for clients on them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    /// The session-mode (direct) port.
    pub direct: SocketAddr,
    /// The transaction-mode (pooled) port, if the router has one.
    pub pooled: Option<SocketAddr>,
    /// `/metrics` and `/healthz` over HTTP, if configured: a loopback address unless
    /// `admin_public = true` says otherwise.
    pub admin: Option<SocketAddr>,
    /// The load balancers whose connections, on both client ports, must begin with a PROXY
    /// protocol v2 header naming the client ([`crate::front_door::proxy_header`]); empty: none.
    pub proxy_from: ProxyFrom,
}

/// Timeouts, all non-zero except `drain`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// A client must complete TLS, startup and authentication within this.
    pub startup: Duration,
    /// From accept until TLS is established (the first byte, then the handshake); a plaintext
    /// CancelRequest or an answer to `N` must also come within it. Shorter than `startup`, so
    /// that sockets that say nothing are dropped early.
    pub handshake: Duration,
    /// Backend TCP connect plus backend authentication.
    pub connect: Duration,
    /// Graceful shutdown drain; zero closes sessions at once.
    pub drain: Duration,
    /// Interval between replica health probes.
    pub health_check_interval: Duration,
}

/// Resource limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Authenticated client sessions across all workers (as PostgreSQL counts backends).
    pub max_client_connections: NonZeroU32,
    /// Per worker: connections still in TLS, startup or SCRAM. Connections beyond it are
    /// closed as soon as they are accepted, before any handshake.
    pub max_startup_connections: NonZeroU32,
}

/// Why a configuration file was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file we tried to read.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A TOML syntax error, or values that do not make a valid file, with its line.
    #[error(transparent)]
    Toml(#[from] TomlError),
}

impl Config {
    /// Reads and parses `path`; relative paths inside resolve against its directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_owned(),
            source,
        })?;
        let base_dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        Config::parse(&text, base_dir, &path.display().to_string())
    }

    /// Parses configuration text. `file_name` only labels errors. Does not touch the file system.
    pub fn parse(text: &str, base_dir: &Path, file_name: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text)
            .map_err(|e| TomlError::parse(text, file_name, e.span(), e.message()))?;
        let invalid = |(span, message): (Range<usize>, String)| {
            ConfigError::from(TomlError::invalid(text, file_name, span, message))
        };

        let tls_span = raw.tls.span();
        let RawTls { cert, key } = raw.tls.into_inner();
        let tls = match (cert, key) {
            (Some(cert), Some(key)) => TlsFiles {
                cert: base_dir.join(cert.into_inner()),
                key: base_dir.join(key.into_inner()),
            },
            (Some(cert), None) => {
                return Err(invalid((
                    cert.span(),
                    "[tls] cert is set but key is missing: set both cert and key".into(),
                )))
            }
            (None, Some(key)) => {
                return Err(invalid((
                    key.span(),
                    "[tls] key is set but cert is missing: set both cert and key".into(),
                )))
            }
            (None, None) => {
                return Err(invalid((
                    tls_span,
                    "[tls] needs both cert and key (PEM files)".into(),
                )))
            }
        };

        let pooled = match raw.listen.pooled {
            // SO_REUSEPORT would let both bind it, and share its connections out at random.
            Some(pooled)
                if *pooled.get_ref() == raw.listen.direct && pooled.get_ref().port() != 0 =>
            {
                return Err(invalid((
                    pooled.span(),
                    "[listen] pooled must not be the direct address".into(),
                )))
            }
            pooled => pooled.map(Spanned::into_inner),
        };
        let admin = match raw.listen.admin {
            // Metrics name every branch: off the machine only when asked for.
            Some(admin)
                if !admin.get_ref().ip().is_loopback() && raw.listen.admin_public != Some(true) =>
            {
                return Err(invalid((
                    admin.span(),
                    "[listen] admin is not a loopback address: set admin_public = true to serve \
                     /metrics beyond this machine"
                        .into(),
                )))
            }
            admin => admin.map(Spanned::into_inner),
        };
        let proxy_from = ProxyFrom::parse(raw.listen.proxy_from).map_err(&invalid)?;
        let pool = raw.pool.settings().map_err(&invalid)?;

        let t = raw.timeouts;
        let timeouts = Timeouts {
            startup: non_zero(t.startup, DEFAULT_STARTUP_TIMEOUT, "startup").map_err(&invalid)?,
            handshake: non_zero(t.handshake, DEFAULT_HANDSHAKE_TIMEOUT, "handshake")
                .map_err(&invalid)?,
            connect: non_zero(t.connect, DEFAULT_CONNECT_TIMEOUT, "connect").map_err(&invalid)?,
            drain: t.drain.map_or(DEFAULT_DRAIN_TIMEOUT, |d| d.into_inner().0),
            health_check_interval: non_zero(
                t.health_check_interval,
                DEFAULT_HEALTH_CHECK_INTERVAL,
                "health_check_interval",
            )
            .map_err(&invalid)?,
        };

        let workers = raw.workers.unwrap_or_else(|| {
            // Unknown core count (restricted /proc, unusual platform): one worker still works.
            std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN)
        });

        let max_removed_percent = match raw.reload.max_removed_percent {
            None => DEFAULT_MAX_REMOVED_PERCENT,
            Some(p) if (1..=100).contains(p.get_ref()) => p.into_inner(),
            Some(p) => {
                return Err(invalid((
                    p.span(),
                    "[reload] max_removed_percent must be 1 to 100".into(),
                )))
            }
        };
        let catalog_span = raw.catalog.span();
        let catalog_text = raw.catalog.into_inner();
        let catalog = if EtcdUrl::is_etcd(&catalog_text) {
            let url = catalog_text
                .parse::<EtcdUrl>()
                .map_err(|e| invalid((catalog_span, format!("catalog: {e}"))))?;
            CatalogSource::Etcd(url)
        } else {
            CatalogSource::File(base_dir.join(catalog_text))
        };
        // The fake-SCRAM secret defaults to the catalog file's directory, or to this file's
        // when the catalog is in etcd.
        let catalog_dir = match catalog.file().and_then(Path::parent) {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
            _ => base_dir.to_owned(),
        };

        let steering = match raw.steering {
            None => SteeringConfig::Ebpf { required: false },
            Some(raw::RawSteering::Ebpf) => SteeringConfig::Ebpf { required: true },
            Some(raw::RawSteering::Userspace) => SteeringConfig::Userspace,
            Some(raw::RawSteering::Off) => SteeringConfig::Off,
        };

        let rebalance = match raw.rebalance {
            None => None,
            Some(every) if every.get_ref().0 < MIN_REBALANCE_INTERVAL => {
                return Err(invalid((
                    every.span(),
                    format!(
                        "rebalance must be at least {} (leave it out for never)",
                        humantime::format_duration(MIN_REBALANCE_INTERVAL)
                    ),
                )))
            }
            Some(every) => Some(every.into_inner().0),
        };

        let node = NodeConfig {
            id: match raw.node.id {
                Some(id) => {
                    let span = id.span();
                    let id = id
                        .into_inner()
                        .parse::<NodeId>()
                        .map_err(|e| invalid((span, format!("[node] {e}"))))?;
                    NodeIdSource::Configured(id)
                }
                None => NodeIdSource::File(base_dir.join(NODE_ID_FILE)),
            },
            peer: raw.node.peer,
            secret_file: raw.node.secret_file.map(|path| base_dir.join(path)),
            lease_ttl: match raw.node.lease_ttl {
                None => DEFAULT_LEASE_TTL,
                Some(ttl) if ttl.get_ref().0 < MIN_LEASE_TTL => {
                    return Err(invalid((
                        ttl.span(),
                        format!(
                            "[node] lease_ttl must be at least {} (etcd grants no shorter lease)",
                            humantime::format_duration(MIN_LEASE_TTL)
                        ),
                    )))
                }
                Some(ttl) => ttl.into_inner().0,
            },
        };

        Ok(Config {
            node,
            workers,
            steering,
            pin_workers: raw.pin_workers.unwrap_or(true),
            rebalance,
            auth: Auth {
                mock_secret_file: catalog_dir.join(
                    raw.auth
                        .mock_secret_file
                        .unwrap_or_else(|| DEFAULT_MOCK_SECRET_FILE.into()),
                ),
            },
            reload: Reload {
                max_removed_percent,
                force: raw.reload.force.unwrap_or(false),
            },
            admin: Admin {
                socket: base_dir.join(
                    raw.admin
                        .socket
                        .unwrap_or_else(|| DEFAULT_CONTROL_SOCKET.into()),
                ),
            },
            catalog,
            tls,
            listen: Listen {
                direct: raw.listen.direct,
                pooled,
                admin,
                proxy_from,
            },
            pool,
            timeouts,
            limits: Limits {
                max_client_connections: raw
                    .limits
                    .max_client_connections
                    .unwrap_or(DEFAULT_MAX_CLIENT_CONNECTIONS),
                max_startup_connections: raw
                    .limits
                    .max_startup_connections
                    .unwrap_or(DEFAULT_MAX_STARTUP_CONNECTIONS),
            },
        })
    }
}

/// The shortest `rebalance` interval: a move needs sessions to turn over before the next one
/// can be judged.
pub const MIN_REBALANCE_INTERVAL: Duration = Duration::from_millis(100);

/// Takes an optional duration, rejecting zero (it would fail or spin every connection).
fn non_zero(
    value: Option<Spanned<HumanDuration>>,
    default: Duration,
    name: &str,
) -> Result<Duration, (Range<usize>, String)> {
    match value {
        None => Ok(default),
        Some(d) if d.get_ref().0.is_zero() => Err((
            d.span(),
            format!("[timeouts] {name} must be greater than zero"),
        )),
        Some(d) => Ok(d.into_inner().0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
catalog = "catalog.toml"
[tls]
cert = "server.crt"
key = "/etc/branchgate/server.key"
[listen]
direct = "127.0.0.1:5432"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/branchgate"), "router.toml")
    }

    fn error(text: &str) -> String {
        match parse(text) {
            Ok(config) => panic!("expected an error, got {config:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn minimal_file_gets_defaults_and_resolved_paths() {
        let config = parse(MINIMAL).expect("minimal config parses");
        assert_eq!(
            config.catalog,
            CatalogSource::File("/etc/branchgate/catalog.toml".into())
        );
        assert_eq!(config.tls.cert, Path::new("/etc/branchgate/server.crt"));
        assert_eq!(config.tls.key, Path::new("/etc/branchgate/server.key"));
        assert_eq!(
            config.listen.direct,
            "127.0.0.1:5432".parse().expect("addr")
        );
        let cores = std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN);
        assert_eq!(config.workers, cores);
        assert_eq!(
            config.timeouts,
            Timeouts {
                startup: DEFAULT_STARTUP_TIMEOUT,
                handshake: DEFAULT_HANDSHAKE_TIMEOUT,
                connect: DEFAULT_CONNECT_TIMEOUT,
                drain: DEFAULT_DRAIN_TIMEOUT,
                health_check_interval: DEFAULT_HEALTH_CHECK_INTERVAL,
            }
        );
        assert_eq!(config.limits.max_client_connections.get(), 10_000);
        assert_eq!(config.limits.max_startup_connections.get(), 1_000);
        assert_eq!(
            config.auth.mock_secret_file,
            Path::new("/etc/branchgate/branchgate-mock.secret")
        );
        assert_eq!(
            config.reload,
            Reload {
                max_removed_percent: 50,
                force: false
            }
        );
        assert_eq!(
            config.admin.socket,
            Path::new("/etc/branchgate/branchgate.sock")
        );
        assert_eq!(config.steering, SteeringConfig::Ebpf { required: false });
    }

    #[test]
    fn steering_modes() {
        for (written, expected) in [
            ("ebpf", SteeringConfig::Ebpf { required: true }),
            ("userspace", SteeringConfig::Userspace),
            ("off", SteeringConfig::Off),
        ] {
            let config = parse(&format!("steering = \"{written}\"\n{MINIMAL}")).expect(written);
            assert_eq!(config.steering, expected, "{written}");
        }
        let e = error(&format!("steering = \"kernel\"\n{MINIMAL}"));
        assert!(
            e.contains("router.toml:1:") && e.contains("userspace"),
            "{e}"
        );
    }

    #[test]
    fn every_field_set() {
        let text = r#"
workers = 3
catalog = "cat/catalog.toml"
[tls]
cert = "a.crt"
key = "a.key"
[listen]
direct = "[::1]:15432"
[timeouts]
startup = "1s 500ms"
handshake = "300ms"
connect = "250ms"
drain = "0s"
health_check_interval = "1m"
[limits]
max_client_connections = 7
max_startup_connections = 3
[auth]
mock_secret_file = "/var/lib/branchgate/mock.secret"
[reload]
max_removed_percent = 100
force = true
[admin]
socket = "/run/branchgate/control.sock"
"#;
        let config = parse(text).expect("full config parses");
        assert_eq!(config.workers.get(), 3);
        assert_eq!(
            config.catalog.file(),
            Some(Path::new("/etc/branchgate/cat/catalog.toml"))
        );
        assert_eq!(config.listen.direct, "[::1]:15432".parse().expect("addr"));
        assert_eq!(config.timeouts.startup, Duration::from_millis(1500));
        assert_eq!(config.timeouts.connect, Duration::from_millis(250));
        assert_eq!(config.timeouts.drain, Duration::ZERO);
        assert_eq!(
            config.timeouts.health_check_interval,
            Duration::from_secs(60)
        );
        assert_eq!(config.limits.max_client_connections.get(), 7);
        assert_eq!(config.timeouts.handshake, Duration::from_millis(300));
        assert_eq!(config.limits.max_startup_connections.get(), 3);
        assert_eq!(
            config.auth.mock_secret_file,
            Path::new("/var/lib/branchgate/mock.secret")
        );
        assert_eq!(
            config.reload,
            Reload {
                max_removed_percent: 100,
                force: true
            }
        );
        assert_eq!(
            config.admin.socket,
            Path::new("/run/branchgate/control.sock")
        );
        // The mock secret defaults to the catalog's directory, wherever that is.
        let moved = text.replace(
            "mock_secret_file = \"/var/lib/branchgate/mock.secret\"\n",
            "",
        );
        let config = parse(&moved).expect("parses");
        assert_eq!(
            config.auth.mock_secret_file,
            Path::new("/etc/branchgate/cat/branchgate-mock.secret")
        );
        let e = error(&text.replace("max_removed_percent = 100", "max_removed_percent = 0"));
        assert!(e.contains("max_removed_percent must be 1 to 100"), "{e}");
    }

    #[test]
    fn unknown_key_has_line_and_column() {
        let text = MINIMAL.replace("[listen]\n", "[listen]\nbogus = 1\n");
        let e = error(&text);
        assert!(
            e.starts_with("router.toml:7:1: unknown field `bogus`"),
            "{e}"
        );
        let e = error(&format!("{MINIMAL}[timeouts]\nstart = \"1s\"\n"));
        assert!(
            e.starts_with("router.toml:9:1: unknown field `start`"),
            "{e}"
        );
    }

    #[test]
    fn bad_duration_has_line_and_column() {
        let e = error(&format!("{MINIMAL}[timeouts]\nconnect = \"5 parsecs\"\n"));
        assert_eq!(
            e,
            r#"router.toml:9:11: invalid value: string "5 parsecs", expected a duration"#
        );
        let e = error(&format!("{MINIMAL}[timeouts]\nstartup = \"0s\"\n"));
        assert_eq!(
            e,
            "router.toml:9: [timeouts] startup must be greater than zero"
        );
    }

    #[test]
    fn cert_without_key_names_both() {
        let text = MINIMAL.replace("key = \"/etc/branchgate/server.key\"\n", "");
        match parse(&text) {
            Err(ConfigError::Toml(TomlError::Invalid {
                file,
                line,
                message,
            })) => {
                assert_eq!((file.as_str(), line), ("router.toml", 4));
                assert!(
                    message.contains("cert") && message.contains("key"),
                    "{message}"
                );
            }
            other => panic!("expected Invalid, got {other:?}"),
        }
        let text = MINIMAL.replace("cert = \"server.crt\"\n", "");
        let e = error(&text);
        assert!(
            e.starts_with("router.toml:4: [tls] key is set but cert"),
            "{e}"
        );
        let e = error("catalog = 'c'\n[tls]\n[listen]\ndirect = '127.0.0.1:1'\n");
        assert!(e.starts_with("router.toml:2: [tls] needs both"), "{e}");
    }

    #[test]
    fn the_catalog_may_live_in_etcd() {
        let text = MINIMAL.replace(
            "catalog = \"catalog.toml\"",
            "catalog = \"etcd://127.0.0.1:2379,[::1]:2379/fleet/branchgate/\"",
        );
        let config = parse(&text).expect("etcd catalog");
        let CatalogSource::Etcd(url) = &config.catalog else {
            panic!("expected an etcd catalog, got {:?}", config.catalog);
        };
        assert_eq!(url.prefix(), "/fleet/branchgate");
        assert_eq!(url.endpoints().len(), 2);
        assert_eq!(config.catalog.file(), None);
        assert_eq!(
            config.catalog.describe(),
            "etcd://127.0.0.1:2379,[::1]:2379/fleet/branchgate"
        );
        // No catalog directory: the fake-SCRAM secret sits beside router.toml.
        assert_eq!(
            config.auth.mock_secret_file,
            Path::new("/etc/branchgate/branchgate-mock.secret")
        );

        let e = error(&MINIMAL.replace("\"catalog.toml\"", "\"etcd://127.0.0.1:2379\""));
        assert!(
            e.starts_with("router.toml:2: catalog: etcd URL names no key prefix"),
            "{e}"
        );
        let e = error(&MINIMAL.replace("\"catalog.toml\"", "\"etcd://h:port/p\""));
        assert_eq!(
            e,
            "router.toml:2: catalog: etcd endpoint \"h:port\" has an invalid port"
        );
    }

    #[test]
    fn the_node_id_is_configured_or_kept_in_a_file() {
        let config = parse(MINIMAL).expect("default");
        assert_eq!(
            config.node,
            NodeConfig {
                id: NodeIdSource::File("/etc/branchgate/node-id".into()),
                peer: None,
                secret_file: None,
                lease_ttl: Duration::from_secs(10),
            }
        );
        let text = format!(
            "{MINIMAL}[node]\nid = \"edge-1\"\npeer = \"10.0.0.1:7432\"\nlease_ttl = \"3s\"\n"
        );
        let node = parse(&text).expect("[node]").node;
        assert_eq!(
            node.id,
            NodeIdSource::Configured("edge-1".parse().expect("id"))
        );
        assert_eq!(node.peer, Some("10.0.0.1:7432".parse().expect("addr")));
        assert_eq!(node.lease_ttl, Duration::from_secs(3));
        let e = error(&format!("{MINIMAL}[node]\nid = \"a/b\"\n"));
        assert!(
            e.starts_with("router.toml:9: [node] node id \"a/b\" is not valid"),
            "{e}"
        );
        let e = error(&format!("{MINIMAL}[node]\nlease_ttl = \"1s\"\n"));
        assert!(e.contains("[node] lease_ttl must be at least 2s"), "{e}");
    }

    #[test]
    fn workers_are_pinned_unless_told_not_to_be() {
        assert!(parse(MINIMAL).expect("default").pin_workers);
        assert_eq!(parse(MINIMAL).expect("default").rebalance, None);
        let every = parse(&format!("rebalance = \"30s\"\n{MINIMAL}")).expect("rebalance");
        assert_eq!(every.rebalance, Some(Duration::from_secs(30)));
        let error = parse(&format!("rebalance = \"10ms\"\n{MINIMAL}")).expect_err("too often");
        assert!(
            error
                .to_string()
                .contains("rebalance must be at least 100ms"),
            "{error}"
        );
        let config = parse(&format!("pin_workers = false\n{MINIMAL}")).expect("unpinned");
        assert!(!config.pin_workers);
    }

    #[test]
    fn the_admin_endpoint_is_optional_and_loopback_unless_made_public() {
        assert_eq!(parse(MINIMAL).expect("no admin").listen.admin, None);
        let text = MINIMAL.replace("[listen]\n", "[listen]\nadmin = \"127.0.0.1:9930\"\n");
        assert_eq!(
            parse(&text).expect("loopback admin").listen.admin,
            Some("127.0.0.1:9930".parse().expect("addr"))
        );
        let text = MINIMAL.replace("[listen]\n", "[listen]\nadmin = \"0.0.0.0:9930\"\n");
        assert!(
            error(&text).contains("[listen] admin is not a loopback address"),
            "{}",
            error(&text)
        );
        let text = MINIMAL.replace(
            "[listen]\n",
            "[listen]\nadmin = \"0.0.0.0:9930\"\nadmin_public = true\n",
        );
        assert!(parse(&text).is_ok());
    }

    #[test]
    fn the_pooled_port_is_optional() {
        assert_eq!(parse(MINIMAL).expect("no pooled port").listen.pooled, None);
        let text = MINIMAL.replace("[listen]\n", "[listen]\npooled = \"0.0.0.0:6432\"\n");
        let config = parse(&text).expect("pooled port");
        assert_eq!(
            config.listen.pooled,
            Some("0.0.0.0:6432".parse().expect("addr"))
        );
        // Two ports both left to the kernel get two ports.
        let text = MINIMAL.replace("127.0.0.1:5432", "127.0.0.1:0");
        let text = text.replace("[listen]\n", "[listen]\npooled = \"127.0.0.1:0\"\n");
        assert!(parse(&text).is_ok());
        let text = MINIMAL.replace("[listen]\n", "[listen]\npooled = \"127.0.0.1:5432\"\n");
        assert_eq!(
            error(&text),
            "router.toml:7: [listen] pooled must not be the direct address"
        );
        let text = MINIMAL.replace("[listen]\n", "[listen]\npooled = \"localhost:6432\"\n");
        assert!(
            error(&text).starts_with("router.toml:7:10: invalid socket address"),
            "{}",
            error(&text)
        );
    }

    #[test]
    fn proxy_from_lists_balancers_and_names_bad_entries_by_line() {
        assert!(parse(MINIMAL)
            .expect("default")
            .listen
            .proxy_from
            .is_empty());
        let text = MINIMAL.replace(
            "[listen]\n",
            "[listen]\nproxy_from = [\"10.0.0.5\", \"10.0.1.0/24\", \"::1\"]\n",
        );
        let from = parse(&text).expect("proxy_from").listen.proxy_from;
        assert!(from.contains("10.0.1.9".parse().expect("addr")));
        assert!(from.contains("::1".parse().expect("addr")));
        assert!(!from.contains("10.0.0.6".parse().expect("addr")));
        let text = MINIMAL.replace(
            "[listen]\n",
            "[listen]\nproxy_from = [\n  \"10.0.0.5\",\n  \"10.0.1.5/24\",\n]\n",
        );
        assert_eq!(
            error(&text),
            "router.toml:9: [listen] proxy_from: \"10.0.1.5/24\" has bits set past its prefix \
             length: write 10.0.1.0/24 for the network, or the address alone"
        );
        let text = MINIMAL.replace("[listen]\n", "[listen]\nproxy_from = \"10.0.0.5\"\n");
        assert!(
            error(&text).starts_with("router.toml:7:14: invalid type"),
            "{}",
            error(&text)
        );
    }

    #[test]
    fn pool_settings_have_defaults_and_lines() {
        assert_eq!(
            parse(MINIMAL).expect("minimal").pool,
            PoolSettings::default()
        );
        let text = format!(
            "{MINIMAL}[pool]\npool_size = 4\nmin_pool_size = 1\nserver_lifetime = \"0s\"\n\
             client_idle_timeout = \"10s\"\n"
        );
        let pool = parse(&text).expect("[pool]").pool;
        assert_eq!(
            pool,
            PoolSettings {
                pool_size: NonZeroU32::new(4).expect("non-zero"),
                min_pool_size: 1,
                server_lifetime: None,
                client_idle_timeout: Some(Duration::from_secs(10)),
                ..PoolSettings::default()
            }
        );
        let e = error(&format!(
            "{MINIMAL}[pool]\npool_size = 4\nmin_pool_size = 5\n"
        ));
        assert_eq!(
            e,
            "router.toml:10: [pool] min_pool_size (5) must not be more than pool_size (4)"
        );
        let e = error(&format!("{MINIMAL}[pool]\nquery_wait_timeout = \"0s\"\n"));
        assert!(
            e.starts_with("router.toml:9: [pool] query_wait_timeout must be greater than zero"),
            "{e}"
        );
        let e = error(&format!("{MINIMAL}[pool]\npool_mode = \"session\"\n"));
        assert!(
            e.starts_with("router.toml:9:1: unknown field `pool_mode`"),
            "{e}"
        );
        let e = error(&format!(
            "{MINIMAL}[pool]\nserver_lifetime = \"1 fortnight\"\n"
        ));
        assert!(e.starts_with("router.toml:9:19: invalid value"), "{e}");
        let e = error(&format!("{MINIMAL}[pool]\npool_size = 0\n"));
        assert!(e.starts_with("router.toml:9:13:"), "{e}");
    }

    #[test]
    fn wrong_types_and_missing_sections() {
        let e = error(&format!("workers = 0\n{MINIMAL}"));
        assert!(e.starts_with("router.toml:1:11:"), "{e}");
        let e = error(&MINIMAL.replace("127.0.0.1:5432", "localhost"));
        assert!(
            e.starts_with("router.toml:7:10: invalid socket address"),
            "{e}"
        );
        let e = error(&format!("{MINIMAL}[limits]\nmax_client_connections = 0\n"));
        assert!(e.starts_with("router.toml:9:26:"), "{e}");
        let e = error("catalog = 'c'\n[listen]\ndirect = '127.0.0.1:1'\n");
        assert_eq!(e, "router.toml:1:1: missing field `tls`");
        let e = error("catalog = 'c'\n[tls\n");
        assert!(e.starts_with("router.toml:2:"), "{e}");
    }

    #[test]
    fn load_resolves_against_the_file_directory() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("router.toml");
        std::fs::write(&path, MINIMAL).expect("write config");
        let config = Config::load(&path).expect("load");
        assert_eq!(
            config.catalog.file(),
            Some(dir.path().join("catalog.toml").as_path())
        );
        match Config::load(&dir.path().join("missing.toml")) {
            Err(ConfigError::Io { path, .. }) => assert!(path.ends_with("missing.toml")),
            other => panic!("expected Io, got {other:?}"),
        }
    }
}
