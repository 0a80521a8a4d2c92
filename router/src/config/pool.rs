//! The pooled port's pool settings: `[pool]` in `router.toml`, and per branch `[branch.pool]`
//! in the catalog, which overrides any of them. Names and defaults are PgBouncer's.

use std::num::NonZeroU32;
use std::ops::Range;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::raw::HumanDuration;

/// Default backend connections per branch pool (PgBouncer's `default_pool_size`).
pub const DEFAULT_POOL_SIZE: NonZeroU32 = match NonZeroU32::new(20) {
    Some(n) => n,
    None => unreachable!(),
};
/// Default prepared statements tracked per backend connection.
pub const DEFAULT_MAX_PREPARED_STATEMENTS: u32 = 200;
/// Default bound on a client's wait for a backend connection.
pub const DEFAULT_QUERY_WAIT_TIMEOUT: Duration = Duration::from_secs(120);
/// Default wait for a backend after which a queued client is told so (PgBouncer's
/// `query_wait_notify`).
pub const DEFAULT_QUERY_WAIT_NOTIFY: Duration = Duration::from_secs(5);
/// Default time an unused backend connection stays open.
pub const DEFAULT_SERVER_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// Default age at which a backend connection is closed once it is back in the pool.
pub const DEFAULT_SERVER_LIFETIME: Duration = Duration::from_secs(3600);

/// How the pooled port pools one branch's backend connections. Every setting is in force: the
/// `[pool]` table with defaults filled in, or a branch's overrides applied to it
/// ([`PoolSettings::for_branch`]). A duration that is `None` is off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSettings {
    /// Backend connections per branch, at most.
    pub pool_size: NonZeroU32,
    /// Backend connections per branch kept open even when unused; at most `pool_size`.
    pub min_pool_size: u32,
    /// Clients per branch on the pooled port; `None`: only `limits.max_client_connections`
    /// (router-wide, both ports) applies.
    pub max_client_connections: Option<NonZeroU32>,
    /// Named prepared statements tracked per backend connection (protocol-level Parse, so they
    /// follow the client from backend to backend); 0 turns the tracking off.
    pub max_prepared_statements: u32,
    /// How long a client may wait for a backend connection before it gets an error. Never
    /// zero: every wait has a bound.
    pub query_wait_timeout: Duration,
    /// A client waiting this long for a backend connection gets a NOTICE saying it is queued
    /// (once per wait).
    pub query_wait_notify: Option<Duration>,
    /// A client idle (outside a transaction) for this long is closed.
    pub client_idle_timeout: Option<Duration>,
    /// A client idle inside a transaction for this long is closed (its backend rolls back).
    pub idle_transaction_timeout: Option<Duration>,
    /// An unused backend connection open for this long is closed (down to `min_pool_size`).
    pub server_idle_timeout: Option<Duration>,
    /// A backend connection this old is closed when it is next released to the pool.
    pub server_lifetime: Option<Duration>,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            pool_size: DEFAULT_POOL_SIZE,
            min_pool_size: 0,
            max_client_connections: None,
            max_prepared_statements: DEFAULT_MAX_PREPARED_STATEMENTS,
            query_wait_timeout: DEFAULT_QUERY_WAIT_TIMEOUT,
            query_wait_notify: Some(DEFAULT_QUERY_WAIT_NOTIFY),
            client_idle_timeout: None,
            idle_transaction_timeout: None,
            server_idle_timeout: Some(DEFAULT_SERVER_IDLE_TIMEOUT),
            server_lifetime: Some(DEFAULT_SERVER_LIFETIME),
        }
    }
}

