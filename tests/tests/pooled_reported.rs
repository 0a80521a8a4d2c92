//! Pooler bugs reported against PgBouncer, PgDog and pg_doorman, each reproduced against the
//! pooled port: a backend killed while idle in the pool, fastpath function calls, a Parse left
//! behind by a vanished client, prepared statements evicted inside a pipeline, a cancel while
//! the pool is full, `SET`s that fail, stick or must not stick, pipelines that span an error or
//! a suspended portal, a portal named like a statement, and startup parameters built to inject
//! SQL. Each test's doc comment names the upstream issue and what went wrong there. The last
//! section holds defects an outside review found in this router itself, the same way.
//!
//! Against a real PostgreSQL 15, always over TLS, with psql and a byte-level client; where the
//! right answer is "what PostgreSQL itself says", the same bytes also go straight to the server
//! (plaintext, as the superuser) and the answers are compared.
//!
//! One PostgreSQL server per binary; every test starts its own router (one worker) and logs in
//! with a role of its own, so its backends can be counted in pg_stat_activity by user name while
//! other tests run.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use branchgate_e2e::pg::quote_literal;
use branchgate_e2e::raw::{
    self, bind, bind_execute, cancel_request, close, describe, error_codes, errors, execute,
    first_column, flush, login_reporting, message, next_message, parameter_status, parse, query,
    startup_message, sync, tags, Login, Mode, PgError, RawConn, Reply, PROTOCOL_3_0,
};
use branchgate_e2e::tools;
use branchgate_e2e::{
    BranchSpec, Certs, Conninfo, PgServer, PoolSettings, TestRouter, ADMIN_PASSWORD, ADMIN_USER,
};

const BRANCH: &str = "b1";
/// One role per test, so that each test's backends can be told apart in pg_stat_activity.
const ROLES: [&str; 29] = [
    "killed", "lobj", "orphan", "evict", "cancel", "badset", "sticky", "race", "pipe", "portal",
    "samename", "inject", "residue", "owed", "badtype", "unnamed", "aborted", "audit", "dealloc",
    "many", "stmts", "locker", "revoked", "jwt", "resync", "setrole", "discard", "resetall",
    "chars",
];

/// A bound on anything that should take milliseconds (a handover, a cancel, a backend's exit).
const QUICK: Duration = Duration::from_secs(3);
/// How long a client that the router must hold back is watched for a premature answer.
const HELD_WINDOW: Duration = Duration::from_millis(400);
/// How long psql may run before the test calls it stuck.
const PSQL_DEADLINE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Fixture

struct Fixture {
    certs: Certs,
    pg: PgServer,
    /// Each role's SCRAM verifier.
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
        // An injected `create table pwned()` must be able to succeed, or its absence would
        // prove nothing (PostgreSQL 15 gives no one CREATE on public by default).
        pg.psql_admin("GRANT CREATE ON SCHEMA public TO inject");
        pg.psql_admin(
            "CREATE ROLE audit_other; GRANT audit_other TO audit; \
             CREATE TABLE audit_t (v int); GRANT ALL ON audit_t TO audit, audit_other; \
             CREATE SCHEMA audit_schema; GRANT USAGE ON SCHEMA audit_schema TO audit",
        );
        pg.psql_admin(
            "CREATE ROLE revoked_grant; GRANT revoked_grant TO revoked; \
             CREATE TABLE revoked_t (who text DEFAULT current_user); \
             GRANT ALL ON revoked_t TO revoked, revoked_grant",
        );
        // Every statement `jwt`'s, `setrole`'s, `discard`'s, `resetall`'s and `chars`'s
        // backends run goes to the server's log.
        pg.psql_admin(
            "CREATE ROLE jwt_anon; GRANT jwt_anon TO jwt; ALTER ROLE jwt SET log_statement = 'all'",
        );
        pg.psql_admin(
            "CREATE ROLE setrole_other; GRANT setrole_other TO setrole; \
             ALTER ROLE setrole SET log_statement = 'all'",
        );
        pg.psql_admin(
            "CREATE ROLE discard_other; GRANT discard_other TO discard; \
             ALTER ROLE discard SET log_statement = 'all'",
        );
        pg.psql_admin(
            "CREATE ROLE resetall_other; GRANT resetall_other TO resetall; \
             ALTER ROLE resetall SET log_statement = 'all'",
        );
        pg.psql_admin("ALTER ROLE chars SET log_statement = 'all'");
        Fixture {
            certs: Certs::generate(),
            pg,
            verifiers,
        }
    })
}

/// The password `role` was created with.
fn password(role: &str) -> String {
    format!("pscale_pw_reported_{role}_J3")
}

/// The user name of `role` on the test branch.
fn user(role: &str) -> String {
    format!("{role}.{BRANCH}")
}

impl Fixture {
    /// A router of its own for one test, one worker, branch b1 with `role`.
    fn router(&self, settings: &PoolSettings, role: &str) -> TestRouter {
        let branch = BranchSpec::new(BRANCH, self.pg.addr()).role(role, &self.verifiers[role]);
        settings.start(&self.certs, &[branch])
    }

    /// A byte-level client of the pooled port as `role`.
    fn raw(&self, router: &TestRouter, role: &str, mode: Mode) -> RawConn {
        self.raw_with(router, role, mode, &[])
    }

