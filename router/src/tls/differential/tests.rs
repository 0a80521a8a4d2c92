//! The differential harness as a deterministic test: the committed fuzz seeds, and scenarios
//! written by hand for each rule of the record layer.

use super::client::RecordSpec;
use super::*;

/// Every seed of the `tls_differential` fuzz target.
#[test]
fn committed_seeds_behave_as_rustls() {
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../fuzz/seeds/tls_differential"
    );
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .map(|entry| entry.expect("seed entry").path())
        .collect();
    entries.sort();
    assert!(!entries.is_empty(), "no seeds in {dir}");
    for path in entries {
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let scenario = Scenario::decode(&data).expect("a setup byte");
        match check(&scenario) {
            Ok(outcome) => eprintln!("{}: {outcome:?}", path.display()),
            Err(mismatch) => panic!("{}: {mismatch}", path.display()),
        }
    }
}

fn same(suite: usize, with_finished: bool, ops: Vec<Op>) {
    let scenario = Scenario {
        suite,
        with_finished,
        ops,
    };
    match check(&scenario) {
        Ok(Outcome {
            verdict: Verdict::Same,
            ..
        }) => {}
        other => panic!("{other:?}\n{scenario:?}"),
    }
}

#[test]
fn data_key_updates_and_close_in_every_suite() {
    for suite in 0..provider::SUITES.len() {
        for with_finished in [false, true] {
            same(
                suite,
                with_finished,
                vec![
                    Op::Data { len: 10, fill: 1 },
                    Op::KeyUpdate(1),
                    Op::Data { len: 0, fill: 0 },
                    Op::Deliver,
                    Op::ServerData(100),
                    Op::KeyUpdate(0),
                    Op::KeyUpdate(1),
                    Op::Data {
                        len: 20000,
                        fill: 7,
                    },
                    Op::Deliver,
                    Op::ServerData(20000),
                    Op::Alert(1, 0),
                    Op::Data { len: 5, fill: 3 },
                ],
            );
        }
    }
}

#[test]
fn record_with_everything_set() {
    let spec = RecordSpec {
        outer: 0x16,
        version: 0x0301,
        inner: Some(0x17),
        pad: 300,
        wire_aad: false,
    };
    for suite in 0..provider::SUITES.len() {
        same(
            suite,
            false,
            vec![Op::Record {
                spec: spec.clone(),
                content: b"hello".to_vec(),
            }],
        );
    }
}

fn outcome(suite: usize, ops: Vec<Op>) -> Outcome {
    let scenario = Scenario {
        suite,
        with_finished: false,
        ops,
    };
    let outcome = check(&scenario).unwrap_or_else(|mismatch| panic!("{mismatch}\n{scenario:?}"));
    assert_eq!(outcome.verdict, Verdict::Same, "{scenario:?}");
    outcome
}

/// rustls keeps a record of empty handshake content in its buffer until a handshake message is
/// handed out, so the next record that does not fit beside it in one record's room fails
/// (found by the fuzzer); ours fails at the same point, without an alert.
#[test]
fn empty_handshake_records_stay_in_rustls_buffer() {
    for suite in [0, 3] {
        let empty_handshake = Op::Record {
            spec: RecordSpec {
                outer: 0x16,
                pad: 10_000,
                ..RecordSpec::plain(0x16)
            },
            content: Vec::new(),
        };
        let ops = vec![
            empty_handshake.clone(),
            Op::Deliver,
            Op::Data { len: 100, fill: 0 },
            Op::Data {
                len: 16_000,
                fill: 0,
            },
        ];
        let result = outcome(suite, ops);
        if suite == 0 {
            assert_eq!(result.delivered, 100);
            assert_eq!(
                result.failure.as_deref(),
                Some("Record(HandshakeBufferFull)")
            );
        }
        // A handshake message handed out frees it.
        let ops = vec![
            empty_handshake,
            Op::KeyUpdate(0),
            Op::Data {
                len: 16_000,
                fill: 0,
            },
        ];
        let result = outcome(suite, ops);
        if suite == 0 {
            assert_eq!(result.failure, None);
            assert_eq!(result.delivered, 16_000);
        }
    }
}

/// A handshake message split across records keeps them all in rustls's buffer, up to 64 KiB.
#[test]
fn split_handshake_message_within_and_beyond_64_kib() {
    let header = |size: u32| {
        let [_, a, b, c] = size.to_be_bytes();
        Op::Record {
            spec: RecordSpec::plain(0x16),
            content: vec![0x77, a, b, c],
        }
    };
    let filler = |len| Op::Filler {
        outer: 0x17,
        inner: 0x16,
        len,
        byte: 0,
    };
    // 48 000 bytes in three records: completes, and is refused as unexpected.
    let result = outcome(0, vec![header(48_000), filler(16_000), Op::Repeat(2)]);
    assert_eq!(
        result.failure.as_deref(),
        Some("Record(Unexpected(\"handshake message after the handshake\"))")
    );
    // 65 000 bytes: its records outgrow the buffer before it completes.
    let result = outcome(0, vec![header(65_000), filler(16_000), Op::Repeat(4)]);
    assert_eq!(
        result.failure.as_deref(),
        Some("Record(HandshakeBufferFull)")
    );
}

/// rustls's limit of 4 warning alerts counts those the client sent during the handshake (here
/// in plaintext, right after its ClientHello): both servers refuse the fourth after it.
#[test]
fn warnings_of_the_handshake_count_on_both_servers() {
    use super::servers::{OurServer, RustlsServer};
    for suite in [0usize, 3] {
        let warning = if suite < 3 { 90 } else { 42 };
        let (rustls_config, our_config) = configs();
        let mut failures = Vec::new();
        for ours in [false, true] {
            provider::reset_randomness(7);
            let mut theirs = RustlsServer::new(rustls_config.clone()).expect("rustls");
            let mut our = OurServer::new(our_config.clone()).expect("ours");
            let mut client = Client::new(provider::SUITES[suite]).expect("client");
            let mut feed = |bytes: &[u8]| match ours {
                true => {
                    our.feed(bytes);
                    (our.take_sent(), format!("{:?}", our.observed.failure))
                }
                false => {
                    theirs.feed(bytes);
                    (theirs.take_sent(), format!("{:?}", theirs.observed.failure))
                }
            };
            let mut flight = client.advance(&[]).expect("hello");
            flight.extend_from_slice(&[0x15, 3, 3, 0, 2, 1, warning]);
            loop {
                let (answer, _) = feed(&flight);
                flight = client.advance(&answer).expect("client");
                if client.done() {
                    feed(&flight);
                    break;
                }
            }
            let mut sealer = client.into_sealer().expect("keys");
            let outcomes: Vec<String> = (0..4)
                .map(|_| {
                    let record = sealer.seal(&RecordSpec::plain(0x15), &[1, warning]);
                    feed(&record.expect("a record")).1
                })
                .collect();
            failures.push(outcomes);
        }
        assert_eq!(failures[0][..3], ["None", "None", "None"], "{failures:?}");
        assert!(
            failures[0][3].contains("TooManyWarningAlertsReceived"),
            "{failures:?}"
        );
        assert_eq!(failures[1][..3], ["None", "None", "None"], "{failures:?}");
        assert!(failures[1][3].contains("TooManyWarnings"), "{failures:?}");
    }
}
