//! `relay run --source wal` against a real PostgreSQL (`wal_level=logical`) and nats-server:
//! log storage and table rows published exactly once in key order, the slot commands,
//! standby takeover after SIGKILL, poison messages, an unknown format version, and the
//! errors at start.

mod common;

use std::time::Duration;

use common::*;
use outbox::{Message, MessageId, Outbox, OutboxConfig, Storage};
use sqlx::PgPool;
use testkit::wait_until;

fn log_outbox() -> Outbox {
    Outbox::with_config(OutboxConfig {
        storage: Storage::Log,
        ..OutboxConfig::for_source("relay-test")
    })
    .expect("outbox")
}

fn message(i: usize, keys: usize) -> (Message, String) {
    let key = format!("key-{}", i % keys);
    let msg = Message::json(
        "test.event",
        "test.event.v1",
        key.clone(),
        &serde_json::json!({ "i": i }),
    )
    .expect("json");
    (msg, key)
}

/// `n` messages over `keys` keys, alternating in chunks between log storage (through
/// `OutboxTransaction` and `enqueue_many`) and table rows, committed one after another: the
/// commit order is the list's order.
async fn enqueue_mixed(
    pool: &PgPool,
    from: usize,
    n: usize,
    keys: usize,
) -> Vec<(MessageId, String)> {
    let log = log_outbox();
    let table = Outbox::new("relay-test").expect("outbox");
    let mut out = Vec::with_capacity(n);
    for (chunk, start) in (from..from + n).step_by(100).enumerate() {
        let batch: Vec<(Message, String)> = (start..(from + n).min(start + 100))
            .map(|i| message(i, keys))
            .collect();
        let keys: Vec<String> = batch.iter().map(|(_, k)| k.clone()).collect();
        let ids = match chunk % 3 {
            0 => {
                let mut tx = log.begin(pool).await.expect("begin");
                let ids: Vec<MessageId> = batch
                    .into_iter()
                    .map(|(m, _)| tx.enqueue_message(m).expect("buffered"))
                    .collect();
                tx.commit().await.expect("commit");
                ids
            }
            1 => {
                let mut conn = pool.acquire().await.expect("acquire");
                log.enqueue_many(&mut conn, batch.into_iter().map(|(m, _)| m))
                    .await
                    .expect("enqueue")
            }
            _ => {
                let mut conn = pool.acquire().await.expect("acquire");
                table
                    .enqueue_many(&mut conn, batch.into_iter().map(|(m, _)| m))
                    .await
                    .expect("enqueue")
            }
        };
        out.extend(ids.into_iter().zip(keys));
    }
    out
}

fn slot_cli(env: &Env, action: &str) -> (i32, String, String) {
    relay_cli(&["slot", action], &[("DATABASE_URL", env.db_url.as_str())])
}

async fn slot_status(env: &Env) -> serde_json::Value {
    let (code, out, err) = slot_cli(env, "status");
    assert_eq!(code, 0, "slot status: {err}");
    serde_json::from_str(&out).expect("slot status is JSON")
}

