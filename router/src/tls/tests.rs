//! The handshake and the record layer against rustls's own client, in memory: every cipher
//! suite of TLS 1.3 and 1.2, data both ways, records split and coalesced, key updates in both
//! directions, close_notify, tampering, and the alerts of a refused handshake.

use std::io::{Read, Write};
use std::sync::Arc;

use rustls::crypto::aws_lc_rs::{cipher_suite, default_provider};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, RootCertStore, SupportedCipherSuite};

use super::*;
use crate::buf::ReadBuf;

struct Pki {
    _dir: tempfile::TempDir,
    config: Arc<ServerConfig>,
    roots: RootCertStore,
}

fn pki() -> Pki {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
    let cert = params.self_signed(&key).expect("certificate");
    let dir = tempfile::tempdir().expect("temp dir");
    let (cert_path, key_path) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
    std::fs::write(&cert_path, cert.pem()).expect("write cert");
    std::fs::write(&key_path, key.serialize_pem()).expect("write key");
    let config = server_config(&cert_path, &key_path).expect("server config");
    let mut roots = RootCertStore::empty();
    roots.add(cert.der().clone()).expect("root");
    Pki {
        _dir: dir,
        config,
        roots,
    }
}

fn client(pki: &Pki, suite: SupportedCipherSuite, alpn: &[&[u8]]) -> ClientConnection {
    let provider = rustls::crypto::CryptoProvider {
        cipher_suites: vec![suite],
        ..default_provider()
    };
    let mut config = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[suite.version()])
        .expect("versions")
        .with_root_certificates(pki.roots.clone())
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let name = ServerName::try_from("localhost").expect("name");
    ClientConnection::new(Arc::new(config), name).expect("client")
}

/// The server's side: our handshake, then our record layer, over in-memory buffers.
struct Server {
    raw: ReadBuf,
    early: ReadBuf,
    records: Option<RecordLayer>,
    handshake: Handshake,
}

impl Server {
    fn new() -> Server {
        Server {
            raw: ReadBuf::new(crate::buf::POOL_BUFFER_BYTES),
            early: ReadBuf::new(crate::buf::POOL_BUFFER_BYTES),
            records: None,
            handshake: Handshake::default(),
        }
    }

    fn feed(&mut self, bytes: &[u8]) {
        self.raw.spare_mut()[..bytes.len()].copy_from_slice(bytes);
        self.raw.commit(bytes.len());
    }

    fn records(&mut self) -> &mut RecordLayer {
        self.records.as_mut().expect("handshake done")
    }

    /// Opens what has arrived; returns the data and whether close_notify came.
    fn read(&mut self) -> (Vec<u8>, bool) {
        let mut plain = ReadBuf::new(crate::buf::POOL_BUFFER_BYTES);
        let records = self.records.as_mut().expect("handshake done");
        let open = open_into(records, &mut self.raw, &mut plain).expect("records open");
        (plain.data().to_vec(), !open)
    }

    fn write(&mut self, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        seal_into(self.records(), data, &mut out).expect("seal");
        out
    }
}

/// Flights between `client` and `server` until the handshake is done; `Err` with the bytes the
/// server sent last if it fails.
fn handshake(
    client: &mut ClientConnection,
    server: &mut Server,
    config: &Arc<ServerConfig>,
) -> Result<(), (TlsError, Vec<u8>)> {
    let mut hs = ServerHandshake::new(config.clone()).expect("server");
    let mut out = Vec::new();
    for _ in 0..16 {
        let mut wire = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut wire).expect("client writes");
        }
        server.feed(&wire);
        loop {
            let want = match hs.advance(&mut server.raw, &mut out, &mut server.early) {
                Ok(want) => want,
                Err(error) => return Err((error, out)),
            };
            let mut sent = &out[..];
            while !sent.is_empty() {
                client.read_tls(&mut sent).expect("client reads");
                client.process_new_packets().expect("client accepts");
            }
            out.clear();
            match want {
                Want::Write => continue,
                Want::Read => break,
                Want::Done => {
                    let (records, handshake) = hs.finish().expect("finish");
                    server.records = Some(records);
                    server.handshake = handshake;
                    return Ok(());
                }
            }
        }
    }
    panic!("handshake did not finish");
}

fn client_sends(client: &mut ClientConnection, data: &[u8]) -> Vec<u8> {
    client.writer().write_all(data).expect("client plaintext");
    let mut wire = Vec::new();
    while client.wants_write() {
        client.write_tls(&mut wire).expect("client writes");
    }
    wire
}

fn client_receives(client: &mut ClientConnection, mut wire: &[u8]) -> Vec<u8> {
    let mut data = Vec::new();
    while !wire.is_empty() {
        client.read_tls(&mut wire).expect("client reads");
        client
            .process_new_packets()
            .expect("client opens our records");
        match client.reader().read_to_end(&mut data) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("client read: {e}"),
        }
    }
    data
}

const SUITES: [SupportedCipherSuite; 6] = [
    cipher_suite::TLS13_AES_128_GCM_SHA256,
    cipher_suite::TLS13_AES_256_GCM_SHA384,
    cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    cipher_suite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
];

