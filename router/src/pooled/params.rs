//! Session parameters on the pooled port: what each client believes its session's parameters
//! are, what each backend's are, and the `SET`s that make a backend match its client.
//!
//! A client's view starts from the parameters a backend of its pool reported at startup (its
//! ParameterStatus set, shared by every client of the pool until one differs) with what the
//! client's StartupMessage asked for on top, and follows every ParameterStatus the backend
//! sends while the client holds it (its own `SET`s). Parameters PostgreSQL does not report
//! (`search_path`, `statement_timeout` given at startup) are applied from the StartupMessage
//! and followed through the client's statements: a `SET` or `RESET` of one is read back from
//! the backend when its transaction ends ([`readback`](super::readback)).
//!
//! Values are compared as the server reports them. The router sets them with
//! `pg_catalog.set_config`, which reads a value as a StartupMessage gives it (`SET` would read
//! `search_path = 'a, b'` as one schema), from `E'...'` literals, which read the same whatever
//! `standard_conforming_strings` says.

use std::rc::Rc;

use crate::protocol::reader::Reader;

/// Reported parameters that no session can change: never `SET`, never compared.
const READ_ONLY: &[&str] = &[
    "in_hot_standby",
    "integer_datetimes",
    "is_superuser",
    "server_encoding",
    "server_version",
];

/// Unreported parameters one pooled client may have (its startup ones and its `SET`s); more
/// end its session with 54000.
pub const MAX_UNREPORTED: usize = 256;
/// Bytes of names and values of one pooled client's unreported parameters, at most.
pub const MAX_UNREPORTED_BYTES: usize = 64 * 1024;

/// StartupMessage parameters that are not run-time parameters.
const NOT_SETTINGS: &[&str] = &["user", "database", "replication", "options"];

/// Name/value pairs sorted by name (parameter names compare without case, as PostgreSQL's).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Params(Vec<(Box<str>, Box<str>)>);

fn cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let lower = |c: u8| c.to_ascii_lowercase();
    a.bytes().map(lower).cmp(b.bytes().map(lower))
}

impl Params {
    fn find(&self, name: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(n, _)| cmp(n, name))
    }

    /// The value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.find(name).ok().map(|i| &*self.0[i].1)
    }

    /// Sets `name` to `value`.
    pub fn set(&mut self, name: &str, value: &str) {
        match self.find(name) {
            Ok(i) => {
                if *self.0[i].1 != *value {
                    self.0[i].1 = value.into();
                }
            }
            Err(i) => self.0.insert(i, (name.into(), value.into())),
        }
    }

    /// Removes `name`.
    pub fn remove(&mut self, name: &str) {
        if let Ok(i) = self.find(name) {
            self.0.remove(i);
        }
    }

    /// The pairs, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(n, v)| (&**n, &**v))
    }

    /// Number of parameters.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True if there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// True for a reported parameter a session may change.
pub fn settable(name: &str) -> bool {
    !READ_ONLY.iter().any(|r| r.eq_ignore_ascii_case(name))
}

/// Parameters whose value PostgreSQL checks against the catalog or the role's grants when it
/// is set (their check hooks look the role, tablespace, text search configuration or access
/// method up): a value one backend took may be refused on the next once the object is dropped
/// or the grant revoked. The client's statements wait for them to be given (one round trip);
/// every other value was taken by a backend of the same pool and is pipelined with them.
const CHECKED_AGAINST_CATALOG: [&str; 6] = [
    "role",
    "session_authorization",
    "default_tablespace",
    "temp_tablespaces",
    "default_text_search_config",
    "default_table_access_method",
];

/// True for `role = none`: no role of its own, where every backend starts (a client too,
/// unless its StartupMessage gave one).
fn no_role(name: &str, value: &str) -> bool {
    name.eq_ignore_ascii_case("role") && value.eq_ignore_ascii_case("none")
}

fn checked_against_catalog(name: &str) -> bool {
    CHECKED_AGAINST_CATALOG
        .iter()
        .any(|n| n.eq_ignore_ascii_case(name))
}

/// What [`BackendParams::sync_to`] gave a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Synced {
    /// Nothing: it had the client's parameters.
    Nothing,
    /// `SET`s the client's statements may follow at once.
    Pipelined,
    /// `SET`s of a [`CHECKED_AGAINST_CATALOG`] parameter: the client's statements wait for
    /// their answer, so none runs with the backend's value if the backend refuses it.
    AnswerFirst,
}

