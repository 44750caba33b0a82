//! What counts as an attempt, against real PostgreSQL and nats-server: handler runs, not
//! broker deliveries (a database outage, a shutdown or a slow lane must not use a message's
//! attempts up, and a slow lane must not get its messages redelivered), and failures at
//! COMMIT (a deferred constraint) pinned on the one message that causes them, in the lanes
//! and in `dlq retry`.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use inbox::{
    BatchHandler, Consumer, ConsumerConfig, Delivery, Handler, HandlerError, Mode, typed,
    typed_batch,
};
use sqlx::{PgConnection, PgPool};
use testkit::wait_until;

const MAX_ATTEMPTS: u32 = 3;

fn config(name: &str) -> ConsumerConfig {
    ConsumerConfig {
        filter_subjects: vec!["orders.>".into()],
        ack_wait: Duration::from_secs(1),
        retry_min_delay: Duration::from_millis(100),
        retry_max_delay: Duration::from_secs(1),
        retry_poll_interval: Duration::from_millis(50),
        max_attempts: MAX_ATTEMPTS,
        ..ConsumerConfig::new(name, "ORDERS")
    }
}

/// `(reason, attempts, error chain)` of the one dead letter of `consumer`.
async fn dead_letter(pool: &PgPool, consumer: &str) -> (String, i32, String) {
    let (reason, attempts, chain): (String, i32, serde_json::Value) =
        sqlx::query_as("SELECT reason, attempts, error_chain FROM dead_letter WHERE consumer = $1")
            .bind(consumer)
            .fetch_one(pool)
            .await
            .expect("one dead letter");
    (reason, attempts, chain.to_string())
}

/// More than `n` deliveries so far.
fn delivered_more_than(view: Option<BrokerView>, n: u32) -> bool {
    view.is_some_and(|v| v.deliveries > u64::from(n))
}

/// While `on`, every insert into `inbox_message` fails (the inbox is unusable: what a short
/// database outage looks like to the consumer, without losing its connections).
async fn inbox_inserts_fail(pool: &PgPool, on: bool) {
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS inbox_outage (on_ boolean);
         CREATE OR REPLACE FUNCTION inbox_outage() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF EXISTS (SELECT 1 FROM inbox_outage) THEN
                 RAISE EXCEPTION 'inbox_message is unavailable (test outage)';
             END IF;
             RETURN NEW;
         END $$;
         CREATE OR REPLACE TRIGGER inbox_outage BEFORE INSERT ON inbox_message
             FOR EACH ROW EXECUTE FUNCTION inbox_outage();",
    )
    .execute(pool)
    .await
    .expect("outage trigger");
    let switch = if on {
        "INSERT INTO inbox_outage VALUES (true)"
    } else {
        "DELETE FROM inbox_outage"
    };
    sqlx::query(switch).execute(pool).await.expect("switch");
}

/// A constraint trigger checked at COMMIT that refuses the order `o-culprit` in `applied`:
/// the handler's insert succeeds, its transaction's COMMIT fails.
async fn refuse_culprit_at_commit(pool: &PgPool) {
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_culprit() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.order_id = 'o-culprit' THEN
                 RAISE EXCEPTION 'order o-culprit refused at commit';
             END IF;
             RETURN NULL;
         END $$;
         CREATE CONSTRAINT TRIGGER refuse_culprit AFTER INSERT ON applied
             DEFERRABLE INITIALLY DEFERRED
             FOR EACH ROW EXECUTE FUNCTION refuse_culprit();",
    )
    .execute(pool)
    .await
    .expect("constraint trigger");
}

/// One handler run as the handler saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Run {
    order_id: String,
    attempt: u32,
    /// The broker's delivery count.
    delivered: Option<u32>,
}

