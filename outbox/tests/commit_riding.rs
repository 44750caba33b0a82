//! [`OutboxTransaction`] and log storage against a real PostgreSQL with `wal_level=logical`:
//! enqueues that ride with `COMMIT` are atomic with the business change and survive hostile
//! payloads, headers and keys byte for byte, in both storages; log storage writes no row.

use std::time::Duration;

use envelope::Envelope;
use outbox::store::ClaimedRow;
use outbox::{Error, Message, MessageId, Outbox, OutboxConfig, Storage};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use testkit::{Postgres, PostgresConfig, logical};
use time::OffsetDateTime;

const SLOT: &str = "commit_riding";
const STORAGES: [Storage; 2] = [Storage::Table, Storage::Log];

/// A logical-decoding server (kept alive by the guard), a migrated database with an
/// `orders` table whose customer reference is checked at commit, and a message slot.
async fn database() -> (Postgres, PgPool) {
    let pg = Postgres::start_with(PostgresConfig {
        logical_decoding: true,
        ..PostgresConfig::default()
    })
    .await
    .expect("start PostgreSQL");
    let url = pg.fresh_database().await.expect("fresh database");
    // Two connections: a dropped transaction's connection must not starve the rest.
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await
        .expect("connect");
    let mut conn = pool.acquire().await.expect("acquire");
    migrations::migrate(&mut conn).await.expect("migrate");
    sqlx::raw_sql(
        "CREATE TABLE customers (id text PRIMARY KEY);
         CREATE TABLE orders (id text PRIMARY KEY,
             customer text REFERENCES customers DEFERRABLE INITIALLY DEFERRED);
         INSERT INTO customers VALUES ('c-1');",
    )
    .execute(&mut *conn)
    .await
    .expect("business tables");
    logical::create_message_slot(&mut conn, SLOT)
        .await
        .expect("slot");
    (pg, pool)
}

fn outbox(storage: Storage) -> Outbox {
    Outbox::with_config(OutboxConfig {
        storage,
        ..OutboxConfig::for_source("order-service")
    })
    .expect("config")
}

/// What each storage holds, in write order: rows by `seq`, or the slot's messages (taken).
async fn stored(pool: &PgPool, storage: Storage) -> Vec<Envelope> {
    let mut conn = pool.acquire().await.expect("acquire");
    match storage {
        Storage::Table => {
            sqlx::query_as::<_, ClaimedRow>("SELECT * FROM outbox_message ORDER BY seq")
                .fetch_all(&mut *conn)
                .await
                .expect("rows")
                .iter()
                .map(|row| row.to_envelope().expect("a valid row"))
                .collect()
        }
        _ => logical::take_messages(&mut conn, SLOT)
            .await
            .expect("messages")
            .into_iter()
            .map(|(prefix, content)| {
                assert_eq!(prefix, envelope::wal::PREFIX);
                envelope::wal::decode(&content).expect("a valid log message")
            })
            .collect(),
    }
}

async fn orders(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar("SELECT id FROM orders ORDER BY id")
        .fetch_all(pool)
        .await
        .expect("orders")
}

/// Every kind of text a literal could be broken by, in every field that takes text.
fn hostile(i: usize) -> Message {
    let payload = [
        b"'); DROP TABLE outbox_message; --".as_slice(),
        b"\\x00 \\' \" $$ $tag$ E'\\\\' ;COMMIT;",
        &[0, 0xff, 0x27, 0x5c, 0x0a, 0x0d],
        "ünïcødé 🦀".as_bytes(),
    ]
    .concat();
    Message::raw(
        "orders.created",
        "order.created.v1",
        format!("k'{i}'); DELETE FROM orders; --"),
        payload,
    )
    .id(MessageId::new())
    .occurred_at(OffsetDateTime::from_unix_timestamp_nanos(1_796_205_600_123_456_000).expect("t"))
    .header("x-quote", "it's \"quoted\" \\ back$$slash")
    .header("x-sql", "'; COMMIT; DROP TABLE orders; --")
    .header("x-unicode", "日本語 ✓")
    .correlation_id("c'); TRUNCATE outbox_message; --")
    .content_type("application/x-'evil'")
}

