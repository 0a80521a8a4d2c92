//! Administration of a test server through `psql` over its unix socket, as the superuser.

use std::thread;
use std::time::{Duration, Instant};

use super::{PgServer, POLL_INTERVAL, READY_TIMEOUT};
use crate::tools::{psql_command, psql_output};

/// The start of every SCRAM verifier PostgreSQL 15 stores with its default 4096 iterations.
pub const SCRAM_VERIFIER_PREFIX: &str = "SCRAM-SHA-256$4096:";

impl PgServer {
    /// Runs `sql` in database `postgres` and returns the unaligned, tuples-only output without
    /// the trailing newline. Panics with psql's stderr on failure.
    pub fn psql_admin(&self, sql: &str) -> String {
        self.try_psql_admin_in("postgres", sql)
            .unwrap_or_else(|e| panic!("psql on port {} failed for `{sql}`:\n{e}", self.port))
    }

    /// Like [`psql_admin`](Self::psql_admin) but in `database`.
    pub fn psql_admin_in(&self, database: &str, sql: &str) -> String {
        self.try_psql_admin_in(database, sql)
            .unwrap_or_else(|e| panic!("psql on port {} failed for `{sql}`:\n{e}", self.port))
    }

    /// Runs `sql` in `database`; `Err` holds psql's stderr (for tests that expect an error).
    pub fn try_psql_admin_in(&self, database: &str, sql: &str) -> Result<String, String> {
        psql_output(
            self.as_admin(&mut psql_command())
                .args(["-d", database])
                .arg("-c")
                .arg(sql),
        )
    }

    /// Polls `sql` until it returns `expected`; panics with the last value after the deadline.
    pub fn wait_for_value(&self, sql: &str, expected: &str) {
        self.wait_for_value_within(sql, expected, READY_TIMEOUT);
    }

    /// Like [`wait_for_value`](Self::wait_for_value) with an explicit deadline.
    pub fn wait_for_value_within(&self, sql: &str, expected: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let last = self.try_psql_admin_in("postgres", sql);
            if last.as_deref() == Ok(expected) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "`{sql}` on port {} did not return `{expected}` within {timeout:?}; last: {last:?}",
                self.port
            );
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Creates a login role with `password` (stored as a SCRAM-SHA-256 verifier, the default).
    pub fn create_role(&self, name: &str, password: &str) {
        self.psql_admin(&format!(
            "CREATE ROLE {} LOGIN PASSWORD {}",
            quote_ident(name),
            quote_literal(password)
        ));
    }

    /// Creates each of `schemas` with a table `t` holding one row, `in <schema>`, readable by
    /// `readers` (a comma-separated role list): which schema a session's `search_path` found.
    pub fn create_marked_schemas(&self, schemas: &[&str], readers: &str) {
        for schema in schemas {
            self.psql_admin(&format!(
                "CREATE SCHEMA {schema}; CREATE TABLE {schema}.t (v text); \
                 INSERT INTO {schema}.t VALUES ('in {schema}'); \
                 GRANT USAGE ON SCHEMA {schema} TO {readers}; \
                 GRANT SELECT ON {schema}.t TO {readers}"
            ));
        }
    }

    /// The role's stored password (`SCRAM-SHA-256$4096:salt$StoredKey:ServerKey`) from pg_authid.
    pub fn role_verifier(&self, name: &str) -> String {
        let verifier = self.psql_admin(&format!(
            "SELECT rolpassword FROM pg_authid WHERE rolname = {}",
            quote_literal(name)
        ));
        assert!(
            !verifier.is_empty(),
            "role {name:?} has no password on port {}",
            self.port
        );
        verifier
    }

    /// Turns TLS on with `certs`' server certificate and key (copied into the data directory,
    /// owned by the server user, key mode 0600), by `ALTER SYSTEM` and a reload.
    pub fn enable_tls(&self, certs: &crate::Certs) {
        use std::os::unix::fs::PermissionsExt;
        let data = self.data_dir();
        for (from, to) in [
            (certs.cert_path(), "server.crt"),
            (certs.key_path(), "server.key"),
        ] {
            let path = data.join(to);
            std::fs::copy(&from, &path).unwrap_or_else(|e| panic!("copy {to}: {e}"));
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .unwrap_or_else(|e| panic!("chmod {to}: {e}"));
            crate::spawn::give_to_server_user(&path);
        }
        self.psql_admin("ALTER SYSTEM SET ssl = on");
        self.psql_admin("SELECT pg_reload_conf()");
        self.wait_for_value("SHOW ssl", "on");
    }

    /// Promotes a replica to primary and waits until it leaves recovery.
    pub fn promote(&self) {
        assert_eq!(
            self.psql_admin("SELECT pg_promote(true, 60)"),
            "t",
            "pg_promote failed"
        );
        self.wait_for_value("SELECT pg_is_in_recovery()", "f");
    }
}

/// Quotes an SQL identifier: `a"b` becomes `"a""b"`.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes an SQL string literal (standard_conforming_strings is on): `it's` becomes `'it''s'`.
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_doubles_the_quote_character() {
        assert_eq!(quote_ident("app"), "\"app\"");
        assert_eq!(quote_ident("we\"ird.role"), "\"we\"\"ird.role\"");
        assert_eq!(quote_literal("pscale_pw_x"), "'pscale_pw_x'");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal("back\\slash"), "'back\\slash'");
    }
}
