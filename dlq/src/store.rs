//! All SQL on `dead_letter`.

use sqlx::PgConnection;

use crate::DeadLetter;

/// Parks a message; returns the dead letter's id.
///
/// One live row exists per `(consumer, message_id)`: parking the same message again (it was
/// retried and failed again) updates that row's reason, error, attempts and
/// `last_failed_at`, sets it back to `dead`, and appends to its history. Runs in the caller's
/// connection or transaction.
///
/// A subject longer than [`SUBJECT_LIMIT`] characters (only a message that can never be
/// published or decoded has one) is stored cut to that length, with the original length added
/// to the error chain: the subject is indexed, and an index entry is limited to about 2.7 kB.
pub async fn record(conn: &mut PgConnection, letter: &DeadLetter) -> Result<i64, sqlx::Error> {
    let mut error_chain = letter.error_chain.clone();
    let subject = match letter.subject.char_indices().nth(SUBJECT_LIMIT) {
        Some((cut, _)) => {
            error_chain.push(format!(
                "the subject was {} bytes long; its first {SUBJECT_LIMIT} characters are kept",
                letter.subject.len()
            ));
            &letter.subject[..cut]
        }
        None => letter.subject.as_str(),
    };
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
    .bind(subject)
    .bind(&letter.partition_key)
    .bind(serde_json::Value::Object(letter.headers.clone()))
    .bind(&letter.payload)
    .bind(&letter.reason)
    .bind(serde_json::to_value(&error_chain).unwrap_or_default())
    .bind(letter.attempts)
    .bind(&letter.stream)
    .bind(letter.stream_seq)
    .bind(event)
    .fetch_one(conn)
    .await
}

/// The longest subject a dead letter keeps, in characters (valid subjects are at most 255
/// bytes).
pub const SUBJECT_LIMIT: usize = 255;

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

/// A dead letter as stored.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow, serde::Serialize)]
pub struct Stored {
    /// Its id (what `dlq show` and `dlq retry` take).
    pub id: i64,
    /// `relay` or `consumer`.
    pub source: String,
    /// The consumer whose handler failed, or `relay`.
    pub consumer: String,
    /// The message id.
    pub message_id: String,
    /// The subject.
    pub subject: String,
    /// The partition key, if known.
    pub partition_key: Option<String>,
    /// All headers, name to value.
    pub headers: serde_json::Value,
    /// The original bytes.
    #[serde(skip)]
    pub payload: Vec<u8>,
    /// Short cause.
    pub reason: String,
    /// Error and causes, outermost first.
    pub error_chain: serde_json::Value,
    /// Delivery or publish attempts.
    pub attempts: i32,
    /// First failure.
    #[serde(with = "time::serde::rfc3339")]
    pub first_failed_at: time::OffsetDateTime,
    /// Latest failure.
    #[serde(with = "time::serde::rfc3339")]
    pub last_failed_at: time::OffsetDateTime,
    /// `dead`, `retry_requested` or `retried`.
    pub status: String,
    /// Failures and retries, oldest first.
    pub history: serde_json::Value,
}

const COLUMNS: &str =
    "id, source, consumer, message_id, subject, partition_key, headers, payload, reason,
    error_chain, attempts, first_failed_at, last_failed_at, status, history";

/// Locks and returns up to `limit` retry requests of `consumer`, oldest first; call it in the
/// transaction that re-runs them and records the result, so that a request runs once.
pub async fn take_retry_requests(
    conn: &mut PgConnection,
    consumer: &str,
    limit: i64,
) -> Result<Vec<Stored>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM dead_letter
         WHERE consumer = $1 AND status = 'retry_requested'
         ORDER BY id LIMIT $2
         FOR UPDATE SKIP LOCKED"
    )))
    .bind(consumer)
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// Records that a retried dead letter succeeded.
pub async fn mark_retried(conn: &mut PgConnection, id: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE dead_letter SET status = 'retried',
             history = history || jsonb_build_array(jsonb_build_object('action', 'retried', 'at', now()))
         WHERE id = $1",
    )
    .bind(id)
    .execute(conn)
    .await?;
    Ok(())
}

/// Marks dead letter `id` retried if it is still `dead`; false when it is not (another
/// retry took it).
pub async fn mark_dead_retried(conn: &mut PgConnection, id: i64) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE dead_letter SET status = 'retried',
             history = history || jsonb_build_array(jsonb_build_object('action', 'retried', 'at', now()))
         WHERE id = $1 AND status = 'dead'",
    )
    .bind(id)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Asks for another attempt at dead letters `ids` that are `dead`: consumer dead letters are
