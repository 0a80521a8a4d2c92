//! The PROXY protocol v2 header from load balancers listed in `[listen] proxy_from`: every
//! router here lists 127.0.0.1, so a connection from 127.0.0.1 is a balancer's and must begin
//! with a header, and one from 127.0.0.2 is a client's own, as without the setting.
//!
//! Headers are built byte by byte here, from the specification, not with the router's code.
//! What shows the router took the header's address: the per-source cancel limit counts a
//! guesser's misses against the address its header names, not against the balancer's; and the
//! steering map files a client under its own address, not the balancer's.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use branchgate::steering::ebpf::{pin_name, PIN_ROOT};
use branchgate::steering::SteeringMode;
use branchgate_e2e::raw::{
    self, cancel_request, expect_closed, expect_fatal, login, login_keyed, next_message,
    parse_error, query, query_one, request, start_sasl, Mode, Tls, MODES, SSL_REQUEST_CODE,
};
use branchgate_e2e::{
    psycopg_query, BranchSpec, Certs, Conninfo, PgServer, SslNegotiation, TestRouter,
};
use rustls::{ClientConnection, StreamOwned};
use rustls_pki_types::ServerName;
use socket2::{Domain, Socket, Type};

const ROLE: &str = "app";
const PASSWORD: &str = "pscale_pw_proxy_protocol_0123";

/// The balancer: the one address `proxy_from` lists.
const BALANCER: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// A client connecting straight to the router, from an address `proxy_from` does not list.
const UNLISTED: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

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

fn b1() -> BranchSpec {
    let f = fixture();
    BranchSpec::new("b1", f.pg.addr()).role(ROLE, &f.verifier)
}

/// A router that takes PROXY headers from 127.0.0.1, with `top` before router.toml's text
/// (top-level keys) and `timeouts` added to its `[timeouts]` table (which ends it), and an
/// admin endpoint for /metrics.
fn router(top: &str, timeouts: &str) -> TestRouter {
    let (top, timeouts) = (top.to_owned(), timeouts.to_owned());
    TestRouter::start_with_config(&fixture().certs, &[b1()], move |text| {
        let text = text.replace(
            "[listen]\n",
            "[listen]\nproxy_from = [\"127.0.0.1\"]\nadmin = \"127.0.0.1:0\"\n",
        );
        format!("{top}{text}{timeouts}")
    })
}

// ---------------------------------------------------------------------------------------------
// Headers, as HAProxy's send-proxy-v2 writes them

/// The version 2 signature.
const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// A header with `version_command`, `family` and `body` (its length prepended).
fn header(version_command: u8, family: u8, body: &[u8]) -> Vec<u8> {
    let len = u16::try_from(body.len()).expect("short body");
    [
        &SIGNATURE[..],
        &[version_command, family],
        &len.to_be_bytes(),
        body,
    ]
    .concat()
}

