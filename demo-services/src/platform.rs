//! What the three services share: configuration from the environment, telemetry, database
//! and broker connections, the toolkit schema, inbox consumers that restart after errors,
//! health and metrics endpoints, and JSON errors for bad requests.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use inbox::{Consumer, ConsumerConfig};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use relay::publisher::jetstream::{StreamSpec, ensure_stream};
use serde::de::DeserializeOwned;
use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use connect::NatsConfig;

use crate::events;

/// Largest accepted request body; larger ones get 413 with a JSON reason.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// What every service needs to start. [`ServiceConfig::from_env`] reads it from
/// `DATABASE_URL`, `NATS_URL` (and the `NATS_*` auth variables the relay reads),
/// `HTTP_ADDR` and `RELAY_LAG_MAX_SECS`.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// The service's own database.
    pub database_url: String,
    /// The broker.
    pub nats: NatsConfig,
    /// Where the HTTP API listens (port 0: any free port, see [`ServiceHandle::addr`]).
    pub http_addr: SocketAddr,
    /// `/health/ready` fails when the oldest unpublished outbox row is older than this.
    pub relay_lag_max: Duration,
    /// Replicas of the saga's stream when this service creates it (`STREAM_REPLICAS`,
    /// default 1; 3 on a cluster).
    pub stream_replicas: usize,
}

impl ServiceConfig {
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
        })
    }
}

/// JSON logs on stdout (`RUST_LOG` filters; default `info`) and OpenTelemetry span ids
/// without an exporter, so that the W3C trace context flows from HTTP request to outbox
/// message to the consumers' handlers and every log line of one order carries its
/// `trace_id`. Call once, first thing in `main`.
pub fn init_telemetry(service: &'static str) {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    static PROVIDER: OnceLock<opentelemetry_sdk::trace::SdkTracerProvider> = OnceLock::new();
    let provider =
        PROVIDER.get_or_init(|| opentelemetry_sdk::trace::SdkTracerProvider::builder().build());
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .json()
                .with_current_span(false)
                .with_span_list(true),
        )
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer(service)))
        .try_init();
}

/// The process-wide Prometheus recorder (installed on first use).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (tests); this handle then stays empty.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Registers `counters` at zero so that `/metrics` lists them before their first event
/// (Prometheus queries and alerts then see 0 rather than nothing).
pub fn register_counters(counters: &[&'static str]) {
    let _ = metrics_handle();
    for name in counters {
        metrics::counter!(*name).increment(0);
    }
}

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

/// Creates or verifies the saga's stream, retrying until the broker answers or `stop`.
async fn ensure_demo_stream(
    jetstream: &async_nats::jetstream::Context,
    replicas: usize,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let spec = StreamSpec {
        name: events::STREAM.into(),
        subjects: events::STREAM_SUBJECTS
            .iter()
            .map(|s| (*s).to_owned())
            .collect(),
        duplicate_window: Duration::from_secs(120),
        replicas,
    };
    loop {
        match ensure_stream(jetstream, &spec).await {
            Ok(_) => return Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, "stream not ready yet; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return Err(anyhow!("stopped before the stream was ready")),
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        }
    }
}

/// Makes sure the saga's stream exists, then runs an inbox consumer until `stop`, starting
/// it again (after a pause) whenever it ends with an error, e.g. while the broker is away.
fn spawn_consumer(
    config: ConsumerConfig,
    pool: PgPool,
    jetstream: async_nats::jetstream::Context,
    handler: Arc<dyn inbox::RawHandler>,
    stream_replicas: usize,
    stop: CancellationToken,
    health: ConsumerHealth,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let name = config.name.clone();
        if ensure_demo_stream(&jetstream, stream_replicas, &stop)
            .await
            .is_err()
        {
            return;
        }
        while !stop.is_cancelled() {
            let consumer = match Consumer::new(
                config.clone(),
                pool.clone(),
                jetstream.clone(),
                handler.clone(),
            ) {
                Ok(c) => c.layer(inbox::layer::Logging),
                Err(e) => {
                    tracing::error!(consumer = %name, error = %e, "invalid consumer configuration");
                    return;
                }
            };
            *health
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(consumer.health());
            let stopped = stop.clone();
            match consumer.run(async move { stopped.cancelled().await }).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(consumer = %name, error = %e, "consumer stopped; restarting");
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
            }
        }
    })
}

/// A failed outbox enqueue inside a handler: retried if the database may recover, parked if
/// the message itself is invalid.
pub fn enqueue_failure(e: outbox::Error) -> inbox::HandlerError {
    if e.is_transient() {
        inbox::HandlerError::retry(e)
    } else {
        inbox::HandlerError::permanent(e)
    }
}

/// What `/health/ready` checks.
#[derive(Clone)]
struct Readiness {
    /// The service's database.
    pool: PgPool,
    /// The broker connection.
    nats: async_nats::Client,
    /// Whether the service writes an outbox (then its relay's lag counts).
    has_outbox: bool,
    /// The largest acceptable relay lag.
    relay_lag_max: Duration,
    /// The inbox consumer's readiness, if the service consumes (see [`inbox::Health`]).
    consumer: ConsumerHealth,
}

