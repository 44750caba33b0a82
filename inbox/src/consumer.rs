//! The consumer runtime.
//!
//! A reader task pulls messages from the durable JetStream consumer and routes each to a
//! lane by partition key (`ce-partitionkey`, else the subject), so messages of one key are
//! handled in delivery order while different keys run concurrently. Each lane handles its
//! messages one at a time (strict mode) or in groups of up to `max_messages` per transaction
//! (batched mode). Acks are sent only after the transaction commits. Two background tasks
//! clean old inbox rows and run `dlq retry` requests for this consumer.

use std::collections::hash_map::DefaultHasher;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};

/// The durable pull consumer this runtime reads.
type PullConsumer = async_nats::jetstream::consumer::Consumer<pull::Config>;
use async_nats::jetstream::{self, AckKind};
use backon::{BackoffBuilder, ExponentialBuilder};
use futures::StreamExt;
use sqlx::pool::PoolConnection;
use sqlx::{Acquire, PgConnection, PgPool, Postgres};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{ConsumerConfig, Mode};
use crate::error::Error;
use crate::handler::{Delivery, HandlerError, OneAtATime, RawBatchHandler, RawHandler};
use crate::layer::Layer;
use crate::metrics as m;
use crate::store;

/// A running consumer's parts; see the module docs.
pub struct Consumer {
    config: ConsumerConfig,
    pool: PgPool,
    jetstream: jetstream::Context,
    /// Runs one delivery: the handler given to [`Consumer::new`], or the batch handler with a
    /// batch of one.
    handler: Arc<dyn RawHandler>,
    /// The batch handler given to [`Consumer::with_batch_handler`].
    batch_handler: Option<Arc<dyn RawBatchHandler>>,
}

/// What to tell the broker about a message once its transaction is over.
#[derive(Clone, Copy)]
enum Reply {
    Ack,
    Nak(Duration),
    Term,
}

/// The outcome of handling one message inside a transaction.
enum Handled {
    /// Commit, then send this.
    Reply(Reply),
    /// The handler failed without a savepoint: roll back, then resolve in a new transaction.
    Failed {
        error: HandlerError,
        attempt: u32,
        id: String,
    },
}

/// Why a message goes to `dead_letter`.
struct Park {
    reason: String,
    error_chain: Vec<String>,
}

impl Consumer {
    /// A consumer of `config.stream` that runs `handler` (see [`crate::typed`]). The pool
    /// must allow `config.concurrency` + 2 connections: each lane keeps one while the
    /// consumer runs, and a smaller pool would leave lanes (and their keys) waiting forever.
    pub fn new(
        config: ConsumerConfig,
        pool: PgPool,
        jetstream: jetstream::Context,
        handler: Arc<dyn RawHandler>,
    ) -> Result<Self, Error> {
        config.validate()?;
        let needed = config.concurrency as u32 + 2;
        let max = pool.options().get_max_connections();
        if max < needed {
            return Err(Error::Config(format!(
                "the database pool allows {max} connections; a consumer with concurrency {} needs at least {needed} (one per lane, two for the cleaner and dlq retries)",
                config.concurrency
            )));
        }
        Ok(Consumer {
            config,
            pool,
            jetstream,
            handler,
            batch_handler: None,
        })
    }

    /// A consumer whose handler takes whole batches (see [`RawBatchHandler`] and
    /// [`crate::handler::typed_batch`]). In batched mode each transaction inserts the
    /// batch's inbox rows with one statement, calls the handler once with every message
    /// that is new, and commits: a handler that writes with one multi-row statement costs a
    /// few round trips per batch instead of one per message. If the handler fails, the batch
    /// is rolled back and run again one message at a time, each in a savepoint, so that only
    /// the failing message is retried or dead-lettered. In strict mode every batch has one
    /// message. The same pool requirement as [`Consumer::new`].
    pub fn with_batch_handler(
        config: ConsumerConfig,
        pool: PgPool,
        jetstream: jetstream::Context,
        handler: Arc<dyn RawBatchHandler>,
    ) -> Result<Self, Error> {
        let mut consumer = Consumer::new(
            config,
            pool,
            jetstream,
            Arc::new(OneAtATime(handler.clone())),
        )?;
        consumer.batch_handler = Some(handler);
        Ok(consumer)
    }