/// PROXY, TCP over IPv4 or IPv6 (the client's family; an IPv4 `to` is then written as the
/// IPv4-mapped address a dual-stack balancer would give): the connection is relayed for
/// `client`.
fn proxy(client: SocketAddr, to: SocketAddr) -> Vec<u8> {
    let (family, source, destination) = match (client.ip(), to.ip()) {
        (IpAddr::V4(c), IpAddr::V4(t)) => (0x11, c.octets().to_vec(), t.octets().to_vec()),
        (IpAddr::V6(c), t) => {
            let t = match t {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            (0x21, c.octets().to_vec(), t.octets().to_vec())
        }
        (IpAddr::V4(_), IpAddr::V6(_)) => panic!("an IPv4 client of an IPv6 address"),
    };
    let body = [
        source,
        destination,
        client.port().to_be_bytes().to_vec(),
        to.port().to_be_bytes().to_vec(),
    ]
    .concat();
    header(0x21, family, &body)
}

/// LOCAL: the balancer's own connection (what HAProxy's health checks send).
fn local() -> Vec<u8> {
    header(0x20, 0x00, &[])
}

/// A TCP connection to `to` from `from` (any port), with the raw helpers' timeouts.
fn connect_from(from: IpAddr, to: SocketAddr) -> TcpStream {
    let socket = Socket::new(Domain::for_address(to), Type::STREAM, None).expect("socket");
    socket
        .bind(&SocketAddr::new(from, 0).into())
        .unwrap_or_else(|e| panic!("bind {from}: {e}"));
    socket
        .connect(&to.into())
        .unwrap_or_else(|e| panic!("connect {from} -> {to}: {e}"));
    let sock: TcpStream = socket.into();
    sock.set_read_timeout(Some(raw::IO_TIMEOUT))
        .expect("read timeout");
    sock.set_write_timeout(Some(raw::IO_TIMEOUT))
        .expect("write timeout");
    sock.set_nodelay(true).expect("nodelay");
    sock
}

/// TLS on `sock`, started the `mode` way, with `prefix` (a header) in the same write as the
/// SSLRequest or the ClientHello: the bytes after the header arrive with it, as when a
/// balancer's header and the client's first segment are coalesced.
fn tls_after(mut sock: TcpStream, prefix: &[u8], mode: Mode) -> Tls {
    let name = ServerName::try_from("localhost").expect("server name");
    let mut conn =
        ClientConnection::new(fixture().certs.client_config(), name).expect("client connection");
    let mut first = prefix.to_vec();
    match mode {
        Mode::SslRequest => {
            first.extend_from_slice(&request(SSL_REQUEST_CODE));
            sock.write_all(&first).expect("send header and SSLRequest");
            assert_eq!(raw::read_byte(&mut sock), b'S', "SSLRequest answer");
        }
        Mode::Direct => {
            conn.write_tls(&mut first).expect("ClientHello");
            sock.write_all(&first).expect("send header and ClientHello");
        }
    }
    let mut tls = StreamOwned::new(conn, sock);
    while tls.conn.is_handshaking() {
        tls.conn
            .complete_io(&mut tls.sock)
            .unwrap_or_else(|e| panic!("TLS handshake after a header ({mode:?}): {e}"));
    }
    tls
}

/// Logged in as `app.b1` through the balancer with `prefix` sent first.
fn session_after(to: SocketAddr, prefix: &[u8], mode: Mode) -> Tls {
    let mut tls = tls_after(connect_from(BALANCER, to), prefix, mode);
    start_sasl(&mut tls, "app.b1");
    login(&mut tls, PASSWORD).unwrap_or_else(|e| panic!("login ({mode:?}): {e:?}"));
    tls
}

/// True if the router closes `sock` without sending a byte (a FIN or a reset).
fn closed_silently(sock: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    match sock.read(&mut buf) {
        Ok(0) => true,
        Ok(n) => panic!("expected a silent close, got {:?}", &buf[..n]),
        Err(e) if e.kind() == ErrorKind::ConnectionReset => true,
        Err(e) => panic!("expected a silent close, got {e}"),
    }
}

/// `branchgate_proxy_headers_refused_total` over workers, for `port` ("direct" or "pooled").
fn refused_headers(router: &TestRouter, port: &str) -> u64 {
    let admin = router.router().admin_addr().expect("admin endpoint");
    let mut stream = TcpStream::connect(admin).expect("connect to /metrics");
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("response");
    let label = format!("port=\"{port}\"");
    text.lines()
        .filter(|l| l.starts_with("branchgate_proxy_headers_refused_total{") && l.contains(&label))
        .map(|l| {
            l.rsplit(' ')
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("bad sample {l:?}"))
        })
        .sum()
}

// ---------------------------------------------------------------------------------------------
// Clients behind the balancer

