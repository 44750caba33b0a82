//! `relay run`: its flags, the [`RelayConfig`] they make, and the daemon itself (the relay,
//! the metrics recorder, the HTTP endpoints, the shutdown signals).

use std::net::SocketAddr;

use clap::Args;
use relay::publisher::jetstream::{JetStreamPublisher, ensure_stream};
use relay::{RelayConfig, http};
use tokio_util::sync::CancellationToken;

use super::stream::StreamSettings;
use super::{Dur, Global};

#[derive(Args, Debug)]
pub(super) struct RunArgs {
    /// Unique name of this instance (default: relay-<host>-<pid>-<random>).
    #[arg(long, env = "RELAY_INSTANCE_ID")]
    instance_id: Option<String>,
    /// Address for /health, /health/ready and /metrics.
    #[arg(long, env = "RELAY_HTTP_ADDR", default_value = "127.0.0.1:9090")]
    http_addr: SocketAddr,
    /// Rows per claim.
    #[arg(long, env = "RELAY_BATCH_SIZE", default_value_t = RelayConfig::default().batch_size)]
    batch_size: usize,
    /// PubAcks in flight at most.
    #[arg(long, env = "RELAY_MAX_IN_FLIGHT", default_value_t = RelayConfig::default().max_in_flight)]
    max_in_flight: usize,
    /// Claim transactions open at once, each holding a database connection.
    #[arg(long, env = "RELAY_MAX_OPEN_CLAIMS", default_value_t = RelayConfig::default().max_open_claims)]
    max_open_claims: usize,
    /// PubAck timeout.
    #[arg(long, env = "RELAY_PUBLISH_TIMEOUT", default_value_t = Dur(RelayConfig::default().publish_timeout))]
    publish_timeout: Dur,
    /// Longest a claim transaction stays open (idle_in_transaction_session_timeout).
    #[arg(long, env = "RELAY_CLAIM_TTL", default_value_t = Dur(RelayConfig::default().claim_ttl))]
    claim_ttl: Dur,
    /// Longest wait for the database in one step (claim, commit, lease renewal) before it
    /// counts as unreachable.
    #[arg(long, env = "RELAY_DB_TIMEOUT", default_value_t = Dur(RelayConfig::default().db_timeout))]
    db_timeout: Dur,
    /// Permanent failures before a row is dead-lettered.
    #[arg(long, env = "RELAY_MAX_PERMANENT_ATTEMPTS", default_value_t = RelayConfig::default().max_permanent_attempts)]
    max_permanent_attempts: u32,
    /// First retry delay.
    #[arg(long, env = "RELAY_RETRY_MIN_DELAY", default_value_t = Dur(RelayConfig::default().retry_min_delay))]
    retry_min_delay: Dur,
    /// Largest retry delay.
    #[arg(long, env = "RELAY_RETRY_MAX_DELAY", default_value_t = Dur(RelayConfig::default().retry_max_delay))]
    retry_max_delay: Dur,
    /// Shortest idle poll interval.
    #[arg(long, env = "RELAY_POLL_MIN", default_value_t = Dur(RelayConfig::default().poll_min_interval))]
    poll_min: Dur,
    /// Longest idle poll interval.
    #[arg(long, env = "RELAY_POLL_MAX", default_value_t = Dur(RelayConfig::default().poll_max_interval))]
    poll_max: Dur,
    /// Also wake on LISTEN/NOTIFY.
    #[arg(long, env = "RELAY_LISTEN_NOTIFY")]
    listen_notify: bool,
    /// Partition lease / liveness TTL.
    #[arg(long, env = "RELAY_LEASE_TTL", default_value_t = Dur(RelayConfig::default().lease_ttl))]
    lease_ttl: Dur,
    /// Lease renewal interval.
    #[arg(long, env = "RELAY_HEARTBEAT_INTERVAL", default_value_t = Dur(RelayConfig::default().heartbeat_interval))]
    heartbeat_interval: Dur,
    /// How long published rows are kept (0 deletes on PubAck).
    #[arg(long, env = "RELAY_RETENTION", default_value_t = Dur(RelayConfig::default().retention))]
    retention: Dur,
    /// How often to vacuum outbox_message (0 disables).
    #[arg(long, env = "RELAY_VACUUM_INTERVAL", default_value_t = Dur(RelayConfig::default().vacuum_interval))]
    vacuum_interval: Dur,
    /// Apply migrations before starting.
    #[arg(long, env = "RELAY_MIGRATE")]
    migrate: bool,
    /// Create or verify the stream before starting (with --duplicate-window, --replicas).
    #[arg(long, env = "RELAY_ENSURE_STREAM")]
    ensure_stream: bool,
    /// Where to read the outbox: `table` polls outbox_message; `wal` streams the
    /// replication slot made by `relay slot create` (log storage and table INSERTs).
    #[arg(long, env = "RELAY_SOURCE", value_enum, default_value = "table")]
    source: Source,
    /// The replication slot (and publication) of `--source wal`.
    #[arg(long, env = "RELAY_SLOT", default_value = relay::wal::SlotName::DEFAULT)]
    slot: String,
    #[command(flatten)]
    stream: StreamSettings,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Source {
    /// Poll `outbox_message` (claims, partitions, marks).
    Table,
    /// Stream a logical replication slot.
    Wal,
}

impl RunArgs {
    /// The relay's configuration: these flags over [`RelayConfig::default`] (not validated).
    fn config(&self) -> RelayConfig {
        RelayConfig {
            instance_id: self
                .instance_id
                .clone()
                .unwrap_or_else(relay::config::default_instance_id),
            batch_size: self.batch_size,
            max_in_flight: self.max_in_flight,
            max_open_claims: self.max_open_claims,
            publish_timeout: self.publish_timeout.0,
            claim_ttl: self.claim_ttl.0,
            max_permanent_attempts: self.max_permanent_attempts,
            retry_min_delay: self.retry_min_delay.0,
            retry_max_delay: self.retry_max_delay.0,
            poll_min_interval: self.poll_min.0,
            poll_max_interval: self.poll_max.0,
            listen_notify: self.listen_notify,
            lease_ttl: self.lease_ttl.0,
            heartbeat_interval: self.heartbeat_interval.0,
            retention: self.retention.0,
            vacuum_interval: self.vacuum_interval.0,
            db_timeout: self.db_timeout.0,
            ..RelayConfig::default()
        }
    }
}

/// Publishes until SIGTERM or Ctrl-C, serving `/health`, `/health/ready` and `/metrics`
/// meanwhile.
pub(super) async fn run(global: &Global, args: RunArgs) -> anyhow::Result<()> {
    let config = args.config();
    config.validate()?;
    let pool = global.pool_named(
        config.min_connections() + 2,
        &relay::store::application_name(&config.instance_id),
    )?;
    if args.migrate {
        migrations::migrate(&mut *pool.acquire().await?).await?;
    }
    let client = global
        .nats_config(Some(config.instance_id.clone()))
        .connect()
        .await?;
    let publisher = JetStreamPublisher::new(client, config.publish_timeout, config.max_in_flight);
    if args.ensure_stream {
        ensure_stream(publisher.context(), &args.stream.spec(global)).await?;
    }
    let prometheus = install_metrics_recorder()?;
    let stop = CancellationToken::new();
    let listener = http::bind(args.http_addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "serving /health, /health/ready, /metrics");
    let serve = |health| {
        tokio::spawn(http::serve(
            listener,
            health,
            Some(prometheus),
            stop.clone(),
        ))
    };
    let (server, result) = match args.source {
        Source::Table => {
            let relay = relay::Relay::new(config, pool, publisher)?;
            let server = serve(relay.health());
            (server, relay.run(shutdown_signal()).await)
        }
        Source::Wal => {
            let settings = relay::wal::WalSettings {
                slot: relay::wal::SlotName::new(args.slot.clone())?,
                database_url: global.database_url()?.to_owned(),
            };
            let relay = relay::wal::WalRelay::new(config, settings, pool, publisher)?;
            let server = serve(relay.health());
            (server, relay.run(shutdown_signal()).await)
        }
    };
    stop.cancel();
    result?;
    server.await??;
    Ok(())
}

/// Installs the Prometheus recorder, with histogram buckets fit for the relay's metrics.
fn install_metrics_recorder() -> anyhow::Result<metrics_exporter_prometheus::PrometheusHandle> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    Ok(PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(relay::metrics::PUBLISH_LATENCY.to_owned()),
            &[
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ],
        )?
        .set_buckets_for_metric(
            Matcher::Full(relay::metrics::BATCH_SIZE.to_owned()),
            &[1.0, 2.0, 8.0, 32.0, 128.0, 512.0, 2048.0],
        )?
        .install_recorder()?)
}

/// Completes on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
    tracing::info!("shutdown requested");
}