/// re-run by that consumer's own runtime; relay dead letters go back to the outbox through
/// the `dlq` CLI. Returns how many changed.
pub async fn request_retry(conn: &mut PgConnection, ids: &[i64]) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE dead_letter SET status = 'retry_requested',
             history = history || jsonb_build_array(jsonb_build_object('action', 'retry_requested', 'at', now()))
         WHERE id = ANY($1) AND status = 'dead'",
    )
    .bind(ids)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

/// Which dead letters a command applies to; `None` fields do not filter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Exactly these ids.
    pub ids: Option<Vec<i64>>,
    /// This consumer (or `relay`).
    pub consumer: Option<String>,
    /// This subject.
    pub subject: Option<String>,
    /// This reason.
    pub reason: Option<String>,
    /// This status.
    pub status: Option<String>,
    /// Last failed at or after.
    pub since: Option<time::OffsetDateTime>,
    /// Last failed before.
    pub until: Option<time::OffsetDateTime>,
    /// This source: `relay` or `consumer`.
    pub source: Option<String>,
    /// This partition key.
    pub partition_key: Option<String>,
    /// Error chains containing this text, ignoring case (`%` and `_` are plain characters).
    /// A scan of the letters unless the optional trigram index exists (docs/operations.md:
    /// `dead_letter_error_trgm_idx`).
    pub error_text: Option<String>,
    /// Ids up to this one (what existed when a count was shown: later letters have higher
    /// ids).
    pub max_id: Option<i64>,
}

const FILTER: &str = "($1::bigint[] IS NULL OR id = ANY($1))
    AND ($2::text IS NULL OR consumer = $2)
    AND ($3::text IS NULL OR subject = $3)
    AND ($4::text IS NULL OR reason = $4)
    AND ($5::text IS NULL OR status = $5)
    AND ($6::timestamptz IS NULL OR last_failed_at >= $6)
    AND ($7::timestamptz IS NULL OR last_failed_at < $7)
    AND ($8::text IS NULL OR source = $8)
    AND ($9::text IS NULL OR partition_key = $9)
    AND ($10::text IS NULL OR lower(error_chain::text) LIKE '%' || replace(replace(replace(
        lower($10), '!', '!!'), '%', '!%'), '_', '!_') || '%' ESCAPE '!')
    AND ($11::bigint IS NULL OR id <= $11)";

macro_rules! bind_filter {
    ($query:expr, $f:expr) => {
        $query
            .bind(&$f.ids)
            .bind(&$f.consumer)
            .bind(&$f.subject)
            .bind(&$f.reason)
            .bind(&$f.status)
            .bind($f.since)
            .bind($f.until)
            .bind(&$f.source)
            .bind(&$f.partition_key)
            .bind(&$f.error_text)
            .bind($f.max_id)
    };
}

/// Dead letters matching `filter`, newest failure first, at most `limit`.
pub async fn list(
    conn: &mut PgConnection,
    filter: &Filter,
    limit: i64,
) -> Result<Vec<Stored>, sqlx::Error> {
    let sql = format!(
        "SELECT {COLUMNS} FROM dead_letter WHERE {FILTER} ORDER BY last_failed_at DESC, id DESC LIMIT $12"
    );
    bind_filter!(sqlx::query_as(sqlx::AssertSqlSafe(sql)), filter)
        .bind(limit)
        .fetch_all(conn)
        .await
}

/// Where a page of [`list_page`] ends: the next page starts after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    /// The last letter's `last_failed_at`.
    pub last_failed_at: time::OffsetDateTime,
    /// The last letter's id.
    pub id: i64,
}

/// Up to `limit` dead letters matching `filter`, newest failure first, after `after` (keyset
/// pagination: the cost of a page does not grow with how deep it is, and no count is
/// taken).
pub async fn list_page(
    conn: &mut PgConnection,
    filter: &Filter,
    after: Option<Cursor>,
    limit: i64,
) -> Result<Vec<Stored>, sqlx::Error> {
    let sql = format!(
        "SELECT {COLUMNS} FROM dead_letter WHERE {FILTER}
           AND ($13::timestamptz IS NULL OR (last_failed_at, id) < ($13, $14))
         ORDER BY last_failed_at DESC, id DESC LIMIT $12"
    );
    bind_filter!(sqlx::query_as(sqlx::AssertSqlSafe(sql)), filter)
        .bind(limit)
        .bind(after.map(|c| c.last_failed_at))
        .bind(after.map(|c| c.id))
        .fetch_all(conn)
        .await
}

/// One dead letter by id.
pub async fn get(conn: &mut PgConnection, id: i64) -> Result<Option<Stored>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM dead_letter WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(conn)
    .await
}