impl Synced {
    /// True if `SET`s were appended.
    pub fn any(self) -> bool {
        self != Synced::Nothing
    }
}

/// What one client believes its session's parameters are.
#[derive(Debug)]
pub struct ClientParams {
    /// The pool's startup set, shared.
    base: Rc<Params>,
    /// Reported parameters where the client differs from `base`.
    changed: Params,
    /// Parameters from the StartupMessage that the server does not report.
    unreported: Params,
    /// Parameters the StartupMessage set, reported or not: the session's defaults, what a
    /// RESET goes back to.
    startup: Params,
}

impl ClientParams {
    /// The view of a client that asked for `startup` (its StartupMessage parameters) on a
    /// pool whose backends start with `base`.
    pub fn new<'a>(base: Rc<Params>, startup: impl Iterator<Item = (&'a str, &'a str)>) -> Self {
        let mut params = ClientParams {
            base,
            changed: Params::default(),
            unreported: Params::default(),
            startup: Params::default(),
        };
        for (name, value) in startup {
            if NOT_SETTINGS.contains(&name) || name.starts_with("_pq_.") || !settable(name) {
                continue;
            }
            if params.base.get(name).is_some() {
                params.reported(name, value);
            } else {
                params.unreported.set(name, value);
            }
            params.startup.set(name, value);
        }
        // Kept for the client's life: no spare room (a Vec grows to 4 pairs, 128 bytes, at once).
        for set in [
            &mut params.changed,
            &mut params.unreported,
            &mut params.startup,
        ] {
            set.0.shrink_to_fit();
        }
        params
    }

    /// The parameters the client's StartupMessage set, as it wrote them (sorted by name).
    pub fn startup(&self) -> &Params {
        &self.startup
    }

    /// The server read the client's StartupMessage values (in the order of
    /// [`ClientParams::startup`]) as `values` (`iso` is `ISO, MDY`): the client sees those, as
    /// from PostgreSQL, and a RESET goes back to them.
    pub fn startup_read_as(&mut self, values: &[Box<str>]) {
        let mut startup = std::mem::take(&mut self.startup);
        for ((name, value), read) in startup.0.iter_mut().zip(values) {
            if self.base.get(name).is_some() {
                self.reported(name, read);
            } else {
                self.unreported.set(name, read);
            }
            if *value != *read {
                *value = read.clone();
            }
        }
        self.startup = startup;
    }

    /// The backend reported `name = value` while this client held it.
    pub fn reported(&mut self, name: &str, value: &str) {
        if self.base.get(name) == Some(value) {
            self.changed.remove(name);
        } else {
            self.changed.set(name, value);
        }
    }

    /// The session's parameters went back to their defaults (DISCARD ALL, RESET ALL): for
    /// the client, the ones its StartupMessage set, as on a real server, but for the role and
    /// the session authorization if `keep_role` (`RESET ALL` leaves them). Returns the
    /// reported parameters whose value the client now sees change (a server reports each).
    pub fn reset_to_startup(&mut self, keep_role: bool) -> Vec<(Box<str>, Box<str>)> {
        let before: Vec<(Box<str>, Box<str>)> = self
            .reported_view()
            .map(|(n, v)| (n.into(), v.into()))
            .collect();
        let role: Option<Box<str>> = self.unreported.get("role").map(Into::into);
        let authorization: Option<Box<str>> =
            self.changed.get("session_authorization").map(Into::into);
        self.changed = Params::default();
        self.unreported = Params::default();
        let startup = std::mem::take(&mut self.startup);
        for (name, value) in startup.iter() {
            if self.base.get(name).is_some() {
                self.reported(name, value);
            } else {
                self.unreported.set(name, value);
            }
        }
        self.startup = startup;
        if keep_role {
            // None is no role of its own, which `set_unreported` keeps as such.
            self.set_unreported("role", Some(role.as_deref().unwrap_or("none")));
            if let Some(authorization) = authorization {
                self.reported("session_authorization", &authorization);
            }
        }
        before
            .into_iter()
            .filter(|(name, value)| self.get(name) != Some(&**value))
            .filter_map(|(name, _)| {
                let now: Box<str> = self.get(&name)?.into();
                Some((name, now))
            })
            .collect()
    }

    /// The backend reported `name = value` after a statement that may have sent `name` back
    /// to its session default (`RESET name`, `SET name TO DEFAULT`). If `value` is the pool's
    /// default and the client's StartupMessage set `name`, it was that reset: the backend went
    /// to its own default, where a real server goes to the client's startup value, so that is
    /// what the client now has. Returns None if the report is not such a reset (it is the
    /// client's, as any other), else the value the client is to be told of, if it changed.
    pub fn reset_reported(&mut self, name: &str, value: &str) -> Option<Option<Box<str>>> {
        let startup: Box<str> = self.startup.get(name)?.into();
        if self.base.get(name) != Some(value) {
            return None;
        }
        let changed = self.get(name) != Some(&*startup);
        self.reported(name, &startup);
        Some(changed.then_some(startup))
    }

    /// The client's own `SET` gave unreported parameter `name` the value `value` (read back
    /// from its backend), or left it without one (`None`).
    pub fn set_unreported(&mut self, name: &str, value: Option<&str>) {
        match value {
            // No role is the default: kept only against a role the client started with.
            Some(value) if !no_role(name, value) || self.startup.get("role").is_some() => {
                self.unreported.set(name, value)
            }
            _ => self.unreported.remove(name),
        }
    }

    /// The backend's session was read whole after the client's transaction: `settings` are
    /// the unreported parameters it gave values (all of them). The client has those, and its
    /// startup value of any other it started with (the backend's default for it is the pool's,
    /// a real server's would be the client's).
    pub fn audited(&mut self, settings: &[(&str, &str)]) {
        let mut unreported = Params::default();
        for (name, value) in settings {
            // No role is the default: kept only against a role the client started with.
            if no_role(name, value) && self.startup.get("role").is_none() {
                continue;
            }
            unreported.set(name, value);
        }
        let read: Vec<&str> = settings.iter().map(|(name, _)| *name).collect();
        for (name, value) in self.startup.iter() {
            if read.iter().any(|r| r.eq_ignore_ascii_case(name)) {
                continue;
            }
            if self.base.get(name).is_none() && unreported.get(name).is_none() {
                unreported.set(name, value);
            }
        }
        self.unreported = unreported;
    }

    /// The unreported parameters the client has values of its own for.
    pub fn unreported_names(&self) -> impl Iterator<Item = &str> {
        self.unreported.iter().map(|(name, _)| name)
    }

    /// True if the client's unreported parameters are more than the pooled port keeps for one
    /// client ([`MAX_UNREPORTED`] names, [`MAX_UNREPORTED_BYTES`] of names and values): each
    /// is kept for the client and for every backend given it.
    pub fn too_many_unreported(&self) -> bool {
        self.unreported.len() > MAX_UNREPORTED
            || self
                .unreported
                .iter()
                .map(|(n, v)| n.len() + v.len())
                .sum::<usize>()
                > MAX_UNREPORTED_BYTES
    }

    /// A statement may have sent unreported parameter `name` back to its session default:
    /// for the client, its startup value (or none).
    pub fn reset_unreported(&mut self, name: &str) {
        if self.base.get(name).is_some() {
            return;
        }
        match self.startup.get(name) {
            Some(value) => {
                let value: Box<str> = value.into();
                self.unreported.set(name, &value);
            }
            None => self.unreported.remove(name),
        }
    }

    /// True if `name` is a parameter the backends report (ParameterStatus).
    pub fn is_reported(&self, name: &str) -> bool {
        self.base.get(name).is_some()
    }

    /// The value the client believes `name` has, for reported parameters.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.changed.get(name).or_else(|| self.base.get(name))
    }

    /// The value of its own the client has for `name`, reported or not (given at startup, or
    /// set since); `None` if it has the pool's.
    pub fn own(&self, name: &str) -> Option<&str> {
        self.changed.get(name).or_else(|| self.unreported.get(name))
    }

    /// The role the client's statements run as if it is not its login role (`SET ROLE`, or a
    /// `role` its StartupMessage gave).
    pub fn set_role(&self) -> Option<&str> {
        self.unreported
            .get("role")
            .filter(|role| !no_role("role", role))
    }

    /// Every reported parameter the client knows, as it believes them (for its login).
    pub fn reported_view(&self) -> impl Iterator<Item = (&str, &str)> {
        let changed = self.changed.iter();
        let base = self
            .base
            .iter()
            .filter(|(name, _)| self.changed.get(name).is_none());
        let mut all: Vec<(&str, &str)> = changed.chain(base).collect();
        all.sort_by(|a, b| cmp(a.0, b.0));
        all.into_iter()
    }
}

