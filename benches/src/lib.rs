//! End-to-end benchmark scenarios for the outbox toolkit, each measuring its own baseline in
//! the same run against a real PostgreSQL and a real `nats-server -js` (started by `testkit`,
//! or the servers named by `DATABASE_URL` / `NATS_URL`).
//!
//! Every scenario returns one final line (`<scenario> key=value ...`) that the binary prints on
//! stdout; progress goes to stderr. Results and the exact commands are in `BENCHMARKS.md`.
//!
//! # Layout
//! - [`env`](mod@env): the servers, a fresh migrated database per run, the durability report, the
//!   streams, and the relay run in-process ([`env::RunningRelay`]).
//! - [`drain`]: `relay-drain`, relay throughput against raw pipelined JetStream publishing.
//! - [`latency`]: `relay-latency`, commit-to-receive latency at an offered rate.
//! - [`producer`]: `producer-overhead`, business transactions with and without an enqueue.
//! - [`backlog`]: `relay-backlog`, drain rate with a large backlog against a small one.
//! - [`inbox`]: `inbox-consume`, the inbox consumer against raw pull consumption.
//! - [`relay_process`]: the relay in a child process of the bench binary, whose memory
//!   `relay-drain` reads apart.
//! - [`console`]: `console`, the operator console's page times on a big database.
//! - [`wal_read`]: `wal-read`, a logical replication reader against raw JetStream publishing.
//! - [`stats`]: rates, percentiles and number formatting.

pub mod backlog;
pub mod console;
pub mod drain;
pub mod env;
pub mod inbox;
pub mod latency;
pub mod producer;
pub mod relay_process;
pub mod stats;
pub mod wal_read;

/// The event type of every outbox row the scenarios write.
pub const EVENT_TYPE: &str = "bench.event.v1";

/// The `source` of every outbox row the scenarios write.
pub const SOURCE: &str = "bench";
