//! `[listen] proxy_from`: the load balancers whose connections must begin with a PROXY protocol
//! v2 header naming the client ([`crate::front_door::proxy_header`]).
//!
//! ```toml
//! [listen]
//! proxy_from = ["10.0.0.5", "10.0.1.0/24", "::1"]
//! ```
//!
//! Addresses and CIDR prefixes, IPv4 or IPv6. Empty (the default): no connection may send one,
//! and a header is what it would be without the setting, bad input. The PROXY protocol lets
//! whoever sends the header choose the address the router sees, so the specification asks
//! receivers to take it only from trusted sources, and never to guess whether one is there:
//! from a listed address it is required, from any other it is not looked for.

use std::net::IpAddr;
use std::ops::Range;

use ipnet::{IpNet, Ipv4Net};
use toml::Spanned;

/// The addresses allowed, and required, to send a PROXY header. Every entry is a prefix with
/// no host bits set, IPv4-mapped IPv6 prefixes written as IPv4 (so that they match the
/// canonical peer addresses [`ProxyFrom::contains`] compares).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyFrom {
    nets: Box<[IpNet]>,
}

impl ProxyFrom {
    /// Parses the list as written; an error names the entry's span and what is wrong with it.
    pub(super) fn parse(
        raw: Option<Vec<Spanned<String>>>,
    ) -> Result<ProxyFrom, (Range<usize>, String)> {
        let nets = raw
            .unwrap_or_default()
            .into_iter()
            .map(|entry| entry_net(entry.get_ref()).map_err(|message| (entry.span(), message)))
            .collect::<Result<Box<[IpNet]>, _>>()?;
        Ok(ProxyFrom { nets })
    }

    /// Whether a connection from `peer` must begin with a PROXY header. An IPv4 client of a
    /// dual-stack listener (`::ffff:a.b.c.d`) is compared as the IPv4 address it is.
    pub fn contains(&self, peer: IpAddr) -> bool {
        let peer = peer.to_canonical();
        self.nets.iter().any(|net| net.contains(&peer))
    }

    /// True when no address is listed (PROXY headers are never taken).
    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }

    /// The prefixes, as parsed.
    pub fn nets(&self) -> &[IpNet] {
        &self.nets
    }
}

/// One entry: an address (a prefix of its full length) or a CIDR prefix.
fn entry_net(text: &str) -> Result<IpNet, String> {
    let net = match text.parse::<IpAddr>() {
        Ok(address) => IpNet::from(address),
        Err(_) => text.parse::<IpNet>().map_err(|_| {
            format!(
                "[listen] proxy_from: {text:?} is not an IP address or a CIDR prefix \
                 (such as \"10.0.0.5\", \"10.0.1.0/24\" or \"2001:db8::/64\")"
            )
        })?,
    };
    // 10.0.1.5/24 is most likely 10.0.1.0/24 or 10.0.1.5 mistyped; which one is the
    // operator's to say, and trusting 255 more addresses than meant would be the worse guess.
    if net.trunc() != net {
        return Err(format!(
            "[listen] proxy_from: {text:?} has bits set past its prefix length: write {} for \
             the network, or the address alone",
            net.trunc()
        ));
    }
    Ok(canonical(net))
}

/// An IPv4-mapped IPv6 prefix (`::ffff:10.0.0.0/120`) as the IPv4 prefix it covers.
fn canonical(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.network().to_ipv4_mapped() {
            Some(v4) => Ipv4Net::new(v4, v6.prefix_len() - 96).map_or(net, IpNet::V4),
            None => net,
        },
        net => net,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(entries: &[&str]) -> Result<ProxyFrom, String> {
        let raw = entries
            .iter()
            .enumerate()
            .map(|(i, e)| Spanned::new(i..i + 1, (*e).to_owned()))
            .collect();
        ProxyFrom::parse(Some(raw)).map_err(|(_, message)| message)
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("address")
    }

    #[test]
    fn addresses_and_prefixes_of_both_families() {
        let from = list(&["10.0.0.5", "10.0.1.0/24", "::1", "2001:db8::/64"]).expect("valid");
        for listed in ["10.0.0.5", "10.0.1.0", "10.0.1.255", "::1", "2001:db8::42"] {
            assert!(from.contains(ip(listed)), "{listed}");
        }
        for unlisted in [
            "10.0.0.6",
            "10.0.2.1",
            "::2",
            "2001:db8:0:1::1",
            "127.0.0.1",
        ] {
            assert!(!from.contains(ip(unlisted)), "{unlisted}");
        }
        assert_eq!(from.nets().len(), 4);
    }

    #[test]
    fn ipv4_clients_of_a_dual_stack_listener_match_ipv4_entries() {
        let from = list(&["10.0.0.5", "::ffff:192.0.2.0/120"]).expect("valid");
        assert!(from.contains(ip("::ffff:10.0.0.5")));
        assert!(from.contains(ip("192.0.2.77")));
        assert!(from.contains(ip("::ffff:192.0.2.77")));
        assert!(!from.contains(ip("::ffff:10.0.0.6")));
        assert_eq!(
            from.nets()[1],
            "192.0.2.0/24".parse::<IpNet>().expect("net")
        );
    }

    #[test]
    fn empty_by_default_and_then_nobody_is_listed() {
        let from = ProxyFrom::parse(None).expect("default");
        assert!(from.is_empty());
        assert!(!from.contains(ip("127.0.0.1")));
        assert!(list(&[]).expect("empty list").is_empty());
    }

    #[test]
    fn mistakes_are_named() {
        for (entry, says) in [
            ("10.0.0.256", "is not an IP address or a CIDR prefix"),
            ("balancer.internal", "is not an IP address or a CIDR prefix"),
            ("10.0.0.0/33", "is not an IP address or a CIDR prefix"),
            ("10.0.0.5:5432", "is not an IP address or a CIDR prefix"),
            ("", "is not an IP address or a CIDR prefix"),
            ("10.0.1.5/24", "write 10.0.1.0/24 for the network"),
            ("2001:db8::1/64", "write 2001:db8::/64 for the network"),
        ] {
            let error = list(&["10.0.0.1", entry]).expect_err(entry);
            assert!(
                error.starts_with("[listen] proxy_from: ") && error.contains(says),
                "{entry}: {error}"
            );
        }
    }
}
