//! All SQL that producers run: rows of `outbox_message` (table storage) and logical
//! decoding messages (log storage, through `outbox_emit_encoded`).
//!
//! - [`inspect`]: what operators look at (the backlog at a glance, per partition, keys
//!   waiting out a backoff) and "retry now", each bounded whatever the backlog's size.

use envelope::{Envelope, MessageId};
use sqlx::PgConnection;
use sqlx::postgres::PgDatabaseError;
use uuid::Uuid;

use crate::error::Error;

pub mod inspect;
pub(crate) mod literal;

/// The columns a producer writes, in the order of every insert's values.
macro_rules! columns {
    () => {
        "id, subject, event_type, source, partition_key, occurred_at, correlation_id, \
         causation_id, traceparent, tracestate, content_type, headers, payload"
    };
}

const COLUMNS: &str = columns!();

const INSERT: &str = concat!(
    "INSERT INTO outbox_message (",
    columns!(),
    ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
);

/// Rows keep the order of the arrays: `WITH ORDINALITY` plus `ORDER BY` makes the identity
/// column `seq` follow the caller's order.
const INSERT_MANY: &str = concat!(
    "INSERT INTO outbox_message (",
    columns!(),
    ") SELECT ",
    columns!(),
    " FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], \
        $6::timestamptz[], $7::text[], $8::uuid[], $9::text[], $10::text[], $11::text[], \
        $12::jsonb[], $13::bytea[]) WITH ORDINALITY AS m(",
    columns!(),
    ", ord) ORDER BY ord"
);

/// Log storage: every message of the array, in order, through the guard that refuses to
/// write what no slot could read (migration 0012).
const EMIT: &str = "SELECT outbox_emit_encoded(VARIADIC $1::bytea[])";

/// Inserts one validated envelope as a `pending` row.
pub async fn insert(conn: &mut PgConnection, env: &Envelope) -> Result<(), sqlx::Error> {
    sqlx::query(INSERT)
        .bind(env.id.as_uuid())
        .bind(env.subject.as_str())
        .bind(env.event_type.to_string())
        .bind(env.source.as_str())
        .bind(env.partition_key.as_str())
        .bind(env.occurred_at)
        .bind(env.correlation_id.as_ref().map(|c| c.as_str()))
        .bind(env.causation_id.map(|c| c.as_uuid()))
        .bind(env.trace.as_ref().map(|t| t.traceparent()))
        .bind(env.trace.as_ref().and_then(|t| t.tracestate()))
        .bind(env.content_type.as_ref().map(|c| c.as_str()))
        .bind(env.headers.to_json())
        .bind(env.payload.as_ref())
        .execute(conn)
        .await?;
    Ok(())
}

/// Inserts validated envelopes as `pending` rows with one statement, in slice order.
pub async fn insert_many(conn: &mut PgConnection, envs: &[Envelope]) -> Result<(), sqlx::Error> {
    let n = envs.len();
    let mut ids = Vec::with_capacity(n);
    let mut subjects = Vec::with_capacity(n);
    let mut types = Vec::with_capacity(n);
    let mut sources = Vec::with_capacity(n);
    let mut keys = Vec::with_capacity(n);
    let mut times = Vec::with_capacity(n);
    let mut correlations = Vec::with_capacity(n);
    let mut causations = Vec::with_capacity(n);
    let mut parents = Vec::with_capacity(n);
    let mut states = Vec::with_capacity(n);
    let mut content_types = Vec::with_capacity(n);
    let mut headers = Vec::with_capacity(n);
    let mut payloads = Vec::with_capacity(n);
    for env in envs {
        ids.push(env.id.as_uuid());
        subjects.push(env.subject.as_str());
        types.push(env.event_type.to_string());
        sources.push(env.source.as_str());
        keys.push(env.partition_key.as_str());
        times.push(env.occurred_at);
        correlations.push(env.correlation_id.as_ref().map(|c| c.as_str()));
        causations.push(env.causation_id.map(|c| c.as_uuid()));
        parents.push(env.trace.as_ref().map(|t| t.traceparent()));
        states.push(env.trace.as_ref().and_then(|t| t.tracestate()));
        content_types.push(env.content_type.as_ref().map(|c| c.as_str()));
        headers.push(env.headers.to_json());
        payloads.push(env.payload.as_ref());
    }
    sqlx::query(INSERT_MANY)
        .bind(ids)
        .bind(subjects)
        .bind(types)
        .bind(sources)
        .bind(keys)
        .bind(times)
        .bind(correlations)
        .bind(causations)
        .bind(parents)
        .bind(states)
        .bind(content_types)
        .bind(headers)
        .bind(payloads)
        .execute(conn)
        .await?;
    Ok(())
}