/// Inserts one `applied` row per order. Its first `failing_runs` runs of every order fail
/// with a retry (after writing, so the write must be rolled back); `slow` sleeps that long
/// in that order's handler; while `rejecting`, every order is refused permanently (without
/// writing). Records every run.
#[derive(Clone)]
struct Probe {
    consumer: &'static str,
    failing_runs: usize,
    slow: Option<(&'static str, Duration)>,
    rejecting: Arc<AtomicBool>,
    runs: Arc<Mutex<Vec<Run>>>,
}

impl Probe {
    fn new(consumer: &'static str) -> Self {
        Probe {
            consumer,
            failing_runs: 0,
            slow: None,
            rejecting: Arc::default(),
            runs: Arc::default(),
        }
    }

    fn runs(&self) -> Vec<Run> {
        self.runs.lock().expect("lock").clone()
    }

    fn deliveries_of(&self, order_id: &str) -> Vec<Option<u32>> {
        self.runs()
            .into_iter()
            .filter(|r| r.order_id == order_id)
            .map(|r| r.delivered)
            .collect()
    }

    fn runs_of(&self, order_id: &str) -> Vec<u32> {
        self.runs()
            .into_iter()
            .filter(|r| r.order_id == order_id)
            .map(|r| r.attempt)
            .collect()
    }

    /// Records the run; `Err` if this run must fail before writing.
    fn before(&self, event: &Placed, delivery: &Delivery) -> Result<usize, HandlerError> {
        let mut runs = self.runs.lock().expect("lock");
        runs.push(Run {
            order_id: event.order_id.clone(),
            attempt: delivery.attempt,
            delivered: delivery.delivered,
        });
        if self.rejecting.load(Ordering::SeqCst) {
            return Err(HandlerError::permanent_because(
                "rejected",
                std::io::Error::other("rejected for now"),
            ));
        }
        Ok(runs.iter().filter(|r| r.order_id == event.order_id).count())
    }

