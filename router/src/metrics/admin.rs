//! The admin endpoint (`[listen] admin`): `GET /metrics` (OpenMetrics text) and `GET /healthz`,
//! served by hyper (HTTP/1.1) on a current-thread tokio runtime in a thread of its own, away
//! from the workers.
//!
//! Bounds: at most [`MAX_CONNECTIONS`] connections at once (more wait in the listen backlog),
//! request headers within [`HEADER_TIMEOUT`], each connection closed after
//! [`CONNECTION_TIMEOUT`]; requests have no body the server reads.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;

use super::collect::RouterCollector;
use crate::worker::Shared;

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 16;
/// A client must send its request headers within this.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection is closed this long after it was accepted, whatever it is doing.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// What `/metrics` answers with.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The running admin endpoint.
#[derive(Debug)]
pub struct AdminServer {
    addr: SocketAddr,
    stop: Arc<tokio::sync::Notify>,
    thread: Option<JoinHandle<()>>,
}

/// Why the admin endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Binding `[listen] admin` failed.
    #[error("cannot listen on the admin address {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The thread or its runtime could not start.
    #[error("cannot start the admin endpoint: {0}")]
    Start(std::io::Error),
}

/// Binds `addr` for [`AdminServer::start`] (at start-up, with the router's other listeners).
/// SO_REUSEPORT, as the client ports: a router taking over (`branchgate run --takeover`) binds
/// it while the old one still serves its drain.
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, AdminError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let bound = || -> std::io::Result<std::net::TcpListener> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(64)?;
        Ok(socket.into())
    };
    bound().map_err(|source| AdminError::Bind { addr, source })
}

impl AdminServer {
    /// Serves `listener` ([`bind`]) until [`AdminServer::stop`]. `/healthz` answers 503 once
    /// `stopping` is set.
    pub fn start(
        listener: std::net::TcpListener,
        shared: Arc<Shared>,
        stopping: Arc<AtomicBool>,
    ) -> Result<AdminServer, AdminError> {
        let local = listener.local_addr().map_err(AdminError::Start)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(AdminError::Start)?;
        let stop = Arc::new(tokio::sync::Notify::new());
        let mut registry = Registry::default();
        registry.register_collector(Box::new(RouterCollector::new(shared)));
        let state = Arc::new(State { registry, stopping });
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("branchgate-admin".into())
            .spawn(move || runtime.block_on(serve(listener, state, stopped)))
            .map_err(AdminError::Start)?;
        Ok(AdminServer {
            addr: local,
            stop,
            thread: Some(thread),
        })
    }

    /// The address it listens on (the real port if 0 was configured).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, ends the connections being served, and waits for the thread.
    pub fn stop(mut self) {
        self.stop.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct State {
    registry: Registry,
    stopping: Arc<AtomicBool>,
}

async fn serve(listener: std::net::TcpListener, state: Arc<State>, stop: Arc<tokio::sync::Notify>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(%error, "admin endpoint: cannot use its socket");
            return;
        }
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let connections = tokio::task::LocalSet::new();
    connections
        .run_until(async {
            loop {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let (stream, peer) = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(error) => {
                            tracing::debug!(%error, "admin endpoint: accept failed");
                            continue;
                        }
                    },
                    () = stop.notified() => return,
                };
                let state = state.clone();
                tokio::task::spawn_local(async move {
                    let _slot = slot;
                    let service = hyper::service::service_fn(move |request| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(answer(&state, &request)) }
                    });
                    let connection = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(HEADER_TIMEOUT)
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(stream), service);
                    match tokio::time::timeout(CONNECTION_TIMEOUT, connection).await {
                        Ok(Ok(())) => {}
                        Ok(Err(error)) => tracing::debug!(%peer, %error, "admin connection failed"),
                        Err(_) => tracing::debug!(%peer, "admin connection timed out"),
                    }
                });
            }
        })
        .await;
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn answer(state: &State, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "GET or HEAD\n");
        response
            .headers_mut()
            .insert(hyper::header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match request.uri().path() {
        "/metrics" => {
            let mut body = String::with_capacity(16 * 1024);
            if let Err(error) =
                prometheus_client::encoding::text::encode(&mut body, &state.registry)
            {
                tracing::warn!(%error, "admin endpoint: cannot encode the metrics");
                return text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "cannot encode the metrics\n",
                );
            }
            let mut response = Response::new(Full::new(Bytes::from(body)));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(OPENMETRICS));
            response
        }
        "/healthz" if state.stopping.load(Ordering::Relaxed) => {
            text(StatusCode::SERVICE_UNAVAILABLE, "stopping\n")
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        _ => text(StatusCode::NOT_FOUND, "not found: /metrics or /healthz\n"),
    }
}
