//! The dead-letter store: messages that could not be published (by the relay) or handled (by
//! a consumer), parked with their reason, error chain and original bytes, never lost.
//!
//! # Layout
//! - [`store`]: all SQL on `dead_letter`; [`store::record`] parks a message, in the caller's
//!   transaction, so that moving a message here and removing it from where it was commit
//!   together.
//! - [`reason`]: the `dead_letter.reason` values the toolkit writes, as constants.
//! - [`DeadLetter`]: a parked message as written; [`Source`]: who parked it.
//! - [`retry_to_outbox`]: a relay dead letter goes back to the outbox.
//! - [`display`]: dead-letter text made inert for a terminal or a page (control and
//!   invisible characters shown as escapes).
//! - [`actions`]: retry and purge as the CLI and the console do them (same checks, one
//!   transaction each).
//!
//! The `dlq` binary (`src/main.rs`) lists, shows, retries, purges and counts dead letters.
//! Retry semantics: a consumer's dead letter is marked `retry_requested` and re-run by that
//! consumer's own runtime from the parked bytes (exactly once, in one transaction with its
//! new status; no other consumer sees it again, however long after the original publish);
//! a relay dead letter returns to the outbox with its original id.

pub mod actions;
pub mod display;
pub mod reason;
pub mod store;

use serde::Serialize;

/// Who failed to deliver a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Source {
    /// The relay could not publish an outbox row.
    Relay,
    /// A consumer's handler could not process a delivered message.
    Consumer,
}

impl Source {
    /// The value stored in `dead_letter.source`.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Relay => "relay",
            Source::Consumer => "consumer",
        }
    }
}

/// A message to park, with why it failed.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// Who failed to deliver it.
    pub source: Source,
    /// The consumer whose handler failed, or the relay's name.
    pub consumer: String,
    /// The message id (`ce-id` / `Nats-Msg-Id`).
    pub message_id: String,
    /// The subject it was (to be) published on.
    pub subject: String,
    /// Its partition key, if known.
    pub partition_key: Option<String>,
    /// All its headers as name to value.
    pub headers: serde_json::Map<String, serde_json::Value>,
    /// The original payload bytes.
    pub payload: Vec<u8>,
    /// A short machine-readable cause: one of [`reason`]'s constants (e.g. `no_stream`,
    /// `decode`, `attempts_exhausted`) or a handler's own.
    pub reason: String,
    /// The error and its causes, outermost first.
    pub error_chain: Vec<String>,
    /// How many delivery attempts were made.
    pub attempts: i32,
    /// Where the broker stored it, if it was stored.
    pub stream: Option<String>,
    /// The stream sequence, if it was stored.
    pub stream_seq: Option<i64>,
}

/// The error chain of any error, outermost first, for [`DeadLetter::error_chain`].
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> Vec<String> {
    let mut chain = vec![error.to_string()];
    let mut source = error.source();
    while let Some(cause) = source {
        chain.push(cause.to_string());
        source = cause.source();
    }
    chain
}

/// NATS headers as stored in `dead_letter.headers`: name to the first value.
pub fn headers_to_json(map: &async_nats::HeaderMap) -> serde_json::Map<String, serde_json::Value> {
    map.iter()
        .filter_map(|(name, values)| {
            let value = values.first()?.as_str().to_owned();
            Some((name.to_string(), serde_json::Value::String(value)))
        })
        .collect()
}

impl store::Stored {
    /// The parked message as an envelope, from its subject, stored headers and bytes (headers
    /// the NATS client would refuse are skipped); fails as decoding a received message does.
    pub fn envelope(&self) -> Result<envelope::Envelope, envelope::Error> {
        use std::str::FromStr;
        let mut map = async_nats::HeaderMap::new();
        for (name, value) in self.headers.as_object().into_iter().flatten() {
            let parsed = (
                async_nats::HeaderName::from_str(name),
                value.as_str().map(async_nats::HeaderValue::from_str),
            );
            if let (Ok(name), Some(Ok(value))) = parsed {
                map.insert(name, value);
            }
        }
        envelope::nats::from_message(
            &self.subject,
            Some(&map),
            bytes::Bytes::from(self.payload.clone()),
        )
    }
}

/// Why a relay dead letter could not go back to the outbox.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RetryError {
    /// The parked headers and bytes do not make a valid message any more.
    #[error("dead letter {id} cannot be rebuilt into a message: {reason}")]
    Invalid {
        /// The dead letter.
        id: i64,
        /// What is wrong.
        reason: String,
    },
    /// Another retry of it committed first: nothing was done.
    #[error("dead letter {0} was retried meanwhile: nothing done")]
    AlreadyRetried(i64),
    /// The database failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

/// Sends a relay dead letter back to the outbox with its original id, and marks it
/// `retried`, in the caller's transaction: the relay publishes it again.
pub async fn retry_to_outbox(
    conn: &mut sqlx::PgConnection,
    letter: &store::Stored,
) -> Result<(), RetryError> {
    let envelope = letter.envelope().map_err(|e| RetryError::Invalid {
        id: letter.id,
        reason: e.to_string(),
    })?;
    // Marked first, and only if still dead: of two retries at once, the second waits for
    // the first's row lock, finds it retried and inserts nothing (no second publish).
    if !store::mark_dead_retried(conn, letter.id).await? {
        return Err(RetryError::AlreadyRetried(letter.id));
    }
    outbox::store::insert(conn, &envelope).await?;
    Ok(())
}
