//! What the pooled port makes of a client's bytes and of a backend's replies: messages located
//! by `pooled::stream::MessageStream` (whole, or long ones in pieces), Parse/Bind/Describe/
//! Close/Query handed to the prepared-statement `Translator` (names, refusals, DEALLOCATE,
//! DISCARD, the simple-query statement splitter), everything recorded in the transaction
//! state machine, then arbitrary reply types fed back to it; and `answer_idle` on the same
//! bytes.
//!
//! The first input byte picks `max_prepared_statements` (0 or a small bound, so evictions
//! happen) and where the client's bytes end; the rest after them are backend reply types.
//! Checks beyond "no panic": what goes to the backend and what the router answers itself are
//! whole, well-formed messages; the backend's statement cache never exceeds its bound.
#![no_main]

use branchgate::buf::ReadBuf;
use branchgate::pooled::prepared::{
    answer_idle, apply_described, BackendStatements, ClientStatements, KnownGood, SharedTexts,
    Taken, Transient, Translator,
};
use branchgate::pooled::query_text::statements;
use branchgate::pooled::stream::{MessageStream, Piece};
use branchgate::pooled::transaction::{Send, Transaction};
use branchgate::protocol::frame::{Frames, HEADER_BYTES};
use libfuzzer_sys::fuzz_target;

/// Asserts `bytes` is a run of whole messages with sane lengths.
fn well_formed(bytes: &[u8], what: &str) {
    let mut frames = Frames::new(bytes, usize::MAX);
    for frame in frames.by_ref() {
        assert!(frame.is_ok(), "{what}: {frame:?}");
    }
    assert_eq!(frames.consumed(), bytes.len(), "{what}: a partial message");
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let max = if control & 1 == 0 { 0 } else { 3 };
    let split = (usize::from(control >> 1) * rest.len() / 127).min(rest.len());
    let (client, replies) = rest.split_at(split);
    if let Ok(text) = std::str::from_utf8(client) {
        for statement in statements(text) {
            assert!(!statement.is_empty() && text.contains(statement));
        }
    }

    let capacity = 512;
    let mut plain = ReadBuf::new(capacity);
    let mut tx = Transaction::default();
    let mut client_names = ClientStatements::new("app", Some("s1"));
    let mut backend = BackendStatements::default();
    let texts = SharedTexts::default();
    let mut transient = Transient::default();
    let mut stream = MessageStream::default();
    let mut out = Vec::new();
    let mut at = 0;
    'feed: while at < client.len() {
        let room = plain.spare_mut().len().min(client.len() - at);
        plain.spare_mut()[..room].copy_from_slice(&client[at..at + room]);
        plain.commit(room);
        at += room;
        // The prepared-statement translator over the state above.
        macro_rules! translator {
            () => {
                Translator {
                    tx: &mut tx,
                    client: &mut client_names,
                    backend: &mut backend,
                    max,
                    texts: &texts,
                    transient: &mut transient,
                    out: &mut out,
                }
            };
        }
        loop {
            let first = plain.data().first().copied();
            let prefix = if first == Some(b'B') { 300 } else { HEADER_BYTES + 1 };
            let piece = match stream.next(plain.data(), capacity, prefix, |tag| {
                matches!(tag, b'D' | b'C' | b'P' | b'B' | b'Q')
            }) {
                Ok(Some(piece)) => piece,
                Ok(None) => break,
                Err(_) => break 'feed,
            };
            let data = plain.data();
            let (tag, len, whole) = match piece {
                Piece::Rest { len } => {
                    if stream.passing() {
                        out.extend_from_slice(&data[..len]);
                    } else if transient.gathering() {
                        let _ = translator!().gathered_rest(&data[..len], !stream.inside());
                    }
                    plain.consume(len);
                    continue;
                }
                Piece::Whole { tag, len } => (tag, len, true),
                Piece::Start { tag, len } => (tag, len, false),
            };
            let message = &data[..len];
            let total = usize::try_from(u32::from_be_bytes([data[1], data[2], data[3], data[4]]))
                .unwrap_or(usize::MAX)
                .saturating_add(1);
            let mut translator = translator!();
            // Whether the rest of a long message goes on (whole ones are done with).
            let pass = match tag {
                b'P' if whole => {
                    let _ = translator.parse(message);
                    false
                }
                b'P' => translator.long_parse(message, total),
                b'B' | b'D' if tag == b'B' || whole => {
                    let taken = match tag {
                        b'B' => translator.bind(message, total),
                        _ => translator.describe(message),
                    };
                    match taken {
                        Ok(Taken::Passed) => tag == b'B',
                        Ok(Taken::Answered) | Err(_) => false,
                        // It waits for the backend's answer to the router's check: the rest
                        // of the client's bytes wait with it (the replies below answer it).
                        Ok(Taken::Check) => {
                            if !whole {
                                stream.not_started();
                            }
                            break 'feed;
                        }
                    }
                }
                b'C' if whole => {
                    let _ = translator.close(message);
                    false
                }
                b'Q' if whole => {
                    translator.query(message);
                    false
                }
                b'Q' => translator.long_query(message, total),
                _ => {
                    let send = translator.tx.client(tag, data.get(5).copied().unwrap_or(0));
                    if send == Send::Forward {
                        out.extend_from_slice(message);
                    }
                    send == Send::Forward
                }
            };
            if !whole {
                stream.started(pass);
            }
            plain.consume(len);
        }
    }
    if !stream.inside() {
        // Between messages: the backend was sent whole messages only (the pieces of a long
        // one add up to it, a rewritten Bind's length counts its new name).
        well_formed(&out, "to the backend");
    }
    assert!(max == 0 || backend.len() <= max, "{} > {max}", backend.len());

    // The backend answers with arbitrary reply types; the router's own replies come in turn.
    let mut to_client = Vec::new();
    for &tag in replies {
        let body: &[u8] = match tag {
            b'Z' => b"I",
            _ => b"",
        };
        if tx.backend(tag, body).is_err() {
            break;
        }
        tx.take_synthesized(&mut to_client);
        for undo in tx.take_undo() {
            undo.apply(&mut client_names, &mut backend);
        }
        let _ = tx.take_accepted();
        apply_described(tx.take_described(), &mut backend);
    }
    well_formed(&to_client, "router replies");

    // Between transactions: what the router answers without a backend is whole messages too.
    let mut idle = ReadBuf::new(capacity);
    let take = client.len().min(capacity);
    idle.spare_mut()[..take].copy_from_slice(&client[..take]);
    idle.commit(take);
    let mut answer = Vec::new();
    let known = KnownGood::default();
    let before = idle.len();
    let _ = answer_idle(&mut idle, &mut client_names, &known, &texts, max, &mut answer);
    assert!(idle.len() <= before);
    well_formed(&answer, "idle answers");
});