/// A client the balancer speaks for logs in on both ports in both TLS modes and runs a query,
/// with the header and its first bytes in one segment (a header that kept what followed it
/// would break the SSLRequest or the ClientHello); a LOCAL header leaves the connection as it
/// is, and the balancer's health check (LOCAL, then close) is not a refusal.
#[test]
fn clients_behind_the_balancer_log_in_on_both_ports_in_both_modes() {
    let router = router("", "");
    let client: SocketAddr = "203.0.113.7:5555".parse().expect("addr");
    for to in [router.direct_addr(), router.pooled_addr()] {
        for mode in MODES {
            let mut tls = session_after(to, &proxy(client, to), mode);
            assert_eq!(query_one(&mut tls, "select 40 + 2"), "42", "{to} {mode:?}");
            let mut tls = session_after(to, &local(), mode);
            assert_eq!(
                query_one(&mut tls, "select 'local'"),
                "local",
                "{to} {mode:?}"
            );
        }
        // IPv6 clients behind an IPv4 balancer.
        let v6: SocketAddr = "[2001:db8::7]:40000".parse().expect("addr");
        let mut tls = session_after(to, &proxy(v6, to), Mode::Direct);
        assert_eq!(query_one(&mut tls, "select 6"), "6");
        // HAProxy's health check.
        let mut check = connect_from(BALANCER, to);
        check.write_all(&local()).expect("send LOCAL");
        check.shutdown(Shutdown::Write).expect("close");
        assert!(closed_silently(&mut check));
    }
    assert_eq!(refused_headers(&router, "direct"), 0);
    assert_eq!(refused_headers(&router, "pooled"), 0);
}

/// A listed balancer must send the header: without one (a client that reached the router
/// from the balancer's host straight away), with a malformed one, or with one cut short by a
/// close, the connection is closed without a PostgreSQL answer (the balancer would carry it to
/// a client that never spoke to the router), and counted.
#[test]
fn a_listed_address_without_a_valid_header_is_closed_and_counted() {
    let router = router("", "");
    let to = router.direct_addr();
    let client: SocketAddr = "203.0.113.7:5555".parse().expect("addr");
    let whole = proxy(client, to);
    let mut wrong_family = whole.clone();
    wrong_family[13] = 0x12; // UDP over IPv4
    let mut version_1 = b"PROXY TCP4 203.0.113.7 10.0.0.1 5555 5432\r\n".to_vec();
    version_1.extend_from_slice(&request(SSL_REQUEST_CODE));
    let mut too_long = header(0x21, 0x11, &[0; 600]);
    too_long.truncate(16);
    let cases: [(&str, Vec<u8>); 5] = [
        ("an SSLRequest, no header", request(SSL_REQUEST_CODE)),
        ("a version 1 header", version_1),
        ("PROXY for UDP", wrong_family),
        ("a header longer than the bound", too_long),
        ("a header cut short by a close", whole[..20].to_vec()),
    ];
    for (what, bytes) in &cases {
        let mut sock = connect_from(BALANCER, to);
        sock.write_all(bytes).expect("send");
        if what.contains("close") {
            sock.shutdown(Shutdown::Write).expect("close");
        }
        assert!(closed_silently(&mut sock), "{what}");
    }
    // Direct SSL without a header: the ClientHello is no header either.
    let mut sock = connect_from(BALANCER, to);
    sock.write_all(&raw::client_hello(fixture().certs.client_config()))
        .expect("send ClientHello");
    assert!(closed_silently(&mut sock), "a ClientHello, no header");
    assert_eq!(refused_headers(&router, "direct"), cases.len() as u64 + 1);
    // The router goes on serving.
    let mut tls = session_after(to, &whole, Mode::SslRequest);
    assert_eq!(query_one(&mut tls, "select 1"), "1");
}

/// A header cut short and then silence: the connection is closed when the handshake timeout
/// (counted from the accept, as for every connection) runs out, not before.
#[test]
fn a_truncated_header_is_closed_at_the_handshake_timeout() {
    let router = router("", "handshake = \"1s\"\n");
    let to = router.pooled_addr();
    let whole = proxy("203.0.113.7:5555".parse().expect("addr"), to);
    for cut in [5, 16, whole.len() - 1] {
        let mut sock = connect_from(BALANCER, to);
        let started = Instant::now();
        sock.write_all(&whole[..cut])
            .expect("send part of a header");
        assert!(closed_silently(&mut sock), "{cut} bytes");
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(800) && waited < raw::IO_TIMEOUT,
            "{cut} bytes: closed after {waited:?}, the handshake timeout is 1 s"
        );
    }
    assert_eq!(refused_headers(&router, "pooled"), 3);
}

