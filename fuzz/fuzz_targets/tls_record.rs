//! TLS records after the handshake (tls/record.rs): `RecordLayer::record_len` and `open`, driven
//! through `tls::open_into` as a session reads, and `tls::seal_into` for what the router sends.
//!
//! The target plays the client: it knows the keys it gave the layer, so besides raw bytes it can
//! send records that decrypt, whose (inner) plaintext is whatever the fuzzer chose: content
//! types, padding, alerts, KeyUpdates. Each such record's outcome is checked against RFC 8446
//! section 5 (TLS 1.3) and RFC 5246 / 5288 / 7905 (TLS 1.2) with rustls's limits, up to the
//! first handshake message other than a whole KeyUpdate (the `tls_differential` target checks
//! everything against rustls itself).
//!
//! Input: a suite byte (low bits: the suite; bit 7: start near the end of the sequence space),
//! then operations until the input runs out:
//! - `0, len: u16, bytes`: raw bytes onto the wire.
//! - `1, type, len: u16, bytes`: a record of outer type `type` sealed under the current client
//!   key whose plaintext is `bytes` (in TLS 1.3 the inner plaintext: content, type, padding).
//! - `2, len: u16, bytes`: the router seals `bytes`; the client opens every record it wrote.
#![no_main]

use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, NONCE_LEN};
use aws_lc_rs::hkdf;
use branchgate::buf::{ReadBuf, POOL_BUFFER_BYTES};
use branchgate::tls::{self, RecordLayer, TrafficSecret, TrafficSecrets, MAX_PLAINTEXT};
use libfuzzer_sys::fuzz_target;
use rustls::crypto::aws_lc_rs::cipher_suite;
use rustls::crypto::cipher::{AeadKey, Iv};
use rustls::{ConnectionTrafficSecrets, ExtractedSecrets, ProtocolVersion, SupportedCipherSuite};

const HEADER_LEN: usize = 5;
const TAG_LEN: usize = 16;
const CONTENT_ALERT: u8 = 0x15;
const CONTENT_HANDSHAKE: u8 = 0x16;
const CONTENT_APPLICATION_DATA: u8 = 0x17;
const KEY_UPDATE: u8 = 24;

const CLIENT_KEY: [u8; 32] = [0x11; 32];
const CLIENT_IV: [u8; NONCE_LEN] = [0x22; NONCE_LEN];
const SERVER_KEY: [u8; 32] = [0x33; 32];
const SERVER_IV: [u8; NONCE_LEN] = [0x44; NONCE_LEN];
const CLIENT_SECRET: [u8; 48] = [0x55; 48];
const SERVER_SECRET: [u8; 48] = [0x66; 48];

/// A negotiated suite the layer supports. AES-128-GCM is left out: rustls offers no public way
/// to build a 16-byte `AeadKey`, and it shares every code path with AES-256-GCM.
#[derive(Clone, Copy)]
struct Suite {
    tls13: bool,
    rustls: SupportedCipherSuite,
    aead: &'static aead::Algorithm,
    /// TLS 1.3: the suite's hash, for key updates.
    hkdf: hkdf::Algorithm,
    hash_len: usize,
}

impl Suite {
    fn pick(byte: u8) -> Suite {
        let (tls13, rustls, aead, hkdf, hash_len) = match byte % 4 {
            0 => (
                true,
                cipher_suite::TLS13_AES_256_GCM_SHA384,
                &aead::AES_256_GCM,
                hkdf::HKDF_SHA384,
                48,
            ),
            1 => (
                true,
                cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
                &aead::CHACHA20_POLY1305,
                hkdf::HKDF_SHA256,
                32,
            ),
            2 => (
                false,
                cipher_suite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
                &aead::AES_256_GCM,
                hkdf::HKDF_SHA384,
                48,
            ),
            _ => (
                false,
                cipher_suite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
                &aead::CHACHA20_POLY1305,
                hkdf::HKDF_SHA256,
                32,
            ),
        };
        Suite {
            tls13,
            rustls,
            aead,
            hkdf,
            hash_len,
        }
    }

    /// TLS 1.2 AES-GCM sends the last 8 bytes of each nonce in the record.
    fn explicit_nonce(&self) -> usize {
        if !self.tls13 && *self.aead == aead::AES_256_GCM {
            8
        } else {
            0
        }
    }

