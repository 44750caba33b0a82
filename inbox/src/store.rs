//! All SQL on `inbox_message` and `inbox_attempt`, and the statements the consumer runs on
//! `dead_letter` beyond the `dlq` crate's (re-locking a retry request, closing one whose
//! message was processed meanwhile).

use sqlx::PgConnection;

/// How a message was resolved, as its inbox row's `outcome` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Its handler's effects committed with the row.
    Processed,
    /// It was parked in `dead_letter` (a `dlq retry` may still process it).
    DeadLettered,
}

impl Outcome {
    /// The column value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Processed => "processed",
            Outcome::DeadLettered => "dead_lettered",
        }
    }

    fn from_column(value: &str) -> Result<Self, sqlx::Error> {
        match value {
            "processed" => Ok(Outcome::Processed),
            "dead_lettered" => Ok(Outcome::DeadLettered),
            other => Err(sqlx::Error::Decode(
                format!("inbox_message.outcome {other:?} is not processed or dead_lettered").into(),
            )),
        }
    }
}

/// Inserts the inbox row for `(consumer, message_id)` unless it exists. Returns true when the
/// row is new (the handler must run), false for a redelivery (skip it). Call it in the
/// handler's transaction: the row commits or rolls back with the handler's effects.
pub async fn insert_if_new(
    conn: &mut PgConnection,
    consumer: &str,
    message_id: &str,
    subject: &str,
    stream_seq: Option<i64>,
    outcome: Outcome,
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
    .bind(outcome.as_str())
    .execute(conn)
    .await?;
    Ok(inserted.rows_affected() == 1)
}

/// [`insert_if_new`] with outcome `processed`, in the same statement taking out the failed
/// handler attempts counted for the message (its `inbox_attempt` row is deleted: if the
/// handler's effects commit, the count goes with them; if they roll back, the row is back):
/// `None` for a message
/// already resolved (skip it), `Some(failed)` for a new row. Whatever the broker's delivery
/// count says: a copy of a message published again under another `Nats-Msg-Id` is a first
/// delivery to the broker but not a first attempt. One round trip, like the plain insert.
pub async fn insert_new_taking_attempts(
    conn: &mut PgConnection,
    consumer: &str,
    message_id: &str,
    subject: &str,
    stream_seq: Option<i64>,
) -> Result<Option<u32>, sqlx::Error> {
    let (new, failed): (bool, Option<i32>) = sqlx::query_as(
        "WITH ins AS (
             INSERT INTO inbox_message (consumer, message_id, subject, stream_seq, outcome)
             VALUES ($1, $2, $3, $4, 'processed')
             ON CONFLICT (consumer, message_id) DO NOTHING
             RETURNING message_id),
         taken AS (
             DELETE FROM inbox_attempt a USING ins
             WHERE a.consumer = $1 AND a.message_id = ins.message_id
             RETURNING a.attempts)
         SELECT EXISTS (SELECT 1 FROM ins), (SELECT attempts FROM taken)",
    )
    .bind(consumer)
    .bind(message_id)
    .bind(subject)
    .bind(stream_seq)
    .fetch_one(conn)
    .await?;
    Ok(new.then(|| failed.map_or(0, |a| u32::try_from(a).unwrap_or(0))))
}

/// [`insert_new_taking_attempts`] for many messages in one statement: returns each id whose
/// row is new with its failed handler attempts. An id listed twice is inserted once and
/// returned once.
pub async fn insert_many_new_taking_attempts(
    conn: &mut PgConnection,
    consumer: &str,
    message_ids: &[String],
    subjects: &[String],
    stream_seqs: &[Option<i64>],
) -> Result<Vec<(String, u32)>, sqlx::Error> {
    let rows: Vec<(String, i32)> = sqlx::query_as(
        "WITH ins AS (
             INSERT INTO inbox_message (consumer, message_id, subject, stream_seq, outcome)
             SELECT $1, m.id, m.subject, m.seq, 'processed'
             FROM unnest($2::text[], $3::text[], $4::bigint[]) AS m(id, subject, seq)
             ON CONFLICT (consumer, message_id) DO NOTHING
             RETURNING message_id),
         taken AS (
             DELETE FROM inbox_attempt a USING ins
             WHERE a.consumer = $1 AND a.message_id = ins.message_id
             RETURNING a.message_id, a.attempts)
         SELECT ins.message_id, coalesce(taken.attempts, 0)
         FROM ins LEFT JOIN taken USING (message_id)",
    )
    .bind(consumer)
    .bind(message_ids)
    .bind(subjects)
    .bind(stream_seqs)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, a)| (id, u32::try_from(a).unwrap_or(0)))
        .collect())
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

/// Counts one more failed handler attempt of a message (a retry, a panic, a refused
/// COMMIT). Call it after the handler's transaction was rolled back.
pub async fn count_failed_attempt(
    conn: &mut PgConnection,
    consumer: &str,
    message_id: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO inbox_attempt (consumer, message_id, attempts) VALUES ($1, $2, 1)
         ON CONFLICT (consumer, message_id)
         DO UPDATE SET attempts = inbox_attempt.attempts + 1, updated_at = now()",
    )
    .bind(consumer)
    .bind(message_id)
    .execute(conn)
    .await?;
    Ok(())
}

/// Forgets the attempts of a message (it is parked).
pub async fn forget_attempts(
    conn: &mut PgConnection,
    consumer: &str,
    message_id: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM inbox_attempt WHERE consumer = $1 AND message_id = $2")
        .bind(consumer)
        .bind(message_id)
        .execute(conn)
        .await?;
    Ok(())
}

