//! Shared setup of the inbox's integration tests: a real PostgreSQL and nats-server, the
//! `ORDERS` stream, an `applied` business table, event types, publishing, the broker's view
//! of a durable, and a running consumer that can be stopped.

#![allow(dead_code)] // Each test binary uses a part.

pub(crate) mod consume;

use std::time::Duration;

use async_nats::jetstream;
use envelope::{Envelope, Event, HeaderText};
use inbox::Consumer;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use testkit::{NatsServer, Postgres};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct OrderPlaced {
    pub(crate) order_id: String,
}

impl Event for OrderPlaced {
    const NAME: &'static str = "orders.placed";
    const VERSION: u32 = 1;
    fn partition_key(&self) -> String {
        self.order_id.clone()
    }
}

/// An order placed, ordered by `key` (its lane) rather than by its id.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Placed {
    pub(crate) order_id: String,
    pub(crate) key: String,
}

impl Event for Placed {
    const NAME: &'static str = "orders.placed";
    const VERSION: u32 = 1;
    fn partition_key(&self) -> String {
        self.key.clone()
    }
}

pub(crate) struct Env {
    pub(crate) pg: Postgres,
    pub(crate) nats: NatsServer,
    /// The test database's URL.
    pub(crate) db_url: String,
    pub(crate) pool: PgPool,
    pub(crate) js: jetstream::Context,
}

/// Starts both servers, migrates a fresh database, creates `applied (consumer, order_id)`
/// and the `ORDERS` stream on `orders.>` (with the server's duplicate window, two minutes).
pub(crate) async fn env() -> Env {
    env_with_duplicate_window(Duration::ZERO).await
}

/// [`env`] with the `ORDERS` stream's duplicate window set (zero: the server's default).
pub(crate) async fn env_with_duplicate_window(duplicate_window: Duration) -> Env {
    let (pg, nats) = tokio::join!(Postgres::start(), NatsServer::start());
    let (pg, nats) = (pg.expect("PostgreSQL"), nats.expect("nats-server"));
    let db_url = pg.fresh_database().await.expect("db");
    let pool = PgPool::connect(&db_url).await.expect("connect");
    migrations::migrate(&mut pool.acquire().await.expect("acquire"))
        .await
        .expect("migrate");
    sqlx::query("CREATE TABLE applied (consumer text NOT NULL, order_id text NOT NULL)")
        .execute(&pool)
        .await
        .expect("business table");
    let js = jetstream::new(async_nats::connect(nats.url()).await.expect("nats"));
    js.create_stream(jetstream::stream::Config {
        name: "ORDERS".into(),
        subjects: vec!["orders.>".into()],
        duplicate_window,
        ..Default::default()
    })
    .await
    .expect("stream");
    Env {
        pg,
        nats,
        db_url,
        pool,
        js,
    }
}

pub(crate) fn order_envelope(order_id: &str) -> Envelope {
    Envelope::from_event(
        HeaderText::new("source", "order-service").expect("valid"),
        &OrderPlaced {
            order_id: order_id.into(),
        },
    )
    .expect("valid")
}

/// A [`Placed`] of `order_id` in lane `key`.
pub(crate) fn order_keyed(order_id: &str, key: &str) -> Envelope {
    Envelope::from_event(
        HeaderText::new("source", "order-service").expect("valid"),
        &Placed {
            order_id: order_id.into(),
            key: key.into(),
        },
    )
    .expect("valid")
}

/// A [`Placed`] of `order_id` in its own lane.
pub(crate) fn order(order_id: &str) -> Envelope {
    order_keyed(order_id, order_id)
}

/// Publishes `envelope` and awaits its PubAck.
pub(crate) async fn publish(js: &jetstream::Context, envelope: &Envelope) {
    let headers = envelope::nats::to_headers(envelope).expect("headers");
    js.publish_with_headers(
        envelope.subject.to_string(),
        headers,
        envelope.payload.clone(),
    )
    .await
    .expect("publish")
    .await
    .expect("ack");
}

