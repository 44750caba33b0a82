//! Why a transaction or a handler attempt failed ([`Fault`], [`Failure`]), how database
//! errors are classified, and what follows a failed attempt: a retry or a dead letter.

use std::time::Duration;

use async_nats::jetstream;
use sqlx::PgConnection;

use super::Consumer;
use super::dead_letter::Park;
use super::transaction::{Ran, Reply};
use crate::handler::HandlerError;
use crate::metrics as m;
use crate::store;

/// Why a lane's transaction did not go through.
#[derive(Debug)]
pub(super) enum Fault {
    /// The database or the connection failed: nothing is counted, the messages are NAKed
    /// and redelivered.
    Database(sqlx::Error),
    /// The database refused the COMMIT (see [`refused`]): something the transaction did is
    /// the cause, so it is pinned on one message by running them one at a time.
    Commit(sqlx::Error),
}

impl From<sqlx::Error> for Fault {
    fn from(e: sqlx::Error) -> Self {
        Fault::Database(e)
    }
}

/// Whether `e` says the database could not be reached (a lost or silent connection, no
/// connection from the pool), rather than that it answered with an error.
pub(super) fn database_unreachable(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
    )
}

/// Whether a failed statement was refused by the server for what the transaction did (a
/// deferred constraint or trigger, a serialization failure or deadlock, a check), rather than
/// failed with the connection or the server: an error from the database other than a
/// connection exception (SQLSTATE class 08), insufficient resources (53), an operator
/// intervention such as a shutdown (57, but 57014 `query_canceled`, which a
/// `statement_timeout` raises at a COMMIT whose deferred work is too slow, is refused), a
/// system error (58), an internal error (XX), or the end of the session by
/// `idle_in_transaction_session_timeout` (25P03) or `transaction_timeout` (25P04), after
/// which the connection is gone.
pub(super) fn refused(e: &sqlx::Error) -> bool {
    let Some(db) = e.as_database_error() else {
        return false;
    };
    match db.code().as_deref() {
        Some("57014") => true,
        Some("25P03" | "25P04") => false,
        Some(code) => !["08", "53", "57", "58", "XX"]
            .iter()
            .any(|class| code.starts_with(class)),
        None => true,
    }
}

/// Whether `e` says that the transaction is aborted (SQLSTATE 25P02,
/// `in_failed_sql_transaction`): an earlier statement of it failed.
pub(super) fn is_aborted(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|db| db.code())
        .is_some_and(|code| code == "25P02")
}

/// What a failed `RELEASE SAVEPOINT` after a handler that returned `Ok` means: the handler
/// left its savepoint aborted ([`Failure::Aborted`]), or the database failed (`Err`). The
/// savepoint's guard was consumed by the failed release; dropping it queued the
/// `ROLLBACK TO SAVEPOINT`, which runs before the next statement on the connection and
/// makes the enclosing transaction usable again.
pub(super) fn release_failed(e: sqlx::Error) -> Result<Failure, sqlx::Error> {
    if is_aborted(&e) {
        Ok(Failure::Aborted(e))
    } else {
        Err(e)
    }
}

/// Why a handler call did not succeed, as the runtime sees it.
#[derive(Debug)]
pub(super) enum Failure {
    /// The handler returned an error, which is its disposition.
    Returned(HandlerError),
    /// The handler panicked, with this message: retried like [`HandlerError::retry`] (with
    /// the consumer's backoff), dead-lettered with reason `panic` once the attempts are
    /// exhausted.
    Panicked(String),
    /// The handler succeeded but the database refused its transaction's COMMIT: retried with
    /// the consumer's backoff, dead-lettered with reason `commit_failed` once the attempts
    /// are exhausted.
    Commit(sqlx::Error),
    /// The handler returned `Ok` but left its transaction (or savepoint) aborted: it ignored
    /// a database error. Retried with the consumer's backoff, dead-lettered with reason
    /// `aborted_transaction` once the attempts are exhausted.
    Aborted(sqlx::Error),
    /// The handler ran longer than `handler_timeout` and was dropped: retried with the
    /// consumer's backoff, dead-lettered with reason `timeout` once the attempts are
    /// exhausted.
    TimedOut(Duration),
}

/// The first line of an `aborted_transaction` dead letter's error chain.
const ABORTED_EXPLAINED: &str = "the handler returned Ok but its transaction was aborted: it ignored a database error (after a failed statement PostgreSQL refuses every other one and rolls the transaction back at COMMIT), so its effects would have been lost";

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Returned(error) => error.fmt(f),
            Failure::Panicked(message) => write!(f, "handler panicked: {message}"),
            Failure::Commit(error) => write!(f, "COMMIT failed: {error}"),
            Failure::Aborted(error) => write!(f, "{ABORTED_EXPLAINED}: {error}"),
            Failure::TimedOut(after) => write!(
                f,
                "the handler did not return within handler_timeout ({after:?}) and was stopped"
            ),
        }
    }
}

