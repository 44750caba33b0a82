//! The inbox consumer against real PostgreSQL and nats-server.

mod common;

use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::{HeaderMap, HeaderName, HeaderValue};
use common::*;
use envelope::Envelope;
use inbox::{Consumer, ConsumerConfig, Delivery, Handler, HandlerError, Mode, typed};
use sqlx::{PgConnection, PgPool};
use testkit::{Postgres, TcpProxy, wait_until};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Behaviour {
    Succeed,
    Retry,
    FailPermanently,
}

/// Inserts one `applied` row per handled order, or fails as told; counts calls and their times.
#[derive(Clone)]
struct Recorder {
    name: &'static str,
    behaviour: Arc<Mutex<Behaviour>>,
    calls: Arc<AtomicUsize>,
    call_times: Arc<Mutex<Vec<Instant>>>,
}

impl Recorder {
    fn new(name: &'static str, behaviour: Behaviour) -> Self {
        Recorder {
            name,
            behaviour: Arc::new(Mutex::new(behaviour)),
            calls: Arc::default(),
            call_times: Arc::default(),
        }
    }
    fn set(&self, behaviour: Behaviour) {
        *self.behaviour.lock().expect("lock") = behaviour;
    }
    fn calls(&self) -> usize {
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

fn config(name: &str) -> ConsumerConfig {
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
fn start(
    env: &Env,
    js: jetstream::Context,
    config: ConsumerConfig,
    handler: Arc<dyn inbox::RawHandler>,
) -> Running {
    run(Consumer::new(config, env.pool.clone(), js, handler).expect("valid config"))
}

/// Publishes `envelope` again under another `Nats-Msg-Id`, so JetStream stores a second
/// copy (what a republish after the duplicate window looks like).
async fn publish_copy(js: &jetstream::Context, envelope: &Envelope, broker_id: &str) {
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
async fn ack_state(js: &jetstream::Context, consumer: &str) -> Option<(u64, usize)> {
    let mut c = js
        .get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(
            consumer, "ORDERS",
        )
        .await
        .ok()?;
    let info = c.info().await.ok()?;
    Some((info.ack_floor.stream_sequence, info.num_ack_pending))
}

async fn count(pool: &PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.expect(sql)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_delivered_twice_runs_its_handler_once() {
    let env = env().await;
    let handler = Recorder::new("billing", Behaviour::Succeed);
    let running = start(
        &env,
        env.js.clone(),
        config("billing"),
        typed(handler.clone()),
    );
    let envelope = order_envelope("o-1");
    publish(&env.js, &envelope).await;
    // The same message again under another broker id: what a republish after the duplicate
    // window looks like. JetStream stores it; the inbox must skip it.
    publish_copy(&env.js, &envelope, "another-broker-id").await;
    wait_until(
        Duration::from_secs(10),
        "both deliveries acknowledged",
        || async { ack_state(&env.js, "billing").await == Some((2, 0)) },
    )
    .await
    .expect("acked");
    running.stop().await;
    assert_eq!(handler.calls(), 1, "the handler ran once");
    assert_eq!(
        applied(&env.pool, "billing").await,
        1,
        "its effect applied once"
    );
    assert_eq!(
        count(&env.pool, "SELECT count(*) FROM inbox_message").await,
        1
    );
}

/// Runs the recorder, then cuts the consumer's link to the broker: the transaction still
/// commits (PostgreSQL is reached directly) but the ack that follows cannot arrive.
struct CutAfterHandling {
    recorder: Recorder,
    proxy: Arc<TcpProxy>,
}

impl Handler<OrderPlaced> for CutAfterHandling {
    async fn handle(
        &self,
        conn: &mut PgConnection,
        event: OrderPlaced,
        delivery: &Delivery,
    ) -> Result<(), HandlerError> {
        let result = self.recorder.handle(conn, event, delivery).await;
        self.proxy.cut();
        result
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_killed_between_commit_and_ack_does_not_apply_twice() {
    let env = env().await;
    let proxy = Arc::new(TcpProxy::start(env.nats.addr()).await.expect("proxy"));
    let proxied = jetstream::new(
        async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(format!("nats://{}", proxy.addr()))
            .await
            .expect("connect through proxy"),
    );
    let recorder = Recorder::new("shipping", Behaviour::Succeed);
    let cutting = CutAfterHandling {
        recorder: recorder.clone(),
        proxy: proxy.clone(),
    };
    let first = start(&env, proxied, config("shipping"), typed(cutting));
    publish(&env.js, &order_envelope("o-7")).await;
    let pool = env.pool.clone();
    wait_until(
        Duration::from_secs(10),
        "the effect is committed",
        || async { applied(&pool, "shipping").await == 1 },
    )
    .await
    .expect("committed");
    // The consumer goes away with its ack undelivered.
    first.stop().await;
    let floor = ack_state(&env.js, "shipping")
        .await
        .expect("consumer info")
        .0;
    assert_eq!(floor, 0, "the broker never got the ack");

    let second = start(
        &env,
        env.js.clone(),
        config("shipping"),
        typed(recorder.clone()),
    );
    wait_until(
        Duration::from_secs(15),
        "the redelivery is acknowledged",
        || async {
            ack_state(&env.js, "shipping")
                .await
                .is_some_and(|(floor, _)| floor == 1)
        },
    )
    .await
    .expect("acked");
    second.stop().await;
    assert_eq!(
        applied(&env.pool, "shipping").await,
        1,
        "the effect is applied once"
    );
    assert_eq!(recorder.calls(), 1, "the handler did not run again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_handler_is_retried_with_growing_delays_then_dead_lettered() {
    let env = env().await;
    let handler = Recorder::new("invoicing", Behaviour::Retry);
    let running = start(
        &env,
        env.js.clone(),
        config("invoicing"),
        typed(handler.clone()),
    );
    let envelope = order_envelope("o-3");
    publish(&env.js, &envelope).await;
    let pool = env.pool.clone();
    wait_until(Duration::from_secs(20), "dead-lettered", || async {
        count(&pool, "SELECT count(*) FROM dead_letter").await == 1
    })
    .await
    .expect("parked");
    running.stop().await;

    assert_eq!(handler.calls(), 4, "max_attempts deliveries");
    assert_eq!(
        applied(&env.pool, "invoicing").await,
        0,
        "failed attempts left no effect"
    );
    let times = handler.call_times.lock().expect("lock").clone();
    let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps[0] >= Duration::from_millis(100),
        "first retry waits the minimum delay: {gaps:?}"
    );
    // Delays are exponential with jitter: [100, 200) ms, [200, 400) ms, [400, 800) ms. Adjacent
    // ranges touch, so compare the last with the first, which cannot overlap.
    assert!(
        gaps[2] > gaps[0] && gaps[2] >= Duration::from_millis(400),
        "delays grow: {gaps:?}"
    );
    let (reason, attempts, payload, message_id): (String, i32, Vec<u8>, String) =
        sqlx::query_as("SELECT reason, attempts, payload, message_id FROM dead_letter")
            .fetch_one(&env.pool)
            .await
            .expect("dead letter");
    assert_eq!((reason.as_str(), attempts), ("attempts_exhausted", 4));
    assert_eq!(payload, envelope.payload.to_vec());
    assert_eq!(message_id, envelope.id.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_message_is_dead_lettered_at_once_with_its_bytes() {
    let env = env().await;
    let handler = Recorder::new("audit", Behaviour::Succeed);
    let running = start(
        &env,
        env.js.clone(),
        config("audit"),
        typed(handler.clone()),
    );
    let mut headers = HeaderMap::new();
    headers.insert(
        HeaderName::from_str("Nats-Msg-Id").expect("name"),
        HeaderValue::from_str("raw-1").expect("v"),
    );
    env.js
        .publish_with_headers(
            "orders.garbage",
            headers,
            bytes::Bytes::from_static(b"\xff\xfenot json"),
        )
        .await
        .expect("publish")
        .await
        .expect("ack");
    // And a well-formed envelope whose payload is not an OrderPlaced.
    let mut wrong = order_envelope("o-4");
    wrong.payload = bytes::Bytes::from_static(b"{\"unexpected\":true}");
    publish(&env.js, &wrong).await;
    // And garbage with a subject and a broker id longer than an index entry can hold.
    let long_subject = format!("orders.long.{}", random_hex(3000));
    let mut headers = HeaderMap::new();
    headers.insert(
        HeaderName::from_str("Nats-Msg-Id").expect("name"),
        HeaderValue::from_str(&random_hex(4000)).expect("v"),
    );
    let long_ack = env
        .js
        .publish_with_headers(
            long_subject.clone(),
            headers,
            bytes::Bytes::from_static(b"?"),
        )
        .await
        .expect("publish")
        .await
        .expect("ack");
    let pool = env.pool.clone();
    wait_until(Duration::from_secs(10), "all three parked", || async {
        count(&pool, "SELECT count(*) FROM dead_letter").await == 3
    })
    .await
    .expect("parked");
    let (long_id, long_subject_kept): (String, String) = sqlx::query_as(
        "SELECT message_id, subject FROM dead_letter WHERE subject LIKE 'orders.long.%'",
    )
    .fetch_one(&env.pool)
    .await
    .expect("the long one");
    assert_eq!(
        long_id,
        format!("ORDERS:{}", long_ack.sequence),
        "keyed by stream position"
    );
    assert_eq!(
        long_subject_kept,
        long_subject[..255],
        "subject cut to 255 characters"
    );
    running.stop().await;
    let row = |id: String| {
        let pool = env.pool.clone();
        async move {
            sqlx::query_as::<_, (String, i32, Vec<u8>)>(
                "SELECT reason, attempts, payload FROM dead_letter WHERE message_id = $1",
            )
            .bind(id)
            .fetch_one(&pool)
            .await
            .expect("dead letter")
        }
    };
    let raw = row("raw-1".into()).await;
    assert_eq!((raw.0.as_str(), raw.1), ("decode", 1));
    assert_eq!(raw.2, b"\xff\xfenot json".to_vec(), "raw bytes kept");
    let typed_wrong = row(wrong.id.to_string()).await;
    assert_eq!((typed_wrong.0.as_str(), typed_wrong.1), ("decode", 1));
    assert_eq!(typed_wrong.2, wrong.payload.to_vec());
    assert_eq!(handler.calls(), 0, "the handler never saw them");
}

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

/// `chars` hexadecimal characters that do not compress (xorshift64).
fn random_hex(chars: usize) -> String {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_retry_runs_only_the_failed_consumer_once_inside_and_after_the_duplicate_window() {
    let window = Duration::from_secs(3);
    let env = env_with_duplicate_window(window).await;
    let failing = Recorder::new("email", Behaviour::FailPermanently);
    let healthy = Recorder::new("analytics", Behaviour::Succeed);
    let email = start(
        &env,
        env.js.clone(),
        config("email"),
        typed(failing.clone()),
    );
    let analytics = start(
        &env,
        env.js.clone(),
        config("analytics"),
        typed(healthy.clone()),
    );
    let early = order_envelope("o-early");
    let late = order_envelope("o-late");
    let published_at = Instant::now();
    publish(&env.js, &early).await;
    publish(&env.js, &late).await;
    let pool = env.pool.clone();
    wait_until(
        Duration::from_secs(10),
        "email parked both, analytics handled both",
        || async {
            count(
                &pool,
                "SELECT count(*) FROM dead_letter WHERE consumer = 'email'",
            )
            .await
                == 2
                && applied(&pool, "analytics").await == 2
        },
    )
    .await
    .expect("first pass");
    failing.set(Behaviour::Succeed);

    // Inside the duplicate window: retry the first.
    assert!(
        published_at.elapsed() < window,
        "still inside the duplicate window"
    );
    request_retry(&env.pool, &early).await;
    wait_until(Duration::from_secs(10), "early retried", || async {
        count(
            &pool,
            "SELECT count(*) FROM dead_letter WHERE status = 'retried'",
        )
        .await
            == 1
    })
    .await
    .expect("retried inside the window");

    // After the window: retry the second.
    wait_until(window * 3, "the duplicate window has passed", || async {
        published_at.elapsed() > window * 2
    })
    .await
    .expect("time passes");
    request_retry(&env.pool, &late).await;
    wait_until(Duration::from_secs(10), "late retried", || async {
        count(
            &pool,
            "SELECT count(*) FROM dead_letter WHERE status = 'retried'",
        )
        .await
            == 2
    })
    .await
    .expect("retried after the window");
    email.stop().await;
    analytics.stop().await;

    assert_eq!(
        applied(&env.pool, "email").await,
        2,
        "each retry took effect once"
    );
    assert_eq!(failing.calls(), 4, "two failed deliveries, two retries");
    assert_eq!(healthy.calls(), 2, "the other consumer did not run again");
    assert_eq!(applied(&env.pool, "analytics").await, 2);
    let outcomes: Vec<String> =
        sqlx::query_scalar("SELECT outcome FROM inbox_message WHERE consumer = 'email'")
            .fetch_all(&env.pool)
            .await
            .expect("inbox");
    assert_eq!(outcomes, ["processed", "processed"]);
    let history: serde_json::Value =
        sqlx::query_scalar("SELECT history FROM dead_letter WHERE message_id = $1")
            .bind(early.id.to_string())
            .fetch_one(&env.pool)
            .await
            .expect("history");
    let actions: Vec<&str> = history
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|h| h["action"].as_str())
        .collect();
    assert_eq!(actions, ["failed", "retry_requested", "retried"]);
}

async fn request_retry(pool: &PgPool, envelope: &Envelope) {
    let id: i64 = sqlx::query_scalar(
        "SELECT id FROM dead_letter WHERE consumer = 'email' AND message_id = $1",
    )
    .bind(envelope.id.to_string())
    .fetch_one(pool)
    .await
    .expect("dead letter");
    let changed = dlq::store::request_retry(&mut pool.acquire().await.expect("acquire"), &[id])
        .await
        .expect("request retry");
    assert_eq!(changed, 1);
}

/// Waits for a go-ahead before succeeding.
struct Gated {
    recorder: Recorder,
    started: Arc<tokio::sync::Notify>,
    go: Arc<tokio::sync::Notify>,
}

impl Handler<OrderPlaced> for Gated {
    async fn handle(
        &self,
        conn: &mut PgConnection,
        event: OrderPlaced,
        delivery: &Delivery,
    ) -> Result<(), HandlerError> {
        self.started.notify_one();
        self.go.notified().await;
        self.recorder.handle(conn, event, delivery).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_the_handler_in_progress_commit_and_ack() {
    let env = env().await;
    let recorder = Recorder::new("ledger", Behaviour::Succeed);
    let started = Arc::new(tokio::sync::Notify::new());
    let go = Arc::new(tokio::sync::Notify::new());
    let handler = Gated {
        recorder: recorder.clone(),
        started: started.clone(),
        go: go.clone(),
    };
    let mut running = start(
        &env,
        env.js.clone(),
        ConsumerConfig {
            concurrency: 1,
            ack_wait: Duration::from_secs(30),
            ..config("ledger")
        },
        typed(handler),
    );
    publish(&env.js, &order_envelope("o-10")).await;
    tokio::time::timeout(Duration::from_secs(10), started.notified())
        .await
        .expect("handler started");
    running.ask_to_stop(); // shutdown requested while the handler is in progress
    go.notify_one();
    running.stop().await;
    assert_eq!(
        applied(&env.pool, "ledger").await,
        1,
        "the in-progress handler committed"
    );
    let floor = ack_state(&env.js, "ledger").await.expect("consumer info").0;
    assert_eq!(
        floor, 1,
        "and its ack reached the broker before run() returned"
    );
}

#[tokio::test]
async fn the_inbox_cleaner_deletes_only_rows_past_the_retention() {
    let pg = Postgres::start().await.expect("PostgreSQL");
    let pool = PgPool::connect(&pg.fresh_database().await.expect("db"))
        .await
        .expect("connect");
    migrations::migrate(&mut pool.acquire().await.expect("acquire"))
        .await
        .expect("migrate");
    let mut conn = pool.acquire().await.expect("acquire");
    for (consumer, id, age_hours) in [
        ("billing", "old", 48),
        ("billing", "new", 1),
        ("email", "old", 48),
    ] {
        sqlx::query(
            "INSERT INTO inbox_message (consumer, message_id, subject, received_at)
             VALUES ($1, $2, 's', now() - make_interval(hours => $3))",
        )
        .bind(consumer)
        .bind(id)
        .bind(age_hours)
        .execute(&mut *conn)
        .await
        .expect("seed");
    }
    assert!(
        inbox::store::insert_if_new(
            &mut conn,
            "billing",
            "new",
            "s",
            None,
            inbox::store::Outcome::Processed,
        )
        .await
        .is_ok_and(|new| !new)
    );
    let deleted =
        inbox::store::delete_older_than(&mut conn, "billing", Duration::from_secs(24 * 3600), 100)
            .await
            .expect("clean");
    assert_eq!(deleted, 1, "only billing's row older than a day");
    let left: Vec<(String, String)> =
        sqlx::query_as("SELECT consumer, message_id FROM inbox_message ORDER BY 1, 2")
            .fetch_all(&mut *conn)
            .await
            .expect("rows");
    assert_eq!(
        left,
        [
            ("billing".into(), "new".into()),
            ("email".into(), "old".into())
        ]
    );
}

#[tokio::test]
async fn a_pool_smaller_than_the_lanes_need_is_refused() {
    let env = env().await;
    let small = sqlx::postgres::PgPoolOptions::new()
        .max_connections(5)
        .connect_lazy_with(env.pool.connect_options().as_ref().clone());
    struct Noop;
    impl Handler<OrderPlaced> for Noop {
        async fn handle(
            &self,
            _: &mut PgConnection,
            _: OrderPlaced,
            _: &Delivery,
        ) -> Result<(), HandlerError> {
            Ok(())
        }
    }
    let refused = Consumer::new(config("small"), small, env.js.clone(), typed(Noop));
    let Err(inbox::Error::Config(reason)) = refused else {
        panic!("a 5-connection pool for 8 lanes must be refused");
    };
    assert!(reason.contains("needs at least 10"), "{reason}");
    let fits = sqlx::postgres::PgPoolOptions::new()
        .max_connections(3)
        .connect_lazy_with(env.pool.connect_options().as_ref().clone());
    Consumer::new(
        ConsumerConfig {
            concurrency: 1,
            ..config("small")
        },
        fits,
        env.js.clone(),
        typed(Noop),
    )
    .expect("one lane fits in three connections");
}
