//! Statements with their values written in as literals, for the enqueue that rides with
//! `COMMIT` ([`OutboxTransaction`](crate::OutboxTransaction)): the simple query protocol
//! that carries several statements in one round trip takes no parameters.
//!
//! Injection-proof by construction: no text of a message is ever written into the SQL as
//! text. Strings, JSON and bytes go in as base64 literals decoded by the server
//! (`decode('..', 'base64')`, whose alphabet has no quote or backslash); ids as the hex
//! form of a UUID this crate formatted; times as integers this crate computed.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use envelope::Envelope;

use super::COLUMNS;
use crate::config::Storage;
use crate::error::Error;

/// The enqueues of one transaction as SQL, built as they come: a multi-row
/// `INSERT INTO outbox_message` (rows in order, so `seq` follows it) for table storage; for
/// log storage, one `pg_logical_emit_message(..)` statement per message, in order, the first
/// gated by the log storage's guard ([`log_guard`]).
#[derive(Debug)]
pub(crate) struct Batch {
    storage: Storage,
    sql: String,
    /// Log storage: where the first statement ends, for [`log_guard`].
    first_end: usize,
}

impl Batch {
    pub(crate) fn new(storage: Storage) -> Self {
        Batch {
            storage,
            sql: String::new(),
            first_end: 0,
        }
    }

    /// Adds one validated envelope. An `Err` (a field too long for the log format) adds
    /// nothing.
    pub(crate) fn push(&mut self, env: &Envelope) -> Result<(), Error> {
        match self.storage {
            Storage::Table => {
                let item = row(env);
                if self.sql.is_empty() {
                    self.sql = format!("INSERT INTO outbox_message ({COLUMNS}) VALUES ");
                } else {
                    self.sql.push(',');
                }
                self.sql.push_str(&item);
            }
            Storage::Log => {
                let item = bytes(&envelope::wal::encode(env)?);
                if !self.sql.is_empty() {
                    self.sql.push(';');
                }
                self.sql.push_str(&format!(
                    "SELECT pg_logical_emit_message(true,'{}',{item})",
                    envelope::wal::PREFIX
                ));
                if self.first_end == 0 {
                    self.first_end = self.sql.len();
                }
            }
        }
        Ok(())
    }

    /// The SQL, or `None` when nothing was pushed. `now` is the time the log storage's
    /// guard is checked against.
    pub(crate) fn finish(mut self, now: SystemTime) -> Option<String> {
        if self.sql.is_empty() {
            return None;
        }
        if self.storage == Storage::Log {
            self.sql.insert_str(self.first_end, &log_guard(now));
        }
        Some(self.sql)
    }
}

/// How long a session skips the log storage's checks after they passed.
pub(crate) const LOG_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// The `WHERE` clause of the first emit of a log batch: true while this session's note of
/// a passed check (`outbox.emit_checked_until`, set by `outbox_emit_check`, migration 0016)
/// lies between `now` and `now` plus [`LOG_CHECK_INTERVAL`] (a note further ahead, from a
/// clock stepped back, another client of a pooled connection or a hand-set value, does not
/// count); otherwise the checks run (`wal_level` is `logical`, a slot reads the
/// database: else an error aborts the transaction) and note `now` plus
/// [`LOG_CHECK_INTERVAL`]. Both times are this process's clock, written as 20 digits of
/// microseconds since 1970 and compared bytewise: the server never interprets them, so
/// neither its clock nor its `DateStyle` or `TimeZone` matters. A one-time filter in
/// PostgreSQL's plan: evaluated once, before the message is emitted.
fn log_guard(now: SystemTime) -> String {
    let micros = |t: SystemTime| {
        t.duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros())
            .min(u128::from(u64::MAX))
    };
    format!(
        " WHERE coalesce(current_setting('outbox.emit_checked_until',true) COLLATE \"C\" BETWEEN '{0:020}' AND '{1:020}',false) OR outbox_emit_check('{1:020}')",
        micros(now),
        micros(now + LOG_CHECK_INTERVAL)
    )
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
    fn a_log_batch_emits_in_order_and_guards_its_first_emit_only() {
        let message = |key: &str| {
            crate::Outbox::with_config(crate::OutboxConfig {
                storage: Storage::Log,
                ..crate::OutboxConfig::for_source("test")
            })
            .expect("config")
            .prepare(crate::Message::raw(
                "orders.created",
                "order.created.v1",
                key,
                b"'); DROP TABLE orders; --".to_vec(),
            ))
            .expect("valid")
        };
        let mut batch = Batch::new(Storage::Log);
        batch.push(&message("k'1")).expect("push");
        batch.push(&message("k'2")).expect("push");
        let now = UNIX_EPOCH + Duration::from_micros(1_796_348_227_222_851);
        let sql = batch.finish(now).expect("sql");
        let statements: Vec<&str> = sql.split(';').collect();
        assert_eq!(statements.len(), 2, "{sql}");
        assert!(
            statements[0].ends_with(
                " WHERE coalesce(current_setting('outbox.emit_checked_until',true) COLLATE \"C\" BETWEEN '00001796348227222851' AND '00001796348228222851',false) OR outbox_emit_check('00001796348228222851')"
            ),
            "{sql}"
        );
        assert!(!statements[1].contains("WHERE"), "{sql}");
        for statement in statements {
            assert!(
                statement.starts_with("SELECT pg_logical_emit_message(true,'outbox',decode('"),
                "{statement}"
            );
        }
        assert!(!sql.contains("DROP") && !sql.contains("k'"), "{sql}");
    }

    #[test]
    fn empty_batches_write_no_statement() {
        assert_eq!(Batch::new(Storage::Table).finish(SystemTime::now()), None);
        assert_eq!(Batch::new(Storage::Log).finish(SystemTime::now()), None);
    }
}
