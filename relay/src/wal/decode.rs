//! What the replication stream carries, turned into outbox messages.
//!
//! Two kinds of record are outbox messages: a transactional logical decoding message whose
//! prefix is exactly [`envelope::wal::PREFIX`] (log storage), and a `pgoutput` INSERT into
//! `outbox_message` (table storage, column values in binary format). Each becomes a
//! [`Decoded`]: a valid envelope, a poison message to dead-letter (its bytes kept), or a
//! log message of a format version this relay does not know, which must stop the relay
//! *before* its transaction is confirmed: a newer producer wrote it, and a newer relay will
//! read it.

use std::collections::HashMap;

use envelope::Envelope;
use outbox::store::ClaimedRow;
use uuid::Uuid;

/// One outbox message read from the log.
#[derive(Debug)]
pub(crate) enum Decoded {
    /// Valid: publish it. `row` is the table row's id when it came from an INSERT (to be
    /// deleted once its transaction is confirmed).
    Envelope {
        envelope: Box<Envelope>,
        row: Option<Uuid>,
    },
    /// Can never be published: dead-letter it with the reason and keep its bytes.
    Poison(Box<Poison>),
}

/// A message that cannot be published, as much of it as could be read.
#[derive(Debug, Clone)]
pub(crate) struct Poison {
    /// The message id when it could be read, else `lsn:<position>`.
    pub(crate) message_id: String,
    pub(crate) subject: String,
    pub(crate) partition_key: Option<String>,
    pub(crate) headers: serde_json::Map<String, serde_json::Value>,
    /// The payload, or the whole log message when it could not be split.
    pub(crate) payload: Vec<u8>,
    pub(crate) error: String,
    pub(crate) row: Option<Uuid>,
}

/// A log message this relay cannot read because a newer format wrote it.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "the outbox message at {lsn} is in log format version {version}; this relay reads version {}: upgrade the relay (nothing past it is confirmed)",
    envelope::wal::VERSION
)]
pub(crate) struct UnknownVersion {
    pub(crate) lsn: String,
    pub(crate) version: u8,
}

/// Reads one logical decoding message with the outbox prefix.
pub(crate) fn log_message(content: &[u8], lsn: &str) -> Result<Decoded, UnknownVersion> {
    use envelope::wal::{MAGIC, VERSION};
    if content.len() >= 4 && content.starts_with(MAGIC) && content[3] != VERSION {
        return Err(UnknownVersion {
            lsn: lsn.to_owned(),
            version: content[3],
        });
    }
    Ok(match envelope::wal::decode(content) {
        Ok(envelope) => Decoded::Envelope {
            envelope: Box::new(envelope),
            row: None,
        },
        Err(e) => {
            let message_id = content
                .get(4..20)
                .filter(|_| content.starts_with(MAGIC))
                .and_then(|id| Uuid::from_slice(id).ok())
                .map_or_else(|| format!("lsn:{lsn}"), |id| id.to_string());
            Decoded::Poison(Box::new(Poison {
                message_id,
                subject: String::new(),
                partition_key: None,
                headers: serde_json::Map::new(),
                payload: content.to_vec(),
                error: format!("the log message cannot be read: {e}"),
                row: None,
            }))
        }
    })
}

/// The relations (tables) the stream has described, by oid: `pgoutput` sends a Relation
/// record before the first change of a table in a session, and again when it changes.
#[derive(Debug, Default)]
pub(crate) struct Relations {
    outbox: HashMap<u32, Vec<String>>,
}

