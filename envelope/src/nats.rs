//! The codec between an [`Envelope`] and NATS headers.
//!
//! Metadata travels in headers in the CloudEvents binary content mode (`ce-` prefixed
//! attributes, as cloudevents/sdk-go writes them for NATS), the body is the payload alone, and
//! `Nats-Msg-Id` carries the id for JetStream deduplication:
//!
//! | header | field |
//! |---|---|
//! | `Nats-Msg-Id`, `ce-id` | [`Envelope::id`] |
//! | `ce-specversion` | always `1.0` |
//! | `ce-type` | [`Envelope::event_type`] (`name.vN`) |
//! | `ce-source` | [`Envelope::source`] |
//! | `ce-time` | [`Envelope::occurred_at`] (RFC 3339) |
//! | `ce-partitionkey` | [`Envelope::partition_key`] (CloudEvents partitioning extension) |
//! | `ce-correlationid`, `ce-causationid` | correlation and causation ids |
//! | `traceparent`, `tracestate` | [`Envelope::trace`] (W3C) |
//! | `Content-Type` | [`Envelope::content_type`] |
//! | anything else | [`Envelope::headers`] |
//!
//! Both directions are fallible and never panic: async-nats's infallible header constructors
//! panic on CR/LF, so only `FromStr` is used here.

use std::str::FromStr;

use async_nats::{HeaderMap, HeaderName, HeaderValue};
use bytes::Bytes;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::envelope::Envelope;
use crate::error::{Error, excerpt};
use crate::headers::{Headers, is_reserved_name};
use crate::id::MessageId;
use crate::subject::{EventType, Subject};
use crate::text::{HeaderText, PartitionKey};
use crate::trace::TraceContext;

/// JetStream's deduplication header.
pub const NATS_MSG_ID: &str = "Nats-Msg-Id";
/// CloudEvents `specversion`.
pub const CE_SPECVERSION: &str = "ce-specversion";
/// CloudEvents `id`.
pub const CE_ID: &str = "ce-id";
/// CloudEvents `type`.
pub const CE_TYPE: &str = "ce-type";
/// CloudEvents `source`.
pub const CE_SOURCE: &str = "ce-source";
/// CloudEvents `time`.
pub const CE_TIME: &str = "ce-time";
/// CloudEvents partitioning extension `partitionkey`.
pub const CE_PARTITIONKEY: &str = "ce-partitionkey";
/// Extension attribute: correlation id.
pub const CE_CORRELATIONID: &str = "ce-correlationid";
/// Extension attribute: causation id.
pub const CE_CAUSATIONID: &str = "ce-causationid";
/// W3C trace context.
pub const TRACEPARENT: &str = "traceparent";
/// W3C vendor trace state.
pub const TRACESTATE: &str = "tracestate";
/// The payload's media type.
pub const CONTENT_TYPE: &str = "Content-Type";
/// The CloudEvents version written and accepted.
pub const SPECVERSION: &str = "1.0";

/// Encodes the envelope's metadata as NATS headers (the payload is sent as the body).
pub fn to_headers(envelope: &Envelope) -> Result<HeaderMap, Error> {
    let mut map = HeaderMap::new();
    let id = envelope.id.to_string();
    put(&mut map, NATS_MSG_ID, &id)?;
    put(&mut map, CE_ID, &id)?;
    put(&mut map, CE_SPECVERSION, SPECVERSION)?;
    put(&mut map, CE_TYPE, &envelope.event_type.to_string())?;
    put(&mut map, CE_SOURCE, envelope.source.as_str())?;
    put(&mut map, CE_TIME, &format_time(envelope.occurred_at)?)?;
    put(&mut map, CE_PARTITIONKEY, envelope.partition_key.as_str())?;
    if let Some(correlation) = &envelope.correlation_id {
        put(&mut map, CE_CORRELATIONID, correlation.as_str())?;
    }
    if let Some(causation) = &envelope.causation_id {
        put(&mut map, CE_CAUSATIONID, &causation.to_string())?;
    }
    if let Some(trace) = &envelope.trace {
        put(&mut map, TRACEPARENT, trace.traceparent())?;
        if let Some(state) = trace.tracestate() {
            put(&mut map, TRACESTATE, state)?;
        }
    }
    if let Some(content_type) = &envelope.content_type {
        put(&mut map, CONTENT_TYPE, content_type.as_str())?;
    }
    for (name, value) in envelope.headers.iter() {
        put(&mut map, name, value)?;
    }
    Ok(map)
}

