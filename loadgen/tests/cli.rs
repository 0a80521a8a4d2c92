//! The `branchgate-loadgen` binary: exit codes, one-line errors, and the JSON of each mode
//! against real PostgreSQL and the in-process router.

use std::process::{Command, Output};

use branchgate_e2e::PgServer;
use serde_json::Value;

mod common;

use common::router_on_primary;

const PASSWORD: &str = "pscale_pw_cli_test";

fn loadgen(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_branchgate-loadgen"))
        .args(args)
        .output()
        .expect("run branchgate-loadgen")
}

/// Exit status and the single stderr line of a failing run.
fn failure(args: &[&str]) -> (i32, String) {
    let output = loadgen(args);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(stderr.lines().count(), 1, "one line expected: {stderr}");
    assert!(stderr.starts_with("branchgate-loadgen: "), "{stderr}");
    (output.status.code().unwrap_or(-1), stderr)
}

fn json(args: &[&str]) -> Value {
    let output = loadgen(args);
    assert!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("stdout is one JSON document")
}

#[test]
fn bad_arguments_exit_2_and_unreachable_targets_exit_1() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["connect", "--target", "a=postgres://u@127.0.0.1"],
            "--rate",
        ),
        (
            &["connect", "--max", "--target", "a=http://x"],
            "postgres://",
        ),
        (
            &[
                "query",
                "--closed",
                "--target",
                "a=postgres://u@127.0.0.1",
                "--warmup",
                "x",
            ],
            "--warmup",
        ),
        (
            &[
                "idle",
                "--connections",
                "1",
                "--target",
                "a=postgres://u@127.0.0.1",
                "--pid",
                "a=x",
            ],
            "--pid",
        ),
        (&["bogus"], "bogus"),
        (
            &[
                "connect",
                "--max",
                "--duration",
                "0s",
                "--target",
                "a=postgres://u@127.0.0.1",
            ],
            "'0s' is zero",
        ),
        (
            &[
                "query",
                "--closed",
                "--slice",
                "0ms",
                "--target",
                "a=postgres://u@127.0.0.1",
            ],
            "--slice",
        ),
        (
            &[
                "idle",
                "--connections",
                "1",
                "--target",
                "a=postgres://u@[::1]",
                "--source-ips",
                "127.0.0.2",
            ],
            "target 'a' is IPv6",
        ),
    ];
    for (args, needle) in cases {
        let (code, line) = failure(args);
        assert_eq!(code, 2, "{args:?}: {line}");
        assert!(line.contains(needle), "{args:?}: {line}");
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    let target = format!("a=postgres://u@127.0.0.1:{port}");
    let (code, line) = failure(&["connect", "--max", "--target", &target]);
    assert_eq!(code, 1);
    assert!(
        line.contains("target 'a'") && line.contains("refused"),
        "{line}"
    );
    // The plot file is made before any connection: its error comes first, not after the run.
    let (code, line) = failure(&[
        "connect",
        "--max",
        "--target",
        &target,
        "--plot",
        "/nonexistent/dir/plot.svg",
    ]);
    assert_eq!(code, 2, "{line}");
    assert!(
        line.contains("cannot write plot /nonexistent/dir/plot.svg"),
        "{line}"
    );
}

