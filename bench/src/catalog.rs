//! Catalog fixture: TOML for any number of branches, as an operator's file would look.

use std::fmt::Write as _;

use branchgate::auth::verifier::{ScramVerifier, VerifierShape};

/// The roles every generated branch has; the second shows that roles may contain dots.
pub const ROLES: [&str; 2] = ["app", "my.dotted.role"];

/// Seed for the mock verifiers: they parse like real ones without costing PBKDF2 each.
const VERIFIER_SEED: [u8; 32] = [0x5a; 32];

/// The id of generated branch `i`.
pub fn branch_id(i: usize) -> String {
    format!("br_{i:05}")
}

/// A catalog of `branches` branches: a primary, one replica and the [`ROLES`], each with its
/// own verifier.
pub fn catalog_toml(branches: usize) -> String {
    let mut text = String::with_capacity(branches * 400);
    for i in 0..branches {
        let (hi, lo) = (i / 250, i % 250 + 1);
        let id = branch_id(i);
        // Writing to a String cannot fail.
        let _ = writeln!(
            text,
            "[[branch]]\nid = \"{id}\"\nprimary = \"10.1.{hi}.{lo}:5432\"\n\
             replicas = [\"10.2.{hi}.{lo}:5432\"]\n[branch.roles]"
        );
        for role in ROLES {
            let verifier = ScramVerifier::mock(&id, role, VerifierShape::DEFAULT, &VERIFIER_SEED);
            let _ = writeln!(text, "\"{role}\" = \"{verifier}\"");
        }
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use branchgate::catalog::Catalog;

    #[test]
    fn generated_catalog_parses() {
        let catalog = Catalog::parse(&catalog_toml(1000), "bench.toml").expect("valid catalog");
        assert_eq!(catalog.branches().len(), 1000);
        let last = catalog.branch(&branch_id(999)).expect("last branch");
        assert_eq!(last.primary.to_string(), "10.1.3.250:5432");
        assert_eq!(last.replicas.len(), 1);
        for role in ROLES {
            assert!(last.role(role).is_some(), "{role}");
        }
        let first = catalog.branch(&branch_id(0)).expect("first branch");
        assert_ne!(
            first.role("app").expect("role").stored_key,
            last.role("app").expect("role").stored_key
        );
        assert!(catalog.branch("br_01000").is_none());
    }
}
