//! Idle mode against the in-process router, alone in its test binary: the memory read is this
//! process's, so no other test may run beside it.

use std::process::Command;

use serde_json::Value;

mod common;

use common::router_on_primary;

const PASSWORD: &str = "pscale_pw_idle_test";
/// Connections held: enough that the router's memory grows by far more than a page or two.
const CONNECTIONS: u64 = 50;

#[test]
fn idle_holds_every_connection_and_reports_the_memory_they_cost() {
    let setup = router_on_primary(PASSWORD, &["b1"]);
    let port = setup.router.direct_addr().port();
    let target = format!(
        "bg=postgres://app.{{branch}}:{PASSWORD}@localhost:{port}/postgres?sslmode=verify-full&sslrootcert={}&sslnegotiation=direct",
        setup.certs.ca_path().display()
    );
    let pid = std::process::id().to_string();
    let connections = CONNECTIONS.to_string();
    let output = Command::new(env!("CARGO_BIN_EXE_branchgate-loadgen"))
        .args([
            "idle",
            "--connections",
            &connections,
            "--hold",
            "100ms",
            "--settle",
            "50ms",
            "--source-ips",
            "127.0.0.2-127.0.0.5",
            "--target",
            &target,
            "--branches",
            "b1",
            "--pid",
            &pid,
            "--json",
            "--quiet",
            "--strict",
        ])
        .output()
        .expect("run branchgate-loadgen");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_slice(&output.stdout).expect("one JSON document");
    assert_eq!(report["settings"]["source_ips"], 4, "{report}");
    assert_eq!(report["settings"]["source_ips_auto"], false, "{report}");
    let result = &report["results"][0];
    assert_eq!(result["connections_requested"], CONNECTIONS, "{result}");
    assert_eq!(
        (result["count"].as_u64(), result["errors"].as_u64()),
        (Some(CONNECTIONS), Some(0)),
        "every connection open at once: {result}"
    );
    let before = result["rss_bytes_before"].as_u64().expect("rss before");
    let after = result["rss_bytes_after"].as_u64().expect("rss after");
    assert!(before > 0 && after >= before, "{result}");
    let per_connection = result["bytes_per_connection"]
        .as_f64()
        .expect("bytes per connection");
    // Reported rounded to 0.1 byte.
    let want = (after - before) as f64 / CONNECTIONS as f64;
    assert!(
        (per_connection - want).abs() <= 0.05,
        "{per_connection} vs {want}"
    );
    assert_eq!(result["pid"].as_u64(), Some(u64::from(std::process::id())));
    assert!(result.get("cpu_s").is_none(), "{result}");
}
