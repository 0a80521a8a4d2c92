//! SCRAM verifiers from the catalog (`ScramVerifier::parse`) on arbitrary UTF-8: an error, or a
//! verifier that writes back to text that parses to the same verifier.
#![no_main]

use branchgate::auth::verifier::{ScramVerifier, MAX_VERIFIER_ITERATIONS};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match ScramVerifier::parse(text) {
        Ok(verifier) => {
            assert!((1..=MAX_VERIFIER_ITERATIONS).contains(&verifier.iterations));
            assert!(!verifier.salt.is_empty());
            let written = verifier.to_string();
            assert_eq!(ScramVerifier::parse(&written), Ok(verifier.clone()));
            // Debug output never shows the keys.
            let debug = format!("{verifier:?}");
            assert!(!debug.contains(written.rsplit('$').next().expect("keys")));
        }
        // Error text is one of a few fixed messages: it never repeats the (secret) input.
        Err(e) => assert!(e.to_string().len() <= 80, "{e}"),
    }
});
