//! Review of the attempt-counting commit, against real PostgreSQL and nats-server: a handler
//! that ignores a database error (its transaction is aborted), two instances racing on one
//! message, progress acks while NATS is down, a handler that hangs, a statement timeout at
//! COMMIT, and the delivery-count safety limit.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use common::*;
use inbox::{
    BatchHandler, Consumer, ConsumerConfig, Delivery, Handler, HandlerError, Mode, typed,
    typed_batch,
};
use sqlx::{PgConnection, PgPool};
use testkit::{TcpProxy, wait_until};

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

/// `(message id, status, reason, attempts, error chain)` of every dead letter of `consumer`.
async fn letters(pool: &PgPool, consumer: &str) -> Vec<(String, String, String, i32, String)> {
    sqlx::query_as::<_, (String, String, String, i32, serde_json::Value)>(
        "SELECT message_id, status, reason, attempts, error_chain FROM dead_letter
         WHERE consumer = $1 ORDER BY id",
    )
    .bind(consumer)
    .fetch_all(pool)
    .await
    .expect("dead letters")
    .into_iter()
    .map(|(id, status, reason, attempts, chain)| (id, status, reason, attempts, chain.to_string()))
    .collect()
}

/// What the test handler does for an order, by its id's prefix:
/// - `abort…`: inserts its row, then runs `SELECT 1/0`, ignores the error and returns `Ok`
///   (its transaction is aborted);
/// - `hang…`: never returns;
/// - `stuck…`: inserts its row, then waits in a statement that never ends (`pg_sleep`);
/// - `slow…`: sleeps `slow` (its own work), then inserts;
/// - `commit-timeout…`: inserts (a deferred trigger cancels its COMMIT, SQLSTATE 57014);
/// - `race…`: its first run sleeps `slow`, then fails permanently; later runs insert;
/// - anything else: inserts its row.
///
/// While `sabotage_all` is set, every order behaves like `abort…`; while `rejecting`, every
/// order fails permanently. Records every run (order id, attempt, delivered).
/// One run as the handler saw it: order id, attempt, the broker's delivery count.
type RunSeen = (String, u32, Option<u32>);

#[derive(Clone)]
struct Probe {
    consumer: &'static str,
    slow: Duration,
    rejecting: Arc<AtomicBool>,
    sabotage_all: Arc<AtomicBool>,
    runs: Arc<Mutex<Vec<RunSeen>>>,
    /// Runs that returned (order id), to wait for the end of a slow one.
    returned: Arc<Mutex<Vec<String>>>,
}

impl Probe {
    fn new(consumer: &'static str) -> Self {
        Probe {
            consumer,
            slow: Duration::from_secs(3),
            rejecting: Arc::default(),
            sabotage_all: Arc::default(),
            runs: Arc::default(),
            returned: Arc::default(),
        }
    }

    fn runs_of(&self, order_id: &str) -> Vec<u32> {
        self.runs
            .lock()
            .expect("lock")
            .iter()
            .filter(|r| r.0 == order_id)
            .map(|r| r.1)
            .collect()
    }

    fn returned(&self, order_id: &str) -> usize {
        self.returned
            .lock()
            .expect("lock")
            .iter()
            .filter(|r| *r == order_id)
            .count()
    }

    async fn insert(&self, conn: &mut PgConnection, order_id: &str) -> Result<(), HandlerError> {
        sqlx::query("INSERT INTO applied (consumer, order_id) VALUES ($1, $2)")
            .bind(self.consumer)
            .bind(order_id)
            .execute(&mut *conn)
            .await
            .map_err(HandlerError::retry)?;
        Ok(())
    }

