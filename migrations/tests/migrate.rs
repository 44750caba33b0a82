//! The embedded migrator against a real PostgreSQL.

use migrations::{Error, MIGRATIONS, migrate};
use sqlx::{Connection, PgConnection};
use testkit::Postgres;

async fn connect(url: &str) -> PgConnection {
    PgConnection::connect(url).await.expect("connect")
}

#[tokio::test]
async fn applies_everything_once_and_is_idempotent() {
    let pg = Postgres::start().await.expect("start PostgreSQL");
    let url = pg.fresh_database().await.expect("db");
    let mut conn = connect(&url).await;

    let first = migrate(&mut conn).await.expect("first run");
    let all: Vec<i64> = MIGRATIONS.iter().map(|m| m.version).collect();
    assert_eq!(first.applied, all);
    let second = migrate(&mut conn).await.expect("second run");
    assert!(second.applied.is_empty(), "nothing to do the second time");

    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables
         WHERE table_schema = 'public' ORDER BY table_name",
    )
    .fetch_all(&mut conn)
    .await
    .expect("tables");
    assert_eq!(
        tables,
        [
            "console_audit",
            "dead_letter",
            "inbox_attempt",
            "inbox_message",
            "outbox_message",
            "outbox_toolkit_migration",
            "outbox_wal_progress",
            "relay_instance",
            "relay_partition_lease"
        ]
    );

    // Named constraints hold: an unknown status is refused by the CHECK, and so is a
    // published row without its time (the cleaner and reconcile could never see it).
    for status in ["lost", "published"] {
        let refused = sqlx::query(
            "INSERT INTO outbox_message (id, subject, event_type, source, partition_key, occurred_at, payload, status)
             VALUES (gen_random_uuid(), 's', 't.v1', 'src', 'k', now(), '', $1)",
        )
        .bind(status)
        .execute(&mut conn)
        .await
        .expect_err(status);
        assert_eq!(
            refused.as_database_error().and_then(|e| e.constraint()),
            Some("outbox_message_status_check"),
            "status {status}"
        );
    }
    // A row written by plain SQL with only the required columns is pending, available now,
    // with no attempts (the defaults the relay's claim relies on).
    let (status, attempts, available): (String, i32, bool) = sqlx::query_as(
        "INSERT INTO outbox_message (id, subject, event_type, source, partition_key, occurred_at, payload)
         VALUES (gen_random_uuid(), 's', 't.v1', 'src', 'k', now(), '')
         RETURNING status, attempts, available_at <= clock_timestamp()",
    )
    .fetch_one(&mut conn)
    .await
    .expect("insert");
    assert_eq!((status.as_str(), attempts, available), ("pending", 0, true));
}

#[tokio::test]
async fn concurrent_migrators_serialise() {
    let pg = Postgres::start().await.expect("start PostgreSQL");
    let url = pg.fresh_database().await.expect("db");
    let mut runs = Vec::new();
    for _ in 0..4 {
        let url = url.clone();
        runs.push(tokio::spawn(async move {
            let mut conn = connect(&url).await;
            migrate(&mut conn).await.expect("migrate").applied.len()
        }));
    }
    let mut applied = Vec::new();
    for run in runs {
        applied.push(run.await.expect("task"));
    }
    applied.sort_unstable();
    assert_eq!(
        applied,
        [0, 0, 0, MIGRATIONS.len()],
        "exactly one process applies the schema"
    );
}

#[tokio::test]
async fn an_edited_migration_is_refused_and_nothing_changes() {
    let pg = Postgres::start().await.expect("start PostgreSQL");
    let url = pg.fresh_database().await.expect("db");
    let mut conn = connect(&url).await;
    migrate(&mut conn).await.expect("migrate");
    sqlx::query("UPDATE outbox_toolkit_migration SET checksum = 'edited' WHERE version = 2")
        .execute(&mut conn)
        .await
        .expect("tamper");
    sqlx::query("DELETE FROM outbox_toolkit_migration WHERE version >= 3")
        .execute(&mut conn)
        .await
        .expect("forget 3");
    match migrate(&mut conn).await {
        Err(Error::Modified { version: 2, .. }) => {}
        other => panic!("expected Modified for version 2, got {other:?}"),
    }
    let recorded: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_toolkit_migration")
        .fetch_one(&mut conn)
        .await
        .expect("count");
    assert_eq!(recorded, 2, "the refused run recorded nothing");
}

