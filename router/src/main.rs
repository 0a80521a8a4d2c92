//! The `branchgate` binary: parses the command line and calls into the library.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    /// Validate a configuration file, its catalog and TLS files, without starting.
    CheckConfig {
        /// Router configuration file (TOML).
        config: PathBuf,
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
            let config = branchgate::config::Config::load(&config).map_err(|e| e.to_string())?;
            let catalog = branchgate::catalog::Catalog::load(&config.catalog_path)
                .map_err(|e| e.to_string())?;
            branchgate::tls::server_config(&config.tls.cert, &config.tls.key)
                .map_err(|e| e.to_string())?;
            println!(
                "configuration OK: {} workers, direct port {}, {} branches",
                config.workers,
                config.listen.direct,
                catalog.branches().len()
            );
            Ok(())
        }
        Command::Role { action } => branchgate::role::run(action).map_err(|e| e.to_string()),
    }
}
