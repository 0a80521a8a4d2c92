//! The reload guard: a catalog that still parses but lost its content (an emptied or truncated
//! file, a bad deploy) must not replace the one in force, since that would close every session
//! and then refuse every client.
//!
//! [`Catalog::removed_by`] counts what a newer catalog removes; [`check`] turns the counts and
//! `[reload]` into a verdict. Adding branches or roles and changing verifiers are never refused:
//! only removals count, over the catalog in force.

use super::Catalog;
use crate::config::Reload;

/// What a newer catalog removes from the one in force, counted over the one in force.
///
/// A role is a `(branch, role)` pair: the roles of a removed branch count as removed, a role
/// whose verifier changed does not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Removal {
    /// Branches of the catalog in force that the newer one lacks.
    pub branches_removed: usize,
    /// Branches of the catalog in force.
    pub branches: usize,
    /// Roles of the catalog in force that the newer one lacks.
    pub roles_removed: usize,
    /// Roles of the catalog in force.
    pub roles: usize,
}

/// Why a reload was refused. The Display text says what would be removed, e.g.
/// `removes 3 of 4 branches (75%, more than 50%)`; it names no branch, role or secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The newer catalog has no branches while the one in force has some: refused whatever
    /// `max_removed_percent` says.
    #[error("removes every branch ({0} of {0})")]
    EveryBranch(usize),
    /// The newer catalog has no roles while the one in force has some: nobody could log in.
    /// Refused whatever `max_removed_percent` says, like [`Refusal::EveryBranch`].
    #[error("removes every role ({0} of {0})")]
    EveryRole(usize),
    /// More than `max_removed_percent` of the branches.
    #[error("removes {removed} of {total} branches ({}%, more than {max_percent}%)", percent(*removed, *total))]
    TooManyBranches {
        /// Branches removed.
        removed: usize,
        /// Branches in force.
        total: usize,
        /// `[reload] max_removed_percent`.
        max_percent: u8,
    },
    /// More than `max_removed_percent` of the roles.
    #[error("removes {removed} of {total} roles ({}%, more than {max_percent}%)", percent(*removed, *total))]
    TooManyRoles {
        /// Roles removed.
        removed: usize,
        /// Roles in force.
        total: usize,
        /// `[reload] max_removed_percent`.
        max_percent: u8,
    },
}

/// A reload the guard lets through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Within the limits.
    Apply(Removal),
    /// Beyond them, but forced (`[reload] force = true`, or a one-off `reload --force`).
    Forced(Refusal),
}

impl Catalog {
    /// What replacing `self` (the catalog in force) with `newer` would remove.
    pub fn removed_by(&self, newer: &Catalog) -> Removal {
        let mut removal = Removal {
            branches: self.branches.len(),
            ..Removal::default()
        };
        for old in self.branches() {
            let new = newer.branch(&old.id);
            if new.is_none() {
                removal.branches_removed += 1;
            }
            for (role, _) in old.roles() {
                removal.roles += 1;
                if new.and_then(|b| b.role(role)).is_none() {
                    removal.roles_removed += 1;
                }
            }
        }
        removal
    }
}

impl Removal {
    /// The refusal these removals earn under `max_removed_percent`, if any. Branches are
    /// checked before roles, "every" before "more than".
    pub fn refusal(&self, max_removed_percent: u8) -> Option<Refusal> {
        let over = |removed: usize, total: usize| {
            // removed / total > max / 100, in integers (totals are far below overflow).
            removed.saturating_mul(100) > usize::from(max_removed_percent).saturating_mul(total)
        };
        if self.branches > 0 && self.branches_removed == self.branches {
            Some(Refusal::EveryBranch(self.branches))
        } else if self.roles > 0 && self.roles_removed == self.roles {
            Some(Refusal::EveryRole(self.roles))
        } else if over(self.branches_removed, self.branches) {
            Some(Refusal::TooManyBranches {
                removed: self.branches_removed,
                total: self.branches,
                max_percent: max_removed_percent,
            })
        } else if over(self.roles_removed, self.roles) {
            Some(Refusal::TooManyRoles {
                removed: self.roles_removed,
                total: self.roles,
                max_percent: max_removed_percent,
            })
        } else {
            None
        }
    }
}

