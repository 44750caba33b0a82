//! The outcome-writing half of the dispatcher: what a batch's rows came to ([`Outcome`]:
//! published marks, failed attempts with their retry delay, dead letters) and how it is
//! written, in the batch's claim transaction ([`end_batch`]) or later on a fresh connection
//! ([`write_late`]). Dead letters are written one savepoint each, so that a row the
//! dead-letter store refuses (an invalid row written around the API) cannot fail the batch.

use std::time::Duration;

use envelope::nats::{CE_PARTITIONKEY, CE_SOURCE, CE_TYPE};
use outbox::deadline::{is_timeout, within};
use outbox::store::{self as outbox_store, Failure, Published};
use sqlx::PgPool;
use uuid::Uuid;

use super::ClaimTx;
use crate::config::RelayConfig;
use crate::metrics as m;

/// A row moving to the dead-letter store.
pub(super) struct Dead {
    pub(super) id: Uuid,
    /// Why, for `dead_letter.reason` and metrics: `invalid_row` or a publish error kind.
    pub(super) reason: &'static str,
    pub(super) error: String,
    pub(super) attempts: i32,
}

/// What happened to a batch's rows, written when the batch commits.
#[derive(Default)]
pub(super) struct Outcome {
    pub(super) published: Vec<Published>,
    pub(super) failures: Vec<Failure>,
    pub(super) dead: Vec<Dead>,
}

impl Outcome {
    fn is_empty(&self) -> bool {
        self.published.is_empty() && self.failures.is_empty() && self.dead.is_empty()
    }
}

/// Outcomes of a batch that failed to commit, with the error.
pub(super) struct Unwritten {
    pub(super) outcome: Outcome,
    pub(super) error: String,
    /// The transaction may still be open at the server, holding its row locks, until the
    /// server ends it (the database did not answer in time).
    pub(super) locks_may_linger: bool,
}

impl Unwritten {
    fn new(outcome: Outcome, error: &sqlx::Error, locks_may_linger: bool) -> Self {
        Unwritten {
            outcome,
            error: error.to_string(),
            locks_may_linger,
        }
    }
}

/// Ends a batch's claim transaction: writes its outcome and commits, or rolls back when there
/// is nothing to write (ending the transaction gives the rows back). On failure the
/// transaction is rolled back before this returns, so that its locks are gone before the
/// keys it holds back are released, or the error says they may linger.
pub(super) async fn end_batch(
    mut tx: ClaimTx,
    how: WriteSettings,
    outcome: Outcome,
    limit: Duration,
) -> Result<(), Unwritten> {
    // Only a step the database did not answer in time may leave the transaction open at the
    // server: a refused statement ends or aborts it, and a broken connection ends the session
    // (the server sees the socket close and rolls back).
    if outcome.is_empty() {
        return within(limit, tx.rollback())
            .await
            .map_err(|e| Unwritten::new(outcome, &e, is_timeout(&e)));
    }
    let error = match within(limit, write_outcome(&mut tx, how, &outcome)).await {
        Ok(()) => {
            return within(limit, tx.commit())
                .await
                .map_err(|e| Unwritten::new(outcome, &e, is_timeout(&e)));
        }
        Err(e) => e,
    };
    let linger = is_timeout(&error)
        || within(limit, tx.rollback())
            .await
            .is_err_and(|e| is_timeout(&e));
    Err(Unwritten::new(outcome, &error, linger))
}

/// Writes the outcome of batches that could not commit (PubAcks and dead letters only) in
/// a transaction of its own.
pub(super) async fn write_late(
    pool: PgPool,
    how: WriteSettings,
    outcome: Outcome,
    limit: Duration,
) -> Result<(), Unwritten> {
    let ttl = u64::try_from(how.claim_ttl.as_millis()).unwrap_or(u64::MAX);
    let written = within(limit, async {
        // Begun as a claim is: the server ends it if it is left idle in it.
        let mut tx = outbox_store::begin_claim(&pool, ttl).await?;
        write_outcome(&mut tx, how, &outcome).await?;
        tx.commit().await
    })
    .await;
    // Its locks do not matter: every row it writes was published already.
    written.map_err(|e| Unwritten::new(outcome, &e, false))
}

/// Writes a batch's outcome: published marks (or deletions), failed attempts, dead letters.
async fn write_outcome(
    conn: &mut sqlx::PgConnection,
    how: WriteSettings,
    outcome: &Outcome,
) -> Result<(), sqlx::Error> {
    outbox_store::mark_published(conn, &outcome.published, how.delete).await?;
    outbox_store::record_failures(conn, &outcome.failures).await?;
    if !outcome.dead.is_empty() {
        dead_letter(conn, &outcome.dead, how.unwritable_delay_ms).await?;
    }
    Ok(())
}

/// How outcomes are written, from the relay's configuration.
#[derive(Debug, Clone, Copy)]
pub(super) struct WriteSettings {
    /// Delete published rows instead of marking them (retention 0).
    delete: bool,
    /// Backoff of a row whose dead letter the database refused.
    unwritable_delay_ms: i64,
    /// How long the server keeps a transaction left idle.
    claim_ttl: Duration,
}

