//! Results: one [`TargetReport`] per target, printed as tables or as one JSON document.
//!
//! JSON (`--json`), field names stable:
//! `{"mode", "threads", "settings": {...}, "results": [{"target", "mode", "count", "errors",
//! "first_error", "duration_s", "rate_per_s", "latency_us": {"p50","p90","p99","p999","max"},
//! "phases": {"tcp","ssl_request","tls","auth","ready"}, "tls_established_us" (connect; the
//! last two only where they apply, see [`PhaseReport`]), "pid" (idle; connect and query with
//! `--pid`), "cpu_s", "cpu_us_per_op" (connect and query with `--pid`), "connections_requested",
//! "rss_bytes_before", "rss_bytes_after", "bytes_per_connection" (idle)}]}`.

use std::fmt::Write as _;

use serde::Serialize;

use crate::client::Stage;
use crate::modes::idle::IdleResult;
use crate::sampler::CpuUse;
use crate::stats::{Latency, Phases, Summary, TargetStats};

/// The whole run.
#[derive(Debug, Serialize)]
pub struct Report {
    /// `connect`, `query` or `idle`.
    pub mode: &'static str,
    /// Worker threads.
    pub threads: usize,
    /// The mode's settings, for the record.
    pub settings: serde_json::Value,
    /// One per target, in command-line order.
    pub results: Vec<TargetReport>,
    /// One line describing the run, above the tables.
    #[serde(skip)]
    pub headline: String,
}

/// What one target did.
#[derive(Debug, Serialize)]
pub struct TargetReport {
    /// Its name.
    pub target: String,
    /// The mode.
    pub mode: &'static str,
    /// Successful operations: connections (connect, idle) or queries (query).
    pub count: u64,
    /// Failed operations.
    pub errors: u64,
    /// The first failure, as one line.
    pub first_error: Option<String>,
    /// Time the target was measured (idle: time to open all connections).
    pub duration_s: f64,
    /// `count / duration_s`.
    pub rate_per_s: f64,
    /// Latency of successful operations (connect, idle: connect() to ReadyForQuery).
    pub latency_us: Summary,
    /// Connect mode: each setup phase on its own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phases: Option<PhaseReport>,
    /// Connect mode, TLS targets: connect() until the TLS session is established (TCP, the
    /// SSLRequest round trip if any, the handshake). Direct SSL should be one round trip less.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_established_us: Option<Summary>,
    /// Connect and query modes with `--pid`: the server's CPU time.
    #[serde(flatten)]
    pub cpu: Option<CpuReport>,
    /// Idle mode: memory.
    #[serde(flatten)]
    pub idle: Option<IdleReport>,
    /// The latency histogram, for the plot.
    #[serde(skip)]
    pub latency: Latency,
}

/// Connection setup phases (`phases` in the JSON), each measured from the previous one's end.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct PhaseReport {
    /// connect() until TCP established.
    pub tcp: Summary,
    /// TCP established until the server's `S` to SSLRequest (one round trip). Absent for
    /// direct SSL and without TLS, which send no SSLRequest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ssl_request: Option<Summary>,
    /// The TLS handshake, from the `S` (direct SSL: from TCP established); 0 without TLS.
    pub tls: Summary,
    /// TLS (or TCP) until AuthenticationOk.
    pub auth: Summary,
    /// AuthenticationOk until ReadyForQuery.
    pub ready: Summary,
}

impl From<&Phases> for PhaseReport {
    fn from(phases: &Phases) -> Self {
        PhaseReport {
            tcp: phases.tcp.summary(),
            ssl_request: recorded(&phases.ssl_request),
            tls: phases.tls.summary(),
            auth: phases.auth.summary(),
            ready: phases.ready.summary(),
        }
    }
}

/// The summary of a histogram that only some connections record; `None` if none did.
fn recorded(latency: &Latency) -> Option<Summary> {
    (latency.count() > 0).then(|| latency.summary())
}

/// The CPU time of a target's process during the target's recorded slices.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct CpuReport {
    /// The process measured.
    pub pid: u32,
    /// Its CPU time (user + system, all threads), seconds.
    pub cpu_s: f64,
    /// `cpu_s` per successful operation, microseconds; `None` without any.
    pub cpu_us_per_op: Option<f64>,
}