/// Log storage: emits encoded messages ([`envelope::wal::encode`]) as transactional logical
/// decoding messages with one statement, in slice order.
pub async fn emit(conn: &mut PgConnection, messages: &[Vec<u8>]) -> Result<(), sqlx::Error> {
    sqlx::query(EMIT).bind(messages).execute(conn).await?;
    Ok(())
}

/// Opens the transaction of an [`OutboxTransaction`](crate::OutboxTransaction).
pub(crate) async fn begin(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::raw_sql("BEGIN").execute(conn).await?;
    Ok(())
}

/// Sends `statement` (a [`literal::Batch`], if any) and `COMMIT` in one simple query: one
/// round trip. PostgreSQL runs them in order and stops at the first error, which leaves the
/// transaction uncommitted: an error here means nothing of it was committed, unless the
/// error is from `COMMIT` itself reporting a lost connection after sending it.
///
/// A savepoint taken and released first makes two silent cases errors: outside a
/// transaction block (something ended the transaction; [`is_no_transaction`]) and in an
/// aborted one (where `COMMIT` alone would roll back without an error).
pub(crate) async fn commit_with(
    conn: &mut PgConnection,
    statement: Option<String>,
) -> Result<(), sqlx::Error> {
    let mut sql = "SAVEPOINT outbox_commit;RELEASE SAVEPOINT outbox_commit;".to_owned();
    if let Some(statement) = statement {
        sql.push_str(&statement);
        sql.push(';');
    }
    sql.push_str("COMMIT");
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(conn)
        .await?;
    Ok(())
}

/// Whether `e` says there was no transaction to commit (SQLSTATE 25P01).
pub(crate) fn is_no_transaction(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|db| db.code())
        .is_some_and(|code| code == "25P01")
}

/// Ends the transaction of an [`OutboxTransaction`](crate::OutboxTransaction) without
/// committing.
pub(crate) async fn rollback(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::raw_sql("ROLLBACK").execute(conn).await?;
    Ok(())
}

/// Maps an insert failure to the crate error: a primary-key violation names the duplicate id.
pub(crate) fn classify(e: sqlx::Error, ids: &[MessageId]) -> Error {
    let duplicate = e
        .as_database_error()
        .filter(|db| db.constraint() == Some("outbox_message_pkey"))
        .map(|db| {
            let detail = db
                .try_downcast_ref::<PgDatabaseError>()
                .and_then(PgDatabaseError::detail)
                .unwrap_or_default();
            // "Key (id)=(0190...) already exists."
            ids.iter()
                .copied()
                .find(|id| detail.contains(&id.to_string()))
                .or_else(|| first_repeated(ids))
                .unwrap_or_else(|| ids.first().copied().unwrap_or_default())
        });
    match duplicate {
        Some(id) => Error::DuplicateId(id),
        None => Error::Database(e),
    }
}

fn first_repeated(ids: &[MessageId]) -> Option<MessageId> {
    let mut seen = std::collections::HashSet::<Uuid>::new();
    ids.iter().copied().find(|id| !seen.insert(id.as_uuid()))
}

// ---------------------------------------------------------------------------------------
// Relay-side statements. The relay crate calls these; they live here so that every
// statement on `outbox_message` has one home.
// ---------------------------------------------------------------------------------------

/// An outbox row claimed by a relay, with everything needed to publish it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ClaimedRow {
    /// The message id.
    pub id: Uuid,
    /// Commit-ordered position.
    pub seq: i64,
    /// Subject to publish on.
    pub subject: String,
    /// Full versioned type.
    pub event_type: String,
    /// Producing service.
    pub source: String,
    /// Ordering key.
    pub partition_key: String,
    /// Event time.
    pub occurred_at: time::OffsetDateTime,
    /// Correlation id.
    pub correlation_id: Option<String>,
    /// Causing message.
    pub causation_id: Option<Uuid>,
    /// W3C traceparent.
    pub traceparent: Option<String>,
    /// W3C tracestate.
    pub tracestate: Option<String>,
    /// Payload media type.
    pub content_type: Option<String>,
    /// Free-form headers (a JSON object of strings).
    pub headers: serde_json::Value,
    /// The payload.
    pub payload: Vec<u8>,
    /// Failed publish attempts so far, transient and permanent (a claim reports a negative
    /// stored count as 0).
    pub attempts: i32,
    /// How many of those failures were permanent (no stream, too large, refused): what the
    /// relay's `max_permanent_attempts` counts.
    pub permanent_failures: i32,
}

