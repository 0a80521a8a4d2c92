//! Deterministic handshakes: seeded randomness, X25519 with fixed private keys, and an Ed25519
//! server key (whose signatures are deterministic), so that rustls's server and ours, fed the
//! same client flights, send the same bytes, and the same inputs replay the same connection.

use std::cell::Cell;
use std::sync::{Arc, OnceLock};

use aws_lc_rs::agreement;
use aws_lc_rs::signature::Ed25519KeyPair;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::aws_lc_rs::{cipher_suite, default_provider};
use rustls::crypto::{
    ActiveKeyExchange, CryptoProvider, GetRandomFailed, SecureRandom, SharedSecret,
    SupportedKxGroup,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{
    ClientConfig, DigitallySignedStruct, NamedGroup, PeerMisbehaved, ServerConfig, SignatureScheme,
    SupportedCipherSuite,
};

use crate::tls::{noting_secrets, order_cipher_suites, rustls_server_config, ALPN_POSTGRESQL};

/// The suites the router offers that the differential tests cover, by index.
pub const SUITES: [SupportedCipherSuite; 6] = [
    cipher_suite::TLS13_AES_128_GCM_SHA256,
    cipher_suite::TLS13_AES_256_GCM_SHA384,
    cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    cipher_suite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
];

/// The server name the client asks for.
pub const SERVER_NAME: &str = "localhost";

/// Which party a random stream belongs to: each has its own, reset before every connection.
#[derive(Debug, Clone, Copy)]
enum Party {
    RustlsServer = 0,
    OurServer = 1,
    Client = 2,
}

thread_local! {
    /// The random streams of this thread's connection (tests run connections in parallel
    /// threads; a connection never leaves its thread).
    static STREAMS: [Cell<u64>; 3] = const { [Cell::new(0), Cell::new(0), Cell::new(0)] };
}

/// Restarts every party's random stream from `seed`: both servers draw the same numbers.
pub fn reset_randomness(seed: u64) {
    STREAMS.with(|streams| {
        for stream in streams {
            stream.set(seed);
        }
    });
}

/// SplitMix64 over this thread's stream for one party: not secret, only repeatable.
#[derive(Debug)]
struct Seeded(Party);

impl SecureRandom for Seeded {
    fn fill(&self, buf: &mut [u8]) -> Result<(), GetRandomFailed> {
        STREAMS.with(|streams| {
            let stream = &streams[self.0 as usize];
            for chunk in buf.chunks_mut(8) {
                let mut z = stream.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
                stream.set(z);
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                z ^= z >> 31;
                chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
            }
        });
        Ok(())
    }
}

static RUSTLS_SERVER_RANDOM: Seeded = Seeded(Party::RustlsServer);
static OUR_SERVER_RANDOM: Seeded = Seeded(Party::OurServer);
static CLIENT_RANDOM: Seeded = Seeded(Party::Client);

/// X25519 with a fixed private key.
#[derive(Debug)]
struct FixedX25519([u8; 32]);

static SERVER_KX: FixedX25519 = FixedX25519([0x5e; 32]);
static CLIENT_KX: FixedX25519 = FixedX25519([0xc1; 32]);

impl SupportedKxGroup for FixedX25519 {
    fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, rustls::Error> {
        let private = agreement::PrivateKey::from_private_key(&agreement::X25519, &self.0)
            .map_err(|_| rustls::Error::General("X25519 private key".into()))?;
        let public = private
            .compute_public_key()
            .map_err(|_| rustls::Error::General("X25519 public key".into()))?
            .as_ref()
            .to_vec();
        Ok(Box::new(FixedKeyExchange { private, public }))
    }

    fn name(&self) -> NamedGroup {
        NamedGroup::X25519
    }
}

struct FixedKeyExchange {
    private: agreement::PrivateKey,
    public: Vec<u8>,
}

impl ActiveKeyExchange for FixedKeyExchange {
    fn complete(self: Box<Self>, peer_pub_key: &[u8]) -> Result<SharedSecret, rustls::Error> {
        let peer = agreement::UnparsedPublicKey::new(&agreement::X25519, peer_pub_key);
        agreement::agree(
            &self.private,
            peer,
            rustls::Error::from(PeerMisbehaved::InvalidKeyShare),
            |secret| Ok(SharedSecret::from(secret)),
        )
    }

    fn pub_key(&self) -> &[u8] {
        &self.public
    }

    fn group(&self) -> NamedGroup {
        NamedGroup::X25519
    }
}

/// aws-lc-rs with a party's random stream and fixed X25519 key.
fn provider(random: &'static Seeded, kx: &'static FixedX25519) -> CryptoProvider {
    CryptoProvider {
        kx_groups: vec![kx],
        secure_random: random,
        ..default_provider()
    }
}

/// The server's Ed25519 key (from a fixed seed) and its self-signed certificate.
fn server_identity() -> &'static (CertificateDer<'static>, PrivatePkcs8KeyDer<'static>) {
    static IDENTITY: OnceLock<(CertificateDer<'static>, PrivatePkcs8KeyDer<'static>)> =
        OnceLock::new();
    IDENTITY.get_or_init(|| {
        let pair = Ed25519KeyPair::from_seed_unchecked(&[0xed; 32]).expect("a 32-byte seed");
        let pkcs8 = pair.to_pkcs8v1().expect("PKCS#8 of an Ed25519 key");
        let key = PrivatePkcs8KeyDer::from(pkcs8.as_ref().to_vec());
        let signer = rcgen::KeyPair::try_from(&key).expect("rcgen takes the Ed25519 key");
        let mut params =
            rcgen::CertificateParams::new(vec![SERVER_NAME.to_owned()]).expect("server name");
        // Fixed, so the certificate (and every handshake) is the same in every run.
        params.serial_number = Some(rcgen::SerialNumber::from(1u64));
        let cert = params
            .self_signed(&signer)
            .expect("self-signed certificate");
        (cert.der().clone(), key)
    })
}

/// The two servers' configurations: rustls's plain server and ours (the same configuration
/// with the hooks `ServerHandshake` needs), each with its own random stream.
pub fn server_configs() -> (Arc<ServerConfig>, Arc<ServerConfig>) {
    let (cert, key) = server_identity();
    let build = |random| {
        let mut provider = provider(random, &SERVER_KX);
        order_cipher_suites(&mut provider.cipher_suites);
        rustls_server_config(
            provider,
            vec![cert.clone()],
            PrivateKeyDer::Pkcs8(key.clone_key()),
        )
        .expect("server configuration")
    };
    let rustls = build(&RUSTLS_SERVER_RANDOM);
    let ours = noting_secrets(build(&OUR_SERVER_RANDOM));
    (Arc::new(rustls), Arc::new(ours))
}

/// A client offering only `suite` (and its version), ALPN `postgresql`, able to hand its keys
/// over after the handshake.
pub fn client_config(suite: SupportedCipherSuite) -> Arc<ClientConfig> {
    let provider = CryptoProvider {
        cipher_suites: vec![suite],
        ..provider(&CLIENT_RANDOM, &CLIENT_KX)
    };
    let mut config = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[suite.version()])
        .expect("the suite's version")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(TrustTheServer))
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    config.enable_secret_extraction = true;
    Arc::new(config)
}

/// The server is whoever the test made it: its certificate is taken as it is. What the tests
/// check comes after the handshake.
#[derive(Debug)]
struct TrustTheServer;

impl ServerCertVerifier for TrustTheServer {
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
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}