impl Failure {
    /// The dead letter's reason and error chain for this failure when it parks a message or
    /// a `dlq retry` fails: `retry` names a handler's retry (`attempts_exhausted` in a lane,
    /// `retry_failed` in a `dlq retry`).
    pub(super) fn reason(&self, retry: &str) -> (String, Vec<String>) {
        match self {
            Failure::Returned(HandlerError::Permanent { reason, error }) => {
                (reason.clone(), dlq::error_chain(error.as_ref()))
            }
            Failure::Returned(HandlerError::Retry { error, .. }) => {
                (retry.to_owned(), dlq::error_chain(error.as_ref()))
            }
            Failure::Panicked(_) => (dlq::reason::PANIC.to_owned(), vec![self.to_string()]),
            Failure::Commit(error) => {
                let mut chain = vec!["COMMIT failed".to_owned()];
                chain.extend(dlq::error_chain(error));
                (dlq::reason::COMMIT_FAILED.to_owned(), chain)
            }
            Failure::Aborted(error) => {
                let mut chain = vec![ABORTED_EXPLAINED.to_owned()];
                chain.extend(dlq::error_chain(error));
                (dlq::reason::ABORTED_TRANSACTION.to_owned(), chain)
            }
            Failure::TimedOut(_) => (dlq::reason::TIMEOUT.to_owned(), vec![self.to_string()]),
        }
    }
}

impl Consumer {
    /// What to do after handler attempt `attempt` failed: a reply to send, or `Err` with
    /// why the message must be parked.
    fn disposition(&self, failure: &Failure, attempt: u32) -> Result<Reply, Park> {
        let park = || {
            let (reason, error_chain) = failure.reason(dlq::reason::ATTEMPTS_EXHAUSTED);
            Err(Park {
                reason,
                error_chain,
                id: None,
            })
        };
        match failure {
            Failure::Returned(HandlerError::Permanent { .. }) => park(),
            _ if attempt >= self.config.max_attempts => park(),
            Failure::Returned(HandlerError::Retry {
                after: Some(after), ..
            }) => Ok(Reply::Nak(*after)),
            _ => Ok(Reply::Nak(self.backoff(attempt))),
        }
    }

    /// After a failed handler attempt whose effects were rolled back: count the attempt in
    /// `inbox_attempt` and NAK for a retry, or park the message (forgetting its attempts)
    /// and terminate it, through `conn`.
    pub(super) async fn resolve_failure(
        &self,
        conn: &mut PgConnection,
        message: &jetstream::Message,
        error: Failure,
        ran: &Ran,
    ) -> Result<Reply, sqlx::Error> {
        let (id, attempt) = (ran.id.as_str(), ran.attempt);
        match self.disposition(&error, attempt) {
            Ok(reply) => {
                tracing::debug!(consumer = %self.config.name, %id, attempt, error = %error, "handler attempt failed; retrying");
                self.db(store::count_failed_attempt(conn, &self.config.name, id))
                    .await?;
                metrics::counter!(m::RETRIED, "consumer" => self.config.name.clone()).increment(1);
                Ok(reply)
            }
            Err(park) => {
                tracing::warn!(consumer = %self.config.name, %id, attempt, error = %error, reason = %park.reason, "dead-lettering message");
                let stream_seq = message.info().ok().map(|i| i.stream_sequence);
                self.park(conn, message, Some(id), attempt, stream_seq, park)
                    .await
            }
        }
    }

    /// Counts and logs a handler that left its transaction aborted; returns the failure.
    pub(super) fn aborted(&self, failure: Failure, id: &str) -> Failure {
        metrics::counter!(m::ABORTED_TRANSACTIONS, "consumer" => self.config.name.clone())
            .increment(1);
        tracing::error!(consumer = %self.config.name, %id, error = %failure, "the handler returned Ok but left its transaction aborted; rolled back, counted as a failed attempt");
        failure
    }

    pub(super) fn count_commit_failure(&self) {
        metrics::counter!(m::COMMIT_FAILURES, "consumer" => self.config.name.clone()).increment(1);
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;

    /// A database error with SQLSTATE `code`, as the server would send it.
    #[derive(Debug)]
    struct Coded(&'static str);

    impl std::fmt::Display for Coded {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "SQLSTATE {}", self.0)
        }
    }

    impl std::error::Error for Coded {}

    impl sqlx::error::DatabaseError for Coded {
        fn message(&self) -> &str {
            self.0
        }
        fn code(&self) -> Option<Cow<'_, str>> {
            Some(Cow::Borrowed(self.0))
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    fn refused_code(code: &'static str) -> bool {
        refused(&sqlx::Error::Database(Box::new(Coded(code))))
    }

    #[test]
    fn tells_refused_commits_from_lost_sessions() {
        // Refused for what the transaction did: an attempt.
        for code in ["23505", "40001", "40P01", "P0001", "57014"] {
            assert!(refused_code(code), "{code} is refused");
        }
        // The connection or the server failed: not an attempt.
        for code in [
            "08006", "53300", "57P01", "58030", "XX000", "25P03", "25P04",
        ] {
            assert!(!refused_code(code), "{code} is a lost connection or server");
        }
        assert!(!refused(&sqlx::Error::PoolTimedOut));
        assert!(is_aborted(&sqlx::Error::Database(Box::new(Coded("25P02")))));
    }
}