/// A `pgoutput` record this relay does not understand.
#[derive(Debug, Clone, thiserror::Error)]
#[error("malformed pgoutput record ({0})")]
pub(crate) struct Malformed(&'static str);

impl Relations {
    /// Reads one `pgoutput` record of the stream (not Begin, Commit or Message, which the
    /// replication client parses): a Relation is remembered, an INSERT into
    /// `outbox_message` is returned, anything else is `None`.
    pub(crate) fn record(&mut self, data: &[u8]) -> Result<Option<Decoded>, Malformed> {
        let mut r = Reader(data);
        match r.u8()? {
            b'R' => {
                let oid = r.u32()?;
                let _namespace = r.cstr()?;
                let name = r.cstr()?;
                let _identity = r.u8()?;
                let count = r.u16()?;
                let mut columns = Vec::with_capacity(usize::from(count));
                for _ in 0..count {
                    let _flags = r.u8()?;
                    columns.push(r.cstr()?.to_owned());
                    let _type = r.u32()?;
                    let _modifier = r.u32()?;
                }
                if name == "outbox_message" {
                    self.outbox.insert(oid, columns);
                } else {
                    self.outbox.remove(&oid);
                }
                Ok(None)
            }
            b'I' => {
                let oid = r.u32()?;
                let Some(columns) = self.outbox.get(&oid) else {
                    return Ok(None);
                };
                if r.u8()? != b'N' {
                    return Err(Malformed("INSERT without a new tuple"));
                }
                let values = r.tuple()?;
                if values.len() != columns.len() {
                    return Err(Malformed(
                        "INSERT with another column count than its relation",
                    ));
                }
                let row: HashMap<&str, Option<&[u8]>> =
                    columns.iter().map(String::as_str).zip(values).collect();
                Ok(Some(table_row(&row)))
            }
            _ => Ok(None),
        }
    }
}

/// An `outbox_message` row from its binary column values.
fn table_row(row: &HashMap<&str, Option<&[u8]>>) -> Decoded {
    let id = column(row, "id").and_then(|b| Uuid::from_slice(b).ok());
    match claimed_row(row) {
        Ok(claimed) => match claimed.to_envelope() {
            Ok(envelope) => Decoded::Envelope {
                envelope: Box::new(envelope),
                row: Some(claimed.id),
            },
            Err(e) => poison_row(
                row,
                id,
                format!("the outbox row is not a valid message: {e}"),
            ),
        },
        Err(what) => poison_row(row, id, format!("the outbox row cannot be read: {what}")),
    }
}

fn poison_row(row: &HashMap<&str, Option<&[u8]>>, id: Option<Uuid>, error: String) -> Decoded {
    let text = |name| column(row, name).map(|b| String::from_utf8_lossy(b).into_owned());
    let headers = column(row, "headers")
        .and_then(|b| b.get(1..))
        .and_then(|json| serde_json::from_slice::<serde_json::Value>(json).ok())
        .and_then(|v| v.as_object().cloned())
        .unwrap_or_default();
    Decoded::Poison(Box::new(Poison {
        message_id: id.map_or_else(|| "unknown".to_owned(), |id| id.to_string()),
        subject: text("subject").unwrap_or_default(),
        partition_key: text("partition_key"),
        headers,
        payload: column(row, "payload").unwrap_or_default().to_vec(),
        error,
        row: id,
    }))
}

fn column<'a>(row: &HashMap<&str, Option<&'a [u8]>>, name: &str) -> Option<&'a [u8]> {
    row.get(name).copied().flatten()
}

