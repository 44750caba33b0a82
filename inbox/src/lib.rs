//! Exactly-once consumers for JetStream and PostgreSQL.
//!
//! A [`Consumer`] reads a durable JetStream pull consumer and, for each message, inserts the
//! inbox row `(consumer, message id)` and runs the handler **in one transaction**, commits,
//! and only then acknowledges. A redelivered message finds its inbox row and is acknowledged
//! without running the handler again, so each handler takes effect exactly once per message.
//! The handler gets the transaction's `&mut PgConnection`: its business writes and any
//! outbox messages it enqueues commit together with the inbox row.
//!
//! Failures follow the handler's [`HandlerError`]: a retry is NAKed with a growing delay
//! (exponential with jitter, or the handler's own), a permanent failure or an exhausted
//! attempt limit parks the message in `dead_letter` (with its raw bytes, reason, error chain
//! and attempts) and terminates it at the broker. Messages that do not decode are parked at
//! once. A handler that panics is caught, rolled back and retried the same way, and parked
//! with reason `panic` after the attempt limit; a handler whose transaction's COMMIT the
//! database refuses (a deferred constraint, a serialization failure) likewise, with reason
//! `commit_failed` (in batched mode the batch is first re-run one message at a time, so that
//! only that message fails). A handler that returns `Ok` but left its transaction aborted (it
//! ignored a failed statement) is caught before COMMIT and parked the same way with reason
//! `aborted_transaction`, one that runs past `handler_timeout` with reason `timeout`. The
//! attempt limit counts *handler attempts*, kept in the
//! `inbox_attempt` table, not the broker's deliveries: NAKs after database errors or at
//! shutdown and expired `ack_wait`s use none up, and lanes send progress acks for the
//! messages they hold so that a slow handler does not get them redelivered (a safety limit
//! parks a message delivered more than 10 x `max_attempts` (at least 100) times as `deliveries_exhausted`).
//! The broker never gives up first:
//! [`Consumer::ensure`] creates the durable with unlimited deliveries and refuses an existing
//! one with a delivery limit, a broker backoff or another `ack_wait`. `dlq retry` later
//! re-runs the failed consumer's handler from the parked bytes, in this consumer's own
//! process, without going through the broker.
//!
//! # Layout
//! - [`config`]: [`ConsumerConfig`], with `validate()` (retention vs. redelivery horizon).
//! - [`handler`]: [`Handler`] (typed), [`RawHandler`], [`Delivery`], [`HandlerError`],
//!   and [`typed`] to adapt one to the other; [`BatchHandler`], [`RawBatchHandler`] and
//!   [`typed_batch`] for handlers that take a whole batch at once.
//! - [`router`]: [`Router`], one consumer dispatching several event types to typed handlers.
//! - [`layer`]: composable handler middleware ([`Layer`]): logging, timing, rate limiting.
//! - [`consumer`]: [`Consumer`], the runtime (strict and batched modes, lanes, shutdown):
//!   - `consumer/mod.rs`: [`Consumer`]'s constructors and settings, and [`Consumer::run`],
//!     which starts the tasks and stops them;
//!   - `provision.rs`: [`Consumer::ensure`], creating or checking the durable;
//!   - `pull.rs`: the reader, pulling messages and routing each to a lane by partition key;
//!   - `supervised.rs`: the consumer's tasks by name, and why one ended;
//!   - `lane.rs`: lanes, their connection, progress acks and replies to the broker;
//!   - `transaction.rs`: one message in a transaction: reading it, its inbox row, COMMIT;
//!   - `batch.rs`: batched mode: the fast path, and a savepoint per message;
//!   - `call.rs`: calling a handler: timeout, panic, span, latency;
//!   - `failure.rs`: why an attempt failed, error classification, retry or park;
//!   - `dead_letter.rs`: parking a message in `dead_letter`, in a savepoint;
//!   - `trace.rs`: the handler span, continuing the producer's trace;
//!   - `maintenance/cleaner.rs`: deleting old inbox and attempt rows;
//!   - `maintenance/dlq_retry.rs`: running `dlq retry` requests from the parked bytes;
//!   - `maintenance/connection.rs`: their connection, closed unless its last step succeeded.
//! - [`store`]: all SQL on `inbox_message` and `inbox_attempt`.
//! - [`health`]: [`Health`], what readiness reports (consuming, database and broker up).
//! - [`metrics`]: metric names.
//! - [`error`]: the crate error, [`Error`].

pub mod config;
pub mod consumer;
pub mod error;
pub mod handler;
pub mod health;
pub mod layer;
pub mod metrics;
pub mod router;
pub mod store;

pub use config::{ConsumerConfig, Mode};
/// The NATS connection settings the relay uses too (auth, TLS): `NatsConfig::connect()`.
pub use connect::NatsConfig;
pub use consumer::Consumer;
pub use error::Error;
pub use handler::{
    BatchHandler, Delivery, Handler, HandlerError, RawBatchHandler, RawHandler, typed, typed_batch,
};
pub use health::{Health, HealthReport};
pub use layer::Layer;
pub use router::Router;

/// The README's Rust examples, compiled as doctests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;
