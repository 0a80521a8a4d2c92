//! The test harness itself: real servers, replication, roles, the psycopg venv, certificates.

use std::process::Command;

use branchgate_e2e::pg::SCRAM_VERIFIER_PREFIX;
use branchgate_e2e::{psycopg_query, run_python, Certs, Conninfo, PgServer, ADMIN_PASSWORD};

#[test]
fn primary_and_replica_replicate() {
    let primary = PgServer::start_primary();
    let replica = PgServer::start_replica(&primary);
    assert_ne!(primary.port(), replica.port());
    assert_eq!(primary.psql_admin("SELECT pg_is_in_recovery()"), "f");
    assert_eq!(replica.psql_admin("SELECT pg_is_in_recovery()"), "t");

    primary.psql_admin("CREATE TABLE smoke (id int PRIMARY KEY, note text)");
    primary.psql_admin("INSERT INTO smoke VALUES (1, 'from the primary')");
    replica.wait_for_value("SELECT note FROM smoke WHERE id = 1", "from the primary");
    let err = replica
        .try_psql_admin_in("postgres", "INSERT INTO smoke VALUES (2, 'no')")
        .expect_err("a hot standby is read-only");
    assert!(err.contains("read-only transaction"), "{err}");
}

#[test]
fn roles_get_scram_verifiers_and_tcp_uses_scram() {
    let pg = PgServer::start_primary();
    pg.create_role("app", "pscale_pw_smoke");
    let verifier = pg.role_verifier("app");
    assert!(verifier.starts_with(SCRAM_VERIFIER_PREFIX), "{verifier}");
    assert_eq!(verifier.matches('$').count(), 2, "{verifier}");

    let app = Conninfo::new(pg.addr())
        .user("app")
        .password("pscale_pw_smoke")
        .no_tls();
    let who = psycopg_query(&app, "SELECT current_user").expect("app logs in");
    assert_eq!(who, "app");
    let admin = Conninfo::new(pg.addr())
        .user("postgres")
        .password(ADMIN_PASSWORD)
        .no_tls();
    let rows = psycopg_query(&admin, "SELECT 1, NULL").expect("admin logs in");
    assert_eq!(rows, "1|");

    let bad = app.clone().password("wrong");
    let err = psycopg_query(&bad, "SELECT 1").expect_err("wrong password");
    assert!(
        err.message.contains("password authentication failed"),
        "{err:?}"
    );
    let err = psycopg_query(&app, "SELECT 1/0").expect_err("division by zero");
    assert_eq!(err.sqlstate.as_deref(), Some("22012"), "{err:?}");
}

#[test]
fn stop_and_start_again_keep_the_port_and_data() {
    let mut pg = PgServer::start_primary();
    let port = pg.port();
    pg.psql_admin("CREATE TABLE kept (x int); INSERT INTO kept VALUES (42)");
    pg.stop();
    assert!(!pg.is_running());
    assert!(pg.try_psql_admin_in("postgres", "SELECT 1").is_err());
    pg.start_again();
    assert!(pg.is_running());
    assert_eq!(pg.port(), port);
    assert_eq!(pg.psql_admin("SELECT x FROM kept"), "42");
}

#[test]
fn replica_promotes() {
    let primary = PgServer::start_primary();
    let replica = PgServer::start_replica(&primary);
    drop(primary);
    replica.promote();
    replica.psql_admin("CREATE TABLE after_promotion (x int)");
}

#[test]
fn venv_psycopg_has_libpq_17_or_newer() {
    let version: u32 = run_python("import psycopg; print(psycopg.pq.version())", &[])
        .trim()
        .parse()
        .expect("libpq version is a number");
    assert!(
        version >= 170_000,
        "psycopg's libpq is {version}; sslnegotiation=direct needs 17+"
    );
}

#[test]
fn certs_verify_with_openssl() {
    let certs = Certs::generate();
    for check in [
        ["-verify_hostname", "localhost"],
        ["-verify_ip", "127.0.0.1"],
    ] {
        let output = Command::new("openssl")
            .arg("verify")
            .arg("-CAfile")
            .arg(certs.ca_path())
            .args(check)
            .arg(certs.cert_path())
            .output()
            .expect("run openssl");
        assert!(
            output.status.success(),
            "openssl verify {check:?}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let output = Command::new("openssl")
        .args(["pkey", "-noout", "-text", "-in"])
        .arg(certs.key_path())
        .output()
        .expect("run openssl pkey");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("prime256v1") || text.contains("P-256"),
        "{text}"
    );
}
