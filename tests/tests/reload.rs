//! Catalog reloads that would tear everything down, and the control socket: an emptied or
//! truncated catalog is refused on every reload path (file watch, SIGHUP, `branchgate reload`,
//! the library) while sessions and logins go on; `branchgate reload --force` applies it;
//! `check-config` warns; `branchgate role reset` returns only once the router has the new
//! password.
//!
//! One PostgreSQL primary and one set of certificates serve the whole binary; each test runs its
//! own router (mostly the real binary, whose log it reads) in its own directory.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use branchgate::catalog::Refusal;
use branchgate::router::ReloadError;
use branchgate::StartError;
use branchgate_e2e::binary::{branchgate, RouterProcess};
use branchgate_e2e::catalog::{catalog_toml, router_toml};
use branchgate_e2e::tokio_tls::assert_db_error;
use branchgate_e2e::tp_session::Session;
use branchgate_e2e::{psycopg_query, BranchSpec, Certs, Conninfo, PgServer, SslNegotiation};
use tempfile::TempDir;
use tokio_postgres::error::SqlState;

/// How long a router-side event (a reload, a log line, a FATAL) may take to show.
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Password resets in a row in the role test: the race it guards against lost most rounds.
const RESET_ROUNDS: usize = 3;
const PASSWORD_RESET_MESSAGE: &str = "terminating connection because the role's password was reset";
/// What the router logs when the guard refuses a catalog.
const REFUSED: &str = "catalog reload refused";

// ---------------------------------------------------------------------------------------------
// Shared fixture and helpers

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

/// Branches `b1`, `b2`, `b3` on the fixture server, each with `role`.
fn three_branches(role: &str, verifier: &str) -> Vec<BranchSpec> {
    ["b1", "b2", "b3"]
        .into_iter()
        .map(|id| BranchSpec::new(id, fixture().pg.addr()).role(role, verifier))
        .collect()
}

/// `text` cut just before branch `b2`: a file that still parses, with only `b1` left.
fn truncated_before_b2(text: &str) -> &str {
    let cut = text
        .find("[[branch]]\nid = \"b2\"")
        .expect("the catalog has b2");
    &text[..cut]
}

/// A fresh directory for a router, with `catalog` as its catalog.toml.
fn router_dir(catalog: &str) -> TempDir {
    let dir = tempfile::Builder::new()
        .prefix("bg-reload-")
        .tempdir()
        .expect("create temp dir");
    write_atomically(&dir.path().join("catalog.toml"), catalog);
    dir
}

/// Writes `text` to `path` through a rename, as a deploy would: the file watch sees a whole
/// file, and only once.
fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text).expect("write temp file");
    fs::rename(&tmp, path).expect("rename into place");
}

/// A tokio-postgres session through the router, verified against the fixture's CA.
fn open_session(
    router: &RouterProcess,
    user: &str,
    password: &str,
) -> Result<Session, tokio_postgres::Error> {
    Session::open(
        router.addr(),
        fixture().certs.client_config(),
        user,
        password,
    )
}