async fn rows(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM outbox_message")
        .fetch_one(pool)
        .await
        .expect("count")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_and_table_messages_are_published_once_in_key_order_and_rows_removed() {
    let env = env_logical().await;
    let (code, out, err) = slot_cli(&env, "create");
    assert_eq!(code, 0, "slot create: {err}");
    assert!(out.contains("slot outbox_relay created"), "{out}");
    let (code, out, _) = slot_cli(&env, "create");
    assert_eq!(code, 0);
    assert!(out.contains("already exists"), "{out}");

    let client = env.nats_client().await;
    let mut expected = enqueue_mixed(&env.pool, 0, 3_000, 37).await;
    let relay = spawn_relay(&env, "wal-1", &["--source", "wal"]);
    // More while it streams.
    expected.extend(enqueue_mixed(&env.pool, 3_000, 3_000, 37).await);
    wait_until(
        Duration::from_secs(60),
        "every message in the stream",
        || async { stream_count(&client).await as usize >= expected.len() },
    )
    .await
    .expect("published");
    assert_exactly_once_in_key_order(&expected, &stream_messages(&client).await);
    let pool = env.pool.clone();
    wait_until(
        Duration::from_secs(20),
        "relayed table rows deleted",
        || async { rows(&pool).await == 0 },
    )
    .await
    .expect("rows deleted");

    let (code, body) = http_get(relay.http, "/health/ready")
        .await
        .expect("ready endpoint");
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("\"source\":\"wal\"") && body.contains("\"streaming\":true"),
        "{body}"
    );
    // The confirmed position reaches the end of what was written, within seconds.
    let end: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(&env.pool)
        .await
        .expect("lsn");
    let pool = env.pool.clone();
    wait_until(Duration::from_secs(10), "the slot confirmed everything", || async {
        sqlx::query_scalar::<_, bool>(
            "SELECT confirmed_flush_lsn >= $1::pg_lsn FROM pg_replication_slots WHERE slot_name = 'outbox_relay'",
        )
        .bind(&end)
        .fetch_one(&pool)
        .await
        .unwrap_or(false)
    })
    .await
    .expect("confirmed");
    let status = slot_status(&env).await;
    assert_eq!(status["active"], true, "{status}");
    let (code, _, err) = slot_cli(&env, "drop");
    assert_ne!(code, 0, "drop is refused while a relay streams the slot");
    assert!(err.contains("a relay streams it now"), "{err}");
    drop(relay);
    wait_until(
        Duration::from_secs(20),
        "the killed relay's session ends",
        || async { slot_status(&env).await["active"] == false },
    )
    .await
    .expect("inactive");
    let (code, out, err) = slot_cli(&env, "drop");
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("dropped"), "{out}");
    assert_ne!(slot_cli(&env, "status").0, 0, "no slot any more");
}

/// A slot dropped under a running relay: it turns not ready and stops with an error that
/// names the slot, publishing nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_dropped_under_a_running_relay_stops_it_with_a_clear_error() {
    let env = env_logical().await;
    assert_eq!(slot_cli(&env, "create").0, 0);
    let client = env.nats_client().await;
    let expected = enqueue_mixed(&env.pool, 0, 500, 5).await;
    let mut relay = spawn_relay(&env, "wal-d", &["--source", "wal"]);
    wait_until(Duration::from_secs(30), "published", || async {
        stream_count(&client).await as usize >= expected.len()
    })
    .await
    .expect("published");
    // End its session and drop the slot before it reconnects.
    sqlx::query(
        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
         WHERE slot_name = 'outbox_relay'",
    )
    .execute(&env.pool)
    .await
    .expect("terminate the walsender");
    let pool = env.pool.clone();
    wait_until(Duration::from_secs(10), "the slot is dropped", || async {
        sqlx::query("SELECT pg_drop_replication_slot('outbox_relay')")
            .execute(&pool)
            .await
            .is_ok()
    })
    .await
    .expect("dropped");
    let exit = relay.wait_exit(Duration::from_secs(30)).await;
    assert!(!exit.success(), "{exit}");
    let log = relay.log_tail();
    assert!(
        log.contains("replication slot outbox_relay") && log.contains("does not exist"),
        "{log}"
    );
    assert_exactly_once_in_key_order(&expected, &stream_messages(&client).await);
}

