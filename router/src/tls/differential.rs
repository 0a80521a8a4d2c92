//! Differential testing of the record layer against rustls itself: the same client bytes go to
//! rustls's buffered `ServerConnection` and to the router's `ServerHandshake` and
//! `RecordLayer`, which must deliver the same plaintext, see the same close_notify, fail at the
//! same point with the same alert (byte for byte), and seal the same records afterwards (the
//! KeyUpdate or renegotiation refusal they owe, then data, then close_notify).
//!
//! Handshakes are deterministic ([`provider`]): both servers send the same flights for the same
//! client flights (checked), so one rustls client drives both, and the keys after it are the
//! same on both. After the handshake the client is a sealer of our own ([`client`]) with the
//! client's keys, so a scenario can send records no well-behaved client sends: any content
//! type, inner plaintext, padding, header, KeyUpdate or alert, split or coalesced as it likes,
//! with bits flipped and sequence numbers moved.
//!
//! Used by the `tls_differential` fuzz target (`fuzz/`, feature `differential`) and by unit
//! tests over the committed seeds (`fuzz/seeds/tls_differential/`) and hand-written scenarios.
//!
//! # Input layout ([`Scenario::decode`])
//!
//! A setup byte: bits 0-2 pick the suite ([`provider::SUITES`], modulo 6); bit 3 sends the first
//! chunk in the same write as the client's Finished (TLS 1.3). Then operations, until the input
//! runs out (u16 are big-endian):
//!
//! | op (byte % 12) | arguments | what it does |
//! | --- | --- | --- |
//! | 0 data | len u16, fill u8 | an application data record of `len` bytes `fill, fill+1, ...` |
//! | 1 record | flags u8, outer u8, version u16, inner u8, pad u16, len u16, content | a record: TLS 1.3 inner plaintext `content, inner, pad zeros` (flags bit 0: authenticate the header as sent; bit 1: no inner type); TLS 1.2 plaintext `content`, authenticated as `outer`, `version` |
//! | 2 filler | outer u8, inner u8, len u16, byte u8 | a well-formed record of `len` bytes `byte` (outer type `outer`) |
//! | 3 key update | request u8 | a KeyUpdate message in a handshake record (the client then rekeys) |
//! | 4 alert | level u8, description u8 | an alert record |
//! | 5 raw | len u16, bytes | bytes as they are |
//! | 6 flip | at u16, bit u8 | flips a bit of the bytes not yet delivered |
//! | 7 deliver | | delivers the bytes not yet delivered, as one write |
//! | 8 server data | len u16 | both servers send `len` bytes |
//! | 9 sequence | delta i8 | moves the client's sequence number |
//! | 10 repeat | count u8 | repeats the previous operation `count` times |
//! | 11 split | at u16 | delivers the first `at % (pending + 1)` bytes not yet delivered |
//!
//! At the end everything is delivered, and both servers send data and close_notify.

pub mod client;
pub mod provider;
pub mod servers;

use std::sync::{Arc, OnceLock};

use rustls::{PeerMisbehaved, ServerConfig};

use self::client::{Client, RecordSpec, Sealer};
use self::servers::{Failure, Observed, OurServer, RustlsServer};
use super::record::{
    RecordError, CONTENT_ALERT, CONTENT_APPLICATION_DATA, CONTENT_HANDSHAKE, HANDSHAKE_KEY_UPDATE,
};

/// Bounds that keep one scenario fast: bytes sent either way, operations run.
const MAX_WIRE_BYTES: usize = 1 << 19;
const MAX_OPERATIONS: usize = 1 << 12;

/// One connection's worth of client behaviour after the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scenario {
    /// Index into [`provider::SUITES`].
    pub suite: usize,
    /// TLS 1.3: the first chunk goes in the same write as the client's Finished.
    pub with_finished: bool,
    /// What the client does.
    pub ops: Vec<Op>,
}

