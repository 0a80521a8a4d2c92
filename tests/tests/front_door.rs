//! The front door against what an unauthenticated party can do from the internet: idle sockets
//! and stalled TLS handshakes by the dozen, more of them than the startup budget allows, floods
//! of made-up cancel keys, and connections caught half-way by a shutdown. Each case runs a
//! router of its own in front of one real PostgreSQL and checks that real clients are served.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use branchgate_e2e::raw::{
    self, cancel_request, client_hello, expect_closed, login, login_keyed, next_message,
    parse_error, query, query_one, request, start_sasl, Mode, Tls, SSL_REQUEST_CODE,
};
use branchgate_e2e::{BranchSpec, Certs, PgServer, TestRouter};

const ROLE: &str = "app";
const PASSWORD: &str = "pscale_pw_front_door_0123456789";

struct Fixture {
    certs: Certs,
    pg: PgServer,
    verifier: String,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let pg = PgServer::start_primary();
        pg.create_role(ROLE, PASSWORD);
        let verifier = pg.role_verifier(ROLE);
        Fixture {
            certs: Certs::generate(),
            pg,
            verifier,
        }
    })
}

/// Branch `b1` on the fixture's PostgreSQL, role `app`.
fn b1() -> BranchSpec {
    let f = fixture();
    BranchSpec::new("b1", f.pg.addr()).role(ROLE, &f.verifier)
}

/// router.toml with each `key = value` line of `set` put in place of the template's own (or
/// added to its `[timeouts]` table, which ends the template), then `tables` appended.
fn configured(
    set: &'static [(&'static str, &'static str)],
    tables: &'static str,
) -> impl FnOnce(String) -> String {
    move |mut text| {
        for (key, value) in set {
            let line = format!("{key} = {value}\n");
            match text.lines().find(|l| l.starts_with(&format!("{key} = "))) {
                Some(old) => text = text.replace(&format!("{old}\n"), &line),
                None => text.push_str(&line),
            }
        }
        text + tables
    }
}

/// A logged-in raw TLS session of `app` on `branch`.
fn session(addr: SocketAddr, branch: &str) -> Tls {
    let mut tls = raw::connect_tls(addr, fixture().certs.client_config(), Mode::Direct);
    start_sasl(&mut tls, &format!("{ROLE}.{branch}"));
    login(&mut tls, PASSWORD).unwrap_or_else(|e| panic!("login to {branch}: {e:?}"));
    tls
}

/// True if the router has closed `sock` (or closes it within `wait`), false if it is open
/// (silent, or answering a handshake the socket started).
fn closed_within(sock: &mut TcpStream, wait: Duration) -> bool {
    sock.set_read_timeout(Some(wait)).expect("read timeout");
    let mut buf = [0u8; 4096];
    match sock.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => false,
        Err(e) if e.kind() == ErrorKind::ConnectionReset => true,
        Err(e) => panic!("reading an idle socket: {e}"),
    }
}

/// Pre-auth sockets of every kind: silent TCP, an SSLRequest whose handshake never starts, a
/// ClientHello never followed up, and TLS up but no StartupMessage.
fn unauthenticated(addr: SocketAddr, each: usize) -> Vec<Box<dyn Read + Send>> {
    let hello = client_hello(fixture().certs.client_config());
    let mut held: Vec<Box<dyn Read + Send>> = Vec::new();
    for _ in 0..each {
        held.push(Box::new(raw::tcp(addr)));
        let mut after_s = raw::tcp(addr);
        after_s
            .write_all(&request(SSL_REQUEST_CODE))
            .expect("SSLRequest");
        held.push(Box::new(after_s));
        let mut stalled = raw::tcp(addr);
        stalled.write_all(&hello).expect("ClientHello");
        held.push(Box::new(stalled));
    }
    held
}

// ---------------------------------------------------------------------------------------------
// 1. Unauthenticated sockets and the limits

