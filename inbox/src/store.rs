//! All SQL on `inbox_message`.

use sqlx::PgConnection;

/// Inserts the inbox row for `(consumer, message_id)` unless it exists. Returns true when the
/// row is new (the handler must run), false for a redelivery (skip it). Call it in the
/// handler's transaction: the row commits or rolls back with the handler's effects.
pub async fn insert_if_new(
    conn: &mut PgConnection,
    consumer: &str,
    message_id: &str,
    subject: &str,
    stream_seq: Option<i64>,
    outcome: &str,
) -> Result<bool, sqlx::Error> {
    let inserted = sqlx::query(
        "INSERT INTO inbox_message (consumer, message_id, subject, stream_seq, outcome)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (consumer, message_id) DO NOTHING",
    )
    .bind(consumer)
    .bind(message_id)
    .bind(subject)
    .bind(stream_seq)
    .bind(outcome)
    .execute(conn)
    .await?;
    Ok(inserted.rows_affected() == 1)
}

/// [`insert_if_new`] for many messages in one statement (all `processed`): returns the ids
/// whose row is new. An id listed twice is inserted once and returned once.
pub async fn insert_many_if_new(
    conn: &mut PgConnection,
    consumer: &str,
    message_ids: &[String],
    subjects: &[String],
    stream_seqs: &[Option<i64>],
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO inbox_message (consumer, message_id, subject, stream_seq, outcome)
         SELECT $1, m.id, m.subject, m.seq, 'processed'
         FROM unnest($2::text[], $3::text[], $4::bigint[]) AS m(id, subject, seq)
         ON CONFLICT (consumer, message_id) DO NOTHING
         RETURNING message_id",
    )
    .bind(consumer)
    .bind(message_ids)
    .bind(subjects)
    .bind(stream_seqs)
    .fetch_all(conn)
    .await
}

/// Records that a parked message was finally processed (after `dlq retry`).
pub async fn mark_processed(
    conn: &mut PgConnection,
    consumer: &str,
    message_id: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO inbox_message (consumer, message_id, subject, outcome)
         VALUES ($1, $2, '', 'processed')
         ON CONFLICT (consumer, message_id) DO UPDATE SET outcome = 'processed'",
    )
    .bind(consumer)
    .bind(message_id)
    .execute(conn)
    .await?;
    Ok(())
}

/// Deletes up to `limit` rows of `consumer` received more than `retention` ago. Returns how many.
pub async fn delete_older_than(
    conn: &mut PgConnection,
    consumer: &str,
    retention: std::time::Duration,
    limit: i64,
) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "DELETE FROM inbox_message WHERE ctid IN (
             SELECT ctid FROM inbox_message
             WHERE consumer = $1 AND received_at < now() - make_interval(secs => $2)
             LIMIT $3)",
    )
    .bind(consumer)
    .bind(retention.as_secs_f64())
    .bind(limit)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}