/// One step of a [`Scenario`]; see the module's input layout.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Op {
    Data {
        len: u16,
        fill: u8,
    },
    Record {
        spec: RecordSpec,
        content: Vec<u8>,
    },
    Filler {
        outer: u8,
        inner: u8,
        len: u16,
        byte: u8,
    },
    KeyUpdate(u8),
    Alert(u8, u8),
    Raw(Vec<u8>),
    Flip {
        at: u16,
        bit: u8,
    },
    Deliver,
    ServerData(u16),
    Sequence(i8),
    Repeat(u8),
    Split(u16),
}

struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = self.0.split_at_checked(n)?;
        self.0 = tail;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.bytes(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.bytes(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
}

impl Scenario {
    /// Decodes fuzzer input (the module's input layout). `None` if there is no setup byte.
    pub fn decode(data: &[u8]) -> Option<Scenario> {
        let mut input = Input(data);
        let setup = input.u8()?;
        let mut ops = Vec::new();
        while let Some(op) = Self::decode_op(&mut input) {
            ops.push(op);
        }
        Some(Scenario {
            suite: usize::from(setup & 7) % provider::SUITES.len(),
            with_finished: setup & 8 != 0,
            ops,
        })
    }

    fn decode_op(input: &mut Input<'_>) -> Option<Op> {
        Some(match input.u8()? % 12 {
            0 => Op::Data {
                len: input.u16()?,
                fill: input.u8()?,
            },
            1 => {
                let flags = input.u8()?;
                let outer = input.u8()?;
                let version = input.u16()?;
                let inner = input.u8()?;
                let pad = input.u16()?;
                let len = input.u16()?;
                let content = input.bytes(usize::from(len))?.to_vec();
                let spec = RecordSpec {
                    outer,
                    version,
                    inner: (flags & 2 == 0).then_some(inner),
                    pad: usize::from(pad),
                    wire_aad: flags & 1 != 0,
                };
                Op::Record { spec, content }
            }
            2 => Op::Filler {
                outer: input.u8()?,
                inner: input.u8()?,
                len: input.u16()?,
                byte: input.u8()?,
            },
            3 => Op::KeyUpdate(input.u8()?),
            4 => Op::Alert(input.u8()?, input.u8()?),
            5 => {
                let len = input.u16()?;
                Op::Raw(input.bytes(usize::from(len))?.to_vec())
            }
            6 => Op::Flip {
                at: input.u16()?,
                bit: input.u8()?,
            },
            7 => Op::Deliver,
            8 => Op::ServerData(input.u16()?),
            9 => Op::Sequence(input.u8()? as i8),
            10 => Op::Repeat(input.u8()?),
            _ => Op::Split(input.u16()?),
        })
    }
}

/// How a scenario ended, on both servers alike.
#[derive(Debug)]
pub struct Outcome {
    /// How the servers compared.
    pub verdict: Verdict,
    /// Bytes of application data delivered.
    pub delivered: usize,
    /// close_notify seen.
    pub closed: bool,
    /// Why our server stopped, if it did.
    pub failure: Option<String>,
}

/// How a scenario compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Both servers behaved the same throughout.
    Same,
    /// They parted where this layer knowingly differs (a handshake message spanning records
    /// whose contents rustls would have parsed; see [`RecordError::UnparsedHandshake`]), and
    /// agreed up to there.
    KnownDifference,
}

/// Runs fuzzer input; panics if the servers differ (the fuzz target's check).
pub fn run(data: &[u8]) {
    let Some(scenario) = Scenario::decode(data) else {
        return;
    };
    if let Err(mismatch) = check(&scenario) {
        panic!("the record layer differs from rustls: {mismatch}\n{scenario:?}");
    }
}

fn configs() -> &'static (Arc<ServerConfig>, Arc<ServerConfig>) {
    static CONFIGS: OnceLock<(Arc<ServerConfig>, Arc<ServerConfig>)> = OnceLock::new();
    CONFIGS.get_or_init(provider::server_configs)
}

