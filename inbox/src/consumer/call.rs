//! Calling handler code: in its span, within `handler_timeout`, catching a panic, with its
//! latency recorded.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;

use futures::FutureExt;
use sqlx::PgConnection;
use tokio::time::Instant;

use super::Consumer;
use super::failure::Failure;
use super::lane::LANE_BACKEND;
use super::trace::handler_span;
use crate::handler::{Delivery, HandlerError, RawBatchHandler};
use crate::metrics as m;
use crate::store;

/// The message of a panic payload (`panic!` with a literal or a format string).
pub(super) fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&'static str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a payload that is not a string".to_owned()
    }
}

impl Consumer {
    /// Runs a handler call, catching a panic so that the caller can roll its transaction
    /// (or savepoint) back as for any failure; a transaction the handler opened itself and
    /// left behind is rolled back by the connection before its next statement (sqlx queues
    /// that rollback on drop). A panic is logged, counted in [`m::HANDLER_PANICS`] and
    /// returned as [`Failure::Panicked`].
    ///
    /// The call is given `handler_timeout`: past it, the future is dropped (the handler stops
    /// at its current await point), counted in [`m::HANDLER_TIMEOUTS`] and returned as
    /// [`Failure::TimedOut`], for the caller to roll back.
    pub(super) async fn catching<F>(&self, call: F) -> Result<(), Failure>
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
    pub(super) async fn settle_after(&self, conn: &mut PgConnection, failure: &Failure) {
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
    pub(super) async fn run_handler(
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
    pub(super) async fn run_batch_handler(
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
}