/// Whether `newer` may replace `in_force` under `policy`; `force` is a one-off override (as
/// `policy.force` is a standing one).
pub fn check(
    in_force: &Catalog,
    newer: &Catalog,
    policy: &Reload,
    force: bool,
) -> Result<Verdict, Refusal> {
    let removal = in_force.removed_by(newer);
    match removal.refusal(policy.max_removed_percent) {
        None => Ok(Verdict::Apply(removal)),
        Some(refusal) if force || policy.force => Ok(Verdict::Forced(refusal)),
        Some(refusal) => Err(refusal),
    }
}

/// `removed / total` in percent, rounded up, so that a refused share never reads as equal to
/// the limit ("2 of 3 (67%, more than 66%)").
fn percent(removed: usize, total: usize) -> usize {
    if total == 0 {
        return 0;
    }
    removed.saturating_mul(100).div_ceil(total)
}

#[cfg(test)]
mod tests {
    use super::super::tests::{two_branches, V1, V2, V3};
    use super::*;

    const DEFAULT: Reload = Reload {
        max_removed_percent: crate::config::DEFAULT_MAX_REMOVED_PERCENT,
        force: false,
    };

    fn parse(text: &str) -> Catalog {
        Catalog::parse(text, "catalog.toml").expect("test catalog parses")
    }

    /// `n` branches `b0..`, each with roles `app` and `ro`.
    fn branches(n: usize) -> String {
        (0..n)
            .map(|i| {
                format!(
                    "[[branch]]\nid = \"b{i}\"\nprimary = \"127.0.0.1:{}\"\n\
                     [branch.roles]\napp = \"{V1}\"\nro = \"{V2}\"\n",
                    5433 + i
                )
            })
            .collect()
    }

    fn verdict(old: &str, new: &str, policy: Reload, force: bool) -> Result<Verdict, Refusal> {
        check(&parse(old), &parse(new), &policy, force)
    }

    fn refused(old: &str, new: &str, policy: Reload) -> String {
        match verdict(old, new, policy, false) {
            Ok(v) => panic!("expected a refusal, got {v:?}"),
            Err(refusal) => refusal.to_string(),
        }
    }

    #[test]
    fn removed_by_counts_branches_and_their_roles() {
        let old = parse(&two_branches());
        let removal = old.removed_by(&old);
        assert_eq!(
            removal,
            Removal {
                branches_removed: 0,
                branches: 2,
                roles_removed: 0,
                roles: 3,
            }
        );
        // b2 (one role) goes, b1 loses one of its two roles and changes the other's verifier.
        let newer = parse(&format!(
            "[[branch]]\nid = \"b1\"\nprimary = \"127.0.0.1:5433\"\nroles = {{ app = \"{V3}\" }}\n"
        ));
        assert_eq!(
            old.removed_by(&newer),
            Removal {
                branches_removed: 1,
                branches: 2,
                roles_removed: 2,
                roles: 3,
            }
        );
        assert_eq!(
            newer.removed_by(&old).roles_removed,
            0,
            "additions remove nothing"
        );
        assert_eq!(Catalog::default().removed_by(&old), Removal::default());
    }

    #[test]
    fn an_empty_file_is_refused_and_names_the_count() {
        assert_eq!(
            refused(&branches(4), "", DEFAULT),
            "removes every branch (4 of 4)"
        );
        assert_eq!(
            refused(&branches(1), "# nothing left\n", DEFAULT),
            "removes every branch (1 of 1)"
        );
        // Even when the operator allows removing everything else.
        let anything = Reload {
            max_removed_percent: 100,
            force: false,
        };
        assert_eq!(
            refused(&branches(4), "", anything),
            "removes every branch (4 of 4)"
        );
        // An empty catalog in force has nothing to lose.
        assert!(matches!(
            verdict("", &branches(2), DEFAULT, false),
            Ok(Verdict::Apply(_))
        ));
        assert!(matches!(
            verdict("", "", DEFAULT, false),
            Ok(Verdict::Apply(_))
        ));
    }