    fn secrets(&self, key: [u8; 32], iv: [u8; NONCE_LEN]) -> ConnectionTrafficSecrets {
        let (key, iv) = (AeadKey::from(key), Iv::new(iv));
        if *self.aead == aead::AES_256_GCM {
            ConnectionTrafficSecrets::Aes256Gcm { key, iv }
        } else {
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv }
        }
    }
}

/// One direction as the client sees it: the key, nonce base, sequence number and (TLS 1.3)
/// traffic secret.
struct Direction {
    suite: Suite,
    key: LessSafeKey,
    iv: [u8; NONCE_LEN],
    seq: u64,
    secret: Vec<u8>,
}

impl Direction {
    fn new(suite: Suite, key: &[u8], iv: [u8; NONCE_LEN], seq: u64, secret: &[u8]) -> Self {
        let key = UnboundKey::new(suite.aead, key).expect("key length fits the AEAD");
        Direction {
            suite,
            key: LessSafeKey::new(key),
            iv,
            seq,
            secret: secret[..suite.hash_len].to_vec(),
        }
    }

    fn nonce(&self) -> [u8; NONCE_LEN] {
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        nonce
    }

    fn tls12_aad(&self, content_type: u8, len: usize) -> [u8; 13] {
        let mut aad = [0; 13];
        aad[..8].copy_from_slice(&self.seq.to_be_bytes());
        aad[8] = content_type;
        aad[9..11].copy_from_slice(&[3, 3]);
        aad[11..].copy_from_slice(&(len as u16).to_be_bytes());
        aad
    }

    /// A whole record: `plaintext` sealed under the current key with this outer type. `None`
    /// if it would not fit a record's 16-bit length.
    fn seal(&self, outer_type: u8, plaintext: &[u8]) -> Option<Vec<u8>> {
        let explicit = self.suite.explicit_nonce();
        let len = u16::try_from(explicit + plaintext.len() + TAG_LEN).ok()?;
        let mut record = vec![outer_type, 3, 3];
        record.extend_from_slice(&len.to_be_bytes());
        let mut nonce = self.nonce();
        if explicit > 0 {
            // As rustls does: the explicit part is the sequence-derived nonce's tail.
            record.extend_from_slice(&nonce[NONCE_LEN - explicit..]);
            nonce[..4].copy_from_slice(&self.iv[..4]);
        }
        let aad: Vec<u8> = if self.suite.tls13 {
            record[..HEADER_LEN].to_vec()
        } else {
            self.tls12_aad(outer_type, plaintext.len()).to_vec()
        };
        let mut body = plaintext.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad[..]),
                &mut body,
            )
            .expect("sealing cannot fail");
        record.extend_from_slice(&body);
        Some(record)
    }

    /// Opens one whole record: its content type and content.
    fn open(&self, record: &mut [u8]) -> (u8, Vec<u8>) {
        let (header, body) = record.split_at_mut(HEADER_LEN);
        let explicit = self.suite.explicit_nonce();
        let mut nonce = self.nonce();
        if explicit > 0 {
            nonce[..4].copy_from_slice(&self.iv[..4]);
            nonce[4..].copy_from_slice(&body[..explicit]);
        }
        let plain_len = body.len() - explicit - TAG_LEN;
        let aad: Vec<u8> = if self.suite.tls13 {
            header.to_vec()
        } else {
            self.tls12_aad(header[0], plain_len).to_vec()
        };
        let plain = self
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad[..]),
                &mut body[explicit..],
            )
            .expect("the router's record decrypts");
        if self.suite.tls13 {
            let at = plain.iter().rposition(|&b| b != 0).expect("content type");
            (plain[at], plain[..at].to_vec())
        } else {
            (header[0], plain.to_vec())
        }
    }

    /// RFC 8446 7.2: the next traffic secret, and its key and IV.
    fn update(&mut self) {
        let mut next = vec![0; self.suite.hash_len];
        self.expand_label(b"traffic upd", &mut next);
        self.secret = next;
        let mut key = vec![0; self.suite.aead.key_len()];
        self.expand_label(b"key", &mut key);
        let mut iv = [0; NONCE_LEN];
        self.expand_label(b"iv", &mut iv);
        *self = Direction::new(self.suite, &key, iv, 0, &self.secret);
    }

    /// HKDF-Expand-Label(secret, label, "", out.len()) (RFC 8446 7.1).
    fn expand_label(&self, label: &[u8], out: &mut [u8]) {
        struct Len(usize);
        impl hkdf::KeyType for Len {
            fn len(&self) -> usize {
                self.0
            }
        }
        let length = (out.len() as u16).to_be_bytes();
        let label_len = [(6 + label.len()) as u8];
        let info: [&[u8]; 5] = [&length, &label_len, b"tls13 ", label, &[0]];
        hkdf::Prk::new_less_safe(self.suite.hkdf, &self.secret)
            .expand(&info, Len(out.len()))
            .and_then(|okm| okm.fill(out))
            .expect("HKDF output fits");
    }
}