impl WriteSettings {
    pub(super) fn new(config: &RelayConfig) -> Self {
        WriteSettings {
            delete: config.retention.is_zero(),
            unwritable_delay_ms: i64::try_from(config.retry_max_delay.as_millis())
                .unwrap_or(i64::MAX),
            claim_ttl: config.claim_ttl,
        }
    }
}

/// Moves rows to `dead_letter` and out of the outbox, inside the caller's transaction, each
/// in a savepoint of its own: a dead letter the database refuses (a row written around the
/// API can hold almost anything) must not fail the whole batch, whose published marks would
/// then never be written. Such a row stays pending with a failed attempt recorded and a
/// backoff of `unwritable_delay_ms`, and is tried again; the others commit. An error that
/// leaves the transaction unusable (the connection is gone) is returned.
async fn dead_letter(
    conn: &mut sqlx::PgConnection,
    dead: &[Dead],
    unwritable_delay_ms: i64,
) -> Result<(), sqlx::Error> {
    for why in dead {
        let mut savepoint = sqlx::Connection::begin(&mut *conn).await?;
        match dead_letter_one(&mut savepoint, why).await {
            Ok(()) => savepoint.commit().await?,
            Err(e) => {
                savepoint.rollback().await?;
                tracing::error!(id = %why.id, reason = why.reason, error = %e, "cannot write the row's dead letter; it stays pending and will be tried again");
                metrics::counter!(m::DEAD_LETTER_WRITE_FAILURES).increment(1);
                let failure = Failure {
                    id: why.id,
                    delay_ms: unwritable_delay_ms,
                    error: format!("{}; writing its dead letter failed: {e}", why.error),
                    permanent: false,
                };
                outbox_store::record_failures(&mut *conn, std::slice::from_ref(&failure)).await?;
            }
        }
    }
    Ok(())
}

/// Moves one row to `dead_letter` (nothing if it is no longer pending).
async fn dead_letter_one(conn: &mut sqlx::PgConnection, why: &Dead) -> Result<(), sqlx::Error> {
    let rows =
        outbox_store::take_for_dead_letter(&mut *conn, std::slice::from_ref(&why.id)).await?;
    for row in rows {
        // The full wire headers when the row is valid, so that `dlq retry` can rebuild the
        // message; otherwise what the row holds.
        let headers = match row
            .to_envelope()
            .map(|env| envelope::nats::to_headers(&env))
        {
            Ok(Ok(map)) => dlq::headers_to_json(&map),
            _ => {
                let mut headers = row.headers.as_object().cloned().unwrap_or_default();
                for (name, value) in [
                    (CE_TYPE, Some(row.event_type.clone())),
                    (CE_SOURCE, Some(row.source.clone())),
                    (CE_PARTITIONKEY, Some(row.partition_key.clone())),
                ] {
                    if let Some(value) = value {
                        headers.insert(name.to_owned(), serde_json::Value::String(value));
                    }
                }
                headers
            }
        };
        // A row written around the API may hold anything the table accepts: keep what its
        // headers were. (`dlq::store::record` cuts an over-long subject.)
        let mut error_chain = vec![why.error.clone()];
        if !row.headers.is_object() {
            error_chain.push(format!("stored headers: {}", row.headers));
        }
        let letter = dlq::DeadLetter {
            source: dlq::Source::Relay,
            consumer: "relay".to_owned(),
            message_id: row.id.to_string(),
            subject: row.subject.clone(),
            partition_key: Some(row.partition_key.clone()),
            headers,
            payload: row.payload.clone(),
            reason: why.reason.to_owned(),
            error_chain,
            attempts: why.attempts,
            stream: None,
            stream_seq: None,
        };
        dlq::store::record(&mut *conn, &letter).await?;
        metrics::counter!(m::DEAD_LETTERED, "reason" => why.reason).increment(1);
    }
    Ok(())
}

/// The backoff of the relay's retries: `retry_min_delay` doubling up to `retry_max_delay`,
/// with jitter, without end ([`outbox::backoff::exponential`]).
pub(super) fn backoff(config: &RelayConfig) -> backon::ExponentialBackoff {
    outbox::backoff::exponential(config.retry_min_delay, config.retry_max_delay)
}

/// The delay before retry `attempts` (1-based) of one row ([`outbox::backoff::delay`]).
pub(super) fn retry_delay(config: &RelayConfig, attempts: i32) -> Duration {
    let attempt = u32::try_from(attempts).unwrap_or(1);
    outbox::backoff::delay(config.retry_min_delay, config.retry_max_delay, attempt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_grow_and_stay_bounded() {
        let config = RelayConfig::default();
        let first = retry_delay(&config, 1);
        assert!(
            first >= config.retry_min_delay && first <= config.retry_min_delay * 2,
            "{first:?}"
        );
        let later = retry_delay(&config, 6);
        assert!(later >= config.retry_min_delay * 32, "{later:?}");
        for attempts in [20, 1000, i32::MAX] {
            assert!(retry_delay(&config, attempts) <= config.retry_max_delay * 2);
        }
    }
}