/// One branch's `[branch.pool]`: the settings it sets, `None` for those it leaves to `[pool]`.
/// A setting that can be off is `Some(None)` when the branch turns it off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolOverrides {
    /// [`PoolSettings::pool_size`].
    pub pool_size: Option<NonZeroU32>,
    /// [`PoolSettings::min_pool_size`] (clamped to the branch's `pool_size`).
    pub min_pool_size: Option<u32>,
    /// [`PoolSettings::max_client_connections`].
    pub max_client_connections: Option<Option<NonZeroU32>>,
    /// [`PoolSettings::max_prepared_statements`].
    pub max_prepared_statements: Option<u32>,
    /// [`PoolSettings::query_wait_timeout`].
    pub query_wait_timeout: Option<Duration>,
    /// [`PoolSettings::query_wait_notify`].
    pub query_wait_notify: Option<Option<Duration>>,
    /// [`PoolSettings::client_idle_timeout`].
    pub client_idle_timeout: Option<Option<Duration>>,
    /// [`PoolSettings::idle_transaction_timeout`].
    pub idle_transaction_timeout: Option<Option<Duration>>,
    /// [`PoolSettings::server_idle_timeout`].
    pub server_idle_timeout: Option<Option<Duration>>,
    /// [`PoolSettings::server_lifetime`].
    pub server_lifetime: Option<Option<Duration>>,
}

impl PoolSettings {
    /// The settings of a branch: `overrides` applied to these. A `min_pool_size` above the
    /// branch's `pool_size` (say `[pool] min_pool_size = 10` and a branch with `pool_size = 5`)
    /// is clamped to it.
    pub fn for_branch(&self, overrides: &PoolOverrides) -> PoolSettings {
        let pool_size = overrides.pool_size.unwrap_or(self.pool_size);
        PoolSettings {
            pool_size,
            min_pool_size: overrides
                .min_pool_size
                .unwrap_or(self.min_pool_size)
                .min(pool_size.get()),
            max_client_connections: overrides
                .max_client_connections
                .unwrap_or(self.max_client_connections),
            max_prepared_statements: overrides
                .max_prepared_statements
                .unwrap_or(self.max_prepared_statements),
            query_wait_timeout: overrides
                .query_wait_timeout
                .unwrap_or(self.query_wait_timeout),
            query_wait_notify: overrides
                .query_wait_notify
                .unwrap_or(self.query_wait_notify),
            client_idle_timeout: overrides
                .client_idle_timeout
                .unwrap_or(self.client_idle_timeout),
            idle_transaction_timeout: overrides
                .idle_transaction_timeout
                .unwrap_or(self.idle_transaction_timeout),
            server_idle_timeout: overrides
                .server_idle_timeout
                .unwrap_or(self.server_idle_timeout),
            server_lifetime: overrides.server_lifetime.unwrap_or(self.server_lifetime),
        }
    }
}

/// A `[pool]` or `[branch.pool]` table as written: every key optional.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPool {
    pool_size: Option<Spanned<NonZeroU32>>,
    min_pool_size: Option<Spanned<u32>>,
    max_client_connections: Option<u32>,
    max_prepared_statements: Option<u32>,
    query_wait_timeout: Option<Spanned<HumanDuration>>,
    query_wait_notify: Option<HumanDuration>,
    client_idle_timeout: Option<HumanDuration>,
    idle_transaction_timeout: Option<HumanDuration>,
    server_idle_timeout: Option<HumanDuration>,
    server_lifetime: Option<HumanDuration>,
}

/// A value that breaks a rule: where it is, and what is wrong (for [`super::TomlError`]).
pub(crate) type Invalid = (Range<usize>, String);

impl RawPool {
    /// The `[pool]` table: its settings over the defaults. `min_pool_size` must not be more
    /// than the `pool_size` in force.
    pub(crate) fn settings(self) -> Result<PoolSettings, Invalid> {
        let defaults = PoolSettings::default();
        let overrides = self.overrides("[pool]", Some(defaults.pool_size))?;
        Ok(defaults.for_branch(&overrides))
    }

    /// A `[branch.pool]` table; `table` names it in errors. `min_pool_size` is checked
    /// against `pool_size` when the table sets both (otherwise it is clamped when applied).
    pub(crate) fn branch_overrides(self, table: &str) -> Result<PoolOverrides, Invalid> {
        self.overrides(table, None)
    }

