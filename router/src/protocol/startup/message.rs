//! StartupMessage (F): protocol version and the parameter list, borrowed from the read buffer.

use super::StartupError;
use crate::protocol::reader::{DecodeError, Reader};

/// Name prefix of protocol extension options (`_pq_.name`), answered in NegotiateProtocolVersion.
const PROTOCOL_OPTION_PREFIX: &str = "_pq_.";

/// StartupMessage (F), borrowing its parameter list from the read buffer.
///
/// A parameter may appear twice; as in PostgreSQL the last occurrence wins in [`Self::get`].
/// Whoever rewrites the list (e.g. `user`) must replace every occurrence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StartupMessage<'a> {
    /// Protocol major version (always 3 once parsed).
    pub major: u16,
    /// Protocol minor version; above 0 the server answers NegotiateProtocolVersion.
    pub minor: u16,
    /// Name/value pairs of NUL-terminated strings and the final NUL, validated once.
    params: &'a [u8],
}

impl<'a> StartupMessage<'a> {
    /// Validates the parameter list once, so the accessors can iterate without error handling.
    pub(super) fn parse(major: u16, minor: u16, params: &'a [u8]) -> Result<Self, StartupError> {
        validate_params(params)?;
        Ok(Self {
            major,
            minor,
            params,
        })
    }

    /// The parameters in the order the client sent them.
    pub fn params(&self) -> impl Iterator<Item = (&'a str, &'a str)> + Clone + 'a {
        let mut r = Reader::new(self.params);
        // Validated at parse time, so a decode failure can only mean the end of the list.
        std::iter::from_fn(move || {
            let name = r.cstr_utf8().ok().filter(|n| !n.is_empty())?;
            Some((name, r.cstr_utf8().ok()?))
        })
    }

    /// The value of parameter `name` (the last one if repeated, as PostgreSQL does).
    pub fn get(&self, name: &str) -> Option<&'a str> {
        self.params()
            .filter(|&(n, _)| n == name)
            .map(|(_, v)| v)
            .last()
    }

    /// The `user` parameter.
    pub fn user(&self) -> Option<&'a str> {
        self.get("user")
    }

    /// The `database` parameter (PostgreSQL defaults it to the user name when absent).
    pub fn database(&self) -> Option<&'a str> {
        self.get("database")
    }

    /// Names of the protocol extension options (`_pq_.*`) the client asked for.
    pub fn protocol_options(&self) -> impl Iterator<Item = &'a str> + Clone + 'a {
        self.params()
            .map(|(n, _)| n)
            .filter(|n| n.starts_with(PROTOCOL_OPTION_PREFIX))
    }

    /// The raw parameter section: pairs of NUL-terminated strings and the final NUL.
    pub fn params_bytes(&self) -> &'a [u8] {
        self.params
    }
}

fn validate_params(params: &[u8]) -> Result<(), StartupError> {
    let mut r = Reader::new(params);
    loop {
        let name = match r.cstr_utf8() {
            Ok(name) => name,
            Err(DecodeError::MissingNul) => {
                return Err(StartupError::Malformed("expected terminator as last byte"))
            }
            Err(e) => return Err(e.into()),
        };
        if name.is_empty() {
            return r
                .finish()
                .map_err(|_| StartupError::Malformed("bytes after terminator"));
        }
        match r.cstr_utf8() {
            Ok(_) => {}
            Err(DecodeError::MissingNul) => {
                return Err(StartupError::Malformed("parameter without a value"))
            }
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(params: &[u8]) -> Result<StartupMessage<'_>, StartupError> {
        StartupMessage::parse(3, 0, params)
    }

    #[test]
    fn repeated_parameter_last_wins_and_empty_values() {
        let m = message(b"user\0a\0options\0\0user\0b\0\0").expect("valid");
        assert_eq!(m.user(), Some("b"));
        assert_eq!(m.get("options"), Some(""));
        let m = message(b"\0").expect("empty list is valid");
        assert_eq!(m.params().next(), None);
        assert_eq!(m.user(), None);
    }

    #[test]
    fn malformed_parameter_lists() {
        let cases: [(&[u8], StartupError); 7] = [
            (
                b"",
                StartupError::Malformed("expected terminator as last byte"),
            ),
            (
                b"user\0bob\0",
                StartupError::Malformed("expected terminator as last byte"),
            ),
            (
                b"user\0bob",
                StartupError::Malformed("parameter without a value"),
            ),
            (
                b"user\0",
                StartupError::Malformed("parameter without a value"),
            ),
            (
                b"user\0bob\0\0x",
                StartupError::Malformed("bytes after terminator"),
            ),
            (b"\0\0", StartupError::Malformed("bytes after terminator")),
            (
                b"user\0\xff\0\0",
                StartupError::Decode(DecodeError::InvalidUtf8),
            ),
        ];
        for (params, want) in cases {
            assert_eq!(message(params), Err(want), "{params:?}");
        }
    }
}
