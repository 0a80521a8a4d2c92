//! The first packet of a connection (F): `check_startup` on whatever bytes arrived, then
//! `parse_startup` on the packet it delimits, every StartupMessage accessor, and the pooled
//! port's reading of its `options` parameter.
#![no_main]

use branchgate::protocol::startup::{
    check_startup, parse_startup, StartupMessage, StartupPacket, MAX_STARTUP_PACKET_BYTES,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The session parses only what check_startup delimits, but the parser must hold up alone.
    let whole = parse_startup(data);
    match check_startup(data) {
        Ok(Some(len)) => {
            assert!((8..=MAX_STARTUP_PACKET_BYTES).contains(&len) && len <= data.len());
            let packet = parse_startup(&data[..len]);
            if len == data.len() {
                assert_eq!(packet, whole);
            }
            if let Ok(StartupPacket::Startup(message)) = packet {
                exercise(message);
            }
        }
        // An incomplete or refused packet never parses.
        Ok(None) | Err(_) => assert!(whole.is_err(), "{whole:?}"),
    }
});

/// Every accessor agrees with the raw parameter list it was validated from.
fn exercise(message: StartupMessage<'_>) {
    assert_eq!(message.major, 3);
    let params: Vec<(&str, &str)> = message.params().collect();
    let mut rebuilt = Vec::new();
    for (name, value) in &params {
        assert!(!name.is_empty());
        rebuilt.extend_from_slice(name.as_bytes());
        rebuilt.push(0);
        rebuilt.extend_from_slice(value.as_bytes());
        rebuilt.push(0);
    }
    rebuilt.push(0);
    assert_eq!(
        rebuilt,
        message.params_bytes(),
        "params() skipped or invented bytes"
    );

    let last = |wanted: &str| params.iter().rev().find(|(n, _)| *n == wanted).map(|p| p.1);
    assert_eq!(message.user(), last("user"));
    assert_eq!(message.database(), last("database"));
    for (name, _) in &params {
        assert_eq!(message.get(name), last(name));
    }
    // The pooled port reads `options` as PostgreSQL does: names come out with `_` for `-`.
    if let Some(options) = message.get("options") {
        if let Ok(settings) = branchgate::pooled::params::options_settings(options) {
            assert!(settings.iter().all(|(name, _)| !name.contains('-')));
        }
    }
    let options: Vec<&str> = message.protocol_options().collect();
    let expected: Vec<&str> = params
        .iter()
        .map(|p| p.0)
        .filter(|n| n.starts_with("_pq_."))
        .collect();
    assert_eq!(options, expected);
}