/// `SELECT current_user` through the router with psycopg over direct SSL (a second client
/// library, and a fresh process).
fn psycopg_user(router: &RouterProcess, user: &str, password: &str) -> String {
    let conninfo = Conninfo::new(router.addr())
        .user(user)
        .password(password)
        .verify_full(&fixture().certs.ca_path(), SslNegotiation::Direct);
    psycopg_query(&conninfo, "SELECT current_user")
        .unwrap_or_else(|e| panic!("{user} cannot log in: {e:?}\n{}", router.log()))
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

/// Runs `branchgate role reset` and returns (success, the printed password, stderr).
fn role_reset(config: &Path, branch: &str, role: &str) -> (bool, String, String) {
    let (ok, stdout, stderr) = run(&[
        "role",
        "reset",
        "--config",
        utf8(config),
        "--branch",
        branch,
        "--role",
        role,
    ]);
    let password = stdout
        .lines()
        .find_map(|line| line.strip_prefix("password: "))
        .unwrap_or_else(|| panic!("no password printed:\n{stdout}\n{stderr}"))
        .to_owned();
    assert!(password.starts_with("pscale_pw_"), "{stdout}");
    (ok, password, stderr)
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn an_emptied_catalog_is_refused_on_every_path_while_sessions_and_logins_go_on() {
    let password = "pscale_pw_empty1";
    let verifier = server_role("empty1", password);
    let dir = router_dir(&catalog_toml(&three_branches("empty1", &verifier)));
    let router = RouterProcess::spawn(dir.path(), &fixture().certs);
    let config = utf8(router.config());
    let held = open_session(&router, "empty1.b2", password).expect("empty1.b2 logs in");

    // A deploy that emptied the file: the file watch refuses it.
    write_atomically(&dir.path().join("catalog.toml"), "");
    let every_branch = "removes every branch (3 of 3)";
    let line = router.wait_for_log(
        &[REFUSED, "trigger=\"file watch\"", every_branch],
        EVENT_TIMEOUT,
    );
    assert!(line.contains("ERROR"), "{line}");
    assert!(line.contains("branchgate reload --force"), "{line}");

    router.signal(libc::SIGHUP);
    router.wait_for_log(
        &[REFUSED, "trigger=\"SIGHUP\"", every_branch],
        EVENT_TIMEOUT,
    );

    let (ok, stdout, stderr) = run(&["reload", "--config", config]);
    assert!(!ok, "an emptied catalog was applied:\n{stdout}");
    assert!(
        stderr.contains(&format!(
            "the router refused the catalog: it {every_branch}"
        )),
        "{stderr}"
    );
    router.wait_for_log(
        &[REFUSED, "trigger=\"control socket\"", every_branch],
        EVENT_TIMEOUT,
    );

    let (ok, stdout, stderr) = run(&["check-config", config]);
    assert!(ok, "check-config failed: {stdout}\n{stderr}");
    assert!(stderr.contains("has no branches"), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "the running router would refuse to reload this catalog: it {every_branch}"
        )),
        "{stderr}"
    );

    // Nothing changed for clients: the held session works, new logins too.
    assert_eq!(
        held.value("SELECT current_user").expect("held session"),
        "empty1"
    );
    let again = open_session(&router, "empty1.b2", password).expect("a new login on b2");
    assert_eq!(again.value("SELECT 1").expect("query"), "1");
    assert_eq!(psycopg_user(&router, "empty1.b3", password), "empty1");

    // The file watch read that file once and has not logged it again since (it looked at it
    // every 0.5 s while the commands above ran).
    let watch_refusals = router.log_lines(&[REFUSED, "trigger=\"file watch\""]);
    assert_eq!(watch_refusals.len(), 1, "{}", router.log());
}

