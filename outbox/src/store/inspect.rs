//! What operators look at in `outbox_message` (the console's relays page and overview), each
//! query bounded whatever the backlog's size: the backlog at a glance, the backlog per
//! partition at the head, the keys whose head waits out a retry backoff, and "retry now".

use sqlx::PgConnection;

/// The backlog at a glance, read in a bounded time: counts stop at a cap.
#[derive(Debug, Clone, Default, PartialEq, sqlx::FromRow)]
pub struct Glance {
    /// Unpublished rows, counted up to the cap (then `unpublished_capped`).
    pub unpublished: i64,
    /// More than `unpublished` rows wait: the count stopped at the cap.
    pub unpublished_capped: bool,
    /// When capped: the planner's estimate of the unpublished rows (the claim index's size
    /// at the last `ANALYZE` or vacuum), if it has one.
    pub unpublished_estimate: Option<i64>,
    /// Unpublished rows that failed at least once, counted up to the cap.
    pub retrying: i64,
    /// More than `retrying` rows failed: the count stopped at the cap.
    pub retrying_capped: bool,
    /// Seconds since the oldest unpublished row was written (0 when none).
    pub oldest_age_seconds: f64,
    /// The oldest unpublished row's subject (what decides its stream's duplicate window).
    pub oldest_subject: Option<String>,
    /// Seconds since the oldest unpublished row that may be claimed now (not waiting out a
    /// backoff) was written (0 when none): how late the relays are.
    pub oldest_due_age_seconds: f64,
}

/// The backlog, each count stopping after `cap` rows. Cost: at most `cap` entries of
/// `outbox_message_claim_idx` and of `outbox_message_retrying_key_idx`, and the head of the
/// claim index.
pub async fn glance(conn: &mut PgConnection, cap: i64) -> Result<Glance, sqlx::Error> {
    sqlx::query_as(
        "WITH counted AS (
             SELECT (SELECT count(*) FROM (SELECT 1 FROM outbox_message
                         WHERE status = 'pending' LIMIT $1 + 1) c) AS unpublished,
                    (SELECT count(*) FROM (SELECT 1 FROM outbox_message
                         WHERE status = 'pending' AND attempts > 0 LIMIT $1 + 1) r) AS retrying)
         SELECT least(counted.unpublished, $1) AS unpublished,
                counted.unpublished > $1 AS unpublished_capped,
                CASE WHEN counted.unpublished > $1 THEN
                    (SELECT nullif(reltuples, -1)::bigint FROM pg_class
                     WHERE oid = to_regclass('outbox_message_claim_idx'))
                END AS unpublished_estimate,
                least(counted.retrying, $1) AS retrying,
                counted.retrying > $1 AS retrying_capped,
                coalesce((SELECT extract(epoch FROM now() - created_at)::float8
                          FROM outbox_message WHERE status = 'pending'
                          ORDER BY seq LIMIT 1), 0) AS oldest_age_seconds,
                (SELECT subject FROM outbox_message WHERE status = 'pending'
                 ORDER BY seq LIMIT 1) AS oldest_subject,
                coalesce((SELECT extract(epoch FROM now() - created_at)::float8
                          FROM outbox_message WHERE status = 'pending' AND available_at <= now()
                          ORDER BY seq LIMIT 1), 0) AS oldest_due_age_seconds
         FROM counted",
    )
    .bind(cap)
    .fetch_one(conn)
    .await
}

/// One partition's share of the head of the backlog.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct PartitionHead {
    /// The partition (0..255: `hashtextextended(partition_key, 0) & 255`).
    pub partition_id: i16,
    /// Its rows among the oldest unpublished rows read.
    pub rows: i64,
    /// Seconds since its oldest unpublished row was written: exact, since the rows read are
    /// the oldest of all.
    pub oldest_age_seconds: f64,
}

