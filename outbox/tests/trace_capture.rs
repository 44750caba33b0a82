//! The outbox records the current span's W3C trace context (feature `opentelemetry`).

use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::trace::SdkTracerProvider;
use outbox::{Message, Outbox};
use sqlx::PgPool;
use testkit::Postgres;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

#[tokio::test(flavor = "current_thread")]
async fn enqueue_captures_the_current_span_trace_context() {
    let pg = Postgres::start().await.expect("start PostgreSQL");
    let pool = PgPool::connect(&pg.fresh_database().await.expect("db"))
        .await
        .expect("connect");
    migrations::migrate(&mut pool.acquire().await.expect("acquire"))
        .await
        .expect("migrate");

    let provider = SdkTracerProvider::builder().build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("outbox-test")));
    // The test runs on one thread, so a thread-local default subscriber covers every await.
    let _guard = tracing::subscriber::set_default(subscriber);

    let outbox = Outbox::new("order-service").expect("config");
    let span = tracing::info_span!("place_order");
    let expected = span.context().span().span_context().clone();
    assert!(
        expected.is_valid(),
        "the OpenTelemetry layer gives the span a context"
    );

    let id = async {
        let mut tx = pool.begin().await.expect("begin");
        let id = outbox
            .enqueue_message(
                &mut tx,
                Message::raw("orders.created", "order.created.v1", "o-1", "{}"),
            )
            .await
            .expect("enqueue");
        tx.commit().await.expect("commit");
        id
    }
    .instrument(span)
    .await;

    let traceparent: Option<String> =
        sqlx::query_scalar("SELECT traceparent FROM outbox_message WHERE id = $1")
            .bind(id.as_uuid())
            .fetch_one(&pool)
            .await
            .expect("row");
    let expected_parent = format!("00-{}-{}-01", expected.trace_id(), expected.span_id());
    assert_eq!(traceparent.as_deref(), Some(expected_parent.as_str()));

    // Outside any span nothing is captured.
    let mut conn = pool.acquire().await.expect("acquire");
    let outside = outbox
        .enqueue_message(
            &mut conn,
            Message::raw("orders.created", "order.created.v1", "o-2", "{}"),
        )
        .await
        .expect("enqueue");
    let none: Option<String> =
        sqlx::query_scalar("SELECT traceparent FROM outbox_message WHERE id = $1")
            .bind(outside.as_uuid())
            .fetch_one(&mut *conn)
            .await
            .expect("row");
    assert_eq!(none, None);
}
