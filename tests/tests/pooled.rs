//! The pooled port (transaction pooling, issue 8) against a real PostgreSQL 15, always over TLS:
//! pgbench in its three query modes, psycopg (prepares after 5 executions, pipelines),
//! tokio-postgres (prepares every statement), psql, a byte-level client for the extended-protocol
//! sequences no library produces on demand, startup parameters that follow each client, a
//! backend killed mid-transaction, cancel, the pool's timeouts and limits, and a client leaving
//! mid-transaction.
//!
//! One PostgreSQL server per binary; every test starts its own router with the `[pool]` settings
//! it checks, so pools are never shared between tests. Routers run one worker (so that
//! `pool_size` is the branch's whole budget whatever the steering), except where a test covers
//! both workers; tests/tests/handoff.rs has a branch's clients meet on its owning worker.

use std::net::{IpAddr, Ipv4Addr};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use branchgate_e2e::pg::{quote_literal, BackendSampler};
use branchgate_e2e::raw::{
    bind_execute, close, data_row, describe, error_codes, errors, execute, first_column, flush,
    parameter_description, parameter_status, parse, parse_error, query, row_description, sync,
    tags, Mode, RawConn, Reply,
};
use branchgate_e2e::tokio_tls::{block_on, sqlstate, tp_connect_with, MakeRustls};
use branchgate_e2e::tools::{self, pg_bin, python, wait_with_deadline};
use branchgate_e2e::tp_cancel::cancel_key;
use branchgate_e2e::{
    run_python, BranchSpec, Certs, Conninfo, PgServer, PoolSettings, SslNegotiation, TestRouter,
    ADMIN_PASSWORD, ADMIN_USER,
};
use tokio_postgres::config::{SslMode, SslNegotiation as TpNegotiation};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Config, NoTls};

const BRANCH: &str = "b1";
/// The application role, as the router's clients name it and as PostgreSQL knows it.
const APP_USER: &str = "app.b1";
const APP_ROLE: &str = "app";
const APP_PASSWORD: &str = "pscale_pw_pooled_app_Kf4";
/// pgbench's role, used by nothing else, so its backends can be counted by user name.
const BENCH_USER: &str = "bench.b1";
const BENCH_ROLE: &str = "bench";
const BENCH_PASSWORD: &str = "pscale_pw_pooled_bench_Wz8";
/// pgbench's database (owned by the bench role, initialised with `pgbench -i`).
const BENCH_DATABASE: &str = "bench";

/// pgbench's pool, and its clients: four per backend.
const BENCH_POOL_SIZE: usize = 2;
const BENCH_CLIENTS: usize = 4 * BENCH_POOL_SIZE;
/// Transactions per pgbench client in each mode.
const BENCH_TRANSACTIONS: usize = 25;

/// Type OIDs.
const INT4: u32 = 23;
const TEXT: u32 = 25;

/// A bound on anything that should take milliseconds (a cancel, a handover between clients).
const QUICK: Duration = Duration::from_secs(3);
/// How long a client that the router must hold back is watched for a premature answer.
const HELD_WINDOW: Duration = Duration::from_millis(400);
/// How long a python or pgbench client may run before the test calls it stuck.
const CLIENT_DEADLINE: Duration = Duration::from_secs(120);
/// PgBouncer's NOTICE threshold for a queued client (`query_wait_notify`), which the issue keeps.
const QUEUED_NOTICE_AFTER: Duration = Duration::from_secs(5);

/// psycopg: autocommit, forced prepares, transactions, pipelines, implicit transactions.
const PSYCOPG_WORK: &str = include_str!("clients/pooled_work.py");
/// psycopg: `cancel_safe` of a running query, of an idle client, and the pid it was told.
const PSYCOPG_CANCEL: &str = include_str!("clients/pooled_cancel.py");
/// psycopg: PgBouncer's own pipeline test of a failed prepare beside eviction.
const PSYCOPG_EVICT_PIPELINE: &str = include_str!("clients/pooled_evict_pipeline.py");
/// psycopg: a prepared statement with 5,000 parameters.
const PSYCOPG_LONG_STATEMENT: &str = include_str!("clients/pooled_long_statement.py");

// ---------------------------------------------------------------------------------------------
// Fixture

struct Fixture {
    certs: Certs,
    pg: PgServer,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let pg = PgServer::start_primary();
        pg.create_role(APP_ROLE, APP_PASSWORD);
        pg.create_role(BENCH_ROLE, BENCH_PASSWORD);
        pg.psql_admin(
            "CREATE TABLE pooled_items (client text NOT NULL, n int NOT NULL); \
             GRANT ALL ON pooled_items TO app",
        );
        pg.create_marked_schemas(&["s1", "s2"], "app");
        pg.psql_admin(&format!(
            "CREATE DATABASE {BENCH_DATABASE} OWNER {BENCH_ROLE}"
        ));
        let init = Command::new(pg_bin("pgbench"))
            .env_clear()
            .arg("-h")
            .arg(pg.socket_dir())
            .args(["-p", &pg.port().to_string(), "-U", BENCH_ROLE])
            .args(["-i", "-q", "-s", "1", BENCH_DATABASE])
            .stdin(Stdio::null())
            .output()
            .expect("run pgbench -i");
        assert!(
            init.status.success(),
            "pgbench -i failed:\n{}",
            String::from_utf8_lossy(&init.stderr)
        );
        Fixture {
            certs: Certs::generate(),
            pg,
        }
    })
}

impl Fixture {
    /// The catalog: branch b1 on the test server with both roles.
    fn branch(&self) -> BranchSpec {
        BranchSpec::new(BRANCH, self.pg.addr())
            .role(APP_ROLE, &self.pg.role_verifier(APP_ROLE))
            .role(BENCH_ROLE, &self.pg.role_verifier(BENCH_ROLE))
    }

    /// A router of its own for one test.
    fn router(&self, settings: &PoolSettings) -> TestRouter {
        settings.start(&self.certs, &[self.branch()])
    }

    /// A byte-level client of the pooled port as `app.b1`, with `extra` startup parameters.
    fn raw(&self, router: &TestRouter, mode: Mode, extra: &[(&str, &str)]) -> RawConn {
        RawConn::connect(
            router.pooled_addr(),
            self.certs.client_config(),
            mode,
            APP_USER,
            APP_PASSWORD,
            extra,
        )
    }

    /// A libpq (psycopg) connection string for the pooled port as `app.b1`, verify-full.
    fn libpq(&self, router: &TestRouter, negotiation: SslNegotiation) -> Conninfo {
        Conninfo::new(router.pooled_addr())
            .param("host", "localhost")
            .param("hostaddr", "127.0.0.1")
            .user(APP_USER)
            .password(APP_PASSWORD)
            .verify_full(&self.certs.ca_path(), negotiation)
    }

    /// The superuser straight to PostgreSQL (plaintext), for watching pg_stat_activity.
    fn admin_dsn(&self) -> Conninfo {
        Conninfo::new(self.pg.addr())
            .user(ADMIN_USER)
            .password(ADMIN_PASSWORD)
            .no_tls()
    }

    /// A tokio-postgres configuration for the pooled port as `app.b1`.
    fn tp_config(&self, router: &TestRouter, negotiation: TpNegotiation) -> Config {
        let mut config = Config::new();
        config
            .host("localhost")
            .hostaddr(IpAddr::V4(Ipv4Addr::LOCALHOST))
            .port(router.pooled_addr().port())
            .user(APP_USER)
            .password(APP_PASSWORD)
            .dbname("postgres")
            .ssl_mode(SslMode::Require)
            .ssl_negotiation(negotiation)
            .connect_timeout(Duration::from_secs(10));
        config
    }

    async fn tp_connect(&self, router: &TestRouter, negotiation: TpNegotiation) -> Client {
        tp_connect_with(
            &self.tp_config(router, negotiation),
            MakeRustls::new(self.certs.client_config()),
        )
        .await
        .expect("tokio-postgres connects to the pooled port")
    }

    /// The superuser straight to PostgreSQL with tokio-postgres, in the current runtime.
    async fn tp_admin(&self) -> Client {
        let (client, connection) = self
            .admin_dsn()
            .to_string()
            .parse::<Config>()
            .expect("admin conninfo")
            .connect(NoTls)
            .await
            .expect("admin connects to PostgreSQL");
        tokio::spawn(connection);
        client
    }
}

// ---------------------------------------------------------------------------------------------
// 1. pgbench: four clients per backend, in each query mode

