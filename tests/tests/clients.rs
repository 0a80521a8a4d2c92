//! Real clients through the router, always over TLS: psql 15 (SSLRequest), psycopg with its
//! bundled libpq 18 (direct SSL), and tokio-postgres 0.7 with tokio-rustls (both negotiations).
//! Covers routing to primary and replica, session semantics on the direct port, the extended
//! protocol with large messages, branch isolation, backend pids, and cancel requests (over TLS,
//! in plaintext, on either worker, and with a wrong secret).
//!
//! One fixture per binary: branch `b1` is a primary with a streaming replica, branch `b2` its own
//! primary. Roles are created on the primaries (the replica gets them by replication) and their
//! verifiers go into the router's catalog. Both branches have a role `app`, with different
//! passwords; `app2` exists only in `b2`.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use branchgate_e2e::certs::ALPN_POSTGRESQL;
use branchgate_e2e::pg::quote_ident;
use branchgate_e2e::raw::cancel_request;
use branchgate_e2e::tokio_tls::{block_on, sqlstate, tp_connect_with, wait_active, MakeRustls};
use branchgate_e2e::tools::{psql_command, psql_output};
use branchgate_e2e::tp_cancel::cancel_key;
use branchgate_e2e::{
    psycopg_query, run_python, BranchSpec, Certs, Conninfo, PgServer, SslNegotiation, TestRouter,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::config::{SslMode, SslNegotiation as TpNegotiation};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Config};

const APP_B1_PASSWORD: &str = "pscale_pw_clients_app_b1_Xq7";
const APP_B2_PASSWORD: &str = "pscale_pw_clients_app_b2_Lm3";
const APP2_B2_PASSWORD: &str = "pscale_pw_clients_app2_b2_Rt9";
/// A database named like the bare role: what a client gets when its dbname defaults to the user
/// name (`app.b1`), which the router maps to the role.
const ROLE_DATABASE: &str = "app";
/// How long a client may take to connect through the router.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A canceled `pg_sleep(30)` must end well before 30 s (cancels take milliseconds).
const CANCEL_BOUND: Duration = Duration::from_secs(10);
/// How long a query may take to show up as active in pg_stat_activity.
const ACTIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections per cancel test: each lands on one of the router's two workers by its source
/// port, and so does each cancel connection, so several rounds cover the cross-worker path.
const CANCEL_ROUNDS: usize = 6;

// ---------------------------------------------------------------------------------------------
// Fixture

struct Fixture {
    certs: Certs,
    router: TestRouter,
    b1_primary: PgServer,
    b1_replica: PgServer,
    b2_primary: PgServer,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let (b1_primary, b2_primary) = thread::scope(|s| {
            let b2 = s.spawn(|| {
                let pg = PgServer::start_primary();
                pg.create_role("app", APP_B2_PASSWORD);
                pg.create_role("app2", APP2_B2_PASSWORD);
                pg
            });
            let b1 = PgServer::start_primary();
            (b1, b2.join().expect("b2 primary starts"))
        });
        let b1_replica = PgServer::start_replica(&b1_primary);
        b1_primary.create_role("app", APP_B1_PASSWORD);
        b1_primary.psql_admin(&format!("CREATE DATABASE {}", quote_ident(ROLE_DATABASE)));
        b1_replica.wait_for_value(
            "SELECT count(*) FROM pg_roles r, pg_database d \
             WHERE r.rolname = 'app' AND d.datname = 'app' AND r.rolpassword IS NOT NULL",
            "1",
        );
        let certs = Certs::generate();
        let branches = [
            BranchSpec::new("b1", b1_primary.addr())
                .replica(b1_replica.addr())
                .role("app", &b1_primary.role_verifier("app")),
            BranchSpec::new("b2", b2_primary.addr())
                .role("app", &b2_primary.role_verifier("app"))
                .role("app2", &b2_primary.role_verifier("app2")),
        ];
        let router = TestRouter::start(&certs, &branches);
        Fixture {
            certs,
            router,
            b1_primary,
            b1_replica,
            b2_primary,
        }
    })
}

