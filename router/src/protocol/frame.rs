//! Regular (tagged) messages: a type byte, an Int32 length that counts itself but not the type
//! byte, then the body.
//!
//! [`check`] finds out whether a whole frame sits at the start of a buffer without decoding it;
//! "not yet" is `Ok(None)`, the normal answer while bytes are still arriving.

use thiserror::Error;

/// Bytes before the body: the type byte and the Int32 length.
pub const HEADER_BYTES: usize = 5;

/// The smallest legal length field: it counts its own four bytes.
const MIN_LENGTH_FIELD: usize = 4;

/// Where a complete frame sits at the start of a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// The message type byte.
    pub tag: u8,
    /// The whole frame, type byte included: `buf[..len]` is the raw frame to forward.
    pub len: usize,
}

impl FrameHeader {
    /// Length of the body (the bytes after the type byte and the length field).
    pub fn body_len(&self) -> usize {
        self.len - HEADER_BYTES
    }
}

/// A frame header that no valid peer sends: the connection cannot be resynchronised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum FrameError {
    /// The length field is below 4 (negative included).
    #[error("message of type 0x{tag:02x} has invalid length {len}")]
    LengthTooSmall {
        /// The message type byte.
        tag: u8,
        /// The length field as sent.
        len: i32,
    },
    /// The frame is larger than this connection accepts.
    #[error("message of type 0x{tag:02x} is {len} bytes, more than the limit of {max}")]
    TooLarge {
        /// The message type byte.
        tag: u8,
        /// The whole frame length the header announces.
        len: usize,
        /// The limit in force.
        max: usize,
    },
}

/// Checks whether `buf` starts with a complete frame of at most `max_frame_bytes` (type byte
/// included).
///
/// `Ok(None)` means more bytes are needed. The size limit is enforced as soon as the header is
/// in, so an oversized frame is refused before it is buffered.
pub fn check(buf: &[u8], max_frame_bytes: usize) -> Result<Option<FrameHeader>, FrameError> {
    let Some((&[tag, l0, l1, l2, l3], _)) = buf.split_first_chunk::<HEADER_BYTES>() else {
        return Ok(None);
    };
    let length_field = i32::from_be_bytes([l0, l1, l2, l3]);
    let too_small = FrameError::LengthTooSmall {
        tag,
        len: length_field,
    };
    let length = usize::try_from(length_field).map_err(|_| too_small)?;
    if length < MIN_LENGTH_FIELD {
        return Err(too_small);
    }
    let len = length + 1;
    if len > max_frame_bytes {
        return Err(FrameError::TooLarge {
            tag,
            len,
            max: max_frame_bytes,
        });
    }
    Ok((buf.len() >= len).then_some(FrameHeader { tag, len }))
}

/// The body of the frame `header` describes at the start of `buf`.
///
/// # Panics
/// If `header` did not come from [`check`] on this buffer (the frame is not all there).
pub fn body(buf: &[u8], header: FrameHeader) -> &[u8] {
    &buf[HEADER_BYTES..header.len]
}

/// Iterates over the complete frames at the start of a buffer.
///
/// Stops (returns `None`) at an incomplete tail; [`Frames::consumed`] then says how many bytes
/// the yielded frames covered, so the caller can forward or drop exactly those. After an error
/// the iterator yields nothing more and `consumed` stays at the start of the bad frame.
#[derive(Clone, Debug)]
pub struct Frames<'a> {
    buf: &'a [u8],
    consumed: usize,
    max_frame_bytes: usize,
    failed: bool,
}

impl<'a> Frames<'a> {
    /// Frames in `buf`, each at most `max_frame_bytes` long.
    pub fn new(buf: &'a [u8], max_frame_bytes: usize) -> Self {
        Self {
            buf,
            consumed: 0,
            max_frame_bytes,
            failed: false,
        }
    }

    /// Bytes covered by the frames yielded so far.
    pub fn consumed(&self) -> usize {
        self.consumed
    }

    /// The bytes after the frames yielded so far (an incomplete frame, once iteration stops).
    pub fn remainder(&self) -> &'a [u8] {
        &self.buf[self.consumed..]
    }
}

impl<'a> Iterator for Frames<'a> {
    type Item = Result<(FrameHeader, &'a [u8]), FrameError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let buf = self.remainder();
        match check(buf, self.max_frame_bytes) {
            Ok(Some(header)) => {
                self.consumed += header.len;
                Some(Ok((header, body(buf, header))))
            }
            Ok(None) => None,
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

impl std::iter::FusedIterator for Frames<'_> {}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1024;

    #[test]
    fn incomplete_header_and_body() {
        let frame = b"Z\x00\x00\x00\x05I";
        for n in 0..frame.len() {
            assert_eq!(check(&frame[..n], MAX), Ok(None), "prefix of {n} bytes");
        }
        let header = FrameHeader { tag: b'Z', len: 6 };
        assert_eq!(check(frame, MAX), Ok(Some(header)));
        assert_eq!(body(frame, header), b"I");
        assert_eq!(header.body_len(), 1);
    }

    #[test]
    fn empty_body_and_extra_bytes() {
        let buf = b"S\x00\x00\x00\x04Q";
        let header = check(buf, MAX).expect("valid").expect("complete");
        assert_eq!(header, FrameHeader { tag: b'S', len: 5 });
        assert_eq!(body(buf, header), b"");
    }

    #[test]
    fn length_below_four_is_an_error() {
        assert_eq!(
            check(b"Q\x00\x00\x00\x03", MAX),
            Err(FrameError::LengthTooSmall { tag: b'Q', len: 3 })
        );
        assert_eq!(
            check(b"Q\xff\xff\xff\xff", MAX),
            Err(FrameError::LengthTooSmall { tag: b'Q', len: -1 })
        );
    }

    #[test]
    fn size_limit_applies_before_the_body_arrives() {
        // Length 1024 + type byte = 1025 bytes: one more than the limit.
        assert_eq!(
            check(b"Q\x00\x00\x04\x00", MAX),
            Err(FrameError::TooLarge {
                tag: b'Q',
                len: 1025,
                max: MAX
            })
        );
        // Exactly at the limit is fine (and incomplete here).
        assert_eq!(check(b"Q\x00\x00\x03\xff", MAX), Ok(None));
    }

    #[test]
    fn frames_iterates_and_stops_at_incomplete_tail() {
        let buf = b"1\x00\x00\x00\x042\x00\x00\x00\x04C\x00\x00\x00\x0bSELECT\0Z\x00\x00";
        let mut frames = Frames::new(buf, MAX);
        let tags: Vec<(u8, &[u8])> = frames
            .by_ref()
            .map(|f| f.map(|(h, b)| (h.tag, b)).expect("valid frame"))
            .collect();
        assert_eq!(tags, [(b'1', &b""[..]), (b'2', b""), (b'C', b"SELECT\0")]);
        assert_eq!(frames.consumed(), 22);
        assert_eq!(frames.remainder(), b"Z\x00\x00");
        assert!(frames.next().is_none());
    }

    #[test]
    fn frames_fuse_after_an_error() {
        let buf = b"1\x00\x00\x00\x04X\x00\x00\x00\x00Z\x00\x00\x00\x05I";
        let mut frames = Frames::new(buf, MAX);
        assert!(matches!(
            frames.next(),
            Some(Ok((FrameHeader { tag: b'1', len: 5 }, _)))
        ));
        assert_eq!(
            frames.next(),
            Some(Err(FrameError::LengthTooSmall { tag: b'X', len: 0 }))
        );
        assert_eq!(frames.next(), None);
        assert_eq!(frames.consumed(), 5);
    }
}
