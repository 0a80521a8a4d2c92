//! TLS 1.3 key updates through a real router in front of a real PostgreSQL, from rustls
//! clients over raw sockets, in both TLS modes (direct SSL with ALPN `postgresql`, SSLRequest):
//!
//! - a KeyUpdate(update_requested) in the same write as the client's Finished (with the
//!   StartupMessage behind it, or alone), then a SCRAM login and queries, for every TLS 1.3
//!   suite. The router used to let rustls process that KeyUpdate during the handshake, which
//!   rotated rustls's keys and dropped the KeyUpdate it owed the client: the client could not
//!   read a single record after that.
//! - KeyUpdates in the middle of a session from the client (each asking for the router's),
//!   many in a row, with queries between, up to rustls's limit of 32 without data between
//!   them, and one past it (the connection ends, as rustls ends it).

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use branchgate_e2e::raw::{
    self, expect_sasl, login, query_one, startup_for, Mode, Tls, IO_TIMEOUT, MODES,
};
use branchgate_e2e::{BranchSpec, Certs, PgServer, TestRouter};
use rustls::crypto::aws_lc_rs::{cipher_suite, default_provider};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned, SupportedCipherSuite};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

const ROLE: &str = "app";
const USER: &str = "app.keys";
const PASSWORD: &str = "pscale_pw_tls_keys_0123456789";

const TLS13_SUITES: [SupportedCipherSuite; 3] = [
    cipher_suite::TLS13_AES_128_GCM_SHA256,
    cipher_suite::TLS13_AES_256_GCM_SHA384,
    cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
];

struct Fixture {
    certs: Certs,
    router: TestRouter,
    _pg: PgServer,
}

static FIXTURE: OnceLock<Fixture> = OnceLock::new();

fn fixture() -> &'static Fixture {
    FIXTURE.get_or_init(|| {
        let pg = PgServer::start_primary();
        pg.create_role(ROLE, PASSWORD);
        let verifier = pg.role_verifier(ROLE);
        let certs = Certs::generate();
        let router = TestRouter::start(
            &certs,
            &[BranchSpec::new("keys", pg.addr()).role(ROLE, &verifier)],
        );
        Fixture {
            certs,
            router,
            _pg: pg,
        }
    })
}

fn addr() -> SocketAddr {
    fixture().router.direct_addr()
}

/// The fixture's client configuration offering one TLS 1.3 suite.
fn client_config(suite: SupportedCipherSuite) -> Arc<ClientConfig> {
    let base = fixture().certs.client_config();
    let provider = rustls::crypto::CryptoProvider {
        cipher_suites: vec![suite],
        ..default_provider()
    };
    let mut config = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots())
        .with_no_client_auth();
    config.alpn_protocols = base.alpn_protocols.clone();
    Arc::new(config)
}

/// The fixture's CA as a root store (its client configuration keeps it inside a verifier).
fn roots() -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    let pem = fixture().certs.ca_pem().as_bytes();
    for cert in CertificateDer::pem_slice_iter(pem) {
        roots.add(cert.expect("CA PEM")).expect("CA");
    }
    roots
}

/// A TLS connection whose handshake ends with one write holding the client's Finished, a
/// KeyUpdate(update_requested) and whatever `first_data` is (a StartupMessage, or nothing).
fn connect_with_key_update(suite: SupportedCipherSuite, mode: Mode, first_data: &[u8]) -> Tls {
    let mut sock = raw::tcp(addr());
    if let Mode::SslRequest = mode {
        raw::ssl_request_on(&mut sock);
    }
    let name = ServerName::try_from("localhost").expect("server name");
    let mut conn = ClientConnection::new(client_config(suite), name).expect("client");
    // Until the client is in traffic state with its Finished not yet written.
    while conn.is_handshaking() {
        if conn.wants_write() {
            conn.write_tls(&mut sock).expect("client flight");
            continue;
        }
        if conn.read_tls(&mut sock).expect("server flight") == 0 {
            panic!("{mode:?}: router closed during the handshake");
        }
        conn.process_new_packets()
            .unwrap_or_else(|e| panic!("{mode:?}: handshake: {e}"));
    }
    conn.refresh_traffic_keys().expect("KeyUpdate queued");
    conn.writer().write_all(first_data).expect("first data");
    let mut write = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut write).expect("encode");
    }
    sock.write_all(&write)
        .expect("Finished, KeyUpdate and data in one write");
    sock.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    StreamOwned::new(conn, sock)
}

