//! `inbox-consume`: the inbox consumer against raw pull consumption of the same stream.
//!
//! `events` messages (toolkit envelopes with a small JSON payload) are published to a stream
//! first (not timed). Then, in the same run:
//! 1. **raw**: a durable pull consumer with explicit acks reads and acks every message, no
//!    database (the ceiling);
//! 2. **pg_commit_tps**: one connection commits single-row inserts for three seconds (the
//!    ceiling of strict mode, which commits once per message), measured before and again
//!    after the inbox run; the mean is printed;
//! 3. **inbox**: an `inbox::Consumer` (strict or batched) whose handler inserts one row per
//!    event (`--handler per-message`: one INSERT per message; `--handler batch`: a
//!    `BatchHandler`, one multi-row INSERT per batch),
//!    from its own durable consumer, timed until its ack floor reaches the last message
//!    (acks follow commits), then checked: every event applied exactly once.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::{self, AckKind};
use envelope::{Envelope, Event, HeaderText};
use futures::StreamExt;
use inbox::{
    BatchHandler, Consumer, ConsumerConfig, Delivery, Handler, HandlerError, Mode, typed,
    typed_batch,
};
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool};

use crate::env::{Poll, STREAM, STREAM_SUBJECTS, Servers, poll};
use crate::stats;

/// What `inbox-consume` measures.
#[derive(Debug, Clone)]
pub struct InboxConfig {
    /// `strict` or `batched`. Defaults to strict.
    pub batched: bool,
    /// Messages per transaction in batched mode. Defaults to 100.
    pub batch: usize,
    /// Messages consumed. Defaults to 100 000.
    pub events: usize,
    /// Consumer lanes. Defaults to the consumer's default (8).
    pub concurrency: usize,
    /// Use a batch handler (one multi-row INSERT per batch) instead of a per-message one
    /// (one INSERT per message). Both insert one row per event. Defaults to false.
    pub batch_handler: bool,
}

impl Default for InboxConfig {
    fn default() -> Self {
        InboxConfig {
            batched: false,
            batch: 100,
            events: 100_000,
            concurrency: inbox::ConsumerConfig::new("bench-inbox", STREAM).concurrency,
            batch_handler: false,
        }
    }
}

/// The consumed event.
#[derive(Debug, Serialize, Deserialize)]
pub struct Tick {
    /// Its number.
    pub n: u64,
}

impl Event for Tick {
    const NAME: &'static str = "inbox.tick";
    const VERSION: u32 = 1;
    fn partition_key(&self) -> String {
        format!("k-{}", self.n % 1000)
    }
}

/// Inserts one row per event.
struct Sink;

impl Handler<Tick> for Sink {
    async fn handle(
        &self,
        conn: &mut PgConnection,
        event: Tick,
        _delivery: &Delivery,
    ) -> Result<(), HandlerError> {
        sqlx::query("INSERT INTO sink (n) VALUES ($1)")
            .bind(event.n as i64)
            .execute(conn)
            .await
            .map_err(HandlerError::retry)?;
        Ok(())
    }
}

/// Inserts one row per event, for the whole batch with one statement.
struct BulkSink;

impl BatchHandler<Tick> for BulkSink {
    async fn handle_batch(
        &self,
        conn: &mut PgConnection,
        events: Vec<(Tick, &Delivery)>,
    ) -> Result<(), HandlerError> {
        let ns: Vec<i64> = events.iter().map(|(event, _)| event.n as i64).collect();
        sqlx::query("INSERT INTO sink (n) SELECT unnest($1::bigint[])")
            .bind(ns)
            .execute(conn)
            .await
            .map_err(HandlerError::retry)?;
        Ok(())
    }
}