impl Fixture {
    /// A libpq connection string to the router, verifying the certificate for `localhost`.
    fn libpq(&self, user: &str, password: &str, negotiation: SslNegotiation) -> Conninfo {
        Conninfo::new(self.router.direct_addr())
            .param("host", "localhost")
            .param("hostaddr", "127.0.0.1")
            .user(user)
            .password(password)
            .verify_full(&self.certs.ca_path(), negotiation)
    }

    /// Runs `sql` with psql 15 (SSLRequest, verify-full); `None` leaves dbname to libpq's default
    /// (the user name). `Err` holds psql's stderr.
    fn psql(
        &self,
        user: &str,
        password: &str,
        dbname: Option<&str>,
        sql: &str,
    ) -> Result<String, String> {
        self.psql_with(user, password, dbname, "", sql)
    }

    /// [`Fixture::psql`] with more conninfo settings.
    fn psql_with(
        &self,
        user: &str,
        password: &str,
        dbname: Option<&str>,
        extra: &str,
        sql: &str,
    ) -> Result<String, String> {
        let mut conninfo = format!(
            "host=localhost hostaddr=127.0.0.1 port={} user='{user}' password='{password}' \
             sslmode=verify-full sslrootcert='{}' connect_timeout=10 {extra}",
            self.router.direct_addr().port(),
            self.certs.ca_path().display()
        );
        if let Some(dbname) = dbname {
            conninfo.push_str(&format!(" dbname='{dbname}'"));
        }
        // No PG* variables from the environment: the defaults are what is under test.
        psql_output(
            psql_command()
                .env_clear()
                .arg("-d")
                .arg(&conninfo)
                .arg("-c")
                .arg(sql),
        )
    }

    /// A tokio-postgres configuration for the router (hostname `localhost`, address 127.0.0.1).
    fn tp_config(&self, user: &str, password: &str, negotiation: TpNegotiation) -> Config {
        let mut config = Config::new();
        config
            .host("localhost")
            .hostaddr(IpAddr::V4(Ipv4Addr::LOCALHOST))
            .port(self.router.direct_addr().port())
            .user(user)
            .password(password)
            .dbname("postgres")
            .ssl_mode(SslMode::Require)
            .ssl_negotiation(negotiation)
            .connect_timeout(CONNECT_TIMEOUT);
        config
    }

    fn tls(&self) -> MakeRustls {
        MakeRustls::new(self.certs.client_config())
    }

    async fn tp_connect(
        &self,
        user: &str,
        password: &str,
        negotiation: TpNegotiation,
    ) -> Result<Client, tokio_postgres::Error> {
        tp_connect_with(&self.tp_config(user, password, negotiation), self.tls()).await
    }
}

const NEGOTIATIONS: [TpNegotiation; 2] = [TpNegotiation::Postgres, TpNegotiation::Direct];

/// Sends a plaintext CancelRequest on a new TCP connection and waits for the router to close it
/// (it answers nothing, like PostgreSQL).
async fn raw_cancel(pid: i32, secret: u32) {
    let request = cancel_request(u32::from_be_bytes(pid.to_be_bytes()), secret);
    let mut tcp = tokio::net::TcpStream::connect(fixture().router.direct_addr())
        .await
        .expect("connect to the router");
    tcp.write_all(&request).await.expect("send CancelRequest");
    let mut reply = Vec::new();
    let read = tokio::time::timeout(CONNECT_TIMEOUT, tcp.read_to_end(&mut reply))
        .await
        .expect("the router closes a cancel connection");
    read.expect("read until the router closes");
    assert!(reply.is_empty(), "a cancel gets no reply: {reply:?}");
}

// ---------------------------------------------------------------------------------------------
// psycopg scripts (argv[1] is the connection string)

/// Prints the user, whether in recovery, the server port, whether the pids agree, and TLS use.
const PSYCOPG_WHO: &str = include_str!("clients/who.py");

/// Temp tables, SET, LISTEN/NOTIFY and a rolled-back transaction across two sessions.
const PSYCOPG_SESSION: &str = include_str!("clients/session.py");

/// `pg_terminate_backend` of its own backend, by `pg_backend_pid()` (argv[2] `self`) or number.
const PSYCOPG_TERMINATE: &str = include_str!("clients/terminate.py");

