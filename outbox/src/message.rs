//! A message as the caller describes it, before validation.

use std::collections::BTreeMap;

use bytes::Bytes;
use envelope::envelope::JSON_CONTENT_TYPE;
use envelope::{Event, MessageId, TraceContext};
use serde::Serialize;
use time::OffsetDateTime;

use crate::error::Error;

/// A message to enqueue: a typed event ([`Message::event`]) or raw bytes ([`Message::raw`]),
/// plus optional metadata.
///
/// Builder methods take plain values and never fail; everything is validated at enqueue,
/// which returns a typed error and writes nothing if any rule is broken.
#[derive(Debug, Clone)]
pub struct Message {
    pub(crate) id: Option<MessageId>,
    pub(crate) subject: Subject,
    pub(crate) event_type: String,
    pub(crate) partition_key: String,
    pub(crate) payload: Bytes,
    pub(crate) content_type: Option<String>,
    pub(crate) occurred_at: Option<OffsetDateTime>,
    pub(crate) correlation_id: Option<String>,
    pub(crate) causation_id: Option<MessageId>,
    pub(crate) trace: Option<TraceContext>,
    pub(crate) headers: BTreeMap<String, String>,
}

/// Where the subject comes from.
#[derive(Debug, Clone)]
pub(crate) enum Subject {
    /// Derived from the event type, after the configured prefix.
    Derived(envelope::Subject),
    /// Given by the caller; used as is (no prefix).
    Explicit(String),
}

impl Message {
    /// A typed event with its JSON payload, subject derived from its type (after the
    /// outbox's `subject_prefix`, if any). Fails if the type is invalid or does not serialize.
    pub fn event<E: Event>(event: &E) -> Result<Self, Error> {
        let payload =
            serde_json::to_vec(event).map_err(|e| envelope::Error::Encode(e.to_string()))?;
        Ok(Message {
            subject: Subject::Derived(event.subject()?),
            event_type: E::event_type()?.to_string(),
            partition_key: event.partition_key(),
            content_type: Some(JSON_CONTENT_TYPE.to_owned()),
            ..Message::blank(Bytes::from(payload))
        })
    }

    /// Raw bytes on an explicit subject. `event_type` is the full versioned type
    /// (`name.vN`, e.g. `invoice.issued.v2`); the subject is used as given, without prefix.
    pub fn raw(
        subject: impl Into<String>,
        event_type: impl Into<String>,
        partition_key: impl Into<String>,
        payload: impl Into<Bytes>,
    ) -> Self {
        Message {
            subject: Subject::Explicit(subject.into()),
            event_type: event_type.into(),
            partition_key: partition_key.into(),
            ..Message::blank(payload.into())
        }
    }

    /// Any serializable value as a JSON payload on an explicit subject.
    pub fn json<T: Serialize>(
        subject: impl Into<String>,
        event_type: impl Into<String>,
        partition_key: impl Into<String>,
        value: &T,
    ) -> Result<Self, Error> {
        let payload =
            serde_json::to_vec(value).map_err(|e| envelope::Error::Encode(e.to_string()))?;
        Ok(Message::raw(subject, event_type, partition_key, payload)
            .content_type(JSON_CONTENT_TYPE))
    }

    fn blank(payload: Bytes) -> Self {
        Message {
            id: None,
            subject: Subject::Explicit(String::new()),
            event_type: String::new(),
            partition_key: String::new(),
            payload,
            content_type: None,
            occurred_at: None,
            correlation_id: None,
            causation_id: None,
            trace: None,
            headers: BTreeMap::new(),
        }
    }

    /// Uses a caller-chosen id instead of a fresh UUIDv7 (for example to make a retried
    /// request idempotent: a second enqueue with the same id fails with
    /// [`Error::DuplicateId`]).
    pub fn id(mut self, id: MessageId) -> Self {
        self.id = Some(id);
        self
    }

    /// Sets a free-form header (validated at enqueue; reserved names are refused).
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Sets the correlation id that groups the messages of one business flow.
    pub fn correlation_id(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }

    /// Records the message that caused this one (for consume-transform-produce).
    pub fn caused_by(mut self, id: MessageId) -> Self {
        self.causation_id = Some(id);
        self
    }

    /// Sets the trace context explicitly (otherwise the current span's is captured when
    /// the `opentelemetry` feature is on).
    pub fn trace_context(mut self, trace: TraceContext) -> Self {
        self.trace = Some(trace);
        self
    }

    /// Sets the payload's media type.
    pub fn content_type(mut self, content_type: impl Into<String>) -> Self {
        self.content_type = Some(content_type.into());
        self
    }

    /// Sets when the event happened (defaults to the time of enqueue).
    pub fn occurred_at(mut self, at: OffsetDateTime) -> Self {
        self.occurred_at = Some(at);
        self
    }
}
