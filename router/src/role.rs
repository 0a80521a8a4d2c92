//! The `branchgate role create|reset` command (being written).

/// Role subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum RoleCommand {
    /// Create a role.
    Create,
}

/// Run a role subcommand.
pub fn run(_command: RoleCommand) -> Result<(), std::io::Error> {
    Err(std::io::Error::other("not yet"))
}
