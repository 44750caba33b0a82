//! Local servers and supervised processes for tests, benchmarks and the demo: real PostgreSQL
//! and `nats-server -js` processes on free ports (one per test), any program as a child, with
//! kill/stop/restart/pause controls for chaos runs, and a fault-injecting TCP proxy.
//! Linux only. Nothing here is mocked, and a missing binary is an error naming the install
//! command, never a silent skip.
//!
//! The same servers can run as Docker containers instead (feature `containers`, through the
//! `testcontainers` crate): per call with [`PostgresConfig::backend`] /
//! [`NatsServerConfig::backend`], or for a whole run with `TESTKIT_BACKEND=containers`; the
//! controls are the same, and a container keeps its host ports across restarts. Images:
//! `TESTKIT_POSTGRES_IMAGE`,
//! `TESTKIT_NATS_IMAGE` (defaults `postgres:18`, `nats:2.15.1`).
//!
//! Layout:
//! - `postgres`: [`Postgres`], [`PostgresConfig`] — initdb template cache, server process,
//!   [`Postgres::fresh_database`]
//! - `nats`: [`NatsServer`], [`NatsServerConfig`] — `nats-server -js` with a temp JetStream store
//! - `process`: [`Process`], [`ProcessSpec`] — any program (a service, a relay) as a child that
//!   can be SIGKILLed, SIGTERMed, paused and restarted, and whether it listens on a port
//! - `proxy`: [`TcpProxy`] — latency, stall and cut between a client and a server
//! - `wait`: [`wait_until`], [`wait_for`] and [`wait_for_every`] (poll a condition, or a
//!   fallible one, with a deadline) and [`free_port`]
//! - [`logical`]: a `pgoutput` slot read through SQL, to check the logical messages producers
//!   wrote
//! - `backend`: [`Backend`] (process or containers) and `TESTKIT_BACKEND`
//! - `containers` (private, feature `containers`): a server as a container, its controls
//!   through testcontainers and the `docker` CLI; PostgreSQL and nats-server images' settings
//! - `error`: [`Error`], the one error type, and [`Result`]
//! - `server_process` (private): a server child and its process tree: log file, signals, kill
//!   on drop
//! - `listening` (private): which process listens on a TCP port, from `/proc`
//! - `sys` (private): the only `unsafe` — signals, `geteuid`, `PR_SET_PDEATHSIG`, reaping
//!
//! `DATABASE_URL` / `NATS_URL`, when set, make [`Postgres::start`] / [`NatsServer::start`] use
//! that external server instead; process controls then fail with [`Error::ExternalServer`].
//!
//! Cleanup: dropping a server (also while a test panics) stops it, SIGKILLs whatever is left
//! of its process tree and deletes its directory. If the test process itself dies, the kernel
//! SIGKILLs the servers (`PR_SET_PDEATHSIG`, set from one long-lived spawner thread because the
//! signal fires when the spawning *thread* exits); their temp dirs are then left behind. The
//! first server started makes the test process a child subreaper, so the backends of a killed
//! postmaster are reaped by testkit rather than left as zombies.

mod backend;
#[cfg(feature = "containers")]
mod containers;
mod error;
mod listening;
pub mod logical;
mod nats;
mod postgres;
mod process;
mod proxy;
mod server_process;
mod sys;
mod wait;

pub use backend::{Backend, ENV_BACKEND};
pub use error::{Error, Result};
pub use nats::{NatsServer, NatsServerConfig, find_nats_server};
pub use postgres::{Postgres, PostgresConfig, find_postgres_bin_dir};
pub use process::{Process, ProcessSpec};
pub use proxy::TcpProxy;
pub use wait::{free_port, wait_for, wait_for_every, wait_until};
