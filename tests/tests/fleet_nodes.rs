//! Routers as nodes of a fleet, end to end: a real etcd, a real PostgreSQL and several real
//! `branchgate run` processes sharing one etcd catalog.
//!
//! Nodes register under `<prefix>/nodes/` and see each other (`/metrics`, `branchgate nodes`);
//! a node id kept in `node-id` survives a restart; a second live router with a taken id does not
//! start; `branchgate role reset` returns only once every live node acknowledged the change (the
//! new password works on each the moment it returns); a node killed with SIGKILL leaves the live
//! set when its lease expires and blocks no later reset; per-branch pool limits are divided
//! between the live nodes and grow back when a node leaves.
//!
//! Leases live 2 s here (`[node] lease_ttl`), so a killed node leaves quickly.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use branchgate_e2e::binary::{branchgate, branchgate_bin, wait_for, RouterProcess};
use branchgate_e2e::catalog::{catalog_toml, router_toml, toml_string};
use branchgate_e2e::etcd::{fleet_fixture, FleetFixture};
use branchgate_e2e::metrics;
use branchgate_e2e::tp_session::Session;
use branchgate_e2e::{psycopg_query, BranchSpec, Conninfo, SslNegotiation};
use tempfile::TempDir;
use tokio_postgres::error::SqlState;

/// How long a change may take to reach a router (a lease to expire, a watch to fire).
const EVENT_TIMEOUT: Duration = Duration::from_secs(20);
/// `[node] lease_ttl` in these tests: the shortest etcd grants.
const LEASE_TTL: &str = "2s";

fn fixture() -> &'static FleetFixture {
    fleet_fixture()
}

/// Creates `role` on the fixture server and returns its SCRAM verifier.
fn server_role(role: &str, password: &str) -> String {
    fixture().server_role(role, password)
}

/// router.toml's text: the catalog at `url`, `/metrics` on a free port, `[node]` with a short
/// lease (and `id`, if given), then `extra` (more tables).
fn router_config(url: &str, id: Option<&str>, extra: &str, text: String) -> String {
    let mut text = text
        .replace(
            "catalog = \"catalog.toml\"",
            &format!("catalog = {}", toml_string(url)),
        )
        .replace("[listen]\n", "[listen]\nadmin = \"127.0.0.1:0\"\n");
    text.push_str(&format!("\n[node]\nlease_ttl = \"{LEASE_TTL}\"\n"));
    if let Some(id) = id {
        text.push_str(&format!("id = {}\n", toml_string(id)));
    }
    text.push_str(extra);
    text
}

fn temp_dir() -> TempDir {
    tempfile::Builder::new()
        .prefix("bg-fleet-")
        .tempdir()
        .expect("create temp dir")
}

/// `branchgate run` in `dir` with its catalog at `url`.
fn spawn_node(dir: &Path, url: &str, id: Option<&str>, extra: &str) -> RouterProcess {
    RouterProcess::spawn_with(dir, &fixture().certs, |text| {
        router_config(url, id, extra, text)
    })
}