#[test]
fn every_suite_carries_data_both_ways() {
    let pki = pki();
    for suite in SUITES {
        let mut client = client(&pki, suite, &[ALPN_POSTGRESQL]);
        let mut server = Server::new();
        handshake(&mut client, &mut server, &pki.config)
            .unwrap_or_else(|(e, _)| panic!("{suite:?}: {e}"));
        assert!(server.handshake.alpn, "{suite:?}");
        assert_eq!(server.handshake.sni.as_deref(), Some("localhost"));

        // Small, empty-free, and larger than one record, in both directions.
        for size in [1, 100, MAX_PLAINTEXT, 3 * MAX_PLAINTEXT + 7] {
            let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            let wire = client_sends(&mut client, &data);
            let mut got = Vec::new();
            // Feed what fits in the read buffer, open the whole records, repeat.
            let mut rest = &wire[..];
            while !rest.is_empty() {
                let n = rest.len().min(server.raw.spare_mut().len());
                server.feed(&rest[..n]);
                rest = &rest[n..];
                got.extend(server.read().0);
            }
            assert_eq!(got, data, "{suite:?} client to server, {size} bytes");
            let wire = server.write(&data);
            assert_eq!(
                client_receives(&mut client, &wire),
                data,
                "{suite:?} server to client"
            );
        }

        client.send_close_notify();
        let mut wire = Vec::new();
        client.write_tls(&mut wire).expect("close_notify");
        server.feed(&wire);
        assert_eq!(server.read(), (Vec::new(), true), "{suite:?} close_notify");
    }
}

/// A client with rustls's defaults, TLS 1.2 and 1.3: it offers AES-256-GCM first.
fn default_client(pki: &Pki) -> ClientConnection {
    let mut config = ClientConfig::builder_with_provider(Arc::new(default_provider()))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(pki.roots.clone())
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    let name = ServerName::try_from("localhost").expect("name");
    ClientConnection::new(Arc::new(config), name).expect("client")
}

#[test]
fn server_order_picks_aes_128_gcm_over_the_clients_aes_256() {
    let pki = pki();
    assert_eq!(
        default_provider().cipher_suites[0],
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        "the client's first choice"
    );
    let mut client = default_client(&pki);
    let mut server = Server::new();
    handshake(&mut client, &mut server, &pki.config).unwrap_or_else(|(e, _)| panic!("{e}"));
    assert_eq!(
        client.negotiated_cipher_suite(),
        Some(cipher_suite::TLS13_AES_128_GCM_SHA256)
    );
    let wire = client_sends(&mut client, b"SELECT 1");
    server.feed(&wire);
    assert_eq!(server.read().0, b"SELECT 1");
}

#[test]
fn cipher_suites_are_in_server_order_and_all_kept() {
    use cipher_suite::*;
    let pki = pki();
    assert!(pki.config.ignore_client_order);
    let ours = &pki.config.crypto_provider().cipher_suites;
    assert_eq!(
        ours[..],
        [
            TLS13_AES_128_GCM_SHA256,
            TLS13_CHACHA20_POLY1305_SHA256,
            TLS13_AES_256_GCM_SHA384,
            TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
            TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
            TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        ]
    );
    let defaults = default_provider().cipher_suites;
    assert_eq!(ours.len(), defaults.len());
    assert!(
        defaults.iter().all(|suite| ours.contains(suite)),
        "none dropped"
    );
}

#[test]
fn tls12_clients_get_aes_128_gcm_too() {
    let pki = pki();
    let provider = rustls::crypto::CryptoProvider {
        cipher_suites: default_provider()
            .cipher_suites
            .into_iter()
            .filter(|suite| suite.version() == &rustls::version::TLS12)
            .collect(),
        ..default_provider()
    };
    let mut config = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS12])
        .expect("versions")
        .with_root_certificates(pki.roots.clone())
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    let name = ServerName::try_from("localhost").expect("name");
    let mut client = ClientConnection::new(Arc::new(config), name).expect("client");
    let mut server = Server::new();
    handshake(&mut client, &mut server, &pki.config).unwrap_or_else(|(e, _)| panic!("{e}"));
    assert_eq!(
        client.negotiated_cipher_suite(),
        Some(cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256)
    );
}

#[test]
fn key_updates_both_ways() {
    let pki = pki();
    for suite in &SUITES[..3] {
        let mut client = client(&pki, *suite, &[ALPN_POSTGRESQL]);
        let mut server = Server::new();
        handshake(&mut client, &mut server, &pki.config).expect("handshake");
        for round in 0..3 {
            // The client rekeys and asks us to do the same (update_requested).
            client.refresh_traffic_keys().expect("client key update");
            let wire = client_sends(&mut client, b"after the client's update");
            server.feed(&wire);
            assert_eq!(
                server.read().0,
                b"after the client's update",
                "round {round}"
            );
            assert!(
                server.records().key_update_due(),
                "the client asked for our update"
            );
            let wire = server.write(b"after ours");
            assert!(!server.records().key_update_due());
            assert_eq!(
                client_receives(&mut client, &wire),
                b"after ours",
                "round {round}"
            );
        }
    }
}

