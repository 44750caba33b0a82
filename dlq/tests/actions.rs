//! `dlq::actions` against a real PostgreSQL: two retries of one relay dead letter at once
//! send it back to the outbox once; the second is told it was retried meanwhile.

use std::time::Duration;

use dlq::actions::{self, ActionError};
use dlq::store::Filter;
use dlq::{DeadLetter, Source};
use envelope::{Envelope, HeaderText};
use sqlx::PgPool;

#[derive(serde::Serialize, serde::Deserialize)]
struct Ping {
    n: u32,
}

impl envelope::Event for Ping {
    const NAME: &'static str = "test.ping";
    const VERSION: u32 = 1;
    fn partition_key(&self) -> String {
        format!("k-{}", self.n)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_retries_at_once_send_a_relay_letter_back_once() {
    let pg = testkit::Postgres::start().await.expect("PostgreSQL");
    let url = pg.fresh_database().await.expect("db");
    let pool = PgPool::connect(&url).await.expect("connect");
    migrations::migrate(&mut pool.acquire().await.expect("acquire"))
        .await
        .expect("migrate");
    let env = Envelope::from_event(HeaderText::new("s", "svc").expect("valid"), &Ping { n: 1 })
        .expect("valid");
    let headers = dlq::headers_to_json(&envelope::nats::to_headers(&env).expect("headers"));
    let letter = DeadLetter {
        source: Source::Relay,
        consumer: "relay".into(),
        message_id: env.id.to_string(),
        subject: env.subject.as_str().to_owned(),
        partition_key: Some("k-1".into()),
        headers,
        payload: env.payload.to_vec(),
        reason: "no_stream".into(),
        error_chain: vec!["no stream".into()],
        attempts: 5,
        stream: None,
        stream_seq: None,
    };
    let id = dlq::store::record(&mut pool.acquire().await.expect("conn"), &letter)
        .await
        .expect("record");
    let filter = Filter {
        ids: Some(vec![id]),
        ..Filter::default()
    };

    // The first retry holds its transaction open; the second starts meanwhile, sees the
    // letter dead, and waits for the first's row lock.
    let mut first = pool.begin().await.expect("begin");
    let retried = actions::retry(&mut first, &filter)
        .await
        .expect("first retry");
    assert_eq!(retried.to_outbox, 1);
    let second_pool = pool.clone();
    let second_filter = filter.clone();
    let second = tokio::spawn(async move {
        let mut conn = second_pool.acquire().await.expect("conn");
        actions::retry(&mut conn, &second_filter).await
    });
    testkit::wait_for(
        Duration::from_secs(10),
        "the second retry to wait for the lock",
        || async {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'",
            )
            .fetch_one(&pool)
            .await?;
            anyhow::Ok((waiting > 0).then_some(()))
        },
    )
    .await
    .expect("waits");
    first.commit().await.expect("commit");
    match second.await.expect("task") {
        Err(ActionError::NotDead { id: got, status }) => {
            assert_eq!((got, status.as_str()), (id, "retried"))
        }
        other => panic!("expected NotDead, got {other:?}"),
    }
    let in_outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_message")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(in_outbox, 1, "sent back once");
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Placed {
    key: u32,
    n: u32,
}

impl envelope::Event for Placed {
    const NAME: &'static str = "test.placed";
    const VERSION: u32 = 1;
    fn partition_key(&self) -> String {
        format!("key-{}", self.key)
    }
}

/// Relay dead letters of several keys, parked interleaved in a seeded order (each key's in
/// its own order, as the relay parks a key's head first), all retried at once: each key's
/// messages go back to the outbox in the order they were parked, so they are published in
/// it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_relay_letters_keep_each_keys_order() {
    let pg = testkit::Postgres::start().await.expect("PostgreSQL");
    let url = pg.fresh_database().await.expect("db");
    let pool = PgPool::connect(&url).await.expect("connect");
    migrations::migrate(&mut pool.acquire().await.expect("acquire"))
        .await
        .expect("migrate");
    for seed in [1u64, 2, 3] {
        sqlx::raw_sql("DELETE FROM outbox_message; DELETE FROM dead_letter;")
            .execute(&pool)
            .await
            .expect("reset");
        // Which key parks next: a seeded walk over 4 keys, 6 letters each.
        let mut state = seed;
        let mut next = [0u32; 4];
        let mut parked: Vec<(u32, String)> = Vec::new();
        while parked.len() < 24 {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            let key = ((state >> 33) % 4) as usize;
            if next[key] == 6 {
                continue;
            }
            let env = Envelope::from_event(
                HeaderText::new("s", "svc").expect("valid"),
                &Placed {
                    key: key as u32,
                    n: next[key],
                },
            )
            .expect("valid");
            next[key] += 1;
            let letter = DeadLetter {
                source: Source::Relay,
                consumer: "relay".into(),
                message_id: env.id.to_string(),
                subject: env.subject.as_str().to_owned(),
                partition_key: Some(format!("key-{key}")),
                headers: dlq::headers_to_json(&envelope::nats::to_headers(&env).expect("headers")),
                payload: env.payload.to_vec(),
                reason: "no_stream".into(),
                error_chain: vec!["no stream".into()],
                attempts: 5,
                stream: None,
                stream_seq: None,
            };
            dlq::store::record(&mut pool.acquire().await.expect("conn"), &letter)
                .await
                .expect("record");
            parked.push((key as u32, env.id.to_string()));
        }
        let retried = actions::retry(&mut pool.acquire().await.expect("conn"), &Filter::default())
            .await
            .expect("retry all");
        assert_eq!(retried.to_outbox, 24, "seed {seed}");
        let outbox: Vec<(String, String)> =
            sqlx::query_as("SELECT partition_key, id::text FROM outbox_message ORDER BY seq")
                .fetch_all(&pool)
                .await
                .expect("outbox");
        for key in 0..4u32 {
            let want: Vec<&str> = parked
                .iter()
                .filter(|(k, _)| *k == key)
                .map(|(_, id)| id.as_str())
                .collect();
            let got: Vec<&str> = outbox
                .iter()
                .filter(|(k, _)| *k == format!("key-{key}"))
                .map(|(_, id)| id.as_str())
                .collect();
            assert_eq!(got, want, "seed {seed}: key-{key} reordered");
        }
    }
}
