//! The control-plane thread of a router whose catalog is in etcd.
//!
//! It reads everything under `<prefix>/catalog/` once (one range read, at revision R), hands
//! that to the router's start, then follows a watch from R+1: each batch of events updates the
//! [`Latest`] snapshot and asks the router to reload, through the one reload path every catalog
//! change takes (the same build, the same guard, the same swap and closing of changed roles'
//! sessions as a file). When the watch fails (etcd down, a partition) or is cancelled (its
//! revision compacted), it reads everything again and watches from there.
//!
//! - **etcd unreachable at start**: a router with no catalog cannot serve anyone, so the start
//!   waits, retrying with backoff ([`BACKOFF_MIN`] doubling to [`BACKOFF_MAX`]) and logging
//!   each attempt, and binds nothing meanwhile.
//! - **unreachable later**: the catalog in force stays (stale but safe: sessions and logins go
//!   on), the loss is logged once, `branchgate_catalog_source_up` says 0, and the thread keeps
//!   retrying; once a read succeeds it logs once more, and the catalog read then (the whole
//!   prefix again) is applied.
//!
//! The thread runs a current-thread tokio runtime of its own; nothing tokio reaches a worker.

use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use etcd_client::{EventType, WatchResponse};
use tokio::sync::{oneshot, watch};

use super::layout::{Entry, Layout, Snapshot};
use super::store::{EtcdError, Store};
use super::url::EtcdUrl;
use crate::catalog::source::SourceState;
use crate::catalog::{Catalog, CatalogError};
use crate::fleet::registry::{NodeSetup, Registry, RegistryError};

/// First pause after a failed read.
pub const BACKOFF_MIN: Duration = Duration::from_millis(250);
/// Longest pause between two reads while etcd is unreachable.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// What the follower calls after it updated [`Latest`]: the router's reload.
pub type OnChange = Box<dyn Fn() + Send>;

/// The newest state of the catalog's keys the follower has seen, whether or not the catalog
/// it makes is in force (it may be invalid, or refused by the reload guard: a later change, or
/// `branchgate reload --force`, builds from here again).
#[derive(Debug)]
pub struct Latest {
    /// The keys' layout, for building the catalog and naming keys in errors.
    layout: Layout,
    /// The keys and their revision; replaced by a full read, updated by watch events.
    snapshot: Mutex<Snapshot>,
}