/// `branchgate catalog import` of `branches` through the configuration in `dir`.
fn import(dir: &Path, url: &str, branches: &[BranchSpec]) {
    let config = dir.join("import-router.toml");
    std::fs::write(
        &config,
        router_config(url, None, "", router_toml(&fixture().certs, "catalog.toml")),
    )
    .expect("write router.toml");
    let file = dir.join("import.toml");
    std::fs::write(&file, catalog_toml(branches)).expect("write import file");
    let (ok, _, stderr) = run(&["catalog", "import", "--config", utf8(&config), utf8(&file)]);
    assert!(ok, "import failed: {stderr}");
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

/// `branchgate role reset` of `role` on `branch` through `router`'s configuration; panics
/// unless it succeeds. (stderr, the new password)
fn reset(router: &RouterProcess, branch: &str, role: &str) -> (String, String) {
    let (ok, stdout, stderr) = run(&[
        "role",
        "reset",
        "--config",
        utf8(router.config()),
        "--branch",
        branch,
        "--role",
        role,
    ]);
    assert!(ok, "role reset failed: {stderr}");
    let password = stdout
        .lines()
        .find_map(|line| line.strip_prefix("password: "))
        .unwrap_or_else(|| panic!("no password printed:\n{stdout}\n{stderr}"))
        .to_owned();
    (stderr, password)
}

/// `SELECT current_user` as `user` through the router's direct port (psycopg, direct SSL).
fn login(router: &RouterProcess, user: &str, password: &str) -> Result<String, String> {
    let conninfo = Conninfo::new(router.addr())
        .user(user)
        .password(password)
        .verify_full(&fixture().certs.ca_path(), SslNegotiation::Direct);
    psycopg_query(&conninfo, "SELECT current_user").map_err(|e| format!("{e:?}"))
}

/// A session on the router's pooled port.
fn pooled_session(
    router: &RouterProcess,
    user: &str,
    password: &str,
) -> Result<Session, tokio_postgres::Error> {
    Session::open(
        router.pooled_addr(),
        fixture().certs.client_config(),
        user,
        password,
    )
}

/// The router's `/metrics` page (its admin address is in its log).
fn scrape(router: &RouterProcess) -> String {
    router.metrics(EVENT_TIMEOUT)
}

/// The value of the sample whose line starts with `series` (name and labels), if any.
fn sample(text: &str, series: &str) -> Option<i64> {
    metrics::series(text, series)
}

const FLEET_NODES: &str = "branchgate_fleet_nodes ";

/// Waits until `router` sees `n` live nodes.
fn wait_for_nodes(router: &RouterProcess, n: i64) {
    wait_for(
        &format!("{} to see {n} live nodes", router.config().display()),
        EVENT_TIMEOUT,
        || (sample(&scrape(router), FLEET_NODES) == Some(n)).then_some(()),
    );
}

/// The ids registered under `<prefix>/nodes/`.
fn registered(prefix: &str) -> Vec<String> {
    let nodes = format!("{prefix}/nodes/");
    fixture()
        .etcd
        .keys(&nodes)
        .into_iter()
        .filter_map(|key| key.strip_prefix(&nodes).map(str::to_owned))
        .collect()
}

#[test]
fn nodes_register_acknowledge_resets_and_a_killed_node_leaves_after_its_lease() {
    let prefix = "/fleet-acks";
    let url = fixture().etcd.catalog_url(prefix);
    let password = "pscale_pw_fleet_ack1";
    let verifier = server_role("ack1", password);
    let dir_a = temp_dir();
    let dir_b = temp_dir();
    import(
        dir_a.path(),
        &url,
        &[BranchSpec::new("b1", fixture().pg.addr()).role("ack1", &verifier)],
    );
    let a = spawn_node(dir_a.path(), &url, Some("node-a"), "");
    let mut b = spawn_node(dir_b.path(), &url, Some("node-b"), "");
    wait_for_nodes(&a, 2);
    wait_for_nodes(&b, 2);
    assert_eq!(registered(prefix), ["node-a", "node-b"]);
    let entry = fixture()
        .etcd
        .get(&format!("{prefix}/nodes/node-a"))
        .expect("node-a's entry");
    assert!(
        entry.contains("\"id\":\"node-a\"") && entry.contains("\"started_at\":"),
        "{entry}"
    );
    let (ok, stdout, stderr) = run(&["nodes", "--config", utf8(a.config())]);
    assert!(ok, "branchgate nodes: {stderr}");
    assert!(
        stdout.contains("2 live nodes") && stdout.contains("node-a (this node)"),
        "{stdout}"
    );
    assert!(stdout.contains("node-b"), "{stdout}");

    // The reset returns once both nodes acknowledged it: the new password works on each at
    // once, the old one on neither.
    let (stderr, new_password) = reset(&a, "b1", "ack1");
    assert!(
        stderr.contains("every live router has it in force (2 nodes)"),
        "{stderr}"
    );
    for router in [&a, &b] {
        assert_eq!(
            login(router, "ack1.b1", &new_password).as_deref(),
            Ok("ack1"),
            "{}",
            router.log()
        );
        assert!(login(router, "ack1.b1", password).is_err());
    }
    let ack = fixture()
        .etcd
        .get(&format!("{prefix}/acks/node-b"))
        .expect("node-b's acknowledgement");
    assert!(ack.starts_with("{\"revision\":"), "{ack}");

    // SIGKILL: no goodbye; the node leaves once its lease expires.
    b.signal(libc::SIGKILL);
    b.wait_exit(EVENT_TIMEOUT);
    wait_for_nodes(&a, 1);
    assert_eq!(registered(prefix), ["node-a"]);
    assert_eq!(
        fixture().etcd.get(&format!("{prefix}/acks/node-b")),
        None,
        "acknowledgements live on the lease too"
    );
    let (stderr, newer_password) = reset(&a, "b1", "ack1");
    assert!(
        stderr.contains("every live router has it in force (1 node)"),
        "{stderr}"
    );
    assert_eq!(login(&a, "ack1.b1", &newer_password).as_deref(), Ok("ack1"));
}

#[test]
fn a_node_id_survives_a_restart_and_a_taken_id_is_refused() {
    let prefix = "/fleet-ids";
    let url = fixture().etcd.catalog_url(prefix);
    let verifier = server_role("ids1", "pscale_pw_fleet_ids1");
    let dir = temp_dir();
    import(
        dir.path(),
        &url,
        &[BranchSpec::new("b1", fixture().pg.addr()).role("ids1", &verifier)],
    );
    let mut first = spawn_node(dir.path(), &url, None, "");
    let id_file = dir.path().join("node-id");
    let id = std::fs::read_to_string(&id_file)
        .expect("node-id written beside router.toml")
        .trim()
        .to_owned();
    assert!(id.starts_with("node-"), "{id}");
    wait_for("the node's entry", EVENT_TIMEOUT, || {
        (registered(prefix) == [id.clone()]).then_some(())
    });

    // A second router claiming the same id while the first is live does not start.
    let other = temp_dir();
    let config = other.path().join("router.toml");
    std::fs::write(
        &config,
        router_config(
            &url,
            Some(&id),
            "",
            router_toml(&fixture().certs, "catalog.toml"),
        ),
    )
    .expect("write router.toml");
    let mut duplicate = Command::new(branchgate_bin())
        .args(["run", "--config", utf8(&config)])
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn branchgate run");
    let status = wait_for("the duplicate to exit", EVENT_TIMEOUT, || {
        duplicate.try_wait().expect("try_wait")
    });
    let output = duplicate.wait_with_output().expect("its stderr");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!status.success(), "the duplicate ran: {stderr}");
    assert!(
        stderr.contains(&format!("node id \"{id}\" is taken")),
        "{stderr}"
    );
    assert_eq!(
        registered(prefix),
        std::slice::from_ref(&id),
        "the first keeps its entry"
    );

    // A clean shutdown leaves at once; a restart comes back with the same id.
    first.signal(libc::SIGTERM);
    first.wait_exit(EVENT_TIMEOUT);
    assert!(
        registered(prefix).is_empty(),
        "the lease is revoked on shutdown"
    );
    let again = spawn_node(dir.path(), &url, None, "");
    wait_for("the node's entry again", EVENT_TIMEOUT, || {
        (registered(prefix) == [id.clone()]).then_some(())
    });
    assert!(
        again.log().contains(&format!("node={id}")),
        "{}",
        again.log()
    );
}

