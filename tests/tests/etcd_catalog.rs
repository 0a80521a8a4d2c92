//! The catalog in etcd, end to end: a real etcd (its own, on free ports), a real PostgreSQL and
//! the real `branchgate` binary.
//!
//! A router with `catalog = "etcd://..."` serves the branches under its prefix; role resets
//! through the CLI, branches added with etcdctl and whole catalogs imported reach it through
//! its watch; the reload guard refuses a change that removes every branch; with etcd stopped it
//! goes on serving with the catalog it has (and says so once, and in /metrics), and takes the
//! next change once etcd is back; two `role reset`s of one role at once: one wins, the other
//! fails having changed nothing.
//!
//! One PostgreSQL primary, one set of certificates and one etcd serve the whole binary (each
//! test under its own prefix); the test that stops etcd has its own.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use branchgate_e2e::binary::{
    branchgate, branchgate_bin, wait_for, RouterProcess, ADMIN_PASSWORD_ENV,
};
use branchgate_e2e::catalog::{catalog_toml, router_toml, toml_string};
use branchgate_e2e::etcd::{fleet_fixture, FleetFixture};
use branchgate_e2e::metrics;
use branchgate_e2e::tokio_tls::assert_db_error;
use branchgate_e2e::tools::psql_command;
use branchgate_e2e::tp_session::Session;
use branchgate_e2e::{
    psycopg_query, BranchSpec, Conninfo, EtcdServer, SslNegotiation, ADMIN_PASSWORD, ADMIN_USER,
};
use tempfile::TempDir;
use tokio_postgres::error::SqlState;

/// How long a change may take to reach the router, or the router to notice etcd.
const EVENT_TIMEOUT: Duration = Duration::from_secs(20);
const PASSWORD_RESET_MESSAGE: &str = "terminating connection because the role's password was reset";

// ---------------------------------------------------------------------------------------------
// Shared fixture and helpers

fn fixture() -> &'static FleetFixture {
    fleet_fixture()
}

/// Creates `role` on the fixture server and returns its SCRAM verifier.
fn server_role(role: &str, password: &str) -> String {
    fixture().server_role(role, password)
}

/// A directory with router.toml naming the catalog at `url` (and an admin endpoint).
fn config_dir(url: &str) -> TempDir {
    let dir = tempfile::Builder::new()
        .prefix("bg-etcd-router-")
        .tempdir()
        .expect("create temp dir");
    std::fs::write(
        dir.path().join("router.toml"),
        router_config(url, router_toml(&fixture().certs, "catalog.toml")),
    )
    .expect("write router.toml");
    dir
}

/// router.toml's text with its catalog in etcd at `url`, and `/metrics` on a free port.
fn router_config(url: &str, text: String) -> String {
    text.replace(
        "catalog = \"catalog.toml\"",
        &format!("catalog = {}", toml_string(url)),
    )
    .replace("[listen]\n", "[listen]\nadmin = \"127.0.0.1:0\"\n")
}

/// `branchgate run` with its catalog at `url`.
fn spawn_router(dir: &Path, url: &str) -> RouterProcess {
    RouterProcess::spawn_with(dir, &fixture().certs, |text| router_config(url, text))
}

/// `branchgate catalog import` of `branches`; panics unless it succeeds.
fn import(config: &Path, branches: &[BranchSpec], replace: bool) -> String {
    let file = config.with_file_name("import.toml");
    std::fs::write(&file, catalog_toml(branches)).expect("write import file");
    let mut args = vec!["catalog", "import", "--config", utf8(config), utf8(&file)];
    if replace {
        args.push("--replace");
    }
    let (ok, _, stderr) = run(&args);
    assert!(ok, "import failed: {stderr}");
    stderr
}

fn utf8(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}

/// `branchgate <args>`: (success, stdout, stderr).
fn run(args: &[&str]) -> (bool, String, String) {
    let output = branchgate(args);
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The arguments of `branchgate role reset` for `role` on `branch`.
fn reset_args<'a>(config: &'a Path, branch: &'a str, role: &'a str) -> Vec<&'a str> {
    vec![
        "role",
        "reset",
        "--config",
        utf8(config),
        "--branch",
        branch,
        "--role",
        role,
    ]
}

/// The password a `role` command printed.
fn printed_password(stdout: &str, stderr: &str) -> String {
    stdout
        .lines()
        .find_map(|line| line.strip_prefix("password: "))
        .unwrap_or_else(|| panic!("no password printed:\n{stdout}\n{stderr}"))
        .to_owned()
}

