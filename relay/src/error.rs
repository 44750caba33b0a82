//! The relay crate's error type.

/// Why the relay (or one of its commands) stopped or refused to start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting is unusable; the message names it.
    #[error("invalid relay configuration: {0}")]
    Config(String),
    /// PostgreSQL failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// Migrating the schema failed.
    #[error(transparent)]
    Migrate(#[from] migrations::Error),
    /// Connecting to NATS failed.
    #[error(transparent)]
    Connect(#[from] connect::ConnectError),
    /// The JetStream stream is missing or does not match the configuration.
    #[error("stream {stream}: {reason}")]
    Stream {
        /// The stream name.
        stream: String,
        /// What is wrong, and what to do.
        reason: String,
    },
    /// A task of the running relay (the dispatcher, partition leases, a maintenance task)
    /// panicked or ended on its own: the relay stopped every other task and is not ready.
    /// Restart it (its rows stay pending; nothing is lost).
    #[error("relay task {task} failed: {reason}")]
    TaskFailed {
        /// Which task.
        task: &'static str,
        /// The panic message, or why it ended.
        reason: String,
    },
    /// The WAL source cannot work: `wal_level` is not `logical`, the role lacks
    /// REPLICATION, the slot is missing or of another kind, or the replication stream
    /// failed in a way retrying cannot mend (a message of an unknown format version). The
    /// slot is never advanced past what was not published.
    #[error("replication slot {slot}: {reason}")]
    Slot {
        /// The slot's name.
        slot: String,
        /// What is wrong, and what to do.
        reason: String,
    },
    /// The HTTP listener could not start.
    #[error("cannot serve HTTP on {addr}: {source}")]
    Http {
        /// The address.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
}