#[test]
fn a_truncated_catalog_is_refused_until_reload_force_applies_it() {
    let password = "pscale_pw_trunc1";
    let verifier = server_role("trunc1", password);
    let full = catalog_toml(&three_branches("trunc1", &verifier));
    let dir = router_dir(&full);
    let router = RouterProcess::spawn(dir.path(), &fixture().certs);
    let config = utf8(router.config());
    let mut held = open_session(&router, "trunc1.b2", password).expect("trunc1.b2 logs in");

    // Cut after the first branch: the file still parses, but two of three branches are gone.
    write_atomically(&dir.path().join("catalog.toml"), truncated_before_b2(&full));
    let two_of_three = "removes 2 of 3 branches (67%, more than 50%)";
    router.wait_for_log(
        &[REFUSED, "trigger=\"file watch\"", two_of_three],
        EVENT_TIMEOUT,
    );
    let (ok, _, stderr) = run(&["reload", "--config", config]);
    assert!(!ok, "a truncated catalog was applied");
    assert!(stderr.contains(two_of_three), "{stderr}");
    let (ok, _, stderr) = run(&["check-config", config]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains(two_of_three), "{stderr}");
    assert_eq!(held.value("SELECT 2").expect("held session"), "2");
    assert_eq!(psycopg_user(&router, "trunc1.b2", password), "trunc1");

    // The operator means it.
    let (ok, stdout, stderr) = run(&["reload", "--config", config, "--force"]);
    assert!(ok, "reload --force failed: {stderr}");
    assert_eq!(
        stdout.trim_end(),
        format!("reloaded: 1 branch, 1 role, 2 roles changed or removed; forced: {two_of_three}")
    );
    router.wait_for_log(
        &["forced past the reload guard", two_of_three],
        EVENT_TIMEOUT,
    );

    let error = held.ended_by_server();
    assert_db_error(&error, &SqlState::ADMIN_SHUTDOWN, PASSWORD_RESET_MESSAGE);
    let error = open_session(&router, "trunc1.b2", password)
        .err()
        .expect("b2 is gone");
    // A branch the catalog lacks fails like a wrong password.
    assert_db_error(
        &error,
        &SqlState::INVALID_PASSWORD,
        "password authentication failed for user \"trunc1\"",
    );
    assert_eq!(psycopg_user(&router, "trunc1.b1", password), "trunc1");
}

#[test]
fn role_reset_returns_once_the_router_has_the_new_password() {
    let mut old_password = "pscale_pw_reset1".to_owned();
    let verifier = server_role("reset1", &old_password);
    let branch = BranchSpec::new("b1", fixture().pg.addr()).role("reset1", &verifier);
    let dir = router_dir(&catalog_toml(&[branch]));
    let router = RouterProcess::spawn(dir.path(), &fixture().certs);

    for round in 0..RESET_ROUNDS {
        let (ok, new_password, stderr) = role_reset(router.config(), "b1", "reset1");
        assert!(ok, "role reset failed: {stderr}");
        // At once, no retry: the command returned only after the router confirmed.
        let session = open_session(&router, "reset1.b1", &new_password).unwrap_or_else(|e| {
            panic!(
                "round {round}: the new password was refused right after `role reset` \
                 returned: {e}\n{stderr}\n{}",
                router.log()
            )
        });
        assert!(
            stderr.contains("the running router has it in force"),
            "{stderr}"
        );
        assert_eq!(
            session.value("SELECT current_user").expect("query"),
            "reset1"
        );
        let error = open_session(&router, "reset1.b1", &old_password)
            .err()
            .expect("the old password no longer works");
        assert_db_error(
            &error,
            &SqlState::INVALID_PASSWORD,
            "password authentication failed",
        );
        old_password = new_password;
    }
    let reloads = router.log_lines(&["catalog reloaded", "trigger=\"control socket\""]);
    assert_eq!(reloads.len(), RESET_ROUNDS, "{}", router.log());
}

#[test]
fn role_reset_fails_loudly_when_the_router_refuses_the_catalog() {
    let password = "pscale_pw_refused1";
    let verifier = server_role("refused1", password);
    let full = catalog_toml(&three_branches("refused1", &verifier));
    let dir = router_dir(&full);
    let router = RouterProcess::spawn(dir.path(), &fixture().certs);
    write_atomically(&dir.path().join("catalog.toml"), truncated_before_b2(&full));
    router.wait_for_log(&[REFUSED, "trigger=\"file watch\""], EVENT_TIMEOUT);

    // The server and the file get the new password; the router refuses the file as a whole.
    let (ok, new_password, stderr) = role_reset(router.config(), "b1", "refused1");
    assert!(
        !ok,
        "role reset succeeded although the router kept its catalog"
    );
    assert!(
        stderr.contains(
            "the role was changed on the server and in the catalog, but the running router did \
             not load it: it refused the catalog file, which removes 2 of 3 branches"
        ),
        "{stderr}"
    );
    assert!(stderr.contains("branchgate reload"), "{stderr}");

    // What the message says to do works, and the printed password is the one in force.
    let (ok, _, stderr) = run(&["reload", "--config", utf8(router.config()), "--force"]);
    assert!(ok, "{stderr}");
    assert_eq!(
        psycopg_user(&router, "refused1.b1", &new_password),
        "refused1"
    );
}

