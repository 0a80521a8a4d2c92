//! The node-to-node cancel channel's message (node to node), its MAC and its replay window,
//! and the node tag a pooled port's cancel key carries.
//!
//! A forwarded cancel is one fixed-size message on its own TCP connection, never answered:
//!
//! ```text
//! offset  bytes  field
//!      0      4  magic "BGC1" (the format's version is in it)
//!      4      1  hops: 1 (a forwarded cancel is never forwarded again)
//!      5      3  zero
//!      8      4  the client's cancel key: pid (big-endian)
//!     12      4  the client's cancel key: secret (big-endian)
//!     16      8  the sender's wall clock, milliseconds since the Unix epoch (big-endian)
//!     24     16  a random nonce
//!     40      8  the originating node: the first 8 bytes of SHA-256 of its id
//!     48     32  HMAC-SHA256 over bytes 0..48, keyed with `[node] secret_file`
//! ```
//!
//! The MAC is what makes a peer port safe to expose to other nodes: without the fleet's secret
//! nobody can make a node act. A stolen message replayed later is refused by its timestamp
//! (older or newer than [`MAX_CLOCK_SKEW`]) or, within that window, by its nonce
//! ([`ReplayCache`]). Every refusal looks the same to the sender: the connection is closed.

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::protocol::startup::CancelKey;

/// A message's size: fixed, so a reader knows when it has one and needs no allocation.
pub const MESSAGE_LEN: usize = 80;
/// What a message starts with (a format change takes a new magic).
const MAGIC: [u8; 4] = *b"BGC1";
/// Bytes covered by the MAC.
const SIGNED_LEN: usize = 48;
/// The only hop count a node accepts: a forwarded cancel goes one hop and no further.
pub const HOPS: u8 = 1;
/// How far a message's timestamp may be from the receiver's clock, either way: long enough
/// for a forward that took its whole time bound plus NTP-synchronised clocks, short enough
/// that the replay cache need only remember this long.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(10);
/// Nonces the replay cache remembers at most. Forwarded cancels are rare (a miss per source is
/// rate-limited at every node); beyond this many in one window the oldest are forgotten
/// early, which reopens only their own replay, and only for a message whose MAC is right.
pub const REPLAY_CACHE_CAPACITY: usize = 8192;
/// Shortest secret accepted: the HMAC's key should have a hash's worth of entropy.
pub const MIN_SECRET_LEN: usize = 32;

type HmacSha256 = Hmac<Sha256>;

/// The fleet's shared secret (`[node] secret_file`), wiped when dropped.
#[derive(Clone)]
pub struct PeerSecret(Zeroizing<Vec<u8>>);

impl std::fmt::Debug for PeerSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerSecret(..)")
    }
}

/// Why the secret file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file holds fewer than [`MIN_SECRET_LEN`] bytes (after trailing whitespace).
    #[error(
        "{}: the secret is {len} bytes, at least {MIN_SECRET_LEN} are needed (make one with \
         `openssl rand -hex 32 > FILE` and copy it to every node)",
        path.display()
    )]
    TooShort {
        /// The file.
        path: std::path::PathBuf,
        /// Its length.
        len: usize,
    },
}

impl PeerSecret {
    /// The secret in `path`: its bytes, trailing whitespace left out (so that a hex line
    /// written by `openssl rand -hex 32` works the same on every node).
    pub fn load(path: &std::path::Path) -> Result<PeerSecret, SecretError> {
        let bytes = Zeroizing::new(std::fs::read(path).map_err(|source| SecretError::Io {
            path: path.to_owned(),
            source,
        })?);
        let len = bytes
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .map_or(0, |last| last + 1);
        PeerSecret::new(&bytes[..len]).ok_or_else(|| SecretError::TooShort {
            path: path.to_owned(),
            len,
        })
    }

    /// `bytes` as a secret, if long enough.
    pub fn new(bytes: &[u8]) -> Option<PeerSecret> {
        (bytes.len() >= MIN_SECRET_LEN).then(|| PeerSecret(Zeroizing::new(bytes.to_vec())))
    }

    fn mac(&self) -> HmacSha256 {
        // HMAC takes keys of any length.
        <HmacSha256 as Mac>::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!())
    }
}