/// The number of bytes the headers of `envelope` take on the wire (`NATS/1.0` status line,
/// `name: value` lines and the blank line). The server's `max_payload` bounds this plus the
/// payload length.
pub fn encoded_headers_len(envelope: &Envelope) -> Result<usize, Error> {
    let map = to_headers(envelope)?;
    let lines: usize = map
        .iter()
        .map(|(name, values)| {
            values
                .iter()
                .map(|v| AsRef::<str>::as_ref(name).len() + 2 + v.as_str().len() + 2)
                .sum::<usize>()
        })
        .sum();
    Ok("NATS/1.0\r\n".len() + lines + 2)
}

/// Decodes a received message into an envelope, validating every field as the
/// constructors do. Headers this codec does not own become [`Envelope::headers`] (the first
/// value of a repeated name counts); `Nats-` headers are the broker's and are dropped.
pub fn from_message(
    subject: &str,
    headers: Option<&HeaderMap>,
    payload: Bytes,
) -> Result<Envelope, Error> {
    let empty = HeaderMap::new();
    let map = headers.unwrap_or(&empty);
    let spec = required(map, CE_SPECVERSION)?;
    if spec != SPECVERSION {
        return Err(Error::InvalidText {
            field: CE_SPECVERSION.to_owned(),
            reason: "only CloudEvents 1.0 is understood",
        });
    }
    let id = match get(map, CE_ID) {
        Some(id) => id,
        None => get(map, NATS_MSG_ID).ok_or(Error::MissingHeader(CE_ID))?,
    };
    let trace = match get(map, TRACEPARENT) {
        Some(parent) => Some(TraceContext::new(
            parent,
            get(map, TRACESTATE).map(str::to_owned),
        )?),
        None => None,
    };
    let mut free = Headers::new();
    for (name, values) in map.iter() {
        let name: &str = name.as_ref();
        if is_reserved_name(name) {
            continue;
        }
        if let Some(value) = values.first() {
            free.insert(name, value.as_str())?;
        }
    }
    Ok(Envelope {
        id: MessageId::from_str(id)?,
        subject: Subject::new(subject)?,
        event_type: EventType::parse(required(map, CE_TYPE)?)?,
        source: HeaderText::new(CE_SOURCE, required(map, CE_SOURCE)?)?,
        partition_key: PartitionKey::new(required(map, CE_PARTITIONKEY)?)?,
        occurred_at: parse_time(required(map, CE_TIME)?)?,
        correlation_id: get(map, CE_CORRELATIONID)
            .map(|c| HeaderText::new(CE_CORRELATIONID, c))
            .transpose()?,
        causation_id: get(map, CE_CAUSATIONID)
            .map(MessageId::from_str)
            .transpose()?,
        trace,
        content_type: get(map, CONTENT_TYPE)
            .map(|c| HeaderText::new(CONTENT_TYPE, c))
            .transpose()?,
        headers: free,
        payload,
    })
}

/// Formats a time as RFC 3339, as written to `ce-time`.
pub fn format_time(t: OffsetDateTime) -> Result<String, Error> {
    t.format(&Rfc3339).map_err(|_| Error::InvalidTime {
        value: t.to_string(),
    })
}

fn parse_time(s: &str) -> Result<OffsetDateTime, Error> {
    OffsetDateTime::parse(s, &Rfc3339).map_err(|_| Error::InvalidTime { value: excerpt(s) })
}

