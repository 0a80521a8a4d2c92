//! Connection setup: TCP, TLS (SSLRequest round trip then handshake, or direct SSL: handshake
//! at once), StartupMessage, authentication, and the server's startup messages up to
//! ReadyForQuery, noting when each phase ends.
//!
//! SCRAM reuses the router's client ([`ScramClient`]); PBKDF2 comes from a per-thread
//! [`SaltedPasswordCache`], so after the first login per password, salt and iteration count a
//! connection storm measures the servers rather than the load generator's key stretching.

use std::cell::RefCell;
use std::net::IpAddr;
use std::time::Instant;

use branchgate::auth::scram::{ClientCredentials, SaltedPasswordCache, ScramClient};
use branchgate::protocol::backend::{self as msg, Authentication};
use branchgate::protocol::frame;
use branchgate::protocol::write as pgwrite;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;

use super::transport::{tcp_connect, Transport};
use super::{tls, ClientError, Conn, Incoming};
use crate::target::Target;

/// The SASL mechanism this client speaks (no channel binding).
const SCRAM_SHA_256: &str = "SCRAM-SHA-256";
/// The server's answer to SSLRequest when it will do TLS.
const SSL_ACCEPTED: u8 = b'S';
/// The server's answer to SSLRequest when it will not.
const SSL_REFUSED: u8 = b'N';
/// `application_name` when the URL sets none.
const DEFAULT_APPLICATION_NAME: &str = "branchgate-loadgen";

/// Who connects where.
#[derive(Clone, Copy, Debug)]
pub struct ConnectOptions<'a> {
    /// The server.
    pub target: &'a Target,
    /// The user name, `{branch}` already replaced.
    pub user: &'a str,
    /// Source address to bind, if any.
    pub source: Option<IpAddr>,
}

/// When each phase of a connection setup ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timings {
    /// Before connect().
    pub start: Instant,
    /// TCP connection established.
    pub tcp: Instant,
    /// SSLRequest answered with `S`; `None` for direct SSL and without TLS.
    pub ssl_request: Option<Instant>,
    /// TLS handshake done; `None` without TLS.
    pub tls: Option<Instant>,
    /// AuthenticationOk received.
    pub auth: Instant,
    /// ReadyForQuery received.
    pub ready: Instant,
}

impl Timings {
    /// When the TLS handshake began: on the SSLRequest's answer, or (direct SSL) at once.
    pub fn handshake_start(&self) -> Instant {
        self.ssl_request.unwrap_or(self.tcp)
    }

    /// When the channel the StartupMessage went over was ready: TLS done, or TCP without TLS.
    pub fn channel_ready(&self) -> Instant {
        self.tls.unwrap_or(self.tcp)
    }
}

/// Connects, authenticates and waits for ReadyForQuery. Not cancel-safe (on timeout the
/// caller drops the half-open connection).
pub async fn connect(
    options: ConnectOptions<'_>,
    cache: &RefCell<SaltedPasswordCache>,
) -> Result<(Conn, Timings), ClientError> {
    let target = options.target;
    let start = Instant::now();
    let tcp = tcp_connect(target.addr, options.source)
        .await
        .map_err(ClientError::Connect)?;
    let tcp_done = Instant::now();
    let (transport, ssl_request_done) = secure(tcp, target).await?;
    let tls_done = match transport {
        Transport::Plain(_) => None,
        Transport::Tls(_) => Some(Instant::now()),
    };
    let mut conn = Conn::new(transport);
    send_startup(&mut conn, options).await?;
    let auth_done = authenticate(&mut conn, &target.url.password, cache).await?;
    let ready = Instant::now();
    let timings = Timings {
        start,
        tcp: tcp_done,
        ssl_request: ssl_request_done,
        tls: tls_done,
        auth: auth_done.unwrap_or(ready),
        ready,
    };
    Ok((conn, timings))
}

/// TLS over `tcp` as the target asks for it (SSLRequest round trip then handshake, or direct
/// SSL), or plain TCP. Returns when the SSLRequest was answered, if one was sent.
pub(super) async fn secure(
    mut tcp: TcpStream,
    target: &Target,
) -> Result<(Transport, Option<Instant>), ClientError> {
    let Some(settings) = &target.tls else {
        return Ok((Transport::Plain(tcp), None));
    };
    let mut ssl_request_done = None;
    if !settings.direct {
        ssl_request(&mut tcp).await?;
        ssl_request_done = Some(Instant::now());
    }
    let stream = tls::handshake(
        tcp,
        settings.config.clone(),
        settings.server_name.clone(),
        settings.direct,
    )
    .await?;
    Ok((Transport::Tls(Box::new(stream)), ssl_request_done))
}

/// Sends the StartupMessage: `user`, `database` if the URL has one, `application_name`.
pub(super) async fn send_startup(
    conn: &mut Conn,
    options: ConnectOptions<'_>,
) -> Result<(), ClientError> {
    let target = options.target;
    let mut params = vec![("user", options.user)];
    if let Some(database) = &target.url.database {
        params.push(("database", database));
    }
    let application_name = target.url.application_name.as_deref();
    params.push((
        "application_name",
        application_name.unwrap_or(DEFAULT_APPLICATION_NAME),
    ));
    pgwrite::startup_message(&mut conn.wbuf, params);
    conn.flush().await
}