impl CpuReport {
    /// The report of `cpu` spent on `count` operations.
    pub fn new(cpu: &CpuUse, count: u64) -> CpuReport {
        let cpu_s = cpu.total().as_secs_f64();
        CpuReport {
            pid: cpu.pid,
            cpu_s: round(cpu_s, 6),
            cpu_us_per_op: (count > 0).then(|| round(cpu_s * 1e6 / count as f64, 3)),
        }
    }
}

/// Idle mode's memory figures.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct IdleReport {
    /// Where the connections were held (`--stage`).
    pub stage: &'static str,
    /// Connections asked for.
    pub connections_requested: u64,
    /// The process measured.
    pub pid: Option<u32>,
    /// Its VmRSS before, bytes.
    pub rss_bytes_before: Option<u64>,
    /// Its VmRSS with the connections open, bytes.
    pub rss_bytes_after: Option<u64>,
    /// (after - before) / connections open at the reading.
    pub bytes_per_connection: Option<f64>,
    /// Held connections the server closed before we did.
    pub closed_by_server: u64,
    /// Of those, the ones closed before the memory was read (left out of the per-connection
    /// figures).
    pub closed_before_reading: u64,
    /// How long the closed ones had been held (since reaching the stage), if any closed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub closed_after_us: Option<Summary>,
    /// `--process-tree`: the process and its descendants.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process_tree: Option<TreeReport>,
}

/// The memory of a process and its descendants (`process_tree` in the JSON).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct TreeReport {
    /// Processes before.
    pub processes_before: u64,
    /// Processes with the connections open.
    pub processes_after: u64,
    /// Summed Pss before, bytes.
    pub pss_bytes_before: u64,
    /// Summed Pss with the connections open, bytes.
    pub pss_bytes_after: u64,
    /// Summed page tables (VmPTE) before, bytes.
    pub page_table_bytes_before: u64,
    /// Summed page tables with the connections open, bytes.
    pub page_table_bytes_after: u64,
    /// Pss change / connections open at the reading.
    pub pss_bytes_per_connection: Option<f64>,
    /// Page-table change / connections open at the reading.
    pub page_table_bytes_per_connection: Option<f64>,
}

impl TargetReport {
    /// The report of `stats` for target `name`.
    pub fn new(name: &str, mode: &'static str, stats: TargetStats) -> TargetReport {
        let duration_s = stats.busy_s();
        let rate_per_s = if duration_s > 0.0 {
            stats.count as f64 / duration_s
        } else {
            0.0
        };
        TargetReport {
            target: name.to_owned(),
            mode,
            count: stats.count,
            errors: stats.errors,
            first_error: stats.first_error,
            duration_s: round(duration_s, 3),
            rate_per_s: round(rate_per_s, 1),
            latency_us: stats.latency.summary(),
            phases: (mode == "connect").then(|| PhaseReport::from(&stats.phases)),
            tls_established_us: (mode == "connect")
                .then(|| recorded(&stats.phases.tls_established))
                .flatten(),
            cpu: None,
            idle: None,
            latency: stats.latency,
        }
    }

    /// With the CPU time of the target's process, if it has one.
    pub fn with_cpu(mut self, cpu: Option<&CpuUse>) -> TargetReport {
        self.cpu = cpu.map(|cpu| CpuReport::new(cpu, self.count));
        self
    }

