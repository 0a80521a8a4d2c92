//! Connecting to a PostgreSQL backend: TCP, StartupMessage, SCRAM with the client's ClientKey,
//! and the startup replies up to the first ReadyForQuery.

use std::io;
use std::net::SocketAddr;

use monoio::io::AsyncWriteRentExt;
use monoio::net::TcpStream;

use crate::auth::scram::{ClientCredentials, ScramClient, ScramError};
use crate::buf::{write_all_vec, BufPool, ReadBuf};
use crate::protocol::backend::{Authentication, BackendKeyData, ErrorFields, ParameterStatus};
use crate::protocol::sqlstate::SqlState;
use crate::protocol::{backend as msg, frame, write};

/// Largest message accepted from a backend during startup (ParameterStatus, errors, SASL).
/// ParameterStatus echoes startup parameters such as `application_name`, so it can be nearly as
/// large as the client's startup packet; the whole frame must still fit the read buffer.
pub const MAX_BACKEND_STARTUP_MESSAGE_BYTES: usize = crate::buf::POOL_BUFFER_BYTES;

// A client may send the largest startup packet we accept; its backend's echo must fit too.
const _: () =
    assert!(MAX_BACKEND_STARTUP_MESSAGE_BYTES > crate::protocol::startup::MAX_STARTUP_PACKET_BYTES);

/// The SASL mechanism we speak to backends.
const SCRAM_SHA_256: &str = "SCRAM-SHA-256";

/// Errors talking to a backend. The client only ever sees 08006 for these, or the backend's own
/// ErrorResponse verbatim ([`BackendError::Rejected`]).
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// TCP connect failed.
    #[error("connect: {0}")]
    Connect(io::Error),
    /// Connect plus authentication took longer than `timeouts.connect`.
    #[error("timed out")]
    Timeout,
    /// Socket error after connecting.
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    /// The backend closed the connection during startup.
    #[error("closed during startup")]
    Closed,
    /// The backend sent something that is not PostgreSQL protocol.
    #[error("protocol: {0}")]
    Protocol(&'static str),
    /// The backend asked for an authentication method we cannot answer without a password.
    #[error("unsupported authentication request {0}")]
    UnsupportedAuth(u32),
    /// SCRAM with the backend failed (e.g. its verifier differs from the catalog's).
    #[error("SCRAM: {0}")]
    Scram(#[from] ScramError),
    /// The backend answered with an ErrorResponse, already copied for the client.
    #[error("backend rejected the connection (SQLSTATE {0})")]
    Rejected(ReceivedSqlState),
}

/// A SQLSTATE as a backend sent it: five ASCII characters, kept without allocating.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReceivedSqlState([u8; 5]);

impl ReceivedSqlState {
    /// The code from an ErrorResponse's `C` field (anything not five bytes long is kept as
    /// `?????`: it matches no known code).
    pub fn new(code: &str) -> Self {
        Self(code.as_bytes().try_into().unwrap_or(*b"?????"))
    }

    /// See [`SqlState::means_server_unavailable`].
    pub fn server_unavailable(self) -> bool {
        SqlState::means_server_unavailable(&self.0)
    }
}

impl std::fmt::Display for ReceivedSqlState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(std::str::from_utf8(&self.0).unwrap_or("?????"))
    }
}

/// An authenticated backend connection, ready for queries.
#[derive(Debug)]
pub struct BackendConn {
    /// The socket.
    pub stream: TcpStream,
    /// Its address.
    pub addr: SocketAddr,
    /// BackendKeyData: the backend's process id.
    pub pid: u32,
    /// BackendKeyData: the backend's cancel secret.
    pub secret: u32,
    /// Bytes read past ReadyForQuery (normally none), and the buffer reused for the relay.
    pub read_buf: ReadBuf,
    /// The backend's `in_hot_standby` report (PostgreSQL 14+): `Some(true)` on a standby,
    /// `Some(false)` on a primary, `None` if it did not say.
    pub hot_standby: Option<bool>,
}

impl BackendConn {
    /// Sends Terminate and closes: a backend we will not use ends without logging a lost client.
    /// The read buffer goes back to `pool`.
    pub async fn terminate(mut self, pool: &BufPool) {
        self.read_buf.release(pool);
        let mut buf = Vec::with_capacity(frame::HEADER_BYTES);
        write::terminate(&mut buf);
        let (_, _) = self.stream.write_all(buf).await;
    }
}

