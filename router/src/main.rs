//! The `branchgate` binary: parses the command line and calls into the library.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use branchgate::catalog::Catalog;
use branchgate::config::Config;
use branchgate::control::{self, ControlError, Request, Status};

use clap::{Parser, Subcommand};

/// How long `reload` and `check-config` wait for the running router's answer.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "branchgate", version, about = "PostgreSQL edge router")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the router until SIGTERM/SIGINT; SIGHUP reloads the catalog.
    Run {
        /// Router configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a configuration file, its catalog and TLS files, without starting; warn about
    /// a catalog with no branches or roles, or one the running router would refuse to reload.
    CheckConfig {
        /// Router configuration file (TOML).
        config: PathBuf,
    },
    /// Make the running router reload its catalog now, and print what it loaded or why not.
    Reload {
        /// Router configuration file (TOML): names the router's control socket.
        #[arg(long, short)]
        config: PathBuf,
        /// Apply the catalog even if it removes every branch or role, or more than
        /// `[reload] max_removed_percent` of them.
        #[arg(long)]
        force: bool,
    },
    /// Pause a branch on the pooled port: its running transactions finish, new ones wait
    /// (within `query_wait_timeout`) until `branchgate resume`.
    Pause {
        /// Router configuration file (TOML): names the router's control socket.
        #[arg(long, short)]
        config: PathBuf,
        /// The branch id.
        branch: String,
    },
    /// Let a paused branch's transactions go on.
    Resume {
        /// Router configuration file (TOML): names the router's control socket.
        #[arg(long, short)]
        config: PathBuf,
        /// The branch id.
        branch: String,
    },
    /// Manage roles of a branch.
    Role {
        #[command(subcommand)]
        action: branchgate::role::RoleCommand,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BRANCHGATE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("branchgate: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<(), String> {
    match command {
        Command::Run { config } => {
            let config = branchgate::config::Config::load(&config).map_err(|e| e.to_string())?;
            let router = branchgate::start(config).map_err(|e| e.to_string())?;
            router.run_until_signalled().map_err(|e| e.to_string())
        }
        Command::CheckConfig { config } => {
            let config = Config::load(&config).map_err(|e| e.to_string())?;
            let catalog = Catalog::load(&config.catalog_path).map_err(|e| e.to_string())?;
            branchgate::tls::server_config(&config.tls.cert, &config.tls.key)
                .map_err(|e| e.to_string())?;
            let pooled = match config.listen.pooled {
                Some(addr) => format!(", pooled port {addr}"),
                None => String::new(),
            };
            println!(
                "configuration OK: {} workers, direct port {}{pooled}, {} branches",
                config.workers,
                config.listen.direct,
                catalog.branches().len()
            );
            warn_about_catalog(&config, &catalog);
            Ok(())
        }
        Command::Reload { config, force } => {
            let config = Config::load(&config).map_err(|e| e.to_string())?;
            let socket = &config.admin.socket;
            let reply = control::request(socket, Request::Reload { force }, CONTROL_TIMEOUT)
                .map_err(|e| e.to_string())?;
            match reply.status {
                Status::Ok => {
                    println!("{}", reply.text);
                    Ok(())
                }
                Status::Refused => Err(format!(
                    "the router refused the catalog: it {}; the catalog in force is kept (apply \
                     it anyway with `branchgate reload --force`)",
                    reply.text
                )),
                Status::Error => Err(format!("the router kept its catalog: {}", reply.text)),
            }
        }
        Command::Pause { config, branch } => ask(&config, Request::Pause(branch.into())),
        Command::Resume { config, branch } => ask(&config, Request::Resume(branch.into())),
        Command::Role { action } => branchgate::role::run(action).map_err(|e| e.to_string()),
    }
}

/// Sends `request` to the router the configuration at `config` names, prints its answer.
fn ask(config: &std::path::Path, request: Request) -> Result<(), String> {
    let config = Config::load(config).map_err(|e| e.to_string())?;
    let reply = control::request(&config.admin.socket, request, CONTROL_TIMEOUT)
        .map_err(|e| e.to_string())?;
    match reply.status {
        Status::Ok => {
            println!("{}", reply.text);
            Ok(())
        }
        Status::Refused | Status::Error => Err(reply.text),
    }
}

/// `check-config`'s warnings (stderr; they do not fail the check): a catalog nobody could log
/// in with, and what a router running with this configuration would say to reloading it.
fn warn_about_catalog(config: &Config, catalog: &Catalog) {
    let path = config.catalog_path.display();
    if catalog.branches().len() == 0 {
        eprintln!(
            "branchgate: warning: {path} has no branches: every client would be refused (3D000)"
        );
    } else if catalog.branches().all(|b| b.roles().next().is_none()) {
        eprintln!(
            "branchgate: warning: {path} has no roles: nobody could log in (add one with \
             `branchgate role create`)"
        );
    }
    match control::request(&config.admin.socket, Request::Check, CONTROL_TIMEOUT) {
        Ok(reply) => match reply.status {
            Status::Ok => println!("running router: {}", reply.text),
            Status::Refused => eprintln!(
                "branchgate: warning: the running router would refuse to reload this catalog: \
                 it {} (`branchgate reload --force` applies it anyway)",
                reply.text
            ),
            Status::Error => eprintln!(
                "branchgate: warning: the running router could not load this catalog: {}",
                reply.text
            ),
        },
        // No router runs with this configuration: nothing to compare with.
        Err(ControlError::NoRouter { .. }) => {}
        Err(error) => eprintln!("branchgate: warning: cannot ask the running router: {error}"),
    }
}
