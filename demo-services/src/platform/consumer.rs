//! The services' inbox consumers: the saga's stream made sure of, a consumer restarted after
//! errors, the shared consumer settings, and handler errors for failed enqueues.

use std::sync::Arc;
use std::time::Duration;

use anyhow::anyhow;
use inbox::{Consumer, ConsumerConfig};
use relay::publisher::jetstream::{StreamSpec, ensure_stream};
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::events;

/// The saga's stream, with `replicas` and `duplicate_window` as the service is configured.
pub(super) fn demo_stream(replicas: usize, duplicate_window: Duration) -> StreamSpec {
    StreamSpec {
        name: events::STREAM.into(),
        subjects: events::STREAM_SUBJECTS
            .iter()
            .map(|s| (*s).to_owned())
            .collect(),
        duplicate_window,
        replicas,
    }
}

/// Creates or verifies the saga's stream, retrying until the broker answers or `stop`.
async fn ensure_demo_stream(
    jetstream: &async_nats::jetstream::Context,
    spec: &StreamSpec,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    loop {
        match ensure_stream(jetstream, spec).await {
            Ok(_) => return Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, "stream not ready yet; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return Err(anyhow!("stopped before the stream was ready")),
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        }
    }
}

/// Makes sure the saga's stream exists, then runs an inbox consumer until `stop`, starting
/// it again (after a pause) whenever it ends with an error, e.g. while the broker is away.
pub(super) fn spawn_consumer(
    config: ConsumerConfig,
    pool: PgPool,
    jetstream: async_nats::jetstream::Context,
    handler: Arc<dyn inbox::RawHandler>,
    stream: StreamSpec,
    stop: CancellationToken,
    health: ConsumerHealth,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let name = config.name.clone();
        if ensure_demo_stream(&jetstream, &stream, &stop)
            .await
            .is_err()
        {
            return;
        }
        while !stop.is_cancelled() {
            let consumer = match Consumer::new(
                config.clone(),
                pool.clone(),
                jetstream.clone(),
                handler.clone(),
            ) {
                Ok(c) => c.layer(inbox::layer::Logging),
                Err(e) => {
                    tracing::error!(consumer = %name, error = %e, "invalid consumer configuration");
                    return;
                }
            };
            *health
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(consumer.health());
            let stopped = stop.clone();
            match consumer.run(async move { stopped.cancelled().await }).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(consumer = %name, error = %e, "consumer stopped; restarting");
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
            }
        }
    })
}

/// A failed outbox enqueue inside a handler: retried if the database may recover, parked if
/// the message itself is invalid.
pub fn enqueue_failure(e: outbox::Error) -> inbox::HandlerError {
    if e.is_transient() {
        inbox::HandlerError::retry(e)
    } else {
        inbox::HandlerError::permanent(e)
    }
}

/// The consumer settings the three services share: quick retries for a demo.
pub(super) fn consumer_config(name: &str, subjects: Vec<String>) -> ConsumerConfig {
    ConsumerConfig {
        filter_subjects: subjects,
        concurrency: 8,
        max_attempts: 10,
        ack_wait: Duration::from_secs(10),
        retry_min_delay: Duration::from_millis(200),
        retry_max_delay: Duration::from_secs(5),
        retry_poll_interval: Duration::from_millis(500),
        ..ConsumerConfig::new(name, events::STREAM)
    }
}

/// The [`inbox::Health`] of a service's current consumer (each restart has a new one).
pub(super) type ConsumerHealth = Arc<std::sync::Mutex<Option<inbox::Health>>>;
