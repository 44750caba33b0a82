//! The byte format of an envelope written to the write-ahead log.
//!
//! With the log storage, an outbox message is the content of a transactional logical
//! decoding message, `pg_logical_emit_message(true, 'outbox', <bytes>)`, and the WAL relay
//! reads it back from a replication slot. Producers in any language can write it: the
//! migrations ship a SQL function, `outbox_emit(...)`, that builds the same bytes.
//!
//! # Format, version 1
//! All integers are big-endian (what PostgreSQL's `int4send` and `int8send` write).
//!
//! | bytes | content |
//! |---|---|
//! | 4 | magic and version: `b"obx"` then `0x01` |
//! | 16 | message id, a UUID (`uuid_send`) |
//! | 8 | `occurred_at`, microseconds since 1970-01-01 UTC, signed |
//! | field | subject |
//! | field | event type, e.g. `order.created.v1` |
//! | field | source |
//! | field | partition key |
//! | field | correlation id, or null |
//! | field | causation id as 16 UUID bytes, or null |
//! | field | `traceparent`, or null |
//! | field | `tracestate`, or null |
//! | field | content type, or null |
//! | field | free-form headers, the text of a JSON object of strings (`{}` when none; any spacing) |
//! | field | payload |
//!
//! A *field* is a signed 32-bit length then that many bytes; length `-1` is null (no bytes
//! follow), as in PostgreSQL's binary protocol. Text is UTF-8. Nothing may follow the payload.
//! A reader refuses any other version, and validates every field as the table path does, so
//! a malformed message is a typed [`Error`], never a panic.

use bytes::Bytes;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::TraceContext;
use crate::error::Error;
use crate::{Envelope, EventType, HeaderText, Headers, MessageId, PartitionKey, Subject};

/// The logical decoding message prefix the outbox writes under.
pub const PREFIX: &str = "outbox";
/// The first three bytes of every version.
pub const MAGIC: &[u8; 3] = b"obx";
/// The version [`encode`] writes and [`decode`] reads.
pub const VERSION: u8 = 1;

/// Encodes an envelope in format version 1. `occurred_at` keeps whole microseconds (rounded
/// down), as a `timestamptz` column does. Fails only for a field of 2 GiB or more, which no
/// broker accepts.
pub fn encode(env: &Envelope) -> Result<Vec<u8>, Error> {
    let headers = env.headers.to_json().to_string();
    let mut out = Vec::with_capacity(128 + env.payload.len() + headers.len());
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.extend_from_slice(env.id.as_uuid().as_bytes());
    let micros = i64::try_from(env.occurred_at.unix_timestamp_nanos().div_euclid(1000))
        .map_err(|_| invalid("occurred_at is out of range".to_owned()))?;
    out.extend_from_slice(&micros.to_be_bytes());
    let event_type = env.event_type.to_string();
    let causation = env.causation_id.map(|c| *c.as_uuid().as_bytes());
    let fields: [Option<&[u8]>; 11] = [
        Some(env.subject.as_str().as_bytes()),
        Some(event_type.as_bytes()),
        Some(env.source.as_str().as_bytes()),
        Some(env.partition_key.as_str().as_bytes()),
        env.correlation_id.as_ref().map(|c| c.as_str().as_bytes()),
        causation.as_ref().map(|c| &c[..]),
        env.trace.as_ref().map(|t| t.traceparent().as_bytes()),
        env.trace
            .as_ref()
            .and_then(|t| t.tracestate())
            .map(str::as_bytes),
        env.content_type.as_ref().map(|c| c.as_str().as_bytes()),
        Some(headers.as_bytes()),
        Some(&env.payload),
    ];
    for value in fields {
        field(&mut out, value)?;
    }
    Ok(out)
}

fn field(out: &mut Vec<u8>, value: Option<&[u8]>) -> Result<(), Error> {
    match value {
        Some(v) => {
            let len = i32::try_from(v.len())
                .map_err(|_| invalid(format!("a field of {} bytes is too long", v.len())))?;
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(v);
        }
        None => out.extend_from_slice(&(-1i32).to_be_bytes()),
    }
    Ok(())
}

