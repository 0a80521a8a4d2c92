//! Which bytes each TLS mode puts on the wire first, proven against servers that tell them
//! apart: PostgreSQL 15 with ssl=on (SSLRequest only; it predates direct SSL) and an in-process
//! rustls server that does or does not choose ALPN `postgresql`.

use std::cell::RefCell;
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use branchgate::auth::scram::SaltedPasswordCache;
use branchgate_e2e::spawn::give_to_server_user;
use branchgate_e2e::{Certs, PgServer};
use branchgate_loadgen::client::query::{Outcome, Request};
use branchgate_loadgen::client::{connect, ClientError, Conn, ConnectOptions, Timings};
use branchgate_loadgen::runtime::block_on;
use branchgate_loadgen::target::Target;
use rustls::{ServerConfig, ServerConnection, StreamOwned};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

const PASSWORD: &str = "pscale_pw_tls_test";
/// SSLRequest: length 8, request code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
/// Protocol 3.0, the StartupMessage's first field.
const PROTOCOL_3_0: [u8; 4] = [0, 3, 0, 0];

fn target(spec: &str) -> Target {
    Target::parse(spec).unwrap_or_else(|(name, e)| panic!("target {name}: {e}"))
}

/// `NAME=URL` for user `app` on `localhost:port`, verify-full against `certs`' CA.
fn tls_target(port: u16, certs: &Certs, negotiation: &str) -> Target {
    target(&format!(
        "t=postgres://app:{PASSWORD}@localhost:{port}/postgres?sslmode=verify-full&sslrootcert={}&sslnegotiation={negotiation}",
        certs.ca_path().display()
    ))
}

fn open(target: &Target) -> Result<(Conn, Timings), ClientError> {
    block_on(async {
        let cache = RefCell::new(SaltedPasswordCache::new());
        let options = ConnectOptions {
            target,
            user: "app",
            source: None,
        };
        connect(options, &cache).await
    })
    .expect("runtime")
}

/// A PostgreSQL 15 primary with role `app`, restarted with ssl=on and `certs`' server
/// certificate.
fn postgres_with_tls(certs: &Certs) -> PgServer {
    let mut pg = PgServer::start_primary();
    pg.create_role("app", PASSWORD);
    let data = pg.data_dir();
    for (from, to) in [
        (certs.cert_path(), "server.crt"),
        (certs.key_path(), "server.key"),
    ] {
        let to = data.join(to);
        fs::copy(&from, &to).expect("copy certificate into the data directory");
        // PostgreSQL refuses a key that others can read.
        fs::set_permissions(&to, fs::Permissions::from_mode(0o600)).expect("chmod");
        give_to_server_user(&to);
    }
    OpenOptions::new()
        .append(true)
        .open(data.join("postgresql.conf"))
        .and_then(|mut conf| conf.write_all(b"ssl = on\n"))
        .expect("turn ssl on");
    pg.stop();
    pg.start_again();
    pg
}

#[test]
fn postgres_15_takes_sslrequest_and_refuses_direct_ssl() {
    let certs = Certs::generate();
    let pg = postgres_with_tls(&certs);

    let (mut conn, timings) = open(&tls_target(pg.port(), &certs, "postgres"))
        .unwrap_or_else(|e| panic!("SSLRequest login: {e}"));
    assert!(
        timings.ssl_request.is_some() && timings.tls.is_some(),
        "{timings:?}"
    );
    // The server itself says the session is TLS.
    let mut ssl = Request::simple("SELECT 1 FROM pg_stat_ssl WHERE pid = pg_backend_pid() AND ssl");
    let outcome = block_on(async {
        let outcome = conn.run(&mut ssl).await;
        conn.terminate().await;
        outcome
    })
    .expect("runtime");
    assert_eq!(outcome.expect("query"), Outcome::Done { rows: 1 });

    // PostgreSQL 15 reads a ClientHello as a startup packet of absurd length and hangs up.
    let error =
        open(&tls_target(pg.port(), &certs, "direct")).expect_err("PG 15 has no direct SSL");
    assert!(matches!(error, ClientError::DirectSslRefused), "{error}");
    assert!(
        error.to_string().contains("does not accept direct SSL")
            && error.to_string().contains("sslnegotiation=postgres"),
        "{error}"
    );
    let log = pg.log_tail(20);
    assert!(log.contains("invalid length of startup packet"), "{log}");
}

