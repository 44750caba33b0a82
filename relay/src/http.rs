//! `/health`, `/health/ready` and `/metrics`.

use std::net::SocketAddr;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::health::Health;

/// Binds the HTTP listener (port 0 picks a free port; see `local_addr`).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr).await.map_err(|source| Error::Http {
        addr: addr.to_string(),
        source,
    })
}

/// Serves until `stop`:
/// - `GET /health`: 200 while the process runs (liveness);
/// - `GET /health/ready`: 200 when the database and the broker are reachable, else 503; the
///   body is the [`HealthReport`](crate::health::HealthReport) as JSON either way;
/// - `GET /metrics`: Prometheus text, when a recorder handle is given.
pub async fn serve(
    listener: TcpListener,
    health: Health,
    metrics: Option<PrometheusHandle>,
    stop: CancellationToken,
) -> Result<(), Error> {
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let app = Router::new()
        .route(
            "/health",
            get(|| async { axum::Json(serde_json::json!({ "status": "ok" })) }),
        )
        .route(
            "/health/ready",
            get(move || {
                let report = health.report();
                async move {
                    let status = if report.ready {
                        StatusCode::OK
                    } else {
                        StatusCode::SERVICE_UNAVAILABLE
                    };
                    (status, axum::Json(report))
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let body = metrics.as_ref().map(PrometheusHandle::render);
                async move {
                    match body {
                        Some(text) => (
                            StatusCode::OK,
                            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                            text,
                        )
                            .into_response(),
                        None => (StatusCode::NOT_FOUND, "metrics are not enabled").into_response(),
                    }
                }
            }),
        );
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
        .map_err(|source| Error::Http { addr, source })
}
