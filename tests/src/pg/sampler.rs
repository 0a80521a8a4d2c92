//! [`BackendSampler`]: how many client backends a role has in pg_stat_activity, at its peak
//! while a test runs load through a pooler.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Duration;

use tokio_postgres::{Config, NoTls};

use super::PgServer;
use crate::clients::Conninfo;
use crate::{ADMIN_PASSWORD, ADMIN_USER};

/// Counts a role's client backends in pg_stat_activity from a connection of the superuser
/// (which the count leaves out by its user name), sampling until stopped.
pub struct BackendSampler {
    stop: Arc<AtomicBool>,
    handle: thread::JoinHandle<(usize, usize)>,
}

impl BackendSampler {
    /// Starts sampling `role`'s backends on `pg`; returns once the first sample has been taken.
    pub fn start(pg: &PgServer, role: &str) -> BackendSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let dsn = Conninfo::new(pg.addr())
            .user(ADMIN_USER)
            .password(ADMIN_PASSWORD)
            .no_tls()
            .to_string();
        let role = role.to_owned();
        let handle = thread::spawn({
            let stop = stop.clone();
            move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime")
                    .block_on(async move {
                        let config: Config = dsn.parse().expect("admin conninfo");
                        let (client, connection) =
                            config.connect(NoTls).await.expect("sampler connects");
                        tokio::spawn(connection);
                        let (mut peak, mut samples) = (0usize, 0usize);
                        loop {
                            let row = client
                                .query_one(
                                    "SELECT count(*) FROM pg_stat_activity \
                                     WHERE usename = $1 AND backend_type = 'client backend'",
                                    &[&role],
                                )
                                .await
                                .expect("sample pg_stat_activity");
                            let count = usize::try_from(row.get::<_, i64>(0)).expect("count");
                            peak = peak.max(count);
                            samples += 1;
                            if samples == 1 {
                                let _ = ready_tx.send(());
                            }
                            if stop.load(Ordering::Relaxed) {
                                return (peak, samples);
                            }
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    })
            }
        });
        ready_rx.recv().expect("the sampler took its first sample");
        BackendSampler { stop, handle }
    }

    /// The highest count seen, and how many samples were taken.
    pub fn stop(self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("sampler thread")
    }
}
