//! User name parsing: `role.branch_id` or `role.branch_id|replica`.
//!
//! The branch id is the text after the LAST dot, so role names may contain dots
//! (`my.dotted.role.b1`). Branch ids cannot contain `|` or `.`, so a `|` suffix is split off
//! first, at the last `|`.
//!
//! A user name without a dot may take its branch from the TLS server name instead: a client of
//! `b1.db.example.com` (SNI) connecting as `app` is `app.b1`, if `b1` could be a branch id
//! ([`parse_user_or_sni`]). Whether the catalog has it is not asked there: the answer would
//! tell a client which branches exist before it gave a password.

/// The only accepted `|` suffix: route to one of the branch's replicas.
const REPLICA_SUFFIX: &str = "replica";

/// Where a client's user name says to go. Borrows from the startup packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target<'a> {
    /// The PostgreSQL role, as the backend will see it (suffixes stripped).
    pub role: &'a str,
    /// The branch id (text after the last dot).
    pub branch: &'a str,
    /// `true` when the user name ended in `|replica`.
    pub replica: bool,
}

/// Why a user name cannot be routed. Both variants are safe to show to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// No dot, or an empty role or branch id around the last dot.
    #[error(r#"user name must have the form "role.branch_id" (or "role.branch_id|replica")"#)]
    MissingBranch,
    /// A `|` suffix other than `|replica`.
    #[error(r#"unknown user name suffix: only "|replica" is supported"#)]
    UnknownSuffix,
}

/// Splits a startup `user` parameter into role, branch and replica flag, without allocating.
pub fn parse_user(user: &str) -> Result<Target<'_>, RouteError> {
    let (name, replica) = split_suffix(user)?;
    match name.rsplit_once('.') {
        Some((role, branch)) if !role.is_empty() && !branch.is_empty() => Ok(Target {
            role,
            branch,
            replica,
        }),
        _ => Err(RouteError::MissingBranch),
    }
}

/// As [`parse_user`]; but a user name with no dot at all takes its branch from the first label
/// of `sni`, when the server name has more labels after it (`localhost` names no branch) and
/// `may_be_branch` accepts that label. The router passes the branch-id syntax check, not a
/// catalog lookup. Otherwise the user name's own error stands, so a client without a usable
/// server name still learns the expected format.
pub fn parse_user_or_sni<'a>(
    user: &'a str,
    sni: Option<&'a str>,
    may_be_branch: impl FnOnce(&str) -> bool,
) -> Result<Target<'a>, RouteError> {
    let error = match parse_user(user) {
        Err(error @ RouteError::MissingBranch) => error,
        other => return other,
    };
    // parse_user accepted the suffix, so this cannot fail.
    let (role, replica) = split_suffix(user)?;
    let label = sni
        .and_then(|name| name.split_once('.'))
        .map(|(first, _)| first);
    match label {
        Some(branch) if !role.is_empty() && !role.contains('.') && may_be_branch(branch) => {
            Ok(Target {
                role,
                branch,
                replica,
            })
        }
        _ => Err(error),
    }
}

/// Splits off the `|replica` suffix: the name before it and whether it was there.
fn split_suffix(user: &str) -> Result<(&str, bool), RouteError> {
    match user.rsplit_once('|') {
        Some((name, REPLICA_SUFFIX)) => Ok((name, true)),
        Some(_) => Err(RouteError::UnknownSuffix),
        None => Ok((user, false)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(role: &'static str, branch: &'static str, replica: bool) -> Target<'static> {
        Target {
            role,
            branch,
            replica,
        }
    }

    #[test]
    fn role_and_branch() {
        assert_eq!(parse_user("app.b1"), Ok(target("app", "b1", false)));
    }

    #[test]
    fn dotted_role_with_replica_suffix() {
        assert_eq!(
            parse_user("my.dotted.role.b1|replica"),
            Ok(target("my.dotted.role", "b1", true))
        );
    }

    #[test]
    fn missing_branch() {
        for user in ["app", ".b1", "app.", "", ".", "app|replica", "app.|replica"] {
            assert_eq!(parse_user(user), Err(RouteError::MissingBranch), "{user:?}");
        }
        assert_eq!(
            RouteError::MissingBranch.to_string(),
            r#"user name must have the form "role.branch_id" (or "role.branch_id|replica")"#
        );
    }

    #[test]
    fn unknown_suffix() {
        for user in [
            "app.b1|primary",
            "app.b1|",
            "app.b1|replica|x",
            "app.b1|Replica",
        ] {
            assert_eq!(parse_user(user), Err(RouteError::UnknownSuffix), "{user:?}");
        }
    }

    #[test]
    fn branch_from_the_server_name_only_without_a_dot() {
        let known = |b: &str| ["b1", "b2"].contains(&b);
        let sni = Some("b2.db.example.com");
        assert_eq!(
            parse_user_or_sni("app", sni, known),
            Ok(target("app", "b2", false))
        );
        assert_eq!(
            parse_user_or_sni("app|replica", sni, known),
            Ok(target("app", "b2", true))
        );
        // The user name's branch wins; its own errors stand.
        assert_eq!(
            parse_user_or_sni("app.b1", sni, known),
            Ok(target("app", "b1", false))
        );
        for user in ["app.", ".b1", "", "|replica", "app.|replica"] {
            assert_eq!(
                parse_user_or_sni(user, sni, known),
                Err(RouteError::MissingBranch),
                "{user:?}"
            );
        }
        assert_eq!(
            parse_user_or_sni("app|x", sni, known),
            Err(RouteError::UnknownSuffix)
        );
        // No server name, a single label, or a first label that cannot be a branch: the format
        // error.
        for sni in [
            None,
            Some("localhost"),
            Some("b1"),
            Some("b3.db.example.com"),
            Some(""),
        ] {
            assert_eq!(
                parse_user_or_sni("app", sni, known),
                Err(RouteError::MissingBranch),
                "{sni:?}"
            );
        }
    }
}
