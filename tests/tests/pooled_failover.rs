//! The pooled port when a branch's primary goes away or an operator holds it: `branchgate
//! pause`/`resume`, and failover buffering (new transactions wait for the primary to come back,
//! or for the catalog to name a new one, and run once).
//!
//! One primary with a streaming replica serves the failover test, which promotes the replica;
//! the pause test has a primary of its own.

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use branchgate_e2e::binary::branchgate_bin;
use branchgate_e2e::raw::{error_codes, parse_error, query, Mode, RawConn};
use branchgate_e2e::{BranchSpec, Certs, PgServer, PoolSettings, TestRouter};

const PASSWORD: &str = "pscale_pw_pooled_failover_Qx7";
const USER: &str = "app.b1";

fn connect(router: &TestRouter, certs: &Certs) -> RawConn {
    connect_with(router, certs, &[])
}

/// As [`connect`], with startup parameters.
fn connect_with(router: &TestRouter, certs: &Certs, startup: &[(&str, &str)]) -> RawConn {
    RawConn::connect(
        router.pooled_addr(),
        certs.client_config(),
        Mode::Direct,
        USER,
        PASSWORD,
        startup,
    )
}

/// Runs `branchgate ACTION -c router.toml b1` against the running router; its stdout.
fn control(router: &TestRouter, action: &str) -> String {
    let output = Command::new(branchgate_bin())
        .args([action, "-c"])
        .arg(router.config_path())
        .arg("b1")
        .output()
        .expect("run branchgate");
    assert!(
        output.status.success(),
        "branchgate {action}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn pause_lets_running_transactions_finish_and_holds_new_ones_until_resume() {
    let pg = PgServer::start_primary();
    pg.create_role("app", PASSWORD);
    let verifier = pg.role_verifier("app");
    let certs = Certs::generate();
    let mut settings = PoolSettings::new(2);
    settings.query_wait_timeout = Some(Duration::from_secs(20));
    let router = settings.start(
        &certs,
        &[BranchSpec::new("b1", pg.addr()).role("app", &verifier)],
    );
    let mut running = connect(&router, &certs);
    let mut waiting = connect(&router, &certs);
    assert_eq!(RawConn::status(&running.simple("begin")), 'T');

    // The pause answers once the running transaction has finished.
    let paused = thread::scope(|s| {
        let pause = s.spawn(|| control(&router, "pause"));
        thread::sleep(Duration::from_millis(300));
        assert!(
            !pause.is_finished(),
            "pause waits for the running transaction"
        );
        assert_eq!(running.value("select 'inside'"), "inside");
        assert_eq!(RawConn::status(&running.simple("commit")), 'I');
        pause.join().expect("pause")
    });
    assert!(paused.contains("paused branch b1"), "{paused}");

    // A login while paused, with startup parameters no backend has checked yet, is not held:
    // they are given to its backends as they were written (the pause holds transactions).
    let mut late = connect_with(&router, &certs, &[("TimeZone", "Asia/Kolkata")]);
    assert_eq!(late.reported("TimeZone"), Some("Asia/Kolkata"));
    assert_eq!(
        pg.psql_admin(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE query LIKE '%Asia/Kolkata%' AND pid <> pg_backend_pid()"
        ),
        "0",
        "no backend was given the parameters while the branch is paused"
    );

    // New transactions wait, without an error, until the resume.
    let done = AtomicBool::new(false);
    thread::scope(|s| {
        let waiter = s.spawn(|| {
            let value = waiting.value("select 'after resume'");
            done.store(true, Ordering::SeqCst);
            value
        });
        thread::sleep(Duration::from_millis(500));
        assert!(
            !done.load(Ordering::SeqCst),
            "a new transaction ran while paused"
        );
        let resumed = control(&router, "resume");
        assert!(resumed.contains("resumed branch b1"), "{resumed}");
        assert_eq!(waiter.join().expect("waiter"), "after resume");
    });
    assert_eq!(late.value("show TimeZone"), "Asia/Kolkata");
    // A branch that does not exist is an error, and a resume of a branch not paused says so.
    let output = Command::new(branchgate_bin())
        .args(["pause", "-c"])
        .arg(router.config_path())
        .arg("nope")
        .output()
        .expect("run branchgate");
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("no branch \"nope\""),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(control(&router, "resume").contains("was not paused"));
}

#[test]
fn paused_clients_still_obey_query_wait_timeout() {
    let pg = PgServer::start_primary();
    pg.create_role("app", PASSWORD);
    let verifier = pg.role_verifier("app");
    let certs = Certs::generate();
    let mut settings = PoolSettings::new(1);
    settings.query_wait_timeout = Some(Duration::from_millis(800));
    let router = settings.start(
        &certs,
        &[BranchSpec::new("b1", pg.addr()).role("app", &verifier)],
    );
    let mut client = connect(&router, &certs);
    assert!(control(&router, "pause").contains("paused branch b1"));
    let start = Instant::now();
    client.send(&[query("select 1")]);
    let (tag, body) = client.next("the paused query");
    assert_eq!(char::from(tag), 'E');
    let error = parse_error(&body);
    assert_eq!(
        (
            error.severity.as_str(),
            error.code.as_str(),
            error.message.as_str()
        ),
        ("FATAL", "53300", "query_wait_timeout")
    );
    assert!(
        start.elapsed() >= Duration::from_millis(700),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(client.next_or_end(), None, "closed after the FATAL");
    control(&router, "resume");
}

#[test]
fn new_transactions_wait_for_a_promoted_replica_and_every_commit_lands_once() {
    let mut primary = PgServer::start_primary();
    primary.create_role("app", PASSWORD);
    primary.psql_admin("CREATE TABLE landed (client int, n int); GRANT ALL ON landed TO app");
    let replica = PgServer::start_replica(&primary);
    replica.wait_for_value(
        "SELECT count(*) FROM pg_class WHERE relname = 'landed'",
        "1",
    );
    let verifier = primary.role_verifier("app");
    let certs = Certs::generate();
    let mut settings = PoolSettings::new(2);
    settings.query_wait_timeout = Some(Duration::from_secs(30));
    let spec = |primary_addr| {
        BranchSpec::new("b1", primary_addr)
            .role("app", &verifier)
            .replica(replica.addr())
    };
    let router = settings.start(&certs, &[spec(primary.addr())]);

    // Four clients commit one row per transaction, recording what each commit said.
    const CLIENTS: i32 = 4;
    let stop = AtomicBool::new(false);
    let committed: Mutex<Vec<(i32, i32)>> = Mutex::new(Vec::new());
    let failed = AtomicU32::new(0);
    let after_failover = AtomicU32::new(0);
    let promoted = AtomicBool::new(false);
    thread::scope(|s| {
        for client in 0..CLIENTS {
            let (stop, committed, failed) = (&stop, &committed, &failed);
            let (promoted, after_failover) = (&promoted, &after_failover);
            let certs = &certs;
            let router = &router;
            s.spawn(move || {
                let mut conn = connect(router, certs);
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    let replies = conn.simple(&format!(
                        "begin; insert into landed values ({client}, {n}); commit"
                    ));
                    if error_codes(&replies).is_empty() {
                        committed.lock().expect("lock").push((client, n));
                        if promoted.load(Ordering::SeqCst) {
                            after_failover.fetch_add(1, Ordering::SeqCst);
                        }
                    } else {
                        // Only a transaction that was running when the primary went away
                        // fails; it may or may not have committed.
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                    if RawConn::status(&replies) != 'I' {
                        conn.simple("rollback");
                    }
                }
            });
        }
        // Let them run, then take the primary away (a clean stop: the replica has every
        // commit), promote the replica and point the catalog at it.
        let deadline = Instant::now() + Duration::from_secs(10);
        while committed.lock().expect("lock").len() < 40 {
            assert!(Instant::now() < deadline, "clients made no progress");
            thread::sleep(Duration::from_millis(10));
        }
        primary.stop();
        let before_promotion = committed.lock().expect("lock").len();
        thread::sleep(Duration::from_millis(500));
        let waiting = committed.lock().expect("lock").len();
        assert_eq!(
            waiting, before_promotion,
            "no commit lands while there is no primary"
        );
        // A login with startup parameters no backend has checked yet is not refused while
        // there is no primary: its transactions wait like the others'.
        let mut late = connect_with(&router, &certs, &[("TimeZone", "Asia/Kolkata")]);
        replica.promote();
        router.set_catalog(&[BranchSpec::new("b1", replica.addr()).role("app", &verifier)]);
        promoted.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(20);
        while after_failover.load(Ordering::SeqCst) < 40 {
            assert!(
                Instant::now() < deadline,
                "clients did not carry on on the promoted replica"
            );
            thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(late.value("show TimeZone"), "Asia/Kolkata");
        stop.store(true, Ordering::SeqCst);
    });
    // Each client had at most one transaction running when the primary stopped.
    assert!(
        failed.load(Ordering::SeqCst) <= CLIENTS as u32,
        "{} failed transactions: only those running at the stop may fail",
        failed.load(Ordering::SeqCst)
    );
    let rows = replica.psql_admin("SELECT client || ':' || n FROM landed ORDER BY client, n");
    let mut landed: Vec<&str> = rows.lines().collect();
    let total = landed.len();
    landed.dedup();
    assert_eq!(landed.len(), total, "a row landed twice");
    for (client, n) in committed.lock().expect("lock").iter() {
        assert!(
            landed.contains(&format!("{client}:{n}").as_str()),
            "committed {client}:{n} is missing"
        );
    }
}
