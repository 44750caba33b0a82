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