/// Decodes and validates a message written by [`encode`] or by `outbox_emit(...)`.
pub fn decode(bytes: &[u8]) -> Result<Envelope, Error> {
    let mut r = Reader { bytes, at: 0 };
    let magic = r.take(4, "magic")?;
    if &magic[..3] != MAGIC {
        return Err(invalid("does not start with \"obx\"".to_owned()));
    }
    if magic[3] != VERSION {
        return Err(invalid(format!(
            "format version {} (this reader knows {VERSION})",
            magic[3]
        )));
    }
    let id = uuid(r.take(16, "id")?);
    if id.is_nil() {
        return Err(invalid("nil message id".to_owned()));
    }
    let micros = i64::from_be_bytes(array(r.take(8, "occurred_at")?));
    let occurred_at = OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1000)
        .map_err(|_| invalid(format!("occurred_at {micros} µs is out of range")))?;
    let subject = Subject::new(r.text("subject")?)?;
    let event_type = EventType::parse(&r.text("event type")?)?;
    let source = HeaderText::new("source", r.text("source")?)?;
    let partition_key = PartitionKey::new(r.text("partition key")?)?;
    let correlation_id = r
        .nullable_text("correlation id")?
        .map(|c| HeaderText::new("correlation id", c))
        .transpose()?;
    let causation_id = match r.nullable("causation id")? {
        None => None,
        Some(b) if b.len() == 16 => Some(MessageId::from_uuid(uuid(b))),
        Some(b) => {
            return Err(invalid(format!(
                "causation id has {} bytes, not 16",
                b.len()
            )));
        }
    };
    let traceparent = r.nullable_text("traceparent")?;
    let tracestate = r.nullable_text("tracestate")?;
    let trace = match (traceparent, tracestate) {
        (Some(parent), state) => Some(TraceContext::new(parent, state)?),
        (None, None) => None,
        (None, Some(_)) => return Err(invalid("tracestate without traceparent".to_owned())),
    };
    let content_type = r
        .nullable_text("content type")?
        .map(|c| HeaderText::new("content type", c))
        .transpose()?;
    let headers = parse_headers(&r.text("headers")?)?;
    let payload = Bytes::copy_from_slice(
        r.nullable("payload")?
            .ok_or_else(|| invalid("payload is null".to_owned()))?,
    );
    if r.at != bytes.len() {
        return Err(invalid(format!(
            "{} bytes after the payload",
            bytes.len() - r.at
        )));
    }
    Ok(Envelope {
        id: MessageId::from_uuid(id),
        subject,
        event_type,
        source,
        partition_key,
        occurred_at,
        correlation_id,
        causation_id,
        trace,
        content_type,
        headers,
        payload,
    })
}

fn parse_headers(json: &str) -> Result<Headers, Error> {
    let value: serde_json::Value =
        serde_json::from_str(json).map_err(|e| invalid(format!("headers are not JSON: {e}")))?;
    Headers::from_json(&value)
}

fn invalid(reason: String) -> Error {
    Error::InvalidLogMessage { reason }
}

fn uuid(bytes: &[u8]) -> Uuid {
    Uuid::from_bytes(array(bytes))
}

