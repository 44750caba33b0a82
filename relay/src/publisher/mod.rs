//! The seam between the relay and the broker.
//!
//! [`Publisher`] sends one message and hands back a future of its acknowledgement, so that the
//! relay can keep many acks in flight. Two implementations: [`jetstream::JetStreamPublisher`]
//! (the real one) and [`memory::MemoryPublisher`] (for narrow unit tests; it keeps the
//! JetStream dedup semantics).

pub mod jetstream;
pub mod memory;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use envelope::Envelope;

/// Where the broker stored a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// The stream that stored it.
    pub stream: String,
    /// Its sequence in that stream.
    pub sequence: u64,
    /// The broker had already stored a message with this id (inside its duplicate window);
    /// this still counts as published.
    pub duplicate: bool,
}

/// A pending acknowledgement.
pub type AckFuture = Pin<Box<dyn Future<Output = Result<Ack, PublishError>> + Send>>;

/// The broker side of the relay.
///
/// # Contract
/// - [`Publisher::publish`] sends the message with `Nats-Msg-Id` = the envelope id and returns
///   once it is handed to the connection, without waiting for the acknowledgement; the
///   returned [`AckFuture`] resolves to the broker's answer or to an error within the
///   publisher's timeout.
/// - Publishing the same id twice inside the broker's duplicate window stores it once; the
///   second ack has `duplicate = true`.
/// - Errors are classified by [`PublishErrorKind`]: only `NoStream`, `TooLarge` and
///   `Rejected` are permanent; a `Timeout` is an unknown outcome (the message may be stored),
///   so the relay retries it with the same id.
/// - Never panics on any envelope.
pub trait Publisher: Send + Sync + 'static {
    /// Sends one message and returns the future of its acknowledgement.
    fn publish(
        &self,
        envelope: &Envelope,
    ) -> impl Future<Output = Result<AckFuture, PublishError>> + Send;

    /// Whether the broker is reachable right now (for readiness).
    fn is_connected(&self) -> bool;
}

/// The class of a publish failure, which decides what the relay does with the row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PublishErrorKind {
    /// The broker could not be reached or the connection broke: retry later.
    Unavailable,
    /// No acknowledgement in time: the message may or may not be stored; retry with the same id.
    Timeout,
    /// No stream captures the subject: permanent until someone creates one.
    NoStream,
    /// The message exceeds the server's `max_payload` or the stream's message size limit.
    TooLarge,
    /// The broker refused the message for another reason (permanent).
    Rejected,
}

impl PublishErrorKind {
    /// Whether retrying cannot help until the configuration changes.
    pub fn is_permanent(self) -> bool {
        matches!(self, Self::NoStream | Self::TooLarge | Self::Rejected)
    }

    /// A short name for metrics and dead letters: `unavailable`, `timeout`, `no_stream`,
    /// `payload_too_large`, `rejected`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unavailable => dlq::reason::UNAVAILABLE,
            Self::Timeout => dlq::reason::TIMEOUT,
            Self::NoStream => dlq::reason::NO_STREAM,
            Self::TooLarge => dlq::reason::PAYLOAD_TOO_LARGE,
            Self::Rejected => dlq::reason::REJECTED,
        }
    }
}

/// A failed publish, with its class and the broker's words.
///
/// [`std::error::Error::source`] gives the client's error behind it, when there is one (the
/// connection's, or the envelope's when it cannot become NATS headers); `message` already
/// holds its text.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}: {message}", kind.as_str())]
pub struct PublishError {
    /// What kind of failure.
    pub kind: PublishErrorKind,
    /// Details from the client or server.
    pub message: String,
    /// The error this one stems from (shared, so that the error stays `Clone`).
    #[source]
    source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl PublishError {
    /// A new error.
    pub fn new(kind: PublishErrorKind, message: impl Into<String>) -> Self {
        PublishError {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// A new error caused by `source`; `message` should say what `source` says, since only
    /// the message is shown and recorded.
    pub fn with_source(
        kind: PublishErrorKind,
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        PublishError {
            kind,
            message: message.into(),
            source: Some(Arc::new(source)),
        }
    }

    /// The same error with another kind and message, keeping its source.
    fn reclassified(self, kind: PublishErrorKind, message: String) -> Self {
        PublishError {
            kind,
            message,
            source: self.source,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    #[test]
    fn a_publish_error_keeps_its_source_through_reclassification() {
        let cause = std::io::Error::other("broken pipe");
        let error = PublishError::with_source(PublishErrorKind::NoStream, cause.to_string(), cause);
        assert_eq!(error.to_string(), "no_stream: broken pipe");
        assert_eq!(
            error.source().map(|s| s.to_string()).as_deref(),
            Some("broken pipe")
        );
        let error = error.reclassified(PublishErrorKind::Unavailable, "later".into());
        assert_eq!(error.to_string(), "unavailable: later");
        assert!(error.source().is_some(), "the source survives");
        assert!(
            PublishError::new(PublishErrorKind::Timeout, "x")
                .source()
                .is_none()
        );
    }
}