#[tokio::test]
async fn hostile_messages_ride_with_commit_byte_for_byte_in_both_storages() {
    let (_pg, pool) = database().await;
    for storage in STORAGES {
        let outbox = outbox(storage);
        let messages: Vec<Message> = (0..5).map(hostile).collect();
        let expected: Vec<Envelope> = messages
            .iter()
            .map(|m| outbox.prepare(m.clone()).expect("valid"))
            .collect();

        let mut tx = outbox.begin(&pool).await.expect("begin");
        let order = format!("o-{storage:?}");
        sqlx::query("INSERT INTO orders VALUES ($1, 'c-1')")
            .bind(&order)
            .execute(&mut *tx)
            .await
            .expect("business insert");
        for message in messages {
            tx.enqueue_message(message).expect("buffered");
        }
        assert_eq!(tx.enqueued().len(), 5);
        // Buffered, not written: another connection sees nothing yet.
        assert!(orders(&pool).await.iter().all(|o| *o != order));
        tx.commit().await.expect("commit");

        assert_eq!(stored(&pool, storage).await, expected, "{storage:?}");
        assert!(orders(&pool).await.contains(&order), "{storage:?}");
    }
    // Log storage wrote no row: the table holds only the table storage's five.
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_message")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(rows, 5);
}

/// An error anywhere (a reused id in the buffered insert, a constraint checked at COMMIT)
/// commits nothing: neither the business row nor any message. The pool stays usable.
#[tokio::test]
async fn a_failed_commit_writes_nothing_in_both_storages() {
    let (_pg, pool) = database().await;
    for storage in STORAGES {
        let outbox = outbox(storage);
        // The customer does not exist: the deferred foreign key fails at COMMIT.
        let mut tx = outbox.begin(&pool).await.expect("begin");
        sqlx::query("INSERT INTO orders VALUES ('o-orphan', 'nobody')")
            .execute(&mut *tx)
            .await
            .expect("deferred check passes for now");
        tx.enqueue_message(hostile(1)).expect("buffered");
        tx.enqueue_message(hostile(2)).expect("buffered");
        let err = tx
            .commit()
            .await
            .expect_err("the foreign key fails at commit");
        assert!(matches!(err, Error::Database(_)), "{storage:?}: {err}");
        assert!(orders(&pool).await.is_empty(), "{storage:?}");
        assert!(stored(&pool, storage).await.is_empty(), "{storage:?}");
    }

    // Table storage: a reused id fails the buffered INSERT; the business row goes with it.
    let outbox = outbox(Storage::Table);
    let taken = outbox
        .enqueue_message(&mut pool.acquire().await.expect("acquire"), hostile(0))
        .await
        .expect("first use of the id");
    let mut tx = outbox.begin(&pool).await.expect("begin");
    sqlx::query("INSERT INTO orders VALUES ('o-dup', 'c-1')")
        .execute(&mut *tx)
        .await
        .expect("business insert");
    tx.enqueue_message(hostile(3)).expect("buffered");
    tx.enqueue_message(hostile(4).id(taken)).expect("buffered");
    match tx.commit().await {
        Err(Error::DuplicateId(id)) => assert_eq!(id, taken),
        other => panic!("expected DuplicateId({taken}), got {other:?}"),
    }
    assert!(orders(&pool).await.is_empty());
    let ids: Vec<MessageId> = stored(&pool, Storage::Table)
        .await
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(ids, [taken], "only the row written before");
}

/// Dropped or rolled back, a transaction writes nothing, and its connection never returns
/// to the pool inside a transaction.
#[tokio::test]
async fn dropped_and_rolled_back_transactions_write_nothing() {
    let (_pg, pool) = database().await;
    for storage in STORAGES {
        let outbox = outbox(storage);
        for round in 0..3 {
            let mut tx = outbox.begin(&pool).await.expect("begin");
            sqlx::query("INSERT INTO orders VALUES ($1, 'c-1')")
                .bind(format!("o-{round}"))
                .execute(&mut *tx)
                .await
                .expect("business insert");
            tx.enqueue_message(hostile(round)).expect("buffered");
            if round % 2 == 0 {
                drop(tx);
            } else {
                tx.rollback().await.expect("rollback");
            }
        }
        // A refused message buffers nothing and leaves the transaction usable.
        let mut tx = outbox.begin(&pool).await.expect("begin");
        let refused = tx.enqueue_message(Message::raw("orders.*", "order.created.v1", "k", "{}"));
        assert!(matches!(refused, Err(Error::Invalid(_))), "{refused:?}");
        assert!(tx.enqueued().is_empty());
        tx.commit().await.expect("an empty commit");

        assert!(orders(&pool).await.is_empty(), "{storage:?}");
        assert!(stored(&pool, storage).await.is_empty(), "{storage:?}");
    }
    // No session is left idle in a transaction (closing a dropped one is asynchronous).
    testkit::wait_until(Duration::from_secs(10), "no idle transaction", || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND state LIKE 'idle in transaction%'",
        )
        .fetch_one(&pool)
        .await
        .is_ok_and(|n| n == 0)
    })
    .await
    .expect("idle transactions");
}