/// With `max_client_connections = 5`, dozens of sockets that never authenticate do not count:
/// five clients log in while they are held, the sixth authenticated one gets 53300, and the
/// held sockets are not touched.
#[test]
fn idle_sockets_and_stalled_handshakes_do_not_lock_out_clients() {
    let router = TestRouter::start_with_config(
        &fixture().certs,
        &[b1()],
        configured(
            &[("startup", "\"60s\""), ("handshake", "\"60s\"")],
            "[limits]\nmax_client_connections = 5\n",
        ),
    );
    let addr = router.direct_addr();
    let held = unauthenticated(addr, 20);
    let mut silent: Vec<TcpStream> = (0..20).map(|_| raw::tcp(addr)).collect();
    let mut tls_only: Vec<Tls> = (0..5)
        .map(|_| raw::connect_tls(addr, fixture().certs.client_config(), Mode::SslRequest))
        .collect();

    let mut sessions: Vec<Tls> = (0..5).map(|_| session(addr, "b1")).collect();
    for tls in &mut sessions {
        assert_eq!(query_one(tls, "select 40 + 2"), "42");
    }
    let mut sixth = raw::connect_tls(addr, fixture().certs.client_config(), Mode::Direct);
    start_sasl(&mut sixth, "app.b1");
    let error = login(&mut sixth, PASSWORD).expect_err("over max_client_connections");
    assert_eq!(
        (error.code.as_str(), error.message.as_str()),
        ("53300", "sorry, too many clients already")
    );
    expect_closed(&mut sixth, "the sixth client");
    // A session that ends makes room for the next client.
    sessions.pop();
    let mut next = retry_login(addr);
    assert_eq!(query_one(&mut next, "select 1"), "1");

    // Nothing was done to the sockets that said nothing or stopped half-way.
    for sock in &mut silent {
        let mut byte = [0u8; 1];
        sock.set_read_timeout(Some(Duration::from_millis(10)))
            .expect("timeout");
        let e = sock
            .read(&mut byte)
            .expect_err("nothing to read, still open");
        assert!(
            matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
            "{e}"
        );
    }
    for tls in &mut tls_only {
        tls.get_ref()
            .set_read_timeout(Some(Duration::from_millis(10)))
            .expect("timeout");
        let mut byte = [0u8; 1];
        let e = tls.read(&mut byte).expect_err("nothing to read");
        assert!(
            matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
            "{e}"
        );
    }
    drop(held);
}

/// Logs in, retrying briefly while the router has not yet seen a session's end.
fn retry_login(addr: SocketAddr) -> Tls {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut tls = raw::connect_tls(addr, fixture().certs.client_config(), Mode::Direct);
        start_sasl(&mut tls, "app.b1");
        match login(&mut tls, PASSWORD) {
            Ok(()) => return tls,
            Err(e) if e.code == "53300" && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("login: {e:?}"),
        }
    }
}

/// The per-worker startup budget: connections beyond it are closed at accept, before any
/// handshake; sessions already established go on; once the held sockets go, clients get in.
#[test]
fn the_startup_budget_closes_the_excess_at_accept() {
    // Two workers with four places each.
    let router = TestRouter::start_with_config(
        &fixture().certs,
        &[b1()],
        configured(
            &[("startup", "\"60s\""), ("handshake", "\"60s\"")],
            "[limits]\nmax_startup_connections = 4\n",
        ),
    );
    let addr = router.direct_addr();
    let mut established = session(addr, "b1");
    let mut idle: Vec<TcpStream> = (0..30).map(|_| raw::tcp(addr)).collect();
    let hello = client_hello(fixture().certs.client_config());
    for sock in idle.iter_mut().step_by(3) {
        // Some of them start a handshake; a closed one may refuse the write.
        let _ = sock.write_all(&hello);
    }
    let closed = idle
        .iter_mut()
        .filter_map(|sock| closed_within(sock, Duration::from_millis(500)).then_some(()))
        .count();
    assert!(
        closed >= 30 - 8,
        "at most 2 workers x 4 sockets may wait; {closed} of 30 were closed"
    );
    assert_eq!(
        query_one(&mut established, "select 'still here'"),
        "still here"
    );
    drop(idle);
    let mut client = loop_until_admitted(addr);
    assert_eq!(query_one(&mut client, "select 1"), "1");
}

