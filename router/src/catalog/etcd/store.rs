//! Reads and guarded writes of a catalog in etcd.
//!
//! Every write is one etcd transaction whose compares say what the writer read: a role's
//! verifier is put only if the role's key still has the revision read (and its branch is the
//! same branch), an import only if nothing under the catalog changed since it was read. A
//! writer that lost a race gets [`EtcdError::Conflict`] and changed nothing, rather than
//! overwriting what the other wrote.
//!
//! Each request has a deadline ([`REQUEST_TIMEOUT`]): the client connects lazily and would
//! otherwise wait for an unreachable etcd for ever.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, KeyValue, PutOptions, Txn, TxnOp,
    WatchOptions, WatchStream,
};

use super::layout::{Entry, Layout, Snapshot};
use super::url::EtcdUrl;
use crate::catalog::CatalogError;

/// How long one request (a read, a transaction, a lease) may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long opening a connection to one etcd member may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// HTTP/2 pings on an idle connection, so a watch on a member that vanished without a word (a
/// dead machine, a partition) fails within seconds rather than when TCP gives up.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// How long a ping may go unanswered before the connection is dropped.
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest response accepted: a whole catalog arrives in one range read (etcd's own request
/// limit is 1.5 MiB per write, far less than a catalog of many branches read at once).
const MAX_RESPONSE_BYTES: usize = 256 << 20;
/// How long a `role` command's lock on a role lives if the command dies holding it.
pub const ROLE_LOCK_TTL: Duration = Duration::from_secs(60);

/// Why a read or write of the catalog in etcd failed.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// The tokio runtime for the etcd client could not be built.
    #[error("cannot start the etcd client: {0}")]
    Runtime(std::io::Error),
    /// etcd refused a request, or could not be reached.
    #[error("etcd at {endpoints}: {source}")]
    Request {
        /// The endpoints of the URL.
        endpoints: String,
        /// The client's error.
        source: etcd_client::Error,
    },
    /// etcd did not answer within [`REQUEST_TIMEOUT`] (down, or unreachable).
    #[error("etcd at {endpoints} did not answer within {} s", REQUEST_TIMEOUT.as_secs())]
    Timeout {
        /// The endpoints of the URL.
        endpoints: String,
    },
    /// The keys under the prefix do not make a valid catalog.
    #[error("the catalog in etcd is not valid: {0}")]
    Catalog(#[from] CatalogError),
    /// Another `branchgate role` command holds the lock on this role.
    #[error(
        "another `branchgate role` command is changing this role right now ({holder}; lock {key}); \
         nothing was changed: run this command again once it is done"
    )]
    Locked {
        /// The lock's key.
        key: String,
        /// Who holds it, as the holder wrote it.
        holder: String,
    },
    /// A guarded write found that `key` changed since it was read: someone else wrote first.
    #[error(
        "{key} was changed in etcd by someone else since this command read it; nothing was written"
    )]
    Conflict {
        /// The key (or prefix) whose revision moved.
        key: String,
    },
    /// `catalog import` without `--replace` found keys under the prefix.
    #[error(
        "{prefix} already holds a catalog ({keys} keys): `branchgate catalog import --replace` \
         replaces it"
    )]
    NotEmpty {
        /// The catalog's prefix.
        prefix: String,
        /// How many keys it has.
        keys: usize,
    },
}

/// What a guarded role write expects to find (as read under the role's lock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoleGuard {
    /// The role key's `mod_revision`; 0 when the role has no key (a role being created).
    pub role_mod_revision: i64,
    /// The branch key's `create_revision`: the role is written into the branch that was read,
    /// not into one deleted and created again meanwhile.
    pub branch_create_revision: i64,
}

impl RoleGuard {
    /// The guard for `branch`/`role` in `snapshot`; `None` if the branch has no key.
    pub fn read(snapshot: &Snapshot, layout: &Layout, branch: &str, role: &str) -> Option<Self> {
        let branch_entry = snapshot.entries.get(&layout.branch_key(branch))?;
        let role_entry = snapshot.entries.get(&layout.role_key(branch, role));
        Some(RoleGuard {
            role_mod_revision: role_entry.map_or(0, |entry| entry.mod_revision),
            branch_create_revision: branch_entry.create_revision,
        })
    }
}

/// A held role lock: the lease its key lives on. Released with [`Store::unlock`], or by etcd
/// when the lease expires ([`ROLE_LOCK_TTL`]) if the holder died.
#[derive(Debug)]
#[must_use = "a lock is released with Store::unlock"]
pub struct RoleLock {
    /// The lease the lock key lives on; revoking it deletes the key.
    lease: i64,
}

/// What `catalog import` did.
#[derive(Debug)]
pub struct Imported {
    /// The catalog under the prefix before the import.
    pub previous: Snapshot,
    /// Keys written (new or changed).
    pub written: usize,
    /// Keys deleted (in the old catalog, not in the file).
    pub deleted: usize,
    /// The revision of the import's transaction.
    pub revision: i64,
}

