//! The message envelope shared by every crate of the toolkit.
//!
//! An [`Envelope`] is one event on its way from an outbox row to a consumer: a UUIDv7
//! [`MessageId`], a validated NATS [`Subject`], a versioned [`EventType`], the
//! [`PartitionKey`] that orders it, tracing context, free-form [`Headers`] and the payload
//! bytes. Every constructor validates and returns a typed [`Error`]; nothing here panics on
//! hostile input, so a value of these types can always be written to NATS headers.
//!
//! # Layout
//! - [`id`]: [`MessageId`], the UUIDv7 identity used by broker dedup and the inbox.
//! - [`subject`]: [`Subject`] and [`EventType`] validation, subject derivation from a type.
//! - [`text`]: [`HeaderText`], a bounded single-line string safe in a NATS header, and
//!   [`PartitionKey`].
//! - [`headers`]: [`Headers`], the validated free-form headers, with reserved names refused.
//! - [`trace`]: [`TraceContext`], the W3C `traceparent`/`tracestate` pair.
//! - [`event`]: the [`Event`] trait tying a Rust type to its type name, version and subject.
//! - [`envelope`](mod@envelope): [`Envelope`] itself and JSON payload helpers.
//! - [`nats`]: the codec to and from NATS headers (CloudEvents binary mode, `Nats-Msg-Id`).
//! - [`wal`]: the versioned byte format of an envelope written to the write-ahead log
//!   (`pg_logical_emit_message`), for the log storage and the WAL relay.
//! - [`error`]: [`Error`], one variant per cause.

pub mod envelope;
pub mod error;
pub mod event;
pub mod headers;
pub mod id;
pub mod nats;
pub mod subject;
pub mod text;
pub mod trace;
pub mod wal;

pub use envelope::Envelope;
pub use error::Error;
pub use event::Event;
pub use headers::Headers;
pub use id::MessageId;
pub use subject::{EventType, Subject};
pub use text::{HeaderText, PartitionKey};
pub use trace::TraceContext;
