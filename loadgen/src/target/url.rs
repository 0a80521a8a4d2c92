//! Parsing `postgres://USER:PASSWORD@HOST:PORT/DB?PARAMS` into a [`TargetUrl`].

use std::path::PathBuf;

use super::TargetError;

/// PostgreSQL's port when the URL names none.
const DEFAULT_PORT: u16 = 5432;

/// How TLS is used (`sslmode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    /// Plain TCP.
    Disable,
    /// TLS without checking the server certificate.
    Require,
    /// TLS, certificate chain and host name checked.
    VerifyFull,
}

/// How TLS starts (`sslnegotiation`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslNegotiation {
    /// SSLRequest, `S`, then the handshake.
    Postgres,
    /// The handshake at once, with ALPN `postgresql` (PostgreSQL 17).
    Direct,
}

/// A parsed target URL.
#[derive(Clone, PartialEq, Eq)]
pub struct TargetUrl {
    /// User name, possibly with `{branch}`.
    pub user: String,
    /// Password (may be empty).
    pub password: String,
    /// Host name or IP address (without IPv6 brackets).
    pub host: String,
    /// Port.
    pub port: u16,
    /// Database, if the URL has a path.
    pub database: Option<String>,
    /// `sslmode`.
    pub sslmode: SslMode,
    /// `sslnegotiation`.
    pub negotiation: SslNegotiation,
    /// `sslrootcert`.
    pub rootcert: Option<PathBuf>,
    /// `application_name`.
    pub application_name: Option<String>,
}

impl std::fmt::Debug for TargetUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetUrl")
            .field("user", &self.user)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("database", &self.database)
            .field("sslmode", &self.sslmode)
            .field("negotiation", &self.negotiation)
            .finish_non_exhaustive()
    }
}

impl TargetUrl {
    /// Parses a `postgres://` URL.
    pub fn parse(text: &str) -> Result<TargetUrl, TargetError> {
        let rest = text
            .strip_prefix("postgres://")
            .or_else(|| text.strip_prefix("postgresql://"))
            .ok_or(TargetError::Scheme)?;
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (userinfo, hostport) = authority.rsplit_once('@').ok_or(TargetError::MissingUser)?;
        let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
        let user = decode(user, "user name")?;
        if user.is_empty() {
            return Err(TargetError::MissingUser);
        }
        let (host, port) = split_host_port(hostport)?;
        let mut url = TargetUrl {
            user,
            password: decode(password, "password")?,
            host,
            port,
            database: (!path.is_empty())
                .then(|| decode(path, "database name"))
                .transpose()?,
            sslmode: SslMode::Require,
            negotiation: SslNegotiation::Postgres,
            rootcert: None,
            application_name: None,
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = decode(value, "URL parameters")?;
            url.set(key, value)?;
        }
        if url.negotiation == SslNegotiation::Direct && url.sslmode == SslMode::Disable {
            return Err(TargetError::DirectNeedsTls);
        }
        if url.sslmode == SslMode::VerifyFull && url.rootcert.is_none() {
            return Err(TargetError::VerifyFullNeedsRootCert);
        }
        Ok(url)
    }

    fn set(&mut self, key: &str, value: String) -> Result<(), TargetError> {
        let bad = |param, expected, value| TargetError::BadValue {
            param,
            value,
            expected,
        };
        match key {
            "sslmode" => {
                self.sslmode = match value.as_str() {
                    "disable" => SslMode::Disable,
                    "require" => SslMode::Require,
                    "verify-full" => SslMode::VerifyFull,
                    _ => return Err(bad("sslmode", "disable, require or verify-full", value)),
                }
            }
            "sslnegotiation" => {
                self.negotiation = match value.as_str() {
                    "postgres" => SslNegotiation::Postgres,
                    "direct" => SslNegotiation::Direct,
                    _ => return Err(bad("sslnegotiation", "postgres or direct", value)),
                }
            }
            "sslrootcert" => self.rootcert = Some(PathBuf::from(value)),
            "application_name" => self.application_name = Some(value),
            other => return Err(TargetError::UnknownParameter(other.to_owned())),
        }
        Ok(())
    }
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
fn split_host_port(hostport: &str) -> Result<(String, u16), TargetError> {
    let (host, port) = if let Some(rest) = hostport.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or(TargetError::MissingHost)?;
        (host, after.strip_prefix(':'))
    } else {
        match hostport.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (hostport, None),
        }
    };
    if host.is_empty() {
        return Err(TargetError::MissingHost);
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(text) => match text.parse::<u16>() {
            Ok(port) if port > 0 => port,
            _ => return Err(TargetError::BadPort(text.to_owned())),
        },
    };
    Ok((host.to_owned(), port))
}

