//! The runner's SQL: recreating the demo databases, reading the outbox rows that the chaos
//! run's stream check compares with the streams, and the chaos run's witness slots (what was
//! committed to a log-storage outbox) and relay slot positions.

use sqlx::PgConnection;
use uuid::Uuid;

/// `id, seq, partition_key, status, stream, stream_seq` of an `outbox_message` row.
pub(crate) type RawOutboxRow = (Uuid, i64, String, String, Option<String>, Option<i64>);

/// Drops (disconnecting its sessions, and dropping the replication slots a previous run left
/// in it) and creates the database `name`, which must be a plain identifier of `a-z 0-9 _`
/// (it cannot be a bind parameter).
pub async fn recreate_database(conn: &mut PgConnection, name: &str) -> Result<(), sqlx::Error> {
    if name.is_empty()
        || name.len() > 63
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        return Err(sqlx::Error::Protocol(format!(
            "refusing database name {name:?}: use a-z 0-9 _"
        )));
    }
    // A database with a replication slot cannot be dropped; a slot still streamed by a
    // walsender cannot be dropped either, so terminate that first.
    sqlx::query(
        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
          WHERE database = $1 AND active_pid IS NOT NULL",
    )
    .bind(name)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
          WHERE database = $1",
    )
    .bind(name)
    .execute(&mut *conn)
    .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&mut *conn)
    .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(conn)
        .await?;
    Ok(())
}

/// Every row of the database's `outbox_message` in `seq` order, or `None` if the database
/// has no such table (a service without an outbox).
pub(crate) async fn outbox_rows(
    conn: &mut PgConnection,
) -> Result<Option<Vec<RawOutboxRow>>, sqlx::Error> {
    let exists: Option<String> = sqlx::query_scalar("SELECT to_regclass('outbox_message')::text")
        .fetch_one(&mut *conn)
        .await?;
    if exists.is_none() {
        return Ok(None);
    }
    sqlx::query_as(
        "SELECT id, seq, partition_key, status, stream, stream_seq
             FROM outbox_message ORDER BY seq",
    )
    .fetch_all(conn)
    .await
    .map(Some)
}

/// Creates the pgoutput slot `name` in the connection's database (a chaos run's witness: it
/// is read once at the end, so it keeps every change committed after its creation).
pub(crate) async fn create_witness_slot(
    conn: &mut PgConnection,
    name: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')")
        .bind(name)
        .execute(conn)
        .await?;
    Ok(())
}

/// Consumes the witness slot `name` through the publication `publication`: each change as
/// (its LSN, the pgoutput record: proto_version 1, text tuples, logical messages included).
pub(crate) async fn take_witness_changes(
    conn: &mut PgConnection,
    name: &str,
    publication: &str,
) -> Result<Vec<(i64, Vec<u8>)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT (lsn - '0/0')::bigint, data FROM pg_logical_slot_get_binary_changes($1, NULL, NULL,
            'proto_version', '1', 'publication_names', $2, 'messages', 'true')",
    )
    .bind(name)
    .bind(publication)
    .fetch_all(conn)
    .await
}

/// Whether a walsender streams the relay slot `name`, and its confirmed position: the
/// greater of the slot's and the relay's record of it (`outbox_wal_progress`, where a relay
/// resumes from); `None` when there is no such slot.
pub(crate) async fn slot_position(
    conn: &mut PgConnection,
    name: &str,
) -> Result<Option<(bool, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT s.active,
                (GREATEST(s.confirmed_flush_lsn, p.confirmed_lsn) - '0/0')::bigint
           FROM pg_replication_slots s
           LEFT JOIN outbox_wal_progress p ON p.slot_name = s.slot_name
          WHERE s.slot_name = $1",
    )
    .bind(name)
    .fetch_optional(conn)
    .await
}

/// The end of the log now, in bytes from its start.
pub(crate) async fn current_wal_position(conn: &mut PgConnection) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT (pg_current_wal_lsn() - '0/0')::bigint")
        .fetch_one(conn)
        .await
}

/// The `limit` oldest rows of `outbox_message` not published (by the table relay) or not
/// deleted (by the WAL relay): id, seq, partition key, age in seconds.
pub(crate) async fn oldest_unpublished(
    conn: &mut PgConnection,
    limit: i64,
) -> Result<Vec<(Uuid, i64, String, f64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, seq, partition_key, extract(epoch FROM now() - created_at)::float8
           FROM outbox_message WHERE status <> 'published' ORDER BY seq LIMIT $1",
    )
    .bind(limit)
    .fetch_all(conn)
    .await
}
