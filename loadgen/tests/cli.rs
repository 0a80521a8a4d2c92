//! The `branchgate-loadgen` binary: exit codes, one-line errors, and the JSON of each mode
//! against real PostgreSQL and the in-process router.

use std::process::{Command, Output};

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

    let report = json(&[
        "idle",
        "--connections",
        "20",
        "--hold",
        "100ms",
        "--settle",
        "50ms",
        "--source-ips",
        "127.0.0.2-127.0.0.5",
        "--target",
        &direct,
        "--branches",
        "b1",
        "--pid",
        &pid,
        "--json",
        "--quiet",
    ]);
    let result = &report["results"][0];
    assert_eq!(
        (result["count"].as_u64(), result["errors"].as_u64()),
        (Some(20), Some(0))
    );
    assert!(
        result["rss_bytes_before"].as_u64().is_some_and(|b| b > 0),
        "{result}"
    );
    assert!(result["rss_bytes_after"].is_number(), "{result}");
    assert!(result["bytes_per_connection"].is_number(), "{result}");
    assert!(result.get("cpu_s").is_none(), "{result}");

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
