//! ErrorResponse (B) and NoticeResponse (B): the fields the router looks at.

use crate::protocol::reader::{DecodeError, Reader};

/// The fields of ErrorResponse (B) or NoticeResponse (B) the router looks at; others are skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ErrorFields<'a> {
    /// Severity, non-localized (`V`) when present, else the possibly localized `S`.
    pub severity: &'a str,
    /// SQLSTATE code (`C`).
    pub code: &'a str,
    /// Primary message (`M`).
    pub message: &'a str,
    /// Detail (`D`).
    pub detail: Option<&'a str>,
    /// Hint (`H`).
    pub hint: Option<&'a str>,
}

impl<'a> ErrorFields<'a> {
    /// Parses the body of an `E` or `N` message.
    pub fn parse(body: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let (mut localized, mut severity, mut code, mut message) = (None, None, None, None);
        let (mut detail, mut hint) = (None, None);
        loop {
            let field = r.u8()?;
            if field == 0 {
                break;
            }
            let value = r.cstr_utf8()?;
            match field {
                b'S' => localized = Some(value),
                b'V' => severity = Some(value),
                b'C' => code = Some(value),
                b'M' => message = Some(value),
                b'D' => detail = Some(value),
                b'H' => hint = Some(value),
                _ => {}
            }
        }
        r.finish()?;
        Ok(Self {
            severity: severity
                .or(localized)
                .ok_or(DecodeError::MissingField(b'S'))?,
            code: code.ok_or(DecodeError::MissingField(b'C'))?,
            message: message.ok_or(DecodeError::MissingField(b'M'))?,
            detail,
            hint,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_fields_fixture() {
        let body = b"SFATAL\0VFATAL\0C28P01\0Mpassword authentication failed for user \"app\"\0\
            Fauth.c\0L326\0Rauth_failed\0\0";
        let e = ErrorFields::parse(body).expect("valid");
        assert_eq!(e.severity, "FATAL");
        assert_eq!(e.code, "28P01");
        assert_eq!(e.message, "password authentication failed for user \"app\"");
        assert_eq!((e.detail, e.hint), (None, None));
        // Localized S only (pre-9.6 servers), detail and hint.
        let e = ErrorFields::parse(b"SFEHLER\0C42P01\0Mnein\0Dd\0Hh\0\0").expect("valid");
        assert_eq!(
            (e.severity, e.detail, e.hint),
            ("FEHLER", Some("d"), Some("h"))
        );
    }

    #[test]
    fn error_fields_errors() {
        assert_eq!(
            ErrorFields::parse(b"SERROR\0C0A000\0\0"),
            Err(DecodeError::MissingField(b'M'))
        );
        assert_eq!(
            ErrorFields::parse(b"SERROR\0Mm\0\0"),
            Err(DecodeError::MissingField(b'C'))
        );
        assert_eq!(
            ErrorFields::parse(b"C0A000\0Mm\0\0"),
            Err(DecodeError::MissingField(b'S'))
        );
        assert_eq!(
            ErrorFields::parse(b"SERROR\0C0A000\0Mm\0"),
            Err(DecodeError::Truncated)
        );
        assert_eq!(ErrorFields::parse(b"SERROR"), Err(DecodeError::MissingNul));
        assert_eq!(
            ErrorFields::parse(b"SERROR\0C0A000\0Mm\0\0\0"),
            Err(DecodeError::TrailingBytes)
        );
    }
}
