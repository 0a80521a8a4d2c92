//! Bad input at the router's front door, from raw sockets: plaintext startups, TLS/ALPN mistakes,
//! malformed startup packets, wrong user names, garbage SCRAM, silent clients, unreachable
//! backends, protocol negotiation. Every case asserts the exact answer (SQLSTATE, message, TLS
//! alert or a silent close) and then that the router still serves a real client.
//!
//! Raw clients are std `TcpStream`s, wrapped in a sync rustls `StreamOwned` for TLS, either after
//! an SSLRequest or from the first byte (direct SSL, ALPN `postgresql`). Full logins reuse the
//! router crate's SCRAM client with a password, like any libpq client would.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use branchgate::auth::{ClientCredentials, ScramClient};
use branchgate_e2e::raw::{
    self, attribute, cancel_request, expect_auth, expect_closed, expect_fatal, expect_sasl, login,
    message, next_message, parse_error, query, query_one, read_byte, request,
    sasl_initial_response, scram_first, ssl_request_on, start_sasl, startup_for, startup_message,
    tls_handshake, untagged, Mode, PgError, Tls, AUTH_OK, AUTH_SASL_CONTINUE, AUTH_SASL_FINAL,
    CANCEL_REQUEST_CODE, GSSENC_REQUEST_CODE, IO_TIMEOUT, MODES, PROTOCOL_3_0, PROTOCOL_3_2,
    PROTOCOL_4_0, SCRAM_SHA_256, SSL_REQUEST_CODE,
};
use branchgate_e2e::{
    free_port, psycopg_query, BranchSpec, Certs, ClientError, Conninfo, PgServer, SslNegotiation,
    TestRouter,
};
use rustls::{AlertDescription, ClientConfig};

const ROLE: &str = "app";
const PASSWORD: &str = "pscale_pw_bad_input_0123456789";
/// A client-final-message proof of 32 zero bytes, base64: well formed, never correct.
const WRONG_PROOF: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

// ---------------------------------------------------------------------------------------------
// Fixture

struct Fixture {
    certs: Certs,
    router: TestRouter,
    down_port: u16,
    pg: PgServer,
}

static FIXTURE: OnceLock<Fixture> = OnceLock::new();

/// One PostgreSQL primary behind three branches: `b1` (the primary), `down` (a port nobody
/// listens on) and `norep` (the primary, plus replicas nobody listens on).
fn fixture() -> &'static Fixture {
    FIXTURE.get_or_init(|| {
        let pg = PgServer::start_primary();
        pg.create_role(ROLE, PASSWORD);
        let verifier = pg.role_verifier(ROLE);
        let certs = Certs::generate();
        let down_port = free_port();
        let nowhere = |port| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let branches = [
            BranchSpec::new("b1", pg.addr()).role(ROLE, &verifier),
            BranchSpec::new("down", nowhere(down_port)).role(ROLE, &verifier),
            BranchSpec::new("norep", pg.addr())
                .replica(nowhere(free_port()))
                .replica(nowhere(free_port()))
                .role(ROLE, &verifier),
        ];
        let router = TestRouter::start(&certs, &branches);
        Fixture {
            certs,
            router,
            down_port,
            pg,
        }
    })
}

impl Fixture {
    fn conninfo(&self, user: &str, password: &str, negotiation: SslNegotiation) -> Conninfo {
        Conninfo::new(self.router.direct_addr())
            .user(user)
            .password(password)
            .verify_full(&self.certs.ca_path(), negotiation)
    }
}

/// `select 1` through the router with psycopg, alternating SSLRequest and direct SSL.
fn assert_router_healthy() {
    static TURN: AtomicUsize = AtomicUsize::new(0);
    let negotiation = if TURN.fetch_add(1, Ordering::Relaxed).is_multiple_of(2) {
        SslNegotiation::Postgres
    } else {
        SslNegotiation::Direct
    };
    let info = fixture().conninfo("app.b1", PASSWORD, negotiation);
    let rows = psycopg_query(&info, "select 1")
        .unwrap_or_else(|e| panic!("router no longer serves ({negotiation:?}): {e:?}"));
    assert_eq!(rows, "1");
}

/// A TCP connection to the fixture's router.
fn tcp() -> TcpStream {
    raw::tcp(fixture().router.direct_addr())
}