/// From an address `proxy_from` does not list nothing changes: a header is bad input, answered
/// as any other bad first bytes (FATAL 08P01), and a client without one logs in.
#[test]
fn an_unlisted_address_is_served_as_without_the_setting() {
    let router = router("", "");
    let to = router.direct_addr();
    let mut sock = connect_from(UNLISTED, to);
    sock.write_all(&proxy("203.0.113.7:5555".parse().expect("addr"), to))
        .expect("send header");
    let error = expect_fatal(
        &mut sock,
        "08P01",
        "a PROXY header from an unlisted address",
    );
    assert!(
        error.message.starts_with("invalid startup packet"),
        "{error:?}"
    );
    let mut sock = connect_from(UNLISTED, to);
    raw::ssl_request_on(&mut sock);
    let mut tls = raw::tls_handshake(fixture().certs.client_config(), sock).expect("TLS");
    start_sasl(&mut tls, "app.b1");
    login(&mut tls, PASSWORD).expect("login without a header");
    assert_eq!(query_one(&mut tls, "select 2"), "2");
    assert_eq!(refused_headers(&router, "direct"), 0);
}

// ---------------------------------------------------------------------------------------------
// The router uses the header's address

/// A plaintext CancelRequest through the balancer for `source`; waits for the router to close.
fn cancel_via_balancer(to: SocketAddr, source: SocketAddr, (pid, secret): (u32, u32)) {
    let mut sock = connect_from(BALANCER, to);
    let bytes = [proxy(source, to), cancel_request(pid, secret)].concat();
    sock.write_all(&bytes)
        .expect("send header and CancelRequest");
    let mut rest = Vec::new();
    let _ = sock.read_to_end(&mut rest);
}

