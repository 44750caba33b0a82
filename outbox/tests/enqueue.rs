//! The outbox against a real PostgreSQL: visibility follows the caller's transaction,
//! concurrent producers lose nothing, and refused messages write nothing.

use std::collections::HashSet;

use outbox::{Error, Event, Message, MessageId, Outbox, OutboxConfig, TraceContext};
use serde::{Deserialize, Serialize};
use sqlx::{Connection, PgConnection, PgPool, Row};
use testkit::Postgres;

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct OrderCreated {
    order_id: String,
    total_cents: i64,
}

impl Event for OrderCreated {
    const NAME: &'static str = "order.created";
    const VERSION: u32 = 1;
    fn partition_key(&self) -> String {
        self.order_id.clone()
    }
}

fn order(id: &str) -> OrderCreated {
    OrderCreated {
        order_id: id.to_owned(),
        total_cents: 999,
    }
}

/// A fresh, migrated database on a kit-started server (kept alive by the returned guard).
async fn database() -> (Postgres, PgPool) {
    let pg = Postgres::start().await.expect("start PostgreSQL");
    let url = pg.fresh_database().await.expect("fresh database");
    let pool = PgPool::connect(&url).await.expect("connect");
    migrations::migrate(&mut pool.acquire().await.expect("acquire"))
        .await
        .expect("migrate");
    (pg, pool)
}

async fn count(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM outbox_message")
        .fetch_one(pool)
        .await
        .expect("count")
}

#[tokio::test]
async fn committed_enqueue_is_visible_rolled_back_is_not() {
    let (_pg, pool) = database().await;
    let outbox = Outbox::new("order-service").expect("config");

    let mut tx = pool.begin().await.expect("begin");
    let id = outbox
        .enqueue(&mut tx, &order("o-1"))
        .await
        .expect("enqueue");
    // Not visible to another connection before commit.
    assert_eq!(count(&pool).await, 0);
    tx.commit().await.expect("commit");
    let row = sqlx::query(
        "SELECT subject, event_type, source, partition_key, status, payload, content_type
         FROM outbox_message WHERE id = $1",
    )
    .bind(id.as_uuid())
    .fetch_one(&pool)
    .await
    .expect("committed row is visible");
    assert_eq!(row.get::<String, _>("subject"), "order.created.v1");
    assert_eq!(row.get::<String, _>("event_type"), "order.created.v1");
    assert_eq!(row.get::<String, _>("source"), "order-service");
    assert_eq!(row.get::<String, _>("partition_key"), "o-1");
    assert_eq!(row.get::<String, _>("status"), "pending");
    assert_eq!(
        row.get::<Option<String>, _>("content_type").as_deref(),
        Some("application/json")
    );
    let payload: OrderCreated =
        serde_json::from_slice(&row.get::<Vec<u8>, _>("payload")).expect("json");
    assert_eq!(payload, order("o-1"));

    let mut tx = pool.begin().await.expect("begin");
    outbox
        .enqueue(&mut tx, &order("o-2"))
        .await
        .expect("enqueue");
    tx.rollback().await.expect("rollback");
    assert_eq!(
        count(&pool).await,
        1,
        "a rolled-back enqueue must leave no row"
    );
}