    /// Wraps the handler in a middleware layer (the last added runs outermost). A batch
    /// handler is wrapped with [`Layer::layer_batch`], and its one-message runs go through
    /// the same wrapped handler, so a layer sees every call once.
    pub fn layer(mut self, layer: impl Layer) -> Self {
        match self.batch_handler.take() {
            Some(batch) => {
                let batch = layer.layer_batch(batch);
                self.handler = Arc::new(OneAtATime(batch.clone()));
                self.batch_handler = Some(batch);
            }
            None => self.handler = layer.layer(self.handler),
        }
        self
    }

    /// Creates the durable JetStream consumer if missing, or checks that the existing one
    /// has explicit acks and the configured subjects; refuses a mismatch.
    pub async fn ensure(&self) -> Result<PullConsumer, Error> {
        let name = &self.config.name;
        let fail = |reason: String| Error::JetStream {
            consumer: name.clone(),
            reason,
        };
        let stream = self
            .jetstream
            .get_stream(&self.config.stream)
            .await
            .map_err(|e| fail(format!("stream {}: {e}", self.config.stream)))?;
        let (filter_subject, filter_subjects) = match self.config.filter_subjects.as_slice() {
            [one] => (one.clone(), Vec::new()),
            many => (String::new(), many.to_vec()),
        };
        let wanted = pull::Config {
            durable_name: Some(name.clone()),
            filter_subject,
            filter_subjects,
            ack_policy: AckPolicy::Explicit,
            ack_wait: self.config.ack_wait,
            max_deliver: -1,
            deliver_policy: DeliverPolicy::All,
            max_ack_pending: (self.config.concurrency * self.batch_size() * 4).max(256) as i64,
            ..Default::default()
        };
        let mut consumer: PullConsumer = stream
            .get_or_create_consumer(name, wanted.clone())
            .await
            .map_err(|e| fail(e.to_string()))?;
        let info = consumer.info().await.map_err(|e| fail(e.to_string()))?;
        let have = &info.config;
        let mut have_subjects: Vec<String> = have.filter_subjects.clone();
        if !have.filter_subject.is_empty() {
            have_subjects.push(have.filter_subject.clone());
        }
        let mut want_subjects = self.config.filter_subjects.clone();
        have_subjects.sort();
        want_subjects.sort();
        if have.ack_policy != AckPolicy::Explicit || have_subjects != want_subjects {
            return Err(fail(format!(
                "exists with ack policy {:?} and subjects {have_subjects:?}; expected explicit acks and {want_subjects:?} (delete or rename the consumer)",
                have.ack_policy
            )));
        }
        Ok(consumer)
    }

    fn batch_size(&self) -> usize {
        match self.config.mode {
            Mode::Strict => 1,
            Mode::Batched { max_messages } => max_messages,
        }
    }

    /// Consumes until `shutdown` completes: then stops pulling, lets every lane finish the
    /// message or batch it is handling (committing and acking it), and NAKs what was
    /// pulled but not started so that it is redelivered at once. Never acks a message
    /// whose effects did not commit.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let consumer = self.ensure().await?;
        let this = Arc::new(self);
        let stop = CancellationToken::new();
        let background = TaskTracker::new();
        background.spawn(cleaner(this.clone(), stop.clone()));
        background.spawn(dlq_retries(this.clone(), stop.clone()));
        background.close();

        let lanes_stop = CancellationToken::new();
        let lanes = TaskTracker::new();
        let mut senders = Vec::with_capacity(this.config.concurrency);
        for _ in 0..this.config.concurrency {
            // Room for a few batches per lane, so that one busy lane (a hot key) does not
            // stall the others while the puller waits for it.
            let (tx, rx) = mpsc::channel::<jetstream::Message>((this.batch_size() * 2).max(32));
            senders.push(tx);
            lanes.spawn(lane(this.clone(), rx, lanes_stop.clone()));
        }
        lanes.close();