/// What one backend's session parameters are.
#[derive(Clone, Debug, Default)]
pub struct BackendParams {
    /// Everything it reported.
    reported: Params,
    /// Unreported parameters the router set on it for a client.
    unreported: Params,
    /// The client view it was last given, while nothing it reported since can have changed
    /// it: a client with the same view needs nothing (most clients of a pool have the same
    /// view, so most transactions skip the comparison).
    given: Option<View>,
}

/// A client's view of its parameters, as the backend was given it.
#[derive(Clone, Debug)]
struct View {
    base: Rc<Params>,
    changed: Params,
    unreported: Params,
}

impl BackendParams {
    /// A backend that reported `reported` at startup.
    pub fn new(reported: Params) -> Self {
        BackendParams {
            reported,
            ..BackendParams::default()
        }
    }

    /// The backend reported `name = value` (ParameterStatus).
    pub fn reported(&mut self, name: &str, value: &str) {
        self.reported.set(name, value);
        self.given = None;
    }

    /// The router gave the backend a client's StartupMessage value of `name`, which the server
    /// read as `value` (a parameter it reports if `reported`).
    pub fn startup_value(&mut self, name: &str, value: &str, reported: bool) {
        if reported {
            self.reported(name, value);
        } else {
            self.set_unreported(name, Some(value));
        }
    }

