//! Source addresses as the connections really use them: a listener on 127.0.0.1 records the
//! peer address of every connection the load generator's workers make.

use std::net::{IpAddr, TcpListener};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use branchgate_loadgen::cli::{Cli, ModeArgs};
use branchgate_loadgen::modes::Local;
use branchgate_loadgen::runtime::{block_on, Counters};
use branchgate_loadgen::settings::Common;
use branchgate_loadgen::source::Spread;
use clap::Parser;

/// A listener that accepts `count` connections, hangs up on each, and returns their peers'
/// addresses in order.
fn recording_listener(count: usize) -> (u16, JoinHandle<Vec<IpAddr>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let peers = thread::spawn(move || {
        (0..count)
            .map(|_| listener.accept().expect("accept").1.ip())
            .collect()
    });
    (port, peers)
}

/// Idle-mode settings for a plaintext target on `port`, with `extra` arguments.
fn common(port: u16, extra: &[&str]) -> Common {
    let target = format!("t=postgres://u@127.0.0.1:{port}?sslmode=disable");
    let argv = [
        "branchgate-loadgen",
        "idle",
        "--connections",
        "1",
        "--target",
        &target,
    ];
    let cli = Cli::try_parse_from(argv.iter().chain(extra)).expect("valid arguments");
    let ModeArgs::Idle(args) = cli.mode else {
        panic!("idle mode")
    };
    Common::from_args(args.common).expect("valid settings")
}

/// Makes `rounds` connections from each worker thread's [`Local`] in turn (thread 0, 1, ..,
/// 0, 1, ..), each one after the other; the listener hangs up on each.
fn connect_in_turn(common: Common, rounds: usize) {
    let common = Arc::new(common);
    block_on(async {
        let counters = Arc::new(Counters::default());
        let locals: Vec<Local> = (0..common.threads)
            .map(|thread| Local::new(common.clone(), counters.clone(), thread).expect("local"))
            .collect();
        for _ in 0..rounds {
            for local in &locals {
                // The listener speaks no PostgreSQL: only the TCP connection matters here.
                let error = local.connect(0).await.expect_err("listener hangs up");
                assert!(!error.to_string().starts_with("connect:"), "{error}");
            }
        }
    })
    .expect("runtime");
}

fn loopback(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

#[test]
fn given_addresses_are_used_round_robin_across_threads() {
    let (port, peers) = recording_listener(6);
    let common = common(
        port,
        &["--threads", "2", "--source-ips", "127.0.0.2-127.0.0.4"],
    );
    connect_in_turn(common, 3);
    // Connection n of thread t uses address (n * threads + t) mod 3: together they walk the
    // addresses in order.
    let want = [2, 3, 4, 2, 3, 4].map(loopback);
    assert_eq!(peers.join().expect("listener"), want);
}

#[test]
fn idle_spreads_over_loopback_when_one_address_could_run_out() {
    // Four ephemeral ports: two connections per address, so five need three addresses.
    let (port, peers) = recording_listener(6);
    let mut spread = common(port, &["--threads", "1"]);
    let Spread::Loopback(ips) = spread.spread_sources(5, 4) else {
        panic!("five connections do not fit one address with four ports")
    };
    assert_eq!(ips, [2, 3, 4].map(loopback));
    connect_in_turn(spread, 6);
    assert_eq!(
        peers.join().expect("listener"),
        [2, 3, 4, 2, 3, 4].map(loopback)
    );

    // Few connections, or addresses given (`none` among them): the kernel's choice or those.
    let (port, peers) = recording_listener(3);
    let mut few = common(port, &["--threads", "1"]);
    assert_eq!(few.spread_sources(2, 4), Spread::Unneeded);
    let mut none = common(port, &["--threads", "1", "--source-ips", "none"]);
    assert_eq!(none.spread_sources(5, 4), Spread::Unneeded);
    let mut given = common(port, &["--threads", "1", "--source-ips", "127.0.0.9"]);
    assert_eq!(given.spread_sources(5, 4), Spread::Unneeded);
    for common in [few, none, given] {
        connect_in_turn(common, 1);
    }
    assert_eq!(
        peers.join().expect("listener"),
        [1, 1, 9].map(loopback),
        "kernel's choice twice, then the given address"
    );
}