/// A node's 8-byte name in messages: the first 8 bytes of SHA-256 of its id (fixed size, so
/// the message is; enough to tell nodes apart in a log).
pub fn origin_of(id: &str) -> [u8; 8] {
    let digest = Sha256::digest(id.as_bytes());
    let mut origin = [0u8; 8];
    origin.copy_from_slice(&digest[..8]);
    origin
}

/// A forwarded cancel, as sent and as received once its MAC was checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForwardedCancel {
    /// The key the client sent.
    pub key: CancelKey,
    /// The sender's clock, milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// Random, unique per message: what the replay cache remembers.
    pub nonce: [u8; 16],
    /// The originating node ([`origin_of`]).
    pub origin: [u8; 8],
}

/// Why a received message was refused. The sender is told none of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    /// Not this format: wrong magic, a hop count other than [`HOPS`], or non-zero padding.
    #[error("not a forwarded cancel of this version")]
    Malformed,
    /// The MAC does not match: the sender does not hold the fleet's secret.
    #[error("bad MAC")]
    BadMac,
    /// The timestamp is further than [`MAX_CLOCK_SKEW`] from this node's clock.
    #[error("stale timestamp")]
    Stale,
    /// This nonce was seen within the window.
    #[error("replayed nonce")]
    Replay,
}

impl ForwardedCancel {
    /// The message, MAC'd with `secret`.
    pub fn encode(&self, secret: &PeerSecret) -> [u8; MESSAGE_LEN] {
        let mut out = [0u8; MESSAGE_LEN];
        out[0..4].copy_from_slice(&MAGIC);
        out[4] = HOPS;
        out[8..12].copy_from_slice(&self.key.pid.to_be_bytes());
        out[12..16].copy_from_slice(&self.key.secret.to_be_bytes());
        out[16..24].copy_from_slice(&self.timestamp_ms.to_be_bytes());
        out[24..40].copy_from_slice(&self.nonce);
        out[40..48].copy_from_slice(&self.origin);
        let mut mac = secret.mac();
        mac.update(&out[..SIGNED_LEN]);
        out[SIGNED_LEN..].copy_from_slice(&mac.finalize().into_bytes());
        out
    }

    /// The message in `bytes` if its MAC (checked in constant time, before anything else is
    /// believed) is right and it is of this format. The timestamp and nonce are checked by
    /// [`ReplayCache::admit`].
    pub fn decode(bytes: &[u8; MESSAGE_LEN], secret: &PeerSecret) -> Result<Self, Rejected> {
        let mut mac = secret.mac();
        mac.update(&bytes[..SIGNED_LEN]);
        mac.verify_slice(&bytes[SIGNED_LEN..])
            .map_err(|_| Rejected::BadMac)?;
        if bytes[0..4] != MAGIC || bytes[4] != HOPS || bytes[5..8] != [0, 0, 0] {
            return Err(Rejected::Malformed);
        }
        let u32_at = |at: usize| {
            u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        let mut timestamp = [0u8; 8];
        timestamp.copy_from_slice(&bytes[16..24]);
        let mut nonce = [0u8; 16];
        nonce.copy_from_slice(&bytes[24..40]);
        let mut origin = [0u8; 8];
        origin.copy_from_slice(&bytes[40..48]);
        Ok(ForwardedCancel {
            key: CancelKey {
                pid: u32_at(8),
                secret: u32_at(12),
            },
            timestamp_ms: u64::from_be_bytes(timestamp),
            nonce,
            origin,
        })
    }
}

/// The nonces of recently accepted messages, bounded in time ([`MAX_CLOCK_SKEW`] after their
/// timestamp, when the timestamp check refuses them anyway) and in size
/// ([`REPLAY_CACHE_CAPACITY`]).
#[derive(Debug, Default)]
pub struct ReplayCache {
    /// Nonces in the order they were accepted, with their timestamps.
    order: VecDeque<(u64, [u8; 16])>,
    /// The same nonces, for lookup.
    seen: HashSet<[u8; 16]>,
}

impl ReplayCache {
    /// Accepts `message` received at `now_ms` (milliseconds since the Unix epoch) if its
    /// timestamp is within the window and its nonce is new; remembers the nonce.
    pub fn admit(&mut self, message: &ForwardedCancel, now_ms: u64) -> Result<(), Rejected> {
        let skew = u64::try_from(MAX_CLOCK_SKEW.as_millis()).unwrap_or(u64::MAX);
        if message.timestamp_ms.abs_diff(now_ms) > skew {
            return Err(Rejected::Stale);
        }
        // Nonces whose timestamps the window refuses now need not be remembered. Timestamps
        // come from several clocks, so the queue is only roughly in order: an entry behind a
        // newer one waits for it, which only keeps it longer.
        while let Some(&(at, nonce)) = self.order.front() {
            if now_ms.saturating_sub(at) <= skew {
                break;
            }
            self.order.pop_front();
            self.seen.remove(&nonce);
        }
        if self.seen.contains(&message.nonce) {
            return Err(Rejected::Replay);
        }
        if self.order.len() >= REPLAY_CACHE_CAPACITY {
            if let Some((_, oldest)) = self.order.pop_front() {
                self.seen.remove(&oldest);
            }
        }
        self.order.push_back((message.timestamp_ms, message.nonce));
        self.seen.insert(message.nonce);
        Ok(())
    }

