//! Client-side TLS over monoio's owned-buffer I/O (rustls `ClientConnection`).
//!
//! The load generator's client is strictly request/response, so unlike the router's relay one
//! task owns the whole stream and no `RefCell` is needed. Ciphertext is read into a reused
//! [`ReadBuf`] and fed to rustls; plaintext comes out into the caller's buffer.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::Arc;

use branchgate::buf::{write_all_vec, ReadBuf};
use monoio::net::TcpStream;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::Resumption;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::ClientError;

/// The ALPN protocol PostgreSQL 17 defines; libpq 17 offers it in both TLS modes.
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// Ciphertext read buffer per TLS connection (rustls reassembles records itself).
const TLS_READ_BUFFER_BYTES: usize = 16 * 1024;

/// How the server certificate is checked.
#[derive(Clone, Copy, Debug)]
pub enum Verification<'a> {
    /// Not at all (`sslmode=require`); handshake signatures are still verified, as libpq's
    /// OpenSSL does, so the CPU cost matches a real client.
    None,
    /// Chain to one of the CA certificates in this PEM file, and host name (`verify-full`).
    Roots(&'a Path),
}

/// Why a TLS client configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    /// The CA file could not be read or parsed.
    #[error("cannot read sslrootcert {path}: {source}")]
    RootCert {
        /// The file.
        path: String,
        /// Why.
        source: rustls_pki_types::pem::Error,
    },
    /// The CA file holds no usable certificate.
    #[error("sslrootcert {0} holds no usable CA certificate")]
    NoRootCert(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A client configuration like libpq 17's: ALPN `postgresql`, no session resumption (libpq
/// never resumes), TLS 1.2 and 1.3, rustls's default key exchange groups (X25519 first).
pub fn client_config(verification: Verification<'_>) -> Result<Arc<ClientConfig>, TlsConfigError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let mut config = match verification {
        Verification::None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServerCert(provider)))
            .with_no_client_auth(),
        Verification::Roots(path) => {
            let text = path.display().to_string();
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
                .map_err(|source| TlsConfigError::RootCert {
                    path: text.clone(),
                    source,
                })?;
            let mut roots = RootCertStore::empty();
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(TlsConfigError::NoRootCert(text));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// Accepts any certificate but checks handshake signatures (`sslmode=require`).
#[derive(Debug)]
struct AnyServerCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS connection over TCP.
pub struct TlsStream {
    tcp: TcpStream,
    conn: ClientConnection,
    raw: ReadBuf,
    out: Vec<u8>,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream").finish_non_exhaustive()
    }
}

/// Runs the client handshake on `tcp`. With `direct` (direct SSL: the ClientHello is the
/// connection's first byte) the server must have chosen ALPN `postgresql`, as libpq 17 insists,
/// and a server that hangs up before answering the ClientHello is taken not to speak direct SSL
/// (PostgreSQL 16 and older read it as a startup packet of absurd length and close).
///
/// Not cancel-safe (callers drop the whole connection on timeout).
pub async fn handshake(
    tcp: TcpStream,
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
    direct: bool,
) -> Result<TlsStream, ClientError> {
    let conn = ClientConnection::new(config, server_name)?;
    let mut stream = TlsStream {
        tcp,
        conn,
        raw: ReadBuf::new(TLS_READ_BUFFER_BYTES),
        out: Vec::with_capacity(1024),
    };
    let mut answered = false;
    loop {
        stream.flush_tls().await?;
        if !stream.conn.is_handshaking() {
            break;
        }
        let read = stream.raw.fill_from(&mut stream.tcp).await;
        if direct && !answered && hung_up(&read) {
            return Err(ClientError::DirectSslRefused);
        }
        if read? == 0 {
            return Err(ClientError::Closed);
        }
        answered = true;
        while !stream.raw.is_empty() && stream.conn.is_handshaking() {
            if stream.process_raw()? == 0 {
                break;
            }
        }
    }
    if direct && stream.conn.alpn_protocol() != Some(ALPN_POSTGRESQL) {
        return Err(ClientError::NoAlpn);
    }
    Ok(stream)
}

/// Sends the ClientHello of a handshake that goes no further (idle mode's `hello` stage): the
/// server answers with its first flight, which is left unread, and then waits for the client's.
pub async fn client_hello(
    tcp: &mut TcpStream,
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
) -> Result<(), ClientError> {
    let mut conn = ClientConnection::new(config, server_name)?;
    let mut out = Vec::with_capacity(1024);
    while conn.wants_write() {
        conn.write_tls(&mut out)?;
    }
    write_all_vec(tcp, &mut out).await?;
    Ok(())
}

/// Whether a read result means the server hung up: end of stream, or a reset (the kernel
/// resets a connection closed with unread data, such as the rest of a ClientHello).
fn hung_up(read: &io::Result<usize>) -> bool {
    match read {
        Ok(n) => *n == 0,
        Err(e) => e.kind() == io::ErrorKind::ConnectionReset,
    }
}

impl TlsStream {
    /// Feeds one read's worth of buffered ciphertext to rustls; returns how much it took.
    /// One at a time: rustls refuses more ciphertext while its decrypted plaintext waits to be
    /// read, so feeding everything at once could overflow it on a large result.
    fn process_raw(&mut self) -> Result<usize, ClientError> {
        let n = self.conn.read_tls(&mut self.raw.data())?;
        self.raw.consume(n);
        self.conn.process_new_packets()?;
        Ok(n)
    }

    async fn flush_tls(&mut self) -> Result<(), ClientError> {
        while self.conn.wants_write() {
            self.conn.write_tls(&mut self.out)?;
        }
        write_all_vec(&mut self.tcp, &mut self.out).await?;
        Ok(())
    }

    /// Reads plaintext into `dst`'s free space; 0 at the end of the stream.
    pub async fn read(&mut self, dst: &mut ReadBuf) -> Result<usize, ClientError> {
        loop {
            match self.conn.reader().read(dst.spare_mut()) {
                Ok(n) => {
                    dst.commit(n);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The server went away without close_notify (PostgreSQL does this on FATAL).
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e.into()),
            }
            if self.raw.is_empty() && self.raw.fill_from(&mut self.tcp).await? == 0 {
                return Ok(0);
            }
            self.process_raw()?;
        }
    }

    /// Encrypts and sends all of `data`.
    pub async fn write_all(&mut self, mut data: &[u8]) -> Result<(), ClientError> {
        while !data.is_empty() {
            let n = self.conn.writer().write(data)?;
            data = &data[n..];
            self.flush_tls().await?;
        }
        Ok(())
    }

    /// Sends close_notify (best effort).
    pub async fn close(&mut self) {
        self.conn.send_close_notify();
        let _ = self.flush_tls().await;
    }

    /// Frees the read buffer of a connection that will only be written to from now on.
    pub fn shrink(&mut self) {
        self.raw = ReadBuf::new(0);
        self.out = Vec::new();
    }
}

impl AsRawFd for TlsStream {
    fn as_raw_fd(&self) -> RawFd {
        self.tcp.as_raw_fd()
    }
}
