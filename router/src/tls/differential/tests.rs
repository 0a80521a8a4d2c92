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
