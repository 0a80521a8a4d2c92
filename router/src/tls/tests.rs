//! The handshake and the record layer against rustls's own client, in memory: every cipher
//! suite of TLS 1.3 and 1.2, data both ways, records split and coalesced, key updates in both
//! directions (in the client's first flight too), close_notify, tampering, the alerts of a
//! refused handshake, and each rule the record layer shares with rustls, with the alert the
//! client gets for breaking it. Records no rustls client would send are made with the
//! differential harness's client (`differential::client`), which seals anything with the
//! client's keys and opens what the server answers.

use std::io::{Read, Write};
use std::sync::Arc;

use rustls::crypto::aws_lc_rs::{cipher_suite, default_provider};
use rustls::pki_types::ServerName;
use rustls::{
    AlertDescription, ClientConfig, ClientConnection, KeyLog, RootCertStore, SupportedCipherSuite,
};

use super::differential::client::{Client, RecordSpec, Sealer};
use super::differential::{provider, servers::OurServer};
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

fn client_config(pki: &Pki, suite: SupportedCipherSuite, alpn: &[&[u8]]) -> ClientConfig {
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
    config
}

fn connect(config: ClientConfig) -> ClientConnection {
    let name = ServerName::try_from("localhost").expect("name");
    ClientConnection::new(Arc::new(config), name).expect("client")
}

fn client(pki: &Pki, suite: SupportedCipherSuite, alpn: &[&[u8]]) -> ClientConnection {
    connect(client_config(pki, suite, alpn))
}

/// The server's side: our handshake, then our record layer, over in-memory buffers.
struct Server {
    raw: ReadBuf,
    records: Option<RecordLayer>,
    handshake: Handshake,
}

