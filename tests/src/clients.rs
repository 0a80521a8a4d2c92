//! Real clients: libpq connection strings and psycopg (with its bundled libpq >= 17).

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use crate::tools::python;

/// Seconds libpq waits for a connection before giving up (a hung router fails the test).
const CONNECT_TIMEOUT_S: &str = "10";
/// The exit code of the query script when psycopg raised a database error.
const EXIT_DB_ERROR: i32 = 3;

/// How libpq starts TLS (`sslnegotiation`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslNegotiation {
    /// SSLRequest first, then the handshake (every libpq).
    Postgres,
    /// The TLS handshake right away, ALPN `postgresql` (libpq 17+).
    Direct,
}

/// A libpq connection string, built key by key; `Display` gives the quoted `key='value'` form.
#[derive(Clone, Debug)]
pub struct Conninfo {
    params: Vec<(String, String)>,
}

impl Conninfo {
    /// `host`, `port`, `dbname=postgres` and a connect timeout for `addr`.
    pub fn new(addr: SocketAddr) -> Conninfo {
        Conninfo { params: Vec::new() }
            .param("host", &addr.ip().to_string())
            .param("port", &addr.port().to_string())
            .param("dbname", "postgres")
            .param("connect_timeout", CONNECT_TIMEOUT_S)
    }

    /// Sets `key` (replacing an earlier value).
    pub fn param(mut self, key: &str, value: &str) -> Conninfo {
        match self.params.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value.to_owned(),
            None => self.params.push((key.to_owned(), value.to_owned())),
        }
        self
    }

    /// Sets the user name (for the router: `role.branch[|replica]`).
    pub fn user(self, user: &str) -> Conninfo {
        self.param("user", user)
    }

    /// Sets the password.
    pub fn password(self, password: &str) -> Conninfo {
        self.param("password", password)
    }

    /// Plaintext (`sslmode=disable`), e.g. straight to a test PostgreSQL server.
    pub fn no_tls(self) -> Conninfo {
        self.param("sslmode", "disable")
    }

    /// `sslmode=verify-full` against the CA at `ca_path`, negotiating TLS as `negotiation` says.
    pub fn verify_full(self, ca_path: &Path, negotiation: SslNegotiation) -> Conninfo {
        let negotiation = match negotiation {
            SslNegotiation::Postgres => "postgres",
            SslNegotiation::Direct => "direct",
        };
        self.verify_full_sslrequest(ca_path)
            .param("sslnegotiation", negotiation)
    }

    /// `sslmode=verify-full` against the CA at `ca_path`, without `sslnegotiation`: for libpq
    /// older than 17 (psql 15), which knows only the SSLRequest and refuses the key.
    pub fn verify_full_sslrequest(self, ca_path: &Path) -> Conninfo {
        self.param("sslmode", "verify-full").param(
            "sslrootcert",
            ca_path.to_str().expect("temp paths are UTF-8"),
        )
    }

    /// `host=localhost` reached at `hostaddr=127.0.0.1`: verify-full checks the test
    /// certificate's name without a name lookup.
    pub fn localhost(self) -> Conninfo {
        self.param("host", "localhost")
            .param("hostaddr", "127.0.0.1")
    }
}

impl fmt::Display for Conninfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (key, value)) in self.params.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{key}='")?;
            for c in value.chars() {
                if c == '\'' || c == '\\' {
                    f.write_str("\\")?;
                }
                write!(f, "{c}")?;
            }
            f.write_str("'")?;
        }
        Ok(())
    }
}

/// A database error raised by psycopg (connection refused, authentication failed, SQL error).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientError {
    /// The SQLSTATE when psycopg knows it (errors after connecting; libpq keeps none for
    /// connection failures).
    pub sqlstate: Option<String>,
    /// psycopg's message.
    pub message: String,
}

const QUERY_SCRIPT: &str = r#"
import sys
import psycopg
try:
    with psycopg.connect(sys.argv[1], autocommit=True) as conn:
        cur = conn.execute(sys.argv[2])
        if cur.description is not None:
            for row in cur.fetchall():
                print("|".join("" if v is None else str(v) for v in row))
except psycopg.Error as e:
    print((e.sqlstate or "") + "\t" + str(e).strip(), file=sys.stderr)
    sys.exit(3)
"#;

/// Connects with psycopg, runs `sql` in autocommit mode and returns the rows as `a|b` lines
/// (like `psql -A -t`). Panics if Python itself fails.
pub fn psycopg_query(conninfo: &Conninfo, sql: &str) -> Result<String, ClientError> {
    let output = Command::new(python())
        .arg("-c")
        .arg(QUERY_SCRIPT)
        .arg(conninfo.to_string())
        .arg(sql)
        .output()
        .expect("run python");
    let stderr = String::from_utf8_lossy(&output.stderr);
    if output.status.code() == Some(EXIT_DB_ERROR) {
        let line = stderr.trim_end();
        let (sqlstate, message) = line.split_once('\t').unwrap_or(("", line));
        return Err(ClientError {
            sqlstate: (!sqlstate.is_empty()).then(|| sqlstate.to_owned()),
            message: message.to_owned(),
        });
    }
    assert!(
        output.status.success(),
        "python failed ({}):\n{stderr}",
        output.status
    );
    let mut rows = String::from_utf8(output.stdout).expect("python printed UTF-8");
    rows.truncate(rows.trim_end_matches('\n').len());
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conninfo_quotes_values() {
        let addr: SocketAddr = "127.0.0.1:6000".parse().expect("addr");
        let info = Conninfo::new(addr)
            .user("app.b1|replica")
            .password("it's a \\pw")
            .verify_full(Path::new("/tmp/ca.pem"), SslNegotiation::Direct)
            .param("dbname", "db");
        assert_eq!(
            info.to_string(),
            "host='127.0.0.1' port='6000' dbname='db' connect_timeout='10' \
             user='app.b1|replica' password='it\\'s a \\\\pw' sslmode='verify-full' \
             sslrootcert='/tmp/ca.pem' sslnegotiation='direct'"
        );
    }
}
