//! The outbox crate's error type.

use envelope::MessageId;

/// Why an enqueue (or building an [`Outbox`](crate::Outbox)) failed.
///
/// When an enqueue returns an error, no row was written by it. A database error may have
/// aborted the caller's transaction (PostgreSQL does so on any failed statement), so the
/// caller should roll back.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration is unusable; the message says which field and why.
    #[error("invalid outbox configuration: {0}")]
    Config(String),
    /// The message breaks an envelope rule (subject, type, header, key, trace context).
    /// Checked before any SQL runs.
    #[error("message refused: {0}")]
    Invalid(#[from] envelope::Error),
    /// Headers plus payload exceed the configured `max_message_bytes`. Checked before any
    /// SQL runs.
    #[error("message refused: {size} bytes (headers and payload) exceed the limit of {limit}")]
    TooLarge {
        /// Encoded size of headers plus payload.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// A row with this message id already exists (a caller-chosen id was reused).
    #[error("message {0} is already in the outbox")]
    DuplicateId(MessageId),
    /// [`OutboxTransaction::commit`](crate::OutboxTransaction::commit) found no transaction
    /// to commit: something ended it before (a nested `begin()` and `commit()` on it, or a
    /// `COMMIT` statement). Its buffered messages were not written; what was committed
    /// before stays committed without them.
    #[error(
        "the transaction had already ended (a nested commit?) before OutboxTransaction::commit: its buffered messages were not written"
    )]
    TransactionEnded,
    /// The database refused the insert or could not be reached.
    #[error("outbox insert failed: {0}")]
    Database(#[source] sqlx::Error),
}

/// The broad class of an [`Error`], for callers that branch on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Fix the code or configuration: retrying cannot help.
    InvalidInput,
    /// The database failed; retrying the whole transaction may help if transient.
    Database,
}

impl Error {
    /// The broad class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Config(_)
            | Error::Invalid(_)
            | Error::TooLarge { .. }
            | Error::DuplicateId(_)
            | Error::TransactionEnded => ErrorKind::InvalidInput,
            Error::Database(_) => ErrorKind::Database,
        }
    }

    /// Whether retrying the whole transaction could succeed: connection loss, pool timeout,
    /// serialization failure or deadlock.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Database(e) => is_transient_db(e),
            _ => false,
        }
    }
}

fn is_transient_db(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => true,
        sqlx::Error::Database(db) => matches!(
            db.code().as_deref(),
            // serialization_failure, deadlock_detected, admin_shutdown, crash_shutdown,
            // cannot_connect_now
            Some("40001" | "40P01" | "57P01" | "57P02" | "57P03")
        ),
        _ => false,
    }
}
