//! The router's own TLS path, in memory against a rustls client: the handshake through
//! `branchgate::tls::ServerHandshake` (rustls's unbuffered API, sans I/O) until its
//! `RecordLayer` is ready, then that record layer opening and sealing records in place.
//!
//! To give the server's record layer records to open, the client's keys and traffic secrets
//! are taken out of rustls after the handshake and put into a second `RecordLayer` playing the
//! client: it seals at the router's speed, and rekeys like a client would when its key nears
//! the confidentiality limit (a bench seals millions of records).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use branchgate::buf::{ReadBuf, POOL_BUFFER_BYTES};
use branchgate::tls::record::CONTROL_RECORD_ROOM;
use branchgate::tls::{
    Handshake, Opened, RecordError, RecordLayer, ServerHandshake, TrafficSecret, TrafficSecrets,
    Want,
};
use rustls::crypto::aws_lc_rs::{cipher_suite, default_provider};
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, ClientConnection, KeyLog, ServerConfig, SupportedCipherSuite};
use rustls_pki_types::{PrivateKeyDer, ServerName};

use crate::tls::{client_config, drain, feed, server_name, HandshakeError, Pki, MAX_FLIGHTS};

/// The TLS 1.3 suites, with labels for bench ids: the router's choice first.
pub const TLS13_SUITES: [(&str, SupportedCipherSuite); 3] = [
    ("aes-128-gcm", cipher_suite::TLS13_AES_128_GCM_SHA256),
    (
        "chacha20-poly1305",
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ),
    ("aes-256-gcm", cipher_suite::TLS13_AES_256_GCM_SHA384),
];

/// The configuration the router builds for this certificate and key.
pub fn router_config(pki: &Pki) -> Result<Arc<ServerConfig>, branchgate::tls::TlsError> {
    let key = PrivateKeyDer::Pkcs8(pki.key.clone_key());
    branchgate::tls::server_config_from_der(vec![pki.cert.clone()], key)
}

/// `config` taking the client's order of cipher suites, as the router did before it chose
/// them itself: rustls and OpenSSL clients then get TLS13_AES_256_GCM_SHA384.
pub fn in_client_order(config: &ServerConfig) -> Arc<ServerConfig> {
    let mut config = config.clone();
    config.ignore_client_order = false;
    Arc::new(config)
}

/// A finished handshake through the router's `ServerHandshake`.
pub struct RouterHandshaken {
    /// Time spent in the router's handshake calls (creating it and `finish` included).
    pub server_busy: Duration,
    /// The server's record layer, ready for application data.
    pub records: RecordLayer,
    /// What the router learned about the client.
    pub handshake: Handshake,
    /// The client side.
    pub client: ClientConnection,
}

/// Runs full handshakes between a rustls client and the router's handshake, through buffers
/// reused from one handshake to the next like the router's pooled ones.
pub struct RouterHandshake {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    name: ServerName<'static>,
    wire: Vec<u8>,
    raw: ReadBuf,
    out: Vec<u8>,
}

impl RouterHandshake {
    /// A handshake runner for a router configuration and a client connecting to
    /// [`SERVER_NAME`](crate::tls::SERVER_NAME).
    pub fn new(server: Arc<ServerConfig>, client: Arc<ClientConfig>) -> Self {
        Self {
            server,
            client,
            name: server_name(),
            wire: Vec::with_capacity(16 * 1024),
            raw: ReadBuf::new(POOL_BUFFER_BYTES),
            out: Vec::with_capacity(16 * 1024),
        }
    }

    /// One full handshake, driven like `branchgate::tls::accept` drives it over a socket.
    pub fn run(&mut self) -> Result<RouterHandshaken, HandshakeError> {
        let mut client = ClientConnection::new(self.client.clone(), self.name.clone())?;
        self.raw.clear();
        self.out.clear();
        let started = Instant::now();
        let mut server = ServerHandshake::new(self.server.clone())?;
        let mut server_busy = started.elapsed();
        for _ in 0..MAX_FLIGHTS {
            drain(&mut client, &mut self.wire)?;
            let spare = self.raw.spare_mut();
            let flight = spare
                .get_mut(..self.wire.len())
                .ok_or(HandshakeError::Overflow)?;
            flight.copy_from_slice(&self.wire);
            self.raw.commit(self.wire.len());
            loop {
                let started = Instant::now();
                let want = server.advance(&mut self.raw, &mut self.out);
                server_busy += started.elapsed();
                // On failure, the server's error says more than the client's about its alert.
                let want = want?;
                feed(&mut client, &self.out)?;
                self.out.clear();
                match want {
                    Want::Write => {}
                    Want::Read => break,
                    Want::Done => {
                        let started = Instant::now();
                        let (records, handshake) = server.finish()?;
                        server_busy += started.elapsed();
                        if !handshake.alpn {
                            return Err(HandshakeError::NoAlpn);
                        }
                        if client.is_handshaking() {
                            return Err(HandshakeError::Stalled);
                        }
                        return Ok(RouterHandshaken {
                            server_busy,
                            records,
                            handshake,
                            client,
                        });
                    }
                }
            }
        }
        Err(HandshakeError::Stalled)
    }
}