/// Two relays on one slot: one streams, the other waits as a ready standby; SIGKILL the
/// first mid-stream and the standby takes over from the confirmed position: nothing lost,
/// nothing stored twice, keys in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_a_killed_relay_without_loss_or_disorder() {
    let env = env_logical().await;
    assert_eq!(slot_cli(&env, "create").0, 0);
    let client = env.nats_client().await;
    let mut first = spawn_relay(&env, "wal-a", &["--source", "wal"]);
    let pool = env.pool.clone();
    wait_until(
        Duration::from_secs(20),
        "the first relay streams",
        || async {
            sqlx::query_scalar::<_, bool>(
                "SELECT active FROM pg_replication_slots WHERE slot_name = 'outbox_relay'",
            )
            .fetch_one(&pool)
            .await
            .unwrap_or(false)
        },
    )
    .await
    .expect("streaming");
    let second = spawn_relay(&env, "wal-b", &["--source", "wal"]);
    wait_until(
        Duration::from_secs(20),
        "the second relay is a ready standby",
        || async {
            http_get(second.http, "/health/ready")
                .await
                .is_some_and(|(code, body)| code == 200 && body.contains("\"standby\":true"))
        },
    )
    .await
    .expect("standby");

    let writer = {
        let pool = env.pool.clone();
        tokio::spawn(async move { enqueue_mixed(&pool, 0, 12_000, 53).await })
    };
    wait_until(
        Duration::from_secs(60),
        "the first relay publishes some",
        || async { stream_count(&client).await >= 1_500 },
    )
    .await
    .expect("publishing");
    first.sigkill();
    let expected = writer.await.expect("writer");
    wait_until(
        Duration::from_secs(90),
        "the standby publishes the rest",
        || async { stream_count(&client).await as usize >= expected.len() },
    )
    .await
    .expect("taken over");
    assert_exactly_once_in_key_order(&expected, &stream_messages(&client).await);
    let (code, body) = http_get(second.http, "/health/ready").await.expect("ready");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"streaming\":true"), "{body}");
}