/// The row's columns in their binary send formats: uuid (16 bytes), text (UTF-8),
/// timestamptz (microseconds since 2000-01-01), jsonb (version 1 then the text), bytea.
fn claimed_row(row: &HashMap<&str, Option<&[u8]>>) -> Result<ClaimedRow, &'static str> {
    let required = |name: &'static str| column(row, name).ok_or(name);
    let text = |name: &'static str| -> Result<Option<String>, &'static str> {
        column(row, name)
            .map(|b| String::from_utf8(b.to_vec()).map_err(|_| name))
            .transpose()
    };
    let required_text = |name: &'static str| text(name).and_then(|value| value.ok_or(name));
    let uuid = |bytes: &[u8], name| Uuid::from_slice(bytes).map_err(|_| name);
    let micros = i64::from_be_bytes(
        required("occurred_at")?
            .try_into()
            .map_err(|_| "occurred_at")?,
    );
    // 2000-01-01T00:00:00Z is 946 684 800 s after 1970.
    let occurred_at = time::OffsetDateTime::from_unix_timestamp_nanos(
        (i128::from(micros) + 946_684_800_000_000) * 1_000,
    )
    .map_err(|_| "occurred_at")?;
    let headers = match required("headers")? {
        [1, json @ ..] => serde_json::from_slice(json).map_err(|_| "headers")?,
        _ => return Err("headers"),
    };
    Ok(ClaimedRow {
        id: uuid(required("id")?, "id")?,
        seq: 0,
        subject: required_text("subject")?,
        event_type: required_text("event_type")?,
        source: required_text("source")?,
        partition_key: required_text("partition_key")?,
        occurred_at,
        correlation_id: text("correlation_id")?,
        causation_id: column(row, "causation_id")
            .map(|b| uuid(b, "causation_id"))
            .transpose()?,
        traceparent: text("traceparent")?,
        tracestate: text("tracestate")?,
        content_type: text("content_type")?,
        headers,
        payload: required("payload")?.to_vec(),
        attempts: 0,
        permanent_failures: 0,
    })
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        if self.0.len() < n {
            return Err(Malformed("truncated"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, Malformed> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, Malformed> {
        Ok(u16::from_be_bytes([self.u8()?, self.u8()?]))
    }

    fn u32(&mut self) -> Result<u32, Malformed> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn cstr(&mut self) -> Result<&'a str, Malformed> {
        let nul = self
            .0
            .iter()
            .position(|&b| b == 0)
            .ok_or(Malformed("unterminated name"))?;
        let s = std::str::from_utf8(&self.0[..nul]).map_err(|_| Malformed("name not UTF-8"))?;
        self.0 = &self.0[nul + 1..];
        Ok(s)
    }

    /// TupleData: a column count, then per column `n` (null), `u` (unchanged TOAST, never
    /// in an INSERT), or `t`/`b` with a length and the value.
    fn tuple(&mut self) -> Result<Vec<Option<&'a [u8]>>, Malformed> {
        let count = self.u16()?;
        let mut values = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            match self.u8()? {
                b'n' => values.push(None),
                b't' | b'b' => {
                    let len = self.u32()? as usize;
                    values.push(Some(self.take(len)?));
                }
                _ => return Err(Malformed("unexpected column kind")),
            }
        }
        Ok(values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relation(oid: u32, name: &str, columns: &[&str]) -> Vec<u8> {
        let mut r = vec![b'R'];
        r.extend_from_slice(&oid.to_be_bytes());
        r.extend_from_slice(b"public\0");
        r.extend_from_slice(name.as_bytes());
        r.push(0);
        r.push(b'd');
        r.extend_from_slice(&(columns.len() as u16).to_be_bytes());
        for c in columns {
            r.push(0);
            r.extend_from_slice(c.as_bytes());
            r.push(0);
            r.extend_from_slice(&25u32.to_be_bytes());
            r.extend_from_slice(&(-1i32).to_be_bytes());
        }
        r
    }

    fn insert(oid: u32, values: &[Option<&[u8]>]) -> Vec<u8> {
        let mut r = vec![b'I'];
        r.extend_from_slice(&oid.to_be_bytes());
        r.push(b'N');
        r.extend_from_slice(&(values.len() as u16).to_be_bytes());
        for v in values {
            match v {
                None => r.push(b'n'),
                Some(v) => {
                    r.push(b'b');
                    r.extend_from_slice(&(v.len() as u32).to_be_bytes());
                    r.extend_from_slice(v);
                }
            }
        }
        r
    }

    const COLUMNS: [&str; 14] = [
        "id",
        "seq",
        "subject",
        "event_type",
        "source",
        "partition_key",
        "occurred_at",
        "correlation_id",
        "causation_id",
        "traceparent",
        "tracestate",
        "content_type",
        "headers",
        "payload",
    ];

    #[test]
    fn an_outbox_insert_becomes_its_envelope_and_other_tables_are_ignored() {
        let mut relations = Relations::default();
        assert!(
            relations
                .record(&relation(7, "outbox_message", &COLUMNS))
                .expect("R")
                .is_none()
        );
        assert!(
            relations
                .record(&relation(8, "orders", &["id"]))
                .expect("R")
                .is_none()
        );
        let id = Uuid::now_v7();
        // 2000-01-01 plus one second and 5 µs.
        let micros = 1_000_005i64.to_be_bytes();
        let headers = b"\x01{\"x-tenant\": \"acme\"}";
        let values: Vec<Option<&[u8]>> = vec![
            Some(id.as_bytes()),
            Some(&[0, 0, 0, 0, 0, 0, 0, 1]),
            Some(b"orders.created"),
            Some(b"order.created.v1"),
            Some(b"svc"),
            Some(b"o-1"),
            Some(&micros),
            None,
            None,
            None,
            None,
            None,
            Some(headers),
            Some(b"{}"),
        ];
        match relations.record(&insert(7, &values)).expect("I") {
            Some(Decoded::Envelope { envelope, row }) => {
                assert_eq!(row, Some(id));
                assert_eq!(envelope.id.as_uuid(), id);
                assert_eq!(envelope.partition_key.as_str(), "o-1");
                assert_eq!(envelope.headers.get("x-tenant"), Some("acme"));
                assert_eq!(envelope.occurred_at.unix_timestamp(), 946_684_801);
                assert_eq!(envelope.occurred_at.microsecond(), 5);
            }
            other => panic!("expected an envelope, got {other:?}"),
        }
        assert!(
            relations
                .record(&insert(8, &[Some(b"x")]))
                .expect("I")
                .is_none()
        );
        // An invalid subject is poison with the row's id and bytes kept.
        let mut bad = values.clone();
        bad[2] = Some(b"orders.*");
        match relations.record(&insert(7, &bad)).expect("I") {
            Some(Decoded::Poison(p)) => {
                assert_eq!(p.message_id, id.to_string());
                assert_eq!(p.row, Some(id));
                assert_eq!(p.payload, b"{}");
                assert_eq!(
                    p.headers.get("x-tenant").and_then(|v| v.as_str()),
                    Some("acme")
                );
            }
            other => panic!("expected poison, got {other:?}"),
        }
        // Truncated records are errors, never panics.
        let whole = insert(7, &values);
        for cut in 1..whole.len() {
            let _ = relations.record(&whole[..cut]);
        }
    }

    #[test]
    fn log_messages_decode_poison_or_stop_at_an_unknown_version() {
        let env = outbox::Outbox::new("svc")
            .expect("outbox")
            .prepare(outbox::Message::raw(
                "orders.created",
                "order.created.v1",
                "k",
                "{}",
            ))
            .expect("valid");
        let bytes = envelope::wal::encode(&env).expect("encode");
        assert!(matches!(
            log_message(&bytes, "0/1"),
            Ok(Decoded::Envelope { row: None, .. })
        ));
        let mut future = bytes.clone();
        future[3] = 2;
        let err = log_message(&future, "0/1").expect_err("version 2");
        assert_eq!(err.version, 2);
        let mut truncated = bytes.clone();
        truncated.truncate(30);
        match log_message(&truncated, "0/1") {
            Ok(Decoded::Poison(p)) => {
                assert_eq!(p.message_id, env.id.to_string());
                assert_eq!(p.payload, truncated);
            }
            other => panic!("expected poison, got {other:?}"),
        }
        match log_message(b"not ours", "0/2A") {
            Ok(Decoded::Poison(p)) => assert_eq!(p.message_id, "lsn:0/2A"),
            other => panic!("expected poison, got {other:?}"),
        }
    }
}