    /// The backend's session went back to its defaults (DISCARD ALL, RESET ALL), but for
    /// the role if `keep_role` (`RESET ALL` leaves it).
    pub fn reset(&mut self, keep_role: bool) {
        let role: Option<Box<str>> = self.unreported.get("role").map(Into::into);
        self.unreported = Params::default();
        if let (true, Some(role)) = (keep_role, role) {
            self.unreported.set("role", &role);
        }
        self.given = None;
    }

    /// Unreported parameter `name` has `value` on this backend (read back after a client's
    /// `SET`), or the value the server starts with (`None`).
    pub fn set_unreported(&mut self, name: &str, value: Option<&str>) {
        match value {
            // No role is where a backend starts.
            Some(value) if !no_role(name, value) => self.unreported.set(name, value),
            _ => self.unreported.remove(name),
        }
        self.given = None;
    }

    /// The unreported parameters the router set on it.
    pub fn unreported_names(&self) -> impl Iterator<Item = &str> {
        self.unreported.iter().map(|(name, _)| name)
    }

    /// The backend's session was read whole: `settings` are the unreported parameters it
    /// has values of its own for (all of them).
    pub fn audited(&mut self, settings: &[(&str, &str)]) {
        let mut unreported = Params::default();
        for (name, value) in settings {
            // No role is where a backend starts.
            if !no_role(name, value) {
                unreported.set(name, value);
            }
        }
        self.unreported = unreported;
        self.given = None;
    }

    /// A statement may have sent unreported parameter `name` back to its default: the router
    /// no longer knows its value. True if it had set it.
    pub fn forget_unreported(&mut self, name: &str) -> bool {
        if self.unreported.get(name).is_none() {
            return false;
        }
        self.unreported.remove(name);
        self.given = None;
        true
    }

    /// Appends to `sql` the `SET`s (and `RESET`s) that give this backend `client`'s
    /// parameters, and records them as applied (until the `SET`s are answered, the router
    /// assumes they take: an error in them ends the client's session and closes the backend).
    pub fn sync_to(&mut self, client: &ClientParams, sql: &mut String) -> Synced {
        if self.given.as_ref().is_some_and(|given| {
            Rc::ptr_eq(&given.base, &client.base)
                && given.changed == client.changed
                && given.unreported == client.unreported
        }) {
            return Synced::Nothing;
        }
        let start = sql.len();
        let mut answer_first = false;
        for (name, value) in client.reported_view() {
            if settable(name) && self.reported.get(name) != Some(value) {
                answer_first |= checked_against_catalog(name);
                push_set(sql, name, value);
                // The backend's ParameterStatus will say the same; until then, assume it.
                self.reported.set(name, value);
                if name.eq_ignore_ascii_case("session_authorization") {
                    // Setting it sets the role back to none (PostgreSQL's
                    // SetSessionAuthorization): the client's role is given again below.
                    self.unreported.remove("role");
                }
            }
        }
        for (name, value) in client.unreported.iter() {
            if self.unreported.get(name) != Some(value) {
                answer_first |= checked_against_catalog(name);
                push_set(sql, name, value);
            }
        }
        let stale: Vec<Box<str>> = self
            .unreported
            .iter()
            .filter(|(name, _)| client.unreported.get(name).is_none())
            .map(|(name, _)| name.into())
            .collect();
        for name in stale {
            sql.push_str("RESET ");
            push_ident(sql, &name);
            sql.push(';');
            self.unreported.remove(&name);
        }
        for (name, value) in client.unreported.iter() {
            self.unreported.set(name, value);
        }
        self.given = Some(View {
            base: client.base.clone(),
            changed: client.changed.clone(),
            unreported: client.unreported.clone(),
        });
        match (sql.len() > start, answer_first) {
            (false, _) => Synced::Nothing,
            (true, false) => Synced::Pipelined,
            (true, true) => Synced::AnswerFirst,
        }
    }
}

