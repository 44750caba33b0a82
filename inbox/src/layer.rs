//! Handler middleware: a [`Layer`] wraps a [`RawHandler`] in another, like tower's
//! `Layer`/`Service`, so cross-cutting behaviour composes: `consumer.layer(Timing).layer(Logging)`.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgConnection;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::handler::{Delivery, HandlerFuture, RawHandler};
use crate::metrics as m;

/// Wraps a handler in another. Implement it for your own middleware.
pub trait Layer: Send + Sync + 'static {
    /// Returns `inner` wrapped.
    fn layer(&self, inner: Arc<dyn RawHandler>) -> Arc<dyn RawHandler>;
}

/// Logs each delivery's outcome at debug (ok) or warn (error), with id, subject and attempt.
#[derive(Debug, Clone, Copy, Default)]
pub struct Logging;

/// Records handler run time in the `inbox_handler_seconds` histogram, labelled `consumer`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timing;

/// Lets at most `per_second` deliveries start per second, spaced evenly (no bursts),
/// delaying the others; shared by every lane of the consumer.
#[derive(Debug, Clone)]
pub struct RateLimit {
    /// Deliveries per second, at least 1.
    pub per_second: u32,
}

impl Layer for Logging {
    fn layer(&self, inner: Arc<dyn RawHandler>) -> Arc<dyn RawHandler> {
        Arc::new(LoggingHandler(inner))
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

impl Layer for Timing {
    fn layer(&self, inner: Arc<dyn RawHandler>) -> Arc<dyn RawHandler> {
        Arc::new(TimingHandler(inner))
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
            metrics::histogram!(m::HANDLER_LATENCY, "consumer" => delivery.consumer.to_string())
                .record(started.elapsed().as_secs_f64());
            result
        })
    }
}

impl Layer for RateLimit {
    fn layer(&self, inner: Arc<dyn RawHandler>) -> Arc<dyn RawHandler> {
        let interval = Duration::from_secs(1) / self.per_second.max(1);
        Arc::new(RateLimitHandler {
            inner,
            interval,
            next: Arc::new(Mutex::new(Instant::now())),
        })
    }
}

struct RateLimitHandler {
    inner: Arc<dyn RawHandler>,
    interval: Duration,
    next: Arc<Mutex<Instant>>,
}

impl RateLimitHandler {
    /// Takes the next start slot: now, or one interval after the previous slot.
    async fn next_slot(&self) -> Instant {
        let mut next = self.next.lock().await;
        let slot = (*next).max(Instant::now());
        *next = slot + self.interval;
        slot
    }
}

impl RawHandler for RateLimitHandler {
    fn handle<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        delivery: &'a Delivery,
    ) -> HandlerFuture<'a> {
        Box::pin(async move {
            tokio::time::sleep_until(self.next_slot().await).await;
            self.inner.handle(conn, delivery).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::HandlerError;

    struct Noop;

    impl RawHandler for Noop {
        fn handle<'a>(
            &'a self,
            _conn: &'a mut PgConnection,
            _delivery: &'a Delivery,
        ) -> HandlerFuture<'a> {
            Box::pin(async { Ok::<(), HandlerError>(()) })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limit_spaces_deliveries_evenly() {
        // The pacing alone (the handler call itself needs a database): back-to-back
        // deliveries get slots 100 ms apart; after an idle second the next starts at once.
        let limited = RateLimitHandler {
            inner: Arc::new(Noop),
            interval: Duration::from_secs(1) / 10,
            next: Arc::new(Mutex::new(Instant::now())),
        };
        let start = Instant::now();
        let mut slots = Vec::new();
        for _ in 0..5 {
            slots.push(limited.next_slot().await - start);
        }
        let expected: Vec<Duration> = (0..5).map(|i| Duration::from_millis(100 * i)).collect();
        assert_eq!(slots, expected);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(
            limited.next_slot().await,
            Instant::now(),
            "no backlog of slots after idling"
        );
    }
}