        tokio::pin!(shutdown);
        // Pull requests of at least 128 messages: a pull is a round trip to the server, and
        // small ones (strict mode has batches of one) left lanes waiting for messages.
        let pull_size = (this.config.concurrency * this.batch_size() * 2).max(128);
        'outer: loop {
            let mut messages = match consumer
                .stream()
                .max_messages_per_batch(pull_size)
                .messages()
                .await
            {
                Ok(messages) => messages,
                Err(e) => {
                    tracing::warn!(consumer = %this.config.name, error = %e, "cannot pull messages; retrying");
                    tokio::select! {
                        _ = &mut shutdown => break 'outer,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue 'outer,
                    }
                }
            };
            loop {
                tokio::select! {
                    _ = &mut shutdown => break 'outer,
                    next = messages.next() => match next {
                        Some(Ok(message)) => {
                            let lane = lane_of(&message, senders.len());
                            if senders[lane].send(message).await.is_err() {
                                break 'outer;
                            }
                        }
                        Some(Err(e)) => {
                            tracing::warn!(consumer = %this.config.name, error = %e, "pull failed; continuing");
                        }
                        None => continue 'outer,
                    }
                }
            }
        }
        tracing::info!(consumer = %this.config.name, "stopping: finishing handlers in progress");
        lanes_stop.cancel();
        drop(senders);
        lanes.wait().await;
        stop.cancel();
        background.wait().await;
        // Acks are fire-and-forget; give the last ones a moment to leave. If the broker is
        // unreachable they are lost, and the redeliveries are skipped by the inbox.
        let _ = tokio::time::timeout(Duration::from_secs(5), this.jetstream.client().flush()).await;
        Ok(())
    }

    fn backoff(&self, attempt: u32) -> Duration {
        ExponentialBuilder::default()
            .with_min_delay(self.config.retry_min_delay)
            .with_max_delay(self.config.retry_max_delay)
            .with_jitter()
            .without_max_times()
            .build()
            .nth(attempt.saturating_sub(1).min(64) as usize)
            .unwrap_or(self.config.retry_max_delay)
    }

    /// What to do after the handler failed on delivery `attempt`: a reply to send, or
    /// `Err` with why the message must be parked.
    fn disposition(&self, error: &HandlerError, attempt: u32) -> Result<Reply, Park> {
        match error {
            HandlerError::Retry { after, error } => {
                if attempt >= self.config.max_attempts {
                    Err(Park {
                        reason: "attempts_exhausted".into(),
                        error_chain: dlq::error_chain(error.as_ref()),
                    })
                } else {
                    Ok(Reply::Nak(after.unwrap_or_else(|| self.backoff(attempt))))
                }
            }
            HandlerError::Permanent { reason, error } => Err(Park {
                reason: reason.clone(),
                error_chain: dlq::error_chain(error.as_ref()),
            }),
        }
    }

    /// Handles one message inside `conn` (the caller's transaction). With `savepoint` the
    /// handler runs in a savepoint and a failure is resolved here (retry, or park through
    /// `conn`); without it (strict mode, one message per transaction) a failure is returned
    /// as [`Handled::Failed`] for the caller to roll back and resolve in a new transaction,
    /// which saves two round trips per message on the common path.
    async fn handle_in(
        &self,
        conn: &mut PgConnection,
        message: &jetstream::Message,
        savepoint: bool,
    ) -> Result<Handled, sqlx::Error> {
        let (attempt, stream_seq) = match message.info() {
            Ok(info) => (
                u32::try_from(info.delivered).unwrap_or(u32::MAX),
                Some(info.stream_sequence),
            ),
            Err(_) => (1, None),
        };
        let subject = message.subject.as_str();
        let decoded = envelope::nats::from_message(
            subject,
            message.headers.as_ref(),
            message.payload.clone(),
        );
        let envelope = match decoded {
            Ok(envelope) => envelope,
            Err(e) => {
                let park = Park {
                    reason: "decode".into(),
                    error_chain: vec![e.to_string()],
                };
                let reply = self
                    .park(conn, message, None, attempt, stream_seq, park)
                    .await?;
                return Ok(Handled::Reply(reply));
            }
        };
        let id = envelope.id.to_string();
        let seq = stream_seq.and_then(|s| i64::try_from(s).ok());
        let delivery = Delivery {
            envelope,
            consumer: Arc::from(self.config.name.as_str()),
            attempt,
            stream_seq,
        };
        if !savepoint {
            if !store::insert_if_new(conn, &self.config.name, &id, subject, seq, "processed")
                .await?
            {
                metrics::counter!(m::DUPLICATES, "consumer" => self.config.name.clone())
                    .increment(1);
                return Ok(Handled::Reply(Reply::Ack));
            }
            return Ok(match self.run_handler(conn, &delivery).await {
                Ok(()) => {
                    self.count_processed();
                    Handled::Reply(Reply::Ack)
                }
                Err(error) => Handled::Failed { error, attempt, id },
            });
        }
        let mut sp = conn.begin().await?;
        if !store::insert_if_new(&mut sp, &self.config.name, &id, subject, seq, "processed").await?
        {
            sp.commit().await?;
            metrics::counter!(m::DUPLICATES, "consumer" => self.config.name.clone()).increment(1);
            return Ok(Handled::Reply(Reply::Ack));
        }
        match self.run_handler(&mut sp, &delivery).await {
            Ok(()) => {
                sp.commit().await?;
                self.count_processed();
                Ok(Handled::Reply(Reply::Ack))
            }
            Err(error) => {
                sp.rollback().await?;
                let reply = self
                    .resolve_failure(conn, message, error, attempt, &id)
                    .await?;
                Ok(Handled::Reply(reply))
            }
        }
    }

    /// The batched fast path: one statement inserts every inbox row, then the handlers run
    /// one after the other in the same transaction without savepoints (or the batch handler
    /// runs once for all new messages), and it commits: two round trips per message fewer
    /// than a savepoint each. Returns `None`, having rolled everything back, when a message
    /// does not decode or a handler fails; the caller then runs the batch again with
    /// savepoints, which isolates the failure. Handlers may
    /// thus run twice for one delivery, but only the second run can commit (the handler
    /// contract allows this: the first transaction did not commit).
    async fn try_batch_without_savepoints(
        &self,
        conn: &mut PgConnection,
        batch: &[jetstream::Message],
    ) -> Result<Option<Vec<Reply>>, sqlx::Error> {
        let mut deliveries = Vec::with_capacity(batch.len());
        for message in batch {
            let (attempt, stream_seq) = match message.info() {
                Ok(info) => (
                    u32::try_from(info.delivered).unwrap_or(u32::MAX),
                    Some(info.stream_sequence),
                ),
                Err(_) => (1, None),
            };
            let Ok(envelope) = envelope::nats::from_message(
                message.subject.as_str(),
                message.headers.as_ref(),
                message.payload.clone(),
            ) else {
                return Ok(None);
            };
            deliveries.push(Delivery {
                envelope,
                consumer: Arc::from(self.config.name.as_str()),
                attempt,
                stream_seq,
            });
        }
        let ids: Vec<String> = deliveries
            .iter()
            .map(|d| d.envelope.id.to_string())
            .collect();
        let subjects: Vec<String> = batch.iter().map(|m| m.subject.to_string()).collect();
        let seqs: Vec<Option<i64>> = deliveries
            .iter()
            .map(|d| d.stream_seq.and_then(|s| i64::try_from(s).ok()))
            .collect();
        let mut tx = conn.begin().await?;
        let mut new: std::collections::HashSet<String> =
            store::insert_many_if_new(&mut tx, &self.config.name, &ids, &subjects, &seqs)
                .await?
                .into_iter()
                .collect();
        let mut fresh = Vec::with_capacity(new.len());
        let mut duplicates = 0;
        for (delivery, id) in deliveries.into_iter().zip(&ids) {
            // Taking the id out makes a second copy in the same batch a duplicate.
            if new.remove(id) {
                fresh.push(delivery);
            } else {
                duplicates += 1;
            }
        }
        let handled = fresh.len() as u64;
        let result = match &self.batch_handler {
            Some(batch_handler) if !fresh.is_empty() => {
                self.run_batch_handler(&mut tx, batch_handler.as_ref(), &fresh)
                    .await
            }
            Some(_) => Ok(()),
            None => {
                let mut result = Ok(());
                for delivery in &fresh {
                    result = self.run_handler(&mut tx, delivery).await;
                    if result.is_err() {
                        break;
                    }
                }
                result
            }
        };
        if result.is_err() {
            tx.rollback().await?;
            return Ok(None);
        }
        tx.commit().await?;
        let name = self.config.name.clone();
        metrics::counter!(m::PROCESSED, "consumer" => name.clone()).increment(handled);
        metrics::counter!(m::DUPLICATES, "consumer" => name).increment(duplicates);
        Ok(Some(vec![Reply::Ack; batch.len()]))
    }

    /// Runs the handler in its span, recording its latency (and, for the caller's
    /// transaction, nothing else: the caller counts what commits).
    async fn run_handler(
        &self,
        conn: &mut PgConnection,
        delivery: &Delivery,
    ) -> Result<(), HandlerError> {
        let span = handler_span(&self.config.name, delivery);
        let started = Instant::now();
        let result =
            tracing::Instrument::instrument(self.handler.handle(conn, delivery), span).await;
        metrics::histogram!(m::HANDLER_LATENCY, "consumer" => self.config.name.clone())
            .record(started.elapsed().as_secs_f64());
        result
    }

    /// Runs the batch handler once for `deliveries`, recording its latency and size as one
    /// sample each. A batch of one runs in the message's handler span (which continues the
    /// producer's trace); a larger batch has many producers, so it runs in an
    /// `inbox.handle_batch` span of its own that continues none of them.
    async fn run_batch_handler(
        &self,
        conn: &mut PgConnection,
        handler: &dyn RawBatchHandler,
        deliveries: &[Delivery],
    ) -> Result<(), HandlerError> {
        let span = match deliveries {
            [one] => handler_span(&self.config.name, one),
            _ => tracing::info_span!(
                "inbox.handle_batch",
                consumer = %self.config.name,
                messages = deliveries.len(),
            ),
        };
        let started = Instant::now();
        let result =
            tracing::Instrument::instrument(handler.handle_batch(conn, deliveries), span).await;
        let consumer = self.config.name.clone();
        metrics::histogram!(m::BATCH_HANDLER_LATENCY, "consumer" => consumer.clone())
            .record(started.elapsed().as_secs_f64());
        metrics::histogram!(m::BATCH_MESSAGES, "consumer" => consumer)
            .record(deliveries.len() as f64);
        result
    }

    fn count_processed(&self) {
        metrics::counter!(m::PROCESSED, "consumer" => self.config.name.clone()).increment(1);
    }

    /// After a handler failure whose effects were rolled back: NAK for a retry, or park the
    /// message through `conn` and terminate it.
    async fn resolve_failure(
        &self,
        conn: &mut PgConnection,
        message: &jetstream::Message,
        error: HandlerError,
        attempt: u32,
        id: &str,
    ) -> Result<Reply, sqlx::Error> {
        match self.disposition(&error, attempt) {
            Ok(reply) => {
                tracing::debug!(consumer = %self.config.name, %id, attempt, error = %error, "handler asked for a retry");
                metrics::counter!(m::RETRIED, "consumer" => self.config.name.clone()).increment(1);
                Ok(reply)
            }
            Err(park) => {
                tracing::warn!(consumer = %self.config.name, %id, attempt, error = %error, reason = %park.reason, "dead-lettering message");
                let stream_seq = message.info().ok().map(|i| i.stream_sequence);
                self.park(conn, message, Some(id), attempt, stream_seq, park)
                    .await
            }
        }
    }

    /// Parks the message (see [`Consumer::park_in`]) in a savepoint of `conn`'s transaction
    /// and returns `Term`. If the database refuses the dead letter, the savepoint is rolled
    /// back, the error logged and counted, and the message NAKed with the longest retry
    /// delay instead, so that one unstorable dead letter cannot fail the other messages of
    /// its transaction; an error that leaves the transaction unusable is returned.
    async fn park(
        &self,
        conn: &mut PgConnection,
        message: &jetstream::Message,
        id: Option<&str>,
        attempt: u32,
        stream_seq: Option<u64>,
        park: Park,
    ) -> Result<Reply, sqlx::Error> {
        let mut savepoint = conn.begin().await?;
        let reason = park.reason.clone();
        match self
            .park_in(&mut savepoint, message, id, attempt, stream_seq, park)
            .await
        {
            Ok(()) => {
                savepoint.commit().await?;
                Ok(Reply::Term)
            }
            Err(e) => {
                savepoint.rollback().await?;
                tracing::error!(consumer = %self.config.name, subject = %message.subject, %reason, error = %e, "cannot write the dead letter; the message will be redelivered");
                metrics::counter!(m::DEAD_LETTER_WRITE_FAILURES, "consumer" => self.config.name.clone())
                    .increment(1);
                Ok(Reply::Nak(self.config.retry_max_delay))
            }
        }
    }

    /// Writes the dead letter and an inbox row marking the message resolved, so that
    /// redeliveries are acknowledged without running the handler.
    async fn park_in(
        &self,
        conn: &mut PgConnection,
        message: &jetstream::Message,
        id: Option<&str>,
        attempt: u32,
        stream_seq: Option<u64>,
        park: Park,
    ) -> Result<(), sqlx::Error> {
        let headers = message
            .headers
            .as_ref()
            .map(dlq::headers_to_json)
            .unwrap_or_default();
        let message_id = id
            .map(str::to_owned)
            .or_else(|| {
                // A broker id longer than any id the toolkit writes is not used as the key
                // of the inbox and dead-letter rows (it could exceed an index entry).
                headers
                    .get("Nats-Msg-Id")
                    .and_then(|v| v.as_str())
                    .filter(|v| v.len() <= MAX_BROKER_ID_BYTES)
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| format!("{}:{}", self.config.stream, stream_seq.unwrap_or(0)));
        let partition_key = headers
            .get("ce-partitionkey")
            .and_then(|v| v.as_str())
            .map(str::to_owned);
        let seq = stream_seq.and_then(|s| i64::try_from(s).ok());
        let letter = dlq::DeadLetter {
            source: dlq::Source::Consumer,
            consumer: self.config.name.clone(),
            message_id: message_id.clone(),
            subject: message.subject.to_string(),
            partition_key,
            headers,
            payload: message.payload.to_vec(),
            reason: park.reason.clone(),
            error_chain: park.error_chain,
            attempts: i32::try_from(attempt).unwrap_or(i32::MAX),
            stream: Some(self.config.stream.clone()),
            stream_seq: seq,
        };
        dlq::store::record(conn, &letter).await?;
        store::insert_if_new(
            conn,
            &self.config.name,
            &message_id,
            message.subject.as_str(),
            seq,
            "dead_lettered",
        )
        .await?;
        metrics::counter!(m::DEAD_LETTERED, "consumer" => self.config.name.clone(), "reason" => park.reason).increment(1);
        Ok(())
    }
}

