//! The envelope: one message with its metadata and payload.

use bytes::Bytes;
use serde::de::DeserializeOwned;
use time::OffsetDateTime;

use crate::error::Error;
use crate::event::Event;
use crate::headers::Headers;
use crate::id::MessageId;
use crate::subject::{EventType, Subject};
use crate::text::{HeaderText, PartitionKey};
use crate::trace::TraceContext;

/// The content type written for JSON payloads.
pub const JSON_CONTENT_TYPE: &str = "application/json";

/// One message: metadata that travels in NATS headers and the payload that is the body.
///
/// Every field holds a validated type, so any `Envelope` can be encoded to NATS headers;
/// [`crate::nats::to_headers`] still returns a `Result` and never panics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Identity for broker dedup (`Nats-Msg-Id`) and the inbox (`ce-id`).
    pub id: MessageId,
    /// Where it is published.
    pub subject: Subject,
    /// The versioned type (`ce-type`), e.g. `order.created.v1`.
    pub event_type: EventType,
    /// The producing service (`ce-source`), e.g. `order-service`.
    pub source: HeaderText,
    /// The unit of ordering (`ce-partitionkey`).
    pub partition_key: PartitionKey,
    /// When the event happened (`ce-time`, RFC 3339).
    pub occurred_at: OffsetDateTime,
    /// Groups the messages of one business flow (`ce-correlationid`).
    pub correlation_id: Option<HeaderText>,
    /// The message that caused this one (`ce-causationid`).
    pub causation_id: Option<MessageId>,
    /// The producer's trace context (`traceparent`, `tracestate`).
    pub trace: Option<TraceContext>,
    /// The payload's media type (`Content-Type`), e.g. `application/json`.
    pub content_type: Option<HeaderText>,
    /// Free-form headers.
    pub headers: Headers,
    /// The body, as is.
    pub payload: Bytes,
}

impl Envelope {
    /// A new envelope for a typed event: fresh id, current time, JSON payload, no optional
    /// metadata. Fails if the event's type, subject or partition key break the rules, or if
    /// it does not serialize.
    pub fn from_event<E: Event>(source: HeaderText, event: &E) -> Result<Self, Error> {
        let payload = serde_json::to_vec(event).map_err(|e| Error::Encode(e.to_string()))?;
        Ok(Envelope {
            id: MessageId::new(),
            subject: event.subject()?,
            event_type: E::event_type()?,
            source,
            partition_key: PartitionKey::new(event.partition_key())?,
            occurred_at: OffsetDateTime::now_utc(),
            correlation_id: None,
            causation_id: None,
            trace: None,
            content_type: Some(HeaderText::new("content type", JSON_CONTENT_TYPE)?),
            headers: Headers::new(),
            payload: Bytes::from(payload),
        })
    }

    /// Decodes the payload as JSON into any type.
    pub fn decode_json<T: DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_slice(&self.payload).map_err(|e| Error::Decode {
            target: std::any::type_name::<T>(),
            reason: e.to_string(),
        })
    }

    /// Decodes the payload as the typed event `E`, after checking that the envelope's type
    /// is `E`'s name and version.
    pub fn decode_event<E: Event>(&self) -> Result<E, Error> {
        let expected = E::event_type()?;
        if self.event_type != expected {
            return Err(Error::Decode {
                target: std::any::type_name::<E>(),
                reason: format!("event type is {}, expected {expected}", self.event_type),
            });
        }
        self.decode_json()
    }
}