/// The fixture's client configuration with other ALPN protocols.
fn client_config(alpn: &[&[u8]]) -> Arc<ClientConfig> {
    let mut config = (*fixture().certs.client_config()).clone();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// A TLS connection to the fixture's router, verified against its CA.
fn connect_tls(mode: Mode) -> Tls {
    raw::connect_tls(
        fixture().router.direct_addr(),
        fixture().certs.client_config(),
        mode,
    )
}

/// A working session over `tls` ends with Terminate.
fn check_session(tls: &mut Tls, user: &str) {
    start_sasl(tls, user);
    login(tls, PASSWORD).unwrap_or_else(|e| panic!("{user} login: {e:?}"));
    assert_eq!(query_one(tls, "select 1"), "1");
    tls.write_all(&message(b'X', &[])).expect("send Terminate");
}

fn unpredictable_u32() -> u32 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .subsec_nanos();
    nanos ^ std::process::id().rotate_left(16)
}

// ---------------------------------------------------------------------------------------------
// Bad cases (each asserts its own outcome; tests add the health check)

fn case_plaintext_startup() {
    let mut sock = tcp();
    sock.write_all(&startup_for("app.b1")).expect("send");
    let error = expect_fatal(&mut sock, "28000", "plaintext startup");
    assert!(error.message.contains("TLS"), "{error:?}");
}

fn case_direct_ssl_wrong_alpn() {
    let err = tls_handshake(client_config(&[b"http/1.1"]), tcp())
        .expect_err("ALPN http/1.1 must be refused");
    let tls_error = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    assert_eq!(
        tls_error,
        Some(&rustls::Error::AlertReceived(
            AlertDescription::NoApplicationProtocol
        )),
        "{err}"
    );
}

fn case_direct_ssl_no_alpn() {
    match tls_handshake(client_config(&[]), tcp()) {
        Ok(mut tls) => expect_closed(&mut tls, "direct SSL without ALPN"),
        Err(e) => assert!(
            matches!(
                e.kind(),
                ErrorKind::UnexpectedEof
                    | ErrorKind::ConnectionReset
                    | ErrorKind::ConnectionAborted
            ),
            "direct SSL without ALPN: {e}"
        ),
    }
}

/// PostgreSQL's detail line for unencrypted bytes behind an encryption request.
const MITM_DETAIL: &str = "This could be either a client-software bug or evidence of an \
                           attempted man-in-the-middle attack.";

/// A StartupMessage pipelined behind the SSLRequest: as PostgreSQL does, `S`, the handshake
/// (which never sees those bytes), then FATAL 08P01 over TLS and close_notify.
fn case_pipelined_after_ssl_request() {
    let mut sock = tcp();
    let bytes = [request(SSL_REQUEST_CODE), startup_for("app.b1")].concat();
    sock.write_all(&bytes).expect("send");
    assert_eq!(read_byte(&mut sock), b'S', "SSLRequest answer");
    let mut tls = tls_handshake(fixture().certs.client_config(), sock)
        .unwrap_or_else(|e| panic!("handshake after the pipelined SSLRequest: {e}"));
    let error = expect_fatal(&mut tls, "08P01", "data after SSLRequest");
    assert_eq!(error.message, "received unencrypted data after SSL request");
    assert_eq!(error.detail.as_deref(), Some(MITM_DETAIL));
}

/// Sends `bytes` as the startup packet over TLS and expects FATAL 08P01.
fn case_bad_startup_bytes(mode: Mode, bytes: &[u8], what: &str) {
    let mut tls = connect_tls(mode);
    tls.write_all(bytes).expect("send");
    let error = expect_fatal(&mut tls, "08P01", what);
    assert!(
        error.message.starts_with("invalid startup packet"),
        "{what}: {error:?}"
    );
}

fn case_startup_too_long(mode: Mode) {
    case_bad_startup_bytes(mode, &10_001i32.to_be_bytes(), "length 10001");
}

/// A startup packet cut short, then the client leaves: the router closes, saying nothing.
fn case_truncated_startup(mode: Mode) {
    let mut tls = connect_tls(mode);
    let partial = [
        &100u32.to_be_bytes()[..],
        &PROTOCOL_3_0.to_be_bytes(),
        b"user\0",
    ]
    .concat();
    tls.write_all(&partial).expect("send");
    tls.conn.send_close_notify();
    tls.flush().expect("send close_notify");
    tls.sock.shutdown(Shutdown::Write).expect("shutdown");
    expect_closed(&mut tls, "truncated startup");
}