#[test]
fn the_library_reload_is_typed_and_the_control_socket_belongs_to_one_router() {
    let certs = &fixture().certs;
    let verifier = server_role("lib1", "pscale_pw_lib1");
    let dir = router_dir(&catalog_toml(&three_branches("lib1", &verifier)[..2]));
    let text = router_toml(certs, "catalog.toml");
    let config_path = dir.path().join("router.toml");
    fs::write(&config_path, &text).expect("write router.toml");
    let load = || branchgate::config::Config::load(&config_path).expect("router.toml");
    let router = branchgate::start(load()).unwrap_or_else(|e| panic!("router start: {e}"));

    let socket = dir.path().join("branchgate.sock");
    assert_eq!(router.control_socket(), Some(socket.as_path()));
    let mode = fs::metadata(&socket)
        .expect("socket file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the control socket is owner-only");

    match branchgate::start(load()) {
        Err(error @ StartError::ControlSocketInUse(_)) => {
            assert!(
                error.to_string().contains("another router already answers"),
                "{error}"
            )
        }
        Err(other) => panic!("expected ControlSocketInUse, got {other}"),
        Ok(second) => {
            second.shutdown();
            panic!("a second router started on the same control socket");
        }
    }

    // A reload that changes a branch's pool settings only is a change, and closes nothing.
    let mut branches = three_branches("lib1", &verifier)[..2].to_vec();
    branches[1] = branches[1]
        .clone()
        .pool("pool_size = 3\nserver_lifetime = \"0s\"\n");
    write_atomically(&dir.path().join("catalog.toml"), &catalog_toml(&branches));
    let reloaded = router.reload_catalog().expect("pool-only reload");
    assert_eq!((reloaded.changed_pools, reloaded.changed_roles), (1, 0));
    assert_eq!(
        reloaded.to_string(),
        "2 branches, 2 roles, 0 roles changed or removed, 1 branch with new pool settings"
    );

    write_atomically(&dir.path().join("catalog.toml"), "");
    match router.reload_catalog() {
        Err(ReloadError::Refused(refusal)) => assert_eq!(refusal, Refusal::EveryBranch(2)),
        other => panic!("an emptied catalog must be refused, got {other:?}"),
    }
    let reloaded = router.reload_catalog_forced().expect("forced reload");
    assert_eq!(
        (reloaded.branches, reloaded.forced),
        (0, Some(Refusal::EveryBranch(2)))
    );

    router.shutdown();
    assert!(!socket.exists(), "the socket file outlived the router");
}

#[test]
fn check_config_warns_about_unusable_catalogs_and_reload_needs_a_router() {
    let certs = &fixture().certs;
    let dir = router_dir("");
    let config_path = dir.path().join("router.toml");
    fs::write(&config_path, router_toml(certs, "catalog.toml")).expect("write router.toml");
    let config = utf8(&config_path);

    let (ok, stdout, stderr) = run(&["check-config", config]);
    assert!(ok, "a warning must not fail the check: {stderr}");
    assert!(stdout.contains("configuration OK"), "{stdout}");
    assert!(stderr.contains("has no branches"), "{stderr}");

    let no_roles = catalog_toml(&[BranchSpec::new("b1", fixture().pg.addr())]);
    write_atomically(&dir.path().join("catalog.toml"), &no_roles);
    let (ok, _, stderr) = run(&["check-config", config]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("has no roles"), "{stderr}");
    assert!(
        !stderr.contains("running router"),
        "no router runs: {stderr}"
    );

    let (ok, _, stderr) = run(&["reload", "--config", config]);
    assert!(!ok, "reload without a router succeeded");
    assert!(stderr.contains("no router answers on"), "{stderr}");
    assert!(stderr.contains("is `branchgate run` running"), "{stderr}");
}
