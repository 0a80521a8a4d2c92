//! tokio-postgres over tokio-rustls: the TLS connector tokio-postgres needs, verified against the
//! test CA, plus small helpers for driving a client from a synchronous test.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rustls_pki_types::{InvalidDnsNameError, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::error::SqlState;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use tokio_postgres::{Client, Config};
use tokio_rustls::TlsConnector;

/// Worker threads of the runtime [`block_on`] builds.
const RUNTIME_THREADS: usize = 2;
/// How long a query may take to show up as active in pg_stat_activity.
const ACTIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between pg_stat_activity polls.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// `MakeTlsConnect` for tokio-rustls; remembers the ALPN protocol of the last handshake.
#[derive(Clone)]
pub struct MakeRustls {
    config: Arc<rustls::ClientConfig>,
    alpn: Arc<Mutex<Option<Vec<u8>>>>,
}

impl MakeRustls {
    /// A connector using `config` (usually [`Certs::client_config`](crate::Certs::client_config)).
    pub fn new(config: Arc<rustls::ClientConfig>) -> MakeRustls {
        MakeRustls {
            config,
            alpn: Arc::new(Mutex::new(None)),
        }
    }

    /// The ALPN protocol the server chose in the last handshake, if any.
    pub fn last_alpn(&self) -> Option<Vec<u8>> {
        self.alpn.lock().expect("alpn lock").clone()
    }

    /// A one-shot connector checking the certificate for `domain`, for `Config::connect_raw`.
    pub fn connector(&self, domain: &str) -> Result<RustlsConnect, InvalidDnsNameError> {
        Ok(RustlsConnect {
            connector: TlsConnector::from(self.config.clone()),
            name: ServerName::try_from(domain.to_owned())?,
            alpn: self.alpn.clone(),
        })
    }
}

impl<S> MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = InvalidDnsNameError;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, Self::Error> {
        self.connector(domain)
    }
}

/// `TlsConnect` for one connection, made by [`MakeRustls`].
pub struct RustlsConnect {
    connector: TlsConnector,
    name: ServerName<'static>,
    alpn: Arc<Mutex<Option<Vec<u8>>>>,
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let tls = self.connector.connect(self.name, stream).await?;
            *self.alpn.lock().expect("alpn lock") = tls.get_ref().1.alpn_protocol().map(Vec::from);
            Ok(RustlsStream(tls))
        })
    }
}

/// A tokio-rustls client stream as tokio-postgres wants it.
pub struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        // The router offers SCRAM-SHA-256 without -PLUS, so there is nothing to bind to.
        ChannelBinding::none()
    }
}

/// Connects and drives the connection in a task of the current runtime.
pub async fn tp_connect_with(
    config: &Config,
    tls: MakeRustls,
) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = config.connect(tls).await?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            eprintln!("tokio-postgres connection ended: {error}");
        }
    });
    Ok(client)
}

/// A fresh multi-threaded runtime: blocking helpers may run on the test thread meanwhile.
pub fn block_on<F: Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(RUNTIME_THREADS)
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(future)
}

/// The SQLSTATE of a server error, panicking (with the error) on any other kind of failure.
pub fn sqlstate(error: &tokio_postgres::Error) -> &SqlState {
    error
        .as_db_error()
        .unwrap_or_else(|| panic!("expected a server error, got: {error:?}"))
        .code()
}

/// Asserts that `error` is a database error with `code` and a message containing `text`.
pub fn assert_db_error(error: &tokio_postgres::Error, code: &SqlState, text: &str) {
    let db = error
        .as_db_error()
        .unwrap_or_else(|| panic!("expected a database error {code:?}, got: {error}"));
    assert_eq!(db.code(), code, "{db:?}");
    assert!(db.message().contains(text), "{db:?}");
}

/// Polls (through `watcher`) until backend `pid` runs `query`.
pub async fn wait_active(watcher: &Client, pid: i32, query: &str) {
    let deadline = Instant::now() + ACTIVE_TIMEOUT;
    loop {
        let row = watcher
            .query_opt(
                "SELECT state FROM pg_stat_activity WHERE pid = $1 AND query = $2",
                &[&pid, &query],
            )
            .await
            .expect("read pg_stat_activity");
        if row.is_some_and(|r| r.get::<_, Option<&str>>(0) == Some("active")) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "backend {pid} did not start `{query}` within {ACTIVE_TIMEOUT:?}"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}
