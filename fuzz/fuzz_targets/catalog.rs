//! The branch catalog (`Catalog::parse`) on arbitrary UTF-8: an error with a line number, or a
//! catalog whose lookups agree with its branch list. Never a panic.
#![no_main]

use branchgate::catalog::Catalog;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Catalog::parse(text, "catalog.toml") {
        Ok(catalog) => {
            for branch in catalog.branches() {
                let found = catalog.branch(&branch.id).expect("listed branch is found");
                assert!(std::sync::Arc::ptr_eq(found, branch));
                for (name, verifier) in branch.roles() {
                    assert_eq!(branch.role(name), Some(verifier));
                    assert!(!name.contains('|'));
                }
                let _ = format!("{branch:?}");
            }
            assert!(catalog.changed_roles(&catalog).is_empty());
            assert_eq!(
                catalog.changed_roles(&Catalog::default()).len(),
                catalog.branches().map(|b| b.roles().count()).sum::<usize>()
            );
        }
        Err(e) => {
            let message = e.to_string();
            assert!(message.starts_with("catalog.toml:"), "{message}");
        }
    }
});