fn case_no_user(mode: Mode) {
    let mut tls = connect_tls(mode);
    tls.write_all(&startup_message(PROTOCOL_3_0, &[("database", "postgres")]))
        .expect("send");
    let error = expect_fatal(&mut tls, "28000", "no user");
    assert_eq!(
        error.message,
        "no PostgreSQL user name specified in startup packet"
    );
}

/// A branch the catalog does not have gets a SCRAM exchange and fails like a wrong password.
fn case_unknown_branch(mode: Mode) {
    let mut tls = connect_tls(mode);
    start_sasl(&mut tls, "app.nosuch");
    let error = login(&mut tls, PASSWORD).expect_err("no such branch");
    assert_eq!(
        (error.code.as_str(), error.message.as_str()),
        ("28P01", "password authentication failed for user \"app\"")
    );
    expect_closed(&mut tls, "unknown branch");
}

fn case_wrong_mechanism(mode: Mode) {
    let mut tls = connect_tls(mode);
    start_sasl(&mut tls, "app.b1");
    tls.write_all(&sasl_initial_response("SCRAM-SHA-1", b"n,,n=,r=abc"))
        .expect("send");
    let error = expect_fatal(&mut tls, "08P01", "SCRAM-SHA-1");
    assert_eq!(
        error.message,
        "client selected an invalid SASL authentication mechanism"
    );
}

/// A well-formed exchange with a wrong proof; returns the error and the server-first-message.
fn wrong_proof(mode: Mode, user: &str) -> (PgError, String) {
    let mut tls = connect_tls(mode);
    start_sasl(&mut tls, user);
    let server_first = scram_first(&mut tls, "bad-input-client-nonce");
    let nonce = attribute(&server_first, "r");
    let client_final = format!("c=biws,r={nonce},p={WRONG_PROOF}");
    tls.write_all(&message(b'p', client_final.as_bytes()))
        .expect("send");
    let error = expect_fatal(&mut tls, "28P01", user);
    (error, server_first)
}

fn case_wrong_proof(mode: Mode) {
    let (error, _) = wrong_proof(mode, "app.b1");
    assert_eq!(
        error.message,
        "password authentication failed for user \"app\""
    );
}

fn case_silent_tcp() {
    let mut sock = tcp();
    expect_closed(&mut sock, "silent TCP client");
}

fn case_protocol_4(mode: Mode) {
    let mut tls = connect_tls(mode);
    tls.write_all(&startup_message(PROTOCOL_4_0, &[("user", "app.b1")]))
        .expect("send");
    let error = expect_fatal(&mut tls, "0A000", "protocol 4.0");
    assert_eq!(
        error.message,
        "unsupported frontend protocol 4.0: server supports 3.0 to 3.0"
    );
}

