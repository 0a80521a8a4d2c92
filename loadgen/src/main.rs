//! `branchgate-loadgen`: parse the command line, run, print. Exit status 0 on success, 1 when
//! the run failed (or, with `--strict`, a target had errors or recorded nothing), 2 for bad
//! arguments.

use std::io::Write;
use std::process::ExitCode;

use branchgate_loadgen::cli::Cli;
use clap::error::ErrorKind;
use clap::Parser;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => return clap_exit(error),
    };
    match branchgate_loadgen::run(cli) {
        Ok(outcome) => {
            let mut stdout = std::io::stdout().lock();
            // A closed pipe (`| head`) is not worth a panic.
            let _ = writeln!(stdout, "{}", outcome.output.trim_end());
            if !outcome.failures.is_empty() {
                eprintln!(
                    "branchgate-loadgen: --strict: {}",
                    outcome.failures.join("; ")
                );
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("branchgate-loadgen: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}

/// Help and version as clap prints them; anything else as one line.
fn clap_exit(error: clap::Error) -> ExitCode {
    match error.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = error.print();
            ExitCode::SUCCESS
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = error.print();
            ExitCode::from(2)
        }
        _ => {
            let text = error.render().to_string();
            // The message is the first paragraph; usage and hints follow a blank line.
            let message: Vec<&str> = text
                .lines()
                .take_while(|line| !line.trim().is_empty())
                .map(str::trim)
                .collect();
            let message = message.join(" ");
            let message = message.strip_prefix("error: ").unwrap_or(&message);
            eprintln!("branchgate-loadgen: {message} (see --help)");
            ExitCode::from(2)
        }
    }
}