impl ClaimedRow {
    /// Rebuilds the envelope, validating every field as enqueue does. A row written around
    /// the outbox API (plain SQL) can fail here; such a row can never be published.
    pub fn to_envelope(&self) -> Result<Envelope, envelope::Error> {
        use envelope::{EventType, HeaderText, Headers, PartitionKey, Subject, TraceContext};
        let headers = Headers::from_json(&self.headers)?;
        Ok(Envelope {
            id: MessageId::from_uuid(self.id),
            subject: Subject::new(self.subject.clone())?,
            event_type: EventType::parse(&self.event_type)?,
            source: HeaderText::new("source", self.source.clone())?,
            partition_key: PartitionKey::new(self.partition_key.clone())?,
            occurred_at: self.occurred_at,
            correlation_id: self
                .correlation_id
                .clone()
                .map(|c| HeaderText::new("correlation id", c))
                .transpose()?,
            causation_id: self.causation_id.map(MessageId::from_uuid),
            trace: self
                .traceparent
                .clone()
                .map(|p| TraceContext::new(p, self.tracestate.clone()))
                .transpose()?,
            content_type: self
                .content_type
                .clone()
                .map(|c| HeaderText::new("content type", c))
                .transpose()?,
            headers,
            payload: bytes::Bytes::from(self.payload.clone()),
        })
    }
}

/// Begins a claim transaction on a connection of `pool`: the server ends the session (and
/// with it the claim) if the transaction stays idle for `claim_ttl_ms`, so a relay that hangs
/// cannot hold rows forever. Bitmap scans are off in it: on a busy outbox the planner would
/// otherwise pick a bitmap scan of the claim index plus a sort, which visits every dead entry
/// and every pending row instead of stopping after `limit` rows in `seq` order (measured: 11
/// ms instead of under 1 ms per claim). One round trip.
pub async fn begin_claim(
    pool: &sqlx::PgPool,
    claim_ttl_ms: u64,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
    pool.begin_with(sqlx::AssertSqlSafe(format!(
        "BEGIN; SET LOCAL idle_in_transaction_session_timeout = {claim_ttl_ms}; \
         SET LOCAL enable_bitmapscan = off"
    )))
    .await
}

/// Claims up to `limit` pending, available rows of the partitions `owner` holds a live lease
/// on, in `seq` order, by locking them (`FOR UPDATE SKIP LOCKED`); returns them in `seq`
/// order. Call it inside a transaction begun with [`begin_claim`] and keep that transaction
/// open while the rows are published: the claim lasts exactly as long as the transaction. Record the outcome with
/// [`mark_published`], [`record_failures`] and [`take_for_dead_letter`] in the same
/// transaction, then commit; rows it does not touch simply stay `pending`. If the claiming
/// process dies, PostgreSQL ends its session and the claim with it; a session that stays idle
/// in the transaction too long is ended by the server (see [`begin_claim`]).
///
/// Per-key order: keys whose earliest row waits out a retry backoff are skipped, and so are
/// the keys in `skip_keys`. Rows locked by other transactions are skipped too, so the caller
/// must publish a key's rows in `seq` order, one at a time, across its own open claims, and
/// must pass in `skip_keys` every key of which one of its open transactions holds a locked
/// row it will not publish (a given-up row, a failed head whose backoff is not committed):
/// a claim would otherwise return that key's later rows. The relay's dispatcher does both.
/// Other instances cannot overtake a locked row: the statement share-locks the lease rows of
/// the owned partitions (`FOR KEY SHARE`) for the whole transaction, and the relay's partition
/// hand-over skips lease rows that are locked (`FOR UPDATE SKIP LOCKED` on
/// `relay_partition_lease`), so a partition changes owner only once no claim of its previous
/// owner is still open.
///
/// A row's partition is `hashtextextended(partition_key, 0) & 255`, computed here rather than
/// stored, so that inserts stay cheap and rows written by any producer agree.
///
/// Cost: the owned partitions and the blocked keys are computed once per statement; the scan
/// walks `outbox_message_claim_idx` in `seq` order and stops after `limit` rows, so a claim
/// reads the head of the backlog only, whatever its size, and writes nothing to the rows
/// but their lock.
pub async fn claim_batch(
    conn: &mut PgConnection,
    owner: &str,
    limit: i64,
    skip_keys: &[String],
) -> Result<Vec<ClaimedRow>, sqlx::Error> {
    let mut rows: Vec<ClaimedRow> = sqlx::query_as(
        "SELECT m.id, m.seq, m.subject, m.event_type, m.source, m.partition_key,
             m.occurred_at, m.correlation_id, m.causation_id, m.traceparent, m.tracestate,
             m.content_type, m.headers, m.payload, greatest(m.attempts, 0) AS attempts,
             greatest(m.permanent_failures, 0) AS permanent_failures
         FROM outbox_message m
         WHERE m.status = 'pending'
           AND m.available_at <= now()
           AND m.partition_key NOT IN (SELECT unnest($3::text[]))
           AND (hashtextextended(m.partition_key, 0) & 255)::smallint = ANY (ARRAY(
               SELECT partition_id FROM relay_partition_lease
               WHERE owner = $1 AND lease_until > now()
               FOR KEY SHARE))
           AND NOT (m.partition_key = ANY (ARRAY(
               SELECT partition_key FROM outbox_message
               WHERE status = 'pending' AND attempts > 0 AND available_at > now())))
         ORDER BY m.seq
         LIMIT $2
         FOR UPDATE OF m SKIP LOCKED",
    )
    .bind(owner)
    .bind(limit)
    .bind(skip_keys)
    .fetch_all(conn)
    .await?;
    rows.sort_unstable_by_key(|r| r.seq);
    Ok(rows)
}

