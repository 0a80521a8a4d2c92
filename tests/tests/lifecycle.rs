//! The router's life cycle: roles created and reset by the CLI, catalog reloads (good and bad),
//! graceful shutdown, `check-config`, and the `branchgate run` binary under signals.
//!
//! One PostgreSQL primary and one set of certificates serve the whole binary; every test starts
//! its own router (in-process, or the real binary) because most of them rewrite the catalog.

use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use branchgate::auth::verifier::ScramVerifier;
use branchgate::catalog::CatalogError;
use branchgate::config::TomlError;
use branchgate::role::{self, Mode, RoleArgs};
use branchgate::router::{ReloadError, Reloaded};
use branchgate_e2e::binary::{branchgate, wait_for, RouterProcess};
use branchgate_e2e::catalog::{catalog_toml, router_toml, toml_string};
use branchgate_e2e::raw::{request, SSL_REQUEST_CODE};
use branchgate_e2e::tokio_tls::assert_db_error;
use branchgate_e2e::tools::{psql_command, psql_output};
use branchgate_e2e::tp_session::Session;
use branchgate_e2e::{
    psycopg_query, BranchSpec, Certs, Conninfo, PgServer, SslNegotiation, ADMIN_PASSWORD,
    ADMIN_USER,
};
use tempfile::TempDir;
use tokio_postgres::error::SqlState;

/// How long a router-side event (a FATAL, a refused connection, a reload) may take to show.
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on a graceful shutdown: drain (1 s in tests) plus the kill grace, with a wide margin.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(15);
/// Drain long enough that finishing before it proves the drain ended early.
const LONG_DRAIN: &str = "60s";
const ADMIN_SHUTDOWN_MESSAGE: &str = "terminating connection due to administrator command";
const PASSWORD_RESET_MESSAGE: &str = "terminating connection because the role's password was reset";

// ---------------------------------------------------------------------------------------------
// Shared fixture

struct Fixture {
    pg: PgServer,
    certs: Certs,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| Fixture {
        pg: PgServer::start_primary(),
        certs: Certs::generate(),
    })
}

/// Creates `role` on the fixture server and returns its SCRAM verifier.
fn server_role(role: &str, password: &str) -> String {
    let pg = &fixture().pg;
    pg.create_role(role, password);
    pg.role_verifier(role)
}

/// A libpq connection string through the router with full certificate checks.
fn via_router(addr: SocketAddr, user: &str, password: &str) -> Conninfo {
    Conninfo::new(addr)
        .user(user)
        .password(password)
        .verify_full(&fixture().certs.ca_path(), SslNegotiation::Postgres)
}

/// Writes `text` to `path` through a rename, so the router's file watch never reads half a file.
fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text).expect("write temp file");
    fs::rename(&tmp, path).expect("rename into place");
}

/// Replaces the file at `path` with `text` of the same length and modification time, so the
/// router's file watch (which compares both) cannot see the change: only SIGHUP reloads it.
fn write_unseen_by_the_watch(path: &Path, text: &str) {
    let old = fs::metadata(path).expect("stat the catalog");
    assert_eq!(old.len(), text.len() as u64, "the new text must be as long");
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text).expect("write temp file");
    let file = fs::File::options()
        .write(true)
        .open(&tmp)
        .expect("open temp file");
    file.set_modified(old.modified().expect("mtime"))
        .expect("set mtime");
    drop(file);
    fs::rename(&tmp, path).expect("rename into place");
}

// ---------------------------------------------------------------------------------------------
// The router in-process, with its files in a temp dir

struct LocalRouter {
    dir: TempDir,
    router: Option<branchgate::Router>,
}

impl LocalRouter {
    /// Starts a router (2 workers) for `branches` with the given drain time.
    fn start(branches: &[BranchSpec], drain: &str) -> LocalRouter {
        Self::start_with(branches, drain, "")
    }

    /// As [`LocalRouter::start`], with `extra` appended to router.toml.
    fn start_with(branches: &[BranchSpec], drain: &str, extra: &str) -> LocalRouter {
        let dir = tempfile::Builder::new()
            .prefix("bg-lifecycle-")
            .tempdir()
            .expect("create temp dir");
        let text = router_toml(&fixture().certs, "catalog.toml");
        assert!(text.contains("drain = \"1s\""), "{text}");
        let text =
            text.replace("drain = \"1s\"", &format!("drain = {}", toml_string(drain))) + extra;
        fs::write(dir.path().join("router.toml"), &text).expect("write router.toml");
        write_atomically(&dir.path().join("catalog.toml"), &catalog_toml(branches));
        let config = branchgate::config::Config::parse(&text, dir.path(), "router.toml")
            .unwrap_or_else(|e| panic!("router config rejected: {e}\n{text}"));
        let router = branchgate::start(config).unwrap_or_else(|e| panic!("router start: {e}"));
        LocalRouter {
            dir,
            router: Some(router),
        }
    }

