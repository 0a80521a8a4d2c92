//! The router seen from outside, with no restart: its USDT probes (the hand-off's included),
//! attached by bpftrace to the running `branchgate run` while real clients log in on both ports; and `/metrics` and
//! `/healthz` on `[listen] admin`, scraped while clients work.
//!
//! bpftrace needs root (it loads BPF programs); `scripts/setup` installs it. Run as another
//! user, the probe test says why it did nothing and passes.

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use branchgate_e2e::binary::{branchgate_bin, wait_for, RouterProcess};
use branchgate_e2e::catalog::catalog_toml;
use branchgate_e2e::metrics::{http, sample};
use branchgate_e2e::raw::{Mode, RawConn};
use branchgate_e2e::{BranchSpec, Certs, PgServer, TestRouter};

/// How long bpftrace may take to attach, and an event to show in its output.
const TRACE_TIMEOUT: Duration = Duration::from_secs(30);

/// bpftrace on `pid` with one line per probe firing, all arguments shown.
fn bpftrace(pid: u32) -> (Child, mpsc::Receiver<String>) {
    let bin = branchgate_bin();
    let bin = bin.display();
    let script = format!(
        "BEGIN {{ printf(\"ready\\n\"); }}
usdt:{bin}:branchgate:accepted {{ printf(\"accepted %d %d\\n\", arg0, arg1); }}
usdt:{bin}:branchgate:tls_done {{ printf(\"tls_done %d %d\\n\", arg0, arg1); }}
usdt:{bin}:branchgate:authenticated {{
    printf(\"authenticated %s %s %d\\n\", str(arg0, arg1), str(arg2, arg3), arg4); }}
usdt:{bin}:branchgate:backend_connected {{
    printf(\"backend_connected %d %d %d\\n\", arg0, arg1, arg2); }}
usdt:{bin}:branchgate:transaction_begin {{ printf(\"transaction_begin %d %d\\n\", arg0, arg1); }}
usdt:{bin}:branchgate:transaction_end {{
    printf(\"transaction_end %d %d %d\\n\", arg0, arg1, arg2); }}
usdt:{bin}:branchgate:session_end {{ printf(\"session_end %d %d %d\\n\", arg0, arg1, arg2); }}
usdt:{bin}:branchgate:handoff {{ printf(\"handoff %d %d\\n\", arg0, arg1); }}
"
    );
    let mut child = Command::new("bpftrace")
        .arg("-p")
        .arg(pid.to_string())
        .arg("-e")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run bpftrace (scripts/setup installs it)");
    let stdout = child.stdout.take().expect("bpftrace stdout");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// Lines from bpftrace until one starts with `prefix` and passes `check`; returns it.
fn expect_line(
    rx: &mpsc::Receiver<String>,
    seen: &mut Vec<String>,
    prefix: &str,
    check: impl Fn(&[&str]) -> bool,
) -> Vec<String> {
    if let Some(line) = seen.iter().find(|line| {
        let words: Vec<&str> = line.split_whitespace().collect();
        words.first() == Some(&prefix) && check(&words[1..])
    }) {
        return line.split_whitespace().skip(1).map(str::to_owned).collect();
    }
    loop {
        let line = rx
            .recv_timeout(TRACE_TIMEOUT)
            .unwrap_or_else(|_| panic!("no `{prefix}` line; bpftrace printed:\n{seen:#?}"));
        let words: Vec<&str> = line.split_whitespace().collect();
        let hit = words.first() == Some(&prefix) && check(&words[1..]);
        let found: Vec<String> = words[1..].iter().map(|w| (*w).to_owned()).collect();
        seen.push(line);
        if hit {
            return found;
        }
    }
}

fn number(word: &str) -> u64 {
    word.parse()
        .unwrap_or_else(|_| panic!("{word:?} is not a number"))
}

#[test]
fn bpftrace_sees_every_probe_of_a_direct_and_a_pooled_client() {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: bpftrace needs root");
        return;
    }
    let pg = PgServer::start_primary();
    let certs = Certs::generate();
    let password = "pscale_pw_probes";
    pg.create_role("tracer", password);
    let verifier = pg.role_verifier("tracer");
    let dir = tempfile::Builder::new()
        .prefix("bg-probes-")
        .tempdir()
        .expect("temp dir");
    fs::write(
        dir.path().join("catalog.toml"),
        catalog_toml(&[BranchSpec::new("traced", pg.addr()).role("tracer", &verifier)]),
    )
    .expect("write catalog");
    // Userspace steering: the kernel's hash spreads clients over both workers, and those on
    // the worker that does not own the branch are handed off (the `handoff` probe).
    let router = RouterProcess::spawn_with(dir.path(), &certs, |text| {
        format!("steering = \"userspace\"\n{text}")
    });
    let (mut trace, rx) = bpftrace(router.pid());
    let mut seen = Vec::new();
    expect_line(&rx, &mut seen, "ready", |_| true);

    // A pooled client (SSLRequest): login, a transaction, goodbye.
    let mut pooled = RawConn::connect(
        router.pooled_addr(),
        certs.client_config(),
        Mode::SslRequest,
        "tracer.traced",
        password,
        &[],
    );
    let client_pid = pooled.login.key.0;
    let backend_pid: u64 = number(&pooled.value("select pg_backend_pid()"));
    pooled.terminate();
    // A direct client (direct SSL).
    let mut direct = RawConn::connect(
        router.addr(),
        certs.client_config(),
        Mode::Direct,
        "tracer.traced",
        password,
        &[],
    );
    let direct_pid = direct.login.key.0;
    assert_eq!(
        number(&direct.value("select pg_backend_pid()")),
        u64::from(direct_pid)
    );
    direct.terminate();

    // Port 1 is the pooled port, 0 the direct one; fds are real.
    let pooled_fd = expect_line(&rx, &mut seen, "accepted", |w| w[0] == "1");
    assert!(number(&pooled_fd[1]) > 2, "{seen:#?}");
    expect_line(&rx, &mut seen, "accepted", |w| w[0] == "0");
    // SSLRequest, then direct SSL.
    expect_line(&rx, &mut seen, "tls_done", |w| w[0] == "0");
    expect_line(&rx, &mut seen, "tls_done", |w| w[0] == "1");
    let auth = expect_line(&rx, &mut seen, "authenticated", |w| w[0] == "traced");
    assert_eq!(auth[1], "tracer", "{seen:#?}");
    // The pooled client's transaction ran on the backend it saw, under the pid it was told.
    let client = client_pid.to_string();
    let backend = backend_pid.to_string();
    expect_line(&rx, &mut seen, "transaction_begin", |w| {
        w[0] == client && w[1] == backend
    });
    expect_line(&rx, &mut seen, "transaction_end", |w| {
        w[0] == client && w[1] == backend
    });
    expect_line(&rx, &mut seen, "session_end", |w| {
        w[0] == "1" && w[1] == client
    });
    // Both backends were connected (the pool's, the direct session's), to the server's port.
    let port = pg.addr().port().to_string();
    let direct_backend = direct_pid.to_string();
    expect_line(&rx, &mut seen, "backend_connected", |w| {
        w[0] == backend && w[1] == port
    });
    expect_line(&rx, &mut seen, "backend_connected", |w| {
        w[0] == direct_backend && w[1] == port
    });
    expect_line(&rx, &mut seen, "session_end", |w| {
        w[0] == "0" && w[1] == direct_backend
    });
    // Each login has an even chance of landing on the worker that does not own the branch:
    // among this many, one is handed off (from one worker to the other) but for 2^-24.
    for _ in 0..24 {
        RawConn::connect(
            router.pooled_addr(),
            certs.client_config(),
            Mode::SslRequest,
            "tracer.traced",
            password,
            &[],
        )
        .terminate();
    }
    expect_line(&rx, &mut seen, "handoff", |w| {
        (w[0] == "0" && w[1] == "1") || (w[0] == "1" && w[1] == "0")
    });
    // Everything was seen: bpftrace has nothing more to say (detaching can be slow on a busy
    // machine, so it is not waited for).
    let _ = trace.kill();
    let _ = trace.wait();
}

#[test]
fn metrics_follow_clients_on_both_ports_and_healthz_turns_503_for_the_drain() {
    let pg = PgServer::start_primary();
    let certs = Certs::generate();
    let password = "pscale_pw_metrics";
    pg.create_role("counted", password);
    let verifier = pg.role_verifier("counted");
    let branches = [BranchSpec::new("metered", pg.addr()).role("counted", &verifier)];
    let mut router = TestRouter::start_with_config(&certs, &branches, |text| {
        text.replace(
            "pooled = \"127.0.0.1:0\"\n",
            "pooled = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n",
        )
    });
    let admin = router
        .router()
        .admin_addr()
        .expect("the admin endpoint runs");
    assert_eq!(http(admin, "GET", "/healthz"), (200, "ok\n".to_owned()));
    assert_eq!(http(admin, "GET", "/nowhere").0, 404);
    assert_eq!(http(admin, "POST", "/metrics").0, 405);
    let (status, before) = http(admin, "GET", "/metrics");
    assert_eq!(status, 200);
    assert!(
        before.ends_with("# EOF\n"),
        "OpenMetrics text ends with # EOF"
    );
    let pooled_port = ["port=\"pooled\""];
    let direct_port = ["port=\"direct\""];

    let mut pooled = RawConn::connect(
        router.pooled_addr(),
        certs.client_config(),
        Mode::SslRequest,
        "counted.metered",
        password,
        &[],
    );
    const QUERIES: usize = 7;
    for i in 0..QUERIES {
        assert_eq!(pooled.value(&format!("select {i}")), i.to_string());
    }
    let mut direct = RawConn::connect(
        router.direct_addr(),
        certs.client_config(),
        Mode::Direct,
        "counted.metered",
        password,
        &[],
    );
    assert_eq!(direct.value("select 'direct'"), "direct");
    let (_, during) = http(admin, "GET", "/metrics");
    let moved =
        |name: &str, labels: &[&str]| sample(&during, name, labels) - sample(&before, name, labels);
    assert_eq!(
        moved("branchgate_connections_accepted_total", &pooled_port),
        1.0
    );
    assert_eq!(
        moved("branchgate_connections_accepted_total", &direct_port),
        1.0
    );
    assert_eq!(moved("branchgate_logins_total", &pooled_port), 1.0);
    assert_eq!(
        sample(&during, "branchgate_client_connections", &pooled_port),
        1.0
    );
    assert_eq!(
        sample(&during, "branchgate_client_connections", &direct_port),
        1.0
    );
    assert_eq!(moved("branchgate_login_seconds_count", &direct_port), 1.0);
    assert_eq!(
        moved("branchgate_pooled_queries_total", &[]),
        QUERIES as f64
    );
    assert_eq!(
        moved("branchgate_pooled_transactions_total", &[]),
        QUERIES as f64
    );
    assert_eq!(
        moved("branchgate_pooled_transaction_seconds_count", &[]),
        QUERIES as f64
    );
    assert!(sample(&during, "branchgate_pooled_transaction_seconds_sum", &[]) > 0.0);
    assert_eq!(
        moved("branchgate_pool_wait_seconds_count", &[]),
        QUERIES as f64
    );
    assert_eq!(sample(&during, "branchgate_pool_waiting_clients", &[]), 0.0);
    assert_eq!(
        sample(&during, "branchgate_backend_connections", &direct_port),
        1.0
    );
    assert!(sample(&during, "branchgate_backend_connections", &pooled_port) >= 1.0);
    let branch = ["branch=\"metered\""];
    assert_eq!(
        sample(&during, "branchgate_branch_pooled_clients", &branch),
        1.0
    );
    assert_eq!(sample(&during, "branchgate_branch_paused", &branch), 0.0);
    let backend = format!("backend=\"{}\"", pg.addr());
    assert!(sample(&during, "branchgate_upstream_connections", &[&backend]) >= 2.0);
    assert_eq!(
        sample(&during, "branchgate_upstream_healthy", &[&backend]),
        1.0
    );
    // As root the eBPF program steers (the default): it chose the worker of both connections.
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let outcome = |o: &str| format!("outcome=\"{o}\"");
        let chosen = moved("branchgate_steering_choices_total", &[&outcome("hit")])
            + moved("branchgate_steering_choices_total", &[&outcome("miss")]);
        assert_eq!(chosen, 2.0, "{during}");
    }

    pooled.terminate();
    // The pooled client is gone once the router has seen its Terminate.
    wait_for("the pooled client to be counted out", TRACE_TIMEOUT, || {
        let (_, now) = http(admin, "GET", "/metrics");
        (sample(&now, "branchgate_client_connections", &pooled_port) == 0.0).then_some(())
    });
    // The drain: the direct session is still open, /healthz says the router is stopping.
    let stopping = router.shutdown_in_background();
    wait_for(
        "/healthz to answer 503 during the drain",
        TRACE_TIMEOUT,
        || (http(admin, "GET", "/healthz") == (503, "stopping\n".to_owned())).then_some(()),
    );
    drop(direct);
    stopping.join().expect("shutdown");
    assert!(
        TcpStream::connect(admin).is_err(),
        "the admin endpoint closes with the router"
    );
}
