//! TLS for every listener: the rustls configuration, the handshake, and record protection.
//!
//! Both PostgreSQL TLS modes end up in [`accept`]: direct SSL (the ClientHello is the first
//! thing the client sends, already in the read buffer) and SSLRequest (the handshake follows our
//! `S`). rustls runs the handshake ([`handshake`]); established connections are served by our
//! own in-place [`record`] layer with the secrets rustls negotiated, so a session keeps no TLS
//! buffers and copies nothing per record.
//!
//! # Layout
//! - [`handshake`]: the server handshake on rustls's unbuffered API, without I/O.
//! - [`record`]: opening and sealing records in place after the handshake.
//! - `keys`: AEAD keys, nonces, and the TLS 1.3 traffic secrets key updates come from.
//! - `inbound`: what the peer may send after the handshake (alerts, KeyUpdates, limits).
//! - `differential` (tests and the fuzz crate): the record layer against rustls itself.

#[cfg(any(test, feature = "differential"))]
pub mod differential;
pub mod handshake;
mod inbound;
mod keys;
pub mod record;
#[cfg(test)]
mod tests;

use std::cell::RefCell;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use monoio::io::{AsyncReadRent, AsyncWriteRent};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{CipherSuite, ServerConfig, SupportedCipherSuite};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::buf::{write_all_vec, ReadBuf};
pub use handshake::{ServerHandshake, Want};
pub use record::{Opened, RecordError, RecordLayer, TrafficSecret, TrafficSecrets, MAX_PLAINTEXT};

/// The ALPN protocol name PostgreSQL 17 defines for its TLS connections.
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// Errors of the TLS layer. None of them reaches the client as an ErrorResponse: TLS failures are
/// answered with TLS alerts (chosen by rustls) or by closing the connection.
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
    /// rustls refused the certificate/key pair (or the protocol versions, which cannot happen).
    #[error("invalid certificate or key: {0}")]
    Config(rustls::Error),
    /// The handshake failed; the alert rustls chose was sent.
    #[error("TLS: {0}")]
    Protocol(#[from] rustls::Error),
    /// A record after the handshake was bad, or the connection's keys ran out.
    #[error("TLS record: {0}")]
    Record(#[from] RecordError),
    /// The keys or sequence numbers rustls handed over after the handshake are not the ones
    /// the handshake implies (its noted traffic secrets, no record after the Finished): the
    /// record layer would fall out of step with the client. internal_error was sent.
    #[error("TLS keys out of step after the handshake: {0}")]
    KeysOutOfStep(&'static str),
    /// A direct-SSL client did not offer ALPN `postgresql` (PostgreSQL 17 closes these).
    #[error("direct SSL connection without ALPN")]
    NoAlpn,
    /// The handshake was used after it had been handed over.
    #[error("TLS handshake already finished")]
    Finished,
    /// rustls could not encode a handshake record.
    #[error("cannot encode a TLS handshake record")]
    Encode,
    /// The peer closed the connection during the handshake.
    #[error("connection closed during TLS handshake")]
    Eof,
    /// Socket error.
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
}

/// What the handshake learned about the client.
#[derive(Debug, Clone, Default)]
pub struct Handshake {
    /// The server name the client asked for (SNI), if any.
    pub sni: Option<Box<str>>,
    /// True if the client negotiated ALPN `postgresql`.
    pub alpn: bool,
}

/// What rustls tells our hooks (the certificate resolver, the key log) about the handshake it
/// is running. The unbuffered server connection has no SNI accessor and does not give out
/// traffic secrets, so the hooks note them here, and [`ServerHandshake`] takes them right
/// after each rustls call: no other handshake can run on this thread in between.
#[derive(Default)]
struct Noted {
    sni: Option<Box<str>>,
    client_traffic: Option<TrafficSecret>,
    server_traffic: Option<TrafficSecret>,
}

thread_local! {
    static NOTED: RefCell<Noted> = RefCell::new(Noted::default());
}

impl Noted {
    /// Keeps what `newer` learned, and what this knew that `newer` does not.
    fn absorb(&mut self, newer: Noted) {
        self.sni = newer.sni.or(self.sni.take());
        self.client_traffic = newer.client_traffic.or(self.client_traffic.take());
        self.server_traffic = newer.server_traffic.or(self.server_traffic.take());
    }
}

fn take_noted() -> Noted {
    NOTED.with(|noted| std::mem::take(&mut *noted.borrow_mut()))
}

/// The configured certificate resolver, noting each ClientHello's SNI for [`Handshake::sni`].
#[derive(Debug)]
struct NoteSni(Arc<dyn ResolvesServerCert>);

impl ResolvesServerCert for NoteSni {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let sni = client_hello.server_name().map(Box::from);
        NOTED.with(|noted| noted.borrow_mut().sni = sni);
        self.0.resolve(client_hello)
    }
}

/// Notes the TLS 1.3 application traffic secrets, from which key updates are derived.
#[derive(Debug)]
struct NoteTrafficSecrets;

const CLIENT_TRAFFIC_SECRET: &str = "CLIENT_TRAFFIC_SECRET_0";
const SERVER_TRAFFIC_SECRET: &str = "SERVER_TRAFFIC_SECRET_0";

impl rustls::KeyLog for NoteTrafficSecrets {
    fn will_log(&self, label: &str) -> bool {
        label == CLIENT_TRAFFIC_SECRET || label == SERVER_TRAFFIC_SECRET
    }

    fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
        NOTED.with(|noted| {
            let mut noted = noted.borrow_mut();
            match label {
                CLIENT_TRAFFIC_SECRET => noted.client_traffic = TrafficSecret::new(secret),
                SERVER_TRAFFIC_SECRET => noted.server_traffic = TrafficSecret::new(secret),
                _ => {}
            }
        });
    }
}

