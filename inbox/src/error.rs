//! The inbox crate's error type.

/// Why a consumer could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting is unusable; the message names it and why.
    #[error("invalid consumer configuration: {0}")]
    Config(String),
    /// The JetStream consumer exists with settings the inbox cannot work with (see
    /// [`crate::Consumer::ensure`]): the reason names each setting, the value found, the
    /// value required, and how to fix it.
    #[error("JetStream consumer {consumer}: {reason}")]
    JetStream {
        /// The durable name.
        consumer: String,
        /// What failed.
        reason: String,
    },
    /// [`crate::Consumer::ensure`] could not look up the stream (it does not exist, or the
    /// broker did not answer).
    #[error("JetStream consumer {consumer}: stream {stream}: {source}")]
    Stream {
        /// The durable name.
        consumer: String,
        /// The stream's name.
        stream: String,
        /// What the broker answered.
        #[source]
        source: async_nats::jetstream::context::GetStreamError,
    },
    /// [`crate::Consumer::ensure`] could not create or look up the durable.
    #[error("JetStream consumer {consumer}: {source}")]
    CreateConsumer {
        /// The durable name.
        consumer: String,
        /// What the broker answered.
        #[source]
        source: async_nats::jetstream::stream::ConsumerError,
    },
    /// [`crate::Consumer::ensure`] could not read the durable's settings to check them.
    #[error("JetStream consumer {consumer}: {source}")]
    ConsumerInfo {
        /// The durable name.
        consumer: String,
        /// What the broker answered.
        #[source]
        source: async_nats::jetstream::context::ConsumerInfoError,
    },
    /// A task of the running consumer (a lane, the inbox cleaner or the `dlq retry` runner)
    /// ended without being asked to, for instance by panicking outside a handler (a handler's
    /// own panics are caught and retried), or panicked while stopping.
    /// [`crate::Consumer::run`] then stops the others as on shutdown and returns this instead
    /// of `Ok`; the reason names each task and why it ended. Restarting the consumer is safe:
    /// messages not acknowledged are redelivered, and the inbox skips those already handled.
    #[error("consumer {consumer} stopped: {reason}")]
    TaskFailed {
        /// The durable name.
        consumer: String,
        /// Which task ended and why, e.g. `lane 3 panicked: ...`.
        reason: String,
    },
    /// PostgreSQL failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}