    fn after(&self, run: usize) -> Result<(), HandlerError> {
        if run <= self.failing_runs {
            return Err(HandlerError::retry(std::io::Error::other(
                "downstream unavailable",
            )));
        }
        Ok(())
    }
}

impl Handler<Placed> for Probe {
    async fn handle(
        &self,
        conn: &mut PgConnection,
        event: Placed,
        delivery: &Delivery,
    ) -> Result<(), HandlerError> {
        let run = self.before(&event, delivery)?;
        if let Some((slow, how_long)) = self.slow
            && slow == event.order_id
        {
            // The handler's own work, not synchronisation: it outlasts ack_wait.
            tokio::time::sleep(how_long).await;
        }
        sqlx::query("INSERT INTO applied (consumer, order_id) VALUES ($1, $2)")
            .bind(self.consumer)
            .bind(&event.order_id)
            .execute(&mut *conn)
            .await
            .map_err(HandlerError::retry)?;
        self.after(run)
    }
}

impl BatchHandler<Placed> for Probe {
    async fn handle_batch(
        &self,
        conn: &mut PgConnection,
        events: Vec<(Placed, &Delivery)>,
    ) -> Result<(), HandlerError> {
        let mut ids = Vec::with_capacity(events.len());
        for (event, delivery) in &events {
            self.before(event, delivery)?;
            ids.push(event.order_id.clone());
        }
        sqlx::query("INSERT INTO applied (consumer, order_id) SELECT $1, unnest($2::text[])")
            .bind(self.consumer)
            .bind(&ids)
            .execute(&mut *conn)
            .await
            .map_err(HandlerError::retry)?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Item 8: attempts are handler runs, not deliveries.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_does_not_use_up_the_attempts() {
    let env = env().await;
    let name = "outage";
    // The handler fails once (a flaky downstream), then succeeds.
    let handler = Probe {
        failing_runs: 1,
        ..Probe::new(name)
    };
    inbox_inserts_fail(&env.pool, true).await;
    let running = run(Consumer::new(
        config(name),
        env.pool.clone(),
        env.js.clone(),
        typed(handler.clone()),
    )
    .expect("valid config"));
    publish(&env.js, &order("o-1")).await;
    let js = env.js.clone();
    // Each failed insert NAKs the message: more deliveries than max_attempts.
    wait_until(
        Duration::from_secs(20),
        "the broker delivered o-1 more than max_attempts times",
        || async { delivered_more_than(broker_view(&js, name).await, MAX_ATTEMPTS + 1) },
    )
    .await
    .expect("redelivered during the outage");
    assert!(handler.runs().is_empty(), "the handler never ran");
    inbox_inserts_fail(&env.pool, false).await;

    let pool = env.pool.clone();
    wait_until(Duration::from_secs(20), "o-1 applied or parked", || async {
        applied(&pool, name).await == 1 || dead_letters(&pool, name).await == 1
    })
    .await
    .expect("resolved");
    if dead_letters(&env.pool, name).await != 0 {
        let (reason, attempts, _) = dead_letter(&env.pool, name).await;
        panic!(
            "o-1 was parked ({reason}, attempts {attempts}) after {} handler run(s) {:?}, though the handler failed once",
            handler.runs().len(),
            handler.runs_of("o-1")
        );
    }
    assert_eq!(
        applied_per_order(&env.pool, name).await.get("o-1"),
        Some(&1)
    );
    assert_eq!(
        handler.runs_of("o-1"),
        [1, 2],
        "the handler saw its own attempts, not the deliveries"
    );
    let delivered = handler.deliveries_of("o-1");
    assert!(
        delivered[0].is_some_and(|d| d > MAX_ATTEMPTS + 1),
        "and the broker's count as delivered: {delivered:?}"
    );
    assert_eq!(
        attempt_rows(&env.pool).await,
        0,
        "the count is gone once the message committed"
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_keeps_failing_runs_exactly_max_attempts_times_across_instances() {
    let env = env().await;
    let name = "stubborn";
    let handler = Probe {
        failing_runs: usize::MAX,
        ..Probe::new(name)
    };
    let config = ConsumerConfig {
        retry_min_delay: Duration::from_millis(500),
        ..config(name)
    };
    let start = || {
        run(Consumer::new(
            config.clone(),
            env.pool.clone(),
            env.js.clone(),
            typed(handler.clone()),
        )
        .expect("valid config"))
    };
    // A short outage first: deliveries that are not handler attempts.
    inbox_inserts_fail(&env.pool, true).await;
    let first = start();
    publish(&env.js, &order("o-1")).await;
    let js = env.js.clone();
    wait_until(
        Duration::from_secs(20),
        "the broker delivered o-1 max_attempts times",
        || async { delivered_more_than(broker_view(&js, name).await, MAX_ATTEMPTS - 1) },
    )
    .await
    .expect("redelivered during the outage");
    inbox_inserts_fail(&env.pool, false).await;
    wait_until(Duration::from_secs(20), "the handler ran once", || async {
        !handler.runs().is_empty()
    })
    .await
    .expect("ran");
    // Another instance takes over: the count lives in the database, not in the process.
    first.stop().await;
    let runs_in_first = handler.runs().len();
    let second = start();
    let pool = env.pool.clone();
    wait_until(Duration::from_secs(20), "o-1 parked", || async {
        dead_letters(&pool, name).await == 1
    })
    .await
    .expect("parked");
    second.stop().await;

    assert_eq!(
        handler.runs_of("o-1").len(),
        MAX_ATTEMPTS as usize,
        "exactly max_attempts handler runs ({runs_in_first} in the first instance); attempts seen {:?}",
        handler.runs_of("o-1")
    );
    assert_eq!(handler.runs_of("o-1"), [1, 2, 3]);
    let (reason, attempts, chain) = dead_letter(&env.pool, name).await;
    assert_eq!(
        (reason.as_str(), attempts),
        ("attempts_exhausted", MAX_ATTEMPTS as i32)
    );
    assert!(chain.contains("downstream unavailable"), "{chain}");
    assert_eq!(
        applied(&env.pool, name).await,
        0,
        "failed runs left nothing"
    );
    assert_eq!(
        attempt_rows(&env.pool).await,
        0,
        "parking forgets the count"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_behind_a_slow_handler_are_not_redelivered() {
    let env = env().await;
    let name = "slow";
    let handler = Probe {
        slow: Some(("o-slow", Duration::from_millis(2500))),
        ..Probe::new(name)
    };
    // All of key A, so one lane: o-slow's handler outlasts ack_wait (1 s) two times over
    // while the others wait behind it.
    let orders = ["o-slow", "o-1", "o-2", "o-3", "o-4", "o-5"];
    for id in orders {
        publish(&env.js, &order_keyed(id, "A")).await;
    }
    let mut running = run(Consumer::new(
        ConsumerConfig {
            concurrency: 2,
            ..config(name)
        },
        env.pool.clone(),
        env.js.clone(),
        typed(handler.clone()),
    )
    .expect("valid config"));
    let (pool, js) = (env.pool.clone(), env.js.clone());
    wait_until(Duration::from_secs(30), "all applied and acked", || async {
        applied(&pool, name).await == orders.len() as i64 && all_acked(broker_view(&js, name).await)
    })
    .await
    .expect("done");
    running.assert_still_running().await;
    let view = broker_view(&env.js, name).await.expect("durable");
    assert_eq!(
        view.deliveries,
        orders.len() as u64,
        "each message delivered once: no ack_wait expired behind the slow handler"
    );
    for id in orders {
        assert_eq!(handler.runs_of(id), [1], "{id} ran once");
        assert_eq!(handler.deliveries_of(id), [Some(1)], "{id} delivered once");
    }
    running.stop().await;
}

// ---------------------------------------------------------------------------------------
// Item 9: a failure at COMMIT is pinned on its message.
// ---------------------------------------------------------------------------------------

/// Ten messages, one of which (`o-culprit`) makes its transaction's COMMIT fail: the nine
/// others are applied once and acked, the culprit is parked with reason `commit_failed`
/// after `max_attempts`, and the consumer keeps running.
async fn a_commit_failure_is_pinned_on_its_message(name: &'static str, mode: Mode, batch: bool) {
    let env = env().await;
    refuse_culprit_at_commit(&env.pool).await;
    let mut orders: Vec<String> = (0..9).map(|i| format!("o-{i}")).collect();
    orders.insert(4, "o-culprit".into());
    for id in &orders {
        publish(&env.js, &order(id)).await;
    }
    let handler = Probe::new(name);
    let config = ConsumerConfig {
        mode,
        concurrency: 1,
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
    let (pool, js) = (env.pool.clone(), env.js.clone());
    let task = &running.task;
    let waited = wait_until(
        Duration::from_secs(30),
        "the nine others applied and acked, the culprit parked",
        || async {
            task.is_finished()
                || (applied(&pool, name).await == 9
                    && dead_letters(&pool, name).await == 1
                    && all_acked(broker_view(&js, name).await))
        },
    )
    .await;
    if let Err(e) = waited {
        panic!(
            "{e}: applied {:?}, {} dead letter(s), broker {:?}, {} handler runs",
            applied_per_order(&pool, name).await,
            dead_letters(&pool, name).await,
            broker_view(&js, name).await,
            handler.runs().len()
        );
    }
    running.assert_still_running().await;

    let per_order = applied_per_order(&env.pool, name).await;
    for id in orders.iter().filter(|id| *id != "o-culprit") {
        assert_eq!(per_order.get(id), Some(&1), "{id} once: {per_order:?}");
    }
    assert_eq!(per_order.get("o-culprit"), None);
    let (reason, attempts, chain) = dead_letter(&env.pool, name).await;
    assert_eq!(
        (reason.as_str(), attempts),
        ("commit_failed", MAX_ATTEMPTS as i32)
    );
    assert!(
        chain.contains("order o-culprit refused at commit"),
        "{chain}"
    );
    assert_eq!(
        broker_view(&env.js, name).await.map(|v| v.deliveries),
        Some(9 + u64::from(MAX_ATTEMPTS)),
        "the others were acked at their first delivery, the culprit redelivered per attempt"
    );
    assert_eq!(attempt_rows(&env.pool).await, 0);

    // Still consuming.
    publish(&env.js, &order("o-after")).await;
    wait_until(Duration::from_secs(10), "o-after applied", || async {
        applied_per_order(&pool, name).await.get("o-after") == Some(&1)
    })
    .await
    .expect("still consuming");
    running.assert_still_running().await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_failure_in_batched_mode_is_pinned_on_its_message() {
    a_commit_failure_is_pinned_on_its_message(
        "batched-commit",
        Mode::Batched { max_messages: 10 },
        false,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_failure_of_a_batch_handler_is_pinned_on_its_message() {
    a_commit_failure_is_pinned_on_its_message(
        "batch-handler-commit",
        Mode::Batched { max_messages: 10 },
        true,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_failure_in_strict_mode_is_counted_and_parked() {
    a_commit_failure_is_pinned_on_its_message("strict-commit", Mode::Strict, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dlq_retry_whose_group_commit_fails_retries_one_letter_at_a_time() {
    let env = env().await;
    let name = "dlq-commit";
    refuse_culprit_at_commit(&env.pool).await;
    let handler = Probe::new(name);
    handler.rejecting.store(true, Ordering::SeqCst);
    let mut running = run(Consumer::new(
        config(name),
        env.pool.clone(),
        env.js.clone(),
        typed(handler.clone()),
    )
    .expect("valid config"));
    let orders = ["o-0", "o-1", "o-culprit", "o-2", "o-3"];
    for id in orders {
        publish(&env.js, &order(id)).await;
    }
    let pool = env.pool.clone();
    wait_until(Duration::from_secs(20), "all five parked", || async {
        dead_letters(&pool, name).await == 5
    })
    .await
    .expect("parked");

    // The handler accepts them now; retry all five (one group of the retry runner).
    handler.rejecting.store(false, Ordering::SeqCst);
    let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM dead_letter WHERE consumer = $1")
        .bind(name)
        .fetch_all(&env.pool)
        .await
        .expect("ids");
    let changed = dlq::store::request_retry(&mut env.pool.acquire().await.expect("acquire"), &ids)
        .await
        .expect("request retry");
    assert_eq!(changed, 5);
    let task = &running.task;
    let statuses = || async {
        sqlx::query_as::<_, (String, String, String)>(
            "SELECT d.message_id, d.status, d.reason FROM dead_letter d WHERE consumer = $1",
        )
        .bind(name)
        .fetch_all(&pool)
        .await
        .expect("statuses")
    };
    let waited = wait_until(
        Duration::from_secs(20),
        "four retried, the culprit dead again",
        || async {
            let rows = statuses().await;
            task.is_finished()
                || (rows.iter().filter(|r| r.1 == "retried").count() == 4
                    && rows.iter().filter(|r| r.1 == "dead").count() == 1)
        },
    )
    .await;
    if let Err(e) = waited {
        panic!("{e}; (message id, status, reason): {:?}", statuses().await);
    }
    running.assert_still_running().await;
    let per_order = applied_per_order(&env.pool, name).await;
    for id in orders.iter().filter(|id| **id != "o-culprit") {
        assert_eq!(per_order.get(*id), Some(&1), "{id} once: {per_order:?}");
    }
    assert_eq!(per_order.get("o-culprit"), None);
    let (reason, chain): (String, serde_json::Value) = sqlx::query_as(
        "SELECT reason, error_chain FROM dead_letter WHERE consumer = $1 AND status = 'dead'",
    )
    .bind(name)
    .fetch_one(&env.pool)
    .await
    .expect("the culprit");
    assert_eq!(reason, "commit_failed");
    assert!(
        chain
            .to_string()
            .contains("order o-culprit refused at commit"),
        "{chain}"
    );
    running.assert_still_running().await;
    running.stop().await;
}
