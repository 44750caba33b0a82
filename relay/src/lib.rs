//! The relay: publishes committed outbox rows to NATS JetStream, at least once, deduplicated
//! by the broker (`Nats-Msg-Id`), in commit order per partition key, with backoff on failure.
//!
//! [`Relay::run`] (or [`run`]) drives everything until its shutdown future completes; the
//! `relay` binary (`src/main.rs`, its subcommands in `src/cli/`) wraps it with flags,
//! environment variables, signals, logging and the HTTP endpoints.
//!
//! # Guarantees
//! - Every committed outbox row is published at least once; a duplicate within the stream's
//!   duplicate window is dropped by the broker, so the stream holds it once.
//! - Messages with the same partition key are published in `seq` (commit) order: never two
//!   of one key unacknowledged at once, across batches and across instances.
//! - A row is marked published only after its PubAck; a crash between publish and mark
//!   republishes it with the same id. A claim is a transaction holding row locks, so a
//!   crashed relay's claims end with its database sessions: nothing waits for an expiry.
//! - A failing row never blocks other keys; after `max_permanent_attempts` permanent
//!   failures it moves to `dead_letter` with the reason. Broker outages never dead-letter.
//! - On shutdown the relay finishes in-flight publishes, commits its claims (rows it did not
//!   publish stay `pending`) and gives up its partitions.
//! - Its tasks are supervised: if one panics or ends on its own, the relay turns not ready,
//!   stops the others and [`Relay::run`] returns [`Error::TaskFailed`]; never a half-alive
//!   process.
//!
//! # Layout
//! - [`config`]: [`RelayConfig`] with defaults and `validate()`.
//! - [`publisher`]: the [`Publisher`] seam, JetStream and in-memory implementations, stream
//!   creation/verification.
//! - `dispatcher` (private): the event loop: claim, publish, mark, overlapped; per-key
//!   ordering. Its `outcome` half writes what a batch's rows came to: published marks,
//!   failed attempts with their retry delay, dead letters.
//! - `partitions` (private): partition leases shared among instances.
//! - `maintenance` (private): cleaner, vacuum, backlog stats.
//! - [`store`]: SQL on the relay's own tables (instances, partition leases).
//! - [`reconcile`]: republish rows the stream no longer holds.
//! - [`health`]: readiness state; [`http`]: `/health`, `/health/ready`, `/metrics`.
//! - [`metrics`]: metric names.
//! - [`error`]: the crate error, [`Error`].
//! - `supervisor` (private): runs the relay's tasks and reports the first that fails.
//! - [`wal`]: the WAL source, [`wal::WalRelay`]: publishes from a logical replication slot
//!   (log storage messages and `outbox_message` INSERTs) instead of polling.

pub mod config;
mod dispatcher;
pub mod error;
pub mod health;
pub mod http;
mod maintenance;
pub mod metrics;
mod partitions;
pub mod publisher;
pub mod reconcile;
pub mod store;
mod supervisor;
pub mod wal;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::RelayConfig;
pub use error::Error;
pub use health::{Health, HealthReport};
pub use publisher::Publisher;

/// The `LISTEN` channel the optional notify trigger signals.
pub const NOTIFY_CHANNEL: &str = "outbox_message";

/// A configured relay, ready to run.
pub struct Relay<P> {
    config: RelayConfig,
    pool: PgPool,
    publisher: Arc<P>,
    health: Health,
}

impl<P: Publisher> Relay<P> {
    /// Validates the configuration and the pool: it must allow at least
    /// [`RelayConfig::min_connections`] connections.
    pub fn new(config: RelayConfig, pool: PgPool, publisher: P) -> Result<Self, Error> {
        config.validate()?;
        let needed = config.min_connections();
        let max = pool.options().get_max_connections();
        if max < needed {
            return Err(Error::Config(format!(
                "the database pool allows {max} connections; the relay needs at least {needed}"
            )));
        }
        Ok(Relay {
            config,
            pool,
            publisher: Arc::new(publisher),
            health: Health::default(),
        })
    }

    /// The readiness state, updated while the relay runs.
    pub fn health(&self) -> Health {
        self.health.clone()
    }

