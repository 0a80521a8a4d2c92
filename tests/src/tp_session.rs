//! A tokio-postgres session held open from synchronous test code (across router reloads,
//! shutdowns and password resets), driven by its own runtime.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::tokio_tls::MakeRustls;

/// How long connecting, a query, or the router ending the session may take.
const SESSION_TIMEOUT: Duration = Duration::from_secs(10);
/// One runtime thread is enough to drive one connection.
const RUNTIME_THREADS: usize = 1;

/// The task driving the connection; it ends with the session.
type ConnectionTask = tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>;

/// An open tokio-postgres session through the router, driven by its own runtime thread.
pub struct Session {
    runtime: tokio::runtime::Runtime,
    client: Option<tokio_postgres::Client>,
    connection: Option<ConnectionTask>,
}

impl Session {
    /// Connects (SSLRequest, then TLS verified with `tls` for `localhost`) as `user`.
    pub fn open(
        addr: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
        user: &str,
        password: &str,
    ) -> Result<Session, tokio_postgres::Error> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(RUNTIME_THREADS)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let mut config = tokio_postgres::Config::new();
        config
            .user(user)
            .password(password)
            .dbname("postgres")
            .ssl_mode(tokio_postgres::config::SslMode::Require);
        let tls = MakeRustls::new(tls)
            .connector("localhost")
            .expect("server name");
        let (client, connection) = runtime.block_on(async {
            let tcp = tokio::net::TcpStream::connect(addr)
                .await
                .expect("TCP connect to the router");
            tokio::time::timeout(SESSION_TIMEOUT, config.connect_raw(tcp, tls))
                .await
                .expect("connect did not finish in time")
        })?;
        let connection = runtime.spawn(connection);
        Ok(Session {
            runtime,
            client: Some(client),
            connection: Some(connection),
        })
    }

    /// Runs `sql` (simple protocol) and returns the first column of the first row.
    pub fn value(&self, sql: &str) -> Result<String, tokio_postgres::Error> {
        let client = self.client.as_ref().expect("session closed");
        let messages = self.runtime.block_on(async {
            tokio::time::timeout(SESSION_TIMEOUT, client.simple_query(sql))
                .await
                .expect("query did not finish in time")
        })?;
        Ok(messages
            .iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(row) => {
                    Some(row.get(0).unwrap_or("").to_owned())
                }
                _ => None,
            })
            .expect("query returned a row"))
    }

    /// Waits until the router ends the session and returns the error that ended it.
    pub fn ended_by_server(&mut self) -> tokio_postgres::Error {
        let task = self.connection.take().expect("already waited");
        let outcome = self.runtime.block_on(async {
            tokio::time::timeout(SESSION_TIMEOUT, task)
                .await
                .expect("the router did not end the session in time")
        });
        match outcome.expect("connection task panicked") {
            Ok(()) => panic!("the session ended without an error"),
            Err(error) => error,
        }
    }

    /// Closes the session from the client side (Terminate) and waits until it is gone.
    pub fn close(mut self) {
        drop(self.client.take());
        let task = self.connection.take().expect("already waited");
        let outcome = self.runtime.block_on(async {
            tokio::time::timeout(SESSION_TIMEOUT, task)
                .await
                .expect("the connection did not close in time")
        });
        outcome
            .expect("connection task panicked")
            .expect("clean close");
    }
}
