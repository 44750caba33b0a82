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

use std::any::Any;
use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};

/// The durable pull consumer this runtime reads.
type PullConsumer = async_nats::jetstream::consumer::Consumer<pull::Config>;
use async_nats::jetstream::{self, AckKind};
use backon::{BackoffBuilder, ExponentialBuilder};
use futures::{FutureExt, StreamExt};
use outbox::deadline::{is_timeout, within};
use sqlx::pool::PoolConnection;
use sqlx::{Acquire, PgConnection, PgPool, Postgres, Transaction};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{ConsumerConfig, Mode};
use crate::error::Error;
use crate::handler::{Delivery, HandlerError, OneAtATime, RawBatchHandler, RawHandler};
use crate::health::Health;
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
    /// What readiness reports ([`Consumer::health`]).
    health: Health,
}

/// What to tell the broker about a message once its transaction is over.
#[derive(Clone, Copy)]
enum Reply {
    Ack,
    Nak(Duration),
    Term,
}

impl Reply {
    fn kind(self) -> AckKind {
        match self {
            Reply::Ack => AckKind::Ack,
            Reply::Nak(delay) => AckKind::Nak(Some(delay)),
            Reply::Term => AckKind::Term,
        }
    }
}

/// The outcome of handling one message inside a transaction, without a savepoint.
enum Handled {
    /// No handler run to commit (a redelivery of a handled message, or a message parked at
    /// once): commit, then send this.
    Reply(Reply),
    /// The handler succeeded: commit, then ack. If the COMMIT is refused, that is this
    /// message's failure ([`Failure::Commit`]).
    Ran(Ran),
    /// The handler failed: roll back, then resolve in a new transaction.
    Failed { error: Failure, ran: Ran },
}

/// A message whose handler ran: its id and which handler attempt the run was.
struct Ran {
    id: String,
    attempt: u32,
}

/// A message read from the broker, ready for its handler.
struct Read {
    delivery: Delivery,
    id: String,
    seq: Option<i64>,
}

/// Why a lane's transaction did not go through.
#[derive(Debug)]
enum Fault {
    /// The database or the connection failed: nothing is counted, the messages are NAKed
    /// and redelivered.
    Database(sqlx::Error),
    /// The database refused the COMMIT (see [`refused`]): something the transaction did is
    /// the cause, so it is pinned on one message by running them one at a time.
    Commit(sqlx::Error),
}

impl From<sqlx::Error> for Fault {
    fn from(e: sqlx::Error) -> Self {
        Fault::Database(e)
    }
}

/// Whether `e` says the database could not be reached (a lost or silent connection, no
/// connection from the pool), rather than that it answered with an error.
fn database_unreachable(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
    )
}

/// Commits `tx`, telling a COMMIT the database refused ([`Fault::Commit`]) from one lost
/// with the connection or the server ([`Fault::Database`]).
async fn commit(tx: Transaction<'_, Postgres>, limit: Duration) -> Result<(), Fault> {
    within(limit, tx.commit()).await.map_err(|e| {
        if refused(&e) {
            Fault::Commit(e)
        } else {
            Fault::Database(e)
        }
    })
}

/// Whether a failed statement was refused by the server for what the transaction did (a
/// deferred constraint or trigger, a serialization failure or deadlock, a check), rather than
/// failed with the connection or the server: an error from the database other than a
/// connection exception (SQLSTATE class 08), insufficient resources (53), an operator
/// intervention such as a shutdown (57, but 57014 `query_canceled`, which a
/// `statement_timeout` raises at a COMMIT whose deferred work is too slow, is refused), a
/// system error (58), an internal error (XX), or the end of the session by
/// `idle_in_transaction_session_timeout` (25P03) or `transaction_timeout` (25P04), after
/// which the connection is gone.
fn refused(e: &sqlx::Error) -> bool {
    let Some(db) = e.as_database_error() else {
        return false;
    };
    match db.code().as_deref() {
        Some("57014") => true,
        Some("25P03" | "25P04") => false,
        Some(code) => !["08", "53", "57", "58", "XX"]
            .iter()
            .any(|class| code.starts_with(class)),
        None => true,
    }
}

/// Whether `e` says that the transaction is aborted (SQLSTATE 25P02,
/// `in_failed_sql_transaction`): an earlier statement of it failed.
fn is_aborted(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|db| db.code())
        .is_some_and(|code| code == "25P02")
}

/// Checks, before the COMMIT of a transaction in which handler code ran without a savepoint,
/// that the handler did not leave it aborted: a handler that ignored a failed statement (a
/// unique violation, `SELECT 1/0`) and returned `Ok` leaves a transaction that PostgreSQL
/// rolls back at COMMIT, which answers with the tag `ROLLBACK` and no error, so the message
/// would be acked with no effect and no inbox row. `Ok(Err(..))` for such a transaction
/// ([`Failure::Aborted`], a failed attempt), `Err` if the database failed otherwise.
///
/// Cost: one round trip per transaction (a `SELECT 1`, simple protocol, nothing to plan),
/// sent after the handlers and before COMMIT: in strict mode one per message, in batched
/// mode one per batch. Not measured. A handler in a savepoint needs no such check: its
/// `RELEASE SAVEPOINT` fails with the same SQLSTATE.
async fn check_not_aborted(conn: &mut PgConnection) -> Result<Result<(), Failure>, sqlx::Error> {
    match sqlx::raw_sql("SELECT 1").execute(&mut *conn).await {
        Ok(_) => Ok(Ok(())),
        Err(e) if is_aborted(&e) => Ok(Err(Failure::Aborted(e))),
        Err(e) => Err(e),
    }
}

/// What a failed `RELEASE SAVEPOINT` after a handler that returned `Ok` means: the handler
/// left its savepoint aborted ([`Failure::Aborted`]), or the database failed (`Err`). The
/// savepoint's guard was consumed by the failed release; dropping it queued the
/// `ROLLBACK TO SAVEPOINT`, which runs before the next statement on the connection and
/// makes the enclosing transaction usable again.
fn release_failed(e: sqlx::Error) -> Result<Failure, sqlx::Error> {
    if is_aborted(&e) {
        Ok(Failure::Aborted(e))
    } else {
        Err(e)
    }
}

/// Why a handler call did not succeed, as the runtime sees it.
#[derive(Debug)]
enum Failure {
    /// The handler returned an error, which is its disposition.
    Returned(HandlerError),
    /// The handler panicked, with this message: retried like [`HandlerError::retry`] (with
    /// the consumer's backoff), dead-lettered with reason `panic` once the attempts are
    /// exhausted.
    Panicked(String),
    /// The handler succeeded but the database refused its transaction's COMMIT: retried with
    /// the consumer's backoff, dead-lettered with reason `commit_failed` once the attempts
    /// are exhausted.
    Commit(sqlx::Error),
    /// The handler returned `Ok` but left its transaction (or savepoint) aborted: it ignored
    /// a database error. Retried with the consumer's backoff, dead-lettered with reason
    /// `aborted_transaction` once the attempts are exhausted.
    Aborted(sqlx::Error),
    /// The handler ran longer than `handler_timeout` and was dropped: retried with the
    /// consumer's backoff, dead-lettered with reason `timeout` once the attempts are
    /// exhausted.
    TimedOut(Duration),
}

/// The first line of an `aborted_transaction` dead letter's error chain.
const ABORTED_EXPLAINED: &str = "the handler returned Ok but its transaction was aborted: it ignored a database error (after a failed statement PostgreSQL refuses every other one and rolls the transaction back at COMMIT), so its effects would have been lost";

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Returned(error) => error.fmt(f),
            Failure::Panicked(message) => write!(f, "handler panicked: {message}"),
            Failure::Commit(error) => write!(f, "COMMIT failed: {error}"),
            Failure::Aborted(error) => write!(f, "{ABORTED_EXPLAINED}: {error}"),
            Failure::TimedOut(after) => write!(
                f,
                "the handler did not return within handler_timeout ({after:?}) and was stopped"
            ),
        }
    }
}