/// Deletes the dead letters matching `filter`; returns how many.
pub async fn purge(conn: &mut PgConnection, filter: &Filter) -> Result<u64, sqlx::Error> {
    let sql = format!("DELETE FROM dead_letter WHERE {FILTER}");
    let done = bind_filter!(sqlx::query(sqlx::AssertSqlSafe(sql)), filter)
        .execute(conn)
        .await?;
    Ok(done.rows_affected())
}

/// Counts the dead letters matching `filter`.
pub async fn count(conn: &mut PgConnection, filter: &Filter) -> Result<i64, sqlx::Error> {
    let sql = format!("SELECT count(*) FROM dead_letter WHERE {FILTER}");
    bind_filter!(sqlx::query_scalar(sqlx::AssertSqlSafe(sql)), filter)
        .fetch_one(conn)
        .await
}

/// The highest id matching `filter`, if any.
pub async fn max_id(conn: &mut PgConnection, filter: &Filter) -> Result<Option<i64>, sqlx::Error> {
    let sql = format!("SELECT max(id) FROM dead_letter WHERE {FILTER}");
    bind_filter!(sqlx::query_scalar(sqlx::AssertSqlSafe(sql)), filter)
        .fetch_one(conn)
        .await
}

/// A fingerprint of the letters matching `filter` as they are now (each one's id, status,
/// attempts and last failure): equal fingerprints mean the same letters in the same state,
/// whatever their count. The console confirms an action on what the operator was shown
/// with it.
pub async fn fingerprint(conn: &mut PgConnection, filter: &Filter) -> Result<String, sqlx::Error> {
    let sql = format!(
        "SELECT coalesce(sum(hashtextextended(
                    id || ':' || status || ':' || attempts || ':' || last_failed_at, 0)::numeric), 0)::text
         FROM dead_letter WHERE {FILTER}"
    );
    bind_filter!(sqlx::query_scalar(sqlx::AssertSqlSafe(sql)), filter)
        .fetch_one(conn)
        .await
}

/// One line of `dlq stats`.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow, serde::Serialize)]
pub struct Stat {
    /// Consumer (or `relay`).
    pub consumer: String,
    /// Reason.
    pub reason: String,
    /// Status.
    pub status: String,
    /// How many.
    pub count: i64,
    /// Oldest first failure in the group.
    #[serde(with = "time::serde::rfc3339")]
    pub oldest: time::OffsetDateTime,
}

/// Waiting (`dead`) letters of one consumer and reason, as the console's overview shows
/// them.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct DeadByReason {
    /// Consumer (or `relay`).
    pub consumer: String,
    /// Reason.
    pub reason: String,
    /// How many, counted up to the cap.
    pub count: i64,
    /// More than `count` wait: the count stopped at the cap.
    pub capped: bool,
}

/// The waiting letters by consumer and reason (at most `groups` of them), each count
/// stopping after `cap`. Cost: a skip from one (consumer, reason) to the next over
/// `dead_letter_dead_reason_idx` and at most `cap` index entries per group, whatever the
/// table's size; `dlq stats` counts exactly, and reads the whole table.
pub async fn dead_by_reason(
    conn: &mut PgConnection,
    groups: i64,
    cap: i64,
) -> Result<Vec<DeadByReason>, sqlx::Error> {
    sqlx::query_as(
        "WITH RECURSIVE pairs AS (
             (SELECT consumer, reason FROM dead_letter WHERE status = 'dead'
              ORDER BY consumer, reason LIMIT 1)
             UNION ALL
             SELECT n.consumer, n.reason FROM pairs p CROSS JOIN LATERAL (
                 SELECT consumer, reason FROM dead_letter
                 WHERE status = 'dead' AND (consumer, reason) > (p.consumer, p.reason)
                 ORDER BY consumer, reason LIMIT 1) n
         ), listed AS (SELECT consumer, reason FROM pairs LIMIT $1)
         SELECT l.consumer, l.reason, least(c.count, $2) AS count, c.count > $2 AS capped
         FROM listed l CROSS JOIN LATERAL (
             SELECT count(*) AS count FROM (
                 SELECT 1 FROM dead_letter d
                 WHERE d.status = 'dead' AND d.consumer = l.consumer AND d.reason = l.reason
                 LIMIT $2 + 1) x) c
         ORDER BY c.count DESC, l.consumer, l.reason",
    )
    .bind(groups)
    .bind(cap)
    .fetch_all(conn)
    .await
}

/// Counts by consumer, reason and status.
pub async fn stats(conn: &mut PgConnection) -> Result<Vec<Stat>, sqlx::Error> {
    sqlx::query_as(
        "SELECT consumer, reason, status, count(*) AS count, min(first_failed_at) AS oldest
         FROM dead_letter GROUP BY consumer, reason, status
         ORDER BY consumer, reason, status",
    )
    .fetch_all(conn)
    .await
}
