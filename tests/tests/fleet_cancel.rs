//! Cancels across nodes, end to end: a real etcd, a real PostgreSQL and two real
//! `branchgate run` nodes with `[node] peer` and one shared `[node] secret_file`.
//!
//! A session on node A (direct and pooled port) runs `pg_sleep(30)`; its CancelRequest sent to
//! node B cancels it (B forwards the key: to every live node for a direct key, to the node the
//! key names for a pooled one). A wrong key sent to B does nothing; a forged message with a
//! wrong MAC sent straight to A's peer port does nothing and is counted; once A is killed, a
//! cancel for its keys at B returns at once and B goes on serving.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use branchgate_e2e::binary::{branchgate, wait_for, RouterProcess};
use branchgate_e2e::catalog::{catalog_toml, router_toml, toml_string};
use branchgate_e2e::etcd::{fleet_fixture, FleetFixture};
use branchgate_e2e::metrics;
use branchgate_e2e::raw::{
    self, cancel_request, login_keyed, next_message, parse_error, query, query_one, start_sasl,
    Mode, Tls,
};
use branchgate_e2e::BranchSpec;
use tempfile::TempDir;

/// How long a change may take to reach a node (a lease to expire, a watch to fire, a forward).
const EVENT_TIMEOUT: Duration = Duration::from_secs(20);
/// A cancel's effect: generous, the forward itself is bounded at 1 s.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(10);
const ROLE: &str = "fc1";
const PASSWORD: &str = "pscale_pw_fleet_cancel_1";

fn fixture() -> &'static FleetFixture {
    fleet_fixture()
}

/// router.toml's text: the catalog at `url`, `/metrics` on a free port, `[node]` with id `id`,
/// a short lease, a peer port and the shared secret.
fn router_config(url: &str, id: &str, text: String) -> String {
    let mut text = text
        .replace(
            "catalog = \"catalog.toml\"",
            &format!("catalog = {}", toml_string(url)),
        )
        .replace("[listen]\n", "[listen]\nadmin = \"127.0.0.1:0\"\n");
    text.push_str(&format!(
        "\n[node]\nid = {}\nlease_ttl = \"2s\"\npeer = \"127.0.0.1:0\"\n\
         secret_file = \"peer.secret\"\n",
        toml_string(id)
    ));
    text
}

fn temp_dir() -> TempDir {
    tempfile::Builder::new()
        .prefix("bg-fleet-cancel-")
        .tempdir()
        .expect("create temp dir")
}

/// `branchgate run` in `dir` as node `id`, with the fleet's secret beside its configuration.
fn spawn_node(dir: &Path, url: &str, id: &str) -> RouterProcess {
    std::fs::write(dir.join("peer.secret"), format!("{}\n", "5e".repeat(32))).expect("secret");
    RouterProcess::spawn_with(dir, &fixture().certs, |text| router_config(url, id, text))
}

/// The value of the node's sample whose line starts with `series`, or 0.
fn sample(router: &RouterProcess, series: &str) -> i64 {
    metrics::series(&router.metrics(EVENT_TIMEOUT), series).unwrap_or(0)
}

fn wait_for_nodes(router: &RouterProcess, n: i64) {
    wait_for(&format!("{n} live nodes"), EVENT_TIMEOUT, || {
        (sample(router, "branchgate_fleet_nodes ") == n).then_some(())
    });
}

/// A logged-in raw session on `addr` (either port): (connection, its cancel key).
fn session(addr: SocketAddr) -> (Tls, (u32, u32)) {
    let mut tls = raw::connect_tls(addr, fixture().certs.client_config(), Mode::Direct);
    start_sasl(&mut tls, &format!("{ROLE}.b1"));
    let key = login_keyed(&mut tls, PASSWORD).expect("login");
    (tls, key)
}

/// Runs `sql` on its own thread: the SQLSTATE it ended with ("" if it completed).
fn in_background(mut tls: Tls, sql: &'static str) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        tls.sock
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("read timeout");
        tls.write_all(&query(sql)).expect("send query");
        let mut code = String::new();
        loop {
            match next_message(&mut tls, sql) {
                (b'E', body) => code = parse_error(&body).code,
                (b'Z', _) => return code,
                _ => {}
            }
        }
    })
}

/// Waits until the server runs `sql`.
fn wait_running(sql: &str) {
    fixture().pg.wait_for_value(
        &format!(
            "select count(*) from pg_stat_activity where state = 'active' and query = '{sql}'"
        ),
        "1",
    );
}

/// Sends a plaintext CancelRequest to `addr` and waits until the router closes the connection:
/// how long that took.
fn send_cancel(addr: SocketAddr, (pid, secret): (u32, u32)) -> Duration {
    let started = Instant::now();
    let mut sock = TcpStream::connect(addr).expect("connect");
    sock.set_read_timeout(Some(CANCEL_TIMEOUT))
        .expect("read timeout");
    sock.write_all(&cancel_request(pid, secret))
        .expect("send the CancelRequest");
    let mut rest = Vec::new();
    let read = sock.read_to_end(&mut rest);
    assert!(
        read.is_ok(),
        "the router did not close the cancel connection: {read:?}"
    );
    assert!(
        rest.is_empty(),
        "a CancelRequest is never answered: {rest:?}"
    );
    started.elapsed()
}

/// Waits until `thread` has ended and returns what it returned.
fn join_within<T>(thread: thread::JoinHandle<T>, what: &str) -> T {
    wait_for(what, CANCEL_TIMEOUT, || thread.is_finished().then_some(()));
    thread.join().expect("query thread")
}