    /// The report of an idle-mode target.
    pub fn idle(name: &str, requested: u64, stage: Stage, result: IdleResult) -> TargetReport {
        let process_tree = match (result.tree_before, result.tree_after) {
            (Some(before), Some(after)) => Some(TreeReport {
                processes_before: before.processes,
                processes_after: after.processes,
                pss_bytes_before: before.pss_bytes,
                pss_bytes_after: after.pss_bytes,
                page_table_bytes_before: before.page_table_bytes,
                page_table_bytes_after: after.page_table_bytes,
                pss_bytes_per_connection: result.tree_pss_per_connection().map(|b| round(b, 1)),
                page_table_bytes_per_connection: result
                    .tree_page_tables_per_connection()
                    .map(|b| round(b, 1)),
            }),
            _ => None,
        };
        let idle = IdleReport {
            stage: stage.as_str(),
            connections_requested: requested,
            pid: result.pid,
            rss_bytes_before: result.rss_before,
            rss_bytes_after: result.rss_after,
            bytes_per_connection: result.bytes_per_connection().map(|b| round(b, 1)),
            closed_by_server: result.closed_by_server,
            closed_before_reading: result.closed_before_reading,
            closed_after_us: recorded(&result.closed_after),
            process_tree,
        };
        let mut report = TargetReport::new(name, "idle", result.stats);
        report.idle = Some(idle);
        report
    }
}

fn round(value: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (value * scale).round() / scale
}

impl Report {
    /// The JSON document.
    pub fn json(&self) -> String {
        // Plain data with string keys: serialization cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// The tables for a terminal.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let width = self
            .results
            .iter()
            .map(|r| r.target.len())
            .max()
            .unwrap_or(0)
            .max("target".len());
        let _ = writeln!(out, "{}\n", self.headline);
        if self.mode == "idle" {
            self.idle_table(&mut out, width);
        } else {
            self.latency_table(&mut out, width);
        }
        if self.mode == "connect" {
            self.phase_table(&mut out, width);
        }
        for r in &self.results {
            if let Some(error) = &r.first_error {
                let _ = writeln!(out, "\n{}: {} errors; first: {error}", r.target, r.errors);
            }
        }
        out
    }

    fn latency_table(&self, out: &mut String, width: usize) {
        let cpu = self.results.iter().any(|r| r.cpu.is_some());
        let _ = write!(
            out,
            "{:<width$} {:>9} {:>7} {:>12} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "target", "count", "errors", "rate/s", "p50", "p90", "p99", "p99.9", "max"
        );
        if cpu {
            let _ = write!(out, " {:>9} {:>9}", "cpu s", "cpu/op");
        }
        out.push('\n');
        for r in &self.results {
            let l = &r.latency_us;
            let _ = write!(
                out,
                "{:<width$} {:>9} {:>7} {:>12.1} {:>9} {:>9} {:>9} {:>9} {:>9}",
                r.target,
                r.count,
                r.errors,
                r.rate_per_s,
                us(l.p50),
                us(l.p90),
                us(l.p99),
                us(l.p999),
                us(l.max)
            );
            if cpu {
                let (cpu_s, per_op) = match &r.cpu {
                    Some(c) => (
                        format!("{:.3}", c.cpu_s),
                        c.cpu_us_per_op.map_or("-".into(), us),
                    ),
                    None => ("-".into(), "-".into()),
                };
                let _ = write!(out, " {cpu_s:>9} {per_op:>9}");
            }
            out.push('\n');
        }
    }

    fn phase_table(&self, out: &mut String, width: usize) {
        let _ = writeln!(
            out,
            "\nconnection phases, p50 / p99 (ssl_request: the SSLRequest round trip, - for direct \
             SSL; to tls: connect() until TLS is established):"
        );
        let _ = writeln!(
            out,
            "{:<width$} {:>19} {:>19} {:>19} {:>19} {:>19} {:>19}",
            "target", "tcp", "ssl_request", "tls", "auth", "ready", "to tls"
        );
        for r in &self.results {
            let Some(p) = &r.phases else { continue };
            let pair = |s: Option<&Summary>| {
                s.map_or("-".into(), |s| format!("{} / {}", us(s.p50), us(s.p99)))
            };
            let _ = writeln!(
                out,
                "{:<width$} {:>19} {:>19} {:>19} {:>19} {:>19} {:>19}",
                r.target,
                pair(Some(&p.tcp)),
                pair(p.ssl_request.as_ref()),
                pair(Some(&p.tls)),
                pair(Some(&p.auth)),
                pair(Some(&p.ready)),
                pair(r.tls_established_us.as_ref())
            );
        }
    }

