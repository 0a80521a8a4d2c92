//! User name routing (route.rs): `parse_user` and `parse_user_or_sni` on arbitrary UTF-8.
//!
//! Input: a flags byte, then the user name and the server name separated by a 0xff byte (which
//! UTF-8 never contains). Flags: bit 0, a server name was sent; bits 1-2, which labels are
//! branches (none, all, or those of the catalog's form).
#![no_main]

use branchgate::route::{parse_user, parse_user_or_sni, RouteError, Target};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let (user, sni) = match rest.iter().position(|&b| b == 0xff) {
        Some(at) => (&rest[..at], &rest[at + 1..]),
        None => (rest, &[][..]),
    };
    let (Ok(user), Ok(sni)) = (std::str::from_utf8(user), std::str::from_utf8(sni)) else {
        return;
    };
    let sni = (flags & 1 != 0).then_some(sni);
    let is_branch = |label: &str| match (flags >> 1) & 3 {
        0 => false,
        1 => true,
        _ => {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-'))
        }
    };

    let own = parse_user(user);
    if let Ok(target) = own {
        assert_eq!(rebuild(target), user, "parse_user lost part of the name");
        assert!(!target.branch.contains('.'));
    }
    let routed = parse_user_or_sni(user, sni, is_branch);
    match (own, routed) {
        // The user name's own branch, or its own error other than a missing branch, wins.
        (Ok(_), _) | (Err(RouteError::UnknownSuffix), _) => assert_eq!(routed, own),
        (Err(RouteError::MissingBranch), Ok(target)) => {
            let sni = sni.expect("a branch from the server name needs one");
            assert!(is_branch(target.branch));
            assert!(sni.split('.').next() == Some(target.branch));
            assert!(!target.role.is_empty() && !target.role.contains('.'));
            let suffix = if target.replica { "|replica" } else { "" };
            assert_eq!(format!("{}{suffix}", target.role), user);
        }
        (Err(RouteError::MissingBranch), Err(e)) => assert_eq!(e, RouteError::MissingBranch),
    }
});

/// The user name a target was parsed from.
fn rebuild(target: Target<'_>) -> String {
    assert!(!target.role.is_empty() && !target.branch.is_empty());
    let suffix = if target.replica { "|replica" } else { "" };
    format!("{}.{}{suffix}", target.role, target.branch)
}
