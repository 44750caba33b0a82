//! The real publisher: NATS JetStream through async-nats.

use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream::context::PublishErrorKind as NatsKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, stream};
use async_nats::{Client, ConnectOptions};
use envelope::Envelope;
use futures::FutureExt;

use super::{Ack, AckFuture, PublishError, PublishErrorKind, Publisher};
use crate::error::Error;

/// How to reach NATS. Secrets are never printed: `Debug` redacts them.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct NatsConfig {
    /// Server URL(s), comma-separated, e.g. `nats://127.0.0.1:4222`. Defaults to
    /// `nats://127.0.0.1:4222` when empty.
    pub url: String,
    /// User name for user/password auth.
    pub user: Option<String>,
    /// Password for user/password auth.
    pub password: Option<String>,
    /// Token auth.
    pub token: Option<String>,
    /// A `.creds` file (JWT + nkey seed).
    pub creds_file: Option<PathBuf>,
    /// An nkey seed (`SU...`).
    pub nkey_seed: Option<String>,
    /// CA certificate(s) to trust (PEM).
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM), with `tls_key`.
    pub tls_cert: Option<PathBuf>,
    /// Client key (PEM), with `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Refuse a connection that is not TLS.
    pub tls_required: bool,
    /// The connection name shown by the server (e.g. the relay instance id).
    pub name: Option<String>,
}

impl std::fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redact = |s: &Option<String>| s.as_ref().map(|_| "<redacted>");
        f.debug_struct("NatsConfig")
            .field("url", &self.url)
            .field("user", &self.user)
            .field("password", &redact(&self.password))
            .field("token", &redact(&self.token))
            .field("creds_file", &self.creds_file)
            .field("nkey_seed", &redact(&self.nkey_seed))
            .field("tls_ca", &self.tls_ca)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("tls_required", &self.tls_required)
            .field("name", &self.name)
            .finish()
    }
}

impl NatsConfig {
    /// The server URL, defaulted.
    pub fn url(&self) -> &str {
        if self.url.is_empty() {
            "nats://127.0.0.1:4222"
        } else {
            &self.url
        }
    }

    /// Refuses contradictory auth settings.
    pub fn validate(&self) -> Result<(), Error> {
        let methods = [
            self.user.is_some() || self.password.is_some(),
            self.token.is_some(),
            self.creds_file.is_some(),
            self.nkey_seed.is_some(),
        ];
        if methods.iter().filter(|m| **m).count() > 1 {
            return Err(Error::Config(
                "choose one NATS auth method: user/password, token, creds file or nkey".into(),
            ));
        }
        if self.user.is_some() != self.password.is_some() {
            return Err(Error::Config("NATS user and password go together".into()));
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(Error::Config(
                "NATS TLS client cert and key go together".into(),
            ));
        }
        Ok(())
    }

    /// Connects, retrying in the background if the server is not up yet (the client
    /// reconnects by itself after any later disconnect too).
    pub async fn connect(&self) -> Result<Client, Error> {
        self.validate()?;
        let url = self.url().to_owned();
        let fail = |reason: String| Error::Connect {
            url: url.clone(),
            reason,
        };
        let mut options = ConnectOptions::new()
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(5))
            .ping_interval(Duration::from_secs(10))
            .reconnect_delay_callback(|attempts| {
                // 0, 50 ms, 100 ms ... capped at 2 s: a restarted broker is found quickly.
                Duration::from_millis((attempts as u64 * 50).min(2000))
            });
        if let Some(name) = &self.name {
            options = options.name(name);
        }
        if let (Some(user), Some(password)) = (&self.user, &self.password) {
            options = options.user_and_password(user.clone(), password.clone());
        }
        if let Some(token) = &self.token {
            options = options.token(token.clone());
        }
        if let Some(seed) = &self.nkey_seed {
            options = options.nkey(seed.clone());
        }
        if let Some(path) = &self.creds_file {
            options = options
                .credentials_file(path)
                .await
                .map_err(|e| fail(format!("reading creds file {}: {e}", path.display())))?;
        }
        if let Some(ca) = &self.tls_ca {
            options = options.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        if self.tls_required {
            options = options.require_tls(true);
        }
        options.connect(&url).await.map_err(|e| fail(e.to_string()))
    }
}

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
        let send = self
            .context
            .send_publish(envelope.subject.to_string(), message);
        let pending = match tokio::time::timeout(self.timeout, send).await {
            Ok(Ok(pending)) => pending,
            Ok(Err(e)) => return Err(classify(&e)),
            Err(_) => {
                return Err(PublishError::new(
                    PublishErrorKind::Unavailable,
                    "the connection did not accept the message in time",
                ));
            }
        };
        let timeout = self.timeout;
        Ok(async move {
            match tokio::time::timeout(timeout, pending.into_future()).await {
                Ok(Ok(ack)) => Ok(Ack {
                    stream: ack.stream,
                    sequence: ack.sequence,
                    duplicate: ack.duplicate,
                }),
                Ok(Err(e)) => Err(classify(&e)),
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

    #[test]
    fn debug_redacts_secrets() {
        let config = NatsConfig {
            password: Some("hunter2".into()),
            user: Some("relay".into()),
            token: Some("tok-secret".into()),
            nkey_seed: Some("SUSECRET".into()),
            ..NatsConfig::default()
        };
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("hunter2")
                && !shown.contains("tok-secret")
                && !shown.contains("SUSECRET")
        );
        assert!(config.validate().is_err(), "two auth methods are refused");
    }
}