impl Latest {
    /// Nothing read yet, for the catalog under `layout`.
    pub fn new(layout: Layout) -> Latest {
        Latest {
            layout,
            snapshot: Mutex::new(Snapshot::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Snapshot> {
        // A snapshot is replaced or updated whole under the lock: nothing half-done to see.
        self.snapshot
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The catalog the latest keys make, and their revision.
    pub fn catalog(&self) -> Result<(Catalog, i64), CatalogError> {
        let snapshot = self.lock();
        Ok((snapshot.catalog(&self.layout)?, snapshot.revision))
    }

    /// The revision of the latest keys, and the catalog they make (or why they make none):
    /// what a node acknowledges, applied or refused.
    pub fn build(&self) -> (i64, Result<Catalog, CatalogError>) {
        let snapshot = self.lock();
        (snapshot.revision, snapshot.catalog(&self.layout))
    }

    /// The revision of the latest keys.
    pub fn revision(&self) -> i64 {
        self.lock().revision
    }

    fn replace(&self, snapshot: Snapshot) {
        *self.lock() = snapshot;
    }

    /// Applies one watch response's events; its header's revision becomes the snapshot's.
    fn apply(&self, response: &WatchResponse) {
        let mut snapshot = self.lock();
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            match event.event_type() {
                EventType::Put => {
                    let entry = Entry {
                        value: kv.value().to_vec(),
                        mod_revision: kv.mod_revision(),
                        create_revision: kv.create_revision(),
                    };
                    snapshot.entries.insert(key, entry);
                }
                EventType::Delete => {
                    snapshot.entries.remove(&key);
                }
            }
            snapshot.revision = snapshot.revision.max(kv.mod_revision());
        }
        if let Some(header) = response.header() {
            snapshot.revision = snapshot.revision.max(header.revision());
        }
    }
}

/// The control-plane thread. [`Follower::start`] spawns it and it reads the catalog;
/// [`FirstRead::wait`] waits for that; [`Follower::follow`] gives it the router's reload,
/// and it watches; [`Follower::stop`] ends it.
pub struct Follower {
    /// The thread, until [`Follower::stop`] joins it.
    thread: Option<JoinHandle<()>>,
    /// `true` asks the thread to end (it is waiting on etcd or on a pause meanwhile).
    stop: watch::Sender<bool>,
    /// Where [`Follower::follow`] sends the router's reload, once.
    on_change: Option<oneshot::Sender<OnChange>>,
}

/// The follower's first read of the catalog (and the node's registration before it), to wait
/// for (kept apart from [`Follower`], which a running router holds and must be shareable
/// between threads).
#[derive(Debug)]
pub struct FirstRead(mpsc::Receiver<Result<(), RegistryError>>);

/// Why the follower did not read the catalog.
#[derive(Debug, thiserror::Error)]
pub enum FirstReadError {
    /// The thread ended first (the router is stopping).
    #[error("the etcd thread ended before it read the catalog")]
    Ended,
    /// The node could not register (another live router has its id).
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

impl FirstRead {
    /// Blocks until the node registered (if it is one) and the first read of the catalog
    /// succeeded, retrying while etcd is unreachable, for as long as it takes.
    pub fn wait(self) -> Result<(), FirstReadError> {
        match self.0.recv() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(error.into()),
            Err(_) => Err(FirstReadError::Ended),
        }
    }
}

impl std::fmt::Debug for Follower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Follower")
            .field("running", &self.thread.is_some())
            .finish()
    }
}

/// How a watch ended.
enum WatchEnd {
    /// The router is stopping.
    Stopped,
    /// etcd cancelled it (its start revision was compacted, or for `reason`): read again.
    Cancelled(String),
    /// The stream failed (etcd unreachable): read again, once etcd answers.
    Failed(EtcdError),
}

impl Follower {
    /// Spawns the thread, which registers `node` (if any; then keeps it registered) and starts
    /// reading the catalog at `url` into `latest`.
    pub fn start(
        url: EtcdUrl,
        latest: Arc<Latest>,
        state: Arc<SourceState>,
        node: Option<NodeSetup>,
    ) -> std::io::Result<(Follower, FirstRead)> {
        let (stop, stop_rx) = watch::channel(false);
        let (first_tx, first) = mpsc::channel();
        let (on_change, on_change_rx) = oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread = std::thread::Builder::new()
            .name("branchgate-etcd".into())
            .spawn(move || {
                let run = Run {
                    url,
                    latest,
                    state,
                    stop: stop_rx,
                    node,
                };
                runtime.block_on(run.run(first_tx, on_change_rx));
            })?;
        let follower = Follower {
            thread: Some(thread),
            stop,
            on_change: Some(on_change),
        };
        Ok((follower, FirstRead(first)))
    }

    /// From now on, each change read from etcd calls `on_change` (after updating
    /// [`Latest`]); the watch starts from the revision after the first read.
    pub fn follow(&mut self, on_change: OnChange) {
        if let Some(sender) = self.on_change.take() {
            // The thread ended already (stopped): nothing to follow.
            let _ = sender.send(on_change);
        }
    }

