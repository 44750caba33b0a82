//! What surrounds the handler, against real PostgreSQL and nats-server: the durable
//! JetStream consumer's settings (the broker must never give up on a message before the inbox
//! dead-letters it), and handlers that panic (caught, retried, dead-lettered with reason
//! `panic`; `run()` never stops quietly).

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::consumer::{AckPolicy, pull};
use common::*;
use inbox::{
    BatchHandler, Consumer, ConsumerConfig, Delivery, Handler, HandlerError, Mode, typed,
    typed_batch,
};
use sqlx::PgConnection;
use testkit::wait_until;

const MAX_ATTEMPTS: u32 = 4;

fn config(name: &str) -> ConsumerConfig {
    ConsumerConfig {
        filter_subjects: vec!["orders.>".into()],
        ack_wait: Duration::from_secs(1),
        retry_min_delay: Duration::from_millis(100),
        retry_max_delay: Duration::from_secs(2),
        retry_poll_interval: Duration::from_millis(50),
        max_attempts: MAX_ATTEMPTS,
        ..ConsumerConfig::new(name, "ORDERS")
    }
}

/// Inserts one `applied` row per order; panics (after writing, so the write must be rolled
/// back) for `bomb`.
#[derive(Clone)]
struct PanicsOn {
    consumer: &'static str,
    bomb: &'static str,
    bomb_calls: Arc<AtomicUsize>,
    /// While false the bomb is refused permanently instead of panicking.
    panicking: Arc<std::sync::atomic::AtomicBool>,
}

impl PanicsOn {
    fn new(consumer: &'static str, bomb: &'static str) -> Self {
        PanicsOn {
            consumer,
            bomb,
            bomb_calls: Arc::default(),
            panicking: Arc::new(true.into()),
        }
    }

    fn explode_if_bomb(&self, order_id: &str) -> Result<(), HandlerError> {
        if order_id != self.bomb {
            return Ok(());
        }
        self.bomb_calls.fetch_add(1, Ordering::SeqCst);
        if self.panicking.load(Ordering::SeqCst) {
            panic!("handler bug: cannot handle order {order_id}");
        }
        Err(HandlerError::permanent_because(
            "rejected",
            std::io::Error::other("rejected"),
        ))
    }
}

impl Handler<OrderPlaced> for PanicsOn {
    async fn handle(
        &self,
        conn: &mut PgConnection,
        event: OrderPlaced,
        _delivery: &Delivery,
    ) -> Result<(), HandlerError> {
        sqlx::query("INSERT INTO applied (consumer, order_id) VALUES ($1, $2)")
            .bind(self.consumer)
            .bind(&event.order_id)
            .execute(&mut *conn)
            .await
            .map_err(HandlerError::retry)?;
        self.explode_if_bomb(&event.order_id)
    }
}

impl BatchHandler<OrderPlaced> for PanicsOn {
    async fn handle_batch(
        &self,
        conn: &mut PgConnection,
        events: Vec<(OrderPlaced, &Delivery)>,
    ) -> Result<(), HandlerError> {
        let ids: Vec<String> = events.into_iter().map(|(e, _)| e.order_id).collect();
        sqlx::query("INSERT INTO applied (consumer, order_id) SELECT $1, unnest($2::text[])")
            .bind(self.consumer)
            .bind(&ids)
            .execute(&mut *conn)
            .await
            .map_err(HandlerError::retry)?;
        for id in &ids {
            self.explode_if_bomb(id)?;
        }
        Ok(())
    }
}

/// Counters recorded through the `metrics` facade by every consumer of this test binary,
/// by (metric name, `consumer` label). Installed once, before the first consumer runs.
fn counters() -> &'static Counters {
    static COUNTERS: OnceLock<&'static Counters> = OnceLock::new();
    COUNTERS.get_or_init(|| {
        let counters: &'static Counters = Box::leak(Box::default());
        metrics::set_global_recorder(CountersRecorder(counters)).expect("the only recorder");
        counters
    })
}

#[derive(Default)]
struct Counters(Mutex<HashMap<(String, String), Arc<Count>>>);

impl Counters {
    fn get(&self, name: &str, consumer: &str) -> u64 {
        self.0
            .lock()
            .expect("lock")
            .get(&(name.to_owned(), consumer.to_owned()))
            .map_or(0, |c| c.0.load(Ordering::SeqCst))
    }
}

#[derive(Default)]
struct Count(AtomicU64);