/// What the in-process server saw of its one connection.
#[derive(Debug, Default)]
struct Seen {
    /// The first 8 bytes were an SSLRequest (answered `S`).
    ssl_request: bool,
    /// The ALPN protocol the handshake settled on.
    alpn: Option<Vec<u8>>,
    /// The StartupMessage received over TLS; empty if the client hung up first.
    startup: Vec<u8>,
}

/// A TLS server for one connection on 127.0.0.1: with `ssl_request` it expects an SSLRequest
/// and answers `S` first; it chooses ALPN `postgresql` only if `alpn`. After the
/// StartupMessage it hangs up.
fn tls_server(certs: &Certs, alpn: bool, ssl_request: bool) -> (u16, JoinHandle<Seen>) {
    let chain = CertificateDer::pem_file_iter(certs.cert_path())
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .expect("server certificate");
    let key = PrivateKeyDer::from_pem_file(certs.key_path()).expect("server key");
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server config");
    if alpn {
        config.alpn_protocols = vec![b"postgresql".to_vec()];
    }
    let config = Arc::new(config);
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr: SocketAddr = listener.local_addr().expect("addr");
    let server = thread::spawn(move || {
        let (mut tcp, _) = listener.accept().expect("accept");
        let mut seen = Seen::default();
        if ssl_request {
            let mut first = [0u8; 8];
            tcp.read_exact(&mut first).expect("SSLRequest");
            assert_eq!(first, SSL_REQUEST, "the client's first bytes");
            tcp.write_all(b"S").expect("answer S");
            seen.ssl_request = true;
        }
        let conn = ServerConnection::new(config).expect("server connection");
        let mut tls = StreamOwned::new(conn, tcp);
        // The handshake runs inside the first read; a client that refuses the session hangs up.
        seen.startup = read_startup(&mut tls).unwrap_or_default();
        seen.alpn = tls.conn.alpn_protocol().map(<[u8]>::to_vec);
        seen
    });
    (addr.port(), server)
}

fn read_startup(tls: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    tls.read_exact(&mut len)?;
    let len = usize::try_from(u32::from_be_bytes(len)).map_err(io::Error::other)?;
    let mut message = vec![0u8; len.saturating_sub(4)];
    tls.read_exact(&mut message)?;
    Ok(message)
}

#[test]
fn direct_ssl_refuses_a_server_without_alpn() {
    let certs = Certs::generate();
    let (port, server) = tls_server(&certs, false, false);
    let error = open(&tls_target(port, &certs, "direct")).expect_err("no ALPN");
    assert!(matches!(error, ClientError::NoAlpn), "{error}");
    assert!(error.to_string().contains("ALPN 'postgresql'"), "{error}");
    let seen = server.join().expect("server thread");
    // The handshake itself went through (the server took the ClientHello as the first bytes);
    // the client then hung up without sending its StartupMessage.
    assert!(!seen.ssl_request && seen.alpn.is_none(), "{seen:?}");
    assert!(seen.startup.is_empty(), "{seen:?}");
}

#[test]
fn direct_ssl_sends_the_client_hello_first_and_the_startup_over_tls() {
    let certs = Certs::generate();
    let (port, server) = tls_server(&certs, true, false);
    let error = open(&tls_target(port, &certs, "direct")).expect_err("server hangs up");
    assert!(matches!(error, ClientError::Closed), "{error}");
    let seen = server.join().expect("server thread");
    assert_eq!(seen.alpn.as_deref(), Some(&b"postgresql"[..]), "{seen:?}");
    assert!(!seen.ssl_request);
    assert_startup(&seen.startup);
}

#[test]
fn sslrequest_needs_no_alpn() {
    let certs = Certs::generate();
    let (port, server) = tls_server(&certs, false, true);
    let error = open(&tls_target(port, &certs, "postgres")).expect_err("server hangs up");
    assert!(matches!(error, ClientError::Closed), "{error}");
    let seen = server.join().expect("server thread");
    assert!(seen.ssl_request && seen.alpn.is_none(), "{seen:?}");
    assert_startup(&seen.startup);
}

/// A StartupMessage body for protocol 3.0 with `user=app` and `database=postgres`.
fn assert_startup(body: &[u8]) {
    assert!(body.starts_with(&PROTOCOL_3_0), "{body:?}");
    let text = String::from_utf8_lossy(&body[4..]);
    assert!(
        text.contains("user\0app\0") && text.contains("database\0postgres\0"),
        "{text:?}"
    );
}
