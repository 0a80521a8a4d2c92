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

/// The accept-queue lengths of the listening sockets on `port` (IPv4, `/proc/net/tcp`: for a
/// socket in LISTEN, `rx_queue` is its accept queue).
fn accept_queue(port: u16) -> usize {
    let table = fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (local, state, queues) = (fields.get(1)?, fields.get(3)?, fields.get(4)?);
            let local_port = u16::from_str_radix(local.rsplit_once(':')?.1, 16).ok()?;
            let rx = usize::from_str_radix(queues.split_once(':')?.1, 16).ok()?;
            (local_port == port && *state == "0A").then_some(rx)
        })
        .sum()
}

/// A router stopped (SIGSTOP, or starved of CPU) while the upgrade starts: connections the
/// kernel completed into its accept queues in the meantime are all served, none reset. When it
/// runs again it may accept them before it reads the takeover request (then it serves them in
/// its drain), or close its listeners with them still queued (then the kernel moves them to
/// the new router's: SELECT_OR_MIGRATE, `net.ipv4.tcp_migrate_req`); which one happens is up
/// to the scheduler, so this test shows that no queued connection is lost either way, not
/// which way each went.
#[test]
fn connections_queued_on_a_stopped_old_router_are_served_through_the_takeover() {
    let _ = fs::write("/proc/sys/net/ipv4/tcp_migrate_req", "1");
    const QUEUED_PER_PORT: usize = 8;
    // An accept the old router's worker had submitted to io_uring before it stopped completes
    // once it runs again: one per worker (two in the test config) and port.
    const IN_FLIGHT_ACCEPTS: usize = 2;
    let pg = PgServer::start_primary();
    let certs = Certs::generate();
    pg.create_role(ROLE, PASSWORD);
    let dir = tempfile::Builder::new()
        .prefix("bg-takeover-queue-")
        .tempdir()
        .expect("temp dir");
    fs::write(
        dir.path().join("catalog.toml"),
        catalog_toml(&[BranchSpec::new("moved", pg.addr()).role(ROLE, &pg.role_verifier(ROLE))]),
    )
    .expect("write catalog");
    let mut old = RouterProcess::spawn(dir.path(), &certs);
    let user = format!("{ROLE}.moved");
    let (addr, pooled_addr) = (old.addr(), old.pooled_addr());

    old.stop();
    let clients: Vec<_> = (0..2 * QUEUED_PER_PORT)
        .map(|i| {
            let target = if i % 2 == 0 { pooled_addr } else { addr };
            let mode = if i % 4 < 2 {
                Mode::Direct
            } else {
                Mode::SslRequest
            };
            let (config, user) = (certs.client_config(), user.clone());
            thread::spawn(move || {
                // Connected by the kernel at once; the handshake waits for an accept.
                let mut conn = RawConn::try_connect(target, config, mode, &user, PASSWORD, &[])
                    .map_err(|e| format!("{target} {mode:?}: login: {e:?}"))?;
                let value = conn.value("select 'moved'");
                conn.terminate();
                Ok::<_, String>(value)
            })
        })
        .collect();
    branchgate_e2e::binary::wait_for(
        "connections queued on the stopped router",
        EXIT_TIMEOUT,
        || {
            (accept_queue(addr.port()) >= QUEUED_PER_PORT - IN_FLIGHT_ACCEPTS
                && accept_queue(pooled_addr.port()) >= QUEUED_PER_PORT - IN_FLIGHT_ACCEPTS)
                .then_some(())
        },
    );

    // The new router joins the groups and waits for the old one's answer, which comes once it
    // runs again: it stops accepting and closes its listeners with the queues still full.
    let new = old.take_over();
    old.signal(libc::SIGCONT);
    new.wait_for_log(&["took over from the running router"], EXIT_TIMEOUT);
    let status = old.wait_exit(EXIT_TIMEOUT);
    assert!(status.success(), "old router: {status}\n{}", old.log());
    let results: Vec<Result<String, String>> = clients
        .into_iter()
        .map(|client| client.join().expect("client thread"))
        .collect();
    let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} queued connections failed: {failed:#?}\nold router:\n{}\nnew router:\n{}",
        failed.len(),
        results.len(),
        old.log(),
        new.log()
    );
    assert!(results.iter().all(|r| r.as_deref() == Ok("moved")));
}
