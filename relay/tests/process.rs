//! The `relay` binary as a separate process: SIGKILL between publish and mark, two
//! instances with one killed, SIGTERM, readiness following the broker, and the CLI.

mod common;

use std::time::{Duration, Instant};

use common::*;
use testkit::wait_until;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_between_publish_and_mark_loses_and_duplicates_nothing() {
    let env = env().await;
    let expected = enqueue(&env.pool, 20_000, 40).await;
    let client = env.nats_client().await;
    // A SHARE lock on the table lets the relay claim (row locks) and publish, but its UPDATE
    // marking rows published waits: every message it gets into the stream stays unmarked.
    let mut lock = env.pool.begin().await.expect("begin");
    sqlx::query("LOCK TABLE outbox_message IN SHARE MODE")
        .execute(&mut *lock)
        .await
        .expect("lock the outbox");
    let mut first = spawn_relay(&env, "relay-1", &[]);
    wait_until(
        Duration::from_secs(30),
        "the relay publishes at least a batch it cannot mark",
        || async { stream_count(&client).await >= 1024 },
    )
    .await
    .expect("published while unmarkable");
    first.sigkill();
    let in_stream: Vec<uuid::Uuid> = stream_messages(&client)
        .await
        .into_iter()
        .map(|(_, id, _)| id.parse().expect("message id is a uuid"))
        .collect();
    // A killed client's statement that waits on a lock still runs to completion on the
    // server; end the dead relay's sessions first, as the server would on noticing the
    // broken connection.
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE 'relay %' AND datname = current_database()",
    )
    .execute(&env.pool)
    .await
    .expect("terminate the dead relay's sessions");
    let pool = env.pool.clone();
    wait_until(
        Duration::from_secs(10),
        "the dead relay's sessions are gone",
        || async {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'relay %' AND datname = current_database()",
            )
            .fetch_one(&pool)
            .await
            .is_ok_and(|n| n == 0)
        },
    )
    .await
    .expect("sessions gone");
    lock.rollback().await.expect("release the lock");
    let unmarked: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox_message WHERE id = ANY($1) AND status = 'pending'",
    )
    .bind(&in_stream)
    .fetch_one(&env.pool)
    .await
    .expect("count");
    assert_eq!(
        unmarked,
        in_stream.len() as i64,
        "the kill fell between publish and mark for every message in the stream"
    );
    let locked_elsewhere: i64 = env
        .count(
            "SELECT count(*) - (SELECT count(*) FROM (SELECT 1 FROM outbox_message
                 FOR UPDATE SKIP LOCKED) AS free) FROM outbox_message",
        )
        .await;
    assert_eq!(
        locked_elsewhere, 0,
        "the dead relay's claims ended with its sessions"
    );

    let _second = spawn_relay(&env, "relay-2", &[]);
    wait_drained(&env, &client, expected.len(), Duration::from_secs(60)).await;
    assert_exactly_once_in_key_order(&expected, &stream_messages(&client).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_share_partitions_and_the_survivor_takes_over_a_killed_one() {
    let env = env().await;
    let client = env.nats_client().await;
    let mut one = spawn_relay(&env, "relay-1", &[]);
    let _two = spawn_relay(&env, "relay-2", &[]);
    wait_until(
        Duration::from_secs(20),
        "both relays own partitions",
        || async {
            env.count(
                "SELECT count(DISTINCT owner) FROM relay_partition_lease WHERE lease_until > now()",
            )
            .await
                == 2
                && env
                    .count("SELECT count(*) FROM relay_partition_lease WHERE lease_until > now()")
                    .await
                    == 256
        },
    )
    .await
    .expect("partitions shared");
    let overlap = env
        .count("SELECT count(*) - count(DISTINCT partition_id) FROM relay_partition_lease WHERE owner IS NOT NULL")
        .await;
    assert_eq!(overlap, 0, "no partition has two owners");

    let mut expected = enqueue(&env.pool, 20_000, 64).await;
    wait_until(Duration::from_secs(30), "both draining", || async {
        env.published().await >= 1000
    })
    .await
    .expect("progress");
    one.sigkill();
    let killed_at = Instant::now();
    expected.extend(enqueue(&env.pool, 2000, 64).await);
    wait_until(Duration::from_secs(15), "relay-2 owns every partition", || async {
        env.count("SELECT count(*) FROM relay_partition_lease WHERE owner = 'relay-2' AND lease_until > now()").await == 256
    })
    .await
    .expect("takeover");
    let takeover = killed_at.elapsed();
    assert!(
        takeover < Duration::from_secs(8),
        "takeover took {takeover:?}"
    );

    wait_drained(&env, &client, expected.len(), Duration::from_secs(60)).await;
    assert_exactly_once_in_key_order(&expected, &stream_messages(&client).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_or_releases_the_claimed_batch() {
    let env = env().await;
    let client = env.nats_client().await;
    let expected = enqueue(&env.pool, 20_000, 40).await;
    let mut first = spawn_relay(&env, "relay-1", &[]);
    wait_until(Duration::from_secs(30), "draining", || async {
        env.published().await >= 500
    })
    .await
    .expect("progress");
    let status = first.sigterm(Duration::from_secs(20)).await;
    assert!(status.success(), "clean exit after SIGTERM: {status:?}");
    assert_eq!(
        env.count(
            "SELECT count(*) - (SELECT count(*) FROM (SELECT 1 FROM outbox_message
                 FOR UPDATE SKIP LOCKED) AS free) FROM outbox_message"
        )
        .await,
        0,
        "no row is left locked"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM relay_partition_lease WHERE owner IS NOT NULL")
            .await,
        0,
        "partitions were given up"
    );
    let in_stream = stream_count(&client).await as i64;
    assert_eq!(
        in_stream,
        env.published().await,
        "everything acknowledged was marked before exiting"
    );

    let _second = spawn_relay(&env, "relay-2", &[]);
    wait_drained(&env, &client, expected.len(), Duration::from_secs(60)).await;
    assert_exactly_once_in_key_order(&expected, &stream_messages(&client).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_broker_and_a_relay_starts_without_one() {
    let mut env = env().await;
    env.nats.stop().await.expect("stop nats-server");
    let relay = spawn_relay(&env, "relay-1", &[]);
    wait_until(Duration::from_secs(20), "liveness answers", || async {
        matches!(http_get(relay.http, "/health").await, Some((200, _)))
    })
    .await
    .expect("/health up without a broker");
    // Once the relay has reached its database, readiness reports the missing broker.
    wait_until(
        Duration::from_secs(20),
        "not ready because of the broker",
        || async {
            match http_get(relay.http, "/health/ready").await {
                Some((503, body)) => {
                    let report: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
                    report["database"] == true && report["broker"] == false
                }
                _ => false,
            }
        },
    )
    .await
    .expect("503 with broker=false while the broker is down");

    let expected = enqueue(&env.pool, 200, 10).await;
    env.nats.restart().await.expect("start the broker");
    wait_until(
        Duration::from_secs(20),
        "ready once the broker is up",
        || async { matches!(http_get(relay.http, "/health/ready").await, Some((200, _))) },
    )
    .await
    .expect("ready");
    let client = env.nats_client().await;
    wait_drained(&env, &client, expected.len(), Duration::from_secs(30)).await;

    env.nats.kill().expect("SIGKILL nats-server");
    wait_until(
        Duration::from_secs(20),
        "not ready after the broker dies",
        || async { matches!(http_get(relay.http, "/health/ready").await, Some((503, _))) },
    )
    .await
    .expect("not ready");
    env.nats.restart().await.expect("restart nats-server");
    wait_until(Duration::from_secs(20), "ready again", || async {
        matches!(http_get(relay.http, "/health/ready").await, Some((200, _)))
    })
    .await
    .expect("ready again");
    let (status, metrics) = http_get(relay.http, "/metrics").await.expect("metrics");
    assert_eq!(status, 200);
    for name in [
        "relay_published_total",
        "relay_publish_latency_seconds",
        "relay_batch_size",
        "relay_backlog",
    ] {
        assert!(metrics.contains(name), "/metrics lacks {name}");
    }
    assert_exactly_once_in_key_order(&expected, &stream_messages(&client).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_commands_and_their_errors() {
    let env = env().await;
    let db = env.db_url.as_str();
    let nats = env.nats.url();

    let (code, out, _) = relay_cli(&["migrate"], &[("DATABASE_URL", db)]);
    assert_eq!((code, out.trim()), (0, "schema is up to date"));

    let stream_env = [
        ("NATS_URL", nats),
        ("RELAY_STREAM", "FRESH"),
        ("RELAY_STREAM_SUBJECTS", "fresh.>"),
    ];
    let (code, out, err) = relay_cli(&["stream", "ensure"], &stream_env);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("created stream FRESH"), "{out}");
    let (code, out, _) = relay_cli(&["stream", "ensure"], &stream_env);
    assert_eq!(code, 0);
    assert!(out.starts_with("stream FRESH captures"), "{out}");
    let (code, _, err) = relay_cli(
        &["stream", "ensure"],
        &[
            ("NATS_URL", nats),
            ("RELAY_STREAM", "FRESH"),
            ("RELAY_STREAM_SUBJECTS", "other.>"),
        ],
    );
    assert_eq!(code, 1);
    assert_eq!(err.trim().lines().count(), 1, "one readable line: {err}");
    assert!(
        err.contains("do not capture") && err.contains("other.>"),
        "{err}"
    );

    enqueue(&env.pool, 25, 5).await;
    let (code, out, err) = relay_cli(&["status", "--json"], &[("DATABASE_URL", db)]);
    assert_eq!(code, 0, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).expect("JSON status");
    assert_eq!(status["backlog"], 25);
    assert_eq!(status["dead_letters"], 0);

    let (code, _, err) = relay_cli(&["status"], &[]);
    assert_eq!(code, 1);
    assert_eq!(
        err.trim(),
        "relay: no database: set DATABASE_URL or pass --database-url"
    );

    let (code, _, err) = relay_cli(&["run", "--batch-size", "0"], &[("DATABASE_URL", db)]);
    assert_eq!(code, 1);
    assert!(
        err.trim()
            .starts_with("relay: invalid relay configuration: batch_size"),
        "{err}"
    );

    let (code, _, err) = relay_cli(
        &["run", "--publish-timeout", "5 parsecs"],
        &[("DATABASE_URL", db)],
    );
    assert_eq!(code, 2, "usage errors exit 2: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_republishes_what_a_broker_lost() {
    let mut env = env().await;
    let expected = enqueue(&env.pool, 300, 10).await;
    let relay = start_in_process(&env, test_config("relay-a")).await;
    let client = env.nats_client().await;
    wait_drained(&env, &client, expected.len(), Duration::from_secs(30)).await;
    relay.stop().await;

    // The broker loses its data: killed, store wiped, restarted empty, stream recreated.
    env.nats.kill().expect("kill");
    let store = env.nats.store_dir().expect("kit-started server").to_owned();
    std::fs::remove_dir_all(&store).expect("wipe the JetStream store");
    env.nats.restart().await.expect("restart");
    drop(client);
    let fresh = env_stream(&env).await;
    assert_eq!(stream_count(&fresh).await, 0, "the broker lost everything");

    let (code, out, err) = relay_cli(
        &["reconcile", "--since", "1h"],
        &[
            ("DATABASE_URL", &env.db_url),
            ("NATS_URL", env.nats.url()),
            ("RELAY_STREAM", STREAM),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), format!("checked=300 present=0 republished=300"));

    let relay = start_in_process(&env, test_config("relay-a")).await;
    wait_drained(&env, &fresh, expected.len(), Duration::from_secs(30)).await;
    relay.stop().await;
    assert_exactly_once_in_key_order(&expected, &stream_messages(&fresh).await);
    let (_, out, _) = relay_cli(
        &["reconcile", "--since", "1h", "--dry-run"],
        &[
            ("DATABASE_URL", &env.db_url),
            ("NATS_URL", env.nats.url()),
            ("RELAY_STREAM", STREAM),
        ],
    );
    assert_eq!(out.trim(), "checked=300 present=300 would_republish=0");
}

/// Recreates the test stream on a wiped broker; returns a client.
async fn env_stream(env: &Env) -> async_nats::Client {
    let client = env.nats_client().await;
    relay::publisher::jetstream::ensure_stream(
        &async_nats::jetstream::new(client.clone()),
        &relay::publisher::jetstream::StreamSpec {
            name: STREAM.into(),
            subjects: vec!["test.>".into()],
            duplicate_window: Duration::from_secs(120),
            replicas: 1,
        },
    )
    .await
    .expect("recreate stream");
    client
}

/// `relay run --ensure-stream` creates the stream with the configured settings (it used to
/// take a 2-minute window and 1 replica whatever was asked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_with_ensure_stream_creates_the_stream_as_configured() {
    let env = env().await;
    let client = env.nats_client().await;
    let js = async_nats::jetstream::new(client.clone());
    let _ = js.delete_stream(STREAM).await;
    let relay = spawn_relay(
        &env,
        "relay-ensure",
        &[
            "--ensure-stream",
            "--duplicate-window",
            "45s",
            "--replicas",
            "1",
        ],
    );
    wait_until(Duration::from_secs(20), "the stream exists", || async {
        js.get_stream(STREAM).await.is_ok()
    })
    .await
    .expect("created by the relay");
    let mut stream = js.get_stream(STREAM).await.expect("stream");
    let info = stream.info().await.expect("info");
    assert_eq!(info.config.duplicate_window, Duration::from_secs(45));
    assert_eq!(info.config.num_replicas, 1);
    let expected = enqueue(&env.pool, 50, 5).await;
    wait_drained(&env, &client, expected.len(), Duration::from_secs(30)).await;
    drop(relay);
}
