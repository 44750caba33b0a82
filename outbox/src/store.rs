//! All SQL that producers run on `outbox_message`.

use envelope::{Envelope, MessageId};
use sqlx::PgConnection;
use sqlx::postgres::PgDatabaseError;
use uuid::Uuid;

use crate::error::Error;

const INSERT: &str = "INSERT INTO outbox_message (
        id, subject, event_type, source, partition_key, occurred_at, correlation_id,
        causation_id, traceparent, tracestate, content_type, headers, payload)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)";

/// Rows keep the order of the arrays: `WITH ORDINALITY` plus `ORDER BY` makes the identity
/// column `seq` follow the caller's order.
const INSERT_MANY: &str = "INSERT INTO outbox_message (
        id, subject, event_type, source, partition_key, occurred_at, correlation_id,
        causation_id, traceparent, tracestate, content_type, headers, payload)
    SELECT id, subject, event_type, source, partition_key, occurred_at, correlation_id,
        causation_id, traceparent, tracestate, content_type, headers, payload
    FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[],
        $7::text[], $8::uuid[], $9::text[], $10::text[], $11::text[], $12::jsonb[], $13::bytea[])
        WITH ORDINALITY AS m(id, subject, event_type, source, partition_key, occurred_at,
            correlation_id, causation_id, traceparent, tracestate, content_type, headers,
            payload, ord)
    ORDER BY ord";

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
        .bind(headers_json(env))
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
        headers.push(headers_json(env));
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

fn headers_json(env: &Envelope) -> serde_json::Value {
    serde_json::Value::Object(
        env.headers
            .iter()
            .map(|(k, v)| (k.to_owned(), serde_json::Value::String(v.to_owned())))
            .collect(),
    )
}

/// Maps an insert failure to the crate error: a primary-key violation names the duplicate id.
pub(crate) fn classify(e: sqlx::Error, envs: &[Envelope]) -> Error {
    let duplicate = e
        .as_database_error()
        .filter(|db| db.constraint() == Some("outbox_message_pkey"))
        .map(|db| {
            let detail = db
                .try_downcast_ref::<PgDatabaseError>()
                .and_then(PgDatabaseError::detail)
                .unwrap_or_default();
            // "Key (id)=(0190...) already exists."
            envs.iter()
                .map(|env| env.id)
                .find(|id| detail.contains(&id.to_string()))
                .or_else(|| first_repeated(envs))
                .unwrap_or_else(|| envs.first().map_or_else(MessageId::new, |env| env.id))
        });
    match duplicate {
        Some(id) => Error::DuplicateId(id),
        None => Error::Database(e),
    }
}

fn first_repeated(envs: &[Envelope]) -> Option<MessageId> {
    let mut seen = std::collections::HashSet::<Uuid>::new();
    envs.iter()
        .map(|env| env.id)
        .find(|id| !seen.insert(id.as_uuid()))
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
    /// Failed publish attempts so far.
    pub attempts: i32,
}