    /// Nonces remembered.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// True if none is remembered.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

/// The pooled port's cancel keys name their node. The 32-bit pid the router issues there is
///
/// ```text
///  bit 31     30 ..... 22     21 .......... 0
///  [ 0 ]  [ node tag, 9 bits ]  [ random, 22 bits ]
/// ```
///
/// - bit 31 is 0: the pid is a positive `int32`, as clients expect of BackendKeyData;
/// - the tag is 1 to 511 ([`node_tag`]), never 0, so the pid is at least 2^22: above any
///   Linux pid (`pid_max` is at most 2^22), so a pooled key is never mistaken for a direct
///   port's (which carries the backend's real pid) and a node can tell the two apart by value;
/// - 22 random bits keep sessions apart; the 32-bit secret stays wholly random, so a guess is
///   as hard as without the tag.
///
/// 511 tags for a fleet means two nodes may share one: with `n` nodes the chance that some two
/// do is about `n² / 1022` (2% for 5 nodes, 18% for 15). Sharing costs little: a key with a
/// shared tag is forwarded to every live node having it (one more message), never lost.
pub const TAG_SHIFT: u32 = 22;
/// The largest tag (9 bits).
pub const MAX_TAG: u16 = (1 << 9) - 1;

/// The tag of node `id`: from SHA-256 of the id, so that every node computes the same tag for
/// every other one from the live set alone. 1 to [`MAX_TAG`].
pub fn node_tag(id: &str) -> u16 {
    let digest = Sha256::digest(id.as_bytes());
    1 + u16::from_be_bytes([digest[0], digest[1]]) % MAX_TAG
}

/// A pooled-port pid for a node with `tag`, from `random` (its low 22 bits are used).
pub fn tagged_pid(tag: u16, random: u32) -> u32 {
    let tag = u32::from(tag.clamp(1, MAX_TAG));
    (tag << TAG_SHIFT) | (random & ((1 << TAG_SHIFT) - 1))
}

/// The node tag in a pid, or `None` for a pid below 2^22: a real backend's (the direct port's),
/// whose node cannot be told from it.
pub fn tag_of(pid: u32) -> Option<u16> {
    let tag = (pid >> TAG_SHIFT) & u32::from(MAX_TAG);
    // Bit 31 set: no pid the router issues; read as untagged (forwarded to every node, as any
    // other unknown key is).
    if pid >> 31 != 0 || tag == 0 {
        return None;
    }
    u16::try_from(tag).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(byte: u8) -> PeerSecret {
        PeerSecret::new(&[byte; 32]).expect("32 bytes")
    }

    fn message(now_ms: u64, nonce: u8) -> ForwardedCancel {
        ForwardedCancel {
            key: CancelKey {
                pid: 0x0102_0304,
                secret: 0xa1b2_c3d4,
            },
            timestamp_ms: now_ms,
            nonce: [nonce; 16],
            origin: origin_of("edge-1"),
        }
    }

    #[test]
    fn messages_round_trip_with_the_right_secret_only() {
        let m = message(1_700_000_000_000, 7);
        let bytes = m.encode(&secret(1));
        assert_eq!(&bytes[..8], b"BGC1\x01\0\0\0");
        assert_eq!(&bytes[8..16], &[1, 2, 3, 4, 0xa1, 0xb2, 0xc3, 0xd4]);
        assert_eq!(ForwardedCancel::decode(&bytes, &secret(1)), Ok(m));
        assert_eq!(
            ForwardedCancel::decode(&bytes, &secret(2)),
            Err(Rejected::BadMac)
        );
        // Any flipped bit, signed or MAC, is a bad MAC.
        for at in [0, 4, 9, 15, 20, 30, 45, 50, 79] {
            let mut flipped = bytes;
            flipped[at] ^= 0x10;
            assert_eq!(
                ForwardedCancel::decode(&flipped, &secret(1)),
                Err(Rejected::BadMac),
                "byte {at}"
            );
        }
    }

    #[test]
    fn a_message_signed_right_but_of_another_hop_count_is_refused() {
        let s = secret(1);
        let mut bytes = message(1, 1).encode(&s);
        bytes[4] = 2;
        let mut mac = s.mac();
        mac.update(&bytes[..SIGNED_LEN]);
        bytes[SIGNED_LEN..].copy_from_slice(&mac.finalize().into_bytes());
        assert_eq!(
            ForwardedCancel::decode(&bytes, &s),
            Err(Rejected::Malformed)
        );
    }

    #[test]
    fn the_window_refuses_stale_and_replayed_messages() {
        let now = 1_700_000_000_000;
        let mut cache = ReplayCache::default();
        assert_eq!(cache.admit(&message(now, 1), now), Ok(()));
        assert_eq!(
            cache.admit(&message(now, 1), now + 5),
            Err(Rejected::Replay)
        );
        assert_eq!(
            cache.admit(&message(now - 10_001, 2), now),
            Err(Rejected::Stale)
        );
        assert_eq!(
            cache.admit(&message(now + 10_001, 3), now),
            Err(Rejected::Stale)
        );
        assert_eq!(cache.admit(&message(now - 9_000, 4), now), Ok(()));
        // Past the window the nonce is forgotten, and the timestamp refuses the message.
        let later = now + 20_000;
        assert_eq!(cache.admit(&message(later, 5), later), Ok(()));
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.admit(&message(now, 1), later), Err(Rejected::Stale));
    }

