//! `relay-latency`: from a producer's commit to a subscriber's receipt, at an offered rate.
//!
//! The relay runs in-process with the default configuration (idle polling from
//! `poll_min_interval` doubling up to `poll_max_interval`, no `LISTEN`). A producer commits one
//! transaction per message, each enqueueing one outbox row, paced by a
//! `tokio::time::interval` with `MissedTickBehavior::Burst`: every tick starts its own
//! transaction on a pool, so a slow commit neither delays the next one nor lowers the offered
//! rate (an open loop; ticks missed by the scheduler fire at once to catch up). The commit
//! instant is taken when `COMMIT` returns. A core NATS subscriber on the subject (JetStream
//! publishes reach core subscribers too) takes the receive instant; latency is receive minus
//! commit, per message id.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt;
use outbox::{Message, Outbox};
use sqlx::Connection;
use tokio::time::MissedTickBehavior;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::env::{self, RunningRelay, Servers};
use crate::stats;

/// What `relay-latency` measures.
#[derive(Debug, Clone)]
pub struct LatencyConfig {
    /// Offered transactions (messages) per second. Defaults to 1000.
    pub rate: u32,
    /// How long the producer runs. Defaults to 20 s.
    pub seconds: u64,
    /// Payload bytes per message. Defaults to 1024.
    pub payload: usize,
    /// Distinct partition keys, assigned round-robin. Defaults to 1000.
    pub keys: usize,
    /// Connections the producer's transactions share. Defaults to 16.
    pub connections: u32,
    /// Install the notify trigger and run the relay with `listen_notify`. Defaults to false
    /// (adaptive polling alone).
    pub listen_notify: bool,
    /// The relay's source: the table (polling) or the log (`--source wal`, producers on log
    /// storage). Defaults to the table.
    pub source: env::Source,
}

impl Default for LatencyConfig {
    fn default() -> Self {
        LatencyConfig {
            rate: 1000,
            seconds: 20,
            payload: 1024,
            keys: 1000,
            connections: 16,
            listen_notify: false,
            source: env::Source::Table,
        }
    }
}

type Instants = Arc<Mutex<HashMap<Uuid, Instant>>>;

