//! The WAL source's gauges ([`crate::metrics`] names them).

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::pipeline::Pipeline;
use super::store::{self, SlotName};
use crate::config::RelayConfig;
use crate::health::Health;
use crate::metrics as m;
use crate::publisher::Publisher;

/// 2000-01-01T00:00:00Z in microseconds since 1970.
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// The pipeline's gauges: unresolved messages and the oldest unconfirmed commit's age.
pub(crate) fn record_pipeline<P: Publisher>(pipeline: &Pipeline<P>) {
    metrics::gauge!(m::WAL_UNRESOLVED).set(pipeline.unresolved() as f64);
    let age = pipeline.oldest_unconfirmed_commit().map_or(0.0, |commit| {
        let now = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000;
        let micros = now - i128::from(commit + PG_EPOCH_MICROS);
        (micros.max(0) as f64) / 1e6
    });
    metrics::gauge!(m::WAL_OLDEST_UNCONFIRMED_AGE).set(age);
}

/// Every `stats_interval`, the slot's retained WAL and lag; readiness turns false when the
/// slot is gone. Ends with `stop`.
pub(crate) async fn slot_stats(
    config: RelayConfig,
    slot: SlotName,
    pool: PgPool,
    health: Health,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(config.stats_interval);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let status = store::status_within(&pool, &slot, config.db_timeout).await;
        match status {
            Ok(Some(s)) => {
                health.set_slot_exists(true);
                metrics::gauge!(m::WAL_RETAINED_BYTES)
                    .set(s.retained_wal_bytes.unwrap_or(0) as f64);
                metrics::gauge!(m::WAL_LAG_BYTES).set(s.lag_bytes.unwrap_or(0) as f64);
            }
            Ok(None) => {
                health.set_slot_exists(false);
                tracing::error!(slot = %slot, "the replication slot is gone: not ready");
            }
            Err(e) => tracing::warn!(slot = %slot, error = %e, "cannot read the slot's state"),
        }
    }
}