/// Logs in once the router has seen the held sockets close (their places come back); until
/// then a new connection is closed at accept and its handshake fails.
fn loop_until_admitted(addr: SocketAddr) -> Tls {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match raw::tls_handshake(fixture().certs.client_config(), raw::tcp(addr)) {
            Ok(mut tls) => {
                start_sasl(&mut tls, "app.b1");
                login(&mut tls, PASSWORD).unwrap_or_else(|e| panic!("login: {e:?}"));
                return tls;
            }
            Err(e) => assert!(Instant::now() < deadline, "the budget never freed up: {e}"),
        }
        thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Cancel floods

/// Sends a plaintext CancelRequest from `source` and waits for the router to close.
fn send_cancel(addr: SocketAddr, source: IpAddr, pid: u32, secret: u32) -> bool {
    let socket = match source {
        IpAddr::V4(_) => socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None),
        IpAddr::V6(_) => socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None),
    };
    let Ok(socket) = socket else { return false };
    if socket.bind(&SocketAddr::new(source, 0).into()).is_err()
        || socket
            .connect_timeout(&addr.into(), Duration::from_secs(5))
            .is_err()
    {
        return false;
    }
    let mut sock: TcpStream = socket.into();
    let _ = sock.set_read_timeout(Some(Duration::from_secs(5)));
    if sock.write_all(&cancel_request(pid, secret)).is_err() {
        return false;
    }
    let mut rest = Vec::new();
    let _ = sock.read_to_end(&mut rest);
    true
}

/// A query on its own thread: returns the SQLSTATE it ended with ("" if it completed).
fn sleep_in_background(mut tls: Tls) -> thread::JoinHandle<(String, Duration)> {
    thread::spawn(move || {
        let started = Instant::now();
        tls.write_all(&query("select pg_sleep(30)"))
            .expect("send query");
        let mut code = String::new();
        loop {
            match next_message(&mut tls, "pg_sleep") {
                (b'E', body) => code = parse_error(&body).code,
                (b'Z', _) => return (code, started.elapsed()),
                _ => {}
            }
        }
    })
}

