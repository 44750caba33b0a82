//! The service runtime: connecting to the database (schemas applied) and the broker,
//! [`Runtime`] (consumers and background tasks of a starting service), [`ServiceHandle`]
//! (serving until stopped), the shutdown signal and the body of each service's `main`.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use axum::Router;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::consumer::{ConsumerHealth, consumer_config, demo_stream, spawn_consumer};
use super::health::{Readiness, ops_routes};
use super::http::finish_routes;
use super::telemetry::{init_telemetry, register_counters};
use super::{NatsConfig, ServiceConfig};

/// A pool to the service's database, waiting (up to `patience`) for PostgreSQL to accept
/// connections: services may start before it or while it restarts.
async fn connect_database(url: &str, patience: Duration) -> anyhow::Result<PgPool> {
    let start = tokio::time::Instant::now();
    loop {
        // Room for the consumer's 8 lanes, the email sender, the dlq retry runner and requests.
        match PgPoolOptions::new()
            .max_connections(24)
            .acquire_timeout(Duration::from_secs(5))
            .connect(url)
            .await
        {
            Ok(pool) => return Ok(pool),
            Err(e) if start.elapsed() < patience => {
                tracing::warn!(error = %e, "database not reachable yet; retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => return Err(anyhow!(e).context("connecting to the database")),
        }
    }
}

/// Applies the toolkit's schema, then the service's own (`schema`: idempotent DDL), under
/// one advisory lock so that several instances can start together.
async fn migrate(pool: &PgPool, schema: &'static str) -> anyhow::Result<()> {
    let mut conn = pool.acquire().await?;
    migrations::migrate(&mut conn)
        .await
        .context("applying the toolkit schema")?;
    crate::store::apply_schema(&mut conn, schema)
        .await
        .context("applying the service schema")?;
    Ok(())
}

/// A running service (HTTP API, consumers, background tasks).
pub struct ServiceHandle {
    /// Where its HTTP API listens.
    pub addr: SocketAddr,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for ServiceHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceHandle")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl ServiceHandle {
    /// Serves `router` on `listener` and owns `tasks`; everything stops on [`ServiceHandle::stop`].
    pub fn new(
        listener: TcpListener,
        router: Router,
        stop: CancellationToken,
        mut tasks: Vec<JoinHandle<()>>,
    ) -> anyhow::Result<ServiceHandle> {
        let addr = listener.local_addr()?;
        let stopped = stop.clone();
        tasks.push(tokio::spawn(async move {
            let server = axum::serve(listener, router)
                .with_graceful_shutdown(async move { stopped.cancelled().await });
            if let Err(e) = server.await {
                tracing::error!(error = %e, "HTTP server failed");
            }
        }));
        Ok(ServiceHandle { addr, stop, tasks })
    }

    /// Stops accepting requests, lets handlers in progress finish (consumers commit and ack
    /// what they started), and waits for every task.
    pub async fn stop(self) {
        self.stop.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
    }

    /// Runs until SIGTERM or ctrl-c, then stops gracefully.
    pub async fn run_until_signal(self) {
        shutdown_signal().await;
        tracing::info!("stopping");
        self.stop().await;
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Connects to the broker (returns at once; the client keeps reconnecting in the
/// background) and to the database, and applies the schemas.
async fn connect_all(
    config: &ServiceConfig,
    service: &'static str,
    schema: &'static str,
) -> anyhow::Result<(PgPool, async_nats::Client)> {
    let pool = connect_database(&config.database_url, Duration::from_secs(60)).await?;
    migrate(&pool, schema).await?;
    let nats = NatsConfig {
        name: Some(service.into()),
        ..config.nats.clone()
    }
    .connect()
    .await
    .context("connecting to NATS")?;
    Ok((pool, nats))
}

/// What a starting service has: its database pool, broker connection, stop signal and
/// background tasks. [`Runtime::serve`] turns it into a running [`ServiceHandle`].
pub struct Runtime {
    /// The service's name (consumer, outbox source, NATS connection name).
    pub name: &'static str,
    /// Its configuration.
    pub config: ServiceConfig,
    /// Its database (schemas applied).
    pub pool: PgPool,
    /// The broker connection.
    pub nats: async_nats::Client,
    /// Cancelled when the service stops.
    pub stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    /// The readiness of the running inbox consumer, if the service consumes.
    consumer: ConsumerHealth,
}

impl Runtime {
    /// Registers `counters` at zero, connects to the database (applying the toolkit's
    /// schema and `schema`) and to the broker.
    pub async fn connect(
        name: &'static str,
        config: ServiceConfig,
        schema: &'static str,
        counters: &[&'static str],
    ) -> anyhow::Result<Runtime> {
        register_counters(counters);
        let (pool, nats) = connect_all(&config, name, schema).await?;
        Ok(Runtime {
            name,
            config,
            pool,
            nats,
            stop: CancellationToken::new(),
            tasks: Vec::new(),
            consumer: ConsumerHealth::default(),
        })
    }

    /// Runs the service's inbox consumer over `router`'s event types until the service stops.
    pub fn consume(&mut self, router: inbox::Router) {
        let consumer = spawn_consumer(
            consumer_config(self.name, router.subjects()),
            self.pool.clone(),
            async_nats::jetstream::new(self.nats.clone()),
            router.into_handler(),
            demo_stream(
                self.config.stream_replicas,
                self.config.stream_duplicate_window,
            ),
            self.stop.clone(),
            self.consumer.clone(),
        );
        self.tasks.push(consumer);
    }

    /// Adds a background task that ends when [`Runtime::stop`] is cancelled.
    pub fn spawn(&mut self, task: JoinHandle<()>) {
        self.tasks.push(task);
    }

    /// Serves `api` plus `/health`, `/health/ready` (with the relay lag when the service
    /// writes an outbox) and `/metrics` on the configured address.
    pub async fn serve(self, api: Router, has_outbox: bool) -> anyhow::Result<ServiceHandle> {
        let readiness = Readiness {
            pool: self.pool.clone(),
            nats: self.nats.clone(),
            has_outbox,
            relay_lag_max: self.config.relay_lag_max,
            consumer: self.consumer.clone(),
        };
        let app = finish_routes(api.merge(ops_routes(readiness)));
        let addr = self.config.http_addr;
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening on {addr}"))?;
        let handle = ServiceHandle::new(listener, app, self.stop, self.tasks)?;
        tracing::info!(addr = %handle.addr, "{} listening", self.name);
        Ok(handle)
    }
}

/// The body of each service binary's `main`: telemetry, then `start`, then serve until
/// SIGTERM or ctrl-c; a failure to start is one line on stderr and exit code 1.
pub async fn run_main<F>(name: &'static str, start: F) -> std::process::ExitCode
where
    F: Future<Output = anyhow::Result<ServiceHandle>>,
{
    init_telemetry(name);
    match start.await {
        Ok(service) => {
            service.run_until_signal().await;
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{name}: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
