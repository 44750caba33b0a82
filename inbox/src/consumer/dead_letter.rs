//! Parking a message in `dead_letter`, inside a savepoint of its transaction, with its inbox
//! row marking it resolved.

use async_nats::jetstream;
use outbox::deadline::is_timeout;
use sqlx::{Acquire, PgConnection};

use super::Consumer;
use super::transaction::Reply;
use crate::metrics as m;
use crate::store;

/// Why a message goes to `dead_letter`.
pub(super) struct Park {
    pub(super) reason: String,
    pub(super) error_chain: Vec<String>,
    /// The message's id, when it is parked before its handler could run but was decoded
    /// (`deliveries_exhausted`).
    pub(super) id: Option<String>,
}

/// The longest `Nats-Msg-Id` used as a parked message's id; a longer one is replaced by
/// `stream:sequence`.
const MAX_BROKER_ID_BYTES: usize = 256;

impl Consumer {
    /// Parks a message that [`Consumer::read`] refused, through `conn`.
    pub(super) async fn park_unread(
        &self,
        conn: &mut PgConnection,
        message: &jetstream::Message,
        park: Park,
    ) -> Result<Reply, sqlx::Error> {
        let stream_seq = message.info().ok().map(|i| i.stream_sequence);
        let id = park.id.clone();
        // An undecodable message ran its (decoding) attempt once; one parked by the safety
        // limit none.
        let attempt = u32::from(id.is_none());
        self.park(conn, message, id.as_deref(), attempt, stream_seq, park)
            .await
    }

    /// Parks the message (see [`Consumer::park_in`]) in a savepoint of `conn`'s transaction
    /// and returns `Term` (or `Ack` if the message turned out to be resolved already). If the database refuses the dead letter, the savepoint is rolled
    /// back, the error logged and counted, and the message NAKed with the longest retry
    /// delay instead, so that one unstorable dead letter cannot fail the other messages of
    /// its transaction; an error that leaves the transaction unusable is returned.
    pub(super) async fn park(
        &self,
        conn: &mut PgConnection,
        message: &jetstream::Message,
        id: Option<&str>,
        attempt: u32,
        stream_seq: Option<u64>,
        park: Park,
    ) -> Result<Reply, sqlx::Error> {
        let mut savepoint = self.db(conn.begin()).await?;
        let reason = park.reason.clone();
        match self
            .db(self.park_in(&mut savepoint, message, id, attempt, stream_seq, park))
            .await
        {
            Ok(true) => {
                self.db(savepoint.commit()).await?;
                Ok(Reply::Term)
            }
            Ok(false) => {
                self.db(savepoint.commit()).await?;
                Ok(Reply::Ack)
            }
            // No answer: the connection is closed, as for any database failure.
            Err(e) if is_timeout(&e) => Err(e),
            Err(e) => {
                self.db(savepoint.rollback()).await?;
                tracing::error!(consumer = %self.config.name, subject = %message.subject, %reason, error = %e, "cannot write the dead letter; the message will be redelivered");
                metrics::counter!(m::DEAD_LETTER_WRITE_FAILURES, "consumer" => self.config.name.clone())
                    .increment(1);
                Ok(Reply::Nak(self.config.retry_max_delay))
            }
        }
    }

    /// Writes an inbox row marking the message resolved, so that redeliveries are
    /// acknowledged without running the handler, then the dead letter, and forgets its
    /// attempts; returns true. The inbox row comes first: if one exists (or is being
    /// written: the insert waits for that transaction), the message was processed or parked
    /// meanwhile, e.g. by another instance that got it redelivered while this one's handler
    /// ran past `ack_wait` and failed; then no dead letter is written (a `dlq retry` of it
    /// would apply the message a second time) and false is returned, for an ack.
    async fn park_in(
        &self,
        conn: &mut PgConnection,
        message: &jetstream::Message,
        id: Option<&str>,
        attempt: u32,
        stream_seq: Option<u64>,
        park: Park,
    ) -> Result<bool, sqlx::Error> {
        let headers = message
            .headers
            .as_ref()
            .map(dlq::headers_to_json)
            .unwrap_or_default();
        let message_id = id
            .map(str::to_owned)
            .or_else(|| {
                // A broker id longer than any id the toolkit writes is not used as the key
                // of the inbox and dead-letter rows (it could exceed an index entry).
                headers
                    .get(envelope::nats::NATS_MSG_ID)
                    .and_then(|v| v.as_str())
                    .filter(|v| v.len() <= MAX_BROKER_ID_BYTES)
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| format!("{}:{}", self.config.stream, stream_seq.unwrap_or(0)));
        let partition_key = headers
            .get(envelope::nats::CE_PARTITIONKEY)
            .and_then(|v| v.as_str())
            .map(str::to_owned);
        let seq = stream_seq.and_then(|s| i64::try_from(s).ok());
        let letter = dlq::DeadLetter {
            source: dlq::Source::Consumer,
            consumer: self.config.name.clone(),
            message_id: message_id.clone(),
            subject: message.subject.to_string(),
            partition_key,
            headers,
            payload: message.payload.to_vec(),
            reason: park.reason.clone(),
            error_chain: park.error_chain,
            attempts: i32::try_from(attempt).unwrap_or(i32::MAX),
            stream: Some(self.config.stream.clone()),
            stream_seq: seq,
        };
        if !store::insert_if_new(
            conn,
            &self.config.name,
            &message_id,
            message.subject.as_str(),
            seq,
            store::Outcome::DeadLettered,
        )
        .await?
        {
            tracing::info!(consumer = %self.config.name, id = %message_id, reason = %park.reason, "not dead-lettering a message that was resolved meanwhile (processed or parked, e.g. by another instance)");
            metrics::counter!(m::DUPLICATES, "consumer" => self.config.name.clone()).increment(1);
            return Ok(false);
        }
        dlq::store::record(conn, &letter).await?;
        if id.is_some() {
            store::forget_attempts(conn, &self.config.name, &message_id).await?;
        }
        metrics::counter!(m::DEAD_LETTERED, "consumer" => self.config.name.clone(), "reason" => park.reason).increment(1);
        Ok(true)
    }
}