/// Poison is dead-lettered and passed; a message of an unknown format version stops the
/// relay with an error and is never confirmed: a restart stops at it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_is_dead_lettered_and_an_unknown_version_stops_unconfirmed() {
    let env = env_logical().await;
    assert_eq!(slot_cli(&env, "create").0, 0);
    let client = env.nats_client().await;
    let before = enqueue_mixed(&env.pool, 0, 300, 7).await;
    sqlx::query("SELECT pg_logical_emit_message(true, 'outbox', 'not an outbox message'::bytea)")
        .execute(&env.pool)
        .await
        .expect("poison");
    // A valid table row by SQL with a subject the broker would refuse: invalid row.
    sqlx::query(
        "INSERT INTO outbox_message (id, subject, event_type, source, partition_key, occurred_at, payload)
         VALUES (gen_random_uuid(), 'test.bad subject', 'test.event.v1', 'sql', 'k', now(), '')",
    )
    .execute(&env.pool)
    .await
    .expect("invalid row");
    // Another prefix is not ours: ignored.
    sqlx::query("SELECT pg_logical_emit_message(true, 'outboxx', 'x'::bytea)")
        .execute(&env.pool)
        .await
        .expect("other prefix");
    let mut relay = spawn_relay(&env, "wal-p", &["--source", "wal"]);
    wait_until(
        Duration::from_secs(30),
        "published and dead-lettered",
        || async {
            stream_count(&client).await as usize >= before.len()
                && env.count("SELECT count(*) FROM dead_letter").await == 2
        },
    )
    .await
    .expect("poison handled");
    assert_exactly_once_in_key_order(&before, &stream_messages(&client).await);
    let reasons: Vec<String> = sqlx::query_scalar("SELECT reason FROM dead_letter ORDER BY id")
        .fetch_all(&env.pool)
        .await
        .expect("reasons");
    assert_eq!(reasons, ["decode", "decode"]);

    // Version 2, from a producer newer than this relay.
    sqlx::query("SELECT pg_logical_emit_message(true, 'outbox', '\\x6f627802'::bytea)")
        .execute(&env.pool)
        .await
        .expect("future version");
    let status = relay.sigterm(Duration::from_secs(30)).await;
    let _ = status;
    drop(relay);
    let mut again = spawn_relay(&env, "wal-q", &["--source", "wal"]);
    let exit = again.wait_exit(Duration::from_secs(30)).await;
    assert!(
        !exit.success(),
        "the relay stops at an unknown version: {exit}"
    );
    assert!(
        again.log_tail().contains("log format version 2"),
        "{}",
        again.log_tail()
    );
    // Not confirmed past it: the next start stops at it again.
    let mut third = spawn_relay(&env, "wal-r", &["--source", "wal"]);
    let exit = third.wait_exit(Duration::from_secs(30)).await;
    assert!(!exit.success());
    assert!(
        third.log_tail().contains("log format version 2"),
        "{}",
        third.log_tail()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_errors_name_the_missing_prerequisite() {
    // wal_level = replica (PostgreSQL's default).
    let env = env().await;
    let (code, _, err) = slot_cli(&env, "create");
    assert_ne!(code, 0);
    assert!(
        err.contains("wal_level = replica") && err.contains("wal_level = logical"),
        "{err}"
    );
    let mut relay = spawn_relay(&env, "wal-x", &["--source", "wal"]);
    let exit = relay.wait_exit(Duration::from_secs(30)).await;
    assert!(!exit.success());
    assert!(
        relay.log_tail().contains("wal_level = logical"),
        "{}",
        relay.log_tail()
    );

    // Logical, but no slot yet; then a role without REPLICATION.
    let env = env_logical().await;
    let mut relay = spawn_relay(&env, "wal-y", &["--source", "wal"]);
    let exit = relay.wait_exit(Duration::from_secs(30)).await;
    assert!(!exit.success());
    assert!(
        relay.log_tail().contains("relay slot create"),
        "{}",
        relay.log_tail()
    );
    let (code, _, err) = slot_cli(&env, "status");
    assert_ne!(code, 0);
    assert!(err.contains("does not exist"), "{err}");
    let (code, _, err) = relay_cli(
        &["slot", "create", "--slot", "Bad-Name"],
        &[("DATABASE_URL", env.db_url.as_str())],
    );
    assert_ne!(code, 0);
    assert!(err.contains("lower-case letters"), "{err}");

    sqlx::raw_sql("CREATE ROLE plain LOGIN; GRANT ALL ON SCHEMA public TO plain;")
        .execute(&env.pool)
        .await
        .expect("role");
    let url = url::Url::parse(&env.db_url).expect("url");
    let mut plain = url.clone();
    plain.set_username("plain").expect("user");
    let (code, _, err) = relay_cli(&["slot", "create"], &[("DATABASE_URL", plain.as_str())]);
    assert_ne!(code, 0);
    assert!(err.contains("lacks REPLICATION"), "{err}");

    // A role that may replicate but not make the relay's writes is refused at start, naming
    // what to grant (instead of retrying its first delete forever).
    assert_eq!(slot_cli(&env, "create").0, 0);
    sqlx::raw_sql("ALTER ROLE plain REPLICATION; GRANT SELECT ON outbox_message TO plain;")
        .execute(&env.pool)
        .await
        .expect("grant");
    let mut relay = spawn_relay_with_url(&env, plain.as_str(), "wal-z", &["--source", "wal"]);
    let exit = relay.wait_exit(Duration::from_secs(30)).await;
    assert!(!exit.success());
    let log = relay.log_tail();
    assert!(
        log.contains("role plain lacks DELETE on outbox_message; SELECT, INSERT, UPDATE on dead_letter; SELECT, INSERT, UPDATE on outbox_wal_progress: grant them"),
        "{log}"
    );

    // Exactly what the error named is enough: the relay publishes, deletes the rows it
    // read, and records its position.
    sqlx::raw_sql(
        "GRANT DELETE ON outbox_message TO plain;
         GRANT SELECT, INSERT, UPDATE ON dead_letter, outbox_wal_progress TO plain;",
    )
    .execute(&env.pool)
    .await
    .expect("grant the rest");
    let expected = enqueue_mixed(&env.pool, 0, 300, 5).await;
    let written = wal_position(&env.pool).await;
    let _relay = spawn_relay_with_url(&env, plain.as_str(), "wal-p", &["--source", "wal"]);
    let client = env.nats_client().await;
    wait_until(
        Duration::from_secs(60),
        "published, rows deleted, position recorded",
        || async {
            stream_count(&client).await as usize >= expected.len()
                && rows(&env.pool).await == 0
                && recorded_at_least(&env.pool, &written).await
        },
    )
    .await
    .expect("relayed with the named privileges");
    assert_exactly_once_in_key_order(&expected, &stream_messages(&client).await);
}

/// Whether the relay's recorded position (`outbox_wal_progress`) has reached `lsn`.
async fn recorded_at_least(pool: &PgPool, lsn: &str) -> bool {
    sqlx::query_scalar(
        "SELECT confirmed_lsn >= $1::pg_lsn FROM outbox_wal_progress WHERE slot_name = 'outbox_relay'",
    )
    .bind(lsn)
    .fetch_optional(pool)
    .await
    .ok()
    .flatten()
    .unwrap_or(false)
}

/// PostgreSQL restarted (immediate stop: a crash) and the broker killed and restarted under
/// a streaming relay: it reconnects to both and publishes everything exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_rides_out_a_database_crash_and_a_broker_restart() {
    let mut env = env_logical().await;
    assert_eq!(slot_cli(&env, "create").0, 0);
    let mut expected = enqueue_mixed(&env.pool, 0, 2_000, 11).await;
    let relay = spawn_relay(&env, "wal-c", &["--source", "wal"]);
    let client = env.nats_client().await;
    wait_until(
        Duration::from_secs(30),
        "first messages published",
        || async { stream_count(&client).await > 0 },
    )
    .await
    .expect("publishing");

    env.pg.stop_immediate().await.expect("crash PostgreSQL");
    // Down long enough for the relay to fail to reach it (its pool gives up after 5 s) and
    // report the database down: it stays up, not ready.
    wait_until(
        Duration::from_secs(40),
        "database reported down",
        || async {
            http_get(relay.http, "/health/ready")
                .await
                .is_some_and(|(code, body)| code == 503 && body.contains("\"database\":false"))
        },
    )
    .await
    .expect("not ready, database down");
    env.pg.restart().await.expect("restart PostgreSQL");
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&env.db_url)
        .await
        .expect("reconnect");
    expected.extend(enqueue_mixed(&pool, 2_000, 2_000, 11).await);
    wait_until(
        Duration::from_secs(60),
        "published after the database crash",
        || async { stream_count(&client).await as usize >= expected.len() },
    )
    .await
    .expect("after the database crash");

    env.nats.kill().expect("kill the broker");
    expected.extend(enqueue_mixed(&pool, 4_000, 1_000, 11).await);
    env.nats.restart().await.expect("restart the broker");
    let client = env.nats_client().await;
    wait_until(
        Duration::from_secs(60),
        "published after the broker restart",
        || async { stream_count(&client).await as usize >= expected.len() },
    )
    .await
    .expect("after the broker restart");
    assert_exactly_once_in_key_order(&expected, &stream_messages(&client).await);
    wait_until(Duration::from_secs(20), "ready again", || async {
        http_get(relay.http, "/health/ready")
            .await
            .is_some_and(|(code, _)| code == 200)
    })
    .await
    .expect("ready");
}

