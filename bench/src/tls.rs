//! TLS fixture: a CA and server certificate, rustls configurations set up like the router's,
//! and a TLS 1.3 handshake run entirely in memory (no sockets), timing the server's share.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use branchgate::tls::ALPN_POSTGRESQL;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SignatureAlgorithm, PKCS_ECDSA_P256_SHA256, PKCS_RSA_SHA256,
};
use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, ClientConnection, ConnectionCommon, RootCertStore, ServerConfig};
use rustls::{ServerConnection, SupportedProtocolVersion};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

/// The name the server certificate is for, sent as SNI.
pub const SERVER_NAME: &str = "db.example.test";

/// [`SERVER_NAME`] as the name clients connect to.
pub fn server_name() -> ServerName<'static> {
    ServerName::DnsName(
        SERVER_NAME
            .try_into()
            .expect("SERVER_NAME is a valid DNS name"),
    )
}

/// Flights after which a handshake that has not finished is declared stuck (TLS 1.3 needs 2).
pub(crate) const MAX_FLIGHTS: usize = 8;

/// Clients offer TLS 1.3 only, so a bench can never quietly measure TLS 1.2 (any current libpq
/// negotiates 1.3 with the router); the server keeps the router's versions.
const CLIENT_VERSIONS: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// The server key type: the choice DESIGN.md argues about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// ECDSA P-256 with SHA-256: what the demo and benchmarks use.
    EcdsaP256,
    /// RSA-2048 (signing with RSA-PSS in TLS 1.3): the common operator default.
    Rsa2048,
}

impl KeyKind {
    /// Both kinds, for bench loops.
    pub const ALL: [KeyKind; 2] = [KeyKind::EcdsaP256, KeyKind::Rsa2048];

    /// A short label for bench ids.
    pub fn label(self) -> &'static str {
        match self {
            KeyKind::EcdsaP256 => "ecdsa-p256",
            KeyKind::Rsa2048 => "rsa-2048",
        }
    }

    fn algorithm(self) -> &'static SignatureAlgorithm {
        match self {
            KeyKind::EcdsaP256 => &PKCS_ECDSA_P256_SHA256,
            KeyKind::Rsa2048 => &PKCS_RSA_SHA256,
        }
    }
}

/// A CA and a server certificate it signed, both with keys of one [`KeyKind`].
pub struct Pki {
    /// The CA certificate, the client's only trust anchor.
    pub ca: CertificateDer<'static>,
    /// The server certificate.
    pub cert: CertificateDer<'static>,
    /// The server certificate as PEM (for the router's file-based configuration).
    pub cert_pem: String,
    /// The server's private key, PKCS#8 PEM.
    pub key_pem: String,
    pub(crate) key: PrivatePkcs8KeyDer<'static>,
}