#[test]
fn sending_keys_are_renewed_before_the_confidentiality_limit() {
    let pki = pki();
    for suite in [SUITES[0], SUITES[3]] {
        let tls13 = suite.version() == &rustls::version::TLS13;
        let mut client = client(&pki, suite, &[ALPN_POSTGRESQL]);
        let mut server = Server::new();
        handshake(&mut client, &mut server, &pki.config).expect("handshake");
        // A few records short of the limit, counting the margin kept for a rekey.
        server.records().set_tx_limit(record::REKEY_MARGIN + 3);
        let mut sent = 0;
        for _ in 0..3 {
            let wire = server.write(b"x");
            assert_eq!(client_receives(&mut client, &wire), b"x");
            sent += 1;
        }
        if tls13 {
            // From here a KeyUpdate goes out first, and the limit applies to the new key.
            assert!(server.records().key_update_due());
            let wire = server.write(b"after the rekey");
            assert!(!server.records().key_update_due());
            assert_eq!(client_receives(&mut client, &wire), b"after the rekey");
        } else {
            // TLS 1.2 cannot rekey: the session ends at the limit.
            let mut out = Vec::new();
            let mut result = Ok(());
            while result.is_ok() && sent < record::REKEY_MARGIN + 4 {
                result = seal_into(server.records(), b"x", &mut out);
                sent += 1;
            }
            assert!(matches!(result, Err(RecordError::Exhausted)), "{result:?}");
        }
    }
}

#[test]
fn tampered_and_replayed_records_fail() {
    let pki = pki();
    let mut client = client(&pki, SUITES[0], &[ALPN_POSTGRESQL]);
    let mut server = Server::new();
    handshake(&mut client, &mut server, &pki.config).expect("handshake");
    let wire = client_sends(&mut client, b"hello");
    let mut bad = wire.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    let mut records = server.records.take().expect("records");
    assert!(matches!(
        records.open(&mut bad.clone()),
        Err(RecordError::Decrypt)
    ));
    let mut good = wire.clone();
    assert_eq!(records.open(&mut good).expect("opens"), Opened::Data(5..10));
    // The same record again has the wrong sequence number.
    assert!(matches!(
        records.open(&mut wire.clone()),
        Err(RecordError::Decrypt)
    ));
    // A record header claiming more than TLS allows.
    assert!(matches!(
        records.record_len(&[0x17, 3, 3, 0xff, 0xff]),
        Err(RecordError::Overflow)
    ));
    assert!(records
        .record_len(&[0x17, 3, 3, 0, 20, 1])
        .expect("header")
        .is_none());
}

#[test]
fn wrong_alpn_gets_the_no_application_protocol_alert() {
    let pki = pki();
    let mut client = client(&pki, SUITES[1], &[b"http/1.1"]);
    let mut server = Server::new();
    let (error, sent) = handshake(&mut client, &mut server, &pki.config).expect_err("refused");
    assert!(
        matches!(
            error,
            TlsError::Protocol(rustls::Error::NoApplicationProtocol)
        ),
        "{error}"
    );
    let mut sent = &sent[..];
    while !sent.is_empty() {
        client.read_tls(&mut sent).expect("client reads");
        if let Err(e) = client.process_new_packets() {
            assert_eq!(
                e,
                rustls::Error::AlertReceived(rustls::AlertDescription::NoApplicationProtocol)
            );
            return;
        }
    }
    panic!("no alert reached the client");
}

#[test]
fn garbage_instead_of_a_client_hello_fails_once() {
    let pki = pki();
    let mut hs = ServerHandshake::new(pki.config.clone()).expect("server");
    let mut raw = ReadBuf::new(1024);
    let garbage = [0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5];
    raw.spare_mut()[..garbage.len()].copy_from_slice(&garbage);
    raw.commit(garbage.len());
    let (mut out, mut early) = (Vec::new(), ReadBuf::new(1024));
    // One error, and at most an alert record for the client (rustls's debug assertions would
    // panic here if the bad input were processed twice).
    assert!(hs.advance(&mut raw, &mut out, &mut early).is_err());
    assert!(out.is_empty() || out[0] == 0x15, "{out:?}");
}

#[test]
fn data_sent_with_the_finished_is_kept() {
    let pki = pki();
    let mut client = client(&pki, SUITES[0], &[ALPN_POSTGRESQL]);
    client
        .writer()
        .write_all(b"early request")
        .expect("queued until the handshake ends");
    let mut server = Server::new();
    handshake(&mut client, &mut server, &pki.config).expect("handshake");
    // The client sent its data right behind its Finished; whatever rustls opened is in
    // `early`, the rest is still ciphertext.
    let mut got = server.early.data().to_vec();
    let mut wire = Vec::new();
    while client.wants_write() {
        client.write_tls(&mut wire).expect("client writes");
    }
    server.feed(&wire);
    got.extend(server.read().0);
    assert_eq!(got, b"early request");
}
