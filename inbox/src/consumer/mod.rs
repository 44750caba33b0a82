//! The consumer runtime.
//!
//! A reader task pulls messages from the durable JetStream consumer and routes each to a
//! lane by partition key (`ce-partitionkey`, else the subject), so messages of one key are
//! handled in delivery order while different keys run concurrently. Each lane handles its
//! messages one at a time (strict mode) or in groups of up to `max_messages` per transaction
//! (batched mode). Acks are sent only after the transaction commits. Two background tasks
//! clean old inbox rows and run `dlq retry` requests for this consumer.
//!
//! `max_attempts` limits *handler attempts*: runs of the handler that failed with
//! [`HandlerError::Retry`], panicked, ran past `handler_timeout`, returned `Ok` but left the
//! transaction aborted (checked with one `SELECT 1` before COMMIT), or whose transaction's COMMIT the
//! database refused. The
//! count is kept in `inbox_attempt` (written in a short transaction of its own after a failed
//! attempt, read in the handler's transaction only for a redelivery, deleted when the message
//! commits or is parked), so NAKs after database errors, NAKs at shutdown and expired
//! `ack_wait`s (all of which grow the broker's delivery count) do not use attempts up; past
//! 10 x `max_attempts` (at least 100) deliveries a message is parked as `deliveries_exhausted`. While a
//! message waits in its lane or its handler runs, the lane sends progress acks
//! (`AckKind::Progress`) every quarter of `ack_wait`, so a slow handler does not get itself
//! and the messages queued behind it redelivered.
//!
//! A COMMIT the database refuses (a deferred constraint, a serialization failure) is pinned
//! on one message: a batch whose COMMIT fails is run again one message at a time, each in a
//! transaction of its own, so the others commit and only the culprit is retried, then parked
//! with reason `commit_failed`. The `dlq retry` runner does the same with a group of letters.
//!
//! A handler that panics is caught inside its transaction: the transaction (or savepoint) is
//! rolled back, [`crate::metrics::HANDLER_PANICS`] counts it, and the message is retried like
//! [`HandlerError::retry`], then dead-lettered with reason `panic` after `max_attempts`. The
//! runtime's own tasks are supervised: if one ends without shutdown being asked, `run`
//! returns [`Error::TaskFailed`] instead of `Ok`.

mod batch;
mod call;
mod dead_letter;
mod failure;
mod lane;
mod maintenance;
mod provision;
mod pull;
mod supervised;
mod trace;
mod transaction;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use outbox::deadline::within;
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{ConsumerConfig, Mode};
use crate::error::Error;
#[cfg(doc)]
use crate::handler::HandlerError;
use crate::handler::{OneAtATime, RawBatchHandler, RawHandler};
use crate::health::Health;
use crate::layer::Layer;
use lane::{Queued, lane};
use maintenance::{cleaner, dlq_retries};
use supervised::Supervised;