/// The value of the counter `name` on the relay's `/metrics` (0 before its first increment).
async fn counter(relay: &RelayProcess, name: &str) -> f64 {
    let (_, body) = http_get(relay.http, "/metrics").await.expect("metrics");
    body.lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Whether the slot has confirmed `lsn`.
async fn slot_confirmed(pool: &PgPool, lsn: &str) -> bool {
    sqlx::query_scalar(
        "SELECT confirmed_flush_lsn >= $1::pg_lsn FROM pg_replication_slots WHERE slot_name = 'outbox_relay'",
    )
    .bind(lsn)
    .fetch_optional(pool)
    .await
    .ok()
    .flatten()
    .unwrap_or(false)
}

async fn wal_position(pool: &PgPool) -> String {
    sqlx::query_scalar("SELECT pg_current_wal_insert_lsn()::text")
        .fetch_one(pool)
        .await
        .expect("WAL position")
}

/// A PostgreSQL crash sets the slot's confirmed position back to the one last written to
/// disk (a slot is saved at checkpoints, or when its restart position moves), so a relay
/// that trusts the slot re-sends what it had confirmed: after more than the duplicate window,
/// the stream stores it again. The relay keeps its own confirmed position durably and
/// resumes from it: after the crash it publishes only what is new.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_crash_does_not_make_the_relay_resend_what_it_confirmed() {
    let mut env = env_logical().await;
    assert_eq!(slot_cli(&env, "create").0, 0);
    let expected = enqueue_mixed(&env.pool, 0, 1_000, 7).await;
    let written = wal_position(&env.pool).await;
    let relay = spawn_relay(&env, "wal-r", &["--source", "wal"]);
    let client = env.nats_client().await;
    wait_until(
        Duration::from_secs(60),
        "everything published and confirmed",
        || async {
            stream_count(&client).await as usize >= expected.len()
                && slot_confirmed(&env.pool, &written).await
        },
    )
    .await
    .expect("confirmed");
    let published_before = counter(&relay, "relay_published_total").await;
    assert_eq!(published_before as usize, expected.len());

    env.pg.stop_immediate().await.expect("crash PostgreSQL");
    env.pg.restart().await.expect("restart PostgreSQL");
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&env.db_url)
        .await
        .expect("reconnect");
    assert!(
        !slot_confirmed(&pool, &written).await,
        "premise: the crash set the slot's confirmed position back"
    );
    let marker = enqueue_mixed(&pool, 1_000, 1, 7).await;
    let marker_written = wal_position(&pool).await;
    wait_until(
        Duration::from_secs(60),
        "the message written after the crash confirmed",
        || async { slot_confirmed(&pool, &marker_written).await },
    )
    .await
    .expect("marker confirmed");
    let published_after = counter(&relay, "relay_published_total").await;
    let duplicates = counter(&relay, "relay_duplicates_total").await;
    assert_eq!(
        (published_after - published_before, duplicates),
        (1.0, 0.0),
        "after the crash the relay published only the new message, and nothing twice"
    );
    let mut all = expected;
    all.extend(marker);
    assert_exactly_once_in_key_order(&all, &stream_messages(&client).await);
}