/// A migration that needs a table lock a long-running transaction holds gives up after
/// `LOCK_TIMEOUT` per try instead of queueing every writer of that table behind it, applies
/// nothing, and goes through once the transaction has ended.
#[tokio::test]
async fn a_migration_blocked_by_a_long_transaction_gives_up_without_holding_writers() {
    let pg = Postgres::start().await.expect("start PostgreSQL");
    let url = pg.fresh_database().await.expect("db");
    let mut conn = connect(&url).await;
    migrate(&mut conn).await.expect("migrate");
    // Back to before migration 9, which alters outbox_message.
    sqlx::raw_sql(
        "ALTER TABLE outbox_message DROP COLUMN permanent_failures;
         DROP TABLE inbox_attempt;
         DROP FUNCTION outbox_emit;
         DROP FUNCTION outbox_emit_encoded;
         DROP FUNCTION outbox_emit_check;
         DROP FUNCTION outbox_wal_field;
         DROP TABLE outbox_wal_progress;
         DROP TABLE console_audit;
         DROP INDEX dead_letter_page_idx;
         DROP INDEX dead_letter_dead_reason_idx;
         DELETE FROM outbox_toolkit_migration WHERE version >= 9;",
    )
    .execute(&mut conn)
    .await
    .expect("undo 9 to 18");

    // A reader whose transaction stays open holds ACCESS SHARE on outbox_message.
    let mut reader = connect(&url).await;
    sqlx::raw_sql("BEGIN; SELECT count(*) FROM outbox_message;")
        .execute(&mut reader)
        .await
        .expect("long transaction");

    let started = std::time::Instant::now();
    let mut migrator = connect(&url).await;
    let migrator_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut migrator)
        .await
        .expect("pid");
    let migrating = tokio::spawn(async move {
        let result = migrate(&mut migrator).await;
        (result, migrator)
    });
    // A writer that comes while the migration waits is held at most LOCK_TIMEOUT per try.
    let mut writer = connect(&url).await;
    let wrote = std::time::Instant::now();
    let insert = sqlx::query(
        "INSERT INTO outbox_message (id, subject, event_type, source, partition_key, occurred_at, payload)
         VALUES (gen_random_uuid(), 's', 't.v1', 'src', 'k', now(), '')",
    )
    .execute(&mut writer);
    tokio::time::timeout(std::time::Duration::from_secs(10), insert)
        .await
        .expect("the writer is not held behind the migration")
        .expect("a writer gets through");
    assert!(
        wrote.elapsed() < migrations::LOCK_TIMEOUT * 2,
        "the writer waited {:?}",
        wrote.elapsed()
    );
    let result = tokio::time::timeout(std::time::Duration::from_secs(60), migrating)
        .await
        .expect("migrate gives up in time")
        .expect("task");
    let (result, _still_open) = result;
    // The connection it kept holds no lock: its failed transaction has ended.
    let locks: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks WHERE pid = $1 AND locktype <> 'virtualxid'",
    )
    .bind(migrator_pid)
    .fetch_one(&mut writer)
    .await
    .expect("locks");
    assert_eq!(
        locks, 0,
        "the migrator's connection still holds locks after giving up"
    );
    match result {
        Err(Error::LockTimeout { version: 9, name }) => assert_eq!(name, "permanent_failures"),
        other => panic!("expected LockTimeout for migration 9, got {other:?}"),
    }
    assert!(
        started.elapsed() >= migrations::LOCK_TIMEOUT * migrations::LOCK_TRIES,
        "it tried {} times ({:?})",
        migrations::LOCK_TRIES,
        started.elapsed()
    );
    let applied: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM outbox_toolkit_migration ORDER BY version")
            .fetch_all(&mut writer)
            .await
            .expect("versions");
    assert_eq!(applied, (1..=8).collect::<Vec<i64>>(), "nothing applied");

    sqlx::raw_sql("COMMIT")
        .execute(&mut reader)
        .await
        .expect("end it");
    let report = migrate(&mut writer)
        .await
        .expect("applies once the lock is free");
    assert_eq!(report.applied, [9, 10, 11, 12, 13, 14, 15, 16, 17, 18]);
}