/// Publishes one event per order id, awaiting every PubAck (in rounds of 256: the
/// context bounds the acks in flight).
pub(crate) async fn publish_orders(
    js: &jetstream::Context,
    order_ids: impl IntoIterator<Item = String>,
) {
    let ids: Vec<String> = order_ids.into_iter().collect();
    for round in ids.chunks(256) {
        let mut acks = Vec::with_capacity(round.len());
        for order_id in round {
            let envelope = order_envelope(order_id);
            let headers = envelope::nats::to_headers(&envelope).expect("headers");
            acks.push(
                js.publish_with_headers(
                    envelope.subject.to_string(),
                    headers,
                    envelope.payload.clone(),
                )
                .await
                .expect("publish"),
            );
        }
        for ack in acks {
            ack.await.expect("ack");
        }
    }
}

/// `applied` rows per order of `consumer`.
pub(crate) async fn applied_per_order(
    pool: &PgPool,
    consumer: &str,
) -> std::collections::HashMap<String, i64> {
    sqlx::query_as::<_, (String, i64)>(
        "SELECT order_id, count(*) FROM applied WHERE consumer = $1 GROUP BY order_id",
    )
    .bind(consumer)
    .fetch_all(pool)
    .await
    .expect("applied")
    .into_iter()
    .collect()
}

pub(crate) async fn applied(pool: &PgPool, consumer: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM applied WHERE consumer = $1")
        .bind(consumer)
        .fetch_one(pool)
        .await
        .expect("count")
}

pub(crate) async fn dead_letters(pool: &PgPool, consumer: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM dead_letter WHERE consumer = $1")
        .bind(consumer)
        .fetch_one(pool)
        .await
        .expect("count")
}

/// Rows in `inbox_attempt`, of every consumer.
pub(crate) async fn attempt_rows(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM inbox_attempt")
        .fetch_one(pool)
        .await
        .expect("count")
}

/// The broker's view of the durable `name`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BrokerView {
    /// Deliveries so far, redeliveries included (the consumer sequence).
    pub(crate) deliveries: u64,
    /// Delivered and neither acked nor terminated.
    pub(crate) ack_pending: usize,
    /// Not delivered yet.
    pub(crate) pending: u64,
}

/// `None` until the consumer has created its durable.
pub(crate) async fn broker_view(js: &jetstream::Context, name: &str) -> Option<BrokerView> {
    let info = js
        .get_stream("ORDERS")
        .await
        .expect("stream")
        .consumer_info(name)
        .await
        .ok()?;
    Some(BrokerView {
        deliveries: info.delivered.consumer_sequence,
        ack_pending: info.num_ack_pending,
        pending: info.num_pending,
    })
}

/// All delivered messages acked (or terminated) and none left to deliver.
pub(crate) fn all_acked(view: Option<BrokerView>) -> bool {
    view.is_some_and(|v| v.ack_pending == 0 && v.pending == 0)
}

/// Runs `consumer` until [`Running::stop`].
pub(crate) fn run(consumer: Consumer) -> Running {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(consumer.run(async move {
        let _ = rx.await;
    }));
    Running {
        stop: Some(tx),
        task,
    }
}

pub(crate) struct Running {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub(crate) task: tokio::task::JoinHandle<Result<(), inbox::Error>>,
}

impl Running {
    /// Fails the test with what `run()` returned if it returned: nobody asked it to stop.
    pub(crate) async fn assert_still_running(&mut self) {
        if self.task.is_finished() {
            let result = (&mut self.task).await.expect("task");
            panic!("run() returned {result:?} though no shutdown was asked");
        }
    }

    /// Asks the consumer to stop, without waiting.
    pub(crate) fn ask_to_stop(&mut self) {
        drop(self.stop.take());
    }

    /// Stops the consumer and asserts that `run` returned `Ok` within `bound`.
    pub(crate) async fn stop_within(mut self, bound: Duration) {
        self.ask_to_stop();
        tokio::time::timeout(bound, &mut self.task)
            .await
            .unwrap_or_else(|_| panic!("run() did not return within {bound:?} of the stop"))
            .expect("task")
            .expect("run returns Ok after a requested shutdown");
    }

    /// Stops the consumer and asserts that `run` returned `Ok`.
    pub(crate) async fn stop(self) {
        self.stop_within(Duration::from_secs(20)).await;
    }
}
