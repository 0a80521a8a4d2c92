//! The `branchgate role create|reset` command: give a branch role a new generated password.
//!
//! The password exists only in this process and on the operator's screen: the branch primary
//! and the catalog both receive its SCRAM verifier. The primary is changed first
//! (`CREATE/ALTER ROLE ... PASSWORD 'SCRAM-SHA-256$...'`, stored by PostgreSQL as is), then the
//! catalog file, so the router never accepts a password the backend would refuse. Then the
//! running router is asked over its control socket to reload, and the command returns once it
//! has the new verifier in force: a client that logs in with the new password right after the
//! command returns gets in (the router's file watch alone would leave it up to a second on the
//! old verifier, while no password works). After a reset the router closes the role's open
//! sessions.
//!
//! With the catalog in etcd the order is the same, under a lock on the role in etcd (so two
//! operators' commands cannot interleave their server and catalog writes), and the catalog
//! write is one transaction guarded by the revision of the role's key read under the lock
//! (`role/etcd.rs`); the command then waits until every live router has acknowledged that
//! revision ([`crate::fleet::acks`]), bounded by `--wait`.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::auth::password::generate_password;
use crate::auth::verifier::ScramVerifier;
use crate::catalog::{self, Branch, Catalog, MAX_NAME_BYTES};
use crate::config::{CatalogSource, Config};
use crate::control::{self, ControlError, Request, Status};

mod admin;
mod error;
mod etcd;
#[cfg(test)]
mod fake;

pub use admin::{AdminConn, ADMIN_TIMEOUT, MAX_ADMIN_MESSAGE_BYTES};
pub use error::RoleError;

/// Environment variable holding the admin user's password, if the server asks for one.
pub const ADMIN_PASSWORD_ENV: &str = "BRANCHGATE_ADMIN_PASSWORD";
/// SQLSTATE 42710 duplicate_object: `CREATE ROLE` for a role the server already has.
const DUPLICATE_OBJECT: &str = "42710";
/// How long the command waits for the running router to confirm it reloaded the catalog.
pub const ROUTER_CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// Role subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum RoleCommand {
    /// Create a role on a branch with a generated password (printed once on stdout).
    Create(RoleArgs),
    /// Give an existing role a new generated password; its open sessions are closed.
    Reset(RoleArgs),
}

/// Arguments of `role create` and `role reset`.
#[derive(Debug, Clone, clap::Args)]
pub struct RoleArgs {
    /// Router configuration file (TOML); its catalog is edited.
    #[arg(long)]
    pub config: PathBuf,
    /// Branch id, as in the catalog.
    #[arg(long)]
    pub branch: String,
    /// Role name (clients log in as `<role>.<branch>`).
    #[arg(long)]
    pub role: String,
    /// PostgreSQL user that runs CREATE/ALTER ROLE on the branch primary; its password, if
    /// needed, comes from BRANCHGATE_ADMIN_PASSWORD.
    #[arg(long, default_value = "postgres")]
    pub admin_user: String,
    /// With the catalog in etcd: how long to wait for every live router to acknowledge the
    /// change (`0s`: do not wait). Routers that did not are named, and the command fails.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub wait: Duration,
}

/// What [`apply`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A role the catalog does not have yet.
    Create,
    /// A role the catalog already has.
    Reset,
}