impl Server {
    fn new() -> Server {
        Server {
            raw: ReadBuf::new(crate::buf::POOL_BUFFER_BYTES),
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

    /// Opens what has arrived: the data and whether close_notify came, or the failure.
    fn try_read(&mut self) -> Result<(Vec<u8>, bool), RecordError> {
        let mut plain = ReadBuf::new(crate::buf::POOL_BUFFER_BYTES);
        let records = self.records.as_mut().expect("handshake done");
        match open_into(records, &mut self.raw, &mut plain) {
            Ok(open) => Ok((plain.data().to_vec(), !open)),
            Err(TlsError::Record(error)) => Err(error),
            Err(error) => panic!("not a record error: {error}"),
        }
    }

    fn read(&mut self) -> (Vec<u8>, bool) {
        self.try_read().expect("records open")
    }

    fn write(&mut self, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        seal_into(self.records(), data, &mut out).expect("seal");
        out
    }

    /// What the server sends when it fails with `error`.
    fn alert_for(&mut self, error: &RecordError) -> Vec<u8> {
        let mut out = Vec::new();
        fatal_alert_into(self.records(), error, &mut out);
        out
    }
}

/// Flights between `client` and `server` until the handshake is done; `Err` with the bytes the
/// server sent last if it fails. `last_flight` runs once the client is in traffic state with
/// its Finished not yet written: what it queues goes in the same write as the Finished.
fn handshake_with(
    client: &mut ClientConnection,
    server: &mut Server,
    config: &Arc<ServerConfig>,
    mut last_flight: impl FnMut(&mut ClientConnection),
) -> Result<(), (TlsError, Vec<u8>)> {
    let mut hs = ServerHandshake::new(config.clone()).expect("server");
    let mut out = Vec::new();
    let mut ran = false;
    for _ in 0..16 {
        if !client.is_handshaking() && !ran {
            last_flight(client);
            ran = true;
        }
        let mut wire = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut wire).expect("client writes");
        }
        server.feed(&wire);
        loop {
            let want = match hs.advance(&mut server.raw, &mut out) {
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

fn handshake(
    client: &mut ClientConnection,
    server: &mut Server,
    config: &Arc<ServerConfig>,
) -> Result<(), (TlsError, Vec<u8>)> {
    handshake_with(client, server, config, |_| {})
}

fn client_flush(client: &mut ClientConnection) -> Vec<u8> {
    let mut wire = Vec::new();
    while client.wants_write() {
        client.write_tls(&mut wire).expect("client writes");
    }
    wire
}

fn client_sends(client: &mut ClientConnection, data: &[u8]) -> Vec<u8> {
    client.writer().write_all(data).expect("client plaintext");
    client_flush(client)
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

/// The alert a rustls client reports for what the server sent.
fn client_gets_alert(client: &mut ClientConnection, mut wire: &[u8]) -> AlertDescription {
    while !wire.is_empty() {
        client.read_tls(&mut wire).expect("client reads");
        if let Err(error) = client.process_new_packets() {
            match error {
                rustls::Error::AlertReceived(alert) => return alert,
                other => panic!("client failed otherwise: {other}"),
            }
        }
    }
    panic!("no alert reached the client");
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
        let wire = client_flush(&mut client);
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
    connect(config)
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
    let mut client = connect(config);
    let mut server = Server::new();
    handshake(&mut client, &mut server, &pki.config).unwrap_or_else(|(e, _)| panic!("{e}"));
    assert_eq!(
        client.negotiated_cipher_suite(),
        Some(cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256)
    );
}

/// One round of data each way, checking both ends read it.
fn exchange(client: &mut ClientConnection, server: &mut Server, round: usize) {
    let query = format!("query {round}");
    let wire = client_sends(client, query.as_bytes());
    server.feed(&wire);
    assert_eq!(server.read(), (query.into_bytes(), false), "round {round}");
    let answer = format!("answer {round}").repeat(round % 5 + 1);
    let wire = server.write(answer.as_bytes());
    assert_eq!(
        client_receives(client, &wire),
        answer.as_bytes(),
        "round {round}"
    );
}

/// The bug of issue 7: a client's KeyUpdate(update_requested) in the same write as its
/// Finished. rustls used to process it during the handshake, rotating its keys and dropping
/// the KeyUpdate it owed; the record layer then sent under keys the client could not open,
/// and later key updates came from the wrong generation.
#[test]
fn key_update_requested_with_the_finished_then_a_full_session() {
    let pki = pki();
    for suite in &SUITES[..3] {
        let mut client = client(&pki, *suite, &[ALPN_POSTGRESQL]);
        let mut server = Server::new();
        handshake_with(&mut client, &mut server, &pki.config, |client| {
            client.refresh_traffic_keys().expect("client key update");
        })
        .unwrap_or_else(|(e, _)| panic!("{suite:?}: {e}"));
        // The KeyUpdate waited for the record layer, which opens it and owes its own.
        assert_eq!(server.read(), (Vec::new(), false), "{suite:?}");
        assert!(server.records().control_due(), "{suite:?}: our KeyUpdate");
        for round in 0..4 {
            exchange(&mut client, &mut server, round);
        }
        // More key updates, each way, with data between.
        for round in 4..12 {
            client.refresh_traffic_keys().expect("client key update");
            exchange(&mut client, &mut server, round);
        }
        client.send_close_notify();
        let wire = client_flush(&mut client);
        server.feed(&wire);
        assert_eq!(server.read(), (Vec::new(), true), "{suite:?}");
    }
}

/// Data, a KeyUpdate, more data and close_notify, all behind the Finished in one write: the
/// handshake leaves them to the record layer, in order.
#[test]
fn finished_coalesced_with_data_key_update_and_close_notify() {
    let pki = pki();
    for suite in &SUITES[..3] {
        let mut client = client(&pki, *suite, &[ALPN_POSTGRESQL]);
        let mut server = Server::new();
        handshake_with(&mut client, &mut server, &pki.config, |client| {
            client.writer().write_all(b"before").expect("data");
            client.refresh_traffic_keys().expect("client key update");
            client.writer().write_all(b" after").expect("data");
            client.send_close_notify();
        })
        .unwrap_or_else(|(e, _)| panic!("{suite:?}: {e}"));
        assert!(
            !server.raw.is_empty(),
            "{suite:?}: records after the Finished stay for the record layer"
        );
        assert_eq!(server.read(), (b"before after".to_vec(), true), "{suite:?}");
        // And the server's answer reaches the client under the keys it expects.
        let wire = server.write(b"bye");
        assert_eq!(client_receives(&mut client, &wire), b"bye");
    }
}

/// A ClientHello in records of 64 bytes, fed one byte at a time: rustls keeps what it has of
/// the message between calls (processed in place in our buffer), and the handshake completes.
#[test]
fn client_hello_fragmented_over_many_records() {
    let pki = pki();
    for suite in [SUITES[0], SUITES[3]] {
        let mut config = client_config(&pki, suite, &[ALPN_POSTGRESQL]);
        config.max_fragment_size = Some(64);
        let mut client = connect(config);
        let mut hs = ServerHandshake::new(pki.config.clone()).expect("server");
        let mut raw = ReadBuf::new(crate::buf::POOL_BUFFER_BYTES);
        let mut out = Vec::new();
        let push = |raw: &mut ReadBuf, bytes: &[u8]| {
            raw.spare_mut()[..bytes.len()].copy_from_slice(bytes);
            raw.commit(bytes.len());
        };
        let hello = client_flush(&mut client);
        let mut records = 0;
        let mut rest = &hello[..];
        while let Some(len) = rest
            .get(3..5)
            .map(|l| usize::from(u16::from_be_bytes([l[0], l[1]])))
        {
            rest = &rest[5 + len..];
            records += 1;
        }
        assert!(records >= 3, "the ClientHello spans {records} records");
        let (last, head) = hello.split_last().expect("a ClientHello");
        for byte in head {
            push(&mut raw, std::slice::from_ref(byte));
            assert_eq!(hs.advance(&mut raw, &mut out).expect("advance"), Want::Read);
            assert!(
                out.is_empty(),
                "nothing to say before the whole ClientHello"
            );
        }
        push(&mut raw, std::slice::from_ref(last));
        loop {
            let want = hs.advance(&mut raw, &mut out).expect("advance");
            let mut sent = &out[..];
            while !sent.is_empty() {
                client.read_tls(&mut sent).expect("client reads");
                client.process_new_packets().expect("client accepts");
            }
            out.clear();
            match want {
                Want::Write => {}
                Want::Done => break,
                Want::Read => push(&mut raw, &client_flush(&mut client)),
            }
        }
        let (mut records, _) = hs.finish().expect("finish");
        push(
            &mut raw,
            &client_sends(&mut client, b"fragmented hello worked"),
        );
        let mut plain = ReadBuf::new(crate::buf::POOL_BUFFER_BYTES);
        assert!(open_into(&mut records, &mut raw, &mut plain).expect("opens"));
        assert_eq!(plain.data(), b"fragmented hello worked", "{suite:?}");
    }
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
                server.records().control_due(),
                "the client asked for our update"
            );
            let wire = server.write(b"after ours");
            assert!(!server.records().control_due());
            assert_eq!(
                client_receives(&mut client, &wire),
                b"after ours",
                "round {round}"
            );
        }
    }
}

/// An idle connection's expanded keys are shed and rebuilt from its key source on the next
/// record, in each direction, for every suite; after TLS 1.3 key updates too (the rebuilt key
/// is the current generation's).
#[test]
fn shed_keys_are_rebuilt_by_the_next_record() {
    let pki = pki();
    for suite in SUITES {
        let mut client = client(&pki, suite, &[ALPN_POSTGRESQL]);
        let mut server = Server::new();
        handshake(&mut client, &mut server, &pki.config).expect("handshake");
        exchange(&mut client, &mut server, 0);
        server.records().shed_keys();
        assert_eq!(server.records().keys_expanded(), (false, false));
        exchange(&mut client, &mut server, 1);
        assert_eq!(server.records().keys_expanded(), (true, true), "{suite:?}");
        if server.records().protocol_version() != rustls::ProtocolVersion::TLSv1_3 {
            continue;
        }
        for round in 2..5 {
            server.records().shed_keys();
            // The client's KeyUpdate comes under the shed key; ours goes out under the other.
            client.refresh_traffic_keys().expect("client key update");
            let wire = client_sends(&mut client, b"after the client's update");
            server.feed(&wire);
            assert_eq!(server.read().0, b"after the client's update");
            server.records().shed_keys();
            let wire = server.write(b"after ours");
            assert_eq!(client_receives(&mut client, &wire), b"after ours");
            server.records().shed_keys();
            exchange(&mut client, &mut server, round);
        }
    }
}

/// A connection's record layer and its key source stay in mimalloc's 160- and 112-byte
/// classes (an idle connection holds both, and no expanded key).
#[test]
fn record_layer_sizes() {
    assert!(std::mem::size_of::<RecordLayer>() <= 160);
    assert!(std::mem::size_of::<super::keys::KeySource>() <= 112);
}

/// rustls allows 32 KeyUpdates without application data between them; the 33rd ends the
/// connection, without an alert (rustls sends none for it). Data resets the count, and the
/// server answers a run of requests with one KeyUpdate.
#[test]
fn many_key_updates_in_a_row_up_to_rustls_bound() {
    let pki = pki();
    for suite in &SUITES[..3] {
        let mut client = client(&pki, *suite, &[ALPN_POSTGRESQL]);
        let mut server = Server::new();
        handshake(&mut client, &mut server, &pki.config).expect("handshake");
        for round in 0..3 {
            for _ in 0..32 {
                client.refresh_traffic_keys().expect("client key update");
            }
            let wire = client_sends(&mut client, format!("round {round}").as_bytes());
            server.feed(&wire);
            assert_eq!(server.read().0, format!("round {round}").as_bytes());
            // One KeyUpdate answers them all, then the data.
            let wire = server.write(b"ok");
            assert_eq!(client_receives(&mut client, &wire), b"ok");
        }
        // The server rekeys many times in a row too: at its key's limit each time.
        server.records().set_tx_limit(2);
        for round in 0..40 {
            let wire = server.write(format!("{round}").as_bytes());
            assert_eq!(
                client_receives(&mut client, &wire),
                format!("{round}").as_bytes()
            );
            // The server's KeyUpdates ask for the client's: it answers with data.
            let wire = client_sends(&mut client, b".");
            server.feed(&wire);
            assert_eq!(server.read().0, b".");
        }
        for _ in 0..33 {
            client.refresh_traffic_keys().expect("client key update");
        }
        let wire = client_flush(&mut client);
        server.feed(&wire);
        let error = server.try_read().expect_err("the 33rd KeyUpdate");
        assert_eq!(error, RecordError::TooManyKeyUpdates);
        assert!(server.alert_for(&error).is_empty(), "rustls sends no alert");
    }
}

#[test]
fn tls13_keys_are_renewed_at_the_confidentiality_limit_as_rustls_does() {
    let pki = pki();
    let mut client = client(&pki, SUITES[0], &[ALPN_POSTGRESQL]);
    let mut server = Server::new();
    handshake(&mut client, &mut server, &pki.config).expect("handshake");
    server.records().set_tx_limit(4);
    for round in 0..3 {
        let wire = server.write(b"x");
        assert_eq!(client_receives(&mut client, &wire), b"x", "round {round}");
    }
    // The next data record would take the key's last sequence number: a KeyUpdate takes it,
    // asking the client to update too (as rustls does), and the data goes under the next key.
    assert!(server.records().control_due());
    let wire = server.write(b"after the rekey");
    assert_eq!(server.records().sequence_numbers().1, 1);
    assert_eq!(client_receives(&mut client, &wire), b"after the rekey");
    // The client answers the request ahead of its next data.
    let wire = client_sends(&mut client, b"next");
    server.feed(&wire);
    assert_eq!(server.read(), (b"next".to_vec(), false));
}

/// TLS 1.2 cannot rekey: data stops two records short of the limit, so a FATAL ErrorResponse
/// and a close_notify still go out under the key, which the client reads. At the limit the
/// failure sends close_notify, as rustls does at its own.
#[test]
fn tls12_aes_gcm_keeps_room_for_a_fatal_and_close_notify_at_the_limit() {
    let pki = pki();
    for suite in [SUITES[3], SUITES[4]] {
        let mut client = client(&pki, suite, &[ALPN_POSTGRESQL]);
        let mut server = Server::new();
        handshake(&mut client, &mut server, &pki.config).expect("handshake");
        let limit = server.records().sequence_numbers().1 + 5;
        server.records().set_tx_limit(limit);
        for _ in 0..3 {
            let wire = server.write(b"x");
            assert_eq!(client_receives(&mut client, &wire), b"x");
        }
        let mut out = Vec::new();
        let error = seal_into(server.records(), b"one too many", &mut out).expect_err("margin");
        assert_eq!(error, RecordError::Exhausted);
        assert!(out.is_empty(), "nothing half sealed");
        seal_final_into(server.records(), b"FATAL", &mut out).expect("the last data fits");
        close_notify_into(server.records(), &mut out).expect("close_notify fits");
        assert_eq!(server.records().sequence_numbers().1, limit);
        assert_eq!(client_receives(&mut client, &out), b"FATAL");
        assert!(
            client
                .process_new_packets()
                .expect("state")
                .peer_has_closed(),
            "{suite:?}"
        );
        // At the limit, the failure is rustls's close_notify (once).
        let mut client = self::client(&pki, suite, &[ALPN_POSTGRESQL]);
        let mut server = Server::new();
        handshake(&mut client, &mut server, &pki.config).expect("handshake");
        let limit = server.records().sequence_numbers().1 + 2;
        server.records().set_tx_limit(limit);
        let error = seal_into(server.records(), b"x", &mut Vec::new()).expect_err("at the limit");
        let wire = server.alert_for(&error);
        assert!(client_receives(&mut client, &wire).is_empty());
        assert!(client
            .process_new_packets()
            .expect("state")
            .peer_has_closed());
    }
}

#[test]
fn tampered_and_replayed_records_fail_with_bad_record_mac() {
    let pki = pki();
    for suite in [SUITES[0], SUITES[3], SUITES[5]] {
        let mut client = client(&pki, suite, &[ALPN_POSTGRESQL]);
        let mut server = Server::new();
        handshake(&mut client, &mut server, &pki.config).expect("handshake");
        let wire = client_sends(&mut client, b"hello");
        let mut bad = wire.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        let records = server.records();
        assert_eq!(records.open(&mut bad.clone()), Err(RecordError::Decrypt));
        let mut good = wire.clone();
        assert!(matches!(records.open(&mut good), Ok(Opened::Data(_))));
        // The same record again has the wrong sequence number.
        let error = records.open(&mut wire.clone()).expect_err("replayed");
        assert_eq!(error, RecordError::Decrypt);
        let alert = server.alert_for(&error);
        assert_eq!(
            client_gets_alert(&mut client, &alert),
            AlertDescription::BadRecordMac,
            "{suite:?}"
        );
    }
}

#[test]
fn record_headers_are_checked_as_rustls_does() {
    let pki = pki();
    let mut client = client(&pki, SUITES[0], &[ALPN_POSTGRESQL]);
    let mut server = Server::new();
    handshake(&mut client, &mut server, &pki.config).expect("handshake");
    let records = server.records();
    // Content types rustls knows, any 3.x version, at most 2^14 + 2047 bytes announced: a
    // TLS 1.3 record longer than 2^14 + 256 is refused only once it is known to decrypt.
    assert_eq!(records.record_len(&[0x17, 3, 3, 0x47, 0xff]), Ok(None));
    assert_eq!(records.record_len(&[0x17, 3, 1, 0, 1, 0]), Ok(Some(6)));
    for (header, why) in [
        ([0x17, 3, 3, 0x48, 0x00], "record too long"),
        ([0x19, 3, 3, 0, 20], "unknown content type"),
        ([0x17, 2, 3, 0, 20], "unknown protocol version"),
        ([0x15, 3, 3, 0, 0], "empty record"),
    ] {
        let error = records.record_len(&header).expect_err(why);
        assert_eq!(error, RecordError::BadHeader(why));
        assert_eq!(error.alert(), Some(AlertDescription::DecodeError));
    }
    // Each field is checked as soon as it has arrived, as rustls does: a bad content type at
    // the first byte, a bad version at the third.
    for (partial, why) in [
        (&[0x00][..], "unknown content type"),
        (&[0x17, 0x09, 0x03][..], "unknown protocol version"),
    ] {
        assert_eq!(
            records.record_len(partial),
            Err(RecordError::BadHeader(why))
        );
    }
    assert_eq!(records.record_len(&[0x17, 0x03]), Ok(None));
    let alert = server.alert_for(&RecordError::BadHeader("record too long"));
    assert_eq!(
        client_gets_alert(&mut client, &alert),
        AlertDescription::DecodeError
    );
}

/// TLS 1.2 authenticates the header's version: a record re-labelled 0x0301 is refused as
/// rustls refuses it (bad_record_mac), one labelled 0x0201 before that (decode_error).
#[test]
fn tls12_header_version_is_checked() {
    let pki = pki();
    for suite in [SUITES[3], SUITES[5]] {
        for (version, alert) in [
            ([3, 1], AlertDescription::BadRecordMac),
            ([2, 1], AlertDescription::DecodeError),
        ] {
            let mut client = client(&pki, suite, &[ALPN_POSTGRESQL]);
            let mut server = Server::new();
            handshake(&mut client, &mut server, &pki.config).expect("handshake");
            let mut wire = client_sends(&mut client, b"SELECT 1");
            wire[1..3].copy_from_slice(&version);
            server.feed(&wire);
            let error = server.try_read().expect_err("relabelled record");
            let sent = server.alert_for(&error);
            assert_eq!(client_gets_alert(&mut client, &sent), alert, "{suite:?}");
        }
    }
}

/// A connection whose client is the differential harness's sealer, for records rustls's
/// client would never send; the server is the router's.
struct Crafted {
    server: OurServer,
    sealer: Sealer,
}

impl Crafted {
    fn new(suite: usize) -> Crafted {
        Crafted::with_after_hello(suite, &[])
    }

    /// A connection whose client sends `extra` right after its ClientHello.
    fn with_after_hello(suite: usize, extra: &[u8]) -> Crafted {
        provider::reset_randomness(7);
        let (_, config) = provider::server_configs();
        let mut server = OurServer::new(config).expect("server");
        let mut client = Client::new(provider::SUITES[suite]).expect("client");
        let mut flight = client.advance(&[]).expect("hello");
        flight.extend_from_slice(extra);
        loop {
            server.feed(&flight);
            let answer = server.take_sent();
            flight = client.advance(&answer).expect("client");
            if client.done() {
                server.feed(&flight);
                let answer = server.take_sent();
                let mut sealer = client.into_sealer().expect("keys");
                assert!(sealer.open(&answer).expect("opens").is_empty());
                return Crafted { server, sealer };
            }
        }
    }

    fn send(&mut self, spec: RecordSpec, content: &[u8]) {
        let record = self.sealer.seal(&spec, content).expect("encodable");
        self.server.feed(&record);
    }

    fn send_data(&mut self, data: &[u8]) {
        self.send(RecordSpec::plain(0x17), data);
    }

    /// The failure, and the alert the client opens from what the server sent.
    fn failure(&mut self) -> (RecordError, Option<(u8, u8)>) {
        let error = match self.server.observed.failure.take() {
            Some(super::differential::servers::Failure::Record(error)) => error,
            other => panic!("expected a record failure, got {other:?}"),
        };
        let sent = std::mem::take(&mut self.server.observed.sent);
        let opened = self.sealer.open(&sent).expect("the client opens the alert");
        let alert = opened
            .iter()
            .find(|(content_type, _)| *content_type == 0x15)
            .map(|(_, alert)| (alert[0], alert[1]));
        (error, alert)
    }

    fn expect_alert(&mut self, description: AlertDescription, what: &str) {
        let (error, alert) = self.failure();
        assert_eq!(alert, Some((2, u8::from(description))), "{what}: {error:?}");
    }

    fn expect_silent(&mut self, expected: RecordError) {
        let (error, alert) = self.failure();
        assert_eq!(error, expected);
        assert_eq!(alert, None, "rustls sends no alert for {expected:?}");
    }
}

/// An inner plaintext longer than 2^14 + 1 bytes (content, type and padding) is record_overflow,
/// even when its content fits.
#[test]
fn tls13_inner_plaintext_over_the_limit_with_padding_is_record_overflow() {
    for suite in 0..3 {
        let mut conn = Crafted::new(suite);
        // 2^14 of content, its type and one byte of padding: one byte too many.
        let spec = RecordSpec {
            pad: 1,
            ..RecordSpec::plain(0x17)
        };
        conn.send(spec, &vec![b'x'; MAX_PLAINTEXT]);
        conn.expect_alert(AlertDescription::RecordOverflow, "padded past 2^14 + 1");
        // Exactly at the limit is fine.
        let mut conn = Crafted::new(suite);
        conn.send(RecordSpec::plain(0x17), &vec![b'x'; MAX_PLAINTEXT]);
        assert_eq!(conn.server.observed.plaintext.len(), MAX_PLAINTEXT);
        assert!(conn.server.observed.failure.is_none());
    }
}

#[test]
fn errors_send_their_alert() {
    for suite in 0..6 {
        let tls13 = suite < 3;
        // bad_record_mac: a record sealed at the wrong sequence number.
        let mut conn = Crafted::new(suite);
        conn.sealer.skip(1);
        conn.send_data(b"from the future");
        conn.expect_alert(AlertDescription::BadRecordMac, "sequence gap");
        // record_overflow: 2^14 + 1 bytes of data.
        let mut conn = Crafted::new(suite);
        conn.send_data(&vec![0; MAX_PLAINTEXT + 1]);
        conn.expect_alert(AlertDescription::RecordOverflow, "data over 2^14");
        // unexpected_message: change_cipher_spec after the handshake, plaintext as it should be.
        let mut conn = Crafted::new(suite);
        conn.server.feed(&[0x14, 3, 3, 0, 1, 1]);
        conn.expect_alert(AlertDescription::UnexpectedMessage, "change_cipher_spec");
        // unexpected_message: a handshake message after the handshake (Finished).
        let mut conn = Crafted::new(suite);
        conn.send(RecordSpec::plain(0x16), &[20, 0, 0, 2, 1, 2]);
        conn.expect_alert(AlertDescription::UnexpectedMessage, "Finished");
        // decode_error: an alert of three bytes, a content type rustls does not know.
        let mut conn = Crafted::new(suite);
        conn.send(RecordSpec::plain(0x15), &[1, 0, 0]);
        conn.expect_alert(AlertDescription::DecodeError, "long alert");
        let mut conn = Crafted::new(suite);
        conn.send(RecordSpec::plain(0x18), b"heartbeat");
        conn.expect_alert(AlertDescription::DecodeError, "heartbeat");
        // illegal_parameter: an alert level that is neither warning nor fatal.
        let mut conn = Crafted::new(suite);
        conn.send(RecordSpec::plain(0x15), &[3, 0]);
        conn.expect_alert(AlertDescription::IllegalParameter, "alert level 3");
        if tls13 {
            // unexpected_message: change_cipher_spec inside an encrypted record.
            let mut conn = Crafted::new(suite);
            let spec = RecordSpec {
                outer: 0x17,
                ..RecordSpec::plain(0x14)
            };
            conn.send(spec, &[1]);
            conn.expect_alert(AlertDescription::UnexpectedMessage, "encrypted CCS");
            // illegal_parameter: a KeyUpdate asking for neither.
            let mut conn = Crafted::new(suite);
            conn.send(RecordSpec::plain(0x16), &[24, 0, 0, 1, 2]);
            conn.expect_alert(AlertDescription::IllegalParameter, "KeyUpdate request 2");
            // decode_error: a KeyUpdate of two bytes.
            let mut conn = Crafted::new(suite);
            conn.send(RecordSpec::plain(0x16), &[24, 0, 0, 2, 1, 0]);
            conn.expect_alert(AlertDescription::DecodeError, "KeyUpdate of two bytes");
            // unexpected_message: a KeyUpdate with the start of another message behind it.
            let mut conn = Crafted::new(suite);
            conn.send(RecordSpec::plain(0x16), &[24, 0, 0, 1, 0, 24]);
            conn.expect_alert(AlertDescription::UnexpectedMessage, "KeyUpdate not last");
            // no content type: zeros only. rustls sends nothing.
            let mut conn = Crafted::new(suite);
            let spec = RecordSpec {
                inner: None,
                pad: 5,
                ..RecordSpec::plain(0x17)
            };
            conn.send(spec, &[]);
            conn.expect_silent(RecordError::NoContentType);
        }
    }
}

/// A KeyUpdate the client asked for goes out ahead of the alert, as rustls queues it, and the
/// alert under the next key.
#[test]
fn the_key_update_owed_goes_out_before_the_alert() {
    for suite in 0..3 {
        let mut conn = Crafted::new(suite);
        conn.send(RecordSpec::plain(0x16), &[24, 0, 0, 1, 1]);
        conn.sealer.skip(1);
        conn.send_data(b"from the future");
        let error = match conn.server.observed.failure.take() {
            Some(super::differential::servers::Failure::Record(error)) => error,
            other => panic!("{other:?}"),
        };
        assert_eq!(error, RecordError::Decrypt);
        let sent = std::mem::take(&mut conn.server.observed.sent);
        let opened = conn.sealer.open(&sent).expect("both open");
        assert_eq!(
            opened,
            [(0x16, vec![24, 0, 0, 1, 0]), (0x15, vec![2, 20])],
            "KeyUpdate, then bad_record_mac under the next key"
        );
    }
}

/// A KeyUpdate split across two records, or its records' outer type anything the deframer
/// takes (rustls authenticates the header every TLS 1.3 record should have): accepted.
#[test]
fn tls13_key_update_split_across_records_is_accepted() {
    for suite in 0..3 {
        let mut conn = Crafted::new(suite);
        conn.send(RecordSpec::plain(0x16), &[24, 0]);
        conn.send(RecordSpec::plain(0x16), &[0, 1]);
        let spec = RecordSpec {
            outer: 0x15,
            version: 0x0301,
            ..RecordSpec::plain(0x16)
        };
        conn.send(spec, &[1]);
        conn.send_data(b"under the next key");
        assert!(
            conn.server.observed.failure.is_none(),
            "{:?}",
            conn.server.observed.failure
        );
        assert_eq!(conn.server.observed.plaintext, b"under the next key");
        // Data between the fragments is refused, silently.
        let mut conn = Crafted::new(suite);
        conn.send(RecordSpec::plain(0x16), &[24, 0, 0]);
        conn.send_data(b"between");
        conn.expect_silent(RecordError::Interleaved);
    }
}

/// After close_notify nothing is opened, not even garbage: the stream has ended.
#[test]
fn records_after_close_notify_are_not_opened() {
    for suite in 0..6 {
        let mut conn = Crafted::new(suite);
        conn.send_data(b"last words");
        conn.send(RecordSpec::plain(0x15), &[1, 0]);
        conn.send_data(b"not read");
        conn.server.feed(b"\xff\xff\xff garbage");
        let observed = &conn.server.observed;
        assert!(observed.closed);
        assert!(observed.failure.is_none(), "{:?}", observed.failure);
        assert_eq!(observed.plaintext, b"last words");
    }
}

/// rustls's limits: 32 empty records in a row, 4 warning alerts per connection (in TLS 1.3
/// only user_canceled may be a warning).
#[test]
fn empty_records_and_warnings_within_rustls_limits() {
    for suite in 0..6 {
        let tls13 = suite < 3;
        let mut conn = Crafted::new(suite);
        for _ in 0..32 {
            conn.send_data(&[]);
        }
        conn.send_data(b"!");
        for _ in 0..33 {
            conn.send_data(&[]);
        }
        conn.expect_silent(RecordError::TooManyEmptyRecords);

        let warning = if tls13 { 90 } else { 42 };
        let mut conn = Crafted::new(suite);
        for _ in 0..4 {
            conn.send(RecordSpec::plain(0x15), &[1, warning]);
            conn.send_data(b"!");
        }
        assert!(conn.server.observed.failure.is_none());
        conn.send(RecordSpec::plain(0x15), &[1, warning]);
        conn.expect_silent(RecordError::TooManyWarnings);

        if tls13 {
            let mut conn = Crafted::new(suite);
            conn.send(RecordSpec::plain(0x15), &[1, 42]);
            conn.expect_alert(AlertDescription::DecodeError, "TLS 1.3 warning");
        } else {
            // A fatal alert ends the connection without an answer.
            let mut conn = Crafted::new(suite);
            conn.send(RecordSpec::plain(0x15), &[2, 42]);
            conn.expect_silent(RecordError::Alert(42));
        }
    }
}

/// A TLS 1.2 ClientHello after the handshake (renegotiation) is answered with the warning
/// no_renegotiation, at once, and the connection goes on; a second one ends it without an
/// alert, as in rustls.
#[test]
fn tls12_renegotiation_is_refused_with_a_warning_once() {
    let mut hello = vec![1, 0, 0, 41, 3, 3];
    hello.extend(0..32);
    hello.extend([0, 0, 2, 0xc0, 0x2b, 1, 0]);
    for suite in 3..6 {
        let mut conn = Crafted::new(suite);
        conn.send(RecordSpec::plain(0x16), &hello);
        // The harness's server sends what is owed as soon as it has read it, as the relay does.
        let sent = std::mem::take(&mut conn.server.observed.sent);
        let opened = conn.sealer.open(&sent).expect("the client opens it");
        assert_eq!(opened, [(0x15, vec![1, 100])], "warning no_renegotiation");
        conn.send_data(b"still here");
        assert!(conn.server.observed.failure.is_none());
        assert_eq!(conn.server.observed.plaintext, b"still here");
        let records = conn.server.records_mut().expect("connected");
        let mut out = Vec::new();
        seal_into(records, b"answer", &mut out).expect("seal");
        let opened = conn.sealer.open(&out).expect("the client opens it");
        assert_eq!(opened, [(0x17, b"answer".to_vec())]);
        conn.send(RecordSpec::plain(0x16), &hello);
        conn.expect_silent(RecordError::TooManyRenegotiations);
    }
}

/// rustls counts warning alerts per connection, those of the handshake too: a warning the
/// client sent in plaintext during the handshake leaves three for after it.
#[test]
fn warnings_during_the_handshake_count_against_the_limit() {
    for suite in [0, 3] {
        let warning = if suite < 3 { 90 } else { 42 };
        let mut conn = Crafted::with_after_hello(suite, &[0x15, 3, 3, 0, 2, 1, warning]);
        for _ in 0..3 {
            conn.send(RecordSpec::plain(0x15), &[1, warning]);
        }
        assert!(conn.server.observed.failure.is_none());
        conn.send(RecordSpec::plain(0x15), &[1, warning]);
        conn.expect_silent(RecordError::TooManyWarnings);
    }
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
    assert_eq!(
        client_gets_alert(&mut client, &sent),
        AlertDescription::NoApplicationProtocol
    );
}

#[test]
fn garbage_instead_of_a_client_hello_fails_once() {
    let pki = pki();
    let mut hs = ServerHandshake::new(pki.config.clone()).expect("server");
    let mut raw = ReadBuf::new(1024);
    let garbage = [0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5];
    raw.spare_mut()[..garbage.len()].copy_from_slice(&garbage);
    raw.commit(garbage.len());
    let mut out = Vec::new();
    // One error, and at most an alert record for the client (rustls's debug assertions would
    // panic here if the bad input were processed twice).
    assert!(hs.advance(&mut raw, &mut out).is_err());
    assert!(out.is_empty() || out[0] == 0x15, "{out:?}");
    // A first byte that is no content type fails at once, as in rustls, without waiting for a
    // whole header.
    let mut hs = ServerHandshake::new(pki.config.clone()).expect("server");
    let mut raw = ReadBuf::new(1024);
    raw.spare_mut()[0] = 0x47;
    raw.commit(1);
    let error = hs.advance(&mut raw, &mut Vec::new()).expect_err("not TLS");
    assert!(
        matches!(
            error,
            TlsError::Protocol(rustls::Error::InvalidMessage(
                rustls::InvalidMessage::InvalidContentType
            ))
        ),
        "{error}"
    );
}

/// The handshake's secrets must derive the keys rustls hands over: a key log noting other
/// secrets (as if rustls had moved on to the next keys) is refused with internal_error,
/// sealed under the key the client expects.
#[test]
fn keys_out_of_step_with_the_noted_secrets_are_refused() {
    #[derive(Debug)]
    struct Misnote;
    impl KeyLog for Misnote {
        fn will_log(&self, _label: &str) -> bool {
            true
        }
        fn log(&self, label: &str, client_random: &[u8], secret: &[u8]) {
            // The right server secret, a wrong client one.
            let mut wrong = secret.to_vec();
            if label == "CLIENT_TRAFFIC_SECRET_0" {
                wrong[0] ^= 1;
            }
            NoteTrafficSecrets.log(label, client_random, &wrong);
        }
    }
    let pki = pki();
    let mut config = (*pki.config).clone();
    config.key_log = Arc::new(Misnote);
    let config = Arc::new(config);
    let mut client = client(&pki, SUITES[0], &[ALPN_POSTGRESQL]);
    let mut server = Server::new();
    let (error, sent) = handshake(&mut client, &mut server, &config).expect_err("refused");
    assert!(matches!(error, TlsError::KeysOutOfStep(_)), "{error}");
    assert_eq!(
        client_gets_alert(&mut client, &sent),
        AlertDescription::InternalError
    );
}

/// The secrets a session holds are wiped when it ends.
#[test]
fn traffic_secrets_are_zeroed_when_dropped() {
    let mut secret = std::mem::ManuallyDrop::new(TrafficSecret::new(&[0xa5; 48]).expect("48"));
    // SAFETY: dropped once here; afterwards only its bytes are read, through a raw pointer to
    // memory the ManuallyDrop still owns (plain bytes and an integer, valid whatever they hold).
    let bytes = unsafe {
        std::mem::ManuallyDrop::drop(&mut secret);
        let ptr = (&*secret as *const TrafficSecret).cast::<u8>();
        std::slice::from_raw_parts(ptr, std::mem::size_of::<TrafficSecret>()).to_vec()
    };
    assert!(!bytes.windows(4).any(|w| w == [0xa5; 4]), "{bytes:?}");
}