/// Where the broker stored one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The message id.
    pub id: Uuid,
    /// The PubAck's stream.
    pub stream: String,
    /// The PubAck's stream sequence.
    pub stream_seq: i64,
}

/// Marks rows published with their PubAck, whether or not the caller still holds their claim
/// (a row whose claim ended was still published). With `delete` the rows are removed instead
/// of kept for the retention period. Returns how many rows changed.
pub async fn mark_published(
    conn: &mut PgConnection,
    acks: &[Published],
    delete: bool,
) -> Result<u64, sqlx::Error> {
    if acks.is_empty() {
        return Ok(0);
    }
    if delete {
        let ids: Vec<Uuid> = acks.iter().map(|a| a.id).collect();
        let done = sqlx::query("DELETE FROM outbox_message WHERE id = ANY($1)")
            .bind(ids)
            .execute(conn)
            .await?;
        return Ok(done.rows_affected());
    }
    let ids: Vec<Uuid> = acks.iter().map(|a| a.id).collect();
    let streams: Vec<&str> = acks.iter().map(|a| a.stream.as_str()).collect();
    let seqs: Vec<i64> = acks.iter().map(|a| a.stream_seq).collect();
    let done = sqlx::query(
        "UPDATE outbox_message o
         SET status = 'published', published_at = now(), last_error = NULL,
             stream = a.stream, stream_seq = a.seq
         FROM unnest($1::uuid[], $2::text[], $3::bigint[]) AS a(id, stream, seq)
         WHERE o.id = a.id AND o.status <> 'published'",
    )
    .bind(ids)
    .bind(streams)
    .bind(seqs)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

/// A failed publish of a claimed row, to be recorded before its claim ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The message id.
    pub id: Uuid,
    /// How long to wait before it may be claimed again, in milliseconds.
    pub delay_ms: i64,
    /// The error to record.
    pub error: String,
    /// Whether the failure was permanent (counted in `permanent_failures` too).
    pub permanent: bool,
}

