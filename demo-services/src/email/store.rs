//! All SQL on email-service's table `email`: one row per order (confirmation or
//! cancellation), written in the inbox transaction, marked sent by the sender.

use sqlx::PgConnection;
use uuid::Uuid;

/// email-service's schema (idempotent).
pub const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS email (
    order_id    uuid PRIMARY KEY,
    kind        text NOT NULL CHECK (kind IN ('confirmation', 'cancellation')),
    recipient   text NOT NULL,
    subject     text NOT NULL,
    body        text NOT NULL,
    message_id  text NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    sent_at     timestamptz,
    attempts    integer NOT NULL DEFAULT 0,
    last_error  text,
    next_attempt_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS email_unsent_idx ON email (next_attempt_at) WHERE sent_at IS NULL;
"#;

/// One email to send.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct EmailRow {
    /// The order it is about (one email per order).
    pub order_id: Uuid,
    /// `confirmation` or `cancellation`.
    pub kind: String,
    /// To.
    pub recipient: String,
    /// Subject line.
    pub subject: String,
    /// Plain-text body.
    pub body: String,
    /// The stable `Message-ID` (without angle brackets).
    pub message_id: String,
}

/// Queues an email; false if the order already has one (it never gets two).
pub async fn queue(conn: &mut PgConnection, email: &EmailRow) -> Result<bool, sqlx::Error> {
    let inserted = sqlx::query(
        "INSERT INTO email (order_id, kind, recipient, subject, body, message_id)
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (order_id) DO NOTHING",
    )
    .bind(email.order_id)
    .bind(&email.kind)
    .bind(&email.recipient)
    .bind(&email.subject)
    .bind(&email.body)
    .bind(&email.message_id)
    .execute(conn)
    .await?
    .rows_affected();
    Ok(inserted == 1)
}

/// The unsent email due first (a failed one waits for its next attempt), locked until the
/// transaction ends (other instances skip it).
pub async fn lock_next_unsent(conn: &mut PgConnection) -> Result<Option<EmailRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT order_id, kind, recipient, subject, body, message_id FROM email
         WHERE sent_at IS NULL AND next_attempt_at <= now()
         ORDER BY next_attempt_at LIMIT 1 FOR UPDATE SKIP LOCKED",
    )
    .fetch_optional(conn)
    .await
}

/// Marks an email sent.
pub async fn mark_sent(conn: &mut PgConnection, order_id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE email SET sent_at = now(), attempts = attempts + 1, last_error = NULL WHERE order_id = $1")
        .bind(order_id)
        .execute(conn)
        .await?;
    Ok(())
}

/// Records a failed attempt; the next one waits 2^attempts seconds, at most 10 minutes, so
/// that an email that cannot be delivered does not hold up the others.
pub async fn mark_failed(
    conn: &mut PgConnection,
    order_id: Uuid,
    error: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE email SET attempts = attempts + 1, last_error = $2,
                next_attempt_at = now() + least(power(2, attempts + 1), 600) * interval '1 second'
         WHERE order_id = $1",
    )
    .bind(order_id)
    .bind(error)
    .execute(conn)
    .await?;
    Ok(())
}

/// (sent, unsent) counts.
pub async fn counts(conn: &mut PgConnection) -> Result<(i64, i64), sqlx::Error> {
    sqlx::query_as(
        "SELECT count(*) FILTER (WHERE sent_at IS NOT NULL), count(*) FILTER (WHERE sent_at IS NULL)
         FROM email",
    )
    .fetch_one(conn)
    .await
}
