//! Partition ownership: instances share the 256 outbox partitions through leases, never two
//! owners of one partition at once, and a silent instance's partitions are taken over once
//! its leases expire.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::RelayConfig;
use crate::health::Health;
use crate::metrics as m;
use crate::store::{self, PARTITIONS};

/// Renews, acquires and gives up leases every `heartbeat_interval` until `stop`, aiming at
/// an equal share (`ceil(256 / live instances)`); on stop, releases every lease and removes
/// the instance so that others take over at once.
pub(crate) async fn run(
    config: RelayConfig,
    pool: PgPool,
    health: Health,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(config.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        match outbox::deadline::within(config.db_timeout, rebalance(&config, &pool)).await {
            Ok(owned) => {
                health.set_database(true);
                health.set_partitions(owned);
                metrics::gauge!(m::PARTITIONS_OWNED).set(owned as f64);
            }
            Err(e) => {
                health.set_database(false);
                tracing::warn!(error = %e, "partition lease renewal failed");
            }
        }
    }
    let release = async {
        let mut conn = pool.acquire().await?;
        store::release_leases(&mut conn, &config.instance_id, None).await?;
        store::forget_instance(&mut conn, &config.instance_id).await
    };
    match tokio::time::timeout(Duration::from_secs(5), release).await {
        Ok(Ok(())) => tracing::info!("released partition leases"),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "could not release partition leases; they expire by themselves")
        }
        Err(_) => tracing::warn!("timed out releasing partition leases; they expire by themselves"),
    }
    health.set_partitions(0);
}

/// One round: heartbeat, renew, then give up or take partitions towards the fair share.
/// Returns how many partitions this instance owns now.
pub(crate) async fn rebalance(config: &RelayConfig, pool: &PgPool) -> Result<usize, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let me = config.instance_id.as_str();
    store::heartbeat(&mut conn, me).await?;
    let live = store::live_instances(&mut conn, config.lease_ttl).await?;
    let target = ((PARTITIONS + live - 1) / live) as usize;
    let mut owned = store::renew_leases(&mut conn, me, config.lease_ttl).await?;
    if owned.len() > target {
        let extra = owned.split_off(target);
        store::release_leases(&mut conn, me, Some(&extra)).await?;
        tracing::info!(
            released = extra.len(),
            live,
            "gave partitions to other instances"
        );
    } else if owned.len() < target {
        let want = (target - owned.len()) as i64;
        let got = store::acquire_leases(&mut conn, me, want, config.lease_ttl).await?;
        if !got.is_empty() {
            tracing::info!(acquired = got.len(), live, "took partitions");
        }
        owned.extend(got);
    }
    Ok(owned.len())
}
