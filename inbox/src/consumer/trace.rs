//! The span a handler runs in, continuing the producer's trace.

use crate::handler::Delivery;

/// The span a handler runs in. With the `opentelemetry` feature its parent is the
/// producer's span from the message's `traceparent`, so the trace continues across services
/// (and outbox messages the handler enqueues carry the same trace id).
pub(super) fn handler_span(consumer: &str, delivery: &Delivery) -> tracing::Span {
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