/// argv[3] rounds of canceling `pg_sleep(30)` with the method argv[2] names; prints each outcome.
const PSYCOPG_CANCEL: &str = include_str!("clients/cancel.py");
/// Connects with `max_protocol_version=latest`, prints libpq's full protocol version and `select 1`.
const PSYCOPG_PROTOCOL: &str = include_str!("clients/protocol.py");

// ---------------------------------------------------------------------------------------------
// 1. psql 15 (SSLRequest)

#[test]
fn psql_reaches_primary_and_replica_as_the_bare_role() {
    let f = fixture();
    let rows = f
        .psql(
            "app.b1",
            APP_B1_PASSWORD,
            Some("postgres"),
            "select current_user, pg_is_in_recovery()",
        )
        .expect("psql to the primary");
    assert_eq!(rows, "app|f");
    let rows = f
        .psql(
            "app.b1|replica",
            APP_B1_PASSWORD,
            Some("postgres"),
            "select current_user, pg_is_in_recovery()",
        )
        .expect("psql to the replica");
    assert_eq!(rows, "app|t");
    let port = f
        .psql(
            "app.b1|replica",
            APP_B1_PASSWORD,
            Some("postgres"),
            "select inet_server_port()",
        )
        .expect("psql to the replica");
    assert_eq!(port, f.b1_replica.port().to_string());
}

/// OpenSSL's TLS 1.2 works as well as its TLS 1.3, with statements and results larger than
/// one TLS record.
#[test]
fn psql_over_tls_1_2_and_1_3_with_multi_record_messages() {
    let f = fixture();
    let literal = "y".repeat(50_000);
    let sql = format!("select length('{literal}'), repeat('ab', 60000)");
    for version in ["TLSv1.2", "TLSv1.3"] {
        let settings =
            format!("ssl_min_protocol_version={version} ssl_max_protocol_version={version}");
        let rows = f
            .psql_with("app.b1", APP_B1_PASSWORD, Some("postgres"), &settings, &sql)
            .unwrap_or_else(|e| panic!("psql over {version}: {e}"));
        assert_eq!(rows, format!("50000|{}", "ab".repeat(60_000)), "{version}");
    }
}

#[test]
fn psql_default_dbname_is_the_bare_role() {
    let f = fixture();
    let sql = "select current_user, current_database(), pg_is_in_recovery()";
    let rows = f
        .psql("app.b1", APP_B1_PASSWORD, None, sql)
        .expect("psql with the default dbname");
    assert_eq!(rows, "app|app|f");
    let rows = f
        .psql("app.b1|replica", APP_B1_PASSWORD, None, sql)
        .expect("psql to the replica with the default dbname");
    assert_eq!(rows, "app|app|t");
    // Without a database named like the role, the backend's own error names the bare role.
    let error = f
        .psql("app2.b2", APP2_B2_PASSWORD, None, sql)
        .expect_err("b2 has no database app2");
    assert!(
        error.contains("FATAL:  database \"app2\" does not exist"),
        "{error}"
    );
}

#[test]
fn backend_startup_errors_reach_the_client_verbatim() {
    let f = fixture();
    let error = f
        .psql("app.b1", APP_B1_PASSWORD, Some("no_such_db"), "select 1")
        .expect_err("the database does not exist");
    assert!(
        error.contains("FATAL:  database \"no_such_db\" does not exist"),
        "{error}"
    );
    block_on(async {
        for negotiation in NEGOTIATIONS {
            let mut config = f.tp_config("app.b1|replica", APP_B1_PASSWORD, negotiation);
            config.dbname("no_such_db");
            let error = tp_connect_with(&config, f.tls())
                .await
                .expect_err("the database does not exist");
            assert_eq!(
                sqlstate(&error),
                &SqlState::INVALID_CATALOG_NAME,
                "{error:?}"
            );
        }
    });
}

// ---------------------------------------------------------------------------------------------
// 2. psycopg / libpq 18 with direct SSL