/// Runs a role subcommand: the password goes to stdout as `password: ...` then `user: ...`,
/// everything else to stderr.
///
/// Returns once the running router has the new verifier in force, or when no router runs
/// (with etcd: once every live router acknowledged it, or `--wait` passed). If a router
/// answers but does not load the catalog, the password is still printed (server and catalog
/// have it, and this is its only copy) and the command fails with
/// [`RoleError::RouterNotUpdated`] (with etcd, [`RoleError::NodesNotUpdated`]).
pub fn run(command: RoleCommand) -> Result<(), RoleError> {
    let (args, mode) = match command {
        RoleCommand::Create(args) => (args, Mode::Create),
        RoleCommand::Reset(args) => (args, Mode::Reset),
    };
    let admin_password = match std::env::var(ADMIN_PASSWORD_ENV) {
        Ok(password) if !password.is_empty() => Some(password),
        Ok(_) | Err(std::env::VarError::NotPresent) => None,
        Err(std::env::VarError::NotUnicode(_)) => return Err(RoleError::AdminPasswordNotUtf8),
    };
    let config = Config::load(&args.config)?;
    let Applied {
        password,
        etcd_write,
    } = apply_with_config(&config, &args, mode, admin_password.as_deref())?;
    let done = match mode {
        Mode::Create => "created",
        Mode::Reset => "has a new password",
    };
    let (router, catalog_note, router_note) = match etcd_write {
        Some(EtcdWrite { revision, acks }) => {
            let note = match &acks {
                None => "not waiting for the routers (--wait 0s): they apply it as they see it"
                    .to_owned(),
                Some(Ok(report)) if report.complete() => format!(
                    "every live router has it in force ({} {})",
                    report.applied.len(),
                    if report.applied.len() == 1 {
                        "node"
                    } else {
                        "nodes"
                    }
                ),
                Some(_) => "but not every live router applied it (see below)".to_owned(),
            };
            let router = match acks {
                Some(Ok(report)) if !report.complete() => {
                    Err(RoleError::NodesNotUpdated { report })
                }
                Some(Err(source)) => Err(RoleError::AcksUnknown { source }),
                _ => Ok(RouterState::Loaded),
            };
            (
                router,
                format!("written to etcd at revision {revision}"),
                note,
            )
        }
        None => {
            let router = confirm_with_router(&config.admin.socket, ROUTER_CONFIRM_TIMEOUT);
            let note = match &router {
                Ok(RouterState::Loaded) => "the running router has it in force".to_owned(),
                Ok(RouterState::NotRunning) => format!(
                    "no router answers on {}: a router loads the catalog when it starts",
                    config.admin.socket.display()
                ),
                Err(_) => "but the running router did not load it (see below)".to_owned(),
            };
            (router, "catalog updated".to_owned(), note)
        }
    };
    eprintln!(
        "branchgate: role {:?} on branch {:?} {done}; {catalog_note}; {router_note}",
        args.role, args.branch
    );
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "password: {password}")
        .and_then(|()| writeln!(stdout, "user: {}.{}", args.role, args.branch))
        .and_then(|()| stdout.flush())
        .map_err(RoleError::Output)?;
    router.map(|_state| ())
}

/// Where the running router stands after [`confirm_with_router`].
#[derive(Debug)]
pub enum RouterState {
    /// It reloaded the catalog: what the file says is in force.
    Loaded,
    /// No router answers on the control socket: no socket file, or nobody listening on it.
    NotRunning,
}

/// Asks the router answering on `socket` to reload its catalog and waits (at most `timeout`)
/// until it has. Called after the catalog file was replaced, so the router reads that file (or
/// a later one).
pub fn confirm_with_router(socket: &Path, timeout: Duration) -> Result<RouterState, RoleError> {
    let not_updated = |reason: String| RoleError::RouterNotUpdated { reason };
    match control::request(socket, Request::Reload { force: false }, timeout) {
        Ok(reply) => match reply.status {
            Status::Ok => Ok(RouterState::Loaded),
            Status::Refused => Err(not_updated(format!(
                "it refused the catalog file, which {}; the catalog in force is kept",
                reply.text
            ))),
            Status::Error => Err(not_updated(reply.text)),
        },
        Err(ControlError::NoRouter { .. }) => Ok(RouterState::NotRunning),
        Err(error) => Err(not_updated(error.to_string())),
    }
}

/// Creates or resets `args.role` on `args.branch`: checks the catalog, sets a new password's
/// verifier on the branch primary (logging in as `args.admin_user` with `admin_password` if
/// the server asks for one), then writes the verifier to the catalog. Returns the password.
///
/// For [`Mode::Create`], a role the server already has (but the catalog does not) gets the new
/// password too: the catalog is the source of truth for which roles the router serves.
///
/// The running router is not told: [`run`] asks it with [`confirm_with_router`]; until then it
/// finds the change through its file watch.
pub fn apply(
    args: &RoleArgs,
    mode: Mode,
    admin_password: Option<&str>,
) -> Result<String, RoleError> {
    let config = Config::load(&args.config)?;
    apply_with_config(&config, args, mode, admin_password).map(|applied| applied.password)
}

/// What [`apply_with_config`] did.
#[derive(Debug)]
struct Applied {
    /// The new password.
    password: String,
    /// For a catalog in etcd: the write, and what the routers answered.
    etcd_write: Option<EtcdWrite>,
}

/// A role written to etcd.
#[derive(Debug)]
struct EtcdWrite {
    /// The revision that has the new verifier.
    revision: i64,
    /// The live routers' acknowledgements of it (`None` with `--wait 0s`).
    acks: Option<Result<crate::fleet::acks::AckReport, crate::catalog::etcd::EtcdError>>,
}

