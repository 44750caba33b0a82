//! The real publisher: NATS JetStream through async-nats.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_nats::Client;
use async_nats::jetstream::context::PublishErrorKind as NatsKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, stream};
pub use connect::{ConnectError, NatsConfig};
use envelope::Envelope;
use futures::FutureExt;

use super::{Ack, AckFuture, PublishError, PublishErrorKind, Publisher};
use crate::error::Error;

/// Publishes to JetStream with `Nats-Msg-Id`, many acks in flight.
#[derive(Debug, Clone)]
pub struct JetStreamPublisher {
    client: Client,
    context: jetstream::Context,
    timeout: Duration,
    confirmations: Confirmations,
}

/// Recent answers of [`confirm`] per subject, so that a burst of failed acks (every message
/// in flight during a leader election) asks the JetStream API about once a second, not once
/// per message. `true` means "no stream captures it" was confirmed.
type Confirmations = Arc<Mutex<HashMap<String, (Instant, bool)>>>;

/// How long a [`confirm`] answer is reused.
const CONFIRMATION_TTL: Duration = Duration::from_secs(1);

impl JetStreamPublisher {
    /// A publisher over a connected client; `publish_timeout` bounds each ack and
    /// `max_in_flight` the acks outstanding (publishing waits for room beyond it).
    pub fn new(client: Client, publish_timeout: Duration, max_in_flight: usize) -> Self {
        let context = jetstream::ContextBuilder::new()
            .timeout(publish_timeout)
            .ack_timeout(publish_timeout)
            .max_ack_inflight(max_in_flight)
            .backpressure_on_inflight(true)
            .build(client.clone());
        JetStreamPublisher {
            client,
            context,
            timeout: publish_timeout,
            confirmations: Confirmations::default(),
        }
    }

    /// The JetStream context (for stream management).
    pub fn context(&self) -> &jetstream::Context {
        &self.context
    }
}

impl Publisher for JetStreamPublisher {
    async fn publish(&self, envelope: &Envelope) -> Result<AckFuture, PublishError> {
        let headers = envelope::nats::to_headers(envelope)
            .map_err(|e| PublishError::with_source(PublishErrorKind::Rejected, e.to_string(), e))?;
        let message = PublishMessage::build()
            .headers(headers)
            .payload(envelope.payload.clone());
        let subject = envelope.subject.to_string();
        let send = self.context.send_publish(subject.clone(), message);
        let pending = match tokio::time::timeout(self.timeout, send).await {
            Ok(Ok(pending)) => pending,
            Ok(Err(e)) => {
                let error = classify(e);
                return Err(confirm(&self.context, &self.confirmations, &subject, error).await);
            }
            Err(_) => {
                return Err(PublishError::new(
                    PublishErrorKind::Unavailable,
                    "the connection did not accept the message in time",
                ));
            }
        };
        let timeout = self.timeout;
        let context = self.context.clone();
        let confirmations = self.confirmations.clone();
        Ok(async move {
            match tokio::time::timeout(timeout, pending.into_future()).await {
                Ok(Ok(ack)) => Ok(Ack {
                    stream: ack.stream,
                    sequence: ack.sequence,
                    duplicate: ack.duplicate,
                }),
                Ok(Err(e)) => Err(confirm(&context, &confirmations, &subject, classify(e)).await),
                Err(_) => Err(PublishError::new(
                    PublishErrorKind::Timeout,
                    "no PubAck in time",
                )),
            }
        }
        .boxed())
    }

    fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }
}

/// Confirms a `NoStream` failure before it counts as permanent: while a clustered stream
/// elects a new leader, publishes find no responder and async-nats reports "no stream", yet
/// the stream exists. When the JetStream API answers that no stream captures `subject` (or
/// refuses to answer, e.g. JetStream is not enabled), the failure stays `NoStream`; if a
/// stream does capture it, or the API does not answer within 2 s, it is `Unavailable`
/// (retried with backoff, without an attempt limit).
async fn confirm(
    context: &jetstream::Context,
    confirmations: &Confirmations,
    subject: &str,
    error: PublishError,
) -> PublishError {
    if error.kind != PublishErrorKind::NoStream {
        return error;
    }
    let recent = confirmations
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(subject)
        .filter(|(at, _)| at.elapsed() < CONFIRMATION_TTL)
        .map(|(_, missing)| *missing);
    let missing = match recent {
        Some(missing) => missing,
        None => {
            let missing = stream_is_missing(context, subject).await;
            let mut cache = confirmations.lock().unwrap_or_else(PoisonError::into_inner);
            if cache.len() > 10_000 {
                cache.clear();
            }
            cache.insert(subject.to_owned(), (Instant::now(), missing));
            missing
        }
    };
    if missing {
        error
    } else {
        let message = format!(
            "{} (a stream captures the subject, or the JetStream API did not answer: leader election?)",
            error.message
        );
        error.reclassified(PublishErrorKind::Unavailable, message)
    }
}

/// Whether the JetStream API confirms that no stream captures `subject` (see [`confirm`]).
async fn stream_is_missing(context: &jetstream::Context, subject: &str) -> bool {
    use async_nats::jetstream::context::GetStreamByNameErrorKind as Lookup;
    let lookup = tokio::time::timeout(Duration::from_secs(2), context.stream_by_subject(subject));
    match lookup.await {
        // The API answered: no stream captures the subject, or it refused the question (for
        // instance JetStream is not enabled for the account): retrying cannot help.
        Ok(Err(e)) => matches!(
            e.kind(),
            Lookup::NotFound | Lookup::InvalidSubject | Lookup::JetStream(_)
        ),
        // A stream captures it, or no answer in time: transient.
        Ok(Ok(_)) | Err(_) => false,
    }
}