#[test]
fn branch_pool_limits_are_split_between_live_nodes() {
    let prefix = "/fleet-split";
    let url = fixture().etcd.catalog_url(prefix);
    let password = "pscale_pw_fleet_split1";
    let verifier = server_role("split1", password);
    let dir_a = temp_dir();
    let dir_b = temp_dir();
    import(
        dir_a.path(),
        &url,
        &[BranchSpec::new("b1", fixture().pg.addr()).role("split1", &verifier)],
    );
    let pool = "\n[pool]\npool_size = 4\nmin_pool_size = 4\nmax_client_connections = 4\n";
    let a = spawn_node(dir_a.path(), &url, Some("split-a"), pool);
    let mut b = spawn_node(dir_b.path(), &url, Some("split-b"), pool);
    wait_for_nodes(&a, 2);
    let metrics = scrape(&a);
    assert_eq!(
        sample(&metrics, "branchgate_branch_pool_size{branch=\"b1\"}"),
        Some(2),
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "branchgate_branch_max_client_connections{branch=\"b1\"}"
        ),
        Some(2),
        "{metrics}"
    );

    // Two pooled clients on this node, not three; the pool keeps its share of backends.
    let first = pooled_session(&a, "split1.b1", password).expect("first client");
    let second = pooled_session(&a, "split1.b1", password).expect("second client");
    let refused = pooled_session(&a, "split1.b1", password)
        .err()
        .expect("a third client is over this node's share");
    let code = refused.as_db_error().map(|e| e.code().clone());
    assert_eq!(code, Some(SqlState::TOO_MANY_CONNECTIONS), "{refused}");
    assert_eq!(first.value("SELECT 1").expect("query"), "1");
    let backends = "SELECT count(*) FROM pg_stat_activity WHERE usename = 'split1'";
    fixture().pg.wait_for_value(backends, "2");

    // The other node leaves: this one has the whole branch again.
    b.signal(libc::SIGTERM);
    b.wait_exit(EVENT_TIMEOUT);
    wait_for_nodes(&a, 1);
    let metrics = scrape(&a);
    assert_eq!(
        sample(&metrics, "branchgate_branch_pool_size{branch=\"b1\"}"),
        Some(4),
        "{metrics}"
    );
    let third = pooled_session(&a, "split1.b1", password).expect("a third client now");
    assert_eq!(third.value("SELECT 1").expect("query"), "1");
    fixture().pg.wait_for_value(backends, "4");
    assert_eq!(second.value("SELECT 2").expect("query"), "2");
}
