//! Handler middleware: a [`Layer`] wraps a [`RawHandler`] in another, like tower's
//! `Layer`/`Service`, so cross-cutting behaviour composes: `consumer.layer(Timing).layer(Logging)`.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgConnection;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::handler::{
    Delivery, EachInTurn, HandlerFuture, OneAtATime, RawBatchHandler, RawHandler,
};
use crate::metrics as m;

/// Wraps a handler in another. Implement it for your own middleware.
pub trait Layer: Send + Sync + 'static {
    /// Returns `inner` wrapped.
    fn layer(&self, inner: Arc<dyn RawHandler>) -> Arc<dyn RawHandler>;

    /// Returns the batch handler `inner` (see [`crate::Consumer::with_batch_handler`])
    /// wrapped. The default keeps the layer's per-message meaning by running the batch one
    /// delivery at a time through [`Layer::layer`], which gives up the batch's single round
    /// trip; implement it to wrap whole batches (the built-in layers do).
    fn layer_batch(&self, inner: Arc<dyn RawBatchHandler>) -> Arc<dyn RawBatchHandler> {
        Arc::new(EachInTurn(self.layer(Arc::new(OneAtATime(inner)))))
    }
}

/// Logs each delivery's outcome at debug (ok) or warn (error), with id, subject and attempt
/// (a batch: its size and first and last ids).
#[derive(Debug, Clone, Copy, Default)]
pub struct Logging;

/// Records the run time of what it wraps (inner layers and the handler) in the
/// `inbox_timed_seconds` histogram, labelled `consumer` and `kind` (`message`, or `batch` for
/// one sample per batch). The consumer itself always records the whole handler call in
/// `inbox_handler_seconds` / `inbox_batch_handler_seconds`; put `Timing` innermost to see the
/// handler's own time without the other layers.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timing;

/// Lets at most `per_second` deliveries start per second, spaced evenly (no bursts),
/// delaying the others; shared by every lane of the consumer. A batch of `n` deliveries
/// starts at the first one's slot and takes `n` slots; a batch that fails is re-run one
/// message at a time and takes its slots again. The wait happens inside the open
/// transaction: keep `n` / `per_second` well below the consumer's `ack_wait`.
#[derive(Debug, Clone)]
pub struct RateLimit {
    /// Deliveries per second, at least 1.
    pub per_second: u32,
}

impl Layer for Logging {
    fn layer(&self, inner: Arc<dyn RawHandler>) -> Arc<dyn RawHandler> {
        Arc::new(LoggingHandler(inner))
    }

    fn layer_batch(&self, inner: Arc<dyn RawBatchHandler>) -> Arc<dyn RawBatchHandler> {
        Arc::new(LoggingBatch(inner))
    }
}

struct LoggingHandler(Arc<dyn RawHandler>);

impl RawHandler for LoggingHandler {
    fn handle<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        delivery: &'a Delivery,
    ) -> HandlerFuture<'a> {
        Box::pin(async move {
            let result = self.0.handle(conn, delivery).await;
            let env = &delivery.envelope;
            match &result {
                Ok(()) => {
                    tracing::debug!(id = %env.id, subject = %env.subject, attempt = delivery.attempt, "handled")
                }
                Err(e) => {
                    tracing::warn!(id = %env.id, subject = %env.subject, attempt = delivery.attempt, error = %e, "handler failed")
                }
            }
            result
        })
    }
}

struct LoggingBatch(Arc<dyn RawBatchHandler>);

impl RawBatchHandler for LoggingBatch {
    fn handle_batch<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        deliveries: &'a [Delivery],
    ) -> HandlerFuture<'a> {
        Box::pin(async move {
            let result = self.0.handle_batch(conn, deliveries).await;
            let first = deliveries.first().map(|d| d.envelope.id.to_string());
            let last = deliveries.last().map(|d| d.envelope.id.to_string());
            let size = deliveries.len();
            match &result {
                Ok(()) => tracing::debug!(size, ?first, ?last, "handled batch"),
                Err(e) => {
                    tracing::warn!(size, ?first, ?last, error = %e, "batch handler failed")
                }
            }
            result
        })
    }
}

impl Layer for Timing {
    fn layer(&self, inner: Arc<dyn RawHandler>) -> Arc<dyn RawHandler> {
        Arc::new(TimingHandler(inner))
    }