fn array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes[..N]);
    out
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], Error> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| {
                invalid(format!(
                    "truncated at {what}: {n} bytes needed at offset {}, {} in all",
                    self.at,
                    self.bytes.len()
                ))
            })?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn nullable(&mut self, what: &str) -> Result<Option<&'a [u8]>, Error> {
        let len = i32::from_be_bytes(array(self.take(4, what)?));
        match len {
            -1 => Ok(None),
            n if n < 0 => Err(invalid(format!("{what} has length {n}"))),
            n => self.take(n as usize, what).map(Some),
        }
    }

    fn nullable_text(&mut self, what: &str) -> Result<Option<String>, Error> {
        self.nullable(what)?
            .map(|b| {
                String::from_utf8(b.to_vec()).map_err(|_| invalid(format!("{what} is not UTF-8")))
            })
            .transpose()
    }

    fn text(&mut self, what: &str) -> Result<String, Error> {
        self.nullable_text(what)?
            .ok_or_else(|| invalid(format!("{what} is null")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Envelope {
        let mut headers = Headers::new();
        headers.insert("x-tenant", "acme").expect("header");
        Envelope {
            id: MessageId::new(),
            subject: Subject::new("orders.created").expect("subject"),
            event_type: EventType::parse("order.created.v1").expect("type"),
            source: HeaderText::new("source", "order-service").expect("source"),
            partition_key: PartitionKey::new("o-1").expect("key"),
            occurred_at: OffsetDateTime::from_unix_timestamp(1_700_000_000).expect("time"),
            correlation_id: Some(HeaderText::new("correlation id", "c-1").expect("c")),
            causation_id: Some(MessageId::new()),
            trace: Some(
                TraceContext::new(
                    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                    Some("congo=t61rcWkgMzE".to_owned()),
                )
                .expect("trace"),
            ),
            content_type: Some(HeaderText::new("content type", "application/json").expect("ct")),
            headers,
            payload: Bytes::from_static(b"{\"order_id\":\"o-1\"}\x00\xff"),
        }
    }

    #[test]
    fn round_trips_every_field() {
        let env = sample();
        let decoded = decode(&encode(&env).expect("encodes")).expect("decodes");
        assert_eq!(decoded, env);
    }

    #[test]
    fn round_trips_absent_optionals() {
        let mut env = sample();
        env.correlation_id = None;
        env.causation_id = None;
        env.trace = None;
        env.content_type = None;
        env.headers = Headers::new();
        env.payload = Bytes::new();
        assert_eq!(
            decode(&encode(&env).expect("encodes")).expect("decodes"),
            env
        );
    }

    #[test]
    fn keeps_whole_microseconds_rounded_down_as_postgresql_stores_them() {
        let mut env = sample();
        for (nanos, micros) in [(1_999i128, 1i64), (-500, -1), (-1_000, -1), (0, 0)] {
            env.occurred_at = OffsetDateTime::from_unix_timestamp_nanos(nanos).expect("time");
            let bytes = encode(&env).expect("encodes");
            assert_eq!(bytes[20..28], micros.to_be_bytes(), "{nanos} ns");
            let decoded = decode(&bytes).expect("decodes");
            assert_eq!(
                decoded.occurred_at.unix_timestamp_nanos(),
                i128::from(micros) * 1000
            );
        }
    }

    #[test]
    fn refuses_other_versions_truncation_and_trailing_bytes() {
        let bytes = encode(&sample()).expect("encodes");
        let mut v2 = bytes.clone();
        v2[3] = 2;
        assert!(
            decode(&v2)
                .expect_err("version 2")
                .to_string()
                .contains("version 2")
        );
        for cut in [0, 3, 10, 27, 40, bytes.len() - 1] {
            assert!(
                matches!(decode(&bytes[..cut]), Err(Error::InvalidLogMessage { .. })),
                "cut at {cut}"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(
            decode(&longer)
                .expect_err("trailing byte")
                .to_string()
                .contains("after the payload")
        );
    }

    #[test]
    fn validates_fields_as_the_table_path_does() {
        let mut env = sample();
        env.payload = Bytes::from_static(b"x");
        let mut bytes = encode(&env).expect("encodes");
        // The subject starts after magic (4), id (16), time (8) and its length (4).
        bytes[32] = b' ';
        assert!(matches!(decode(&bytes), Err(Error::InvalidSubject { .. })));
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn never_panics_on_corrupted_messages(at in 0usize..200, value in proptest::num::u8::ANY) {
            let mut bytes = encode(&sample()).expect("encodes");
            let at = at % bytes.len();
            bytes[at] = value;
            let _ = decode(&bytes);
        }
    }
}