#[test]
fn every_mode_reports_json() {
    let setup = router_on_primary(PASSWORD, &["b1", "b2"]);
    let (router, certs, pg) = (&setup.router, &setup.certs, &setup.pg);
    let ca = certs.ca_path();
    let port = router.direct_addr().port();
    let direct = format!(
        "direct=postgres://app.{{branch}}:{PASSWORD}@localhost:{port}/postgres?sslmode=verify-full&sslrootcert={}&sslnegotiation=direct",
        ca.display()
    );
    let sslreq = format!(
        "sslreq=postgres://app.{{branch}}:{PASSWORD}@127.0.0.1:{port}/postgres?sslmode=require"
    );
    let plain = format!(
        "pg=postgres://app:{PASSWORD}@{}/postgres?sslmode=disable",
        pg.addr()
    );
    let common = [
        "--target",
        &direct,
        "--target",
        &sslreq,
        "--target",
        &plain,
        "--branches",
        "b1,b2",
        "--json",
        "--quiet",
        "--strict",
        "--slice",
        "100ms",
    ];

    // The router runs in this process: its CPU time (and memory) is ours. `pg` has no pid.
    let pid = std::process::id().to_string();
    let pid_file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(pid_file.path(), format!("{pid}\n")).expect("write pid file");
    let pid_file = format!("sslreq={}", pid_file.path().display());
    let direct_pid = format!("direct={pid}");
    let router_pids = ["--pid", &direct_pid, "--pid-file", &pid_file];

    let plot = tempfile::NamedTempFile::new().expect("temp file");
    let plot_path = plot.path().to_str().expect("UTF-8 path");
    let mut args = vec![
        "connect",
        "--max",
        "--concurrency",
        "4",
        "--count",
        "12",
        "--plot",
        plot_path,
    ];
    args.extend_from_slice(&router_pids);
    args.extend_from_slice(&common);
    let report = json(&args);
    assert_eq!(report["mode"], "connect");
    let results = report["results"].as_array().expect("results");
    assert_eq!(results.len(), 3);
    for (result, name) in results.iter().zip(["direct", "sslreq", "pg"]) {
        assert_eq!(result["target"], name);
        assert_eq!(
            (result["count"].as_u64(), result["errors"].as_u64()),
            (Some(12), Some(0))
        );
        assert!(
            result["rate_per_s"].as_f64().is_some_and(|r| r > 0.0),
            "{result}"
        );
        for phase in ["tcp", "tls", "auth", "ready"] {
            assert!(result["phases"][phase]["p99"].is_number(), "{result}");
        }
        // Only the SSLRequest target has the round trip; only TLS targets a time to TLS.
        let (ssl_request, tls) = (name == "sslreq", name != "pg");
        assert_eq!(
            result["phases"].get("ssl_request").is_some(),
            ssl_request,
            "{result}"
        );
        assert_eq!(result.get("tls_established_us").is_some(), tls, "{result}");
        assert!(result["latency_us"]["p50"]
            .as_f64()
            .is_some_and(|l| l > 0.0));
    }
    assert_eq!(results[2]["phases"]["tls"]["max"], 0.0);
    assert_router_cpu(results);
    let svg = std::fs::read_to_string(plot.path()).expect("plot written");
    assert_eq!(svg.matches("<polyline").count(), 3);

    let mut args = vec![
        "query",
        "--closed",
        "--connections",
        "2",
        "--protocol",
        "extended",
        "--duration",
        "600ms",
        "--warmup",
        "100ms",
    ];
    args.extend_from_slice(&router_pids);
    args.extend_from_slice(&common);
    let report = json(&args);
    assert_eq!(report["settings"]["protocol"], "extended");
    let results = report["results"].as_array().expect("results");
    assert_router_cpu(results);
    for result in results {
        assert!(result["count"].as_u64().is_some_and(|c| c > 10), "{result}");
        assert_eq!(result["errors"], 0);
        let duration = result["duration_s"].as_f64().expect("duration");
        assert!((0.59..1.5).contains(&duration), "{result}");
        assert!(result.get("phases").is_none());
    }

    // Prepared: one parameterised statement (one Parse per connection), values bound per query.
    let queries = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(
        queries.path(),
        "SELECT $1::int + 1\t1\nSELECT $1::int + 1\t2\nSELECT 3\n",
    )
    .expect("write queries");
    let query_file = queries.path().to_str().expect("UTF-8 path");
    let mut args = vec![
        "query",
        "--closed",
        "--connections",
        "2",
        "--protocol",
        "prepared",
        "--query-file",
        query_file,
        "--duration",
        "300ms",
        "--warmup",
        "0s",
    ];
    args.extend_from_slice(&common);
    let report = json(&args);
    assert_eq!(report["settings"]["protocol"], "prepared");
    assert_eq!(report["settings"]["queries"], 3);
    for result in report["results"].as_array().expect("results") {
        assert!(result["count"].as_u64().is_some_and(|c| c > 10), "{result}");
        assert_eq!(result["errors"], 0);
    }
    // Parameters need the extended or prepared protocol.
    let (code, line) = failure(&[
        "query",
        "--closed",
        "--query-file",
        query_file,
        "--target",
        &plain,
    ]);
    assert_eq!(code, 2, "{line}");
    assert!(
        line.contains("line 1") && line.contains("prepared"),
        "{line}"
    );

    let mut args = vec![
        "query",
        "--rate",
        "200",
        "--connections",
        "2",
        "--duration",
        "500ms",
    ];
    args.extend_from_slice(&common);
    let report = json(&args);
    for result in report["results"].as_array().expect("results") {
        let count = result["count"].as_u64().expect("count");
        assert!((95..=101).contains(&count), "200/s for 0.5 s: {result}");
    }

    // Every branch is checked before the run, so one bad branch among good ones always fails.
    let (code, line) = failure(&[
        "connect",
        "--max",
        "--count",
        "1",
        "--target",
        &direct,
        "--branches",
        "b1,nope,b2",
        "--quiet",
    ]);
    assert_eq!(code, 1, "{line}");
    assert!(
        line.contains("target 'direct'") && line.contains("branch 'nope'"),
        "{line}"
    );

    // A process that cannot be read stops the run before it starts.
    let (code, line) = failure(&[
        "query",
        "--closed",
        "--duration",
        "100ms",
        "--target",
        &plain,
        "--pid",
        "999999999",
        "--quiet",
    ]);
    assert_eq!(code, 1, "{line}");
    assert!(
        line.contains("target 'pg': cannot read the CPU time of process 999999999"),
        "{line}"
    );
}

