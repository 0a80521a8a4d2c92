//! Idle mode's `--stage`: what each stage puts on the wire (against an in-process server that
//! records it), every stage against the router and PostgreSQL, PostgreSQL's forked backends
//! through `--process-tree`, and a server that closes held connections being reported.

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Output};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use branchgate::auth::scram::SaltedPasswordCache;
use branchgate_e2e::{Certs, PgServer};
use branchgate_loadgen::client::{open_to, ConnectOptions, Stage};
use branchgate_loadgen::runtime::block_on;
use branchgate_loadgen::target::Target;
use rustls::{ServerConfig, ServerConnection};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;

mod common;

use common::{router_on_primary, ROLE};

const PASSWORD: &str = "pscale_pw_stage_test";
/// SSLRequest: length 8, request code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
/// A TLS handshake record's content type: the first byte of a ClientHello.
const TLS_HANDSHAKE: u8 = 0x16;
/// AuthenticationSASL offering SCRAM-SHA-256: `R`, length, code 10, the mechanism, a final NUL.
const AUTH_SASL: &[u8] = b"R\0\0\0\x17\0\0\0\x0aSCRAM-SHA-256\0\0";
/// How long the recording server waits for a client that says nothing more.
const SERVER_PATIENCE: Duration = Duration::from_secs(10);

/// What the recording server saw of its one connection, in order.
#[derive(Debug, Default)]
struct Seen {
    /// The first 8 bytes were an SSLRequest (answered `S`).
    ssl_request: bool,
    /// A TLS ClientHello arrived.
    client_hello: bool,
    /// The handshake completed.
    handshake_done: bool,
    /// The StartupMessage's body, if one came (answered with AuthenticationSASL).
    startup: Option<Vec<u8>>,
    /// Plaintext after that, until the client closed.
    after: Vec<u8>,
}

/// A server for one connection that answers as far as the client goes (`S`, the TLS handshake
/// with ALPN `postgresql`, AuthenticationSASL) and records what it got until the client closes.
fn recording_server(certs: &Certs) -> (u16, JoinHandle<Seen>) {
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
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    let config = Arc::new(config);
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr: SocketAddr = listener.local_addr().expect("addr");
    let server = thread::spawn(move || {
        let (mut tcp, _) = listener.accept().expect("accept");
        tcp.set_read_timeout(Some(SERVER_PATIENCE))
            .expect("timeout");
        let mut seen = Seen::default();
        let _ = record(&mut tcp, config, &mut seen);
        seen
    });
    (addr.port(), server)
}

/// The server's side, step by step; an error or end of stream ends the recording.
fn record(tcp: &mut TcpStream, config: Arc<ServerConfig>, seen: &mut Seen) -> io::Result<()> {
    let mut first = [0u8; 1];
    if tcp.peek(&mut first)? == 0 {
        return Ok(());
    }
    if first[0] != TLS_HANDSHAKE {
        let mut request = [0u8; 8];
        tcp.read_exact(&mut request)?;
        assert_eq!(request, SSL_REQUEST, "the client's first bytes");
        tcp.write_all(b"S")?;
        seen.ssl_request = true;
        if tcp.peek(&mut first)? == 0 {
            return Ok(());
        }
    }
    assert_eq!(first[0], TLS_HANDSHAKE, "a ClientHello");
    seen.client_hello = true;
    let mut tls = ServerConnection::new(config).map_err(io::Error::other)?;
    while tls.is_handshaking() {
        if tls.read_tls(tcp)? == 0 {
            return Ok(());
        }
        tls.process_new_packets().map_err(io::Error::other)?;
        while tls.wants_write() {
            tls.write_tls(tcp)?;
        }
    }
    seen.handshake_done = true;
    let mut stream = rustls::Stream::new(&mut tls, tcp);
    let mut len = [0u8; 4];
    stream.read_exact(&mut len)?;
    let len = usize::try_from(u32::from_be_bytes(len)).map_err(io::Error::other)?;
    let mut body = vec![0u8; len.saturating_sub(4)];
    stream.read_exact(&mut body)?;
    seen.startup = Some(body);
    stream.write_all(AUTH_SASL)?;
    stream.flush()?;
    // Until close_notify (0) or the socket closes.
    stream.read_to_end(&mut seen.after)?;
    Ok(())
}

