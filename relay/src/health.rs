//! What `/health/ready` and `relay status` report about a running relay.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use serde::Serialize;

/// Shared, cheap-to-clone view of the relay's state, updated by its tasks.
#[derive(Debug, Clone, Default)]
pub struct Health {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    database_ok: AtomicBool,
    broker_ok: AtomicBool,
    partitions: AtomicUsize,
    backlog: AtomicU64,
    in_flight: AtomicUsize,
    failed: AtomicBool,
}

/// A snapshot of [`Health`], as served on `/health/ready`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthReport {
    /// True when both the database and the broker are reachable.
    pub ready: bool,
    /// The last database operation succeeded.
    pub database: bool,
    /// The NATS connection is up.
    pub broker: bool,
    /// Partitions this instance owns.
    pub partitions_owned: usize,
    /// Unpublished rows at the last count.
    pub backlog: u64,
    /// Messages awaiting a PubAck.
    pub in_flight: usize,
}

impl Health {
    /// Ready to publish: database and broker reachable, and no task of the relay failed.
    pub fn is_ready(&self) -> bool {
        self.inner.database_ok.load(Ordering::Relaxed)
            && self.inner.broker_ok.load(Ordering::Relaxed)
            && !self.inner.failed.load(Ordering::Relaxed)
    }

    /// The current state.
    pub fn report(&self) -> HealthReport {
        let i = &self.inner;
        HealthReport {
            ready: self.is_ready(),
            database: i.database_ok.load(Ordering::Relaxed),
            broker: i.broker_ok.load(Ordering::Relaxed),
            partitions_owned: i.partitions.load(Ordering::Relaxed),
            backlog: i.backlog.load(Ordering::Relaxed),
            in_flight: i.in_flight.load(Ordering::Relaxed),
        }
    }

    /// A task failed: never ready again (the relay is stopping with an error).
    pub(crate) fn set_failed(&self) {
        self.inner.failed.store(true, Ordering::Relaxed);
    }

    pub(crate) fn set_database(&self, ok: bool) {
        self.inner.database_ok.store(ok, Ordering::Relaxed);
    }

    pub(crate) fn set_broker(&self, ok: bool) {
        self.inner.broker_ok.store(ok, Ordering::Relaxed);
    }

    pub(crate) fn set_partitions(&self, n: usize) {
        self.inner.partitions.store(n, Ordering::Relaxed);
    }

    pub(crate) fn set_backlog(&self, n: u64) {
        self.inner.backlog.store(n, Ordering::Relaxed);
    }

    pub(crate) fn set_in_flight(&self, n: usize) {
        self.inner.in_flight.store(n, Ordering::Relaxed);
    }
}