/// Build the server configuration from PEM files: see [`server_config_from_der`].
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
    server_config_from_der(certs, key)
}

/// The server configuration for a certificate chain and its key: ALPN `postgresql`, TLS 1.2
/// and 1.3, aws-lc-rs (the build the record layer's AEADs come from) with the cipher suites
/// in our order ([`order_cipher_suites`]). Public for the benches, which have no files.
pub fn server_config_from_der(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    order_cipher_suites(&mut provider.cipher_suites);
    let config = rustls_server_config(provider, certs, key)?;
    Ok(Arc::new(noting_secrets(config)))
}

/// The rustls side of the router's configuration, for `provider`: what a plain rustls server
/// configured like the router is (the differential tests run one).
pub(crate) fn rustls_server_config(
    provider: rustls::crypto::CryptoProvider,
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<ServerConfig, TlsError> {
    let mut config = ServerConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(TlsError::Config)?;
    // Our order, not the client's: see `order_cipher_suites`.
    config.ignore_client_order = true;
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    // libpq never resumes sessions: tickets would only cost CPU and bytes per handshake.
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// `config` with the hooks [`ServerHandshake`] needs: established connections are served by
/// `record::RecordLayer` with the negotiated secrets, the SNI is noted.
pub(crate) fn noting_secrets(mut config: ServerConfig) -> ServerConfig {
    config.enable_secret_extraction = true;
    config.key_log = Arc::new(NoteTrafficSecrets);
    config.cert_resolver = Arc::new(NoteSni(config.cert_resolver.clone()));
    config
}

/// Sorts `suites` into the order the server prefers them in: TLS 1.3 first, and within each
/// version AES-128-GCM, then ChaCha20-Poly1305, then AES-256-GCM; suites it does not know keep
/// their order, last. Clients (rustls's, OpenSSL's) offer AES-256-GCM first, whose TLS 1.3
/// suite hashes with SHA-384: SHA-384 took ~5.7% of the router's CPU per connection. Every
/// suite stays available to clients that offer nothing else. Public so the benches configure
/// their rustls servers like the router.
pub fn order_cipher_suites(suites: &mut [SupportedCipherSuite]) {
    suites.sort_by_key(|suite| {
        let tls12 = matches!(suite, SupportedCipherSuite::Tls12(_));
        let bulk = match suite.suite() {
            CipherSuite::TLS13_AES_128_GCM_SHA256
            | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
            | CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 0,
            CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
            | CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
            | CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => 1,
            CipherSuite::TLS13_AES_256_GCM_SHA384
            | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
            | CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => 2,
            _ => 3,
        };
        (tls12, bulk)
    });
}

/// Run the server handshake on `io`. `raw` holds ciphertext already read (the ClientHello's first
/// bytes for direct SSL) and keeps what the client sent after its Finished, for the record layer.
///
/// Not cancel-safe (the caller drops the whole connection on timeout).
pub async fn accept<S: AsyncReadRent + AsyncWriteRent>(
    io: &mut S,
    config: Arc<ServerConfig>,
    raw: &mut ReadBuf,
    out: &mut Vec<u8>,
) -> Result<(RecordLayer, Handshake), TlsError> {
    let mut handshake = ServerHandshake::new(config)?;
    loop {
        let want = match handshake.advance(raw, out) {
            Ok(want) => want,
            Err(error) => {
                // The alert rustls chose is in `out`.
                write_all_vec(io, out).await.ok();
                return Err(error);
            }
        };
        write_all_vec(io, out).await?;
        match want {
            Want::Write => {}
            Want::Read => {
                if raw.fill_from(io).await? == 0 {
                    return Err(TlsError::Eof);
                }
            }
            Want::Done => return handshake.finish(),
        }
    }
}

/// Opens every whole record at the front of `cipher`, appending its data to `plain`. Stops
/// before a record whose data might not fit. Returns false if the client sent close_notify
/// (after the data before it); nothing after it is opened.
pub fn open_into(
    records: &mut RecordLayer,
    cipher: &mut ReadBuf,
    plain: &mut ReadBuf,
) -> Result<bool, TlsError> {
    if records.peer_closed() {
        return Ok(false);
    }
    while let Some(len) = records.record_len(cipher.data())? {
        if plain.spare_mut().len() < len {
            break;
        }
        let opened = records.open(&mut cipher.data_mut()[..len])?;
        if let Opened::Data(range) = &opened {
            let data = &cipher.data()[range.clone()];
            plain.spare_mut()[..data.len()].copy_from_slice(data);
            plain.commit(data.len());
        }
        cipher.consume(len);
        if opened == Opened::Closed {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Seals `plain` as application-data records appended to `out`, each after the control
/// records that are due then (a KeyUpdate, a renegotiation refusal).
pub fn seal_into(
    records: &mut RecordLayer,
    plain: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), RecordError> {
    seal_data(records, plain, out, RecordLayer::seal)
}

/// As [`seal_into`], for the last data of a connection (its FATAL ErrorResponse): a TLS 1.2
/// connection at its record limit keeps the records this and a close_notify need.
pub fn seal_final_into(
    records: &mut RecordLayer,
    plain: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), RecordError> {
    seal_data(records, plain, out, RecordLayer::seal_final)
}

fn seal_data(
    records: &mut RecordLayer,
    plain: &[u8],
    out: &mut Vec<u8>,
    seal: fn(&mut RecordLayer, &mut [u8], usize) -> Result<usize, RecordError>,
) -> Result<(), RecordError> {
    let (header, trailer) = (records.seal_header_len(), records.seal_trailer_len());
    for chunk in plain.chunks(MAX_PLAINTEXT) {
        if records.control_due() {
            let start = out.len();
            out.resize(start + records.control_room(), 0);
            let len = records.seal_control(&mut out[start..])?;
            out.truncate(start + len);
        }
        let start = out.len();
        out.resize(start + header, 0);
        out.extend_from_slice(chunk);
        out.resize(out.len() + trailer, 0);
        let len = match seal(records, &mut out[start..], chunk.len()) {
            Ok(len) => len,
            Err(error) => {
                out.truncate(start);
                return Err(error);
            }
        };
        debug_assert_eq!(start + len, out.len());
    }
    Ok(())
}

/// Appends a close_notify alert record to `out` (after any record the client is owed; nothing
/// if a close_notify or a fatal alert was sent before).
pub fn close_notify_into(records: &mut RecordLayer, out: &mut Vec<u8>) -> Result<(), RecordError> {
    let start = out.len();
    out.resize(start + record::CONTROL_RECORD_ROOM, 0);
    let sealed = records.seal_close_notify(&mut out[start..]);
    out.truncate(start + *sealed.as_ref().unwrap_or(&0));
    sealed.map(|_| ())
}

/// Appends to `out` what rustls sends when a connection fails with `error`: the alert it sends
/// for that error (`RecordError::alert`), after the records the client is owed, or nothing
/// where rustls sends nothing. Send it, then close.
pub fn fatal_alert_into(records: &mut RecordLayer, error: &RecordError, out: &mut Vec<u8>) {
    let start = out.len();
    out.resize(start + record::CONTROL_RECORD_ROOM, 0);
    let len = records.seal_failure(error, &mut out[start..]);
    out.truncate(start + len);
}
