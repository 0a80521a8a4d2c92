//! Replica routing against real streaming replicas: least connections across two replicas,
//! addresses that are not PostgreSQL or not a standby kept out of rotation, and the health
//! probe's verdicts on real servers.
//!
//! One primary with two streaming hot standbys serves the whole binary, beside a second primary
//! (`other`) with the same role and verifier: what a promoted replica looks like. Branch `two`
//! lists both replicas; `junk` lists a TCP listener that answers like an HTTP server before the
//! real replica; `promoted` lists `other` (`in_hot_standby = off`) before the second replica;
//! `not_standby` lists only `other` as its replica.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::Duration;

use branchgate::upstream::{probe, ProbeError};
use branchgate_e2e::tokio_tls::assert_db_error;
use branchgate_e2e::tp_session::Session;
use branchgate_e2e::{
    psycopg_query, BranchSpec, Certs, Conninfo, PgServer, SslNegotiation, TestRouter,
};
use tokio_postgres::error::SqlState;

const PASSWORD: &str = "pscale_pw_replicas_app_Vb2";
/// Sessions held open at once on branch `two`.
const HELD: usize = 6;
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

struct Fixture {
    certs: Certs,
    router: TestRouter,
    primary: PgServer,
    replica_a: PgServer,
    replica_b: PgServer,
    other: PgServer,
    junk: SocketAddr,
}

/// A listener that answers every connection with an HTTP error and hangs up.
fn junk_listener() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind junk listener");
    let addr = listener.local_addr().expect("junk address");
    thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut first = [0u8; 64];
            let _ = stream.read(&mut first);
            let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
        }
    });
    addr
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let (primary, other) = thread::scope(|s| {
            let other = s.spawn(PgServer::start_primary);
            (
                PgServer::start_primary(),
                other.join().expect("second primary starts"),
            )
        });
        primary.create_role("app", PASSWORD);
        let (replica_a, replica_b) = thread::scope(|s| {
            let b = s.spawn(|| PgServer::start_replica(&primary));
            let a = PgServer::start_replica(&primary);
            (a, b.join().expect("second replica starts"))
        });
        for replica in [&replica_a, &replica_b] {
            replica.wait_for_value(
                "SELECT count(*) FROM pg_roles WHERE rolname = 'app' AND rolpassword IS NOT NULL",
                "1",
            );
        }
        let verifier = primary.role_verifier("app");
        // The same verifier, so the router's SCRAM with the client's key works there too.
        other.create_role("app", &verifier);
        let junk = junk_listener();
        let branch = |id: &str, replicas: &[SocketAddr]| {
            replicas.iter().fold(
                BranchSpec::new(id, primary.addr()).role("app", &verifier),
                |spec, addr| spec.replica(*addr),
            )
        };
        let branches = [
            branch("two", &[replica_a.addr(), replica_b.addr()]),
            branch("junk", &[junk, replica_a.addr()]),
            branch("promoted", &[other.addr(), replica_b.addr()]),
            branch("not_standby", &[other.addr()]),
        ];
        let certs = Certs::generate();
        let router = TestRouter::start(&certs, &branches);
        Fixture {
            certs,
            router,
            primary,
            replica_a,
            replica_b,
            other,
            junk,
        }
    })
}

/// The tests share the replicas' connection counts, so they take turns: one test's sessions
/// must not skew another's least-connections choice.
fn serial() -> MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    TURN.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Fixture {
    fn libpq(&self, user: &str) -> Conninfo {
        Conninfo::new(self.router.direct_addr())
            .param("host", "localhost")
            .param("hostaddr", "127.0.0.1")
            .user(user)
            .password(PASSWORD)
            .verify_full(&self.certs.ca_path(), SslNegotiation::Direct)
    }

    /// The port of the server a `|replica` session on `branch` lands on, and whether that
    /// server is in recovery.
    fn replica_port(&self, branch: &str) -> String {
        psycopg_query(
            &self.libpq(&format!("app.{branch}|replica")),
            "select inet_server_port()::text || ' ' || pg_is_in_recovery()::text",
        )
        .unwrap_or_else(|e| panic!("replica session on {branch}: {e:?}"))
    }
}

#[test]
fn held_sessions_spread_over_both_replicas() {
    let _turn = serial();
    let f = fixture();
    let sessions: Vec<Session> = (0..HELD)
        .map(|_| {
            Session::open(
                f.router.direct_addr(),
                f.certs.client_config(),
                "app.two|replica",
                PASSWORD,
            )
            .expect("replica session opens")
        })
        .collect();
    let mut ports: Vec<u16> = sessions
        .iter()
        .map(|s| {
            s.value("select inet_server_port()")
                .expect("query")
                .parse()
                .expect("a port")
        })
        .collect();
    ports.sort_unstable();
    let on_a = ports.iter().filter(|&&p| p == f.replica_a.port()).count();
    let on_b = ports.iter().filter(|&&p| p == f.replica_b.port()).count();
    assert_eq!(
        on_a + on_b,
        HELD,
        "every session is on a replica: {ports:?}"
    );
    // Least connections: each new session goes to the replica holding fewer, so the two
    // counts differ by at most one.
    assert!(on_a.abs_diff(on_b) <= 1, "{on_a} vs {on_b}: {ports:?}");
    for session in sessions {
        session.close();
    }
}

#[test]
fn an_address_that_is_not_postgres_is_skipped() {
    let _turn = serial();
    let f = fixture();
    let expected = format!("{} true", f.replica_a.port());
    for _ in 0..4 {
        assert_eq!(f.replica_port("junk"), expected);
    }
}

#[test]
fn a_replica_address_that_is_not_a_standby_is_skipped() {
    let _turn = serial();
    let f = fixture();
    let expected = format!("{} true", f.replica_b.port());
    for _ in 0..4 {
        assert_eq!(f.replica_port("promoted"), expected);
    }
    // A primary listed as the only replica: never used for `|replica`, whatever probes say.
    for _ in 0..2 {
        let error = Session::open(
            f.router.direct_addr(),
            f.certs.client_config(),
            "app.not_standby|replica",
            PASSWORD,
        )
        .err()
        .expect("no standby on this branch");
        assert_db_error(
            &error,
            &SqlState::CONNECTION_FAILURE,
            "no healthy replica available for branch \"not_standby\"",
        );
    }
}

#[test]
fn the_health_probe_tells_postgres_from_other_listeners() {
    let _turn = serial();
    let f = fixture();
    for server in [&f.primary, &f.replica_a, &f.replica_b, &f.other] {
        probe(server.addr(), PROBE_TIMEOUT)
            .unwrap_or_else(|e| panic!("{} is a healthy server: {e}", server.addr()));
    }
    assert!(
        matches!(
            probe(f.junk, PROBE_TIMEOUT),
            Err(ProbeError::NotPostgres(_))
        ),
        "{:?}",
        probe(f.junk, PROBE_TIMEOUT)
    );
    // A listener that accepts and never answers: the probe gives up at its timeout.
    let silent = TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent_addr = silent.local_addr().expect("address");
    assert!(
        matches!(
            probe(silent_addr, Duration::from_millis(300)),
            Err(ProbeError::Io(_))
        ),
        "silent listener"
    );
    drop(silent);
    assert!(matches!(
        probe(silent_addr, PROBE_TIMEOUT),
        Err(ProbeError::Connect(_))
    ));
    // PostgreSQL logs nothing for a probe: it hangs up during authentication.
    for server in [&f.primary, &f.replica_a] {
        let log = server.log_tail(200);
        assert!(
            !log.contains("branchgate_health_probe"),
            "probe left a trace in the server log:\n{log}"
        );
    }
}
