//! Statements with their values written in as literals, for the enqueue that rides with
//! `COMMIT` ([`OutboxTransaction`](crate::OutboxTransaction)): the simple query protocol
//! that carries several statements in one round trip takes no parameters.
//!
//! Injection-proof by construction: no text of a message is ever written into the SQL as
//! text. Strings, JSON and bytes go in as base64 literals decoded by the server
//! (`decode('..', 'base64')`, whose alphabet has no quote or backslash); ids as the hex
//! form of a UUID this crate formatted; times as integers this crate computed.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use envelope::Envelope;

use super::COLUMNS;
use crate::config::Storage;
use crate::error::Error;

/// The enqueues of one transaction as one statement, built as they come: a multi-row
/// `INSERT INTO outbox_message` (rows in order, so `seq` follows it) for table storage, one
/// `outbox_emit_encoded(..)` call (messages in order) for log storage.
#[derive(Debug)]
pub(crate) struct Batch {
    storage: Storage,
    sql: String,
}

impl Batch {
    pub(crate) fn new(storage: Storage) -> Self {
        Batch {
            storage,
            sql: String::new(),
        }
    }

    /// Adds one validated envelope. An `Err` (a field too long for the log format) adds
    /// nothing.
    pub(crate) fn push(&mut self, env: &Envelope) -> Result<(), Error> {
        let item = match self.storage {
            Storage::Table => row(env),
            Storage::Log => bytes(&envelope::wal::encode(env)?),
        };
        let opening = match self.storage {
            Storage::Table => format!("INSERT INTO outbox_message ({COLUMNS}) VALUES "),
            Storage::Log => "SELECT outbox_emit_encoded(VARIADIC ARRAY[".to_owned(),
        };
        self.sql
            .push_str(if self.sql.is_empty() { &opening } else { "," });
        self.sql.push_str(&item);
        Ok(())
    }

    /// The statement, or `None` when nothing was pushed.
    pub(crate) fn finish(mut self) -> Option<String> {
        if self.sql.is_empty() {
            return None;
        }
        if self.storage == Storage::Log {
            self.sql.push_str("]::bytea[])");
        }
        Some(self.sql)
    }
}

/// The values of one row, in the order of [`COLUMNS`].
fn row(env: &Envelope) -> String {
    let values = [
        uuid(env.id.as_uuid()),
        text(env.subject.as_str()),
        text(&env.event_type.to_string()),
        text(env.source.as_str()),
        text(env.partition_key.as_str()),
        timestamp(env.occurred_at),
        optional(env.correlation_id.as_ref().map(|c| c.as_str()), text),
        optional(env.causation_id.map(|c| c.as_uuid()), uuid),
        optional(env.trace.as_ref().map(|t| t.traceparent()), text),
        optional(env.trace.as_ref().and_then(|t| t.tracestate()), text),
        optional(env.content_type.as_ref().map(|c| c.as_str()), text),
        format!("{}::jsonb", text(&env.headers.to_json().to_string())),
        bytes(&env.payload),
    ];
    format!("({})", values.join(","))
}

fn bytes(value: &[u8]) -> String {
    format!("decode('{}','base64')", STANDARD.encode(value))
}

fn text(value: &str) -> String {
    format!("convert_from({},'UTF8')", bytes(value.as_bytes()))
}

fn uuid(value: uuid::Uuid) -> String {
    // `Uuid`'s Display is 32 hex digits and four hyphens.
    format!("'{}'::uuid", value.hyphenated())
}

/// Exact to the microsecond, rounded down as the bound parameter of the per-statement path:
/// whole seconds through `to_timestamp` (exact for integers), then the microseconds.
fn timestamp(value: time::OffsetDateTime) -> String {
    let micros = value.unix_timestamp_nanos().div_euclid(1_000);
    let (seconds, micros) = (micros.div_euclid(1_000_000), micros.rem_euclid(1_000_000));
    format!("(to_timestamp({seconds})+{micros}*interval '1 microsecond')")
}

fn optional<T>(value: Option<T>, literal: impl Fn(T) -> String) -> String {
    value.map_or_else(|| "NULL".to_owned(), literal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_text_never_reaches_the_sql_as_text() {
        let hostile = "'); DROP TABLE outbox_message; -- \\ $$ \u{0}";
        let sql = text(hostile);
        assert!(!sql.contains("DROP") && !sql.contains("$$") && !sql.contains('\\'));
        // Only the quotes of the three literals: the base64, 'base64' and 'UTF8'.
        assert_eq!(sql.matches('\'').count(), 6, "{sql}");
    }

    #[test]
    fn timestamps_round_down_to_the_microsecond_before_and_after_1970() {
        let t = time::OffsetDateTime::from_unix_timestamp_nanos(-1_500).expect("time");
        assert_eq!(
            timestamp(t),
            "(to_timestamp(-1)+999998*interval '1 microsecond')"
        );
        let t = time::OffsetDateTime::from_unix_timestamp_nanos(1_000_002_999).expect("time");
        assert_eq!(timestamp(t), "(to_timestamp(1)+2*interval '1 microsecond')");
    }

    #[test]
    fn empty_batches_write_no_statement() {
        assert_eq!(Batch::new(Storage::Table).finish(), None);
        assert_eq!(Batch::new(Storage::Log).finish(), None);
    }
}
