//! TLS for every listener: rustls configuration and TLS records over monoio's owned-buffer I/O.
//!
//! The connection's rustls state lives in a `RefCell` shared by the two relay directions, which
//! run in one task: the reading side feeds ciphertext in and takes plaintext out, the writing side
//! puts plaintext in and takes ciphertext out. No borrow is held across an `.await`.
//!
//! Both PostgreSQL TLS modes end up here: direct SSL (the ClientHello is the first byte the client
//! sends, passed in as `prefix`) and SSLRequest (the handshake follows our `S`).

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use monoio::io::{AsyncReadRent, AsyncWriteRent};
use rustls::server::ServerConnection;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::buf::{write_all_vec, ReadBuf};

/// The ALPN protocol name PostgreSQL 17 defines for its TLS connections.
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// Errors of the TLS layer. None of them reaches the client as an ErrorResponse: TLS failures are
/// answered with TLS alerts (sent by rustls) or by closing the connection.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file could not be read.
    #[error("cannot read {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        source: rustls_pki_types::pem::Error,
    },
    /// The certificate file holds no certificate.
    #[error("{0}: no certificate found")]
    NoCertificate(PathBuf),
    /// rustls refused the certificate/key pair.
    #[error("invalid certificate or key: {0}")]
    Config(rustls::Error),
    /// The handshake or a record failed; rustls has queued the alert, which we sent.
    #[error("TLS: {0}")]
    Protocol(#[from] rustls::Error),
    /// A direct-SSL client did not offer ALPN `postgresql` (PostgreSQL 17 closes these).
    #[error("direct SSL connection without ALPN")]
    NoAlpn,
    /// The peer closed the connection during the handshake.
    #[error("connection closed during TLS handshake")]
    Eof,
    /// Socket error.
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
}

/// Build the server configuration from PEM files: ALPN `postgresql`, TLS 1.2 and 1.3.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::File {
            path: cert.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(cert.to_owned()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::File {
        path: key.to_owned(),
        source,
    })?;
    let mut config = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(TlsError::Config)?;
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    // libpq never resumes sessions: tickets would only cost CPU and bytes per handshake.
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// An established TLS connection's state, shared by both directions of one session.
pub struct TlsConn {
    conn: RefCell<ServerConnection>,
}

impl std::fmt::Debug for TlsConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConn").finish_non_exhaustive()
    }
}

/// What the handshake learned about the client.
#[derive(Debug, Clone, Default)]
pub struct Handshake {
    /// The server name the client asked for (SNI), if any.
    pub sni: Option<Box<str>>,
    /// True if the client negotiated ALPN `postgresql`.
    pub alpn: bool,
}

/// Run the server handshake on `io`. `raw` holds ciphertext already read (the ClientHello's first
/// bytes for direct SSL) and keeps any ciphertext read past the handshake for [`TlsConn::read`].
///
/// Not cancel-safe (the caller drops the whole connection on timeout).
pub async fn accept<S: AsyncReadRent + AsyncWriteRent>(
    io: &mut S,
    config: Arc<ServerConfig>,
    raw: &mut ReadBuf,
    out: &mut Vec<u8>,
) -> Result<(TlsConn, Handshake), TlsError> {
    let mut conn = ServerConnection::new(config)?;
    loop {
        while !raw.is_empty() && conn.is_handshaking() {
            let n = conn.read_tls(&mut raw.data())?;
            raw.consume(n);
            if let Err(error) = conn.process_new_packets() {
                // rustls queued an alert describing the failure: send it before closing.
                flush_tls(&mut conn, io, out).await.ok();
                return Err(error.into());
            }
            if n == 0 {
                break;
            }
        }
        flush_tls(&mut conn, io, out).await?;
        if !conn.is_handshaking() {
            break;
        }
        if raw.fill_from(io).await? == 0 {
            return Err(TlsError::Eof);
        }
    }
    let handshake = Handshake {
        sni: conn.server_name().map(Box::from),
        alpn: conn.alpn_protocol() == Some(ALPN_POSTGRESQL),
    };
    Ok((
        TlsConn {
            conn: RefCell::new(conn),
        },
        handshake,
    ))
}

async fn flush_tls<W: AsyncWriteRent>(
    conn: &mut ServerConnection,
    io: &mut W,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    while conn.wants_write() {
        conn.write_tls(out)?;
    }
    write_all_vec(io, out).await
}

impl TlsConn {
    /// Read plaintext into `dst`, reading and decrypting ciphertext from `io` through `raw` as
    /// needed. Returns 0 when the client closed (close_notify or end of stream).
    ///
    /// Not cancel-safe: a dropped call may lose ciphertext read by the kernel.
    pub async fn read<R: AsyncReadRent>(
        &self,
        io: &mut R,
        raw: &mut ReadBuf,
        dst: &mut [u8],
    ) -> Result<usize, TlsError> {
        if dst.is_empty() {
            return Ok(0);
        }
        loop {
            {
                let mut conn = self.conn.borrow_mut();
                match conn.reader().read(dst) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    // Unclean close: the peer went away without close_notify.
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                    Err(e) => return Err(e.into()),
                }
                if !raw.is_empty() {
                    let n = conn.read_tls(&mut raw.data())?;
                    raw.consume(n);
                    conn.process_new_packets()?;
                    continue;
                }
            }
            if raw.fill_from(io).await? == 0 {
                return Ok(0);
            }
        }
    }

    /// True if decrypted bytes or whole records are waiting inside rustls, so the next
    /// [`TlsConn::read`] needs no socket read.
    pub fn has_buffered_plaintext(&self) -> bool {
        self.conn
            .borrow_mut()
            .process_new_packets()
            .map(|state| state.plaintext_bytes_to_read() > 0)
            .unwrap_or(true)
    }

    /// Encrypt `data` and write it to `io`, using `out` as the reused ciphertext buffer.
    pub async fn write<W: AsyncWriteRent>(
        &self,
        io: &mut W,
        mut data: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), TlsError> {
        loop {
            {
                let mut conn = self.conn.borrow_mut();
                let n = conn.writer().write(data)?;
                data = &data[n..];
                while conn.wants_write() {
                    conn.write_tls(out)?;
                }
            }
            write_all_vec(io, out).await?;
            if data.is_empty() {
                return Ok(());
            }
        }
    }

    /// Send close_notify (best effort, used when we end the session).
    pub async fn close<W: AsyncWriteRent>(&self, io: &mut W, out: &mut Vec<u8>) {
        {
            let mut conn = self.conn.borrow_mut();
            conn.send_close_notify();
            while conn.wants_write() {
                if conn.write_tls(out).is_err() {
                    break;
                }
            }
        }
        let _ = write_all_vec(io, out).await;
    }
}