/// The longest `Nats-Msg-Id` used as a parked message's id; a longer one is replaced by
/// `stream:sequence`.
const MAX_BROKER_ID_BYTES: usize = 256;

/// The span a handler runs in. With the `opentelemetry` feature its parent is the
/// producer's span from the message's `traceparent`, so the trace continues across services
/// (and outbox messages the handler enqueues carry the same trace id).
fn handler_span(consumer: &str, delivery: &Delivery) -> tracing::Span {
    let envelope = &delivery.envelope;
    let span = tracing::info_span!(
        "inbox.handle",
        consumer = %consumer,
        message_id = %envelope.id,
        subject = %envelope.subject,
        attempt = delivery.attempt,
        trace_id = envelope.trace.as_ref().map(|t| t.trace_id()).unwrap_or_default(),
    );
    #[cfg(feature = "opentelemetry")]
    if let Some(trace) = &envelope.trace {
        use opentelemetry::trace::{
            SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
        };
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        let ids = (
            TraceId::from_hex(trace.trace_id()),
            SpanId::from_hex(trace.parent_span_id()),
        );
        if let (Ok(trace_id), Ok(span_id)) = ids {
            let flags = if trace.sampled() {
                TraceFlags::SAMPLED
            } else {
                TraceFlags::default()
            };
            let state = trace
                .tracestate()
                .and_then(|s| s.parse::<TraceState>().ok())
                .unwrap_or_default();
            let remote = SpanContext::new(trace_id, span_id, flags, true, state);
            let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
        }
    }
    span
}