/// The durable pull consumer this runtime reads.
type PullConsumer =
    async_nats::jetstream::consumer::Consumer<async_nats::jetstream::consumer::pull::Config>;

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
    /// What readiness reports ([`Consumer::health`]).
    health: Health,
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
            health: Health::default(),
        })
    }

    /// A consumer whose handler takes whole batches (see [`RawBatchHandler`] and
    /// [`crate::handler::typed_batch`]). In batched mode each transaction inserts the
    /// batch's inbox rows with one statement, calls the handler once with every message
    /// that is new, and commits: a handler that writes with one multi-row statement costs a
    /// few round trips per batch instead of one per message. If the handler fails, the batch
    /// is rolled back and run again one message at a time, each in a savepoint, so that only
    /// the failing message is retried or dead-lettered; if the batch's COMMIT is refused, it
    /// is run again one message at a time, each in a transaction of its own. In strict mode
    /// every batch has one message. The same pool requirement as [`Consumer::new`].
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

    /// What readiness reports about this consumer, to take before [`Consumer::run`]: ready
    /// while it consumes with its database and broker reachable (see [`Health`]).
    pub fn health(&self) -> Health {
        self.health.clone()
    }

    /// Consumes until `shutdown` completes: then stops pulling, lets every lane finish the
    /// message or batch it is handling (committing and acking it), and NAKs what was
    /// pulled but not started so that it is redelivered at once. Never acks a message
    /// whose effects did not commit.
    ///
    /// Returns `Ok` only after a shutdown that was asked for. A handler's panic does not end
    /// it (the message is retried, then dead-lettered with reason `panic`); if one of its
    /// tasks (a lane, the inbox cleaner, the `dlq retry` runner) nevertheless ends before
    /// shutdown, for instance by panicking outside a handler, the consumer stops the others
    /// as on shutdown and returns [`Error::TaskFailed`] naming it, so that the process can
    /// exit or restart the consumer instead of running on without it. It first runs
    /// [`Consumer::ensure`] and returns its error.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let consumer = self.ensure().await?;
        self.health.start(self.jetstream.client());
        let _unready_when_done = self.health.stopped_on_drop();
        let this = Arc::new(self);
        let stop = CancellationToken::new();
        let mut background = Supervised::default();
        background.spawn(
            "the inbox cleaner".into(),
            cleaner(this.clone(), stop.clone()),
        );
        background.spawn(
            "the dlq retry runner".into(),
            dlq_retries(this.clone(), stop.clone()),
        );

        let lanes_stop = CancellationToken::new();
        let mut lanes = Supervised::default();
        let mut senders = Vec::with_capacity(this.config.concurrency);
        for i in 0..this.config.concurrency {
            // Room for a few batches per lane, so that one busy lane (a hot key) does not
            // stall the others while the puller waits for it.
            let (tx, rx) = mpsc::channel::<Queued>((this.batch_size() * 2).max(32));
            senders.push(tx);
            lanes.spawn(
                format!("lane {i}"),
                lane(this.clone(), rx, lanes_stop.clone()),
            );
        }

        tokio::pin!(shutdown);
        // Why the consumer stops other than by shutdown: tasks that ended, and why.
        let mut failures: Vec<String> = Vec::new();
        let stopped = pull::read_until_stopped(
            &this,
            &consumer,
            &senders,
            &mut lanes,
            &mut background,
            shutdown.as_mut(),
        )
        .await;
        let asked_to_stop = stopped.is_none();
        failures.extend(stopped);
        if asked_to_stop {
            tracing::info!(consumer = %this.config.name, "stopping: finishing handlers in progress");
        } else {
            tracing::error!(consumer = %this.config.name, failures = ?failures, "a consumer task ended; stopping the others");
        }
        // Not consuming any more: unready from here on.
        this.health.stop();
        lanes_stop.cancel();
        drop(senders);
        while let Some(ended) = lanes.next().await {
            if let Some(failure) = ended.failure() {
                failures.push(failure);
            }
        }
        stop.cancel();
        while let Some(ended) = background.next().await {
            if let Some(failure) = ended.failure() {
                failures.push(failure);
            }
        }
        // Acks are fire-and-forget; give the last ones a moment to leave. If the broker is
        // unreachable they are lost, and the redeliveries are skipped by the inbox.
        let _ = tokio::time::timeout(Duration::from_secs(5), this.jetstream.client().flush()).await;
        if asked_to_stop && failures.is_empty() {
            return Ok(());
        }
        if failures.is_empty() {
            failures.push("the reader stopped before shutdown".into());
        }
        Err(Error::TaskFailed {
            consumer: this.config.name.clone(),
            reason: failures.join("; "),
        })
    }

    /// A database step of the consumer's own, within `db_timeout` (see [`within`]).
    async fn db<T>(
        &self,
        step: impl Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, sqlx::Error> {
        within(self.config.db_timeout, step).await
    }

    fn batch_size(&self) -> usize {
        match self.config.mode {
            Mode::Strict => 1,
            Mode::Batched { max_messages } => max_messages,
        }
    }

    /// The broker's limit on unacknowledged messages of a durable this consumer creates;
    /// also the most a lane queues (and keeps alive with progress acks) behind its current
    /// batch.
    fn max_ack_pending(&self) -> usize {
        (self.config.concurrency * self.batch_size() * 4).max(256)
    }

    /// How often a lane sends progress acks for the messages it holds: a quarter of
    /// `ack_wait`, so that one arrives well before `ack_wait` runs out.
    fn progress_period(&self) -> Duration {
        self.config.ack_wait / 4
    }

    /// The delay before handler retry `attempt` ([`outbox::backoff::delay`], as the relay's).
    fn backoff(&self, attempt: u32) -> Duration {
        outbox::backoff::delay(
            self.config.retry_min_delay,
            self.config.retry_max_delay,
            attempt,
        )
    }
}