/// A transaction of more table rows than one DELETE may name (5000) is deleted in statements
/// of at most that many before it is confirmed: one unbounded DELETE would fail every time
/// under a `statement_timeout`, and hold back confirmation forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_of_many_rows_is_deleted_in_bounded_statements() {
    let env = env_logical().await;
    assert_eq!(slot_cli(&env, "create").0, 0);
    sqlx::raw_sql(
        "CREATE TABLE delete_sizes (deleted bigint NOT NULL);
         CREATE FUNCTION record_delete_size() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN INSERT INTO delete_sizes SELECT count(*) FROM gone; RETURN NULL; END $$;
         CREATE TRIGGER delete_sizes AFTER DELETE ON outbox_message
             REFERENCING OLD TABLE AS gone FOR EACH STATEMENT
             EXECUTE FUNCTION record_delete_size();",
    )
    .execute(&env.pool)
    .await
    .expect("trigger");
    let rows_in_one_transaction = 12_000;
    let table = Outbox::new("relay-test").expect("outbox");
    let mut tx = env.pool.begin().await.expect("begin");
    let ids = table
        .enqueue_many(
            &mut tx,
            (0..rows_in_one_transaction).map(|i| message(i, 13).0),
        )
        .await
        .expect("enqueue");
    tx.commit().await.expect("commit");
    let expected: Vec<(MessageId, String)> = ids
        .into_iter()
        .zip((0..rows_in_one_transaction).map(|i| message(i, 13).1))
        .collect();
    let _relay = spawn_relay(&env, "wal-d", &["--source", "wal"]);
    wait_until(Duration::from_secs(90), "every row deleted", || async {
        rows(&env.pool).await == 0
    })
    .await
    .expect("deleted");
    let sizes: Vec<i64> = sqlx::query_scalar("SELECT deleted FROM delete_sizes WHERE deleted > 0")
        .fetch_all(&env.pool)
        .await
        .expect("sizes");
    assert_eq!(sizes.iter().sum::<i64>(), rows_in_one_transaction as i64);
    assert!(
        sizes.iter().all(|n| *n <= 5_000),
        "statement sizes {sizes:?}"
    );
    let client = env.nats_client().await;
    assert_exactly_once_in_key_order(&expected, &stream_messages(&client).await);
}

