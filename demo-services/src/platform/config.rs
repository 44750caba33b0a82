//! [`ServiceConfig`]: what every service reads from its environment.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;

pub use connect::NatsConfig;

/// What every service needs to start. [`ServiceConfig::from_env`] reads it from
/// `DATABASE_URL`, `NATS_URL` (and the `NATS_*` auth variables the relay reads),
/// `HTTP_ADDR`, `RELAY_LAG_MAX_SECS`, `STREAM_REPLICAS`, `STREAM_DUPLICATE_WINDOW_SECS` and
/// `OUTBOX_STORAGE`.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// The service's own database.
    pub database_url: String,
    /// The broker.
    pub nats: NatsConfig,
    /// Where the HTTP API listens (port 0: any free port, see [`ServiceHandle::addr`](super::ServiceHandle::addr)).
    pub http_addr: SocketAddr,
    /// `/health/ready` fails when the oldest unpublished outbox row is older than this.
    pub relay_lag_max: Duration,
    /// Replicas of the saga's stream when this service creates it (`STREAM_REPLICAS`,
    /// default 1; 3 on a cluster).
    pub stream_replicas: usize,
    /// The saga stream's duplicate window when this service creates it, and what it checks
    /// an existing stream has (`STREAM_DUPLICATE_WINDOW_SECS`, default 120, the server's
    /// default).
    pub stream_duplicate_window: Duration,
    /// Where the service's outbox writes (`OUTBOX_STORAGE`: `table`, the default, or `log`,
    /// which needs `wal_level=logical`, the relay's slot, and `relay run --source wal`).
    pub outbox_storage: outbox::Storage,
}

impl ServiceConfig {
    /// The outbox of the service `source`, writing to [`ServiceConfig::outbox_storage`].
    pub fn outbox(&self, source: &str) -> anyhow::Result<outbox::Outbox> {
        let outbox = outbox::Outbox::with_config(outbox::OutboxConfig {
            storage: self.outbox_storage,
            ..outbox::OutboxConfig::for_source(source)
        })?;
        Ok(outbox)
    }

    /// Reads the configuration; `default_port` is the service's documented port.
    pub fn from_env(default_port: u16) -> anyhow::Result<ServiceConfig> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let database_url = var("DATABASE_URL").context("DATABASE_URL is not set")?;
        let http_addr = match var("HTTP_ADDR") {
            Some(addr) => addr.parse().with_context(|| {
                format!("HTTP_ADDR {addr:?} is not an address like 127.0.0.1:3001")
            })?,
            None => SocketAddr::from(([127, 0, 0, 1], default_port)),
        };
        let relay_lag_max = match var("RELAY_LAG_MAX_SECS") {
            Some(s) => Duration::from_secs(
                s.parse()
                    .with_context(|| format!("RELAY_LAG_MAX_SECS {s:?} is not a number"))?,
            ),
            None => Duration::from_secs(30),
        };
        let stream_replicas = match var("STREAM_REPLICAS") {
            Some(s) => s
                .parse()
                .ok()
                .filter(|r| (1..=5).contains(r))
                .with_context(|| format!("STREAM_REPLICAS {s:?} must be 1 to 5"))?,
            None => 1,
        };
        let stream_duplicate_window = match var("STREAM_DUPLICATE_WINDOW_SECS") {
            Some(s) => Duration::from_secs(
                s.parse()
                    .ok()
                    .filter(|w| (1..=86_400).contains(w))
                    .with_context(|| {
                        format!("STREAM_DUPLICATE_WINDOW_SECS {s:?} must be 1 to 86400")
                    })?,
            ),
            None => Duration::from_secs(120),
        };
        let outbox_storage = match var("OUTBOX_STORAGE").as_deref() {
            None | Some("table") => outbox::Storage::Table,
            Some("log") => outbox::Storage::Log,
            Some(other) => anyhow::bail!("OUTBOX_STORAGE {other:?} must be table or log"),
        };
        let nats = NatsConfig {
            url: var("NATS_URL").unwrap_or_else(|| "nats://127.0.0.1:4222".into()),
            user: var("NATS_USER"),
            password: var("NATS_PASSWORD"),
            token: var("NATS_TOKEN"),
            creds_file: var("NATS_CREDS").map(Into::into),
            nkey_seed: var("NATS_NKEY"),
            tls_ca: var("NATS_TLS_CA").map(Into::into),
            tls_cert: var("NATS_TLS_CERT").map(Into::into),
            tls_key: var("NATS_TLS_KEY").map(Into::into),
            tls_required: var("NATS_TLS_REQUIRED").is_some_and(|v| v == "true" || v == "1"),
            name: None,
        };
        Ok(ServiceConfig {
            database_url,
            nats,
            http_addr,
            relay_lag_max,
            stream_replicas,
            stream_duplicate_window,
            outbox_storage,
        })
    }
}
