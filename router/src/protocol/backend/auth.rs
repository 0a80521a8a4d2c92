//! Authentication* (B): the server's authentication requests and outcomes.

use crate::protocol::reader::{DecodeError, Reader};

/// Authentication request codes, the first Int32 of an `R` message body.
pub mod auth_code {
    /// AuthenticationOk.
    pub const OK: u32 = 0;
    /// AuthenticationCleartextPassword.
    pub const CLEARTEXT_PASSWORD: u32 = 3;
    /// AuthenticationMD5Password.
    pub const MD5_PASSWORD: u32 = 5;
    /// AuthenticationSASL.
    pub const SASL: u32 = 10;
    /// AuthenticationSASLContinue.
    pub const SASL_CONTINUE: u32 = 11;
    /// AuthenticationSASLFinal.
    pub const SASL_FINAL: u32 = 12;
}

/// Authentication* (B).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Authentication<'a> {
    /// AuthenticationOk (B).
    Ok,
    /// AuthenticationCleartextPassword (B).
    CleartextPassword,
    /// AuthenticationMD5Password (B).
    Md5Password {
        /// Salt to hash the password with.
        salt: [u8; 4],
    },
    /// AuthenticationSASL (B): the raw mechanism list (NUL-terminated names, then a NUL), already
    /// validated; iterate it with [`sasl_mechanisms`].
    Sasl {
        /// Raw mechanism list.
        mechanisms: &'a [u8],
    },
    /// AuthenticationSASLContinue (B): the server-first-message.
    SaslContinue(&'a [u8]),
    /// AuthenticationSASLFinal (B): the server-final-message.
    SaslFinal(&'a [u8]),
    /// Any other request (Kerberos, GSSAPI, SSPI, ...), by code; the router supports none of them.
    Other(u32),
}

impl<'a> Authentication<'a> {
    /// Parses the body of an `R` message.
    pub fn parse(body: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let auth = match r.u32()? {
            auth_code::OK => Self::Ok,
            auth_code::CLEARTEXT_PASSWORD => Self::CleartextPassword,
            auth_code::MD5_PASSWORD => {
                let mut salt = [0; 4];
                salt.copy_from_slice(r.take(4)?);
                Self::Md5Password { salt }
            }
            auth_code::SASL => {
                let mechanisms = r.rest();
                let mut list = Reader::new(mechanisms);
                while !list.cstr_utf8()?.is_empty() {}
                list.finish()?;
                Self::Sasl { mechanisms }
            }
            auth_code::SASL_CONTINUE => Self::SaslContinue(r.rest()),
            auth_code::SASL_FINAL => Self::SaslFinal(r.rest()),
            other => return Ok(Self::Other(other)),
        };
        r.finish()?;
        Ok(auth)
    }
}

/// The mechanism names in an AuthenticationSASL list; stops at the terminator or at anything
/// malformed.
pub fn sasl_mechanisms(raw: &[u8]) -> impl Iterator<Item = &str> + Clone {
    let mut r = Reader::new(raw);
    std::iter::from_fn(move || r.cstr_utf8().ok().filter(|m| !m.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authentication_fixtures() {
        assert_eq!(Authentication::parse(b"\0\0\0\0"), Ok(Authentication::Ok));
        assert_eq!(
            Authentication::parse(b"\0\0\0\x03"),
            Ok(Authentication::CleartextPassword)
        );
        assert_eq!(
            Authentication::parse(b"\0\0\0\x05\x01\x02\x03\x04"),
            Ok(Authentication::Md5Password { salt: [1, 2, 3, 4] })
        );
        let sasl = b"\0\0\0\x0aSCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0";
        let Ok(Authentication::Sasl { mechanisms }) = Authentication::parse(sasl) else {
            panic!("not AuthenticationSASL");
        };
        let names: Vec<&str> = sasl_mechanisms(mechanisms).collect();
        assert_eq!(names, ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]);
        assert_eq!(
            Authentication::parse(b"\0\0\0\x0br=abc,s=c2FsdA==,i=4096"),
            Ok(Authentication::SaslContinue(b"r=abc,s=c2FsdA==,i=4096"))
        );
        assert_eq!(
            Authentication::parse(b"\0\0\0\x0cv=c2ln"),
            Ok(Authentication::SaslFinal(b"v=c2ln"))
        );
        assert_eq!(
            Authentication::parse(b"\0\0\0\x07"),
            Ok(Authentication::Other(7))
        );
    }

    #[test]
    fn authentication_errors() {
        assert_eq!(
            Authentication::parse(b"\0\0\0"),
            Err(DecodeError::Truncated)
        );
        assert_eq!(
            Authentication::parse(b"\0\0\0\0x"),
            Err(DecodeError::TrailingBytes)
        );
        assert_eq!(
            Authentication::parse(b"\0\0\0\x05\x01\x02"),
            Err(DecodeError::Truncated)
        );
        assert_eq!(
            Authentication::parse(b"\0\0\0\x0aSCRAM-SHA-256\0"),
            Err(DecodeError::MissingNul)
        );
        assert_eq!(
            Authentication::parse(b"\0\0\0\x0aA\0\0B"),
            Err(DecodeError::TrailingBytes)
        );
        assert_eq!(sasl_mechanisms(b"A\0B").collect::<Vec<_>>(), ["A"]);
    }
}