    /// The settings this table sets. With `default_pool_size`, `min_pool_size` is checked
    /// against it when the table does not set `pool_size`.
    fn overrides(
        self,
        table: &str,
        default_pool_size: Option<NonZeroU32>,
    ) -> Result<PoolOverrides, Invalid> {
        let pool_size = self.pool_size.map(Spanned::into_inner);
        if let Some(min) = &self.min_pool_size {
            if let Some(size) = pool_size.or(default_pool_size) {
                if *min.get_ref() > size.get() {
                    return Err((
                        min.span(),
                        format!(
                            "{table} min_pool_size ({}) must not be more than pool_size ({size})",
                            min.get_ref()
                        ),
                    ));
                }
            }
        }
        let query_wait_timeout = match self.query_wait_timeout {
            Some(d) if d.get_ref().0.is_zero() => {
                return Err((
                    d.span(),
                    format!(
                        "{table} query_wait_timeout must be greater than zero: every wait for a \
                         backend connection has a bound"
                    ),
                ))
            }
            d => d.map(|d| d.into_inner().0),
        };
        // Zero turns a timeout or a limit off, as in PgBouncer.
        let off_if_zero = |d: Option<HumanDuration>| d.map(|d| Some(d.0).filter(|d| !d.is_zero()));
        Ok(PoolOverrides {
            pool_size,
            min_pool_size: self.min_pool_size.map(Spanned::into_inner),
            max_client_connections: self.max_client_connections.map(NonZeroU32::new),
            max_prepared_statements: self.max_prepared_statements,
            query_wait_timeout,
            query_wait_notify: off_if_zero(self.query_wait_notify),
            client_idle_timeout: off_if_zero(self.client_idle_timeout),
            idle_transaction_timeout: off_if_zero(self.idle_transaction_timeout),
            server_idle_timeout: off_if_zero(self.server_idle_timeout),
            server_lifetime: off_if_zero(self.server_lifetime),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).expect("non-zero")
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// `text` as a `[pool]` table.
    fn settings(text: &str) -> Result<PoolSettings, String> {
        let raw: RawPool = toml::from_str(text).map_err(|e| e.message().to_owned())?;
        raw.settings().map_err(|(_, message)| message)
    }

    /// `text` as a `[branch.pool]` table.
    fn overrides(text: &str) -> Result<PoolOverrides, String> {
        let raw: RawPool = toml::from_str(text).map_err(|e| e.message().to_owned())?;
        raw.branch_overrides("[branch.pool]")
            .map_err(|(_, message)| message)
    }

    #[test]
    fn an_empty_table_is_pgbouncers_defaults() {
        let defaults = settings("").expect("empty [pool]");
        assert_eq!(defaults, PoolSettings::default());
        assert_eq!(
            defaults,
            PoolSettings {
                pool_size: n(20),
                min_pool_size: 0,
                max_client_connections: None,
                max_prepared_statements: 200,
                query_wait_timeout: secs(120),
                query_wait_notify: Some(secs(5)),
                client_idle_timeout: None,
                idle_transaction_timeout: None,
                server_idle_timeout: Some(secs(600)),
                server_lifetime: Some(secs(3600)),
            }
        );
        assert_eq!(overrides("").expect("empty"), PoolOverrides::default());
        assert_eq!(defaults.for_branch(&PoolOverrides::default()), defaults);
    }

    #[test]
    fn every_setting_and_zero_means_off() {
        let text = "pool_size = 5\nmin_pool_size = 2\nmax_client_connections = 100\n\
                    max_prepared_statements = 0\nquery_wait_timeout = \"3s\"\n\
                    query_wait_notify = \"2s\"\nclient_idle_timeout = \"5m\"\nidle_transaction_timeout = \"30s\"\n\
                    server_idle_timeout = \"0s\"\nserver_lifetime = \"0s\"\n";
        assert_eq!(
            settings(text).expect("full [pool]"),
            PoolSettings {
                pool_size: n(5),
                min_pool_size: 2,
                max_client_connections: Some(n(100)),
                max_prepared_statements: 0,
                query_wait_timeout: secs(3),
                query_wait_notify: Some(secs(2)),
                client_idle_timeout: Some(secs(300)),
                idle_transaction_timeout: Some(secs(30)),
                server_idle_timeout: None,
                server_lifetime: None,
            }
        );
        let off = settings(
            "client_idle_timeout = \"0s\"\nidle_transaction_timeout = \"0ms\"\n\
             max_client_connections = 0\nquery_wait_notify = \"0s\"\n",
        )
        .expect("zeros");
        assert_eq!(off.query_wait_notify, None);
        assert_eq!(off.client_idle_timeout, None);
        assert_eq!(off.idle_transaction_timeout, None);
        assert_eq!(off.max_client_connections, None);
    }

    #[test]
    fn bad_values_are_refused() {
        let e = settings("min_pool_size = 21\n").expect_err("min above the default size");
        assert_eq!(
            e,
            "[pool] min_pool_size (21) must not be more than pool_size (20)"
        );
        let e = settings("pool_size = 4\nmin_pool_size = 5\n").expect_err("min above size");
        assert_eq!(
            e,
            "[pool] min_pool_size (5) must not be more than pool_size (4)"
        );
        assert!(settings("pool_size = 4\nmin_pool_size = 4\n").is_ok());
        let e = settings("query_wait_timeout = \"0s\"\n").expect_err("unbounded wait");
        assert!(
            e.starts_with("[pool] query_wait_timeout must be greater than zero"),
            "{e}"
        );
        assert!(settings("pool_size = 0\n").is_err());
        assert!(settings("min_pool_size = -1\n").is_err());
        let e = settings("default_pool_size = 5\n").expect_err("unknown key");
        assert!(e.starts_with("unknown field `default_pool_size`"), "{e}");
        let e = overrides("pool_size = 2\nmin_pool_size = 3\n").expect_err("min above size");
        assert_eq!(
            e,
            "[branch.pool] min_pool_size (3) must not be more than pool_size (2)"
        );
        // Checked against the branch's own size only: the `[pool]` one may change.
        assert!(overrides("min_pool_size = 300\n").is_ok());
    }

    #[test]
    fn overrides_replace_what_they_set() {
        let global = settings(
            "pool_size = 10\nmin_pool_size = 4\nclient_idle_timeout = \"1m\"\n\
             max_client_connections = 50\n",
        )
        .expect("[pool]");
        let branch = overrides(
            "pool_size = 3\nclient_idle_timeout = \"0s\"\nserver_lifetime = \"10m\"\n\
             max_client_connections = 0\nquery_wait_timeout = \"1s\"\nquery_wait_notify = \"0s\"\n",
        )
        .expect("[branch.pool]");
        assert_eq!(
            branch,
            PoolOverrides {
                pool_size: Some(n(3)),
                client_idle_timeout: Some(None),
                server_lifetime: Some(Some(secs(600))),
                max_client_connections: Some(None),
                query_wait_timeout: Some(secs(1)),
                query_wait_notify: Some(None),
                ..PoolOverrides::default()
            }
        );
        assert_eq!(
            global.for_branch(&branch),
            PoolSettings {
                pool_size: n(3),
                // Clamped: the branch's pool is smaller than `[pool] min_pool_size`.
                min_pool_size: 3,
                max_client_connections: None,
                max_prepared_statements: 200,
                query_wait_timeout: secs(1),
                query_wait_notify: None,
                client_idle_timeout: None,
                idle_transaction_timeout: None,
                server_idle_timeout: Some(secs(600)),
                server_lifetime: Some(secs(600)),
            }
        );
        let more = overrides("min_pool_size = 1\nmax_prepared_statements = 7\n").expect("more");
        let applied = global.for_branch(&more);
        assert_eq!((applied.pool_size, applied.min_pool_size), (n(10), 1));
        assert_eq!(applied.max_prepared_statements, 7);
        assert_eq!(applied.client_idle_timeout, Some(secs(60)));
        assert_eq!(applied.max_client_connections, Some(n(50)));
    }
}