    /// As [`Fixture::raw`], with startup parameters.
    fn raw_with(
        &self,
        router: &TestRouter,
        role: &str,
        mode: Mode,
        startup: &[(&str, &str)],
    ) -> RawConn {
        RawConn::connect(
            router.pooled_addr(),
            self.certs.client_config(),
            mode,
            &user(role),
            &password(role),
            startup,
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

    /// Polls until `pid` is no longer in pg_stat_activity.
    fn wait_gone(&self, pid: i32) {
        self.pg.wait_for_value_within(
            &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}"),
            "0",
            QUICK,
        );
    }

    /// Polls until `role` has a backend running `sql` right now (an unfinished extended-protocol
    /// message counts: PostgreSQL shows a Parse as `active` until its Sync).
    fn wait_running(&self, role: &str, sql: &str) {
        self.pg.wait_for_value_within(
            &format!(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = {} \
                 AND state = 'active' AND query = {}",
                quote_literal(role),
                quote_literal(sql)
            ),
            "1",
            QUICK,
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// A client that sends bytes and reads backend messages: the pooled port's [`RawConn`] and
/// [`Straight`], so the same steps can run against both.
trait Wire {
    /// Writes `messages` in one write.
    fn send_all(&mut self, messages: &[Vec<u8>]);

    /// The next message; panics on a close or an error.
    fn next_reply(&mut self, what: &str) -> Reply;

    /// Messages up to and including the `count`th ReadyForQuery from now.
    fn ready_n(&mut self, count: usize, what: &str) -> Vec<Reply> {
        let mut replies = Vec::new();
        let mut left = count;
        while left > 0 {
            let reply = self.next_reply(what);
            if reply.0 == b'Z' {
                left -= 1;
            }
            replies.push(reply);
        }
        replies
    }

    /// A simple Query and its replies up to ReadyForQuery.
    fn run(&mut self, sql: &str) -> Vec<Reply> {
        self.send_all(&[query(sql)]);
        self.ready_n(1, sql)
    }
}

impl Wire for RawConn {
    fn send_all(&mut self, messages: &[Vec<u8>]) {
        self.send(messages);
    }

    fn next_reply(&mut self, what: &str) -> Reply {
        self.next(what)
    }
}

/// A byte-level client straight to PostgreSQL (plaintext TCP, the superuser, SCRAM): what a
/// real server answers, to hold the pooled port's answers against.
struct Straight {
    sock: TcpStream,
}

impl Straight {
    /// Logs in to `pg` as the superuser with `startup` parameters; `Err` is PostgreSQL's
    /// refusal (a FATAL after authentication, for a bad parameter value).
    fn connect(pg: &PgServer, startup: &[(&str, &str)]) -> Result<(Straight, Login), PgError> {
        let mut sock = raw::tcp(pg.addr());
        let mut params = vec![("user", ADMIN_USER), ("database", "postgres")];
        params.extend_from_slice(startup);
        sock.write_all(&startup_message(PROTOCOL_3_0, &params))
            .expect("send StartupMessage to PostgreSQL");
        // Plaintext: PostgreSQL offers SCRAM-SHA-256 only (no -PLUS without TLS).
        raw::expect_sasl(&mut sock, "straight to PostgreSQL");
        let login = login_reporting(&mut sock, ADMIN_PASSWORD)?;
        Ok((Straight { sock }, login))
    }
}

impl Straight {
    /// The next message, or `None` once PostgreSQL closed the connection.
    fn next_reply_or_end(&mut self) -> Option<Reply> {
        raw::read_message(&mut self.sock).expect("read from PostgreSQL")
    }
}

impl Wire for Straight {
    fn send_all(&mut self, messages: &[Vec<u8>]) {
        self.sock
            .write_all(&messages.concat())
            .expect("send to PostgreSQL");
    }

    fn next_reply(&mut self, what: &str) -> Reply {
        next_message(&mut self.sock, what)
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

/// `count` single messages (no ReadyForQuery expected among them), e.g. the replies to a
/// Flush.
fn next_n(conn: &mut RawConn, count: usize, what: &str) -> Vec<Reply> {
    (0..count).map(|_| conn.next(what)).collect()
}

/// Messages up to the next ReadyForQuery, each within `timeout` (a client the router must not
/// keep waiting).
fn ready_within(conn: &mut RawConn, timeout: Duration, what: &str) -> Vec<Reply> {
    conn.set_read_timeout(timeout);
    let replies = conn.until_ready(what);
    conn.set_read_timeout(raw::IO_TIMEOUT);
    replies
}

/// The ParameterStatus messages among `replies`, as (name, value).
fn parameter_statuses(replies: &[Reply]) -> Vec<(String, String)> {
    replies
        .iter()
        .filter(|(tag, _)| *tag == b'S')
        .map(|(_, body)| parameter_status(body))
        .collect()
}

/// FunctionCall (F) of the function with `oid`, no arguments, text result.
fn function_call(oid: u32) -> Vec<u8> {
    let body = [
        &oid.to_be_bytes()[..],
        &0u16.to_be_bytes(), // argument format codes
        &0u16.to_be_bytes(), // arguments
        &0u16.to_be_bytes(), // result format: text
    ]
    .concat();
    message(b'F', &body)
}

/// The value of a FunctionCallResponse (B) in text format.
fn function_result(body: &[u8]) -> String {
    let len = i32::from_be_bytes(body[..4].try_into().expect("4 bytes"));
    let len = usize::try_from(len).expect("not NULL");
    String::from_utf8(body[4..4 + len].to_vec()).expect("UTF-8 result")
}

/// Sends `key`'s CancelRequest to `addr` in plaintext and waits until the router closes the
/// connection (it answers nothing).
fn send_cancel(addr: SocketAddr, key: (u32, u32)) {
    let mut sock = raw::tcp(addr);
    sock.write_all(&cancel_request(key.0, key.1))
        .expect("send CancelRequest");
    let mut rest = Vec::new();
    let _ = sock.read_to_end(&mut rest);
    assert!(rest.is_empty(), "a CancelRequest was answered: {rest:?}");
}

/// psql 15 through the pooled port (SSLRequest, verify-full) as `role`, running `script` from
/// stdin and stopping at the first error: (stdout, stderr).
fn psql_script(f: &Fixture, router: &TestRouter, role: &str, script: &str) -> (String, String) {
    // psql 15's libpq predates sslnegotiation.
    let conninfo = Conninfo::new(router.pooled_addr())
        .localhost()
        .user(&user(role))
        .password(&password(role))
        .verify_full_sslrequest(&f.certs.ca_path());
    tools::psql_script(&conninfo.to_string(), script, true, PSQL_DEADLINE)
}

// ---------------------------------------------------------------------------------------------
// 1. A backend that died idle in the pool

/// PgDog #614, fixed by PR #1318: health checks ran only every `healthcheck_interval`, so a
/// backend terminated by `pg_terminate_backend` while idle in the pool stayed there and was
/// handed to the next client unchecked, which got the dead connection's error (57P01) in place
/// of its result.
#[test]
fn a_backend_terminated_while_idle_in_the_pool_is_not_lent_again() {
    let f = fixture();
    let router = f.router(&PoolSettings::new(1), "killed");
    let mut a = f.raw(&router, "killed", Mode::SslRequest);
    let first = pid_of(&mut a);
    assert_eq!(
        f.pg.psql_admin(&format!("SELECT pg_terminate_backend({first})")),
        "t"
    );
    f.wait_gone(first);

    // The dead backend's FATAL (57P01) was sent to the router, not to a, which holds nothing.
    a.expect_silence(HELD_WINDOW, "a, idle, after its backend was terminated");

    a.send(&[query("select pg_backend_pid()")]);
    let replies = ready_within(&mut a, QUICK, "a after the kill");
    let second: i32 = rows(&replies, "T D C Z", "a after the kill")[0]
        .parse()
        .expect("a pid");
    assert_ne!(second, first, "a was lent the terminated backend");
    let mut b = f.raw(&router, "killed", Mode::Direct);
    b.send(&[query("select pg_backend_pid()")]);
    let replies = ready_within(&mut b, QUICK, "b after the kill");
    assert_eq!(
        rows(&replies, "T D C Z", "b after the kill"),
        [second.to_string()],
        "b shares a's new backend"
    );
    assert_eq!(f.backend_pids("killed"), [second]);
    assert_eq!(a.value("select 'a again'"), "a again");
}

// ---------------------------------------------------------------------------------------------
// 2. Fastpath function calls

/// pg_doorman #267 (fixed by PR #268) and PgDog #956: FunctionCall ('F'), the fastpath that
/// libpq's and pgjdbc's large-object APIs use, was not handled as a round trip of its own in
/// transaction pooling; pg_doorman's fix passes FunctionCallResponse ('V') through and lets the
/// ReadyForQuery after it decide when the backend goes back. Here: psql's `\lo_import` and
/// `\lo_unlink` (fastpath calls inside the transaction psql opens), then a FunctionCall on its
/// own, outside any transaction block, then the next client on the same backend.
#[test]
fn fastpath_function_calls_of_psql_large_objects_and_outside_a_transaction_work() {
    const CONTENT: &str = "large object through the pooled port";
    let f = fixture();
    let router = f.router(&PoolSettings::new(1), "lobj");
    let file = router.dir().join("lobj.txt");
    std::fs::write(&file, CONTENT).expect("write the file to import");
    let file = file.to_str().expect("UTF-8 temp path");
    // psql -q prints nothing for \lo_import and \lo_unlink; LASTOID is the new object's OID.
    let (stdout, stderr) = psql_script(
        f,
        &router,
        "lobj",
        &format!(
            "select pg_backend_pid();\n\
             \\lo_import {}\n\
             \\echo :LASTOID\n\
             select encode(lo_get(:LASTOID), 'escape');\n\
             \\lo_unlink :LASTOID\n\
             select count(*) from pg_largeobject_metadata where oid = :LASTOID;\n",
            quote_literal(file)
        ),
    );
    assert_eq!(stderr, "", "{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{stdout}");
    let psql_pid: i32 = lines[0].parse().expect("psql's backend pid");
    assert!(lines[1].parse::<u32>().is_ok(), "an OID: {stdout}");
    assert_eq!(lines[2..], [CONTENT, "0"], "{stdout}");

    // A FunctionCall on its own, outside any transaction block: the backend goes back after
    // its ReadyForQuery, to the next client.
    let oid: u32 =
        f.pg.psql_admin("SELECT 'pg_catalog.pg_backend_pid'::regproc::oid")
            .parse()
            .expect("an OID");
    let mut a = f.raw(&router, "lobj", Mode::SslRequest);
    let mut b = f.raw(&router, "lobj", Mode::Direct);
    a.send(&[function_call(oid)]);
    let replies = ready_within(&mut a, QUICK, "FunctionCall");
    assert_eq!(tags(&replies), "V Z", "{:?}", errors(&replies));
    assert_eq!(RawConn::status(&replies), 'I');
    assert_eq!(function_result(&replies[0].1), psql_pid.to_string());
    b.send(&[query("select pg_backend_pid()")]);
    let replies = ready_within(&mut b, QUICK, "b after a's FunctionCall");
    assert_eq!(
        rows(&replies, "T D C Z", "b"),
        [psql_pid.to_string()],
        "the one backend, kept through psql's session and a's FunctionCall"
    );
    assert_eq!(a.value("select 'a after'"), "a after");
}

// ---------------------------------------------------------------------------------------------
// 3. A Parse left behind

/// pg_doorman PR #164: a client sends a named Parse with nothing after it (no Sync, no Flush)
/// and goes away. The pooler's record of which statements its backend holds must not take the
/// unanswered Parse as done (the next client would be told "prepared statement does not
/// exist") nor forget a statement the backend does hold (the next Parse of it would be 42P05);
/// and a name nobody parsed is still unknown (26000).
#[test]
fn a_named_parse_without_sync_from_a_client_that_vanished_does_not_reach_the_next_client() {
    const SQL: &str = "select $1::int + 1 /* orphan */";
    let f = fixture();
    let router = f.router(&PoolSettings::new(1), "orphan");
    let mut a = f.raw(&router, "orphan", Mode::SslRequest);
    let mut b = f.raw(&router, "orphan", Mode::Direct);
    a.send(&[parse("orphan", SQL, &[])]);
    // The Parse has reached a backend (PostgreSQL shows it active until a Sync), then a goes.
    f.wait_running("orphan", SQL);
    a.drop_abruptly();

    b.send(&[
        parse("orphan", SQL, &[]),
        bind_execute("orphan", &[Some("41")]),
        sync(),
    ]);
    let replies = ready_within(&mut b, QUICK, "b's Parse of the same name");
    assert_eq!(rows(&replies, "1 2 D C Z", "b"), ["42"]);
    b.send(&[bind_execute("orphan", &[Some("1")]), sync()]);
    assert_eq!(rows(&b.until_ready("b again"), "2 D C Z", "b again"), ["2"]);
    b.send(&[bind_execute("never_parsed", &[]), sync()]);
    let replies = b.until_ready("Bind of an unknown name");
    assert_eq!(tags(&replies), "E Z");
    assert_eq!(error_codes(&replies), ["26000"]);
    assert_eq!(b.value("select 'b after'"), "b after");
    assert_eq!(f.backend_pids("orphan").len(), 1);
}

// ---------------------------------------------------------------------------------------------
// 4. Eviction inside a pipeline

/// pg_doorman commit 1a0510b3: with a prepared-statement cache smaller than the statements a
/// client parses and describes with Flush (no Sync, the backend still its), the statements
/// evicted from the backend in between must be given back to it before the Binds that use
/// them, which arrive together in one write; otherwise a Bind reaches a backend where its
/// statement was closed (26000).
#[test]
fn statements_evicted_between_flush_and_sync_are_prepared_again_for_their_binds() {
    let f = fixture();
    let mut settings = PoolSettings::new(1);
    settings.max_prepared_statements = Some(2);
    let router = f.router(&settings, "evict");
    let mut a = f.raw(&router, "evict", Mode::SslRequest);
    let mut b = f.raw(&router, "evict", Mode::Direct);
    let statements = [
        ("stmt1", "select $1::int", "1"),
        ("stmt2", "select $1::text", "hello"),
        ("stmt3", "select $1::bigint", "100"),
    ];
    for (name, sql, _) in statements {
        a.send(&[parse(name, sql, &[]), describe(b'S', name), flush()]);
        let replies = next_n(&mut a, 3, name);
        assert_eq!(tags(&replies), "1 t T", "{name}: {:?}", errors(&replies));
    }
    let batch: Vec<Vec<u8>> = statements
        .iter()
        .flat_map(|(name, _, value)| [bind_execute(name, &[Some(value)]), sync()])
        .collect();
    a.send(&batch);
    let replies = a.until_ready_n(3, "three Binds");
    assert_eq!(
        rows(&replies, "2 D C Z 2 D C Z 2 D C Z", "three Binds"),
        ["1", "hello", "100"]
    );
    // Three statements went through a backend that keeps two.
    let kept: usize = a
        .value("select count(*) from pg_prepared_statements")
        .parse()
        .expect("a count");
    assert!(kept <= 2, "the backend keeps {kept} statements");
    assert_eq!(b.value("select 'b after'"), "b after");
    a.send(&batch);
    assert_eq!(
        rows(
            &a.until_ready_n(3, "again"),
            "2 D C Z 2 D C Z 2 D C Z",
            "again"
        ),
        ["1", "hello", "100"]
    );
}

// ---------------------------------------------------------------------------------------------
// 5. Cancel with a full pool

/// PgDog #1362: in transaction mode with the pool saturated (more clients in flight than
/// `pool_size`), a CancelRequest for the running query was received but not forwarded to the
/// backend: the query ran to completion and every client queued behind it starved for as long.
/// The same cancel worked when the pool was not full.
#[test]
fn a_cancel_stops_the_running_query_while_other_clients_wait_for_the_pool() {
    const LONG: &str = "select pg_sleep(30) /* cancel */";
    let f = fixture();
    let router = f.router(&PoolSettings::new(1), "cancel");
    let mut a = f.raw(&router, "cancel", Mode::SslRequest);
    let mut b = f.raw(&router, "cancel", Mode::Direct);
    a.send(&[query(LONG)]);
    f.wait_running("cancel", LONG);
    b.send(&[query("select 'b'")]);
    b.expect_silence(HELD_WINDOW, "b while a's query holds the only backend");
    let start = Instant::now();
    send_cancel(router.pooled_addr(), a.login.key);
    let replies = ready_within(&mut a, QUICK, "a canceled");
    assert_eq!(error_codes(&replies), ["57014"], "{}", tags(&replies));
    assert_eq!(RawConn::status(&replies), 'I');
    let replies = ready_within(&mut b, QUICK, "b after the cancel");
    assert_eq!(rows(&replies, "T D C Z", "b"), ["b"]);
    assert!(start.elapsed() < QUICK, "took {:?}", start.elapsed());
    assert_eq!(a.value("select 'a after'"), "a after");
}

// ---------------------------------------------------------------------------------------------
// 6. A SET that fails

/// A statement through the unnamed statement: Parse, Bind, Execute, Sync.
fn extended(sql: &str, params: &[Option<&str>]) -> Vec<Vec<u8>> {
    vec![parse("", sql, &[]), bind_execute("", params), sync()]
}

/// PgDog PR #887: a client of the extended protocol (ruby-pg's `exec_params`) then sent
/// `SET lock_timeout TO sdfs`; PgDog held the intercepted `SET` back to run it with the next
/// query, whose answer then came with the SET's error and left PgDog's protocol state behind
/// (ProtocolOutOfSync). Here the invalid `SET`, simple or extended, fails at once as on
/// PostgreSQL, and leaves no setting behind, for its client or for the backend's next one.
#[test]
fn an_invalid_set_fails_at_once_and_leaves_no_setting_in_either_protocol() {
    let f = fixture();
    let router = f.router(&PoolSettings::new(1), "badset");
    let mut a = f.raw(&router, "badset", Mode::SslRequest);
    let mut b = f.raw(&router, "badset", Mode::Direct);
    // The PR's sequence: an extended query, a simple one, then the bad SET.
    a.send(&extended("select $1::int", &[Some("1")]));
    assert_eq!(rows(&a.until_ready("exec_params"), "1 2 D C Z", "a"), ["1"]);
    assert_eq!(a.value("select 1"), "1");
    let replies = a.simple("SET lock_timeout TO sdfs");
    assert_eq!(tags(&replies), "E Z");
    assert_eq!(error_codes(&replies), ["22023"]);
    assert_eq!(
        a.value("select 'after the simple SET'"),
        "after the simple SET"
    );
    // The same SET through the extended protocol.
    a.send(&extended("SET lock_timeout TO 'sdf'", &[]));
    let replies = a.until_ready("invalid SET, extended");
    assert_eq!(tags(&replies), "1 2 E Z");
    assert_eq!(error_codes(&replies), ["22023"]);
    assert_eq!(RawConn::status(&replies), 'I');
    for round in 0..2 {
        assert_eq!(a.value("show lock_timeout"), "0", "a, round {round}");
        a.send(&extended("select $1::text", &[Some("extended")]));
        assert_eq!(
            rows(&a.until_ready("extended"), "1 2 D C Z", "extended"),
            ["extended"]
        );
        assert_eq!(b.value("show lock_timeout"), "0", "b, round {round}");
    }
    // A valid one through the same path is the client's, and only its.
    a.send(&extended("SET lock_timeout TO '5s'", &[]));
    assert_eq!(tags(&a.until_ready("valid SET")), "1 2 C Z");
    assert_eq!(b.value("show lock_timeout"), "0");
    assert_eq!(a.value("show lock_timeout"), "5s");
    assert_eq!(b.value("show lock_timeout"), "0");
}

// ---------------------------------------------------------------------------------------------
// 7. SET inside transactions

/// The statements of the sticky-SET test, one simple Query each, with the rows PostgreSQL 15
/// answers (comma-separated; empty: none).
const STICKY_STEPS: [(&str, &str); 31] = [
    // PgDog PR #687's example: a SET after a regular query inside a transaction block.
    ("begin", ""),
    ("set local statement_timeout to 1234", ""),
    ("select 1", "1"),
    ("set TimeZone to 'Asia/Tokyo'", ""),
    ("set work_mem to '128MB'", ""),
    ("show TimeZone", "Asia/Tokyo"),
    ("commit", ""),
    ("show TimeZone", "Asia/Tokyo"),
    ("show work_mem", "128MB"),
    ("show statement_timeout", "0"),
    ("begin", ""),
    ("show TimeZone", "Asia/Tokyo"),
    ("commit", ""),
    // SET LOCAL ends with its transaction.
    ("begin", ""),
    ("set local TimeZone to 'America/New_York'", ""),
    ("show TimeZone", "America/New_York"),
    ("commit", ""),
    ("show TimeZone", "Asia/Tokyo"),
    // A rolled-back SET is undone.
    ("begin", ""),
    ("set TimeZone to 'Europe/Berlin'", ""),
    ("set work_mem to '64MB'", ""),
    ("show TimeZone", "Europe/Berlin"),
    ("rollback", ""),
    ("show TimeZone", "Asia/Tokyo"),
    ("show work_mem", "128MB"),
    // PgDog PR #686: SET TRANSACTION is this transaction's only (replayed outside one, it
    // warned "SET TRANSACTION can only be used in transaction blocks").
    ("begin", ""),
    ("set transaction isolation level serializable", ""),
    ("show transaction_isolation", "serializable"),
    ("commit", ""),
    ("show transaction_isolation", "read committed"),
    (
        "begin; show transaction_isolation; commit",
        "read committed",
    ),
];

/// What one step of [`STICKY_STEPS`] got: the statement, the tags of its replies, its
/// ParameterStatus messages and its rows.
type Seen = (&'static str, String, Vec<(String, String)>, Vec<String>);

/// Runs [`STICKY_STEPS`] on `conn`, calling `between` after each step that ends outside a
/// transaction block.
fn sticky_steps(conn: &mut impl Wire, mut between: impl FnMut()) -> Vec<Seen> {
    STICKY_STEPS
        .iter()
        .map(|&(sql, _)| {
            let replies = conn.run(sql);
            assert!(errors(&replies).is_empty(), "{sql}: {:?}", errors(&replies));
            if RawConn::status(&replies) == 'I' {
                between();
            }
            (
                sql,
                tags(&replies),
                parameter_statuses(&replies),
                first_column(&replies),
            )
        })
        .collect()
}

/// PgDog PRs #686 and #687: `SET TRANSACTION` was captured as a session parameter (and replayed
/// outside any transaction, with a WARNING), and a `SET` after a regular query inside a
/// transaction block was not saved as the client's (lost on its next backend). Here too: a
/// `SET LOCAL` and a rolled-back `SET` end with their transaction, and none of it reaches the
/// backend's next client. Every step is compared with PostgreSQL's own answer, NOTICEs and
/// ParameterStatus messages included.
#[test]
fn set_in_a_transaction_sticks_for_its_client_only_and_local_or_rolled_back_ones_do_not() {
    let f = fixture();
    let router = f.router(&PoolSettings::new(1), "sticky");
    let (mut straight, _) = Straight::connect(&f.pg, &[]).expect("login to PostgreSQL");
    let real = sticky_steps(&mut straight, || {});
    for ((sql, expected), (_, tags, _, rows)) in STICKY_STEPS.iter().zip(&real) {
        assert_eq!(&rows.join(","), expected, "PostgreSQL: {sql} ({tags})");
    }

    let mut a = f.raw(&router, "sticky", Mode::SslRequest);
    let mut b = f.raw(&router, "sticky", Mode::Direct);
    let check = "select current_setting('TimeZone') || ' ' || current_setting('work_mem') || ' ' \
                 || current_setting('statement_timeout') || ' ' \
                 || current_setting('transaction_isolation')";
    let b_view = b.value(check);
    assert!(b_view.ends_with(" 0 read committed"), "{b_view}");
    let pooled = sticky_steps(&mut a, || {
        // b takes the one backend between a's transactions and must see none of a's settings.
        assert_eq!(b.value(check), b_view, "b between a's transactions");
    });
    assert_eq!(pooled, real, "pooled port vs PostgreSQL");
    assert_eq!(b.value(check), b_view);
    assert_eq!(
        a.value("show TimeZone") + " " + &a.value("show work_mem"),
        "Asia/Tokyo 128MB"
    );
}

// ---------------------------------------------------------------------------------------------
// 8. An error with more pipeline behind it

/// PgBouncer #759 (PHP PDO through PgBouncer's transaction pooling): Bind, Execute, Sync, an
/// ErrorResponse, then the client's next Parse, Describe and Flush read before the backend's
/// ReadyForQuery came; the ReadyForQuery released the backend while the client was still owed
/// the answers to its Parse and Describe. Here those messages arrive in the same write as the
/// failing Execute, and the backend must stay the client's until their Sync.
#[test]
fn an_error_then_more_messages_in_the_same_write_keep_the_backend_until_their_sync() {
    let f = fixture();
    let router = f.router(&PoolSettings::new(1), "race");
    let mut a = f.raw(&router, "race", Mode::SslRequest);
    let mut b = f.raw(&router, "race", Mode::Direct);
    // A run-time error: random() keeps the planner from folding 1/0 into a Bind-time error.
    a.send(&[
        parse("", "select 1 / (random() * $1::int)::int", &[]),
        bind_execute("", &[Some("0")]),
        sync(),
        parse("", "select 2", &[]),
        describe(b'S', ""),
        flush(),
    ]);
    let replies = a.until_ready("the failing Execute");
    assert_eq!(tags(&replies), "1 2 E Z");
    assert_eq!(error_codes(&replies), ["22012"]);
    let replies = next_n(&mut a, 3, "Parse and Describe after the error");
    assert_eq!(tags(&replies), "1 t T", "{:?}", errors(&replies));
    b.send(&[query("select 'b'")]);
    b.expect_silence(HELD_WINDOW, "b while a has flushed without Sync");
    a.send(&[bind_execute("", &[]), sync()]);
    assert_eq!(rows(&a.until_ready("a's Sync"), "2 D C Z", "a"), ["2"]);
    let replies = ready_within(&mut b, QUICK, "b after a's Sync");
    assert_eq!(rows(&replies, "T D C Z", "b"), ["b"]);
}

// ---------------------------------------------------------------------------------------------
// 9. Two Executes and a portal Describe before one Sync

/// PgDog #1508's pipeline: Parse, Bind, Execute twice, a Describe of the unnamed portal, Sync.
fn two_executes_and_a_describe() -> Vec<Vec<u8>> {
    vec![
        parse("", "select 1", &[]),
        bind_execute("", &[]),
        parse("", "select 2", &[]),
        bind_execute("", &[]),
        describe(b'P', ""),
        sync(),
    ]
}

/// PgDog #1508: a legal pipeline of two executed queries, a Describe of the portal and one
/// Sync stalled after the first two results: PgDog split it into requests (a Flush after each
/// Execute, the Describe and the Sync on their own) and waited for the Describe's answer, which
/// PostgreSQL sends only at a Flush or Sync, before passing the Sync on; the backend stayed
/// checked out even after the client left. The answer must be PostgreSQL's own, byte for byte,
/// and the backend must then go back.
#[test]
fn a_pipeline_of_two_executes_and_a_describe_answers_as_postgresql_and_releases() {
    let f = fixture();
    let router = f.router(&PoolSettings::new(1), "pipe");
    let (mut straight, _) = Straight::connect(&f.pg, &[]).expect("login to PostgreSQL");
    straight.send_all(&two_executes_and_a_describe());
    let real = straight.ready_n(1, "straight to PostgreSQL");
    assert_eq!(tags(&real), "1 2 D C 1 2 D C T Z", "{:?}", errors(&real));

    let mut a = f.raw(&router, "pipe", Mode::SslRequest);
    let mut b = f.raw(&router, "pipe", Mode::Direct);
    a.send(&two_executes_and_a_describe());
    let replies = ready_within(&mut a, QUICK, "the pipeline");
    assert_eq!(replies, real, "pooled port vs PostgreSQL");
    b.send(&[query("select 'b'")]);
    let replies = ready_within(&mut b, QUICK, "b after the pipeline");
    assert_eq!(rows(&replies, "T D C Z", "b"), ["b"]);
    assert_eq!(a.value("select 'a after'"), "a after");
}

// ---------------------------------------------------------------------------------------------
// 10. Portals

/// PgDog PRs #1332 and #763: an Execute with a row limit ends in PortalSuspended, not
/// CommandComplete, and PgDog released the backend after `Execute(limit)`, `Flush`, with the
/// portal still open and the client still owed the rest of its rows and its ReadyForQuery.
#[test]
fn a_suspended_portal_holds_the_backend_until_it_is_run_to_the_end_and_synced() {
    let f = fixture();
    let router = f.router(&PoolSettings::new(1), "portal");
    let mut a = f.raw(&router, "portal", Mode::SslRequest);
    let mut b = f.raw(&router, "portal", Mode::Direct);
    a.send(&[
        parse("s", "select generate_series(1, 3)", &[]),
        bind("p", "s", &[]),
        execute("p", 1),
        flush(),
    ]);
    let replies = next_n(&mut a, 4, "Execute of one row");
    assert_eq!(tags(&replies), "1 2 D s", "{:?}", errors(&replies));
    assert_eq!(first_column(&replies), ["1"]);
    b.send(&[query("select 'b'")]);
    b.expect_silence(HELD_WINDOW, "b while a's portal is suspended");
    a.send(&[execute("p", 0), sync()]);
    assert_eq!(
        rows(&a.until_ready("the rest"), "D D C Z", "the rest"),
        ["2", "3"]
    );
    let replies = ready_within(&mut b, QUICK, "b after a's Sync");
    assert_eq!(rows(&replies, "T D C Z", "b"), ["b"]);
    // The statement is still a's, on whichever backend it gets next.
    a.send(&[bind("p", "s", &[]), execute("p", 2), sync()]);
    assert_eq!(
        rows(&a.until_ready("again"), "2 D D s Z", "again"),
        ["1", "2"]
    );
}

/// PgDog PR #1338: a Close of a portal was taken as a Close of the prepared statement with the
/// same name in PgDog's statement cache, so a client whose portal and statement shared a name
/// lost the statement: its next Bind of it failed with 26000.
#[test]
fn closing_a_portal_keeps_the_statement_of_the_same_name() {
    let f = fixture();
    let router = f.router(&PoolSettings::new(1), "samename");
    let mut a = f.raw(&router, "samename", Mode::SslRequest);
    let mut b = f.raw(&router, "samename", Mode::Direct);
    a.send(&[parse("x", "select 'x'::text", &[]), sync()]);
    assert_eq!(tags(&a.until_ready("Parse x")), "1 Z");
    // Portal "x" of statement "x", closed while it exists, inside one implicit transaction.
    a.send(&[
        bind("x", "x", &[]),
        execute("x", 0),
        close(b'P', "x"),
        bind("", "x", &[]),
        execute("", 0),
        sync(),
    ]);
    assert_eq!(
        rows(&a.until_ready("Close of portal x"), "2 D C 3 2 D C Z", "a"),
        ["x", "x"]
    );
    // No portal "x" exists now: its Close is CloseComplete and the statement stays.
    a.send(&[close(b'P', "x"), sync()]);
    assert_eq!(tags(&a.until_ready("Close of no portal")), "3 Z");
    assert_eq!(b.value("select 'b in between'"), "b in between");
    a.send(&[describe(b'S', "x"), bind_execute("x", &[]), sync()]);
    assert_eq!(
        rows(&a.until_ready("statement x"), "t T 2 D C Z", "a"),
        ["x"]
    );
    // Closing the statement is what removes it.
    a.send(&[close(b'S', "x"), sync()]);
    assert_eq!(tags(&a.until_ready("Close of statement x")), "3 Z");
    a.send(&[bind_execute("x", &[]), sync()]);
    assert_eq!(
        error_codes(&a.until_ready("Bind after the Close")),
        ["26000"]
    );
}

// ---------------------------------------------------------------------------------------------
// 11. Startup parameters built to inject SQL

/// Startup parameters whose values would run `create table pwned()` if a pooler pasted them
/// into SQL unescaped: each is a valid value for PostgreSQL.
const INJECTIONS: [(&str, &str); 6] = [
    ("search_path", "\"x'; create table pwned(); --\", public"),
    ("search_path", "\"a;b\", public"),
    ("search_path", "\"x\\'); create table pwned(); --\""),
    (
        "search_path",
        "\"q\"\"; create table pwned(); --\", \"$$; create table pwned(); --\"",
    ),
    ("application_name", "x'); create table pwned(); --"),
    ("application_name", "x\\'); create table pwned(); select ('"),
];

/// CVE-2025-12819 (PgBouncer): a `search_path` given in the StartupMessage could make the
/// pooler run SQL of the client's choosing on the server. The router applies startup
/// parameters with SQL of its own (`set_config` calls), so its quoting of them is an injection
/// point. Here each value must come back from `show` exactly as PostgreSQL shows it when the
/// same StartupMessage goes straight to it, and nothing may have run.
#[test]
fn startup_parameters_with_quotes_and_semicolons_are_values_never_sql() {
    let f = fixture();
    let router = f.router(&PoolSettings::new(1), "inject");
    let pwned = "SELECT count(*) FROM pg_class WHERE relname = 'pwned'";
    // Two clients with different values on the one backend, so the router sets each value
    // there again for every transaction.
    let mut other = f.raw_with(
        &router,
        "inject",
        Mode::Direct,
        &[("search_path", "public"), ("application_name", "other")],
    );
    for (name, value) in INJECTIONS {
        let show = format!("show {name}");
        let (mut straight, login) =
            Straight::connect(&f.pg, &[(name, value)]).expect("PostgreSQL takes the value");
        let real = straight.run(&show);
        let real = rows(&real, "T D C Z", "straight")[0].clone();
        assert_eq!(real, value, "PostgreSQL shows {name} as given");
        let mut a = f.raw_with(&router, "inject", Mode::SslRequest, &[(name, value)]);
        if name == "application_name" {
            let real_reported = login
                .params
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str());
            assert_eq!(a.reported(name), real_reported, "ParameterStatus at login");
        }
        for round in 0..2 {
            assert_eq!(a.value(&show), real, "{name} = {value}, round {round}");
            assert_eq!(
                other.value(&show),
                if name == "search_path" {
                    "public"
                } else {
                    "other"
                },
                "the other client, round {round}"
            );
        }
        assert_eq!(f.pg.psql_admin(pwned), "0", "{name} = {value} ran as SQL");
        a.terminate();
    }
}

/// Startup parameter values PostgreSQL refuses at login (FATAL 22023, "invalid value for
/// parameter").
const REFUSED_STARTUP: [(&str, &str); 4] = [
    ("search_path", "x'; create table pwned(); --"),
    ("TimeZone", "Nowhere/Atlantis"),
    ("statement_timeout", "abc"),
    ("lock_timeout", "sdf"),
];

/// The other side of the CVE-2025-12819 test, and PgDog PR #887's class of bug (a setting taken
/// as the client's before PostgreSQL refused it) at startup: a value PostgreSQL refuses must not
/// leave the client in a session that silently runs with another value. PostgreSQL refuses the
/// login, and so does the pooled port, with PostgreSQL's own FATAL.
#[test]
fn a_startup_value_postgresql_refuses_is_refused_not_silently_replaced() {
    let f = fixture();
    let router = f.router(&PoolSettings::new(1), "inject");
    for (name, value) in REFUSED_STARTUP {
        let refusal = Straight::connect(&f.pg, &[(name, value)])
            .map(drop)
            .expect_err("PostgreSQL refuses the value");
        assert_eq!(
            (refusal.severity.as_str(), refusal.code.as_str()),
            ("FATAL", "22023"),
            "{name} = {value:?}: {refusal:?}"
        );
        let login = RawConn::try_connect(
            router.pooled_addr(),
            f.certs.client_config(),
            Mode::SslRequest,
            &user("inject"),
            &password("inject"),
            &[(name, value)],
        );
        let pooled = login
            .map(drop)
            .expect_err("the pooled port refuses the value");
        assert_eq!(pooled, refusal, "{name} = {value:?}");
    }
    assert_eq!(
        f.pg.psql_admin("SELECT count(*) FROM pg_class WHERE relname = 'pwned'"),
        "0"
    );
}

// ---------------------------------------------------------------------------------------------
// Session state a transaction leaves on its backend

/// pg_doorman #20 (fixed by PR #23; open in PgCat, postgresml/pgcat#903): a `DECLARE ... WITH
/// HOLD` cursor outlived its transaction on the backend, and the next client of that backend
/// could `FETCH` from it (another client's rows) or failed to declare its own of the same name.
/// PgBouncer leaves `LISTEN`s and temporary tables the same way: the next client receives the
/// notifications and sees the table. Here each is gone before the backend is lent again.
#[test]
fn cursors_listens_and_temporary_tables_do_not_outlive_their_transaction() {
    let f = fixture();
    let router = f.router(&PoolSettings::new(1), "residue");
    let mut a = f.raw(&router, "residue", Mode::SslRequest);
    let mut b = f.raw(&router, "residue", Mode::Direct);
    let pid = pid_of(&mut a);

    let replies = a.simple("begin; declare held cursor with hold for select 'a''s secret'; commit");
    assert_eq!(error_codes(&replies), [] as [&str; 0]);
    assert_eq!(pid_of(&mut b), pid, "b shares a's backend");
    let replies = b.simple("fetch all from held");
    assert_eq!(error_codes(&replies), ["34000"], "a's cursor is gone");
    let replies =
        b.simple("begin; declare held cursor for select 'b'; fetch all from held; commit");
    assert_eq!(error_codes(&replies), [] as [&str; 0], "b declares its own");

    assert_eq!(tags(&a.simple("listen residue_channel")), "C Z");
    assert_eq!(pid_of(&mut b), pid);
    assert_eq!(
        b.value("select count(*) from pg_listening_channels()"),
        "0",
        "the backend b shares listens for a no more"
    );

    let replies =
        a.simple("create temp table a_scratch (v text); insert into a_scratch values ('a')");
    assert_eq!(error_codes(&replies), [] as [&str; 0]);
    assert_eq!(pid_of(&mut b), pid);
    let replies = b.simple("select v from a_scratch");
    assert_eq!(
        error_codes(&replies),
        ["42P01"],
        "a's temporary table is gone"
    );
    // A temporary view shadows a table of the same name for whoever holds the backend (the
    // session's temporary schema is searched first): it goes too.
    let replies = a.simple("create temp view pg_am as select 'a''s view'::text as amname");
    assert_eq!(error_codes(&replies), [] as [&str; 0]);
    assert_eq!(pid_of(&mut b), pid);
    assert_eq!(
        b.value("select amname::text from pg_am order by amname limit 1"),
        "brin",
        "b reads the catalog, not a's view"
    );
    let replies = a.simple("create temp sequence a_seq");
    assert_eq!(error_codes(&replies), [] as [&str; 0]);
    assert_eq!(error_codes(&b.simple("select nextval('a_seq')")), ["42P01"]);
    // Made by a query whose reply is `SELECT n`, as any query's: found in the text. In a
    // simple query, and in a Parse run in the next transaction.
    let replies = a.simple("create temp table a_copy as select 'a''s row'::text as v");
    assert_eq!(tags(&replies), "C Z", "{:?}", errors(&replies));
    assert_eq!(pid_of(&mut b), pid);
    assert_eq!(error_codes(&b.simple("select v from a_copy")), ["42P01"]);
    a.send(&[
        parse("into", "select 'a''s row'::text as v into temp a_into", &[]),
        sync(),
    ]);
    assert_eq!(tags(&a.until_ready("parse")), "1 Z");
    a.send(&[bind("", "into", &[]), execute("", 0), sync()]);
    assert_eq!(tags(&a.until_ready("select into")), "2 C Z");
    assert_eq!(pid_of(&mut b), pid);
    assert_eq!(error_codes(&b.simple("select v from a_into")), ["42P01"]);
    // Inside one transaction, all three work.
    let replies = a.simple(
        "begin; create temp table t (v int); insert into t values (1); \
         declare c cursor for select v from t; fetch all from c; commit",
    );
    assert_eq!(error_codes(&replies), [] as [&str; 0]);
    assert_eq!(first_column(&replies), ["1"]);
}

// ---------------------------------------------------------------------------------------------
// A pipeline error after Parses the router answered itself

/// pg_doorman PR #108 (savepoint rollbacks through asyncpg and NpgsqlBatch): in a pipeline whose
/// Parses the pooler answered itself (the backend had the statement), an error at a later
/// Execute lost the ParseCompletes owed before it, and the client fell out of step. Here the
/// backend has the statement, three more names for it are parsed in one pipeline, the second
/// one's Bind fails (PostgreSQL folds `10 / 0` while planning for the bound value): the answer
/// is PostgreSQL's (ParseComplete, BindComplete, row, CommandComplete; ParseComplete, the
/// error; ReadyForQuery), the name whose Parse the error skipped does not exist afterwards,
/// and the one before it does.
#[test]
fn a_pipeline_error_after_parses_the_router_answered_keeps_their_replies() {
    const SQL: &str = "select 10 / $1::int";
    let pipeline = || {
        vec![
            parse("d2", SQL, &[]),
            bind("", "d2", &[Some("5")]),
            execute("", 0),
            parse("d3", SQL, &[]),
            bind("", "d3", &[Some("0")]),
            execute("", 0),
            parse("d4", SQL, &[]),
            bind("", "d4", &[Some("2")]),
            execute("", 0),
            sync(),
        ]
    };
    let after = || {
        vec![
            bind("", "d4", &[Some("2")]),
            execute("", 0),
            sync(),
            bind("", "d3", &[Some("1")]),
            execute("", 0),
            sync(),
        ]
    };
    let f = fixture();
    let router = f.router(&PoolSettings::new(1), "owed");
    let (mut straight, _) = Straight::connect(&f.pg, &[]).expect("login to PostgreSQL");
    let mut a = f.raw(&router, "owed", Mode::SslRequest);
    let mut seen: Vec<Vec<Reply>> = Vec::new();
    for conn in [&mut straight as &mut dyn Wire, &mut a as &mut dyn Wire] {
        // The statement, on the (one) backend, under a first name.
        conn.send_all(&[parse("d1", SQL, &[]), sync()]);
        assert_eq!(tags(&conn.ready_n(1, "d1")), "1 Z");
        conn.send_all(&pipeline());
        let replies = conn.ready_n(1, "the pipeline");
        conn.send_all(&after());
        let later = conn.ready_n(2, "d4 and d3 after it");
        seen.push(replies.into_iter().chain(later).collect());
    }
    let (real, pooled) = (&seen[0], &seen[1]);
    assert_eq!(
        tags(real),
        "1 2 D C 1 E Z E Z 2 D C Z",
        "{:?}",
        errors(real)
    );
    assert_eq!(tags(pooled), tags(real), "{:?}", errors(pooled));
    let codes = |replies: &[Reply]| -> Vec<(String, String)> {
        errors(replies)
            .into_iter()
            .map(|e| (e.code, e.message))
            .collect()
    };
    assert_eq!(codes(pooled), codes(real));
    assert_eq!(
        first_column(pooled),
        first_column(real),
        "the rows: 10 / 5 and 10 / 1"
    );
}

// ---------------------------------------------------------------------------------------------
// Found by review of this router (2026-12-06)

/// A message type no server takes during a session (`p`, a password message after login) was
/// passed to a backend with nothing awaited for it, so the backend went back to the pool at
/// once, and PostgreSQL's FATAL 08P01 for it reached the next client to borrow that backend
/// (whose query failed and whose backend was gone), while the sender carried on. PostgreSQL
/// (`SocketBackend`) answers the sender FATAL 08P01 "invalid frontend message type 112" and
/// ends its session; the pooled port now does the same without taking a backend.
#[test]
fn an_invalid_message_type_ends_its_senders_session_only() {
    let invalid = message(b'p', b"");
    let f = fixture();
    let (mut straight, _) = Straight::connect(&f.pg, &[]).expect("login to PostgreSQL");
    straight.send_all(std::slice::from_ref(&invalid));
    let real = errors(&[straight.next_reply("PostgreSQL's answer to a 'p'")]);
    assert_eq!(real.len(), 1);
    assert_eq!(real[0].code, "08P01");

    let router = f.router(&PoolSettings::new(1), "badtype");
    let mut holder = f.raw(&router, "badtype", Mode::SslRequest);
    let mut sender = f.raw(&router, "badtype", Mode::SslRequest);
    let mut next = f.raw(&router, "badtype", Mode::Direct);
    // The one backend is held: the sender and then the next client would wait in line for it.
    assert_eq!(RawConn::status(&holder.simple("begin")), 'T');
    sender.send(&[invalid]);
    let pooled = errors(&[sender.next("the pooled port's answer to a 'p'")]);
    assert_eq!(
        pooled
            .iter()
            .map(|e| (&e.code, &e.message))
            .collect::<Vec<_>>(),
        real.iter()
            .map(|e| (&e.code, &e.message))
            .collect::<Vec<_>>()
    );
    assert!(sender.next_or_end().is_none(), "the sender's session ends");
    next.send(&[query("select 'mine'")]);
    assert_eq!(RawConn::status(&holder.simple("commit")), 'I');
    let replies = ready_within(&mut next, QUICK, "the next client");
    assert_eq!(rows(&replies, "T D C Z", "the next client"), ["mine"]);

    // In the middle of a batch: PostgreSQL runs the messages before it and sends their replies
    // (those it keeps for a Sync too) ahead of the FATAL.
    let batch = [
        parse("", "select 'synced'", &[]),
        bind("", "", &[]),
        execute("", 0),
        sync(),
        parse("", "select 'not synced'", &[]),
        bind("", "", &[]),
        execute("", 0),
        message(b'p', b""),
    ];
    let (mut straight, _) = Straight::connect(&f.pg, &[]).expect("login to PostgreSQL");
    straight.send_all(&batch);
    let real = replies_to_the_end(|| straight.next_reply_or_end());
    let mut sender = f.raw(&router, "badtype", Mode::SslRequest);
    sender.send(&batch);
    let pooled = replies_to_the_end(|| sender.next_or_end());
    assert_eq!(tags(&real), "1 2 D C Z 1 2 D C E", "{real:?}");
    assert_eq!(tags(&pooled), tags(&real));
    assert_eq!(first_column(&pooled), first_column(&real));
    assert_eq!(errors(&pooled)[0].code, "08P01");
    assert_eq!(errors(&pooled)[0].severity, "FATAL");
    assert_eq!(next.value("select 'still served'"), "still served");
}

/// Every reply until the connection ends.
fn replies_to_the_end(next: impl FnMut() -> Option<Reply>) -> Vec<Reply> {
    std::iter::from_fn(next).take(1000).collect()
}

/// The steps of [`unnamed_statements_are_each_clients_own_as_on_a_server`], on a client of its
/// own (a fresh session): the answers to each.
fn unnamed_steps(conn: &mut impl Wire) -> Vec<Vec<Reply>> {
    let mut seen = Vec::new();
    let mut step = |conn: &mut dyn Wire, messages: Vec<Vec<u8>>, what: &str| {
        conn.send_all(&messages);
        seen.push(conn.ready_n(1, what));
    };
    let use_unnamed = || {
        vec![
            describe(b'S', ""),
            bind("", "", &[]),
            execute("", 0),
            sync(),
        ]
    };
    step(conn, use_unnamed(), "a fresh session's unnamed statement");
    step(
        conn,
        vec![parse("", "select 'mine'::text", &[]), sync()],
        "parse",
    );
    step(conn, use_unnamed(), "its own, in a later transaction");
    step(conn, vec![query("select 'simple'")], "a simple query");
    step(conn, use_unnamed(), "after a simple query");
    step(
        conn,
        vec![parse("", "select no_such_column", &[]), sync()],
        "a failed parse",
    );
    step(conn, use_unnamed(), "after a failed parse");
    seen
}

/// A client that had no unnamed statement of its own (a new one, or one whose last was dropped)
/// and bound or described the unnamed statement was given whatever unnamed statement its backend
/// held: another client's (a client could run `select 'secret'` that someone else parsed). On a
/// server, a session has only its own, which a simple query or a failed Parse drops: 26000
/// "unnamed prepared statement does not exist".
#[test]
fn unnamed_statements_are_each_clients_own_as_on_a_server() {
    let f = fixture();
    let (mut straight, _) = Straight::connect(&f.pg, &[]).expect("login to PostgreSQL");
    let real = unnamed_steps(&mut straight);
    let router = f.router(&PoolSettings::new(1), "unnamed");
    let mut other = f.raw(&router, "unnamed", Mode::SslRequest);
    let mut pooled = Vec::new();
    for _ in 0..2 {
        // Another client leaves an unnamed statement on the one backend before each.
        other.send(&[parse("", "select 'secret'::text", &[]), sync()]);
        assert_eq!(tags(&other.until_ready("the other's parse")), "1 Z");
        let mut conn = f.raw(&router, "unnamed", Mode::SslRequest);
        pooled = unnamed_steps(&mut conn);
    }
    let summary = |seen: &[Vec<Reply>]| -> Vec<(String, Vec<String>, Vec<String>)> {
        seen.iter()
            .map(|replies| {
                let codes = errors(replies)
                    .into_iter()
                    .map(|e| e.code + " " + &e.message);
                (tags(replies), codes.collect(), first_column(replies))
            })
            .collect()
    };
    let real = summary(&real);
    assert_eq!(
        real[0].1,
        ["26000 unnamed prepared statement does not exist"]
    );
    assert_eq!(real[2].2, ["mine"]);
    assert_eq!(summary(&pooled), real);
}

/// A client whose backend died inside a transaction block is in an aborted block (its next
/// backend is put in one), but a Parse of a statement text the pool knew, with its Sync, was
/// answered by the router without a backend: ParseComplete and ReadyForQuery `I`, so a driver
/// that follows the transaction status (pgjdbc) would skip its COMMIT and take the lost work
/// for committed. A server in an aborted block answers 25P02 and ReadyForQuery `E`.
#[test]
fn a_client_whose_backend_died_in_a_block_is_never_told_it_is_idle() {
    const SQL: &str = "select 'known'";
    let f = fixture();
    let router = f.router(&PoolSettings::new(1), "aborted");
    let mut a = f.raw(&router, "aborted", Mode::SslRequest);
    // The text is known to the pool: a Parse of it needs no backend from now on.
    a.send(&[parse("k1", SQL, &[]), sync()]);
    assert_eq!(tags(&a.until_ready("k1")), "1 Z");
    assert_eq!(RawConn::status(&a.simple("begin")), 'T');
    let pid = pid_of(&mut a);
    assert_eq!(
        f.pg.psql_admin(&format!("SELECT pg_terminate_backend({pid})")),
        "t"
    );
    f.wait_gone(pid);
    // The router sees its backend go while the client is idle in the block: the error is
    // owed to the client's next message.
    a.expect_silence(
        HELD_WINDOW,
        "a, idle in its block, after its backend was terminated",
    );
    a.send(&[parse("k2", SQL, &[]), sync()]);
    let replies = a.until_ready("a parse after the kill");
    assert_eq!(tags(&replies), "E Z", "{:?}", errors(&replies));
    assert_eq!(RawConn::status(&replies), 'E', "{:?}", errors(&replies));

    let (mut straight, _) = Straight::connect(&f.pg, &[]).expect("login to PostgreSQL");
    straight.run("begin");
    straight.run("select 1 / 0");
    let mut seen = Vec::new();
    for conn in [&mut straight as &mut dyn Wire, &mut a as &mut dyn Wire] {
        conn.send_all(&[parse("k3", SQL, &[]), sync()]);
        let parsed = conn.ready_n(1, "a parse in the aborted block");
        conn.send_all(&[close(b'S', "k1"), sync()]);
        let closed = conn.ready_n(1, "a close in the aborted block");
        let rolled_back = conn.run("rollback");
        seen.push([parsed, closed, rolled_back].map(|replies| {
            let status = replies.last().and_then(|(_, body)| body.first().copied());
            (tags(&replies), error_codes(&replies), status)
        }));
    }
    assert_eq!(seen[0][0].1, ["25P02"]);
    assert_eq!(seen[0][0].2, Some(b'E'));
    assert_eq!(seen[1], seen[0]);
}

/// Session changes the router cannot name from a statement's text (a role, the session's
/// transaction characteristics, `set_config`, more `SET`s than it lists, a query too long to
/// read, a `RESET ALL` a rollback undid) stayed on the backend for its next client, and were
/// lost for their own client on its next backend. The router now reads the whole session back
/// after such a transaction: each stays with its client, as in a session of its own.
#[test]
fn session_changes_the_router_cannot_name_stay_with_their_client() {
    let f = fixture();
    let router = f.router(&PoolSettings::new(1), "audit");
    let mut a = f.raw(&router, "audit", Mode::SslRequest);
    let mut b = f.raw(&router, "audit", Mode::Direct);
    // One backend: b's transactions run right after a's, on the same backend.
    assert_eq!(pid_of(&mut a), pid_of(&mut b));

    ok(&mut a, "SET ROLE audit_other");
    assert_eq!(b.value("select current_user"), "audit");
    assert_eq!(a.value("select current_user"), "audit_other");
    ok(&mut a, "RESET ROLE");
    assert_eq!(a.value("select current_user"), "audit");

    ok(
        &mut a,
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
    );
    ok(&mut b, "insert into audit_t values (1)");
    assert_eq!(
        error_codes(&a.simple("insert into audit_t values (2)")),
        ["25006"]
    );
    ok(
        &mut a,
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
    );
    ok(&mut a, "insert into audit_t values (3)");

    ok(
        &mut a,
        "select pg_catalog.set_config('statement_timeout', '1234', false)",
    );
    assert_eq!(b.value("show statement_timeout"), "0");
    assert_eq!(a.value("show statement_timeout"), "1234ms");
    // A custom parameter, which pg_settings does not list: read by the name in the call.
    ok(&mut a, "select set_config('app.tenant', '42', false)");
    assert_ne!(b.value("select current_setting('app.tenant', true)"), "42");
    assert_eq!(a.value("select current_setting('app.tenant', true)"), "42");

    // An unnamed statement parsed in one transaction and run in the next.
    a.send(&[parse("", "SET ROLE audit_other", &[]), sync()]);
    assert_eq!(tags(&a.until_ready("parse")), "1 Z");
    a.send(&[bind("", "", &[]), execute("", 0), sync()]);
    assert_eq!(tags(&a.until_ready("run")), "2 C Z");
    assert_eq!(b.value("select current_user"), "audit");
    assert_eq!(a.value("select current_user"), "audit_other");
    // `SET TRANSACTION` leaves `transaction_*` with a session source: not taken for the
    // client's (no set_config takes them back, and the failure would undo the client's role
    // on its next backend).
    ok_in_block(&mut a, "BEGIN");
    ok_in_block(&mut a, "SET TRANSACTION READ WRITE, NOT DEFERRABLE");
    ok(&mut a, "COMMIT");
    let pid = pid_of(&mut a);
    assert_eq!(
        f.pg.psql_admin(&format!("SELECT pg_terminate_backend({pid})")),
        "t"
    );
    f.wait_gone(pid);
    assert_eq!(
        a.value("select current_user"),
        "audit_other",
        "on a new backend"
    );
    ok(&mut a, "RESET ROLE");

    let many: String = (1..=16)
        .map(|i| format!("SET audit.k{i} = '{i}'; "))
        .collect();
    ok(&mut a, &format!("{many}SET lock_timeout = '4321'"));
    assert_eq!(b.value("show lock_timeout"), "0");
    assert_eq!(a.value("show lock_timeout"), "4321ms");
    assert_eq!(a.value("show audit.k16"), "16");

    let padding = "x".repeat(25 * 1024);
    ok(
        &mut a,
        &format!("SET search_path = audit_schema, public; /* {padding} */ select 1"),
    );
    assert_eq!(b.value("show search_path"), "\"$user\", public");
    assert_eq!(a.value("show search_path"), "audit_schema, public");

    ok(&mut a, "SET work_mem = '5MB'");
    ok_in_block(&mut a, "BEGIN");
    ok_in_block(&mut a, "RESET ALL");
    ok(&mut a, "ROLLBACK");
    assert_eq!(b.value("show work_mem"), "4MB");
    assert_eq!(a.value("show work_mem"), "5MB");
    assert_eq!(a.value("show search_path"), "audit_schema, public");
}

/// A statement that must succeed outside a transaction block.
fn ok(conn: &mut RawConn, sql: &str) {
    let replies = conn.simple(sql);
    assert!(errors(&replies).is_empty(), "{sql}: {:?}", errors(&replies));
    assert_eq!(RawConn::status(&replies), 'I', "{sql}");
}

/// A statement that must succeed inside an open transaction block.
fn ok_in_block(conn: &mut RawConn, sql: &str) {
    let replies = conn.simple(sql);
    assert!(errors(&replies).is_empty(), "{sql}: {:?}", errors(&replies));
    assert_eq!(RawConn::status(&replies), 'T', "{sql}");
}

/// A client could drop the router's statements on a shared backend: `DEALLOCATE bg_...` (the
/// names are in `pg_prepared_statements`) went to the backend, and so did `DEALLOCATE ALL` in
/// a Parse; the router still listed them there, so every later Bind of another client's
/// statement on that backend failed with 26000 naming the router's statement. Now a
/// `DEALLOCATE` of a name the client does not have is answered 26000 by the router (as a
/// server answers a session without it), and a backend whose statements changed under the
/// router is not lent again.
#[test]
fn one_client_cannot_drop_another_clients_prepared_statements() {
    const SQL: &str = "select 'prepared by b'";
    let f = fixture();
    let router = f.router(&PoolSettings::new(1), "dealloc");
    let mut a = f.raw(&router, "dealloc", Mode::SslRequest);
    let mut b = f.raw(&router, "dealloc", Mode::Direct);
    b.send(&[parse("s1", SQL, &[]), sync()]);
    assert_eq!(tags(&b.until_ready("b's parse")), "1 Z");
    let run_s1 = |b: &mut RawConn| {
        b.send(&[bind("", "s1", &[]), execute("", 0), sync()]);
        let replies = b.until_ready("b's statement");
        assert_eq!(tags(&replies), "2 D C Z", "{:?}", errors(&replies));
    };
    run_s1(&mut b);
    let server_name = a.value("select name from pg_prepared_statements");
    assert!(server_name.starts_with("bg_"), "{server_name}");

    let replies = a.simple(&format!("DEALLOCATE \"{server_name}\""));
    assert_eq!(
        errors(&replies)
            .iter()
            .map(|e| (e.code.as_str(), e.message.as_str()))
            .collect::<Vec<_>>(),
        [(
            "26000",
            format!("prepared statement \"{server_name}\" does not exist").as_str()
        )]
    );
    run_s1(&mut b);

    a.send(&[
        parse("", "DEALLOCATE ALL", &[]),
        bind("", "", &[]),
        execute("", 0),
        sync(),
    ]);
    let replies = a.until_ready("DEALLOCATE ALL in a Parse");
    assert_eq!(tags(&replies), "1 2 C Z", "{:?}", errors(&replies));
    run_s1(&mut b);
    // a's own statements went with its DEALLOCATE ALL, as on a server.
    a.send(&[parse("mine", "select 1", &[]), sync()]);
    assert_eq!(tags(&a.until_ready("a's parse")), "1 Z");
    a.send(&[
        parse("", "DEALLOCATE ALL", &[]),
        bind("", "", &[]),
        execute("", 0),
        sync(),
    ]);
    assert_eq!(tags(&a.until_ready("DEALLOCATE ALL again")), "1 2 C Z");
    a.send(&[bind("", "mine", &[]), execute("", 0), sync()]);
    assert_eq!(
        error_codes(&a.until_ready("a's statement after it")),
        ["26000"]
    );
    run_s1(&mut b);
}

/// Every parameter a client sets is kept for it (and for each backend given it): without a
/// bound, one client's `SET`s of made-up parameters grew the router's memory without end. Past
/// 256 such parameters (or 64 KiB of them) its session ends with 54000; other clients go on.
#[test]
fn a_client_setting_too_many_parameters_is_closed_with_54000() {
    let f = fixture();
    let router = f.router(&PoolSettings::new(1), "many");
    let mut a = f.raw(&router, "many", Mode::SslRequest);
    let mut b = f.raw(&router, "many", Mode::Direct);
    let sets: String = (0..300)
        .map(|i| format!("SET many.k{i} = '{i}'; "))
        .collect();
    a.send(&[query(&sets)]);
    let replies = a.until_ready("300 SETs");
    assert!(errors(&replies).is_empty(), "{:?}", errors(&replies));
    let closing = a.next("the router's FATAL");
    let error = &errors(&[closing])[0];
    assert_eq!(error.code, "54000", "{error:?}");
    assert!(a.next_or_end().is_none());
    assert_eq!(b.value("select current_setting('many.k1', true)"), "NULL");
}

/// Every named statement a client prepares is kept for it for its life: without a bound, one
/// client's Parses under new names grew the router's memory without end (each up to 20 KiB).
/// Past 4 MiB of them (or 10,000) a Parse is refused with 54000, the client's transaction
/// going on as after any error; a Close makes room again.
#[test]
fn a_clients_prepared_statements_are_bounded() {
    const BUDGET: usize = 4 * 1024 * 1024;
    const TEXT: usize = 19_000;
    let f = fixture();
    let router = f.router(&PoolSettings::new(1), "stmts");
    let mut a = f.raw(&router, "stmts", Mode::SslRequest);
    let text = |n: usize| format!("select {n} /* {} */", "x".repeat(TEXT));
    let mut accepted = 0;
    let refused = loop {
        let mut messages: Vec<Vec<u8>> = (accepted..accepted + 20)
            .map(|n| parse(&format!("s{n}"), &text(n), &[]))
            .collect();
        messages.push(sync());
        a.send(&messages);
        let replies = a.until_ready("20 parses of 19 KB");
        accepted += replies.iter().take_while(|(tag, _)| *tag == b'1').count();
        if let Some(error) = errors(&replies).into_iter().next() {
            break error;
        }
        assert!(accepted * TEXT < 2 * BUDGET, "no bound after {accepted}");
    };
    assert_eq!(refused.code, "54000", "{refused:?}");
    assert!(
        accepted * TEXT <= BUDGET && (accepted + 1) * (TEXT + 200) > BUDGET,
        "{accepted} statements of {TEXT} bytes"
    );
    let one_more = text(999_999);
    a.send(&[close(b'S', "s0"), parse("one_more", &one_more, &[]), sync()]);
    let replies = a.until_ready("after a close");
    assert_eq!(tags(&replies), "3 1 Z", "{:?}", errors(&replies));
    a.send(&[bind("", "one_more", &[]), execute("", 0), sync()]);
    assert_eq!(
        rows(&a.until_ready("the statement"), "2 D C Z", "one more"),
        ["999999"]
    );
}

/// PgBouncer's documented gap, and ours until now: a session-level advisory lock
/// (`pg_advisory_lock`) taken on 6432 stayed held by the backend after its transaction, for
/// clients that never took it, and its own client could not count on getting that backend
/// back to unlock it: other sessions waited for it for ever. It is now released before the
/// backend is lent again (`pg_advisory_unlock_all`), in both protocols, also when the
/// statement was prepared in an earlier transaction: it lasts for its transaction, as
/// `pg_advisory_xact_lock` does.
#[test]
fn a_session_advisory_lock_is_released_with_its_transaction() {
    let f = fixture();
    let router = f.router(&PoolSettings::new(1), "locker");
    let mut a = f.raw(&router, "locker", Mode::SslRequest);
    let (mut straight, _) = Straight::connect(&f.pg, &[]).expect("login to PostgreSQL");
    // The router releases the lock right after the client's ReadyForQuery, before the backend
    // is lent again: another session may find it held for that round trip.
    let mut released = |key: u32| -> bool {
        let deadline = Instant::now() + QUICK;
        loop {
            let replies = straight.run(&format!("select pg_try_advisory_lock({key})::text"));
            if first_column(&replies) == ["true"] {
                straight.run("select pg_advisory_unlock_all()");
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
        }
    };
    assert_eq!(a.value("select pg_advisory_lock(4242)::text"), "");
    assert!(released(4242), "a's lock went with its transaction");

    a.send(&[
        parse("lk", "select pg_try_advisory_lock($1::bigint)::text", &[]),
        sync(),
    ]);
    assert_eq!(tags(&a.until_ready("parse")), "1 Z");
    a.send(&[bind("", "lk", &[Some("4343")]), execute("", 0), sync()]);
    assert_eq!(
        rows(&a.until_ready("the lock"), "2 D C Z", "the lock"),
        ["true"]
    );
    assert!(released(4343), "the prepared statement's lock too");
}

/// The diesel/libpq pattern with a statement too long for the router to keep (over 20 KiB, a
/// bulk insert with thousands of parameters): the unnamed Parse and its Sync, then Bind,
/// Execute and Sync. With the unnamed statement each client's own, the Bind found none and
/// got 26000; the backend the long statement lives on is now held for the client until it
/// binds it, then goes back.
#[test]
fn a_long_unnamed_statement_is_bound_in_the_next_batch() {
    let f = fixture();
    let router = f.router(&PoolSettings::new(1), "unnamed");
    let mut a = f.raw(&router, "unnamed", Mode::SslRequest);
    let mut b = f.raw(&router, "unnamed", Mode::Direct);
    let sql = format!("select 'long' /* {} */", "x".repeat(25 * 1024));
    a.send(&[parse("", &sql, &[]), sync()]);
    assert_eq!(tags(&a.until_ready("the long parse")), "1 Z");
    a.send(&[bind("", "", &[]), execute("", 0), sync()]);
    assert_eq!(
        rows(&a.until_ready("bound in the next batch"), "2 D C Z", "long"),
        ["long"]
    );
    // The backend went back: the other client gets it.
    b.send(&[query("select 'b'")]);
    assert_eq!(
        rows(&ready_within(&mut b, QUICK, "b"), "T D C Z", "b"),
        ["b"]
    );
}

/// The router's own `SET`s that give a backend its client's parameters were sent ahead of the
/// client's statements and their answer swallowed: when a backend refused one, the client's
/// statements ran with the backend's values, silently. A client that did `SET ROLE x` ran as
/// its login role on the next backend once its grant of `x` was revoked (its rows owned, its
/// row-level security policies chosen, by the wrong role). Now a refused `SET` ends the
/// client's session with the server's error as a FATAL, and a `SET` PostgreSQL checks against
/// the catalog (the role) is answered before the client's statements go, so none of them runs.
#[test]
fn a_setting_a_new_backend_refuses_ends_the_session_before_its_statements_run() {
    let f = fixture();
    let router = f.router(&PoolSettings::new(1), "revoked");
    let mut a = f.raw(&router, "revoked", Mode::SslRequest);
    let mut b = f.raw(&router, "revoked", Mode::Direct);
    ok(&mut a, "SET ROLE revoked_grant");
    ok(&mut a, "insert into revoked_t default values");
    // b's transaction takes the one backend back to the login role.
    assert_eq!(b.value("select current_user"), "revoked");
    f.pg.psql_admin("REVOKE revoked_grant FROM revoked");

    // A session of the server keeps its role; the pooled port cannot give it to a backend.
    a.send(&[query("insert into revoked_t default values")]);
    let reply = a.next("the router's FATAL");
    let refused = errors(std::slice::from_ref(&reply));
    assert_eq!(refused.len(), 1, "{reply:?}");
    assert_eq!(refused[0].code, "42501", "{:?}", refused[0]);
    assert_eq!(refused[0].severity, "FATAL", "{:?}", refused[0]);
    assert_eq!(
        refused[0].message, "permission denied to set role \"revoked_grant\"",
        "the server's own words"
    );
    assert!(a.next_or_end().is_none(), "the session ended");
    assert_eq!(
        f.pg.psql_admin("SELECT string_agg(who, ',' ORDER BY who) FROM revoked_t"),
        "revoked_grant",
        "no row inserted as the login role"
    );
    // The others go on.
    assert_eq!(b.value("select current_user"), "revoked");
    let mut c = f.raw(&router, "revoked", Mode::Direct);
    ok(&mut c, "insert into revoked_t default values");
    assert_eq!(
        f.pg.psql_admin("SELECT count(*) FROM revoked_t WHERE who = 'revoked'"),
        "1"
    );
}

/// PostgREST starts every request's transaction with `set_config(name, value, true)` calls (the
/// role, the JWT claims, the search path): settings for that transaction only. The router took
/// any `set_config` for a session change it must read back whole, one round trip more per
/// transaction in which PostgreSQL builds all of `pg_settings` (a thirteenth of the rate of
/// plain queries in a side-by-side run). A call whose third argument is a literal true now
/// needs nothing: the settings end with the transaction, on the pooled port as on a server.
#[test]
fn transaction_local_set_config_is_not_read_back_and_does_not_outlive_its_transaction() {
    let f = fixture();
    let router = f.router(&PoolSettings::new(1), "jwt");
    let mut a = f.raw(&router, "jwt", Mode::SslRequest);
    let mut b = f.raw(&router, "jwt", Mode::Direct);
    let pid = pid_of(&mut a);
    assert_eq!(pid, pid_of(&mut b));
    for claims in ["{\"sub\":\"a\"}", "{\"sub\":\"b\"}"] {
        ok_in_block(&mut a, "BEGIN ISOLATION LEVEL READ COMMITTED READ ONLY");
        ok_in_block(
            &mut a,
            &format!(
                "select set_config('search_path', 'public', true), \
                 set_config('role', 'jwt_anon', true), \
                 set_config('request.jwt.claims', {}, true)",
                quote_literal(claims)
            ),
        );
        let seen =
            a.simple("select current_user || ' ' || current_setting('request.jwt.claims', true)");
        assert_eq!(
            rows(&seen, "T D C Z", "in the request"),
            [format!("jwt_anon {claims}")]
        );
        ok(&mut a, "COMMIT");
        assert_eq!(a.value("select current_user"), "jwt");
        assert_eq!(b.value("select current_user"), "jwt");
        assert_ne!(
            b.value("select current_setting('request.jwt.claims', true)"),
            claims
        );
    }
    // The same through a Parse, as PostgREST sends it.
    a.send(&[
        parse("", "select set_config('role', $1, true)", &[]),
        bind("", "", &[Some("jwt_anon")]),
        execute("", 0),
        sync(),
    ]);
    assert_eq!(tags(&a.until_ready("extended set_config")), "1 2 D C Z");
    assert_eq!(a.value("select current_user"), "jwt");
    assert_no_session_read(f, &mut a, pid);
}

/// The other side of the refused-setup fix: a `RESET TimeZone` in a block has the router give
/// the backend the client's own value again before the client's next statement; when the
/// client's statement already on its way aborts the block first, that resync fails with 25P02.
/// That is no refusal of the client's settings (the client got its own error; the rollback
/// takes the backend back to the client's value): the session goes on as on a server.
#[test]
fn a_resync_behind_the_clients_failing_statement_does_not_end_the_session() {
    let f = fixture();
    let router = f.router(&PoolSettings::new(1), "resync");
    let mut a = f.raw_with(
        &router,
        "resync",
        Mode::SslRequest,
        &[("TimeZone", "Asia/Tokyo")],
    );
    // The reset, and in the same write a statement that fails after half a second (random()
    // keeps PostgreSQL from folding the division while it plans).
    a.send(&[
        query("BEGIN; RESET TimeZone"),
        query("select pg_sleep(0.5), 1 / (random()::int * 0)"),
    ]);
    let reset = a.until_ready("the reset");
    assert_eq!(RawConn::status(&reset), 'T');
    assert!(
        parameter_statuses(&reset)
            .iter()
            .all(|(_, value)| value == "Asia/Tokyo"),
        "the pool's default never shows: {reset:?}"
    );
    // Sent while the failing statement runs: the resync goes behind it.
    a.send(&[query("select 2")]);
    let failed = a.until_ready("the failing statement");
    assert_eq!(error_codes(&failed), ["22012"]);
    let next = a.until_ready("the statement after it");
    assert_eq!(error_codes(&next), ["25P02"], "{next:?}");
    assert_eq!(RawConn::status(&next), 'E');
    ok(&mut a, "ROLLBACK");
    assert_eq!(a.value("show TimeZone"), "Asia/Tokyo");
}

/// A session's TimeZone, search_path, role and `app.k`, for the reset tests.
const SESSION_CHECK: &str = "select current_setting('TimeZone') || ' | ' || \
     current_setting('search_path') || ' | ' || current_setting('role') || ' | ' || \
     coalesce(current_setting('app.k', true), '<none>')";

/// Two clients of `role` on one backend (a pool of one): `a` with `startup` parameters, `b`
/// without; the backend's pid; and a client straight to PostgreSQL with `startup` too.
struct SharedBackend {
    /// Bind it (`router: _router`): dropped, it stops the router.
    router: TestRouter,
    a: RawConn,
    b: RawConn,
    pid: i32,
    straight: Straight,
}

fn shared_backend(f: &Fixture, role: &str, startup: &[(&str, &str)]) -> SharedBackend {
    let router = f.router(&PoolSettings::new(1), role);
    let mut a = f.raw_with(&router, role, Mode::SslRequest, startup);
    let mut b = f.raw(&router, role, Mode::Direct);
    let pid = pid_of(&mut a);
    assert_eq!(pid, pid_of(&mut b), "one backend");
    let (straight, _) = Straight::connect(&f.pg, startup).expect("login to PostgreSQL");
    SharedBackend {
        router,
        a,
        b,
        pid,
        straight,
    }
}

/// `conn` still holds backend `pid`, which has not had its whole session read.
fn assert_no_session_read(f: &Fixture, conn: &mut RawConn, pid: i32) {
    assert_eq!(pid_of(conn), pid, "still the one backend");
    let reads = session_reads(f, &[pid]);
    assert!(reads.is_empty(), "no whole-session read: {reads:#?}");
}

/// Server log lines of statements `pids` ran that read `pg_settings` (the router's read of a
/// backend's whole session). PostgreSQL's default `log_line_prefix` carries the pid.
fn session_reads(f: &Fixture, pids: &[i32]) -> Vec<String> {
    let log = std::fs::read_to_string(f.pg.log_path()).expect("server log");
    log.lines()
        .filter(|line| line.contains("statement:") && line.contains("pg_settings"))
        .filter(|line| pids.iter().any(|pid| line.contains(&format!("[{pid}]"))))
        .map(str::to_owned)
        .collect()
}

/// `SET ROLE`, `SET ROLE NONE`, `RESET ROLE` and `SET role TO DEFAULT` follow their client as on
/// a real server (the role a StartupMessage gave is what a reset goes back to; a rolled-back
/// `SET ROLE` is undone), never reach the backend's next client, and cost a read of the role
/// by name: the router used to read the backend's whole session (all of `pg_settings`, about a
/// thirteenth of a plain transaction's rate) after every transaction with one.
#[test]
fn set_role_and_reset_role_follow_their_client_with_a_read_by_name() {
    const ROLE: &str = "select current_setting('role')";
    let f = fixture();
    let SharedBackend {
        mut a,
        mut b,
        pid,
        mut straight,
        router: _router,
    } = shared_backend(f, "setrole", &[("role", "setrole_other")]);
    let steps: [&[&str]; 8] = [
        &[],
        &["SET ROLE NONE"],
        &["RESET ROLE"],
        &["SET SESSION ROLE NONE", "SET role TO DEFAULT"],
        &["BEGIN", "SET ROLE NONE", "ROLLBACK"],
        &["BEGIN", "SET ROLE NONE", "COMMIT"],
        &["SET ROLE setrole_other; RESET ROLE; SET ROLE NONE"],
        &["BEGIN; RESET ROLE", "COMMIT"],
    ];
    let mut pooled = Vec::new();
    let mut server = Vec::new();
    for statements in steps {
        for sql in statements {
            assert!(errors(&a.simple(sql)).is_empty(), "{sql}");
            assert!(errors(&straight.run(sql)).is_empty(), "{sql}");
        }
        pooled.push(a.value(ROLE));
        server.push(rows(&straight.run(ROLE), "T D C Z", "role on the server").join(""));
        // The backend's next client: its own (no) role, whatever `a` left there.
        assert_eq!(
            b.value("select current_setting('role') || ' ' || current_user"),
            "none setrole",
            "after {statements:?}"
        );
    }
    assert_eq!(
        server,
        [
            "setrole_other",
            "none",
            "setrole_other",
            "setrole_other",
            "setrole_other",
            "none",
            "none",
            "setrole_other"
        ],
        "PostgreSQL itself"
    );
    assert_eq!(pooled, server, "pooled port vs a real server's session");

    // A client with no role at startup, through a Parse too, on the one backend with `a`
    // (now with no role either).
    ok(&mut a, "SET ROLE NONE");
    ok(&mut b, "SET ROLE setrole_other");
    assert_eq!(b.value("select current_user"), "setrole_other");
    assert_eq!(a.value("select current_user"), "setrole");
    b.send(&[parse("", "RESET ROLE", &[]), bind_execute("", &[]), sync()]);
    assert!(errors(&b.until_ready("RESET ROLE in a Parse")).is_empty());
    assert_eq!(b.value("select current_user"), "setrole");
    assert_no_session_read(f, &mut b, pid);
}

/// Npgsql sends `DISCARD ALL` ahead of the first statement each time an application takes a
/// connection from its pool (its default, `No Reset On Close=false`). It leaves the session
/// as it starts (PostgreSQL runs it only as a query of its own, outside any block, where no
/// rollback can undo it), so the router gives the client its startup values (the role too:
/// the StartupMessage's, as PostgreSQL's `DISCARD ALL` gives it back) and needs no
/// read of the backend's session, which it did after each one (all of `pg_settings`, about a
/// thirteenth of a plain transaction's rate). A `DISCARD ALL` that fails leaves everything.
#[test]
fn discard_all_leaves_the_clients_startup_session_without_a_session_read() {
    /// The same steps on a pooled client and straight on PostgreSQL: what each saw, and
    /// (for the pooled client) the server-log check after the successful `DISCARD ALL`.
    fn steps(conn: &mut impl Wire, mut after_discard: impl FnMut()) -> Vec<String> {
        let mut seen = Vec::new();
        let value = |conn: &mut dyn FnMut(&str) -> Vec<Reply>| {
            rows(&conn(SESSION_CHECK), "T D C Z", "the check").join("")
        };
        let run = |conn: &mut dyn Wire, sql: &str, codes: &[&str]| {
            let replies = conn.run(sql);
            assert_eq!(error_codes(&replies), codes, "{sql}");
            replies
        };
        run(
            conn,
            "SET TimeZone = 'UTC'; SET search_path = discard_x; SET ROLE NONE; \
             SET app.k = '1'",
            &[],
        );
        conn.send_all(&[parse("s1", "select 1", &[]), sync()]);
        assert_eq!(tags(&conn.ready_n(1, "Parse")), "1 Z");
        seen.push(value(&mut |sql| conn.run(sql)));
        let discarded = run(conn, "DISCARD ALL", &[]);
        // ParameterStatus apart (a superuser's `is_superuser` changes with its role).
        let discard_tags = tags(&discarded);
        seen.push(
            discard_tags
                .split(' ')
                .filter(|t| *t != "S")
                .collect::<Vec<_>>()
                .join(" "),
        );
        let told: Vec<String> = parameter_statuses(&discarded)
            .into_iter()
            .filter(|(name, _)| name == "TimeZone")
            .map(|(name, value)| format!("{name}={value}"))
            .collect();
        seen.push(told.join(","));
        seen.push(value(&mut |sql| conn.run(sql)));
        after_discard();
        conn.send_all(&[bind("", "s1", &[]), execute("", 0), sync()]);
        seen.push(error_codes(&conn.ready_n(1, "Bind after DISCARD ALL")).join(","));
        // In a block it fails, and leaves the session as it was, prepared statements too; so
        // does one beside another statement (an implicit block), and a `DEALLOCATE ALL` in an
        // aborted block.
        conn.send_all(&[parse("s2", "select 2", &[]), sync()]);
        assert_eq!(tags(&conn.ready_n(1, "Parse s2")), "1 Z");
        run(conn, "SET TimeZone = 'UTC'; SET app.k = '2'", &[]);
        run(conn, "BEGIN", &[]);
        run(conn, "DISCARD ALL", &["25001"]);
        run(conn, "ROLLBACK", &[]);
        seen.push(value(&mut |sql| conn.run(sql)));
        run(conn, "SELECT 1; DISCARD ALL", &["25001"]);
        // And a `DEALLOCATE ALL` in an aborted block.
        run(conn, "BEGIN", &[]);
        run(conn, "SELECT 1/0", &["22012"]);
        run(conn, "DEALLOCATE ALL", &["25P02"]);
        run(conn, "ROLLBACK", &[]);
        conn.send_all(&[bind("", "s2", &[]), execute("", 0), sync()]);
        let replies = conn.ready_n(1, "Bind after the failed DISCARD ALLs");
        seen.push(format!("{} {:?}", tags(&replies), error_codes(&replies)));
        seen
    }
    let f = fixture();
    let startup = [
        ("TimeZone", "Asia/Tokyo"),
        ("search_path", "discard_s, public"),
        ("role", "discard_other"),
    ];
    let SharedBackend {
        mut a,
        mut b,
        pid,
        mut straight,
        router: _router,
    } = shared_backend(f, "discard", &startup);
    let b_check = b.value(SESSION_CHECK);
    let server = steps(&mut straight, || {});
    assert_eq!(
        server,
        [
            "UTC | discard_x | none | 1",
            "C Z",
            "TimeZone=Asia/Tokyo",
            "Asia/Tokyo | discard_s, public | discard_other | ",
            "26000",
            "UTC | discard_s, public | discard_other | 2",
            "2 D C Z []",
        ],
        "PostgreSQL itself"
    );
    let mut reads = Vec::new();
    let pooled = steps(&mut a, || reads = session_reads(f, &[pid]));
    assert_eq!(pooled, server, "pooled port vs a real server's session");
    assert!(reads.is_empty(), "no session read: {reads:#?}");
    assert_eq!(
        session_reads(f, &[pid]).len(),
        2,
        "each failed DISCARD ALL's transaction is read back"
    );
    // `app.k` stays defined on the backend, empty, as after any client's `SET` of a custom
    // parameter (PostgreSQL keeps a placeholder for the session's life): no value of `a`'s.
    assert_eq!(
        b.value(SESSION_CHECK),
        b_check.replace("<none>", ""),
        "the backend's other client"
    );
    assert_eq!(pid_of(&mut a), pid, "still the one backend");
}

/// `RESET ALL`, the reset Npgsql's pool sends in place of `DISCARD ALL` when a connection has
/// prepared statements (`SET SESSION AUTHORIZATION DEFAULT;RESET ALL;CLOSE ALL;...`; PgDog
/// #1682: it panicked PgDog's client task) and the one asyncpg's pool sends at each release
/// leave the client's session as PostgreSQL's: its
/// startup values, the role kept by `RESET ALL` (never handed to the backend's next client)
/// and taken back to the StartupMessage's by the session authorization's reset. Outside a
/// block and without an error nothing can undo them, so no read of the session follows; in
/// the client's block (which a rollback may end) the session is read back.
#[test]
fn reset_all_and_npgsqls_reset_leave_the_startup_session_without_a_session_read() {
    /// What asyncpg's pool sends when a connection is released.
    const ASYNCPG_RESET: &str =
        "SELECT pg_advisory_unlock_all();\nCLOSE ALL;\nUNLISTEN *;\nRESET ALL;";
    const NPGSQL_RESET: &str = "SET SESSION AUTHORIZATION DEFAULT;RESET ALL;CLOSE ALL;\
         UNLISTEN *;SELECT pg_advisory_unlock_all();DISCARD SEQUENCES;DISCARD TEMP";
    /// The steps, on a pooled client or straight on PostgreSQL; `checked` runs after each
    /// check (the pooled client's other client and server log).
    fn steps(conn: &mut impl Wire, mut checked: impl FnMut(usize)) -> Vec<String> {
        let mut seen = Vec::new();
        let run = |conn: &mut dyn Wire, sql: &str| {
            let replies = conn.run(sql);
            assert!(errors(&replies).is_empty(), "{sql}: {:?}", errors(&replies));
        };
        let script: [&[&str]; 5] = [
            &["SET TimeZone = 'UTC'; SET search_path = ra_x; SET ROLE NONE; SET app.k = '1'"],
            &["RESET ALL"],
            &["SET TimeZone = 'UTC'; SET app.k = '3'", NPGSQL_RESET],
            &[
                "SET TimeZone = 'UTC'; SET app.k = '4'",
                "BEGIN",
                "RESET ALL",
                "ROLLBACK",
            ],
            &["SET ROLE NONE; SET app.k = '5'", ASYNCPG_RESET],
        ];
        for (i, statements) in script.iter().enumerate() {
            for sql in *statements {
                run(conn, sql);
            }
            seen.push(rows(&conn.run(SESSION_CHECK), "T D C Z", "the check").join(""));
            checked(i);
        }
        seen
    }
    let f = fixture();
    let startup = [
        ("TimeZone", "Asia/Tokyo"),
        ("search_path", "ra_s, public"),
        ("role", "resetall_other"),
    ];
    let SharedBackend {
        mut a,
        mut b,
        pid,
        mut straight,
        router: _router,
    } = shared_backend(f, "resetall", &startup);
    let server = steps(&mut straight, |_| {});
    assert_eq!(
        server,
        [
            "UTC | ra_x | none | 1",
            "Asia/Tokyo | ra_s, public | none | ",
            "Asia/Tokyo | ra_s, public | resetall_other | ",
            "UTC | ra_s, public | resetall_other | 4",
            "Asia/Tokyo | ra_s, public | none | ",
        ],
        "PostgreSQL itself"
    );
    let mut reads = Vec::new();
    let pooled = steps(&mut a, |step| {
        // The backend's other client: never `a`'s role or settings.
        assert_eq!(
            b.value("select current_setting('role') || ' ' || current_user"),
            "none resetall",
            "after step {step}"
        );
        reads.push(session_reads(f, &[pid]).len());
    });
    assert_eq!(pooled, server, "pooled port vs a real server's session");
    assert_eq!(
        reads,
        [0, 0, 0, 1, 1],
        "a session read only after the block's RESET ALL"
    );
    assert_eq!(pid_of(&mut a), pid, "still the one backend");
}

/// JDBC's `Connection.setTransactionIsolation` (which HikariCP calls again when a connection
/// goes back to its pool, and Spring around each transaction with an isolation level of its
/// own) sends `SET SESSION CHARACTERISTICS AS TRANSACTION ...`: the session's
/// `default_transaction_*` values, read back by name after the transaction and given to each
/// backend the client gets, never to another client. The router read the whole session after
/// each one (about a thirteenth of a plain transaction's rate).
#[test]
fn session_characteristics_follow_their_client_with_a_read_by_name() {
    const CHECK: &str = "select current_setting('transaction_isolation') || ' ' || \
         current_setting('transaction_read_only') || ' ' || \
         current_setting('transaction_deferrable')";
    let f = fixture();
    let router = f.router(&PoolSettings::new(1), "chars");
    let mut a = f.raw(&router, "chars", Mode::SslRequest);
    let mut b = f.raw(&router, "chars", Mode::Direct);
    let pid = pid_of(&mut a);
    assert_eq!(pid, pid_of(&mut b), "one backend");
    let defaults = b.value(CHECK);
    assert_eq!(defaults, "read committed off off");
    for (set, expected) in [
        (
            "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "serializable off off",
        ),
        (
            "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL REPEATABLE READ, \
             READ ONLY, DEFERRABLE",
            "repeatable read on on",
        ),
        (
            "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL READ COMMITTED, \
             READ WRITE, NOT DEFERRABLE",
            "read committed off off",
        ),
    ] {
        ok(&mut a, set);
        assert_eq!(a.value(CHECK), expected, "{set}");
        assert_eq!(b.value(CHECK), defaults, "the other client, after {set}");
        assert_eq!(a.value(CHECK), expected, "after the other client: {set}");
    }
    // In a block that rolls back: undone, as on a server.
    ok_in_block(&mut a, "BEGIN");
    ok_in_block(
        &mut a,
        "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE",
    );
    ok(&mut a, "ROLLBACK");
    assert_eq!(a.value(CHECK), defaults);
    assert_no_session_read(f, &mut a, pid);
}