/// Runs `scenario` against both servers; `Err` says where they first differed.
pub fn check(scenario: &Scenario) -> Result<Outcome, String> {
    let (mut run, mut sealer, last_flight) = connect(scenario)?;
    let verdict = run.play(scenario, &mut sealer, last_flight)?;
    let observed = &run.ours.observed;
    Ok(Outcome {
        verdict,
        delivered: observed.plaintext.len(),
        closed: observed.closed,
        failure: observed
            .failure
            .as_ref()
            .map(|failure| format!("{failure:?}")),
    })
}

/// The handshake, up to the client's last flight (not yet delivered): both servers must answer
/// each flight with the same bytes.
fn connect(scenario: &Scenario) -> Result<(Run, Sealer, Vec<u8>), String> {
    let suite = provider::SUITES[scenario.suite % provider::SUITES.len()];
    provider::reset_randomness(0x6272_616e_6368_6761 ^ scenario.suite as u64);
    let (rustls_config, our_config) = configs();
    let mut theirs = RustlsServer::new(rustls_config.clone()).map_err(|e| e.to_string())?;
    let mut ours = OurServer::new(our_config.clone()).map_err(|e| e.to_string())?;
    let mut client = Client::new(suite).map_err(|e| format!("client: {e}"))?;
    let mut flight = client.advance(&[]).map_err(|e| format!("client: {e}"))?;
    while !client.done() {
        theirs.feed(&flight);
        ours.feed(&flight);
        let (their_answer, our_answer) = (theirs.take_sent(), ours.take_sent());
        if their_answer != our_answer {
            return Err("the servers answered a handshake flight differently".into());
        }
        if theirs.observed.failure.is_some() || ours.observed.failure.is_some() {
            return Err(format!(
                "handshake failed: rustls {:?}, ours {:?}",
                theirs.observed.failure, ours.observed.failure
            ));
        }
        flight = client
            .advance(&their_answer)
            .map_err(|e| format!("client: {e}"))?;
    }
    let sealer = client.into_sealer().map_err(|e| format!("client: {e}"))?;
    let run = Run {
        theirs,
        ours,
        pending: Vec::new(),
        wire: 0,
    };
    Ok((run, sealer, flight))
}

/// A scenario under way.
struct Run {
    theirs: RustlsServer,
    ours: OurServer,
    /// Client bytes not yet delivered.
    pending: Vec<u8>,
    /// Client bytes produced so far.
    wire: usize,
}

impl Run {
    /// The scenario's operations after the handshake, then the servers' last words.
    fn play(
        &mut self,
        scenario: &Scenario,
        sealer: &mut Sealer,
        last_flight: Vec<u8>,
    ) -> Result<Verdict, String> {
        // The client's last flight (TLS 1.3: its Finished) goes alone, or with the first chunk.
        self.pending = last_flight;
        if !(scenario.with_finished && sealer.tls13()) {
            if let Some(verdict) = self.deliver(self.pending.len())? {
                return Ok(verdict);
            }
        }
        let mut last: Option<&Op> = None;
        let mut executed = 0;
        for op in &scenario.ops {
            let (op, times) = match op {
                Op::Repeat(count) => match last {
                    Some(previous) => (previous, usize::from(*count)),
                    None => continue,
                },
                op => (op, 1),
            };
            last = Some(op);
            for _ in 0..times {
                executed += 1;
                if executed > MAX_OPERATIONS || self.wire > MAX_WIRE_BYTES {
                    break;
                }
                if let Some(verdict) = self.step(op, sealer)? {
                    return Ok(verdict);
                }
            }
        }
        if let Some(verdict) = self.deliver(self.pending.len())? {
            return Ok(verdict);
        }
        if self.theirs.observed.failure.is_some() {
            return Ok(Verdict::Same);
        }
        // Both still up: what each seals now, then close_notify (once connected: the client's
        // Finished may have been cut short by a flipped bit).
        match (self.theirs.connected(), self.ours.connected()) {
            (true, true) => {
                self.theirs.send(b"the end");
                self.theirs.close();
                self.ours.send(b"the end");
                self.ours.close();
                self.compare_sent("the final data and close_notify")?;
            }
            (false, false) => {}
            (theirs, ours) => {
                return Err(format!("handshake complete: rustls {theirs}, ours {ours}"))
            }
        }
        Ok(Verdict::Same)
    }

