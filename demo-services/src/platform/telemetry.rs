//! Telemetry: JSON logs with OpenTelemetry trace ids, one request span per HTTP request, and
//! the Prometheus recorder behind `/metrics`.

use std::sync::OnceLock;

use axum::extract::Request;
use axum::response::Response;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// JSON logs on stdout (`RUST_LOG` filters; default `info`) and OpenTelemetry span ids
/// without an exporter, so that the W3C trace context flows from HTTP request to outbox
/// message to the consumers' handlers and every log line of one order carries its
/// `trace_id`. Call once, first thing in `main`.
pub fn init_telemetry(service: &'static str) {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    static PROVIDER: OnceLock<opentelemetry_sdk::trace::SdkTracerProvider> = OnceLock::new();
    let provider =
        PROVIDER.get_or_init(|| opentelemetry_sdk::trace::SdkTracerProvider::builder().build());
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .json()
                .with_current_span(false)
                .with_span_list(true),
        )
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer(service)))
        .try_init();
}

/// The process-wide Prometheus recorder (installed on first use).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (tests); this handle then stays empty.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Registers `counters` at zero so that `/metrics` lists them before their first event
/// (Prometheus queries and alerts then see 0 rather than nothing).
pub fn register_counters(counters: &[&'static str]) {
    let _ = metrics_handle();
    for name in counters {
        metrics::counter!(*name).increment(0);
    }
}

/// Runs each request in an `http` span whose `trace_id` field is its OpenTelemetry trace id:
/// what it enqueues carries that trace, so the consumers' log lines show the same id.
pub(super) async fn traced(request: Request, next: axum::middleware::Next) -> Response {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing::Instrument as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;

    let span = tracing::info_span!(
        "http",
        method = %request.method(),
        path = %request.uri().path(),
        trace_id = tracing::field::Empty,
    );
    let trace_id = span.context().span().span_context().trace_id();
    if trace_id != opentelemetry::trace::TraceId::INVALID {
        span.record("trace_id", trace_id.to_string());
    }
    next.run(request).instrument(span).await
}