    fn addr(&self) -> SocketAddr {
        self.router().direct_addr()
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("router.toml")
    }

    fn catalog_path(&self) -> PathBuf {
        self.dir.path().join("catalog.toml")
    }

    fn write_catalog(&self, text: &str) {
        write_atomically(&self.catalog_path(), text);
    }

    fn reload(&self) -> Result<Reloaded, ReloadError> {
        self.router().reload_catalog()
    }

    fn router(&self) -> &branchgate::Router {
        self.router.as_ref().expect("router already shut down")
    }

    /// Starts a graceful shutdown on another thread.
    fn shutdown_in_background(&mut self) -> thread::JoinHandle<()> {
        let router = self.router.take().expect("router already shut down");
        thread::spawn(move || router.shutdown())
    }
}

impl Drop for LocalRouter {
    fn drop(&mut self) {
        if let Some(router) = self.router.take() {
            router.shutdown();
        }
    }
}

/// Starts a graceful shutdown of a router that accepts clients, and waits until it refuses them.
fn start_shutdown(router: &mut LocalRouter) -> thread::JoinHandle<()> {
    let addr = router.addr();
    assert!(
        !refuses_connections(addr),
        "the router refuses before shutdown"
    );
    let shutdown = router.shutdown_in_background();
    wait_for("new connections to be refused", EVENT_TIMEOUT, || {
        refuses_connections(addr).then_some(())
    });
    shutdown
}

/// Waits for a background shutdown to return, panicking after [`SHUTDOWN_TIMEOUT`].
fn join_within(handle: thread::JoinHandle<()>, timeout: Duration) -> Duration {
    let start = Instant::now();
    wait_for("router shutdown to return", timeout, || {
        handle.is_finished().then_some(())
    });
    handle.join().expect("shutdown thread panicked");
    start.elapsed()
}

/// Whether `addr` refuses new clients: connect fails, or the connection is closed without an
/// answer to an SSLRequest.
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
    let refused = !matches!(stream.read(&mut answer), Ok(1));
    let _ = stream.shutdown(Shutdown::Both);
    refused
}

// ---------------------------------------------------------------------------------------------
// tokio-postgres: a session held open across router events

/// A tokio-postgres session to the router at `addr`, verified against the fixture's CA.
fn open_session(
    addr: SocketAddr,
    user: &str,
    password: &str,
) -> Result<Session, tokio_postgres::Error> {
    Session::open(addr, fixture().certs.client_config(), user, password)
}

// ---------------------------------------------------------------------------------------------
// The branchgate binary