/// Opens one connection to `port` as far as `stage`, holds it a moment, closes it, and returns
/// what the server saw.
fn hold_once(certs: &Certs, negotiation: &str, stage: Stage) -> Seen {
    let (port, server) = recording_server(certs);
    let target = Target::parse(&format!(
        "t=postgres://{ROLE}:{PASSWORD}@localhost:{port}/postgres?sslmode=verify-full&sslrootcert={}&sslnegotiation={negotiation}",
        certs.ca_path().display()
    ))
    .unwrap_or_else(|(name, e)| panic!("target {name}: {e}"));
    block_on(async {
        let cache = RefCell::new(SaltedPasswordCache::new());
        let options = ConnectOptions {
            target: &target,
            user: ROLE,
            source: None,
        };
        let (held, _) = open_to(options, &cache, stage)
            .await
            .unwrap_or_else(|e| panic!("{negotiation}, stage {stage}: {e}"));
        monoio::time::sleep(Duration::from_millis(100)).await;
        held.close().await;
    })
    .expect("runtime");
    server.join().expect("server thread")
}

#[test]
fn each_stage_stops_where_it_says() {
    let certs = Certs::generate();
    for negotiation in ["postgres", "direct"] {
        let ssl_request = negotiation == "postgres";
        let seen = hold_once(&certs, negotiation, Stage::Tcp);
        assert!(!seen.ssl_request && !seen.client_hello, "tcp: {seen:?}");

        let seen = hold_once(&certs, negotiation, Stage::Hello);
        assert_eq!(seen.ssl_request, ssl_request, "hello: {seen:?}");
        assert!(seen.client_hello && !seen.handshake_done, "hello: {seen:?}");

        let seen = hold_once(&certs, negotiation, Stage::Tls);
        assert_eq!(seen.ssl_request, ssl_request, "tls: {seen:?}");
        assert!(
            seen.handshake_done && seen.startup.is_none(),
            "tls: {seen:?}"
        );

        let seen = hold_once(&certs, negotiation, Stage::Startup);
        let startup = seen.startup.as_deref().unwrap_or_default();
        let text = String::from_utf8_lossy(startup);
        assert!(text.contains("user\0app\0"), "startup: {seen:?}");
        // Nothing after the StartupMessage: the SASL request stays unanswered.
        assert!(seen.after.is_empty(), "startup: {seen:?}");
    }
}

fn loadgen(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_branchgate-loadgen"))
        .args(args)
        .output()
        .expect("run branchgate-loadgen")
}

fn idle_json(args: &[&str]) -> Value {
    let output = loadgen(args);
    assert!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("stdout is one JSON document")
}

