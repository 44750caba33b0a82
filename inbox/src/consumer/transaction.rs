//! One message in a transaction: reading it, its inbox row, its handler, the check that
//! the handler did not leave the transaction aborted, and the COMMIT.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use outbox::deadline::within;
use sqlx::{Acquire, PgConnection, Postgres, Transaction};

use super::Consumer;
use super::dead_letter::Park;
use super::failure::{Failure, Fault, is_aborted, refused};
use crate::handler::Delivery;
use crate::metrics as m;
use crate::store;

/// What to tell the broker about a message once its transaction is over.
#[derive(Clone, Copy)]
pub(super) enum Reply {
    Ack,
    Nak(Duration),
    Term,
}

impl Reply {
    pub(super) fn kind(self) -> AckKind {
        match self {
            Reply::Ack => AckKind::Ack,
            Reply::Nak(delay) => AckKind::Nak(Some(delay)),
            Reply::Term => AckKind::Term,
        }
    }
}

/// The outcome of handling one message inside a transaction, without a savepoint.
enum Handled {
    /// No handler run to commit (a redelivery of a handled message, or a message parked at
    /// once): commit, then send this.
    Reply(Reply),
    /// The handler succeeded: commit, then ack. If the COMMIT is refused, that is this
    /// message's failure ([`Failure::Commit`]).
    Ran(Ran),
    /// The handler failed: roll back, then resolve in a new transaction.
    Failed { error: Failure, ran: Ran },
}

/// A message whose handler ran: its id and which handler attempt the run was.
pub(super) struct Ran {
    pub(super) id: String,
    pub(super) attempt: u32,
}

/// A message read from the broker, ready for its handler.
pub(super) struct Read {
    pub(super) delivery: Delivery,
    pub(super) id: String,
    pub(super) seq: Option<i64>,
}

/// The safety limit on broker deliveries per handler attempt: a message delivered more than
/// this many times `max_attempts` is parked as `deliveries_exhausted`.
const DELIVERIES_PER_ATTEMPT: u32 = 10;

/// The safety limit is never below this many deliveries, so that a database outage (whose
/// NAKs back off with the delivery count) parks nothing unless it lasts far longer than
/// `retry_max_delay`.
const MIN_DELIVERY_LIMIT: u32 = 100;

/// Commits `tx`, telling a COMMIT the database refused ([`Fault::Commit`]) from one lost
/// with the connection or the server ([`Fault::Database`]).
pub(super) async fn commit(tx: Transaction<'_, Postgres>, limit: Duration) -> Result<(), Fault> {
    within(limit, tx.commit()).await.map_err(|e| {
        if refused(&e) {
            Fault::Commit(e)
        } else {
            Fault::Database(e)
        }
    })
}

/// Checks, before the COMMIT of a transaction in which handler code ran without a savepoint,
/// that the handler did not leave it aborted: a handler that ignored a failed statement (a
/// unique violation, `SELECT 1/0`) and returned `Ok` leaves a transaction that PostgreSQL
/// rolls back at COMMIT, which answers with the tag `ROLLBACK` and no error, so the message
/// would be acked with no effect and no inbox row. `Ok(Err(..))` for such a transaction
/// ([`Failure::Aborted`], a failed attempt), `Err` if the database failed otherwise.
///
/// Cost: one round trip per transaction (a `SELECT 1`, simple protocol, nothing to plan),
/// sent after the handlers and before COMMIT: in strict mode one per message, in batched
/// mode one per batch. Not measured. A handler in a savepoint needs no such check: its
/// `RELEASE SAVEPOINT` fails with the same SQLSTATE.
pub(super) async fn check_not_aborted(
    conn: &mut PgConnection,
) -> Result<Result<(), Failure>, sqlx::Error> {
    match sqlx::raw_sql("SELECT 1").execute(&mut *conn).await {
        Ok(_) => Ok(Ok(())),
        Err(e) if is_aborted(&e) => Ok(Err(Failure::Aborted(e))),
        Err(e) => Err(e),
    }
}

