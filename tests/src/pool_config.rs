//! The pooled port in router.toml: its listener, the `[pool]` settings (PgBouncer's names) and
//! the worker count, applied to the test router's configuration through
//! [`TestRouter::start_with_config`].

use std::fmt::Write as _;
use std::time::Duration;

use crate::catalog::BranchSpec;
use crate::certs::Certs;
use crate::router::TestRouter;

/// The listen line the test router.toml has for the direct port.
const DIRECT_LINE: &str = "direct = \"127.0.0.1:0\"\n";
/// The pooled listener on a free port.
const POOLED_LINE: &str = "pooled = \"127.0.0.1:0\"\n";
/// The worker count the test router.toml sets.
const WORKERS_LINE: &str = "workers = 2\n";

/// `[pool]` settings for a test router; `None` leaves the router's default.
///
/// Tests that count backends run one worker, so that `pool_size` is the branch's whole budget
/// whatever the steering (with `steering = "off"` pools are per worker; otherwise a branch's
/// clients are handed to its owner and share one pool: tests/tests/handoff.rs).
#[derive(Clone, Debug)]
pub struct PoolSettings {
    /// Worker threads of the router.
    pub workers: usize,
    /// Backend connections per (branch, role, database) pool.
    pub pool_size: u32,
    /// Backends kept open even when idle.
    pub min_pool_size: u32,
    /// Authenticated clients per branch.
    pub max_client_connections: Option<u32>,
    /// Prepared statements kept per backend.
    pub max_prepared_statements: Option<u32>,
    /// How long a client may wait for a backend.
    pub query_wait_timeout: Option<Duration>,
    /// How long a client waits before it is told it is queued (zero: never).
    pub query_wait_notify: Option<Duration>,
    /// How long a client may stay idle outside a transaction.
    pub client_idle_timeout: Option<Duration>,
    /// How long a client may stay idle inside a transaction.
    pub idle_transaction_timeout: Option<Duration>,
    /// How long a backend may stay idle in the pool.
    pub server_idle_timeout: Option<Duration>,
    /// How long a backend may live.
    pub server_lifetime: Option<Duration>,
}

impl PoolSettings {
    /// One worker, `pool_size` backends, no pre-warmed backends, the router's other defaults.
    pub fn new(pool_size: u32) -> PoolSettings {
        PoolSettings {
            workers: 1,
            pool_size,
            min_pool_size: 0,
            max_client_connections: None,
            max_prepared_statements: None,
            query_wait_timeout: None,
            query_wait_notify: None,
            client_idle_timeout: None,
            idle_transaction_timeout: None,
            server_idle_timeout: None,
            server_lifetime: None,
        }
    }

    /// The `[pool]` table as TOML.
    pub fn pool_table(&self) -> String {
        let mut out = format!(
            "[pool]\npool_size = {}\nmin_pool_size = {}\n",
            self.pool_size, self.min_pool_size
        );
        let counts = [
            ("max_client_connections", self.max_client_connections),
            ("max_prepared_statements", self.max_prepared_statements),
        ];
        for (name, value) in counts {
            if let Some(value) = value {
                // Writing to a String cannot fail.
                let _ = writeln!(out, "{name} = {value}");
            }
        }
        let durations = [
            ("query_wait_timeout", self.query_wait_timeout),
            ("query_wait_notify", self.query_wait_notify),
            ("client_idle_timeout", self.client_idle_timeout),
            ("idle_transaction_timeout", self.idle_transaction_timeout),
            ("server_idle_timeout", self.server_idle_timeout),
            ("server_lifetime", self.server_lifetime),
        ];
        for (name, value) in durations {
            if let Some(value) = value {
                let _ = writeln!(out, "{name} = \"{}ms\"", value.as_millis());
            }
        }
        out
    }

    /// Rewrites the test router.toml: these workers, a pooled listener on `127.0.0.1:0` (unless
    /// the file already has one), and the `[pool]` table at the end.
    pub fn apply(&self, text: String) -> String {
        assert!(
            text.contains(WORKERS_LINE),
            "router_toml changed its workers line"
        );
        let mut text = text.replacen(WORKERS_LINE, &format!("workers = {}\n", self.workers), 1);
        if !text.contains("pooled =") {
            assert!(
                text.contains(DIRECT_LINE),
                "router_toml changed its listen line"
            );
            text = text.replacen(DIRECT_LINE, &format!("{DIRECT_LINE}{POOLED_LINE}"), 1);
        }
        if !text.ends_with('\n') {
            text.push('\n');
        }
        text + &self.pool_table()
    }

    /// Starts a test router with these settings.
    pub fn start(&self, certs: &Certs, branches: &[BranchSpec]) -> TestRouter {
        TestRouter::start_with_config(certs, branches, |text| self.apply(text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::router_toml;

    #[test]
    fn pool_settings_become_a_pool_table_and_a_pooled_listener() {
        let certs = Certs::generate();
        let mut settings = PoolSettings::new(2);
        settings.query_wait_timeout = Some(Duration::from_millis(1500));
        settings.max_client_connections = Some(3);
        let text = settings.apply(router_toml(&certs, "catalog.toml"));
        assert!(
            text.starts_with("catalog = \"catalog.toml\"\nworkers = 1\n"),
            "{text}"
        );
        assert!(
            text.contains("direct = \"127.0.0.1:0\"\npooled = \"127.0.0.1:0\"\n"),
            "{text}"
        );
        assert!(
            text.ends_with(
                "[pool]\npool_size = 2\nmin_pool_size = 0\nmax_client_connections = 3\n\
                 query_wait_timeout = \"1500ms\"\n"
            ),
            "{text}"
        );
        // A router.toml that already has a pooled listener (the harness's does) keeps its own.
        assert_eq!(text.matches("pooled =").count(), 1, "{text}");
        let without = router_toml(&certs, "catalog.toml").replace(POOLED_LINE, "");
        let again = settings.apply(without);
        assert_eq!(again.matches("pooled =").count(), 1, "{again}");
    }
}