#[test]
fn every_stage_against_the_router_and_postgres() {
    const CONNECTIONS: u64 = 12;
    let setup = router_on_primary(PASSWORD, &["b1"]);
    let port = setup.router.direct_addr().port();
    let ca = setup.certs.ca_path();
    let direct = format!(
        "direct=postgres://app.b1:{PASSWORD}@localhost:{port}/postgres?sslmode=verify-full&sslrootcert={}&sslnegotiation=direct",
        ca.display()
    );
    let sslreq =
        format!("sslreq=postgres://app.b1:{PASSWORD}@127.0.0.1:{port}/postgres?sslmode=require");
    let pg = format!(
        "pg=postgres://app:{PASSWORD}@{}/postgres?sslmode=disable",
        setup.pg.addr()
    );
    let postmaster = format!(
        "pg={}",
        setup.pg.data_dir().join("postmaster.pid").display()
    );
    let me = std::process::id().to_string();
    let connections = CONNECTIONS.to_string();
    for stage in ["tcp", "hello", "tls", "startup", "ready"] {
        let tls_only = matches!(stage, "hello" | "tls");
        let mut args = vec![
            "idle",
            "--stage",
            stage,
            "--connections",
            &connections,
            "--concurrency",
            "4",
            "--hold",
            "100ms",
            "--settle",
            "100ms",
            "--target",
            &direct,
            "--target",
            &sslreq,
            "--pid",
            &me,
            "--process-tree",
            "--json",
            "--quiet",
            "--strict",
        ];
        if !tls_only {
            args.extend(["--target", &pg, "--pid-file", &postmaster]);
        }
        let report = idle_json(&args);
        assert_eq!(report["settings"]["stage"], stage, "{report}");
        for result in report["results"].as_array().expect("results") {
            assert_eq!(result["stage"], stage, "{result}");
            assert_eq!(result["count"].as_u64(), Some(CONNECTIONS), "{result}");
            assert_eq!(result["errors"], 0, "{result}");
            assert_eq!(result["closed_by_server"], 0, "{result}");
            assert!(result["bytes_per_connection"].is_number(), "{result}");
            assert!(
                result["process_tree"]["pss_bytes_after"].as_u64() > Some(0),
                "{result}"
            );
        }
        if !tls_only {
            // PostgreSQL forks a backend per connection at accept: every one is in the tree
            // (beside the postmaster and its helpers, some of which come and go).
            let tree = &report["results"][2]["process_tree"];
            let after = tree["processes_after"].as_u64().unwrap_or(0);
            assert!(after > CONNECTIONS, "{stage}: {tree}");
            let pss = tree["pss_bytes_per_connection"].as_f64().unwrap_or(0.0);
            assert!(
                pss > 10_000.0,
                "a backend costs more than a few pages: {tree}"
            );
        }
    }
    // A plaintext target has no TLS stage to stop at.
    let output = loadgen(&[
        "idle",
        "--stage",
        "tls",
        "--connections",
        "1",
        "--target",
        &pg,
        "--quiet",
    ]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("target 'pg': --stage tls needs TLS"),
        "{stderr}"
    );
}

#[test]
fn connections_the_server_closes_while_held_are_reported() {
    const CONNECTIONS: u64 = 6;
    let pg = PgServer::start_primary();
    pg.create_role(ROLE, PASSWORD);
    // PostgreSQL gives a client this long from accept to authenticate, then closes.
    pg.psql_admin("ALTER SYSTEM SET authentication_timeout = '1s'");
    pg.psql_admin("SELECT pg_reload_conf()");
    pg.wait_for_value("SHOW authentication_timeout", "1s");
    let target = format!(
        "pg=postgres://{ROLE}:{PASSWORD}@{}/postgres?sslmode=disable",
        pg.addr()
    );
    let connections = CONNECTIONS.to_string();
    let args = [
        "idle",
        "--stage",
        "startup",
        "--connections",
        &connections,
        "--settle",
        "100ms",
        "--hold",
        "3s",
        "--target",
        &target,
        "--json",
        "--quiet",
    ];
    let report = idle_json(&args);
    let result = &report["results"][0];
    assert_eq!(result["count"].as_u64(), Some(CONNECTIONS), "{result}");
    assert_eq!(
        result["closed_by_server"].as_u64(),
        Some(CONNECTIONS),
        "{result}"
    );
    assert_eq!(result["closed_before_reading"], 0, "{result}");
    let held_us = result["closed_after_us"]["p50"].as_f64().unwrap_or(0.0);
    assert!(
        (500_000.0..2_900_000.0).contains(&held_us),
        "closed about 1 s after accept: {result}"
    );

    let mut strict = args.to_vec();
    strict.retain(|a| *a != "--json");
    strict.push("--strict");
    let output = loadgen(&strict);
    assert_eq!(output.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let held = format!("{CONNECTIONS} of the {CONNECTIONS} held connections");
    assert!(
        stdout.contains(&format!("pg: the server closed {held}")),
        "{stdout}"
    );
    let held = format!("{CONNECTIONS} of {CONNECTIONS} held connections");
    assert!(
        stderr.contains(&format!("target 'pg': the server closed {held}")),
        "{stderr}"
    );
}
