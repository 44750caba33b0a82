//! Capture of the current tracing span's W3C trace context.

use envelope::TraceContext;

/// The trace context of the current `tracing` span, if one is known.
///
/// With the `opentelemetry` feature and a `tracing-opentelemetry` layer installed in the
/// subscriber, this is the OpenTelemetry span context of [`tracing::Span::current`]
/// (trace id, span id, sampled flag and `tracestate`). Otherwise, or outside any valid
/// span, it is `None`.
pub fn current() -> Option<TraceContext> {
    #[cfg(feature = "opentelemetry")]
    {
        use opentelemetry::trace::TraceContextExt;
        use tracing_opentelemetry::OpenTelemetrySpanExt;

        let context = tracing::Span::current().context();
        let span = context.span();
        let span_context = span.span_context();
        if !span_context.is_valid() {
            return None;
        }
        let trace = TraceContext::from_ids(
            span_context.trace_id().to_bytes(),
            span_context.span_id().to_bytes(),
            span_context.is_sampled(),
        )
        .ok()?;
        let state = span_context.trace_state().header();
        if state.is_empty() {
            Some(trace)
        } else {
            // An invalid vendor state is dropped rather than failing the enqueue.
            Some(trace.clone().with_tracestate(state).unwrap_or(trace))
        }
    }
    #[cfg(not(feature = "opentelemetry"))]
    {
        None
    }
}
