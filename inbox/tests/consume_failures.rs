//! The inbox consumer against real PostgreSQL and nats-server: failing handlers are retried
//! and then dead-lettered, undecodable messages parked at once with their bytes.

mod common;

use std::str::FromStr;
use std::time::Duration;

use async_nats::{HeaderMap, HeaderName, HeaderValue};
use common::consume::*;
use common::*;
use inbox::typed;
use testkit::wait_until;

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
