//! `relay migrate`: applies the toolkit's schema.

use super::Global;

/// Applies the pending migrations and says which.
pub(super) async fn migrate(global: &Global) -> anyhow::Result<()> {
    let pool = global.pool(1)?;
    let report = migrations::migrate(&mut *pool.acquire().await?).await?;
    if report.applied.is_empty() {
        println!("schema is up to date");
    } else {
        println!("applied migrations {:?}", report.applied);
    }
    Ok(())
}