    fn idle_table(&self, out: &mut String, width: usize) {
        let tree = self
            .results
            .iter()
            .any(|r| r.idle.is_some_and(|i| i.process_tree.is_some()));
        let _ = write!(
            out,
            "{:<width$} {:>8} {:>7} {:>7} {:>10} {:>9} {:>9} {:>11} {:>11} {:>10}",
            "target",
            "open",
            "closed",
            "errors",
            "open/s",
            "setup p50",
            "p99",
            "rss before",
            "rss after",
            "bytes/conn"
        );
        if tree {
            let _ = write!(
                out,
                " {:>9} {:>9} {:>9}",
                "processes", "pss/conn", "pte/conn"
            );
        }
        out.push('\n');
        let per_conn = |b: Option<f64>| b.map_or("-".into(), |b| format!("{b:.0}"));
        for r in &self.results {
            let Some(idle) = &r.idle else { continue };
            let _ = write!(
                out,
                "{:<width$} {:>8} {:>7} {:>7} {:>10.1} {:>9} {:>9} {:>11} {:>11} {:>10}",
                r.target,
                r.count,
                idle.closed_by_server,
                r.errors,
                r.rate_per_s,
                us(r.latency_us.p50),
                us(r.latency_us.p99),
                idle.rss_bytes_before.map_or("-".into(), bytes),
                idle.rss_bytes_after.map_or("-".into(), bytes),
                per_conn(idle.bytes_per_connection),
            );
            if tree {
                let (processes, pss, pte) = match &idle.process_tree {
                    Some(t) => (
                        format!("{}", t.processes_after),
                        per_conn(t.pss_bytes_per_connection),
                        per_conn(t.page_table_bytes_per_connection),
                    ),
                    None => ("-".into(), "-".into(), "-".into()),
                };
                let _ = write!(out, " {processes:>9} {pss:>9} {pte:>9}");
            }
            out.push('\n');
        }
        for r in &self.results {
            let Some(idle) = &r.idle else { continue };
            if idle.closed_by_server > 0 {
                let after = idle
                    .closed_after_us
                    .map_or("-".into(), |s| format!("{} / {}", us(s.p50), us(s.max)));
                let _ = writeln!(
                    out,
                    "\n{}: the server closed {} of the {} held connections ({} before the memory \
                     reading, left out of bytes/conn); held p50 / max before the close: {after}",
                    r.target, idle.closed_by_server, r.count, idle.closed_before_reading
                );
            }
        }
    }
}

/// A latency in microseconds, in the unit that reads best.
fn us(value: f64) -> String {
    if value < 100.0 {
        format!("{value:.1}µs")
    } else if value < 1_000.0 {
        format!("{value:.0}µs")
    } else if value < 1_000_000.0 {
        format!("{:.2}ms", value / 1_000.0)
    } else {
        format!("{:.2}s", value / 1_000_000.0)
    }
}

