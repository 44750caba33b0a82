//! Producer settings.

use envelope::{HeaderText, Subject};

use crate::error::Error;

/// How an [`Outbox`](crate::Outbox) validates and labels messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxConfig {
    /// The producing service, written as `ce-source`, e.g. `order-service`. Required: a
    /// single line of at most 4096 bytes. Defaults to empty, which `validate()` refuses.
    pub source: String,
    /// A subject prefix put before every derived subject, e.g. `acme` gives
    /// `acme.order.created.v1`; it must be a valid subject itself. Defaults to none.
    pub subject_prefix: Option<String>,
    /// The largest message accepted, headers included, in bytes: set it to the broker's
    /// `max_payload`, since a larger message can never be published. Between 1 KiB and
    /// 64 MiB. Defaults to 1 MiB, the nats-server default.
    pub max_message_bytes: usize,
    /// Whether to record the current tracing span's W3C trace context on each message that
    /// does not carry one. Needs the `opentelemetry` feature and a `tracing-opentelemetry`
    /// layer in the subscriber; without them nothing is captured. Defaults to true.
    pub capture_trace_context: bool,
    /// Where enqueued messages are written: rows of `outbox_message` (the default) or
    /// logical decoding messages in the write-ahead log. See [`Storage`].
    pub storage: Storage,
}

/// Where an [`Outbox`](crate::Outbox) writes the messages it enqueues. Both are written in
/// the caller's transaction and become visible exactly when it commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Storage {
    /// One row of `outbox_message` per message: read by the polling relay (`relay run`) or
    /// by the WAL relay (`relay run --source wal`). Caller-chosen ids are checked unique
    /// at enqueue ([`Error::DuplicateId`]).
    #[default]
    Table,
    /// One transactional logical decoding message per message
    /// (`pg_logical_emit_message(true, 'outbox', ..)`, in the format of [`envelope::wal`]):
    /// no row, no index, nothing to mark, delete or vacuum. Only the WAL relay
    /// (`relay run --source wal`) reads it.
    ///
    /// Needs `wal_level = logical` and the relay's replication slot created *before* the
    /// first enqueue (`relay slot create`): a message written while no slot exists would
    /// never be published, so enqueue refuses it with a database error naming the cause.
    /// The per-statement enqueue checks on every call (the SQL function
    /// `outbox_emit_encoded`); the enqueue that rides with `COMMIT`
    /// ([`OutboxTransaction`](crate::OutboxTransaction)) about once a second per session
    /// (migration 0016), so a slot dropped under running producers is refused by each of
    /// their sessions within about a second. Drop a slot only with its producers stopped.
    /// Ids are not checked unique at enqueue; the broker's duplicate window drops a reused
    /// id that it still remembers.
    Log,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            source: String::new(),
            subject_prefix: None,
            max_message_bytes: Self::DEFAULT_MAX_MESSAGE_BYTES,
            capture_trace_context: true,
            storage: Storage::Table,
        }
    }
}

impl OutboxConfig {
    /// nats-server's default `max_payload`.
    pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1024 * 1024;
    /// nats-server's largest allowed `max_payload`.
    pub const MAX_MESSAGE_BYTES_LIMIT: usize = 64 * 1024 * 1024;

    /// A default configuration for `source`.
    pub fn for_source(source: impl Into<String>) -> Self {
        OutboxConfig {
            source: source.into(),
            ..OutboxConfig::default()
        }
    }

    /// Refuses unusable values with a message that names the field.
    pub fn validate(&self) -> Result<(), Error> {
        self.validated().map(|_| ())
    }

    /// Validates and returns the typed source and prefix.
    pub(crate) fn validated(&self) -> Result<(HeaderText, Option<Subject>), Error> {
        let source = HeaderText::new("source", self.source.clone()).map_err(|e| {
            Error::Config(format!(
                "source must name the producing service (e.g. \"order-service\"): {e}"
            ))
        })?;
        let prefix = self
            .subject_prefix
            .as_ref()
            .map(|p| Subject::new(p.clone()))
            .transpose()
            .map_err(|e| Error::Config(format!("subject_prefix: {e}")))?;
        if !(1024..=Self::MAX_MESSAGE_BYTES_LIMIT).contains(&self.max_message_bytes) {
            return Err(Error::Config(format!(
                "max_message_bytes must be between 1024 and {} (the broker's limit), got {}",
                Self::MAX_MESSAGE_BYTES_LIMIT,
                self.max_message_bytes
            )));
        }
        Ok((source, prefix))
    }
}