#[test]
fn a_cancel_sent_to_another_node_reaches_the_session_and_a_dead_nodes_key_returns_at_once() {
    let prefix = "/fleet-cancel";
    let url = fixture().etcd.catalog_url(prefix);
    let pg = &fixture().pg;
    pg.create_role(ROLE, PASSWORD);
    let verifier = pg.role_verifier(ROLE);
    let dir_a = temp_dir();
    let dir_b = temp_dir();
    let import = dir_a.path().join("import-router.toml");
    std::fs::write(
        &import,
        router_config(
            &url,
            "importer",
            router_toml(&fixture().certs, "catalog.toml"),
        ),
    )
    .expect("write router.toml");
    let file = dir_a.path().join("import.toml");
    std::fs::write(
        &file,
        catalog_toml(&[BranchSpec::new("b1", pg.addr()).role(ROLE, &verifier)]),
    )
    .expect("write the catalog");
    let output = branchgate(&[
        "catalog",
        "import",
        "--config",
        import.to_str().expect("UTF-8"),
        file.to_str().expect("UTF-8"),
    ]);
    assert!(output.status.success(), "{output:?}");

    let mut a = spawn_node(dir_a.path(), &url, "cancel-a");
    let b = spawn_node(dir_b.path(), &url, "cancel-b");
    wait_for_nodes(&a, 2);
    wait_for_nodes(&b, 2);
    let a_peer = a.logged_addr(&["fleet node"], "peer", EVENT_TIMEOUT);
    assert_ne!(a_peer.port(), 0, "the bound port is registered");

    // Direct port: the key is the backend's pid. A wrong secret at B reaches A (B forwards
    // direct keys to every live node) and does nothing there.
    let direct_sql = "select pg_sleep(30) -- direct";
    let (tls, direct_key) = session(a.addr());
    assert!(direct_key.0 < 1 << 22, "a real pid: {direct_key:?}");
    let sleeper = in_background(tls, direct_sql);
    wait_running(direct_sql);
    send_cancel(b.addr(), (direct_key.0, direct_key.1 ^ 1));
    wait_for(
        "A to receive the forwarded wrong key",
        EVENT_TIMEOUT,
        || (sample(&a, "branchgate_fleet_cancels_received_total ") >= 1).then_some(()),
    );
    assert_eq!(sample(&a, "branchgate_fleet_cancels_matched_total "), 0);
    wait_running(direct_sql);
    assert!(!sleeper.is_finished(), "a wrong key canceled the query");
    // The right key at B cancels A's query.
    send_cancel(b.addr(), direct_key);
    assert_eq!(join_within(sleeper, "the direct query to end"), "57014");
    assert_eq!(sample(&a, "branchgate_fleet_cancels_matched_total "), 1);
    assert!(sample(&b, "branchgate_fleet_cancels_sent_total ") >= 2);

    // Pooled port: the router's key names node A.
    let pooled_sql = "select pg_sleep(30) -- pooled";
    let (tls, pooled_key) = session(a.pooled_addr());
    assert!(
        pooled_key.0 >= 1 << 22,
        "a router-issued pid: {pooled_key:?}"
    );
    let sleeper = in_background(tls, pooled_sql);
    wait_running(pooled_sql);

    // A forged message (the right key, a wrong MAC) straight to A's peer port: refused.
    let mut forged = [0u8; 80];
    forged[..8].copy_from_slice(b"BGC1\x01\0\0\0");
    forged[8..12].copy_from_slice(&pooled_key.0.to_be_bytes());
    forged[12..16].copy_from_slice(&pooled_key.1.to_be_bytes());
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    forged[16..24].copy_from_slice(&now_ms.to_be_bytes());
    let mut peer = TcpStream::connect(a_peer).expect("connect to A's peer port");
    peer.set_read_timeout(Some(CANCEL_TIMEOUT))
        .expect("read timeout");
    peer.write_all(&forged).expect("send the forged message");
    let mut answer = Vec::new();
    peer.read_to_end(&mut answer).expect("A closes");
    assert!(answer.is_empty(), "the peer port never answers: {answer:?}");
    wait_for("A to count the bad MAC", EVENT_TIMEOUT, || {
        (sample(
            &a,
            "branchgate_fleet_cancels_rejected_total{reason=\"bad_mac\"} ",
        ) == 1)
            .then_some(())
    });
    wait_running(pooled_sql);
    assert!(
        !sleeper.is_finished(),
        "a forged message canceled the query"
    );

    send_cancel(b.addr(), pooled_key);
    assert_eq!(join_within(sleeper, "the pooled query to end"), "57014");
    assert_eq!(sample(&a, "branchgate_fleet_cancels_matched_total "), 2);

    // A dies without a word: B's cancels for its keys return at once, before A leaves B's live
    // set (the forward to it fails fast) and after.
    a.signal(libc::SIGKILL);
    a.wait_exit(EVENT_TIMEOUT);
    for key in [pooled_key, direct_key] {
        let took = send_cancel(b.addr(), key);
        assert!(took < CANCEL_TIMEOUT, "{took:?}");
    }
    wait_for_nodes(&b, 1);
    for key in [pooled_key, direct_key] {
        let took = send_cancel(b.addr(), key);
        assert!(took < CANCEL_TIMEOUT, "{took:?}");
    }
    // B goes on serving.
    let (mut tls, _) = session(b.addr());
    assert_eq!(query_one(&mut tls, "select 1"), "1");
}
