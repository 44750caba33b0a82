//! The inbox consumer against real PostgreSQL and nats-server, in batched mode: a failure,
//! or a dead letter the database refuses, is isolated to its message; batch handlers take
//! whole batches; layers see every message; a message present twice runs once.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::consume::*;
use common::*;
use envelope::Envelope;
use inbox::{Consumer, ConsumerConfig, Delivery, Handler, HandlerError, Mode, typed};
use sqlx::PgConnection;
use testkit::wait_until;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_mode_keeps_good_messages_when_one_fails() {
    let env = env().await;
    struct Picky;
    impl Handler<OrderPlaced> for Picky {
        async fn handle(
            &self,
            conn: &mut PgConnection,
            event: OrderPlaced,
            _d: &Delivery,
        ) -> Result<(), HandlerError> {
            sqlx::query("INSERT INTO applied (consumer, order_id) VALUES ('batch', $1)")
                .bind(&event.order_id)
                .execute(&mut *conn)
                .await
                .map_err(HandlerError::retry)?;
            if event.order_id == "bad" {
                return Err(HandlerError::permanent(std::io::Error::other("bad order")));
            }
            Ok(())
        }
    }
    for id in ["a", "b", "bad", "c", "d"] {
        publish(&env.js, &order_envelope(id)).await;
    }
    let running = start(
        &env,
        env.js.clone(),
        ConsumerConfig {
            mode: Mode::Batched { max_messages: 10 },
            concurrency: 1,
            ..config("batch")
        },
        typed(Picky),
    );
    let pool = env.pool.clone();
    wait_until(
        Duration::from_secs(10),
        "four applied and one parked",
        || async {
            applied(&pool, "batch").await == 4
                && count(&pool, "SELECT count(*) FROM dead_letter").await == 1
        },
    )
    .await
    .expect("processed");
    running.stop().await;
    let bad: i64 = sqlx::query_scalar("SELECT count(*) FROM applied WHERE order_id = 'bad'")
        .fetch_one(&env.pool)
        .await
        .expect("count");
    assert_eq!(
        bad, 0,
        "the failing handler's write was rolled back to its savepoint"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_the_database_refuses_is_redelivered_and_does_not_undo_its_batch() {
    let env = env().await;
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_dead_letter() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.reason = 'rejected' THEN RAISE EXCEPTION 'refused for the test'; END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER refuse_dead_letter BEFORE INSERT ON dead_letter
             FOR EACH ROW EXECUTE FUNCTION refuse_dead_letter();",
    )
    .execute(&env.pool)
    .await
    .expect("trigger");
    let mut orders: Vec<String> = (0..6).map(|i| format!("kept-{i}")).collect();
    orders.insert(3, "bad".to_owned());
    let envelopes: Vec<Envelope> = orders.iter().map(|id| order_envelope(id)).collect();
    for envelope in &envelopes {
        publish(&env.js, envelope).await;
    }
    let handler = BulkApply::default();
    let consumer = Consumer::with_batch_handler(
        ConsumerConfig {
            mode: Mode::Batched { max_messages: 50 },
            concurrency: 1,
            retry_max_delay: Duration::from_millis(300),
            ..config("refused")
        },
        env.pool.clone(),
        env.js.clone(),
        inbox::typed_batch(handler.clone()),
    )
    .expect("valid config");
    let running = run(consumer);
    let pool = env.pool.clone();
    // The good messages commit although the bad one's dead letter is refused in their
    // transaction; the bad one is redelivered (it keeps failing: more handler calls).
    wait_until(
        Duration::from_secs(15),
        "six applied while the bad one is redelivered",
        || async {
            applied(&pool, "bulk").await == 6
                && handler.batch_sizes.lock().expect("lock").len() >= 10
        },
    )
    .await
    .expect("not undone");
    assert_eq!(
        count(&env.pool, "SELECT count(*) FROM dead_letter").await,
        0
    );
    sqlx::raw_sql("DROP TRIGGER refuse_dead_letter ON dead_letter")
        .execute(&env.pool)
        .await
        .expect("drop trigger");
    wait_until(Duration::from_secs(15), "the bad one parked", || async {
        count(
            &pool,
            "SELECT count(*) FROM dead_letter WHERE reason = 'rejected'",
        )
        .await
            == 1
            && ack_state(&env.js, "refused").await == Some((7, 0))
    })
    .await
    .expect("parked");
    running.stop().await;
    assert_eq!(applied(&env.pool, "bulk").await, 6, "each good order once");
}

/// Applies a whole batch with one multi-row insert, recording each call's size; a batch
/// holding the order "bad" fails permanently after writing.
#[derive(Clone, Default)]
struct BulkApply {
    batch_sizes: Arc<Mutex<Vec<usize>>>,
}

impl inbox::BatchHandler<OrderPlaced> for BulkApply {
    async fn handle_batch(
        &self,
        conn: &mut PgConnection,
        events: Vec<(OrderPlaced, &Delivery)>,
    ) -> Result<(), HandlerError> {
        self.batch_sizes.lock().expect("lock").push(events.len());
        let ids: Vec<String> = events.iter().map(|(e, _)| e.order_id.clone()).collect();
        sqlx::query("INSERT INTO applied (consumer, order_id) SELECT 'bulk', unnest($1::text[])")
            .bind(&ids)
            .execute(&mut *conn)
            .await
            .map_err(HandlerError::retry)?;
        if ids.iter().any(|id| id == "bad") {
            return Err(HandlerError::permanent_because(
                "rejected",
                std::io::Error::other("bad order"),
            ));
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_handler_takes_whole_batches_and_a_failure_is_isolated() {
    let env = env().await;
    let mut orders: Vec<String> = (0..20).map(|i| format!("bulk-{i}")).collect();
    orders.insert(7, "bad".to_owned());
    let envelopes: Vec<Envelope> = orders.iter().map(|id| order_envelope(id)).collect();
    for envelope in &envelopes {
        publish(&env.js, envelope).await;
    }
    // A message delivered twice: its second copy must not reach the handler.
    publish_copy(&env.js, &envelopes[3], "bulk-3-again").await;
    let handler = BulkApply::default();
    let consumer = Consumer::with_batch_handler(
        ConsumerConfig {
            mode: Mode::Batched { max_messages: 50 },
            concurrency: 1,
            ..config("bulk")
        },
        env.pool.clone(),
        env.js.clone(),
        inbox::typed_batch(handler.clone()),
    )
    .expect("valid config")
    .layer(inbox::layer::Timing)
    .layer(inbox::layer::Logging);
    let running = run(consumer);
    let pool = env.pool.clone();
    wait_until(
        Duration::from_secs(15),
        "twenty applied, one parked, every delivery acknowledged",
        || async {
            applied(&pool, "bulk").await == 20
                && count(&pool, "SELECT count(*) FROM dead_letter").await == 1
                && ack_state(&env.js, "bulk").await == Some((22, 0))
        },
    )
    .await
    .expect("processed");
    running.stop().await;

    let applied_ids: Vec<String> = sqlx::query_scalar(
        "SELECT order_id FROM applied WHERE consumer = 'bulk' ORDER BY order_id",
    )
    .fetch_all(&env.pool)
    .await
    .expect("applied");
    let mut expected: Vec<String> = orders.into_iter().filter(|id| id != "bad").collect();
    expected.sort();
    assert_eq!(
        applied_ids, expected,
        "each good order once, the bad one rolled back"
    );
    let (reason, message_id): (String, String) =
        sqlx::query_as("SELECT reason, message_id FROM dead_letter")
            .fetch_one(&env.pool)
            .await
            .expect("dead letter");
    assert_eq!(reason, "rejected");
    assert_eq!(message_id, envelopes[7].id.to_string());
    let sizes = handler.batch_sizes.lock().expect("lock").clone();
    assert!(
        sizes.iter().any(|&n| n > 1),
        "the handler was given whole batches: {sizes:?}"
    );
}

/// A user's layer that only knows single messages: counts the messages it sees.
struct CountingLayer(Arc<AtomicUsize>);

struct Counting {
    inner: Arc<dyn inbox::RawHandler>,
    seen: Arc<AtomicUsize>,
}

impl inbox::Layer for CountingLayer {
    fn layer(&self, inner: Arc<dyn inbox::RawHandler>) -> Arc<dyn inbox::RawHandler> {
        Arc::new(Counting {
            inner,
            seen: self.0.clone(),
        })
    }
}

impl inbox::RawHandler for Counting {
    fn handle<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        delivery: &'a Delivery,
    ) -> inbox::handler::HandlerFuture<'a> {
        self.seen.fetch_add(1, Ordering::SeqCst);
        self.inner.handle(conn, delivery)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_without_batch_support_sees_every_message_of_a_batch() {
    let env = env().await;
    let envelopes: Vec<Envelope> = (0..12)
        .map(|i| order_envelope(&format!("layered-{i}")))
        .collect();
    for envelope in &envelopes {
        publish(&env.js, envelope).await;
    }
    let handler = BulkApply::default();
    let seen = Arc::new(AtomicUsize::new(0));
    let consumer = Consumer::with_batch_handler(
        ConsumerConfig {
            mode: Mode::Batched { max_messages: 50 },
            concurrency: 1,
            ..config("layered")
        },
        env.pool.clone(),
        env.js.clone(),
        inbox::typed_batch(handler.clone()),
    )
    .expect("valid config")
    .layer(CountingLayer(seen.clone()));
    let running = run(consumer);
    wait_until(
        Duration::from_secs(15),
        "every order applied and acknowledged",
        || async { ack_state(&env.js, "layered").await == Some((12, 0)) },
    )
    .await
    .expect("processed");
    running.stop().await;
    // The batch went through the layer one message at a time, each exactly once.
    assert_eq!(seen.load(Ordering::SeqCst), 12);
    let sizes = handler.batch_sizes.lock().expect("lock").clone();
    assert_eq!(sizes, vec![1; 12], "one message per call through the layer");
    let applied: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT order_id) FROM applied WHERE consumer = 'bulk' AND order_id LIKE 'layered-%'",
    )
    .fetch_one(&env.pool)
    .await
    .expect("count");
    assert_eq!(applied, 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_mode_runs_a_message_present_twice_in_one_batch_once() {
    let env = env().await;
    let handler = Recorder::new("batchdup", Behaviour::Succeed);
    // Two copies of one message (another broker id each time) and a second message, all in
    // the stream before the consumer starts, so they arrive in one batch.
    let envelope = order_envelope("o-dup");
    publish(&env.js, &envelope).await;
    publish_copy(&env.js, &envelope, "copy-in-the-same-batch").await;
    publish(&env.js, &order_envelope("o-other")).await;
    let running = start(
        &env,
        env.js.clone(),
        ConsumerConfig {
            mode: Mode::Batched { max_messages: 10 },
            concurrency: 1,
            ..config("batchdup")
        },
        typed(handler.clone()),
    );
    wait_until(
        Duration::from_secs(10),
        "all three deliveries acknowledged",
        || async { ack_state(&env.js, "batchdup").await == Some((3, 0)) },
    )
    .await
    .expect("acked");
    running.stop().await;
    assert_eq!(handler.calls(), 2, "one call per distinct message");
    assert_eq!(applied(&env.pool, "batchdup").await, 2);
}
