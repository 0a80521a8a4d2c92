//! The pooled port (transaction pooling, issue 8) over a backend's life and the router's:
//! `min_pool_size` pre-warming, `server_idle_timeout` and `server_lifetime`, a password reset
//! through the real binary, a catalog reload resizing a pool, cancels racing releases, COPY,
//! pipelined batches, SQL-level PREPARE and DISCARD ALL, the shutdown drain, and messages too
//! long for one read. Against a real PostgreSQL 15, always over TLS, with psql, tokio-postgres
//! and a byte-level client.
//!
//! One PostgreSQL server per binary; every test starts its own router (one worker: pools are per
//! worker until a branch lives on one worker) and logs in with a role of its own, so its
//! backends can be counted in pg_stat_activity by user name while other tests run.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use branchgate_e2e::binary::{branchgate, wait_for};
use branchgate_e2e::pg::quote_literal;
use branchgate_e2e::raw::{
    self, bind_binary, bind_execute, cancel_request, close, connect_tls, describe, error_codes,
    errors, execute, first_column, flush, message, parse, parse_error, query, request,
    row_description, sync, tags, Mode, PgError, RawConn, Reply, SSL_REQUEST_CODE,
};
use branchgate_e2e::tokio_tls::{assert_db_error, block_on, tp_connect_with, MakeRustls};
use branchgate_e2e::tp_session::Session;
use branchgate_e2e::{metrics, tools};
use branchgate_e2e::{BranchSpec, Certs, Conninfo, PgServer, PoolSettings, TestRouter};
use futures_util::SinkExt;
use tokio_postgres::config::SslMode;
use tokio_postgres::error::SqlState;

const BRANCH: &str = "b1";
/// One role per test that watches its backends, plus `app` for the others.
const ROLES: [&str; 19] = [
    "app", "warm", "idler", "aged", "rst", "grow", "shrink", "canc", "quiet", "copier", "piper",
    "drain", "big", "ddl", "herd", "shape", "ptypes", "fresh", "olds",
];

/// A bound on anything that should take milliseconds (a handover, a cancel, a FATAL).
const QUICK: Duration = Duration::from_secs(3);
/// The router looks after its pools every second: a few rounds of that.
const MAINTENANCE: Duration = Duration::from_secs(5);
/// How long a client that the router must hold back is watched for a premature answer.
const HELD_WINDOW: Duration = Duration::from_millis(400);
/// How long a psql script may run before the test calls it stuck.
const PSQL_DEADLINE: Duration = Duration::from_secs(60);
/// What a client reads when its role's password was reset.
const PASSWORD_RESET_MESSAGE: &str = "terminating connection because the role's password was reset";
/// What a client reads when the shutdown's drain is over.
const ADMIN_SHUTDOWN_MESSAGE: &str = "terminating connection due to administrator command";
/// README's refusal of SQL-level PREPARE on the pooled port.
const PREPARE_REFUSED: &str = "SQL-level PREPARE is not supported on the pooled port: use \
                               protocol-level prepared statements (your driver's), or the \
                               direct port";

// ---------------------------------------------------------------------------------------------
// Fixture

struct Fixture {
    certs: Certs,
    pg: PgServer,
    /// Each role's SCRAM verifier as created (the reset test changes `rst`'s on the server).
    verifiers: HashMap<&'static str, String>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let pg = PgServer::start_primary();
        let mut verifiers = HashMap::new();
        for role in ROLES {
            pg.create_role(role, &password(role));
            verifiers.insert(role, pg.role_verifier(role));
        }
        pg.psql_admin(
            "CREATE TABLE lc_copy (client text NOT NULL, n int NOT NULL, v text); \
             GRANT ALL ON lc_copy TO copier; \
             CREATE TABLE lc_drain (v text NOT NULL); GRANT ALL ON lc_drain TO drain; \
             CREATE TABLE lc_ddl (a int); INSERT INTO lc_ddl VALUES (1); \
             GRANT ALL ON lc_ddl TO ddl; \
             CREATE TABLE lc_shape (a int); INSERT INTO lc_shape VALUES (1); \
             GRANT ALL ON lc_shape TO shape; \
             CREATE TABLE lc_types (a int); GRANT ALL ON lc_types TO ptypes; \
             CREATE TABLE lc_fresh (a int); GRANT ALL ON lc_fresh TO fresh; \
             CREATE TABLE lc_fresh_rows (a int); INSERT INTO lc_fresh_rows VALUES (7); \
             GRANT ALL ON lc_fresh_rows TO fresh; \
             CREATE TABLE lc_olds (a int); INSERT INTO lc_olds VALUES (7); \
             GRANT ALL ON lc_olds TO olds",
        );
        Fixture {
            certs: Certs::generate(),
            pg,
            verifiers,
        }
    })
}

/// The password `role` was created with.
fn password(role: &str) -> String {
    format!("pscale_pw_lifecycle_{role}_Q7")
}

/// The user name of `role` on the test branch.
fn user(role: &str) -> String {
    format!("{role}.{BRANCH}")
}

