//! What the three services share: configuration from the environment, telemetry, database
//! and broker connections, the toolkit schema, inbox consumers that restart after errors,
//! health and metrics endpoints, and JSON errors for bad requests.
//!
//! Layout (private modules; what they make public is re-exported here as `platform::Name`):
//! - `config`: [`ServiceConfig`] from the environment, [`NatsConfig`]
//! - `telemetry`: [`init_telemetry`] (JSON logs with trace ids), [`metrics_handle`],
//!   [`register_counters`], the per-request span
//! - `http`: [`ApiError`], [`ApiJson`], [`price_to_cents`], [`money`], [`text_field`],
//!   [`MAX_BODY_BYTES`] and what every router gets
//! - `health`: `/health`, `/health/ready`, `/metrics`
//! - `consumer`: the saga's stream, inbox consumers restarted after errors,
//!   [`enqueue_failure`]
//! - `runtime`: [`Runtime`], [`ServiceHandle`], [`shutdown_signal`], [`run_main`], the
//!   database and broker connections

mod config;
mod consumer;
mod health;
mod http;
mod runtime;
mod telemetry;

pub use self::config::{NatsConfig, ServiceConfig};
pub use self::consumer::enqueue_failure;
pub use self::http::{ApiError, ApiJson, MAX_BODY_BYTES, money, price_to_cents, text_field};
pub use self::runtime::{Runtime, ServiceHandle, run_main, shutdown_signal};
pub use self::telemetry::{init_telemetry, metrics_handle, register_counters};
