//! Reconcile: after a broker data loss, republish the rows the stream no longer holds.
//!
//! For every row published since a point in time, the message stored at the row's recorded
//! stream sequence is fetched and its `Nats-Msg-Id` compared with the row's id. Sequence
//! numbers are never trusted alone: after a loss the stream can reuse them for other
//! messages. A row whose message is missing or different goes back to `pending`, and the
//! running relay publishes it again with the same id.

use async_nats::jetstream;
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use sqlx::PgPool;
use time::OffsetDateTime;

use crate::error::Error;

/// What reconcile found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Published rows examined.
    pub checked: u64,
    /// Rows whose message the stream still holds under the same id.
    pub present: u64,
    /// Rows sent back to `pending` (missing or replaced in the stream); with `dry_run`,
    /// rows that would be.
    pub republished: u64,
}

const PAGE: i64 = 1000;

/// Compares rows published since `since` with the stream `stream` and, unless `dry_run`,
/// sets the missing ones back to `pending`.
pub async fn reconcile(
    pool: &PgPool,
    context: &jetstream::Context,
    stream: &str,
    since: OffsetDateTime,
    dry_run: bool,
) -> Result<Report, Error> {
    let stream_handle = context
        .get_stream(stream)
        .await
        .map_err(|e| Error::Stream {
            stream: stream.to_owned(),
            reason: format!("looking it up: {e}"),
        })?;
    let mut report = Report::default();
    let mut after_seq = 0_i64;
    loop {
        let rows = {
            let mut conn = pool.acquire().await?;
            outbox::store::published_since(&mut conn, since, after_seq, PAGE).await?
        };
        let Some(last) = rows.last() else { break };
        after_seq = last.1;
        let mut missing = Vec::new();
        for (id, _seq, row_stream, stream_seq) in &rows {
            report.checked += 1;
            let held = match (row_stream.as_deref(), stream_seq) {
                (Some(s), Some(seq)) if s == stream && *seq > 0 => {
                    match stream_handle.get_raw_message(*seq as u64).await {
                        Ok(message) => message
                            .headers
                            .get(envelope::nats::NATS_MSG_ID)
                            .is_some_and(|v| v.as_str() == id.to_string()),
                        Err(e) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => {
                            false
                        }
                        Err(e) if matches!(&e.kind(), LastRawMessageErrorKind::JetStream(js) if js.error_code().0 == 10037) => {
                            false
                        }
                        Err(e) => {
                            return Err(Error::Stream {
                                stream: stream.to_owned(),
                                reason: format!("reading message {seq}: {e}"),
                            });
                        }
                    }
                }
                // Published to another stream: not ours to judge.
                (Some(_), Some(_)) => true,
                _ => false,
            };
            if held {
                report.present += 1;
            } else {
                missing.push(*id);
            }
        }
        if !missing.is_empty() {
            if dry_run {
                report.republished += missing.len() as u64;
            } else {
                let mut conn = pool.acquire().await?;
                report.republished += outbox::store::republish(&mut conn, &missing).await?;
            }
        }
        if (rows.len() as i64) < PAGE {
            break;
        }
    }
    Ok(report)
}
