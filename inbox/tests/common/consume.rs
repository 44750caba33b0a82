//! Shared by the `consume_*` tests: a recording handler, their consumer configuration, and
//! the broker's and the database's view of what happened.

use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::{HeaderName, HeaderValue};
use envelope::Envelope;
use inbox::{Consumer, ConsumerConfig, Delivery, Handler, HandlerError};
use sqlx::{PgConnection, PgPool};

use super::{Env, OrderPlaced, Running, run};

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Behaviour {
    Succeed,
    Retry,
    FailPermanently,
}

/// Inserts one `applied` row per handled order, or fails as told; counts calls and their times.
#[derive(Clone)]
pub(crate) struct Recorder {
    name: &'static str,
    behaviour: Arc<Mutex<Behaviour>>,
    calls: Arc<AtomicUsize>,
    pub(crate) call_times: Arc<Mutex<Vec<Instant>>>,
}

impl Recorder {
    pub(crate) fn new(name: &'static str, behaviour: Behaviour) -> Self {
        Recorder {
            name,
            behaviour: Arc::new(Mutex::new(behaviour)),
            calls: Arc::default(),
            call_times: Arc::default(),
        }
    }
    pub(crate) fn set(&self, behaviour: Behaviour) {
        *self.behaviour.lock().expect("lock") = behaviour;
    }
    pub(crate) fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Handler<OrderPlaced> for Recorder {
    async fn handle(
        &self,
        conn: &mut PgConnection,
        event: OrderPlaced,
        _delivery: &Delivery,
    ) -> Result<(), HandlerError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.call_times.lock().expect("lock").push(Instant::now());
        // Written before failing: a failure must undo it.
        sqlx::query("INSERT INTO applied (consumer, order_id) VALUES ($1, $2)")
            .bind(self.name)
            .bind(&event.order_id)
            .execute(&mut *conn)
            .await
            .map_err(HandlerError::retry)?;
        let behaviour = *self.behaviour.lock().expect("lock");
        match behaviour {
            Behaviour::Succeed => Ok(()),
            Behaviour::Retry => Err(HandlerError::retry(std::io::Error::other(
                "downstream unavailable",
            ))),
            Behaviour::FailPermanently => Err(HandlerError::permanent_because(
                "rejected",
                std::io::Error::other("order rejected"),
            )),
        }
    }
}

pub(crate) fn config(name: &str) -> ConsumerConfig {
    ConsumerConfig {
        filter_subjects: vec!["orders.>".into()],
        ack_wait: Duration::from_secs(1),
        retry_min_delay: Duration::from_millis(100),
        retry_max_delay: Duration::from_secs(2),
        retry_poll_interval: Duration::from_millis(50),
        max_attempts: 4,
        ..ConsumerConfig::new(name, "ORDERS")
    }
}

/// Runs a consumer of `handler` until [`Running::stop`] (or the value is dropped).
pub(crate) fn start(
    env: &Env,
    js: jetstream::Context,
    config: ConsumerConfig,
    handler: Arc<dyn inbox::RawHandler>,
) -> Running {
    run(Consumer::new(config, env.pool.clone(), js, handler).expect("valid config"))
}

/// Publishes `envelope` again under another `Nats-Msg-Id`, so JetStream stores a second
/// copy (what a republish after the duplicate window looks like).
pub(crate) async fn publish_copy(js: &jetstream::Context, envelope: &Envelope, broker_id: &str) {
    let mut headers = envelope::nats::to_headers(envelope).expect("headers");
    headers.insert(
        HeaderName::from_str("Nats-Msg-Id").expect("name"),
        HeaderValue::from_str(broker_id).expect("value"),
    );
    js.publish_with_headers(
        envelope.subject.to_string(),
        headers,
        envelope.payload.clone(),
    )
    .await
    .expect("publish")
    .await
    .expect("stored twice");
}

/// The broker's view of a durable consumer: (ack floor stream sequence, acks pending), or
/// None if it cannot be read.
pub(crate) async fn ack_state(js: &jetstream::Context, consumer: &str) -> Option<(u64, usize)> {
    let mut c = js
        .get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(
            consumer, "ORDERS",
        )
        .await
        .ok()?;
    let info = c.info().await.ok()?;
    Some((info.ack_floor.stream_sequence, info.num_ack_pending))
}

pub(crate) async fn count(pool: &PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.expect(sql)
}

/// `chars` hexadecimal characters that do not compress (xorshift64).
pub(crate) fn random_hex(chars: usize) -> String {
    let mut state = 0x2545_F491_4F6C_DD1Du64 ^ chars as u64;
    let mut out = String::with_capacity(chars + 16);
    while out.len() < chars {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.push_str(&format!("{state:016x}"));
    }
    out.truncate(chars);
    out
}
