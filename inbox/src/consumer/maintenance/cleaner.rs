//! The inbox cleaner: deletes this consumer's old inbox and attempt rows.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::connection::ClosedUnlessReleased;
use crate::consumer::Consumer;
use crate::store;

/// Deletes inbox rows past the retention, and attempt rows not updated for as long, every
/// `cleaner_interval`.
pub(in crate::consumer) async fn cleaner(consumer: Arc<Consumer>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(consumer.config.cleaner_interval);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let work = async {
            let mut conn = ClosedUnlessReleased::acquire(&consumer).await?;
            loop {
                let n = store::delete_older_than(
                    &mut conn,
                    &consumer.config.name,
                    consumer.config.inbox_retention,
                    10_000,
                )
                .await?;
                if n < 10_000 {
                    break;
                }
            }
            store::delete_attempts_older_than(
                &mut conn,
                &consumer.config.name,
                consumer.config.inbox_retention,
            )
            .await?;
            conn.release();
            Ok::<_, sqlx::Error>(())
        };
        // Stopped with the consumer even mid-delete (each delete is a statement of its own).
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            result = work => result,
        };
        if let Err(e) = result {
            tracing::warn!(consumer = %consumer.config.name, error = %e, "inbox cleaner failed");
        }
    }
}
