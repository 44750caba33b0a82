//! The one SQL statement the services share: applying a service's own schema.

use sqlx::PgConnection;

/// Runs `schema` (idempotent DDL: `CREATE TABLE IF NOT EXISTS ...`) in one transaction under
/// an advisory lock, so that instances starting together do not race on the catalog.
pub async fn apply_schema(
    conn: &mut PgConnection,
    schema: &'static str,
) -> Result<(), sqlx::Error> {
    use sqlx::Connection as _;
    let mut tx = conn.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('demo-services schema', 0))")
        .execute(&mut *tx)
        .await?;
    sqlx::raw_sql(schema).execute(&mut *tx).await?;
    tx.commit().await
}

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