#[tokio::test]
async fn eight_concurrent_producers_lose_nothing_and_keep_per_key_order() {
    let (_pg, pool) = database().await;
    let outbox = Outbox::new("order-service").expect("config");
    const PRODUCERS: usize = 8;
    const PER_PRODUCER: usize = 150;

    let mut tasks = Vec::new();
    for p in 0..PRODUCERS {
        let (pool, outbox) = (pool.clone(), outbox.clone());
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..PER_PRODUCER {
                let mut tx = pool.begin().await.expect("begin");
                let key = format!("key-{p}");
                if i % 10 == 0 {
                    // Every tenth transaction enqueues two at once.
                    let two = outbox
                        .enqueue_many(
                            &mut tx,
                            [
                                Message::json("orders.batch", "order.noted.v1", key.clone(), &i)
                                    .expect("json"),
                                Message::json(
                                    "orders.batch",
                                    "order.noted.v1",
                                    key.clone(),
                                    &(i + 1),
                                )
                                .expect("json"),
                            ],
                        )
                        .await
                        .expect("enqueue_many");
                    ids.extend(two);
                } else {
                    let msg =
                        Message::json("orders.single", "order.noted.v1", key, &i).expect("json");
                    ids.push(outbox.enqueue_message(&mut tx, msg).await.expect("enqueue"));
                }
                tx.commit().await.expect("commit");
            }
            (p, ids)
        }));
    }
    let mut expected = HashSet::new();
    let mut per_key = Vec::new();
    for task in tasks {
        let (p, ids) = task.await.expect("producer task");
        expected.extend(ids.iter().copied());
        per_key.push((p, ids));
    }
    let stored: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT id FROM outbox_message")
        .fetch_all(&pool)
        .await
        .expect("ids");
    let stored: HashSet<MessageId> = stored.into_iter().map(MessageId::from_uuid).collect();
    assert_eq!(stored.len(), expected.len(), "row count");
    assert_eq!(
        stored, expected,
        "every enqueued id is stored, nothing else"
    );

    for (p, ids) in per_key {
        let in_seq_order: Vec<uuid::Uuid> = sqlx::query_scalar(
            "SELECT id FROM outbox_message WHERE partition_key = $1 ORDER BY seq",
        )
        .bind(format!("key-{p}"))
        .fetch_all(&pool)
        .await
        .expect("per key");
        let in_seq_order: Vec<MessageId> =
            in_seq_order.into_iter().map(MessageId::from_uuid).collect();
        assert_eq!(in_seq_order, ids, "key-{p}: seq order is enqueue order");
    }
}

#[tokio::test]
async fn refused_messages_write_nothing_and_leave_the_transaction_usable() {
    let (_pg, pool) = database().await;
    let outbox = Outbox::with_config(OutboxConfig {
        max_message_bytes: 4096,
        ..OutboxConfig::for_source("order-service")
    })
    .expect("config");

    let mut tx = pool.begin().await.expect("begin");
    let refusals = [
        (
            Message::raw("orders.*", "order.created.v1", "k", "{}"),
            "wildcard subject",
        ),
        (
            Message::raw(
                "$JS.API.STREAM.DELETE.ORDERS",
                "order.created.v1",
                "k",
                "{}",
            ),
            "system subject",
        ),
        (
            Message::raw("orders..created", "order.created.v1", "k", "{}"),
            "empty token",
        ),
        (
            Message::raw("orders.created", "order.created", "k", "{}"),
            "unversioned type",
        ),
        (
            Message::raw("orders.created", "order.created.v1", "", "{}"),
            "empty key",
        ),
        (
            Message::raw("orders.created", "order.created.v1", "k", "{}")
                .header("x-evil", "a\r\nNats-Msg-Id: forged"),
            "CR/LF in a header value",
        ),
        (
            Message::raw("orders.created", "order.created.v1", "k", "{}")
                .header("Nats-Msg-Id", "forged"),
            "reserved header",
        ),
        (
            Message::raw("orders.created", "order.created.v1", "k", "{}").header("bad name", "v"),
            "space in header name",
        ),
        (
            Message::raw("orders.created", "order.created.v1", "k\nk", "{}"),
            "LF in the key",
        ),
        (
            Message::raw("orders.created", "order.created.v1", "k", vec![b'x'; 4096]),
            "oversized payload",
        ),
    ];
    for (message, what) in refusals {
        let result = outbox.enqueue_message(&mut tx, message).await;
        match (&result, what) {
            (Err(Error::TooLarge { size, limit: 4096 }), "oversized payload") => {
                assert!(*size > 4096)
            }
            (Err(Error::Invalid(_)), _) if what != "oversized payload" => {}
            other => panic!("{what}: expected a typed refusal, got {other:?}"),
        }
        assert_eq!(
            result.as_ref().map_err(Error::kind).err(),
            Some(outbox::ErrorKind::InvalidInput)
        );
    }
    // A batch with one bad message writes none of it.
    let batch = outbox
        .enqueue_many(
            &mut tx,
            [
                Message::raw("orders.created", "order.created.v1", "k", "{}"),
                Message::raw("orders.>", "order.created.v1", "k", "{}"),
            ],
        )
        .await;
    assert!(matches!(batch, Err(Error::Invalid(_))), "{batch:?}");
    // No SQL ran for any refusal, so the transaction is still usable.
    outbox
        .enqueue_message(
            &mut tx,
            Message::raw("orders.created", "order.created.v1", "k", "{}"),
        )
        .await
        .expect("a valid message after refusals");
    tx.commit().await.expect("commit");
    assert_eq!(count(&pool).await, 1, "only the valid message was written");
}

