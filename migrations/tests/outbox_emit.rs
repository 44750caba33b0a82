//! `outbox_emit(...)` writes the envelope crate's log format: what SQL emits, Rust decodes.

use bytes::Bytes;
use sqlx::{Connection, PgConnection};
use testkit::{Postgres, PostgresConfig, logical};

/// A server with `wal_level=logical` (kept alive by the first value) and a connection to a
/// fresh migrated database on it.
async fn migrated_logical_database() -> (Postgres, PgConnection) {
    let pg = Postgres::start_with(PostgresConfig {
        logical_decoding: true,
        ..PostgresConfig::default()
    })
    .await
    .expect("start PostgreSQL");
    let url = pg.fresh_database().await.expect("db");
    let mut conn = PgConnection::connect(&url).await.expect("connect");
    migrations::migrate(&mut conn).await.expect("migrate");
    (pg, conn)
}

#[tokio::test]
async fn outbox_emit_writes_what_the_envelope_decodes() {
    let (_pg, mut conn) = migrated_logical_database().await;
    logical::create_message_slot(&mut conn, "emit_test")
        .await
        .expect("slot");

    // Every field, hostile bytes in the payload, a header, a rolled-back message.
    let payload: &[u8] = b"{\"a\":1}\x00\xff'; DROP TABLE outbox_message; --";
    let mut tx = conn.begin().await.expect("begin");
    let id: uuid::Uuid = sqlx::query_scalar(
        "SELECT outbox_emit(
            subject => 'orders.created', event_type => 'order.created.v1',
            source => 'sql-producer', partition_key => 'o-1', payload => $1,
            headers => '{\"x-tenant\": \"acme\"}',
            occurred_at => '2026-12-02T10:00:00.123456Z',
            correlation_id => 'c-1', causation_id => '0190a6f2-0000-7000-8000-000000000001',
            traceparent => '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01',
            tracestate => 'congo=t61rcWkgMzE', content_type => 'application/json')",
    )
    .bind(payload)
    .fetch_one(&mut *tx)
    .await
    .expect("outbox_emit");
    tx.commit().await.expect("commit");
    let mut tx = conn.begin().await.expect("begin");
    sqlx::query("SELECT outbox_emit('orders.created', 'order.created.v1', 's', 'o-2', '\\x00')")
        .execute(&mut *tx)
        .await
        .expect("outbox_emit");
    tx.rollback().await.expect("rollback");
    sqlx::query("SELECT outbox_emit('orders.created', 'order.created.v1', 's', 'o-3', '')")
        .execute(&mut conn)
        .await
        .expect("outbox_emit with defaults");

    let got = logical::take_messages(&mut conn, "emit_test")
        .await
        .expect("messages");
    assert_eq!(
        got.len(),
        2,
        "the rolled-back message is not decoded: {got:?}"
    );
    assert!(
        got.iter()
            .all(|(prefix, _)| prefix == envelope::wal::PREFIX)
    );
    let first = envelope::wal::decode(&got[0].1).expect("decodes");
    assert_eq!(first.id.as_uuid(), id);
    assert_eq!(first.subject.as_str(), "orders.created");
    assert_eq!(first.event_type.to_string(), "order.created.v1");
    assert_eq!(first.source.as_str(), "sql-producer");
    assert_eq!(first.partition_key.as_str(), "o-1");
    assert_eq!(first.payload, Bytes::copy_from_slice(payload));
    assert_eq!(first.headers.get("x-tenant"), Some("acme"));
    assert_eq!(first.occurred_at.unix_timestamp(), 1_796_205_600);
    assert_eq!(first.occurred_at.microsecond(), 123_456);
    assert_eq!(
        first.correlation_id.as_ref().map(|c| c.as_str()),
        Some("c-1")
    );
    assert_eq!(
        first.causation_id.map(|c| c.to_string()).as_deref(),
        Some("0190a6f2-0000-7000-8000-000000000001")
    );
    let trace = first.trace.as_ref().expect("trace");
    assert_eq!(trace.tracestate(), Some("congo=t61rcWkgMzE"));
    assert_eq!(
        first.content_type.as_ref().map(|c| c.as_str()),
        Some("application/json")
    );
    // The headers field is JSON text, which jsonb spaces differently from serde_json
    // (`{"x-tenant": "acme"}`): the same values, not the same bytes.
    assert_eq!(
        envelope::wal::decode(&envelope::wal::encode(&first).expect("encodes"))
            .expect("re-decodes"),
        first
    );

    let second = envelope::wal::decode(&got[1].1).expect("decodes with defaults");
    assert_eq!(second.partition_key.as_str(), "o-3");
    assert!(second.headers.is_empty() && second.payload.is_empty());
    assert!(second.trace.is_none() && second.correlation_id.is_none());
    // With no headers (`{}` both ways) Rust writes exactly the bytes SQL wrote.
    assert_eq!(envelope::wal::encode(&second).expect("encodes"), got[1].1);
}

#[tokio::test]
async fn outbox_emit_refuses_nulls_and_non_object_headers() {
    let (_pg, mut conn) = migrated_logical_database().await;
    for call in [
        "SELECT outbox_emit(NULL, 'order.created.v1', 's', 'k', '')",
        "SELECT outbox_emit('a.b', 'order.created.v1', 's', 'k', NULL)",
        "SELECT outbox_emit('a.b', 'order.created.v1', 's', 'k', '', '[1]')",
        "SELECT outbox_emit('a.b', 'order.created.v1', 's', 'k', '', id => '00000000-0000-0000-0000-000000000000')",
    ] {
        let err = sqlx::query(call)
            .execute(&mut conn)
            .await
            .expect_err(call)
            .to_string();
        assert!(err.contains("outbox_emit:"), "{call}: {err}");
    }
}

/// A message written where no slot could decode it would never be published: outbox_emit
/// refuses it and the caller's transaction aborts.
#[tokio::test]
async fn outbox_emit_refuses_what_no_relay_could_read() {
    // wal_level = logical, but no slot yet.
    let (_pg, mut conn) = migrated_logical_database().await;
    let call = "SELECT outbox_emit('a.b', 'order.created.v1', 's', 'k', '')";
    let err = sqlx::query(call)
        .execute(&mut conn)
        .await
        .expect_err("no slot")
        .to_string();
    assert!(
        err.contains("no logical replication slot reads database"),
        "{err}"
    );
    logical::create_message_slot(&mut conn, "late")
        .await
        .expect("slot");
    sqlx::query(call)
        .execute(&mut conn)
        .await
        .expect("with a slot");
    let got = logical::take_messages(&mut conn, "late")
        .await
        .expect("read");
    assert_eq!(got.len(), 1, "only the message written after the slot");

    // PostgreSQL's default wal_level = replica: nothing can decode it.
    let pg = Postgres::start().await.expect("start PostgreSQL");
    let url = pg.fresh_database().await.expect("db");
    let mut conn = PgConnection::connect(&url).await.expect("connect");
    migrations::migrate(&mut conn).await.expect("migrate");
    let err = sqlx::query(call)
        .execute(&mut conn)
        .await
        .expect_err("wal_level = replica")
        .to_string();
    assert!(
        err.contains("log storage needs wal_level = logical, this server has wal_level = replica"),
        "{err}"
    );
}