/// A byte count in binary units.
fn bytes(value: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = value as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn stats(count: u64, busy_ms: u64) -> TargetStats {
        let mut stats = TargetStats {
            count,
            ..TargetStats::default()
        };
        for _ in 0..count {
            stats.latency.record(Duration::from_micros(250));
            stats.phases.tls.record(Duration::from_micros(120));
        }
        stats.busy(0, Duration::from_millis(busy_ms));
        stats
    }

    #[test]
    fn rates_and_json_field_names() {
        let report = Report {
            mode: "connect",
            threads: 2,
            settings: serde_json::json!({"max": true}),
            results: vec![TargetReport::new("bg", "connect", stats(500, 2000))],
            headline: "connect".into(),
        };
        assert_eq!(report.results[0].rate_per_s, 250.0);
        let json: serde_json::Value = serde_json::from_str(&report.json()).expect("valid JSON");
        let r = &json["results"][0];
        assert_eq!(r["target"], "bg");
        assert_eq!(r["count"], 500);
        assert_eq!(r["duration_s"], 2.0);
        let close = |v: &serde_json::Value, want: f64| {
            let got = v.as_f64().expect("a number");
            assert!((got - want).abs() <= want * 0.001, "{got} vs {want}");
        };
        close(&r["latency_us"]["p50"], 250.0);
        close(&r["latency_us"]["p999"], 250.0);
        close(&r["phases"]["tls"]["p99"], 120.0);
        assert!(r["first_error"].is_null());
        assert!(r.get("rss_bytes_before").is_none());
        assert!(r.get("cpu_s").is_none() && r.get("pid").is_none());
        assert!(report.table().contains("250µs"), "{}", report.table());
        assert!(!report.table().contains("cpu"), "{}", report.table());
    }

    #[test]
    fn ssl_request_phase_only_where_one_was_sent() {
        let us = Duration::from_micros;
        let t0 = std::time::Instant::now();
        let timings = |ssl_request: Option<u64>, tls: Option<u64>| crate::client::Timings {
            start: t0,
            tcp: t0 + us(50),
            ssl_request: ssl_request.map(|d| t0 + us(d)),
            tls: tls.map(|d| t0 + us(d)),
            auth: t0 + us(2000),
            ready: t0 + us(2010),
        };
        // SSLRequest: its round trip ends at 90 µs, the handshake at 390 µs.
        let cases = [
            ("sslrequest", timings(Some(90), Some(390))),
            ("direct", timings(None, Some(350))),
            ("plain", timings(None, None)),
        ];
        let results = cases
            .iter()
            .map(|(name, t)| {
                let mut stats = TargetStats {
                    count: 1,
                    ..TargetStats::default()
                };
                stats.latency.record(t.ready - t.start);
                stats.phases.record(t);
                stats.busy(0, Duration::from_secs(1));
                TargetReport::new(name, "connect", stats)
            })
            .collect();
        let report = Report {
            mode: "connect",
            threads: 1,
            settings: serde_json::json!({}),
            results,
            headline: "connect".into(),
        };
        let json: serde_json::Value = serde_json::from_str(&report.json()).expect("valid JSON");
        let [req, direct, plain] = [0, 1, 2].map(|i| json["results"][i].clone());
        // Histograms keep 3 significant digits.
        let p50 = |v: &serde_json::Value, want: f64| {
            let got = v["p50"].as_f64().expect("a number");
            assert!((got - want).abs() <= want * 0.001, "{got} vs {want}");
        };
        p50(&req["phases"]["ssl_request"], 40.0);
        p50(&req["phases"]["tls"], 300.0);
        p50(&req["tls_established_us"], 390.0);
        assert!(direct["phases"].get("ssl_request").is_none(), "{direct}");
        p50(&direct["phases"]["tls"], 300.0);
        p50(&direct["tls_established_us"], 350.0);
        p50(&direct["phases"]["auth"], 1650.0);
        assert!(plain["phases"].get("ssl_request").is_none(), "{plain}");
        assert!(plain.get("tls_established_us").is_none(), "{plain}");
        p50(&plain["phases"]["tls"], 0.0);
        p50(&plain["phases"]["auth"], 1950.0);
        let table = report.table();
        let row = |name: &str| {
            table
                .lines()
                .rfind(|l| l.starts_with(name))
                .unwrap_or_else(|| panic!("no {name} row: {table}"))
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert!(
            row("sslrequest").contains("40.0µs / 40.0µs 300µs / 300µs"),
            "{table}"
        );
        assert!(row("direct").contains(" - 300µs / 300µs"), "{table}");
        assert!(row("direct").ends_with("350µs / 350µs"), "{table}");
        assert!(row("plain").ends_with(" -"), "{table}");
    }

    #[test]
    fn cpu_fields() {
        let ms = Duration::from_millis;
        let cpu = CpuUse {
            pid: 42,
            slices: vec![(1, ms(150)), (3, ms(100))],
        };
        let report = Report {
            mode: "query",
            threads: 2,
            settings: serde_json::json!({}),
            results: vec![
                TargetReport::new("bg", "query", stats(1000, 2000)).with_cpu(Some(&cpu)),
                TargetReport::new("idle", "query", stats(0, 2000)).with_cpu(Some(&cpu)),
                TargetReport::new("pg", "query", stats(10, 2000)).with_cpu(None),
            ],
            headline: "query".into(),
        };
        let json: serde_json::Value = serde_json::from_str(&report.json()).expect("valid JSON");
        let r = &json["results"];
        assert_eq!((&r[0]["pid"], &r[0]["cpu_s"]), (&42.into(), &0.25.into()));
        assert_eq!(r[0]["cpu_us_per_op"], 250.0);
        assert!(r[1]["cpu_us_per_op"].is_null() && r[1]["cpu_s"] == 0.25);
        assert!(r[2].get("cpu_s").is_none() && r[2].get("pid").is_none());
        let table = report.table();
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[2].ends_with("cpu s    cpu/op"), "{table}");
        assert!(lines[3].ends_with("0.250     250µs"), "{table}");
        assert!(lines[5].ends_with("-         -"), "{table}");
    }

    #[test]
    fn idle_fields() {
        let result = IdleResult {
            stats: stats(1000, 500),
            pid: Some(7),
            rss_before: Some(1 << 20),
            rss_after: Some((1 << 20) + 4_096_000),
            tree_before: None,
            tree_after: None,
            closed_by_server: 0,
            closed_before_reading: 0,
            closed_after: Latency::new(),
        };
        let report = TargetReport::idle("bg", 1000, Stage::Tls, result);
        let json = serde_json::to_value(&report).expect("serializes");
        assert_eq!(json["bytes_per_connection"], 4096.0);
        assert_eq!(json["rss_bytes_before"], 1 << 20);
        assert_eq!(json["connections_requested"], 1000);
        assert_eq!(json["stage"], "tls");
        assert_eq!(json["closed_by_server"], 0);
        assert!(json.get("closed_after_us").is_none());
        assert!(json.get("process_tree").is_none());
        assert!(json.get("phases").is_none());
    }

    #[test]
    fn idle_closes_and_process_tree() {
        use crate::sys::TreeMemory;
        let mut closed_after = Latency::new();
        for _ in 0..100 {
            closed_after.record(Duration::from_secs(5));
        }
        let tree = |processes, pss_bytes| TreeMemory {
            processes,
            pss_bytes,
            page_table_bytes: processes * 100_000,
        };
        let result = IdleResult {
            stats: stats(1000, 500),
            pid: Some(7),
            rss_before: Some(1 << 20),
            rss_after: Some(1 << 20),
            tree_before: Some(tree(6, 40_000_000)),
            tree_after: Some(tree(906, 940_000_000)),
            closed_by_server: 100,
            closed_before_reading: 100,
            closed_after,
        };
        let report = Report {
            mode: "idle",
            threads: 2,
            settings: serde_json::json!({}),
            results: vec![TargetReport::idle("pg", 1000, Stage::Tcp, result)],
            headline: "idle".into(),
        };
        let json: serde_json::Value = serde_json::from_str(&report.json()).expect("valid JSON");
        let r = &json["results"][0];
        assert_eq!(
            (
                r["closed_by_server"].as_u64(),
                r["closed_before_reading"].as_u64()
            ),
            (Some(100), Some(100))
        );
        assert!(
            (r["closed_after_us"]["p50"].as_f64().expect("p50") - 5e6).abs() < 5e3,
            "{r}"
        );
        assert_eq!(r["bytes_per_connection"], 0.0);
        let t = &r["process_tree"];
        assert_eq!(
            (
                t["processes_before"].as_u64(),
                t["processes_after"].as_u64()
            ),
            (Some(6), Some(906))
        );
        assert_eq!(t["pss_bytes_per_connection"], 1_000_000.0);
        assert_eq!(t["page_table_bytes_per_connection"], 100_000.0);
        let table = report.table();
        assert!(table.contains("processes  pss/conn  pte/conn"), "{table}");
        assert!(table.contains("906   1000000    100000"), "{table}");
        assert!(
            table.contains("pg: the server closed 100 of the 1000 held connections (100 before"),
            "{table}"
        );
    }

    #[test]
    fn units() {
        assert_eq!(us(45.25), "45.2µs");
        assert_eq!(us(450.0), "450µs");
        assert_eq!(us(4_500.0), "4.50ms");
        assert_eq!(us(4_500_000.0), "4.50s");
        assert_eq!(bytes(512), "512.0 B");
        assert_eq!(bytes(3 * 1024 * 1024), "3.0 MiB");
    }
}
