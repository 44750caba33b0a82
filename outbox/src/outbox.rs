//! The enqueue API.

use envelope::{Envelope, Event, EventType, HeaderText, Headers, MessageId, PartitionKey, Subject};
use sqlx::PgConnection;
use time::OffsetDateTime;

use crate::config::{OutboxConfig, Storage};
use crate::error::Error;
use crate::message::{self, Message};
use crate::{store, trace};

/// The producer side: validates messages and writes them through the caller's connection,
/// as rows of `outbox_message` or, with [`Storage::Log`], as logical decoding messages.
///
/// # Guarantee
/// A message enqueued through a transaction becomes visible to the relay exactly when that
/// transaction commits, and never if it rolls back: the row (or log message) is written in
/// the caller's transaction. Through a plain connection (autocommit), it is visible when the call
/// returns. Messages of one partition key are published in the order their rows were
/// inserted. An `Err` means this call wrote nothing.
///
/// # Precondition for per-key order
/// Insert order is *commit* order for a key only if the transactions that enqueue messages of
/// that key are serialised: two transactions that insert rows of one key concurrently can
/// commit in the opposite order of their inserts, and the relay publishes by `seq`, the
/// insert order. Lock
/// what the key stands for first (the aggregate's row, `SELECT ... FOR UPDATE`, or
/// `pg_advisory_xact_lock` on the key) in every writer of that key, as an ordinary business
/// update of the aggregate already does.
///
/// `Outbox` is cheap to clone and holds no connection.
#[derive(Debug, Clone)]
pub struct Outbox {
    source: HeaderText,
    subject_prefix: Option<Subject>,
    max_message_bytes: usize,
    capture_trace_context: bool,
    storage: Storage,
}

impl Outbox {
    /// An outbox for the service `source` with the default configuration.
    pub fn new(source: &str) -> Result<Self, Error> {
        Outbox::with_config(OutboxConfig::for_source(source))
    }

    /// An outbox with a validated configuration.
    pub fn with_config(config: OutboxConfig) -> Result<Self, Error> {
        let (source, subject_prefix) = config.validated()?;
        Ok(Outbox {
            source,
            subject_prefix,
            max_message_bytes: config.max_message_bytes,
            capture_trace_context: config.capture_trace_context,
            storage: config.storage,
        })
    }

    /// Enqueues a typed event with default metadata; returns its id.
    pub async fn enqueue<E: Event>(
        &self,
        conn: &mut PgConnection,
        event: &E,
    ) -> Result<MessageId, Error> {
        self.enqueue_message(conn, Message::event(event)?).await
    }

    /// Enqueues one message (typed or raw, with metadata); returns its id.
    pub async fn enqueue_message(
        &self,
        conn: &mut PgConnection,
        message: Message,
    ) -> Result<MessageId, Error> {
        let envelope = self.prepare(message)?;
        match self.storage {
            Storage::Table => store::insert(conn, &envelope).await,
            Storage::Log => store::emit(conn, &[envelope::wal::encode(&envelope)?]).await,
        }
        .map_err(|e| store::classify(e, &[envelope.id]))?;
        Ok(envelope.id)
    }

    /// Enqueues several messages with one statement (an `INSERT`, or one emit for log
    /// storage), in order; returns their ids.
    /// Every message is validated first: if one is refused, none is written.
    pub async fn enqueue_many(
        &self,
        conn: &mut PgConnection,
        messages: impl IntoIterator<Item = Message>,
    ) -> Result<Vec<MessageId>, Error> {
        let envelopes = messages
            .into_iter()
            .map(|m| self.prepare(m))
            .collect::<Result<Vec<_>, _>>()?;
        if envelopes.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<MessageId> = envelopes.iter().map(|e| e.id).collect();
        match self.storage {
            Storage::Table => store::insert_many(conn, &envelopes).await,
            Storage::Log => store::emit(conn, &encode_all(&envelopes)?).await,
        }
        .map_err(|e| store::classify(e, &ids))?;
        Ok(ids)
    }

    /// Where this outbox writes.
    pub fn storage(&self) -> Storage {
        self.storage
    }

    /// Validates a message and turns it into the envelope that would be stored, without
    /// touching the database. Enqueue calls this; it is public for tests and tools.
    pub fn prepare(&self, message: Message) -> Result<Envelope, Error> {
        let subject = match message.subject {
            message::Subject::Derived(derived) => match &self.subject_prefix {
                Some(prefix) => Subject::with_prefix(prefix, &derived)?,
                None => derived,
            },
            message::Subject::Explicit(explicit) => Subject::new(explicit)?,
        };
        let trace = match message.trace {
            Some(trace) => Some(trace),
            None if self.capture_trace_context => trace::current(),
            None => None,
        };
        let envelope = Envelope {
            id: message.id.unwrap_or_default(),
            subject,
            event_type: EventType::parse(&message.event_type)?,
            source: self.source.clone(),
            partition_key: PartitionKey::new(message.partition_key)?,
            occurred_at: message.occurred_at.unwrap_or_else(OffsetDateTime::now_utc),
            correlation_id: message
                .correlation_id
                .map(|c| HeaderText::new("correlation id", c))
                .transpose()?,
            causation_id: message.causation_id,
            trace,
            content_type: message
                .content_type
                .map(|c| HeaderText::new("content type", c))
                .transpose()?,
            headers: Headers::try_from(message.headers)?,
            payload: message.payload,
        };
        let size = envelope::nats::encoded_headers_len(&envelope)? + envelope.payload.len();
        if size > self.max_message_bytes {
            return Err(Error::TooLarge {
                size,
                limit: self.max_message_bytes,
            });
        }
        Ok(envelope)
    }
}

/// The log storage's bytes of each envelope ([`envelope::wal`]).
pub(crate) fn encode_all(envelopes: &[Envelope]) -> Result<Vec<Vec<u8>>, Error> {
    Ok(envelopes
        .iter()
        .map(envelope::wal::encode)
        .collect::<Result<_, _>>()?)
}
