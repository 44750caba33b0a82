//! Handlers: user code that runs in the inbox transaction, and what its result means.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use envelope::{Envelope, Event};
use sqlx::PgConnection;

/// Any error a handler wants to report.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A boxed handler future.
pub type HandlerFuture<'a> = Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send + 'a>>;

/// One delivery of a message to a handler.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The decoded message.
    pub envelope: Envelope,
    /// The consumer's name.
    pub consumer: Arc<str>,
    /// Which handler attempt this is, from 1: one more than the earlier runs of the handler
    /// for this message that failed (returned [`HandlerError::Retry`], panicked, ran past
    /// `handler_timeout`, left the transaction aborted, or whose transaction's COMMIT the
    /// database refused). Redeliveries that did not run the handler
    /// (the database was unavailable, the consumer shut down, `ack_wait` expired) do not
    /// count; the count is kept in the database, so it carries over to another instance. A
    /// `dlq retry` counts on from the dead letter's attempts. `max_attempts` applies to it.
    pub attempt: u32,
    /// How many times the broker has delivered the message, this delivery included
    /// (JetStream's delivery count), when delivered by the broker (None for a `dlq retry`).
    /// It can exceed `attempt`; it is not what `max_attempts` limits.
    pub delivered: Option<u32>,
    /// The stream sequence, when delivered by the broker (None for a `dlq retry`).
    pub stream_seq: Option<u64>,
}

/// A handler's failure, which is also its disposition.
#[derive(Debug)]
pub enum HandlerError {
    /// Try again later: after `after`, or after the consumer's backoff for this attempt.
    /// Each counts as a handler attempt ([`Delivery::attempt`]); once `max_attempts` are
    /// used up the message is dead-lettered with reason `attempts_exhausted`.
    Retry {
        /// The handler's own delay, if it knows better (e.g. a rate limit's reset time).
        after: Option<Duration>,
        /// Why.
        error: BoxError,
    },
    /// Never going to work: dead-letter now with this short reason (e.g. `invalid_order`).
    Permanent {
        /// A short machine-readable reason, stored as the dead letter's `reason`.
        reason: String,
        /// Why.
        error: BoxError,
    },
}

impl HandlerError {
    /// Retry after the consumer's backoff.
    pub fn retry(error: impl Into<BoxError>) -> Self {
        HandlerError::Retry {
            after: None,
            error: error.into(),
        }
    }

    /// Retry after `delay`.
    pub fn retry_after(delay: Duration, error: impl Into<BoxError>) -> Self {
        HandlerError::Retry {
            after: Some(delay),
            error: error.into(),
        }
    }

    /// Dead-letter now with reason `handler`.
    pub fn permanent(error: impl Into<BoxError>) -> Self {
        HandlerError::Permanent {
            reason: dlq::reason::HANDLER.into(),
            error: error.into(),
        }
    }

    /// Dead-letter now with a reason of the handler's choosing.
    pub fn permanent_because(reason: impl Into<String>, error: impl Into<BoxError>) -> Self {
        HandlerError::Permanent {
            reason: reason.into(),
            error: error.into(),
        }
    }

    /// The error inside.
    pub fn error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        match self {
            HandlerError::Retry { error, .. } | HandlerError::Permanent { error, .. } => {
                error.as_ref()
            }
        }
    }
}

impl std::fmt::Display for HandlerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandlerError::Retry { error, .. } => write!(f, "retry: {error}"),
            HandlerError::Permanent { reason, error } => write!(f, "permanent ({reason}): {error}"),
        }
    }
}

/// Handles raw deliveries; the consumer runtime calls this.
///
/// # Contract
/// `conn` is the consumer's open transaction: everything the handler writes through it
/// (business rows, outbox messages) commits together with the inbox row, or not at all. The
/// handler must not commit or roll back itself and should not publish to the broker
/// directly (enqueue to the outbox instead). It may be called again for the same message
/// only if an earlier call returned an error or its transaction did not commit. A statement
/// that fails aborts the transaction: return its error (e.g. `map_err(HandlerError::retry)`);
/// a handler that ignores it and returns `Ok` is caught before COMMIT and counted as a failed
/// attempt (parked with reason `aborted_transaction`), since nothing it did could commit.
///
/// A handler that panics is caught by the consumer: its transaction is rolled back, the
/// panic is counted (`inbox_handler_panics_total`) and the message is retried like
/// [`HandlerError::retry`], then dead-lettered with reason `panic` after `max_attempts`. The
/// same holds for [`RawBatchHandler`]s and for `dlq retry` runs.
///
/// A handler that returned `Ok` but whose transaction's COMMIT the database refuses (a
/// deferred constraint, a serialization failure) failed too: its effects are gone, the run
/// counts as an attempt, and the message is retried with the consumer's backoff, then
/// dead-lettered with reason `commit_failed` after `max_attempts`.
pub trait RawHandler: Send + Sync + 'static {
    /// Handles one delivery.
    fn handle<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        delivery: &'a Delivery,
    ) -> HandlerFuture<'a>;
}

