//! Source addresses: idle mode's own spread over 127.0.0.0/8 when one address could run out of
//! ephemeral ports.
//!
//! Towards one server address and port, one source address has only the kernel's ephemeral
//! port range (`/proc/sys/net/ipv4/ip_local_port_range`, 28,232 ports by default): that caps
//! the connections from it, and sockets in TIME_WAIT from earlier runs hold some of the ports.
//! All of 127.0.0.0/8 is this host, so binding each connection to one of many loopback
//! addresses (round robin, [`crate::settings::Common::source_ip`]) lifts the cap.
//! `--source-ips` (a list, or `none`) overrides the choice made here.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use crate::target::Target;

/// The first loopback source address idle mode picks (127.0.0.1 stays the servers' own).
pub const FIRST_AUTO_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// The most addresses idle mode picks (127.0.0.2 to 127.1.0.1).
const MAX_AUTO_SOURCES: usize = 1 << 16;

/// What idle mode does about source addresses when `--source-ips` is not given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Spread {
    /// One address has ports enough: the kernel chooses.
    Unneeded,
    /// Bind these, round robin.
    Loopback(Vec<IpAddr>),
    /// One address may run out, but a target is not an IPv4 loopback address: why.
    Impossible(String),
}

/// The connections one source address carries at most towards one target: half its ephemeral
/// ports, leaving the rest to other sockets and to TIME_WAIT.
pub fn per_address(ephemeral_ports: u32) -> usize {
    usize::try_from(ephemeral_ports / 2).map_or(usize::MAX, |n| n.max(1))
}

/// The source addresses for `connections` to each of `targets` (one target at a time, as idle
/// mode opens them), given `ephemeral_ports` per address.
pub fn spread(connections: usize, targets: &[Target], ephemeral_ports: u32) -> Spread {
    let per_address = per_address(ephemeral_ports);
    if connections <= per_address {
        return Spread::Unneeded;
    }
    if let Some(target) = targets.iter().find(|t| !is_ipv4_loopback(t.addr)) {
        return Spread::Impossible(format!(
            "target '{}' ({}) is not an IPv4 loopback address, so its connections cannot be \
             spread over 127.0.0.0/8; give --source-ips addresses that reach it",
            target.name, target.addr
        ));
    }
    let count = connections.div_ceil(per_address).min(MAX_AUTO_SOURCES);
    let first = u32::from(FIRST_AUTO_SOURCE);
    // count <= 2^16, so the addresses stay inside 127.0.0.0/8.
    let addresses = (0..count as u32)
        .map(|i| IpAddr::V4(Ipv4Addr::from(first + i)))
        .collect();
    Spread::Loopback(addresses)
}

fn is_ipv4_loopback(addr: SocketAddr) -> bool {
    matches!(addr.ip(), IpAddr::V4(ip) if ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(host: &str) -> Target {
        Target::parse(&format!("t=postgres://u@{host}:5432?sslmode=disable"))
            .unwrap_or_else(|(_, e)| panic!("{host}: {e}"))
    }

    #[test]
    fn spreads_only_when_one_address_could_run_out() {
        let loopback = [target("127.0.0.1"), target("127.0.0.9")];
        assert_eq!(per_address(28_232), 14_116);
        assert_eq!(spread(14_116, &loopback, 28_232), Spread::Unneeded);
        let Spread::Loopback(ips) = spread(14_117, &loopback, 28_232) else {
            panic!("two addresses needed")
        };
        assert_eq!(
            ips,
            [IpAddr::from([127, 0, 0, 2]), IpAddr::from([127, 0, 0, 3])]
        );
        // A narrow port range: 100 ports, 50 connections per address.
        let Spread::Loopback(ips) = spread(100_000, &loopback, 100) else {
            panic!("many addresses needed")
        };
        assert_eq!(ips.len(), 2000);
        assert_eq!(ips[1999], IpAddr::from([127, 0, 7, 209]));
        let Spread::Loopback(ips) = spread(usize::MAX, &loopback, 2) else {
            panic!("capped")
        };
        assert_eq!(ips.len(), MAX_AUTO_SOURCES);
        assert!(ips
            .iter()
            .all(|ip| matches!(ip, IpAddr::V4(v4) if v4.octets()[0] == 127)));
    }

    #[test]
    fn cannot_spread_to_ipv6_or_remote_targets() {
        for host in ["[::1]", "10.1.2.3"] {
            let targets = [target("127.0.0.1"), target(host)];
            let Spread::Impossible(why) = spread(50_000, &targets, 28_232) else {
                panic!("{host}")
            };
            assert!(why.contains("not an IPv4 loopback address"), "{why}");
            assert_eq!(spread(100, &targets, 28_232), Spread::Unneeded);
        }
    }
}