/// Records failed attempts: counts them, permanent ones also in `permanent_failures` (each
/// from 0 for a row written with a negative count: the claim blocks a key only while its row
/// has `attempts > 0`), sets the backoff (from the current time, not the start of the claim
/// transaction, which may be long past) and the last error. Rows already published meanwhile
/// are left alone. Returns how many rows changed.
pub async fn record_failures(
    conn: &mut PgConnection,
    rows: &[Failure],
) -> Result<u64, sqlx::Error> {
    if rows.is_empty() {
        return Ok(0);
    }
    let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
    let delays: Vec<i64> = rows.iter().map(|r| r.delay_ms).collect();
    let errors: Vec<&str> = rows.iter().map(|r| r.error.as_str()).collect();
    let permanent: Vec<bool> = rows.iter().map(|r| r.permanent).collect();
    let done = sqlx::query(
        "UPDATE outbox_message o
         SET attempts = least(greatest(o.attempts, 0), 2147483646) + 1,
             permanent_failures = least(greatest(o.permanent_failures, 0), 2147483646)
                 + r.permanent::int,
             available_at = clock_timestamp()
                 + make_interval(secs => r.delay_ms::double precision / 1000),
             last_error = r.error
         FROM unnest($1::uuid[], $2::bigint[], $3::text[], $4::bool[])
             AS r(id, delay_ms, error, permanent)
         WHERE o.id = r.id AND o.status = 'pending'",
    )
    .bind(ids)
    .bind(delays)
    .bind(errors)
    .bind(permanent)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

/// Deletes unpublished rows that are being moved to the dead-letter store, returning them;
/// call it in the transaction that records the dead letters (and, for the relay, that holds
/// their claim).
pub async fn take_for_dead_letter(
    conn: &mut PgConnection,
    ids: &[Uuid],
) -> Result<Vec<ClaimedRow>, sqlx::Error> {
    sqlx::query_as(
        "DELETE FROM outbox_message
         WHERE id = ANY($1) AND status = 'pending'
         RETURNING id, seq, subject, event_type, source, partition_key, occurred_at,
             correlation_id, causation_id, traceparent, tracestate, content_type, headers,
             payload, attempts, permanent_failures",
    )
    .bind(ids)
    .fetch_all(conn)
    .await
}

/// Deletes up to `limit` published rows older than `retention_ms`. Returns how many.
pub async fn delete_published_before(
    conn: &mut PgConnection,
    retention_ms: i64,
    limit: i64,
) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "DELETE FROM outbox_message WHERE id IN (
             SELECT id FROM outbox_message
             WHERE status = 'published'
               AND published_at < now() - make_interval(secs => $1::double precision / 1000)
             LIMIT $2)",
    )
    .bind(retention_ms)
    .bind(limit)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

/// The backlog as the relay reports it.
#[derive(Debug, Clone, Default, PartialEq, sqlx::FromRow)]
pub struct Backlog {
    /// Rows waiting to be published (including those a relay is publishing right now).
    pub unpublished: i64,
    /// Age of the oldest unpublished row, in seconds (0 when none).
    pub oldest_age_seconds: f64,
    /// Rows that failed at least once and are still unpublished.
    pub retrying: i64,
}

/// Counts the backlog (an index scan of unpublished rows).
pub async fn backlog(conn: &mut PgConnection) -> Result<Backlog, sqlx::Error> {
    sqlx::query_as(
        "SELECT count(*) AS unpublished,
                coalesce(extract(epoch FROM now() - min(created_at))::float8, 0) AS oldest_age_seconds,
                count(*) FILTER (WHERE attempts > 0) AS retrying
         FROM outbox_message WHERE status <> 'published'",
    )
    .fetch_one(conn)
    .await
}

/// Published rows since `since`, in `seq` order, at most `limit` after `after_seq`: what
/// reconcile compares with the stream.
pub async fn published_since(
    conn: &mut PgConnection,
    since: time::OffsetDateTime,
    after_seq: i64,
    limit: i64,
) -> Result<Vec<(Uuid, i64, Option<String>, Option<i64>)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, seq, stream, stream_seq FROM outbox_message
         WHERE status = 'published' AND published_at >= $1 AND seq > $2
         ORDER BY seq LIMIT $3",
    )
    .bind(since)
    .bind(after_seq)
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// Sets published rows back to `pending` so the relay publishes them again (reconcile, after
/// the broker lost them). Returns how many.
pub async fn republish(conn: &mut PgConnection, ids: &[Uuid]) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE outbox_message
         SET status = 'pending', published_at = NULL, stream = NULL, stream_seq = NULL,
             available_at = now()
         WHERE id = ANY($1) AND status = 'published'",
    )
    .bind(ids)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

/// Vacuums `outbox_message` (skipped if another vacuum holds it). Every mark leaves a dead
/// row version and a stale entry at the head of the claim index; claims slow down as they
/// pile up, faster than autovacuum's defaults clean them on a busy outbox.
pub async fn vacuum(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::raw_sql("VACUUM (SKIP_LOCKED) outbox_message")
        .execute(conn)
        .await?;
    Ok(())
}

/// Deletes rows by id (the WAL relay's cleanup of rows it read from the log and published);
/// returns the ids of the rows it deleted. A row whose inserting transaction is committed
/// but not yet visible (its commit is in the log, its backend has not finished committing,
/// for example while it waits for a synchronous standby) is not deleted: the caller tells
/// that apart from a row already gone by the transaction's visibility.
pub async fn delete_by_ids(
    conn: &mut PgConnection,
    ids: &[Uuid],
) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar("DELETE FROM outbox_message WHERE id = ANY($1) RETURNING id")
        .bind(ids)
        .fetch_all(conn)
        .await
}
