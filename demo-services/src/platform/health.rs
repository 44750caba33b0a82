//! The operational endpoints every service serves: `/health`, `/health/ready`, `/metrics`.

use std::time::Duration;

use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use sqlx::PgPool;

use super::consumer::ConsumerHealth;
use super::telemetry::metrics_handle;

/// What `/health/ready` checks.
#[derive(Clone)]
pub(super) struct Readiness {
    /// The service's database.
    pub(super) pool: PgPool,
    /// The broker connection.
    pub(super) nats: async_nats::Client,
    /// Whether the service writes an outbox (then its relay's lag counts).
    pub(super) has_outbox: bool,
    /// The largest acceptable relay lag.
    pub(super) relay_lag_max: Duration,
    /// The inbox consumer's readiness, if the service consumes (see [`inbox::Health`]).
    pub(super) consumer: ConsumerHealth,
}

impl Readiness {
    async fn check(&self) -> (bool, serde_json::Value) {
        let database = tokio::time::timeout(Duration::from_secs(2), async {
            let mut conn = self.pool.acquire().await?;
            let lag = if self.has_outbox {
                Some(outbox::store::backlog(&mut conn).await?.oldest_age_seconds)
            } else {
                None
            };
            Ok::<_, sqlx::Error>(lag)
        })
        .await;
        let (database_ok, lag) = match database {
            Ok(Ok(lag)) => (true, lag),
            _ => (false, None),
        };
        let broker_ok = matches!(
            self.nats.connection_state(),
            async_nats::connection::State::Connected
        );
        let lag_ok = lag.is_none_or(|l| l <= self.relay_lag_max.as_secs_f64());
        let consumer = self
            .consumer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .map(inbox::Health::report);
        let consumer_ok = consumer.as_ref().is_none_or(|c| c.ready);
        let ready = database_ok && broker_ok && lag_ok && consumer_ok;
        (
            ready,
            json!({
                "ready": ready,
                "database": database_ok,
                "broker": broker_ok,
                "relayLagSeconds": lag,
                "consumer": consumer,
            }),
        )
    }
}

/// `/health` (liveness), `/health/ready` (database, broker, relay lag, the inbox consumer)
/// and `/metrics`.
pub(super) fn ops_routes(readiness: Readiness) -> Router {
    Router::new()
        .route("/health", get(|| async { Json(json!({ "status": "ok" })) }))
        .route(
            "/health/ready",
            get(move || {
                let readiness = readiness.clone();
                async move {
                    let (ready, body) = readiness.check().await;
                    let status = if ready {
                        StatusCode::OK
                    } else {
                        StatusCode::SERVICE_UNAVAILABLE
                    };
                    (status, Json(body))
                }
            }),
        )
        .route(
            "/metrics",
            get(|| async {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    metrics_handle().render(),
                )
            }),
        )
}