/// `SELECT current_user` as `user` through the router (psycopg, direct SSL).
fn login(router: &RouterProcess, user: &str, password: &str) -> Result<String, String> {
    let conninfo = Conninfo::new(router.addr())
        .user(user)
        .password(password)
        .verify_full(&fixture().certs.ca_path(), SslNegotiation::Direct);
    psycopg_query(&conninfo, "SELECT current_user").map_err(|e| format!("{e:?}"))
}

/// Waits until `user` logs in with `password`.
fn wait_for_login(router: &RouterProcess, user: &str, password: &str) {
    wait_for(&format!("{user} to log in"), EVENT_TIMEOUT, || {
        login(router, user, password).ok()
    });
}

/// A tokio-postgres session through the router.
fn open_session(router: &RouterProcess, user: &str, password: &str) -> Session {
    Session::open(
        router.addr(),
        fixture().certs.client_config(),
        user,
        password,
    )
    .unwrap_or_else(|e| panic!("{user} cannot log in: {e}\n{}", router.log()))
}

/// The router's `/metrics` page (its admin address is in its log).
fn scrape(router: &RouterProcess) -> String {
    router.metrics(EVENT_TIMEOUT)
}

/// The value of the sample whose line starts with `series` (name and labels), if any.
fn sample(text: &str, series: &str) -> Option<i64> {
    metrics::series(text, series)
}

const SOURCE_UP: &str = "branchgate_catalog_source_up{source=\"etcd\"}";
const REVISION: &str = "branchgate_catalog_revision{source=\"etcd\"}";

/// A psql session as the admin that holds a row lock on `role` in pg_authid (an `ALTER ROLE`
/// in an open transaction): a `role` command's `ALTER ROLE` waits behind it, deterministically
/// overlapping with whatever the test does meanwhile.
struct RoleRowLock {
    /// The psql process holding the transaction open.
    psql: Child,
    /// Its input: the transaction ends when `ROLLBACK` is written (or it closes).
    stdin: Option<ChildStdin>,
}

impl RoleRowLock {
    fn hold(role: &str) -> RoleRowLock {
        let pg = &fixture().pg;
        let mut command: Command = psql_command();
        let mut psql = command
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &pg.port().to_string(),
                "-U",
                ADMIN_USER,
            ])
            .args(["-d", "postgres"])
            .env("PGPASSWORD", ADMIN_PASSWORD)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start psql");
        let mut stdin = psql.stdin.take().expect("psql stdin");
        writeln!(
            stdin,
            "BEGIN;\nALTER ROLE \"{role}\" PASSWORD 'held-by-the-test';"
        )
        .expect("write to psql");
        stdin.flush().expect("flush psql stdin");
        pg.wait_for_value(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction' \
             AND query LIKE 'ALTER ROLE%held-by-the-test%'",
            "1",
        );
        RoleRowLock {
            psql,
            stdin: Some(stdin),
        }
    }

    /// Waits until another session's `ALTER ROLE` waits for this lock.
    fn wait_for_waiter(&self) {
        fixture().pg.wait_for_value(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
             AND query LIKE 'ALTER ROLE%'",
            "1",
        );
    }

    /// Rolls the transaction back: the waiter goes on.
    fn release(mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = writeln!(stdin, "ROLLBACK;");
        }
        let _ = self.psql.wait();
    }
}