    #[test]
    fn a_truncated_file_is_refused() {
        // Cut after the first of three branches: its roles survive, two thirds of the rest go.
        let full = branches(3);
        let cut = &full[..full.find("[[branch]]\nid = \"b1\"").expect("second branch")];
        assert_eq!(
            refused(&full, cut, DEFAULT),
            "removes 2 of 3 branches (67%, more than 50%)"
        );
        // Cut inside the roles table: every branch stays, but no role does.
        let roles_cut = full
            .lines()
            .filter(|l| !l.starts_with("app") && !l.starts_with("ro "))
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(
            refused(&full, &roles_cut, DEFAULT),
            "removes every role (6 of 6)"
        );
    }

    #[test]
    fn the_share_is_inclusive_and_configurable() {
        let two = branches(2);
        let one = branches(1);
        // 1 of 2 branches (and 2 of 4 roles) is exactly 50%: allowed at 50.
        assert_eq!(
            verdict(&two, &one, DEFAULT, false),
            Ok(Verdict::Apply(Removal {
                branches_removed: 1,
                branches: 2,
                roles_removed: 2,
                roles: 4,
            }))
        );
        let strict = Reload {
            max_removed_percent: 49,
            force: false,
        };
        assert_eq!(
            refused(&two, &one, strict),
            "removes 1 of 2 branches (50%, more than 49%)"
        );
        let full = branches(3);
        let cut = &full[..full.find("[[branch]]\nid = \"b2\"").expect("third branch")];
        assert_eq!(
            refused(
                &full,
                cut,
                Reload {
                    max_removed_percent: 33,
                    force: false
                }
            ),
            "removes 1 of 3 branches (34%, more than 33%)"
        );
    }

    #[test]
    fn more_than_the_share_of_roles_is_refused() {
        // Every branch stays; three of the four roles go.
        let old = branches(2);
        let new = old.replacen(&format!("ro = \"{V2}\"\n"), "", 2).replacen(
            &format!("app = \"{V1}\"\n"),
            "",
            1,
        );
        assert_eq!(
            refused(&old, &new, DEFAULT),
            "removes 3 of 4 roles (75%, more than 50%)"
        );
    }

    #[test]
    fn additions_and_verifier_changes_are_never_refused() {
        let old = branches(2);
        // Three more branches, one more role on b0, and every `app` verifier changed.
        let new = branches(5).replace(V1, V3).replacen(
            "[branch.roles]\n",
            &format!("[branch.roles]\nextra = \"{V1}\"\n"),
            1,
        );
        let removal = Removal {
            branches_removed: 0,
            branches: 2,
            roles_removed: 0,
            roles: 4,
        };
        let strictest = Reload {
            max_removed_percent: 1,
            force: false,
        };
        assert_eq!(
            verdict(&old, &new, strictest, false),
            Ok(Verdict::Apply(removal))
        );
    }

    #[test]
    fn force_lets_everything_through_and_says_what_it_forced() {
        let forced = Ok(Verdict::Forced(Refusal::EveryBranch(3)));
        assert_eq!(verdict(&branches(3), "", DEFAULT, true), forced);
        let standing = Reload {
            force: true,
            ..DEFAULT
        };
        assert_eq!(verdict(&branches(3), "", standing, false), forced);
        // Forcing a reload the guard allows anyway changes nothing.
        assert!(matches!(
            verdict(&branches(3), &branches(3), DEFAULT, true),
            Ok(Verdict::Apply(_))
        ));
    }

    #[test]
    fn percent_rounds_up() {
        assert_eq!(percent(2, 3), 67);
        assert_eq!(percent(1, 3), 34);
        assert_eq!(percent(3, 4), 75);
        assert_eq!(percent(0, 0), 0);
    }
}