    /// Publishes until `shutdown` completes, then stops cleanly (see the crate guarantees).
    /// Returns an error if it cannot start, or [`Error::TaskFailed`] (after stopping every
    /// task) if one of its tasks panics or ends unasked; database and broker failures while
    /// running are retried with backoff and reported through [`Health`].
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let Relay {
            config,
            pool,
            publisher,
            health,
        } = self;
        let me = config.instance_id.clone();
        // Fail fast when the database cannot be reached at start.
        drop(pool.acquire().await?);
        health.set_database(true);
        health.set_broker(publisher.is_connected());
        tracing::info!(instance = %me, "relay starting");

        let stop_dispatch = CancellationToken::new();
        let stop_background = CancellationToken::new();
        let supervisor = supervisor::Supervisor::default();
        let tasks = TaskTracker::new();
        let wake = Arc::new(Notify::new());
        let background = |name, task| {
            tasks.spawn(supervisor.watch(name, stop_background.clone(), task));
        };
        background(
            "partitions",
            partitions::run(
                config.clone(),
                pool.clone(),
                health.clone(),
                stop_background.clone(),
            )
            .boxed(),
        );
        background(
            "vacuum",
            maintenance::vacuum(config.clone(), pool.clone(), stop_background.clone()).boxed(),
        );
        background(
            "cleaner",
            maintenance::cleaner(config.clone(), pool.clone(), stop_background.clone()).boxed(),
        );
        background(
            "stats",
            maintenance::stats(
                config.clone(),
                pool.clone(),
                health.clone(),
                stop_background.clone(),
            )
            .boxed(),
        );
        background(
            "broker-watch",
            watch_broker(publisher.clone(), health.clone(), stop_background.clone()).boxed(),
        );
        if config.listen_notify {
            background(
                "listen",
                listen(pool.clone(), wake.clone(), stop_background.clone()).boxed(),
            );
        }
        tasks.close();

        let dispatcher = dispatcher::Dispatcher::new(config, pool, publisher, health.clone(), wake);
        let dispatch = tokio::spawn(supervisor.watch(
            "dispatcher",
            stop_dispatch.clone(),
            dispatcher.run(stop_dispatch.clone()).boxed(),
        ));
        tokio::select! {
            () = shutdown => {}
            () = supervisor.failed() => health.set_failed(),
        }
        stop_dispatch.cancel();
        if let Err(e) = dispatch.await {
            supervisor.record("dispatcher", e.to_string());
        }
        // Only now give up partitions: nothing of ours is in flight any more.
        stop_background.cancel();
        tasks.wait().await;
        if let Some((task, reason)) = supervisor.first_failure() {
            health.set_failed();
            tracing::error!(instance = %me, task, reason = %reason, "relay stopped: a task failed");
            return Err(Error::TaskFailed { task, reason });
        }
        tracing::info!(instance = %me, "relay stopped");
        Ok(())
    }
}

/// Builds a [`Relay`] and runs it; see [`Relay::run`].
pub async fn run<P: Publisher>(
    config: RelayConfig,
    pool: PgPool,
    publisher: P,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    Relay::new(config, pool, publisher)?.run(shutdown).await
}

pub(crate) async fn watch_broker<P: Publisher>(
    publisher: Arc<P>,
    health: Health,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => health.set_broker(publisher.is_connected()),
        }
    }
}

/// Wakes the dispatcher on `NOTIFY outbox_message`; reconnects with a delay on failure.
async fn listen(pool: PgPool, wake: Arc<Notify>, stop: CancellationToken) {
    loop {
        let session = async {
            let mut listener = sqlx::postgres::PgListener::connect_with(&pool).await?;
            listener.listen(NOTIFY_CHANNEL).await?;
            tracing::info!("listening for outbox notifications");
            loop {
                listener.recv().await?;
                wake.notify_one();
            }
            #[allow(unreachable_code)]
            Ok::<(), sqlx::Error>(())
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            result = session => {
                if let Err(e) = result {
                    tracing::warn!(error = %e, "LISTEN connection failed; retrying");
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
