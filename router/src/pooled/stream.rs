//! Messages in a byte stream as they arrive: whole ones, and long ones (a big DataRow, a COPY
//! chunk, a long query) passed through in pieces, so no message has to fit a buffer.

use crate::protocol::frame::HEADER_BYTES;

/// One step through the bytes at hand.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    /// A whole message of `len` bytes (header included) at the front.
    Whole {
        /// The message type byte.
        tag: u8,
        /// Its length, header included.
        len: usize,
    },
    /// The first `len` bytes at the front begin a message longer than what is here.
    Start {
        /// The message type byte.
        tag: u8,
        /// How many bytes of it are here (header included).
        len: usize,
    },
    /// The next `len` bytes at the front continue the message begun earlier.
    Rest {
        /// How many bytes of it are here.
        len: usize,
    },
}

/// A message header no peer may send: its length field is below 4.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid message length {len} (type {tag:#04x})")]
pub struct BadLength {
    /// The message type byte.
    pub tag: u8,
    /// The length field.
    pub len: i32,
}

/// Where a stream is: between messages, or inside a long one.
#[derive(Debug, Default)]
pub struct MessageStream {
    /// Bytes of the current long message still to come.
    rest: usize,
    /// What to do with them: pass them on (true) or drop them.
    pass: bool,
}

impl MessageStream {
    /// True inside a long message.
    pub fn inside(&self) -> bool {
        self.rest > 0
    }

    /// Whether the rest of the current long message is passed on.
    pub fn passing(&self) -> bool {
        self.pass
    }

    /// The next piece at the front of `buf`, or `None` if more bytes are needed. A message is
    /// given whole if it is all here, or if `whole(tag)` wants it whole and it fits
    /// `capacity` (then `None` until it is all here); otherwise it starts as a [`Piece::Start`]
    /// once at least `prefix` bytes of it are here, and the caller says with
    /// [`MessageStream::started`] what to do with the rest.
    pub fn next(
        &mut self,
        buf: &[u8],
        capacity: usize,
        prefix: usize,
        whole: impl Fn(u8) -> bool,
    ) -> Result<Option<Piece>, BadLength> {
        if self.rest > 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            let len = self.rest.min(buf.len());
            self.rest -= len;
            return Ok(Some(Piece::Rest { len }));
        }
        let Some(&[tag, a, b, c, d]) = buf.first_chunk::<HEADER_BYTES>() else {
            return Ok(None);
        };
        let field = i32::from_be_bytes([a, b, c, d]);
        let len = match usize::try_from(field) {
            Ok(n) if n >= 4 => n + 1,
            _ => return Err(BadLength { tag, len: field }),
        };
        if buf.len() >= len {
            return Ok(Some(Piece::Whole { tag, len }));
        }
        if len <= capacity && whole(tag) {
            return Ok(None);
        }
        if buf.len() < prefix.min(len) {
            return Ok(None);
        }
        self.rest = len - buf.len();
        Ok(Some(Piece::Start {
            tag,
            len: buf.len(),
        }))
    }

    /// After a [`Piece::Start`]: pass the rest of the message on, or drop it.
    pub fn started(&mut self, pass: bool) {
        self.pass = pass;
    }

    /// After a [`Piece::Start`]: the message was not taken after all (nothing of it was
    /// consumed); the next call starts it again.
    pub fn not_started(&mut self) {
        self.rest = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn whole_messages_then_a_long_one_in_pieces() {
        let mut s = MessageStream::default();
        let mut buf = message(b'Z', b"I");
        let long = message(b'D', &[7; 100]);
        buf.extend_from_slice(&long[..30]);
        let never = |_| false;
        assert_eq!(
            s.next(&buf, 64, 5, never),
            Ok(Some(Piece::Whole { tag: b'Z', len: 6 }))
        );
        let buf = &buf[6..];
        assert_eq!(
            s.next(buf, 64, 5, never),
            Ok(Some(Piece::Start { tag: b'D', len: 30 }))
        );
        s.started(true);
        assert!(s.inside() && s.passing());
        assert_eq!(
            s.next(&long[30..60], 64, 5, never),
            Ok(Some(Piece::Rest { len: 30 }))
        );
        assert_eq!(
            s.next(&long[60..], 64, 5, never),
            Ok(Some(Piece::Rest { len: 45 }))
        );
        assert!(!s.inside());
        assert_eq!(s.next(&[], 64, 5, never), Ok(None));
    }

    #[test]
    fn messages_wanted_whole_wait_while_they_fit() {
        let mut s = MessageStream::default();
        let m = message(b'P', &[1; 20]);
        let always = |_| true;
        assert_eq!(s.next(&m[..10], 64, 5, always), Ok(None));
        assert_eq!(
            s.next(&m, 64, 5, always),
            Ok(Some(Piece::Whole { tag: b'P', len: 25 }))
        );
        // Too long for the buffer: it comes in pieces after all, once its prefix is here.
        let big = message(b'P', &[1; 100]);
        assert_eq!(s.next(&big[..8], 64, 10, always), Ok(None));
        assert_eq!(
            s.next(&big[..12], 64, 10, always),
            Ok(Some(Piece::Start { tag: b'P', len: 12 }))
        );
    }

    #[test]
    fn a_length_below_four_is_refused() {
        let mut s = MessageStream::default();
        assert_eq!(
            s.next(&[b'Q', 0, 0, 0, 3], 64, 5, |_| false),
            Err(BadLength { tag: b'Q', len: 3 })
        );
        assert!(s
            .next(&[b'Q', 0xff, 0xff, 0xff, 0xff], 64, 5, |_| false)
            .is_err());
    }
}
