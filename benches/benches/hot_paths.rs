//! Criterion micro-benchmarks of the CPU work on the message path, no I/O:
//! - `envelope/to_headers`, `envelope/from_message`: the NATS header codec, both ways;
//! - `outbox/prepare`: validating a typed event with a few headers into the stored envelope
//!   (everything `Outbox::enqueue` does before its SQL);
//! - `relay/claimed_rows_to_envelopes`: rebuilding the envelopes of one claimed batch of 512
//!   rows (`ClaimedRow::to_envelope`), as the relay does per claim.
//!
//! Run with `cargo bench -p bench`.

use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use outbox::store::ClaimedRow;
use outbox::{Envelope, Event, Message, Outbox, TraceContext};
use serde::{Deserialize, Serialize};

const BATCH: usize = 512;

#[derive(Serialize, Deserialize)]
struct OrderPlaced {
    order_id: String,
    customer: String,
    total_cents: i64,
    lines: Vec<(String, u32)>,
}

impl Event for OrderPlaced {
    const NAME: &'static str = "order.placed";
    const VERSION: u32 = 1;
    fn partition_key(&self) -> String {
        self.order_id.clone()
    }
}

fn event() -> OrderPlaced {
    OrderPlaced {
        order_id: "order-0190a4b2-7c1e".into(),
        customer: "customer-42".into(),
        total_cents: 12_345,
        lines: vec![("sku-1".into(), 2), ("sku-2".into(), 1)],
    }
}

/// A typed event with a few headers, a correlation id and a trace context.
fn message() -> Message {
    Message::event(&event())
        .expect("event serializes")
        .header("x-tenant", "acme")
        .header("x-request-id", "req-7f3a9c")
        .header("x-schema", "orders/v1")
        .correlation_id("checkout-42")
        .trace_context(
            TraceContext::new(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                Some("vendor=abc".into()),
            )
            .expect("valid trace context"),
        )
}

fn envelope(outbox: &Outbox) -> Envelope {
    outbox.prepare(message()).expect("valid message")
}

fn claimed_rows(template: &Envelope) -> Vec<ClaimedRow> {
    let headers: serde_json::Map<String, serde_json::Value> = template
        .headers
        .iter()
        .map(|(k, v)| (k.to_owned(), serde_json::Value::String(v.to_owned())))
        .collect();
    (0..BATCH)
        .map(|i| ClaimedRow {
            id: uuid::Uuid::now_v7(),
            seq: i as i64 + 1,
            subject: "bench.event".into(),
            event_type: "bench.event.v1".into(),
            source: "bench".into(),
            partition_key: format!("key-{}", i % 1000),
            occurred_at: template.occurred_at,
            correlation_id: Some("checkout-42".into()),
            causation_id: None,
            traceparent: template.trace.as_ref().map(|t| t.traceparent().to_owned()),
            tracestate: None,
            content_type: Some("application/octet-stream".into()),
            headers: serde_json::Value::Object(headers.clone()),
            payload: vec![b'x'; 1024],
            attempts: 0,
            permanent_failures: 0,
        })
        .collect()
}

fn codec(c: &mut Criterion) {
    let outbox = Outbox::new("order-service").expect("outbox");
    let env = envelope(&outbox);
    let mut group = c.benchmark_group("envelope");
    group.throughput(Throughput::Elements(1));
    group.bench_function("to_headers", |b| {
        b.iter(|| envelope::nats::to_headers(black_box(&env)).expect("encodes"))
    });
    let headers = envelope::nats::to_headers(&env).expect("encodes");
    let subject = env.subject.to_string();
    group.bench_function("from_message", |b| {
        b.iter(|| {
            envelope::nats::from_message(
                black_box(&subject),
                Some(black_box(&headers)),
                env.payload.clone(),
            )
            .expect("decodes")
        })
    });
    group.finish();
}

fn prepare(c: &mut Criterion) {
    let outbox = Outbox::new("order-service").expect("outbox");
    let mut group = c.benchmark_group("outbox");
    group.throughput(Throughput::Elements(1));
    group.bench_function("prepare", |b| {
        b.iter_batched(
            message,
            |m| outbox.prepare(m).expect("valid message"),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn claim_batch(c: &mut Criterion) {
    let outbox = Outbox::new("bench").expect("outbox");
    let rows = claimed_rows(&envelope(&outbox));
    let mut group = c.benchmark_group("relay");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("claimed_rows_to_envelopes", |b| {
        b.iter(|| {
            black_box(&rows)
                .iter()
                .map(ClaimedRow::to_envelope)
                .collect::<Result<Vec<_>, _>>()
                .expect("valid rows")
        })
    });
    group.finish();
}

criterion_group!(benches, codec, prepare, claim_batch);
criterion_main!(benches);