fn push_ident(sql: &mut String, name: &str) {
    sql.push('"');
    for c in name.chars() {
        if c == '"' {
            sql.push('"');
        }
        sql.push(c);
    }
    sql.push('"');
}

pub(super) fn push_set(sql: &mut String, name: &str, value: &str) {
    // set_config takes the value as a configuration file or a StartupMessage gives it, where
    // `SET name TO 'a, b'` would read a list parameter's value as one quoted element
    // (`search_path` would name one schema called "a, b").
    sql.push_str("SELECT pg_catalog.set_config(");
    push_literal(sql, name);
    sql.push_str(", ");
    push_literal(sql, value);
    sql.push_str(", false);");
}

/// Appends `text` as an `E'...'` string literal.
pub(super) fn push_literal(sql: &mut String, text: &str) {
    sql.push_str("E'");
    for c in text.chars() {
        if c == '\'' || c == '\\' {
            sql.push('\\');
        }
        sql.push(c);
    }
    sql.push('\'');
}

/// The parameters of an encoded StartupMessage (length, version, then name/value pairs).
pub fn startup_params(packet: &[u8]) -> impl Iterator<Item = (&str, &str)> {
    let mut r = Reader::new(packet.get(8..).unwrap_or_default());
    std::iter::from_fn(move || {
        let name = r.cstr_utf8().ok().filter(|n| !n.is_empty())?;
        Some((name, r.cstr_utf8().ok()?))
    })
}

/// Why an `options` startup parameter was not read: the FATAL its client gets.
#[derive(Debug, PartialEq, Eq)]
pub struct OptionsError {
    /// The SQLSTATE.
    pub code: crate::protocol::sqlstate::SqlState,
    /// The message: PostgreSQL's where it defines one.
    pub message: String,
    /// The hint, if any.
    pub hint: Option<&'static str>,
}

/// The run-time parameters the `options` startup parameter sets, in order, read as PostgreSQL
/// reads it (`pg_split_opts`, then its `-c` and `--` switches): words split at whitespace
/// that no backslash escapes (a backslash takes the next character as it is); `-c name=value`,
/// `-cname=value` and `--name=value` set `name` (its dashes read as underscores). Other server
/// switches (`-B`, `-d`, ...) are refused: the pooled port keeps none of them.
pub fn options_settings(options: &str) -> Result<Vec<(String, String)>, OptionsError> {
    use crate::protocol::sqlstate::SqlState;
    let invalid = |word: &str| OptionsError {
        code: SqlState::SYNTAX_ERROR,
        message: format!("invalid command-line argument for server process: {word}"),
        hint: Some("Try \"postgres --help\" for more information."),
    };
    let mut words = split_options(options).into_iter();
    let mut settings = Vec::new();
    while let Some(word) = words.next() {
        let (setting, long) = if word == "-c" {
            (words.next().ok_or_else(|| invalid(&word))?, false)
        } else if let Some(rest) = word.strip_prefix("--") {
            (rest.to_owned(), true)
        } else if let Some(rest) = word.strip_prefix("-c") {
            (rest.to_owned(), false)
        } else if word.starts_with('-') {
            return Err(OptionsError {
                code: SqlState::FEATURE_NOT_SUPPORTED,
                message: format!(
                    "the pooled port reads only -c name=value and --name=value in the options \
                     startup parameter, not {word}: use the direct port"
                ),
                hint: None,
            });
        } else {
            return Err(invalid(&word));
        };
        let Some((name, value)) = setting.split_once('=') else {
            return Err(OptionsError {
                code: SqlState::SYNTAX_ERROR,
                message: if long {
                    format!("--{setting} requires a value")
                } else {
                    format!("-c {setting} requires a value")
                },
                hint: None,
            });
        };
        settings.push((name.replace('-', "_"), value.to_owned()));
    }
    Ok(settings)
}

