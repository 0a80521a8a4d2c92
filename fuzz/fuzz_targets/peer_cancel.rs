//! A forwarded cancel between fleet nodes (`fleet::wire`), as a node's peer port receives it
//! from whoever can reach it.
//!
//! The input's first 80 bytes (zero-padded) are a message: `ForwardedCancel::decode` must
//! refuse it (an attacker has no secret) unless the MAC is right, and never panic. The input
//! also drives a real message through the channel: its fields come from the input, it is
//! encoded with the secret and decoded back to the same fields; with one bit of it flipped
//! (the position from the input) it is refused; and the replay cache admits it once, refuses
//! it the second time, and refuses it as stale outside the clock window.
#![no_main]

use branchgate::fleet::wire::{
    ForwardedCancel, PeerSecret, Rejected, ReplayCache, MAX_CLOCK_SKEW, MESSAGE_LEN,
};
use branchgate::protocol::startup::CancelKey;
use libfuzzer_sys::fuzz_target;

const SECRET: [u8; 32] = [0x5e; 32];

fuzz_target!(|data: &[u8]| {
    let Some(secret) = PeerSecret::new(&SECRET) else {
        panic!("a 32-byte secret is accepted")
    };
    let mut raw = [0u8; MESSAGE_LEN];
    let n = data.len().min(MESSAGE_LEN);
    raw[..n].copy_from_slice(&data[..n]);
    if let Ok(decoded) = ForwardedCancel::decode(&raw, &secret) {
        // Only a message made with the secret gets through: it encodes back to these bytes.
        assert_eq!(decoded.encode(&secret), raw);
    }

    let field = |at: usize, len: usize| -> Vec<u8> {
        (0..len)
            .map(|i| data.get(at + i).copied().unwrap_or(0))
            .collect()
    };
    let u32_at = |at| u32::from_be_bytes(field(at, 4).try_into().unwrap_or([0; 4]));
    let mut nonce = [0u8; 16];
    nonce.copy_from_slice(&field(8, 16));
    let mut origin = [0u8; 8];
    origin.copy_from_slice(&field(24, 8));
    let now_ms = 1_700_000_000_000u64 + u64::from(u32_at(32));
    let message = ForwardedCancel {
        key: CancelKey {
            pid: u32_at(0),
            secret: u32_at(4),
        },
        timestamp_ms: now_ms,
        nonce,
        origin,
    };
    let bytes = message.encode(&secret);
    assert_eq!(ForwardedCancel::decode(&bytes, &secret), Ok(message));
    let position = field(36, 2);
    let bit = usize::from(u16::from_be_bytes([position[0], position[1]]));
    let mut flipped = bytes;
    flipped[(bit / 8) % MESSAGE_LEN] ^= 1 << (bit % 8);
    assert!(ForwardedCancel::decode(&flipped, &secret).is_err());

    let mut cache = ReplayCache::default();
    assert_eq!(cache.admit(&message, now_ms), Ok(()));
    assert_eq!(cache.admit(&message, now_ms), Err(Rejected::Replay));
    let window = u64::try_from(MAX_CLOCK_SKEW.as_millis()).unwrap_or(u64::MAX);
    let mut fresh = ReplayCache::default();
    assert_eq!(
        fresh.admit(&message, now_ms + window + 1),
        Err(Rejected::Stale)
    );
    assert!(fresh.is_empty());
});