/// Both ends of an established connection as record layers.
pub struct Records {
    /// The router's record layer.
    pub server: RecordLayer,
    /// The client's keys in a record layer of their own: what it seals, `server` opens.
    pub client: RecordLayer,
}

/// Keeps the client's TLS 1.3 application traffic secrets, which `RecordLayer` derives key
/// updates from.
#[derive(Debug, Default)]
struct ClientTrafficSecrets(Mutex<(Option<TrafficSecret>, Option<TrafficSecret>)>);

impl KeyLog for ClientTrafficSecrets {
    fn will_log(&self, label: &str) -> bool {
        matches!(label, "CLIENT_TRAFFIC_SECRET_0" | "SERVER_TRAFFIC_SECRET_0")
    }

    fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
        let mut noted = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match label {
            "CLIENT_TRAFFIC_SECRET_0" => noted.0 = TrafficSecret::new(secret),
            "SERVER_TRAFFIC_SECRET_0" => noted.1 = TrafficSecret::new(secret),
            _ => {}
        }
    }
}

/// Runs one handshake between the router's configuration and a TLS 1.3 client offering only
/// `suite`, and returns both ends' record layers.
pub fn connected_records(
    pki: &Pki,
    suite: SupportedCipherSuite,
) -> Result<Records, HandshakeError> {
    let server = router_config(pki)?;
    let provider = CryptoProvider {
        cipher_suites: vec![suite],
        ..default_provider()
    };
    let secrets = Arc::new(ClientTrafficSecrets::default());
    let mut client = Arc::unwrap_or_clone(client_config(Arc::new(provider), pki)?);
    client.enable_secret_extraction = true;
    client.key_log = secrets.clone();
    let done = RouterHandshake::new(server, Arc::new(client)).run()?;

    let version = done
        .client
        .protocol_version()
        .ok_or(HandshakeError::Stalled)?;
    let negotiated = done
        .client
        .negotiated_cipher_suite()
        .ok_or(HandshakeError::Stalled)?;
    let keys = done.client.dangerous_extract_secrets()?;
    let (client_secret, server_secret) =
        std::mem::take(&mut *secrets.0.lock().unwrap_or_else(PoisonError::into_inner));
    // `RecordLayer` is the server's: it receives under `client` and sends under `server`.
    // Played by the client, the two swap.
    let traffic = TrafficSecrets {
        client: server_secret.ok_or(HandshakeError::NoSecrets)?,
        server: client_secret.ok_or(HandshakeError::NoSecrets)?,
    };
    let client = RecordLayer::new(keys, version, negotiated, Some(traffic))?;
    Ok(Records {
        server: done.records,
        client,
    })
}

/// Replaces `out` with `count` application-data records of `plain`, sealed by `sender` the way
/// the router sends them (`branchgate::tls::seal_into`: a KeyUpdate first when one is due).
pub fn seal_records(
    sender: &mut RecordLayer,
    plain: &[u8],
    count: usize,
    out: &mut Vec<u8>,
) -> Result<(), RecordError> {
    out.clear();
    for _ in 0..count {
        branchgate::tls::seal_into(sender, plain, out)?;
    }
    Ok(())
}

/// Opens every record in `buf` in place, as `branchgate::tls::open_into` does before it copies
/// the data out; returns the application data bytes.
pub fn open_records(receiver: &mut RecordLayer, buf: &mut [u8]) -> Result<usize, RecordError> {
    let (mut at, mut data) = (0, 0);
    while let Some(len) = receiver.record_len(&buf[at..])? {
        if let Opened::Data(range) = receiver.open(&mut buf[at..at + len])? {
            data += range.len();
        }
        at += len;
    }
    Ok(data)
}