impl metrics::CounterFn for Count {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::SeqCst);
    }
    fn absolute(&self, value: u64) {
        self.0.fetch_max(value, Ordering::SeqCst);
    }
}

struct CountersRecorder(&'static Counters);

impl metrics::Recorder for CountersRecorder {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        let consumer = key
            .labels()
            .find(|l| l.key() == "consumer")
            .map(|l| l.value().to_owned())
            .unwrap_or_default();
        let count = self
            .0
            .0
            .lock()
            .expect("lock")
            .entry((key.name().to_owned(), consumer))
            .or_default()
            .clone();
        metrics::Counter::from_arc(count)
    }
    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }
    fn register_histogram(
        &self,
        _: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}

/// The documented metric name (a dashboard contract, so spelled out here).
const HANDLER_PANICS: &str = "inbox_handler_panics_total";

// ---------------------------------------------------------------------------------------
// Item 6: the durable consumer's settings.
// ---------------------------------------------------------------------------------------

/// Creates the durable `name` the way an operator (or an older version) might have: the
/// inbox's subjects and explicit acks, `ack_wait` 1 s, unlimited deliveries, then `edit`.
async fn precreate(js: &jetstream::Context, name: &str, edit: impl FnOnce(&mut pull::Config)) {
    let mut wanted = pull::Config {
        durable_name: Some(name.into()),
        filter_subject: "orders.>".into(),
        ack_policy: AckPolicy::Explicit,
        ack_wait: Duration::from_secs(1),
        max_deliver: -1,
        ..Default::default()
    };
    edit(&mut wanted);
    js.get_stream("ORDERS")
        .await
        .expect("stream")
        .create_consumer(wanted)
        .await
        .expect("durable created beforehand");
}

async fn broker_config(js: &jetstream::Context, name: &str) -> jetstream::consumer::Config {
    js.get_stream("ORDERS")
        .await
        .expect("stream")
        .consumer_info(name)
        .await
        .expect("consumer info")
        .config
}

/// Asserts that both `ensure()` and `run()` refuse the durable `name` with
/// `Error::JetStream`, that nothing was handled, and returns the reason.
async fn refusal(env: &Env, name: &'static str) -> String {
    let handler = PanicsOn::new(name, "none");
    let consumer = || {
        Consumer::new(
            config(name),
            env.pool.clone(),
            env.js.clone(),
            typed(handler.clone()),
        )
        .expect("valid config")
    };
    publish(&env.js, &order_envelope("o-1")).await;
    let reason = match consumer().ensure().await {
        Err(inbox::Error::JetStream { consumer, reason }) => {
            assert_eq!(consumer, name);
            reason
        }
        Err(other) => panic!("ensure() failed with another error than JetStream: {other}"),
        Ok(_) => panic!(
            "ensure() accepted the durable {name} whose settings let the broker give up on a message before the inbox dead-letters it"
        ),
    };
    let ran = tokio::time::timeout(
        Duration::from_secs(10),
        consumer().run(std::future::pending()),
    )
    .await
    .expect("run() refuses at once instead of consuming");
    match ran {
        Err(inbox::Error::JetStream { reason: again, .. }) => assert_eq!(again, reason),
        other => panic!("run() must refuse like ensure(), returned {other:?}"),
    }
    assert_eq!(applied(&env.pool, name).await, 0, "nothing was handled");
    reason
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_durable_with_a_max_deliver_is_refused() {
    let env = env().await;
    precreate(&env.js, "billing", |c| c.max_deliver = 2).await;
    let reason = refusal(&env, "billing").await;
    for needle in [
        "max_deliver is 2",
        "must be -1 (unlimited)",
        "max_attempts (4)",
        "nats consumer edit ORDERS billing",
        "--max-deliver=-1",
    ] {
        assert!(reason.contains(needle), "{needle:?} not in: {reason}");
    }
    assert!(
        !reason.contains("ack_wait is"),
        "only what differs: {reason}"
    );
    assert_eq!(
        broker_config(&env.js, "billing").await.max_deliver,
        2,
        "a refused durable is left as it is"
    );
}

/// Settings that do not make the broker give up, but lose messages all the same: payloads
/// not delivered (every message would be parked as undecodable, without its bytes), a
/// durable deleted after a quiet spell (recreated from the stream's start, it would run
/// handlers again for messages whose inbox rows were cleaned).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_durable_that_drops_payloads_or_expires_is_refused() {
    let env = env().await;
    precreate(&env.js, "headers", |c| c.headers_only = true).await;
    let reason = refusal(&env, "headers").await;
    assert!(reason.contains("headers_only"), "{reason}");
    precreate(&env.js, "expiring", |c| {
        c.inactive_threshold = Duration::from_secs(3600);
    })
    .await;
    let reason = refusal(&env, "expiring").await;
    assert!(reason.contains("inactive_threshold is 3600s"), "{reason}");
    assert!(
        reason.contains("--deliver 1") && reason.contains("ack floor"),
        "says how to recreate it where it stands: {reason}"
    );
}

