//! Metric names, all prefixed `relay_`. Exported in Prometheus format on `/metrics`.

/// Counter: messages acknowledged by the broker (duplicates included).
pub const PUBLISHED: &str = "relay_published_total";
/// Counter: acknowledgements that were duplicates (already stored inside the dedup window).
pub const DUPLICATES: &str = "relay_duplicates_total";
/// Counter: failed publishes, labelled `kind` (unavailable, timeout, no_stream, ...).
pub const FAILED: &str = "relay_publish_failures_total";
/// Counter: rows returned to pending with a backoff after a failure.
pub const RETRIED: &str = "relay_retries_total";
/// Counter: rows moved to `dead_letter`, labelled `reason`.
pub const DEAD_LETTERED: &str = "relay_dead_lettered_total";
/// Counter: dead letters the database refused to store; their rows stay pending with a
/// backoff and are tried again (alert on any).
pub const DEAD_LETTER_WRITE_FAILURES: &str = "relay_dead_letter_write_failures_total";
/// Counter: published rows deleted by the cleaner.
pub const CLEANED: &str = "relay_cleaned_total";
/// Gauge: unpublished rows.
pub const BACKLOG: &str = "relay_backlog";
/// Gauge: age of the oldest unpublished row, seconds.
pub const OLDEST_PENDING_AGE: &str = "relay_oldest_pending_age_seconds";
/// Gauge: messages sent and awaiting a PubAck.
pub const IN_FLIGHT: &str = "relay_in_flight";
/// Gauge: partitions this instance owns.
pub const PARTITIONS_OWNED: &str = "relay_partitions_owned";
/// Histogram: send-to-PubAck latency, seconds.
pub const PUBLISH_LATENCY: &str = "relay_publish_latency_seconds";
/// Histogram: rows per claim.
pub const BATCH_SIZE: &str = "relay_batch_size";
/// WAL source: bytes of WAL the slot keeps (current position minus its `restart_lsn`).
pub const WAL_RETAINED_BYTES: &str = "relay_wal_retained_bytes";
/// WAL source: bytes between the current position and the slot's confirmed position.
pub const WAL_LAG_BYTES: &str = "relay_wal_lag_bytes";
/// WAL source: age of the oldest commit read from the log and not yet confirmed, seconds
/// (0 when everything read is confirmed).
pub const WAL_OLDEST_UNCONFIRMED_AGE: &str = "relay_wal_oldest_unconfirmed_age_seconds";
/// WAL source: messages read from the log and not yet acknowledged or dead-lettered.
pub const WAL_UNRESOLVED: &str = "relay_wal_unresolved";
/// WAL source: 1 while this instance streams the slot, 0 as a standby or reconnecting.
pub const WAL_STREAMING: &str = "relay_wal_streaming";
/// WAL source, counter: times a confirmation waited for table rows that the log shows
/// committed but a DELETE cannot see yet (their commit still finishing, for example waiting
/// for a synchronous standby).
pub const WAL_INVISIBLE_ROW_WAITS: &str = "relay_wal_invisible_row_waits_total";
/// WAL source, counter: messages read again after a restart that an earlier relay had
/// acknowledged past its confirmed position (its record lists them), resolved without being
/// published again.
pub const WAL_SKIPPED_ACKNOWLEDGED: &str = "relay_wal_skipped_acknowledged_total";