fn classify(e: async_nats::jetstream::context::PublishError) -> PublishError {
    let message = {
        let mut text = e.to_string();
        if let Some(source) = std::error::Error::source(&e) {
            text = format!("{text}: {source}");
        }
        text
    };
    let kind = match e.kind() {
        NatsKind::StreamNotFound => PublishErrorKind::NoStream,
        NatsKind::MaxPayloadExceeded => PublishErrorKind::TooLarge,
        NatsKind::TimedOut => PublishErrorKind::Timeout,
        NatsKind::BrokenPipe | NatsKind::MaxAckPending => PublishErrorKind::Unavailable,
        NatsKind::Other => {
            let code = std::error::Error::source(&e)
                .and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>())
                .map(|js| js.error_code());
            match code {
                Some(c)
                    if c == async_nats::jetstream::ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM
                        || c == async_nats::jetstream::ErrorCode::STREAM_HEADER_EXCEEDS_MAXIMUM =>
                {
                    PublishErrorKind::TooLarge
                }
                Some(c) if c == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND => {
                    PublishErrorKind::NoStream
                }
                // A server-side API error (e.g. storage failure, not leader): transient.
                Some(_) => PublishErrorKind::Unavailable,
                None => PublishErrorKind::Unavailable,
            }
        }
        _ => PublishErrorKind::Unavailable,
    };
    PublishError::with_source(kind, message, e)
}

/// What stream `relay stream ensure` creates or verifies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSpec {
    /// Stream name, e.g. `ORDERS`.
    pub name: String,
    /// Subjects it must capture, e.g. `order.>`.
    pub subjects: Vec<String>,
    /// The dedup window. Defaults to 2 minutes (the server default).
    pub duplicate_window: Duration,
    /// Replicas (1 for a single server, 3 for a cluster).
    pub replicas: usize,
}

/// What `ensure_stream` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamOutcome {
    /// The stream did not exist and was created.
    Created,
    /// The stream exists and captures every configured subject.
    Verified,
}

/// Creates the stream if missing; otherwise checks that it captures every configured
/// subject and has the configured duplicate window, and refuses a mismatch with a message
/// that says what differs (it never edits an existing stream).
pub async fn ensure_stream(
    context: &jetstream::Context,
    spec: &StreamSpec,
) -> Result<StreamOutcome, Error> {
    let fail = |reason: String| Error::Stream {
        stream: spec.name.clone(),
        reason,
    };
    match context.get_stream(&spec.name).await {
        Ok(mut existing) => {
            let info = existing
                .info()
                .await
                .map_err(|e| fail(format!("reading stream info: {e}")))?;
            let config = &info.config;
            let missing: Vec<&String> = spec
                .subjects
                .iter()
                .filter(|s| !config.subjects.iter().any(|have| subject_covers(have, s)))
                .collect();
            if !missing.is_empty() {
                return Err(fail(format!(
                    "exists with subjects {:?}, which do not capture {:?}; add them to the stream (nats stream edit) or fix the relay's --stream-subjects",
                    config.subjects, missing
                )));
            }
            if config.duplicate_window != spec.duplicate_window {
                return Err(fail(format!(
                    "exists with a duplicate window of {:?}, the relay expects {:?}",
                    config.duplicate_window, spec.duplicate_window
                )));
            }
            Ok(StreamOutcome::Verified)
        }
        Err(e) if is_stream_not_found(&e) => {
            context
                .create_stream(stream::Config {
                    name: spec.name.clone(),
                    subjects: spec.subjects.clone(),
                    duplicate_window: spec.duplicate_window,
                    num_replicas: spec.replicas,
                    storage: stream::StorageType::File,
                    ..Default::default()
                })
                .await
                .map_err(|e| fail(format!("creating: {e}")))?;
            Ok(StreamOutcome::Created)
        }
        Err(e) => Err(fail(format!("looking it up: {e}"))),
    }
}

fn is_stream_not_found(e: &jetstream::context::GetStreamError) -> bool {
    matches!(
        e.kind(),
        jetstream::context::GetStreamErrorKind::JetStream(js)
            if js.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND
    )
}

/// Whether the stream subject filter `filter` (may hold `*`/`>`) captures every subject that
/// `wanted` (may hold wildcards too) matches.
pub fn subject_covers(filter: &str, wanted: &str) -> bool {
    let f: Vec<&str> = filter.split('.').collect();
    let w: Vec<&str> = wanted.split('.').collect();
    for (i, token) in f.iter().enumerate() {
        match *token {
            ">" => return w.len() > i,
            "*" => {
                if i >= w.len() || w[i] == ">" {
                    return false;
                }
            }
            literal => {
                if w.get(i) != Some(&literal) {
                    return false;
                }
            }
        }
    }
    f.len() == w.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_coverage() {
        assert!(subject_covers("order.>", "order.created.v1"));
        assert!(subject_covers("order.>", "order.>"));
        assert!(subject_covers(">", "a.b"));
        assert!(subject_covers("order.*.v1", "order.created.v1"));
        assert!(!subject_covers("order.*", "order.created.v1"));
        assert!(!subject_covers("order.*", "order.>"));
        assert!(!subject_covers("order.created", "order.>"));
        assert!(!subject_covers("orders.>", "order.created"));
        assert!(!subject_covers("order.>", "order"));
    }
}