/// Runs the scenario; returns `relay-latency rate=<n> p50_ms=<x> p99_ms=<y>`.
pub async fn run(config: &LatencyConfig, fast_unsafe_db: bool) -> anyhow::Result<String> {
    if config.rate == 0 || config.seconds == 0 || config.keys == 0 || config.connections == 0 {
        bail!("relay-latency needs --rate, --seconds, --keys and --connections above 0");
    }
    let total = u64::from(config.rate) * config.seconds;
    let wal = config.source == env::Source::Wal;
    let servers = Servers::start_with(fast_unsafe_db, wal).await?;
    let db = servers.database().await?;
    if wal {
        db.create_slot().await?;
    }
    let admin = servers.nats_client("bench-admin").await?;
    let js = jetstream::new(admin);
    servers
        .ensure_stream(&js, env::STREAM, env::STREAM_SUBJECTS)
        .await?;
    servers.report_durability(&db, &js).await?;

    let mut relay_config = env::relay_config("bench-relay-latency");
    relay_config.listen_notify = config.listen_notify;
    eprintln!(
        "relay-latency: relay idle polling: poll_min_interval={:?} poll_max_interval={:?} (doubling while empty) listen_notify={}; batch_size={} max_in_flight={}",
        relay_config.poll_min_interval,
        relay_config.poll_max_interval,
        relay_config.listen_notify,
        relay_config.batch_size,
        relay_config.max_in_flight
    );
    eprintln!(
        "relay-latency: {} tx/s for {} s ({total} messages), {} B payload, {} keys, {} producer connections, pacing: interval with MissedTickBehavior::Burst",
        config.rate, config.seconds, config.payload, config.keys, config.connections
    );

    // The subscriber first, so that nothing is missed.
    let subscriber = servers.nats_client("bench-subscriber").await?;
    let mut subscription = subscriber
        .subscribe(env::SUBJECT)
        .await
        .context("subscribing")?;
    subscriber
        .flush()
        .await
        .context("flushing the subscription")?;
    let received: Instants = Arc::default();
    let receiver = {
        let received = received.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            while let Some(message) = subscription.next().await {
                let at = Instant::now();
                let id = message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(envelope::nats::NATS_MSG_ID))
                    .and_then(|v| Uuid::parse_str(v.as_str()).ok());
                if let Some(id) = id {
                    let mut map = received.lock().unwrap_or_else(PoisonError::into_inner);
                    if map.insert(id, at).is_none() {
                        n += 1;
                    }
                }
                if n >= total {
                    break;
                }
            }
        })
    };

    if config.listen_notify {
        relay::store::enable_notify(&mut *db.pool.acquire().await?).await?;
    }
    let relay = if wal {
        let relay = RunningRelay::start_wal(&servers, &db, relay_config).await?;
        relay.wait_streaming(Duration::from_secs(30)).await?;
        relay
    } else {
        let relay = RunningRelay::start(&servers, &db, relay_config).await?;
        relay.wait_ready(Duration::from_secs(30)).await?;
        relay
    };

    // The producer.
    let producers = db.pool(config.connections).await?;
    let outbox = Outbox::with_config(outbox::OutboxConfig {
        storage: if wal {
            outbox::Storage::Log
        } else {
            outbox::Storage::Table
        },
        ..outbox::OutboxConfig::for_source(crate::SOURCE)
    })
    .context("outbox")?;
    let payload = Bytes::from(vec![b'x'; config.payload]);
    let committed: Instants = Arc::default();
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let tasks = TaskTracker::new();
    let period = Duration::from_secs(1) / config.rate;
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let start = Instant::now();
    for i in 0..total {
        tick.tick().await;
        let (pool, outbox, committed, failures) = (
            producers.clone(),
            outbox.clone(),
            committed.clone(),
            failures.clone(),
        );
        let message = Message::raw(
            env::SUBJECT,
            crate::EVENT_TYPE,
            format!("key-{}", i % config.keys as u64),
            payload.clone(),
        );
        tasks.spawn(async move {
            let result = async {
                let mut conn = pool.acquire().await?;
                let mut tx = conn.begin().await?;
                let id = outbox.enqueue_message(&mut tx, message).await?;
                tx.commit().await?;
                Ok::<_, anyhow::Error>((id, Instant::now()))
            }
            .await;
            match result {
                Ok((id, at)) => {
                    committed
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(id.as_uuid(), at);
                }
                Err(e) => failures
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(format!("{e:#}")),
            }
        });
    }
    tasks.close();
    tasks.wait().await;
    let produced_in = start.elapsed();
    producers.close().await;
    if let Some(first) = failures
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .first()
    {
        bail!("a producer transaction failed: {first}");
    }
    eprintln!(
        "relay-latency: committed {total} transactions in {produced_in:.2?} ({:.0}/s achieved)",
        stats::per_second(total, produced_in)
    );

    let wait = Duration::from_secs(60);
    let receiver_done = tokio::time::timeout(wait, receiver).await;
    let (in_stream, backlog, health) = (
        env::stream_messages(&js, env::STREAM).await?,
        db.backlog_summary().await?,
        relay.health(),
    );
    relay.stop(Duration::from_secs(60)).await?;
    db.pool.close().await;
    let committed = std::mem::take(&mut *committed.lock().unwrap_or_else(PoisonError::into_inner));
    let received = std::mem::take(&mut *received.lock().unwrap_or_else(PoisonError::into_inner));
    match receiver_done {
        Ok(joined) => joined.context("the subscriber task panicked")?,
        Err(_) => bail!(
            "only {} of {total} messages reached the subscriber within {wait:?} after the producer stopped (the stream holds {in_stream}; outbox: {backlog}; relay: {health:?})",
            received.len()
        ),
    }

    // A message delivered before COMMIT returned to the producer counts as zero.
    let (latencies, early) = stats::latencies(&committed, &received);
    if latencies.len() as u64 != total {
        bail!(
            "matched {} of {total} committed messages with a receipt",
            latencies.len()
        );
    }
    report_over_time(&committed, &received, start, config.seconds);
    let p = |q| stats::percentile(&latencies, q).unwrap_or_default();
    eprintln!(
        "relay-latency: p50={} p90={} p99={} p99.9={} max={} ms ({early} received before COMMIT returned, counted as 0)",
        stats::ms(p(50.0)),
        stats::ms(p(90.0)),
        stats::ms(p(99.0)),
        stats::ms(p(99.9)),
        stats::ms(p(100.0)),
    );
    Ok(format!(
        "relay-latency rate={} p50_ms={} p99_ms={}",
        config.rate,
        stats::ms(p(50.0)),
        stats::ms(p(99.0))
    ))
}

/// Prints p50/p99 per 5-second window of commit time to stderr: shows whether latency grows
/// as the table does.
fn report_over_time(
    committed: &HashMap<Uuid, Instant>,
    received: &HashMap<Uuid, Instant>,
    start: Instant,
    seconds: u64,
) {
    const WINDOW: u64 = 5;
    let windows = usize::try_from(seconds.div_ceil(WINDOW))
        .unwrap_or(1)
        .max(1);
    let mut buckets: Vec<Vec<Duration>> = vec![Vec::new(); windows];
    for (id, commit) in committed {
        let Some(receive) = received.get(id) else {
            continue;
        };
        let slot = usize::try_from(commit.saturating_duration_since(start).as_secs() / WINDOW)
            .unwrap_or(usize::MAX)
            .min(windows - 1);
        buckets[slot].push(receive.saturating_duration_since(*commit));
    }
    let parts: Vec<String> = buckets
        .iter_mut()
        .enumerate()
        .map(|(i, bucket)| {
            bucket.sort_unstable();
            let p = |q| stats::ms(stats::percentile(bucket, q).unwrap_or_default());
            format!(
                "{}-{}s p50={} p99={}",
                i as u64 * WINDOW,
                (i as u64 + 1) * WINDOW,
                p(50.0),
                p(99.0)
            )
        })
        .collect();
    eprintln!("relay-latency: by commit time: {}", parts.join("; "));
}