#[test]
fn pgbench_in_every_query_mode_with_four_clients_per_backend_stays_within_pool_size() {
    let f = fixture();
    let router = f.router(&PoolSettings::new(
        u32::try_from(BENCH_POOL_SIZE).expect("small"),
    ));
    for mode in ["simple", "extended", "prepared"] {
        let sampler = BackendSampler::start(&f.pg, BENCH_ROLE);
        let child = Command::new(pg_bin("pgbench"))
            .env_clear()
            .env("PGPASSWORD", BENCH_PASSWORD)
            .env("PGSSLMODE", "require")
            .env("PGCONNECT_TIMEOUT", "10")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &router.pooled_addr().port().to_string(),
            ])
            .args(["-U", BENCH_USER, "-n", "-j", "2", "-M", mode])
            .args(["-c", &BENCH_CLIENTS.to_string()])
            .args(["-t", &BENCH_TRANSACTIONS.to_string()])
            .arg(BENCH_DATABASE)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run pgbench");
        let output = wait_with_deadline(child, "pgbench", CLIENT_DEADLINE);
        let (peak, samples) = sampler.stop();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success() && !stderr.contains("error"),
            "pgbench -M {mode} failed ({}):\n{stdout}\n{stderr}",
            output.status
        );
        let total = BENCH_CLIENTS * BENCH_TRANSACTIONS;
        assert!(
            stdout.contains(&format!(
                "number of transactions actually processed: {total}/{total}"
            )),
            "-M {mode}:\n{stdout}"
        );
        assert!(
            stdout.contains("number of failed transactions: 0 (0.000%)"),
            "-M {mode}:\n{stdout}"
        );
        // Eight clients busy for the whole run fill the pool, and never more than the pool.
        assert_eq!(
            peak, BENCH_POOL_SIZE,
            "-M {mode}: most backends of {BENCH_ROLE} seen at once ({samples} samples)"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 2. psycopg: many transactions, prepared statements, pipelines

/// Runs `clients` psycopg clients at once (client numbers from `first`), each with `rounds`,
/// and checks each one's report.
fn psycopg_clients_share_the_pool(pool_size: u32, first: usize, clients: usize) {
    let f = fixture();
    let router = f.router(&PoolSettings::new(pool_size));
    let rounds = 20;
    let children: Vec<(usize, Child)> = (first..first + clients)
        .map(|k| {
            let negotiation = if k % 2 == 0 {
                SslNegotiation::Postgres
            } else {
                SslNegotiation::Direct
            };
            let dsn = f.libpq(&router, negotiation).to_string();
            let child = Command::new(python())
                .arg("-c")
                .arg(PSYCOPG_WORK)
                .args([&dsn, &k.to_string(), &rounds.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("run python");
            (k, child)
        })
        .collect();
    for (k, child) in children {
        let output = wait_with_deadline(child, &format!("psycopg client {k}"), CLIENT_DEADLINE);
        assert!(
            output.status.success(),
            "psycopg client {k} on a pool of {pool_size} failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let expected = format!(
            "c{k} autocommit {rounds}\n\
             c{k} prepared {rounds}\n\
             c{k} transactions {rounds} 22012\n\
             c{k} pipeline True {}\n\
             c{k} pipeline error 22012 {k}\n\
             c{k} implicit transactions {rounds}\n",
            rounds + 1
        );
        assert_eq!(
            String::from_utf8_lossy(&output.stdout),
            expected,
            "client {k}"
        );
    }
}

/// Runs `script` (its arguments a DSN and `rounds`) as two psycopg clients at once, one
/// with each SSL negotiation, and checks each printed `ok N` for every round.
fn two_psycopg_clients(f: &Fixture, router: &TestRouter, script: &str, rounds: usize) {
    let children: Vec<Child> = [SslNegotiation::Postgres, SslNegotiation::Direct]
        .into_iter()
        .map(|negotiation| {
            Command::new(python())
                .arg("-c")
                .arg(script)
                .args([
                    &f.libpq(router, negotiation).to_string(),
                    &rounds.to_string(),
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("run python")
        })
        .collect();
    let expected: String = (0..rounds).map(|r| format!("ok {r}\n")).collect();
    for (i, child) in children.into_iter().enumerate() {
        let output = wait_with_deadline(child, &format!("psycopg client {i}"), CLIENT_DEADLINE);
        assert!(
            output.status.success(),
            "psycopg client {i} failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&output.stdout),
            expected,
            "client {i}"
        );
    }
}

/// PgBouncer's `test_evict_statement_cache_pipeline_failure` (its issue #1480: the test is
/// flaky there), through psycopg on a pool of one backend that keeps one statement
/// (`max_prepared_statements = 1`), two clients at once so the backend changes hands between
/// their pipelines: a failed Parse in a pipeline leaves the client's other statement, and
/// statements evicted inside a pipeline are prepared again where they run.
#[test]
fn psycopg_pipeline_with_a_failed_prepare_and_evictions_as_pgbouncers_test() {
    let f = fixture();
    let mut settings = PoolSettings::new(1);
    settings.max_prepared_statements = Some(1);
    let router = f.router(&settings);
    let rounds = 10;
    two_psycopg_clients(f, &router, PSYCOPG_EVICT_PIPELINE, rounds);
}

#[test]
fn psycopg_clients_sharing_a_pool_of_one_all_finish_with_their_own_results() {
    psycopg_clients_share_the_pool(1, 1, 2);
}

#[test]
fn psycopg_clients_sharing_a_pool_of_two_all_finish_with_their_own_results() {
    psycopg_clients_share_the_pool(2, 3, 3);
}

// ---------------------------------------------------------------------------------------------
// 3. tokio-postgres: every statement prepared, statements moving between backends

/// `rounds` transactions of client `k`: a statement prepared once before the loop, executed in
/// each transaction, plus statements tokio-postgres prepares and closes per query.
async fn tp_transactions(client: &mut Client, k: i32, rounds: i32) {
    let statement = client
        .prepare(&format!("select $1::int4 * {k}, $2::text || '-{k}'"))
        .await
        .expect("prepare");
    for i in 0..rounds {
        let tx = client.transaction().await.expect("begin");
        let row = tx
            .query_one(&statement, &[&i, &i.to_string()])
            .await
            .expect("prepared statement in a later transaction");
        assert_eq!(row.get::<_, i32>(0), i * k, "client {k} round {i}");
        assert_eq!(
            row.get::<_, &str>(1),
            format!("{i}-{k}"),
            "client {k} round {i}"
        );
        let row = tx
            .query_one(&format!("select $1::int4 + {k}"), &[&i])
            .await
            .expect("statement prepared for one query");
        assert_eq!(row.get::<_, i32>(0), i + k, "client {k} round {i}");
        if i % 5 == 4 {
            tx.rollback().await.expect("rollback");
        } else {
            tx.commit().await.expect("commit");
        }
        let row = client
            .query_one(&statement, &[&-i, &"auto"])
            .await
            .expect("prepared statement outside a transaction");
        assert_eq!(row.get::<_, i32>(0), -i * k, "client {k} round {i}");
    }
}

#[test]
fn tokio_postgres_statement_prepared_once_runs_on_another_backend() {
    let f = fixture();
    let router = f.router(&PoolSettings::new(2));
    block_on(async {
        let a = f.tp_connect(&router, TpNegotiation::Postgres).await;
        let mut b = f.tp_connect(&router, TpNegotiation::Direct).await;
        let statement = a
            .prepare("select $1::int4 * 2 as doubled")
            .await
            .expect("prepare");
        let pid = |row: tokio_postgres::Row| row.get::<_, i32>(0);
        let first = pid(a
            .query_one("select pg_backend_pid()", &[])
            .await
            .expect("pid"));
        // b takes the one backend there is and keeps it in a transaction...
        let tx = b.transaction().await.expect("begin");
        let held = pid(tx
            .query_one("select pg_backend_pid()", &[])
            .await
            .expect("pid"));
        assert_eq!(
            held, first,
            "the pool hands out its idle backend before opening another"
        );
        // ...so a's statement runs on a second backend, where it was never prepared.
        let row = a.query_one(&statement, &[&21i32]).await.expect("execute");
        assert_eq!(row.get::<_, i32>(0), 42);
        assert_eq!(row.columns()[0].name(), "doubled");
        let second = pid(a
            .query_one("select pg_backend_pid()", &[])
            .await
            .expect("pid"));
        assert_ne!(second, first, "a ran on the backend b holds");
        tx.commit().await.expect("commit");
        // Then both go on at once over both backends.
        let mut a = a;
        futures_util::future::join(
            tp_transactions(&mut a, 3, 30),
            tp_transactions(&mut b, 4, 30),
        )
        .await;
    });
}

#[test]
fn tokio_postgres_clients_sharing_a_pool_of_one_keep_their_prepared_statements() {
    let f = fixture();
    let router = f.router(&PoolSettings::new(1));
    block_on(async {
        let mut a = f.tp_connect(&router, TpNegotiation::Postgres).await;
        let mut b = f.tp_connect(&router, TpNegotiation::Direct).await;
        futures_util::future::join(
            tp_transactions(&mut a, 5, 40),
            tp_transactions(&mut b, 6, 40),
        )
        .await;
    });
}

// ---------------------------------------------------------------------------------------------
// 4. psql

/// psql 15 through the pooled port (SSLRequest, verify-full) running `script` from stdin,
/// errors not stopping it: (stdout, stderr).
fn psql_script(f: &Fixture, router: &TestRouter, script: &str) -> (String, String) {
    // psql 15's libpq predates sslnegotiation.
    let conninfo = Conninfo::new(router.pooled_addr())
        .localhost()
        .user(APP_USER)
        .password(APP_PASSWORD)
        .verify_full_sslrequest(&f.certs.ca_path());
    tools::psql_script(&conninfo.to_string(), script, false, CLIENT_DEADLINE)
}

#[test]
fn psql_variables_multi_statement_queries_and_transactions() {
    let f = fixture();
    let router = f.router(&PoolSettings::new(1));
    // `\;` puts both statements in one Query message.
    let (stdout, stderr) = psql_script(
        f,
        &router,
        "\\set answer 41\n\
         select :answer + 1;\n\
         select 'one' \\; select 'two';\n\
         begin;\n\
         select txid_current();\n\
         select txid_current();\n\
         select now() = statement_timestamp();\n\
         commit;\n\
         select now() = statement_timestamp();\n",
    );
    assert_eq!(stderr, "", "{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 7, "{stdout}");
    assert_eq!(lines[..3], ["42", "one", "two"], "{stdout}");
    assert!(lines[3].parse::<u64>().is_ok(), "{stdout}");
    assert_eq!(lines[3], lines[4], "one transaction, one backend: {stdout}");
    // Inside the transaction now() is its start; outside, each statement starts its own.
    assert_eq!(lines[5..], ["f", "t"], "{stdout}");

    let (stdout, stderr) = psql_script(
        f,
        &router,
        "begin;\n\
         insert into pooled_items values ('psql', 1);\n\
         select 1/0;\n\
         \\echo :LAST_ERROR_SQLSTATE\n\
         select 'ignored';\n\
         \\echo :LAST_ERROR_SQLSTATE\n\
         rollback;\n\
         select count(*) from pooled_items where client = 'psql';\n",
    );
    assert_eq!(stdout, "22012\n25P02\n0\n", "{stderr}");
    assert!(stderr.contains("division by zero"), "{stderr}");
    assert!(
        stderr.contains(
            "current transaction is aborted, commands ignored until end of transaction block"
        ),
        "{stderr}"
    );
}

// ---------------------------------------------------------------------------------------------
// 5. The extended protocol byte by byte

/// The first column of the rows in `replies`, after checking their tags are exactly `expected`.
fn rows(replies: &[Reply], expected: &str, what: &str) -> Vec<String> {
    assert_eq!(tags(replies), expected, "{what}: {:?}", errors(replies));
    first_column(replies)
}

#[test]
fn statement_parsed_in_one_transaction_is_described_and_bound_on_another_backend() {
    let f = fixture();
    let router = f.router(&PoolSettings::new(2));
    let mut a = f.raw(&router, Mode::SslRequest, &[]);
    let mut b = f.raw(&router, Mode::Direct, &[]);
    let sql = "select $1::int4 + 1 as next, $2::text as label";
    assert_eq!(RawConn::status(&a.simple("begin")), 'T');
    a.send(&[parse("moving", sql, &[]), sync()]);
    assert_eq!(tags(&a.until_ready("Parse")), "1 Z");
    let first = a.value("select pg_backend_pid()::text");
    assert_eq!(RawConn::status(&a.simple("commit")), 'I');

    // b takes the only backend and keeps it.
    assert_eq!(RawConn::status(&b.simple("begin")), 'T');
    assert_eq!(b.value("select pg_backend_pid()::text"), first);

    a.send(&[describe(b'S', "moving"), sync()]);
    let replies = a.until_ready("Describe");
    assert_eq!(tags(&replies), "t T Z", "{:?}", errors(&replies));
    assert_eq!(parameter_description(&replies[0].1), [INT4, TEXT]);
    assert_eq!(
        row_description(&replies[1].1),
        [("next".to_owned(), INT4), ("label".to_owned(), TEXT)]
    );
    a.send(&[bind_execute("moving", &[Some("41"), Some("x")]), sync()]);
    let replies = a.until_ready("Bind");
    assert_eq!(tags(&replies), "2 D C Z", "{:?}", errors(&replies));
    assert_eq!(
        data_row(&replies[1].1),
        [Some("42".to_owned()), Some("x".to_owned())]
    );
    // b still holds the first backend, so all of that ran on another one.
    assert_ne!(a.value("select pg_backend_pid()::text"), first);
    assert_eq!(RawConn::status(&b.simple("commit")), 'I');
}

#[test]
fn parse_and_sync_without_execute_then_bind_after_another_client_used_the_backend() {
    let f = fixture();
    let router = f.router(&PoolSettings::new(1));
    let mut a = f.raw(&router, Mode::SslRequest, &[]);
    let mut b = f.raw(&router, Mode::SslRequest, &[]);
    a.send(&[parse("later", "select $1::int8 * 3", &[]), sync()]);
    assert_eq!(tags(&a.until_ready("Parse")), "1 Z");
    // b uses the same name for another statement on the same backend.
    b.send(&[
        parse("later", "select 'b later'", &[]),
        bind_execute("later", &[]),
        sync(),
    ]);
    assert_eq!(rows(&b.until_ready("b"), "1 2 D C Z", "b"), ["b later"]);
    a.send(&[bind_execute("later", &[Some("14")]), sync()]);
    assert_eq!(rows(&a.until_ready("a"), "2 D C Z", "a"), ["42"]);
    b.send(&[bind_execute("later", &[]), sync()]);
    assert_eq!(
        rows(&b.until_ready("b again"), "2 D C Z", "b again"),
        ["b later"]
    );
}

#[test]
fn unnamed_statement_survives_a_transaction_boundary() {
    let f = fixture();
    let router = f.router(&PoolSettings::new(1));
    let mut a = f.raw(&router, Mode::SslRequest, &[]);
    let mut b = f.raw(&router, Mode::Direct, &[]);
    a.send(&[parse("", "select $1::text || ' from a'", &[]), sync()]);
    assert_eq!(tags(&a.until_ready("Parse")), "1 Z");
    // b replaces the backend's unnamed statement with its own.
    b.send(&[parse("", "select 'b'", &[]), bind_execute("", &[]), sync()]);
    assert_eq!(rows(&b.until_ready("b"), "1 2 D C Z", "b"), ["b"]);
    a.send(&[bind_execute("", &[Some("bound later")]), sync()]);
    assert_eq!(
        rows(&a.until_ready("a"), "2 D C Z", "a"),
        ["bound later from a"]
    );
}

#[test]
fn reparse_of_a_name_in_use_is_42p05_and_the_connection_goes_on() {
    let f = fixture();
    let router = f.router(&PoolSettings::new(1));
    let mut a = f.raw(&router, Mode::SslRequest, &[]);
    let mut b = f.raw(&router, Mode::SslRequest, &[]);
    a.send(&[parse("s", "select 'first'", &[]), sync()]);
    assert_eq!(tags(&a.until_ready("Parse")), "1 Z");
    a.send(&[parse("s", "select 'second'", &[]), sync()]);
    let replies = a.until_ready("re-Parse");
    assert_eq!(tags(&replies), "E Z");
    assert_eq!(error_codes(&replies), ["42P05"]);
    assert_eq!(RawConn::status(&replies), 'I');
    b.value("select 'b in between'");
    // The statement under the name is still the first one.
    a.send(&[bind_execute("s", &[]), sync()]);
    assert_eq!(rows(&a.until_ready("Bind s"), "2 D C Z", "s"), ["first"]);
    // Inside a transaction the error aborts it, as on a real server.
    assert_eq!(RawConn::status(&a.simple("begin")), 'T');
    a.send(&[parse("s", "select 'third'", &[]), sync()]);
    let replies = a.until_ready("re-Parse in a transaction");
    assert_eq!(error_codes(&replies), ["42P05"]);
    assert_eq!(RawConn::status(&replies), 'E');
    assert_eq!(RawConn::status(&a.simple("rollback")), 'I');
    // After Close the name is free.
    a.send(&[close(b'S', "s"), parse("s", "select 'second'", &[]), sync()]);
    assert_eq!(tags(&a.until_ready("Close, Parse")), "3 1 Z");
    b.value("select 'b in between'");
    a.send(&[bind_execute("s", &[]), sync()]);
    assert_eq!(rows(&a.until_ready("Bind s"), "2 D C Z", "s"), ["second"]);
    // A failed Parse leaves no name behind.
    a.send(&[parse("bad", "select from no_such_table", &[]), sync()]);
    assert_eq!(error_codes(&a.until_ready("bad Parse")), ["42P01"]);
    a.send(&[
        parse("bad", "select 'fixed'", &[]),
        bind_execute("bad", &[]),
        sync(),
    ]);
    assert_eq!(
        rows(&a.until_ready("Parse again"), "1 2 D C Z", "bad"),
        ["fixed"]
    );
}

#[test]
fn unknown_statement_names_are_26000_for_bind_and_describe_and_close_completes() {
    let f = fixture();
    let router = f.router(&PoolSettings::new(1));
    let mut a = f.raw(&router, Mode::Direct, &[]);
    a.send(&[bind_execute("nope", &[]), sync()]);
    let replies = a.until_ready("Bind");
    assert_eq!(tags(&replies), "E Z");
    assert_eq!(error_codes(&replies), ["26000"]);
    a.send(&[describe(b'S', "nope"), sync()]);
    let replies = a.until_ready("Describe");
    assert_eq!(tags(&replies), "E Z");
    assert_eq!(error_codes(&replies), ["26000"]);
    a.send(&[close(b'S', "nope"), close(b'P', "nope"), sync()]);
    assert_eq!(tags(&a.until_ready("Close")), "3 3 Z");
    assert_eq!(a.value("select 'still fine'"), "still fine");
}

#[test]
fn flush_without_sync_keeps_the_backend_until_sync() {
    let f = fixture();
    let router = f.router(&PoolSettings::new(1));
    let mut a = f.raw(&router, Mode::SslRequest, &[]);
    let mut b = f.raw(&router, Mode::Direct, &[]);
    a.send(&[parse("held", "select 'held'::text", &[]), flush()]);
    let (tag, _) = a.next("ParseComplete after Flush");
    assert_eq!(char::from(tag), '1');
    // The backend is still a's: b's query waits.
    b.send(&[query("select 'b'")]);
    b.expect_silence(HELD_WINDOW, "b while a has flushed without Sync");
    a.send(&[bind_execute("held", &[]), sync()]);
    assert_eq!(rows(&a.until_ready("a"), "2 D C Z", "a"), ["held"]);
    assert_eq!(rows(&b.until_ready("b"), "T D C Z", "b"), ["b"]);
}

#[test]
fn a_client_stopped_halfway_through_its_next_message_holds_no_backend() {
    let f = fixture();
    let router = f.router(&PoolSettings::new(1));
    let mut a = f.raw(&router, Mode::SslRequest, &[]);
    let mut b = f.raw(&router, Mode::Direct, &[]);
    // A whole query with the start of the next one behind it in the same write (a Query, which
    // the router reads whole, then an Execute, which it would otherwise pass on as it comes),
    // and the next one before the answer (the first transaction is still running).
    for next in [query("select 'next'"), execute("", 0)] {
        let half = &next[..next.len() - 2];
        a.send(&[query("select pg_sleep(0.2)"), half.to_vec()]);
        assert_eq!(tags(&a.until_ready("a's whole query")), "T D C Z");
        // The backend went back with a's transaction: b gets it while a's bytes wait.
        assert_eq!(b.value("select 'b meanwhile'"), "b meanwhile");
        a.send(&[next[next.len() - 2..].to_vec()]);
        if next[0] == b'E' {
            // An Execute of no portal, then a Sync: PostgreSQL's own answer.
            a.send(&[sync()]);
            let replies = a.until_ready("a's Execute");
            assert_eq!(error_codes(&replies), ["34000"], "{}", tags(&replies));
        } else {
            assert_eq!(rows(&a.until_ready("a's next"), "T D C Z", "a"), ["next"]);
        }
    }
    assert_eq!(a.value("select 'a after'"), "a after");
}

#[test]
fn pipeline_error_with_a_delayed_sync_skips_to_the_sync_and_holds_the_backend() {
    let f = fixture();
    let router = f.router(&PoolSettings::new(1));
    let mut a = f.raw(&router, Mode::SslRequest, &[]);
    let mut b = f.raw(&router, Mode::SslRequest, &[]);
    // A run-time error (random() keeps the planner from folding it into a Bind-time error).
    a.send(&[
        parse("", "select 10 / (random() * 0)::int", &[]),
        bind_execute("", &[]),
        parse("", "select 'skipped'", &[]),
        bind_execute("", &[]),
        flush(),
    ]);
    let replies: Vec<Reply> = (0..3).map(|_| a.next("pipeline before Sync")).collect();
    assert_eq!(tags(&replies), "1 2 E");
    assert_eq!(error_codes(&replies), ["22012"]);
    a.expect_silence(HELD_WINDOW, "a: the rest of the pipeline is skipped");
    b.send(&[query("select 'b'")]);
    b.expect_silence(HELD_WINDOW, "b while a's pipeline waits for Sync");
    a.send(&[sync()]);
    let replies = a.until_ready("Sync");
    assert_eq!(tags(&replies), "Z");
    assert_eq!(RawConn::status(&replies), 'I');
    assert_eq!(rows(&b.until_ready("b"), "T D C Z", "b"), ["b"]);
    assert_eq!(a.value("select 'after'"), "after");
}

#[test]
fn pipelined_deallocate_then_parse_of_the_same_name() {
    let f = fixture();
    let router = f.router(&PoolSettings::new(1));
    let mut a = f.raw(&router, Mode::Direct, &[]);
    let mut b = f.raw(&router, Mode::SslRequest, &[]);
    a.send(&[parse("d", "select 'old'", &[]), sync()]);
    assert_eq!(tags(&a.until_ready("Parse")), "1 Z");
    for (deallocate, value) in [("DEALLOCATE ALL", "new"), ("DEALLOCATE d", "newer")] {
        b.value("select 'b in between'");
        a.send(&[
            query(deallocate),
            parse("d", &format!("select '{value}'"), &[]),
            bind_execute("d", &[]),
            sync(),
        ]);
        let replies = a.until_ready_n(2, deallocate);
        assert_eq!(
            rows(&replies, "C Z 1 2 D C Z", deallocate),
            [value],
            "{deallocate}"
        );
    }
    // b's statements are its own: a's DEALLOCATE ALL does not touch them.
    b.send(&[parse("d", "select 'b kept'", &[]), sync()]);
    assert_eq!(tags(&b.until_ready("b Parse")), "1 Z");
    a.send(&[query("DEALLOCATE ALL"), sync()]);
    assert_eq!(tags(&a.until_ready_n(2, "a DEALLOCATE ALL")), "C Z Z");
    b.send(&[bind_execute("d", &[]), sync()]);
    assert_eq!(rows(&b.until_ready("b Bind"), "2 D C Z", "b"), ["b kept"]);
}

#[test]
fn parse_and_close_batches_keep_reply_order() {
    let f = fixture();
    let router = f.router(&PoolSettings::new(1));
    let mut a = f.raw(&router, Mode::SslRequest, &[]);
    let mut b = f.raw(&router, Mode::Direct, &[]);
    a.send(&[
        parse("x", "select 'x1'", &[]),
        close(b'S', "x"),
        parse("x", "select 'x2'", &[]),
        close(b'S', "never"),
        parse("y", "select 'y1'", &[]),
        close(b'P', ""),
        sync(),
    ]);
    assert_eq!(tags(&a.until_ready("batch")), "1 3 1 3 1 3 Z");
    b.value("select 'b in between'");
    a.send(&[
        bind_execute("x", &[]),
        close(b'S', "y"),
        parse("y", "select 'y2'", &[]),
        bind_execute("y", &[]),
        sync(),
    ]);
    assert_eq!(
        rows(
            &a.until_ready("second batch"),
            "2 D C 3 1 2 D C Z",
            "second batch"
        ),
        ["x2", "y2"]
    );
}

#[test]
fn same_sql_under_different_names_in_two_clients() {
    let f = fixture();
    let router = f.router(&PoolSettings::new(1));
    let mut a = f.raw(&router, Mode::SslRequest, &[]);
    let mut b = f.raw(&router, Mode::Direct, &[]);
    let sql = "select $1::text || ' via the shared text'";
    a.send(&[parse("mine_a", sql, &[]), sync()]);
    assert_eq!(tags(&a.until_ready("a Parse")), "1 Z");
    b.send(&[parse("mine_b", sql, &[]), sync()]);
    assert_eq!(tags(&b.until_ready("b Parse")), "1 Z");
    for round in 0..3 {
        for (conn, name) in [(&mut a, "mine_a"), (&mut b, "mine_b")] {
            conn.send(&[bind_execute(name, &[Some(name)]), sync()]);
            assert_eq!(
                rows(&conn.until_ready(name), "2 D C Z", name),
                [format!("{name} via the shared text")],
                "round {round}"
            );
            // Each client knows only its own name.
            let other = if name == "mine_a" { "mine_b" } else { "mine_a" };
            conn.send(&[bind_execute(other, &[Some("x")]), sync()]);
            assert_eq!(error_codes(&conn.until_ready(other)), ["26000"], "{name}");
        }
    }
    // a closing its name leaves b's statement working.
    a.send(&[close(b'S', "mine_a"), sync()]);
    assert_eq!(tags(&a.until_ready("Close")), "3 Z");
    b.send(&[bind_execute("mine_b", &[Some("b")]), sync()]);
    assert_eq!(
        rows(&b.until_ready("b after a's Close"), "2 D C Z", "b"),
        ["b via the shared text"]
    );
    a.send(&[bind_execute("mine_a", &[Some("a")]), sync()]);
    assert_eq!(error_codes(&a.until_ready("a after Close")), ["26000"]);
}

/// Two tenants' schemas, `{prefix}1` and `{prefix}2`, whose tables of one name (`t`) differ:
/// one text column holding 'one', two int4 columns holding 2 and 3.
/// [`two_tenant_schemas`] under `prefix`, a router with a pool of one, and two clients of
/// it (SSLRequest and direct SSL).
fn two_tenants_on_one_backend(f: &Fixture, prefix: &str) -> (TestRouter, RawConn, RawConn) {
    two_tenant_schemas(f, prefix);
    let router = f.router(&PoolSettings::new(1));
    let a = f.raw(&router, Mode::SslRequest, &[]);
    let b = f.raw(&router, Mode::Direct, &[]);
    (router, a, b)
}

fn two_tenant_schemas(f: &Fixture, prefix: &str) {
    f.pg.psql_admin(&format!(
        "CREATE SCHEMA {prefix}1; CREATE TABLE {prefix}1.t (v text); \
         INSERT INTO {prefix}1.t VALUES ('one'); \
         CREATE SCHEMA {prefix}2; CREATE TABLE {prefix}2.t (v int, w int); \
         INSERT INTO {prefix}2.t VALUES (2, 3); \
         GRANT USAGE ON SCHEMA {prefix}1, {prefix}2 TO app; \
         GRANT SELECT ON {prefix}1.t, {prefix}2.t TO app"
    ));
}

/// The row shape (name, type) of `t` in each of [`two_tenant_schemas`].
fn tenant_columns() -> [Vec<(String, u32)>; 2] {
    [
        vec![("v".to_owned(), 25)],
        vec![("v".to_owned(), 23), ("w".to_owned(), 23)],
    ]
}

/// The row of `t` in each of [`two_tenant_schemas`].
fn tenant_rows() -> [Vec<Option<String>>; 2] {
    [
        vec![Some("one".to_owned())],
        vec![Some("2".to_owned()), Some("3".to_owned())],
    ]
}

/// Two clients `SET search_path` (after startup) to schemas whose tables of one name differ,
/// then prepare the same text: each, as a session of its own, is told its own schema's row
/// shape and reads it, on the one backend they share. (Under one name on the backends, the
/// second client's Describe would meet the first one's plan and fail with 0A000, which
/// PostgreSQL never answers a statement just parsed.)
#[test]
fn the_same_text_prepared_under_search_paths_set_later_is_each_clients_own() {
    let f = fixture();
    let (_router, mut a, mut b) = two_tenants_on_one_backend(f, "shp");
    assert_eq!(tags(&a.simple("SET search_path TO shp1")), "C Z");
    assert_eq!(tags(&b.simple("SET search_path TO shp2")), "C Z");
    let mut described = Vec::new();
    for conn in [&mut a, &mut b] {
        conn.send(&[
            parse("q", "select * from t", &[]),
            describe(b'S', "q"),
            sync(),
        ]);
        let replies = conn.until_ready("Parse and Describe");
        assert_eq!(tags(&replies), "1 t T Z", "{:?}", errors(&replies));
        described.push(row_description(&replies[2].1));
    }
    assert_eq!(described, tenant_columns());
    for round in 0..3 {
        for (conn, row) in [&mut a, &mut b].into_iter().zip(tenant_rows()) {
            conn.send(&[bind_execute("q", &[]), sync()]);
            let replies = conn.until_ready("Bind");
            assert_eq!(
                tags(&replies),
                "2 D C Z",
                "round {round}: {:?}",
                errors(&replies)
            );
            assert_eq!(data_row(&replies[1].1), row, "round {round}");
        }
    }
}

/// Schema-per-tenant applications on a transaction pooler pick the tenant in each
/// transaction (`BEGIN; SET LOCAL search_path TO tenant; ...`), and their drivers prepare the
/// same texts for every tenant. Two clients doing so for tenants whose tables of one name
/// differ each get their own tenant's rows in every later transaction, on the one backend they
/// share, as sessions do. (Under one name on the backend the second client's plan replaced
/// the first one's, and the first client's next Bind was refused with 0A000, which PostgreSQL
/// answers neither: its plan is the client's own, looked up again under the current
/// `search_path`.)
#[test]
fn statements_prepared_in_blocks_that_set_local_search_path_are_each_clients_own() {
    let f = fixture();
    let (_router, mut a, mut b) = two_tenants_on_one_backend(f, "shl");
    // A block for `schema`'s tenant: the statement prepared (and described) first if
    // `prepare`, then run; the replies to the batch.
    let block = |conn: &mut RawConn, schema: &str, prepare: bool| {
        assert_eq!(tags(&conn.simple("BEGIN")), "C Z");
        let set = format!("SET LOCAL search_path TO {schema}");
        assert_eq!(tags(&conn.simple(&set)), "C Z");
        let mut batch = Vec::new();
        if prepare {
            batch.extend([parse("q", "select * from t", &[]), describe(b'S', "q")]);
        }
        batch.extend([bind_execute("q", &[]), sync()]);
        conn.send(&batch);
        let replies = conn.until_ready(schema);
        assert_eq!(tags(&conn.simple("COMMIT")), "C Z");
        replies
    };
    let clients = [(&mut a, "shl1"), (&mut b, "shl2")];
    for ((conn, schema), columns) in clients.into_iter().zip(tenant_columns()) {
        let replies = block(conn, schema, true);
        assert_eq!(tags(&replies), "1 t T 2 D C Z", "{:?}", errors(&replies));
        assert_eq!(row_description(&replies[2].1), columns);
    }
    for round in 0..3 {
        let clients = [(&mut a, "shl1"), (&mut b, "shl2")];
        for ((conn, schema), row) in clients.into_iter().zip(tenant_rows()) {
            let replies = block(conn, schema, false);
            assert_eq!(
                tags(&replies),
                "2 D C Z",
                "round {round}, {schema}: {:?}",
                errors(&replies)
            );
            assert_eq!(data_row(&replies[1].1), row, "round {round}");
        }
    }
}

/// The same, with the tenant given as a parameter, the way to pick it without quoting it into
/// the text: `set_config('search_path', $1, true)` (PostgREST's every request sets
/// `search_path` and the role so), pipelined before the statements it is for. The router reads
/// the value from the Bind: one client runs it as a named statement prepared once (as hasql
/// does), the other as the unnamed statement of each batch (as libpq's `PQexecParams`), and
/// with `false` for the rest of the session on a third. (As written, `$1` named every tenant
/// alike: the second client's plan replaced the first one's under one name, and the first
/// client's next Bind was refused with 0A000.)
#[test]
fn statements_prepared_after_set_config_of_search_path_with_a_parameter_are_each_clients_own() {
    let f = fixture();
    let (router, mut a, mut b) = two_tenants_on_one_backend(f, "tpp");
    a.send(&[
        parse("pick", "select set_config('search_path', $1, true)", &[]),
        sync(),
    ]);
    assert_eq!(tags(&a.until_ready("Parse pick")), "1 Z");
    // A block for `schema`'s tenant on the client numbered `which`: the statement prepared
    // (and described) first if `prepare`, then run; the replies to the batch past the pick.
    let block = |conn: &mut RawConn, which: usize, schema: &str, prepare: bool| {
        assert_eq!(tags(&conn.simple("BEGIN")), "C Z");
        let mut batch = if which == 0 {
            vec![bind_execute("pick", &[Some(schema)])]
        } else {
            vec![
                parse("", "select set_config('search_path', $1, true)", &[]),
                bind_execute("", &[Some(schema)]),
            ]
        };
        if prepare {
            batch.extend([parse("q", "select * from t", &[]), describe(b'S', "q")]);
        }
        batch.extend([bind_execute("q", &[]), sync()]);
        conn.send(&batch);
        let mut replies = conn.until_ready(schema);
        assert_eq!(tags(&conn.simple("COMMIT")), "C Z");
        let skip = if which == 0 { 3 } else { 4 };
        assert_eq!(
            tags(&replies[..skip]),
            if which == 0 { "2 D C" } else { "1 2 D C" },
            "{schema}: {:?}",
            errors(&replies)
        );
        replies.drain(..skip);
        replies
    };
    let clients = [(&mut a, "tpp1"), (&mut b, "tpp2")];
    for (which, ((conn, schema), columns)) in clients.into_iter().zip(tenant_columns()).enumerate()
    {
        let replies = block(conn, which, schema, true);
        assert_eq!(tags(&replies), "1 t T 2 D C Z", "{:?}", errors(&replies));
        assert_eq!(row_description(&replies[2].1), columns);
    }
    for round in 0..3 {
        let clients = [(&mut a, "tpp1"), (&mut b, "tpp2")];
        for (which, ((conn, schema), row)) in clients.into_iter().zip(tenant_rows()).enumerate() {
            let replies = block(conn, which, schema, false);
            assert_eq!(
                tags(&replies),
                "2 D C Z",
                "round {round}, {schema}: {:?}",
                errors(&replies)
            );
            assert_eq!(data_row(&replies[1].1), row, "round {round}");
        }
    }
    // For the session: statements parsed in the same batch after it are the new schema's too
    // (the router reads the value back at the transaction's end for later ones).
    let mut c = f.raw(&router, Mode::Direct, &[]);
    c.send(&[
        parse("", "select set_config('search_path', $1, false)", &[]),
        bind_execute("", &[Some("tpp2")]),
        parse("q", "select * from t", &[]),
        describe(b'S', "q"),
        bind_execute("q", &[]),
        sync(),
    ]);
    let replies = c.until_ready("session set_config");
    assert_eq!(
        tags(&replies),
        "1 2 D C 1 t T 2 D C Z",
        "{:?}",
        errors(&replies)
    );
    assert_eq!(row_description(&replies[6].1), tenant_columns()[1]);
    for round in 0..2 {
        a.send(&[
            bind_execute("pick", &[Some("tpp1")]),
            bind_execute("q", &[]),
            sync(),
        ]);
        let replies = a.until_ready("a after c");
        assert_eq!(
            tags(&replies),
            "2 D C 2 D C Z",
            "round {round}: {:?}",
            errors(&replies)
        );
        assert_eq!(data_row(&replies[4].1), tenant_rows()[0]);
        c.send(&[bind_execute("q", &[]), sync()]);
        let replies = c.until_ready("c after a");
        assert_eq!(
            tags(&replies),
            "2 D C Z",
            "round {round}: {:?}",
            errors(&replies)
        );
        assert_eq!(data_row(&replies[1].1), tenant_rows()[1]);
    }
}

/// The same through tokio-postgres: each client picks its tenant in every transaction with
/// `set_config('search_path', $1, true)`, prepares `select * from t` in its first and runs
/// that statement in every later one, the two interleaved on a pool of one.
#[test]
fn tokio_postgres_tenants_picked_with_a_bound_set_config_keep_their_statements() {
    let f = fixture();
    two_tenant_schemas(f, "tpt");
    let router = f.router(&PoolSettings::new(1));
    block_on(async {
        let mut a = f.tp_connect(&router, TpNegotiation::Postgres).await;
        let mut b = f.tp_connect(&router, TpNegotiation::Direct).await;
        let mut statements = Vec::new();
        for (client, schema) in [(&mut a, "tpt1"), (&mut b, "tpt2")] {
            let tx = client.transaction().await.expect("begin");
            tx.execute("select set_config('search_path', $1, true)", &[&schema])
                .await
                .expect("set_config");
            statements.push(tx.prepare("select * from t").await.expect("prepare"));
            tx.commit().await.expect("commit");
        }
        assert_eq!(statements[0].columns().len(), 1);
        assert_eq!(statements[1].columns().len(), 2);
        for round in 0..4 {
            for (i, (client, schema)) in
                [(&mut a, "tpt1"), (&mut b, "tpt2")].into_iter().enumerate()
            {
                let tx = client.transaction().await.expect("begin");
                tx.execute(
                    "select set_config('search_path', $1::text, true)",
                    &[&schema],
                )
                .await
                .expect("set_config");
                let row = tx
                    .query_one(&statements[i], &[])
                    .await
                    .unwrap_or_else(|e| panic!("round {round}, {schema}: {e}"));
                if i == 0 {
                    assert_eq!(row.get::<_, &str>(0), "one", "round {round}");
                } else {
                    assert_eq!(row.get::<_, i32>(1), 3, "round {round}");
                }
                tx.commit().await.expect("commit");
            }
        }
    });
}

#[test]
fn same_statement_under_different_search_paths_reads_each_clients_schema() {
    let f = fixture();
    let router = f.router(&PoolSettings::new(1));
    let mut clients = [
        (
            f.raw(&router, Mode::SslRequest, &[("search_path", "s1")]),
            "in s1",
        ),
        (
            f.raw(&router, Mode::Direct, &[("search_path", "s2")]),
            "in s2",
        ),
    ];
    for (conn, _) in &mut clients {
        conn.send(&[parse("q", "select v from t", &[]), sync()]);
        assert_eq!(tags(&conn.until_ready("Parse")), "1 Z");
    }
    for round in 0..3 {
        for (conn, expected) in &mut clients {
            conn.send(&[bind_execute("q", &[]), sync()]);
            assert_eq!(
                rows(&conn.until_ready("Bind q"), "2 D C Z", expected),
                [*expected],
                "round {round}"
            );
            assert_eq!(conn.value("select v from t"), *expected, "round {round}");
        }
    }
    assert_eq!(clients[0].0.value("show search_path"), "s1");
    assert_eq!(clients[1].0.value("show search_path"), "s2");
}

/// A named statement whose Parse is longer than the router's buffers (an ORM's `IN ($1, ...,
/// $5000)`, or a long text): kept as a short one, run in later transactions and prepared
/// again on a backend that lost it (evicted by another client's, `max_prepared_statements =
/// 1`), also parsed and run in one pipeline; one past 1 MiB is refused with 54000 and the
/// session goes on. (Each named Parse over 20 KiB was refused.)
#[test]
fn named_statements_longer_than_the_routers_buffers_work_across_transactions() {
    let f = fixture();
    let mut settings = PoolSettings::new(1);
    settings.max_prepared_statements = Some(1);
    let router = f.router(&settings);
    let mut a = f.raw(&router, Mode::SslRequest, &[]);
    let mut b = f.raw(&router, Mode::Direct, &[]);
    let long =
        |n: usize, marker: &str| format!("select '{marker}' || length('{}') as len", "x".repeat(n));
    a.send(&[
        parse("long", &long(60_000, "a"), &[]),
        describe(b'S', "long"),
        sync(),
    ]);
    assert_eq!(tags(&a.until_ready("long Parse")), "1 t T Z");
    for round in 0..3 {
        // Another client's statement takes the backend's one place.
        b.send(&[
            parse(&format!("other{round}"), "select 'other'", &[]),
            bind_execute(&format!("other{round}"), &[]),
            sync(),
        ]);
        assert_eq!(
            rows(&b.until_ready("b"), "1 2 D C Z", "b"),
            ["other"],
            "round {round}"
        );
        a.send(&[bind_execute("long", &[]), sync()]);
        assert_eq!(
            rows(&a.until_ready("long Bind"), "2 D C Z", "long"),
            ["a60000"],
            "round {round}"
        );
    }
    // Parsed, bound and run in one pipeline, beside a short one.
    a.send(&[
        parse("long2", &long(40_000, "c"), &[]),
        parse("short", "select 'short'", &[]),
        bind_execute("long2", &[]),
        bind_execute("short", &[]),
        sync(),
    ]);
    let replies = a.until_ready("pipeline");
    assert_eq!(
        tags(&replies),
        "1 1 2 D C 2 D C Z",
        "{:?}",
        errors(&replies)
    );
    assert_eq!(data_row(&replies[3].1), [Some("c40000".to_owned())]);
    // A name in use is 42P05 however long the Parse.
    a.send(&[parse("long2", &long(30_000, "d"), &[]), sync()]);
    let replies = a.until_ready("re-Parse");
    assert_eq!(errors(&replies)[0].code, "42P05");
    // Past 1 MiB: refused, and the session goes on.
    a.send(&[parse("huge", &long(1 << 20, "e"), &[]), sync()]);
    let replies = a.until_ready("huge Parse");
    assert_eq!(tags(&replies), "E Z");
    assert_eq!(errors(&replies)[0].code, "54000", "{:?}", errors(&replies));
    assert_eq!(a.value("select 'after'"), "after");
    a.send(&[bind_execute("long", &[]), sync()]);
    assert_eq!(
        rows(&a.until_ready("long Bind"), "2 D C Z", "long at the end"),
        ["a60000"]
    );
}

/// The same through psycopg: an `IN` list of 5,000 parameters prepared (its Parse and its
/// Binds over the router's buffers), run in ten transactions by each of two clients on a pool
/// of one.
#[test]
fn psycopg_statement_with_five_thousand_parameters_is_prepared_across_transactions() {
    let f = fixture();
    let router = f.router(&PoolSettings::new(1));
    let rounds = 5;
    two_psycopg_clients(f, &router, PSYCOPG_LONG_STATEMENT, rounds);
}

#[test]
fn statements_evicted_inside_a_pipeline_are_prepared_again() {
    let f = fixture();
    let mut settings = PoolSettings::new(1);
    settings.max_prepared_statements = Some(2);
    let router = f.router(&settings);
    let mut a = f.raw(&router, Mode::SslRequest, &[]);
    let names = ["e1", "e2", "e3", "e4"];
    let mut batch: Vec<Vec<u8>> = names
        .iter()
        .map(|name| parse(name, &format!("select '{name}'"), &[]))
        .collect();
    batch.extend(names.iter().map(|name| bind_execute(name, &[])));
    batch.push(sync());
    a.send(&batch);
    assert_eq!(
        rows(
            &a.until_ready("four statements, room for two"),
            "1 1 1 1 2 D C 2 D C 2 D C 2 D C Z",
            "pipeline"
        ),
        names
    );
    let order = ["e4", "e1", "e3", "e2", "e1"];
    let mut batch: Vec<Vec<u8>> = order.iter().map(|name| bind_execute(name, &[])).collect();
    batch.push(sync());
    a.send(&batch);
    assert_eq!(
        rows(
            &a.until_ready("again, in another order"),
            "2 D C 2 D C 2 D C 2 D C 2 D C Z",
            "again"
        ),
        order
    );
}

/// A Parse of a text the pool's backends accepted before is answered by the router without a
/// backend (drivers prepare with a blocking round trip of their own); the statement it keeps
/// must be the same one, which a backend that has never had it is given when the client binds
/// it there.
#[test]
fn a_statement_parsed_without_a_backend_runs_on_one_that_never_had_it() {
    const SQL: &str = "select 'parsed idle'";
    let f = fixture();
    let router = f.router(&PoolSettings::new(2));
    let mut a = f.raw(&router, Mode::Direct, &[]);
    let mut b = f.raw(&router, Mode::SslRequest, &[]);
    let mut c = f.raw(&router, Mode::Direct, &[]);
    // a holds the first backend (X); b prepares the text on the second (Y).
    assert_eq!(tags(&a.simple("BEGIN")), "C Z");
    let x = a.value("select pg_backend_pid()");
    b.send(&[parse("mine", SQL, &[]), sync()]);
    assert_eq!(tags(&b.until_ready("b prepares on Y")), "1 Z");
    // c's Parse of the same text, with its Sync, is answered without a backend: X is held,
    // and Y is only lent for it if the router must.
    c.send(&[parse("also", SQL, &[]), sync()]);
    assert_eq!(tags(&c.until_ready("c prepares without a backend")), "1 Z");
    // b holds Y, X goes back: c binds its statement on X, which has never had it.
    assert_eq!(tags(&b.simple("BEGIN")), "C Z");
    assert_eq!(tags(&a.simple("COMMIT")), "C Z");
    c.send(&[
        bind_execute("also", &[]),
        parse("", "select pg_backend_pid()", &[]),
        bind_execute("", &[]),
        sync(),
    ]);
    let replies = c.until_ready("c binds on X");
    assert_eq!(tags(&replies), "2 D C 1 2 D C Z", "{:?}", errors(&replies));
    assert_eq!(data_row(&replies[1].1), [Some("parsed idle".to_owned())]);
    assert_eq!(data_row(&replies[5].1)[0].as_deref(), Some(x.as_str()));
    assert_eq!(tags(&b.simple("COMMIT")), "C Z");
}

/// The router closes a statement to make room, in a pipeline whose first message fails: the
/// backend skips the Close with everything up to the Sync, so it still has the statement, and
/// the router must not give it a Parse of it again (PostgreSQL's 42P05 "already exists").
#[test]
fn a_statement_whose_eviction_the_backend_skipped_after_an_error_still_runs() {
    let f = fixture();
    let mut settings = PoolSettings::new(1);
    settings.max_prepared_statements = Some(1);
    let router = f.router(&settings);
    let mut a = f.raw(&router, Mode::Direct, &[]);
    a.send(&[parse("k1", "select 'k1'", &[]), sync()]);
    assert_eq!(tags(&a.until_ready("k1 prepared")), "1 Z");
    a.send(&[
        bind_execute("missing", &[]),
        parse("k2", "select 'k2'", &[]),
        sync(),
    ]);
    let replies = a.until_ready("a failing pipeline");
    assert_eq!(error_codes(&replies), ["26000"]);
    assert_eq!(tags(&replies), "E Z");
    for round in 0..2 {
        a.send(&[bind_execute("k1", &[]), sync()]);
        assert_eq!(
            rows(&a.until_ready("k1 after"), "2 D C Z", "k1"),
            ["k1"],
            "round {round}"
        );
    }
    // k2 was never prepared (the backend skipped its Parse): 26000, as on a server.
    a.send(&[bind_execute("k2", &[]), sync()]);
    assert_eq!(error_codes(&a.until_ready("k2")), ["26000"]);
}

// ---------------------------------------------------------------------------------------------
// 6. Startup parameters and SET follow each client

#[test]
fn startup_parameters_and_set_follow_each_client_across_shared_backends() {
    const CLIENTS: usize = 100;
    const ROUNDS: usize = 6;
    let f = fixture();
    let router = f.router(&PoolSettings::new(2));
    let logins = Turns::new(4);
    thread::scope(|s| {
        let workers: Vec<_> = (0..CLIENTS)
            .map(|i| {
                let router = &router;
                let logins = &logins;
                s.spawn(move || {
                    // 24 zones, so neighbours differ; the application names all do.
                    let zone = i % 24;
                    let mut timezone = if zone < 12 {
                        format!("Etc/GMT+{}", zone + 1)
                    } else {
                        format!("Etc/GMT-{}", zone - 11)
                    };
                    let mut app = format!("client-{i}");
                    let mode = if i % 2 == 0 {
                        Mode::SslRequest
                    } else {
                        Mode::Direct
                    };
                    // Logins take turns, four at a time: SCRAM costs the (debug) router and
                    // each client real CPU, and a hundred at once on two cores could pass
                    // timeouts.startup; the transactions are what run all at once.
                    let mut conn = {
                        let _turn = logins.enter();
                        f.raw(
                            router,
                            mode,
                            &[("application_name", &app), ("TimeZone", &timezone)],
                        )
                    };
                    assert_eq!(conn.reported("TimeZone"), Some(timezone.as_str()), "{i}");
                    assert_eq!(conn.reported("application_name"), Some(app.as_str()), "{i}");
                    for round in 0..ROUNDS {
                        let what = format!("client {i} round {round}");
                        assert_eq!(RawConn::status(&conn.simple("begin")), 'T', "{what}");
                        assert_eq!(conn.value("show TimeZone"), timezone, "{what}");
                        assert_eq!(
                            conn.value("select current_setting('application_name')"),
                            app,
                            "{what}"
                        );
                        assert_eq!(RawConn::status(&conn.simple("commit")), 'I', "{what}");
                        assert_eq!(
                            conn.value(
                                "select current_setting('TimeZone') || ' ' || \
                                 current_setting('application_name')"
                            ),
                            format!("{timezone} {app}"),
                            "{what}"
                        );
                        if round == 3 && i % 2 == 0 {
                            // SET outside a transaction: reported, and kept from now on.
                            let replies = conn.simple("SET TimeZone = 'UTC'");
                            let reported: Vec<_> = replies
                                .iter()
                                .filter(|(tag, _)| *tag == b'S')
                                .map(|(_, body)| parameter_status(body))
                                .collect();
                            assert_eq!(
                                reported,
                                [("TimeZone".to_owned(), "UTC".to_owned())],
                                "{what}"
                            );
                            timezone = "UTC".to_owned();
                            app = format!("client-{i}-renamed");
                            let errors = errors(&conn.simple(&format!(
                                "SET application_name = {}",
                                quote_literal(&app)
                            )));
                            assert!(errors.is_empty(), "{what}: {errors:?}");
                        }
                        if round == 5 && i % 2 == 1 {
                            // SET inside a transaction that rolls back: gone with it.
                            conn.simple("begin");
                            conn.simple("SET TimeZone = 'Asia/Tokyo'");
                            assert_eq!(conn.value("show TimeZone"), "Asia/Tokyo", "{what}");
                            assert_eq!(RawConn::status(&conn.simple("rollback")), 'I');
                        }
                    }
                })
            })
            .collect();
        for (i, worker) in workers.into_iter().enumerate() {
            if let Err(panic) = worker.join() {
                std::panic::resume_unwind(Box::new(format!("client {i}: {panic:?}")));
            }
        }
    });
}

/// At most `n` threads at a time inside [`Turns::enter`].
struct Turns {
    free: std::sync::Mutex<usize>,
    freed: std::sync::Condvar,
}

/// A turn, given back when dropped.
struct Turn<'a>(&'a Turns);

impl Turns {
    fn new(n: usize) -> Turns {
        Turns {
            free: std::sync::Mutex::new(n),
            freed: std::sync::Condvar::new(),
        }
    }

    fn enter(&self) -> Turn<'_> {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        while *free == 0 {
            free = self.freed.wait(free).unwrap_or_else(|p| p.into_inner());
        }
        *free -= 1;
        Turn(self)
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.0.freed.notify_one();
    }
}

// ---------------------------------------------------------------------------------------------
// 7. A backend killed mid-transaction

#[test]
fn a_backend_killed_mid_transaction_fails_only_its_client() {
    let f = fixture();
    let router = f.router(&PoolSettings::new(2));
    let mut a = f.raw(&router, Mode::SslRequest, &[]);
    let stop = AtomicBool::new(false);
    let others_done = AtomicUsize::new(0);
    thread::scope(|s| {
        // Stops the other client however this thread leaves the scope (a failed assert too).
        let _stop = StopOnDrop(&stop);
        // Another client keeps running transactions on the other backend all along.
        let other = s.spawn(|| {
            let mut b = f.raw(&router, Mode::Direct, &[]);
            while !stop.load(Ordering::Relaxed) {
                assert_eq!(RawConn::status(&b.simple("begin")), 'T');
                assert_eq!(b.value("select 'b'"), "b");
                assert_eq!(RawConn::status(&b.simple("commit")), 'I');
                others_done.fetch_add(1, Ordering::Relaxed);
            }
        });
        assert_eq!(RawConn::status(&a.simple("begin")), 'T');
        let pid = a.value("select pg_backend_pid()::text");
        assert_eq!(
            f.pg.psql_admin(&format!("select pg_terminate_backend({pid})")),
            "t"
        );
        f.pg.wait_for_value_within(
            &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}"),
            "0",
            QUICK,
        );
        let before = others_done.load(Ordering::Relaxed);
        // The error may come at once (as PostgreSQL itself sends it) or as the answer to the
        // next query; either way before a ReadyForQuery, and the connection stays open.
        a.send(&[query("select 'after the kill'")]);
        let mut codes = Vec::new();
        let status = loop {
            match a.next("after the kill") {
                (b'E', body) => codes.push(parse_error(&body).code),
                (b'Z', body) if !codes.is_empty() => break body.first().copied(),
                (b'Z', _) => panic!("the killed transaction went on without an error"),
                _ => {}
            }
        };
        assert!(
            codes.iter().all(|c| c == "57P01" || c == "08006") && codes.len() == 1,
            "{codes:?}"
        );
        // The transaction block is gone with its backend, as after any error in it: the
        // client must roll back (a COMMIT now cannot report success for work that was lost).
        assert_eq!(status, Some(b'E'), "aborted transaction block");
        let replies = a.simple("select 'still aborted'");
        assert_eq!(error_codes(&replies), ["25P02"]);
        assert_eq!(RawConn::status(&replies), 'E');
        let replies = a.simple("commit");
        assert_eq!(
            tags(&replies),
            "C Z",
            "COMMIT of an aborted block: ROLLBACK"
        );
        assert_eq!(RawConn::status(&replies), 'I');
        // The next transaction works, on a new backend; stale replies of the query above (if
        // the error came unasked) are skipped by their text.
        a.send(&[query("select 'next ' || pg_backend_pid()")]);
        let mut next = None;
        loop {
            match a.next("the next transaction") {
                (b'E', body) => panic!("next transaction: {:?}", parse_error(&body)),
                (b'D', body) => {
                    let value = data_row(&body).remove(0).expect("not NULL");
                    if let Some(rest) = value.strip_prefix("next ") {
                        next = Some(rest.to_owned());
                    }
                }
                (b'Z', _) if next.is_some() => break,
                _ => {}
            }
        }
        assert_ne!(next.as_deref(), Some(pid.as_str()));
        assert_eq!(RawConn::status(&a.simple("begin")), 'T');
        assert_eq!(a.value("select 'works'"), "works");
        assert_eq!(RawConn::status(&a.simple("commit")), 'I');
        // The other client went on meanwhile.
        let deadline = Instant::now() + QUICK;
        while others_done.load(Ordering::Relaxed) < before + 5 {
            assert!(Instant::now() < deadline, "the other client stalled");
            thread::sleep(Duration::from_millis(10));
        }
        stop.store(true, Ordering::Relaxed);
        other.join().expect("the other client saw no error");
    });
}

/// Sets its flag when dropped.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------------------------
// 8. Cancel

#[test]
fn psycopg_cancel_stops_the_running_query_only_and_the_pid_is_the_routers() {
    let f = fixture();
    let router = f.router(&PoolSettings::new(2));
    for negotiation in [SslNegotiation::Postgres, SslNegotiation::Direct] {
        let dsn = f.libpq(&router, negotiation).to_string();
        let out = run_python(
            PSYCOPG_CANCEL,
            &[&dsn, &f.admin_dsn().to_string(), APP_ROLE, "2"],
        );
        assert_eq!(
            out,
            "busy 57014 True works\n\
             busy 57014 True works\n\
             idle done works\n\
             pid True 0\n",
            "{negotiation:?}"
        );
    }
}

#[test]
fn tokio_postgres_cancel_reaches_the_backend_from_either_worker() {
    const ROUNDS: usize = 4;
    const SLEEP: &str = "select pg_sleep(9.5)";
    let f = fixture();
    let mut settings = PoolSettings::new(2);
    settings.workers = 2;
    let router = f.router(&settings);
    block_on(async {
        let admin = f.tp_admin().await;
        for round in 0..ROUNDS {
            let negotiation = if round % 2 == 0 {
                TpNegotiation::Postgres
            } else {
                TpNegotiation::Direct
            };
            let client = Arc::new(f.tp_connect(&router, negotiation).await);
            let (pid, _) = cancel_key(&client).await;
            let real = client
                .query_one("select pg_backend_pid()", &[])
                .await
                .expect("pid")
                .get::<_, i32>(0);
            assert_ne!(pid, real, "round {round}: BackendKeyData names a backend");
            let listed = admin
                .query_one(
                    "select count(*) from pg_stat_activity where pid = $1",
                    &[&pid],
                )
                .await
                .expect("pg_stat_activity")
                .get::<_, i64>(0);
            assert_eq!(
                listed, 0,
                "round {round}: BackendKeyData pid is a backend's"
            );
            let sleeper = tokio::spawn({
                let client = client.clone();
                async move {
                    let start = Instant::now();
                    (client.simple_query(SLEEP).await.map(drop), start.elapsed())
                }
            });
            let deadline = Instant::now() + QUICK;
            loop {
                let active = admin
                    .query_one(
                        "select count(*) from pg_stat_activity \
                         where usename = $1 and query = $2 and state = 'active'",
                        &[&APP_ROLE, &SLEEP],
                    )
                    .await
                    .expect("pg_stat_activity")
                    .get::<_, i64>(0);
                if active == 1 {
                    break;
                }
                assert!(Instant::now() < deadline, "round {round}: never active");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            client
                .cancel_token()
                .cancel_query(MakeRustls::new(f.certs.client_config()))
                .await
                .expect("send the cancel request");
            let (result, elapsed) = sleeper.await.expect("query task");
            let error = result.expect_err("the query is canceled");
            assert_eq!(sqlstate(&error), &SqlState::QUERY_CANCELED, "round {round}");
            assert!(elapsed < QUICK, "round {round}: took {elapsed:?}");
            let row = client
                .query_one("select 'works'", &[])
                .await
                .expect("after");
            assert_eq!(row.get::<_, &str>(0), "works");
        }
    });
}

// ---------------------------------------------------------------------------------------------
// 9. Timeouts and limits

/// Reads the FATAL ErrorResponse that ends `conn` (before it, only NOTICEs), checks that the
/// connection then closes, and returns it with the time it took.
fn expect_fatal_close(conn: &mut RawConn, what: &str) -> (branchgate_e2e::raw::PgError, Duration) {
    let start = Instant::now();
    loop {
        match conn.next(what) {
            (b'E', body) => {
                let error = parse_error(&body);
                let elapsed = start.elapsed();
                assert_eq!(error.severity, "FATAL", "{what}: {error:?}");
                assert_eq!(error.code.len(), 5, "{what}: {error:?}");
                assert_ne!(error.code, "XX000", "{what}: {error:?}");
                assert_eq!(conn.next_or_end(), None, "{what}: closed after the FATAL");
                return (error, elapsed);
            }
            (b'N', _) => {}
            (tag, body) => panic!(
                "{what}: expected FATAL, got {:?} {:?}",
                char::from(tag),
                String::from_utf8_lossy(&body)
            ),
        }
    }
}

#[test]
fn query_wait_timeout_ends_the_queued_client_with_pgbouncers_message() {
    let f = fixture();
    let mut settings = PoolSettings::new(1);
    settings.query_wait_timeout = Some(Duration::from_secs(1));
    let router = f.router(&settings);
    let mut holder = f.raw(&router, Mode::SslRequest, &[]);
    let mut waiter = f.raw(&router, Mode::Direct, &[]);
    assert_eq!(RawConn::status(&holder.simple("begin")), 'T');
    waiter.send(&[query("select 'never'")]);
    let (error, elapsed) = expect_fatal_close(&mut waiter, "queued client");
    assert_eq!(error.message, "query_wait_timeout", "{error:?}");
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(4),
        "after {elapsed:?}"
    );
    // The holder's transaction is untouched.
    assert_eq!(holder.value("select 'still mine'"), "still mine");
    assert_eq!(RawConn::status(&holder.simple("commit")), 'I');
    // The client that gave up left the line: the one backend came back to the pool, not to
    // it, and serves the next transaction (a backend lost to it would time this one out).
    assert_eq!(holder.value("select 'served again'"), "served again");
}

#[test]
fn a_client_queued_over_five_seconds_gets_a_notice_then_its_answer() {
    let f = fixture();
    let mut settings = PoolSettings::new(1);
    settings.query_wait_timeout = Some(Duration::from_secs(30));
    let router = f.router(&settings);
    let mut holder = f.raw(&router, Mode::SslRequest, &[]);
    let mut waiter = f.raw(&router, Mode::Direct, &[]);
    assert_eq!(RawConn::status(&holder.simple("begin")), 'T');
    let start = Instant::now();
    waiter.send(&[query("select 'served'")]);
    let (tag, body) = waiter.next("the queued NOTICE");
    let elapsed = start.elapsed();
    assert_eq!(char::from(tag), 'N', "{:?}", String::from_utf8_lossy(&body));
    let notice = parse_error(&body);
    assert_eq!(notice.severity, "NOTICE", "{notice:?}");
    // PgBouncer 1.25's words and code, for whatever was written to look for them.
    assert_eq!(
        (notice.code.as_str(), notice.message.as_str()),
        (
            "00000",
            "No server connection available in postgres backend, client being queued"
        ),
    );
    assert!(
        elapsed >= QUEUED_NOTICE_AFTER - Duration::from_millis(100)
            && elapsed < QUEUED_NOTICE_AFTER + QUICK,
        "NOTICE after {elapsed:?}"
    );
    assert_eq!(RawConn::status(&holder.simple("commit")), 'I');
    assert_eq!(
        rows(&waiter.until_ready("served"), "T D C Z", "waiter"),
        ["served"]
    );
}

/// `query_wait_notify` (PgBouncer's name) moves the NOTICE; zero turns it off.
#[test]
fn query_wait_notify_sets_when_a_queued_client_is_told_and_zero_turns_it_off() {
    let f = fixture();
    let mut settings = PoolSettings::new(1);
    settings.query_wait_timeout = Some(Duration::from_secs(30));
    settings.query_wait_notify = Some(Duration::from_secs(1));
    let soon = f.router(&settings);
    settings.query_wait_notify = Some(Duration::ZERO);
    let never = f.router(&settings);
    for (router, notify) in [(&soon, true), (&never, false)] {
        let mut holder = f.raw(router, Mode::Direct, &[]);
        let mut waiter = f.raw(router, Mode::Direct, &[]);
        assert_eq!(RawConn::status(&holder.simple("begin")), 'T');
        let start = Instant::now();
        waiter.send(&[query("select 'served'")]);
        if notify {
            let (tag, body) = waiter.next("the queued NOTICE");
            let elapsed = start.elapsed();
            assert_eq!(char::from(tag), 'N', "{:?}", String::from_utf8_lossy(&body));
            assert!(
                elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(1) + QUICK,
                "NOTICE after {elapsed:?}"
            );
        } else {
            // Held past the default's 5 s: nothing may arrive before the answer.
            waiter.expect_silence(
                QUEUED_NOTICE_AFTER + Duration::from_secs(1),
                "a client queued with query_wait_notify = 0",
            );
        }
        assert_eq!(RawConn::status(&holder.simple("commit")), 'I');
        assert_eq!(
            rows(&waiter.until_ready("served"), "T D C Z", "waiter"),
            ["served"]
        );
    }
}

#[test]
fn idle_transaction_timeout_closes_the_client_and_frees_the_backend() {
    let f = fixture();
    let mut settings = PoolSettings::new(1);
    settings.idle_transaction_timeout = Some(Duration::from_secs(1));
    let router = f.router(&settings);
    let mut idle = f.raw(&router, Mode::SslRequest, &[]);
    let mut next = f.raw(&router, Mode::Direct, &[]);
    assert_eq!(RawConn::status(&idle.simple("begin")), 'T');
    let errors_seen = errors(&idle.simple("insert into pooled_items values ('idle tx', 1)"));
    assert!(errors_seen.is_empty(), "{errors_seen:?}");
    let (error, elapsed) = expect_fatal_close(&mut idle, "idle in transaction");
    assert!(
        error.message.contains("idle transaction timeout"),
        "{error:?}"
    );
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(4),
        "after {elapsed:?}"
    );
    assert_eq!(next.value("select now() = statement_timestamp()"), "t");
    assert_eq!(
        next.value("select count(*) from pooled_items where client = 'idle tx'"),
        "0"
    );
    // A query running longer than the timeout in a transaction is not idle.
    let mut busy = f.raw(&router, Mode::SslRequest, &[]);
    assert_eq!(RawConn::status(&busy.simple("begin")), 'T');
    let replies = busy.simple("select pg_sleep(1.5)::text");
    assert_eq!(tags(&replies), "T D C Z", "{:?}", errors(&replies));
    assert_eq!(RawConn::status(&busy.simple("commit")), 'I');
    // A Flush without Sync holds the backend (its unnamed statement lives there): held idle
    // that long, the client is closed the same way.
    let mut flushed = f.raw(&router, Mode::SslRequest, &[]);
    flushed.send(&[parse("", "select 1", &[]), flush()]);
    assert_eq!(flushed.next("ParseComplete after a Flush").0, b'1');
    let (error, elapsed) = expect_fatal_close(&mut flushed, "idle after a Flush");
    assert!(
        error.message.contains("idle transaction timeout"),
        "{error:?}"
    );
    assert!(elapsed >= Duration::from_millis(900), "after {elapsed:?}");
    // Outside a transaction, a client stopped halfway through a query too long to be read
    // whole (so its start is on the backend already) is held to the same bound.
    let mut halfway = f.raw(&router, Mode::SslRequest, &[]);
    let long = query(&format!("select '{}'", "x".repeat(64 * 1024)));
    halfway.send(&[long[..long.len() / 2].to_vec()]);
    let (error, elapsed) = expect_fatal_close(&mut halfway, "halfway through a long query");
    assert!(
        error.message.contains("idle transaction timeout"),
        "{error:?}"
    );
    assert!(elapsed >= Duration::from_millis(900), "after {elapsed:?}");
    assert_eq!(
        next.value("select 'the backend is back'"),
        "the backend is back"
    );
}

/// A client that stops reading its replies holds its backend: the router stops reading the
/// backend once the client's socket is full, and the backend waits in its send. Nothing
/// bounded that wait; with `idle_transaction_timeout` set, a client that takes none of its
/// replies for that long is closed (without a word: its TLS stream may stop mid-record) and
/// its backend with it, so the pool's other clients are served.
#[test]
fn a_client_that_stops_reading_its_replies_is_closed_after_idle_transaction_timeout() {
    let f = fixture();
    let mut settings = PoolSettings::new(1);
    settings.idle_transaction_timeout = Some(Duration::from_secs(1));
    let router = f.router(&settings);
    let mut stalled = f.raw(&router, Mode::SslRequest, &[]);
    let mut next = f.raw(&router, Mode::Direct, &[]);
    let first = stalled.value("select pg_backend_pid()::text");
    // 64 MiB of rows: more than the sockets between the server and the client hold.
    stalled.send(&[query(
        "select repeat('x', 1048576) from generate_series(1, 64)",
    )]);
    assert_eq!(next.value("select 'served'"), "served");
    assert_ne!(next.value("select pg_backend_pid()::text"), first);
    f.pg.wait_for_value_within(
        &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {first}"),
        "0",
        QUICK,
    );
    let read = stalled.read_until_closed(Duration::from_secs(10), "the stalled client");
    assert!(read < 64 << 20, "the whole result was sent ({read} bytes)");
}

#[test]
fn client_idle_timeout_closes_an_idle_client_but_not_a_busy_one() {
    let f = fixture();
    let mut settings = PoolSettings::new(1);
    settings.client_idle_timeout = Some(Duration::from_secs(1));
    let router = f.router(&settings);
    let mut idle = f.raw(&router, Mode::SslRequest, &[]);
    let mut busy = f.raw(&router, Mode::Direct, &[]);
    assert_eq!(idle.value("select 'then idle'"), "then idle");
    let start = Instant::now();
    idle.expect_silence(
        Duration::from_millis(700),
        "idle client before client_idle_timeout",
    );
    // Every 200 ms a query: never idle for a second.
    while start.elapsed() < Duration::from_millis(1500) {
        assert_eq!(busy.value("select 'busy'"), "busy");
        thread::sleep(Duration::from_millis(200));
    }
    let (error, elapsed) = expect_fatal_close(&mut idle, "idle client");
    assert_eq!(error.message, "client_idle_timeout", "{error:?}");
    assert!(
        start.elapsed() + elapsed < Duration::from_secs(4),
        "closed after {:?}",
        start.elapsed() + elapsed
    );
    assert_eq!(busy.value("select 'still here'"), "still here");
}

#[test]
fn max_client_connections_per_branch_refuses_the_next_login_with_53300() {
    let f = fixture();
    let mut settings = PoolSettings::new(1);
    settings.max_client_connections = Some(3);
    let router = f.router(&settings);
    let mut clients: Vec<RawConn> = (0..3)
        .map(|_| f.raw(&router, Mode::SslRequest, &[]))
        .collect();
    let connect = || {
        RawConn::try_connect(
            router.pooled_addr(),
            f.certs.client_config(),
            Mode::Direct,
            APP_USER,
            APP_PASSWORD,
            &[],
        )
    };
    let error = connect().err().expect("a fourth client is refused");
    assert_eq!(
        (error.severity.as_str(), error.code.as_str()),
        ("FATAL", "53300"),
        "{error:?}"
    );
    for conn in &mut clients {
        assert_eq!(conn.value("select 'admitted'"), "admitted");
    }
    clients.pop().expect("a client").terminate();
    let deadline = Instant::now() + QUICK;
    let mut again = loop {
        match connect() {
            Ok(conn) => break conn,
            Err(error) => {
                assert_eq!(error.code, "53300", "{error:?}");
                assert!(Instant::now() < deadline, "the freed slot never came back");
                thread::sleep(Duration::from_millis(20));
            }
        }
    };
    assert_eq!(again.value("select 'in'"), "in");
}

// ---------------------------------------------------------------------------------------------
// 10. A client leaving mid-transaction

#[test]
fn a_client_leaving_mid_transaction_does_not_hand_its_transaction_on() {
    let f = fixture();
    let router = f.router(&PoolSettings::new(1));
    let mut next = f.raw(&router, Mode::Direct, &[]);
    for terminate in [false, true] {
        let mut leaver = f.raw(&router, Mode::SslRequest, &[]);
        assert_eq!(RawConn::status(&leaver.simple("begin")), 'T');
        let inserted = errors(&leaver.simple("insert into pooled_items values ('left', 1)"));
        assert!(inserted.is_empty(), "{inserted:?}");
        let pid = leaver.value("select pg_backend_pid()::text");
        if terminate {
            leaver.terminate();
        } else {
            leaver.drop_abruptly();
        }
        assert_eq!(
            next.value("select now() = statement_timestamp()"),
            "t",
            "terminate: {terminate}"
        );
        assert_eq!(
            next.value("select count(*) from pooled_items where client = 'left'"),
            "0",
            "terminate: {terminate}"
        );
        assert_ne!(next.value("select pg_backend_pid()::text"), pid);
        // The backend was closed, not returned.
        f.pg.wait_for_value_within(
            &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}"),
            "0",
            QUICK,
        );
    }
}