/// One record sealed in place again and again, in a buffer with the room the router leaves
/// around a plaintext.
pub struct SealInPlace {
    buf: Vec<u8>,
    len: usize,
    control: [u8; CONTROL_RECORD_ROOM],
}

impl SealInPlace {
    /// Room for a record of `len` plaintext bytes under `records`.
    pub fn new(records: &RecordLayer, len: usize) -> Self {
        let room = records.seal_header_len() + len + records.seal_trailer_len();
        Self {
            buf: vec![0x5a; room],
            len,
            control: [0; CONTROL_RECORD_ROOM],
        }
    }

    /// Seals the buffer's plaintext (the last record's ciphertext, which is as good) into a
    /// record; returns it. A KeyUpdate goes out first (and is dropped) when one is due.
    pub fn seal(&mut self, records: &mut RecordLayer) -> Result<&[u8], RecordError> {
        if records.control_due() {
            records.seal_control(&mut self.control)?;
        }
        let len = records.seal(&mut self.buf, self.len)?;
        Ok(&self.buf[..len])
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;
    use crate::tls::{providers, KeyKind, SERVER_NAME};

    fn pki() -> Pki {
        Pki::generate(KeyKind::EcdsaP256).expect("certificates")
    }

    #[test]
    fn the_router_picks_aes_128_and_in_client_order_aes_256() {
        let pki = pki();
        let router = router_config(&pki).expect("router config");
        let client = client_config(providers().remove(0).provider, &pki).expect("client");
        for (server, want) in [
            (router.clone(), cipher_suite::TLS13_AES_128_GCM_SHA256),
            (
                in_client_order(&router),
                cipher_suite::TLS13_AES_256_GCM_SHA384,
            ),
        ] {
            let mut handshake = RouterHandshake::new(server, client.clone());
            for _ in 0..2 {
                let done = handshake.run().expect("handshake");
                assert_eq!(done.client.negotiated_cipher_suite(), Some(want));
                assert_eq!(done.handshake.sni.as_deref(), Some(SERVER_NAME));
                assert!(done.server_busy > Duration::ZERO);
            }
        }
    }

    #[test]
    fn sealed_records_reach_the_rustls_client() {
        let pki = pki();
        let router = router_config(&pki).expect("router config");
        let client = client_config(providers().remove(0).provider, &pki).expect("client");
        let mut done = RouterHandshake::new(router, client)
            .run()
            .expect("handshake");
        let mut seal = SealInPlace::new(&done.records, 64);
        let mut got = Vec::new();
        for _ in 0..3 {
            let mut record = seal.seal(&mut done.records).expect("seal");
            while !record.is_empty() {
                done.client.read_tls(&mut record).expect("client reads");
                done.client.process_new_packets().expect("client opens");
            }
            done.client
                .reader()
                .read_to_end(&mut got)
                .or_else(|e| match e.kind() {
                    std::io::ErrorKind::WouldBlock => Ok(0),
                    _ => Err(e),
                })
                .expect("plaintext");
        }
        assert_eq!(got.len(), 3 * 64);
    }

    #[test]
    fn the_client_record_layer_talks_to_the_server_one() {
        let pki = pki();
        for (label, suite) in TLS13_SUITES {
            let mut records = connected_records(&pki, suite).expect(label);
            let mut batch = Vec::new();
            for len in [64, branchgate::tls::MAX_PLAINTEXT] {
                let plain = vec![7u8; len];
                seal_records(&mut records.client, &plain, 5, &mut batch).expect("seal");
                let opened = open_records(&mut records.server, &mut batch).expect(label);
                assert_eq!(opened, 5 * len, "{label}");
            }
            // A client key update is derived from the swapped secrets: the server follows it.
            let mut control = [0u8; CONTROL_RECORD_ROOM];
            records.client.refresh_traffic_keys();
            let len = records
                .client
                .seal_control(&mut control)
                .expect("key update");
            assert_eq!(
                records.server.open(&mut control[..len]).expect(label),
                Opened::Nothing
            );
            seal_records(&mut records.client, b"after", 1, &mut batch).expect("seal");
            assert_eq!(
                open_records(&mut records.server, &mut batch).expect(label),
                5
            );
        }
    }
}