fn lane_of(message: &jetstream::Message, lanes: usize) -> usize {
    let key = message
        .headers
        .as_ref()
        .and_then(|h| h.get(envelope::nats::CE_PARTITIONKEY))
        .map(|v| v.as_str().to_owned())
        .unwrap_or_else(|| message.subject.to_string());
    let mut hasher = DefaultHasher::new();
    key.hash(&mut hasher);
    (hasher.finish() % lanes as u64) as usize
}

/// One lane: handles its messages in order, one transaction per message or per batch, on a
/// connection it keeps between batches (saving the pool's checkout and liveness check per
/// transaction) and gives back after a database error.
async fn lane(
    consumer: Arc<Consumer>,
    mut rx: mpsc::Receiver<jetstream::Message>,
    stop: CancellationToken,
) {
    let max = consumer.batch_size();
    let mut conn: Option<PoolConnection<Postgres>> = None;
    loop {
        let first = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            next = rx.recv() => match next {
                Some(message) => message,
                None => break,
            },
        };
        let mut batch = vec![first];
        while batch.len() < max {
            match rx.try_recv() {
                Ok(message) => batch.push(message),
                Err(_) => break,
            }
        }
        handle_batch(&consumer, &mut conn, batch).await;
    }
    // Pulled but not started: hand back for immediate redelivery.
    rx.close();
    while let Some(message) = rx.recv().await {
        let _ = message.ack_with(AckKind::Nak(None)).await;
    }
}

