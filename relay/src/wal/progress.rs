//! The relay's confirmed position, made durable before the slot hears of it.
//!
//! A slot saves its confirmed position to disk only at checkpoints and when its restart
//! position moves, so a PostgreSQL crash can set it back by minutes; a relay resuming from
//! there would publish again what it had confirmed, and the broker, whose duplicate window
//! is shorter, would store it twice. So a position the pipeline confirms is first committed
//! to `outbox_wal_progress` (at most once per [`SAVE_INTERVAL`]), and only then reported to
//! the slot; a session starts from the greater of the two. A keepalive's position past
//! everything confirmed is not written: nothing before it would be published again, and
//! writing it would move the log's end, bringing the next keepalive, every second.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use pgwire_replication::Lsn;
use sqlx::PgPool;
use tokio::time::Instant;
use uuid::Uuid;

use super::SlotName;
use super::store;

/// How often the confirmed position is written (and so reported to the slot) at most.
pub(crate) const SAVE_INTERVAL: Duration = Duration::from_secs(1);

/// Messages acknowledged past a confirmed position, and the end of the last transaction
/// they cover (`Pipeline::acknowledged_unconfirmed`).
pub(crate) type Acknowledged = (Vec<Uuid>, Option<Lsn>);

type Saving = Pin<Box<dyn Future<Output = (Lsn, Acknowledged, Result<(), sqlx::Error>)> + Send>>;

/// See the module docs.
pub(crate) struct Progress {
    pool: PgPool,
    slot: SlotName,
    timeout: Duration,
    /// Committed to the table: the slot may be told.
    saved: Lsn,
    /// The acknowledged messages past `saved` committed with it, and the end of the last
    /// transaction they cover.
    saved_acknowledged: Acknowledged,
    saving: Option<Saving>,
    next_save: Instant,
}

impl Progress {
    /// Progress from `start`, a position already durable (the slot's or the table's).
    pub(crate) fn new(pool: PgPool, slot: SlotName, timeout: Duration, start: Lsn) -> Self {
        Progress {
            pool,
            slot,
            timeout,
            saved: start,
            saved_acknowledged: (Vec::new(), None),
            saving: None,
            next_save: Instant::now(),
        }
    }

    /// Starts writing `confirmed`, with the messages acknowledged past it
    /// (`acknowledged`, asked only when a write may start), if either changed since the last
    /// write, no write is under way and the last one began at least [`SAVE_INTERVAL`] ago.
    pub(crate) fn offer(
        &mut self,
        confirmed: Option<Lsn>,
        acknowledged: impl FnOnce() -> Acknowledged,
    ) {
        if self.saving.is_some() || Instant::now() < self.next_save {
            return;
        }
        // Asked at most once per interval, whether or not anything is written.
        self.next_save = Instant::now() + SAVE_INTERVAL;
        let lsn = confirmed.map_or(self.saved, |c| c.max(self.saved));
        let ids = acknowledged();
        if lsn == self.saved && ids == self.saved_acknowledged {
            return;
        }
        let (pool, slot, timeout) = (self.pool.clone(), self.slot.clone(), self.timeout);
        self.saving = Some(Box::pin(async move {
            let result = store::save_progress(&pool, &slot, &lsn.to_string(), &ids, timeout).await;
            (lsn, ids, result)
        }));
    }

    /// The position last made durable (or the start).
    pub(crate) fn saved(&self) -> Lsn {
        self.saved
    }

    /// Whether a write is under way ([`Progress::step`] has something to wait for).
    pub(crate) fn is_saving(&self) -> bool {
        self.saving.is_some()
    }

    /// Waits for the write under way; returns the position it made durable, or `None` when
    /// it failed (logged; a later [`Progress::offer`] tries again). Cancel-safe.
    pub(crate) async fn step(&mut self) -> Option<Lsn> {
        let Some(saving) = self.saving.as_mut() else {
            return std::future::pending().await;
        };
        let (lsn, ids, result) = saving.await;
        self.saving = None;
        match result {
            Ok(()) => {
                self.saved = self.saved.max(lsn);
                self.saved_acknowledged = ids;
                tracing::debug!(slot = %self.slot, lsn = %self.saved, "recorded the confirmed position");
                Some(self.saved)
            }
            Err(e) => {
                tracing::warn!(slot = %self.slot, error = %e, "cannot record the confirmed position; the slot is not told until it is");
                None
            }
        }
    }

    /// Writes `confirmed` and the messages `acknowledged` past it now if either changed (at
    /// shutdown); returns the position durable afterwards.
    pub(crate) async fn save_now(
        &mut self,
        confirmed: Option<Lsn>,
        acknowledged: Acknowledged,
    ) -> Lsn {
        if self.saving.is_some() {
            let _ = self.step().await;
        }
        let lsn = confirmed.map_or(self.saved, |c| c.max(self.saved));
        if lsn > self.saved || acknowledged != self.saved_acknowledged {
            match store::save_progress(
                &self.pool,
                &self.slot,
                &lsn.to_string(),
                &acknowledged,
                self.timeout,
            )
            .await
            {
                Ok(()) => {
                    self.saved = lsn;
                    self.saved_acknowledged = acknowledged;
                }
                Err(e) => {
                    tracing::warn!(slot = %self.slot, error = %e, "cannot record the confirmed position at shutdown")
                }
            }
        }
        self.saved
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Listing the acknowledged messages sorts through every unconfirmed transaction: it is
    /// asked at most once per interval, even when nothing changed and nothing is written.
    #[tokio::test]
    async fn the_acknowledged_list_is_asked_at_most_once_per_interval() {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://nobody@127.0.0.1:1/none")
            .expect("lazy pool");
        let slot = SlotName::new("test_slot").expect("slot");
        let mut progress = Progress::new(pool, slot, Duration::from_secs(1), Lsn::from(100));
        let mut asked = 0;
        for _ in 0..100 {
            progress.offer(Some(Lsn::from(100)), || {
                asked += 1;
                (Vec::new(), None)
            });
        }
        assert_eq!(asked, 1, "unchanged, so nothing written, and asked once");
        assert!(!progress.is_saving());
    }
}