/// Backends waiting on their commit for a synchronous standby.
async fn commits_waiting_for_a_standby(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'")
        .fetch_one(pool)
        .await
        .unwrap_or(0)
}

/// The log has a transaction once its commit record is flushed, before its rows are
/// visible: in between (long, while the commit waits for a synchronous standby) the relay
/// publishes the row's message, but a DELETE cannot see the row. The relay deletes it once
/// the transaction is visible, and only then confirms; a relay that took the DELETE's zero
/// rows for done would leave the row behind for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_published_before_its_commit_is_visible_is_still_deleted() {
    let env = env_logical().await;
    assert_eq!(slot_cli(&env, "create").0, 0);
    let relay = spawn_relay(&env, "wal-v", &["--source", "wal"]);
    let client = env.nats_client().await;

    // Commits wait for a standby that never comes; keep writing until one does wait (the
    // setting reaches the server's processes a moment after the reload).
    sqlx::query("CREATE TABLE ghost_probe (n int)")
        .execute(&env.pool)
        .await
        .expect("probe table");
    sqlx::query("ALTER SYSTEM SET synchronous_standby_names = 'ghost'")
        .execute(&env.pool)
        .await
        .expect("set synchronous_standby_names");
    sqlx::query("SELECT pg_reload_conf()")
        .execute(&env.pool)
        .await
        .expect("reload");
    let probe_pool = env.pool.clone();
    let probe = tokio::spawn(async move {
        while sqlx::query("INSERT INTO ghost_probe VALUES (1)")
            .execute(&probe_pool)
            .await
            .is_ok()
        {}
    });
    wait_until(
        Duration::from_secs(10),
        "a commit waits for the standby",
        || async { commits_waiting_for_a_standby(&env.pool).await > 0 },
    )
    .await
    .expect("commits wait");

    let producer_pool = env.pool.clone();
    let (message, key) = message(0, 1);
    let producer = tokio::spawn(async move {
        let table = Outbox::new("relay-test").expect("outbox");
        let mut conn = producer_pool.acquire().await.expect("acquire");
        table.enqueue_message(&mut conn, message).await
    });
    wait_until(
        Duration::from_secs(30),
        "the relay published the row and found it not visible yet",
        || async {
            stream_count(&client).await >= 1
                && counter(&relay, "relay_wal_invisible_row_waits_total").await >= 1.0
        },
    )
    .await
    .expect("published while the commit waits");
    assert!(
        !producer.is_finished(),
        "premise: the producer's commit still waits for the standby"
    );

    sqlx::query("ALTER SYSTEM RESET synchronous_standby_names")
        .execute(&env.pool)
        .await
        .expect("reset synchronous_standby_names");
    sqlx::query("SELECT pg_reload_conf()")
        .execute(&env.pool)
        .await
        .expect("reload");
    let id = tokio::time::timeout(Duration::from_secs(30), producer)
        .await
        .expect("the commit finishes once no standby is required")
        .expect("producer task")
        .expect("enqueue");
    probe.abort();
    let written = wal_position(&env.pool).await;
    wait_until(
        Duration::from_secs(60),
        "the row deleted and its transaction confirmed",
        || async { rows(&env.pool).await == 0 && slot_confirmed(&env.pool, &written).await },
    )
    .await
    .expect("the row is not left behind");
    assert_exactly_once_in_key_order(&[(id, key)], &stream_messages(&client).await);
}