/// `branchgate role reset` started in the background.
fn spawn_reset(config: &Path, branch: &str, role: &str) -> Child {
    Command::new(branchgate_bin())
        .args(reset_args(config, branch, role))
        .env(ADMIN_PASSWORD_ENV, ADMIN_PASSWORD)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn branchgate role reset")
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn a_router_serves_the_etcd_catalog_and_follows_resets_and_new_branches() {
    let etcd = &fixture().etcd;
    let pg_addr = fixture().pg.addr();
    let password = "pscale_pw_etcd_serve1";
    let verifier = server_role("serve1", password);
    let url = etcd.catalog_url("/serve");
    let dir = config_dir(&url);
    let config = dir.path().join("router.toml");
    import(
        &config,
        &[BranchSpec::new("b1", pg_addr).role("serve1", &verifier)],
        false,
    );
    assert_eq!(
        etcd.keys("/serve/"),
        [
            "/serve/catalog/branches/b1",
            "/serve/catalog/roles/b1/serve1"
        ]
    );

    let router = spawn_router(dir.path(), &url);
    assert_eq!(
        login(&router, "serve1.b1", password).as_deref(),
        Ok("serve1")
    );
    let metrics = scrape(&router);
    assert_eq!(sample(&metrics, SOURCE_UP), Some(1), "{metrics}");
    let first_revision = sample(&metrics, REVISION).expect("a revision in /metrics");
    assert!(first_revision > 0, "{metrics}");

    // A role reset through the CLI: written to etcd, seen by the router's watch.
    let mut held = open_session(&router, "serve1.b1", password);
    let (ok, stdout, stderr) = run(&reset_args(&config, "b1", "serve1"));
    assert!(ok, "role reset failed: {stderr}");
    assert!(stderr.contains("written to etcd at revision"), "{stderr}");
    let new_password = printed_password(&stdout, &stderr);
    wait_for_login(&router, "serve1.b1", &new_password);
    let error = Session::open(
        router.addr(),
        fixture().certs.client_config(),
        "serve1.b1",
        password,
    )
    .err()
    .expect("the old password no longer works");
    assert_db_error(
        &error,
        &SqlState::INVALID_PASSWORD,
        "password authentication failed",
    );
    // The same end as a file reload gives the role's open sessions.
    let error = held.ended_by_server();
    assert_db_error(&error, &SqlState::ADMIN_SHUTDOWN, PASSWORD_RESET_MESSAGE);
    router.wait_for_log(
        &["catalog reloaded", "trigger=\"etcd watch\""],
        EVENT_TIMEOUT,
    );
    let after = sample(&scrape(&router), REVISION).expect("revision");
    assert!(after > first_revision, "{after} <= {first_revision}");

    // A branch written with etcdctl (a document and a role key) becomes reachable.
    let password2 = "pscale_pw_etcd_serve2";
    let verifier2 = server_role("serve2", password2);
    etcd.put(
        "/serve/catalog/branches/b2",
        &format!("primary = {}\n", toml_string(&pg_addr.to_string())),
    );
    etcd.put("/serve/catalog/roles/b2/serve2", &verifier2);
    wait_for_login(&router, "serve2.b2", password2);
    assert_eq!(
        login(&router, "serve1.b1", &new_password).as_deref(),
        Ok("serve1")
    );

    // check-config reads the catalog from etcd.
    let (ok, stdout, stderr) = run(&["check-config", utf8(&config)]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("2 branches"), "{stdout}");
}

#[test]
fn the_guard_refuses_an_etcd_change_that_removes_every_branch() {
    let etcd = &fixture().etcd;
    let password = "pscale_pw_etcd_guard1";
    let verifier = server_role("guard1", password);
    let url = etcd.catalog_url("/guard");
    let dir = config_dir(&url);
    let config = dir.path().join("router.toml");
    let branches: Vec<BranchSpec> = ["b1", "b2"]
        .into_iter()
        .map(|id| BranchSpec::new(id, fixture().pg.addr()).role("guard1", &verifier))
        .collect();
    import(&config, &branches, false);
    let router = spawn_router(dir.path(), &url);
    let mut held = open_session(&router, "guard1.b1", password);

    etcd.etcdctl_ok(&["del", "--prefix", "/guard/catalog/"]);
    let line = router.wait_for_log(
        &[
            "catalog reload refused",
            "trigger=\"etcd watch\"",
            "removes every branch (2 of 2)",
        ],
        EVENT_TIMEOUT,
    );
    assert!(line.contains("ERROR"), "{line}");
    assert_eq!(
        held.value("SELECT current_user").expect("held session"),
        "guard1"
    );
    assert_eq!(
        login(&router, "guard1.b2", password).as_deref(),
        Ok("guard1")
    );

    // The operator means it: `reload --force` applies the newest state the router has seen.
    let (ok, stdout, stderr) = run(&["reload", "--config", utf8(&config), "--force"]);
    assert!(ok, "reload --force failed: {stderr}");
    assert!(
        stdout.starts_with("reloaded: 0 branches, 0 roles, 2 roles changed or removed; forced"),
        "{stdout}"
    );
    let error = held.ended_by_server();
    assert_db_error(&error, &SqlState::ADMIN_SHUTDOWN, PASSWORD_RESET_MESSAGE);
    assert!(login(&router, "guard1.b1", password).is_err(), "b1 is gone");

    // Put back: applied through the watch.
    import(&config, &branches, false);
    router.wait_for_log(
        &["catalog reloaded", "trigger=\"etcd watch\""],
        EVENT_TIMEOUT,
    );
    wait_for_login(&router, "guard1.b1", password);
}

#[test]
fn with_etcd_stopped_the_router_serves_its_last_catalog_and_resyncs_when_it_is_back() {
    let mut etcd = EtcdServer::start();
    let password = "pscale_pw_etcd_down1";
    let verifier = server_role("down1", password);
    let url = etcd.catalog_url("/down");
    let dir = config_dir(&url);
    let config = dir.path().join("router.toml");
    import(
        &config,
        &[BranchSpec::new("b1", fixture().pg.addr()).role("down1", &verifier)],
        false,
    );
    let router = spawn_router(dir.path(), &url);
    let held = open_session(&router, "down1.b1", password);

    etcd.stop();
    router.wait_for_log(&["etcd is unreachable"], EVENT_TIMEOUT);
    wait_for("/metrics to say the source is down", EVENT_TIMEOUT, || {
        (sample(&scrape(&router), SOURCE_UP) == Some(0)).then_some(())
    });
    // Stale but safe: sessions and new logins go on with the catalog in force.
    assert_eq!(
        held.value("SELECT current_user").expect("held session"),
        "down1"
    );
    assert_eq!(login(&router, "down1.b1", password).as_deref(), Ok("down1"));
    let again = open_session(&router, "down1.b1", password);
    assert_eq!(again.value("SELECT 1").expect("query"), "1");
    // A role command cannot change anything while etcd is down, and says why.
    let (ok, _, stderr) = run(&reset_args(&config, "b1", "down1"));
    assert!(!ok, "role reset succeeded with etcd down");
    assert!(stderr.contains("etcd at"), "{stderr}");
    // Let the follower retry a few times (up to its backoff ceiling), for the "once" below.
    std::thread::sleep(Duration::from_secs(3));

    etcd.start_again();
    router.wait_for_log(&["etcd answers again"], EVENT_TIMEOUT);
    let (ok, stdout, stderr) = run(&reset_args(&config, "b1", "down1"));
    assert!(ok, "role reset after etcd came back: {stderr}");
    let new_password = printed_password(&stdout, &stderr);
    wait_for_login(&router, "down1.b1", &new_password);
    assert_eq!(sample(&scrape(&router), SOURCE_UP), Some(1));
    let outages = router.log_lines(&["etcd is unreachable"]);
    assert_eq!(
        outages.len(),
        1,
        "logged once per outage:\n{}",
        router.log()
    );
}

#[test]
fn import_and_export_round_trip_and_import_does_not_clobber() {
    let etcd = &fixture().etcd;
    let url = etcd.catalog_url("/io");
    let dir = config_dir(&url);
    let config = dir.path().join("router.toml");
    let verifier = server_role("io1", "pscale_pw_etcd_io1");
    let replica: SocketAddr = "127.0.0.1:1".parse().expect("addr");
    let branches = vec![
        BranchSpec::new("b1", fixture().pg.addr())
            .replica(replica)
            .role("io1", &verifier)
            .role("my.dotted/role", &verifier),
        BranchSpec::new("b2", fixture().pg.addr())
            .role("io1", &verifier)
            .pool("pool_size = 3\nserver_lifetime = \"90s\"\n"),
    ];
    let text = catalog_toml(&branches);
    let stderr = import(&config, &branches, false);
    assert!(stderr.contains("keys written"), "{stderr}");

    let (ok, exported, stderr) = run(&["catalog", "export", "--config", utf8(&config)]);
    assert!(ok, "export failed: {stderr}");
    let original = branchgate::catalog::Catalog::parse(&text, "original.toml").expect("original");
    let round = branchgate::catalog::Catalog::parse(&exported, "exported.toml")
        .unwrap_or_else(|e| panic!("{e}\n{exported}"));
    assert_same_catalog(&original, &round);

    // A second import would clobber the catalog: refused, nothing written.
    let file = dir.path().join("other.toml");
    std::fs::write(&file, catalog_toml(&branches[..1])).expect("write");
    let (ok, _, stderr) = run(&["catalog", "import", "--config", utf8(&config), utf8(&file)]);
    assert!(!ok, "import over a catalog succeeded");
    assert!(stderr.contains("already holds a catalog"), "{stderr}");
    assert!(stderr.contains("--replace"), "{stderr}");
    // An invalid file is refused before anything is written.
    std::fs::write(
        &file,
        "[[branch]]\nid = \"B!\"\nprimary = \"127.0.0.1:1\"\n",
    )
    .expect("write");
    let (ok, _, stderr) = run(&[
        "catalog",
        "import",
        "--config",
        utf8(&config),
        utf8(&file),
        "--replace",
    ]);
    assert!(!ok);
    assert!(stderr.contains("branch id \"B!\" must be"), "{stderr}");
    assert_eq!(etcd.keys("/io/catalog/").len(), 5, "nothing was written");

    // --replace: b2 and its role go, b1 keeps its keys.
    import(&config, &branches[..1], true);
    assert_eq!(
        etcd.keys("/io/catalog/"),
        [
            "/io/catalog/branches/b1",
            "/io/catalog/roles/b1/io1",
            "/io/catalog/roles/b1/my.dotted/role",
        ]
    );
    let (ok, exported, _) = run(&["catalog", "export", "--config", utf8(&config)]);
    assert!(ok);
    let expected = branchgate::catalog::Catalog::parse(&catalog_toml(&branches[..1]), "b1.toml")
        .expect("b1 only");
    let round = branchgate::catalog::Catalog::parse(&exported, "exported.toml").expect("export");
    assert_same_catalog(&expected, &round);
}

#[test]
fn two_concurrent_resets_of_one_role_one_wins_and_the_other_changes_nothing() {
    let etcd = &fixture().etcd;
    let password = "pscale_pw_etcd_race1";
    let verifier = server_role("race1", password);
    let url = etcd.catalog_url("/race");
    let dir = config_dir(&url);
    let config = dir.path().join("router.toml");
    import(
        &config,
        &[BranchSpec::new("b1", fixture().pg.addr()).role("race1", &verifier)],
        false,
    );
    let role_key = "/race/catalog/roles/b1/race1";
    let router = spawn_router(dir.path(), &url);

    // A holds the role's lock in etcd and waits for its ALTER ROLE; B comes meanwhile.
    let row_lock = RoleRowLock::hold("race1");
    let first = spawn_reset(&config, "b1", "race1");
    row_lock.wait_for_waiter();
    let (ok, stdout, stderr) = run(&reset_args(&config, "b1", "race1"));
    assert!(!ok, "the second reset succeeded:\n{stdout}");
    assert!(
        stderr.contains("another `branchgate role` command is changing this role right now"),
        "{stderr}"
    );
    assert!(stderr.contains("nothing was changed"), "{stderr}");
    assert!(!stdout.contains("password:"), "{stdout}");
    assert_eq!(etcd.get(role_key).as_deref(), Some(verifier.as_str()));
    row_lock.release();
    let output = first.wait_with_output().expect("first reset");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(output.status.success(), "the first reset failed: {stderr}");
    let winner = printed_password(&stdout, &stderr);
    wait_for_login(&router, "race1.b1", &winner);
    // Server and catalog agree: the winner's verifier in both.
    let in_etcd = etcd.get(role_key).expect("role key");
    assert_eq!(fixture().pg.role_verifier("race1"), in_etcd);

    // A writer that takes no lock (etcdctl here; an import, say) changes the role while a
    // reset waits for its ALTER ROLE: the reset's guarded write fails, the other change stands,
    // and the server gets the catalog's verifier back.
    let other_password = "pscale_pw_etcd_race1_other";
    let other = server_role("race1_other", other_password);
    let row_lock = RoleRowLock::hold("race1");
    let late = spawn_reset(&config, "b1", "race1");
    row_lock.wait_for_waiter();
    etcd.put(role_key, &other);
    row_lock.release();
    let output = late.wait_with_output().expect("late reset");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "the late reset succeeded: {stderr}"
    );
    assert!(
        stderr.contains("was changed in etcd by someone else while this command ran"),
        "{stderr}"
    );
    assert!(stderr.contains("no update is lost"), "{stderr}");
    assert!(
        stderr.contains("the server was given back the catalog's password"),
        "{stderr}"
    );
    assert_eq!(etcd.get(role_key).as_deref(), Some(other.as_str()));
    assert_eq!(fixture().pg.role_verifier("race1"), other);
    // The other change works end to end: router and server both have it.
    wait_for_login(&router, "race1.b1", other_password);
}

/// Same branches, addresses, verifiers and pool settings.
fn assert_same_catalog(a: &branchgate::catalog::Catalog, b: &branchgate::catalog::Catalog) {
    let ids = |c: &branchgate::catalog::Catalog| {
        c.branches().map(|b| b.id.to_string()).collect::<Vec<_>>()
    };
    assert_eq!(ids(a), ids(b));
    assert!(a.changed_roles(b).is_empty() && b.changed_roles(a).is_empty());
    assert!(a.changed_pools(b).is_empty());
    for branch in a.branches() {
        let other = b.branch(&branch.id).expect("same ids");
        assert_eq!(branch.primary, other.primary);
        assert_eq!(branch.replicas, other.replicas);
        assert_eq!(branch.roles().count(), other.roles().count());
    }
}