/// Handles messages in one transaction, commits, then replies. In batched mode it first
/// tries the fast path ([`Consumer::try_batch_without_savepoints`]); when a handler fails
/// there, the batch is rolled back and run again with a savepoint per message.
/// If the database fails, nothing is acked: the messages are NAKed with a backoff.
async fn handle_batch(
    consumer: &Consumer,
    held: &mut Option<PoolConnection<Postgres>>,
    batch: Vec<jetstream::Message>,
) {
    let strict = consumer.config.mode == Mode::Strict;
    let outcome = async {
        let conn = match held {
            Some(conn) => conn,
            None => held.insert(consumer.pool.acquire().await?),
        };
        if !strict
            && let Some(replies) = consumer.try_batch_without_savepoints(conn, &batch).await?
        {
            return Ok(replies);
        }
        let mut tx = conn.begin().await?;
        let mut replies = Vec::with_capacity(batch.len());
        let mut failed = None;
        for message in &batch {
            match consumer.handle_in(&mut tx, message, !strict).await? {
                Handled::Reply(reply) => replies.push(reply),
                Handled::Failed { error, attempt, id } => {
                    failed = Some((message, error, attempt, id))
                }
            }
        }
        match failed {
            None => tx.commit().await?,
            Some((message, error, attempt, id)) => {
                // Strict mode: undo the handler's writes and the inbox row, then retry or park.
                tx.rollback().await?;
                let mut tx = conn.begin().await?;
                replies.push(
                    consumer
                        .resolve_failure(&mut tx, message, error, attempt, &id)
                        .await?,
                );
                tx.commit().await?;
            }
        }
        Ok::<_, sqlx::Error>(replies)
    }
    .await;
    match outcome {
        Ok(replies) => {
            for (message, reply) in batch.iter().zip(replies) {
                let kind = match reply {
                    Reply::Ack => AckKind::Ack,
                    Reply::Nak(delay) => AckKind::Nak(Some(delay)),
                    Reply::Term => AckKind::Term,
                };
                if let Err(e) = message.ack_with(kind).await {
                    // The effects are committed; a lost ack means a redelivery that the
                    // inbox row turns into a skip.
                    tracing::warn!(consumer = %consumer.config.name, error = %e, "ack failed; the message will be redelivered and skipped");
                }
            }
        }
        Err(e) => {
            // The connection may be broken: take a fresh one for the next batch.
            *held = None;
            let delay = consumer.config.retry_min_delay;
            tracing::warn!(consumer = %consumer.config.name, error = %e, retry_in = ?delay, "database failed; messages will be redelivered");
            for message in &batch {
                let _ = message.ack_with(AckKind::Nak(Some(delay))).await;
            }
        }
    }
}

