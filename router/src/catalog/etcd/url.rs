//! `catalog = "etcd://host:2379,host:2379/prefix"`: where an etcd catalog lives.
//!
//! The endpoints are the etcd members the router may talk to (the client balances over them);
//! the prefix is the key under which branchgate keeps everything it writes (the layout is in
//! [`super::layout`]), so one etcd cluster can hold several fleets' catalogs side by side.

use std::fmt;
use std::str::FromStr;

/// The URL scheme of an etcd catalog.
pub const SCHEME: &str = "etcd://";
/// etcd's client port, used when an endpoint names none.
pub const DEFAULT_PORT: u16 = 2379;

/// A parsed `etcd://` catalog URL. Exists only if valid: at least one endpoint, each a host
/// and a port, and a prefix of one or more `/`-separated segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdUrl {
    /// The members, in the order written; at least one.
    endpoints: Vec<Endpoint>,
    /// `/seg/seg`: a leading `/`, no trailing one.
    prefix: String,
}

/// One etcd member: a host name or IP address, and its client port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// A DNS name, an IPv4 address, or an IPv6 address without its brackets.
    pub host: String,
    /// The client port (2379 unless written).
    pub port: u16,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Why a `catalog = "etcd://..."` value was rejected. The text completes "catalog: ...".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EtcdUrlError {
    /// Nothing between `etcd://` and the prefix.
    #[error("etcd URL names no endpoint: write etcd://host:2379/prefix")]
    NoEndpoint,
    /// An empty item in the comma-separated endpoint list.
    #[error("etcd URL has an empty endpoint (two commas in a row, or a trailing comma)")]
    EmptyEndpoint,
    /// An endpoint that is not `host`, `host:port` or `[v6]:port`.
    #[error("etcd endpoint {0:?} is not host:port")]
    BadEndpoint(String),
    /// A port that is not a number from 1 to 65535.
    #[error("etcd endpoint {0:?} has an invalid port")]
    BadPort(String),
    /// `user:password@` in the URL: credentials do not belong in router.toml's catalog line.
    #[error(
        "etcd URL must not hold credentials (user@host): etcd authentication is not supported yet"
    )]
    Credentials,
    /// `?` or `#` in the URL.
    #[error("etcd URL must not have a query or fragment")]
    QueryOrFragment,
    /// No `/prefix` after the endpoints.
    #[error(
        "etcd URL names no key prefix: write etcd://host:2379/branchgate (everything branchgate \
         keeps in etcd lives under it)"
    )]
    NoPrefix,
    /// A prefix segment that is empty or has characters other than `A-Z a-z 0-9 . _ ~ -`.
    #[error(
        "etcd key prefix {0:?} is not valid: segments of A-Z, a-z, 0-9, '.', '_', '~' and '-', \
         separated by single '/'"
    )]
    BadPrefix(String),
}

impl EtcdUrl {
    /// Whether a `catalog` value names an etcd catalog (rather than a file).
    pub fn is_etcd(value: &str) -> bool {
        value.starts_with(SCHEME)
    }

    /// The endpoints, in the order written.
    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    /// The endpoints as the etcd client takes them (`http://host:port`): plain gRPC, since TLS
    /// towards etcd is not configurable yet.
    pub fn client_endpoints(&self) -> Vec<String> {
        self.endpoints
            .iter()
            .map(|endpoint| format!("http://{endpoint}"))
            .collect()
    }

    /// The key prefix: a leading `/`, no trailing `/` (`/branchgate`, `/prod/eu/branchgate`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

impl fmt::Display for EtcdUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(SCHEME)?;
        for (i, endpoint) in self.endpoints.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{endpoint}")?;
        }
        f.write_str(&self.prefix)
    }
}

impl FromStr for EtcdUrl {
    type Err = EtcdUrlError;

    fn from_str(text: &str) -> Result<EtcdUrl, EtcdUrlError> {
        let rest = text.strip_prefix(SCHEME).ok_or(EtcdUrlError::NoEndpoint)?;
        if rest.contains(['?', '#']) {
            return Err(EtcdUrlError::QueryOrFragment);
        }
        let (authority, path) = match rest.find('/') {
            Some(slash) => rest.split_at(slash),
            None => (rest, ""),
        };
        if authority.contains('@') {
            return Err(EtcdUrlError::Credentials);
        }
        if authority.is_empty() {
            return Err(EtcdUrlError::NoEndpoint);
        }
        let endpoints = authority
            .split(',')
            .map(parse_endpoint)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(EtcdUrl {
            endpoints,
            prefix: parse_prefix(path)?,
        })
    }
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
fn parse_endpoint(text: &str) -> Result<Endpoint, EtcdUrlError> {
    if text.is_empty() {
        return Err(EtcdUrlError::EmptyEndpoint);
    }
    let bad = || EtcdUrlError::BadEndpoint(text.to_owned());
    let (host, port) = if let Some(bracketed) = text.strip_prefix('[') {
        let (host, after) = bracketed.split_once(']').ok_or_else(bad)?;
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(bad());
        }
        match after {
            "" => (host, None),
            _ => (host, Some(after.strip_prefix(':').ok_or_else(bad)?)),
        }
    } else {
        match text.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (text, None),
        }
    };
    let host_ok = !host.is_empty()
        && (host.contains(':')
            || host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')));
    if !host_ok {
        return Err(bad());
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(port) => match port.parse::<u16>() {
            Ok(port) if port != 0 => port,
            _ => return Err(EtcdUrlError::BadPort(text.to_owned())),
        },
    };
    Ok(Endpoint {
        host: host.to_owned(),
        port,
    })
}

