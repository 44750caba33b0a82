//! The runner's SQL: recreating the demo databases, and reading the outbox rows that the
//! chaos run's stream check compares with the streams.

use sqlx::PgConnection;
use uuid::Uuid;

/// `id, seq, partition_key, status, stream, stream_seq` of an `outbox_message` row.
pub(crate) type RawOutboxRow = (Uuid, i64, String, String, Option<String>, Option<i64>);

/// Drops (disconnecting its sessions) and creates the database `name`, which must be a plain
/// identifier of `a-z 0-9 _` (it cannot be a bind parameter).
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