    #[test]
    fn the_replay_cache_stays_bounded() {
        let now = 1_700_000_000_000;
        let mut cache = ReplayCache::default();
        for i in 0..(REPLAY_CACHE_CAPACITY as u64 + 100) {
            let mut m = message(now, 0);
            m.nonce[..8].copy_from_slice(&i.to_be_bytes());
            assert_eq!(cache.admit(&m, now), Ok(()));
            assert!(cache.len() <= REPLAY_CACHE_CAPACITY);
        }
        assert_eq!(cache.seen.len(), cache.order.len());
    }

    #[test]
    fn pooled_pids_carry_the_node_tag_above_every_real_pid() {
        for id in ["edge-1", "edge-2", "node-0123456789abcdef"] {
            let tag = node_tag(id);
            assert!((1..=MAX_TAG).contains(&tag), "{id}: {tag}");
            assert_eq!(tag, node_tag(id), "stable");
            for random in [0, 1, 0x003f_ffff, u32::MAX] {
                let pid = tagged_pid(tag, random);
                assert!(pid >= 1 << 22, "{pid:#x}");
                assert!(i32::try_from(pid).is_ok(), "{pid:#x} is a positive int32");
                assert_eq!(tag_of(pid), Some(tag));
            }
        }
        assert_eq!(tagged_pid(1, 0), 0x0040_0000);
        assert_eq!(tagged_pid(MAX_TAG, u32::MAX), 0x7fff_ffff);
        // A real pid (the direct port's) has no tag.
        for pid in [1, 4242, (1 << 22) - 1] {
            assert_eq!(tag_of(pid), None);
        }
        assert_eq!(tag_of(0x8040_0000), None);
    }

    #[test]
    fn secrets_must_be_long_enough() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("peer.secret");
        std::fs::write(&path, format!("{}\n", "ab".repeat(32))).expect("write");
        assert!(PeerSecret::load(&path).is_ok());
        std::fs::write(&path, "short\n").expect("write");
        let error = PeerSecret::load(&path).expect_err("too short");
        assert!(error.to_string().contains("at least 32"), "{error}");
        assert!(PeerSecret::load(&dir.path().join("none")).is_err());
    }
}
