//! The demo: an order / inventory / email saga built on the toolkit, and the runner behind
//! `make demo` and `make up`.
//!
//! Three axum services, each with its own database on one PostgreSQL server, inbox consumers
//! in-process and (for the two that publish) a `relay` sidecar process:
//! order-service (3001), email-service (3002), inventory-service (3003).
//!
//! # Layout
//! - [`events`]: the saga's versioned events (`order.created.v1`, ...).
//! - [`order`]: order-service: HTTP API, order state machine, simulated payment.
//! - [`inventory`]: inventory-service: stock, all-or-nothing reservations, compensation.
//! - [`email`]: email-service: one email per order, recorded in the inbox transaction, then
//!   sent (SMTP or `.eml` files).
//! - [`platform`]: what the services share: config, telemetry, health, metrics, JSON errors.
//! - [`store`]: the shared schema helper (each service's own SQL is in its `store` module).
//! - [`chaos`]: the chaos run behind `make chaos`: load, seeded faults, invariants.
//! - [`client`]: a minimal HTTP/1.1 JSON client (the runner and the tests use it).
//! - [`stack`]: starting the whole topology as processes and running the demo scenario.

pub mod chaos;
pub mod client;
pub mod email;
pub mod events;
pub mod inventory;
pub mod order;
pub mod platform;
pub mod stack;
pub mod store;