/// Waits until `pid` runs `pg_sleep` (seen from another session).
fn wait_sleeping(watcher: &mut Tls, pid: u32) {
    let sql = format!(
        "select count(*) from pg_stat_activity where pid = {pid} and state = 'active' \
         and query = 'select pg_sleep(30)'"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while query_one(watcher, &sql) != "1" {
        assert!(Instant::now() < deadline, "pg_sleep never started");
        thread::sleep(Duration::from_millis(20));
    }
}

/// Random keys from many sources, as fast as they go, do not keep a real cancel from
/// canceling its query; a source that sent too many unknown keys is ignored, even with a
/// right one, while other sources are not.
#[test]
fn a_cancel_flood_does_not_displace_a_real_cancel() {
    let router = TestRouter::start(&fixture().certs, &[b1()]);
    let addr = router.direct_addr();
    let mut watcher = session(addr, "b1");
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let flood: Vec<_> = (2..18u8)
        .map(|host| {
            let (stop, sent) = (stop.clone(), sent.clone());
            thread::spawn(move || {
                let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, host));
                let mut seed = u32::from(host).wrapping_mul(0x9e37_79b9);
                while !stop.load(Ordering::Relaxed) {
                    seed ^= seed << 13;
                    seed ^= seed >> 17;
                    seed ^= seed << 5;
                    if send_cancel(addr, source, seed, seed.rotate_left(7)) {
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();

    let honest = IpAddr::V4(Ipv4Addr::LOCALHOST);
    for round in 0..3 {
        let mut tls = raw::connect_tls(addr, fixture().certs.client_config(), Mode::Direct);
        start_sasl(&mut tls, "app.b1");
        let (pid, secret) = login_keyed(&mut tls, PASSWORD).expect("login");
        let sleeper = sleep_in_background(tls);
        wait_sleeping(&mut watcher, pid);
        // The flood is running when the real cancel goes (on a loaded machine its threads
        // may take a while to get a turn).
        let before = sent.load(Ordering::Relaxed);
        let flooding = Instant::now();
        while sent.load(Ordering::Relaxed) <= before {
            assert!(
                flooding.elapsed() < Duration::from_secs(10),
                "round {round}: the flood was not running"
            );
            thread::sleep(Duration::from_millis(5));
        }
        assert!(
            send_cancel(addr, honest, pid, secret),
            "send the real cancel"
        );
        let (code, took) = sleeper.join().expect("query thread");
        assert_eq!(code, "57014", "round {round}: the query was canceled");
        assert!(took < Duration::from_secs(20), "round {round}: {took:?}");
    }
    stop.store(true, Ordering::Relaxed);
    for thread in flood {
        thread.join().expect("flood thread");
    }

    // A guessing source is ignored even with the right key; another source is heard.
    let mut tls = raw::connect_tls(addr, fixture().certs.client_config(), Mode::Direct);
    start_sasl(&mut tls, "app.b1");
    let (pid, secret) = login_keyed(&mut tls, PASSWORD).expect("login");
    let sleeper = sleep_in_background(tls);
    wait_sleeping(&mut watcher, pid);
    let guesser = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 99));
    // Every worker keeps its own count: enough misses for either to stop listening.
    for wrong in 0..200 {
        send_cancel(addr, guesser, pid, secret ^ (wrong + 1));
    }
    for _ in 0..4 {
        send_cancel(addr, guesser, pid, secret);
    }
    thread::sleep(Duration::from_millis(500));
    wait_sleeping(&mut watcher, pid);
    assert!(!sleeper.is_finished(), "the guesser's cancel was ignored");
    assert!(send_cancel(addr, honest, pid, secret));
    let (code, _) = sleeper.join().expect("query thread");
    assert_eq!(code, "57014");
}

// ---------------------------------------------------------------------------------------------
// 3. The end of the drain

/// A listener that takes connections and never answers: a backend that hangs.
fn black_hole() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address");
    (listener, addr)
}

/// When the drain time ends, connections still starting end too: a client that authenticated
/// and waits for its backend gets FATAL 57P01 as PostgreSQL sends it, then close_notify; one
/// still authenticating gets close_notify alone (PostgreSQL says nothing during authentication);
/// a socket that said nothing is closed.
#[test]
fn connections_still_starting_when_the_drain_ends() {
    let (hole_listener, hole_addr) = black_hole();
    let hole = BranchSpec::new("hole", hole_addr).role(ROLE, &fixture().verifier);
    let mut router = TestRouter::start_with_config(
        &fixture().certs,
        &[b1(), hole],
        configured(
            &[
                ("drain", "\"1s\""),
                ("startup", "\"60s\""),
                ("handshake", "\"60s\""),
                ("connect", "\"60s\""),
            ],
            "",
        ),
    );
    let addr = router.direct_addr();

    let waiting = thread::spawn(move || {
        let mut tls = raw::connect_tls(addr, fixture().certs.client_config(), Mode::Direct);
        start_sasl(&mut tls, "app.hole");
        let error = login(&mut tls, PASSWORD).expect_err("the backend never answers");
        expect_closed(&mut tls, "authenticated, waiting for the backend");
        error
    });
    let mut authenticating =
        raw::connect_tls(addr, fixture().certs.client_config(), Mode::SslRequest);
    start_sasl(&mut authenticating, "app.b1");
    let mut silent = raw::tcp(addr);
    // The first client is past SCRAM once the router has connected to the black hole.
    let (_backend, _) = hole_listener
        .accept()
        .expect("the router connects to the backend");

    let started = Instant::now();
    let shutdown = router.shutdown_in_background();
    let error = waiting.join().expect("waiting client");
    assert_eq!(
        (
            error.severity.as_str(),
            error.code.as_str(),
            error.message.as_str()
        ),
        (
            "FATAL",
            "57P01",
            "terminating connection due to administrator command"
        )
    );
    expect_closed(&mut authenticating, "still authenticating");
    assert!(closed_within(&mut silent, raw::IO_TIMEOUT));
    shutdown.join().expect("shutdown");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Logs

/// Everything the router logs in this test process.
fn captured_log() -> &'static Mutex<Vec<u8>> {
    static LOG: OnceLock<&'static Mutex<Vec<u8>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let log: &'static Mutex<Vec<u8>> = Box::leak(Box::new(Mutex::new(Vec::new())));
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .with_writer(move || Capture(log))
            .try_init();
        log
    })
}