impl ClaimedRow {
    /// Rebuilds the envelope, validating every field as enqueue does. A row written around
    /// the outbox API (plain SQL) can fail here; such a row can never be published.
    pub fn to_envelope(&self) -> Result<Envelope, envelope::Error> {
        use envelope::{EventType, HeaderText, Headers, PartitionKey, Subject, TraceContext};
        let mut headers = Headers::new();
        if let Some(map) = self.headers.as_object() {
            for (name, value) in map {
                let value = value.as_str().ok_or_else(|| envelope::Error::InvalidText {
                    field: format!("header {name:?}"),
                    reason: "stored value is not a string",
                })?;
                headers.insert(name.clone(), value)?;
            }
        }
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

/// Claims up to `limit` pending, available rows of the partitions `owner` holds a live lease
/// on, in `seq` order, for `claim_ttl_ms`; returns them in `seq` order.
///
/// Per-key order: a key is skipped while any of its rows is claimed by another instance or
/// waits out a retry backoff. Rows claimed by `owner` itself do not block: the caller must
/// publish a key's rows in `seq` order, one at a time, and must not publish a claimed row of
/// a key whose earlier row it is returning to `pending` until that release is written (the
/// relay's dispatcher does both). Rows locked by another transaction are skipped
/// (`SKIP LOCKED`).
///
/// Cost: the owned partitions and the two sets of blocked keys are computed once per
/// statement (small partial indexes); the scan then walks `outbox_message_claim_idx` in
/// `seq` order and stops after `limit` rows, so a claim reads the head of the backlog only,
/// whatever its size.
pub async fn claim_batch(
    conn: &mut PgConnection,
    owner: &str,
    limit: i64,
    claim_ttl_ms: i64,
) -> Result<Vec<ClaimedRow>, sqlx::Error> {
    let mut rows: Vec<ClaimedRow> = sqlx::query_as(
        "WITH candidate AS (
             SELECT m.id FROM outbox_message m
             WHERE m.status = 'pending'
               AND m.available_at <= now()
               AND m.partition_id = ANY (ARRAY(
                   SELECT partition_id FROM relay_partition_lease
                   WHERE owner = $1 AND lease_until > now()))
               AND NOT (m.partition_key = ANY (ARRAY(
                   SELECT partition_key FROM outbox_message
                   WHERE status = 'claimed' AND claimed_by <> $1)))
               AND NOT (m.partition_key = ANY (ARRAY(
                   SELECT partition_key FROM outbox_message
                   WHERE status = 'pending' AND attempts > 0 AND available_at > now())))
             ORDER BY m.seq
             LIMIT $2
             FOR UPDATE OF m SKIP LOCKED
         )
         UPDATE outbox_message o
         SET status = 'claimed', claimed_by = $1,
             claimed_until = now() + make_interval(secs => $3::double precision / 1000)
         FROM candidate c
         WHERE o.id = c.id
         RETURNING o.id, o.seq, o.subject, o.event_type, o.source, o.partition_key,
             o.occurred_at, o.correlation_id, o.causation_id, o.traceparent, o.tracestate,
             o.content_type, o.headers, o.payload, o.attempts",
    )
    .bind(owner)
    .bind(limit)
    .bind(claim_ttl_ms)
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

/// Marks rows published with their PubAck, whatever their claim state (a row whose claim
/// expired was still published). With `delete` the rows are removed instead of kept for the
/// retention period. Returns how many rows changed.
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
         SET status = 'published', published_at = now(), claimed_by = NULL,
             claimed_until = NULL, last_error = NULL, stream = a.stream, stream_seq = a.seq
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

/// A claimed row going back to `pending`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    /// The message id.
    pub id: Uuid,
    /// Whether this counts as a failed attempt.
    pub failed: bool,
    /// How long to wait before it may be claimed again, in milliseconds.
    pub delay_ms: i64,
    /// The error to record, if it failed.
    pub error: Option<String>,
}

/// Returns claimed rows of `owner` to `pending`, counting failures and setting backoff.
/// Rows no longer claimed by `owner` (rescued and re-claimed meanwhile) are left alone.
pub async fn release(
    conn: &mut PgConnection,
    owner: &str,
    rows: &[Release],
) -> Result<u64, sqlx::Error> {
    if rows.is_empty() {
        return Ok(0);
    }
    let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
    let failed: Vec<i32> = rows.iter().map(|r| i32::from(r.failed)).collect();
    let delays: Vec<i64> = rows.iter().map(|r| r.delay_ms).collect();
    let errors: Vec<Option<&str>> = rows.iter().map(|r| r.error.as_deref()).collect();
    let done = sqlx::query(
        "UPDATE outbox_message o
         SET status = 'pending', claimed_by = NULL, claimed_until = NULL,
             attempts = o.attempts + r.failed,
             available_at = now() + make_interval(secs => r.delay_ms::double precision / 1000),
             last_error = coalesce(r.error, o.last_error)
         FROM unnest($1::uuid[], $2::int[], $3::bigint[], $4::text[]) AS r(id, failed, delay_ms, error)
         WHERE o.id = r.id AND o.status = 'claimed' AND o.claimed_by = $5",
    )
    .bind(ids)
    .bind(failed)
    .bind(delays)
    .bind(errors)
    .bind(owner)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

/// Deletes rows claimed by `owner` that are being moved to the dead-letter store, returning
/// them; call it in the transaction that records the dead letters.
pub async fn take_for_dead_letter(
    conn: &mut PgConnection,
    owner: &str,
    ids: &[Uuid],
) -> Result<Vec<ClaimedRow>, sqlx::Error> {
    sqlx::query_as(
        "DELETE FROM outbox_message
         WHERE id = ANY($1) AND status = 'claimed' AND claimed_by = $2
         RETURNING id, seq, subject, event_type, source, partition_key, occurred_at,
             correlation_id, causation_id, traceparent, tracestate, content_type, headers,
             payload, attempts",
    )
    .bind(ids)
    .bind(owner)
    .fetch_all(conn)
    .await
}

/// Returns to `pending` the claims that expired, or whose relay instance (other than
/// `rescuer`) stopped heartbeating for `dead_after_ms`; at most `limit` rows. Returns how many.
pub async fn release_expired(
    conn: &mut PgConnection,
    rescuer: &str,
    dead_after_ms: i64,
    limit: i64,
) -> Result<u64, sqlx::Error> {
    // The rescuer's own claims are judged by their lease alone: its heartbeat may look stale
    // right after a database outage although it is alive and publishing them.
    let done = sqlx::query(
        "UPDATE outbox_message SET status = 'pending', claimed_by = NULL, claimed_until = NULL
         WHERE id IN (
             SELECT id FROM outbox_message
             WHERE status = 'claimed'
               AND (claimed_until < now()
                    OR (claimed_by <> $3 AND NOT EXISTS (
                        SELECT 1 FROM relay_instance i
                        WHERE i.instance_id = outbox_message.claimed_by
                          AND i.heartbeat_at > now() - make_interval(secs => $1::double precision / 1000))))
             LIMIT $2
             FOR UPDATE SKIP LOCKED)",
    )
    .bind(dead_after_ms)
    .bind(limit)
    .bind(rescuer)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

/// Returns every claim of `owner` to `pending` at once (a relay starting with the same
/// instance id, or stopping). Returns how many.
pub async fn release_all_claimed_by(
    conn: &mut PgConnection,
    owner: &str,
) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE outbox_message SET status = 'pending', claimed_by = NULL, claimed_until = NULL
         WHERE status = 'claimed' AND claimed_by = $1",
    )
    .bind(owner)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
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
    /// Rows waiting to be published (pending or claimed).
    pub unpublished: i64,
    /// Of those, rows claimed by a relay right now.
    pub claimed: i64,
    /// Age of the oldest unpublished row, in seconds (0 when none).
    pub oldest_age_seconds: f64,
    /// Rows that failed at least once and are still unpublished.
    pub retrying: i64,
}

/// Counts the backlog (an index scan of unpublished rows).
pub async fn backlog(conn: &mut PgConnection) -> Result<Backlog, sqlx::Error> {
    sqlx::query_as(
        "SELECT count(*) AS unpublished,
                count(*) FILTER (WHERE status = 'claimed') AS claimed,
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

/// Vacuums `outbox_message` (skipped if another vacuum holds it). Every claim and mark leaves
/// a dead row version and a stale entry at the head of the claim index; claims slow down as
/// they pile up, faster than autovacuum's defaults clean them on a busy outbox.
pub async fn vacuum(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::raw_sql("VACUUM (SKIP_LOCKED) outbox_message")
        .execute(conn)
        .await?;
    Ok(())
}
