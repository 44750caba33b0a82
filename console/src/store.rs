//! The console's own SQL: the audit trail (`console_audit`, which only the console writes)
//! and the statement timeout every page's queries run under. What the console shows of the
//! outbox, the relays and the dead letters comes from those crates' own `store` modules.

use std::time::Duration;

use sqlx::{PgConnection, PgPool, Postgres, Transaction};

/// A transaction on `pool` whose statements may each run at most `timeout`.
pub(crate) async fn begin(
    pool: &PgPool,
    timeout: Duration,
) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT set_config('statement_timeout', $1, true)")
        .bind(format!("{}ms", timeout.as_millis().max(1)))
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

/// Like [`begin`], in one snapshot (REPEATABLE READ): an action counts what it would take
/// and takes exactly that, whatever commits meanwhile (a concurrent change to the same rows
/// fails it, and nothing is done).
pub(crate) async fn begin_snapshot(
    pool: &PgPool,
    timeout: Duration,
) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *tx)
        .await?;
    sqlx::query("SELECT set_config('statement_timeout', $1, true)")
        .bind(format!("{}ms", timeout.as_millis().max(1)))
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

/// The transaction's time (its snapshot's), in microseconds since 1970-01-01 UTC.
pub(crate) async fn now_micros(conn: &mut PgConnection) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT (extract(epoch FROM now()) * 1000000)::bigint")
        .fetch_one(conn)
        .await
}

/// One action, as the audit trail keeps it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct AuditEntry {
    pub(crate) at: time::OffsetDateTime,
    pub(crate) actor: String,
    pub(crate) action: String,
    pub(crate) detail: serde_json::Value,
    pub(crate) affected: i64,
}

/// Records an action in the caller's transaction (the action's own).
pub(crate) async fn audit(
    conn: &mut PgConnection,
    actor: &str,
    action: &str,
    detail: &serde_json::Value,
    affected: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO console_audit (actor, action, detail, affected) VALUES ($1, $2, $3, $4)",
    )
    .bind(actor)
    .bind(action)
    .bind(detail)
    .bind(affected)
    .execute(conn)
    .await?;
    Ok(())
}

/// The `limit` latest actions, newest first.
pub(crate) async fn recent_audit(
    conn: &mut PgConnection,
    limit: i64,
) -> Result<Vec<AuditEntry>, sqlx::Error> {
    sqlx::query_as(
        "SELECT at, actor, action, detail, affected FROM console_audit ORDER BY id DESC LIMIT $1",
    )
    .bind(limit)
    .fetch_all(conn)
    .await
}