fn put(map: &mut HeaderMap, name: &str, value: &str) -> Result<(), Error> {
    let header_name = HeaderName::from_str(name).map_err(|_| Error::InvalidHeaderName {
        name: excerpt(name),
        reason: "refused by the NATS client",
    })?;
    let header_value = HeaderValue::from_str(value).map_err(|_| Error::InvalidText {
        field: format!("header {:?}", excerpt(name)),
        reason: "refused by the NATS client",
    })?;
    map.insert(header_name, header_value);
    Ok(())
}

fn get<'a>(map: &'a HeaderMap, name: &'static str) -> Option<&'a str> {
    // `HeaderMap::get` with a `&str` key goes through a panicking conversion; these names
    // are constants known to be valid, but use the fallible path all the same.
    let key = HeaderName::from_str(name).ok()?;
    map.get(key).map(HeaderValue::as_str)
}

fn required<'a>(map: &'a HeaderMap, name: &'static str) -> Result<&'a str, Error> {
    get(map, name).ok_or(Error::MissingHeader(name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::headers::Headers;

    fn sample() -> Envelope {
        let mut headers = Headers::new();
        headers.insert("x-tenant", "acme").expect("valid");
        Envelope {
            id: MessageId::new(),
            subject: Subject::new("order.created.v1").expect("valid"),
            event_type: EventType::new("order.created", 1).expect("valid"),
            source: HeaderText::new("source", "order-service").expect("valid"),
            partition_key: PartitionKey::new("order-1").expect("valid"),
            occurred_at: OffsetDateTime::from_unix_timestamp_nanos(1_700_000_000_123_456_789)
                .expect("valid"),
            correlation_id: Some(HeaderText::new("c", "corr-1").expect("valid")),
            causation_id: Some(MessageId::new()),
            trace: Some(
                TraceContext::new(
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                    Some("a=b".into()),
                )
                .expect("valid"),
            ),
            content_type: Some(HeaderText::new("ct", "application/json").expect("valid")),
            headers,
            payload: Bytes::from_static(br#"{"a":1}"#),
        }
    }

    #[test]
    fn round_trips_every_field() {
        let env = sample();
        let map = to_headers(&env).expect("encodes");
        assert_eq!(
            map.get(NATS_MSG_ID).map(|v| v.as_str().to_owned()),
            Some(env.id.to_string())
        );
        let back =
            from_message(env.subject.as_str(), Some(&map), env.payload.clone()).expect("decodes");
        assert_eq!(back, env);
    }

    #[test]
    fn missing_metadata_is_a_typed_error() {
        let env = sample();
        for name in [CE_TYPE, CE_SOURCE, CE_TIME, CE_PARTITIONKEY, CE_SPECVERSION] {
            let mut map = to_headers(&env).expect("encodes");
            let mut stripped = HeaderMap::new();
            for (k, vs) in map.iter() {
                if k.to_string() != name {
                    for v in vs {
                        stripped.append(k.clone(), v.clone());
                    }
                }
            }
            map = stripped;
            assert_eq!(
                from_message("order.created.v1", Some(&map), Bytes::new()),
                Err(Error::MissingHeader(name))
            );
        }
        assert_eq!(
            from_message("order.created.v1", None, Bytes::new()),
            Err(Error::MissingHeader(CE_SPECVERSION))
        );
    }

    #[test]
    fn encoded_len_counts_the_wire_format() {
        let env = sample();
        let len = encoded_headers_len(&env).expect("encodes");
        let map = to_headers(&env).expect("encodes");
        let mut expected = String::from("NATS/1.0\r\n");
        for (k, vs) in map.iter() {
            for v in vs {
                expected.push_str(&format!("{}: {}\r\n", k, v));
            }
        }
        expected.push_str("\r\n");
        assert_eq!(len, expected.len());
    }
}