/// What the layer must make of a record that decrypts.
#[derive(Debug, PartialEq)]
enum Expected {
    Data(Vec<u8>),
    Closed,
    Nothing { key_update: bool },
    Error,
}

/// What the peer has sent so far that the rules below depend on (rustls's limits).
#[derive(Default)]
struct Peer {
    empty_in_a_row: u32,
    warnings: u32,
    key_updates: u32,
    /// A record the model does not decide (a handshake message other than a whole KeyUpdate)
    /// was opened: later outcomes depend on what it began.
    unmodelled: bool,
}

/// The rules rustls applies after the handshake (RFC 8446 section 5 / RFC 5246, and rustls's
/// limits) to a record of `outer_type` and `plaintext` sealed at sequence number `seq`: `None`
/// where the model does not decide (the differential target compares those with rustls).
fn expected(
    suite: Suite,
    peer: &mut Peer,
    outer_type: u8,
    plaintext: &[u8],
    seq: u64,
) -> Option<Expected> {
    // The deframer's limit; then only a record that decrypts is judged by its length.
    let ciphertext = suite.explicit_nonce() + plaintext.len() + TAG_LEN;
    if ciphertext >= MAX_PLAINTEXT + 2048 || seq == u64::MAX {
        return Some(Expected::Error);
    }
    let (content_type, content) = if suite.tls13 {
        // The target authenticates the header as sent, rustls the one a TLS 1.3 record has.
        if outer_type != CONTENT_APPLICATION_DATA || plaintext.len() > MAX_PLAINTEXT + 1 {
            return Some(Expected::Error);
        }
        match plaintext.iter().rposition(|&b| b != 0) {
            Some(at) if at <= MAX_PLAINTEXT && plaintext[at] != 0x14 => {
                (plaintext[at], &plaintext[..at])
            }
            _ => return Some(Expected::Error),
        }
    } else if plaintext.len() > MAX_PLAINTEXT || outer_type == 0x14 {
        // (change_cipher_spec is never decrypted: the target's sealed one is garbage.)
        return Some(Expected::Error);
    } else {
        (outer_type, plaintext)
    };
    if content.is_empty() {
        peer.empty_in_a_row += 1;
        if peer.empty_in_a_row > 32 {
            return Some(Expected::Error);
        }
    } else {
        peer.empty_in_a_row = 0;
    }
    Some(match (content_type, content) {
        (CONTENT_APPLICATION_DATA, data) => {
            peer.key_updates = 0;
            Expected::Data(data.to_vec())
        }
        (CONTENT_ALERT, &[1 | 2, 0]) => Expected::Closed,
        (CONTENT_ALERT, &[1, description]) => {
            peer.warnings += 1;
            if peer.warnings > 4 || (suite.tls13 && description != 90) {
                Expected::Error
            } else {
                Expected::Nothing { key_update: false }
            }
        }
        (CONTENT_HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, request]) if suite.tls13 => {
            peer.key_updates += 1;
            if request > 1 || peer.key_updates > 32 {
                Expected::Error
            } else {
                Expected::Nothing { key_update: true }
            }
        }
        (CONTENT_HANDSHAKE, _) => {
            peer.unmodelled = true;
            return None;
        }
        _ => Expected::Error,
    })
}

/// Takes `n` bytes, or what is left.
fn take<'a>(data: &mut &'a [u8], n: usize) -> &'a [u8] {
    let (head, tail) = data.split_at(n.min(data.len()));
    *data = tail;
    head
}