/// The router targets (`direct`, `sslreq`: this process) used CPU in their slices; `pg` was
/// given no pid and has no CPU fields.
fn assert_router_cpu(results: &[Value]) {
    let pid = u64::from(std::process::id());
    for result in &results[..2] {
        assert_eq!(result["pid"].as_u64(), Some(pid), "{result}");
        let cpu_s = result["cpu_s"].as_f64().expect("cpu_s");
        let per_op = result["cpu_us_per_op"].as_f64().expect("cpu_us_per_op");
        assert!(cpu_s > 0.0 && per_op > 0.0, "{result}");
        let count = result["count"].as_f64().expect("count");
        // cpu_s is rounded to the microsecond, cpu_us_per_op to a thousandth of one.
        let slack = 1.0 + count * 0.0005;
        assert!((per_op * count - cpu_s * 1e6).abs() <= slack, "{result}");
    }
    assert!(results[2].get("cpu_s").is_none(), "{}", results[2]);
    assert!(results[2].get("pid").is_none(), "{}", results[2]);
}

/// Rows of `seen` per (role, statement), as `role:statement=count` lines in order.
fn seen(pg: &PgServer) -> String {
    pg.psql_admin("SELECT string_agg(who || ':' || stmt || '=' || n, ' ' ORDER BY who, stmt) FROM (SELECT who, stmt, count(*) AS n FROM seen GROUP BY who, stmt) s")
}

/// The count of `role:statement` in [`seen`]'s output (0 if absent).
fn seen_count(seen: &str, key: &str) -> u64 {
    seen.split(' ')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .map_or(0, |n| n.parse().expect("a count"))
}