#[test]
fn psycopg_direct_ssl_reaches_primary_and_replica() {
    let f = fixture();
    let primary = f.libpq("app.b1", APP_B1_PASSWORD, SslNegotiation::Direct);
    let out = run_python(PSYCOPG_WHO, &[&primary.to_string()]);
    assert_eq!(
        out.trim_end(),
        format!("app False {} True True", f.b1_primary.port())
    );
    let replica = f.libpq("app.b1|replica", APP_B1_PASSWORD, SslNegotiation::Direct);
    let out = run_python(PSYCOPG_WHO, &[&replica.to_string()]);
    assert_eq!(
        out.trim_end(),
        format!("app True {} True True", f.b1_replica.port())
    );
}

#[test]
fn a_user_name_without_branch_takes_it_from_the_server_name() {
    let f = fixture();
    let by_sni = |host: &str, user: &str, password: &str, negotiation| {
        Conninfo::new(f.router.direct_addr())
            .param("host", host)
            .param("hostaddr", "127.0.0.1")
            .user(user)
            .password(password)
            .verify_full(&f.certs.ca_path(), negotiation)
    };
    let who = "select current_user || ' ' || inet_server_port()";
    for negotiation in [SslNegotiation::Direct, SslNegotiation::Postgres] {
        let b2 = by_sni("b2.db.localhost", "app", APP_B2_PASSWORD, negotiation);
        assert_eq!(
            psycopg_query(&b2, who).expect("app on b2 by SNI"),
            format!("app {}", f.b2_primary.port())
        );
        let replica = by_sni(
            "b1.db.localhost",
            "app|replica",
            APP_B1_PASSWORD,
            negotiation,
        );
        assert_eq!(
            psycopg_query(&replica, who).expect("app on b1's replica by SNI"),
            format!("app {}", f.b1_replica.port())
        );
        // Branch isolation holds: b1's password is not b2's.
        let wrong = by_sni("b2.db.localhost", "app", APP_B1_PASSWORD, negotiation);
        let error = psycopg_query(&wrong, "select 1").expect_err("b1's password on b2");
        assert!(
            error
                .message
                .contains("password authentication failed for user \"app\""),
            "{error:?}"
        );
        // A server name whose first label could be a branch the catalog does not have: a
        // failed password, as for a branch named in the user name (which branches exist is
        // not told before a password).
        let nowhere = by_sni("b9.db.localhost", "app", APP_B1_PASSWORD, negotiation);
        let error = psycopg_query(&nowhere, "select 1").expect_err("no branch b9");
        assert!(
            error
                .message
                .contains("password authentication failed for user \"app\""),
            "{error:?}"
        );
        // A server name of one label names no branch: the user name's format error.
        let single = by_sni("localhost", "app", APP_B1_PASSWORD, negotiation);
        let error = psycopg_query(&single, "select 1").expect_err("no branch in the name");
        assert!(
            error.message.contains("user name must have the form"),
            "{error:?}"
        );
    }
    // psql 15 sends SNI too (SSLRequest; it knows no sslnegotiation).
    let conninfo = format!(
        "host=b2.db.localhost hostaddr=127.0.0.1 port={} user=app password='{APP_B2_PASSWORD}' \
         dbname=postgres sslmode=verify-full sslrootcert='{}'",
        f.router.direct_addr().port(),
        f.certs.ca_path().display()
    );
    let out = psql_output(
        psql_command()
            .env_clear()
            .args(["-d", &conninfo, "-c", who]),
    )
    .expect("psql 15 by SNI");
    assert_eq!(out, format!("app {}", f.b2_primary.port()));
}