/// PostgreSQL's `pg_split_opts`.
fn split_options(options: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut chars = options.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_ascii_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return words;
        }
        let mut word = String::new();
        let mut escaped = false;
        while let Some(&c) = chars.peek() {
            if c.is_ascii_whitespace() && !escaped {
                break;
            }
            chars.next();
            if !escaped && c == '\\' {
                escaped = true;
            } else {
                escaped = false;
                word.push(c);
            }
        }
        words.push(word);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_read_as_postgresql_reads_them() {
        let read = |options: &str| options_settings(options).expect("readable");
        let pairs = |list: &[(&str, &str)]| -> Vec<(String, String)> {
            list.iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(read(""), pairs(&[]));
        assert_eq!(
            read("  -c statement_timeout=5s   -csearch_path=a,b --lock-timeout=1s "),
            pairs(&[
                ("statement_timeout", "5s"),
                ("search_path", "a,b"),
                ("lock_timeout", "1s"),
            ])
        );
        // A backslash keeps the next character, a space among them.
        assert_eq!(
            read(r"-c search_path=my\ schema,public -c application_name=a\\b"),
            pairs(&[
                ("search_path", "my schema,public"),
                ("application_name", r"a\b")
            ])
        );
        // The value may hold '=' and be empty.
        assert_eq!(
            read("-c x.y=a=b -c application_name="),
            pairs(&[("x.y", "a=b"), ("application_name", "")])
        );
    }

    #[test]
    fn options_postgresql_refuses_or_the_pooled_port_does_not_keep() {
        use crate::protocol::sqlstate::SqlState;
        let refused = |options: &str| options_settings(options).expect_err("refused");
        let e = refused("-c statement_timeout");
        assert_eq!(
            (e.code, e.message.as_str()),
            (
                SqlState::SYNTAX_ERROR,
                "-c statement_timeout requires a value"
            )
        );
        let e = refused("--statement_timeout");
        assert_eq!(e.message, "--statement_timeout requires a value");
        let e = refused("-c");
        assert_eq!(
            e.message,
            "invalid command-line argument for server process: -c"
        );
        let e = refused("statement_timeout=5s");
        assert_eq!(e.code, SqlState::SYNTAX_ERROR);
        assert_eq!(
            e.message,
            "invalid command-line argument for server process: statement_timeout=5s"
        );
        assert_eq!(refused("-d 5").code, SqlState::FEATURE_NOT_SUPPORTED);
    }

    #[test]
    fn sets_the_catalog_checks_are_answered_before_the_clients_statements() {
        let mut backend = BackendParams::new((*base()).clone());
        let mut sql = String::new();
        let plain = ClientParams::new(base(), [("application_name", "a")].into_iter());
        assert_eq!(backend.sync_to(&plain, &mut sql), Synced::Pipelined);
        let role = ClientParams::new(
            base(),
            [("application_name", "a"), ("role", "reader")].into_iter(),
        );
        sql.clear();
        assert_eq!(backend.sync_to(&role, &mut sql), Synced::AnswerFirst);
        assert!(sql.contains("E'role', E'reader'"), "{sql}");
        sql.clear();
        assert_eq!(backend.sync_to(&role, &mut sql), Synced::Nothing);
        // Back to no role: a RESET, which cannot be refused.
        sql.clear();
        assert_eq!(backend.sync_to(&plain, &mut sql), Synced::Pipelined);
        assert_eq!(sql, "RESET \"role\";");
    }

    #[test]
    fn no_role_is_kept_only_against_a_startup_role() {
        let mut plain = ClientParams::new(base(), std::iter::empty());
        plain.set_unreported("role", Some("reader"));
        assert_eq!(plain.unreported.get("role"), Some("reader"));
        plain.set_unreported("Role", Some("NONE"));
        assert!(plain.unreported.is_empty(), "where every session starts");
        let mut started = ClientParams::new(base(), [("role", "reader")].into_iter());
        started.set_unreported("role", Some("none"));
        assert_eq!(started.unreported.get("role"), Some("none"));
        started.reset_unreported("role");
        assert_eq!(started.unreported.get("role"), Some("reader"));
        // RESET ALL leaves the role, DISCARD ALL takes it back to the StartupMessage's.
        started.set_unreported("role", Some("none"));
        started.reset_to_startup(true);
        assert_eq!(started.unreported.get("role"), Some("none"));
        started.reset_to_startup(false);
        assert_eq!(started.unreported.get("role"), Some("reader"));
        plain.set_unreported("role", Some("writer"));
        plain.reset_to_startup(true);
        assert_eq!(plain.unreported.get("role"), Some("writer"));
        plain.reset_to_startup(false);
        assert!(plain.unreported.is_empty());
        // A superuser's `SET SESSION AUTHORIZATION`, reported: RESET ALL leaves it too.
        plain.reported("session_authorization", "bob");
        assert!(plain.reset_to_startup(true).is_empty());
        assert_eq!(plain.get("session_authorization"), Some("bob"));
        plain.reset_to_startup(false);
        assert_eq!(plain.get("session_authorization"), None, "the pool's");
        let mut backend = BackendParams::new((*base()).clone());
        backend.set_unreported("role", Some("reader"));
        backend.set_unreported("role", Some("none"));
        assert!(backend.unreported.is_empty());
        backend.set_unreported("role", Some("reader"));
        backend.set_unreported("search_path", Some("s1"));
        backend.reset(true);
        assert_eq!(backend.unreported_names().collect::<Vec<_>>(), ["role"]);
        backend.reset(false);
        assert!(backend.unreported.is_empty());
    }

    fn base() -> Rc<Params> {
        let mut p = Params::default();
        for (n, v) in [
            ("application_name", ""),
            ("client_encoding", "UTF8"),
            ("DateStyle", "ISO, MDY"),
            ("server_version", "15.8"),
            ("TimeZone", "Etc/UTC"),
        ] {
            p.set(n, v);
        }
        Rc::new(p)
    }

    #[test]
    fn names_compare_without_case() {
        let p = base();
        assert_eq!(p.get("datestyle"), Some("ISO, MDY"));
        assert_eq!(p.get("TIMEZONE"), Some("Etc/UTC"));
    }

    #[test]
    fn a_client_starts_from_the_pool_and_its_startup() {
        let client = ClientParams::new(
            base(),
            [
                ("user", "app"),
                ("database", "db"),
                ("application_name", "psql"),
                ("search_path", "s1"),
                ("server_version", "99"),
                ("_pq_.x", "y"),
            ]
            .into_iter(),
        );
        assert_eq!(client.get("application_name"), Some("psql"));
        assert_eq!(client.get("server_version"), Some("15.8"), "read-only");
        assert_eq!(client.get("user"), None);
        let view: Vec<_> = client.reported_view().collect();
        assert_eq!(view.len(), 5);
        assert_eq!(view[0], ("application_name", "psql"));
        assert_eq!(client.unreported.get("search_path"), Some("s1"));
    }

    #[test]
    fn a_backend_is_set_to_its_clients_values_and_back() {
        let mut backend = BackendParams::new((*base()).clone());
        let mut a = ClientParams::new(
            base(),
            [("application_name", "a"), ("search_path", "s1")].into_iter(),
        );
        let b = ClientParams::new(base(), std::iter::empty());
        let mut sql = String::new();
        assert!(backend.sync_to(&a, &mut sql).any());
        assert_eq!(
            sql,
            "SELECT pg_catalog.set_config(E'application_name', E'a', false);SELECT pg_catalog.set_config(E'search_path', E's1', false);"
        );
        sql.clear();
        assert!(!backend.sync_to(&a, &mut sql).any(), "nothing to do: {sql}");
        a.reported("TimeZone", "Europe/Paris");
        assert!(backend.sync_to(&a, &mut sql).any());
        assert_eq!(
            sql,
            "SELECT pg_catalog.set_config(E'TimeZone', E'Europe/Paris', false);"
        );
        sql.clear();
        assert!(backend.sync_to(&b, &mut sql).any());
        assert_eq!(
            sql,
            "SELECT pg_catalog.set_config(E'application_name', E'', false);SELECT pg_catalog.set_config(E'TimeZone', E'Etc/UTC', false);RESET \"search_path\";"
        );
    }

    #[test]
    fn a_backend_given_a_view_is_compared_again_once_it_reports_a_change() {
        let pool = base();
        let mut backend = BackendParams::new((*pool).clone());
        let a = ClientParams::new(pool.clone(), [("TimeZone", "Etc/GMT+5")].into_iter());
        let b = ClientParams::new(pool.clone(), [("TimeZone", "Etc/GMT+5")].into_iter());
        let mut sql = String::new();
        assert!(backend.sync_to(&a, &mut sql).any());
        backend.reported("TimeZone", "Etc/GMT+5");
        sql.clear();
        assert!(
            !backend.sync_to(&a, &mut sql).any(),
            "compared: nothing to do"
        );
        assert!(
            !backend.sync_to(&b, &mut sql).any(),
            "the same view: nothing to do"
        );
        // The backend's value changed under the view it was given (a SET the client view
        // does not follow): the next client is compared, not trusted.
        backend.reported("TimeZone", "UTC");
        assert!(backend.sync_to(&b, &mut sql).any());
        assert_eq!(
            sql,
            "SELECT pg_catalog.set_config(E'TimeZone', E'Etc/GMT+5', false);"
        );
        sql.clear();
        backend.reset(false);
        let c = ClientParams::new(pool, [("search_path", "s1")].into_iter());
        assert!(backend.sync_to(&c, &mut sql).any());
        assert!(
            sql.starts_with("SELECT pg_catalog.set_config(E'TimeZone', E'Etc/UTC', false);"),
            "{sql}"
        );
        assert!(
            sql.ends_with("SELECT pg_catalog.set_config(E'search_path', E's1', false);"),
            "{sql}"
        );
    }

    #[test]
    fn a_reset_of_one_parameter_goes_back_to_its_startup_value() {
        let mut a = ClientParams::new(
            base(),
            [("TimeZone", "Etc/GMT+5"), ("search_path", "app")].into_iter(),
        );
        a.reported("TimeZone", "UTC");
        // The pool's default, after a RESET: the client's startup value, told.
        assert_eq!(
            a.reset_reported("TimeZone", "Etc/UTC"),
            Some(Some("Etc/GMT+5".into()))
        );
        assert_eq!(a.get("TimeZone"), Some("Etc/GMT+5"));
        // Again: nothing changes, nothing told.
        assert_eq!(a.reset_reported("TimeZone", "Etc/UTC"), Some(None));
        // Not the pool's default, or not a startup parameter: a report as any other.
        assert_eq!(a.reset_reported("TimeZone", "UTC"), None);
        assert_eq!(a.reset_reported("DateStyle", "ISO, MDY"), None);

        let mut backend = BackendParams::new((*base()).clone());
        let mut sql = String::new();
        assert!(backend.sync_to(&a, &mut sql).any());
        assert!(
            sql.contains("SELECT pg_catalog.set_config(E'search_path', E'app', false);"),
            "{sql}"
        );
        sql.clear();
        assert!(!backend.sync_to(&a, &mut sql).any());
        assert!(!backend.forget_unreported("statement_timeout"));
        assert!(backend.forget_unreported("search_path"));
        assert!(backend.sync_to(&a, &mut sql).any());
        assert_eq!(
            sql,
            "SELECT pg_catalog.set_config(E'search_path', E'app', false);"
        );
    }

    #[test]
    fn a_reset_goes_back_to_the_startup_values_not_the_pools() {
        let mut a = ClientParams::new(
            base(),
            [("TimeZone", "Etc/GMT+5"), ("application_name", "app")].into_iter(),
        );
        a.reported("TimeZone", "UTC");
        a.reported("DateStyle", "SQL, DMY");
        let mut told = a.reset_to_startup(false);
        told.sort();
        assert_eq!(
            told,
            [
                ("DateStyle".into(), "ISO, MDY".into()),
                ("TimeZone".into(), "Etc/GMT+5".into())
            ]
        );
        assert_eq!(a.get("application_name"), Some("app"));
        assert!(
            a.reset_to_startup(false).is_empty(),
            "nothing changes twice"
        );
    }

    #[test]
    fn values_are_quoted() {
        let mut sql = String::new();
        push_set(&mut sql, "a\"b", "it's a \\ test");
        assert_eq!(
            sql,
            "SELECT pg_catalog.set_config(E'a\"b', E'it\\'s a \\\\ test', false);"
        );
    }

    #[test]
    fn a_client_back_at_the_pools_value_shares_it_again() {
        let mut a = ClientParams::new(base(), std::iter::empty());
        a.reported("TimeZone", "UTC");
        assert_eq!(a.changed.len(), 1);
        a.reported("TimeZone", "Etc/UTC");
        assert!(a.changed.is_empty());
    }

    #[test]
    fn startup_packets_are_read() {
        let mut packet = Vec::new();
        crate::protocol::write::startup_message(&mut packet, [("user", "app"), ("database", "d")]);
        let params: Vec<_> = startup_params(&packet).collect();
        assert_eq!(params, [("user", "app"), ("database", "d")]);
    }
}