/// Runs `branchgate role <action>` and returns the new password from its output.
fn role_cli(action: &str, config: &Path, branch: &str, role: &str) -> String {
    let config = config.to_str().expect("temp paths are UTF-8");
    let output = branchgate(&[
        "role", action, "--config", config, "--branch", branch, "--role", role,
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "branchgate role {action} failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    let field = |name: &str| {
        stdout
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .map(str::trim)
            .unwrap_or_else(|| panic!("no `{name}` line in:\n{stdout}"))
            .to_owned()
    };
    assert_eq!(field("user:"), format!("{role}.{branch}"), "{stdout}");
    let password = field("password:");
    assert!(password.starts_with("pscale_pw_"), "{stdout}");
    password
}

/// Runs `sql` with psql 15 (SSLRequest, verify-full) through the router.
fn psql_via(addr: SocketAddr, user: &str, password: &str, sql: &str) -> Result<String, String> {
    // psql 15's libpq predates `sslnegotiation`, so the connection string must not name it.
    let conninfo = Conninfo::new(addr)
        .user(user)
        .password(password)
        .param("sslmode", "verify-full")
        .param(
            "sslrootcert",
            fixture().certs.ca_path().to_str().expect("UTF-8 path"),
        );
    psql_output(
        psql_command()
            .arg("-c")
            .arg(sql)
            .arg("-d")
            .arg(conninfo.to_string()),
    )
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn role_create_cli_makes_a_role_that_logs_in_through_the_router() {
    let pg = &fixture().pg;
    let router = LocalRouter::start(&[BranchSpec::new("b1", pg.addr())], "1s");
    let err = psycopg_query(&via_router(router.addr(), "web.b1", "x"), "SELECT 1")
        .expect_err("no role yet");
    assert!(
        err.message.contains("password authentication failed"),
        "{err:?}"
    );

    let password = role_cli("create", &router.config_path(), "b1", "web");
    let catalog = fs::read_to_string(router.catalog_path()).expect("read catalog");
    let verifier = pg.role_verifier("web");
    assert!(
        catalog.contains(&toml_string(&verifier)),
        "catalog lacks the server's verifier {verifier}:\n{catalog}"
    );
    // No reload here: the command returned once the router confirmed, over its control
    // socket, that the new verifier is in force.
    let who = psycopg_query(
        &via_router(router.addr(), "web.b1", &password),
        "SELECT current_user",
    )
    .expect("web.b1 logs in with the printed password");
    assert_eq!(who, "web");
}

#[test]
fn clients_over_max_client_connections_get_53300() {
    let pg = &fixture().pg;
    let password = "pscale_pw_lim7";
    let branch = BranchSpec::new("b1", pg.addr()).role("lim7", &server_role("lim7", password));
    let router =
        LocalRouter::start_with(&[branch], "1s", "\n[limits]\nmax_client_connections = 2\n");
    let first = open_session(router.addr(), "lim7.b1", password).expect("first client");
    let _second = open_session(router.addr(), "lim7.b1", password).expect("second client");
    let error = open_session(router.addr(), "lim7.b1", password)
        .err()
        .expect("a third client is over the limit");
    assert_db_error(
        &error,
        &SqlState::TOO_MANY_CONNECTIONS,
        "sorry, too many clients already",
    );
    // A client that leaves frees its place.
    first.close();
    let third = wait_for("a place for the third client", EVENT_TIMEOUT, || {
        open_session(router.addr(), "lim7.b1", password).ok()
    });
    assert_eq!(third.value("SELECT current_user").expect("query"), "lim7");
}

#[test]
fn password_reset_closes_the_roles_sessions_only() {
    let pg = &fixture().pg;
    let old_password = "pscale_pw_web2_old";
    let branch = BranchSpec::new("b1", pg.addr())
        .role("web2", &server_role("web2", old_password))
        .role("peer2", &server_role("peer2", "pscale_pw_peer2"));
    let router = LocalRouter::start(&[branch], "1s");
    let mut web = open_session(router.addr(), "web2.b1", old_password).expect("web2 logs in");
    assert_eq!(web.value("SELECT current_user").expect("query"), "web2");
    let peer = open_session(router.addr(), "peer2.b1", "pscale_pw_peer2").expect("peer2 logs in");

    let args = RoleArgs {
        config: router.config_path(),
        branch: "b1".into(),
        role: "web2".into(),
        admin_user: ADMIN_USER.into(),
        wait: Duration::from_secs(10),
    };
    let new_password = role::apply(&args, Mode::Reset, Some(ADMIN_PASSWORD)).expect("role reset");
    assert_ne!(new_password, old_password);
    router.reload().expect("reload after role reset");

    let error = web.ended_by_server();
    assert_db_error(&error, &SqlState::ADMIN_SHUTDOWN, PASSWORD_RESET_MESSAGE);
    let error = web.value("SELECT 1").expect_err("the session is closed");
    assert!(error.is_closed(), "{error}");

    let error = open_session(router.addr(), "web2.b1", old_password)
        .err()
        .expect("the old password no longer works");
    assert_db_error(
        &error,
        &SqlState::INVALID_PASSWORD,
        "password authentication failed",
    );
    let who = psycopg_query(
        &via_router(router.addr(), "web2.b1", &new_password),
        "SELECT current_user",
    )
    .expect("the new password works");
    assert_eq!(who, "web2");

    assert_eq!(
        peer.value("SELECT current_user").expect("peer still open"),
        "peer2"
    );
}

#[test]
fn rejected_catalogs_keep_the_old_one_in_force() {
    let pg = &fixture().pg;
    let password = "pscale_pw_app3";
    let verifier = server_role("app3", password);
    let b1 = BranchSpec::new("b1", pg.addr()).role("app3", &verifier);
    let router = LocalRouter::start(std::slice::from_ref(&b1), "1s");
    let held = open_session(router.addr(), "app3.b1", password).expect("app3 logs in");
    let works = |label: &str| {
        assert_eq!(held.value("SELECT 41 + 1").expect(label), "42", "{label}");
        let who = psycopg_query(
            &via_router(router.addr(), "app3.b1", password),
            "SELECT current_user",
        )
        .unwrap_or_else(|e| panic!("{label}: new connection failed: {e:?}"));
        assert_eq!(who, "app3", "{label}");
    };

    router.write_catalog("[[branch]]\nid = \"b1\"\nprimary = \n");
    match router.reload() {
        Err(ReloadError::Catalog(CatalogError::Toml(TomlError::Parse { line, .. }))) => {
            assert_eq!(line, 3)
        }
        other => panic!("invalid TOML must be a parse error, got {other:?}"),
    }
    works("after invalid TOML");

    let bad = BranchSpec::new("b1", pg.addr()).role("app3", "SCRAM-SHA-256$4096:bm90LWJhc2U2NA");
    router.write_catalog(&catalog_toml(&[bad]));
    match router.reload() {
        Err(ReloadError::Catalog(CatalogError::Toml(TomlError::Invalid { message, .. }))) => {
            assert!(message.contains("invalid SCRAM verifier"), "{message}")
        }
        other => panic!("a bad verifier must be rejected, got {other:?}"),
    }
    works("after a bad verifier");

    let error = open_session(router.addr(), "app3.b2", password)
        .err()
        .expect("b2 is not in the catalog yet");
    assert_db_error(
        &error,
        &SqlState::INVALID_PASSWORD,
        "password authentication failed for user \"app3\"",
    );
    let b2 = BranchSpec::new("b2", pg.addr()).role("app3", &verifier);
    router.write_catalog(&catalog_toml(&[b1, b2]));
    router.reload().expect("a valid catalog is accepted");
    let who = psycopg_query(
        &via_router(router.addr(), "app3.b2", password),
        "SELECT current_user",
    )
    .expect("b2 is routable");
    assert_eq!(who, "app3");
    works("after adding b2");
}

#[test]
fn shutdown_refuses_new_clients_and_ends_sessions_after_the_drain() {
    let pg = &fixture().pg;
    let password = "pscale_pw_app4";
    let branch = BranchSpec::new("b1", pg.addr()).role("app4", &server_role("app4", password));
    let mut router = LocalRouter::start(&[branch], "1s");
    let addr = router.addr();
    let pooled = router.router().pooled_addr().expect("a pooled port");
    assert_ne!(pooled.port(), addr.port());
    let connect = |addr| TcpStream::connect_timeout(&addr, Duration::from_secs(2));
    drop(connect(pooled).expect("the pooled port listens"));
    let mut held = open_session(addr, "app4.b1", password).expect("app4 logs in");
    assert_eq!(held.value("SELECT current_user").expect("query"), "app4");

    let shutdown = start_shutdown(&mut router);
    let error = held.ended_by_server();
    assert_db_error(&error, &SqlState::ADMIN_SHUTDOWN, ADMIN_SHUTDOWN_MESSAGE);
    join_within(shutdown, SHUTDOWN_TIMEOUT);
    assert!(
        refuses_connections(addr),
        "the router still accepts after shutdown"
    );
    assert!(
        connect(pooled).is_err(),
        "the pooled port still listens after shutdown"
    );
}

#[test]
fn shutdown_ends_early_when_the_last_session_leaves_during_the_drain() {
    let pg = &fixture().pg;
    let password = "pscale_pw_app5";
    let branch = BranchSpec::new("b1", pg.addr()).role("app5", &server_role("app5", password));
    let mut router = LocalRouter::start(&[branch], LONG_DRAIN);
    let addr = router.addr();
    let held = open_session(addr, "app5.b1", password).expect("app5 logs in");

    let shutdown = start_shutdown(&mut router);
    // The drain lets open sessions keep working until they leave.
    assert_eq!(
        held.value("SELECT current_user")
            .expect("query during the drain"),
        "app5"
    );
    assert!(
        !shutdown.is_finished(),
        "shutdown returned with a session open"
    );
    held.close();
    let took = join_within(shutdown, SHUTDOWN_TIMEOUT);
    assert!(
        took < SHUTDOWN_TIMEOUT,
        "shutdown took {took:?} with a {LONG_DRAIN} drain"
    );
}

#[test]
fn check_config_accepts_valid_files_and_points_at_bad_lines() {
    let certs = Certs::generate();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("router.toml");
    let config_arg = config.to_str().expect("UTF-8 path");
    let primary: SocketAddr = "127.0.0.1:5999".parse().expect("addr");
    let verifier = ScramVerifier::generate("pscale_pw_check").to_string();
    let branch = BranchSpec::new("b1", primary).role("app", &verifier);
    fs::write(dir.path().join("catalog.toml"), catalog_toml(&[branch])).expect("write catalog");
    let text = router_toml(&certs, "catalog.toml");
    fs::write(&config, &text).expect("write router.toml");

    let output = branchgate(&["check-config", config_arg]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "valid config rejected: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("configuration OK"), "{stdout}");
    assert!(stdout.contains("1 branches"), "{stdout}");

    let with_typo = text.replace("[listen]\n", "[listen]\nbogus_key = 1\n");
    let line = with_typo
        .lines()
        .position(|l| l.starts_with("bogus_key"))
        .expect("inserted line")
        + 1;
    fs::write(&config, &with_typo).expect("write router.toml");
    let output = branchgate(&["check-config", config_arg]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "unknown key accepted");
    assert!(stderr.contains(&format!("router.toml:{line}:")), "{stderr}");
    assert!(stderr.contains("bogus_key"), "{stderr}");

    fs::write(&config, &text).expect("write router.toml");
    let bad = BranchSpec::new("b1", primary).role("app", "SCRAM-SHA-256$4096:c2FsdA==$x");
    let catalog = catalog_toml(&[bad]);
    let line = catalog
        .lines()
        .position(|l| l.starts_with("\"app\""))
        .expect("role line")
        + 1;
    fs::write(dir.path().join("catalog.toml"), catalog).expect("write catalog");
    let output = branchgate(&["check-config", config_arg]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "bad verifier accepted");
    assert!(
        stderr.contains(&format!("catalog.toml:{line}:")),
        "{stderr}"
    );
    assert!(stderr.contains("invalid SCRAM verifier"), "{stderr}");
}

#[test]
fn binary_reloads_on_sighup_and_on_role_reset_and_exits_on_sigterm() {
    let pg = &fixture().pg;
    let password = "pscale_pw_app6";
    let b1 = BranchSpec::new("b1", pg.addr()).role("app6", &server_role("app6", password));
    let dir = tempfile::Builder::new()
        .prefix("bg-lifecycle-bin-")
        .tempdir()
        .expect("temp dir");
    let catalog = dir.path().join("catalog.toml");
    let late_password = "pscale_pw_late6";
    let late = b1
        .clone()
        .role("late6", &server_role("late6", late_password));
    let late_text = catalog_toml(&[late]);
    // The first catalog is padded to the later one's length (see write_unseen_by_the_watch).
    let mut first_text = catalog_toml(std::slice::from_ref(&b1));
    let pad = late_text.len() - first_text.len() - "# \n".len();
    first_text.push_str(&format!("# {}\n", "-".repeat(pad)));
    write_atomically(&catalog, &first_text);
    let mut process = RouterProcess::spawn(dir.path(), &fixture().certs);
    let addr = process.addr();

    let who = psql_via(addr, "app6.b1", password, "SELECT current_user")
        .unwrap_or_else(|e| panic!("psql through branchgate run: {e}\n{}", process.log()));
    assert_eq!(who, "app6");

    let err = psql_via(addr, "late6.b1", late_password, "SELECT 1").expect_err("not yet");
    assert!(err.contains("password authentication failed"), "{err}");
    write_unseen_by_the_watch(&catalog, &late_text);
    process.signal(libc::SIGHUP);
    let who = wait_for("the added role to log in", EVENT_TIMEOUT, || {
        psql_via(addr, "late6.b1", late_password, "SELECT current_user").ok()
    });
    assert_eq!(who, "late6");
    wait_for("the SIGHUP reload in the log", EVENT_TIMEOUT, || {
        process
            .log()
            .contains("SIGHUP: reloading catalog")
            .then_some(())
    });

    // A password reset by the real CLI reaches the running router through its control socket
    // (no signal) and closes the role's open session.
    let mut session = open_session(addr, "app6.b1", password).expect("app6 logs in");
    let new_password = role_cli("reset", &dir.path().join("router.toml"), "b1", "app6");
    let error = session.ended_by_server();
    assert_db_error(&error, &SqlState::ADMIN_SHUTDOWN, PASSWORD_RESET_MESSAGE);
    let who = psql_via(addr, "app6.b1", &new_password, "SELECT current_user")
        .unwrap_or_else(|e| panic!("the new password right after role reset: {e}"));
    assert_eq!(who, "app6");

    process.signal(libc::SIGTERM);
    let status = process.wait_exit(SHUTDOWN_TIMEOUT);
    let log = process.log();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(
        log.contains("io_uring") || log.contains("legacy"),
        "the log does not name the I/O driver:\n{log}"
    );
    assert!(refuses_connections(addr), "still listening after exit");
}