impl Pki {
    /// Generates the CA and the server certificate (RSA key generation takes a moment).
    pub fn generate(kind: KeyKind) -> Result<Pki, rcgen::Error> {
        let ca_key = KeyPair::generate_for(kind.algorithm())?;
        let mut ca_params = CertificateParams::new(Vec::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "branchgate bench CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = ca_params.self_signed(&ca_key)?;

        let key = KeyPair::generate_for(kind.algorithm())?;
        let mut params = CertificateParams::new(vec![SERVER_NAME.to_owned()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, SERVER_NAME);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &ca, &ca_key)?;
        Ok(Pki {
            ca: ca.der().clone(),
            cert: cert.der().clone(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
        })
    }
}

/// A named rustls crypto provider.
pub struct Provider {
    /// Label for bench ids.
    pub name: &'static str,
    /// The provider.
    pub provider: Arc<CryptoProvider>,
}

/// The providers worth comparing: aws-lc-rs as the router uses it (X25519 preferred), aws-lc-rs
/// limited to the post-quantum hybrid X25519MLKEM768 (what OpenSSL 3.5 clients push), and ring
/// when the `ring` feature is on.
pub fn providers() -> Vec<Provider> {
    use rustls::crypto::aws_lc_rs;
    let mlkem = CryptoProvider {
        kx_groups: vec![aws_lc_rs::kx_group::X25519MLKEM768],
        ..aws_lc_rs::default_provider()
    };
    #[allow(unused_mut)] // only the `ring` feature adds to it
    let mut providers = vec![
        Provider {
            name: "aws-lc-rs",
            provider: Arc::new(aws_lc_rs::default_provider()),
        },
        Provider {
            name: "aws-lc-rs-x25519mlkem768",
            provider: Arc::new(mlkem),
        },
    ];
    #[cfg(feature = "ring")]
    providers.push(Provider {
        name: "ring",
        provider: Arc::new(rustls::crypto::ring::default_provider()),
    });
    providers
}

/// The server configuration `branchgate::tls::server_config` builds, with an explicit provider:
/// the router's default protocol versions, its cipher suite order (the server's, not the
/// client's), ALPN `postgresql`, no session tickets.
pub fn server_config(
    provider: Arc<CryptoProvider>,
    pki: &Pki,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let mut provider = Arc::unwrap_or_clone(provider);
    branchgate::tls::order_cipher_suites(&mut provider.cipher_suites);
    let key = PrivateKeyDer::Pkcs8(pki.key.clone_key());
    let mut config = ServerConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![pki.cert.clone()], key)?;
    config.ignore_client_order = true;
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// A `sslmode=verify-full` client like libpq with direct SSL: TLS 1.3, ALPN `postgresql`,
/// the CA as its only root, no session resumption.
pub fn client_config(
    provider: Arc<CryptoProvider>,
    pki: &Pki,
) -> Result<Arc<ClientConfig>, rustls::Error> {
    let mut roots = RootCertStore::empty();
    roots.add(pki.ca.clone())?;
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(CLIENT_VERSIONS)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// Why an in-memory handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// rustls refused something (either side).
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// Moving bytes between the in-memory buffers failed.
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    /// The router's handshake refused something (`branchgate::tls::ServerHandshake`).
    #[error("router: {0}")]
    Router(#[from] branchgate::tls::TlsError),
    /// A record of the router's record layer could not be sealed or opened.
    #[error("record: {0}")]
    Record(#[from] branchgate::tls::RecordError),
    /// A client flight was larger than the router's read buffer.
    #[error("client flight larger than the read buffer")]
    Overflow,
    /// The client's traffic secrets were not logged, or could not be extracted.
    #[error("client traffic secrets missing")]
    NoSecrets,
    /// The handshake finished without agreeing on ALPN `postgresql`.
    #[error("ALPN postgresql not negotiated")]
    NoAlpn,
    /// Neither side had anything more to say, yet the handshake was not over.
    #[error("handshake did not finish in {MAX_FLIGHTS} flights")]
    Stalled,
}

/// A finished handshake.
pub struct Handshaken {
    /// Time spent in the server's rustls calls (creating the connection included).
    pub server_busy: Duration,
    /// The server side, for inspection.
    pub server: ServerConnection,
    /// The client side, for inspection.
    pub client: ClientConnection,
}

/// Runs full handshakes between a client and a server configuration through one reused buffer.
pub struct InMemoryHandshake {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    name: ServerName<'static>,
    wire: Vec<u8>,
}

impl InMemoryHandshake {
    /// A handshake runner for these configurations, connecting to [`SERVER_NAME`].
    pub fn new(server: Arc<ServerConfig>, client: Arc<ClientConfig>) -> Self {
        Self {
            server,
            client,
            name: server_name(),
            wire: Vec::with_capacity(16 * 1024),
        }
    }

    /// One full handshake: client flight, server flight, and so on until both are done.
    pub fn run(&mut self) -> Result<Handshaken, HandshakeError> {
        let mut client = ClientConnection::new(self.client.clone(), self.name.clone())?;
        let started = Instant::now();
        let mut server = ServerConnection::new(self.server.clone())?;
        let mut server_busy = started.elapsed();
        for _ in 0..MAX_FLIGHTS {
            if !client.is_handshaking() && !server.is_handshaking() {
                if server.alpn_protocol() != Some(ALPN_POSTGRESQL) {
                    return Err(HandshakeError::NoAlpn);
                }
                return Ok(Handshaken {
                    server_busy,
                    server,
                    client,
                });
            }
            drain(&mut client, &mut self.wire)?;
            let started = Instant::now();
            feed(&mut server, &self.wire)?;
            drain(&mut server, &mut self.wire)?;
            server_busy += started.elapsed();
            feed(&mut client, &self.wire)?;
        }
        Err(HandshakeError::Stalled)
    }
}

/// Moves everything `conn` wants to send into `wire` (replacing what was there).
pub(crate) fn drain<D>(
    conn: &mut ConnectionCommon<D>,
    wire: &mut Vec<u8>,
) -> Result<(), HandshakeError> {
    wire.clear();
    while conn.wants_write() {
        conn.write_tls(wire)?;
    }
    Ok(())
}

/// Hands `bytes` to `conn` and lets it process them.
pub(crate) fn feed<D>(
    conn: &mut ConnectionCommon<D>,
    mut bytes: &[u8],
) -> Result<(), HandshakeError> {
    while !bytes.is_empty() {
        conn.read_tls(&mut bytes)?;
        conn.process_new_packets()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::{NamedGroup, ProtocolVersion};

    #[test]
    fn handshakes_with_every_provider_and_key() {
        for kind in KeyKind::ALL {
            let pki = Pki::generate(kind).expect("certificates");
            for p in providers() {
                let server = server_config(p.provider.clone(), &pki).expect("server config");
                let client = client_config(p.provider.clone(), &pki).expect("client config");
                let mut handshake = InMemoryHandshake::new(server, client);
                for _ in 0..2 {
                    let done = handshake
                        .run()
                        .unwrap_or_else(|e| panic!("{} with {}: {e}", p.name, kind.label()));
                    assert_eq!(
                        done.server.protocol_version(),
                        Some(ProtocolVersion::TLSv1_3)
                    );
                    assert_eq!(done.client.alpn_protocol(), Some(ALPN_POSTGRESQL));
                    assert_eq!(done.server.server_name(), Some(SERVER_NAME));
                    let group = done
                        .server
                        .negotiated_key_exchange_group()
                        .expect("key exchange done")
                        .name();
                    let want = if p.name.contains("mlkem") {
                        NamedGroup::X25519MLKEM768
                    } else {
                        NamedGroup::X25519
                    };
                    assert_eq!(group, want, "{}", p.name);
                    assert!(done.server_busy > Duration::ZERO);
                }
            }
        }
    }

    #[test]
    fn fixture_matches_the_router_configuration() {
        let pki = Pki::generate(KeyKind::EcdsaP256).expect("certificates");
        let dir = tempfile::tempdir().expect("temp dir");
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert, &pki.cert_pem).expect("write cert");
        std::fs::write(&key, &pki.key_pem).expect("write key");
        let router = branchgate::tls::server_config(&cert, &key).expect("router config");

        let provider = providers().remove(0).provider;
        let ours = server_config(provider.clone(), &pki).expect("fixture config");
        assert_eq!(ours.alpn_protocols, router.alpn_protocols);
        assert_eq!(ours.send_tls13_tickets, router.send_tls13_tickets);
        assert_eq!(ours.ignore_client_order, router.ignore_client_order);
        assert_eq!(
            ours.crypto_provider().cipher_suites,
            router.crypto_provider().cipher_suites
        );
        let client = client_config(provider, &pki).expect("client config");
        InMemoryHandshake::new(router, client)
            .run()
            .expect("handshake with the router's own configuration");
    }
}
