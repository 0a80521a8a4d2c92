//! Step 1 of the front door: the connection's first bytes, up to an established TLS connection
//! (or a CancelRequest, which needs none).
//!
//! - Direct SSL: the first byte is a TLS handshake record (0x16); the handshake must negotiate
//!   ALPN `postgresql`, as PostgreSQL 17 requires.
//! - SSLRequest: answered `S`, then the handshake.
//! - GSSENCRequest: answered `N`, once; the client may then go on with an SSLRequest.
//! - CancelRequest in plaintext: handed back to the caller.
//! - A plaintext StartupMessage: refused, TLS is required.

use crate::error::SessionError;
use crate::protocol::startup::{self, CancelKey, StartupPacket, ENCRYPTION_REFUSED, SSL_ACCEPT};
use crate::tls::TlsError;
use crate::worker::Worker;

use super::conn::ClientConn;

/// The TLS record type of a handshake: a direct-SSL ClientHello starts with it.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// How the connection's first bytes ended.
#[derive(Debug)]
pub enum Negotiated {
    /// TLS is up; the StartupMessage comes next, over it.
    Tls {
        /// Direct SSL (the ClientHello came first), not an SSLRequest.
        direct: bool,
    },
    /// A plaintext CancelRequest: nothing follows.
    Cancel(CancelKey),
}

/// Reads the connection's first packets and establishes TLS. Not cancel-safe (the caller
/// drops the whole connection when it gives up).
pub async fn negotiate(
    worker: &Worker,
    conn: &mut ClientConn<'_>,
) -> Result<Negotiated, SessionError> {
    let mut answered_gss = false;
    loop {
        if conn.raw().is_empty() && conn.fill_raw().await? == 0 {
            return Err(SessionError::ClientClosed);
        }
        if conn.raw().data().first() == Some(&TLS_HANDSHAKE_RECORD) {
            conn.accept_tls(worker.shared.tls.clone()).await?;
            if !conn.handshake().alpn {
                // PostgreSQL 17 closes direct-SSL connections that did not negotiate ALPN.
                return Err(TlsError::NoAlpn.into());
            }
            return Ok(Negotiated::Tls { direct: true });
        }
        let len = loop {
            match startup::check_startup(conn.raw().data())? {
                Some(len) => break len,
                None => {
                    if conn.fill_raw().await? == 0 {
                        return Err(SessionError::ClientClosed);
                    }
                }
            }
        };
        let pipelined = conn.raw().len() > len;
        match startup::parse_startup(&conn.raw().data()[..len])? {
            StartupPacket::SslRequest => {
                // PostgreSQL reads the bytes a client sent right behind its SSLRequest into its
                // own buffer, where the TLS handshake never sees them; once TLS is up it refuses
                // the connection because of them, over TLS. The same here: they are dropped.
                conn.discard_raw();
                conn.out().push(SSL_ACCEPT);
                conn.flush().await?;
                conn.accept_tls(worker.shared.tls.clone()).await?;
                if pipelined {
                    return Err(SessionError::DataAfterSslRequest);
                }
                return Ok(Negotiated::Tls { direct: false });
            }
            StartupPacket::GssEncRequest if !answered_gss => {
                answered_gss = true;
                conn.consume_raw(len);
                conn.out().push(ENCRYPTION_REFUSED);
                conn.flush().await?;
                // PostgreSQL answers `N`, then refuses bytes sent before the client read it.
                if pipelined {
                    return Err(SessionError::DataAfterGssEncRequest);
                }
            }
            StartupPacket::GssEncRequest => {
                return Err(SessionError::Protocol("repeated GSSENCRequest"))
            }
            StartupPacket::Cancel(key) => return Ok(Negotiated::Cancel(key)),
            StartupPacket::Startup(_) => return Err(SessionError::TlsRequired),
        }
    }
}