/// Handles one typed event (see [`typed`]); the same contract as [`RawHandler`].
pub trait Handler<E: Event>: Send + Sync + 'static {
    /// Handles one event.
    fn handle(
        &self,
        conn: &mut PgConnection,
        event: E,
        delivery: &Delivery,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// Adapts a typed handler to a raw one: the payload is decoded as `E` (after checking the
/// envelope's type is `E`'s); a message that does not decode is a permanent failure with
/// reason `decode`.
pub fn typed<E, H>(handler: H) -> Arc<dyn RawHandler>
where
    E: Event + Send + 'static,
    H: Handler<E>,
{
    Arc::new(Typed {
        handler,
        _event: PhantomData::<fn() -> E>,
    })
}

/// Decodes the payload as `E` (after checking the envelope's type is `E`'s); a message that
/// does not decode is a permanent failure with reason `decode`.
fn decode<E: Event>(delivery: &Delivery) -> Result<E, HandlerError> {
    delivery
        .envelope
        .decode_event::<E>()
        .map_err(|e| HandlerError::permanent_because(dlq::reason::DECODE, e))
}

struct Typed<E, H> {
    handler: H,
    _event: PhantomData<fn() -> E>,
}

impl<E, H> RawHandler for Typed<E, H>
where
    E: Event + Send + 'static,
    H: Handler<E>,
{
    fn handle<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        delivery: &'a Delivery,
    ) -> HandlerFuture<'a> {
        Box::pin(async move {
            let event = decode::<E>(delivery)?;
            self.handler.handle(conn, event, delivery).await
        })
    }
}

/// Handles a whole batch of deliveries in one call (see [`crate::Consumer::with_batch_handler`]
/// and [`typed_batch`]): one multi-row statement for a batch instead of one round trip per
/// message.
///
/// # Contract
/// The [`RawHandler`] contract, for every delivery of the batch: `conn` is the consumer's
/// open transaction, and the batch's effects commit together with its inbox rows, or not at
/// all. `deliveries` are in delivery order (messages of one partition key in stream order)
/// and hold each message once; a message already processed is filtered out by its inbox
/// row (a `dlq retry` runs a parked message again, as a batch of one).
///
/// Returning an error means "some delivery failed": the consumer rolls the whole batch back
/// and runs it again one delivery at a time (a batch of one, each in its own savepoint), so
/// that the failing message gets its disposition (retry or dead letter) alone and the others
/// commit. If instead the batch's COMMIT fails (a deferred constraint, a serialization
/// failure), the consumer runs the batch again one delivery at a time, each in a transaction
/// of its own, so that only the message whose commit fails is retried (and dead-lettered
/// with reason `commit_failed` after `max_attempts`). A handler may therefore see a delivery
/// again after a batch that did not commit; only the runs of the one-at-a-time rerun count
/// as attempts.
///
/// Tracing: a batch of one runs in its message's span, which continues the producer's trace;
/// a larger batch runs in an `inbox.handle_batch` span of its own (a batch has many
/// producers), so what it enqueues starts a new trace unless the handler passes each
/// message's own context on (`outbox::Message::trace_context` with `delivery.envelope.trace`).
pub trait RawBatchHandler: Send + Sync + 'static {
    /// Handles the batch.
    fn handle_batch<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        deliveries: &'a [Delivery],
    ) -> HandlerFuture<'a>;
}

/// Handles a batch of typed events (see [`typed_batch`]); the same contract as
/// [`RawBatchHandler`].
pub trait BatchHandler<E: Event>: Send + Sync + 'static {
    /// Handles the batch, each event with its delivery.
    fn handle_batch(
        &self,
        conn: &mut PgConnection,
        events: Vec<(E, &Delivery)>,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// Adapts a typed batch handler to a raw one. Every payload is decoded as `E` first; if one
/// does not decode, the batch fails, and in the one-at-a-time rerun that message is
/// dead-lettered with reason `decode` while the others are handled.
pub fn typed_batch<E, H>(handler: H) -> Arc<dyn RawBatchHandler>
where
    E: Event + Send + 'static,
    H: BatchHandler<E>,
{
    Arc::new(TypedBatch {
        handler,
        _event: PhantomData::<fn() -> E>,
    })
}

struct TypedBatch<E, H> {
    handler: H,
    _event: PhantomData<fn() -> E>,
}

impl<E, H> RawBatchHandler for TypedBatch<E, H>
where
    E: Event + Send + 'static,
    H: BatchHandler<E>,
{
    fn handle_batch<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        deliveries: &'a [Delivery],
    ) -> HandlerFuture<'a> {
        Box::pin(async move {
            let mut events = Vec::with_capacity(deliveries.len());
            for delivery in deliveries {
                let event = decode::<E>(delivery)?;
                events.push((event, delivery));
            }
            self.handler.handle_batch(conn, events).await
        })
    }
}

/// A batch handler seen as a per-message handler: each delivery is a batch of one.
pub(crate) struct OneAtATime(pub(crate) Arc<dyn RawBatchHandler>);

impl RawHandler for OneAtATime {
    fn handle<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        delivery: &'a Delivery,
    ) -> HandlerFuture<'a> {
        self.0.handle_batch(conn, std::slice::from_ref(delivery))
    }
}

/// A per-message handler seen as a batch handler: the deliveries one after the other,
/// stopping at the first error.
pub(crate) struct EachInTurn(pub(crate) Arc<dyn RawHandler>);

impl RawBatchHandler for EachInTurn {
    fn handle_batch<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        deliveries: &'a [Delivery],
    ) -> HandlerFuture<'a> {
        Box::pin(async move {
            for delivery in deliveries {
                self.0.handle(conn, delivery).await?;
            }
            Ok(())
        })
    }
}