/// [`apply`] with `args.config` already loaded.
fn apply_with_config(
    config: &Config,
    args: &RoleArgs,
    mode: Mode,
    admin_password: Option<&str>,
) -> Result<Applied, RoleError> {
    if let Some(reason) = role_name_problem(&args.role) {
        return Err(RoleError::InvalidRoleName {
            role: args.role.clone(),
            reason,
        });
    }
    match &config.catalog {
        CatalogSource::File(path) => {
            let password = apply_to_file(path, args, mode, admin_password)?;
            Ok(Applied {
                password,
                etcd_write: None,
            })
        }
        CatalogSource::Etcd(url) => etcd::apply(url, args, mode, admin_password),
    }
}

/// The file catalog's way: under the file's edit lock, the server, then the file.
fn apply_to_file(
    path: &Path,
    args: &RoleArgs,
    mode: Mode,
    admin_password: Option<&str>,
) -> Result<String, RoleError> {
    // One role command at a time per catalog, from reading it to writing it back, so the
    // server's password and the file's verifier always end up from the same command.
    let _lock = catalog::lock_for_edit(path)?;
    let catalog = Catalog::load(path)?;
    let branch = branch_for(&catalog, &path.display().to_string(), args, mode)?;
    let (password, verifier) = set_on_server(branch.primary, args, mode, admin_password)?;
    catalog::set_role_verifier(path, &args.branch, &args.role, &verifier).map_err(|source| {
        RoleError::CatalogNotUpdated {
            primary: branch.primary,
            source,
        }
    })?;
    Ok(password)
}

/// The branch `args` names in `catalog` (called `catalog_name` in errors), if `mode` applies
/// to its role: `create` for a role it lacks, `reset` for one it has.
fn branch_for<'c>(
    catalog: &'c Catalog,
    catalog_name: &str,
    args: &RoleArgs,
    mode: Mode,
) -> Result<&'c Arc<Branch>, RoleError> {
    let branch = catalog
        .branch(&args.branch)
        .ok_or_else(|| RoleError::UnknownBranch {
            catalog: catalog_name.to_owned(),
            branch: args.branch.clone(),
        })?;
    let names = || (args.branch.clone(), args.role.clone());
    match (mode, branch.role(&args.role).is_some()) {
        (Mode::Create, true) => {
            let (branch, role) = names();
            Err(RoleError::RoleExists { branch, role })
        }
        (Mode::Reset, false) => {
            let (branch, role) = names();
            Err(RoleError::UnknownRole { branch, role })
        }
        _ => Ok(branch),
    }
}

/// Gives the role a new generated password on the branch primary (`CREATE ROLE`, or `ALTER
/// ROLE` for a reset or a role the server has already). Returns the password and its verifier.
fn set_on_server(
    primary: SocketAddr,
    args: &RoleArgs,
    mode: Mode,
    admin_password: Option<&str>,
) -> Result<(String, ScramVerifier), RoleError> {
    let password = generate_password();
    let verifier = ScramVerifier::generate(&password);
    let verifier_text = verifier.to_string();
    let mut conn = AdminConn::connect(primary, &args.admin_user, admin_password)?;
    match mode {
        Mode::Create => match conn.execute(&create_role_sql(&args.role, &verifier_text)) {
            Err(RoleError::Server { code, .. }) if code == DUPLICATE_OBJECT => {
                tracing::warn!(
                    role = %args.role,
                    %primary,
                    "the role already exists on the server; replacing its password"
                );
                conn.execute(&alter_role_sql(&args.role, &verifier_text, true))?;
            }
            other => other?,
        },
        Mode::Reset => conn.execute(&alter_role_sql(&args.role, &verifier_text, false))?,
    }
    Ok((password, verifier))
}

/// Sets `role`'s verifier on `primary` to `verifier` as it is (`ALTER ROLE`): gives the server
/// back what the catalog says after a write to the catalog lost a race.
fn restore_on_server(
    primary: SocketAddr,
    args: &RoleArgs,
    verifier: &str,
    admin_password: Option<&str>,
) -> Result<(), RoleError> {
    let mut conn = AdminConn::connect(primary, &args.admin_user, admin_password)?;
    conn.execute(&alter_role_sql(&args.role, verifier, false))
}

/// `CREATE ROLE "<role>" LOGIN PASSWORD '<verifier>'`.
fn create_role_sql(role: &str, verifier: &str) -> String {
    format!(
        "CREATE ROLE {} LOGIN PASSWORD {}",
        quote_ident(role),
        quote_literal(verifier)
    )
}

/// `ALTER ROLE "<role>" [LOGIN] PASSWORD '<verifier>'`. A reset leaves LOGIN alone: an
/// operator may have disabled it on purpose.
fn alter_role_sql(role: &str, verifier: &str, login: bool) -> String {
    let login = if login { " LOGIN" } else { "" };
    format!(
        "ALTER ROLE {}{login} PASSWORD {}",
        quote_ident(role),
        quote_literal(verifier)
    )
}

