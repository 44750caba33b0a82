//! One relay's hold on the slot: connect, stream, publish through the [`Pipeline`], confirm;
//! on a broken session, reconnect from the slot's confirmed position; while another relay
//! streams the slot, wait as a hot standby.

use std::sync::Arc;
use std::time::Duration;

use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent};
use sqlx::PgPool;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::decode::{self, Relations};
use super::pipeline::Pipeline;
use super::store;
use super::{WalSettings, metrics as wm};
use crate::config::RelayConfig;
use crate::error::Error;
use crate::health::Health;
use crate::publisher::Publisher;

/// How often a standby (or a relay whose session broke) tries the slot again.
const RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// Why a session ended.
enum Ended {
    /// Asked to stop; confirmed what it could.
    Stopped,
    /// The slot is streamed by another session: wait as a standby.
    Busy,
    /// The connection or the server failed: reconnect.
    Broken(String),
}

/// Streams the slot until `stop`; returns an error only for what retrying cannot mend (the
/// slot is gone, an unknown message format, missing prerequisites).
pub(crate) async fn run<P: Publisher>(
    config: RelayConfig,
    settings: WalSettings,
    pool: PgPool,
    publisher: Arc<P>,
    health: Health,
    stop: CancellationToken,
) -> Result<(), Error> {
    let replication = replication_config(&settings, &config)?;
    let mut failures = 0u32;
    loop {
        if stop.is_cancelled() {
            return Ok(());
        }
        let slot_state = {
            let mut conn = pool.acquire().await?;
            store::status(&mut conn, &settings.slot).await?
        };
        health.set_database(true);
        let ended = match slot_state {
            None => {
                health.set_wal(false, false);
                return Err(Error::Slot {
                    slot: settings.slot.to_string(),
                    reason: "it does not exist (dropped?): create it with `relay slot create`; messages written while it was missing are not in the log any more".to_owned(),
                });
            }
            Some(s) if s.plugin.as_deref() != Some("pgoutput") => {
                return Err(Error::Slot {
                    slot: settings.slot.to_string(),
                    reason: format!("its plugin is {:?}, not pgoutput", s.plugin),
                });
            }
            Some(s) if s.wal_status.as_deref() == Some("lost") => {
                health.set_wal(false, false);
                return Err(Error::Slot {
                    slot: settings.slot.to_string(),
                    reason: "its WAL was removed (wal_status = lost, max_slot_wal_keep_size exceeded): messages were lost; recreate the slot and reconcile".to_owned(),
                });
            }
            Some(s) if s.active => Ended::Busy,
            Some(_) => {
                session(
                    &config,
                    &settings,
                    replication.clone(),
                    &pool,
                    publisher.clone(),
                    &health,
                    &stop,
                )
                .await?
            }
        };
        match ended {
            Ended::Stopped => return Ok(()),
            Ended::Busy => {
                failures = 0;
                health.set_wal(false, true);
            }
            Ended::Broken(why) => {
                failures += 1;
                health.set_wal(false, false);
                tracing::warn!(slot = %settings.slot, error = %why, "replication session ended; reconnecting from the slot's confirmed position");
            }
        }
        let pause = if failures > 0 {
            outbox::backoff::delay(RETRY_INTERVAL, config.retry_max_delay, failures)
        } else {
            RETRY_INTERVAL
        };
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            () = tokio::time::sleep(pause) => {}
        }
    }
}

