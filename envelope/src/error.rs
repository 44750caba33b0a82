//! The envelope crate's error type.

/// Why a value was refused by the envelope crate.
///
/// Every variant names the offending input (truncated when long) and the rule it broke, so
/// an error can be shown to a user as it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A NATS subject broke the subject rules (see [`crate::Subject`]).
    #[error("invalid subject {subject:?}: {reason}")]
    InvalidSubject {
        /// The refused subject, truncated to 80 characters.
        subject: String,
        /// The rule it broke.
        reason: &'static str,
    },
    /// An event type name or version broke the rules (see [`crate::EventType`]).
    #[error("invalid event type {event_type:?}: {reason}")]
    InvalidEventType {
        /// The refused type, truncated to 80 characters.
        event_type: String,
        /// The rule it broke.
        reason: &'static str,
    },
    /// A header name is empty, too long, or holds a character outside the HTTP token set.
    #[error("invalid header name {name:?}: {reason}")]
    InvalidHeaderName {
        /// The refused name, truncated to 80 characters.
        name: String,
        /// The rule it broke.
        reason: &'static str,
    },
    /// A header name is one the envelope sets itself (`Nats-*`, `ce-*`, trace and content type).
    #[error("header name {name:?} is reserved for the envelope; set the field instead")]
    ReservedHeaderName {
        /// The refused name.
        name: String,
    },
    /// A text value (header value, partition key, source ...) broke the single-line rules.
    #[error("invalid {field}: {reason}")]
    InvalidText {
        /// Which field held the value, e.g. `header "x-tenant"` or `partition key`.
        field: String,
        /// The rule it broke.
        reason: &'static str,
    },
    /// The headers together exceed the size or count bound.
    #[error("headers too large: {reason}")]
    HeadersTooLarge {
        /// Which bound was exceeded, with the numbers.
        reason: String,
    },
    /// A `traceparent` or `tracestate` value is not valid W3C trace context.
    #[error("invalid trace context: {reason}")]
    InvalidTraceContext {
        /// The rule it broke.
        reason: &'static str,
    },
    /// A message id is not a UUID.
    #[error("invalid message id {id:?}: {reason}")]
    InvalidMessageId {
        /// The refused id, truncated to 80 characters.
        id: String,
        /// The rule it broke.
        reason: &'static str,
    },
    /// A header the envelope needs is absent from a received message.
    #[error("missing header {0:?}")]
    MissingHeader(&'static str),
    /// A timestamp header is not RFC 3339.
    #[error("invalid time {value:?}: not RFC 3339")]
    InvalidTime {
        /// The refused value, truncated to 80 characters.
        value: String,
    },
    /// A message read from the write-ahead log is not in the outbox's log format
    /// (see [`crate::wal`]).
    #[error("invalid outbox log message: {reason}")]
    InvalidLogMessage {
        /// What is wrong, with offsets and lengths.
        reason: String,
    },
    /// A payload could not be encoded to JSON.
    #[error("payload could not be encoded as JSON: {0}")]
    Encode(String),
    /// A payload could not be decoded from JSON into the requested type.
    #[error("payload could not be decoded as {target}: {reason}")]
    Decode {
        /// The Rust type the payload was decoded into.
        target: &'static str,
        /// What serde said.
        reason: String,
    },
}

/// Truncates a refused input for an error message, on a character boundary.
pub(crate) fn excerpt(s: &str) -> String {
    const MAX: usize = 80;
    if s.chars().count() <= MAX {
        return s.to_owned();
    }
    let mut out: String = s.chars().take(MAX).collect();
    out.push('…');
    out
}
