//! `branchgate catalog import FILE` and `branchgate catalog export`: a TOML catalog file into
//! the etcd catalog router.toml names, and back out (to stdout).
//!
//! Import checks the file as a router would before writing anything, then writes every key in
//! one transaction: into an empty prefix, or with `--replace` over the catalog there, guarded
//! so that a change made meanwhile fails the import instead of being overwritten.

use std::io::Write;
use std::path::PathBuf;

use super::layout::keys_from_toml;
use super::store::{block_on, EtcdError, Imported, Store};
use super::EtcdUrl;
use crate::catalog::{guard, CatalogError};
use crate::config::{CatalogSource, Config, ConfigError};

/// `branchgate catalog` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum CatalogCommand {
    /// Write a TOML catalog file into the etcd catalog router.toml names, in one transaction.
    Import {
        /// Router configuration file (TOML) whose `catalog` is an `etcd://` URL.
        #[arg(long, short)]
        config: PathBuf,
        /// The catalog file (the format of `catalog.toml`).
        file: PathBuf,
        /// Replace the catalog already in etcd (keys the file lacks are deleted).
        #[arg(long)]
        replace: bool,
    },
    /// Print the etcd catalog router.toml names as a TOML catalog file.
    Export {
        /// Router configuration file (TOML) whose `catalog` is an `etcd://` URL.
        #[arg(long, short)]
        config: PathBuf,
    },
}

/// Why a `branchgate catalog` command failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// router.toml could not be read or is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// router.toml's catalog is a file: there is nothing to import into or export from.
    #[error(
        "{}: the catalog is the file {}, not etcd: `branchgate catalog import|export` need \
         catalog = \"etcd://host:2379/prefix\"",
        config.display(),
        file.display()
    )]
    NotEtcd {
        /// router.toml.
        config: PathBuf,
        /// Its catalog file.
        file: PathBuf,
    },
    /// The file to import could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file to import is not a valid catalog (nothing was written).
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// etcd refused, could not be reached, or the catalog there changed meanwhile.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    /// The exported catalog could not be written to stdout.
    #[error("cannot write the catalog to stdout: {0}")]
    Output(std::io::Error),
}

/// Runs a `catalog` subcommand; a summary goes to stderr, an export to stdout.
pub fn run(command: CatalogCommand) -> Result<(), CommandError> {
    match command {
        CatalogCommand::Import {
            config,
            file,
            replace,
        } => {
            let (config, url) = etcd_config(config)?;
            let text = std::fs::read_to_string(&file).map_err(|source| CommandError::Read {
                path: file.clone(),
                source,
            })?;
            let imported = import(&config, &url, &text, &file.display().to_string(), replace)?;
            eprintln!(
                "branchgate: imported {} into {url}: {} keys written, {} deleted, revision {}",
                file.display(),
                imported.written,
                imported.deleted,
                imported.revision
            );
            Ok(())
        }
        CatalogCommand::Export { config } => {
            let (_, url) = etcd_config(config)?;
            let text = export(&url)?;
            let mut stdout = std::io::stdout().lock();
            stdout
                .write_all(text.as_bytes())
                .and_then(|()| stdout.flush())
                .map_err(CommandError::Output)
        }
    }
}

/// router.toml, whose catalog must be in etcd.
fn etcd_config(path: PathBuf) -> Result<(Config, EtcdUrl), CommandError> {
    let config = Config::load(&path)?;
    match &config.catalog {
        CatalogSource::Etcd(url) => {
            let url = url.clone();
            Ok((config, url))
        }
        CatalogSource::File(file) => Err(CommandError::NotEtcd {
            config: path,
            file: file.clone(),
        }),
    }
}

/// Checks `text` (a catalog file, `file_name` in errors) and writes it to the catalog at `url`
/// in one transaction. Warns (stderr) when the routers' reload guard (router.toml's `[reload]`)
/// would refuse it over the catalog it replaces: they keep their catalog until forced.
pub fn import(
    config: &Config,
    url: &EtcdUrl,
    text: &str,
    file_name: &str,
    replace: bool,
) -> Result<Imported, CommandError> {
    let newer = crate::catalog::Catalog::parse(text, file_name)?;
    let imported = block_on(async {
        let mut store = Store::connect(url).await?;
        let keys = keys_from_toml(text, file_name, store.layout())?;
        store.import(&keys, replace).await
    })??;
    let layout = super::Layout::new(url.prefix());
    if let Ok(previous) = imported.previous.catalog(&layout) {
        if let Err(refusal) = guard::check(&previous, &newer, &config.reload, false) {
            eprintln!(
                "branchgate: warning: routers will refuse this catalog (it {refusal}) and keep \
                 the one in force, unless forced (`branchgate reload --force` on each, or \
                 [reload] force = true)"
            );
        }
    }
    Ok(imported)
}

/// The catalog at `url` as a TOML catalog file, after checking that it is valid.
pub fn export(url: &EtcdUrl) -> Result<String, CommandError> {
    let snapshot = block_on(async {
        let mut store = Store::connect(url).await?;
        store.read().await
    })??;
    Ok(snapshot.to_toml(&super::Layout::new(url.prefix()))?)
}
