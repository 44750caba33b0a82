//! The demo: an order / inventory / email saga built on the toolkit.
//!
//! Three axum services, each with its own database on one PostgreSQL server, inbox consumers
//! in-process and (for the two that publish) a `relay` sidecar process:
//! order-service (3001), email-service (3002), inventory-service (3003). The `demo-runner`
//! crate starts them all as processes (`make demo`, `make up`, `make chaos`).
//!
//! # Layout
//! - [`events`]: the saga's versioned events (`order.created.v1`, ...).
//! - [`order`]: order-service: HTTP API, order state machine, simulated payment.
//! - [`inventory`]: inventory-service: stock, all-or-nothing reservations, compensation.
//! - [`email`]: email-service: one email per order, recorded in the inbox transaction, then
//!   sent (SMTP or `.eml` files).
//! - [`platform`]: what the services share: config, telemetry, HTTP helpers (health, metrics,
//!   JSON errors), the runtime (connections, consumers, serving, shutdown).
//! - [`store`]: the shared schema helper (each service's own SQL is in its `store` module).

pub mod email;
pub mod events;
pub mod inventory;
pub mod order;
pub mod platform;
pub mod store;