/// A connection to the etcd cluster of one catalog URL (a clone shares the connection).
#[derive(Clone)]
pub struct Store {
    /// The etcd client (cheap to clone: one balanced channel).
    client: Client,
    /// The keys under the URL's prefix.
    layout: Layout,
    /// The URL's endpoints, for messages.
    endpoints: String,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("endpoints", &self.endpoints)
            .field("layout", &self.layout)
            .finish()
    }
}

/// Runs `future` to completion on a current-thread tokio runtime of its own: the commands
/// (`role`, `catalog`, `check-config`) are synchronous and talk to etcd only briefly.
pub fn block_on<F: Future>(future: F) -> Result<F::Output, EtcdError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(EtcdError::Runtime)?;
    Ok(runtime.block_on(future))
}

impl Store {
    /// A client for `url`'s endpoints. It connects lazily: an unreachable etcd shows at the
    /// first request (as a timeout), not here.
    pub async fn connect(url: &EtcdUrl) -> Result<Store, EtcdError> {
        let endpoints = url
            .endpoints()
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_keep_alive(KEEP_ALIVE_INTERVAL, KEEP_ALIVE_TIMEOUT)
            .with_keep_alive_while_idle(true);
        let client = match tokio::time::timeout(
            REQUEST_TIMEOUT,
            Client::connect(url.client_endpoints(), Some(options)),
        )
        .await
        {
            Ok(Ok(client)) => client,
            Ok(Err(source)) => return Err(EtcdError::Request { endpoints, source }),
            Err(_) => return Err(EtcdError::Timeout { endpoints }),
        };
        Ok(Store {
            client,
            layout: Layout::new(url.prefix()),
            endpoints,
        })
    }

    /// The key layout under this URL's prefix.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The etcd client, for requests this module does not wrap (the node registry's leases
    /// and watches); send them through [`Store::timed`].
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The error of a stream (a watch, a lease keep-alive) that failed, labelled like a
    /// request's.
    pub fn stream_error(&self, source: etcd_client::Error) -> EtcdError {
        EtcdError::Request {
            endpoints: self.endpoints.clone(),
            source,
        }
    }