/// A durable whose pulls are limited to fewer messages than the consumer asks for: the
/// consumer asks for no more, instead of having every pull refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_durable_with_a_small_max_batch_is_pulled_within_it() {
    let env = env().await;
    let name = "small-pulls";
    precreate(&env.js, name, |c| c.max_batch = 8).await;
    for i in 0..40 {
        publish(&env.js, &order_envelope(&format!("o-{i}"))).await;
    }
    let handler = PanicsOn::new(name, "none");
    let consumer = Consumer::new(
        config(name),
        env.pool.clone(),
        env.js.clone(),
        typed(handler),
    )
    .expect("valid config");
    let health = consumer.health();
    let running = run(consumer);
    wait_until(Duration::from_secs(20), "all applied", || async {
        applied(&env.pool, name).await == 40
    })
    .await
    .expect("consumed within the durable's pull limit");
    assert!(health.report().pulling, "{:?}", health.report());
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_durable_with_another_ack_wait_is_refused() {
    let env = env().await;
    precreate(&env.js, "shipping", |c| c.ack_wait = Duration::from_secs(5)).await;
    let reason = refusal(&env, "shipping").await;
    for needle in [
        "ack_wait is 5s",
        "must be 1s",
        "nats consumer edit ORDERS shipping",
        "--wait=1s",
    ] {
        assert!(reason.contains(needle), "{needle:?} not in: {reason}");
    }
    assert!(
        !reason.contains("max_deliver is"),
        "only what differs: {reason}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_durable_with_a_broker_backoff_is_refused() {
    let env = env().await;
    // The server uses the first backoff step as the ack wait: keep it the configured 1 s so
    // that only the backoff differs.
    precreate(&env.js, "audit", |c| {
        c.backoff = vec![Duration::from_secs(1), Duration::from_secs(4)];
    })
    .await;
    let reason = refusal(&env, "audit").await;
    for needle in [
        "backoff is [1s, 4s]",
        "must be empty",
        "nats consumer edit ORDERS audit",
        "--backoff=none",
    ] {
        assert!(reason.contains(needle), "{needle:?} not in: {reason}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_with_the_required_settings_is_accepted_and_consumes() {
    let env = env().await;
    // Created beforehand with the required settings and others the inbox does not care about.
    precreate(&env.js, "ledger", |c| {
        c.max_ack_pending = 1000;
        c.description = Some("created by an operator".into());
    })
    .await;
    let handler = PanicsOn::new("ledger", "none");
    let start = || {
        run(Consumer::new(
            config("ledger"),
            env.pool.clone(),
            env.js.clone(),
            typed(handler.clone()),
        )
        .expect("valid config"))
    };
    let running = start();
    publish(&env.js, &order_envelope("o-1")).await;
    let pool = env.pool.clone();
    wait_until(Duration::from_secs(10), "o-1 applied", || async {
        applied(&pool, "ledger").await == 1
    })
    .await
    .expect("consumed through the pre-created durable");
    running.stop().await;

    // A durable the consumer created itself is accepted on the next start.
    let name = "reporting";
    let fresh = PanicsOn::new(name, "none");
    let make = || {
        Consumer::new(
            config(name),
            env.pool.clone(),
            env.js.clone(),
            typed(fresh.clone()),
        )
        .expect("valid config")
    };
    make().ensure().await.expect("created");
    let have = broker_config(&env.js, name).await;
    assert_eq!(
        (have.max_deliver, have.ack_wait, have.backoff.len()),
        (-1, Duration::from_secs(1), 0),
        "what ensure() creates is what it requires"
    );
    let running = run(make());
    publish(&env.js, &order_envelope("o-2")).await;
    wait_until(Duration::from_secs(10), "o-2 applied", || async {
        applied(&pool, name).await == 2
    })
    .await
    .expect("consumed through its own durable");
    running.stop().await;
}

// ---------------------------------------------------------------------------------------
// Item 7: panicking handlers.
// ---------------------------------------------------------------------------------------

const OTHERS: usize = 30;

/// A handler that panics for one message and applies the others: the others are applied
/// exactly once, the panicking one is retried and then parked with reason `panic` after
/// `max_attempts`, and `run()` keeps running until asked to stop.
async fn a_panic_is_retried_then_dead_lettered(name: &'static str, mode: Mode, batch: bool) {
    let counters = counters();
    let env = env().await;
    let handler = PanicsOn::new(name, "o-bomb");
    let config = ConsumerConfig {
        mode,
        concurrency: 2,
        ..config(name)
    };
    let consumer = if batch {
        Consumer::with_batch_handler(
            config,
            env.pool.clone(),
            env.js.clone(),
            typed_batch(handler.clone()),
        )
    } else {
        Consumer::new(
            config,
            env.pool.clone(),
            env.js.clone(),
            typed(handler.clone()),
        )
    }
    .expect("valid config");
    let mut running = run(consumer);
    let bomb = order_envelope("o-bomb");
    publish(&env.js, &bomb).await;
    for i in 0..OTHERS {
        publish(&env.js, &order_envelope(&format!("o-{i}"))).await;
    }
    let pool = env.pool.clone();
    let task = &running.task;
    wait_until(
        Duration::from_secs(30),
        "the others applied and the panicking message parked",
        || async {
            task.is_finished()
                || (applied(&pool, name).await == OTHERS as i64
                    && dead_letters(&pool, name).await == 1)
        },
    )
    .await
    .expect("done or stopped");
    running.assert_still_running().await;

    let per_order = applied_per_order(&env.pool, name).await;
    for i in 0..OTHERS {
        assert_eq!(
            per_order.get(&format!("o-{i}")),
            Some(&1),
            "o-{i} applied exactly once: {per_order:?}"
        );
    }
    assert_eq!(
        per_order.get("o-bomb"),
        None,
        "the panicking handler's write was rolled back"
    );
    let (reason, attempts, error_chain, message_id): (String, i32, serde_json::Value, String) =
        sqlx::query_as(
            "SELECT reason, attempts, error_chain, message_id FROM dead_letter WHERE consumer = $1",
        )
        .bind(name)
        .fetch_one(&env.pool)
        .await
        .expect("dead letter");
    assert_eq!(
        (reason.as_str(), attempts),
        ("panic", MAX_ATTEMPTS as i32),
        "parked as a panic after max_attempts handler attempts"
    );
    assert_eq!(message_id, bomb.id.to_string());
    assert!(
        error_chain
            .to_string()
            .contains("handler bug: cannot handle order o-bomb"),
        "the panic message is in the error chain: {error_chain}"
    );
    let outcome: String = sqlx::query_scalar(
        "SELECT outcome FROM inbox_message WHERE consumer = $1 AND message_id = $2",
    )
    .bind(name)
    .bind(bomb.id.to_string())
    .fetch_one(&env.pool)
    .await
    .expect("inbox row");
    assert_eq!(outcome, "dead_lettered");

    let bomb_calls = handler.bomb_calls.load(Ordering::SeqCst) as u64;
    let panics = counters.get(HANDLER_PANICS, name);
    assert_eq!(panics, bomb_calls, "every panic is counted");
    if mode == Mode::Strict {
        assert_eq!(bomb_calls, u64::from(MAX_ATTEMPTS), "one run per attempt");
    } else {
        // The batch without savepoints and its one-at-a-time rerun each panic per delivery;
        // only the rerun counts as an attempt.
        assert!(bomb_calls >= u64::from(MAX_ATTEMPTS), "{bomb_calls}");
    }

    running.assert_still_running().await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_in_strict_mode_is_dead_lettered_and_others_flow() {
    a_panic_is_retried_then_dead_lettered("strict-message", Mode::Strict, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_in_batched_mode_is_dead_lettered_and_others_flow() {
    a_panic_is_retried_then_dead_lettered(
        "batched-message",
        Mode::Batched { max_messages: 10 },
        false,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_batch_handler_in_strict_mode_is_dead_lettered_and_others_flow() {
    a_panic_is_retried_then_dead_lettered("strict-batch", Mode::Strict, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_batch_handler_in_batched_mode_is_dead_lettered_and_others_flow() {
    a_panic_is_retried_then_dead_lettered(
        "batched-batch",
        Mode::Batched { max_messages: 10 },
        true,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dlq_retry_whose_handler_panics_is_recorded_and_the_consumer_keeps_running() {
    let counters = counters();
    let env = env().await;
    let name = "email";
    let handler = PanicsOn::new(name, "o-bomb");
    handler.panicking.store(false, Ordering::SeqCst);
    let mut running = run(Consumer::new(
        config(name),
        env.pool.clone(),
        env.js.clone(),
        typed(handler.clone()),
    )
    .expect("valid config"));
    publish(&env.js, &order_envelope("o-bomb")).await;
    let pool = env.pool.clone();
    wait_until(Duration::from_secs(10), "parked as rejected", || async {
        dead_letters(&pool, name).await == 1
    })
    .await
    .expect("parked");

    // Now the handler panics, and the dead letter is retried.
    handler.panicking.store(true, Ordering::SeqCst);
    let id: i64 = sqlx::query_scalar("SELECT id FROM dead_letter WHERE consumer = $1")
        .bind(name)
        .fetch_one(&env.pool)
        .await
        .expect("id");
    let changed = dlq::store::request_retry(&mut env.pool.acquire().await.expect("acquire"), &[id])
        .await
        .expect("request retry");
    assert_eq!(changed, 1);
    let task = &running.task;
    wait_until(
        Duration::from_secs(10),
        "the retry recorded as failed with reason panic",
        || async {
            let state: (String, String) =
                sqlx::query_as("SELECT status, reason FROM dead_letter WHERE id = $1")
                    .bind(id)
                    .fetch_one(&pool)
                    .await
                    .expect("dead letter");
            task.is_finished() || state == ("dead".to_owned(), "panic".to_owned())
        },
    )
    .await
    .expect("retry failed and recorded");
    running.assert_still_running().await;
    let error_chain: serde_json::Value =
        sqlx::query_scalar("SELECT error_chain FROM dead_letter WHERE id = $1")
            .bind(id)
            .fetch_one(&env.pool)
            .await
            .expect("chain");
    assert!(
        error_chain
            .to_string()
            .contains("handler bug: cannot handle order o-bomb"),
        "{error_chain}"
    );
    assert_eq!(counters.get(HANDLER_PANICS, name), 1);

    // The consumer still consumes, and later retry requests are still run.
    publish(&env.js, &order_envelope("o-after")).await;
    wait_until(Duration::from_secs(10), "o-after applied", || async {
        applied_per_order(&pool, name).await.get("o-after") == Some(&1)
    })
    .await
    .expect("still consuming");
    handler.panicking.store(false, Ordering::SeqCst);
    dlq::store::request_retry(&mut env.pool.acquire().await.expect("acquire"), &[id])
        .await
        .expect("request retry");
    wait_until(Duration::from_secs(10), "the retry ran again", || async {
        sqlx::query_scalar::<_, String>("SELECT reason FROM dead_letter WHERE id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .expect("reason")
            == "rejected"
    })
    .await
    .expect("the dlq retry task is alive");
    running.assert_still_running().await;
    running.stop().await;
}

/// An error whose drop panics: the runtime drops it outside the handler, in the lane itself,
/// which is how a lane can die of something other than a handler panic.
#[derive(Debug)]
struct PanicsWhenDropped;

impl std::fmt::Display for PanicsWhenDropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an error that panics when dropped")
    }
}

impl std::error::Error for PanicsWhenDropped {}

impl Drop for PanicsWhenDropped {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            panic!("lane killer: dropped");
        }
    }
}

struct LaneKiller;

impl Handler<OrderPlaced> for LaneKiller {
    async fn handle(
        &self,
        _: &mut PgConnection,
        event: OrderPlaced,
        _: &Delivery,
    ) -> Result<(), HandlerError> {
        if event.order_id == "o-killer" {
            return Err(HandlerError::retry(PanicsWhenDropped));
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_that_dies_outside_the_handler_makes_run_return_an_error() {
    let env = env().await;
    let mut running = run(Consumer::new(
        ConsumerConfig {
            concurrency: 1,
            ..config("killed")
        },
        env.pool.clone(),
        env.js.clone(),
        typed(LaneKiller),
    )
    .expect("valid config"));
    publish(&env.js, &order_envelope("o-killer")).await;
    publish(&env.js, &order_envelope("o-next")).await;
    let returned = tokio::time::timeout(Duration::from_secs(15), &mut running.task)
        .await
        .expect("run() returns once its only lane died")
        .expect("task");
    match returned {
        Ok(()) => panic!("run() returned Ok(()) though no shutdown was asked and its lane died"),
        Err(e) => {
            let text = e.to_string();
            assert!(
                text.contains("lane") && text.contains("lane killer: dropped"),
                "the error says which task died and why: {text}"
            );
        }
    }
}
