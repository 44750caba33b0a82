//! The WAL source (`relay run --source wal`): publishes the outbox from a logical
//! replication slot instead of polling `outbox_message`.
//!
//! What it reads: the log storage's messages (`pg_logical_emit_message` with prefix
//! `outbox`, see [`envelope::wal`]) and INSERTs into `outbox_message` (so producers that
//! write rows, in any language, need no change), in commit order, through the publication
//! and `pgoutput` slot that `relay slot create` makes (both named `outbox_relay` by default).
//!
//! # Guarantees
//! - Every outbox message committed after the slot was created is published at least once,
//!   deduplicated by the broker (`Nats-Msg-Id`) inside its duplicate window.
//! - One key's messages are published in commit order, never two of a key unacknowledged.
//! - The slot's confirmed position only passes transactions whose every message is
//!   acknowledged or dead-lettered (and whose table rows are deleted, waiting for rows the
//!   log has before they are visible), and it is reported to
//!   the server at least every second: after a crash, at most the unconfirmed tail is sent
//!   again, and the duplicate window absorbs it.
//! - The confirmed position is committed to `outbox_wal_progress` before the slot is told,
//!   and a session starts from the greater of the two: a PostgreSQL crash, which can set a
//!   slot's position back to the last one saved to disk, does not make the relay send again
//!   what it had confirmed.
//! - A message that cannot be published (invalid, or permanently refused
//!   `max_permanent_attempts` times) goes to `dead_letter` with its reason.
//! - A log message of an unknown format version stops the relay with an error before its
//!   transaction is confirmed: it is read again by a newer relay, never skipped.
//! - One instance streams the slot; others wait as hot standbys and take over within about
//!   a second of its session ending (a killed relay's session ends with its connection).
//! - Readiness is false while the slot is missing or this instance is reconnecting; a slot
//!   that disappears stops the relay with an error.
//!
//! # Layout
//! - [`store`]: the slot, its publication and prerequisites (SQL), the pipeline's writes.
//! - `decode` (private): replication records to outbox messages (log messages, `pgoutput`
//!   INSERTs in binary format).
//! - `pipeline` (private): per-key publishing, retries, dead letters, the confirmed position.
//! - `cleanup` (private): deleting the table rows of resolved transactions, none left behind.
//! - `progress` (private): the confirmed position, recorded before the slot is told.
//! - `session` (private): the replication connection, standby and reconnection.
//! - `metrics` (private): the WAL gauges.

mod cleanup;
mod decode;
mod metrics;
mod pipeline;
mod progress;
mod session;
pub mod store;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub use self::store::{SlotName, SlotStatus};
use crate::config::RelayConfig;
use crate::error::Error;
use crate::health::Health;
use crate::publisher::Publisher;

/// Where the WAL source reads.
#[derive(Debug, Clone)]
pub struct WalSettings {
    /// The slot and its publication.
    pub slot: SlotName,
    /// A `postgres://` URL for the replication connection (its role needs REPLICATION). TLS
    /// is not supported on it yet: a URL with `sslmode=require` (or `verify-*`) is refused.
    pub database_url: String,
}

/// How long the checks at start are retried through connection losses (a database
/// restarting as the relay starts).
const START_PATIENCE: Duration = Duration::from_secs(30);

/// The prerequisites and the slot, checked at start.
async fn start_checks(pool: &PgPool, slot: &SlotName) -> Result<(), Error> {
    let mut conn = pool.acquire().await?;
    store::check_prerequisites(&mut conn, slot).await?;
    store::check_privileges(&mut conn, slot).await?;
    match store::status(&mut conn, slot).await? {
        Some(existing) => store::check_usable(&mut conn, slot, &existing).await,
        None => Err(Error::Slot {
            slot: slot.to_string(),
            reason: "it does not exist: create it with `relay slot create` (before producers write to the log)".to_owned(),
        }),
    }
}

/// A lost connection or a server shutting down or starting: retrying can succeed.
fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut => true,
        sqlx::Error::Database(db) => matches!(
            db.code().as_deref(),
            // admin_shutdown, crash_shutdown, cannot_connect_now
            Some("57P01" | "57P02" | "57P03")
        ),
        _ => false,
    }
}

/// A relay publishing from a replication slot; see the module docs.
pub struct WalRelay<P> {
    config: RelayConfig,
    settings: WalSettings,
    pool: PgPool,
    publisher: Arc<P>,
    health: Health,
}

impl<P: Publisher> WalRelay<P> {
    /// Validates the configuration. `pool` serves dead letters, row deletes and slot checks.
    pub fn new(
        config: RelayConfig,
        settings: WalSettings,
        pool: PgPool,
        publisher: P,
    ) -> Result<Self, Error> {
        config.validate()?;
        let health = Health::default();
        health.set_wal(false, false);
        Ok(WalRelay {
            config,
            settings,
            pool,
            publisher: Arc::new(publisher),
            health,
        })
    }

    /// The readiness state, updated while the relay runs.
    pub fn health(&self) -> Health {
        self.health.clone()
    }

    /// Publishes until `shutdown` completes, then finishes what is in flight, confirms it and
    /// closes the session. Fails at start when `wal_level` is not `logical`, the role lacks
    /// REPLICATION or the slot is missing; fails later only when the slot disappears, its WAL
    /// is lost, or a message has an unknown format version.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let WalRelay {
            config,
            settings,
            pool,
            publisher,
            health,
        } = self;
        // A database restarting just then is waited out; what retrying cannot mend is not.
        let started = tokio::time::Instant::now();
        loop {
            match start_checks(&pool, &settings.slot).await {
                Ok(()) => break,
                Err(Error::Database(e))
                    if is_transient(&e) && started.elapsed() < START_PATIENCE =>
                {
                    tracing::warn!(error = %e, "database unavailable at start; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e),
            }
        }
        health.set_database(true);
        health.set_broker(publisher.is_connected());
        tracing::info!(instance = %config.instance_id, slot = %settings.slot, "relay starting (WAL source)");
        let stop = CancellationToken::new();
        let stats = tokio::spawn(metrics::slot_stats(
            config.clone(),
            settings.slot.clone(),
            pool.clone(),
            health.clone(),
            stop.clone(),
        ));
        let broker = tokio::spawn(crate::watch_broker(
            publisher.clone(),
            health.clone(),
            stop.clone(),
        ));
        let mut stream = session::run(
            config.clone(),
            settings,
            pool,
            publisher,
            health.clone(),
            stop.clone(),
        )
        .boxed();
        let result = tokio::select! {
            result = &mut stream => result,
            () = shutdown => {
                stop.cancel();
                stream.await
            }
        };
        stop.cancel();
        let _ = stats.await;
        let _ = broker.await;
        if let Err(e) = &result {
            health.set_failed();
            tracing::error!(instance = %config.instance_id, error = %e, "relay stopped");
        } else {
            tracing::info!(instance = %config.instance_id, "relay stopped");
        }
        result
    }
}
