//! A database that stops answering (the connection stays open, nothing comes back) must not
//! hang the consumer: readiness turns false within seconds, consuming resumes once it
//! answers again with every message applied exactly once, and a stop while it is silent
//! ends within a bound. Against real PostgreSQL (behind the test kit's proxy) and
//! nats-server.

mod common;

use std::time::Duration;

use common::*;
use inbox::{Consumer, ConsumerConfig, Delivery, Handler, HandlerError, Mode, typed};
use sqlx::PgConnection;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use testkit::{TcpProxy, wait_until};
use tokio::time::Instant;

const NAME: &str = "stalled";

struct Applies;

impl Handler<OrderPlaced> for Applies {
    async fn handle(
        &self,
        conn: &mut PgConnection,
        event: OrderPlaced,
        _: &Delivery,
    ) -> Result<(), HandlerError> {
        sqlx::query("INSERT INTO applied (consumer, order_id) VALUES ($1, $2)")
            .bind(NAME)
            .bind(&event.order_id)
            .execute(&mut *conn)
            .await
            .map_err(HandlerError::retry)?;
        Ok(())
    }
}

fn config(mode: Mode) -> ConsumerConfig {
    ConsumerConfig {
        filter_subjects: vec!["orders.>".into()],
        mode,
        concurrency: 4,
        db_timeout: Duration::from_secs(1),
        handler_timeout: Duration::from_secs(2),
        ack_wait: Duration::from_secs(2),
        retry_min_delay: Duration::from_millis(100),
        retry_max_delay: Duration::from_secs(1),
        retry_poll_interval: Duration::from_millis(200),
        ..ConsumerConfig::new(NAME, "ORDERS")
    }
}

/// Waits until every order of `0..n` is applied, then checks each exactly once and no dead
/// letter (database failures are not handler attempts).
async fn assert_all_applied_once(env: &Env, n: usize, within: Duration) {
    wait_until(within, "every message applied", || async {
        applied(&env.pool, NAME).await >= n as i64
    })
    .await
    .expect("every message applied in time");
    let per_order = applied_per_order(&env.pool, NAME).await;
    let twice: Vec<_> = per_order.iter().filter(|(_, c)| **c != 1).collect();
    assert!(twice.is_empty(), "applied more than once: {twice:?}");
    assert_eq!(per_order.len(), n, "every order applied");
    assert_eq!(dead_letters(&env.pool, NAME).await, 0, "nothing parked");
}

async fn silent_database_unready_then_resumes(mode: Mode) {
    let env = env().await;
    let proxy = TcpProxy::start(env.pg.addr()).await.expect("proxy");
    let options: PgConnectOptions = env.db_url.parse().expect("url");
    let first = config(mode);
    let pool = PgPoolOptions::new()
        .max_connections(first.concurrency as u32 + 2)
        .acquire_timeout(Duration::from_secs(1))
        .connect_lazy_with(options.port(proxy.addr().port()));
    let consumer = Consumer::new(first, pool, env.js.clone(), typed(Applies)).expect("consumer");
    let health = consumer.health();
    assert!(!health.is_ready(), "not ready before run");
    let mut running = run(consumer);
    wait_until(Duration::from_secs(10), "ready", || async {
        health.is_ready()
    })
    .await
    .expect("ready once consuming");

    const FIRST: usize = 6_000;
    publish_orders(&env.js, (0..FIRST).map(|i| format!("o-{i}"))).await;
    wait_until(Duration::from_secs(30), "some applied", || async {
        applied(&env.pool, NAME).await >= 300
    })
    .await
    .expect("progress before the stall");
    proxy.stall();
    let stalled_at = Instant::now();
    wait_until(
        Duration::from_secs(10),
        "readiness turns false while the database is silent",
        || async { !health.is_ready() },
    )
    .await
    .expect("not ready while the database does not answer");
    println!("unready {:?} after the stall", stalled_at.elapsed());
    assert!(!health.report().database, "{:?}", health.report());
    let during = applied(&env.pool, NAME).await;
    assert!(
        during < FIRST as i64,
        "the stall happened mid-stream ({during} applied)"
    );
    running.assert_still_running().await;
    proxy.unstall();
    assert_all_applied_once(&env, FIRST, Duration::from_secs(90)).await;
    wait_until(Duration::from_secs(10), "ready again", || async {
        health.is_ready()
    })
    .await
    .expect("ready after the database answers again");

    // A stop while the database is silent mid-stream ends within a bound: a lane's step
    // waits db_timeout at most, a handler stuck in a statement handler_timeout and then its
    // rollback db_timeout, the replies 2 s each, the last flush 5 s.
    const SECOND: usize = 6_000;
    publish_orders(&env.js, (FIRST..FIRST + SECOND).map(|i| format!("o-{i}"))).await;
    wait_until(Duration::from_secs(30), "more applied", || async {
        applied(&env.pool, NAME).await >= FIRST as i64 + 300
    })
    .await
    .expect("progress before the second stall");
    proxy.stall();
    let asked = Instant::now();
    running.ask_to_stop();
    let bound = Duration::from_secs(15);
    let returned = tokio::time::timeout(bound, &mut running.task)
        .await
        .unwrap_or_else(|_| {
            panic!("run() did not return within {bound:?} of a stop while the database is silent")
        })
        .expect("task");
    returned.expect("run returns Ok after a requested shutdown");
    println!("stopped {:?} after asked", asked.elapsed());
    assert!(!health.is_ready(), "not ready once stopped");

    // Nothing lost: another consumer on the same durable, with a working connection,
    // applies the rest, each message once.
    proxy.unstall();
    let direct = PgPoolOptions::new()
        .max_connections(8)
        .connect(&env.db_url)
        .await
        .expect("pool");
    let again =
        Consumer::new(config(mode), direct, env.js.clone(), typed(Applies)).expect("consumer");
    let running = run(again);
    assert_all_applied_once(&env, FIRST + SECOND, Duration::from_secs(90)).await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_a_silent_database_turns_the_consumer_unready_and_it_resumes() {
    silent_database_unready_then_resumes(Mode::Strict).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_a_silent_database_turns_the_consumer_unready_and_it_resumes() {
    silent_database_unready_then_resumes(Mode::Batched { max_messages: 50 }).await;
}