    fn push(&mut self, bytes: Option<Vec<u8>>) {
        if let Some(bytes) = bytes {
            self.wire += bytes.len();
            self.pending.extend(bytes);
        }
    }

    /// One operation; `Some` ends the scenario early.
    fn step(&mut self, op: &Op, sealer: &mut Sealer) -> Result<Option<Verdict>, String> {
        match op {
            Op::Data { len, fill } => {
                let data: Vec<u8> = (0..*len).map(|i| fill.wrapping_add(i as u8)).collect();
                let record = sealer.seal(&RecordSpec::plain(CONTENT_APPLICATION_DATA), &data);
                self.push(record);
            }
            Op::Record { spec, content } => {
                let record = sealer.seal(spec, content);
                self.push(record);
            }
            Op::Filler {
                outer,
                inner,
                len,
                byte,
            } => {
                let spec = RecordSpec {
                    outer: *outer,
                    ..RecordSpec::plain(*inner)
                };
                let record = sealer.seal(&spec, &vec![*byte; usize::from(*len)]);
                self.push(record);
            }
            Op::KeyUpdate(request) => {
                let message = [HANDSHAKE_KEY_UPDATE, 0, 0, 1, *request];
                let record = sealer.seal(&RecordSpec::plain(CONTENT_HANDSHAKE), &message);
                self.push(record);
            }
            Op::Alert(level, description) => {
                let record =
                    sealer.seal(&RecordSpec::plain(CONTENT_ALERT), &[*level, *description]);
                self.push(record);
            }
            Op::Raw(bytes) => self.push(Some(bytes.clone())),
            Op::Flip { at, bit } => {
                if !self.pending.is_empty() {
                    let at = usize::from(*at) % self.pending.len();
                    self.pending[at] ^= 1 << (bit % 8);
                }
            }
            Op::Deliver => return self.deliver(self.pending.len()),
            Op::Split(at) => {
                let at = usize::from(*at) % (self.pending.len() + 1);
                return self.deliver(at);
            }
            Op::ServerData(len) => {
                // Before the handshake is over rustls would hold the data back; ours has no
                // record layer to seal it with: a server sends only once connected.
                let connected = self.theirs.connected() && self.ours.connected();
                let (theirs, ours) = (&self.theirs.observed, &self.ours.observed);
                if connected && theirs.failure.is_none() && ours.failure.is_none() {
                    self.wire += usize::from(*len);
                    let data: Vec<u8> = (0..*len).map(|i| (i % 251) as u8).collect();
                    self.theirs.send(&data);
                    self.ours.send(&data);
                    self.compare_sent("server data")?;
                }
            }
            Op::Sequence(delta) => sealer.skip(*delta),
            Op::Repeat(_) => {}
        }
        Ok(None)
    }

    /// Delivers the first `len` pending bytes to both servers and compares what they made of
    /// them.
    fn deliver(&mut self, len: usize) -> Result<Option<Verdict>, String> {
        let chunk: Vec<u8> = self.pending.drain(..len).collect();
        if chunk.is_empty() {
            return Ok(None);
        }
        self.theirs.feed(&chunk);
        self.ours.feed(&chunk);
        compare(&self.theirs.observed, &self.ours.observed)
    }

    /// Compares what both servers sent since the last comparison (then forgets it).
    fn compare_sent(&mut self, what: &str) -> Result<(), String> {
        let (theirs, ours) = (&mut self.theirs.observed, &mut self.ours.observed);
        if theirs.sent != ours.sent {
            return Err(format!(
                "{what}: the servers sent different bytes\n rustls {:02x?}\n ours   {:02x?}",
                theirs.sent, ours.sent
            ));
        }
        theirs.sent.clear();
        ours.sent.clear();
        match (&theirs.failure, &ours.failure) {
            (None, None) => Ok(()),
            (theirs, ours) => Err(format!("{what}: rustls {theirs:?}, ours {ours:?}")),
        }
    }
}

