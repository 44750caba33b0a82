//! The real publisher: NATS JetStream through async-nats.

use std::time::Duration;

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
}

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
            .map_err(|e| PublishError::new(PublishErrorKind::Rejected, e.to_string()))?;
        let message = PublishMessage::build()
            .headers(headers)
            .payload(envelope.payload.clone());
        let subject = envelope.subject.to_string();
        let send = self.context.send_publish(subject.clone(), message);
        let pending = match tokio::time::timeout(self.timeout, send).await {
            Ok(Ok(pending)) => pending,
            Ok(Err(e)) => return Err(confirm(&self.context, &subject, classify(&e)).await),
            Err(_) => {
                return Err(PublishError::new(
                    PublishErrorKind::Unavailable,
                    "the connection did not accept the message in time",
                ));
            }
        };
        let timeout = self.timeout;
        let context = self.context.clone();
        Ok(async move {
            match tokio::time::timeout(timeout, pending.into_future()).await {
                Ok(Ok(ack)) => Ok(Ack {
                    stream: ack.stream,
                    sequence: ack.sequence,
                    duplicate: ack.duplicate,
                }),
                Ok(Err(e)) => Err(confirm(&context, &subject, classify(&e)).await),
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
async fn confirm(context: &jetstream::Context, subject: &str, error: PublishError) -> PublishError {
    use async_nats::jetstream::context::GetStreamByNameErrorKind as Lookup;
    if error.kind != PublishErrorKind::NoStream {
        return error;
    }
    let lookup = tokio::time::timeout(Duration::from_secs(2), context.stream_by_subject(subject));
    match lookup.await {
        // The API answered: no stream captures the subject, or it refused the question (for
        // instance JetStream is not enabled for the account): retrying cannot help.
        Ok(Err(e))
            if matches!(
                e.kind(),
                Lookup::NotFound | Lookup::InvalidSubject | Lookup::JetStream(_)
            ) =>
        {
            error
        }
        Ok(Ok(stream)) => PublishError::new(
            PublishErrorKind::Unavailable,
            format!(
                "{} (stream {stream} captures the subject but did not answer: leader election?)",
                error.message
            ),
        ),
        _ => PublishError::new(
            PublishErrorKind::Unavailable,
            format!(
                "{} (could not confirm with the JetStream API)",
                error.message
            ),
        ),
    }
}

fn classify(e: &async_nats::jetstream::context::PublishError) -> PublishError {
    let message = {
        let mut text = e.to_string();
        if let Some(source) = std::error::Error::source(e) {
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
            let code = std::error::Error::source(e)
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
    PublishError::new(kind, message)
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
