//! What a running consumer reports for a readiness probe: [`Health`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Serialize;

/// Shared, cheap-to-clone view of a consumer's state, updated by its tasks; take it with
/// [`Consumer::health`](crate::Consumer::health) before [`Consumer::run`](crate::Consumer::run).
///
/// Ready means: `run` is consuming (its durable consumer was ensured, its last pull request
/// was accepted, and it has not stopped), the last database step of a lane or of the `dlq retry` poller succeeded, and
/// the NATS connection is up. Every database step of the consumer's own (inbox insert,
/// COMMIT, attempt and dead-letter writes, the `dlq retry` poll) has a deadline,
/// `db_timeout`, so a database that stops answering turns readiness false within
/// `db_timeout` of the next step (at most `retry_poll_interval` later while no message
/// comes), and true again at the next step that succeeds.
#[derive(Debug, Clone, Default)]
pub struct Health {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    running: AtomicBool,
    pulling: AtomicBool,
    database_ok: AtomicBool,
    client: std::sync::OnceLock<async_nats::Client>,
}

/// Marks its [`Health`] stopped when dropped.
pub(crate) struct StoppedOnDrop(Health);

impl Drop for StoppedOnDrop {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// A snapshot of [`Health`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthReport {
    /// Consuming, with the database and the broker reachable.
    pub ready: bool,
    /// `run` has ensured its durable consumer and not stopped.
    pub running: bool,
    /// Its last pull request was accepted (false while the stream or the durable is
    /// missing, or the broker refuses the pulls).
    pub pulling: bool,
    /// The last database step succeeded.
    pub database: bool,
    /// The NATS connection is up.
    pub broker: bool,
}

impl Health {
    /// Consuming, with the database and the broker reachable (see [`Health`]).
    pub fn is_ready(&self) -> bool {
        let report = self.report();
        report.ready
    }

    /// The current state.
    pub fn report(&self) -> HealthReport {
        let i = &self.inner;
        let running = i.running.load(Ordering::Relaxed);
        let pulling = i.pulling.load(Ordering::Relaxed);
        let database = i.database_ok.load(Ordering::Relaxed);
        let broker = i
            .client
            .get()
            .is_some_and(|c| c.connection_state() == async_nats::connection::State::Connected);
        HealthReport {
            ready: running && pulling && database && broker,
            running,
            pulling,
            database,
            broker,
        }
    }

    pub(crate) fn start(&self, client: async_nats::Client) {
        let _ = self.inner.client.set(client);
        self.inner.database_ok.store(true, Ordering::Relaxed);
        self.inner.pulling.store(true, Ordering::Relaxed);
        self.inner.running.store(true, Ordering::Relaxed);
    }

    pub(crate) fn stop(&self) {
        self.inner.running.store(false, Ordering::Relaxed);
    }

    /// Marks the consumer stopped when dropped: `run`'s future may be dropped at any await.
    pub(crate) fn stopped_on_drop(&self) -> StoppedOnDrop {
        StoppedOnDrop(self.clone())
    }

    pub(crate) fn set_pulling(&self, ok: bool) {
        self.inner.pulling.store(ok, Ordering::Relaxed);
    }

    pub(crate) fn set_database(&self, ok: bool) {
        self.inner.database_ok.store(ok, Ordering::Relaxed);
    }
}