#[test]
fn query_file_and_zipf_branches_end_to_end() {
    let pg = PgServer::start_primary();
    for role in ["u_b1", "u_b2"] {
        pg.create_role(role, PASSWORD);
    }
    pg.psql_admin("CREATE TABLE seen (who text, stmt int); GRANT INSERT ON seen TO u_b1, u_b2");
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("q.sql");
    std::fs::write(
        &file,
        "-- each statement says who ran it\nINSERT INTO seen VALUES (current_user, 1)\n\n\
         INSERT INTO seen VALUES (current_user, 2)\n",
    )
    .expect("write query file");
    let file = file.to_str().expect("UTF-8 path");
    let target = format!(
        "pg=postgres://u_{{branch}}:{PASSWORD}@{}/postgres?sslmode=disable",
        pg.addr()
    );
    let run = |connections: &str, dist: &str| {
        let report = json(&[
            "query",
            "--closed",
            "--connections",
            connections,
            "--query-file",
            file,
            "--branches",
            "b1,b2",
            "--branch-dist",
            dist,
            "--duration",
            "300ms",
            "--warmup",
            "0s",
            "--slice",
            "100ms",
            "--target",
            &target,
            "--json",
            "--quiet",
            "--strict",
        ]);
        let result = report["results"][0].clone();
        assert_eq!(result["errors"], 0, "{result}");
        assert_eq!(report["settings"]["queries"], 2, "{report}");
        result["count"].as_u64().expect("count")
    };

    // zipf:100 gives the second branch a weight of 2^-100: every measured connection is on b1.
    // Before the run, each branch ran each statement once (the pre-run check).
    let count = run("8", "zipf:100");
    let rows = seen(&pg);
    assert_eq!(
        seen_count(&rows, "u_b2:1") + seen_count(&rows, "u_b2:2"),
        2,
        "{rows}"
    );
    let (one, two) = (seen_count(&rows, "u_b1:1"), seen_count(&rows, "u_b1:2"));
    assert_eq!(
        one + two,
        count + 2,
        "every recorded query ran, once: {rows}"
    );
    // Each connection alternates the file's two statements.
    assert!(one > 1 && two > 1 && one.abs_diff(two) <= 8, "{rows}");

    // Uniform over two branches: 24 connections all on one would be a 1 in 8 million chance.
    pg.psql_admin("TRUNCATE seen");
    let count = run("24", "uniform");
    let rows = seen(&pg);
    let b1 = seen_count(&rows, "u_b1:1") + seen_count(&rows, "u_b1:2");
    let b2 = seen_count(&rows, "u_b2:1") + seen_count(&rows, "u_b2:2");
    assert_eq!(b1 + b2, count + 4, "{rows}");
    assert!(b1 > 2 && b2 > 2, "both branches measured: {rows}");
}

#[test]
fn strict_refuses_a_target_that_recorded_nothing() {
    let pg = PgServer::start_primary();
    pg.create_role("app", PASSWORD);
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("slow.sql");
    std::fs::write(&file, "SELECT pg_sleep(2.5)\n").expect("write query file");
    let target = format!(
        "pg=postgres://app:{PASSWORD}@{}/postgres?sslmode=disable",
        pg.addr()
    );
    // One connection: its query sent in the 1 s warmup slice answers after 2.5 s, past the end
    // of the one recorded slice (1 s to 2 s), so the target records nothing and no error.
    let output = loadgen(&[
        "query",
        "--closed",
        "--connections",
        "1",
        "--query-file",
        file.to_str().expect("UTF-8 path"),
        "--duration",
        "1s",
        "--warmup",
        "1s",
        "--slice",
        "1s",
        "--target",
        &target,
        "--json",
        "--quiet",
        "--strict",
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert_eq!(
        stderr.trim_end(),
        "branchgate-loadgen: --strict: target 'pg' recorded no operations"
    );
    let report: Value = serde_json::from_slice(&output.stdout).expect("the report still prints");
    let result = &report["results"][0];
    assert_eq!(
        (&result["count"], &result["errors"]),
        (&0.into(), &0.into()),
        "{result}"
    );
}