/// Runs the scenario and returns its final line.
pub async fn run(config: &InboxConfig, fast_unsafe_db: bool) -> anyhow::Result<String> {
    anyhow::ensure!(
        config.events > 0 && config.concurrency > 0,
        "inbox-consume needs --events and --concurrency above 0"
    );
    let servers = Servers::start(fast_unsafe_db).await?;
    let db = servers.database().await?;
    sqlx::query("CREATE TABLE sink (n bigint NOT NULL)")
        .execute(&db.pool)
        .await?;
    sqlx::query("CREATE TABLE commit_probe (n bigint NOT NULL)")
        .execute(&db.pool)
        .await?;
    let client = servers.nats_client("bench-inbox").await?;
    let js = jetstream::new(client);
    servers.ensure_stream(&js, STREAM, STREAM_SUBJECTS).await?;
    servers.report_durability(&db, &js).await?;

    eprintln!("publishing {} messages (not timed)", config.events);
    publish_all(&js, config.events).await?;

    let raw_eps = raw_consume(&js, config.events).await?;
    eprintln!("raw pull consume with explicit acks: {raw_eps:.0} msg/s");
    let commits_before = commit_rate(&db.pool).await?;
    eprintln!("single-row commits on one connection: {commits_before:.0} tx/s (before)");

    let mode = if config.batched {
        Mode::Batched {
            max_messages: config.batch,
        }
    } else {
        Mode::Strict
    };
    let consumer_config = ConsumerConfig {
        mode,
        concurrency: config.concurrency,
        ..ConsumerConfig::new("bench-inbox", STREAM)
    };
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(config.concurrency as u32 + 4)
        .connect(&db.url)
        .await
        .context("connecting the consumer's pool")?;
    let consumer = if config.batch_handler {
        Consumer::with_batch_handler(consumer_config, pool, js.clone(), typed_batch(BulkSink))?
    } else {
        Consumer::new(consumer_config, pool, js.clone(), typed(Sink))?
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let started = Instant::now();
    let task = tokio::spawn(consumer.run(async move {
        let _ = stopped.await;
    }));
    // Done when the consumer's ack floor reaches the last message: acks follow commits, so
    // every row is committed by then. Polled through the broker, not with `count(*)` on
    // `sink`: counting a growing table 50 times a second cost PostgreSQL a sixth of a core,
    // which is the resource this scenario measures.
    let stream = js.get_stream(STREAM).await?;
    let last = stream.get_info().await?.state.last_sequence;
    let (_, done_at) = poll(
        "inbox consumer",
        Duration::from_millis(20),
        Duration::from_secs(900),
        || {
            let stream = stream.clone();
            async move {
                let Ok(mut consumer) = stream
                    .get_consumer::<jetstream::consumer::pull::Config>("bench-inbox")
                    .await
                else {
                    return Ok(Poll::Waiting("consumer not created yet".to_owned()));
                };
                let info = consumer.info().await?;
                Ok(if info.ack_floor.stream_sequence >= last {
                    Poll::Done(())
                } else {
                    Poll::Waiting(format!(
                        "ack floor {}/{last}",
                        info.ack_floor.stream_sequence
                    ))
                })
            }
        },
    )
    .await?;
    let inbox_eps = stats::per_second(config.events as u64, done_at - started);
    drop(stop);
    task.await.context("consumer task")??;
    // Measured again after the consumer and averaged: the flush latency of a virtual disk
    // drifts over tens of seconds, and one side of the comparison should not get a better
    // disk than the other.
    let commits_after = commit_rate(&db.pool).await?;
    let pg_commit_tps = (commits_before + commits_after) / 2.0;
    eprintln!(
        "single-row commits on one connection: {commits_after:.0} tx/s (after); mean {pg_commit_tps:.0} tx/s; inbox {:.2} x that",
        inbox_eps / pg_commit_tps
    );
    let (rows, distinct): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT n) FROM sink")
            .fetch_one(&db.pool)
            .await?;
    anyhow::ensure!(
        rows == distinct && rows == config.events as i64,
        "the handler applied {rows} rows for {distinct} distinct events of {}",
        config.events
    );

    Ok(format!(
        "inbox-consume mode={} raw_eps={raw_eps:.0} inbox_eps={inbox_eps:.0} ratio={:.2} pg_commit_tps={pg_commit_tps:.0} handler={}",
        if config.batched { "batched" } else { "strict" },
        stats::ratio(inbox_eps, raw_eps),
        if config.batch_handler {
            "batch"
        } else {
            "per-message"
        },
    ))
}

async fn publish_all(js: &jetstream::Context, events: usize) -> anyhow::Result<()> {
    let source = HeaderText::new("source", crate::SOURCE)?;
    let mut pending = std::collections::VecDeque::new();
    for n in 0..events as u64 {
        let mut env = Envelope::from_event(source.clone(), &Tick { n })?;
        env.subject = envelope::Subject::new("bench.tick.v1")?;
        let headers = envelope::nats::to_headers(&env)?;
        pending.push_back(
            js.publish_with_headers(env.subject.to_string(), headers, env.payload.clone())
                .await?,
        );
        if pending.len() >= 256
            && let Some(ack) = pending.pop_front()
        {
            ack.await?;
        }
    }
    for ack in pending {
        ack.await?;
    }
    Ok(())
}

async fn raw_consume(js: &jetstream::Context, events: usize) -> anyhow::Result<f64> {
    let stream = js.get_stream(STREAM).await?;
    let consumer: jetstream::consumer::Consumer<jetstream::consumer::pull::Config> = stream
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some("bench-raw".into()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            max_ack_pending: 10_000,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(500)
        .messages()
        .await?;
    let started = Instant::now();
    let mut seen = 0usize;
    while seen < events {
        let message = messages
            .next()
            .await
            .context("the raw consumer's stream ended")?
            .map_err(|e| anyhow::anyhow!("raw pull failed: {e}"))?;
        message
            .ack_with(AckKind::Ack)
            .await
            .map_err(|e| anyhow::anyhow!("ack failed: {e}"))?;
        seen += 1;
    }
    Ok(stats::per_second(events as u64, started.elapsed()))
}

async fn commit_rate(pool: &PgPool) -> anyhow::Result<f64> {
    let mut conn = pool.acquire().await?;
    let started = Instant::now();
    let mut commits = 0u64;
    while started.elapsed() < Duration::from_secs(3) {
        sqlx::query("INSERT INTO commit_probe (n) VALUES ($1)")
            .bind(commits as i64)
            .execute(&mut *conn)
            .await?;
        commits += 1;
    }
    Ok(stats::per_second(commits, started.elapsed()))
}