fn take_len(data: &mut &[u8]) -> Option<usize> {
    match *take(data, 2) {
        [hi, lo] => Some(usize::from(u16::from_be_bytes([hi, lo]))),
        _ => None,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&setup, mut data)) = data.split_first() else {
        return;
    };
    let suite = Suite::pick(setup);
    let seq = if setup & 0x80 != 0 { u64::MAX - 2 } else { 0 };
    let keys = ExtractedSecrets {
        tx: (0, suite.secrets(SERVER_KEY, SERVER_IV)),
        rx: (seq, suite.secrets(CLIENT_KEY, CLIENT_IV)),
    };
    let (version, traffic) = if suite.tls13 {
        let secret = |s: &[u8; 48]| TrafficSecret::new(&s[..suite.hash_len]).expect("hash length");
        let traffic = TrafficSecrets {
            client: secret(&CLIENT_SECRET),
            server: secret(&SERVER_SECRET),
        };
        (ProtocolVersion::TLSv1_3, Some(traffic))
    } else {
        (ProtocolVersion::TLSv1_2, None)
    };
    let mut layer =
        RecordLayer::new(keys, version, suite.rustls, traffic).expect("supported suite");
    let mut client_tx = Direction::new(suite, &CLIENT_KEY, CLIENT_IV, seq, &CLIENT_SECRET);
    let mut client_rx = Direction::new(suite, &SERVER_KEY, SERVER_IV, 0, &SERVER_SECRET);

    let mut cipher = ReadBuf::new(POOL_BUFFER_BYTES);
    let mut plain = ReadBuf::new(POOL_BUFFER_BYTES);
    let mut peer = Peer::default();
    while let Some((&op, rest)) = data.split_first() {
        data = rest;
        let aligned = cipher.is_empty();
        let (bytes, expect) = match op % 3 {
            0 => {
                let Some(len) = take_len(&mut data) else {
                    return;
                };
                (take(&mut data, len).to_vec(), None)
            }
            1 => {
                let Some(&outer_type) = take(&mut data, 1).first() else {
                    return;
                };
                let Some(len) = take_len(&mut data) else {
                    return;
                };
                let plaintext = take(&mut data, len);
                let Some(record) = client_tx.seal(outer_type, plaintext) else {
                    return;
                };
                let expect = match aligned && !peer.unmodelled {
                    true => expected(suite, &mut peer, outer_type, plaintext, client_tx.seq),
                    false => None,
                };
                (record, expect)
            }
            _ => {
                let Some(len) = take_len(&mut data) else {
                    return;
                };
                let plaintext = take(&mut data, len);
                let mut out = Vec::new();
                tls::seal_into(&mut layer, plaintext, &mut out).expect("sealing succeeds");
                // The client reads every record back: a KeyUpdate first if one was due, then
                // the data in records of at most 2^14 bytes.
                let mut records = &mut out[..];
                let mut received = Vec::new();
                while !records.is_empty() {
                    let len =
                        HEADER_LEN + usize::from(u16::from_be_bytes([records[3], records[4]]));
                    let (record, rest) = records.split_at_mut(len);
                    let (content_type, content) = client_rx.open(record);
                    client_rx.seq += 1;
                    match content_type {
                        CONTENT_APPLICATION_DATA => {
                            assert!(content.len() <= MAX_PLAINTEXT);
                            received.extend_from_slice(&content);
                        }
                        CONTENT_HANDSHAKE => {
                            assert!(suite.tls13 && received.is_empty());
                            assert_eq!(content, [KEY_UPDATE, 0, 0, 1, 0]);
                            client_rx.update();
                        }
                        // A TLS 1.2 renegotiation attempt is refused once, before the data.
                        CONTENT_ALERT => {
                            assert!(!suite.tls13 && received.is_empty());
                            assert_eq!(content, [1, 100]);
                        }
                        other => panic!("the router sealed content type {other}"),
                    }
                    records = rest;
                }
                assert_eq!(received, plaintext);
                continue;
            }
        };
        if cipher.spare_mut().len() < bytes.len() {
            return;
        }
        cipher.spare_mut()[..bytes.len()].copy_from_slice(&bytes);
        cipher.commit(bytes.len());

        let result = tls::open_into(&mut layer, &mut cipher, &mut plain);
        let Some(expect) = expect else {
            match result {
                Ok(true) => {
                    plain.clear();
                    continue;
                }
                Ok(false) | Err(_) => return,
            }
        };
        match (result, expect) {
            (Err(_), Expected::Error) => return,
            (Ok(false), Expected::Closed) => return,
            (Ok(true), Expected::Data(content)) => assert_eq!(plain.data(), content),
            (Ok(true), Expected::Nothing { key_update }) => {
                assert!(plain.is_empty());
                if key_update {
                    client_tx.update();
                    assert!(cipher.is_empty());
                    plain.clear();
                    continue;
                }
            }
            (result, expect) => panic!("record opened as {result:?}, expected {expect:?}"),
        }
        assert!(cipher.is_empty(), "a whole record was left unread");
        client_tx.seq += 1;
        plain.clear();
    }
});