/// Sends SSLRequest and reads the one-byte answer.
pub(super) async fn ssl_request(tcp: &mut TcpStream) -> Result<(), ClientError> {
    let mut request = Vec::with_capacity(8);
    pgwrite::ssl_request(&mut request);
    let (result, _) = tcp.write_all(request).await;
    result?;
    // Exactly one byte: whatever follows belongs to the TLS handshake.
    let (result, answer) = tcp.read(Vec::with_capacity(1)).await;
    match (result?, answer.first()) {
        (0, _) | (_, None) => Err(ClientError::Closed),
        (_, Some(&SSL_ACCEPTED)) => Ok(()),
        (_, Some(&SSL_REFUSED)) => Err(ClientError::TlsRefused),
        (_, Some(_)) => Err(ClientError::Protocol("unexpected answer to SSLRequest")),
    }
}

/// Reads the server's answer to the StartupMessage up to its first authentication request
/// (AuthenticationSASL from a SCRAM server), which is left unanswered: the connection then
/// waits on the server's side for a password that never comes (idle mode's `startup` stage).
pub(super) async fn await_auth_request(conn: &mut Conn) -> Result<(), ClientError> {
    loop {
        let header = match conn.next().await? {
            Incoming::Whole(header) => header,
            Incoming::Skipped(_) => continue,
        };
        let body = frame::body(conn.rbuf.data(), header);
        match header.tag {
            msg::AUTHENTICATION => {
                let request = Authentication::parse(body)
                    .map_err(|_| ClientError::Protocol("malformed authentication request"))?;
                if let Authentication::Ok = request {
                    return Err(ClientError::NoAuthRequest);
                }
                conn.consume(header);
                return Ok(());
            }
            msg::ERROR_RESPONSE => return Err(ClientError::server(body)),
            msg::NOTICE_RESPONSE | msg::NEGOTIATE_PROTOCOL_VERSION => conn.consume(header),
            _ => {
                return Err(ClientError::Protocol(
                    "unexpected message before authentication",
                ))
            }
        }
    }
}

/// Answers authentication requests and reads the startup messages up to ReadyForQuery.
/// Returns when AuthenticationOk arrived.
async fn authenticate(
    conn: &mut Conn,
    password: &str,
    cache: &RefCell<SaltedPasswordCache>,
) -> Result<Option<Instant>, ClientError> {
    let mut scram: Option<ScramClient> = None;
    let mut auth_done = None;
    loop {
        let header = match conn.next().await? {
            Incoming::Whole(header) => header,
            // Only NoticeResponse or ParameterStatus can be this large here.
            Incoming::Skipped(_) => continue,
        };
        let body = frame::body(conn.rbuf.data(), header);
        match header.tag {
            msg::AUTHENTICATION => {
                let request = Authentication::parse(body)
                    .map_err(|_| ClientError::Protocol("malformed authentication request"))?;
                match request {
                    Authentication::Ok => auth_done = Some(Instant::now()),
                    Authentication::Sasl { mechanisms } => {
                        if !msg::sasl_mechanisms(mechanisms).any(|m| m == SCRAM_SHA_256) {
                            return Err(ClientError::UnsupportedAuth(msg::auth_code::SASL));
                        }
                        if password.is_empty() {
                            return Err(ClientError::NoPassword);
                        }
                        let credentials = ClientCredentials::Password(password.to_owned());
                        let (client, first) = ScramClient::new(credentials);
                        pgwrite::sasl_initial_response(&mut conn.wbuf, SCRAM_SHA_256, &first);
                        scram = Some(client);
                    }
                    Authentication::SaslContinue(server_first) => {
                        let client = scram
                            .as_mut()
                            .ok_or(ClientError::Protocol("SASLContinue before SASL"))?;
                        let reply = client
                            .handle_server_first_with(server_first, &mut *cache.borrow_mut())?;
                        pgwrite::sasl_response(&mut conn.wbuf, &reply);
                    }
                    Authentication::SaslFinal(server_final) => {
                        scram
                            .as_ref()
                            .ok_or(ClientError::Protocol("SASLFinal before SASL"))?
                            .verify_server_final(server_final)?;
                    }
                    Authentication::CleartextPassword => {
                        if password.is_empty() {
                            return Err(ClientError::NoPassword);
                        }
                        pgwrite::password_message(&mut conn.wbuf, password);
                    }
                    Authentication::Md5Password { .. } => {
                        return Err(ClientError::UnsupportedAuth(msg::auth_code::MD5_PASSWORD))
                    }
                    Authentication::Other(code) => return Err(ClientError::UnsupportedAuth(code)),
                }
            }
            msg::ERROR_RESPONSE => return Err(ClientError::server(body)),
            msg::READY_FOR_QUERY => {
                conn.consume(header);
                return Ok(auth_done);
            }
            msg::BACKEND_KEY_DATA
            | msg::PARAMETER_STATUS
            | msg::NOTICE_RESPONSE
            | msg::NEGOTIATE_PROTOCOL_VERSION => {}
            _ => return Err(ClientError::Protocol("unexpected message during startup")),
        }
        conn.consume(header);
        if !conn.wbuf.is_empty() {
            conn.flush().await?;
        }
    }
}