impl Consumer {
    /// Reads a message for its handler: `Err` with why it must be parked at once if it does
    /// not decode, or if the broker delivered it more than 10 x `max_attempts` (at least 100) times (the
    /// safety limit, reason `deliveries_exhausted`). The handler attempt is 1 until the inbox insert returns the failed attempts counted for it.
    pub(super) fn read(&self, message: &jetstream::Message) -> Result<Read, Park> {
        let (delivered, stream_seq) = match message.info() {
            Ok(info) => (
                Some(u32::try_from(info.delivered).unwrap_or(u32::MAX)),
                Some(info.stream_sequence),
            ),
            Err(_) => (None, None),
        };
        let envelope = envelope::nats::from_message(
            message.subject.as_str(),
            message.headers.as_ref(),
            message.payload.clone(),
        )
        .map_err(|e| Park {
            reason: dlq::reason::DECODE.into(),
            error_chain: vec![e.to_string()],
            id: None,
        })?;
        let limit = self
            .config
            .max_attempts
            .saturating_mul(DELIVERIES_PER_ATTEMPT)
            .max(MIN_DELIVERY_LIMIT);
        if let Some(delivered) = delivered.filter(|d| *d > limit) {
            return Err(Park {
                reason: dlq::reason::DELIVERIES_EXHAUSTED.into(),
                error_chain: vec![format!(
                    "the broker delivered the message {delivered} times, more than the safety limit ({limit}: {DELIVERIES_PER_ATTEMPT} x max_attempts, at least {MIN_DELIVERY_LIMIT}), without that many handler attempts failing (database errors, shutdowns, an ack_wait expiring): parked by the safety limit without running the handler"
                )],
                id: Some(envelope.id.to_string()),
            });
        }
        Ok(Read {
            id: envelope.id.to_string(),
            seq: stream_seq.and_then(|s| i64::try_from(s).ok()),
            delivery: Delivery {
                envelope,
                consumer: Arc::from(self.config.name.as_str()),
                attempt: 1,
                delivered,
                stream_seq,
            },
        })
    }

    /// Handles one message inside `conn` (the caller's transaction) without a savepoint:
    /// inserts its inbox row and runs the handler. A failure is returned as
    /// [`Handled::Failed`] for the caller to roll back and resolve in a new transaction,
    /// which saves two round trips per message on the common path.
    async fn handle_in(
        &self,
        conn: &mut PgConnection,
        message: &jetstream::Message,
    ) -> Result<Handled, sqlx::Error> {
        let mut read = match self.read(message) {
            Ok(read) => read,
            Err(park) => {
                let reply = self.park_unread(conn, message, park).await?;
                return Ok(Handled::Reply(reply));
            }
        };
        let subject = message.subject.as_str();
        let Some(failed) = self
            .db(store::insert_new_taking_attempts(
                conn,
                &self.config.name,
                &read.id,
                subject,
                read.seq,
            ))
            .await?
        else {
            metrics::counter!(m::DUPLICATES, "consumer" => self.config.name.clone()).increment(1);
            return Ok(Handled::Reply(Reply::Ack));
        };
        let attempt = failed.saturating_add(1);
        read.delivery.attempt = attempt;
        let ran = Ran {
            id: read.id,
            attempt,
        };
        Ok(match self.run_handler(conn, &read.delivery).await {
            Ok(()) => Handled::Ran(ran),
            Err(error) => Handled::Failed { error, ran },
        })
    }

    /// Handles one message in a transaction of its own (strict mode; batched mode after a
    /// batch's COMMIT was refused): inserts its inbox row, runs the handler, commits. A
    /// handler failure is resolved in a new short transaction (the attempt counted and the
    /// message NAKed, or parked); so is a COMMIT the database refuses ([`Failure::Commit`]),
    /// which is a failed attempt like any other, parked with reason `commit_failed` once the
    /// attempts are used up, and a transaction the handler left aborted
    /// ([`check_not_aborted`], one round trip before COMMIT; [`Failure::Aborted`], parked
    /// with reason `aborted_transaction`). Other database errors are returned.
    pub(super) async fn handle_alone(
        &self,
        conn: &mut PgConnection,
        message: &jetstream::Message,
    ) -> Result<Reply, sqlx::Error> {
        let mut tx = self.db(conn.begin()).await?;
        let (error, ran) = match self.handle_in(&mut tx, message).await? {
            Handled::Reply(reply) => {
                self.db(tx.commit()).await?;
                return Ok(reply);
            }
            Handled::Ran(ran) => match self.db(check_not_aborted(&mut tx)).await? {
                Err(aborted) => {
                    self.db(tx.rollback()).await?;
                    (self.aborted(aborted, &ran.id), ran)
                }
                Ok(()) => match commit(tx, self.config.db_timeout).await {
                    Ok(()) => {
                        self.count_processed(1);
                        return Ok(Reply::Ack);
                    }
                    Err(Fault::Database(e)) => return Err(e),
                    Err(Fault::Commit(e)) => {
                        self.count_commit_failure();
                        tracing::warn!(consumer = %self.config.name, id = %ran.id, attempt = ran.attempt, error = %e, "the database refused the message's COMMIT");
                        (Failure::Commit(e), ran)
                    }
                },
            },
            Handled::Failed { error, ran } => {
                // Undo the handler's writes and the inbox row, then retry or park.
                self.settle_after(&mut tx, &error).await;
                self.db(tx.rollback()).await?;
                (error, ran)
            }
        };
        let mut tx = self.db(conn.begin()).await?;
        let reply = self.resolve_failure(&mut tx, message, error, &ran).await?;
        self.db(tx.commit()).await?;
        Ok(reply)
    }

    pub(super) fn count_processed(&self, n: u64) {
        metrics::counter!(m::PROCESSED, "consumer" => self.config.name.clone()).increment(n);
    }
}