struct Capture(&'static Mutex<Vec<u8>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Twenty clients refused because their branch's server is down make one warning, not twenty.
#[test]
fn repeated_refusals_are_logged_once_with_a_count() {
    let log = captured_log();
    let down = {
        let (listener, addr) = black_hole();
        drop(listener);
        addr
    };
    let branch = BranchSpec::new("down", down).role(ROLE, &fixture().verifier);
    let router = TestRouter::start(&fixture().certs, &[branch]);
    let addr = router.direct_addr();
    let started = Instant::now();
    for _ in 0..20 {
        let mut tls = raw::connect_tls(addr, fixture().certs.client_config(), Mode::Direct);
        start_sasl(&mut tls, "app.down");
        let error = login(&mut tls, PASSWORD).expect_err("the server is down");
        assert_eq!(error.code, "08006");
        expect_closed(&mut tls, "refused");
    }
    // One per interval: one in all unless a loaded machine took longer than that for them.
    let most = 1 + started.elapsed().as_secs() / branchgate::throttle::LOG_INTERVAL.as_secs();
    let text = String::from_utf8_lossy(&log.lock().expect("log lock")).into_owned();
    let warnings = text
        .lines()
        .filter(|line| line.contains("WARN") && line.contains("connection refused"))
        .count() as u64;
    assert!(
        (1..=most).contains(&warnings),
        "{warnings} warnings, at most {most}: {text}"
    );
}

// ---------------------------------------------------------------------------------------------
// 5. The same answers as PostgreSQL

/// An ErrorResponse's fields but PostgreSQL's source location (F, L, R), and how the stream
/// ended after it: `true` for a close_notify.
type Answer = (Vec<(u8, String)>, bool);

fn error_and_end(tls: &mut Tls, what: &str) -> Answer {
    let (tag, body) = next_message(tls, what);
    assert_eq!(tag, b'E', "{what}: expected ErrorResponse");
    let fields = body
        .split(|&b| b == 0)
        .filter(|f| !f.is_empty() && !matches!(f[0], b'F' | b'L' | b'R'))
        .map(|f| (f[0], String::from_utf8_lossy(&f[1..]).into_owned()))
        .collect();
    let mut rest = [0u8; 64];
    let clean = matches!(tls.read(&mut rest), Ok(0));
    (fields, clean)
}

/// What a server at `addr` answers `user` for each front-door mistake the router must answer
/// as PostgreSQL does.
fn front_door_answers(addr: SocketAddr, user: &str, ghost: &str) -> Vec<(&'static str, Answer)> {
    let config = fixture().certs.client_config();
    let mut answers = Vec::new();

    let mut sock = raw::tcp(addr);
    sock.write_all(&[request(SSL_REQUEST_CODE), raw::startup_for(user)].concat())
        .expect("send");
    assert_eq!(raw::read_byte(&mut sock), b'S');
    let mut tls = raw::tls_handshake(config.clone(), sock).expect("handshake");
    answers.push(("pipelined SSLRequest", error_and_end(&mut tls, "pipelined")));

    for (what, tag) in [("Terminate for SASL", b'X'), ("Query for SASL", b'Q')] {
        let mut tls = raw::connect_tls(addr, config.clone(), Mode::SslRequest);
        start_sasl_any(&mut tls, user);
        let body: &[u8] = if tag == b'Q' { b"select 1\0" } else { b"" };
        tls.write_all(&raw::message(tag, body)).expect("send");
        answers.push((what, error_and_end(&mut tls, what)));
    }

    for (what, name, password) in [
        ("wrong password", user, "pscale_pw_wrong"),
        ("unknown role", ghost, PASSWORD),
    ] {
        let mut tls = raw::connect_tls(addr, config.clone(), Mode::SslRequest);
        start_sasl_any(&mut tls, name);
        let error = login(&mut tls, password).expect_err(what);
        let mut rest = [0u8; 64];
        let clean = matches!(tls.read(&mut rest), Ok(0));
        let fields = vec![
            (b'S', error.severity.clone()),
            (b'C', error.code),
            (b'M', error.message),
        ];
        answers.push((what, (fields, clean)));
    }
    answers
}

/// AuthenticationSASL, whatever mechanisms are offered (PostgreSQL adds SCRAM-SHA-256-PLUS
/// over TLS; the router, which ends TLS itself, does not).
fn start_sasl_any(tls: &mut Tls, user: &str) {
    tls.write_all(&raw::startup_for(user))
        .expect("send StartupMessage");
    let (tag, body) = next_message(tls, "AuthenticationSASL");
    assert_eq!(
        (tag, &body[..4]),
        (b'R', &10u32.to_be_bytes()[..]),
        "{body:?}"
    );
}

/// For the mistakes whose answer PostgreSQL defines, the router sends the same ErrorResponse
/// (severity, code, message, detail) and ends the TLS connection the same way (close_notify) as
/// a real PostgreSQL 15 with TLS on.
#[test]
fn front_door_mistakes_are_answered_as_postgresql_answers_them() {
    let f = fixture();
    static TLS_ON: OnceLock<()> = OnceLock::new();
    TLS_ON.get_or_init(|| f.pg.enable_tls(&f.certs));
    let router = TestRouter::start(&f.certs, &[b1()]);
    let postgres = front_door_answers(f.pg.addr(), ROLE, "ghost");
    let ours = front_door_answers(router.direct_addr(), "app.b1", "ghost.b1");
    // What PostgreSQL says, so that the comparison is about something.
    let (pipelined, clean) = &postgres[0].1;
    assert!(*clean, "PostgreSQL ends with close_notify");
    assert!(
        pipelined.contains(&(b'M', "received unencrypted data after SSL request".into()))
            && pipelined.iter().any(|(field, _)| *field == b'D'),
        "{pipelined:?}"
    );
    assert_eq!(postgres.len(), 5);
    for ((what, pg), (_, bg)) in postgres.iter().zip(&ours) {
        assert_eq!(
            bg, pg,
            "{what}: router (left) and PostgreSQL (right) differ"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 6. Broken records get the alert rustls would send

/// Writes `record` straight to the socket under `tls` (past the client's own record layer) and
/// returns the error the client's rustls reports on its next read.
fn send_raw_record(tls: &mut Tls, record: &[u8]) -> rustls::Error {
    tls.sock.write_all(record).expect("send the raw record");
    let mut buf = [0u8; 64];
    let error = loop {
        match tls.read(&mut buf) {
            Ok(0) => panic!("closed without an alert"),
            Ok(_) => continue,
            Err(error) => break error,
        }
    };
    let inner = error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .unwrap_or_else(|| panic!("not a TLS error: {error}"));
    inner.clone()
}

/// A record whose authentication fails is answered with the bad_record_mac alert, at the front
/// door and mid-session; one whose header claims more than TLS allows, with decode_error (what
/// rustls sends for it); the connection then ends and other clients go on.
#[test]
fn broken_records_get_their_alert_at_the_front_door_and_mid_session() {
    use rustls::AlertDescription::{BadRecordMac, DecodeError};
    let router = TestRouter::start(&fixture().certs, &[b1()]);
    let addr = router.direct_addr();
    let forged = [&[0x17u8, 0x03, 0x03, 0x00, 0x20][..], &[0x5a; 32]].concat();
    let oversized = [0x17u8, 0x03, 0x03, 0xff, 0xff];
    for mode in [Mode::Direct, Mode::SslRequest] {
        let mut tls = raw::connect_tls(addr, fixture().certs.client_config(), mode);
        assert_eq!(
            send_raw_record(&mut tls, &forged),
            rustls::Error::AlertReceived(BadRecordMac),
            "{mode:?}: before the StartupMessage"
        );
        let mut tls = session(addr, "b1");
        assert_eq!(
            send_raw_record(&mut tls, &forged),
            rustls::Error::AlertReceived(BadRecordMac),
            "{mode:?}: mid-session"
        );
        let mut tls = session(addr, "b1");
        assert_eq!(
            send_raw_record(&mut tls, &oversized),
            rustls::Error::AlertReceived(DecodeError),
            "{mode:?}: a header over the limit, mid-session"
        );
    }
    let mut tls = session(addr, "b1");
    assert_eq!(query_one(&mut tls, "select 'fine'"), "fine");
}