    /// `request` with the deadline, its errors labelled with the endpoints.
    pub async fn timed<T>(
        &self,
        request: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, EtcdError> {
        match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(source)) => Err(EtcdError::Request {
                endpoints: self.endpoints.clone(),
                source,
            }),
            Err(_) => Err(EtcdError::Timeout {
                endpoints: self.endpoints.clone(),
            }),
        }
    }

    /// Every key under `<prefix>/catalog/`, in one range read, with the store's revision.
    pub async fn read(&mut self) -> Result<Snapshot, EtcdError> {
        let mut kv = self
            .client
            .kv_client()
            .max_decoding_message_size(MAX_RESPONSE_BYTES);
        let prefix = self.layout.catalog_prefix();
        let mut response = self
            .timed(kv.get(prefix, Some(GetOptions::new().with_prefix())))
            .await?;
        let revision = response.header().map_or(0, |h| h.revision());
        let entries = response
            .take_kvs()
            .into_iter()
            .map(|kv| {
                let (mod_revision, create_revision) = (kv.mod_revision(), kv.create_revision());
                let (key, value) = kv.into_key_value();
                let entry = Entry {
                    value,
                    mod_revision,
                    create_revision,
                };
                (String::from_utf8_lossy(&key).into_owned(), entry)
            })
            .collect();
        Ok(Snapshot { revision, entries })
    }

    /// Every key under `prefix` (values and leases), with the store's revision.
    pub async fn read_prefix(&mut self, prefix: &str) -> Result<(i64, Vec<KeyValue>), EtcdError> {
        let mut kv = self.client.kv_client();
        let mut response = self
            .timed(kv.get(prefix, Some(GetOptions::new().with_prefix())))
            .await?;
        let revision = response.header().map_or(0, |h| h.revision());
        Ok((revision, response.take_kvs()))
    }

    /// A watch on every key under `prefix`, from `revision` on (inclusive).
    pub async fn watch_prefix(
        &mut self,
        prefix: &str,
        revision: i64,
    ) -> Result<WatchStream, EtcdError> {
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision);
        let mut watch = self.client.watch_client();
        self.timed(watch.watch(prefix, Some(options))).await
    }

    /// A watch on `<prefix>/catalog/` from `revision` on (inclusive).
    pub async fn watch(&mut self, revision: i64) -> Result<WatchStream, EtcdError> {
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision);
        let mut watch = self
            .client
            .watch_client()
            .max_decoding_message_size(MAX_RESPONSE_BYTES);
        let prefix = self.layout.catalog_prefix();
        self.timed(watch.watch(prefix, Some(options))).await
    }

    /// Takes the lock on `branch`/`role` for one `role` command, or fails at once with
    /// [`EtcdError::Locked`] if another command holds it (no waiting: two operators resetting
    /// one role at the same moment is a mistake to report, not to queue).
    pub async fn lock_role(&mut self, branch: &str, role: &str) -> Result<RoleLock, EtcdError> {
        let key = self.layout.role_lock_key(branch, role);
        let ttl = i64::try_from(ROLE_LOCK_TTL.as_secs()).unwrap_or(i64::MAX);
        let mut client = self.client.clone();
        let lease = self.timed(client.lease_grant(ttl, None)).await?.id();
        let holder = format!("branchgate role, pid {}", std::process::id());
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                holder,
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(key.clone(), None)]);
        let mut client = self.client.clone();
        let response = match self.timed(client.txn(txn)).await {
            Ok(response) => response,
            Err(error) => {
                self.release(lease).await;
                return Err(error);
            }
        };
        if response.succeeded() {
            return Ok(RoleLock { lease });
        }
        self.release(lease).await;
        let holder = response
            .op_responses()
            .into_iter()
            .find_map(|op| match op {
                etcd_client::TxnOpResponse::Get(get) => get
                    .kvs()
                    .first()
                    .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
                _ => None,
            })
            .unwrap_or_else(|| "holder unknown".into());
        Err(EtcdError::Locked { key, holder })
    }

    /// Releases a role lock (its lease, and so its key). A failure is only logged: the lease
    /// expires by itself.
    pub async fn unlock(&mut self, lock: RoleLock) {
        self.release(lock.lease).await;
    }

    async fn release(&mut self, lease: i64) {
        let mut client = self.client.clone();
        if let Err(error) = self.timed(client.lease_revoke(lease)).await {
            tracing::warn!(%error, lease, "could not release an etcd lease; it expires by itself");
        }
    }

    /// Puts `verifier` as `branch`/`role`'s if `guard` still holds; the transaction's revision.
    pub async fn put_role(
        &mut self,
        branch: &str,
        role: &str,
        verifier: &str,
        guard: RoleGuard,
    ) -> Result<i64, EtcdError> {
        let role_key = self.layout.role_key(branch, role);
        let branch_key = self.layout.branch_key(branch);
        let txn = Txn::new()
            .when([
                Compare::mod_revision(role_key.clone(), CompareOp::Equal, guard.role_mod_revision),
                Compare::create_revision(
                    branch_key,
                    CompareOp::Equal,
                    guard.branch_create_revision,
                ),
            ])
            .and_then([TxnOp::put(role_key.clone(), verifier, None)]);
        let mut client = self.client.clone();
        let response = self.timed(client.txn(txn)).await?;
        if !response.succeeded() {
            return Err(EtcdError::Conflict { key: role_key });
        }
        Ok(response.header().map_or(0, |h| h.revision()))
    }

    /// Writes `keys` as the whole catalog, in one transaction: into an empty prefix, or with
    /// `replace` over the catalog there (keys it has and `keys` lacks are deleted, unchanged
    /// ones left alone), guarded by the revision of that read. etcd limits a transaction to
    /// `--max-txn-ops` operations (128 by default): a larger catalog needs a larger limit.
    pub async fn import(
        &mut self,
        keys: &BTreeMap<String, String>,
        replace: bool,
    ) -> Result<Imported, EtcdError> {
        let previous = self.read().await?;
        let prefix = self.layout.catalog_prefix();
        if !replace && !previous.entries.is_empty() {
            return Err(EtcdError::NotEmpty {
                prefix,
                keys: previous.entries.len(),
            });
        }
        let mut ops = Vec::new();
        let deleted: Vec<&String> = previous
            .entries
            .keys()
            .filter(|key| !keys.contains_key(*key))
            .collect();
        for key in &deleted {
            ops.push(TxnOp::delete(key.as_str(), None));
        }
        let mut written = 0;
        for (key, value) in keys {
            if previous.entries.get(key).map(|e| e.value.as_slice()) != Some(value.as_bytes()) {
                ops.push(TxnOp::put(key.as_str(), value.as_str(), None));
                written += 1;
            }
        }
        // Nothing under the prefix changed since the read: an empty range has no key with a
        // create_revision other than 0, and no key was written after `previous.revision`.
        let compare = if replace {
            Compare::mod_revision(prefix.clone(), CompareOp::Less, previous.revision + 1)
        } else {
            Compare::create_revision(prefix.clone(), CompareOp::Equal, 0)
        };
        let txn = Txn::new().when([compare.with_prefix()]).and_then(ops);
        let mut client = self.client.clone();
        let response = self.timed(client.txn(txn)).await?;
        if !response.succeeded() {
            return Err(EtcdError::Conflict { key: prefix });
        }
        Ok(Imported {
            written,
            deleted: deleted.len(),
            revision: response.header().map_or(0, |h| h.revision()),
            previous,
        })
    }
}
