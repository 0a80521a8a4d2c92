//! The secret behind fake SCRAM exchanges ([`super::ScramVerifier::mock`]).
//!
//! A client that names a role or branch that does not exist still gets a SCRAM exchange, with a
//! salt derived from this secret and the names it gave. For that to reveal nothing, the fake salt
//! must behave like a real one: the same every time, across restarts and across every router
//! behind one address. So the secret is a file the operator keeps (and copies to every router
//! node), created with 32 random bytes on first start. Anyone who reads it can tell real roles
//! from fake ones, so it is written owner-only.
//!
//! The format is 64 hex digits and a newline.

use std::fs::OpenOptions;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rand::rngs::OsRng;
use rand::RngCore;

/// Bytes of secret.
pub const MOCK_SECRET_LEN: usize = 32;

/// The secret, as loaded.
pub type MockSecret = [u8; MOCK_SECRET_LEN];

/// Why the secret file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum MockSecretError {
    /// Reading or creating the file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file exists but does not hold 64 hex digits.
    #[error("{}: expected 64 hex digits (the fake-SCRAM secret); remove the file to make a new one", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
    },
}

/// Reads the secret from `path`; if there is no such file, writes a new random one there
/// (mode 0600, never replacing a file another process created meanwhile) and returns it.
pub fn load_or_create(path: &Path) -> Result<MockSecret, MockSecretError> {
    match load(path) {
        Err(MockSecretError::Io { source, .. }) if source.kind() == ErrorKind::NotFound => {}
        other => return other,
    }
    let mut secret = [0u8; MOCK_SECRET_LEN];
    OsRng.fill_bytes(&mut secret);
    let io = |source| MockSecretError::Io {
        path: path.to_owned(),
        source,
    };
    let created = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path);
    match created {
        Ok(mut file) => {
            file.write_all(format!("{}\n", hex(&secret)).as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(io)?;
            tracing::info!(path = %path.display(), "created the fake-SCRAM secret; copy it to every router of this catalog");
            Ok(secret)
        }
        // Another router starting beside this one was first: use its secret.
        Err(e) if e.kind() == ErrorKind::AlreadyExists => load(path),
        Err(e) => Err(io(e)),
    }
}

/// Reads the secret from `path` (no file: an I/O error `NotFound`).
pub fn load(path: &Path) -> Result<MockSecret, MockSecretError> {
    let text = std::fs::read_to_string(path).map_err(|source| MockSecretError::Io {
        path: path.to_owned(),
        source,
    })?;
    parse_hex(text.trim_end()).ok_or_else(|| MockSecretError::Malformed {
        path: path.to_owned(),
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_hex(text: &str) -> Option<MockSecret> {
    let digits = text.as_bytes();
    if digits.len() != 2 * MOCK_SECRET_LEN {
        return None;
    }
    let mut secret = [0u8; MOCK_SECRET_LEN];
    for (byte, pair) in secret.iter_mut().zip(digits.chunks_exact(2)) {
        let pair = std::str::from_utf8(pair).ok()?;
        *byte = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(secret)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn created_once_then_read_back() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("mock.secret");
        let first = load_or_create(&path).expect("created");
        let mode = std::fs::metadata(&path).expect("file").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "owner only");
        assert_eq!(load_or_create(&path).expect("read"), first, "stable");
        assert_eq!(load(&path).expect("read"), first);
        let text = std::fs::read_to_string(&path).expect("text");
        assert_eq!(text.len(), 65);
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn malformed_files_are_refused_not_replaced() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("mock.secret");
        for text in ["", "abc\n", &"zz".repeat(32), &"00".repeat(33)] {
            std::fs::write(&path, text).expect("write");
            let e = load_or_create(&path).expect_err("malformed");
            assert!(matches!(e, MockSecretError::Malformed { .. }), "{e}");
            assert_eq!(std::fs::read_to_string(&path).expect("kept"), text);
        }
        std::fs::write(&path, format!("{}\n", "0A".repeat(32))).expect("write");
        assert_eq!(load(&path).expect("upper case hex"), [0x0a; 32]);
        let missing = dir.path().join("nowhere").join("mock.secret");
        assert!(matches!(
            load_or_create(&missing),
            Err(MockSecretError::Io { .. })
        ));
    }
}
