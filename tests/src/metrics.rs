//! The router's admin endpoint over plain HTTP/1.1 (`[listen] admin`): `/metrics` pages and the
//! samples in them, for tests that watch counters move.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// How long a request may take.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

/// `METHOD path` on `addr` over HTTP/1.1: (status, body).
pub fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connect to the admin endpoint");
    stream
        .set_read_timeout(Some(HTTP_TIMEOUT))
        .expect("read timeout");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("read the response");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end: {response:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status: {head:?}"));
    (status, body.to_owned())
}

/// `GET /metrics` on `addr`: the page (the status must be 200).
pub fn scrape(addr: SocketAddr) -> String {
    let (status, body) = http(addr, "GET", "/metrics");
    assert_eq!(status, 200, "{body}");
    body
}

/// The sum of the samples of `name` whose labels include each of `labels` (`key="value"`);
/// panics if there is none.
pub fn sample(text: &str, name: &str, labels: &[&str]) -> f64 {
    let mut found = false;
    let sum = text
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            (metric == name && labels.iter().all(|l| rest.contains(l)))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .inspect(|_| found = true)
        .sum();
    assert!(found, "no {name} {labels:?} in:\n{text}");
    sum
}

/// The value of the first sample whose line starts with `series` (its name and labels as
/// written, e.g. `branchgate_fleet_nodes ` or `name{label="v"}`), if there is one.
pub fn series(text: &str, series: &str) -> Option<i64> {
    text.lines()
        .find(|line| line.starts_with(series))
        .and_then(|line| line.rsplit_once(' '))
        .and_then(|(_, value)| value.parse().ok())
}
