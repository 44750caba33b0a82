//! A handler continues the producer's trace: what it enqueues carries the same trace id.

mod common;

use std::time::Duration;

use common::*;
use envelope::{Envelope, Event, HeaderText, TraceContext};
use inbox::{Consumer, ConsumerConfig, Delivery, Handler, HandlerError, typed};
use opentelemetry::trace::TracerProvider as _;
use sqlx::PgConnection;
use testkit::wait_until;
use tracing_subscriber::layer::SubscriberExt;

#[derive(serde::Serialize, serde::Deserialize)]
struct Paid {
    order_id: String,
}

impl Event for Paid {
    const NAME: &'static str = "orders.paid";
    const VERSION: u32 = 1;
    fn partition_key(&self) -> String {
        self.order_id.clone()
    }
}

/// Consume-transform-produce: enqueues a follow-up event in the inbox transaction.
struct Forward(outbox::Outbox);

impl Handler<Paid> for Forward {
    async fn handle(
        &self,
        conn: &mut PgConnection,
        event: Paid,
        delivery: &Delivery,
    ) -> Result<(), HandlerError> {
        let message = outbox::Message::json(
            "emails.requested",
            "emails.requested.v1",
            event.order_id.clone(),
            &event.order_id,
        )
        .map_err(HandlerError::permanent)?
        .caused_by(delivery.envelope.id);
        self.0
            .enqueue_message(conn, message)
            .await
            .map_err(HandlerError::retry)?;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_continues_the_producers_trace() {
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("inbox-test")));
    tracing::subscriber::set_global_default(subscriber)
        .expect("the only subscriber of this test binary");

    let env = env().await;
    let pool = env.pool.clone();

    let producer_trace = TraceContext::new(
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        None,
    )
    .expect("valid");
    let mut envelope = Envelope::from_event(
        HeaderText::new("s", "payments").expect("valid"),
        &Paid {
            order_id: "o-1".into(),
        },
    )
    .expect("valid");
    envelope.trace = Some(producer_trace.clone());
    publish(&env.js, &envelope).await;

    let consumer = Consumer::new(
        ConsumerConfig {
            filter_subjects: vec!["orders.>".into()],
            ..ConsumerConfig::new("notifier", "ORDERS")
        },
        pool.clone(),
        env.js.clone(),
        typed(Forward(outbox::Outbox::new("notifier").expect("outbox"))),
    )
    .expect("config");
    let running = run(consumer);
    let p = pool.clone();
    wait_until(
        Duration::from_secs(10),
        "the follow-up is enqueued",
        || async {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox_message")
                .fetch_one(&p)
                .await
                .unwrap_or(0)
                == 1
        },
    )
    .await
    .expect("forwarded");
    running.stop().await;

    let (traceparent, causation): (Option<String>, Option<uuid::Uuid>) =
        sqlx::query_as("SELECT traceparent, causation_id FROM outbox_message")
            .fetch_one(&pool)
            .await
            .expect("row");
    let traceparent = traceparent.expect("the follow-up carries a trace context");
    let follow_up = TraceContext::new(traceparent, None).expect("valid");
    assert_eq!(
        follow_up.trace_id(),
        producer_trace.trace_id(),
        "same trace across the hop"
    );
    assert_ne!(
        follow_up.parent_span_id(),
        producer_trace.parent_span_id(),
        "a new span of the consumer"
    );
    assert_eq!(causation, Some(envelope.id.as_uuid()));
}