/// Deletes inbox rows past the retention, every `cleaner_interval`.
async fn cleaner(consumer: Arc<Consumer>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(consumer.config.cleaner_interval);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let result = async {
            let mut conn = consumer.pool.acquire().await?;
            loop {
                let n = store::delete_older_than(
                    &mut conn,
                    &consumer.config.name,
                    consumer.config.inbox_retention,
                    10_000,
                )
                .await?;
                if n < 10_000 {
                    return Ok::<_, sqlx::Error>(());
                }
            }
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(consumer = %consumer.config.name, error = %e, "inbox cleaner failed");
        }
    }
}

/// Runs `dlq retry` requests for this consumer: each re-runs the handler from the parked
/// bytes in one transaction with the dead letter's new status, so it takes effect once; it
/// does not go through the broker, so no other consumer sees the message again.
async fn dlq_retries(consumer: Arc<Consumer>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(consumer.config.retry_poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = run_retry_requests(&consumer).await {
            tracing::warn!(consumer = %consumer.config.name, error = %e, "running dlq retries failed");
        }
    }
}

async fn run_retry_requests(consumer: &Consumer) -> Result<(), sqlx::Error> {
    let mut tx = consumer.pool.begin().await?;
    let letters = dlq::store::take_retry_requests(&mut tx, &consumer.config.name, 16).await?;
    for letter in letters {
        let attempt = u32::try_from(letter.attempts)
            .unwrap_or(0)
            .saturating_add(1);
        let envelope = letter.envelope();
        let result = match envelope {
            Err(e) => Err(HandlerError::permanent_because("decode", e)),
            Ok(envelope) => {
                let delivery = Delivery {
                    envelope,
                    consumer: Arc::from(consumer.config.name.as_str()),
                    attempt,
                    stream_seq: None,
                };
                let mut sp = tx.begin().await?;
                let result = consumer.handler.handle(&mut sp, &delivery).await;
                if result.is_ok() {
                    sp.commit().await?;
                } else {
                    sp.rollback().await?;
                }
                result
            }
        };
        match result {
            Ok(()) => {
                dlq::store::mark_retried(&mut tx, letter.id).await?;
                store::mark_processed(&mut tx, &consumer.config.name, &letter.message_id).await?;
                metrics::counter!(m::DLQ_RETRIES, "consumer" => consumer.config.name.clone(), "result" => "ok").increment(1);
                tracing::info!(consumer = %consumer.config.name, dead_letter = letter.id, "dlq retry succeeded");
            }
            Err(error) => {
                let (reason, chain) = match &error {
                    HandlerError::Permanent { reason, error } => {
                        (reason.clone(), dlq::error_chain(error.as_ref()))
                    }
                    HandlerError::Retry { error, .. } => {
                        ("retry_failed".to_owned(), dlq::error_chain(error.as_ref()))
                    }
                };
                let again = dlq::DeadLetter {
                    source: dlq::Source::Consumer,
                    consumer: letter.consumer.clone(),
                    message_id: letter.message_id.clone(),
                    subject: letter.subject.clone(),
                    partition_key: letter.partition_key.clone(),
                    headers: letter.headers.as_object().cloned().unwrap_or_default(),
                    payload: letter.payload.clone(),
                    reason,
                    error_chain: chain,
                    attempts: 1,
                    stream: None,
                    stream_seq: None,
                };
                dlq::store::record(&mut tx, &again).await?;
                metrics::counter!(m::DLQ_RETRIES, "consumer" => consumer.config.name.clone(), "result" => "failed").increment(1);
                tracing::warn!(consumer = %consumer.config.name, dead_letter = letter.id, error = %error, "dlq retry failed again");
            }
        }
    }
    tx.commit().await
}