    /// Ends the thread and waits for it.
    pub fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A follower dropped without [`Follower::stop`] (a start that failed after it began) still
/// ends its thread, without waiting for it.
impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// The thread's state.
struct Run {
    /// The catalog's URL.
    url: EtcdUrl,
    /// Where the keys read go.
    latest: Arc<Latest>,
    /// What `/metrics` says about etcd.
    state: Arc<SourceState>,
    /// Set when the router stops.
    stop: watch::Receiver<bool>,
    /// What the node registers, when the router is a fleet's node.
    node: Option<NodeSetup>,
}

/// Where the first read's outcome goes.
type FirstSender = mpsc::Sender<Result<(), RegistryError>>;

impl Run {
    /// Registers the node (if any), then runs the registry beside the catalog's follower.
    async fn run(mut self, first: FirstSender, on_change: oneshot::Receiver<OnChange>) {
        let Some(mut store) = self.connect().await else {
            return;
        };
        let registry = match self.node.take() {
            None => None,
            Some(setup) => {
                let layout = Layout::new(self.url.prefix());
                let mut registry = Registry::new(setup, layout);
                if !self.register(&mut registry, &mut store, &first).await {
                    return;
                }
                Some(registry)
            }
        };
        match registry {
            None => self.follow(store, first, on_change).await,
            Some(registry) => {
                let stop = self.stop.clone();
                let registry_store = store.clone();
                tokio::join!(
                    registry.run(registry_store, stop),
                    self.follow(store, first, on_change)
                );
            }
        }
    }

    /// Registers the node, retrying while etcd is unreachable; `false` if it cannot (its id is
    /// taken: sent to the router's start, which fails) or the router stopped meanwhile.
    async fn register(
        &mut self,
        registry: &mut Registry,
        store: &mut Store,
        first: &FirstSender,
    ) -> bool {
        let mut backoff = BACKOFF_MIN;
        loop {
            match registry.register(store).await {
                Ok(()) => return true,
                Err(RegistryError::Etcd(error)) => {
                    tracing::warn!(
                        %error,
                        retry_in = ?backoff,
                        "cannot register this node in etcd: this router accepts no client until \
                         it has; retrying"
                    );
                    if !self.pause(&mut backoff).await {
                        return false;
                    }
                }
                Err(error) => {
                    let _ = first.send(Err(error));
                    return false;
                }
            }
        }
    }

    /// The catalog's first read, then its watch, until stopped.
    async fn follow(
        &mut self,
        mut store: Store,
        first: FirstSender,
        on_change: oneshot::Receiver<OnChange>,
    ) {
        let Some(snapshot) = self.first_read(&mut store).await else {
            return;
        };
        let mut revision = snapshot.revision;
        self.latest.replace(snapshot);
        self.state.set_up(true);
        let _ = first.send(Ok(()));
        let on_change = tokio::select! {
            _ = stopped(&mut self.stop) => return,
            on_change = on_change => match on_change {
                Ok(on_change) => on_change,
                // The router did not start after all.
                Err(_) => return,
            },
        };
        tracing::info!(
            url = %self.url,
            revision,
            "catalog loaded from etcd; following its changes"
        );
        // When etcd stopped answering, for the one log line when it answers again.
        let mut down_since: Option<Instant> = None;
        loop {
            let end = self
                .follow_watch(&mut store, revision, &on_change, &mut down_since)
                .await;
            match end {
                WatchEnd::Stopped => return,
                WatchEnd::Cancelled(reason) => tracing::info!(
                    %reason,
                    "the etcd watch was cancelled; reading the whole catalog again"
                ),
                WatchEnd::Failed(error) => self.went_down(&mut down_since, &error),
            }
            let mut backoff = BACKOFF_MIN;
            revision = loop {
                match store.read().await {
                    Ok(snapshot) => {
                        let revision = snapshot.revision;
                        self.latest.replace(snapshot);
                        self.state.set_up(true);
                        if let Some(since) = down_since.take() {
                            tracing::info!(
                                after = ?since.elapsed(),
                                revision,
                                "etcd answers again: catalog read again and applied"
                            );
                        }
                        on_change();
                        break revision;
                    }
                    Err(error) => {
                        self.went_down(&mut down_since, &error);
                        if !self.pause(&mut backoff).await {
                            return;
                        }
                    }
                }
            };
        }
    }