/// An idle relay writes nothing: a keepalive's position past everything confirmed is told
/// to the slot without being recorded (a record would move the log's end, which brings the
/// next keepalive: a write every second, forever). So the slot's confirmed position
/// reaches the end of the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_relay_lets_the_slot_reach_the_end_of_the_log() {
    let env = env_logical().await;
    assert_eq!(slot_cli(&env, "create").0, 0);
    let expected = enqueue_mixed(&env.pool, 0, 300, 5).await;
    let written = wal_position(&env.pool).await;
    let _relay = spawn_relay(&env, "wal-i", &["--source", "wal"]);
    let client = env.nats_client().await;
    wait_until(
        Duration::from_secs(60),
        "published and recorded",
        || async {
            stream_count(&client).await as usize >= expected.len()
                && recorded_at_least(&env.pool, &written).await
        },
    )
    .await
    .expect("published");
    wait_until(
        Duration::from_secs(30),
        "the slot's confirmed position at the end of the log",
        || async {
            sqlx::query_scalar::<_, bool>(
                "SELECT confirmed_flush_lsn = pg_current_wal_lsn() FROM pg_replication_slots
                 WHERE slot_name = 'outbox_relay'",
            )
            .fetch_one(&env.pool)
            .await
            .unwrap_or(false)
        },
    )
    .await
    .expect("an idle relay stops writing");
    assert_exactly_once_in_key_order(&expected, &stream_messages(&client).await);
}

/// A recorded position another server wrote (a dump restored into this cluster brought the
/// row) can fall between the slot's position and this server's WAL end, where the check
/// above does not see it: a relay that started from it would skip every message before it.
/// The relay ignores a record whose system identifier is not this server's, removes it,
/// starts from the slot's position and publishes everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_position_from_another_server_is_not_trusted() {
    let env = env_logical().await;
    assert_eq!(slot_cli(&env, "create").0, 0);
    let expected = enqueue_mixed(&env.pool, 0, 300, 5).await;
    let written = wal_position(&env.pool).await;
    // Past every message, below the WAL end, with another server's identifier.
    sqlx::query(
        "INSERT INTO outbox_wal_progress (slot_name, confirmed_lsn, system_identifier)
         VALUES ('outbox_relay', $1::pg_lsn, 42)",
    )
    .bind(&written)
    .execute(&env.pool)
    .await
    .expect("a record from another server");
    let _relay = spawn_relay(&env, "wal-s", &["--source", "wal"]);
    let client = env.nats_client().await;
    wait_until(
        Duration::from_secs(60),
        "everything published, and the record rewritten by this server",
        || async {
            let ours: bool = sqlx::query_scalar(
                "SELECT coalesce(bool_and(system_identifier =
                     (SELECT system_identifier FROM pg_control_system())), false)
                 FROM outbox_wal_progress",
            )
            .fetch_one(&env.pool)
            .await
            .expect("record");
            stream_count(&client).await as usize >= expected.len()
                && ours
                && recorded_at_least(&env.pool, &written).await
        },
    )
    .await
    .expect("published");
    assert_exactly_once_in_key_order(&expected, &stream_messages(&client).await);
}

/// A recorded position ahead of everything the server has written cannot be this server's
/// (a restored backup brought the row, or the slot was recreated by hand): a relay that
/// started from it would skip every message before it. The relay removes it, starts from
/// the slot's position and publishes everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_position_ahead_of_the_log_is_not_trusted() {
    let env = env_logical().await;
    assert_eq!(slot_cli(&env, "create").0, 0);
    sqlx::query(
        "INSERT INTO outbox_wal_progress (slot_name, confirmed_lsn, system_identifier)
         VALUES ('outbox_relay', 'FF/0', (SELECT system_identifier FROM pg_control_system()))",
    )
    .execute(&env.pool)
    .await
    .expect("a record from elsewhere");
    let expected = enqueue_mixed(&env.pool, 0, 300, 5).await;
    let written = wal_position(&env.pool).await;
    let _relay = spawn_relay(&env, "wal-s", &["--source", "wal"]);
    let client = env.nats_client().await;
    wait_until(
        Duration::from_secs(60),
        "everything published and recorded from the slot's position",
        || async {
            stream_count(&client).await as usize >= expected.len()
                && recorded_at_least(&env.pool, &written).await
                && !recorded_at_least(&env.pool, "FF/0").await
        },
    )
    .await
    .expect("published");
    assert_exactly_once_in_key_order(&expected, &stream_messages(&client).await);
}