/// Connect to `addr`, send the StartupMessage already encoded in `startup`, authenticate with
/// `credentials`, and copy the backend's ParameterStatus/NoticeResponse messages (or its
/// ErrorResponse) into `to_client`. ReadyForQuery itself is not copied: the caller writes
/// BackendKeyData before it.
pub async fn connect(
    addr: SocketAddr,
    startup: &[u8],
    credentials: ClientCredentials,
    to_client: &mut Vec<u8>,
    mut buf: ReadBuf,
) -> Result<(BackendConn, u8), BackendError> {
    let started = monoio::time::Instant::now();
    let mut stream = TcpStream::connect_addr(addr)
        .await
        .map_err(BackendError::Connect)?;
    stream.set_nodelay(true)?;
    let (result, _) = stream.write_all(startup.to_vec()).await;
    result?;

    let mut out = Vec::with_capacity(256);
    let mut scram: Option<ScramClient> = None;
    let mut credentials = Some(credentials);
    let mut key: Option<BackendKeyData> = None;
    let mut hot_standby = None;
    loop {
        let header = loop {
            match frame::check(buf.data(), MAX_BACKEND_STARTUP_MESSAGE_BYTES) {
                Ok(Some(header)) => break header,
                Ok(None) => {
                    if buf.fill_from(&mut stream).await? == 0 {
                        return Err(BackendError::Closed);
                    }
                }
                Err(_) => return Err(BackendError::Protocol("bad message length")),
            }
        };
        let whole = &buf.data()[..header.len];
        let body = frame::body(whole, header);
        match header.tag {
            msg::AUTHENTICATION => {
                match Authentication::parse(body)
                    .map_err(|_| BackendError::Protocol("bad authentication message"))?
                {
                    Authentication::Ok => {}
                    Authentication::Sasl { mechanisms } => {
                        if !msg::sasl_mechanisms(mechanisms).any(|m| m == SCRAM_SHA_256) {
                            return Err(BackendError::UnsupportedAuth(10));
                        }
                        let credentials = credentials
                            .take()
                            .ok_or(BackendError::Protocol("repeated SASL request"))?;
                        let (client, first) = ScramClient::new(credentials);
                        write::sasl_initial_response(&mut out, SCRAM_SHA_256, &first);
                        scram = Some(client);
                    }
                    Authentication::SaslContinue(data) => {
                        let client = scram
                            .as_mut()
                            .ok_or(BackendError::Protocol("SASLContinue before SASL"))?;
                        let reply = client.handle_server_first(data)?;
                        write::sasl_response(&mut out, &reply);
                    }
                    Authentication::SaslFinal(data) => {
                        scram
                            .as_ref()
                            .ok_or(BackendError::Protocol("SASLFinal before SASL"))?
                            .verify_server_final(data)?;
                    }
                    Authentication::CleartextPassword => {
                        return Err(BackendError::UnsupportedAuth(3))
                    }
                    Authentication::Md5Password { .. } => {
                        return Err(BackendError::UnsupportedAuth(5))
                    }
                    Authentication::Other(code) => return Err(BackendError::UnsupportedAuth(code)),
                }
            }
            msg::BACKEND_KEY_DATA => {
                key = Some(
                    BackendKeyData::parse(body)
                        .map_err(|_| BackendError::Protocol("bad BackendKeyData"))?,
                );
            }
            msg::PARAMETER_STATUS => {
                if let Ok(ParameterStatus {
                    name: "in_hot_standby",
                    value,
                }) = ParameterStatus::parse(body)
                {
                    hot_standby = Some(value == "on");
                }
                to_client.extend_from_slice(whole);
            }
            msg::NOTICE_RESPONSE => to_client.extend_from_slice(whole),
            msg::ERROR_RESPONSE => {
                to_client.extend_from_slice(whole);
                let code = ErrorFields::parse(body).map_or("", |fields| fields.code);
                return Err(BackendError::Rejected(ReceivedSqlState::new(code)));
            }
            msg::READY_FOR_QUERY => {
                let status = body.first().copied().unwrap_or(b'I');
                buf.consume(header.len);
                let key = key.ok_or(BackendError::Protocol("no BackendKeyData"))?;
                crate::probes::backend_connected(key.pid, addr.port(), started);
                return Ok((
                    BackendConn {
                        stream,
                        addr,
                        pid: key.pid,
                        secret: key.secret,
                        read_buf: buf,
                        hot_standby,
                    },
                    status,
                ));
            }
            msg::NEGOTIATE_PROTOCOL_VERSION => {}
            _ => return Err(BackendError::Protocol("unexpected message during startup")),
        }
        buf.consume(header.len);
        write_all_vec(&mut stream, &mut out).await?;
    }
}

/// Send a CancelRequest for `pid`/`secret` to the backend at `addr` (a fresh connection, as the
/// protocol requires), and wait until the server closes it: PostgreSQL answers nothing, and
/// closes once it has signalled the backend, so then the cancel has been delivered.
pub async fn cancel(addr: SocketAddr, pid: u32, secret: u32) -> io::Result<()> {
    use monoio::io::AsyncReadRent;
    let mut stream = TcpStream::connect_addr(addr).await?;
    let mut buf = Vec::with_capacity(16);
    write::cancel_request(&mut buf, pid, secret);
    let (result, buf) = stream.write_all(buf).await;
    result?;
    let mut buf = buf;
    loop {
        buf.clear();
        let (result, back) = stream.read(buf).await;
        buf = back;
        if result? == 0 {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ReceivedSqlState;

    #[test]
    fn unavailable_sqlstates() {
        for code in ["57P01", "57P02", "57P03", "53300"] {
            assert!(ReceivedSqlState::new(code).server_unavailable(), "{code}");
        }
        for code in ["28P01", "28000", "3D000", "08P01", "", "57P03x"] {
            assert!(!ReceivedSqlState::new(code).server_unavailable(), "{code}");
        }
        assert_eq!(ReceivedSqlState::new("57P03").to_string(), "57P03");
        assert_eq!(ReceivedSqlState::new("long code").to_string(), "?????");
    }
}
