//! The router configuration (`Config::parse`) on arbitrary UTF-8: an error with a line number,
//! or a config whose invariants hold. Never a panic.
#![no_main]

use std::path::Path;

use branchgate::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let base = Path::new("/etc/branchgate");
    match Config::parse(text, base, "router.toml") {
        Ok(config) => {
            assert!(!config.timeouts.startup.is_zero());
            assert!(!config.timeouts.connect.is_zero());
            assert!(!config.timeouts.health_check_interval.is_zero());
            let _ = format!("{config:?}");
        }
        Err(e) => {
            let message = e.to_string();
            assert!(message.starts_with("router.toml:"), "{message}");
        }
    }
});