/// A quoted identifier: double quotes around, inner double quotes doubled. Quoting keeps case
/// and dots, so `My.Role` stays one name.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A string literal with single quotes doubled. With a backslash inside, the escape-string form
/// `E'...'` (backslashes doubled) reads the same whatever `standard_conforming_strings` says.
fn quote_literal(value: &str) -> String {
    let quoted = value.replace('\'', "''");
    if value.contains('\\') {
        format!("E'{}'", quoted.replace('\\', "\\\\"))
    } else {
        format!("'{quoted}'")
    }
}

/// Why a role name cannot be used, if it cannot. Mirrors the catalog's rules, checked before
/// the server is touched so that the catalog edit cannot fail on the name afterwards.
fn role_name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        Some("must be 1 to 63 bytes long")
    } else if name.contains('|') {
        Some("must not contain '|' (it starts the |replica suffix)")
    } else if name.contains('\0') {
        Some("must not contain NUL")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::catalog::tests::V1;
    use crate::role::fake::{serve, Peer};

    /// A router.toml and catalog.toml in a fresh directory; branch `b1` has role `app`.
    fn setup(primary: &str) -> (tempfile::TempDir, RoleArgs) {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = "catalog = \"catalog.toml\"\n[tls]\ncert = \"x.crt\"\nkey = \"x.key\"\n\
                      [listen]\ndirect = \"127.0.0.1:0\"\n";
        std::fs::write(dir.path().join("router.toml"), config).expect("write router.toml");
        let catalog = format!(
            "# branches\n[[branch]]\nid = \"b1\"\nprimary = \"{primary}\"\n\
             [branch.roles]\napp = \"{V1}\"\n"
        );
        std::fs::write(dir.path().join("catalog.toml"), catalog).expect("write catalog.toml");
        let args = RoleArgs {
            config: dir.path().join("router.toml"),
            branch: "b1".into(),
            role: "app".into(),
            admin_user: "postgres".into(),
            wait: Duration::from_secs(10),
        };
        (dir, args)
    }

    fn catalog_text(dir: &Path) -> String {
        std::fs::read_to_string(dir.join("catalog.toml")).expect("read catalog.toml")
    }

    /// The verifier inside the single-quoted literal of a statement.
    fn verifier_in(sql: &str) -> ScramVerifier {
        let (_, rest) = sql.split_once('\'').expect("a literal");
        let (literal, _) = rest.split_once('\'').expect("a closed literal");
        literal.parse().expect("a verifier")
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("app"), r#""app""#);
        assert_eq!(quote_ident(r#"My."odd" role"#), r#""My.""odd"" role""#);
        assert_eq!(
            quote_literal("SCRAM-SHA-256$4096:c2E=$a:b"),
            "'SCRAM-SHA-256$4096:c2E=$a:b'"
        );
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal(r"a\'b"), r"E'a\\''b'");
        assert_eq!(quote_literal(""), "''");
        assert_eq!(
            create_role_sql(r#"a"b"#, "v'"),
            r#"CREATE ROLE "a""b" LOGIN PASSWORD 'v'''"#
        );
        assert_eq!(
            alter_role_sql("r", "v", true),
            r#"ALTER ROLE "r" LOGIN PASSWORD 'v'"#
        );
        assert_eq!(
            alter_role_sql("r", "v", false),
            r#"ALTER ROLE "r" PASSWORD 'v'"#
        );
    }

    #[test]
    fn role_names() {
        assert_eq!(role_name_problem("my.dotted-Role"), None);
        assert!(role_name_problem("").is_some());
        assert!(role_name_problem(&"r".repeat(64)).is_some());
        assert_eq!(role_name_problem(&"r".repeat(63)), None);
        assert!(role_name_problem("a|replica").is_some());
        assert!(role_name_problem("a\0b").is_some());
    }

    #[test]
    fn catalog_checks_come_before_the_server() {
        // Nothing listens on port 1: reaching for the server would be a different error.
        let (_dir, mut args) = setup("127.0.0.1:1");
        let e = apply(&args, Mode::Create, None).expect_err("app exists");
        assert!(matches!(e, RoleError::RoleExists { .. }), "{e}");
        args.role = "nobody".into();
        let e = apply(&args, Mode::Reset, None).expect_err("nobody is unknown");
        assert!(matches!(e, RoleError::UnknownRole { .. }), "{e}");
        args.role = "a|b".into();
        let e = apply(&args, Mode::Create, None).expect_err("bad name");
        assert!(matches!(e, RoleError::InvalidRoleName { .. }), "{e}");
        args.role = "app".into();
        args.branch = "b9".into();
        let e = apply(&args, Mode::Reset, None).expect_err("unknown branch");
        assert!(e.to_string().ends_with(r#"no branch with id "b9""#), "{e}");
    }

    #[test]
    fn create_falls_back_to_alter_and_writes_the_catalog() {
        let (addr, server) = serve(|peer: &mut Peer| {
            peer.read_startup();
            peer.login_ok();
            let create = peer.read_query();
            peer.error(DUPLICATE_OBJECT, r#"role "new.role" already exists"#);
            peer.ready();
            let alter = peer.read_query();
            peer.complete("ALTER ROLE");
            peer.ready();
            assert_eq!(peer.read_frame().0, b'X', "expected Terminate");
            (create, alter)
        });
        let (dir, mut args) = setup(&addr.to_string());
        args.role = "new.role".into();
        let password = apply(&args, Mode::Create, None).expect("create");
        let (create, alter) = server.join().expect("fake server");

        assert!(password.starts_with("pscale_pw_"), "{password}");
        let prefix = r#"CREATE ROLE "new.role" LOGIN PASSWORD 'SCRAM-SHA-256$4096:"#;
        assert!(create.starts_with(prefix), "{create}");
        let prefix = r#"ALTER ROLE "new.role" LOGIN PASSWORD '"#;
        assert!(alter.starts_with(prefix), "{alter}");
        let verifier = verifier_in(&alter);
        assert_eq!(verifier, verifier_in(&create));
        assert!(
            ScramVerifier::from_password(&password, &verifier.salt, verifier.iterations)
                == verifier,
            "the verifier is not the printed password's"
        );
        let catalog = Catalog::load(&dir.path().join("catalog.toml")).expect("catalog");
        let branch = catalog.branch("b1").expect("b1");
        assert!(branch.role("new.role").map(|v| &**v) == Some(&verifier));
        assert!(branch.role("app").is_some());
        assert!(
            catalog_text(dir.path()).starts_with("# branches\n"),
            "comment lost"
        );
    }

    #[test]
    fn the_routers_answer_decides_the_outcome() {
        use crate::control::{ControlServer, Reply};
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("branchgate.sock");
        let timeout = Duration::from_secs(10);
        assert!(matches!(
            confirm_with_router(&socket, timeout),
            Ok(RouterState::NotRunning)
        ));

        let answering = |status: Status, text: &'static str| {
            let listener = control::bind(&socket).expect("bind");
            ControlServer::start(listener, move |request| {
                assert_eq!(request, Request::Reload { force: false });
                Reply::new(status, text)
            })
            .expect("serve")
        };
        let router = answering(Status::Ok, "reloaded: 1 branches, 2 roles");
        assert!(matches!(
            confirm_with_router(&socket, timeout),
            Ok(RouterState::Loaded)
        ));
        router.stop();

        let router = answering(Status::Refused, "removes every branch (2 of 2)");
        let e = confirm_with_router(&socket, timeout).expect_err("refused");
        let text = e.to_string();
        assert!(
            text.starts_with("the role was changed on the server and in the catalog, but"),
            "{text}"
        );
        assert!(
            text.contains("which removes every branch (2 of 2); the catalog in force is kept"),
            "{text}"
        );
        router.stop();

        let router = answering(Status::Error, "catalog.toml:3: expected a value");
        let e = confirm_with_router(&socket, timeout).expect_err("invalid file");
        assert!(
            matches!(&e, RoleError::RouterNotUpdated { reason } if reason == "catalog.toml:3: expected a value"),
            "{e}"
        );
        router.stop();
    }

    #[test]
    fn failed_reset_leaves_the_catalog_alone() {
        let (addr, server) = serve(|peer: &mut Peer| {
            peer.read_startup();
            peer.login_ok();
            let alter = peer.read_query();
            peer.error("42704", r#"role "app" does not exist"#);
            peer.ready();
            alter
        });
        let (dir, args) = setup(&addr.to_string());
        let before = catalog_text(dir.path());
        let e = apply(&args, Mode::Reset, None).expect_err("server refuses");
        assert_eq!(
            e.to_string(),
            r#"PostgreSQL error 42704: role "app" does not exist"#
        );
        let alter = server.join().expect("fake server");
        let prefix = r#"ALTER ROLE "app" PASSWORD 'SCRAM-SHA-256$"#;
        assert!(alter.starts_with(prefix), "{alter}");
        assert_eq!(catalog_text(dir.path()), before);
    }
}