/// `/seg/seg` (a trailing `/` is dropped).
fn parse_prefix(path: &str) -> Result<String, EtcdUrlError> {
    let trimmed = path.strip_suffix('/').unwrap_or(path);
    let Some(segments) = trimmed.strip_prefix('/') else {
        return Err(EtcdUrlError::NoPrefix);
    };
    if segments.is_empty() {
        return Err(EtcdUrlError::NoPrefix);
    }
    let segment_ok = |segment: &str| {
        !segment.is_empty()
            && segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'-'))
    };
    if !segments.split('/').all(segment_ok) {
        return Err(EtcdUrlError::BadPrefix(path.to_owned()));
    }
    Ok(trimmed.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(text: &str) -> EtcdUrl {
        text.parse()
            .unwrap_or_else(|e| panic!("{text} rejected: {e}"))
    }

    fn error(text: &str) -> EtcdUrlError {
        match text.parse::<EtcdUrl>() {
            Ok(url) => panic!("{text} accepted as {url:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn endpoints_and_prefix() {
        let parsed = url("etcd://10.0.0.1:2379,etcd-2.internal:12379,[::1]:2379/branchgate");
        let endpoints: Vec<String> = parsed.endpoints().iter().map(|e| e.to_string()).collect();
        assert_eq!(
            endpoints,
            ["10.0.0.1:2379", "etcd-2.internal:12379", "[::1]:2379"]
        );
        assert_eq!(parsed.prefix(), "/branchgate");
        assert_eq!(
            parsed.client_endpoints(),
            [
                "http://10.0.0.1:2379",
                "http://etcd-2.internal:12379",
                "http://[::1]:2379"
            ]
        );
        assert_eq!(
            parsed.to_string(),
            "etcd://10.0.0.1:2379,etcd-2.internal:12379,[::1]:2379/branchgate"
        );
    }

    #[test]
    fn defaults_and_normalisation() {
        let parsed = url("etcd://localhost,[::1]/prod/eu-1/branchgate/");
        assert_eq!(parsed.endpoints()[0].port, DEFAULT_PORT);
        assert_eq!(parsed.endpoints()[1].host, "::1");
        assert_eq!(parsed.endpoints()[1].port, DEFAULT_PORT);
        assert_eq!(parsed.prefix(), "/prod/eu-1/branchgate");
        assert_eq!(
            parsed.to_string(),
            "etcd://localhost:2379,[::1]:2379/prod/eu-1/branchgate"
        );
        assert!(EtcdUrl::is_etcd("etcd://x/y"));
        assert!(!EtcdUrl::is_etcd("catalog.toml"));
        assert!(!EtcdUrl::is_etcd("etcd.toml"));
    }

    #[test]
    fn rejections_say_what_is_wrong() {
        assert_eq!(error("etcd:///branchgate"), EtcdUrlError::NoEndpoint);
        assert_eq!(error("etcd://a:1,,b:2/p"), EtcdUrlError::EmptyEndpoint);
        assert_eq!(error("etcd://a:1,/p"), EtcdUrlError::EmptyEndpoint);
        assert_eq!(error("etcd://a:1"), EtcdUrlError::NoPrefix);
        assert_eq!(error("etcd://a:1/"), EtcdUrlError::NoPrefix);
        assert_eq!(
            error("etcd://a:1//x"),
            EtcdUrlError::BadPrefix("//x".into())
        );
        assert_eq!(
            error("etcd://a:1/x y"),
            EtcdUrlError::BadPrefix("/x y".into())
        );
        assert_eq!(
            error("etcd://a:99999/p"),
            EtcdUrlError::BadPort("a:99999".into())
        );
        assert_eq!(error("etcd://a:0/p"), EtcdUrlError::BadPort("a:0".into()));
        assert_eq!(error("etcd://a:/p"), EtcdUrlError::BadPort("a:".into()));
        assert_eq!(
            error("etcd://::1:2379/p"),
            EtcdUrlError::BadEndpoint("::1:2379".into())
        );
        assert_eq!(
            error("etcd://[zz]:1/p"),
            EtcdUrlError::BadEndpoint("[zz]:1".into())
        );
        assert_eq!(
            error("etcd://a b:1/p"),
            EtcdUrlError::BadEndpoint("a b:1".into())
        );
        assert_eq!(error("etcd://u:pw@a:1/p"), EtcdUrlError::Credentials);
        assert_eq!(error("etcd://a:1/p?x=1"), EtcdUrlError::QueryOrFragment);
    }
}