    /// Logs, once per outage, that etcd stopped answering; the gauge says it too.
    fn went_down(&self, down_since: &mut Option<Instant>, error: &EtcdError) {
        self.state.set_up(false);
        if down_since.is_none() {
            *down_since = Some(Instant::now());
            tracing::warn!(
                %error,
                revision = self.latest.revision(),
                "etcd is unreachable: the catalog in force stays (logins and sessions go on) \
                 until it answers again; retrying"
            );
        } else {
            tracing::debug!(%error, "etcd still unreachable");
        }
    }

    async fn connect(&mut self) -> Option<Store> {
        let mut backoff = BACKOFF_MIN;
        loop {
            match Store::connect(&self.url).await {
                Ok(store) => return Some(store),
                Err(error) => {
                    tracing::warn!(%error, retry_in = ?backoff, "cannot set up the etcd client");
                    if !self.pause(&mut backoff).await {
                        return None;
                    }
                }
            }
        }
    }

    /// The first read, retried for as long as it takes (or until stopped).
    async fn first_read(&mut self, store: &mut Store) -> Option<Snapshot> {
        let mut backoff = BACKOFF_MIN;
        loop {
            match store.read().await {
                Ok(snapshot) => return Some(snapshot),
                Err(error) => {
                    tracing::warn!(
                        %error,
                        retry_in = ?backoff,
                        "cannot read the catalog from etcd: this router accepts no client until \
                         it has one; retrying"
                    );
                    if !self.pause(&mut backoff).await {
                        return None;
                    }
                }
            }
        }
    }

    /// Waits `backoff` (then doubles it, up to [`BACKOFF_MAX`]); `false` if stopped meanwhile.
    async fn pause(&mut self, backoff: &mut Duration) -> bool {
        let wait = *backoff;
        *backoff = (*backoff * 2).min(BACKOFF_MAX);
        tokio::select! {
            _ = stopped(&mut self.stop) => false,
            _ = tokio::time::sleep(wait) => true,
        }
    }

    /// Watches from `revision + 1`, applying each batch of events, until the watch ends.
    async fn follow_watch(
        &mut self,
        store: &mut Store,
        revision: i64,
        on_change: &OnChange,
        down_since: &mut Option<Instant>,
    ) -> WatchEnd {
        let mut stream = tokio::select! {
            _ = stopped(&mut self.stop) => return WatchEnd::Stopped,
            stream = store.watch(revision + 1) => match stream {
                Ok(stream) => stream,
                Err(error) => return WatchEnd::Failed(error),
            },
        };
        loop {
            let message = tokio::select! {
                _ = stopped(&mut self.stop) => return WatchEnd::Stopped,
                message = stream.message() => message,
            };
            let response = match message {
                Ok(Some(response)) => response,
                Ok(None) => {
                    let closed = etcd_client::Error::WatchError("the watch stream ended".into());
                    return WatchEnd::Failed(request_error(&self.url, closed));
                }
                Err(error) => return WatchEnd::Failed(request_error(&self.url, error)),
            };
            if response.canceled() {
                let reason = if response.compact_revision() > 0 {
                    format!(
                        "revision {} was compacted (oldest kept: {})",
                        revision + 1,
                        response.compact_revision()
                    )
                } else {
                    response.cancel_reason().to_owned()
                };
                return WatchEnd::Cancelled(reason);
            }
            if response.created() {
                self.state.set_up(true);
                if let Some(since) = down_since.take() {
                    tracing::info!(after = ?since.elapsed(), "etcd answers again");
                }
            }
            if !response.events().is_empty() {
                self.latest.apply(&response);
                on_change();
            }
        }
    }
}

/// A watch stream's error, labelled like a request's.
fn request_error(url: &EtcdUrl, source: etcd_client::Error) -> EtcdError {
    let endpoints = url
        .endpoints()
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    EtcdError::Request { endpoints, source }
}

/// Resolves once the router asks the thread to stop (or is gone).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    while !*stop.borrow_and_update() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}
