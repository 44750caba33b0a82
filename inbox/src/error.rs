//! The inbox crate's error type.

/// Why a consumer could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting is unusable; the message names it and why.
    #[error("invalid consumer configuration: {0}")]
    Config(String),
    /// The JetStream consumer could not be created, or exists with other settings.
    #[error("JetStream consumer {consumer}: {reason}")]
    JetStream {
        /// The durable name.
        consumer: String,
        /// What failed.
        reason: String,
    },
    /// PostgreSQL failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}