/// Percent-decodes `text` (`+` is not special).
fn decode(text: &str, what: &'static str) -> Result<String, TargetError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .ok_or(TargetError::BadEscape(what))?;
            let hex = std::str::from_utf8(hex).map_err(|_| TargetError::BadEscape(what))?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| TargetError::BadEscape(what))?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| TargetError::BadEscape(what))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_url() {
        let url = TargetUrl::parse(
            "postgres://app.%7Bbranch%7D%7Creplica:p%40ss:w@db.example:6432/shop%2F1?\
             sslmode=verify-full&sslnegotiation=direct&sslrootcert=/tmp/ca.pem&application_name=lg",
        )
        .expect("valid");
        assert_eq!(url.user, "app.{branch}|replica");
        assert_eq!(url.password, "p@ss:w");
        assert_eq!((url.host.as_str(), url.port), ("db.example", 6432));
        assert_eq!(url.database.as_deref(), Some("shop/1"));
        assert_eq!(url.sslmode, SslMode::VerifyFull);
        assert_eq!(url.negotiation, SslNegotiation::Direct);
        assert_eq!(url.rootcert, Some(PathBuf::from("/tmp/ca.pem")));
        assert_eq!(url.application_name.as_deref(), Some("lg"));
        assert!(!format!("{url:?}").contains("p@ss"));
    }

    #[test]
    fn defaults_and_ipv6() {
        let url = TargetUrl::parse("postgresql://u@[::1]").expect("valid");
        assert_eq!((url.host.as_str(), url.port), ("::1", DEFAULT_PORT));
        assert_eq!(url.password, "");
        assert_eq!(url.database, None);
        assert_eq!(url.sslmode, SslMode::Require);
        assert_eq!(url.negotiation, SslNegotiation::Postgres);
        let url = TargetUrl::parse("postgres://u:{branch}@[::1]:7/?").expect("valid");
        assert_eq!((url.port, url.password.as_str()), (7, "{branch}"));
    }

    #[test]
    fn rejects_bad_urls() {
        let cases = [
            (
                "http://u@h",
                "URL must start with postgres:// or postgresql://",
            ),
            ("postgres://h:5432/db", "URL has no user name"),
            ("postgres://:pw@h", "URL has no user name"),
            ("postgres://u@:5432", "URL has no host"),
            ("postgres://u@h:0", "invalid port '0'"),
            ("postgres://u@h:99999", "invalid port '99999'"),
            ("postgres://u@h:x", "invalid port 'x'"),
            (
                "postgres://u%zz@h",
                "invalid percent-encoding in the user name",
            ),
            (
                "postgres://u:%ff@h",
                "invalid percent-encoding in the password",
            ),
            (
                "postgres://u@h?sslmode=prefer",
                "invalid sslmode 'prefer' (expected disable, require or verify-full)",
            ),
            (
                "postgres://u@h?sslnegotiation=x",
                "invalid sslnegotiation 'x' (expected postgres or direct)",
            ),
            (
                "postgres://u@h?sslmod=disable",
                "unknown URL parameter 'sslmod'",
            ),
            (
                "postgres://u@h?sslmode=disable&sslnegotiation=direct",
                "sslnegotiation=direct needs sslmode=require or verify-full",
            ),
            (
                "postgres://u@h?sslmode=verify-full",
                "sslmode=verify-full needs sslrootcert=PATH",
            ),
        ];
        for (text, message) in cases {
            let error = TargetUrl::parse(text).expect_err(text);
            assert_eq!(error.to_string(), message, "{text}");
        }
    }
}
