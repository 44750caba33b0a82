//! One relay's hold on the slot: connect, stream, publish through the [`Pipeline`], record
//! the confirmed position ([`Progress`]), then confirm it to the slot; on a broken session,
//! reconnect from the greater of the slot's confirmed position and the recorded one; while
//! another relay streams the slot, wait as a hot standby.

use std::sync::Arc;
use std::time::Duration;

use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent};
use sqlx::PgPool;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::decode::{self, Relations};
use super::pipeline::Pipeline;
use super::progress::Progress;
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
    /// Retrying cannot help (the publication is gone): stop with this reason.
    Fatal(String),
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
        let slot_state = store::status_within(&pool, &settings.slot, config.db_timeout).await;
        if slot_state.is_ok() {
            health.set_database(true);
        }
        let ended = match slot_state {
            // The database is down or restarting: not ready, try again.
            Err(e) => {
                health.set_database(false);
                Ended::Broken(format!("cannot read the slot's state: {e}"))
            }
            Ok(None) => {
                health.set_wal(false, false);
                return Err(Error::Slot {
                    slot: settings.slot.to_string(),
                    reason: "it does not exist (dropped?): create it with `relay slot create`; messages written while it was missing are not in the log any more".to_owned(),
                });
            }
            Ok(Some(s)) if s.plugin.as_deref() != Some("pgoutput") => {
                return Err(Error::Slot {
                    slot: settings.slot.to_string(),
                    reason: format!("its plugin is {:?}, not pgoutput", s.plugin),
                });
            }
            Ok(Some(s)) if s.wal_status.as_deref() == Some("lost") => {
                health.set_wal(false, false);
                return Err(Error::Slot {
                    slot: settings.slot.to_string(),
                    reason: "its WAL was removed (wal_status = lost, max_slot_wal_keep_size exceeded): messages were lost; recreate the slot and reconcile".to_owned(),
                });
            }
            Ok(Some(s)) if s.active => Ended::Busy,
            Ok(Some(s)) => {
                // From the greater of the slot's position and the relay's record of it (a
                // crash can set the slot's back); never report a position below either.
                match start_position(&s, &pool, &settings.slot, config.db_timeout).await {
                    Err(e) => Ended::Broken(e),
                    Ok(start) => {
                        session(
                            &config,
                            &settings,
                            replication
                                .clone()
                                .with_start_lsn(start)
                                .with_ack_lsn(start),
                            start,
                            &pool,
                            publisher.clone(),
                            &health,
                            &stop,
                            &mut failures,
                        )
                        .await?
                    }
                }
            }
        };
        match ended {
            Ended::Stopped => return Ok(()),
            Ended::Fatal(reason) => {
                health.set_wal(false, false);
                return Err(Error::Slot {
                    slot: settings.slot.to_string(),
                    reason,
                });
            }
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

/// Where a session starts: the greater of the slot's confirmed position and the relay's
/// record of it. A record ahead of everything the server has written, or written by
/// another server (a dump restored into another cluster), is not this server's: trusting
/// it would skip messages, so it is removed and the slot's position used (re-sending at
/// most what the slot had not confirmed, which the duplicate window absorbs).
async fn start_position(
    s: &store::SlotStatus,
    pool: &PgPool,
    slot: &super::SlotName,
    timeout: Duration,
) -> Result<Lsn, String> {
    let lsn = |l: Option<&str>| l.and_then(|l| Lsn::parse(l).ok()).unwrap_or(Lsn::ZERO);
    let slot_position = lsn(s.confirmed_flush_lsn.as_deref());
    let record = lsn(s.relay_confirmed_lsn.as_deref());
    let current = lsn(s.current_lsn.as_deref());
    if s.relay_record_foreign {
        tracing::warn!(slot = %slot, record = %record, "the relay's recorded position was written by another server; removing it and resuming from the slot's position");
        store::forget_progress(pool, slot, timeout)
            .await
            .map_err(|e| format!("cannot remove the foreign recorded position: {e}"))?;
        return Ok(slot_position);
    }
    if record > current && current > Lsn::ZERO {
        tracing::warn!(slot = %slot, record = %record, current = %current, "the relay's recorded position is ahead of the server's WAL; removing it and resuming from the slot's position");
        store::forget_progress(pool, slot, timeout)
            .await
            .map_err(|e| format!("cannot remove the stale recorded position: {e}"))?;
        return Ok(slot_position);
    }
    let start = slot_position.max(record);
    tracing::info!(slot = %slot, start = %start, slot_position = %slot_position, record = %record, "resuming after the greater of the slot's confirmed position and the relay's record");
    Ok(start)
}

/// One replication session, from `start` (confirmed: by the slot or in the relay's record).
#[allow(clippy::too_many_arguments)]
async fn session<P: Publisher>(
    config: &RelayConfig,
    settings: &WalSettings,
    replication: ReplicationConfig,
    start: Lsn,
    pool: &PgPool,
    publisher: Arc<P>,
    health: &Health,
    stop: &CancellationToken,
    failures: &mut u32,
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
    // What an earlier relay had acknowledged past the start (its record lists it): not
    // published again.
    let (acknowledged, until) = store::acknowledged_ids(pool, &settings.slot, config.db_timeout)
        .await
        .unwrap_or_else(|e| {
            tracing::warn!(slot = %settings.slot, error = %e, "cannot read the acknowledged messages the record lists; publishing them again");
            (Vec::new(), None)
        });
    let mut pipeline =
        Pipeline::new(config.clone(), pool.clone(), publisher).skipping(acknowledged, until, start);
    let mut progress = Progress::new(
        pool.clone(),
        settings.slot.clone(),
        config.db_timeout,
        start,
    );
    let mut relations = Relations::default();
    // Memory bounds: messages read and not resolved (twice the PubAck window: four times
    // cost 15 MB more at the peak and published no faster), and transactions read and not
    // confirmed (a key that cannot be published holds back confirmation, not other keys,
    // until this many transactions wait behind it).
    let max_unresolved = config.max_in_flight * 2;
    let max_unconfirmed = config.max_in_flight * 64;
    let mut tick = tokio::time::interval(config.stats_interval.min(Duration::from_secs(1)));
    let ended = loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => break Ended::Stopped,
            () = pipeline.step(), if pipeline.has_pending() => {}
            saved = progress.step(), if progress.is_saving() => {
                if let Some(saved) = saved {
                    client.update_applied_lsn(saved);
                    // It made progress: a later break starts the backoff from its first step
                    // again (a session that breaks at the same record every time keeps
                    // backing off).
                    *failures = 0;
                }
            }
            event = client.recv(), if pipeline.unresolved() < max_unresolved
                && pipeline.unconfirmed_transactions() < max_unconfirmed => {
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
        // Recorded first, reported to the slot when recorded (above).
        let confirmed = pipeline.confirmed();
        progress.offer(confirmed, || pipeline.acknowledged_unconfirmed());
        if let Some(idle) = idle_report(&pipeline, &progress) {
            client.update_applied_lsn(idle);
        }
    };
    if matches!(ended, Ended::Stopped) {
        // Finish what is on the wire (start nothing new), confirm it, and see the
        // confirmation sent.
        pipeline.stop_sending();
        let deadline = Instant::now() + config.publish_timeout * 2;
        while pipeline.settling() && Instant::now() < deadline {
            let _ = tokio::time::timeout_at(deadline, pipeline.step()).await;
        }
        let acknowledged = pipeline.acknowledged_unconfirmed();
        let saved = progress.save_now(pipeline.confirmed(), acknowledged).await;
        let saved = idle_report(&pipeline, &progress).map_or(saved, |idle| idle.max(saved));
        if saved > start {
            client.update_applied_lsn(saved);
            let until = Instant::now() + Duration::from_secs(3);
            let metrics = client.metrics();
            while metrics.last_applied_lsn() < saved && Instant::now() < until {
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

/// The pipeline's idle position, once everything confirmed before it is recorded: the slot
/// may be told without a record of its own (see [`Pipeline::idle_position`]).
fn idle_report<P: Publisher>(pipeline: &Pipeline<P>, progress: &Progress) -> Option<Lsn> {
    let recorded = pipeline.confirmed().is_none_or(|c| c <= progress.saved());
    pipeline.idle_position().filter(|_| recorded)
}

/// Feeds one replication event to the pipeline; an `Err` stops the relay unconfirmed.
fn handle<P: Publisher>(
    pipeline: &mut Pipeline<P>,
    relations: &mut Relations,
    event: ReplicationEvent,
) -> Result<(), String> {
    match event {
        ReplicationEvent::Begin {
            commit_time_micros,
            xid,
            ..
        } => pipeline.begin_at(commit_time_micros, xid),
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
/// (SQLSTATE 55006, "replication slot ... is active for PID ..."), fatal when the
/// publication is missing (42704), else broken (reconnect).
fn classify(error: String) -> Ended {
    if error.contains("55006") || error.contains("is active for PID") {
        Ended::Busy
    } else if error.contains("42704")
        || error.contains("publication") && error.contains("does not exist")
    {
        Ended::Fatal(format!(
            "{error}: recreate the publication with `relay slot create`"
        ))
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
