//! Background upkeep: the cleaner deletes published rows past the retention, the vacuum task
//! keeps the claim index lean, and the stats task refreshes the backlog gauges.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::RelayConfig;
use crate::health::Health;
use crate::metrics as m;

const CLEAN_LIMIT: i64 = 10_000;

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Every `cleaner_interval`: deletes published rows older than `retention`, in chunks.
pub(crate) async fn cleaner(config: RelayConfig, pool: PgPool, stop: CancellationToken) {
    every(config.cleaner_interval, &stop, || async {
        let mut conn = pool.acquire().await?;
        loop {
            let deleted = outbox::store::delete_published_before(
                &mut conn,
                millis(config.retention),
                CLEAN_LIMIT,
            )
            .await?;
            metrics::counter!(m::CLEANED).increment(deleted);
            if deleted < CLEAN_LIMIT as u64 || stop.is_cancelled() {
                break;
            }
        }
        crate::store::forget_dead_instances(&mut conn, Duration::from_secs(24 * 3600)).await?;
        Ok(())
    })
    .await;
}

/// Every `vacuum_interval` (unless zero): vacuums the outbox table. Stops trying after the
/// first permission error, which it logs.
pub(crate) async fn vacuum(config: RelayConfig, pool: PgPool, stop: CancellationToken) {
    if config.vacuum_interval.is_zero() {
        // Disabled: idle until stopped (a supervised task must not end on its own).
        stop.cancelled().await;
        return;
    }
    let denied = std::sync::atomic::AtomicBool::new(false);
    every(config.vacuum_interval, &stop, || async {
        if denied.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        let mut conn = pool.acquire().await?;
        match outbox::store::vacuum(&mut conn).await {
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42501") => {
                denied.store(true, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(error = %e, "cannot vacuum outbox_message (not its owner); leaving it to autovacuum");
                Ok(())
            }
            other => other,
        }
    })
    .await;
}

/// Every `stats_interval`: backlog and oldest-pending gauges.
pub(crate) async fn stats(
    config: RelayConfig,
    pool: PgPool,
    health: Health,
    stop: CancellationToken,
) {
    every(config.stats_interval, &stop, || async {
        let mut conn = pool.acquire().await?;
        let backlog = outbox::store::backlog(&mut conn).await?;
        metrics::gauge!(m::BACKLOG).set(backlog.unpublished as f64);
        metrics::gauge!(m::OLDEST_PENDING_AGE).set(backlog.oldest_age_seconds);
        health.set_backlog(u64::try_from(backlog.unpublished).unwrap_or(0));
        Ok(())
    })
    .await;
}

async fn every<F, Fut>(interval: Duration, stop: &CancellationToken, mut work: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), sqlx::Error>>,
{
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let result = tokio::select! {
            _ = stop.cancelled() => break,
            r = work() => r,
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "maintenance task failed; retrying next interval");
        }
    }
}