    async fn one(
        &self,
        conn: &mut PgConnection,
        event: &Placed,
        delivery: &Delivery,
    ) -> Result<(), HandlerError> {
        let id = event.order_id.as_str();
        let run = {
            let mut runs = self.runs.lock().expect("lock");
            runs.push((id.to_owned(), delivery.attempt, delivery.delivered));
            runs.iter().filter(|r| r.0 == id).count()
        };
        let result = async {
            if self.rejecting.load(Ordering::SeqCst) {
                return Err(HandlerError::permanent_because(
                    "rejected",
                    std::io::Error::other("rejected for now"),
                ));
            }
            if id.starts_with("abort") || self.sabotage_all.load(Ordering::SeqCst) {
                self.insert(conn, id).await?;
                // The bug under test: a failed statement whose error is ignored.
                let _ignored = sqlx::query("SELECT 1/0").execute(&mut *conn).await;
                return Ok(());
            }
            if id.starts_with("hang") {
                std::future::pending::<()>().await;
            }
            if id.starts_with("stuck") {
                self.insert(conn, id).await?;
                sqlx::query("SELECT pg_sleep(3600)")
                    .execute(&mut *conn)
                    .await
                    .map_err(HandlerError::retry)?;
            }
            if id.starts_with("slow") {
                // The handler's own work, not synchronisation.
                tokio::time::sleep(self.slow).await;
            }
            if id.starts_with("race") && run == 1 {
                tokio::time::sleep(self.slow).await;
                return Err(HandlerError::permanent_because(
                    "rejected",
                    std::io::Error::other("the first instance gives up"),
                ));
            }
            self.insert(conn, id).await
        }
        .await;
        self.returned.lock().expect("lock").push(id.to_owned());
        result
    }
}

impl Handler<Placed> for Probe {
    async fn handle(
        &self,
        conn: &mut PgConnection,
        event: Placed,
        delivery: &Delivery,
    ) -> Result<(), HandlerError> {
        self.one(conn, &event, delivery).await
    }
}

impl BatchHandler<Placed> for Probe {
    async fn handle_batch(
        &self,
        conn: &mut PgConnection,
        events: Vec<(Placed, &Delivery)>,
    ) -> Result<(), HandlerError> {
        for (event, delivery) in &events {
            self.one(conn, event, delivery).await?;
        }
        Ok(())
    }
}