    fn layer_batch(&self, inner: Arc<dyn RawBatchHandler>) -> Arc<dyn RawBatchHandler> {
        Arc::new(TimingBatch(inner))
    }
}

struct TimingBatch(Arc<dyn RawBatchHandler>);

impl RawBatchHandler for TimingBatch {
    fn handle_batch<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        deliveries: &'a [Delivery],
    ) -> HandlerFuture<'a> {
        Box::pin(async move {
            let started = Instant::now();
            let result = self.0.handle_batch(conn, deliveries).await;
            if let Some(first) = deliveries.first() {
                metrics::histogram!(m::TIMED, "consumer" => first.consumer.to_string(), "kind" => "batch")
                    .record(started.elapsed().as_secs_f64());
            }
            result
        })
    }
}

struct TimingHandler(Arc<dyn RawHandler>);

impl RawHandler for TimingHandler {
    fn handle<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        delivery: &'a Delivery,
    ) -> HandlerFuture<'a> {
        Box::pin(async move {
            let started = Instant::now();
            let result = self.0.handle(conn, delivery).await;
            metrics::histogram!(m::TIMED, "consumer" => delivery.consumer.to_string(), "kind" => "message")
                .record(started.elapsed().as_secs_f64());
            result
        })
    }
}

impl Layer for RateLimit {
    fn layer(&self, inner: Arc<dyn RawHandler>) -> Arc<dyn RawHandler> {
        Arc::new(RateLimitHandler {
            inner,
            pacer: Pacer::new(self.per_second),
        })
    }

    fn layer_batch(&self, inner: Arc<dyn RawBatchHandler>) -> Arc<dyn RawBatchHandler> {
        Arc::new(RateLimitBatch {
            inner,
            pacer: Pacer::new(self.per_second),
        })
    }
}

/// Start slots `interval` apart, shared by every caller.
struct Pacer {
    interval: Duration,
    next: Mutex<Instant>,
}

impl Pacer {
    fn new(per_second: u32) -> Self {
        Pacer {
            interval: Duration::from_secs(1) / per_second.max(1),
            next: Mutex::new(Instant::now()),
        }
    }

    /// Takes `n` consecutive slots starting now, or one interval after the previous slot
    /// taken; returns the first.
    async fn take(&self, n: u32) -> Instant {
        let mut next = self.next.lock().await;
        let slot = (*next).max(Instant::now());
        *next = slot + self.interval.saturating_mul(n);
        slot
    }
}

struct RateLimitHandler {
    inner: Arc<dyn RawHandler>,
    pacer: Pacer,
}

impl RawHandler for RateLimitHandler {
    fn handle<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        delivery: &'a Delivery,
    ) -> HandlerFuture<'a> {
        Box::pin(async move {
            tokio::time::sleep_until(self.pacer.take(1).await).await;
            self.inner.handle(conn, delivery).await
        })
    }
}

struct RateLimitBatch {
    inner: Arc<dyn RawBatchHandler>,
    pacer: Pacer,
}

impl RawBatchHandler for RateLimitBatch {
    fn handle_batch<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        deliveries: &'a [Delivery],
    ) -> HandlerFuture<'a> {
        Box::pin(async move {
            let n = u32::try_from(deliveries.len()).unwrap_or(u32::MAX);
            tokio::time::sleep_until(self.pacer.take(n).await).await;
            self.inner.handle_batch(conn, deliveries).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn rate_limit_spaces_deliveries_evenly() {
        // The pacing alone (the handler call itself needs a database): back-to-back
        // deliveries get slots 100 ms apart; after an idle second the next starts at once.
        let pacer = Pacer::new(10);
        let start = Instant::now();
        let mut slots = Vec::new();
        for _ in 0..5 {
            slots.push(pacer.take(1).await - start);
        }
        let expected: Vec<Duration> = (0..5).map(|i| Duration::from_millis(100 * i)).collect();
        assert_eq!(slots, expected);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(
            pacer.take(3).await,
            Instant::now(),
            "no backlog of slots after idling"
        );
        // A batch of three took three slots: the next delivery starts 300 ms later.
        assert_eq!(
            pacer.take(1).await - Instant::now(),
            Duration::from_millis(300)
        );
    }
}