/// After a delivery: the same plaintext, the same close_notify, the same failure, and on failure
/// the same bytes sent.
fn compare(theirs: &Observed, ours: &Observed) -> Result<Option<Verdict>, String> {
    if let Some(Failure::Record(RecordError::UnparsedHandshake(_))) = &ours.failure {
        if theirs.plaintext == ours.plaintext && known_difference(theirs) {
            return Ok(Some(Verdict::KnownDifference));
        }
    }
    if theirs.plaintext != ours.plaintext {
        return Err(format!(
            "plaintext differs: rustls {} bytes, ours {} bytes (failures: rustls {:?}, ours {:?})",
            theirs.plaintext.len(),
            ours.plaintext.len(),
            theirs.failure,
            ours.failure
        ));
    }
    if theirs.closed != ours.closed {
        return Err(format!(
            "close_notify: rustls {}, ours {}",
            theirs.closed, ours.closed
        ));
    }
    match (&theirs.failure, &ours.failure) {
        (None, None) => Ok(None),
        (Some(their_failure), Some(our_failure)) => {
            if theirs.sent != ours.sent {
                return Err(format!(
                    "failed alike ({their_failure:?} / {our_failure:?}) but sent different bytes\n rustls {:02x?}\n ours   {:02x?}",
                    theirs.sent, ours.sent
                ));
            }
            if !same_reason(their_failure, our_failure) {
                return Err(format!(
                    "failed for different reasons: rustls {their_failure:?}, ours {our_failure:?}"
                ));
            }
            Ok(Some(Verdict::Same))
        }
        (theirs, ours) => Err(format!(
            "only one server failed: rustls {theirs:?}, ours {ours:?}"
        )),
    }
}

/// Where this layer gives up on a split handshake message rustls would parse: rustls, at the
/// same point, either refused it as malformed or unexpected, or (TLS 1.2) took it as a
/// renegotiation attempt and goes on.
fn known_difference(theirs: &Observed) -> bool {
    use rustls::Error as E;
    match &theirs.failure {
        None => true,
        Some(Failure::Rustls(
            E::InvalidMessage(_) | E::InappropriateHandshakeMessage { .. } | E::PeerMisbehaved(_),
        )) => true,
        Some(_) => false,
    }
}

/// Failures that send no alert look alike on the wire: check they are the same failure.
fn same_reason(theirs: &Failure, ours: &Failure) -> bool {
    use rustls::Error as E;
    use PeerMisbehaved as P;
    let Failure::Record(ours) = ours else {
        // Our handshake is rustls's, and its errors rustls's own.
        return true;
    };
    let theirs = match theirs {
        Failure::RustlsBufferFull => return *ours == RecordError::HandshakeBufferFull,
        Failure::Rustls(error) => error,
        _ => return false,
    };
    match ours {
        RecordError::NoContentType => {
            matches!(theirs, E::PeerMisbehaved(P::IllegalTlsInnerPlaintext))
        }
        RecordError::Alert(ours) => {
            matches!(theirs, E::AlertReceived(alert) if u8::from(*alert) == *ours)
        }
        RecordError::Interleaved => matches!(
            theirs,
            E::PeerMisbehaved(P::MessageInterleavedWithHandshakeMessage)
        ),
        RecordError::HandshakeTooLarge => matches!(
            theirs,
            E::InvalidMessage(rustls::InvalidMessage::HandshakePayloadTooLarge)
        ),
        RecordError::TooManyEmptyRecords => {
            matches!(theirs, E::PeerMisbehaved(P::TooManyEmptyFragments))
        }
        RecordError::TooManyWarnings => {
            matches!(theirs, E::PeerMisbehaved(P::TooManyWarningAlertsReceived))
        }
        RecordError::TooManyKeyUpdates => {
            matches!(theirs, E::PeerMisbehaved(P::TooManyKeyUpdateRequests))
        }
        RecordError::TooManyRenegotiations => {
            matches!(theirs, E::PeerMisbehaved(P::TooManyRenegotiationRequests))
        }
        RecordError::HandshakeBufferFull => false,
        // The rest send an alert, compared byte for byte.
        _ => true,
    }
}

#[cfg(test)]
mod tests;