/// The oldest `head` unpublished rows (in `seq` order), by partition: partitions with no row
/// among them are not listed (their rows, if any, are all younger than the last row read).
/// Cost: `head` rows of the claim index and their heap tuples.
pub async fn partitions_at_head(
    conn: &mut PgConnection,
    head: i64,
) -> Result<Vec<PartitionHead>, sqlx::Error> {
    sqlx::query_as(
        "SELECT (hashtextextended(partition_key, 0) & 255)::smallint AS partition_id,
                count(*) AS rows,
                extract(epoch FROM now() - min(created_at))::float8 AS oldest_age_seconds
         FROM (SELECT partition_key, created_at FROM outbox_message
               WHERE status = 'pending' ORDER BY seq LIMIT $1) h
         GROUP BY 1 ORDER BY 1",
    )
    .bind(head)
    .fetch_all(conn)
    .await
}

/// A key whose oldest unpublished row failed and waits out its backoff: no later row of the
/// key is published before it.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct StuckKey {
    /// The key.
    pub partition_key: String,
    /// Its partition.
    pub partition_id: i16,
    /// The waiting row's subject.
    pub subject: String,
    /// Its failed attempts.
    pub attempts: i32,
    /// Its last error.
    pub last_error: Option<String>,
    /// Seconds since it was written.
    pub age_seconds: f64,
    /// Seconds until it may be claimed again.
    pub retry_in_seconds: f64,
}

/// Keys waiting out a backoff, at most `limit`, in key order (the order of
/// `outbox_message_retrying_key_idx`, so that a broker outage that makes every key's head
/// wait costs `limit` rows, not all of them), each with its waiting row; the caller may sort
/// them by age.
pub async fn stuck_keys(conn: &mut PgConnection, limit: i64) -> Result<Vec<StuckKey>, sqlx::Error> {
    sqlx::query_as(
        "SELECT partition_key, (hashtextextended(partition_key, 0) & 255)::smallint AS partition_id,
                subject, attempts, last_error,
                extract(epoch FROM now() - created_at)::float8 AS age_seconds,
                extract(epoch FROM available_at - now())::float8 AS retry_in_seconds
         FROM outbox_message
         WHERE status = 'pending' AND attempts > 0 AND available_at > now()
         ORDER BY partition_key LIMIT $1",
    )
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// Ends the backoff of `partition_key`'s waiting row, so a relay may claim it at once (its
/// attempts and last error stay). A row a relay holds right now (claimed, being published
/// or recorded) is left alone rather than waited for. Returns how many rows changed: 0 when
/// the key no longer waits or a relay holds it. Per-key order is kept: only the key's
/// oldest rows ever wait out a backoff, and claims take a key's rows in `seq` order.
pub async fn retry_key_now(
    conn: &mut PgConnection,
    partition_key: &str,
) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE outbox_message SET available_at = now()
         WHERE id IN (SELECT id FROM outbox_message
                      WHERE status = 'pending' AND attempts > 0 AND available_at > now()
                        AND partition_key = $1
                      FOR UPDATE SKIP LOCKED)",
    )
    .bind(partition_key)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

/// Rows published per minute, from the minute `settled_until` (minutes since 1970-01-01
/// UTC) or `minutes` back from the database's current minute, whichever is later: returns
/// `(rows, now, since)`, the rows as `(minute, rows)` in order (minutes without a row are left
/// out), the database's current minute and the first minute counted. Published rows stay
/// until the relay's cleaner deletes them (after `--retention`, an hour by default); a WAL
/// relay keeps none. Cost: the rows of `outbox_message_published_at_idx` since then.
pub async fn published_per_minute(
    conn: &mut PgConnection,
    settled_until: i64,
    minutes: i64,
) -> Result<(Vec<(i64, i64)>, i64, i64), sqlx::Error> {
    let (now, since): (i64, i64) = sqlx::query_as(
        "SELECT m, greatest($1, m - $2) FROM (SELECT floor(extract(epoch FROM now()) / 60)::bigint AS m) n",
    )
    .bind(settled_until)
    .bind(minutes)
    .fetch_one(&mut *conn)
    .await?;
    let rows = sqlx::query_as(
        "SELECT floor(extract(epoch FROM published_at) / 60)::bigint AS minute, count(*) AS rows
         FROM outbox_message
         WHERE status = 'published' AND published_at >= to_timestamp($1::float8 * 60)
         GROUP BY 1 ORDER BY 1",
    )
    .bind(since)
    .fetch_all(conn)
    .await?;
    Ok((rows, now, since))
}