/// Deletes the attempt rows of `consumer` not updated for `retention` (a message that was
/// handled by another path meanwhile). Returns how many.
pub async fn delete_attempts_older_than(
    conn: &mut PgConnection,
    consumer: &str,
    retention: std::time::Duration,
) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "DELETE FROM inbox_attempt
         WHERE consumer = $1 AND updated_at < now() - make_interval(secs => $2)",
    )
    .bind(consumer)
    .bind(retention.as_secs_f64())
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

/// Locks dead letter `id` if it still asks for a retry (`FOR UPDATE SKIP LOCKED`): for
/// re-running, in a transaction of its own, one letter of a group of `dlq retry` requests
/// whose COMMIT failed. False if it was taken or changed meanwhile.
pub async fn lock_retry_request(conn: &mut PgConnection, id: i64) -> Result<bool, sqlx::Error> {
    let found: Option<i64> = sqlx::query_scalar(
        "SELECT id FROM dead_letter WHERE id = $1 AND status = 'retry_requested'
         FOR UPDATE SKIP LOCKED",
    )
    .bind(id)
    .fetch_optional(conn)
    .await?;
    Ok(found.is_some())
}

/// Locks the inbox row of a message about to be re-run by `dlq retry`, inserting it as
/// `dead_lettered` if it is gone (the cleaner deleted it), and returns its outcome. Call it
/// in the retry's transaction before running the handler: a lane that gets a redelivery of
/// the message meanwhile waits for that transaction, and `processed` means the handler's
/// effects committed already (another instance processed the message while this one parked
/// it), so the handler must not run again. One statement.
pub async fn lock_outcome(
    conn: &mut PgConnection,
    consumer: &str,
    message_id: &str,
    subject: &str,
) -> Result<Outcome, sqlx::Error> {
    let outcome: String = sqlx::query_scalar(
        "INSERT INTO inbox_message (consumer, message_id, subject, outcome)
         VALUES ($1, $2, $3, 'dead_lettered')
         ON CONFLICT (consumer, message_id) DO UPDATE SET outcome = inbox_message.outcome
         RETURNING outcome",
    )
    .bind(consumer)
    .bind(message_id)
    .bind(subject)
    .fetch_one(conn)
    .await?;
    Outcome::from_column(&outcome)
}

/// Closes retry request `id` whose message was processed already (see [`lock_outcome`]):
/// status `retried`, without running the handler, noted in its history.
pub async fn mark_already_processed(conn: &mut PgConnection, id: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE dead_letter SET status = 'retried',
             history = history || jsonb_build_array(jsonb_build_object(
                 'action', 'retried', 'note', 'already processed; the handler did not run again',
                 'at', now()))
         WHERE id = $1",
    )
    .bind(id)
    .execute(conn)
    .await?;
    Ok(())
}

/// The pid of `conn`'s server backend.
pub async fn backend_pid(conn: &mut PgConnection) -> Result<i32, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(conn)
        .await
}

/// Cancels the statement backend `pid` is running, if any (`pg_cancel_backend`: a backend
/// idle in its transaction is not touched). Returns whether the signal was sent.
pub async fn cancel_backend_statement(
    conn: &mut PgConnection,
    pid: i32,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_cancel_backend($1)")
        .bind(pid)
        .fetch_one(conn)
        .await
}

/// One consumer's inbox, as the operator console shows it.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct ConsumerActivity {
    /// The consumer (its durable's name).
    pub consumer: String,
    /// Messages it took (handled or parked) in the last minute.
    pub last_minute: i64,
}

/// Every consumer with an inbox row, by name, at most `limit`: found by skipping from one
/// name to the next over the primary key, however large the inbox.
pub async fn consumer_names(
    conn: &mut PgConnection,
    limit: i64,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "WITH RECURSIVE names AS (
             (SELECT consumer FROM inbox_message ORDER BY consumer LIMIT 1)
             UNION ALL
             SELECT n.consumer FROM names p CROSS JOIN LATERAL (
                 SELECT consumer FROM inbox_message WHERE consumer > p.consumer
                 ORDER BY consumer LIMIT 1) n
         )
         SELECT consumer FROM names LIMIT $1",
    )
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// The consumers of [`consumer_names`] and what each took in the last minute (from
/// `inbox_message_received_at_idx`: a minute's rows, however large the inbox).
pub async fn consumer_activity(
    conn: &mut PgConnection,
    limit: i64,
) -> Result<Vec<ConsumerActivity>, sqlx::Error> {
    let names = consumer_names(&mut *conn, limit).await?;
    let recent: Vec<(String, i64)> = sqlx::query_as(
        "SELECT consumer, count(*) FROM inbox_message
         WHERE received_at > now() - interval '1 minute' AND consumer = ANY($1)
         GROUP BY consumer",
    )
    .bind(&names)
    .fetch_all(conn)
    .await?;
    let recent: std::collections::HashMap<String, i64> = recent.into_iter().collect();
    Ok(names
        .into_iter()
        .map(|consumer| ConsumerActivity {
            last_minute: recent.get(&consumer).copied().unwrap_or(0),
            consumer,
        })
        .collect())
}

/// Seconds since the oldest inbox row was written (`None` when the inbox is empty): how far
/// back the inbox still recognises a message it took, whichever consumer's.
pub async fn oldest_row_age(conn: &mut PgConnection) -> Result<Option<f64>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT extract(epoch FROM now() - min(received_at))::float8 FROM inbox_message",
    )
    .fetch_one(conn)
    .await
}