#[tokio::test]
async fn log_storage_enqueues_per_statement_in_order_and_only_on_commit() {
    let (_pg, pool) = database().await;
    let outbox = outbox(Storage::Log);
    let mut tx = pool.begin().await.expect("begin");
    let first = outbox
        .enqueue_message(&mut tx, hostile(0))
        .await
        .expect("enqueue");
    let many = outbox
        .enqueue_many(&mut tx, (1..4).map(hostile))
        .await
        .expect("enqueue_many");
    tx.commit().await.expect("commit");
    let mut tx = pool.begin().await.expect("begin");
    outbox
        .enqueue_message(&mut tx, hostile(9))
        .await
        .expect("enqueue");
    tx.rollback().await.expect("rollback");

    let ids: Vec<MessageId> = stored(&pool, Storage::Log)
        .await
        .iter()
        .map(|e| e.id)
        .collect();
    let expected: Vec<MessageId> = std::iter::once(first).chain(many).collect();
    assert_eq!(
        ids, expected,
        "committed messages in order, the rolled-back one never"
    );
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_message")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(rows, 0, "log storage writes no row");
}

/// Log storage refuses to write when no slot would keep the message, with the cause named.
#[tokio::test]
async fn log_storage_without_a_slot_is_a_named_error() {
    let (_pg, pool) = database().await;
    sqlx::query("SELECT pg_drop_replication_slot($1)")
        .bind(SLOT)
        .execute(&pool)
        .await
        .expect("drop the slot");
    let outbox = outbox(Storage::Log);
    let mut conn = pool.acquire().await.expect("acquire");
    let err = outbox
        .enqueue_message(&mut conn, hostile(0))
        .await
        .expect_err("no slot");
    assert!(
        matches!(err, Error::Database(_))
            && err.to_string().contains("no logical replication slot"),
        "{err}"
    );
    let mut tx = outbox.begin(&pool).await.expect("begin");
    tx.enqueue_message(hostile(1)).expect("buffered");
    let err = tx.commit().await.expect_err("no slot at commit");
    assert!(
        err.to_string().contains("no logical replication slot"),
        "{err}"
    );
}

/// The enqueue that rides with COMMIT checks the slot about once a second per session
/// (migration 0016), not on every commit: a slot dropped under a running producer is refused
/// by every session once a second has passed since the drop, and from then on.
#[tokio::test]
async fn a_dropped_slot_is_refused_by_every_session_within_the_check_interval() {
    let (_pg, pool) = database().await;
    let outbox = outbox(Storage::Log);
    let commit = |i: usize| {
        let (outbox, pool) = (outbox.clone(), pool.clone());
        async move {
            let mut tx = outbox.begin(&pool).await.expect("begin");
            tx.enqueue_message(hostile(i)).expect("buffered");
            tx.commit().await
        }
    };
    // Both sessions of the pool pass the check and note it.
    let (a, b) = tokio::join!(commit(0), commit(1));
    a.expect("with the slot");
    b.expect("with the slot");
    let messages = stored(&pool, Storage::Log).await;
    assert_eq!(messages.len(), 2, "both committed messages reach the slot");

    sqlx::query("SELECT pg_drop_replication_slot($1)")
        .bind(SLOT)
        .execute(&pool)
        .await
        .expect("drop the slot");
    let dropped = tokio::time::Instant::now();
    // Once the interval has passed, no session still trusts its note: every commit, on
    // either connection, is refused with the cause named.
    tokio::time::sleep_until(dropped + Duration::from_millis(1_100)).await;
    for i in 0..10 {
        let (a, b) = tokio::join!(commit(10 + 2 * i), commit(11 + 2 * i));
        for result in [a, b] {
            let err = result.expect_err("a dropped slot, past the interval");
            assert!(
                err.to_string().contains("no logical replication slot"),
                "{err}"
            );
        }
    }
}

