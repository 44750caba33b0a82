//! The `dead_letter.reason` values the toolkit writes, one constant each: `dlq list --reason`,
//! `dlq stats` and alerts match on them, so they are part of the contract and never renamed.
//! A handler may also park with a reason of its own (`HandlerError::permanent_because`).

/// Relay: the outbox row cannot become a message (its subject, headers or id are invalid).
pub const INVALID_ROW: &str = "invalid_row";
/// Relay: no stream captures the row's subject.
pub const NO_STREAM: &str = "no_stream";
/// Relay: the message is larger than the server's `max_payload`.
pub const PAYLOAD_TOO_LARGE: &str = "payload_too_large";
/// Relay: the broker refused the message for good (e.g. a wrong expected sequence).
pub const REJECTED: &str = "rejected";
/// Relay: the broker could not be reached (a retryable kind; not parked on its own).
pub const UNAVAILABLE: &str = "unavailable";
/// Relay: no PubAck in time; consumer: the handler ran past `handler_timeout`.
pub const TIMEOUT: &str = "timeout";
/// Consumer: the message does not decode (not an envelope, or not the handler's type).
pub const DECODE: &str = "decode";
/// Consumer: the handler returned a permanent failure without a reason of its own.
pub const HANDLER: &str = "handler";
/// Consumer: the handler panicked on every attempt.
pub const PANIC: &str = "panic";
/// Consumer: the database refused the handler transaction's COMMIT on every attempt.
pub const COMMIT_FAILED: &str = "commit_failed";
/// Consumer: the handler returned `Ok` but left its transaction aborted.
pub const ABORTED_TRANSACTION: &str = "aborted_transaction";
/// Consumer: the handler kept asking for a retry until `max_attempts`.
pub const ATTEMPTS_EXHAUSTED: &str = "attempts_exhausted";
/// Consumer: the broker delivered the message far more often than `max_attempts` allows.
pub const DELIVERIES_EXHAUSTED: &str = "deliveries_exhausted";
/// Consumer: a `Router` has no route for the message's event type.
pub const UNROUTED: &str = "unrouted";