/// The cancel limit keys on the header's address: after a guesser behind the balancer has sent
/// enough unknown keys for every worker to stop hearing it, another client behind the same
/// balancer (the same TCP peer) still cancels its query. Were the balancer's address the key,
/// both would be one source and the real cancel would be ignored.
#[test]
fn the_cancel_limit_counts_each_client_behind_the_balancer_on_its_own() {
    let router = router("", "");
    let to = router.direct_addr();
    let honest: SocketAddr = "203.0.113.7:5555".parse().expect("addr");
    let guesser: SocketAddr = "198.51.100.66:6666".parse().expect("addr");
    let mut watcher = session_after(to, &proxy(honest, to), Mode::Direct);
    let mut tls = tls_after(connect_from(BALANCER, to), &proxy(honest, to), Mode::Direct);
    start_sasl(&mut tls, "app.b1");
    let key = login_keyed(&mut tls, PASSWORD).expect("login");
    // The guesses below take a while on a busy machine: longer than one read may wait.
    tls.sock
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("read timeout");
    let sleeper = thread::spawn(move || {
        tls.write_all(&query("select pg_sleep(30)"))
            .expect("send query");
        let mut code = String::new();
        loop {
            match next_message(&mut tls, "pg_sleep") {
                (b'E', body) => code = parse_error(&body).code,
                (b'Z', _) => return code,
                _ => {}
            }
        }
    });
    let sql = format!(
        "select count(*) from pg_stat_activity where pid = {} and state = 'active' \
         and query = 'select pg_sleep(30)'",
        key.0
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while query_one(&mut watcher, &sql) != "1" {
        assert!(Instant::now() < deadline, "pg_sleep never started");
        thread::sleep(Duration::from_millis(20));
    }
    // Far more misses than a source may have on either worker (cancel::MISS_BURST each).
    for wrong in 0..200 {
        cancel_via_balancer(to, guesser, (key.0, key.1 ^ (wrong + 1)));
    }
    cancel_via_balancer(to, honest, key);
    assert_eq!(sleeper.join().expect("query thread"), "57014", "canceled");
}

/// The steering map files a client that logged in through the balancer under the header's
/// address, never under the balancer's (which every balanced connection's SYN carries: filed,
/// it would steer all of them to the last client's branch).
#[test]
fn the_steering_map_files_the_client_not_the_balancer() {
    let router = router("steering = \"ebpf\"\n", "");
    assert_eq!(router.router().steering().mode(), SteeringMode::Ebpf);
    let to = router.direct_addr();
    let client: SocketAddr = "203.0.113.7:5555".parse().expect("addr");
    for mode in MODES {
        let mut tls = session_after(to, &proxy(client, to), mode);
        assert_eq!(query_one(&mut tls, "select 1"), "1");
    }
    let clients = bpftool_dump(&Path::new(PIN_ROOT).join(pin_name(to)).join("clients"));
    // Keys are IPv6 addresses, IPv4 ones mapped (::ffff:a.b.c.d): their last six bytes.
    let key = |[a, b, c, d]: [u8; 4]| {
        format!("\"0xff\",\"0xff\",\"{a:#04x}\",\"{b:#04x}\",\"{c:#04x}\",\"{d:#04x}\"")
    };
    assert!(clients.contains(&key([203, 0, 113, 7])), "{clients}");
    assert!(!clients.contains(&key([127, 0, 0, 1])), "{clients}");
}

/// `bpftool -j map dump pinned PATH`, compact JSON.
fn bpftool_dump(path: &Path) -> String {
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(path)
        .output()
        .expect("bpftool (installed by scripts/setup)");
    assert!(
        out.status.success(),
        "bpftool map dump pinned {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

// ---------------------------------------------------------------------------------------------
// A real client library behind a balancer

/// A TCP balancer on 127.0.0.1: each connection it accepts is relayed to `to`, after a PROXY
/// header naming `client`, as HAProxy's `send-proxy-v2` does (the header in a write of its
/// own, before the first byte it forwards). Stops accepting when dropped.
struct Balancer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl Balancer {
    fn start(to: SocketAddr, client: SocketAddr) -> Balancer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the balancer");
        let addr = listener.local_addr().expect("balancer address");
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        thread::spawn(move || {
            for front in listener.incoming() {
                if stopped.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(front) = front else { continue };
                thread::spawn(move || relay(front, to, client));
            }
        });
        Balancer { addr, stop }
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accept loop, which then sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

/// Relays `front` to a new connection to `to` that begins with a header naming `client`.
fn relay(front: TcpStream, to: SocketAddr, client: SocketAddr) {
    let Ok(mut back) = TcpStream::connect(to) else {
        return;
    };
    if back.write_all(&proxy(client, to)).is_err() {
        return;
    }
    let (Ok(mut front_in), Ok(mut back_out)) = (front.try_clone(), back.try_clone()) else {
        return;
    };
    let upstream = thread::spawn(move || {
        let _ = std::io::copy(&mut front_in, &mut back_out);
        let _ = back_out.shutdown(Shutdown::Write);
    });
    let mut front_out = front;
    let _ = std::io::copy(&mut back, &mut front_out);
    let _ = front_out.shutdown(Shutdown::Write);
    let _ = upstream.join();
}

/// psycopg (libpq 17) through the balancer: both TLS negotiations, both ports, verify-full.
#[test]
fn psycopg_through_a_balancer_on_both_ports_in_both_modes() {
    let router = router("", "");
    let client: SocketAddr = "203.0.113.9:4444".parse().expect("addr");
    for to in [router.direct_addr(), router.pooled_addr()] {
        let balancer = Balancer::start(to, client);
        for negotiation in [SslNegotiation::Postgres, SslNegotiation::Direct] {
            let info = Conninfo::new(balancer.addr)
                .user("app.b1")
                .password(PASSWORD)
                .verify_full(&fixture().certs.ca_path(), negotiation);
            assert_eq!(
                psycopg_query(&info, "select 'through the balancer'"),
                Ok("through the balancer".to_owned()),
                "{to} {negotiation:?}"
            );
        }
    }
    assert_eq!(refused_headers(&router, "direct"), 0);
    assert_eq!(refused_headers(&router, "pooled"), 0);
}

/// A session through the balancer ends as any other: the router's close reaches the client.
#[test]
fn a_session_behind_the_balancer_ends_cleanly() {
    let router = router("", "");
    let to = router.pooled_addr();
    let mut tls = session_after(
        to,
        &proxy("203.0.113.7:5555".parse().expect("addr"), to),
        Mode::SslRequest,
    );
    assert_eq!(query_one(&mut tls, "select 3"), "3");
    tls.write_all(&raw::terminate()).expect("Terminate");
    expect_closed(&mut tls, "after Terminate");
}
