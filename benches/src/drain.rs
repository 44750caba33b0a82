//! `relay-drain`: how fast the relay publishes a backlog, against the best the broker does.
//!
//! Baseline: `events` messages published straight to JetStream with async-nats, `window` acks
//! in flight, the headers the relay sends (`envelope::nats::to_headers`) and the same payload,
//! to a second stream with identical settings. Then the same number of outbox rows are
//! enqueued (not timed) and the relay runs with the default configuration in a process of its
//! own ([`crate::relay_process`]), as the sidecar does; the time runs from when it has
//! connected until the stream holds every message and no row is unpublished, and `rss_mb` is
//! that process's peak resident set.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use async_nats::jetstream;
use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::message::PublishMessage;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use outbox::{Envelope, Message, Outbox};

use crate::env::{self, Poll};
use crate::relay_process::RelayProcess;
use crate::stats;

/// What `relay-drain` measures.
#[derive(Debug, Clone)]
pub struct DrainConfig {
    /// Messages published by each side. Defaults to 100 000.
    pub events: usize,
    /// Payload bytes per message. Defaults to 1024.
    pub payload: usize,
    /// Distinct partition keys, assigned round-robin. Defaults to 1000.
    pub keys: usize,
    /// PubAcks in flight in the raw baseline. Defaults to 1024 (the relay's `max_in_flight`).
    pub window: usize,
    /// The relay's source: the table (polling) or the log (a replication slot, producers on
    /// log storage). Defaults to the table.
    pub source: env::Source,
    /// With the WAL source: write table rows (read from the log as INSERTs) instead of log
    /// messages. Defaults to false.
    pub table_rows: bool,
}

impl Default for DrainConfig {
    fn default() -> Self {
        DrainConfig {
            events: 100_000,
            payload: 1024,
            keys: 1000,
            window: 1024,
            source: env::Source::Table,
            table_rows: false,
        }
    }
}

/// Rows per `enqueue_many` statement when filling the outbox.
const ENQUEUE_CHUNK: usize = 1000;

