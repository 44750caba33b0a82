//! Metric names, all prefixed `inbox_`, labelled `consumer`.

/// Counter: messages whose handler committed.
pub const PROCESSED: &str = "inbox_processed_total";
/// Counter: redeliveries acknowledged without running the handler.
pub const DUPLICATES: &str = "inbox_duplicates_skipped_total";
/// Counter: messages NAKed for a retry.
pub const RETRIED: &str = "inbox_retried_total";
/// Counter: messages parked in `dead_letter`, labelled `reason`.
pub const DEAD_LETTERED: &str = "inbox_dead_lettered_total";
/// Counter: dead letters the database refused to store; the message is NAKed and
/// redelivered after the longest retry delay (alert on any).
pub const DEAD_LETTER_WRITE_FAILURES: &str = "inbox_dead_letter_write_failures_total";
/// Counter: handler calls that panicked (per message, per batch, or in a `dlq retry`). The
/// panic is caught, the transaction rolled back and the message retried like
/// `HandlerError::retry`; after `max_attempts` it is dead-lettered with reason `panic`.
/// Alert on any: it is a bug in the handler.
pub const HANDLER_PANICS: &str = "inbox_handler_panics_total";
/// Counter: COMMITs the database refused (a deferred constraint or trigger, a serialization
/// failure): of a batch (its messages are then run one at a time), of one message (a failed
/// handler attempt: retried, then dead-lettered with reason `commit_failed`), or of `dlq
/// retry` runs. Alert on any that persist: a handler writes what the database refuses.
pub const COMMIT_FAILURES: &str = "inbox_commit_failures_total";
/// Counter: `dlq retry` requests run, labelled `result` (`ok`, `failed`).
pub const DLQ_RETRIES: &str = "inbox_dlq_retries_total";
/// Histogram: run time of one handler call for one message (with its layers), seconds.
pub const HANDLER_LATENCY: &str = "inbox_handler_seconds";
/// Histogram: run time of one batch handler call for a whole batch (with its layers), seconds.
pub const BATCH_HANDLER_LATENCY: &str = "inbox_batch_handler_seconds";
/// Histogram: messages given to one batch handler call.
pub const BATCH_MESSAGES: &str = "inbox_batch_handler_messages";
/// Histogram: run time of what a `layer::Timing` wraps, per call (a message or a batch),
/// labelled `kind` (`message`, `batch`), seconds.
pub const TIMED: &str = "inbox_timed_seconds";
/// Counter: handler calls stopped after running longer than `handler_timeout` (per message,
/// per batch, or in a `dlq retry`): rolled back and counted as a failed attempt, then
/// dead-lettered with reason `timeout` after `max_attempts`. Alert on any: a handler hangs.
pub const HANDLER_TIMEOUTS: &str = "inbox_handler_timeouts_total";
/// Counter: handlers that returned `Ok` but left their transaction aborted (they ignored a
/// failed statement): rolled back and counted as a failed attempt, then dead-lettered with
/// reason `aborted_transaction` after `max_attempts`. Alert on any: a bug in the handler.
pub const ABORTED_TRANSACTIONS: &str = "inbox_aborted_transactions_total";
