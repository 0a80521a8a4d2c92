//! Targets: `NAME=postgres://USER:PASSWORD@HOST:PORT/DB?sslmode=..&sslnegotiation=..&sslrootcert=..`.
//!
//! USER, PASSWORD and DB are percent-decoded. USER may contain `{branch}`, replaced per
//! connection by a branch from `--branches`. Parameters (libpq names and meanings):
//! - `sslmode`: `disable` (plain TCP), `require` (TLS, certificate not checked; the default),
//!   `verify-full` (TLS, chain checked against `sslrootcert`, host name checked).
//! - `sslnegotiation`: `postgres` (SSLRequest, then TLS; the default) or `direct` (TLS from the
//!   first byte, ALPN `postgresql`).
//! - `sslrootcert`: PEM file of trusted CA certificates (needed for `verify-full`).
//! - `application_name`: sent in the StartupMessage.
//!
//! Without `/DB` no `database` parameter is sent, so the server uses its default (the user
//! name), as libpq does.

mod url;

use std::borrow::Cow;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;

use rustls::ClientConfig;
use rustls_pki_types::ServerName;

use crate::client::tls::{client_config, TlsConfigError, Verification};

pub use url::{SslMode, SslNegotiation, TargetUrl};

/// The placeholder in USER that each connection replaces with its branch.
pub const BRANCH_PLACEHOLDER: &str = "{branch}";

/// Why a `--target` was refused.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// The argument is not `NAME=URL`.
    #[error("expected NAME=URL")]
    MissingName,
    /// The URL does not start with `postgres://` or `postgresql://`.
    #[error("URL must start with postgres:// or postgresql://")]
    Scheme,
    /// The URL names no user.
    #[error("URL has no user name")]
    MissingUser,
    /// The URL names no host.
    #[error("URL has no host")]
    MissingHost,
    /// The port is not a number from 1 to 65535.
    #[error("invalid port '{0}'")]
    BadPort(String),
    /// A `%XX` escape is malformed or decodes to invalid UTF-8.
    #[error("invalid percent-encoding in the {0}")]
    BadEscape(&'static str),
    /// A query parameter this client does not know.
    #[error("unknown URL parameter '{0}'")]
    UnknownParameter(String),
    /// A query parameter with a value this client does not accept.
    #[error("invalid {param} '{value}' (expected {expected})")]
    BadValue {
        /// The parameter.
        param: &'static str,
        /// Its value.
        value: String,
        /// What would be accepted.
        expected: &'static str,
    },
    /// `sslnegotiation=direct` without TLS.
    #[error("sslnegotiation=direct needs sslmode=require or verify-full")]
    DirectNeedsTls,
    /// `sslmode=verify-full` without `sslrootcert`.
    #[error("sslmode=verify-full needs sslrootcert=PATH")]
    VerifyFullNeedsRootCert,
    /// The TLS configuration could not be built (unreadable CA file).
    #[error("{0}")]
    Tls(#[from] TlsConfigError),
    /// The host name did not resolve.
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        /// The host.
        host: String,
        /// Why.
        source: std::io::Error,
    },
}

/// TLS settings of a target.
#[derive(Clone, Debug)]
pub struct TlsTarget {
    /// rustls client configuration (ALPN `postgresql`, no resumption).
    pub config: Arc<ClientConfig>,
    /// Name checked against the certificate and sent as SNI (DNS names only).
    pub server_name: ServerName<'static>,
    /// Direct SSL rather than SSLRequest.
    pub direct: bool,
}

/// A target ready to connect to: resolved address, TLS configuration built.
#[derive(Clone, Debug)]
pub struct Target {
    /// The name it is reported under.
    pub name: String,
    /// The resolved address.
    pub addr: SocketAddr,
    /// The URL it came from.
    pub url: TargetUrl,
    /// `None` for `sslmode=disable`.
    pub tls: Option<TlsTarget>,
}