/// Runs the scenario; returns `relay-drain raw_eps=<n> relay_eps=<n> ratio=<r> source=<s>
/// rss_mb=<n>` (the relay process's largest resident set, from its start to the end of the
/// drain).
pub async fn run(config: &DrainConfig, fast_unsafe_db: bool) -> anyhow::Result<String> {
    if config.events == 0 || config.keys == 0 || config.window < 256 {
        bail!("relay-drain needs --events >= 1, --keys >= 1 and --window >= 256");
    }
    let wal = config.source == env::Source::Wal;
    let (servers, db, js) = env::start_with_both_streams(fast_unsafe_db, wal).await?;
    eprintln!(
        "relay-drain: {} messages, {} B payload, {} keys, raw window {}, source {}{}",
        config.events,
        config.payload,
        config.keys,
        config.window,
        config.source.as_str(),
        if wal && config.table_rows {
            " (table rows)"
        } else {
            ""
        }
    );
    if wal {
        db.create_slot().await?;
    }
    let storage = if wal && !config.table_rows {
        outbox::Storage::Log
    } else {
        outbox::Storage::Table
    };
    let outbox = Outbox::with_config(outbox::OutboxConfig {
        storage,
        ..outbox::OutboxConfig::for_source(crate::SOURCE)
    })
    .context("outbox")?;
    let payload = Bytes::from(vec![b'x'; config.payload]);
    let message = |subject: &str, i: usize| {
        Message::raw(
            subject,
            crate::EVENT_TYPE,
            format!("key-{}", i % config.keys),
            payload.clone(),
        )
    };

    // Baseline: raw pipelined JetStream publishing.
    let envelopes = (0..config.events)
        .map(|i| outbox.prepare(message(env::RAW_SUBJECT, i)))
        .collect::<Result<Vec<_>, _>>()
        .context("preparing the raw baseline's messages")?;
    let raw_client = servers.nats_client("bench-raw").await?;
    let raw_elapsed = publish_raw(raw_client, &envelopes, config.window).await?;
    drop(envelopes);
    let stored = env::stream_messages(&js, env::RAW_STREAM).await?;
    if stored != config.events as u64 {
        bail!(
            "the raw stream holds {stored} messages, {} were published",
            config.events
        );
    }
    let raw_eps = stats::per_second(config.events as u64, raw_elapsed);
    eprintln!("relay-drain: raw publish of {stored} took {raw_elapsed:.2?} ({raw_eps:.0}/s)");

    // The relay: enqueue (not timed), then drain.
    let fill = Instant::now();
    let mut conn = db.pool.acquire().await.context("connecting")?;
    for start in (0..config.events).step_by(ENQUEUE_CHUNK) {
        let end = config.events.min(start + ENQUEUE_CHUNK);
        outbox
            .enqueue_many(&mut conn, (start..end).map(|i| message(env::SUBJECT, i)))
            .await
            .context("enqueueing outbox rows")?;
    }
    drop(conn);
    let vacuum = db.vacuum_analyze().await?;
    eprintln!(
        "relay-drain: enqueued {} rows in {:.2?} (VACUUM ANALYZE {vacuum:.2?}); starting the relay",
        config.events,
        fill.elapsed()
    );

    let relay = RelayProcess::start(
        config.source,
        servers.nats_url(),
        &db.url,
        "bench-relay-drain",
        Duration::from_secs(60),
    )
    .await?;
    let start = Instant::now();
    let connected_rss = relay.rss_mb()?;
    let expected = config.events as u64;
    let deadline = Duration::from_secs(600);
    env::poll(
        "relay publishing",
        Duration::from_millis(10),
        deadline,
        || async {
            relay.ensure_running()?;
            let n = env::stream_messages(&js, env::STREAM).await?;
            Ok(if n >= expected {
                Poll::Done(())
            } else {
                Poll::Waiting(format!("{n}/{expected} in the stream"))
            })
        },
    )
    .await?;
    let (_, end) = env::poll(
        "the relay marking rows published",
        Duration::from_millis(10),
        deadline,
        || async {
            relay.ensure_running()?;
            let n = db.unpublished().await?;
            Ok(if n == 0 {
                Poll::Done(())
            } else {
                Poll::Waiting(format!("{n} unpublished"))
            })
        },
    )
    .await?;
    let relay_elapsed = end - start;
    let rss_mb = relay.peak_rss_mb()?;
    eprintln!(
        "relay-drain: the relay process was {connected_rss:.0} MB resident once connected, {rss_mb:.0} MB at its peak"
    );
    relay.stop(Duration::from_secs(60)).await?;
    let stored = env::stream_messages(&js, env::STREAM).await?;
    if stored != expected {
        bail!("the relay's stream holds {stored} messages, {expected} rows were enqueued");
    }
    db.pool.close().await;
    let relay_eps = stats::per_second(expected, relay_elapsed);
    eprintln!("relay-drain: relay drained {expected} in {relay_elapsed:.2?} ({relay_eps:.0}/s)");

    Ok(format!(
        "relay-drain raw_eps={raw_eps:.0} relay_eps={relay_eps:.0} ratio={:.2} source={} rss_mb={rss_mb:.0}",
        stats::ratio(relay_eps, raw_eps),
        config.source.as_str()
    ))
}

/// Publishes every envelope with at most `window` acks outstanding; returns the time from the
/// first send to the last ack. Headers are encoded in the loop, as the relay's publisher does.
pub(crate) async fn publish_raw(
    client: async_nats::Client,
    envelopes: &[Envelope],
    window: usize,
) -> anyhow::Result<Duration> {
    let js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(5))
        .max_ack_inflight(window)
        .backpressure_on_inflight(true)
        .build(client);
    let mut acks: FuturesUnordered<<PublishAckFuture as IntoFuture>::IntoFuture> =
        FuturesUnordered::new();
    let start = Instant::now();
    for envelope in envelopes {
        while acks.len() >= window {
            if let Some(ack) = acks.next().await {
                ack.context("raw publish: PubAck")?;
            }
        }
        let headers = envelope::nats::to_headers(envelope).context("encoding headers")?;
        let message = PublishMessage::build()
            .headers(headers)
            .payload(envelope.payload.clone());
        let ack = js
            .send_publish(envelope.subject.to_string(), message)
            .await
            .context("raw publish")?;
        acks.push(ack.into_future());
    }
    while let Some(ack) = acks.next().await {
        ack.context("raw publish: PubAck")?;
    }
    Ok(start.elapsed())
}
