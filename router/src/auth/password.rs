//! Generated role passwords: `pscale_pw_` followed by 43 random letters and digits.
//!
//! 43 characters from a 62-symbol alphabet carry 43 * log2(62) = 256.03 bits, drawn from the
//! operating system's generator. Letters and digits only, so a password can be pasted into a
//! connection URI or a shell without quoting, and SASLprep leaves it unchanged.

use rand::distributions::Alphanumeric;
use rand::rngs::OsRng;
use rand::Rng;

/// Prefix of every generated password; lets secret scanners recognise a leaked one.
pub const PASSWORD_PREFIX: &str = "pscale_pw_";
/// Random characters after the prefix (256 bits of entropy, see the module docs).
pub const PASSWORD_RANDOM_CHARS: usize = 43;

/// A new random password, `pscale_pw_` + 43 characters of `[A-Za-z0-9]`.
pub fn generate_password() -> String {
    let mut password = String::with_capacity(PASSWORD_PREFIX.len() + PASSWORD_RANDOM_CHARS);
    password.push_str(PASSWORD_PREFIX);
    // Alphanumeric samples by rejection, so every symbol is equally likely.
    password.extend(
        OsRng
            .sample_iter(Alphanumeric)
            .take(PASSWORD_RANDOM_CHARS)
            .map(char::from),
    );
    password
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_and_uniqueness() {
        let a = generate_password();
        let b = generate_password();
        assert_ne!(a, b);
        for p in [&a, &b] {
            assert_eq!(p.len(), 53);
            let random = p.strip_prefix("pscale_pw_").expect("has the prefix");
            assert!(random.bytes().all(|c| c.is_ascii_alphanumeric()), "{p}");
        }
    }

    #[test]
    fn uses_the_whole_alphabet() {
        // 200 passwords hold 8600 symbols: all 62 appear unless sampling is broken.
        let mut seen = [false; 128];
        for _ in 0..200 {
            for c in generate_password()[PASSWORD_PREFIX.len()..].bytes() {
                seen[usize::from(c)] = true;
            }
        }
        assert_eq!(seen.iter().filter(|s| **s).count(), 62);
    }
}