fn case_random_cancel() {
    let mut sock = tcp();
    sock.write_all(&cancel_request(unpredictable_u32(), unpredictable_u32()))
        .expect("send");
    expect_closed(&mut sock, "CancelRequest");
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn plaintext_startup_is_refused_with_28000() {
    case_plaintext_startup();
    assert_router_healthy();
}

#[test]
fn direct_ssl_with_http_alpn_gets_no_application_protocol() {
    case_direct_ssl_wrong_alpn();
    assert_router_healthy();
}

#[test]
fn direct_ssl_without_alpn_is_closed_without_a_message() {
    case_direct_ssl_no_alpn();
    assert_router_healthy();
}

#[test]
fn data_pipelined_after_ssl_request_is_refused_over_tls() {
    case_pipelined_after_ssl_request();
    assert_router_healthy();
}

#[test]
fn malformed_startup_packets_are_protocol_violations() {
    let mut plain = tcp();
    plain
        .write_all(&10_001i32.to_be_bytes())
        .expect("send length");
    expect_fatal(&mut plain, "08P01", "plaintext length 10001");
    assert_router_healthy();
    let mut plain = tcp();
    plain.write_all(&100u32.to_be_bytes()).expect("send length");
    plain.shutdown(Shutdown::Write).expect("shutdown");
    expect_closed(&mut plain, "plaintext truncated startup");
    assert_router_healthy();

    let lying = {
        let mut packet = startup_for("app.b1");
        packet[..4].copy_from_slice(&16u32.to_be_bytes());
        packet
    };
    for mode in MODES {
        case_startup_too_long(mode);
        assert_router_healthy();
        case_bad_startup_bytes(mode, &7u32.to_be_bytes(), "length 7");
        assert_router_healthy();
        case_bad_startup_bytes(mode, &0xFFFF_FFF0u32.to_be_bytes(), "negative length");
        assert_router_healthy();
        case_truncated_startup(mode);
        assert_router_healthy();
        case_bad_startup_bytes(mode, &lying, "length shorter than the parameters");
        assert_router_healthy();
        let not_utf8 = untagged(PROTOCOL_3_0, b"user\0\xff.b1\0\0");
        case_bad_startup_bytes(mode, &not_utf8, "user name not UTF-8");
        assert_router_healthy();
    }
}

#[test]
fn user_names_that_do_not_route() {
    for mode in MODES {
        case_no_user(mode);
        assert_router_healthy();

        let mut tls = connect_tls(mode);
        tls.write_all(&startup_for("app")).expect("send");
        let error = expect_fatal(&mut tls, "28000", "user without branch");
        assert!(error.message.contains("\"role.branch_id\""), "{error:?}");
        assert_router_healthy();

        let mut tls = connect_tls(mode);
        tls.write_all(&startup_for("app.b1|primary")).expect("send");
        let error = expect_fatal(&mut tls, "28000", "unknown suffix");
        assert!(error.message.contains("|replica"), "{error:?}");
        assert_router_healthy();

        case_unknown_branch(mode);
        assert_router_healthy();
    }
}

#[test]
fn wrong_password_and_unknown_role_fail_the_same_way() {
    let fx = fixture();
    let wrong = fx.conninfo("app.b1", "pscale_pw_wrong", SslNegotiation::Direct);
    let app = psycopg_query(&wrong, "select 1").expect_err("wrong password");
    assert!(
        app.message
            .contains("password authentication failed for user \"app\""),
        "{app:?}"
    );
    assert_router_healthy();
    let ghost = fx.conninfo("ghost.b1", PASSWORD, SslNegotiation::Direct);
    let ghost = psycopg_query(&ghost, "select 1").expect_err("unknown role");
    assert_eq!(
        ghost.message.replace("\"ghost\"", "\"app\""),
        app.message,
        "an unknown role must look like a wrong password"
    );
    assert_router_healthy();

    for mode in MODES {
        case_wrong_proof(mode);
        assert_router_healthy();
        let (error, ghost_first) = wrong_proof(mode, "ghost.b1");
        assert_eq!(
            error.message,
            "password authentication failed for user \"ghost\""
        );
        assert_router_healthy();
        let (_, app_first) = wrong_proof(mode, "app.b1");
        assert_router_healthy();
        let (_, ghost_again) = wrong_proof(mode, "ghost.b1");
        assert_router_healthy();
        // Same salt size and iteration count as a real role, and a stable salt per name.
        assert_eq!(attribute(&ghost_first, "i"), attribute(&app_first, "i"));
        assert_eq!(
            attribute(&ghost_first, "s").len(),
            attribute(&app_first, "s").len()
        );
        assert_eq!(attribute(&ghost_first, "s"), attribute(&ghost_again, "s"));

        // A branch that does not exist: the same exchange and the same failure, with a salt
        // of the same shape that is stable per branch and role.
        let (error, nowhere_first) = wrong_proof(mode, "app.nosuch");
        assert_eq!(
            error.message,
            "password authentication failed for user \"app\""
        );
        let (_, nowhere_again) = wrong_proof(mode, "app.nosuch");
        let (_, elsewhere) = wrong_proof(mode, "app.other");
        assert_router_healthy();
        assert_eq!(attribute(&nowhere_first, "i"), attribute(&app_first, "i"));
        assert_eq!(
            attribute(&nowhere_first, "s").len(),
            attribute(&app_first, "s").len()
        );
        assert_eq!(
            attribute(&nowhere_first, "s"),
            attribute(&nowhere_again, "s")
        );
        for other in [&elsewhere, &ghost_first, &app_first] {
            assert_ne!(attribute(&nowhere_first, "s"), attribute(other, "s"));
        }
    }
}

/// The server-first-message a router at `addr` sends for `user`.
fn server_first_at(addr: SocketAddr, user: &str) -> String {
    let mut tls = raw::connect_tls(addr, fixture().certs.client_config(), Mode::Direct);
    start_sasl(&mut tls, user);
    scram_first(&mut tls, "salt-probe-nonce")
}

/// The fake salts come from a secret kept in a file: a restarted router, or another router
/// given the same file, hands out the same salt for a role that does not exist, so comparing
/// salts over time or across routers tells nothing; a router with another secret differs.
#[test]
fn fake_salts_are_stable_across_restarts_and_routers() {
    let fx = fixture();
    let first = server_first_at(fx.router.direct_addr(), "ghost.b1");
    let secret = fx.router.dir().join("branchgate-mock.secret");
    assert!(secret.exists(), "created on first start beside the catalog");
    let branches = [BranchSpec::new("b1", fx.pg.addr()).role(ROLE, &fx.pg.role_verifier(ROLE))];
    let shared = format!(
        "[auth]\nmock_secret_file = {:?}\n",
        secret.to_str().expect("UTF-8 path")
    );
    let twin = TestRouter::start_with(&fx.certs, &branches, &shared);
    let from_twin = server_first_at(twin.direct_addr(), "ghost.b1");
    assert_eq!(attribute(&from_twin, "s"), attribute(&first, "s"));
    assert_eq!(attribute(&from_twin, "i"), attribute(&first, "i"));
    drop(twin);
    let stranger = TestRouter::start(&fx.certs, &branches);
    let from_stranger = server_first_at(stranger.direct_addr(), "ghost.b1");
    assert_ne!(attribute(&from_stranger, "s"), attribute(&first, "s"));
    assert_router_healthy();
}

#[test]
fn garbage_scram_is_a_protocol_violation() {
    for mode in MODES {
        case_wrong_mechanism(mode);
        assert_router_healthy();

        let mut tls = connect_tls(mode);
        start_sasl(&mut tls, "app.b1");
        tls.write_all(&sasl_initial_response(SCRAM_SHA_256, b"garbage"))
            .expect("send");
        let error = expect_fatal(&mut tls, "08P01", "garbage client-first");
        assert_eq!(error.message, "malformed SCRAM message");
        assert_router_healthy();

        let mut tls = connect_tls(mode);
        start_sasl(&mut tls, "app.b1");
        scram_first(&mut tls, "garbage-final-nonce");
        tls.write_all(&message(b'p', b"garbage")).expect("send");
        let error = expect_fatal(&mut tls, "08P01", "garbage client-final");
        assert_eq!(error.message, "malformed SCRAM message");
        assert_router_healthy();

        let mut tls = connect_tls(mode);
        start_sasl(&mut tls, "app.b1");
        tls.write_all(&query("select 1")).expect("send");
        let error = expect_fatal(&mut tls, "08P01", "Query instead of SASL");
        assert_eq!(error.message, "expected SASL response, got message type 81");
        assert_router_healthy();

        // A Terminate instead of the SASL response: PostgreSQL answers it the same way.
        let mut tls = connect_tls(mode);
        start_sasl(&mut tls, "app.b1");
        tls.write_all(&message(b'X', &[])).expect("send");
        let error = expect_fatal(&mut tls, "08P01", "Terminate instead of SASL");
        assert_eq!(error.message, "expected SASL response, got message type 88");
        assert_router_healthy();

        let mut tls = connect_tls(mode);
        start_sasl(&mut tls, "app.b1");
        let header = [&[b'p'][..], &0x7FFF_FFFFu32.to_be_bytes()].concat();
        tls.write_all(&header).expect("send");
        let error = expect_fatal(&mut tls, "08P01", "2 GiB SASL message");
        assert_eq!(error.message, "invalid message length");
        assert_router_healthy();
    }
}

#[test]
fn silent_clients_are_closed_after_the_startup_timeout() {
    let started = Instant::now();
    let mut plain = tcp();
    let mut mid_handshake = tcp();
    ssl_request_on(&mut mid_handshake);
    let mut after_tls: Vec<Tls> = MODES.iter().map(|&m| connect_tls(m)).collect();
    let mut after_startup: Vec<Tls> = MODES
        .iter()
        .map(|&mode| {
            let mut tls = connect_tls(mode);
            start_sasl(&mut tls, "app.b1");
            tls
        })
        .collect();

    // Other clients are served while those wait.
    assert_router_healthy();
    let mut good = connect_tls(Mode::Direct);
    check_session(&mut good, "app.b1");

    expect_closed(&mut plain, "silent TCP client");
    expect_closed(&mut mid_handshake, "silent after S");
    for tls in after_tls.iter_mut().chain(after_startup.iter_mut()) {
        let error = expect_fatal(tls, "08P01", "silent TLS client");
        assert_eq!(
            error.message,
            "timeout waiting for startup and authentication"
        );
    }
    // The startup timeout is 3 s; the reads above would have failed after IO_TIMEOUT anyway.
    assert!(started.elapsed() < IO_TIMEOUT, "{:?}", started.elapsed());
    assert_router_healthy();
}

#[test]
fn unreachable_backends_give_08006_without_addresses() {
    let fx = fixture();
    for mode in MODES {
        let mut tls = connect_tls(mode);
        start_sasl(&mut tls, "app.down");
        let error = login(&mut tls, PASSWORD).expect_err("primary is down");
        assert_eq!(
            (error.severity.as_str(), error.code.as_str()),
            ("FATAL", "08006")
        );
        assert_eq!(
            error.message,
            "could not connect to the branch's database server"
        );
        expect_closed(&mut tls, "down primary");
        assert_router_healthy();

        let mut tls = connect_tls(mode);
        start_sasl(&mut tls, "app.norep|replica");
        let error = login(&mut tls, PASSWORD).expect_err("no replica listens");
        assert_eq!(
            (error.severity.as_str(), error.code.as_str()),
            ("FATAL", "08006")
        );
        assert_eq!(
            error.message,
            "no healthy replica available for branch \"norep\""
        );
        expect_closed(&mut tls, "no replica");
        assert_router_healthy();

        let mut tls = connect_tls(mode);
        check_session(&mut tls, "app.norep");
        assert_router_healthy();
    }

    let down = fx.conninfo("app.down", PASSWORD, SslNegotiation::Postgres);
    let error: ClientError = psycopg_query(&down, "select 1").expect_err("primary is down");
    assert!(
        error
            .message
            .contains("could not connect to the branch's database server"),
        "{error:?}"
    );
    assert!(
        !error.message.contains(&fx.down_port.to_string()),
        "the backend address leaked: {error:?}"
    );
    let primary = fx.conninfo("app.norep", PASSWORD, SslNegotiation::Direct);
    assert_eq!(
        psycopg_query(&primary, "select current_user").expect("norep primary"),
        "app"
    );
    assert_router_healthy();
}

#[test]
fn gssenc_request_is_refused_then_ssl_request_works() {
    let mut sock = tcp();
    sock.write_all(&request(GSSENC_REQUEST_CODE))
        .expect("send GSSENCRequest");
    assert_eq!(read_byte(&mut sock), b'N');
    ssl_request_on(&mut sock);
    let mut tls = tls_handshake(fixture().certs.client_config(), sock).expect("TLS after N");
    check_session(&mut tls, "app.b1");
    assert_router_healthy();
}

#[test]
fn bytes_pipelined_after_gssenc_request_are_refused_after_n() {
    let mut sock = tcp();
    let bytes = [request(GSSENC_REQUEST_CODE), request(SSL_REQUEST_CODE)].concat();
    sock.write_all(&bytes).expect("send");
    // As PostgreSQL: the answer `N` first, then the refusal, in plaintext.
    assert_eq!(read_byte(&mut sock), b'N');
    let error = expect_fatal(&mut sock, "08P01", "data after GSSENCRequest");
    assert_eq!(
        error.message,
        "received unencrypted data after GSSAPI encryption request"
    );
    assert_router_healthy();
}

#[test]
fn cancel_request_with_an_unknown_key_changes_nothing() {
    let mut session = connect_tls(Mode::SslRequest);
    start_sasl(&mut session, "app.b1");
    login(&mut session, PASSWORD).expect("login");
    session
        .write_all(&query("select 'survived' from pg_sleep(1)"))
        .expect("send Query");
    case_random_cancel();
    let mut rows = Vec::new();
    loop {
        match next_message(&mut session, "pg_sleep query") {
            (b'D', body) => rows.push(body[6..].to_vec()),
            (b'E', body) => panic!("the query was hit: {:?}", parse_error(&body)),
            (b'Z', _) => break,
            _ => {}
        }
    }
    assert_eq!(rows, vec![b"survived".to_vec()]);
    assert_router_healthy();
}

#[test]
fn protocol_3_2_is_negotiated_down_and_4_0_is_refused() {
    for mode in MODES {
        let mut tls = connect_tls(mode);
        let params = [
            ("user", "app.b1"),
            ("database", "postgres"),
            ("_pq_.foo", "bar"),
        ];
        tls.write_all(&startup_message(PROTOCOL_3_2, &params))
            .expect("send");
        let (tag, body) = next_message(&mut tls, "NegotiateProtocolVersion");
        assert_eq!(tag, b'v');
        let expected = [
            &PROTOCOL_3_0.to_be_bytes()[..],
            &1u32.to_be_bytes(),
            b"_pq_.foo\0",
        ]
        .concat();
        assert_eq!(body, expected);
        expect_sasl(&mut tls, "after NegotiateProtocolVersion");
        login(&mut tls, PASSWORD).expect("login at 3.0");
        assert_eq!(query_one(&mut tls, "select 1"), "1");
        assert_router_healthy();

        case_protocol_4(mode);
        assert_router_healthy();
    }
}

#[test]
fn many_bad_clients_then_good_clients() {
    let fx = fixture();
    let cases: [fn(); 14] = [
        case_plaintext_startup,
        case_direct_ssl_wrong_alpn,
        case_direct_ssl_no_alpn,
        case_pipelined_after_ssl_request,
        || case_startup_too_long(Mode::Direct),
        || case_truncated_startup(Mode::SslRequest),
        || case_no_user(Mode::Direct),
        || case_unknown_branch(Mode::SslRequest),
        || case_wrong_mechanism(Mode::Direct),
        || case_wrong_proof(Mode::SslRequest),
        || case_protocol_4(Mode::Direct),
        case_silent_tcp,
        case_random_cancel,
        || case_bad_startup_bytes(Mode::SslRequest, &7u32.to_be_bytes(), "length 7"),
    ];
    let bad: Vec<_> = (0..50)
        .map(|i| thread::spawn(move || cases[i % cases.len()]()))
        .collect();
    for (i, handle) in bad.into_iter().enumerate() {
        if handle.join().is_err() {
            panic!(
                "bad client {i} (case {}) saw the wrong answer",
                i % cases.len()
            );
        }
    }
    let good: Vec<_> = (0..20)
        .map(|i| {
            let negotiation = if i % 2 == 0 {
                SslNegotiation::Postgres
            } else {
                SslNegotiation::Direct
            };
            let info = fx.conninfo("app.b1", PASSWORD, negotiation);
            thread::spawn(move || psycopg_query(&info, "select 1"))
        })
        .collect();
    for (i, handle) in good.into_iter().enumerate() {
        let result = handle.join().expect("good client thread");
        assert_eq!(result, Ok("1".to_owned()), "good client {i}");
    }
}

/// Reads what a non-PostgreSQL peer gets: nothing, or TLS alert records (content type 0x15).
fn expect_alert_or_close(sock: &mut TcpStream, what: &str) {
    let mut buf = Vec::new();
    match sock.read_to_end(&mut buf) {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("{what}: expected a close, got {e} after {buf:?}"),
    }
    assert!(
        buf.is_empty() || buf[0] == 0x15,
        "{what}: expected a TLS alert or nothing, got {buf:?}"
    );
}

#[test]
fn odd_first_bytes() {
    let mut sock = tcp();
    sock.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("send");
    let error = expect_fatal(&mut sock, "08P01", "HTTP request");
    assert!(
        error.message.starts_with("invalid startup packet"),
        "{error:?}"
    );
    assert_router_healthy();

    let mut sock = tcp();
    sock.write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5])
        .expect("send");
    expect_alert_or_close(&mut sock, "garbage ClientHello");
    assert_router_healthy();

    let mut sock = tcp();
    ssl_request_on(&mut sock);
    sock.write_all(&startup_for("app.b1")).expect("send");
    expect_alert_or_close(&mut sock, "plaintext after S");
    assert_router_healthy();

    let mut sock = tcp();
    sock.write_all(&untagged(CANCEL_REQUEST_CODE, &[0; 4]))
        .expect("send");
    expect_fatal(&mut sock, "08P01", "short CancelRequest");
    assert_router_healthy();

    for mode in MODES {
        let mut tls = connect_tls(mode);
        tls.write_all(&request(SSL_REQUEST_CODE)).expect("send");
        let error = expect_fatal(&mut tls, "08P01", "SSLRequest inside TLS");
        assert_eq!(error.message, "encryption request inside TLS");
        assert_router_healthy();

        let mut tls = connect_tls(mode);
        tls.write_all(&cancel_request(unpredictable_u32(), unpredictable_u32()))
            .expect("send");
        expect_closed(&mut tls, "CancelRequest inside TLS");
        assert_router_healthy();

        // The largest startup packet PostgreSQL accepts is 10000 bytes; so does the router.
        let base = startup_for("app.b1").len() + "application_name".len() + 2;
        let filler = "x".repeat(10_000 - base);
        let packet = startup_message(
            PROTOCOL_3_0,
            &[
                ("user", "app.b1"),
                ("database", "postgres"),
                ("application_name", &filler),
            ],
        );
        assert_eq!(packet.len(), 10_000);
        let mut tls = connect_tls(mode);
        tls.write_all(&packet).expect("send");
        expect_sasl(&mut tls, "10000-byte startup");
        login(&mut tls, PASSWORD).expect("login with a 10000-byte startup");
        assert_eq!(query_one(&mut tls, "select 1"), "1");
        assert_router_healthy();

        let mut tls = connect_tls(mode);
        start_sasl(&mut tls, "app.b1");
        tls.write_all(&[b'p', 0, 0, 0, 3]).expect("send");
        let error = expect_fatal(&mut tls, "08P01", "SASL message length 3");
        assert_eq!(error.message, "invalid message length");
        assert_router_healthy();
    }
}

