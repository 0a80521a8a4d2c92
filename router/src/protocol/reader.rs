//! A cursor over borrowed bytes, for decoding message bodies without copying.
//!
//! Every read either returns a sub-slice of the input (lifetime `'a`, so parsed messages borrow
//! the caller's read buffer) or fails with a [`DecodeError`]; nothing allocates.

use thiserror::Error;

/// Why a message body could not be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// The body ended before a field it must contain.
    #[error("message truncated")]
    Truncated,
    /// A string field has no terminating NUL byte.
    #[error("string field is not NUL-terminated")]
    MissingNul,
    /// A string field is not valid UTF-8.
    #[error("string field is not valid UTF-8")]
    InvalidUtf8,
    /// Bytes remain after the last field of the message.
    #[error("unexpected bytes after the end of the message")]
    TrailingBytes,
    /// A length field is negative (and not the -1 that means "no value").
    #[error("invalid length field {0}")]
    InvalidLength(i32),
    /// A ReadyForQuery status byte other than `I`, `T` or `E`.
    #[error("invalid transaction status byte 0x{0:02x}")]
    InvalidTransactionStatus(u8),
    /// An ErrorResponse or NoticeResponse lacks a field PostgreSQL always sends.
    #[error("error response without the '{}' field", char::from(*.0))]
    MissingField(u8),
}

/// A forward-only cursor over `&'a [u8]`; all integers are big-endian (network order).
#[derive(Clone, Debug)]
pub struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader positioned at the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { rest: buf }
    }

    /// Consumes exactly `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let (head, tail) = self
            .rest
            .split_at_checked(n)
            .ok_or(DecodeError::Truncated)?;
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let (head, tail) = self
            .rest
            .split_first_chunk::<N>()
            .ok_or(DecodeError::Truncated)?;
        self.rest = tail;
        Ok(*head)
    }

    /// Consumes one byte.
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        self.array::<1>().map(|[b]| b)
    }

    /// Consumes a big-endian `u16` (Int16 read as unsigned, e.g. a protocol version half).
    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        self.array().map(u16::from_be_bytes)
    }

    /// Consumes a big-endian `i16` (Int16).
    pub fn i16(&mut self) -> Result<i16, DecodeError> {
        self.array().map(i16::from_be_bytes)
    }

    /// Consumes a big-endian `u32` (Int32 read as unsigned, e.g. codes and process ids).
    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        self.array().map(u32::from_be_bytes)
    }

    /// Consumes a big-endian `i32` (Int32).
    pub fn i32(&mut self) -> Result<i32, DecodeError> {
        self.array().map(i32::from_be_bytes)
    }

    /// Consumes a NUL-terminated string and returns it without the NUL.
    pub fn cstr(&mut self) -> Result<&'a [u8], DecodeError> {
        let nul = self
            .rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::MissingNul)?;
        let s = &self.rest[..nul];
        self.rest = &self.rest[nul + 1..];
        Ok(s)
    }

    /// Consumes a NUL-terminated string that must be UTF-8.
    pub fn cstr_utf8(&mut self) -> Result<&'a str, DecodeError> {
        std::str::from_utf8(self.cstr()?).map_err(|_| DecodeError::InvalidUtf8)
    }

    /// Consumes an Int32 length followed by that many bytes; length -1 means "no value" (`None`).
    pub fn len_prefixed(&mut self) -> Result<Option<&'a [u8]>, DecodeError> {
        match self.i32()? {
            -1 => Ok(None),
            n => {
                let n = usize::try_from(n).map_err(|_| DecodeError::InvalidLength(n))?;
                self.take(n).map(Some)
            }
        }
    }

    /// Consumes and returns everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.rest)
    }

    /// How many bytes are left.
    pub fn remaining(&self) -> usize {
        self.rest.len()
    }

    /// Whether every byte has been consumed.
    pub fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    /// Ends decoding: the message must have been consumed exactly.
    pub fn finish(self) -> Result<(), DecodeError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_are_big_endian() {
        let mut r = Reader::new(&[
            0x01, 0x02, 0x03, 0x04, 0xff, 0xfe, 0x00, 0x00, 0x00, 0x2a, 0xff,
        ]);
        assert_eq!(r.u8(), Ok(0x01));
        assert_eq!(r.u16(), Ok(0x0203));
        assert_eq!(r.i16(), Ok(0x04ff));
        assert_eq!(r.i32(), Ok(-0x0200_0000));
        assert_eq!(r.remaining(), 2);
        assert_eq!(r.u32(), Err(DecodeError::Truncated));
        // A failed read consumes nothing.
        assert_eq!(r.remaining(), 2);
        assert_eq!(r.take(2), Ok(&[0x2a, 0xff][..]));
        assert!(r.is_empty());
        assert_eq!(r.u8(), Err(DecodeError::Truncated));
        assert_eq!(r.take(0), Ok(&[][..]));
        assert_eq!(r.finish(), Ok(()));
    }

    #[test]
    fn u32_and_i32() {
        let mut r = Reader::new(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(r.u32(), Ok(u32::MAX));
        assert_eq!(r.i32(), Ok(-1));
    }

    #[test]
    fn cstr_consumes_the_nul() {
        let mut r = Reader::new(b"user\0\0tail");
        assert_eq!(r.cstr(), Ok(&b"user"[..]));
        assert_eq!(r.cstr_utf8(), Ok(""));
        assert_eq!(r.cstr(), Err(DecodeError::MissingNul));
        assert_eq!(r.rest(), b"tail");
        assert_eq!(r.remaining(), 0);
    }

    #[test]
    fn cstr_utf8_rejects_invalid_utf8() {
        let mut r = Reader::new(b"\xff\xfe\0");
        assert_eq!(r.cstr_utf8(), Err(DecodeError::InvalidUtf8));
    }

    #[test]
    fn len_prefixed_values() {
        let mut r = Reader::new(b"\xff\xff\xff\xff\x00\x00\x00\x02ab\x00\x00\x00\x00");
        assert_eq!(r.len_prefixed(), Ok(None));
        assert_eq!(r.len_prefixed(), Ok(Some(&b"ab"[..])));
        assert_eq!(r.len_prefixed(), Ok(Some(&b""[..])));
        let mut r = Reader::new(b"\xff\xff\xff\xfe");
        assert_eq!(r.len_prefixed(), Err(DecodeError::InvalidLength(-2)));
        let mut r = Reader::new(b"\x00\x00\x00\x05abc");
        assert_eq!(r.len_prefixed(), Err(DecodeError::Truncated));
    }

    #[test]
    fn finish_rejects_trailing_bytes() {
        let mut r = Reader::new(b"ab");
        assert_eq!(r.u8(), Ok(b'a'));
        assert_eq!(r.finish(), Err(DecodeError::TrailingBytes));
    }
}