impl Readiness {
    async fn check(&self) -> (bool, serde_json::Value) {
        let database = tokio::time::timeout(Duration::from_secs(2), async {
            let mut conn = self.pool.acquire().await?;
            let lag = if self.has_outbox {
                Some(outbox::store::backlog(&mut conn).await?.oldest_age_seconds)
            } else {
                None
            };
            Ok::<_, sqlx::Error>(lag)
        })
        .await;
        let (database_ok, lag) = match database {
            Ok(Ok(lag)) => (true, lag),
            _ => (false, None),
        };
        let broker_ok = matches!(
            self.nats.connection_state(),
            async_nats::connection::State::Connected
        );
        let lag_ok = lag.is_none_or(|l| l <= self.relay_lag_max.as_secs_f64());
        let consumer = self
            .consumer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .map(inbox::Health::report);
        let consumer_ok = consumer.as_ref().is_none_or(|c| c.ready);
        let ready = database_ok && broker_ok && lag_ok && consumer_ok;
        (
            ready,
            json!({
                "ready": ready,
                "database": database_ok,
                "broker": broker_ok,
                "relayLagSeconds": lag,
                "consumer": consumer,
            }),
        )
    }
}

/// `/health` (liveness), `/health/ready` (database, broker, relay lag, the inbox consumer)
/// and `/metrics`.
fn ops_routes(readiness: Readiness) -> Router {
    Router::new()
        .route("/health", get(|| async { Json(json!({ "status": "ok" })) }))
        .route(
            "/health/ready",
            get(move || {
                let readiness = readiness.clone();
                async move {
                    let (ready, body) = readiness.check().await;
                    let status = if ready {
                        StatusCode::OK
                    } else {
                        StatusCode::SERVICE_UNAVAILABLE
                    };
                    (status, Json(body))
                }
            }),
        )
        .route(
            "/metrics",
            get(|| async {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    metrics_handle().render(),
                )
            }),
        )
}

/// Adds what every API shares: the body limit, JSON 404/405 for unknown routes and methods.
fn finish_routes(router: Router) -> Router {
    router
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this route",
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(traced))
}

/// Runs each request in an `http` span whose `trace_id` field is its OpenTelemetry trace id:
/// what it enqueues carries that trace, so the consumers' log lines show the same id.
async fn traced(request: Request, next: axum::middleware::Next) -> Response {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing::Instrument as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;

    let span = tracing::info_span!(
        "http",
        method = %request.method(),
        path = %request.uri().path(),
        trace_id = tracing::field::Empty,
    );
    let trace_id = span.context().span().span_context().trace_id();
    if trace_id != opentelemetry::trace::TraceId::INVALID {
        span.record("trace_id", trace_id.to_string());
    }
    next.run(request).instrument(span).await
}

// Request validation and money, shared by the APIs.

/// Parses a price in currency units into cents: positive, at most 2 decimals, at most 1e6.
pub fn price_to_cents(field: &str, price: f64) -> Result<i64, ApiError> {
    // Up to one million: far below the 2^53 cents where doubles stop holding every cent.
    if !price.is_finite() || price <= 0.0 || price > 1e6 {
        return Err(ApiError::invalid(format!(
            "{field} must be a positive amount up to 1000000, got {price}"
        )));
    }
    let cents = (price * 100.0).round();
    if (cents - price * 100.0).abs() > 1e-6 {
        return Err(ApiError::invalid(format!(
            "{field} must have at most 2 decimals, got {price}"
        )));
    }
    Ok(cents as i64)
}

/// Cents as a currency amount for JSON.
pub fn money(cents: i64) -> f64 {
    cents as f64 / 100.0
}

/// Validates a request's text field: not blank, at most `max` characters, no control characters.
pub fn text_field(field: &str, value: &str, max: usize) -> Result<(), ApiError> {
    if value.trim().is_empty() {
        return Err(ApiError::invalid(format!("{field} must not be empty")));
    }
    if value.chars().count() > max {
        return Err(ApiError::invalid(format!(
            "{field} must be at most {max} characters"
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(ApiError::invalid(format!(
            "{field} must not contain control characters"
        )));
    }
    Ok(())
}

/// An HTTP error with a JSON body `{"error": reason}`.
#[derive(Debug)]
pub struct ApiError {
    /// The status (4xx for the client's mistakes, 5xx for ours).
    pub status: StatusCode,
    /// Readable reason.
    pub reason: String,
}

impl ApiError {
    /// An error with this status and reason.
    pub fn new(status: StatusCode, reason: impl Into<String>) -> ApiError {
        ApiError {
            status,
            reason: reason.into(),
        }
    }

    /// 422: the request is well-formed JSON but not acceptable.
    pub fn invalid(reason: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, reason)
    }

    /// 404.
    pub fn not_found(reason: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, reason)
    }

    /// 409.
    pub fn conflict(reason: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, reason)
    }

    /// 500, logging the cause (the client gets no internals).
    pub fn internal(error: impl std::fmt::Display) -> ApiError {
        tracing::error!(error = %error, "request failed");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> ApiError {
        ApiError::internal(e)
    }
}

impl From<outbox::Error> for ApiError {
    fn from(e: outbox::Error) -> ApiError {
        ApiError::internal(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.reason }))).into_response()
    }
}

/// `Json<T>` whose rejections (malformed JSON, wrong or missing fields, wrong content type,
/// oversized body) are [`ApiError`]s with a JSON reason and the same 4xx status.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(ApiJson(value)),
            Err(rejection) => Err(ApiError::new(rejection.status(), rejection.body_text())),
        }
    }
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

/// The consumer settings the three services share: quick retries for a demo.
fn consumer_config(name: &str, subjects: Vec<String>) -> ConsumerConfig {
    ConsumerConfig {
        filter_subjects: subjects,
        concurrency: 8,
        max_attempts: 10,
        ack_wait: Duration::from_secs(10),
        retry_min_delay: Duration::from_millis(200),
        retry_max_delay: Duration::from_secs(5),
        retry_poll_interval: Duration::from_millis(500),
        ..ConsumerConfig::new(name, events::STREAM)
    }
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

/// The [`inbox::Health`] of a service's current consumer (each restart has a new one).
type ConsumerHealth = Arc<std::sync::Mutex<Option<inbox::Health>>>;

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
            self.config.stream_replicas,
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
