//! All SQL on `dead_letter`.

use sqlx::PgConnection;

use crate::DeadLetter;

/// Parks a message; returns the dead letter's id.
///
/// One live row exists per `(consumer, message_id)`: parking the same message again (it was
/// retried and failed again) updates that row's reason, error, attempts and
/// `last_failed_at`, sets it back to `dead`, and appends to its history. Runs in the caller's
/// connection or transaction.
pub async fn record(conn: &mut PgConnection, letter: &DeadLetter) -> Result<i64, sqlx::Error> {
    let event = serde_json::json!({
        "action": "failed",
        "reason": letter.reason,
        "attempts": letter.attempts,
        "error": letter.error_chain.first(),
    });
    sqlx::query_scalar(
        "INSERT INTO dead_letter (source, consumer, message_id, subject, partition_key, headers,
             payload, reason, error_chain, attempts, stream, stream_seq, history)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12,
             jsonb_build_array($13::jsonb || jsonb_build_object('at', now())))
         ON CONFLICT (consumer, message_id) DO UPDATE SET
             reason = EXCLUDED.reason,
             error_chain = EXCLUDED.error_chain,
             attempts = dead_letter.attempts + EXCLUDED.attempts,
             last_failed_at = now(),
             status = 'dead',
             history = dead_letter.history || EXCLUDED.history
         RETURNING id",
    )
    .bind(letter.source.as_str())
    .bind(&letter.consumer)
    .bind(&letter.message_id)
    .bind(&letter.subject)
    .bind(&letter.partition_key)
    .bind(serde_json::Value::Object(letter.headers.clone()))
    .bind(&letter.payload)
    .bind(&letter.reason)
    .bind(serde_json::to_value(&letter.error_chain).unwrap_or_default())
    .bind(letter.attempts)
    .bind(&letter.stream)
    .bind(letter.stream_seq)
    .bind(event)
    .fetch_one(conn)
    .await
}

/// How many dead letters `source` has parked that are not yet retried.
pub async fn count_dead(
    conn: &mut PgConnection,
    source: crate::Source,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM dead_letter WHERE source = $1 AND status <> 'retried'")
        .bind(source.as_str())
        .fetch_one(conn)
        .await
}
