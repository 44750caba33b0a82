//! The relay library against real PostgreSQL and nats-server: drains exactly once in key
//! order, survives the broker being killed or paused, and parks poison rows.

mod common;

use std::time::Duration;

use common::*;
use testkit::wait_until;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drains_a_backlog_exactly_once_in_key_order() {
    let env = env().await;
    let expected = enqueue(&env.pool, 3000, 40).await;
    let relay = start_in_process(&env, test_config("relay-a")).await;
    let client = env.nats_client().await;
    wait_drained(&env, &client, expected.len(), Duration::from_secs(60)).await;
    assert!(
        relay.health.is_ready(),
        "ready while database and broker are up"
    );
    relay.stop().await;

    assert_exactly_once_in_key_order(&expected, &stream_messages(&client).await);
    // Every row records where the broker stored it.
    let unmarked = env
        .count("SELECT count(*) FROM outbox_message WHERE stream IS DISTINCT FROM 'OUTBOX' OR stream_seq IS NULL")
        .await;
    assert_eq!(
        unmarked, 0,
        "every published row has its PubAck stream and sequence"
    );
    let leases = env
        .count("SELECT count(*) FROM relay_partition_lease WHERE owner IS NOT NULL")
        .await;
    assert_eq!(leases, 0, "a stopped relay gives up its partitions");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_a_broker_sigkill_and_restart_mid_drain() {
    let mut env = env().await;
    let expected = enqueue(&env.pool, 20_000, 50).await;
    let relay = start_in_process(&env, test_config("relay-a")).await;
    wait_until(Duration::from_secs(30), "some published", || async {
        env.published().await >= 1000
    })
    .await
    .expect("progress before the kill");
    env.nats.kill().expect("SIGKILL nats-server");
    let at_kill = env.published().await;
    assert!(
        at_kill < expected.len() as i64,
        "the kill happened mid-drain ({at_kill} published)"
    );
    wait_until(
        Duration::from_secs(10),
        "readiness drops while the broker is down",
        || async { !relay.health.is_ready() },
    )
    .await
    .expect("not ready without a broker");
    env.nats
        .restart()
        .await
        .expect("restart nats-server on the same store");

    let client = env.nats_client().await;
    wait_drained(&env, &client, expected.len(), Duration::from_secs(90)).await;
    wait_until(Duration::from_secs(10), "ready again", || async {
        relay.health.is_ready()
    })
    .await
    .expect("ready after the broker returns");
    relay.stop().await;
    assert_exactly_once_in_key_order(&expected, &stream_messages(&client).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_a_broker_pause_longer_than_the_publish_timeout() {
    let env = env().await;
    let expected = enqueue(&env.pool, 20_000, 30).await;
    let config = test_config("relay-a");
    let publish_timeout = config.publish_timeout;
    let relay = start_in_process(&env, config).await;
    wait_until(Duration::from_secs(30), "some published", || async {
        env.published().await >= 1000
    })
    .await
    .expect("progress before the pause");
    env.nats.pause().expect("SIGSTOP nats-server");
    // Hold the broker stopped for longer than the publish timeout, measured by the relay
    // itself: wait until it has recorded a timed-out attempt.
    wait_until(
        publish_timeout * 10,
        "a publish times out while paused",
        || async {
            env.count("SELECT count(*) FROM outbox_message WHERE attempts > 0")
                .await
                > 0
        },
    )
    .await
    .expect("timeouts recorded while paused");
    env.nats.resume().expect("SIGCONT nats-server");

    let client = env.nats_client().await;
    wait_drained(&env, &client, expected.len(), Duration::from_secs(90)).await;
    relay.stop().await;
    assert_exactly_once_in_key_order(&expected, &stream_messages(&client).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_rows_go_to_dead_letter_while_other_keys_flow() {
    let env = env_with(testkit::NatsServerConfig {
        max_payload: Some(8192),
        ..Default::default()
    })
    .await;
    let outbox = outbox::Outbox::new("relay-test").expect("outbox");
    let mut conn = env.pool.acquire().await.expect("acquire");
    // One row on a subject no stream captures, one larger than the server accepts, and
    // good rows on the same keys after them and on other keys.
    let no_stream = outbox
        .enqueue_message(
            &mut conn,
            outbox::Message::raw("nowhere.event", "test.event.v1", "poison-1", "{}"),
        )
        .await
        .expect("enqueue");
    let too_large = outbox
        .enqueue_message(
            &mut conn,
            outbox::Message::raw("test.big", "test.event.v1", "poison-2", vec![b'x'; 20_000]),
        )
        .await
        .expect("enqueue");
    // Rows written around the outbox API, which the database accepts (it no longer re-checks
    // what the API validates) and the relay must park, never lose or publish: an empty
    // subject, headers that are not a JSON object, a subject far longer than a dead letter's
    // subject index can hold, and (publishable but failing) a negative attempt count.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let long_subject: String = (0..500)
        .map(|_| {
            // xorshift64: hex that does not compress below the index entry limit.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            format!("{state:016x}")
        })
        .collect();
    let mut written_around = Vec::new();
    for (subject, key, headers, attempts) in [
        ("", "poison-3", "{}", 0),
        ("test.event", "poison-4", "[1]", 0),
        (long_subject.as_str(), "poison-5", "{}", 0),
        ("nowhere.negative", "poison-6", "{}", -5),
    ] {
        let id: uuid::Uuid = sqlx::query_scalar(
            "INSERT INTO outbox_message (id, subject, event_type, source, partition_key, occurred_at, headers, payload, attempts)
             VALUES (gen_random_uuid(), $1, 'test.event.v1', 'sql', $2, now(), $3::jsonb, '{}', $4)
             RETURNING id",
        )
        .bind(subject)
        .bind(key)
        .bind(headers)
        .bind(attempts)
        .fetch_one(&mut *conn)
        .await
        .expect("insert around the API");
        written_around.push(id.to_string());
    }
    let mut expected = Vec::new();
    for key in [
        "poison-1", "poison-2", "poison-3", "poison-4", "poison-5", "poison-6",
    ] {
        let id = outbox
            .enqueue_message(
                &mut conn,
                outbox::Message::raw("test.event", "test.event.v1", key, "{}"),
            )
            .await
            .expect("enqueue");
        expected.push((id, key.to_owned()));
    }
    drop(conn);
    expected.extend(enqueue(&env.pool, 500, 10).await);

    let config = relay::RelayConfig {
        max_permanent_attempts: 3,
        ..test_config("relay-a")
    };
    let relay = start_in_process(&env, config).await;
    let client = env.nats_client().await;
    wait_drained(&env, &client, expected.len(), Duration::from_secs(60)).await;
    relay.stop().await;
    assert_exactly_once_in_key_order(&expected, &stream_messages(&client).await);

    let parked: Vec<(String, String, i32, String, i32)> = sqlx::query_as(
        "SELECT message_id, reason, attempts, subject, length(payload) FROM dead_letter
         WHERE source = 'relay' ORDER BY message_id",
    )
    .fetch_all(&env.pool)
    .await
    .expect("dead letters");
    let mut expected_parked = vec![
        (
            no_stream.to_string(),
            "no_stream",
            3,
            "nowhere.event".to_owned(),
            2,
        ),
        (
            too_large.to_string(),
            "payload_too_large",
            3,
            "test.big".to_owned(),
            20_000,
        ),
        // Rows that can never be published are parked at their first attempt.
        (
            written_around[0].clone(),
            "invalid_row",
            1,
            String::new(),
            2,
        ),
        (
            written_around[1].clone(),
            "invalid_row",
            1,
            "test.event".to_owned(),
            2,
        ),
        (
            written_around[2].clone(),
            "invalid_row",
            1,
            long_subject[..255].to_owned(),
            2,
        ),
        // A negative stored count is counted from 0.
        (
            written_around[3].clone(),
            "no_stream",
            3,
            "nowhere.negative".to_owned(),
            2,
        ),
    ];
    expected_parked.sort();
    let parked: Vec<(String, &str, i32, String, i32)> = parked
        .iter()
        .map(|(id, reason, attempts, subject, len)| {
            (
                id.clone(),
                reason.as_str(),
                *attempts,
                subject.clone(),
                *len,
            )
        })
        .collect();
    // A dead letter records every attempt; a row is parked after max_permanent_attempts
    // *permanent* failures, so a transient one on the way (a PubAck timeout on a loaded
    // machine) adds to its count. Compare the minimum.
    let parked: Vec<(String, &str, i32, String, i32)> = parked
        .into_iter()
        .zip(&expected_parked)
        .map(|(mut got, want)| {
            if got.2 > want.2 && want.2 == 3 {
                got.2 = want.2;
            }
            got
        })
        .collect();
    assert_eq!(
        parked, expected_parked,
        "every poison row parked once, with its reason"
    );
    assert_eq!(
        env.unpublished().await,
        0,
        "the poison rows left the outbox"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_the_database_refuses_does_not_stall_the_relay() {
    let env = env().await;
    // The database refuses this one row's dead letter (standing in for anything a row
    // written around the API could hold that dead_letter does not accept).
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_dead_letter() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.subject = 'refused.event' THEN RAISE EXCEPTION 'refused for the test'; END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER refuse_dead_letter BEFORE INSERT ON dead_letter
             FOR EACH ROW EXECUTE FUNCTION refuse_dead_letter();",
    )
    .execute(&env.pool)
    .await
    .expect("trigger");
    let outbox = outbox::Outbox::new("relay-test").expect("outbox");
    let mut conn = env.pool.acquire().await.expect("acquire");
    // No stream captures `refused.event`: a permanent failure, so the relay decides to park
    // it after the attempt limit; from then on the rows after it on its key may flow (as
    // after any dead letter), whether or not the dead letter could be written.
    let poison = outbox
        .enqueue_message(
            &mut conn,
            outbox::Message::raw("refused.event", "test.event.v1", "stuck-key", "{}"),
        )
        .await
        .expect("enqueue");
    let behind = outbox
        .enqueue_message(
            &mut conn,
            outbox::Message::raw("test.event", "test.event.v1", "stuck-key", "{}"),
        )
        .await
        .expect("enqueue");
    drop(conn);
    let others = enqueue(&env.pool, 300, 10).await;

    let config = relay::RelayConfig {
        max_permanent_attempts: 2,
        ..test_config("relay-a")
    };
    let relay = start_in_process(&env, config).await;
    let client = env.nats_client().await;
    // Every other row is published and marked although the refused dead letter was to be
    // written in the same batches; the poison row stays pending with the refusal recorded.
    let pool = env.pool.clone();
    wait_until(
        Duration::from_secs(30),
        "the other rows marked and the refusal recorded",
        || async {
            let pending: Vec<(uuid::Uuid, Option<String>)> = sqlx::query_as(
                "SELECT id, last_error FROM outbox_message WHERE status = 'pending' ORDER BY seq",
            )
            .fetch_all(&pool)
            .await
            .expect("pending");
            pending.len() == 1
                && pending[0].0 == poison.as_uuid()
                && pending[0]
                    .1
                    .as_deref()
                    .is_some_and(|e| e.contains("refused for the test"))
                && env.published().await == 301
        },
    )
    .await
    .expect("no stall");
    assert_eq!(
        env.count("SELECT count(*) FROM dead_letter").await,
        0,
        "nothing parked yet"
    );
    // Once the database accepts it, the row is parked and the key flows again.
    sqlx::raw_sql("DROP TRIGGER refuse_dead_letter ON dead_letter")
        .execute(&env.pool)
        .await
        .expect("drop trigger");
    let mut expected = others;
    expected.push((behind, "stuck-key".to_owned()));
    wait_drained(&env, &client, expected.len(), Duration::from_secs(30)).await;
    relay.stop().await;
    let messages = stream_messages(&client).await;
    assert_exactly_once_in_key_order(&expected, &messages);
    let parked: Vec<(String, String)> =
        sqlx::query_as("SELECT message_id, reason FROM dead_letter WHERE source = 'relay'")
            .fetch_all(&env.pool)
            .await
            .expect("dead letters");
    assert_eq!(parked, vec![(poison.to_string(), "no_stream".to_owned())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_notify_wakes_an_idle_relay_at_once() {
    let env = env().await;
    relay::store::enable_notify(&mut env.pool.acquire().await.expect("acquire"))
        .await
        .expect("install trigger");
    let slow_poll = Duration::from_secs(30);
    let config = relay::RelayConfig {
        listen_notify: true,
        poll_min_interval: slow_poll,
        poll_max_interval: slow_poll,
        ..test_config("relay-a")
    };
    let relay = start_in_process(&env, config).await;
    // 30 s: under a full `make test` on 2 cores, taking 256 leases once took longer than 10.
    // Only this test's database: other tests share the server.
    wait_until(Duration::from_secs(30), "the relay owns partitions and listens", || async {
        env.count("SELECT count(*) FROM relay_partition_lease WHERE owner = 'relay-a'").await == 256
            && env
                .count("SELECT count(*) FROM pg_stat_activity WHERE query ILIKE '%LISTEN%outbox_message%' AND pid <> pg_backend_pid() AND datname = current_database()")
                .await
                == 1
    })
    .await
    .expect("listening");
    // The relay's only claim so far found nothing; its next poll is 30 s away, so a publish
    // within a few seconds can only come from the notification.
    let expected = enqueue(&env.pool, 5, 5).await;
    let client = env.nats_client().await;
    wait_drained(&env, &client, expected.len(), Duration::from_secs(5)).await;
    relay.stop().await;
    assert_exactly_once_in_key_order(&expected, &stream_messages(&client).await);

    relay::store::disable_notify(&mut env.pool.acquire().await.expect("acquire"))
        .await
        .expect("remove trigger");
    assert!(
        !relay::store::notify_enabled(&mut env.pool.acquire().await.expect("acquire"))
            .await
            .expect("query")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_rows_are_deleted_after_the_retention_or_at_once_with_zero() {
    let env = env().await;
    let client = env.nats_client().await;
    // Kept for a moment, then removed by the cleaner.
    let first = enqueue(&env.pool, 200, 10).await;
    let config = relay::RelayConfig {
        retention: Duration::from_millis(500),
        cleaner_interval: Duration::from_millis(100),
        ..test_config("relay-a")
    };
    let relay = start_in_process(&env, config).await;
    wait_until(
        Duration::from_secs(20),
        "published rows recorded",
        || async { env.published().await == first.len() as i64 },
    )
    .await
    .expect("published and kept");
    wait_until(
        Duration::from_secs(20),
        "the cleaner removes them",
        || async { env.count("SELECT count(*) FROM outbox_message").await == 0 },
    )
    .await
    .expect("cleaned");
    relay.stop().await;

    // Retention zero: rows go as soon as their PubAck arrives.
    let second = enqueue(&env.pool, 200, 10).await;
    let config = relay::RelayConfig {
        retention: Duration::ZERO,
        ..test_config("relay-b")
    };
    let relay = start_in_process(&env, config).await;
    wait_until(Duration::from_secs(20), "deleted on PubAck", || async {
        stream_count(&client).await == (first.len() + second.len()) as u64
            && env.count("SELECT count(*) FROM outbox_message").await == 0
    })
    .await
    .expect("deleted");
    relay.stop().await;
    let mut all = first;
    all.extend(second);
    assert_exactly_once_in_key_order(&all, &stream_messages(&client).await);
}