impl Fixture {
    /// tokio-postgres on the pooled port as `role` (SSLRequest, TLS required).
    async fn tokio_postgres(&self, router: &TestRouter, role: &str) -> tokio_postgres::Client {
        let mut config = tokio_postgres::Config::new();
        config
            .host("localhost")
            .hostaddr(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST))
            .port(router.pooled_addr().port())
            .user(user(role))
            .password(password(role))
            .dbname("postgres")
            .ssl_mode(SslMode::Require)
            .connect_timeout(Duration::from_secs(10));
        tp_connect_with(&config, MakeRustls::new(self.certs.client_config()))
            .await
            .expect("tokio-postgres connects to the pooled port")
    }

    /// Branch b1 on the test server with `role`.
    fn branch(&self, role: &str) -> BranchSpec {
        BranchSpec::new(BRANCH, self.pg.addr()).role(role, &self.verifiers[role])
    }

    /// A router of its own for one test, one worker, branch b1 with `role`.
    fn router(&self, settings: &PoolSettings, role: &str) -> TestRouter {
        settings.start(&self.certs, &[self.branch(role)])
    }

    /// A byte-level client of the pooled port as `role`.
    fn raw(&self, router: &TestRouter, role: &str, mode: Mode) -> RawConn {
        self.raw_with(router, role, mode, &[])
    }

    /// A byte-level client of role `app` on `addr` (either port) with startup parameters.
    fn app_at(&self, addr: SocketAddr, startup: &[(&str, &str)]) -> RawConn {
        RawConn::connect(
            addr,
            self.certs.client_config(),
            Mode::SslRequest,
            &user("app"),
            &password("app"),
            startup,
        )
    }

    /// As [`Fixture::raw`], with startup parameters.
    fn raw_with(
        &self,
        router: &TestRouter,
        role: &str,
        mode: Mode,
        extra: &[(&str, &str)],
    ) -> RawConn {
        RawConn::connect(
            router.pooled_addr(),
            self.certs.client_config(),
            mode,
            &user(role),
            &password(role),
            extra,
        )
    }

    /// The pids of `role`'s client backends, sorted.
    fn backend_pids(&self, role: &str) -> Vec<i32> {
        let text = self.pg.psql_admin(&format!(
            "SELECT pid FROM pg_stat_activity WHERE usename = {} \
             AND backend_type = 'client backend' ORDER BY pid",
            quote_literal(role)
        ));
        text.lines()
            .map(|line| line.parse().expect("a pid"))
            .collect()
    }

    /// How many client backends `role` has.
    fn backends(&self, role: &str) -> usize {
        self.backend_pids(role).len()
    }

    /// Polls until `role` has `count` backends; returns how long it took.
    fn wait_backends(&self, role: &str, count: usize, timeout: Duration) -> Duration {
        let start = Instant::now();
        loop {
            let pids = self.backend_pids(role);
            if pids.len() == count {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < timeout,
                "{role} has backends {pids:?}, not {count} within {timeout:?}"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Polls until none of `pids` is in pg_stat_activity.
    fn wait_gone(&self, pids: &[i32], timeout: Duration) {
        let list: Vec<String> = pids.iter().map(i32::to_string).collect();
        self.pg.wait_for_value_within(
            &format!(
                "SELECT count(*) FROM pg_stat_activity WHERE pid IN ({})",
                list.join(", ")
            ),
            "0",
            timeout,
        );
    }
}

/// Asserts `role` keeps exactly `count` backends for the whole of `window`.
fn assert_backends_stay(f: &Fixture, role: &str, count: usize, window: Duration) {
    let start = Instant::now();
    while start.elapsed() < window {
        let pids = f.backend_pids(role);
        assert_eq!(
            pids.len(),
            count,
            "{role}: {pids:?} after {:?}",
            start.elapsed()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// `pg_backend_pid()` of the backend a client holds for this query.
fn pid_of(conn: &mut RawConn) -> i32 {
    conn.value("select pg_backend_pid()")
        .parse()
        .expect("a pid")
}

/// The first column of the rows in `replies`, after checking their tags are exactly `expected`.
fn rows(replies: &[Reply], expected: &str, what: &str) -> Vec<String> {
    assert_eq!(tags(replies), expected, "{what}: {:?}", errors(replies));
    first_column(replies)
}

/// Messages up to the next ReadyForQuery, each within `timeout` (a client the router must not
/// keep waiting).
fn ready_within(conn: &mut RawConn, timeout: Duration, what: &str) -> Vec<Reply> {
    conn.set_read_timeout(timeout);
    let replies = conn.until_ready(what);
    conn.set_read_timeout(raw::IO_TIMEOUT);
    replies
}

/// Reads the FATAL ErrorResponse that ends `conn` (before it, only NOTICEs and ParameterStatus)
/// and checks that the connection then closes.
fn expect_fatal_close(conn: &mut RawConn, what: &str) -> PgError {
    loop {
        match conn.next(what) {
            (b'E', body) => {
                let error = parse_error(&body);
                assert_eq!(error.severity, "FATAL", "{what}: {error:?}");
                assert_eq!(conn.next_or_end(), None, "{what}: closed after the FATAL");
                return error;
            }
            (b'N' | b'S', _) => {}
            (tag, body) => panic!(
                "{what}: expected FATAL, got {:?} {:?}",
                char::from(tag),
                String::from_utf8_lossy(&body)
            ),
        }
    }
}

/// True if `addr` takes no connection, or takes one and answers an SSLRequest with nothing.
fn refuses_connections(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return true;
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("set read timeout");
    if stream.write_all(&request(SSL_REQUEST_CODE)).is_err() {
        return true;
    }
    let mut answer = [0u8; 1];
    !matches!(stream.read(&mut answer), Ok(1))
}

/// Sets its flag when dropped (a failed assert too).
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------------------------
// 1. min_pool_size

#[test]
fn min_pool_size_is_opened_after_the_roles_first_login_and_not_before() {
    let f = fixture();
    let mut settings = PoolSettings::new(4);
    settings.min_pool_size = 2;
    let router = f.router(&settings, "warm");
    // Before any login the router has no key to open a backend with: two maintenance rounds
    // open nothing.
    assert_backends_stay(f, "warm", 0, Duration::from_millis(2200));
    // A login and not a single query.
    let client = f.raw(&router, "warm", Mode::SslRequest);
    f.wait_backends("warm", 2, MAINTENANCE);
    // min_pool_size, not more, and kept once the client is gone.
    assert_backends_stay(f, "warm", 2, Duration::from_millis(1200));
    client.terminate();
    assert_backends_stay(f, "warm", 2, Duration::from_millis(1200));
}

// ---------------------------------------------------------------------------------------------
// 2. server_idle_timeout, server_lifetime

#[test]
fn server_idle_timeout_closes_idle_backends_down_to_min_pool_size() {
    let f = fixture();
    let mut settings = PoolSettings::new(3);
    settings.min_pool_size = 1;
    settings.server_idle_timeout = Some(Duration::from_secs(1));
    let router = f.router(&settings, "idler");
    let mut clients: Vec<RawConn> = (0..3)
        .map(|_| f.raw(&router, "idler", Mode::Direct))
        .collect();
    let mut held = HashSet::new();
    for conn in &mut clients {
        assert_eq!(RawConn::status(&conn.simple("begin")), 'T');
        held.insert(pid_of(conn));
    }
    assert_eq!(held.len(), 3, "three transactions at once, three backends");
    for conn in &mut clients {
        assert_eq!(RawConn::status(&conn.simple("commit")), 'I');
    }
    let released = Instant::now();
    assert_eq!(
        f.backends("idler"),
        3,
        "released backends stay open for a while"
    );
    f.wait_backends("idler", 1, MAINTENANCE);
    let took = released.elapsed();
    assert!(took >= Duration::from_millis(900), "closed after {took:?}");
    let kept = f.backend_pids("idler");
    assert!(held.contains(&kept[0]), "{kept:?} is not one of {held:?}");
    // min_pool_size stays, and is what the next transaction gets.
    assert_backends_stay(f, "idler", 1, Duration::from_millis(1200));
    assert_eq!(pid_of(&mut clients[0]), kept[0]);
}

#[test]
fn server_lifetime_retires_a_backend_once_it_is_older_and_idle() {
    let f = fixture();
    let lifetime = Duration::from_secs(1);
    let mut settings = PoolSettings::new(1);
    settings.server_lifetime = Some(lifetime);
    let router = f.router(&settings, "aged");
    let before_login = Instant::now();
    let mut a = f.raw(&router, "aged", Mode::SslRequest);
    let mut b = f.raw(&router, "aged", Mode::Direct);
    let first = pid_of(&mut a);
    let second = pid_of(&mut b);
    // The backend opened after `before_login`, so it is younger than this.
    if before_login.elapsed() < lifetime - Duration::from_millis(200) {
        assert_eq!(second, first, "a young backend is reused");
    }
    // Past its lifetime inside a transaction: the transaction keeps it...
    assert_eq!(RawConn::status(&a.simple("begin")), 'T');
    let in_tx = pid_of(&mut a);
    assert!(errors(&a.simple("select pg_sleep(1.1)")).is_empty());
    assert_eq!(pid_of(&mut a), in_tx, "one transaction, one backend");
    assert_eq!(RawConn::status(&a.simple("commit")), 'I');
    // ...and it is closed when released: the next transaction (another client's, so that it
    // cannot follow a's at once on the backend a still holds) has another one.
    let next = pid_of(&mut b);
    assert_ne!(next, in_tx, "a backend past server_lifetime was lent again");
    f.wait_gone(&[in_tx], QUICK);
    // An idle backend past its lifetime is closed without any client asking.
    f.wait_gone(&[next], MAINTENANCE);
    assert_eq!(f.backends("aged"), 0);
    let last = pid_of(&mut a);
    assert!(last != next && last != in_tx);
}

// ---------------------------------------------------------------------------------------------
// 3. Password reset through the real binary

#[test]
fn role_reset_closes_the_roles_pooled_clients_and_backends_and_the_new_password_works() {
    let f = fixture();
    let router = f.router(&PoolSettings::new(3), "rst");
    let mut idle = f.raw(&router, "rst", Mode::SslRequest);
    assert_eq!(idle.value("select current_user"), "rst");
    let mut busy = f.raw(&router, "rst", Mode::Direct);
    assert_eq!(RawConn::status(&busy.simple("begin")), 'T');
    let busy_pid = pid_of(&mut busy);
    let mut tp = Session::open(
        router.pooled_addr(),
        f.certs.client_config(),
        &user("rst"),
        &password("rst"),
    )
    .expect("tokio-postgres logs in to the pooled port");
    assert_eq!(tp.value("select current_user").expect("query"), "rst");
    let old_pids = f.backend_pids("rst");
    assert!(old_pids.contains(&busy_pid), "{old_pids:?}");
    assert!(
        old_pids.len() >= 2,
        "an idle and a busy backend: {old_pids:?}"
    );

    let config = router.config_path();
    let output = branchgate(&[
        "role",
        "reset",
        "--config",
        config.to_str().expect("UTF-8 temp path"),
        "--branch",
        BRANCH,
        "--role",
        "rst",
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "role reset failed:\n{stdout}\n{stderr}"
    );
    let new_password = stdout
        .lines()
        .find_map(|line| line.strip_prefix("password: "))
        .unwrap_or_else(|| panic!("no password printed:\n{stdout}\n{stderr}"))
        .to_owned();

    // At once, no retry: the command returned once the router had the new verifier.
    let connect = |password: &str| {
        RawConn::try_connect(
            router.pooled_addr(),
            f.certs.client_config(),
            Mode::Direct,
            &user("rst"),
            password,
            &[],
        )
    };
    let mut fresh = connect(&new_password)
        .unwrap_or_else(|e| panic!("the new password was refused right after the reset: {e:?}"));
    assert_eq!(fresh.value("select current_user"), "rst");
    let fresh_pid = pid_of(&mut fresh);
    assert!(
        !old_pids.contains(&fresh_pid),
        "a backend logged in with the old password was lent: {fresh_pid} in {old_pids:?}"
    );
    let refused = connect(&password("rst"))
        .err()
        .expect("the old password no longer works");
    assert_eq!(
        (refused.severity.as_str(), refused.code.as_str()),
        ("FATAL", "28P01"),
        "{refused:?}"
    );

    for (conn, what) in [
        (&mut idle, "idle client"),
        (&mut busy, "client in a transaction"),
    ] {
        let error = expect_fatal_close(conn, what);
        assert_eq!(
            (error.code.as_str(), error.message.as_str()),
            ("57P01", PASSWORD_RESET_MESSAGE),
            "{what}"
        );
    }
    let error = tp.ended_by_server();
    assert_db_error(&error, &SqlState::ADMIN_SHUTDOWN, PASSWORD_RESET_MESSAGE);
    // The backends that logged in with the old password are gone, idle or busy.
    f.wait_gone(&old_pids, MAINTENANCE);
    assert_eq!(fresh.value("select 'still here'"), "still here");
}

// ---------------------------------------------------------------------------------------------
// 4. A catalog reload resizing a pool

#[test]
fn a_reload_growing_pool_size_serves_waiting_and_new_transactions_at_once() {
    let f = fixture();
    let router = f.router(&PoolSettings::new(5), "grow");
    router.set_catalog(&[f.branch("grow").pool("pool_size = 1\n")]);
    let mut a = f.raw(&router, "grow", Mode::SslRequest);
    let mut b = f.raw(&router, "grow", Mode::Direct);
    let mut c = f.raw(&router, "grow", Mode::SslRequest);
    assert_eq!(RawConn::status(&a.simple("begin")), 'T');
    let pid_a = pid_of(&mut a);
    b.send(&[query("begin")]);
    b.expect_silence(HELD_WINDOW, "b while a holds the only backend");

    router.set_catalog(&[f.branch("grow").pool("pool_size = 3\n")]);
    let replies = ready_within(&mut b, QUICK, "b, queued before the pool grew from 1 to 3");
    assert_eq!(RawConn::status(&replies), 'T');
    c.send(&[query("begin")]);
    let replies = ready_within(
        &mut c,
        QUICK,
        "c, a new transaction after the pool grew to 3",
    );
    assert_eq!(RawConn::status(&replies), 'T');
    let pids: HashSet<i32> = [pid_a, pid_of(&mut b), pid_of(&mut c)].into();
    assert_eq!(pids.len(), 3, "three transactions on three backends");
    assert_eq!(f.backends("grow"), 3);
    for conn in [&mut a, &mut b, &mut c] {
        assert_eq!(RawConn::status(&conn.simple("commit")), 'I');
    }
}

#[test]
fn a_reload_shrinking_pool_size_leaves_at_most_the_new_size() {
    let f = fixture();
    let router = f.router(&PoolSettings::new(5), "shrink");
    router.set_catalog(&[f.branch("shrink").pool("pool_size = 3\n")]);
    let mut clients: Vec<RawConn> = (0..3)
        .map(|_| f.raw(&router, "shrink", Mode::Direct))
        .collect();
    for conn in &mut clients {
        assert_eq!(RawConn::status(&conn.simple("begin")), 'T');
    }
    assert_eq!(f.backends("shrink"), 3);
    for conn in &mut clients {
        assert_eq!(RawConn::status(&conn.simple("commit")), 'I');
    }
    router.set_catalog(&[f.branch("shrink").pool("pool_size = 1\n")]);
    // The two backends over the new size are closed, idle as they are...
    f.wait_backends("shrink", 1, MAINTENANCE);
    // ...and two transactions no longer run at once.
    assert_eq!(RawConn::status(&clients[0].simple("begin")), 'T');
    clients[1].send(&[query("select 'second'")]);
    clients[1].expect_silence(HELD_WINDOW, "a second transaction on a pool of 1");
    assert_eq!(RawConn::status(&clients[0].simple("commit")), 'I');
    assert_eq!(
        rows(&clients[1].until_ready("second"), "T D C Z", "second"),
        ["second"]
    );
}

// ---------------------------------------------------------------------------------------------
// 5. Cancel racing release

/// Sends `key`'s CancelRequest to `addr` (plaintext, or over TLS started the `tls` way) and
/// waits until the router closes the connection (it answers nothing).
fn send_cancel(addr: SocketAddr, certs: &Certs, key: (u32, u32), tls: Option<Mode>) {
    let request = cancel_request(key.0, key.1);
    let mut rest = Vec::new();
    match tls {
        None => {
            let mut sock = raw::tcp(addr);
            sock.write_all(&request).expect("send CancelRequest");
            let _ = sock.read_to_end(&mut rest);
        }
        Some(mode) => {
            let mut tls = connect_tls(addr, certs.client_config(), mode);
            tls.write_all(&request).expect("send CancelRequest");
            let _ = tls.read_to_end(&mut rest);
        }
    }
    assert!(rest.is_empty(), "a CancelRequest was answered: {rest:?}");
}

/// The three ways a cancel may arrive, in turn.
const CANCEL_WAYS: [Option<Mode>; 3] = [None, Some(Mode::SslRequest), Some(Mode::Direct)];

#[test]
fn cancels_racing_releases_never_cancel_the_next_clients_query() {
    const ROUNDS: usize = 300;
    let f = fixture();
    let router = f.router(&PoolSettings::new(1), "canc");
    let addr = router.pooled_addr();
    let mut a = f.raw(&router, "canc", Mode::SslRequest);
    let key = a.login.key;
    let done = AtomicBool::new(false);
    let cancels = AtomicUsize::new(0);
    thread::scope(|s| {
        let _stop = StopOnDrop(&done);
        let canceller = s.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                let n = cancels.fetch_add(1, Ordering::Relaxed);
                send_cancel(addr, &f.certs, key, CANCEL_WAYS[n % CANCEL_WAYS.len()]);
            }
        });
        // b's transactions run on the same backend as a's, in between them.
        let other = s.spawn(|| {
            let mut b = f.raw(&router, "canc", Mode::Direct);
            let mut rounds = 0usize;
            while !done.load(Ordering::Relaxed) {
                let replies = b.simple("select count(*) from generate_series(1, 20000)");
                let codes = error_codes(&replies);
                assert!(
                    codes.is_empty(),
                    "b round {rounds}: {codes:?} (a cancel meant for a reached b's query)"
                );
                assert_eq!(RawConn::status(&replies), 'I');
                rounds += 1;
            }
            rounds
        });
        let mut canceled = 0;
        for round in 0..ROUNDS {
            let replies = a.simple("select pg_sleep(0.001)");
            match error_codes(&replies).as_slice() {
                [] => {}
                [code] if code == "57014" => canceled += 1,
                codes => panic!("a round {round}: {codes:?}"),
            }
            assert_eq!(RawConn::status(&replies), 'I', "a round {round}");
        }
        done.store(true, Ordering::Relaxed);
        let b_rounds = other
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        canceller
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        let sent = cancels.load(Ordering::Relaxed);
        assert!(b_rounds >= 10, "b ran only {b_rounds} transactions");
        // Otherwise the race was never run: the cancels reached no query at all.
        assert!(
            canceled > 0,
            "none of {sent} cancels stopped one of a's {ROUNDS} queries"
        );
        assert_eq!(a.value("select 'a after'"), "a after");
    });
}

/// Cancels keep coming while a's transactions take turns with b's on one backend: each of a's
/// begins with the router's `set_config` giving the backend a's time zone, ahead of a's query.
/// A cancel that stopped that statement instead of a's query would leave the query to run with
/// b's time zone (PgBouncer PR #298: a cancel stopped its own `SET`); the router holds a cancel
/// back until its statement is answered. On this machine a cancel's delivery (a connection to
/// the postmaster and its child) takes far longer than the `set_config`, so the race shows
/// only when the backend waits for a core first; the unit test
/// `cancel::tests::a_pooled_cancel_waits_for_the_routers_own_statements` pins the rule.
#[test]
fn cancels_never_stop_the_routers_own_parameter_statements() {
    const ROUNDS: usize = 300;
    const A_ZONE: &str = "America/Lima";
    const B_ZONE: &str = "Asia/Kolkata";
    let f = fixture();
    let router = f.router(&PoolSettings::new(1), "canc");
    let addr = router.pooled_addr();
    let mut a = f.raw_with(&router, "canc", Mode::SslRequest, &[("TimeZone", A_ZONE)]);
    let key = a.login.key;
    let done = AtomicBool::new(false);
    thread::scope(|s| {
        let _stop = StopOnDrop(&done);
        let canceller = s.spawn(|| {
            let mut n = 0usize;
            while !done.load(Ordering::Relaxed) {
                send_cancel(addr, &f.certs, key, CANCEL_WAYS[n % CANCEL_WAYS.len()]);
                n += 1;
            }
        });
        let other = s.spawn(|| {
            let mut b = f.raw_with(&router, "canc", Mode::Direct, &[("TimeZone", B_ZONE)]);
            let mut rounds = 0usize;
            while !done.load(Ordering::Relaxed) {
                let replies = b.simple("select current_setting('TimeZone')");
                assert_eq!(error_codes(&replies), [] as [&str; 0], "b round {rounds}");
                assert_eq!(first_column(&replies), [B_ZONE], "b round {rounds}");
                rounds += 1;
            }
            rounds
        });
        let mut canceled = 0;
        for round in 0..ROUNDS {
            let replies = a.simple("select current_setting('TimeZone') from pg_sleep(0.001)");
            match error_codes(&replies).as_slice() {
                [] => assert_eq!(
                    first_column(&replies),
                    [A_ZONE],
                    "a round {round}: a's query ran with another client's time zone"
                ),
                [code] if code == "57014" => canceled += 1,
                codes => panic!("a round {round}: {codes:?}"),
            }
            assert_eq!(RawConn::status(&replies), 'I', "a round {round}");
        }
        done.store(true, Ordering::Relaxed);
        let b_rounds = other
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        canceller
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        assert!(b_rounds >= 10, "b ran only {b_rounds} transactions");
        assert!(
            canceled > 0,
            "no cancel stopped one of a's {ROUNDS} queries"
        );
        assert_eq!(a.value("select current_setting('TimeZone')"), A_ZONE);
    });
}

/// A client's StartupMessage parameters are read as PostgreSQL reads them at a login: the
/// values it reports back are the server's (`iso` is `ISO, MDY`), and a value the server
/// refuses refuses the login with the server's FATAL. The direct port, where PostgreSQL itself
/// answers, is the reference. A set of parameters a backend accepted once logs in without one.
#[test]
fn startup_parameters_are_read_and_refused_as_postgresql_reads_them() {
    let f = fixture();
    let router = f.router(&PoolSettings::new(1), "app");
    let login = |addr: SocketAddr, startup: &[(&str, &str)]| {
        RawConn::try_connect(
            addr,
            f.certs.client_config(),
            Mode::SslRequest,
            &user("app"),
            &password("app"),
            startup,
        )
    };
    let asked = [
        ("TimeZone", "europe/paris"),
        ("DateStyle", "iso"),
        ("IntervalStyle", "SQL_standard"),
        ("statement_timeout", "90000"),
    ];
    let mut direct = login(router.direct_addr(), &asked).expect("PostgreSQL takes them");
    let mut pooled = login(router.pooled_addr(), &asked).expect("the pooled port takes them");
    for name in ["TimeZone", "DateStyle", "IntervalStyle"] {
        assert_eq!(pooled.reported(name), direct.reported(name), "{name}");
    }
    assert_eq!(pooled.reported("DateStyle"), Some("ISO, MDY"));
    for sql in ["show TimeZone", "show DateStyle", "show statement_timeout"] {
        assert_eq!(pooled.value(sql), direct.value(sql), "{sql}");
    }
    for refused in [
        [("TimeZone", "Not/AZone")],
        [("statement_timeout", "abc")],
        [("no_such_parameter", "1")],
    ] {
        let direct = login(router.direct_addr(), &refused).err();
        let pooled = login(router.pooled_addr(), &refused).err();
        assert!(direct.is_some(), "PostgreSQL refuses {refused:?}");
        assert_eq!(pooled, direct, "{refused:?}");
    }
    // `options` (PGOPTIONS), read as PostgreSQL reads it; the StartupMessage's own parameters
    // win over it.
    let options = [
        (
            "options",
            r#"-c statement_timeout=5s --lock-timeout=2s -csearch_path="my\ schema",public -c TimeZone=Asia/Tokyo"#,
        ),
        ("TimeZone", "Europe/Paris"),
    ];
    let mut direct_options = login(router.direct_addr(), &options).expect("PostgreSQL reads it");
    let mut pooled_options = login(router.pooled_addr(), &options).expect("so does 6432");
    assert_eq!(pooled_options.reported("TimeZone"), Some("Europe/Paris"));
    for sql in [
        "show statement_timeout",
        "show lock_timeout",
        "show search_path",
        "show TimeZone",
    ] {
        assert_eq!(
            pooled_options.value(sql),
            direct_options.value(sql),
            "{sql}"
        );
    }
    assert_eq!(
        pooled_options.value("show search_path"),
        "\"my schema\",public"
    );
    for refused in [
        "-c statement_timeout",
        "statement_timeout=5s",
        "-c",
        r"-c search_path=my\ schema,public",
    ] {
        let direct = login(router.direct_addr(), &[("options", refused)]).err();
        let pooled = login(router.pooled_addr(), &[("options", refused)]).err();
        assert!(direct.is_some(), "PostgreSQL refuses {refused:?}");
        assert_eq!(pooled, direct, "{refused:?}");
    }
    let other_switch = login(router.pooled_addr(), &[("options", "-d 5")])
        .err()
        .expect("a server switch the pooled port does not keep");
    assert_eq!(other_switch.code, "0A000");

    // The set accepted above needs no backend now: it logs in while the one backend is held.
    assert_eq!(RawConn::status(&pooled.simple("begin")), 'T');
    let mut again = login(router.pooled_addr(), &asked).expect("accepted before");
    assert_eq!(again.reported("TimeZone"), Some("Europe/Paris"));
    assert_eq!(RawConn::status(&pooled.simple("commit")), 'I');
    assert_eq!(again.value("show TimeZone"), "Europe/Paris");
}

#[test]
fn logins_asking_for_one_new_parameter_set_at_once_have_it_read_once() {
    const LOGINS: usize = 24;
    let f = fixture();
    // Every statement `herd`'s backends run goes to the server's log.
    f.pg.psql_admin("ALTER ROLE herd SET log_statement = 'all'");
    let router = TestRouter::start_with_config(&f.certs, &[f.branch("herd")], |text| {
        PoolSettings::new(1).apply(text).replace(
            "pooled = \"127.0.0.1:0\"\n",
            "pooled = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n",
        )
    });
    let clients = || {
        let text = metrics::scrape(
            router
                .router()
                .admin_addr()
                .expect("the admin endpoint runs"),
        );
        metrics::sample(&text, "branchgate_branch_pooled_clients", &[BRANCH])
    };
    // The pool's one backend is held, so the logins' reading waits in line for it.
    let mut holder = f.raw(&router, "herd", Mode::SslRequest);
    assert_eq!(RawConn::status(&holder.simple("begin")), 'T');
    let asked = [
        ("application_name", "herd-7f3a"),
        ("TimeZone", "europe/lisbon"),
    ];
    let logins: Vec<_> = (0..LOGINS)
        .map(|_| {
            let config = f.certs.client_config();
            let addr = router.pooled_addr();
            thread::spawn(move || {
                let mut conn = RawConn::try_connect(
                    addr,
                    config,
                    Mode::SslRequest,
                    &user("herd"),
                    &password("herd"),
                    &asked,
                )
                .expect("the login is accepted");
                assert_eq!(conn.reported("TimeZone"), Some("Europe/Lisbon"));
                conn.value("show TimeZone")
            })
        })
        .collect();
    wait_for("every login past its password", QUICK * 10, || {
        (clients() == (LOGINS + 1) as f64).then_some(())
    });
    assert_eq!(RawConn::status(&holder.simple("commit")), 'I');
    for login in logins {
        assert_eq!(login.join().expect("login thread"), "Europe/Lisbon");
    }
    let log = std::fs::read_to_string(f.pg.log_path()).expect("server log");
    let readings = log
        .lines()
        .filter(|line| line.contains("statement:") && line.contains("europe/lisbon"))
        .count();
    assert_eq!(readings, 1, "one reading for {LOGINS} logins:\n{log}");
}

#[test]
fn a_cancel_of_a_client_holding_no_backend_sends_nothing() {
    const LONG: &str = "select pg_sleep(1) /* quiet: b's long query */";
    let f = fixture();
    let router = f.router(&PoolSettings::new(1), "quiet");
    let addr = router.pooled_addr();
    let mut a = f.raw(&router, "quiet", Mode::SslRequest);
    let mut b = f.raw(&router, "quiet", Mode::Direct);
    assert_eq!(a.value("select 'a has run'"), "a has run");
    b.send(&[query(LONG)]);
    f.pg.wait_for_value_within(
        &format!(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query = {}",
            quote_literal(LONG)
        ),
        "1",
        QUICK,
    );
    // a holds nothing: each of its cancels, whichever way it comes, reaches no backend.
    for way in CANCEL_WAYS {
        send_cancel(addr, &f.certs, a.login.key, way);
    }
    let replies = b.until_ready("b's long query");
    assert_eq!(tags(&replies), "T D C Z", "{:?}", errors(&replies));
    // Nothing was left on its way either: a's next query is not canceled.
    assert!(errors(&a.simple("select pg_sleep(0.2)")).is_empty());
    // The same cancel does reach a's query while a holds a backend.
    a.send(&[query("select pg_sleep(5) /* quiet: a */")]);
    f.pg.wait_for_value_within(
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' \
         AND query = 'select pg_sleep(5) /* quiet: a */'",
        "1",
        QUICK,
    );
    let start = Instant::now();
    send_cancel(addr, &f.certs, a.login.key, None);
    assert_eq!(error_codes(&a.until_ready("a canceled")), ["57014"]);
    assert!(start.elapsed() < QUICK, "took {:?}", start.elapsed());
    assert_eq!(b.value("select 'b after'"), "b after");
}

// ---------------------------------------------------------------------------------------------
// 6. COPY

/// CopyData (F).
fn copy_data(data: &str) -> Vec<u8> {
    message(b'd', data.as_bytes())
}

/// CopyDone (F).
fn copy_done() -> Vec<u8> {
    message(b'c', &[])
}

/// CopyFail (F).
fn copy_fail(reason: &str) -> Vec<u8> {
    message(b'f', &[reason.as_bytes(), &[0]].concat())
}

/// psql 15 through the pooled port (SSLRequest, verify-full) as `role`, running `script` from
/// stdin with errors not stopping it: (stdout, stderr).
fn psql_script(f: &Fixture, router: &TestRouter, role: &str, script: &str) -> (String, String) {
    // psql 15's libpq predates sslnegotiation.
    let conninfo = Conninfo::new(router.pooled_addr())
        .localhost()
        .user(&user(role))
        .password(&password(role))
        .verify_full_sslrequest(&f.certs.ca_path());
    tools::psql_script(&conninfo.to_string(), script, false, PSQL_DEADLINE)
}

#[test]
fn psql_copy_in_and_out_and_a_bad_row_through_the_pooled_port() {
    let f = fixture();
    let router = f.router(&PoolSettings::new(1), "copier");
    let (stdout, stderr) = psql_script(
        f,
        &router,
        "copier",
        "\\copy lc_copy (client, n, v) from stdin\n\
         psql\t1\tone\n\
         psql\t2\ttwo\n\
         psql\t3\t\\N\n\
         \\.\n\
         select count(*) from lc_copy where client = 'psql';\n\
         \\copy (select n, v from lc_copy where client = 'psql' order by n) to stdout\n\
         \\copy lc_copy (client, n, v) from stdin\n\
         psqlbad\t1\tfine\n\
         psqlbad\tnot a number\tbad\n\
         \\.\n\
         select 'after the bad row';\n\
         select count(*) from lc_copy where client = 'psqlbad';\n",
    );
    assert_eq!(
        stdout, "3\n1\tone\n2\ttwo\n3\t\\N\nafter the bad row\n0\n",
        "{stderr}"
    );
    assert!(
        stderr.contains("invalid input syntax for type integer: \"not a number\""),
        "{stderr}"
    );
    assert_eq!(
        stderr.lines().filter(|l| l.contains("ERROR")).count(),
        1,
        "{stderr}"
    );
}

#[test]
fn a_failed_copy_in_gives_the_backend_back_to_the_pool() {
    const COPY: &str = "COPY lc_copy (client, n, v) FROM STDIN";
    let f = fixture();
    let router = f.router(&PoolSettings::new(1), "copier");
    let mut a = f.raw(&router, "copier", Mode::SslRequest);
    let mut b = f.raw(&router, "copier", Mode::Direct);
    let pid = pid_of(&mut a);

    // A bad row with its CopyDone: the error, and the backend is free.
    a.send(&[query(COPY)]);
    assert_eq!(a.next("CopyInResponse").0, b'G');
    a.send(&[
        copy_data("raw\t1\tok\n"),
        copy_data("raw\tbad\tx\n"),
        copy_done(),
    ]);
    let replies = a.until_ready("bad row");
    assert_eq!(tags(&replies), "E Z");
    assert_eq!(error_codes(&replies), ["22P02"]);
    assert_eq!(RawConn::status(&replies), 'I');
    b.set_read_timeout(QUICK);
    assert_eq!(pid_of(&mut b), pid, "b gets the one backend");

    // The server reports the bad row before the client has finished: its late CopyDone is
    // dropped, as PostgreSQL drops it, and the backend is free meanwhile.
    a.send(&[query(COPY)]);
    assert_eq!(a.next("CopyInResponse").0, b'G');
    a.send(&[copy_data("raw\tworse\tx\n")]);
    let replies = a.until_ready("bad row before CopyDone");
    assert_eq!(error_codes(&replies), ["22P02"]);
    assert_eq!(RawConn::status(&replies), 'I');
    a.send(&[copy_data("raw\t2\tlate\n"), copy_done()]);
    assert_eq!(pid_of(&mut b), pid, "b after a's late CopyDone");
    a.expect_silence(HELD_WINDOW, "a's late CopyData and CopyDone get no answer");
    assert_eq!(a.value("select 'a goes on'"), "a goes on");
    assert_eq!(pid_of(&mut b), pid, "b after a's next query");

    // CopyFail: the server's error, then the backend is free too.
    a.send(&[query(COPY)]);
    assert_eq!(a.next("CopyInResponse").0, b'G');
    a.send(&[copy_data("raw\t3\tok\n"), copy_fail("client gave up")]);
    let replies = a.until_ready("CopyFail");
    assert_eq!(tags(&replies), "E Z");
    assert_eq!(error_codes(&replies), ["57014"]);
    assert_eq!(pid_of(&mut b), pid, "b after a's CopyFail");
    assert_eq!(
        a.value("select count(*) from lc_copy where client = 'raw'"),
        "0"
    );
}

/// COPY FROM STDIN through the extended protocol, as tokio-postgres and libpq send it: Bind,
/// Execute and a Sync at once, then the data, CopyDone and another Sync. PostgreSQL ignores a
/// Sync that reaches it during COPY IN, so only the second one is answered; a pooler that
/// waits for an answer to each keeps the backend for ever (PgBouncer #1023).
#[test]
fn copy_in_over_the_extended_protocol_gives_the_backend_back() {
    const COPY: &str = "COPY lc_copy (client, n, v) FROM STDIN";
    let f = fixture();
    let router = f.router(&PoolSettings::new(1), "copier");
    let mut b = f.raw(&router, "copier", Mode::Direct);
    b.set_read_timeout(QUICK);
    let pid = pid_of(&mut b);

    // tokio-postgres's copy_in.
    block_on(async {
        let client = f.tokio_postgres(&router, "copier").await;
        for round in 0..3 {
            let sink = client.copy_in(COPY).await.expect("COPY starts");
            let mut sink = std::pin::pin!(sink);
            for n in 0..100 {
                let row = format!("tp{round}\t{n}\trow {n}\n");
                sink.send(bytes::Bytes::from(row)).await.expect("CopyData");
            }
            assert_eq!(sink.as_mut().finish().await.expect("COPY completes"), 100);
        }
        let row = client
            .query_one(
                "select count(*)::int from lc_copy where client like 'tp%'",
                &[],
            )
            .await
            .expect("count");
        assert_eq!(row.get::<_, i32>(0), 300);
    });
    assert_eq!(pid_of(&mut b), pid, "b gets the one backend after copy_in");

    // The whole COPY in one write, before any answer, then a query.
    let mut a = f.raw(&router, "copier", Mode::SslRequest);
    a.send(&[
        parse("", COPY, &[]),
        raw::bind("", "", &[]),
        execute("", 0),
        sync(),
        copy_data("raw-x\t1\tone\n"),
        copy_data("raw-x\t2\ttwo\n"),
        copy_done(),
        sync(),
        query("select count(*) from lc_copy where client = 'raw-x'"),
    ]);
    let replies = a.until_ready("pipelined COPY");
    assert_eq!(tags(&replies), "1 2 G C Z", "{:?}", errors(&replies));
    let replies = a.until_ready("the query after it");
    assert_eq!(rows(&replies, "T D C Z", "count"), ["2"]);
    assert_eq!(pid_of(&mut b), pid, "b after the pipelined COPY");

    // A bad row: the error, then the client's CopyDone and Sync get the ReadyForQuery.
    a.send(&[
        parse("", COPY, &[]),
        raw::bind("", "", &[]),
        execute("", 0),
        sync(),
    ]);
    let replies = [
        a.next("ParseComplete"),
        a.next("BindComplete"),
        a.next("CopyInResponse"),
    ];
    assert_eq!(tags(&replies), "1 2 G");
    a.send(&[copy_data("raw-y\tbad\tx\n")]);
    assert_eq!(parse_error(&a.next("the bad row").1).code, "22P02");
    a.send(&[copy_done(), sync()]);
    let replies = a.until_ready("after the bad row");
    assert_eq!(RawConn::status(&replies), 'I');
    assert_eq!(pid_of(&mut b), pid, "b after the failed COPY");
    assert_eq!(a.value("select 'a goes on'"), "a goes on");
}

// ---------------------------------------------------------------------------------------------
// 7. Pipelined batches, as node-postgres writes them

/// Parse, Bind, Describe portal, Execute and Sync of the unnamed statement: one query the way
/// node-postgres sends it.
fn node_batch(sql: &str) -> Vec<Vec<u8>> {
    vec![
        parse("", sql, &[]),
        bind_described(),
        execute("", 0),
        sync(),
    ]
}

/// Bind of the unnamed portal to the unnamed statement, then Describe of the portal.
fn bind_described() -> Vec<u8> {
    [raw::bind("", "", &[]), describe(b'P', "")].concat()
}

#[test]
fn pipelined_batches_in_one_write_answer_in_order_and_hold_the_backend_to_the_last_sync() {
    let f = fixture();
    let router = f.router(&PoolSettings::new(1), "piper");
    let mut a = f.raw(&router, "piper", Mode::SslRequest);
    let mut b = f.raw(&router, "piper", Mode::Direct);
    let pid = pid_of(&mut a);
    let mut batches: Vec<Vec<u8>> = Vec::new();
    batches.extend(node_batch("select 'one'"));
    // A Flush in the middle of the second batch: its replies so far come at once.
    batches.extend([
        parse("", "select 'two' from pg_sleep(0.3)", &[]),
        bind_described(),
        flush(),
        execute("", 0),
        sync(),
    ]);
    batches.extend(node_batch("select 1 / (random() * 0)::int"));
    batches.extend(node_batch("select 'four'"));
    batches.extend(node_batch("select pg_backend_pid()::text"));
    let sent = Instant::now();
    a.send(&batches);
    // b asks while a's pipeline runs: it waits for the last of a's ReadyForQuery.
    b.send(&[query("select 'b'")]);
    let replies = a.until_ready_n(5, "five batches");
    let a_done = sent.elapsed();
    assert_eq!(
        tags(&replies),
        "1 2 T D C Z 1 2 T D C Z 1 2 T E Z 1 2 T D C Z 1 2 T D C Z",
        "{:?}",
        errors(&replies)
    );
    assert_eq!(error_codes(&replies), ["22012"]);
    assert_eq!(
        first_column(&replies),
        ["one", "two", "four", &pid.to_string()]
    );
    assert!(
        replies
            .iter()
            .filter(|(tag, _)| *tag == b'Z')
            .all(|(_, body)| body == b"I"),
        "every batch ends outside a transaction"
    );
    let replies = b.until_ready("b");
    let b_done = sent.elapsed();
    assert_eq!(rows(&replies, "T D C Z", "b"), ["b"]);
    assert!(
        b_done >= a_done && b_done >= Duration::from_millis(300),
        "b was served after {b_done:?}, a's pipeline ended after {a_done:?}"
    );
    assert_eq!(pid_of(&mut b), pid);
    // The batches' unnamed statement and portal are gone with their Sync; a goes on.
    a.send(&node_batch("select 'again'"));
    assert_eq!(
        rows(&a.until_ready("again"), "1 2 T D C Z", "again"),
        ["again"]
    );
}

// ---------------------------------------------------------------------------------------------
// 8. SQL-level PREPARE, DISCARD ALL

#[test]
fn sql_level_prepare_is_refused_with_0a000_and_aborts_a_transaction_block() {
    let f = fixture();
    let router = f.router(&PoolSettings::new(1), "app");
    let mut a = f.raw(&router, "app", Mode::SslRequest);
    // A query longer than the router's buffers is read whole all the same.
    let long = format!("PREPARE p3 AS select '{}'", "x".repeat(40 * 1024));
    for sql in [
        "PREPARE p1 AS select 1",
        "  prepare p2 (int) as select $1;",
        long.as_str(),
    ] {
        let replies = a.simple(sql);
        let refusals = errors(&replies);
        assert_eq!(refusals.len(), 1, "{sql}: {}", tags(&replies));
        let refusal = &refusals[0];
        assert_eq!(
            (
                refusal.severity.as_str(),
                refusal.code.as_str(),
                refusal.message.as_str()
            ),
            ("ERROR", "0A000", PREPARE_REFUSED),
            "{sql}"
        );
        assert_eq!(RawConn::status(&replies), 'I', "{sql}");
    }
    // None of them left a statement behind on the (one) backend.
    for name in ["p1", "p2", "p3"] {
        let replies = a.simple(&format!("EXECUTE {name}"));
        assert_eq!(error_codes(&replies), ["26000"], "EXECUTE {name}");
    }
    // Inside a transaction block the refusal is an error like any other.
    assert_eq!(RawConn::status(&a.simple("begin")), 'T');
    assert_eq!(a.value("select 'in the block'"), "in the block");
    let replies = a.simple("PREPARE p4 AS select 4");
    assert_eq!(error_codes(&replies), ["0A000"]);
    assert_eq!(RawConn::status(&replies), 'E');
    let replies = a.simple("select 'ignored'");
    assert_eq!(error_codes(&replies), ["25P02"]);
    assert_eq!(RawConn::status(&replies), 'E');
    let replies = a.simple("commit");
    assert_eq!(tags(&replies), "C Z");
    assert_eq!(RawConn::status(&replies), 'I');
    assert_eq!(a.value("select 'after'"), "after");
    // A PREPARE after another statement in the same Query is a PREPARE as a simple query too:
    // on PostgreSQL it would create p3 on this backend only.
    let replies = a.simple("select 'first'; PREPARE p3 AS select 3");
    assert_eq!(
        error_codes(&replies),
        ["0A000"],
        "PREPARE after another statement: {}",
        tags(&replies)
    );
    assert_eq!(error_codes(&a.simple("EXECUTE p3")), ["26000"]);
}

#[test]
fn discard_all_clears_the_clients_protocol_level_statements() {
    let f = fixture();
    let router = f.router(&PoolSettings::new(1), "app");
    let mut a = f.raw(&router, "app", Mode::Direct);
    let mut b = f.raw(&router, "app", Mode::SslRequest);
    a.send(&[parse("mine", "select 'mine'", &[]), sync()]);
    assert_eq!(tags(&a.until_ready("Parse")), "1 Z");
    b.send(&[parse("theirs", "select 'theirs'", &[]), sync()]);
    assert_eq!(tags(&b.until_ready("b Parse")), "1 Z");
    a.send(&[bind_execute("mine", &[]), sync()]);
    assert_eq!(rows(&a.until_ready("Bind"), "2 D C Z", "mine"), ["mine"]);
    let replies = a.simple("DISCARD ALL");
    assert_eq!(tags(&replies), "C Z", "{:?}", errors(&replies));
    a.send(&[bind_execute("mine", &[]), sync()]);
    let replies = a.until_ready("Bind after DISCARD ALL");
    assert_eq!(tags(&replies), "E Z");
    assert_eq!(error_codes(&replies), ["26000"]);
    // The name is free again, and b's statement was not a's to discard.
    a.send(&[
        parse("mine", "select 'mine again'", &[]),
        bind_execute("mine", &[]),
        sync(),
    ]);
    assert_eq!(
        rows(&a.until_ready("Parse again"), "1 2 D C Z", "again"),
        ["mine again"]
    );
    b.send(&[bind_execute("theirs", &[]), sync()]);
    assert_eq!(rows(&b.until_ready("b Bind"), "2 D C Z", "b"), ["theirs"]);
}

/// DISCARD ALL resets a session's settings to their session defaults, which on a real server
/// are the startup parameters: the pooled port must end where the direct port (a real
/// server's session) does.
#[test]
fn discard_all_keeps_startup_parameters_as_on_a_real_server() {
    let f = fixture();
    let router = f.router(&PoolSettings::new(1), "app");
    let startup = [
        ("TimeZone", "Etc/GMT+5"),
        ("application_name", "lifecycle-discard"),
    ];
    let check = "select current_setting('TimeZone') || ' ' || \
                 current_setting('application_name') || ' ' || current_setting('DateStyle')";
    let mut seen = Vec::new();
    for addr in [router.direct_addr(), router.pooled_addr()] {
        let mut conn = f.app_at(addr, &startup);
        assert!(errors(&conn.simple("SET DateStyle = 'SQL, DMY'")).is_empty());
        assert!(errors(&conn.simple("SET TimeZone = 'UTC'")).is_empty());
        let before = conn.value(check);
        let replies = conn.simple("DISCARD ALL");
        assert!(errors(&replies).is_empty(), "{:?}", errors(&replies));
        let reported = parameter_statuses(&replies);
        let after = conn.value(check);
        let again = conn.value(check);
        seen.push((before, reported, after, again));
    }
    let (direct, pooled) = (&seen[0], &seen[1]);
    assert_eq!(direct.0, "UTC lifecycle-discard SQL, DMY");
    assert!(
        direct.2.starts_with("Etc/GMT+5 lifecycle-discard ") && direct.2 == direct.3,
        "a real server's session: {direct:?}"
    );
    assert_eq!(pooled, direct, "pooled port vs a real server's session");
}

type Step = (&'static str, Vec<(String, String)>, String);

/// The ParameterStatus messages among `replies`, as (name, value).
fn parameter_statuses(replies: &[Reply]) -> Vec<(String, String)> {
    replies
        .iter()
        .filter(|(tag, _)| *tag == b'S')
        .map(|(_, body)| raw::parameter_status(body))
        .collect()
}

/// `RESET name` and `SET name TO DEFAULT` send one parameter back to its session default, which
/// on a real server is the startup value: outside a transaction, inside one (the statements
/// after it on the same backend), through the extended protocol, and for a parameter the
/// server does not report (`search_path`). The pooled port must answer as the direct port does,
/// ParameterStatus messages included, and a second client of the same one-backend pool must
/// not inherit the pool's default where its own startup value belongs.
#[test]
fn reset_of_one_parameter_keeps_the_startup_value_as_on_a_real_server() {
    let f = fixture();
    let router = f.router(&PoolSettings::new(1), "app");
    let startup = [
        ("TimeZone", "Etc/GMT+5"),
        ("application_name", "lifecycle-reset"),
        ("search_path", "lc_nowhere, public"),
    ];
    let check = "select current_setting('TimeZone') || ' | ' || \
                 current_setting('application_name') || ' | ' || current_setting('search_path')";
    let connect = |addr| f.app_at(addr, &startup);
    let ok = |replies: Vec<Reply>, what: &str| -> Vec<(String, String)> {
        assert!(
            errors(&replies).is_empty(),
            "{what}: {:?}",
            errors(&replies)
        );
        parameter_statuses(&replies)
    };
    let mut seen = Vec::new();
    for addr in [router.direct_addr(), router.pooled_addr()] {
        let mut conn = connect(addr);
        // (step, the ParameterStatus messages it got, the parameters after it)
        let mut steps: Vec<Step> = Vec::new();
        let mut step = |conn: &mut RawConn, what: &'static str, sql: &str| {
            let told = ok(conn.simple(sql), what);
            let now = conn.value(check);
            steps.push((what, told, now));
        };
        step(
            &mut conn,
            "set",
            "SET TimeZone = 'UTC'; SET application_name = 'changed'",
        );
        step(&mut conn, "reset", "RESET TimeZone");
        step(&mut conn, "to default", "SET application_name TO DEFAULT");
        step(&mut conn, "reset search_path", "RESET search_path");
        step(&mut conn, "begin", "BEGIN; SET TimeZone = 'UTC'");
        // Inside the transaction: the value the next statement on the same backend sees.
        step(&mut conn, "reset in a transaction", "RESET TimeZone");
        step(&mut conn, "commit", "COMMIT");
        step(&mut conn, "set again", "SET TIME ZONE 'UTC'");
        // Through the extended protocol (the unnamed statement).
        conn.send(&[
            parse("", "RESET TimeZone", &[]),
            bind_execute("", &[]),
            sync(),
        ]);
        let told = ok(conn.until_ready("extended RESET"), "extended RESET");
        let now = conn.value(check);
        steps.push(("extended reset", told, now));
        // A named statement prepared in one transaction, executed in a later one (on the
        // pooled port, possibly on another backend).
        conn.send(&[parse("reset_tz", "RESET TimeZone", &[]), sync()]);
        ok(conn.until_ready("Parse of a RESET"), "Parse of a RESET");
        let told = ok(
            conn.simple("SET TimeZone = 'UTC'"),
            "set before the named RESET",
        );
        steps.push(("set before the named reset", told, conn.value(check)));
        conn.send(&[bind_execute("reset_tz", &[]), sync()]);
        let told = ok(conn.until_ready("named RESET"), "named RESET");
        let now = conn.value(check);
        steps.push(("named reset", told, now));
        seen.push(steps);
    }
    let (direct, pooled) = (&seen[0], &seen[1]);
    let startup_view = "Etc/GMT+5 | lifecycle-reset | lc_nowhere, public";
    assert_eq!(
        direct[1].2, "Etc/GMT+5 | changed | lc_nowhere, public",
        "{direct:?}"
    );
    assert_eq!(
        direct[5].2, startup_view,
        "a real server's session: {direct:?}"
    );
    assert_eq!(direct.last().map(|s| s.2.as_str()), Some(startup_view));
    assert_eq!(pooled, direct, "pooled port vs a real server's session");

    // The one backend, after `RESET search_path` and `RESET TimeZone` there: another client
    // with the same startup parameters sees them.
    let mut other = connect(router.pooled_addr());
    assert_eq!(other.value(check), startup_view);
    let mut first = connect(router.pooled_addr());
    assert!(errors(&first.simple("RESET search_path")).is_empty());
    assert_eq!(
        other.value(check),
        startup_view,
        "after another client's RESET"
    );
}

/// A `SET` of a parameter PostgreSQL does not report (`search_path`, `statement_timeout`) stays
/// with the client that made it, as on a real server, and never reaches the next client of its
/// backend: the router reads the values back when such a transaction ends. Includes pg_dump's
/// `SET search_path TO ''; BEGIN; RESET search_path; ROLLBACK` (PgDog #1299), after which a real
/// server's session still has the empty search_path.
#[test]
fn unreported_sets_stay_with_their_client_on_a_shared_backend() {
    let f = fixture();
    let router = f.router(&PoolSettings::new(1), "app");
    let startup = [("search_path", "lc_nowhere, public")];
    let check = "select current_setting('search_path') || ' | ' || \
                 current_setting('statement_timeout')";
    let connect = |addr, startup: &[(&str, &str)]| f.app_at(addr, startup);
    let run = |conn: &mut RawConn, sql: &str| {
        let replies = conn.simple(sql);
        assert!(errors(&replies).is_empty(), "{sql}: {:?}", errors(&replies));
    };
    // What PostgreSQL 15 itself answers to this sequence with these startup parameters (a
    // byte-level client straight to the server gives the same, and so does the direct port).
    let expected = [
        "lc_nowhere, public | 0",
        "lc_other, public | 5s",
        "lc_third | 5s",
        "lc_nowhere, public | 5s",
        "lc_nowhere, public | 5s",
        "\"\" | 5s",
        "lc_nowhere, public | 0",
        "lc_third | 0",
        "lc_nowhere, public | 0",
    ];
    for addr in [router.direct_addr(), router.pooled_addr()] {
        let mut a = connect(addr, &startup);
        let mut steps = vec![a.value(check)];
        run(
            &mut a,
            "SET search_path TO lc_other, public; SET statement_timeout = '5s'",
        );
        steps.push(a.value(check));
        run(&mut a, "BEGIN; SET search_path TO lc_third; COMMIT");
        steps.push(a.value(check));
        run(&mut a, "RESET search_path");
        steps.push(a.value(check));
        // pg_dump's sequence: the ROLLBACK undoes the RESET.
        run(&mut a, "SET search_path TO ''");
        run(&mut a, "BEGIN");
        run(&mut a, "RESET search_path");
        steps.push(a.value(check));
        run(&mut a, "ROLLBACK");
        steps.push(a.value(check));
        run(
            &mut a,
            "SET SESSION search_path = DEFAULT; RESET statement_timeout",
        );
        steps.push(a.value(check));
        // A SET after the RESET in one query string is the last word, and the other way round.
        run(&mut a, "RESET search_path; SET search_path TO lc_third");
        steps.push(a.value(check));
        run(&mut a, "SET search_path TO lc_other; RESET search_path");
        steps.push(a.value(check));
        assert_eq!(steps, expected, "{addr} vs a real server's session");
    }

    // Two clients on the one backend: each sees only its own values.
    let mut a = connect(router.pooled_addr(), &startup);
    let mut b = connect(router.pooled_addr(), &[]);
    let b_default = b.value(check);
    assert_eq!(b_default, "\"$user\", public | 0");
    run(
        &mut a,
        "SET search_path TO '' ; SET statement_timeout = '7s'",
    );
    assert_eq!(b.value(check), b_default, "after a's SET");
    assert_eq!(a.value(check), "\"\" | 7s");
    // As pg_dump sends it: one statement at a time. (In one query string the router cannot
    // tell that the ROLLBACK undid the RESET: README, "Parameters follow the client".)
    run(&mut a, "BEGIN");
    run(&mut a, "RESET search_path");
    run(&mut a, "ROLLBACK");
    assert_eq!(b.value(check), b_default, "after a's rolled-back RESET");
    assert_eq!(a.value(check), "\"\" | 7s");
    assert_eq!(
        b.value("select count(*) from pg_catalog.pg_class where false"),
        "0"
    );
}

// ---------------------------------------------------------------------------------------------
// 9. Shutdown

#[test]
fn shutdown_lets_a_pooled_transaction_finish_then_ends_every_pooled_client_with_57p01() {
    let f = fixture();
    let drain = Duration::from_secs(2);
    let settings = PoolSettings::new(3);
    let mut router = TestRouter::start_with_config(&f.certs, &[f.branch("drain")], |text| {
        assert!(text.contains("drain = \"1s\""), "{text}");
        settings.apply(text.replace("drain = \"1s\"", "drain = \"2s\""))
    });
    let addr = router.pooled_addr();
    let mut idle = f.raw(&router, "drain", Mode::SslRequest);
    assert_eq!(idle.value("select 'idle from now on'"), "idle from now on");
    let mut finishing = f.raw(&router, "drain", Mode::Direct);
    let mut stuck = f.raw(&router, "drain", Mode::SslRequest);
    for (conn, value) in [
        (&mut finishing, "finished"),
        (&mut stuck, "never committed"),
    ] {
        assert_eq!(RawConn::status(&conn.simple("begin")), 'T');
        let inserted = errors(&conn.simple(&format!(
            "insert into lc_drain values ({})",
            quote_literal(value)
        )));
        assert!(inserted.is_empty(), "{inserted:?}");
    }

    let started = Instant::now();
    let shutdown = router.shutdown_in_background();
    // The drain: the transaction goes on and commits, and the client may start another.
    assert_eq!(
        finishing.value("select count(*) from lc_drain where v = 'finished'"),
        "1"
    );
    assert_eq!(RawConn::status(&finishing.simple("commit")), 'I');
    assert_eq!(
        finishing.value("select 'during the drain'"),
        "during the drain"
    );
    idle.expect_silence(HELD_WINDOW, "an idle pooled client during the drain");

    for (conn, what) in [
        (&mut idle, "idle client"),
        (&mut finishing, "client that finished its transaction"),
        (&mut stuck, "client still in its transaction"),
    ] {
        let error = expect_fatal_close(conn, what);
        assert_eq!(
            (error.code.as_str(), error.message.as_str()),
            ("57P01", ADMIN_SHUTDOWN_MESSAGE),
            "{what}"
        );
        let at = started.elapsed();
        assert!(
            at >= drain - Duration::from_millis(200),
            "{what} ended after {at:?}, before the {drain:?} drain was over"
        );
    }
    let deadline = Instant::now() + drain + QUICK;
    while !shutdown.is_finished() {
        assert!(Instant::now() < deadline, "the shutdown did not finish");
        thread::sleep(Duration::from_millis(20));
    }
    shutdown.join().expect("shutdown");
    assert!(
        refuses_connections(addr),
        "the pooled port still takes clients after the shutdown"
    );
    assert_eq!(
        f.pg.psql_admin("select string_agg(v, ',' order by v) from lc_drain"),
        "finished",
        "the committed transaction is kept, the unfinished one rolled back"
    );
    f.wait_backends("drain", 0, QUICK);
}

// ---------------------------------------------------------------------------------------------
// 10. Long messages

#[test]
fn long_queries_and_megabyte_values_stream_through_the_pooled_port() {
    let f = fixture();
    let router = f.router(&PoolSettings::new(1), "big");
    // A 30 KiB literal, simple and extended (unnamed statement) from the byte-level client.
    let literal = "x".repeat(30 * 1024);
    let long_sql = format!("select length('{literal}')::text");
    let mut a = f.raw(&router, "big", Mode::SslRequest);
    assert_eq!(a.value(&long_sql), (30 * 1024).to_string());
    a.send(&[parse("", &long_sql, &[]), bind_execute("", &[]), sync()]);
    assert_eq!(
        rows(&a.until_ready("long Parse"), "1 2 D C Z", "long Parse"),
        [(30 * 1024).to_string()]
    );
    let echoed = a.value(&format!("select '{literal}' || 'y'"));
    assert_eq!(echoed.len(), 30 * 1024 + 1);
    assert!(echoed.ends_with("xy"));

    block_on(async {
        let client = f.tokio_postgres(&router, "big").await;
        // A 1 MiB bytea parameter, and back.
        let value: Vec<u8> = (0..1024 * 1024).map(|i| (i * 7 % 251) as u8).collect();
        let row = client
            .query_one("select length($1::bytea), $1::bytea", &[&value])
            .await
            .expect("1 MiB parameter");
        assert_eq!(row.get::<_, i32>(0), 1024 * 1024);
        assert!(
            row.get::<_, &[u8]>(1) == value.as_slice(),
            "the bytea came back changed"
        );
        // A 2 MB row, simple and extended.
        let row = client
            .query_one("select repeat('x', 2000000)", &[])
            .await
            .expect("2 MB value");
        let text = row.get::<_, &str>(0);
        assert!(text.len() == 2_000_000 && text.bytes().all(|c| c == b'x'));
        let messages = client
            .simple_query("select repeat('y', 2000000), 'tail'")
            .await
            .expect("2 MB value, simple protocol");
        let row = messages
            .iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(row) => Some(row),
                _ => None,
            })
            .expect("a row");
        assert_eq!(row.get(0).map(str::len), Some(2_000_000));
        assert_eq!(row.get(1), Some("tail"));
        // tokio-postgres names every statement: a named one over 20 KiB is gathered whole and
        // kept, prepared once and run twice; one over 1 MiB is refused (README).
        let statement = client
            .prepare(&long_sql)
            .await
            .expect("a 30 KiB named Parse");
        for _ in 0..2 {
            let row = client.query_one(&statement, &[]).await.expect("run");
            assert_eq!(row.get::<_, &str>(0), (30 * 1024).to_string());
        }
        let huge = format!("select length('{}')::text", "x".repeat(2 * 1024 * 1024));
        let error = client
            .query_one(&huge, &[])
            .await
            .expect_err("a named Parse over 1 MiB");
        assert_db_error(&error, &SqlState::PROGRAM_LIMIT_EXCEEDED, "too long");
        let row = client
            .query_one("select 'after'", &[])
            .await
            .expect("after");
        assert_eq!(row.get::<_, &str>(0), "after");
    });
    // The one backend went back clean: the byte-level client shares it.
    assert_eq!(a.value("select 'still in step'"), "still in step");
}

// ---------------------------------------------------------------------------------------------
// A DDL under a prepared statement

#[test]
fn a_statement_whose_result_type_a_ddl_changed_is_prepared_again() {
    let f = fixture();
    let router = f.router(&PoolSettings::new(1), "ddl");
    let mut conn = f.raw(&router, "ddl", Mode::Direct);
    conn.send(&[parse("all_of", "select * from lc_ddl", &[]), sync()]);
    assert_eq!(tags(&conn.until_ready("Parse")), "1 Z");
    conn.send(&[bind_execute("all_of", &[]), sync()]);
    assert_eq!(first_column(&conn.until_ready("first run")), ["1"]);
    // The table gains a column: the backend's plan for the statement is stale.
    f.pg.psql_admin("ALTER TABLE lc_ddl ADD COLUMN b int DEFAULT 2");
    conn.send(&[bind_execute("all_of", &[]), sync()]);
    let replies = conn.until_ready("after the DDL");
    assert_eq!(
        error_codes(&replies),
        ["0A000"],
        "PostgreSQL's own error, once"
    );
    // The router dropped the backend's statements: the next run prepares it again and sees
    // both columns (a real server would keep failing until the client prepared it again).
    conn.send(&[bind_execute("all_of", &[]), sync()]);
    let replies = conn.until_ready("prepared again");
    assert_eq!(tags(&replies), "2 D C Z", "{:?}", errors(&replies));
    let row = branchgate_e2e::raw::data_row(&replies[1].1);
    assert_eq!(row, [Some("1".to_owned()), Some("2".to_owned())]);
}

/// PostgreSQL's answer to a statement whose plan no longer has the row shape it was described
/// with: `(code, message)`.
const CHANGED_RESULT_TYPE: (&str, &str) = ("0A000", "cached plan must not change result type");

fn only_error(replies: &[Reply], what: &str) -> (String, String) {
    assert_eq!(tags(replies), "E Z", "{what}: {replies:?}");
    let error = &errors(replies)[0];
    (error.code.clone(), error.message.clone())
}

/// What no pooler did before: a statement the client was told the row shape of, given by the
/// router to a backend after a DDL changed that shape, must fail as on a real server (which
/// keeps the plan it prepared) and not send rows the client would read with the old
/// description. asyncpg read a float4 column's bytes as the int4 it was told of, without an
/// error; on PostgreSQL itself it gets 0A000, prepares the statement again and reads 1.5.
#[test]
fn a_statement_described_before_a_ddl_fails_on_every_backend_until_prepared_again() {
    let f = fixture();
    let router = f.router(&PoolSettings::new(2), "shape");
    let mut a = f.raw(&router, "shape", Mode::Direct);
    let mut b = f.raw(&router, "shape", Mode::SslRequest);
    let mut d = f.raw(&router, "shape", Mode::Direct);
    let pid = |conn: &mut RawConn| conn.value("select pg_backend_pid()");
    // b holds the pool's first backend (X): `a` prepares the statement on the second (Y) and
    // is told its one column.
    assert_eq!(tags(&b.simple("BEGIN")), "C Z");
    let b_pid = pid(&mut b);
    a.send(&[
        parse("all_of", "select * from lc_shape", &[]),
        describe(b'S', "all_of"),
        bind_execute("all_of", &[]),
        parse("", "select pg_backend_pid()", &[]),
        bind_execute("", &[]),
        sync(),
    ]);
    let replies = a.until_ready("prepared and described");
    assert_eq!(
        tags(&replies),
        "1 t T 2 D C 1 2 D C Z",
        "{:?}",
        errors(&replies)
    );
    assert_eq!(row_description(&replies[2].1), [("a".to_owned(), 23)]);
    let y_pid = branchgate_e2e::raw::data_row(&replies[8].1)[0].clone();
    assert_ne!(
        y_pid.as_deref(),
        Some(b_pid.as_str()),
        "a ran on the other backend"
    );
    // d prepares the same text on Y (which has it) and is told the same one column.
    d.send(&[
        parse("mine", "select * from lc_shape", &[]),
        describe(b'S', "mine"),
        sync(),
    ]);
    assert_eq!(tags(&d.until_ready("d prepares")), "1 t T Z");
    // X goes back last, so it is lent next (newest idle first).
    assert_eq!(tags(&b.simple("COMMIT")), "C Z");
    f.pg.psql_admin("ALTER TABLE lc_shape ADD COLUMN b int DEFAULT 2");
    // `a` binds on X, which has never had the statement: the router gives it and asks for its
    // row shape first. Two columns, where `a` was told one: PostgreSQL's error, nothing run.
    a.send(&[bind_execute("all_of", &[]), sync()]);
    let replies = a.until_ready("bound on a backend given the statement after the DDL");
    let (code, message) = only_error(&replies, "after the DDL");
    assert_eq!((code.as_str(), message.as_str()), CHANGED_RESULT_TYPE);
    assert_eq!(pid(&mut a), b_pid, "a was lent X");
    // As on a real server, the statement keeps failing (Describe too) until prepared again.
    a.send(&[describe(b'S', "all_of"), sync()]);
    let (code, _) = only_error(&a.until_ready("described again"), "described again");
    assert_eq!(code, CHANGED_RESULT_TYPE.0);
    a.send(&[
        close(b'S', "all_of"),
        parse("all_of", "select * from lc_shape", &[]),
        describe(b'S', "all_of"),
        bind_execute("all_of", &[]),
        sync(),
    ]);
    let replies = a.until_ready("prepared again");
    assert_eq!(tags(&replies), "3 1 t T 2 D C Z", "{:?}", errors(&replies));
    assert_eq!(
        row_description(&replies[3].1),
        [("a".to_owned(), 23), ("b".to_owned(), 23)]
    );
    assert_eq!(
        branchgate_e2e::raw::data_row(&replies[5].1),
        [Some("1".to_owned()), Some("2".to_owned())]
    );
    // d, told one column before the DDL, is lent X (back last), where the text is prepared
    // with two: refused at once, as PostgreSQL refuses it; prepared again, it reads both.
    d.send(&[bind_execute("mine", &[]), sync()]);
    let replies = d.until_ready("bound where the text has the new shape");
    let (code, message) = only_error(&replies, "d after the DDL");
    assert_eq!((code.as_str(), message.as_str()), CHANGED_RESULT_TYPE);
    d.send(&[
        close(b'S', "mine"),
        parse("mine", "select * from lc_shape", &[]),
        bind_execute("mine", &[]),
        sync(),
    ]);
    let replies = d.until_ready("d prepares again");
    assert_eq!(tags(&replies), "3 1 2 D C Z", "{:?}", errors(&replies));
    // A client that prepares the text only now runs the new plan on Y too, which still had the
    // old one (PostgreSQL answers a statement parsed after the DDL with no 0A000): once the
    // router found the change, every backend of the pool drops its statements first.
    assert_eq!(tags(&b.simple("BEGIN")), "C Z");
    let mut e = f.raw(&router, "shape", Mode::Direct);
    e.send(&[
        parse("fresh", "select * from lc_shape", &[]),
        bind_execute("fresh", &[]),
        parse("", "select pg_backend_pid()", &[]),
        bind_execute("", &[]),
        sync(),
    ]);
    let replies = e.until_ready("prepared after the DDL, on Y");
    assert_eq!(
        tags(&replies),
        "1 2 D C 1 2 D C Z",
        "{:?}",
        errors(&replies)
    );
    assert_eq!(
        branchgate_e2e::raw::data_row(&replies[2].1),
        [Some("1".to_owned()), Some("2".to_owned())]
    );
    assert_eq!(
        branchgate_e2e::raw::data_row(&replies[6].1)[0],
        y_pid,
        "e was lent Y"
    );
    assert_eq!(tags(&b.simple("COMMIT")), "C Z");
    // Nothing ran twice and nothing was left half done: the backends serve both clients.
    assert_eq!(a.value("select count(*) from lc_shape"), "1");
}

/// A statement's parameter types are fixed when it is prepared, as on a server: two clients
/// that prepared the same text either side of a DDL that changed what the server infers for
/// its parameter (a column from int4 to float4) were told different types, and each sends its
/// values in binary by its own. Whichever backend runs it, each client's statement must read
/// its values with the types that client was told: PostgreSQL stores 1.5 for the client that
/// prepared after the DDL, and 1 (cast) for the one that prepared before, where a backend
/// prepared with the other client's types reads the same four bytes as 1069547520 or 1e-45.
#[test]
fn each_clients_parameter_types_hold_on_a_backend_prepared_with_another_clients() {
    let f = fixture();
    let router = f.router(&PoolSettings::new(2), "ptypes");
    let mut a = f.raw(&router, "ptypes", Mode::Direct);
    let mut b = f.raw(&router, "ptypes", Mode::SslRequest);
    let mut d = f.raw(&router, "ptypes", Mode::Direct);
    let pid = |conn: &mut RawConn| conn.value("select pg_backend_pid()");
    const INSERT: &str = "insert into lc_types values ($1)";
    // `messages`, then the backend's pid, in one batch: the replies (checked against `tags`)
    // and the pid of the backend they ran on.
    let on_backend = |conn: &mut RawConn, messages: Vec<Vec<u8>>, expected: &str, what: &str| {
        let mut batch = messages;
        batch.extend([
            parse("", "select pg_backend_pid()", &[]),
            bind_execute("", &[]),
            sync(),
        ]);
        conn.send(&batch);
        let replies = conn.until_ready(what);
        assert_eq!(tags(&replies), expected, "{what}: {:?}", errors(&replies));
        let pid = replies
            .iter()
            .rev()
            .find(|(tag, _)| *tag == b'D')
            .and_then(|(_, body)| raw::data_row(body)[0].clone())
            .expect("a pid");
        (replies, pid)
    };
    let prepare = |conn: &mut RawConn, what: &str| {
        let messages = vec![parse("ins", INSERT, &[]), describe(b'S', "ins")];
        let (replies, pid) = on_backend(conn, messages, "1 t n 1 2 D C Z", what);
        (raw::parameter_description(&replies[1].1), pid)
    };
    let insert = |conn: &mut RawConn, value: &[u8], what: &str| {
        let messages = vec![bind_binary("ins", &[value]), execute("", 0)];
        on_backend(conn, messages, "2 C 1 2 D C Z", what).1
    };
    // b holds the pool's first backend (X): `a` prepares the statement on the second (Y) and is
    // told int4.
    assert_eq!(tags(&b.simple("BEGIN")), "C Z");
    let x_pid = pid(&mut b);
    let (types, y_pid) = prepare(&mut a, "a prepares");
    assert_eq!(types, [23], "a is told int4");
    assert_ne!(y_pid, x_pid, "a ran on the other backend");
    // X goes back last, so it is lent next (newest idle first).
    assert_eq!(tags(&b.simple("COMMIT")), "C Z");
    f.pg.psql_admin("ALTER TABLE lc_types ALTER COLUMN a TYPE float4");
    // d prepares the same text after the DDL, on X, which has never had it: float4.
    let (types, backend) = prepare(&mut d, "d prepares after the DDL");
    assert_eq!(types, [700], "d is told float4");
    assert_eq!(backend, x_pid, "d was lent X");
    // d's 1.5 on Y, which has the text prepared with a's int4.
    assert_eq!(tags(&b.simple("BEGIN")), "C Z");
    let float_1_5 = 1.5f32.to_be_bytes();
    assert_eq!(insert(&mut d, &float_1_5, "d's 1.5 on Y"), y_pid);
    assert_eq!(tags(&b.simple("COMMIT")), "C Z");
    // a's 1 on X (back last), which has the text prepared with d's float4.
    assert_eq!(insert(&mut a, &1i32.to_be_bytes(), "a's 1 on X"), x_pid);
    // d's 1.5 on X again, now that a's statement ran there.
    assert_eq!(insert(&mut d, &float_1_5, "d's 1.5 on X"), x_pid);
    assert_eq!(
        first_column(&b.simple("select a::text from lc_types order by a")),
        ["1", "1.5", "1.5"],
        "what PostgreSQL stores for each client's statement"
    );
}

/// PostgreSQL parses a statement when the client sends its Parse, from the catalog as it is
/// then: a client that prepares a text after a DDL changed its parameter's type and its
/// result's is told the new ones, whether its Parse came with its Describe or on its own
/// between transactions, even on a backend that still has the text from before the DDL. A
/// pooler that answers the Parse from that plan tells it the old ones: asyncpg then encodes
/// 1.5 as the int4 1, without an error (seen through PgBouncer 1.25.2 too), and a Describe of
/// the old plan fails with 0A000, which PostgreSQL never answers a statement just parsed.
#[test]
fn a_statement_parsed_after_a_ddl_is_told_what_the_ddl_made_on_a_backend_with_the_old_plan() {
    let f = fixture();
    // One backend: every client's statement meets the plan the others left there.
    let router = f.router(&PoolSettings::new(1), "fresh");
    let mut a = f.raw(&router, "fresh", Mode::Direct);
    let mut b = f.raw(&router, "fresh", Mode::SslRequest);
    let mut c = f.raw(&router, "fresh", Mode::Direct);
    const INSERT: &str = "insert into lc_fresh values ($1)";
    const SELECT: &str = "select a from lc_fresh_rows";
    let prepare_both = |conn: &mut RawConn, what: &str| {
        conn.send(&[
            parse("ins", INSERT, &[]),
            describe(b'S', "ins"),
            parse("sel", SELECT, &[]),
            describe(b'S', "sel"),
            sync(),
        ]);
        let replies = conn.until_ready(what);
        assert_eq!(
            tags(&replies),
            "1 t n 1 t T Z",
            "{what}: {:?}",
            errors(&replies)
        );
        (
            raw::parameter_description(&replies[1].1),
            row_description(&replies[5].1),
        )
    };
    let (types, columns) = prepare_both(&mut a, "a prepares before the DDL");
    assert_eq!(types, [23]);
    assert_eq!(columns, [("a".to_owned(), 23)]);
    f.pg.psql_admin(
        "ALTER TABLE lc_fresh ALTER COLUMN a TYPE float4; \
         ALTER TABLE lc_fresh_rows ALTER COLUMN a TYPE text",
    );
    // c's Parse alone, between transactions (the router answers it: the pool's backends
    // accepted the text), then its Describe: float4.
    c.send(&[parse("ins", INSERT, &[]), sync()]);
    assert_eq!(tags(&c.until_ready("c parses")), "1 Z");
    c.send(&[describe(b'S', "ins"), sync()]);
    let replies = c.until_ready("c describes");
    assert_eq!(tags(&replies), "t n Z", "{:?}", errors(&replies));
    assert_eq!(
        raw::parameter_description(&replies[0].1),
        [700],
        "c is told float4"
    );
    // b's Parse with its Describe: float4, and the column as text.
    let (types, columns) = prepare_both(&mut b, "b prepares after the DDL");
    assert_eq!(types, [700], "b is told float4");
    assert_eq!(columns, [("a".to_owned(), 25)], "b is told text");
    // Each client's values by the types it was told, on the one backend in turn: what
    // PostgreSQL stores for each session's statement (a's int4 1 cast to float4).
    let insert = |conn: &mut RawConn, value: &[u8], what: &str| {
        conn.send(&[bind_binary("ins", &[value]), execute("", 0), sync()]);
        let replies = conn.until_ready(what);
        assert_eq!(tags(&replies), "2 C Z", "{what}: {:?}", errors(&replies));
    };
    insert(&mut b, &1.5f32.to_be_bytes(), "b's 1.5");
    insert(&mut a, &1i32.to_be_bytes(), "a's 1");
    insert(&mut c, &2.5f32.to_be_bytes(), "c's 2.5");
    assert_eq!(
        first_column(&b.simple("select a::text from lc_fresh order by a")),
        ["1", "1.5", "2.5"]
    );
    // b's select reads the text column; a's, told int4 before the DDL, fails as a session's
    // would.
    b.send(&[bind_execute("sel", &[]), sync()]);
    assert_eq!(first_column(&b.until_ready("b selects")), ["7"]);
    a.send(&[bind_execute("sel", &[]), sync()]);
    let (code, message) = only_error(&a.until_ready("a selects"), "a selects");
    assert_eq!((code.as_str(), message.as_str()), CHANGED_RESULT_TYPE);
}

/// A client that prepared a text after a DDL changed its result type, told the new row
/// shape, binds it inside its transaction block on a backend that has the text from before the
/// DDL, from a client that never described it (so the router does not know that plan's shape).
/// On a server the client's own plan runs. Asking the old plan for its shape (a Describe)
/// fails with 0A000 and aborts the client's block: the router prepares the client's statement
/// there instead, then asks.
#[test]
fn a_fresh_statement_bound_in_a_block_on_a_backend_with_an_old_undescribed_plan_runs() {
    let f = fixture();
    let router = f.router(&PoolSettings::new(2), "olds");
    let mut h = f.raw(&router, "olds", Mode::Direct);
    let mut p = f.raw(&router, "olds", Mode::SslRequest);
    let mut n = f.raw(&router, "olds", Mode::Direct);
    const SELECT: &str = "select a from lc_olds";
    let pid = |conn: &mut RawConn| conn.value("select pg_backend_pid()");
    // h holds the first backend (X); p runs the text on the second (Y), never describing it.
    assert_eq!(tags(&h.simple("BEGIN")), "C Z");
    let x_pid = pid(&mut h);
    p.send(&[parse("q", SELECT, &[]), bind_execute("q", &[]), sync()]);
    let replies = p.until_ready("p runs the text");
    assert_eq!(tags(&replies), "1 2 D C Z", "{:?}", errors(&replies));
    assert_ne!(pid(&mut p), x_pid, "p ran on Y");
    assert_eq!(tags(&h.simple("COMMIT")), "C Z");
    f.pg.psql_admin("ALTER TABLE lc_olds ALTER COLUMN a TYPE text");
    // n prepares the text on X (back last, lent next) and is told a text column.
    n.send(&[parse("mine", SELECT, &[]), describe(b'S', "mine"), sync()]);
    let replies = n.until_ready("n prepares");
    assert_eq!(tags(&replies), "1 t T Z", "{:?}", errors(&replies));
    assert_eq!(row_description(&replies[2].1), [("a".to_owned(), 25)]);
    // h holds X again; n opens a block on Y and runs its statement there.
    assert_eq!(tags(&h.simple("BEGIN")), "C Z");
    assert_eq!(pid(&mut h), x_pid);
    assert_eq!(tags(&n.simple("BEGIN")), "C Z");
    assert_ne!(pid(&mut n), x_pid, "n's block is on Y");
    n.send(&[bind_execute("mine", &[]), sync()]);
    let replies = n.until_ready("n runs its statement on Y");
    assert_eq!(tags(&replies), "2 D C Z", "{:?}", errors(&replies));
    assert_eq!(first_column(&replies), ["7"]);
    assert_eq!(
        replies.last().map(|(_, body)| body.clone()),
        Some(b"T".to_vec())
    );
    assert_eq!(tags(&n.simple("COMMIT")), "C Z");
    assert_eq!(tags(&h.simple("COMMIT")), "C Z");
}

// ---------------------------------------------------------------------------------------------
// Long pipelines

#[test]
fn a_pipeline_longer_than_the_routers_reply_bound_completes() {
    let f = fixture();
    let router = f.router(&PoolSettings::new(1), "piper");
    let mut conn = f.raw(&router, "piper", Mode::Direct);
    // Three thousand Parses and one Sync, in one write: more replies owed than the router lets
    // pile up, each too small for PostgreSQL to flush before the Sync it has not seen yet.
    const PARSES: usize = 3000;
    let mut batch: Vec<Vec<u8>> = (0..PARSES)
        .map(|i| parse(&format!("many_{i}"), &format!("select {i}"), &[]))
        .collect();
    batch.push(sync());
    conn.send(&batch);
    let replies = conn.until_ready("a long pipeline");
    assert_eq!(replies.len(), PARSES + 1, "{:?}", errors(&replies));
    assert!(replies[..PARSES].iter().all(|(tag, _)| *tag == b'1'));
    // The names are the client's: the last one runs.
    conn.send(&[bind_execute(&format!("many_{}", PARSES - 1), &[]), sync()]);
    assert_eq!(
        first_column(&conn.until_ready("the last statement")),
        [(PARSES - 1).to_string()]
    );
}
