//! A restart that refuses no one: `branchgate run --takeover` started beside a running router
//! joins its listeners, takes the new connections, and has the old one stop accepting, drain
//! and exit; connections still queued on the old listeners move to the new ones (the steering
//! program is a SELECT_OR_MIGRATE one). Clients connect in a storm through the switch, on both
//! ports and in both TLS modes: none is refused or reset, and the sessions open at the switch
//! either finish or get 57P01 at the end of the old router's drain.
//!
//! Real PostgreSQL, the real binary twice; as root (CI) the program steers, otherwise the
//! kernel's hash does and the switch relies on `net.ipv4.tcp_migrate_req` (set by the test
//! when it can).

use std::fs;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use branchgate_e2e::binary::RouterProcess;
use branchgate_e2e::catalog::catalog_toml;
use branchgate_e2e::raw::{Mode, RawConn};
use branchgate_e2e::{BranchSpec, Certs, PgServer};

const ROLE: &str = "mover";
const PASSWORD: &str = "pscale_pw_takeover";
/// Storm threads: each connects, runs a query and leaves, again and again.
const STORM_THREADS: usize = 4;
/// How long the old router may take to drain (1 s in the test config) and exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);
const ADMIN_SHUTDOWN: &str = "terminating connection due to administrator command";

#[test]
fn a_takeover_under_a_connection_storm_refuses_no_one() {
    // Without a program, queued connections move only if the kernel is told to.
    let _ = fs::write("/proc/sys/net/ipv4/tcp_migrate_req", "1");
    let pg = PgServer::start_primary();
    let certs = Certs::generate();
    pg.create_role(ROLE, PASSWORD);
    let verifier = pg.role_verifier(ROLE);
    let dir = tempfile::Builder::new()
        .prefix("bg-takeover-")
        .tempdir()
        .expect("temp dir");
    fs::write(
        dir.path().join("catalog.toml"),
        catalog_toml(&[BranchSpec::new("moved", pg.addr()).role(ROLE, &verifier)]),
    )
    .expect("write catalog");
    let mut old = RouterProcess::spawn(dir.path(), &certs);
    let user = format!("{ROLE}.moved");
    let connect = |pooled: bool, mode: Mode| {
        let addr = if pooled {
            old.pooled_addr()
        } else {
            old.addr()
        };
        RawConn::try_connect(addr, certs.client_config(), mode, &user, PASSWORD, &[])
    };
    // Sessions open at the switch: one per port, idle through it.
    let mut held_direct = connect(false, Mode::Direct).expect("direct session");
    let mut held_pooled = connect(true, Mode::SslRequest).expect("pooled client");
    assert_eq!(held_pooled.value("select 'before'"), "before");

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let (addr, pooled_addr) = (old.addr(), old.pooled_addr());
    let storm: Vec<_> = (0..STORM_THREADS)
        .map(|t| {
            let (stop, done, failures) = (stop.clone(), done.clone(), failures.clone());
            let config = certs.client_config();
            let user = user.clone();
            thread::spawn(move || {
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    let pooled = i % 2 == 0;
                    let mode = if (i / 2) % 2 == 0 {
                        Mode::Direct
                    } else {
                        Mode::SslRequest
                    };
                    let target = if pooled { pooled_addr } else { addr };
                    // A failure panics inside the client (refused, reset, a FATAL): caught
                    // here and counted.
                    let config = config.clone();
                    let user = user.clone();
                    let attempt =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
                            let mut conn =
                                RawConn::try_connect(target, config, mode, &user, PASSWORD, &[])
                                    .map_err(|e| format!("login: {e:?}"))?;
                            let value = conn.value("select 42");
                            conn.terminate();
                            if value == "42" {
                                Ok(())
                            } else {
                                Err(format!("answer {value:?}"))
                            }
                        }));
                    match attempt {
                        Ok(Ok(())) => {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Err(e)) => failures.lock().expect("lock").push(e),
                        Err(panic) => failures.lock().expect("lock").push(
                            panic
                                .downcast_ref::<String>()
                                .cloned()
                                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                                .unwrap_or_else(|| "panic".to_owned()),
                        ),
                    }
                    i += STORM_THREADS;
                }
            })
        })
        .collect();
    let wait_done = |at_least: usize| {
        branchgate_e2e::binary::wait_for("storm progress", EXIT_TIMEOUT, || {
            (done.load(Ordering::Relaxed) >= at_least).then_some(())
        })
    };
    wait_done(20);
    let before_switch = done.load(Ordering::Relaxed);

    let new = old.take_over();
    new.wait_for_log(&["took over from the running router"], EXIT_TIMEOUT);
    old.wait_for_log(&["taken over by a new router"], EXIT_TIMEOUT);
    let status = old.wait_exit(EXIT_TIMEOUT);
    assert!(
        status.success(),
        "the old router exits cleanly: {status}\n{}",
        old.log()
    );
    let at_exit = done.load(Ordering::Relaxed);
    // The storm goes on against the new router alone.
    wait_done(at_exit + 20);
    stop.store(true, Ordering::Relaxed);
    for thread in storm {
        thread.join().expect("storm thread");
    }
    let failures = failures.lock().expect("lock");
    assert!(
        failures.is_empty(),
        "{} of {} connection attempts failed through the switch: {:#?}\nold router:\n{}\nnew router:\n{}",
        failures.len(),
        done.load(Ordering::Relaxed) + failures.len(),
        &failures[..failures.len().min(5)],
        old.log(),
        new.log()
    );
    assert!(before_switch >= 20 && at_exit > before_switch);
    eprintln!(
        "sessions: {before_switch} before the switch, {} until the old router exited, {} in all",
        at_exit - before_switch,
        done.load(Ordering::Relaxed)
    );

    // The sessions open at the switch were ended by the old router's drain, with 57P01.
    for (what, conn) in [("direct", &mut held_direct), ("pooled", &mut held_pooled)] {
        let error = loop {
            match conn.next_or_end() {
                Some((b'E', body)) => break branchgate_e2e::raw::parse_error(&body),
                Some(_) => continue,
                None => panic!("{what}: closed without an error"),
            }
        };
        assert_eq!(error.code, "57P01", "{what}: {error:?}");
        assert_eq!(error.message, ADMIN_SHUTDOWN, "{what}");
    }
    // The new router has the control socket and the catalog: a reload reaches it.
    let output = branchgate_e2e::binary::branchgate(&[
        "reload",
        "-c",
        new.config().to_str().expect("UTF-8 path"),
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