fn consumer(env: &Env, config: ConsumerConfig, handler: &Probe, batch: bool) -> Consumer {
    if batch {
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
    .expect("valid config")
}

/// Waits until `done` holds, failing with the state of the consumer's tables if not.
async fn wait_for(
    env: &Env,
    name: &str,
    what: &str,
    deadline: Duration,
    done: impl AsyncFn() -> bool,
) {
    if let Err(e) = wait_until(deadline, what, || done()).await {
        panic!(
            "{e}: applied {:?}, dead letters {:?}, broker {:?}",
            applied_per_order(&env.pool, name).await,
            letters(&env.pool, name).await,
            broker_view(&env.js, name).await,
        );
    }
}

// ---------------------------------------------------------------------------------------
// 1. A handler that ignores a database error left its transaction aborted.
// ---------------------------------------------------------------------------------------

/// Nine good orders around `abort-culprit`, whose handler ignores a failed `SELECT 1/0`:
/// the nine are applied once, the culprit is parked as `aborted_transaction` after
/// `max_attempts` (never acked as if committed).
async fn an_aborted_transaction_is_a_failed_attempt(name: &'static str, mode: Mode, batch: bool) {
    let env = env().await;
    let mut orders: Vec<String> = (0..9).map(|i| format!("o-{i}")).collect();
    orders.insert(4, "abort-culprit".into());
    for id in &orders {
        publish(&env.js, &order(id)).await;
    }
    let handler = Probe::new(name);
    let config = ConsumerConfig {
        mode,
        concurrency: 1,
        ..config(name)
    };
    let mut running = run(consumer(&env, config, &handler, batch));
    let task = &running.task;
    wait_for(
        &env,
        name,
        "the nine applied and acked, the culprit parked",
        Duration::from_secs(30),
        async || {
            task.is_finished()
                || (applied(&env.pool, name).await == 9
                    && !letters(&env.pool, name).await.is_empty()
                    && all_acked(broker_view(&env.js, name).await))
        },
    )
    .await;
    running.assert_still_running().await;
    let per_order = applied_per_order(&env.pool, name).await;
    for id in orders.iter().filter(|id| *id != "abort-culprit") {
        assert_eq!(per_order.get(id), Some(&1), "{id} once: {per_order:?}");
    }
    assert_eq!(per_order.get("abort-culprit"), None);
    let letters = letters(&env.pool, name).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    let (_, status, reason, attempts, chain) = &letters[0];
    assert_eq!(
        (status.as_str(), reason.as_str(), *attempts),
        ("dead", "aborted_transaction", MAX_ATTEMPTS as i32)
    );
    assert!(chain.contains("ignored a database error"), "{chain}");
    assert_eq!(attempt_rows(&env.pool).await, 0);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_transaction_in_strict_mode_is_parked_not_acked() {
    an_aborted_transaction_is_a_failed_attempt("abort-strict", Mode::Strict, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_transaction_in_a_batch_is_pinned_on_its_message() {
    an_aborted_transaction_is_a_failed_attempt(
        "abort-batched",
        Mode::Batched { max_messages: 10 },
        false,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_transaction_of_a_batch_handler_is_pinned_on_its_message() {
    an_aborted_transaction_is_a_failed_attempt(
        "abort-batch-handler",
        Mode::Batched { max_messages: 10 },
        true,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_transaction_in_a_dlq_retry_fails_that_letter_only() {
    let env = env().await;
    let name = "abort-dlq";
    let handler = Probe::new(name);
    handler.rejecting.store(true, Ordering::SeqCst);
    let mut running = run(consumer(&env, config(name), &handler, false));
    let orders = ["o-0", "o-1", "abort-culprit", "o-2", "o-3"];
    for id in orders {
        publish(&env.js, &order(id)).await;
    }
    wait_for(
        &env,
        name,
        "all five parked",
        Duration::from_secs(20),
        async || letters(&env.pool, name).await.len() == 5,
    )
    .await;
    handler.rejecting.store(false, Ordering::SeqCst);
    let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM dead_letter WHERE consumer = $1")
        .bind(name)
        .fetch_all(&env.pool)
        .await
        .expect("ids");
    dlq::store::request_retry(&mut env.pool.acquire().await.expect("acquire"), &ids)
        .await
        .expect("request retry");
    let task = &running.task;
    wait_for(
        &env,
        name,
        "four retried, the culprit dead again",
        Duration::from_secs(20),
        async || {
            let rows = letters(&env.pool, name).await;
            task.is_finished()
                || (rows.iter().filter(|r| r.1 == "retried").count() == 4
                    && rows.iter().filter(|r| r.1 == "dead").count() == 1)
        },
    )
    .await;
    running.assert_still_running().await;
    let per_order = applied_per_order(&env.pool, name).await;
    for id in orders.iter().filter(|id| **id != "abort-culprit") {
        assert_eq!(per_order.get(*id), Some(&1), "{id} once: {per_order:?}");
    }
    assert_eq!(per_order.get("abort-culprit"), None);
    let rows = letters(&env.pool, name).await;
    let culprit = rows.iter().find(|r| r.1 == "dead").expect("the culprit");
    assert_eq!(culprit.2, "aborted_transaction", "{rows:?}");
    running.stop().await;
}

// ---------------------------------------------------------------------------------------
// 2. Two instances: one gives up on a message the other has processed meanwhile.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_processed_by_another_instance_is_not_dead_lettered() {
    let env = env().await;
    let name = "race";
    let handler = Probe::new(name);
    // Instance A reaches NATS through a proxy, so that its progress acks can be cut off
    // while its (slow) handler runs: the broker then redelivers to B after ack_wait.
    let proxy = TcpProxy::start(env.nats.addr()).await.expect("proxy");
    let js_a = jetstream::new(
        async_nats::connect(format!("nats://{}", proxy.addr()))
            .await
            .expect("nats via proxy"),
    );
    let a = run(Consumer::new(
        ConsumerConfig {
            concurrency: 1,
            ..config(name)
        },
        env.pool.clone(),
        js_a,
        typed(handler.clone()),
    )
    .expect("valid config"));
    publish(&env.js, &order("race-1")).await;
    wait_until(Duration::from_secs(20), "A runs race-1", || async {
        !handler.runs_of("race-1").is_empty()
    })
    .await
    .expect("A ran");
    proxy.cut();
    // B gets the redelivery after ack_wait; its inbox insert waits for A's transaction.
    let mut b = run(consumer(&env, config(name), &handler, false));
    wait_for(
        &env,
        name,
        "A's run returned and B applied race-1",
        Duration::from_secs(20),
        async || handler.returned("race-1") >= 1 && applied(&env.pool, name).await == 1,
    )
    .await;
    proxy.restore();
    // A finishes what it was handling (parking, before the fix) before it stops.
    a.stop().await;
    assert_eq!(handler.runs_of("race-1"), [1, 1], "A's run, then B's");
    let rows = letters(&env.pool, name).await;
    // Before the fix a `dead` letter existed here, and `dlq retry` applied it a second time.
    if !rows.is_empty() {
        let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM dead_letter WHERE consumer = $1")
            .bind(name)
            .fetch_all(&env.pool)
            .await
            .expect("ids");
        dlq::store::request_retry(&mut env.pool.acquire().await.expect("acquire"), &ids)
            .await
            .expect("request retry");
        wait_for(
            &env,
            name,
            "the retry ran",
            Duration::from_secs(20),
            async || {
                letters(&env.pool, name)
                    .await
                    .iter()
                    .all(|r| r.1 != "retry_requested")
            },
        )
        .await;
        panic!(
            "a dead letter exists for a message that was processed: {rows:?}; after dlq retry race-1 was applied {:?} time(s)",
            applied_per_order(&env.pool, name).await.get("race-1")
        );
    }
    assert_eq!(applied(&env.pool, name).await, 1);
    b.assert_still_running().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dlq_retry_of_a_message_already_processed_does_not_run_the_handler() {
    let env = env().await;
    let name = "retry-processed";
    let handler = Probe::new(name);
    let mut running = run(consumer(&env, config(name), &handler, false));
    let envelope = order("o-1");
    publish(&env.js, &envelope).await;
    wait_for(
        &env,
        name,
        "o-1 applied",
        Duration::from_secs(20),
        async || applied(&env.pool, name).await == 1,
    )
    .await;
    // What the race above left behind before its fix (or an older version left): a dead
    // letter for a message whose handler committed.
    let headers = envelope::nats::to_headers(&envelope).expect("headers");
    let letter = dlq::DeadLetter {
        source: dlq::Source::Consumer,
        consumer: name.into(),
        message_id: envelope.id.to_string(),
        subject: envelope.subject.to_string(),
        partition_key: Some("o-1".into()),
        headers: dlq::headers_to_json(&headers),
        payload: envelope.payload.to_vec(),
        reason: "rejected".into(),
        error_chain: vec!["the other instance gave up".into()],
        attempts: 1,
        stream: Some("ORDERS".into()),
        stream_seq: None,
    };
    let mut conn = env.pool.acquire().await.expect("acquire");
    let id = dlq::store::record(&mut conn, &letter)
        .await
        .expect("record");
    dlq::store::request_retry(&mut conn, &[id])
        .await
        .expect("request retry");
    drop(conn);
    wait_for(
        &env,
        name,
        "the retry request handled",
        Duration::from_secs(20),
        async || {
            letters(&env.pool, name)
                .await
                .iter()
                .all(|r| r.1 != "retry_requested")
        },
    )
    .await;
    running.assert_still_running().await;
    assert_eq!(
        applied(&env.pool, name).await,
        1,
        "the retry did not apply o-1 again"
    );
    assert_eq!(handler.runs_of("o-1"), [1], "nor run its handler");
    let rows = letters(&env.pool, name).await;
    assert_eq!(rows[0].1, "retried", "{rows:?}");
    running.stop().await;
}

// ---------------------------------------------------------------------------------------
// 3. Progress acks while NATS is unreachable.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_finishes_its_transaction_and_stops_while_nats_is_down() {
    let mut env = env().await;
    let name = "nats-down";
    let handler = Probe {
        slow: Duration::from_secs(4),
        ..Probe::new(name)
    };
    // A small command channel: what a reconnect of a busy client looks like (async-nats
    // stops draining it while it reconnects; the default holds 2048 commands).
    let client = async_nats::ConnectOptions::new()
        .client_capacity(4)
        .connect(env.nats.url())
        .await
        .expect("nats");
    let js = jetstream::new(client);
    // One lane: the slow order and five behind it, all held (and kept alive) by the lane.
    let orders = ["slow-1", "o-1", "o-2", "o-3", "o-4", "o-5"];
    for id in orders {
        publish(&env.js, &order_keyed(id, "A")).await;
    }
    let running = run(Consumer::new(
        ConsumerConfig {
            concurrency: 1,
            ..config(name)
        },
        env.pool.clone(),
        js,
        typed(handler.clone()),
    )
    .expect("valid config"));
    wait_until(Duration::from_secs(20), "slow-1 runs", || async {
        !handler.runs_of("slow-1").is_empty()
    })
    .await
    .expect("ran");
    env.nats.stop().await.expect("nats-server stops");
    // The handler's transaction must end although NATS is gone (it held locks meanwhile).
    let pool = env.pool.clone();
    wait_until(
        Duration::from_secs(15),
        "slow-1 committed while NATS is down",
        || async { applied_per_order(&pool, name).await.get("slow-1") == Some(&1) },
    )
    .await
    .expect("the lane is not stuck sending progress acks");
    running.stop_within(Duration::from_secs(30)).await;
}

// ---------------------------------------------------------------------------------------
// 4. A handler that never returns.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_handler_times_out_and_is_parked() {
    let env = env().await;
    let name = "hung";
    let handler = Probe::new(name);
    let orders: Vec<String> = ["hang-1", "o-1", "o-2", "o-3", "o-4", "o-5", "o-6"]
        .map(str::to_owned)
        .to_vec();
    for id in &orders {
        publish(&env.js, &order(id)).await;
    }
    let config = ConsumerConfig {
        max_attempts: 2,
        concurrency: 4,
        handler_timeout: Duration::from_secs(2),
        ..config(name)
    };
    let mut running = run(consumer(&env, config, &handler, false));
    let task = &running.task;
    wait_for(
        &env,
        name,
        "the others applied, hang-1 parked",
        Duration::from_secs(30),
        async || {
            task.is_finished()
                || (applied(&env.pool, name).await == 6
                    && !letters(&env.pool, name).await.is_empty())
        },
    )
    .await;
    running.assert_still_running().await;
    let rows = letters(&env.pool, name).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(
        (rows[0].1.as_str(), rows[0].2.as_str(), rows[0].3),
        ("dead", "timeout", 2)
    );
    assert!(rows[0].4.contains("2s"), "{rows:?}");
    assert_eq!(handler.runs_of("hang-1"), [1, 2]);
    let per_order = applied_per_order(&env.pool, name).await;
    for id in orders.iter().filter(|id| *id != "hang-1") {
        assert_eq!(per_order.get(id), Some(&1), "{id} once: {per_order:?}");
    }
    running.stop().await;
}

/// A handler blocked inside a statement is stopped at `handler_timeout` like any other: its
/// statement is cancelled, so that the rollback does not wait for it (past `db_timeout` that
/// would be a database failure, no attempt counted, and the message never parked), and no
/// server backend is left running it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_stuck_in_a_statement_times_out_and_is_parked() {
    let env = env().await;
    let name = "stuck";
    let handler = Probe::new(name);
    let orders: Vec<String> = ["stuck-1", "o-1", "o-2", "o-3"].map(str::to_owned).to_vec();
    for id in &orders {
        publish(&env.js, &order(id)).await;
    }
    let config = ConsumerConfig {
        max_attempts: 2,
        concurrency: 2,
        handler_timeout: Duration::from_secs(1),
        db_timeout: Duration::from_secs(1),
        ..config(name)
    };
    let mut running = run(consumer(&env, config, &handler, false));
    let task = &running.task;
    wait_for(
        &env,
        name,
        "the others applied, stuck-1 parked",
        Duration::from_secs(30),
        async || {
            task.is_finished()
                || (applied(&env.pool, name).await == 3
                    && !letters(&env.pool, name).await.is_empty())
        },
    )
    .await;
    running.assert_still_running().await;
    let rows = letters(&env.pool, name).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(
        (rows[0].1.as_str(), rows[0].2.as_str(), rows[0].3),
        ("dead", "timeout", 2)
    );
    assert_eq!(handler.runs_of("stuck-1"), [1, 2]);
    let sleeping: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(3600)%' AND state = 'active'",
    )
    .fetch_one(&env.pool)
    .await
    .expect("activity");
    assert_eq!(
        sleeping, 0,
        "no backend is left running the stuck statement"
    );
    running.stop().await;
}

// ---------------------------------------------------------------------------------------
// 5. statement_timeout at COMMIT; the delivery-count safety limit.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_timeout_at_commit_is_a_failed_attempt() {
    let env = env().await;
    let name = "commit-timeout";
    // A deferred trigger that cancels the COMMIT of one order (57014, as statement_timeout).
    sqlx::raw_sql(
        "CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.order_id LIKE 'commit-timeout%' THEN
                 -- What a statement_timeout at COMMIT raises: 57014, query_canceled.
                 PERFORM pg_cancel_backend(pg_backend_pid());
                 PERFORM pg_sleep(1);
             END IF;
             RETURN NULL;
         END $$;
         CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON applied
             DEFERRABLE INITIALLY DEFERRED
             FOR EACH ROW EXECUTE FUNCTION slow_commit();",
    )
    .execute(&env.pool)
    .await
    .expect("trigger");
    let handler = Probe::new(name);
    for id in ["o-1", "commit-timeout-1", "o-2"] {
        publish(&env.js, &order(id)).await;
    }
    let mut running = run(consumer(&env, config(name), &handler, false));
    wait_for(
        &env,
        name,
        "o-1 and o-2 applied, the slow commit parked",
        Duration::from_secs(30),
        async || applied(&env.pool, name).await == 2 && !letters(&env.pool, name).await.is_empty(),
    )
    .await;
    running.assert_still_running().await;
    let rows = letters(&env.pool, name).await;
    assert_eq!(
        (rows[0].2.as_str(), rows[0].3),
        ("commit_failed", MAX_ATTEMPTS as i32),
        "{rows:?}"
    );
    assert!(rows[0].4.contains("canceling statement"), "{rows:?}");
    assert_eq!(handler.runs_of("commit-timeout-1"), [1, 2, 3]);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_redelivered_too_often_is_parked_as_deliveries_exhausted() {
    let env = env().await;
    let name = "redelivered";
    let poison = order("o-poison");
    // The inbox insert of one message always fails (not a handler attempt: a database
    // error, NAKed and redelivered); parking it (outcome dead_lettered) still works.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.message_id = '{}' AND NEW.outcome = 'processed' THEN
                 RAISE EXCEPTION 'the inbox refuses this message (test)';
             END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER poison BEFORE INSERT ON inbox_message
             FOR EACH ROW EXECUTE FUNCTION poison();",
        poison.id
    )))
    .execute(&env.pool)
    .await
    .expect("trigger");
    let handler = Probe::new(name);
    publish(&env.js, &order("o-1")).await;
    publish(&env.js, &poison).await;
    publish(&env.js, &order("o-2")).await;
    // The limit is at least 100 deliveries, and NAKs after a database error back off with
    // the delivery count: short delays keep the test short.
    let fast = ConsumerConfig {
        retry_min_delay: Duration::from_millis(5),
        retry_max_delay: Duration::from_millis(20),
        ..config(name)
    };
    let mut running = run(consumer(&env, fast, &handler, false));
    wait_for(
        &env,
        name,
        "o-1 and o-2 applied, o-poison parked",
        Duration::from_secs(40),
        async || applied(&env.pool, name).await == 2 && !letters(&env.pool, name).await.is_empty(),
    )
    .await;
    running.assert_still_running().await;
    let rows = letters(&env.pool, name).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].0, poison.id.to_string());
    assert_eq!(rows[0].2, "deliveries_exhausted", "{rows:?}");
    assert!(
        rows[0].4.contains("(100: 10 x max_attempts, at least 100)"),
        "{rows:?}"
    );
    assert!(
        handler.runs_of("o-poison").is_empty(),
        "its handler never ran"
    );
    let view = broker_view(&env.js, name).await.expect("durable");
    assert!(view.deliveries > 100, "{view:?}");
    wait_until(Duration::from_secs(10), "all acked", || async {
        all_acked(broker_view(&env.js, name).await)
    })
    .await
    .expect("terminated at the broker");
    running.stop().await;
}