/// One replication session, from the slot's confirmed position.
async fn session<P: Publisher>(
    config: &RelayConfig,
    settings: &WalSettings,
    replication: ReplicationConfig,
    pool: &PgPool,
    publisher: Arc<P>,
    health: &Health,
    stop: &CancellationToken,
) -> Result<Ended, Error> {
    let mut client = match ReplicationClient::connect(replication).await {
        Ok(client) => client,
        Err(e) => return Ok(classify(e.to_string())),
    };
    if let Err(e) = client.wait_started().await {
        return Ok(classify(e.to_string()));
    }
    tracing::info!(slot = %settings.slot, "streaming the outbox from the replication slot");
    health.set_wal(true, false);
    let mut pipeline = Pipeline::new(config.clone(), pool.clone(), publisher);
    let mut relations = Relations::default();
    let mut applied = Lsn::ZERO;
    let max_unresolved = config.max_in_flight * 4;
    let mut tick = tokio::time::interval(config.stats_interval.min(Duration::from_secs(1)));
    let ended = loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => break Ended::Stopped,
            () = pipeline.step(), if pipeline.has_pending() => {}
            event = client.recv(), if pipeline.unresolved() < max_unresolved => {
                match event {
                    Ok(Some(event)) => {
                        if let Err(e) = handle(&mut pipeline, &mut relations, event) {
                            client.abort();
                            health.set_wal(false, false);
                            return Err(Error::Slot { slot: settings.slot.to_string(), reason: e });
                        }
                    }
                    Ok(None) => break Ended::Broken("the server ended the stream".to_owned()),
                    Err(e) => break classify(e.to_string()),
                }
            }
            _ = tick.tick() => {
                health.set_in_flight(pipeline.in_flight());
                wm::record_pipeline(&pipeline);
            }
        }
        if let Some(confirmed) = pipeline.confirmed()
            && confirmed > applied
        {
            applied = confirmed;
            client.update_applied_lsn(confirmed);
        }
    };
    if matches!(ended, Ended::Stopped) {
        // Finish what is on the wire, confirm it, and see the confirmation sent.
        let deadline = Instant::now() + config.publish_timeout * 2;
        while pipeline.has_pending() && Instant::now() < deadline {
            let _ = tokio::time::timeout_at(deadline, pipeline.step()).await;
        }
        if let Some(confirmed) = pipeline.confirmed() {
            client.update_applied_lsn(confirmed);
            let until = Instant::now() + Duration::from_secs(3);
            let metrics = client.metrics();
            while metrics.last_applied_lsn() < confirmed && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), client.shutdown()).await;
    } else {
        client.abort();
    }
    health.set_wal(false, false);
    Ok(ended)
}

/// Feeds one replication event to the pipeline; an `Err` stops the relay unconfirmed.
fn handle<P: Publisher>(
    pipeline: &mut Pipeline<P>,
    relations: &mut Relations,
    event: ReplicationEvent,
) -> Result<(), String> {
    match event {
        ReplicationEvent::Begin {
            commit_time_micros, ..
        } => pipeline.begin_at(commit_time_micros),
        ReplicationEvent::Message {
            prefix,
            content,
            lsn,
            ..
        } if prefix == envelope::wal::PREFIX => {
            let decoded =
                decode::log_message(&content, &lsn.to_string()).map_err(|e| e.to_string())?;
            pipeline.push(decoded);
        }
        ReplicationEvent::XLogData { data, .. } => {
            if let Some(decoded) = relations.record(&data).map_err(|e| e.to_string())? {
                pipeline.push(decoded);
            }
        }
        ReplicationEvent::Commit { end_lsn, .. } => pipeline.commit(end_lsn),
        ReplicationEvent::KeepAlive { wal_end, .. } => pipeline.confirm_idle(wal_end),
        ReplicationEvent::Message { .. } | ReplicationEvent::StoppedAt { .. } => {}
    }
    Ok(())
}

/// A session that could not start or broke: busy when another session holds the slot
/// (SQLSTATE 55006, "replication slot ... is active for PID ..."), else broken.
fn classify(error: String) -> Ended {
    if error.contains("55006") || error.contains("is active for PID") {
        Ended::Busy
    } else {
        Ended::Broken(error)
    }
}

/// The replication connection for the database URL of `settings`: plaintext (a URL that
/// requires TLS is refused), status feedback every second.
fn replication_config(
    settings: &WalSettings,
    config: &RelayConfig,
) -> Result<ReplicationConfig, Error> {
    let url = url::Url::parse(&settings.database_url)
        .map_err(|e| Error::Config(format!("database URL: {e}")))?;
    if let Some((_, mode)) = url.query_pairs().find(|(k, _)| k == "sslmode")
        && matches!(&*mode, "require" | "verify-ca" | "verify-full")
    {
        return Err(Error::Config(format!(
            "sslmode={mode}: the WAL source's replication connection has no TLS yet; use the table source or a connection without TLS"
        )));
    }
    let host = url.host_str().unwrap_or("localhost").to_owned();
    let user = percent(url.username());
    let password = url.password().map(percent).unwrap_or_default();
    let database = percent(url.path().trim_start_matches('/'));
    Ok(ReplicationConfig::new(
        host,
        user,
        password,
        database,
        settings.slot.as_str(),
        settings.slot.as_str(),
    )
    .with_port(url.port().unwrap_or(5432))
    .with_start_lsn(Lsn::ZERO)
    .with_status_interval(Duration::from_secs(1))
    .with_binary(true)
    .with_buffer_size(1024)
    .with_application_name(format!("outbox-relay {}", config.instance_id)))
}

/// A percent-encoded part of the URL, decoded.
fn percent(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}
