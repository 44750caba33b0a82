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
    /// The WAL source runs (else the table source).
    wal: AtomicBool,
    wal_streaming: AtomicBool,
    wal_standby: AtomicBool,
    /// Cleared when the stats task finds the slot gone.
    wal_slot_missing: AtomicBool,
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
    /// `table` (polling `outbox_message`) or `wal` (streaming a replication slot).
    pub source: &'static str,
    /// WAL source: this instance streams the slot now.
    pub streaming: bool,
    /// WAL source: another instance streams the slot; this one waits to take over.
    pub standby: bool,
}

impl Health {
    /// Ready to publish: database and broker reachable, and no task of the relay failed.
    /// With the WAL source, also: the slot exists and this instance streams it or waits as
    /// a standby while another does (reconnecting is not ready).
    pub fn is_ready(&self) -> bool {
        let i = &self.inner;
        let wal_ok = !i.wal.load(Ordering::Relaxed)
            || (!i.wal_slot_missing.load(Ordering::Relaxed)
                && (i.wal_streaming.load(Ordering::Relaxed)
                    || i.wal_standby.load(Ordering::Relaxed)));
        i.database_ok.load(Ordering::Relaxed)
            && i.broker_ok.load(Ordering::Relaxed)
            && !i.failed.load(Ordering::Relaxed)
            && wal_ok
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
            source: if i.wal.load(Ordering::Relaxed) {
                "wal"
            } else {
                "table"
            },
            streaming: i.wal_streaming.load(Ordering::Relaxed),
            standby: i.wal_standby.load(Ordering::Relaxed),
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

    /// The WAL source's state: streaming the slot, or waiting as a standby (neither:
    /// connecting or reconnecting).
    pub(crate) fn set_wal(&self, streaming: bool, standby: bool) {
        self.inner.wal.store(true, Ordering::Relaxed);
        self.inner.wal_streaming.store(streaming, Ordering::Relaxed);
        self.inner.wal_standby.store(standby, Ordering::Relaxed);
        metrics::gauge!(crate::metrics::WAL_STREAMING).set(if streaming { 1.0 } else { 0.0 });
    }

    pub(crate) fn set_slot_exists(&self, exists: bool) {
        self.inner
            .wal_slot_missing
            .store(!exists, Ordering::Relaxed);
    }

    pub(crate) fn set_in_flight(&self, n: usize) {
        self.inner.in_flight.store(n, Ordering::Relaxed);
    }
}
