//! Connections held at a chosen point of their setup (idle mode's `--stage`): what a server
//! keeps for a client that opened a socket, or sent a ClientHello, or finished TLS, or sent its
//! StartupMessage, and then went quiet, before it ever authenticated.

use std::cell::RefCell;
use std::fmt;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Instant;

use branchgate::auth::scram::SaltedPasswordCache;
use monoio::net::TcpStream;

use super::startup::{self, await_auth_request, secure, send_startup, ConnectOptions};
use super::tls::{self, TlsStream};
use super::transport::{tcp_connect, Transport};
use super::{ClientError, Conn};

/// Where a held connection stops, in the order a setup passes them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Stage {
    /// TCP connected, nothing sent.
    Tcp,
    /// The TLS ClientHello sent (direct SSL: at once; otherwise after the server's `S` to
    /// SSLRequest), the server's answer left unread, nothing more sent.
    Hello,
    /// TLS handshake complete, nothing sent over it.
    Tls,
    /// StartupMessage sent and the server's authentication request (AuthenticationSASL)
    /// received; no answer sent.
    Startup,
    /// Logged in: ReadyForQuery received (a session idle between queries).
    #[default]
    Ready,
}

impl Stage {
    /// Its name on the command line and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Tcp => "tcp",
            Stage::Hello => "hello",
            Stage::Tls => "tls",
            Stage::Startup => "startup",
            Stage::Ready => "ready",
        }
    }

    /// Whether the stage only exists with TLS (`sslmode=disable` targets cannot reach it).
    pub fn needs_tls(self) -> bool {
        matches!(self, Stage::Hello | Stage::Tls)
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A connection held at its [`Stage`]. Its buffers are freed: it is only watched for the
/// server closing it, and closed.
#[derive(Debug)]
pub enum Held {
    /// Stages `tcp` and `hello`: the socket alone (a ClientHello's handshake state is not kept,
    /// the handshake goes no further).
    Socket(TcpStream),
    /// Stage `tls`.
    Tls(Box<TlsStream>),
    /// Stage `startup`: waiting on the server's side for the client's password.
    Startup(Conn),
    /// Stage `ready`.
    Ready(Conn),
}

impl Held {
    /// Closes the connection as a client that gives up at this point would: a logged-in
    /// session sends Terminate, a TLS one close_notify, a bare socket just closes.
    pub async fn close(self) {
        match self {
            Held::Socket(tcp) => drop(tcp),
            Held::Tls(mut tls) => tls.close().await,
            Held::Startup(mut conn) => conn.transport.close().await,
            Held::Ready(conn) => conn.terminate().await,
        }
    }
}

impl AsRawFd for Held {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Held::Socket(tcp) => tcp.as_raw_fd(),
            Held::Tls(tls) => tls.as_raw_fd(),
            Held::Startup(conn) | Held::Ready(conn) => conn.transport.as_raw_fd(),
        }
    }
}

/// Sets a connection up as far as `stage` and returns it with its buffers freed, and when it got
/// there. A `hello` or `tls` stage on a target without TLS is an error (idle mode refuses it
/// before the run). Not cancel-safe (on timeout the caller drops the half-open connection).
pub async fn open_to(
    options: ConnectOptions<'_>,
    cache: &RefCell<SaltedPasswordCache>,
    stage: Stage,
) -> Result<(Held, Instant), ClientError> {
    if stage == Stage::Ready {
        // Its buffers are left to the caller to free (it may run statements first).
        let (conn, timings) = startup::connect(options, cache).await?;
        return Ok((Held::Ready(conn), timings.ready));
    }
    let target = options.target;
    let mut tcp = tcp_connect(target.addr, options.source)
        .await
        .map_err(ClientError::Connect)?;
    match (stage, &target.tls) {
        (Stage::Tcp, _) => return Ok((Held::Socket(tcp), Instant::now())),
        (Stage::Hello, Some(settings)) => {
            if !settings.direct {
                startup::ssl_request(&mut tcp).await?;
            }
            let (config, name) = (settings.config.clone(), settings.server_name.clone());
            tls::client_hello(&mut tcp, config, name).await?;
            return Ok((Held::Socket(tcp), Instant::now()));
        }
        (Stage::Hello | Stage::Tls, None) => return Err(ClientError::StageNeedsTls(stage)),
        _ => {}
    }
    let (mut transport, _) = secure(tcp, target).await?;
    if stage == Stage::Tls {
        transport.shrink();
        return match transport {
            Transport::Tls(tls) => Ok((Held::Tls(tls), Instant::now())),
            Transport::Plain(_) => Err(ClientError::StageNeedsTls(stage)),
        };
    }
    let mut conn = Conn::new(transport);
    send_startup(&mut conn, options).await?;
    await_auth_request(&mut conn).await?;
    let reached = Instant::now();
    conn.shrink();
    Ok((Held::Startup(conn), reached))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::ValueEnum;

    #[test]
    fn names_and_order() {
        let names: Vec<&str> = Stage::value_variants().iter().map(|s| s.as_str()).collect();
        assert_eq!(names, ["tcp", "hello", "tls", "startup", "ready"]);
        for stage in Stage::value_variants() {
            let parsed = Stage::from_str(stage.as_str(), false).expect("parses");
            assert_eq!(parsed, *stage);
            assert_eq!(stage.to_string(), stage.as_str());
        }
        assert!(Stage::Tcp < Stage::Hello && Stage::Startup < Stage::Ready);
        assert_eq!(Stage::default(), Stage::Ready);
        assert!(Stage::Hello.needs_tls() && Stage::Tls.needs_tls());
        assert!(!Stage::Tcp.needs_tls() && !Stage::Startup.needs_tls());
    }
}
