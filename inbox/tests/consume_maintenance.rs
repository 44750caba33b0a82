//! The inbox consumer against real PostgreSQL and nats-server: its maintenance services,
//! the `dlq retry` runner and the inbox cleaner.

mod common;

use std::time::{Duration, Instant};

use common::consume::*;
use common::*;
use envelope::Envelope;
use inbox::typed;
use sqlx::PgPool;
use testkit::{Postgres, wait_until};

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