/// TLS 1.3 key updates in the middle of a session, asked for by the client (rustls sends
/// KeyUpdate with update_requested): the router follows the client's new key and answers with
/// its own, and the session goes on, in both TLS modes, several times over.
#[test]
fn key_updates_mid_session_keep_the_session_going() {
    for mode in MODES {
        let mut tls = connect_tls(mode);
        start_sasl(&mut tls, "app.b1");
        login(&mut tls, PASSWORD).expect("login");
        assert_eq!(query_one(&mut tls, "select 1"), "1");
        for round in 0..3 {
            tls.conn.refresh_traffic_keys().expect("client key update");
            let sql = format!("select {round} + 1");
            assert_eq!(
                query_one(&mut tls, &sql),
                (round + 1).to_string(),
                "{mode:?}"
            );
            // A result of several records under the router's new key.
            let big = query_one(&mut tls, "select repeat('k', 40000)");
            assert_eq!(big.len(), 40_000, "{mode:?} round {round}");
        }
        assert_router_healthy();
    }
}

/// Writes `bytes` one TLS record per byte.
fn dribble(tls: &mut Tls, bytes: &[u8]) {
    for byte in bytes {
        tls.write_all(std::slice::from_ref(byte))
            .expect("send one byte");
        tls.flush().expect("flush");
    }
}

#[test]
fn startup_and_scram_split_into_one_byte_records_still_work() {
    for mode in MODES {
        let mut tls = connect_tls(mode);
        dribble(&mut tls, &startup_for("app.b1"));
        expect_sasl(&mut tls, "dribbled startup");
        let (mut scram, first) = ScramClient::new(ClientCredentials::Password(PASSWORD.to_owned()));
        dribble(&mut tls, &sasl_initial_response(SCRAM_SHA_256, &first));
        let server_first = expect_auth(&mut tls, AUTH_SASL_CONTINUE, "server-first-message")
            .expect("server-first-message");
        let client_final = scram
            .handle_server_first(&server_first)
            .expect("valid server-first-message");
        dribble(&mut tls, &message(b'p', &client_final));
        let server_final =
            expect_auth(&mut tls, AUTH_SASL_FINAL, "server-final-message").expect("final");
        scram
            .verify_server_final(&server_final)
            .expect("server signature");
        expect_auth(&mut tls, AUTH_OK, "AuthenticationOk").expect("ok");
        while next_message(&mut tls, "startup replies").0 != b'Z' {}
        assert_eq!(query_one(&mut tls, "select 1"), "1");
        assert_router_healthy();
    }
}