/// Commit refuses what PostgreSQL would let pass silently: an aborted transaction (a bare
/// COMMIT rolls back without an error) and one a nested commit already ended.
#[tokio::test]
async fn commit_fails_loudly_after_a_failed_statement_or_a_nested_commit() {
    let (_pg, pool) = database().await;
    let outbox = outbox(Storage::Table);

    // A failed business statement, caught by the caller, nothing buffered.
    let mut tx = outbox.begin(&pool).await.expect("begin");
    sqlx::query("INSERT INTO orders VALUES ('o-1', 'c-1')")
        .execute(&mut *tx)
        .await
        .expect("insert");
    sqlx::query("INSERT INTO orders VALUES ('o-1', 'c-1')")
        .execute(&mut *tx)
        .await
        .expect_err("duplicate order");
    let err = tx
        .commit()
        .await
        .expect_err("an aborted transaction does not commit");
    assert!(matches!(err, Error::Database(_)), "{err}");
    assert!(orders(&pool).await.is_empty());

    // A nested transaction's commit ends the outer one early.
    let mut tx = outbox.begin(&pool).await.expect("begin");
    {
        let mut nested = sqlx::Acquire::begin(&mut *tx).await.expect("nested begin");
        sqlx::query("INSERT INTO orders VALUES ('o-2', 'c-1')")
            .execute(&mut *nested)
            .await
            .expect("insert");
        nested.commit().await.expect("nested commit");
    }
    tx.enqueue_message(hostile(0)).expect("buffered");
    let err = tx.commit().await.expect_err("nothing to commit");
    assert!(matches!(err, Error::TransactionEnded), "{err}");
    assert!(
        stored(&pool, Storage::Table).await.is_empty(),
        "no message written"
    );
}

/// A begin or commit cancelled midway (a timeout around it, fired while its statement is on
/// the wire) never returns its connection to the pool inside a transaction.
#[tokio::test]
async fn cancelled_begin_and_commit_leave_no_transaction_in_the_pool() {
    let (pg, pool) = database().await;
    let _ = pg;
    // One connection through a proxy that can slow every packet: whatever a cancelled call
    // leaves is what the next user of the pool gets.
    let options = (*pool.connect_options()).clone();
    let upstream = std::net::SocketAddr::from(([127, 0, 0, 1], options.get_port()));
    let proxy = testkit::TcpProxy::start(upstream).await.expect("proxy");
    let writer = PgPoolOptions::new()
        .max_connections(1)
        .test_before_acquire(false)
        .connect_with(options.port(proxy.addr().port()))
        .await
        .expect("writer pool");
    // An autocommit write through the writer pool is visible at once to another connection.
    let probe = |name: String| {
        let (writer, pool) = (writer.clone(), pool.clone());
        async move {
            let mut conn = writer.acquire().await.expect("acquire");
            sqlx::query("INSERT INTO customers VALUES ($1)")
                .bind(&name)
                .execute(&mut *conn)
                .await
                .expect("probe");
            drop(conn);
            let visible: i64 = sqlx::query_scalar("SELECT count(*) FROM customers WHERE id = $1")
                .bind(&name)
                .fetch_one(&pool)
                .await
                .expect("count");
            assert_eq!(
                visible, 1,
                "{name}: a pooled connection was left in a transaction"
            );
        }
    };
    let outbox = outbox(Storage::Table);
    for round in 0..3 {
        proxy.set_latency(Duration::from_millis(40));
        let cancelled =
            tokio::time::timeout(Duration::from_millis(20), outbox.begin(&writer)).await;
        assert!(cancelled.is_err(), "the begin was cancelled midway");
        proxy.set_latency(Duration::ZERO);
        probe(format!("after-begin-{round}")).await;

        let mut tx = outbox.begin(&writer).await.expect("begin");
        sqlx::query("INSERT INTO orders VALUES ($1, 'c-1')")
            .bind(format!("o-{round}"))
            .execute(&mut *tx)
            .await
            .expect("insert");
        tx.enqueue_message(hostile(round)).expect("buffered");
        proxy.set_latency(Duration::from_millis(40));
        let cancelled = tokio::time::timeout(Duration::from_millis(20), tx.commit()).await;
        assert!(cancelled.is_err(), "the commit was cancelled midway");
        proxy.set_latency(Duration::ZERO);
        probe(format!("after-commit-{round}")).await;
    }
    // The order and its messages committed together or not at all.
    let orders = orders(&pool).await.len();
    assert_eq!(stored(&pool, Storage::Table).await.len(), orders);
}