#[tokio::test]
async fn enqueue_many_is_one_ordered_insert_and_duplicate_ids_are_named() {
    let (_pg, pool) = database().await;
    let outbox = Outbox::new("inventory-service").expect("config");
    let mut conn = pool.acquire().await.expect("acquire");
    let messages: Vec<Message> = (0..50)
        .map(|i| {
            Message::json("stock.changed.v1", "stock.changed.v1", "sku-1", &i)
                .expect("json")
                .header("x-index", i.to_string())
                .correlation_id("flow-7")
        })
        .collect();
    let ids = outbox
        .enqueue_many(&mut conn, messages)
        .await
        .expect("enqueue_many");
    let rows = sqlx::query("SELECT id, headers, correlation_id FROM outbox_message ORDER BY seq")
        .fetch_all(&mut *conn)
        .await
        .expect("rows");
    let stored: Vec<MessageId> = rows
        .iter()
        .map(|r| MessageId::from_uuid(r.get("id")))
        .collect();
    assert_eq!(stored, ids, "rows are stored in the given order");
    let headers: serde_json::Value = rows[7].get("headers");
    assert_eq!(headers, serde_json::json!({ "x-index": "7" }));
    assert_eq!(
        rows[7]
            .get::<Option<String>, _>("correlation_id")
            .as_deref(),
        Some("flow-7")
    );

    // Reusing a caller-chosen id is a typed error naming that id, and writes nothing.
    let reused = ids[3];
    let again = outbox
        .enqueue_message(
            &mut conn,
            Message::raw("stock.changed.v1", "stock.changed.v1", "sku-1", "{}").id(reused),
        )
        .await;
    assert!(
        matches!(again, Err(Error::DuplicateId(id)) if id == reused),
        "{again:?}"
    );
    let fresh = MessageId::new();
    let batch = outbox
        .enqueue_many(
            &mut conn,
            [
                Message::raw("stock.changed.v1", "stock.changed.v1", "sku-1", "{}").id(fresh),
                Message::raw("stock.changed.v1", "stock.changed.v1", "sku-1", "{}").id(reused),
            ],
        )
        .await;
    assert!(
        matches!(batch, Err(Error::DuplicateId(id)) if id == reused),
        "{batch:?}"
    );
    assert_eq!(count(&pool).await, 50);
    assert!(
        outbox
            .enqueue_many(&mut conn, Vec::new())
            .await
            .expect("empty")
            .is_empty()
    );
}

#[tokio::test]
async fn subject_prefix_and_metadata_are_stored() {
    let (_pg, pool) = database().await;
    let outbox = Outbox::with_config(OutboxConfig {
        subject_prefix: Some("acme".into()),
        ..OutboxConfig::for_source("order-service")
    })
    .expect("config");
    let cause = MessageId::new();
    let trace = TraceContext::new(
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        Some("k=v".into()),
    )
    .expect("trace");
    let mut conn = PgConnection::connect_with(&pool.connect_options())
        .await
        .expect("connect");
    let id = outbox
        .enqueue_message(
            &mut conn,
            Message::event(&order("o-9"))
                .expect("event")
                .caused_by(cause)
                .trace_context(trace),
        )
        .await
        .expect("enqueue");
    let row = sqlx::query(
        "SELECT subject, causation_id, traceparent, tracestate FROM outbox_message WHERE id = $1",
    )
    .bind(id.as_uuid())
    .fetch_one(&mut conn)
    .await
    .expect("row");
    assert_eq!(row.get::<String, _>("subject"), "acme.order.created.v1");
    assert_eq!(
        row.get::<Option<uuid::Uuid>, _>("causation_id"),
        Some(cause.as_uuid())
    );
    assert_eq!(
        row.get::<Option<String>, _>("traceparent").as_deref(),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );
    assert_eq!(
        row.get::<Option<String>, _>("tracestate").as_deref(),
        Some("k=v")
    );
    assert!(Outbox::new("").is_err(), "an empty source is refused");
    assert!(
        Outbox::with_config(OutboxConfig {
            max_message_bytes: 0,
            ..OutboxConfig::for_source("s")
        })
        .is_err()
    );
}
