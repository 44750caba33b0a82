//! The runner behind `make demo`, `make up` and `make chaos`: the demo's whole topology
//! (PostgreSQL, nats-server, the three services of `demo-services` and their `relay`
//! sidecars) as local processes, the demo scenario, and the chaos run.
//!
//! The runner starts the service binaries and the relay binary as separate processes (by
//! default from its own directory, `target/<profile>/`); it links the services' library only
//! for their event types, schemas and store queries, and the services do not link the runner.
//!
//! # Layout
//! - [`stack`]: starting and stopping the topology, the services' APIs as typed calls, the
//!   saga's invariants.
//! - [`scenario`]: the demo scenario (`demo run`) and its printed summary, the curl commands
//!   of `demo up`.
//! - [`chaos`]: the chaos run (`chaos`): fault schedule, injection, load, checks.
//! - [`logs`]: reading the services' JSON log files (trace ids, line counts).
//! - [`client`]: the one HTTP/1.1 JSON client (the runner and the tests use it).
//! - [`console`]: the operator console over the stack's databases, served in-process.
//! - [`store`]: the runner's SQL (recreating the demo databases, reading outbox rows).

pub mod chaos;
pub mod client;
pub mod console;
pub mod logs;
pub mod scenario;
pub mod stack;
pub mod store;