impl Failure {
    /// The dead letter's reason and error chain for this failure when it parks a message or
    /// a `dlq retry` fails: `retry` names a handler's retry (`attempts_exhausted` in a lane,
    /// `retry_failed` in a `dlq retry`).
    fn reason(&self, retry: &str) -> (String, Vec<String>) {
        match self {
            Failure::Returned(HandlerError::Permanent { reason, error }) => {
                (reason.clone(), dlq::error_chain(error.as_ref()))
            }
            Failure::Returned(HandlerError::Retry { error, .. }) => {
                (retry.to_owned(), dlq::error_chain(error.as_ref()))
            }
            Failure::Panicked(_) => ("panic".to_owned(), vec![self.to_string()]),
            Failure::Commit(error) => {
                let mut chain = vec!["COMMIT failed".to_owned()];
                chain.extend(dlq::error_chain(error));
                ("commit_failed".to_owned(), chain)
            }
            Failure::Aborted(error) => {
                let mut chain = vec![ABORTED_EXPLAINED.to_owned()];
                chain.extend(dlq::error_chain(error));
                ("aborted_transaction".to_owned(), chain)
            }
            Failure::TimedOut(_) => ("timeout".to_owned(), vec![self.to_string()]),
        }
    }
}

/// The message of a panic payload (`panic!` with a literal or a format string).
fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&'static str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a payload that is not a string".to_owned()
    }
}

/// Why a message goes to `dead_letter`.
struct Park {
    reason: String,
    error_chain: Vec<String>,
    /// The message's id, when it is parked before its handler could run but was decoded
    /// (`deliveries_exhausted`).
    id: Option<String>,
}

/// The safety limit on broker deliveries per handler attempt: a message delivered more than
/// this many times `max_attempts` is parked as `deliveries_exhausted`.
const DELIVERIES_PER_ATTEMPT: u32 = 10;