/// A few queries, small and over several records, through the session.
fn queries(tls: &mut Tls, what: &str) {
    assert_eq!(query_one(tls, "select 1"), "1", "{what}");
    let big = query_one(tls, "select repeat('k', 40000)");
    assert_eq!(big.len(), 40_000, "{what}");
    assert_eq!(query_one(tls, "select current_user"), ROLE, "{what}");
}

fn terminate(mut tls: Tls) {
    tls.write_all(&raw::message(b'X', &[])).expect("Terminate");
    tls.conn.send_close_notify();
    tls.flush().expect("close_notify");
}

#[test]
fn key_update_requested_with_the_finished_then_login_and_queries() {
    for mode in MODES {
        for suite in TLS13_SUITES {
            let what = format!("{mode:?} {:?}", suite.suite());
            // The StartupMessage in the same write as the Finished and the KeyUpdate.
            let mut tls = connect_with_key_update(suite, mode, &startup_for(USER));
            expect_sasl(&mut tls, &what);
            login(&mut tls, PASSWORD).unwrap_or_else(|e| panic!("{what}: {e:?}"));
            queries(&mut tls, &what);
            // And more key updates afterwards, each derived from the right generation.
            for round in 0..3 {
                tls.conn.refresh_traffic_keys().expect("key update");
                queries(&mut tls, &format!("{what} round {round}"));
            }
            terminate(tls);

            // The KeyUpdate alone with the Finished; the StartupMessage in a later write.
            let mut tls = connect_with_key_update(suite, mode, &[]);
            tls.write_all(&startup_for(USER)).expect("StartupMessage");
            expect_sasl(&mut tls, &what);
            login(&mut tls, PASSWORD).unwrap_or_else(|e| panic!("{what}: {e:?}"));
            queries(&mut tls, &what);
            terminate(tls);
        }
    }
}

#[test]
fn key_updates_mid_session_many_in_a_row_with_queries_between() {
    for mode in MODES {
        let mut tls = raw::connect_tls(addr(), fixture().certs.client_config(), mode);
        tls.write_all(&startup_for(USER)).expect("StartupMessage");
        expect_sasl(&mut tls, USER);
        login(&mut tls, PASSWORD).expect("login");
        // 32 in a row (rustls's limit without data between) before each query.
        for round in 0..4 {
            for _ in 0..32 {
                tls.conn.refresh_traffic_keys().expect("key update");
            }
            assert_eq!(
                query_one(&mut tls, &format!("select {round}")),
                round.to_string(),
                "{mode:?}"
            );
        }
        // One before every query, many times.
        for round in 0..100 {
            tls.conn.refresh_traffic_keys().expect("key update");
            assert_eq!(
                query_one(&mut tls, &format!("select {round} * 2")),
                (round * 2).to_string(),
                "{mode:?} round {round}"
            );
        }
        queries(&mut tls, &format!("{mode:?} at the end"));
        // A 33rd KeyUpdate without data between is one too many for rustls, which ends the
        // connection without an alert: so does the router.
        for _ in 0..33 {
            tls.conn.refresh_traffic_keys().expect("key update");
        }
        tls.write_all(&raw::query("select 'never answered'"))
            .expect("KeyUpdates and a query");
        // No alert and no close_notify: the connection just ends.
        let mut byte = [0u8; 1];
        let error = tls
            .read(&mut byte)
            .expect_err("the 33rd KeyUpdate ends the connection");
        assert_eq!(
            error.kind(),
            std::io::ErrorKind::UnexpectedEof,
            "{mode:?}: {error}"
        );
    }
}

/// The router answers a KeyUpdate(update_requested) at once, as rustls would, not only ahead of
/// the backend's next data: an idle session's client gets the KeyUpdate it asked for.
#[test]
fn the_key_update_owed_goes_out_without_backend_data() {
    for mode in MODES {
        let mut tls = raw::connect_tls(addr(), fixture().certs.client_config(), mode);
        tls.write_all(&startup_for(USER)).expect("StartupMessage");
        expect_sasl(&mut tls, USER);
        login(&mut tls, PASSWORD).expect("login");
        tls.conn.refresh_traffic_keys().expect("key update");
        tls.flush().expect("KeyUpdate sent");
        // Only the router's KeyUpdate can arrive now: the backend has nothing to say.
        let read = tls
            .conn
            .read_tls(&mut tls.sock)
            .expect("the router's KeyUpdate");
        assert!(read > 0, "{mode:?}: closed instead");
        let state = tls
            .conn
            .process_new_packets()
            .expect("a record the client opens");
        assert_eq!(
            state.plaintext_bytes_to_read(),
            0,
            "{mode:?}: no data, a KeyUpdate"
        );
        queries(&mut tls, &format!("{mode:?} after the KeyUpdate"));
        terminate(tls);
    }
}