impl Target {
    /// Parses `NAME=URL`, resolves the host and builds the TLS configuration.
    pub fn parse(spec: &str) -> Result<Target, (String, TargetError)> {
        let (name, url) = spec
            .split_once('=')
            .filter(|(name, _)| !name.is_empty() && !name.contains("://"))
            .ok_or_else(|| (spec.to_owned(), TargetError::MissingName))?;
        let fail = |error| (name.to_owned(), error);
        let url = TargetUrl::parse(url).map_err(fail)?;
        let tls = tls_target(&url).map_err(fail)?;
        let addr = resolve(&url.host, url.port).map_err(fail)?;
        Ok(Target {
            name: name.to_owned(),
            addr,
            url,
            tls,
        })
    }

    /// Whether the user name has a `{branch}` placeholder.
    pub fn has_branch_placeholder(&self) -> bool {
        self.url.user.contains(BRANCH_PLACEHOLDER)
    }

    /// The user name for a connection to `branch`.
    pub fn user(&self, branch: Option<&str>) -> Cow<'_, str> {
        match branch {
            Some(branch) if self.has_branch_placeholder() => {
                Cow::Owned(self.url.user.replace(BRANCH_PLACEHOLDER, branch))
            }
            _ => Cow::Borrowed(&self.url.user),
        }
    }
}

fn resolve(host: &str, port: u16) -> Result<SocketAddr, TargetError> {
    let resolve_error = |source| TargetError::Resolve {
        host: host.to_owned(),
        source,
    };
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(resolve_error)?
        .collect();
    // Prefer IPv4, as the loopback source addresses of --source-ips are IPv4.
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| resolve_error(std::io::Error::other("no address")))
}

fn tls_target(url: &TargetUrl) -> Result<Option<TlsTarget>, TargetError> {
    let verification = match (url.sslmode, &url.rootcert) {
        (SslMode::Disable, _) => return Ok(None),
        (SslMode::Require, _) => Verification::None,
        (SslMode::VerifyFull, Some(path)) => Verification::Roots(path),
        (SslMode::VerifyFull, None) => return Err(TargetError::VerifyFullNeedsRootCert),
    };
    let server_name =
        ServerName::try_from(url.host.clone()).map_err(|_| TargetError::BadValue {
            param: "host",
            value: url.host.clone(),
            expected: "a DNS name or IP address",
        })?;
    Ok(Some(TlsTarget {
        config: client_config(verification)?,
        server_name,
        direct: url.negotiation == SslNegotiation::Direct,
    }))
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_spec_resolves_and_fills_in_the_branch() {
        let target =
            Target::parse("bg=postgres://app.{branch}:pw@127.0.0.1:6543/db").expect("valid");
        assert_eq!(target.name, "bg");
        assert_eq!(target.addr, "127.0.0.1:6543".parse().expect("addr"));
        let tls = target.tls.as_ref().expect("TLS by default");
        assert!(!tls.direct);
        assert_eq!(target.user(Some("b7")), "app.b7");
        assert_eq!(target.user(None), "app.{branch}");
        let plain = Target::parse("pg=postgres://app@localhost?sslmode=disable").expect("valid");
        assert!(plain.tls.is_none() && !plain.has_branch_placeholder());
        assert_eq!(plain.user(Some("b7")), "app");

        for (spec, name) in [
            ("postgres://u@h", "postgres://u@h"),
            ("=postgres://u@h", "=postgres://u@h"),
        ] {
            let (got, error) = Target::parse(spec).expect_err(spec);
            assert_eq!(
                (got.as_str(), error.to_string().as_str()),
                (name, "expected NAME=URL")
            );
        }
        let (name, error) = Target::parse(
            "x=postgres://u@127.0.0.1?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
        )
        .expect_err("missing CA file");
        assert_eq!(name, "x");
        assert!(error.to_string().contains("/nonexistent/ca.pem"), "{error}");
    }
}