/// The safety limit is never below this many deliveries, so that a database outage (whose
/// NAKs back off with the delivery count) parks nothing unless it lasts far longer than
/// `retry_max_delay`.
const MIN_DELIVERY_LIMIT: u32 = 100;

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

    /// Creates the durable JetStream consumer if missing, or checks an existing one.
    ///
    /// A consumer it creates has explicit acks, the configured subjects and `ack_wait`,
    /// unlimited deliveries (`max_deliver` -1) and no broker-side `backoff`: the broker never
    /// gives up on a message, the inbox decides when it is dead-lettered (after
    /// `max_attempts`, with the consumer's own NAK delays).
    ///
    /// An existing durable (created by an operator, another tool or an older version) is
    /// never changed: it is shared by every instance of the service and may be managed by
    /// someone else, and rewriting it at start-up would let two instances with different
    /// settings overwrite each other. It is refused with [`Error::JetStream`] if any of
    /// these differ, the reason naming each setting, the value found and the value required,
    /// and the `nats consumer edit` command that fixes it:
    /// - the ack policy (must be explicit) or the filter subjects (must be the configured
    ///   ones; fix by deleting or renaming the consumer);
    /// - `max_deliver` (must be -1, unlimited): with a limit the broker stops redelivering a
    ///   failing message, NAKs for shutdown and database failures included, possibly before
    ///   the inbox dead-letters it, and the message is then gone without a dead letter;
    /// - `backoff` (must be empty): it replaces `ack_wait` as the wait before redelivering an
    ///   unacknowledged message (the inbox retries with its own NAK delays), so the
    ///   redelivery horizon `inbox_retention` was validated against no longer holds;
    /// - `ack_wait` (must equal the configured one): a shorter one redelivers messages whose
    ///   handler is still running, a longer one delays redeliveries beyond the horizon
    ///   `inbox_retention` was validated against. Changing `ack_wait` in the configuration of
    ///   an existing consumer therefore needs the same edit at the broker.
    /// - `headers_only` (must be off): no payloads would be delivered, and every message
    ///   parked as undecodable without its bytes;
    /// - `inactive_threshold` (must be 0): the broker would delete the durable after a
    ///   quiet spell, and the one created anew starts at the stream's first message,
    ///   running handlers again for messages whose inbox rows were cleaned meanwhile.
    ///
    /// The last two cannot be edited: the reason says how to recreate the durable so that it
    /// resumes after its ack floor.
    ///
    /// [`Consumer::run`] calls this first and returns its error.
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
            max_ack_pending: self.max_ack_pending() as i64,
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
        if let Some(reason) =
            redelivery_mismatch(&self.config, have, info.ack_floor.stream_sequence)
        {
            return Err(fail(reason));
        }
        Ok(consumer)
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
        let mut asked_to_stop = false;
        // Capped by the durable's own limit, which the broker enforces on each pull.
        let pull_size = match usize::try_from(consumer.cached_info().config.max_batch) {
            Ok(limit) if limit > 0 => pull_size(&this.config).min(limit),
            _ => pull_size(&this.config),
        };
        'outer: loop {
            let mut messages = match consumer
                .stream()
                .max_messages_per_batch(pull_size)
                .messages()
                .await
            {
                Ok(messages) => {
                    this.health.set_pulling(true);
                    messages
                }
                Err(e) => {
                    this.health.set_pulling(false);
                    tracing::warn!(consumer = %this.config.name, error = %e, "cannot pull messages; retrying");
                    tokio::select! {
                        _ = &mut shutdown => {
                            asked_to_stop = true;
                            break 'outer;
                        }
                        Some(ended) = lanes.next() => {
                            failures.push(ended.before_shutdown());
                            break 'outer;
                        }
                        Some(ended) = background.next() => {
                            failures.push(ended.before_shutdown());
                            break 'outer;
                        }
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue 'outer,
                    }
                }
            };
            loop {
                tokio::select! {
                    _ = &mut shutdown => {
                        asked_to_stop = true;
                        break 'outer;
                    }
                    Some(ended) = lanes.next() => {
                        failures.push(ended.before_shutdown());
                        break 'outer;
                    }
                    Some(ended) = background.next() => {
                        failures.push(ended.before_shutdown());
                        break 'outer;
                    }
                    next = messages.next() => match next {
                        Some(Ok(message)) => {
                            let lane = lane_of(&message, senders.len());
                            let queued = Queued { message, touched: Instant::now() };
                            if senders[lane].send(queued).await.is_err() {
                                // The lane is gone; joining it below says why. The message
                                // is not acked and will be redelivered.
                                failures.push(format!("lane {lane} stopped taking messages"));
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

    /// What readiness reports about this consumer, to take before [`Consumer::run`]: ready
    /// while it consumes with its database and broker reachable (see [`Health`]).
    pub fn health(&self) -> Health {
        self.health.clone()
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

    /// What to do after handler attempt `attempt` failed: a reply to send, or `Err` with
    /// why the message must be parked.
    fn disposition(&self, failure: &Failure, attempt: u32) -> Result<Reply, Park> {
        let park = || {
            let (reason, error_chain) = failure.reason("attempts_exhausted");
            Err(Park {
                reason,
                error_chain,
                id: None,
            })
        };
        match failure {
            Failure::Returned(HandlerError::Permanent { .. }) => park(),
            _ if attempt >= self.config.max_attempts => park(),
            Failure::Returned(HandlerError::Retry {
                after: Some(after), ..
            }) => Ok(Reply::Nak(*after)),
            _ => Ok(Reply::Nak(self.backoff(attempt))),
        }
    }

    /// Reads a message for its handler: `Err` with why it must be parked at once if it does
    /// not decode, or if the broker delivered it more than 10 x `max_attempts` (at least 100) times (the
    /// safety limit, reason `deliveries_exhausted`). The handler attempt is 1 until the inbox insert returns the failed attempts counted for it.
    fn read(&self, message: &jetstream::Message) -> Result<Read, Park> {
        let (delivered, stream_seq) = match message.info() {
            Ok(info) => (
                Some(u32::try_from(info.delivered).unwrap_or(u32::MAX)),
                Some(info.stream_sequence),
            ),
            Err(_) => (None, None),
        };
        let envelope = envelope::nats::from_message(
            message.subject.as_str(),
            message.headers.as_ref(),
            message.payload.clone(),
        )
        .map_err(|e| Park {
            reason: "decode".into(),
            error_chain: vec![e.to_string()],
            id: None,
        })?;
        let limit = self
            .config
            .max_attempts
            .saturating_mul(DELIVERIES_PER_ATTEMPT)
            .max(MIN_DELIVERY_LIMIT);
        if let Some(delivered) = delivered.filter(|d| *d > limit) {
            return Err(Park {
                reason: "deliveries_exhausted".into(),
                error_chain: vec![format!(
                    "the broker delivered the message {delivered} times, more than the safety limit ({limit}: {DELIVERIES_PER_ATTEMPT} x max_attempts, at least {MIN_DELIVERY_LIMIT}), without that many handler attempts failing (database errors, shutdowns, an ack_wait expiring): parked by the safety limit without running the handler"
                )],
                id: Some(envelope.id.to_string()),
            });
        }
        Ok(Read {
            id: envelope.id.to_string(),
            seq: stream_seq.and_then(|s| i64::try_from(s).ok()),
            delivery: Delivery {
                envelope,
                consumer: Arc::from(self.config.name.as_str()),
                attempt: 1,
                delivered,
                stream_seq,
            },
        })
    }

    /// Parks a message that [`Consumer::read`] refused, through `conn`.
    async fn park_unread(
        &self,
        conn: &mut PgConnection,
        message: &jetstream::Message,
        park: Park,
    ) -> Result<Reply, sqlx::Error> {
        let stream_seq = message.info().ok().map(|i| i.stream_sequence);
        let id = park.id.clone();
        // An undecodable message ran its (decoding) attempt once; one parked by the safety
        // limit none.
        let attempt = u32::from(id.is_none());
        self.park(conn, message, id.as_deref(), attempt, stream_seq, park)
            .await
    }

    /// Handles one message inside `conn` (the caller's transaction) without a savepoint:
    /// inserts its inbox row and runs the handler. A failure is returned as
    /// [`Handled::Failed`] for the caller to roll back and resolve in a new transaction,
    /// which saves two round trips per message on the common path.
    async fn handle_in(
        &self,
        conn: &mut PgConnection,
        message: &jetstream::Message,
    ) -> Result<Handled, sqlx::Error> {
        let mut read = match self.read(message) {
            Ok(read) => read,
            Err(park) => {
                let reply = self.park_unread(conn, message, park).await?;
                return Ok(Handled::Reply(reply));
            }
        };
        let subject = message.subject.as_str();
        let Some(failed) = self
            .db(store::insert_new_taking_attempts(
                conn,
                &self.config.name,
                &read.id,
                subject,
                read.seq,
            ))
            .await?
        else {
            metrics::counter!(m::DUPLICATES, "consumer" => self.config.name.clone()).increment(1);
            return Ok(Handled::Reply(Reply::Ack));
        };
        let attempt = failed.saturating_add(1);
        read.delivery.attempt = attempt;
        let ran = Ran {
            id: read.id,
            attempt,
        };
        Ok(match self.run_handler(conn, &read.delivery).await {
            Ok(()) => Handled::Ran(ran),
            Err(error) => Handled::Failed { error, ran },
        })
    }

    /// Handles one message in a savepoint of `conn` (the batch's transaction): inserts its
    /// inbox row, runs the handler, and resolves a failure here (the savepoint rolled back,
    /// the attempt counted and the message NAKed, or parked, through `conn`). Returns the
    /// reply and whether the handler's effects are in (to count once the batch commits).
    async fn handle_in_savepoint(
        &self,
        conn: &mut PgConnection,
        message: &jetstream::Message,
    ) -> Result<(Reply, bool), sqlx::Error> {
        let mut read = match self.read(message) {
            Ok(read) => read,
            Err(park) => {
                let reply = self.park_unread(conn, message, park).await?;
                return Ok((reply, false));
            }
        };
        let subject = message.subject.as_str();
        let mut sp = self.db(conn.begin()).await?;
        let Some(failed) = self
            .db(store::insert_new_taking_attempts(
                &mut sp,
                &self.config.name,
                &read.id,
                subject,
                read.seq,
            ))
            .await?
        else {
            self.db(sp.commit()).await?;
            metrics::counter!(m::DUPLICATES, "consumer" => self.config.name.clone()).increment(1);
            return Ok((Reply::Ack, false));
        };
        let attempt = failed.saturating_add(1);
        read.delivery.attempt = attempt;
        let error = match self.run_handler(&mut sp, &read.delivery).await {
            Ok(()) => match self.db(sp.commit()).await {
                Ok(()) => return Ok((Reply::Ack, true)),
                // Rolled back to the savepoint before the next statement (see
                // `release_failed`).
                Err(e) => self.aborted(release_failed(e)?, &read.id),
            },
            Err(error) => {
                self.settle_after(&mut sp, &error).await;
                self.db(sp.rollback()).await?;
                error
            }
        };
        let ran = Ran {
            id: read.id,
            attempt,
        };
        let reply = self.resolve_failure(conn, message, error, &ran).await?;
        Ok((reply, false))
    }

    /// Handles one message in a transaction of its own (strict mode; batched mode after a
    /// batch's COMMIT was refused): inserts its inbox row, runs the handler, commits. A
    /// handler failure is resolved in a new short transaction (the attempt counted and the
    /// message NAKed, or parked); so is a COMMIT the database refuses ([`Failure::Commit`]),
    /// which is a failed attempt like any other, parked with reason `commit_failed` once the
    /// attempts are used up, and a transaction the handler left aborted
    /// ([`check_not_aborted`], one round trip before COMMIT; [`Failure::Aborted`], parked
    /// with reason `aborted_transaction`). Other database errors are returned.
    async fn handle_alone(
        &self,
        conn: &mut PgConnection,
        message: &jetstream::Message,
    ) -> Result<Reply, sqlx::Error> {
        let mut tx = self.db(conn.begin()).await?;
        let (error, ran) = match self.handle_in(&mut tx, message).await? {
            Handled::Reply(reply) => {
                self.db(tx.commit()).await?;
                return Ok(reply);
            }
            Handled::Ran(ran) => match self.db(check_not_aborted(&mut tx)).await? {
                Err(aborted) => {
                    self.db(tx.rollback()).await?;
                    (self.aborted(aborted, &ran.id), ran)
                }
                Ok(()) => match commit(tx, self.config.db_timeout).await {
                    Ok(()) => {
                        self.count_processed(1);
                        return Ok(Reply::Ack);
                    }
                    Err(Fault::Database(e)) => return Err(e),
                    Err(Fault::Commit(e)) => {
                        self.count_commit_failure();
                        tracing::warn!(consumer = %self.config.name, id = %ran.id, attempt = ran.attempt, error = %e, "the database refused the message's COMMIT");
                        (Failure::Commit(e), ran)
                    }
                },
            },
            Handled::Failed { error, ran } => {
                // Undo the handler's writes and the inbox row, then retry or park.
                self.settle_after(&mut tx, &error).await;
                self.db(tx.rollback()).await?;
                (error, ran)
            }
        };
        let mut tx = self.db(conn.begin()).await?;
        let reply = self.resolve_failure(&mut tx, message, error, &ran).await?;
        self.db(tx.commit()).await?;
        Ok(reply)
    }

    /// Handles a batch in one transaction with a savepoint per message, so that a failing
    /// handler is resolved alone and the others commit.
    async fn with_savepoints(
        &self,
        conn: &mut PgConnection,
        batch: &[jetstream::Message],
    ) -> Result<Vec<Reply>, Fault> {
        let mut tx = self.db(conn.begin()).await?;
        let mut replies = Vec::with_capacity(batch.len());
        let mut processed = 0;
        for message in batch {
            let (reply, ran) = self.handle_in_savepoint(&mut tx, message).await?;
            processed += u64::from(ran);
            replies.push(reply);
        }
        commit(tx, self.config.db_timeout).await?;
        self.count_processed(processed);
        Ok(replies)
    }

    /// The batched fast path: one statement inserts every inbox row, then the handlers run
    /// one after the other in the same transaction without savepoints (or the batch handler
    /// runs once for all new messages), and it commits: two round trips per message fewer
    /// than a savepoint each. Returns `None`, having rolled everything back, when a message
    /// does not decode or a handler fails; the caller then runs the batch again with
    /// savepoints, which isolates the failure (the failed run here does not count as an
    /// attempt: the rerun's does). Handlers may thus run twice for one delivery, but only
    /// the second run can commit (the handler contract allows this: the first transaction
    /// did not commit). A handler that left the transaction aborted (it ignored a failed
    /// statement) is caught before COMMIT by [`check_not_aborted`] (one round trip per
    /// batch) and treated the same way. A refused COMMIT is returned as [`Fault::Commit`].
    async fn try_batch_without_savepoints(
        &self,
        conn: &mut PgConnection,
        batch: &[jetstream::Message],
    ) -> Result<Option<Vec<Reply>>, Fault> {
        let mut reads = Vec::with_capacity(batch.len());
        for message in batch {
            let Ok(read) = self.read(message) else {
                return Ok(None);
            };
            reads.push(read);
        }
        let ids: Vec<String> = reads.iter().map(|r| r.id.clone()).collect();
        let subjects: Vec<String> = batch.iter().map(|m| m.subject.to_string()).collect();
        let seqs: Vec<Option<i64>> = reads.iter().map(|r| r.seq).collect();
        let mut tx = self.db(conn.begin()).await?;
        // New rows, with the failed attempts counted for them, in one statement.
        let mut new: HashMap<String, u32> = self
            .db(store::insert_many_new_taking_attempts(
                &mut tx,
                &self.config.name,
                &ids,
                &subjects,
                &seqs,
            ))
            .await?
            .into_iter()
            .collect();
        let mut fresh = Vec::with_capacity(new.len());
        let mut duplicates = 0;
        for read in reads {
            // Taking the id out makes a second copy in the same batch a duplicate.
            if let Some(failed) = new.remove(&read.id) {
                let mut delivery = read.delivery;
                delivery.attempt = failed.saturating_add(1);
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
        let result = match result {
            Ok(()) if handled > 0 => self.db(check_not_aborted(&mut tx)).await?,
            other => other,
        };
        if let Err(error) = result {
            // Not an attempt: the rerun with savepoints pins it on its message.
            tracing::debug!(consumer = %self.config.name, error = %error, "a handler failed in a batch; running it again with a savepoint per message");
            self.settle_after(&mut tx, &error).await;
            self.db(tx.rollback()).await?;
            return Ok(None);
        }
        commit(tx, self.config.db_timeout).await?;
        self.count_processed(handled);
        metrics::counter!(m::DUPLICATES, "consumer" => self.config.name.clone())
            .increment(duplicates);
        Ok(Some(vec![Reply::Ack; batch.len()]))
    }

    /// Runs a handler call, catching a panic so that the caller can roll its transaction
    /// (or savepoint) back as for any failure; a transaction the handler opened itself and
    /// left behind is rolled back by the connection before its next statement (sqlx queues
    /// that rollback on drop). A panic is logged, counted in [`m::HANDLER_PANICS`] and
    /// returned as [`Failure::Panicked`].
    ///
    /// The call is given `handler_timeout`: past it, the future is dropped (the handler stops
    /// at its current await point), counted in [`m::HANDLER_TIMEOUTS`] and returned as
    /// [`Failure::TimedOut`], for the caller to roll back.
    async fn catching<F>(&self, call: F) -> Result<(), Failure>
    where
        F: Future<Output = Result<(), HandlerError>>,
    {
        let limit = self.config.handler_timeout;
        let Ok(caught) = tokio::time::timeout(limit, AssertUnwindSafe(call).catch_unwind()).await
        else {
            metrics::counter!(m::HANDLER_TIMEOUTS, "consumer" => self.config.name.clone())
                .increment(1);
            tracing::error!(consumer = %self.config.name, handler_timeout = ?limit, "handler timed out; its transaction is rolled back and the message will be retried");
            self.cancel_lane_statement().await;
            return Err(Failure::TimedOut(limit));
        };
        match caught {
            Ok(result) => result.map_err(Failure::Returned),
            Err(payload) => {
                let message = panic_message(payload.as_ref());
                metrics::counter!(m::HANDLER_PANICS, "consumer" => self.config.name.clone())
                    .increment(1);
                tracing::error!(consumer = %self.config.name, panic = %message, "handler panicked; its transaction is rolled back and the message will be retried");
                Err(Failure::Panicked(message))
            }
        }
    }

    /// Before rolling back after `failure`: if the handler was dropped at `handler_timeout`
    /// and its statement cancelled ([`Consumer::cancel_lane_statement`]), reads that
    /// statement's end off the connection (its `query_canceled` error, which sqlx would
    /// otherwise return from the rollback).
    async fn settle_after(&self, conn: &mut PgConnection, failure: &Failure) {
        if !matches!(failure, Failure::TimedOut(_)) {
            return;
        }
        for _ in 0..2 {
            if self.db(sqlx::Connection::ping(&mut *conn)).await.is_ok() {
                return;
            }
        }
    }

    /// After a handler was dropped at `handler_timeout`: cancels the statement its lane's
    /// backend may still be running (a lock wait, a slow query), from another pool
    /// connection, so that the rollback that follows is not held up by it (past
    /// `db_timeout` it would count as a database failure, and the attempt as none). A no-op
    /// if the backend is idle in its transaction, or outside a lane (`dlq retry` runs).
    async fn cancel_lane_statement(&self) {
        let Ok(pid) = LANE_BACKEND.try_with(|pid| *pid) else {
            return;
        };
        let cancelled = self
            .db(async {
                let mut other = self.pool.acquire().await?;
                store::cancel_backend_statement(&mut other, pid).await
            })
            .await;
        if let Err(e) = cancelled {
            tracing::warn!(consumer = %self.config.name, error = %e, "cannot cancel the statement of a handler that timed out; the rollback waits for it");
        }
    }

    /// Runs the handler in its span, catching a panic (see [`Consumer::catching`]) and
    /// recording its latency (and, for the caller's transaction, nothing else: the caller
    /// counts what commits).
    async fn run_handler(
        &self,
        conn: &mut PgConnection,
        delivery: &Delivery,
    ) -> Result<(), Failure> {
        let span = handler_span(&self.config.name, delivery);
        let started = Instant::now();
        let result = self
            .catching(tracing::Instrument::instrument(
                self.handler.handle(conn, delivery),
                span,
            ))
            .await;
        metrics::histogram!(m::HANDLER_LATENCY, "consumer" => self.config.name.clone())
            .record(started.elapsed().as_secs_f64());
        result
    }

    /// Runs the batch handler once for `deliveries`, catching a panic (see
    /// [`Consumer::catching`]) and recording its latency and size as one sample each. A
    /// batch of one runs in the message's handler span (which continues the producer's
    /// trace); a larger batch has many producers, so it runs in an `inbox.handle_batch` span
    /// of its own that continues none of them.
    async fn run_batch_handler(
        &self,
        conn: &mut PgConnection,
        handler: &dyn RawBatchHandler,
        deliveries: &[Delivery],
    ) -> Result<(), Failure> {
        let span = match deliveries {
            [one] => handler_span(&self.config.name, one),
            _ => tracing::info_span!(
                "inbox.handle_batch",
                consumer = %self.config.name,
                messages = deliveries.len(),
            ),
        };
        let started = Instant::now();
        let result = self
            .catching(tracing::Instrument::instrument(
                handler.handle_batch(conn, deliveries),
                span,
            ))
            .await;
        let consumer = self.config.name.clone();
        metrics::histogram!(m::BATCH_HANDLER_LATENCY, "consumer" => consumer.clone())
            .record(started.elapsed().as_secs_f64());
        metrics::histogram!(m::BATCH_MESSAGES, "consumer" => consumer)
            .record(deliveries.len() as f64);
        result
    }

    fn count_processed(&self, n: u64) {
        metrics::counter!(m::PROCESSED, "consumer" => self.config.name.clone()).increment(n);
    }

    /// Counts and logs a handler that left its transaction aborted; returns the failure.
    fn aborted(&self, failure: Failure, id: &str) -> Failure {
        metrics::counter!(m::ABORTED_TRANSACTIONS, "consumer" => self.config.name.clone())
            .increment(1);
        tracing::error!(consumer = %self.config.name, %id, error = %failure, "the handler returned Ok but left its transaction aborted; rolled back, counted as a failed attempt");
        failure
    }

    fn count_commit_failure(&self) {
        metrics::counter!(m::COMMIT_FAILURES, "consumer" => self.config.name.clone()).increment(1);
    }

    /// After a failed handler attempt whose effects were rolled back: count the attempt in
    /// `inbox_attempt` and NAK for a retry, or park the message (forgetting its attempts)
    /// and terminate it, through `conn`.
    async fn resolve_failure(
        &self,
        conn: &mut PgConnection,
        message: &jetstream::Message,
        error: Failure,
        ran: &Ran,
    ) -> Result<Reply, sqlx::Error> {
        let (id, attempt) = (ran.id.as_str(), ran.attempt);
        match self.disposition(&error, attempt) {
            Ok(reply) => {
                tracing::debug!(consumer = %self.config.name, %id, attempt, error = %error, "handler attempt failed; retrying");
                self.db(store::count_failed_attempt(conn, &self.config.name, id))
                    .await?;
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
    /// and returns `Term` (or `Ack` if the message turned out to be resolved already). If the database refuses the dead letter, the savepoint is rolled
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
        let mut savepoint = self.db(conn.begin()).await?;
        let reason = park.reason.clone();
        match self
            .db(self.park_in(&mut savepoint, message, id, attempt, stream_seq, park))
            .await
        {
            Ok(true) => {
                self.db(savepoint.commit()).await?;
                Ok(Reply::Term)
            }
            Ok(false) => {
                self.db(savepoint.commit()).await?;
                Ok(Reply::Ack)
            }
            // No answer: the connection is closed, as for any database failure.
            Err(e) if is_timeout(&e) => Err(e),
            Err(e) => {
                self.db(savepoint.rollback()).await?;
                tracing::error!(consumer = %self.config.name, subject = %message.subject, %reason, error = %e, "cannot write the dead letter; the message will be redelivered");
                metrics::counter!(m::DEAD_LETTER_WRITE_FAILURES, "consumer" => self.config.name.clone())
                    .increment(1);
                Ok(Reply::Nak(self.config.retry_max_delay))
            }
        }
    }

    /// Writes an inbox row marking the message resolved, so that redeliveries are
    /// acknowledged without running the handler, then the dead letter, and forgets its
    /// attempts; returns true. The inbox row comes first: if one exists (or is being
    /// written: the insert waits for that transaction), the message was processed or parked
    /// meanwhile, e.g. by another instance that got it redelivered while this one's handler
    /// ran past `ack_wait` and failed; then no dead letter is written (a `dlq retry` of it
    /// would apply the message a second time) and false is returned, for an ack.
    async fn park_in(
        &self,
        conn: &mut PgConnection,
        message: &jetstream::Message,
        id: Option<&str>,
        attempt: u32,
        stream_seq: Option<u64>,
        park: Park,
    ) -> Result<bool, sqlx::Error> {
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
        if !store::insert_if_new(
            conn,
            &self.config.name,
            &message_id,
            message.subject.as_str(),
            seq,
            store::Outcome::DeadLettered,
        )
        .await?
        {
            tracing::info!(consumer = %self.config.name, id = %message_id, reason = %park.reason, "not dead-lettering a message that was resolved meanwhile (processed or parked, e.g. by another instance)");
            metrics::counter!(m::DUPLICATES, "consumer" => self.config.name.clone()).increment(1);
            return Ok(false);
        }
        dlq::store::record(conn, &letter).await?;
        if id.is_some() {
            store::forget_attempts(conn, &self.config.name, &message_id).await?;
        }
        metrics::counter!(m::DEAD_LETTERED, "consumer" => self.config.name.clone(), "reason" => park.reason).increment(1);
        Ok(true)
    }
}

/// Messages asked for per pull request: at least 128, since a pull is a round trip to the
/// server and small ones (strict mode has batches of one) left lanes waiting for messages.
fn pull_size(config: &ConsumerConfig) -> usize {
    let batch = match config.mode {
        Mode::Strict => 1,
        Mode::Batched { max_messages } => max_messages,
    };
    (config.concurrency * batch * 2).max(128)
}

/// Why an existing durable's redelivery settings are refused (see [`Consumer::ensure`]), or
/// `None` if they are the ones the inbox requires.
fn redelivery_mismatch(
    config: &ConsumerConfig,
    have: &async_nats::jetstream::consumer::Config,
    ack_floor: u64,
) -> Option<String> {
    let mut problems = Vec::new();
    let mut flags = Vec::new();
    // The server reports an unlimited max_deliver as -1 (0 when set by an old client).
    if have.max_deliver > 0 {
        problems.push(format!(
            "max_deliver is {} but must be -1 (unlimited): the inbox dead-letters a failing message itself after max_attempts ({}), and a broker that stops redelivering first (NAKs for shutdown and database failures count too) drops the message without a dead letter",
            have.max_deliver, config.max_attempts
        ));
        flags.push("--max-deliver=-1".to_owned());
    }
    if !have.backoff.is_empty() {
        problems.push(format!(
            "backoff is {:?} but must be empty: a broker-side backoff replaces ack_wait as the wait before redelivering an unacknowledged message (and delays the immediate redelivery asked for at shutdown), so the redelivery horizon inbox_retention was validated against no longer holds",
            have.backoff
        ));
        flags.push("--backoff=none".to_owned());
    }
    if have.ack_wait != config.ack_wait {
        problems.push(format!(
            "ack_wait is {:?} but must be {:?}, the configured ack_wait: a shorter one redelivers messages whose handler is still running, a longer one delays redeliveries beyond the horizon inbox_retention was validated against",
            have.ack_wait, config.ack_wait
        ));
        flags.push(format!("--wait={:?}", config.ack_wait));
    }
    // Settings `nats consumer edit` cannot undo: the durable must be recreated.
    let mut recreate = Vec::new();
    if have.headers_only {
        recreate.push("headers_only is set: the broker would deliver no payloads, and every message would be parked as undecodable without its bytes".to_owned());
    }
    if !have.inactive_threshold.is_zero() {
        recreate.push(format!(
            "inactive_threshold is {:?} but must be 0: the broker deletes the durable after a quiet spell, and a new one starts again from the stream's first message, running handlers again for messages whose inbox rows were cleaned",
            have.inactive_threshold
        ));
    }
    if problems.is_empty() && recreate.is_empty() {
        return None;
    }
    let all: Vec<String> = problems.iter().chain(&recreate).cloned().collect();
    let mut reason = format!(
        "exists with settings that let the broker give up on, drop or redeliver messages behind the inbox's back: {}. An existing consumer is not changed; ",
        all.join("; ")
    );
    if recreate.is_empty() {
        reason.push_str(&format!(
            "fix it with `nats consumer edit {} {} {}`",
            config.stream,
            config.name,
            flags.join(" ")
        ));
    } else {
        reason.push_str(&format!(
            "recreate it where it stands: `nats consumer rm {stream} {name}`, then `nats consumer add {stream} {name} --pull --deliver {next} --ack explicit --wait {wait:?} --max-deliver=-1` with its filter subjects, so that it resumes after its ack floor (stream sequence {floor}); one created by the consumer itself would start again from the stream's first message, and run handlers again for messages older than inbox_retention",
            stream = config.stream,
            name = config.name,
            next = ack_floor + 1,
            floor = ack_floor,
            wait = config.ack_wait,
        ));
    }
    if have.ack_wait != config.ack_wait {
        reason.push_str(&format!(
            " (or configure ack_wait = {:?} if the consumer's value is the intended one)",
            have.ack_wait
        ));
    }
    Some(reason)
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

/// The tasks of a running consumer, by name, so that one that ends can be named.
#[derive(Default)]
struct Supervised {
    tasks: JoinSet<()>,
    names: HashMap<tokio::task::Id, String>,
}

/// A task that ended: its name, and `Err` with why if it did not return normally.
struct Ended {
    name: String,
    result: Result<(), String>,
}

impl Supervised {
    fn spawn(&mut self, name: String, task: impl Future<Output = ()> + Send + 'static) {
        let handle = self.tasks.spawn(task);
        self.names.insert(handle.id(), name);
    }

    /// The next task to end, or `None` when none is left. Cancel-safe.
    async fn next(&mut self) -> Option<Ended> {
        let (id, result) = match self.tasks.join_next_with_id().await? {
            Ok((id, ())) => (id, Ok(())),
            Err(e) if e.is_panic() => (
                e.id(),
                Err(format!(
                    "panicked: {}",
                    panic_message(e.into_panic().as_ref())
                )),
            ),
            Err(e) => (e.id(), Err("was cancelled".to_owned())),
        };
        let name = self
            .names
            .remove(&id)
            .unwrap_or_else(|| format!("task {id}"));
        Some(Ended { name, result })
    }
}

impl Ended {
    /// Why it ended, for a task that ended before shutdown was asked (always a failure).
    fn before_shutdown(self) -> String {
        match self.result {
            Ok(()) => format!("{} ended before shutdown", self.name),
            Err(why) => format!("{} {why}", self.name),
        }
    }

    /// Why it failed, for a task that ended after it was told to stop (`None` if it
    /// returned normally).
    fn failure(self) -> Option<String> {
        self.result.err().map(|why| format!("{} {why}", self.name))
    }
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

/// A message on its way to its lane's handler, with when the broker last heard of it: its
/// delivery to this process (when the reader took it) or its latest progress ack.
struct Queued {
    message: jetstream::Message,
    touched: Instant,
}

/// One lane: handles its messages in order, one transaction per message or per batch, on a
/// connection it keeps between batches (saving the pool's checkout and liveness check per
/// transaction) and gives back after a database error.
///
/// While a batch is handled the lane keeps taking messages from its channel into its own
/// queue (up to [`Consumer::max_ack_pending`]), and every [`Consumer::progress_period`] it
/// sends a progress ack for each message of the batch and of the queue not heard of for half
/// that period, so that `ack_wait` does not run out behind a slow handler. Progress acks are
/// only sent while the batch's transaction is in progress, and the replies (ack, NAK, term)
/// after it, by this task alone: unsent progress acks are dropped before the replies go, so
/// a progress ack never follows a message's NAK (which would replace the NAK's delay by
/// `ack_wait`). Progress acks are never awaited in place of the handler (see
/// [`keep_alive`]), and the replies wait at most [`REPLY_TIMEOUT`] for the NATS client, so
/// that a NATS outage does not hold a transaction open or stop shutdown. A handler past
/// `handler_timeout` is dropped, which ends the progress acks of its message.
async fn lane(consumer: Arc<Consumer>, mut rx: mpsc::Receiver<Queued>, stop: CancellationToken) {
    let max = consumer.batch_size();
    let hold = consumer.max_ack_pending();
    let period = consumer.progress_period();
    let mut keepalive = tokio::time::interval(period);
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut conn: Option<LaneConnection> = None;
    let mut queue: VecDeque<Queued> = VecDeque::new();
    let mut open = true;
    loop {
        if queue.is_empty() {
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                next = rx.recv() => match next {
                    Some(queued) => queue.push_back(queued),
                    None => break,
                },
            }
        } else if stop.is_cancelled() {
            break;
        }
        while queue.len() < max {
            match rx.try_recv() {
                Ok(queued) => queue.push_back(queued),
                Err(_) => break,
            }
        }
        let (batch, mut touched): (Vec<jetstream::Message>, Vec<Instant>) = queue
            .drain(..queue.len().min(max))
            .map(|q| (q.message, q.touched))
            .unzip();
        let replies = {
            let work = handle_batch(&consumer, &mut conn, &batch);
            tokio::pin!(work);
            // The progress acks being sent, polled next to the handler's work (never
            // awaited in its stead) and bounded by `period`.
            let mut progress: Option<futures::future::BoxFuture<'static, ()>> = None;
            loop {
                tokio::select! {
                    replies = &mut work => break replies,
                    () = async { progress.as_mut().expect("guarded").await }, if progress.is_some() => {
                        progress = None;
                    }
                    next = rx.recv(), if open && queue.len() < hold => match next {
                        Some(queued) => queue.push_back(queued),
                        None => open = false,
                    },
                    _ = keepalive.tick() => {
                        if progress.is_some() {
                            // The previous ones are still waiting for the client: skip.
                            continue;
                        }
                        let Some(due) = Instant::now().checked_sub(period / 2) else {
                            continue;
                        };
                        let held = batch
                            .iter()
                            .zip(touched.iter_mut())
                            .chain(queue.iter_mut().map(|q| (&q.message, &mut q.touched)));
                        progress = keep_alive(&consumer, held, due, period);
                    }
                }
            }
            // Dropping unsent progress acks here keeps them from following the replies.
        };
        send_replies(
            &consumer,
            batch.iter().zip(replies.into_iter().map(Reply::kind)),
        )
        .await;
    }
    // Pulled but not started: hand back for immediate redelivery (not a handler attempt).
    rx.close();
    let mut rest: Vec<jetstream::Message> = queue.into_iter().map(|q| q.message).collect();
    while let Some(queued) = rx.recv().await {
        rest.push(queued.message);
    }
    send_replies(
        &consumer,
        rest.iter().map(|message| (message, AckKind::Nak(None))),
    )
    .await;
}

/// The longest a lane waits for the NATS client to take the replies of one batch (or the
/// NAKs at shutdown). The client's command channel is full only while it cannot write to the
/// server (during a reconnect it does not read the channel at all); past this the rest are
/// dropped: a lost ack means a redelivery that the inbox row turns into a skip, a lost NAK
/// or term a redelivery after `ack_wait`. Without the bound a NATS outage would hold the
/// lane, and shutdown, until the server is back.
const REPLY_TIMEOUT: Duration = Duration::from_secs(2);

/// Sends `replies`, within [`REPLY_TIMEOUT`] for all of them.
async fn send_replies<'a>(
    consumer: &Consumer,
    replies: impl Iterator<Item = (&'a jetstream::Message, AckKind)>,
) {
    let name = &consumer.config.name;
    let sent = tokio::time::timeout(REPLY_TIMEOUT, async {
        for (message, kind) in replies {
            if let Err(e) = message.ack_with(kind).await {
                // Committed effects with a lost ack mean a redelivery that the inbox row
                // turns into a skip; a lost NAK means a redelivery after ack_wait.
                tracing::warn!(consumer = %name, error = %e, "ack failed; the message will be redelivered");
            }
        }
    })
    .await;
    if sent.is_err() {
        tracing::warn!(consumer = %name, timeout = ?REPLY_TIMEOUT, "the NATS client did not take the acks in time (disconnected?); the messages will be redelivered");
    }
}

/// Progress acks (`AckKind::Progress`, which restarts the broker's `ack_wait`) for each
/// held message last heard of at or before `due`, as a future for the lane to poll next to
/// its handler, bounded by `within`; `None` if there are none to send or the client is not
/// connected. The lane never waits for it: while async-nats reconnects it stops reading its
/// command channel, so an awaited send could block for the whole outage with the handler's
/// transaction open (holding its locks). Acks that do not leave in time are dropped and the
/// messages marked heard of all the same (the next ones go a period later); if NATS stays
/// away longer than `ack_wait` the broker redelivers them, which the inbox tolerates.
fn keep_alive<'a>(
    consumer: &Consumer,
    held: impl Iterator<Item = (&'a jetstream::Message, &'a mut Instant)>,
    due: Instant,
    within: Duration,
) -> Option<futures::future::BoxFuture<'static, ()>> {
    let client = consumer.jetstream.client();
    if client.connection_state() != async_nats::connection::State::Connected {
        return None;
    }
    let now = Instant::now();
    let mut subjects = Vec::new();
    for (message, touched) in held {
        if *touched > due {
            continue;
        }
        if let Some(reply) = &message.reply {
            subjects.push(reply.clone());
        }
        *touched = now;
    }
    if subjects.is_empty() {
        return None;
    }
    let name = consumer.config.name.clone();
    Some(Box::pin(async move {
        let sent = tokio::time::timeout(within, async {
            for subject in subjects {
                if let Err(e) = client.publish(subject, AckKind::Progress.into()).await {
                    tracing::debug!(consumer = %name, error = %e, "progress ack failed");
                }
            }
        })
        .await;
        if sent.is_err() {
            tracing::debug!(consumer = %name, "progress acks not sent in time; dropped");
        }
    }))
}

/// Handles messages in one transaction and returns the replies to send once it is over.
/// Strict mode runs each message alone ([`Consumer::handle_alone`]). Batched mode first
/// tries the fast path ([`Consumer::try_batch_without_savepoints`]); when a handler fails
/// there, the batch is rolled back and run again with a savepoint per message. When the
/// database refuses the batch's COMMIT (a deferred constraint, a serialization failure),
/// the batch is run again one message at a time, each in its own transaction, so that the
/// others commit and only the message whose commit fails is retried (and parked with reason
/// `commit_failed` after `max_attempts`). If the database fails otherwise, nothing is acked
/// and no attempt is counted: the messages are NAKed with a delay that grows with their
/// delivery count (from `retry_min_delay` to `retry_max_delay`).
async fn handle_batch(
    consumer: &Consumer,
    held: &mut Option<LaneConnection>,
    batch: &[jetstream::Message],
) -> Vec<Reply> {
    let outcome = async {
        let lane = match held {
            Some(lane) => lane,
            None => {
                let mut conn = consumer.db(consumer.pool.acquire()).await?;
                let backend_pid = consumer.db(store::backend_pid(&mut conn)).await?;
                held.insert(LaneConnection { conn, backend_pid })
            }
        };
        LANE_BACKEND
            .scope(lane.backend_pid, handle_on(consumer, &mut lane.conn, batch))
            .await
    }
    .await;
    match outcome {
        Ok(replies) => {
            consumer.health.set_database(true);
            replies
        }
        Err(e) => {
            consumer.health.set_database(false);
            // The connection may be broken (or silent: a release to the pool would ping it
            // and wait): close it, and take a fresh one for the next batch.
            if let Some(mut lane) = held.take() {
                lane.conn.close_on_drop();
            }
            // Backed off with each message's delivery count, so that an outage redelivers
            // ever more slowly instead of every retry_min_delay.
            let delays: Vec<Duration> = batch
                .iter()
                .map(|message| {
                    let delivered = message.info().map_or(1, |i| i.delivered);
                    consumer.backoff(u32::try_from(delivered).unwrap_or(u32::MAX))
                })
                .collect();
            tracing::warn!(consumer = %consumer.config.name, error = %e, first_retry_in = ?delays.first(), "database failed; messages will be redelivered");
            delays.into_iter().map(Reply::Nak).collect()
        }
    }
}

/// [`handle_batch`]'s work on the lane's connection.
async fn handle_on(
    consumer: &Consumer,
    conn: &mut PgConnection,
    batch: &[jetstream::Message],
) -> Result<Vec<Reply>, sqlx::Error> {
    let together = if consumer.config.mode == Mode::Strict {
        // Batches of one: nothing to pin a refused COMMIT on but the message itself.
        Err(None)
    } else {
        match consumer.try_batch_without_savepoints(conn, batch).await {
            Ok(Some(replies)) => Ok(replies),
            Ok(None) => consumer.with_savepoints(conn, batch).await.map_err(Some),
            Err(fault) => Err(Some(fault)),
        }
    };
    match together {
        Ok(replies) => Ok(replies),
        Err(Some(Fault::Database(e))) => Err(e),
        Err(refused) => {
            if let Some(Fault::Commit(e)) = refused {
                consumer.count_commit_failure();
                tracing::warn!(consumer = %consumer.config.name, messages = batch.len(), error = %e, "the database refused the batch's COMMIT; running its messages one at a time");
            }
            let mut replies = Vec::with_capacity(batch.len());
            for message in batch {
                replies.push(consumer.handle_alone(conn, message).await?);
            }
            Ok(replies)
        }
    }
}

/// A lane's pool connection and the pid of its server backend (to cancel a handler's
/// statement that outlives `handler_timeout`, see [`Consumer::catching`]).
struct LaneConnection {
    conn: PoolConnection<Postgres>,
    backend_pid: i32,
}

tokio::task_local! {
    /// The backend pid of the lane connection the current handler runs on.
    static LANE_BACKEND: i32;
}

/// Deletes inbox rows past the retention, and attempt rows not updated for as long, every
/// `cleaner_interval`.
async fn cleaner(consumer: Arc<Consumer>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(consumer.config.cleaner_interval);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let work = async {
            let mut conn = ClosedUnlessReleased::acquire(&consumer).await?;
            loop {
                let n = store::delete_older_than(
                    &mut conn,
                    &consumer.config.name,
                    consumer.config.inbox_retention,
                    10_000,
                )
                .await?;
                if n < 10_000 {
                    break;
                }
            }
            store::delete_attempts_older_than(
                &mut conn,
                &consumer.config.name,
                consumer.config.inbox_retention,
            )
            .await?;
            conn.release();
            Ok::<_, sqlx::Error>(())
        };
        // Stopped with the consumer even mid-delete (each delete is a statement of its own).
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            result = work => result,
        };
        if let Err(e) = result {
            tracing::warn!(consumer = %consumer.config.name, error = %e, "inbox cleaner failed");
        }
    }
}

/// Runs `dlq retry` requests for this consumer: each re-runs the handler from the parked
/// bytes in one transaction with the dead letter's new status, so it takes effect once; it
/// does not go through the broker, so no other consumer sees the message again. A handler
/// that panics here is caught like in a lane: the retry is recorded as failed with reason
/// `panic`, and the other requests still run.
async fn dlq_retries(consumer: Arc<Consumer>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(consumer.config.retry_poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        // Stopped with the consumer even mid-retry: its transaction then rolls back and the
        // request stays for the next start.
        let ran = tokio::select! {
            _ = stop.cancelled() => return,
            ran = run_retry_requests(&consumer) => ran,
        };
        if let Err(e) = ran {
            if database_unreachable(&e) {
                consumer.health.set_database(false);
            }
            tracing::warn!(consumer = %consumer.config.name, error = %e, "running dlq retries failed");
        }
    }
}

/// Runs up to 16 retry requests in one transaction, each letter's handler in a savepoint.
/// If the database refuses that transaction's COMMIT, the letters are run again one at a
/// time ([`retry_alone`]), so that the others go through and only the one whose commit fails
/// is recorded as failed (reason `commit_failed`).
async fn run_retry_requests(consumer: &Consumer) -> Result<(), sqlx::Error> {
    let mut conn = ClosedUnlessReleased::acquire(consumer).await?;
    let mut tx = consumer.db(conn.begin()).await?;
    let letters = consumer
        .db(dlq::store::take_retry_requests(
            &mut tx,
            &consumer.config.name,
            16,
        ))
        .await?;
    if letters.is_empty() {
        consumer.db(tx.commit()).await?;
        conn.release();
        // The poll doubles as the database probe of an idle consumer's readiness.
        consumer.health.set_database(true);
        return Ok(());
    }
    let backend_pid = consumer.db(store::backend_pid(&mut tx)).await?;
    let mut results = Vec::with_capacity(letters.len());
    for letter in &letters {
        let retried = LANE_BACKEND.scope(backend_pid, retry_letter(consumer, &mut tx, letter));
        results.push(retried.await?);
    }
    let committed = commit(tx, consumer.config.db_timeout).await;
    if !matches!(committed, Err(Fault::Database(_))) {
        conn.release();
    }
    match committed {
        Ok(()) => {
            for (letter, result) in letters.iter().zip(&results) {
                report_retry(consumer, letter, result);
            }
            Ok(())
        }
        Err(Fault::Database(e)) => Err(e),
        Err(Fault::Commit(e)) => {
            consumer.count_commit_failure();
            tracing::warn!(consumer = %consumer.config.name, letters = letters.len(), error = %e, "the database refused the COMMIT of a group of dlq retries; retrying them one at a time");
            for letter in &letters {
                retry_alone(consumer, letter).await?;
            }
            Ok(())
        }
    }
}

/// Runs one retry request in a transaction of its own, if it is still requested. A COMMIT
/// the database refuses is recorded as the retry's failure (reason `commit_failed`), in a
/// new transaction.
async fn retry_alone(consumer: &Consumer, letter: &dlq::store::Stored) -> Result<(), sqlx::Error> {
    let mut conn = ClosedUnlessReleased::acquire(consumer).await?;
    let mut tx = consumer.db(conn.begin()).await?;
    if !consumer
        .db(store::lock_retry_request(&mut tx, letter.id))
        .await?
    {
        consumer.db(tx.commit()).await?;
        conn.release();
        return Ok(());
    }
    let backend_pid = consumer.db(store::backend_pid(&mut tx)).await?;
    let result = LANE_BACKEND
        .scope(backend_pid, retry_letter(consumer, &mut tx, letter))
        .await?;
    let result = match commit(tx, consumer.config.db_timeout).await {
        Ok(()) => result,
        Err(Fault::Database(e)) => return Err(e),
        Err(Fault::Commit(e)) => {
            consumer.count_commit_failure();
            let failure = Err(Failure::Commit(e));
            let mut tx = consumer.db(conn.begin()).await?;
            if !consumer
                .db(store::lock_retry_request(&mut tx, letter.id))
                .await?
            {
                consumer.db(tx.commit()).await?;
                conn.release();
                return Ok(());
            }
            consumer
                .db(record_retry_failure(&mut tx, letter, &failure))
                .await?;
            consumer.db(tx.commit()).await?;
            failure
        }
    };
    conn.release();
    report_retry(consumer, letter, &result);
    Ok(())
}

/// Re-runs one parked message's handler from its bytes in a savepoint of `tx` and records
/// the outcome in `tx`: the letter retried and the message processed, or the letter dead
/// again with the new failure (a handler that left its savepoint aborted, which its
/// `RELEASE SAVEPOINT` tells, fails with reason `aborted_transaction`; one past
/// `handler_timeout` with `timeout`). Returns the outcome, to report once `tx` commits.
///
/// First it locks the message's inbox row ([`store::lock_outcome`]): if it says
/// `processed`, the handler's effects committed already (another instance processed the
/// message while this one parked it) and the letter is closed as retried without running
/// the handler.
async fn retry_letter(
    consumer: &Consumer,
    tx: &mut PgConnection,
    letter: &dlq::store::Stored,
) -> Result<Result<(), Failure>, sqlx::Error> {
    let outcome = consumer
        .db(store::lock_outcome(
            tx,
            &consumer.config.name,
            &letter.message_id,
            &letter.subject,
        ))
        .await?;
    if outcome == store::Outcome::Processed {
        // Processed meanwhile (by another instance, while this one parked it): running the
        // handler again would apply the message twice.
        consumer
            .db(store::mark_already_processed(tx, letter.id))
            .await?;
        tracing::info!(consumer = %consumer.config.name, dead_letter = letter.id, "dlq retry of a message processed already; the handler does not run again");
        return Ok(Ok(()));
    }
    let attempt = u32::try_from(letter.attempts)
        .unwrap_or(0)
        .saturating_add(1);
    let result = match letter.envelope() {
        Err(e) => Err(Failure::Returned(HandlerError::permanent_because(
            "decode", e,
        ))),
        Ok(envelope) => {
            let delivery = Delivery {
                envelope,
                consumer: Arc::from(consumer.config.name.as_str()),
                attempt,
                delivered: None,
                stream_seq: None,
            };
            let mut sp = consumer.db(tx.begin()).await?;
            let result = consumer
                .catching(consumer.handler.handle(&mut sp, &delivery))
                .await;
            match result {
                Ok(()) => match consumer.db(sp.commit()).await {
                    Ok(()) => Ok(()),
                    // Rolled back to the savepoint before the next statement.
                    Err(e) => Err(consumer.aborted(release_failed(e)?, &letter.message_id)),
                },
                Err(failure) => {
                    consumer.settle_after(&mut sp, &failure).await;
                    consumer.db(sp.rollback()).await?;
                    Err(failure)
                }
            }
        }
    };
    consumer
        .db(async {
            match &result {
                Ok(()) => {
                    dlq::store::mark_retried(tx, letter.id).await?;
                    store::mark_processed(tx, &consumer.config.name, &letter.message_id).await
                }
                Err(_) => record_retry_failure(tx, letter, &result).await,
            }
        })
        .await?;
    Ok(result)
}

/// A pool connection that is closed when dropped, instead of going back to the pool, unless
/// [`released`](ClosedUnlessReleased::release): after a step that failed, timed out or was
/// cancelled the connection may be silent, and the pool's ping on its return would wait for
/// it with no deadline, holding the pool slot.
struct ClosedUnlessReleased(Option<PoolConnection<Postgres>>);

impl ClosedUnlessReleased {
    async fn acquire(consumer: &Consumer) -> Result<Self, sqlx::Error> {
        Ok(ClosedUnlessReleased(Some(
            consumer.db(consumer.pool.acquire()).await?,
        )))
    }

    /// Returns the connection to the pool: its last step succeeded.
    fn release(mut self) {
        drop(self.0.take());
    }
}

impl std::ops::Deref for ClosedUnlessReleased {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        self.0.as_ref().expect("held until dropped")
    }
}

impl std::ops::DerefMut for ClosedUnlessReleased {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.0.as_mut().expect("held until dropped")
    }
}

impl Drop for ClosedUnlessReleased {
    fn drop(&mut self) {
        if let Some(mut conn) = self.0.take() {
            conn.close_on_drop();
        }
    }
}

/// Parks a retried letter again with its new failure (one more attempt, status `dead`).
async fn record_retry_failure(
    conn: &mut PgConnection,
    letter: &dlq::store::Stored,
    result: &Result<(), Failure>,
) -> Result<(), sqlx::Error> {
    let Err(failure) = result else {
        return Ok(());
    };
    let (reason, error_chain) = failure.reason("retry_failed");
    let again = dlq::DeadLetter {
        source: dlq::Source::Consumer,
        consumer: letter.consumer.clone(),
        message_id: letter.message_id.clone(),
        subject: letter.subject.clone(),
        partition_key: letter.partition_key.clone(),
        headers: letter.headers.as_object().cloned().unwrap_or_default(),
        payload: letter.payload.clone(),
        reason,
        error_chain,
        attempts: 1,
        stream: None,
        stream_seq: None,
    };
    dlq::store::record(conn, &again).await?;
    Ok(())
}

/// Counts and logs a retry whose transaction committed.
fn report_retry(consumer: &Consumer, letter: &dlq::store::Stored, result: &Result<(), Failure>) {
    let name = consumer.config.name.clone();
    match result {
        Ok(()) => {
            metrics::counter!(m::DLQ_RETRIES, "consumer" => name, "result" => "ok").increment(1);
            tracing::info!(consumer = %consumer.config.name, dead_letter = letter.id, "dlq retry succeeded");
        }
        Err(error) => {
            metrics::counter!(m::DLQ_RETRIES, "consumer" => name, "result" => "failed")
                .increment(1);
            tracing::warn!(consumer = %consumer.config.name, dead_letter = letter.id, error = %error, "dlq retry failed again");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;

    /// A database error with SQLSTATE `code`, as the server would send it.
    #[derive(Debug)]
    struct Coded(&'static str);

    impl std::fmt::Display for Coded {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "SQLSTATE {}", self.0)
        }
    }

    impl std::error::Error for Coded {}

    impl sqlx::error::DatabaseError for Coded {
        fn message(&self) -> &str {
            self.0
        }
        fn code(&self) -> Option<Cow<'_, str>> {
            Some(Cow::Borrowed(self.0))
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    fn refused_code(code: &'static str) -> bool {
        refused(&sqlx::Error::Database(Box::new(Coded(code))))
    }

    #[test]
    fn tells_refused_commits_from_lost_sessions() {
        // Refused for what the transaction did: an attempt.
        for code in ["23505", "40001", "40P01", "P0001", "57014"] {
            assert!(refused_code(code), "{code} is refused");
        }
        // The connection or the server failed: not an attempt.
        for code in [
            "08006", "53300", "57P01", "58030", "XX000", "25P03", "25P04",
        ] {
            assert!(!refused_code(code), "{code} is a lost connection or server");
        }
        assert!(!refused(&sqlx::Error::PoolTimedOut));
        assert!(is_aborted(&sqlx::Error::Database(Box::new(Coded("25P02")))));
    }
}