#[test]
fn libpq_18_asking_for_protocol_3_2_is_negotiated_down_to_3_0() {
    let f = fixture();
    for negotiation in [SslNegotiation::Direct, SslNegotiation::Postgres] {
        let dsn = f
            .libpq("app.b1", APP_B1_PASSWORD, negotiation)
            .param("max_protocol_version", "latest");
        let out = run_python(PSYCOPG_PROTOCOL, &[&dsn.to_string()]);
        assert_eq!(out.trim_end(), "30000 1", "{negotiation:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Session features on the direct port

#[test]
fn session_state_notify_and_transactions_survive_the_relay() {
    let f = fixture();
    let dsn = f.libpq("app.b1", APP_B1_PASSWORD, SslNegotiation::Direct);
    let out = run_python(PSYCOPG_SESSION, &[&dsn.to_string()]);
    assert_eq!(
        out,
        "temp 2\n\
         other 42P01\n\
         search_path pg_temp, public\n\
         work_mem 7MB\n\
         notify clients_chan 'hello from b' True True True\n\
         status True\n\
         inside 52\n\
         status True\n\
         after 2\n"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. pg_terminate_backend on one's own connection

#[test]
fn terminating_ones_own_backend_closes_the_connection() {
    let f = fixture();
    let dsn = f.libpq("app.b1", APP_B1_PASSWORD, SslNegotiation::Postgres);
    for target in ["self", "reported"] {
        let out = run_python(PSYCOPG_TERMINATE, &[&dsn.to_string(), target]);
        let (pid, rest) = out.split_once('\n').expect("pid line");
        assert_eq!(rest, "pids agree True\nerror 57P01 True\n", "{target}");
        f.b1_primary.wait_for_value_within(
            &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}"),
            "0",
            ACTIVE_TIMEOUT,
        );
    }
}

#[test]
fn terminating_ones_own_backend_from_tokio_postgres() {
    block_on(async {
        let f = fixture();
        for negotiation in NEGOTIATIONS {
            let client = f
                .tp_connect("app.b1", APP_B1_PASSWORD, negotiation)
                .await
                .expect("connect");
            let (pid, _) = cancel_key(&client).await;
            let row = client
                .query_one("select pg_backend_pid()", &[])
                .await
                .expect("pg_backend_pid");
            assert_eq!(
                row.get::<_, i32>(0),
                pid,
                "BackendKeyData pid is the backend's"
            );
            let error = client
                .simple_query("select pg_terminate_backend(pg_backend_pid())")
                .await
                .expect_err("the backend terminates");
            assert_eq!(sqlstate(&error), &SqlState::ADMIN_SHUTDOWN, "{error:?}");
            let error = client
                .simple_query("select 1")
                .await
                .expect_err("the connection is closed");
            assert!(error.is_closed(), "{error:?}");
        }
    });
}

// ---------------------------------------------------------------------------------------------
// 5. tokio-postgres: extended protocol and large messages

/// Text with varied content, so reordered or duplicated chunks do not compare equal.
fn big_text(len: usize) -> String {
    (0..len)
        .map(|i| char::from(b'a' + u8::try_from((i * 7 + i / 26) % 26).expect("< 26")))
        .collect()
}

async fn extended_protocol(negotiation: TpNegotiation) {
    let f = fixture();
    let tls = f.tls();
    let config = f.tp_config("app.b1", APP_B1_PASSWORD, negotiation);
    let client = tp_connect_with(&config, tls.clone())
        .await
        .expect("connect");
    assert_eq!(tls.last_alpn().as_deref(), Some(ALPN_POSTGRESQL));

    let rows = client
        .query("select $1::int + $2::int, $3::text", &[&1i32, &2i32, &"x"])
        .await
        .expect("parameters");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, i32>(0), 3);
    assert_eq!(rows[0].get::<_, &str>(1), "x");

    let statement = client
        .prepare("select $1::int8 * 2, repeat('y', $2::int)")
        .await
        .expect("prepare");
    for i in 0..20i32 {
        let row = client
            .query_one(&statement, &[&i64::from(i), &i])
            .await
            .expect("execute the prepared statement");
        assert_eq!(row.get::<_, i64>(0), i64::from(i) * 2);
        assert_eq!(
            row.get::<_, &str>(1),
            "y".repeat(usize::try_from(i).expect("i >= 0"))
        );
    }

    let rows = client
        .query(
            "select g, repeat('r', g % 50) from generate_series(1, 100000) g",
            &[],
        )
        .await
        .expect("many rows");
    assert_eq!(rows.len(), 100_000);
    for (row, g) in rows.iter().zip(1i32..) {
        assert_eq!(row.get::<_, i32>(0), g);
        assert_eq!(
            row.get::<_, &str>(1).len(),
            usize::try_from(g % 50).expect(">= 0")
        );
    }

    let text = big_text(1 << 20);
    let row = client
        .query_one("select $1::text, length($1::text)", &[&text])
        .await
        .expect("1 MiB text parameter");
    assert_eq!(row.get::<_, i32>(1), 1 << 20);
    assert!(
        row.get::<_, &str>(0) == text,
        "1 MiB text echoed differently"
    );

    let bytes: Vec<u8> = (0..(1usize << 20)).map(|i| (i % 251) as u8).collect();
    let row = client
        .query_one("select $1::bytea", &[&bytes])
        .await
        .expect("1 MiB bytea parameter");
    assert!(
        row.get::<_, &[u8]>(0) == bytes,
        "1 MiB bytea echoed differently"
    );

    // Many requests in flight at once: tokio-postgres pipelines them into few writes.
    let queries = (0..200i32).map(|i| {
        let client = &client;
        async move {
            let row = client
                .query_one("select $1::int4 + 1", &[&i])
                .await
                .expect("pipelined query");
            assert_eq!(row.get::<_, i32>(0), i + 1);
        }
    });
    futures_util::future::join_all(queries).await;
}

#[test]
fn tokio_postgres_extended_protocol_ssl_request() {
    block_on(extended_protocol(TpNegotiation::Postgres));
}

#[test]
fn tokio_postgres_extended_protocol_direct_ssl() {
    block_on(extended_protocol(TpNegotiation::Direct));
}

#[test]
fn tokio_postgres_reaches_primary_and_replica() {
    block_on(async {
        let f = fixture();
        for negotiation in NEGOTIATIONS {
            for (user, recovery, port) in [
                ("app.b1", false, f.b1_primary.port()),
                ("app.b1|replica", true, f.b1_replica.port()),
            ] {
                let client = f
                    .tp_connect(user, APP_B1_PASSWORD, negotiation)
                    .await
                    .expect("connect");
                let row = client
                    .query_one(
                        "select current_user::text, pg_is_in_recovery(), inet_server_port()",
                        &[],
                    )
                    .await
                    .expect("who am I");
                assert_eq!(row.get::<_, &str>(0), "app", "{user} {negotiation:?}");
                assert_eq!(row.get::<_, bool>(1), recovery, "{user} {negotiation:?}");
                assert_eq!(
                    row.get::<_, i32>(2),
                    i32::from(port),
                    "{user} {negotiation:?}"
                );
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------
// 6. Branch isolation

#[test]
fn a_role_cannot_reach_another_branch() {
    block_on(async {
        let f = fixture();
        for (user, password, role) in [
            ("app2.b1", APP2_B2_PASSWORD, "app2"),
            ("app.b2", APP_B1_PASSWORD, "app"),
            ("app.b1", APP_B2_PASSWORD, "app"),
        ] {
            let error = f
                .tp_connect(user, password, TpNegotiation::Postgres)
                .await
                .err()
                .unwrap_or_else(|| panic!("{user} with another branch's password connected"));
            let db = error
                .as_db_error()
                .unwrap_or_else(|| panic!("{user}: expected a server error, got {error:?}"));
            assert_eq!(db.code(), &SqlState::INVALID_PASSWORD, "{user}");
            assert_eq!(
                db.message(),
                format!("password authentication failed for user \"{role}\""),
                "{user}"
            );
        }
        // The right passwords do work, each on its own branch's server.
        for (user, password, port) in [
            ("app2.b2", APP2_B2_PASSWORD, f.b2_primary.port()),
            ("app.b2", APP_B2_PASSWORD, f.b2_primary.port()),
            ("app.b1", APP_B1_PASSWORD, f.b1_primary.port()),
        ] {
            let client = f
                .tp_connect(user, password, TpNegotiation::Direct)
                .await
                .unwrap_or_else(|e| panic!("{user}: {e:?}"));
            let row = client
                .query_one("select inet_server_port()", &[])
                .await
                .expect("server port");
            assert_eq!(row.get::<_, i32>(0), i32::from(port), "{user}");
        }
    });
}

#[test]
fn psql_shows_the_password_failure_for_the_bare_role() {
    let f = fixture();
    let error = f
        .psql("app2.b1", APP2_B2_PASSWORD, Some("postgres"), "select 1")
        .expect_err("app2 does not exist in b1");
    assert!(
        error.contains("FATAL:  password authentication failed for user \"app2\""),
        "{error}"
    );
}

// ---------------------------------------------------------------------------------------------
// 7. Cancel

#[test]
fn tokio_postgres_cancel_over_tls_reaches_the_query() {
    block_on(async {
        let f = fixture();
        let watcher = f
            .tp_connect("app.b1", APP_B1_PASSWORD, TpNegotiation::Postgres)
            .await
            .expect("watcher connects");
        for round in 0..CANCEL_ROUNDS {
            let negotiation = NEGOTIATIONS[round % 2];
            let client = f
                .tp_connect("app.b1", APP_B1_PASSWORD, negotiation)
                .await
                .expect("connect");
            let (pid, _) = cancel_key(&client).await;
            let token = client.cancel_token();
            let sleeper = tokio::spawn(async move {
                let start = Instant::now();
                let result = client.simple_query("select pg_sleep(30)").await;
                (result.map(drop), start.elapsed())
            });
            wait_active(&watcher, pid, "select pg_sleep(30)").await;
            token
                .cancel_query(f.tls())
                .await
                .expect("send the cancel request");
            let (result, elapsed) = sleeper.await.expect("query task");
            let error = result.expect_err("the query is canceled");
            assert_eq!(sqlstate(&error), &SqlState::QUERY_CANCELED, "round {round}");
            assert!(elapsed < CANCEL_BOUND, "round {round}: took {elapsed:?}");
        }
    });
}

#[test]
fn plaintext_cancel_needs_the_right_secret() {
    block_on(async {
        let f = fixture();
        let watcher = f
            .tp_connect("app.b1", APP_B1_PASSWORD, TpNegotiation::Direct)
            .await
            .expect("watcher connects");
        for round in 0..CANCEL_ROUNDS {
            let client = f
                .tp_connect("app.b1", APP_B1_PASSWORD, NEGOTIATIONS[round % 2])
                .await
                .expect("connect");
            let (pid, secret) = cancel_key(&client).await;
            let client = Arc::new(client);

            // A wrong secret: the query runs to its end. Sent several times, so that both
            // workers see one whichever owns the session.
            let query = "select 42 from pg_sleep(2)";
            let sleeper = tokio::spawn({
                let client = client.clone();
                async move { client.query_one(query, &[]).await }
            });
            wait_active(&watcher, pid, query).await;
            for _ in 0..4 {
                raw_cancel(pid, secret.wrapping_add(1)).await;
            }
            let row = sleeper
                .await
                .expect("query task")
                .unwrap_or_else(|e| panic!("round {round}: wrong secret canceled: {e:?}"));
            assert_eq!(row.get::<_, i32>(0), 42);

            // The right secret, also in plaintext: canceled.
            let query = "select pg_sleep(30)";
            let sleeper = tokio::spawn({
                let client = client.clone();
                async move {
                    let start = Instant::now();
                    (client.simple_query(query).await.map(drop), start.elapsed())
                }
            });
            wait_active(&watcher, pid, query).await;
            raw_cancel(pid, secret).await;
            let (result, elapsed) = sleeper.await.expect("query task");
            let error = result.expect_err("the query is canceled");
            assert_eq!(sqlstate(&error), &SqlState::QUERY_CANCELED, "round {round}");
            assert!(elapsed < CANCEL_BOUND, "round {round}: took {elapsed:?}");
        }
    });
}

fn psycopg_cancel(method: &str, negotiation: SslNegotiation) {
    let f = fixture();
    let dsn = f.libpq("app.b1", APP_B1_PASSWORD, negotiation);
    let rounds = CANCEL_ROUNDS / 2;
    let out = run_python(
        PSYCOPG_CANCEL,
        &[&dsn.to_string(), method, &rounds.to_string()],
    );
    assert_eq!(
        out,
        "57014 True\n".repeat(rounds),
        "{method} {negotiation:?}"
    );
}

#[test]
fn psycopg_cancel_plaintext() {
    psycopg_cancel("cancel", SslNegotiation::Postgres);
    psycopg_cancel("cancel", SslNegotiation::Direct);
}

#[test]
fn psycopg_cancel_safe_over_tls() {
    psycopg_cancel("cancel_safe", SslNegotiation::Postgres);
    psycopg_cancel("cancel_safe", SslNegotiation::Direct);
}
