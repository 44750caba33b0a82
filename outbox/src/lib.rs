//! Write events in the same PostgreSQL transaction as the business change.
//!
//! [`Outbox::enqueue`] inserts a row into `outbox_message` through the caller's own
//! connection, so the event commits or rolls back with the business rows: no dual write.
//! Nothing is published from the request path; the relay publishes committed rows.
//!
//! ```no_run
//! # use outbox::{Outbox, Event};
//! # use serde::{Serialize, Deserialize};
//! # #[derive(Serialize, Deserialize)] struct OrderCreated { order_id: String }
//! # impl Event for OrderCreated {
//! #     const NAME: &'static str = "order.created";
//! #     const VERSION: u32 = 1;
//! #     fn partition_key(&self) -> String { self.order_id.clone() }
//! # }
//! # async fn place(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! let outbox = Outbox::new("order-service")?;
//! let mut tx = pool.begin().await?;
//! sqlx::query("INSERT INTO orders (id) VALUES ($1)").bind("o-1").execute(&mut *tx).await?;
//! outbox.enqueue(&mut tx, &OrderCreated { order_id: "o-1".into() }).await?;
//! tx.commit().await?; // the order and its event become visible together
//! # Ok(()) }
//! ```
//!
//!
//! [`Outbox::begin`] saves the enqueue's round trip: messages are validated at once, buffered,
//! and sent with `COMMIT` in one simple query, as base64 literals.
//!
//! ```no_run
//! # use outbox::{Outbox, Event};
//! # use serde::{Serialize, Deserialize};
//! # #[derive(Serialize, Deserialize)] struct OrderCreated { order_id: String }
//! # impl Event for OrderCreated {
//! #     const NAME: &'static str = "order.created";
//! #     const VERSION: u32 = 1;
//! #     fn partition_key(&self) -> String { self.order_id.clone() }
//! # }
//! # async fn place(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! let outbox = Outbox::new("order-service")?;
//! let mut tx = outbox.begin(&pool).await?;
//! sqlx::query("INSERT INTO orders (id) VALUES ($1)").bind("o-1").execute(&mut *tx).await?;
//! tx.enqueue(&OrderCreated { order_id: "o-1".into() })?; // validated, buffered
//! tx.commit().await?; // the INSERT of the event and COMMIT: one round trip
//! # Ok(()) }
//! ```
//!
//! With [`Storage::Log`] in [`OutboxConfig::storage`], messages go to the write-ahead log
//! instead of a table (`relay run --source wal` reads them).
//!
//! # Layout
//! - [`backoff`]: retry delays (exponential with jitter), for the relay and the inbox.
//! - [`config`]: [`OutboxConfig`], the producer settings, with `validate()`, and [`Storage`]
//!   (table rows or the write-ahead log).
//! - [`deadline`]: database steps with a deadline ([`deadline::within`]), for the relay and
//!   the inbox.
//! - [`duration`]: durations as operators write them (`5s`, `2m`, `7d`), for the relay's
//!   flags and the `dlq` CLI.
//! - [`message`]: [`Message`], a raw or typed message before validation.
//! - [`outbox`](mod@outbox): [`Outbox`], validation and the enqueue API.
//! - [`store`]: all SQL producers issue: rows of `outbox_message`, log messages, and the
//!   transaction of [`OutboxTransaction`] (`store::literal`: statements with literal values).
//! - [`transaction`]: [`OutboxTransaction`], enqueues that ride with `COMMIT`.
//! - [`trace`]: capture of the current span's W3C trace context.
//! - [`error`]: [`Error`], one variant per cause.

pub mod backoff;
pub mod config;
pub mod deadline;
pub mod duration;
pub mod error;
pub mod message;
pub mod outbox;
pub mod store;
pub mod trace;
pub mod transaction;

pub use config::{OutboxConfig, Storage};
pub use envelope::{Envelope, Event, MessageId, TraceContext};
pub use error::{Error, ErrorKind};
pub use message::Message;
pub use outbox::Outbox;
pub use transaction::OutboxTransaction;
